"""Where a process runs: rank and world (torchrun or ``--shard``), its device, the process
group, barriers, and the status files through which shards share their results.

One set of rules for extraction and training:

* :func:`detect_env` reads torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``
  (or takes an explicit ``--shard i --num_shards n`` share, which runs without a group).
* :func:`choose_device` resolves the device exactly as a single process does (``device``,
  or the config's ``device`` when "auto"); under torchrun a CUDA device becomes this
  rank's local GPU (``cuda:LOCAL_RANK``).
* :func:`init_distributed` joins the group (nccl on CUDA, gloo on CPU) when torchrun
  started the process; :func:`cleanup_distributed` leaves it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from modules.atomic_io import save_json_atomic
from modules.cli_support import UsageError
from modules.json_input import read_output_json

__all__ = ["DistEnv", "detect_env", "choose_device", "init_distributed", "cleanup_distributed", "barrier",
           "listing_signature", "publish_share", "read_shares"]

#: hidden folder inside an output folder holding one status file per shard
SHARD_DIR = ".extract_shards"


@dataclass
class DistEnv:
    """This process's place: ``rank`` of ``world_size`` (``local_rank`` of
    ``local_world_size`` on its machine), its device, and the group backend (None: no group).

    mode: "single", "torchrun" (a process group) or "shard" (an explicit share, no group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    local_world_size: int = 1
    mode: str = "single"
    owns_group: bool = False  # init_distributed created the group (cleanup destroys it)

    @property
    def distributed(self) -> bool:
        """Several processes in one process group (collectives and barriers work)."""
        return self.world_size > 1 and self.mode != "shard"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(shard: Optional[int] = None, num_shards: Optional[int] = None) -> DistEnv:
    """Rank and world from torchrun's environment, or the explicit share ``shard`` of ``num_shards``.

    Raises UsageError for a bad share or a share combined with torchrun. The device is
    left as CPU: :func:`choose_device` picks it.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if (shard is None) != (num_shards is None):
        raise UsageError("--shard and --num_shards go together")
    if shard is not None:
        if env_world > 1:
            raise UsageError("--shard/--num_shards cannot be combined with torchrun (it shards by rank already)")
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise UsageError(f"--shard must be in [0, --num_shards={num_shards}), got {shard}")
        return DistEnv(rank=shard, world_size=num_shards, mode="shard" if num_shards > 1 else "single")
    if env_world > 1:
        rank = int(os.environ.get("RANK", "0"))
        return DistEnv(rank=rank, world_size=env_world, mode="torchrun",
                       local_rank=int(os.environ.get("LOCAL_RANK", str(rank))),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(env_world))))
    return DistEnv()


def choose_device(device: Union[str, torch.device, None], config=None, env: Optional[DistEnv] = None) -> torch.device:
    """The device this process computes on: ``device``, or ``config.device`` when "auto"/None
    ("auto" there: CUDA when available); under torchrun CUDA means this rank's local GPU.

    Raises UsageError for a device this machine does not have.
    """
    from unified_model import resolve_model_device

    try:
        target = resolve_model_device(device, config)
    except (RuntimeError, ValueError) as err:
        raise UsageError(str(err)) from None
    if env is not None and env.distributed and target.type == "cuda":
        target = torch.device("cuda", env.local_rank)
    return target


def init_distributed(device: Union[str, torch.device, None] = "auto", config=None, *, shard: Optional[int] = None,
                     num_shards: Optional[int] = None, timeout: Optional[timedelta] = None,
                     share_cpu_threads: bool = False) -> DistEnv:
    """Detect this process's place, choose its device and join torchrun's group if any.

    Without torchrun (no WORLD_SIZE > 1) this is a single process (or an explicit shard) on
    the chosen device. ``share_cpu_threads``: on CPU, give each of the ranks on this machine
    an equal share of the cores. ``timeout``: for the group's collectives (default torch's).
    """
    env = detect_env(shard, num_shards)
    env.device = choose_device(device, config, env)
    if not env.distributed:
        return env
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
        env.backend = "nccl"
    else:
        env.backend = "gloo"
        if share_cpu_threads:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))
    if not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(env.backend, init_method="env://", rank=env.rank, world_size=env.world_size, **kwargs)
        env.owns_group = True
    return env


def cleanup_distributed(env: Optional[DistEnv] = None) -> None:
    """Leave the process group (no-op when there is none, or when ``env`` did not create it)."""
    if env is not None and not env.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank of the group (no-op without one)."""
    if not env.distributed:
        return
    if env.device.type == "cuda":
        dist.barrier(device_ids=[env.device.index or 0])
    else:
        dist.barrier()


# ----------------------------------------------------------------------------- shard status files


def listing_signature(rels: Sequence[str]) -> str:
    """A digest of the sorted listing: shards of different listings never merge."""
    digest = hashlib.sha1()
    for rel in rels:
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def _share_path(output_dir: str, rank: int, world: int) -> str:
    return os.path.join(output_dir, SHARD_DIR, f"shard-{rank:05d}-of-{world:05d}.json")


def publish_share(output_dir: str, env: DistEnv, signature: str, payload: Dict[str, Any]) -> None:
    """Write this shard's status file (``payload`` plus signature, rank and world)."""
    save_json_atomic(_share_path(output_dir, env.rank, env.world_size),
                     {"signature": signature, "rank": env.rank, "world": env.world_size, **payload}, indent=None)


def read_shares(output_dir: str, env: DistEnv, signature: str) -> Optional[List[Dict[str, Any]]]:
    """Every shard's status file for this listing, or None while some are missing."""
    statuses = []
    for rank in range(env.world_size):
        try:
            status = read_output_json(_share_path(output_dir, rank, env.world_size), "shard status file")
        except ValueError:
            return None
        if not isinstance(status, dict) or status.get("signature") != signature:
            return None
        statuses.append(status)
    return statuses
