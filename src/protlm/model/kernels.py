"""Linear layers on oneDNN's CPU kernels at inference, with the activation or gate fused into the matmul.

On x86 CPUs, torch's ``F.linear`` runs fp32 through MKL's sgemm. On AVX-512 CPUs oneDNN's inner-product kernel,
which torch ships for inference (``torch.ops.mkldnn._linear_pointwise``, the op its compiler emits for frozen CPU
graphs), is faster on the shapes protein LMs run: 1.03-1.19x per fp32 layer on a Zen 4 core, 1.10x on a whole
fp32 T5 encoder (bench/README.md, "oneDNN linear layers"). It also applies an activation (GELU, SiLU, ReLU) or an
elementwise product with another tensor (T5's gate) as it writes the output, saving one pass over the
(tokens, d_ff) activations. Under AVX2 it gained nothing end to end and its fused GELU was slower (0.8-0.95x), so
the path is used on AVX-512 CPUs only (torch's CPU capability ``AVX512``); elsewhere ``F.linear`` runs.

The weights stay the module's own dense tensors (no packed copy, so no extra memory), and the results are the
same products in another summation order: they match ``F.linear`` to fp32 rounding.

The fast path is taken only where it is safe: a CPU tensor in fp32 or bf16 whose weight has the same dtype,
outside CPU autocast (which must see ``F.linear`` to cast it), and with no gradient to record (the oneDNN op has
no backward). Everything else, training included, runs ``F.linear`` and the activation as before.

:func:`attention` is every family's scaled dot-product attention: torch's SDPA, except at bf16 inference on
AVX-512 CPUs, where for 128 tokens or more it writes the scores out per group of heads (see its doc).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# oneDNN keeps every matmul primitive it builds, with its buffers, in a cache of 1,024 by default. Proteins come in
# every length and each length builds new ones: over 120 proteins a bf16 d768 T5 encoder kept 120 MiB more than it
# used (tcmalloc: 146 MiB above the loaded model against 12 MiB with a cache of 32, at the same speed). The cache
# size is read when oneDNN first runs, so this sets it as protlm's models are built, unless the user has.
if not any(v in os.environ for v in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")):
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "32"

_GELU_2C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(t: Tensor) -> Tensor:
    """GELU's tanh approximation, ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))`` with ``c = sqrt(2 / pi)``.

    On CPU in fp32 without a gradient to record it is evaluated as ``x sigmoid(2c (x + 0.044715 x^3))``, the same
    function (``1 + tanh(u) = 2 sigmoid(2u)``), in six passes over one new tensor. torch's own kernel evaluates a
    vectorised tanh that is the slow part: on (300, 3072) activations, one Zen 4 thread, 2.5 against 1.0 ms under
    AVX2 kernels and 1.5 against 0.7 ms under AVX-512. The results differ by ulps: both stay within 7e-7 of an
    fp64 evaluation over [-12, 12], and the sigmoid form has no cancellation in ``1 + tanh(u)`` for negative x.
    Elsewhere (GPUs, half types, training) torch's kernel runs."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or (torch.is_grad_enabled() and t.requires_grad):
        return F.gelu(t, approximate="tanh")
    y = t * t
    y.mul_(_GELU_2C * 0.044715).add_(_GELU_2C).mul_(t)
    return y.sigmoid_().mul_(t)


# activation name -> (oneDNN post-op, its algorithm, the eager function with the same result)
ACTIVATIONS: dict[str, tuple[str, str, Callable[[Tensor], Tensor]]] = {
    "gelu": ("gelu", "none", F.gelu),  # exact (erf)
    "gelu_tanh": ("gelu", "tanh", gelu_tanh),
    "relu": ("relu", "", F.relu),
    "silu": ("swish", "", F.silu),
}

_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    """torch has the oneDNN linear op (x86 and most ARM builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _avx512() -> bool:
    """torch's CPU capability is AVX-512 (``ATEN_CPU_CAPABILITY=avx2`` lowers it, as bench/avx2.sh does): where
    both of this module's fast paths were measured faster."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_pays() -> bool:
    """The CPU is one where the oneDNN path was measured faster: AVX-512."""
    return _avx512()


_ONEDNN = onednn_available() and onednn_pays()


def onednn_enabled() -> bool:
    return _ONEDNN


def set_onednn(enabled: bool) -> bool:
    """Turn the oneDNN path on or off for this process (for comparisons, or to try it on another CPU); returns the
    previous setting. It cannot be turned on where torch has no oneDNN."""
    global _ONEDNN
    before, _ONEDNN = _ONEDNN, bool(enabled) and onednn_available()
    return before


def _fast(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if not _ONEDNN or x.device.type != "cpu" or x.dtype not in _DTYPES or weight.dtype != x.dtype or x.dim() < 2:
        return False
    if x.dtype == torch.bfloat16 and not _avx512():
        return False  # oneDNN has no bf16 inner product below AVX-512 (it fails to build one on AVX2 CPUs)
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return bias is None or bias.dtype == x.dtype


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``activation(x @ weight.T + bias)``; ``weight`` is (out, in), as ``nn.Linear``'s."""
    if _fast(x, weight, bias):
        op, algorithm = ("none", "") if activation is None else ACTIVATIONS[activation][:2]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, op, [], algorithm)
    y = F.linear(x, weight, bias)
    return y if activation is None else ACTIVATIONS[activation][2](y)


def linear_mul(x: Tensor, weight: Tensor, other: Tensor) -> Tensor:
    """``(x @ weight.T) * other``, the product written by the matmul itself where it can be (T5's gated FFN)."""
    if _fast(x, weight, None) and other.dtype == x.dtype and other.shape[:-1] == x.shape[:-1] \
            and other.shape[-1] == weight.shape[0] and other.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "mul")
    y = F.linear(x, weight)
    if torch.is_grad_enabled() and (y.requires_grad or other.requires_grad) or y.shape != other.shape \
            or y.dtype != other.dtype:
        return y * other
    return y.mul_(other)  # in place: no new (tokens, d_ff) tensor


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose inference runs on oneDNN where :func:`linear`
    can."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def apply(module: nn.Module, x: Tensor, activation: str | None = None) -> Tensor:
    """``activation(module(x))``, fused into one kernel when ``module`` is a plain :class:`Linear`. Any other
    module, such as a LoRA wrapper around one, runs its own forward (so its adapter is applied) and then the
    activation."""
    if type(module) is Linear:
        return linear(x, module.weight, module.bias, activation)
    y = module(x)
    return y if activation is None else ACTIVATIONS[activation][2](y)


def gated(gate: nn.Module, up: nn.Module, x: Tensor, activation: str) -> Tensor:
    """``activation(gate(x)) * up(x)``, T5's gated FFN input, in two kernels when both are plain :class:`Linear`
    without bias."""
    g = apply(gate, x, activation)
    if type(up) is Linear and up.bias is None:
        return linear_mul(x, up.weight, g)
    return g * up(x)


# --- attention ------------------------------------------------------------------------------------------------
WRITE_OUT_MIN_QUERIES = 128  # below this torch's fused kernel is faster (0.5x at 60 queries)
WRITE_OUT_MIN_HEAD_DIM = 16  # ESM-2 8M's heads; 16- and 24-wide (35M) heads ran 1.03-2.3x SDPA at 128-1,022 tokens
SCORE_BYTES = 2 << 20  # the scores of one group of heads: small enough to stay in a core's cache


def write_out_pays() -> bool:
    """The CPU is one where bf16 attention written out per group of heads was measured faster than torch's
    fused kernel: AVX-512 (native bf16 matmuls; under AVX2 torch emulates bf16 and ``auto`` never picks it)."""
    return _avx512()


_WRITE_OUT = write_out_pays()


def set_write_out(enabled: bool) -> bool:
    """Turn the written-out bf16 attention on or off for this process; returns the previous setting."""
    global _WRITE_OUT
    before, _WRITE_OUT = _WRITE_OUT, bool(enabled)
    return before


def _writes_out(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool) -> bool:
    if not _WRITE_OUT or q.device.type != "cpu" or dropout_p > 0 or is_causal or q.dim() != 4:
        return False
    if not q.dtype == k.dtype == v.dtype == torch.bfloat16 or q.shape[2] < WRITE_OUT_MIN_QUERIES \
            or q.shape[3] < WRITE_OUT_MIN_HEAD_DIM:
        return False
    if mask is not None and (mask.dim() != 4 or not mask.is_floating_point()):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
              dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` on (B, H, L, D) queries, keys and values; ``mask`` is additive and
    broadcasts to (B, H, Lq, Lk).

    At bf16 inference on AVX-512 CPUs, for 128 queries or more and heads 16 wide or more, the scores are written
    out instead: for each sequence and each group of heads whose (Lq, Lk) scores fit in about 2 MB, one batched
    matmul, the mask added, a softmax in place and a second matmul. torch's fused CPU kernel works in small query
    and key blocks and ran at about a third of the bf16 matmul rate on a Zen 4 core pair; these matmuls run near
    that rate and the scores stay in the cache: 1.3-2.8x less time at 128-1,022 tokens and 64-wide heads
    (``bench/attention.py``; bench/README.md, "Written-out bf16 attention"). The scores are rounded to bf16 before
    the softmax (computed in fp32), as in transformers' eager bf16 attention, where the fused kernel keeps them in
    fp32: 2-4x its error per call, no visible change in whole models (tests/test_kernels.py). The output is a
    (B, H, Lq, D) view of a (B, Lq, H, D) tensor, so the caller's ``transpose(1, 2).reshape(B, Lq, H * D)``
    copies nothing.

    Everything else (fp32, GPUs, training, dropout, causal attention, short inputs, heads under 16) runs torch's
    SDPA.
    """
    if not _writes_out(q, k, v, mask, dropout_p, is_causal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if scale != 1.0:
        q = q * scale
    out = q.new_empty(B, Lq, H, D).transpose(1, 2)
    group = max(1, min(H, SCORE_BYTES // (Lq * Lk * q.element_size())))
    kt = k.transpose(-1, -2)
    buffer = q.new_empty(group, Lq, Lk)  # one scores buffer for the whole call: fewer, equal-sized allocations
    for b in range(B):
        m = None if mask is None else mask[b if mask.shape[0] > 1 else 0]  # (H or 1, Lq or 1, Lk)
        for h in range(0, H, group):
            n = min(group, H - h)
            scores = torch.matmul(q[b, h:h + n], kt[b, h:h + n], out=buffer[:n])  # (n, Lq, Lk)
            if m is not None:
                scores += m[h:h + n] if m.shape[0] > 1 else m
            torch.softmax(scores, -1, out=scores)  # in place: the softmax stays in the same cached buffer
            torch.matmul(scores, v[b, h:h + n], out=out[b, h:h + n])
    return out
