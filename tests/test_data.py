"""Datasets: MSR-VTT / CSV / synthetic loading, reproducible order and decoding."""
from __future__ import annotations

import csv
import json
import logging
import os

import pytest
import torch

from config import ConfigError, TrainingConfig
from modules.data import (
    EpochBatchSampler,
    TrainPairs,
    check_data_paths,
    load_csv_split,
    load_data_splits,
    load_msrvtt_split,
    make_train_loader,
)
from modules.synthetic_data import COLORS, MOTIONS, SHAPES, generate_synthetic_dataset
from modules.synthetic_video import write_moving_shapes_video
from modules.video_sampler import sample_video


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    """A miniature MSR-VTT in CLIP4Clip's layout; video3 and video9 have no file."""
    root = tmp_path_factory.mktemp("msrvtt")
    videos = root / "videos"
    videos.mkdir()
    for i, color in zip(range(5), [(200, 0, 0), (0, 200, 0), (0, 0, 200), (0, 0, 0), (200, 200, 0)]):
        if i == 3:
            continue
        write_moving_shapes_video(videos / f"video{i}.mp4", num_frames=12, fps=6, size=(32, 32), color=color)
    sentences = [{"video_id": f"video{i}", "caption": f"caption {k} of video {i}", "sen_id": 10 * i + k}
                 for i in range(5) for k in range(3)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    _write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"], ["video2"], ["video3"]])
    _write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
               [["ret0", "msr4", "video4", "a yellow thing"], ["ret1", "msr9", "video9", "gone"],
                ["ret2", "msr2", "video2", "a blue thing"]])
    return root


def test_msrvtt_splits_and_missing_videos(msrvtt, caplog):
    cfg = TrainingConfig(datatype="msrvtt", data_path=str(msrvtt))
    with caplog.at_level(logging.WARNING):
        splits = load_data_splits(cfg)
    train, val = splits.train, splits.val
    assert len(train.videos) == 3 and len(train.captions) == 9  # all captions of the 3 present videos
    assert train.missing == ["video3"]
    assert [os.path.basename(train.videos[v]) for v in train.caption_video[:3]] == ["video0.mp4"] * 3
    assert val.captions == ["a yellow thing", "a blue thing"] and val.missing == ["video9"]
    assert "video3" in caplog.text and "video9" in caplog.text  # reported, not fatal


def test_msrvtt_missing_files_name_their_key(tmp_path, msrvtt):
    with pytest.raises(ConfigError, match=r"^training\.data_path"):
        check_data_paths(TrainingConfig(datatype="msrvtt"))
    with pytest.raises(ConfigError, match=r"^training\.msrvtt_json: file not found"):
        check_data_paths(TrainingConfig(datatype="msrvtt", data_path=str(msrvtt), msrvtt_json=str(tmp_path / "x.json")))
    with pytest.raises(ConfigError, match=r"^training\.video_dir: folder not found"):
        check_data_paths(TrainingConfig(datatype="msrvtt", data_path=str(msrvtt), video_dir=str(tmp_path / "nope")))
    bad = _write_csv(tmp_path / "bad.csv", ["vid"], [["video0"]])
    with pytest.raises(ConfigError, match=r"^training\.val_csv: .*missing column"):
        load_msrvtt_split("val", bad, None, str(msrvtt / "videos"))


def test_csv_relative_paths_and_several_captions(tmp_path, msrvtt, caplog):
    sub = tmp_path / "set"
    sub.mkdir()
    os.symlink(msrvtt / "videos", sub / "clips")
    path = _write_csv(sub / "train.csv", ["video_path", "caption"], [
        ["clips/video0.mp4", "first"], ["clips/video0.mp4", "second"],
        [str(msrvtt / "videos" / "video1.mp4"), "absolute"], ["clips/missing.mp4", "x"]])
    with caplog.at_level(logging.WARNING):
        split = load_csv_split("train", path)
    assert split.captions == ["first", "second", "absolute"] and split.caption_video == [0, 0, 1]
    assert split.video_captions() == [[0, 1], [2]] and split.missing == ["clips/missing.mp4"]
    # video_dir overrides the CSV's folder for relative paths
    other = _write_csv(tmp_path / "other.csv", ["video_path", "caption"], [["video2.mp4", "c"]])
    assert load_csv_split("val", other, video_dir=str(msrvtt / "videos")).videos[0].endswith("video2.mp4")
    with pytest.raises(ConfigError, match=r"^training\.train_csv: required"):
        check_data_paths(TrainingConfig(datatype="csv"))
    with pytest.raises(ConfigError, match=r"^training\.train_csv: file not found"):
        check_data_paths(TrainingConfig(datatype="csv", train_csv=str(tmp_path / "none.csv")))


def test_synthetic_generator(tmp_path):
    data = generate_synthetic_dataset(tmp_path / "syn", num_videos=12, num_val=5, seed=3, size=(32, 32), num_frames=8)
    assert len(data.clips) == 12
    with open(data.val_csv, newline="") as fh:
        val = list(csv.DictReader(fh))
    assert len(val) == 5 and len({r["caption"] for r in val}) == 5  # distinct validation captions
    for clip in data.clips:
        assert clip.color in COLORS and clip.shape in SHAPES and clip.motion in MOTIONS
        assert clip.color in clip.caption and clip.shape in clip.caption and MOTIONS[clip.motion] in clip.caption
        assert (tmp_path / "syn" / clip.video_path).stat().st_size > 0
    frames = sample_video(os.path.join(data.root, data.clips[0].video_path), 4, 32).frames
    assert frames.shape == (4, 3, 32, 32) and frames.std() > 0.1  # a visible shape, not a blank frame
    stamp = os.path.getmtime(data.train_csv)
    again = generate_synthetic_dataset(tmp_path / "syn", num_videos=12, num_val=5, seed=3, size=(32, 32), num_frames=8)
    assert again.clips == data.clips and os.path.getmtime(data.train_csv) == stamp  # reused, not rewritten


def test_synthetic_generator_writes_through_atomic_io(tmp_path, monkeypatch):
    """train.csv, val.csv and metadata.json are renamed into place from temp files of the
    project's one temp-name pattern (modules.atomic_io), and no temp file is left behind."""
    from modules.atomic_io import is_temp_name

    renamed = []
    real_replace = os.replace

    def spy(src, dst):
        renamed.append((os.path.basename(os.fspath(src)), os.path.basename(os.fspath(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    data = generate_synthetic_dataset(tmp_path / "syn", num_videos=3, num_val=1, seed=0, size=(32, 32), num_frames=4)
    finals = {"train.csv", "val.csv", "metadata.json"}
    assert {dst for _, dst in renamed if dst in finals} == finals
    assert all(is_temp_name(src) == os.getpid() for src, dst in renamed if dst in finals), renamed
    assert sorted(os.listdir(data.root)) == ["metadata.json", "train.csv", "val.csv", "videos"]
    with open(data.train_csv, "rb") as fh:
        assert fh.read().startswith(b"video_path,caption\r\nvideos/clip_00000.mp4,")  # csv.writer's bytes


def test_epoch_batch_sampler_is_reproducible_and_shards():
    a = list(EpochBatchSampler(20, 4, seed=1, epoch=0))
    assert a == list(EpochBatchSampler(20, 4, seed=1, epoch=0)) and len(a) == 5
    assert a != list(EpochBatchSampler(20, 4, seed=1, epoch=1))  # reshuffled every epoch
    assert sorted(i for batch in a for _, i in batch) == list(range(20))
    assert all(e == 0 for batch in a for e, _ in batch)
    # two ranks take the halves of every global batch, in rank order
    r0 = list(EpochBatchSampler(20, 4, seed=1, epoch=0, rank=0, world_size=2))
    r1 = list(EpochBatchSampler(20, 4, seed=1, epoch=0, rank=1, world_size=2))
    assert [x + y for x, y in zip(r0, r1)] == a
    # resume mid-epoch: the remaining batches, identical to the uninterrupted ones
    assert list(EpochBatchSampler(20, 4, seed=1, epoch=0, start_batch=3)) == a[3:]
    assert len(EpochBatchSampler(22, 4, seed=1, epoch=0, num_batches=2)) == 2
    with pytest.raises(ValueError):
        EpochBatchSampler(20, 3, seed=1, epoch=0, world_size=2)


def test_train_pairs_deterministic_across_workers(tmp_path):
    data = generate_synthetic_dataset(tmp_path / "syn", num_videos=8, num_val=2, seed=0, size=(32, 32), num_frames=24)
    split = load_csv_split("train", data.train_csv)
    pairs = TrainPairs(split, num_segments=4, size=32, max_words=16, seed=5)
    x, y = pairs[(0, 2)], pairs[(0, 2)]
    assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["tokens"], y["tokens"])
    assert x["tokens"].shape == (16,) and x["frames"].shape == (4, 3, 32, 32)
    # another epoch draws other frame offsets (24 frames, 4 segments of 6: some offset differs)
    assert any(not torch.equal(pairs[(e, 2)]["frames"], x["frames"]) for e in range(1, 4))
    sampler = EpochBatchSampler(len(pairs), 2, seed=5, epoch=1)
    serial = [b["frames"] for b in make_train_loader(pairs, sampler, num_workers=0)]
    parallel = [b["frames"] for b in make_train_loader(pairs, sampler, num_workers=2)]
    assert len(serial) == 3 and all(torch.equal(s, p) for s, p in zip(serial, parallel))
    # one caption per video with expand_sentences=False
    assert len(TrainPairs(split, 4, 32, 16, seed=5, expand_sentences=False)) == len(split.videos)


def test_undecodable_training_video_is_skipped(tmp_path, caplog):
    data = generate_synthetic_dataset(tmp_path / "syn", num_videos=4, num_val=1, seed=0, size=(32, 32), num_frames=8)
    split = load_csv_split("train", data.train_csv)
    with open(split.videos[0], "wb") as fh:
        fh.write(b"not a video")
    pairs = TrainPairs(split, num_segments=4, size=32, max_words=16, seed=0)
    with caplog.at_level(logging.WARNING):
        item = pairs[(0, 0)]
    assert item["index"] == 1 and "undecodable" in caplog.text
