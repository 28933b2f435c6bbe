"""TempMe stage 1: compress N sampled frames into F groups of adjacent frames (DESIGN 2.4).

Greedy agglomerative merging along time: while more than F groups remain, the most similar
pair of temporally ADJACENT groups is merged. Similarity of two groups = mean over the patch
positions (protected tokens such as CLS excluded) of the cosine between the two groups'
current tokens, a group's tokens being the size-weighted mean of its member frames.

The greedy choice is index bookkeeping under ``no_grad``; the output tokens are then
recomputed as a differentiable segment mean of the input tokens, so gradients reach every
input frame (the choice of pairs is, as usual for ToMe, not differentiable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.token_merging import work_dtype

__all__ = ["FrameCompression", "compress_frames"]


@dataclass
class FrameCompression:
    """Result of :func:`compress_frames` for B videos, N frames -> F groups.

    Attributes:
        tokens: (B, F, T, C) size-weighted mean tokens of each group (input dtype).
        sizes: (B, F) float32, member count of each group (sums to N per video).
        groups: B lists of F lists of original frame positions (contiguous, ascending).
        representatives: (B, F) long, position in 0..N-1 of the member whose original
            tokens are closest (mean patch cosine) to the group's mean tokens.
        bounds: (B, F, 2) long, first and last member position of each group.
    """

    tokens: Tensor
    sizes: Tensor
    groups: List[List[List[int]]]
    representatives: Tensor
    bounds: Tensor

    @property
    def num_groups(self) -> int:
        return int(self.tokens.shape[1])


def _patch_gram(patches: Tensor) -> Tensor:
    """Per-patch-position Gram matrices of the frames: (B, N, P, C) -> (B, P, N, N).

    G[b, p, i, j] = <x_i[p], x_j[p]>. Every similarity the greedy merge and the
    representative choice need is a ratio of sums of these entries, because a group's
    mean is proportional to the sum of its members. One pass over the tokens (a GEMM)
    replaces repeated normalisations of (B, N, P, C) tensors.
    """
    work = work_dtype(patches.dtype)
    # One bmm per video over the strided (P, N, C) view: batching (B, P) together would
    # force a copy of the whole tensor, which costs more than the GEMM itself on CPU.
    return torch.stack(
        [torch.bmm(v.transpose(0, 1), v.permute(1, 2, 0)) for v in patches.to(work)]
    )


def _gram_cosine(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """Mean over patch positions of cos = <a, b> / (|a| |b|), from dot products.

    Args: (..., P) dot products and squared norms. Returns (...).
    The 1e-12 norm floor matches F.normalize: an all-zero token has cosine 0.
    """
    norm_a = sq_a.clamp_min(0).sqrt().clamp_min(1e-12)
    norm_b = sq_b.clamp_min(0).sqrt().clamp_min(1e-12)
    return (dot / (norm_a * norm_b)).mean(dim=-1)


def _greedy_adjacent_merge(gram: Tensor, num_groups: int) -> Tensor:
    """Choose the groups; returns the (B, N) bool mask of frames that start a group.

    Args:
        gram: (B, P, N, N) per-position Gram matrices of the frames (see _patch_gram).
        num_groups: F, 1 <= F < N.

    A group is stored at its first frame ("start"); its row/column of the working Gram
    matrix hold dot products of the group's token SUM with the other groups' sums
    (cosine does not care about the 1/size of the mean). Merging the right group into the
    left one adds its row and column, and only the two similarities involving the merged
    group are recomputed. Neighbours are a doubly linked list over starts; slot N is a
    sentinel (zero row/column, similarity -inf) that missing neighbours point at, so the
    batched updates need no bounds checks.
    """
    batch, _, n, _ = gram.shape
    device, dtype = gram.device, gram.dtype
    sentinel = n

    g = F.pad(gram, (0, 1, 0, 1))  # (B, P, N+1, N+1), sentinel row/column all zero
    slots = torch.arange(n + 1, device=device)
    nxt = (slots + 1).clamp(max=sentinel).expand(batch, -1).clone()
    prv = torch.where(slots == 0, sentinel, slots - 1).expand(batch, -1).clone()

    diag = g.diagonal(dim1=-2, dim2=-1)  # (B, P, N+1), a view: follows in-place updates
    # sim[s]: similarity of the group starting at s to the next group; -inf where there is
    # no next group or s starts no group, so argmax never picks it.
    sim = torch.full((batch, n + 1), float("-inf"), dtype=dtype, device=device)
    first = torch.arange(n - 1, device=device)
    sim[:, : n - 1] = _gram_cosine(
        g[:, :, first, first + 1].transpose(1, 2),
        diag[:, :, : n - 1].transpose(1, 2),
        diag[:, :, 1:n].transpose(1, 2),
    )
    alive = torch.ones(batch, n, dtype=torch.bool, device=device)

    rows = torch.arange(batch, device=device)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    for _ in range(n - num_groups):
        left = sim.argmax(dim=1)  # first maximum: ties go to the earliest pair
        right = nxt[rows, left]
        after = nxt[rows, right]
        before = prv[rows, left]

        # Row then column: the (left, left) entry ends up with all four cross terms.
        g[rows, :, left, :] += g[rows, :, right, :]
        g[rows, :, :, left] += g[rows, :, :, right]

        alive[rows, right] = False
        nxt[rows, left] = after
        prv[rows, after] = left  # writes the sentinel's entry when there is no `after`
        sim[rows, right] = neg_inf
        sq_left = diag[rows, :, left]
        sim[rows, left] = torch.where(
            after == sentinel,
            neg_inf,
            _gram_cosine(g[rows, :, left, after], sq_left, diag[rows, :, after]),
        )
        # When `before` is the sentinel this writes -inf into the sentinel: harmless.
        sim[rows, before] = torch.where(
            before == sentinel,
            neg_inf,
            _gram_cosine(g[rows, :, before, left], diag[rows, :, before], sq_left),
        )

    return alive


def _identity(tokens: Tensor) -> FrameCompression:
    batch, n = tokens.shape[:2]
    positions = torch.arange(n, device=tokens.device).expand(batch, n)
    return FrameCompression(
        tokens=tokens,
        sizes=torch.ones(batch, n, dtype=torch.float32, device=tokens.device),
        groups=[[[i] for i in range(n)] for _ in range(batch)],
        representatives=positions.clone(),
        bounds=torch.stack([positions, positions], dim=-1),
    )


def compress_frames(tokens: Tensor, num_groups: int, num_protected: int = 1) -> FrameCompression:
    """Merge N frames into ``num_groups`` contiguous groups (TempMe frame compression).

    Args:
        tokens: (B, N, T, C) per-frame tokens (layer-0, after ln_pre), any float dtype, any
            device. Gradients flow to them through the output tokens.
        num_groups: F, 1 <= F <= N. F == N returns the input unchanged.
        num_protected: leading tokens per frame left out of the similarity (CLS). They are
            still averaged into the group tokens like every other position.

    Returns:
        :class:`FrameCompression`. Deterministic; ties go to the earliest position.

    Notes:
        The similarities come from per-patch Gram matrices (dot products of group sums),
        which is the same cosine of the size-weighted means, computed with one GEMM
        instead of re-normalising (B, N, T, C) tensors at every step. If TF32 matmuls are
        enabled on CUDA that GEMM runs in TF32 (the choice of groups may then differ from
        float32 on near-ties; the output tokens are unaffected). On CUDA the group sums use
        atomic index_add, so the tokens are bit-reproducible only under
        ``torch.use_deterministic_algorithms(True)``.

    Raises:
        ValueError: on a bad shape, F outside [1, N] or no unprotected token.
    """
    if tokens.dim() != 4:
        raise ValueError(f"tokens must be (B, N, T, C), got shape {tuple(tokens.shape)}")
    batch, n, num_tokens, width = tokens.shape
    if not 1 <= num_groups <= n:
        raise ValueError(f"num_groups={num_groups} must be in [1, N={n}]")
    if not 0 <= num_protected < num_tokens:
        raise ValueError(f"num_protected={num_protected} must be in [0, T={num_tokens})")
    if num_groups == n:
        return _identity(tokens)

    device, work = tokens.device, work_dtype(tokens.dtype)
    work_tokens = tokens.to(work)  # converted once (bf16 -> float32 is not free on CPU)
    with torch.no_grad():
        gram = _patch_gram(work_tokens[:, :, num_protected:])  # (B, P, N, N)
        starts_mask = _greedy_adjacent_merge(gram, num_groups)
    # Frame i belongs to the group of the last start at or before it (frame 0 always starts).
    group_of = starts_mask.long().cumsum(dim=1) - 1  # (B, N) in 0..F-1
    rows = torch.arange(batch, device=device)

    # Differentiable segment mean. index_add rather than a one-hot matmul, so TF32 matmul
    # settings cannot round the output tokens.
    flat_group = (group_of + rows[:, None] * num_groups).reshape(-1)
    sizes = torch.zeros(batch * num_groups, dtype=torch.float32, device=device)
    sizes.index_add_(0, flat_group, torch.ones(batch * n, device=device))
    # In place on a fresh buffer: at (8, 32, 50, 768) every extra copy is a visible cost.
    merged = torch.zeros(batch * num_groups, num_tokens, width, dtype=work, device=device)
    merged.index_add_(0, flat_group, work_tokens.reshape(batch * n, num_tokens, width))
    merged.div_(sizes.to(work)[:, None, None])
    out_tokens = merged.view(batch, num_groups, num_tokens, width).to(tokens.dtype)
    sizes = sizes.view(batch, num_groups)

    with torch.no_grad():
        # Representative: the member whose original tokens have the highest mean patch
        # cosine to the group mean (= to the group sum), again from the Gram matrices:
        # <x_i, S_g> = sum_{j in g} G[i, j] and |S_g|^2 = sum_{i, j in g} G[i, j].
        member = group_of[:, None, :] == torch.arange(num_groups, device=device)[None, :, None]
        to_group = gram @ member.transpose(1, 2).to(gram.dtype)[:, None]  # (B, P, N, F)
        own = group_of[:, None, :, None].expand(-1, to_group.shape[1], -1, 1)
        dot_own = to_group.gather(-1, own).squeeze(-1)  # (B, P, N): <x_i, S_group(i)>
        group_sq = torch.zeros_like(to_group[..., 0, :]).scatter_add(-1, own.squeeze(-1), dot_own)
        score = _gram_cosine(
            dot_own.transpose(1, 2),
            gram.diagonal(dim1=-2, dim2=-1).transpose(1, 2),
            group_sq.gather(-1, own.squeeze(-1)).transpose(1, 2),
        )  # (B, N)
        score = torch.where(member, score[:, None, :], float("-inf"))  # (B, F, N)
        representatives = score.argmax(dim=-1)  # first maximum: earliest member on ties

        positions = torch.arange(n, device=device).expand(batch, n)
        starts = positions[starts_mask].view(batch, num_groups)
        ends = torch.cat([starts[:, 1:], torch.full_like(starts[:, :1], n)], dim=1) - 1
        bounds = torch.stack([starts, ends], dim=-1)

    groups = [[list(range(s, e + 1)) for s, e in video] for video in bounds.tolist()]
    return FrameCompression(out_tokens, sizes, groups, representatives, bounds)
