"""Planning the work of an embedding run: windows for long proteins and length-sorted token-budget batches.

Pure functions of sequence lengths; no torch. The engine turns each :class:`Unit` into one encoder row.

Windows. A protein longer than ``window`` residues is cut into windows of exactly ``window`` residues whose
starts are ``0, s, 2s, ...`` with stride ``s = window - overlap``; the last window is aligned to the protein's end,
so neighbouring windows overlap by at least ``overlap`` residues. Each overlap is cut at its middle: a residue
takes its embedding from the window in which it sits farther from a cut edge. Every residue therefore sees at
least ``overlap // 2`` residues of context on each side (or the true end of the protein). Each window is encoded
like a protein of its own (prefix, residues, ``</s>``).

Batches. Units are sorted longest first and packed greedily while ``rows x longest row`` (padded tokens,
specials included) stays within ``max_tokens``; because the rows of a batch have nearly equal lengths, padding
is small. A unit longer than the budget runs alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """One encoder row: residues ``[start, end)`` of sequence ``seq``; ``keep`` is the part used in the output."""

    seq: int  # index of the (unique) sequence
    start: int
    end: int
    keep_start: int  # absolute residue range this window contributes to the stitched result
    keep_end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start positions of the windows covering ``length`` residues (one window when it fits)."""
    if window <= 0 or overlap < 0 or overlap >= window:
        raise ValueError(f"need 0 <= overlap < window, got window={window}, overlap={overlap}")
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window, stride))
    starts.append(length - window)  # last window flush with the end: full width, overlap >= `overlap`
    return starts


def split(seq: int, length: int, window: int, overlap: int) -> list[Unit]:
    """The units of one sequence, with the residue ranges each contributes after stitching."""
    starts = window_starts(length, window, overlap)
    units = []
    for i, s in enumerate(starts):
        e = min(s + window, length)
        # cut each overlap at its middle: between window i (ends at e) and window i+1 (starts at starts[i+1])
        keep_start = 0 if i == 0 else (s + min(starts[i - 1] + window, length)) // 2
        keep_end = length if i == len(starts) - 1 else (starts[i + 1] + e) // 2
        units.append(Unit(seq, s, e, keep_start, keep_end))
    return units


def plan_batches(units: list[Unit], max_tokens: int, extra_tokens: int, max_batch: int | None = None) -> list[list[Unit]]:
    """Length-sorted batches whose padded size (rows x longest row, ``extra_tokens`` specials per row) fits
    ``max_tokens``. Longest first, so memory trouble shows at once and the time estimate errs on the safe side."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(units, key=lambda u: (-u.length, u.seq, u.start))
    batches: list[list[Unit]] = []
    current: list[Unit] = []
    width = 0
    for u in order:
        tokens = u.length + extra_tokens
        if current and ((len(current) + 1) * width > max_tokens or (max_batch and len(current) >= max_batch)):
            batches.append(current)
            current = []
        if not current:
            width = tokens
        current.append(u)
    if current:
        batches.append(current)
    return batches
