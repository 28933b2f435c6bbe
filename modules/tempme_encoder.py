"""TempMe's visual encoder: CLIP blocks with LoRA, ImgMe and ClipMe token merging.

DESIGN.md section 2.5, following TempMe's reference (tvr/models/module_tome_patch.py):

* blocks before the first merge layer (ImgMe): attention with proportional attention,
  then ``tome_r`` tokens of each frame merged by bipartite soft matching on the keys;
* a merge layer with factor k (ClipMe): k consecutive sequences regrouped into one clip
  (protected tokens first), the layer's clip position embedding added, a cross-clip
  merge of r0 tokens on the hidden states, attention, an intra-clip merge of r1 tokens;
* blocks after the last merge layer: intra-clip merging only.

Protected tokens (each frame's CLS and its STOP temporal prompts) are never merged. All
bookkeeping (token sizes, number of protected tokens, frames per sequence) travels in
:class:`TokenState`, returned by every step, instead of a dict shared between layers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from config import MergeSchedule  # the schedule's one home (parsed and validated from TempMeConfig)
from modules.lora import LoRAQKV, merge_lora_weights
from modules.token_merging import bipartite_soft_matching, merge_wavg

__all__ = [
    "MergeSchedule",
    "PromptInputs",
    "TokenState",
    "TempMeEncoder",
    "clip_merge_counts",
    "intra_merge_count",
    "block_merge_counts",
    "regroup_clips",
    "merge_trace",
]


def clip_merge_counts(tokens: int, protected: int, factor: int, clip_ratio: float, intra_ratio: float) -> Tuple[int, int]:
    """Tokens removed at a ClipMe layer: (r0 cross-clip, r1 intra-clip), as TempMe computes them.

    ``tokens`` (T) and ``protected`` (c) are per sequence *before* k sequences are joined.
    """
    r0 = min(int(tokens * factor * clip_ratio), (tokens - protected) * factor // 2)
    r1 = min(int((tokens * factor - r0) * intra_ratio), ((tokens - protected) * factor - r0) // 2)
    return r0, r1


def intra_merge_count(tokens: int, protected: int, intra_ratio: float) -> int:
    """Tokens removed by the intra-clip merge of a block after the last merge layer."""
    return min(int(tokens * intra_ratio), (tokens - protected) // 2)


def block_merge_counts(schedule: MergeSchedule, layer: int, tokens: int, protected: int) -> Tuple[int, int, int]:
    """What block ``layer`` merges: (clip factor k, r0 before attention, r_intra after it).

    ``tokens`` and ``protected`` are per sequence entering the block. ImgMe blocks (before
    the first merge layer, or all blocks when there is none) merge ``tome_r`` per frame;
    a merge layer joins k sequences and merges r0 across clips; later blocks merge R_I.
    """
    factor = schedule.factor_at(layer)
    if factor > 1:
        r0, r1 = clip_merge_counts(tokens, protected, factor, schedule.clip_ratio, schedule.intra_ratio)
        return factor, r0, r1
    if not schedule.merge_layers or layer < schedule.merge_layers[0]:
        return 1, 0, min(schedule.tome_r, (tokens - protected) // 2)
    return 1, 0, intra_merge_count(tokens, protected, schedule.intra_ratio)


def regroup_clips(x: torch.Tensor, factor: int, protected: int) -> torch.Tensor:
    """Join ``factor`` consecutive sequences into one, protected tokens of all of them first.

    x (S, T, C) -> (S / factor, factor * T, C): [prot_1 .. prot_k, rest_1 .. rest_k].
    """
    seqs, tokens, channels = x.shape
    x = x.reshape(seqs // factor, factor, tokens, channels)
    head = x[:, :, :protected].reshape(seqs // factor, factor * protected, channels)
    tail = x[:, :, protected:].reshape(seqs // factor, factor * (tokens - protected), channels)
    return torch.cat([head, tail], dim=1)


@dataclass
class TokenState:
    """Tokens of all sequences of a batch between two encoder steps.

    x: (S, T, C) hidden states, S = videos * sequences per video.
    size: (S, T, 1) how many original patch tokens (times frame-group size) each token holds.
    protected: leading tokens per sequence that are never merged (CLS and prompts of each frame).
    frames_per_seq: frames joined into each sequence so far.
    """

    x: torch.Tensor
    size: torch.Tensor
    protected: int
    frames_per_seq: int


@dataclass
class PromptInputs:
    """STOP temporal prompts as the encoder consumes them.

    dynamic: (B, F, P, C) per-video dynamic prompts; base: (L, P, C) per-layer learnable
    base prompts; log_size_gate: (L,) added to the attention bias of prompt keys.
    """

    dynamic: torch.Tensor
    base: torch.Tensor
    log_size_gate: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return self.dynamic.shape[2]

    def for_layer(self, layer: int) -> torch.Tensor:
        """The prompt tokens of block ``layer``: base[layer] + dynamic, (B, F, P, C)."""
        return self.base[layer] + self.dynamic


def _set_prompt_slots(state: TokenState, prompts: torch.Tensor) -> TokenState:
    """Overwrite each frame's prompt slots (after its CLS) with ``prompts`` (S, fps, P, C)."""
    seqs, fps, num_prompts, channels = prompts.shape
    x = state.x
    head = x[:, : state.protected].reshape(seqs, fps, 1 + num_prompts, channels)
    head = torch.cat([head[:, :, :1], prompts.to(x.dtype)], dim=2).reshape(seqs, state.protected, channels)
    return replace(state, x=torch.cat([head, x[:, state.protected:]], dim=1))


def _prompt_key_mask(state: TokenState, num_prompts: int) -> torch.Tensor:
    """(T,) 1.0 at prompt positions of the protected block, 0.0 elsewhere."""
    per_frame = torch.zeros(1 + num_prompts, device=state.x.device, dtype=state.x.dtype)
    per_frame[1:] = 1.0
    mask = torch.zeros(state.x.shape[1], device=state.x.device, dtype=state.x.dtype)
    mask[: state.protected] = per_frame.repeat(state.frames_per_seq)
    return mask


def _attention(block: nn.Module, lora: Optional[LoRAQKV], state: TokenState, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual attention of one CLIP block with optional LoRA and additive key bias.

    Returns the new hidden states (S, T, C) and the merge metric: keys averaged over heads
    (S, T, C/heads), as TempMe's reference uses them.
    """
    h = block.ln_1(state.x)
    delta = lora(h) if lora is not None else None
    q, k, v = block.attn.project_qkv(h, qkv_delta=delta)
    # SDPA (flop_counter counts its CPU kernel after module_clip.register_cpu_sdpa_flops()).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    x = state.x + block.attn.project_out(out)
    return x, k.mean(dim=1)


def _merge(state: TokenState, metric: torch.Tensor, r: int, x: Optional[torch.Tensor] = None) -> TokenState:
    """Bipartite-merge ``r`` tokens of every sequence (size-weighted)."""
    x = state.x if x is None else x
    if r <= 0:
        return replace(state, x=x)
    plan = bipartite_soft_matching(metric, r, num_protected=state.protected)
    x, size = merge_wavg(plan, x, state.size)
    return replace(state, x=x, size=size)


class TempMeEncoder(nn.Module):
    """The trainable TempMe parts (LoRA, clip position embeddings) and the merging forward.

    The frozen CLIP ``visual`` tower is passed to :meth:`forward` rather than stored, so its
    weights live in exactly one place of the parent model's state dict.
    """

    def __init__(self, width: int, layers: int, num_frames: int, schedule: MergeSchedule, lora_dim: int = 8):
        super().__init__()
        schedule.check(num_frames, layers)  # the config checked its named encoder; these are the real blocks
        self.schedule = schedule
        self.num_frames = num_frames
        self.lora = nn.ModuleList(LoRAQKV(width, lora_dim) for _ in range(layers)) if lora_dim > 0 else None
        if schedule.frame_pos and schedule.merge_layers:
            # Zero-init: an untrained model sees no clip-order signal until training sets it.
            self.clip_pos = nn.ParameterList(
                nn.Parameter(torch.zeros(1, clips, 1, width)) for clips in schedule.clips_before_merges(num_frames)
            )
        else:
            self.clip_pos = None

    @torch.no_grad()
    def merge_lora(self, visual: nn.Module) -> bool:
        """Fold the vision LoRA into ``visual``'s qkv weights and drop the adapters (inference).

        Returns whether there was anything to fold. Forward then simply has no adapters.
        """
        if self.lora is None:
            return False
        merge_lora_weights((b.attn for b in visual.transformer.resblocks), self.lora)
        self.lora = None
        return True

    def _lora(self, layer: int) -> Optional[LoRAQKV]:
        return None if self.lora is None else self.lora[layer]

    def _bias(self, state: TokenState, prompts: Optional[PromptInputs], layer: int) -> Optional[torch.Tensor]:
        """Additive key bias (S, 1, 1, T): log token size (proportional attention) + prompt gate."""
        bias = None
        if self.schedule.prop_attn:
            bias = state.size.log().to(state.x.dtype)[:, None, None, :, 0]
        if prompts is not None:
            gate = _prompt_key_mask(state, prompts.num_prompts) * prompts.log_size_gate[layer].to(state.x.dtype)
            bias = gate.view(1, 1, 1, -1) if bias is None else bias + gate
        return bias

    def forward(
        self,
        visual: nn.Module,
        tokens: torch.Tensor,
        frame_sizes: Optional[torch.Tensor] = None,
        prompts: Optional[PromptInputs] = None,
    ) -> Tuple[torch.Tensor, TokenState]:
        """Encode layer-0 frame tokens.

        tokens: (B, F, T0, C) output of conv1 + class/pos embedding + ln_pre (+ spatial prompt),
        F = ``num_frames``; frame_sizes: (B, F) frames each compressed frame stands for.
        Returns the frame CLS hidden states (B, F, C) (before ln_post) and the final state.
        """
        batch, frames, tokens0, channels = tokens.shape
        if frames != self.num_frames:
            raise ValueError(f"encoder built for {self.num_frames} frames, got {frames}")
        x = tokens.reshape(batch * frames, tokens0, channels)
        if frame_sizes is None:
            frame_sizes = torch.ones(batch, frames, device=x.device)
        size = frame_sizes.reshape(batch * frames, 1, 1).to(torch.float32).expand(-1, tokens0, 1)
        protected = 1
        if prompts is not None:
            slots = torch.zeros(batch * frames, prompts.num_prompts, channels, device=x.device, dtype=x.dtype)
            x = torch.cat([x[:, :1], slots, x[:, 1:]], dim=1)
            size = torch.cat([size[:, :1].expand(-1, 1 + prompts.num_prompts, 1), size[:, 1:]], dim=1)
            protected += prompts.num_prompts
        state = TokenState(x=x, size=size.contiguous(), protected=protected, frames_per_seq=1)

        for layer, block in enumerate(visual.transformer.resblocks):
            if prompts is not None:
                layer_prompts = prompts.for_layer(layer)  # (B, F, P, C)
                seqs = state.x.shape[0]
                state = _set_prompt_slots(state, layer_prompts.reshape(seqs, state.frames_per_seq, prompts.num_prompts, channels))
            factor, r_clip, r_intra = block_merge_counts(self.schedule, layer, state.x.shape[1], state.protected)
            if factor > 1:
                state = self._join_clips(state, layer, factor, r_clip, batch)
            x, metric = _attention(block, self._lora(layer), state, self._bias(state, prompts, layer))
            state = _merge(state, metric, r_intra, x=x)
            state = replace(state, x=state.x + block.mlp(block.ln_2(state.x)))

        cls = self._frame_cls(state, batch, prompts.num_prompts if prompts is not None else 0)
        return cls, state

    def _join_clips(self, state: TokenState, layer: int, factor: int, r_clip: int, batch: int) -> TokenState:
        """ClipMe step before attention: regroup, add clip positions, merge ``r_clip`` across clips."""
        protected = state.protected
        metric = regroup_clips(state.x.detach(), factor, protected)
        x = state.x
        if self.clip_pos is not None:
            pos = self.clip_pos[self.schedule.merge_layers.index(layer)]  # (1, clips, 1, C)
            clips = pos.shape[1]
            x = x + pos.reshape(clips, -1).repeat(batch, 1)[:, None, :].to(x.dtype)
        joined = TokenState(
            x=regroup_clips(x, factor, protected),
            size=regroup_clips(state.size, factor, protected),
            protected=protected * factor,
            frames_per_seq=state.frames_per_seq * factor,
        )
        return _merge(joined, metric, r_clip)

    @staticmethod
    def _frame_cls(state: TokenState, batch: int, num_prompts: int) -> torch.Tensor:
        """Each frame's CLS hidden state, in frame order: (B, F, C)."""
        seqs, _, channels = state.x.shape
        head = state.x[:, : state.protected].reshape(seqs, state.frames_per_seq, 1 + num_prompts, channels)
        return head[:, :, 0].reshape(batch, -1, channels)


def merge_trace(schedule: MergeSchedule, num_frames: int, depth: int = 12, tokens: int = 50, protected: int = 1) -> List[Tuple[int, int, int]]:
    """(layer, sequences per video, tokens per sequence) after each block, computed without tensors.

    For the TempMe defaults on ViT-B/32 this ends at (11, 1, 97): 12 CLS + 85 merged tokens.
    """
    seqs, trace = num_frames, []
    for layer in range(depth):
        factor, r_clip, r_intra = block_merge_counts(schedule, layer, tokens, protected)
        tokens, protected, seqs = tokens * factor - r_clip - r_intra, protected * factor, seqs // factor
        trace.append((layer, seqs, tokens))
    return trace
