"""Sequence completion, Ankh3's ``[S2S]`` task: the encoder reads the start of a sequence, the decoder writes the rest.

``MKTAYIAK`` at ratio 0.5 gives encoder ``[S2S] M K T A </s>`` and target ``Y I A K </s>``. The encoder gets
floor(ratio * L) residues, kept in [1, L-1] so both sides are non-empty (a 1-residue sequence goes wholly to
the decoder). A (lo, hi) ratio is drawn uniformly per call.
"""

from __future__ import annotations

import math

import numpy as np

from protlm.objectives.example import Example, prefix_id
from protlm.tokenizer.vocab import Tokenizer


def split_point(length: int, ratio: float) -> int:
    if length < 2:
        return 0
    return min(max(math.floor(ratio * length), 1), length - 1)


def complete(
    residue_ids: np.ndarray,
    rng: np.random.Generator,
    ratio: float | tuple[float, float],
    tok: Tokenizer,
) -> Example:
    """Completion example from residue ids (no specials); ``rng`` is used only when ``ratio`` is a range."""
    residues = np.asarray(residue_ids, dtype=np.int64)
    if isinstance(ratio, (tuple, list)):
        lo, hi = ratio
        ratio = lo if lo == hi else float(rng.uniform(lo, hi))
    k = split_point(len(residues), ratio)
    input_ids = np.empty(k + 2, dtype=np.int64)
    input_ids[0] = prefix_id(tok, "s2s")
    input_ids[1:-1] = residues[:k]
    input_ids[-1] = tok.eos_id
    labels = np.empty(len(residues) - k + 1, dtype=np.int64)
    labels[:-1] = residues[k:]
    labels[-1] = tok.eos_id
    return Example(input_ids, labels, "complete")
