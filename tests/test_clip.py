"""modules/module_clip.py against open_clip's reference CLIP (random weights, CPU)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from modules.module_clip import (
    CLIP,
    CLIP_ARCHS,
    Attention,
    LayerNorm,
    QuickGELU,
    build_model,
    infer_config,
    patchify,
    random_state_dict,
    register_cpu_sdpa_flops,
)
from modules.tokenization_clip import tokenize, tokenize_for_model

open_clip = pytest.importorskip("open_clip")
register_cpu_sdpa_flops()  # this file counts FLOPs, attention included

TINY = dict(
    embed_dim=32, image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16,
    context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1,
    transformer_layers=2,
)
SENTENCES = [
    "a photo of a cat",
    "A man is playing the guitar on stage while people dance & sing.",
    "two dogs running on the beach at sunset",
    "",
    "word " * 100,  # truncated to the context length
]


@pytest.fixture(scope="module")
def reference():
    """open_clip's OpenAI-style ViT-B/32 (QuickGELU) with seed-0 random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    return model.eval()


@pytest.fixture(scope="module")
def ours(reference):
    return build_model(reference.state_dict())


def test_build_model_infers_vit_b32(ours):
    assert ours.config == CLIP_ARCHS["ViT-B/32"]
    assert ours.visual.transformer.heads == 12
    assert not ours.training
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    # The causal mask is derived, not a parameter: not in the state dict.
    assert "attn_mask" not in ours.state_dict()
    assert torch.equal(ours.attn_mask, torch.full((77, 77), float("-inf")).triu(1))


def test_state_dict_round_trip_is_strict(reference, ours):
    ref_sd = reference.state_dict()
    our_sd = ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)


@torch.no_grad()
def test_encode_image_matches_open_clip(reference, ours):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = reference.encode_image(images)
    actual = ours.encode_image(images)
    assert actual.shape == (2, 512)
    assert (actual - expected).abs().max().item() < 1e-4


@torch.no_grad()
def test_encode_text_matches_open_clip(reference, ours):
    real = tokenize(SENTENCES)
    generator = torch.Generator().manual_seed(2)
    # Random ids below the special tokens, an EOT somewhere, zero padding after it.
    rand = torch.randint(1, 49406, (3, 77), generator=generator)
    for row, eot in enumerate([5, 40, 76]):
        rand[row, 0] = 49406
        rand[row, eot] = 49407
        rand[row, eot + 1:] = 0
    tokens = torch.cat([real, rand])
    expected = reference.encode_text(tokens)
    actual = ours.encode_text(tokens)
    assert actual.shape == (len(tokens), 512)
    assert (actual - expected).abs().max().item() < 1e-4


@torch.no_grad()
def test_short_context_matches_full_context(ours):
    """CLIP4Clip feeds 32-token sequences; the causal mask makes padding irrelevant."""
    texts = ["a person is cooking pasta in a kitchen", "a red car"]
    short = ours.encode_text(tokenize_for_model(texts, max_words=32))
    full = ours.encode_text(tokenize(texts))
    assert (short - full).abs().max().item() < 1e-4
    hidden = ours.encode_text_tokens(tokenize_for_model(texts, max_words=32))
    assert hidden.shape == (2, 32, 512)


@torch.no_grad()
def test_forward_logits(tiny):
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.tensor([[98, 5, 99] + [0] * 13, [98, 7, 8, 99] + [0] * 12])
    logits_per_image, logits_per_text = tiny(images, tokens)
    assert logits_per_image.shape == (3, 2)
    assert torch.equal(logits_per_text, logits_per_image.t())
    assert logits_per_image.abs().max() <= tiny.logit_scale.exp() + 1e-4


@torch.no_grad()
def test_vision_pieces_compose(ours):
    images = torch.randn(1, 3, 224, 224)
    tokens = ours.visual.embed(images)
    assert tokens.shape == (1, 50, 768)
    cls = ours.visual.transformer(tokens)[:, 0]
    assert torch.allclose(ours.visual.head(cls), ours.encode_image(images), atol=1e-5)
    with pytest.raises(ValueError, match="224x224"):
        ours.visual.embed(torch.randn(1, 3, 160, 160))


@pytest.fixture(scope="module")
def random_b32():
    return random_state_dict("ViT-B/32")


def test_random_state_dict_has_openai_layout(reference, random_b32):
    ours = random_b32
    ref = reference.state_dict()
    assert set(ours) == set(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    # Initialisation follows OpenAI's scheme (open_clip uses the same one).
    for key in [
        "token_embedding.weight", "positional_embedding", "text_projection",
        "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_proj.weight",
        "visual.class_embedding", "visual.proj", "visual.transformer.resblocks.3.attn.in_proj_weight",
    ]:
        assert ours[key].std().item() == pytest.approx(ref[key].std().item(), rel=0.1), key
    assert ours["logit_scale"].item() == pytest.approx(ref["logit_scale"].item())


def test_random_state_dict_is_deterministic_and_leaves_global_rng(random_b32):
    state = torch.random.get_rng_state()
    again = random_state_dict("ViT-B-32", seed=0)  # open_clip spelling accepted
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(again[k], random_b32[k]) for k in random_b32)
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        random_state_dict("ViT-H/14")


def test_random_state_dict_vit_b16_shapes():
    sd = random_state_dict("ViT-B/16")
    assert sd["visual.conv1.weight"].shape == (768, 3, 16, 16)
    assert sd["visual.positional_embedding"].shape == (197, 768)
    assert infer_config(sd) == CLIP_ARCHS["ViT-B/16"]


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIP(**TINY).eval()


@torch.no_grad()
def test_build_model_infers_custom_sizes(tiny):
    buffer = io.BytesIO()
    torch.save(tiny.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = build_model(torch.load(buffer, weights_only=True))
    assert rebuilt.config == TINY
    assert rebuilt.visual.transformer.heads == 2  # 64-dim heads
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 98, (2, 16))
    tokens[:, 10] = 99  # EOT = largest id
    assert torch.equal(rebuilt.encode_image(images), tiny.encode_image(images))
    assert torch.equal(rebuilt.encode_text(tokens), tiny.encode_text(tokens))


def test_build_model_drops_torchscript_extras_and_casts_fp16(tiny):
    sd = {k: v.half() for k, v in tiny.state_dict().items()}
    sd.update(
        input_resolution=torch.tensor(64), context_length=torch.tensor(16),
        vocab_size=torch.tensor(100), attn_mask=torch.zeros(16, 16),
    )
    rebuilt = build_model(sd)
    assert rebuilt.dtype == torch.float32
    assert rebuilt.config == TINY


def test_build_model_rejects_resnet_and_junk(tiny):
    sd = dict(tiny.state_dict())
    sd["visual.layer1.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="only ViT CLIP checkpoints are supported"):
        build_model(sd)
    with pytest.raises(ValueError, match="missing"):
        build_model({"foo": torch.zeros(1)})


@torch.no_grad()
@pytest.mark.parametrize("size", [(64, 64), (70, 50)])
def test_patchify_matrix_product_equals_the_strided_convolution(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel_size=16, stride=16, bias=False)
    images = torch.randn(2, 3, *size)
    expected = conv(images).flatten(2).transpose(1, 2)  # (B, patches, width)
    patches = patchify(images, 16)
    assert patches.shape == (2, (size[0] // 16) * (size[1] // 16), 3 * 16 * 16)
    torch.testing.assert_close(patches @ conv.weight.flatten(1).t(), expected, rtol=1e-5, atol=1e-5)


def test_attention_matches_multihead_attention():
    torch.manual_seed(0)
    d, heads = 64, 4
    ours = Attention(d, heads)
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    ref = nn.MultiheadAttention(d, heads, batch_first=True)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    x = torch.randn(3, 10, d)
    expected, _ = ref(x, x, x, need_weights=False)
    assert (ours(x) - expected).abs().max().item() < 1e-5
    mask = torch.full((10, 10), float("-inf")).triu(1)
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    assert (ours(x, attn_mask=mask) - expected).abs().max().item() < 1e-5
    with pytest.raises(TypeError):
        ours(x, attn_mask=mask.isinf())


@torch.no_grad()
def test_attention_helpers_and_qkv_delta():
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(2, 7, 64)
    q, k, v = attn.project_qkv(x)
    assert q.shape == k.shape == v.shape == (2, 4, 7, 16)
    # Manual attention with the helpers equals forward (q is not pre-scaled).
    weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    assert torch.allclose(attn.project_out(weights @ v), attn(x), atol=1e-5)
    # The LoRA hook: a delta on the fused projection equals shifting the bias.
    delta = torch.randn(192)
    shifted = Attention(64, 4)
    shifted.load_state_dict(attn.state_dict())
    shifted.in_proj_bias += delta
    assert torch.allclose(attn(x, qkv_delta=delta.expand(2, 7, 192)), shifted(x), atol=1e-5)


def test_layernorm_is_fp32_safe_and_quickgelu():
    ln = LayerNorm(8)
    x = torch.randn(4, 8) * 1000
    out = ln(x.half())
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), ln(x), atol=1e-2)
    y = torch.linspace(-3, 3, 7)
    assert torch.allclose(QuickGELU()(y), y * torch.sigmoid(1.702 * y))


def test_gradients_flow(tiny):
    model = CLIP(**TINY)
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 98, (2, 16))
    tokens[:, 5] = 99
    logits, _ = model(images, tokens)
    logits.sum().backward()
    assert model.visual.conv1.weight.grad is not None
    assert model.token_embedding.weight.grad is not None
    assert model.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_flop_counter_counts_attention():
    """Attention is counted on CPU too (once register_cpu_sdpa_flops registered the CPU SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, length, d, heads = 2, 10, 64, 4
    attn = Attention(d, heads)
    x = torch.randn(batch, length, d, requires_grad=True)
    projections = 2 * batch * length * d * (3 * d + d)
    scores_and_mix = 2 * (2 * batch * length * length * d)
    with FlopCounterMode(display=False) as counter:
        attn(x)
    assert counter.get_total_flops() == projections + scores_and_mix
    with FlopCounterMode(display=False) as counter:
        attn(x).sum().backward()
    # Backward of the attention core costs 2.5x its forward in torch's formula.
    assert counter.get_total_flops() > 2 * (projections + scores_and_mix)


def test_vit_b32_gmacs(ours):
    """Plain CLIP ViT-B/32 image tower: about 4.4 GMACs per 224px image (52.9 per 12 frames)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ours.encode_image(torch.randn(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert 12 * gmacs == pytest.approx(52.9, abs=0.5)
