"""PyAV primitives behind the samplers: open a container with clear errors, index a
video stream's packets without decoding, and decode frames located by their pts.

``video_sampler`` (segment sampling) and ``window_sampler`` (windowed single pass) are
built on these; the method is described in ``video_sampler``'s docstring (index pass,
seeking by keyframe, matching frames by pts, the no-timestamp fallback). Every FFmpeg or
OS failure that makes a file unusable becomes :class:`VideoDecodeError`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Optional, Sequence, Union

import av
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["VideoDecodeError", "h264_is_non_reference", "SEEK_GAP_FRAMES", "declared_length", "shortfall_note"]

PathLike = Union[str, os.PathLike]


#: seek when the keyframe before the next target is more than this many frames ahead of
#: the last decoded frame; closer than that, decoding through is cheaper than a seek
#: (which flushes the decoder and its frame-thread pipeline).
SEEK_GAP_FRAMES = 16
#: how many earlier keyframes to try when a seek lands after its target
_SEEK_RETRIES = 3
#: decoding errors tolerated before the first good frame before giving up on a file
_MAX_DECODE_ERRORS = 100
#: seconds PyAV waits on an open / a read before giving up (never hang on odd inputs)
_IO_TIMEOUT = (30.0, 30.0)

class VideoDecodeError(ValueError):
    """A video file that cannot be opened or decoded; ``str`` is ``"<path>: <reason>"``."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        # one line: ffmpeg messages sometimes carry newlines
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))



# ----------------------------------------------------------------------------- frames


def _short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the short side == size, aspect kept (>= size)."""
    scale = size / min(width, height)
    return max(size, int(round(width * scale))), max(size, int(round(height * scale)))


def _center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre crop (H, W, C) -> (size, size, C); H, W >= size."""
    h, w = rgb.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return rgb[y0 : y0 + size, x0 : x0 + size]


def _frame_to_square(frame: av.VideoFrame, size: int) -> np.ndarray:
    """Decoded frame -> uint8 (size, size, 3) RGB: swscale bicubic resize, rotation, crop."""
    new_w, new_h = _short_side_size(frame.width, frame.height, size)
    kwargs = {}
    # tagged full-range ("JPEG") YUV from phones would otherwise be read as limited range
    if frame.color_range:
        kwargs["src_color_range"] = frame.color_range
    rgb = frame.to_ndarray(width=new_w, height=new_h, format="rgb24", interpolation="BICUBIC", **kwargs)
    rotation = _frame_rotation(frame)
    if rotation:
        # display matrix angle is counter-clockwise, like np.rot90 on an (H, W) image
        rgb = np.rot90(rgb, k=rotation // 90)
    return np.ascontiguousarray(_center_crop(rgb, size))


def _frame_rotation(frame: av.VideoFrame) -> int:
    """Display rotation in {0, 90, 180, 270} (counter-clockwise); 0 if absent/odd."""
    try:
        angle = frame.rotation
    except Exception:  # pragma: no cover - older PyAV / malformed side data
        return 0
    if not angle:
        return 0
    quarter = int(round(angle / 90.0))
    if abs(angle - 90 * quarter) > 1:
        logger.debug("ignoring non-right-angle display rotation %s", angle)
        return 0
    return (quarter % 4) * 90


# ----------------------------------------------------------------------------- container helpers


def _ffmpeg_reason(err: BaseException) -> str:
    """Short message of an av/OS error without the file name repeated."""
    msg = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(msg)


def _check_path(path: str) -> None:
    """Cheap checks that give clear reasons before ffmpeg gives a vague one."""
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory, not a video file")
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise VideoDecodeError(path, f"cannot stat file: {_ffmpeg_reason(err)}") from None
    if size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoDecodeError(path, "permission denied")


def _open(path: str) -> av.container.InputContainer:
    """Open a file for reading; every failure becomes ``VideoDecodeError``."""
    _check_path(path)
    try:
        return av.open(path, mode="r", timeout=_IO_TIMEOUT)
    except PermissionError:
        raise VideoDecodeError(path, "permission denied") from None
    except av.error.EOFError:
        raise VideoDecodeError(path, "unexpected end of file while reading the header (truncated?)") from None
    except av.error.InvalidDataError as err:
        raise VideoDecodeError(
            path, f"not a readable video container ({_ffmpeg_reason(err)}; truncated or not a video?)"
        ) from None
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoDecodeError(path, f"cannot open: {_ffmpeg_reason(err)}") from None


def _video_stream(container: av.container.InputContainer, path: str):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
    return container.streams.video[0]


def _average_rate(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        try:
            if rate and float(rate) > 0:
                return float(rate)
        except (TypeError, ZeroDivisionError):
            continue
    return 0.0


def _open_for_decoding(path: str, threads: int):
    """Open ``path`` for decoding with ``threads`` decoder threads (0 = FFmpeg's choice)."""
    container = _open(path)
    stream = _video_stream(container, path)
    if threads == 1:
        stream.thread_type = "NONE"
        stream.thread_count = 1
    else:
        stream.thread_type = "AUTO"  # frame + slice threads
        stream.thread_count = threads
    return container, stream


def declared_length(container, stream) -> tuple[int, float]:
    """(frames, seconds) the container's header declares for ``stream``; 0 where unknown.

    mp4/mov give both (sample table); Matroska/WebM give a per-track DURATION tag and a
    segment duration (used only when the video is the file's only stream).
    """
    frames = int(stream.frames or 0)
    seconds = 0.0
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    if seconds <= 0:
        tag = (stream.metadata or {}).get("DURATION") or ""
        parts = tag.split(":")
        try:
            if len(parts) == 3:
                seconds = int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])
        except ValueError:
            seconds = 0.0
    if seconds <= 0 and container.duration and len(container.streams) == 1:
        seconds = container.duration / av.time_base
    return max(frames, 0), max(seconds, 0.0)


def shortfall_note(declared: tuple[int, float], readable_frames: int, readable_seconds: float) -> Optional[str]:
    """One-line warning when what can be read falls clearly short of what the header declares
    (a cut-off download): under 90% of the frames (2 or more missing) or of the duration
    (more than half a second missing). None otherwise."""
    frames, seconds = declared
    if frames > 0 and readable_frames < 0.9 * frames and frames - readable_frames >= 2:
        return f"truncated? only {readable_frames} of the {frames} frames the container declares are readable"
    if seconds > 0 and readable_seconds < 0.9 * seconds and seconds - readable_seconds > 0.5:
        return (f"truncated? only {readable_seconds:.2f}s of the {seconds:.2f}s the container declares "
                "are readable")
    return None


# ----------------------------------------------------------------------------- index pass


@dataclass
class _Index:
    """Presentation-ordered packet timestamps of one video stream."""

    pts: np.ndarray  # int64 (M,), sorted, in stream.time_base; empty if has_pts is False
    keyframes: np.ndarray  # int64 (K,), sorted positions (into pts) of keyframes
    time_base: Fraction
    num_packets: int
    last_duration: int  # duration of the last presented packet (time_base units), 0 if unknown
    has_pts: bool
    # pts of packets no other frame references (non-reference H.264 pictures, packets the
    # container flags disposable): the decoder may skip them unless they are wanted
    disposable: frozenset = frozenset()


def _h264_length_size(stream) -> Optional[int]:
    """NAL length-prefix size of an H.264 stream stored as avcC (mp4, mkv, mov), else None."""
    if stream.codec_context.name != "h264":
        return None
    extradata = stream.codec_context.extradata
    if not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None  # Annex B (start codes, e.g. MPEG-TS): not parsed here
    return (extradata[4] & 0x3) + 1


def h264_is_non_reference(data: bytes, length_size: int) -> bool:
    """Whether an avcC H.264 packet holds only non-reference slices (nal_ref_idc == 0).

    No other picture is predicted from such a packet, so a decoder can drop it without
    changing any other frame (what FFmpeg's ``skip_frame=NONREF`` does). A packet with
    no slice NAL unit, or a malformed one, counts as reference.
    """
    pos, end, slices = 0, len(data), 0
    while pos + length_size < end:
        size = int.from_bytes(data[pos:pos + length_size], "big")
        header = data[pos + length_size]
        pos += length_size + size
        if size == 0 or pos > end:
            return False
        if (header & 0x1F) in (1, 2, 3, 4, 5):  # coded slice NAL units
            if header & 0x60:  # nal_ref_idc != 0
                return False
            slices += 1
    return slices > 0 and pos == end


def _build_index(container, stream, path: str) -> _Index:
    """Demux (no decode) the video stream once, collecting pts/dts and keyframe flags."""
    stamps: list[int] = []
    key_stamps: list[int] = []
    disposable: list[int] = []
    length_size = _h264_length_size(stream)
    durations: dict[int, int] = {}
    missing = 0
    count = 0
    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            break
        except (av.error.FFmpegError, OSError) as err:
            # a cut-off file: keep what was read, the decoder will tell what is usable
            logger.warning("%s: demuxing stopped early (%s); using %d packets", path, _ffmpeg_reason(err), count)
            break
        if packet.size == 0 or packet.is_discard or packet.is_corrupt:
            # the final flush packet, edit-list discarded packets, and packets the demuxer
            # flags as damaged (e.g. the cut-off last packet of a truncated file)
            continue
        count += 1
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            missing += 1
            continue
        stamps.append(ts)
        durations[ts] = packet.duration or 0
        if packet.is_keyframe:
            key_stamps.append(ts)
        elif packet.is_disposable or (length_size is not None and h264_is_non_reference(memoryview(packet), length_size)):
            disposable.append(ts)
    time_base = stream.time_base or Fraction(1, 1)
    has_pts = count > 0 and missing == 0 and len(set(stamps)) == len(stamps)
    if not has_pts:
        if count:
            logger.info("%s: %d/%d packets without distinct timestamps; numbering frames by decode order",
                        path, missing, count)
        return _Index(np.zeros(0, np.int64), np.zeros(0, np.int64), time_base, count, 0, False)
    pts = np.array(sorted(stamps), dtype=np.int64)
    keyframes = np.searchsorted(pts, np.array(sorted(key_stamps), dtype=np.int64))
    return _Index(pts, keyframes.astype(np.int64), time_base, count, durations.get(int(pts[-1]), 0), True,
                  frozenset(disposable))


# ----------------------------------------------------------------------------- decoding


class _NoFrameTimestamps(Exception):
    """Decoded frames carry no pts although packets did: renumber by output order."""


class _Decoder:
    """Frame iterator over one stream that survives corrupt packets and counts its work."""

    def __init__(self, container, stream, path: str, max_packets: int, skip_pts: frozenset = frozenset()) -> None:
        self.container, self.stream, self.path = container, stream, path
        self.max_packets = max_packets  # hard bound: a corrupt file cannot loop forever
        self.skip_pts = skip_pts  # packets never sent to the decoder (unwanted, non-reference)
        self.decoded = 0
        self.skipped = 0
        self.errors = 0
        self.seeks = 0

    def frames(self) -> Iterator[av.VideoFrame]:
        """Decode from the container's current position to the end of the stream."""
        demux = self.container.demux(self.stream)
        packets = 0
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                return
            except (av.error.FFmpegError, OSError) as err:
                logger.warning("%s: read error (%s); stopping", self.path, _ffmpeg_reason(err))
                packet = None  # flush whatever the decoder still holds
            if packet is not None and packet.is_corrupt:
                # damaged (e.g. cut-off) packets are not in the index; feeding one to a
                # frame-threaded decoder can also lose the good frames still in flight
                continue
            if packet is not None and packet.pts is not None and packet.pts in self.skip_pts:
                self.skipped += 1
                continue
            packets += 1
            if packets > self.max_packets:
                logger.warning("%s: more packets than indexed; stopping", self.path)
                return
            try:
                out = self.stream.codec_context.decode(packet) if packet is None else packet.decode()
            except av.error.EOFError:
                return
            except av.error.FFmpegError as err:
                self.errors += 1
                # sporadic damage in a long file is tolerated; a file whose first
                # packets all fail is garbage and not worth decoding to the end
                if self.decoded == 0 and self.errors > _MAX_DECODE_ERRORS:
                    raise VideoDecodeError(
                        self.path, f"no decodable video frame ({self.errors} packets failed: {_ffmpeg_reason(err)})"
                    ) from None
                logger.debug("%s: skipping undecodable packet (%s)", self.path, _ffmpeg_reason(err))
                continue
            for frame in out:
                self.decoded += 1
                yield frame
            if packet is None:
                return

    def seek(self, pts: int) -> None:
        self.seeks += 1
        # keyframes only, at or before pts; PyAV flushes the decoder buffers
        self.container.seek(int(pts), stream=self.stream, backward=True, any_frame=False)


def _position(index: _Index, pts: Optional[int]) -> tuple[int, bool]:
    """(position of the last indexed pts <= ``pts``, whether ``pts`` is exactly indexed).

    Frames whose pts is not in the index (corrupt packets, decoder oddities) are never
    stored under a neighbour's number: callers only keep exact matches.
    """
    if pts is None:
        raise _NoFrameTimestamps()
    pos = int(np.searchsorted(index.pts, pts, side="right")) - 1
    return pos, pos >= 0 and int(index.pts[pos]) == pts


def _decode_indexed(
    decoder: _Decoder, index: _Index, targets: Sequence[int], size: int, allow_seek: bool
) -> dict[int, np.ndarray]:
    """Decode the frames at presentation positions ``targets`` (sorted); pos -> uint8 square."""
    wanted = sorted(set(int(t) for t in targets))
    wanted_set = set(wanted)
    got: dict[int, np.ndarray] = {}
    keyframes = index.keyframes.tolist() or [0]
    frames: Iterator[av.VideoFrame] = decoder.frames()
    cur = -1  # last decoded position (in presentation order)
    exhausted = False
    for target in wanted:
        if target in got:
            continue
        k = bisect.bisect_right(keyframes, target) - 1
        key_pos = keyframes[k] if k >= 0 else 0
        if allow_seek and (key_pos > cur + SEEK_GAP_FRAMES or exhausted or cur > target):
            frames, cur = _seek_before(decoder, index, keyframes, k, target)
            exhausted = False
        target_pts = int(index.pts[target])
        for frame in frames:
            pos, exact = _position(index, frame.pts)
            cur = pos
            # corrupt frames (concealed garbage from damaged/truncated packets) are skipped
            if exact and pos in wanted_set and pos not in got and not frame.is_corrupt:
                got[pos] = _frame_to_square(frame, size)
            if frame.pts >= target_pts:
                break
        else:
            exhausted = True
            if not allow_seek:
                break  # sequential mode: nothing more to decode
    return got


def _seek_before(decoder: _Decoder, index: _Index, keyframes: list[int], k: int, target: int):
    """Seek to keyframe k (or earlier ones) so that decoding reaches ``target``.

    Returns (frame iterator positioned at the first decoded frame, that frame's position - 1).
    """
    candidates = [keyframes[j] for j in range(k, max(k - _SEEK_RETRIES, -1), -1)] + [0]
    for key_pos in candidates:
        decoder.seek(int(index.pts[key_pos]))
        frames = decoder.frames()
        first = next(frames, None)
        if first is None:
            continue
        pos, _ = _position(index, first.pts)
        if first.pts <= int(index.pts[target]) or key_pos == 0:
            # put the peeked frame back in front of the stream
            return itertools.chain([first], frames), pos - 1
        logger.debug("seek for frame %d landed at %d; retrying earlier", target, pos)
    return iter(()), -1


def _decode_counting(decoder: _Decoder, targets: Sequence[int], size: int) -> tuple[dict[int, np.ndarray], dict[int, float], int]:
    """One sequential pass numbering frames by output order (files without timestamps).

    Returns (pos -> uint8 square, pos -> frame.time or nan, number of frames decoded).
    """
    wanted = set(int(t) for t in targets)
    got: dict[int, np.ndarray] = {}
    times: dict[int, float] = {}
    count = 0
    pos = -1
    for frame in decoder.frames():
        if frame.is_corrupt:
            continue
        pos += 1
        count = pos + 1
        if pos in wanted:
            got[pos] = _frame_to_square(frame, size)
            times[pos] = float(frame.time) if frame.time is not None else float("nan")
    return got, times, count
