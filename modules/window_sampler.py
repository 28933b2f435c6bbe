"""Windowed sampling of long videos in one forward decoding pass.

``iter_windows(path, window_seconds)`` cuts a video's timeline into windows and yields,
window after window, ``num_segments`` frames sampled from each one exactly as
:func:`modules.video_sampler.sample_video` samples a whole video (TSN segment centres over
the window's presentation-ordered frames). A video no longer than one window gives one
window whose frames are ``sample_video``'s.

Windows (:func:`plan_windows`): window k covers ``[k * stride, k * stride + window)``
seconds of the presentation timeline (seconds from the first frame), stride <= window so
consecutive windows overlap by exactly ``window - stride`` and nothing is left out. The
last window ends at the video's end; a tail that would add less than half a stride of
new time is folded into the window before it (no one-frame windows at the end). A window
owns the frames whose presentation time lies in its span; windows without frames
(a variable-frame-rate gap) are dropped.

One pass (why it is fast and bounded): the index pass of ``video_sampler`` (demux, no
decode) gives every frame's pts, so all windows' targets are known before decoding
starts. One decoder then runs from the first packet to the last without seeking (with
~8 sampled frames per GOP-sized stretch a seek never pays), skipping the packets no other
frame references unless a window samples them. Decoded frames that are targets are
resized to ``size`` x ``size`` uint8 right away; a window is yielded as soon as the
decoder has passed its last target, and frames no later window wants are dropped, so
memory holds one window's frames plus what the consumer keeps, whatever the length.

A file that ends early (cut-off download, damaged tail) yields the windows it could
decode; :class:`WindowStream` then reports ``complete=False`` with a one-line ``note``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import av
import numpy as np

from modules.video_sampler import (
    VideoDecodeError,
    _build_index,
    _Decoder,
    _ffmpeg_reason,
    _frame_to_square,
    _nearest_available,
    _open,
    _open_for_decoding,
    _position,
    _stack_frames,
    _video_stream,
    _average_rate,
    segment_indices,
    segment_offsets,
)

__all__ = ["Window", "SampledWindow", "WindowStream", "plan_windows", "iter_windows", "check_window_args"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: timing slack (seconds) when comparing a duration with a window length
_EPS = 1e-6


@dataclass(frozen=True)
class Window:
    """One window of a video's timeline.

    start_time, end_time: seconds from the first frame; the span [start, end) the window
    covers. first, last: presentation positions (0-based frame numbers) of the window's
    first and last frame. targets: int64 (N,) positions sampled from the window.
    """

    index: int
    start_time: float
    end_time: float
    first: int
    last: int
    targets: np.ndarray = field(repr=False, compare=False)

    @property
    def num_frames(self) -> int:
        """Frames of the video inside the window (its weight in the video embedding)."""
        return self.last - self.first + 1


@dataclass
class SampledWindow:
    """Frames sampled from one window.

    frames: uint8 (N, 3, size, size) RGB (float32 CLIP-normalised with ``normalize=True``).
    frame_indices: int64 (N,) original frame numbers. timestamps: float64 (N,) seconds.
    """

    window: Window
    frames: np.ndarray
    frame_indices: np.ndarray
    timestamps: np.ndarray


def check_window_args(window_seconds: float, stride_seconds: Optional[float]) -> float:
    """Validate a window length and stride; returns the stride (None -> the window)."""
    if not (isinstance(window_seconds, (int, float)) and math.isfinite(window_seconds) and window_seconds > 0):
        raise ValueError(f"window_seconds must be a positive number, got {window_seconds!r}")
    stride = window_seconds if stride_seconds is None else stride_seconds
    if not (isinstance(stride, (int, float)) and math.isfinite(stride) and 0 < stride <= window_seconds):
        raise ValueError(f"window_stride must be > 0 and <= window_seconds ({window_seconds}), got {stride!r}")
    return float(stride)


def plan_windows(frame_times: np.ndarray, duration: float, window_seconds: float,
                 stride_seconds: Optional[float] = None, num_segments: int = 32) -> List[Window]:
    """Cut a timeline into windows and choose each window's sampled frames.

    Args:
        frame_times: float64 (M,) non-decreasing presentation times (seconds from the
            first frame) of the M frames.
        duration: seconds, first frame's start to last frame's end (>= frame_times[-1]).
        window_seconds: W > 0.
        stride_seconds: S in (0, W]; None = W (windows side by side).
        num_segments: N frames sampled per window (TSN segment centres over its frames).

    Returns:
        Windows in timeline order; their spans start at 0, step by S, and the last one
        ends at ``duration``.
    """
    stride = check_window_args(window_seconds, stride_seconds)
    times = np.asarray(frame_times, dtype=np.float64)
    if times.size == 0:
        return []
    duration = max(float(duration), float(times[-1]))
    starts = [0.0]
    # a further window only where it adds at least half a stride of time not yet covered
    while starts[-1] + window_seconds < duration - _EPS and duration - (starts[-1] + window_seconds) >= stride / 2:
        starts.append(starts[-1] + stride)
    windows: List[Window] = []
    offsets = segment_offsets(num_segments)
    for k, start in enumerate(starts):
        end = duration if k == len(starts) - 1 else min(start + window_seconds, duration)
        first = int(np.searchsorted(times, start - _EPS, side="left"))
        stop = len(times) if k == len(starts) - 1 else int(np.searchsorted(times, end - _EPS, side="left"))
        if stop <= first:
            continue  # no frame in this span (variable-frame-rate gap)
        targets = first + segment_indices(stop - first, num_segments, offsets)
        windows.append(Window(len(windows), float(start), float(end), first, stop - 1, targets))
    return windows


class WindowStream:
    """Iterator of :class:`SampledWindow` over one video, decoded in a single pass.

    After the iteration: ``complete`` (every planned window was yielded and the file was
    read to its announced end), ``note`` (one line saying what was missing, else None),
    ``windows_planned``, ``windows_yielded``, ``decoded_frames`` (frames the decoder
    produced), ``num_frames`` (frames in the video), ``duration``, ``fps``. The plan
    (``windows``) and those metadata are known right after construction.
    """

    def __init__(self, path: PathLike, window_seconds: float, stride_seconds: Optional[float] = None,
                 num_segments: int = 32, size: int = 224, decoder_threads: int = 1, normalize: bool = False):
        self.path = os.fspath(path)
        self.window_seconds = float(window_seconds)
        self.stride_seconds = check_window_args(window_seconds, stride_seconds)
        self.num_segments, self.size = int(num_segments), int(size)
        self.decoder_threads, self.normalize = int(decoder_threads), normalize
        self.decoded_frames = 0
        self.windows_yielded = 0
        self.complete = False
        self.note: Optional[str] = None
        self._started = False
        try:
            self._prepare()
        except VideoDecodeError:
            raise
        except (av.error.FFmpegError, OSError, MemoryError) as err:
            raise VideoDecodeError(self.path, f"decoding failed: {_ffmpeg_reason(err)}") from None

    # ------------------------------------------------------------------ plan
    def _prepare(self) -> None:
        with _open(self.path) as container:
            stream = _video_stream(container, self.path)
            self.announced_duration = _announced_duration(container, stream)
            self.index = _build_index(container, stream, self.path)
            fps_hint = _average_rate(stream)
        index = self.index
        if index.num_packets == 0:
            raise VideoDecodeError(self.path, "no video frames (empty video stream)")
        if index.has_pts:
            pts0 = int(index.pts[0])
            tb = float(index.time_base)
            times = (index.pts - pts0).astype(np.float64) * tb
            span = float(times[-1])
            num = len(times)
            fps = (num - 1) / span if num > 1 and span > 0 else fps_hint
            last = index.last_duration * tb if index.last_duration > 0 else (1.0 / fps if fps > 0 else 0.0)
        else:
            # no usable timestamps: number frames in output order at the stream's rate
            num = index.num_packets
            fps = fps_hint if fps_hint > 0 else 25.0
            times = np.arange(num, dtype=np.float64) / fps
            last = 1.0 / fps
        self.frame_times = times
        self.num_frames = int(num)
        self.fps = float(fps)
        self.duration = float(times[-1] + last)
        self.windows = plan_windows(times, self.duration, self.window_seconds, self.stride_seconds, self.num_segments)
        self.windows_planned = len(self.windows)

    # ------------------------------------------------------------------ decode
    def __iter__(self) -> Iterator[SampledWindow]:
        if self._started:
            raise RuntimeError("a WindowStream can be iterated once")
        self._started = True
        try:
            yield from self._decode()
        except VideoDecodeError:
            raise
        except (av.error.FFmpegError, OSError, MemoryError) as err:
            raise VideoDecodeError(self.path, f"decoding failed: {_ffmpeg_reason(err)}") from None

    def _decode(self) -> Iterator[SampledWindow]:
        index, windows = self.index, self.windows
        wanted = set(int(t) for w in windows for t in w.targets)
        skip_pts = frozenset()
        if index.has_pts:
            skip_pts = index.disposable - {int(index.pts[t]) for t in wanted}
        container, stream = _open_for_decoding(self.path, self.decoder_threads)
        got: dict = {}
        k = 0
        last_pos = -1
        with container:
            decoder = _Decoder(container, stream, self.path, 2 * index.num_packets + 1000, skip_pts=skip_pts)
            counter = -1
            for frame in decoder.frames():
                if index.has_pts:
                    if frame.pts is None:
                        continue
                    pos, exact = _position(index, frame.pts)
                else:
                    if frame.is_corrupt:
                        continue
                    counter += 1
                    pos, exact = counter, True
                last_pos = max(last_pos, pos)
                if exact and pos in wanted and pos not in got and not frame.is_corrupt:
                    got[pos] = _frame_to_square(frame, self.size)
                while k < len(windows) and int(windows[k].targets[-1]) <= pos:
                    sampled = self._assemble(windows[k], got)
                    k += 1
                    # frames before the next window's first target are wanted by nobody
                    floor = int(windows[k].targets[0]) if k < len(windows) else math.inf
                    for p in [p for p in got if p < floor]:
                        del got[p]
                    if sampled is not None:
                        self.windows_yielded += 1
                        yield sampled
            self.decoded_frames = decoder.decoded
        # the decoder ended before the last targets (truncated or damaged tail)
        while k < len(windows):
            sampled = self._assemble(windows[k], got)
            k += 1
            if sampled is not None:
                self.windows_yielded += 1
                yield sampled
        self._finish(last_pos)

    def _assemble(self, window: Window, got: dict) -> Optional[SampledWindow]:
        """The window's frames, nearest decoded frame for a target that failed; None if none."""
        targets = window.targets
        inside = {p: got[p] for p in got if window.first <= p <= window.last}
        if not inside:
            return None
        chosen = targets if all(int(t) in inside for t in targets) else _nearest_available(targets, inside)
        frames = _stack_frames([inside[int(p)] for p in chosen], self.normalize).numpy()
        times = self.frame_times[chosen]
        return SampledWindow(window, frames, np.asarray(chosen, dtype=np.int64), times.astype(np.float64))

    def _finish(self, last_pos: int) -> None:
        problems = []
        if self.windows_yielded < self.windows_planned:
            problems.append(f"{self.windows_planned - self.windows_yielded} of {self.windows_planned} windows "
                            f"could not be decoded (frames decoded up to {max(last_pos, 0)} of {self.num_frames})")
        if self.announced_duration > 0 and self.duration < 0.9 * self.announced_duration - 1.0:
            problems.append(f"readable timeline ends at {self.duration:.1f} s of the {self.announced_duration:.1f} s "
                            "the header announces (truncated file?)")
        self.complete = not problems
        self.note = "; ".join(problems) or None
        if self.note:
            logger.warning("%s: %s; keeping the %d windows decoded", self.path, self.note, self.windows_yielded)


def _announced_duration(container, stream) -> float:
    """Duration the header claims (seconds, 0.0 unknown): what a complete file would hold."""
    try:
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return float(container.duration / av.time_base)
    except (TypeError, ZeroDivisionError):
        pass
    return 0.0


def iter_windows(path: PathLike, window_seconds: float, stride_seconds: Optional[float] = None,
                 num_segments: int = 32, size: int = 224, decoder_threads: int = 1,
                 normalize: bool = False) -> WindowStream:
    """Plan the windows of ``path`` (index pass) and return the single-pass window iterator.

    Args:
        path: video file.
        window_seconds: W, seconds per window.
        stride_seconds: S in (0, W], seconds between window starts (None = W).
        num_segments: frames sampled per window.
        size: output side (short side resized, centre crop), as ``sample_video``.
        decoder_threads: FFmpeg decoding threads (1 = on the iterating thread; 0 = FFmpeg's
            choice).
        normalize: float CLIP-normalised frames instead of uint8.

    Returns:
        :class:`WindowStream`; iterate it once.

    Raises:
        VideoDecodeError: as ``sample_video`` (also while iterating).
        ValueError: bad window arguments.
    """
    return WindowStream(path, window_seconds, stride_seconds, num_segments, size, decoder_threads, normalize)


def window_frame_counts(windows: Sequence[Window]) -> np.ndarray:
    """int64 (K,) frames inside each window (the weights of the size-weighted mean)."""
    return np.array([w.num_frames for w in windows], dtype=np.int64)
