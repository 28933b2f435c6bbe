"""Training evaluation (evaluate_split): numbers equal to their definition, decode failures and crashes."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from config import from_dict
from modules.clip_archs import small_arch
from modules.data import load_csv_split
from modules.distributed import DistEnv
from modules.metrics import retrieval_metrics
from modules.module_clip import random_state_dict
from modules.synthetic_data import generate_synthetic_dataset
from modules.tokenization_clip import tokenize_for_model
from modules.training import evaluate_split, small_config_dict, validation_loss
from modules.video_sampler import sample_video
from unified_model import create_unified_model

torch.set_num_threads(2)

SIZE = 32
BATCH = 4  # 6 validation videos: a full batch and a partial one
TEST_PID = os.getpid()


@pytest.fixture(scope="module")
def model():
    clip = random_state_dict(small_arch(SIZE, vision_width=64, vision_layers=2, text_width=64, text_layers=2))
    return create_unified_model(config=from_dict(small_config_dict(SIZE, vision_layers=2)), device="cpu",
                                clip_state_dict=clip)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    data = generate_synthetic_dataset(root, num_videos=10, num_val=6, seed=1, size=(SIZE, SIZE), num_frames=12)
    return load_csv_split("val", data.val_csv)


def _evaluate(model, split, num_workers, env=None):
    return evaluate_split(model, split, env or DistEnv(), BATCH, num_workers, contextlib.nullcontext)


@torch.no_grad()
def _reference(model, split, blank=(), rank=0, world_size=1):
    """The metrics by definition: this shard's videos in index order, BATCH per forward,
    centre-of-segment frames (``blank``: zero frames), captions in chunks of 4 * BATCH."""
    cfg = model.config
    dim = model.embed_dim
    videos = torch.zeros(len(split.videos), dim)
    shard = list(range(rank, len(split.videos), world_size))
    for start in range(0, len(shard), BATCH):
        ids = shard[start:start + BATCH]
        frames = torch.stack([
            torch.zeros(cfg.num_segments, 3, cfg.video_size, cfg.video_size) if i in blank
            else sample_video(split.videos[i], cfg.num_segments, cfg.video_size).frames for i in ids])
        videos[ids] = model.encode_videos(frames).video_embeddings.float()
    texts = torch.zeros(len(split.captions), dim)
    text_ids = list(range(rank, len(split.captions), world_size))
    for start in range(0, len(text_ids), 4 * BATCH):
        ids = text_ids[start:start + 4 * BATCH]
        tokens = tokenize_for_model([split.captions[t] for t in ids], cfg.max_words)
        texts[ids] = F.normalize(model.encode_text_tokens(tokens).float(), dim=-1)
    sim = texts @ videos.t()
    metrics = retrieval_metrics(sim, split.caption_video)
    metrics["loss"] = validation_loss(sim, split.caption_video, float(model.clip.logit_scale.exp()))
    return metrics


def _assert_same(got, want, failed):
    assert got["info"]["failed_videos"] == failed
    assert {k: got[k] for k in ("t2v", "v2t", "loss")} == {k: want[k] for k in ("t2v", "v2t", "loss")}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_metrics_equal_their_definition_bit_for_bit(model, split, num_workers):
    assert len(split.videos) == 6
    _assert_same(_evaluate(model, split, num_workers), _reference(model, split), failed=0)


def test_a_shard_encodes_only_its_videos_and_captions(model, split):
    env = DistEnv(rank=1, world_size=2, mode="shard")  # no process group: the other shard stays zero
    _assert_same(_evaluate(model, split, 0, env), _reference(model, split, rank=1, world_size=2), failed=0)


def test_an_undecodable_video_is_scored_from_blank_frames(model, split, tmp_path, caplog):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    broken = dataclasses.replace(split, videos=[*split.videos[:2], str(bad), *split.videos[3:]])
    with caplog.at_level(logging.ERROR):
        got = _evaluate(model, broken, 0)
    _assert_same(got, _reference(model, split, blank={2}), failed=1)
    assert "blank frames" in caplog.text and "bad.mp4" in caplog.text


def _sample_or_die(path, *args, **kwargs):
    """sample_video, except that a decode process SIGKILLs itself on the victim (a decoder crash)."""
    if "victim" in os.path.basename(str(path)) and os.getpid() != TEST_PID:
        os.kill(os.getpid(), 9)
    return sample_video(path, *args, **kwargs)


def test_a_decode_worker_killed_on_a_video_costs_only_that_video(model, split, tmp_path, monkeypatch):
    """The worker decoding video 1 dies every time: video 1 is failed (blank frames), the rest evaluated."""
    import modules.data as data
    import modules.decode_pool as decode_pool

    victim = tmp_path / "victim.mp4"
    shutil.copy(split.videos[1], victim)
    crashing = dataclasses.replace(split, videos=[split.videos[0], str(victim), *split.videos[2:]])
    for module in (data, decode_pool):  # wherever evaluation decodes (forked workers inherit the patch)
        monkeypatch.setattr(module, "sample_video", _sample_or_die, raising=False)
    got = _evaluate(model, crashing, 2)
    _assert_same(got, _reference(model, split, blank={1}), failed=1)
