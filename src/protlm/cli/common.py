"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import sys

from protlm.errors import ConfigError
from protlm.precision import choose

def load_model(spec: str, random_init: bool = False, dtype: str | None = None, device: str = "cpu",
               encoder_only: bool | None = None, seed: int = 0):
    """A checkpoint directory or Hub id, or with ``random_init`` a preset name.

    ``dtype`` is the ``--dtype`` option (``auto`` or a name; see :mod:`protlm.precision`): the weights are cast
    to it and the choice is said on stderr. ``None`` keeps the weights as stored (``protlm info``).
    """
    import protlm
    from protlm.config import PRESET_NAMES

    if random_init:
        if spec not in PRESET_NAMES:
            raise ConfigError(f"--random-init needs a preset name ({', '.join(PRESET_NAMES)}), got {spec!r}")
        pre = protlm.random_init(spec, seed=seed, encoder_only=bool(encoder_only))
    else:
        pre = protlm.load(spec, encoder_only=encoder_only)
    return to_precision(pre, dtype, device)


def to_precision(pre, dtype: str | None, device: str):
    """Move a loaded model to ``device`` in the compute precision that ``dtype`` resolves to there."""
    if dtype is not None:
        precision = choose(dtype, device, "inference", option="--dtype")
        print(f"protlm: {precision.describe()}", file=sys.stderr)
        pre.model.to(precision.dtype)
    pre.model.to(device)
    return pre


class PartialOutput:
    """A text output written part by part, so that a killed job continues where it stopped.

    Finished parts are appended to ``OUTPUT.partial`` (flushed to disk), and ``OUTPUT.partial.json`` records
    the job's fingerprint, the number of items done and the file size at that point. A re-run of the same job
    truncates anything written after the last finished part and continues; a different job (other model,
    settings or input) is refused rather than mixed in. ``finish`` renames the partial file to ``OUTPUT``.
    """

    def __init__(self, path: str, fingerprint: object):
        import hashlib
        import json
        import os

        from protlm.errors import InputError

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
        import json
        import os

        from protlm.errors import InputError
        from protlm.utils import atomic_write_text

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
        import os

        os.replace(self.partial, self.path)
        os.unlink(self.state_path)
