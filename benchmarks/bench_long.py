#!/usr/bin/env python
"""Long-video extraction speed and memory: windowed single-pass encoding vs the naive loop.

For each generated video (640x360, 25 fps, H.264 libx264 crf 23 preset fast, default GOP
and B-frames, a textured background panning under moving shapes; generated once into
``--cache_dir``), both pipelines cut the timeline into W-second windows (default 10 s)
and sample the same 32 frames per window (segment centres):

- ours: ``modules.long_video.encode_long_video`` with the default config (32 frames ->
  TempMe 12 groups, STOP prompts, meanP), LoRA merged: one decoding pass on a background
  thread (non-reference frames nobody samples are skipped), windows through the model
  with the CPU defaults (one window per forward, one single-threaded forward per torch
  thread side by side) while the next windows decode.
- naive baseline: decode every frame with PyAV (``container.decode``, PyAV's default
  threading), convert the sampled ones with ``to_ndarray("rgb24")``, open_clip
  preprocessing (PIL), one open_clip ``ViT-B-32-quickgelu`` forward per window on its 32
  sampled frames (the same random weights, loaded strictly), mean of the normalised frame
  features per window.

Every run is a fresh child process (so its peak RSS is its own, read with ``wait4``:
"peak RSS" includes building the model from a random state dict, "peak RSS in the run"
is the peak from the start of the timed run, the model already resident); the model is
built and warmed up before the clock starts. Runs alternate ours /
baseline; the table quotes medians. The machine may be shared: the load average is
printed before and after.

    .venv/bin/python benchmarks/bench_long.py                    # 60 and 10 minute files
    .venv/bin/python benchmarks/bench_long.py --minutes 2 --runs 1   # a quick check
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

_ROOT = Path(__file__).resolve().parents[1]
_HERE = Path(__file__).resolve().parent
for folder in (_ROOT, _HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

logger = logging.getLogger("bench_long")

SIZE = (640, 360)
FPS = 25
SEED = 7


def video_path(cache_dir: Path, minutes: float) -> Path:
    seconds = int(round(minutes * 60))
    return cache_dir / f"long_{seconds}s_{SIZE[0]}x{SIZE[1]}_{FPS}fps.mp4"


#: videos longer than this are the 10-minute piece repeated (remuxed, not re-encoded)
PIECE_MINUTES = 10.0


def ensure_video(cache_dir: Path, minutes: float) -> Path:
    """Generate the benchmark video once (written under a temporary name, then renamed).

    Up to ``PIECE_MINUTES`` it is encoded frame by frame; a longer one repeats that piece
    with shifted timestamps (packets copied, so decoding costs exactly what a file encoded
    in one go would cost, and generation takes seconds instead of most of an hour).
    """
    from bench_extract import _write_video

    path = video_path(cache_dir, minutes)
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.mp4")
    start = time.perf_counter()
    if minutes > PIECE_MINUTES:
        piece = ensure_video(cache_dir, PIECE_MINUTES)
        copies = int(round(minutes / PIECE_MINUTES))
        if abs(copies * PIECE_MINUTES - minutes) > 1e-6:
            raise SystemExit(f"--minutes above {PIECE_MINUTES:g} must be a multiple of {PIECE_MINUTES:g}, got {minutes:g}")
        logger.info("writing %s: the %g-minute piece %d times", path, PIECE_MINUTES, copies)
        _repeat_video(piece, tmp, copies)
    else:
        logger.info("generating %s (once; about 1/8 of real time on 2 cores)", path)
        _write_video(tmp, int(round(minutes * 60)), SIZE, FPS, seed=SEED)
    os.replace(tmp, path)
    logger.info("generated %s in %.0f s", path.name, time.perf_counter() - start)
    return path


def _repeat_video(src: Path, dst: Path, copies: int) -> None:
    """``src``'s video stream ``copies`` times in a row (packets remuxed, pts shifted)."""
    import av

    with av.open(str(src)) as first:
        stream = first.streams.video[0]
        span = max(p.pts + (p.duration or 0) for p in first.demux(stream) if p.pts is not None)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        ins = inp.streams.video[0]
        outs = out.add_stream_from_template(ins)
        for k in range(copies):
            inp.seek(0, stream=ins)
            for packet in inp.demux(ins):
                if packet.dts is None:
                    continue
                packet.pts += k * span
                packet.dts += k * span
                packet.stream = outs
                out.mux(packet)


# ----------------------------------------------------------------------------- child runs


def _random_state():
    from modules.module_clip import random_state_dict

    return random_state_dict("ViT-B/32", seed=0)


def _reset_peak_rss() -> None:
    """Start the process's peak-RSS count afresh (Linux), so it covers the timed run only."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    """Peak resident memory since the last reset (VmHWM), MiB; nan where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def child_ours(video: str, window: float) -> Dict:
    import torch

    from config import UnifiedModelConfig
    from modules.long_video import encode_long_video
    from unified_model import create_unified_model

    model = create_unified_model(config=UnifiedModelConfig(clip_weights="random"), device="cpu",
                                 clip_state_dict=_random_state(), merge_lora=True)
    with torch.inference_mode():  # warm-up: first-call allocations
        model.encode_videos(torch.zeros(1, 32, 3, 224, 224))
    _reset_peak_rss()
    start = time.perf_counter()
    table = encode_long_video(model, video, window_seconds=window)
    wall = time.perf_counter() - start
    return {"wall": wall, "run_peak_rss_mib": _peak_rss_mib(), "windows": table.num_windows, "decoded": table.stats["decoded_frames"],
            "total": table.num_frames, "duration": table.duration, "complete": table.complete,
            "decode_wait": table.stats["decode_wait_seconds"], "model": table.stats["model_seconds"]}


def child_baseline(video: str, window: float, max_minutes: float = 0.0) -> Dict:
    import av
    import numpy as np
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from modules.window_sampler import plan_windows

    clip_model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    clip_model.load_state_dict(_random_state(), strict=True)
    clip_model.eval()
    with torch.no_grad():
        clip_model.encode_image(torch.zeros(2, 3, 224, 224))
    _reset_peak_rss()
    start = time.perf_counter()
    with av.open(video) as container:
        stream = container.streams.video[0]
        total = stream.frames
        fps = float(stream.average_rate)
        plan = plan_windows(np.arange(total) / fps, total / fps, window, num_segments=32)
        if max_minutes > 0:  # only the windows that start in the first max_minutes
            plan = [w for w in plan if w.start_time < max_minutes * 60] or plan[:1]
        wanted = {int(t) for w in plan for t in w.targets}
        kept: Dict[int, np.ndarray] = {}
        k, embeddings, decoded = 0, [], 0
        for i, frame in enumerate(container.decode(stream)):
            decoded += 1
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            while k < len(plan) and i >= int(plan[k].targets[-1]):
                pixels = torch.stack([preprocess(Image.fromarray(kept[int(t)])) for t in plan[k].targets])
                with torch.no_grad():
                    feats = F.normalize(clip_model.encode_image(pixels), dim=-1)
                embeddings.append(F.normalize(feats.mean(0), dim=-1).numpy())
                k += 1
                floor = int(plan[k].targets[0]) if k < len(plan) else i + 1
                kept = {t: f for t, f in kept.items() if t >= floor}
            if k == len(plan):
                break
    wall = time.perf_counter() - start
    covered = plan[-1].end_time if plan else 0.0
    return {"wall": wall, "run_peak_rss_mib": _peak_rss_mib(), "windows": len(embeddings), "decoded": decoded,
            "total": total, "duration": covered, "complete": len(embeddings) == len(plan)}


def run_child(kind: str, video: Path, window: float, baseline_max_minutes: float = 0.0) -> Dict:
    """One timed run in a fresh process; adds its peak RSS (MiB)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, "--_video", str(video),
           "--window_seconds", str(window), "--baseline_max_minutes", str(baseline_max_minutes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024.0  # Linux: KiB
    return result


# ----------------------------------------------------------------------------- report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[60.0, 10.0], help="video lengths")
    parser.add_argument("--window_seconds", type=float, default=10.0, help="W")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each pipeline per video (alternating)")
    parser.add_argument("--baseline_runs", type=int, default=None, help="runs of the baseline (default: --runs)")
    parser.add_argument("--baseline_max_minutes", type=float, default=0.0,
                        help="the baseline encodes only the windows of the first N minutes (0 = all; its realtime "
                             "factor is then over those minutes)")
    parser.add_argument("--cache_dir", default="/tmp/bench_long", help="generated videos are kept here")
    parser.add_argument("--_child", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--_video", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args._child:
        for noisy in ("modules.module_clip", "root"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        if args._child == "ours":
            print(json.dumps(child_ours(args._video, args.window_seconds)))
        else:
            print(json.dumps(child_baseline(args._video, args.window_seconds, args.baseline_max_minutes)))
        return 0

    from bench_extract import machine_description

    cache = Path(args.cache_dir)
    videos = [ensure_video(cache, m) for m in args.minutes]
    base_runs = args.runs if args.baseline_runs is None else args.baseline_runs
    load_start = os.getloadavg()
    results: Dict[str, Dict[str, List[Dict]]] = {}
    for video in videos:
        results[video.name] = {"ours": [], "baseline": []}
        for r in range(max(args.runs, base_runs)):
            for kind, runs in (("ours", args.runs), ("baseline", base_runs)):
                if r < runs:
                    res = run_child(kind, video, args.window_seconds, args.baseline_max_minutes)
                    results[video.name][kind].append(res)
                    logger.info("%s %s run %d: %.1f s, peak RSS %.0f MiB, load %.2f", video.name, kind, r + 1,
                                res["wall"], res["peak_rss_mib"], os.getloadavg()[0])
    load_end = os.getloadavg()

    print()
    print(f"Machine: {machine_description()}, {os.cpu_count()} CPUs visible")
    print(f"Load average (1 / 5 / 15 min) before: {' / '.join(f'{x:.2f}' for x in load_start)}; "
          f"after: {' / '.join(f'{x:.2f}' for x in load_end)}")
    print(f"Windows: {args.window_seconds:g} s, 32 frames sampled per window; random ViT-B/32 weights (seed 0), fp32")
    print()
    print("| video | pipeline | median wall (s) | realtime factor | peak RSS (MiB) | peak RSS in the run (MiB) "
          "| frames decoded / total | windows | video seconds encoded | ours vs baseline (realtime factors) | runs (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for video in videos:
        rows = results[video.name]
        med = {k: statistics.median(r["wall"] for r in v) for k, v in rows.items() if v}
        for kind in ("ours", "baseline"):
            runs = rows[kind]
            if not runs:
                continue
            last = runs[-1]
            # ratio of realtime factors (the baseline may cover only the first minutes)
            ratio = ""
            if kind == "ours" and rows["baseline"]:
                base_rt = rows["baseline"][-1]["duration"] / med["baseline"]
                ratio = f"**{(last['duration'] / med['ours']) / base_rt:.2f}x**"
            label = "ours: encode_long_video" if kind == "ours" else "naive: PyAV every frame + CLIP per window"
            print(f"| {video.name} | {label} | {med[kind]:.1f} | {last['duration'] / med[kind]:.1f}x | "
                  f"{max(r['peak_rss_mib'] for r in runs):.0f} | {max(r['run_peak_rss_mib'] for r in runs):.0f} | {last['decoded']} / {last['total']} | "
                  f"{last['windows']} | {last['duration']:.0f} | {ratio} | {', '.join('%.1f' % r['wall'] for r in runs)} |")
    ours_runs = [r for v in results.values() for r in v["ours"]]
    if ours_runs:
        print()
        print("Ours, time split (median over runs): model forward "
              f"{statistics.median(r['model'] for r in ours_runs):.1f} s, waiting for decoded windows "
              f"{statistics.median(r['decode_wait'] for r in ours_runs):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
