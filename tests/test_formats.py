"""Other projects' weight layouts through our loader, against the reference implementations.

open_clip (GELU) and Hugging Face transformers models are built with random weights by the
reference libraries themselves, saved in their own layout, loaded through
modules/clip_weights.py, and compared feature by feature. mmaction2 CLIP4Clip and TempMe
checkpoints are built in their published layouts from our random CLIP.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from modules.clip_archs import small_arch
from modules.clip_weights import ClipWeights, WeightsError, choose_activation, load_clip_weights
from modules.module_clip import build_model, random_state_dict
from modules.tokenization_clip import tokenize

open_clip = pytest.importorskip("open_clip")

SENTENCES = ["a photo of a cat", "two dogs running on the beach at sunset", ""]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ours(weights: ClipWeights, activation=None):
    return build_model(weights.state_dict, choose_activation(weights, activation))


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module", params=["ViT-B-32", "ViT-B-16"])
def open_clip_model(request):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(request.param, pretrained=None)
    return request.param, model.eval()


@torch.no_grad()
def test_open_clip_gelu_features_match(open_clip_model, tmp_path):
    name, reference = open_clip_model
    path = tmp_path / f"{name}.pt"
    # open_clip's training checkpoints: {"epoch", "name", "state_dict" with DDP's module. prefix}
    torch.save({"epoch": 1, "name": name, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               path)
    weights = load_clip_weights(str(path))
    assert weights.activation == "gelu"  # the file names an open_clip GELU model
    ours = _ours(weights)
    assert isinstance(ours.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = tokenize(SENTENCES)
    image_diff = _max_diff(ours.encode_image(images), reference.encode_image(images))
    text_diff = _max_diff(ours.encode_text(tokens), reference.encode_text(tokens))
    print(f"{name} open_clip GELU: image max diff {image_diff:.2e}, text max diff {text_diff:.2e}")
    assert image_diff < 1e-4 and text_diff < 1e-4
    # The same tensors under QuickGELU differ: the activation really matters.
    wrong = build_model(weights.state_dict, "quick_gelu")
    assert _max_diff(wrong.encode_image(images), reference.encode_image(images)) > 1e-3


def test_bare_state_dict_needs_the_activation(open_clip_model, tmp_path):
    name, reference = open_clip_model
    path = tmp_path / "bare.pt"
    torch.save(reference.state_dict(), path)
    weights = load_clip_weights(str(path))
    assert weights.activation is None
    with pytest.raises(WeightsError, match="does not say which activation.*set clip_activation to 'quick_gelu'"):
        choose_activation(weights, None)
    assert choose_activation(weights, "gelu") == "gelu"


def test_open_clip_name_resolves_through_open_clip(open_clip_model, tmp_path, monkeypatch):
    name, reference = open_clip_model
    path = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    asked = {}

    def fake_download(cfg, cache_dir=None, **kwargs):  # open_clip's own download, offline here
        asked["cfg"] = cfg
        return str(path)

    monkeypatch.setattr(open_clip, "download_pretrained", fake_download)
    tag = open_clip.list_pretrained_tags_by_model(name)[0]
    weights = load_clip_weights(f"open_clip:{name}/{tag}")
    assert asked["cfg"] == open_clip.get_pretrained_cfg(name, tag)
    expected = "quick_gelu" if tag == "openai" else "gelu"
    assert weights.activation == expected
    assert torch.equal(weights.state_dict["visual.proj"], reference.state_dict()["visual.proj"])
    with pytest.raises(WeightsError, match="no pretrained tag 'nope'"):
        load_clip_weights(f"open_clip:{name}/nope")


def test_open_clip_tags_trained_with_quick_gelu_say_so():
    """open_clip marks the pretrained tags trained with QuickGELU (``quick_gelu`` in the tag's
    config, e.g. ViT-B-32/laion400m_e31) on a model config that says GELU; each tag of
    open_clip's list gets the activation open_clip itself would build (15 tags got gelu before)."""
    from modules.checkpoint_formats import open_clip_activation

    assert open_clip_activation("ViT-B-32", "laion400m_e31") == "quick_gelu"
    assert open_clip_activation("ViT-B-32", "laion2b_s34b_b79k") == "gelu"
    assert open_clip_activation("ViT-B-32", "openai") == "quick_gelu"
    wrong = []
    for name, tag in open_clip.list_pretrained():
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None or "vision_cfg" not in model_cfg or model_cfg["vision_cfg"].get("layers") is None:
            continue
        if isinstance(model_cfg["vision_cfg"]["layers"], (list, tuple)):  # ResNet towers: not loadable here
            continue
        quick = bool(model_cfg.get("quick_gelu") or open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
        if open_clip_activation(name, tag) != ("quick_gelu" if quick else "gelu"):
            wrong.append(f"{name}/{tag}")
    assert wrong == []


# ----------------------------------------------------------------------------- Hugging Face


def _hf_model(vision_width=128, vision_layers=2, text_width=64, text_layers=2, image_size=64, patch=16, proj=32,
              act="quick_gelu"):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_attention_heads=max(1, text_width // 64),
                         num_hidden_layers=text_layers, max_position_embeddings=77, hidden_act=act),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_attention_heads=max(1, vision_width // 64), num_hidden_layers=vision_layers,
                           image_size=image_size, patch_size=patch, hidden_act=act),
        projection_dim=proj)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.CLIPModel(config).eval()


def _features(model, images, tokens):
    out_i = model.get_image_features(pixel_values=images)
    out_t = model.get_text_features(input_ids=tokens)
    pick = lambda o: o if isinstance(o, torch.Tensor) else getattr(o, "pooler_output", o[0])  # noqa: E731
    return pick(out_i), pick(out_t)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_hugging_face_clip_matches_transformers(tmp_path, act):
    model = _hf_model(act=act)
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))  # config.json + model.safetensors
    assert (folder / "model.safetensors").is_file()
    weights = load_clip_weights(str(folder))
    assert weights.activation == act
    ours = _ours(weights)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = tokenize(SENTENCES)
    ref_i, ref_t = _features(model, images, tokens)
    image_diff = _max_diff(ours.encode_image(images), ref_i)
    text_diff = _max_diff(ours.encode_text(tokens), ref_t)
    print(f"transformers CLIPModel ({act}): image max diff {image_diff:.2e}, text max diff {text_diff:.2e}")
    assert image_diff < 1e-4 and text_diff < 1e-4


def test_hugging_face_layout_shapes_of_vit_b16(tmp_path):
    """Full ViT-B/16 shapes (1 block per tower to stay quick), pytorch_model.bin variant."""
    model = _hf_model(vision_width=768, vision_layers=1, text_width=512, text_layers=1, image_size=224, patch=16,
                      proj=512)
    folder = tmp_path / "hf_bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    weights = load_clip_weights(str(folder))
    ours = _ours(weights)
    assert ours.visual.positional_embedding.shape == (197, 768)
    assert ours.visual.transformer.heads == 12 and ours.transformer.heads == 8
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_i, _ = _features(model, images, tokenize(["x"]))
        assert _max_diff(ours.encode_image(images), ref_i) < 1e-4


def test_hugging_face_bad_config_is_refused(tmp_path):
    model = _hf_model()
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="vision_config.num_attention_heads 4 for width 128"):
        load_clip_weights(str(folder))


# ----------------------------------------------------------------------------- CLIP4Clip / TempMe layouts

TINY = small_arch(64, vision_width=128, vision_layers=4, text_width=64, text_layers=2)


@pytest.fixture(scope="module")
def tiny_clip():
    return random_state_dict(TINY, seed=3)


def test_mmaction2_clip4clip_checkpoint(tmp_path, tiny_clip):
    """mmengine checkpoint: meta with numpy/mmengine objects, CLIP under state_dict['clip.']."""
    import numpy as np

    path = tmp_path / "clip4clip.pth"
    state = {"clip." + k: v for k, v in tiny_clip.items()}
    torch.save({"meta": {"epoch": 5, "seed": np.int64(3), "dataset_meta": {"classes": np.arange(3)}},
                "state_dict": state}, path)
    weights = load_clip_weights(str(path))
    assert weights.activation == "quick_gelu"  # mmaction2 wraps OpenAI's CLIP
    assert set(weights.state_dict) == set(tiny_clip)
    assert all(torch.equal(weights.state_dict[k], tiny_clip[k]) for k in tiny_clip)


def test_shape_mismatch_is_refused(tmp_path, tiny_clip):
    bad = dict(tiny_clip)
    bad["visual.proj"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(WeightsError, match=r"visual.proj has shape \(3, 3\)"):
        load_clip_weights(str(path))


def test_torchscript_gelu_archive_says_gelu(tmp_path, tiny_clip):
    model = build_model(tiny_clip, "gelu")
    path = tmp_path / "gelu.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 64, 64)}).save(str(path))
    assert load_clip_weights(str(path)).activation == "gelu"


@pytest.fixture(scope="module")
def b32_clip():
    return random_state_dict("ViT-B/32", seed=5)


def _tempme_state(clip_state, rank=8, frames=(12, 6, 3), layers=(8, 9, 10)):
    """A state dict in the layout of TempMe's VTRModel (tvr/models/module_clip.py)."""
    generator = torch.Generator().manual_seed(7)
    state = {"clip." + k: v for k, v in clip_state.items()}
    for tower, blocks, width in (("visual.transformer", 12, 768), ("transformer", 12, 512)):
        for i in range(blocks):
            state[f"clip.{tower}.resblocks.{i}.attn.TVPt_LoRA_a"] = torch.randn(rank, width, generator=generator)
            state[f"clip.{tower}.resblocks.{i}.attn.TVPt_LoRA_b"] = torch.randn(3 * width, rank, generator=generator) * 0.01
    for layer, count in zip(layers, frames):
        state[f"clip.visual.transformer.resblocks.{layer}.TVPt_Video_Positional_embedding"] = (
            torch.randn(1, count, 1, 768, generator=generator) * 0.01)
    return state


def test_tempme_checkpoint_maps_into_our_model(tmp_path, b32_clip):
    from unified_model import create_unified_model

    state = _tempme_state(b32_clip)
    path = tmp_path / "best.pth"
    torch.save(state, path)  # TempMe's save_model: torch.save(model.state_dict())
    for spec in (f"tempme:{path}", str(path)):  # explicit, and detected by its tensor names
        model = create_unified_model(checkpoint=spec, device="cpu")
        config = model.config
        assert config.tempme.merge_layer == [8, 9, 10] and config.tempme.merge_frame_num == "2-2-3"
        assert config.tempme.lora_dim == 8 and config.max_frames == 12 and config.num_segments == 12
        assert config.stop.temporal_prompt == "none" and config.stop.spatial_prompt == "none"
        params = dict(model.named_parameters())
        assert torch.equal(params["tempme.lora.3.lora_a"], state["clip.visual.transformer.resblocks.3.attn.TVPt_LoRA_a"])
        assert torch.equal(params["text_lora.11.lora_b"], state["clip.transformer.resblocks.11.attn.TVPt_LoRA_b"])
        assert torch.equal(params["tempme.clip_pos.1"],
                           state["clip.visual.transformer.resblocks.9.TVPt_Video_Positional_embedding"])
        assert torch.equal(params["clip.visual.proj"], b32_clip["visual.proj"])
    with torch.no_grad():
        video = model.encode_videos(torch.randn(1, 12, 3, 224, 224)).video_embeddings
    assert video.shape == (1, 512) and torch.isfinite(video).all()


def test_tempme_checkpoint_with_wrong_shapes_is_refused(tmp_path, b32_clip):
    from unified_model import CheckpointError, create_unified_model

    state = _tempme_state(b32_clip)
    state["clip.visual.transformer.resblocks.0.attn.TVPt_LoRA_b"] = torch.zeros(768, 8)
    path = tmp_path / "best.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"resblocks.0.attn.TVPt_LoRA_b has shape \(768, 8\), expected \(2304, r\)"):
        create_unified_model(checkpoint=f"tempme:{path}", device="cpu")
    state = _tempme_state(b32_clip, frames=(12, 5, 3))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="do not merge by whole factors"):
        create_unified_model(checkpoint=f"tempme:{path}", device="cpu")


def test_clip4clip_recipe_through_the_extraction_script(tmp_path, b32_clip):
    """The shipped recipe + an mmaction2-layout file, end to end through extract_video_embeddings.py."""
    import numpy as np

    from tests.cli_utils import describe, run_script
    from tests.video_factory import write_video

    weights = tmp_path / "clip4clip.pth"
    torch.save({"meta": {"epoch": 5, "seed": np.int64(0)}, "state_dict": {"clip." + k: v for k, v in b32_clip.items()}},
               weights)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", 12, size=(64, 48))
    out = tmp_path / "out"
    proc = run_script("extract_video_embeddings.py", ["--video_dir", str(videos), "--output_dir", str(out),
                                                      "--config_path", "configs/recipes/clip4clip_msrvtt_pretrained.json",
                                                      "--clip_weights", str(weights), "--device", "cpu"], timeout=600)
    assert proc.returncode == 0, describe(proc)
    embedding = np.load(out / "clip_embedding.npy")
    assert embedding.shape == (512,) and np.isfinite(embedding).all()
