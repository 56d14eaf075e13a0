"""Running an ablation: check, pretrain every (variant, seed), evaluate each model, analyse depth, report.

Output directory (``output_dir`` of the recipe)::

    DIR/recipe.yaml                       the recipe as run, plus the resolved config of every (variant, seed)
    DIR/state.json                        finished stages and the wall time each took
    DIR/pretrain/<V>-seed<S>/             a pretraining run (checkpoints, metrics.jsonl, final/)
    DIR/evaluate/<V>-seed<S>/             its benchmark (protlm evaluate's layout) + cells.json
    DIR/depth/<V>-seed<S>/                depth analysis of the compared variants (depth.json, plots)
    DIR/embeddings/                       the evaluation's embedding cache
    DIR/report.md, results.json, curves.png

Resuming works at two levels. ``state.json`` marks finished stages, which are never run again; an unfinished
stage resumes on its own (the trainer from its newest checkpoint, the evaluation from its finished unit files,
the depth analysis from its saved batches). A state written by a recipe whose pretraining differs is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from protlm.ablate.plan import AblationPlan, check_plan
from protlm.ablate.recipe import AblationRecipe, run_dir
from protlm.errors import CheckpointError, ConfigError
from protlm.settings import override
from protlm.stages import StageLog
from protlm.utils import atomic_write_text

STATE_FORMAT = "protlm.ablation/1"


@dataclass
class EvalCells:
    """One pretrained model's benchmark: per task, what the report and the bootstrap need."""

    variant: str
    seed: int
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {kind, metrics, values, per_protein}


class State(StageLog):
    """``DIR/state.json``: stage key -> record (``status``, ``seconds``, the stage's facts)."""

    RUNNING = {"status": "running"}
    DONE = {"status": "done"}

    def __init__(self, path: str, pretrain_hash: str):
        super().__init__(path, {"format": STATE_FORMAT, "pretrain_hash": pretrain_hash})
        old = self.read("ablation state")
        if old is not None:
            if old.get("format") != STATE_FORMAT:
                raise CheckpointError(f"{path}: not a {STATE_FORMAT} state file")
            if old.get("pretrain_hash") != pretrain_hash and any(k.startswith("pretrain/") for k in old["stages"]):
                raise ConfigError(f"{path}: this directory holds an ablation whose pretraining settings differ from "
                                  "the recipe's; use another output_dir (or --out) or delete the directory")
            self.data["stages"] = old.get("stages", {})

    def done(self, key: str, stage_hash: str | None = None) -> bool:
        return super().done(key) and (stage_hash is None or self.stage(key).get("hash") == stage_hash)


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrain_hash(plan: AblationPlan) -> str:
    """What decides the pretrained weights (logging settings excluded)."""
    configs = {f"{v}/{s}": {k: c for k, c in cfg.to_dict().items() if k != "log"}
               for (v, s), cfg in sorted(plan.configs.items())}
    return _hash({"configs": configs, "budget": plan.recipe.token_budget})


def run_ablation(recipe: AblationRecipe, progress: bool = True, log: Callable[[str], None] = print,
                 check_only: bool = False) -> dict[str, Any]:
    """Check the recipe, then run (or resume) every stage and write the report; returns the report's numbers."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("protlm ablate runs as one process (it trains, evaluates and reports in turn); "
                          "start it without torchrun")
    t0 = time.perf_counter()
    plan = check_plan(recipe, log)
    log(plan.describe())
    if check_only:
        return {"plan": plan}
    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    out = recipe.output_dir
    os.makedirs(out, exist_ok=True)
    state = State(os.path.join(out, "state.json"), pretrain_hash(plan))
    state.update("check", status="done", seconds=time.perf_counter() - t0)
    atomic_write_text(os.path.join(out, "recipe.yaml"), yaml.safe_dump(
        {"recipe": recipe.to_dict(), "source": recipe.source,
         "resolved": {f"{v}-seed{s}": cfg.to_dict() for (v, s), cfg in plan.configs.items()}},
        sort_keys=False, default_flow_style=None))

    # Seed-major order, each model evaluated as soon as it exists: an ablation stopped part-way has every variant
    # at the first seed before any at the second.
    evals = []
    for seed in recipe.pretrain_seeds:
        for variant in recipe.variants:
            _pretrain(plan, state, variant, seed, progress, log)
            evals.append(_evaluate(plan, state, variant, seed, progress, log))
    depth = {}
    if recipe.depth.enabled:
        for variant in recipe.stats.compare:
            for seed in plan.depth_seeds:
                depth[(variant, seed)] = _depth(plan, state, variant, seed, progress, log)

    from protlm.ablate.report import write_report

    t = time.perf_counter()
    result = write_report(plan, state, evals, depth, log)
    state.update("report", status="done", seconds=time.perf_counter() - t)
    log(f"wrote {os.path.join(out, 'report.md')}")
    return result


# --- stages --------------------------------------------------------------------------------------------------
def _pretrain(plan: AblationPlan, state: State, variant: str, seed: int, progress: bool, log) -> None:
    from protlm.train import Trainer

    key = f"pretrain/{variant}/seed{seed}"
    cfg = plan.configs[(variant, seed)]
    final = os.path.join(cfg.output_dir, "final")
    if state.done(key) and os.path.exists(os.path.join(final, "config.json")):
        return
    if not progress:
        cfg = override(cfg, {"log.progress": False})
    log(f"[pretrain {variant} seed {seed}] {cfg.output_dir}")

    def go() -> dict[str, Any]:
        result = Trainer(cfg, resume=True).run()
        if result.tokens_seen < cfg.run.token_budget:
            raise ConfigError(f"{cfg.output_dir}: stopped at run.steps={cfg.run.steps} after {result.tokens_seen:.4g} "
                              f"tokens, short of token_budget {cfg.run.token_budget:.4g}; raise run.steps")
        return {"steps": result.step, "tokens": result.tokens_seen, "final": result.final_dir}

    state.run(key, go)


def _evaluate(plan: AblationPlan, state: State, variant: str, seed: int, progress: bool, log) -> EvalCells:
    from protlm.evaluate import ModelSource, load_suite, run_suite, write_report

    r = plan.recipe
    e = r.evaluation
    key = f"evaluate/{variant}/seed{seed}"
    out = run_dir(r, variant, seed, "evaluate")
    cells_path = os.path.join(out, "cells.json")
    stage_hash = _hash({"suite": e.suite, "set": e.set, "data_root": e.data_root, "quick": e.quick,
                        "tasks": plan.tasks, "prefix": e.prefix})
    if state.done(key, stage_hash) and os.path.exists(cells_path):
        return _read_cells(cells_path, variant, seed)
    import torch

    device = e.device if e.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    suite = load_suite(e.suite, e.set, e.data_root)
    final = os.path.join(plan.configs[(variant, seed)].output_dir, "final")
    log(f"[evaluate {variant} seed {seed}] {out}")
    cells = EvalCells(variant, seed)

    def go() -> dict[str, Any]:
        source = ModelSource(final, name=f"{variant} seed {seed}", prefix=e.prefix, device=device,
                             cache_dir=os.path.join(r.output_dir, "embeddings"), threads=r.threads or None)
        run = run_suite(suite, [source], out, quick=e.quick, tasks=plan.tasks, device=device, progress=progress,
                        log=log, write_report=write_report)
        for cell in run.cells:
            task = suite.task(cell.task)
            cells.tasks[cell.task] = {"kind": task.kind, "metrics": list(task.metrics), "values": cell.values,
                                      "per_protein": {t: {str(s): rows for s, rows in by_seed.items()}
                                                      for t, by_seed in cell.per_protein.items()},
                                      "seeds": cell.seeds}
        atomic_write_text(cells_path, json.dumps({"variant": variant, "seed": seed, "tasks": cells.tasks}) + "\n")
        return {"hash": stage_hash}

    state.run(key, go)
    return cells


def _read_cells(path: str, variant: str, seed: int) -> EvalCells:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return EvalCells(variant, seed, data["tasks"])


def _depth(plan: AblationPlan, state: State, variant: str, seed: int, progress: bool, log) -> dict[str, Any]:
    r = plan.recipe
    d = r.depth
    key = f"depth/{variant}/seed{seed}"
    out = run_dir(r, variant, seed, "depth")
    json_path = os.path.join(out, "depth.json")
    stage_hash = _hash({k: v for k, v in r.to_dict()["depth"].items() if k != "seeds"})
    if not (state.done(key, stage_hash) and os.path.exists(json_path)):
        from protlm.ablate.plan import _default_probe_data
        from protlm.analysis import DepthOptions, run_depth_analysis
        from protlm.convert import load

        log(f"[depth {variant} seed {seed}] {out}")

        def go() -> dict[str, Any]:
            pre = load(os.path.join(plan.configs[(variant, seed)].output_dir, "final"))
            options = DepthOptions(analyses=tuple(d.analyses) or None, max_length=d.max_length,
                                   probe_task=d.probe_task, probe_data=d.probe_data or _default_probe_data(r),
                                   probe_train=d.probe_train, probe_test=d.probe_test)
            run_depth_analysis(pre, d.input, out, options, max_proteins=d.max_proteins, progress=progress)
            return {"hash": stage_hash}

        state.run(key, go)
    with open(json_path, encoding="utf-8") as fh:
        return json.load(fh)
