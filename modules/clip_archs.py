"""The CLIP architectures this project knows, as plain data (no torch import).

One home for the facts that config validation (config.py), the CLIP builder
(modules/module_clip.py) and the weights resolver (modules/clip_weights.py) share:
layer counts and widths of OpenAI's ViT CLIPs, the MLP activations a CLIP may use, and
the default TempMe merge schedule of each architecture.
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = [
    "CLIP_ARCHS",
    "ENCODER_DEPTH",
    "ACTIVATIONS",
    "DEFAULT_MERGE_SCHEDULES",
    "canonical_arch_name",
    "small_arch",
]

#: Architectures of OpenAI's ViT CLIPs, as ``module_clip.CLIP(...)`` keyword arguments.
CLIP_ARCHS: Dict[str, Dict[str, int]] = {
    "ViT-B/32": dict(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
        vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
        transformer_heads=8, transformer_layers=12,
    ),
    "ViT-B/16": dict(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
        vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
        transformer_heads=8, transformer_layers=12,
    ),
    "ViT-L/14": dict(
        embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
        vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
        transformer_heads=12, transformer_layers=12,
    ),
}

#: Vision transformer depth per architecture (merge layers are validated against it
#: before any weights are loaded; the encoder re-checks against the real weights).
ENCODER_DEPTH: Dict[str, int] = {name: arch["vision_layers"] for name, arch in CLIP_ARCHS.items()}

#: MLP activations: OpenAI CLIP (and weights fine-tuned from it) uses QuickGELU,
#: x * sigmoid(1.702 x); open_clip models trained from scratch (LAION, DataComp) use GELU.
ACTIVATIONS = ("quick_gelu", "gelu")

#: TempMe merge schedule per architecture (config keys of the ``tempme`` section).
#: ViT-B/32 is TempMe's published setting (main.py defaults). TempMe publishes no other
#: schedule, so B/16 and L/14 are derived from it by keeping its proportions:
#: * tome_r: ImgMe removes about a third of each frame's patches before the first clip
#:   merge (B/32: 8 layers x 2 of 49). B/16 has 196 patches: 8 x 8 = 64 (33 %); L/14 has
#:   256 patches and 16 ImgMe layers: 16 x 5 = 80 (31 %).
#: * merge_layer: the clip merges start two thirds of the way up (B/32: block 8 of 12) and
#:   are spaced one twelfth of the depth apart; L/14 (24 blocks): 16, 18, 20.
DEFAULT_MERGE_SCHEDULES: Dict[str, Dict[str, Any]] = {
    "ViT-B/32": {"merge_layer": [8, 9, 10], "merge_frame_num": "2-2-3", "tome_r": 2},
    "ViT-B/16": {"merge_layer": [8, 9, 10], "merge_frame_num": "2-2-3", "tome_r": 8},
    "ViT-L/14": {"merge_layer": [16, 18, 20], "merge_frame_num": "2-2-3", "tome_r": 5},
}


def canonical_arch_name(name: str) -> str:
    """Accept open_clip spellings ("ViT-B-32") for OpenAI names ("ViT-B/32"); other names unchanged."""
    for known in CLIP_ARCHS:
        if name == known or name == known.replace("/", "-"):
            return known
    return name


def small_arch(image_resolution: int = 64, patch_size: int = 16, vision_width: int = 128,
               vision_layers: int = 4, text_width: int = 128, text_layers: int = 4,
               embed_dim: int = 0) -> Dict[str, int]:
    """``CLIP(...)`` keyword arguments of a small CLIP (demos, tests, benchmarks).

    The text tower keeps CLIP's 77-token context and 49408-token vocabulary (the tokenizer
    emits ids up to 49407). ``embed_dim`` 0 means ``text_width`` (seqTransf's CLIP
    initialisation needs them equal).
    """
    return dict(
        embed_dim=embed_dim or text_width, image_resolution=image_resolution, vision_layers=vision_layers,
        vision_width=vision_width, vision_patch_size=patch_size, context_length=77, vocab_size=49408,
        transformer_width=text_width, transformer_heads=max(1, text_width // 64), transformer_layers=text_layers,
    )
