"""Which token ids generation may emit, and the task prefixes that select completion or denoising."""

from __future__ import annotations

import torch

from protlm.errors import ConfigError
from protlm.tokenizer.vocab import STANDARD

RESIDUE_SETS = ("standard", "all")  # the 20 standard residues, or every residue token (adds X, U, Z, O, B)

# Longest encoder input or generated continuation accepted by default. T5's relative position buckets have no
# hard limit, but Ankh3 was trained on 512-residue crops (Ankh3 paper, Table 2) and the decoder cache grows
# linearly (a 2,560-wide model holds ~0.8 GB per 2,048-token row), so much longer requests are more likely a
# mistake than a plan. Callers can raise it explicitly.
DEFAULT_MAX_LENGTH = 4096


def residue_ids(tokenizer, residues: str = "standard") -> list[int]:
    """Token ids of the residues generation may emit, in the order of ``residue_alphabet``."""
    if residues not in RESIDUE_SETS:
        raise ConfigError(f"residues must be one of {', '.join(RESIDUE_SETS)}, got {residues!r}")
    letters = residue_alphabet(tokenizer, residues)
    return [tokenizer.residue_ids[aa] for aa in letters]


def residue_alphabet(tokenizer, residues: str = "standard") -> str:
    if residues == "standard":
        return "".join(sorted(STANDARD))
    return "".join(sorted(aa for aa in tokenizer.residue_ids))


def allowed_mask(tokenizer, vocab_size: int, residues: str = "standard", allow_eos: bool = True,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(vocab_size,) bool: True for the tokens that may be emitted."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[residue_ids(tokenizer, residues)] = True
    if allow_eos:
        mask[tokenizer.eos_id] = True
    return mask.to(device)


def task_prefix(tokenizer, task: str) -> list[int]:
    """Encoder prefix ids for a task: "s2s" (completion) or "nlu" (denoising); none when the vocabulary has no
    such token (Ankh and ProtT5 were trained without task prefixes)."""
    pid = tokenizer.prefix_ids.get(task)
    return [] if pid is None else [pid]


def require_decoder(model) -> None:
    if getattr(model, "decoder", None) is None:
        raise ConfigError("this model is encoder-only; generation, infilling and scoring need its decoder "
                          "(load the full T5ForConditionalGeneration checkpoint)")


def model_device(model) -> torch.device:
    return next(model.parameters()).device
