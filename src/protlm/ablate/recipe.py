"""The ablation recipe: one base pretraining config, per-variant objective overrides, seeds, a token budget and
an evaluation profile, read from YAML (``configs/ablation/*.yaml``) with every key checked.

Each variant's pretraining config is the base config (``base_config`` plus ``base_set``), then the variant's
``set`` overrides, then what the ablation itself decides: ``output_dir`` (``DIR/pretrain/<variant>-seed<S>``),
``run.seed`` (each pretraining seed), ``run.token_budget`` and ``run.time_limit_minutes = 0`` (a run cut by the
clock would not be matched; the token budget ends every run). Relative paths are taken from the current
directory, as in ``configs/tiny-cpu.yaml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from protlm.errors import ConfigError
from protlm.settings import build, override, parse_sets, plain
from protlm.train.config import TrainConfig, load_config
from protlm.utils import read_yaml_mapping

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Keys the ablation sets itself; a variant or the base may not fix them differently per variant.
CONTROLLED = ("output_dir", "run.seed", "run.token_budget", "run.time_limit_minutes")


@dataclass
class VariantSpec:
    """One arm of the ablation."""

    description: str = ""  # one line for the report ("denoising only, 15% [NLU]")
    # dotted pretraining-config key -> value, applied on top of the base config (e.g. objective.mask_rates)
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationSpec:
    """How every pretrained model is benchmarked (``protlm evaluate`` with these settings)."""

    suite: str = os.path.join("configs", "eval", "ankh3.yaml")  # suite YAML
    quick: bool = True  # the suite's quick profile (subsets, fewer head epochs)
    tasks: list[str] = field(default_factory=list)  # task names; empty = every task whose data is present
    set: list[str] = field(default_factory=list)  # suite overrides, as ``protlm evaluate --set``
    data_root: str | None = None  # the suite's data_root override (default: the suite's own / $PROTLM_DATA)
    prefix: Literal["auto", "nlu", "s2s", "none"] = "auto"  # task token before each sequence when embedding (auto = [NLU] for Ankh3 models)
    device: str = "auto"  # "auto" (cuda when available) or a torch device


@dataclass
class DepthSpec:
    """The depth analysis (``protlm analyze depth``) of the compared variants."""

    enabled: bool = True
    input: str = ""  # FASTA/CSV of proteins to analyse (required when enabled)
    seeds: list[int] = field(default_factory=list)  # pretraining seeds to analyse; empty = the first one
    max_proteins: int = 64
    max_length: int = 256
    analyses: list[str] = field(default_factory=list)  # subset of contribution skip early-exit cka probe; empty = all
    probe_task: str | None = "ssp3"  # None = no probes
    probe_data: str | None = None  # folder with the probe files (default $PROTLM_DATA/ssp_netsurfp)
    probe_train: int = 200
    probe_test: int = 100


@dataclass
class StatsSpec:
    """The paired comparison."""

    compare: list[str] = field(default_factory=lambda: ["C", "A"])  # [treatment, reference]: treatment - reference
    bootstrap: int = 2000  # resamples of the test proteins
    confidence: float = 0.95  # two-sided percentile interval
    seed: int = 0  # bootstrap resampling seed


@dataclass
class AblationRecipe:
    name: str = "ablation"
    output_dir: str = os.path.join("runs", "ablation")
    base_config: str = ""  # a pretraining recipe (configs/*.yaml)
    base_set: list[str] = field(default_factory=list)  # --set overrides for every variant
    pretrain_seeds: list[int] = field(default_factory=lambda: [0, 1])  # >= 2; run.seed of each pretraining run
    # Tokens through the model per pretraining run: encoder input + decoder input positions, padding excluded,
    # summed over processes (run.token_budget).
    token_budget: float = 0.0
    # The budget may not need more than this many passes over a variant's (filtered, cropped) training data,
    # estimated with that variant's own objective; beyond it the comparison would mix objective and repetition.
    max_epochs: float = 1.0
    # Keys (dotted, or a prefix like model.overrides) in which variants may differ besides objective.*
    allow_differences: list[str] = field(default_factory=list)
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    depth: DepthSpec = field(default_factory=DepthSpec)
    stats: StatsSpec = field(default_factory=StatsSpec)
    threads: int = 1  # torch CPU threads for every stage (0 = torch's default)
    source: str = field(default="recipe", init=False)  # the file it came from (not a YAML key)

    @property
    def treatment(self) -> str:
        return self.stats.compare[0]

    @property
    def reference(self) -> str:
        return self.stats.compare[1]

    def to_dict(self) -> dict[str, Any]:
        return plain(self)


def load_recipe(path: str, output_dir: str | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> AblationRecipe:
    """Read and check an ablation recipe (structure only; :func:`protlm.ablate.plan.check_plan` does the rest).

    ``overrides`` are ``--set key=value`` edits (``token_budget=2e5``, ``evaluation.tasks=[GB1]``,
    ``variants.A.set.objective.mask_rates=[0.2]``), read by :func:`protlm.settings.parse_sets`."""
    recipe = build(AblationRecipe, read_yaml_mapping(path, "ablation recipe"), path)
    changes = parse_sets(overrides)
    if changes:
        recipe = override(recipe, changes, "--set")
    recipe.source = path
    if output_dir:
        recipe.output_dir = output_dir
    check_recipe(recipe)
    return recipe


def check_recipe(r: AblationRecipe) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{r.source}: {msg}")

    if not r.base_config:
        raise bad("base_config is required (a pretraining recipe such as configs/tiny-cpu.yaml)")
    if len(r.variants) < 2:
        raise bad(f"an ablation needs at least 2 variants, got {len(r.variants)}")
    for name, v in r.variants.items():
        if not _NAME.match(name):
            raise bad(f"variant name {name!r} may hold only letters, digits, '_', '-' and '.'")
        for key in v.set:
            if key in CONTROLLED:
                raise bad(f"variants.{name}.set.{key} is set by the ablation itself; remove it")
    if len(r.pretrain_seeds) < 2 or len(set(r.pretrain_seeds)) != len(r.pretrain_seeds):
        raise bad(f"pretrain_seeds needs at least 2 distinct seeds, got {r.pretrain_seeds}")
    if not r.token_budget > 0:
        raise bad(f"token_budget must be a positive number of tokens, got {r.token_budget}")
    if not r.max_epochs > 0:
        raise bad(f"max_epochs must be positive, got {r.max_epochs}")
    s = r.stats
    if len(s.compare) != 2 or s.compare[0] == s.compare[1]:
        raise bad(f"stats.compare must name two different variants [treatment, reference], got {s.compare}")
    for name in s.compare:
        if name not in r.variants:
            raise bad(f"stats.compare names {name!r}, which is not a variant ({', '.join(r.variants)})")
    if s.bootstrap < 100:
        raise bad(f"stats.bootstrap must be at least 100 resamples, got {s.bootstrap}")
    if not 0.5 < s.confidence < 1:
        raise bad(f"stats.confidence must be in (0.5, 1), got {s.confidence}")
    d = r.depth
    if d.enabled:
        if not d.input:
            raise bad("depth.input is required when depth.enabled (a FASTA of proteins to analyse)")
        for seed in d.seeds:
            if seed not in r.pretrain_seeds:
                raise bad(f"depth.seeds: {seed} is not one of pretrain_seeds {r.pretrain_seeds}")
    if r.threads < 0:
        raise bad(f"threads must be >= 0, got {r.threads}")


def run_dir(recipe: AblationRecipe, variant: str, seed: int, stage: str) -> str:
    """``DIR/<stage>/<variant>-seed<S>``: where one pretraining run / evaluation / depth analysis lives."""
    return os.path.join(recipe.output_dir, stage, f"{variant}-seed{seed}")


def variant_config(recipe: AblationRecipe, variant: str, seed: int) -> TrainConfig:
    """The resolved pretraining config of one (variant, seed)."""
    where = f"{recipe.source}: variant {variant}"
    cfg = override(load_config(recipe.base_config, recipe.base_set), recipe.variants[variant].set, where)
    cfg = override(cfg, {"output_dir": run_dir(recipe, variant, seed, "pretrain"), "run.seed": seed,
                         "run.token_budget": float(recipe.token_budget), "run.time_limit_minutes": 0.0}, where)
    cfg.validate(where)
    return cfg


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys (lists stay values)."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def allowed_difference(key: str, allowed: list[str]) -> bool:
    if key.startswith("objective.") or key in CONTROLLED:
        return True
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allowed)
