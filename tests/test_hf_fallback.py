"""Any other Hub encoder through transformers' AutoModel (protlm.convert.fallback), on an ALBERT checkpoint built
and saved with transformers (tokenizer files included, ProtAlbert's convention: space-separated residues between
[CLS] and [SEP]): embeddings equal transformers' hidden states, the log marks the fallback, evaluate's config
reading works, and the commands that need blocks refuse it in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import protlm  # noqa: E402
from protlm.convert import load, read_config  # noqa: E402
from protlm.convert.fallback import HFEncoderConfig, wrap_tokenizer  # noqa: E402
from protlm.errors import CheckpointError, ConfigError  # noqa: E402

transformers.logging.set_verbosity_error()

SPECIALS = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
RESIDUES = "LAGVESIKRDTPNQFYMHCWXUBZO"


def _tokenizer(residues: str = RESIDUES):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + list(residues))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def albert(tmp_path_factory):
    """(checkpoint dir, AlbertModel with its weights): odd shapes, weights away from their init."""
    path = tmp_path_factory.mktemp("albert")
    cfg = transformers.AlbertConfig(vocab_size=len(SPECIALS) + len(RESIDUES), embedding_size=12, hidden_size=36,
                                    num_hidden_layers=3, num_attention_heads=3, intermediate_size=37,
                                    max_position_embeddings=40, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AlbertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path, model.albert


def test_embeddings_equal_transformers_hidden_states_and_the_log_says_fallback(albert, capsys):
    path, hf = albert
    pre = load(path)
    assert "loaded through transformers' AutoModel AlbertModel (fallback" in capsys.readouterr().err
    assert pre.model.kind == "hf-encoder" and pre.model.encoder.n_layers == 3 and pre.model.max_residues == 38
    assert isinstance(pre.config, HFEncoderConfig) and pre.config.model_type == "albert"
    seqs = {"a": "MKTAYIAKQRQ", "b": "GSU", "c": "P"}
    tok = _tokenizer()
    for layer in (0, 2, -1):
        got = protlm.embed(pre, seqs, per_residue=True, dtype="fp32", layers=[layer])
        for k, s in seqs.items():
            enc = tok(" ".join(s), return_tensors="pt")
            with torch.no_grad():
                ref = hf(**enc, output_hidden_states=True).hidden_states[layer][0, 1:-1]  # [CLS]/[SEP] dropped
            assert got[k].shape == (len(s), 36)
            assert np.abs(got[k] - ref.numpy()).max() <= 1e-5, (layer, k)


def test_tokens_follow_the_checkpoint(albert):
    pre = load(albert[0])
    tok = _tokenizer()
    for s in ("MKTAYIAKQRQ", "ACDEFGHIKLMNPQRSTVWYXU"):
        assert pre.tokenizer.encode(s) == tok(" ".join(s))["input_ids"]
    assert pre.tokenizer.space_separated and pre.tokenizer.mask_id == tok.mask_token_id


def test_rare_residues_missing_from_the_vocabulary_read_as_x():
    wrapped = wrap_tokenizer(_tokenizer("LAGVESIKRDTPNQFYMHCWX"), "test")
    assert wrapped.encode("AUB") == wrapped.encode("AXX")


def test_a_tokenizer_without_one_token_per_residue_is_refused_in_one_line():
    with pytest.raises(CheckpointError, match="cannot map residues to tokens"):
        wrap_tokenizer(_tokenizer("LAGVESIKRDTPNQFYMHC"), "saprot-like")  # no W


def test_read_config_for_evaluate_and_random_init_refusal(albert):
    config, encoder_only = read_config(str(albert[0]))
    assert isinstance(config, HFEncoderConfig) and encoder_only and config.to_hf_dict()["model_type"] == "albert"
    with pytest.raises(ConfigError, match="random-init twins need a protlm family"):
        load(str(albert[0]), random_init=True)


@pytest.mark.parametrize("argv", [
    ["analyze", "depth", "{m}", "{fasta}", "-o", "{out}"],
    ["infill", "{m}", "--masked", "MK[?]A"],
    ["score", "{m}", "--wildtype", "MKTA", "--variants", "{csv}"],
])
def test_block_level_commands_refuse_in_one_line(albert, tmp_path, capsys, argv):
    from protlm.cli.main import main

    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    (tmp_path / "v.csv").write_text("mutant\nK2R\n")
    args = [a.format(m=albert[0], fasta=fasta, out=tmp_path / "o", csv=tmp_path / "v.csv") for a in argv]
    code = main(args + ["--dtype", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert "needs block-level access" in err[-1] and "BERT (ProtBERT)" in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_without_transformers_the_hint_is_one_line(albert, monkeypatch):
    import protlm.convert.fallback as fb

    monkeypatch.setattr(fb, "_transformers", lambda: None)
    with pytest.raises(ConfigError, match=r"pip install 'protlm\[hf\]'"):
        load(str(albert[0]))


def test_block_access_is_refused_at_library_level(albert):
    pre = load(albert[0])
    with pytest.raises(ConfigError, match="no block-level access"):
        pre.model.encoder.embed(torch.zeros(1, 3, dtype=torch.long))
