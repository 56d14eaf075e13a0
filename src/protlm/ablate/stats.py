"""Statistics of the ablation: mean ± std per variant, and a paired bootstrap over test proteins.

The paired comparison of a treatment variant T against a reference R on one test set: every model (pretraining
seed x head seed) of both variants scored the same test proteins, and each saved one row per protein
(:func:`protlm.evaluate.training.per_protein_rows`). One bootstrap replicate draws the proteins with
replacement, recomputes each model's metric on that draw (pooled accuracy, Spearman, mean precision: whatever
the task's metric is, via :func:`~protlm.evaluate.training.score_rows`), averages the models of each variant
and takes T - R. Because every model sees the same draw, protein difficulty cancels out (the pairing).

The interval covers the sampling of test proteins only. Pretraining-seed and head-seed variation is in the
point estimate (it averages them) but not in the interval; the report therefore also shows the difference per
pretraining seed, and the verdict calls a difference resolved only when the interval excludes zero *and* every
pretraining seed agrees in sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np



@dataclass
class PairedDifference:
    treatment: str
    reference: str
    estimate: float  # mean over the treatment's models minus mean over the reference's, all proteins
    low: float  # percentile bootstrap interval
    high: float
    confidence: float
    n_proteins: int
    resamples: int
    by_pretrain_seed: dict[int, float] = field(default_factory=dict)  # seed -> (T - R) with that seed's models

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high) and (self.low > 0 or self.high < 0)

    @property
    def seeds_agree(self) -> bool:
        vals = [v for v in self.by_pretrain_seed.values() if math.isfinite(v)]
        return bool(vals) and (all(v > 0 for v in vals) or all(v < 0 for v in vals))

    @property
    def reading(self) -> str:
        if not math.isfinite(self.estimate):
            return "not computable"
        if self.excludes_zero and self.seeds_agree:
            return f"{self.treatment} {'higher' if self.estimate > 0 else 'lower'}"
        if self.excludes_zero:
            return "interval excludes 0, pretraining seeds disagree: unresolved"
        return "no resolved difference"


def paired_bootstrap(kind: str, metric: str, treatment: dict[tuple[int, int], list[dict]],
                     reference: dict[tuple[int, int], list[dict]], names: tuple[str, str], resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> PairedDifference:
    """``treatment`` / ``reference``: (pretraining seed, head seed) -> per-protein rows of one test set.

    Only proteins present in every model's rows are used (they are the same proteins unless embeddings were
    missing), in one fixed order.
    """
    models = list(treatment.values()) + list(reference.values())
    common = set.intersection(*({r["id"] for r in rows} for rows in models)) if models else set()
    ids = sorted(common)
    n = len(ids)
    t_name, r_name = names
    if n == 0 or not treatment or not reference:
        return PairedDifference(t_name, r_name, math.nan, math.nan, math.nan, confidence, n, 0)

    def aligned(rows: list[dict]) -> list[dict]:
        by_id = {r["id"]: r for r in rows}
        return [by_id[i] for i in ids]

    t_rows = {k: aligned(v) for k, v in treatment.items()}
    r_rows = {k: aligned(v) for k, v in reference.items()}

    def diff(index: np.ndarray | None, t: dict, r: dict) -> float:
        return _nanmean([v.score(index) for v in t.values()]) - _nanmean([v.score(index) for v in r.values()])

    t_rows = {k: _Scorer(kind, metric, v) for k, v in t_rows.items()}
    r_rows = {k: _Scorer(kind, metric, v) for k, v in r_rows.items()}
    estimate = diff(None, t_rows, r_rows)
    by_seed = {}
    for s in sorted({k[0] for k in t_rows} & {k[0] for k in r_rows}):
        by_seed[s] = diff(None, {k: v for k, v in t_rows.items() if k[0] == s},
                          {k: v for k, v in r_rows.items() if k[0] == s})
    rng = np.random.default_rng(seed)
    draws = np.array([diff(rng.integers(0, n, size=n), t_rows, r_rows) for _ in range(resamples)])
    draws = draws[np.isfinite(draws)]
    alpha = (1 - confidence) / 2
    low, high = (float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))) if draws.size else (math.nan, math.nan)
    return PairedDifference(t_name, r_name, estimate, low, high, confidence, n, int(draws.size), by_seed)


class _Scorer:
    """One model's rows as arrays, so a bootstrap replicate is a few numpy reductions (same numbers as
    :func:`score_rows`; tests/test_ablate.py checks that)."""

    def __init__(self, kind: str, metric: str, rows: list[dict]):
        self.regression = kind == "protein_regression"
        if self.regression:
            self.a = np.array([r["pred"] for r in rows], dtype=np.float64)
            self.b = np.array([r["target"] for r in rows], dtype=np.float64)
        elif kind == "residue_classification":
            self.a = np.array([r["correct"] for r in rows], dtype=np.float64)
            self.b = np.array([r["scored"] for r in rows], dtype=np.float64)
        elif kind == "protein_classification":
            self.a = np.array([r["correct"] for r in rows], dtype=np.float64)
            self.b = np.ones(len(rows))
        else:  # contacts: mean precision over proteins that have candidates
            self.a = np.array([r.get(metric) or 0.0 for r in rows], dtype=np.float64)
            self.b = np.array([r.get(metric) is not None for r in rows], dtype=np.float64)

    def score(self, index: np.ndarray | None) -> float:
        a, b = (self.a, self.b) if index is None else (self.a[index], self.b[index])
        if self.regression:
            from protlm.evaluate.metrics import spearman

            return spearman(a, b)
        den = b.sum()
        return float(a.sum() / den) if den > 0 else math.nan


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan
