"""Proteins for the depth analysis: read, crop, mask, and batch by a token budget.

Every analysis runs on a masked input, because the output-distribution measures (layer skipping, early exit)
need the model's predictions for real masked residues, and the hidden-state measures must come from the same
runs. How residues are masked follows the model's own training objective (``model.kind``):

- encoder-decoder (T5): 1-gram denoising, each masked residue a sentinel; the decoder restores them;
- masked-LM (ESM-2, DPLM): each masked residue shown as ``<mask>`` in ``<cls> residues <eos>``; the LM head
  predicts it at its own position (labels are aligned with the input);
- causal-LM (GPT-2, ProtGPT2): nothing is masked; the input is the clean protein in the model's own text
  convention (:meth:`protlm.tokenizer.bpe.BPETokenizer.text`), and every token is predicted from the ones before
  it (labels are the input shifted left by one).

Per-token averages use the positions that hold an unmasked residue in the encoder and the positions that
predict a masked residue (T5: in the decoder; masked-LM: the masked positions themselves); prefix, ``<cls>``,
end token, sentinels, ``<mask>`` and padding never enter a mean. A causal LM's tokens span several residues:
its hidden-state averages are over the tokens that hold a residue, its output averages over every position that
has a next token (the closing ``<|endoftext|>`` and line breaks are predicted too: they are part of the text the
model was trained on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from protlm.data.fasta import read_sequences
from protlm.errors import ConfigError, InputError
from protlm.objectives.denoise import denoise_with_mask, noise_mask
from protlm.objectives.example import IGNORE_INDEX, Example, collate
from protlm.tokenizer.vocab import Tokenizer


@dataclass
class Protein:
    id: str
    start: int  # 0-based offset of the analysed window in the full sequence
    length: int  # residues in the window
    example: Example  # denoising input and target of the window
    token_of_residue: np.ndarray | None = None  # causal LM: index of the token holding each residue of the window


@dataclass
class DepthBatch:
    index: np.ndarray  # (B,) positions of these proteins in the input order
    input_ids: Tensor  # (B, Le) [prefix] residues-with-sentinels </s> (masked-LM: <cls> residues-with-<mask> <eos>)
    attention_mask: Tensor  # (B, Le) 1 = token
    enc_tokens: Tensor  # (B, Le) bool: unmasked residue positions (what encoder averages use)
    labels: Tensor  # (B, Ld) decoder targets, IGNORE_INDEX on padding (masked-LM: Ld = Le, the true residue at
    #                 masked positions, IGNORE_INDEX elsewhere)
    decoder_input_ids: Tensor | None  # (B, Ld) start token + labels[:-1]; None for a masked LM
    pred_mask: Tensor  # (B, Ld) bool: the label is a masked residue (what decoder/output averages use; causal
    #                    LM: the position has a next token)

    @property
    def size(self) -> int:
        return len(self.index)

    def to(self, device) -> "DepthBatch":
        move = {k: None if getattr(self, k) is None else getattr(self, k).to(device) for k in
                ("input_ids", "attention_mask", "enc_tokens", "labels", "decoder_input_ids", "pred_mask")}
        return DepthBatch(self.index, **move)

    def clean_input_ids(self) -> Tensor:
        """A masked-LM batch with every masked residue put back: the input ``protlm embed`` feeds."""
        return torch.where(self.pred_mask, self.labels, self.input_ids)


def read_proteins(path: str | os.PathLike, max_proteins: int | None = None) -> list[tuple[str, str]]:
    """(id, sequence) of the first ``max_proteins`` records of a FASTA/CSV file."""
    if max_proteins is not None and max_proteins < 1:
        raise ConfigError(f"--max-proteins must be at least 1, got {max_proteins}")
    out = []
    for rec in read_sequences(path):
        out.append((rec.id, rec.sequence))
        if max_proteins is not None and len(out) >= max_proteins:
            break
    if not out:
        raise InputError(f"{os.fspath(path)}: no sequences")
    return out


def denoise_example(residues: np.ndarray, rng: np.random.Generator, rate: float, tok: Tokenizer) -> Example:
    """1-gram denoising exactly as pretraining builds it (:mod:`protlm.objectives.denoise`): each masked residue
    becomes its own sentinel; the target is sentinel_0 residue_0 sentinel_1 residue_1 ... </s>.

    Vocabularies without Ankh3's ``[NLU]`` prefix (Ankh, ProtT5) get the same example without the prefix.
    """
    mask = noise_mask(len(residues), rate, rng)
    if "nlu" in tok.prefix_ids:
        return denoise_with_mask(residues, mask, tok)
    positions = np.flatnonzero(mask)
    if len(positions) > len(tok.sentinel_ids):
        raise ConfigError(f"{len(positions)} masked residues need more sentinels than the vocabulary has "
                          f"({len(tok.sentinel_ids)}); lower --max-length or --mask-rate")
    sentinels = np.asarray(tok.sentinel_ids[:len(positions)], dtype=np.int64)
    enc = residues.astype(np.int64).copy()
    enc[positions] = sentinels
    labels = np.empty(2 * len(positions) + 1, dtype=np.int64)
    labels[0:-1:2], labels[1:-1:2], labels[-1] = sentinels, residues[positions], tok.eos_id
    return Example(np.append(enc, tok.eos_id), labels, "denoise")


def masked_lm_example(residues: np.ndarray, rng: np.random.Generator, rate: float, tok: Tokenizer) -> Example:
    """A masked-LM input: ``<cls> residues <eos>`` with each chosen residue shown as ``<mask>``; the labels are
    aligned with the input (the true residue at masked positions, IGNORE_INDEX elsewhere).

    The chosen residues are drawn as for denoising (:func:`protlm.objectives.denoise.noise_mask`: rate * L
    rounded at random, at least one). ESM-2 trained with 80% of the chosen shown as ``<mask>`` and 20% as a
    random or the same residue; here all are ``<mask>``, so every measured position is one the model cannot see.
    """
    mask = noise_mask(len(residues), rate, rng)
    prefix = np.asarray(tok.prefix_token_ids(None), dtype=np.int64)  # <cls>; a masked LM has no task token
    body = residues.astype(np.int64).copy()
    body[mask] = tok.mask_id
    labels = np.where(mask, residues, IGNORE_INDEX).astype(np.int64)
    ids = np.concatenate([prefix, body, [tok.eos_id]]).astype(np.int64)
    labels = np.concatenate([np.full(len(prefix), IGNORE_INDEX), labels, [IGNORE_INDEX]]).astype(np.int64)
    return Example(ids, labels, "denoise")


def causal_lm_example(ids: np.ndarray) -> Example:
    """A causal-LM input: the clean token ids; label t is token t + 1 (the last token has none)."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.append(ids[1:], IGNORE_INDEX).astype(np.int64)
    return Example(ids, labels, "denoise")


def prepare_proteins(records: list[tuple[str, str]], tok: Tokenizer, max_length: int, mask_rate: float | None,
                     seed: int, source: str = "input", clean_prefix: str | None = None,
                     masked_lm: bool = False, causal_lm: bool = False) -> list[Protein]:
    """Crop each sequence to a seeded random window of ``max_length`` and mask it: for denoising (T5), or with
    ``masked_lm`` as a masked-LM input (:func:`masked_lm_example`).

    ``mask_rate`` None gives the clean input ``[clean_prefix] residues </s>`` as ``protlm embed`` feeds it
    (``<cls> residues <eos>`` for ESM; for probes, and for a model with no head to predict masked residues).
    ``causal_lm`` ignores ``mask_rate``: the clean protein in the tokenizer's own convention (ProtGPT2:
    ``<|endoftext|>``, lines of 60 residues, ``<|endoftext|>``), labels shifted left, and the residue -> token map.
    The random stream of protein i depends only on (seed, i), so results do not depend on batching.
    """
    if max_length < 1:
        raise ConfigError(f"--max-length must be at least 1, got {max_length}")
    if mask_rate is not None and not causal_lm:
        if not 0 < mask_rate < 1:
            raise ConfigError(f"--mask-rate must be in (0, 1), got {mask_rate}")
        if masked_lm and tok.mask_id is None:
            raise ConfigError(f"the tokenizer ({tok.source}) has no <mask> token, so no masked-LM input can be built")
        if not masked_lm and not tok.sentinel_ids:
            raise ConfigError("the tokenizer has no sentinel tokens, so no denoising targets can be built")
    out = []
    for i, (rid, seq) in enumerate(records):
        residues = tok.residue_array(seq, record=f"{source}: record {rid!r}", unknown="x")
        rng = np.random.default_rng([seed, i])
        start = int(rng.integers(0, len(residues) - max_length + 1)) if len(residues) > max_length else 0
        window = residues[start:start + max_length]
        if causal_lm:
            ids, token_of = tok.encode_residues(window)
            out.append(Protein(rid, start, len(window), causal_lm_example(ids), token_of))
            continue
        if mask_rate is None:
            ids = np.concatenate([tok.prefix_token_ids(clean_prefix), window, [tok.eos_id]]).astype(np.int64)
            example = Example(ids, np.asarray([tok.eos_id], dtype=np.int64), "denoise")
        elif masked_lm:
            example = masked_lm_example(window, rng, mask_rate, tok)
        else:
            example = denoise_example(window, rng, mask_rate, tok)
        out.append(Protein(rid, start, len(window), example))
    return out


def batches(proteins: list[Protein], tok: Tokenizer, token_budget: int, decoder_start_id: int | None = 0,
            masked_lm: bool = False, causal_lm: bool = False) -> list[DepthBatch]:
    """Length-sorted batches whose padded encoder size stays within ``token_budget`` (a long protein runs alone).

    ``decoder_start_id`` is the model's ``decoder_start_token_id`` (T5: the pad id), used for teacher forcing;
    ``masked_lm`` and ``causal_lm`` batches have no decoder input.
    """
    if token_budget < 1:
        raise ConfigError(f"--batch-tokens must be at least 1, got {token_budget}")
    order = sorted(range(len(proteins)), key=lambda i: len(proteins[i].example.input_ids))
    groups: list[list[int]] = []
    for i in order:
        width = len(proteins[i].example.input_ids)
        if groups and width * (len(groups[-1]) + 1) <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    residue_ids = None if causal_lm else torch.as_tensor(tok.residue_id_array)
    out = []
    for g in groups:
        cols = collate([proteins[i].example for i in g], tok, decoder_start_id)
        ids, labels = cols["input_ids"], cols["labels"]
        if causal_lm:  # tokens holding a residue (from the residue -> token map); every position with a next token
            enc_tokens = torch.zeros(ids.shape, dtype=torch.bool)
            for r, i in enumerate(g):
                enc_tokens[r, torch.from_numpy(proteins[i].token_of_residue)] = True
            pred_mask = labels != IGNORE_INDEX
        else:
            enc_tokens = torch.isin(ids, residue_ids) & cols["attention_mask"].bool()
            pred_mask = torch.isin(labels, residue_ids)
        out.append(DepthBatch(np.asarray(g), ids, cols["attention_mask"], enc_tokens, labels,
                              None if masked_lm or causal_lm else cols["decoder_input_ids"], pred_mask))
    return out
