"""Embedding-based annotation transfer: give each query protein the labels of its nearest labelled references.

This is homology-based inference with embedding distance in place of sequence identity, as in goPredSim (Littmann
et al., "Embeddings from deep learning transfer GO annotations beyond homology", Sci Rep 11:1160, 2021) and EAT
(Heinzinger et al., "Contrastive learning on protein embeddings enlightens midnight zone", NAR Genom Bioinform
4(2):lqac043, 2022). Both search the k nearest reference proteins by Euclidean (goPredSim also cosine) distance
between per-protein embeddings and transfer their annotations.

Reliability follows goPredSim (Rostlab/goPredSim ``function_prediction.py``; the paper's reliability index):
each neighbour's distance ``d`` becomes a similarity in [0, 1],

- Euclidean: ``s = 0.5 / (0.5 + d)`` (1 at d = 0, 0.5 at d = 0.5),
- cosine: ``s = 1 - d`` (``d`` is the cosine distance, 1 - cos; clipped at 0 for opposite vectors),

and a label's reliability is the sum of ``s`` over the neighbours carrying it, divided by k; so with k > 1 a label
shared by several neighbours scores higher than one seen once. The transferred label is the one with the highest
reliability (ties: the label of the nearer neighbour). With k = 1 this is EAT's 1-NN transfer, and the reliability
is the nearest neighbour's similarity; EAT's ``eat.py`` reports that neighbour's raw distance, which the
similarity maps one-to-one.

The neighbour search is scikit-learn's :class:`~sklearn.neighbors.NearestNeighbors` (exact, brute force for
cosine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from protlm.errors import ConfigError, InputError

METRICS = ("euclidean", "cosine")
# File attributes that must agree between reference and query: embeddings of different models, layers or input
# prefixes live in different spaces, and their distances mean nothing.
SPACE_ATTRS = ("model", "prefix")


@dataclass
class Hit:
    reference: str  # reference protein id
    label: str  # its label
    distance: float
    similarity: float  # goPredSim's transform of the distance, in [0, 1]


@dataclass
class Transfer:
    query: str
    label: str  # transferred label: highest reliability among the neighbours' labels
    reliability: float  # that label's summed neighbour similarity / k
    hits: list[Hit]  # nearest first


def similarity(distance: np.ndarray, metric: str) -> np.ndarray:
    """goPredSim's reliability transform of a distance (see the module docstring)."""
    distance = np.asarray(distance, dtype=np.float64)
    if metric == "euclidean":
        return 0.5 / (0.5 + distance)
    if metric == "cosine":
        return np.clip(1.0 - distance, 0.0, 1.0)
    raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def nearest_labels(ref_ids: list[str], ref_x: np.ndarray, ref_labels: list[str], query_ids: list[str],
                   query_x: np.ndarray, k: int = 1, metric: str = "euclidean",
                   exclude_self: bool = False) -> list[Transfer]:
    """Transfer labels from ``ref_x`` (N, D) to ``query_x`` (M, D) by the k nearest neighbours.

    ``exclude_self`` skips a reference with the same id as the query (leave-one-out when both sets are one)."""
    from sklearn.neighbors import NearestNeighbors

    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if not ref_ids:
        raise InputError("no labelled reference proteins to search")
    n_ask = min(k + (1 if exclude_self else 0), len(ref_ids))
    index = NearestNeighbors(n_neighbors=n_ask, metric=metric,
                             algorithm="brute" if metric == "cosine" else "auto").fit(ref_x)
    dist, idx = index.kneighbors(query_x)  # (M, n_ask), nearest first
    out = []
    for qi, qid in enumerate(query_ids):
        pairs = [(j, d) for j, d in zip(idx[qi], dist[qi]) if not (exclude_self and ref_ids[j] == qid)][:k]
        if not pairs:
            raise InputError(f"query {qid!r}: no reference protein besides itself")
        sims = similarity(np.array([d for _, d in pairs]), metric)
        hits = [Hit(ref_ids[j], ref_labels[j], float(d), float(s)) for (j, d), s in zip(pairs, sims)]
        score: dict[str, float] = {}
        for h in hits:  # dict keeps first-seen order, i.e. the nearest neighbour's label first on ties
            score[h.label] = score.get(h.label, 0.0) + h.similarity / k
        label = max(score, key=score.__getitem__)
        out.append(Transfer(qid, label, score[label], hits))
    return out


def read_matrix(path: str | os.PathLike, layer: int | None = None) -> tuple[list[str], np.ndarray, dict]:
    """Ids, the (N, D) matrix and the file attributes of a per-protein embeddings file."""
    from protlm.embedding.store import EmbeddingStore

    path = os.fspath(path)
    with EmbeddingStore(path, layer=layer) as store:
        attrs = dict(store.attrs)
        if attrs.get("kind") == "per_residue":
            raise InputError(f"{path}: holds per-residue arrays; transfer needs per-protein embeddings "
                             "(protlm embed --per-protein)")
        ids = store.ids()
        if not ids:
            raise InputError(f"{path}: no embeddings")
        arrays = [np.asarray(store[i], dtype=np.float32) for i in ids]
        if store.layers is not None:  # the layer actually read, for the space check
            attrs["layer"] = layer if layer is not None else store.layers[-1]
    widths = {a.shape for a in arrays}
    if len(widths) != 1 or arrays[0].ndim != 1:
        raise InputError(f"{path}: expected one (D,) array per protein, found shapes {sorted(widths)[:3]}")
    return ids, np.stack(arrays), attrs


def check_same_space(ref_path: str, ref_attrs: dict, query_path: str, query_attrs: dict,
                     ref_width: int, query_width: int) -> None:
    """Refuse a query embedded differently from the reference (an attribute missing from a file is not checked)."""
    for key in SPACE_ATTRS + ("layer",):
        a, b = ref_attrs.get(key), query_attrs.get(key)
        if a is not None and b is not None and str(a) != str(b):
            what = "model" if key == "model" else f"{key} (same model?)"
            raise InputError(f"{query_path}: embedded with {key} {b!r} but the reference {ref_path} with {a!r}; "
                             f"embed both with the same {what}")
    if ref_width != query_width:
        raise InputError(f"{query_path}: embeddings are {query_width} wide but the reference {ref_path} has "
                         f"{ref_width}; embed both with the same model and layer")


def transfer_annotations(reference: str | os.PathLike, labels: dict[str, str], query: str | os.PathLike,
                         k: int = 1, metric: str = "euclidean", layer: int | None = None,
                         allow_missing: bool = False, exclude_self: bool = False,
                         labels_path: str = "the labels") -> list[Transfer]:
    """Files in, transfers out: the reference and query per-protein HDF5 files and ``{reference id: label}``.

    A reference protein without a label is an error, or with ``allow_missing`` left out of the search."""
    reference, query = os.fspath(reference), os.fspath(query)
    ref_ids, ref_x, ref_attrs = read_matrix(reference, layer)
    q_ids, q_x, q_attrs = read_matrix(query, layer)
    check_same_space(reference, ref_attrs, query, q_attrs, ref_x.shape[1], q_x.shape[1])
    keep = [i for i, rid in enumerate(ref_ids) if labels.get(rid, "") != ""]
    if len(keep) < len(ref_ids) and not allow_missing:
        missing = [rid for rid in ref_ids if labels.get(rid, "") == ""]
        raise InputError(f"{reference}: {len(missing)} of {len(ref_ids)} reference proteins have no label in "
                         f"{labels_path} (first: {missing[0]!r}); label them, or pass --allow-missing to leave "
                         "them out")
    if not keep:
        raise InputError(f"{reference}: no reference protein has a label in {labels_path} (do the ids match?)")
    ref_ids = [ref_ids[i] for i in keep]
    return nearest_labels(ref_ids, ref_x[keep], [labels[r] for r in ref_ids], q_ids, q_x, k, metric, exclude_self)


TSV_COLUMNS = ("query", "rank", "reference", "reference_label", "distance", "similarity", "label", "reliability")


def write_tsv(transfers: list[Transfer], path: str | os.PathLike) -> None:
    """One row per (query, neighbour), nearest first; ``label`` and ``reliability`` (the query's transferred label
    and its score) repeat on each of the query's rows, so ``rank == 1`` rows give one line per query."""
    from protlm.utils import atomic_write_text

    lines = ["\t".join(TSV_COLUMNS)]
    for t in transfers:
        for rank, h in enumerate(t.hits, 1):
            lines.append(f"{t.query}\t{rank}\t{h.reference}\t{h.label}\t{h.distance:.6g}\t{h.similarity:.4f}\t"
                         f"{t.label}\t{t.reliability:.4f}")
    atomic_write_text(path, "\n".join(lines) + "\n")
