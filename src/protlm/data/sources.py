"""Sequence sources behind :class:`protlm.data.stream.SequenceStream`: FASTA (plain or gzip), parquet, and a
directory written by Hugging Face ``datasets`` (``save_to_disk``).

Each source is cut into *units* that can be read from a saved offset, so a stream can resume in the middle of
a file without re-reading it: a FASTA file is one unit (offset in bytes of a header line, gzip decompresses up
to it), a parquet file has one unit per row group, a ``datasets`` directory one unit per ``rows_per_unit`` rows
(offsets in rows). Sources yield raw records; validation and filtering happen in the stream.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

from protlm.errors import InputError

SEQUENCE_COLUMNS = ("sequence", "seq", "sequences", "text", "primary", "protein_sequence", "aa_seq")
ID_COLUMNS = ("id", "name", "accession", "entry", "uniref_id", "protein_id", "uniprot_id", "cluster_id")
FILE_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fasta.gz", ".fa.gz", ".faa.gz", ".fas.gz", ".parquet")


@dataclass
class RawRecord:
    id: str  # first word of the FASTA header (UniRef50: "UniRef50_A0A5A9P0L4"), or the id column
    text: str  # the sequence as stored: upper-cased, whitespace removed, not yet validated
    where: str  # names the record in messages: "file: record 'id' (line N)" or "file: row N"


class Source:
    """One file or dataset; subclasses define the units."""

    path: str

    @property
    def n_units(self) -> int:
        raise NotImplementedError

    def read(self, unit: int, offset: int, line: int) -> Iterator[tuple[RawRecord, int, int]]:
        """Records of ``unit`` from ``offset``; each comes with the (offset, line) just past it."""
        raise NotImplementedError

    def fingerprint(self) -> list:
        """What must match for a saved data position to be valid here (name and size, not the full path, so a
        moved dataset still resumes)."""
        return [os.path.basename(self.path.rstrip("/")), _size(self.path)]

    def __getstate__(self) -> dict:
        # Open handles do not cross into DataLoader workers; each process reopens lazily.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    return os.path.getsize(path)


class FastaSource(Source):
    """A FASTA file, plain or gzip (told by the magic bytes, not only the name)."""

    def __init__(self, path: str):
        self.path = path
        if os.path.getsize(path) == 0:
            raise InputError(f"{path}: empty file")
        try:
            with open(path, "rb") as fh:
                self.gzipped = fh.read(2) == b"\x1f\x8b"
            with self._open() as fh:
                head = fh.read(4096)
        except PermissionError:
            raise InputError(f"{path}: cannot read (permission denied)") from None
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{path}: cannot read ({err})") from None
        first = head.lstrip()[:1]
        if not first:
            raise InputError(f"{path}: empty file (no FASTA records)")
        if first != b">":
            raise InputError(f"{path}: does not start with a '>' header; expected FASTA")

    @property
    def n_units(self) -> int:
        return 1

    def _open(self):
        return gzip.open(self.path, "rb") if self.gzipped else open(self.path, "rb", buffering=1 << 20)

    def read(self, unit: int, offset: int, line: int) -> Iterator[tuple[RawRecord, int, int]]:
        path = self.path
        header: bytes | None = None
        header_line = line
        chunks: list[bytes] = []
        pos = offset
        try:
            with self._open() as fh:
                if offset:
                    fh.seek(offset)
                for raw in fh:
                    if raw[:1] == b">":
                        if header is not None:
                            yield self._record(header, header_line, chunks), pos, line
                        header, header_line, chunks = raw[1:], line, []
                    elif header is None:
                        if raw.strip():
                            raise InputError(f"{path}: line {line}: sequence data before the first '>' header")
                    else:
                        chunks.append(raw)
                    pos += len(raw)
                    line += 1
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise InputError(f"{path}: compressed file is truncated or corrupt ({err})") from None
        if header is not None:
            yield self._record(header, header_line, chunks), pos, line

    def _record(self, header: bytes, line: int, chunks: list[bytes]) -> RawRecord:
        words = header.decode("utf-8", errors="replace").split()
        rid = words[0] if words else f"<record at line {line}>"
        text = b"".join(chunks).translate(None, b" \t\r\n").upper().decode("latin-1")
        return RawRecord(rid, text, f"{self.path}: record {rid!r} (line {line})")


class _TableSource(Source):
    """Shared column handling of parquet files and ``datasets`` directories."""

    def _pick_columns(self, names: list[str], sequence_column: str | None, id_column: str | None) -> None:
        lower = {n.lower(): n for n in names}
        if sequence_column is not None:
            if sequence_column not in names:
                raise InputError(f"{self.path}: no column {sequence_column!r} (columns: {', '.join(names)})")
            self.sequence_column = sequence_column
        else:
            found = next((lower[c] for c in SEQUENCE_COLUMNS if c in lower), None)
            if found is None:
                raise InputError(f"{self.path}: no sequence column among {', '.join(names)}; name it with "
                                 "sequence_column")
            self.sequence_column = found
        if id_column is not None and id_column not in names:
            raise InputError(f"{self.path}: no column {id_column!r} (columns: {', '.join(names)})")
        self.id_column = id_column or next((lower[c] for c in ID_COLUMNS if c in lower), None)

    def _records(self, seqs: list, ids: list | None, first_row: int, offset: int):
        for i in range(offset, len(seqs)):
            row = first_row + i
            rid = str(ids[i]) if ids is not None and ids[i] is not None else f"row{row}"
            text = (seqs[i] or "").replace(" ", "").strip().upper()
            yield RawRecord(rid, text, f"{self.path}: row {row} (id {rid!r})"), i + 1, 0


class ParquetSource(_TableSource):
    def __init__(self, path: str, sequence_column: str | None = None, id_column: str | None = None):
        import pyarrow.parquet as pq

        self.path = path
        try:
            meta = pq.ParquetFile(path)
        except PermissionError:
            raise InputError(f"{path}: cannot read (permission denied)") from None
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError subclasses for non-parquet bytes
            raise InputError(f"{path}: not a readable parquet file ({err})") from None
        self._pick_columns(meta.schema_arrow.names, sequence_column, id_column)
        self.row_counts = [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if sum(self.row_counts) == 0:
            raise InputError(f"{path}: empty parquet file (no rows)")
        self.first_rows = [sum(self.row_counts[:i]) for i in range(len(self.row_counts))]

    @property
    def n_units(self) -> int:
        return len(self.row_counts)

    def read(self, unit: int, offset: int, line: int):
        import pyarrow.parquet as pq

        if getattr(self, "_open_file", None) is None:
            self._open_file = pq.ParquetFile(self.path)
        cols = [self.sequence_column] + ([self.id_column] if self.id_column else [])
        table = self._open_file.read_row_group(unit, columns=cols)
        ids = table.column(self.id_column).to_pylist() if self.id_column else None
        yield from self._records(table.column(self.sequence_column).to_pylist(), ids, self.first_rows[unit], offset)


class HFDatasetSource(_TableSource):
    """A directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, read at ``split``)."""

    def __init__(self, path: str, sequence_column: str | None = None, id_column: str | None = None,
                 split: str = "train", rows_per_unit: int = 16384):
        self.path, self.split, self.rows_per_unit = path, split, rows_per_unit
        ds = self._dataset()
        self._pick_columns(list(ds.column_names), sequence_column, id_column)
        self.n_rows = ds.num_rows
        if self.n_rows == 0:
            raise InputError(f"{path}: empty dataset (no rows)")

    def _dataset(self):
        if getattr(self, "_open_ds", None) is not None:
            return self._open_ds
        try:
            import datasets
        except ImportError:
            raise InputError(f"{self.path}: reading a datasets directory needs the 'datasets' package "
                             "(pip install 'protlm[hf]')") from None
        try:
            ds = datasets.load_from_disk(self.path)
        except Exception as err:  # datasets raises FileNotFoundError/ValueError/arrow errors for broken dirs
            raise InputError(f"{self.path}: not a readable datasets directory ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise InputError(f"{self.path}: no split {self.split!r} (splits: {', '.join(ds)})")
            ds = ds[self.split]
        self._open_ds = ds.with_format("arrow")
        return self._open_ds

    @property
    def n_units(self) -> int:
        return -(-self.n_rows // self.rows_per_unit)

    def read(self, unit: int, offset: int, line: int):
        start = unit * self.rows_per_unit
        table = self._dataset()[start : min(start + self.rows_per_unit, self.n_rows)]
        ids = table.column(self.id_column).to_pylist() if self.id_column else None
        yield from self._records(table.column(self.sequence_column).to_pylist(), ids, start, offset)


def open_sources(paths, sequence_column: str | None = None, id_column: str | None = None,
                 split: str = "train") -> list[Source]:
    """Sources for a path or list of paths: files, glob patterns, ``datasets`` directories, or directories of
    sequence files (read in sorted order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources: list[Source] = []
    for entry in paths:
        entry = os.fspath(entry)
        if any(c in entry for c in "*?[") and not os.path.exists(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise InputError(f"{entry}: no files match this pattern")
            sources.extend(open_sources(matches, sequence_column, id_column, split))
        elif os.path.isdir(entry):
            if any(os.path.exists(os.path.join(entry, f)) for f in ("state.json", "dataset_dict.json")):
                sources.append(HFDatasetSource(entry, sequence_column, id_column, split))
            else:
                files = sorted(os.path.join(entry, f) for f in os.listdir(entry) if f.lower().endswith(FILE_SUFFIXES))
                if not files:
                    raise InputError(f"{entry}: directory holds no FASTA or parquet files and is not a datasets "
                                     "directory")
                sources.extend(_open_one(f, sequence_column, id_column, split) for f in files)
        else:
            sources.append(_open_one(entry, sequence_column, id_column, split))
    if not sources:
        raise InputError("no training data paths given")
    return sources


def _open_one(path: str, sequence_column, id_column, split) -> Source:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot read (permission denied)")
    if path.lower().endswith(".parquet"):
        return ParquetSource(path, sequence_column, id_column)
    if path.lower().removesuffix(".gz").endswith((".csv", ".tsv")):
        raise InputError(f"{path}: training data must be FASTA, parquet or a datasets directory, not CSV")
    return FastaSource(path)
