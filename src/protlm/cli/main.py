"""The ``protlm`` command: parse, build, run. This is the only module that exits the process."""

from __future__ import annotations

import argparse
import importlib
import sys

from protlm import __version__
from protlm.cli.allocator import restart_with_allocator
from protlm.errors import ProtlmError

# Sub-commands; each is the module protlm.cli.<name with - as _>, which defines add_parser(subparsers) and
# run(args) -> int | None.
COMMANDS = [
    "info",
    "pretrain",
    "embed",
    "project", "transfer",
    "generate", "infill", "score",
    "analyze",
    "data", "evaluate", "train-head", "predict", "export-backbone",
    "demo",
    "ablate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protlm", description="Protein language models: pretrain, embed, evaluate, analyse.")
    parser.add_argument("--version", action="version", version=f"protlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"protlm.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives an optional positional (embed's INPUT) its default when options separate it from the
    # positional before it ("embed MODEL --random-init IN.fasta"); such a word is taken here instead.
    for name in getattr(args, "late_positionals", ()):
        if extra and getattr(args, name) is None and not extra[0].startswith("-"):
            setattr(args, name, extra.pop(0))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        if argv is None:  # the real command line, not a call from Python
            restart_with_allocator(args.command, sys.argv[1:])
        code = args.run(args)
    except ProtlmError as err:
        print(f"protlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"protlm {args.command}: interrupted; finished work is saved, re-run the same command to resume",
              file=sys.stderr)
        return 130
    return int(code or 0)


def _leave(code: int) -> None:
    """End the process with ``code``.

    A worker started by torchrun ends with ``os._exit`` once its output is flushed. By then its work is on
    disk (outputs are written atomically, checkpoints are complete) and its process group is destroyed. But
    the teardown of gloo's C++ threads during interpreter shutdown can still abort now and then (SIGABRT,
    "terminate called without an active exception"; seen about once in three 2-process FSDP resume tests
    on a loaded machine), and torchrun would then report the whole finished run as failed.
    """
    import os

    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _leave(main())
