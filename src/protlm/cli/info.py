"""``protlm info MODEL``: what a checkpoint or preset is (shape, family, vocabulary, parameters)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint directory, Hub id or preset")
    p.add_argument("model", help="checkpoint directory, Hub id, or preset name (see --presets)")
    p.add_argument("--presets", action="store_true", help="list the presets and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protlm.config import PRESET_NAMES

    if args.presets:
        print("\n".join(PRESET_NAMES))
        return 0
    from protlm.cli.common import load_model

    pre = load_model(args.model, random_init=args.model in PRESET_NAMES)
    cfg = pre.config
    n = sum(p.numel() for p in pre.model.parameters())
    print(f"source        {pre.source}")
    print(f"family        {cfg.protlm_family}")
    print(f"shape         d_model={cfg.d_model} d_ff={cfg.d_ff} heads={cfg.num_heads}x{cfg.d_kv} "
          f"layers={cfg.num_layers}+{0 if pre.model.encoder_only else cfg.n_decoder_layers} ffn={cfg.feed_forward_proj}")
    print(f"vocabulary    {len(pre.tokenizer)} tokens from {pre.tokenizer.source}; prefixes {sorted(pre.tokenizer.prefix_ids)}; "
          f"{len(pre.tokenizer.sentinel_ids)} sentinels")
    print(f"parameters    {n:,}")
    return 0
