"""Byte-level BPE for GPT-2-family protein LMs (ProtGPT2): a token spans one or several residues.

The vocabulary is the checkpoint's own: ``tokenizer.json``, or GPT-2's older pair ``vocab.json`` + ``merges.txt``,
read with the Hugging Face ``tokenizers`` library.

Input convention (ProtGPT2's model card, nferruz/ProtGPT2): the model was trained on UniRef50 written as FASTA
with each header replaced by ``<|endoftext|>`` and the residues in lines of 60, so a protein reads

    <|endoftext|>\\nMSKGEELFTG...(60 residues)\\nVDGDVNGHKF...\\n<|endoftext|>

:meth:`BPETokenizer.encode_residues` writes exactly that text and returns, beside the token ids, the index of the
token that holds each residue (from the tokenizer's character offsets; GPT-2's pre-tokenizer never joins a line
break to a residue, so every residue lies inside one token). Per-residue outputs give each residue the vector of
its token, and per-protein means are over residues (a token of four residues counts four times), so a protein's
vectors have one row per residue as in every other family.

Residues are kept as their ASCII codes (``residue_array``): ids exist only once a window's text is tokenised,
since the same residues tokenise differently in different contexts.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from protlm.errors import CheckpointError, InputError
from protlm.tokenizer.vocab import RESIDUES, UNKNOWN_POLICIES, Batch

EOT = "<|endoftext|>"
LINE_WIDTH = 60  # residues per line, as in ProtGPT2's FASTA-formatted training text

_RESIDUE_CODES = np.full(256, -1, dtype=np.int64)
for _aa in RESIDUES:
    _RESIDUE_CODES[ord(_aa)] = _RESIDUE_CODES[ord(_aa.lower())] = ord(_aa)


class BPETokenizer:
    """A byte-level BPE vocabulary with ProtGPT2's input convention and a residue -> token map.

    Shares the encode/pad/decode interface of :class:`protlm.tokenizer.vocab.Tokenizer` where the two mean the
    same thing; ``multi_residue_tokens`` tells the workflows to go through :meth:`encode_residues` instead of
    placing one id per residue.
    """

    multi_residue_tokens = True

    def __init__(self, hf, source: str, line_width: int = LINE_WIDTH):
        self.hf = hf
        self.source = source
        self.line_width = line_width
        self.vocab = hf.get_vocab(with_added_tokens=True)
        if EOT not in self.vocab:
            raise CheckpointError(f"{source}: the vocabulary has no {EOT} token, which ProtGPT2's input convention "
                                  "puts around every protein")
        self.eot_id = self.vocab[EOT]
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        # what the rest of protlm reads from a tokenizer: <|endoftext|> opens, closes and pads every protein
        self.bos_id = self.eos_id = self.pad_id = self.unk_id = self.eot_id
        self.mask_id = None
        self.prefix_ids: dict[str, int] = {}
        self.sentinel_ids: list[int] = []
        self.special_ids = frozenset({self.eot_id})
        self.space_separated = False
        letters = set(RESIDUES)
        # tokens made only of residues, and those made only of line breaks (byte-level BPE writes "\n" as "Ċ")
        self.residue_token_ids = np.array(sorted(i for t, i in self.vocab.items() if t and set(t) <= letters),
                                          dtype=np.int64)
        self.newline_token_ids = np.array(sorted(i for t, i in self.vocab.items() if t and set(t) <= {"Ċ"}),
                                          dtype=np.int64)
        self.x_id = self.vocab.get("X", self.unk_id)

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def __len__(self) -> int:
        return len(self.vocab)

    # --- residues ---------------------------------------------------------------------------------------------
    def residue_array(self, seq: str, record: str = "<sequence>", unknown: str = "error") -> np.ndarray:
        """The residues as upper-case ASCII codes, checked as :meth:`Tokenizer.residue_array` checks them. A
        byte-level vocabulary has no <unk>: ``unknown="unk"`` writes X, as ``"x"`` does."""
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown-residue policy must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
        if not seq:
            raise InputError(f"{record}: empty sequence")
        try:
            raw = seq.encode("ascii")
        except UnicodeEncodeError as err:
            raise InputError(f"{record}: non-ASCII character {seq[err.start]!r} at position {err.start + 1}") from None
        codes = _RESIDUE_CODES[np.frombuffer(raw, dtype=np.uint8)]
        bad = np.flatnonzero(codes < 0)
        if bad.size:
            if unknown == "error":
                pos = int(bad[0])
                raise InputError(f"{record}: unknown residue {seq[pos]!r} at position {pos + 1}"
                                 + (f" (and {bad.size - 1} more)" if bad.size > 1 else ""))
            if unknown == "skip":
                codes = codes[codes >= 0]
                if codes.size == 0:
                    raise InputError(f"{record}: no valid residues")
            else:
                codes[bad] = ord("X")
        return codes

    def text(self, residues: str, close: bool = True) -> str:
        """ProtGPT2's text for a protein: ``<|endoftext|>``, lines of 60 residues, and (``close``) a final line
        break and ``<|endoftext|>``. A prompt to continue is left open."""
        w = self.line_width
        lines = "\n".join(residues[i:i + w] for i in range(0, len(residues), w))
        return EOT + "\n" + lines + ("\n" + EOT if close else "")

    def residue_offsets(self, n: int) -> np.ndarray:
        """Character offset of each residue in :meth:`text` (one line break after every 60 residues)."""
        j = np.arange(n)
        return len(EOT) + 1 + j + j // self.line_width

    def encode_residues(self, codes: np.ndarray, close: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, index of the token holding each residue) for one protein (ASCII codes)."""
        return self.encode_residue_batch([codes], close)[0]

    def encode_residue_batch(self, proteins: list[np.ndarray],
                             close: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        texts = [self.text(np.asarray(c, dtype=np.uint8).tobytes().decode("ascii"), close) for c in proteins]
        out = []
        for codes, enc in zip(proteins, self.hf.encode_batch(texts, add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            starts = np.asarray([s for s, _ in enc.offsets], dtype=np.int64)
            ends = np.asarray([e for _, e in enc.offsets], dtype=np.int64)
            pos = self.residue_offsets(len(codes))
            index = np.searchsorted(starts, pos, side="right") - 1
            if (index < 0).any() or (ends[index] <= pos).any():  # a tokenizer whose offsets skip a residue
                raise CheckpointError(f"{self.source}: token offsets do not cover every residue; this vocabulary "
                                      "does not tokenise proteins as ProtGPT2's does")
            out.append((ids, index))
        return out

    # --- the Tokenizer interface -----------------------------------------------------------------------------
    def prefix_token_ids(self, prefix: str | None) -> list[int]:
        if prefix in (None, "none", ""):
            return []
        raise InputError(f"prefix {prefix!r}: this model's vocabulary ({self.source}) has no task tokens; "
                         "use --prefix none")

    def encode(self, seq: str, prefix: str | None = None, add_eos: bool = True, record: str = "<sequence>",
               unknown: str = "error") -> list[int]:
        self.prefix_token_ids(prefix)
        return self.encode_residues(self.residue_array(seq, record, unknown), close=add_eos)[0].tolist()

    def batch_encode(self, seqs: list[str], prefix: str | None = None, add_eos: bool = True,
                     records: list[str] | None = None, unknown: str = "error") -> Batch:
        self.prefix_token_ids(prefix)
        arrays = [self.residue_array(s, records[i] if records else f"<sequence {i}>", unknown)
                  for i, s in enumerate(seqs)]
        encoded = self.encode_residue_batch(arrays, close=add_eos)
        return self.pad([ids for ids, _ in encoded], lengths=[len(a) for a in arrays], n_prefix=0)

    def pad(self, rows: list, lengths: list[int] | None = None, n_prefix: int = 0) -> Batch:
        """Right-padded ids and mask (GPT-2's causal attention never lets a real token see the padding)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
            mask[i, : len(r)] = 1
        return Batch(ids, mask, lengths or [len(r) for r in rows], n_prefix)

    def decode(self, ids, keep_special: bool = False) -> str:
        """The residues of ``ids`` (line breaks dropped; <|endoftext|> written only with ``keep_special``)."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        text = self.hf.decode(ids, skip_special_tokens=not keep_special)
        return "".join(text.split())

    # --- persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> str:
        """``tokenizer.json`` plus the settings transformers' ``AutoTokenizer`` reads (a GPT-2 fast tokenizer)."""
        from protlm.utils import atomic_path, atomic_write_text

        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        with atomic_path(path) as tmp:
            self.hf.save(tmp)
        specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        atomic_write_text(os.path.join(directory, "tokenizer_config.json"),
                          json.dumps({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                                      "model_max_length": 1024, **specials}, indent=2) + "\n")
        atomic_write_text(os.path.join(directory, "special_tokens_map.json"), json.dumps(specials, indent=2) + "\n")
        return path


def _byte_level(model):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers

    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    return hf


def residue_bpe_tokenizer() -> BPETokenizer:
    """A byte-level BPE with no merges: <|endoftext|>, the line break and one token per residue (for random-init
    GPT-2 models, which have no vocabulary of their own)."""
    from tokenizers.models import BPE

    vocab = {EOT: 0, "Ċ": 1, **{aa: 2 + i for i, aa in enumerate(RESIDUES)}}
    return BPETokenizer(_byte_level(BPE(vocab=vocab, merges=[])), "protlm residue BPE")


def load_bpe_tokenizer(directory: str | os.PathLike) -> BPETokenizer | None:
    """A checkpoint's byte-level BPE: ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``; None if it has
    neither file."""
    directory = os.fspath(directory)
    tj = os.path.join(directory, "tokenizer.json")
    vj = os.path.join(directory, "vocab.json")
    mt = os.path.join(directory, "merges.txt")
    if os.path.exists(tj):
        try:
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer.from_file(tj)
        except Exception as err:  # the library raises plain Exception subclasses for corrupt files
            raise CheckpointError(f"{tj}: cannot read tokenizer ({err})") from None
        if type(hf.model).__name__ != "BPE":
            raise CheckpointError(f"{tj}: a {type(hf.model).__name__} tokenizer; a GPT-2 model needs byte-level BPE")
        return BPETokenizer(hf, tj)
    if not os.path.exists(vj):
        return None
    if not os.path.exists(mt):
        raise CheckpointError(f"{directory}: vocab.json but no merges.txt; a byte-level BPE vocabulary needs its "
                              "merges (or a tokenizer.json)")
    try:
        from tokenizers.models import BPE

        model = BPE.from_file(vj, mt)
    except Exception as err:
        raise CheckpointError(f"{vj}: cannot read BPE vocabulary with {os.path.basename(mt)} ({err})") from None
    return BPETokenizer(_byte_level(model), vj)
