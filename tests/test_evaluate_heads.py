"""The ConvBERT head: shapes per task kind, padding never leaks, packed rows equal separate proteins, the packed
step equals batch-1 accumulation, and the Table 4 protocol actually learns simple tasks."""

import numpy as np
import pytest
import torch

from protlm.evaluate.heads import ConvBertHead, HeadConfig, dropout, keep_mask, masked_mean
from protlm.evaluate.tasks import TaskExample, TaskSpec
from protlm.evaluate.training import HeadTrainConfig, _collate, _collate_packed, _packs, train_head


# Small models on a shared CPU: a second thread only adds synchronisation (several times slower here).
pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(lengths, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return x, mask


@pytest.mark.parametrize("kind,n_out,shape", [
    ("residue_classification", 3, (2, 9, 3)),
    ("protein_classification", 10, (2, 10)),
    ("protein_regression", 1, (2,)),
    ("contact", 1, (2, 9, 9)),
])
@pytest.mark.parametrize("dim", [21, 40])  # 21 (one-hot) is not a multiple of 4 heads
def test_output_shapes(kind, n_out, shape, dim):
    head = ConvBertHead(dim, kind, n_out).eval()
    x, mask = _batch([9, 5], dim)
    assert head(x, mask).shape == shape


def test_table4_shape():
    head = ConvBertHead(256, "residue_classification", 3)
    layer = head.layers[0]
    assert len(head.layers) == 1
    assert layer.ff[0].out_features == 128  # embedding dim / 2
    assert layer.mixer.n_att == 2 and layer.mixer.n_conv == 2 and layer.mixer.kernel_size == 7
    assert head.drop.p == 0.1


@pytest.mark.parametrize("kind", ["residue_classification", "protein_classification", "protein_regression", "contact"])
def test_padding_does_not_change_a_proteins_output(kind):
    torch.manual_seed(0)
    head = ConvBertHead(40, kind, 4).eval()
    x, mask = _batch([6, 13], 40)
    x[0, 6:] = 1e3  # garbage in the padding must not matter
    together = head(x, mask)
    alone = head(x[:1, :6], mask[:1, :6])
    if kind == "residue_classification":
        torch.testing.assert_close(together[0, :6], alone[0], atol=1e-5, rtol=1e-5)
    elif kind == "contact":
        torch.testing.assert_close(together[0, :6, :6], alone[0], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == 2.0


def test_contact_logits_are_symmetric():
    head = ConvBertHead(24, "contact").eval()
    x, mask = _batch([11], 24)
    out = head(x, mask)[0]
    torch.testing.assert_close(out, out.T)


def _assert_gradient_of_separate_proteins(head, x, mask, y, lengths):
    """The gradient now in ``head`` equals batch-1 accumulation over the proteins of padded (x, mask, y)."""
    packed = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    for i, n in enumerate(lengths):
        (head.per_protein_loss(head(x[i:i + 1, :n], mask[i:i + 1, :n]), y[i:i + 1, :n]).sum() / len(lengths)).backward()
    for a, b in zip(packed, [p.grad for p in head.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_packed_step_gradient_equals_batch_one_accumulation():
    # Table 4: batch 1, accumulate 16 -> the step's gradient is the mean over proteins of each protein's own loss
    cfg = HeadConfig(dropout=0.0)
    torch.manual_seed(0)
    head = ConvBertHead(24, "residue_classification", 3, cfg)
    lengths = [4, 9, 7]
    x, mask = _batch(lengths, 24)
    y = torch.randint(0, 3, (3, 9))
    y[~mask] = -1
    y[1, 2] = -1  # an unscored residue inside a protein
    head.zero_grad()
    (head.per_protein_loss(head(x, mask), y).sum() / 3).backward()
    _assert_gradient_of_separate_proteins(head, x, mask, y, lengths)


def _packed_row(lengths, dim, gap, seed=0):
    """Proteins of ``lengths`` laid end to end with ``gap`` garbage-filled masked positions between them, and the
    same proteins as a padded batch."""
    x, mask = _batch(lengths, dim, seed)
    n = sum(lengths) + gap * (len(lengths) - 1)
    row = torch.full((1, n, dim), 1e3)  # garbage in the gaps must not matter
    row_mask = torch.zeros(1, n, dtype=torch.bool)
    segments, pos = [], 0
    for i, L in enumerate(lengths):
        row[0, pos:pos + L] = x[i, :L]
        row_mask[0, pos:pos + L] = True
        segments.append((pos, L))
        pos += L + gap
    return row, row_mask, tuple(segments), x, mask


@pytest.mark.parametrize("kind", ["residue_classification", "protein_classification", "protein_regression"])
def test_a_packed_row_gives_each_protein_its_own_output(kind):
    torch.manual_seed(0)
    head = ConvBertHead(40, kind, 4).eval()
    row, row_mask, segments, x, mask = _packed_row([6, 13, 1, 8], 40, gap=3)
    packed = head(row, row_mask, segments)
    for i, (start, L) in enumerate(segments):
        alone = head(x[i:i + 1, :L], mask[i:i + 1, :L])
        got = packed[0, start:start + L] if kind == "residue_classification" else packed[i]
        torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)


def test_a_packed_step_has_the_gradient_of_separate_proteins():
    torch.manual_seed(0)
    head = ConvBertHead(24, "residue_classification", 3, HeadConfig(dropout=0.0))
    lengths = [4, 9, 7]
    row, row_mask, segments, x, mask = _packed_row(lengths, 24, gap=3)
    y = torch.randint(0, 3, (3, 9))
    y[1, 2] = -1  # an unscored residue inside a protein
    y_row = torch.full(row_mask.shape, -1)
    for i, (start, L) in enumerate(segments):
        y_row[0, start:start + L] = y[i, :L]
    head.zero_grad()
    losses = head.per_protein_loss(head(row, row_mask, segments), y_row, segments)
    assert losses.shape == (3,)
    (losses.sum() / 3).backward()
    _assert_gradient_of_separate_proteins(head, x, mask, y, lengths)


def test_a_packed_row_needs_gaps_wide_enough_for_the_convolution():
    head = ConvBertHead(40, "residue_classification", 3).eval()
    row, row_mask, segments, _, _ = _packed_row([6, 5], 40, gap=2)  # kernel 7 needs 3
    with pytest.raises(ValueError, match=">= 3 positions between proteins"):
        head(row, row_mask, segments)
    with pytest.raises(ValueError, match="padded batches"):
        ConvBertHead(40, "contact").eval()(row, row_mask, segments)


def test_packs_fill_the_budget_with_residues_and_gaps():
    exs = [TaskExample(str(i), "d", n, None) for i, n in enumerate([3, 5, 5, 8, 20])]
    assert [[e.length for e in b] for b in _packs(exs, 19, gap=3)] == [[3, 5, 5], [8], [20]]  # 20 > budget: alone
    assert [[e.length for e in b] for b in _packs(exs, 18, gap=3)] == [[3, 5], [5, 8], [20]]


def test_collate_packed_places_each_protein_at_its_segment():
    exs = [TaskExample("a", "d", 2, np.array([1, 2])), TaskExample("b", "d", 3, np.array([0, -1, 2]))]
    feats = {"a": np.ones((2, 4), np.float32), "b": np.full((3, 4), 2.0, np.float32)}
    x, mask, y, segments = _collate_packed(exs, lambda e: feats[e.id], "residue_classification",
                                           torch.device("cpu"), gap=3)
    assert segments == ((0, 2), (5, 3))
    assert x.shape == (1, 8, 4) and x[0, :, 0].tolist() == [1, 1, 0, 0, 0, 2, 2, 2]
    assert mask[0].tolist() == [True, True, False, False, False, True, True, True]
    assert y.tolist() == [[1, 2, -1, -1, -1, 0, -1, 2]]


def test_fast_dropout_keeps_the_expected_fraction_and_mean():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, 0.1, True)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    assert dropout(x, 0.1, False) is x
    keep = keep_mask((1000, 200), 0.1)
    values = keep.unique()
    assert keep.shape == (1000, 200) and len(values) == 2 and values[0] == 0.0
    assert values[1].item() == pytest.approx(32768 / (32768 - 3277), rel=1e-7)


# --- the protocol learns --------------------------------------------------------------------------------------
def _one_hot_examples(n, length, kind, rng):
    out = {}
    for i in range(n):
        L = int(rng.integers(length // 2, length))
        tokens = rng.integers(0, 6, size=L)
        feats = np.eye(6, dtype=np.float32)[tokens]
        if kind == "residue_classification":
            target = (tokens % 3).astype(np.int64)  # a per-residue rule of the input
        else:
            target = float((tokens == 0).mean())  # fraction of token 0: needs the pooled mean
        out[f"p{i}"] = (TaskExample(f"p{i}", "toy", L, target), feats)
    return out


@pytest.mark.parametrize("kind,metric,floor", [("residue_classification", "accuracy", 0.95),
                                               ("protein_regression", "spearman", 0.9)])
def test_training_learns_a_simple_rule(kind, metric, floor):
    rng = np.random.default_rng(0)
    data = _one_hot_examples(160, 30, kind, rng)
    exs = [e for e, _ in data.values()]
    feats = {k: f for k, (_, f) in data.items()}
    task = TaskSpec(name="toy", kind=kind, label="x", train="toy/train", valid="toy/valid", test={"t": "toy"},
                    classes=["a", "b", "c"] if kind == "residue_classification" else None)
    cfg = HeadTrainConfig(lr=1e-2, warmup_steps=5, epochs=6, grad_accum=8, precision="fp32")
    res = train_head(task, exs[:120], exs[120:140], {"t": exs[140:]}, lambda e: feats[e.id], 6, seed=7, cfg=cfg,
                     head_cfg=HeadConfig())
    assert res.test["t"][metric] > floor
    assert 1 <= res.best_epoch <= 6 and len(res.history) == 6
    assert res.steps == 6 * 15  # ceil(120 / 8) optimiser steps per epoch


def test_training_is_reproducible_for_a_seed_and_differs_between_seeds():
    rng = np.random.default_rng(1)
    data = _one_hot_examples(40, 20, "protein_regression", rng)
    exs = [e for e, _ in data.values()]
    feats = {k: f for k, (_, f) in data.items()}
    task = TaskSpec(name="toy", kind="protein_regression", label="x", train="t", valid="v", test={"t": "t"})
    cfg = HeadTrainConfig(warmup_steps=2, epochs=2, grad_accum=4, precision="fp32")
    run = lambda seed: train_head(task, exs[:30], exs[30:35], {"t": exs[35:]}, lambda e: feats[e.id], 6, seed, cfg,
                                  HeadConfig()).history[-1].train_loss
    assert run(7) == run(7)
    assert run(7) != run(0)


def test_collate_pads_targets_with_minus_one():
    exs = [TaskExample("a", "d", 2, np.array([1, 2])), TaskExample("b", "d", 3, np.array([0, -1, 2]))]
    x, mask, y = _collate(exs, lambda e: np.ones((e.length, 4), np.float32), "residue_classification",
                          torch.device("cpu"))
    assert x.shape == (2, 3, 4) and x[0, 2].abs().sum() == 0
    assert y.tolist() == [[1, 2, -1], [0, -1, 2]]


def test_cpu_training_attention_path_matches_sdpa():
    # With dropout on, CPU training writes attention out (for the fast dropout); with a keep probability that
    # rounds to 1 it must give what SDPA gives in eval mode, padding included.
    torch.manual_seed(0)
    head = ConvBertHead(40, "residue_classification", 3, HeadConfig(dropout=1e-9))
    x, mask = _batch([6, 13], 40)
    head.train()
    train_out = head(x, mask)
    head.eval()
    torch.testing.assert_close(train_out[0, :6], head(x, mask)[0, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(train_out[1], head(x, mask)[1], atol=1e-5, rtol=1e-5)


def test_long_proteins_are_cropped_to_both_ends_for_per_protein_tasks():
    from protlm.evaluate.datasets import LabelledRecord

    task = TaskSpec(name="loc", kind="protein_classification", label="loc", classes=["a"], train="d", valid="v",
                    test={"t": "d"}, max_length=6)
    ex = task.encode(LabelledRecord("p", "ACDEFGHIKL", {"loc": "a"}), "d")
    assert ex.keep.tolist() == [0, 1, 2, 7, 8, 9] and ex.seen == 6 and ex.length == 10
    feats = np.arange(10, dtype=np.float32)[:, None].repeat(4, 1)
    x, mask, _ = _collate([ex], lambda e: feats, "protein_classification", torch.device("cpu"))
    assert x[0, :, 0].tolist() == [0, 1, 2, 7, 8, 9]
