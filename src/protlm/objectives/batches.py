"""Pretraining micro-batches: stream -> mixer -> collate, with an exact, resumable position.

:class:`PretrainBatches` is what a trainer iterates. It makes every random choice a function of where the
data is, never of which process made it:
- micro-batch ``m`` (counted per rank, the same count on every rank) holds positions of global batch ``m`` of
  the stream (see :class:`~protlm.data.stream.Shard`) and belongs to step ``m // accumulation``, whose
  masking rate comes from (seed, step);
- a sequence's task, masked positions and split come from (seed, its global stream position).
So N ranks see, at every step, the same examples as one rank with an N-times larger batch, DataLoader workers
change nothing but speed, and a resumed run sees the same examples as an uninterrupted one.

Worker ``w`` of ``W`` makes the micro-batches ``m`` with ``m % W == w``, and each batch carries the stream
position after it. :meth:`PretrainBatches.loader` records the position of every batch the trainer actually
receives (prefetched batches do not count), so :meth:`state_dict` is exact however far the workers ran ahead.
The saved state is the number of micro-batches consumed and one block to re-read from; it does not depend on
the rank or on the number of workers, so a run may resume with a different ``num_workers``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import torch

from protlm.data.rng import PositionRNG, position_generator
from protlm.data.stream import Position, SequenceStream, Shard
from protlm.errors import CheckpointError, ConfigError
from protlm.objectives.example import Example, collate
from protlm.objectives.mixer import StepParams, TaskMixer, step_generator

STATE_FORMAT = "protlm.PretrainBatches/1"
_EXAMPLE_KEY = 0xE4A


def example_generator(seed: int, position: int) -> np.random.Generator:
    """The per-sequence generator of the objectives: a function of (seed, global stream position) only.

    A fresh object each call; :class:`PretrainBatches` draws the same numbers through a reusable one."""
    return position_generator(seed, _EXAMPLE_KEY, position)


class PretrainBatches(torch.utils.data.IterableDataset):
    """Endless micro-batches: dicts from :func:`collate` plus ``step``, ``micro_batch`` and ``mask_rate``.

    ``batch_size`` is sequences per micro-batch on this rank (the stream's rank and world_size say which);
    ``accumulation`` micro-batches make one optimizer step; ``decoder_start_id`` is the model's decoder start
    token (see :func:`collate`). Iterate with :meth:`loader`.
    """

    def __init__(self, stream: SequenceStream, mixer: TaskMixer, batch_size: int, accumulation: int = 1,
                 seed: int | None = None, decoder_start_id: int | None = None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("accumulation", accumulation)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if mixer.max_length < stream.max_length:
            raise ConfigError(f"the data makes encoder inputs of up to {stream.max_length} tokens but the objectives "
                              f"were checked for {mixer.max_length}; build TaskMixer with max_length={stream.max_length}")
        self.stream, self.mixer = stream, mixer
        self.batch_size, self.accumulation = batch_size, accumulation
        self.seed = stream.seed if seed is None else int(seed)
        self.decoder_start_id = decoder_start_id
        self.consumed = 0  # micro-batches the trainer has received (the same on every rank)
        self._resume_block = Position()  # a block at or before the first unconsumed position
        self._latest: dict[int, dict] = {}  # worker -> stream position after its last consumed batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.stream.world_size

    # --- worker side ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # This worker makes micro-batches m = consumed + worker + k*workers, so it is the stream shard of the
        # global batches congruent to (consumed + worker) mod workers.
        shard = Shard(self.stream.rank, self.stream.world_size, (self.consumed + worker) % workers, workers,
                      self.batch_size)
        self.stream.seek(shard, dataclasses.replace(self._resume_block, next=self.consumed * self.global_batch))
        items = self.stream.items(shard)
        position = self.stream.position(shard.index)
        m = self.consumed + worker
        rng = PositionRNG(self.seed, _EXAMPLE_KEY)
        while True:
            chunk = [item for _, item in zip(range(self.batch_size), items)]
            if not chunk:
                return
            step = m // self.accumulation
            params = self.mixer.step_params(step_generator(self.seed, step))
            examples = [self.mixer(item.residues, rng.at(item.position), params) for item in chunk]
            batch = collate(examples, self.mixer.tok, self.decoder_start_id)
            batch["step"] = step
            batch["micro_batch"] = m
            batch["mask_rate"] = params.mask_rate
            batch["data_state"] = {"worker": worker, "position": dataclasses.asdict(position)}
            yield batch
            if len(chunk) < self.batch_size:
                return
            m += workers

    # --- trainer side ---------------------------------------------------------------------------------------
    def loader(self, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None
               ) -> Iterator[dict]:
        """Micro-batches through a DataLoader with ``num_workers`` processes (0: in this process), recording
        the position of each batch handed out. Each call continues from the last batch handed out."""
        self._resume_block = self._best_block()
        self._latest = {}
        kwargs = {"prefetch_factor": prefetch_factor} if num_workers and prefetch_factor else {}
        dl = torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                         **kwargs)
        for batch in dl:
            state = batch.pop("data_state")
            self._latest[int(state["worker"])] = state["position"]
            self.consumed = int(batch["micro_batch"]) + 1
            yield batch

    def _best_block(self) -> Position:
        # Every recorded block starts at or before the first unconsumed position (it holds a consumed one), so
        # the latest of them is the shortest re-read.
        blocks = [Position(**p) for p in self._latest.values()] + [self._resume_block]
        best = max(blocks, key=lambda b: b.block_start)
        return dataclasses.replace(best, next=0)

    def state_dict(self) -> dict:
        """Micro-batches consumed and where to re-read from (plain ints, JSON-safe; the same on every rank)."""
        return {"format": STATE_FORMAT, "consumed": self.consumed, "block": dataclasses.asdict(self._best_block()),
                "global_batch": self.global_batch, "accumulation": self.accumulation, "seed": self.seed,
                "stream_settings": self.stream.settings()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"data position: not a {STATE_FORMAT} state")
        for key, now in (("global_batch", self.global_batch), ("accumulation", self.accumulation),
                         ("seed", self.seed)):
            if state[key] != now:
                raise CheckpointError(f"data position was saved with {key}={state[key]!r}, but this run has "
                                      f"{now!r}; resume with the same batch settings")
        saved, now = state["stream_settings"], self.stream.settings()
        for key in now:
            if _jsonish(saved.get(key)) != _jsonish(now[key]):
                raise CheckpointError(f"data position was saved with data {key}={saved.get(key)!r}, but this run "
                                      f"has {now[key]!r}; resume with the same data settings")
        self.consumed = int(state["consumed"])
        self._resume_block = Position(**state["block"])
        self._latest = {}


def _jsonish(x):
    if isinstance(x, (list, tuple)):
        return [_jsonish(v) for v in x]
    return x


def fixed_examples(stream: SequenceStream, mixer: TaskMixer, task: str, seed: int = 0,
                   limit: int | None = None) -> list[Example]:
    """The same examples of one task at every call, for validation loss per task.

    Reads ``stream`` from its start (make it with ``shuffle=False, epochs=1``); a denoising example's rate is
    drawn per sequence from the configured rates, so the set covers all of them.
    """
    rates = mixer.config.mask_rates
    stream.reset()
    positions = PositionRNG(seed, _EXAMPLE_KEY)
    out = []
    for item in stream.items(Shard()):
        rng = positions.at(item.position)
        params = StepParams(mask_rate=rates[int(rng.integers(len(rates)))])
        out.append(mixer.make(item.residues, rng, params, task))
        if limit is not None and len(out) >= limit:
            break
    stream.reset()  # the next call starts from the beginning again
    return out
