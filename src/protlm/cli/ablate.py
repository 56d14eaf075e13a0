"""``protlm ablate --config configs/ablation/X.yaml``: a controlled pretraining ablation in one command.

Pretrains every variant of the recipe with every pretraining seed to the same token budget, evaluates each
model with the benchmark suite, runs the depth analysis of the two compared variants and writes DIR/report.md.
Everything is checked before any compute; re-running the same command resumes (finished stages are skipped,
an interrupted one continues from its own checkpoint). ``--check`` only validates and prints the plan.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="controlled pretraining ablation: matched variants, equal tokens, one report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="ablation recipe YAML (see configs/ablation/)")
    p.add_argument("--out", help="output directory (default: the recipe's output_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. token_budget=2e5, evaluation.tasks=[GB1] (repeatable); "
                        "a pilot with a small budget should also get its own --out")
    p.add_argument("--check", action="store_true", help="validate the recipe, print the plan and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from protlm.ablate import load_recipe, run_ablation

    recipe = load_recipe(args.config, args.out, args.overrides)

    def log(msg: str) -> None:
        print(f"protlm ablate: {msg}", file=sys.stderr, flush=True)

    result = run_ablation(recipe, progress=not args.no_progress, log=log, check_only=args.check)
    if not args.check:
        print(result["verdict"])
    return 0
