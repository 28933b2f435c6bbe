"""Feeding the model on a CUDA device: staging buffers, overlapped uploads, and the sizing rules.

Path of one batch on CUDA (the CPU path keeps its forward lanes and uses none of this)::

    decode workers        uint8 (N, 3, S, S) per video, already resized and cropped by the
                          decoder (swscale scales while it converts YUV to RGB, so the
                          upload carries 224 x 224 frames, not the source resolution)
      -> staging thread   copy into a reused pinned host buffer (B, N, 3, S, S) uint8
                          -> device on a side stream, ``non_blocking=True``
                          -> normalise on the device (uint8 -> float32 CLIP-normalised:
                          the float tensor is 4x the bytes, so it is made where it is used)
      -> main thread      the compute stream waits for the batch's event, runs the forward

The staging thread prepares batch k+1 (host copy, upload, normalisation) while the main
thread runs batch k: the copy engine and the host memcpy overlap the forward, and the
forward never waits on a host copy. Two staging buffers (double buffering) bound host
memory; a buffer is reused only after the copy reading from it has finished (its event).

Sizing rules (pure functions, unit-tested without a device):

- :func:`activation_bytes_per_video` derives a forward's peak memory per video from the
  model's shapes; :func:`choose_batch_size` fits batches into free device memory
  (``torch.cuda.mem_get_info``) with that number.
- :func:`decode_workers_to_keep_up` sizes the decode pool from measured decode and model
  seconds per video; :func:`default_device_workers` is the rule before anything is measured.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from modules.video_sampler import normalize_uint8

__all__ = [
    "ForwardShapes",
    "activation_bytes_per_video",
    "upload_bytes_per_video",
    "device_bytes_per_video",
    "choose_batch_size",
    "device_batch_size",
    "decode_workers_to_keep_up",
    "default_device_workers",
    "BufferPool",
    "DeviceFeeder",
    "DeviceLane",
    "MAX_DEVICE_BATCH",
    "ACTIVATION_MARGIN",
]

#: largest batch the rule picks: 32 videos are 1024 frames through the patch embedding and
#: 384 frame groups through the encoder, far past the size that fills a GPU with ViT-B/32;
#: larger batches only hold more decoded videos in host memory and delay the first outputs
MAX_DEVICE_BATCH = 32
#: the derived terms of activation_bytes_per_video cover 93% of the peak the tests' tensor
#: meter measures for ViT-B/32 (54.3 of 57.5 MiB per video, fp32, CPU); the margin keeps the
#: estimate an upper bound (tests/test_device_feed.py, and against CUDA's allocator in the GPU check)
ACTIVATION_MARGIN = 1.25
#: device memory left unused: cuBLAS/cuDNN workspaces, allocator rounding and fragmentation
RESERVE_FRACTION = 0.1
RESERVE_MIN_BYTES = 512 * 2**20
_FLOAT32 = 4


# ----------------------------------------------------------------------------- memory rule


@dataclass(frozen=True)
class ForwardShapes:
    """The shapes that size one video's forward.

    frames: N sampled frames; size: S (frames are S x S); tokens: L = grid^2 + 1 per frame;
    width: W of the vision transformer; groups: F frame groups after compression;
    prompts: P temporal prompt tokens per frame (0 without temporal prompts).
    """

    frames: int
    size: int
    tokens: int
    width: int
    groups: int
    prompts: int = 0

    @classmethod
    def of_config(cls, config) -> "ForwardShapes":
        """The shapes a :class:`~config.UnifiedModelConfig` gives with its ``tempme.base_encoder``'s
        published CLIP architecture (before any weights are loaded)."""
        from modules.clip_archs import CLIP_ARCHS, canonical_arch_name

        arch = CLIP_ARCHS[canonical_arch_name(config.tempme.base_encoder)]
        grid = config.video_size // arch["vision_patch_size"]
        return cls(frames=config.num_segments, size=config.video_size, tokens=grid * grid + 1,
                   width=arch["vision_width"], groups=config.max_frames,
                   prompts=config.stop.num_prompts if config.stop.temporal_prompt != "none" else 0)

    @classmethod
    def of_model(cls, model) -> "ForwardShapes":
        """The shapes of an :class:`~unified_model.UnifiedTempMeSTOPModel`."""
        config = model.config
        visual = model.clip.visual
        return cls(frames=config.num_segments, size=config.video_size, tokens=visual.grid_size ** 2 + 1,
                   width=visual.width, groups=config.max_frames,
                   prompts=config.stop.num_prompts if model.temporal_prompts is not None else 0)


def activation_bytes_per_video(shapes: ForwardShapes, margin: float = ACTIVATION_MARGIN) -> int:
    """Peak bytes one more video adds to an inference forward (float32 activations).

    The terms, each a tensor alive at the peak (the MLP of the encoder's first block, where
    the tests' tensor meter finds it):

    - the normalised input, N x 3 x S x S (held for the whole forward);
    - two token tensors at the full frame count, N x L x W (patch tokens, layer-0 tokens);
    - three MLP hidden tensors of the first encoder block, F x (L + P) x 4W (linear output,
      QuickGELU's sigmoid and product); later blocks merge tokens and frames, so they are
      smaller;
    - two residual-stream tensors, F x (L + P) x W.

    Under fp16/bf16 autocast most of these are half as big, so float32 is an upper bound.
    """
    s = shapes
    elements = (s.frames * 3 * s.size * s.size
                + 2 * s.frames * s.tokens * s.width
                + 3 * s.groups * (s.tokens + s.prompts) * 4 * s.width
                + 2 * s.groups * (s.tokens + s.prompts) * s.width)
    return int(math.ceil(margin * elements * _FLOAT32))


def upload_bytes_per_video(shapes: ForwardShapes) -> int:
    """Device bytes of one video of the *next* batch, uploaded while this one runs:
    its uint8 frames and their normalised float32 copy (5 bytes per pixel value)."""
    return shapes.frames * 3 * shapes.size * shapes.size * (1 + _FLOAT32)


def device_bytes_per_video(shapes: ForwardShapes) -> int:
    """What one video of a batch costs on the device: its forward plus its upload ahead."""
    return activation_bytes_per_video(shapes) + upload_bytes_per_video(shapes)


def choose_batch_size(free_bytes: int, per_video_bytes: int, reserve_bytes: Optional[int] = None,
                      max_batch: int = MAX_DEVICE_BATCH) -> int:
    """Videos per forward that fit in ``free_bytes`` of device memory.

    ``floor((free - reserve) / per_video)``, clamped to [1, max_batch]; ``reserve`` defaults
    to max(512 MiB, 10% of free). ``free_bytes`` is measured after the model is on the
    device (``torch.cuda.mem_get_info``), so the weights are already accounted for. Batch
    1 is returned even when it does not fit: the forward then fails with a clear
    out-of-memory error per video instead of the run refusing to start.
    """
    if per_video_bytes <= 0:
        raise ValueError(f"per_video_bytes must be > 0, got {per_video_bytes}")
    if reserve_bytes is None:
        reserve_bytes = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * free_bytes))
    fit = (int(free_bytes) - int(reserve_bytes)) // int(per_video_bytes)
    return max(1, min(int(max_batch), fit))


def device_batch_size(model, max_batch: int = MAX_DEVICE_BATCH) -> int:
    """:func:`choose_batch_size` for ``model`` on its CUDA device, from free memory now."""
    device = model.device
    if device.type != "cuda":
        raise ValueError(f"device_batch_size needs a CUDA model, this one is on {device}")
    free, _total = torch.cuda.mem_get_info(device)
    return choose_batch_size(free, device_bytes_per_video(ForwardShapes.of_model(model)), max_batch=max_batch)


# ----------------------------------------------------------------------------- decode pool rule


def decode_workers_to_keep_up(model_seconds_per_video: float, decode_seconds_per_video: float, cpus: int,
                              headroom: float = 1.25) -> int:
    """Decode processes that keep the model busy: ``ceil(headroom * decode_s / model_s)``.

    Each worker delivers ``1 / decode_s`` videos per second and the model takes
    ``1 / model_s``; the headroom absorbs slow files. At least 1, at most ``cpus - 1``: one
    core stays with the process that assembles batches and launches the kernels.
    """
    if model_seconds_per_video <= 0 or decode_seconds_per_video < 0:
        raise ValueError("model seconds per video must be > 0 and decode seconds >= 0")
    wanted = math.ceil(headroom * decode_seconds_per_video / model_seconds_per_video)
    return max(1, min(wanted, max(1, int(cpus) - 1)))


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_device_workers(local_world: int = 1, cpus: Optional[int] = None, max_workers: int = 16) -> int:
    """Decode processes per rank on CUDA before anything is measured: every core of the
    rank's share but one, at most ``max_workers``.

    On one CPU core decoding a 32-frame sample takes about as long as a whole CPU forward
    (benchmarks/RESULTS.md), while a GPU runs the forward many times faster, so the device
    waits for decoding unless every spare core decodes. ``benchmarks/gpu_check.py``
    measures both sides on a lent card and prints :func:`decode_workers_to_keep_up`'s answer.
    """
    cpus = _available_cpus() if cpus is None else int(cpus)
    share = max(1, cpus // max(1, int(local_world)))
    return max(1, min(int(max_workers), share - 1))


# ----------------------------------------------------------------------------- staging buffers


class Fence(Protocol):
    """What :class:`BufferPool` waits on: ``torch.cuda.Event`` has both methods."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class BufferPool:
    """Reusable host staging buffers (pinned when ``pin``), at most ``capacity`` of them.

    ``acquire(rows, item_shape)`` returns a buffer of at least ``rows`` rows of
    ``item_shape`` (use ``buf[:rows]``); ``release(buf, fence)`` hands it back once the
    device copy reading it is queued: it is reused only after ``fence.query()`` says the
    copy finished (``None``: at once). When all buffers are out, ``acquire`` waits for the
    oldest fence. Pinning is slow (page-locking), which is why buffers are reused; the
    reuse logic does not depend on pinning, so it runs unpinned on a machine without CUDA.
    """

    def __init__(self, capacity: int = 2, pin: bool = False, dtype: torch.dtype = torch.uint8):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.pin = bool(pin)
        self.dtype = dtype
        self.free: List[torch.Tensor] = []
        self.busy: Deque[Tuple[torch.Tensor, Optional[Fence]]] = deque()
        self.allocations = 0  # buffers created so far (reuse keeps this low)
        self.owned = 0  # buffers alive: free, busy or held by the caller (<= capacity)

    def _reclaim(self) -> None:
        still = deque()
        for buf, fence in self.busy:
            if fence is None or fence.query():
                self.free.append(buf)
            else:
                still.append((buf, fence))
        self.busy = still

    def acquire(self, rows: int, item_shape: Sequence[int]) -> torch.Tensor:
        """A buffer of shape (>= rows, *item_shape) that no pending copy reads."""
        item_shape = tuple(int(d) for d in item_shape)
        self._reclaim()
        while True:
            for i, buf in enumerate(self.free):
                if tuple(buf.shape[1:]) == item_shape and buf.shape[0] >= rows:
                    return self.free.pop(i)
            if self.owned < self.capacity:
                break
            if self.free:  # a buffer of the wrong shape or too small: replace it
                self.free.pop(0)
                self.owned -= 1
                break
            if not self.busy:
                raise RuntimeError(f"all {self.capacity} staging buffers are held and none was released")
            buf, fence = self.busy.popleft()  # all out: wait for the oldest copy
            if fence is not None:
                fence.synchronize()
            self.free.append(buf)
        self.allocations += 1
        self.owned += 1
        return torch.empty((rows, *item_shape), dtype=self.dtype, pin_memory=self.pin)

    def release(self, buf: torch.Tensor, fence: Optional[Fence] = None) -> None:
        """Give ``buf`` back; reusable once ``fence`` has completed."""
        self.busy.append((buf, fence))

    @property
    def outstanding(self) -> int:
        """Buffers handed out and not released."""
        return self.owned - len(self.free) - len(self.busy)


# ----------------------------------------------------------------------------- uploads


@dataclass
class Upload:
    """A batch's frames on the device: normalised float32 (B, N, 3, S, S) and the event the
    compute stream must wait for (None on CPU, where the tensor is ready)."""

    frames: torch.Tensor
    ready: Any = None


class DeviceFeeder:
    """Stage uint8 frames in reused (pinned on CUDA) buffers, upload them, normalise on the device.

    On CUDA the copy and the normalisation run on a side stream, so they overlap whatever
    the compute stream is doing; :meth:`take` makes the current stream wait for them. On
    CPU the same calls stage and normalise in place (bit-identical to
    :func:`~modules.video_sampler.normalize_uint8` on the stacked frames), which is how the
    logic is tested without a device.
    """

    def __init__(self, device: torch.device, pool: Optional[BufferPool] = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = pool if pool is not None else BufferPool(capacity=2, pin=self.cuda)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def upload(self, frames: Sequence[Any]) -> Upload:
        """frames: B uint8 arrays/tensors (N, 3, S, S) -> :class:`Upload`."""
        if not frames:
            raise ValueError("upload needs at least one video")
        first = torch.as_tensor(frames[0])
        buf = self.pool.acquire(len(frames), first.shape)
        staged = buf[: len(frames)]
        for i, item in enumerate(frames):
            staged[i].copy_(torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item))
        if not self.cuda:
            out = normalize_uint8(staged)
            self.pool.release(buf)
            return Upload(out)
        with torch.cuda.stream(self.stream):
            on_device = staged.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
            out = normalize_uint8(on_device)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.pool.release(buf, copied)
        return Upload(out, ready)

    def take(self, upload: Upload) -> torch.Tensor:
        """The uploaded frames, safe to use on the current stream."""
        if upload.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(upload.ready)
            upload.frames.record_stream(current)  # the allocator must not reuse it early
        return upload.frames


class DeviceLane:
    """The model stage on CUDA, with :class:`ForwardLanes`'s ``submit``/``drain``/``close``.

    ``submit(batch)`` hands the batch to one staging thread (host copy, upload,
    normalisation: :meth:`DeviceFeeder.upload`), then runs the *previous* batch's forward
    and returns its results: the upload of batch k+1 overlaps the forward of batch k.
    ``run(batch, frames)`` computes one batch; ``frames`` is None when staging failed
    (``run`` then prepares the frames itself, so a failed upload costs speed, not videos).
    ``frames_of(item)`` gives an item's uint8 frames.

    ``busy_seconds`` (inside ``run``) and ``idle_seconds`` (between the end of one forward
    and the start of the next, i.e. the model waiting for decoding and staging) say whether
    the device is fed: ``wait_share`` = idle / (idle + busy).
    """

    def __init__(self, feeder: DeviceFeeder, run: Callable[[List[Any], Optional[torch.Tensor]], List[Any]],
                 frames_of: Callable[[Any], Any]):
        self.feeder = feeder
        self.run = run
        self.frames_of = frames_of
        self.stager = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage")
        self.pending: Optional[Tuple[List[Any], concurrent.futures.Future]] = None
        self.busy_seconds = 0.0
        self.idle_seconds = 0.0
        self._last_end: Optional[float] = None

    def submit(self, batch: List[Any]) -> List[Any]:
        """Start staging ``batch``; run the previous batch; its results."""
        future = self.stager.submit(self.feeder.upload, [self.frames_of(item) for item in batch])
        finished = self._run_pending()
        self.pending = (list(batch), future)
        return finished

    def drain(self) -> List[Any]:
        """Run the batch still waiting; its results."""
        return self._run_pending()

    def _run_pending(self) -> List[Any]:
        if self.pending is None:
            return []
        batch, future = self.pending
        self.pending = None
        try:
            frames = self.feeder.take(future.result())
        except Exception:  # noqa: BLE001 - e.g. out of device memory while uploading: run() copes
            frames = None
        if self._last_end is not None:
            self.idle_seconds += time.perf_counter() - self._last_end
        begin = time.perf_counter()
        try:
            return self.run(batch, frames)
        finally:
            self._last_end = time.perf_counter()
            self.busy_seconds += self._last_end - begin

    @property
    def wait_share(self) -> float:
        """Share of the model stage's time spent waiting for input (0 when nothing ran)."""
        total = self.busy_seconds + self.idle_seconds
        return self.idle_seconds / total if total > 0 else 0.0

    def close(self) -> None:
        """Stop the staging thread (a pending batch is dropped). Safe to call twice."""
        self.pending = None
        self.stager.shutdown(wait=True, cancel_futures=True)
