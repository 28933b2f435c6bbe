"""Moments on painted clips, the search server's API (FastAPI TestClient) and the CLI."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from tests.cli_utils import ROOT, describe, no_traceback, run_script, write_small_config
from tests.library_fixture import CLIPS, build_library
from tests.video_factory import read_index_rgb


def _square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    return rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("lib"))


@pytest.fixture(scope="module")
def client(built):
    from fastapi.testclient import TestClient

    from modules.search_server import create_app

    return TestClient(create_app(built[1]))


def test_moments_map_to_painted_frame_numbers_and_seconds(built):
    from modules.search_server import cut_frame

    _, library = built
    segments = library.table("segments").to_pylist()
    videos = {v["row"]: v for v in library}
    assert len(segments) == 4 * len(CLIPS)  # the small model keeps 4 groups per video
    features = library.embeddings("segments")
    for seg in segments:
        video = videos[seg["video_row"]]
        frames, fps = CLIPS[video["name"]]
        assert video["fps"] == fps and video["num_frames"] == frames
        # the representative frame number is the frame shown at its timestamp ...
        assert seg["timestamp"] == pytest.approx(seg["frame"] / fps, abs=1e-6)
        assert read_index_rgb(_square(cut_frame(video["video_path"], seg["timestamp"]))) == seg["frame"]
        # ... inside the group's time span, which covers its member frames
        assert seg["start_time"] <= seg["timestamp"] < seg["end_time"] <= frames / fps + 1e-6
        assert seg["members"][0] == seg["start_frame"] and seg["members"][-1] == seg["end_frame"]
        assert seg["start_frame"] <= seg["frame"] <= seg["end_frame"]
        hit = library.search(features[seg["row"]], top_k=1, moments=True)[0]
        assert (hit["name"], hit["frame"], hit["start_time"], hit["end_time"]) == (
            video["name"], seg["frame"], seg["start_time"], seg["end_time"])
    spans = sorted((s["start_time"], s["end_time"]) for s in segments if s["video_row"] == 0)
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(CLIPS["alpha"][0] / CLIPS["alpha"][1])


def test_text_and_image_queries_build_the_model_once(built, tmp_path):
    from modules.search_server import cut_frame, encode_jpeg

    _, library = built
    first = library.search("a red ball", top_k=2)
    library.search("a blue square", top_k=2, moments=True)
    picture = tmp_path / "frame.jpg"
    picture.write_bytes(encode_jpeg(cut_frame(first[0]["video_path"], 1.0)))
    by_image = library.search(str(picture), top_k=3)
    assert len(first) == 2 and len(by_image) == 3 and {h["name"] for h in by_image} == set(CLIPS)
    assert len(library.encoder_calls) == 1
    text = library.encoder().encode_text(["a red ball"])[0]
    assert [h["score"] for h in first] == pytest.approx(sorted((library.embeddings() @ text).tolist(), reverse=True)[:2], abs=1e-5)


def test_api_search_results_and_thumbnails(client):
    response = client.get("/api/search", params={"q": "a dog", "top_k": 5, "moments": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["moments"] and body["num_videos"] == len(CLIPS) and len(body["results"]) == 5
    hit = body["results"][0]
    assert {"name", "score", "start_time", "end_time", "frame", "video_url", "thumb_url"} <= set(hit)
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    thumb = client.get(hit["thumb_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    videos = client.get("/api/search", params={"q": "a dog"}).json()["results"]
    assert len(videos) == len(CLIPS) and client.get(videos[0]["thumb_url"]).status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text


def test_api_video_range_requests(client, built):
    full = client.get("/video/0")
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    part = client.get("/video/0", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == full.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(full.content)}"


@pytest.mark.parametrize("url, status, words", [
    ("/api/search?q=" + "x" * 201, 400, "longer than 200"),
    ("/api/search?q=%20", 400, "empty"),
    ("/api/search", 400, "q"),
    ("/api/search?q=dog&top_k=0", 400, "top_k"),
    ("/api/search?q=dog&top_k=101", 400, "top_k"),
    ("/api/search?q=dog&top_k=ten", 400, "top_k"),
    ("/video/99", 404, "no video 99"),
    ("/video/-1", 404, "no video"),
    ("/video/..%2F..%2Fetc%2Fpasswd", 404, "Not Found"),
    ("/video/abc", 400, "row"),
    ("/thumb/moment/9999.jpg", 404, "no moment"),
    ("/static/../../etc/passwd", 404, "Not Found"),
])
def test_api_errors_are_4xx_json(client, url, status, words):
    response = client.get(url)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_cli_several_queries_moments_and_fallback(built, tmp_path):
    out, _ = built
    config = write_small_config(tmp_path)
    report = tmp_path / "r.json"
    proc = run_script("inference.py", ["--embeddings_dir", out, "--query", "a dog", "--query", "a cat", "--moments",
                                       "--top_k", "3", "--output", report, "--config_path", config], timeout=300)
    assert proc.returncode == 0, describe(proc)
    lines = [l.strip() for l in proc.stdout.splitlines() if re.match(r"^\s+\S+  \d+\.\d-\d+\.\d s  frame \d+  -?\d\.\d{3}$", l)]
    assert len(lines) == 6, proc.stdout
    data = json.loads(report.read_text())
    assert [d["query"] for d in data] == ["a dog", "a cat"] and all(len(d["results"]) == 3 for d in data)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(config.read_text()), "max_words": 16}))
    refused = run_script("inference.py", ["--embeddings_dir", out, "--query", "a dog", "--config_path", other], timeout=300)
    assert refused.returncode == 2 and "another model" in refused.stderr and "--config_path" in refused.stderr
    no_traceback(refused)
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in out.glob("alpha_embedding.*"):
        (plain / f.name).write_bytes(f.read_bytes())
    fallback = run_script("inference.py", ["--embeddings_dir", plain, "--query", "a dog", "--config_path", config], timeout=300)
    assert fallback.returncode == 0 and "--index" in fallback.stderr and "SEARCH RESULTS" in fallback.stdout, describe(fallback)
    moments = run_script("inference.py", ["--embeddings_dir", plain, "--query", "a dog", "--moments"], timeout=120)
    assert moments.returncode == 2 and "--index" in moments.stderr


def test_extract_index_flag_builds_extends_and_refuses_another_model(tmp_path):
    from modules.library import VideoLibrary
    from tests.video_factory import write_video

    config = write_small_config(tmp_path)
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    for name in ("one", "two"):
        write_video(videos / f"{name}.mp4", 20, fps=10, size=(64, 48))
    args = ["--video_dir", videos, "--output_dir", out, "--config_path", config, "--index", "-q", "--num_workers", "0"]
    first = run_script("extract_video_embeddings.py", args, timeout=300)
    assert first.returncode == 0 and "Library" in first.stdout, describe(first)
    assert len(VideoLibrary.open(out)) == 2 and VideoLibrary.open(out).num_segments == 8
    write_video(videos / "three.mp4", 30, fps=10, size=(64, 48))
    second = run_script("extract_video_embeddings.py", args, timeout=300)
    assert second.returncode == 0, describe(second)
    library = VideoLibrary.open(out)
    assert sorted(r["name"] for r in library) == ["one", "three", "two"] and library.num_segments == 12
    hit = library.search(library.embeddings()[2], top_k=1)[0]
    assert hit["row"] == 2 and hit["name"] == "three"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(config.read_text()), "max_words": 16}))
    write_video(videos / "four.mp4", 20, fps=10, size=(64, 48))
    refused = run_script("extract_video_embeddings.py", [*args[:4], "--config_path", other, "--index", "-q"], timeout=300)
    assert refused.returncode == 2 and "another model" in refused.stderr and "--config_path" in refused.stderr
    assert not (out / "four_embedding.npy").exists()  # refused before extracting anything
    assert len(VideoLibrary.open(out)) == 3


def test_long_video_windows_become_moments_with_window_fields(tmp_path):
    """h5's WindowTable through the LibraryWriter: one segment per group of every window."""
    from modules.library import VideoLibrary
    from modules.library_cli import cli_fingerprint
    from modules.library_writer import LibraryWriter
    from modules.long_video import encode_long_video
    from modules.search_server import cut_frame
    from modules.writers import VideoResult
    from tests.cli_utils import small_model
    from tests.video_factory import write_video

    clip = write_video(tmp_path / "long.mp4", 60, fps=10, size=(64, 48), gop=5)
    table = encode_long_video(small_model(), clip, window_seconds=2.0)
    assert table.num_windows == 3
    fingerprint = cli_fingerprint(str(write_small_config(tmp_path)), None, None)
    writer = LibraryWriter(str(tmp_path / "out"), fingerprint)
    writer.prepare([])
    writer.write(VideoResult("long", str(clip), "success", embedding=table.embedding, extra={"windows": table}))
    writer.close(None)
    library = VideoLibrary.open(tmp_path / "out")
    segments = library.table("segments").to_pylist()
    assert len(segments) == table.num_windows * table.group_features.shape[1]
    assert sorted({s["window_index"] for s in segments}) == [0, 1, 2]
    for seg in segments:
        assert seg["window_start"] == pytest.approx(2.0 * seg["window_index"])
        assert seg["window_start"] - 1e-6 <= seg["start_time"] <= seg["timestamp"] < seg["end_time"] <= seg["window_end"] + 1e-6
        assert read_index_rgb(_square(cut_frame(str(clip), seg["timestamp"]))) == seg["frame"]
    target = segments[-1]
    hit = library.search(library.embeddings("segments")[target["row"]], top_k=1, moments=True)[0]
    assert (hit["window_index"], hit["frame"]) == (target["window_index"], target["frame"])
    assert list(library)[0]["duration"] == pytest.approx(6.0)


def test_index_without_model_flags_uses_the_model_the_videos_record(tmp_path):
    """A folder extracted without --consolidated/--summary/--index still names its model (the
    per-video records + the folder's model record); videos of a second model are refused."""
    from modules.library import VideoLibrary
    from tests.video_factory import write_video

    config = write_small_config(tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(config.read_text()), "max_words": 16}))
    first_dir, second_dir, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder, names in ((first_dir, ("one", "two")), (second_dir, ("three",))):
        folder.mkdir()
        for name in names:
            write_video(folder / f"{name}.mp4", 20, fps=10, size=(64, 48))
    base = ["--output_dir", out, "-q", "--num_workers", "0"]  # .npy only: the video paths are in the records
    done = run_script("extract_video_embeddings.py", ["--video_dir", first_dir, "--config_path", config, *base], timeout=300)
    assert done.returncode == 0, describe(done)
    assert not (out / "extraction_summary.json").exists() and not (out / "embeddings_index.json").exists()

    indexed = run_script("inference.py", ["--embeddings_dir", out, "--index"], timeout=300)
    assert indexed.returncode == 0, describe(indexed)
    library = VideoLibrary.open(out)
    assert sorted(r["name"] for r in library) == ["one", "two"] and library.num_segments == 0
    assert sorted(os.path.basename(r["video_path"]) for r in library) == ["one.mp4", "two.mp4"]
    searched = run_script("inference.py", ["--embeddings_dir", out, "--query", "a dog"], timeout=300)
    assert searched.returncode == 0 and "one.mp4" in searched.stdout, describe(searched)

    # a second model writes into the same folder: without flags the folder is ambiguous
    done = run_script("extract_video_embeddings.py", ["--video_dir", second_dir, "--config_path", other, *base], timeout=300)
    assert done.returncode == 0, describe(done)
    shutil.rmtree(out / "library")
    refused = run_script("inference.py", ["--embeddings_dir", out, "--index"], timeout=300)
    assert refused.returncode == 2 and "2 models" in refused.stderr and "--config_path" in refused.stderr, describe(refused)
    assert len(refused.stderr.strip().splitlines()) == 1
    # with the first model's flags only its videos are indexed; the other's are named, not mixed in
    chosen = run_script("inference.py", ["--embeddings_dir", out, "--index", "--config_path", config], timeout=300)
    assert chosen.returncode == 0, describe(chosen)
    assert "three" in chosen.stderr and "another model" in chosen.stderr
    assert sorted(r["name"] for r in VideoLibrary.open(out)) == ["one", "two"]


def test_the_server_follows_an_update_made_while_it_serves(tmp_path):
    """An extraction with --index adding videos while the page is served: the next request
    sees them (no restart), and no request fails on the files the update replaced."""
    from fastapi.testclient import TestClient

    from modules.library import VideoLibrary
    from modules.search_server import create_app

    emb = np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    fp = {"clip_weights": "random", "checkpoint": None, "config": {"max_frames": 4}}

    class Encoder:  # every text means the last video's vector
        def encode_text(self, texts):
            return np.repeat(emb[7:8], len(texts), axis=0)

    root = tmp_path / "lib"
    rows = [{"name": f"v{i}", "video_path": f"/videos/v{i}.mp4"} for i in range(8)]
    VideoLibrary.create(root, fp, 16).add(rows[:4], emb[:4], fingerprint=fp)
    client = TestClient(create_app(VideoLibrary.open(root, encoder_factory=lambda _fp: Encoder())))
    before = client.get("/api/search", params={"q": "anything", "top_k": 1}).json()
    assert before["num_videos"] == 4 and before["results"][0]["name"] != "v7"
    VideoLibrary.open(root).add(rows[4:], emb[4:], fingerprint=fp)  # another process's update
    after = client.get("/api/search", params={"q": "anything", "top_k": 1})
    assert after.status_code == 200, after.text
    assert after.json()["num_videos"] == 8 and after.json()["results"][0]["name"] == "v7"


def test_api_query_is_text_even_when_it_names_a_server_file(client, built, tmp_path):
    """``q`` never reaches the filesystem: the path of a picture on the server is searched
    as the text it is (no existence oracle), and a garbage .png is no 500."""
    from modules.search_server import cut_frame, encode_jpeg

    _, library = built
    picture = tmp_path / "frame.jpg"
    picture.write_bytes(encode_jpeg(cut_frame(library.table().to_pylist()[0]["video_path"], 1.0)))
    as_text = library.search_vector(library.encoder().encode_text([str(picture)])[0], 3)
    as_image = library.search(str(picture), top_k=3)  # the Python API's query by example stays
    assert [h["score"] for h in as_text] != [h["score"] for h in as_image]
    same = library.search(str(picture), top_k=3, as_text=True)  # the text encoder varies in the 6th decimal
    assert [h["row"] for h in same] == [h["row"] for h in as_text]
    assert [h["score"] for h in same] == pytest.approx([h["score"] for h in as_text], abs=1e-5)
    response = client.get("/api/search", params={"q": str(picture), "top_k": 3})
    assert response.status_code == 200, response.text
    served = response.json()["results"]
    assert [h["row"] for h in served] == [h["row"] for h in as_text]
    assert [h["score"] for h in served] == pytest.approx([h["score"] for h in as_text], abs=1e-5)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a picture at all")
    response = client.get("/api/search", params={"q": str(garbage), "top_k": 3, "moments": "true"})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3


def test_an_unexpected_server_error_answers_json(tmp_path):
    from fastapi.testclient import TestClient

    from modules.library import VideoLibrary
    from modules.search_server import create_app

    fp = {"clip_weights": "random", "checkpoint": None, "config": {"max_frames": 4}}
    emb = np.eye(4, 16, dtype=np.float32)

    class Broken:
        def encode_text(self, texts):
            raise RuntimeError("the encoder fell over")

    root = tmp_path / "lib"
    VideoLibrary.create(root, fp, 16).add([{"name": f"v{i}", "video_path": f"/v/{i}.mp4"} for i in range(4)], emb,
                                          fingerprint=fp)
    client = TestClient(create_app(VideoLibrary.open(root, encoder_factory=lambda _fp: Broken())),
                        raise_server_exceptions=False)
    response = client.get("/api/search", params={"q": "a dog"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "internal server error"}  # no traceback or message leaks out


def test_cli_serve_refuses_a_bad_or_busy_port(built):
    """--port outside 1-65535 is an argument error; a port already in use is a one-line
    error before "Serving ..." is printed (both exit 2, no traceback)."""
    import socket

    out, _ = built
    for port in ("99999", "0", "65536"):
        bad = run_script("inference.py", ["--embeddings_dir", out, "--serve", "--port", port], timeout=120)
        assert bad.returncode == 2 and "--port" in bad.stderr and "65535" in bad.stderr, describe(bad)
        no_traceback(bad)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        taken = run_script("inference.py", ["--embeddings_dir", out, "--serve", "--port", port], timeout=120)
    assert taken.returncode == 2, describe(taken)
    assert "Serving" not in taken.stdout and str(port) in taken.stderr, describe(taken)
    assert len(taken.stderr.strip().splitlines()) == 1, describe(taken)
    no_traceback(taken)


def test_readme_library_api_block_runs_as_written(built, monkeypatch):
    """README_unified.md's "Python API" block of the library runs with the project's
    dependencies (pyarrow, no pandas), against the small library."""
    from modules.library import VideoLibrary

    text = (ROOT / "README_unified.md").read_text()
    block = re.search(r"\*\*Python API\*\*:\s*```python\n(.*?)```", text, re.S).group(1)
    _, library = built
    monkeypatch.setattr(VideoLibrary, "open", staticmethod(lambda *_a, **_k: library))
    exec(compile(block, "README_unified.md", "exec"), {"vector": library.embeddings()[0]})
