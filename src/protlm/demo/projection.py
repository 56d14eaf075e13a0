"""A 2D map (t-SNE) of per-protein embeddings of the CB513 proteins, for the pretrained model and its random-init
twin, coloured by each protein's structural class as read from its own DSSP labels (no extra data needed).

Classes follow the spirit of SCOP's: "all-α" (≥ 35% helix, < 10% strand), "all-β" (≥ 25% strand, < 10% helix),
"α+β" (≥ 15% of each), otherwise "other". Only resolved residues count.
"""

from __future__ import annotations

import os

import numpy as np

from protlm.embedding import embed_files
from protlm.embedding.project import plot, project
from protlm.evaluate.datasets import LabelledRecord


def structural_class(record: LabelledRecord) -> str:
    ss = np.frombuffer(record.labels["ss3"].encode("ascii"), dtype=np.uint8)
    if record.mask is not None:
        ss = ss[record.mask]
    if ss.size == 0:
        return "other"
    helix, strand = float(np.mean(ss == ord("H"))), float(np.mean(ss == ord("E")))
    if helix >= 0.35 and strand < 0.10:
        return "all-α"
    if strand >= 0.25 and helix < 0.10:
        return "all-β"
    if helix >= 0.15 and strand >= 0.15:
        return "α+β"
    return "other"


def run_projection(sources, records: list[LabelledRecord], out_dir: str, threads: int | None, progress: bool,
                   log) -> dict[str, str]:
    """One PNG per model column; returns column name -> PNG path."""
    os.makedirs(out_dir, exist_ok=True)
    labels = {r.id: structural_class(r) for r in records}
    sequences = {r.id: r.sequence for r in records}
    written = {}
    for source in sources:
        stem = "pretrained" if not source.baseline else "random-init"
        h5 = os.path.join(out_dir, f"cb513.{stem}.per-protein.h5")
        log(f"{source.name}: per-protein embeddings of {len(sequences)} CB513 proteins")
        embed_files(source.pretrained(), sequences, per_protein=h5, progress=progress, threads=threads)
        proj = project(h5, "tsne", labels, seed=0)
        png = os.path.join(out_dir, f"cb513.{stem}.tsne.png")
        plot(proj, png, title=f"CB513, {source.name}: t-SNE of mean-pooled last-layer embeddings",
             label_name="structural class (from DSSP)")
        written[source.name] = png
    return written
