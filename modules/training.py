"""Training the unified TempMe-STOP model (DESIGN.md section 6).

* Parameter groups: "tempme" (vision + text LoRA, clip position embeddings, lr
  ``tempme_lr``), "stop" (temporal / spatial prompt generators incl. base prompts and
  gates, seqTransf head, lr ``stop_lr``), "backbone" (CLIP, only with ``train_backbone``,
  lr ``backbone_lr``). CLIP's ``logit_scale`` is never trained.
* Weight decay (AdamW, ``weight_decay``) applies to matrices and convolution kernels
  (LoRA A/B, linear/conv weights); not to biases, norms, PReLU slopes, gates (all 1-D)
  nor to token-like tensors (position / token / class embeddings, base prompts, clip
  position embeddings), which decay would pull towards zero.
* Modes: joint trains tempme + stop; tempme_only / stop_only freeze the other group
  (requires_grad False: AdamW skips parameters without gradient, so they do not decay
  either); sequential = tempme_only for ``sequential_split`` epochs, then stop_only. Each
  phase has its own linear-warmup + cosine schedule over its steps.
* Loss: symmetric InfoNCE over L2-normalised text and video embeddings times
  exp(logit_scale). Under DDP the features of all processes are gathered (the local slice
  keeps its gradient), every process computes the loss of the whole global batch, and
  gradients are summed over processes: the update equals that of one process holding the
  whole batch.
* AMP: bf16 autocast on CPU, fp16 autocast + GradScaler on CUDA.
* Checkpoints: ``checkpoint_epoch_<n>.pth`` after every epoch, ``last.pth``, ``best.pth``
  (best validation text-to-video R@1). Each holds the model part of
  :meth:`UnifiedTempMeSTOPModel.checkpoint_payload` (loadable by create_unified_model) plus
  optimizer, scheduler, grad scaler, RNG states, epoch, batches done, step, mode and phase;
  ``--resume`` continues bit for bit (data order derives from (seed, epoch, index) only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import ConfigError, TrainingConfig, UnifiedModelConfig, from_dict
from modules.distributed import DistEnv, cleanup_distributed, init_distributed
from modules.data import (
    DataSplits,
    EpochBatchSampler,
    EvalVideos,
    TrainPairs,
    load_data_splits,
    make_eval_loader,
    make_train_loader,
)
from modules.metrics import format_metrics, retrieval_metrics
from modules.tokenization_clip import tokenize_for_model
from unified_model import (
    ARCHITECTURE_KEYS,
    CheckpointError,
    UnifiedTempMeSTOPModel,
    atomic_torch_save,
    check_architecture,
    create_unified_model,
    read_checkpoint,
    resolve_device,
)

__all__ = [
    "GROUPS",
    "MODE_GROUPS",
    "Phase",
    "DistEnv",
    "Trainer",
    "init_distributed",
    "cleanup_distributed",
    "gather_with_local_grad",
    "contrastive_loss",
    "uses_weight_decay",
    "build_optimizer",
    "plan_phases",
    "lr_factor",
    "build_scheduler",
    "capture_rng_state",
    "restore_rng_state",
    "small_config_dict",
    "ARCHITECTURE_KEYS",
]

logger = logging.getLogger(__name__)

GROUPS = ("tempme", "stop", "backbone")
#: groups trained by each (non-sequential) mode; train_backbone adds "backbone"
MODE_GROUPS = {"joint": ("tempme", "stop"), "tempme_only": ("tempme",), "stop_only": ("stop",)}
_FROZEN = ("clip.logit_scale",)
#: what a checkpoint/config architecture mismatch adds to its message
_TRAINED_WITH = "the checkpoint was trained with {key} = {value!r}"
_NO_DECAY_NAMES = re.compile(r"(embedding|base_prompts|clip_pos)")


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


def _all_reduce_grads(params: Sequence[nn.Parameter], env: DistEnv) -> None:
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


def _broadcast_parameters(model: UnifiedTempMeSTOPModel, env: DistEnv) -> None:
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


# ============================================================================ optimisation


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for matrices / kernels; False for 1-D tensors and token-like tensors (see module doc)."""
    return param.dim() >= 2 and not _NO_DECAY_NAMES.search(name)


def _group_parameters(model: UnifiedTempMeSTOPModel, group: str) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_group_parameters(group) if n not in _FROZEN]


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


# ============================================================================ small models


def small_config_dict(image_resolution: int = 64, vision_layers: int = 4, max_frames: int = 4, num_segments: int = 8,
                      sim_header: str = "meanP", prompts: bool = True, lora_dim: int = 4,
                      training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A config dict matching the CLIP of ``random_state_dict(small_arch(image_resolution, ...))``.

    Frames merge 2-2 (max_frames 4) at the last two vision blocks; ImgMe merges one token
    per frame before that; prompts at reduced width 32.
    """
    if max_frames != 4:
        raise ValueError("small_config_dict merges '2-2' and needs max_frames=4")
    return {
        "tempme": {"lora_dim": lora_dim, "merge_frame_num": "2-2", "merge_layer": [vision_layers - 2, vision_layers - 1],
                   "merge_token_proportion": [0.3, 0.1], "tome_r": 1},
        "stop": {"sim_header": sim_header, "temporal_prompt": "group2-2" if prompts else "none",
                 "spatial_prompt": "patch" if prompts else "none", "num_prompts": 2, "prompt_dim": 32, "spatial_eta": 4},
        "max_frames": max_frames,
        "num_segments": num_segments,
        "video_size": image_resolution,
        "max_words": 16,
        "clip_weights": "random",
        "clip_activation": "quick_gelu",  # what module_clip's random CLIP uses, also when saved to a file
        "device": "cpu",
        **({"training": training} if training is not None else {}),
    }


# ============================================================================ trainer


class Trainer:
    """One training run: data, model, optimizer, schedule, checkpoints, logs.

    Args:
        config: the full config; ``config.training`` holds the training settings
            (TrainingConfig defaults when absent).
        mode: overrides ``training.training_mode`` (joint | tempme_only | stop_only | sequential).
        clip_state_dict: CLIP weights (default: resolved from ``config.clip_weights``).
        resume: a training checkpoint (``last.pth`` ...) to continue exactly.
        init_checkpoint: trained model tensors to start from (optimizer state not restored).
        env: process placement (default: single process on ``config.device``).
        progress: tqdm bars on the main process.
        log_dir: TensorBoard folder (default ``checkpoint_dir/logs``); False = no logs.
    """

    def __init__(self, config: UnifiedModelConfig, mode: Optional[str] = None, *,
                 clip_state_dict: Optional[Dict[str, torch.Tensor]] = None, resume: Optional[str] = None,
                 init_checkpoint: Optional[str] = None, env: Optional[DistEnv] = None, progress: bool = True,
                 log_dir: Any = None, need_train: bool = True) -> None:
        self.config = config
        if config.training is None:
            config.training = TrainingConfig()
        self.cfg = cfg = config.training
        if mode is not None:
            cfg.training_mode = mode
        self.mode = cfg.training_mode
        self.env = env or DistEnv(device=resolve_device(config.device))
        self.device = self.env.device
        self.progress = progress and self.env.is_main
        if cfg.batch_size % self.env.world_size:
            raise ConfigError("training.batch_size", f"{cfg.batch_size} is not divisible by the {self.env.world_size} "
                                                     "processes (batch_size is the global batch)")
        _seed_everything(cfg.seed)

        # the main process reads (and for synthetic data, generates) the data first
        if self.env.distributed and not self.env.is_main:
            dist.barrier()
        self.data: DataSplits = load_data_splits(cfg, need_train=need_train, synthetic_size=_synthetic_size(config))
        if self.env.distributed and self.env.is_main:
            dist.barrier()
        self.train_set = TrainPairs(self.data.train, config.num_segments, config.video_size, config.max_words,
                                    cfg.seed, cfg.expand_sentences)
        micro_per_epoch = len(self.train_set) // cfg.batch_size
        self.steps_per_epoch = micro_per_epoch // cfg.grad_accum_steps
        if need_train and self.steps_per_epoch < 1:
            raise ConfigError("training.batch_size", f"batch_size {cfg.batch_size} x grad_accum_steps "
                              f"{cfg.grad_accum_steps} exceeds the {len(self.train_set)} training items")
        self.phases = plan_phases(cfg, self.mode, max(1, self.steps_per_epoch))
        self.total_steps = sum(p.num_steps for p in self.phases)

        self.model = create_unified_model(config=config, device=self.device, checkpoint=init_checkpoint,
                                          clip_state_dict=clip_state_dict, architecture_hint=_TRAINED_WITH)
        if init_checkpoint is not None:
            logger.info("initialised trainable tensors from %s", init_checkpoint)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, self.phases, cfg.warmup_proportion)
        cuda = self.device.type == "cuda"
        self.amp_dtype = (torch.float16 if cuda else torch.bfloat16) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=bool(cfg.amp and cuda))

        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epoch in progress (or next to start)
        self.batches_done = 0  # micro-batches of ``epoch`` already trained
        self.best_r1: Optional[float] = None
        self.last_metrics: Optional[Dict[str, Dict[str, float]]] = None
        self.history: List[Dict[str, float]] = []
        if resume is not None:
            self._load_training_checkpoint(resume)
        else:
            _broadcast_parameters(self.model, self.env)

        self.writer = None
        if self.env.is_main and log_dir is not False:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir or os.path.join(cfg.checkpoint_dir, "logs"))
        logger.info("training %s: %d train pairs (%d videos), %s val; %d steps/epoch, %d steps, phases %s",
                    self.mode, len(self.train_set), len(self.data.train.videos),
                    f"{len(self.data.val.videos)} videos" if self.data.val else "no",
                    self.steps_per_epoch, self.total_steps, [(p.name, p.num_steps) for p in self.phases])

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def phase_index(self, epoch: int) -> int:
        """Index in ``self.phases`` of the phase an epoch belongs to."""
        for i, p in enumerate(self.phases):
            if p.first_epoch <= epoch < p.end_epoch:
                return i
        return len(self.phases) - 1

    def apply_phase(self, phase: Phase) -> None:
        """requires_grad True exactly for the phase's groups (logit_scale always frozen)."""
        for group in GROUPS:
            for name, p in self.model.named_group_parameters(group):
                p.requires_grad_(group in phase.groups and name not in _FROZEN)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.clip.logit_scale.detach().exp()

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, batch: Dict[str, torch.Tensor]) -> Tuple[float, float, float]:
        frames = batch["frames"].to(self.device, non_blocking=True)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        with self._autocast():
            video = self.model.encode_videos(frames).video_embeddings
            text = self.model.encode_text_tokens(tokens)
        text = F.normalize(text.float(), dim=-1)
        video = gather_with_local_grad(video.float(), self.env)
        text = gather_with_local_grad(text, self.env)
        loss, t2v, v2t = contrastive_loss(text, video, self.logit_scale)
        self.scaler.scale(loss / self.cfg.grad_accum_steps).backward()
        return float(loss.detach()), float(t2v.detach()), float(v2t.detach())

    def _optimizer_step(self) -> float:
        params = self.trainable_parameters()
        _all_reduce_grads(params, self.env)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def group_lrs(self) -> Dict[str, float]:
        """Current learning rate of each optimizer group (first param group of each)."""
        out: Dict[str, float] = {}
        for pg in self.optimizer.param_groups:
            out.setdefault(pg["group"], pg["lr"])
        return out

    # ------------------------------------------------------------------ training
    def train(self, stop_at_step: Optional[int] = None) -> Dict[str, Any]:
        """Train until ``total_steps``; returns a summary (steps, last loss, metrics).

        stop_at_step: stop after this optimizer step as if interrupted (``last.pth`` is
        written so that ``resume`` continues exactly); used by tests.
        """
        cfg = self.cfg
        accum = cfg.grad_accum_steps
        micro_per_epoch = self.steps_per_epoch * accum
        if self.step >= self.total_steps:
            logger.info("nothing to do: step %d of %d already reached", self.step, self.total_steps)
            return self._summary()
        t0 = time.time()
        window: List[Tuple[float, float, float]] = []
        for epoch in range(self.epoch, cfg.num_epochs):
            phase = self.phases[self.phase_index(epoch)]
            self.apply_phase(phase)
            start = self.batches_done if epoch == self.epoch else 0
            self.epoch, self.batches_done = epoch, start
            sampler = EpochBatchSampler(len(self.train_set), cfg.batch_size, cfg.seed, epoch, num_batches=micro_per_epoch,
                                        start_batch=start, rank=self.env.rank, world_size=self.env.world_size)
            loader = make_train_loader(self.train_set, sampler, cfg.num_workers, pin_memory=self.device.type == "cuda")
            self.model.train()
            bar = tqdm(total=self.steps_per_epoch, initial=start // accum, disable=not self.progress,
                       desc=f"epoch {epoch + 1}/{cfg.num_epochs} [{phase.name}]", dynamic_ncols=True)
            interrupted = False
            for micro, batch in enumerate(loader, start=start):
                window.append(self._forward_backward(batch))
                if (micro + 1) % accum:
                    continue
                lrs = self.group_lrs()  # the rates this step uses (the scheduler moves them on)
                grad_norm = self._optimizer_step()
                self.step += 1
                self.batches_done = micro + 1
                loss, t2v, v2t = (float(np.mean([w[i] for w in window])) for i in range(3))
                window.clear()
                self.history.append({"step": self.step, "loss": loss, "grad_norm": grad_norm})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                self._log_step(loss, t2v, v2t, grad_norm, lrs)
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and self.batches_done < micro_per_epoch:
                    self.save("last")
                if self.step >= self.total_steps or (stop_at_step is not None and self.step >= stop_at_step):
                    interrupted = self.batches_done < micro_per_epoch
                    break
            bar.close()
            if interrupted:
                improved = False
                if self.step >= self.total_steps:  # max_steps reached mid-epoch: final evaluation
                    self._evaluate_and_track()
                    improved = self._track_best()
                self.save("last", *(["best"] if improved else []))
                return self._summary(time.time() - t0)
            # epoch complete
            self.epoch, self.batches_done = epoch + 1, 0
            final = self.step >= self.total_steps or self.epoch >= cfg.num_epochs
            if (self.epoch % cfg.eval_every == 0) or final:
                self._evaluate_and_track()
            # best R@1 is updated before saving, so every checkpoint of this epoch records it
            # (a resumed run must not overwrite best.pth with a worse model)
            epoch_name = [f"checkpoint_epoch_{self.epoch}"] if cfg.keep_checkpoints != 0 else []
            self.save(*epoch_name, "last", *(["best"] if self._track_best() else []))
            self._prune_epoch_checkpoints()
            if final or (stop_at_step is not None and self.step >= stop_at_step):
                break
        return self._summary(time.time() - t0)

    def _summary(self, seconds: float = 0.0) -> Dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps, "seconds": seconds,
                "loss": self.history[-1]["loss"] if self.history else None, "metrics": self.last_metrics,
                "best_r1": self.best_r1}

    def _log_step(self, loss: float, t2v: float, v2t: float, grad_norm: float, lrs: Dict[str, float]) -> None:
        if self.step % self.cfg.log_every and self.step != 1 and self.step != self.total_steps:
            return
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.step)
            self.writer.add_scalar("train/loss_t2v", t2v, self.step)
            self.writer.add_scalar("train/loss_v2t", v2t, self.step)
            self.writer.add_scalar("train/grad_norm", grad_norm, self.step)
            self.writer.add_scalar("train/epoch", self.epoch, self.step)
            for group, lr in lrs.items():
                self.writer.add_scalar(f"lr/{group}", lr, self.step)
        if self.env.is_main:
            lr_text = " ".join(f"{g} {lr:.2e}" for g, lr in lrs.items())
            logger.info("step %d/%d epoch %d: loss %.4f (t2v %.4f v2t %.4f) grad_norm %.3f lr %s",
                        self.step, self.total_steps, self.epoch + 1, loss, t2v, v2t, grad_norm, lr_text)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        """t2v / v2t R@1/5/10, MdR, MnR on the validation split (None without one)."""
        split = self.data.val
        if split is None:
            return None
        was_training = self.model.training
        self.model.eval()
        cfg, env = self.cfg, self.env
        dataset = EvalVideos(split.videos, self.config.num_segments, self.config.video_size)
        shard = list(range(env.rank, len(split.videos), env.world_size))
        loader = make_eval_loader(dataset, shard, cfg.eval_batch_size or cfg.batch_size, cfg.num_workers,
                                  pin_memory=self.device.type == "cuda")
        video_parts, video_ids, failed = [], [], 0
        for batch in tqdm(loader, desc="eval videos", disable=not self.progress, leave=False, dynamic_ncols=True):
            with self._autocast():
                emb = self.model.encode_videos(batch["frames"].to(self.device)).video_embeddings
            video_parts.append(emb.float().cpu())
            video_ids.extend(int(v) for v in batch["video"])
            failed += int((~batch["ok"]).sum())
        text_ids = list(range(env.rank, len(split.captions), env.world_size))
        text_parts = []
        chunk = max(1, cfg.eval_batch_size or cfg.batch_size) * 4
        for i in range(0, len(text_ids), chunk):
            ids = text_ids[i:i + chunk]
            tokens = tokenize_for_model([split.captions[t] for t in ids], self.config.max_words).to(self.device)
            with self._autocast():
                emb = self.model.encode_text_tokens(tokens)
            text_parts.append(F.normalize(emb.float(), dim=-1).cpu())
        dim = self.model.embed_dim
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
        metrics = retrieval_metrics(texts @ videos.t(), split.caption_video)
        metrics["info"] = {"videos": float(len(split.videos)), "captions": float(len(split.captions)),
                           "failed_videos": float(failed)}
        if was_training:
            self.model.train()
        return metrics

    def _evaluate_and_track(self) -> None:
        metrics = self.evaluate()
        if metrics is None:
            return
        self.last_metrics = metrics
        if self.env.is_main:
            logger.info("validation after step %d (epoch %d):\n%s", self.step, self.epoch, format_metrics(metrics))
        if self.writer is not None:
            for direction in ("t2v", "v2t"):
                for key, value in metrics[direction].items():
                    self.writer.add_scalar(f"val/{direction}_{key}", value, self.step)
            self.writer.flush()

    def _track_best(self) -> bool:
        """Record the last evaluation's text-to-video R@1 if it beats the best; whether it did."""
        if self.last_metrics is None:
            return False
        r1 = self.last_metrics["t2v"]["R1"]
        if self.best_r1 is not None and r1 <= self.best_r1:
            return False
        self.best_r1 = r1
        if self.env.is_main:
            logger.info("new best text-to-video R@1 %.2f at step %d", r1, self.step)
        return True

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything :meth:`save` writes (model part + training state)."""
        payload = self.model.checkpoint_payload(include_backbone=self.cfg.train_backbone)
        phase_index = self.phase_index(min(self.epoch, self.cfg.num_epochs - 1))
        payload.update({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_state": capture_rng_state(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "mode": self.mode,
            "phase": self.phases[phase_index].name,
            "phase_index": phase_index,
            "best_r1": self.best_r1,
            "metrics": self.last_metrics,
            "world_size": self.env.world_size,
        })
        return payload

    def save(self, *names: str) -> List[str]:
        """Write the training state to ``checkpoint_dir/<name>.pth`` for each name (main
        process only; others wait). The state is gathered once for all names."""
        paths = [os.path.join(self.cfg.checkpoint_dir, f"{name}.pth") for name in names]
        if self.env.is_main:
            state = self.checkpoint_state()
            for path in paths:
                atomic_torch_save(state, path)
                logger.debug("saved %s", path)
        if self.env.distributed:
            dist.barrier()
        return paths

    def _prune_epoch_checkpoints(self) -> None:
        keep = self.cfg.keep_checkpoints
        if not keep or not self.env.is_main:  # None: keep all; 0: none were written
            return
        pattern = os.path.join(self.cfg.checkpoint_dir, "checkpoint_epoch_*.pth")
        found = sorted(glob.glob(pattern), key=lambda p: int(re.findall(r"(\d+)\.pth$", p)[0]))
        for old in found[:-keep]:
            os.remove(old)

    def _load_training_checkpoint(self, path: str) -> None:
        payload = read_checkpoint(path)
        if "optimizer" not in payload or "step" not in payload:
            raise CheckpointError(f"{path}: holds model tensors only, not a training state; "
                                  "start from it with --checkpoint instead of --resume")
        check_architecture(payload["config"], self.config, path, _TRAINED_WITH)
        if payload.get("mode") != self.mode:
            raise ConfigError("training.training_mode", f"{path} was trained with mode {payload.get('mode')!r}; "
                                                        f"resume it with --mode {payload.get('mode')}")
        if bool(payload.get("includes_backbone")) != self.cfg.train_backbone:
            raise ConfigError("training.train_backbone", f"{self.cfg.train_backbone} but {path} was trained with "
                                                         f"train_backbone={bool(payload.get('includes_backbone'))}")
        if payload.get("steps_per_epoch") != self.steps_per_epoch:
            logger.warning("%s: %s steps per epoch then, %d now (dataset, batch size or accumulation changed): "
                           "the run will not continue exactly", path, payload.get("steps_per_epoch"), self.steps_per_epoch)
        saved_cfg = (payload["config"].get("training") or {})
        changed = sorted(k for k, v in self.cfg.to_dict().items()
                         if k in saved_cfg and saved_cfg[k] != v and k not in ("checkpoint_dir", "num_workers", "log_every", "eval_batch_size"))
        if changed:
            logger.warning("resuming with changed training settings: %s", ", ".join(changed))
        epoch = int(payload["epoch"])
        expected = self.phases[self.phase_index(min(epoch, self.cfg.num_epochs - 1))].name
        if payload.get("phase") != expected:
            raise ConfigError("training.sequential_split", f"{path} is in phase {payload.get('phase')!r} at epoch "
                                                           f"{epoch + 1}, but this config puts that epoch in phase {expected!r}")
        self.model.load_trainable_state(payload["trainable"], source=path)
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({err})") from None
        self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng_state"])
        self.step, self.epoch, self.batches_done = int(payload["step"]), epoch, int(payload["batches_done"])
        self.best_r1 = payload.get("best_r1")
        self.last_metrics = payload.get("metrics")
        logger.info("resumed from %s: step %d, epoch %d (+%d batches), phase %s", path, self.step, self.epoch + 1,
                    self.batches_done, payload.get("phase"))

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _synthetic_size(config: UnifiedModelConfig) -> int:
    """Generated clips are about the model's input size (no point in larger files)."""
    return int(min(config.video_size, 224) // 2 * 2)


def load_training_config(data: Dict[str, Any]) -> UnifiedModelConfig:
    """Validate a config dict that must have a ``training`` section (TrainingConfig defaults if absent)."""
    config = from_dict(data)
    if config.training is None:
        config.training = TrainingConfig()
    return config
