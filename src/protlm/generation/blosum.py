"""BLOSUM62, the substitution-matrix baseline for zero-shot variant scoring.

The matrix is the published BLOSUM62 (Henikoff & Henikoff, "Amino acid substitution matrices from protein
blocks", PNAS 89:10915-10919, 1992), in half-bit units, restricted to the 20 standard residues. A variant's
baseline score is the sum of B62[wt][mut] over its substitutions: a model-free reference that any protein
language model should beat on fitness ranking.
"""

from __future__ import annotations

import numpy as np

from protlm.generation.mutations import Variant

BLOSUM62_ORDER = "ARNDCQEGHILKMFPSTWYV"

# One row per residue in BLOSUM62_ORDER; the matrix is symmetric (checked in tests).
_ROWS = """
 4 -1 -2 -2  0 -1 -1  0 -2 -1 -1 -1 -1 -2 -1  1  0 -3 -2  0
-1  5  0 -2 -3  1  0 -2  0 -3 -2  2 -1 -3 -2 -1 -1 -3 -2 -3
-2  0  6  1 -3  0  0  0  1 -3 -3  0 -2 -3 -2  1  0 -4 -2 -3
-2 -2  1  6 -3  0  2 -1 -1 -3 -4 -1 -3 -3 -1  0 -1 -4 -3 -3
 0 -3 -3 -3  9 -3 -4 -3 -3 -1 -1 -3 -1 -2 -3 -1 -1 -2 -2 -1
-1  1  0  0 -3  5  2 -2  0 -3 -2  1  0 -3 -1  0 -1 -2 -1 -2
-1  0  0  2 -4  2  5 -2  0 -3 -3  1 -2 -3 -1  0 -1 -3 -2 -2
 0 -2  0 -1 -3 -2 -2  6 -2 -4 -4 -2 -3 -3 -2  0 -2 -2 -3 -3
-2  0  1 -1 -3  0  0 -2  8 -3 -3 -1 -2 -1 -2 -1 -2 -2  2 -3
-1 -3 -3 -3 -1 -3 -3 -4 -3  4  2 -3  1  0 -3 -2 -1 -3 -1  3
-1 -2 -3 -4 -1 -2 -3 -4 -3  2  4 -2  2  0 -3 -2 -1 -2 -1  1
-1  2  0 -1 -3  1  1 -2 -1 -3 -2  5 -1 -3 -1  0 -1 -3 -2 -2
-1 -1 -2 -3 -1  0 -2 -3 -2  1  2 -1  5  0 -2 -1 -1 -1 -1  1
-2 -3 -3 -3 -2 -3 -3 -3 -1  0  0 -3  0  6 -4 -2 -2  1  3 -1
-1 -2 -2 -1 -3 -1 -1 -2 -2 -3 -3 -1 -2 -4  7 -1 -1 -4 -3 -2
 1 -1  1  0 -1  0  0  0 -1 -2 -2  0 -1 -2 -1  4  1 -3 -2 -2
 0 -1  0 -1 -1 -1 -1 -2 -2 -1 -1 -1 -1 -2 -1  1  5 -2 -2  0
-3 -3 -4 -4 -2 -2 -3 -2 -2 -3 -2 -3 -1  1 -4 -3 -2 11  2 -3
-2 -2 -2 -3 -2 -1 -2 -3  2 -1 -1 -2 -1  3 -3 -2 -2  2  7 -1
 0 -3 -3 -3 -1 -2 -2 -3 -3  3  1 -2  1 -1 -2 -2  0 -3 -1  4
"""

BLOSUM62 = np.array([[int(v) for v in line.split()] for line in _ROWS.strip().splitlines()], dtype=np.int64)
_INDEX = {aa: i for i, aa in enumerate(BLOSUM62_ORDER)}


def blosum62(a: str, b: str) -> int:
    return int(BLOSUM62[_INDEX[a], _INDEX[b]])


def blosum62_scores(variants: list[Variant]) -> np.ndarray:
    """Sum of B62[wt][mut] over each variant's substitutions; the wild type and synonymous changes give 0."""
    return np.array([sum(blosum62(m.wt, m.mut) for m in v.mutations if m.wt != m.mut) for v in variants],
                    dtype=np.float64)
