"""Model stage: batched forwards, side by side on CPU (forward lanes), one at a time on CUDA.

:func:`encode_batch` turns decoded videos into :class:`~modules.writers.VideoResult` records
(one forward for the batch; when the batch fails, each video alone, so one bad video costs
only itself). :class:`ForwardLanes` runs such batches on up to ``lanes`` threads.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from modules.decode_pool import DecodedVideo
from modules.errors import error_line, one_line
from modules.video_listing import VideoEntry
from modules.video_sampler import normalize_uint8
from modules.writers import VideoResult

__all__ = ["ForwardLanes", "default_parallel_batches", "threads_per_lane", "lane_threads", "encode_batch",
           "model_error", "NON_FINITE_ERROR", "degenerate_rows"]

logger = logging.getLogger(__name__)


#: why a video whose forward gave NaN / infinite numbers or a zero vector failed (never a result)
NON_FINITE_ERROR = ("model error: non-finite (NaN or inf) or zero embedding; "
                    "the checkpoint or weights hold non-finite or huge numbers")


def degenerate_rows(vectors: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """bool (B,): rows of unit-normalised vectors (B, ...) that are no usable result.

    A row is degenerate when any value is NaN or inf, or when its norm is far from 1
    (an overflow inside the model normalises to a zero vector).
    """
    rows = torch.as_tensor(vectors).detach().float().reshape(len(vectors), -1).cpu()
    finite = torch.isfinite(rows).all(dim=1)
    norms = torch.linalg.vector_norm(torch.nan_to_num(rows), dim=1)
    return (~finite | (norms < 0.5)).numpy()


def model_error(err: BaseException) -> str:
    """One-line reason for a video whose forward raised ``err``."""
    return "model error: " + error_line(err, with_type=True)


def encode_batch(model, batch: Sequence[Tuple[VideoEntry, DecodedVideo]],
                 frames: Optional[torch.Tensor] = None) -> List[VideoResult]:
    """One forward for the batch (each video alone if the batch fails) -> one result per video.

    ``frames``: the batch's normalised frames when they are already on the model's device
    (:class:`~modules.device_feed.DeviceLane`), else they are made here from the uint8 frames.
    Successful results carry the embedding, the group features and groups, and the sampled
    video's metadata (its frames are dropped).
    """
    start = time.perf_counter()
    try:
        if frames is None:
            frames = normalize_uint8(torch.stack([d.video.frames for _, d in batch]))
        with torch.inference_mode():
            features = model.encode_videos(frames)
        embeddings = features.video_embeddings.detach().cpu().numpy().astype(np.float32)
        group_features = features.frame_features.detach().cpu().numpy()
        sizes = features.frame_sizes.detach().cpu().numpy()
        reps = features.representatives.detach().cpu().numpy()
    except Exception as err:  # noqa: BLE001 - recorded per video
        if len(batch) == 1:
            entry, decoded = batch[0]
            return [VideoResult.of(entry, "failed", model_error(err), decoded.seconds + time.perf_counter() - start)]
        logger.warning("batch of %d failed (%s); retrying one video at a time", len(batch), one_line(err))
        return [result for one in batch for result in encode_batch(model, [one])]
    share = (time.perf_counter() - start) / len(batch)
    bad = degenerate_rows(embeddings) | ~np.isfinite(group_features.reshape(len(batch), -1)).all(axis=1)
    return [
        VideoResult.of(entry, "failed", NON_FINITE_ERROR, decoded.seconds + share) if bad[i] else
        VideoResult.of(entry, "success", None, decoded.seconds + share,
                       embedding=np.ascontiguousarray(embeddings[i]), group_features=group_features[i],
                       group_sizes=sizes[i], groups=features.groups[i], representatives=reps[i],
                       warning=decoded.video.warning,
                       video=dataclasses.replace(decoded.video, frames=torch.empty(0, dtype=torch.uint8)))
        for i, (entry, decoded) in enumerate(batch)
    ]


def default_parallel_batches(threads: Optional[int] = None) -> int:
    """Batches the model runs at once on CPU: one per torch thread, at most 4.

    On a few cores, single-threaded forwards side by side beat one forward that splits every
    matrix product across the cores: they never wait for each other, and a decode worker
    that takes a core for a moment delays one forward instead of stalling all threads at
    the next synchronisation point (benchmarks/RESULTS.md).
    """
    threads = torch.get_num_threads() if threads is None else threads
    return max(1, min(4, threads))


class ForwardLanes:
    """Run batches through ``run`` on up to ``lanes`` threads at once (torch releases the GIL).

    ``submit`` and ``drain`` return the finished batches' results in the caller's thread, so
    bookkeeping (records, progress bar) stays single-threaded. At most ``lanes`` batches
    are running or finished-but-unread, which keeps memory flat. ``lanes == 1`` runs
    each batch inline.
    """

    def __init__(self, lanes: int, run: Callable[[List[Any]], List[Any]]):
        self.lanes = max(1, int(lanes))
        self.run = run
        self.executor = (concurrent.futures.ThreadPoolExecutor(self.lanes, thread_name_prefix="forward")
                         if self.lanes > 1 else None)
        self.running: set = set()

    def submit(self, batch: List[Any]) -> List[Any]:
        """Start ``batch``; returns the results of batches that finished while lanes were full."""
        if self.executor is None:
            return list(self.run(batch))
        self.running.add(self.executor.submit(self.run, batch))
        finished: List[Any] = []
        while len(self.running) >= self.lanes:
            finished += self._collect()
        return finished

    def drain(self) -> List[Any]:
        """Wait for every running batch; their results."""
        finished: List[Any] = []
        while self.running:
            finished += self._collect()
        return finished

    def _collect(self) -> List[Any]:
        done, self.running = concurrent.futures.wait(self.running, return_when=concurrent.futures.FIRST_COMPLETED)
        return [result for future in done for result in future.result()]

    def close(self) -> None:
        """Wait for running batches, drop queued ones. Safe to call twice."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        self.running = set()


def threads_per_lane(lanes: int) -> int:
    """torch threads each of ``lanes`` side-by-side forwards gets: an equal share, at least 1."""
    return max(1, torch.get_num_threads() // max(1, lanes))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch threads, then restore the previous setting."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def lane_threads(lanes: int):
    """Give torch :func:`threads_per_lane` threads for a block (unchanged for one lane), then restore."""
    return torch_threads(threads_per_lane(lanes))
