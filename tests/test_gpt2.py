"""GPT-2 (ProtGPT2's architecture) against transformers: layer-by-layer parity on padded batches, checkpoint
round trips both ways, greedy generation, config.json defaults, the BPE tokenizer's residue map, and one-line
errors for bad input.

Checkpoints are built by transformers (``GPT2LMHeadModel.save_pretrained``) with a byte-level BPE trained by the
``tokenizers`` library on protein text in ProtGPT2's convention, saved as tokenizer.json and as
vocab.json + merges.txt. Tiny odd-shaped configs (3 heads of width 12, MLP 50) with random weights in fp32: every
parameter is drawn away from its init, so a parameter read under the wrong name, or transposed (Conv1D stores
(in, out)), changes the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from protlm.config import HF_GPT2_DEFAULTS, GPT2Config, config_from_hf_dict, preset  # noqa: E402
from protlm.convert import load, save_pretrained  # noqa: E402
from protlm.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from protlm.model.gpt2 import GPT2  # noqa: E402
from protlm.tokenizer.bpe import EOT, BPETokenizer, load_bpe_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-5
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSLEV", "ACDEFGHIKLMNPQRSTVWY" * 4 + "MKV", "P"]
CORPUS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHM",
          "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTLTYGVQCFSRYPDHMKQHDFFKSAMPEGYVQER",
          "MALWMRLLPLLALLALWGPDPAAAFVNQHLCGSHLVEALYLVCGERGFFYTPKTRREAEDLQVGQVELGGGPGAGSLQPLALEGSLQKRGIVEQCC"]


def tiny(**kw) -> GPT2Config:
    base = dict(vocab_size=61, n_positions=97, n_embd=36, n_layer=3, n_head=3, n_inner=50)
    return GPT2Config(**{**base, **kw})


def train_bpe(vocab_size: int = 61):
    """A byte-level BPE trained on protein text written as ProtGPT2 reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    texts = [EOT + "\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n" for s in CORPUS * 3]
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False))
    assert hf.get_vocab_size() == vocab_size and hf.token_to_id(EOT) == 0
    return hf


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("ln_" in name) and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.1))


def hf_config(cfg: GPT2Config):
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "protlm_family"}
    return transformers.GPT2Config(**d, attn_implementation="eager")


def hf_checkpoint(path, cfg: GPT2Config, split_vocab: bool = False):
    """A transformers-saved GPT2LMHeadModel directory with its tokenizer files; returns the transformers model."""
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(hf_config(cfg)).eval()
    scramble(ref)
    ref.save_pretrained(path)
    hf = train_bpe(cfg.vocab_size)
    if split_vocab:
        hf.model.save(str(path))  # vocab.json + merges.txt
    else:
        hf.save(os.path.join(path, "tokenizer.json"))
    return ref


def batch(tok: BPETokenizer):
    b = tok.batch_encode(SEQS)
    assert (b.attention_mask == 0).any()
    return b.input_ids, b.attention_mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    ref = hf_checkpoint(path, tiny())
    return path, ref


def test_layers_and_logits_match_transformers_on_a_padded_batch(checkpoint):
    path, ref = checkpoint
    pre = load(path)
    assert isinstance(pre.model, GPT2) and pre.model.kind == "causal-lm"
    ids, mask = batch(pre.tokenizer)
    with torch.no_grad():
        out = pre.model.encode(ids, mask, output_layers="all")
        logits = pre.model.lm_logits(out.last_hidden_state)
        theirs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert len(theirs.hidden_states) == len(out.hidden_states) == 4
    for layer, h in out.hidden_states.items():
        diff = (h - theirs.hidden_states[layer])[real].abs().max().item()
        assert diff <= TOL, (layer, diff)
    assert (logits - theirs.logits)[real].abs().max().item() <= TOL
    assert logits[real].abs().max() > 1  # the comparison is not between near-zero tensors


def test_left_padding_sees_the_positions_of_an_unpadded_row(checkpoint):
    """A left-padded row (how batched generation pads) gives the outputs of the same row alone."""
    path, _ = checkpoint
    pre = load(path)
    short, long = (pre.tokenizer.encode(s) for s in ("GSLEV", "MKTAYIAKQRQ"))
    pad = len(long) - len(short)
    ids = torch.tensor([[pre.tokenizer.pad_id] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    with torch.no_grad():
        batched = pre.model(ids, mask)
        alone = pre.model(torch.tensor([short]))
    assert (batched[0, pad:] - alone[0]).abs().max() <= TOL


def test_vocab_json_and_merges_read_like_tokenizer_json(tmp_path, checkpoint):
    path, _ = checkpoint
    split = tmp_path / "split"
    hf_checkpoint(split, tiny(), split_vocab=True)
    assert not (split / "tokenizer.json").exists()
    a, b = load_bpe_tokenizer(path), load_bpe_tokenizer(split)
    for s in SEQS:
        assert a.encode(s) == b.encode(s)
    os.remove(split / "merges.txt")
    with pytest.raises(CheckpointError, match="no merges.txt"):
        load(split)


def test_residue_map_points_at_the_token_holding_each_residue(checkpoint):
    tok = load_bpe_tokenizer(checkpoint[0])
    seq = CORPUS[1][:75] + "W"  # two lines; the trained merges join its residues
    ids, index = tok.encode_residues(tok.residue_array(seq))
    assert len(index) == len(seq) and (np.diff(index) >= 0).all()
    assert len(ids) < len(seq)  # the trained merges join residues: the map is not the identity
    pieces = [tok.hf.decode([int(i)], skip_special_tokens=False) for i in ids]
    assert pieces[0] == EOT and pieces[-1] == EOT and "".join(pieces[1:-1]).count("\n") == 3  # after EOT and each line
    for j, t in enumerate(index):  # residue j lies inside the text of its token
        assert seq[j] in pieces[t]
    assert tok.decode(ids) == seq


def test_save_then_transformers_load_gives_the_same_outputs(tmp_path):
    pre = load(tiny(activation_function="gelu_new"), random_init=True)
    scramble(pre.model, seed=3)
    save_pretrained(pre.model, tmp_path, pre.tokenizer)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids, mask = batch(pre.tokenizer)
    with torch.no_grad():
        ours, theirs = pre.model(ids, mask), ref(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max() <= TOL
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert fast(pre.tokenizer.text("MKVL"))["input_ids"] == pre.tokenizer.encode("MKVL")
    again = load(tmp_path)  # and back
    with torch.no_grad():
        assert torch.equal(again.model(ids, mask), ours)


def test_older_files_with_mask_buffers_and_a_stored_head_load(tmp_path, checkpoint):
    path, ref = checkpoint
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(path, "model.safetensors"))
    n = tiny().n_positions
    for i in range(tiny().n_layer):  # what transformers 4.2x wrote per layer
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, os.path.join(old, "model.safetensors"))
    for name in ("config.json", "tokenizer.json"):
        (old / name).write_text((path / name).read_text())
    ids, mask = batch(load(path).tokenizer)
    with torch.no_grad():
        assert torch.equal(load(old).model(ids, mask), load(path).model(ids, mask))


def test_greedy_generation_matches_transformers_generate(checkpoint):
    from protlm.generation.causal import generate_tokens

    path, ref = checkpoint
    pre = load(path)
    prompts = ["MKTAYIAK", "GS"]
    new = 12
    ours = generate_tokens(pre.model, pre.tokenizer, prompts, max_new_tokens=new, greedy=True, restrict=False,
                           stop_at_eos=False)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([pre.tokenizer.encode(prompt, add_eos=False)])
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == theirs[0, ids.shape[1]:].tolist()


def test_config_defaults_match_transformers():
    hf = transformers.GPT2Config()
    for key, value in HF_GPT2_DEFAULTS.items():
        assert getattr(hf, key) == value, key
    cfg = config_from_hf_dict({"model_type": "gpt2", "n_layer": 2}, "config.json")
    assert isinstance(cfg, GPT2Config) and cfg.n_embd == hf.n_embd and cfg.eos_token_id == hf.eos_token_id


def test_protgpt2_preset_shape_and_family():
    cfg = preset("protgpt2")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_positions) == (36, 1280, 20, 50257, 1024)
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2(cfg).parameters())
    # GPT-2 large's shape and count (774M with the tied head); the card's "738 million" does not follow from the
    # layers, width and vocabulary it states, so the count is checked against the shape, not the card
    expected = 50257 * 1280 + 1024 * 1280 + 36 * (12 * 1280 ** 2 + 13 * 1280) + 2 * 1280
    assert n == expected
    data = {"model_type": "gpt2", "n_layer": 36, "n_embd": 1280, "n_head": 20}
    assert config_from_hf_dict(data, "c").protlm_family == "protgpt2"


def test_bad_input_is_one_line(tmp_path, checkpoint):
    with pytest.raises(ConfigError, match="add_cross_attention"):
        config_from_hf_dict({"model_type": "gpt2", "add_cross_attention": True}, "config.json")
    with pytest.raises(ConfigError, match="not a multiple"):
        tiny(n_head=5)
    pre = load(checkpoint[0])
    too_long = torch.zeros((1, tiny().n_positions + 1), dtype=torch.long)
    with pytest.raises(InputError, match="97 learned positions"):
        pre.model(too_long)
    with pytest.raises(InputError, match="unknown residue 'J' at position 3"):
        pre.tokenizer.encode("MKJ", record="p1")
    empty = tmp_path / "notok"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2", **dataclasses.asdict(tiny())}))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load(empty)


# --- workflows -------------------------------------------------------------------------------------------------
def test_embed_gives_each_residue_its_tokens_vector_and_means_over_residues(checkpoint):
    from protlm.embedding.run import embed

    pre = load(checkpoint[0])
    seqs = {"a": CORPUS[1][:75], "b": "GSLEV"}
    per_res = embed(pre, seqs, per_residue=True, dtype="fp32")
    per_prot = embed(pre, seqs, dtype="fp32")
    for oid, seq in seqs.items():
        ids, index = pre.tokenizer.encode_residues(pre.tokenizer.residue_array(seq))
        with torch.no_grad():
            h = pre.model.encode(torch.as_tensor(ids)[None]).last_hidden_state[0].numpy()
        assert per_res[oid].shape == (len(seq), tiny().n_embd)
        np.testing.assert_allclose(per_res[oid], h[index], atol=1e-5)
        np.testing.assert_allclose(per_prot[oid], h[index].mean(0), atol=1e-5)
    assert len(set(map(tuple, per_res["a"][:, :3].round(5)))) < 75  # tokens of several residues repeat rows


def test_embed_windows_long_proteins_and_refuses_a_window_beyond_the_positions(checkpoint):
    from protlm.embedding.run import embed

    pre = load(checkpoint[0])
    long = (CORPUS[0] * 2)[:150]  # > max_residues (91 for 97 positions)
    assert len(long) > pre.model.max_residues
    out = embed(pre, {"p": long}, per_residue=True, dtype="fp32")
    assert out["p"].shape == (150, tiny().n_embd) and np.isfinite(out["p"]).all()
    with pytest.raises(ConfigError, match=f"limit of {pre.model.max_residues} residues"):
        embed(pre, {"p": long}, per_residue=True, dtype="fp32", window=pre.model.max_residues + 1)


def test_scores_are_log_likelihoods_and_their_ratios(checkpoint):
    from protlm.generation import pseudo_log_likelihood, score_variants

    path, ref = checkpoint
    pre = load(path)
    wt = CORPUS[2][:40]
    seqs = [wt, "GSLEV", CORPUS[0][:70]]
    ll = pseudo_log_likelihood(pre, seqs, token_budget=64)  # small budget: several batches
    for seq, got in zip(seqs, ll):  # transformers' own numbers, one sequence at a time
        ids = torch.tensor([pre.tokenizer.encode(seq)])
        with torch.no_grad():
            logp = ref(input_ids=ids).logits[0, :-1].log_softmax(-1)
        assert abs(got - logp.gather(1, ids[0, 1:, None]).sum().item()) < 1e-4
    assert wt.startswith("MAL")
    scores = score_variants(pre, wt, ["M1A", "M1A:L3W", "WT"])
    mutant = "A" + wt[1:]
    assert scores[0] == pytest.approx(pseudo_log_likelihood(pre, [mutant])[0] - ll[0], abs=1e-9)
    assert scores[2] == 0.0
    with pytest.raises(ConfigError, match="does not apply to causal-lm"):
        score_variants(pre, wt, ["M1A"], strategy="masked-marginal")
    with pytest.raises(InputError, match="above the model's 97 positions"):
        pseudo_log_likelihood(pre, [CORPUS[0] * 2])


@pytest.mark.slow
def test_cli_score_embed_and_generate_end_to_end(tmp_path, checkpoint):
    from protlm.cli.main import main

    path = str(checkpoint[0])
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\n" + CORPUS[1][:70] + "\n>b\nGSLEV\n")
    assert main(["score", path, "--pll", "--input", str(fasta), "-o", str(tmp_path / "pll.csv")]) == 0
    rows = (tmp_path / "pll.csv").read_text().splitlines()
    assert rows[0] == "id,length,pll,pll_per_residue" and len(rows) == 3
    variants = tmp_path / "v.csv"
    variants.write_text("mutant\nM1A\nS2G\n")
    assert main(["score", path, "--wildtype", CORPUS[1][:50], "--variants", str(variants),
                 "-o", str(tmp_path / "v_out.csv")]) == 0
    assert json.loads((tmp_path / "v_out.csv.json").read_text())["method"] == "llr"
    out = tmp_path / "gen.fasta"
    assert main(["generate", path, "--prefix", "MKT", "--num", "2", "--max-new-tokens", "8", "--top-k", "20",
                 "--top-p", "0.9", "--temperature", "0.8", "--repetition-penalty", "1.2", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count(">") == 2 and "repetition_penalty=1.2" in text
    for line in text.splitlines():
        if not line.startswith(">"):
            assert set(line) <= set("LAGSVERTIDPKNFQYHMCWXUZOB")
    assert main(["embed", path, str(fasta), "--per-protein", str(tmp_path / "e.h5"), "--no-progress"]) == 0
    import h5py

    with h5py.File(tmp_path / "e.h5") as fh:
        assert fh.attrs["model_type"] == "gpt2" and len(fh) == 2


def test_sampling_pieces_match_transformers_and_the_cache_changes_nothing(checkpoint):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from protlm.generation import generate
    from protlm.generation.causal import apply_repetition_penalty

    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 61, generator=g), torch.randint(0, 61, (3, 9), generator=g)
    seen = torch.zeros(3, 61, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), expected)

    pre = load(checkpoint[0])
    opts = dict(num_return=3, max_new_tokens=10, top_k=15, top_p=0.9, temperature=0.9, repetition_penalty=1.2, seed=4)
    cached = generate(pre, ["MKT", "GSLEVQ"], **opts)
    uncached = generate(pre, ["MKT", "GSLEVQ"], use_cache=False, batch_size=2, **opts)
    assert [c.continuation for c in cached] == [c.continuation for c in uncached]
    assert len({c.continuation for c in cached}) > 1  # samples differ
    for c in cached:
        assert set(c.continuation) <= set("LAGSVERTIDPKNFQYHMCW")
    with pytest.raises(ConfigError, match="beam search is not implemented for causal LMs"):
        generate(pre, ["MKT"], strategy="beam", num_beams=2)
    with pytest.raises(InputError, match="exceed the model's 97 positions"):
        generate(pre, [CORPUS[0][:80]], max_new_tokens=40)


def test_commands_without_a_causal_lm_path_refuse_in_one_line(tmp_path, checkpoint):
    from protlm.analysis.depth import DepthOptions, resolve_plan
    from protlm.cli.info import describe
    from protlm.generation import infill

    pre = load(checkpoint[0])
    with pytest.raises(ConfigError, match="cannot fill positions"):
        infill(pre, "MK??A")
    assert resolve_plan(pre.model, DepthOptions(max_length=40)).output == "next-token"  # see test_analysis_gpt2
    rows = dict(describe(pre))
    assert "heads=3x12" in rows["shape"] and "<|endoftext|> 0" in rows["vocabulary"]
