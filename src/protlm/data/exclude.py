"""Keeping evaluation proteins out of pretraining data: exclusion by record id or by exact sequence.

Exact matching only: a homologue of an evaluation protein still passes. For an honest benchmark, cluster the
corpus against the evaluation sets (e.g. mmseqs2) and exclude the ids of the hits as well.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Iterable

from protlm.data.fasta import ReadStats, open_text, read_sequences
from protlm.errors import InputError

_UNIREF = re.compile(r"^UniRef\d+_")


def _digest(sequence: str) -> bytes:
    # 8-byte digests keep a million excluded sequences in ~100 MB less than the strings would take; a false
    # match needs a 64-bit collision.
    return hashlib.blake2b(sequence.encode("ascii", errors="replace"), digest_size=8).digest()


def id_keys(record_id: str) -> set[str]:
    """The names a record answers to: the whole first word, the accession and entry name of a UniProt
    ``sp|ACC|NAME`` id, and the member accession of a UniRef cluster id (``UniRef50_P12345`` -> ``P12345``)."""
    keys = {record_id}
    parts = record_id.split("|")
    if len(parts) >= 2 and parts[0] in ("sp", "tr"):
        keys.update(parts[1:3])
    if _UNIREF.match(record_id):
        keys.add(_UNIREF.sub("", record_id))
    return keys


class Exclusion:
    """A set of ids and exact sequences to drop from a stream."""

    def __init__(self, ids: Iterable[str] = (), sequences: Iterable[str] = ()):
        self.ids = {i.strip() for i in ids if i.strip()}
        self.hashes = {_digest(s.strip().upper()) for s in sequences if s.strip()}

    @classmethod
    def from_files(cls, id_files: Iterable[str | os.PathLike] = (),
                   sequence_files: Iterable[str | os.PathLike] = ()) -> "Exclusion":
        """``id_files``: text files with one id per line (``#`` comments), or FASTA files whose record ids are
        taken; ``sequence_files``: FASTA (or CSV) files whose sequences are excluded wherever they occur."""
        ids: list[str] = []
        for path in id_files:
            ids.extend(_read_ids(os.fspath(path)))
        seqs: list[str] = []
        for path in sequence_files:
            got = [r.sequence for r in read_sequences(path, policy="x", stats=ReadStats())]
            if not got:
                raise InputError(f"{os.fspath(path)}: no sequences to exclude")
            seqs.extend(got)
        return cls(ids, seqs)

    def __len__(self) -> int:
        return len(self.ids) + len(self.hashes)

    def excludes_id(self, record_id: str) -> bool:
        return bool(self.ids) and not self.ids.isdisjoint(id_keys(record_id))

    def excludes_sequence(self, sequence: str) -> bool:
        return bool(self.hashes) and _digest(sequence) in self.hashes

    def fingerprint(self) -> str:
        """Changes whenever the exclusion set does (a resumed run must drop the same records)."""
        h = hashlib.blake2b(digest_size=8)
        for i in sorted(self.ids):
            h.update(i.encode() + b"\n")
        for d in sorted(self.hashes):
            h.update(d)
        return h.hexdigest()


def _read_ids(path: str) -> list[str]:
    ids: list[str] = []
    fasta = None  # decided by the first content line: a FASTA file contributes only its header ids
    with open_text(path) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if fasta is None:
                fasta = line.startswith(">")
            if fasta:
                if line.startswith(">") and line[1:].split():
                    ids.append(line[1:].split()[0])
            else:
                ids.append(line.split()[0])
    if not ids:
        raise InputError(f"{path}: no ids in exclusion list")
    return ids
