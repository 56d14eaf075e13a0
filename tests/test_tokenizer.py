import json

import numpy as np
import pytest

from protlm.errors import CheckpointError, InputError
from protlm.tokenizer import ankh3_vocab, load_tokenizer, protlm_tokenizer
from protlm.tokenizer.vocab import RESIDUES, STANDARD


def test_ankh3_layout():
    vocab = ankh3_vocab()
    assert len(vocab) == 256
    assert (vocab["<pad>"], vocab["</s>"], vocab["<unk>"]) == (0, 1, 2)
    assert [vocab[a] for a in "LAGSVERTIDPKNFQYHMCW"] == list(range(7, 27))
    assert vocab["[NLU]"] == 3 and vocab["[S2S]"] == 4
    sentinels = [t for t in vocab if t.startswith("<extra_id_")]
    assert len(sentinels) == 225 and vocab["<extra_id_0>"] == 255 and vocab["<extra_id_224>"] == 31


def test_encode_decode_and_prefix():
    tok = protlm_tokenizer()
    ids = tok.encode("mkLA", prefix="nlu")
    assert ids == [3, 24, 18, 7, 8, 1]
    assert tok.encode("LA", prefix="[S2S]", add_eos=False) == [4, 7, 8]
    assert tok.decode(ids) == "MKLA"
    assert tok.decode(ids, keep_special=True) == "[NLU]MKLA</s>"


def test_batch_encode_pads_and_masks():
    tok = protlm_tokenizer()
    b = tok.batch_encode(["MKT", "A"], prefix="nlu")
    assert b.input_ids.tolist() == [[3, 24, 18, 14, 1], [3, 8, 1, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b.lengths == [3, 1] and b.n_prefix == 1


def test_unknown_residue_policies():
    tok = protlm_tokenizer()
    with pytest.raises(InputError, match=r"sp\|P1: unknown residue 'J' at position 3"):
        tok.residue_array("MKJL", record="sp|P1")
    assert tok.residue_array("MKJL", unknown="x").tolist() == [24, 18, 6, 7]
    assert tok.residue_array("MKJL", unknown="unk").tolist() == [24, 18, 2, 7]
    assert tok.residue_array("MKJL", unknown="skip").tolist() == [24, 18, 7]
    with pytest.raises(InputError, match="r1: empty sequence"):
        tok.encode("", record="r1")
    with pytest.raises(InputError, match="non-ASCII character 'é' at position 2"):
        tok.encode("Mé")
    with pytest.raises(InputError, match="prefix 'nlg2'"):
        tok.encode("MK", prefix="nlg2")


def _ankh_like_tokenizer_json(path, order):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for aa in order:
        vocab[aa] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.save(str(path))
    return vocab


def test_reads_ids_from_tokenizer_json(tmp_path):
    # A vocabulary numbered differently from protlm's: the ids must come from the file.
    order = "ALGVESIKRDTPNQFYMHCWXBUZO"
    vocab = _ankh_like_tokenizer_json(tmp_path / "tokenizer.json", order)
    tok = load_tokenizer(tmp_path, family="ankh")
    assert tok.encode("MKA") == [vocab["M"], vocab["K"], vocab["A"], 1]
    assert tok.prefix_ids == {}
    with pytest.raises(InputError):
        tok.encode("MK", prefix="nlu")


def test_protlm_tokenizer_json_round_trip(tmp_path):
    tok = protlm_tokenizer()
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path, family="ankh3")
    assert again.vocab == tok.vocab
    assert again.encode("MKTAYIAKQR", prefix="s2s") == tok.encode("MKTAYIAKQR", prefix="s2s")
    # the file is a real tokenizers file: the library itself encodes residues to the same ids
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode("MKTA").ids == tok.encode("MKTA")


def test_prot_t5_convention_with_spiece(tmp_path):
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(list(STANDARD + "X"), size=40)) for _ in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spiece"), model_type="word",
        vocab_size=30, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
        user_defined_symbols=[f"<extra_id_{i}>" for i in range(3)],
    )
    tok = load_tokenizer(tmp_path, family="prot-t5")
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    # ProtT5 spells residues as space-separated words and rare residues as X
    expected = proc.encode("M K T X") + [1]
    assert tok.encode("MKTU") == expected
    assert tok.encode("M K T U") == expected
    assert len(tok.sentinel_ids) == 3


def test_vocabulary_without_residues_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="no token for residue"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)


def test_every_residue_has_an_id():
    tok = protlm_tokenizer()
    arr = tok.residue_array(RESIDUES)
    assert len(set(arr.tolist())) == len(RESIDUES)
