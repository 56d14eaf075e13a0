"""``protlm transfer --reference ref.h5 --labels ref.csv --query query.h5 -k 1 -o transferred.tsv``: label each
query protein with the labels of its nearest labelled reference proteins (goPredSim / EAT annotation transfer)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("transfer", help="annotation transfer: label queries by their nearest labelled references "
                                        "in embedding space (goPredSim / EAT)")
    p.add_argument("--reference", required=True, help="per-protein HDF5 of the labelled proteins (protlm embed "
                                                      "--per-protein)")
    p.add_argument("--labels", required=True, help="CSV/TSV with an id column and a label column for the reference")
    p.add_argument("--query", required=True, help="per-protein HDF5 of the proteins to label, embedded with the "
                                                  "same model")
    p.add_argument("-o", "--output", required=True, help="TSV: one row per query and neighbour (see docs/transfer.md)")
    p.add_argument("-k", type=int, default=1, help="neighbours per query (default 1)")
    p.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean",
                   help="embedding distance (default euclidean, as in EAT)")
    p.add_argument("--layer", type=int, default=None, help="layer of multi-layer files (default: the last stored)")
    p.add_argument("--id-column", help="id column of --labels (default: 'id'/'name'/'accession'..., else the first)")
    p.add_argument("--label-column", help="label column of --labels (default: the first that is not the id)")
    p.add_argument("--allow-missing", action="store_true",
                   help="leave out reference proteins without a label instead of stopping")
    p.add_argument("--exclude-self", action="store_true",
                   help="never transfer from a reference with the query's own id (leave-one-out)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protlm.embedding.project import read_labels
    from protlm.embedding.store import check_output_path
    from protlm.embedding.transfer import transfer_annotations, write_tsv

    check_output_path(args.output)
    labels, _ = read_labels(args.labels, args.id_column, args.label_column)
    transfers = transfer_annotations(args.reference, labels, args.query, k=args.k, metric=args.metric,
                                     layer=args.layer, allow_missing=args.allow_missing,
                                     exclude_self=args.exclude_self, labels_path=args.labels)
    write_tsv(transfers, args.output)
    print(f"wrote {args.output}: {len(transfers)} queries, {args.k} neighbour(s) each ({args.metric})",
          file=sys.stderr)
    return 0
