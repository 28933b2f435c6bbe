"""Segment-based frame sampling (TSN / STOP style) from video files with PyAV.

``sample_video(path, num_segments=32)`` returns ``num_segments`` frames as a CLIP-normalised
float tensor (N, 3, size, size) together with the original frame numbers and timestamps.

How it works (and why):

1. Index pass: demux the video stream's packets *without decoding* and collect their
   presentation timestamps (pts, falling back to dts) and keyframe flags. Sorting the pts
   gives the presentation-ordered frame list, so frame number <-> time is exact for
   variable-frame-rate files and for codecs with B-frame reordering; nothing assumes a
   constant fps. This reads the file once but costs far less than decoding (decord builds
   its frame index the same way).
2. Targets: the frame list [0, num_frames) is cut into ``num_segments`` equal segments;
   eval takes each segment's centre, train a uniformly random point in each (TSN/STOP).
   Fewer frames than segments simply repeats frame numbers (never black padding).
3. Decode only the targets: walking the sorted targets, decode forward from the current
   position while the keyframe before the next target is close; when that keyframe lies
   more than ``SEEK_GAP_FRAMES`` frames ahead, seek to it (``backward=True``, keyframes
   only) and decode forward to the frame whose pts equals the target's. Frames are matched
   by pts, so a seek that lands early just decodes a little more and one that lands late
   is retried from an earlier keyframe. Each kept frame is immediately resized and cropped
   to ``size`` x ``size`` uint8, so memory holds only the N small frames.
4. Files without usable timestamps (raw .h264 / some AVI) fall back to one sequential
   decode pass that numbers frames in output order.

Preprocessing matches CLIP: resize the short side to ``size`` with bicubic filtering,
centre crop ``size`` x ``size``, RGB in [0, 1], normalise with ``CLIP_MEAN``/``CLIP_STD``.
Decoded frames are resized by libswscale inside ``VideoFrame.reformat`` (YUV -> RGB and
bicubic scaling in one step, area-aware when downscaling): about 3 ms for a 1080p frame
against about 16 ms for full-size RGB conversion + torch ``interpolate`` (2-core CPU), and
no full-resolution float frame is ever allocated. ``preprocess_frames`` does the same for
RGB arrays already in memory with ``torch.nn.functional.interpolate(bicubic,
antialias=True)``; the two paths differ by about one grey level on average (more at sharp
colour edges, where chroma upsampling differs).

Display rotation (display-matrix side data, e.g. phone videos) is applied for multiples of
90 degrees; other angles, flips and non-square sample aspect ratios are
ignored.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import av
import numpy as np
import torch
import torch.nn.functional as F

from modules.video_decoding import (
    VideoDecodeError,
    _average_rate,
    _build_index,
    _Decoder,
    _decode_counting,
    _decode_indexed,
    _ffmpeg_reason,
    _frame_to_square,  # noqa: F401 - window_sampler imports the decoding primitives from here
    _Index,
    _NoFrameTimestamps,
    _open,
    _open_for_decoding,
    _position,  # noqa: F401
    _short_side_size,
    _video_stream,
    declared_length,
    h264_is_non_reference,
    shortfall_note,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SampledVideo",
    "VideoDecodeError",
    "h264_is_non_reference",
    "normalize_uint8",
    "preprocess_frames",
    "probe_video",
    "sample_video",
    "segment_indices",
    "segment_offsets",
]

PathLike = Union[str, os.PathLike]
RngLike = Union[np.random.Generator, random.Random, np.random.RandomState]

#: CLIP's RGB normalisation (OpenAI CLIP preprocessing).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SampledVideo:
    """Frames sampled from one video.

    Attributes:
        frames: float32 (N, 3, size, size), RGB, CLIP-normalised:
            ``(x / 255 - CLIP_MEAN) / CLIP_STD`` per channel.
        frame_indices: int64 (N,), original 0-based frame numbers in presentation order.
            Repeats when the video has fewer frames than N.
        timestamps: float64 (N,), seconds from the first frame's presentation time.
        fps: average frame rate (frames per second of the presentation timeline).
        duration: seconds, first frame's start to last frame's end.
        num_frames: frames in the video (packet count; the decoded count in the
            no-timestamp fallback).
        path: the file.
        decoded_frames: frames the decoder produced to get these N (a cost measure:
            far below ``num_frames`` when seeking was used).
        warning: one line when the readable part falls clearly short of what the
            container declares (a truncated file), else None.
    """

    frames: torch.Tensor
    frame_indices: torch.Tensor
    timestamps: torch.Tensor
    fps: float
    duration: float
    num_frames: int
    path: str
    decoded_frames: int = 0
    warning: Optional[str] = None


# ----------------------------------------------------------------------------- sampling


def segment_offsets(num_segments: int, train: bool = False, rng: Optional[RngLike] = None) -> np.ndarray:
    """Position inside each segment, in [0, 1): 0.5 (centre) for eval, uniform for train.

    Args:
        num_segments: N.
        train: draw random offsets.
        rng: numpy ``Generator``/``RandomState`` or ``random.Random``; None = fresh
            entropy (non-reproducible).

    Returns:
        float64 (N,).
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if not train:
        return np.full(num_segments, 0.5)
    if rng is None:
        rng = np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng.random(num_segments)
    if isinstance(rng, np.random.RandomState):
        return rng.random_sample(num_segments)
    if isinstance(rng, random.Random):
        return np.array([rng.random() for _ in range(num_segments)])
    raise TypeError(f"rng must be a numpy Generator/RandomState or random.Random, got {type(rng).__name__}")


def segment_indices(num_frames: int, num_segments: int, offsets: np.ndarray) -> np.ndarray:
    """Frame numbers for TSN-style segment sampling.

    Segment k covers frames [k * M / N, (k + 1) * M / N); the chosen frame is
    ``floor((k + offsets[k]) * M / N)``, clipped to [0, M - 1]. With offsets 0.5 this is
    TSN's eval rule ``int(tick / 2 + tick * k)``, tick = M / N.

    Args:
        num_frames: M >= 1.
        num_segments: N >= 1.
        offsets: float (N,) in [0, 1).

    Returns:
        int64 (N,), non-decreasing.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    k = np.arange(num_segments, dtype=np.float64)
    idx = np.floor((k + np.asarray(offsets, dtype=np.float64)) * (num_frames / num_segments))
    return np.clip(idx, 0, num_frames - 1).astype(np.int64)


# ----------------------------------------------------------------------------- preprocessing


def normalize_uint8(frames: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 RGB (..., 3, S, S) -> float32 CLIP-normalised ``(x / 255 - CLIP_MEAN) / CLIP_STD``.

    What ``sample_video`` applies to its frames; ``normalize=False`` there returns the
    uint8 frames (four times fewer bytes to move between processes) and this function
    turns them into the same float tensor bit for bit.
    """
    x = torch.as_tensor(frames).to(torch.float32).div_(255.0)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def preprocess_frames(rgb_uint8: Union[np.ndarray, torch.Tensor], size: int = 224) -> torch.Tensor:
    """CLIP preprocessing of RGB frames already in memory.

    Resize the short side to ``size`` (bicubic, antialiased), centre crop, scale to [0, 1],
    normalise with ``CLIP_MEAN``/``CLIP_STD``.

    Args:
        rgb_uint8: uint8 (N, H, W, 3) RGB (numpy or torch); a single (H, W, 3) frame
            is accepted too.
        size: output side.

    Returns:
        float32 (N, 3, size, size).
    """
    x = torch.as_tensor(np.asarray(rgb_uint8)) if not torch.is_tensor(rgb_uint8) else rgb_uint8
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB frames, got shape {tuple(x.shape)}")
    n, h, w, _ = x.shape
    new_w, new_h = _short_side_size(w, h, size)
    chw = x.permute(0, 3, 1, 2).to(torch.float32)
    if (new_h, new_w) != (h, w):
        chw = F.interpolate(chw, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    # round back to uint8 so this path and the decoder path quantise the same way
    y0, x0 = (new_h - size) // 2, (new_w - size) // 2
    chw = chw[:, :, y0 : y0 + size, x0 : x0 + size].round_().clamp_(0, 255).to(torch.uint8)
    return normalize_uint8(chw)


def _stack_frames(squares: Sequence[np.ndarray], normalize: bool) -> torch.Tensor:
    """uint8 (S, S, 3) squares -> (N, 3, S, S): CLIP-normalised float32, or uint8."""
    frames = torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2)
    return normalize_uint8(frames).contiguous() if normalize else frames.contiguous()


def _nearest_available(targets: np.ndarray, got: dict[int, np.ndarray]) -> np.ndarray:
    """Replace targets that could not be decoded by the nearest decoded position."""
    avail = np.array(sorted(got), dtype=np.int64)
    pos = np.searchsorted(avail, targets)
    lo = avail[np.clip(pos - 1, 0, len(avail) - 1)]
    hi = avail[np.clip(pos, 0, len(avail) - 1)]
    return np.where(np.abs(targets - lo) <= np.abs(hi - targets), lo, hi)


# ----------------------------------------------------------------------------- public API


def sample_video(
    path: PathLike,
    num_segments: int = 32,
    size: int = 224,
    train: bool = False,
    rng: Optional[RngLike] = None,
    decoder_threads: int = 0,
    normalize: bool = True,
) -> SampledVideo:
    """Sample ``num_segments`` frames, one per equal segment of the video (TSN / STOP).

    Segments are equal in frame count over the presentation-ordered frame list (as TSN,
    STOP and decord-based loaders do); for a constant-frame-rate file that is also equal
    in time. Frames are located by their presentation timestamps, so variable frame rate
    and B-frame reordering are handled exactly.

    Args:
        path: video file (anything FFmpeg reads: mp4, webm, mkv, avi, mov, ...).
        num_segments: N, frames returned.
        size: output side; short side resized to it (bicubic), then centre-cropped.
        train: a uniformly random frame per segment instead of the segment centre.
        rng: random source for ``train`` (numpy Generator/RandomState or random.Random);
            None = fresh entropy.
        decoder_threads: FFmpeg decoding threads; 0 lets FFmpeg choose (frame + slice
            threads: lowest latency for one video), 1 decodes on the calling thread (least
            CPU per video: what parallel decode workers want). Frames are identical.
        normalize: False returns the uint8 RGB frames (N, 3, size, size) instead;
            ``normalize_uint8`` turns them into the float frames bit for bit.

    Returns:
        ``SampledVideo`` with frames float32 (N, 3, size, size) CLIP-normalised (uint8 RGB
        with ``normalize=False``),
        frame_indices int64 (N,), timestamps float64 (N,) seconds from the first frame.

    Raises:
        VideoDecodeError: missing/unreadable/empty/non-video file, no video stream, or no
            decodable frame. FFmpeg errors never escape as other types.
    """
    path = os.fspath(path)
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if int(decoder_threads) < 0:
        raise ValueError(f"decoder_threads must be >= 0, got {decoder_threads}")
    offsets = segment_offsets(num_segments, train, rng)
    try:
        return _sample(path, num_segments, size, offsets, int(decoder_threads), normalize)
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, MemoryError) as err:
        raise VideoDecodeError(path, f"decoding failed: {_ffmpeg_reason(err)}") from None


def _sample(path: str, num_segments: int, size: int, offsets: np.ndarray, threads: int,
            normalize: bool) -> SampledVideo:
    with _open(path) as container:
        stream = _video_stream(container, path)
        declared = declared_length(container, stream)
        index = _build_index(container, stream, path)
        fps_hint = _average_rate(stream)
    if index.num_packets == 0:
        raise VideoDecodeError(path, "no video frames (empty video stream)")

    sampled = None
    if index.has_pts:
        try:
            sampled = _sample_indexed(path, index, num_segments, size, offsets, threads, normalize)
        except _NoFrameTimestamps:
            logger.info("%s: decoded frames carry no pts; numbering frames by decode order", path)
    if sampled is None:
        sampled = _sample_counting(path, index.num_packets, fps_hint, num_segments, size, offsets, threads, normalize)
    sampled.warning = shortfall_note(declared, sampled.num_frames, sampled.duration)
    if sampled.warning:
        logger.warning("%s: %s; embedding the readable part", path, sampled.warning)
    return sampled


def _sample_indexed(path: str, index: _Index, num_segments: int, size: int, offsets: np.ndarray,
                    threads: int, normalize: bool) -> SampledVideo:
    num_frames = len(index.pts)
    targets = segment_indices(num_frames, num_segments, offsets)
    max_packets = 2 * index.num_packets + 1000
    # non-reference frames that are not sampled are never decoded (a third to a half of
    # the frames of a typical H.264 file with B-frames; the sampled frames are unchanged)
    skip_pts = index.disposable - {int(index.pts[t]) for t in targets}
    got: dict[int, np.ndarray] = {}
    decoded = 0
    for allow_seek in (True, False):
        container, stream = _open_for_decoding(path, threads)
        with container:
            decoder = _Decoder(container, stream, path, max_packets, skip_pts=skip_pts)
            try:
                got = _decode_indexed(decoder, index, targets, size, allow_seek)
            except (av.error.FFmpegError, OSError) as err:
                if not allow_seek:
                    raise
                # some containers (or broken indexes) refuse to seek: one plain pass instead
                logger.info("%s: seeking failed (%s); decoding sequentially", path, _ffmpeg_reason(err))
                decoded += decoder.decoded
                continue
            decoded += decoder.decoded
            logger.debug("%s: %d targets, %d frames decoded, %d skipped, %d seeks, %d errors", path,
                         len(set(targets.tolist())), decoder.decoded, decoder.skipped, decoder.seeks, decoder.errors)
        break
    if not got:
        if decoded > 0:
            # frames came out but none carried an indexed pts (odd muxers, timestamp
            # wrap-around): number them by output order instead of failing
            raise _NoFrameTimestamps()
        raise VideoDecodeError(path, "no decodable video frame")
    chosen = targets
    missing = sorted({int(t) for t in targets if int(t) not in got})
    if missing:
        logger.warning("%s: %d sampled frames could not be decoded; using the nearest decodable ones",
                       path, len(missing))
        chosen = _nearest_available(targets, got)

    tb = index.time_base
    pts0 = int(index.pts[0])
    seconds = np.array([float((int(index.pts[p]) - pts0) * tb) for p in chosen], dtype=np.float64)
    span = float((int(index.pts[-1]) - pts0) * tb)
    fps = (num_frames - 1) / span if num_frames > 1 and span > 0 else 0.0
    last = float(index.last_duration * tb) if index.last_duration > 0 else (1.0 / fps if fps > 0 else 0.0)
    frames = _stack_frames([got[int(p)] for p in chosen], normalize)
    return SampledVideo(
        frames=frames,
        frame_indices=torch.as_tensor(chosen, dtype=torch.int64),
        timestamps=torch.from_numpy(seconds),
        fps=float(fps if fps > 0 else (1.0 / last if last > 0 else 0.0)),
        duration=span + last,
        num_frames=num_frames,
        path=path,
        decoded_frames=decoded,
    )


def _sample_counting(
    path: str, num_packets: int, fps_hint: float, num_segments: int, size: int, offsets: np.ndarray, threads: int,
    normalize: bool,
) -> SampledVideo:
    """Fallback without timestamps: frame numbers = decoder output order."""
    estimate = max(num_packets, 1)
    decoded = 0
    got: dict[int, np.ndarray] = {}
    times: dict[int, float] = {}
    targets = segment_indices(estimate, num_segments, offsets)
    for _ in range(2):  # a second pass only if the packet count mispredicted the frame count
        container, stream = _open_for_decoding(path, threads)
        with container:
            decoder = _Decoder(container, stream, path, max_packets=2 * num_packets + 1000)
            got, times, count = _decode_counting(decoder, targets, size)
            decoded += decoder.decoded
        if count == 0:
            raise VideoDecodeError(path, "no decodable video frame")
        mispredicted = count != estimate
        targets, estimate = segment_indices(count, num_segments, offsets), count
        if not mispredicted or all(int(t) in got for t in targets):
            break
    if any(int(t) not in got for t in targets):
        targets = _nearest_available(targets, got)
    num_frames = estimate
    fps = fps_hint
    seconds = np.array(
        [times[int(p)] if np.isfinite(times.get(int(p), np.nan)) else (p / fps if fps > 0 else 0.0) for p in targets],
        dtype=np.float64,
    )
    frames = _stack_frames([got[int(p)] for p in targets], normalize)
    return SampledVideo(
        frames=frames,
        frame_indices=torch.as_tensor(targets, dtype=torch.int64),
        timestamps=torch.from_numpy(seconds),
        fps=float(fps),
        duration=float(num_frames / fps) if fps > 0 else 0.0,
        num_frames=int(num_frames),
        path=path,
        decoded_frames=decoded,
    )


def probe_video(path: PathLike) -> dict:
    """Cheap container metadata (no decoding, no full demux).

    Returns:
        dict with fps (float, average; 0.0 unknown), duration (float seconds; 0.0 unknown),
        num_frames (int, from the header or duration * fps; 0 unknown), width, height
        (coded size, before display rotation), codec (decoder name, e.g. "h264").

    Raises:
        VideoDecodeError: as ``sample_video`` for files that cannot be opened or have no
            video stream.
    """
    path = os.fspath(path)
    try:
        with _open(path) as container:
            stream = _video_stream(container, path)
            fps = _average_rate(stream)
            duration = 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            num_frames = int(stream.frames or 0)
            if num_frames <= 0 and duration > 0 and fps > 0:
                num_frames = int(round(duration * fps))
            return {
                "fps": float(fps),
                "duration": float(duration),
                "num_frames": num_frames,
                "width": int(stream.codec_context.width or 0),
                "height": int(stream.codec_context.height or 0),
                "codec": stream.codec_context.name,
            }
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError) as err:
        raise VideoDecodeError(path, f"cannot read metadata: {_ffmpeg_reason(err)}") from None
