"""``protlm evaluate``: Ankh3's downstream benchmark (ConvBERT heads, 3 seeds) for models or stored embeddings.

    protlm evaluate --suite configs/eval/ankh3.yaml --model runs/tiny-cpu/final
    protlm evaluate --suite configs/eval/ankh3.yaml --embeddings name=DIR     # DIR/<dataset>.h5, per residue
    protlm evaluate --suite configs/eval/ankh3.yaml --random-init tiny --quick
    protlm evaluate --suite configs/eval/ankh3.yaml --model ESM2_DIR --model ANKH3_DIR   # families side by side
    protlm evaluate --suite configs/eval/ankh3.yaml --export-fasta DIR       # sequences to embed elsewhere
    protlm evaluate --suite configs/eval/ankh3.yaml --model M --finetune frozen,lora,full   # fine-tuning columns

The one-hot baseline is always in the table, and each --model gets its random-init twin (same architecture,
random weights) unless --no-baselines. Re-running the same command resumes: finished (model, task, seed) units
are read back from OUT/units. Each (source, task)'s trained head is kept as a bundle under OUT/heads (see
`protlm predict`).
"""

from __future__ import annotations

import argparse
import os

from protlm.cli.allocator import active_allocator


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="benchmark embeddings with Ankh3's protocol (ConvBERT heads, seeds 7/0/42)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=os.path.join("configs", "eval", "ankh3.yaml"), help="suite YAML (default: %(default)s)")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="checkpoint directory or Hub id to embed with, T5 or ESM-2 (repeatable)")
    p.add_argument("--random-init", action="append", default=[], metavar="ARCH",
                   help="a randomly initialised model of a preset or of a checkpoint's architecture (repeatable)")
    p.add_argument("--embeddings", action="append", default=[], metavar="[NAME=]DIR|FILE.h5",
                   help="precomputed per-residue embeddings: DIR/<dataset>.h5 per dataset, or one .h5 file holding "
                        "every dataset's proteins (protlm's or biotrainer's layout; repeatable)")
    p.add_argument("--finetune", default="frozen", metavar="MODES",
                   help="how each --model's backbone takes part, comma-separated for a column each: frozen (the "
                        "default: heads on stored embeddings), lora (LoRA adapters train with the head), full "
                        "(every backbone weight trains); settings under the suite's finetune: "
                        "(e.g. --set finetune.lora_rank=4)")
    p.add_argument("--no-baselines", action="store_true",
                   help="leave out the one-hot baseline and the random-init twins of --model")
    p.add_argument("--out", help="output directory (default: runs/eval/<suite name>[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke-test profile: subsets and fewer epochs")
    p.add_argument("--tasks", help="comma-separated task names to run (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite setting, e.g. training.epochs=5, seeds=[7], tasks.SSP-3.training.lr=1e-3")
    p.add_argument("--data-root", help="directory the suite's dataset paths are relative to (default: the suite's data_root)")
    p.add_argument("--layer", type=int, default=-1, help="encoder layer to embed (default: -1, the last)")
    p.add_argument("--prefix", action="append", choices=["auto", "nlu", "s2s", "none"],
                   help="task token before the sequence (default: by model family, [NLU] for Ankh3, none for "
                        "ESM-2); repeat (--prefix nlu --prefix s2s) for a column per prefix, as in Table 5 (models "
                        "without task tokens get one column)")
    p.add_argument("--embed-dtype", default="auto",
                   help="dtype of the embedding forward pass (default: auto, bf16 where this device runs it fast, "
                        "else fp32); int8: dynamic int8 on CPU, approximate, a column of its own")
    p.add_argument("--cache-dir", help="embeddings cache (default: $PROTLM_CACHE or ~/.cache/protlm/embeddings)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 per unit process with --jobs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="heads trained at once, each in its own process (default 1; on a CPU, one per core)")
    p.add_argument("--allow-missing", action="store_true",
                   help="leave out proteins that have no embedding (counted in the report) instead of stopping")
    p.add_argument("--keep-heads", choices=["best", "all"], default="best",
                   help="head bundles kept under OUT/heads/<source>/<task>/: the best seed by validation (default) "
                        "or all seeds (seed<S>/); `protlm predict --heads` applies them")
    p.add_argument("--export-fasta", metavar="DIR", help="write DIR/<dataset>.fasta for every dataset and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from protlm.errors import ConfigError
    from protlm.evaluate import (DirectorySource, ModelSource, OneHotSource, export_fasta, load_suite, run_suite,
                                 write_report)
    from protlm.evaluate.embeddings import FinetuneSource
    from protlm.finetune.config import parse_modes
    from protlm.evaluate.training import describe_precision

    suite = load_suite(args.suite, args.set, args.data_root)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.export_fasta:
        for path, n in export_fasta(suite, args.export_fasta, tasks):
            print(f"wrote {path} ({n} sequences)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = args.cache_dir or os.environ.get("PROTLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "protlm", "embeddings")
    common = dict(layer=args.layer, cache_dir=cache, dtype=args.embed_dtype, device=device, threads=args.threads)
    prefixes = list(dict.fromkeys(args.prefix or ["auto"]))
    modes = parse_modes(args.finetune)
    tuned = [m for m in modes if m != "frozen"]
    if tuned and args.embeddings:
        raise ConfigError(f"--finetune {','.join(tuned)} cannot be used with --embeddings: stored embeddings have no "
                          "backbone to fine-tune (give the model with --model)")
    if tuned and not args.model:
        raise ConfigError(f"--finetune {','.join(tuned)} needs a --model whose backbone to fine-tune")
    finetune = suite.finetune_config() if tuned else None
    sources = [] if args.no_baselines else [OneHotSource()]
    for spec in args.random_init:
        sources += [ModelSource(spec, random_init_of=spec, prefix=p, **common) for p in _prefixes_for(spec, prefixes)]
    for spec in args.model:
        mine = _prefixes_for(spec, prefixes)
        if not args.no_baselines:
            sources += [ModelSource(spec, random_init_of=spec, prefix=p, **common) for p in mine]
        if "frozen" in modes:
            sources += [ModelSource(spec, prefix=p, **common) for p in mine]
        sources += [FinetuneSource(spec, m, finetune, prefix=p, **common) for m in tuned for p in mine]
    for item in args.embeddings:
        name, _, directory = item.rpartition("=")
        sources.append(DirectorySource(directory, name or None, None if args.layer == -1 else args.layer))
    if not sources:
        raise ConfigError("nothing to evaluate: give --model, --random-init or --embeddings (or drop --no-baselines)")
    seen: set[str] = set()
    for s in sources:
        if s.key in seen:
            raise ConfigError(f"{s.name} is listed twice (each --model already brings its random-init twin, "
                              "unless --no-baselines)" if s.baseline else f"{s.name} is listed twice")
        seen.add(s.key)
    out = args.out or os.path.join("runs", "eval", suite.name + ("-quick" if args.quick else ""))
    print(f"protlm evaluate: suite {suite.source} ({'quick' if args.quick else 'full'} profile), "
          f"{len(sources)} column(s): {', '.join(s.name for s in sources)}; output {out}; "
          f"malloc: {active_allocator() or 'system'}")
    models = [s for s in sources if isinstance(s, ModelSource)]
    if models:
        print(f"protlm evaluate: embedding {models[0].precision.describe()}")
    print(f"protlm evaluate: heads {describe_precision(suite.training.get('precision', 'auto'), device)}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    result = run_suite(suite, sources, out, quick=args.quick, tasks=tasks, allow_missing=args.allow_missing,
                       device=device, progress=not args.no_progress, write_report=write_report, jobs=args.jobs,
                       job_threads=args.threads or 1, keep_heads=args.keep_heads)
    with open(os.path.join(out, "report.md"), encoding="utf-8") as fh:
        print(fh.read())
    print(f"wrote {out}/report.md, results.csv, results.json ({result.seconds / 60:.1f} min)")
    return 0


def _prefixes_for(spec: str, prefixes: list[str]) -> list[str]:
    """The --prefix columns of one model: all of them, or for a model without task tokens (ESM-2) its one column
    without a prefix, so that ESM-2 and Ankh3's [NLU] and [S2S] columns fit in one report."""
    from protlm.evaluate.embeddings import has_task_tokens

    if all(p in ("auto", "none") for p in prefixes) or has_task_tokens(spec):
        return prefixes
    print(f"protlm evaluate: {spec} has no task tokens; one column without a prefix instead of "
          f"--prefix {' '.join(prefixes)}")
    return ["auto"]

