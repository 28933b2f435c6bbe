"""Library pieces of the directory pipeline (modules/extraction.py), in-process."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from modules.atomic_io import atomic_write, cleanup_stale_temp_files, save_npy_atomic
from modules.cli_support import UsageError
from modules.decode_pool import DecodePool, decode_video
from modules.extraction import extract_directory_embeddings
from modules.forward_lanes import ForwardLanes, torch_threads
from modules.video_listing import check_video_file, list_videos, shard_entries, unique_names
from modules.video_sampler import normalize_uint8, sample_video
from tests.cli_utils import small_model
from tests.video_factory import write_text_file, write_video

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _clip(path, frames=12, size=(48, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, frames, fps=12, size=size, gop=4)


# ----------------------------------------------------------------------------- names, listing, shards


def test_unique_names():
    rels = ["a.mp4", "b.mp4", "b.webm", "sub/a.mp4", "sub/A.MOV", "x.y.mp4", "d.mp4.avi", "d.mp4", "d.mov"]
    names = unique_names(rels)
    assert names[:6] == ["a", "b.mp4", "b.webm", "sub/a.mp4", "sub/A.MOV", "x.y"]
    # "d.mp4.avi" -> "d.mp4" would clash with "d.mp4" keeping its extension: hashed instead
    assert names[8] == "d.mov"
    assert names[6].startswith("d.mp4-") and names[7].startswith("d-") and names[6] != names[7]
    assert len({n.casefold() for n in names}) == len(names)  # unique also on case-insensitive disks
    assert unique_names(rels) == names  # deterministic


def test_list_videos_filters_sorts_and_reports_problems(tmp_path):
    root = tmp_path / "videos"
    _clip(root / "b.MP4", 4)
    _clip(root / "a.mp4", 4)
    _clip(root / "sub" / "c.webm", 4)
    _clip(root / ".hidden.mp4", 4)
    write_text_file(root / "readme.txt")
    os.symlink("missing.mp4", root / "dangling.mp4")
    os.mkfifo(root / "pipe.mkv")
    (root / "dir.mp4").mkdir()
    out = root / "out"
    _clip(out / "inside_output.mp4", 4)

    flat = list_videos(root)
    assert [e.rel for e in flat] == ["a.mp4", "b.MP4", "dangling.mp4", "dir.mp4", "pipe.mkv"]
    problems = {e.rel: e.problem for e in flat}
    assert problems["a.mp4"] is None and problems["b.MP4"] is None
    assert "broken symbolic link" in problems["dangling.mp4"]
    assert "directory" in problems["dir.mp4"]
    assert "FIFO" in problems["pipe.mkv"]

    deep = list_videos(root, recursive=True, exclude=[out])
    assert [e.rel for e in deep] == ["a.mp4", "b.MP4", "dangling.mp4", "pipe.mkv", "sub/c.webm"]
    assert [e.name for e in deep][-1] == "sub/c"
    assert [e.rel for e in list_videos(root, extensions=(".webm",), recursive=True)] == ["sub/c.webm"]
    with pytest.raises(UsageError, match="not found"):
        list_videos(tmp_path / "missing")
    with pytest.raises(UsageError, match="not a directory"):
        list_videos(root / "a.mp4")


@pytest.mark.skipif(IS_ROOT, reason="running as root: root can read a mode-000 file, so there is no unreadable file to test")
def test_unreadable_file_reason(tmp_path):
    path = _clip(tmp_path / "locked.mp4", 2)
    path.chmod(0)
    try:
        assert "permission denied" in check_video_file(str(path))
    finally:
        path.chmod(0o644)


def test_shard_entries_partition_the_sorted_list(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    for i in range(7):
        write_text_file(root / f"{i}.mp4")
    entries = list_videos(root)
    shares = [shard_entries(entries, r, 3) for r in range(3)]
    assert sorted(e.rel for s in shares for e in s) == sorted(e.rel for e in entries)
    assert [len(s) for s in shares] == [3, 2, 2]
    assert [e.rel for e in shares[1]] == ["1.mp4", "4.mp4"]
    assert shard_entries(entries, 1, 3) == shares[1]
    with pytest.raises(UsageError):
        shard_entries(entries, 3, 3)


# ----------------------------------------------------------------------------- atomic files


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "deep" / "x_embedding.npy"
    save_npy_atomic(target, np.arange(3, dtype=np.float32))

    def explode(fh):
        fh.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert np.array_equal(np.load(target), np.arange(3, dtype=np.float32))
    assert sorted(p.name for p in target.parent.iterdir()) == ["x_embedding.npy"]


def test_stale_temp_files_are_cleaned(tmp_path):
    dead = tmp_path / ".a_embedding.npy.999999999.tmp"
    alive = tmp_path / f".b_embedding.npy.{os.getpid()}.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (dead, alive, other):
        p.write_bytes(b"x")
    assert cleanup_stale_temp_files(str(tmp_path)) == 1
    assert not dead.exists() and alive.exists() and other.exists()


# ----------------------------------------------------------------------------- decoding


def test_uint8_transport_is_exact(tmp_path):
    path = write_video(tmp_path / "v.mp4", 20, size=(80, 48))
    frames = sample_video(path, num_segments=6).frames
    decoded = decode_video(str(path), num_segments=6, size=224, decoder_threads=1)
    assert decoded.frames.dtype == np.uint8 and decoded.frames.shape == tuple(frames.shape)
    assert torch.equal(normalize_uint8(decoded.frames), frames)


def crash_on_two(i: int) -> int:
    """Pool task for the crash test (module level: picklable)."""
    if i == 2:
        os._exit(3)  # a decoder segfault looks like this to the pool
    return i * 10


def test_decode_pool_survives_a_crashing_worker():
    pool = DecodePool(num_workers=2, max_in_flight=3)
    results = dict(pool.imap_unordered(crash_on_two, [(i,) for i in range(6)], on_crash=lambda item: "crashed"))
    assert results == {(0,): 0, (1,): 10, (2,): "crashed", (3,): 30, (4,): 40, (5,): 50}
    assert pool.crashes >= 2  # the first crash, then again when retried alone
    inline = DecodePool(num_workers=0)
    assert dict(inline.imap_unordered(crash_on_two, [(1,), (3,)], on_crash=None)) == {(1,): 10, (3,): 30}


def square(i: int) -> int:
    return i * i


def test_decode_pool_bounds_outstanding_work():
    """Memory stays flat: never more than max_in_flight results queued or waiting."""
    pool = DecodePool(num_workers=2, max_in_flight=3)
    run = pool.imap_unordered(square, ((i,) for i in range(40)), on_crash=None)
    seen = []
    for _, result in run:
        assert len(run.in_flight) + len(run.ready) <= 3
        seen.append(result)
    assert sorted(seen) == [i * i for i in range(40)]
    assert run.executor is None  # workers stopped at the end


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib_videos")
    _clip(root / "a.mp4", 15, size=(64, 48))
    _clip(root / "b.webm", 9)
    _clip(root / "c.mkv", 30, size=(32, 48))
    return root


def test_pipeline_matches_the_single_video_api(model, video_dir, tmp_path):
    out = tmp_path / "out"
    result = extract_directory_embeddings(video_dir, out, save_format="both", save_frame_features=True,
                                          consolidated=True, model=model, num_workers=1, batch_size=2, progress=False)
    assert (result["processed"], result["failed"], result["skipped"], result["total"]) == (3, 0, 0, 3)
    assert result["errors"] == []
    # The random-weight model's tokens are near-duplicates (merge scores ~0.999 apart by
    # ~1e-7), so a forward with other thread counts or batch shapes may flip a near-tied
    # merge and move the embedding by ~5e-5 (seen on another CPU). The references run on
    # the lanes' one thread: c, alone in its batch, has the same arithmetic and must agree
    # exactly; a and b shared a batch (other matrix shapes). Different videos differ by > 5e-3.
    with torch_threads(1):
        for name, ext, tolerance in (("a", "mp4", 2e-4), ("b", "webm", 2e-4), ("c", "mkv", 1e-6)):
            emb = np.load(out / f"{name}_embedding.npy")
            assert np.abs(emb - model.extract_video_embedding(video_dir / f"{name}.{ext}")).max() < tolerance
    frames = np.load(out / "a_frames.npz")
    hits = model.retrieve(video_dir / "a.mp4", "a pattern")
    assert {h.frame for h in hits} <= set(frames["frame_indices"].tolist())
    for h in hits:
        k = frames["frame_indices"].tolist().index(h.frame)
        assert frames["timestamps"][k] == pytest.approx(h.timestamp)
        assert (frames["start_times"][k], frames["end_times"][k]) == pytest.approx((h.start_time, h.end_time))
        assert frames["start_frames"][k] == h.start_frame and frames["end_frames"][k] == h.end_frame
    # a second run resumes: nothing to do, consolidated files rebuilt from disk
    again = extract_directory_embeddings(video_dir, out, save_format="both", save_frame_features=True,
                                         consolidated=True, model=model, progress=False)
    assert (again["processed"], again["skipped"]) == (0, 3)
    assert np.load(out / "embeddings.npy").shape == (3, 512)


def test_parallel_batches_give_the_same_outputs_and_restore_threads(model, video_dir, tmp_path):
    """Forwards side by side on CPU (one torch thread each) compute what one forward does."""
    threads = torch.get_num_threads()
    with torch_threads(1):  # the lanes' arithmetic: near-tied merges of random weights cannot flip
        serial = extract_directory_embeddings(video_dir, tmp_path / "serial", model=model, num_workers=0,
                                              batch_size=1, parallel_batches=1, progress=False)
    lanes = extract_directory_embeddings(video_dir, tmp_path / "lanes", model=model, num_workers=1,
                                         parallel_batches=3, summary=True, progress=False)
    assert serial["processed"] == lanes["processed"] == 3
    assert torch.get_num_threads() == threads
    settings = json.loads((tmp_path / "lanes" / "extraction_summary.json").read_text())["settings"]
    assert (settings["batch_size"], settings["parallel_batches"]) == (1, 3)  # CPU defaults: 1 video per forward
    for name in ("a", "b", "c"):
        a = np.load(tmp_path / "serial" / f"{name}_embedding.npy")
        b = np.load(tmp_path / "lanes" / f"{name}_embedding.npy")
        assert np.abs(a - b).max() < 1e-6


def test_forward_lanes_keep_at_most_lanes_batches_and_return_everything():
    running, peak, lock = [0], [0], threading.Lock()

    def run(batch):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return [x * 10 for x in batch]

    lanes = ForwardLanes(3, run)
    got = []
    for i in range(10):
        got += lanes.submit([i, i + 100])
        assert len(lanes.running) < 3  # submit returns only once a lane is free
    got += lanes.drain()
    lanes.close()
    assert sorted(got) == sorted(x * 10 for i in range(10) for x in (i, i + 100))
    assert 2 <= peak[0] <= 3
    inline = ForwardLanes(1, run)
    assert inline.submit([1, 2]) == [10, 20] and inline.executor is None

    def fail(batch):
        raise ValueError("boom")

    broken = ForwardLanes(2, fail)
    with pytest.raises(ValueError, match="boom"):
        for _ in range(3):
            broken.submit([1])
        broken.drain()
    broken.close()


def test_manual_shards_last_one_writes_the_whole_directory_files(model, video_dir, tmp_path):
    out = tmp_path / "out"
    first = extract_directory_embeddings(video_dir, out, consolidated=True, summary=True, model=model,
                                         shard=0, num_shards=2, num_workers=0, progress=False)
    assert first["total"] == 2 and "global" not in first
    assert not (out / "consolidated_embeddings.json").exists()
    second = extract_directory_embeddings(video_dir, out, consolidated=True, summary=True, model=model,
                                          shard=1, num_shards=2, num_workers=0, progress=False)
    assert second["total"] == 1 and second["global"]["processed"] == 3
    meta = json.loads((out / "consolidated_embeddings.json").read_text())["metadata"]
    assert (meta["total_videos"], meta["successful"]) == (3, 3)
    summary = json.loads((out / "extraction_summary.json").read_text())
    assert [v["status"] for v in summary["videos"]] == ["success"] * 3


def test_bad_arguments_and_empty_directory(model, tmp_path):
    with pytest.raises(UsageError, match="video directory not found"):
        extract_directory_embeddings(tmp_path / "nope", tmp_path / "out", model=model)
    empty = tmp_path / "empty"
    empty.mkdir()
    for kwargs, words in (({"save_format": "xml"}, "save_format"), ({"batch_size": 0}, "batch_size"),
                          ({"parallel_batches": 0}, "parallel_batches"),
                          ({"shard": 1}, "--shard and --num_shards"), ({"shard": 2, "num_shards": 2}, "--shard")):
        with pytest.raises(UsageError, match=words):
            extract_directory_embeddings(empty, tmp_path / "out", model=model, **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        extract_directory_embeddings(empty, tmp_path / "file", model=model)
    result = extract_directory_embeddings(empty, tmp_path / "out", model=model, consolidated=True, progress=False)
    assert result["total"] == 0
    cons = json.loads((tmp_path / "out" / "consolidated_embeddings.json").read_text())
    assert cons["embeddings"] == {} and cons["metadata"]["total_videos"] == 0
