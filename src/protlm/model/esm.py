"""ESM-2, the masked protein LM of Lin et al. (Science 2023), and DPLM, which keeps its architecture.

Architecture only, torch only. Submodule names follow the Hugging Face ``EsmForMaskedLM`` state-dict layout
(``esm.encoder.layer.3.attention.self.query``), so published checkpoints load with no renaming and ours load in
``transformers``.

Numerics that published checkpoints depend on:
- pre-LN blocks (LayerNorm with bias) and a final ``emb_layer_norm_after``; exact (erf) GELU in the FFN;
- rotary position embeddings on queries and keys, applied in fp32 after the query is scaled by d_head**-0.5
  (the scale is folded into the query's fp32 rotary tables: one pass less over q, same values to fp32 rounding);
- token dropout: at inference the <mask> embeddings are zeroed and every embedding is scaled by
  (1 - 0.15 * 0.8) / (1 - observed mask ratio), the correction for ESM-2's training masking;
- the embeddings of padding positions are zeroed;
- an LM head (dense, GELU, LayerNorm, decoder tied to the word embeddings, bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protlm.config import EsmConfig
from protlm.model import kernels
from protlm.model.kernels import Linear
from protlm.model.protocol import BlockOutput, StackOutput, bert_init_, resolve_layers

MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM-2's training: 15% of positions chosen, 80% of those shown as <mask>


def swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((b, a), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin in fp32, back in x's dtype. ``sin`` has its first half negated, so that
    rotate_half(x) * sin is swap_halves(x) * sin_signed: no negation pass. x is not upcast first: type promotion
    computes bf16 x fp32 in fp32, exactly as x.float() would, without the copy."""
    return torch.addcmul(x * cos, swap_halves(x), sin).to(x.dtype)


@dataclass
class EsmContext:
    """What every block of one batch needs: built once per forward and shared by the blocks."""

    mask: Tensor | None  # additive (B, 1, 1, L), None when no position is padding
    rot_q: tuple[Tensor, Tensor] | None  # (cos, signed sin) fp32 (L, 1, d_head) for queries, scale folded in
    rot_k: tuple[Tensor, Tensor] | None  # the same for keys; None with absolute positions


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: EsmConfig):
        super().__init__()
        dim = cfg.hidden_size // cfg.num_attention_heads
        self.dim, self.theta = dim, cfg.rope_theta
        # not in our state dict: a checkpoint's stored copy (old layout: one per layer) is read by the loader
        self.register_buffer("inv_freq", self.default_inv_freq(), persistent=False)

    def _apply(self, fn, recurse=True):
        # A dtype cast of the model (``.to(torch.bfloat16)``) would round the frequencies to 8 bits and shift every
        # angle; they stay fp32 (the tables are fp32 anyway) and only follow the device.
        inv = self.inv_freq
        super()._apply(fn, recurse)
        if not inv.is_meta and self.inv_freq.dtype != inv.dtype:
            self.inv_freq = inv.to(self.inv_freq.device)
        return self

    def default_inv_freq(self) -> Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))

    def tables(self, length: int, device) -> tuple[Tensor, Tensor]:
        """(cos, sin with its first half negated), fp32 (L, 1, d_head), to broadcast over (B, L, H, d_head): see
        :func:`rotate`."""
        freqs = torch.arange(length, device=device, dtype=torch.float)[:, None] * self.inv_freq.float().to(device)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, d_head)
        sin = emb.sin()
        sin[:, : sin.shape[1] // 2].neg_()
        return emb.cos()[:, None, :], sin[:, None, :]


class EsmEmbeddings(nn.Module):
    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                    padding_idx=cfg.pad_token_id)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.emb_layer_norm_before else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        cfg = self.cfg
        h = self.word_embeddings(input_ids)
        if cfg.token_dropout and cfg.mask_token_id is not None:
            is_mask = input_ids == cfg.mask_token_id
            h = h.masked_fill(is_mask[..., None], 0.0)
            lengths = attention_mask.sum(-1) if attention_mask is not None else input_ids.shape[1]
            observed = is_mask.sum(-1).float() / lengths
            h = (h * (1 - MASK_RATIO_TRAIN) / (1 - observed)[:, None, None]).to(h.dtype)
        if cfg.position_embedding_type == "absolute":
            # positions count real tokens from pad_token_id + 1; padding keeps the padding index (as fairseq)
            real = (input_ids != cfg.pad_token_id).int()
            positions = torch.cumsum(real, dim=1) * real + cfg.pad_token_id
            h = h + self.position_embeddings(positions.long())
        if self.layer_norm is not None:
            h = self.layer_norm(h)
        if attention_mask is not None:
            h = (h * attention_mask[..., None]).to(h.dtype)
        return h


class EsmSelfAttention(nn.Module):
    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.d_head = cfg.hidden_size // cfg.num_attention_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, H*D) -> (B, L, H, D), still contiguous
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_head)

    def forward(self, x: Tensor, ctx: EsmContext) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if ctx.rot_q is not None:  # ESM scales q before the rotation: the scale is in rot_q's tables
            # rotated in the projections' own (B, L, H, D) layout: elementwise passes over contiguous memory ran
            # 1.2x faster than over the (B, H, L, D) view
            q, k = rotate(q, *ctx.rot_q), rotate(k, *ctx.rot_k)
        else:
            q = q * self.d_head ** -0.5
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D) for SDPA
        mask = ctx.mask.to(q.dtype) if ctx.mask is not None else None
        out = kernels.attention(q, k, v, mask, scale=1.0, dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, L, H*D)


class _Dense(nn.Module):
    """``dense`` (+ dropout); the residual add stays in the block, where the analyses can see the update."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.dropout = nn.Dropout(dropout)


class EsmAttention(nn.Module):
    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.self = EsmSelfAttention(cfg)
        self.output = _Dense(cfg.hidden_size, cfg.hidden_size, cfg.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class EsmLayer(nn.Module):
    """One pre-LN block: h + attn(LN(h)), then h + ffn(LN(h))."""

    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.attention = EsmAttention(cfg)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size, 0.0)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: Tensor, ctx: EsmContext, enc=None, cross_mask=None, cache=None,
                return_updates: bool = False) -> BlockOutput:
        att = self.attention
        a = att.output.dropout(att.output.dense(att.self(att.LayerNorm(h), ctx)))
        h = h + a
        f = self.output.dropout(self.output.dense(kernels.apply(self.intermediate.dense, self.LayerNorm(h), "gelu")))
        h = h + f
        return BlockOutput(h, a, None, f) if return_updates else BlockOutput(h)


class EsmEncoder(nn.Module):
    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.layer = nn.ModuleList(EsmLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.emb_layer_norm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _ContactHead(nn.Module):
    """The published logistic regression over attention maps. Kept so its weights round-trip; protlm's SDPA path
    returns no attention maps, so it is not run."""

    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.regression = Linear(cfg.num_hidden_layers * cfg.num_attention_heads, 1)


class _Pooler(nn.Module):  # EsmModel's BERT-style pooler (tanh of the first token); kept to round-trip
    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)


class EsmStack(nn.Module):
    """``EsmModel``: embeddings, blocks and final norm; the encoder stack of the model protocol."""

    is_decoder = False

    def __init__(self, cfg: EsmConfig, contact_head: bool = True, pooler: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = EsmEmbeddings(cfg)
        self.rotary_embeddings = RotaryEmbedding(cfg) if cfg.position_embedding_type == "rotary" else None
        self.encoder = EsmEncoder(cfg)
        self.contact_head = _ContactHead(cfg) if contact_head else None
        self.pooler = _Pooler(cfg) if pooler else None

    # --- the stack protocol ----------------------------------------------------------------------------------
    @property
    def block(self) -> nn.ModuleList:
        return self.encoder.layer

    @property
    def n_layers(self) -> int:
        return len(self.encoder.layer)

    def final_layer_norm(self, h: Tensor) -> Tensor:
        return self.encoder.emb_layer_norm_after(h)

    def resolve_layers(self, layers) -> list[int]:
        return resolve_layers(self.n_layers, layers, "encoder")

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.embeddings(input_ids, attention_mask)

    def self_mask(self, attention_mask: Tensor | None, q_len: int, k_len: int, offset: int,
                  dtype: torch.dtype) -> EsmContext:
        mask = None
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :k_len] == 0  # (B, 1, 1, L)
            if bool(pad.any()):
                mask = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, torch.finfo(dtype).min)
        rot_q = rot_k = None
        if self.rotary_embeddings is not None:
            device = attention_mask.device if attention_mask is not None else self.rotary_embeddings.inv_freq.device
            rot_k = self.rotary_embeddings.tables(k_len, device)
            scale = (self.cfg.hidden_size // self.cfg.num_attention_heads) ** -0.5
            rot_q = (rot_k[0] * scale, rot_k[1] * scale)
        return EsmContext(mask, rot_q, rot_k)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None) -> StackOutput:
        wanted = set(self.resolve_layers(output_layers))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embed(input_ids, attention_mask)
        ctx = self.self_mask(attention_mask, h.shape[1], h.shape[1], 0, h.dtype)
        hidden: dict[int, Tensor] = {0: h} if 0 in wanted else {}
        n = self.n_layers
        for i, blk in enumerate(self.encoder.layer):
            h = blk(h, ctx).hidden
            if i + 1 in wanted and i + 1 < n:
                hidden[i + 1] = h
        h = self.final_layer_norm(h)
        if n in wanted:
            hidden[n] = h
        return StackOutput(h, hidden)


class EsmLMHead(nn.Module):
    def __init__(self, cfg: EsmConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.layer_norm(kernels.apply(self.dense, h, "gelu"))) + self.bias


class ESM(nn.Module):
    """``EsmForMaskedLM``; ``encoder_only=True`` drops the LM head (``EsmModel``)."""

    kind = "masked-lm"

    def __init__(self, cfg: EsmConfig, encoder_only: bool = False, contact_head: bool = True, pooler: bool = False):
        super().__init__()
        self.config = cfg
        self.encoder_only = encoder_only
        self.esm = EsmStack(cfg, contact_head=contact_head, pooler=pooler)
        self.lm_head = None if encoder_only else EsmLMHead(cfg)
        self.decoder = None
        if self.lm_head is not None and cfg.tie_word_embeddings:
            self.lm_head.decoder.weight = self.esm.embeddings.word_embeddings.weight
        self.reset_parameters()

    @property
    def encoder(self) -> EsmStack:
        return self.esm

    @property
    def max_residues(self) -> int | None:
        # max_position_embeddings (1026) counts fairseq's position offset of 2 (positions start at pad + 1) and
        # 1024 tokens; ESM-2 saw crops of 1022 residues plus <cls> and <eos>
        return max(1, self.config.max_position_embeddings - 4)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT's init, as transformers gives a new ESM: N(0, initializer_range) weights, zero biases."""
        bert_init_(self, self.config.initializer_range)
        if self.lm_head is not None:
            self.lm_head.bias.zero_()

    def init_buffers(self) -> None:
        """Recompute the buffers that are not in the state dict (after ``to_empty`` of a meta-built model)."""
        rot = self.esm.rotary_embeddings
        if rot is not None and not rot.inv_freq.is_meta:
            rot.inv_freq = rot.default_inv_freq().to(rot.inv_freq.device)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None) -> StackOutput:
        return self.esm(input_ids, attention_mask, output_layers=output_layers)

    def mlm_logits(self, h: Tensor) -> Tensor:
        """Vocabulary logits from the final representation (after ``emb_layer_norm_after``)."""
        if self.lm_head is None:
            from protlm.errors import ConfigError

            raise ConfigError("this ESM model was loaded without its LM head (EsmModel checkpoint or encoder-only)")
        return self.lm_head(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.mlm_logits(self.encode(input_ids, attention_mask).last_hidden_state)

