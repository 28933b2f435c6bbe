"""The pieces of training that need no Trainer: loss, gradient sync, optimizer, lr schedule, RNG.

DESIGN.md section 6; :mod:`modules.training` explains the rules (parameter groups, weight
decay, phases, DDP loss) and its Trainer puts these pieces together.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tqdm import tqdm

from config import ConfigError, TrainingConfig
from modules.data import RetrievalSplit
from modules.decode_pool import DecodedVideo, decode_stream
from modules.distributed import DistEnv
from modules.metrics import retrieval_metrics
from modules.tokenization_clip import tokenize_for_model
from modules.video_sampler import normalize_uint8
from unified_model import UnifiedTempMeSTOPModel

__all__ = [
    "GROUPS",
    "MODE_GROUPS",
    "FROZEN",
    "Phase",
    "TrainingDiverged",
    "gather_with_local_grad",
    "all_reduce_grads",
    "broadcast_parameters",
    "contrastive_loss",
    "validation_loss",
    "evaluate_split",
    "uses_weight_decay",
    "group_learning_rates",
    "build_optimizer",
    "plan_phases",
    "lr_factor",
    "build_scheduler",
    "autocast_dtype",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
]

GROUPS = ("tempme", "stop", "backbone")
#: groups trained by each (non-sequential) mode; train_backbone adds "backbone"
MODE_GROUPS = {"joint": ("tempme", "stop"), "tempme_only": ("tempme",), "stop_only": ("stop",)}
#: never trained: the contrastive loss uses the loaded CLIP's temperature
FROZEN = ("clip.logit_scale",)
_NO_DECAY_NAMES = re.compile(r"(embedding|base_prompts|clip_pos)")

logger = logging.getLogger(__name__)


# ============================================================================ distributed


def gather_with_local_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """All-gather (B, D) features of every process -> (world*B, D) in rank order.

    The slice of this process is ``x`` itself (it keeps its gradient); the others are
    constants. Summing the resulting parameter gradients over processes gives the gradient
    of the global loss.
    """
    if not env.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[env.rank] = x
    return torch.cat(parts, dim=0)


def all_reduce_grads(params: Sequence[nn.Parameter], env: DistEnv) -> None:
    """Sum the gradients of ``params`` over processes (one flat buffer per dtype)."""
    if not env.distributed or not params:
        return
    by_dtype: Dict[torch.dtype, List[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def broadcast_parameters(model: UnifiedTempMeSTOPModel, env: DistEnv) -> None:
    """Start every process from rank 0's TempMe / STOP tensors (CLIP comes from the same file everywhere)."""
    if env.distributed:
        with torch.no_grad():
            for group in ("tempme", "stop"):
                for _, p in model.named_group_parameters(group):
                    dist.broadcast(p.data, src=0)


# ============================================================================ loss


def contrastive_loss(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE (CLIP4Clip's CrossEn on logits and logits^T).

    Args:
        text: (B, D) unit-norm caption embeddings; row i matches video i.
        video: (B, D) unit-norm video embeddings.
        logit_scale: scalar multiplier (exp of CLIP's logit_scale).

    Returns:
        (loss, t2v, v2t): the mean of both directions and each direction's loss.
    """
    logits = logit_scale * text.float() @ video.float().t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    t2v = F.cross_entropy(logits, labels)
    v2t = F.cross_entropy(logits.t(), labels)
    return (t2v + v2t) / 2, t2v, v2t


def validation_loss(sim: torch.Tensor, caption_video: Sequence[int], logit_scale: float) -> Dict[str, float]:
    """The contrastive loss of a whole validation split (several captions per video allowed).

    Args:
        sim: (num_captions, num_videos) cosine similarities.
        caption_video: video index of each caption.
        logit_scale: exp of CLIP's logit_scale, as in training.

    Returns:
        {"loss", "t2v", "v2t"}: t2v is the cross-entropy of each caption over all videos;
        v2t that of each video over all captions, averaged over its captions (each one a
        positive); loss is their mean, so one caption per video gives :func:`contrastive_loss`.
    """
    logits = logit_scale * sim.float()
    target = torch.as_tensor(list(caption_video), dtype=torch.long)
    t2v = F.cross_entropy(logits, target)
    log_p = logits.t().log_softmax(dim=1)  # (videos, captions)
    positive = torch.zeros_like(log_p, dtype=torch.bool)
    positive[target, torch.arange(len(target))] = True
    per_video = (log_p * positive).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    v2t = -per_video[positive.any(dim=1)].mean()
    return {"loss": float((t2v + v2t) / 2), "t2v": float(t2v), "v2t": float(v2t)}


def _decoded_batches(videos: Sequence[str], shard: Sequence[int], config, batch_size: int,
                     num_workers: int) -> Iterator[Tuple[List[int], List[DecodedVideo]]]:
    """``shard``'s videos decoded by the decode stage, ``batch_size`` at a time in shard order.

    Decodes finish in any order; a batch is handed out once all its videos are back, so the
    forwards (and the numbers) do not depend on which worker was quicker. A worker that dies
    costs only the video that kills it (a failed :class:`DecodedVideo`).
    """
    batches = [list(shard[i:i + batch_size]) for i in range(0, len(shard), batch_size)]
    done: Dict[str, DecodedVideo] = {}
    stream = decode_stream([videos[i] for i in shard], config, num_workers)  # split videos are unique
    try:
        for (path, *_), decoded in stream:
            done[path] = decoded
            while batches and all(videos[i] in done for i in batches[0]):
                ids = batches.pop(0)
                yield ids, [done.pop(videos[i]) for i in ids]
    finally:
        stream.close()


@torch.no_grad()
def evaluate_split(model: UnifiedTempMeSTOPModel, split: RetrievalSplit, env: DistEnv, batch_size: int,
                   num_workers: int, autocast: Callable[[], Any], progress: bool = False) -> Dict[str, Dict[str, float]]:
    """Retrieval metrics and loss of ``model`` on a split: {"t2v", "v2t", "loss", "info"}.

    Each process decodes its shard of the videos in ``num_workers`` decode processes (0:
    inline), encodes them ``batch_size`` per forward, and encodes its share of the captions;
    the embeddings are gathered, then every process ranks the full caption-by-video matrix.
    A video that fails to decode (or crashes its decoder) is scored from blank frames and
    counted in ``info["failed_videos"]``. ``autocast`` makes the context the forwards run in.
    """
    config, device = model.config, model.device
    shard = list(range(env.rank, len(split.videos), env.world_size))
    blank = torch.zeros(config.num_segments, 3, config.video_size, config.video_size, dtype=torch.uint8)
    video_parts, video_ids, failed = [], [], 0
    batches = _decoded_batches(split.videos, shard, config, max(1, batch_size), num_workers)
    with contextlib.closing(batches), tqdm(total=len(shard), desc="eval videos", disable=not progress,
                                           leave=False, dynamic_ncols=True) as bar:
        for ids, decoded in batches:
            for d in decoded:
                if not d.ok:
                    logger.error("evaluation video failed to decode, scored from blank frames: %s: %s", d.path, d.error)
            ok = torch.tensor([d.ok for d in decoded])
            # uint8 to the device, normalised there as extraction does; a failed video's frames are zeros after it
            frames = normalize_uint8(torch.stack([d.video.frames if d.ok else blank for d in decoded]).to(device))
            frames[~ok.to(device)] = 0
            with autocast():
                emb = model.encode_videos(frames).video_embeddings
            video_parts.append(emb.float().cpu())
            video_ids.extend(ids)
            failed += int((~ok).sum())
            bar.update(len(ids))
    text_ids = list(range(env.rank, len(split.captions), env.world_size))
    text_parts = []
    chunk = max(1, batch_size) * 4
    for i in range(0, len(text_ids), chunk):
        ids = text_ids[i:i + chunk]
        tokens = tokenize_for_model([split.captions[t] for t in ids], config.max_words).to(device)
        with autocast():
            emb = model.encode_text_tokens(tokens)
        text_parts.append(F.normalize(emb.float(), dim=-1).cpu())
    dim = model.embed_dim
    local = (video_ids, torch.cat(video_parts) if video_parts else torch.zeros(0, dim),
             text_ids, torch.cat(text_parts) if text_parts else torch.zeros(0, dim), failed)
    pieces = [local]
    if env.distributed:
        pieces = [None] * env.world_size
        dist.all_gather_object(pieces, local)
    videos = torch.zeros(len(split.videos), dim)
    texts = torch.zeros(len(split.captions), dim)
    failed = 0
    for vids, vemb, tids, temb, nfail in pieces:
        videos[vids] = vemb
        texts[tids] = temb
        failed += nfail
    sim = texts @ videos.t()
    metrics = retrieval_metrics(sim, split.caption_video)
    metrics["loss"] = validation_loss(sim, split.caption_video, float(model.clip.logit_scale.detach().exp()))
    metrics["info"] = {"videos": float(len(split.videos)), "captions": float(len(split.captions)),
                       "failed_videos": float(failed)}
    return metrics


class TrainingDiverged(RuntimeError):
    """The loss (or a trained tensor) stopped being finite: training stops, nothing is saved."""


# ============================================================================ optimisation


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for matrices / kernels; False for 1-D tensors and token-like tensors (see module doc)."""
    return param.dim() >= 2 and not _NO_DECAY_NAMES.search(name)


def _group_parameters(model: UnifiedTempMeSTOPModel, group: str) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_group_parameters(group) if n not in FROZEN]


def group_learning_rates(cfg: TrainingConfig) -> Dict[str, float]:
    """Base learning rate of each group."""
    backbone = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.tempme_lr * 0.1
    return {"tempme": cfg.tempme_lr, "stop": cfg.stop_lr, "backbone": backbone}


def build_optimizer(model: UnifiedTempMeSTOPModel, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with a (decay, no-decay) parameter group per model group.

    Every group the run can ever train is present from the start (frozen ones simply get
    no gradient), so the optimizer's layout is the same in every phase and on resume.
    Each param group carries ``group`` ("tempme" | "stop" | "backbone") and ``name``.
    """
    lrs = group_learning_rates(cfg)
    groups = ["tempme", "stop"] + (["backbone"] if cfg.train_backbone else [])
    param_groups = []
    for group in groups:
        named = _group_parameters(model, group)
        for decay in (True, False):
            params = [p for n, p in named if uses_weight_decay(n, p) == decay]
            if params:
                param_groups.append({
                    "params": params,
                    "lr": lrs[group],
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "group": group,
                    "name": f"{group}/{'decay' if decay else 'no_decay'}",
                })
    if not param_groups:
        raise ConfigError("training.training_mode", "the model has no trainable tensors (LoRA off and prompts off?)")
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-6)


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one set of trainable groups and its own lr schedule.

    Epochs [first_epoch, end_epoch) and optimizer steps [start_step, start_step + num_steps).
    """

    name: str  # "joint" | "tempme" | "stop"
    groups: Tuple[str, ...]
    first_epoch: int
    end_epoch: int
    start_step: int
    num_steps: int


def plan_phases(cfg: TrainingConfig, mode: str, steps_per_epoch: int) -> List[Phase]:
    """The phases of a run (one, or two for sequential), capped at ``cfg.max_steps``."""
    total = cfg.num_epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    extra = ("backbone",) if cfg.train_backbone else ()
    if mode == "sequential":
        problem = cfg.sequential_problem()  # --mode sequential may come after the config was read
        if problem is not None:
            raise ConfigError(f"training.{problem[0]}", problem[1])
        split = cfg.tempme_phase_epochs
        first = min(split * steps_per_epoch, total)
        phases = [
            Phase("tempme", ("tempme",) + extra, 0, split, 0, first),
            Phase("stop", ("stop",) + extra, split, cfg.num_epochs, first, total - first),
        ]
        return [p for p in phases if p.end_epoch > p.first_epoch]
    if mode not in MODE_GROUPS:
        raise ConfigError("training.training_mode", f"unknown mode {mode!r}")
    name = "joint" if mode == "joint" else MODE_GROUPS[mode][0]
    return [Phase(name, MODE_GROUPS[mode] + extra, 0, cfg.num_epochs, 0, total)]


def lr_factor(step: int, phases: Sequence[Phase], warmup_proportion: float) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based).

    Within a phase of S steps: linear warmup over W = int(warmup_proportion * S) steps
    ((k+1)/(W+1)), then cosine from 1 towards 0 over the remaining steps.
    """
    phase = phases[-1]
    for p in phases:
        if step < p.start_step + p.num_steps:
            phase = p
            break
    local = step - phase.start_step
    warmup = int(warmup_proportion * phase.num_steps)
    if local < warmup:
        return (local + 1) / (warmup + 1)
    progress = (local - warmup) / max(1, phase.num_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, phases: Sequence[Phase], warmup_proportion: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`lr_factor` to every param group."""
    phases = list(phases)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, phases, warmup_proportion))


def autocast_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype:
    """The dtype of ``training.amp_dtype`` on ``device``: auto = bf16 on CPU, fp16 on CUDA."""
    if cfg.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.float16 if cfg.amp_dtype == "fp16" else torch.bfloat16


# ============================================================================ RNG state


def capture_rng_state() -> Dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and plain lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
