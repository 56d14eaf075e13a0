"""The demo's stage log, ``DIR/demo-state.json`` (see :mod:`protlm.stages`), and the one-line error for a full
disk in any stage."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from typing import Iterator

from protlm.errors import ConfigError, ProtlmError
from protlm.stages import StageLog
from protlm.utils import atomic_write_text

STATE_FILE = "demo-state.json"
VERSION = 1


class DemoState(StageLog):
    """``stages[name]`` holds ``done`` (bool), ``seconds`` (wall-clock summed over runs) and stage facts."""

    def __init__(self, out_dir: str, profile: str):
        super().__init__(os.path.join(out_dir, STATE_FILE), {"version": VERSION, "profile": profile})
        saved = self.read("demo state")
        if saved is not None:
            if saved.get("profile") != profile:
                raise ConfigError(f"{out_dir}: holds a demo run of the {saved.get('profile')!r} profile, not "
                                  f"{profile!r}; choose another output directory (-o)")
            self.data = saved

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with disk_errors(self.path):
            atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")


def _disk_full_error(err: BaseException | None, depth: int = 0) -> BaseException | None:
    """The ENOSPC error inside ``err``: itself, its cause, or one wrapped by torch's checkpoint writer."""
    if err is None or depth > 8:
        return None
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return err
    for inner in [err.__cause__, err.__context__, *(pair[0] for pair in getattr(err, "failures", {}).values())]:
        found = _disk_full_error(inner, depth + 1)
        if found is not None:
            return found
    # h5py and torch.save sometimes re-raise the OS error as their own type, keeping only its text
    return err if "No space left on device" in str(err) else None


@contextlib.contextmanager
def disk_errors(where: str) -> Iterator[None]:
    """Turn a full disk, raised anywhere inside, into one line naming the file being written."""
    try:
        yield
    except (ProtlmError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException derives from BaseException
        found = _disk_full_error(err)
        if found is None:
            raise
        target = getattr(found, "filename", None) or where
        raise ProtlmError(f"no space left on device writing {target}; free some space and re-run the same "
                          "command to continue (finished stages are kept)") from None
