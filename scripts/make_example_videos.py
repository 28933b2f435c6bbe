"""Write the tiny example videos in examples/videos/ and their captions.csv.

Deterministic (fixed drawing, single-threaded encoders), so re-running reproduces the
committed files. Usage::

    python scripts/make_example_videos.py [--output_dir examples/videos]

captions.csv has the header ``video_path,caption``; ``video_path`` is the file name,
relative to the directory holding captions.csv.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

# scripts/ is not a package: make the repository root importable for `modules`
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from modules.synthetic_video import MovingShape, write_moving_shapes_video  # noqa: E402

logger = logging.getLogger("make_example_videos")

SIZE = (160, 120)  # (width, height)
FPS = 15
NUM_FRAMES = 45  # 3 s

#: (file name, caption, shapes)
EXAMPLES: list[tuple[str, str, list[MovingShape]]] = [
    (
        "red_circle_left_to_right.mp4",
        "a red circle moving from left to right",
        [MovingShape("circle", (220, 30, 30), start=(0.15, 0.5), end=(0.85, 0.5), radius=0.2)],
    ),
    (
        "blue_square_moving_up.mp4",
        "a blue square moving up",
        [MovingShape("square", (30, 60, 220), start=(0.5, 0.8), end=(0.5, 0.2), radius=0.18)],
    ),
    (
        "green_triangle_moving_down.webm",
        "a green triangle moving down",
        [MovingShape("triangle", (30, 170, 60), start=(0.5, 0.2), end=(0.5, 0.8), radius=0.2)],
    ),
    (
        "yellow_circle_and_purple_square_crossing.mp4",
        "a yellow circle moving right while a purple square moves left",
        [
            MovingShape("circle", (230, 200, 20), start=(0.15, 0.3), end=(0.85, 0.3), radius=0.16),
            MovingShape("square", (140, 40, 170), start=(0.85, 0.7), end=(0.15, 0.7), radius=0.15),
        ],
    ),
]


def make_examples(output_dir: Path) -> list[Path]:
    """Write every example video plus captions.csv into ``output_dir``; return the paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, caption, shapes in EXAMPLES:
        path = write_moving_shapes_video(
            output_dir / name, NUM_FRAMES, fps=FPS, size=SIZE, shapes=shapes, quality="small", gop=FPS
        )
        logger.info("%s (%d bytes): %s", path, path.stat().st_size, caption)
        written.append(path)
    csv_path = output_dir / "captions.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["video_path", "caption"])
        for name, caption, _ in EXAMPLES:
            writer.writerow([name, caption])
    written.append(csv_path)
    total = sum(p.stat().st_size for p in written)
    logger.info("wrote %d files, %d bytes in total, to %s", len(written), total, output_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=_ROOT / "examples" / "videos")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_examples(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
