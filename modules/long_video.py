"""Long videos as a timeline of windows: windowed encoding, the window table, moments.

``encode_long_video(model, path, window_seconds)`` decodes the video once
(:mod:`modules.window_sampler`), runs the windows through the model in batches of
``batch_windows`` (each window exactly as one short video today: ``num_segments`` frames
-> TempMe -> F frame groups -> head), and returns a :class:`WindowTable`: per window its
span (seconds and original frame numbers), its embedding and its F group features with
their spans, plus the video embedding.

Video embedding: the mean of the window embeddings weighted by the number of video frames
each window holds (the last window may be shorter; overlapping windows count their shared
frames twice), re-normalised to unit length like every other embedding the model writes,
so cosine scores against it mean the same as for short videos. A single window's
embedding is returned as it is (identical to the unwindowed embedding).

Overlap and memory: a background thread decodes while the model runs; it hands over
windows through a queue of ``prefetch`` windows, so decoding window k+1 overlaps the
forward of window k. On CPU the windows go through ``parallel_batches`` single-threaded
forwards side by side, one window each (the directory pipeline's ``ForwardLanes``: on a few
shared cores they beat one forward split across the cores); on CUDA one lane runs
:func:`default_batch_windows` windows per forward (the device batch, at most
``MAX_WINDOW_BATCH``). At most ``prefetch`` queued windows,
the batch being assembled, the lanes' batches and the window being decoded hold frames
at once (about 4.8 MB per window at 32 frames of 224 x 224), whatever the length.

When windows are used (:func:`resolve_window`): ``window_seconds`` > 0 windows every
video, 0 never; None (the default) windows only videos longer than
``AUTO_WINDOW_THRESHOLD`` seconds (10 minutes: what one set of 32 frames still describes
to within a few seconds per group), with windows of ``AUTO_WINDOW_SECONDS``.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from modules.video_sampler import normalize_uint8
from modules.window_sampler import SampledWindow, WindowStream, check_window_args, iter_windows
from modules.writers import WINDOWS_SUFFIX  # per-video window table, named by the writer

__all__ = [
    "AUTO_WINDOW_THRESHOLD",
    "AUTO_WINDOW_SECONDS",
    "MAX_WINDOW_BATCH",
    "WindowTable",
    "Moment",
    "combine_window_embeddings",
    "encode_window_batch",
    "encode_long_video",
    "default_batch_windows",
    "resolve_window",
    "window_moments",
    "video_window",
    "encode_windowed_result",
    "frames_payload_from_table",
    "WINDOWS_SUFFIX",
    "library_moments",
    "retrieve_moments",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: videos longer than this (seconds) are windowed when ``window_seconds`` is None
AUTO_WINDOW_THRESHOLD = 600.0
#: window length (seconds) of the automatic rule: 12 groups of 2.5 s each
AUTO_WINDOW_SECONDS = 30.0
#: most windows per forward on CUDA: 16 x 32 frames already fill a large card, and the host
#: holds about three batches of frames (queued, being assembled, in the forward): ~230 MB
MAX_WINDOW_BATCH = 16


def default_batch_windows(model, device_batch: Optional[int] = None) -> int:
    """Windows per model forward for ``model``.

    CPU: 1 (one window already fills the matrix units; the lanes run windows side by side,
    the measured best, ``benchmarks/RESULTS.md``). CUDA: ``device_batch`` (videos per
    forward; a window is one video for the model), by default what free device memory holds
    (``device_feed.device_batch_size``), capped at ``MAX_WINDOW_BATCH``; at least 1.
    """
    if model.device.type != "cuda":
        return 1
    if device_batch is None:
        from modules.device_feed import device_batch_size

        device_batch = device_batch_size(model)
    return max(1, min(MAX_WINDOW_BATCH, int(device_batch)))


def resolve_window(window_seconds: Optional[float], duration: float) -> Optional[float]:
    """The window length to use for a video of ``duration`` seconds, None for no windows.

    ``window_seconds`` > 0: that; 0: None; None: ``AUTO_WINDOW_SECONDS`` when the video is
    longer than ``AUTO_WINDOW_THRESHOLD``, else None.
    """
    if window_seconds is None:
        return AUTO_WINDOW_SECONDS if duration > AUTO_WINDOW_THRESHOLD else None
    if window_seconds < 0:
        raise ValueError(f"window_seconds must be >= 0 (0 = no windows), got {window_seconds}")
    return float(window_seconds) if window_seconds > 0 else None


def video_window(path: PathLike, window_seconds: Optional[float],
                 window_stride: Optional[float] = None) -> Optional[Tuple[float, float]]:
    """(W, S) when ``path`` is to be encoded by windows, else None.

    ``window_seconds`` as :func:`resolve_window`; the duration is read from the header only
    in the automatic case (None). A header that cannot be read gives None (the ordinary
    sampler then reports the problem).
    """
    if window_seconds is not None and window_seconds <= 0:
        return None
    duration = 0.0
    if window_seconds is None:
        from modules.video_sampler import VideoDecodeError, probe_video

        try:
            duration = probe_video(path)["duration"]
        except VideoDecodeError:
            return None
    window = resolve_window(window_seconds, duration)
    if window is None:
        return None
    return window, check_window_args(window, window_stride if window_seconds is not None else None)


def combine_window_embeddings(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Size-weighted mean of unit window embeddings (K, D), re-normalised -> (D,) float32.

    ``weights`` (K,) >= 0, not all zero (frames per window). K == 1 returns the window's
    embedding unchanged.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0 or w.shape != (emb.shape[0],):
        raise ValueError(f"expected (K, D) embeddings and (K,) weights, got {emb.shape} and {w.shape}")
    if emb.shape[0] == 1:
        return emb[0].copy()
    if not np.all(w >= 0) or w.sum() <= 0:
        raise ValueError("window weights must be >= 0 and not all zero")
    mean = (emb.astype(np.float64) * (w / w.sum())[:, None]).sum(axis=0)
    norm = np.linalg.norm(mean)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("window embeddings cancel out (zero mean); cannot normalise")
    return (mean / norm).astype(np.float32)


@dataclass
class WindowTable:
    """One video as K windows with F frame groups each (all times in seconds).

    Per window (K,): start_times, end_times (the span), start_frames, end_frames (original
    frame numbers of its first and last frame), sizes (frames inside), embeddings (K, D).
    Per group (K, F): group_features (K, F, D), group_sizes (sampled frames merged),
    group_frames (representative original frame), group_timestamps (its time),
    group_start_frames / group_end_frames (first / last sampled original frame),
    group_start_times / group_end_times (span). sampled_frame_indices, sampled_timestamps
    (K, N): the sampled frames of each window.
    """

    video_path: str
    duration: float
    fps: float
    num_frames: int
    window_seconds: float
    window_stride: float
    embedding: np.ndarray
    start_times: np.ndarray
    end_times: np.ndarray
    start_frames: np.ndarray
    end_frames: np.ndarray
    sizes: np.ndarray
    embeddings: np.ndarray
    group_features: np.ndarray
    group_sizes: np.ndarray
    group_frames: np.ndarray
    group_timestamps: np.ndarray
    group_start_frames: np.ndarray
    group_end_frames: np.ndarray
    group_start_times: np.ndarray
    group_end_times: np.ndarray
    sampled_frame_indices: np.ndarray
    sampled_timestamps: np.ndarray
    complete: bool = True
    note: Optional[str] = None
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_windows(self) -> int:
        return int(self.start_times.shape[0])

    #: array fields, in the order the npz stores them
    ARRAYS = ("embedding", "start_times", "end_times", "start_frames", "end_frames", "sizes", "embeddings",
              "group_features", "group_sizes", "group_frames", "group_timestamps", "group_start_frames",
              "group_end_frames", "group_start_times", "group_end_times", "sampled_frame_indices",
              "sampled_timestamps")

    def to_arrays(self) -> Dict[str, np.ndarray]:
        """Everything as numpy arrays (the ``<name>_windows.npz`` payload; no pickles)."""
        out = {name: np.asarray(getattr(self, name)) for name in self.ARRAYS}
        out.update(video_path=np.array(self.video_path), duration=np.float64(self.duration),
                   fps=np.float64(self.fps), num_frames=np.int64(self.num_frames),
                   window_seconds=np.float64(self.window_seconds), window_stride=np.float64(self.window_stride),
                   complete=np.bool_(self.complete), note=np.array(self.note or ""))
        return out

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray]) -> "WindowTable":
        """Inverse of :meth:`to_arrays` (e.g. ``np.load(path, allow_pickle=False)``)."""
        missing = [k for k in cls.ARRAYS + ("video_path", "duration") if k not in arrays]
        if missing:
            raise ValueError(f"not a window table: missing {', '.join(missing)}")
        return cls(video_path=str(arrays["video_path"]), duration=float(arrays["duration"]),
                   fps=float(arrays["fps"]), num_frames=int(arrays["num_frames"]),
                   window_seconds=float(arrays["window_seconds"]), window_stride=float(arrays["window_stride"]),
                   complete=bool(arrays["complete"]), note=str(arrays["note"]) or None,
                   **{k: np.asarray(arrays[k]) for k in cls.ARRAYS})


@dataclass
class Moment:
    """One frame group of one window, in original-video coordinates."""

    window: int
    group: int
    score: float
    start_time: float
    end_time: float
    start_frame: int
    end_frame: int
    frame: int
    timestamp: float
    window_start: float
    window_end: float

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def encode_window_batch(model, frames: np.ndarray):
    """uint8 (B, N, 3, S, S) window frames -> the model's ``VideoFeatures`` for B windows.

    Each window is one "video" of the batch, so a window's embedding and groups are what
    the model computes for a short video with those frames.
    """
    with torch.inference_mode():
        return model.encode_videos(normalize_uint8(frames))


def _window_rows(batch: Sequence[SampledWindow], features, duration_of) -> List[Dict[str, Any]]:
    """Per window of a forwarded batch: its embedding, group features and group spans."""
    from types import SimpleNamespace

    from unified_model import group_spans

    emb = features.video_embeddings.detach().cpu().numpy().astype(np.float32)
    feats = features.frame_features.detach().cpu().numpy().astype(np.float32)
    sizes = features.frame_sizes.detach().cpu().numpy().astype(np.int64)
    reps = features.representatives.detach().cpu().numpy().astype(np.int64)
    rows = []
    for i, sw in enumerate(batch):
        w = sw.window
        # the window as the sampled video of group_spans: its frames, its duration (no
        # num_frames: a window's groups always span their share of the window), its start as offset
        sampled = SimpleNamespace(frame_indices=sw.frame_indices, timestamps=sw.timestamps, duration=duration_of(w))
        spans = group_spans(features.groups[i], reps[i], sampled, offset=w.start_time)
        rows.append({
            "index": w.index, "start_time": w.start_time, "end_time": w.end_time,
            "start_frame": w.first, "end_frame": w.last, "size": w.num_frames,
            "embedding": emb[i], "group_features": feats[i], "group_sizes": sizes[i],
            "group_frames": spans.frames, "group_timestamps": spans.timestamps,
            "group_start_frames": spans.start_frames, "group_end_frames": spans.end_frames,
            "group_start_times": spans.start_times, "group_end_times": spans.end_times,
            "sampled_frame_indices": sw.frame_indices, "sampled_timestamps": sw.timestamps,
        })
    return rows


_DONE = object()


def _put(out: "queue.Queue", item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has stopped; False when it has."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(stream: WindowStream, out: "queue.Queue", stop: threading.Event) -> None:
    """Decode thread: put windows (then _DONE, or the exception) into ``out``."""
    try:
        for window in stream:
            if not _put(out, window, stop):
                return
        _put(out, _DONE, stop)
    except BaseException as err:  # handed to the consumer, which re-raises it
        _put(out, err, stop)


def encode_long_video(model, path: PathLike, window_seconds: float, window_stride: Optional[float] = None,
                      batch_windows: Optional[int] = None, parallel_batches: Optional[int] = None, prefetch: Optional[int] = None,
                      decoder_threads: int = 1) -> WindowTable:
    """Encode a video as a timeline of windows in one decoding pass.

    Args:
        model: a ``UnifiedTempMeSTOPModel`` (eval mode).
        path: video file.
        window_seconds: W seconds per window; window_stride: S in (0, W] (None = W).
        batch_windows: windows per model forward (None: :func:`default_batch_windows`, 1 on
            CPU, the device batch on CUDA).
        parallel_batches: forwards running side by side (None: one per torch thread on
            CPU, at most 4, each on one thread; 1 on CUDA), as the directory pipeline runs.
        prefetch: decoded windows queued ahead of the model (None: one lane's worth more
            than the lanes hold).
        decoder_threads: FFmpeg threads of the decode thread (1 leaves the cores to the model).

    Returns:
        :class:`WindowTable` with ``stats`` = {decoded_frames, num_frames, windows,
        decode_wait_seconds, model_seconds (forward time summed over the lanes)}.

    Raises:
        VideoDecodeError: the file cannot be read or no window could be decoded.
    """
    from modules.forward_lanes import ForwardLanes, default_parallel_batches, lane_threads
    from modules.video_sampler import VideoDecodeError

    stride = check_window_args(window_seconds, window_stride)
    on_cpu = model.device.type == "cpu"
    lanes = (parallel_batches or default_parallel_batches()) if on_cpu else 1
    batch_windows = default_batch_windows(model) if batch_windows is None else batch_windows
    prefetch = lanes * batch_windows + 1 if prefetch is None else prefetch
    if batch_windows < 1 or prefetch < 1 or lanes < 1:
        raise ValueError(f"batch_windows, parallel_batches and prefetch must be >= 1, "
                         f"got {batch_windows}, {lanes} and {prefetch}")
    config = model.config
    stream = iter_windows(path, window_seconds, stride, num_segments=config.num_segments, size=config.video_size,
                          decoder_threads=decoder_threads)
    single = len(stream.windows) == 1

    def duration_of(w) -> float:
        # the one window of a short video spans the whole video, as today's groups do
        return stream.duration if single else w.end_time - w.start_time

    def forward(batch: List[SampledWindow]) -> List[Tuple[float, List[Dict[str, Any]]]]:
        t0 = time.perf_counter()
        features = encode_window_batch(model, np.stack([w.frames for w in batch]))
        rows = _window_rows(batch, features, duration_of)
        return [(time.perf_counter() - t0, rows)]

    handoff: "queue.Queue" = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(stream, handoff, stop), name="window-decode", daemon=True)
    rows: List[Dict[str, Any]] = []
    wait = model_time = 0.0

    def collect(results) -> None:
        nonlocal model_time
        for seconds, batch_rows in results:
            model_time += seconds
            rows.extend(batch_rows)

    lanes_run = ForwardLanes(lanes, forward)
    producer.start()
    try:
        with lane_threads(lanes):
            batch: List[SampledWindow] = []
            finished = False
            while not finished:
                t0 = time.perf_counter()
                item = handoff.get()
                wait += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    finished = True
                else:
                    batch.append(item)
                if batch and (finished or len(batch) >= batch_windows):
                    collect(lanes_run.submit(batch))
                    batch = []
            collect(lanes_run.drain())
    finally:
        stop.set()
        lanes_run.close()
        producer.join()
    if not rows:
        raise VideoDecodeError(os.fspath(path), stream.note or "no decodable window")
    rows.sort(key=lambda r: r["index"])  # lanes finish in any order
    table = _table_from_rows(rows, stream, float(window_seconds), stride)
    table.stats = {"decoded_frames": stream.decoded_frames, "num_frames": stream.num_frames,
                   "windows": len(rows), "decode_wait_seconds": round(wait, 3), "model_seconds": round(model_time, 3)}
    return table


def _table_from_rows(rows: List[Dict[str, Any]], stream: WindowStream, window_seconds: float,
                     stride: float) -> WindowTable:
    def col(key: str, dtype) -> np.ndarray:
        return np.stack([np.asarray(r[key]) for r in rows]).astype(dtype)

    embeddings = col("embedding", np.float32)
    sizes = col("size", np.int64)
    return WindowTable(
        video_path=stream.path, duration=stream.duration, fps=stream.fps, num_frames=stream.num_frames,
        window_seconds=window_seconds, window_stride=stride,
        embedding=combine_window_embeddings(embeddings, sizes),
        start_times=col("start_time", np.float64), end_times=col("end_time", np.float64),
        start_frames=col("start_frame", np.int64), end_frames=col("end_frame", np.int64), sizes=sizes,
        embeddings=embeddings, group_features=col("group_features", np.float32),
        group_sizes=col("group_sizes", np.int64), group_frames=col("group_frames", np.int64),
        group_timestamps=col("group_timestamps", np.float64),
        group_start_frames=col("group_start_frames", np.int64), group_end_frames=col("group_end_frames", np.int64),
        group_start_times=col("group_start_times", np.float64), group_end_times=col("group_end_times", np.float64),
        sampled_frame_indices=col("sampled_frame_indices", np.int64),
        sampled_timestamps=col("sampled_timestamps", np.float64),
        complete=stream.complete, note=stream.note,
    )


def window_moments(table: WindowTable, text_embedding: Union[np.ndarray, torch.Tensor],
                   top_k: Optional[int] = None) -> List[Moment]:
    """Every (window, group) of ``table`` scored against a unit text embedding (D,), best
    first; a representative frame that several overlapping windows share is reported once,
    at its best rank. ``top_k`` None returns all."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    text = np.asarray(text_embedding.detach().cpu() if torch.is_tensor(text_embedding) else text_embedding,
                      dtype=np.float32).reshape(-1)
    scores = table.group_features.astype(np.float32) @ text  # (K, F)
    order = np.argsort(-scores, axis=None, kind="stable")
    num_groups = scores.shape[1]
    moments: List[Moment] = []
    seen = set()
    for flat in order.tolist():
        k, g = divmod(flat, num_groups)
        frame = int(table.group_frames[k, g])
        if frame in seen:
            continue
        seen.add(frame)
        moments.append(Moment(
            window=k, group=g, score=float(scores[k, g]),
            start_time=round(float(table.group_start_times[k, g]), 6), end_time=round(float(table.group_end_times[k, g]), 6),
            start_frame=int(table.group_start_frames[k, g]), end_frame=int(table.group_end_frames[k, g]),
            frame=frame, timestamp=float(table.group_timestamps[k, g]),
            window_start=float(table.start_times[k]), window_end=float(table.end_times[k]),
        ))
        if top_k is not None and len(moments) == top_k:
            break
    return moments


def frames_payload_from_table(table: WindowTable) -> Dict[str, np.ndarray]:
    """The ``<name>_frames.npz`` arrays of a windowed video: its K x F groups in timeline
    order (window by window), plus per group ``window_index``, ``window_starts``,
    ``window_ends``; the sampled frames are the windows' N frames one after the other, so
    the groups' sizes still partition them in order."""
    k, f = table.group_sizes.shape
    return {
        "frame_features": table.group_features.reshape(k * f, -1).astype(np.float32),
        "frame_indices": table.group_frames.reshape(-1),
        "timestamps": table.group_timestamps.reshape(-1),
        "start_frames": table.group_start_frames.reshape(-1),
        "end_frames": table.group_end_frames.reshape(-1),
        "start_times": table.group_start_times.reshape(-1),
        "end_times": table.group_end_times.reshape(-1),
        "group_sizes": table.group_sizes.reshape(-1),
        "sampled_frame_indices": table.sampled_frame_indices.reshape(-1),
        "sampled_timestamps": table.sampled_timestamps.reshape(-1),
        "video_path": np.array(table.video_path),
        "window_index": np.repeat(np.arange(k, dtype=np.int64), f),
        "window_starts": np.repeat(table.start_times, f),
        "window_ends": np.repeat(table.end_times, f),
    }


def encode_windowed_result(model, entry, window: Tuple[float, float], lanes: Optional[int] = None,
                           batch_windows: Optional[int] = None):
    """The extraction's model stage for one long video -> ``writers.VideoResult``.

    ``lanes``, ``batch_windows`` as ``parallel_batches``, ``batch_windows`` of
    :func:`encode_long_video`.

    Success carries the video embedding and ``extra["windows"]`` (the :class:`WindowTable`);
    an incomplete table (a truncated file: embedded from the windows it could decode) also
    carries its note as the result's ``warning``, the summary's field for short truncated
    files (the window stream has logged it). A file that cannot be decoded, or a model
    error, gives a failed result with a one-line reason (never raises for the video's sake).
    """
    from modules.errors import one_line
    from modules.forward_lanes import NON_FINITE_ERROR, degenerate_rows, model_error
    from modules.video_sampler import VideoDecodeError
    from modules.writers import VideoResult

    start = time.perf_counter()
    try:
        table = encode_long_video(model, entry.path, window[0], window[1], batch_windows=batch_windows,
                                  parallel_batches=lanes)
    except VideoDecodeError as err:
        return VideoResult.of(entry, "failed", one_line(err.reason), time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - recorded per video
        return VideoResult.of(entry, "failed", model_error(err), time.perf_counter() - start)
    # the same rule as a short video's forward: NaN / inf anywhere, or a vector that is not unit
    if degenerate_rows(table.embedding[None]).any() or not np.isfinite(table.group_features).all():
        return VideoResult.of(entry, "failed", NON_FINITE_ERROR, time.perf_counter() - start)
    logger.info("%s: %d windows of %g s, %d of %d frames decoded", entry.path, table.num_windows, window[0],
                table.stats["decoded_frames"], table.num_frames)
    return VideoResult.of(entry, "success", None, time.perf_counter() - start, embedding=table.embedding,
                          extra={"windows": table}, warning=None if table.complete else table.note)


def _moment_dict(m: Moment) -> Dict[str, Any]:
    """A moment as a retrieval "segment" (the keys of ``FrameHit`` plus the window's)."""
    return {"frame": m.frame, "score": m.score, "start_frame": m.start_frame, "end_frame": m.end_frame,
            "start_time": m.start_time, "end_time": m.end_time, "timestamp": m.timestamp,
            "window": m.window, "group": m.group, "window_start": m.window_start, "window_end": m.window_end}


def library_moments(library_dir: PathLike, video_path: PathLike, text: np.ndarray,
                    top_k: Optional[int]) -> Optional[List[Moment]]:
    """Moments of ``video_path`` scored from a video library's segment rows (no decoding).

    ``library_dir``: a library folder or an extraction output folder holding one. Returns
    None when the library has no segments of that video (matched by real path).
    """
    import pyarrow.compute as pc

    from modules.library import MANIFEST, VideoLibrary, library_path

    root = os.fspath(library_dir)
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        root = library_path(root)
    library = VideoLibrary.open(root)
    wanted = os.path.realpath(os.fspath(video_path))
    rows = [v["row"] for v in library if os.path.realpath(v["video_path"]) == wanted]
    if not rows:
        return None
    segments = library.table("segments")
    segments = segments.filter(pc.equal(segments["video_row"], rows[-1])).to_pylist()
    if not segments:
        return None
    features = np.asarray(library.embeddings("segments")[[s["row"] for s in segments]], dtype=np.float32)
    scores = features @ np.asarray(text, dtype=np.float32).reshape(-1)
    moments, seen = [], set()
    for i in np.argsort(-scores, kind="stable").tolist():
        s = segments[i]
        if s["frame"] in seen:
            continue
        seen.add(s["frame"])
        moments.append(Moment(window=int(s["window_index"]), group=int(s["group_index"]), score=float(scores[i]),
                              start_time=float(s["start_time"]), end_time=float(s["end_time"]),
                              start_frame=int(s["start_frame"]), end_frame=int(s["end_frame"]), frame=int(s["frame"]),
                              timestamp=float(s["timestamp"]), window_start=float(s["window_start"]),
                              window_end=float(s["window_end"])))
        if top_k is not None and len(moments) == top_k:
            break
    return moments


def retrieve_moments(model, video_path: PathLike, query: str, top_k: Optional[int] = None,
                     window: Optional[Tuple[float, float]] = None,
                     library_dir: Optional[PathLike] = None) -> Dict[str, Any]:
    """One (video, query) over the whole timeline -> a result dict as ``batch_retrieve_events``
    gives (video_path, query, frames, scores, segments, inference_time, status, error), whose
    segments also name their window and group, plus ``source`` ("library": scored from the
    library's segment rows without decoding; "decoded": encoded here by ``window``).

    Never raises for the video's sake: problems come back as status "error".
    """
    from modules.errors import one_line
    from modules.video_sampler import VideoDecodeError

    start = time.perf_counter()
    top_k = model.config.top_k if top_k is None else top_k
    result: Dict[str, Any] = {"video_path": os.fspath(video_path), "query": query, "frames": [], "scores": [],
                              "segments": [], "status": "success", "error": None}
    try:
        text = model.encode_text([query])[0].detach().cpu().numpy()
        moments = library_moments(library_dir, video_path, text, top_k) if library_dir is not None else None
        if moments is not None:
            result["source"] = "library"
        else:
            if library_dir is not None:
                logger.info("%s is not in the library %s; decoding it", video_path, library_dir)
            if window is None:
                raise ValueError("no window length for a video that is not in the library")
            table = encode_long_video(model, video_path, window[0], window[1])
            moments = window_moments(table, text, top_k)
            result.update(source="decoded", windows=table.num_windows, complete=table.complete, note=table.note)
    except VideoDecodeError as err:
        result.update(status="error", error=one_line(str(err)))
        moments = []
    except Exception as err:  # noqa: BLE001 - one line, like the other retrieval paths
        result.update(status="error", error=one_line(f"{type(err).__name__}: {err}"))
        moments = []
    result["segments"] = [_moment_dict(m) for m in moments]
    result["frames"] = [m.frame for m in moments]
    result["scores"] = [m.score for m in moments]
    result["inference_time"] = round(time.perf_counter() - start, 4)
    return result
