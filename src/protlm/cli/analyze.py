"""``protlm analyze depth MODEL INPUT -o DIR``: which layers of a model do the work (JSON, PNG plots, markdown);
``protlm analyze depth --compare RUN_DIR ... -o DIR``: finished runs of several models on one relative-depth axis."""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="analyse a model (depth: per-layer contribution, skipping, early exit, probes, CKA)")
    kinds = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    d = kinds.add_parser("depth", help="which layers do the work",
                         description="Per-layer contribution to the residual stream, layer skipping, early exit / "
                                     "logit lens, linear probes and linear CKA, for the encoder and (encoder-decoder "
                                     "models) the decoder. The output measures read the decoder (T5) or, for a "
                                     "masked LM (ESM-2, DPLM), the LM head at the masked positions. Writes "
                                     "depth.json, depth.md and PNG plots into DIR. With --compare, reads finished "
                                     "runs instead and draws them on one relative-depth axis (compare.png, "
                                     "compare.csv, compare.json, compare.md).")
    d.add_argument("model", nargs="?", help="checkpoint directory or Hub id (a preset name with --random-init)")
    d.add_argument("input", nargs="?", help="FASTA (optionally .gz) or CSV of proteins")
    d.add_argument("-o", "--out", required=True, help="output directory")
    d.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                   help="compare finished depth runs (their -o directories) instead of analysing a model; they must "
                        "share proteins, crop length, mask rate, CKA budget, probe and analyses")
    d.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="with --compare: one legend name per run (default: the model's name)")
    d.add_argument("--random-init", action="store_true", help="random weights: MODEL is a preset, or a checkpoint whose shape is copied (its twin)")
    d.add_argument("--seed", type=int, default=0, help="seed for random init, masking, cropping and sampling (default 0)")
    d.add_argument("--max-proteins", type=int, default=None, help="use the first N records of INPUT")
    d.add_argument("--max-length", type=int, default=512, help="crop longer proteins to a random window (default 512)")
    d.add_argument("--mask-rate", type=float, default=0.15, help="share of residues masked for the output measures: sentinels for T5's decoder, <mask> for a "
                        "masked LM (default 0.15)")
    d.add_argument("--analyses", nargs="+", default=None, metavar="NAME",
                   help="subset of: contribution skip early-exit cka probe (default: all the model supports)")
    d.add_argument("--layers", nargs="+", type=int, default=None, metavar="L",
                   help="encoder layers (0..N, negative from the end) for skip/early-exit/CKA/probes (default all)")
    d.add_argument("--decoder-layers", nargs="+", type=int, default=None, metavar="L",
                   help="decoder layers (0..M) for the same analyses (default all)")
    dec = d.add_mutually_exclusive_group()
    dec.add_argument("--decoder", dest="decoder", action="store_true", default=None,
                     help="require the decoder analyses (an error for a model without a decoder)")
    dec.add_argument("--no-decoder", dest="decoder", action="store_false", help="analyse the encoder's layers only")
    d.add_argument("--task", default="ssp3", help="probe task: ssp3, or none (default ssp3)")
    d.add_argument("--probe-data", default=None,
                   help="folder with the probe task's files (default: $PROTLM_DATA/ssp_netsurfp)")
    d.add_argument("--probe-train", type=int, default=200, help="training proteins for the probes (default 200)")
    d.add_argument("--probe-test", type=int, default=100, help="test proteins for the probes (default 100)")
    d.add_argument("--skip-proteins", default="64", metavar="N",
                   help="run the skip analysis (each block removed in turn: N^2/2 block runs per protein for N "
                        "blocks) on a seeded sample of N proteins, or 'all' (default 64)")
    d.add_argument("--cka-tokens", type=int, default=8192, help="tokens sampled for CKA (default 8192)")
    d.add_argument("--batch-tokens", type=int, default=4096, help="padded encoder tokens per batch (default 4096)")
    d.add_argument("--flip-threshold", type=float, default=0.05,
                   help="summary: a layer barely changes the output when it flips fewer top-1 predictions (default 0.05)")
    d.add_argument("--truncate-at", default=None, metavar="K",
                   help="also write an encoder-only model cut after layer K (or 'auto': the probe's 95%% layer)")
    d.add_argument("--dtype", default="auto",
                   help="auto (bf16 where this device runs it fast, else fp32), fp32, bf16 or fp16")
    d.add_argument("--device", default="cpu", help="torch device (default cpu)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(run=run_depth)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def run_depth(args: argparse.Namespace) -> int:
    from protlm.analysis import DepthOptions, run_depth_analysis
    from protlm.cli.common import load_model
    from protlm.errors import ConfigError, InputError

    if args.compare is not None:
        return run_compare(args)
    if args.labels is not None:
        raise ConfigError("--labels names the runs of --compare; it has no use without it")
    if args.model is None or args.input is None:
        raise ConfigError("analyze depth needs MODEL and INPUT (or --compare RUN_DIR ... to compare finished runs)")
    if not os.path.exists(args.input):
        raise InputError(f"{args.input}: no such file")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"{args.out}: exists and is not a directory")
    task = None if args.task.lower() == "none" else args.task
    options = DepthOptions(
        analyses=tuple(args.analyses) if args.analyses else None, decoder=args.decoder,
        encoder_layers=args.layers, decoder_layers=args.decoder_layers, max_length=args.max_length,
        mask_rate=args.mask_rate, seed=args.seed, batch_tokens=args.batch_tokens, cka_tokens=args.cka_tokens,
        probe_task=task, probe_data=args.probe_data, probe_train=args.probe_train, probe_test=args.probe_test,
        flip_threshold=args.flip_threshold, skip_proteins=count_or_all(args.skip_proteins, "--skip-proteins"),
    )
    pre = load_model(args.model, random_init=args.random_init, dtype=args.dtype, device=args.device, seed=args.seed)
    from protlm.convert.fallback import refuse_fallback

    refuse_fallback(pre.model, "analyze depth")
    report, written = run_depth_analysis(pre, args.input, args.out, options, max_proteins=args.max_proteins,
                                         progress=not args.quiet, truncate_at=args.truncate_at)
    print(report.summary)
    print()
    for name, path in written.items():
        print(f"{name:12s} {path}")
    print(f"time         {report.timing['total']:.1f} s")
    return 0


def count_or_all(value: str, flag: str) -> int | None:
    """A ``N|all`` option: the number, or None for all; a one-line error otherwise."""
    from protlm.errors import ConfigError

    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} takes a number of proteins or 'all', got {value!r}") from None


def run_compare(args: argparse.Namespace) -> int:
    from protlm.analysis.compare import compare_runs, write_comparison
    from protlm.errors import ConfigError

    if args.model is not None:  # a positional before --compare would otherwise be silently ignored
        raise ConfigError(f"--compare reads finished runs; drop {args.model!r}{' ' + repr(args.input) if args.input else ''} "
                          "(or add it to the runs after --compare)")
    cmp = compare_runs(args.compare, args.labels)
    written = write_comparison(cmp, args.out)
    for note in cmp.notes:
        print(note)
    for r in cmp.runs:
        missing = ", ".join(f"{m} ({why})" for m, why in r.missing.items())
        print(f"{r.label}: {r.objective}, {r.data['encoder']['n_layers']} layers" + (f"; not drawn: {missing}" if missing else ""))
    for name, path in written.items():
        print(f"{name:12s} {path}")
    return 0
