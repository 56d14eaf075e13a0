"""``protlm export-backbone BUNDLE -o DIR``: the fine-tuned backbone of a head bundle as a normal checkpoint.

    protlm export-backbone runs/heads/mytask/heads/mytask -o runs/heads/mytask/backbone
    protlm export-backbone BUNDLE -o DIR --model /data/ankh3-large        # the base, where it is now

A head trained with ``--finetune lora`` keeps its adapter in the bundle (``adapter/``), one trained with
``--finetune full`` its trained weights (``backbone.safetensors``). This writes the base with the adapter merged,
or with the trained weights in place, in fp32: config.json, model.safetensors and the vocabulary, which
``protlm.load``, ``protlm embed`` and transformers' ``from_pretrained`` read. The base defaults to the one the
bundle records; --model names it where it is now, and a base of another config is refused.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("export-backbone", help="write a fine-tuned head bundle's backbone as a checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="head bundle directory of a fine-tuned head (head.json with a finetune entry)")
    p.add_argument("-o", "--out", required=True, help="checkpoint directory to write")
    p.add_argument("--model", metavar="BASE", help="the base model (checkpoint directory or Hub id; default: the one "
                                                   "the bundle records)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protlm.evaluate.bundle import read_meta
    from protlm.evaluate.predict import describe_backbone, export_backbone

    meta = read_meta(args.bundle)
    out = export_backbone(args.bundle, args.out, args.model)
    mode = (meta.finetune or {}).get("mode")
    how = "adapter merged into" if mode == "lora" else "fine-tuned weights on"
    print(f"protlm export-backbone: wrote {out} ({how} {args.model or describe_backbone(meta.backbone)})",
          file=sys.stderr)
    return 0
