"""Configuration of the unified TempMe-STOP model (DESIGN.md section 5).

Dataclasses that validate themselves on construction and read/write JSON. Every problem
raises :class:`ConfigError` whose message starts with the dotted key path, e.g.
``tempme.merge_frame_num: ...``, so a user can find the offending line in their file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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
    "MergeSchedule",
    "suggest_frame_factors",
    "effective_precision",
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
AMP_DTYPES = ("auto", "bf16", "fp16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

# The shipped default configs: beside this file in a checkout, installed with it as package
# data by `pip install .`, so scripts find them from any working directory.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def default_config_path(name: str) -> str:
    """Path of a shipped config file, e.g. ``default_config_path("training_config.json")``."""
    return os.path.join(CONFIG_DIR, name)


class ConfigError(ValueError):
    """A bad configuration value. ``key`` is the dotted path of the offending entry.

    ``problems`` lists every ``(key, message)`` found in one validation (a config reports
    all its problems at once); ``key`` / ``message`` are the first. The text is one line:
    ``key: message`` or ``key1: message1; key2: message2``.
    """

    def __init__(self, key: str, message: str, problems: Optional[List[Tuple[str, str]]] = None):
        self.problems = list(problems) if problems else [(key, message)]
        self.key, self.message = self.problems[0]
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in self.problems))

    @classmethod
    def combine(cls, errors: Sequence["ConfigError"]) -> "ConfigError":
        """One error holding the problems of all ``errors``, in order."""
        problems = [p for err in errors for p in err.problems]
        return cls(problems[0][0], problems[0][1], problems)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` prepended to every key path."""
        return ConfigError("", "", [(f"{prefix}.{k}" if k else prefix, m) for k, m in self.problems])

    def in_file(self, path: str) -> "ConfigError":
        """The same error naming the file it came from (appended to the last message)."""
        problems = list(self.problems)
        key, message = problems[-1]
        problems[-1] = (key, f"{message} (in {path})")
        return ConfigError("", "", problems)


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


def _section_type(annotation: Any) -> Optional[type]:
    """The config section class an annotation names (``X`` or ``Optional[X]``), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, _Section):
            return candidate
    return None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


Require = Callable[[bool, str, str], None]


class _Section:
    """Shared from_dict / to_dict / validation plumbing for the config dataclasses.

    Every section lists all its problems at once: :meth:`_problems` type-checks each
    field, then runs the section's rules (:meth:`_validate`) with a ``require`` callback
    that records instead of raising. Construction raises one :class:`ConfigError` holding
    them all; :meth:`from_dict` also gathers the problems of every nested section and of
    unknown keys before raising.
    """

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError.combine(problems)

    def _validate(self, require: Require) -> None:
        """The section's value rules (types are already checked)."""

    def _problems(self) -> List[ConfigError]:
        """Type-check (and normalise) every field, then apply the value rules; all problems."""
        hints = typing.get_type_hints(type(self))
        errors: List[ConfigError] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                continue
            try:
                setattr(self, f.name, _check_type(value, hints[f.name], f.name))
            except ConfigError as err:
                errors.append(err)
        if errors:  # the value rules assume the types
            return errors

        def require(condition: bool, key: str, message: str) -> None:
            if not condition:
                errors.append(ConfigError(key, message))

        self._validate(require)
        return errors

    @classmethod
    def _build(cls, data: Any, prefix: str = "") -> Tuple[Any, List[ConfigError]]:
        """The section made from ``data`` (None if ``data`` is not an object) and its problems."""
        if not isinstance(data, dict):
            return None, [ConfigError(prefix, f"expected an object, got {type(data).__name__}")]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        errors: List[ConfigError] = []
        obj = cls.__new__(cls)
        for f in fields.values():
            setattr(obj, f.name, _field_default(f))
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else key
            if key.startswith("_"):  # "_comment" style keys are documentation, not settings
                continue
            if key not in fields:
                errors.append(ConfigError(path, f"unknown key (known keys: {', '.join(sorted(fields))})"))
                continue
            section = _section_type(hints[key])
            if section is not None and value is not None:
                value, nested = section._build(value, path)
                errors.extend(nested)
                if value is None:
                    continue
            setattr(obj, key, value)
        errors.extend(err.under(prefix) if prefix else err for err in obj._problems())
        return obj, errors

    @classmethod
    def from_dict(cls, data: Dict[str, Any], prefix: str = ""):
        """Build and validate a section from a plain dict; one ConfigError lists every problem."""
        obj, errors = cls._build(data, prefix)
        if errors:
            raise ConfigError.combine(errors)
        return obj

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Section) else value
        return out


def suggest_frame_factors(num_frames: int, count: int) -> List[int]:
    """``count`` frame-merge factors whose product is ``num_frames``, smallest first.

    The prime factors of ``num_frames``, the two smallest multiplied together while there
    are too many, padded with 1 (a merge layer that joins nothing) while there are too few:
    8 frames, 3 layers -> [2, 2, 2]; 12 -> [2, 2, 3]; 16 -> [2, 2, 4].
    """
    primes, n, p = [], num_frames, 2
    while n > 1 and p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    while len(primes) > count:
        primes = sorted([primes[0] * primes[1], *primes[2:]])
    return [1] * (count - len(primes)) + primes


@dataclass(frozen=True)
class MergeSchedule:
    """TempMe's merge schedule as the encoder runs it, parsed from :class:`TempMeConfig`.

    The one home of the schedule's rules: :meth:`structure_problems` (layers, factors,
    ratios) and :meth:`frame_problems` (the factors merge ``num_frames`` into one clip).
    The config applies both with the named encoder's depth; the encoder applies
    :meth:`check` with the depth of the weights it was built from.
    """

    merge_layers: Tuple[int, ...] = (8, 9, 10)
    frame_factors: Tuple[int, ...] = (2, 2, 3)
    clip_ratio: float = 0.3  # R_C: fraction of a new clip's tokens merged away at a merge layer
    intra_ratio: float = 0.1  # R_I: fraction merged within a clip after its attention
    tome_r: int = 2  # ImgMe tokens merged per frame in each block before the first merge layer
    prop_attn: bool = True
    frame_pos: bool = True

    def factor_at(self, layer: int) -> int:
        """Clip-merge factor k of ``layer`` (1 where no clips are merged)."""
        if layer in self.merge_layers:
            return self.frame_factors[self.merge_layers.index(layer)]
        return 1

    def clips_before_merges(self, num_frames: int) -> List[int]:
        """Number of sequences per video entering each merge layer, e.g. [12, 6, 3]."""
        counts, clips = [], num_frames
        for k in self.frame_factors:
            counts.append(clips)
            clips //= k
        return counts

    def structure_problems(self, depth: int, encoder: str = "vision") -> List[Tuple[str, str]]:
        """(key, message) for each rule the schedule breaks on a ``depth``-block encoder."""
        layers, factors = list(self.merge_layers), list(self.frame_factors)
        out = []
        if any(k < 1 for k in factors):
            out.append(("merge_frame_num", f"every factor must be >= 1, got {factors}"))
        if len(factors) != len(layers):
            out.append(("merge_frame_num", f"{len(factors)} factors {factors} but merge_layer has {len(layers)} layers "
                                           f"{layers}: each merge layer needs exactly one frame-merge factor"))
        if any(b <= a for a, b in zip(layers, layers[1:])):
            out.append(("merge_layer", f"layers must be strictly increasing, got {layers}"))
        if any(not 0 <= layer < depth for layer in layers):
            out.append(("merge_layer", f"layers are 0-indexed blocks of the {depth}-block {encoder} encoder, got {layers}"))
        return out

    def frame_problems(self, num_frames: int, spelled: str) -> List[Tuple[str, str]]:
        """(key, message) if the factors do not merge ``num_frames`` frames into exactly one clip.

        ``spelled`` is the factors as the user wrote them (for the message); the message
        suggests factors for ``num_frames`` (:func:`suggest_frame_factors`).
        """
        factors = list(self.frame_factors)
        if not factors or any(k < 1 for k in factors):  # no ClipMe layers; bad factors are reported elsewhere
            return []
        hint = "-".join(map(str, suggest_frame_factors(num_frames, len(factors))))
        advice = (f"the product of the factors must equal max_frames (for {num_frames} frames use "
                  f"e.g. '{hint}', or change max_frames)")
        frames, trail = num_frames, [str(num_frames)]
        for k in factors:
            if frames % k:
                return [("merge_frame_num", f"{spelled!r} cannot merge max_frames={num_frames} into one clip: "
                                            f"{' -> '.join(trail)} frames, then {frames}/{k} is not a whole number "
                                            f"of clips; {advice}")]
            frames //= k
            trail.append(str(frames))
        if frames != 1:
            return [("merge_frame_num", f"{spelled!r} merges max_frames={num_frames} into {frames} clips "
                                        f"({' -> '.join(trail)}), not 1; {advice}")]
        return []

    def check(self, num_frames: int, depth: int) -> None:
        """Raise ConfigError (keys under ``tempme.``) unless the schedule runs on these frames and blocks."""
        spelled = "-".join(map(str, self.frame_factors))
        problems = self.structure_problems(depth) + self.frame_problems(num_frames, spelled)
        if problems:
            raise ConfigError("", "", [(f"tempme.{k}", m) for k, m in problems])


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

    def _validate(self, require: Require) -> None:
        require(self.base_encoder in ENCODER_DEPTH, "base_encoder",
                f"unknown encoder {self.base_encoder!r} (known: {', '.join(ENCODER_DEPTH)})")
        require(self.lora_dim >= 0, "lora_dim", f"must be >= 0 (0 turns LoRA off), got {self.lora_dim}")
        try:
            frames = parse_int_list(self.merge_frame_num, "merge_frame_num")
            layers = parse_int_list(self.merge_layer, "merge_layer")
        except ConfigError as err:
            require(False, err.key, err.message)
            return
        require(len(self.merge_token_proportion) == 2, "merge_token_proportion",
                f"expected [R_C, R_I] (two fractions), got {self.merge_token_proportion}")
        for i, p in enumerate(self.merge_token_proportion):
            # One bipartite step can remove at most half of the mergeable tokens.
            require(0.0 <= p <= 0.5, f"merge_token_proportion[{i}]",
                    f"must be a fraction in [0, 0.5] (bipartite matching merges at most half the tokens), got {p}")
        require(self.tome_r >= 0, "tome_r", f"must be >= 0, got {self.tome_r}")
        self.merge_frame_num = "-".join(str(k) for k in frames)
        self.merge_layer = layers
        depth = ENCODER_DEPTH.get(self.base_encoder)
        if depth is not None:
            for key, message in self.schedule.structure_problems(depth, self.base_encoder):
                require(False, key, message)

    @property
    def schedule(self) -> MergeSchedule:
        """The merge schedule the encoder runs (parsed once, here)."""
        ratios = list(self.merge_token_proportion) + [0.0, 0.0]
        return MergeSchedule(merge_layers=tuple(parse_int_list(self.merge_layer, "merge_layer")),
                             frame_factors=tuple(self.frame_factors), clip_ratio=float(ratios[0]),
                             intra_ratio=float(ratios[1]), tome_r=int(self.tome_r), prop_attn=bool(self.prop_attn),
                             frame_pos=bool(self.frame_pos))

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

    def _validate(self, require: Require) -> None:
        require(self.sim_header in SIM_HEADERS, "sim_header",
                f"must be one of {', '.join(SIM_HEADERS)}, got {self.sim_header!r}")
        require(self.temporal_prompt in TEMPORAL_PROMPTS, "temporal_prompt",
                f"must be one of {', '.join(TEMPORAL_PROMPTS)}, got {self.temporal_prompt!r}")
        require(self.spatial_prompt in SPATIAL_PROMPTS, "spatial_prompt",
                f"must be one of {', '.join(SPATIAL_PROMPTS)}, got {self.spatial_prompt!r}")
        require(self.cross_model == "cross-base", "cross_model",
                f"only 'cross-base' is shipped (modules/cross-base/cross_config.json), got {self.cross_model!r}")
        require(self.num_prompts >= 1, "num_prompts", f"must be >= 1, got {self.num_prompts}")
        require(self.prompt_dim >= 8, "prompt_dim", f"must be >= 8, got {self.prompt_dim}")
        require(1 <= self.spatial_eta <= 49, "spatial_eta", f"must be in [1, 49], got {self.spatial_eta}")
        require(self.pretrained_clip_name in ENCODER_DEPTH, "pretrained_clip_name",
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
    amp_dtype: str = "auto"  # autocast dtype with amp: auto = bf16 on CPU, fp16 (+ GradScaler) on CUDA
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

    def _validate(self, require: Require) -> None:
        require(self.training_mode in TRAINING_MODES, "training_mode",
                f"must be one of {', '.join(TRAINING_MODES)}, got {self.training_mode!r}")
        require(self.datatype in DATATYPES, "datatype",
                f"must be one of {', '.join(DATATYPES)}, got {self.datatype!r}")
        for name in ("tempme_lr", "stop_lr"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.backbone_lr is None or self.backbone_lr > 0, "backbone_lr",
                f"must be > 0 or null (= tempme_lr * 0.1), got {self.backbone_lr}")
        for name in ("batch_size", "grad_accum_steps", "num_epochs", "eval_every", "log_every"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_batch_size", "save_every_steps", "max_steps"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1 or null, got {value}")
        require(self.keep_checkpoints is None or self.keep_checkpoints >= 0, "keep_checkpoints",
                f"must be >= 0 (0 = no per-epoch files) or null (keep all), got {self.keep_checkpoints}")
        require(self.amp_dtype in AMP_DTYPES, "amp_dtype", f"must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.training_mode == "sequential":  # sequential_split means nothing in the other modes
            problem = self.sequential_problem()
            if problem is not None:
                require(False, *problem)
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.warmup_proportion < 1, "warmup_proportion",
                f"must be in [0, 1), got {self.warmup_proportion}")
        require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.synthetic_val_videos >= 1, "synthetic_val_videos",
                f"must be >= 1, got {self.synthetic_val_videos}")
        require(self.synthetic_num_videos > self.synthetic_val_videos, "synthetic_num_videos",
                f"must exceed synthetic_val_videos={self.synthetic_val_videos} (the rest are training clips), "
                f"got {self.synthetic_num_videos}")
        require(bool(self.checkpoint_dir.strip()), "checkpoint_dir", "must not be empty")

    def sequential_problem(self) -> Optional[Tuple[str, str]]:
        """(key, message) if sequential mode cannot split ``num_epochs`` into its two phases.

        Both phases need at least one epoch: a 1-epoch sequential run would otherwise
        silently train STOP only. The phase plan applies this rule too, since the mode can
        be chosen after the config is read (``--mode``).
        """
        if self.num_epochs < 2:
            return ("num_epochs", f"sequential mode needs >= 2 epochs (a TempMe phase, then a STOP phase), got "
                                  f"{self.num_epochs}; train one group with training_mode tempme_only or stop_only")
        split = self.tempme_phase_epochs
        if not 1 <= split < self.num_epochs:
            return ("sequential_split", f"must be in [1, num_epochs - 1 = {self.num_epochs - 1}] (epochs of the TempMe "
                                        f"phase; the STOP phase gets the rest) or null (= num_epochs // 2), got {split}")
        return None

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

    def _validate(self, require: Require) -> None:
        for name in ("max_frames", "num_segments", "top_k"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.num_segments >= self.max_frames, "num_segments",
                f"must be >= max_frames ({self.max_frames}): frame compression only reduces, got {self.num_segments}")
        require(self.video_size >= 32 and self.video_size % 16 == 0, "video_size",
                f"must be a multiple of 16 and >= 32, got {self.video_size}")
        require(3 <= self.max_words <= 77, "max_words", f"must be in [3, 77] (CLIP context is 77), got {self.max_words}")
        require(bool(_DEVICE_RE.match(self.device)), "device",
                f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        require(self.clip_activation is None or self.clip_activation in ACTIVATIONS, "clip_activation",
                f"must be one of {', '.join(ACTIVATIONS)} or null (= what the weights say), got {self.clip_activation!r}")
        require(self.precision in PRECISIONS, "precision",
                f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        require(self.window_seconds is None or self.window_seconds >= 0, "window_seconds",
                f"must be >= 0 seconds (0 = no windows) or null (automatic), got {self.window_seconds}")
        require(self.window_stride is None or (bool(self.window_seconds) and 0 < self.window_stride <= self.window_seconds),
                "window_stride", f"must be > 0 and <= window_seconds (which must be set > 0), got {self.window_stride}")
        require(self.stop.pretrained_clip_name == self.tempme.base_encoder, "stop.pretrained_clip_name",
                f"{self.stop.pretrained_clip_name!r} disagrees with tempme.base_encoder "
                f"{self.tempme.base_encoder!r}: both name the one CLIP backbone the model uses")
        try:
            schedule = self.tempme.schedule
        except (TypeError, ValueError):  # a broken tempme section: its own problems are reported
            return
        for key, message in schedule.frame_problems(self.max_frames, str(self.tempme.merge_frame_num)):
            require(False, f"tempme.{key}", message)

    # -- JSON ---------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "UnifiedModelConfig":
        return from_json(path)

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        to_json(self, path)


def effective_precision(precision: str, device_type: str, force: bool = False) -> str:
    """The inference precision that runs on a ``device_type`` ("cpu", "cuda", ...) device.

    fp16 on a CPU has no fast kernels and runs far slower than fp32, so it runs as fp32
    there, with a warning, unless ``force`` (the tests force it to prove the fp16 path on
    CPU). bf16 is the reduced precision with fast CPU kernels; fp32 and bf16 run as asked.
    """
    if precision == "fp16" and device_type == "cpu" and not force:
        logging.getLogger(__name__).warning(
            "precision fp16 on CPU is much slower than fp32 (no fast fp16 kernels): using fp32; "
            "set precision to bf16 for reduced precision on CPU")
        return "fp32"
    return precision


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
        raise err.in_file(os.fspath(path)) from None


def to_json(config: UnifiedModelConfig, path: Union[str, os.PathLike]) -> None:
    """Write ``config`` as indented JSON (atomically: temp file + rename)."""
    path = os.fspath(path)
    data = config.to_dict()
    if data.get("training") is None:
        data.pop("training", None)
    save_text_atomic(path, json.dumps(data, indent=2) + "\n")
