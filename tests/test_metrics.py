"""Benchmark metrics against values worked out by hand (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest

from protlm.evaluate.metrics import (accuracy, contact_metrics, contact_precision, mean_std, residue_accuracy,
                                     spearman)


def test_q3_pools_residues_and_skips_masked_ones():
    # protein A: scored residues 0,1,2,4 (3 is masked) -> right, right, wrong, wrong = 2 of 4
    #            (residue 3 is predicted right; counting it would give 3 of 5)
    # protein B: 2 of 3.   Pooled: 4 / 7.   (The mean of per-protein accuracies would be 0.5833.)
    pred = [np.array([0, 1, 1, 2, 2]), np.array([2, 0, 1])]
    target = [np.array([0, 1, 2, 2, 0]), np.array([2, 2, 1])]
    mask = [np.array([1, 1, 1, 0, 1], bool), np.array([1, 1, 1], bool)]
    assert residue_accuracy(pred, target, mask) == pytest.approx(4 / 7)
    assert residue_accuracy(pred, target) == pytest.approx(5 / 8)  # unmasked: 3 of 5 plus 2 of 3


def test_q3_with_every_residue_masked_is_nan():
    assert math.isnan(residue_accuracy([np.array([0])], [np.array([0])], [np.array([False])]))


def test_protein_accuracy():
    assert accuracy([1, 2, 3, 3], [1, 2, 0, 3]) == 0.75


def test_spearman_with_ties_uses_average_ranks():
    # ranks of x = [1, 2.5, 2.5, 4], of y = [1, 3, 2, 4]; deviations from 2.5: dx = [-1.5, 0, 0, 1.5],
    # dy = [-1.5, .5, -.5, 1.5]; sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # ties on both sides: x ranks [1.5, 1.5, 3, 4], y ranks [1, 2.5, 2.5, 4]
    # dx = [-1, -1, .5, 1.5], dy = [-1.5, 0, 0, 1.5]: sum dx*dy = 3.75, sum dx^2 = 4.5, sum dy^2 = 4.5 -> 3.75/4.5
    assert spearman([5, 5, 6, 9], [0, 1, 1, 3]) == pytest.approx(3.75 / 4.5)


def test_spearman_of_a_constant_is_nan():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _toy_protein():
    # L = 8, separation >= 6 leaves three candidate pairs: (0,6) contact, (0,7) none, (1,7) contact
    L = 8
    contacts = np.zeros((L, L), np.int8)
    contacts[0, 6] = contacts[6, 0] = 1
    contacts[1, 7] = contacts[7, 1] = 1
    scores = np.zeros((L, L))
    scores[0, 6] = scores[6, 0] = 0.5
    scores[0, 7] = scores[7, 0] = 0.9
    scores[1, 7] = scores[7, 1] = 0.9
    scores[0, 1] = scores[1, 0] = 5.0  # a high score on a pair too close to count
    return scores, contacts


def test_precision_at_l_short_protein_takes_all_candidates():
    scores, contacts = _toy_protein()
    r = contact_precision(scores, contacts, k=8)  # k = L = 8 > 3 candidates: all 3 count -> 2 of 3
    assert (r.k, r.candidates) == (3, 3)
    assert r.precision == pytest.approx(2 / 3)


def test_precision_ties_at_the_cut_count_their_mean_label():
    scores, contacts = _toy_protein()
    # top 1: (0,7) and (1,7) tie at 0.9 with labels 0 and 1 -> expected precision 1/2, whatever the sort does
    assert contact_precision(scores, contacts, k=1).precision == pytest.approx(0.5)
    # 4 candidates scored [.9, .5, .5, .5] labelled [1, 1, 0, 0], k = 2: one above the cut (a hit) plus one
    # slot shared by the three tied pairs (mean label 1/3): (1 + 1/3) / 2 = 2/3
    L = 12
    s = np.zeros((L, L))
    c = np.zeros((L, L), np.int8)
    for (i, j), sc, lab in zip([(0, 6), (0, 7), (0, 8), (0, 9)], [0.9, 0.5, 0.5, 0.5], [1, 1, 0, 0]):
        s[i, j] = s[j, i] = sc
        c[i, j] = c[j, i] = lab
    c[1:, 1:] = -1  # only pairs with residue 0 are known
    c[0, 10:] = c[10:, 0] = -1
    r = contact_precision(s, c, k=2)
    assert r.candidates == 4 and r.precision == pytest.approx(2 / 3)


def test_contact_metrics_leave_out_proteins_without_candidates():
    scores, contacts = _toy_protein()
    tiny = np.zeros((5, 5))  # L = 5: no pair is 6 apart
    m = contact_metrics([scores, tiny], [contacts, np.zeros((5, 5), np.int8)], divisors=(1, 5),
                        ranges=("all", "long"))
    assert m["P@L"] == pytest.approx(2 / 3)  # only the 8-residue protein counts
    assert m["P@L/5"] == pytest.approx(0.5)  # k = max(1, 8 // 5) = 1: the tie above
    assert math.isnan(m["P@L-long"])  # nothing is 24 apart


def test_ranges_use_residue_numbers_and_skip_unknown_pairs():
    L = 26
    s = np.zeros((L, L))
    c = np.zeros((L, L), np.int8)
    s[0, 25] = s[25, 0] = 1.0  # sep 25: long range, a contact
    c[0, 25] = c[25, 0] = 1
    s[2, 14] = s[14, 2] = 2.0  # sep 12: medium range, scored higher, not a contact
    c[3, 20] = c[20, 3] = -1  # unknown: never a candidate
    s[3, 20] = s[20, 3] = 9.0
    long = contact_precision(s, c, k=1, min_sep=24)
    medium = contact_precision(s, c, k=1, min_sep=12, max_sep=23)
    assert long.precision == 1.0 and medium.precision == 0.0
    # a numbering gap: residues numbered 1, 2, 3, 10, 11 -> (2, 10) and (1, 10), (1, 11) ... are >= 6 apart
    pos = np.array([1, 2, 3, 10, 11])
    r = contact_precision(np.ones((5, 5)), np.ones((5, 5), np.int8), k=10, positions=pos)
    assert r.candidates == 6  # (1,10) (1,11) (2,10) (2,11) (3,10) (3,11)


def test_mean_std_is_the_sample_std_and_ignores_nan():
    mean, std = mean_std([0.5, 0.7, float("nan")])
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))
    assert mean_std([0.3]) == (0.3, 0.0)
