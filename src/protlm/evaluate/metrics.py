"""Benchmark metrics, as plain numpy functions of predictions and labels.

Conventions (the ones ProtTrans, Ankh and TAPE report, made explicit):
- Secondary structure accuracy (Q3/Q8) is pooled over residues: correct scored residues / scored residues, where
  residues outside the mask (unresolved, "disorder" 0) are not scored at all.
- Per-protein classification accuracy (Q10, Q2) is the fraction of proteins predicted right.
- Multi-label classification is scored by micro-averaged F1 (counts pooled over proteins and classes).
- Spearman's rho ranks tied values by their average rank (scipy's default), so ties neither help nor hurt.
- Contact precision at k is computed per protein, then averaged over proteins. Candidates are residue pairs i < j
  with a sequence separation in the chosen range and a known label. When scores tie at the cut-off, the tied
  group counts with its mean label (the expected precision under a random order of the ties), so the result does
  not depend on how a sort breaks ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Sequence-separation ranges for contacts (|i - j| in residues, both ends inclusive; None = unbounded). "all"
# is the Ankh3 definition (|i - j| >= 6); short/medium/long are the usual CASP bands.
CONTACT_RANGES: dict[str, tuple[int, int | None]] = {
    "all": (6, None),
    "short": (6, 11),
    "medium": (12, 23),
    "long": (24, None),
}


def residue_accuracy(pred: list[np.ndarray], target: list[np.ndarray], mask: list[np.ndarray] | None = None) -> float:
    """Pooled per-residue accuracy over all proteins; ``mask`` (bool, per residue) selects scored residues."""
    correct = 0
    total = 0
    for i, (p, t) in enumerate(zip(pred, target)):
        p = np.asarray(p)
        t = np.asarray(t)
        if p.shape != t.shape:
            raise ValueError(f"protein {i}: prediction shape {p.shape} != label shape {t.shape}")
        keep = np.ones(t.shape, bool) if mask is None else np.asarray(mask[i], bool)
        correct += int((p[keep] == t[keep]).sum())
        total += int(keep.sum())
    return correct / total if total else math.nan


def accuracy(pred, target) -> float:
    pred = np.asarray(pred)
    target = np.asarray(target)
    return float((pred == target).mean()) if target.size else math.nan


def multilabel_f1(pred: list[np.ndarray], target: list[np.ndarray]) -> float:
    """Micro-averaged F1 of multi-label predictions: true/false positives and false negatives pooled over all
    proteins and classes (each protein a (C,) bool vector), so frequent classes weigh more, as pooled residue
    accuracy does; NaN when there is nothing to score."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan


def spearman(pred, target) -> float:
    """Spearman's rank correlation with average ranks for ties (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.size < 2 or np.all(pred == pred[0]) or np.all(target == target[0]):
        return math.nan
    return float(spearmanr(pred, target).statistic)


@dataclass
class ContactPrecision:
    """Precision of one protein's top-k contacts, or None when the protein has no candidate pair."""

    precision: float | None
    k: int
    candidates: int


def contact_precision(
    scores: np.ndarray,  # (L, L) predicted contact scores (higher = more likely)
    contacts: np.ndarray,  # (L, L) labels: 1 contact, 0 none, negative = unknown (not scored)
    k: int,
    min_sep: int = 6,
    max_sep: int | None = None,
    positions: np.ndarray | None = None,  # (L,) residue numbers for the separation; default 0..L-1
) -> ContactPrecision:
    """Precision among the ``k`` highest-scoring candidate pairs of one protein.

    When fewer than ``k`` candidates exist (a short protein, or a narrow range), all of them are taken and the
    precision is over that smaller number.
    """
    n = scores.shape[0]
    pos = np.arange(n) if positions is None else np.asarray(positions)
    i, j = np.triu_indices(n, k=1)
    sep = np.abs(pos[j] - pos[i])
    label = contacts[i, j]
    keep = (sep >= min_sep) & (label >= 0)
    if max_sep is not None:
        keep &= sep <= max_sep
    s = scores[i, j][keep].astype(np.float64)
    y = label[keep].astype(np.float64)
    if s.size == 0 or k <= 0:
        return ContactPrecision(None, 0, int(s.size))
    k = min(k, s.size)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    cut = s_sorted[k - 1]
    above = s_sorted > cut
    tied = s_sorted == cut
    n_above = int(above.sum())
    hits = y_sorted[above].sum() + (k - n_above) * y_sorted[tied].mean()
    return ContactPrecision(float(hits / k), k, int(s.size))


def contact_metrics(
    scores: list[np.ndarray],
    contacts: list[np.ndarray],
    positions: list[np.ndarray | None] | None = None,
    divisors: tuple[int, ...] = (1, 2, 5),
    ranges: tuple[str, ...] = ("all", "short", "medium", "long"),
) -> dict[str, float]:
    """P@L/d for each divisor and range, averaged over proteins; key names like ``P@L/5`` or ``P@L/5-long``.

    L is the protein's length (its number of residues); k = max(1, L // d). Proteins with no candidate pair in a
    range are left out of that range's mean.
    """
    out: dict[str, float] = {}
    for rng in ranges:
        lo, hi = CONTACT_RANGES[rng]
        for d in divisors:
            vals = []
            for idx, (s, c) in enumerate(zip(scores, contacts)):
                L = s.shape[0]
                pos = positions[idx] if positions is not None else None
                r = contact_precision(s, c, max(1, L // d), lo, hi, pos)
                if r.precision is not None:
                    vals.append(r.precision)
            name = "P@L" if d == 1 else f"P@L/{d}"
            out[name if rng == "all" else f"{name}-{rng}"] = float(np.mean(vals)) if vals else math.nan
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), ignoring NaN."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
