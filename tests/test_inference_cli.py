"""inference.py as users run it: subprocesses with random ViT-B/32 weights, 4-frame config."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from tests.cli_utils import ROOT, describe, no_traceback, run_script, small_model, write_small_config
from tests.video_factory import write_text_file, write_video

SCRIPT = "inference.py"
EXAMPLE = ROOT / "examples" / "videos" / "red_circle_left_to_right.mp4"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_small_config(tmp_path_factory.mktemp("config"))


def test_help_documents_every_flag():
    proc = run_script(SCRIPT, ["--help"], timeout=60)
    assert proc.returncode == 0, describe(proc)
    for flag in ("--video_path", "--query", "--top_k", "--batch_file", "--output", "--embeddings_dir", "--demo",
                 "--config_path", "--config", "--device", "--clip_weights", "--checkpoint", "--num_workers",
                 "--verbose", "--quiet"):
        assert re.search(rf"{re.escape(flag)}\b", proc.stdout), f"{flag} missing from --help"


def test_usage_errors_exit_2(tmp_path, config):
    nothing = run_script(SCRIPT, [], timeout=60)
    assert nothing.returncode == 2 and "nothing to do" in nothing.stderr
    both = run_script(SCRIPT, ["--demo", "--batch_file", "b.json"], timeout=60)
    assert both.returncode == 2 and "choose one" in both.stderr
    missing = run_script(SCRIPT, ["--video_path", tmp_path / "nope.mp4", "--query", "x", "--config", config], timeout=60)
    assert missing.returncode == 2, describe(missing)
    no_traceback(missing)
    assert missing.stderr.strip() == f"error: video not found: {tmp_path / 'nope.mp4'}"
    bad = tmp_path / "batch.json"
    bad.write_text("[{")
    proc = run_script(SCRIPT, ["--batch_file", bad, "--config", config], timeout=60)
    assert proc.returncode == 2 and "invalid JSON" in proc.stderr and "batch.json" in proc.stderr
    no_traceback(proc)


def test_single_video_report(config):
    proc = run_script(SCRIPT, ["--video_path", EXAMPLE, "--query", "a red circle moving from left to right",
                               "--top_k", "3", "--config_path", config])
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    start = lines.index("INFERENCE RESULTS")
    assert lines[start + 1] == "=" * 50
    assert lines[start + 2] == f"Video: {EXAMPLE}"
    assert lines[start + 3] == "Query: 'a red circle moving from left to right'"
    frames = json.loads(re.fullmatch(r"Relevant frames: (\[.*\])", lines[start + 4]).group(1))
    assert len(frames) == 3 and all(0 <= f < 45 for f in frames)
    assert lines[start + 5] == "Number of frames: 3"
    assert re.fullmatch(r"Inference time: \d+\.\d\ds", lines[start + 6])
    spans = [l for l in lines if re.match(r"  \d\. frame \d+ at \d+\.\d\ds: \d+\.\d\ds-\d+\.\d\ds \(frames \d+-\d+\), score", l)]
    assert len(spans) == 3 and [int(re.search(r"frame (\d+)", l).group(1)) for l in spans] == frames


def test_batch_file_with_bad_pairs(tmp_path, config):
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "red.mp4")
    write_video(folder / "other clip.mp4", 20, fps=10, size=(64, 48))
    write_text_file(folder / "fake.mp4")
    items = [
        {"video_path": "red.mp4", "query": "a red circle"},
        {"video_path": "red.mp4", "query": "something on the right", "top_k": 2},
        {"video_path": "other clip.mp4", "query": "a pattern"},
        {"video_path": "missing.mp4", "query": "x"},
        {"video_path": "fake.mp4", "query": "x"},
        {"video_path": "red.mp4"},
    ]
    batch = folder / "batch.json"
    batch.write_text(json.dumps(items))
    out = tmp_path / "results.json"
    proc = run_script(SCRIPT, ["--batch_file", batch, "--output", out, "--config", config, "--top_k", "3",
                               "--num_workers", "1"])
    assert proc.returncode == 1, describe(proc)  # some pairs failed, none crashed the run
    no_traceback(proc)
    results = json.loads(out.read_text())
    assert [r["status"] for r in results] == ["success", "success", "success", "error", "error", "error"]
    for r, item in zip(results, items):
        assert list(r) == ["video_path", "query", "frames", "scores", "segments", "inference_time", "status", "error"]
        assert r["video_path"] == item["video_path"]
    assert [len(r["frames"]) for r in results[:3]] == [3, 2, 3]
    assert "file not found" in results[3]["error"] and "not a readable video" in results[4]["error"]
    assert "query" in results[5]["error"]
    # same model in every process (seeded build): the library gives the same answer
    from modules.retrieval import batch_retrieve_events

    again = batch_retrieve_events(items[:1], model=small_model(), base_dir=folder, top_k=3)
    assert again[0]["frames"] == results[0]["frames"]
    assert again[0]["scores"] == pytest.approx(results[0]["scores"], abs=1e-5)


def test_search_extracted_embeddings(tmp_path, config):
    query = "a red circle"
    text = small_model().encode_text([query])[0].numpy()
    emb = tmp_path / "emb"
    emb.mkdir()
    np.save(emb / "best_embedding.npy", text)
    np.save(emb / "worst_embedding.npy", -text)
    np.save(emb / "middle_embedding.npy", np.roll(text, 7))
    proc = run_script(SCRIPT, ["--embeddings_dir", emb, "--query", query, "--top_k", "2", "--config", config])
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    start = lines.index("SEARCH RESULTS")
    assert lines[start + 2] == f"Embeddings: {emb} (3 videos, from per-video files)"
    assert lines[start + 4] == "Top 2 videos:"
    assert lines[start + 5] == "  1. 1.0000  best"
    assert re.fullmatch(r"  2\. -?0\.\d{4}  middle", lines[start + 6])


def test_demo_without_weights_uses_random_and_says_so(tmp_path):
    config = write_small_config(tmp_path, clip_weights=None)  # "official weights", which are not cached here
    env = {"UNIFIED_CLIP_CACHE": str(tmp_path / "empty_cache"), "UNIFIED_CLIP_WEIGHTS": ""}
    proc = run_script(SCRIPT, ["--demo", "--config", config, "--top_k", "2"], env=env)
    assert proc.returncode == 0, describe(proc)
    out = proc.stdout
    assert "no CLIP weights available offline" in out and "RANDOM CLIP weights" in out
    assert "INFERENCE RESULTS" in out and "Number of frames: 2" in out
    assert "SEARCH RESULTS" in out and "2 videos, from embeddings.npy + embeddings_index.json" in out
    assert "Demo finished: every stage ran." in out
    # it deletes its folder at the end, so it prints no path into it (failed before: /tmp/unified_demo_...)
    assert "unified_demo_" not in out and "Demo: wrote 2 videos (3 s, 160x120, 15 fps) to videos/" in out


def test_non_utf8_names_and_lone_surrogate_queries_still_write_results(tmp_path, config):
    """A lone-surrogate query is reported as a bad item; a non-UTF-8 video name is processed;
    the results file is written (valid UTF-8 JSON) in both runs and nothing crashes."""
    import os

    video = tmp_path / os.fsdecode(b"caf\xe9.mp4")
    write_video(tmp_path / "plain.mp4", 8, fps=12, size=(48, 32), gop=4)
    shutil.copy(tmp_path / "plain.mp4", video)
    batch = tmp_path / "batch.json"
    batch.write_text('[{"video_path": "plain.mp4", "query": "\\ud800 lone"},'
                     ' {"video_path": "plain.mp4", "query": "a clip"}]')
    out = tmp_path / "results.json"
    proc = run_script(SCRIPT, ["--batch_file", batch, "--output", out, "--config", config, "-q"], timeout=180)
    assert proc.returncode == 1, describe(proc)  # one bad pair
    no_traceback(proc)
    results = json.loads(out.read_bytes().decode("utf-8"))
    assert [r["status"] for r in results] == ["error", "success"], results
    assert "lone surrogate" in results[0]["error"]
    single = tmp_path / "single.json"
    proc = run_script(SCRIPT, ["--video_path", video, "--query", "a clip", "--output", single, "--config", config],
                      timeout=180)
    assert proc.returncode == 0, describe(proc)
    no_traceback(proc)
    (result,) = json.loads(single.read_bytes().decode("utf-8"))
    assert result["status"] == "success" and result["video_path"] == os.fspath(video)


@pytest.mark.timeout(240)
def test_output_that_is_not_a_regular_file_or_empty_is_refused_before_any_work(tmp_path, config):
    """--output FIFO was replaced by a regular file (a device too: /dev/full as root), exit 0;
    --output "" exited 0 writing nothing. Both are one-line usage errors before the model loads."""
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    for output, words in ((fifo, "FIFO"), (folder, "directory"), ("", "--output is empty")):
        proc = run_script(SCRIPT, ["--video_path", EXAMPLE, "--query", "a red circle", "--output", output,
                                   "--config", config], timeout=120)
        assert proc.returncode == 2, describe(proc)
        no_traceback(proc)
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, describe(proc)
        assert "INFERENCE RESULTS" not in proc.stdout, describe(proc)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir()


def test_names_with_newlines_and_escapes_print_each_result_on_one_line(tmp_path, config):
    """A video named ``evil\\nname`` split its search result line in two, and ESC / \\r reached the
    terminal: the printed reports escape names and paths; the JSON keeps the real names."""
    query = "a red circle"
    text = small_model().encode_text([query])[0].numpy()
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "evil\nname_embedding.json").write_text(json.dumps(
        {"embedding": text.tolist(), "video_path": "/videos/evil\nname\r.mp4"}))
    np.save(emb / "red\x1b[31mtext_embedding.npy", -text)
    out = tmp_path / "search.json"
    proc = run_script(SCRIPT, ["--embeddings_dir", emb, "--query", query, "--config", config, "--output", out])
    assert proc.returncode == 0, describe(proc)
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    lines = proc.stdout.splitlines()
    start = lines.index("SEARCH RESULTS")
    assert lines[start + 5] == "  1. 1.0000  evil\\nname  (/videos/evil\\nname\\r.mp4)"
    assert re.fullmatch(r"  2\. -1\.0000  red\\x1b\[31mtext", lines[start + 6]), lines[start + 6]
    assert lines[start + 7].startswith("Search time:")
    saved = json.loads(out.read_text())["results"]
    assert [r["name"] for r in saved] == ["evil\nname", "red\x1b[31mtext"]


def test_library_and_inference_reports_escape_names():
    """The library's blocks (videos, moments, an image query) and the INFERENCE RESULTS block."""
    from modules.library_cli import format_library_block
    from modules.retrieval import format_inference_block

    hit = {"rank": 1, "score": 0.5, "name": "a\nb", "video_path": "/v/a\nb\x1b[2J.mp4", "start_time": 0.0,
           "end_time": 1.0, "frame": 3}
    for moments in (False, True):
        for image in (None, "/pics/x\ny.png"):
            block = format_library_block({"library": "/lib\n", "num_videos": 1, "num_segments": 1,
                                          "query": None if image else "q\nq", "image": image, "moments": moments,
                                          "results": [hit], "search_time": 0.01})
            assert "\x1b" not in block and len(block.splitlines()) == 8, block
    result = {"video_path": "/v/a\nb\r.mp4", "query": "red\ncircle", "status": "error",
              "error": "cannot decode /v/a\nb\r.mp4"}
    block = format_inference_block(result)
    assert "\r" not in block and len(block.splitlines()) == 6, block
    assert "Video: /v/a\\nb\\r.mp4" in block.splitlines()
