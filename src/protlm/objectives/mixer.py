"""The task mixer: every time a sequence is drawn it becomes a denoising or a completion example.

Randomness comes in two grains, as in the Ankh3 paper (section 2.5):
- per training step, :meth:`TaskMixer.step_params` draws the masking rate uniformly from ``mask_rates``; every
  rank and every micro-batch of one step must use the same draw, so pass a generator that depends only on
  (seed, step), e.g. :func:`step_generator`;
- per sequence, :meth:`TaskMixer.__call__` draws the task, the masked positions and (optionally) the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protlm.errors import ConfigError
from protlm.objectives.complete import complete
from protlm.objectives.config import TASK_PREFIX, TASKS, ObjectiveConfig
from protlm.objectives.denoise import denoise, sentinels_needed
from protlm.objectives.example import Example
from protlm.tokenizer.vocab import Tokenizer

N_SPECIALS = 2  # the task prefix and </s> share max_length with the residues


@dataclass(frozen=True)
class StepParams:
    """What is shared by all sequences of one training step."""

    mask_rate: float


def step_generator(seed: int, step: int) -> np.random.Generator:
    """A generator that depends only on (seed, step): the same on every rank, worker and micro-batch."""
    return np.random.default_rng([int(seed), int(step), 0x57E9])


class TaskMixer:
    """Turns residue ids into examples per :class:`ObjectiveConfig`.

    ``max_length`` is the longest encoder input the data will produce (prefix and ``</s>`` included); the
    constructor checks that denoising at the highest rate never needs more sentinels than ``tok`` has.
    """

    def __init__(self, config: ObjectiveConfig, tok: Tokenizer, max_length: int = 512):
        config.validate()
        self.config = config
        self.tok = tok
        self.max_length = int(max_length)
        if self.max_length <= N_SPECIALS:
            raise ConfigError(f"max_length={max_length} leaves no room for residues besides the prefix and </s>")
        probs = config.probabilities
        self.tasks = [t for t in TASKS if probs[t] > 0]
        self._cumulative = np.cumsum([probs[t] for t in self.tasks])
        for task in self.tasks:
            if TASK_PREFIX[task] not in tok.prefix_ids:
                raise ConfigError(f"objective task {task!r} needs the [{TASK_PREFIX[task].upper()}] token, which "
                                  f"the tokenizer ({tok.source}) lacks")
        if "denoise" in self.tasks:
            self._check_sentinel_budget()

    @property
    def max_residues(self) -> int:
        return self.max_length - N_SPECIALS

    def _check_sentinel_budget(self) -> None:
        cfg = self.config
        budget = len(self.tok.sentinel_ids)
        for rate in cfg.mask_rates:
            # The need never falls as sequences get longer (more masked residues, and more room between
            # runs and spans), so the longest sequence is the worst case.
            need = sentinels_needed(self.max_residues, rate, cfg.merge_adjacent, cfg.mean_span)
            if need > budget:
                raise ConfigError(
                    f"objective.mask_rates: rate {rate} on sequences of up to {self.max_residues} residues "
                    f"(max_length {self.max_length} minus prefix and </s>) needs up to {need} sentinels, but the "
                    f"tokenizer has {budget}; lower max_length or the rate, or set merge_adjacent / mean_span > 1")

    def step_params(self, rng: np.random.Generator) -> StepParams:
        rates = self.config.mask_rates
        return StepParams(mask_rate=rates[int(rng.integers(len(rates)))])

    def choose_task(self, rng: np.random.Generator) -> str:
        return self.tasks[int(np.searchsorted(self._cumulative, rng.random() * self._cumulative[-1], side="right"))]

    def __call__(self, residue_ids: np.ndarray, rng: np.random.Generator, step: StepParams) -> Example:
        return self.make(residue_ids, rng, step, self.choose_task(rng))

    def make(self, residue_ids: np.ndarray, rng: np.random.Generator, step: StepParams, task: str) -> Example:
        """An example of a given task (validation scores each task on the same sequences)."""
        cfg = self.config
        if task == "denoise":
            return denoise(residue_ids, rng, step.mask_rate, self.tok, cfg.merge_adjacent, cfg.mean_span)
        if task == "complete":
            return complete(residue_ids, rng, cfg.completion_ratio, self.tok)
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
