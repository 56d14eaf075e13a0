"""Cut an encoder after block K: a smaller encoder-only model for cheaper embeddings.

The cut model keeps the embedding, blocks 1..K (the position bias lives in block 1) and the final norm, so its
output is final_layer_norm(h_K) of the full model: exactly the representation the probes score at layer K.
"""

from __future__ import annotations

import torch

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
    with torch.device("meta"):
        cut = T5(cfg, encoder_only=True)
    source = model.state_dict()
    state = {k: source[k].detach().clone() for k in cut.state_dict()}
    cut.load_state_dict(state, assign=True)
    cut.encoder.embed_tokens = cut.shared  # assign=True replaced the tied parameter object; tie it again
    return cut.to(device=param.device, dtype=param.dtype).eval()
