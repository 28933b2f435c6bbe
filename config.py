"""Configuration of the unified TempMe-STOP model (DESIGN.md section 5).

Dataclasses that validate themselves on construction and read/write JSON. Every problem
raises :class:`ConfigError` whose message starts with the dotted key path, e.g.
``tempme.merge_frame_num: ...``, so a user can find the offending line in their file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from modules.clip_archs import ACTIVATIONS, ENCODER_DEPTH
from modules.atomic_io import save_text_atomic
from modules.json_input import JSONInputError, read_json_file

__all__ = [
    "ConfigError",
    "TempMeConfig",
    "STOPConfig",
    "TrainingConfig",
    "UnifiedModelConfig",
    "from_json",
    "to_json",
    "from_dict",
    "parse_int_list",
    "read_json_object",
    "ENCODER_DEPTH",
    "CONFIG_DIR",
    "default_config_path",
]

# ENCODER_DEPTH (modules/clip_archs.py, torch-free): depth of the vision towers we know;
# validates merge layers before any weights are loaded (the encoder re-checks them).
SIM_HEADERS = ("meanP", "seqTransf")
TEMPORAL_PROMPTS = ("group2-2", "none")
SPATIAL_PROMPTS = ("patch", "none")
TRAINING_MODES = ("joint", "tempme_only", "stop_only", "sequential")
DATATYPES = ("msrvtt", "csv", "synthetic")
PRECISIONS = ("fp32", "fp16", "bf16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

# The shipped default configs: beside this file in a checkout, installed with it as package
# data by `pip install .`, so scripts find them from any working directory.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def default_config_path(name: str) -> str:
    """Path of a shipped config file, e.g. ``default_config_path("training_config.json")``."""
    return os.path.join(CONFIG_DIR, name)


class ConfigError(ValueError):
    """A bad configuration value. ``key`` is the dotted path of the offending entry."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` prepended to its key path."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.message)


def parse_int_list(value: Union[str, int, List[int]], key: str) -> List[int]:
    """``"2-2-3"``, ``"8,9,10"``, ``[8, 9, 10]`` or ``4`` -> list of ints (ConfigError otherwise)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a list of integers, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        parts = [p for p in re.split(r"[-,\s]+", value.strip()) if p]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ConfigError(key, f"expected integers like '2-2-3', got {value!r}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ConfigError(key, f"expected a list of integers, got {value!r}")


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a (simple) type annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if errors else ConfigError(key, f"unexpected value {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


class _Section:
    """Shared from_dict / to_dict / validation plumbing for the config dataclasses."""

    @classmethod
    def from_dict(cls, data: Dict[str, Any], prefix: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(prefix, f"expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else key
            if key.startswith("_"):  # "_comment" style keys are documentation, not settings
                continue
            if key not in names:
                raise ConfigError(path, f"unknown key (known keys: {', '.join(sorted(names))})")
            annotation = hints[key]
            if isinstance(annotation, type) and issubclass(annotation, _Section):
                kwargs[key] = annotation.from_dict(value, path)
            elif typing.get_origin(annotation) is Union and any(
                isinstance(a, type) and issubclass(a, _Section) for a in typing.get_args(annotation)
            ):
                section = next(a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, _Section))
                kwargs[key] = None if value is None else section.from_dict(value, path)
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise err.under(prefix) if prefix else err

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Section) else value
        return out

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            annotation = hints[f.name]
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                continue
            setattr(self, f.name, _check_type(value, annotation, f.name))


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


@dataclass
class TempMeConfig(_Section):
    """TempMe: LoRA rank and the token-merging schedule (ImgMe before, ClipMe at merge layers)."""

    base_encoder: str = "ViT-B/32"
    lora_dim: int = 8
    merge_frame_num: Union[str, List[int]] = "2-2-3"
    merge_layer: Union[str, List[int]] = field(default_factory=lambda: [8, 9, 10])
    merge_token_proportion: List[float] = field(default_factory=lambda: [0.3, 0.1])
    tome_r: int = 2
    frame_pos: bool = True
    prop_attn: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.base_encoder in ENCODER_DEPTH, "base_encoder",
                 f"unknown encoder {self.base_encoder!r} (known: {', '.join(ENCODER_DEPTH)})")
        _require(self.lora_dim >= 0, "lora_dim", f"must be >= 0 (0 turns LoRA off), got {self.lora_dim}")
        frames = parse_int_list(self.merge_frame_num, "merge_frame_num")
        layers = parse_int_list(self.merge_layer, "merge_layer")
        _require(all(k >= 1 for k in frames), "merge_frame_num", f"every factor must be >= 1, got {frames}")
        _require(len(frames) == len(layers), "merge_frame_num",
                 f"{len(frames)} factors {frames} but merge_layer has {len(layers)} layers {layers}: "
                 "each merge layer needs exactly one frame-merge factor")
        _require(all(b > a for a, b in zip(layers, layers[1:])), "merge_layer",
                 f"layers must be strictly increasing, got {layers}")
        depth = ENCODER_DEPTH[self.base_encoder]
        _require(all(0 <= l < depth for l in layers), "merge_layer",
                 f"layers are 0-indexed blocks of the {depth}-block {self.base_encoder} encoder, got {layers}")
        _require(len(self.merge_token_proportion) == 2, "merge_token_proportion",
                 f"expected [R_C, R_I] (two fractions), got {self.merge_token_proportion}")
        for i, p in enumerate(self.merge_token_proportion):
            # One bipartite step can remove at most half of the mergeable tokens.
            _require(0.0 <= p <= 0.5, f"merge_token_proportion[{i}]",
                     f"must be a fraction in [0, 0.5] (bipartite matching merges at most half the tokens), got {p}")
        _require(self.tome_r >= 0, "tome_r", f"must be >= 0, got {self.tome_r}")
        self.merge_frame_num = "-".join(str(k) for k in frames)
        self.merge_layer = layers

    @property
    def frame_factors(self) -> List[int]:
        """merge_frame_num as a list of ints, e.g. [2, 2, 3]."""
        return parse_int_list(self.merge_frame_num, "merge_frame_num")


@dataclass
class STOPConfig(_Section):
    """STOP: temporal / spatial prompts and the similarity head."""

    cross_model: str = "cross-base"
    sim_header: str = "meanP"
    temporal_prompt: str = "group2-2"
    spatial_prompt: str = "patch"
    num_prompts: int = 4
    prompt_dim: int = 96
    spatial_eta: int = 6
    pretrained_clip_name: str = "ViT-B/32"

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.sim_header in SIM_HEADERS, "sim_header",
                 f"must be one of {', '.join(SIM_HEADERS)}, got {self.sim_header!r}")
        _require(self.temporal_prompt in TEMPORAL_PROMPTS, "temporal_prompt",
                 f"must be one of {', '.join(TEMPORAL_PROMPTS)}, got {self.temporal_prompt!r}")
        _require(self.spatial_prompt in SPATIAL_PROMPTS, "spatial_prompt",
                 f"must be one of {', '.join(SPATIAL_PROMPTS)}, got {self.spatial_prompt!r}")
        _require(self.cross_model == "cross-base", "cross_model",
                 f"only 'cross-base' is shipped (modules/cross-base/cross_config.json), got {self.cross_model!r}")
        _require(self.num_prompts >= 1, "num_prompts", f"must be >= 1, got {self.num_prompts}")
        _require(self.prompt_dim >= 8, "prompt_dim", f"must be >= 8, got {self.prompt_dim}")
        _require(1 <= self.spatial_eta <= 49, "spatial_eta", f"must be in [1, 49], got {self.spatial_eta}")
        _require(self.pretrained_clip_name in ENCODER_DEPTH, "pretrained_clip_name",
                 f"unknown encoder {self.pretrained_clip_name!r} (known: {', '.join(ENCODER_DEPTH)})")


@dataclass
class TrainingConfig(_Section):
    """Training settings (DESIGN.md section 6); only read by train_unified_model.py.

    TRAINING_GUIDE.md documents every field. Paths may be null where a default applies:
    msrvtt reads ``data_path/MSRVTT_data.json``, ``MSRVTT_train.9k.csv`` and
    ``MSRVTT_JSFUSION_test.csv`` and videos from ``video_dir`` (default ``data_path/videos``);
    csv reads ``train_csv`` / ``val_csv``; synthetic generates clips into ``data_path``
    (default ``checkpoint_dir/synthetic_data``).
    """

    training_mode: str = "joint"
    tempme_lr: float = 1e-4
    stop_lr: float = 1e-5
    backbone_lr: Optional[float] = None  # only with train_backbone; null = tempme_lr * 0.1
    batch_size: int = 8  # global: videos per micro-batch summed over all processes
    eval_batch_size: Optional[int] = None  # videos per process at evaluation; null = batch_size
    grad_accum_steps: int = 1
    num_epochs: int = 20
    sequential_split: Optional[int] = None  # epochs of sequential's TempMe phase; null = num_epochs // 2
    weight_decay: float = 0.2
    warmup_proportion: float = 0.1
    max_grad_norm: float = 1.0
    amp: bool = True
    seed: int = 42
    datatype: str = "msrvtt"
    data_path: Optional[str] = None
    video_dir: Optional[str] = None
    train_csv: Optional[str] = None
    val_csv: Optional[str] = None
    msrvtt_json: Optional[str] = None
    expand_sentences: bool = True  # every caption is a training pair (CLIP4Clip --expand_msrvtt_sentences)
    synthetic_num_videos: int = 120
    synthetic_val_videos: int = 30
    num_workers: int = 2
    eval_every: int = 1
    log_every: int = 10
    checkpoint_dir: str = "./checkpoints/unified_model"
    save_every_steps: Optional[int] = None
    keep_checkpoints: Optional[int] = None  # epoch checkpoints kept (null = all, 0 = none); last/best always
    train_backbone: bool = False
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.training_mode in TRAINING_MODES, "training_mode",
                 f"must be one of {', '.join(TRAINING_MODES)}, got {self.training_mode!r}")
        _require(self.datatype in DATATYPES, "datatype",
                 f"must be one of {', '.join(DATATYPES)}, got {self.datatype!r}")
        for name in ("tempme_lr", "stop_lr"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _require(self.backbone_lr is None or self.backbone_lr > 0, "backbone_lr",
                 f"must be > 0 or null (= tempme_lr * 0.1), got {self.backbone_lr}")
        for name in ("batch_size", "grad_accum_steps", "num_epochs", "eval_every", "log_every"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_batch_size", "save_every_steps", "max_steps"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, f"must be >= 1 or null, got {value}")
        _require(self.keep_checkpoints is None or self.keep_checkpoints >= 0, "keep_checkpoints",
                 f"must be >= 0 (0 = no per-epoch files) or null (keep all), got {self.keep_checkpoints}")
        _require(self.sequential_split is None or 0 <= self.sequential_split <= self.num_epochs, "sequential_split",
                 f"must be in [0, num_epochs={self.num_epochs}] (epochs of the TempMe phase) or null, got {self.sequential_split}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(0 <= self.warmup_proportion < 1, "warmup_proportion",
                 f"must be in [0, 1), got {self.warmup_proportion}")
        _require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.synthetic_val_videos >= 1, "synthetic_val_videos",
                 f"must be >= 1, got {self.synthetic_val_videos}")
        _require(self.synthetic_num_videos > self.synthetic_val_videos, "synthetic_num_videos",
                 f"must exceed synthetic_val_videos={self.synthetic_val_videos} (the rest are training clips), "
                 f"got {self.synthetic_num_videos}")
        _require(bool(self.checkpoint_dir.strip()), "checkpoint_dir", "must not be empty")

    @property
    def tempme_phase_epochs(self) -> int:
        """Epochs of sequential mode's TempMe phase (sequential_split, default num_epochs // 2)."""
        return self.num_epochs // 2 if self.sequential_split is None else self.sequential_split


@dataclass
class UnifiedModelConfig(_Section):
    """The whole model: TempMe + STOP sections plus the sampling / runtime settings."""

    tempme: TempMeConfig = field(default_factory=TempMeConfig)
    stop: STOPConfig = field(default_factory=STOPConfig)
    max_frames: int = 12
    num_segments: int = 32
    video_size: int = 224
    max_words: int = 32
    top_k: int = 5
    clip_weights: Optional[str] = None
    clip_activation: Optional[str] = None  # quick_gelu | gelu; null = what the weights say
    device: str = "auto"
    precision: str = "fp32"
    # long videos (modules/long_video.py): seconds per window; None = windows only for videos
    # longer than 10 minutes (30 s windows), 0 = never; stride None = the window length
    window_seconds: Optional[float] = None
    window_stride: Optional[float] = None
    training: Optional[TrainingConfig] = None

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("max_frames", "num_segments", "top_k"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.num_segments >= self.max_frames, "num_segments",
                 f"must be >= max_frames ({self.max_frames}): frame compression only reduces, got {self.num_segments}")
        _require(self.video_size >= 32 and self.video_size % 16 == 0, "video_size",
                 f"must be a multiple of 16 and >= 32, got {self.video_size}")
        _require(3 <= self.max_words <= 77, "max_words", f"must be in [3, 77] (CLIP context is 77), got {self.max_words}")
        _require(bool(_DEVICE_RE.match(self.device)), "device",
                 f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _require(self.clip_activation is None or self.clip_activation in ACTIVATIONS, "clip_activation",
                 f"must be one of {', '.join(ACTIVATIONS)} or null (= what the weights say), got {self.clip_activation!r}")
        _require(self.precision in PRECISIONS, "precision",
                 f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.window_seconds is None or self.window_seconds >= 0, "window_seconds",
                 f"must be >= 0 seconds (0 = no windows) or null (automatic), got {self.window_seconds}")
        _require(self.window_stride is None or (bool(self.window_seconds) and 0 < self.window_stride <= self.window_seconds),
                 "window_stride", f"must be > 0 and <= window_seconds (which must be set > 0), got {self.window_stride}")
        _require(self.stop.pretrained_clip_name == self.tempme.base_encoder, "stop.pretrained_clip_name",
                 f"{self.stop.pretrained_clip_name!r} disagrees with tempme.base_encoder "
                 f"{self.tempme.base_encoder!r}: both name the one CLIP backbone the model uses")
        self._check_schedule()

    def _check_schedule(self) -> None:
        """The frame-merge factors must divide max_frames down to exactly one clip."""
        factors = self.tempme.frame_factors
        if not factors:  # no ClipMe layers: every frame stays its own sequence
            return
        frames = self.max_frames
        trail = [str(frames)]
        for k in factors:
            if frames % k:
                raise ConfigError(
                    "tempme.merge_frame_num",
                    f"{self.tempme.merge_frame_num!r} cannot merge max_frames={self.max_frames} into one clip: "
                    f"{' -> '.join(trail)} frames, then {frames}/{k} is not a whole number of clips; the product of "
                    f"the factors must equal max_frames (for 12 frames use e.g. '2-2-3')")
            frames //= k
            trail.append(str(frames))
        if frames != 1:
            raise ConfigError(
                "tempme.merge_frame_num",
                f"{self.tempme.merge_frame_num!r} merges max_frames={self.max_frames} into {frames} clips "
                f"({' -> '.join(trail)}), not 1; the product of the factors must equal max_frames")

    # -- JSON ---------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "UnifiedModelConfig":
        return from_json(path)

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        to_json(self, path)


def from_dict(data: Dict[str, Any]) -> UnifiedModelConfig:
    """Build and validate a :class:`UnifiedModelConfig` from a plain dict."""
    return UnifiedModelConfig.from_dict(data)


def read_json_object(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The JSON object in a config file, read as hostile data (``modules.json_input``: regular
    files only, bounded size, depth and numbers); every problem is a one-line ConfigError."""
    path = os.fspath(path)
    try:
        data = read_json_file(path, "config file")
    except JSONInputError as err:
        raise ConfigError("", str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a JSON object")
    return data


def from_json(path: Union[str, os.PathLike]) -> UnifiedModelConfig:
    """Read and validate a config file; every problem is a one-line ConfigError."""
    data = read_json_object(path)
    try:
        return from_dict(data)
    except ConfigError as err:
        raise ConfigError(err.key, f"{err.message} (in {os.fspath(path)})") from None


def to_json(config: UnifiedModelConfig, path: Union[str, os.PathLike]) -> None:
    """Write ``config`` as indented JSON (atomically: temp file + rename)."""
    path = os.fspath(path)
    data = config.to_dict()
    if data.get("training") is None:
        data.pop("training", None)
    save_text_atomic(path, json.dumps(data, indent=2) + "\n")
