"""The numbers of the depth analysis: per-token measures, per-protein means, output comparison, linear CKA.

All measures are computed in fp32 whatever the model's dtype. Per-token values are averaged within each protein
over a boolean token mask, then over proteins (so a long protein counts as much as a short one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(B, L) values averaged over the True positions of each row; NaN for a row with none."""
    mask = mask.to(values.dtype)
    count = mask.sum(1)
    total = (values * mask).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def update_stats(update: Tensor, stream: Tensor, stream_norm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(relative norm, cosine), each (B, L), of an update against the stream it is added to, in one pass."""
    u, h = update.float(), stream.float()
    u_norm = torch.linalg.vector_norm(u, dim=-1)
    h_norm = torch.linalg.vector_norm(h, dim=-1) if stream_norm is None else stream_norm
    dot = (u * h).sum(-1)
    return u_norm / h_norm.clamp(min=1e-12), dot / (u_norm * h_norm).clamp(min=1e-12)


@dataclass
class OutputComparison:
    kl: Tensor  # (n,) KL(p_full || p_other) in nats
    top1_agree: Tensor  # (n,) 1.0 where both distributions have the same argmax
    correct: Tensor  # (n,) 1.0 where the other distribution's argmax is the true label

    @staticmethod
    def cat(parts: list["OutputComparison"]) -> "OutputComparison":
        return OutputComparison(*(torch.cat([getattr(c, k) for c in parts]) for k in ("kl", "top1_agree", "correct")))


CHUNK_LOGITS = 1 << 23  # logits per chunk (32 MB in fp32): a big enough matmul, and buffers malloc can reuse


def row_chunks(n: int, vocab: int) -> list[slice]:
    """Slices of ``n`` rows holding about :data:`CHUNK_LOGITS` logits each (at least one row)."""
    step = max(1, CHUNK_LOGITS // max(vocab, 1))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


class OutputReference:
    """The full model's output distribution at ``n`` predicting positions, kept in the form a comparison reads.

    KL(p || q) is  sum_v p_v log p_v - sum_v p_v log q_v. With p and its negative entropy stored once, comparing
    another run needs its log-probabilities and one dot product per position, not a pass that forms
    p * (log p - log q). Everything runs in fp32 over row chunks of about :data:`CHUNK_LOGITS` logits, so a
    50,000-token vocabulary over thousands of positions never materialises (n, V) temporaries.
    """

    def __init__(self, logits_of, n: int, vocab: int, labels: Tensor):
        """``logits_of(rows)`` gives the full model's logits (len(rows), V) at a slice of the n positions;
        ``labels`` (n,) are the true tokens there; ``vocab`` sizes the chunks."""
        self.labels = labels
        self.p = torch.empty(0, vocab, dtype=torch.float32, device=labels.device)  # (n, V) once the width is seen
        neg_entropy, top1, nll = [], [], []
        for rows in row_chunks(n, vocab):
            logp = torch.log_softmax(logits_of(rows).float(), dim=-1)
            if rows.start == 0:
                self.p = torch.empty(n, logp.shape[-1], dtype=torch.float32, device=logp.device)
            p = torch.exp(logp, out=self.p[rows])
            neg_entropy.append(torch.linalg.vecdot(p, logp))
            top1.append(logp.argmax(-1))
            nll.append(-logp.gather(-1, labels[rows, None].clamp(min=0))[:, 0])
        none = labels.new_zeros(0, dtype=torch.float32)  # no predicting positions at all
        self.neg_entropy = torch.cat(neg_entropy) if neg_entropy else none
        self.nll = torch.cat(nll) if nll else none
        self.top1 = torch.cat(top1) if top1 else labels.new_zeros(0)
        self.correct = (self.top1 == labels).float()

    def compare_rows(self, rows: slice, logits: Tensor) -> OutputComparison:
        """Compare another run's logits (len(rows), V) at a slice of the positions with the full model's."""
        logq = torch.log_softmax(logits.float(), dim=-1)
        kl = self.neg_entropy[rows] - torch.linalg.vecdot(self.p[rows], logq)
        top = logq.argmax(-1)  # fp32: torch's argmax over bf16 is several times slower
        return OutputComparison(kl, (top == self.top1[rows]).float(), (top == self.labels[rows]).float())

    def compare(self, logits_of, n: int) -> OutputComparison:
        """Compare another run whose logits at a slice of the positions are ``logits_of(rows)``."""
        parts = [self.compare_rows(rows, logits_of(rows)) for rows in row_chunks(n, self.vocab)]
        return OutputComparison.cat(parts) if parts else self.itself()

    def itself(self) -> OutputComparison:
        """The full model compared with itself (KL 0, every top-1 kept)."""
        return OutputComparison(torch.zeros_like(self.neg_entropy), torch.ones_like(self.neg_entropy), self.correct)

    @property
    def vocab(self) -> int:
        return self.p.shape[-1]


@dataclass
class Summary:
    """Mean and standard deviation over proteins; NaN (no valid protein) is written as None in JSON."""

    mean: float
    std: float
    n: int  # proteins that had at least one valid position


def summarise(per_protein: np.ndarray) -> Summary:
    valid = per_protein[np.isfinite(per_protein)]
    if valid.size == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(float(valid.mean()), float(valid.std(ddof=1)) if valid.size > 1 else 0.0, int(valid.size))


class PerProtein:
    """Per-protein values of many named measures, filled batch by batch in any protein order."""

    def __init__(self, n_proteins: int):
        self.n = n_proteins
        self.values: dict[tuple, np.ndarray] = {}

    def put(self, key: tuple, index: np.ndarray, values: Tensor) -> None:
        arr = self.values.get(key)
        if arr is None:
            arr = self.values[key] = np.full(self.n, np.nan)
        arr[index] = values.detach().float().cpu().numpy()

    def summary(self, key: tuple) -> Summary:
        if key not in self.values:
            return Summary(math.nan, math.nan, 0)
        return summarise(self.values[key])


# --- linear CKA ----------------------------------------------------------------------------------------------
def linear_cka_matrix(features: list[Tensor]) -> np.ndarray:
    """Linear CKA (Kornblith et al., ICML 2019) between every pair of (n, d) feature matrices of the same tokens.

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc. It is 1 for
    representations equal up to rotation and isotropic scaling. Computed in the feature space (d x d
    products), which costs O(n d^2) per pair and no n x n Gram matrix.
    """
    if not features:
        return np.zeros((0, 0))
    n = features[0].shape[0]
    if any(f.shape[0] != n for f in features):
        raise ValueError("CKA needs the same tokens in every layer")
    centred = []
    for f in features:
        f64 = f.double()
        # Centre in fp64 (a large common offset would swamp fp32), then multiply in fp32 for speed.
        centred.append((f64 - f64.mean(0, keepdim=True)).float())
    k = len(centred)
    hsic = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            cross = centred[i].T @ centred[j]
            hsic[i, j] = hsic[j, i] = float(cross.double().pow(2).sum())
    diag = np.sqrt(np.clip(np.diag(hsic), 0, None))
    denom = np.outer(diag, diag)
    with np.errstate(invalid="ignore", divide="ignore"):
        cka = np.where(denom > 0, hsic / denom, np.nan)
    return cka
