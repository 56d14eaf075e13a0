"""protlm: protein language models (Ankh, Ankh3, ProtT5) in PyTorch.

Pretrain with Ankh3's multi-task objective, load published checkpoints exactly, embed at proteome scale,
benchmark embeddings with the Ankh3 protocol and analyse what each layer contributes.

The names below are the library's front door; each is the function of the module named in ``_EXPORTS``,
imported on first use so that ``import protlm`` (and the CLI's start) stays light. Code inside the package
imports those modules directly.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from protlm.config import T5Config, preset
from protlm.errors import CheckpointError, ConfigError, InputError, ProtlmError

_EXPORTS = {
    "load": "protlm.convert",  # checkpoint directory, Hub id, preset or random-init twin
    "save_pretrained": "protlm.convert",
    "random_init": "protlm.convert",
    "embed": "protlm.embedding.run",  # {id: array}; files: protlm.embedding.embed_files
    "generate": "protlm.generation",  # complete prefixes (Ankh3 [S2S])
    "infill": "protlm.generation",  # fill [?] positions through the denoising sentinels
    "score_variants": "protlm.generation",  # zero-shot masked-marginal variant scores
    "predict": "protlm.evaluate.predict",  # trained head bundles on new proteins: {id: {head: HeadOutput}}
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'protlm' has no attribute {name!r}")


__all__ = [
    "__version__", "T5Config", "preset", *_EXPORTS,
    "ProtlmError", "ConfigError", "CheckpointError", "InputError",
]
