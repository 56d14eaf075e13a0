"""int8 embedding: dynamic quantisation of the encoder's linear layers, opt-in, CPU only, close to fp32."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

import protlm
from protlm.cli.main import main
from protlm.data.fasta import read_fasta
from protlm.embedding.engine import quantize_int8
from protlm.errors import ConfigError
from protlm.evaluate import ModelSource
from tests.conftest import DATA, odd_config

ECOLI = os.path.join(DATA, "ecoli_k12_excerpt.fasta")


@pytest.fixture(scope="module")
def model():
    # wider than the odd test shape, so that int8's error is that of a real layer, not of 12-wide rows
    return protlm.random_init(odd_config(d_model=96, d_ff=160, d_kv=16, num_heads=4), seed=5, encoder_only=True)


def _seqs(n=8):
    return {r.id: r.sequence for r in list(read_fasta(ECOLI))[:n]}


def _cosines(a: dict, b: dict) -> np.ndarray:
    x = np.concatenate([a[k] for k in a]).astype(np.float64)
    y = np.concatenate([b[k] for k in a]).astype(np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def test_int8_is_close_to_fp32_but_really_quantised(model):
    seqs = _seqs()
    fp32 = protlm.embed(model, seqs, per_residue=True, dtype="fp32")
    int8 = protlm.embed(model, seqs, per_residue=True, dtype="int8")
    assert set(int8) == set(fp32)
    for k in seqs:
        assert int8[k].shape == fp32[k].shape == (len(seqs[k]), 96) and int8[k].dtype == np.float32
    cos = _cosines(int8, fp32)
    assert cos.mean() > 0.99 and cos.min() > 0.95
    assert max(np.abs(int8[k] - fp32[k]).max() for k in seqs) > 1e-4  # not fp32 under another name


def test_quantising_leaves_the_callers_model_alone(model):
    before = {k: v.clone() for k, v in model.model.encoder.state_dict().items()}
    q = quantize_int8(model.model.encoder)
    quantised = [m for m in q.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantised) == 3 * (4 + 3)  # per block: q, k, v, o and the gated FFN's wi_0, wi_1, wo
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    from protlm.model.kernels import Linear

    assert all(type(m) is Linear for m in model.model.encoder.modules() if "Linear" in type(m).__name__)
    after = model.model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_without_linear_layers_is_refused_naming_its_layers():
    odd = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.LayerNorm(4))
    with pytest.raises(ConfigError) as err:
        quantize_int8(odd)
    msg = str(err.value)
    assert "\n" not in msg and "no torch.nn.Linear layers" in msg and "Conv1d" in msg and "LayerNorm" in msg


def test_cli_int8_says_it_is_approximate_and_records_it(model, tmp_path, capsys):
    ckpt = tmp_path / "m"
    protlm.save_pretrained(model.model, str(ckpt), model.tokenizer)
    out = tmp_path / "p.h5"
    assert main(["embed", str(ckpt), ECOLI, "--per-protein", str(out), "--dtype", "int8", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "precision int8 -> int8 (dynamic int8 linear layers: approximate, opt-in)" in err
    with h5py.File(out) as fh:
        assert fh.attrs["dtype"] == "int8" and "approximate" in fh.attrs["precision"]
    # the same output in fp32 is another job: refused, never mixed into the int8 file
    assert main(["embed", str(ckpt), ECOLI, "--per-protein", str(out), "--dtype", "fp32", "--no-progress"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_int8_is_never_the_default(model):
    from protlm.embedding.run import EmbedOptions, embed_precision

    assert EmbedOptions().dtype == "auto"
    assert embed_precision(EmbedOptions()).name != "int8"


def test_int8_on_a_gpu_is_one_line():
    from protlm.embedding.run import EmbedOptions, embed_precision

    with pytest.raises(ConfigError, match="^--dtype: int8 runs on CPUs only"):
        embed_precision(EmbedOptions(dtype="int8", device="cuda"))


def test_evaluate_keeps_int8_embeddings_in_a_column_and_cache_of_their_own(tmp_path, model):
    ckpt = tmp_path / "m"
    protlm.save_pretrained(model.model, str(ckpt), model.tokenizer)
    fp32 = ModelSource(str(ckpt), cache_dir=str(tmp_path / "cache"), dtype="fp32", device="cpu")
    int8 = ModelSource(str(ckpt), cache_dir=str(tmp_path / "cache"), dtype="int8", device="cpu")
    assert int8.name == fp32.name + " (int8)"
    assert int8.key == fp32.key + "-int8" and int8.path_for("ssp") != fp32.path_for("ssp")
    assert fp32.describe()["embed_precision"] is None and int8.describe()["embed_precision"] == "int8"


def test_the_int8_copy_is_made_once_per_weights_and_released_with_the_model():
    import gc

    from protlm.embedding.engine import _INT8_COPIES, cached_int8

    others = len(_INT8_COPIES)  # other tests' models that are still alive
    pre = protlm.random_init(odd_config(d_model=96, d_ff=160, d_kv=16, num_heads=4), seed=6, encoder_only=True)
    encoder = pre.model.encoder
    seqs = _seqs(3)
    first = protlm.embed(pre, seqs, per_residue=True, dtype="int8")
    copy_ = cached_int8(encoder)
    assert len(_INT8_COPIES) == others + 1
    assert _INT8_COPIES[encoder][1] is copy_  # the embed call above made it; this call reused it
    assert all(np.array_equal(first[k], v) for k, v in protlm.embed(pre, seqs, per_residue=True, dtype="int8").items())
    with torch.no_grad():  # an in-place change (as an optimiser step makes) must not reuse the old copy
        encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(3.0)
    assert cached_int8(encoder) is not copy_
    changed = protlm.embed(pre, seqs, per_residue=True, dtype="int8")
    fp32 = protlm.embed(pre, seqs, per_residue=True, dtype="fp32")
    assert _cosines(changed, fp32).mean() > 0.99 and _cosines(changed, first).mean() < 0.999
    del pre, encoder, copy_
    gc.collect()
    assert len(_INT8_COPIES) == others


def test_a_model_made_under_inference_mode_is_quantised_afresh_each_time():
    from protlm.embedding.engine import _INT8_COPIES, cached_int8

    with torch.inference_mode():  # its tensors keep no version counter, so a cached copy could go stale unseen
        pre = protlm.random_init(odd_config(d_model=96, d_ff=160, d_kv=16, num_heads=4), seed=7, encoder_only=True)
    seqs = _seqs(2)
    fp32 = protlm.embed(pre, seqs, per_residue=True, dtype="fp32")
    int8 = protlm.embed(pre, seqs, per_residue=True, dtype="int8")
    assert _cosines(int8, fp32).mean() > 0.99
    assert pre.model.encoder not in _INT8_COPIES
    assert cached_int8(pre.model.encoder) is not cached_int8(pre.model.encoder)
