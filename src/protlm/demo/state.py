"""The demo's progress record, ``DIR/demo-state.json``: which stages are finished, what each cost, and the few
facts later stages need. It is rewritten atomically after every change, so a kill never corrupts it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from typing import Any, Iterator

from protlm.errors import ConfigError, ProtlmError
from protlm.utils import atomic_write_text

STATE_FILE = "demo-state.json"
VERSION = 1


class DemoState:
    """``stages[name]`` holds ``done`` (bool), ``seconds`` (wall-clock summed over runs) and stage facts."""

    def __init__(self, out_dir: str, profile: str):
        self.path = os.path.join(out_dir, STATE_FILE)
        self.data: dict[str, Any] = {"version": VERSION, "profile": profile, "stages": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as fh:
                    saved = json.load(fh)
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"{self.path}: unreadable demo state ({err}); delete it to start over") from None
            if saved.get("profile") != profile:
                raise ConfigError(f"{out_dir}: holds a demo run of the {saved.get('profile')!r} profile, not "
                                  f"{profile!r}; choose another output directory (-o)")
            self.data = saved

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"done": False, "seconds": 0.0})

    def done(self, name: str) -> bool:
        return bool(self.stage(name).get("done"))

    def update(self, name: str, **facts: Any) -> None:
        self.stage(name).update(facts)
        self.save()

    def add_seconds(self, name: str, seconds: float) -> None:
        info = self.stage(name)
        info["seconds"] = float(info.get("seconds", 0.0)) + seconds
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with disk_errors(self.path):
            atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=False) + "\n")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save and h5py sometimes wrap the OS error in their own exception type
    return "No space left on device" in str(err)


@contextlib.contextmanager
def disk_errors(where: str) -> Iterator[None]:
    """Turn a full disk, raised anywhere inside, into one line naming the file being written."""
    try:
        yield
    except ProtlmError:
        raise
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        target = getattr(err, "filename", None) or where
        raise ProtlmError(f"no space left on device writing {target}; free some space and re-run the same "
                          "command to continue (finished stages are kept)") from None
