"""Tests for the video heads (modules/heads.py, DESIGN 2.7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modules.heads import MeanPoolHead, SeqTransfHead, build_head, load_cross_config, mean_pool
from modules.module_clip import CLIP


@pytest.fixture(scope="module")
def small_clip() -> CLIP:
    """Text tower of ViT-B/32's shape (width 512, 8 heads) but 4 layers; tiny vision."""
    torch.manual_seed(0)
    return CLIP(
        embed_dim=512,
        image_resolution=32,
        vision_layers=1,
        vision_width=64,
        vision_patch_size=16,
        context_length=77,
        vocab_size=1000,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=4,
    ).eval()


@pytest.fixture(scope="module")
def seq_head(small_clip: CLIP) -> SeqTransfHead:
    head = build_head("seqTransf", "cross-base", width=512)
    assert isinstance(head, SeqTransfHead)
    head.init_from_clip(small_clip)
    return head.eval()


# --------------------------------------------------------------------------------------
# config and factory
# --------------------------------------------------------------------------------------
def test_load_cross_config() -> None:
    cfg = load_cross_config()
    assert cfg["hidden_size"] == 512
    assert cfg["num_hidden_layers"] == 4
    assert cfg["num_attention_heads"] == 8
    assert cfg["intermediate_size"] == 2048
    assert cfg["max_position_embeddings"] == 77
    with pytest.raises(ValueError, match="cross-huge"):
        load_cross_config("cross-huge")
    with pytest.raises(ValueError):
        load_cross_config("../modules")


def test_build_head() -> None:
    head = build_head("meanP", "cross-base")
    assert isinstance(head, MeanPoolHead)
    assert sum(p.numel() for p in head.parameters()) == 0
    with pytest.raises(ValueError, match="seqLSTM"):
        build_head("seqLSTM", "cross-base")
    with pytest.raises(ValueError, match="nope"):
        build_head("seqTransf", "nope")


# --------------------------------------------------------------------------------------
# meanP
# --------------------------------------------------------------------------------------
def test_mean_pool_hand_made() -> None:
    feats = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [7.0, -1.0, 5.0]]])
    sizes = torch.tensor([[1.0, 3.0, 0.0]])  # the third frame is padding
    expected = F.normalize(torch.tensor([[0.6 * 1, 0.8 * 1, 1.0 * 3]]), dim=-1)
    torch.testing.assert_close(mean_pool(feats, sizes), expected)
    # Integer sizes work too; the frame scale does not matter (frames are normalised first).
    torch.testing.assert_close(mean_pool(feats * torch.tensor([10.0, 0.1, 3.0])[:, None], sizes.long()), expected)
    # sizes None = equal weights.
    unit = F.normalize(feats, dim=-1)
    torch.testing.assert_close(mean_pool(feats), F.normalize(unit.mean(1), dim=-1))
    out = mean_pool(torch.randn(4, 12, 512), torch.randint(1, 4, (4, 12)))
    assert out.shape == (4, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))


def test_mean_pool_all_padding_is_finite() -> None:
    out = mean_pool(torch.randn(1, 3, 8), torch.zeros(1, 3))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------
# seqTransf
# --------------------------------------------------------------------------------------
def test_seqtransf_init_from_clip_copies(small_clip: CLIP, seq_head: SeqTransfHead) -> None:
    assert seq_head.frame_position_embeddings.weight.shape == (77, 512)
    torch.testing.assert_close(
        seq_head.frame_position_embeddings.weight, small_clip.positional_embedding, rtol=0, atol=0
    )
    assert len(seq_head.transformer.resblocks) == 4
    for i, block in enumerate(seq_head.transformer.resblocks):
        src = small_clip.transformer.resblocks[i].state_dict()
        for key, value in block.state_dict().items():
            assert torch.equal(value, src[key]), (i, key)
            # A copy, not shared storage: training the head must not touch CLIP.
            assert value.data_ptr() != src[key].data_ptr(), (i, key)


def test_seqtransf_matches_clip4clip_order(small_clip: CLIP, seq_head: SeqTransfHead) -> None:
    """x + pos -> CLIP text blocks 0..3 -> + x -> normalise frames -> mean -> normalise."""
    torch.manual_seed(1)
    x = torch.randn(2, 12, 512) * 3.0  # un-normalised, as the projected CLS features are
    sizes = torch.randint(1, 4, (2, 12))
    with torch.no_grad():
        h = x + small_clip.positional_embedding[:12]
        for block in small_clip.transformer.resblocks:
            h = block(h)
        expected = mean_pool(h + x, sizes)
        got = seq_head(x, sizes)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_seqtransf_batch_independence(seq_head: SeqTransfHead) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 12, 512)
    sizes = torch.randint(1, 4, (3, 12))
    sizes[0, 9:] = 0  # padding in another video must not matter
    with torch.no_grad():
        batch = seq_head(x, sizes)
        alone = seq_head(x[1:2], sizes[1:2])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)


def test_seqtransf_padding_frames_are_ignored(seq_head: SeqTransfHead) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 12, 512)
    sizes = torch.randint(1, 4, (1, 12))
    padded = torch.cat([x, torch.randn(1, 3, 512) * 50], dim=1)
    padded_sizes = torch.cat([sizes, torch.zeros(1, 3, dtype=sizes.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            seq_head(padded, padded_sizes), seq_head(x, sizes), atol=1e-5, rtol=0
        )


def test_frame_order_sensitivity(seq_head: SeqTransfHead) -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 12, 512)
    sizes = torch.randint(1, 4, (2, 12))
    perm = torch.randperm(12)
    mean_head = build_head("meanP", "cross-base")
    with torch.no_grad():
        torch.testing.assert_close(
            mean_head(x[:, perm], sizes[:, perm]), mean_head(x, sizes), atol=1e-6, rtol=0
        )
        diff = (seq_head(x[:, perm], sizes[:, perm]) - seq_head(x, sizes)).abs().amax()
    assert diff > 1e-4


def test_seqtransf_errors_and_gradients(small_clip: CLIP) -> None:
    head = SeqTransfHead(load_cross_config(), width=512)
    with pytest.raises(ValueError):
        head(torch.randn(1, 78, 512))
    with pytest.raises(ValueError):
        head(torch.randn(1, 4, 256))
    head.init_from_clip(small_clip)
    out = head(torch.randn(2, 6, 512), torch.ones(2, 6))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in head.named_parameters():
        if name == "frame_position_embeddings.weight":
            # Only the rows of the frames used (0..5) receive gradient.
            assert p.grad[:6].abs().sum() > 0 and p.grad[6:].abs().sum() == 0
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
