"""Windowed single-pass sampling and windowed encoding of long videos (issue 14)."""
from __future__ import annotations

import numpy as np
import pytest

from modules.long_video import (
    AUTO_WINDOW_SECONDS,
    AUTO_WINDOW_THRESHOLD,
    WindowTable,
    combine_window_embeddings,
    encode_long_video,
    resolve_window,
    window_moments,
)
from modules.video_sampler import sample_video
from modules.window_sampler import iter_windows, plan_windows
from tests.cli_utils import small_model
from tests.video_factory import read_index_rgb, write_truncated, write_video

FPS = 25


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def clip10s(tmp_path_factory):
    """10 s, 250 frames with their numbers painted; keyframe every 25 frames."""
    return write_video(tmp_path_factory.mktemp("long") / "ten.mp4", 250, fps=FPS, size=(64, 48), gop=25)


def _painted(frames: np.ndarray) -> list:
    return [read_index_rgb(f.transpose(1, 2, 0)) for f in frames]


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("window, stride, duration", [(3.0, None, 10.0), (3.0, 2.0, 10.0), (4.0, 1.5, 9.96),
                                                      (2.0, 2.0, 2.0), (5.0, 5.0, 3.0), (1.0, 0.5, 7.3)])
def test_windows_cover_the_timeline_without_gaps(window, stride, duration):
    times = np.arange(int(round(duration * FPS))) / FPS
    plan = plan_windows(times, duration, window, stride, num_segments=8)
    step = window if stride is None else stride
    assert plan[0].start_time == 0.0 and plan[0].first == 0
    assert plan[-1].end_time == pytest.approx(duration) and plan[-1].last == len(times) - 1
    for a, b in zip(plan, plan[1:]):
        assert b.start_time == pytest.approx(a.start_time + step)  # windows step by the stride
        assert b.start_time <= a.end_time + 1e-9  # no gap
        assert a.end_time - b.start_time == pytest.approx(window - step)  # overlap is exactly W - S
        # same in frames: the frames both windows hold are those of the overlap's span
        shared = np.count_nonzero((times >= b.start_time - 1e-9) & (times < a.end_time - 1e-9))
        assert a.last - b.first + 1 == shared
    for w in plan:
        assert w.end_time - w.start_time <= window + step / 2 + 1e-9  # a folded tail adds < S/2
        assert np.all((w.targets >= w.first) & (w.targets <= w.last)) and len(w.targets) == 8
        # frames belong to a window by time
        assert times[w.first] >= w.start_time - 1e-9 and times[w.last] < w.end_time
    if duration <= window:
        assert len(plan) == 1


def test_short_tail_is_folded_into_the_last_window():
    times = np.arange(251) / FPS  # 10.04 s: a 0.04 s tail after the third 3.33 s... window
    plan = plan_windows(times, 10.04, 5.0)
    assert [(w.start_time, w.end_time) for w in plan] == [(0.0, 5.0), (5.0, pytest.approx(10.04))]


@pytest.mark.parametrize("window, stride", [(0, None), (-1, None), (2.0, 3.0), (2.0, 0), (float("nan"), None)])
def test_bad_window_arguments(window, stride):
    with pytest.raises(ValueError):
        plan_windows(np.arange(10) / FPS, 0.4, window, stride)


def test_automatic_window_rule():
    assert resolve_window(None, AUTO_WINDOW_THRESHOLD) is None
    assert resolve_window(None, AUTO_WINDOW_THRESHOLD + 1) == AUTO_WINDOW_SECONDS
    assert resolve_window(0, 7200.0) is None
    assert resolve_window(12.5, 3.0) == 12.5
    with pytest.raises(ValueError):
        resolve_window(-2, 10.0)


def test_combined_embedding_is_the_size_weighted_mean_renormalised():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = combine_window_embeddings(emb, np.array([75, 75, 25]))
    expected = (75 * emb[0] + 75 * emb[1] + 25 * emb[2]) / 175
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected), rtol=1e-6)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(combine_window_embeddings(emb[:1], np.array([9])), emb[0])


# ----------------------------------------------------------------------------- one decoding pass


@pytest.mark.parametrize("window, stride", [(3.0, None), (2.0, 1.5)])
def test_window_frames_are_the_painted_frames_of_their_span(clip10s, window, stride):
    stream = iter_windows(clip10s, window, stride, num_segments=8, size=32)
    assert stream.num_frames == 250 and stream.duration == pytest.approx(10.0)
    got = list(stream)
    assert [w.window for w in got] == stream.windows and stream.complete and stream.note is None
    for w in got:
        assert _painted(w.frames) == w.frame_indices.tolist()
        assert np.all(w.frame_indices >= w.window.first) and np.all(w.frame_indices <= w.window.last)
        # a frame's number / fps is its time: inside the window's span
        assert np.all(w.frame_indices / FPS >= w.window.start_time - 1e-9)
        assert np.all(w.frame_indices / FPS < w.window.end_time)
        np.testing.assert_allclose(w.timestamps, w.frame_indices / FPS)
    # one pass: every frame decoded at most once (non-reference frames nobody samples skipped)
    assert stream.decoded_frames <= 250


def test_video_shorter_than_one_window_is_todays_sample(clip10s):
    stream = iter_windows(clip10s, 60.0, num_segments=8, size=32)
    (only,) = list(stream)
    ref = sample_video(clip10s, num_segments=8, size=32, normalize=False)
    np.testing.assert_array_equal(only.frames, ref.frames.numpy())
    np.testing.assert_array_equal(only.frame_indices, ref.frame_indices.numpy())
    assert (only.window.start_time, only.window.end_time) == (0.0, pytest.approx(ref.duration))


def test_truncated_file_keeps_the_windows_it_could_decode(tmp_path):
    full = write_video(tmp_path / "full.mp4", 250, fps=FPS, size=(64, 48), gop=25,
                       container_options={"movflags": "+faststart"})
    cut = write_truncated(full, tmp_path / "cut.mp4", keep_fraction=0.5)
    stream = iter_windows(cut, 2.0, num_segments=8, size=32)
    got = list(stream)
    assert 1 <= len(got) < 5  # the full file has 5 windows
    assert not stream.complete and "truncated" in stream.note
    for w in got:
        assert _painted(w.frames) == w.frame_indices.tolist()


# ----------------------------------------------------------------------------- windowed encoding


def test_one_window_encodes_like_the_whole_video(model, clip10s):
    table = encode_long_video(model, clip10s, window_seconds=60.0)
    assert table.num_windows == 1
    np.testing.assert_allclose(table.embedding, model.extract_video_embedding(clip10s), atol=1e-6)
    text = model.encode_text(["a red square"])[0]
    hits = model.retrieve(clip10s, "a red square")
    moments = window_moments(table, text)
    assert [(m.frame, m.start_frame, m.end_frame, m.start_time, m.end_time) for m in moments] == \
        [(h.frame, h.start_frame, h.end_frame, h.start_time, h.end_time) for h in hits]
    np.testing.assert_allclose([m.score for m in moments], [h.score for h in hits], atol=1e-5)


def test_windows_are_encoded_like_short_videos_of_their_frames(model, clip10s):
    table = encode_long_video(model, clip10s, window_seconds=3.0, batch_windows=2, parallel_batches=2)
    stream = iter_windows(clip10s, 3.0, num_segments=model.config.num_segments, size=model.config.video_size)
    windows = list(stream)
    assert table.num_windows == len(windows) == 3 and table.complete
    from modules.long_video import encode_window_batch

    for k, w in enumerate(windows):  # batch of one = one short video of these frames
        features = encode_window_batch(model, w.frames[None])  # batch rounding differs ~1e-5
        np.testing.assert_allclose(table.embeddings[k], features.video_embeddings[0].numpy(), atol=2e-4)
        np.testing.assert_allclose(table.group_features[k], features.frame_features[0].numpy(), atol=2e-4)
        np.testing.assert_array_equal(table.sampled_frame_indices[k], w.frame_indices)
    np.testing.assert_allclose(table.embedding, combine_window_embeddings(table.embeddings, table.sizes), atol=1e-6)
    assert table.sizes.tolist() == [75, 75, 100]
    # group spans lie inside their window, in order
    assert np.all(table.group_start_times >= table.start_times[:, None] - 1e-9)
    assert np.all(table.group_end_times <= table.end_times[:, None] + 1e-9)
    moments = window_moments(table, model.encode_text(["x"])[0], top_k=4)
    assert len(moments) == 4 and moments == sorted(moments, key=lambda m: -m.score)
    for m in moments:
        assert table.start_times[m.window] <= m.start_time < m.end_time <= table.end_times[m.window] + 1e-9
        assert m.start_frame <= m.frame <= m.end_frame
    # the table survives its npz form
    again = WindowTable.from_arrays(table.to_arrays())
    for name in WindowTable.ARRAYS:
        np.testing.assert_array_equal(getattr(again, name), getattr(table, name))


def test_batched_windows_match_one_window_per_forward(model, clip10s):
    one = encode_long_video(model, clip10s, window_seconds=1.0, batch_windows=1, parallel_batches=1)
    batched = encode_long_video(model, clip10s, window_seconds=1.0, batch_windows=4, parallel_batches=1)
    assert one.num_windows == batched.num_windows == 10  # batches of 4, 4 and 2
    np.testing.assert_array_equal(batched.start_times, one.start_times)
    np.testing.assert_array_equal(batched.sampled_frame_indices, one.sampled_frame_indices)
    # batch shapes change float rounding (and near-tied merges of the random test model)
    np.testing.assert_allclose(batched.embeddings, one.embeddings, atol=2e-4)
    np.testing.assert_allclose(batched.group_features, one.group_features, atol=2e-4)
    np.testing.assert_allclose(batched.embedding, one.embedding, atol=2e-4)


def test_windows_per_forward_default_is_one_on_cpu_and_a_batch_on_cuda(model, monkeypatch):
    from types import SimpleNamespace

    import torch

    from modules.long_video import MAX_WINDOW_BATCH, default_batch_windows

    assert default_batch_windows(model) == 1  # CPU: one window per forward, lanes side by side
    assert default_batch_windows(model, device_batch=8) == 1  # whatever the extraction's batch
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0), config=model.config, clip=model.clip,
                              temporal_prompts=model.temporal_prompts)
    assert default_batch_windows(on_cuda, device_batch=8) == 8  # the extraction's device batch
    assert default_batch_windows(on_cuda, device_batch=500) == MAX_WINDOW_BATCH > 1  # capped
    assert default_batch_windows(on_cuda, device_batch=1) == 1
    # none given: what free device memory holds (device_feed.device_batch_size), capped
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    assert default_batch_windows(on_cuda) == MAX_WINDOW_BATCH
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 16 << 30))
    assert default_batch_windows(on_cuda) == 1  # nothing free: one at a time, never 0


def test_extraction_passes_its_windows_per_forward(tmp_path, model, monkeypatch):
    """The directory run batches a long video's windows by ``default_batch_windows`` of its
    model and device batch (on CUDA the device batch; here faked on CPU)."""
    import modules.long_video as long_video
    from modules.extraction import extract_directory_embeddings

    asked, used = [], []
    real = long_video.encode_long_video

    def default(m, device_batch=None):
        asked.append(device_batch)
        return 3

    def recording(*args, **kwargs):
        used.append(kwargs["batch_windows"])
        return real(*args, **kwargs)

    monkeypatch.setattr(long_video, "default_batch_windows", default)
    monkeypatch.setattr(long_video, "encode_long_video", recording)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "long.mp4", 100, fps=FPS, size=(64, 48), gop=25)
    result = extract_directory_embeddings(videos, tmp_path / "out", model=model, num_workers=0, batch_size=5,
                                          window_seconds=1.0, progress=False)
    assert result["processed"] == 1 and asked == [5] and used == [3]


# ----------------------------------------------------------------------------- the directory pipeline


def _extract_cmd(video_dir, out, config):
    import sys

    from tests.cli_utils import ROOT

    return [sys.executable, str(ROOT / "extract_video_embeddings.py"), "--video_dir", str(video_dir),
            "--output_dir", str(out), "--config_path", str(config), "--num_workers", "0",
            "--parallel_batches", "1", "--save_frame_features", "--quiet"]


def test_directory_run_writes_the_window_table(tmp_path, model):
    from modules.extraction import extract_directory_embeddings

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "long.mp4", 100, fps=FPS, size=(64, 48), gop=25)
    write_video(videos / "short.mp4", 12, fps=FPS, size=(64, 48))
    out = tmp_path / "out"
    result = extract_directory_embeddings(videos, out, model=model, num_workers=0, save_frame_features=True,
                                          window_seconds=1.5, progress=False)
    assert result["processed"] == 2 and result["failed"] == 0
    with np.load(out / "long_windows.npz", allow_pickle=False) as npz:
        table = WindowTable.from_arrays(dict(npz))
    assert table.num_windows == 3 and table.complete  # 4 s: [0, 1.5), [1.5, 3), [3, 4)
    np.testing.assert_allclose(np.load(out / "long_embedding.npy"), table.embedding, atol=1e-6)
    with np.load(out / "long_frames.npz", allow_pickle=False) as npz:
        assert npz["frame_features"].shape[0] == table.group_features.shape[0] * table.group_features.shape[1]
        np.testing.assert_array_equal(npz["window_index"], np.repeat(np.arange(3), table.group_features.shape[1]))
    # a video shorter than a window is one window equal to the unwindowed embedding
    np.testing.assert_allclose(np.load(out / "short_embedding.npy"),
                               model.extract_video_embedding(videos / "short.mp4"), atol=1e-6)


def test_truncated_long_file_is_a_warning_in_the_summary(tmp_path, model, caplog):
    """A windowed video whose window table is incomplete is embedded from the windows it could
    decode, and says so where short truncated files do: its summary row's warning (and one
    logged line naming the file)."""
    import json
    import logging

    from modules.extraction import extract_directory_embeddings

    videos = tmp_path / "videos"
    videos.mkdir()
    full = write_video(tmp_path / "full.mp4", 500, fps=FPS, size=(64, 48), gop=25,  # 20 s
                       container_options={"movflags": "+faststart"})
    write_truncated(full, videos / "cut.mp4", keep_fraction=0.45)
    write_video(videos / "whole.mp4", 100, fps=FPS, size=(64, 48), gop=25)  # 4 s, complete
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        result = extract_directory_embeddings(videos, out, model=model, num_workers=0, summary=True,
                                              window_seconds=2.0, progress=False)
    assert result["processed"] == 2 and result["failed"] == 0
    with np.load(out / "cut_windows.npz", allow_pickle=False) as npz:
        table = WindowTable.from_arrays(dict(npz))
    assert not table.complete and 1 <= table.num_windows < 10
    np.testing.assert_allclose(np.load(out / "cut_embedding.npy"), table.embedding, atol=1e-6)
    rows = {v["name"]: v for v in json.loads((out / "extraction_summary.json").read_text())["videos"]}
    assert rows["cut"]["status"] == "success"
    warning = rows["cut"]["warning"]
    assert warning == table.note and f"readable timeline ends at {table.duration:.1f} s" in warning
    assert rows["whole"]["warning"] is None
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "cut.mp4" in r.getMessage()]
    assert len(logged) == 1 and table.note in logged[0]


def test_resume_after_sigkill_in_a_long_video_redoes_only_that_video(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.cli_utils import write_small_config

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", 12, fps=FPS, size=(48, 32))
    write_video(videos / "b_long.mp4", 200, fps=FPS, size=(48, 32), gop=25)  # 8 s: 16 windows of 0.5 s
    write_video(videos / "c.mp4", 12, fps=FPS, size=(48, 32))
    config = write_small_config(tmp_path, window_seconds=0.5)
    out = tmp_path / "out"
    proc = subprocess.Popen(_extract_cmd(videos, out, config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "a_embedding.npy").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the long video's windows
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "b_long_embedding.npy").exists() or not (out / "a_embedding.npy").exists():
        pytest.skip("the kill did not land inside the long video on this machine")
    a_stat = os.stat(out / "a_embedding.npy")
    rerun = subprocess.run(_extract_cmd(videos, out, config) + ["--summary"], capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    import json

    summary = json.loads((out / "extraction_summary.json").read_text())
    status = {v["name"]: v["status"] for v in summary["videos"]}
    assert status == {"a": "skipped", "b_long": "success", "c": "success"}
    assert os.stat(out / "a_embedding.npy").st_mtime_ns == a_stat.st_mtime_ns  # not rewritten
    with np.load(out / "b_long_windows.npz", allow_pickle=False) as npz:
        assert WindowTable.from_arrays(dict(npz)).num_windows == 16
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # the killed run's temp files are gone


def test_moments_come_from_the_library_without_decoding(tmp_path, model, monkeypatch):
    from modules.extraction import extract_directory_embeddings
    from modules.library_builder import index_extraction_folder
    from modules.long_video import retrieve_moments

    videos = tmp_path / "videos"
    videos.mkdir()
    clip = write_video(videos / "long.mp4", 100, fps=FPS, size=(64, 48), gop=25)
    out = tmp_path / "out"
    extract_directory_embeddings(videos, out, model=model, num_workers=0, consolidated=True, window_seconds=1.5,
                                 progress=False)
    assert index_extraction_folder(out)["segments"] == 3 * model.config.max_frames
    decoded = retrieve_moments(model, clip, "a red square", top_k=5, window=(1.5, 1.5))
    assert decoded["status"] == "success" and decoded["source"] == "decoded" and decoded["windows"] == 3

    import modules.long_video as long_video

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the library holds the windows")

    monkeypatch.setattr(long_video, "encode_long_video", no_decoding)
    from_library = retrieve_moments(model, clip, "a red square", top_k=5, window=(1.5, 1.5), library_dir=out)
    assert from_library["status"] == "success" and from_library["source"] == "library"
    keys = ("frame", "window", "group", "start_frame", "end_frame", "start_time", "end_time", "window_start",
            "window_end")
    assert [[s[k] for k in keys] for s in from_library["segments"]] == \
        [[s[k] for k in keys] for s in decoded["segments"]]
    np.testing.assert_allclose(from_library["scores"], decoded["scores"], atol=1e-5)
    assert decoded["segments"][0]["window_start"] <= decoded["segments"][0]["start_time"]


@pytest.mark.parametrize("embedding", ["zero", "nan"])
def test_a_degenerate_windowed_embedding_is_a_failure(tmp_path, monkeypatch, embedding):
    """A long video follows the short videos' rule: NaN / inf or a zero vector fails the video."""
    from types import SimpleNamespace

    import modules.long_video as long_video
    from modules.forward_lanes import NON_FINITE_ERROR
    from modules.video_listing import VideoEntry

    path = tmp_path / "long.mp4"
    path.write_bytes(b"x")
    vector = np.zeros(8, np.float32) if embedding == "zero" else np.full(8, np.nan, np.float32)
    table = SimpleNamespace(embedding=vector, group_features=np.ones((2, 3, 8), np.float32))
    monkeypatch.setattr(long_video, "encode_long_video", lambda *a, **k: table)
    result = long_video.encode_windowed_result(None, VideoEntry(str(path), "long.mp4", "long"), (10.0, 10.0))
    assert (result.status, result.error) == ("failed", NON_FINITE_ERROR)
