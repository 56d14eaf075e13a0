"""The trainer: configuration reading and its errors, schedules, optimizer, one real (tiny) training run with its
outputs, gradient accumulation and activation checkpointing, export, and refusals on resume."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

import protlm
from protlm.errors import CheckpointError, ConfigError
from protlm.train import Trainer, load_config, lr_at
from protlm.train.config import OptimSection
from protlm.train.optim import ShardedAdafactor
from tests.train_helpers import read_metrics, train_losses, val_losses, write_config


# --- configuration -------------------------------------------------------------------------------------------
def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_recipes_in_configs_load():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert {"debug.yaml", "tiny-cpu.yaml", "ankh3-large.yaml", "ankh3-xl.yaml"} <= set(names)
    for name in names:
        load_config(os.path.join(root, name))


def test_ankh3_recipes_carry_table3_values():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name, steps, preset in (("ankh3-large.yaml", 4_000_000, "ankh3-large"), ("ankh3-xl.yaml", 5_000_000, "ankh3-xl")):
        cfg = load_config(os.path.join(root, name))
        assert cfg.model.preset == preset
        assert (cfg.run.batch_size, cfg.data.max_length, cfg.run.steps) == (1024, 512, steps)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps) == ("adafactor", 1e-2, "rsqrt", 10_000)
        assert cfg.optim.weight_decay == 0.0
        assert tuple(cfg.objective.mask_rates) == (0.15, 0.2, 0.3)
        assert cfg.objective.probabilities == {"denoise": 0.5, "complete": 0.5}


def test_unknown_key_names_key_and_file(tmp_path):
    path = _yaml(tmp_path, "optim:\n  lr: 0.01\n  warmup_step: 5\ndata:\n  train: [x.fa]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'optim\.warmup_step' \(did you mean 'optim\.warmup_steps'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'trian'"):
        load_config(_yaml(tmp_path, "trian: {}\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'objective\.mask_rate' \(did you mean 'objective\.mask_rates'\?\)"):
        load_config(_yaml(tmp_path, "objective: {mask_rate: 0.2}\ndata: {train: [x.fa]}\n"))


def test_wrong_type_names_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: run\.steps must be int, got '100'"):
        load_config(_yaml(tmp_path, "run:\n  steps: '100'\ndata: {train: [x.fa]}\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: run\.activation_checkpointing must be bool, got 'yes please'"):
        load_config(_yaml(tmp_path, "run: {activation_checkpointing: yes please}\ndata: {train: [x.fa]}\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.schedule must be one of rsqrt, cosine, constant"):
        load_config(_yaml(tmp_path, "optim: {schedule: linear}\ndata: {train: [x.fa]}\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.train lists no training files"):
        load_config(_yaml(tmp_path, "run: {steps: 3}\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML at line \d+ \(expected ',' or '\]'"):
        load_config(_yaml(tmp_path, "run:\n  steps: [1\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_set_overrides(tmp_path):
    path = _yaml(tmp_path, "data: {train: [x.fa]}\n")
    cfg = load_config(path, ["optim.lr=3e-3", "run.precision=fp32", "model.overrides.d_model=96",
                             "objective.mask_rates=[0.1, 0.4]", "data.train=[a.fa, b.fa]"])
    assert cfg.optim.lr == 3e-3 and cfg.run.precision == "fp32" and cfg.model.overrides == {"d_model": 96}
    assert cfg.objective.mask_rates == (0.1, 0.4) and cfg.data.train == ["a.fa", "b.fa"]
    with pytest.raises(ConfigError, match=r"--set: unknown config key 'optim\.learning_rate'"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"--set: run\.steps must be int, got 'many'"):
        load_config(path, ["run.steps=many"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["run.steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_yaml(tmp_path, "data: {train: [x.fa]}\nobjective: {completion_ratio: [0.3, 0.7]}\n"))
    again = load_config(_yaml(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_batch_must_split_over_processes(tmp_path):
    cfg = load_config(_yaml(tmp_path, "data: {train: [x.fa]}\nrun: {batch_size: 12, micro_batch_size: 4}\n"))
    assert cfg.accumulation(1) == 3
    with pytest.raises(ConfigError, match=r"run\.batch_size=12 is not a multiple of run\.micro_batch_size \(4\) x processes \(2\)"):
        cfg.accumulation(2)


# --- schedules and optimizer ---------------------------------------------------------------------------------
def test_rsqrt_schedule_is_t5s():
    cfg = OptimSection(lr=1e-2, schedule="rsqrt", warmup_steps=10_000)
    assert lr_at(1, cfg, 10**6) == lr_at(10_000, cfg, 10**6) == 1e-2  # constant during warmup
    for step in (10_000, 40_000, 4_000_000):
        # T5's rsqrt_decay: 1/sqrt(max(step, warmup)); with lr 1e-2 and 10k warmup these coincide
        assert lr_at(step, cfg, 10**6) == pytest.approx(1 / math.sqrt(max(step, 10_000)), rel=1e-12)
    assert lr_at(40_000, cfg, 10**6) == pytest.approx(5e-3)


def test_cosine_schedule():
    cfg = OptimSection(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(5, cfg, 110) == pytest.approx(5e-4)  # linear warmup
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55e-3)  # half way down
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)


def test_sharded_adafactor_math_is_torchs():
    """The DTensor-friendly update is torch.optim.Adafactor's, bit for bit, on plain tensors."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (7,), (3, 4)]
    ref = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    ref[2].data.mul_(1e-4)  # exercises the eps2 floor of the relative step
    mine = [p.detach().clone().requires_grad_() for p in ref]
    opt_ref = torch.optim.Adafactor(ref, lr=1e-2, foreach=False, weight_decay=0.01)
    opt_mine = ShardedAdafactor(mine, lr=1e-2, weight_decay=0.01)
    for _ in range(4):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, gr in zip(ref, mine, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_ref.step()
        with torch.no_grad():
            group = opt_mine.param_groups[0]
            for q in mine:
                ShardedAdafactor._update(q, q.grad, opt_mine.state[q], group["lr"], group["beta2_decay"],
                                         group["weight_decay"], group["d"], *group["eps"])
    for p, q in zip(ref, mine):
        assert torch.equal(p, q)
        assert opt_ref.state[p].keys() == opt_mine.state[q].keys()


# --- the training step against transformers ------------------------------------------------------------------
@pytest.mark.parametrize("ffn,tied", [("gated-silu", False), ("relu", True)])
def test_training_gradients_match_transformers(tmp_path, ffn, tied):
    """In train mode the position bias needs a gradient, which sends protlm's CPU attention down its own
    matmul-softmax path; loss and every gradient must still be transformers' (fp32, padded batch)."""
    transformers = pytest.importorskip("transformers")
    from tests.conftest import odd_config

    torch.manual_seed(0)
    pre = protlm.random_init(odd_config(ffn=ffn, tied=tied), seed=0)
    protlm.save_pretrained(pre.model, tmp_path, pre.tokenizer)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
    ours = pre.model.train()
    hf.train()
    ids = torch.tensor([[3, 7, 255, 9, 10, 254, 12, 1], [4, 11, 12, 13, 1, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[255, 8, 254, 11, 1], [14, 15, 16, 1, -100]])
    dmask = (labels != -100).long()
    loss_ours = ours(ids, mask, labels=labels, decoder_mask=dmask).loss
    loss_hf = hf(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask).loss
    loss_ours.backward()
    loss_hf.backward()
    assert abs(loss_ours.item() - loss_hf.item()) < 1e-5
    theirs = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if name not in theirs:
            continue
        scale = theirs[name].grad.abs().max().item() + 1e-12
        assert (p.grad - theirs[name].grad).abs().max().item() / scale < 1e-4, name
        checked += 1
    assert checked > 20
    bias = ours.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.grad.abs().sum() > 0


# --- a real run ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 6-step run of the tiny recipe, shared by the tests that inspect its outputs."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    path = write_config(tmp, out, log={"tensorboard": True})
    result = Trainer(load_config(path)).run()
    return path, out, result


def test_residue_baselines_by_hand():
    from protlm.train.metrics import residue_baselines

    # vocabulary: 0 pad, 1 </s>, 2 and 3 residues, 4 a sentinel; the unigram gives the residues 0.25 and 0.75
    is_res = np.array([False, False, True, True, False])
    unigram = np.array([0.0, 0.0, 0.25, 0.75, 0.0])
    inputs = np.array([[2, 2, 4, 3, 1, 0], [3, 3, 3, 1, 0, 0]])
    labels = np.array([[4, 3, 1, -100], [2, 1, -100, -100]])  # sentinel, residue 3, </s>; residue 2, </s>
    uni, own, n = residue_baselines(inputs, labels, is_res, unigram, prior=2.0)
    assert n == 2
    assert uni == pytest.approx(-math.log(0.75) - math.log(0.25))
    # row 0 shows residues 2, 2, 3: p(3) = (1 + 2 * 0.75) / (3 + 2); row 1 shows 3, 3, 3: p(2) = (0 + 2 * 0.25) / 5
    assert own == pytest.approx(-math.log(2.5 / 5) - math.log(0.5 / 5))


def test_run_writes_metrics_checkpoints_config_and_export(finished_run):
    path, out, result = finished_run
    assert result.step == 6
    records = read_metrics(out)
    train = [r for r in records if "train/all/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("train/denoise/loss", "train/complete/loss", "train/denoise/acc", "train/complete/acc", "train/lr",
                "train/grad_norm", "train/tokens_per_s", "train/mfu"):
        assert all(key in r and math.isfinite(r[key]) for r in train), key
    assert train[0]["train/lr"] == 1e-2 and train[-1]["train/lr"] == pytest.approx(1e-2 * math.sqrt(3 / 6))
    val = [r for r in records if "val/all/loss" in r]
    assert [r["step"] for r in val] == [3, 6]
    for key in ("val/denoise/loss", "val/complete/loss", "val/denoise/unigram_loss", "val/complete/unigram_loss",
                "val/denoise/residue_loss"):
        assert key in val[-1]
    # a unigram model of ~20 residues is near ln(20); a much lower value would mean counting the wrong tokens
    assert 2.5 < val[-1]["val/denoise/unigram_loss"] < 3.2
    for task in ("denoise", "complete"):
        assert 2.4 < val[-1][f"val/{task}/composition_loss"] < 3.3
    assert os.listdir(out / "tensorboard")
    assert (out / "curves.png").stat().st_size > 10_000
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003", "step_00000006"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["run"]["steps"] == 6 and saved["output_dir"] == str(out)


def test_export_loads_in_protlm_and_transformers(finished_run):
    _, out, result = finished_run
    transformers = pytest.importorskip("transformers")
    pre = protlm.load(result.final_dir)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(result.final_dir).eval()
    ids = torch.tensor([[3, 7, 8, 9, 10, 1], [4, 11, 12, 1, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[255, 7, 254, 8, 1], [12, 13, 1, -100, -100]])
    with torch.no_grad():
        ours = pre.model(ids, mask, labels=labels)
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    assert (ours.logits - theirs.logits).abs().max().item() < 1e-4
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5


def test_refuses_to_overwrite_a_run_without_resume(finished_run):
    path, out, _ = finished_run
    with pytest.raises(ConfigError, match=r"holds checkpoints up to step 6; pass --resume"):
        Trainer(load_config(path)).run()


def test_resume_refuses_a_different_model(finished_run, tmp_path):
    path, out, _ = finished_run
    cfg = load_config(path, ["model.overrides.d_ff=41", "run.steps=8"])
    with pytest.raises(CheckpointError, match=r"step_00000006: model config differs from this run: d_ff is 37 in the checkpoint but 41 now"):
        Trainer(cfg, resume=True).run()


@pytest.mark.parametrize("head,tied", [("t5x", False), ("hf", False), ("t5x", True)])
def test_fresh_model_starts_from_the_eager_init(tmp_path, head, tied):
    """A fresh model is built on the meta device and gets its weights once placed; they are still those of
    ``torch.manual_seed(run.seed); T5(config)`` (then the T5X LM-head draw), so earlier runs stay reproducible."""
    from protlm.distributed import parallelize
    from protlm.model.t5 import T5
    from tests.train_helpers import ODD_MODEL

    path = write_config(tmp_path, tmp_path / "out", run={"seed": 7},
                        model={"lm_head_init": head, "overrides": {**ODD_MODEL, "tie_word_embeddings": tied}})
    trainer = Trainer(load_config(path))
    _, model, mcfg, init = trainer._build_tokenizer_and_model()
    assert all(p.is_meta for p in model.parameters())
    parallelize(model, trainer.strategy, trainer.env, materialize=init)
    after = torch.rand(4)
    torch.manual_seed(7)
    ref = T5(mcfg)
    if head == "t5x" and not tied:
        with torch.no_grad():
            ref.lm_head.weight.normal_(0.0, mcfg.initializer_factor * mcfg.d_model ** -0.5)
    assert torch.equal(after, torch.rand(4))  # the random stream is where eager construction leaves it
    got, want = model.state_dict(), ref.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (model.lm_head.weight is model.shared.weight) == tied


def test_learning_happens(tmp_path):
    """Sixty steps on real sequences take training and validation loss well down from the uniform start
    (ln 256 = 5.55 nats, given the T5X head init)."""
    path = write_config(tmp_path, tmp_path / "out", run={"steps": 60}, eval={"every": 20},
                        checkpoint={"every": 60, "export": False}, optim={"warmup_steps": 10})
    Trainer(load_config(path)).run()
    losses, val = train_losses(tmp_path / "out"), val_losses(tmp_path / "out")
    assert losses[1] == pytest.approx(math.log(256), abs=0.1)
    assert losses[60] < losses[1] - 0.8
    assert val[60] < val[20] - 0.4


def test_accumulation_and_checkpointing_do_not_change_the_run(tmp_path):
    """Global batch 8 as 2x4 (accumulation) or 1x8, with or without activation checkpointing: same losses."""
    runs = {}
    for name, micro, ac in (("accum", 4, False), ("whole", 8, False), ("recompute", 4, True)):
        out = tmp_path / name
        path = write_config(tmp_path, out, run={"steps": 4, "micro_batch_size": micro, "activation_checkpointing": ac},
                            eval={"every": 0}, checkpoint={"every": 100, "export": False})
        Trainer(load_config(path)).run()
        runs[name] = train_losses(out)
    for step, loss in runs["accum"].items():
        assert runs["whole"][step] == pytest.approx(loss, abs=1e-5)
        assert runs["recompute"][step] == pytest.approx(loss, abs=1e-6)


def test_bf16_autocast_run(tmp_path, capsys):
    # the suite stands in an AVX2 CPU (tests/conftest.py): bf16 asked for by name runs, with a one-line warning
    path = write_config(tmp_path, tmp_path / "out", run={"steps": 3, "precision": "bf16"}, eval={"every": 3},
                        checkpoint={"every": 3, "export": False})
    result = Trainer(load_config(path)).run()
    assert all(math.isfinite(v) for v in train_losses(tmp_path / "out").values())
    assert math.isfinite(result.last_metrics["val/denoise/loss"])
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "run.precision bf16 is slow on this CPU" in warning[0]
    assert "1.1 GFLOP/s against 55.0 in fp32 (bf16 matmul runs at 2% of fp32)" in warning[0]
    meta = json.loads((tmp_path / "out" / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["precision"]["chosen"] == "bf16" and meta["precision"]["requested"] == "bf16"


@pytest.mark.parametrize("rates, chosen, peak", [("fp32:55,bf16:1.1,fp16:0.6", "fp32", "55 GFLOP/s in fp32"),
                                                 ("fp32:200,bf16:420,fp16:3.4", "bf16", "420 GFLOP/s in bf16")])
def test_auto_precision_is_measured_said_and_saved(tmp_path, capsys, monkeypatch, rates, chosen, peak):
    monkeypatch.setenv("PROTLM_CPU_MATMUL_GFLOPS", rates)
    path = write_config(tmp_path, tmp_path / "out", run={"steps": 2, "precision": "auto"}, eval={"every": 0},
                        checkpoint={"every": 2, "export": False})
    trainer = Trainer(load_config(path))
    assert trainer.precision.name == chosen
    trainer.run()
    err = capsys.readouterr().err
    first = [line for line in err.splitlines() if "precision" in line]
    assert first and first[0].startswith(f"protlm pretrain: precision auto -> {chosen} (bf16 matmul runs ")
    assert "warning" not in err
    assert f"MFU peak {peak} (measured {chosen} matmul on " in err  # the dtype in use, never 0.00
    meta = json.loads((tmp_path / "out" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["precision"]["requested"] == "auto" and meta["precision"]["chosen"] == chosen
    assert "on this CPU" in meta["precision"]["reason"]


def test_adamw_cosine_run(tmp_path):
    path = write_config(tmp_path, tmp_path / "out", run={"steps": 4}, eval={"every": 0},
                        optim={"name": "adamw", "schedule": "cosine", "lr": 3e-3, "warmup_steps": 2,
                               "weight_decay": 0.1, "grad_clip": 1.0},
                        checkpoint={"every": 100, "export": False})
    Trainer(load_config(path)).run()
    records = [r for r in read_metrics(tmp_path / "out") if "train/lr" in r]
    assert [r["train/lr"] for r in records][:2] == pytest.approx([1.5e-3, 3e-3])
    assert all(math.isfinite(r["train/grad_norm"]) for r in records)


def test_cli_pretrain(tmp_path, capsys):
    from protlm.cli.main import main

    path = write_config(tmp_path, tmp_path / "out", run={"steps": 2}, eval={"every": 0},
                        checkpoint={"every": 2, "export": False})
    assert main(["pretrain", "--config", path, "--set", "run.steps=1"]) == 0
    assert "done: step 1" in capsys.readouterr().out
    assert main(["pretrain", "--config", path, "--set", "optim.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "protlm pretrain: error: --set: optim.lr must be float, got 'fast'"


def test_time_limit_stops_with_checkpoint_and_export(tmp_path):
    path = write_config(tmp_path, tmp_path / "out", run={"steps": 1000, "time_limit_minutes": 1e-6},
                        eval={"every": 500}, checkpoint={"every": 500})
    result = Trainer(load_config(path)).run()
    assert result.step == 1
    assert os.listdir(tmp_path / "out" / "checkpoints") == ["step_00000001"]
    assert val_losses(tmp_path / "out") and os.path.exists(os.path.join(result.final_dir, "model.safetensors"))


@pytest.mark.parametrize("change,message", [
    ({"data": {"train": ["/nonexistent/uniref50.fasta"]}}, r"/nonexistent/uniref50\.fasta"),
    ({"data": {"validation": ["EMPTY"]}}, r"empty\.fasta"),
    ({"data": {"max_length": 512}, "objective": {"mask_rates": [0.15, 0.5]}}, r"needs up to \d+ sentinels, but the tokenizer has 225"),
    ({"model": {"preset": "tiny", "overrides": {"d_modle": 64}}}, r"model: .*unknown config key 'd_modle'"),
    ({"run": {"precision": "fp64"}}, r"recipe\.yaml: run\.precision must be one of auto, fp32, bf16; got 'fp64'"),
    ({"run": {"precision": "int8"}}, r"run\.precision: int8 is for CPU inference \(embedding\) only, not for training"),
    ({"run": {"precision": "fp16"}}, r"run\.precision: fp16 training needs loss scaling"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, change, message):
    from protlm.cli.main import main

    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    for section in change.values():
        for key, value in section.items():
            if value == ["EMPTY"]:
                section[key] = [str(empty)]
    path = write_config(tmp_path, tmp_path / "out", **change)
    assert main(["pretrain", "--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("protlm pretrain: error: ") and "\n" not in err
    assert __import__("re").search(message, err), err
