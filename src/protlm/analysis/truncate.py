"""Cut an encoder after block K: a smaller encoder-only model for cheaper embeddings.

The cut model keeps the embedding, blocks 1..K (the position bias lives in block 1) and the final norm, so its
output is final_layer_norm(h_K) of the full model: exactly the representation the probes score at layer K.
"""

from __future__ import annotations

from protlm.convert import build_model
from protlm.convert.checkpoint import canonical_state
from protlm.errors import ConfigError
from protlm.model.t5 import T5


def check_cut(n: int, layers: int) -> None:
    """A clear error for a cut point outside 1..n."""
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
        raise ConfigError(f"--truncate-at {layers} is out of range for a {n}-layer encoder (valid: 1..{n})")


def truncate_encoder(model: T5, layers: int) -> T5:
    """An encoder-only copy of ``model`` with its first ``layers`` encoder blocks (1 <= layers <= N)."""
    check_cut(model.encoder.n_layers, layers)
    cfg = model.config.replace(num_layers=layers, num_decoder_layers=model.config.n_decoder_layers)
    param = next(model.parameters())
    keep = canonical_state(model)
    state = {k: v.detach().clone() for k, v in keep.items() if not k.startswith(("decoder.", "lm_head."))
             and not (k.startswith("encoder.block.") and int(k.split(".")[2]) >= layers)}
    cut = build_model(cfg, encoder_only=True, state=state, source="truncation")
    return cut.to(device=param.device, dtype=param.dtype).eval()
