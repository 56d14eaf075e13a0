"""Small helpers shared by every layer: atomic file writes, reading a YAML mapping with clear errors, headless
matplotlib figures."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator


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
