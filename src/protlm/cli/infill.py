"""``protlm infill MODEL --masked "MKT[?]AL[?][?]"``: fill masked positions (T5: the denoising sentinels, left to
right; masked-LM models such as ESM-2: ``<mask>`` tokens, all predicted from one pass)."""

from __future__ import annotations

import argparse
import csv
import io
import sys

from protlm.cli.common import add_model_args, load
from protlm.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("infill", help="fill masked positions ([?]) with the model's residue predictions",
                       description="T5: masked positions become sentinels in the encoder input ([NLU] task); the "
                                   "decoder names a residue for each, left to right. Masked-LM models (ESM-2, DPLM): "
                                   "masked positions become <mask> and one pass predicts them all, each from the "
                                   "unmasked residues. Output: FASTA of filled sequences with "
                                   "the chosen residues and their probabilities in the header; --table adds the full "
                                   "per-position distributions.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--masked", action="append", help='sequence with [?] (or ?) at masked positions; repeatable')
    src.add_argument("--sequence", help="a full sequence; mask the residues listed in --positions")
    p.add_argument("--positions", help="1-based positions to mask in --sequence, e.g. 4,7-9")
    p.add_argument("-o", "--output", help="output FASTA (default: stdout)")
    p.add_argument("--table", help="also write a TSV: one row per filled position with all residue probabilities")
    p.add_argument("--num", type=int, default=1, help="fills per input (more than 1 implies sampling)")
    p.add_argument("--sample", action="store_true", help="sample residues (default: most likely residue)")
    p.add_argument("--temperature", type=float, help="sampling temperature (implies --sample)")
    p.add_argument("--top-k", type=int, help="sampling: keep the k most likely residues (implies --sample)")
    p.add_argument("--top-p", type=float, help="sampling: nucleus threshold (implies --sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--residues", choices=["standard", "all"], default="standard",
                   help="residues a position may be filled with (default: the 20 standard ones)")
    p.set_defaults(run=run)


def read_inputs(args: argparse.Namespace):
    from protlm.generation import mask_positions, parse_masked
    from protlm.generation.infilling import parse_positions

    if args.masked:
        if args.positions:
            raise InputError("--positions goes with --sequence; with --masked, mark positions with [?]")
        return [parse_masked(m, record=f"masked{i + 1}") for i, m in enumerate(args.masked)]
    if not args.positions:
        raise InputError("--sequence needs --positions (e.g. --positions 4,7-9)")
    return [mask_positions(args.sequence, parse_positions(args.positions), record="sequence")]


def run(args: argparse.Namespace) -> int:
    from protlm.convert.fallback import refuse_fallback
    from protlm.generation import infill
    from protlm.utils import atomic_write_text

    inputs = read_inputs(args)
    sample = args.sample or args.num > 1 or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    settings = dict(strategy="sample" if sample else "greedy", temperature=args.temperature or 1.0,
                    top_k=args.top_k or 0, top_p=args.top_p if args.top_p is not None else 1.0)
    pre = load(args)
    refuse_fallback(pre.model, "protlm infill")
    results = infill(pre, inputs, num=args.num, seed=args.seed, residues=args.residues, **settings)
    header = f"strategy={settings['strategy']}"
    if sample:
        header += f" temperature={settings['temperature']:g} top_k={settings['top_k']} top_p={settings['top_p']:g} seed={args.seed}"
    lines = []
    for r in results:
        lines.append(f">{r.id}_fill{r.sample + 1} positions={','.join(str(p + 1) for p in r.masked.positions)} "
                     f"residues={r.residues} probs={','.join(f'{p:.4f}' for p in r.probabilities)} "
                     f"logp={r.log_prob:.4f} {header}")
        lines.extend(r.sequence[i:i + 60] for i in range(0, len(r.sequence), 60))
    text = "\n".join(lines) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {len(results)} filled sequences to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.table:
        atomic_write_text(args.table, distribution_table(results))
    return 0


def distribution_table(results) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    alphabet = results[0].alphabet if results else ""
    w.writerow(["id", "sample", "position", "chosen", "p_chosen", *[f"p_{aa}" for aa in alphabet]])
    for r in results:
        for j, pos in enumerate(r.masked.positions):
            w.writerow([r.id, r.sample + 1, pos + 1, r.residues[j], f"{r.probabilities[j]:.6g}",
                        *[f"{v:.6g}" for v in r.distributions[j]]])
    return buf.getvalue()
