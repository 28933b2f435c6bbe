"""The video library: round trip, incremental and atomic updates, one model, exact = numpy.

Synthetic unit vectors (the library does not care where they came from); the moments test
at the end extracts generated clips with painted frame numbers with the small model.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import modules.library as library_module
import modules.library_index as library_index
from modules.library import LibraryError, VideoLibrary
from modules.library_index import exact_top_k, recall_at_k

FP = {"clip_weights": "random", "checkpoint": None, "config": {"max_frames": 4}}
DIM = 16


def unit(rows: int, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def videos(start: int, count: int):
    return [{"name": f"v{i:05d}", "video_path": f"/videos/v{i:05d}.mp4", "duration": 2.0 + i} for i in range(start, start + count)]


def segments_for(count: int, per_video: int = 3):
    return [{"video": v, "group_index": g, "start_time": g * 0.5, "end_time": (g + 1) * 0.5, "frame": 10 * g + v,
             "members": [10 * g + v, 10 * g + v + 1]} for v in range(count) for g in range(per_video)]


def test_round_trip_table_iteration_embeddings(tmp_path):
    lib = VideoLibrary.create(tmp_path / "library", FP, DIM)
    emb, seg = unit(20, 1), unit(60, 2)
    report = lib.add(videos(0, 20), emb, segments_for(20), seg, fingerprint=FP)
    assert report == {"videos": 20, "segments": 60, "replaced": 0, "rewritten_rows": 0}
    again = VideoLibrary.open(tmp_path)  # the output folder holding library/ opens too
    assert len(again) == 20 and again.num_segments == 60
    np.testing.assert_array_equal(again.embeddings(), emb)
    assert isinstance(again.embeddings(), np.memmap)
    np.testing.assert_array_equal(again.embeddings("segments"), seg)
    rows = list(again)
    assert [r["name"] for r in rows] == [f"v{i:05d}" for i in range(20)]
    assert rows[3]["duration"] == 5.0 and rows[3]["video_path"] == os.path.abspath("/videos/v00003.mp4")
    table = again.table("segments")
    assert table.num_rows == 60 and table.column("members")[4].as_py() == [11, 12]
    assert table.column("video_row").to_pylist()[:6] == [0, 0, 0, 1, 1, 1]
    assert again.table().column_names[:3] == ["row", "name", "video_path"]


def test_exact_search_equals_numpy_brute_force(tmp_path):
    lib = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    emb = unit(300, 3)
    lib.add(videos(0, 300), emb, fingerprint=FP)
    queries = unit(5, 4)
    for q in queries:
        hits = lib.search(q, top_k=10)
        scores = emb @ q
        order = np.argsort(-scores, kind="stable")[:10]
        assert [h["row"] for h in hits] == order.tolist()
        np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)
        assert hits[0]["name"] == f"v{order[0]:05d}"
    # unnormalised vectors are normalised: the same ranking
    assert [h["row"] for h in lib.search(queries[0] * 7, top_k=5)] == [h["row"] for h in lib.search(queries[0], top_k=5)]


def test_moment_search_returns_segment_fields(tmp_path):
    lib = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    seg = unit(30, 5)
    lib.add(videos(0, 10), unit(10, 6), segments_for(10), seg, fingerprint=FP)
    hit = lib.search(seg[13], top_k=3, moments=True)[0]  # video 4, group 1
    assert (hit["name"], hit["row"], hit["group_index"], hit["frame"]) == ("v00004", 4, 1, 14)
    assert (hit["start_time"], hit["end_time"]) == (0.5, 1.0) and hit["score"] == pytest.approx(1.0, abs=1e-5)


def test_incremental_update_rewrites_only_the_open_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(library_module, "OPEN_SHARD_ROWS", 50)
    lib = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    lib.add(videos(0, 200), unit(200, 7), fingerprint=FP)  # one sealed shard of 200 rows
    sealed = lib.shards["videos"][0].file(lib.root, "npy")
    stat = os.stat(sealed)
    report = lib.add(videos(200, 10), unit(10, 8), fingerprint=FP)
    assert report["rewritten_rows"] == 0 and len(lib.shards["videos"]) == 2
    report = lib.add(videos(210, 10), unit(10, 9), fingerprint=FP)
    assert report["rewritten_rows"] == 10  # merged into the 10-row tail, the 200 untouched
    assert len(lib.shards["videos"]) == 2 and lib.shards["videos"][1].rows == 20
    assert os.stat(sealed).st_mtime_ns == stat.st_mtime_ns and os.stat(sealed).st_ino == stat.st_ino
    again = VideoLibrary.open(lib.root)
    assert len(again) == 220
    q = unit(220, 8)[0]  # v00200's embedding (same seed) is found at row 200
    assert again.search(unit(10, 8)[0], top_k=1)[0]["name"] == "v00200"
    assert again.search(q, top_k=1)[0]["row"] == 200
    assert not _unlisted_files(again)  # the replaced tail's files were deleted


def test_interrupted_update_leaves_previous_library(tmp_path, monkeypatch):
    lib = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    lib.add(videos(0, 5), unit(5, 10), fingerprint=FP)

    def crash(root, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(library_module, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        lib.add(videos(5, 5), unit(5, 11), fingerprint=FP)
    monkeypatch.undo()
    before = VideoLibrary.open(lib.root)
    assert len(before) == 5 and before.search(unit(5, 10)[2], top_k=1)[0]["name"] == "v00002"
    assert _unlisted_files(before)  # the interrupted update's shard files are there, unlisted ...
    before.add(videos(5, 5), unit(5, 11), fingerprint=FP)
    assert not _unlisted_files(before)  # ... and gone after the next update
    assert len(VideoLibrary.open(lib.root)) == 10


def _unlisted_files(lib: VideoLibrary):
    """Shard files the manifest neither lists nor keeps for readers of the previous one."""
    with open(os.path.join(lib.root, "manifest.json"), encoding="utf-8") as fh:
        retired = set(json.load(fh).get("retired", []))
    live = {s.stem for k in ("videos", "segments") for s in lib.shards[k]} | retired
    return [f for f in os.listdir(lib.root) if f.endswith((".npy", ".parquet", ".faiss")) and f.split(".")[0] not in live]


def test_a_reader_racing_updates_keeps_its_snapshot_and_follows_with_latest(tmp_path):
    """A search process opened before another process's update still searches (the files its
    manifest lists stay for one update), and latest() sees the new rows; stale files go."""
    writer = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    emb = unit(12, 30)
    writer.add(videos(0, 6), emb[:6], segments_for(6), unit(18, 31), fingerprint=FP)
    reader = VideoLibrary.open(writer.root)  # nothing read yet: index and Parquet load lazily
    assert reader.latest() is reader
    writer.add(videos(6, 6), emb[6:], fingerprint=FP)  # the open tail shard is rewritten
    hit = reader.search(emb[2], top_k=1)[0]
    assert (hit["name"], len(reader)) == ("v00002", 6)
    assert reader.search(unit(18, 31)[4], top_k=1, moments=True)[0]["name"] == "v00001"
    fresh = reader.latest()
    assert fresh is not reader and len(fresh) == 12
    assert fresh.search(emb[9], top_k=1)[0]["name"] == "v00009"
    first_stems = {s.stem for s in reader.shards["videos"]}
    writer.add(videos(12, 1), unit(1, 32), fingerprint=FP)  # a second update retires the first reader's files
    assert not first_stems & {f.split(".")[0] for f in os.listdir(writer.root)}
    assert len(fresh.latest()) == 13 and not _unlisted_files(fresh.latest())


def test_replacing_a_video_hides_its_old_row_and_segments(tmp_path):
    lib = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    emb, seg = unit(4, 12), unit(12, 13)
    lib.add(videos(0, 4), emb, segments_for(4), seg, fingerprint=FP)
    new = unit(1, 14)
    report = lib.add([{"name": "v00001", "video_path": "/videos/v1-new.mp4"}], new, fingerprint=FP)
    assert report["replaced"] == 1 and len(lib) == 4
    assert all(h["row"] != 1 for h in lib.search(emb[1], top_k=4))
    assert lib.search(new[0], top_k=1)[0]["video_path"] == os.path.abspath("/videos/v1-new.mp4")
    assert all(h["row"] != 1 for h in lib.search(seg[4], top_k=12, moments=True))
    assert sorted(r["name"] for r in lib) == ["v00000", "v00001", "v00002", "v00003"]


def test_another_model_is_refused_naming_the_flags(tmp_path):
    lib = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    lib.add(videos(0, 2), unit(2, 15), fingerprint=FP)
    other = {**FP, "checkpoint": "/ckpt/best.pth"}
    with pytest.raises(LibraryError) as err:
        lib.add(videos(2, 1), unit(1, 16), fingerprint=other)
    text = str(err.value)
    assert "--checkpoint" in text and "--config_path" in text and "--clip_weights" in text and "best.pth" in text
    assert len(VideoLibrary.open(lib.root)) == 2
    with pytest.raises(LibraryError, match="another model"):
        VideoLibrary.open_or_create(lib.root, other, DIM)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(LibraryError, match="no video library"):
        VideoLibrary.open(tmp_path)
    lib = VideoLibrary.create(tmp_path / "lib", FP, DIM)
    with pytest.raises(LibraryError, match="shape"):
        lib.add(videos(0, 2), unit(3, 1), fingerprint=FP)
    bad = unit(2, 1)
    bad[0, 0] = np.nan
    with pytest.raises(LibraryError, match="non-finite"):
        lib.add(videos(0, 2), bad, fingerprint=FP)
    lib.add(videos(0, 2), unit(2, 1), fingerprint=FP)
    with pytest.raises(LibraryError, match="top_k"):
        lib.search(unit(1, 2)[0], top_k=0)
    with pytest.raises(LibraryError, match="dimensions"):
        lib.search(np.ones(DIM + 1, np.float32))
    with pytest.raises(LibraryError, match="zero"):
        lib.search(np.zeros(DIM, np.float32))
    (tmp_path / "lib" / "manifest.json").write_text("{not json")
    with pytest.raises(LibraryError, match="manifest"):
        VideoLibrary.open(tmp_path / "lib")


def test_ivf_beyond_the_exact_size_keeps_recall(tmp_path, monkeypatch):
    monkeypatch.setattr(library_index, "EXACT_MAX_ROWS", 2000)
    rng = np.random.default_rng(17)
    centres = unit(64, 18, 32)
    data = centres[rng.integers(0, 64, 6000)] + 0.6 * unit(6000, 19, 32) / np.sqrt(1.0)
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    lib = VideoLibrary.create(tmp_path / "lib", FP, 32)
    lib.add(videos(0, 6000), data, fingerprint=FP)
    info = lib.shards["videos"][0].index
    assert info.kind == "ivf" and 0 < info.nprobe < info.nlist and info.calibrated_recall >= 0.97
    queries = centres[rng.integers(0, 64, 50)] + 0.6 * unit(50, 20, 32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    found = np.array([[h[0] for h in hits] for hits in VideoLibrary.open(lib.root).search_vectors(queries, 10)])
    assert recall_at_k(found, exact_top_k(data, queries, 10), 10) >= 0.95
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert manifest["videos"][0]["index"]["kind"] == "ivf"
