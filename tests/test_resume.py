"""Exact resume: a training process killed with SIGKILL mid-run and resumed with --resume produces the same
losses, step for step, as a run that was never interrupted (model, optimizer, schedule, data position and RNG
all come back)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train_helpers import read_metrics, train_losses, val_losses, write_config

STEPS = 40
EVERY = 4


def _command(path: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "protlm.cli.main", "pretrain", "--config", path, *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    settings = dict(run={"steps": STEPS}, eval={"every": EVERY}, checkpoint={"every": EVERY, "keep": 2, "export": False},
                    optim={"warmup_steps": 5})
    (tmp_path / "a").mkdir()
    straight = write_config(tmp_path / "a", tmp_path / "straight", **settings)
    subprocess.run(_command(straight), check=True, env=_env(), capture_output=True)

    interrupted = tmp_path / "interrupted"
    path = write_config(tmp_path / "a", interrupted, **settings)
    proc = subprocess.Popen(_command(path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = interrupted / "checkpoints"
    deadline = time.time() + 300
    # Kill as soon as the second checkpoint is complete: the process is then mid-run, between checkpoints.
    while time.time() < deadline:
        done = [n for n in (os.listdir(ckpts) if ckpts.exists() else []) if n.startswith("step_")]
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_metrics(interrupted))
    assert killed_at < STEPS

    result = subprocess.run(_command(path, "--resume"), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr

    want, got = train_losses(tmp_path / "straight"), train_losses(interrupted)
    assert sorted(got) == list(range(1, STEPS + 1))  # no step missing or duplicated in the log
    assert got == want  # exactly: same floats
    assert val_losses(interrupted) == val_losses(tmp_path / "straight")
