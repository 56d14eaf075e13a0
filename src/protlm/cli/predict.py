"""``protlm predict MODEL --heads DIR [DIR ...] proteins.fasta -o predictions.tsv``: trained heads on new proteins.

    protlm predict runs/demo/pretrain/final --heads runs/demo/heads/SSP-3 my.fasta
    protlm predict MODEL --heads OUT/heads/<source>/SSP-3 OUT/heads/<source>/Localization my.fasta -o pred.tsv --h5 probs.h5
    protlm predict --embeddings per_residue.h5 --heads DIR [my.fasta] -o pred.tsv      # stored embeddings, no MODEL
    protlm predict BASE --heads FROZEN_HEAD LORA_HEAD my.fasta -o pred.tsv   # fine-tuned heads: give their base model

Each protein is embedded once (as ``protlm embed`` does: token-budget batches, overlapping windows for long
proteins) at every layer the heads read, and every head is applied. A head trained with a fine-tuned backbone
(train-head/evaluate --finetune lora|full) embeds with its own backbone: MODEL, the base, with the bundle's
adapter merged or trained weights loaded; stored embeddings cannot stand in for it. With ``-o`` the job
resumes: re-run the same command after an interruption and it continues after the last finished part.

Per head the TSV holds the prediction (per residue: the classes joined; per protein: the label or the value;
contacts: the top-L pairs as i,j,p triples, 1-based) and the class probabilities; --h5 the arrays, for a contact
head the (L, L) probability map (docs/formats.md, "Predictions").
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="apply trained head bundles (protlm evaluate / train-head) to new proteins",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="MODEL FASTA",
                   help="the model the heads were trained on (checkpoint directory or Hub id; 'one-hot' for "
                        "one-hot heads; none with --embeddings), then the FASTA/CSV of proteins")
    p.add_argument("--heads", nargs="+", required=True, metavar="DIR",
                   help="head bundle directories (head.json + head.safetensors), or folders of them")
    p.add_argument("-o", "--output", help="TSV of predictions (default: standard output; with a file, resumable)")
    p.add_argument("--h5", metavar="FILE", help="also write the probability arrays (and values) here, by FASTA id")
    p.add_argument("--embeddings", metavar="R.h5",
                   help="per-residue embeddings already computed (protlm embed --per-residue): no MODEL needed")
    p.add_argument("--allow-missing", action="store_true",
                   help="with --embeddings: leave out proteins the file lacks instead of stopping")
    p.add_argument("--random-init", action="store_true", help="MODEL is a random-init twin (heads of such a column)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random weights with --random-init")
    p.add_argument("--dtype", default=None,
                   help="compute dtype of the embeddings (default: the one the heads were trained on, else auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="padded tokens per embedding batch")
    p.add_argument("--window", type=int, default=None, metavar="N", help="window for long proteins (as in embed)")
    p.add_argument("--overlap", type=int, default=None, metavar="N", help="residues shared by neighbouring windows")
    p.add_argument("--bad-records", choices=["error", "skip", "x"], default="error",
                   help="FASTA records with invalid characters: stop (default), skip, or repair")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from protlm.embedding.run import _read_records
    from protlm.errors import ConfigError, InputError
    from protlm.evaluate import predict as P
    from protlm.utils import PartialOutput

    # --heads takes every word after it, so "--heads DIR my.fasta" hands it the FASTA too: a trailing file (not
    # a bundle directory) is the input.
    inputs = list(args.inputs)
    heads = list(args.heads)
    while len(heads) > 1 and os.path.isfile(heads[-1]):
        inputs.append(heads.pop())
    if args.embeddings:
        model, fasta = None, (inputs[0] if inputs else None)
        if len(inputs) > 1:
            raise ConfigError(f"--embeddings replaces MODEL: give only the FASTA file (got {' '.join(inputs)})")
    else:
        if len(inputs) != 2:
            raise ConfigError("usage: protlm predict MODEL --heads DIR [DIR ...] FASTA (or --embeddings R.h5 "
                              "--heads DIR [FASTA])")
        model, fasta = inputs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundles = P.load_heads(heads)
    records = _read_records(fasta, args.bad_records)[0] if fasta else None

    read = None
    pre = None
    if args.embeddings:
        records, read = P.stored_features(args.embeddings, records, bundles, args.allow_missing)
        predictor = P.Predictor(bundles, None, device=device)
    elif model == P.ONE_HOT:  # one-hot heads read the sequences only
        predictor = P.Predictor(bundles, None, device=device)
    else:
        from protlm.cli.common import load_model

        P.check_backbone(bundles, P.backbone_of_spec(model, args.random_init, args.init_seed))
        pre = load_model(model, random_init=args.random_init, dtype=args.dtype or P.load_dtype(bundles),
                         device=device, encoder_only=True, seed=args.init_seed)
        predictor = P.Predictor(bundles, pre, device=device, dtype=args.dtype, max_tokens=args.max_tokens,
                                window=args.window, overlap=args.overlap, threads=args.threads)
    say = lambda msg: print(f"protlm predict: {msg}", file=sys.stderr, flush=True)
    say(f"{len(bundles)} head(s) ({', '.join(predictor.names)}) on {len(records)} proteins; embeddings: "
        f"{predictor.precision}")

    out = None
    if args.output:
        out = PartialOutput(args.output, [
            P.backbone_of(pre) if pre is not None else os.path.abspath(args.embeddings or model),
            [(os.path.abspath(b.path), b.meta.to_dict(), _stamp(os.path.join(b.path, "head.safetensors"))) for b in bundles],
            args.dtype, args.window, args.overlap, records, args.h5 and os.path.abspath(args.h5)])
        if out.done:
            say(f"resuming: {out.done} of {len(records)} proteins already in {out.partial}")
        else:
            out.append(P.tsv_header(predictor), 0)
    else:
        sys.stdout.write(P.tsv_header(predictor))
    parts_dir = args.h5 + ".parts" if args.h5 else None
    start = out.done if out is not None else 0
    if parts_dir:
        os.makedirs(parts_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(parts_dir), "part-*.h5")):
            if int(os.path.basename(stale)[5:-3]) >= start:  # from a killed run, past the resume point
                os.unlink(stale)
    t0 = time.perf_counter()
    done = residues = 0
    for first, part in P.parts(records, start):
        if read is not None:
            preds = predictor.apply(part, [read(oid, len(seq)) for oid, seq in part])
        else:
            preds = predictor.predict(part)
        if parts_dir:
            P.write_h5(os.path.join(parts_dir, f"part-{first:09d}.h5"), predictor, preds)
        text = P.tsv_rows(predictor, preds)
        if out is not None:
            out.append(text, len(part))
        else:
            sys.stdout.write(text)
        done += len(part)
        residues += sum(len(s) for _, s in part)
        say(f"{first + len(part)}/{len(records)} proteins")
    seconds = time.perf_counter() - t0
    if parts_dir:
        P.merge_h5(args.h5, sorted(glob.glob(os.path.join(glob.escape(parts_dir), "part-*.h5"))))
        for f in glob.glob(os.path.join(glob.escape(parts_dir), "part-*.h5")):
            os.unlink(f)
        os.rmdir(parts_dir)
    if out is not None:
        out.finish()
    rate = f"{done / seconds:.1f} proteins/s, {residues / seconds:,.0f} residues/s" if seconds > 0 and done else ""
    say(f"predicted {done} proteins in {seconds:.1f} s{' (' + rate + ')' if rate else ''}"
        + (f"; wrote {args.output}" if args.output else "") + (f", {args.h5}" if args.h5 else ""))
    if records is not None and not records:
        raise InputError("no proteins to predict")
    return 0


def _stamp(path: str) -> list:
    """Size and modification time: a head retrained in place is a different job."""
    st = os.stat(path)
    return [st.st_size, int(st.st_mtime)]
