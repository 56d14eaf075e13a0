"""Small helpers shared by every layer: atomic file writes, resumable text outputs, reading a YAML mapping with
clear errors, headless matplotlib figures."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, Iterator

from protlm.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` in one step.

    A crash or an exception leaves the old file (if any) untouched and removes the temporary one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    os.close(fd)
    default_mode(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def default_mode(path: str) -> None:
    """Give a file the permissions a plain open() would (mkstemp creates 0600, unreadable to a shared group)."""
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it back at once
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: protlm only writes figures to files, often where no display exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, **savefig: Any) -> str:
    """Write ``fig`` to ``path`` atomically and close it (pyplot keeps every open figure alive until then)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig)
    pyplot().close(fig)
    return os.fspath(path)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; an empty file is an empty mapping.

    A missing file, invalid YAML (with its line) or a top level that is not a mapping is a one-line
    :class:`~protlm.errors.ConfigError` naming the file; ``what`` says what the file was meant to be.
    """
    import yaml

    from protlm.errors import ConfigError

    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a {what}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None)
        raise ConfigError(f"{source}: not valid YAML{where}" + (f" ({problem})" if problem else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level of this {what}")
    return data


class PartialOutput:
    """A text output written part by part, so that a killed job continues where it stopped.

    Finished parts are appended to ``OUTPUT.partial`` (flushed to disk), and ``OUTPUT.partial.json`` records
    the job's fingerprint, the number of items done and the file size at that point. A re-run of the same job
    truncates anything written after the last finished part and continues; a different job (other model,
    settings or input) is refused rather than mixed in. ``finish`` renames the partial file to ``OUTPUT``.
    """

    def __init__(self, path: str, fingerprint: object):
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise InputError(f"{path}: the directory {directory} does not exist")
        self.path, self.partial, self.state_path = path, path + ".partial", path + ".partial.json"
        self.job = hashlib.sha256(json.dumps(fingerprint, default=str).encode()).hexdigest()[:16]
        self.done = 0
        if os.path.exists(self.state_path) and os.path.exists(self.partial):
            with open(self.state_path, encoding="utf-8") as fh:
                state = json.load(fh)
            if state.get("job") != self.job:
                raise InputError(f"{self.partial}: left by a different job (other model, settings or input); "
                                 f"delete it and {self.state_path} to start over")
            self.done = state["done"]
            with open(self.partial, "r+b") as fh:
                fh.truncate(state["bytes"])
        else:
            open(self.partial, "wb").close()

    def append(self, text: str, items: int) -> None:
        """Add a finished part of ``items`` items."""
        try:
            with open(self.partial, "ab") as fh:
                fh.write(text.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            self.done += items
            atomic_write_text(self.state_path, json.dumps({"job": self.job, "done": self.done, "bytes": size}))
        except OSError as err:
            raise InputError(f"{self.partial}: could not write ({err.strerror}); the {self.done} items done are "
                             "kept, re-run to continue") from None

    def finish(self) -> None:
        os.replace(self.partial, self.path)
        os.unlink(self.state_path)
