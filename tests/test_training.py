"""Training: parameter groups, modes, schedule, checkpoints, exact resume, CLI (tiny models)."""
from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pytest
import torch

from config import ConfigError, UnifiedModelConfig, from_dict
from modules.clip_archs import small_arch
from modules.module_clip import random_state_dict
from modules.training import (
    Trainer,
    build_optimizer,
    capture_rng_state,
    contrastive_loss,
    lr_factor,
    plan_phases,
    restore_rng_state,
    small_config_dict,
    uses_weight_decay,
)
from unified_model import UnifiedTempMeSTOPModel, create_unified_model, read_checkpoint

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # 2 x 2 patches of 16 px: the smallest CLIP the config accepts


def _clip():
    return random_state_dict(small_arch(SIZE, vision_width=64, vision_layers=2, text_width=64, text_layers=2))


@pytest.fixture(scope="module")
def clip_state():
    return _clip()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic clips shared by the tests (generated once)."""
    root = tmp_path_factory.mktemp("syn")
    from modules.synthetic_data import generate_synthetic_dataset

    generate_synthetic_dataset(root, num_videos=20, num_val=4, seed=0, size=(SIZE, SIZE), num_frames=12)
    return str(root)


def _config(tmp_path, data_dir, sim_header="meanP", **training):
    base = dict(datatype="synthetic", data_path=data_dir, synthetic_num_videos=20, synthetic_val_videos=4,
                seed=0, batch_size=4, num_epochs=1, num_workers=0, checkpoint_dir=str(tmp_path / "ckpt"),
                amp=False, tempme_lr=1e-2, stop_lr=1e-2, warmup_proportion=0.0)
    base.update(training)
    return from_dict(small_config_dict(SIZE, vision_layers=2, sim_header=sim_header, training=base))


def _trainables(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _changed(before, after, group_names):
    return {n for n in group_names if not torch.equal(before[n], after[n])}


def _names(model, group):
    return {n for n, _ in model.named_group_parameters(group)}


# ----------------------------------------------------------------------------- pieces


def test_contrastive_loss_matches_definition():
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    video = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    loss, t2v, v2t = contrastive_loss(text, video, torch.tensor(100.0))
    logits = 100 * text @ video.t()
    expected_t2v = -torch.log_softmax(logits, dim=1).diag().mean()
    expected_v2t = -torch.log_softmax(logits, dim=0).diag().mean()
    assert torch.allclose(t2v, expected_t2v) and torch.allclose(v2t, expected_v2t)
    assert torch.allclose(loss, (expected_t2v + expected_v2t) / 2)
    # the validation loss: the same with one caption per video; several captions are each a positive
    from modules.training import validation_loss

    val = validation_loss(text @ video.t(), list(range(5)), 100.0)
    assert val == pytest.approx({"loss": float(loss), "t2v": float(t2v), "v2t": float(v2t)}, rel=1e-5)
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])  # captions 0, 1 of video 0; caption 2 of video 1
    val = validation_loss(sim, [0, 0, 1], 1.0)
    log_p = sim.t().log_softmax(dim=1)
    assert val["v2t"] == pytest.approx(float(-((log_p[0, 0] + log_p[0, 1]) / 2 + log_p[1, 2]) / 2))


def test_parameter_groups_and_weight_decay(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, sim_header="seqTransf", train_backbone=True, tempme_lr=1e-3)
    # seqTransf copies CLIP text blocks 0-3: this CLIP needs 4 text layers
    clip_state = random_state_dict(small_arch(SIZE, vision_width=64, vision_layers=2, text_width=64, text_layers=4))
    model = UnifiedTempMeSTOPModel(config, clip_state)
    opt = build_optimizer(model, config.training)
    by_group = {}
    for pg in opt.param_groups:
        by_group.setdefault(pg["group"], set()).update(id(p) for p in pg["params"])
        if pg["name"].endswith("no_decay"):
            assert pg["weight_decay"] == 0.0
        else:
            assert pg["weight_decay"] == 0.2
    ids = lambda group: {id(p) for n, p in model.named_group_parameters(group) if n != "clip.logit_scale"}
    assert by_group["tempme"] == ids("tempme") and by_group["stop"] == ids("stop")
    assert by_group["backbone"] == ids("backbone")
    assert id(model.clip.logit_scale) not in set().union(*by_group.values())
    lrs = {pg["group"]: pg["lr"] for pg in opt.param_groups}
    assert lrs == {"tempme": 1e-3, "stop": 1e-2, "backbone": pytest.approx(1e-4)}
    params = dict(model.named_parameters())
    assert uses_weight_decay("tempme.lora.0.lora_a", params["tempme.lora.0.lora_a"])
    assert uses_weight_decay("tempme.lora.0.lora_b", params["tempme.lora.0.lora_b"])
    for name in ("temporal_prompts.base_prompts", "temporal_prompts.prompt_log_size_gate", "tempme.clip_pos.0",
                 "temporal_prompts.in_proj.bias", "head.frame_position_embeddings.weight", "clip.token_embedding.weight",
                 "clip.visual.positional_embedding", "clip.ln_final.weight"):
        assert not uses_weight_decay(name, params[name]), name


def test_phases_and_schedule(tmp_path, data_dir):
    cfg = _config(tmp_path, data_dir, num_epochs=4, sequential_split=1, warmup_proportion=0.25).training
    seq = plan_phases(cfg, "sequential", steps_per_epoch=4)
    assert [(p.name, p.groups, p.first_epoch, p.end_epoch, p.start_step, p.num_steps) for p in seq] == [
        ("tempme", ("tempme",), 0, 1, 0, 4), ("stop", ("stop",), 1, 4, 4, 12)]
    factors = [lr_factor(s, seq, 0.25) for s in range(16)]
    assert factors[0] == 0.5 and factors[1] == 1.0  # 1 warmup step in the 4-step phase
    assert factors[4] == 0.25 and factors[7] == 1.0  # the second phase warms up again (3 steps)
    assert all(a >= b for a, b in zip(factors[7:], factors[8:])) and 0 < factors[-1] < 0.05
    joint = plan_phases(cfg, "joint", steps_per_epoch=4)
    assert len(joint) == 1 and joint[0].num_steps == 16 and joint[0].groups == ("tempme", "stop")
    cfg.max_steps, cfg.train_backbone = 6, True
    seq = plan_phases(cfg, "sequential", steps_per_epoch=4)
    assert [p.num_steps for p in seq] == [4, 2] and seq[0].groups == ("tempme", "backbone")
    cfg.sequential_split = None  # default: half the epochs
    assert plan_phases(cfg, "sequential", steps_per_epoch=1)[0].end_epoch == 2


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    path = tmp_path / "rng.pth"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(loaded)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["tempme_only", "stop_only", "joint"])
def test_modes_train_only_their_groups(mode, clip_state, tmp_path, data_dir):
    trainer = Trainer(_config(tmp_path, data_dir, max_steps=2), mode, clip_state_dict=clip_state,
                      progress=False, log_dir=False)
    model = trainer.model
    before = _trainables(trainer)
    trainer.train()
    after = _trainables(trainer)
    # only the trained groups have a learning rate to log (failed before: stop_only logged a TempMe rate)
    assert set(trainer.group_lrs()) == {"joint": {"tempme", "stop"}, "tempme_only": {"tempme"}, "stop_only": {"stop"}}[mode]
    tempme, stop, backbone = _names(model, "tempme"), _names(model, "stop"), _names(model, "backbone")
    assert not _changed(before, after, backbone)
    if mode in ("tempme_only", "joint"):
        assert _changed(before, after, tempme)
    else:
        assert not _changed(before, after, tempme)
    if mode in ("stop_only", "joint"):
        assert _changed(before, after, stop)
    else:
        assert not _changed(before, after, stop)
    trainer.close()


def test_train_backbone_updates_clip_but_not_logit_scale(clip_state, tmp_path, data_dir):
    trainer = Trainer(_config(tmp_path, data_dir, max_steps=1, train_backbone=True, backbone_lr=1e-3, amp=True),
                      "stop_only", clip_state_dict=clip_state, progress=False, log_dir=False)
    before = _trainables(trainer)
    summary = trainer.train()
    after = _trainables(trainer)
    assert math.isfinite(summary["loss"])  # bf16 autocast on CPU
    backbone = _names(trainer.model, "backbone")
    assert "clip.visual.conv1.weight" in _changed(before, after, backbone)
    assert "clip.logit_scale" not in _changed(before, after, backbone)
    assert not _changed(before, after, _names(trainer.model, "tempme"))
    payload = read_checkpoint(os.path.join(trainer.cfg.checkpoint_dir, "last.pth"))
    assert payload["includes_backbone"] and "clip.visual.conv1.weight" in payload["trainable"]
    # the best R@1 is tracked before saving: last.pth records the evaluation it carries
    assert payload["best_r1"] == payload["metrics"]["t2v"]["R1"]


# ----------------------------------------------------------------------------- checkpoints and resume


def _run(tmp_path, data_dir, clip_state, name, stop_at_step=None, resume=None):
    config = _config(tmp_path / name, data_dir, num_epochs=3, sequential_split=1, grad_accum_steps=2,
                     eval_every=2, amp=True, warmup_proportion=0.2)
    trainer = Trainer(config, "sequential", clip_state_dict=clip_state, resume=resume, progress=False)
    summary = trainer.train(stop_at_step=stop_at_step)
    trainer.close()
    return trainer, summary


def test_resume_is_bit_exact(clip_state, tmp_path, data_dir):
    """16 train pairs, batch 4, accumulation 2: 2 steps/epoch, 3 epochs; TempMe phase = epoch 1.

    Interrupted at step 1 (mid-epoch, TempMe phase), resumed across the switch to the STOP
    phase, interrupted at step 3 (mid-epoch), resumed to the end: bit-identical to one run.
    """
    full, summary = _run(tmp_path, data_dir, clip_state, "full")
    assert summary["step"] == 6 and full.steps_per_epoch == 2

    part, _ = _run(tmp_path, data_dir, clip_state, "part", stop_at_step=1)  # interrupted mid-epoch 1 (TempMe phase)
    ckpt_dir = part.cfg.checkpoint_dir
    first = read_checkpoint(os.path.join(ckpt_dir, "last.pth"))
    assert (first["step"], first["epoch"], first["batches_done"], first["phase"]) == (1, 0, 2, "tempme")
    # resumed across the phase switch, interrupted again mid-epoch 2 (STOP phase)
    _run(tmp_path, data_dir, clip_state, "part", stop_at_step=3, resume=os.path.join(ckpt_dir, "last.pth"))
    last = read_checkpoint(os.path.join(ckpt_dir, "last.pth"))
    for key in ("optimizer", "scheduler", "scaler", "rng_state", "epoch", "step", "mode", "phase", "batches_done"):
        assert key in last, key
    assert (last["step"], last["epoch"], last["batches_done"], last["mode"], last["phase"]) == (3, 1, 2, "sequential", "stop")
    epoch1 = read_checkpoint(os.path.join(ckpt_dir, "checkpoint_epoch_1.pth"))
    assert (epoch1["step"], epoch1["epoch"], epoch1["batches_done"], epoch1["phase"]) == (2, 1, 0, "stop")

    resumed, summary = _run(tmp_path, data_dir, clip_state, "part", resume=os.path.join(ckpt_dir, "last.pth"))
    assert summary["step"] == 6
    a, b = _trainables(full), _trainables(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][field], sb[k][field])
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert [h["loss"] for h in full.history[3:]] == [h["loss"] for h in resumed.history]
    assert [h["loss"] for h in full.history[:1]] == [h["loss"] for h in part.history]

    # the phase split was respected: epoch 1 trained TempMe only, epochs 2-3 STOP only
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt_dir, "*.pth")))
    assert files == ["best.pth", "checkpoint_epoch_1.pth", "checkpoint_epoch_2.pth", "checkpoint_epoch_3.pth", "last.pth"]
    e1, e3 = epoch1["trainable"], read_checkpoint(os.path.join(ckpt_dir, "checkpoint_epoch_3.pth"))["trainable"]
    tempme = _names(full.model, "tempme")
    stop = _names(full.model, "stop")
    assert all(torch.equal(e1[n], e3[n]) for n in tempme)  # frozen in the STOP phase
    assert any(not torch.equal(e1[n], e3[n]) for n in stop)
    assert any(not torch.equal(e1[n], torch.zeros_like(e1[n])) for n in tempme if "lora_b" in n)

    # best.pth is a model checkpoint the inference API loads
    best = read_checkpoint(os.path.join(ckpt_dir, "best.pth"))
    assert best["metrics"]["t2v"]["R1"] == best["best_r1"]
    clip_file = tmp_path / "clip.pt"
    torch.save(clip_state, clip_file)
    model = create_unified_model(checkpoint=os.path.join(ckpt_dir, "best.pth"), device="cpu", clip_weights=str(clip_file))
    assert torch.equal(dict(model.named_parameters())["tempme.lora.0.lora_b"], best["trainable"]["tempme.lora.0.lora_b"])
    assert glob.glob(os.path.join(ckpt_dir, "logs", "events.out.tfevents.*"))


def test_resume_refuses_another_mode(clip_state, tmp_path, data_dir):
    trainer = Trainer(_config(tmp_path, data_dir, max_steps=1), "joint", clip_state_dict=clip_state, progress=False,
                      log_dir=False)
    trainer.train()
    with pytest.raises(ConfigError, match=r"^training\.training_mode: .*--mode joint"):
        Trainer(_config(tmp_path, data_dir, max_steps=2), "stop_only", clip_state_dict=clip_state, progress=False,
                log_dir=False, resume=os.path.join(trainer.cfg.checkpoint_dir, "last.pth"))


def test_batch_larger_than_dataset_is_a_config_error(clip_state, tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"^training\.batch_size"):
        Trainer(_config(tmp_path, data_dir, batch_size=64), "joint", clip_state_dict=clip_state, progress=False,
                log_dir=False)


def test_the_callers_config_is_not_written_to(clip_state, tmp_path, data_dir):
    """The Trainer set the caller's training_mode (and a missing training section) in place,
    also when it then raised; it works on a copy."""
    config = _config(tmp_path, data_dir, batch_size=64)
    before = config.to_dict()
    with pytest.raises(ConfigError, match=r"^training\.batch_size"):
        Trainer(config, "stop_only", clip_state_dict=clip_state, progress=False, log_dir=False)
    assert config.to_dict() == before and config.training.training_mode != "stop_only"
    bare = UnifiedModelConfig()
    with pytest.raises(Exception):
        Trainer(bare, "stop_only", clip_state_dict=clip_state, progress=False, log_dir=False)
    assert bare.training is None


# ----------------------------------------------------------------------------- command line


@pytest.fixture()
def cli_config(tmp_path, data_dir, clip_state):
    clip_file = tmp_path / "clip.pt"
    torch.save(clip_state, clip_file)
    config = small_config_dict(SIZE, vision_layers=2, training=dict(
        datatype="synthetic", data_path=data_dir, synthetic_num_videos=20, synthetic_val_videos=4, batch_size=4,
        num_epochs=1, num_workers=0, checkpoint_dir=str(tmp_path / "ckpt"), amp=False, log_every=1))
    config["clip_weights"] = str(clip_file)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_cli_bad_values_exit_2_naming_the_key(cli_config, tmp_path, capsys):
    from train_unified_model import main

    cases = [
        (["--batch_size", "0"], "training.batch_size"),
        (["--datatype", "msrvtt", "--data_path", str(tmp_path / "none")], "training.data_path"),
        (["--resume", str(tmp_path / "missing.pth")], "--resume"),
        (["--clip_weights", str(tmp_path / "nope.pt")], "clip_weights"),
        (["--device", "tpu"], "device"),
    ]
    for extra, key in cases:
        assert main(["--config", cli_config, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {key}") and "\n" not in err, (extra, err)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": {"warmup_proportion": 2}}))
    assert main(["--config_path", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: training.warmup_proportion")
    assert not os.path.exists(tmp_path / "ckpt")  # nothing was started


def test_cli_train_then_eval(cli_config, tmp_path, capsys):
    from train_unified_model import main

    assert main(["--config", cli_config, "--mode", "stop_only", "--max_steps", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps (stop_only)" in out and "text->video: R@1" in out
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "last.pth").is_file() and (ckpt / "best.pth").is_file()
    assert glob.glob(str(ckpt / "logs" / "events.out.tfevents.*"))
    assert main(["--config", cli_config, "--eval_only", "--checkpoint", str(ckpt / "best.pth"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "validation (4 videos, 4 captions)" in out and "video->text: R@1" in out
    # --eval_only also writes its metrics (issue 11.5; failed before: printed only)
    written = json.loads((ckpt / "eval_metrics.json").read_text())
    assert f"R@1 {written['t2v']['R1']:.1f}" in out and math.isfinite(written["loss"]["loss"])
    # validation loss next to the train loss in TensorBoard (failed before: only val R@k)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ckpt / "logs"))
    events.Reload()
    assert {"train/loss", "val/loss", "val/loss_t2v", "val/loss_v2t"} <= set(events.Tags()["scalars"])
    # resuming a finished run has nothing left to do; a folder means its last.pth
    assert main(["--config", cli_config, "--mode", "stop_only", "--max_steps", "2", "--resume", str(ckpt), "--quiet"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out


def test_training_example_non_interactive(tmp_path, capsys):
    import training_example

    code = training_example.main(["--non_interactive", "--mode", "tempme_only", "--output_dir", str(tmp_path / "ex"),
                                  "--max_steps", "2", "--num_videos", "12", "--num_val", "4", "--batch_size", "4", "--size", str(SIZE),
                                  "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "tempme_only" in out and "R@1" in out and "python train_unified_model.py --config" in out
    assert os.path.isfile(tmp_path / "ex" / "checkpoints" / "last.pth")


def test_training_example_asks_until_the_answer_is_valid(capsys):
    import training_example

    answers = iter(["9", "nonsense", "4"])
    assert training_example.choose_mode(lambda prompt: next(answers)) == "sequential"
    assert training_example.choose_mode(lambda prompt: "") == "joint"  # enter = default
    assert training_example.choose_mode(lambda prompt: "stop_only") == "stop_only"
    assert "'9' is not one of" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["training_config.json", "recipes/tempme_msrvtt.json", "recipes/stop_msrvtt.json",
                                  "recipes/clip4clip_meanp_msrvtt.json"])
def test_shipped_training_configs_validate(name):
    from config import from_json

    config = from_json(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name))
    assert config.training is not None and config.training.datatype == "msrvtt"


# ----------------------------------------------------------------------------- templates, usability (issue 11)


def _mini_msrvtt(root, data_dir):
    """The synthetic clips laid out as CLIP4Clip's MSR-VTT files under root/data/msrvtt."""
    import csv

    base = root / "data" / "msrvtt"
    (base / "videos").mkdir(parents=True)
    sentences, train_ids, test_rows = [], [], []
    for split in ("train", "val"):
        with open(os.path.join(data_dir, f"{split}.csv"), newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                vid = f"video{split}{i}"
                src = row["video_path"] if os.path.isabs(row["video_path"]) else os.path.join(data_dir, row["video_path"])
                os.symlink(src, base / "videos" / f"{vid}.mp4")
                if split == "train":
                    train_ids.append([vid])
                    sentences.append({"video_id": vid, "caption": row["caption"], "sen_id": i})
                else:
                    test_rows.append([f"ret{i}", f"msr{i}", vid, row["caption"]])
    (base / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    for name, header, rows in (("MSRVTT_train.9k.csv", ["video_id"], train_ids),
                               ("MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"], test_rows)):
        with open(base / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory, data_dir, clip_state):
    """A working folder holding ./data/msrvtt and the small CLIP the template copies train."""
    root = tmp_path_factory.mktemp("template")
    _mini_msrvtt(root, data_dir)
    torch.save(clip_state, root / "clip.pt")
    return root


def _template_copy(folder, edit):
    """configs/training_config.json with the small model, its training section edited by ``edit`` only."""
    shipped = json.loads((ROOT / "configs" / "training_config.json").read_text())
    data = small_config_dict(SIZE, vision_layers=2, training=shipped["training"])
    data["clip_weights"] = str(folder / "clip.pt")
    edit(data["training"])
    path = folder / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_template_edits_train_in_every_mode(template_dir, data_dir, monkeypatch, capsys):
    """Issue 11.1/11.2: the shipped template, with only num_epochs changed (1, 2, 5), trains every
    mode for a step; a 1-epoch sequential run is refused naming the key (failed before: a
    num_epochs edit broke every mode through sequential_split, and 1-epoch sequential trained STOP only)."""
    from train_unified_model import main

    monkeypatch.chdir(template_dir)  # the template's relative paths: ./data/msrvtt, ./checkpoints/...
    run = ["--max_steps", "1", "--num_workers", "0", "--overwrite", "--quiet"]
    for epochs in (1, 2, 5):
        config = _template_copy(template_dir, lambda t: t.update(num_epochs=epochs))
        for mode in ("joint", "tempme_only", "stop_only", "sequential"):
            code = main(["--config", config, "--mode", mode, *run])
            out, err = capsys.readouterr()
            if epochs == 1 and mode == "sequential":
                assert code == 2 and err.startswith("error: training.num_epochs: sequential mode needs >= 2 epochs"), err
                continue
            assert code == 0, (epochs, mode, err)
            assert f"trained 1 step ({mode})" in out
    assert not os.path.exists(template_dir / "checkpoints" / "unified_model" / "synthetic_data")
    # only the datatype and its data keys changed: the other datatypes need nothing from msrvtt's keys
    edits = {
        "csv": dict(datatype="csv", train_csv=os.path.join(data_dir, "train.csv"), val_csv=os.path.join(data_dir, "val.csv")),
        "synthetic": dict(datatype="synthetic", synthetic_num_videos=20, synthetic_val_videos=4),
    }
    for name, edit in edits.items():
        code = main(["--config", _template_copy(template_dir, lambda t: t.update(edit)), *run])
        out, err = capsys.readouterr()
        assert code == 0 and "trained 1 step (joint)" in out, (name, err)
    # synthetic clips go to checkpoint_dir/synthetic_data, not into the msrvtt folder
    assert (template_dir / "checkpoints" / "unified_model" / "synthetic_data" / "train.csv").is_file()
    assert sorted(os.listdir(template_dir / "data" / "msrvtt")) == ["MSRVTT_JSFUSION_test.csv", "MSRVTT_data.json",
                                                                    "MSRVTT_train.9k.csv", "videos"]


def test_fresh_run_refuses_another_runs_checkpoint_dir(cli_config, tmp_path, capsys):
    """Issue 11.3 (failed before: the second run silently overwrote last.pth/best.pth, kept the
    old epoch files and added a second event file). Also 11.7: "1 step"."""
    from train_unified_model import main

    ckpt = tmp_path / "ckpt"
    assert main(["--config", cli_config, "--max_steps", "1", "--quiet"]) == 0
    assert "trained 1 step (joint)" in capsys.readouterr().out
    before = sorted(os.listdir(ckpt))
    assert main(["--config", cli_config, "--max_steps", "1", "--quiet", "--mode", "stop_only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training.checkpoint_dir: ") and "\n" not in err
    assert f"--resume {ckpt / 'last.pth'}" in err and "--overwrite" in err
    assert sorted(os.listdir(ckpt)) == before
    (ckpt / "checkpoint_epoch_7.pth").write_bytes(b"old")
    assert main(["--config", cli_config, "--max_steps", "1", "--quiet", "--mode", "stop_only", "--overwrite"]) == 0
    assert not (ckpt / "checkpoint_epoch_7.pth").exists()
    assert len(glob.glob(str(ckpt / "logs" / "events.out.tfevents.*"))) == 1
    assert read_checkpoint(str(ckpt / "last.pth"))["mode"] == "stop_only"


def test_cli_flags_set_every_training_key_null_included(cli_config, tmp_path):
    from train_unified_model import apply_overrides, build_parser

    args = build_parser().parse_args(["--sequential_split", "null", "--max_steps", "none", "--keep_checkpoints", "0",
                                      "--weight_decay", "0.1", "--no-expand_sentences", "--amp_dtype", "fp16",
                                      "--epochs", "3"])
    training = apply_overrides({"training": {"sequential_split": 4, "max_steps": 9}}, args)["training"]
    assert training == {"sequential_split": None, "max_steps": None, "keep_checkpoints": 0, "weight_decay": 0.1,
                        "expand_sentences": False, "amp_dtype": "fp16", "num_epochs": 3}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--batch_size", "null"])  # not nullable


def test_logging_goes_through_tqdm_writer(capsys):
    """Issue 11.4 (failed before: the record was glued onto the bar, '...it/s]INFO ...')."""
    import logging
    import sys

    from tqdm import tqdm

    from modules.cli_support import run_cli

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)

    def job():
        bar = tqdm(total=3, file=sys.stderr, mininterval=0)
        bar.update(1)
        logging.getLogger("train").info("logged under the bar")
        bar.update(1)
        bar.close()
        return 0

    try:
        assert run_cli(job) == 0
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    err = capsys.readouterr().err
    pieces = [p for chunk in err.split("\n") for p in chunk.split("\r")]
    assert "INFO logged under the bar" in pieces, repr(err)


def test_non_finite_loss_stops_at_once_and_saves_nothing(clip_state, tmp_path, data_dir):
    """Issue 11.6 (failed before: training went on with NaN weights and wrote them)."""
    from modules.training import TrainingDiverged

    trainer = Trainer(_config(tmp_path, data_dir, max_steps=2), "stop_only", clip_state_dict=clip_state,
                      progress=False, log_dir=False)
    with torch.no_grad():
        trainer.model.clip.logit_scale.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 1 \(epoch 1\), learning rates stop ") as err:
        trainer.train()
    assert "\n" not in str(err.value) and "tempme" not in str(err.value)  # stop_only trains no TempMe rate
    assert not glob.glob(os.path.join(trainer.cfg.checkpoint_dir, "*.pth"))


def test_ctrl_c_names_the_checkpoint_to_resume(cli_config, tmp_path, capsys, monkeypatch, caplog):
    """Issue 11.7: Ctrl-C says which checkpoint --resume continues from (failed before: 'interrupted' only)."""
    import logging

    from train_unified_model import main

    original = Trainer._forward_backward

    def interrupt_after_step_1(self, batch):
        if self.step >= 1:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_forward_backward", interrupt_after_step_1)
    assert main(["--config", cli_config, "--max_steps", "3", "--save_every_steps", "1", "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted: continue with --resume {tmp_path / 'ckpt' / 'last.pth'}"
    assert read_checkpoint(str(tmp_path / "ckpt" / "last.pth"))["step"] == 1
    monkeypatch.setattr(Trainer, "_forward_backward", original)
    # the final validation of a run stopped inside its first epoch names epoch 1 (failed before: "epoch 0")
    with caplog.at_level(logging.INFO, logger="modules.training"):
        assert main(["--config", cli_config, "--max_steps", "1", "--quiet", "--overwrite"]) == 0
    assert "validation after step 1 (epoch 1): loss " in caplog.text


def test_training_example_re_asks_epochs_and_shows_defaults(tmp_path, capsys, clip_state):
    """Issue 11.8 (failed before: int('x') crashed; --clip_weights FILE into a new folder raised
    FileNotFoundError on config.json.tmp; --epochs/--batch_size help showed no default)."""
    import training_example

    answers = iter(["x", "0", "3"])
    assert training_example.ask_epochs(6, lambda prompt: next(answers)) == 3
    assert training_example.ask_epochs(6, lambda prompt: "") == 6
    assert "'x' is not a whole number of epochs" in capsys.readouterr().out
    help_text = " ".join(training_example.build_parser().format_help().split())
    assert "epochs (asked for unless --non_interactive) (default: 6)" in help_text
    assert "clips per optimizer step (default: 16)" in help_text
    clip_file = tmp_path / "small.pt"
    torch.save(clip_state, clip_file)
    code = training_example.main(["--non_interactive", "--output_dir", str(tmp_path / "new" / "folder"),
                                  "--clip_weights", str(clip_file), "--quiet"])
    err = capsys.readouterr().err.strip()
    # the small CLIP does not fit the example's ViT-B/32 config: a one-line usage error, not a crash
    assert code == 2 and err.startswith("error: ") and "small.pt" in err and "\n" not in err, err
    assert (tmp_path / "new" / "folder" / "config.json").is_file()


# ----------------------------------------------------------------------------- fp16 + GradScaler on CPU (issue 15)

_SCALER = {"growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1, "_growth_tracker": 0}


def _fp16_trainer(tmp_path, data_dir, clip_state, name, resume=None):
    config = _config(tmp_path / name, data_dir, max_steps=3, amp=True, amp_dtype="fp16", batch_size=4)
    return Trainer(config, "joint", clip_state_dict=clip_state, progress=False, log_dir=False, resume=resume)


def test_fp16_autocast_with_grad_scaler_on_cpu(clip_state, tmp_path, data_dir):
    """The CUDA recipe (fp16 autocast + GradScaler) runs on CPU: an overflowing scale skips the
    step (weights unchanged) and backs off; finite steps update and grow the scale."""
    trainer = _fp16_trainer(tmp_path, data_dir, clip_state, "fp16")
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    trainer.scaler.load_state_dict({"scale": 2.0 ** 40, **_SCALER})  # fp16 gradients overflow at this scale
    before = _trainables(trainer)
    trainer.train(stop_at_step=1)
    assert trainer.history[-1]["skipped"] and trainer.scaler.get_scale() == 2.0 ** 39
    assert not _changed(before, _trainables(trainer), before.keys())  # the skipped step changed nothing
    trainer.scaler.load_state_dict({"scale": 8.0, **_SCALER})
    trainer.train()
    assert [h["skipped"] for h in trainer.history] == [True, False, False]
    assert [h["loss_scale"] for h in trainer.history[1:]] == [16.0, 32.0]  # growth after every good step
    assert _changed(before, _trainables(trainer), _names(trainer.model, "stop"))
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    saved = read_checkpoint(os.path.join(trainer.cfg.checkpoint_dir, "last.pth"))["scaler"]
    assert saved == trainer.scaler.state_dict()


def test_fp16_resume_restores_the_scaler_exactly(clip_state, tmp_path, data_dir):
    full = _fp16_trainer(tmp_path, data_dir, clip_state, "full")
    full.scaler.load_state_dict({"scale": 8.0, **_SCALER})
    full.train()
    part = _fp16_trainer(tmp_path, data_dir, clip_state, "part")
    part.scaler.load_state_dict({"scale": 8.0, **_SCALER})
    part.train(stop_at_step=1)
    resumed = _fp16_trainer(tmp_path, data_dir, clip_state, "part",
                            resume=os.path.join(part.cfg.checkpoint_dir, "last.pth"))
    assert resumed.scaler.state_dict() == part.scaler.state_dict()
    resumed.train()
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    a, b = _trainables(full), _trainables(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [h["loss"] for h in full.history[1:]] == [h["loss"] for h in resumed.history]


def test_amp_dtype_auto_is_bf16_on_cpu(clip_state, tmp_path, data_dir):
    from modules.training import autocast_dtype

    cfg = _config(tmp_path, data_dir).training
    assert autocast_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(cfg, torch.device("cuda")) == torch.float16
    cfg.amp_dtype = "bf16"
    assert autocast_dtype(cfg, torch.device("cuda")) == torch.bfloat16
