"""Deterministic synthetic videos: an encoder helper and moving-shape drawing.

Used by ``scripts/make_example_videos.py`` (the example clips shipped in
``examples/videos/``) and by ``tests/video_factory.py`` (test videos with painted frame
numbers). Nothing here is needed at inference time; it only depends on numpy and PyAV.

Container and codec are chosen from the file extension (see ``CODEC_BY_EXTENSION``):
``.mp4``/``.mkv``/``.mov`` -> H.264 (libx264), ``.webm`` -> VP9 (libvpx-vp9),
``.avi`` -> MPEG-4 part 2, ``.h264`` -> raw Annex-B H.264 (no container timestamps),
``.m4v`` -> raw MPEG-4 part 2 elementary stream.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import av
import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: extension -> (PyAV container format or None for "guess from extension", video codec)
CODEC_BY_EXTENSION: dict[str, tuple[Optional[str], str]] = {
    ".mp4": (None, "libx264"),
    ".mov": (None, "libx264"),
    ".mkv": (None, "libx264"),
    ".webm": (None, "libvpx-vp9"),
    ".avi": (None, "mpeg4"),
    ".h264": ("h264", "libx264"),
    ".m4v": ("m4v", "mpeg4"),
}

#: time base of explicit ``pts`` lists given to :func:`encode_video` (milliseconds).
PTS_TIME_BASE = Fraction(1, 1000)

# AVI gets PCM: AAC's encoder priming (negative first pts) makes the AVI muxer shift every
# stream's timestamps by one video frame (avoid_negative_ts), leaving a gap after frame 0.
_AUDIO_CODEC_BY_EXTENSION = {".webm": "libopus", ".mkv": "libopus", ".avi": "pcm_s16le"}


def codec_for_path(path: PathLike) -> tuple[Optional[str], str]:
    """Return ``(container_format_or_None, video_codec)`` for a file name's extension."""
    ext = Path(path).suffix.lower()
    if ext not in CODEC_BY_EXTENSION:
        raise ValueError(f"unsupported video extension {ext!r}; use one of {sorted(CODEC_BY_EXTENSION)}")
    return CODEC_BY_EXTENSION[ext]


def _codec_options(codec: str, gop: Optional[int], quality: str) -> dict[str, str]:
    """Encoder options that keep small synthetic videos sharp and fast to encode."""
    # quality "high" keeps thin synthetic patterns readable after lossy coding;
    # "small" is for the example clips that are committed to the repository.
    if codec == "libx264":
        opts = {"crf": "16" if quality == "high" else "30", "preset": "veryfast"}
        if gop is not None:
            # scenecut would add keyframes on the (synthetic) pattern changes; keep the
            # keyframe lattice exactly as requested so seeking is exercised predictably.
            opts.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
        return opts
    if codec == "libvpx-vp9":
        opts = {"crf": "12" if quality == "high" else "40", "b": "0", "deadline": "good",
                "cpu-used": "8", "row-mt": "1"}
        if gop is not None:
            opts["g"] = str(gop)
        return opts
    if codec == "mpeg4":
        # mpeg4 has no crf; a fixed quantiser is the equivalent knob.
        opts = {"qscale": "2" if quality == "high" else "8"}
        if gop is not None:
            opts["g"] = str(gop)
        return opts
    return {}


def _add_audio_stream(container: av.container.OutputContainer, ext: str, sample_rate: int = 48000):
    codec = _AUDIO_CODEC_BY_EXTENSION.get(ext, "aac")
    stream = container.add_stream(codec, rate=sample_rate)
    stream.layout = "mono"
    return stream


def _audio_frames_until(
    stream, t_end: float, state: dict, sample_rate: int = 48000
) -> Iterable[av.AudioFrame]:
    """Yield sine-tone audio frames until the audio clock reaches ``t_end`` seconds."""
    frame_size = stream.codec_context.frame_size or 1024
    fmt = stream.format.name
    while state["samples"] / sample_rate < t_end:
        n0 = state["samples"]
        t = (np.arange(frame_size) + n0) / sample_rate
        wave = (0.2 * np.sin(2 * math.pi * 440.0 * t)).astype(np.float32)
        if fmt.startswith("s16"):
            arr = (wave * 32767).astype(np.int16)[None, :]
        else:
            arr = wave[None, :]
        frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = n0
        frame.time_base = Fraction(1, sample_rate)
        state["samples"] += frame_size
        yield frame


def encode_video(
    path: PathLike,
    frames: Iterable[np.ndarray],
    fps: float = 25,
    codec: Optional[str] = None,
    pix_fmt: str = "yuv420p",
    pts: Optional[Sequence[int]] = None,
    gop: Optional[int] = None,
    with_audio: bool = False,
    rotate: Optional[int] = None,
    quality: str = "high",
    container_options: Optional[dict[str, str]] = None,
) -> Path:
    """Encode RGB frames into a video file; container and default codec from the extension.

    Args:
        path: output file; its extension picks the container (see ``CODEC_BY_EXTENSION``).
        frames: iterable of uint8 arrays (H, W, 3), RGB, all the same even H and W.
            Consumed lazily, so long videos never sit in memory.
        fps: nominal frame rate (constant frame rate unless ``pts`` is given).
        codec: video encoder name; None = the extension's default.
        pix_fmt: encoder pixel format.
        pts: optional explicit presentation timestamps, one int per frame, in
            ``PTS_TIME_BASE`` (milliseconds), strictly increasing: variable frame rate.
        gop: keyframe interval in frames (None = encoder default).
        with_audio: add a mono sine-tone audio stream (aac; opus for webm/mkv; PCM for avi).
        rotate: display rotation in degrees counter-clockwise (display-matrix side data,
            as read back by ``av.VideoFrame.rotation``); stored by mp4/mov and mkv/webm.
        quality: "high" (near-lossless, for tests) or "small" (for committed examples).
        container_options: extra muxer options, e.g. ``{"movflags": "+faststart"}``.

    Returns:
        ``Path(path)``.
    """
    path = Path(path)
    fmt, default_codec = codec_for_path(path)
    codec = codec or default_codec
    ext = path.suffix.lower()
    rate = Fraction(fps).limit_denominator(1001)
    # bitexact: no random matroska UIDs / version strings, so the same input gives the
    # same bytes (the example clips are committed and must be reproducible)
    options = {"fflags": "+bitexact", **(container_options or {})}
    with av.open(str(path), mode="w", format=fmt, container_options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.pix_fmt = pix_fmt
        stream.options = _codec_options(codec, gop, quality)
        # one encoder thread: byte-identical output on every machine (committed examples)
        stream.codec_context.thread_count = 1
        if pts is not None:
            # millisecond codec time base so arbitrary (variable) timestamps survive exactly
            stream.codec_context.time_base = PTS_TIME_BASE
            stream.time_base = PTS_TIME_BASE
        if rotate is not None:
            stream.set_display_rotation(rotate)
        audio = _add_audio_stream(container, ext) if with_audio else None
        audio_state = {"samples": 0}
        n = 0
        for n, rgb in enumerate(frames, start=1):
            i = n - 1
            if n == 1:
                stream.height, stream.width = int(rgb.shape[0]), int(rgb.shape[1])
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if pts is not None:
                frame.pts = int(pts[i])
                frame.time_base = PTS_TIME_BASE
                t = float(pts[i] * PTS_TIME_BASE)
            else:
                frame.pts = i
                frame.time_base = 1 / rate
                t = float(i / rate)
            for packet in stream.encode(frame):
                container.mux(packet)
            if audio is not None:
                for aframe in _audio_frames_until(audio, t + float(1 / rate), audio_state):
                    for packet in audio.encode(aframe):
                        container.mux(packet)
        if n == 0:
            raise ValueError("encode_video needs at least one frame")
        for packet in stream.encode(None):
            container.mux(packet)
        if audio is not None:
            for packet in audio.encode(None):
                container.mux(packet)
    logger.debug("wrote %s: %d frames, codec %s", path, n, codec)
    return path


# ----------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class MovingShape:
    """A filled shape moving in a straight line at constant speed.

    ``start``/``end`` are the shape centre at the first/last frame, as fractions of
    (width, height); ``radius`` is a fraction of the short side.
    """

    kind: str = "circle"  # "circle" | "square" | "triangle"
    color: tuple[int, int, int] = (220, 30, 30)
    start: tuple[float, float] = (0.15, 0.5)
    end: tuple[float, float] = (0.85, 0.5)
    radius: float = 0.15


#: named directions -> (start, end) centre positions as (x, y) fractions.
DIRECTIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "right": ((0.2, 0.5), (0.8, 0.5)),
    "left": ((0.8, 0.5), (0.2, 0.5)),
    "up": ((0.5, 0.8), (0.5, 0.2)),
    "down": ((0.5, 0.2), (0.5, 0.8)),
    "diagonal": ((0.2, 0.2), (0.8, 0.8)),
}


def shape_mask(kind: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean mask (H, W) of a shape centred at pixel (cx, cy) with half-size r pixels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if kind == "triangle":
        # upward-pointing isosceles triangle inside the square of half-size r
        rel_y = (yy - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        return (rel_y >= 0) & (rel_y <= 1) & (np.abs(xx - cx) <= r * rel_y)
    raise ValueError(f"unknown shape kind {kind!r}")


def draw_shapes_frame(
    t: float,
    shapes: Sequence[MovingShape],
    size: tuple[int, int],
    background: tuple[int, int, int] = (235, 235, 225),
) -> np.ndarray:
    """Render shapes at normalised time ``t`` in [0, 1].

    Args:
        t: position along each shape's path (0 = start, 1 = end).
        shapes: shapes drawn in order (later ones on top).
        size: (width, height) in pixels.
        background: RGB background colour.

    Returns:
        uint8 array (H, W, 3), RGB.
    """
    width, height = size
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = np.asarray(background, dtype=np.uint8)
    short = min(width, height)
    for s in shapes:
        cx = (s.start[0] + (s.end[0] - s.start[0]) * t) * width
        cy = (s.start[1] + (s.end[1] - s.start[1]) * t) * height
        img[shape_mask(s.kind, cx, cy, s.radius * short, height, width)] = np.asarray(s.color, np.uint8)
    return img


def moving_shapes_frames(
    num_frames: int, shapes: Sequence[MovingShape], size: tuple[int, int], **kwargs
) -> Iterable[np.ndarray]:
    """Yield ``num_frames`` RGB frames (H, W, 3) of the shapes moving from start to end."""
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        yield draw_shapes_frame(t, shapes, size, **kwargs)


def write_moving_shapes_video(
    path: PathLike,
    num_frames: int,
    fps: float = 25,
    size: tuple[int, int] = (112, 112),
    shape: str = "circle",
    color: tuple[int, int, int] = (220, 30, 30),
    direction: str = "right",
    shapes: Optional[Sequence[MovingShape]] = None,
    quality: str = "high",
    **encode_kwargs,
) -> Path:
    """Write a video of one coloured shape (or ``shapes``) moving in a straight line.

    Args:
        path: output file (extension picks the container, see ``encode_video``).
        num_frames: number of frames.
        fps: frame rate.
        size: (width, height), even numbers.
        shape: "circle" | "square" | "triangle" (ignored when ``shapes`` is given).
        color: RGB colour of the shape.
        direction: key of ``DIRECTIONS`` ("right" = moving left to right, "up", ...).
        shapes: explicit list of ``MovingShape``; overrides shape/color/direction.
        quality: "high" or "small" (smaller files), see ``encode_video``.
        **encode_kwargs: passed on to ``encode_video`` (gop, with_audio, codec, ...).
    """
    if shapes is None:
        start, end = DIRECTIONS[direction]
        shapes = [MovingShape(kind=shape, color=tuple(color), start=start, end=end)]
    frames = moving_shapes_frames(num_frames, shapes, size)
    return encode_video(path, frames, fps=fps, quality=quality, **encode_kwargs)
