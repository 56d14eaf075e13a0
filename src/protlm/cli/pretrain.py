"""``protlm pretrain --config configs/X.yaml [--set key=value ...] [--resume]``: Ankh3-style pretraining.

Runs as one process, or as many under torchrun, e.g.
``torchrun --nproc-per-node 8 -m protlm.cli.main pretrain --config configs/ankh3-large.yaml``.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a T5 protein model with the Ankh3 objectives (torchrun-ready)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set run.steps=100 --set optim.lr=3e-3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (exactly where it stopped)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protlm.train import Trainer, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from protlm.distributed import shutdown

    try:
        result = Trainer(cfg, resume=args.resume).run()
    finally:
        shutdown()
    if result.is_main:
        print(f"done: step {result.step}; outputs in {result.output_dir}"
              + (f"; final model in {result.final_dir}" if result.final_dir else ""))
    return 0
