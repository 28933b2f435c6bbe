"""Integrity of what extraction leaves on disk and what search trusts (no silent wrong answers)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from modules.cli_support import UsageError
from modules.extraction import extract_directory_embeddings
from modules.retrieval import load_embedding_index, search_embeddings
from modules.video_listing import unique_names
from tests.cli_utils import SMALL_CONFIG, small_model
from tests.video_factory import write_video

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
    import modules.writers as writers

    videos, out = tmp_path / "v", tmp_path / "out"
    _clip(videos / "a.mp4", 8)
    _clip(videos / "b.mp4", 10, seed=1)
    _run(videos, out, model, consolidated=True)
    _clip(videos / "b.mp4", 16, size=(64, 40), seed=3)  # b changes: same rows, other numbers
    real = writers.save_json_atomic

    def killed(path, obj, *args, **kwargs):
        if os.path.basename(path) == "embeddings_index.json":
            raise KeyboardInterrupt
        return real(path, obj, *args, **kwargs)

    monkeypatch.setattr(writers, "save_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(videos, out, model, consolidated=True, overwrite=True)
    monkeypatch.setattr(writers, "save_json_atomic", real)
    with pytest.raises(UsageError, match="--consolidated"):
        load_embedding_index(out)


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
