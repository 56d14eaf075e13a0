"""Reading protein sequence files: FASTA (plain or gzip) and CSV.

Records come out as :class:`Record` (id, description, sequence). Sequences are upper-cased, Windows line
endings and blank lines are accepted, a trailing stop ``*`` is dropped. What is wrong with a record is reported
with the file, the record id and, where it applies, the 1-based line or residue position.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

from protlm.errors import InputError

VALID = frozenset("ACDEFGHIKLMNPQRSTVWYXUZOB")
BAD_RECORD_POLICIES = ("error", "skip", "x")


class RecordError(InputError):
    """A record's content is bad (empty, or characters that are not residues); the lenient policies of
    :func:`read_fasta` ("skip", "x") deal with these."""


@dataclass(frozen=True)
class Record:
    id: str  # first word of the header (UniRef50: "UniRef50_A0A5A9P0L4")
    description: str  # the whole header line without ">"
    sequence: str


@dataclass
class ReadStats:
    """Counts kept while reading with a lenient policy."""

    read: int = 0
    skipped: int = 0
    repaired: int = 0
    reasons: dict[str, int] | None = None

    def note(self, reason: str) -> None:
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def open_text(path: str | os.PathLike, errors: str = "strict") -> io.TextIOBase:
    """Open a text file, gunzipping when the name ends in .gz or the content starts with the gzip magic.

    ``errors`` is the UTF-8 decoding policy; "surrogateescape" lets the caller find and name a bad byte."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a sequence file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if path.endswith(".gz") or magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors=errors, newline=None)
    return open(path, encoding="utf-8", errors=errors, newline=None)


def _lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        # Bad bytes come through as lone surrogates, so the record holding them can be named.
        with open_text(path, errors="surrogateescape") as fh:
            for lineno, line in enumerate(fh, 1):
                yield lineno, line.rstrip("\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{path}: compressed file is truncated or corrupt ({err})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: non-UTF-8 bytes (byte {err.object[err.start:err.start + 1]!r}); "
                         "sequence files must be ASCII text") from None


def read_fasta(
    path: str | os.PathLike,
    policy: str = "error",
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """Yield the records of a FASTA file.

    ``policy`` decides what happens to a record that is empty or has characters other than residue letters:
    "error" (default) raises naming the record and position; "skip" drops it and counts it in ``stats``;
    "x" drops gaps (``-``, ``.``) and replaces other invalid characters with X (an empty record is still
    skipped). Under "error", gaps and stops inside a sequence are reported like any invalid character.
    """
    if policy not in BAD_RECORD_POLICIES:
        raise ValueError(f"policy must be one of {BAD_RECORD_POLICIES}, got {policy!r}")
    path = os.fspath(path)
    stats = stats if stats is not None else ReadStats()
    header: str | None = None
    header_line = 0
    chunks: list[str] = []
    saw_any = False

    def finish() -> Record | None:
        seq = "".join(chunks).replace(" ", "").replace("\t", "").upper()
        if seq.endswith("*"):
            seq = seq[:-1]
        rid = header.split()[0] if header.split() else f"<record at line {header_line}>"
        where = f"{path}: record {rid!r} (line {header_line})"
        if not seq:
            if policy == "error":
                raise RecordError(f"{where}: empty sequence")
            stats.skipped += 1
            stats.note("empty")
            return None
        bad = [i for i, c in enumerate(seq) if c not in VALID]
        if bad:
            if not seq.isascii():
                pos = next(i for i, c in enumerate(seq) if not c.isascii())
                if policy == "error" and _is_bad_byte(seq[pos]):
                    raise RecordError(f"{path}: non-UTF-8 bytes in record {rid!r} (line {header_line}): "
                                      f"byte 0x{ord(seq[pos]) - 0xDC00:02x} at residue {pos + 1}")
                if policy == "error":
                    raise RecordError(f"{where}: non-ASCII character {seq[pos]!r} at residue {pos + 1}")
            if policy == "error":
                c = seq[bad[0]]
                what = "gap" if c in "-." else "stop codon" if c == "*" else "invalid character"
                raise RecordError(f"{where}: {what} {c!r} at residue {bad[0] + 1}"
                                 + (f" ({len(bad) - 1} more)" if len(bad) > 1 else ""))
            if policy == "skip":
                stats.skipped += 1
                stats.note("invalid characters")
                return None
            # policy "x": gaps are alignment columns, not residues, so they are dropped; the rest become X
            seq = "".join("" if c in "-." else (c if c in VALID else "X") for c in seq)
            stats.repaired += 1
            if not seq:
                stats.skipped += 1
                stats.note("empty")
                return None
        stats.read += 1
        return Record(rid, header, seq)

    for lineno, line in _lines(path):
        if line.startswith(">"):
            if not line.isascii() and any(_is_bad_byte(c) for c in line):
                c = next(c for c in line if _is_bad_byte(c))
                raise InputError(f"{path}: non-UTF-8 bytes in the header at line {lineno} (byte 0x{ord(c) - 0xDC00:02x}); "
                                 "sequence files must be UTF-8 text")
            if header is not None:
                rec = finish()
                if rec is not None:
                    yield rec
            header, header_line, chunks = line[1:].strip(), lineno, []
            saw_any = True
        elif line.strip():
            if header is None:
                raise InputError(f"{path}: line {lineno}: sequence data before the first '>' header; is this FASTA?")
            chunks.append(line.strip())
    if header is not None:
        rec = finish()
        if rec is not None:
            yield rec
    if not saw_any:
        raise InputError(f"{path}: no FASTA records (empty file or no '>' header lines)")


def _is_bad_byte(c: str) -> bool:
    return "\udc80" <= c <= "\udcff"  # how surrogateescape carries an undecodable byte


def read_csv_sequences(path: str | os.PathLike, id_column: str | None = None,
                       sequence_column: str | None = None) -> Iterator[Record]:
    """Records from a CSV with an id and a sequence column (guessed by name when not given)."""
    path = os.fspath(path)
    try:
        yield from _csv_records(path, id_column, sequence_column)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{path}: compressed file is truncated or corrupt ({err})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: non-UTF-8 byte 0x{err.object[err.start]:02x}; "
                         "sequence files must be UTF-8 text") from None


def _csv_records(path: str, id_column: str | None, sequence_column: str | None) -> Iterator[Record]:
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if not cols:
            raise InputError(f"{path}: empty CSV (no header row)")
        lower = {c.lower(): c for c in cols}
        id_col = id_column or next((lower[c] for c in ("id", "name", "accession", "entry", "protein_id") if c in lower), cols[0])
        seq_col = sequence_column or next((lower[c] for c in ("sequence", "seq", "input", "primary") if c in lower), None)
        if seq_col is None or seq_col not in cols or id_col not in cols:
            raise InputError(f"{path}: cannot find id/sequence columns in header {cols}")
        reader.fieldnames = cols
        for n, row in enumerate(reader, 2):
            seq = (row.get(seq_col) or "").replace(" ", "").strip().upper()
            rid = (row.get(id_col) or "").strip()
            if not rid:
                raise InputError(f"{path}: line {n}: empty id")
            if not seq:
                raise RecordError(f"{path}: line {n}: record {rid!r} has an empty sequence")
            bad = next((i for i, c in enumerate(seq) if c not in VALID), None)
            if bad is not None:
                raise RecordError(f"{path}: line {n}: record {rid!r}: invalid character {seq[bad]!r} at residue {bad + 1}")
            yield Record(rid, rid, seq)


def read_sequences(path: str | os.PathLike, policy: str = "error", stats: ReadStats | None = None) -> Iterator[Record]:
    """FASTA (optionally gzipped) or CSV, chosen by the file name."""
    name = os.fspath(path).lower().removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        return read_csv_sequences(path)
    return read_fasta(path, policy=policy, stats=stats)
