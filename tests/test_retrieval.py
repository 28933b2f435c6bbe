"""Library pieces of inference (modules/retrieval.py), in-process."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from modules.cli_support import UsageError
from modules.retrieval import (
    batch_retrieve_events,
    format_inference_block,
    format_search_block,
    load_batch_file,
    load_embedding_index,
    search_embeddings,
)
from tests.cli_utils import small_model
from tests.video_factory import write_text_file, write_video


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("ret") / "clip.mp4", 24, fps=12, size=(64, 48), gop=4)


def test_batch_matches_single_retrieval_and_reports_bad_items(model, clip_path, tmp_path):
    text = write_text_file(tmp_path / "text.mp4")
    items = [
        {"video_path": clip_path.name, "query": "a black and white pattern"},
        {"video_path": clip_path.name, "query": "a dog", "top_k": 2},
        {"video_path": "missing.mp4", "query": "x"},
        {"video_path": text.name, "query": "x"},
        {"video_path": clip_path.name},
        "not an object",
    ]
    shutil.copy(clip_path, tmp_path / clip_path.name)
    results = batch_retrieve_events(items, model=model, base_dir=tmp_path, top_k=3)
    assert [r["status"] for r in results] == ["success", "success", "error", "error", "error", "error"]
    for r in results:
        assert list(r) == ["video_path", "query", "frames", "scores", "segments", "inference_time", "status", "error"]
    first, second = results[0], results[1]
    hits = model.retrieve(clip_path, "a black and white pattern", top_k=3)
    assert first["frames"] == [h.frame for h in hits]
    assert first["scores"] == pytest.approx([h.score for h in hits], abs=1e-5)
    assert [s["start_time"] for s in first["segments"]] == pytest.approx([h.start_time for h in hits])
    assert len(second["frames"]) == 2 and first["error"] is None
    assert first["inference_time"] > 0
    assert "missing.mp4" in results[2]["error"] and "file not found" in results[2]["error"]
    assert "not a readable video" in results[3]["error"]
    assert "query" in results[4]["error"] and "object" in results[5]["error"]
    block = format_inference_block(first)
    assert "INFERENCE RESULTS" in block and f"Relevant frames: {first['frames']}" in block
    assert "Number of frames: 3" in block and "Inference time:" in block


def test_report_says_when_fewer_frame_groups_exist_than_asked(model, clip_path):
    """Issue 11.12 (failed before: 'Number of frames: 4' with no word about --top_k 50)."""
    result = batch_retrieve_events([{"video_path": str(clip_path), "query": "a pattern"}], model=model, top_k=50)[0]
    n = len(result["frames"])
    assert 0 < n < 50
    assert f"Number of frames: {n} (only {n} frame groups exist; 50 asked for)" in format_inference_block(result, 50)
    assert f"Number of frames: {n}\n" in format_inference_block(result, n)


def test_one_frame_video_spans_zero_seconds(model, tmp_path):
    """Issue 11.12 (failed before: 0.00s-0.08s, the frame's display time at 12 fps)."""
    still = write_video(tmp_path / "still.mp4", 1, fps=12, size=(64, 48))
    result = batch_retrieve_events([{"video_path": str(still), "query": "a pattern"}], model=model, top_k=2)[0]
    assert result["status"] == "success" and result["frames"] == [0]
    assert [(s["start_time"], s["end_time"]) for s in result["segments"]] == [(0.0, 0.0)]
    assert "0.00s-0.00s (frames 0-0)" in format_inference_block(result)


def test_batch_item_with_a_non_string_path_says_so():
    """Issue 11.12 (failed before: "missing or empty 'video_path'" for {"video_path": 3})."""
    results = batch_retrieve_events([{"video_path": 3, "query": "x"}, {"video_path": "a.mp4", "query": ["x"]}])
    assert results[0]["error"] == "'video_path' must be a string, got int 3"
    assert results[1]["error"] == "'query' must be a string, got list ['x']"


def test_load_batch_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(UsageError, match="invalid JSON"):
        load_batch_file(bad)
    bad.write_text('{"video_path": "x"}')
    with pytest.raises(UsageError, match="expected a JSON list"):
        load_batch_file(bad)
    with pytest.raises(UsageError, match="not found"):
        load_batch_file(tmp_path / "none.json")
    bad.write_text('{"queries": [{"video_path": "a.mp4", "query": "q"}]}')
    assert load_batch_file(bad) == [{"video_path": "a.mp4", "query": "q"}]


def test_search_ranks_by_cosine(model, tmp_path):
    query = "a red circle"
    text = model.encode_text([query])[0].numpy()
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(512).astype(np.float32)
    np.save(tmp_path / "match_embedding.npy", text)
    np.save(tmp_path / "opposite_embedding.npy", -text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "noise_embedding.json").write_text(json.dumps(
        {"video_path": "videos/noise.mp4", "embedding": (noise / np.linalg.norm(noise)).tolist(), "shape": [512], "dtype": "float32"}))
    search = search_embeddings(model, tmp_path, query, top_k=3)
    assert [r["name"] for r in search["results"]] == ["match", "sub/noise", "opposite"]
    assert search["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert search["results"][2]["score"] == pytest.approx(-1.0, abs=1e-5)
    assert search["results"][1]["video_path"] == "videos/noise.mp4"
    assert search["source"] == "per-video files" and search["num_videos"] == 3
    assert "1. 1.0000  match" in format_search_block(search)
    names, paths, matrix, _, _ = load_embedding_index(tmp_path)
    assert names == ["match", "opposite", "sub/noise"] and matrix.shape == (3, 512)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no embeddings"):
        load_embedding_index(tmp_path / "empty")
    with pytest.raises(UsageError, match="not found"):
        load_embedding_index(tmp_path / "nope")
