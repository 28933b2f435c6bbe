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
* AMP: autocast in ``amp_dtype`` (auto = bf16 on CPU, fp16 on CUDA); fp16 always with a
  GradScaler (on CPU too, so the tests cover the CUDA recipe).
* The pieces that need no Trainer (loss, gradient sync, optimizer, phases and lr schedule,
  RNG state, split evaluation) live in :mod:`modules.training_parts`.
* Checkpoints: ``checkpoint_epoch_<n>.pth`` after every epoch, ``last.pth``, ``best.pth``
  (best validation text-to-video R@1). Each holds the model part of
  :meth:`UnifiedTempMeSTOPModel.checkpoint_payload` (loadable by create_unified_model) plus
  optimizer, scheduler, grad scaler, RNG states, epoch, batches done, step, mode and phase;
  ``--resume`` continues bit for bit (data order derives from (seed, epoch, index) only).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import logging
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import ConfigError, TrainingConfig, UnifiedModelConfig, from_dict
from modules.distributed import DistEnv, cleanup_distributed, init_distributed
from modules.data import DataSplits, EpochBatchSampler, TrainPairs, load_data_splits, make_train_loader
from modules.metrics import format_metrics
from modules.training_parts import (
    FROZEN,
    GROUPS,
    MODE_GROUPS,
    Phase,
    TrainingDiverged,
    all_reduce_grads,
    autocast_dtype,
    broadcast_parameters,
    build_optimizer,
    build_scheduler,
    capture_rng_state,
    contrastive_loss,
    evaluate_split,
    gather_with_local_grad,
    lr_factor,
    plan_phases,
    restore_rng_state,
    seed_everything,
    uses_weight_decay,
    validation_loss,
)
from unified_model import (
    ARCHITECTURE_KEYS,
    CheckpointError,
    atomic_torch_save,
    check_architecture,
    create_unified_model,
    read_checkpoint,
    resolve_device,
)

__all__ = [
    "GROUPS", "MODE_GROUPS", "Phase", "DistEnv", "Trainer", "init_distributed", "cleanup_distributed",
    "gather_with_local_grad", "contrastive_loss", "evaluate_split", "uses_weight_decay", "build_optimizer",
    "plan_phases", "lr_factor", "build_scheduler", "capture_rng_state", "restore_rng_state",
    "validation_loss", "autocast_dtype", "TrainingDiverged", "run_files", "small_config_dict",
    "ARCHITECTURE_KEYS",
]

logger = logging.getLogger(__name__)

#: what a checkpoint/config architecture mismatch adds to its message
_TRAINED_WITH = "the checkpoint was trained with {key} = {value!r}"


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


def run_files(checkpoint_dir: str) -> List[str]:
    """The files a training run leaves in ``checkpoint_dir``: checkpoints and TensorBoard events."""
    patterns = ("last.pth", "best.pth", "checkpoint_epoch_*.pth", os.path.join("logs", "events.out.tfevents.*"))
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(checkpoint_dir), pattern)))


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
        need_train: False for evaluation only (no training split needed, nothing written).
        overwrite: a fresh run may replace another run's checkpoints and logs in
            ``checkpoint_dir`` (otherwise that is a ConfigError naming --resume and --overwrite).
    """

    def __init__(self, config: UnifiedModelConfig, mode: Optional[str] = None, *,
                 clip_state_dict: Optional[Dict[str, torch.Tensor]] = None, resume: Optional[str] = None,
                 init_checkpoint: Optional[str] = None, env: Optional[DistEnv] = None, progress: bool = True,
                 log_dir: Any = None, need_train: bool = True, overwrite: bool = False) -> None:
        # a copy: the caller's config is never written to (nor its training section)
        training = copy.deepcopy(config.training) if config.training is not None else TrainingConfig()
        if mode is not None:
            training.training_mode = mode
        self.config = config = dataclasses.replace(config, training=training)
        self.cfg = cfg = training
        self.mode = cfg.training_mode
        self.env = env or DistEnv(device=resolve_device(config.device))
        self.device = self.env.device
        self.progress = progress and self.env.is_main
        if cfg.batch_size % self.env.world_size:
            raise ConfigError("training.batch_size", f"{cfg.batch_size} is not divisible by the {self.env.world_size} "
                                                     "processes (batch_size is the global batch)")
        if need_train and resume is None:
            self._claim_checkpoint_dir(overwrite)
        seed_everything(cfg.seed)
        self.phase: Optional[Phase] = None
        self._setup_data(need_train)
        self._setup_model(clip_state_dict, init_checkpoint)
        self._setup_optimisation()

        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epoch in progress (or next to start)
        self.batches_done = 0  # micro-batches of ``epoch`` already trained
        self.best_r1: Optional[float] = None
        self.last_metrics: Optional[Dict[str, Dict[str, float]]] = None
        self.history: List[Dict[str, float]] = []
        self.last_saved: Optional[str] = resume
        if resume is not None:
            self._load_training_checkpoint(resume)
        else:
            broadcast_parameters(self.model, self.env)

        self.writer = None
        if self.env.is_main and log_dir is not False:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir or os.path.join(cfg.checkpoint_dir, "logs"))
        logger.info("training %s: %d train pairs (%d videos), %s val; %d steps/epoch, %d steps, phases %s",
                    self.mode, len(self.train_set), len(self.data.train.videos),
                    f"{len(self.data.val.videos)} videos" if self.data.val else "no",
                    self.steps_per_epoch, self.total_steps, [(p.name, p.num_steps) for p in self.phases])

    # ------------------------------------------------------------------ set-up
    def _claim_checkpoint_dir(self, overwrite: bool) -> None:
        """Refuse to start afresh over another run's files, or (overwrite) delete them first."""
        folder = self.cfg.checkpoint_dir
        found = run_files(folder)
        if not found:
            return
        if not overwrite:
            names = ", ".join(sorted({os.path.relpath(p, folder) for p in found})[:4])
            raise ConfigError("training.checkpoint_dir", f"{folder} holds another run ({names}); continue it with "
                                                         f"--resume {os.path.join(folder, 'last.pth')}, or start afresh "
                                                         "with --overwrite (deletes its checkpoints and logs)")
        if self.env.is_main:
            for path in found:
                os.remove(path)
            logger.info("--overwrite: removed %d files of the previous run in %s", len(found), folder)
        if self.env.distributed:
            dist.barrier()

    def _setup_data(self, need_train: bool) -> None:
        """Data splits, training pairs, steps per epoch and the phase plan."""
        cfg, config, env = self.cfg, self.config, self.env
        # the main process reads (and for synthetic data, generates) the data first
        if env.distributed and not env.is_main:
            dist.barrier()
        self.data: DataSplits = load_data_splits(cfg, need_train=need_train, synthetic_size=_synthetic_size(config))
        if env.distributed and env.is_main:
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

    def _setup_model(self, clip_state_dict: Optional[Dict[str, torch.Tensor]], init_checkpoint: Optional[str]) -> None:
        """The model on the training device, optionally starting from a checkpoint's trained tensors."""
        self.model = create_unified_model(config=self.config, device=self.device, checkpoint=init_checkpoint,
                                          clip_state_dict=clip_state_dict, architecture_hint=_TRAINED_WITH)
        if init_checkpoint is not None:
            logger.info("initialised trainable tensors from %s", init_checkpoint)

    def _setup_optimisation(self) -> None:
        """Optimizer, lr schedule, autocast dtype and gradient scaler."""
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, self.phases, cfg.warmup_proportion)
        self.amp_dtype = autocast_dtype(cfg, self.device) if cfg.amp else None
        # fp16 needs loss scaling wherever it runs (GradScaler supports CPU too): tiny
        # gradients would underflow, and steps whose gradients overflow are skipped
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

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
        self.phase = phase
        for group in GROUPS:
            for name, p in self.model.named_group_parameters(group):
                p.requires_grad_(group in phase.groups and name not in FROZEN)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.clip.logit_scale.detach().exp()

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, batch: Dict[str, torch.Tensor]) -> Tuple[float, float, float]:
        """Loss of one micro-batch, backpropagated (scaled); TrainingDiverged if it is not finite."""
        frames = batch["frames"].to(self.device, non_blocking=True)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        with self._autocast():
            video = self.model.encode_videos(frames).video_embeddings
            text = self.model.encode_text_tokens(tokens)
        text = F.normalize(text.float(), dim=-1)
        video = gather_with_local_grad(video.float(), self.env)
        text = gather_with_local_grad(text, self.env)
        loss, t2v, v2t = contrastive_loss(text, video, self.logit_scale)
        if not torch.isfinite(loss):
            lrs = ", ".join(f"{group} {lr:.3g}" for group, lr in self.group_lrs().items())
            raise TrainingDiverged(f"non-finite loss ({float(loss.detach())}) at step {self.step + 1} (epoch {self.epoch + 1}), "
                                   f"learning rates {lrs}; training stopped, no checkpoint written for this step "
                                   "(lower the learning rates, or try --no-amp)")
        self.scaler.scale(loss / self.cfg.grad_accum_steps).backward()
        return float(loss.detach()), float(t2v.detach()), float(v2t.detach())

    def _optimizer_step(self) -> Tuple[float, bool]:
        """Clip, step and schedule; (gradient norm, whether the scaler skipped the update).

        With fp16 the GradScaler skips a step whose gradients hold inf/NaN (and halves its
        scale); the lr schedule moves on either way, as the step counter does.
        """
        params = self.trainable_parameters()
        all_reduce_grads(params, self.env)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), skipped

    def group_lrs(self) -> Dict[str, float]:
        """Current learning rate of each group the phase trains (first param group of each).

        Frozen groups are left out: stop_only and sequential's STOP phase have no TempMe rate.
        """
        trained = self.phase.groups if self.phase is not None else GROUPS
        out: Dict[str, float] = {}
        for pg in self.optimizer.param_groups:
            if pg["group"] in trained:
                out.setdefault(pg["group"], pg["lr"])
        return out

    # ------------------------------------------------------------------ training
    def train(self, stop_at_step: Optional[int] = None) -> Dict[str, Any]:
        """Train until ``total_steps``; returns a summary (steps, last loss, metrics).

        stop_at_step: stop after this optimizer step, as a pre-empted run would (``last.pth``
        is written so that ``resume`` continues exactly).
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
            stopped = False
            for micro, batch in enumerate(loader, start=start):
                window.append(self._forward_backward(batch))
                if (micro + 1) % accum:
                    continue
                lrs = self.group_lrs()  # the rates this step uses (the scheduler moves them on)
                grad_norm, skipped = self._optimizer_step()
                self.step += 1
                self.batches_done = micro + 1
                loss, t2v, v2t = (float(np.mean([w[i] for w in window])) for i in range(3))
                window.clear()
                self.history.append({"step": self.step, "loss": loss, "grad_norm": grad_norm, "skipped": skipped,
                                     "loss_scale": self.scaler.get_scale()})
                if skipped:
                    logger.warning("step %d skipped: inf/NaN gradients at loss scale %g (fp16); scale now %g",
                                   self.step, self.history[-1]["loss_scale"] * 2, self.history[-1]["loss_scale"])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                self._log_step(loss, t2v, v2t, grad_norm, lrs)
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and self.batches_done < micro_per_epoch:
                    self.save("last")
                if self.step >= self.total_steps or (stop_at_step is not None and self.step >= stop_at_step):
                    stopped = True
                    break
            bar.close()
            epoch_done = self.batches_done >= micro_per_epoch
            self._end_stretch(epoch_done)
            if stopped or self.epoch >= cfg.num_epochs:
                break
        return self._summary(time.time() - t0)

    def _end_stretch(self, epoch_done: bool) -> None:
        """End of an epoch, or of a run stopped inside one: evaluate when due, track the best, save.

        An evaluation is due after every ``eval_every``-th epoch and at the end of the run
        (last epoch or ``total_steps``). The best R@1 is updated before saving, so every
        checkpoint written here records it (a resumed run must not overwrite best.pth with
        a worse model). Completed epochs also get their ``checkpoint_epoch_<n>`` file.
        """
        cfg = self.cfg
        if epoch_done:
            self.epoch, self.batches_done = self.epoch + 1, 0
        final = self.step >= self.total_steps or self.epoch >= cfg.num_epochs
        if final or (epoch_done and self.epoch % cfg.eval_every == 0):
            self._evaluate_and_track()
        names = [f"checkpoint_epoch_{self.epoch}"] if epoch_done and cfg.keep_checkpoints != 0 else []
        self.save(*names, "last", *(["best"] if self._track_best() else []))
        if epoch_done:
            self._prune_epoch_checkpoints()

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
            if self.scaler.is_enabled():
                self.writer.add_scalar("train/loss_scale", self.scaler.get_scale(), self.step)
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
        """t2v / v2t R@1/5/10, MdR, MnR and the loss on the validation split (None without one)."""
        if self.data.val is None:
            return None
        was_training = self.model.training
        self.model.eval()
        cfg = self.cfg
        metrics = evaluate_split(self.model, self.data.val, self.env, cfg.eval_batch_size or cfg.batch_size,
                                 cfg.num_workers, self._autocast, progress=self.progress)
        if was_training:
            self.model.train()
        return metrics

    def _evaluate_and_track(self) -> None:
        metrics = self.evaluate()
        if metrics is None:
            return
        self.last_metrics = metrics
        # self.epoch counts finished epochs at a boundary, else it is the 0-based epoch in progress
        epoch = self.epoch + (1 if self.batches_done else 0)
        if self.env.is_main:
            logger.info("validation after step %d (epoch %d): loss %.4f\n%s", self.step, epoch,
                        metrics["loss"]["loss"], format_metrics(metrics))
        if self.writer is not None:
            for direction in ("t2v", "v2t"):
                for key, value in metrics[direction].items():
                    self.writer.add_scalar(f"val/{direction}_{key}", value, self.step)
            for key, value in metrics["loss"].items():  # next to train/loss, train/loss_t2v, train/loss_v2t
                self.writer.add_scalar("val/loss" if key == "loss" else f"val/loss_{key}", value, self.step)
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

    def resume_point(self) -> Optional[str]:
        """The checkpoint ``--resume`` would continue this run from (None before the first save)."""
        return self.last_saved

    def save(self, *names: str) -> List[str]:
        """Write the training state to ``checkpoint_dir/<name>.pth`` for each name (main
        process only; others wait). The state is gathered once for all names."""
        paths = [os.path.join(self.cfg.checkpoint_dir, f"{name}.pth") for name in names]
        if self.env.is_main:
            state = self.checkpoint_state()
            bad = [n for n, t in state["trainable"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise TrainingDiverged(f"step {self.step}: {len(bad)} trained tensors hold inf/NaN ({bad[0]}, ...); "
                                       f"not saved")
            for path in paths:
                atomic_torch_save(state, path)
                logger.debug("saved %s", path)
        if self.env.distributed:
            dist.barrier()
        self.last_saved = os.path.join(self.cfg.checkpoint_dir, "last.pth") if "last" in names else self.last_saved
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
