"""Fine-tuned heads outside the benchmark: ``protlm train-head --finetune lora|full`` (bundles that carry the
backbone's trained part, ``--merge``), ``protlm predict`` on them (each head on its own backbone, frozen heads on
the base in the same call) and ``protlm export-backbone``; on a tiny random-init T5 checkpoint and FLIP's SSP-3
excerpt (biotrainer's three-file per-residue protocol)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import protlm
from protlm.cli.main import main
from protlm.convert import load, save_pretrained
from protlm.evaluate import predict as P
from protlm.evaluate.bundle import copy_bundle, load_bundle, read_meta
from protlm.evaluate.labels import read_labels

from .conftest import odd_config

EVAL = os.path.join(os.path.dirname(__file__), "data", "eval")
FLIP = ["--sequences", os.path.join(EVAL, "flip_ss3_sequences.fasta"),
        "--mask", os.path.join(EVAL, "flip_ss3_mask.fasta")]
FLIP_LABELS = os.path.join(EVAL, "flip_ss3_labels.fasta")
QUICK = ["--task", "SSP-3", "--set", "training.epochs=2", "--set", "training.warmup_steps=2", "--set",
         "training.grad_accum=4", "--set", "training.precision=fp32", "--set", "head.num_layers=1", "--set",
         "head.num_heads=2", "--no-progress", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny T5 checkpoint and three train-head runs on it: frozen, full fine-tuning and LoRA (both --merge)."""
    root = tmp_path_factory.mktemp("ft")
    ckpt = str(root / "tiny")
    base = load(odd_config(num_layers=2, dropout_rate=0.0), random_init=True, seed=3)
    save_pretrained(base.model, ckpt, base.tokenizer)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for mode, extra in (("frozen", []), ("full", ["--set", "finetune.backbone_lr=1e-3", "--merge"]),
                            ("lora", ["--set", "finetune.lora_rank=4", "--set", "finetune.adapter_lr=3e-3",
                                      "--seeds", "2", "--merge"])):
            out = str(root / mode)
            assert main(["train-head", ckpt, FLIP_LABELS, *FLIP, "-o", out, "--finetune", mode,
                         "--cache-dir", str(root / "cache"), *QUICK, *extra]) == 0
            runs[mode] = out
    finally:
        torch.set_num_threads(n)
    return ckpt, runs


def _test_records():
    labels = read_labels(FLIP_LABELS, sequences=FLIP[1], mask=FLIP[3])
    return labels.splits["test"]


def _accuracy(records, got, classes):
    hit = total = 0
    for r in records:
        pred = got[r.id]["SSP-3"].prediction
        for i, (c, p) in enumerate(zip(r.labels["label"], pred)):
            if r.mask is None or r.mask[i]:
                hit, total = hit + (c == p), total + 1
    assert set("".join(got[r.id]["SSP-3"].prediction for r in records)) <= set(classes)
    return hit / total


def _bundle(runs, mode):
    return os.path.join(runs[mode], "heads", "SSP-3")


def test_bundles_carry_the_trained_backbone_and_the_report_says_how(trained):
    ckpt, runs = trained
    frozen, full, lora = (read_meta(_bundle(runs, m)) for m in ("frozen", "full", "lora"))
    assert frozen.finetune is None and not os.path.exists(os.path.join(_bundle(runs, "frozen"), "adapter"))
    assert full.finetune["mode"] == "full" and full.finetune["backbone_lr"] == 1e-3
    assert os.path.isfile(os.path.join(_bundle(runs, "full"), "backbone.safetensors"))
    assert lora.finetune["mode"] == "lora" and lora.finetune["lora_rank"] == 4
    assert sorted(os.listdir(os.path.join(_bundle(runs, "lora"), "adapter"))) == [
        "adapter_config.json", "adapter_model.safetensors", "protlm_adapter.json"]
    assert full.backbone["model"] == lora.backbone["model"] == os.path.abspath(ckpt)
    res = json.load(open(os.path.join(runs["lora"], "results.json")))
    assert res["finetune"]["mode"] == "lora" and res["source"]["name"].endswith("(LoRA)")
    assert lora.seed == res["best_seed"] and res["merged"] == os.path.join(runs["lora"], "merged")
    report = open(os.path.join(runs["full"], "report.md")).read()
    assert "Backbone: full fine-tuning with the head (backbone lr 0.001)" in report
    lora_report = open(os.path.join(runs["lora"], "report.md")).read()
    assert "Backbone: LoRA fine-tuning with the head (rank 4, alpha 16" in lora_report
    assert json.load(open(os.path.join(runs["frozen"], "results.json")))["finetune"] is None


def test_predict_reproduces_the_stored_test_metric_with_the_fine_tuned_backbone(trained):
    ckpt, runs = trained
    records = _test_records()
    seqs = [(r.id, r.sequence) for r in records]
    base = protlm.load(ckpt, encoder_only=True)
    for mode in ("frozen", "full"):
        meta = read_meta(_bundle(runs, mode))
        got = protlm.predict(base, [_bundle(runs, mode)], seqs)
        # exactly: the same head on the same backbone weights, fp32, the head code path that scored it
        assert _accuracy(records, got, meta.classes) == meta.metrics["test"]["accuracy"], mode
    # the fine-tuned head on the base model's own embeddings (the bundle read as if frozen) predicts otherwise
    tuned = load_bundle(_bundle(runs, "full"))
    as_frozen = P.Predictor([dataclasses.replace(tuned, meta=dataclasses.replace(tuned.meta, finetune=None))], base)
    right = P.Predictor([tuned], base)
    a, b = as_frozen.predict(seqs), right.predict(seqs)
    gap = max(np.abs(x.heads["SSP-3"].probabilities - y.heads["SSP-3"].probabilities).max() for x, y in zip(a, b))
    assert gap > 1e-3
    # the caller's model is untouched
    again = protlm.load(ckpt, encoder_only=True)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in base.model.state_dict().items())


def test_lora_merged_predictions_match_the_unmerged_adapter(trained):
    """predict merges the adapter; the same adapter left unmerged (peft's LoRA layers in the forward pass) gives
    the labels the training run scored, and the merged weights the same labels and probabilities to 1e-4."""
    from protlm.finetune.lora import load_adapter

    ckpt, runs = trained
    records = _test_records()
    seqs = [(r.id, r.sequence) for r in records]
    bundle = load_bundle(_bundle(runs, "lora"))
    unmerged = protlm.load(ckpt, encoder_only=True)
    load_adapter(unmerged.model, os.path.join(bundle.path, "adapter"))
    as_frozen = dataclasses.replace(bundle, meta=dataclasses.replace(bundle.meta, finetune=None))
    ref = P.Predictor([as_frozen], unmerged).predict(seqs)
    got = P.Predictor([bundle], protlm.load(ckpt, encoder_only=True)).predict(seqs)
    scored = bundle.meta.metrics["test"]["accuracy"]
    assert _accuracy(records, {p.id: p.heads for p in ref}, bundle.meta.classes) == scored
    for r, g in zip(ref, got):
        assert g.heads["SSP-3"].prediction == r.heads["SSP-3"].prediction
        np.testing.assert_allclose(g.heads["SSP-3"].probabilities, r.heads["SSP-3"].probabilities, atol=1e-4)


def test_cli_predicts_frozen_and_fine_tuned_heads_in_one_call(trained, tmp_path, capsys):
    ckpt, runs = trained
    seqs = [(r.id, r.sequence) for r in _test_records()[:4]]
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in seqs))
    heads = [copy_bundle(_bundle(runs, m), tmp_path / m) for m in ("frozen", "full", "lora")]
    both = str(tmp_path / "all.tsv")
    assert main(["predict", ckpt, "--heads", *heads, str(fasta), "-o", both]) == 0
    assert "(2 fine-tuned backbones)" in capsys.readouterr().err
    rows = [line.split("\t") for line in open(both).read().splitlines()]
    names = [c for c in rows[0] if ":" not in c][2:]
    assert names == ["SSP-3.frozen", "SSP-3.full", "SSP-3.lora"]
    for k, head in enumerate(heads):  # each column as a call with that head alone predicts it
        alone = str(tmp_path / f"{k}.tsv")
        assert main(["predict", ckpt, "--heads", head, str(fasta), "-o", alone]) == 0
        single = [line.split("\t") for line in open(alone).read().splitlines()[1:]]
        assert [r[2 + 4 * k: 6 + 4 * k] for r in rows[1:]] == [r[2:6] for r in single]
    assert len({tuple(r[2 + 4 * k] for r in rows[1:]) for k in range(3)}) > 1  # three backbones, not one
    predictor = P.Predictor(P.load_heads(heads), protlm.load(ckpt, encoder_only=True))
    assert [backbone for backbone, _ in predictor._runs] == [None, heads[1], heads[2]]


def test_merged_and_exported_backbones_are_normal_checkpoints(trained, tmp_path, capsys):
    """OUT/merged (train-head --merge) and protlm export-backbone write the same checkpoint; protlm.load and
    transformers read it, and it embeds as the fine-tuned backbone that predict builds."""
    from transformers import T5ForConditionalGeneration

    ckpt, runs = trained
    seqs = [(r.id, r.sequence) for r in _test_records()[:3]]
    base = protlm.load(ckpt, encoder_only=True)
    for mode in ("full", "lora"):
        bundle = load_bundle(_bundle(runs, mode))
        out = str(tmp_path / mode)
        assert main(["export-backbone", bundle.path, "-o", out]) == 0
        merged = os.path.join(runs[mode], "merged")
        for name in ("config.json", "model.safetensors"):
            assert open(os.path.join(out, name), "rb").read() == open(os.path.join(merged, name), "rb").read()
        emb = dict(per_residue=True, layers=[-1], dtype="fp32")
        exported = protlm.embed(protlm.load(out), seqs, **emb)
        tuned = protlm.embed(P.finetuned_backbone(base, bundle), seqs, **emb)
        plain = protlm.embed(base, seqs, **emb)
        for oid, _ in seqs:
            np.testing.assert_allclose(exported[oid], tuned[oid], atol=1e-5)
            assert np.abs(exported[oid] - plain[oid]).max() > 1e-3
        ours = protlm.load(out)
        assert ours.model.kind == "encoder-decoder"  # the whole base: its decoder is kept
        hf = T5ForConditionalGeneration.from_pretrained(out).eval()
        ids = torch.randint(3, 28, (1, 12))
        with torch.no_grad():
            theirs = hf.encoder(input_ids=ids).last_hidden_state
            last = ours.model.encoder.resolve_layers([-1])[0]
            mine = ours.model.encoder(ids, torch.ones_like(ids), output_layers=[last]).hidden_states[last]
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    assert main(["export-backbone", _bundle(runs, "full"), "-o", str(tmp_path / "x"), "--model", ckpt]) == 0


def test_one_line_errors(trained, tmp_path, capsys):
    ckpt, runs = trained

    def err(argv):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return lines[-1]

    fasta = tmp_path / "p.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    emb = str(tmp_path / "r.h5")
    assert main(["embed", ckpt, str(fasta), "--per-residue", emb, "--dtype", "fp32", "--no-progress"]) == 0
    capsys.readouterr()
    msg = err(["predict", "--embeddings", emb, "--heads", _bundle(runs, "full"), str(fasta)])
    assert "reads a fine-tuned backbone (full); stored embeddings were not made by it" in msg
    other = str(tmp_path / "other")
    o = load(odd_config(num_layers=3, dropout_rate=0.0), random_init=True, seed=3)
    save_pretrained(o.model, other, o.tokenizer)
    msg = err(["export-backbone", _bundle(runs, "lora"), "-o", str(tmp_path / "x"), "--model", other])
    assert f"was fine-tuned from {os.path.abspath(ckpt)}" in msg and f"the base given is {other}" in msg
    assert "another config" in msg
    frozen = _bundle(runs, "frozen")
    assert "trained on a frozen backbone" in err(["export-backbone", frozen, "-o", str(tmp_path / "y")])
    labels = [ckpt, FLIP_LABELS, *FLIP, "-o", str(tmp_path / "z")]
    assert "--merge writes a fine-tuned backbone" in err(["train-head", *labels, "--merge"])
    assert "add --finetune lora or full" in err(["train-head", *labels, "--set", "finetune.lora_rank=2"])
    assert "one backbone mode" in err(["train-head", *labels, "--finetune", "frozen,lora"])
    assert "unknown mode 'lorra'" in err(["train-head", *labels, "--finetune", "lorra"])
    assert "--embed-dtype applies to frozen embeddings" in err(["train-head", *labels, "--finetune", "full",
                                                                "--embed-dtype", "bf16"])
    assert "lora_rank must be >= 1" in err(["train-head", *labels, "--finetune", "lora", "--set",
                                            "finetune.lora_rank=0"])
    assert not os.path.exists(str(tmp_path / "z"))


# --- the other families ---------------------------------------------------------------------------------------
def _family_config(family):
    from .test_bert import tiny as bert
    from .test_esm import tiny as esm
    from .test_gpt2 import tiny as gpt2

    return {"esm": esm(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            "bert": bert(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            "gpt2": gpt2(n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}[family]


@pytest.mark.parametrize("family, lm_class", [("esm", "AutoModelForMaskedLM"), ("bert", "AutoModelForMaskedLM"),
                                              ("gpt2", "AutoModelForCausalLM")])
def test_every_family_predicts_and_exports_its_fine_tuned_backbone(family, lm_class, tmp_path):
    """ESM-2, ProtBERT and GPT-2 shapes (GPT-2: BPE tokens holding several residues; all: windows, the tiny
    models see 40 or 97 positions): full fine-tuning predicts the stored test metric exactly, the merged LoRA
    adapter the unmerged one's labels, and both export to checkpoints transformers loads with every key."""
    import transformers

    from protlm.finetune.lora import load_adapter

    pre = load(_family_config(family), random_init=True, seed=1)
    ckpt = save_pretrained(pre.model, str(tmp_path / "ckpt"), pre.tokenizer)
    records = _test_records()
    seqs = [(r.id, r.sequence) for r in records]
    base = protlm.load(ckpt, encoder_only=True)
    for mode in ("full", "lora"):
        out = str(tmp_path / mode)
        assert main(["train-head", ckpt, FLIP_LABELS, *FLIP, "-o", out, "--finetune", mode, "--merge",
                     "--set", "finetune.backbone_lr=1e-3", "--set", "finetune.adapter_lr=3e-3",
                     *QUICK, "--set", "training.epochs=1"]) == 0
        bundle = load_bundle(_bundle({mode: out}, mode))
        got = P.Predictor([bundle], base).predict(seqs)
        if mode == "full":
            assert _accuracy(records, {p.id: p.heads for p in got}, bundle.meta.classes) == \
                bundle.meta.metrics["test"]["accuracy"]
        else:
            unmerged = protlm.load(ckpt, encoder_only=True)
            load_adapter(unmerged.model, os.path.join(bundle.path, "adapter"))
            as_frozen = dataclasses.replace(bundle, meta=dataclasses.replace(bundle.meta, finetune=None))
            for r, g in zip(P.Predictor([as_frozen], unmerged).predict(seqs), got):
                assert g.heads["SSP-3"].prediction == r.heads["SSP-3"].prediction
                np.testing.assert_allclose(g.heads["SSP-3"].probabilities, r.heads["SSP-3"].probabilities, atol=1e-4)
        merged = os.path.join(out, "merged")
        emb = dict(per_residue=True, layers=[-1], dtype="fp32")
        a = protlm.embed(protlm.load(merged), seqs[:2], **emb)
        b = protlm.embed(P.finetuned_backbone(base, bundle), seqs[:2], **emb)
        for oid, _ in seqs[:2]:
            np.testing.assert_allclose(a[oid], b[oid], atol=1e-5)
        _, info = getattr(transformers, lm_class).from_pretrained(merged, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info


# --- evaluate's bundles and random-init bases -------------------------------------------------------------------
def test_evaluate_bundles_of_a_random_init_twin_predict_and_export(tmp_path):
    """A fine-tuned column of protlm evaluate on a random-init twin: predict (MODEL --random-init) reproduces
    each stored test metric, and export-backbone writes the encoder the head trained on (the twin's
    encoder-only draw, which differs from the whole model's)."""
    import yaml

    from protlm.evaluate import load_suite, run_suite
    from protlm.evaluate.embeddings import FinetuneSource

    from .test_predict import SUITE, _metric, _test_split

    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({**SUITE, "seeds": [7], "finetune": {"backbone_lr": 1e-3, "freeze_first": 1},
                                          "head": {"num_layers": 1, "num_heads": 2}}, sort_keys=False))
    suite = load_suite(str(suite_file))
    src = FinetuneSource("tiny", "full", suite.finetune_config(), random_init_of="tiny", seed=2,
                         cache_dir=str(tmp_path / "cache"))
    run_suite(suite, [src], str(tmp_path / "out"), quick=True, tasks=["SSP-3"], progress=False, log=lambda s: None)
    bundle = os.path.join(tmp_path, "out", "heads", src.key, "SSP-3")
    meta = read_meta(bundle)
    assert meta.finetune["mode"] == "full" and meta.backbone["random_init"] and meta.backbone["init_seed"] == 2
    task, tests, records = _test_split(str(suite_file), "SSP-3")
    twin = protlm.load("tiny", random_init=True, seed=2, encoder_only=True)
    for test, exs in tests.items():
        got = protlm.predict(twin, [bundle], [(e.id, records[(e.dataset, e.id)].sequence) for e in exs])
        assert _metric(task, exs, got) == meta.metrics[test]["accuracy"], test
    out = str(tmp_path / "exported")
    assert main(["export-backbone", bundle, "-o", out]) == 0
    exported = protlm.load(out)
    assert exported.model.encoder_only
    seqs = [(e.id, records[(e.dataset, e.id)].sequence) for e in tests["CASP12"][:2]]
    emb = dict(per_residue=True, layers=[-1], dtype="fp32")
    a = protlm.embed(exported, seqs, **emb)
    b = protlm.embed(P.finetuned_backbone(twin, load_bundle(bundle)), seqs, **emb)
    for oid, _ in seqs:
        np.testing.assert_allclose(a[oid], b[oid], atol=1e-5)
    # the predict CLI takes the twin as evaluate's frozen heads do
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in seqs))
    assert main(["predict", "tiny", "--random-init", "--init-seed", "2", "--heads", bundle, str(fasta),
                 "-o", str(tmp_path / "p.tsv")]) == 0
