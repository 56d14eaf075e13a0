"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import argparse
import sys

from protlm.convert import load as load_checkpoint


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL plus the options that say how to build it (shared by generate, infill and score)."""
    p.add_argument("model", help="checkpoint directory or Hub id; a preset name with --random-init")
    p.add_argument("--random-init", action="store_true",
                   help="random weights: MODEL is a preset, or a checkpoint whose shape is copied (its twin)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random weights with --random-init (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype of the weights (default auto: bf16 where this device runs it fast, else fp32)")


def load(args: argparse.Namespace):
    """The model that ``add_model_args``' options name."""
    return load_model(args.model, random_init=args.random_init, dtype=args.dtype, device=args.device,
                      seed=args.init_seed)


def load_model(spec: str, random_init: bool = False, dtype: str | None = None, device: str = "cpu",
               encoder_only: bool | None = None, seed: int = 0):
    """MODEL as every command reads it (see :func:`protlm.convert.load`), with the precision said on stderr.

    ``dtype`` is the ``--dtype`` option (``auto`` or a name; see :mod:`protlm.precision`); ``None`` keeps the
    weights as stored (``protlm info``).
    """
    pre = load_checkpoint(spec, random_init=random_init, encoder_only=encoder_only, dtype=dtype, device=device, seed=seed)
    if pre.precision is not None:
        print(f"protlm: {pre.precision.describe()}", file=sys.stderr)
    return pre
