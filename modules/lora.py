"""LoRA on the fused qkv projection, in TempMe's form (DESIGN.md section 2.3).

delta = x A^T B^T with A (r, d) kaiming-uniform(a=sqrt 5) and B (3d, r) zeros, no alpha
scaling; the delta is added to the fused q|k|v projection before q is scaled. Because B
starts at zero an untrained adapter leaves CLIP's function unchanged.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRAQKV", "merge_lora_weights"]


class LoRAQKV(nn.Module):
    """Low-rank update of one attention block's fused qkv projection."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.lora_a = nn.Parameter(torch.empty(rank, width))
        self.lora_b = nn.Parameter(torch.zeros(3 * width, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> qkv delta (..., 3d)."""
        return F.linear(F.linear(x, self.lora_a), self.lora_b)

    def delta_weight(self) -> torch.Tensor:
        """The dense update B A (3d, d) that folds into ``in_proj_weight``."""
        return self.lora_b @ self.lora_a


@torch.no_grad()
def merge_lora_weights(attentions: Iterable[nn.Module], adapters: Iterable[LoRAQKV]) -> None:
    """Fold each adapter into its attention's ``in_proj_weight`` (in place).

    After this the adapters must no longer be applied: the same function is computed with
    one matmul less per block.
    """
    for attn, lora in zip(attentions, adapters, strict=True):
        attn.in_proj_weight.add_(lora.delta_weight().to(attn.in_proj_weight.dtype))
