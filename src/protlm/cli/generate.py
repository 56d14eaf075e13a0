"""``protlm generate MODEL --prefix SEQ | --input prefixes.fasta``: complete proteins, FASTA out."""

from __future__ import annotations

import argparse
import sys

from protlm.cli.common import add_model_args, load
from protlm.errors import ConfigError, InputError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete protein prefixes (Ankh3 [S2S] task, or a causal LM)",
                       description="Complete each prefix with the decoder (encoder input: [S2S] + prefix + </s>), "
                                   "or, for a causal LM such as ProtGPT2, by continuing '<|endoftext|>\\n' + prefix "
                                   "(--max-new-tokens then counts BPE tokens). Only residues are generated; </s> "
                                   "(<|endoftext|>) ends a sequence. Output is FASTA with the settings in each header.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prefix", action="append", help="a prefix sequence (repeat for several)")
    src.add_argument("--input", help="FASTA (or CSV) file of prefixes")
    p.add_argument("-o", "--output", help="output FASTA (default: stdout); a long job writes OUTPUT.partial as it "
                                             "goes, and re-running the same command continues from it")
    p.add_argument("--num", type=int, default=1, help="sequences per prefix (default 1)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-new-tokens", type=int, help="cap on generated residues (default 512)")
    length.add_argument("--length-ratio", type=float, help="cap = ratio x prefix length (Ankh3 trained on 1.0)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="do not end before this many residues (default 0)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest prefix or continuation accepted (default 4096)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely residues (default: all)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default 1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="causal LMs (ProtGPT2): divide the logits of tokens already present by this (default 1.0 "
                        "= off; ProtGPT2's card uses 1.2)")
    p.add_argument("--beams", type=int, help="beam search with this many beams (returns the --num best)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length**this (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="decoder rows per batch (default 16)")
    p.add_argument("--residues", choices=["standard", "all"], default="standard",
                   help="which residues may be generated: the 20 standard ones, or also X/U/Z/O/B")
    p.add_argument("--only-new", action="store_true", help="write only the generated part, not prefix + continuation")
    p.add_argument("--no-cache", action="store_true", help="recompute the decoder at every step (slow; for checks)")
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace):
    from protlm.generation import GenerationConfig

    sampling_opts = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                       ("top_p", args.top_p)) if v is not None}
    given = ", ".join(f"--{k.replace('_', '-')}" for k in sampling_opts)
    if args.beams is not None and args.beams > 1:
        if args.greedy or sampling_opts:
            raise ConfigError(f"--beams cannot be combined with {'--greedy' if args.greedy else given}")
        strategy = "beam"
    elif args.greedy:
        if sampling_opts:
            raise ConfigError(f"--greedy cannot be combined with {given}")
        strategy = "greedy"
    else:
        strategy = "sample"
    extra = {"max_length": args.max_length} if args.max_length is not None else {}
    return GenerationConfig(
        strategy=strategy, num_return=args.num, max_new_tokens=args.max_new_tokens, length_ratio=args.length_ratio,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.beams or 1, length_penalty=args.length_penalty, seed=args.seed, batch_size=args.batch_size,
        repetition_penalty=args.repetition_penalty,
        residues=args.residues, use_cache=not args.no_cache, **sampling_opts, **extra,
    )


def read_prefixes(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.prefix:
        return [(f"prefix{i + 1}", p) for i, p in enumerate(args.prefix)]
    from protlm.data.fasta import read_sequences

    records = [(r.id, r.sequence) for r in read_sequences(args.input)]
    if not records:
        raise InputError(f"{args.input}: no sequences")
    return records


PART = 256  # prefixes per part of a resumable job


def run(args: argparse.Namespace) -> int:
    from protlm.generation import generate, to_fasta

    config = build_config(args)
    config.validate()  # before loading a model: bad options fail fast
    prefixes = read_prefixes(args)
    pre = load(args)
    if pre.model.kind == "masked-lm":
        raise ConfigError(f"{args.model} is a masked-LM (no decoder), so it cannot complete prefixes; use "
                          "'protlm infill' to fill masked positions")
    if args.output:
        return _run_to_file(args, config, prefixes, pre)
    sys.stdout.write(to_fasta(generate(pre, prefixes, config), config, only_new=args.only_new))
    return 0


def _run_to_file(args, config, prefixes: list[tuple[str, str]], pre) -> int:
    """Generate in parts of PART prefixes into OUTPUT.partial, so that a killed job continues where it stopped
    (with the same samples: they depend on the prefix's index, not on the part); OUTPUT appears at the end."""
    import os

    from tqdm.auto import tqdm

    from protlm.utils import PartialOutput
    from protlm.generation import generate, to_fasta

    model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    out = PartialOutput(args.output, [model, args.random_init, args.init_seed, args.dtype, config.to_dict(),
                                      args.only_new, prefixes])
    if out.done:
        print(f"resuming: {out.done} of {len(prefixes)} prefixes already in {out.partial}", file=sys.stderr)
    with tqdm(total=len(prefixes), initial=out.done, unit="prefix", desc="generate",
              disable=not sys.stderr.isatty()) as bar:
        while out.done < len(prefixes):
            part = prefixes[out.done:out.done + PART]
            out.append(to_fasta(generate(pre, part, config, first_index=out.done), config, only_new=args.only_new),
                       len(part))
            bar.update(len(part))
    out.finish()
    print(f"wrote {len(prefixes) * config.num_return} sequences to {args.output}", file=sys.stderr)
    return 0
