"""Embedding files: format, resume, kill -9, bad input, the command line, torchrun sharding."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import protlm
from protlm.cli.main import main
from protlm.data.fasta import read_fasta
from protlm.embedding import EmbeddingStore, embed_files
from protlm.errors import InputError
from tests.conftest import DATA, odd_config

ECOLI = os.path.join(DATA, "ecoli_k12_excerpt.fasta")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTLM = [sys.executable, "-m", "protlm.cli.main"]


@pytest.fixture(scope="module")
def model():
    return protlm.random_init(odd_config(), seed=11, encoder_only=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved odd-shaped model, wide enough that a run over the E. coli excerpt takes a few seconds."""
    pre = protlm.random_init(odd_config(d_model=96, d_ff=150, num_layers=4, num_heads=4, d_kv=24), seed=2,
                             encoder_only=True)
    path = tmp_path_factory.mktemp("ckpt")
    protlm.save_pretrained(pre.model, path, pre.tokenizer)
    return str(path)


def _ecoli(n=None):
    recs = list(read_fasta(ECOLI))
    return {r.id: r.sequence for r in recs[:n]}


def test_file_layout_and_attributes(model, tmp_path):
    seqs = _ecoli(10)
    s = embed_files(model, seqs, per_residue=tmp_path / "r.h5", per_protein=tmp_path / "p.h5", layers=[1, -1],
                    progress=False)
    assert s.embedded == 10 and s.already_done == 0
    with h5py.File(tmp_path / "p.h5", "r") as fh:
        assert fh.attrs["kind"] == "per_protein" and list(fh.attrs["layers"]) == [1, 3]
        assert fh.attrs["prefix"] == "nlu" and fh.attrs["dtype"] == "fp32" and fh.attrs["protlm_version"]
        assert all("original_id" in ds.attrs for ds in fh.values())
        assert "sp|A0A385XJ53|INSA9_ECOLI" in fh  # "|" is allowed in HDF5 names
    res, prot = EmbeddingStore(tmp_path / "r.h5"), EmbeddingStore(tmp_path / "p.h5")
    for oid, seq in seqs.items():
        assert res[oid].shape == (len(seq), 40)  # the last stored layer by default
        np.testing.assert_allclose(prot[oid], res[oid].mean(0), atol=1e-6)
    assert EmbeddingStore(tmp_path / "r.h5", layer=1)[oid].shape == (len(seq), 40)
    assert not os.path.exists(tmp_path / "r.h5.parts")
    mem = protlm.embed(model, seqs, layers=[1, -1])
    for oid in seqs:
        np.testing.assert_allclose(prot[oid], mem[oid][1], atol=1e-5)


def test_rerun_skips_done_ids_and_checks_settings(model, tmp_path):
    seqs = _ecoli(12)
    out = tmp_path / "p.h5"
    half = dict(list(seqs.items())[:5])
    assert embed_files(model, half, per_protein=out, progress=False).embedded == 5
    s = embed_files(model, seqs, per_protein=out, progress=False)
    assert (s.already_done, s.embedded) == (5, 7)
    full = tmp_path / "full.h5"
    embed_files(model, seqs, per_protein=full, progress=False)
    a, b = EmbeddingStore(out), EmbeddingStore(full)
    assert sorted(a.ids()) == sorted(seqs)
    for oid in seqs:
        assert np.abs(a[oid] - b[oid]).max() <= 1e-5
    assert embed_files(model, seqs, per_protein=out, progress=False).embedded == 0
    with pytest.raises(InputError, match=r"other settings \(layers"):
        embed_files(model, seqs, per_protein=out, layers=[1], progress=False)
    changed = dict(seqs)
    first = next(iter(changed))
    changed[first] = "MKTAYIAKQR"
    with pytest.raises(InputError, match="stored with a different sequence"):
        embed_files(model, changed, per_protein=out, progress=False)


def test_identical_sequences_under_different_ids_and_unsafe_ids(model, tmp_path):
    seqs = {"a.b": "MKTAYIAKQR", "a_b": "MSEQWENCE", "a/b": "MKTAYIAKQR", "x y": "GGGGA"}
    s = embed_files(model, seqs, per_protein=tmp_path / "p.h5", progress=False)
    assert (s.embedded, s.unique) == (4, 3)
    store = EmbeddingStore(tmp_path / "p.h5")
    assert sorted(store.ids()) == sorted(seqs)
    with h5py.File(tmp_path / "p.h5", "r") as fh:
        assert len(fh) == 4  # no two ids share a dataset
    np.testing.assert_array_equal(store["a.b"], store["a/b"])
    assert np.abs(store["a.b"] - store["a_b"]).max() > 1e-3


def test_output_path_checks(model, tmp_path):
    with pytest.raises(InputError, match="does not exist.*--mkdir"):
        embed_files(model, {"a": "MK"}, per_protein=tmp_path / "missing" / "p.h5", progress=False)
    embed_files(model, {"a": "MK"}, per_protein=tmp_path / "made" / "p.h5", mkdir=True, progress=False)
    assert len(EmbeddingStore(tmp_path / "made" / "p.h5")) == 1
    with pytest.raises(InputError, match="is a directory"):
        embed_files(model, {"a": "MK"}, per_protein=tmp_path, progress=False)
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        embed_files(model, {"a": "MK"}, per_protein=tmp_path / "junk.h5", progress=False)


def test_leftovers_of_a_killed_run_are_handled(model, tmp_path):
    seqs = _ecoli(6)
    out = tmp_path / "p.h5"
    embed_files(model, dict(list(seqs.items())[:2]), per_protein=out, progress=False)
    parts = tmp_path / "p.h5.parts"
    parts.mkdir()
    (parts / "seg-r0000-1-dead.h5").write_bytes(b"\x89HDF\r\n garbage")  # damaged from outside
    (parts / ".tmp-seg-half-written.h5").write_bytes(b"partial")
    (tmp_path / ".tmp-p.h5-abc").write_bytes(b"partial merge")
    s = embed_files(model, seqs, per_protein=out, progress=False)
    assert s.embedded == 4 and any("unreadable segment" in n for n in s.notes)
    assert not (tmp_path / ".tmp-p.h5-abc").exists()
    assert sorted(EmbeddingStore(out).ids()) == sorted(seqs)


def test_bad_input_files(model, tmp_path):
    def run(text: bytes, name="in.fa", **kw):
        p = tmp_path / name
        p.write_bytes(text)
        return embed_files(model, str(p), per_protein=tmp_path / (name + ".h5"), progress=False, **kw)

    with pytest.raises(InputError, match="line 1: sequence data before the first '>' header"):
        run(b"MKTA\n>b\nMK\n")
    with pytest.raises(InputError, match=r"record 'b' \(line 3\): empty sequence.*--bad-records"):
        run(b">a\nMKTA\n>b\n>c\nMK\n", name="empty.fa")
    assert run(b">a\nMKTA\n>b\n>c\nMK\n", name="empty2.fa", bad_records="skip").skip_reasons == {"empty": 1}
    s = run(b">a x\r\nmkta\r\nyi\r\n>b\r\nGG*\r\n", name="crlf.fa")  # Windows line ends, lowercase, final stop
    ref = protlm.embed(model, {"a": "MKTAYI", "b": "GG"})
    got = EmbeddingStore(tmp_path / "crlf.fa.h5")
    assert s.embedded == 2 and np.abs(got["a"] - ref["a"]).max() <= 1e-5
    with pytest.raises(InputError, match=r"record 'b' \(line 3\): gap '-' at residue 3"):
        run(b">a\nMK\n>b\nMK-T*A\n", name="gap.fa")
    with pytest.raises(InputError, match=r"stop codon '\*' at residue 3"):
        run(b">a\nMK\n>b\nMK*TA\n", name="stop.fa")
    assert run(b">a\nMK\n>b\nMK-T*A\n", name="gap2.fa", bad_records="x").repaired_records == 1
    with pytest.raises(InputError, match=r"non-ASCII character 'Å' at residue 2"):
        run(">a\nMÅK\n".encode(), name="uni.fa")
    with pytest.raises(InputError, match=r"non-UTF-8 bytes in record 'a' \(line 1\): byte 0xe9 at residue 3"):
        run(b">a\nMK\xe9A\n", name="latin.fa")
    with pytest.raises(InputError, match="duplicate id 'a' \\(records 1 and 3\\)"):
        run(b">a\nMK\n>b\nMK\n>a\nGG\n", name="dup.fa")
    import gzip

    data = gzip.compress(open(ECOLI, "rb").read())
    with pytest.raises(InputError, match="truncated or corrupt"):
        run(data[: len(data) // 2], name="cut.fa.gz")


def test_csv_and_gz_input(model, tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("id,sequence,label\np1,MKTAYIAKQR,x\np2,M K T,y\n")
    s = embed_files(model, str(csv), per_protein=tmp_path / "c.h5", progress=False)
    assert s.embedded == 2
    ref = protlm.embed(model, {"p2": "MKT"})
    assert np.abs(EmbeddingStore(tmp_path / "c.h5")["p2"] - ref["p2"]).max() <= 1e-5
    s = embed_files(model, os.path.join(DATA, "ecoli_k12_excerpt.fasta.gz"), per_protein=tmp_path / "g.h5",
                    progress=False)
    assert s.embedded == 80


# --- command line ------------------------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["embed", "tiny", "--random-init", "--per-protein", str(tmp_path / "no" / "p.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["embed", "tiny", "--random-init"]) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert main(["embed", "tiny", "--per-protein", str(tmp_path / "p.h5")]) == 2
    assert "--random-init" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_mid_run_leaves_a_readable_file_and_the_next_run_completes(checkpoint, tmp_path):
    out = tmp_path / "p.h5"
    res = tmp_path / "r.h5"
    cmd = PROTLM + ["embed", checkpoint, ECOLI, "--per-protein", str(out), "--per-residue", str(res),
                    "--max-tokens", "64", "--checkpoint-seconds", "0", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "p.h5.parts"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and len(list(parts.glob("seg-*.h5"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with EmbeddingStore(out) as store:  # opens, with its attributes, though the run died
        assert store.attrs["kind"] == "per_protein" and len(store) < 80
    with EmbeddingStore(res) as store:
        assert len(store) < 80
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stderr and "already in the output" in again.stderr
    assert not parts.exists()
    clean = tmp_path / "clean.h5"
    embed_files(checkpoint, ECOLI, per_protein=clean, progress=False)
    a, b = EmbeddingStore(out), EmbeddingStore(clean)
    assert sorted(a.ids()) == sorted(b.ids()) and len(a) == 80
    for oid in b.ids():
        assert np.abs(a[oid] - b[oid]).max() <= 1e-5
    r = EmbeddingStore(res)
    assert all(r[oid].shape[0] == len(seq) for oid, seq in _ecoli().items())


@pytest.mark.slow
def test_torchrun_two_processes_write_one_file_like_one_process(checkpoint, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    seqs = os.path.join(DATA, "cath_s20_excerpt.fasta")
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    embed_files(checkpoint, seqs, per_protein=one, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "protlm.cli.main", "embed",
                           checkpoint, seqs, "--per-protein", str(two), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("embedded 120 of 120 proteins") == 1  # one summary, counts over both processes
    a, b = EmbeddingStore(one), EmbeddingStore(two)
    assert sorted(a.ids()) == sorted(b.ids()) and len(a) == 120
    assert {k: v for k, v in a.attrs.items()} == {k: v for k, v in b.attrs.items()} or \
        {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}
    for oid in a.ids():
        assert np.abs(a[oid] - b[oid]).max() <= 1e-5
    assert not os.path.exists(str(two) + ".parts")


def test_merges_during_the_run_keep_the_file_current(model, tmp_path, monkeypatch):
    import protlm.embedding.store as store

    monkeypatch.setattr(store, "_MERGE_MIN_BYTES", 1)  # merge after every segment
    merges = []
    real = store.EmbeddingWriter.merge
    monkeypatch.setattr(store.EmbeddingWriter, "merge", lambda self: merges.append(len(EmbeddingStore(self.path)))
                        or real(self))
    seqs = _ecoli(12)
    embed_files(model, seqs, per_protein=tmp_path / "p.h5", checkpoint_seconds=0, max_tokens=300, progress=False)
    assert len(merges) > 3 and merges == sorted(merges) and merges[0] < merges[-1]
    ref = protlm.embed(model, seqs)
    got = EmbeddingStore(tmp_path / "p.h5")
    assert sorted(got.ids()) == sorted(seqs)
    for oid in seqs:
        assert np.abs(got[oid] - ref[oid]).max() <= 1e-5


def test_atomic_outputs_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    from protlm.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.txt").st_mode & 0o777) == oct(os.stat(tmp_path / "b.txt").st_mode & 0o777) == "0o644"
