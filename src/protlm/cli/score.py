"""``protlm score MODEL --wildtype WT.fasta --variants variants.csv -o scores.csv``: zero-shot variant effects.

Also ``protlm score MODEL --pll --input seqs.fasta -o pll.csv`` for per-sequence pseudo-log-likelihoods. MODEL
``blosum62`` scores variants with the BLOSUM62 substitution matrix instead of a model (the baseline).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

from protlm.cli.common import add_model_args
from protlm.cli.common import load as _load
from protlm.errors import InputError
from protlm.generation.variant_table import MUTATION_COLUMNS, SEQUENCE_COLUMNS, read_variant_csv, read_wildtype, spearman

BASELINES = ("blosum62",)


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="zero-shot variant scores (masked marginals) or pseudo-log-likelihoods",
                       description="Variant mode: --wildtype and --variants (a CSV with a mutation column such as "
                                   "'A23G' or 'A23G:V40L', or FLIP-style full mutated sequences). Writes the input "
                                   "rows with 'mutations' and 'score' columns. PLL mode: --pll --input seqs.fasta. "
                                   "MODEL 'blosum62' gives the substitution-matrix baseline.")
    add_model_args(p)
    p.add_argument("--wildtype", help="FASTA with the wild type (first record, or --wildtype-id), or a sequence")
    p.add_argument("--wildtype-id", help="record of --wildtype to use when it holds several")
    p.add_argument("--variants", help="CSV (optionally .gz) of variants")
    p.add_argument("--mutation-column", help=f"column with mutations (default: first of {', '.join(MUTATION_COLUMNS)})")
    p.add_argument("--sequence-column", help=f"column with full sequences (default: first of {', '.join(SEQUENCE_COLUMNS)})")
    p.add_argument("--where", action="append", default=[], metavar="COL=VALUE",
                   help="keep only rows where COL equals VALUE (repeatable), e.g. set=test")
    p.add_argument("--target", help="numeric column to correlate with the scores (prints Spearman's rho)")
    p.add_argument("--strategy", choices=["masked-marginal", "wt-marginal", "joint", "llr"], default=None,
                   help="masked-marginal: each position masked on its own, log p(mt) - log p(wt) summed over a "
                        "variant's mutations (default for masked-LM and encoder-decoder models); wt-marginal "
                        "(masked-LM models): the same difference read from one pass on the unmasked wild type; "
                        "joint (encoder-decoder models): all of a variant's positions masked together, decoded in "
                        "order; llr (causal LMs such as ProtGPT2, their default): log-likelihood of the mutant "
                        "minus that of the wild type")
    p.add_argument("--first-index", type=int, default=1, help="number of the first residue in the notation (default 1)")
    p.add_argument("--pll", action="store_true", help="score the sequences of --input by pseudo-log-likelihood")
    p.add_argument("--input", help="FASTA/CSV of sequences for --pll")
    p.add_argument("--token-budget", type=int, default=16384, help="encoder tokens per forward pass, padding included (default 16384)")
    p.add_argument("-o", "--output", help="output CSV (default: stdout)")
    p.set_defaults(run=run)


def load(args: argparse.Namespace):
    """MODEL; a model loaded through transformers' AutoModel (fallback) is refused in one line: it has no LM head."""
    from protlm.convert.fallback import refuse_fallback

    pre = _load(args)
    refuse_fallback(pre.model, "protlm score")
    return pre


def run(args: argparse.Namespace) -> int:
    if args.pll:
        return run_pll(args)
    if not args.wildtype or not args.variants:
        raise InputError("variant scoring needs --wildtype and --variants (or use --pll --input FILE)")
    from protlm.generation.mutations import check_wildtype

    wt_id, wildtype = read_wildtype(args.wildtype, args.wildtype_id)
    wildtype = check_wildtype(wildtype, record=f"{args.wildtype}: {wt_id}")
    table = read_variant_csv(args.variants, wildtype, mutation_column=args.mutation_column,
                             sequence_column=args.sequence_column, where=args.where, first_index=args.first_index)
    header, rows, variants = table.header, table.rows, table.variants
    if args.model in BASELINES and not args.random_init:
        from protlm.generation import blosum62_scores

        scores = blosum62_scores(variants)
        method = "blosum62"
    else:
        from protlm.generation import score_variants

        pre = load(args)
        scores = score_variants(pre, wildtype, variants, strategy=args.strategy, first_index=args.first_index,
                                token_budget=args.token_budget)
        method = args.strategy or ("llr" if pre.model.kind == "causal-lm" else "masked-marginal")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*header, "mutations", "score"])
    for row, v, s in zip(rows, variants, scores):
        w.writerow([*row, v.label(args.first_index), f"{s:.6g}"])
    summary = {"model": args.model, "random_init": args.random_init, "method": method, "wildtype": wt_id,
               "wildtype_length": len(wildtype), "variants": args.variants, "where": args.where,
               "n": len(rows), "first_index": args.first_index}
    if args.target:
        summary.update(spearman(table, scores, args.target))
        print(f"spearman rho = {summary['spearman']:.4f} over {summary['n_target']} rows "
              f"(target column {args.target!r}, method {method})", file=sys.stderr)
    write_output(args.output, buf.getvalue(), summary)
    return 0


PLL_PART = 64  # sequences per part of a resumable --pll job (each costs one forward pass per residue)


def run_pll(args: argparse.Namespace) -> int:
    from protlm.data.fasta import read_sequences

    if not args.input:
        raise InputError("--pll needs --input FILE (FASTA or CSV of sequences)")
    if args.model in BASELINES:
        raise InputError(f"{args.model} scores substitutions only; --pll needs a model")
    records = [(r.id, r.sequence) for r in read_sequences(args.input)]
    summary = {"model": args.model, "random_init": args.random_init, "method": "pseudo-log-likelihood",
               "input": args.input, "n": len(records)}  # causal LMs: the exact log-likelihood (same columns)
    header = "id,length,pll,pll_per_residue\n"
    if not args.output:
        sys.stdout.write(header + _pll_rows(load(args), records, args.token_budget))
        return 0
    from protlm.utils import PartialOutput

    model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    out = PartialOutput(args.output, [model, args.random_init, args.init_seed, args.dtype, records])
    if out.done:
        print(f"resuming: {out.done} of {len(records)} sequences already in {out.partial}", file=sys.stderr)
    else:
        out.append(header, 0)
    pre = load(args)
    while out.done < len(records):
        part = records[out.done:out.done + PLL_PART]
        out.append(_pll_rows(pre, part, args.token_budget), len(part))
    out.finish()
    write_output(args.output, None, summary)
    return 0


def _pll_rows(pre, records: list[tuple[str, str]], token_budget: int) -> str:
    from protlm.generation import pseudo_log_likelihood

    per_pos = pseudo_log_likelihood(pre, records, token_budget=token_budget, per_position=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for (rid, seq), lp in zip(records, per_pos):
        # per residue: causal LMs give one entry per token, so divide by the residues, not the entries
        w.writerow([rid, len(seq), f"{lp.sum():.6g}", f"{lp.sum() / len(seq):.6g}"])
    return buf.getvalue()


def write_output(path: str | None, text: str | None, summary: dict) -> None:
    """The table (to stdout without a path; None: already in place) and its summary beside it."""
    from protlm.utils import atomic_write_text

    if not path:
        sys.stdout.write(text)
        return
    if text is not None:
        atomic_write_text(path, text)
    # the settings and headline numbers beside the table, so a scores file can be traced to its run
    atomic_write_text(path + ".json", json.dumps(summary, indent=1) + "\n")
    print(f"wrote {summary['n']} rows to {path}", file=sys.stderr)
