"""CLIP (ViT image encoder + causal text transformer) with OpenAI's parameter layout.

The modules follow OpenAI CLIP's ``clip/model.py`` so that OpenAI and open_clip ViT state
dicts load with ``strict=True``. Two deliberate differences from the reference:

* every sequence is batch-first, ``(B, T, d)`` (OpenAI uses ``(T, B, d)``; the function
  is the same);
* attention is written with explicit ops (fused qkv linear, ``scaled_dot_product_attention``,
  output linear) instead of ``nn.MultiheadAttention`` so that a LoRA delta can be added to
  the fused qkv projection, the token-merging encoder can reuse the projections with its own
  attention bias, and ``torch.utils.flop_counter`` sees every matmul.

The MLP activation is a constructor argument: QuickGELU for OpenAI CLIP (and weights
fine-tuned from it), GELU for open_clip models trained from scratch. Where weights come
from (names, downloads, file formats) is modules/clip_weights.py's business; this file
only builds the network and the one random-weights CLIP (:func:`random_state_dict`).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.clip_archs import ACTIVATIONS, CLIP_ARCHS, canonical_arch_name

logger = logging.getLogger(__name__)

__all__ = [
    "QuickGELU",
    "LayerNorm",
    "Attention",
    "ResidualAttentionBlock",
    "Transformer",
    "VisionTransformer",
    "patchify",
    "CLIP",
    "build_model",
    "infer_config",
    "random_state_dict",
    "register_cpu_sdpa_flops",
    "NON_PARAMETER_KEYS",
    "CLIP_ARCHS",
]


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that the OpenAI CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, cast back afterwards.

    Keeps fp16/bf16 activations numerically safe, as OpenAI's subclass does; the affine
    parameters are cast too so fp16 weights also work.
    """

    def forward(self, x: Tensor) -> Tensor:
        orig_dtype = x.dtype
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(orig_dtype)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    Parameters: ``in_proj_weight`` (3d, d), ``in_proj_bias`` (3d,), ``out_proj`` (d -> d),
    so ``...attn.in_proj_weight`` etc. match OpenAI / open_clip state dicts.
    """

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.d_model = d_model
        self.num_heads = n_head
        self.head_dim = d_model // n_head
        self.scale = self.head_dim ** -0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Same defaults as nn.MultiheadAttention, so random models match the reference init.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def project_qkv(
        self, x: Tensor, qkv_delta: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """x (B, T, d) -> q, k, v each (B, heads, T, head_dim); q is not pre-scaled.

        ``qkv_delta`` (B, T, 3d), if given, is added to the fused projection before the
        split (the LoRA hook).
        """
        batch, length, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if qkv_delta is not None:
            qkv = qkv + qkv_delta
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def project_out(self, o: Tensor) -> Tensor:
        """Per-head outputs o (B, heads, T, head_dim) -> (B, T, d) through ``out_proj``."""
        batch, _, length, _ = o.shape
        o = o.transpose(1, 2).reshape(batch, length, self.d_model)
        return self.out_proj(o)

    def forward(
        self,
        x: Tensor,
        attn_mask: Optional[Tensor] = None,
        qkv_delta: Optional[Tensor] = None,
    ) -> Tensor:
        """x (B, T, d) -> (B, T, d).

        attn_mask: additive float mask broadcastable to (B, heads, T, T) (``-inf`` blocks),
        or None. qkv_delta: optional (B, T, 3d) added to the fused qkv projection.
        """
        q, k, v = self.project_qkv(x, qkv_delta)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                # SDPA and nn.MultiheadAttention give bool masks opposite meanings: refuse
                # rather than guess.
                raise TypeError("Attention expects an additive float attn_mask, not a bool mask")
            attn_mask = attn_mask.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.project_out(o)


def register_cpu_sdpa_flops() -> None:
    """Make torch.utils.flop_counter count scaled_dot_product_attention on CPU too.

    On CPU, SDPA runs ``aten._scaled_dot_product_flash_attention_for_cpu``, which the flop
    counter has no formula for (it only knows the CUDA kernels), so attention would count
    as free. The CPU op takes the same leading arguments as the CUDA flash kernel, so its
    formulas apply unchanged. FlopCounterMode snapshots the registry when constructed, so
    call this before creating one. Tests and benchmarks that count FLOPs call it; nothing
    calls it at import (it edits torch's global registry).
    """
    try:
        from torch.utils import flop_counter

        aten = torch.ops.aten
        same_formula = {
            aten._scaled_dot_product_flash_attention_for_cpu:
                aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                aten._scaled_dot_product_flash_attention_backward,
        }
        registry = flop_counter.flop_registry
        for cpu_op, cuda_op in same_formula.items():
            if cpu_op not in registry and cuda_op in registry:
                registry[cpu_op] = registry[cuda_op]
    except Exception as e:  # a torch without these ops: counting is only a diagnostic
        logger.debug("could not register CPU SDPA flop formulas: %s", e)


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown CLIP activation {name!r} (known: {', '.join(ACTIVATIONS)})")


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, d_model: int, n_head: int, activation: str = "quick_gelu") -> None:
        super().__init__()
        self.ln_1 = LayerNorm(d_model)
        self.attn = Attention(d_model, n_head)
        self.ln_2 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", _activation(activation)),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                adapter: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """x (B, T, d) -> (B, T, d). ``adapter`` maps ln_1(x) to a (B, T, 3d) qkv delta (LoRA)."""
        h = self.ln_1(x)
        x = x + self.attn(h, attn_mask=attn_mask, qkv_delta=adapter(h) if adapter is not None else None)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """A stack of ``layers`` residual attention blocks of width ``width``."""

    def __init__(self, width: int, layers: int, heads: int, activation: str = "quick_gelu") -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.heads = heads
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, activation) for _ in range(layers)]
        )

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                adapters: Optional[Sequence[Callable[[Tensor], Tensor]]] = None) -> Tensor:
        """x (B, T, width) -> (B, T, width); ``adapters``: one qkv adapter per block, or None."""
        for i, block in enumerate(self.resblocks):
            x = block(x, attn_mask=attn_mask, adapter=adapters[i] if adapters is not None else None)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT image encoder: patchify, class token, positions, transformer, CLS head."""

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        if input_resolution % patch_size != 0:
            raise ValueError(
                f"input_resolution {input_resolution} is not a multiple of patch_size {patch_size}"
            )
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.grid_size = input_resolution // patch_size
        self.width = width
        self.output_dim = output_dim

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(_scaled_randn(scale, width))
        self.positional_embedding = nn.Parameter(_scaled_randn(scale, self.grid_size ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(_scaled_randn(scale, width, output_dim))

    def embed(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> layer-0 tokens (B, 1 + g*g, width): conv1, CLS, pos, ln_pre."""
        # conv1 (kernel == stride, no bias) as one matrix product over the patches: the same
        # function, ~20% faster on CPU than oneDNN's strided convolution
        x = F.linear(patchify(images, self.conv1.kernel_size[0]), self.conv1.weight.flatten(1))  # (B, g*g, width)
        if x.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} give {x.shape[1]} patches; this "
                f"model expects {self.input_resolution}x{self.input_resolution} "
                f"({self.grid_size ** 2} patches)"
            )
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def head(self, cls_tokens: Tensor) -> Tensor:
        """CLS tokens (..., width) -> image features (..., output_dim): ln_post then proj."""
        return self.ln_post(cls_tokens) @ self.proj

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> features (B, output_dim), not normalised."""
        x = self.transformer(self.embed(images))
        return self.head(x[:, 0])


def _scaled_randn(scale: float, *shape: int) -> Tensor:
    """``scale * N(0, 1)`` of ``shape``; left empty on the meta device.

    build_model constructs on the meta device and loads every value afterwards; there,
    torch draws random numbers and scales through its Python reference kernels, whose
    first use imports torch._dynamo (seconds of a cold start) for tensors with no values.
    """
    empty = torch.empty(shape)
    return empty if empty.is_meta else scale * torch.randn(shape)


def patchify(images: Tensor, patch: int) -> Tensor:
    """images (B, C, H, W) -> (B, (H // patch) * (W // patch), C * patch * patch).

    Row-major patches, each flattened as (C, patch, patch) like a Conv2d weight; pixels past
    the last whole patch are dropped, as a stride-``patch`` convolution drops them.
    """
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images[:, :, : gh * patch, : gw * patch].reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * patch * patch)


class CLIP(nn.Module):
    """Contrastive image-text model with a ViT image tower and a causal text transformer."""

    def __init__(
        self,
        embed_dim: int,
        image_resolution: int,
        vision_layers: int,
        vision_width: int,
        vision_patch_size: int,
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        # Kept so a model can be rebuilt or described without its state dict.
        self.config: Dict[str, int] = dict(
            embed_dim=embed_dim,
            image_resolution=image_resolution,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=vision_patch_size,
            context_length=context_length,
            vocab_size=vocab_size,
            transformer_width=transformer_width,
            transformer_heads=transformer_heads,
            transformer_layers=transformer_layers,
        )
        self.activation = activation
        self.context_length = context_length
        self.vocab_size = vocab_size

        self.visual = VisionTransformer(
            input_resolution=image_resolution,
            patch_size=vision_patch_size,
            width=vision_width,
            layers=vision_layers,
            heads=_heads_for_width(vision_width),
            output_dim=embed_dim,
            activation=activation,
        )
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, activation)
        # on the meta device nn.Embedding is handed its (empty) weight, which skips its normal_
        # init; elsewhere it draws as it always did, so random weights stay the same numbers
        token_weight = torch.empty(vocab_size, transformer_width)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width,
                                            _weight=token_weight if token_weight.is_meta else None)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))
        # Derived from context_length, so kept out of the state dict (OpenAI's has none).
        self.register_buffer("attn_mask", _causal_mask(context_length), persistent=False)

        if not self.logit_scale.is_meta:  # meta tensors (build_model) hold no values to draw
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation of the text side (the ViT initialises itself)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width = self.transformer.width
        proj_std = (width ** -0.5) * ((2 * self.transformer.layers) ** -0.5)
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W), CLIP-normalised -> (B, embed_dim), not normalised."""
        return self.visual(images.to(self.dtype))

    def encode_text_tokens(self, tokens: Tensor, adapters: Optional[Sequence[Callable[[Tensor], Tensor]]] = None) -> Tensor:
        """token ids (B, L), L <= context_length -> hidden states (B, L, width) before ln_final.

        Shorter sequences (e.g. CLIP4Clip's max_words=32) use the first L positions and the
        matching corner of the causal mask, which gives the same result at each position.
        ``adapters``: per-block qkv adapters (e.g. LoRA), as for :class:`Transformer`.
        """
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token sequence of length {length} exceeds context_length {self.context_length}"
            )
        x = self.token_embedding(tokens).to(self.dtype)
        x = x + self.positional_embedding[:length].to(x.dtype)
        return self.transformer(x, attn_mask=self.attn_mask[:length, :length], adapters=adapters)

    def encode_text(self, tokens: Tensor, adapters: Optional[Sequence[Callable[[Tensor], Tensor]]] = None) -> Tensor:
        """token ids (B, L) -> (B, embed_dim) taken at the EOT token, not normalised.

        The EOT token has the largest id in the vocabulary, so argmax finds it (as OpenAI).
        """
        x = self.ln_final(self.encode_text_tokens(tokens, adapters))
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return eot @ self.text_projection

    def forward(self, images: Tensor, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def _heads_for_width(width: int) -> int:
    # OpenAI CLIP uses 64-dim heads; tiny test models narrower than 64 get a single head.
    return max(1, width // 64)


def _causal_mask(length: int) -> Tensor:
    """(L, L) additive mask on the CPU: 0 on and below the diagonal, -inf above.

    Made on the CPU even under a meta default device: torch's meta ``triu_`` is a Python
    reference kernel whose first use imports torch._dynamo (seconds of a cold start).
    """
    return torch.full((length, length), float("-inf"), device="cpu").triu_(1)


# ---------------------------------------------------------------------------------------
# Building from a state dict, random weights
# ---------------------------------------------------------------------------------------

# Keys found in OpenAI's TorchScript archives (and derived buffers) that are not parameters.
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

def _count_blocks(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    indices = {
        key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)
    }
    return len(indices)


def infer_config(state_dict: Mapping[str, Tensor]) -> Dict[str, int]:
    """CLIP(...) keyword arguments read off the tensor shapes of a ViT CLIP state dict."""
    if "visual.layer1.0.conv1.weight" in state_dict or "visual.attnpool.c_proj.weight" in state_dict:
        raise ValueError("only ViT CLIP checkpoints are supported (this one has a ResNet image encoder)")
    required = (
        "visual.conv1.weight", "visual.positional_embedding", "text_projection",
        "positional_embedding", "token_embedding.weight", "ln_final.weight",
    )
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not a ViT CLIP state dict: missing {', '.join(missing)}")

    vision_width = state_dict["visual.conv1.weight"].shape[0]
    vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
    num_positions = state_dict["visual.positional_embedding"].shape[0]
    grid_size = round((num_positions - 1) ** 0.5)
    if grid_size * grid_size + 1 != num_positions:
        raise ValueError(f"visual.positional_embedding has {num_positions} rows, not 1 + a square")
    transformer_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=vision_patch_size * grid_size,
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=_heads_for_width(transformer_width),
        transformer_layers=_count_blocks(state_dict, "transformer.resblocks."),
    )


def build_model(state_dict: Mapping[str, Tensor], activation: str = "quick_gelu") -> CLIP:
    """A float32 CLIP in eval mode from an OpenAI / open_clip ViT state dict (strict load).

    All sizes come from tensor shapes; head counts follow CLIP's 64-dim heads. The state
    dict does not say which MLP ``activation`` its model was trained with: the caller does
    (modules/clip_weights.py infers it from the file or name).
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in NON_PARAMETER_KEYS}
    config = infer_config(state_dict)
    # Built on the meta device: the random initialisation (seconds for ViT-B/32) would be
    # overwritten anyway. The strict load then puts the model's own float32 copies of the
    # tensors in place of every meta parameter (copies: LoRA merging and training write into
    # them, the caller's tensors stay as they were; fp16 weights become fp32). The only
    # non-persistent tensor, the causal mask, is made on the CPU by the constructor.
    with torch.device("meta"):
        model = CLIP(**config, activation=activation)
    own = {k: v.to(device="cpu", dtype=torch.float32, copy=True) for k, v in state_dict.items()}
    model.load_state_dict(own, strict=True, assign=True)
    return model.float().eval()


def random_state_dict(arch: Union[str, Mapping[str, int]] = "ViT-B/32", seed: int = 0) -> Dict[str, Tensor]:
    """State dict of a randomly initialised CLIP: the one random-CLIP builder.

    ``arch``: an architecture name ("ViT-B/32", open_clip spelling accepted) or ``CLIP(...)``
    keyword arguments (e.g. ``clip_archs.small_arch(...)``). Deterministic for a seed; the
    global RNG state is left untouched. The activation does not change the tensors.
    """
    if isinstance(arch, str):
        name = canonical_arch_name(arch)
        if name not in CLIP_ARCHS:
            raise ValueError(f"unknown CLIP architecture {arch!r}; known: {', '.join(CLIP_ARCHS)}")
        arch = CLIP_ARCHS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**arch)
    return model.state_dict()
