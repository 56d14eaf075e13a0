"""Configuration of the Ankh3 pretraining objectives (paper sections 2.1 and 2.5; seeds/000)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from protlm.errors import ConfigError
from protlm.settings import plain

TASKS = ("denoise", "complete")  # task id = index: 0 denoise ([NLU]), 1 complete ([S2S])
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
TASK_PREFIX = {"denoise": "nlu", "complete": "s2s"}  # key into Tokenizer.prefix_ids


@dataclass
class ObjectiveConfig:
    """What the pretraining examples look like. Every field can be set from YAML (``objective:`` section, read
    by :func:`protlm.settings.build`, which checks the keys and types; the checks here are about the values).

    The defaults are Ankh3's recipe: 50/50 denoising and completion, a masking rate drawn per step from
    {0.15, 0.20, 0.30}, one sentinel per masked residue, and a 50% completion split.
    """

    # Task weights; normalised to probabilities. A weight of 0 switches a task off.
    task_probs: dict[str, float] = field(default_factory=lambda: {"denoise": 0.5, "complete": 0.5})
    # Denoising masking rates; one is drawn uniformly per training step (paper 2.5).
    mask_rates: tuple[float, ...] = (0.15, 0.20, 0.30)
    # True: a run of adjacent masked residues shares one sentinel (fewer sentinels, longer spans to fill).
    merge_adjacent: bool = False
    # > 1 switches 1-gram masking to T5 span corruption with spans of this mean length (one sentinel each).
    mean_span: float = 1.0
    # Share of the cropped sequence the encoder sees in completion; a (lo, hi) pair draws it uniformly per
    # sequence (the paper's "variable completion percentages", which it leaves to future work).
    completion_ratio: float | tuple[float, float] = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks of the values; keys and types are checked where the config is read (protlm.settings)."""
        for name, weight in self.task_probs.items():
            if name not in TASKS:
                raise ConfigError(f"objective.task_probs: unknown task {name!r}; tasks are {', '.join(TASKS)}")
            if weight < 0 or not math.isfinite(weight):
                raise ConfigError(f"objective.task_probs.{name} must be a non-negative number, got {weight!r}")
        if sum(self.task_probs.values()) <= 0:
            raise ConfigError("objective.task_probs: at least one task needs a positive weight")
        if not self.mask_rates:
            raise ConfigError("objective.mask_rates must be a non-empty list of rates")
        for rate in self.mask_rates:
            if not 0 < rate < 1:
                raise ConfigError(f"objective.mask_rates: each rate must be in (0, 1), got {rate!r}")
        self.mask_rates = tuple(float(r) for r in self.mask_rates)
        if not self.mean_span >= 1 or not math.isfinite(self.mean_span):
            raise ConfigError(f"objective.mean_span must be a number >= 1, got {self.mean_span!r}")
        self.mean_span = float(self.mean_span)
        ratio = self.completion_ratio
        if isinstance(ratio, (list, tuple)):
            if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1] < 1:
                raise ConfigError(f"objective.completion_ratio range must be [lo, hi] with 0 < lo <= hi < 1, got {ratio!r}")
            self.completion_ratio = (float(ratio[0]), float(ratio[1]))
        elif not 0 < ratio < 1:
            raise ConfigError(f"objective.completion_ratio must be in (0, 1) or a [lo, hi] range, got {ratio!r}")
        else:
            self.completion_ratio = float(ratio)

    @property
    def probabilities(self) -> dict[str, float]:
        """Task probabilities in TASKS order (normalised weights, absent tasks 0)."""
        total = float(sum(self.task_probs.values()))
        return {name: float(self.task_probs.get(name, 0.0)) / total for name in TASKS}

    def to_dict(self) -> dict[str, Any]:
        return plain(self)
