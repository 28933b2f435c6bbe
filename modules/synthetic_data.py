"""A synthetic text-video retrieval set: short clips of one moving coloured shape.

Each clip shows a circle, square or triangle of one of six colours moving in one of five
directions over a lightly tinted background, with random size and path jitter; its caption
names colour, shape and motion ("a red circle moving from left to right"). There are
6 x 3 x 5 = 90 distinct (colour, shape, motion) combinations; the validation clips use
distinct combinations, so every validation caption has exactly one correct video.

``generate_synthetic_dataset(out_dir, num_videos, num_val, ...)`` writes
``videos/clip_00000.mp4 ...``, ``train.csv`` and ``val.csv`` (header ``video_path,caption``,
paths relative to ``out_dir``) and ``metadata.json``; an existing folder written with the
same settings is reused as is.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
from tqdm import tqdm

from modules.atomic_io import atomic_write, save_json_atomic
from modules.synthetic_video import DIRECTIONS, MovingShape, moving_shapes_frames, encode_video

__all__ = [
    "COLORS",
    "SHAPES",
    "MOTIONS",
    "NUM_COMBINATIONS",
    "SyntheticClip",
    "SyntheticDataset",
    "caption_for",
    "generate_synthetic_dataset",
]

logger = logging.getLogger(__name__)

#: colour name -> RGB
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
#: direction key of modules.synthetic_video.DIRECTIONS -> phrase used in captions
MOTIONS: Dict[str, str] = {
    "right": "moving from left to right",
    "left": "moving from right to left",
    "up": "moving up",
    "down": "moving down",
    "diagonal": "moving diagonally down",
}
NUM_COMBINATIONS = len(COLORS) * len(SHAPES) * len(MOTIONS)
_TEMPLATES = ("a {color} {shape} {motion}", "{color} {shape} {motion}", "a {color} {shape} is {motion}")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticClip:
    """One generated clip: file (relative to the dataset folder) and its attributes."""

    video_path: str
    caption: str
    color: str
    shape: str
    motion: str
    split: str


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated set lives."""

    root: str
    train_csv: str
    val_csv: str
    clips: Tuple[SyntheticClip, ...]


def caption_for(color: str, shape: str, motion: str, template: int = 0) -> str:
    """The caption of a clip, e.g. ``caption_for("red", "circle", "right")``."""
    return _TEMPLATES[template % len(_TEMPLATES)].format(color=color, shape=shape, motion=MOTIONS[motion])


def _combinations() -> List[Tuple[str, str, str]]:
    return [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS]


def _jitter(point: Tuple[float, float], rng: np.random.Generator, amount: float) -> Tuple[float, float]:
    return tuple(float(np.clip(v + rng.uniform(-amount, amount), 0.1, 0.9)) for v in point)  # type: ignore[return-value]


def _write_csv(path: Path, clips: List[SyntheticClip]) -> None:
    """The split's CSV, written atomically; bytes as csv.writer makes them (\r\n rows, on
    every platform: binary, so no newline translation)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["video_path", "caption"])
    for clip in clips:
        writer.writerow([clip.video_path, clip.caption])
    atomic_write(path, lambda fh: fh.write(text.getvalue().encode("utf-8")))


def generate_synthetic_dataset(
    out_dir: Union[str, os.PathLike],
    num_videos: int = 120,
    num_val: int = 30,
    seed: int = 0,
    size: Tuple[int, int] = (64, 64),
    num_frames: int = 16,
    fps: float = 8.0,
    progress: bool = False,
) -> SyntheticDataset:
    """Write ``num_videos`` clips (the last ``num_val`` are the validation split).

    Args:
        out_dir: dataset folder (created).
        num_videos: total clips.
        num_val: validation clips, at most NUM_COMBINATIONS (90) so their captions differ.
        seed: everything (combinations, templates, sizes, paths, colours) derives from it.
        size: (width, height) of the clips, even numbers.
        num_frames: frames per clip.
        fps: frame rate.
        progress: show a tqdm bar.

    Returns:
        :class:`SyntheticDataset` with the CSV paths and the clip list.
    """
    if not 1 <= num_val < num_videos:
        raise ValueError(f"need 1 <= num_val < num_videos, got num_val={num_val}, num_videos={num_videos}")
    if num_val > NUM_COMBINATIONS:
        raise ValueError(f"num_val={num_val} exceeds the {NUM_COMBINATIONS} distinct captions")
    root = Path(out_dir)
    settings = {"format": _FORMAT_VERSION, "num_videos": num_videos, "num_val": num_val, "seed": seed,
                "size": list(size), "num_frames": num_frames, "fps": fps}
    meta_path = root / "metadata.json"
    train_csv, val_csv = root / "train.csv", root / "val.csv"
    if meta_path.is_file() and train_csv.is_file() and val_csv.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("settings") == settings and all((root / c["video_path"]).is_file() for c in meta.get("clips", [])):
            logger.info("reusing the synthetic dataset in %s", root)
            clips = tuple(SyntheticClip(**c) for c in meta["clips"])
            return SyntheticDataset(str(root), str(train_csv), str(val_csv), clips)

    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = _combinations()
    order = rng.permutation(len(combos))
    clips: List[SyntheticClip] = []
    for i in tqdm(range(num_videos), desc="synthetic clips", disable=not progress):
        color, shape, motion = combos[order[i % len(combos)]]
        start, end = DIRECTIONS[motion]
        rgb = np.clip(np.asarray(COLORS[color]) + rng.integers(-20, 21, size=3), 0, 255)
        background = tuple(int(v) for v in rng.integers(200, 246, size=3))
        moving = MovingShape(kind=shape, color=tuple(int(v) for v in rgb),
                             start=_jitter(start, rng, 0.08), end=_jitter(end, rng, 0.08),
                             radius=float(rng.uniform(0.13, 0.22)))
        rel = f"videos/clip_{i:05d}.mp4"
        encode_video(root / rel, moving_shapes_frames(num_frames, [moving], size, background=background), fps=fps)
        split = "val" if i >= num_videos - num_val else "train"
        caption = caption_for(color, shape, motion, int(rng.integers(len(_TEMPLATES))))
        clips.append(SyntheticClip(rel, caption, color, shape, motion, split))
    _write_csv(train_csv, [c for c in clips if c.split == "train"])
    _write_csv(val_csv, [c for c in clips if c.split == "val"])
    save_json_atomic(meta_path, {"settings": settings, "clips": [asdict(c) for c in clips]}, indent=1)
    logger.info("wrote %d synthetic clips (%d validation) to %s", num_videos, num_val, root)
    return SyntheticDataset(str(root), str(train_csv), str(val_csv), tuple(clips))
