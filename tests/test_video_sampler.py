"""Tests for modules/video_sampler.py with synthetic videos whose frames carry their number.

Every video is generated once per module (module-scoped fixtures); ``read_index`` reads
the painted frame number back from the sampler's normalised output, so "the frame returned
for index i really is frame i" is checked pixel-wise, through compression, seeking,
resize, crop and normalisation.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import modules.video_sampler as video_sampler
from modules.video_sampler import (
    CLIP_MEAN,
    CLIP_STD,
    SampledVideo,
    VideoDecodeError,
    h264_is_non_reference,
    preprocess_frames,
    probe_video,
    sample_video,
    segment_indices,
    segment_offsets,
)
from tests.video_factory import (
    _CLIP_MEAN,
    _CLIP_STD,
    paint_index_frame,
    read_index,
    read_index_rgb,
    write_audio_only,
    write_text_file,
    write_truncated,
    write_video,
)

FPS = 25
NUM = 100  # frames in the standard clips (4 s at 25 fps)
# irregular timestamps in milliseconds: bursts and pauses (variable frame rate)
VFR_PTS = [0, 40, 50, 60, 300, 310, 320, 330, 1000, 1033, 1066, 1100, 2500, 2540, 2580, 2600, 2610, 4000, 4040, 4080]
BAD_INPUT_SECONDS = 5.0  # generous bound: every bad input is rejected in milliseconds


def tsn_eval_indices(num_frames: int, num_segments: int) -> list[int]:
    """TSN's eval rule, written independently of the sampler: int(tick / 2 + tick * k)."""
    tick = num_frames / num_segments
    return [int(tick / 2.0 + tick * k) for k in range(num_segments)]


def painted(sv: SampledVideo) -> list[int]:
    return [read_index(f) for f in sv.frames]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vids(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    v: dict[str, Path] = {}
    for ext in ("mp4", "webm", "avi", "mkv", "h264"):
        v[ext] = write_video(d / f"clip.{ext}", NUM, fps=FPS)
    v["vfr_mp4"] = write_video(d / "vfr.mp4", len(VFR_PTS), vfr_pts=VFR_PTS)
    v["vfr_webm"] = write_video(d / "vfr.webm", len(VFR_PTS), vfr_pts=VFR_PTS)
    v["short"] = write_video(d / "short.mp4", 5, fps=FPS)
    v["single_mp4"] = write_video(d / "single.mp4", 1)
    v["single_webm"] = write_video(d / "single.webm", 1)
    v["audio_mp4"] = write_video(d / "audio.mp4", 60, with_audio=True)
    v["audio_webm"] = write_video(d / "audio.webm", 60, with_audio=True)
    v["audio_avi"] = write_video(d / "audio.avi", 60, with_audio=True)
    v["rot90"] = write_video(d / "rot90.mp4", 12, size=(64, 32), rotate=90)
    v["faststart"] = write_video(d / "faststart.mp4", NUM, container_options={"movflags": "+faststart"})
    return v


@pytest.fixture(scope="module")
def bad(tmp_path_factory, vids) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    b: dict[str, Path] = {}
    b["zero_bytes"] = d / "zero.mp4"
    b["zero_bytes"].write_bytes(b"")
    b["truncated_mp4"] = write_truncated(vids["mp4"], d / "truncated.mp4", keep_fraction=0.3)
    b["text_as_mp4"] = write_text_file(d / "notes.mp4")
    b["audio_only"] = write_audio_only(d / "audio_only.mp4")
    b["missing"] = d / "does_not_exist.mp4"
    b["directory"] = d
    # a valid container whose video payload is noise: opens, indexes, never decodes
    data = bytearray(vids["faststart"].read_bytes())
    start = data.find(b"mdat") + 8
    data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    b["undecodable_payload"] = d / "noise.mp4"
    b["undecodable_payload"].write_bytes(bytes(data))
    return b


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """10 minutes at 10 fps, 32 x 32, keyframe every 5 s (6000 frames, ~0.2 MB)."""
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", 6000, fps=10, size=(32, 32), gop=50)


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("num_frames,num_segments", [(100, 16), (100, 32), (6000, 32), (7, 32), (1, 4), (33, 33)])
def test_segment_indices_eval_is_tsn_centre(num_frames, num_segments):
    got = segment_indices(num_frames, num_segments, segment_offsets(num_segments))
    assert got.dtype == np.int64
    assert got.tolist() == tsn_eval_indices(num_frames, num_segments)
    assert got.min() >= 0 and got.max() <= num_frames - 1


def test_segment_offsets_rng_types():
    a = segment_offsets(8, train=True, rng=np.random.default_rng(3))
    b = segment_offsets(8, train=True, rng=np.random.default_rng(3))
    c = segment_offsets(8, train=True, rng=random.Random(3))
    assert np.array_equal(a, b) and ((0 <= c) & (c < 1)).all()
    with pytest.raises(TypeError):
        segment_offsets(8, train=True, rng=3)
    with pytest.raises(ValueError):
        segment_offsets(0)


def test_factory_roundtrip_without_codec():
    for i in (0, 1, 2, 1234, 32767):
        for w, h in ((64, 48), (32, 32), (48, 64)):
            img = paint_index_frame(i, w, h)
            side = min(w, h)
            crop = img[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
            assert read_index_rgb(crop) == i
    with pytest.raises(ValueError):
        read_index_rgb(np.zeros((32, 32, 3), np.uint8))  # black padding is not frame 0


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) == _CLIP_MEAN
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711) == _CLIP_STD


def test_preprocess_frames_shapes_and_normalisation():
    grey = np.full((2, 48, 64, 3), 128, np.uint8)
    out = preprocess_frames(grey, size=32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    expect = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), expect, atol=1e-5)
    # centre crop of a wide frame keeps the painted central square
    assert read_index(preprocess_frames(paint_index_frame(77, 64, 48), size=40)[0]) == 77
    with pytest.raises(ValueError):
        preprocess_frames(np.zeros((4, 4), np.uint8))


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("kind", ["mp4", "webm", "avi", "mkv", "h264"])
def test_eval_sampling_returns_the_right_frames(vids, kind):
    """h264 mp4 (B-frames), vp9 webm, mpeg4 avi, h264 mkv, raw h264 (no timestamps)."""
    sv = sample_video(vids[kind], num_segments=16, size=64)
    expected = tsn_eval_indices(NUM, 16)
    assert sv.frame_indices.tolist() == expected
    assert painted(sv) == expected
    assert sv.num_frames == NUM
    assert sv.fps == pytest.approx(FPS, rel=1e-3)
    assert sv.duration == pytest.approx(NUM / FPS, rel=1e-2)
    assert np.allclose(sv.timestamps.numpy(), np.array(expected) / FPS, atol=1e-6)
    assert sv.path == str(vids[kind])


def test_output_shapes_dtypes_and_normalisation(vids):
    sv = sample_video(vids["mp4"])  # defaults: 32 segments, 224 px
    assert isinstance(sv, SampledVideo)
    assert sv.frames.shape == (32, 3, 224, 224) and sv.frames.dtype == torch.float32
    assert sv.frame_indices.shape == (32,) and sv.frame_indices.dtype == torch.int64
    assert sv.timestamps.shape == (32,) and sv.timestamps.dtype == torch.float64
    assert isinstance(sv.fps, float) and isinstance(sv.duration, float) and isinstance(sv.num_frames, int)
    rgb = sv.frames * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert rgb.min() > -0.02 and rgb.max() < 1.02  # un-normalised back into [0, 1]
    # both black and white cells are present: the full [0, 1] range is used
    assert rgb.amin(dim=(1, 2, 3)).max() < 0.1 and rgb.amax(dim=(1, 2, 3)).min() > 0.9
    assert painted(sv) == sv.frame_indices.tolist() == tsn_eval_indices(NUM, 32)


def test_decoder_path_matches_preprocess_frames(vids):
    """swscale resize in the sampler ~= torch bicubic in preprocess_frames on the same frame."""
    import av

    with av.open(str(vids["single_mp4"])) as c:
        rgb = next(c.decode(video=0)).to_ndarray(format="rgb24")
    ref = preprocess_frames(rgb[None], size=96)[0]
    sv = sample_video(vids["single_mp4"], num_segments=1, size=96)
    diff = (sv.frames[0] - ref).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    assert diff.mean() < 3.0, diff.mean()


def _nal(header: int, payload: bytes = b"\x88\x84", length_size: int = 4) -> bytes:
    return (1 + len(payload)).to_bytes(length_size, "big") + bytes([header]) + payload


def test_h264_non_reference_packets_are_recognised():
    sei, ref_slice, nonref_slice, idr = _nal(0x06), _nal(0x41), _nal(0x01), _nal(0x65)
    assert h264_is_non_reference(nonref_slice, 4)
    assert h264_is_non_reference(sei + nonref_slice + nonref_slice, 4)  # SEI + two slices
    assert h264_is_non_reference(_nal(0x01, length_size=2), 2)
    assert not h264_is_non_reference(ref_slice, 4)
    assert not h264_is_non_reference(idr, 4)
    assert not h264_is_non_reference(nonref_slice + ref_slice, 4)  # one reference slice is enough
    assert not h264_is_non_reference(sei, 4)  # no slice at all
    assert not h264_is_non_reference(nonref_slice[:-1], 4)  # length runs past the end
    assert not h264_is_non_reference(b"", 4)


def test_unneeded_non_reference_frames_are_not_decoded(vids, monkeypatch):
    """B-frames nobody references are skipped unless sampled; the sampled frames are unchanged."""
    fast = sample_video(vids["mp4"], num_segments=8, size=64)
    assert painted(fast) == tsn_eval_indices(NUM, 8)
    build_index = video_sampler._build_index

    def without_skipping(*args):
        index = build_index(*args)
        assert len(index.disposable) > NUM // 5  # x264's default B-frames
        index.disposable = frozenset()
        return index

    monkeypatch.setattr(video_sampler, "_build_index", without_skipping)
    full = sample_video(vids["mp4"], num_segments=8, size=64)
    assert torch.equal(fast.frames, full.frames)
    assert fast.decoded_frames < full.decoded_frames


def test_single_threaded_decoding_gives_the_same_frames(vids):
    for kind in ("mp4", "webm"):
        auto = sample_video(vids[kind], num_segments=8, size=32)
        single = sample_video(vids[kind], num_segments=8, size=32, decoder_threads=1)
        assert torch.equal(auto.frames, single.frames)
        assert torch.equal(auto.frame_indices, single.frame_indices)
    with pytest.raises(ValueError, match="decoder_threads"):
        sample_video(vids["mp4"], decoder_threads=-1)


def test_variable_frame_rate_uses_presentation_timestamps(vids):
    m = len(VFR_PTS)
    for kind in ("vfr_mp4", "vfr_webm"):
        sv = sample_video(vids[kind], num_segments=8, size=48)
        expected = tsn_eval_indices(m, 8)
        assert sv.frame_indices.tolist() == expected
        assert painted(sv) == expected
        # timestamps are the pts that were written, not index / fps
        assert np.allclose(sv.timestamps.numpy(), [VFR_PTS[i] / 1000 for i in expected], atol=1e-3)
        assert sv.num_frames == m
        assert sv.fps == pytest.approx((m - 1) / (VFR_PTS[-1] / 1000), rel=1e-3)
        # every frame, picked by its own pts
        sv = sample_video(vids[kind], num_segments=m, size=48)
        assert painted(sv) == sv.frame_indices.tolist() == list(range(m))
        assert np.allclose(sv.timestamps.numpy(), np.array(VFR_PTS) / 1000, atol=1e-3)


def test_fewer_frames_than_segments_repeats_frames(vids):
    sv = sample_video(vids["short"], num_segments=16, size=48)
    idx = sv.frame_indices.tolist()
    assert len(idx) == 16 and idx == sorted(idx) and set(idx) == set(range(5))
    assert painted(sv) == idx  # read_index raises on a black (padding) frame
    assert sv.num_frames == 5


@pytest.mark.parametrize("kind", ["single_mp4", "single_webm"])
def test_single_frame_video(vids, kind):
    sv = sample_video(vids[kind], num_segments=8, size=48)
    assert sv.frame_indices.tolist() == [0] * 8
    assert painted(sv) == [0] * 8
    assert sv.timestamps.tolist() == [0.0] * 8
    assert sv.num_frames == 1 and sv.frames.shape == (8, 3, 48, 48)


@pytest.mark.parametrize("kind", ["audio_mp4", "audio_webm", "audio_avi"])
def test_video_with_audio_stream(vids, kind):
    sv = sample_video(vids[kind], num_segments=8, size=48)
    expected = tsn_eval_indices(60, 8)
    assert sv.frame_indices.tolist() == expected == painted(sv)
    assert sv.num_frames == 60


def test_train_mode_random_point_in_each_segment(vids):
    n, m = 8, NUM
    a = sample_video(vids["mp4"], num_segments=n, size=48, train=True, rng=np.random.default_rng(1))
    b = sample_video(vids["mp4"], num_segments=n, size=48, train=True, rng=np.random.default_rng(1))
    c = sample_video(vids["mp4"], num_segments=n, size=48, train=True, rng=np.random.default_rng(2))
    d = sample_video(vids["mp4"], num_segments=n, size=48, train=True, rng=random.Random(5))
    assert a.frame_indices.tolist() == b.frame_indices.tolist()
    assert torch.equal(a.frames, b.frames)
    assert a.frame_indices.tolist() != c.frame_indices.tolist()
    for sv in (a, c, d):
        idx = sv.frame_indices.tolist()
        for k, i in enumerate(idx):
            assert k * m / n - 1 < i < (k + 1) * m / n, (k, i)  # inside segment k
        assert painted(sv) == idx


def test_train_mode_covers_each_segment(vids):
    """Over many draws the random point visits the whole segment, not only its centre."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        seen.update(segment_indices(NUM, 8, segment_offsets(8, True, rng))[:1].tolist())
    assert seen == set(range(0, 13))


def test_display_rotation_is_applied(vids):
    sv = sample_video(vids["rot90"], num_segments=4, size=48)
    # rotation 90 = display turned 90 degrees counter-clockwise; undo it to read the grid
    unrotated = [read_index(torch.rot90(f, k=-1, dims=(1, 2))) for f in sv.frames]
    assert unrotated == sv.frame_indices.tolist()
    # reading the returned frames as they are gives nonsense: they really are rotated
    assert [_try_read(f) for f in sv.frames] != sv.frame_indices.tolist()


def _try_read(frame: torch.Tensor):
    try:
        return read_index(frame)
    except ValueError:
        return None


def test_sparse_targets_seek_instead_of_decoding_everything(vids):
    sv = sample_video(vids["mp4"], num_segments=3, size=48)  # keyframe every 8 frames
    assert painted(sv) == sv.frame_indices.tolist() == tsn_eval_indices(NUM, 3)
    assert sv.decoded_frames < NUM // 2


def test_truncated_file_with_index_up_front_uses_the_decodable_part(vids, tmp_path):
    cut = write_truncated(vids["faststart"], tmp_path / "cut.mp4", keep_fraction=0.5)
    sv = sample_video(cut, num_segments=8, size=48)
    assert 0 < sv.num_frames < NUM
    assert painted(sv) == sv.frame_indices.tolist()
    assert sv.frame_indices.tolist() == tsn_eval_indices(sv.num_frames, 8)


def test_path_like_and_probe(vids):
    info = probe_video(vids["mp4"])
    assert info == {"fps": 25.0, "duration": pytest.approx(4.0, abs=0.05), "num_frames": NUM,
                    "width": 64, "height": 48, "codec": "h264"}
    assert probe_video(str(vids["webm"]))["codec"] == "vp9"
    assert sample_video(str(vids["avi"]), 2, size=32).path == str(vids["avi"])


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "name,reason_words",
    [
        ("zero_bytes", "empty"),
        ("truncated_mp4", "truncated"),
        ("text_as_mp4", "not a readable video"),
        ("audio_only", "no video stream"),
        ("missing", "not found"),
        ("directory", "directory"),
        ("undecodable_payload", "no decodable video frame"),
    ],
)
def test_bad_inputs_raise_video_decode_error(bad, name, reason_words):
    path = bad[name]
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError) as info:
        sample_video(path, num_segments=8, size=32)
    assert time.monotonic() - t0 < BAD_INPUT_SECONDS
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path) and reason_words in err.reason
    assert str(err) == f"{path}: {err.reason}" and "\n" not in str(err)
    if name != "undecodable_payload":  # probing does not decode
        with pytest.raises(VideoDecodeError):
            probe_video(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(vids, tmp_path):
    p = tmp_path / "locked.mp4"
    p.write_bytes(vids["mp4"].read_bytes())
    p.chmod(0)
    with pytest.raises(VideoDecodeError, match="permission denied"):
        sample_video(p, 4)


def test_unreadable_file_reason_even_as_root(vids, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(VideoDecodeError, match="permission denied"):
        sample_video(vids["mp4"], 4)


def test_video_decode_error_api():
    err = VideoDecodeError("/x/y.mp4", "bad\nthing")
    assert str(err) == "/x/y.mp4: bad thing" and err.path == "/x/y.mp4" and err.reason == "bad thing"
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, VideoDecodeError) and str(again) == str(err)


# ----------------------------------------------------------------------------- long video


def test_long_video_bounded_time_memory_and_decoding(long_video):
    total = 6000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        sv = sample_video(long_video, num_segments=32, size=224)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    expected = tsn_eval_indices(total, 32)
    assert sv.frame_indices.tolist() == expected == painted(sv)
    assert sv.num_frames == total and sv.duration == pytest.approx(600.0, rel=1e-3)
    assert np.allclose(sv.timestamps.numpy(), np.array(expected) / 10, atol=1e-6)
    # seeks to the keyframe before each target: ~25 frames decoded per target, not 6000
    assert sv.decoded_frames < total // 4, sv.decoded_frames
    assert peak < 64 * 2**20, f"python/numpy peak {peak / 2**20:.1f} MiB"
    assert rss_growth_mb < 300, f"RSS grew {rss_growth_mb:.0f} MiB"
    assert seconds < 15, f"{seconds:.2f} s"
    print(f"long video: {seconds:.3f} s, {sv.decoded_frames} frames decoded, peak {peak / 2**20:.1f} MiB")
    assert math.isfinite(sv.fps) and sv.fps == pytest.approx(10.0, rel=1e-3)
