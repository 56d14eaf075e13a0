"""The downstream head: one ConvBERT layer on frozen per-residue embeddings, then a task-kind output.

Ankh3's benchmark (paper Table 4) trains the same small network on every task: a ConvBERT encoder (Jiang et al.
2020) of 1 layer, feed-forward width = embedding width / 2, 4 heads, dropout 0.1, kernel 7, with global average
pooling for per-protein tasks. This module writes that network once; the task kind only picks the output:

- ``residue_classification``: a linear layer per residue (secondary structure);
- ``protein_classification`` / ``protein_regression``: masked mean over residues, then a linear layer (DeepLoc;
  GB1, fluorescence);
- ``protein_multilabel``: as per-protein classification, one independent yes/no logit per class (``protlm
  train-head`` on a user's multi-label data);
- ``contact``: a score for every residue pair (see :class:`PairScorer` for how pair features are built).

:class:`LightHead` is the light alternative ``protlm train-head --head light|linear`` offers: ProtTrans's
two-layer CNN per residue, a small MLP on the mean embedding per protein, or one linear layer.

ConvBERT's "mixed attention" splits the heads in two: half are ordinary self-attention heads, half are
span-based dynamic convolution heads, whose kernel at each position is computed from the query and a local
(convolved) view of the keys. Both halves see only real residues: padding is excluded from attention keys and
zeroed before every convolution, so a protein's output does not depend on what it was batched with.

Two batch layouts are accepted. *Padded*: (B, L, D) with one protein per row and a (B, L) residue mask. *Packed*:
one row (1, N, D) holding several proteins end to end, each at a ``(start, length)`` of ``segments``, with at
least ``kernel_size // 2`` masked positions between neighbours. Attention then runs protein by protein, and the
masked gaps keep the convolutions apart. Packing wastes no work on padding, which for proteins of mixed lengths
is a quarter of a padded batch's residues (SSP training chains) and a third of its attention scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protlm.errors import ConfigError
from protlm.model import kernels
from protlm.model.kernels import Linear

Kind = Literal["residue_classification", "protein_classification", "protein_regression", "contact",
               "protein_multilabel"]
KINDS = get_args(Kind)
Segments = tuple[tuple[int, int], ...]  # packed layout: (start, length) of each protein in the one row


def segment_matrix(segments: Segments, n: int, like: Tensor) -> Tensor:
    """(S, n) membership matrix of a packed row: row s is 1 over protein s's positions, 0 elsewhere."""
    m = like.new_zeros(len(segments), n)
    for i, (start, length) in enumerate(segments):
        m[i, start:start + length] = 1.0
    return m


@dataclass
class HeadConfig:
    """Head shape; defaults are Ankh3's Table 4."""

    num_layers: int = 1  # ConvBERT layers
    ff_ratio: float = 0.5  # feed-forward width as a fraction of the embedding width ("embedding dim / 2")
    num_heads: int = 4  # heads of the mixed attention, self-attention and convolution heads together
    head_ratio: int = 2  # ConvBERT's split: num_heads / head_ratio heads are self-attention, the rest convolution
    dropout: float = 0.1  # on attention probabilities and after each sub-layer
    kernel_size: int = 7  # width of the dynamic convolution and of the key-span convolution
    pair_dim: int = 64  # contact kind only: width of the per-residue projection that pair features come from

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_heads < 1:
            raise ConfigError(f"head: num_layers and num_heads must be >= 1 (got {self.num_layers}, {self.num_heads})")
        if self.head_ratio < 1 or self.num_heads % self.head_ratio:
            raise ConfigError(f"head: num_heads ({self.num_heads}) must be a multiple of head_ratio ({self.head_ratio})")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"head: kernel_size must be odd so the convolution is centred (got {self.kernel_size})")
        if not 0 < self.ff_ratio:
            raise ConfigError(f"head: ff_ratio must be positive (got {self.ff_ratio})")


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU dropout draw: 0 where an element is dropped, 1 / keep elsewhere, so that ``x * keep_mask(...)``
    is inverted dropout.

    The draw uses 16-bit slices of 64-bit random words: torch's own dropout draws one 32-bit number per element
    and, on this kind of head, spends more time there than in all the matrix products. The keep probability is
    1 - round(p * 2**15) / 2**15 (within 2e-5 of 1 - p). The mask is built with arithmetic (shift, clamp) rather
    than a comparison, because torch's CPU kernels on bool tensors are several times slower than on floats."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # 63 random bits each (the sign bit is 0)
    lanes = words.view(torch.int16)[:n] & 0x7FFF  # 15 uniform bits per element
    threshold = round(p * 32768)
    # lanes >= threshold -> 1, below -> 0; exact in float32 (integers < 2**24)
    keep = lanes.to(torch.float32).sub_(threshold - 1).clamp_(0.0, 1.0).mul_(32768 / (32768 - threshold))
    return keep.view(shape).to(dtype)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, with the fast CPU draw of :func:`keep_mask`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x * keep_mask(x.shape, p, x.dtype)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def masked_mean(x: Tensor, mask: Tensor, segments: Segments | None = None) -> Tensor:
    """Mean over the residue axis of (B, L, D) using only positions where ``mask`` (B, L) is true: (B, D), or
    (S, D), one per protein, for a packed row."""
    if segments is not None:
        m = segment_matrix(segments, x.shape[1], x)
        return (m @ x[0]) / m.sum(1, keepdim=True).clamp_min(1.0)
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def _shift_sum(x: Tensor, weight: Tensor, kernel_size: int) -> Tensor:
    """A centred convolution along the residue axis (dim 1) of x (B, L, ...), zero outside the sequence:
    out[:, i] = sum_t weight[..., t] * x[:, i + t - K//2]. ``weight`` broadcasts against x's trailing dims plus
    a last kernel axis: (D, K) for a depthwise convolution, (B, L, H, 1, K) for per-position dynamic kernels.

    Written as K shifted multiply-adds because, for kernels this small, that is several times faster on CPU
    than conv1d with groups or unfold (and it needs no (B, L, D, K) intermediate).
    """
    L = x.shape[1]
    half = kernel_size // 2
    padded = F.pad(x, (0, 0) * (x.dim() - 2) + (half, half))
    out = padded[:, :L] * weight[..., 0]
    for t in range(1, kernel_size):
        out = torch.addcmul(out, padded[:, t:t + L], weight[..., t])
    return out


class MixedAttention(nn.Module):
    """ConvBERT's mixed attention: self-attention heads and span-based dynamic-convolution heads side by side."""

    def __init__(self, dim: int, cfg: HeadConfig):
        super().__init__()
        if dim % cfg.num_heads:
            raise ConfigError(f"head: width {dim} is not a multiple of num_heads={cfg.num_heads}")
        self.head_dim = dim // cfg.num_heads
        self.n_att = cfg.num_heads // cfg.head_ratio
        self.n_conv = cfg.num_heads - self.n_att
        self.kernel_size = cfg.kernel_size
        self.dropout = cfg.dropout
        att_w = self.n_att * self.head_dim
        conv_w = self.n_conv * self.head_dim
        self.query = Linear(dim, att_w + conv_w)  # one projection, split between the two kinds of head
        self.key = Linear(dim, att_w)
        self.value = Linear(dim, att_w)
        if self.n_conv:
            # Key span: a depthwise-separable convolution sees the kernel_size neighbours of each position.
            self.span_depthwise = nn.Parameter(torch.randn(dim, cfg.kernel_size) / cfg.kernel_size**0.5)
            self.span_pointwise = Linear(dim, conv_w)
            self.kernel = Linear(conv_w, self.n_conv * cfg.kernel_size)  # per-position, per-head conv kernel
            self.conv_value = Linear(dim, conv_w)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Self-attention of (B, H, L, hd) heads; keys where ``mask`` (B, L) is false are left out."""
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            # Written out so the probabilities can use the fast CPU dropout; the padding mask enters as an
            # additive bias inside the first matmul, with no extra pass over the (L, L) scores.
            B, H, L, hd = q.shape
            q3 = (q * hd**-0.5).reshape(B * H, L, hd)
            kt = k.reshape(B * H, L, hd).transpose(1, 2)
            if mask is None:
                scores = torch.bmm(q3, kt)
            else:
                bias = torch.zeros(B, 1, L, dtype=q.dtype).masked_fill(~mask[:, None, :], float("-inf"))
                scores = torch.baddbmm(bias.repeat_interleave(H, 0), q3, kt)
            probs = dropout(scores.softmax(-1), self.dropout, True)
            return torch.bmm(probs, v.reshape(B * H, L, hd)).view(B, H, L, hd)
        keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L): attend to residues only
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: Tensor, mask: Tensor, segments: Segments | None = None) -> Tensor:
        """x (B, L, D) and mask (B, L) bool, padded; or a packed row (1, N, D) with its ``segments``."""
        B, L, _ = x.shape
        q = self.query(x)
        q_att, q_conv = q.split([self.n_att * self.head_dim, self.n_conv * self.head_dim], dim=-1)
        heads = lambda t: t.view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        qh, kh, vh = heads(q_att), heads(self.key(x)), heads(self.value(x))
        if segments is None:
            att = self._attend(qh, kh, vh, mask)
        else:  # protein by protein; gap positions get zeros
            parts, pos = [], 0
            for start, length in segments:
                if start > pos:
                    parts.append(qh.new_zeros(B, self.n_att, start - pos, self.head_dim))
                s = slice(start, start + length)
                parts.append(self._attend(qh[:, :, s], kh[:, :, s], vh[:, :, s], None))
                pos = start + length
            if pos < L:
                parts.append(qh.new_zeros(B, self.n_att, L - pos, self.head_dim))
            att = torch.cat(parts, dim=2)
        out = [att.transpose(1, 2).reshape(B, L, -1)]
        if self.n_conv:
            zero_pad = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
            span = self.span_pointwise(_shift_sum(x * zero_pad, self.span_depthwise, self.kernel_size))
            k = self.kernel(q_conv * span).view(B, L, self.n_conv, 1, self.kernel_size)
            k = dropout(k.float().softmax(-1).to(x.dtype), self.dropout, self.training)  # (B, L, Hc, 1, K)
            v = (self.conv_value(x) * zero_pad).view(B, L, self.n_conv, self.head_dim)
            out.append(_shift_sum(v, k, self.kernel_size).reshape(B, L, -1))
        return torch.cat(out, dim=-1)


class ConvBertLayer(nn.Module):
    """Mixed attention and a feed-forward block, each with dropout, a residual and a post-LayerNorm (BERT style)."""

    def __init__(self, dim: int, ff_dim: int, cfg: HeadConfig):
        super().__init__()
        self.mixer = MixedAttention(dim, cfg)
        self.mixer_out = Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(Linear(dim, ff_dim), nn.GELU(), Linear(ff_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, segments: Segments | None = None) -> Tensor:
        x = self.norm1(x + self.drop(self.mixer_out(self.mixer(x, mask, segments))))
        ff = self.ff  # Linear, GELU, Linear: the GELU fused into the first matmul at inference (model.kernels)
        return self.norm2(x + self.drop(ff[2](kernels.apply(ff[0], x, "gelu"))))


class PairScorer(nn.Module):
    """Contact logits for all residue pairs.

    Pair features: each residue's ConvBERT output h_i is projected to p_i (``pair_dim`` wide); the pair (i, j) is
    described by f_ij = [p_i * p_j, |p_i - p_j|] (elementwise), which is symmetric in i and j, so the contact map
    comes out symmetric without averaging. One linear layer scores f_ij. The product half is computed as a
    weighted dot product, without materialising an (L, L, pair_dim) tensor for it.
    """

    def __init__(self, dim: int, pair_dim: int):
        super().__init__()
        self.proj = Linear(dim, pair_dim)
        self.w_prod = nn.Parameter(torch.randn(pair_dim) / pair_dim**0.5)
        self.w_diff = Linear(pair_dim, 1)

    def forward(self, h: Tensor) -> Tensor:  # (B, L, D) -> (B, L, L)
        p = self.proj(h)
        prod = torch.einsum("bic,bjc->bij", p * self.w_prod, p)
        diff = self.w_diff((p[:, :, None, :] - p[:, None, :, :]).abs()).squeeze(-1)
        return prod + diff


class ConvBertHead(nn.Module):
    """ConvBERT encoder plus the output of one task kind; ``n_out`` is the class count (1 for regression/contact)."""

    def __init__(self, in_dim: int, kind: str, n_out: int = 1, cfg: HeadConfig | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
        cfg = cfg or HeadConfig()
        self.kind = kind
        self.in_dim = in_dim
        # Widths that 4 heads do not divide (one-hot is 21 wide) get zero channels appended; a zero channel adds
        # nothing to any projection, it only makes the head split even.
        self.dim = -(-in_dim // cfg.num_heads) * cfg.num_heads
        ff_dim = max(1, round(in_dim * cfg.ff_ratio))
        self.layers = nn.ModuleList(ConvBertLayer(self.dim, ff_dim, cfg) for _ in range(cfg.num_layers))
        self.drop = Dropout(cfg.dropout)
        if kind == "contact":
            self.out = PairScorer(self.dim, cfg.pair_dim)
        else:
            self.out = Linear(self.dim, 1 if kind == "protein_regression" else n_out)

    def forward(self, x: Tensor, mask: Tensor, segments: Segments | None = None) -> Tensor:
        """x (B, L, in_dim), mask (B, L) bool -> logits: (B, L, C) per residue, (B, C) or (B,) per protein,
        (B, L, L) for contacts. A packed row (see the module doc) gives (1, N, C) per residue and (S, C) or (S,)
        per protein; contacts take the padded layout only."""
        if segments is not None:
            if self.kind == "contact":
                raise ValueError("contact heads take padded batches, not packed rows")
            half = self.layers[0].mixer.kernel_size // 2
            ends = [start + length for start, length in segments]
            if x.shape[0] != 1 or any(b < a + half for a, b in zip(ends, (s for s, _ in segments[1:]))):
                raise ValueError(f"a packed row is one row with >= {half} positions between proteins")
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # once here, not again in every projection
        if self.dim != self.in_dim:
            x = F.pad(x, (0, self.dim - self.in_dim))
        x = x * mask.unsqueeze(-1).to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask, segments)
        if self.kind == "residue_classification":
            return self.out(self.drop(x))
        if self.kind == "contact":
            return self.out(x)
        pooled = self.out(self.drop(masked_mean(x, mask, segments)))
        return pooled.squeeze(-1) if self.kind == "protein_regression" else pooled

    @property
    def pack_gap(self) -> int:
        """Masked positions a packed row needs between proteins so that no convolution reaches across."""
        return self.layers[0].mixer.kernel_size // 2

    def per_protein_loss(self, logits: Tensor, target: Tensor, segments: Segments | None = None,
                         class_weights: Tensor | None = None) -> Tensor:
        return per_protein_loss(self.kind, logits, target, segments, class_weights)


def per_protein_loss(kind: str, logits: Tensor, target: Tensor, segments: Segments | None = None,
                     class_weights: Tensor | None = None) -> Tensor:
    """(B,) loss of each protein, or (S,) for a packed row: its own mean over its scored elements.

    Targets: per-residue class ids with -1 for unscored residues (and gaps); per-protein class ids;
    per-protein floats; per-protein multi-hot floats (multi-label); contact maps as floats with -1 for unscored
    pairs. A protein with nothing scored gets 0. ``class_weights`` (classification kinds) scales each element's
    loss by the weight of its true class, and for multi-label is each class's weight of its positives (BCE's
    ``pos_weight``): rare classes count more when classes are imbalanced.
    """
    if kind == "residue_classification":
        ce = F.cross_entropy(logits.float().transpose(1, 2), target.clamp_min(0), weight=class_weights,
                             reduction="none")  # (B, L)
        scored = (target >= 0).float()
        if segments is not None:
            m = segment_matrix(segments, ce.shape[1], ce)
            return (m @ (ce * scored)[0]) / (m @ scored[0]).clamp_min(1.0)
        return (ce * scored).sum(1) / scored.sum(1).clamp_min(1.0)
    if kind == "protein_classification":
        return F.cross_entropy(logits.float(), target, weight=class_weights, reduction="none")
    if kind == "protein_regression":
        return F.mse_loss(logits.float(), target.float(), reduction="none")
    if kind == "protein_multilabel":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=class_weights,
                                                  reduction="none").mean(-1)
    scored = (target >= 0).float()  # contact
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.clamp_min(0).float(), reduction="none")
    return (bce * scored).sum((1, 2)) / scored.sum((1, 2)).clamp_min(1.0)


@dataclass
class LightHeadConfig:
    """The light heads' shape. ``style`` "cnn_mlp": per residue ProtTrans's secondary-structure CNN (a kernel-7
    convolution to 32 channels, ReLU, dropout 0.25, a kernel-7 convolution to the classes), per protein a small
    MLP on the mean embedding (one hidden layer of 32, ReLU, dropout 0.25); "linear": one linear layer, per
    residue or on the mean embedding."""

    style: Literal["cnn_mlp", "linear"] = "cnn_mlp"
    hidden: int = 32
    kernel_size: int = 7
    dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.style not in ("cnn_mlp", "linear"):
            raise ConfigError(f"light head: style must be cnn_mlp or linear, got {self.style!r}")
        if self.hidden < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"light head: hidden must be >= 1 and kernel_size odd (got {self.hidden}, "
                              f"{self.kernel_size})")


class LightHead(nn.Module):
    """A light head on frozen embeddings (see :class:`LightHeadConfig`), with the ConvBERT head's calling
    convention: padded (B, L, D) with a mask, or a packed row with ``segments``; padding and gaps are zeroed
    before every convolution, so a protein's output does not depend on its neighbours in a batch."""

    def __init__(self, in_dim: int, kind: str, n_out: int = 1, cfg: LightHeadConfig | None = None):
        super().__init__()
        if kind not in KINDS or kind == "contact":
            raise ConfigError(f"light heads do not predict {kind!r} (per-residue and per-protein kinds only)")
        cfg = cfg or LightHeadConfig()
        self.kind, self.in_dim, self.cfg = kind, in_dim, cfg
        out = 1 if kind == "protein_regression" else n_out
        self.conv = kind == "residue_classification" and cfg.style == "cnn_mlp"
        self.pack_gap = cfg.kernel_size // 2 if self.conv else 0
        if cfg.style == "linear":
            self.net = Linear(in_dim, out)
        elif self.conv:
            pad = cfg.kernel_size // 2
            self.conv1 = nn.Conv1d(in_dim, cfg.hidden, cfg.kernel_size, padding=pad)
            self.conv2 = nn.Conv1d(cfg.hidden, out, cfg.kernel_size, padding=pad)
        else:
            self.net = nn.Sequential(Linear(in_dim, cfg.hidden), nn.ReLU(), Dropout(cfg.dropout),
                                     Linear(cfg.hidden, out))

    def forward(self, x: Tensor, mask: Tensor, segments: Segments | None = None) -> Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        keep = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        if self.kind == "residue_classification":
            if not self.conv:
                return self.net(x)
            # conv1d reads a contiguous (B, C, L) input about twice as fast as a transposed view of (B, L, C)
            h = torch.relu(self.conv1((x * keep).transpose(1, 2).contiguous())).transpose(1, 2)  # (B, L, hidden)
            h = dropout(h, self.cfg.dropout, self.training) * keep
            return self.conv2(h.transpose(1, 2).contiguous()).transpose(1, 2)
        out = self.net(masked_mean(x * keep, mask, segments))
        return out.squeeze(-1) if self.kind == "protein_regression" else out

    def per_protein_loss(self, logits: Tensor, target: Tensor, segments: Segments | None = None,
                         class_weights: Tensor | None = None) -> Tensor:
        return per_protein_loss(self.kind, logits, target, segments, class_weights)
