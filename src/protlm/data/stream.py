"""The pretraining data stream: residue-id arrays from FASTA / parquet / ``datasets`` files, filtered, shuffled,
cropped, sharded, and resumable at an exact position.

How the order is defined (so that it is deterministic and the same whatever the number of ranks and workers):

1. Every epoch reads the sources' units (files, row groups, row ranges; see :mod:`protlm.data.sources`) in an
   order shuffled with (seed, epoch).
2. The raw records are cut into blocks of ``block_size``. Each block is filtered (invalid/empty records per
   ``policy``, length filters, the exclusion list) and then shuffled with (seed, epoch, block).
3. The filtered, shuffled records of all blocks and epochs, one after the other, form one endless sequence;
   a record's index in it is its global *position*.
4. A shard keeps a fixed pattern of positions (:class:`Shard`). With ``chunk = c`` sequences per rank and
   ``R`` ranks, the stream is read in global batches of ``R*c`` positions; rank ``r`` takes every R-th position
   of each global batch starting at ``r``, and of ``W`` DataLoader workers, worker ``w`` takes the global
   batches ``m`` with ``m % W == w``. Shards never overlap and together yield every record once per epoch,
   and batch ``m`` holds the same records whatever the number of ranks (for the same ``R*c``) and workers.
   Plain iteration uses ``c = 1``: rank r, worker w yields the positions ``p`` with ``p % R == r`` and
   ``(p // R) % W == w``.
5. A record longer than ``max_length - 2`` residues is cropped to a window whose start is drawn with
   (seed, position), so the prefix token and ``</s>`` still fit.

Every shard reads (and filters) every block and keeps its share, which costs parsing time, not memory: only
one block is held at a time. The saved position of a shard is the block it is in (re-read on resume from a
byte or row offset, so no earlier data is read again) and the next position it yields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from protlm.data.exclude import Exclusion
from protlm.data.fasta import VALID
from protlm.data.rng import PositionRNG
from protlm.data.sources import RawRecord, Source, open_sources
from protlm.errors import CheckpointError, ConfigError, InputError
from protlm.tokenizer.vocab import Tokenizer

POLICIES = ("skip", "error", "x")
STATE_FORMAT = "protlm.SequenceStream/1"
# Distinct keys mixed into the seeds so the unit order, block shuffles and crops draw independent numbers.
_UNIT_KEY, _BLOCK_KEY, _CROP_KEY = 0x0A17, 0x0B10, 0x0C20


@dataclass
class StreamItem:
    position: int  # global index in the endless stream; the same whatever the number of shards
    epoch: int
    record_id: str
    residues: np.ndarray  # (L,) int64 residue ids, L <= max_length - n_specials


@dataclass(frozen=True)
class Shard:
    """Which global positions one reader (rank, DataLoader worker) yields; see the module notes."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    workers: int = 1
    chunk: int = 1  # consecutive sequences of one rank in a global batch (the per-rank micro-batch size)

    @property
    def index(self) -> int:
        """Key of this shard's saved position."""
        return self.worker * self.world_size + self.rank

    @property
    def count(self) -> int:
        return self.world_size * self.workers

    def next_owned(self, p: int) -> int:
        """The smallest position >= p that this shard yields."""
        global_batch = self.world_size * self.chunk
        m, within = divmod(p, global_batch)
        if m % self.workers == self.worker:
            i = -(-(within - self.rank) // self.world_size) if within > self.rank else 0
            if i < self.chunk:
                return m * global_batch + self.rank + self.world_size * i
            m += 1
        m += (self.worker - m) % self.workers
        return m * global_batch + self.rank


@dataclass
class Position:
    """Where one shard is: the block it is reading and the next global position it yields."""

    epoch: int = 0
    block: int = 0  # index of the block within the epoch
    unit: int = 0  # index into the epoch's unit order where the block starts
    offset: int = 0  # bytes (FASTA) or rows (tables) into that unit
    line: int = 1  # FASTA line number at ``offset``, for messages
    block_start: int = 0  # global position of the block's first record
    epoch_start: int = 0  # global position of the epoch's first record
    next: int = 0  # this shard has yielded every position of its own below this one


@dataclass
class StreamStats:
    """Counts of records read and dropped, per reason (one count per record per pass of this shard)."""

    read: int = 0
    kept: int = 0
    repaired: int = 0  # policy "x": gaps dropped, unknown letters made X
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> records

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class SequenceStream(torch.utils.data.IterableDataset):
    """Endless (or ``epochs``-long) iterable of cropped residue-id arrays (np.int64), per the module notes.

    Arguments:
        paths: FASTA / FASTA.gz / parquet files, ``datasets`` directories, directories of such files, or globs.
        tok: tokenizer giving the residue ids.
        max_length: longest encoder input, ``n_specials`` (prefix and ``</s>``) included; longer records are
            randomly cropped to ``max_length - n_specials`` residues.
        min_length: records with fewer residues are dropped (2 is the least both objectives can use).
        drop_longer_than: records with more residues are dropped instead of cropped (None keeps all).
        seed: fixes the order and the crops.
        rank, world_size: this process's place among the data-parallel ranks.
        exclude: ids and sequences to drop (:class:`~protlm.data.exclude.Exclusion`), e.g. evaluation proteins.
        policy: what to do with a record that is empty or holds characters that are not residues: "skip" it
            (counted in ``stats``, with a warning), stop with an "error" naming it, or "x" (drop gaps, make
            other unknown letters X).
        shuffle: False keeps file order (validation); crops are still seeded.
        epochs: passes over the data; None streams forever.
        block_size: raw records per shuffle block (memory: one block of sequences per shard).
        sequence_column, id_column: column names in parquet / ``datasets`` data (guessed when None).
        split: which split of a saved ``DatasetDict`` to read.

    :meth:`state_dict` covers the shards iterated in this process. Inside DataLoader workers each worker
    advances its own copy, so a trainer with workers should iterate
    :class:`protlm.objectives.PretrainBatches`, which carries the position back with every batch.
    """

    def __init__(
        self,
        paths,
        tok: Tokenizer,
        max_length: int = 512,
        min_length: int = 2,
        drop_longer_than: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        exclude: Exclusion | None = None,
        policy: str = "skip",
        shuffle: bool = True,
        epochs: int | None = None,
        block_size: int = 65536,
        sequence_column: str | None = None,
        id_column: str | None = None,
        split: str = "train",
        n_specials: int = 2,
    ):
        super().__init__()
        _check_int("max_length", max_length, n_specials + 1)
        _check_int("min_length", min_length, 1)
        if drop_longer_than is not None:
            _check_int("drop_longer_than", drop_longer_than, min_length)
        _check_int("seed", seed, 0)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ConfigError(f"data: rank {rank} is not below world_size {world_size}")
        _check_int("block_size", block_size, 1)
        if epochs is not None:
            _check_int("epochs", epochs, 1)
        if policy not in POLICIES:
            raise ConfigError(f"data.policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.tok = tok
        self.max_length, self.min_length, self.drop_longer_than = max_length, min_length, drop_longer_than
        self.n_specials = n_specials
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.exclude = exclude if exclude is not None and len(exclude) else None
        self.policy, self.shuffle, self.epochs, self.block_size = policy, bool(shuffle), epochs, block_size
        self.sources: list[Source] = open_sources(paths, sequence_column, id_column, split)
        # (source index, unit index) for every unit; an epoch permutes this list
        self.units = [(si, u) for si, src in enumerate(self.sources) for u in range(src.n_units)]
        self.stats = StreamStats()
        self._positions: dict[int, Position] = {}
        self._layout: list[int] | None = None  # [shards, chunk] of the iteration that made _positions
        self._loaded = False
        self._warned_bad = False
        self._crop_rng = PositionRNG(seed, _CROP_KEY)

    # --- sharding -------------------------------------------------------------------------------------------
    @property
    def max_residues(self) -> int:
        return self.max_length - self.n_specials

    def default_shard(self) -> Shard:
        """The shard of the calling process, or DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return Shard(self.rank, self.world_size, worker, workers)

    # --- iteration ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[np.ndarray]:
        for item in self.items():
            yield item.residues

    def items(self, shard: Shard | None = None) -> Iterator[StreamItem]:
        """Items of one shard (by default this process's / worker's), continuing from its saved position.

        Only one iterator per shard should be live at a time: it advances the shard's position, which
        :meth:`state_dict` reports.
        """
        shard = shard or self.default_shard()
        layout = [shard.count, shard.chunk]
        if self._layout is not None and self._layout != layout:
            raise CheckpointError(f"data position was saved for {self._layout[0]} shards (ranks x workers) of "
                                  f"{self._layout[1]} sequences, but this run reads {layout[0]} of {layout[1]}; "
                                  "resume with the same ranks and workers")
        if self._loaded and shard.index not in self._positions:
            raise CheckpointError(f"data position has no entry for shard {shard.index}; it was saved by another rank")
        self._layout = layout
        pos = self._positions.setdefault(shard.index, Position())
        return self._iterate(pos, shard)

    def position(self, shard: int) -> Position:
        """The live position of ``shard`` (advances as its iterator is consumed)."""
        return self._positions[shard]

    def reset(self) -> None:
        """Forget all positions: the next iteration starts from the beginning."""
        self._positions, self._layout, self._loaded = {}, None, False

    def seek(self, shard: Shard, position: Position) -> None:
        """Start ``shard`` at ``position``: a block to read from (any block at or before the first position
        wanted is valid, since every shard reads every block) and ``next``, the first position wanted."""
        self._positions[shard.index] = dataclasses.replace(position)
        self._layout = [shard.count, shard.chunk]

    def _iterate(self, pos: Position, shard: Shard) -> Iterator[StreamItem]:
        while self.epochs is None or pos.epoch < self.epochs:
            records, end = self._read_block(pos, report=shard.index == 0)
            n = len(records)
            order = (np.random.default_rng([self.seed, pos.epoch, pos.block, _BLOCK_KEY]).permutation(n)
                     if self.shuffle and n > 1 else np.arange(n))
            p = shard.next_owned(max(pos.next, pos.block_start))
            while p < pos.block_start + n:
                record_id, residues = records[order[p - pos.block_start]]
                pos.next = p + 1
                yield StreamItem(p, pos.epoch, record_id, self._crop(residues, p))
                p = shard.next_owned(p + 1)
            block_end = pos.block_start + n
            if end is None:  # the epoch is over
                if block_end == pos.epoch_start:
                    raise InputError(f"{self._names()}: no usable sequences ({self._describe_stats()})")
                if shard.index == 0 and pos.epoch == 0:
                    self._warn_summary()
                pos.epoch, pos.block, pos.unit, pos.offset, pos.line = pos.epoch + 1, 0, 0, 0, 1
                pos.block_start = pos.epoch_start = block_end
            else:
                pos.block += 1
                pos.unit, pos.offset, pos.line = end
                pos.block_start = block_end

    def _unit_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, epoch, _UNIT_KEY]).permutation(len(self.units))

    def _read_block(self, pos: Position, report: bool) -> tuple[list[tuple[str, np.ndarray]], tuple | None]:
        """The filtered records of the block at ``pos`` and where the next block starts (None: epoch end)."""
        order = self._unit_order(pos.epoch)
        unit, offset, line = pos.unit, pos.offset, pos.line
        kept: list[tuple[str, np.ndarray]] = []
        count = 0
        while unit < len(order) and count < self.block_size:
            source_index, source_unit = self.units[order[unit]]
            with contextlib.closing(self.sources[source_index].read(source_unit, offset, line)) as records:
                for record, offset, line in records:
                    count += 1
                    accepted = self._accept(record, report)
                    if accepted is not None:
                        kept.append(accepted)
                    if count == self.block_size:
                        break
                else:
                    unit, offset, line = unit + 1, 0, 1
        return kept, ((unit, offset, line) if unit < len(order) else None)

    def _accept(self, record: RawRecord, report: bool) -> tuple[str, np.ndarray] | None:
        """Residue ids of a raw record, or None when a filter or the bad-record policy drops it."""
        stats = self.stats
        stats.read += 1
        text = record.text[:-1] if record.text.endswith("*") else record.text
        if not text:
            return self._bad(record, "empty", "empty sequence", report)
        if self.exclude is not None and self.exclude.excludes_id(record.id):
            stats.drop("excluded id")
            return None
        try:
            ids = self.tok.residue_array(text, record.where, unknown="error")
        except InputError as err:
            if self.policy != "x":
                return self._bad(record, "invalid characters", str(err).removeprefix(record.where + ": "), report)
            text = "".join(c if c in VALID else "X" for c in text if c not in "-.")
            if not text:
                return self._bad(record, "empty", "empty sequence after dropping gaps", report)
            ids = self.tok.residue_array(text, record.where, unknown="x")
            stats.repaired += 1
        if len(ids) < self.min_length:
            stats.drop("shorter than min_length")
            return None
        if self.drop_longer_than is not None and len(ids) > self.drop_longer_than:
            stats.drop("longer than drop_longer_than")
            return None
        why = self.exclude.reason(text) if self.exclude is not None else None
        if why is not None:
            stats.drop(why)
            return None
        stats.kept += 1
        return record.id, ids

    def _bad(self, record: RawRecord, reason: str, detail: str, report: bool) -> None:
        if self.policy == "error":
            raise InputError(f"{record.where}: {detail}")
        self.stats.drop(reason)
        if report and not self._warned_bad:
            self._warned_bad = True
            warnings.warn(f"{record.where}: {detail}; skipping it (policy {self.policy!r}); further bad records "
                          "are counted and summarised after the first pass", stacklevel=2)
        return None

    def _warn_summary(self) -> None:
        bad = {k: v for k, v in self.stats.dropped.items() if k in ("empty", "invalid characters")}
        if bad or self.stats.repaired:
            warnings.warn(f"{self._names()}: first pass done; {self._describe_stats()}", stacklevel=2)

    def _describe_stats(self) -> str:
        s = self.stats
        parts = [f"{s.read} records read", f"{s.kept} kept"]
        parts += [f"{n} {reason}" for reason, n in sorted(s.dropped.items())]
        if s.repaired:
            parts.append(f"{s.repaired} repaired")
        return ", ".join(parts)

    def _names(self) -> str:
        names = [src.path for src in self.sources]
        return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

    def _crop(self, residues: np.ndarray, position: int) -> np.ndarray:
        excess = len(residues) - self.max_residues
        if excess <= 0:
            return residues
        start = int(self._crop_rng.at(position).integers(excess + 1))
        return residues[start : start + self.max_residues]

    # --- resume ---------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """Everything that decides the order; a saved position is only valid under the same settings."""
        return {
            "sources": [src.fingerprint() for src in self.sources],
            "seed": self.seed, "shuffle": self.shuffle, "block_size": self.block_size,
            "max_length": self.max_length, "n_specials": self.n_specials, "min_length": self.min_length,
            "drop_longer_than": self.drop_longer_than, "policy": self.policy,
            "exclude": self.exclude.fingerprint() if self.exclude is not None else None,
        }

    def state_dict(self) -> dict:
        """The exact data position of every shard iterated in this process (plain ints, JSON-safe)."""
        return {
            "format": STATE_FORMAT,
            "settings": self.settings(),
            "layout": self._layout,
            "shards": {str(g): dataclasses.asdict(p) for g, p in sorted(self._positions.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"data position: not a {STATE_FORMAT} state")
        saved, now = state["settings"], self.settings()
        for key in now:
            if _jsonish(saved.get(key)) != _jsonish(now[key]):
                raise CheckpointError(f"data position was saved with {key}={saved.get(key)!r}, but this run has "
                                      f"{now[key]!r}; resume with the same data settings")
        self._positions = {int(g): Position(**p) for g, p in state["shards"].items()}
        self._layout = state["layout"]
        self._loaded = bool(self._positions)


def _jsonish(x):
    """Tuples and lists compare equal (a state may have gone through JSON)."""
    if isinstance(x, (list, tuple)):
        return [_jsonish(v) for v in x]
    return x


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
