"""Everything an ablation checks before it spends any compute, and the plan it then follows.

1. Matched variants: the resolved pretraining configs may differ only in ``objective.*`` (plus the keys the
   ablation sets itself and the recipe's ``allow_differences``).
2. A reachable budget: for each variant, the tokens one pass over its training data yields with *its own*
   objective are counted (every filtered, cropped training sequence is turned into an example by the variant's
   task mixer; the per-step masking rate is drawn per sequence here, which has the same expectation). The
   budget may not need more than ``max_epochs`` passes, and ``run.steps`` must leave room for it.
3. Evaluation data: every selected task's files exist and every split resolves to usable records (the suite's
   own loaders run, so a split missing from a file is caught here, not after pretraining).
4. Depth analysis: the input file exists, and the probe data loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from protlm.ablate.recipe import AblationRecipe, allowed_difference, flatten, variant_config
from protlm.errors import ConfigError, ProtlmError
from protlm.train.config import TrainConfig


@dataclass
class BudgetEstimate:
    """One variant's token arithmetic, from one pass over its training data."""

    sequences: int  # training sequences after filtering and exclusion
    tokens_per_pass: float  # encoder + decoder tokens (no padding) of one pass with this objective
    tokens_per_sequence: float
    passes_needed: float  # token_budget / tokens_per_pass
    steps_needed: float  # token_budget / (batch_size * tokens_per_sequence)


@dataclass
class AblationPlan:
    recipe: AblationRecipe
    configs: dict[tuple[str, int], TrainConfig]  # (variant, seed) -> resolved pretraining config
    budget: dict[str, BudgetEstimate]  # variant -> estimate
    tasks: list[str]  # evaluation tasks that will run
    skipped_tasks: dict[str, str] = field(default_factory=dict)  # task -> why (data marked unavailable)
    eval_seeds: list[int] = field(default_factory=list)
    depth_seeds: list[int] = field(default_factory=list)

    def describe(self) -> str:
        r = self.recipe
        lines = [f"ablation {r.name}: {len(r.variants)} variants x {len(r.pretrain_seeds)} pretraining seeds, "
                 f"token budget {r.token_budget:.4g} (encoder + decoder tokens, no padding) per run"]
        for name, b in self.budget.items():
            lines.append(f"  {name}: {b.sequences} training sequences, {b.tokens_per_sequence:.1f} tokens each with "
                         f"this objective -> {b.passes_needed:.2f} passes, ~{b.steps_needed:.0f} steps")
        lines.append(f"  evaluation: {', '.join(self.tasks)} (head seeds {self.eval_seeds})"
                     + (f"; skipped (data unavailable): {', '.join(self.skipped_tasks)}" if self.skipped_tasks else ""))
        return "\n".join(lines)


def check_plan(recipe: AblationRecipe, log=print) -> AblationPlan:
    configs = {(v, s): variant_config(recipe, v, s) for v in recipe.variants for s in recipe.pretrain_seeds}
    check_matched(recipe, configs)
    budget = estimate_budget(recipe, configs, log)
    tasks, skipped, eval_seeds = check_evaluation(recipe)
    depth_seeds = check_depth(recipe)
    return AblationPlan(recipe, configs, budget, tasks, skipped, eval_seeds, depth_seeds)


# --- 1. matched variants -------------------------------------------------------------------------------------
def check_matched(recipe: AblationRecipe, configs: dict[tuple[str, int], TrainConfig]) -> None:
    names = list(recipe.variants)
    seed = recipe.pretrain_seeds[0]
    ref = flatten(configs[(names[0], seed)].to_dict())
    for name in names[1:]:
        now = flatten(configs[(name, seed)].to_dict())
        for key in sorted(set(ref) | set(now)):
            if ref.get(key) != now.get(key) and not allowed_difference(key, recipe.allow_differences):
                raise ConfigError(
                    f"{recipe.source}: variant {name} differs from {names[0]} in {key} ({now.get(key)!r} vs "
                    f"{ref.get(key)!r}); variants may differ only in objective.* unless allow_differences lists {key}")


# --- 2. the token budget -------------------------------------------------------------------------------------
def estimate_budget(recipe: AblationRecipe, configs: dict[tuple[str, int], TrainConfig], log=print
                    ) -> dict[str, BudgetEstimate]:
    from protlm.data.exclude import Exclusion
    from protlm.data.stream import SequenceStream
    from protlm.objectives import StepParams, TaskMixer, example_generator
    from protlm.tokenizer.vocab import protlm_tokenizer

    tok = protlm_tokenizer()
    seed = recipe.pretrain_seeds[0]
    corpora: dict[str, list[np.ndarray]] = {}  # data settings -> cropped residue arrays of one pass
    out = {}
    for name in recipe.variants:
        cfg = configs[(name, seed)]
        if cfg.model.init_from:
            raise ConfigError(f"{recipe.source}: variant {name}: model.init_from is not supported in an ablation "
                              "(every variant starts from its own seeded random init)")
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in corpora:
            d = cfg.data
            files = list(d.exclude_sequences) + ([p for p in d.validation if p not in d.exclude_sequences]
                                                 if d.exclude_validation else [])
            try:
                exclusion = (Exclusion.from_files(d.exclude_ids, files, d.near_copies())
                             if files or d.exclude_ids else None)
                stream = SequenceStream(d.train, tok, max_length=d.max_length, min_length=d.min_length, seed=seed,
                                        epochs=1, shuffle=False, exclude=exclusion, policy=d.policy)
                log(f"counting the training data of variant {name} ({', '.join(d.train)})")
                corpora[key] = list(stream)
            except ProtlmError as err:
                raise ConfigError(f"{recipe.source}: variant {name}: training data: {err}") from None
        seqs = corpora[key]
        if not seqs:
            raise ConfigError(f"{recipe.source}: variant {name}: no training sequences left after filtering")
        mixer = TaskMixer(cfg.objective, tok, max_length=cfg.data.max_length)
        rates = cfg.objective.mask_rates
        total = 0
        for i, residues in enumerate(seqs):
            rng = example_generator(seed, i)
            ex = mixer(residues, rng, StepParams(mask_rate=rates[int(rng.integers(len(rates)))]))
            total += len(ex.input_ids) + len(ex.labels)
        per_seq = total / len(seqs)
        est = BudgetEstimate(len(seqs), float(total), per_seq, recipe.token_budget / total,
                             recipe.token_budget / (cfg.run.batch_size * per_seq))
        if est.passes_needed > recipe.max_epochs:
            raise ConfigError(
                f"{recipe.source}: token_budget {recipe.token_budget:.4g} is out of reach for variant {name}: it needs "
                f"{est.passes_needed:.2f} passes over its training data ({total:.4g} tokens per pass with its "
                f"objective), more than max_epochs {recipe.max_epochs:g}")
        if est.steps_needed * 1.05 > cfg.run.steps:
            raise ConfigError(
                f"{recipe.source}: variant {name} needs about {est.steps_needed:.0f} steps to reach token_budget "
                f"{recipe.token_budget:.4g}, but run.steps is {cfg.run.steps}; raise run.steps in base_set")
        out[name] = est
    return out


# --- 3. evaluation data --------------------------------------------------------------------------------------
def check_evaluation(recipe: AblationRecipe) -> tuple[list[str], dict[str, str], list[int]]:
    from protlm.evaluate.datasets import load_dataset
    from protlm.evaluate.runner import build_task_data
    from protlm.evaluate.suite import load_suite

    e = recipe.evaluation
    where = f"{recipe.source}: evaluation"
    if not os.path.exists(e.suite):
        raise ConfigError(f"{where}: suite {e.suite}: no such file")
    try:
        suite = load_suite(e.suite, e.set, e.data_root)
    except ProtlmError as err:
        raise ConfigError(f"{where}: {err}") from None
    skipped: dict[str, str] = {}
    if e.tasks:
        selected = []
        for name in e.tasks:
            try:
                selected.append(suite.task(name))
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
    else:
        selected = []
        for task in suite.tasks:
            gone = [ds for ds in task.datasets() if suite.datasets[ds].missing_files() and suite.datasets[ds].unavailable]
            if gone:
                skipped[task.name] = "; ".join(f"{ds}: {suite.datasets[ds].unavailable}" for ds in gone)
            else:
                selected.append(task)
    if not selected:
        raise ConfigError(f"{where}: no evaluation task has its data")
    loaded: dict = {}
    for task in selected:
        for ds in task.datasets():
            spec = suite.datasets[ds]
            missing = spec.missing_files()
            if missing:
                raise ConfigError(f"{where}: task {task.name} needs {missing[0]} (dataset {ds}), which does not exist")
        try:
            for ds in task.datasets():
                if ds not in loaded:
                    spec = suite.datasets[ds]
                    loaded[ds] = load_dataset(ds, spec.format, spec.files)
            build_task_data(suite, task, loaded, e.quick)
        except ProtlmError as err:
            raise ConfigError(f"{where}: task {task.name}: {err}") from None
    seeds = (suite.quick.seeds if e.quick and suite.quick.seeds else None) or suite.seeds
    return [t.name for t in selected], skipped, list(seeds)


# --- 4. depth analysis ---------------------------------------------------------------------------------------
def check_depth(recipe: AblationRecipe) -> list[int]:
    d = recipe.depth
    if not d.enabled:
        return []
    where = f"{recipe.source}: depth"
    if not os.path.exists(d.input):
        raise ConfigError(f"{where}.input {d.input}: no such file")
    if d.probe_task and (not d.analyses or "probe" in d.analyses):
        from protlm.analysis.probe import load_probe_task

        try:
            load_probe_task(d.probe_task, d.probe_data or _default_probe_data(recipe), d.probe_train,
                            d.probe_test)
        except ProtlmError as err:
            raise ConfigError(f"{where}: {err}") from None
    return list(d.seeds) or [recipe.pretrain_seeds[0]]


def _default_probe_data(recipe: AblationRecipe) -> str | None:
    """The suite's data root holds ssp_netsurfp/ (as ../shared/data does), so probes need no extra setting."""
    root = recipe.evaluation.data_root or os.environ.get("PROTLM_DATA")
    if root:
        return root
    try:
        import yaml

        with open(recipe.evaluation.suite, encoding="utf-8") as fh:
            return (yaml.safe_load(fh) or {}).get("data_root")
    except OSError:
        return None
