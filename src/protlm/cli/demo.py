"""``protlm demo [--minutes M] [-o DIR]``: the whole Ankh3 system on real proteins that ship with protlm.

Pretrains the tiny Ankh3 model with both objectives for M minutes, embeds the evaluation proteins, scores
secondary structure against the one-hot and random-init baselines (seeds 7, 0, 42), runs the depth analysis,
completes held-out proteins from their first half, and writes DIR/report.md with the tables and plots.
Re-running the same command continues where it stopped (Ctrl-C is safe).
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="pretrain, embed, evaluate, analyse and generate on bundled real proteins",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None,
                   help="pretraining time in minutes (default: run.time_limit_minutes of the bundled "
                        "protlm/resources/demo/pretrain.yaml)")
    p.add_argument("-o", "--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None,
                   help="device for embedding and evaluation heads (default: cuda if available, else cpu; "
                        "pretraining follows the recipe's run.device)")
    p.add_argument("--no-progress", action="store_true", help="stage lines only, no progress bars")
    # protlm's own tests: tiny evaluation subsets, one seed (a smoke test, not a result)
    p.add_argument("--profile", choices=["full", "quick"], default="full", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from protlm.demo import DemoOptions, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_demo(DemoOptions(out_dir=args.out, minutes=args.minutes, threads=args.threads,
                                  profile=args.profile, device=device, progress=not args.no_progress))
    print(result.verdict)
    print(f"report: {os.path.abspath(result.report)}")
    return 0
