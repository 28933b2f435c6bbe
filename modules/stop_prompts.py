"""STOP prompt generators (DESIGN 2.6): temporal (inter-frame) and spatial (intra-frame).

Both follow the structure of STOP's ``TemporalPrompt_3`` (CVPR 2025) with its defects fixed:

* Temporal prompts run at a reduced width ``prompt_dim`` (Linear width->prompt_dim in,
  prompt_dim->width out) so the branch costs ~0.7 GMAC per 12-frame video instead of ~11,
  and the frame weight is min-max normalised over the frames of one video, never over
  the batch, so a video's prompts do not depend on the other videos it is batched with.
* Spatial prompts work on patch tokens (B, N, 49, width) instead of pixels, so the mask
  lattice is patch-aligned and the convolutions are cheap; the hard top-eta mask is made
  differentiable with a straight-through estimator so the saliency scorer learns.

Everything is batched over videos (leading dim B) and has no cross-video interaction.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from modules.module_clip import Attention

__all__ = [
    "FFTConv3d",
    "Float32Conv3d",
    "TemporalPromptGenerator",
    "SpatialPromptGenerator",
    "minmax_normalize_frames",
    "straight_through_topk_mask",
]

# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------
def minmax_normalize_frames(w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise frame scores over the frames of each video.

    Args:
        w: (B, F) raw per-frame scores.
        eps: spreads (max - min) at or below this are treated as constant.

    Returns:
        (B, F) in [0, 1]; a video whose scores are all equal (or F == 1) gets zeros.
        The reference normalises over the whole batch, which couples videos; here each
        row is normalised on its own.
    """
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    spread = hi - lo
    flat = spread <= eps
    # A safe denominator keeps the backward pass finite where the spread is ~0.
    safe = torch.where(flat, torch.ones_like(spread), spread)
    return torch.where(flat, torch.zeros_like(w), (w - lo) / safe)


def straight_through_topk_mask(
    scores: torch.Tensor, k: int, temperature: float = 1.0
) -> torch.Tensor:
    """Hard top-k mask over the last axis with a soft (sigmoid) gradient.

    Forward: exactly 1.0 at the k highest scores of each row, 0.0 elsewhere (ties broken
    by torch.topk). Backward: gradient of sigmoid((scores - t) / temperature), where t is
    the (detached) midpoint between the k-th and (k+1)-th largest scores, so the scorer
    learns to push cells across the selection boundary.

    Args:
        scores: (..., L) scores.
        k: cells kept per row (clamped to [0, L]).
        temperature: softness of the surrogate gradient.

    Returns:
        (..., L) mask, same dtype as scores.
    """
    length = scores.shape[-1]
    k = max(0, min(int(k), length))
    hard = torch.zeros_like(scores)
    if k > 0:
        idx = scores.topk(k, dim=-1).indices
        hard.scatter_(-1, idx, 1.0)
    if 0 < k < length:
        top = scores.detach().topk(k + 1, dim=-1).values
        thr = 0.5 * (top[..., k - 1 : k] + top[..., k : k + 1])
    else:
        # Everything or nothing is selected: centre the surrogate on the row mean.
        thr = scores.detach().mean(dim=-1, keepdim=True)
    soft = torch.sigmoid((scores - thr) / temperature)
    # (soft - soft.detach()) is exactly zero in forward, so the mask is exactly `hard`.
    return hard + (soft - soft.detach())


# --------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------
class FFTConv3d(nn.Conv3d):
    """``nn.Conv3d`` (stride 1, no dilation or groups) computed with FFTs, for large kernels.

    Same parameters and state-dict layout as the plain layer, same result up to float
    rounding (the product runs in float32 whatever the input dtype). STOP's temporal
    prompter convolves 1125-tap (3x15x25) kernels; oneDNN runs its 9 -> 1 channel layer at
    a few GMAC/s (~280 ms for a batch of 4 videos on 2 CPU cores, against ~20 ms here) and
    its grouped form stalls for minutes generating bf16 kernels. ``torch.utils.flop_counter``
    does not count FFTs; they cost about 1/20 of the direct convolution's MACs here.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, D, H, W) -> (B, out_channels, D', H', W'), as ``F.conv3d`` computes it."""
        dims = (-3, -2, -1)
        kernel, pad = self.kernel_size, self.padding
        # zero padding to the full linear-convolution size: no circular wrap-around
        full = tuple(n + k - 1 for n, k in zip(x.shape[-3:], kernel))
        out = tuple(n + 2 * p - k + 1 for n, p, k in zip(x.shape[-3:], pad, kernel))
        x_f = torch.fft.rfftn(x.float(), s=full, dim=dims)  # (B, C, ...)
        w_f = torch.fft.rfftn(self.weight.float().flip(dims), s=full, dim=dims)  # (O, C, ...)
        y_f = (x_f.unsqueeze(1) * w_f.unsqueeze(0)).sum(dim=2)  # (B, O, ...)
        y = torch.fft.irfftn(y_f, s=full, dim=dims)
        # cross-correlation with padding p starts at index k - 1 - p of the full convolution
        start = [k - 1 - p for k, p in zip(kernel, pad)]
        y = y[..., start[0]:start[0] + out[0], start[1]:start[1] + out[1], start[2]:start[2] + out[2]]
        return (y + self.bias.float().view(1, -1, 1, 1, 1)).to(x.dtype)


class Float32Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes in float32 under autocast too (float32 out).

    oneDNN's bf16 kernel for the temporal prompter's 1 -> 9 channel 3x15x25 convolution is
    ~8x slower on CPU than its float32 one (~0.4 s against ~0.05 s per video on one thread),
    which alone cost bf16 inference more than it gained elsewhere. Without autocast it is
    the plain layer, bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class TemporalPromptGenerator(nn.Module):
    """STOP inter-frame (temporal) prompts at reduced width (DESIGN 2.6).

    Pipeline for one video's layer-0 patch tokens (after TempMe frame compression):
      Linear width->d_p -> self-attention over all F*L tokens of the video (no residual,
      as in the reference) -> Conv3d 1->9->1 with PReLU over (frame, token, channel),
      kernel 3x15x25, same padding -> MLP over the token axis L->16->P with PReLU ->
      Linear d_p->width. Frame weight w_t: Conv3d 1->1 (kernel 5x11x11) on the attention
      output, averaged per frame, min-max normalised over the video's frames.
      dynamic = dynamic_scale * (1 + w_t) * prompt.

    Deep prompts: the encoder (``tempme_encoder.PromptInputs.for_layer``) sets the prompt
    slots of block ``l`` to ``base_prompts[l] + dynamic`` (the reference also shares one
    dynamic prompt across layers). ``prompt_log_size_gate[l]`` is added by the encoder
    to the attention logits of prompt keys (proportional attention's log-size term); its
    init of -4 makes prompt keys nearly invisible, so an untrained model stays close to
    plain CLIP.

    Args:
        width: token width of the vision transformer (768 for ViT-B).
        num_prompts: P, prompts per frame.
        num_layers: number of vision blocks receiving deep prompts.
        prompt_dim: d_p, internal width of the branch.
        num_heads: attention heads at d_p.
        num_patches: L, patch tokens per frame (49 for B/32 at 224 px).
        dynamic_scale: the reference's 0.05 factor.
    """

    def __init__(
        self,
        width: int = 768,
        num_prompts: int = 4,
        num_layers: int = 12,
        prompt_dim: int = 96,
        num_heads: int = 4,
        num_patches: int = 49,
        dynamic_scale: float = 0.05,
    ) -> None:
        super().__init__()
        self.width = width
        self.num_prompts = num_prompts
        self.num_layers = num_layers
        self.prompt_dim = prompt_dim
        self.num_patches = num_patches
        self.dynamic_scale = dynamic_scale

        self.in_proj = nn.Linear(width, prompt_dim)
        self.attn = Attention(prompt_dim, num_heads)
        k = (3, 15, 25)  # (frame, token, channel) as in the reference
        pad = tuple((s - 1) // 2 for s in k)
        self.volume_conv = nn.Sequential(
            Float32Conv3d(1, 9, kernel_size=k, padding=pad),
            nn.PReLU(),
            FFTConv3d(9, 1, kernel_size=k, padding=pad),
        )
        self.token_mlp = nn.Sequential(
            nn.Linear(num_patches, 16),
            nn.PReLU(),
            nn.Linear(16, num_prompts),
        )
        self.out_proj = nn.Linear(prompt_dim, width)
        kw = (5, 11, 11)
        self.frame_weight_conv = FFTConv3d(1, 1, kernel_size=kw, padding=tuple((s - 1) // 2 for s in kw))

        self.base_prompts = nn.Parameter(torch.empty(num_layers, num_prompts, width))
        nn.init.normal_(self.base_prompts, std=0.02)
        self.prompt_log_size_gate = nn.Parameter(torch.full((num_layers,), -4.0))

    def frame_weights(
        self, hidden: torch.Tensor, saliency: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Per-frame weight w_t in [0, 1].

        Args:
            hidden: (B, F, L, d_p) attention output.
            saliency: optional (B, F, L) token weights in [0, 1]; as in the reference,
                salient tokens count double in the frame average (v + v * s).

        Returns:
            (B, F), min-max normalised over each video's frames.
        """
        v = self.frame_weight_conv(hidden.unsqueeze(1)).squeeze(1)  # (B, F, L, d_p)
        if saliency is not None:
            v = v + v * saliency.to(v.dtype).unsqueeze(-1)
        return minmax_normalize_frames(v.mean(dim=(2, 3)))

    def attend(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """The branch's attention output: (B, F, L, width) patch tokens -> (B, F, L, d_p).

        One sequence of F*L tokens per video: frames exchange information here.
        """
        b, f, length, d = patch_tokens.shape
        if length != self.num_patches or d != self.width:
            raise ValueError(
                f"expected patch tokens (B, F, {self.num_patches}, {self.width}), "
                f"got {tuple(patch_tokens.shape)}"
            )
        h = self.in_proj(patch_tokens)  # (B, F, L, d_p)
        h = self.attn(h.reshape(b, f * length, self.prompt_dim))
        return h.reshape(b, f, length, self.prompt_dim)

    def forward(self, patch_tokens: torch.Tensor, saliency: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dynamic prompts for each frame.

        Args:
            patch_tokens: (B, F, L, width) layer-0 patch tokens (CLS excluded).
            saliency: optional (B, F, L) token weights for the frame weight.

        Returns:
            dynamic (B, F, P, width) = dynamic_scale * (1 + w) * prompt, with w the
            :meth:`frame_weights` of :meth:`attend`'s output.
        """
        h = self.attend(patch_tokens)  # (B, F, L, d_p)
        w = self.frame_weights(h, saliency)  # (B, F)
        v = self.volume_conv(h.unsqueeze(1)).squeeze(1)  # (B, F, L, d_p)
        p = self.token_mlp(v.transpose(-1, -2)).transpose(-1, -2)  # (B, F, P, d_p)
        p = self.out_proj(p)  # (B, F, P, width)
        return self.dynamic_scale * (1.0 + w)[:, :, None, None] * p


class SpatialPromptGenerator(nn.Module):
    """STOP intra-frame (spatial) prompts at patch resolution (DESIGN 2.6).

    For patch tokens x (B, N, grid*grid, width) of N sampled frames:
      h0 = Linear width->hidden (x); prompt p = Linear hidden->width (zero-init) of a
      Conv3d stack (3x3x3, PReLU, x2) over the (frame, grid, grid) volume of h0; a saliency
      Conv3d (hidden->1, 3x3x3) on h0 scores every cell; the top ``eta`` cells per frame
      get the prompt doubled through a straight-through mask:
          out = x + scale * p + scale * p * mask.
    The zero-initialised output layer makes an untrained generator an exact identity.

    Args:
        width: token width (768 for ViT-B).
        hidden: channels of the convolutional branch.
        grid: patches per side (7 for B/32 at 224 px).
        eta: salient cells per frame.
        scale: the reference's 0.05 factor.
    """

    def __init__(
        self,
        width: int = 768,
        hidden: int = 32,
        grid: int = 7,
        eta: int = 6,
        scale: float = 0.05,
    ) -> None:
        super().__init__()
        self.width = width
        self.hidden = hidden
        self.grid = grid
        self.eta = eta
        self.scale = scale

        self.in_proj = nn.Linear(width, hidden)
        self.conv_stack = nn.Sequential(
            nn.Conv3d(hidden, hidden, kernel_size=3, padding=1),
            nn.PReLU(),
            nn.Conv3d(hidden, hidden, kernel_size=3, padding=1),
            nn.PReLU(),
        )
        self.scorer = nn.Conv3d(hidden, 1, kernel_size=3, padding=1)
        self.out_proj = nn.Linear(hidden, width)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def prompts_and_scores(self, patch_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The prompt p (B, N, grid*grid, width) and the saliency scores (B, N, grid*grid).

        Args:
            patch_tokens: (B, N, grid*grid, width), CLS excluded.
        """
        b, n, length, d = patch_tokens.shape
        g = self.grid
        if length != g * g or d != self.width:
            raise ValueError(
                f"expected patch tokens (B, N, {g * g}, {self.width}), "
                f"got {tuple(patch_tokens.shape)}"
            )
        h0 = self.in_proj(patch_tokens)  # (B, N, L, hidden)
        vol = h0.reshape(b, n, g, g, self.hidden).permute(0, 4, 1, 2, 3)  # (B, C, N, g, g)
        scores = self.scorer(vol).reshape(b, n, length)  # (B, N, L)
        h = self.conv_stack(vol).permute(0, 2, 3, 4, 1).reshape(b, n, length, self.hidden)
        return self.out_proj(h), scores

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Add spatial prompts to patch tokens: (B, N, grid*grid, width) -> same shape.

        The mask is ``straight_through_topk_mask(scores, eta)`` of :meth:`prompts_and_scores`.
        """
        p, scores = self.prompts_and_scores(patch_tokens)
        mask = straight_through_topk_mask(scores, self.eta)
        return patch_tokens + self.scale * p + self.scale * p * mask.unsqueeze(-1)
