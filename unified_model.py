"""The unified TempMe-STOP video-text model (DESIGN.md sections 1-4).

frames (B, N, 3, H, W)
  -> CLIP patch embedding (frozen)                 tokens (B, N, 50, 768)
  -> STOP spatial prompt                           tokens (B, N, 50, 768)
  -> TempMe frame compression N -> F               tokens (B, F, 50, 768), sizes, groups
  -> STOP temporal prompts + TempMe encoder        frame CLS (B, F, 768)
  -> ln_post, proj                                 frame features (B, F, 512)
  -> meanP / seqTransf head                        video embedding (B, 512), unit norm

Library entry point: :func:`create_unified_model`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import ConfigError, UnifiedModelConfig, effective_precision, from_dict, from_json
from modules.atomic_io import atomic_write
from modules.frame_compression import compress_frames
from modules.heads import build_head
from modules.lora import LoRAQKV, merge_lora_weights
from modules.checkpoint_formats import is_tempme_state, read_tempme_checkpoint, tempme_payload
from modules.clip_weights import (TEMPME_PREFIX, ClipWeights, WeightsError, checkpoint_clip_weights, choose_activation,
                                  first_non_finite, local_weights_files, resolve_clip_weights)
from modules.module_clip import build_model
from modules.stop_prompts import SpatialPromptGenerator, TemporalPromptGenerator
from modules.tempme_encoder import PromptInputs, TempMeEncoder
from modules.tokenization_clip import tokenize_for_model
from modules.video_sampler import SampledVideo, sample_video

__all__ = [
    "UnifiedTempMeSTOPModel",
    "VideoFeatures",
    "FrameHit",
    "CheckpointError",
    "create_unified_model",
    "load_model_spec",
    "ModelSpec",
    "DeviceError",
    "resolve_device",
    "resolve_model_device",
    "ARCHITECTURE_KEYS",
    "check_architecture",
    "rank_hits",
    "group_time_span",
    "GroupSpans",
    "group_spans",
    "CHECKPOINT_FORMAT_VERSION",
    "model_fingerprint",
    "spec_fingerprint",
    "join_fingerprint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
# Which top-level submodules hold each trainable group (DESIGN.md section 6).
TEMPME_MODULES = ("tempme", "text_lora")
STOP_MODULES = ("temporal_prompts", "spatial_prompts", "head")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used with this model (one-line message)."""


class DeviceError(RuntimeError):
    """A device this machine does not have (one-line message)."""


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"unknown device {str(device)!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested but no CUDA GPU is available (use --device auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device} requested but this machine has {torch.cuda.device_count()} CUDA GPUs")
    return device


def resolve_model_device(device: Union[str, torch.device, None], config: Optional[UnifiedModelConfig]) -> torch.device:
    """The device a model runs on: ``device``, or the config's ``device`` when it is "auto"/None."""
    if device in (None, "auto") and config is not None:
        device = config.device
    return resolve_device(device)


@dataclass
class VideoFeatures:
    """What :meth:`UnifiedTempMeSTOPModel.encode_videos` computes for a batch of B videos.

    video_embeddings: (B, D) unit norm. frame_features: (B, F, D) unit norm, one per
    compressed frame group. frame_sizes: (B, F) sampled frames in each group.
    groups: per video, F lists of positions (0..N-1) in the sampled frame list.
    representatives: (B, F) position of each group's representative sampled frame.
    """

    video_embeddings: torch.Tensor
    frame_features: torch.Tensor
    frame_sizes: torch.Tensor
    groups: List[List[List[int]]]
    representatives: torch.Tensor


@dataclass
class FrameHit:
    """One retrieved frame group, in original-video coordinates."""

    frame: int  # representative original frame number
    score: float  # cosine similarity between the query and the group's frame feature
    start_frame: int  # first original frame number sampled in the group
    end_frame: int  # last original frame number sampled in the group
    start_time: float  # seconds: start of the group's first sampling segment
    end_time: float  # seconds: end of the group's last sampling segment
    timestamp: float  # seconds: presentation time of ``frame``

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


class UnifiedTempMeSTOPModel(nn.Module):
    """CLIP ViT with TempMe merging + LoRA and STOP prompts, and a meanP/seqTransf head."""

    def __init__(self, config: UnifiedModelConfig,
                 clip_state_dict: Union[Dict[str, torch.Tensor], ClipWeights, None] = None, init_seed: int = 0,
                 weights_identity: Optional[str] = None):
        super().__init__()
        self.config = config
        # weights_identity: the first part of the fingerprint (clip_weights_identity); weights
        # handed over in memory without one are identified by the model's own copy when first asked
        if weights_identity is None and clip_state_dict is None:
            weights_identity = clip_weights_identity(config)
        self._weights_identity = weights_identity
        self._checkpoint_digest = "untrained"
        if clip_state_dict is None:
            clip_state_dict = resolve_clip_weights(config.clip_weights, base_name=config.tempme.base_encoder)
        if isinstance(clip_state_dict, ClipWeights):
            activation = choose_activation(clip_state_dict, config.clip_activation)
            clip_state_dict = clip_state_dict.state_dict
        else:  # tensors handed over in Python (random or converted by the caller): our default unless configured
            activation = config.clip_activation or "quick_gelu"
        # The tensors a checkpoint would provide (LoRA A, prompts, head) start from a fixed
        # seed, so untrained models built in different processes (torchrun ranks, extraction
        # and inference runs) compute in the same embedding space. The global RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self._build(config, clip_state_dict, activation)
        # Only a record for checkpoint_payload: forward reads the adapters, which merging removes.
        self._lora_folded = False

    def _build(self, config: UnifiedModelConfig, clip_state_dict: Dict[str, torch.Tensor], activation: str) -> None:
        self.clip = build_model(clip_state_dict, activation)
        self.clip.requires_grad_(False)
        visual = self.clip.visual
        if visual.input_resolution != config.video_size:
            raise ConfigError("video_size", f"{config.video_size} but the CLIP weights expect {visual.input_resolution}px frames")
        width = visual.conv1.out_channels
        depth = len(visual.transformer.resblocks)
        grid = visual.grid_size
        lora_dim = config.tempme.lora_dim
        self.tempme = TempMeEncoder(width, depth, config.max_frames, config.tempme.schedule, lora_dim)
        text_width = self.clip.ln_final.weight.shape[0]
        text_depth = len(self.clip.transformer.resblocks)
        self.text_lora = (
            nn.ModuleList(LoRAQKV(text_width, lora_dim) for _ in range(text_depth)) if lora_dim > 0 else None
        )
        stop = config.stop
        self.temporal_prompts = (
            TemporalPromptGenerator(width, stop.num_prompts, depth, stop.prompt_dim, num_patches=grid * grid)
            if stop.temporal_prompt != "none" else None
        )
        self.spatial_prompts = (
            SpatialPromptGenerator(width, grid=grid, eta=stop.spatial_eta) if stop.spatial_prompt != "none" else None
        )
        embed_dim = self.clip.text_projection.shape[1]
        self.head = build_head(stop.sim_header, stop.cross_model, width=embed_dim)
        if hasattr(self.head, "init_from_clip"):
            try:
                self.head.init_from_clip(self.clip)
            except ValueError as err:  # e.g. a small CLIP with fewer text blocks than cross-base
                raise ConfigError("stop.sim_header", f"seqTransf cannot start from these CLIP weights: {err}") from None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @property
    def embed_dim(self) -> int:
        return self.clip.text_projection.shape[1]

    def _autocast(self):
        """Autocast for fp16/bf16 precision settings; fp32 runs as is."""
        precision = self.config.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ video
    def encode_videos(self, frames: torch.Tensor) -> VideoFeatures:
        """frames: CLIP-normalised float (B, N, 3, H, W), N >= max_frames -> :class:`VideoFeatures`."""
        if frames.dim() != 5:
            raise ValueError(f"frames must be (B, N, 3, H, W), got shape {tuple(frames.shape)}")
        batch, num, _, _, _ = frames.shape
        if num < self.config.max_frames:
            raise ValueError(f"need at least max_frames={self.config.max_frames} frames per video, got {num}")
        visual = self.clip.visual
        frames = frames.to(self.device, dtype=visual.conv1.weight.dtype)
        with self._autocast():
            tokens = visual.embed(frames.flatten(0, 1))
            tokens = tokens.reshape(batch, num, tokens.shape[1], tokens.shape[2])
            if self.spatial_prompts is not None:
                tokens = torch.cat([tokens[:, :, :1], self.spatial_prompts(tokens[:, :, 1:])], dim=2)
            compressed = compress_frames(tokens, self.config.max_frames, num_protected=1)
            prompts = None
            if self.temporal_prompts is not None:
                prompts = PromptInputs(
                    dynamic=self.temporal_prompts(compressed.tokens[:, :, 1:]),
                    base=self.temporal_prompts.base_prompts,
                    log_size_gate=self.temporal_prompts.prompt_log_size_gate,
                )
            cls, _ = self.tempme(visual, compressed.tokens, compressed.sizes, prompts)
            frame_features = visual.head(cls)  # (B, F, D)
            video = self.head(frame_features, compressed.sizes)
        return VideoFeatures(
            video_embeddings=F.normalize(video.float(), dim=-1),
            frame_features=F.normalize(frame_features.float(), dim=-1),
            frame_sizes=compressed.sizes,
            groups=compressed.groups,
            representatives=compressed.representatives,
        )

    def sample(self, video_path: Union[str, os.PathLike], train: bool = False, rng=None) -> SampledVideo:
        """Decode ``num_segments`` frames of a video as the model expects them."""
        return sample_video(video_path, num_segments=self.config.num_segments, size=self.config.video_size, train=train, rng=rng)

    @torch.no_grad()
    def extract_video_embedding(self, video_path: Union[str, os.PathLike]) -> np.ndarray:
        """One video file -> its embedding (D,) float32, unit norm."""
        sampled = self.sample(video_path)
        features = self.encode_videos(sampled.frames.unsqueeze(0))
        return features.video_embeddings[0].cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------ text
    def encode_text(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Texts -> (T, D) unit-norm embeddings (CLIP text tower with LoRA, max_words tokens)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = tokenize_for_model(list(texts), max_words=self.config.max_words).to(self.device)
        with self._autocast():
            features = self.encode_text_tokens(tokens)
        return F.normalize(features.float(), dim=-1)

    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (T, L) -> projected EOT features (T, D), not normalised."""
        return self.clip.encode_text(tokens, adapters=self.text_lora)

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def retrieve(self, video_path: Union[str, os.PathLike], query: str, top_k: Optional[int] = None) -> List[FrameHit]:
        """Frame groups of ``video_path`` ranked by similarity to ``query``, best first.

        ``top_k`` None returns every group; duplicates of the same original frame (short
        videos repeat frames) are reported once, at their best rank.
        """
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        sampled = self.sample(video_path)
        features = self.encode_videos(sampled.frames.unsqueeze(0))
        text = self.encode_text([query])[0]
        scores = features.frame_features[0] @ text  # (F,)
        return rank_hits(scores.cpu(), features.groups[0], features.representatives[0].cpu(), sampled, top_k)

    def forward(self, video_path: Union[str, os.PathLike], query: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (similarity_scores (K,), frame_indices (K,)): every distinct hit, best first."""
        hits = self.retrieve(video_path, query)
        scores = torch.tensor([h.score for h in hits], dtype=torch.float32)
        frames = torch.tensor([h.frame for h in hits], dtype=torch.int64)
        return scores, frames

    def retrieve_event(self, video_path: Union[str, os.PathLike], query: str, top_k: Optional[int] = None) -> List[int]:
        """Original frame numbers most relevant to ``query``, best first (``top_k`` default: config.top_k)."""
        top_k = self.config.top_k if top_k is None else top_k
        return [h.frame for h in self.retrieve(video_path, query, top_k)]

    # ------------------------------------------------------------------ LoRA merge
    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold vision and text LoRA into CLIP's qkv weights and remove the adapters
        (inference only; same outputs, one matmul less per block)."""
        _ = self.fingerprint_parts  # identify the weights before they are folded
        folded = self.tempme.merge_lora(self.clip.visual)
        if self.text_lora is not None:
            merge_lora_weights((b.attn for b in self.clip.transformer.resblocks), self.text_lora)
            self.text_lora = None
            folded = True
        self._lora_folded = self._lora_folded or folded

    @property
    def fingerprint_parts(self) -> Dict[str, str]:
        """What the numbers depend on: weights identity, trained tensors, config (model_fingerprint)."""
        if self._weights_identity is None:
            self._weights_identity = "tensors:" + tensors_digest(self.clip.state_dict())
        return fingerprint_parts_of(self.config, self._weights_identity, self._checkpoint_digest)

    @property
    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of this model."""
        return model_fingerprint(self)

    @property
    def lora_merged(self) -> bool:
        """True once merge_lora folded adapters into CLIP (such a model cannot be saved)."""
        return self._lora_folded

    # ------------------------------------------------------------------ parameters
    def named_group_parameters(self, group: str) -> Iterator[Tuple[str, nn.Parameter]]:
        """Parameters of one group: "tempme", "stop" or "backbone" (the CLIP weights)."""
        prefixes = {"tempme": TEMPME_MODULES, "stop": STOP_MODULES, "backbone": ("clip",)}[group]
        for name, param in self.named_parameters():
            if name.split(".", 1)[0] in prefixes:
                yield name, param

    def trainable_parameter_counts(self) -> Dict[str, Dict[str, int]]:
        """Trainable parameter counts per group and component.

        TempMe for ViT-B/32: vision LoRA 294,912 + text LoRA 196,608 + clip position
        embeddings 16,128 = 507,648, as in the TempMe paper.
        """
        def count(module: Optional[nn.Module]) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        tempme = {
            "vision_lora": count(self.tempme.lora),
            "text_lora": count(self.text_lora),
            "clip_position_embeddings": count(self.tempme.clip_pos),
        }
        tempme["total"] = sum(tempme.values())
        stop = {
            "temporal_prompts": count(self.temporal_prompts),
            "spatial_prompts": count(self.spatial_prompts),
            "head": count(self.head),
        }
        stop["total"] = sum(stop.values())
        return {"tempme": tempme, "stop": stop, "backbone": {"total": count(self.clip)}}

    def trainable_state_dict(self, include_backbone: bool = False) -> Dict[str, torch.Tensor]:
        """Tensors a checkpoint stores: TempMe and STOP groups (+ CLIP under full fine-tuning)."""
        groups = ("tempme", "stop", "backbone") if include_backbone else ("tempme", "stop")
        return {name: p.detach().cpu().clone() for g in groups for name, p in self.named_group_parameters(g)}

    def checkpoint_payload(self, include_backbone: bool = False) -> Dict[str, Any]:
        """The model part of a checkpoint (DESIGN.md section 4)."""
        if self.lora_merged:
            raise CheckpointError("cannot save a checkpoint after merge_lora(): the adapters are folded into CLIP")
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "trainable": self.trainable_state_dict(include_backbone),
            "includes_backbone": include_backbone,
        }

    def save_checkpoint(self, path: Union[str, os.PathLike], include_backbone: bool = False, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write the trainable tensors (+ ``extra``) atomically to ``path``."""
        payload = self.checkpoint_payload(include_backbone)
        if extra:
            payload.update(extra)
        atomic_torch_save(payload, path)

    def load_trainable_state(self, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load tensors saved by :meth:`trainable_state_dict` (names and shapes must match)."""
        own = dict(self.named_parameters())
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise CheckpointError(f"{source}: {len(unknown)} tensors this model does not have, e.g. {unknown[0]}")
        missing = [n for g in ("tempme", "stop") for n, _ in self.named_group_parameters(g) if n not in state]
        if missing:
            raise CheckpointError(f"{source}: missing {len(missing)} trainable tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}")
                if not tensor.is_floating_point():  # copy_ would cast integers silently
                    raise CheckpointError(f"{source}: {name} holds {tensor.dtype} values, not floating point")
                own[name].copy_(tensor)
        self._checkpoint_digest = tensors_digest(state)

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> Dict[str, Any]:
        """Load a checkpoint written by :meth:`save_checkpoint`; returns the whole payload."""
        payload = read_checkpoint(path)
        self.load_trainable_state(payload["trainable"], source=os.fspath(path))
        return payload


# ------------------------------------------------------------------ model fingerprint
#: config keys that do not change what the model computes (where it runs, how it is trained)
_RUNTIME_KEYS = ("device", "training", "clip_weights", "top_k")


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _file_digest_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clip_weights_identity(config: UnifiedModelConfig, clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Which CLIP weights a model uses: "tensors:<sha256>" (weights in memory), "file:<sha256>"
    (a weights file, by content), "random:<arch>" or "name:<model name>" (official weights,
    pinned by their published sha256)."""
    if clip_state_dict is not None:
        return "tensors:" + tensors_digest(clip_state_dict)
    value = config.clip_weights
    # by content: a Hugging Face folder or tempme:PATH whose files change is other weights
    files = local_weights_files(value)
    if not files:
        override = os.environ.get("UNIFIED_CLIP_WEIGHTS")
        if override and value != "random":
            value = override  # an official name is read from this file (modules.clip_weights)
            files = local_weights_files(value)
    if value is None:
        return "name:" + config.tempme.base_encoder
    if value == "random":
        return "random:" + config.tempme.base_encoder
    if files:
        return "file:" + "+".join(_file_digest(path) for path in files)
    return "name:" + value


def _file_digest(path: str) -> str:
    st = os.stat(path)
    return _file_digest_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def fingerprint_parts_of(config: UnifiedModelConfig, weights: str, checkpoint: str) -> Dict[str, str]:
    """The three parts of a model fingerprint: weights identity, trained tensors' digest
    ("untrained" without a checkpoint), config (keys that change the numbers)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_KEYS}
    return {
        "weights": weights,
        "checkpoint": checkpoint,
        "config": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
    }


def join_fingerprint(parts: Dict[str, str]) -> str:
    """One string for the parts: 32 hex digits of their sha256."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def model_fingerprint(model: "UnifiedTempMeSTOPModel") -> str:
    """The identity of what a model computes: weights identity + checkpoint + config.

    Two models with one fingerprint give the same embeddings (up to float rounding of the
    device); it is stored with every embedding written (extraction outputs, the consolidated
    index, the video library) and compared before outputs are reused or searched. It names
    the inputs the model was built from (:func:`spec_fingerprint` gives the same string
    without building it); tensors changed in place afterwards (training) are not tracked.
    """
    return join_fingerprint(model.fingerprint_parts)


def spec_fingerprint(spec: "ModelSpec", clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, str]:
    """The fingerprint parts of the model ``create_unified_model(spec=spec)`` would build."""
    checkpoint = "untrained" if spec.payload is None else tensors_digest(spec.payload["trainable"])
    if clip_state_dict is None and spec.clip is not None:  # CLIP weights inside the checkpoint (TempMe's)
        clip_state_dict = spec.clip.state_dict
    return fingerprint_parts_of(spec.config, clip_weights_identity(spec.config, clip_state_dict), checkpoint)


def group_time_span(members: Sequence[int], duration: float, num_sampled: int) -> Tuple[float, float]:
    """Seconds a frame group covers: its members' shares of the ``num_sampled`` equal
    segments of the video's ``duration`` (first member's start, last member's end)."""
    segment = duration / num_sampled if duration > 0 and num_sampled else 0.0
    return members[0] * segment, (members[-1] + 1) * segment


@dataclass
class GroupSpans:
    """F frame groups of one video in original-video coordinates (arrays of shape (F,)).

    frames: representative original frame number; timestamps: its presentation time (s);
    start_frames / end_frames: first / last original frame number sampled in the group;
    start_times / end_times: seconds covered (:func:`group_time_span`).
    """

    frames: np.ndarray  # int64
    timestamps: np.ndarray  # float64
    start_frames: np.ndarray  # int64
    end_frames: np.ndarray  # int64
    start_times: np.ndarray  # float64
    end_times: np.ndarray  # float64


def group_spans(groups: Sequence[Sequence[int]], representatives: Union[np.ndarray, torch.Tensor],
                sampled: SampledVideo, *, offset: float = 0.0) -> GroupSpans:
    """The one rule from frame groups (positions 0..N-1 in the sampled frame list) to original
    frame numbers and seconds; ``sampled`` needs only frame_indices, timestamps, duration
    (and num_frames: a one-frame video is one instant, so its groups span 0 s).

    ``offset`` (seconds) is added to start_times / end_times: a long video's window passes its
    start time and its own duration, so its groups' seconds are the original video's."""
    indices = np.asarray(sampled.frame_indices, dtype=np.int64)
    times = np.asarray(sampled.timestamps, dtype=np.float64)
    reps = np.asarray(representatives, dtype=np.int64)
    duration = 0.0 if getattr(sampled, "num_frames", None) == 1 else float(sampled.duration)
    spans = [group_time_span(g, duration, len(indices)) for g in groups]
    return GroupSpans(
        frames=indices[reps],
        timestamps=times[reps],
        start_frames=np.array([indices[g[0]] for g in groups], dtype=np.int64),
        end_frames=np.array([indices[g[-1]] for g in groups], dtype=np.int64),
        start_times=np.array([offset + start for start, _ in spans], dtype=np.float64),
        end_times=np.array([offset + end for _, end in spans], dtype=np.float64),
    )


def rank_hits(scores: torch.Tensor, groups: List[List[int]], representatives: torch.Tensor,
              sampled: SampledVideo, top_k: Optional[int]) -> List[FrameHit]:
    """Sort groups by score and express them in original frame numbers and seconds."""
    spans = group_spans(groups, representatives, sampled)
    hits, seen = [], set()
    for g in torch.argsort(scores, descending=True, stable=True).tolist():
        frame = int(spans.frames[g])
        if frame in seen:
            continue
        seen.add(frame)
        hits.append(FrameHit(
            frame=frame,
            score=float(scores[g]),
            start_frame=int(spans.start_frames[g]),
            end_frame=int(spans.end_frames[g]),
            start_time=round(float(spans.start_times[g]), 6),
            end_time=round(float(spans.end_times[g]), 6),
            timestamp=float(spans.timestamps[g]),
        ))
        if top_k is not None and len(hits) == top_k:
            break
    return hits


def atomic_torch_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """torch.save written whole or not at all (:func:`modules.atomic_io.atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _load_checkpoint_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt zip, pickle refused by weights_only, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None


def _checked_payload(payload: Any, path: str) -> Dict[str, Any]:
    if not isinstance(payload, dict) or "trainable" not in payload or "config" not in payload:
        raise CheckpointError(f"{path}: not a unified-model checkpoint (no 'trainable'/'config' entries)")
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}, this code reads format {CHECKPOINT_FORMAT_VERSION}")
    if not isinstance(payload["trainable"], dict):
        raise CheckpointError(f"{path}: 'trainable' is not a dict of tensors")
    bad = first_non_finite(payload["trainable"])
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or infinite values; refusing a corrupt checkpoint")
    return payload


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read and check a model checkpoint with ``weights_only=True``; one-line errors."""
    path = os.fspath(path)
    return _checked_payload(_load_checkpoint_file(path), path)


def read_model_checkpoint(checkpoint: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Optional[ClipWeights]]:
    """-> (a format-v1 payload, the CLIP weights the checkpoint carries or None), read once.

    Reads this project's checkpoints and TempMe's training checkpoints (``tempme:PATH``,
    or detected by their tensor names), which carry their own CLIP weights.
    """
    path = os.fspath(checkpoint)
    try:
        if path.startswith(TEMPME_PREFIX):
            return read_tempme_checkpoint(path[len(TEMPME_PREFIX):])
        obj = _load_checkpoint_file(path)
        if isinstance(obj, dict) and "trainable" not in obj and is_tempme_state(obj):
            return tempme_payload(obj, path)
    except WeightsError as err:
        raise CheckpointError(str(err)) from None
    return _checked_payload(obj, path), None


#: config keys that define the network; a checkpoint must agree on them
ARCHITECTURE_KEYS = ("tempme", "stop", "max_frames", "video_size")


def check_architecture(saved: Dict[str, Any], config: UnifiedModelConfig, checkpoint: Union[str, os.PathLike],
                       hint: str) -> None:
    """Raise ConfigError naming the first architecture key where ``saved`` (a checkpoint's
    config dict) and ``config`` differ: "<key> differs between the config and checkpoint
    <path>; <hint>", ``hint`` formatted with ``key`` and the checkpoint's ``value``."""
    current = config.to_dict()
    for key in ARCHITECTURE_KEYS:
        if saved.get(key) != current.get(key):
            raise ConfigError(key, f"differs between the config and checkpoint {os.fspath(checkpoint)}; "
                                   + hint.format(key=key, value=saved.get(key)))


@dataclass
class ModelSpec:
    """What a model is built from, read and checked once (:func:`load_model_spec`).

    config: the model's config (the caller's object unless an override applied, and then a
    copy: a caller's config is never written to). checkpoint: the checkpoint path or None.
    payload: the checkpoint's contents as :func:`read_checkpoint` returned them.
    clip: the CLIP weights inside the checkpoint (TempMe's), used unless clip_weights or the
    config names other weights; config.clip_weights then names them (``tempme:PATH``).
    """

    config: UnifiedModelConfig
    checkpoint: Optional[str] = None
    payload: Optional[Dict[str, Any]] = None
    clip: Optional[ClipWeights] = None  # CLIP weights the checkpoint carries (TempMe's do)


#: what a config/checkpoint architecture mismatch adds to its message by default
_OWN_CONFIG_HINT = "omit --config_path to use the checkpoint's own config"


def load_model_spec(
    config_path: Optional[Union[str, os.PathLike]] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    clip_weights: Optional[str] = None,
    config: Optional[UnifiedModelConfig] = None,
    *,
    architecture_hint: str = _OWN_CONFIG_HINT,
) -> ModelSpec:
    """Read the config and checkpoint once and check that they agree on the architecture.

    config (an object) wins over config_path; without either the checkpoint's own config
    is used, else the built-in defaults. clip_weights overrides config.clip_weights.
    Raises ConfigError / CheckpointError with one-line messages.
    """
    payload, checkpoint_clip = read_model_checkpoint(checkpoint) if checkpoint is not None else (None, None)
    if config is None:
        if config_path is not None:
            config = from_json(config_path)
        elif payload is not None:
            try:
                config = from_dict(payload["config"])
            except ConfigError as err:  # the checkpoint's own config: say which file holds it
                raise err.in_file(os.fspath(checkpoint)) from None
            if checkpoint_clip is None:  # a file named inside a checkpoint is opened only on the user's word
                clip_weights = checkpoint_clip_weights(config.clip_weights, os.fspath(checkpoint), clip_weights)
        else:
            config = UnifiedModelConfig()
    if payload is not None:
        check_architecture(payload["config"], config, checkpoint, architecture_hint)
    if clip_weights is not None and clip_weights != config.clip_weights:
        config = dataclasses.replace(config, clip_weights=clip_weights)
        checkpoint_clip = None  # the user's weights replace those the checkpoint carries
    if checkpoint_clip is not None:
        carried = payload["config"]["clip_weights"]  # "tempme:PATH": where the carried CLIP comes from
        if config.clip_weights is None:  # the config names no weights: the carried ones, and it says so
            config = dataclasses.replace(config, clip_weights=carried)  # (a training run records it)
        elif config.clip_weights != carried:
            checkpoint_clip = None  # weights a config file names replace those the checkpoint carries
    return ModelSpec(config, None if checkpoint is None else os.fspath(checkpoint), payload, checkpoint_clip)


def create_unified_model(
    config_path: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device, None] = "auto",
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    clip_weights: Optional[str] = None,
    config: Optional[UnifiedModelConfig] = None,
    *,
    spec: Optional[ModelSpec] = None,
    clip_state_dict: Union[Dict[str, torch.Tensor], ClipWeights, None] = None,
    merge_lora: bool = False,
    architecture_hint: str = _OWN_CONFIG_HINT,
    force_precision: bool = False,
) -> UnifiedTempMeSTOPModel:
    """Build a ready-to-use model in eval mode: the one door into the model.

    config_path: JSON config (default: the built-in defaults, or the checkpoint's config).
    device: "auto" (CUDA when present), "cpu", "cuda", ...; "auto" defers to config.device.
    checkpoint: trained tensors from train_unified_model.py / save_checkpoint.
    clip_weights: overrides config.clip_weights (a file, a model name or "random").
    config: a config object instead of config_path (never modified).
    spec: config and checkpoint already read by :func:`load_model_spec` (then config_path,
        checkpoint, clip_weights and config are ignored): the checkpoint is read once.
    clip_state_dict: CLIP weights already in memory (a state dict, or ClipWeights with what the
        source says about its activation), instead of loading config.clip_weights.
    merge_lora: fold LoRA into the CLIP weights (inference: same outputs, less compute).
    architecture_hint: what a config/checkpoint architecture mismatch message adds.
    force_precision: run ``precision: fp16`` on a CPU as asked (otherwise fp32 with a
        warning, see :func:`config.effective_precision`).
    Raises ConfigError / WeightsError / CheckpointError / DeviceError (one line each).
    """
    if spec is None:
        spec = load_model_spec(config_path, checkpoint, clip_weights, config, architecture_hint=architecture_hint)
    target = resolve_model_device(device, spec.config)
    config = spec.config
    precision = effective_precision(config.precision, target.type, force=force_precision)
    if precision != config.precision:
        config = dataclasses.replace(config, precision=precision)  # the caller's config stays as it was
    identity = None if clip_state_dict is not None else spec_fingerprint(spec)["weights"]
    model = UnifiedTempMeSTOPModel(config, clip_state_dict if clip_state_dict is not None else spec.clip,
                                   weights_identity=identity)
    if spec.payload is not None:
        model.load_trainable_state(spec.payload["trainable"], source=spec.checkpoint)
    model = model.to(target).eval()
    if merge_lora:
        model.merge_lora()
    return model
