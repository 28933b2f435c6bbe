#!/usr/bin/env python
"""Batch retrieval memory against the number of query pairs about one video.

``modules.retrieval.batch_retrieve_events`` (what ``inference.py --batch_file`` runs)
on N (video, query) pairs that all ask about ONE short generated video (64x64, 48 frames,
H.264), N distinct queries, for each N in ``--pairs``:

- ours: the library as shipped: the queries go through the text tower
  ``retrieval.TEXT_CHUNK`` (256) at a time;
- baseline: the same call with ``retrieval.TEXT_CHUNK`` set to N, i.e. every query in one
  unchunked text forward (what batch retrieval did before; 10k pairs on one video with
  ViT-B/32 peaked at 12.4 GB).

Every run is a fresh child process. "peak RSS in the run" is VmHWM from the start of the
timed call (the model built and warmed up before; Linux ``/proc/self/clear_refs``),
"process peak RSS" is the child's ``wait4`` ru_maxrss (building the model included).
Runs alternate ours / baseline; the table quotes medians of ``--runs`` runs.

The model is the toolkit's (TempMe + STOP + meanP, LoRA merged, fp32, CPU) on a small
random CLIP (``clip_archs.small_arch``: 64 px vision tower of width 128 and 4 layers; text
tower of ``--text_width`` (default 256) and ``--text_layers`` (default 2), 77-token
context, the default ``max_words`` 32): activation memory per query is set by the text
width and token count (one layer's activations are live at a time under inference
mode), the depth only sets the time, so a shallow tower shows the effect in seconds.

    .venv/bin/python benchmarks/bench_pairs.py                       # N = 256, 1024, 4096; 3 runs
    .venv/bin/python benchmarks/bench_pairs.py --pairs 64 512 --runs 1   # a quick check
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

_ROOT = Path(__file__).resolve().parents[1]
_HERE = Path(__file__).resolve().parent
for folder in (_ROOT, _HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_long import _peak_rss_mib, _reset_peak_rss  # noqa: E402

logger = logging.getLogger("bench_pairs")

VIDEO_FRAMES = 48
VIDEO_SIZE = (64, 64)
IMAGE_RESOLUTION = 64


def _queries(n: int) -> List[str]:
    """n distinct queries of about a dozen tokens each."""
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle", "ball", "box", "star")
    return [f"a {colours[i % 8]} {shapes[(i // 8) % 6]} moving to the left, number {i}" for i in range(n)]


def _model(text_width: int, text_layers: int):
    import torch

    from config import from_dict
    from modules.clip_archs import small_arch
    from modules.module_clip import random_state_dict
    from modules.training import small_config_dict
    from unified_model import create_unified_model

    data = small_config_dict(IMAGE_RESOLUTION, vision_layers=4)
    data["max_words"] = 32  # the toolkit's default
    state = random_state_dict(small_arch(IMAGE_RESOLUTION, vision_width=128, vision_layers=4, text_width=text_width,
                                         text_layers=text_layers), seed=0)
    model = create_unified_model(config=from_dict(data), device="cpu", clip_state_dict=state, merge_lora=True)
    with torch.inference_mode():  # warm-up: first-call allocations
        model.encode_text(_queries(4))
    return model


def child(kind: str, video: str, pairs: int, text_width: int, text_layers: int) -> Dict:
    import modules.retrieval as retrieval

    model = _model(text_width, text_layers)
    if kind == "baseline":
        retrieval.TEXT_CHUNK = pairs  # every query in one text forward
    items = [{"video_path": video, "query": q} for q in _queries(pairs)]
    _reset_peak_rss()
    start = time.perf_counter()
    results = retrieval.batch_retrieve_events(items, model=model, num_workers=0)
    wall = time.perf_counter() - start
    ok = sum(r["status"] == "success" for r in results)
    if ok != pairs:
        raise RuntimeError(f"{pairs - ok} of {pairs} pairs failed: {next(r['error'] for r in results if r['error'])}")
    return {"wall": wall, "run_peak_rss_mib": _peak_rss_mib(), "chunk": retrieval.TEXT_CHUNK,
            "first_scores": results[0]["scores"][:3]}


def run_child(kind: str, video: Path, pairs: int, text_width: int, text_layers: int) -> Dict:
    """One run in a fresh process; adds its process peak RSS (MiB, wait4)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, "--_video", str(video),
           "--_pairs", str(pairs), "--text_width", str(text_width), "--text_layers", str(text_layers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{kind} run with {pairs} pairs failed (exit {code})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024.0  # Linux: KiB
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[256, 1024, 4096], help="numbers of query pairs N")
    parser.add_argument("--runs", type=int, default=3, help="runs of each pipeline per N (alternating)")
    parser.add_argument("--text_width", type=int, default=256, help="text tower width of the small random CLIP")
    parser.add_argument("--text_layers", type=int, default=2, help="text tower depth of the small random CLIP")
    parser.add_argument("--_child", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--_video", help=argparse.SUPPRESS)
    parser.add_argument("--_pairs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args._child:
        for noisy in ("modules.module_clip", "modules.clip_weights", "root"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        print(json.dumps(child(args._child, args._video, args._pairs, args.text_width, args.text_layers)))
        return 0

    from bench_extract import machine_description
    from modules.synthetic_video import write_moving_shapes_video

    with tempfile.TemporaryDirectory(prefix="bench_pairs_") as tmp:
        video = write_moving_shapes_video(Path(tmp) / "one.mp4", VIDEO_FRAMES, fps=24, size=VIDEO_SIZE)
        load_start = os.getloadavg()
        results: Dict[int, Dict[str, List[Dict]]] = {}
        for n in args.pairs:
            results[n] = {"ours": [], "baseline": []}
            for r in range(args.runs):
                for kind in ("ours", "baseline"):
                    res = run_child(kind, video, n, args.text_width, args.text_layers)
                    results[n][kind].append(res)
                    logger.info("N=%d %s run %d: %.2f s, peak RSS in the run %.0f MiB, process peak %.0f MiB",
                                n, kind, r + 1, res["wall"], res["run_peak_rss_mib"], res["peak_rss_mib"])
                same = results[n]["ours"][-1]["first_scores"] == results[n]["baseline"][-1]["first_scores"]
                if not same:
                    logger.info("N=%d: first scores differ: %s vs %s", n, results[n]["ours"][-1]["first_scores"],
                                results[n]["baseline"][-1]["first_scores"])
        load_end = os.getloadavg()

    def med(n: int, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[n][kind])

    print()
    print(f"Machine: {machine_description()}, {os.cpu_count()} CPUs visible")
    print(f"Load average (1 / 5 / 15 min) before: {' / '.join(f'{x:.2f}' for x in load_start)}; "
          f"after: {' / '.join(f'{x:.2f}' for x in load_end)}")
    print(f"One video ({VIDEO_FRAMES} frames, {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]}), N distinct queries about it; "
          f"small random CLIP: text tower width {args.text_width}, {args.text_layers} layers, max_words 32; "
          f"fp32 CPU; medians of {args.runs} runs")
    print()
    print("| N pairs | peak RSS in the run, ours (MiB) | same, baseline (MiB) | baseline / ours | "
          "process peak RSS ours / baseline (MiB) | wall ours (s) | wall baseline (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.pairs:
        ours, base = med(n, "ours", "run_peak_rss_mib"), med(n, "baseline", "run_peak_rss_mib")
        print(f"| {n} | {ours:.0f} | {base:.0f} | **{base / ours:.2f}x** | {med(n, 'ours', 'peak_rss_mib'):.0f} / "
              f"{med(n, 'baseline', 'peak_rss_mib'):.0f} | {med(n, 'ours', 'wall'):.2f} | "
              f"{med(n, 'baseline', 'wall'):.2f} |")
    first, last = args.pairs[0], args.pairs[-1]
    print()
    print(f"From N={first} to N={last} ({last / first:g}x the pairs): peak RSS in the run ours "
          f"{med(last, 'ours', 'run_peak_rss_mib') / med(first, 'ours', 'run_peak_rss_mib'):.2f}x, baseline "
          f"{med(last, 'baseline', 'run_peak_rss_mib') / med(first, 'baseline', 'run_peak_rss_mib'):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
