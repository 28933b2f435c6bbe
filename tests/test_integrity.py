"""Integrity of what extraction leaves on disk and what search trusts (no silent wrong answers)."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from modules.cli_support import UsageError
from modules.errors import one_line
from modules.extraction import extract_directory_embeddings
from modules.retrieval import load_embedding_index, search_embeddings
from modules.video_listing import unique_names
from tests.cli_utils import SMALL_CONFIG, describe, no_traceback, run_script, small_model, write_small_config
from tests.video_factory import write_video
from tests.worker_killer import die_on

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _clip(path, frames=8, size=(48, 32), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, frames + seed, fps=12, size=(size[0] + 16 * seed, size[1]), gop=4)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The same architecture built from a checkpoint with other trained tensors."""
    from config import from_dict
    from unified_model import create_unified_model

    built = create_unified_model(config=from_dict(SMALL_CONFIG), device="cpu")
    with torch.no_grad():
        for _, param in built.named_group_parameters("stop"):
            param.add_(0.01)
    path = tmp_path_factory.mktemp("ckpt") / "other.pth"
    built.save_checkpoint(path)
    return create_unified_model(checkpoint=path, device="cpu", merge_lora=True)


def _run(video_dir, out, model, **kw):
    return extract_directory_embeddings(video_dir, out, model=model, num_workers=0, progress=False, **kw)


# ----------------------------------------------------------------------------- item 5: unique names


def test_crafted_names_cannot_share_an_output_name():
    """a.mp4, A.mp4 and a file named like a.mp4's hashed name: three names, unique by construction."""
    crafted = f"a-{hashlib.sha1(b'a.mp4').hexdigest()[:8]}.mkv"
    for rels in (["a.mp4", "A.mp4", crafted], [crafted, "a.mp4", "A.mp4"],
                 ["x.mp4", "X.mp4", f"x-{hashlib.sha1(b'X.mp4').hexdigest()[:8]}.mp4", "x.webm"]):
        names = unique_names(sorted(rels))
        assert len({n.casefold() for n in names}) == len(rels), names


# ----------------------------------------------------------------------------- item 4: stale outputs


def test_output_of_a_deleted_video_is_not_reused_for_a_new_one(model, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "clip.webm", 8, seed=0)
    assert _run(videos, out, model)["processed"] == 1
    old = np.load(out / "clip_embedding.npy")
    _clip(videos / "clip.mp4", 14, size=(64, 40), seed=2)
    (videos / "clip.webm").unlink()
    again = _run(videos, out, model, consolidated=True)
    assert (again["processed"], again["skipped"]) == (1, 0)
    fresh = model.extract_video_embedding(videos / "clip.mp4")
    new = np.load(out / "clip_embedding.npy")
    assert np.abs(new - fresh).max() < 1e-4 and np.abs(new - old).max() > 1e-3
    index = json.loads((out / "embeddings_index.json").read_text())
    assert index["video_paths"] == [str(videos / "clip.mp4")]
    # the new clip.mp4 cannot be decoded: the old outputs go, none are reported for it
    (videos / "clip.mp4").write_text("not a video")
    broken = _run(videos, out, model, consolidated=True)
    assert (broken["processed"], broken["failed"]) == (0, 1)
    assert not (out / "clip_embedding.npy").exists()
    assert json.loads((out / "embeddings_index.json").read_text())["names"] == []


# ----------------------------------------------------------------------------- item 6: the model fingerprint


def test_fingerprint_names_weights_checkpoint_and_config(model, other_model):
    from unified_model import model_fingerprint

    assert model_fingerprint(model) == model_fingerprint(model)
    assert model_fingerprint(model) != model_fingerprint(other_model)


def test_outputs_of_another_model_are_recomputed(model, other_model, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model, consolidated=True)
    again = _run(videos, out, other_model, consolidated=True)
    assert (again["processed"], again["skipped"]) == (2, 0)
    emb = np.load(out / "a_embedding.npy")
    assert np.abs(emb - other_model.extract_video_embedding(videos / "a.mp4")).max() < 1e-4
    from unified_model import model_fingerprint

    index = json.loads((out / "embeddings_index.json").read_text())
    assert index["model"]["fingerprint"] == model_fingerprint(other_model)


def test_search_refuses_another_model_mixed_models_and_a_stale_index(model, other_model, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model, consolidated=True)
    assert search_embeddings(model, out, "a red circle")["num_videos"] == 2
    with pytest.raises(UsageError, match="another model"):
        search_embeddings(other_model, out, "a red circle")
    # a video added without --consolidated: the consolidated index is older than the per-video files
    _clip(videos / "c.mp4", 12, seed=2)
    _run(videos, out, model)
    with pytest.raises(UsageError, match="--consolidated"):
        search_embeddings(model, out, "a red circle")
    # per-video files of two models in one folder
    mixed, other_out = tmp_path / "mixed", tmp_path / "other"
    _run(videos, mixed, model)
    _run(videos, other_out, other_model)
    for suffix in ("_embedding.npy", ".meta.json"):
        src = other_out / (f".c{suffix}" if suffix.startswith(".meta") else f"c{suffix}")
        if src.exists():
            shutil.copy(src, mixed / src.name)
    with pytest.raises(UsageError, match="mix"):
        search_embeddings(model, mixed, "a red circle")


# ----------------------------------------------------------------------------- item 9: unreadable outputs


def test_empty_or_truncated_outputs_are_recomputed(model, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model)
    (out / "a_embedding.npy").write_bytes(b"")
    full = (out / "b_embedding.npy").read_bytes()
    (out / "b_embedding.npy").write_bytes(full[: len(full) // 2])
    again = _run(videos, out, model, consolidated=True)
    assert (again["processed"], again["skipped"]) == (2, 0)
    assert np.load(out / "embeddings.npy").shape == (2, 512)
    assert search_embeddings(model, out, "a red circle")["num_videos"] == 2


def test_search_reports_an_unreadable_per_video_file_instead_of_crashing(model, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model)
    (out / "a_embedding.npy").write_bytes(b"")
    names, *_ = load_embedding_index(out)
    assert names == ["b"]
    (out / "a_embedding.npy").unlink()
    os.mkfifo(out / "a_embedding.npy")  # a FIFO: np.load would block forever on it
    names, *_ = load_embedding_index(out)
    assert names == ["b"]


# ----------------------------------------------------------------------------- item 13: consolidated files


def test_consolidated_matrix_is_written_without_a_memory_map(model, tmp_path, monkeypatch):
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _run(videos, out, model)

    def refuse(*args, **kwargs):
        raise AssertionError("a memory-mapped output page-faults (SIGBUS) on a full disk")

    monkeypatch.setattr(np.lib.format, "open_memmap", refuse)
    assert _run(videos, out, model, consolidated=True)["skipped"] == 1
    assert np.load(out / "embeddings.npy").shape == (1, 512)


def test_a_matrix_without_its_index_is_not_used(model, tmp_path, monkeypatch):
    """A kill between replacing embeddings.npy and embeddings_index.json must not pair them silently."""
    import modules.atomic_io as atomic_io

    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model, consolidated=True)
    old_index = (out / "embeddings_index.json").read_bytes()
    _clip(videos / "b.mp4", 16, size=(64, 40), seed=3)  # b changes: same rows, other numbers
    real = os.replace

    def killed(src, dst):  # the matrix (and JSON) were renamed, the kill comes before the index's rename
        if os.path.basename(dst) == "embeddings_index.json":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(videos, out, model, consolidated=True, overwrite=True)
    monkeypatch.setattr(atomic_io.os, "replace", real)
    assert (out / "embeddings_index.json").read_bytes() == old_index
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(UsageError, match="--consolidated"):
        load_embedding_index(out)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for one test: a disk that really fills up (root only)."""
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {one_line(mounted.stderr)}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _blocks(nbytes, block):
    return -(-nbytes // block)


@pytest.mark.parametrize("fails_at", ["matrix", "json"])
def test_a_full_disk_during_consolidated_is_a_one_line_error_and_keeps_the_old_files(small_disk, tmp_path, fails_at):
    """--consolidated on a disk with room for the new video's files but not for the new
    consolidated files: exit 1 with one line naming the file and "No space left" (no SIGBUS
    from a memory map), no temp files, and the previous matrix and index intact and paired."""
    videos, out = tmp_path / "v", small_disk / "out"
    config = write_small_config(tmp_path)
    old = 6
    for seed in range(old):
        _clip(videos / f"v{seed}.mp4", 6, seed=seed)
    args = ["--video_dir", videos, "--output_dir", out, "--config_path", config, "--consolidated", "--num_workers", "0"]
    first = run_script("extract_video_embeddings.py", args)
    assert first.returncode == 0, describe(first)
    kept = {name: (out / name).read_bytes() for name in ("embeddings.npy", "embeddings_index.json",
                                                         "consolidated_embeddings.json")}
    _clip(videos / f"v{old}.mp4", 6, seed=old)
    stat = os.statvfs(small_disk)
    block = stat.f_frsize
    per_video = _blocks((out / "v0_embedding.npy").stat().st_size, block) + _blocks((out / ".v0.meta.json").stat().st_size, block)
    new_matrix = _blocks(128 + (old + 1) * 512 * 4, block)
    assert new_matrix >= 3
    if fails_at == "matrix":
        # room for the header's and the last row's blocks, not for those between them: a
        # memory-mapped matrix would be created, then page-fault (SIGBUS) on its middle rows
        room = per_video + 2
    else:  # the matrix fits; the JSON does not, even with the old matrix's blocks freed
        room = per_video + new_matrix + 1
        new_json = _blocks(len(kept["consolidated_embeddings.json"]) * (old + 1) // old, block)
        assert new_json > room - per_video + _blocks(len(kept["embeddings.npy"]), block)
    with open(small_disk / "filler", "wb") as fh:
        fh.write(b"\0" * ((stat.f_bavail - room) * block))
    second = run_script("extract_video_embeddings.py", args)
    no_traceback(second)
    assert second.returncode == 1, describe(second)  # an OSError: exit 1, not -7 (SIGBUS) or 135
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left" in errors[0], describe(second)
    assert ("embeddings.npy" if fails_at == "matrix" else "consolidated_embeddings.json") in errors[0], errors
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert np.load(out / f"v{old}_embedding.npy").shape == (512,)  # the new video's own files were written
    for name, data in kept.items():
        assert (out / name).read_bytes() == data, f"{name} was replaced although the consolidated write failed"
    index = json.loads(kept["embeddings_index.json"])
    matrix = np.load(io.BytesIO(kept["embeddings.npy"]))
    assert index["matrix_sha256"] == hashlib.sha256(matrix.astype("<f4").tobytes()).hexdigest()
    assert index["names"] == [f"v{i}" for i in range(old)]


# ----------------------------------------------------------------------------- item 14: stale temps


def test_stale_temp_cleanup_removes_only_this_projects_temps(model, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    notes = out / "notes"
    notes.mkdir(parents=True)
    draft = notes / ".draft.txt.4242.tmp"
    draft.write_text("my notes")
    ours = out / ".a_embedding.npy.999999999.tmp"
    ours.write_bytes(b"partial")
    _run(videos, out, model)
    assert draft.exists() and not ours.exists()


# ----------------------------------------------------------------------------- item 17: names and folders


def test_a_long_name_that_fits_is_written(model, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "out"
    name = "v" * 236  # 240 bytes with ".mp4"; "<name>_embedding.npy" is 250 bytes
    _clip(videos / f"{name}.mp4", 8)
    result = _run(videos, out, model)
    assert result["processed"] == 1, result["errors"]
    assert np.load(out / f"{name}_embedding.npy").shape == (512,)


def test_an_unwritable_output_folder_fails_before_any_decode(model, tmp_path, monkeypatch):
    import modules.decode_pool as decode_pool

    videos = tmp_path / "v"
    _clip(videos / "a.mp4", 8)
    if IS_ROOT:  # root writes into mode-555 folders: use a folder nobody can create files in
        out = "/proc/self/fdinfo"
        if not os.path.isdir(out):
            pytest.skip("no /proc")
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
    monkeypatch.setattr(decode_pool, "sample_video", lambda *a, **k: pytest.fail("decoded before checking"))
    with pytest.raises(UsageError, match="not writable"):
        _run(videos, out, model)


# ----------------------------------------------------------------------------- item 10: a decode worker dies


def _slow_down(fn, seconds):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def test_pool_recovers_when_a_worker_dies_while_the_consumer_is_busy():
    """The pool breaks while nobody waits on it; the next submit must not raise BrokenProcessPool."""
    from modules.decode_pool import DecodePool

    pool = DecodePool(num_workers=2, max_in_flight=4)
    got = {}
    for (i,), result in pool.imap_unordered(_kill_on_three, [(i,) for i in range(8)], on_crash=lambda item: "crashed"):
        time.sleep(0.3)  # the consumer: slower than the workers
        got[i] = result
    assert got == {**{i: i * 10 for i in range(8) if i != 3}, 3: "crashed"}
    assert pool.crashes >= 2  # the first break, then the victim alone


def _kill_on_three(i):
    if i == 3:
        os.kill(os.getpid(), 9)
    return i * 10


@pytest.mark.parametrize("always", [False, True], ids=["killed-once", "kills-every-time"])
def test_extraction_survives_a_decode_worker_killed_mid_run(model, tmp_path, monkeypatch, always):
    """A worker SIGKILLed mid-run with a slow model: retried once, then failed; every other video written."""
    import modules.decode_pool as decode_pool
    import modules.extraction as extraction

    for i in range(8):  # more than the pool holds in flight (5): submits follow the crash
        _clip(tmp_path / "videos" / f"v{i}.mp4", seed=i % 2)
    victim = functools.partial(die_on, "v1.", None if always else str(tmp_path / "killed"))
    monkeypatch.setattr(decode_pool, "decode_video", victim)
    monkeypatch.setattr(extraction, "encode_batch", _slow_down(extraction.encode_batch, 0.4))
    result = extract_directory_embeddings(tmp_path / "videos", tmp_path / "out", model=model, num_workers=2,
                                          parallel_batches=1, progress=False)
    written = sorted(p.name for p in (tmp_path / "out").glob("*_embedding.npy"))
    if always:
        assert (result["processed"], result["failed"]) == (7, 1), result
        assert "crashed" in result["errors"][0]["error"] and result["errors"][0]["video_path"].endswith("v1.mp4")
        assert written == [f"v{i}_embedding.npy" for i in range(8) if i != 1]
    else:
        assert (result["processed"], result["failed"]) == (8, 0), result
        assert written == [f"v{i}_embedding.npy" for i in range(8)]


def _die_now():
    os.kill(os.getpid(), 9)


def _small_config():
    from config import from_dict
    from tests.cli_utils import SMALL_CONFIG

    return from_dict(SMALL_CONFIG)


@pytest.mark.parametrize("workers", [1, 2])
def test_videos_that_kill_every_worker_first_do_not_stop_the_run(model, tmp_path, monkeypatch, workers):
    """Two killer videos among the first a run takes: before any video succeeded, three
    worker deaths (the batch, then each killer alone) read as "workers cannot run here" and
    the run aborted with a traceback, writing nothing. Workers that run a probe are fine:
    the killers fail, the rest is written."""
    import modules.decode_pool as decode_pool
    import modules.extraction as extraction

    for name in ("aa1", "aa2", "b1", "b2", "b3"):
        _clip(tmp_path / "videos" / f"{name}.mp4", seed=len(name) % 2)
    monkeypatch.setattr(decode_pool, "decode_video", functools.partial(die_on, "aa", None))
    monkeypatch.setattr(extraction, "encode_batch", _slow_down(extraction.encode_batch, 0.2))
    result = extract_directory_embeddings(tmp_path / "videos", tmp_path / "out", model=model, num_workers=workers,
                                          parallel_batches=1, progress=False)
    assert (result["processed"], result["failed"]) == (3, 2), result
    assert sorted(e["video_path"].rsplit("/", 1)[1] for e in result["errors"]) == ["aa1.mp4", "aa2.mp4"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_embedding.npy")) == [
        "b1_embedding.npy", "b2_embedding.npy", "b3_embedding.npy"]


def test_workers_that_cannot_run_at_all_are_one_line_error(tmp_path, monkeypatch):
    """Every worker dies, also on a probe: the pool says so in one line (no traceback in the CLI)."""
    import modules.decode_pool as decode_pool

    monkeypatch.setattr(decode_pool, "decode_video", functools.partial(die_on, "", None))
    monkeypatch.setattr(decode_pool, "_probe_worker", _die_now)
    with pytest.raises(decode_pool.DecodeWorkersError, match="cannot run here: rerun with --num_workers 0"):
        list(decode_pool.decode_stream([str(_clip(tmp_path / f"v{i}.mp4")) for i in range(4)],
                                       _small_config(), num_workers=1))


def test_batch_retrieval_survives_a_decode_worker_killed_mid_run(model, tmp_path, monkeypatch):
    """Batch retrieval with a slow consumer: the victim's pairs are errors, every other pair succeeds."""
    import modules.decode_pool as decode_pool
    from modules.retrieval import batch_retrieve_events

    paths = [str(_clip(tmp_path / f"r{i}.mp4", seed=i % 2)) for i in range(5)]
    monkeypatch.setattr(decode_pool, "decode_video", functools.partial(die_on, "r2.", None))
    monkeypatch.setattr(model, "encode_videos", _slow_down(model.encode_videos, 0.4))
    results = batch_retrieve_events([{"video_path": p, "query": "a clip"} for p in paths], model=model, num_workers=2)
    assert [r["status"] for r in results] == ["success", "success", "error", "success", "success"], results
    assert "crashed" in results[2]["error"]


# ----------------------------------------------------------------------------- item 7: non-finite numbers


def _with_huge(model, name):
    """A copy of ``model`` with tensor ``name`` set to 1e30 (what a tampered checkpoint gives)."""
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        dict(broken.named_parameters())[name].fill_(1e30)
    return broken


@pytest.fixture(scope="module")
def huge_model(model):
    """1e30 in a LayerNorm: every video forward gives NaN."""
    return _with_huge(model, "clip.visual.transformer.resblocks.0.ln_1.weight")


@pytest.mark.parametrize("tensor", ["ln", "clip.visual.proj"])
def test_nan_embeddings_are_failures_not_outputs(huge_model, model, tmp_path, tensor):
    """NaN (LayerNorm) or an overflow that normalises to a zero vector (projection): failed, nothing written."""
    for i in range(2):
        _clip(tmp_path / "videos" / f"n{i}.mp4", seed=i)
    broken = huge_model if tensor == "ln" else _with_huge(model, tensor)
    result = _run(tmp_path / "videos", tmp_path / "out", broken, summary=True)
    assert (result["processed"], result["failed"]) == (0, 2), result
    assert all("non-finite" in e["error"] for e in result["errors"])
    assert not list((tmp_path / "out").glob("*_embedding.*"))


def test_nan_scores_are_errors_never_printed_as_results(huge_model, tmp_path):
    from modules.retrieval import batch_retrieve_events, format_inference_block

    path = str(_clip(tmp_path / "q.mp4"))
    results = batch_retrieve_events([{"video_path": path, "query": "a dog"}], model=huge_model)
    assert results[0]["status"] == "error" and "non-finite" in results[0]["error"], results
    block = format_inference_block(results[0])
    assert not [line for line in block.splitlines() if ", score " in line or line.startswith("Relevant frames")]
    assert "Error: " in block


def test_search_leaves_out_non_finite_embeddings(model, tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    np.save(out / "good_embedding.npy", np.ones(model.embed_dim, np.float32))
    np.save(out / "bad_embedding.npy", np.full(model.embed_dim, np.nan, np.float32))
    found = search_embeddings(model, out, "a dog", top_k=5)
    assert [r["name"] for r in found["results"]] == ["good"]
    assert all(np.isfinite(r["score"]) for r in found["results"])


def test_a_zero_text_embedding_is_no_score(model, tmp_path):
    from modules.retrieval import batch_retrieve_events

    broken = _with_huge(model, "clip.text_projection")  # overflows, normalises to zeros: score 0.0 for all
    path = str(_clip(tmp_path / "q.mp4"))
    assert batch_retrieve_events([{"video_path": path, "query": "a dog"}], model=broken)[0]["status"] == "error"
    (tmp_path / "emb").mkdir()
    np.save(tmp_path / "emb" / "good_embedding.npy", np.ones(model.embed_dim, np.float32))
    with pytest.raises(UsageError, match="non-finite"):
        search_embeddings(broken, tmp_path / "emb", "a dog")


# ----------------------------------------------------------------------------- item 16: bounded text forwards


def test_batch_retrieval_encodes_queries_in_bounded_chunks(model, tmp_path, monkeypatch):
    """Many queries about one video go through the text encoder TEXT_CHUNK at a time, same scores."""
    import modules.retrieval as retrieval

    path = str(_clip(tmp_path / "many.mp4"))
    pairs = [{"video_path": path, "query": f"query number {i}"} for i in range(7)]
    sizes = []
    encode_text = model.encode_text

    def counting(texts):
        sizes.append(len(texts))
        return encode_text(texts)

    monkeypatch.setattr(model, "encode_text", counting)
    whole = retrieval.batch_retrieve_events(pairs, model=model)
    assert sizes == [7]  # TEXT_CHUNK (256) covers them at once
    sizes.clear()
    monkeypatch.setattr(retrieval, "TEXT_CHUNK", 3)
    chunked = retrieval.batch_retrieve_events(pairs, model=model)
    assert sizes == [3, 3, 1]
    for a, b in zip(whole, chunked):
        assert a["frames"] == b["frames"] and np.allclose(a["scores"], b["scores"], atol=1e-5)


# ----------------------------------------------------------------------------- item 8: truncated files


def test_truncated_files_are_embedded_with_a_warning_in_the_summary(model, tmp_path):
    """A cut-off faststart mp4 / mkv / webm opens and is embedded from its readable part; the
    summary row says it is shorter than the container declares. A complete file has no warning."""
    from modules.video_sampler import sample_video
    from tests.video_factory import write_truncated

    videos = tmp_path / "videos"
    videos.mkdir()
    for ext, options, codec in (("mp4", {"movflags": "+faststart"}, None), ("mkv", None, None),
                                ("webm", None, "libvpx-vp9")):
        source = write_video(tmp_path / f"source.{ext}", 60, fps=12, size=(48, 32), gop=4, codec=codec,
                             container_options=options)
        write_truncated(source, videos / f"cut_{ext}.{ext}", keep_fraction=0.5)
    shutil.copy(tmp_path / "source.mkv", videos / "whole.mkv")
    assert sample_video(tmp_path / "source.mp4", num_segments=4, size=32).warning is None
    _run(videos, tmp_path / "out", model, summary=True)
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "extraction_summary.json").read_text())["videos"]}
    assert rows["whole"]["status"] == "success" and rows["whole"]["warning"] is None
    for ext in ("mp4", "mkv", "webm"):
        row = rows[f"cut_{ext}"]
        assert row["status"] == "success" and "truncated" in row["warning"] and "declares" in row["warning"], row



# ----------------------------------------------------------------------------- tampered JSON outputs

#: what a user (or a broken disk) may leave in a JSON file this project wrote
_HOSTILE_JSON = {"deep": b"[" * 100000, "not_utf8": b'{"name": "\xff\xfe"}'}


def _spoil(path, kind):
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # a reader that opens it without O_NONBLOCK waits for a writer forever
    else:
        path.write_bytes(_HOSTILE_JSON[kind])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["deep", "not_utf8", "fifo"])
def test_a_tampered_meta_record_means_the_video_is_recomputed(model, tmp_path, kind):
    """A ``.<name>.meta.json`` nested 100000 levels deep crashed the rerun with a RecursionError."""
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model)
    _spoil(out / ".a.meta.json", kind)
    again = _run(videos, out, model)
    assert (again["processed"], again["skipped"], again["failed"]) == (1, 1, 0)
    assert json.loads((out / ".a.meta.json").read_text())["video_path"].endswith("a.mp4")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["deep", "not_utf8", "fifo"])
def test_a_tampered_consolidated_index_is_a_one_line_error(model, tmp_path, kind):
    """``embeddings_index.json`` nested 100000 levels deep crashed the search with a RecursionError;
    a FIFO there is no index (the documented fallback on the per-video files)."""
    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _run(videos, out, model, consolidated=True)
    _spoil(out / "embeddings_index.json", kind)
    if kind == "fifo":  # not a regular file: no consolidated index, the per-video files are searched
        assert search_embeddings(model, out, "a red circle")["source"] == "per-video files"
        return
    with pytest.raises(UsageError) as err:
        search_embeddings(model, out, "a red circle")
    assert "embeddings_index.json" in str(err.value) and "--consolidated" in str(err.value)
    assert one_line(err.value) == str(err.value)


def test_tampered_json_outputs_are_unreadable_files_everywhere(model, tmp_path):
    """The model record, per-video JSON embedding, summary and library manifest: a deep file is
    what an unreadable one is at that place (skipped, fallback, or a one-line LibraryError)."""
    from modules.library import LibraryError, VideoLibrary
    from modules.library_builder import index_extraction_folder, recorded_model
    from modules.writers import read_model_record
    from unified_model import model_fingerprint

    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model, save_format="both", consolidated=True, summary=True)
    fingerprint = model_fingerprint(model)
    assert read_model_record(str(out), fingerprint) is not None
    _spoil(next(out.glob(".*.model.json")), "deep")
    assert read_model_record(str(out), fingerprint) is None
    _spoil(out / "embeddings_index.json", "deep")  # falls back on the summary
    assert recorded_model(str(out))["fingerprint"] == fingerprint
    (out / "embeddings_index.json").unlink()
    (out / "embeddings.npy").unlink()
    _spoil(out / "b_embedding.json", "deep")  # b's path is unknown now: b is not indexed
    summary = index_extraction_folder(str(out))
    assert (summary["added"], summary["failed"]) == (1, 1)
    names, *_ = load_embedding_index(out)  # as with any unreadable per-video file: skipped with a warning
    assert names == ["a"]
    _spoil(out / "library" / "manifest.json", "deep")
    with pytest.raises(LibraryError, match="manifest"):
        VideoLibrary.open(out / "library")
