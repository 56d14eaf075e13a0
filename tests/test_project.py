"""``protlm project``: 2D maps of per-protein embeddings coloured by labels."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
import pytest

import protlm
from protlm.cli.main import main
from protlm.data.fasta import read_fasta
from protlm.embedding import embed_files
from protlm.embedding.project import UNLABELLED, project, read_labels
from protlm.errors import ConfigError, InputError
from tests.conftest import DATA, odd_config

ECOLI = os.path.join(DATA, "ecoli_k12_excerpt.fasta")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per-protein and per-residue files of the E. coli excerpt, and labels from the UniProt evidence level."""
    d = tmp_path_factory.mktemp("proj")
    pre = protlm.random_init(odd_config(), seed=4, encoder_only=True)
    records = list(read_fasta(ECOLI))[:40]
    seqs = {r.id: r.sequence for r in records}
    embed_files(pre, seqs, per_protein=d / "p.h5", per_residue=d / "r.h5", layers=[1, -1], progress=False)
    with open(d / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "evidence", "length"])
        for r in records[:-3]:  # three proteins without a label
            pe = r.description.split("PE=")[1].split()[0]
            w.writerow([r.id, f"PE{pe}", len(r.sequence)])
    return d


def test_pca_plot_with_labels(files, tmp_path, capsys):
    png, coords = tmp_path / "map.png", tmp_path / "xy.csv"
    assert main(["project", str(files / "p.h5"), "--labels", str(files / "labels.csv"), "-o", str(png),
                 "--coords", str(coords)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = list(csv.DictReader(open(coords)))
    assert len(rows) == 40 and sum(r["label"] == UNLABELLED for r in rows) == 3
    assert "3 without a label" in capsys.readouterr().err


def test_projection_is_the_pca_of_the_stored_vectors(files):
    labels, name = read_labels(files / "labels.csv")
    assert name == "evidence"
    proj = project(files / "p.h5", "pca", labels, layer=1)
    from protlm.embedding import EmbeddingStore

    x = np.stack([EmbeddingStore(files / "p.h5", layer=1)[i] for i in proj.ids])
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    ref = x @ vt[:2].T
    for k in range(2):  # equal up to the sign of each component
        assert min(np.abs(proj.coords[:, k] - ref[:, k]).max(), np.abs(proj.coords[:, k] + ref[:, k]).max()) < 1e-6


def test_tsne_and_numeric_labels(files, tmp_path):
    png = tmp_path / "t.png"
    assert main(["project", str(files / "p.h5"), "--method", "tsne", "--labels", str(files / "labels.csv"),
                 "--label-column", "length", "--perplexity", "5", "-o", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_errors(files, tmp_path, monkeypatch, capsys):
    with pytest.raises(InputError, match="per-residue"):
        project(files / "r.h5")
    other = tmp_path / "other.csv"
    other.write_text("id,label\nnope,1\n")
    with pytest.raises(InputError, match="none of its ids"):
        project(files / "p.h5", labels=read_labels(other)[0])
    with pytest.raises(InputError, match="no label column 'missing'"):
        read_labels(files / "labels.csv", label_column="missing")
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(ConfigError, match="umap-learn"):
        project(files / "p.h5", "umap")
    assert main(["project", str(files / "p.h5"), "-o", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
