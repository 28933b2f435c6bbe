"""Bipartite soft matching with protected tokens (ToMe, as used by TempMe's ImgMe / ClipMe).

DESIGN 2.5. The matching follows TempMe's ``tvr/models/module_tome_merge.py``:

* the first ``num_protected`` tokens (CLS, prompts) are never merged;
* the other tokens are split alternately by their ABSOLUTE position in the sequence:
  set A = even positions, set B = odd positions;
* on the L2-normalised metric, every A token finds its most similar B token; the ``r`` A
  tokens with the highest such similarity are merged into their B token;
* the output order is ``[protected, unmerged A (original order), all B (original order)]``.

Unlike the reference, the matching is returned as data (:class:`MergePlan`) instead of a
closure, so the plan can be inspected, tested and applied to several tensors (hidden
states, sizes, source maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MergePlan",
    "bipartite_soft_matching",
    "merge_tokens",
    "merge_wavg",
    "merge_source",
    "split_tokens",
    "work_dtype",
]


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Floating dtype for arithmetic: at least float32, so fp16/bf16 inputs score and
    average in float32 (float64 inputs stay float64)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _expand_idx(idx: Tensor, width: int) -> Tensor:
    """(B, K) index -> (B, K, width), the layout gather/scatter along dim 1 need."""
    return idx[..., None].expand(-1, -1, width)


def split_tokens(x: Tensor, num_protected: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Split a sequence into its protected tokens and the two bipartite sets.

    Args:
        x: (B, T, ...) tokens.
        num_protected: number of leading tokens that are never merged.

    Returns:
        ``(protected (B, c, ...), a (B, nA, ...), b (B, nB, ...))`` where A holds the tokens
        at even absolute positions ``c, c+2, ...`` or ``c+1, c+3, ...`` (whichever are even)
        and B the odd ones. With P = T - c: nA = ceil(P/2), nB = floor(P/2) when c is even;
        nA = floor(P/2), nB = ceil(P/2) when c is odd.
    """
    protected = x[:, :num_protected]
    patches = x[:, num_protected:]
    # Patch i sits at absolute position num_protected + i: it is even when i has the
    # parity of num_protected. This is the reference's `cls_num % 2` branch.
    a_start = num_protected % 2
    return protected, patches[:, a_start::2], patches[:, 1 - a_start :: 2]


@dataclass(frozen=True, eq=False)
class MergePlan:
    """The outcome of a bipartite matching: which A tokens merge into which B tokens.

    Indices are relative to the A / B sets of :func:`split_tokens` (not to the sequence).

    Attributes:
        num_protected: c, leading tokens kept untouched.
        num_tokens: T, the sequence length the plan was computed for.
        unmerged_idx: (B, nA - r) long, A tokens that stay, ascending.
        src_idx: (B, r) long, A tokens merged away, by decreasing best similarity.
        dst_idx: (B, r) long, the B token each ``src_idx`` entry merges into.
    """

    num_protected: int
    num_tokens: int
    unmerged_idx: Tensor
    src_idx: Tensor
    dst_idx: Tensor

    @property
    def r(self) -> int:
        """Number of tokens removed by the merge."""
        return int(self.src_idx.shape[-1])

    @property
    def num_a(self) -> int:
        return int(self.unmerged_idx.shape[-1]) + self.r

    @property
    def num_b(self) -> int:
        return self.num_tokens - self.num_protected - self.num_a

    @property
    def num_out(self) -> int:
        """Sequence length after the merge: T - r."""
        return self.num_tokens - self.r

    @property
    def is_identity(self) -> bool:
        """r == 0: applying the plan returns its input unchanged (same order)."""
        return self.r == 0


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int) -> MergePlan:
    """Compute a ToMe/TempMe bipartite merge plan.

    Args:
        metric: (B, T, C) similarity features (e.g. keys averaged over heads). Only used to
            choose indices: nothing in the plan carries gradients.
        r: number of tokens to remove. Clamped to ``[0, (T - num_protected) // 2]`` (the
            reference callers clamp the same way; at most every A token can merge, and the
            smaller set has (T - c) // 2 tokens). After the clamp, r == 0 gives an identity
            plan (the reference's ``do_nothing``: the sequence keeps its original order).
        num_protected: c, leading tokens that are never merged (0 <= c <= T).

    Returns:
        A :class:`MergePlan` with ``num_out == T - r``.

    Ties are deterministic: an A token whose best score is shared by several B tokens picks
    the earliest one (``max`` returns the first maximum) and A tokens with equal best
    scores are ranked earliest first (stable sort), where the reference's unstable argsort
    leaves both unspecified.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, T, C), got shape {tuple(metric.shape)}")
    batch, num_tokens, _ = metric.shape
    if not 0 <= num_protected <= num_tokens:
        raise ValueError(f"num_protected={num_protected} outside [0, T={num_tokens}]")
    r = max(0, min(int(r), (num_tokens - num_protected) // 2))

    with torch.no_grad():
        _, a, b = split_tokens(metric, num_protected)
        num_a = a.shape[1]
        if r == 0:
            unmerged = torch.arange(num_a, device=metric.device).expand(batch, num_a)
            empty = torch.zeros(batch, 0, dtype=torch.long, device=metric.device)
            return MergePlan(num_protected, num_tokens, unmerged, empty, empty)

        # Cosine scores in (at least) float32: bf16 scores would create spurious ties.
        # F.normalize clamps the norm, so an all-zero token scores 0 instead of NaN.
        work = work_dtype(metric.dtype)
        a = F.normalize(a.to(work), dim=-1)
        b = F.normalize(b.to(work), dim=-1)
        scores = a @ b.transpose(-1, -2)  # (B, nA, nB)

        best_score, best_b = scores.max(dim=-1)  # (B, nA); first maximum on ties
        order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
        src_idx = order[:, :r]
        dst_idx = best_b.gather(dim=-1, index=src_idx)
        # Unmerged A tokens go back to sequence order, as in TempMe (ToMe keeps score order).
        unmerged_idx = order[:, r:].sort(dim=-1).values

    return MergePlan(num_protected, num_tokens, unmerged_idx, src_idx, dst_idx)


def _check_input(plan: MergePlan, x: Tensor) -> None:
    if x.dim() != 3 or x.shape[1] != plan.num_tokens or x.shape[0] != plan.src_idx.shape[0]:
        raise ValueError(
            f"expected (B={plan.src_idx.shape[0]}, T={plan.num_tokens}, C), got {tuple(x.shape)}"
        )


def merge_tokens(plan: MergePlan, x: Tensor, mode: str = "sum") -> Tensor:
    """Apply a plan with a plain reduction (the reference's ``merge(x, mode)``).

    Args:
        plan: from :func:`bipartite_soft_matching`.
        x: (B, T, C) tokens; gradients flow through the gather / scatter.
        mode: ``torch.scatter_reduce`` reduction for each B token and the A tokens merged
            into it ("sum", "mean", "amax", "amin", "prod"); the B token itself is included.

    Returns:
        (B, T - r, C): ``[protected, unmerged A, reduced B]``; ``x`` itself when r == 0.
    """
    _check_input(plan, x)
    if plan.is_identity:
        return x
    protected, a, b = split_tokens(x, plan.num_protected)
    width = x.shape[-1]
    unmerged = a.gather(dim=1, index=_expand_idx(plan.unmerged_idx, width))
    src = a.gather(dim=1, index=_expand_idx(plan.src_idx, width))
    b = b.scatter_reduce(1, _expand_idx(plan.dst_idx, width), src, reduce=mode)
    return torch.cat([protected, unmerged, b], dim=1)


def merge_wavg(
    plan: MergePlan, x: Tensor, size: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Size-weighted merge (ToMe ``merge_wavg``): x' = sum(x * s) / sum(s), s' = sum(s).

    Args:
        plan: from :func:`bipartite_soft_matching`.
        x: (B, T, C) tokens (any float dtype); gradients flow to ``x``.
        size: (B, T, 1) how many original tokens each token stands for; None = all ones.

    Returns:
        ``(x' (B, T - r, C) in x.dtype, size' (B, T - r, 1))``. The averaging runs in at
        least float32 and ``size'`` keeps that dtype (the reference used x's dtype, which
        for bf16 rounds sizes above 256). Tokens that take part in no merge (protected,
        unmerged A, B tokens without sources) are passed through bit-exactly instead of
        being multiplied and divided by their size, which only differs from the
        reference by rounding.
    """
    _check_input(plan, x)
    batch, _, width = x.shape
    if size is None:
        size = torch.ones(batch, plan.num_tokens, 1, dtype=torch.float32, device=x.device)
    if size.shape != (batch, plan.num_tokens, 1):
        raise ValueError(f"size must be {(batch, plan.num_tokens, 1)}, got {tuple(size.shape)}")
    work = work_dtype(x.dtype, size.dtype)
    size = size.to(work)
    if plan.is_identity:
        return x, size

    protected, a, b = split_tokens(x, plan.num_protected)
    size_p, size_a, size_b = split_tokens(size, plan.num_protected)

    unmerged = a.gather(dim=1, index=_expand_idx(plan.unmerged_idx, width))
    size_unmerged = size_a.gather(dim=1, index=_expand_idx(plan.unmerged_idx, 1))

    size_src = size_a.gather(dim=1, index=_expand_idx(plan.src_idx, 1))
    src = a.gather(dim=1, index=_expand_idx(plan.src_idx, width)).to(work) * size_src
    dst_x = (b.to(work) * size_b).scatter_add(1, _expand_idx(plan.dst_idx, width), src)
    dst_size = size_b.scatter_add(1, _expand_idx(plan.dst_idx, 1), size_src)

    received = torch.zeros_like(size_b, dtype=torch.bool)
    received = received.scatter(1, _expand_idx(plan.dst_idx, 1), True)
    b_out = torch.where(received, (dst_x / dst_size).to(x.dtype), b)

    x_out = torch.cat([protected, unmerged, b_out], dim=1)
    size_out = torch.cat([size_p, size_unmerged, dst_size], dim=1)
    return x_out, size_out


def merge_source(plan: MergePlan, source: Optional[Tensor] = None) -> Tensor:
    """Track which original tokens each merged token holds (ToMe ``merge_source``).

    Args:
        plan: from :func:`bipartite_soft_matching`.
        source: (B, T, S) 0/1 membership of the current tokens over S original tokens;
            None = identity (S = T).

    Returns:
        (B, T - r, S): row i marks the original tokens merged into output token i.
    """
    if source is None:
        batch = plan.src_idx.shape[0]
        eye = torch.eye(plan.num_tokens, device=plan.src_idx.device)
        source = eye[None].expand(batch, -1, -1)
    return merge_tokens(plan, source, mode="amax")
