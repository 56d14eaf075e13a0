"""``protlm demo``: the whole system on the bundled real data, its resume logic and its errors.

The fast tests run the quick profile (tiny evaluation subsets, one seed) with seconds of pretraining; the slow
test runs the real default evaluation path end to end.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from protlm.cli.main import main
from protlm.demo import STAGES, DemoOptions, run_demo
from protlm.demo.bundle import bundle_dir, demo_suite, pretrain_config
from protlm.errors import ConfigError, ProtlmError
from protlm.train.checkpoint import latest_checkpoint

QUICK = dict(minutes=0.1, threads=1, profile="quick", progress=False)


def _state(out):
    with open(os.path.join(out, "demo-state.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One complete quick demo, shared by the tests that only read it (copy it before changing anything)."""
    out = str(tmp_path_factory.mktemp("demo") / "run")
    assert main(["demo", "-o", out, "--minutes", "0.1", "--threads", "1", "--profile", "quick", "--no-progress"]) == 0
    return out


def test_bundle_is_complete_and_recipe_resolves():
    root = bundle_dir()
    with open(os.path.join(root, "SOURCES.md"), encoding="utf-8") as fh:
        sources = fh.read()
    data = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if f.endswith(".gz")]
    assert data, "no bundled data"
    for rel in data:  # every bundled file has its provenance row
        assert rel in sources, rel
    cfg = pretrain_config("/tmp/x", minutes=3)
    files = cfg.data.train + cfg.data.validation + cfg.data.exclude_sequences
    assert all(os.path.isabs(p) and os.path.exists(p) for p in files)
    assert cfg.run.time_limit_minutes == 3
    suite = demo_suite()
    assert {t.name for t in suite.tasks} >= {"SSP-3"} and suite.seeds == [7, 0, 42]
    assert all(not spec.missing_files() for spec in suite.datasets.values())


def test_training_time_is_credited_across_runs(tmp_path):
    """Time up to the newest checkpoint of an interrupted run counts against the budget; time after it does not."""
    from protlm.demo.pretrain import credited_seconds

    ckpt = tmp_path / "checkpoints" / "step_40"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    os.utime(ckpt / "meta.json", (1000.0 + 90.0, 1000.0 + 90.0))
    info = {"credited_seconds": 30.0, "credited_step": 10, "session_start": 1000.0}
    assert credited_seconds(info, str(tmp_path)) == (120.0, 40)
    # a checkpoint older than the run that was interrupted belongs to an earlier run: already credited
    assert credited_seconds({**info, "session_start": 2000.0}, str(tmp_path)) == (30.0, 10)
    assert credited_seconds({"credited_seconds": 0.0}, str(tmp_path / "none")) == (0.0, 0)


def test_quick_demo_writes_report_plots_and_verdict(finished):
    state = _state(finished)
    assert all(state["stages"][name]["done"] for name, _ in STAGES)
    with open(os.path.join(finished, "report.md"), encoding="utf-8") as fh:
        report = fh.read()
    verdict = [line for line in report.splitlines() if "random-init twin:" in line]
    assert verdict and ("BEATS" in verdict[0]) != ("does NOT beat" in verdict[0])
    # the verdict is the one computed from the evaluation's own results file
    results = json.load(open(os.path.join(finished, "evaluate", "results.json"), encoding="utf-8"))
    q3 = {(r["source"], r["dataset"]): r["mean"] for r in results["results"] if r["task"] == "SSP-3"}
    tests = {d for _, d in q3}
    mean = lambda s: sum(q3[(s, d)] for d in tests) / len(tests)  # noqa: E731
    assert ("BEATS" in verdict[0]) == (mean("pretrained") > mean("random-init twin"))
    assert {s["name"] for s in results["sources"]} == {"one-hot", "random-init twin", "pretrained"}
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert "pretrain/curves.png" in images and any(p.startswith("projection/") for p in images)
    assert any(p.startswith("depth/") for p in images)
    for rel in images:
        with open(os.path.join(finished, rel), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", rel
    assert "## 5. Completion" in report and "| protein |" in report


def test_demo_keeps_the_pretrained_heads_for_predict(finished, tmp_path, capsys):
    from protlm.evaluate.bundle import read_meta

    results = json.load(open(os.path.join(finished, "evaluate", "results.json"), encoding="utf-8"))
    tasks = {r["task"] for r in results["results"]}
    assert sorted(os.listdir(os.path.join(finished, "heads"))) == sorted(tasks)
    meta = read_meta(os.path.join(finished, "heads", "SSP-3"))
    assert meta.source == "pretrained" and meta.backbone["model"] == os.path.abspath(os.path.join(finished, "pretrain", "final"))
    for test, metrics in meta.metrics.items():  # the kept seed's numbers are among the report's
        row = next(r for r in results["results"] if (r["source"], r["task"], r["dataset"]) == ("pretrained", "SSP-3", test))
        assert metrics["accuracy"] in row["values"]
    fasta = tmp_path / "my.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMSEQNNTEMTFQIQRIYTKDISFEAPNAPHVFQKDW\n")
    capsys.readouterr()
    assert main(["predict", os.path.join(finished, "pretrain", "final"), "--heads", os.path.join(finished, "heads", "SSP-3"),
                 str(fasta)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:3] == ["id", "length", "SSP-3"] and [r[0] for r in rows[1:]] == ["a", "b"]
    assert all(len(r[2]) == int(r[1]) and set(r[2]) <= set(meta.classes) for r in rows[1:])


def test_rerun_skips_finished_stages(finished, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    before = _state(out)
    result = run_demo(DemoOptions(out_dir=out, **QUICK), log=lambda _: None)
    assert result.ran == ["report"]  # the report is always redrawn; nothing else is recomputed
    after = _state(out)
    for name, _ in STAGES[:-1]:
        assert after["stages"][name]["seconds"] == before["stages"][name]["seconds"]


def test_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        run_demo(DemoOptions(out_dir=str(path), **QUICK))
    assert main(["demo", "-o", str(path), "--profile", "quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0]
    assert path.read_text() == "not a directory"


def test_disk_full_is_one_clear_error_and_keeps_finished_work(finished, tmp_path, monkeypatch):
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    import protlm.demo.report as report_module

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(report_module, "atomic_write_text", full)
    with pytest.raises(ProtlmError, match=r"^no space left on device writing .*report\.md"):
        run_demo(DemoOptions(out_dir=out, **QUICK), log=lambda _: None)
    state = _state(out)
    assert all(state["stages"][name]["done"] for name, _ in STAGES[:-1])
    assert os.path.exists(os.path.join(out, "evaluate", "results.json"))
    monkeypatch.undo()
    result = run_demo(DemoOptions(out_dir=out, **QUICK), log=lambda _: None)
    assert result.ran == ["report"] and os.path.exists(result.report)


def test_disk_full_in_the_cli_is_one_line(finished, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    import protlm.demo.report as report_module

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(report_module, "atomic_write_text", full)
    assert main(["demo", "-o", out, "--profile", "quick", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [err[0]] and "no space left on device writing" in err[0]


def test_disk_full_inside_a_torch_checkpoint_write(tmp_path, monkeypatch):
    """torch.distributed.checkpoint wraps the OS error in its own exception; it is still named as a full disk."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from protlm.train.trainer import Trainer

    def full(self, step, *args, **kwargs):
        path = os.path.join(self.out, "checkpoints", f".tmp-step_{step}")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        except OSError as err:
            raise CheckpointException("save failed", {0: _wrap_exception(err)}) from None

    monkeypatch.setattr(Trainer, "_save", full)
    out = str(tmp_path / "run")
    with pytest.raises(ProtlmError, match=r"^no space left on device writing .*checkpoints"):
        run_demo(DemoOptions(out_dir=out, **QUICK), log=lambda _: None)
    assert not _state(out)["stages"]["pretrain"]["done"]


def test_interrupt_then_rerun_resumes(tmp_path, monkeypatch):
    """Ctrl-C during pretraining (after a checkpoint), then during the evaluation; each re-run continues."""
    out = str(tmp_path / "run")
    import protlm.evaluate.runner as eval_runner
    from protlm.train.trainer import Trainer

    real_save, saves = Trainer._save, []

    def save_then_interrupt(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        saves.append(step)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoOptions(out_dir=out, **QUICK), log=lambda _: None)
    first_step = saves[0]
    state = _state(out)
    assert not state["stages"]["pretrain"]["done"]
    assert latest_checkpoint(os.path.join(out, "pretrain")).step == first_step
    monkeypatch.setattr(Trainer, "_save", real_save)

    real_unit, units = eval_runner._train_unit, []

    def train_then_interrupt(*args, **kwargs):
        if units:
            raise KeyboardInterrupt
        units.append(1)
        return real_unit(*args, **kwargs)

    monkeypatch.setattr(eval_runner, "_train_unit", train_then_interrupt)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoOptions(out_dir=out, **QUICK), log=logs.append)
    assert any(f"resuming from step {first_step}" in m for m in logs)
    state = _state(out)
    assert state["stages"]["pretrain"]["done"] and state["stages"]["pretrain"]["step"] > first_step
    assert state["stages"]["embed"]["done"] and not state["stages"]["evaluate"]["done"]
    unit_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(out, "evaluate", "units")) for f in fs
                  if not d.endswith(".head")]  # (each finished unit also keeps its head bundle in seed<S>.head/)
    assert len(unit_files) == 1
    stamp = os.path.getmtime(unit_files[0])
    monkeypatch.setattr(eval_runner, "_train_unit", real_unit)

    result = run_demo(DemoOptions(out_dir=out, **QUICK), log=lambda _: None)
    assert result.ran == ["evaluate", "depth", "complete", "report"]
    assert os.path.getmtime(unit_files[0]) == stamp  # the finished head was read back, not trained again
    assert os.path.exists(os.path.join(out, "heads", "SSP-3", "head.json"))  # and its bundle is still kept
    assert os.path.exists(result.report)


@pytest.mark.slow
def test_default_profile_end_to_end(tmp_path):
    """The real evaluation, depth and completion settings (only the pretraining budget is cut)."""
    out = str(tmp_path / "run")
    result = run_demo(DemoOptions(out_dir=out, minutes=1.0, threads=1, progress=False), log=lambda _: None)
    results = json.load(open(os.path.join(out, "evaluate", "results.json"), encoding="utf-8"))
    assert results["profile"] == "full"
    ssp3 = [r for r in results["results"] if r["task"] == "SSP-3"]
    assert {r["dataset"] for r in ssp3} == {"CASP12", "CASP14", "CB513", "NEW364"}
    assert all(r["seeds"] == [7, 0, 42] for r in ssp3)
    assert results["proteins"]["SSP-3"]["test:CB513"] == 511
    assert result.verdict.startswith("On SSP-3, the pretrained model")
    with open(result.report, encoding="utf-8") as fh:
        assert result.verdict in fh.read()
