"""``protlm project P.h5 --method pca|tsne|umap --labels labels.csv -o plot.png``: a 2D map of per-protein
embeddings coloured by a label column (ProtTrans Fig. 4)."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("project", help="2D map (PCA, t-SNE, UMAP) of per-protein embeddings, coloured by a label")
    p.add_argument("embeddings", help="per-protein HDF5 file (protlm embed --per-protein)")
    p.add_argument("--method", choices=["pca", "tsne", "umap"], default="pca",
                   help="pca (default), tsne, or umap (needs umap-learn: pip install 'protlm[umap]')")
    p.add_argument("--labels", help="CSV with an id column and a label column (ids as in the FASTA headers)")
    p.add_argument("--id-column", help="id column of --labels (default: 'id'/'name'/'accession'..., else the first)")
    p.add_argument("--label-column", help="label column of --labels (default: the first column that is not the id)")
    p.add_argument("--layer", type=int, default=None,
                   help="layer to plot from a multi-layer file (default: the last stored)")
    p.add_argument("-o", "--output", required=True, help="image file (.png, .pdf, .svg)")
    p.add_argument("--coords", help="also write the 2D coordinates to this CSV")
    p.add_argument("--title", default=None, help="plot title (default: the file and model)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protlm.embedding.project import plot, project, read_labels, write_coords
    from protlm.embedding.store import check_output_path

    check_output_path(args.output)
    if args.coords:
        check_output_path(args.coords)
    labels, label_name = (read_labels(args.labels, args.id_column, args.label_column) if args.labels
                          else (None, ""))
    proj = project(args.embeddings, args.method, labels, layer=args.layer, seed=args.seed, perplexity=args.perplexity)
    title = args.title if args.title is not None else _default_title(args.embeddings, args.layer)
    plot(proj, args.output, title=title, label_name=label_name)
    if args.coords:
        write_coords(proj, args.coords)
    missing = sum(1 for x in (proj.labels or []) if x == "(no label)")
    print(f"wrote {args.output}: {len(proj.ids)} proteins, {proj.note}"
          + (f"; {missing} without a label" if missing else ""), file=sys.stderr)
    return 0


def _default_title(path: str, layer: int | None) -> str:
    from protlm.embedding.store import EmbeddingStore

    with EmbeddingStore(path) as store:
        model = str(store.attrs.get("model", "?"))
        layers = store.layers
    shown = layer if layer is not None else (layers[-1] if layers else "?")
    return f"{os.path.basename(path)}: {os.path.basename(model.rstrip('/')) or model}, layer {shown}"
