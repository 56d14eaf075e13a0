"""``protlm train-head``: a head on your own labelled proteins, on a model's frozen embeddings or fine-tuning it.

    protlm train-head MODEL labels.csv -o runs/heads/mytask               # id,sequence,label
    protlm train-head MODEL sequences.fasta -o OUT                         # biotrainer: >id TARGET=.. SET=..
    protlm train-head MODEL labels.fasta --sequences seqs.fasta --mask mask.fasta -o OUT   # biotrainer per residue
    protlm train-head MODEL labels.csv --head light --seeds 3 --class-weights --split 0.8,0.1,0.1 --seed 1 -o OUT
    protlm train-head MODEL labels.csv --finetune lora --set finetune.lora_rank=4 --merge -o OUT   # LoRA with the head
    protlm train-head --embeddings per_residue.h5 labels.csv -o OUT     # embeddings you have: no MODEL

The label kind (per-residue classes, per-protein classes, a number, several classes joined by ';') is read from
the labels unless --kind says it. Train / validation / test come from the file's sets, else from a seeded random
split. Writes OUT/report.md, OUT/results.json and the head bundle under OUT/heads/<task>/ (see docs/train-head.md).

--finetune lora|full trains the backbone with the head (LoRA adapters, or every weight) in the same protocol;
its settings are --set finetune.KEY=VALUE (lora_rank, lora_alpha, lora_dropout, lora_targets, lora_ffn,
adapter_lr, backbone_lr, freeze_first, checkpointing, train_dropout). The bundle then holds the adapter
(adapter/) or the trained weights (backbone.safetensors); --merge also writes OUT/merged/, the fine-tuned
backbone as a checkpoint (as `protlm export-backbone` does).

--embeddings FILE.h5 replaces MODEL: per-residue embeddings already computed, in protlm's format (protlm embed
--per-residue) or biotrainer's (datasets named by sequence hash, the FASTA id in original_id). The bundle names
the backbone as the file's attributes do (model, dtype, layer, prefix), so `protlm predict` checks it as for
evaluate's heads on stored embeddings.
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    p = sub.add_parser("train-head", help="train a head on your own labelled proteins (CSV/TSV or biotrainer FASTA)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # both optional to argparse, so that "--embeddings FILE LABELS" (no MODEL) parses; run() sorts them out
    p.add_argument("model", nargs="?", help="checkpoint directory or Hub id to embed with; a preset with "
                                            "--random-init; none with --embeddings")
    p.add_argument("labels", nargs="?", help="label file: CSV/TSV (id,sequence,label[,set]) or biotrainer FASTA "
                                             "(TARGET=, SET=)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--kind", help="residue | protein | regression | multilabel (or a full kind name, or a "
                                  "biotrainer protocol name); default: read from the labels")
    p.add_argument("--sequences", help="biotrainer's per-residue protocol: the sequences FASTA (LABELS holds the "
                                       "label strings)")
    p.add_argument("--mask", help="with --sequences: biotrainer's 0/1 mask FASTA (0 = residue without a label)")
    p.add_argument("--unlabelled", default="-", help="per-residue label character meaning 'no label' (default: -)")
    p.add_argument("--separator", default=";", help="multi-label separator (default: ;)")
    p.add_argument("--classes", help="comma-separated class names in output order (default: the training labels, "
                                     "sorted); a label outside them is an error")
    p.add_argument("--task", help="task name (default: the label file's stem)")
    p.add_argument("--head", default="convbert", choices=["convbert", "light", "linear"],
                   help="convbert: Ankh3's Table-4 head (default); light: ProtTrans's two-layer CNN per residue, a "
                        "small MLP per protein; linear: one linear layer")
    p.add_argument("--seeds", default="1", help="head seeds: a count N (seeds 0..N-1) or a list like 7,0,42 (default 1)")
    p.add_argument("--split", help="train,validation,test fractions of a random split (default: the file's sets, "
                                   "or 0.8,0.1,0.1 when it has none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    p.add_argument("--patience", type=int, default=None,
                   help="early stopping: stop after this many epochs without a better validation score (default: "
                        "train all epochs; the best epoch is kept either way)")
    p.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--keep-heads", default="best", choices=["best", "all"],
                   help="bundle of the best seed by validation (default) or of every seed (heads/<task>/seed<S>/)")
    p.add_argument("--finetune", default="frozen", metavar="MODE",
                   help="frozen (default: heads on cached embeddings), lora (LoRA adapters train with the head) or "
                        "full (every backbone weight trains); settings with --set finetune.KEY=VALUE")
    p.add_argument("--merge", action="store_true",
                   help="with --finetune lora|full: also write OUT/merged/, the best seed's fine-tuned backbone as a "
                        "checkpoint (LoRA merged into the weights)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training.epochs=5, training.lr=1e-3, head.num_layers=2, light.hidden=64, "
                        "finetune.lora_rank=4, ...")
    p.add_argument("--random-init", action="store_true", help="random weights: MODEL is a preset or a checkpoint to copy")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random weights with --random-init")
    p.add_argument("--layer", type=int, default=-1, help="encoder layer to embed (default: -1, the last)")
    p.add_argument("--prefix", default="auto", choices=["auto", "nlu", "s2s", "none"], help="task token (default auto)")
    p.add_argument("--embed-dtype", default="auto", help="dtype of the embedding pass (default auto)")
    p.add_argument("--cache-dir", help="embeddings cache (default: $PROTLM_CACHE or ~/.cache/protlm/embeddings)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--embeddings", metavar="FILE.h5",
                   help="per-residue embeddings already computed (protlm embed --per-residue, or biotrainer's "
                        "hash-keyed file) instead of MODEL; --layer picks one of a multi-layer file")
    p.add_argument("--allow-missing", action="store_true",
                   help="with --embeddings: leave out proteins the file lacks (counted in the report) instead of "
                        "stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run, late_positionals=("labels",))


def parse_seeds(text: str) -> list[int]:
    from protlm.errors import ConfigError

    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: a count or a comma-separated list of integers") from None
    if not parts or (len(parts) == 1 and parts[0] < 1):
        raise ConfigError(f"--seeds {text!r}: a count >= 1 or a list of seeds")
    if len(parts) == 1 and "," not in text:
        return list(range(parts[0]))
    if len(set(parts)) != len(parts):
        raise ConfigError(f"--seeds {text!r} repeats a seed")
    return parts


def run(args: argparse.Namespace) -> int:
    import torch

    from protlm.errors import ConfigError
    from protlm.evaluate.custom import TrainHeadSettings, parse_fractions, run_train_head
    from protlm.evaluate.embeddings import DirectorySource, FinetuneSource, ModelSource
    from protlm.evaluate.labels import read_labels
    from protlm.finetune.config import MODES, parse_modes
    from protlm.settings import override, parse_sets

    changes = parse_sets(args.set)
    settings = override(TrainHeadSettings(), changes, "--set") if changes else TrainHeadSettings()
    modes = parse_modes(args.finetune)
    if len(modes) != 1:
        raise ConfigError(f"--finetune {args.finetune}: train-head trains with one backbone mode, one of "
                          f"{', '.join(MODES)} (protlm evaluate --finetune compares several)")
    mode = modes[0]
    if args.labels is None and args.embeddings:  # the one word given is LABELS
        args.model, args.labels = None, args.model
    if args.embeddings:
        _check_stored(args, mode)
    elif args.labels is None:
        raise ConfigError("give MODEL (the model to embed with) and LABELS, or --embeddings FILE.h5 and LABELS")
    if mode == "frozen" and any(k.startswith("finetune.") for k in changes):
        raise ConfigError("--set finetune.*: the backbone is frozen; add --finetune lora or full")
    if mode != "frozen" and args.embed_dtype != "auto":
        raise ConfigError(f"--embed-dtype applies to frozen embeddings; under --finetune {mode} the backbone runs in "
                          "fp32 (training.precision sets the autocast of the training passes)")
    seeds = parse_seeds(args.seeds)
    fractions = parse_fractions(args.split) if args.split else None
    labels = read_labels(args.labels, args.kind, sequences=args.sequences, mask=args.mask,
                         unlabelled=args.unlabelled, separator=args.separator)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = args.cache_dir or os.environ.get("PROTLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "protlm", "embeddings")
    common = dict(random_init_of=args.model if args.random_init else None, layer=args.layer, prefix=args.prefix,
                  cache_dir=cache, device=device, threads=args.threads, seed=args.init_seed)
    if args.embeddings:
        source = DirectorySource(args.embeddings, layer=None if args.layer == -1 else args.layer)
    elif mode == "frozen":
        source = ModelSource(args.model, dtype=args.embed_dtype, **common)
    else:
        source = FinetuneSource(args.model, mode, settings.finetune, **common)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    print(f"protlm train-head: {labels.path} ({labels.kind}), {source.name}, {args.head} head, seeds "
          f"{','.join(map(str, seeds))}; output {args.out}")
    out = run_train_head(labels, source, args.out, task_name=args.task or "", classes=classes, head=args.head,
                         seeds=seeds, fractions=fractions, split_seed=args.seed, use_class_weights=args.class_weights,
                         patience=args.patience, settings=settings, keep_heads=args.keep_heads, device=device,
                         progress=not args.no_progress, allow_missing=args.allow_missing, merge=args.merge)
    with open(os.path.join(args.out, "report.md"), encoding="utf-8") as fh:
        print(fh.read())
    print(f"wrote {args.out}/report.md, results.json and {len(out['bundles'])} head bundle(s)"
          + (f", the fine-tuned backbone in {out['merged']}" if out.get("merged") else "")
          + f" ({out['seconds']:.0f} s)")
    return 0


def _check_stored(args: argparse.Namespace, mode: str) -> None:
    """--embeddings replaces MODEL: the options that make embeddings have nothing to act on."""
    from protlm.errors import ConfigError

    if args.model is not None:
        raise ConfigError(f"--embeddings replaces MODEL: give only LABELS (got {args.model} {args.labels})")
    if mode != "frozen":
        raise ConfigError(f"--finetune {mode} trains the backbone, but stored embeddings ({args.embeddings}) cannot "
                          "be fine-tuned: give MODEL instead of --embeddings")
    given = [opt for opt, on in (("--random-init", args.random_init), ("--embed-dtype", args.embed_dtype != "auto"),
                                 ("--prefix", args.prefix != "auto"), ("--cache-dir", args.cache_dir)) if on]
    if given:
        raise ConfigError(f"{given[0]} applies to embedding with MODEL; --embeddings {args.embeddings} reads "
                          "embeddings as they were stored")
