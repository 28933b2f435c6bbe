"""Tests for modules/token_merging.py (ToMe / TempMe bipartite merging, DESIGN 2.5) and
modules/frame_compression.py (TempMe frame compression, DESIGN 2.4).

Both vectorised implementations are checked against slow, obviously-correct loop versions
written here in plain Python, plus structural properties.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from modules.frame_compression import FrameCompression, compress_frames
from modules.token_merging import (
    bipartite_soft_matching,
    merge_source,
    merge_tokens,
    merge_wavg,
)

# --------------------------------------------------------------------------------------
# Loop reference: bipartite soft matching + size-weighted merge, one token at a time.
# --------------------------------------------------------------------------------------


def _unit(v: Sequence[float]) -> List[float]:
    norm = math.sqrt(sum(e * e for e in v))
    return [e / max(norm, 1e-12) for e in v]


def reference_merge_one(
    metric: List[List[float]],
    x: List[List[float]],
    size: List[float],
    r: int,
    num_protected: int,
) -> Tuple[List[List[float]], List[float]]:
    """One sequence: (T, C) metric, (T, D) x, (T,) size -> merged (x, size) as lists."""
    num_tokens = len(metric)
    r = max(0, min(r, (num_tokens - num_protected) // 2))
    if r == 0:
        return [list(row) for row in x], list(size)
    # A = even absolute positions, B = odd, among the unprotected tokens.
    a_pos = [t for t in range(num_protected, num_tokens) if t % 2 == 0]
    b_pos = [t for t in range(num_protected, num_tokens) if t % 2 == 1]
    unit = [_unit(row) for row in metric]

    best = []  # (score, index into b_pos) per A token; strict '>' keeps the earliest B
    for ta in a_pos:
        best_score, best_j = -math.inf, -1
        for j, tb in enumerate(b_pos):
            score = sum(p * q for p, q in zip(unit[ta], unit[tb]))
            if score > best_score:
                best_score, best_j = score, j
        best.append((best_score, best_j))
    ranked = sorted(range(len(a_pos)), key=lambda i: (-best[i][0], i))
    merged_away = set(ranked[:r])

    acc_x = [[v * size[tb] for v in x[tb]] for tb in b_pos]
    acc_s = [size[tb] for tb in b_pos]
    received = [False] * len(b_pos)
    for i in ranked[:r]:
        ta, j = a_pos[i], best[i][1]
        acc_x[j] = [u + v * size[ta] for u, v in zip(acc_x[j], x[ta])]
        acc_s[j] += size[ta]
        received[j] = True

    out_x = [list(x[t]) for t in range(num_protected)]
    out_s = [size[t] for t in range(num_protected)]
    for i, ta in enumerate(a_pos):
        if i not in merged_away:
            out_x.append(list(x[ta]))
            out_s.append(size[ta])
    for j, tb in enumerate(b_pos):
        out_x.append([v / acc_s[j] for v in acc_x[j]] if received[j] else list(x[tb]))
        out_s.append(acc_s[j])
    return out_x, out_s


def reference_merge(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, c: int):
    outs = [
        reference_merge_one(m.tolist(), xx.tolist(), s[:, 0].tolist(), r, c)
        for m, xx, s in zip(metric.double(), x.double(), size.double())
    ]
    out_x = torch.tensor([o[0] for o in outs], dtype=torch.float64)
    out_s = torch.tensor([o[1] for o in outs], dtype=torch.float64)[..., None]
    return out_x, out_s


def _with_duplicates(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Copy some tokens over others (either set), adding exact duplicates."""
    t = t.clone()
    num_tokens = t.shape[1]
    for _ in range(max(1, num_tokens // 6)):
        src, dst = torch.randint(0, num_tokens, (2,), generator=gen).tolist()
        t[:, dst] = t[:, src]
    return t


# 4 x 5 (T, protected) combinations, each with B in {1, 3} and r in {0, 1, 5, max}.
@pytest.mark.parametrize("num_tokens", [7, 50, 97, 120])
@pytest.mark.parametrize("num_protected", [0, 1, 2, 5, 12])
def test_matches_loop_reference(num_tokens: int, num_protected: int) -> None:
    if num_protected > num_tokens:
        pytest.skip("more protected tokens than tokens")
    gen = torch.Generator().manual_seed(1000 * num_tokens + num_protected)
    for batch, r, kind in itertools.product([1, 3], [0, 1, 5, 10**6], ["gauss", "ties"]):
        if kind == "gauss":
            # float64 metric: the reference and the GEMM agree to ~1e-16, far from any
            # genuine near-tie.
            metric = torch.randn(batch, num_tokens, 16, generator=gen, dtype=torch.float64)
        else:
            # Ties must be exact to be meaningful: a GEMM may round cos(v, w) differently
            # for two copies of w in different columns. With +-1 entries and C = 16, unit
            # vectors have entries +-1/4 and every score is a multiple of 1/16, exact in
            # float32 whatever the summation order. Many ties, plus duplicate tokens.
            signs = torch.randint(0, 2, (batch, num_tokens, 16), generator=gen)
            metric = _with_duplicates((signs * 2 - 1).float(), gen)
        x = torch.randn(batch, num_tokens, 6, generator=gen, dtype=torch.float64)
        size = torch.randint(1, 6, (batch, num_tokens, 1), generator=gen).double()

        plan = bipartite_soft_matching(metric, r, num_protected)
        got_x, got_s = merge_wavg(plan, x, size)
        want_x, want_s = reference_merge(metric, x, size, r, num_protected)
        assert got_x.shape == want_x.shape, (batch, r, kind)
        torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)


def _random_case(batch=3, num_tokens=50, num_protected=1, width=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, num_tokens, width, generator=gen)
    x = torch.randn(batch, num_tokens, width, generator=gen)
    size = torch.randint(1, 5, (batch, num_tokens, 1), generator=gen).float()
    return metric, x, size


@pytest.mark.parametrize("num_protected", [0, 1, 4, 5])
def test_sizes_preserved_and_protected_first(num_protected: int) -> None:
    metric, x, size = _random_case(num_protected=num_protected)
    plan = bipartite_soft_matching(metric, 13, num_protected)
    out_x, out_s = merge_wavg(plan, x, size)
    assert plan.r == 13 and plan.num_out == 50 - 13
    assert out_x.shape == (3, 37, 8) and out_s.shape == (3, 37, 1)
    torch.testing.assert_close(out_s.sum(dim=1), size.sum(dim=1))
    assert torch.equal(out_x[:, :num_protected], x[:, :num_protected])
    assert torch.equal(out_s[:, :num_protected], size[:, :num_protected])
    # Default sizes are ones: the result then counts the members.
    _, ones_s = merge_wavg(plan, x)
    assert ones_s.sum().item() == 3 * 50


@pytest.mark.parametrize(
    "num_tokens,num_protected,expected_r", [(50, 1, 24), (50, 2, 24), (7, 5, 1), (6, 5, 0)]
)
def test_r_is_clamped(num_tokens: int, num_protected: int, expected_r: int) -> None:
    metric, x, _ = _random_case(num_tokens=num_tokens)
    plan = bipartite_soft_matching(metric, 1000, num_protected)
    assert plan.r == expected_r
    assert merge_tokens(plan, x).shape[1] == num_tokens - expected_r
    assert bipartite_soft_matching(metric, -3, num_protected).r == 0


def test_identity_plan_keeps_order() -> None:
    metric, x, size = _random_case()
    plan = bipartite_soft_matching(metric, 0, 1)
    assert plan.is_identity
    assert merge_tokens(plan, x) is x
    out_x, out_s = merge_wavg(plan, x, size)
    assert out_x is x and torch.equal(out_s, size)


def test_output_order_and_source() -> None:
    """[protected, unmerged A ascending, B]; merge_source marks every token exactly once."""
    metric, x, _ = _random_case(batch=2, num_tokens=21, num_protected=3)
    plan = bipartite_soft_matching(metric, 4, 3)
    assert torch.all(plan.unmerged_idx[:, 1:] > plan.unmerged_idx[:, :-1])
    source = merge_source(plan)  # (B, T - r, T)
    assert source.shape == (2, 17, 21)
    assert torch.equal(source.sum(dim=1), torch.ones(2, 21))
    # c = 3 (odd): A = absolute positions 4, 6, ..., 20 (patch offset 1), B = 3, 5, ..., 19.
    a_pos, b_pos = torch.arange(4, 21, 2), torch.arange(3, 21, 2)
    for b in range(2):
        # Output row i holds (at least) original token expected[i].
        expected = torch.cat([torch.arange(3), a_pos[plan.unmerged_idx[b]], b_pos])
        assert torch.all(source[b, torch.arange(17), expected] == 1)
        # ... and merged-away A tokens sit in their destination B token's row.
        src_rows = 3 + plan.unmerged_idx.shape[1] + plan.dst_idx[b]
        assert torch.all(source[b, src_rows, a_pos[plan.src_idx[b]]] == 1)
    # Each output token holds as many originals as merge_wavg's size says.
    _, size = merge_wavg(plan, x)
    torch.testing.assert_close(source.sum(dim=-1, keepdim=True), size)


def test_gradient_flows_to_x() -> None:
    metric, x, size = _random_case(batch=2, num_tokens=11, width=3)
    plan = bipartite_soft_matching(metric, 4, 1)
    x64 = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: merge_wavg(plan, t, size.double())[0], (x64,))
    # Through the matching call too: the metric is x itself (indices carry no gradient).
    xg = x.clone().requires_grad_(True)
    out, _ = merge_wavg(bipartite_soft_matching(xg, 4, 1), xg, size)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_low_precision_inputs() -> None:
    metric, x, size = _random_case(num_tokens=50, width=16)
    plan32 = bipartite_soft_matching(metric, 10, 1)
    for dtype in (torch.bfloat16, torch.float16):
        plan = bipartite_soft_matching(metric.to(dtype), 10, 1)
        out, out_s = merge_wavg(plan, x.to(dtype), size)
        assert out.dtype == dtype and out_s.dtype == torch.float32
        if torch.equal(plan.src_idx, plan32.src_idx) and torch.equal(plan.dst_idx, plan32.dst_idx):
            ref, _ = merge_wavg(plan32, x, size)
            torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_bad_inputs() -> None:
    metric, x, _ = _random_case()
    with pytest.raises(ValueError):
        bipartite_soft_matching(metric[0], 2, 1)
    with pytest.raises(ValueError):
        bipartite_soft_matching(metric, 2, 51)
    plan = bipartite_soft_matching(metric, 2, 1)
    with pytest.raises(ValueError):
        merge_tokens(plan, x[:, :-1])


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    metric, x, size = _random_case(batch=4, num_tokens=97, num_protected=12, width=64)
    plan = bipartite_soft_matching(metric, 30, 12)
    plan_cuda = bipartite_soft_matching(metric.cuda(), 30, 12)
    assert torch.equal(plan_cuda.src_idx.cpu(), plan.src_idx)
    assert torch.equal(plan_cuda.dst_idx.cpu(), plan.dst_idx)
    got, got_s = merge_wavg(plan_cuda, x.cuda(), size.cuda())
    want, want_s = merge_wavg(plan, x, size)
    torch.testing.assert_close(got.cpu(), want)
    torch.testing.assert_close(got_s.cpu(), want_s)


# --------------------------------------------------------------------------------------
# Frame compression
# --------------------------------------------------------------------------------------


def reference_compress_one(tokens: torch.Tensor, num_groups: int, num_protected: int):
    """One video, (N, T, C): recompute every adjacent similarity after every merge."""
    tokens = tokens.double()

    def mean(group: List[int]) -> torch.Tensor:
        return tokens[group].mean(dim=0)  # every original frame has weight 1

    def similarity(u: torch.Tensor, v: torch.Tensor) -> float:
        cos = F.cosine_similarity(u[num_protected:], v[num_protected:], dim=-1, eps=1e-12)
        return cos.mean().item()

    groups = [[i] for i in range(tokens.shape[0])]
    first_merge = None
    while len(groups) > num_groups:
        best, best_i = -math.inf, -1
        for i in range(len(groups) - 1):
            s = similarity(mean(groups[i]), mean(groups[i + 1]))
            if s > best:  # strict: ties keep the earliest pair
                best, best_i = s, i
        if first_merge is None:
            first_merge = (groups[best_i][-1], groups[best_i + 1][0])
        groups[best_i : best_i + 2] = [groups[best_i] + groups[best_i + 1]]

    reps = []
    for group in groups:
        scores = [similarity(tokens[i], mean(group)) for i in group]
        reps.append(group[scores.index(max(scores))])  # index() = earliest maximum
    merged = torch.stack([mean(g) for g in groups])
    return groups, merged, reps, first_merge


def _check_structure(out: FrameCompression, num_frames: int, num_groups: int) -> None:
    batch = out.tokens.shape[0]
    assert out.tokens.shape[1] == num_groups and out.num_groups == num_groups
    assert out.sizes.shape == (batch, num_groups) and out.sizes.dtype == torch.float32
    assert out.representatives.shape == (batch, num_groups)
    assert out.bounds.shape == (batch, num_groups, 2)
    assert len(out.groups) == batch
    for b, groups in enumerate(out.groups):
        assert len(groups) == num_groups
        assert [i for g in groups for i in g] == list(range(num_frames))  # cover, in order
        for f, group in enumerate(groups):
            assert group == list(range(group[0], group[-1] + 1))  # contiguous
            assert out.sizes[b, f].item() == len(group)
            assert out.bounds[b, f].tolist() == [group[0], group[-1]]
            assert out.representatives[b, f].item() in group
        assert out.sizes[b].sum().item() == num_frames


def _random_walk(batch, num_frames, num_tokens, width, seed, step=0.3, dtype=torch.float64):
    """Videos with temporal structure: each frame is the previous one plus noise."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, num_frames, num_tokens, width, generator=gen, dtype=dtype)
    noise[:, 1:] *= step
    return noise.cumsum(dim=1)


@pytest.mark.parametrize(
    "num_frames,num_groups,num_protected,kind",
    [(32, 12, 1, "walk"), (32, 12, 1, "iid"), (17, 5, 0, "walk"), (12, 1, 2, "walk"),
     (9, 8, 1, "iid")],
)
def test_compress_matches_loop_reference(num_frames, num_groups, num_protected, kind) -> None:
    seed = 7 * num_frames + num_groups
    if kind == "walk":
        tokens = _random_walk(3, num_frames, 6, 16, seed)
    else:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randn(3, num_frames, 6, 16, generator=gen, dtype=torch.float64)
    out = compress_frames(tokens, num_groups, num_protected)
    _check_structure(out, num_frames, num_groups)
    for b in range(3):
        groups, merged, reps, _ = reference_compress_one(tokens[b], num_groups, num_protected)
        assert out.groups[b] == groups
        assert out.representatives[b].tolist() == reps
        torch.testing.assert_close(out.tokens[b], merged, rtol=1e-12, atol=1e-12)


def test_compress_float32_matches_reference() -> None:
    tokens = _random_walk(2, 32, 50, 64, seed=3, dtype=torch.float32)
    out = compress_frames(tokens, 12)
    assert out.tokens.dtype == torch.float32
    _check_structure(out, 32, 12)
    for b in range(2):
        groups, merged, reps, _ = reference_compress_one(tokens[b], 12, 1)
        assert out.groups[b] == groups and out.representatives[b].tolist() == reps
        torch.testing.assert_close(out.tokens[b].double(), merged, rtol=1e-5, atol=1e-5)


def test_duplicate_frames_merge_first() -> None:
    # +-1 entries (C = 64): all dot products are integers, so the duplicates' scores tie
    # exactly and the representative tie-break is tested, not rounding.
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 2, (1, 10, 50, 64), generator=gen).float() * 2 - 1
    tokens[:, 5] = tokens[:, 4]
    out = compress_frames(tokens, 9)
    assert out.groups[0][4] == [4, 5]
    assert out.representatives[0, 4].item() == 4  # exact tie: the earliest member
    torch.testing.assert_close(out.tokens[0, 4], tokens[0, 4])
    # The reference agrees on the first merge with more merges to go.
    _, _, _, first = reference_compress_one(tokens[0], 6, 1)
    assert first == (4, 5)
    assert [4, 5] == [i for g in compress_frames(tokens, 6).groups[0] for i in g if i in (4, 5)]


def test_tokens_are_weighted_means_and_differentiable() -> None:
    tokens = _random_walk(2, 16, 5, 8, seed=11, dtype=torch.float32).requires_grad_(True)
    out = compress_frames(tokens, 6)
    for b in range(2):
        for f, group in enumerate(out.groups[b]):
            torch.testing.assert_close(out.tokens[b, f], tokens[b, group].mean(dim=0))
    out.tokens.sum().backward()
    # d(sum of group means)/d(frame) = 1 / |group| at every position, CLS included.
    expected = torch.zeros(2, 16)
    for b in range(2):
        for group in out.groups[b]:
            expected[b, group] = 1.0 / len(group)
    torch.testing.assert_close(tokens.grad, expected[:, :, None, None].expand_as(tokens))


def test_identity_when_no_compression() -> None:
    tokens = torch.randn(2, 12, 5, 8)
    out = compress_frames(tokens, 12)
    assert torch.equal(out.tokens, tokens)
    assert torch.equal(out.sizes, torch.ones(2, 12))
    assert out.groups == [[[i] for i in range(12)]] * 2
    assert out.representatives.tolist() == [list(range(12))] * 2
    assert out.bounds[..., 0].tolist() == out.bounds[..., 1].tolist() == [list(range(12))] * 2


def test_compress_errors() -> None:
    tokens = torch.randn(2, 8, 5, 4)
    with pytest.raises(ValueError):
        compress_frames(tokens, 9)
    with pytest.raises(ValueError):
        compress_frames(tokens, 0)
    with pytest.raises(ValueError):
        compress_frames(tokens[0], 4)
    with pytest.raises(ValueError):
        compress_frames(tokens, 4, num_protected=5)


def test_deterministic_and_batch_independent() -> None:
    tokens = _random_walk(4, 32, 50, 64, seed=21, dtype=torch.float32)
    out = compress_frames(tokens, 12)
    again = compress_frames(tokens, 12)
    assert out.groups == again.groups
    assert torch.equal(out.tokens, again.tokens)
    assert torch.equal(out.representatives, again.representatives)
    for b in range(4):
        alone = compress_frames(tokens[b : b + 1], 12)
        assert alone.groups[0] == out.groups[b]
        assert torch.equal(alone.representatives[0], out.representatives[b])
        torch.testing.assert_close(alone.tokens[0], out.tokens[b], rtol=1e-6, atol=1e-6)


def test_compress_low_precision() -> None:
    tokens = _random_walk(2, 16, 10, 32, seed=4, dtype=torch.float32)
    out32 = compress_frames(tokens, 6)
    out16 = compress_frames(tokens.bfloat16(), 6)
    assert out16.tokens.dtype == torch.bfloat16
    _check_structure(out16, 16, 6)
    if out16.groups == out32.groups:
        torch.testing.assert_close(out16.tokens.float(), out32.tokens, rtol=3e-2, atol=3e-2)


@pytest.mark.cuda
def test_compress_cuda_matches_cpu() -> None:
    tokens = _random_walk(8, 32, 50, 768, seed=9, dtype=torch.float32)
    out = compress_frames(tokens, 12)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the Gram GEMM in full float32
    try:
        out_cuda = compress_frames(tokens.cuda(), 12)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    assert out_cuda.groups == out.groups
    assert torch.equal(out_cuda.representatives.cpu(), out.representatives)
    torch.testing.assert_close(out_cuda.tokens.cpu(), out.tokens)
