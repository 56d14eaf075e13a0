"""protlm: protein language models (Ankh, Ankh3, ProtT5) in PyTorch.

Pretrain with Ankh3's multi-task objective, load published checkpoints exactly, embed at proteome scale,
benchmark embeddings with the Ankh3 protocol and analyse what each layer contributes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from protlm.config import T5Config, preset
from protlm.errors import CheckpointError, ConfigError, InputError, ProtlmError


def load(path_or_id, **kwargs):
    """Load a checkpoint directory or Hugging Face Hub id; see :func:`protlm.convert.load`."""
    from protlm.convert import load as _load

    return _load(path_or_id, **kwargs)


def save_pretrained(model, directory, tokenizer=None):
    """Write a model in the Hugging Face layout; see :func:`protlm.convert.save_pretrained`."""
    from protlm.convert import save_pretrained as _save

    return _save(model, directory, tokenizer)


def random_init(name_or_config, seed: int = 0, encoder_only: bool = False):
    """A randomly initialised model with protlm's vocabulary; see :func:`protlm.convert.random_init`."""
    from protlm.convert import random_init as _random_init

    return _random_init(name_or_config, seed=seed, encoder_only=encoder_only)


def embed(model, sequences, per_residue: bool = False, **kwargs):
    """Embed sequences and return ``{id: array}`` (per-protein, or per-residue); see
    :func:`protlm.embedding.run.embed`.

    For files (resumable, HDF5) use :func:`protlm.embedding.embed_files`; to stream,
    :func:`protlm.embedding.embed_iter`.
    """
    from protlm.embedding.run import embed as _embed

    return _embed(model, sequences, per_residue=per_residue, **kwargs)


def generate(pre, prefixes, config=None, **kwargs):
    """Complete protein prefixes (Ankh3 ``[S2S]``); see :func:`protlm.generation.generate`."""
    from protlm.generation import generate as _generate

    return _generate(pre, prefixes, config, **kwargs)


def infill(pre, masked, **kwargs):
    """Fill ``[?]`` positions through the denoising sentinels; see :func:`protlm.generation.infill`."""
    from protlm.generation import infill as _infill

    return _infill(pre, masked, **kwargs)


def score_variants(pre, wildtype, variants, **kwargs):
    """Zero-shot masked-marginal variant scores; see :func:`protlm.generation.score_variants`."""
    from protlm.generation import score_variants as _score

    return _score(pre, wildtype, variants, **kwargs)


__all__ = [
    "__version__", "T5Config", "preset", "load", "save_pretrained", "random_init", "embed",
    "generate", "infill", "score_variants",
    "ProtlmError", "ConfigError", "CheckpointError", "InputError",
]
