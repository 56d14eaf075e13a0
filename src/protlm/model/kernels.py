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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# activation name -> (oneDNN post-op, its algorithm, the eager function with the same result)
ACTIVATIONS: dict[str, tuple[str, str, Callable[[Tensor], Tensor]]] = {
    "gelu": ("gelu", "none", F.gelu),  # exact (erf)
    "gelu_tanh": ("gelu", "tanh", lambda t: F.gelu(t, approximate="tanh")),
    "relu": ("relu", "", F.relu),
    "silu": ("swish", "", F.silu),
}

_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    """torch has the oneDNN linear op (x86 and most ARM builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_pays() -> bool:
    """The CPU is one where the oneDNN path was measured faster: AVX-512 (torch's capability, which
    ``ATEN_CPU_CAPABILITY=avx2`` lowers, as bench/avx2.sh does)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


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
    return F.linear(x, weight) * other


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
