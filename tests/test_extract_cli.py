"""extract_video_embeddings.py as users run it: subprocesses on generated videos.

Formats and keys, unique names, a hostile directory, resume after a kill, exit codes,
and torchrun with 2 CPU processes. Random ViT-B/32 weights, 4-frame config.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cli_utils import ROOT, describe, no_traceback, run_script, write_small_config
from tests.video_factory import write_audio_only, write_text_file, write_truncated, write_video

SCRIPT = "extract_video_embeddings.py"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _clip(path: Path, frames: int = 12, size=(48, 32), **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, frames, fps=12, size=size, gop=4, **kw)


def _visible_files(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_small_config(tmp_path_factory.mktemp("config"))


def test_help_documents_every_flag():
    proc = run_script(SCRIPT, ["--help"], timeout=60)
    assert proc.returncode == 0, describe(proc)
    text = proc.stdout
    for flag in ("--video_dir", "--output_dir", "--config_path", "--config", "--device", "--save_format",
                 "--consolidated", "--summary", "--clip_weights", "--checkpoint", "--recursive", "--extensions",
                 "--batch_size", "--num_workers", "--parallel_batches", "--overwrite", "--save_frame_features", "--verbose", "--quiet",
                 "--shard", "--num_shards"):
        assert re.search(rf"{re.escape(flag)}\b", text), f"{flag} missing from --help"
    assert text.count("(default:") >= 12  # defaults are shown


def test_usage_errors_exit_2_with_one_line(tmp_path, config):
    missing = run_script(SCRIPT, ["--video_dir", tmp_path / "nope", "--output_dir", tmp_path / "out"], timeout=60)
    assert missing.returncode == 2, describe(missing)
    no_traceback(missing)
    assert "video directory not found" in missing.stderr and "nope" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    videos = tmp_path / "videos"
    _clip(videos / "a.mp4")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tempme": {"merge_frame_num": "2-2-2"}}))  # the seed's value: 12/8 frames
    proc = run_script(SCRIPT, ["--video_dir", videos, "--output_dir", tmp_path / "out", "--config_path", bad], timeout=60)
    assert proc.returncode == 2, describe(proc)
    no_traceback(proc)
    assert "merge_frame_num" in proc.stderr and "bad.json" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    proc = run_script(SCRIPT, ["--video_dir", videos, "--save_format", "xml"], timeout=60)
    assert proc.returncode == 2 and "--save_format" in proc.stderr
    proc = run_script(SCRIPT, ["--video_dir", videos, "--parallel_batches", "0"], timeout=60)
    assert proc.returncode == 2 and "--parallel_batches" in proc.stderr
    proc = run_script(SCRIPT, ["--video_dir", videos, "--output_dir", "", "--config_path", config], timeout=60)
    assert proc.returncode == 2 and "--output_dir" in proc.stderr, describe(proc)
    no_traceback(proc)


def test_formats_unique_names_and_frame_features(tmp_path, config):
    videos = tmp_path / "videos"
    _clip(videos / "clip.mp4", 12)
    _clip(videos / "clip.webm", 10)  # same stem, other extension
    _clip(videos / "sub1" / "scene.mp4", 9)
    _clip(videos / "sub2" / "scene.mp4", 14)  # same file name in another folder
    _clip(videos / "sub2" / "UPPER.MOV", 8)
    out = tmp_path / "out"
    proc = run_script(SCRIPT, ["--video_dir", videos, "--output_dir", out, "--config", config, "--recursive",
                               "--save_format", "both", "--consolidated", "--summary", "--save_frame_features",
                               "--batch_size", "2", "--num_workers", "1", "--device", "cpu"])
    assert proc.returncode == 0, describe(proc)
    names = ["clip.mp4", "clip.webm", "sub1/scene", "sub2/UPPER", "sub2/scene"]
    for name in names:
        npy = out / f"{name}_embedding.npy"
        emb = np.load(npy)
        assert emb.shape == (512,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-4
        data = json.loads((out / f"{name}_embedding.json").read_text())
        assert list(data) == ["video_path", "embedding", "shape", "dtype"]
        assert data["shape"] == [512] and data["dtype"] == "float32"
        assert np.array_equal(np.asarray(data["embedding"], dtype=np.float32), emb)
        assert Path(data["video_path"]).exists()
        frames = np.load(out / f"{name}_frames.npz")
        assert frames["frame_features"].shape == (4, 512)
        for key in ("frame_indices", "timestamps", "start_frames", "end_frames", "start_times", "end_times"):
            assert frames[key].shape == (4,)
        assert np.all(frames["start_frames"] <= frames["frame_indices"])
        assert np.all(frames["frame_indices"] <= frames["end_frames"])
        assert np.all(frames["start_times"] < frames["end_times"])
    assert np.abs(np.load(out / "clip.mp4_embedding.npy") - np.load(out / "clip.webm_embedding.npy")).max() > 0

    cons = json.loads((out / "consolidated_embeddings.json").read_text())
    assert list(cons) == ["embeddings", "metadata"]
    assert sorted(cons["embeddings"]) == sorted(names)
    entry = cons["embeddings"]["sub1/scene"]
    assert list(entry) == ["embedding", "shape", "video_path"] and entry["shape"] == [512]
    meta = cons["metadata"]
    assert list(meta) == ["total_videos", "successful", "failed", "processing_date"]
    assert (meta["total_videos"], meta["successful"], meta["failed"]) == (5, 5, 0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", meta["processing_date"])
    matrix = np.load(out / "embeddings.npy")
    index = json.loads((out / "embeddings_index.json").read_text())
    assert matrix.shape == (5, 512) and matrix.dtype == np.float32
    for row, name in enumerate(index["names"]):
        assert np.array_equal(matrix[row], np.load(out / f"{name}_embedding.npy"))
        assert np.array_equal(matrix[row], np.asarray(cons["embeddings"][name]["embedding"], dtype=np.float32))

    summary = json.loads((out / "extraction_summary.json").read_text())
    assert summary["totals"]["processed"] == 5 and summary["totals"]["failed"] == 0
    assert summary["totals"]["videos_per_second"] > 0
    for video in summary["videos"]:
        assert video["status"] == "success" and video["error"] is None and video["seconds"] > 0
    assert "Embedded 5 videos, 0 failed" in proc.stdout


def _write_huge_checkpoint(path: Path, config: Path) -> Path:
    """A checkpoint of the model ``config`` builds with one tensor set to 1e30: finite, so
    loading accepts it, and every video embedding it gives is NaN."""
    import torch

    from config import from_json
    from unified_model import create_unified_model

    payload = create_unified_model(config=from_json(config), device="cpu").checkpoint_payload()
    payload["trainable"]["tempme.clip_pos.0"] = torch.full_like(payload["trainable"]["tempme.clip_pos.0"], 1e30)
    torch.save(payload, path)
    return path


def _write_hostile_dir(folder: Path) -> tuple[set, dict]:
    """Good files (names) and bad files (name -> expected words of the reason)."""
    good = {
        "one_frame.mp4": _clip(folder / "one_frame.mp4", 1),
        "tiny_16x16.mp4": _clip(folder / "tiny_16x16.mp4", 6, size=(16, 16)),
        "uhd_3840x2160.mp4": _clip(folder / "uhd_3840x2160.mp4", 2, size=(3840, 2160)),
        "vfr.mp4": _clip(folder / "vfr.mp4", 8, vfr_pts=[0, 40, 50, 200, 210, 400, 900, 1000]),
        "rotated.mp4": _clip(folder / "rotated.mp4", 6, size=(48, 32), rotate=90),
        "vidéo à espaces ✓.mp4": _clip(folder / "vidéo à espaces ✓.mp4", 6),
    }
    # non-UTF-8 names (Latin-1 bytes; two that differ only by case): embedded, JSON escapes them
    for raw in (b"caf\xe9.mp4", b"CAF\xe9.mp4"):
        good[os.fsdecode(raw)] = shutil.copy(good["vfr.mp4"], folder / os.fsdecode(raw))
    (folder / "zero_bytes.mp4").touch()
    source = _clip(folder.parent / "source.mp4", 30)
    write_truncated(source, folder / "truncated.mp4", keep_fraction=0.4)
    write_text_file(folder / "notes.mp4")
    write_text_file(folder / os.fsdecode(b"bad\xff.mp4"))
    write_audio_only(folder / "audio_only.mp4", seconds=0.5)
    os.symlink("does_not_exist.mp4", folder / "broken_link.mp4")
    os.mkfifo(folder / "pipe.mp4")  # opening it would block forever: must be detected
    (folder / "folder.mp4").mkdir()
    bad = {
        "zero_bytes.mp4": "empty file",
        "truncated.mp4": "truncated",
        "notes.mp4": "not a readable video",
        os.fsdecode(b"bad\xff.mp4"): "not a readable video",
        "audio_only.mp4": "no video stream",
        "broken_link.mp4": "broken symbolic link",
        "pipe.mp4": "FIFO",
        "folder.mp4": "directory",
    }
    if not IS_ROOT:  # root reads mode-000 files anyway; test_extraction covers the reason
        unreadable = _clip(folder / "unreadable.mp4", 4)
        unreadable.chmod(0)
        bad["unreadable.mp4"] = "permission denied"
    return set(good), bad


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and symlinks")
def test_hostile_directory(tmp_path, config):
    videos = tmp_path / "videos"
    videos.mkdir()
    good, bad = _write_hostile_dir(videos)
    # crafted names: a.mp4, A.mp4 and a file named like a.mp4's hashed output name
    crafted = {"a.mp4", "A.mp4", f"a-{hashlib.sha1(b'a.mp4').hexdigest()[:8]}.mkv"}
    for seed, name in enumerate(sorted(crafted)):
        _clip(videos / name, 4 + 2 * seed)
    write_text_file(videos / "new\nline.mp4")  # a failure whose name holds a newline
    # a good video whose decode worker is SIGKILLed each time (tests/worker_killer.py): the
    # pool is rebuilt, the videos in flight are retried, this one is failed, the others are written
    _clip(videos / "worker_dies.mp4", 6)
    bad["worker_dies.mp4"] = "decoder process crashed"
    out = tmp_path / "out"
    out.mkdir()
    (out / "one_frame_embedding.npy").write_bytes(b"")  # an empty stale output: recomputed
    args = ["--video_dir", videos, "--output_dir", out, "--config_path", config, "--summary", "--consolidated",
            "--num_workers", "1", "--batch_size", "3"]
    start = time.monotonic()
    proc = run_script("tests/worker_killer.py", ["worker_dies.", SCRIPT, *args], timeout=240)
    assert proc.returncode == 1, describe(proc)  # some videos failed
    no_traceback(proc)
    assert time.monotonic() - start < 200
    assert "a decode worker died" in proc.stderr, describe(proc)
    summary = json.loads((out / "extraction_summary.json").read_text())
    status = {Path(v["video_path"]).name: v for v in summary["videos"]}
    assert set(status) == good | set(bad) | crafted | {"new\nline.mp4"}
    crafted_names = [status[n]["name"] for n in crafted]
    assert len({n.casefold() for n in crafted_names}) == 3, crafted_names
    for name in crafted:
        assert status[name]["status"] == "success", status[name]
        assert np.load(out / f"{status[name]['name']}_embedding.npy").shape == (512,)
    failed_lines = [line for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    assert len(failed_lines) == len(bad) + 1, proc.stdout
    assert any(line.startswith(f"FAILED {videos}/new\\nline.mp4: ") for line in failed_lines), failed_lines
    for name in good:  # the non-UTF-8 pair differs only by case: both get hashed names
        assert status[name]["status"] == "success", status[name]
        assert np.load(out / f"{status[name]['name']}_embedding.npy").shape == (512,)
    for json_file in out.glob("*.json"):
        json_file.read_bytes().decode("utf-8")  # valid UTF-8: the odd bytes are escaped
    for name, words in bad.items():
        assert status[name]["status"] == "failed", status[name]
        reason = status[name]["error"]
        assert words.lower() in reason.lower(), (name, reason)
        assert "\n" not in reason
        shown = os.fspath(videos / name).encode("utf-8", "backslashreplace").decode()
        assert f"FAILED {shown}: {reason}" in proc.stdout
    totals = summary["totals"]
    ok, failed = len(good) + len(crafted), len(bad) + 1
    assert (totals["processed"], totals["failed"], totals["total"]) == (ok, failed, ok + failed)
    meta = json.loads((out / "consolidated_embeddings.json").read_text())["metadata"]
    assert (meta["successful"], meta["failed"]) == (ok, failed)
    assert not (out / "pipe_embedding.npy").exists() and not (out / "folder_embedding.npy").exists()

    # the same command with a tampered checkpoint (NaN embeddings): every video fails with a
    # one-line reason, none is reported as embedded, and the first run's outputs are kept
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name.endswith(("_embedding.npy", ".meta.json"))}
    assert len(kept) == 2 * ok
    nan_run = run_script(SCRIPT, [*args, "--checkpoint", _write_huge_checkpoint(tmp_path / "huge.pth", config)],
                         timeout=240)
    assert nan_run.returncode == 1, describe(nan_run)
    no_traceback(nan_run)
    assert f"Embedded 0 videos, {ok + failed} failed, 0 skipped" in nan_run.stdout, describe(nan_run)
    failed_lines = [line for line in nan_run.stdout.splitlines() if line.startswith("FAILED ")]
    assert len(failed_lines) == min(20, ok + failed) and f"and {ok + failed - 20} more failures" in nan_run.stdout
    rows = {Path(v["video_path"]).name: v for v in json.loads((out / "extraction_summary.json").read_text())["videos"]}
    for name in good | crafted:
        assert rows[name]["status"] == "failed" and "non-finite" in rows[name]["error"], rows[name]
        assert "\n" not in rows[name]["error"]
    assert all(rows[name]["status"] == "failed" for name in bad)
    meta = json.loads((out / "consolidated_embeddings.json").read_text())["metadata"]
    assert (meta["successful"], meta["failed"]) == (0, ok + failed)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in kept} == kept  # nothing lost
    again = run_script(SCRIPT, args, timeout=240)  # the right model again: only worker_dies.mp4 (no killer now) is new
    assert f"Embedded 1 videos, {failed - 1} failed, {ok} skipped" in again.stdout, describe(again)


def test_resume_after_kill(tmp_path, config):
    videos = tmp_path / "videos"
    first = _clip(videos / "v0.mp4", 10)
    for i in range(1, 4):  # identical copies: a resumed run must land in the same embedding space
        shutil.copy(first, videos / f"v{i}.mp4")
    out = tmp_path / "out"
    args = ["--video_dir", videos, "--output_dir", out, "--config_path", config, "--save_format", "both",
            "--save_frame_features", "--batch_size", "1", "--num_workers", "1", "--summary", "-q"]
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not list(out.glob("*_embedding.npy")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)  # the main process only: its decode worker must notice
        proc.wait(timeout=30)
    finally:
        with_timeout = time.monotonic() + 5
        while time.monotonic() < with_timeout:  # the orphaned worker exits on its own (watchdog)
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("decode workers outlived the killed main process")
        proc.stdout.close()
        proc.stderr.close()

    # only complete files are visible: every one loads
    before = {}
    for path in _visible_files(out):
        if path.suffix == ".npy":
            assert np.load(path).shape == (512,)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            assert np.load(path)["frame_features"].shape == (4, 512)
        before[path] = path.stat().st_mtime_ns
    done_before = {p.name[: -len("_embedding.npy")] for p in before if p.name.endswith("_embedding.npy")}
    complete_before = {n for n in done_before
                       if (out / f"{n}_embedding.json").exists() and (out / f"{n}_frames.npz").exists()}
    assert 1 <= len(complete_before) < 4

    rerun = run_script(SCRIPT, args)
    assert rerun.returncode == 0, describe(rerun)
    summary = json.loads((out / "extraction_summary.json").read_text())
    assert summary["totals"]["skipped"] == len(complete_before)
    assert summary["totals"]["processed"] == 4 - len(complete_before)
    for path, mtime in before.items():  # finished videos were not recomputed
        if path.name.split("_")[0] in complete_before:
            assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten"
    reference = np.load(out / "v0_embedding.npy")
    for i in range(4):
        assert np.abs(np.load(out / f"v{i}_embedding.npy") - reference).max() < 1e-5
    assert not [p for p in out.rglob(".*.tmp")], "temporary files left behind"


def test_torchrun_two_cpu_processes(tmp_path, config):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    videos = tmp_path / "videos"
    _clip(videos / "clip0.mp4", 9)
    shutil.copy(videos / "clip0.mp4", videos / "clip1.mp4")  # sorted round-robin: ranks 1 and 0
    _clip(videos / "clip2.mp4", 11)
    _clip(videos / "clip3.mp4", 13)
    write_text_file(videos / "broken.mp4")
    out = tmp_path / "out"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / SCRIPT), "--video_dir", str(videos),
         "--output_dir", str(out), "--config_path", str(config), "--consolidated", "--summary", "-q",
         "--num_workers", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0, describe(proc)  # broken.mp4 failed: every rank exits 1
    assert "All 2 shards: 4 embedded, 1 failed, 0 skipped of 5 videos" in proc.stdout, describe(proc)
    shards = sorted((out / ".extract_shards").glob("shard-*.json"))
    assert len(shards) == 2
    handled = [rec["name"] for s in shards for rec in json.loads(s.read_text())["records"]]
    assert sorted(handled) == ["broken", "clip0", "clip1", "clip2", "clip3"]  # each video exactly once
    summary = json.loads((out / "extraction_summary.json").read_text())
    assert summary["totals"]["total"] == 5 and summary["totals"]["failed"] == 1
    assert {v["name"]: v["status"] for v in summary["videos"]}["broken"] == "failed"
    cons = json.loads((out / "consolidated_embeddings.json").read_text())
    assert sorted(cons["embeddings"]) == ["clip0", "clip1", "clip2", "clip3"]
    assert np.load(out / "embeddings.npy").shape == (4, 512)

    # the two ranks built the same model: identical files on different ranks, same embedding
    ranks = {rec["name"]: s.name for s in shards for rec in json.loads(s.read_text())["records"]}
    assert ranks["clip0"] != ranks["clip1"]
    assert np.abs(np.load(out / "clip0_embedding.npy") - np.load(out / "clip1_embedding.npy")).max() < 1e-5


def test_a_tampered_checkpoint_file_fails_every_video(tmp_path, config):
    """A checkpoint on disk with one tensor set to 1e30 (finite, so load accepts it) gives NaN
    embeddings: every video is failed with the reason, nothing is written, exit 1 (issue 10.7)."""
    videos = tmp_path / "videos"
    for i in range(2):
        _clip(videos / f"n{i}.mp4")
    proc = run_script(SCRIPT, ["--video_dir", videos, "--output_dir", tmp_path / "out", "--config_path", config,
                               "--checkpoint", _write_huge_checkpoint(tmp_path / "huge.pth", config), "--summary"])
    no_traceback(proc)
    assert proc.returncode == 1, describe(proc)
    assert "0 videos, 2 failed" in proc.stdout + proc.stderr, describe(proc)
    assert len(re.findall(r"FAILED .*non-finite", proc.stdout + proc.stderr)) == 2, describe(proc)
    assert not list((tmp_path / "out").glob("*_embedding.*"))
