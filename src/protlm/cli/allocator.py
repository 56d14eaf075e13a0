"""Run long CPU jobs under tcmalloc instead of glibc's malloc.

Training the downstream heads allocates tensors of a different size at every step (packed rows of varying
length, one (L, L) attention map per protein). Under glibc's malloc the heap fragments as a run goes on: the
process's peak memory grows by ~60 MB per epoch, allocation itself gets slower, and pages are faulted in again
and again. On the 2-core test machine, two SSP-3 heads side by side (2,000 proteins, 12 epochs) slowed from 11 s
to 15 s per epoch and took 148-150 CPU-s each. Under tcmalloc their epochs stay at 9.3-10.2 s and they take
115-116 CPU-s each (1.3x), with the same results to the last digit (``docs/evaluate.md``). ``protlm analyze
depth`` reads a causal LM's 50,257-token head in (166, 50,257) chunks, 26 times over every position: under glibc
one 4,096-position pass faulted in about 1.1 million pages and took 1.43 s on 2 Zen 4 cores, under tcmalloc 17,000
pages and 1.33 s.

The allocator has to be chosen before the process starts, so ``protlm evaluate`` and ``protlm analyze`` start
themselves again with the library in ``LD_PRELOAD``. ``PROTLM_ALLOCATOR`` controls this: ``auto`` (default) uses
tcmalloc when the system has it (Debian/Ubuntu: ``libtcmalloc-minimal4``, which ``setup.sh`` installs),
``system`` keeps glibc's malloc, and a path names the library to preload. Calls of :func:`protlm.cli.main.main`
from Python never restart.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

from protlm.errors import ConfigError

ENV = "PROTLM_ALLOCATOR"
_DONE = "PROTLM_ALLOCATOR_LOADED"  # set in the restarted process, so that it does not restart again
COMMANDS = ("evaluate", "analyze")  # where the gain was measured
_SONAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def find_allocator(choice: str | None = None) -> str | None:
    """The library to preload for ``choice`` (default: ``$PROTLM_ALLOCATOR`` or auto), or None for glibc's."""
    choice = (choice if choice is not None else os.environ.get(ENV, "auto")).strip() or "auto"
    if choice == "system":
        return None
    if choice != "auto":
        if not os.path.isfile(choice):
            raise ConfigError(f"{ENV}={choice}: no such library file (use auto, system, or the path of a "
                              "malloc library such as libtcmalloc_minimal.so.4)")
        return os.path.abspath(choice)
    for soname in _SONAMES:
        local = os.path.join(sys.prefix, "lib", soname)  # a conda environment's own copy
        if os.path.isfile(local):
            return local
        stem = soname[3:].split(".so")[0]
        if ctypes.util.find_library(stem):
            return soname  # the dynamic loader finds it in the system's library path
    return None


def active_allocator() -> str | None:
    """The preloaded allocator this process runs under (from a restart by :func:`restart_with_allocator`)."""
    return os.environ.get(_DONE) or None


def restart_with_allocator(command: str, argv: list[str]) -> None:
    """Replace this process by ``python -m protlm.cli.main ARGV`` with the allocator preloaded, when
    ``command`` benefits, a library is found and this process is not already running under it. Otherwise
    return and let the caller go on as it is."""
    if command not in COMMANDS or os.environ.get(_DONE) or not sys.platform.startswith("linux"):
        return
    lib = find_allocator()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[_DONE] = lib
    # tcmalloc warns on stderr about every allocation above 1 GiB; embedding stores legitimately make those.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "protlm.cli.main", *argv], env)
