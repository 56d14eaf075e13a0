import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import protlm
from protlm.convert import load, read_weights, save_pretrained
from protlm.errors import CheckpointError
from protlm.model import T5
from protlm.tokenizer import protlm_tokenizer
from tests.conftest import odd_config


def _saved(tmp_path, cfg=None, encoder_only=False):
    cfg = cfg or odd_config()
    model = T5(cfg, encoder_only=encoder_only).eval()
    save_pretrained(model, tmp_path, protlm_tokenizer())
    return model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path):
    model = _saved(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    pre = load(tmp_path)
    assert _same(pre.model, model) and pre.config == model.config
    assert pre.tokenizer.vocab == protlm_tokenizer().vocab
    ids = torch.tensor([[3, 24, 18, 7, 1]])
    with torch.no_grad():
        assert torch.equal(pre.model.encode(ids).last_hidden_state, model.encode(ids).last_hidden_state)


def test_tied_round_trip_and_alias_keys(tmp_path):
    model = _saved(tmp_path, odd_config("relu", tied=True))
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in keys and "encoder.embed_tokens.weight" not in keys
    pre = load(tmp_path)
    assert pre.model.lm_head.weight is pre.model.shared.weight
    assert _same(pre.model, model)
    # files that also store the tied copies (as older exports do) load too
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
    save_file(state, tmp_path / "model.safetensors")
    assert _same(load(tmp_path).model, model)


def test_encoder_only(tmp_path):
    model = _saved(tmp_path, encoder_only=True)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["architectures"] == ["T5EncoderModel"]
    pre = load(tmp_path)
    assert pre.model.encoder_only and pre.model.decoder is None and _same(pre.model, model)
    with pytest.raises(protlm.ConfigError, match="encoder-only"):
        pre.model.new_cache()


def test_encoder_only_from_full_checkpoint(tmp_path):
    model = _saved(tmp_path)
    pre = load(tmp_path, encoder_only=True)
    assert pre.model.decoder is None
    assert torch.equal(pre.model.encoder.block[1].layer[1].DenseReluDense.wo.weight,
                       model.encoder.block[1].layer[1].DenseReluDense.wo.weight)


def test_missing_tensor_is_named(tmp_path):
    _saved(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0\.weight"):
        load(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _saved(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.block.9.layer.0.SelfAttention.q.weight"] = torch.zeros(36, 40)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) encoder\.block\.9\.layer\.0\.SelfAttention\.q\.weight"):
        load(tmp_path)


def test_vocab_size_mismatch(tmp_path):
    _saved(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["vocab_size"] = 300
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="shared.weight has 256 rows but config vocab_size is 300"):
        load(tmp_path)


def test_misshaped_tensor(tmp_path):
    _saved(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["d_ff"] = 38
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"tensor encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight has shape \(37, 40\), config implies \(38, 40\)"):
        load(tmp_path)


def test_unknown_ffn_in_config(tmp_path):
    _saved(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["feed_forward_proj"] = "gated-swish"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(protlm.ConfigError, match="feed_forward_proj='gated-swish' is not supported"):
        load(tmp_path)


def test_truncated_safetensors(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
        load(tmp_path)


def test_pytorch_bin_and_sharded_index(tmp_path):
    model = T5(odd_config()).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = tmp_path / "bin", tmp_path / "sharded"
    for d in (a, b):
        d.mkdir()
        model.config.save_json(d / "config.json")
        protlm_tokenizer().save(d)
    torch.save(state, a / "pytorch_model.bin")
    assert _same(load(a).model, model)
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k].contiguous() for k in keys[:half] if k != "lm_head.weight"}, b / "part-1.safetensors")
    save_file({k: state[k].contiguous() for k in keys[half:]}, b / "part-2.safetensors")
    index = {"weight_map": {**{k: "part-1.safetensors" for k in keys[:half]}, **{k: "part-2.safetensors" for k in keys[half:]}}}
    (b / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _same(load(b).model, model)
    os.unlink(b / "part-2.safetensors")
    with pytest.raises(CheckpointError, match="shard part-2.safetensors is listed but missing"):
        read_weights(str(b))


def test_no_weights_and_not_a_directory(tmp_path):
    odd_config().save_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights found"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load(str(tmp_path / "nope" / "deeper" / "x"))


def test_missing_vocabulary_is_not_guessed(tmp_path):
    model = T5(odd_config(vocab_size=144, protlm_family="ankh")).eval()
    save_pretrained(model, tmp_path)
    with pytest.raises(CheckpointError, match="will not guess the ids"):
        load(tmp_path)


def test_dtype_on_load(tmp_path):
    _saved(tmp_path)
    pre = load(tmp_path, dtype=torch.bfloat16)
    assert pre.model.shared.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tied_in_transformers4", [True, False])
def test_transformers5_head_settings_load_and_save_for_both_versions(tmp_path, tied_in_transformers4):
    """transformers 5 ties every T5 head and keeps the d_model**-0.5 rescale in scale_decoder_outputs, so a T5 v1.1
    built with it is tied *without* the rescale and its file has no lm_head.weight. protlm loads it, computes the
    same logits, and writes a config that transformers reads back to the same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=256, d_model=20, d_kv=6, d_ff=37, num_layers=2, num_decoder_layers=1,
                                num_heads=3, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=tied_in_transformers4)
    torch.manual_seed(0)
    theirs = transformers.T5ForConditionalGeneration(cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as fh:
        written = json.load(fh)
    ids, dec = torch.tensor([[7, 8, 9, 30, 1]]), torch.tensor([[0, 7, 8, 9]])
    with torch.no_grad():
        ref = theirs(input_ids=ids, decoder_input_ids=dec).logits
    pre = load(tmp_path / "hf")
    assert pre.config.rescale_head == written.get("scale_decoder_outputs", written["tie_word_embeddings"])
    assert pre.config.rescale_head == tied_in_transformers4
    with torch.no_grad():
        assert (pre.model(ids, decoder_input_ids=dec).logits - ref).abs().max() <= 1e-5
    save_pretrained(pre.model, tmp_path / "ours", pre.tokenizer)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(input_ids=ids, decoder_input_ids=dec).logits - ref).abs().max() <= 1e-5
    with open(tmp_path / "ours" / "config.json") as fh:
        ours = json.load(fh)
    # what transformers 4.x reads: tie_word_embeddings alone says tied-and-rescaled, or neither (with lm_head stored)
    assert ours["tie_word_embeddings"] == ours["scale_decoder_outputs"] == tied_in_transformers4
    again = load(tmp_path / "ours")
    with torch.no_grad():
        assert (again.model(ids, decoder_input_ids=dec).logits - ref).abs().max() <= 1e-5


def test_untied_head_with_rescale_is_refused():
    from protlm.config import T5Config
    from protlm.errors import ConfigError

    with pytest.raises(ConfigError, match="scale_decoder_outputs=true needs tie_word_embeddings=true"):
        T5Config(tie_word_embeddings=False, scale_decoder_outputs=True)
