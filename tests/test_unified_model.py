"""The unified model on random ViT-B/32 weights made here (no hub): numbers, not smoke."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from config import ConfigError, from_dict
from modules.module_clip import random_state_dict, register_cpu_sdpa_flops
from modules.tempme_encoder import merge_trace
from tests.video_factory import write_video
from unified_model import CheckpointError, UnifiedTempMeSTOPModel, create_unified_model

register_cpu_sdpa_flops()  # this file counts FLOPs, attention included

torch.set_num_threads(2)

NO_PROMPTS = {"temporal_prompt": "none", "spatial_prompt": "none"}
NO_MERGING = {"merge_frame_num": "", "merge_layer": [], "tome_r": 0}


def _config(max_frames=12, num_segments=None, tempme=None, stop=None, **top):
    return from_dict({
        "tempme": dict(tempme or {}),
        "stop": dict(stop or {}),
        "max_frames": max_frames,
        "num_segments": num_segments or max_frames,
        "clip_weights": "random",
        **top,
    })


@pytest.fixture(scope="module")
def clip_state():
    return random_state_dict("ViT-B/32", seed=0)


@pytest.fixture(scope="module")
def default_model(clip_state):
    """Default design: 32 -> 12 frames, prompts on, meanP."""
    torch.manual_seed(0)
    return UnifiedTempMeSTOPModel(_config(num_segments=32), clip_state).eval()


def _frames(batch, num, seed=0, size=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num, 3, size, size, generator=g)


def _video_gmacs(model, frames):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_videos(frames)
    return counter.get_total_flops() / 2 / 1e9


def test_identity_when_lora_zero_merging_off_prompts_off(clip_state):
    """LoRA B = 0, no merging, no prompts, N == F: frame features are plain CLIP's."""
    model = UnifiedTempMeSTOPModel(_config(max_frames=4, tempme=NO_MERGING, stop=NO_PROMPTS), clip_state).eval()
    assert model.tempme.lora is not None and float(model.tempme.lora[0].lora_a.detach().abs().sum()) > 0
    frames = _frames(2, 4)
    with torch.no_grad():
        ours = model.encode_videos(frames).frame_features
        plain = F.normalize(model.clip.encode_image(frames.flatten(0, 1)), dim=-1).view(2, 4, -1)
    assert (ours - plain).abs().max().item() < 1e-5
    text = ["a dog runs on the beach", "two people talk"]
    with torch.no_grad():
        ours_t = model.encode_text(text)
        from modules.tokenization_clip import tokenize
        plain_t = F.normalize(model.clip.encode_text(tokenize(text)), dim=-1)
    assert (ours_t - plain_t).abs().max().item() < 1e-5


def test_merged_lora_equals_unmerged(clip_state):
    torch.manual_seed(1)
    model = UnifiedTempMeSTOPModel(_config(max_frames=12, num_segments=16), clip_state).eval()
    with torch.no_grad():
        for lora in list(model.tempme.lora) + list(model.text_lora):
            lora.lora_b.normal_(std=0.02)
    frames = _frames(1, 16, seed=3)
    with torch.no_grad():
        before_v = model.encode_videos(frames).video_embeddings
        before_t = model.encode_text(["a red car"])
        model.merge_lora()
        after_v = model.encode_videos(frames).video_embeddings
        after_t = model.encode_text(["a red car"])
    assert model.lora_merged
    assert (before_v - after_v).abs().max().item() < 1e-5
    assert (before_t - after_t).abs().max().item() < 1e-5
    # LoRA really changed the function (the test would be empty otherwise).
    plain = UnifiedTempMeSTOPModel(_config(max_frames=12, num_segments=16), clip_state).eval()
    with torch.no_grad():
        assert (plain.encode_text(["a red car"]) - before_t).abs().max().item() > 1e-3
    with pytest.raises(CheckpointError):
        model.checkpoint_payload()


def test_default_schedule_token_count_and_gmacs(clip_state):
    """TempMe's published numbers: 1 x 97 tokens (12 CLS + 85), 34.7 vs 52.9 GMACs (B/32, 12 frames)."""
    model = UnifiedTempMeSTOPModel(_config(max_frames=12, stop=NO_PROMPTS), clip_state).eval()
    trace = merge_trace(model.tempme.schedule, 12)
    assert trace[-1] == (11, 1, 97)
    frames = _frames(1, 12)
    with torch.no_grad():
        tokens = model.clip.visual.embed(frames.flatten(0, 1)).unsqueeze(0)
        cls, state = model.tempme(model.clip.visual, tokens)
    assert tuple(state.x.shape) == (1, 97, 768)
    assert state.protected == 12 and cls.shape == (1, 12, 768)
    # The CLS tokens really are the frames' own: sizes of protected tokens stay 1.
    assert torch.all(state.size[0, :12] == 1)

    ours = _video_gmacs(model, frames)
    # Plain CLIP = the same encoder with merging off (identical to CLIP, see the identity test);
    # measured through it because flop_counter misses SDPA's CPU kernel inside module_clip.
    plain_model = UnifiedTempMeSTOPModel(_config(max_frames=12, tempme=NO_MERGING, stop=NO_PROMPTS), clip_state).eval()
    plain = _video_gmacs(plain_model, frames)
    print(f"\nGMACs per 12-frame video: TempMe {ours:.2f}, plain CLIP {plain:.2f}")
    assert abs(ours - 34.7) / 34.7 < 0.03
    assert abs(plain - 52.9) / 52.9 < 0.03


def test_gmacs_with_prompts(default_model):
    """Prompts on (32 sampled frames -> 12): cost reported, and the prompt branches stay cheap."""
    gmacs = _video_gmacs(default_model, _frames(1, 32))
    print(f"\nGMACs per video, default design (32 frames sampled, prompts on): {gmacs:.2f}")
    # 32-frame patch embedding (3.7) + encoder (~33.5) + prompts must stay well under plain CLIP.
    assert 34.7 < gmacs < 45.0


def test_trainable_counts_match_tempme_paper(default_model):
    counts = default_model.trainable_parameter_counts()
    assert counts["tempme"] == {
        "vision_lora": 294_912,
        "text_lora": 196_608,
        "clip_position_embeddings": 16_128,
        "total": 507_648,
    }
    assert counts["stop"]["temporal_prompts"] > 0 and counts["stop"]["spatial_prompts"] > 0
    assert counts["stop"]["head"] == 0  # meanP has no parameters
    assert counts["backbone"]["total"] == sum(p.numel() for p in default_model.clip.parameters())
    print("\ntrainable parameters:", counts)


def test_batch_independence(default_model):
    frames = _frames(3, 32, seed=5)
    with torch.no_grad():
        batched = default_model.encode_videos(frames)
        alone = default_model.encode_videos(frames[1:2])
    assert (batched.video_embeddings[1] - alone.video_embeddings[0]).abs().max().item() < 1e-5
    assert (batched.frame_features[1] - alone.frame_features[0]).abs().max().item() < 1e-5
    assert batched.groups[1] == alone.groups[0]


def test_untrained_prompts_stay_close_to_prompts_off(default_model, clip_state):
    off = UnifiedTempMeSTOPModel(_config(num_segments=32, stop=NO_PROMPTS), clip_state).eval()
    off.tempme.load_state_dict(default_model.tempme.state_dict())
    off.text_lora.load_state_dict(default_model.text_lora.state_dict())
    frames = _frames(2, 32, seed=7)
    with torch.no_grad():
        on_emb = default_model.encode_videos(frames).video_embeddings
        off_emb = off.encode_videos(frames).video_embeddings
    cosine = (on_emb * off_emb).sum(-1)
    print("\ncosine prompts on vs off (untrained):", cosine.tolist())
    assert torch.all(cosine > 0.99)
    assert torch.all(cosine < 1.0 - 1e-7)  # the prompts do act


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    return str(write_video(path, num_frames=60, fps=20, size=(96, 72)))


def test_retrieval_api(default_model, video_path):
    emb = default_model.extract_video_embedding(video_path)
    assert emb.shape == (512,) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb)) and abs(np.linalg.norm(emb) - 1) < 1e-5
    assert np.array_equal(emb, default_model.extract_video_embedding(video_path))

    scores, frames = default_model(video_path, "a black and white pattern")
    assert scores.shape == frames.shape and 1 <= len(frames) <= 12
    assert torch.all(scores[:-1] >= scores[1:])
    assert torch.all((frames >= 0) & (frames < 60))
    hits = default_model.retrieve(video_path, "a black and white pattern")
    assert [h.frame for h in hits] == frames.tolist()
    for h in hits:
        assert h.start_frame <= h.frame <= h.end_frame
        assert 0.0 <= h.start_time < h.end_time <= 3.0 + 1e-6
    assert default_model.retrieve_event(video_path, "a black and white pattern", top_k=3) == frames[:3].tolist()
    assert len(default_model.retrieve_event(video_path, "a black and white pattern")) == 5  # config.top_k
    with pytest.raises(ValueError):
        default_model.retrieve_event(video_path, "x", top_k=0)


def test_gradients_reach_every_trainable_tensor(clip_state):
    """One backward of the contrastive loss reaches every TempMe and STOP tensor.

    Zero-initialised tensors (LoRA B, the spatial prompter's output layer) would give the
    tensors before them an exactly zero gradient, so they are perturbed first.
    """
    torch.manual_seed(2)
    model = UnifiedTempMeSTOPModel(_config(max_frames=12, num_segments=16, stop={"sim_header": "seqTransf"}), clip_state)
    with torch.no_grad():
        for lora in list(model.tempme.lora) + list(model.text_lora):
            lora.lora_b.normal_(std=0.02)
        model.spatial_prompts.out_proj.weight.normal_(std=0.02)
    model.train()
    video = model.encode_videos(_frames(2, 16, seed=9)).video_embeddings
    text = model.encode_text(["a cat", "a truck"])
    logits = 100 * text @ video.t()
    labels = torch.arange(2)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    for group in ("tempme", "stop"):
        params = list(model.named_group_parameters(group))
        assert params
        for name, p in params:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert all(p.grad is None for _, p in model.named_group_parameters("backbone"))


def test_checkpoint_round_trip(tmp_path, clip_state, default_model):
    model = copy.deepcopy(default_model)
    with torch.no_grad():
        for p in model.tempme.parameters():
            p.add_(0.01)
    path = tmp_path / "model.pth"
    model.save_checkpoint(path)
    restored = create_unified_model(checkpoint=path, device="cpu", clip_weights="random")
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(tensor, dict(restored.named_parameters())[name].detach())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        create_unified_model(checkpoint=bad, device="cpu", clip_weights="random")
    other = tmp_path / "other.json"
    _config(num_segments=32, stop={"sim_header": "seqTransf"}).to_json(other)
    with pytest.raises(ConfigError, match="stop"):
        create_unified_model(config_path=other, checkpoint=path, device="cpu")
    # a checkpoint whose own config is bad: the message names the checkpoint (it did not)
    payload = torch.load(path, weights_only=True)
    payload["config"]["max_frames"] = "many"
    broken = tmp_path / "broken_config.pth"
    torch.save(payload, broken)
    with pytest.raises(ConfigError, match=r"max_frames: .*\(in .*broken_config\.pth\)"):
        create_unified_model(checkpoint=broken, device="cpu", clip_weights="random")
    # integer trainable tensors: refused, not cast silently (they were)
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["trainable"]))
    payload["trainable"][name] = payload["trainable"][name].long()
    ints = tmp_path / "int_tensors.pth"
    torch.save(payload, ints)
    with pytest.raises(CheckpointError, match=f"{name} holds torch.int64 values, not floating point"):
        create_unified_model(checkpoint=ints, device="cpu", clip_weights="random")


def test_video_size_must_match_weights(clip_state):
    with pytest.raises(ConfigError, match="video_size"):
        UnifiedTempMeSTOPModel(_config(video_size=112), clip_state)


def test_seqtransf_needs_enough_text_blocks():
    from modules.clip_archs import small_arch
    from modules.training import small_config_dict
    state = random_state_dict(small_arch(text_layers=2))
    with pytest.raises(ConfigError, match="stop.sim_header"):
        UnifiedTempMeSTOPModel(from_dict(small_config_dict(sim_header="seqTransf")), state)


def test_untrained_models_agree_across_builds(default_model, clip_state):
    """Untrained tensors come from a fixed seed: separate processes embed into one space."""
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    again = UnifiedTempMeSTOPModel(_config(num_segments=32), clip_state).eval()
    assert torch.equal(torch.get_rng_state(), state_before)  # global RNG untouched
    for (name, a), (_, b) in zip(default_model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    other = UnifiedTempMeSTOPModel(_config(num_segments=32), clip_state, init_seed=1)
    assert not torch.equal(other.temporal_prompts.base_prompts, again.temporal_prompts.base_prompts)


def test_group_spans_offset_shifts_seconds_only():
    """A long video's window passes its start as ``offset``: its groups' seconds move by it,
    frame numbers and timestamps do not (the one rule long_video and rank_hits share)."""
    from types import SimpleNamespace

    from unified_model import group_spans

    sampled = SimpleNamespace(frame_indices=np.array([3, 9, 15, 21], dtype=np.int64),
                              timestamps=np.array([0.1, 0.3, 0.5, 0.7]), duration=0.8)
    groups, reps = [[0, 1], [2], [3]], np.array([1, 2, 3])
    here = group_spans(groups, reps, sampled)
    there = group_spans(groups, reps, sampled, offset=100.0)
    np.testing.assert_allclose(here.start_times, [0.0, 0.4, 0.6])
    np.testing.assert_allclose(here.end_times, [0.4, 0.6, 0.8])
    np.testing.assert_array_equal(there.start_times, 100.0 + here.start_times)
    np.testing.assert_array_equal(there.end_times, 100.0 + here.end_times)
    for name in ("frames", "timestamps", "start_frames", "end_frames"):
        np.testing.assert_array_equal(getattr(there, name), getattr(here, name))
