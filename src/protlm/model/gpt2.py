"""GPT-2, the decoder-only LM that ProtGPT2 (Ferruz et al., Nat. Commun. 2022) keeps unchanged.

Architecture only, torch only. Submodule names follow the Hugging Face ``GPT2LMHeadModel`` state-dict layout
(``transformer.h.3.attn.c_attn``), so published checkpoints load with no renaming and ours load in
``transformers``.

Numerics that published checkpoints depend on:
- ``c_attn``, ``c_proj`` and ``c_fc`` are GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out),
  the transpose of ``nn.Linear``'s, so files keep their layout and we compute ``x @ W + b``;
- learned absolute positions (``wpe``, ``n_positions`` rows) counted over real tokens, so a left-padded row sees
  the positions an unpadded one does (what transformers' ``generate`` passes);
- pre-LN blocks, a final ``ln_f``, the tanh GELU (``gelu_new``), queries scaled by d_head**-0.5 (and by
  1/layer for ``scale_attn_by_inverse_layer_idx``);
- an LM head tied to ``wte`` (no bias).

Causal masking and padding go to one SDPA call per block; with neither padding nor a cache the causal flag is
passed instead of a mask (SDPA's fast path). Generation keeps a key/value cache (:class:`GPT2Cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protlm.config import GPT2Config
from protlm.errors import InputError
from protlm.model import kernels
from protlm.model.kernels import Linear
from protlm.model.protocol import BlockOutput, StackOutput, resolve_layers

# GPT-2's activation names -> protlm.model.kernels' (the tanh approximation for the gelu_* names)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight (in, out), y = x @ W + b."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        """``activation(x @ W + b)``: on AVX-512 CPUs at inference, oneDNN's kernel on the transposed view with the
        activation fused (:mod:`protlm.model.kernels`); elsewhere ``F.linear``, which is ``addmm(b, x, W)``."""
        return kernels.linear(x, self.weight.t(), self.bias, activation)


@dataclass
class LayerCache:
    k: Tensor | None = None  # (B, H, L, D)
    v: Tensor | None = None


@dataclass
class GPT2Cache:
    """Keys and values of every block for the tokens seen so far (incremental decoding)."""

    layers: list[LayerCache]

    @property
    def length(self) -> int:
        k = self.layers[0].k if self.layers else None
        return 0 if k is None else k.shape[2]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (rows that finished are dropped from the batch)."""
        for lc in self.layers:
            if lc.k is not None:
                lc.k, lc.v = lc.k.index_select(0, index), lc.v.index_select(0, index)


@dataclass
class GPT2Context:
    """What every block of one batch needs: built once per forward and shared by the blocks."""

    mask: Tensor | None  # additive (B or 1, 1, Lq, Lk): causality and padding; None with ``causal`` or no need
    causal: bool  # True: SDPA's is_causal (square, no padding, no cache)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.n_head
        self.d_head = cfg.n_embd // cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        self.dropout_p = cfg.attn_pdrop
        scale = self.d_head ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, H*D) -> (B, H, L, D)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: Tensor, ctx: GPT2Context, cache: LayerCache | None = None) -> Tensor:
        q, k, v = (self._heads(t) for t in self.c_attn(x).split(x.shape[-1], dim=2))
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v = k, v
        mask = ctx.mask.to(q.dtype) if ctx.mask is not None else None
        out = kernels.attention(q, k, v, mask, scale=self.scale, is_causal=ctx.causal,
                                dropout_p=self.dropout_p if self.training else 0.0)
        return self.resid_dropout(self.c_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = Conv1D(cfg.n_embd, inner)
        self.c_proj = Conv1D(inner, cfg.n_embd)
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        fc = self.c_fc  # a LoRA wrapper runs its own forward, then the activation
        h = fc(x, self.act) if type(fc) is Conv1D else kernels.ACTIVATIONS[self.act][2](fc(x))
        return self.dropout(self.c_proj(h))


class GPT2Block(nn.Module):
    """One pre-LN block: h + attn(ln_1(h)), then h + mlp(ln_2(h))."""

    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, h: Tensor, ctx: GPT2Context, enc=None, cross_mask=None, cache: LayerCache | None = None,
                return_updates: bool = False) -> BlockOutput:
        a = self.attn(self.ln_1(h), ctx, cache)
        h = h + a
        f = self.mlp(self.ln_2(h))
        h = h + f
        return BlockOutput(h, a, None, f) if return_updates else BlockOutput(h)


class GPT2Stack(nn.Module):
    """``GPT2Model``: embeddings, blocks and ``ln_f``; the ``encoder`` stack of the model protocol.

    ``is_decoder`` is False because the stack attends to no encoder (the block runner builds no cross mask); its
    causality lives in :meth:`self_mask`.
    """

    is_decoder = False

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    # --- the stack protocol ----------------------------------------------------------------------------------
    @property
    def block(self) -> nn.ModuleList:
        return self.h

    @property
    def n_layers(self) -> int:
        return len(self.h)

    def final_layer_norm(self, h: Tensor) -> Tensor:
        return self.ln_f(h)

    def resolve_layers(self, layers) -> list[int]:
        return resolve_layers(self.n_layers, layers, "decoder-only stack")

    def positions(self, attention_mask: Tensor | None, q_len: int, offset: int, device) -> Tensor:
        """Position of each new token: real tokens counted from 0, padding at 0 (its output is never read)."""
        if attention_mask is None:
            return torch.arange(offset, offset + q_len, device=device)[None, :]
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp_min(0)[:, offset:offset + q_len]

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None, offset: int = 0) -> Tensor:
        pos = self.positions(attention_mask, input_ids.shape[1], offset, input_ids.device)
        longest = int(pos.max()) + 1 if pos.numel() else 0  # real tokens of the longest row (padding not counted)
        if longest > self.cfg.n_positions:
            raise InputError(f"{longest} tokens exceed this GPT-2's {self.cfg.n_positions} learned positions "
                             "(n_positions); shorten the input or use windows")
        return self.drop(self.wte(input_ids) + self.wpe(pos))

    def self_mask(self, attention_mask: Tensor | None, q_len: int, k_len: int, offset: int,
                  dtype: torch.dtype) -> GPT2Context:
        padded = attention_mask is not None and not bool(attention_mask[:, :k_len].all())
        if not padded and q_len == k_len and offset == 0:
            return GPT2Context(None, q_len > 1)
        if not padded and q_len == 1:  # one new token sees every cached one
            return GPT2Context(None, False)
        device = attention_mask.device if attention_mask is not None else self.wte.weight.device
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        blocked = torch.arange(k_len, device=device)[None, :] > q_pos  # (Lq, Lk)
        blocked = blocked[None, None]
        if padded:
            blocked = blocked | (attention_mask[:, None, None, :k_len] == 0)
        neg = torch.finfo(dtype).min
        return GPT2Context(torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, neg), False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None,
                cache: GPT2Cache | None = None) -> StackOutput:
        """``attention_mask`` covers the cached tokens and the new ones (B, offset + L)."""
        wanted = set(self.resolve_layers(output_layers))
        q_len = input_ids.shape[1]
        offset = cache.length if cache is not None else 0
        h = self.embed(input_ids, attention_mask, offset)
        ctx = self.self_mask(attention_mask, q_len, offset + q_len, offset, h.dtype)
        hidden: dict[int, Tensor] = {0: h} if 0 in wanted else {}
        n = self.n_layers
        for i, blk in enumerate(self.h):
            h = blk(h, ctx, cache=cache.layers[i] if cache is not None else None).hidden
            if i + 1 in wanted and i + 1 < n:
                hidden[i + 1] = h
        h = self.ln_f(h)
        if n in wanted:
            hidden[n] = h
        return StackOutput(h, hidden, cache)


class GPT2(nn.Module):
    """``GPT2LMHeadModel``; ``encoder_only=True`` drops the LM head (``GPT2Model``, embeddings only)."""

    kind = "causal-lm"

    def __init__(self, cfg: GPT2Config, encoder_only: bool = False):
        super().__init__()
        self.config = cfg
        self.encoder_only = encoder_only
        self.transformer = GPT2Stack(cfg)
        self.lm_head = None if encoder_only else Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.decoder = None
        if self.lm_head is not None and cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()

    @property
    def encoder(self) -> GPT2Stack:
        return self.transformer

    @property
    def max_residues(self) -> int:
        """The longest protein whose tokens surely fit ``n_positions`` under ProtGPT2's input convention (see
        :mod:`protlm.tokenizer.bpe`): one token per residue at worst, a line break after the opening
        ``<|endoftext|>`` and after each line of 60 residues, and the closing ``<|endoftext|>``. Typical proteins
        take about a quarter of that many tokens."""
        n = self.config.n_positions - 3
        residues = n * 60 // 61
        while residues + -(-residues // 60) > n:
            residues -= 1
        return max(1, residues)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's init as transformers gives a new model: N(0, initializer_range), the output projections scaled
        by 1/sqrt(2 * n_layer), zero biases, unit norms."""
        std = self.config.initializer_range
        for name, mod in self.named_modules():
            if isinstance(mod, (Conv1D, nn.Linear, nn.Embedding)):
                mod.weight.normal_(0, std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, std / (2 * self.config.n_layer) ** 0.5)

    def new_cache(self) -> GPT2Cache:
        return GPT2Cache([LayerCache() for _ in range(self.transformer.n_layers)])

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None,
               cache: GPT2Cache | None = None) -> StackOutput:
        return self.transformer(input_ids, attention_mask, output_layers=output_layers, cache=cache)

    def lm_logits(self, h: Tensor) -> Tensor:
        """Next-token logits from the final representation (after ``ln_f``)."""
        if self.lm_head is None:
            from protlm.errors import ConfigError

            raise ConfigError("this GPT-2 model was loaded without its LM head (GPT2Model checkpoint or encoder-only)")
        return self.lm_head(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm_logits(self.encode(input_ids, attention_mask).last_hidden_state)
