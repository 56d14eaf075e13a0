"""The stage log of a multi-stage run (``protlm demo``, ``protlm ablate``): a JSON file with one record per stage,
holding whether it finished, its wall time summed over runs and the facts later stages need. It is rewritten
atomically after every change, so a kill never corrupts it, and a re-run skips the finished stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable

from protlm.errors import CheckpointError, ProtlmError
from protlm.utils import atomic_write_text


class StageLog:
    """``data["stages"][key]`` is a stage's record; the other keys of ``data`` tie the file to its run. The demo and
    the ablation mark progress differently in their files (``done: true`` / ``status: "done"``): ``RUNNING`` and
    ``DONE`` name the markers."""

    RUNNING: dict[str, Any] = {"done": False}
    DONE: dict[str, Any] = {"done": True}

    def __init__(self, path: str, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {**header, "stages": {}}

    def read(self, what: str) -> dict[str, Any] | None:
        """The file as an earlier run left it, for the subclass to check against its run; None if there is none."""
        if not os.path.exists(self.path):
            return None
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: cannot read the {what} ({err}); delete it to start over") from None

    def stage(self, key: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(key, {**self.RUNNING, "seconds": 0.0})

    def done(self, key: str) -> bool:
        record = self.data["stages"].get(key, {})
        return all(record.get(k) == v for k, v in self.DONE.items())

    def update(self, key: str, **values: Any) -> None:
        self.stage(key).update(values)
        self.save()

    def add_seconds(self, key: str, seconds: float) -> None:
        self.update(key, seconds=float(self.stage(key).get("seconds", 0.0)) + seconds)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")

    def run(self, key: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Run one stage and record it as finished with the facts ``fn`` returns. Its wall time is added to the
        record also when it fails or is interrupted, so that a resumed stage reports its total."""
        self.update(key, **self.RUNNING)
        start = time.perf_counter()
        try:
            facts = fn() or {}
        except BaseException:
            with contextlib.suppress(ProtlmError):  # a failed save (a full disk) must not hide why the stage stopped
                self.add_seconds(key, time.perf_counter() - start)
            raise
        self.add_seconds(key, time.perf_counter() - start)
        self.update(key, **self.DONE, **facts)
        return self.stage(key)
