"""Video heads: frame features -> one video embedding (DESIGN 2.7).

* ``meanP``: size-weighted mean of the L2-normalised frame features, L2-normalised.
* ``seqTransf``: CLIP4Clip's sequential transformer header. As in CLIP4Clip's
  ``_loose_similarity``: the *un-normalised* projected frame features get learnable frame
  position embeddings, pass through a small transformer of CLIP text blocks (additive key
  mask for padded frames), the original features are added back (residual), and only then
  are frames L2-normalised and mean-pooled (meanP above).

Frame "sizes" are TempMe group sizes (how many sampled frames a compressed frame stands
for); they play the role of CLIP4Clip's video_mask (size 0 = padding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from config import SIM_HEADERS
from modules.module_clip import Transformer

__all__ = [
    "load_cross_config",
    "mean_pool",
    "MeanPoolHead",
    "SeqTransfHead",
    "build_head",
    "SIM_HEADERS",
]

_CONFIG_DIR = Path(__file__).resolve().parent


def load_cross_config(name: str = "cross-base") -> Dict[str, Any]:
    """Read ``modules/<name>/cross_config.json`` (CLIP4Clip's cross-model config).

    Raises ValueError naming ``name`` when it is not a config shipped in modules/.
    """
    # Only plain directory names: a cross_model value must not reach outside modules/.
    path = _CONFIG_DIR / str(name) / "cross_config.json"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", str(name)) or not path.is_file():
        known = sorted(p.parent.name for p in _CONFIG_DIR.glob("*/cross_config.json"))
        raise ValueError(f"unknown cross_model {name!r}; available: {known}")
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def mean_pool(frame_features: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Size-weighted mean of L2-normalised frame features, L2-normalised (meanP).

    Args:
        frame_features: (B, F, D), any scale.
        sizes: (B, F) non-negative frame weights (TempMe group sizes; 0 = padding), or
            None for equal weights.

    Returns:
        (B, D) float32, unit norm (a video whose sizes are all zero gives zeros).
    """
    feats = F.normalize(frame_features.float(), dim=-1)
    if sizes is None:
        pooled = feats.mean(dim=1)
    else:
        w = sizes.to(device=feats.device, dtype=feats.dtype).unsqueeze(-1)  # (B, F, 1)
        # The denominator only rescales before the final normalisation; the clamp just
        # keeps all-padding rows finite.
        pooled = (feats * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-12)
    return F.normalize(pooled, dim=-1)


def _key_padding_bias(sizes: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive attention bias (B, 1, 1, F) that hides frames of size 0 (None if no sizes).

    Videos with no valid frame are left unmasked so softmax never sees an all -inf row;
    their frames carry zero weight in the pooling anyway.
    """
    if sizes is None:
        return None
    # Built unconditionally (a zero bias changes nothing) to avoid a host sync on CUDA.
    valid = sizes > 0
    valid = valid | ~valid.any(dim=1, keepdim=True)
    bias = torch.zeros(valid.shape, dtype=dtype, device=sizes.device)
    bias = bias.masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :]


class MeanPoolHead(nn.Module):
    """Parameter-free meanP head: forward(frame_features (B,F,D), sizes (B,F)|None) -> (B,D)."""

    def forward(
        self, frame_features: torch.Tensor, sizes: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return mean_pool(frame_features, sizes)

    def init_from_clip(self, clip_model: nn.Module) -> None:
        """Nothing to initialise (kept so every head has the same interface)."""


class SeqTransfHead(nn.Module):
    """CLIP4Clip's seqTransf header.

    Parameters: ``frame_position_embeddings`` nn.Embedding(max_position_embeddings, width)
    and ``transformer`` (num_hidden_layers CLIP residual blocks, num_attention_heads heads),
    both meant to be initialised from the CLIP text tower with :meth:`init_from_clip`
    (text positions 0.. and text blocks 0..num_hidden_layers-1), as CLIP4Clip does.

    Args:
        cross_config: dict from :func:`load_cross_config`.
        width: frame feature dim (CLIP embed dim, 512 for ViT-B). CLIP4Clip's config
            hidden_size (512) and CLIP's text width must both equal it for the CLIP
            initialisation to apply.
    """

    def __init__(self, cross_config: Mapping[str, Any], width: int = 512) -> None:
        super().__init__()
        self.width = width
        self.num_layers = int(cross_config["num_hidden_layers"])
        self.num_heads = int(cross_config["num_attention_heads"])
        self.max_frames = int(cross_config["max_position_embeddings"])
        self.frame_position_embeddings = nn.Embedding(self.max_frames, width)
        self.transformer = Transformer(width, self.num_layers, self.num_heads)

    @torch.no_grad()
    def init_from_clip(self, clip_model: nn.Module) -> None:
        """Copy CLIP text positional embeddings (first rows) and text blocks 0..L-1.

        Args:
            clip_model: a ``modules.module_clip.CLIP`` (anything with
                ``positional_embedding`` (ctx, width) and ``transformer.resblocks``).
        """
        pos = clip_model.positional_embedding
        if pos.shape[-1] != self.width:
            raise ValueError(
                f"CLIP text width {pos.shape[-1]} does not match seqTransf width {self.width}"
            )
        rows = min(pos.shape[0], self.max_frames)
        self.frame_position_embeddings.weight[:rows].copy_(pos[:rows])

        blocks = clip_model.transformer.resblocks
        if len(blocks) < self.num_layers:
            raise ValueError(
                f"CLIP text tower has {len(blocks)} blocks; seqTransf needs {self.num_layers}"
            )
        for i, dst in enumerate(self.transformer.resblocks):
            src = blocks[i].state_dict()
            # Extra tensors on the source (e.g. LoRA adapters) are ignored; every tensor
            # of the head's block must be present.
            missing = [k for k in dst.state_dict() if k not in src]
            if missing:
                raise ValueError(f"CLIP text block {i} lacks {missing}")
            dst.load_state_dict({k: src[k] for k in dst.state_dict()}, strict=True)

    def forward(
        self, frame_features: torch.Tensor, sizes: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Video embedding from frame features.

        Args:
            frame_features: (B, F, width) projected CLS features, NOT normalised
                (CLIP4Clip feeds the raw visual output).
            sizes: (B, F) frame weights (0 = padding) or None.

        Returns:
            (B, width) float32, unit norm.
        """
        b, f, d = frame_features.shape
        if f > self.max_frames:
            raise ValueError(f"{f} frames exceed max_position_embeddings {self.max_frames}")
        if d != self.width:
            raise ValueError(f"frame features have dim {d}, seqTransf width is {self.width}")
        ids = torch.arange(f, device=frame_features.device)
        x = frame_features + self.frame_position_embeddings(ids).to(frame_features.dtype)
        x = self.transformer(x, attn_mask=_key_padding_bias(sizes, x.dtype))
        # Residual around the whole header, as CLIP4Clip: an identity-ish start.
        x = x + frame_features
        return mean_pool(x, sizes)


def build_head(sim_header: str, cross_model: str = "cross-base", width: int = 512) -> nn.Module:
    """Head for ``stop.sim_header``: "meanP" (parameter-free) or "seqTransf".

    The result has ``forward(frame_features (B,F,width), sizes (B,F)|None) -> (B,width)``
    and ``init_from_clip(clip_model)``. Unknown names raise ValueError naming them.
    """
    if sim_header == "meanP":
        return MeanPoolHead()
    if sim_header == "seqTransf":
        return SeqTransfHead(load_cross_config(cross_model), width=width)
    raise ValueError(f"unknown sim_header {sim_header!r}; expected one of {list(SIM_HEADERS)}")
