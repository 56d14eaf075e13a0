"""The model protocol: what every first-class family gives the workflows.

A family is one file in :mod:`protlm.model` (``t5.py``, ``esm.py``). Its model exposes:

- ``config``: its typed config (``protlm_family`` names the published family);
- ``kind``: ``"encoder-decoder"`` (T5: outputs come from a decoder that attends to the encoder),
  ``"masked-lm"`` (ESM-2, DPLM: outputs come from an LM head on the encoder's own positions) or
  ``"causal-lm"`` (GPT-2, ProtGPT2: one causal stack, exposed as ``encoder``, whose LM head predicts the next
  token);
- ``encoder``: a stack (below); ``decoder``: a stack or None; ``encoder_only``;
- ``max_residues``: the longest protein one window may hold (None: no trained limit);
- for ``masked-lm``: ``mlm_logits(h)`` maps the final representation (after the final norm) to vocabulary logits;
  for ``encoder-decoder``: ``decode(...)`` and ``lm_logits(h)``; for ``causal-lm``: ``lm_logits(h)`` (next-token
  logits), ``new_cache()`` and ``encode(ids, mask, cache=)`` for incremental decoding.

A stack is run whole (``stack(input_ids, attention_mask, output_layers=...)`` -> :class:`StackOutput`) or block by
block (:class:`protlm.analysis.blocks.StackRunner`) through these parts:

- ``embed(input_ids, attention_mask)``: the stream entering block 1 (h[0]);
- ``self_mask(attention_mask, q_len, k_len, offset, dtype)``: what every block of one batch needs (T5: position
  bias plus padding as one additive mask; ESM: the padding mask and the rotary tables; GPT-2: causality plus
  padding), built once per batch;
- ``block``: the list of blocks; ``block[i](h, self_mask, enc, cross_mask, cache, return_updates=)`` ->
  :class:`BlockOutput`;
- ``final_layer_norm(h)``: the norm the last block's output goes through;
- ``n_layers``, ``is_decoder``, ``resolve_layers(layers)``.

Layer numbering is the same for every family: 0 is the embedding output, l is the residual stream after block l,
and N (the last, also -1) is the output after the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from protlm.errors import ConfigError


@dataclass
class BlockOutput:
    """A block's output plus, when asked for, the update each sublayer added to the residual stream."""

    hidden: Tensor  # (B, L, d_model)
    attn_update: Tensor | None = None
    cross_update: Tensor | None = None
    ffn_update: Tensor | None = None


@dataclass
class StackOutput:
    last_hidden_state: Tensor  # (B, L, d_model), after the final norm
    hidden_states: dict[int, Tensor] = field(default_factory=dict)  # layer index -> (B, L, d_model)
    cache: object | None = None  # a decoder's key/value cache, when one was passed


def resolve_layers(n: int, layers, what: str = "encoder") -> list[int]:
    """Normalise requested layer indices of an ``n``-block stack (negative counts from the end; "all"; None)."""
    if layers is None:
        return []
    if layers == "all":
        return list(range(n + 1))
    out = []
    for l in layers:
        if not -(n + 1) <= l <= n:
            raise ConfigError(f"layer {l} is out of range for a {n}-layer {what} (valid: 0..{n} or -1..-{n + 1})")
        out.append(l % (n + 1))
    return sorted(set(out))


@torch.no_grad()
def bert_init_(model: nn.Module, std: float) -> None:
    """BERT's init, which transformers gives every new BERT-style model (ESM, BERT): N(0, std) weights, zero biases,
    zero padding rows, unit LayerNorms."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.weight.normal_(0, std)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            mod.weight.normal_(0, std)
            if mod.padding_idx is not None:
                mod.weight[mod.padding_idx].zero_()
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.fill_(1.0)
            mod.bias.zero_()
