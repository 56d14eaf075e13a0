"""``protlm embed MODEL [INPUT]``: per-residue and per-protein embeddings into HDF5 files, resumable.

Re-running the same command skips proteins already written; ``torchrun --nproc_per_node N -m protlm.cli.main
embed ...`` shards the input over N processes and still writes one file per output.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    from protlm.embedding.engine import DEFAULT_OVERLAP, DEFAULT_WINDOW

    p = sub.add_parser(
        "embed", help="embed a FASTA/CSV file into per-residue and/or per-protein HDF5 files",
        description="Embed protein sequences with a T5 encoder (Ankh, Ankh3, ProtT5) or an ESM-2/DPLM model. "
                    "The output files are resumable: re-run the same command after an interruption and it "
                    "continues where it stopped.",
    )
    p.add_argument("model", help="checkpoint directory or Hugging Face Hub id (or a preset name with --random-init)")
    p.add_argument("input", nargs="?", default=None,
                   help="FASTA, FASTA.gz or CSV (id and sequence columns); default: the bundled example.fasta")
    p.add_argument("--per-residue", metavar="R.h5", help="write (L, D) arrays per protein here")
    p.add_argument("--per-protein", metavar="P.h5", help="write (D,) arrays (mean over residues) per protein here")
    p.add_argument("--layers", nargs="+", default=["-1"], metavar="L",
                   help="encoder layers: 0 = embeddings, l = after block l, -1 = last (after the final norm); "
                        "several give arrays with a leading layer axis; 'all' for every layer (default: -1)")
    p.add_argument("--prefix", choices=["auto", "nlu", "s2s", "none"], default="auto",
                   help="task token before the residues; auto: [NLU] for Ankh3, none for Ankh, ProtT5 and ESM-2 "
                        "(whose vocabulary has no task tokens)")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype; auto: bf16 where this device runs it fast (GPUs with bf16; CPUs where a "
                        "measured bf16 matmul beats fp32), else fp32 (fp16 on older GPUs, guarded); int8: dynamic "
                        "int8 linear layers on CPU, faster and approximate, never the default")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="padded tokens per batch (default 512 on CPU, 16384 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="proteins longer than N residues are embedded in overlapping windows (default: the "
                        f"model's trained limit, 1022 for ESM-2; {DEFAULT_WINDOW} for T5, which has none; "
                        "never above the limit)")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, metavar="N",
                   help="residues shared by neighbouring windows (default: a quarter of --window)")
    p.add_argument("--bad-records", choices=["error", "skip", "x"], default="error",
                   help="FASTA records that are empty or hold gaps, stops or other non-residue characters: stop "
                        "with an error naming the record (default), skip and count them, or repair them "
                        "(drop gaps, other characters become X)")
    p.add_argument("--store-dtype", default="fp32",
                   help="dtype of the stored arrays (fp16 halves the files)")
    p.add_argument("--random-init", action="store_true", help="random weights: MODEL is a preset, or a checkpoint whose shape is copied (its twin)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--mkdir", action="store_true", help="create missing output directories")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0, metavar="S",
                   help="save finished proteins at least this often (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run, late_positionals=("input",))


def run(args: argparse.Namespace) -> int:
    from protlm.embedding.run import embed_files
    from protlm.errors import ConfigError

    layers: object
    if args.layers == ["all"]:
        layers = "all"
    else:
        try:
            layers = [int(x) for x in args.layers]
        except ValueError:
            raise ConfigError(f"--layers takes integers or 'all', got {' '.join(args.layers)}") from None
    summary = embed_files(
        args.model, args.input, per_residue=args.per_residue, per_protein=args.per_protein,
        random_init=args.random_init, seed=args.seed, mkdir=args.mkdir, progress=not args.no_progress,
        checkpoint_seconds=args.checkpoint_seconds, store_dtype=args.store_dtype,
        layers=layers, prefix=args.prefix, dtype=args.dtype, device=args.device, max_tokens=args.max_tokens,
        window=args.window, overlap=args.overlap, bad_records=args.bad_records, threads=args.threads,
    )
    if _rank() == 0:
        print(summary.format(), file=sys.stderr)
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", 0))
