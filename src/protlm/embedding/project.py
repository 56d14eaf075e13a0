"""2D maps of per-protein embeddings coloured by a label (ProtTrans Fig. 4): PCA, t-SNE or UMAP.

Reads any per-protein embeddings file (:class:`protlm.embedding.store.EmbeddingStore`) and a CSV of labels keyed by
the same ids. t-SNE runs on the first 50 principal components (the usual way to keep it fast and stable).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from protlm.errors import ConfigError, InputError

METHODS = ("pca", "tsne", "umap")
UNLABELLED = "(no label)"
_ID_NAMES = ("id", "name", "accession", "entry", "protein_id", "original_id")


@dataclass
class Projection:
    ids: list[str]
    coords: np.ndarray  # (N, 2)
    labels: list[str] | None  # per id; UNLABELLED where the CSV has none
    method: str
    note: str  # e.g. PCA's explained variance, for the plot title and the report


def read_labels(path: str | os.PathLike, id_column: str | None = None,
                label_column: str | None = None) -> tuple[dict[str, str], str]:
    """``{id: label}`` from a CSV (or .csv.gz/.tsv); columns guessed by name when not given. Returns the label
    column's name too."""
    from protlm.data.fasta import open_text

    path = os.fspath(path)
    with open_text(path) as fh:
        sample = fh.readline()
    delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") or ("\t" in sample and "," not in sample) else ","
    with open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise InputError(f"{path}: empty labels file (no header row)")
        cols = [c.strip() for c in header]
        lower = {c.lower(): c for c in cols}
        id_col = id_column or next((lower[c] for c in _ID_NAMES if c in lower), cols[0])
        if id_col not in cols:
            raise InputError(f"{path}: no column {id_col!r} (columns: {', '.join(cols)})")
        others = [c for c in cols if c != id_col]
        lab_col = label_column or (others[0] if others else None)
        if lab_col is None or lab_col not in cols:
            raise InputError(f"{path}: no label column {lab_col!r} (columns: {', '.join(cols)}); "
                             "pick one with --label-column")
        i_id, i_lab = cols.index(id_col), cols.index(lab_col)
        out: dict[str, str] = {}
        for n, row in enumerate(reader, 2):
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) <= max(i_id, i_lab):
                raise InputError(f"{path}: line {n}: expected at least {max(i_id, i_lab) + 1} columns, found {len(row)}")
            rid, lab = row[i_id].strip(), row[i_lab].strip()
            if rid in out and out[rid] != lab:
                raise InputError(f"{path}: line {n}: id {rid!r} has two labels ({out[rid]!r}, {lab!r})")
            out[rid] = lab
    return out, lab_col


def project(path: str | os.PathLike, method: str = "pca", labels: dict[str, str] | None = None, layer: int | None = None,
            seed: int = 0, perplexity: float = 30.0) -> Projection:
    """Project every protein of a per-protein embeddings file to 2D."""
    from protlm.embedding.store import EmbeddingStore

    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    with EmbeddingStore(path, layer=layer) as store:
        kind = store.attrs.get("kind")
        if kind == "per_residue":
            raise InputError(f"{path}: holds per-residue arrays; project a per-protein file (protlm embed --per-protein)")
        ids = store.ids()
        if len(ids) < 3:
            raise InputError(f"{path}: {len(ids)} proteins; a 2D map needs at least 3")
        x = np.stack([np.asarray(store[i], dtype=np.float64) for i in ids])
    if x.ndim != 2:
        raise InputError(f"{path}: expected (D,) arrays per protein, found {x.shape[1:]}")
    lab = None
    if labels is not None:
        lab = [labels.get(i, UNLABELLED) for i in ids]
        if all(v == UNLABELLED for v in lab):
            raise InputError(f"{path}: none of its ids is in the labels (first ids: {', '.join(ids[:3])})")
    coords, note = _reduce(x, method, seed, perplexity)
    return Projection(ids, coords, lab, method, note)


def _reduce(x: np.ndarray, method: str, seed: int, perplexity: float) -> tuple[np.ndarray, str]:
    from sklearn.decomposition import PCA

    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(x)
        ev = pca.explained_variance_ratio_
        return pca.transform(x), f"PC1 {ev[0]:.1%}, PC2 {ev[1]:.1%} of variance"
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError("--method umap needs the umap-learn package: pip install 'protlm[umap]' "
                              "(or use --method tsne / pca)") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"
    from sklearn.manifold import TSNE

    k = min(50, x.shape[0], x.shape[1])
    reduced = PCA(n_components=k, random_state=seed).fit_transform(x) if x.shape[1] > k else x
    perp = min(perplexity, max(1.0, (x.shape[0] - 1) / 3))
    from threadpoolctl import threadpool_limits

    # One thread: maps of a few thousand proteins take seconds, while OpenMP threads waiting on a busy machine
    # made the same fit up to 200x slower.
    with threadpool_limits(limits=1):
        coords = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(reduced)
    return coords, f"t-SNE, perplexity {perp:g}, on {k} principal components"


def plot(proj: Projection, output: str | os.PathLike, title: str = "", label_name: str = "") -> str:
    """Scatter plot of a projection, one colour per label (a colour bar when the labels are many numbers)."""
    from protlm.utils import pyplot, save_figure

    plt = pyplot()
    output = os.fspath(output)
    ext = os.path.splitext(output)[1].lstrip(".").lower() or "png"
    n = len(proj.ids)
    size = float(np.clip(20000 / n, 8, 60))  # marker area in points^2: dense maps get smaller dots
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=120)
    xy = proj.coords
    if proj.labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#3b6ea8", alpha=0.7, linewidths=0)
    else:
        labs = np.array(proj.labels, dtype=object)
        known = labs != UNLABELLED
        if (~known).any():
            ax.scatter(xy[~known, 0], xy[~known, 1], s=size, c="#cccccc", alpha=0.5, linewidths=0,
                       label=f"{UNLABELLED} ({int((~known).sum())})")
        values = _numeric(labs[known])
        if values is not None and len(set(values.tolist())) > 12:
            sc = ax.scatter(xy[known, 0], xy[known, 1], s=size, c=values, cmap="viridis", alpha=0.8, linewidths=0)
            fig.colorbar(sc, ax=ax, label=label_name)
        else:
            classes, counts = np.unique(labs[known].astype(str), return_counts=True)
            order = np.argsort(-counts, kind="stable")
            cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
            for j, ci in enumerate(order):
                sel = known & (labs == classes[ci])
                ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(j % cmap.N), alpha=0.75, linewidths=0,
                           label=f"{classes[ci]} ({counts[ci]})")
        ax.legend(title=label_name or None, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  markerscale=max(1.0, 40 / size) ** 0.5, fontsize=8)
    axis = {"pca": "PC", "tsne": "t-SNE ", "umap": "UMAP "}[proj.method]
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    ax.set_title((title + "\n" if title else "") + f"{n} proteins; {proj.note}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, output, format=ext, bbox_inches="tight")


def write_coords(proj: Projection, output: str | os.PathLike) -> str:
    from protlm.utils import atomic_path

    output = os.fspath(output)
    with atomic_path(output) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "x", "y"] + (["label"] if proj.labels is not None else []))
            for i, oid in enumerate(proj.ids):
                row = [oid, f"{proj.coords[i, 0]:.6g}", f"{proj.coords[i, 1]:.6g}"]
                w.writerow(row + ([proj.labels[i]] if proj.labels is not None else []))
    return output


def _numeric(values: np.ndarray) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in values])
    except ValueError:
        return None
