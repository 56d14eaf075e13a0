"""Running the encoder over planned batches and turning rows back into per-residue arrays.

:class:`Embedder` owns the model for a run: it casts the weights to the compute dtype once (bf16 weights ran
about 1.3x faster than bf16 autocast on our 2-core CPU, as measured for issue 4, and halve the memory), runs
every batch under ``torch.inference_mode``, slices each row to its residues (``<cls>``, task token and end token
dropped: one row per residue, whatever the family; with a byte-level BPE (GPT-2 family), where a token holds
several residues, each residue takes its token's row through the tokenizer's residue -> token map) and stitches windows of long proteins back together (see
:mod:`protlm.embedding.batching` for the rule).

The window follows the model: a family trained on crops of a fixed length (ESM-2: 1,022 residues, its
``max_residues``) gets that length as its default window and refuses a longer one, since its positions beyond
the crop were never trained; T5's relative positions have no such limit, so T5 keeps :data:`DEFAULT_WINDOW`.

fp16 is guarded: T5 activations can exceed the fp16 range. The model clamps its residual stream in fp16, which
keeps numbers finite but wrong, so the embedder watches every block output (``encoder.block``, the block list
of every family's stack) and, when one reaches the clamp limit or is not finite, recomputes that batch in fp32
(fp16 weights widen to fp32 exactly) and counts it. ESM does not clamp; for it the watch catches infinities.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from protlm.embedding.batching import Unit, plan_batches, split
from protlm.errors import ConfigError, InputError
from protlm.model.t5 import FP16_LIMIT
from protlm.precision import dtype_name

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Padded-token budget per batch when the user gives none. On CPUs small batches keep a layer's activations in
# cache and still pack short proteins together (measured in docs/benchmarks.md, "The CPU batch budget"); GPUs
# need large batches to fill.
DEFAULT_MAX_TOKENS = {"cpu": 512, "cuda": 16384}
DEFAULT_WINDOW = 4000  # residues, for models with no trained length limit; longer proteins go through windows
DEFAULT_OVERLAP = None  # residues shared by neighbouring windows; None: window // 4 (1000 for the default window,
#                         so every cut leaves >= 500 residues of context on each side; 255 for ESM-2's 1022)


def resolve_window(window: int | None, max_residues: int | None) -> int:
    """The window of a run: ``window`` when given (at most the model's ``max_residues``), else the model's
    ``max_residues``, else :data:`DEFAULT_WINDOW`."""
    if window is None:
        return DEFAULT_WINDOW if max_residues is None else max_residues
    if window <= 0:
        raise ConfigError(f"--window must be positive, got {window}")
    if max_residues is not None and window > max_residues:
        raise ConfigError(f"--window {window} is longer than this model's limit of {max_residues} residues (the "
                          f"longest crop it was trained on); use --window {max_residues} or less")
    return window


def resolve_overlap(window: int, overlap: int | None) -> int:
    if window <= 0:
        raise ConfigError(f"--window must be positive, got {window}")
    return window // 4 if overlap is None else overlap


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    padded_tokens: int = 0  # rows x width summed over batches, specials included
    real_tokens: int = 0
    fp16_fallbacks: int = 0  # batches recomputed in fp32 after an fp16 overflow
    oom_splits: int = 0  # batches halved after running out of accelerator memory


class Embedder:
    """Per-residue arrays from an encoder, one sequence at a time as batches complete.

    ``encoder`` is the model's encoder stack (``pre.model.encoder``); ``layers`` are resolved layer indices
    (0..n). The output of :meth:`run` for a sequence is a float32 array (n_layers, L, d_model).
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer,
        layers: list[int],
        prefix: str | None,
        dtype: torch.dtype,
        device: torch.device,
        max_tokens: int,
        window: int = DEFAULT_WINDOW,
        overlap: int | None = DEFAULT_OVERLAP,
        max_batch: int | None = None,
        copy_if_cast: bool = True,
        int8: bool = False,
    ):
        overlap = resolve_overlap(window, overlap)
        if not 0 <= overlap < window:
            raise ConfigError(f"--overlap must be >= 0 and smaller than --window ({window}), got {overlap}")
        if max_tokens <= 0:
            raise ConfigError(f"--max-tokens must be positive, got {max_tokens}")
        self.encoder = _prepared(encoder, dtype, device, copy_if_cast)
        if int8:
            if copy_if_cast and self.encoder is encoder:  # the caller's model: reuse its quantised copy
                self.encoder = cached_int8(encoder)
            else:
                self.encoder = quantize_int8(self.encoder, copy_first=False)
        self.tokenizer = tokenizer
        self.layers = list(layers)
        self.prefix_ids = tokenizer.prefix_token_ids(prefix)
        self.dtype = dtype
        self.device = device
        self.max_tokens = max_tokens
        self.window, self.overlap = window, overlap
        self.max_batch = max_batch
        self.stats = EngineStats()
        self._overflow: torch.Tensor | None = None
        if dtype == torch.float16:
            for blk in self.encoder.block:
                blk.register_forward_hook(self._make_overflow_hook(FP16_LIMIT))

    @property
    def extra_tokens(self) -> int:
        return len(self.prefix_ids) + 1  # <cls> and/or task token, and the end token

    def plan(self, lengths: list[int]) -> list[list[Unit]]:
        units = [u for i, n in enumerate(lengths) for u in split(i, n, self.window, self.overlap)]
        return plan_batches(units, self.max_tokens, self.extra_tokens, self.max_batch)

    def run(self, sequences: list[np.ndarray], batches: list[list[Unit]] | None = None,
            on_batch=None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(index, array)`` for each sequence (residue-id arrays) as soon as all its units are done.

        ``on_batch(units)`` is called after every batch (for progress bars).
        """
        lengths = [len(s) for s in sequences]
        batches = self.plan(lengths) if batches is None else batches
        remaining: dict[int, int] = {}
        for b in batches:
            for u in b:
                remaining[u.seq] = remaining.get(u.seq, 0) + 1
        partial: dict[int, np.ndarray] = {}
        for batch in batches:
            rows = self._embed_units(batch, sequences)
            for u, arr in zip(batch, rows):
                if u.start == 0 and u.end == lengths[u.seq]:
                    out = arr
                else:  # a window: copy its kept range into the stitched array
                    out = partial.get(u.seq)
                    if out is None:
                        out = partial[u.seq] = np.empty((arr.shape[0], lengths[u.seq], arr.shape[2]), np.float32)
                    out[:, u.keep_start:u.keep_end] = arr[:, u.keep_start - u.start:u.keep_end - u.start]
                remaining[u.seq] -= 1
                if remaining[u.seq] == 0:
                    partial.pop(u.seq, None)
                    yield u.seq, out
            if on_batch is not None:
                on_batch(batch)

    # --- one batch ------------------------------------------------------------------------------------------
    def _embed_units(self, units: list[Unit], sequences: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return self._forward(units, sequences)
        except _OOM:
            if len(units) == 1:
                raise InputError(
                    f"out of memory on a single {units[0].length}-residue row; lower --window (now {self.window})"
                ) from None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.stats.oom_splits += 1
            half = len(units) // 2
            return self._embed_units(units[:half], sequences) + self._embed_units(units[half:], sequences)

    def _forward(self, units: list[Unit], sequences: list[np.ndarray]) -> list[np.ndarray]:
        n_pre = len(self.prefix_ids)
        rows, token_of = token_rows(self.tokenizer, self.prefix_ids, [sequences[u.seq][u.start:u.end] for u in units])
        batch = self.tokenizer.pad(rows)
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        hidden = self._encode(ids, mask)
        if self._overflow is not None and bool(self._overflow):
            hidden = self._recompute_fp32(ids, mask)
        self.stats.batches += 1
        self.stats.rows += len(units)
        self.stats.padded_tokens += ids.numel()
        self.stats.real_tokens += int(mask.sum())
        # (n_layers, B, width, D) -> float32 on the host, one transfer per batch
        stacked = torch.stack([hidden[l] for l in self.layers]).float().cpu().numpy()
        if not np.isfinite(stacked).all():
            worst = max(units, key=lambda u: u.length)
            raise ConfigError(
                f"the model produced non-finite embeddings in {dtype_name(self.dtype)} (batch of {len(units)} rows, "
                f"longest {worst.length} residues); "
                + ("the weights themselves overflow fp16, use --dtype bf16 or fp32" if self.dtype == torch.float16
                   else "the checkpoint may be corrupt")
            )
        # copies, so that a buffered result does not keep the whole batch alive
        if token_of is not None:  # each residue takes the vector of the token holding it
            return [np.ascontiguousarray(stacked[:, i, token_of[i]]) for i in range(len(units))]
        return [np.ascontiguousarray(stacked[:, i, n_pre:n_pre + u.length]) for i, u in enumerate(units)]

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.dtype == torch.float16:
            self._overflow = torch.zeros((), dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            return self.encoder(ids, mask, output_layers=self.layers).hidden_states

    def _recompute_fp32(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        self.stats.fp16_fallbacks += 1
        self.encoder.float()
        try:
            with torch.inference_mode():
                hidden = self.encoder(ids, mask, output_layers=self.layers).hidden_states
        finally:
            self.encoder.half()  # fp16 -> fp32 -> fp16 is exact, so the weights are unchanged
            self._overflow = None
        return hidden

    def _make_overflow_hook(self, limit: float):
        def hook(module, inputs, output):
            h = output.hidden
            if self._overflow is not None and h.dtype == torch.float16:
                # not (max < limit) is also true for NaN; stays on the device, read once per batch
                self._overflow |= ~(h.abs().amax() < limit)
        return hook


def token_rows(tokenizer, prefix_ids, pieces: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The token rows of residue-id ``pieces`` (prefix, residues, end token), and, for a byte-level BPE whose
    tokens hold several residues, each residue's row position per piece (None otherwise: residue i of a piece
    is row position ``len(prefix_ids) + i``)."""
    if getattr(tokenizer, "multi_residue_tokens", False):  # byte-level BPE (GPT-2 family)
        encoded = tokenizer.encode_residue_batch(pieces)
        return [ids for ids, _ in encoded], [index for _, index in encoded]
    return [np.concatenate([prefix_ids, piece, [tokenizer.eos_id]]).astype(np.int64) for piece in pieces], None


def _prepared(encoder: torch.nn.Module, dtype: torch.dtype, device: torch.device, copy_if_cast: bool) -> torch.nn.Module:
    """The encoder in eval mode on ``device`` with its floating weights in ``dtype``; copied first when it would
    otherwise change a model the caller still holds."""
    params = list(encoder.parameters())
    needs_cast = any(p.dtype != dtype or p.device != device for p in params)
    if needs_cast and copy_if_cast:
        encoder = copy.deepcopy(encoder)
    if needs_cast:
        encoder = encoder.to(device=device, dtype=dtype)
    return encoder.eval()


# The int8 copy of each model still in use, with the weights it was made from (see cached_int8).
_INT8_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def _weights_state(module: torch.nn.Module) -> tuple | None:
    """What identifies a module's current weights: each tensor's storage, in-place version, dtype and device
    (an optimiser step or ``load_state_dict`` bumps the version; assigning ``.data`` moves the storage), and
    the quantised engine the copy was packed for. None when a tensor keeps no version (one made under
    ``torch.inference_mode``), since its in-place changes could not be seen."""
    tensors = (*module.parameters(), *module.buffers())
    if any(t.is_inference() for t in tensors):
        return None
    return (torch.backends.quantized.engine, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))


def cached_int8(encoder: torch.nn.Module) -> torch.nn.Module:
    """:func:`quantize_int8` of ``encoder``, made once per model and weights and kept while the model lives.

    Packing the weights is a fixed cost (about 1.5 s for a 12-layer d768 encoder, against ~17 s to embed 8,000
    residues on one AVX2 core; docs/benchmarks.md), so repeated ``protlm.embed`` calls and the test sets of one
    ``evaluate`` run pay it once. The copy is made again whenever a weight has changed since, and every time
    for a model whose tensors keep no version.
    """
    state = _weights_state(encoder)
    hit = _INT8_COPIES.get(encoder)
    if state is not None and hit is not None and hit[0] == state:
        return hit[1]
    quantised = quantize_int8(encoder, copy_first=True)
    if state is not None:
        _INT8_COPIES[encoder] = (state, quantised)
    return quantised


def quantize_int8(encoder: torch.nn.Module, copy_first: bool = True) -> torch.nn.Module:
    """The encoder with its linear layers in dynamic int8 (torch's fbgemm/oneDNN kernels; CPU only).

    Weights are quantised per tensor once; activations are quantised per batch at run time, so the output is
    an approximation of fp32 (measured in docs/benchmarks.md). Norms, attention products and the embedding stay
    fp32. A model with no ``nn.Linear`` to quantise is refused, naming the layer types it has instead.
    """
    import warnings

    from protlm.model.kernels import Linear

    linears = [m for m in encoder.modules() if type(m) in (torch.nn.Linear, Linear)]
    if not linears:
        kinds = sorted({type(m).__name__ for m in encoder.modules() if next(m.parameters(recurse=False), None) is not None})
        raise ConfigError(f"int8: {type(encoder).__name__} has no torch.nn.Linear layers to quantise "
                          f"(its weighted layers are {', '.join(kinds) or 'none'}); use --dtype fp32")
    if any(p.device.type != "cpu" for p in encoder.parameters()):
        raise ConfigError("int8: dynamic quantisation runs on CPUs only")
    if copy_first:
        encoder = copy.deepcopy(encoder)
    for m in encoder.modules():
        if type(m) is Linear:
            m.__class__ = torch.nn.Linear  # the same layer; torch's quantisation maps exact types only
    encoder = encoder.float()
    with warnings.catch_warnings():
        # torch marks its eager quantisation API as deprecated in favour of torchao, but it is still the one
        # with fast x86 int8 kernels for a plain nn.Linear
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True).eval()
