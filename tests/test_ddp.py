"""DDP on CPU: two torchrun processes (gloo) train a few steps and end with identical weights.

Features are all-gathered with the local slice keeping its gradient and gradients are
summed over processes, so the two-process run also matches one process holding the whole
global batch (up to float summation order).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from modules.clip_archs import small_arch
from modules.module_clip import random_state_dict
from modules.training import small_config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")
SIZE = 32


def _write_config(tmp_path, name, clip_file):
    config = small_config_dict(SIZE, vision_layers=2, training=dict(
        datatype="synthetic", data_path=str(tmp_path / "data"), synthetic_num_videos=20, synthetic_val_videos=4,
        batch_size=4, num_epochs=1, max_steps=3, num_workers=0, checkpoint_dir=str(tmp_path / name),
        amp=False, tempme_lr=1e-2, stop_lr=1e-2, warmup_proportion=0.0))
    config["clip_weights"] = str(clip_file)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _run(cmd, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_identical_weights_and_equal_to_one_process(tmp_path):
    clip_file = tmp_path / "clip.pt"
    torch.save(random_state_dict(small_arch(SIZE, vision_width=64, vision_layers=2, text_width=64, text_layers=2)), clip_file)
    ddp_out, single_out = tmp_path / "ddp_out", tmp_path / "single_out"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
          _write_config(tmp_path, "ddp", clip_file), str(ddp_out), "joint"], ddp_out)
    r0, r1 = (torch.load(ddp_out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["step"] == r1["step"] == 3
    assert r0["state"].keys() == r1["state"].keys()
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), f"ranks differ on {name}"
    assert os.path.isfile(tmp_path / "ddp" / "last.pth")  # written once, by rank 0

    _run([sys.executable, WORKER, _write_config(tmp_path, "single", clip_file), str(single_out), "joint"], single_out)
    one = torch.load(single_out / "rank0.pt", weights_only=True)
    assert one["world_size"] == 1
    assert torch.allclose(one["losses"], r0["losses"], rtol=1e-4, atol=1e-5)
    # the gradient itself matches (Adam's updates would hide a wrong scale, the norm does not)
    assert torch.allclose(one["grad_norms"], r0["grad_norms"], rtol=1e-3)
    # the updates agree: Adam turns the float noise of near-zero gradients into full-size
    # steps on a few entries, so compare the whole update vector rather than every entry
    names = sorted(one["state"])
    start = torch.cat([one["initial"][n].flatten() for n in names])
    assert torch.equal(start, torch.cat([r0["initial"][n].flatten() for n in names]))
    update_one = torch.cat([one["state"][n].flatten() for n in names]) - start
    update_ddp = torch.cat([r0["state"][n].flatten() for n in names]) - start
    moved = float(update_one.norm())
    assert moved > 0 and float((update_one - update_ddp).norm()) < 0.02 * moved


def test_torchrun_device_honours_config_device(monkeypatch):
    """Issue 9 point 3: under torchrun, ``--device auto`` takes the config's ``device`` exactly
    as a single process does; "auto" there means this rank's GPU (cuda:LOCAL_RANK). CUDA and
    torchrun's environment are faked and the group's set-up is recorded, not run."""
    import torch.distributed as dist

    from config import from_dict
    from modules import distributed
    from modules.distributed import choose_device, detect_env, init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    joined, chosen = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)

    on_cpu, on_auto = from_dict({"device": "cpu"}), from_dict({"device": "auto"})
    env = detect_env()
    assert env.mode == "torchrun" and env.distributed and env.local_rank == 1
    assert choose_device("auto", on_cpu, env) == torch.device("cpu")
    assert choose_device("auto", on_auto, env) == torch.device("cuda", 1)
    assert choose_device("cpu", on_auto, env) == torch.device("cpu")  # an explicit --device wins

    env = init_distributed("auto", on_cpu)
    assert (env.device, env.backend, env.rank, env.world_size) == (torch.device("cpu"), "gloo", 1, 2)
    assert joined[-1][0] == "gloo" and joined[-1][1]["rank"] == 1 and chosen == []
    env = init_distributed("auto", on_auto)
    assert (env.device, env.backend) == (torch.device("cuda", 1), "nccl")
    assert joined[-1][0] == "nccl" and chosen == [torch.device("cuda", 1)]
    assert distributed.dist is dist  # the module's group calls are the ones faked here
