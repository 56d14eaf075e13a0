"""Denoising, Ankh3's ``[NLU]`` task: masked residues become sentinels and the decoder restores them.

Three ways to corrupt a sequence of L residues at rate p (the number of masked residues is p*L rounded up or
down at random, so its mean is exactly p*L; at least 1 and at most L-1 when L >= 2):

- 1-gram (default, Ankh3): residues are masked independently of their neighbours and each one gets its own
  sentinel. ``MKTAYI`` with K and A masked reads ``[NLU] M <0> T <1> Y I </s>`` and the target is
  ``<0> K <1> A </s>`` (sentinel + residue for each masked residue, then ``</s>``);
- ``merge_adjacent``: as 1-gram, but a run of adjacent masked residues shares one sentinel;
- ``mean_span > 1``: T5 span corruption. The masked residues form ``round(n / mean_span)`` spans of random
  length (a uniform random composition of n), separated by at least one unmasked residue, one sentinel each.

Sentinels are used in order ``<extra_id_0>``, ``<extra_id_1>``, ...; needing more than the vocabulary has is an
error, never a wrap-around.
"""

from __future__ import annotations

import math

import numpy as np

from protlm.errors import ConfigError
from protlm.objectives.example import Example, prefix_id
from protlm.tokenizer.vocab import Tokenizer


def n_masked(length: int, rate: float, rng: np.random.Generator) -> int:
    """How many of ``length`` residues to mask: floor(rate*length + u), u ~ U[0, 1), kept in [1, length-1]."""
    if length < 2:
        return 0  # a single residue cannot be both context and target
    n = math.floor(rate * length + rng.random())
    return min(max(n, 1), length - 1)


def max_masked(length: int, rate: float) -> int:
    """The largest value :func:`n_masked` can return for ``length`` residues."""
    if length < 2:
        return 0
    return min(max(math.ceil(rate * length), 1), length - 1)


def n_spans(n_noise: int, length: int, mean_span: float) -> int:
    """Number of spans for T5 span corruption; spans need an unmasked residue between them."""
    if n_noise == 0:
        return 0
    return min(max(1, int(n_noise / mean_span + 0.5)), length - n_noise + 1)


def sentinels_needed(length: int, rate: float, merge_adjacent: bool = False, mean_span: float = 1.0) -> int:
    """Worst-case number of sentinels one sequence of ``length`` residues can need at ``rate``."""
    n = max_masked(length, rate)
    if mean_span > 1:
        return max(n_spans(k, length, mean_span) for k in range(n + 1))
    if merge_adjacent:
        # k masked residues form at most min(k, length - k + 1) runs, largest at k = n or k = (length + 1) // 2
        return min(n, (length + 1) // 2)
    return n


def noise_mask(length: int, rate: float, rng: np.random.Generator, mean_span: float = 1.0) -> np.ndarray:
    """Boolean (length,) mask of the residues to corrupt."""
    n = n_masked(length, rate, rng)
    mask = np.zeros(length, dtype=bool)
    if n == 0:
        return mask
    if mean_span <= 1:
        mask[rng.choice(length, size=n, replace=False, shuffle=False)] = True
        return mask
    k = n_spans(n, length, mean_span)
    span_lengths = _composition(n, k, rng)
    # k + 1 unmasked gaps: the inner ones at least 1 long, the outer ones possibly empty, so a sequence may
    # start or end with a span (T5's original always starts unmasked and ends masked).
    gaps = _composition(length - n + 2, k + 1, rng)
    gaps[0] -= 1
    gaps[-1] -= 1
    runs = np.empty(2 * k + 1, dtype=np.int64)
    runs[0::2] = gaps
    runs[1::2] = span_lengths
    values = np.zeros(2 * k + 1, dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs)


def _composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``parts`` positive integers summing to ``total``, uniformly among all such compositions."""
    if parts == 1:
        return np.array([total], dtype=np.int64)
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [total]))).astype(np.int64)


def denoise(
    residue_ids: np.ndarray,
    rng: np.random.Generator,
    rate: float,
    tok: Tokenizer,
    merge_adjacent: bool = False,
    mean_span: float = 1.0,
) -> Example:
    """Denoising example from residue ids (no specials); pure given ``rng``."""
    residues = np.asarray(residue_ids, dtype=np.int64)
    mask = noise_mask(len(residues), rate, rng, mean_span)
    return denoise_with_mask(residues, mask, tok, one_per_run=merge_adjacent or mean_span > 1)


def denoise_with_mask(residues: np.ndarray, mask: np.ndarray, tok: Tokenizer, one_per_run: bool = False) -> Example:
    """The example for a given corruption mask (split out so hand-made masks can be tested exactly)."""
    prefix, eos = prefix_id(tok, "nlu"), tok.eos_id
    positions = np.flatnonzero(mask)
    n = len(positions)
    if not one_per_run:
        sentinels = _sentinels(tok, n)
        encoder = residues.copy()
        encoder[positions] = sentinels
        labels = np.empty(2 * n + 1, dtype=np.int64)
        labels[0 : 2 * n : 2] = sentinels
        labels[1 : 2 * n : 2] = residues[positions]
    else:
        starts = mask.copy()
        starts[1:] &= ~mask[:-1]  # first residue of each masked run
        n_runs = int(starts.sum())
        sentinels = _sentinels(tok, n_runs)
        encoder = residues.copy()
        encoder[starts] = sentinels
        encoder = encoder[~mask | starts]
        # Target: each run's sentinel, then its residues. Residue j of the masked list lands after the
        # sentinels of all runs that start at or before it.
        is_start = starts[positions]
        slot = np.arange(n) + np.cumsum(is_start)
        labels = np.empty(n + n_runs + 1, dtype=np.int64)
        labels[slot] = residues[positions]
        labels[slot[is_start] - 1] = sentinels
    labels[-1] = eos
    input_ids = np.empty(len(encoder) + 2, dtype=np.int64)
    input_ids[0] = prefix
    input_ids[1:-1] = encoder
    input_ids[-1] = eos
    return Example(input_ids, labels, "denoise")


def _sentinels(tok: Tokenizer, count: int) -> np.ndarray:
    if count > len(tok.sentinel_ids):
        raise ConfigError(f"denoising needs {count} sentinels for one sequence but the vocabulary has "
                          f"{len(tok.sentinel_ids)}; lower max_length or the mask rates, or merge adjacent masks")
    return np.asarray(tok.sentinel_ids[:count], dtype=np.int64)
