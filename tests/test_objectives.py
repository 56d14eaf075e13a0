"""Ankh3 objectives: exact outputs on hand-made inputs, invariants on random ones, and the figures of issue 3
on 10,000 real sequences (realised masking fraction per rate, rate draw frequencies, task mix)."""

import math

import numpy as np
import pytest
import torch

from protlm.data.stream import SequenceStream
from protlm.errors import ConfigError
from protlm.objectives import (
    ObjectiveConfig,
    PretrainBatches,
    StepParams,
    TaskMixer,
    collate,
    complete,
    denoise,
    denoise_with_mask,
    noise_mask,
    sentinels_needed,
    step_generator,
)
from protlm.tokenizer.vocab import ankh3_vocab, protlm_tokenizer
from tests.conftest import shared_data

TOK = protlm_tokenizer()
VOCAB = ankh3_vocab()


def ids(*tokens):
    """Token names -> ids; "<3>" is <extra_id_3>, other names are looked up in the vocabulary."""
    out = []
    for t in tokens:
        if t.startswith("<") and t[1:-1].isdigit():
            t = f"<extra_id_{t[1:-1]}>"
        out.append(VOCAB[t])
    return out


def residues(seq):
    return TOK.residue_array(seq)


def mask_of(length, *positions):
    m = np.zeros(length, dtype=bool)
    m[list(positions)] = True
    return m


# --- exact outputs on hand-made inputs -----------------------------------------------------------------------
def test_one_gram_each_masked_residue_gets_its_own_sentinel():
    ex = denoise_with_mask(residues("MKTAYI"), mask_of(6, 1, 3), TOK)
    assert ex.task == "denoise"
    assert ex.input_ids.tolist() == ids("[NLU]", "M", "<0>", "T", "<1>", "Y", "I", "</s>")
    assert ex.labels.tolist() == ids("<0>", "K", "<1>", "A", "</s>")
    # adjacent masked residues still get one sentinel each
    ex = denoise_with_mask(residues("MKTAYI"), mask_of(6, 1, 2, 4), TOK)
    assert ex.input_ids.tolist() == ids("[NLU]", "M", "<0>", "<1>", "A", "<2>", "I", "</s>")
    assert ex.labels.tolist() == ids("<0>", "K", "<1>", "T", "<2>", "Y", "</s>")


def test_merge_adjacent_gives_one_sentinel_per_run():
    ex = denoise_with_mask(residues("MKTAYI"), mask_of(6, 1, 2, 4), TOK, one_per_run=True)
    assert ex.input_ids.tolist() == ids("[NLU]", "M", "<0>", "A", "<1>", "I", "</s>")
    assert ex.labels.tolist() == ids("<0>", "K", "T", "<1>", "Y", "</s>")
    # runs at both ends
    ex = denoise_with_mask(residues("MKTAYI"), mask_of(6, 0, 1, 5), TOK, one_per_run=True)
    assert ex.input_ids.tolist() == ids("[NLU]", "<0>", "T", "A", "Y", "<1>", "</s>")
    assert ex.labels.tolist() == ids("<0>", "M", "K", "<1>", "I", "</s>")


def test_completion_split_and_prefix():
    ex = complete(residues("MKTAYIAK"), np.random.default_rng(0), 0.5, TOK)
    assert ex.task == "complete"
    assert ex.input_ids.tolist() == ids("[S2S]", "M", "K", "T", "A", "</s>")
    assert ex.labels.tolist() == ids("Y", "I", "A", "K", "</s>")
    ex = complete(residues("MKTAYIA"), None, 0.5, TOK)  # odd length: the encoder gets floor(L/2)
    assert ex.input_ids.tolist() == ids("[S2S]", "M", "K", "T", "</s>")
    assert ex.labels.tolist() == ids("A", "Y", "I", "A", "</s>")
    # both sides keep at least one residue; a single residue goes to the decoder
    assert complete(residues("MK"), None, 0.1, TOK).labels.tolist() == ids("K", "</s>")
    assert complete(residues("MK"), None, 0.9, TOK).input_ids.tolist() == ids("[S2S]", "M", "</s>")
    one = complete(residues("M"), None, 0.5, TOK)
    assert one.input_ids.tolist() == ids("[S2S]", "</s>") and one.labels.tolist() == ids("M", "</s>")


def test_collate_exact_tensors():
    a = denoise_with_mask(residues("MKT"), mask_of(3, 1), TOK)  # [NLU] M <0> T </s> | <0> K </s>
    b = complete(residues("MKTAY"), None, 0.5, TOK)  # [S2S] M K </s> | T A Y </s>
    batch = collate([a, b], TOK)
    assert batch["input_ids"].tolist() == [ids("[NLU]", "M", "<0>", "T", "</s>"), ids("[S2S]", "M", "K", "</s>") + [0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [ids("<0>", "K", "</s>") + [-100], ids("T", "A", "Y", "</s>")]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["task"].tolist() == [0, 1]
    assert all(t.dtype == torch.long for t in batch.values())


# --- invariants on random inputs -----------------------------------------------------------------------------
def reconstruct(input_ids, labels):
    """Undo denoising: put each sentinel's residues from the target back into the encoder input."""
    sentinels = set(TOK.sentinel_ids)
    fill, current = {}, None
    for t in labels[:-1].tolist():
        if t in sentinels:
            current = t
            fill[t] = []
        else:
            fill[current].append(t)
    out = []
    for t in input_ids[1:-1].tolist():
        out.extend(fill.pop(t) if t in sentinels else [t])
    assert not fill, "a sentinel of the target does not occur in the input"
    return out


@pytest.mark.parametrize("mode", [{}, {"merge_adjacent": True}, {"mean_span": 3.0}])
def test_denoise_is_lossless_and_uses_sentinels_in_order(mode):
    rng = np.random.default_rng(1)
    for _ in range(300):
        seq = rng.integers(7, 27, size=int(rng.integers(2, 300)))
        rate = float(rng.choice([0.15, 0.2, 0.3]))
        ex = denoise(seq, rng, rate, TOK, **mode)
        assert ex.input_ids[0] == VOCAB["[NLU]"] and ex.input_ids[-1] == TOK.eos_id and ex.labels[-1] == TOK.eos_id
        assert reconstruct(ex.input_ids, ex.labels) == seq.tolist()
        used = [t for t in ex.input_ids.tolist() if t in TOK.sentinel_ids]
        assert used == TOK.sentinel_ids[: len(used)]  # <extra_id_0>, <extra_id_1>, ... in order
        n_masked = len(ex.labels) - 1 - len(used)
        assert max(1, math.floor(rate * len(seq))) <= n_masked <= math.ceil(rate * len(seq))
        if mode:  # one sentinel per run: no two sentinels side by side in the encoder input
            s = np.isin(ex.input_ids, TOK.sentinel_ids)
            assert not (s[1:] & s[:-1]).any()


def test_same_seed_same_example():
    seq = residues("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ")
    a = denoise(seq, np.random.default_rng(5), 0.3, TOK)
    b = denoise(seq, np.random.default_rng(5), 0.3, TOK)
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_span_corruption_mean_span_length():
    rng = np.random.default_rng(2)
    lengths = []
    for _ in range(400):
        m = noise_mask(400, 0.3, rng, mean_span=3.0)
        assert m.sum() in (120,)  # 0.3 * 400 exactly
        edges = np.flatnonzero(np.diff(np.concatenate(([0], m.astype(int), [0]))))
        lengths.extend(edges[1::2] - edges[0::2])
    assert abs(np.mean(lengths) - 3.0) < 0.05
    # spans may start at the first residue and end at the last (unlike T5's fixed unmasked start)
    starts = [noise_mask(50, 0.3, rng, mean_span=3.0)[0] for _ in range(300)]
    assert 0 < np.mean(starts) < 1


def test_variable_completion_ratio_is_uniform_in_range():
    rng = np.random.default_rng(3)
    seq = rng.integers(7, 27, size=1000)
    shares = [(len(complete(seq, rng, (0.2, 0.8), TOK).input_ids) - 2) / 1000 for _ in range(3000)]
    assert min(shares) >= 0.2 and max(shares) < 0.8
    assert abs(np.mean(shares) - 0.5) < 0.01 and abs(np.std(shares) - 0.6 / math.sqrt(12)) < 0.01


def test_mixer_draws_task_per_sequence_and_rate_per_step():
    mixer = TaskMixer(ObjectiveConfig(task_probs={"denoise": 0.7, "complete": 0.3}), TOK, max_length=64)
    rng = np.random.default_rng(4)
    seq = residues("MKTAYIAKQRQISFVKSHFSRQ")
    tasks = [mixer(seq, rng, StepParams(0.2)).task for _ in range(20000)]
    assert abs(tasks.count("denoise") / len(tasks) - 0.7) < 0.015
    rates = [mixer.step_params(step_generator(0, s)).mask_rate for s in range(6000)]
    for r in (0.15, 0.2, 0.3):
        assert abs(rates.count(r) / len(rates) - 1 / 3) < 0.02
    assert mixer.step_params(step_generator(9, 17)) == mixer.step_params(step_generator(9, 17))
    only = TaskMixer(ObjectiveConfig(task_probs={"complete": 1}), TOK)
    assert {only(seq, rng, StepParams(0.15)).task for _ in range(50)} == {"complete"}


# --- sentinel budget -----------------------------------------------------------------------------------------
def test_sentinel_budget_checked_at_config_time():
    TaskMixer(ObjectiveConfig(), TOK, max_length=512)  # Ankh3: 0.3 * 510 -> 153 of 225 sentinels
    TaskMixer(ObjectiveConfig(), TOK, max_length=752)  # ceil(0.3 * 750) = 225: exactly fits
    with pytest.raises(ConfigError, match=r"rate 0.3 .* up to 751 residues .* needs up to 226 sentinels, but the "
                                          r"tokenizer has 225"):
        TaskMixer(ObjectiveConfig(), TOK, max_length=753)
    with pytest.raises(ConfigError, match="needs up to 307 sentinels"):
        TaskMixer(ObjectiveConfig(merge_adjacent=True), TOK, max_length=1024)  # no adjacency is the worst case
    TaskMixer(ObjectiveConfig(mean_span=3.0), TOK, max_length=1024)  # ~102 spans
    TaskMixer(ObjectiveConfig(task_probs={"complete": 1.0}), TOK, max_length=4096)  # no denoising, no sentinels
    # and never a silent wrap-around when called directly on a too long sequence
    with pytest.raises(ConfigError, match="needs 300 sentinels for one sequence but the vocabulary has 225"):
        denoise(np.full(1000, 8), np.random.default_rng(0), 0.3, TOK)


def test_sentinel_bound_holds_for_every_draw():
    rng = np.random.default_rng(6)
    for mode in ({"merge_adjacent": True}, {"mean_span": 2.5}, {}):
        for length in (2, 3, 5, 17, 100):
            bound = sentinels_needed(length, 0.3, **mode)
            used = [np.isin(denoise(np.full(length, 8), rng, 0.3, TOK, **mode).labels, TOK.sentinel_ids).sum()
                    for _ in range(300)]
            assert max(used) <= bound
            if length >= 17 and not mode:
                assert max(used) == bound  # the bound is reached, not just respected
    # the mixer checks only the longest sequence, which is right because the need never falls with length
    for mode in ({}, {"merge_adjacent": True}, {"mean_span": 2.5}):
        for rate in (0.15, 0.3, 0.6):
            needs = [sentinels_needed(length, rate, **mode) for length in range(1, 600)]
            assert all(a <= b for a, b in zip(needs, needs[1:]))


# --- configuration errors ------------------------------------------------------------------------------------
def test_config_from_dict_and_errors():
    from protlm.settings import build, plain

    cfg = build(ObjectiveConfig, {"mask_rates": [0.1, 0.4], "completion_ratio": [0.3, 0.7], "mean_span": 3}, "objective")
    assert cfg.mask_rates == (0.1, 0.4) and cfg.completion_ratio == (0.3, 0.7) and cfg.mean_span == 3.0
    assert build(ObjectiveConfig, plain(cfg), "objective") == cfg
    assert ObjectiveConfig().probabilities == {"denoise": 0.5, "complete": 0.5}
    with pytest.raises(ConfigError, match=r"objective: unknown config key 'mask_rate' \(did you mean 'mask_rates'\?\)"):
        build(ObjectiveConfig, {"mask_rate": [0.15]}, "objective")
    bad = [
        ({"mask_rates": "0.15"}, r"mask_rates must be tuple\[float, \.\.\.\], got '0.15'"),
        ({"mask_rates": [0.15, 1.5]}, r"mask_rates: each rate must be in \(0, 1\), got 1.5"),
        ({"merge_adjacent": "yes"}, "merge_adjacent must be bool"),
        ({"mean_span": 0.5}, "mean_span must be a number >= 1"),
        ({"task_probs": {"denoise": 1, "mlm": 1}}, "unknown task 'mlm'"),
        ({"task_probs": {"denoise": "half"}}, "task_probs.denoise must be float"),
        ({"task_probs": {"denoise": 0, "complete": 0}}, "at least one task needs a positive weight"),
        ({"completion_ratio": [0.8, 0.2]}, "completion_ratio range must be"),
        ({"completion_ratio": 1}, r"completion_ratio must be in \(0, 1\)"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            build(ObjectiveConfig, data, "cfg.yaml:objective")


# --- figures on 10,000 real sequences ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [{}, {"merge_adjacent": True}, {"mean_span": 3.0}])
def test_realised_masking_and_task_mix_on_real_corpus(mode):
    path = shared_data("corpus", "cath-dataset-nonredundant-S20.v4_1_0.fa.gz")
    stream = SequenceStream([path, shared_data("corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz")], TOK,
                            max_length=512, seed=11)
    mixer = TaskMixer(ObjectiveConfig(**mode), TOK, max_length=512)
    batches = PretrainBatches(stream, mixer, batch_size=10)
    sentinels = np.array(sorted(TOK.sentinel_ids))
    masked = {r: 0 for r in (0.15, 0.2, 0.3)}
    total = dict(masked)
    steps = dict(masked)
    n_tasks = np.zeros(2)
    for batch in batches.loader():
        rate = batch["mask_rate"]
        steps[rate] += 1
        task = batch["task"].numpy()
        n_tasks += np.bincount(task, minlength=2)
        inp, lab = batch["input_ids"].numpy(), batch["labels"].numpy()
        for i in np.flatnonzero(task == 0):
            n_sent = np.isin(inp[i], sentinels).sum()
            n_mask = int((lab[i] >= 0).sum()) - 1 - n_sent  # target: sentinels + masked residues + </s>
            n_kept = int((inp[i] != 0).sum()) - 2 - n_sent  # input: prefix + kept residues + sentinels + </s>
            masked[rate] += n_mask
            total[rate] += n_mask + n_kept
        if batches.consumed == 1000:  # 10,000 sequences
            break
    print(f"\n{mode or '1-gram'}: realised fraction per rate "
          f"{ {r: round(float(masked[r] / total[r]), 4) for r in masked} }, steps per rate {steps}, "
          f"denoise share {n_tasks[0] / n_tasks.sum():.4f}")  # shown with pytest -s
    for rate in masked:
        assert abs(masked[rate] / total[rate] - rate) < 0.01, (rate, masked[rate] / total[rate])
        assert abs(steps[rate] / 1000 - 1 / 3) < 0.05, steps  # std of a frequency over 1000 steps: 0.015
    assert abs(n_tasks[0] / n_tasks.sum() - 0.5) < 0.02, n_tasks  # std 0.005


def test_task_mix_follows_setting_on_real_corpus():
    stream = SequenceStream(shared_data("corpus", "flip_bind_sequences.fasta.gz"), TOK, max_length=256, seed=2)
    mixer = TaskMixer(ObjectiveConfig(task_probs={"denoise": 0.25, "complete": 0.75}), TOK, max_length=256)
    tasks = np.concatenate([b["task"].numpy() for _, b in zip(range(200), PretrainBatches(stream, mixer, 50).loader())])
    print(f"\ncompletion share at setting 0.75: {(tasks == 1).mean():.4f}")  # shown with pytest -s
    assert len(tasks) == 10000 and abs((tasks == 1).mean() - 0.75) < 0.015  # std 0.0043


def test_mixer_needs_an_ankh3_vocabulary():
    from protlm.tokenizer.vocab import Tokenizer

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{aa: 3 + i for i, aa in enumerate("ACDEFGHIKLMNPQRSTVWY")}}
    ankh_like = Tokenizer(vocab, {aa: vocab[aa] for aa in "ACDEFGHIKLMNPQRSTVWY"}, source="ankh-like")
    with pytest.raises(ConfigError, match=r"task 'denoise' needs the \[NLU\] token, which the tokenizer \(ankh-like\)"):
        TaskMixer(ObjectiveConfig(), ankh_like)
    with pytest.raises(ConfigError, match=r"the tokenizer \(ankh-like\) has no \[S2S\] token"):
        complete(np.array([3, 4, 5]), None, 0.5, ankh_like)


def test_collate_makes_the_teacher_forcing_decoder_input():
    """T5's shift right: the start token, then the target shifted by one, padding where the target is -100."""
    a = denoise_with_mask(residues("MKT"), mask_of(3, 1), TOK)  # target <0> K </s>
    b = complete(residues("MKTAY"), None, 0.5, TOK)  # target T A Y </s>
    assert collate([a, b], TOK)["decoder_input_ids"].tolist() == [[TOK.pad_id] + ids("<0>", "K", "</s>"),
                                                                  [TOK.pad_id] + ids("T", "A", "Y")]
    assert collate([b, a], TOK, decoder_start_id=7)["decoder_input_ids"].tolist() == [[7] + ids("T", "A", "Y"),
                                                                                       [7] + ids("<0>", "K", "</s>")]
