"""BERT, the post-LN masked LM of ProtBERT (Rostlab/prot_bert, Elnaggar et al. 2021) and ProtBERT-BFD.

Architecture only, torch only. Submodule names follow the Hugging Face ``BertForMaskedLM`` state-dict layout
(``bert.encoder.layer.3.attention.self.query``, ``cls.predictions.transform.dense``), so published checkpoints load
with no renaming and ours load in ``transformers``.

Numerics that published checkpoints depend on:
- post-LN blocks: h = LN(h + attn(h)), then h = LN(h + ffn(h)); there is no norm after the last block, so the
  stack's ``final_layer_norm`` is the identity and layer N of the model protocol is the last block's output;
- embeddings: word + learned absolute position (0, 1, ... from the first token; right padding leaves every real
  token's position as is) + token type 0, then LayerNorm;
- the FFN activation ``hidden_act`` (ProtBERT: exact erf GELU), also used by the MLM head's transform;
- an MLM head (dense, activation, LayerNorm, decoder tied to the word embeddings, bias).

For the depth analyses a block reports the change each sublayer made to the stream: with post-LN that is the
difference across the sublayer (norm included), so ``h_out = h_in + attn_update + ffn_update`` holds exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protlm.config import BertConfig
from protlm.model import kernels
from protlm.model.kernels import Linear
from protlm.model.protocol import BlockOutput, StackOutput, bert_init_, resolve_layers


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# BertConfig's activations that protlm.model.kernels fuses into the matmul, by kernels' names
_FUSED = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}


def dense_act(dense: nn.Module, x: Tensor, name: str) -> Tensor:
    """transformers' ACT2FN[name](dense(x)) for the activations BertConfig allows. gelu_new is the tanh formula
    written out, as transformers computes it (F.gelu's tanh form differs by ulps), so it is not fused."""
    if name == "gelu_new":
        return gelu_tanh(dense(x))
    return kernels.apply(dense, x, _FUSED[name])


@dataclass
class BertContext:
    """What every block of one batch needs: the additive padding mask, None when no position is padding."""

    mask: Tensor | None  # (B, 1, 1, L)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            from protlm.errors import InputError

            raise InputError(f"an input of {length} tokens is longer than this BERT's {self.position_embeddings.num_embeddings} "
                             "learned positions (max_position_embeddings); use a shorter window")
        # one segment (token type 0 everywhere); the sum in transformers' order, so fp32 rounding matches too
        h = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        h = h + self.position_embeddings.weight[:length]
        return self.dropout(self.LayerNorm(h))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.d_head = cfg.hidden_size // cfg.num_attention_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, H*D) -> (B, H, L, D)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: Tensor, ctx: BertContext) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        mask = ctx.mask.to(q.dtype) if ctx.mask is not None else None
        out = kernels.attention(q, k, v, mask, dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, L, H*D)


class _DenseNorm(nn.Module):
    """``dense`` + dropout, then ``LayerNorm`` of the residual sum: BERT's SelfOutput and Output."""

    def __init__(self, d_in: int, d_out: int, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)


class BertLayer(nn.Module):
    """One post-LN block: h = LN(h + attn(h)), then h = LN(h + ffn(h))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg)
        self.act = cfg.hidden_act

    def forward(self, h: Tensor, ctx: BertContext, enc=None, cross_mask=None, cache=None,
                return_updates: bool = False) -> BlockOutput:
        mid = self.attention.output(self.attention.self(h, ctx), h)
        out = self.output(dense_act(self.intermediate.dense, mid, self.act), mid)
        return BlockOutput(out, mid - h, None, out - mid) if return_updates else BlockOutput(out)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class _Pooler(nn.Module):  # BertModel's pooler (tanh of the first token's dense); kept so its weights round-trip
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)


class BertStack(nn.Module):
    """``BertModel``: embeddings and blocks; the encoder stack of the model protocol."""

    is_decoder = False

    def __init__(self, cfg: BertConfig, pooler: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = _Pooler(cfg) if pooler else None

    # --- the stack protocol ----------------------------------------------------------------------------------
    @property
    def block(self) -> nn.ModuleList:
        return self.encoder.layer

    @property
    def n_layers(self) -> int:
        return len(self.encoder.layer)

    def final_layer_norm(self, h: Tensor) -> Tensor:
        return h  # post-LN: every block ends in its own norm, and nothing follows the last one

    def resolve_layers(self, layers) -> list[int]:
        return resolve_layers(self.n_layers, layers, "encoder")

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.embeddings(input_ids)

    def self_mask(self, attention_mask: Tensor | None, q_len: int, k_len: int, offset: int,
                  dtype: torch.dtype) -> BertContext:
        if attention_mask is None:
            return BertContext(None)
        pad = attention_mask[:, None, None, :k_len] == 0  # (B, 1, 1, L)
        if not bool(pad.any()):
            return BertContext(None)
        return BertContext(torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, torch.finfo(dtype).min))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None) -> StackOutput:
        wanted = set(self.resolve_layers(output_layers))
        h = self.embed(input_ids, attention_mask)
        ctx = self.self_mask(attention_mask, h.shape[1], h.shape[1], 0, h.dtype)
        hidden: dict[int, Tensor] = {0: h} if 0 in wanted else {}
        for i, blk in enumerate(self.encoder.layer):
            h = blk(h, ctx).hidden
            if i + 1 in wanted:
                hidden[i + 1] = h
        return StackOutput(h, hidden)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = cfg.hidden_act

    def forward(self, h: Tensor) -> Tensor:
        return self.LayerNorm(dense_act(self.dense, h, self.act))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # its bias is ``bias`` (below)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        # the bias added by the matmul itself, as transformers' decoder
        return kernels.linear(self.transform(h), self.decoder.weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class BERT(nn.Module):
    """``BertForMaskedLM``; ``encoder_only=True`` drops the MLM head (``BertModel``)."""

    kind = "masked-lm"

    def __init__(self, cfg: BertConfig, encoder_only: bool = False, pooler: bool = False):
        super().__init__()
        self.config = cfg
        self.encoder_only = encoder_only
        self.bert = BertStack(cfg, pooler=pooler)
        self.cls = None if encoder_only else BertOnlyMLMHead(cfg)
        self.decoder = None
        if self.cls is not None and cfg.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.reset_parameters()

    @property
    def encoder(self) -> BertStack:
        return self.bert

    @property
    def lm_head(self) -> BertOnlyMLMHead | None:  # what the loader and truncation test for a head
        return self.cls

    @property
    def max_residues(self) -> int | None:
        return max(1, self.config.max_position_embeddings - 2)  # [CLS] and [SEP] take a position each

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT's init, as transformers gives a new model: N(0, initializer_range) weights, zero biases."""
        bert_init_(self, self.config.initializer_range)
        if self.cls is not None:
            self.cls.predictions.bias.zero_()

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None) -> StackOutput:
        return self.bert(input_ids, attention_mask, output_layers=output_layers)

    def mlm_logits(self, h: Tensor) -> Tensor:
        """Vocabulary logits from the last block's output."""
        if self.cls is None:
            from protlm.errors import ConfigError

            raise ConfigError("this BERT model was loaded without its MLM head (BertModel checkpoint or encoder-only)")
        return self.cls.predictions(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.mlm_logits(self.encode(input_ids, attention_mask).last_hidden_state)
