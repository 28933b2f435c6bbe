"""CUDA-only checks (marker ``cuda``: skipped without a GPU; ``benchmarks/gpu_check.py`` runs them).

Random ViT-B/32 weights in the real shapes; each test takes seconds on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from config import UnifiedModelConfig
from modules.device_feed import (
    DeviceFeeder,
    ForwardShapes,
    activation_bytes_per_video,
    choose_batch_size,
    device_batch_size,
    device_bytes_per_video,
)
from modules.video_sampler import normalize_uint8

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def full_float32_convolutions():
    """cuDNN convolutions in TF32 (torch's default) would round the prompt convolutions to
    10-bit mantissas; the CPU comparisons here need float32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def state():
    from modules.module_clip import random_state_dict

    return random_state_dict("ViT-B/32", seed=0)


def _model(state, precision: str = "fp32", device: str = "cuda"):
    from unified_model import create_unified_model

    return create_unified_model(config=UnifiedModelConfig(clip_weights="random", precision=precision), device=device,
                                clip_state_dict=state, merge_lora=True)


def _frames(videos: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (videos, 32, 3, 224, 224), dtype=torch.uint8, generator=gen)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


def test_fp32_on_cuda_matches_cpu(state):
    frames = normalize_uint8(_frames(2))
    with torch.inference_mode():
        cpu = _model(state, device="cpu").encode_videos(frames)
        cuda = _model(state).encode_videos(frames.cuda())
    assert cuda.video_embeddings.device.type == "cuda"
    assert _cosines(cpu.video_embeddings, cuda.video_embeddings).min() > 0.99999
    assert cpu.groups == cuda.groups


def test_fp16_forward_matches_fp32(state):
    frames = normalize_uint8(_frames(4, seed=1)).cuda()
    with torch.inference_mode():
        fp32 = _model(state).encode_videos(frames)
        fp16 = _model(state, "fp16").encode_videos(frames)
    assert torch.isfinite(fp16.video_embeddings).all()
    assert _cosines(fp32.video_embeddings, fp16.video_embeddings).min() >= 0.999
    same = [i for i in range(4) if fp32.groups[i] == fp16.groups[i]]
    assert same, "fp16 changed every video's frame groups"
    for i in same:
        assert _cosines(fp32.frame_features[i], fp16.frame_features[i]).min() >= 0.99


def test_pinned_non_blocking_upload_normalises_exactly():
    feeder = DeviceFeeder(torch.device("cuda"))
    assert feeder.pool.pin and feeder.stream != torch.cuda.current_stream()
    for seed in range(4):
        videos = _frames(3, seed)
        upload = feeder.upload(list(videos))
        staged, fence = feeder.pool.busy[-1]
        assert staged.is_pinned() and fence is not None
        frames = feeder.take(upload)
        assert frames.device.type == "cuda" and frames.dtype == torch.float32
        assert torch.equal(frames.cpu(), normalize_uint8(videos))
    assert feeder.pool.allocations <= 2


def test_activation_rule_bounds_cuda_peak_and_chosen_batch_runs(state):
    for precision in ("fp32", "fp16"):
        model = _model(state, precision)
        peaks = {}
        for videos in (1, 3):
            frames = normalize_uint8(_frames(videos)).cuda()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.inference_mode():
                model.encode_videos(frames)
            torch.cuda.synchronize()
            peaks[videos] = torch.cuda.max_memory_allocated() - base + frames.numel() * 4
            del frames
        per_video = (peaks[3] - peaks[1]) / 2
        estimate = activation_bytes_per_video(ForwardShapes.of_model(model))
        assert 0 < per_video <= estimate, (precision, per_video, estimate)
    free, _ = torch.cuda.mem_get_info()
    batch = device_batch_size(model)
    assert batch == choose_batch_size(free, device_bytes_per_video(ForwardShapes.of_model(model)))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out = model.encode_videos(normalize_uint8(_frames(batch).cuda()))  # normalised on the device
    assert out.video_embeddings.shape[0] == batch
    assert torch.cuda.max_memory_allocated() - before <= free


def test_directory_extraction_on_cuda_matches_cpu(tmp_path):
    """The CUDA model stage (pinned uploads one batch ahead, batch from free memory) gives the CPU's embeddings."""
    import json

    from config import from_dict
    from modules.extraction import extract_directory_embeddings
    from tests.cli_utils import SMALL_CONFIG, small_model
    from tests.video_factory import write_video
    from unified_model import create_unified_model

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        write_video(videos / f"v{i}.mp4", 10 + 3 * i, size=(64, 48))
    cpu_out, cuda_out = tmp_path / "cpu", tmp_path / "cuda"
    extract_directory_embeddings(videos, cpu_out, model=small_model(), num_workers=1, progress=False)
    cuda_model = create_unified_model(config=from_dict(SMALL_CONFIG), device="cuda", merge_lora=True)
    result = extract_directory_embeddings(videos, cuda_out, model=cuda_model, num_workers=2, progress=False,
                                          summary=True)
    assert result["processed"] == 5 and result["failed"] == 0
    settings = json.loads((cuda_out / "extraction_summary.json").read_text())["settings"]
    assert settings["batch_size"] == device_batch_size(cuda_model) and 0 <= settings["model_wait_share"] <= 1
    for i in range(5):
        a = np.load(cpu_out / f"v{i}_embedding.npy")
        b = np.load(cuda_out / f"v{i}_embedding.npy")
        assert float(a @ b) > 0.9999, i
