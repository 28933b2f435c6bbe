"""Text-video retrieval metrics: R@1/5/10, median and mean rank (DESIGN.md section 6).

Ranks come from the full similarity matrix between every caption and every video.
Ties are counted pessimistically: a ground truth tied with k other candidates gets rank
1 + k, so a model that scores everything equally (e.g. all-zero embeddings) ranks last,
not first. NaN scores count as the worst possible score.

A caption has exactly one ground-truth video; a video may have several captions, and its
video-to-text rank is that of its best-ranked caption (the first correct hit).
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

__all__ = ["ground_truth_ranks", "rank_metrics", "retrieval_metrics", "format_metrics", "METRIC_KEYS"]

METRIC_KEYS = ("R1", "R5", "R10", "MdR", "MnR")


def ground_truth_ranks(sim: torch.Tensor, gt_mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """1-based rank of the best ground-truth candidate of every query.

    Args:
        sim: (Q, C) scores, higher = more similar.
        gt_mask: (Q, C) bool, True where the candidate is a correct answer; every row
            needs at least one True.
        chunk: queries processed at a time (bounds memory for large matrices).

    Returns:
        (Q,) int64: 1 + the number of wrong candidates scoring >= the best correct one.
    """
    if sim.shape != gt_mask.shape or sim.dim() != 2:
        raise ValueError(f"sim {tuple(sim.shape)} and gt_mask {tuple(gt_mask.shape)} must be the same 2-D shape")
    if not bool(gt_mask.any(dim=1).all()):
        raise ValueError("every query needs at least one ground-truth candidate")
    ranks = []
    for start in range(0, sim.shape[0], chunk):
        s = sim[start:start + chunk].double()
        m = gt_mask[start:start + chunk].bool()
        s = torch.nan_to_num(s, nan=float("-inf"))
        best = s.masked_fill(~m, float("-inf")).amax(dim=1, keepdim=True)  # (q, 1)
        wrong_at_least = ((s >= best) & ~m).sum(dim=1)
        ranks.append(wrong_at_least + 1)
    return torch.cat(ranks).long()


def rank_metrics(ranks: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> Dict[str, float]:
    """R@1/5/10 (percent), MdR (median rank) and MnR (mean rank) of 1-based ranks."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to summarise")
    return {
        "R1": float(100.0 * np.mean(r <= 1)),
        "R5": float(100.0 * np.mean(r <= 5)),
        "R10": float(100.0 * np.mean(r <= 10)),
        "MdR": float(np.median(r)),
        "MnR": float(np.mean(r)),
    }


def retrieval_metrics(sim: torch.Tensor, caption_video: Union[torch.Tensor, Sequence[int]]) -> Dict[str, Dict[str, float]]:
    """Both directions from a caption-by-video similarity matrix.

    Args:
        sim: (T, V) similarity of caption t and video v.
        caption_video: (T,) index of each caption's video in [0, V).

    Returns:
        {"t2v": {R1, R5, R10, MdR, MnR}, "v2t": {...}}; R@K in percent.
    """
    sim = torch.as_tensor(sim).detach().cpu()
    target = torch.as_tensor(caption_video, dtype=torch.long).cpu()
    num_text, num_video = sim.shape
    if target.shape != (num_text,):
        raise ValueError(f"caption_video must have one entry per caption ({num_text}), got {tuple(target.shape)}")
    if num_text and (int(target.min()) < 0 or int(target.max()) >= num_video):
        raise ValueError(f"caption_video entries must be in [0, {num_video})")
    mask = torch.zeros(num_text, num_video, dtype=torch.bool)
    mask[torch.arange(num_text), target] = True
    if not bool(mask.any(dim=0).all()):
        missing = int((~mask.any(dim=0)).sum())
        raise ValueError(f"{missing} videos have no caption; video-to-text ranks are undefined")
    return {
        "t2v": rank_metrics(ground_truth_ranks(sim, mask)),
        "v2t": rank_metrics(ground_truth_ranks(sim.t(), mask.t())),
    }


def format_metrics(metrics: Dict[str, Dict[str, float]]) -> str:
    """A two-line table of both directions, for logs and CLI output."""
    lines = []
    for direction, label in (("t2v", "text->video"), ("v2t", "video->text")):
        m = metrics[direction]
        lines.append(f"{label}: R@1 {m['R1']:.1f}  R@5 {m['R5']:.1f}  R@10 {m['R10']:.1f}  "
                     f"MdR {m['MdR']:.1f}  MnR {m['MnR']:.1f}")
    return "\n".join(lines)
