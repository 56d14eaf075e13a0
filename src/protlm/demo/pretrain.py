"""Stage 1: pretrain the tiny Ankh3 model with both objectives for a set time, resumable across runs.

The trainer's own time limit counts from the start of each run, so an interrupted demo would train for the full
budget again after a resume. This stage therefore credits the training time that reached a checkpoint in
earlier runs (from the run's start to the newest checkpoint's ``meta.json``) and gives the trainer only the rest.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

from protlm.demo.bundle import pretrain_config
from protlm.demo.state import DemoState
from protlm.precision import describe_cpu
from protlm.settings import override
from protlm.train import Trainer
from protlm.train.checkpoint import latest_checkpoint

MIN_SLICE_MINUTES = 0.05  # a resumed run always trains a little: it validates, checkpoints and exports at the end


@dataclass
class PretrainOutcome:
    final_dir: str
    step: int
    minutes: float  # training minutes credited in all runs


def credited_seconds(info: dict, out_dir: str) -> tuple[float, int]:
    """Training seconds (and the step) already saved in checkpoints by earlier runs of this stage."""
    seconds = float(info.get("credited_seconds", 0.0))
    step = int(info.get("credited_step", 0))
    start = info.get("session_start")
    found = latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    if start is not None and found is not None and found.step > step:
        written = os.path.getmtime(os.path.join(found.path, "meta.json"))
        if written > start:
            seconds += written - start
            step = found.step
    return seconds, step


def run_pretrain(state: DemoState, out_dir: str, minutes: float, threads: int | None, progress: bool,
                 log) -> PretrainOutcome:
    pre_dir = os.path.join(out_dir, "pretrain")
    info = state.stage("pretrain")
    seconds, step = credited_seconds(info, pre_dir)
    # minutes == 0: no time limit (the recipe's run.steps decides), as in the trainer
    remaining = max(minutes - seconds / 60.0, MIN_SLICE_MINUTES) if minutes > 0 else 0.0
    if step:
        log(f"resuming from step {step}: {seconds / 60:.1f} training minutes done"
            + (f" of {minutes:g}, {remaining:.1f} left" if minutes > 0 else ""))
    cfg = pretrain_config(pre_dir, remaining, threads)
    # With a time limit, the trainer's bar would count steps towards run.steps, a loose upper bound; a clock
    # reads better. Without one, the trainer's own bar is right.
    cfg = override(cfg, {"log.progress": progress and minutes <= 0})
    state.update("pretrain", credited_seconds=seconds, credited_step=step, session_start=time.time(),
                 minutes=minutes)
    trainer = Trainer(cfg, resume=True)
    with TimeBar(pre_dir, minutes * 60.0, seconds, enabled=progress and minutes > 0):
        result = trainer.run()
    seconds, _ = credited_seconds(state.stage("pretrain"), pre_dir)
    state.update("pretrain", credited_seconds=seconds, credited_step=result.step, session_start=None,
                 step=result.step, final_dir=result.final_dir, trained_minutes=seconds / 60.0,
                 precision=trainer.precision.describe(), cpu=describe_cpu(),
                 last_validation={k: v for k, v in result.last_metrics.items()
                                  if k.startswith("val/") and math.isfinite(v)})
    return PretrainOutcome(result.final_dir, result.step, seconds / 60.0)


class TimeBar:
    """A progress bar over the training minutes, with the step and loss the trainer last logged."""

    def __init__(self, pre_dir: str, total_seconds: float, done_seconds: float, enabled: bool = True):
        self.path = os.path.join(pre_dir, "metrics.jsonl")
        self.total, self.done = total_seconds, done_seconds
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "TimeBar":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _last_record(self) -> dict:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.path) - 8192))
                lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.startswith("{")]
            for line in reversed(lines):
                row = json.loads(line)
                if "train/all/loss" in row:
                    return row
        except (OSError, ValueError):
            pass
        return {}

    def _run(self) -> None:
        from tqdm import tqdm

        start = time.monotonic()
        with tqdm(total=round(self.total), initial=round(min(self.done, self.total)), desc="pretrain", unit="s",
                  dynamic_ncols=True, file=sys.stderr,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s of training{postfix}") as bar:
            while not self._stop.wait(2.0):
                bar.n = round(min(self.done + time.monotonic() - start, self.total))
                row = self._last_record()
                if row:
                    bar.set_postfix_str(f"step {row['step']}, loss {row['train/all/loss']:.3f}", refresh=False)
                bar.refresh()
