"""The CUDA feed's pieces that need no device: sizing rules, buffer reuse, staging order."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from modules.device_feed import (
    MAX_DEVICE_BATCH,
    BufferPool,
    DeviceFeeder,
    DeviceLane,
    ForwardShapes,
    activation_bytes_per_video,
    choose_batch_size,
    decode_workers_to_keep_up,
    default_device_workers,
    device_batch_size,
    device_bytes_per_video,
    upload_bytes_per_video,
)
from modules.video_sampler import normalize_uint8
from tests.cli_utils import small_model
from tests.live_memory import LiveTensorBytes

MiB = 2**20
VIT_B32 = ForwardShapes(frames=32, size=224, tokens=50, width=768, groups=12, prompts=4)


@pytest.fixture(scope="module")
def model():
    return small_model()


# ----------------------------------------------------------------------------- memory rule


def test_shapes_of_model(model):
    shapes = ForwardShapes.of_model(model)
    cfg = model.config
    assert shapes == ForwardShapes(frames=cfg.num_segments, size=cfg.video_size,
                                   tokens=model.clip.visual.grid_size ** 2 + 1, width=model.clip.visual.width,
                                   groups=cfg.max_frames, prompts=cfg.stop.num_prompts)


def _peak(model, videos: int) -> int:
    cfg = model.config
    frames = torch.randint(0, 256, (videos, cfg.num_segments, 3, cfg.video_size, cfg.video_size), dtype=torch.uint8)
    with torch.inference_mode(), LiveTensorBytes() as meter:
        model.encode_videos(normalize_uint8(frames))
    return meter.peak


def test_activation_estimate_bounds_the_measured_peak(model):
    """The derived per-video bytes are an upper bound of what a forward holds, and not a loose one."""
    per_video = (_peak(model, 3) - _peak(model, 1)) / 2  # the slope: fixed costs cancel
    estimate = activation_bytes_per_video(ForwardShapes.of_model(model))
    assert per_video > 0
    assert per_video <= estimate <= 2.0 * per_video


def test_shapes_of_the_default_config():
    from config import UnifiedModelConfig

    assert ForwardShapes.of_config(UnifiedModelConfig()) == VIT_B32


def test_vit_b32_numbers():
    # 32 x 3 x 224 x 224 input, 2 x 32 x 50 x 768, 3 x 12 x 54 x 3072, 2 x 12 x 54 x 768 floats, x 1.25
    elements = 4_816_896 + 2_457_600 + 5_971_968 + 995_328
    assert activation_bytes_per_video(VIT_B32) == int(np.ceil(1.25 * elements * 4))
    assert upload_bytes_per_video(VIT_B32) == 4_816_896 * 5
    assert device_bytes_per_video(VIT_B32) == activation_bytes_per_video(VIT_B32) + upload_bytes_per_video(VIT_B32)
    # the tensor meter measured 57.5 MiB per video for ViT-B/32 (fp32, CPU): bounded, within 20%
    assert 57.5 * MiB <= activation_bytes_per_video(VIT_B32) <= 1.2 * 57.5 * MiB


def test_choose_batch_size():
    per_video = 100 * MiB
    # reserve = max(512 MiB, 10% of free): 10 GiB free -> 9 GiB usable -> 92 videos, capped
    assert choose_batch_size(10 * 2**30, per_video) == MAX_DEVICE_BATCH
    assert choose_batch_size(10 * 2**30, per_video, max_batch=500) == 92
    assert choose_batch_size(2 * 2**30, per_video) == (2 * 2**30 - 512 * MiB) // per_video == 15
    assert choose_batch_size(2 * 2**30, per_video, reserve_bytes=0) == 20
    assert choose_batch_size(100 * MiB, per_video) == 1  # nothing fits: still one video (it fails clearly)
    with pytest.raises(ValueError):
        choose_batch_size(2**30, 0)


def test_device_batch_size_needs_cuda(model):
    with pytest.raises(ValueError, match="CUDA"):
        device_batch_size(model)


# ----------------------------------------------------------------------------- decode workers


def test_decode_workers_to_keep_up():
    assert decode_workers_to_keep_up(0.1, 0.3, cpus=16) == 4  # ceil(1.25 * 3)
    assert decode_workers_to_keep_up(1.0, 0.3, cpus=16) == 1
    assert decode_workers_to_keep_up(0.01, 0.3, cpus=16) == 15  # one core feeds the device
    assert decode_workers_to_keep_up(0.01, 0.3, cpus=1) == 1
    with pytest.raises(ValueError):
        decode_workers_to_keep_up(0.0, 0.3, cpus=4)


def test_default_device_workers():
    assert default_device_workers(cpus=16) == 15
    assert default_device_workers(local_world=2, cpus=16) == 7
    assert default_device_workers(cpus=64) == 16
    assert default_device_workers(cpus=1) == 1
    assert default_device_workers(cpus=2) == 1


# ----------------------------------------------------------------------------- buffer pool


class FakeFence:
    """Stands in for a CUDA event: pending until completed or waited on."""

    def __init__(self, done: bool = False):
        self.done = done
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_pool_reuses_a_released_buffer():
    pool = BufferPool(capacity=2)
    a = pool.acquire(4, (2, 3))
    assert a.shape == (4, 2, 3) and a.dtype == torch.uint8 and not a.is_pinned()
    pool.release(a)
    b = pool.acquire(4, (2, 3))
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1
    pool.release(b)
    c = pool.acquire(3, (2, 3))  # a smaller (last) batch fits the same buffer
    assert c.data_ptr() == a.data_ptr() and pool.allocations == 1


def test_pool_never_hands_out_a_buffer_a_copy_still_reads():
    pool = BufferPool(capacity=2)
    a = pool.acquire(2, (5,))
    fence_a = FakeFence()
    pool.release(a, fence_a)
    b = pool.acquire(2, (5,))  # a's copy pending, room for one more
    assert b.data_ptr() != a.data_ptr() and pool.allocations == 2 and not fence_a.waited
    fence_b = FakeFence()
    pool.release(b, fence_b)
    fence_b.done = True  # the newer copy finished first
    c = pool.acquire(2, (5,))
    assert c.data_ptr() == b.data_ptr() and not fence_a.waited
    d = pool.acquire(2, (5,))  # both out (a pending, c held): wait for a's copy, then reuse it
    assert fence_a.waited and d.data_ptr() == a.data_ptr() and pool.allocations == 2
    assert pool.outstanding == 2
    with pytest.raises(RuntimeError, match="held"):  # a caller that never releases gets no third buffer
        pool.acquire(2, (5,))


def test_pool_replaces_a_buffer_of_another_shape():
    pool = BufferPool(capacity=1)
    a = pool.acquire(2, (5,))
    pool.release(a)
    b = pool.acquire(2, (6,))
    assert b.shape == (2, 6) and pool.allocations == 2 and pool.owned == 1 and not pool.free
    pool.release(b)
    c = pool.acquire(3, (6,))  # more rows than the buffer has: a new one
    assert c.shape == (3, 6) and pool.allocations == 3
    with pytest.raises(ValueError):
        BufferPool(capacity=0)


# ----------------------------------------------------------------------------- feeder and lane


def _videos(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8) for _ in range(count)]


def test_feeder_on_cpu_normalises_exactly_and_reuses_its_buffer():
    feeder = DeviceFeeder(torch.device("cpu"))
    assert feeder.stream is None and not feeder.pool.pin
    for seed in range(3):
        videos = _videos(3, seed)
        up = feeder.upload([torch.from_numpy(v) for v in videos[:2]] + [videos[2]])  # tensors or arrays
        assert up.ready is None
        assert torch.equal(feeder.take(up), normalize_uint8(np.stack(videos)))
    assert feeder.pool.allocations == 1


class RecordingFeeder(DeviceFeeder):
    def __init__(self, fail_on=None):
        super().__init__(torch.device("cpu"))
        self.calls = []
        self.fail_on = fail_on
        self.second_started = threading.Event()

    def upload(self, frames):
        self.calls.append(len(frames))
        if len(self.calls) == self.fail_on:
            raise RuntimeError("CUDA out of memory")
        if len(self.calls) >= 2:
            self.second_started.set()
        return super().upload(frames)


def test_lane_stages_the_next_batch_before_running_this_one():
    feeder = RecordingFeeder()
    seen = []

    def run(batch, frames):
        if batch[0] == 0:  # the first forward: the second batch must already be staging
            assert feeder.second_started.wait(10)
        seen.append((list(batch), None if frames is None else frames.shape[0]))
        return [f"done {i}" for i in batch]

    videos = _videos(5)
    lane = DeviceLane(feeder, run, frames_of=lambda i: videos[i])
    try:
        assert lane.submit([0, 1]) == []  # staged, nothing ran yet
        assert lane.submit([2, 3]) == ["done 0", "done 1"]
        time.sleep(0.05)  # the model waits for input in between
        assert lane.submit([4]) == ["done 2", "done 3"]
        assert lane.drain() == ["done 4"]
        assert lane.drain() == []
    finally:
        lane.close()
    assert seen == [([0, 1], 2), ([2, 3], 2), ([4], 1)]
    assert feeder.calls == [2, 2, 1]
    assert lane.idle_seconds >= 0.05 and lane.busy_seconds > 0 and 0 < lane.wait_share < 1


def test_lane_runs_a_batch_whose_staging_failed_without_frames():
    feeder = RecordingFeeder(fail_on=1)
    got = []
    lane = DeviceLane(feeder, lambda batch, frames: got.append(frames) or list(batch), frames_of=lambda i: _videos(1)[0])
    try:
        lane.submit(["a"])
        lane.submit(["b"])
        assert lane.drain() == ["b"]
    finally:
        lane.close()
    assert got[0] is None and got[1].shape == (1, 4, 3, 8, 8)
