"""config.py: defaults, JSON round trip, and one-line errors naming the dotted key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import ConfigError, STOPConfig, TempMeConfig, UnifiedModelConfig, from_dict, from_json, to_json

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_with_design_defaults():
    cfg = from_json(ROOT / "configs" / "unified_model_config.json")
    assert cfg.tempme.merge_frame_num == "2-2-3"
    assert cfg.tempme.merge_layer == [8, 9, 10]
    assert cfg.tempme.merge_token_proportion == [0.3, 0.1]
    assert cfg.tempme.tome_r == 2 and cfg.tempme.lora_dim == 8 and cfg.tempme.frame_pos is True
    assert (cfg.max_frames, cfg.num_segments, cfg.video_size, cfg.max_words, cfg.top_k) == (12, 32, 224, 32, 5)
    assert cfg.clip_weights is None and cfg.training is None
    assert cfg.to_dict() == UnifiedModelConfig().to_dict()  # file == code defaults
    train = from_json(ROOT / "configs" / "training_config.json")
    assert train.training is not None and train.training.training_mode == "joint"


def test_json_round_trip(tmp_path):
    cfg = UnifiedModelConfig(
        tempme=TempMeConfig(lora_dim=16, merge_frame_num="3-2-2", merge_layer=[7, 9, 11]),
        stop=STOPConfig(sim_header="seqTransf", temporal_prompt="none"),
        top_k=8,
    )
    path = tmp_path / "c.json"
    cfg.to_json(path)
    again = UnifiedModelConfig.from_json(path)
    assert again == cfg
    assert json.loads(path.read_text())["tempme"]["merge_frame_num"] == "3-2-2"
    train = from_dict({"training": {"training_mode": "sequential", "num_epochs": 4, "sequential_split": 2}})
    to_json(train, path)
    assert from_json(path) == train


def test_list_and_string_schedules_are_equivalent():
    a = from_dict({"tempme": {"merge_frame_num": [2, 2, 3], "merge_layer": "8-9-10"}})
    b = from_dict({"tempme": {"merge_frame_num": "2-2-3", "merge_layer": [8, 9, 10]}})
    assert a == b


def test_seed_schedule_2_2_2_refused_with_explanation():
    with pytest.raises(ConfigError) as err:
        from_dict({"tempme": {"merge_frame_num": "2-2-2", "merge_layer": [6, 8, 10]}})
    msg = str(err.value)
    assert msg.startswith("tempme.merge_frame_num:")
    assert "12 -> 6 -> 3" in msg and "3/2 is not a whole number" in msg and "'2-2-3'" in msg
    # Divides, but leaves more than one clip.
    with pytest.raises(ConfigError, match="into 3 clips"):
        from_dict({"tempme": {"merge_frame_num": "2-2", "merge_layer": [8, 9]}})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"tempme": {"bogus": 1}}, "tempme.bogus"),
        ({"nonsense": 1}, "nonsense"),
        ({"tempme": {"lora_dim": "8"}}, "tempme.lora_dim"),
        ({"tempme": {"lora_dim": -1}}, "tempme.lora_dim"),
        ({"tempme": {"frame_pos": 1}}, "tempme.frame_pos"),
        ({"tempme": {"merge_layer": [8, 8, 10]}}, "tempme.merge_layer"),
        ({"tempme": {"merge_layer": [8, 9, 12]}}, "tempme.merge_layer"),
        ({"tempme": {"merge_layer": [8, 9]}}, "tempme.merge_frame_num"),
        ({"tempme": {"merge_token_proportion": [0.3, 0.7]}}, "tempme.merge_token_proportion[1]"),
        ({"tempme": {"merge_token_proportion": [0.3]}}, "tempme.merge_token_proportion"),
        ({"tempme": {"base_encoder": "RN50"}}, "tempme.base_encoder"),
        ({"stop": {"sim_header": "tightTransf"}}, "stop.sim_header"),
        ({"stop": {"temporal_prompt": "group3-3"}}, "stop.temporal_prompt"),
        ({"stop": {"pretrained_clip_name": "ViT-B/16"}}, "stop.pretrained_clip_name"),
        ({"max_frames": 0}, "max_frames"),
        ({"num_segments": 8}, "num_segments"),
        ({"video_size": 100}, "video_size"),
        ({"device": "gpu"}, "device"),
        ({"precision": "fp8"}, "precision"),
        ({"top_k": True}, "top_k"),
        ({"training": {"training_mode": "both"}}, "training.training_mode"),
        ({"training": {"tempme_lr": 0}}, "training.tempme_lr"),
        ({"training": {"training_mode": "sequential", "num_epochs": 2, "sequential_split": 3}},
         "training.sequential_split"),
        ({"training": {"training_mode": "sequential", "num_epochs": 1}}, "training.num_epochs"),
        ({"training": {"amp_dtype": "fp8"}}, "training.amp_dtype"),
        ({"training": {"typo": 3}}, "training.typo"),
    ],
)
def test_bad_values_name_the_dotted_key(data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert "\n" not in str(err.value)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"tempme": {"lora_dim": 8,}}')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        from_json(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"stop": {"sim_header": "x"}}')
    with pytest.raises(ConfigError, match=r"stop.sim_header: .*\(in .*wrong.json\)"):
        from_json(wrong)


def test_comment_keys_are_ignored():
    cfg = from_dict({"_comment": "docs", "tempme": {"_note": "x", "lora_dim": 4}})
    assert cfg.tempme.lora_dim == 4


def test_no_merging_schedule_is_allowed():
    cfg = from_dict({"tempme": {"merge_frame_num": "", "merge_layer": []}})
    assert cfg.tempme.frame_factors == [] and cfg.tempme.merge_layer == []


def test_seed_style_config_gets_a_hint_for_its_frame_count():
    """The user's troubleshooting advice (max_frames 8) with the default schedule: the hint
    is computed for 8 frames, not the fixed 12-frame example (failed before: it said '2-2-3')."""
    with pytest.raises(ConfigError) as err:
        from_dict({"max_frames": 8, "num_segments": 16})
    assert err.value.key == "tempme.merge_frame_num"
    assert "for 8 frames use e.g. '2-2-2'" in str(err.value)
    with pytest.raises(ConfigError, match="for 16 frames use e.g. '2-2-4'"):
        from_dict({"max_frames": 16, "tempme": {"merge_frame_num": "3-3-3"}})


def test_all_problems_of_a_config_are_reported_at_once(tmp_path):
    """The seed README's config has several problems; one run names them all (failed before:
    only the first, one per run), on one line, naming the file."""
    seed = {"tempme": {"merge_frame_num": "2-2-2", "merge_layer": [6, 8, 10], "merge_token_proportion": [0.3, 0.7]},
            "stop": {"sim_header": "meanP", "bogus": 1}, "max_frames": 12, "top_k": 0,
            "training": {"batch_size": 0, "typo": 1}}
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed))
    with pytest.raises(ConfigError) as err:
        from_json(path)
    keys = [k for k, _ in err.value.problems]
    assert keys == ["tempme.merge_token_proportion[1]", "stop.bogus", "training.typo", "training.batch_size",
                    "top_k", "tempme.merge_frame_num"]
    text = str(err.value)
    assert "\n" not in text and text.endswith(f"(in {path})")
    assert text.startswith("tempme.merge_token_proportion[1]: must be a fraction") and "; stop.bogus: unknown key" in text
    # type problems of a section are reported together with the other sections' problems
    with pytest.raises(ConfigError) as err:
        from_dict({"tempme": {"lora_dim": "8", "tome_r": "x"}, "stop": {"num_prompts": 0}})
    assert [k for k, _ in err.value.problems] == ["tempme.lora_dim", "tempme.tome_r", "stop.num_prompts"]


def test_sequential_split_only_matters_in_sequential_mode():
    """A num_epochs edit alone keeps the template valid in every other mode (failed before:
    'training.sequential_split: must be in [0, num_epochs=2]' in joint mode)."""
    cfg = from_dict({"training": {"training_mode": "joint", "num_epochs": 2, "sequential_split": 10}})
    assert cfg.training.num_epochs == 2
    with pytest.raises(ConfigError, match=r"^training\.sequential_split: must be in \[1, num_epochs - 1 = 1\]"):
        from_dict({"training": {"training_mode": "sequential", "num_epochs": 2, "sequential_split": 2}})


def test_merge_schedule_is_parsed_once_from_the_config():
    from config import MergeSchedule

    schedule = from_dict({"tempme": {"merge_frame_num": "3-2-2", "merge_layer": "7-9-11", "tome_r": 1,
                                     "merge_token_proportion": [0.2, 0.05]}}).tempme.schedule
    assert schedule == MergeSchedule(merge_layers=(7, 9, 11), frame_factors=(3, 2, 2), clip_ratio=0.2,
                                     intra_ratio=0.05, tome_r=1)
    assert schedule.clips_before_merges(12) == [12, 4, 2]
    with pytest.raises(ConfigError, match=r"^tempme\.merge_layer: layers are 0-indexed blocks of the 4-block"):
        schedule.check(12, depth=4)  # the encoder's check against the weights it was built from


def test_fp16_on_cpu_runs_as_fp32_unless_forced(tmp_path, caplog):
    """Issue 11.9 / 15.1 (failed before: fp16 on CPU ran without a word). Forced, the fp16
    autocast path runs on CPU and stays close to fp32."""
    import logging

    import torch

    from config import effective_precision
    from modules.clip_archs import small_arch
    from modules.module_clip import random_state_dict
    from modules.training import small_config_dict
    from unified_model import create_unified_model

    assert effective_precision("fp16", "cuda") == "fp16" and effective_precision("bf16", "cpu") == "bf16"
    assert effective_precision("fp16", "cpu", force=True) == "fp16"
    clip_file = tmp_path / "clip.pt"
    torch.save(random_state_dict(small_arch(32, vision_width=64, vision_layers=2, text_width=64, text_layers=2)), clip_file)
    data = small_config_dict(32, vision_layers=2)
    data["clip_weights"] = str(clip_file)
    fp16 = from_dict({**data, "precision": "fp16"})
    with caplog.at_level(logging.WARNING):
        model = create_unified_model(config=fp16, device="cpu")
    assert model.config.precision == "fp32" and fp16.precision == "fp16"  # the caller's config is untouched
    assert "precision fp16 on CPU is much slower than fp32" in caplog.text
    forced = create_unified_model(config=fp16, device="cpu", force_precision=True)
    plain = create_unified_model(config=from_dict(data), device="cpu")
    assert forced.config.precision == "fp16"
    frames = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        half = forced.encode_videos(frames).video_embeddings.float()
        full = plain.encode_videos(frames).video_embeddings
    cosine = torch.nn.functional.cosine_similarity(half, full, dim=-1)
    assert (cosine > 0.99).all() and not torch.equal(half, full), cosine  # ran in fp16, close to fp32


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs" / "recipes").glob("*.json")))
def test_every_shipped_recipe_is_a_valid_config(recipe):
    """Each configs/recipes/*.json loads as the scripts load it (vit_b16 / vit_l14 were loaded by no test)."""
    from config import from_json

    config = from_json(Path(__file__).resolve().parents[1] / "configs" / "recipes" / recipe)
    assert config.to_dict()["tempme"]["base_encoder"]
