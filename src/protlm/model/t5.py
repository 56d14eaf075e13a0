"""The T5 encoder-decoder used by Ankh, Ankh2, Ankh3 and ProtT5.

Architecture only: no data, no parallelism, no ``transformers``. Submodule names follow the Hugging Face
state-dict layout (``encoder.block.3.layer.1.DenseReluDense.wi_0``) so that published checkpoints load with no
renaming and our checkpoints load in ``transformers``.

Numerics that published checkpoints depend on:
- pre-norm residual blocks with RMS norm (no mean subtraction, no bias), variance computed in fp32;
- attention scores are NOT scaled by 1/sqrt(d_kv) (the scale is folded into the init);
- a learned relative position bias, owned by the first block of each stack, computed once per forward and
  shared by every layer of that stack; bidirectional buckets in the encoder, causal in the decoder; none in
  cross-attention;
- with tied embeddings (T5 v1.0, ProtT5) the decoder output is scaled by d_model**-0.5 before the LM head
  (``config.rescale_head``; transformers 5 can also tie without the rescale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protlm.config import T5Config
from protlm.model import kernels
from protlm.model.kernels import Linear
from protlm.model.protocol import BlockOutput, StackOutput, resolve_layers


# --- building blocks -----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            # One fused kernel; it accumulates the variance in fp32 for half types, which T5 needs (its
            # activations overflow fp16 when squared).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Mixed dtypes (autocast, or half weights on an fp32 stream): T5's rule, normalise in fp32, then cast
        # to the weight's dtype if that is half.
        var = x.float().pow(2).mean(-1, keepdim=True)
        y = x.float() * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


class FeedForward(nn.Module):
    """T5 FFN: ``wo(act(wi x))`` or, gated, ``wo(act(wi_0 x) * wi_1 x)``."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.is_gated
        if self.gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        # "gelu" in T5 checkpoints is gelu_new, the tanh approximation.
        self.act = {"relu": "relu", "silu": "silu", "gelu": "gelu_tanh"}[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:  # the activation and the gate fused into the matmuls at inference (protlm.model.kernels)
            h = kernels.gated(self.wi_0, self.wi_1, x, self.act)
        else:
            h = kernels.apply(self.wi, x, self.act)
        # The stream may be fp32 under half weights (T5 keeps some paths in fp32); a dynamically quantised wo
        # (int8 embedding) takes fp32 and has no weight tensor to read a dtype from.
        weight = getattr(self.wo, "weight", None)
        return self.wo(self.dropout(h).to(weight.dtype if isinstance(weight, Tensor) else x.dtype))


class Attention(nn.Module):
    """Multi-head attention through SDPA, with the position bias and padding passed as one additive mask."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        self.dropout_p = cfg.dropout_rate
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, H*D) -> (B, H, L, D)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def forward(
        self,
        x: Tensor,  # (B, Lq, d_model)
        mask: Tensor | None,  # additive, broadcastable to (B, H, Lq, Lk)
        kv_input: Tensor | None = None,  # cross-attention source (B, Lk, d_model)
        cache: "LayerCache | None" = None,
        cross: bool = False,
    ) -> Tensor:
        q = self._heads(self.q(x))
        if cross and cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            src = x if kv_input is None else kv_input
            k, v = self._heads(self.k(src)), self._heads(self.v(src))
            if cache is not None:
                if cross:
                    cache.cross_k, cache.cross_v = k, v
                else:
                    if cache.self_k is not None:
                        k = torch.cat([cache.self_k, k], dim=2)
                        v = torch.cat([cache.self_v, v], dim=2)
                    cache.self_k, cache.self_v = k, v
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        if mask is not None and mask.requires_grad and q.device.type == "cpu":
            # Training the position bias on CPU: no fused SDPA kernel returns the mask's gradient, so SDPA
            # falls back to its reference path, which also upcasts bf16 to fp32. Plain matmul-softmax-matmul
            # in the input dtype is the same computation and ~3x faster under bf16 autocast
            # (bench/train_step.py; gradients checked against transformers in tests/test_train.py).
            scores = torch.matmul(q, k.transpose(-1, -2)) + mask  # (B, H, Lq, Lk)
            probs = F.dropout(scores.softmax(-1), self.dropout_p, self.training)
            out = torch.matmul(probs, v)  # (B, H, Lq, D)
        else:
            out = kernels.attention(q, k, v, mask, scale=1.0,
                                    dropout_p=self.dropout_p if self.training else 0.0)  # (B, H, Lq, D)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.n_heads * self.d_kv)
        return self.o(out)


class _SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, has_relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)


class _CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = Attention(cfg, has_relative_bias=False)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)


class _FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = FeedForward(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)


class Block(nn.Module):
    """One pre-norm residual block: self-attention, (cross-attention), feed-forward."""

    def __init__(self, cfg: T5Config, is_decoder: bool, has_relative_bias: bool):
        super().__init__()
        self.is_decoder = is_decoder
        layers: list[nn.Module] = [_SelfAttentionLayer(cfg, has_relative_bias)]
        if is_decoder:
            layers.append(_CrossAttentionLayer(cfg))
        layers.append(_FeedForwardLayer(cfg))
        self.layer = nn.ModuleList(layers)

    def forward(
        self,
        h: Tensor,
        self_mask: Tensor | None,
        enc: Tensor | None = None,
        cross_mask: Tensor | None = None,
        cache: "LayerCache | None" = None,
        return_updates: bool = False,
    ) -> BlockOutput:
        sa = self.layer[0]
        a = sa.dropout(sa.SelfAttention(sa.layer_norm(h), self_mask, cache=cache))
        h = _clamp_fp16(h + a)
        c = None
        if self.is_decoder:
            ca = self.layer[1]
            c = ca.dropout(ca.EncDecAttention(ca.layer_norm(h), cross_mask, kv_input=enc, cache=cache, cross=True))
            h = _clamp_fp16(h + c)
        ff = self.layer[-1]
        f = ff.dropout(ff.DenseReluDense(ff.layer_norm(h)))
        h = _clamp_fp16(h + f)
        if return_updates:
            return BlockOutput(h, a, c, f)
        return BlockOutput(h)


# T5 activations grow past the fp16 range in deep stacks; clamping the residual stream here keeps fp16
# inference finite (the embedder watches for streams that reach it).
FP16_LIMIT = torch.finfo(torch.float16).max - 1000


def _clamp_fp16(h: Tensor) -> Tensor:
    return h.clamp(-FP16_LIMIT, FP16_LIMIT) if h.dtype == torch.float16 else h


# --- position bias -------------------------------------------------------------------------------------------
def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """Map key-minus-query offsets to T5's buckets: exact for small offsets, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


# --- stacks --------------------------------------------------------------------------------------------------
@dataclass
class LayerCache:
    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None


@dataclass
class KVCache:
    """Key/value cache for incremental decoding: one entry per decoder layer."""

    layers: list[LayerCache]

    @property
    def length(self) -> int:
        k = self.layers[0].self_k
        return 0 if k is None else k.shape[2]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): every cached tensor is indexed along dim 0."""
        for lc in self.layers:
            for name in ("self_k", "self_v", "cross_k", "cross_v"):
                t = getattr(lc, name)
                if t is not None:
                    setattr(lc, name, t.index_select(0, index))


class Stack(nn.Module):
    """The encoder or the decoder: embedding lookup, blocks, final RMS norm.

    Layer numbering for ``output_layers``: 0 is the embedding output, l in 1..N is the residual stream after
    block l, except that N (the last) is after the final norm, as in ``transformers``' hidden_states.
    """

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding, is_decoder: bool, n_layers: int):
        super().__init__()
        self.cfg = cfg
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(Block(cfg, is_decoder, has_relative_bias=(i == 0)) for i in range(n_layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    @property
    def n_layers(self) -> int:
        return len(self.block)

    def _bias(self, q_len: int, k_len: int, offset: int) -> Tensor:
        # (1, H, Lq, Lk), contiguous, in the table's dtype. The bias depends only on k - q, so it is looked up
        # once per distinct offset (Lq + Lk - 1 of them, not Lq * Lk: no (L, L) bucket tensors) and spread into
        # the Toeplitz matrix by one copy. Row i needs offsets -(offset + i) .. k_len - 1 - (offset + i); unfold
        # yields rows with increasing starts, i.e. the query rows in reverse, hence the flip.
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, H)
        rel = torch.arange(k_len + q_len - 1, device=table.device) - (offset + q_len - 1)
        buckets = relative_position_bucket(
            rel, not self.is_decoder, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance,
        )
        per_offset = F.embedding(buckets, table).t().contiguous()  # (H, Lq + Lk - 1)
        return per_offset.unfold(1, k_len, 1).flip(1).unsqueeze(0)  # (1, H, Lq, Lk), contiguous

    def self_mask(self, attention_mask: Tensor | None, q_len: int, k_len: int, offset: int, dtype: torch.dtype) -> Tensor:
        """Position bias plus padding (and causality in the decoder) as one additive mask.

        (1, H, Lq, Lk) when no key is padding (SDPA broadcasts it over the batch), else (B, H, Lq, Lk). Built
        once per stack in the compute dtype and shared by every layer.
        """
        bias = self._bias(q_len, k_len, offset).to(dtype)
        neg = torch.finfo(dtype).min
        if self.is_decoder:
            q_pos = torch.arange(offset, offset + q_len, device=bias.device)[:, None]
            k_pos = torch.arange(k_len, device=bias.device)[None, :]
            bias = bias.masked_fill(k_pos > q_pos, neg)
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :k_len] == 0  # (B, 1, 1, Lk)
            if bool(pad.any()):
                bias = bias.masked_fill(pad, neg)
        return bias

    @staticmethod
    def cross_mask(encoder_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, 1, 1, Le) additive mask of the decoder's cross-attention: 0 on encoder tokens, -inf-like on padding."""
        return torch.zeros(encoder_mask.shape, dtype=dtype, device=encoder_mask.device).masked_fill(
            encoder_mask == 0, torch.finfo(dtype).min)[:, None, None, :]

    def resolve_layers(self, layers) -> list[int]:
        """Normalise requested layer indices (negative counts from the end); out of range is an error."""
        return resolve_layers(self.n_layers, layers, "decoder" if self.is_decoder else "encoder")

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """h[0]: the token embeddings (T5 adds no position or padding information here)."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: Tensor,  # (B, L)
        attention_mask: Tensor | None = None,  # (B, L) 1 = token, 0 = padding
        encoder_hidden: Tensor | None = None,  # decoder only: (B, Le, d_model)
        encoder_mask: Tensor | None = None,  # decoder only: (B, Le)
        cache: KVCache | None = None,
        output_layers=None,  # iterable of layer indices, or "all"
        inputs_embeds: Tensor | None = None,
    ) -> StackOutput:
        wanted = set(self.resolve_layers(output_layers))
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.dropout(h)
        dtype = h.dtype
        q_len = h.shape[1]
        offset = cache.length if cache is not None else 0
        # With a cache, attention_mask (if any) covers all keys so far: cached ones plus the new ones.
        mask = self.self_mask(attention_mask, q_len, offset + q_len, offset, dtype)
        cross_mask = self.cross_mask(encoder_mask, dtype) if self.is_decoder and encoder_mask is not None else None
        hidden: dict[int, Tensor] = {}
        if 0 in wanted:
            hidden[0] = h
        n = self.n_layers
        for i, blk in enumerate(self.block):
            lc = cache.layers[i] if cache is not None else None
            h = blk(h, mask, encoder_hidden, cross_mask, lc).hidden
            if i + 1 in wanted and i + 1 < n:
                hidden[i + 1] = h
        h = self.dropout(self.final_layer_norm(h))
        if n in wanted:
            hidden[n] = h
        return StackOutput(h, hidden, cache)


# --- the model -----------------------------------------------------------------------------------------------
@dataclass
class Seq2SeqOutput:
    logits: Tensor  # (B, Ld, vocab)
    loss: Tensor | None = None
    encoder: StackOutput | None = None
    decoder: StackOutput | None = None


class T5(nn.Module):
    """T5 encoder-decoder; ``encoder_only=True`` (or a config with 0 decoder layers) gives a T5 encoder."""

    kind = "encoder-decoder"
    max_residues = None  # relative positions: no trained length limit

    def __init__(self, cfg: T5Config, encoder_only: bool = False):
        super().__init__()
        self.config = cfg
        self.encoder_only = encoder_only or cfg.n_decoder_layers == 0
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, self.shared, is_decoder=False, n_layers=cfg.num_layers)
        if not self.encoder_only:
            self.decoder = Stack(cfg, self.shared, is_decoder=True, n_layers=cfg.n_decoder_layers)
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.shared.weight
        else:
            self.decoder = None
            self.lm_head = None
        self.reset_parameters()

    # T5's Mesh-TensorFlow init: the 1/sqrt(d_kv) attention scale lives in the q init.
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg, f = self.config, self.config.initializer_factor
        inner = cfg.num_heads * cfg.d_kv
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(f)
            elif isinstance(mod, Attention):
                mod.q.weight.normal_(0, f * (cfg.d_model * cfg.d_kv) ** -0.5)
                mod.k.weight.normal_(0, f * cfg.d_model ** -0.5)
                mod.v.weight.normal_(0, f * cfg.d_model ** -0.5)
                mod.o.weight.normal_(0, f * inner ** -0.5)
                if hasattr(mod, "relative_attention_bias"):
                    mod.relative_attention_bias.weight.normal_(0, f * cfg.d_model ** -0.5)
            elif isinstance(mod, FeedForward):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(mod, name):
                        getattr(mod, name).weight.normal_(0, f * cfg.d_model ** -0.5)
                mod.wo.weight.normal_(0, f * cfg.d_ff ** -0.5)
        self.shared.weight.normal_(0, f * 1.0)
        if self.lm_head is not None and not cfg.tie_word_embeddings:
            self.lm_head.weight.normal_(0, f * 1.0)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None) -> StackOutput:
        return self.encoder(input_ids, attention_mask, output_layers=output_layers)

    def new_cache(self) -> KVCache:
        self._require_decoder()
        return KVCache([LayerCache() for _ in range(self.decoder.n_layers)])

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor,
        encoder_mask: Tensor | None = None,
        decoder_mask: Tensor | None = None,
        cache: KVCache | None = None,
        output_layers=None,
    ) -> StackOutput:
        self._require_decoder()
        return self.decoder(decoder_input_ids, decoder_mask, encoder_hidden, encoder_mask, cache, output_layers)

    def lm_logits(self, decoder_hidden: Tensor) -> Tensor:
        self._require_decoder()
        if self.config.rescale_head:
            decoder_hidden = decoder_hidden * self.config.d_model ** -0.5
        return self.lm_head(decoder_hidden)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Teacher-forcing decoder input: start token, then labels[:-1]; ignored (-100) labels become padding."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,  # (B, Ld), -100 = ignored
        decoder_mask: Tensor | None = None,
    ) -> Seq2SeqOutput:
        self._require_decoder()
        enc = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        dec = self.decode(decoder_input_ids, enc.last_hidden_state, attention_mask, decoder_mask)
        logits = self.lm_logits(dec.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqOutput(logits, loss, enc, dec)

    def _require_decoder(self) -> None:
        if self.decoder is None:
            from protlm.errors import ConfigError

            raise ConfigError("this model is encoder-only (T5EncoderModel checkpoint); it has no decoder")
