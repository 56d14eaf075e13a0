"""Fine-tuning in the frozen benchmark's protocol: the backbone trains with the head (protlm.finetune)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from protlm.convert import load
from protlm.embedding import embed_files
from protlm.embedding.store import EmbeddingStore
from protlm.errors import ConfigError
from protlm.evaluate.heads import HeadConfig
from protlm.evaluate.tasks import TaskExample, TaskSpec
from protlm.evaluate.training import HeadTrainConfig, train_head
from protlm.finetune.backbone import BackboneFeatures
from protlm.finetune.config import FinetuneConfig, parse_modes

from .conftest import odd_config

pytestmark = pytest.mark.usefixtures("one_thread")

AA = "ACDEFGHIKLMNPQRSTVWY"
HYDROPHOBIC = set("AVILMFWC")


def _toy(n: int, seed: int, kind: str = "residue_classification"):
    """Random proteins whose per-residue label is a property of the residue (hydrophobic or not), or, per
    protein, their hydrophobic fraction."""
    rng = np.random.default_rng(seed)
    seqs, exs = {}, []
    for i in range(n):
        s = "".join(rng.choice(list(AA), size=int(rng.integers(9, 26))))
        seqs[("toy", f"p{i}")] = s
        if kind == "residue_classification":
            target = np.array([1 if c in HYDROPHOBIC else 0 for c in s], dtype=np.int64)
        else:
            target = float(np.mean([c in HYDROPHOBIC for c in s]))
        exs.append(TaskExample(f"p{i}", "toy", len(s), target))
    return seqs, exs


def _task(kind: str = "residue_classification") -> TaskSpec:
    return TaskSpec(name="toy", kind=kind, label="x", train="toy/train", valid="toy/valid", test={"t": "toy"},
                    classes=["n", "h"] if kind == "residue_classification" else None)


@pytest.fixture(scope="module")
def tiny_t5():
    torch.manual_seed(0)
    return load(odd_config(num_layers=2, dropout_rate=0.0), random_init=True, seed=3, encoder_only=True)


CFG = HeadTrainConfig(lr=5e-3, warmup_steps=2, epochs=2, grad_accum=4, precision="fp32")
HEAD = HeadConfig(num_layers=1, num_heads=2, ff_ratio=0.5, dropout=0.1, kernel_size=3)


def _split(exs):
    return exs[:16], exs[16:20], {"t": exs[20:]}


def test_full_finetuning_at_learning_rate_zero_is_the_frozen_run(tiny_t5, tmp_path):
    seqs, exs = _toy(24, 0)
    path = str(tmp_path / "toy.h5")
    embed_files(tiny_t5, {k[1]: s for k, s in seqs.items()}, per_residue=path, progress=False, dtype="fp32",
                layers=[-1])
    store = EmbeddingStore(path)
    train, valid, tests = _split(exs)
    frozen = train_head(_task(), train, valid, tests, lambda e: np.asarray(store[e.id]), 40, 7, CFG, HEAD)
    feats = BackboneFeatures(tiny_t5, "full", FinetuneConfig(backbone_lr=0.0), seqs)
    tuned = train_head(_task(), train, valid, tests, feats, feats.dim, 7, CFG, HEAD)
    assert tuned.test == frozen.test
    assert [h.train_loss for h in tuned.history] == pytest.approx([h.train_loss for h in frozen.history], abs=1e-5)
    # the weights did not move
    base = tiny_t5.model.state_dict()
    for name, value in tuned.backbone_state.items():
        assert torch.equal(value, base[name].float()), name


def test_full_finetuning_trains_the_backbone_but_not_the_frozen_blocks(tiny_t5):
    seqs, exs = _toy(24, 1)
    train, valid, tests = _split(exs)
    feats = BackboneFeatures(tiny_t5, "full", FinetuneConfig(backbone_lr=1e-3, freeze_first=1), seqs)
    res = train_head(_task(), train, valid, tests, feats, feats.dim, 7, CFG, HEAD)
    base = tiny_t5.model.state_dict()
    trained = res.backbone_state
    assert trained and not any(k.startswith("encoder.block.0.") for k in trained)
    assert "encoder.embed_tokens.weight" not in trained and "shared.weight" not in trained
    moved = [k for k, v in trained.items() if not torch.equal(v, base[k].float())]
    assert any(k.startswith("encoder.block.1.") for k in moved)
    # the caller's model is never changed
    assert all(torch.equal(v, tiny_t5.model.state_dict()[k]) for k, v in base.items())


def test_features_do_not_depend_on_the_batch_or_on_windows(tiny_t5):
    seqs, exs = _toy(6, 2)
    feats = BackboneFeatures(tiny_t5, "full", FinetuneConfig(), seqs)
    feats.start(0)
    with torch.no_grad():
        alone = [feats.tensors([e])[0] for e in exs]
        together = feats.tensors(exs)
        windowed = BackboneFeatures(tiny_t5, "full", FinetuneConfig(), seqs, window=8, overlap=2)
        windowed.start(0)
        stitched = windowed.tensors(exs)
    for a, b, w, e in zip(alone, together, stitched, exs):
        assert a.shape == (e.length, 40)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # padding is masked
        assert w.shape == a.shape  # windows stitched back to one row per residue


def test_per_protein_regression_trains_through_the_backbone(tiny_t5):
    seqs, exs = _toy(24, 3, kind="protein_regression")
    train, valid, tests = _split(exs)
    feats = BackboneFeatures(tiny_t5, "full", FinetuneConfig(backbone_lr=1e-3), seqs)
    res = train_head(_task("protein_regression"), train, valid, tests, feats, feats.dim, 0, CFG, HEAD)
    assert np.isfinite(res.test["t"]["spearman"]) and res.steps == 2 * 4


def test_bad_settings_are_one_line_errors(tiny_t5):
    with pytest.raises(ConfigError, match="lora_rank must be >= 1"):
        FinetuneConfig(lora_rank=0)
    with pytest.raises(ConfigError, match="unknown mode 'lorra'.*frozen, lora, full"):
        parse_modes("frozen,lorra")
    assert parse_modes("frozen, LoRA,lora") == ["frozen", "lora"]
    feats = BackboneFeatures(tiny_t5, "full", FinetuneConfig(freeze_first=5), {("toy", "a"): "ACD"})
    with pytest.raises(ConfigError, match="freeze_first 5 is more than the model's 2 blocks"):
        feats.start(0)


# --- in the benchmark runner ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_t5):
    from protlm.convert import save_pretrained

    directory = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    full = load(odd_config(num_layers=2, dropout_rate=0.0), random_init=True, seed=3)
    save_pretrained(full.model, directory, full.tokenizer)
    return directory


def test_evaluate_trains_fine_tuned_columns_beside_the_frozen_one_and_resumes(tmp_path, tiny_checkpoint):
    import yaml

    from protlm.evaluate import ModelSource, load_suite, run_suite
    from protlm.evaluate.bundle import load_bundle, read_meta
    from protlm.evaluate.embeddings import FinetuneSource

    from .test_evaluate_runner import SUITE

    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "seeds": [7], "finetune": {"backbone_lr": 1e-3}}, sort_keys=False))
    suite = load_suite(str(path))
    cache = str(tmp_path / "cache")
    frozen = ModelSource(tiny_checkpoint, cache_dir=cache, dtype="fp32")
    full = FinetuneSource(tiny_checkpoint, "full", suite.finetune_config(), cache_dir=cache)
    assert full.name == frozen.name + " (full FT)" and full.key.startswith(frozen.key + "-full-")
    out = str(tmp_path / "out")
    run = run_suite(suite, [frozen, full], out, quick=True, tasks=["SSP-3", "GB1"], progress=False, log=lambda s: None)
    cells = {(c.source, c.task): c for c in run.cells}
    assert set(cells) == {(s.name, t) for s in (frozen, full) for t in ("SSP-3", "GB1")}
    assert all(c.trained_units == 1 for c in run.cells)
    assert cells[(full.name, "SSP-3")].embed_seconds == 0  # nothing embedded: features come from the backbone
    bundle = os.path.join(out, "heads", full.key, "SSP-3")
    meta = read_meta(bundle)
    assert meta.finetune["mode"] == "full" and meta.finetune["backbone_lr"] == 1e-3
    assert os.path.exists(os.path.join(bundle, meta.finetune["path"])) and load_bundle(bundle).head is not None
    assert read_meta(os.path.join(out, "heads", frozen.key, "SSP-3")).finetune is None
    # a finished run resumes without training; another finetune setting is another column, trained anew
    again = run_suite(load_suite(str(path)), [frozen, full], out, quick=True, tasks=["SSP-3", "GB1"], progress=False,
                      log=lambda s: None)
    assert all(c.trained_units == 0 for c in again.cells)
    other = FinetuneSource(tiny_checkpoint, "full", load_suite(str(path), ["finetune.freeze_first=1"]).finetune_config(),
                           cache_dir=cache)
    assert other.key != full.key


def test_cli_refuses_fine_tuning_stored_embeddings(tmp_path, tiny_checkpoint, capsys):
    from protlm.cli.main import main

    suite = os.path.join(os.path.dirname(__file__), "..", "configs", "eval", "ankh3.yaml")
    code = main(["evaluate", "--suite", suite, "--embeddings", str(tmp_path), "--model", tiny_checkpoint,
                 "--finetune", "lora"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err
    assert "--finetune lora cannot be used with --embeddings" in err
    assert main(["evaluate", "--suite", suite, "--model", tiny_checkpoint, "--finetune", "frozen,lorra"]) != 0
    assert "unknown mode 'lorra'" in capsys.readouterr().err


def test_a_killed_fine_tuning_run_resumes_from_its_last_epoch_and_ends_as_an_unbroken_one(tiny_t5, tmp_path):
    seqs, exs = _toy(24, 4)
    train, valid, tests = _split(exs)
    cfg = HeadTrainConfig(lr=5e-3, warmup_steps=2, epochs=3, grad_accum=4, precision="fp32")
    fcfg = FinetuneConfig(backbone_lr=1e-3, train_dropout=True)
    unbroken = train_head(_task(), train, valid, tests, BackboneFeatures(tiny_t5, "full", fcfg, seqs), 40, 7, cfg, HEAD)

    class Killed(Exception):
        pass

    def kill_in_epoch_2(done, total, note):
        if note.startswith("epoch 2/3 loss"):
            raise Killed

    state = str(tmp_path / "unit.partial.pt")
    with pytest.raises(Killed):
        train_head(_task(), train, valid, tests, BackboneFeatures(tiny_t5, "full", fcfg, seqs), 40, 7, cfg, HEAD,
                   progress=kill_in_epoch_2, resume_file=state, resume_tag="a")
    assert os.path.exists(state)
    resumed = train_head(_task(), train, valid, tests, BackboneFeatures(tiny_t5, "full", fcfg, seqs), 40, 7, cfg,
                         HEAD, resume_file=state, resume_tag="a")
    assert resumed.test == unbroken.test and resumed.steps == unbroken.steps
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in unbroken.history]
    for k, v in unbroken.backbone_state.items():
        assert torch.equal(v, resumed.backbone_state[k]), k
    # a state file of other settings (another tag) is not used: the run starts over
    other = train_head(_task(), train, valid, tests, BackboneFeatures(tiny_t5, "full", fcfg, seqs), 40, 7, cfg, HEAD,
                       resume_file=state, resume_tag="b")
    assert other.test == unbroken.test


def _family_models():
    from .test_bert import tiny as bert
    from .test_esm import tiny as esm
    from .test_gpt2 import tiny as gpt2

    return {"esm": (esm(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "esm.encoder.layer.1."),
            "bert": (bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "bert.encoder.layer.1."),
            "gpt2": (gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "transformer.h.1.")}


@pytest.mark.parametrize("family", ["esm", "bert", "gpt2"])
def test_every_family_fine_tunes_with_one_row_per_residue(family):
    config, block = _family_models()[family]
    pre = load(config, random_init=True, seed=1, encoder_only=True)
    seqs, exs = _toy(24, 5)
    feats = BackboneFeatures(pre, "full", FinetuneConfig(backbone_lr=1e-3), seqs)
    feats.start(0)
    with torch.no_grad():
        rows = feats.tensors(exs[:3])
    assert [tuple(r.shape) for r in rows] == [(e.length, 36) for e in exs[:3]]
    train, valid, tests = _split(exs)
    res = train_head(_task(), train, valid, tests, feats, feats.dim, 7, CFG, HEAD)
    base = pre.model.state_dict()
    moved = [k for k, v in res.backbone_state.items() if not torch.equal(v, base[k].float())]
    assert any(k.startswith(block) for k in moved), moved[:5]


def test_lora_trains_only_the_adapters_and_the_bundle_holds_a_peft_adapter(tiny_t5, tmp_path):
    from protlm.finetune.lora import CONFIG_FILE, WEIGHTS_FILE

    seqs, exs = _toy(24, 6)
    train, valid, tests = _split(exs)
    feats = BackboneFeatures(tiny_t5, "lora", FinetuneConfig(lora_rank=2, adapter_lr=1e-2), seqs)
    res = train_head(_task(), train, valid, tests, feats, feats.dim, 7, CFG, HEAD)
    state = res.backbone_state
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    # every q, k, v, o projection of both blocks has its pair; B (zero at the start) has moved
    assert len(state) == 2 * 4 * 2
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())
    # base weights are untouched, in the trained copy and in the caller's model
    base = tiny_t5.model.state_dict()
    tuned = {k.replace(".base_layer", ""): v for k, v in feats.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(tuned[k], base[k].float()) for k in base if k in tuned)
    feats.save(str(tmp_path), state)
    assert sorted(os.listdir(tmp_path / "adapter")) >= sorted([CONFIG_FILE, WEIGHTS_FILE])


def test_contact_heads_fine_tune_one_protein_per_pass(tiny_t5):
    rng = np.random.default_rng(7)
    seqs, exs = {}, []
    for i in range(12):
        s = "".join(rng.choice(list(AA), size=int(rng.integers(14, 24))))
        seqs[("toy", f"c{i}")] = s
        pos = np.arange(len(s))
        target = (rng.random((len(s), len(s))) < 0.1).astype(np.int8)
        target = np.maximum(target, target.T)
        target[np.abs(pos[:, None] - pos[None, :]) < 6] = -1
        exs.append(TaskExample(f"c{i}", "toy", len(s), target, pos))
    task = TaskSpec(name="cp", kind="contact", label="contacts", train="toy/train", valid="toy/valid",
                    test={"t": "toy"}, metrics=["P@L", "P@L/5"])
    feats = BackboneFeatures(tiny_t5, "full", FinetuneConfig(backbone_lr=1e-3), seqs)
    cfg = HeadTrainConfig(lr=5e-3, warmup_steps=1, epochs=1, grad_accum=4, precision="fp32")
    res = train_head(task, exs[:8], exs[8:10], {"t": exs[10:]}, feats, feats.dim, 0, cfg, HEAD)
    assert set(res.test["t"]) == {"P@L", "P@L/5"} and res.steps == 2
    base = tiny_t5.model.state_dict()
    assert any(not torch.equal(v, base[k].float()) for k, v in res.backbone_state.items())


def test_activation_checkpointing_changes_memory_not_results(tiny_t5):
    seqs, exs = _toy(24, 8)
    train, valid, tests = _split(exs)
    runs = []
    for checkpointing in (False, True):
        feats = BackboneFeatures(tiny_t5, "lora", FinetuneConfig(lora_dropout=0.0, adapter_lr=1e-2,
                                                                 checkpointing=checkpointing), seqs)
        runs.append(train_head(_task(), train, valid, tests, feats, feats.dim, 7, CFG, HEAD))
        assert all(getattr(b, "_protlm_checkpointed", False) == checkpointing for b in feats.model.encoder.block)
    assert runs[0].test == runs[1].test
    for k, v in runs[0].backbone_state.items():
        torch.testing.assert_close(v, runs[1].backbone_state[k], atol=1e-6, rtol=1e-5)
