"""One training example (encoder input, decoder target, task) and the batch collation the trainer feeds the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protlm.errors import ConfigError
from protlm.objectives.config import TASK_IDS
from protlm.tokenizer.vocab import Tokenizer

IGNORE_INDEX = -100  # label value the loss skips (torch cross_entropy's default ignore_index)


@dataclass
class Example:
    input_ids: np.ndarray  # (Le,) int64: task prefix, residues (some replaced by sentinels), </s>
    labels: np.ndarray  # (Ld,) int64: decoder target, ending in </s>
    task: str  # "denoise" or "complete"

    def __repr__(self) -> str:
        return f"Example(task={self.task!r}, input_ids={self.input_ids.tolist()}, labels={self.labels.tolist()})"


def prefix_id(tok: Tokenizer, key: str) -> int:
    """Id of the task prefix ``[NLU]`` ("nlu") or ``[S2S]`` ("s2s")."""
    try:
        return tok.prefix_ids[key]
    except KeyError:
        raise ConfigError(f"the tokenizer ({tok.source}) has no [{key.upper()}] token; Ankh3 objectives need "
                          "an Ankh3-layout vocabulary") from None


def collate(examples: list[Example], tok: Tokenizer, decoder_start_id: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of examples into model inputs.

    Returns ``input_ids`` and ``attention_mask`` (B, Le), ``labels`` (B, Ld) padded with -100 so padding is no
    loss term, ``decoder_attention_mask`` (B, Ld) 1 on real target tokens, ``decoder_input_ids`` (B, Ld) for
    teacher forcing (``decoder_start_id``, then the labels shifted right, padding where they are -100; as
    ``T5.shift_right``), and ``task`` (B,) long with 0 for denoising and 1 for completion (for per-task loss and
    accuracy). ``decoder_start_id`` None is the pad id, T5's start token.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    n = len(examples)
    enc_len = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=n)
    dec_len = np.fromiter((len(e.labels) for e in examples), dtype=np.int64, count=n)
    input_ids = np.full((n, int(enc_len.max())), tok.pad_id, dtype=np.int64)
    labels = np.full((n, int(dec_len.max())), IGNORE_INDEX, dtype=np.int64)
    for i, ex in enumerate(examples):
        input_ids[i, : enc_len[i]] = ex.input_ids
        labels[i, : dec_len[i]] = ex.labels
    # Masks from lengths in one broadcast comparison each, not per row.
    attention_mask = np.arange(input_ids.shape[1]) < enc_len[:, None]
    decoder_attention_mask = np.arange(labels.shape[1]) < dec_len[:, None]
    decoder_input_ids = np.empty_like(labels)
    decoder_input_ids[:, 0] = tok.pad_id if decoder_start_id is None else decoder_start_id
    decoder_input_ids[:, 1:] = np.where(labels[:, :-1] == IGNORE_INDEX, tok.pad_id, labels[:, :-1])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "decoder_attention_mask": torch.from_numpy(decoder_attention_mask.astype(np.int64)),
        "decoder_input_ids": torch.from_numpy(decoder_input_ids),
        "task": torch.tensor([TASK_IDS[e.task] for e in examples], dtype=torch.long),
    }
