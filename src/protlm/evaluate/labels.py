"""A user's own labelled proteins, for ``protlm train-head``: one file in, records with a label and a split out.

Accepted inputs (each names the file, line and record when something is wrong):

- **CSV / TSV** with ``id``, ``sequence`` and ``label`` columns (``.tsv`` or a tab in the header line means tab
  separated). Per-residue labels are a string as long as the sequence (``CCHHHEEC``), with one character that
  means "unlabelled" (``-`` by default); per-protein labels are a class name or a number; multi-label rows join
  their classes with ``;`` (an empty cell: none of them). Optional columns ``set`` (``train``, ``val``,
  ``test``, ``test2``, ... ; ``valid``/``validation`` accepted) and ``validation`` (``True`` moves a ``train``
  row into validation, FLIP's convention) carry a split.
- **biotrainer's FASTA** (sacdallago/biotrainer, ``docs/data_standardization.md``): attributes in the header,
  whitespace separated: ``>Seq1 TARGET=Nucleus SET=train``. ``SET`` is ``train``, ``val``, ``test`` or
  ``test<N>`` (one more test set each) or ``pred`` (no label; left out here); biotrainer's older files use
  ``SET=train|test`` with ``VALIDATION=True|False``. Per residue, ``TARGET`` is the label string and an optional
  ``MASK=0110...`` marks residues without a label (0).
- **biotrainer's older per-residue protocol**: three FASTA files, the sequences, the labels (the label string
  as the record's body, ``SET=``/``VALIDATION=`` in the header) and an optional 0/1 mask; this is FLIP's
  secondary-structure layout, read by :func:`protlm.evaluate.datasets.load_flip_ss`.

Records come out as :class:`~protlm.evaluate.datasets.LabelledRecord` with the raw label under ``"label"``;
turning labels into class ids is the task's job (:mod:`protlm.evaluate.tasks`).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

import numpy as np

from protlm.data.fasta import VALID, open_text, read_fasta
from protlm.errors import ConfigError, InputError
from protlm.evaluate.datasets import LabelledRecord, _flags, load_flip_ss

# Task kinds train-head takes; biotrainer's protocol names are accepted as aliases.
LABEL_KINDS = ("residue_classification", "protein_classification", "protein_regression", "protein_multilabel")
KIND_ALIASES = {
    "residue": "residue_classification", "residue_to_class": "residue_classification",
    "protein": "protein_classification", "sequence_to_class": "protein_classification",
    "residues_to_class": "protein_classification",
    "regression": "protein_regression", "sequence_to_value": "protein_regression",
    "residues_to_value": "protein_regression",
    "multilabel": "protein_multilabel", "multi-label": "protein_multilabel",
}
LABEL = "label"  # key of the raw label in LabelledRecord.labels


@dataclass
class LabelFile:
    """What a label file holds: its records by split, and the kind of label they carry.

    ``splits`` maps ``train`` / ``valid`` / ``test`` / ``test2`` ... to records; a file without split information
    has everything under ``all``.
    """

    path: str
    kind: str
    splits: dict[str, list[LabelledRecord]] = field(default_factory=dict)
    left_out: int = 0  # records without a label (biotrainer's SET=pred)

    @property
    def has_splits(self) -> bool:
        return "all" not in self.splits

    def records(self) -> list[LabelledRecord]:
        return [r for recs in self.splits.values() for r in recs]


def canonical_kind(kind: str) -> str:
    k = KIND_ALIASES.get(kind, kind)
    if k not in LABEL_KINDS:
        raise ConfigError(f"unknown label kind {kind!r}; choose one of {', '.join(LABEL_KINDS)} "
                          f"(or {', '.join(KIND_ALIASES)})")
    return k


def split_name(value: str, validation: str | None, where: str) -> str:
    """A file's set name as train-head's split: train / valid / test / test<N> (or pred)."""
    v = value.strip()
    low = v.lower()
    if low in ("val", "valid", "validation"):
        return "valid"
    if low == "train":
        if validation is not None and validation.strip().lower() not in ("true", "false", ""):
            raise InputError(f"{where}: VALIDATION must be True or False, got {validation!r}")
        return "valid" if validation is not None and validation.strip().lower() == "true" else "train"
    if low.startswith("test") and (low == "test" or low[4:].isdigit()):
        if validation is not None and validation.strip().lower() == "true":
            raise InputError(f"{where}: SET=test with VALIDATION=True (validation records belong to SET=train)")
        return low
    if low == "pred":
        return "pred"
    raise InputError(f"{where}: set {v!r} is not train, val, test, test<N> or pred")


def read_labels(path: str, kind: str | None = None, *, sequences: str | None = None, mask: str | None = None,
                unlabelled: str = "-", separator: str = ";") -> LabelFile:
    """Read a label file (format from the name and content; see the module doc). ``kind`` is one of
    :data:`LABEL_KINDS` or an alias, or None to infer it from the labels (the choice is in ``LabelFile.kind``).
    ``sequences`` (and ``mask``) select biotrainer's three-file per-residue protocol with ``path`` the labels."""
    path = os.fspath(path)
    if len(unlabelled) != 1:
        raise ConfigError(f"the unlabelled character must be one character, got {unlabelled!r}")
    kind = canonical_kind(kind) if kind else None
    if sequences is not None:
        if kind not in (None, "residue_classification"):
            raise ConfigError(f"{path}: separate sequence and label files are biotrainer's per-residue protocol; "
                              f"kind {kind} takes one file")
        files = {"sequences": sequences, "labels": path, **({"mask": mask} if mask else {})}
        for p in files.values():
            if not os.path.exists(p):
                raise InputError(f"{p}: no such file")
        splits = {k: v for k, v in load_flip_ss(files).items() if v}
        for recs in splits.values():
            for r in recs:
                r.labels = {LABEL: r.labels["ss3"]}
        return LabelFile(path, "residue_classification", splits)
    if mask is not None:
        raise ConfigError("--mask goes with --sequences (biotrainer's three-file per-residue protocol); in one file "
                          "use MASK= in the FASTA header or the unlabelled character")
    name = path.lower().removesuffix(".gz")
    rows = _csv_rows(path) if name.endswith((".csv", ".tsv", ".txt")) else _fasta_rows(path)
    rows = list(rows)
    if not rows:
        raise InputError(f"{path}: no labelled records")
    kind = kind or infer_kind(rows, separator)
    splits: dict[str, list[LabelledRecord]] = {}
    left_out = 0
    with_set = [r for r in rows if r.split is not None]
    if with_set and len(with_set) != len(rows):
        bad = next(r for r in rows if r.split is None)
        raise InputError(f"{bad.where}: no set (other records have one; give every record a set, or none)")
    seen: dict[str, str] = {}
    for row in rows:
        if row.split == "pred":
            left_out += 1
            continue
        if row.id in seen:
            raise InputError(f"{row.where}: duplicate id {row.id!r} (first at {seen[row.id]})")
        seen[row.id] = row.where
        rec = _record(row, kind, unlabelled, separator)
        splits.setdefault(row.split or "all", []).append(rec)
    if not splits:
        raise InputError(f"{path}: no labelled records (every record is SET=pred)")
    return LabelFile(path, kind, splits, left_out)


@dataclass
class _Row:
    id: str
    sequence: str
    label: str
    split: str | None
    where: str
    mask: str | None = None  # biotrainer's MASK= (1 labelled, 0 not)


def _csv_rows(path: str):
    with open_text(path) as fh:
        header = fh.readline()
        delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") or "\t" in header else ","
        cols = [c.strip() for c in next(csv.reader([header], delimiter=delimiter), [])]
        if not cols or cols == [""]:
            raise InputError(f"{path}: empty file (no header row)")
        lower = [c.lower() for c in cols]
        missing = [c for c in ("id", "sequence", "label") if c not in lower]
        if missing:
            raise InputError(f"{path}: line 1: missing column(s) {', '.join(missing)} (the header has "
                             f"{', '.join(cols)}; train-head needs id, sequence, label)")
        at = {c: lower.index(c) for c in ("id", "sequence", "label", "set", "validation") if c in lower}
        for n, fields in enumerate(csv.reader(fh, delimiter=delimiter), 2):
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) < len(cols):
                raise InputError(f"{path}: line {n}: {len(fields)} fields, the header has {len(cols)}")
            get = lambda c: fields[at[c]].strip() if c in at else None
            rid = get("id")
            if not rid:
                raise InputError(f"{path}: line {n}: empty id")
            where = f"{path}: line {n}: record {rid!r}"
            split = split_name(get("set"), get("validation"), where) if get("set") else None
            yield _Row(rid, _sequence(get("sequence"), where), get("label"), split, where)


def _fasta_rows(path: str):
    line_of = _header_lines(path)
    for i, rec in enumerate(read_fasta(path)):
        where = f"{path}: line {line_of[i]}: record {rec.id!r}"
        tags: dict[str, str] = {}
        for word in rec.description.split()[1:]:
            key, sep, value = word.partition("=")
            if sep:
                tags[key] = value
        if "TARGET" not in tags and tags.get("SET") != "pred":
            raise InputError(f"{where}: no TARGET= in the header (biotrainer's convention: "
                             f"'>{rec.id} TARGET=<label> SET=train|val|test')")
        split = split_name(tags["SET"], tags.get("VALIDATION"), where) if "SET" in tags else None
        yield _Row(rec.id, rec.sequence, tags.get("TARGET", ""), split, where, tags.get("MASK"))


def _header_lines(path: str) -> list[int]:
    """Line number of each FASTA header, so that errors can name the line."""
    with open_text(path) as fh:
        return [n for n, line in enumerate(fh, 1) if line.startswith(">")]


def _sequence(text: str | None, where: str) -> str:
    seq = "".join((text or "").split()).upper()
    if not seq:
        raise InputError(f"{where}: empty sequence")
    bad = next((i for i, c in enumerate(seq) if c not in VALID), None)
    if bad is not None:
        raise InputError(f"{where}: invalid residue {seq[bad]!r} at position {bad + 1}")
    return seq


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def infer_kind(rows: list[_Row], separator: str) -> str:
    """The label kind a file's labels look like: per residue when most labels are as long as their sequence
    (and longer than one character), numbers for regression, separator-joined lists for multi-label."""
    labelled = [r for r in rows if r.split != "pred"]
    per_residue = sum(len(r.label) == len(r.sequence) > 1 for r in labelled)
    if per_residue * 2 > len(labelled) or any(r.mask is not None for r in labelled):
        return "residue_classification"
    if all(_is_number(r.label) for r in labelled):
        return "protein_regression"
    if any(separator in r.label for r in labelled):
        return "protein_multilabel"
    return "protein_classification"


def _record(row: _Row, kind: str, unlabelled: str, separator: str) -> LabelledRecord:
    L = len(row.sequence)
    mask = None
    if kind == "residue_classification":
        label = row.label
        if len(label) != L:
            raise InputError(f"{row.where}: the per-residue label has {len(label)} characters but the sequence has "
                             f"{L} residues")
        known = np.array([c != unlabelled for c in label])
        if row.mask is not None:
            flags = _flags(row.mask, row.where, "MASK")
            if flags.size != L:
                raise InputError(f"{row.where}: MASK has {flags.size} entries but the sequence has {L} residues")
            known &= flags
        if not known.all():
            mask = known
            # Unscored residues get a known class id's placeholder; the task sets their target to -1.
            label = "".join(c if k else label[known.argmax()] if known.any() else c for c, k in zip(label, known))
        if not known.any():
            raise InputError(f"{row.where}: no residue is labelled")
        value: object = label
    elif kind == "protein_regression":
        if not _is_number(row.label):
            raise InputError(f"{row.where}: label {row.label!r} is not a number (regression target)")
        value = float(row.label)
    elif kind == "protein_multilabel":
        value = tuple(sorted({p.strip() for p in row.label.split(separator) if p.strip()}))
    else:
        if not row.label:
            raise InputError(f"{row.where}: empty label")
        value = row.label
    return LabelledRecord(row.id, row.sequence, {LABEL: value}, mask, None, row.where)
