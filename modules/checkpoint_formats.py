"""Other projects' checkpoint layouts, converted to this project's on load.

CLIP weights (``parse_clip_weights``; all end up in OpenAI's state-dict layout):

* OpenAI TorchScript archives (read as data by modules/torch_archive.py);
* OpenAI / open_clip state dicts, bare or wrapped (``{"state_dict": ..., "name": ...}``
  from open_clip training, ``module.`` prefixes from DDP);
* mmaction2's CLIP4Clip (mmengine checkpoint, OpenAI CLIP under ``clip.``);
* TempMe's ``best.pth`` (its VTRModel: CLIP under ``clip.`` plus ``TVPt_*`` tensors,
  which only :func:`read_tempme_checkpoint` uses);
* Hugging Face ``transformers`` CLIPModel (``vision_model.encoder.layers.N...``, separate
  q/k/v projections), from ``.safetensors`` (no pickle) or ``pytorch_model.bin``.

Model checkpoints (:func:`read_tempme_checkpoint`): TempMe's training checkpoint mapped
into this model's LoRA, clip position embeddings and CLIP weights, with the config that
matches TempMe's defaults.
"""
from __future__ import annotations

import io
import logging
import re
import struct
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from modules.clip_archs import CLIP_ARCHS
from modules.module_clip import CLIP, NON_PARAMETER_KEYS, infer_config
from modules.clip_weights import TEMPME_PREFIX, ClipWeights, WeightsError, first_non_finite, read_user_file
from modules.torch_archive import ArchiveError, is_zip, read_archive, script_module_tensors

logger = logging.getLogger(__name__)

__all__ = ["parse_clip_weights", "open_clip_activation", "hf_to_openai", "read_tempme_checkpoint",
           "tempme_payload", "is_tempme_state"]

# Globals of mmengine training checkpoints outside the weights (logging buffers, numpy
# scalars in "meta"): recorded as inert objects, never built.
_INERT_GLOBALS = ("mmengine.", "numpy.")


def _summary(error: BaseException) -> str:
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(error).__name__}: {first}"[:200]


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header,) = struct.unpack("<Q", data[:8])
    return 2 <= header <= len(data) - 8 and data[8:9] == b"{"


def _load_object(data: bytes, source: str) -> Tuple[Any, Optional[str]]:
    """-> (the file's object, the activation its TorchScript code shows, if any)."""
    def corrupt(err: BaseException) -> WeightsError:
        return WeightsError(f"{source} is not a CLIP checkpoint or is corrupt ({_summary(err)})")

    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data), None
        except Exception as err:  # safetensors raises its own SafetensorError
            raise corrupt(err) from None
    if is_zip(data):
        try:
            obj, scripted = read_archive(data, inert=_INERT_GLOBALS)
        except ArchiveError as err:
            raise corrupt(err) from None
        if not scripted:
            return obj, None
        try:
            state = script_module_tensors(obj)
        except ArchiveError as err:
            raise corrupt(err) from None
        return state, _torchscript_activation(data)
    try:  # the pre-zip torch.save format
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), None
    except Exception as err:  # corrupt data, a pickle refused by weights_only, ...
        raise corrupt(err) from None


def _torchscript_activation(data: bytes) -> str:
    # QuickGELU traces to sigmoid/mul; nn.GELU to aten::gelu. OpenAI's archives are QuickGELU.
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        code = b"".join(archive.read(n) for n in archive.namelist() if "/code/" in n and n.endswith(".py"))
    return "gelu" if re.search(rb"\bgelu\(", code) else "quick_gelu"


def open_clip_activation(name: Optional[str], tag: Optional[str] = None) -> Optional[str]:
    """The activation open_clip builds model ``name`` (pretrained ``tag``) with, if known."""
    if not isinstance(name, str):
        return None
    if tag == "openai" or name.endswith("-quickgelu"):
        return "quick_gelu"
    try:
        import open_clip

        config = open_clip.get_model_config(name)
        # some tags were trained with QuickGELU on a GELU model config (laion400m_e31, dfn2b, ...)
        tag_says_quick = bool(tag and (open_clip.get_pretrained_cfg(name, tag) or {}).get("quick_gelu"))
    except ImportError:
        config, tag_says_quick = None, False
    if tag_says_quick:
        return "quick_gelu"
    if config is not None:
        return "quick_gelu" if config.get("quick_gelu") else "gelu"
    # open_clip's own ViT configs are GELU unless named -quickgelu.
    return "gelu" if re.fullmatch(r"ViT-[A-Za-z]+-\d+(-\d+)?", name) else None


def _tensor_dict(obj: Any, source: str) -> Dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{source} is not a CLIP checkpoint (no tensor state dict inside)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _unwrap(obj: Any, source: str) -> Tuple[Dict[str, Tensor], Optional[str]]:
    """A file's object -> (its tensor dict, the activation a wrapper names)."""
    activation = None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        activation = open_clip_activation(obj.get("name"))  # open_clip training checkpoints
        obj = obj["state_dict"]
    return _tensor_dict(obj, source), activation


def parse_clip_weights(data: bytes, source: str, folder_config: Optional[dict] = None
                       ) -> Tuple[Dict[str, Tensor], Optional[str]]:
    """A weights file's bytes -> (CLIP state dict in OpenAI's layout, activation or None).

    ``folder_config``: the config.json of the Hugging Face folder the file came from.
    """
    obj, activation = _load_object(data, source)
    state, named = _unwrap(obj, source)
    return _clip_state(state, activation or named, source, folder_config)


def _clip_state(state: Dict[str, Tensor], activation: Optional[str], source: str,
                folder_config: Optional[dict] = None) -> Tuple[Dict[str, Tensor], Optional[str]]:
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        state, activation = hf_to_openai(state, folder_config, source)
    elif "token_embedding.weight" not in state and "clip.token_embedding.weight" in state:
        # mmaction2's CLIP4Clip and TempMe wrap OpenAI's CLIP (QuickGELU) as ``clip``.
        dropped = sorted(k for k in state if not k.startswith("clip.") or "TVPt_" in k)
        if dropped:
            logger.info("%s: using the CLIP weights under 'clip.'; ignoring %d other tensors (e.g. %s)",
                        source, len(dropped), dropped[0])
        state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.") and "TVPt_" not in k}
        activation = activation or "quick_gelu"
    _check_layout(state, source)
    return state, activation


def _check_layout(state: Dict[str, Tensor], source: str) -> None:
    """Refuse, with a clear message, a state dict our CLIP cannot load strictly."""
    if "token_embedding.weight" not in state or not any(k.startswith("visual.") for k in state):
        raise WeightsError(f"{source} is not a CLIP checkpoint (no CLIP parameter names inside)")
    tensors = {k: v for k, v in state.items() if k not in NON_PARAMETER_KEYS}
    try:
        config = infer_config(tensors)
    except ValueError as err:
        raise WeightsError(f"{source}: {err}") from None
    with torch.device("meta"):
        expected = CLIP(**config).state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        detail = f"unexpected {unexpected[0]}" if unexpected else f"missing {missing[0]}"
        raise WeightsError(f"{source}: not a ViT CLIP this model can load ({len(unexpected)} unexpected, "
                           f"{len(missing)} missing tensors, e.g. {detail})")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, a CLIP with these sizes expects "
                               f"{tuple(expected[key].shape)} (are the attention heads 64 wide?)")


# ---------------------------------------------------------------------------------------
# Hugging Face transformers CLIPModel
# ---------------------------------------------------------------------------------------


def _hf_activation(config: Optional[dict], source: str) -> Optional[str]:
    if config is None:
        return None
    sections = [config.get("text_config") or {}, config.get("vision_config") or {}]
    acts = {s.get("hidden_act", "quick_gelu") for s in sections}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise WeightsError(f"{source}: config.json hidden_act {sorted(acts)} is not one activation of quick_gelu/gelu")
    for name, section in zip(("text_config", "vision_config"), sections):
        eps = section.get("layer_norm_eps", 1e-5)
        if abs(float(eps) - 1e-5) > 1e-12:
            raise WeightsError(f"{source}: config.json {name}.layer_norm_eps {eps} (this CLIP uses 1e-5)")
        width, heads = section.get("hidden_size"), section.get("num_attention_heads")
        if width and heads and heads != max(1, width // 64):
            raise WeightsError(f"{source}: config.json {name}.num_attention_heads {heads} for width {width}; "
                               "this CLIP uses 64-wide heads")
    return acts.pop()


def hf_to_openai(state: Mapping[str, Tensor], config: Optional[dict], source: str
                 ) -> Tuple[Dict[str, Tensor], Optional[str]]:
    """transformers' CLIPModel state dict -> OpenAI's layout (fused qkv, transposed
    projections); the activation comes from config.json's hidden_act when given."""
    activation = _hf_activation(config, source)

    def take(key: str) -> Tensor:
        if key not in state:
            raise WeightsError(f"{source}: Hugging Face CLIP weights without {key}")
        return state[key]

    out: Dict[str, Tensor] = {}

    def blocks(hf: str, ours: str) -> None:
        layers = {int(m.group(1)) for k in state for m in [re.match(re.escape(hf) + r"(\d+)\.", k)] if m}
        for i in sorted(layers):
            a, b = f"{hf}{i}.", f"{ours}{i}."
            for suffix in ("weight", "bias"):
                out[b + f"ln_1.{suffix}"] = take(a + f"layer_norm1.{suffix}")
                out[b + f"ln_2.{suffix}"] = take(a + f"layer_norm2.{suffix}")
                out[b + f"attn.out_proj.{suffix}"] = take(a + f"self_attn.out_proj.{suffix}")
                out[b + f"mlp.c_fc.{suffix}"] = take(a + f"mlp.fc1.{suffix}")
                out[b + f"mlp.c_proj.{suffix}"] = take(a + f"mlp.fc2.{suffix}")
            out[b + "attn.in_proj_weight"] = torch.cat([take(a + f"self_attn.{p}_proj.weight") for p in "qkv"])
            out[b + "attn.in_proj_bias"] = torch.cat([take(a + f"self_attn.{p}_proj.bias") for p in "qkv"])

    v, t = "vision_model.", "text_model."
    out["visual.conv1.weight"] = take(v + "embeddings.patch_embedding.weight")
    out["visual.class_embedding"] = take(v + "embeddings.class_embedding")
    out["visual.positional_embedding"] = take(v + "embeddings.position_embedding.weight")
    for suffix in ("weight", "bias"):
        out[f"visual.ln_pre.{suffix}"] = take(v + f"pre_layrnorm.{suffix}")
        out[f"visual.ln_post.{suffix}"] = take(v + f"post_layernorm.{suffix}")
        out[f"ln_final.{suffix}"] = take(t + f"final_layer_norm.{suffix}")
    blocks(v + "encoder.layers.", "visual.transformer.resblocks.")
    out["visual.proj"] = take("visual_projection.weight").t().contiguous()
    out["token_embedding.weight"] = take(t + "embeddings.token_embedding.weight")
    out["positional_embedding"] = take(t + "embeddings.position_embedding.weight")
    blocks(t + "encoder.layers.", "transformer.resblocks.")
    out["text_projection"] = take("text_projection.weight").t().contiguous()
    out["logit_scale"] = take("logit_scale")
    return out, activation


# ---------------------------------------------------------------------------------------
# TempMe training checkpoints
# ---------------------------------------------------------------------------------------

_TEMPME_LORA = re.compile(r"clip\.(visual\.transformer|transformer)\.resblocks\.(\d+)\.attn\.TVPt_LoRA_([ab])$")
_TEMPME_POS = re.compile(r"clip\.visual\.transformer\.resblocks\.(\d+)\.TVPt_Video_Positional_embedding$")
#: TempMe's defaults (main.py) for what its checkpoint does not record.
TEMPME_DEFAULTS = {"merge_layer": [8, 9, 10], "merge_frame_num": "2-2-3", "merge_token_proportion": [0.3, 0.1],
                   "tome_r": 2, "max_words": 32}


def is_tempme_state(state: Mapping[str, Any]) -> bool:
    return any(isinstance(k, str) and "TVPt_LoRA_a" in k for k in state)


def _arch_name(clip_state: Mapping[str, Tensor], source: str) -> str:
    config = infer_config({k: v for k, v in clip_state.items() if k not in NON_PARAMETER_KEYS})
    for name, arch in CLIP_ARCHS.items():
        if arch == config:
            return name
    raise WeightsError(f"{source}: its CLIP is none of {', '.join(CLIP_ARCHS)} (vision width "
                       f"{config['vision_width']}, patch {config['vision_patch_size']}, {config['vision_layers']} layers)")


def read_tempme_checkpoint(path: str) -> Tuple[Dict[str, Any], ClipWeights]:
    """TempMe's ``best.pth`` -> (a format-v1 payload for this model, its CLIP weights)."""
    source = f"TempMe checkpoint {path}"
    obj, _ = _load_object(read_user_file(path, "checkpoint"), source)
    return tempme_payload(obj, path)


def tempme_payload(obj: Any, path: str) -> Tuple[Dict[str, Any], ClipWeights]:
    """A loaded TempMe checkpoint -> (a format-v1 payload for this model, its CLIP weights).

    LoRA A/B map one to one (TempMe adds x A^T B^T to the fused qkv, as here), the clip
    position embeddings (1, frames, 1, width) per merge layer map in order, and the merge
    layers and frame factors are read off those tensors; the rest of the config is
    TempMe's defaults without STOP prompts and with meanP, as TempMe evaluates.
    """
    source = f"TempMe checkpoint {path}"
    state, _ = _unwrap(obj, source)
    if not is_tempme_state(state):
        raise WeightsError(f"{path} is not a TempMe checkpoint (no clip.*.attn.TVPt_LoRA_a tensors)")
    bad = first_non_finite(state)
    if bad is not None:
        raise WeightsError(f"{source}: tensor {bad} holds NaN or infinite values")
    clip_state, _ = _clip_state(state, None, source)
    arch = _arch_name(clip_state, source)
    depth = CLIP_ARCHS[arch]["vision_layers"]
    width = CLIP_ARCHS[arch]["vision_width"]
    text_depth = CLIP_ARCHS[arch]["transformer_layers"]
    text_width = CLIP_ARCHS[arch]["transformer_width"]

    trainable: Dict[str, Tensor] = {}
    ranks = set()
    unknown: List[str] = []
    for key, tensor in state.items():
        if "TVPt_" not in key:
            continue
        lora, pos = _TEMPME_LORA.match(key), _TEMPME_POS.match(key)
        if lora:
            tower, block, which = lora.group(1), int(lora.group(2)), lora.group(3)
            vision = tower == "visual.transformer"
            blocks, d = (depth, width) if vision else (text_depth, text_width)
            if block >= blocks:
                raise WeightsError(f"{source}: {key} names block {block} of a {blocks}-block tower")
            expected_rows, expected_cols = (None, d) if which == "a" else (3 * d, None)
            rows, cols = tensor.shape if tensor.dim() == 2 else (-1, -1)
            if tensor.dim() != 2 or (expected_cols and cols != expected_cols) or (expected_rows and rows != expected_rows):
                raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected "
                                   f"{'(r, %d)' % d if which == 'a' else '(%d, r)' % (3 * d)}")
            ranks.add(rows if which == "a" else cols)
            name = f"tempme.lora.{block}" if vision else f"text_lora.{block}"
            trainable[f"{name}.lora_{which}"] = tensor
        elif pos:
            if tensor.dim() != 4 or tensor.shape[0] != 1 or tensor.shape[2] != 1 or tensor.shape[3] != width:
                raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected (1, frames, 1, {width})")
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} TempMe tensors this model has no place for, e.g. {unknown[0]}")
    if len(ranks) != 1:
        raise WeightsError(f"{source}: LoRA ranks differ between blocks ({sorted(ranks)})")
    positions = sorted((int(_TEMPME_POS.match(k).group(1)), v) for k, v in state.items() if _TEMPME_POS.match(k))
    tempme: Dict[str, Any] = {"base_encoder": arch, "lora_dim": ranks.pop(), "prop_attn": True,
                              "merge_token_proportion": TEMPME_DEFAULTS["merge_token_proportion"],
                              "tome_r": TEMPME_DEFAULTS["tome_r"]}
    if positions:
        frames = [int(t.shape[1]) for _, t in positions]
        factors = []
        for before, after in zip(frames, frames[1:] + [1]):
            if before % after:
                raise WeightsError(f"{source}: clip position embeddings for {frames} frames do not merge by whole factors")
            factors.append(before // after)
        tempme.update(merge_layer=[layer for layer, _ in positions], merge_frame_num="-".join(map(str, factors)),
                      frame_pos=True)
        for j, (_, tensor) in enumerate(positions):
            trainable[f"tempme.clip_pos.{j}"] = tensor
        max_frames = frames[0]
    else:  # frame_pos 0: no tensor says where the merges were; TempMe's defaults
        tempme.update(merge_layer=TEMPME_DEFAULTS["merge_layer"], merge_frame_num=TEMPME_DEFAULTS["merge_frame_num"],
                      frame_pos=False)
        max_frames = 12
    config = {
        "tempme": tempme,
        "stop": {"temporal_prompt": "none", "spatial_prompt": "none", "sim_header": "meanP",
                 "pretrained_clip_name": arch},
        "max_frames": max_frames,
        "num_segments": max_frames,  # TempMe samples max_frames frames; nothing to compress
        "video_size": CLIP_ARCHS[arch]["image_resolution"],
        "max_words": TEMPME_DEFAULTS["max_words"],
        "clip_weights": TEMPME_PREFIX + path,
        "clip_activation": "quick_gelu",
    }
    from config import ConfigError, from_dict

    try:
        config = from_dict(config).to_dict()
    except ConfigError as err:
        raise WeightsError(f"{source}: its settings do not make a valid config ({err})") from None
    payload = {"format_version": 1, "config": config, "trainable": trainable, "includes_backbone": False,
               "source_format": "tempme"}
    return payload, ClipWeights(clip_state, "quick_gelu", source)

