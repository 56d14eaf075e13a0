"""Cut an encoder after block K: a smaller encoder-only model for cheaper embeddings.

The cut model keeps the embedding, blocks 1..K (T5's position bias lives in block 1; ESM's rotary tables are
per batch) and the final norm, so its output is final_layer_norm(h_K) of the full model: exactly the
representation the probes score at layer K. Heads that read the whole model are dropped: T5's decoder and LM
head; a masked LM's LM head (it was trained on h_N, not h_K) and ESM's contact head (a regression over the
attention maps of every layer, sized by the layer count).
"""

from __future__ import annotations

from protlm.convert import build_model
from protlm.convert.checkpoint import canonical_state
from protlm.errors import ConfigError


def check_cut(n: int, layers: int) -> None:
    """A clear error for a cut point outside 1..n."""
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
        raise ConfigError(f"--truncate-at {layers} is out of range for a {n}-layer encoder (valid: 1..{n})")


def _block_prefix(model) -> str:
    """The state-dict prefix of the encoder's blocks (T5 ``encoder.block``, ESM ``esm.encoder.layer``)."""
    blocks = model.encoder.block
    return next(name for name, mod in model.named_modules() if mod is blocks)


def truncate_encoder(model, layers: int):
    """An encoder-only copy of ``model`` with its first ``layers`` encoder blocks (1 <= layers <= N)."""
    check_cut(model.encoder.n_layers, layers)
    cfg = model.config
    if model.kind == "masked-lm":
        # transformers' EsmConfig and BertConfig name the block count num_hidden_layers; the contact head cannot
        # survive a cut; BERT's MLM head is cls.*
        cfg, drop = cfg.replace(num_hidden_layers=layers), ("lm_head.", "esm.contact_head.", "cls.")
        parts = {"pooler": getattr(model.encoder, "pooler", None) is not None}
        if hasattr(model.encoder, "contact_head"):  # ESM's
            parts["contact_head"] = False
    elif model.kind == "causal-lm":  # GPT-2: the tied LM head goes (it was trained on ln_f(h_N)); wte stays
        cfg, drop, parts = cfg.replace(n_layer=layers), ("lm_head.",), {}
    else:
        cfg = cfg.replace(num_layers=layers, num_decoder_layers=cfg.n_decoder_layers)
        drop, parts = ("decoder.", "lm_head."), {}
    prefix = _block_prefix(model) + "."
    param = next(model.parameters())
    state = {k: v.detach().clone() for k, v in canonical_state(model).items() if not k.startswith(drop)
             and not (k.startswith(prefix) and int(k[len(prefix):].split(".")[0]) >= layers)}
    cut = build_model(cfg, encoder_only=True, state=state, source="truncation", **parts)
    return cut.to(device=param.device, dtype=param.dtype).eval()
