"""Random numbers that depend on where a sequence is in the data, not on who draws them.

Each draw site (crop, objectives, ...) has a *purpose* key; a sequence at global stream position ``p`` gets the
Philox stream with key (seed, purpose) and counter (0, 0, p, 0). Philox is counter-based, so these streams
are independent and any of them is reached directly. Rebuilding a ``np.random.Generator`` costs ~25 us,
which would dominate the data pipeline, so :class:`PositionRNG` keeps one and resets its counter (~5 us).
"""

from __future__ import annotations

import numpy as np


def position_generator(seed: int, purpose: int, position: int) -> np.random.Generator:
    """A fresh generator for (seed, purpose, position); the same numbers as ``PositionRNG(seed, purpose).at(position)``."""
    return np.random.Generator(np.random.Philox(counter=[0, 0, int(position), 0], key=[int(seed), int(purpose)]))


class PositionRNG:
    """One reusable generator, reset per position. The generator returned by :meth:`at` is valid until the
    next call (draw from it before asking for another position)."""

    def __init__(self, seed: int, purpose: int):
        self._bits = np.random.Philox(key=[int(seed), int(purpose)])
        self._generator = np.random.Generator(self._bits)
        self._key = self._bits.state["state"]["key"]

    def at(self, position: int) -> np.random.Generator:
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.array([0, 0, int(position), 0], dtype=np.uint64), "key": self._key},
            "buffer": np.zeros(4, dtype=np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
        }
        return self._generator
