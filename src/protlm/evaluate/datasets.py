"""Readers for the benchmark files in the formats users have them in.

Every reader returns ``{split: [LabelledRecord, ...]}``. A record keeps its raw labels by name (``ss3``, ``ss8``,
``fitness``, ``location``, ``membrane``, ``contacts``); turning labels into class ids, and complaining about
unknown classes, is the task's job (see ``tasks.py``). Files that carry no split information give one split
called ``all``. Readers check what the format promises (labels as long as the sequence, known residue letters)
and name the file and record when it does not hold.

Formats (``format:`` in a suite's dataset entry, with the file keys it takes):

=====================  =====================================  ===================================================
format                 files                                  what it is
=====================  =====================================  ===================================================
``ss_csv``             one per split (``all:`` usually)       ProtTrans/NetSurfP CSV: ``input, dssp3, dssp8,
                                                              disorder[, cb513_mask]`` with a space after each
                                                              comma and space-separated residues/states; or
                                                              ``id,input,dssp3,dssp8,...`` unspaced (protlm's
                                                              CASP14 table). ``disorder`` 0 = unresolved residue
``flip_ss``            ``sequences``, ``labels``, ``mask``    FLIP secondary_structure split: FASTA of sequences,
                                                              FASTA of H/E/C with ``SET=`` / ``VALIDATION=`` in
                                                              the header, FASTA of 0/1 resolved flags
``flip_csv``           ``path``                               FLIP fitness CSV ``sequence,target,set,validation``
``deeploc_fasta``      one per split                          ``>ACC Location-M|S|U [set]`` FASTA (DeepLoc / LA)
``deeploc_csv``        one per split                          ProtTrans ``input, loc, membrane`` CSV
``tape_fluorescence``  one per split                          TAPE fluorescence JSON (``primary``,
                                                              ``log_fluorescence``)
``proteinnet``         one per split                          ProteinNet text records ([ID] [PRIMARY]
                                                              [TERTIARY] [MASK] ...)
``pdb_contacts``       ``all:`` a directory                   PDB files (plain or .gz); contacts from Cβ
=====================  =====================================  ===================================================

Records without an id in the file get one: ``<file stem>#<row>`` for per-residue sets, and ``seq-<hash>`` (a
hash of the sequence) for variant sets like GB1, where the same sequence recurs across split files.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from protlm.data.fasta import VALID, open_text, read_fasta
from protlm.errors import InputError


@dataclass
class LabelledRecord:
    id: str
    sequence: str
    labels: dict[str, Any] = field(default_factory=dict)  # raw annotations by name
    mask: np.ndarray | None = None  # (L,) bool: residues with a known label (None = all)
    positions: np.ndarray | None = None  # (L,) residue numbers, for contact separation (None = 0..L-1)
    where: str = ""  # "<file>: record '<id>'" for error messages


def sequence_id(seq: str) -> str:
    return "seq-" + hashlib.sha1(seq.encode()).hexdigest()[:16]


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".gz", ".csv", ".fasta", ".fa", ".json", ".txt"):
        name = name.removesuffix(ext)
    return name


def _check_sequence(seq: str, where: str) -> str:
    seq = "".join(seq.split()).upper()
    if not seq:
        raise InputError(f"{where}: empty sequence")
    bad = next((i for i, c in enumerate(seq) if c not in VALID), None)
    if bad is not None:
        raise InputError(f"{where}: invalid residue {seq[bad]!r} at position {bad + 1}")
    return seq


def _check_length(what: str, got: int, seq_len: int, where: str) -> None:
    if got != seq_len:
        raise InputError(f"{where}: {what} has {got} entries but the sequence has {seq_len} residues")


def _csv_rows(path: str):
    """Rows of a CSV as dicts with stripped column names (ProtTrans files put a space after each comma)."""
    with open_text(path) as fh:
        reader = csv.DictReader(fh, skipinitialspace=True)
        if not reader.fieldnames:
            raise InputError(f"{path}: empty CSV (no header row)")
        reader.fieldnames = [c.strip() for c in reader.fieldnames]
        for n, row in enumerate(reader, 2):
            yield n, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None}


def _require_columns(path: str, row: dict, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in row]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(row)})")


def _flags(text: str, where: str, what: str) -> np.ndarray:
    """0/1 flags written as '1.0 0.0 ...' or '0110...'."""
    parts = text.split() if " " in text.strip() else list(text.strip())
    try:
        return np.array([float(p) for p in parts]) > 0.5
    except ValueError:
        raise InputError(f"{where}: {what} must be 0/1 values") from None


# --- secondary structure --------------------------------------------------------------------------------------
def read_ss_csv(path: str) -> list[LabelledRecord]:
    out = []
    for n, row in _csv_rows(path):
        if n == 2:
            _require_columns(path, row, ("input", "dssp3"))
        rid = row.get("id") or f"{_stem(path)}#{n - 2}"
        where = f"{path}: record {rid!r} (line {n})"
        seq = _check_sequence(row["input"] or "", where)
        labels = {}
        for key in ("dssp3", "dssp8"):
            if row.get(key):
                lab = "".join(row[key].split())
                _check_length(key, len(lab), len(seq), where)
                labels[key.replace("dssp", "ss")] = lab
        mask = None
        if row.get("disorder"):
            mask = _flags(row["disorder"], where, "disorder")
            _check_length("disorder", mask.size, len(seq), where)
        out.append(LabelledRecord(rid, seq, labels, mask, None, where))
    if not out:
        raise InputError(f"{path}: no rows")
    return out


def load_ss_csv(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    return {split: read_ss_csv(path) for split, path in files.items()}


def load_flip_ss(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    for key in ("sequences", "labels"):
        if key not in files:
            raise InputError(f"flip_ss dataset needs a {key!r} file (has {', '.join(files) or 'none'})")
    seqs = {r.id: r.sequence for r in read_fasta(files["sequences"])}
    masks = {}
    if files.get("mask"):
        for r in _raw_fasta(files["mask"]):
            masks[r[0]] = r[2]
    splits: dict[str, list[LabelledRecord]] = {"train": [], "valid": [], "test": []}
    for rid, header, text, line in _raw_fasta(files["labels"]):
        where = f"{files['labels']}: record {rid!r} (line {line})"
        tags = dict(t.split("=", 1) for t in header.split()[1:] if "=" in t)
        if "SET" not in tags:
            raise InputError(f"{where}: header has no SET=train|test")
        if rid not in seqs:
            raise InputError(f"{where}: no sequence with this id in {files['sequences']}")
        seq = seqs[rid]
        _check_length("secondary structure", len(text), len(seq), where)
        mask = None
        if rid in masks:
            mask = _flags(masks[rid], f"{files['mask']}: record {rid!r}", "mask")
            _check_length("mask", mask.size, len(seq), f"{files['mask']}: record {rid!r}")
        split = "test" if tags["SET"] == "test" else "valid" if tags.get("VALIDATION") == "True" else "train"
        splits[split].append(LabelledRecord(rid, seq, {"ss3": text}, mask, None, where))
    return splits


def _raw_fasta(path: str):
    """(id, header, text, line) of a FASTA whose records are labels, not residues."""
    rid = header = None
    chunks: list[str] = []
    line_at = 0
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if line.startswith(">"):
                if rid is not None:
                    yield rid, header, "".join(chunks), line_at
                header = line[1:].strip()
                rid = header.split()[0] if header else f"<line {lineno}>"
                chunks, line_at = [], lineno
            elif line.strip():
                if rid is None:
                    raise InputError(f"{path}: line {lineno}: data before the first '>' header")
                chunks.append(line.strip())
    if rid is not None:
        yield rid, header, "".join(chunks), line_at


# --- fitness / fluorescence -----------------------------------------------------------------------------------
def load_flip_csv(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    path = files.get("path")
    if not path:
        raise InputError(f"flip_csv dataset needs a 'path' file (has {', '.join(files) or 'none'})")
    splits: dict[str, list[LabelledRecord]] = {"train": [], "valid": [], "test": []}
    for n, row in _csv_rows(path):
        if n == 2:
            _require_columns(path, row, ("sequence", "target", "set"))
        seq = _check_sequence(row["sequence"] or "", f"{path}: line {n}")
        rid = sequence_id(seq)
        where = f"{path}: record {rid!r} (line {n})"
        try:
            target = float(row["target"])
        except (TypeError, ValueError):
            raise InputError(f"{where}: target {row['target']!r} is not a number") from None
        s = row["set"]
        if s not in ("train", "test"):
            raise InputError(f"{where}: set {s!r} is not train or test")
        split = "test" if s == "test" else "valid" if str(row.get("validation")).lower() == "true" else "train"
        splits[split].append(LabelledRecord(rid, seq, {"fitness": target}, None, None, where))
    return splits


def read_tape_fluorescence(path: str) -> list[LabelledRecord]:
    """TAPE's fluorescence JSON: a list of objects with ``primary`` and ``log_fluorescence`` (a number or a
    one-element list); ``id`` is used when present."""
    try:
        with open_text(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records")
    out = []
    for n, item in enumerate(data):
        where = f"{path}: record {n}"
        if not isinstance(item, dict) or "primary" not in item or "log_fluorescence" not in item:
            raise InputError(f"{where}: needs 'primary' and 'log_fluorescence'")
        seq = _check_sequence(str(item["primary"]), where)
        value = item["log_fluorescence"]
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        if not isinstance(value, (int, float)):
            raise InputError(f"{where}: log_fluorescence {value!r} is not a number")
        rid = str(item.get("id", sequence_id(seq)))
        out.append(LabelledRecord(rid, seq, {"fitness": float(value)}, None, None, f"{path}: record {rid!r}"))
    return out


def load_tape_fluorescence(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    return {split: read_tape_fluorescence(path) for split, path in files.items()}


# --- localisation -----------------------------------------------------------------------------------------------
def read_deeploc_fasta(path: str) -> list[LabelledRecord]:
    out = []
    for rec in read_fasta(path):
        where = f"{path}: record {rec.id!r}"
        parts = rec.description.split()
        if len(parts) < 2 or "-" not in parts[1]:
            raise InputError(f"{where}: header needs 'Location-M|S|U' after the accession, got {rec.description!r}")
        loc, mem = parts[1].rsplit("-", 1)
        out.append(LabelledRecord(rec.id, rec.sequence, {"location": loc, "membrane": mem}, None, None, where))
    return out


def read_deeploc_csv(path: str) -> list[LabelledRecord]:
    out = []
    for n, row in _csv_rows(path):
        if n == 2:
            _require_columns(path, row, ("input", "loc", "membrane"))
        rid = f"{_stem(path)}#{n - 2}"
        where = f"{path}: record {rid!r} (line {n})"
        seq = _check_sequence(row["input"] or "", where)
        out.append(LabelledRecord(rid, seq, {"location": row["loc"], "membrane": row["membrane"]}, None, None, where))
    return out


def load_deeploc_fasta(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    return {split: read_deeploc_fasta(path) for split, path in files.items()}


def load_deeploc_csv(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    return {split: read_deeploc_csv(path) for split, path in files.items()}


# --- contacts ---------------------------------------------------------------------------------------------------
def read_proteinnet(path: str) -> list[LabelledRecord]:
    """ProteinNet text records. Coordinates are picometres, 3 rows (x, y, z) of 3L values (N, Cα, C per residue);
    contacts use a virtual Cβ from the backbone (Cα for glycine); residues marked '-' have unknown contacts."""
    from protlm.evaluate.structure import contact_map, virtual_cb

    out = []
    entry: dict[str, list[str]] = {}
    section = None
    start = 0

    def finish():
        if not entry:
            return
        rid = (entry.get("ID") or [f"<record at line {start}>"])[0].strip()
        where = f"{path}: record {rid!r} (line {start})"
        if "PRIMARY" not in entry:
            raise InputError(f"{where}: no [PRIMARY] section")
        seq = _check_sequence("".join(entry["PRIMARY"]), where)
        L = len(seq)
        labels: dict[str, Any] = {}
        mask = None
        if "MASK" in entry:
            m = "".join(entry["MASK"]).strip()
            _check_length("[MASK]", len(m), L, where)
            mask = np.array([c == "+" for c in m])
        if "TERTIARY" in entry:
            rows = [ln.split() for ln in entry["TERTIARY"] if ln.strip()]
            if len(rows) != 3:
                raise InputError(f"{where}: [TERTIARY] needs 3 lines (x, y, z), got {len(rows)}")
            try:
                xyz = np.array(rows, dtype=np.float64).T / 100.0  # (3L, 3) in Å
            except ValueError:
                raise InputError(f"{where}: [TERTIARY] has non-numeric values") from None
            _check_length("[TERTIARY] (3 atoms per residue)", xyz.shape[0], 3 * L, where)
            n_at, ca, c = xyz[0::3], xyz[1::3], xyz[2::3]
            atom = np.where(np.array([aa == "G" for aa in seq])[:, None], ca, virtual_cb(n_at, ca, c))
            if mask is not None:
                atom[~mask] = np.nan
            labels["contacts"] = contact_map(atom)
        out.append(LabelledRecord(rid, seq, labels, mask, None, where))

    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            s = line.strip()
            if s.startswith("[") and s.endswith("]"):
                section = s[1:-1].upper()
                if section == "ID":
                    finish()
                    entry, start = {}, lineno
                entry[section] = []
            elif section is not None and s:
                entry[section].append(s)
    finish()
    if not out:
        raise InputError(f"{path}: no ProteinNet records ([ID] sections)")
    return out


def load_proteinnet(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    return {split: read_proteinnet(path) for split, path in files.items()}


def load_pdb_contacts(files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    """One record per PDB file of a directory (``*.pdb``, ``*.pdb.gz``, ``*.ent(.gz)``), id = file name stem."""
    from protlm.evaluate.structure import read_pdb_residues, structure_contacts

    out = {}
    for split, directory in files.items():
        if not os.path.isdir(directory):
            raise InputError(f"{directory}: not a directory of PDB files")
        paths = sorted(p for pat in ("*.pdb", "*.pdb.gz", "*.ent", "*.ent.gz") for p in glob.glob(os.path.join(directory, pat)))
        if not paths:
            raise InputError(f"{directory}: no .pdb / .pdb.gz files")
        recs = []
        for p in paths:
            residues = read_pdb_residues(p)
            rid = os.path.basename(p).split(".")[0]
            seq = "".join(r.aa for r in residues)
            recs.append(LabelledRecord(rid, seq, {"contacts": structure_contacts(residues)}, None,
                               np.array([r.number for r in residues]), f"{p}: record {rid!r}"))
        out[split] = recs
    return out


FORMATS: dict[str, Callable[[dict[str, str]], dict[str, list[LabelledRecord]]]] = {
    "ss_csv": load_ss_csv,
    "flip_ss": load_flip_ss,
    "flip_csv": load_flip_csv,
    "tape_fluorescence": load_tape_fluorescence,
    "deeploc_fasta": load_deeploc_fasta,
    "deeploc_csv": load_deeploc_csv,
    "proteinnet": load_proteinnet,
    "pdb_contacts": load_pdb_contacts,
}


def load_dataset(name: str, fmt: str, files: dict[str, str]) -> dict[str, list[LabelledRecord]]:
    """Read one dataset entry; every file must exist. Duplicate ids within a split are an error unless they
    carry the same sequence (variant sets list a sequence once per split file)."""
    if fmt not in FORMATS:
        raise InputError(f"dataset {name!r}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    for key, path in files.items():
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file (dataset {name!r}, file {key!r})")
    splits = FORMATS[fmt](files)
    for split, recs in splits.items():
        seen: dict[str, str] = {}
        for r in recs:
            if r.id in seen and seen[r.id] != r.sequence:
                raise InputError(f"{r.where}: duplicate id in split {split!r} of dataset {name!r}")
            seen[r.id] = r.sequence
    return splits
