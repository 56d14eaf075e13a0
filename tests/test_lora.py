"""LoRA adapters (protlm.finetune.lora) on every family: what trains, exact parameter counts, merging, PEFT's
on-disk format against peft + transformers, the merged export, and one-line errors.

Tiny odd-shaped random-init models (3 heads of width 12, FFN 37, two blocks) in fp32. The adapters' B matrices
are drawn away from peft's zero init, so an adapter that one side ignores changes the outputs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.conftest import odd_config  # noqa: E402
from protlm.config import BertConfig, EsmConfig, GPT2Config  # noqa: E402
from protlm.convert import load, save_pretrained  # noqa: E402
from protlm.errors import ConfigError  # noqa: E402
from protlm.evaluate.bundle import config_hash  # noqa: E402
from protlm.finetune import lora  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
SEQS = ["MKTAYIAKQRQ", "GSLEV", "ACDEFGHIKLMNPQ", "P"]
CONFIGS = {
    "t5": lambda: odd_config(num_layers=2, num_decoder_layers=1),
    "esm": lambda: EsmConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                             max_position_embeddings=40),
    "bert": lambda: BertConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                               max_position_embeddings=40, protlm_family="prot-bert"),
    "gpt2": lambda: GPT2Config(vocab_size=61, n_positions=97, n_embd=36, n_layer=2, n_head=3, n_inner=50),
}
HF_CLASSES = {"t5": "T5ForConditionalGeneration", "esm": "EsmForMaskedLM", "bert": "BertForMaskedLM",
              "gpt2": "GPT2LMHeadModel"}
FAMILY_NAMES = sorted(CONFIGS)


def tiny(family: str, **kw):
    return load(CONFIGS[family]().replace(**kw) if kw else CONFIGS[family](), random_init=True, seed=3)


def batch(pre):
    b = pre.tokenizer.batch_encode(SEQS)
    assert (b.attention_mask == 0).any()
    return b.input_ids, b.attention_mask


@torch.no_grad()
def perturb_b(model, seed: int = 1) -> None:
    """Draw every LoRA B away from zero (peft starts it at zero, where an adapter does nothing)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def outputs(model, ids, mask):
    """What the family's workflows read: T5's encoder output, the MLM logits, GPT-2's next-token logits."""
    h = model.encode(ids, mask).last_hidden_state
    if model.kind == "encoder-decoder":
        return h
    return model.mlm_logits(h) if model.kind == "masked-lm" else model.lm_logits(h)


def hf_outputs(hf, family, ids, mask):
    """The same from transformers (``hf`` may be a PeftModel around it)."""
    if family == "t5":
        base = hf.get_base_model() if isinstance(hf, peft.PeftModel) else hf
        return base.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return hf(input_ids=ids, attention_mask=mask).logits


def max_diff(a, b, mask) -> float:
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def with_adapter(family: str, rank: int = 3, ffn: bool = True):
    pre = tiny(family)
    pre.model.eval()
    lora.add_lora(pre.model, rank=rank, alpha=5, dropout=0.0, targets=lora.resolve_targets(pre.model, None, ffn))
    perturb_b(pre.model)
    return pre


# --- what trains ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_only_lora_parameters_train(family):
    pre = tiny(family)
    base = dict(pre.model.named_parameters())
    lora.add_lora(pre.model, rank=2, alpha=4, dropout=0.1, targets=None)
    assert type(pre.model).__name__ == {"t5": "T5", "esm": "ESM", "bert": "BERT", "gpt2": "GPT2"}[family]
    trainable = {n for n, p in pre.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(lora._lora_layers(pre.model))
    ids, mask = batch(pre)
    pre.model.train()
    outputs(pre.model, ids, mask).square().mean().backward()
    got = {n for n, p in pre.model.named_parameters() if p.grad is not None}
    assert got == trainable
    assert all(p.grad is None for p in base.values())  # the base tensors themselves, whatever their new names
    assert any(p.grad.abs().max() > 0 for n, p in pre.model.named_parameters() if "lora_B" in n)


def test_adapters_of_a_bf16_base_are_fp32():
    pre = tiny("esm")
    lora.add_lora(pre.model.to(torch.bfloat16).eval(), rank=2, alpha=2, targets=None)
    perturb_b(pre.model)
    dtypes = {n: p.dtype for n, p in pre.model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    ids, mask = batch(pre)
    out = outputs(pre.model, ids, mask)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None for n, p in pre.model.named_parameters() if ".lora_" in n)


@pytest.mark.parametrize("family", ["t5", "esm", "gpt2"])
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("ffn", [False, True])
def test_parameter_count_is_exact(family, rank, ffn):
    pre = tiny(family)
    targets = lora.resolve_targets(pre.model, None, ffn)
    expected = lora.expected_lora_parameters(pre.model, rank, targets)
    lora.add_lora(pre.model, rank=rank, alpha=8, targets=targets)
    assert lora.lora_parameter_count(pre.model) == expected
    # by hand: 2 blocks; T5 q/k/v map 40 -> 36 (3 heads of 12) and o back, FFN 40 -> 37 (wi_0, wi_1) and back;
    # ESM 36 -> 36 and FFN 36 -> 37 -> 36; GPT-2 c_attn 36 -> 108, c_proj 36 -> 36, MLP 36 -> 50 -> 36
    attn, ffn_sizes = {"t5": ([76] * 4, [77] * 3), "esm": ([72] * 4, [73, 73]),
                       "gpt2": ([144, 72], [86, 86])}[family]
    assert expected == 2 * rank * (sum(attn) + (sum(ffn_sizes) if ffn else 0))


def test_exact_names_pick_one_projection_and_suffixes_pick_several():
    pre = tiny("esm")
    assert lora.projection_names(pre.model) == ["query", "key", "value", "attention.output.dense",
                                                "intermediate.dense", "output.dense"]
    r = 3
    assert lora.expected_lora_parameters(pre.model, r, ["output.dense"]) == 2 * r * (37 + 36)  # the FFN's only
    assert lora.expected_lora_parameters(pre.model, r, ["dense"]) == 2 * r * (72 + 73 + 73)  # all three
    lora.add_lora(pre.model, rank=r, alpha=r, targets=["output.dense"])
    layers = set(lora._lora_layers(pre.model))
    assert layers == {f"esm.encoder.layer.{i}.output.dense" for i in range(2)}
    assert lora.projection_names(pre.model)[-1] == "output.dense"  # a wrapped projection keeps its name
    t5 = tiny("t5").model
    assert lora.resolve_targets(t5, None, True, family="ankh3") == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    lora.add_lora(t5, rank=2, alpha=2, targets=None)
    assert not any(n.startswith("decoder.") for n in lora._lora_layers(t5))  # the decoder and head stay as they are


# --- merging --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merged_outputs_equal_unmerged(family):
    pre = tiny(family)
    names = set(pre.model.state_dict())
    ids, mask = batch(pre)
    with torch.no_grad():
        plain = outputs(pre.model.eval(), ids, mask)
        lora.add_lora(pre.model, rank=3, alpha=6, dropout=0.2, targets=lora.resolve_targets(pre.model, None, True))
        perturb_b(pre.model)
        adapted = outputs(pre.model.eval(), ids, mask)
        merged = outputs(lora.merge_lora(pre.model), ids, mask)
    assert max_diff(adapted, plain, mask) > 1e-2  # the adapter does something
    assert max_diff(merged, adapted, mask) <= TOL
    assert set(pre.model.state_dict()) == names and not lora._lora_layers(pre.model)
    assert not hasattr(pre.model, "peft_config")


# --- PEFT's format, against peft + transformers ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapter_loads_in_peft_with_the_same_outputs(tmp_path, family):
    pre = tiny(family)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    save_pretrained(pre.model, base_dir, pre.tokenizer)
    hf = getattr(transformers, HF_CLASSES[family]).from_pretrained(base_dir).eval()
    lora.add_lora(pre.model.eval(), rank=3, alpha=5, targets=lora.resolve_targets(pre.model, None, True))
    perturb_b(pre.model)
    lora.save_adapter(pre.model, adapter_dir, base_model=str(base_dir), base_config_hash=config_hash(pre.config))

    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 3 and conf["lora_alpha"] == 5
    assert conf["base_model_name_or_path"] == str(base_dir) and conf["auto_mapping"] is None
    assert conf["fan_in_fan_out"] is (family == "gpt2")
    from safetensors.torch import load_file

    keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    layers = lora._lora_layers(pre.model)
    assert keys == {f"base_model.model.{n}.{ab}.weight" for n in layers for ab in ("lora_A", "lora_B")}
    assert json.loads((adapter_dir / "protlm_adapter.json").read_text())["base_config_hash"] == config_hash(pre.config)

    ids, mask = batch(pre)
    with torch.no_grad():
        base_out = hf_outputs(hf, family, ids, mask)
        theirs_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        theirs = hf_outputs(theirs_model, family, ids, mask)
        ours = outputs(pre.model, ids, mask)
    assert max_diff(theirs, base_out, mask) > 1e-2  # peft applied the adapter
    assert max_diff(ours, theirs, mask) <= TOL

    # and back: an adapter directory peft wrote loads into a fresh protlm model
    theirs_model.save_pretrained(tmp_path / "peft-written")
    assert set(load_file(tmp_path / "peft-written" / "adapter_model.safetensors")) == keys  # peft's names are ours
    fresh = load(base_dir).model.eval()
    lora.load_adapter(fresh, tmp_path / "peft-written", base_config_hash=config_hash(pre.config))
    with torch.no_grad():
        assert max_diff(outputs(fresh, ids, mask), ours, mask) <= TOL
    assert lora.lora_parameter_count(fresh) == lora.lora_parameter_count(pre.model)


@pytest.mark.parametrize("family", ["t5", "esm", "gpt2"])
def test_merged_export_loads_in_protlm_and_transformers(tmp_path, family):
    pre = tiny(family)
    base_dir = save_pretrained(pre.model, tmp_path / "base", pre.tokenizer)
    pre = load(base_dir)  # the base as a checkpoint reads back (a random ESM's family "custom" reads as "esm2")
    lora.add_lora(pre.model.eval(), rank=3, alpha=5, targets=lora.resolve_targets(pre.model, None, True))
    perturb_b(pre.model)
    lora.save_adapter(pre.model, tmp_path / "adapter", base_model=base_dir, base_config_hash=config_hash(pre.config))
    ids, mask = batch(pre)
    with torch.no_grad():
        merged = outputs(lora.merge_lora(pre.model), ids, mask)
    lora.export_merged(base_dir, tmp_path / "adapter", tmp_path / "merged")
    again = load(tmp_path / "merged")
    hf = getattr(transformers, HF_CLASSES[family]).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert max_diff(outputs(again.model, ids, mask), merged, mask) <= TOL
        assert max_diff(hf_outputs(hf, family, ids, mask), merged, mask) <= TOL


def test_lora_state_dict_round_trip_restores_a_kept_epoch():
    pre = with_adapter("esm")
    kept = lora.lora_state_dict(pre.model)
    assert kept and all(".lora_" in k and ".default." not in k for k in kept)
    ids, mask = batch(pre)
    with torch.no_grad():
        before = outputs(pre.model, ids, mask)
        perturb_b(pre.model, seed=9)  # a later epoch moves on; the kept copy does not
        assert max_diff(outputs(pre.model, ids, mask), before, mask) > 1e-2
        lora.load_lora_state_dict(pre.model, kept)
        assert max_diff(outputs(pre.model, ids, mask), before, mask) == 0
    with pytest.raises(ConfigError, match="no tensor for"):
        lora.load_lora_state_dict(pre.model, dict(list(kept.items())[1:]))


# --- bad input ------------------------------------------------------------------------------------------------
def test_unknown_target_lists_the_projection_names():
    model = tiny("t5").model
    with pytest.raises(ConfigError, match=r"query match no projection.*q, k, v, o, wi_0, wi_1, wo$"):
        lora.resolve_targets(model, ["q", "query"], False)
    with pytest.raises(ConfigError, match="lm_head"):
        lora.add_lora(model, rank=2, alpha=2, targets=["lm_head"])  # heads are outside the encoder's blocks
    with pytest.raises(ConfigError, match="does not fit"):
        lora.resolve_targets(model, None, False, family="esm2")


@pytest.mark.parametrize("bad, match", [(dict(rank=0), "lora_rank"), (dict(rank=2.0), "lora_rank"),
                                        (dict(alpha=0), "lora_alpha"), (dict(dropout=1.0), "lora_dropout"),
                                        (dict(dropout=-0.1), "lora_dropout")])
def test_bad_settings_are_one_line_errors(bad, match):
    model = tiny("esm").model
    with pytest.raises(ConfigError, match=match) as err:
        lora.add_lora(model, **{**dict(rank=2, alpha=4, dropout=0.0, targets=None), **bad})
    assert "\n" not in str(err.value)
    assert not lora._lora_layers(model)


def test_adapter_for_another_base_is_refused(tmp_path):
    pre = with_adapter("esm")
    lora.save_adapter(pre.model, tmp_path / "a", base_model="base", base_config_hash=config_hash(pre.config))
    other = tiny("esm", hidden_size=48)
    with pytest.raises(ConfigError, match=r"/a: the adapter was trained on another base model \(config hash"):
        lora.load_adapter(other.model, tmp_path / "a", base_config_hash=config_hash(other.config))
    wider = tiny("esm", hidden_size=48).model
    names = set(wider.state_dict())
    with pytest.raises(ConfigError, match=r"lora_A.weight has shape \(3, 36\), the model's adapter has \(3, 48\)"):
        lora.load_adapter(wider, tmp_path / "a")  # no hash given: the shapes differ
    assert set(wider.state_dict()) == names  # the failed load took its layers out again
    with pytest.raises(ConfigError, match=r"/a: .*not found in the base model"):
        lora.load_adapter(tiny("t5").model, tmp_path / "a")  # ESM's module names, not T5's
    with pytest.raises(ConfigError, match="already holds LoRA layers"):
        lora.load_adapter(pre.model, tmp_path / "a")


def test_corrupt_or_missing_adapter_files(tmp_path):
    pre = with_adapter("t5")
    directory = lora.save_adapter(pre.model, tmp_path / "a")
    weights = os.path.join(directory, "adapter_model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ConfigError, match=r"adapter_model.safetensors: cannot read the adapter tensors"):
        lora.load_adapter(tiny("t5").model, directory)
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        fh.write("{ not json")
    with pytest.raises(ConfigError, match="adapter_config.json: not valid JSON"):
        lora.load_adapter(tiny("t5").model, directory)
    os.remove(weights)
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        lora.load_adapter(tiny("t5").model, directory)
    with pytest.raises(ConfigError, match="no such adapter directory"):
        lora.load_adapter(tiny("t5").model, tmp_path / "missing")
    with pytest.raises(ConfigError, match="no LoRA adapter to save"):
        lora.save_adapter(tiny("t5").model, tmp_path / "b")
