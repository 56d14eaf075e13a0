"""Training several benchmark units at once, one process each.

A unit (one head: source x task x seed x fold) trains in a handful of small matrix products per step, so on a CPU
one unit per core with one thread each uses the cores far better than one unit with many threads. Each unit runs
in a process forked from the runner: it inherits the task's data and the embeddings already in memory (copy on
write, nothing is pickled), trains, writes its unit file atomically and exits. The unit file is the only result
channel, the same file a resumed run reads back, so a run stopped halfway keeps every finished unit.

Forking needs a POSIX system (Linux, macOS). Elsewhere ``jobs`` > 1 is refused with a message.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait
from typing import Callable, Iterable

import torch

from protlm.errors import ConfigError, ProtlmError


def _child(fn: Callable[[], object], threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle: it stops the units
    torch.set_num_threads(threads)
    code = 0
    try:
        fn()
    except BaseException:  # noqa: BLE001 - reported here, the runner only sees the exit code
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the parent's atexit handlers and buffered output inherited by the fork


def _failure(label: str, proc) -> str:
    return f"{label}: the unit process ended with exit code {proc.exitcode}"


def _trained_minutes(path: str, started: float) -> float:
    """The unit's own training time from its file; the runner may notice a finished unit only later."""
    try:
        with open(path, encoding="utf-8") as fh:
            return float(json.load(fh)["result"]["seconds"]) / 60
    except (OSError, ValueError, KeyError, TypeError):
        return (time.perf_counter() - started) / 60


class UnitPool:
    """At most ``jobs`` unit processes at a time; ``submit`` waits for a free slot."""

    def __init__(self, jobs: int, threads: int, log: Callable[[str], None] = print):
        if jobs < 1 or threads < 1:
            raise ConfigError(f"--jobs and --threads must be >= 1 (got {jobs}, {threads})")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError("--jobs > 1 needs the fork start method (Linux or macOS); use --jobs 1 here")
        self.jobs, self.threads, self.log = jobs, threads, log
        self._ctx = multiprocessing.get_context("fork")
        self._running: dict[int, tuple[multiprocessing.process.BaseProcess, str, str, float]] = {}

    def submit(self, label: str, path: str, fn: Callable[[], object]) -> None:
        while len(self._running) >= self.jobs:
            self._reap(block=True)
        proc = self._ctx.Process(target=_child, args=(fn, self.threads), name=label, daemon=True)
        proc.start()
        self._running[proc.sentinel] = (proc, label, path, time.perf_counter())
        self.log(f"started: {label} (process {proc.pid}; {len(self._running)} of {self.jobs} running)")

    def running_any(self, paths: Iterable[str]) -> bool:
        busy = {path for _, _, path, _ in self._running.values()}
        return any(p in busy for p in paths)

    def poll(self) -> None:
        self._reap(block=False)

    def wait_all(self) -> None:
        while self._running:
            self._reap(block=True)

    def _reap(self, block: bool) -> None:
        if not self._running:
            return
        failed = []
        for sentinel in wait(list(self._running), timeout=None if block else 0):
            proc, label, path, t0 = self._running.pop(sentinel)
            proc.join()
            if proc.exitcode == 0:
                self.log(f"done: {label} ({_trained_minutes(path, t0):.1f} min)")
            else:
                failed.append(_failure(label, proc))
        if failed:
            # The units still running are valid work: let them finish and write their files, then stop.
            others = [label for _, label, _, _ in self._running.values()]
            if others:
                self.log(f"a unit failed; waiting for the {len(others)} still running before stopping")
            for proc, label, _, t0 in list(self._running.values()):
                proc.join()
                if proc.exitcode != 0:
                    failed.append(_failure(label, proc))
            self._running.clear()
            raise ProtlmError("; ".join(failed) + " (the error is printed above); finished units are kept, re-run the "
                              "same command to resume")

    def close(self) -> None:
        """Stop every unit still running (after an error or Ctrl-C); their unit files are never half-written."""
        for proc, *_ in self._running.values():
            proc.terminate()
        for proc, *_ in self._running.values():
            proc.join()
        self._running.clear()
