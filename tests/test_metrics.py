"""Retrieval metrics on hand-made similarity matrices (ranks worked out by hand)."""
from __future__ import annotations

import math

import pytest
import torch

from modules.metrics import format_metrics, ground_truth_ranks, rank_metrics, retrieval_metrics


def test_perfect_diagonal():
    sim = torch.eye(4) + 0.1
    m = retrieval_metrics(sim, [0, 1, 2, 3])
    for direction in ("t2v", "v2t"):
        assert m[direction] == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}


def test_hand_made_ranks():
    # rows = captions, columns = videos; caption i belongs to video i
    sim = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # gt 0.9 best -> rank 1
        [0.8, 0.5, 0.7, 0.1],  # gt 0.5 below 0.8, 0.7 -> rank 3
        [0.1, 0.2, 0.0, 0.3],  # gt 0.0 is the lowest -> rank 4
        [0.0, 0.0, 0.0, 0.6],  # rank 1
    ])
    ranks = ground_truth_ranks(sim, torch.eye(4, dtype=torch.bool))
    assert ranks.tolist() == [1, 3, 4, 1]
    m = retrieval_metrics(sim, [0, 1, 2, 3])
    assert m["t2v"]["R1"] == 50.0 and m["t2v"]["R5"] == 100.0
    assert m["t2v"]["MdR"] == 2.0 and m["t2v"]["MnR"] == pytest.approx(9 / 4)
    # video -> text: columns. video 0: caption 0 has 0.9, best -> 1; video 1: 0.5 vs 0.1,0.2,0.0 -> 1;
    # video 2: 0.0 vs 0.2, 0.7 and 0.0 (a tie with caption 3) -> 1 + 3 = 4; video 3: 0.6 vs 0.3, 0.1, 0.3 -> 1
    v2t = ground_truth_ranks(sim.t(), torch.eye(4, dtype=torch.bool))
    assert v2t.tolist() == [1, 1, 4, 1]
    assert m["v2t"]["R1"] == 75.0 and m["v2t"]["MnR"] == 1.75


def test_ties_are_pessimistic():
    # everything equal: every ground truth ties with all others -> worst rank
    m = retrieval_metrics(torch.zeros(5, 5), list(range(5)))
    assert m["t2v"]["R1"] == 0.0 and m["t2v"]["MdR"] == 5.0 and m["t2v"]["MnR"] == 5.0
    # one tie with a wrong candidate: rank 2, not 1
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.9, 0.2], [0.1, 0.3, 0.3]])
    assert ground_truth_ranks(sim, torch.eye(3, dtype=torch.bool)).tolist() == [2, 1, 2]


def test_nan_counts_as_worst():
    sim = torch.tensor([[float("nan"), 0.1], [0.0, 1.0]])
    assert ground_truth_ranks(sim, torch.eye(2, dtype=torch.bool)).tolist() == [2, 1]


def test_several_captions_per_video():
    # videos 0 and 1; captions 0,1 -> video 0, caption 2 -> video 1
    sim = torch.tensor([
        [0.2, 0.9],  # caption 0: gt video 0 ranks 2
        [0.8, 0.1],  # caption 1: rank 1
        [0.3, 0.4],  # caption 2: rank 1
    ])
    m = retrieval_metrics(sim, [0, 0, 1])
    assert m["t2v"]["R1"] == pytest.approx(200 / 3)
    # video 0: best caption is caption 1 (0.8), no wrong caption >= 0.8 -> rank 1.
    # video 1: its caption 2 has 0.4, caption 0 (wrong) has 0.9 -> rank 2.
    assert ground_truth_ranks(sim.t(), torch.tensor([[True, True, False], [False, False, True]])).tolist() == [1, 2]
    assert m["v2t"]["R1"] == 50.0 and m["v2t"]["MdR"] == 1.5


def test_r5_r10_and_median_on_larger_matrix():
    # caption i's ground truth sits at rank i + 1 (i = 0..11)
    n = 12
    sim = torch.zeros(n, n)
    for i in range(n):
        order = [j for j in range(n) if j != i]
        for r, j in enumerate(order):
            sim[i, j] = 100 - r if r < i else -1 - r  # i wrong videos above the gt
        sim[i, i] = 50.0
    ranks = ground_truth_ranks(sim, torch.eye(n, dtype=torch.bool))
    assert ranks.tolist() == list(range(1, n + 1))
    m = rank_metrics(ranks)
    assert m["R1"] == pytest.approx(100 / 12) and m["R5"] == pytest.approx(500 / 12) and m["R10"] == pytest.approx(1000 / 12)
    assert m["MdR"] == 6.5 and m["MnR"] == 6.5
    # chunking gives the same ranks
    assert torch.equal(ground_truth_ranks(sim, torch.eye(n, dtype=torch.bool), chunk=5), ranks)


def test_errors_and_format():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])  # video 2 has no caption
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(2, 2), [0, 2])
    text = format_metrics(retrieval_metrics(torch.eye(3), [0, 1, 2]))
    assert "R@1 100.0" in text and "video->text" in text and not math.isnan(rank_metrics([1, 2])["MnR"])
