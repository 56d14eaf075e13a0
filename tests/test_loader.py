"""The one loader (protlm.convert.load) and the one build path (build_model): the rules every command shares."""

import os

import h5py
import pytest
import torch

from protlm.cli.main import main
from protlm.config import preset
from protlm.convert import build_model, load, random_init, read_config, save_pretrained
from protlm.convert.checkpoint import canonical_state
from protlm.errors import CheckpointError, ConfigError
from protlm.model import T5
from tests.conftest import odd_config



def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def checkpoint(tmp_path):
    trained = random_init(odd_config(), seed=7)
    path = tmp_path / "ckpt"
    save_pretrained(trained.model, path, trained.tokenizer)
    return str(path), trained


@pytest.mark.parametrize("tied", [False, True])
def test_random_weights_are_those_of_eager_construction(tied):
    cfg = odd_config(tied=tied)
    torch.manual_seed(11)
    eager = T5(cfg)
    built = build_model(cfg, seed=11)
    assert _same(eager, built)
    assert not any(p.is_meta for p in built.parameters())
    if tied:
        assert built.lm_head.weight is built.shared.weight


def test_checkpoint_loads_and_a_preset_needs_random_init(checkpoint):
    path, trained = checkpoint
    assert _same(load(path).model, trained.model)
    with pytest.raises(ConfigError, match="preset, not a checkpoint.*--random-init"):
        load("debug")
    pre = load("debug", random_init=True, seed=3)
    assert pre.config == preset("debug") and pre.source == "random-init debug seed=3"
    torch.manual_seed(3)
    assert _same(pre.model, T5(preset("debug")))


def test_random_twin_of_a_checkpoint(checkpoint, tmp_path):
    path, trained = checkpoint
    twin = load(path, random_init=True, seed=5)
    assert twin.config == trained.config and not twin.model.encoder_only
    assert not _same(twin.model, trained.model)
    assert _same(twin.model, random_init(odd_config(), seed=5).model)
    assert twin.source == f"random-init {os.path.abspath(path)} seed=5"
    # an encoder-only checkpoint has an encoder-only twin
    enc = random_init(odd_config(), seed=1, encoder_only=True)
    save_pretrained(enc.model, tmp_path / "enc", enc.tokenizer)
    assert load(str(tmp_path / "enc"), random_init=True).model.encoder_only
    assert read_config(str(tmp_path / "enc")) == (enc.config, True)


def test_dtype_names_and_precision(checkpoint):
    path, _ = checkpoint
    pre = load(path, dtype="fp32")
    assert pre.precision.name == "fp32" and next(pre.model.parameters()).dtype == torch.float32
    pre = load(path, dtype=torch.bfloat16)
    assert pre.precision is None and next(pre.model.parameters()).dtype == torch.bfloat16
    assert load(path, dtype="auto").precision.requested == "auto"
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        load(path, dtype="float8")


def test_build_path_checks_every_tensor():
    cfg = odd_config(tied=True)
    full = build_model(cfg, seed=0)
    state = canonical_state(full)
    assert "lm_head.weight" not in state  # stored once, under shared.weight
    rebuilt = build_model(cfg, state=state)
    assert _same(rebuilt, full) and rebuilt.lm_head.weight is rebuilt.shared.weight  # tied again after assign
    with pytest.raises(CheckpointError, match="missing tensor.*encoder.final_layer_norm.weight"):
        build_model(cfg, state={k: v for k, v in state.items() if k != "encoder.final_layer_norm.weight"})
    with pytest.raises(CheckpointError, match="unexpected tensor.*extra.weight"):
        build_model(cfg, state={**state, "extra.weight": torch.zeros(1)})


def test_random_init_means_the_twin_in_every_command(checkpoint, tmp_path):
    """--random-init with a checkpoint directory gives its twin in embed, analyze depth, generate, infill, score."""
    path, _ = checkpoint
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVK\n>b\nMSLNVLRE\n>c\nMADEEKLPPGWEKRMSR\n")
    FASTA = str(fasta)
    out = tmp_path / "p.h5"
    assert main(["embed", path, "--random-init", "--seed", "5", FASTA, "--per-protein", str(out), "--no-progress"]) == 0
    with h5py.File(out) as f:
        assert f.attrs["model"] == f"random-init {os.path.abspath(path)} seed=5"
    assert main(["analyze", "depth", path, FASTA, "--random-init", "-o", str(tmp_path / "depth"), "--max-proteins",
                 "3", "--analyses", "contribution", "--task", "none", "--quiet"]) == 0
    assert main(["generate", path, "--random-init", "--prefix", "MKTAYIAK", "--greedy", "--max-new-tokens", "4",
                 "-o", str(tmp_path / "g.fasta")]) == 0
    assert main(["infill", path, "--random-init", "--masked", "MKT[?]YIAK", "-o", str(tmp_path / "i.fasta")]) == 0
    assert main(["score", path, "--random-init", "--pll", "--input", FASTA, "-o", str(tmp_path / "s.csv")]) == 0
    # and a preset without --random-init is refused the same way everywhere
    for argv in (["embed", "debug", FASTA, "--per-protein", str(tmp_path / "x.h5")],
                 ["generate", "debug", "--prefix", "MKT"],
                 ["analyze", "depth", "debug", FASTA, "-o", str(tmp_path / "d2")]):
        assert main(argv) == 2


def test_every_dtype_option_takes_the_same_names(checkpoint, tmp_path):
    path, _ = checkpoint
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVK\n")
    out = tmp_path / "p.h5"
    assert main(["embed", path, str(fasta), "--per-protein", str(out), "--dtype", "float32", "--store-dtype", "half",
                 "--no-progress"]) == 0
    with h5py.File(out) as f:
        assert f.attrs["dtype"] == "fp32" and f.attrs["store_dtype"] == "float16" and f["a"].dtype == "float16"
    assert main(["embed", path, str(fasta), "--per-protein", str(tmp_path / "q.h5"), "--store-dtype", "bf16"]) == 2
    assert main(["generate", path, "--prefix", "MKT", "--greedy", "--max-new-tokens", "2", "--dtype", "float32"]) == 0
