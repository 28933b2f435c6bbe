"""Small synthetic videos for tests, with each frame's number painted into its pixels.

Import as ``from tests.video_factory import write_video, read_index`` (run pytest as
``python -m pytest`` from the repository root, which puts the root on ``sys.path``).

Stable API (used by several test files):

- ``write_video(path, num_frames, fps=25, size=(64, 48), codec=None, pix_fmt="yuv420p",
  vfr_pts=None, with_audio=False, paint_index=True, rotate=None, gop=None) -> Path``
- ``read_index(frame) -> int``: the frame number painted by ``write_video``, read back
  from a sampler output frame (CLIP-normalised float tensor (3, H, W)).
- ``paint_index_frame(i, width, height) -> uint8 (H, W, 3)`` and
  ``read_index_rgb(rgb uint8 (H, W, 3) or float [0, 1]) -> int``.
- ``write_audio_only(path)``, ``write_text_file(path)``,
  ``write_truncated(src, dst, keep_fraction=0.3)``,
  ``write_moving_shapes_video(path, num_frames, ...)``.

The painted pattern: a 4 x 4 grid of black/white cells filling the central square of the
frame (so the sampler's short-side resize + centre crop keeps exactly the grid), carrying
15 bits of the frame number (0..32767) plus one odd-parity bit. A black (padding) frame
has no white cells, fails the parity check and makes ``read_index`` raise, so "padded
with black" cannot pass for "frame 0". Outside the central square (left/right bands of a
landscape frame) a colour that changes with the frame number helps when looking at the
video. Cells are at least 8 x 8 pixels for the smallest sizes used (32 x 32), which
survives 4:2:0 H.264 / VP9 / MPEG-4 coding at the quality used here.
"""

from __future__ import annotations

import colorsys
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from modules.synthetic_video import (
    CODEC_BY_EXTENSION,
    PTS_TIME_BASE,
    encode_video,
    write_moving_shapes_video,
)

__all__ = [
    "CODEC_BY_EXTENSION",
    "GRID",
    "MAX_INDEX",
    "VFR_TIME_BASE",
    "paint_index_frame",
    "read_index",
    "read_index_rgb",
    "write_audio_only",
    "write_moving_shapes_video",
    "write_text_file",
    "write_truncated",
    "write_video",
]

PathLike = Union[str, Path]

#: cells per side of the painted grid
GRID = 4
_DATA_BITS = GRID * GRID - 1
#: largest frame number that can be painted
MAX_INDEX = (1 << _DATA_BITS) - 1
#: time base of ``write_video(vfr_pts=...)`` values: milliseconds.
VFR_TIME_BASE: Fraction = PTS_TIME_BASE

# CLIP normalisation, duplicated here (3 numbers) so the factory stays usable when the
# sampler module is broken; tests compare them with modules.video_sampler's constants.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _bits_for(i: int) -> list[int]:
    """15 data bits (LSB first) + an odd-parity bit, so at least one cell is white."""
    if not 0 <= i <= MAX_INDEX:
        raise ValueError(f"frame number {i} outside 0..{MAX_INDEX}")
    data = [(i >> b) & 1 for b in range(_DATA_BITS)]
    parity = 1 - (sum(data) % 2)
    return data + [parity]


def paint_index_frame(i: int, width: int, height: int) -> np.ndarray:
    """RGB frame (H, W, 3) uint8 with frame number ``i`` painted as a 4 x 4 bit grid.

    The grid fills the central ``min(W, H)`` square; cell k (row-major) is white when bit
    k is set. The remaining bands get a colour whose hue depends on ``i``.
    """
    hue = (i * 0.137) % 1.0
    band = np.array([int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.8, 0.8)], dtype=np.uint8)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = band
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    bits = _bits_for(i)
    for k, bit in enumerate(bits):
        r, c = divmod(k, GRID)
        ya, yb = y0 + r * side // GRID, y0 + (r + 1) * side // GRID
        xa, xb = x0 + c * side // GRID, x0 + (c + 1) * side // GRID
        img[ya:yb, xa:xb] = 255 if bit else 0
    return img


def read_index_rgb(rgb: np.ndarray) -> int:
    """Decode the frame number from a square-cropped RGB image of the grid.

    Args:
        rgb: (H, W, 3) uint8 in [0, 255] or float in [0, 1]; the grid must fill the image
            (which is what the sampler's centre crop produces).

    Raises:
        ValueError: when the parity check fails (e.g. a black or foreign frame).
    """
    img = np.asarray(rgb, dtype=np.float64)
    if img.max() > 1.5:
        img = img / 255.0
    luma = img.mean(axis=2)
    h, w = luma.shape
    bits = []
    for k in range(GRID * GRID):
        r, c = divmod(k, GRID)
        # sample the middle half of each cell: robust to ringing at cell edges and to
        # the sub-pixel offsets of resize + crop
        ya, yb = int((r + 0.25) * h / GRID), int((r + 0.75) * h / GRID)
        xa, xb = int((c + 0.25) * w / GRID), int((c + 0.75) * w / GRID)
        bits.append(1 if luma[ya:max(yb, ya + 1), xa:max(xb, xa + 1)].mean() > 0.5 else 0)
    if sum(bits) % 2 != 1:
        raise ValueError(f"painted index parity check failed (bits {bits}): not a painted frame")
    return sum(b << k for k, b in enumerate(bits[:_DATA_BITS]))


def read_index(frame: torch.Tensor) -> int:
    """Frame number painted by ``write_video``, read from a sampler output frame.

    Args:
        frame: CLIP-normalised float tensor (3, H, W), as in ``SampledVideo.frames[k]``.
    """
    mean = torch.tensor(_CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(_CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    rgb = (frame.detach().cpu().double() * std + mean).clamp(0, 1)
    return read_index_rgb(rgb.permute(1, 2, 0).numpy())


def write_video(
    path: PathLike,
    num_frames: int,
    fps: float = 25,
    size: tuple[int, int] = (64, 48),
    codec: Optional[str] = None,
    pix_fmt: str = "yuv420p",
    vfr_pts: Optional[Sequence[int]] = None,
    with_audio: bool = False,
    paint_index: bool = True,
    rotate: Optional[int] = None,
    gop: Optional[int] = 8,
    container_options: Optional[dict[str, str]] = None,
) -> Path:
    """Write a test video whose frame i shows the number i (see ``read_index``).

    Args:
        path: output; the extension picks container and default codec: .mp4/.mkv/.mov
            H.264 (with B-frames), .webm VP9, .avi MPEG-4 part 2, .h264 raw H.264 (no
            timestamps), .m4v raw MPEG-4.
        num_frames: frame count (<= ``MAX_INDEX`` + 1 when painting).
        fps: nominal frame rate (ignored for timing when ``vfr_pts`` is given).
        size: (width, height), even numbers; >= 32 x 32 keeps the grid readable.
        codec: encoder; None = the extension's default (libx264 for .mp4).
        pix_fmt: encoder pixel format.
        vfr_pts: explicit per-frame presentation timestamps in ``VFR_TIME_BASE``
            (milliseconds), strictly increasing: variable frame rate.
        with_audio: add an audio stream (aac; opus for webm).
        paint_index: paint the frame number; False = a moving grey gradient.
        rotate: display-matrix rotation in degrees counter-clockwise (mp4/mov/mkv/webm).
        gop: keyframe interval (default 8 so seeking is exercised; None = codec default).
        container_options: muxer options, e.g. ``{"movflags": "+faststart"}``.

    Returns:
        ``Path(path)``.
    """
    width, height = size
    if vfr_pts is not None and len(vfr_pts) != num_frames:
        raise ValueError("vfr_pts needs one timestamp per frame")
    if paint_index and num_frames - 1 > MAX_INDEX:
        raise ValueError(f"cannot paint more than {MAX_INDEX + 1} frames")

    def frames():
        for i in range(num_frames):
            if paint_index:
                yield paint_index_frame(i, width, height)
            else:
                ramp = (np.arange(width, dtype=np.int64)[None, :] * 4 + 3 * i) % 256
                yield np.repeat(np.broadcast_to(ramp, (height, width))[..., None], 3, axis=2).astype(np.uint8)

    return encode_video(
        path, frames(), fps=fps, codec=codec, pix_fmt=pix_fmt, pts=vfr_pts, gop=gop,
        with_audio=with_audio, rotate=rotate, container_options=container_options,
    )


def write_audio_only(path: PathLike, seconds: float = 1.0) -> Path:
    """Write a file with one audio stream (sine tone) and no video stream.

    The extension picks the container (.mp4/.m4a/.mkv -> aac, .webm -> opus, .wav -> PCM).
    """
    import av  # local: keep the module import cheap for files that only read indices

    path = Path(path)
    ext = path.suffix.lower()
    codec = {"wav": "pcm_s16le", "webm": "libopus"}.get(ext.lstrip("."), "aac")
    rate = 48000
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_size = stream.codec_context.frame_size or 1024
        fmt = stream.format.name
        total = int(seconds * rate)
        for n0 in range(0, total, frame_size):
            t = (np.arange(frame_size) + n0) / rate
            wave = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
            arr = (wave * 32767).astype(np.int16)[None] if fmt.startswith("s16") else wave[None]
            frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = n0
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_text_file(path: PathLike, text: str = "this is not a video, just some text\n" * 20) -> Path:
    """Write a plain text file (typically named ``*.mp4`` to fake a video)."""
    path = Path(path)
    path.write_text(text)
    return path


def write_truncated(src: PathLike, dst: PathLike, keep_fraction: float = 0.3) -> Path:
    """Copy the first ``keep_fraction`` of ``src``'s bytes to ``dst`` (a cut-off download).

    An mp4 written by ``write_video`` keeps its index (moov) at the end, so a truncated
    copy cannot be opened; write the source with
    ``container_options={"movflags": "+faststart"}`` to get a file that opens but whose
    later frames are missing.
    """
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst
