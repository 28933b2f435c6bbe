"""Tests for the STOP prompt generators (modules/stop_prompts.py, DESIGN 2.6)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modules.module_clip import register_cpu_sdpa_flops
from modules.stop_prompts import (
    FFTConv3d,
    SpatialPromptGenerator,
    TemporalPromptGenerator,
    minmax_normalize_frames,
    straight_through_topk_mask,
)
from modules.tempme_encoder import PromptInputs


def _with_weights(gen: TemporalPromptGenerator, x: torch.Tensor, saliency=None):
    """forward's dynamic prompts and the frame weights w it applied (its own attend + frame_weights)."""
    return gen(x, saliency=saliency), gen.frame_weights(gen.attend(x), saliency)


def _with_mask(gen: SpatialPromptGenerator, x: torch.Tensor):
    """forward's output and the straight-through mask it applied (from its own saliency scores)."""
    _, scores = gen.prompts_and_scores(x)
    return gen(x), straight_through_topk_mask(scores, gen.eta)


def _layer_prompts(gen: TemporalPromptGenerator, dynamic: torch.Tensor, layer: int) -> torch.Tensor:
    """What the encoder puts in block ``layer``'s prompt slots."""
    return PromptInputs(dynamic, gen.base_prompts, gen.prompt_log_size_gate).for_layer(layer)

register_cpu_sdpa_flops()  # this file counts FLOPs, attention included


def _macs(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


@pytest.fixture(scope="module")
def temporal() -> TemporalPromptGenerator:
    torch.manual_seed(0)
    return TemporalPromptGenerator().eval()


@pytest.fixture()
def spatial_trained() -> SpatialPromptGenerator:
    """A spatial generator whose zero-initialised output layer has been perturbed."""
    torch.manual_seed(1)
    gen = SpatialPromptGenerator()
    with torch.no_grad():
        gen.out_proj.weight.normal_(std=0.05)
        gen.out_proj.bias.normal_(std=0.05)
    return gen


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def test_prompt_choices_are_validated_by_the_config() -> None:
    """The one list of prompt choices is config's; the model builds a generator exactly for the 'on' values."""
    from config import ConfigError, STOPConfig

    assert STOPConfig(temporal_prompt="group2-2").temporal_prompt == "group2-2"
    assert STOPConfig(temporal_prompt="none", spatial_prompt="none").spatial_prompt == "none"
    assert STOPConfig(spatial_prompt="patch").spatial_prompt == "patch"
    with pytest.raises(ConfigError, match="group9"):
        STOPConfig(temporal_prompt="group9")
    with pytest.raises(ConfigError, match="pixel"):
        STOPConfig(spatial_prompt="pixel")


def test_minmax_per_row_and_constant_guard() -> None:
    w = torch.tensor([[1.0, 3.0, 2.0], [10.0, 10.0, 10.0], [-5.0, 5.0, 0.0]], requires_grad=True)
    out = minmax_normalize_frames(w)
    torch.testing.assert_close(
        out, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    )
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_straight_through_mask_forward_exact_and_gradient() -> None:
    torch.manual_seed(0)
    scores = torch.randn(4, 5, 49, requires_grad=True)
    mask = straight_through_topk_mask(scores, 6)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert (mask.detach().sum(-1) == 6).all()
    top = scores.detach().topk(6, dim=-1).indices
    assert (mask.detach().gather(-1, top) == 1).all()
    (mask * torch.randn_like(mask)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# temporal
# --------------------------------------------------------------------------------------
def test_temporal_shapes(temporal: TemporalPromptGenerator) -> None:
    x = torch.randn(2, 12, 49, 768)
    with torch.no_grad():
        dyn, w = _with_weights(temporal, x)
        assert dyn.shape == (2, 12, 4, 768)
        assert w.shape == (2, 12)
        for layer in (0, 11):
            assert _layer_prompts(temporal, dyn, layer).shape == (2, 12, 4, 768)
        torch.testing.assert_close(
            _layer_prompts(temporal, dyn, 3), temporal.base_prompts[3] + dyn
        )
    with pytest.raises(IndexError):
        _layer_prompts(temporal, dyn, 12)
    with pytest.raises(ValueError):
        temporal(torch.randn(1, 12, 50, 768))


def test_temporal_batch_independence(temporal: TemporalPromptGenerator) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 12, 49, 768)
    with torch.no_grad():
        batch, w_batch = _with_weights(temporal, x)
        alone, w_alone = _with_weights(temporal, x[1:2])
        # Changing the other videos must not move video 1 either.
        x2 = x.clone()
        x2[0] *= 5.0
        x2[2] = torch.randn(12, 49, 768)
        other = temporal(x2)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_batch[1:2], w_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(other[1:2], alone, atol=1e-5, rtol=0)


def test_temporal_frame_weight_minmax_per_video(temporal: TemporalPromptGenerator) -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 12, 49, 768)
    x[2] *= 10.0  # a video on a very different scale must not squash the others
    with torch.no_grad():
        _, w = _with_weights(temporal, x)
    assert (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(w.amin(dim=1), torch.zeros(3))
    torch.testing.assert_close(w.amax(dim=1), torch.ones(3))
    # Identical frames: no spread, weights guarded to 0 (no NaN). A single frame too.
    same = torch.randn(1, 1, 49, 768).expand(1, 12, 49, 768).contiguous()
    with torch.no_grad():
        _, w_same = _with_weights(temporal, same)
        dyn_one, w_one = _with_weights(temporal, torch.randn(1, 1, 49, 768))
    assert torch.isfinite(w_same).all() and torch.isfinite(dyn_one).all()
    assert (w_one == 0).all()


def test_temporal_parameter_init() -> None:
    torch.manual_seed(4)
    gen = TemporalPromptGenerator(width=768, num_prompts=4, num_layers=12, prompt_dim=96)
    assert gen.base_prompts.shape == (12, 4, 768)
    assert abs(gen.base_prompts.std().item() - 0.02) < 0.001
    assert abs(gen.base_prompts.mean().item()) < 0.001
    assert gen.prompt_log_size_gate.shape == (12,)
    assert (gen.prompt_log_size_gate == -4.0).all()
    assert gen.in_proj.out_features == 96 and gen.out_proj.in_features == 96


def test_temporal_saliency_changes_frame_weight(temporal: TemporalPromptGenerator) -> None:
    torch.manual_seed(5)
    x = torch.randn(1, 12, 49, 768)
    sal = (torch.rand(1, 12, 49) > 0.8).float()
    with torch.no_grad():
        _, w0 = _with_weights(temporal, x)
        _, w1 = _with_weights(temporal, x, saliency=sal)
    assert not torch.allclose(w0, w1)


def test_temporal_gradients_reach_every_parameter() -> None:
    torch.manual_seed(6)
    gen = TemporalPromptGenerator()
    x = torch.randn(2, 12, 49, 768)
    dyn = gen(x)
    loss = sum(
        (_layer_prompts(gen, dyn, layer) * torch.randn_like(dyn)).sum()
        for layer in range(gen.num_layers)
    )
    loss.backward()
    for name, p in gen.named_parameters():
        if name == "prompt_log_size_gate":
            # Consumed by the encoder's attention bias, not by the generator itself.
            assert p.grad is None
            continue
        assert p.grad is not None, name
        if name == "frame_weight_conv.bias":
            # The frame weights are min-max normalised over frames, which a constant shift
            # leaves unchanged: this gradient is zero up to rounding (9e-4 here, exactly 0
            # with other CPU kernels), against O(1) for the conv's weight.
            assert p.grad.abs().max() < 1e-2 < gen.frame_weight_conv.weight.grad.abs().max()
            continue
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("channels,out,kernel,padding",
                         [(9, 1, (3, 15, 25), (1, 7, 12)), (1, 1, (5, 11, 11), (2, 5, 5)), (3, 2, 3, 0)])
def test_fft_conv_equals_plain_conv3d(channels, out, kernel, padding) -> None:
    torch.manual_seed(3)
    fast = FFTConv3d(channels, out, kernel_size=kernel, padding=padding)
    plain = torch.nn.Conv3d(channels, out, kernel_size=kernel, padding=padding)
    plain.load_state_dict(fast.state_dict())  # same parameter names and shapes
    x = torch.randn(2, channels, 5, 20, 30, requires_grad=True)
    y_fast, y_plain = fast(x), plain(x)
    assert y_fast.shape == y_plain.shape
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-4, atol=1e-5)
    g_fast = torch.autograd.grad(y_fast.square().sum(), (x, fast.weight, fast.bias))
    g_plain = torch.autograd.grad(y_plain.square().sum(), (x, plain.weight, plain.bias))
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())  # sums of ~10^4 terms
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32, handed back in bf16
        y_bf16 = fast(x.to(torch.bfloat16))
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), y_plain, rtol=0.05, atol=0.05 * y_plain.abs().max().item())


def test_temporal_macs(temporal: TemporalPromptGenerator) -> None:
    macs = _macs(temporal, torch.randn(1, 12, 49, 768))
    print(f"\ntemporal prompt generator: {macs / 1e9:.3f} GMAC per 12-frame video")
    assert 0.5e9 < macs < 1.5e9  # well under the 2 GMAC target; the attention is counted


# --------------------------------------------------------------------------------------
# spatial
# --------------------------------------------------------------------------------------
def test_spatial_identity_when_untrained() -> None:
    torch.manual_seed(7)
    gen = SpatialPromptGenerator()
    x = torch.randn(2, 32, 49, 768)
    out, mask = _with_mask(gen, x)
    assert torch.equal(out, x)
    assert mask.shape == (2, 32, 49)
    assert (mask.detach().sum(-1) == 6).all()


def test_spatial_zero_init_blocks_gradients_at_step0() -> None:
    # DESIGN 6: the zero output layer gives everything before it an exactly zero gradient.
    torch.manual_seed(8)
    gen = SpatialPromptGenerator()
    out = gen(torch.randn(1, 4, 49, 768))
    (out * torch.randn_like(out)).sum().backward()
    assert gen.out_proj.weight.grad.abs().sum() > 0
    assert gen.scorer.weight.grad.abs().sum() == 0
    assert gen.in_proj.weight.grad.abs().sum() == 0


def test_spatial_top_eta_cells_doubled(spatial_trained: SpatialPromptGenerator) -> None:
    torch.manual_seed(9)
    x = torch.randn(2, 32, 49, 768)
    with torch.no_grad():
        out, mask = _with_mask(spatial_trained, x)
        spatial_trained.eta = 0  # no salient cells: out = x + scale * p
        plain, mask0 = _with_mask(spatial_trained, x)
        spatial_trained.eta = 6
    assert (mask0 == 0).all()
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(-1) == 6).all()
    delta, delta0 = out - x, plain - x
    assert delta0.abs().amax() > 0
    sel = mask.bool()
    torch.testing.assert_close(delta[sel], 2 * delta0[sel], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta[~sel], delta0[~sel], atol=1e-6, rtol=1e-5)


def test_spatial_gradients(spatial_trained: SpatialPromptGenerator) -> None:
    x = torch.randn(2, 8, 49, 768)
    out = spatial_trained(x)
    (out * torch.randn_like(out)).sum().backward()
    assert spatial_trained.scorer.weight.grad.abs().sum() > 0
    assert spatial_trained.scorer.bias.grad.abs().sum() > 0
    for name, p in spatial_trained.named_parameters():
        assert p.grad is not None, name
        if name == "frame_weight_conv.bias":
            # The frame weights are min-max normalised over frames, which a constant shift
            # leaves unchanged: this gradient is zero up to rounding (9e-4 here, exactly 0
            # with other CPU kernels), against O(1) for the conv's weight.
            assert p.grad.abs().max() < 1e-2 < gen.frame_weight_conv.weight.grad.abs().max()
            continue
        assert p.grad.abs().sum() > 0, name


def test_spatial_batch_independence(spatial_trained: SpatialPromptGenerator) -> None:
    torch.manual_seed(10)
    x = torch.randn(3, 32, 49, 768)
    with torch.no_grad():
        batch, mask_b = _with_mask(spatial_trained, x)
        alone, mask_a = _with_mask(spatial_trained, x[1:2])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    assert torch.equal(mask_b[1:2], mask_a)


def test_spatial_shape_check() -> None:
    with pytest.raises(ValueError):
        SpatialPromptGenerator()(torch.randn(1, 2, 50, 768))


def test_spatial_macs(spatial_trained: SpatialPromptGenerator) -> None:
    macs = _macs(spatial_trained, torch.randn(1, 32, 49, 768))
    print(f"\nspatial prompt generator: {macs / 1e9:.3f} GMAC per 32-frame video")
    assert 0.05e9 < macs < 0.5e9  # well under the 1 GMAC target


def test_float32_conv3d_is_the_plain_layer_and_stays_float32_under_bf16_autocast():
    from modules.stop_prompts import Float32Conv3d

    torch.manual_seed(0)
    conv = Float32Conv3d(1, 3, kernel_size=(3, 5, 5), padding=(1, 2, 2))
    plain = torch.nn.Conv3d(1, 3, kernel_size=(3, 5, 5), padding=(1, 2, 2))
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 1, 4, 9, 11)
    assert torch.equal(conv(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x.bfloat16())
        lowered = plain(x.bfloat16())
    assert out.dtype == torch.float32 and lowered.dtype == torch.bfloat16
    assert torch.equal(out, plain(x.bfloat16().float()))
