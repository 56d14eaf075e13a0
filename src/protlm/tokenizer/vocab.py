"""Residue-level tokenizers for protein LMs (T5 and ESM families).

Encoding is a table lookup (one id per residue), whatever the source of the table:
- protlm's own Ankh3-layout vocabulary (:func:`ankh3_vocab`), used for new T5 models;
- ESM's 33-token alphabet (:func:`esm_tokenizer`), used for new ESM models;
- a published checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``), ``spiece.model`` (SentencePiece) or
  ``vocab.txt`` (ESM, BERT: one token per line, the line number is the id), read so that a published model is
  never fed another model's ids;
- ProtBERT's 30-token vocabulary (:func:`prot_bert_tokenizer`), used for new BERT models.

Encoder input is ``[<cls>] [prefix] residues </s>``: ``<cls>`` (ESM) or ``[CLS]`` (BERT) where the vocabulary has
one, the prefix is Ankh3's task token (``[NLU]`` or ``[S2S]``) or none, and the end token is ``</s>`` (T5),
``<eos>`` (ESM) or ``[SEP]`` (BERT).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from protlm.errors import InputError

STANDARD = "LAGSVERTIDPKNFQYHMCW"  # the 20 standard residues, in protlm's id order (most frequent first)
RARE = "UZOB"  # selenocysteine, Glx, pyrrolysine, Asx
RESIDUES = STANDARD + "X" + RARE
PREFIXES = {"nlu": "[NLU]", "s2s": "[S2S]"}
N_SENTINELS = 225
UNKNOWN_POLICIES = ("error", "x", "unk", "skip")


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def ankh3_vocab() -> dict[str, int]:
    """protlm's 256-id Ankh3-layout vocabulary.

    pad 0, </s> 1, <unk> 2, [NLU] 3, [S2S] 4, [NLG] 5 (reserved for UL2's third mode), X 6, the 20 residues at
    7..26 (L7 A8 G9 ... W26), U 27, Z 28, O 29, B 30, and 225 sentinels counting down from the top as in T5
    (<extra_id_0> = 255, ..., <extra_id_224> = 31).
    """
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "[NLU]": 3, "[S2S]": 4, "[NLG]": 5, "X": 6}
    for i, aa in enumerate(STANDARD):
        vocab[aa] = 7 + i
    for i, aa in enumerate(RARE):
        vocab[aa] = 27 + i
    for i in range(N_SENTINELS):
        vocab[sentinel_token(i)] = 255 - i
    assert len(vocab) == 256 and sorted(vocab.values()) == list(range(256))
    return vocab


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) padded with pad_id
    attention_mask: torch.Tensor  # (B, L) 1 = token, 0 = padding
    lengths: list[int]  # residues per sequence (no prefix, no </s>)
    n_prefix: int  # tokens before the first residue (0 or 1)


class Tokenizer:
    """Maps residue strings to ids and back through a lookup table.

    ``space_separated`` marks the ProtT5 convention, where the published tokenizer sees residues as words and
    rare residues U/Z/O/B are written as X.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        residue_ids: dict[str, int],
        space_separated: bool = False,
        aliases: dict[str, str] | None = None,
        source: str = "protlm",
    ):
        self.vocab = dict(vocab)
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.residue_ids = dict(residue_ids)
        self.space_separated = space_separated
        self.aliases = dict(aliases or {})
        self.source = source
        # each special under its T5/ESM spelling, or BERT's ([PAD] [UNK] [CLS] [SEP] [MASK])
        self.pad_id = _special(vocab, ("<pad>", "[PAD]"), 0)
        self.eos_id = _special(vocab, ("</s>", "<eos>", "[SEP]"), 1)
        self.unk_id = _special(vocab, ("<unk>", "[UNK]"), 2)
        self.bos_id = _special(vocab, ("<cls>", "[CLS]"))  # ESM and BERT open every input; T5 vocabularies do not
        self.mask_id = _special(vocab, ("<mask>", "[MASK]"))  # the masked-LM families' mask token
        self.prefix_ids = {k: vocab[t] for k, t in PREFIXES.items() if t in vocab}
        self.sentinel_ids = []
        while sentinel_token(len(self.sentinel_ids)) in vocab:
            self.sentinel_ids.append(vocab[sentinel_token(len(self.sentinel_ids))])
        self.x_id = residue_ids.get("X", self.unk_id)
        # byte -> id table; -1 marks bytes that are not residues
        self._table = np.full(256, -1, dtype=np.int64)
        for aa, idx in residue_ids.items():
            self._table[ord(aa)] = idx
            self._table[ord(aa.lower())] = idx
        for src, dst in self.aliases.items():
            if dst in residue_ids:
                self._table[ord(src)] = residue_ids[dst]
                self._table[ord(src.lower())] = residue_ids[dst]
        self.residue_id_array = np.array(sorted(set(residue_ids.values())), dtype=np.int64)
        self.special_ids = frozenset(i for t, i in vocab.items() if t not in residue_ids)

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def is_bert(self) -> bool:
        """A BERT WordPiece vocabulary (``[CLS]``/``[SEP]``): saved as ``vocab.txt`` for ``BertTokenizer``."""
        return "[CLS]" in self.vocab and "[SEP]" in self.vocab

    # --- encoding -------------------------------------------------------------------------------------------
    def residue_array(self, seq: str, record: str = "<sequence>", unknown: str = "error") -> np.ndarray:
        """Residue ids of one sequence (no specials). ``unknown`` says what to do with a non-residue character:
        "error" raises naming the record and 1-based position, "x" maps it to X, "unk" to <unk>,
        "skip" drops it."""
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown-residue policy must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
        if self.space_separated:
            seq = seq.replace(" ", "")
        if not seq:
            raise InputError(f"{record}: empty sequence")
        try:
            raw = seq.encode("ascii")
        except UnicodeEncodeError as err:
            raise InputError(
                f"{record}: non-ASCII character {seq[err.start]!r} at position {err.start + 1}"
            ) from None
        ids = self._table[np.frombuffer(raw, dtype=np.uint8)]
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            if unknown == "error":
                pos = int(bad[0])
                raise InputError(
                    f"{record}: unknown residue {seq[pos]!r} at position {pos + 1}"
                    + (f" (and {bad.size - 1} more)" if bad.size > 1 else "")
                )
            if unknown == "skip":
                ids = ids[ids >= 0]
                if ids.size == 0:
                    raise InputError(f"{record}: no valid residues")
            else:
                ids[bad] = self.x_id if unknown == "x" else self.unk_id
        return ids

    def prefix_token_ids(self, prefix: str | None) -> list[int]:
        """The ids before the first residue: ``<cls>`` where the vocabulary has one, then the task token."""
        bos = [] if self.bos_id is None else [self.bos_id]
        if prefix in (None, "none", ""):
            return bos
        key = prefix.lower().strip("[]")
        if key not in self.prefix_ids:
            if not self.prefix_ids:
                raise InputError(f"prefix {prefix!r}: this model's vocabulary ({self.source}) has no task tokens; "
                                 "use --prefix none")
            raise InputError(f"prefix {prefix!r} is not in this vocabulary (has: {sorted(self.prefix_ids)})")
        return bos + [self.prefix_ids[key]]

    def encode(self, seq: str, prefix: str | None = None, add_eos: bool = True, record: str = "<sequence>",
               unknown: str = "error") -> list[int]:
        ids = self.prefix_token_ids(prefix) + self.residue_array(seq, record, unknown).tolist()
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def batch_encode(self, seqs: list[str], prefix: str | None = None, add_eos: bool = True,
                     records: list[str] | None = None, unknown: str = "error") -> Batch:
        pre = self.prefix_token_ids(prefix)
        arrays = [self.residue_array(s, records[i] if records else f"<sequence {i}>", unknown) for i, s in enumerate(seqs)]
        return self.pad([np.concatenate([pre, a, [self.eos_id] if add_eos else []]).astype(np.int64) for a in arrays],
                        lengths=[len(a) for a in arrays], n_prefix=len(pre))

    def pad(self, rows: list, lengths: list[int] | None = None, n_prefix: int = 0) -> Batch:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
            mask[i, : len(r)] = 1
        return Batch(ids, mask, lengths or [len(r) for r in rows], n_prefix)

    # --- decoding -------------------------------------------------------------------------------------------
    def decode(self, ids, keep_special: bool = False) -> str:
        """Residue string of ``ids``; specials are dropped unless ``keep_special`` (then written as tokens)."""
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            tok = self.id_to_token.get(int(i), "<unk>")
            if int(i) in self.special_ids:
                if keep_special:
                    out.append(tok)
                continue
            out.append(tok.lstrip("\u2581"))
        return "".join(out)

    # --- persistence ----------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> str:
        """Write the vocabulary in its family's format: ``vocab.txt`` and the ``EsmTokenizer`` settings for an
        ESM alphabet, else ``tokenizer.json`` (Hugging Face ``tokenizers`` format, word-level)."""
        from protlm.utils import atomic_write_text

        directory = os.fspath(directory)
        if self.is_bert:
            return self._save_bert(directory)
        if self.bos_id is not None and "<eos>" in self.vocab:
            tokens = [self.id_to_token[i] for i in range(self.vocab_size)]
            atomic_write_text(os.path.join(directory, "vocab.txt"), "\n".join(tokens) + "\n")
            specials = {"cls_token": "<cls>", "pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>",
                        "mask_token": "<mask>"}
            atomic_write_text(os.path.join(directory, "tokenizer_config.json"),
                              json.dumps({"tokenizer_class": "EsmTokenizer", "model_max_length": 1024, **specials},
                                         indent=2) + "\n")
            atomic_write_text(os.path.join(directory, "special_tokens_map.json"), json.dumps(specials, indent=2) + "\n")
            return os.path.join(directory, "vocab.txt")
        path = os.path.join(directory, "tokenizer.json")
        atomic_write_text(path, self.to_tokenizers_json())
        return path

    def _save_bert(self, directory: str) -> str:
        """``vocab.txt`` (line number = id) and ``BertTokenizer`` settings: cased, as ProtBERT's card loads it."""
        from protlm.utils import atomic_write_text

        tokens = [self.id_to_token[i] for i in range(self.vocab_size)]
        atomic_write_text(os.path.join(directory, "vocab.txt"), "\n".join(tokens) + "\n")
        specials = {"cls_token": "[CLS]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                    "mask_token": "[MASK]"}
        atomic_write_text(os.path.join(directory, "tokenizer_config.json"),
                          json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": False, **specials},
                                     indent=2) + "\n")
        atomic_write_text(os.path.join(directory, "special_tokens_map.json"), json.dumps(specials, indent=2) + "\n")
        return os.path.join(directory, "vocab.txt")

    def to_tokenizers_json(self) -> str:
        specials = [t for t in self.vocab if t not in self.residue_ids]
        data = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": self.vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for t in sorted(specials, key=self.vocab.get)
            ],
            "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [self.eos_id], "tokens": ["</s>"]}},
            },
            "decoder": None,
            "model": {"type": "WordLevel", "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
                      "unk_token": "<unk>"},
        }
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def protlm_tokenizer() -> Tokenizer:
    """protlm's own Ankh3-layout tokenizer (256 ids)."""
    vocab = ankh3_vocab()
    return Tokenizer(vocab, {aa: vocab[aa] for aa in RESIDUES}, source="protlm ankh3 layout")


# ESM's alphabet (fair-esm's ESM-1b/ESM-2 alphabet, as in facebook/esm2_*/vocab.txt): specials, the residues in
# ESM's order, ambiguity codes and gap characters, then <mask> at 32.
ESM_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO", ".", "-", "<null_1>", "<mask>")


def esm_tokenizer(source: str = "protlm esm alphabet") -> Tokenizer:
    """ESM-2's 33-token alphabet (for random-init ESM models; a checkpoint's own ``vocab.txt`` is read instead)."""
    return _vocab_tokenizer({t: i for i, t in enumerate(ESM_TOKENS)}, source)


# ProtBERT's vocabulary (Rostlab/prot_bert and prot_bert_bfd vocab.txt): BERT's specials, then the residues.
BERT_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"LAGVESIKRDTPNQFYMHCWXUBZO")


def prot_bert_tokenizer(source: str = "protlm prot_bert vocabulary") -> Tokenizer:
    """ProtBERT's 30-token vocabulary and input convention (for random-init BERT models)."""
    return _prot_trans_tokenizer({t: i for i, t in enumerate(BERT_TOKENS)}, source)


def _prot_trans_tokenizer(vocab: dict[str, int], source: str) -> Tokenizer:
    """ProtTrans's convention (ProtT5, ProtBERT model cards): residues are space-separated words, and the rare
    residues U, Z, O, B are written as X before tokenising, whether or not the vocabulary has their tokens."""
    residue_ids = {aa: i for aa, i in _residue_ids_from_vocab(vocab, True, source).items() if aa not in RARE}
    return Tokenizer(vocab, residue_ids, space_separated=True, aliases={r: "X" for r in RARE}, source=source)


def _special(vocab: dict[str, int], names: tuple[str, ...], default: int | None = None) -> int | None:
    return next((vocab[n] for n in names if n in vocab), default)


def _vocab_tokenizer(vocab: dict[str, int], source: str) -> Tokenizer:
    return Tokenizer(vocab, _residue_ids_from_vocab(vocab, False, source), source=source)


def _residue_ids_from_vocab(vocab: dict[str, int], spaced: bool, source: str) -> dict[str, int]:
    out = {}
    for aa in RESIDUES:
        candidates = ("\u2581" + aa, aa) if spaced else (aa, "\u2581" + aa)
        for c in candidates:
            if c in vocab:
                out[aa] = vocab[c]
                break
    missing = [aa for aa in STANDARD if aa not in out]
    if missing:
        from protlm.errors import CheckpointError

        raise CheckpointError(f"{source}: vocabulary has no token for residue(s) {''.join(missing)}")
    return out


def load_tokenizer(directory: str | os.PathLike, family: str = "custom") -> Tokenizer | None:
    """Read a checkpoint's own vocabulary (``tokenizer.json``, ``spiece.model`` or ``vocab.txt``); None if it has
    none of them."""
    from protlm.errors import CheckpointError

    directory = os.fspath(directory)
    spaced = family in ("prot-t5", "prot-bert")
    aliases = {r: "X" for r in RARE} if spaced else {}
    tj = os.path.join(directory, "tokenizer.json")
    sp = os.path.join(directory, "spiece.model")
    vt = os.path.join(directory, "vocab.txt")
    if os.path.exists(vt) and not os.path.exists(tj):
        try:
            with open(vt, encoding="utf-8") as fh:
                tokens = [line.strip() for line in fh]
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{vt}: cannot read vocabulary ({err})") from None
        while tokens and not tokens[-1]:
            tokens.pop()
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if not t:
                raise CheckpointError(f"{vt}: line {i + 1} is empty; every line holds one token")
            vocab.setdefault(t, i)
        return _prot_trans_tokenizer(vocab, vt) if spaced else _vocab_tokenizer(vocab, vt)
    if os.path.exists(tj):
        try:
            from tokenizers import Tokenizer as HFTokenizer

            vocab = HFTokenizer.from_file(tj).get_vocab(with_added_tokens=True)
        except Exception as err:  # the library raises plain Exception subclasses for corrupt files
            raise CheckpointError(f"{tj}: cannot read tokenizer ({err})") from None
        source = tj
    elif os.path.exists(sp):
        try:
            import sentencepiece as spm

            proc = spm.SentencePieceProcessor(model_file=sp)
        except Exception as err:
            raise CheckpointError(f"{sp}: cannot read SentencePiece model ({err})") from None
        vocab = {proc.id_to_piece(i): i for i in range(proc.get_piece_size())}
        source = sp
    else:
        return None
    residue_ids = _residue_ids_from_vocab(vocab, spaced, source)
    if spaced:
        residue_ids = {aa: i for aa, i in residue_ids.items() if aa not in RARE}
    return Tokenizer(vocab, residue_ids, space_separated=spaced, aliases=aliases, source=source)
