"""protlm ablate: a miniature ablation end to end (and resumed after an interruption), the checks made before
compute, the trainer's token budget, per-protein evaluation rows and the paired bootstrap."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from protlm.ablate import check_plan, load_recipe, paired_bootstrap, run_ablation
from protlm.ablate import run as ablate_run
from protlm.cli.main import main
from protlm.errors import ConfigError
from tests.conftest import DATA
from tests.train_helpers import MINI_SUITE, mini_ablation_recipe, read_metrics, write_config

SUITE = MINI_SUITE
_recipe = mini_ablation_recipe


# Small models on a shared CPU: a second thread only adds synchronisation (several times slower here).
pytestmark = pytest.mark.usefixtures("one_thread")


# --- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_miniature_ablation_end_to_end_with_resume(tmp_path, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path))
    out = recipe.output_dir

    # 1) killed during the second evaluation (order: A0, C0, A1, C1, each pretrained then evaluated): the first
    # two pretraining runs and the first evaluation are finished and recorded
    real_evaluate = ablate_run._evaluate
    calls = []

    def dies_on_second(plan, state, variant, seed, progress, log):
        calls.append((variant, seed))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(plan, state, variant, seed, progress, log)

    monkeypatch.setattr(ablate_run, "_evaluate", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(recipe, progress=False, log=lambda s: None)
    assert calls == [("A", 0), ("C", 0)]
    state = json.load(open(os.path.join(out, "state.json")))["stages"]
    assert state["pretrain/A/seed0"]["status"] == state["pretrain/C/seed0"]["status"] == "done"
    assert "pretrain/A/seed1" not in state
    assert state["evaluate/A/seed0"]["status"] == "done"
    assert not os.path.exists(os.path.join(out, "report.md"))

    # 2) re-run: nothing finished is done again
    monkeypatch.setattr(ablate_run, "_evaluate", real_evaluate)
    from protlm.train import Trainer

    real_train = Trainer.run
    trained = []

    def counting_train(self):
        trained.append(os.path.basename(self.out))
        return real_train(self)

    monkeypatch.setattr(Trainer, "run", counting_train)
    import protlm.evaluate as ev

    real_suite = ev.run_suite
    evaluated = []

    def counting_suite(suite, sources, out_dir, **kw):
        evaluated.append(os.path.basename(out_dir))
        return real_suite(suite, sources, out_dir, **kw)

    monkeypatch.setattr(ev, "run_suite", counting_suite)
    result = run_ablation(recipe, progress=False, log=lambda s: None)
    assert trained == ["A-seed1", "C-seed1"]
    assert evaluated == ["C-seed0", "A-seed1", "C-seed1"]

    # every run stopped at the budget, within one step of it
    for v in "AC":
        for s in (0, 1):
            rec = result["pretraining"][f"{v}-seed{s}"]
            metrics = read_metrics(os.path.join(out, "pretrain", f"{v}-seed{s}"))
            per_step = max(b["train/tokens_seen"] - a["train/tokens_seen"] for a, b in zip(metrics, metrics[1:])
                           if "train/tokens_seen" in a and "train/tokens_seen" in b)
            assert 2000 <= rec["tokens"] < 2000 + per_step + 1
    # the objectives differ, so the same budget takes different numbers of steps: A's examples are longer
    assert result["pretraining"]["C-seed0"]["steps"] >= result["pretraining"]["A-seed0"]["steps"]

    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "| task | test set | metric | A | C |" in report
    for v in "AC":
        for s in (0, 1):
            assert f"| {v} | {s} |" in report  # the per-seed table and the pretraining table
    for h in (7, 0, 42):
        assert f"head seed {h}" in report
    for row in result["rows"]:
        for v in "AC":
            assert sorted(row["values"][v]) == ["0", "1"]
            assert all(sorted(by_head, key=int) == ["0", "7", "42"] for by_head in row["values"][v].values())
    diffs = {(d["task"], d["test"]): d for d in result["differences"]}
    assert set(diffs) == {("SSP-3", "NEW364"), ("GB1", "FLIP")}
    for d in diffs.values():
        assert d["low"] <= d["estimate"] <= d["high"] and d["n_proteins"] == 8
    assert "Absent" not in report
    assert "## Depth analysis" in report and "C probe Q3" in report
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    verdict = result["verdict"]
    assert verdict in report and "bootstrap interval over test proteins" in verdict

    # 3) a third run only rewrites the report, with the same numbers
    monkeypatch.setattr(ev, "run_suite", lambda *a, **k: pytest.fail("a finished evaluation was started again"))
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail("a finished pretraining run was started again"))
    again = run_ablation(recipe, progress=False, log=lambda s: None)
    assert again["differences"] == result["differences"]


# --- checks before compute -----------------------------------------------------------------------------------
def _error(path, match):
    with pytest.raises(ConfigError, match=match) as info:
        check_plan(load_recipe(path), log=lambda s: None)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_variants_may_differ_only_in_the_objective(tmp_path):
    path = _recipe(tmp_path, **{"variants.C.set": {"objective.task_probs": {"denoise": 0.5, "complete": 0.5},
                                                   "model.overrides.d_model": 48}})
    msg = _error(path, r"variant C differs from A in model\.overrides\.d_model")
    assert "allow_differences" in msg
    allowed = _recipe(tmp_path, allow_differences=["model.overrides.d_model"],
                      **{"variants.C.set": {"objective.task_probs": {"denoise": 0.5, "complete": 0.5},
                                            "model.overrides.d_model": 48}})
    plan = check_plan(load_recipe(allowed), log=lambda s: None)
    assert plan.configs[("C", 0)].model.overrides["d_model"] == 48
    _error(_recipe(tmp_path, **{"variants.C.set": {"optim.lr": 0.1}}), r"differs from A in optim\.lr")


def test_budget_out_of_reach(tmp_path):
    msg = _error(_recipe(tmp_path, token_budget=1e6), r"token_budget 1e\+06 is out of reach for variant")
    assert "passes over its training data" in msg
    _error(_recipe(tmp_path, token_budget=3000, base_set=["run.steps=3"]), r"needs about \d+ steps")


def test_budget_counts_each_objective(tmp_path):
    plan = check_plan(load_recipe(_recipe(tmp_path)), log=lambda s: None)
    a, c = plan.budget["A"], plan.budget["C"]
    assert a.sequences == c.sequences > 0
    # denoising keeps the whole sequence in the encoder and adds sentinel+residue pairs to the decoder;
    # completion splits the sequence between the two, so it yields fewer tokens per sequence
    assert c.tokens_per_sequence < a.tokens_per_sequence
    assert math.isclose(a.passes_needed, 2000 / a.tokens_per_pass)


def test_missing_evaluation_split(tmp_path):
    suite = copy.deepcopy(SUITE)
    suite["datasets"]["gb1"]["files"]["path"] = "gone.csv"
    _error(_recipe(tmp_path, suite=suite), r"task GB1 needs .*gone\.csv \(dataset gb1\), which does not exist")
    suite = copy.deepcopy(SUITE)
    suite["tasks"][0]["valid"] = "flip_ss3/nosuch"
    _error(_recipe(tmp_path, suite=suite), r"evaluation: task SSP-3: .*nosuch")
    _error(_recipe(tmp_path, **{"evaluation.tasks": ["SSP-3", "Absent"]}), r"task Absent needs .*not_here\.csv")
    _error(_recipe(tmp_path, **{"evaluation.tasks": ["SSP-9"]}), r"no task 'SSP-9'")


@pytest.mark.parametrize("change, match", [
    ({"pretrain_seeds": [0]}, r"at least 2 distinct seeds"),
    ({"stats.compare": ["D", "A"]}, r"stats.compare names 'D'"),
    ({"variants.A.set": {"run.seed": 3}}, r"variants\.A\.set\.run\.seed is set by the ablation"),
    ({"token_budget": 0}, r"token_budget must be a positive"),
    ({"depth.input": "/nonexistent.fasta"}, r"depth\.input /nonexistent\.fasta: no such file"),
    ({"variants.A.set": {"objective.mask_rate": [0.15]}}, r"unknown config key 'objective.mask_rate'"),
    ({"tokn_budget": 5}, r"unknown config key 'tokn_budget' \(did you mean 'token_budget'\?\)"),
])
def test_bad_recipe_is_one_line_error(tmp_path, capsys, change, match):
    path = _recipe(tmp_path, **change)
    with pytest.raises(ConfigError, match=match):
        check_plan(load_recipe(path), log=lambda s: None)
    assert main(["ablate", "--config", path, "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("protlm ablate: error:") and "Traceback" not in "".join(err)


def test_cli_check_prints_the_plan(tmp_path, capsys):
    assert main(["ablate", "--config", _recipe(tmp_path), "--check"]) == 0
    err = capsys.readouterr().err
    assert "2 variants x 2 pretraining seeds" in err and "evaluation: SSP-3, GB1" in err
    assert not os.path.exists(tmp_path / "ablation" / "state.json")  # nothing ran


def test_a_directory_of_another_recipe_is_refused(tmp_path):
    from protlm.ablate.run import State

    os.makedirs(tmp_path / "x")
    s = State(str(tmp_path / "x" / "state.json"), "hash-1")
    s.update("pretrain/A/seed0", status="done")
    with pytest.raises(ConfigError, match="pretraining settings differ"):
        State(str(tmp_path / "x" / "state.json"), "hash-2")
    assert State(str(tmp_path / "x" / "state.json"), "hash-1").done("pretrain/A/seed0")


# --- the trainer's token budget ------------------------------------------------------------------------------
def test_token_budget_stops_training_and_survives_resume(tmp_path):
    from protlm.train import Trainer, load_config

    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, out, run={"steps": 100, "token_budget": 1500.0}))
    first = Trainer(cfg).run()
    recs = [r for r in read_metrics(out) if "train/tokens_seen" in r]
    assert first.step < 100 and first.tokens_seen >= 1500
    assert recs[-1]["train/tokens_seen"] == first.tokens_seen
    before_last = recs[-2]["train/tokens_seen"] if len(recs) > 1 else 0.0
    assert before_last < 1500  # it stopped at the first step that reached the budget
    # resuming with a larger budget continues the count from the checkpoint
    cfg2 = load_config(write_config(tmp_path, out, run={"steps": 100, "token_budget": 3000.0}))
    second = Trainer(cfg2, resume=True).run()
    assert second.step > first.step and 3000 <= second.tokens_seen
    resumed = [r for r in read_metrics(out) if "train/tokens_seen" in r and r["step"] > first.step]
    assert resumed[0]["train/tokens_seen"] > first.tokens_seen
    # resuming a run whose budget is spent trains nothing
    third = Trainer(cfg2, resume=True).run()
    assert third.step == second.step and third.tokens_seen == second.tokens_seen


def test_token_budget_must_not_be_negative(tmp_path):
    from protlm.train import load_config

    with pytest.raises(ConfigError, match="run.token_budget must be >= 0"):
        load_config(write_config(tmp_path, tmp_path / "o", run={"token_budget": -1}))


# --- per-protein rows and the bootstrap ----------------------------------------------------------------------
def _examples(kind, n, rng):
    from protlm.evaluate.tasks import TaskExample

    out, preds = [], []
    for i in range(n):
        L = int(rng.integers(8, 30))
        if kind == "residue_classification":
            t = rng.integers(-1, 3, size=L)
            out.append(TaskExample(f"p{i}", "ds", L, t))
            preds.append(rng.integers(0, 3, size=L))
        elif kind == "protein_classification":
            out.append(TaskExample(f"p{i}", "ds", L, int(rng.integers(0, 3))))
            preds.append(int(rng.integers(0, 3)))
        elif kind == "protein_regression":
            out.append(TaskExample(f"p{i}", "ds", L, float(rng.normal())))
            preds.append(float(rng.normal()))
        else:
            c = (rng.random((L, L)) < 0.2).astype(np.int8)
            c = np.triu(c) + np.triu(c, 1).T
            out.append(TaskExample(f"p{i}", "ds", L, c))
            preds.append(rng.random((L, L)))
    return out, preds


@pytest.mark.parametrize("kind", ["residue_classification", "protein_classification", "protein_regression", "contact"])
def test_per_protein_rows_reproduce_the_metric(kind):
    from protlm.ablate.stats import _Scorer
    from protlm.evaluate.tasks import TaskSpec
    from protlm.evaluate.training import per_protein_rows, score, score_rows

    rng = np.random.default_rng(1)
    spec = {"name": "t", "kind": kind, "label": "x", "train": "a", "valid": "b", "test": {"t": "c"}}
    if "classification" in kind:
        spec["classes"] = ["H", "E", "C"]
    if kind == "contact":
        spec["metrics"] = ["P@L", "P@L/5", "P@L-long"]
    task = TaskSpec(**spec)
    examples, preds = _examples(kind, 12, rng)
    full = score(task, examples, preds)
    rows = per_protein_rows(task, examples, preds)
    assert [r["id"] for r in rows] == [f"ds/p{i}" for i in range(12)]
    for metric, value in full.items():
        assert math.isclose(score_rows(kind, metric, rows), value, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(_Scorer(kind, metric, rows).score(None), value, rel_tol=1e-12, abs_tol=1e-12)
        index = rng.integers(0, 12, size=12)
        picked = [rows[i] for i in index]
        a, b = score_rows(kind, metric, picked), _Scorer(kind, metric, rows).score(index)
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_paired_bootstrap_sees_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(0)
    n = 200
    scored = rng.integers(20, 80, size=n)

    def model(p):
        return [{"id": f"p{i}", "correct": int(rng.binomial(scored[i], p)), "scored": int(scored[i])} for i in range(n)]

    same = {(s, h): model(0.6) for s in (0, 1) for h in (7, 0, 42)}
    other = {(s, h): model(0.6) for s in (0, 1) for h in (7, 0, 42)}
    better = {(s, h): model(0.7) for s in (0, 1) for h in (7, 0, 42)}
    null = paired_bootstrap("residue_classification", "accuracy", same, other, ("C", "A"), 300)
    assert null.low < 0 < null.high and null.reading == "no resolved difference"
    real = paired_bootstrap("residue_classification", "accuracy", better, same, ("C", "A"), 300)
    assert 0.08 < real.estimate < 0.12 and real.low > 0 and real.reading == "C higher"
    assert set(real.by_pretrain_seed) == {0, 1}
    # identical models: the difference is exactly zero on every resample
    zero = paired_bootstrap("residue_classification", "accuracy", same, same, ("C", "A"), 100)
    assert zero.estimate == zero.low == zero.high == 0.0


# --- the shipped recipe --------------------------------------------------------------------------------------
def test_shipped_recipe_is_the_issue_design(monkeypatch):
    from protlm.ablate.plan import check_matched
    from protlm.ablate.recipe import variant_config

    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))  # its paths are relative to the repo root
    recipe = load_recipe(os.path.join("configs", "ablation", "tiny-cpu.yaml"))
    assert list(recipe.variants) == ["A", "B", "C", "D"] and recipe.stats.compare == ["C", "A"]
    assert len(recipe.pretrain_seeds) >= 2
    configs = {(v, s): variant_config(recipe, v, s) for v in recipe.variants for s in recipe.pretrain_seeds}
    check_matched(recipe, configs)
    obj = {v: configs[(v, 0)].objective for v in recipe.variants}
    assert obj["A"].probabilities["complete"] == 0 and obj["A"].mask_rates == (0.15,)
    assert obj["B"].probabilities["complete"] == 0 and obj["B"].mask_rates == (0.15, 0.2, 0.3)
    assert obj["C"].probabilities["complete"] == 0.5 and obj["C"].completion_ratio == 0.5
    assert obj["D"].mask_rates == obj["C"].mask_rates and isinstance(obj["D"].completion_ratio, tuple)
    assert all(c.run.token_budget == recipe.token_budget and c.run.time_limit_minutes == 0 for c in configs.values())


@pytest.mark.slow
def test_shipped_recipe_passes_its_checks_on_the_staged_data(monkeypatch):
    from tests.conftest import shared_data

    shared_data("corpus")
    shared_data("ssp_netsurfp")
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))
    plan = check_plan(load_recipe(os.path.join("configs", "ablation", "tiny-cpu.yaml")), log=lambda s: None)
    assert all(b.passes_needed <= 4 for b in plan.budget.values())
    assert plan.eval_seeds == [7, 0, 42] and "SSP-3" in plan.tasks


def test_evaluate_units_carry_per_protein_rows_and_old_units_still_read(tmp_path):
    from protlm.evaluate import OneHotSource, parse_suite, run_suite

    suite = parse_suite(copy.deepcopy({**SUITE, "seeds": [7]}), "mini")
    out = str(tmp_path / "ev")
    run = run_suite(suite, [OneHotSource()], out, quick=True, tasks=["GB1"], progress=False, log=lambda s: None)
    cell = run.cells[0]
    rows = cell.per_protein["FLIP"][7]
    assert len(rows) == cell.n["test:FLIP"] == 8 and {"id", "pred", "target"} <= set(rows[0])
    from protlm.evaluate.training import score_rows

    assert math.isclose(score_rows("protein_regression", "spearman", rows), cell.values["FLIP"]["spearman"][0])
    # a unit file written before per-protein rows existed is read back as it is, without retraining
    unit = os.path.join(out, "units", "one-hot", "GB1", "seed7.json")
    data = json.load(open(unit))
    del data["result"]["per_protein"]
    json.dump(data, open(unit, "w"))
    again = run_suite(suite, [OneHotSource()], out, quick=True, tasks=["GB1"], progress=False, log=lambda s: None)
    assert again.cells[0].resumed_units == 1 and again.cells[0].per_protein == {}
    assert again.cells[0].values == cell.values


def test_set_overrides_the_recipe(tmp_path):
    path = _recipe(tmp_path)
    r = load_recipe(path, overrides=["token_budget=1500", "evaluation.tasks=[GB1]",
                                     "variants.A.set.objective.mask_rates=[0.2]", "stats.bootstrap=500"])
    assert r.token_budget == 1500 and r.evaluation.tasks == ["GB1"] and r.stats.bootstrap == 500
    assert r.variants["A"].set["objective.mask_rates"] == [0.2]
    with pytest.raises(ConfigError, match="unknown config key 'evaluation.taks'"):
        load_recipe(path, overrides=["evaluation.taks=[GB1]"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(path, overrides=["token_budget"])


def test_refuses_to_run_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="runs as one process"):
        run_ablation(load_recipe(_recipe(tmp_path)), progress=False, log=lambda s: None)
