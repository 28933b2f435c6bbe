"""Each weight source of issue 13 through the three scripts, as a user runs them.

open_clip (GELU, a bare state dict: the config names the activation), Hugging Face
``CLIPModel`` (a folder, GELU from its config.json), mmaction2 CLIP4Clip (CLIP under
``clip.``) and TempMe's ``best.pth`` (LoRA, clip position embeddings and CLIP) are built
once per module in their real layouts (test_formats.py checks their features against the
reference libraries). Each is then passed on the command line of
extract_video_embeddings.py, inference.py and train_unified_model.py (their ``main(argv)``,
in-process as test_training.py runs the training script: a subprocess per run would
double this file's time; test_formats.py runs the mmaction2 file through a real
``python extract_video_embeddings.py``). The scripts' numbers must equal what the Python
API computes from the same weights and differ from what random weights of the same shapes
give: the script used those weights.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pytest
import torch

from modules.clip_archs import small_arch
from modules.module_clip import random_state_dict
from modules.training import small_config_dict
from tests.cli_utils import ROOT
from tests.video_factory import write_video
from unified_model import create_unified_model, read_checkpoint

torch.set_num_threads(2)

SIZE = 64  # frames of the tiny CLIPs: 4 x 4 patches of 16 px
QUERY = "a red circle"
SOURCES = ["open_clip", "hugging_face", "mmaction2", "tempme"]
TINY_ARCH = small_arch(SIZE, vision_width=128, vision_layers=2, text_width=64, text_layers=2)


@dataclass
class Source:
    """One weight source on disk and how the scripts are told about it."""

    name: str
    model_args: List[str]  # what selects the weights on every script's command line
    config: Optional[Path]  # model + training config (None: the checkpoint's own / a recipe)
    train_config: Path
    weights_setting: str  # the clip_weights a trained checkpoint must record
    arch: Union[str, Dict[str, int]]  # the CLIP's shapes, for random weights to compare with
    api_kwargs: Dict[str, str]  # the same choice through create_unified_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A one-video folder and a tiny synthetic training set, shared by every source."""
    from modules.synthetic_data import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("sources")
    (root / "videos").mkdir()
    write_video(root / "videos" / "clip.mp4", 8, size=(64, 48))
    generate_synthetic_dataset(root / "syn", num_videos=3, num_val=1, seed=0, size=(32, 32), num_frames=8)
    return root


def _training_section(root: Path, name: str) -> dict:
    return dict(datatype="synthetic", data_path=str(root / "syn"), synthetic_num_videos=3, synthetic_val_videos=1,
                seed=0, batch_size=2, eval_batch_size=1, num_epochs=1, max_steps=1, num_workers=0,
                checkpoint_dir=str(root / name / "ckpt"), amp=False, warmup_proportion=0.0)


def _tiny_config(root: Path, name: str, activation: Optional[str]) -> Path:
    data = small_config_dict(SIZE, vision_layers=2, training=_training_section(root, name))
    data["clip_activation"] = activation
    path = root / name / "config.json"
    path.write_text(json.dumps(data))
    return path


def _open_clip(folder: Path, seed: int = 11) -> str:
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        # not seed 0: open_clip initialises as module_clip does, and random_state_dict(seed=0)
        # (what clip_weights "random" builds) would then be these very weights
        torch.manual_seed(seed)
        model = CLIP(embed_dim=64, quick_gelu=False,  # open_clip's own models use GELU
                     vision_cfg=CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=16, image_size=SIZE),
                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "open_clip_tiny.pt"
    torch.save(model.state_dict(), path)  # a bare state dict: nothing in it says GELU
    return str(path)


def _hugging_face(folder: Path, seed: int = 12) -> str:
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=2,
                         max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2,
                           image_size=SIZE, patch_size=16, hidden_act="gelu"),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hf_clip"
    model.save_pretrained(str(path))  # config.json + model.safetensors
    return str(path)


def _mmaction2(folder: Path, seed: int = 3) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clip4clip.pth"
    state = {"clip." + k: v for k, v in random_state_dict(TINY_ARCH, seed=seed).items()}
    torch.save({"meta": {"epoch": 5, "seed": np.int64(3)}, "state_dict": state}, path)
    return str(path)


@pytest.fixture(scope="module")
def tempme_checkpoint(workspace) -> str:
    """TempMe's best.pth layout on ViT-B/32 (the smallest CLIP TempMe trains), 4 frames merged
    2-2 at blocks 9, 10; CLIP tensors in fp16 as OpenAI's file holds them (half the bytes to read)."""
    from tests.test_formats import _tempme_state

    clip = {k: v.half() if v.is_floating_point() else v for k, v in random_state_dict("ViT-B/32", seed=5).items()}
    folder = workspace / "tempme"
    folder.mkdir()
    path = folder / "best.pth"
    torch.save(_tempme_state(clip, frames=(4, 2), layers=(9, 10)), path)
    return str(path)


def _tempme_train_config(root: Path, folder: Path) -> Path:
    """The shipped TempMe recipe, edited to the checkpoint's merge schedule (as a user would)."""
    data = json.loads((ROOT / "configs" / "recipes" / "tempme_msrvtt.json").read_text())
    data["tempme"].update(merge_layer=[9, 10], merge_frame_num="2-2")
    data.update(max_frames=4, num_segments=4, device="cpu", training={**data["training"], **_training_section(root, "tempme")})
    path = folder / "train.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module", params=SOURCES)
def source(request, workspace) -> Source:
    name = request.param
    if name == "tempme":  # its own CLIP inside; the bare path is recognised by its tensor names
        path = request.getfixturevalue("tempme_checkpoint")
        return Source(name, ["--checkpoint", path], None, _tempme_train_config(workspace, Path(path).parent),
                      "tempme:" + path, "ViT-B/32", {"checkpoint": path})
    folder = workspace / name
    folder.mkdir()
    make, activation = {"open_clip": (_open_clip, "gelu"), "hugging_face": (_hugging_face, None),
                        "mmaction2": (_mmaction2, None)}[name]
    path = make(folder)
    config = _tiny_config(workspace, name, activation)
    arch = dict(TINY_ARCH, embed_dim=32) if name == "hugging_face" else TINY_ARCH
    return Source(name, ["--clip_weights", path], config, config, path, arch,
                  {"clip_weights": path, "config_path": str(config)})


def _run(script: str, argv: List, capsys) -> Tuple[int, str, str]:
    """``python <script>.py argv...`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = importlib.import_module(script).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_train_and_search_with_the_weights(source, workspace, capsys):
    """Extraction, a one-step training run and inference from its checkpoint, as a user runs them."""
    video = workspace / "videos" / "clip.mp4"
    config_args = [] if source.config is None else ["--config_path", source.config]
    # untrained LoRA and prompts: the reference is the Python API on the same weights (not merged,
    # so its trained tensors can be loaded below; merging only rounds differently)
    reference = create_unified_model(device="cpu", **source.api_kwargs)

    # extract_video_embeddings.py
    out = workspace / source.name / "embeddings"
    code, stdout, stderr = _run("extract_video_embeddings", ["--video_dir", video.parent, "--output_dir", out,
                                                             *config_args, *source.model_args, "--device", "cpu",
                                                             "--num_workers", "0", "--quiet"], capsys)
    assert code == 0, stdout + stderr
    assert "Embedded 1 videos, 0 failed" in stdout
    embedding = np.load(out / "clip_embedding.npy")
    assert np.isfinite(embedding).all() and abs(float(np.linalg.norm(embedding)) - 1) < 1e-5
    with torch.no_grad():
        expected = reference.extract_video_embedding(video)
    assert embedding.shape == expected.shape
    np.testing.assert_allclose(embedding, expected, atol=1e-5)

    # train_unified_model.py: one step, recording where its frozen CLIP came from
    weights_args = ["--checkpoint", source.weights_setting] if source.name == "tempme" else source.model_args
    code, stdout, stderr = _run("train_unified_model", ["--config", source.train_config, *weights_args, "--device", "cpu",
                                                        "--quiet"], capsys)
    assert code == 0, stdout + stderr
    assert "trained 1 step" in stdout
    trained = workspace / source.name / "ckpt" / "last.pth"
    payload = read_checkpoint(trained)
    assert payload["config"]["clip_weights"] == source.weights_setting

    # inference.py from the trained checkpoint; a file named in a checkpoint is opened only on
    # the user's word, and the message says what to pass
    query = ["--video_path", video, "--query", QUERY, "--checkpoint", trained, "--device", "cpu", "--top_k", "2"]
    code, stdout, stderr = _run("inference", query, capsys)
    assert code == 2 and f"--clip_weights {source.weights_setting}" in stderr and stderr.count("\n") == 1, stderr
    result_file = workspace / source.name / "result.json"
    code, stdout, stderr = _run("inference", [*query, "--clip_weights", source.weights_setting, "--output", result_file],
                                capsys)
    assert code == 0, stdout + stderr
    assert "INFERENCE RESULTS" in stdout
    [result] = json.loads(result_file.read_text())
    assert result["status"] == "success" and np.isfinite(result["scores"]).all()
    reference.load_trainable_state(payload["trainable"])
    with torch.no_grad():
        hits = reference.retrieve(video, QUERY, top_k=2)
        assert result["frames"] == [h.frame for h in hits]
        np.testing.assert_allclose(result["scores"], [h.score for h in hits], atol=1e-5)

        # the same trained model on random CLIP weights of the same shapes lands elsewhere: the
        # outputs above came from these weights (seed 0 is what clip_weights "random" builds)
        trained_embedding = reference.extract_video_embedding(video)
        reference.clip.load_state_dict(random_state_dict(source.arch, seed=0))
        assert np.abs(reference.extract_video_embedding(video) - trained_embedding).max() > 1e-2

    # training used these weights: the same run on other weights of the same layout trains the
    # same initial tensors to other values (a Trainer that dropped its CLIP weights passed before)
    if source.name == "tempme":
        return  # its CLIP is inside the checkpoint with its LoRA; test_formats maps it tensor by tensor
    maker = {"open_clip": _open_clip, "hugging_face": _hugging_face, "mmaction2": _mmaction2}[source.name]
    other = maker(workspace / source.name / "other", seed=21)
    code, stdout, stderr = _run("train_unified_model", ["--config", source.train_config, "--clip_weights", other,
                                                        "--checkpoint_dir", workspace / source.name / "ckpt_other",
                                                        "--device", "cpu", "--quiet"], capsys)
    assert code == 0, stdout + stderr
    theirs = read_checkpoint(workspace / source.name / "ckpt_other" / "last.pth")
    assert theirs["config"]["clip_weights"] == other
    moved = {k: float((payload["trainable"][k] - theirs["trainable"][k]).abs().max()) for k in payload["trainable"]}
    assert max(moved.values()) > 1e-6, moved


def _three_scripts(workspace: Path, folder: Path, config: Path) -> Dict[str, List]:
    """Each script's arguments for one run on the workspace's video with ``config`` (no weights flag)."""
    video = workspace / "videos" / "clip.mp4"
    return {
        "extract_video_embeddings": ["--video_dir", video.parent, "--output_dir", folder / "out", "--config_path", config,
                                     "--num_workers", "0"],
        "inference": ["--video_path", video, "--query", QUERY, "--config_path", config],
        "train_unified_model": ["--config", config],
    }


def test_truncated_weights_file_exits_2_naming_it(workspace, capsys):
    """A weights file cut short: every script answers exit 2 and one line naming the file."""
    folder = workspace / "truncated"
    folder.mkdir()
    whole = Path(_mmaction2(folder)).read_bytes()
    bad = folder / "cut.pth"
    bad.write_bytes(whole[: len(whole) // 2])
    config = _tiny_config(workspace, "truncated", None)
    for script, argv in _three_scripts(workspace, folder, config).items():
        code, stdout, stderr = _run(script, [*argv, "--clip_weights", bad, "--device", "cpu"], capsys)
        assert code == 2, (script, stdout, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and str(bad) in stderr, (script, stderr)
        assert "Traceback" not in stdout + stderr
    assert not list((folder / "out").glob("*embedding*")) and not (folder / "ckpt").exists()  # no outputs


@pytest.mark.parametrize("layout", ["hf_pytorch_model_bin", "open_clip_safetensors_file"])
def test_other_file_layouts_through_extraction_and_inference(layout, workspace, capsys, monkeypatch):
    """A Hugging Face folder holding pytorch_model.bin (no safetensors) and a single open_clip
    .safetensors file: extraction and inference give the Python API's numbers, and the
    safetensors file is read without unpickling anything."""
    import pickle

    folder = workspace / layout
    if layout == "hf_pytorch_model_bin":
        transformers = pytest.importorskip("transformers")
        path = Path(_hugging_face(folder, seed=31))
        model = transformers.CLIPModel.from_pretrained(str(path))
        (path / "model.safetensors").unlink()
        # what older transformers saved (newer ones write safetensors only): a torch.save'd state dict
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        assert (path / "pytorch_model.bin").is_file() and not (path / "model.safetensors").exists()
        activation = None
    else:
        from safetensors.torch import save_file

        state = torch.load(_open_clip(folder, seed=32), weights_only=True)
        path = folder / "open_clip.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        activation = "gelu"

        def no_pickle(*args, **kwargs):
            raise AssertionError("a .safetensors file was unpickled")

        monkeypatch.setattr(pickle, "Unpickler", no_pickle)
        monkeypatch.setattr(pickle, "loads", no_pickle)
        monkeypatch.setattr(torch, "load", no_pickle)
    config = _tiny_config(workspace, layout, activation)
    video = workspace / "videos" / "clip.mp4"
    out = folder / "out"
    code, stdout, stderr = _run("extract_video_embeddings", ["--video_dir", video.parent, "--output_dir", out,
                                                             "--config_path", config, "--clip_weights", path,
                                                             "--device", "cpu", "--num_workers", "0", "--quiet"], capsys)
    assert code == 0, stdout + stderr
    reference = create_unified_model(config_path=str(config), clip_weights=str(path), device="cpu")
    with torch.no_grad():
        np.testing.assert_allclose(np.load(out / "clip_embedding.npy"), reference.extract_video_embedding(video), atol=1e-5)
        hits = reference.retrieve(video, QUERY, top_k=2)
    result_file = folder / "result.json"
    code, stdout, stderr = _run("inference", ["--video_path", video, "--query", QUERY, "--config_path", config,
                                              "--clip_weights", path, "--device", "cpu", "--top_k", "2",
                                              "--output", result_file], capsys)
    assert code == 0, stdout + stderr
    [result] = json.loads(result_file.read_text())
    np.testing.assert_allclose(result["scores"], [h.score for h in hits], atol=1e-5)


def test_a_folder_without_config_json_exits_2_naming_it(workspace, capsys):
    """A Hugging Face folder missing its config.json: one line naming the folder in every script
    (extraction and inference raised FileNotFoundError on the identity hash before, exit 1)."""
    folder = workspace / "no_config"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "model.safetensors").write_bytes(b"\0" * 64)
    config = _tiny_config(workspace, "no_config", None)
    for script, argv in _three_scripts(workspace, folder, config).items():
        code, stdout, stderr = _run(script, [*argv, "--clip_weights", folder / "weights", "--device", "cpu"], capsys)
        assert code == 2, (script, stdout, stderr)
        assert stderr.count("\n") == 1 and "has no config.json" in stderr and str(folder / "weights") in stderr, (script, stderr)


def test_tempme_clip_gives_way_to_weights_a_config_names(monkeypatch):
    """The CLIP inside a TempMe checkpoint is used when the config names none, and the config
    then says where it came from (a training run records it); weights a config names replace
    it. Failed before: the config kept null, so a run trained on the checkpoint's CLIP recorded
    the official weights, and weights a config named were silently not used."""
    import unified_model
    from config import UnifiedModelConfig, from_dict
    from modules.clip_weights import ClipWeights

    carried = ClipWeights({}, "quick_gelu", "TempMe checkpoint best.pth")  # not built here: the rule only
    saved = dict(UnifiedModelConfig().to_dict(), clip_weights="tempme:best.pth")
    monkeypatch.setattr(unified_model, "read_model_checkpoint", lambda path: ({"config": saved}, carried))
    for named, expected, clip in ((None, "tempme:best.pth", carried), ("ViT-B/16", "ViT-B/16", None),
                                  ("tempme:best.pth", "tempme:best.pth", carried)):
        spec = unified_model.load_model_spec(config=from_dict(dict(saved, clip_weights=named)), checkpoint="best.pth")
        assert (spec.config.clip_weights, spec.clip) == (expected, clip), named
    spec = unified_model.load_model_spec(checkpoint="best.pth")  # the checkpoint's own config
    assert (spec.config.clip_weights, spec.clip) == ("tempme:best.pth", carried)


def test_rerun_after_new_weights_in_the_same_folder_recomputes(workspace, capsys):
    """Outputs are reused only for the same weights: a Hugging Face folder (or tempme:PATH)
    is identified by its files' content, as a weights file is. Failed before: by its path,
    so a rerun after new weights were saved into the folder skipped the video and kept the
    old weights' embedding."""
    from config import UnifiedModelConfig
    from unified_model import clip_weights_identity

    folder = workspace / "hf_swap"
    folder.mkdir()
    weights = _hugging_face(folder, seed=21)
    config = _tiny_config(workspace, "hf_swap", None)
    out = folder / "out"
    argv = ["--video_dir", workspace / "videos", "--output_dir", out, "--config_path", config, "--clip_weights", weights,
            "--device", "cpu", "--num_workers", "0", "--quiet"]
    code, stdout, stderr = _run("extract_video_embeddings", argv, capsys)
    assert code == 0 and "Embedded 1 videos, 0 failed, 0 skipped" in stdout, stdout + stderr
    first = np.load(out / "clip_embedding.npy")
    code, stdout, stderr = _run("extract_video_embeddings", argv, capsys)
    assert code == 0 and "Embedded 0 videos, 0 failed, 1 skipped" in stdout, stdout + stderr  # same weights: reused
    _hugging_face(folder, seed=22)  # other weights saved over the folder
    code, stdout, stderr = _run("extract_video_embeddings", argv, capsys)
    assert code == 0 and "Embedded 1 videos, 0 failed, 0 skipped" in stdout, stdout + stderr
    assert np.abs(np.load(out / "clip_embedding.npy") - first).max() > 1e-2
    # tempme:PATH names the file's content like the bare path
    plain = UnifiedModelConfig(clip_weights=str(out / "clip_embedding.npy"))
    prefixed = UnifiedModelConfig(clip_weights="tempme:" + str(out / "clip_embedding.npy"))
    assert clip_weights_identity(plain).startswith("file:")
    assert clip_weights_identity(prefixed) == clip_weights_identity(plain)


def test_open_clip_tag_through_the_scripts(workspace, capsys, monkeypatch):
    """``open_clip:NAME/TAG`` (open_clip's download stubbed offline, handing over a tiny GELU
    file as test_formats.py does): extraction, training, and inference from the trained
    checkpoint, which follows the recorded tag without --clip_weights (it names weights, not a file)."""
    open_clip = pytest.importorskip("open_clip")
    folder = workspace / "open_clip_tag"
    folder.mkdir()
    path = _open_clip(folder)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, cache_dir=None, **kwargs: path)
    tag = "open_clip:ViT-B-32/laion2b_s34b_b79k"  # open_clip builds ViT-B-32 with GELU: the name says it
    config = _tiny_config(workspace, "open_clip_tag", None)
    video = workspace / "videos" / "clip.mp4"
    reference = create_unified_model(config, device="cpu", clip_weights=tag)
    out = folder / "embeddings"
    code, stdout, stderr = _run("extract_video_embeddings", ["--video_dir", video.parent, "--output_dir", out,
                                                             "--config_path", config, "--clip_weights", tag,
                                                             "--device", "cpu", "--num_workers", "0", "--quiet"], capsys)
    assert code == 0, stdout + stderr
    with torch.no_grad():
        np.testing.assert_allclose(np.load(out / "clip_embedding.npy"), reference.extract_video_embedding(video),
                                   atol=1e-5)
    code, stdout, stderr = _run("train_unified_model", ["--config", config, "--clip_weights", tag, "--device", "cpu",
                                                        "--quiet"], capsys)
    assert code == 0, stdout + stderr
    trained = folder / "ckpt" / "last.pth"
    payload = read_checkpoint(trained)
    assert payload["config"]["clip_weights"] == tag
    result_file = folder / "result.json"
    code, stdout, stderr = _run("inference", ["--video_path", video, "--query", QUERY, "--checkpoint", trained,
                                              "--device", "cpu", "--top_k", "2", "--output", result_file], capsys)
    assert code == 0, stdout + stderr
    [result] = json.loads(result_file.read_text())
    reference.load_trainable_state(payload["trainable"])
    with torch.no_grad():
        hits = reference.retrieve(video, QUERY, top_k=2)
    assert result["frames"] == [h.frame for h in hits]
    np.testing.assert_allclose(result["scores"], [h.score for h in hits], atol=1e-5)
