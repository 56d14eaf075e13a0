"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import torch

from protlm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(spec: str, random_init: bool = False, dtype: str | None = None, device: str = "cpu",
               encoder_only: bool | None = None, seed: int = 0):
    """A checkpoint directory or Hub id, or with ``random_init`` a preset name."""
    import protlm
    from protlm.config import PRESET_NAMES

    if random_init:
        if spec not in PRESET_NAMES:
            raise ConfigError(f"--random-init needs a preset name ({', '.join(PRESET_NAMES)}), got {spec!r}")
        pre = protlm.random_init(spec, seed=seed, encoder_only=bool(encoder_only))
    else:
        pre = protlm.load(spec, encoder_only=encoder_only)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        pre.model.to(torch_dtype)
    pre.model.to(device)
    return pre


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]
