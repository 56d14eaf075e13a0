import json

import pytest
import torch

import protlm
from protlm.config import PRESET_NAMES, T5Config, preset
from protlm.errors import ConfigError
from protlm.model import T5


def _param_counts(cfg):
    with torch.device("meta"):
        model = T5(cfg)
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
    return enc, dec, sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize(
    "name, encoder, decoder, total",
    [
        # Ankh3 paper, Table 2. The paper counts the input embedding with the encoder and the LM head with the
        # decoder, so both are added to the stacks' own parameters here.
        ("ankh3-large", 1_151_879_680, 727_169_536, 1_879_049_216),
        ("ankh3-xl", 3_484_799_488, 2_246_107_648, 5_730_907_136),
    ],
)
def test_ankh3_presets_match_published_parameter_counts(name, encoder, decoder, total):
    enc, dec, tot, model = _param_counts(preset(name))
    emb = model.shared.weight.numel()
    assert enc + emb == encoder
    assert dec + model.lm_head.weight.numel() == decoder
    assert tot == total


def test_published_shapes():
    base = preset("ankh-base")
    assert (base.d_model, base.num_layers, base.n_decoder_layers, base.d_ff, base.num_heads, base.vocab_size) == (768, 48, 24, 3072, 12, 144)
    assert base.feed_forward_proj == "gated-gelu"
    t5 = preset("prot-t5-xl")
    assert (t5.d_model, t5.num_layers, t5.n_decoder_layers, t5.d_ff, t5.num_heads, t5.d_kv) == (1024, 24, 24, 16384, 32, 128)
    assert t5.feed_forward_proj == "relu" and t5.relative_attention_num_buckets == 32 and t5.tie_word_embeddings
    for name in ("ankh2-large", "ankh3-large"):
        c = preset(name)
        assert (c.d_model, c.d_ff, c.num_heads, c.feed_forward_proj) == (1536, 3840, 16, "gated-silu")
    assert preset("ankh3-large").vocab_size == 256
    assert {"debug", "tiny", "small"} <= set(PRESET_NAMES)


def test_config_json_round_trip(tmp_path):
    cfg = preset("tiny", dropout_rate=0.1)
    cfg.save_json(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "t5" and data["architectures"] == ["T5ForConditionalGeneration"]
    assert data["dense_act_fn"] == "silu" and data["is_gated_act"] is True
    assert T5Config.from_json(tmp_path / "config.json") == cfg


def test_reads_published_style_config(tmp_path):
    # the fields of a published Ankh encoder config.json, including keys that do not affect the network
    data = {"_name_or_path": "ElnaggarLab/ankh-base", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
            "d_ff": 3072, "d_kv": 64, "d_model": 768, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
            "dropout_rate": 0.0, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
            "is_encoder_decoder": False, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
            "num_decoder_layers": 0, "num_heads": 12, "num_layers": 48, "output_past": True, "pad_token_id": 0,
            "relative_attention_max_distance": 128, "relative_attention_num_buckets": 64,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.35.2",
            "use_cache": True, "vocab_size": 144}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = T5Config.from_json(tmp_path / "config.json")
    assert cfg.d_model == 768 and cfg.n_decoder_layers == 0 and cfg.feed_forward_proj == "gated-gelu"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"d_modle": 8}, "unknown config key 'd_modle' (did you mean 'd_model'?)"),
        ({"feed_forward_proj": "swiglu"}, "feed_forward_proj='swiglu' is not supported"),
        ({"num_heads": "8"}, "num_heads must be int"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be bool"),
        ({"d_model": 0}, "d_model must be a positive integer"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path, data, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5", **data}))
    with pytest.raises(ConfigError) as err:
        T5Config.from_json(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'ankh4'"):
        preset("ankh4")


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        T5Config.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no such config file"):
        T5Config.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize("data", [
    {},  # every key missing
    {"d_model": 96, "num_layers": 3, "num_heads": 4, "d_kv": 24},  # shape given, numerics and head left out
    # a ProtT5-style file: no tie_word_embeddings, no feed_forward_proj, no dropout_rate
    {"architectures": ["T5WithLMHeadModel"], "d_ff": 160, "d_kv": 16, "d_model": 64, "num_heads": 4,
     "num_layers": 2, "vocab_size": 128, "model_type": "t5"},
])
def test_missing_keys_mean_what_transformers_makes_of_them(tmp_path, data):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", **data}))
    ours = T5Config.from_json(tmp_path / "config.json")
    theirs = transformers.T5Config.from_pretrained(tmp_path)
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon", "initializer_factor",
                 "feed_forward_proj", "pad_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.n_decoder_layers == theirs.num_decoder_layers
    # a missing tie_word_embeddings means a tied and rescaled head (transformers 5 carries the rescale apart)
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.rescale_head == getattr(theirs, "scale_decoder_outputs", theirs.tie_word_embeddings)
    # and a file transformers writes itself reads back the same
    theirs.save_pretrained(tmp_path / "resaved")
    resaved = T5Config.from_json(tmp_path / "resaved" / "config.json")
    assert resaved.rescale_head == ours.rescale_head and resaved.tie_word_embeddings == ours.tie_word_embeddings
    assert resaved.replace(scale_decoder_outputs=None) == ours.replace(num_decoder_layers=ours.n_decoder_layers)


def test_mt5_missing_keys_take_mt5_defaults_and_umt5_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from protlm.config import config_from_hf_dict

    ours = config_from_hf_dict({"model_type": "mt5"}, "config.json")
    theirs = transformers.MT5Config()
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon", "feed_forward_proj",
                 "pad_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert not ours.rescale_head  # mT5 never rescales its head (tied or not)
    with pytest.raises(ConfigError, match="model_type 'umt5' is not supported"):
        config_from_hf_dict({"model_type": "umt5"}, "config.json")
    with pytest.raises(ConfigError, match=r"model_type 'llama' is not supported \(supported: t5, mt5, esm, gpt2"):
        config_from_hf_dict({"model_type": "llama"}, "config.json")
