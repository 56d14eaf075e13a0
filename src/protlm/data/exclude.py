"""Keeping evaluation proteins out of pretraining data: by record id, by exact sequence, and by shared segments.

Exact matching misses most copies that matter: a CATH domain cut from a PDB chain, the same protein with or
without its tag or signal peptide, a fragment. :class:`SharedSegments` catches those: a sequence is dropped when
many of its k-mers (identical stretches of k residues; 10 by default) also occur in the excluded sequences,
either a large fraction of its own k-mers (it is mostly a copy) or a large absolute number (it contains one).
Short shared stretches such as expression tags stay below both thresholds. Diverged homologues (say 40%
identity) share few exact k-mers and still pass; for those, cluster the corpus against the evaluation sets with
an alignment tool (e.g. mmseqs2) and exclude the ids of the hits.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from protlm.data.fasta import ReadStats, open_text, read_sequences
from protlm.errors import ConfigError, InputError

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


def kmer_codes(sequence: str, k: int) -> np.ndarray:
    """Every k-mer of ``sequence`` (upper-cased letters) as an int64: 5 bits per residue, so k <= 12."""
    letters = np.frombuffer(sequence.upper().encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64) & 31
    if len(letters) < k:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(letters, k)
    return windows @ (32 ** np.arange(k - 1, -1, -1, dtype=np.int64))


@dataclass(frozen=True)
class SharedSegments:
    """The near-copy rule: drop a sequence when at least ``fraction`` of its k-mers, or at least ``count`` of
    them, occur in the excluded sequences. ``k`` = 0 turns the rule off (exact matches only)."""

    k: int = 10
    fraction: float = 0.5
    count: int = 50

    def __post_init__(self) -> None:
        if not 0 <= self.k <= 12:
            raise ConfigError(f"exclusion k-mer length must be 0 (off) to 12, got {self.k}")
        if not 0 < self.fraction <= 1 or self.count < 1:
            raise ConfigError(f"exclusion thresholds: fraction in (0, 1] and count >= 1 (got {self.fraction}, "
                              f"{self.count})")


class Exclusion:
    """A set of ids, exact sequences and (optionally) the k-mers of those sequences to drop from a stream."""

    def __init__(self, ids: Iterable[str] = (), sequences: Iterable[str] = (), near: SharedSegments | None = None):
        self.ids = {i.strip() for i in ids if i.strip()}
        seqs = [s.strip().upper() for s in sequences if s.strip()]
        self.hashes = {_digest(s) for s in seqs}
        self.near = near if near is not None and near.k > 0 else None
        self.kmers = np.zeros(0, dtype=np.int64)
        if self.near is not None and seqs:
            self.kmers = np.unique(np.concatenate([kmer_codes(s, self.near.k) for s in seqs]))

    @classmethod
    def from_files(cls, id_files: Iterable[str | os.PathLike] = (),
                   sequence_files: Iterable[str | os.PathLike] = (),
                   near: SharedSegments | None = None) -> "Exclusion":
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
        return cls(ids, seqs, near)

    def __len__(self) -> int:
        return len(self.ids) + len(self.hashes)

    def shared_kmers(self, sequence: str) -> tuple[int, int]:
        """(k-mers of ``sequence`` found among the excluded sequences' k-mers, k-mers of ``sequence``)."""
        if self.near is None or not len(self.kmers):
            return 0, 0
        codes = kmer_codes(sequence, self.near.k)
        pos = np.searchsorted(self.kmers, codes).clip(max=len(self.kmers) - 1)
        return int((self.kmers[pos] == codes).sum()), len(codes)

    def reason(self, sequence: str) -> str | None:
        """Why ``sequence`` is excluded ("excluded sequence", "shares segments with an excluded sequence"), or
        None when it is kept."""
        if self.excludes_sequence(sequence):
            return "excluded sequence"
        shared, total = self.shared_kmers(sequence)
        if shared and (shared >= self.near.count or shared >= self.near.fraction * total):
            return "shares segments with an excluded sequence"
        return None

    def excludes_id(self, record_id: str) -> bool:
        return bool(self.ids) and not self.ids.isdisjoint(id_keys(record_id))

    def excludes_sequence(self, sequence: str) -> bool:
        """Exact match (case-insensitive)."""
        return bool(self.hashes) and _digest(sequence.upper()) in self.hashes

    def fingerprint(self) -> str:
        """Changes whenever the exclusion set does (a resumed run must drop the same records)."""
        h = hashlib.blake2b(digest_size=8)
        for i in sorted(self.ids):
            h.update(i.encode() + b"\n")
        for d in sorted(self.hashes):
            h.update(d)
        if self.near is not None:
            h.update(repr(self.near).encode())
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
