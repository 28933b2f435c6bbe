#!/usr/bin/env python
"""End-to-end directory extraction speed: our pipeline vs the loop a user would write.

Everything is measured in one run, on the same generated videos and the same random
ViT-B/32 weights:

- ours: ``extract_directory_embeddings`` with the default config (32 sampled frames ->
  TempMe 12, STOP prompts, meanP) and the CLI's defaults: decode worker processes
  (single-threaded decoding), on CPU one video per forward with forwards running side by
  side (``parallel_batches``, one torch thread each), LoRA merged.
- baseline: decode every frame with PyAV (``to_ndarray("rgb24")``), take 12 uniformly,
  open_clip's ViT-B/32 quickgelu CLIP (the same weights, loaded strictly) on the 12 frames in
  one batch with open_clip's own preprocessing, mean-pool the normalised frame features,
  save the .npy. Measured twice: with PyAV's defaults (what that loop does when written
  plainly: slice threading only, i.e. one thread for most H.264 files), and tuned with
  ``stream.thread_type = "AUTO"`` (frame threading, the setting our sampler uses), so the
  table also shows the ratio against a baseline that decodes as fast as it can.

Runs alternate (ours, baseline, ours, ...) so slow phases of a shared machine hit both;
the table quotes medians. A profile pass then times decoding and the model separately:
our decoding as a worker runs it (one thread), our model as the pipeline runs it
(``parallel_batches`` forwards at once), the baseline's decoding and model as written.
The videos: h264 (libx264 crf 23, default GOP and B-frames), a textured panning
background with moving shapes, 320x240 and 640x360, 25 and 30 fps, 10 to 30 s.

Precisions: ``--precisions fp32,bf16`` times our pipeline at each (alternating) and prints
the speed ratio against the first and the cosine between their embeddings of every video;
``--no_baselines`` leaves the baselines out. ``--device cuda`` runs every pipeline on the
GPU (``benchmarks/gpu_check.py`` does this with fp16 and reports how long the model waited
for decoded input).

    .venv/bin/python benchmarks/bench_extract.py [--runs 5] [--work_dir /tmp/bench_extract]
    .venv/bin/python benchmarks/bench_extract.py --precisions fp32,bf16 --no_baselines
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger("bench_extract")

#: (seconds, (width, height), fps) of the generated videos
VIDEO_SPECS: List[Tuple[int, Tuple[int, int], int]] = [
    (10, (640, 360), 25), (20, (320, 240), 30), (30, (640, 360), 30), (15, (320, 240), 25),
    (25, (640, 360), 25), (12, (320, 240), 30), (18, (640, 360), 30), (10, (320, 240), 25),
]
BASELINE_FRAMES = 12


# ----------------------------------------------------------------------------- videos


def _write_video(path: Path, seconds: int, size: Tuple[int, int], fps: int, seed: int) -> None:
    """A textured background panning under moving shapes: real encoding/decoding cost."""
    rng = np.random.default_rng(seed)
    width, height = size
    block = 8
    coarse = rng.integers(0, 256, (height // block + 40, width // block + 200, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, block, 0), block, 1) // 2
    texture = (texture + rng.integers(0, 48, texture.shape, dtype=np.uint8)).astype(np.uint8)
    colors = rng.integers(40, 255, (3, 3))
    n = seconds * fps
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "fast", "crf": "23"}
        for i in range(n):
            dx = int(i * 1.5) % (texture.shape[1] - width)
            dy = int(15 + 12 * np.sin(i / 25))
            img = texture[dy:dy + height, dx:dx + width].copy()
            for k in range(3):
                r = height // (6 + 2 * k)
                cx = int((0.1 + 0.8 * ((i / n + k / 3) % 1.0)) * width)
                cy = int(height * (0.3 + 0.2 * k) + height * 0.1 * np.sin(i / (10 + 5 * k)))
                img[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = colors[k]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def make_videos(folder: Path, specs: Sequence[Tuple[int, Tuple[int, int], int]]) -> List[Path]:
    """Generate the benchmark videos once (a manifest makes reruns reuse them)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    wanted = [[s, list(size), fps] for s, size, fps in specs]
    paths = [folder / f"video{i:02d}_{size[0]}x{size[1]}_{fps}fps_{s}s.mp4" for i, (s, size, fps) in enumerate(specs)]
    if manifest.exists() and json.loads(manifest.read_text()) == wanted and all(p.exists() for p in paths):
        return paths
    for p in folder.glob("*.mp4"):
        p.unlink()
    start = time.perf_counter()
    for i, ((seconds, size, fps), path) in enumerate(zip(specs, paths)):
        _write_video(path, seconds, size, fps, seed=i)
    manifest.write_text(json.dumps(wanted))
    logger.info("generated %d videos in %.1fs", len(paths), time.perf_counter() - start)
    return paths


# ----------------------------------------------------------------------------- the two pipelines


def run_ours(model, video_dir: Path, out: Path, batch_size, num_workers, parallel_batches) -> Tuple[float, Dict]:
    """One directory run of our pipeline: (wall seconds, the run's settings from its summary file)."""
    from modules.extraction import extract_directory_embeddings

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = extract_directory_embeddings(video_dir, out, model=model, batch_size=batch_size,
                                          num_workers=num_workers, parallel_batches=parallel_batches,
                                          progress=False, summary=True)
    seconds = time.perf_counter() - start
    if result["failed"] or result["processed"] != len(list(video_dir.glob("*.mp4"))):
        raise RuntimeError(f"our pipeline failed: {result['errors']}")
    return seconds, json.loads((out / "extraction_summary.json").read_text())["settings"]


def baseline_decode(path: Path, preprocess, threaded: bool) -> torch.Tensor:
    """Decode every frame, keep 12 uniformly spaced ones, open_clip preprocessing."""
    from PIL import Image

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threaded:
            stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    idx = np.linspace(0, len(frames) - 1, BASELINE_FRAMES).round().astype(int)
    return torch.stack([preprocess(Image.fromarray(frames[i])) for i in idx])


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def baseline_embed(clip_model, batch: torch.Tensor, precision: str = "fp32") -> np.ndarray:
    device = next(clip_model.parameters()).device
    with torch.no_grad(), _autocast(device, precision):
        features = F.normalize(clip_model.encode_image(batch.to(device)).float(), dim=-1)
    return F.normalize(features.mean(0), dim=-1).cpu().numpy().astype(np.float32)


def run_baseline(clip_model, preprocess, videos: Sequence[Path], out: Path, threaded: bool,
                 precision: str = "fp32") -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    for path in videos:
        batch = baseline_decode(path, preprocess, threaded)
        np.save(out / f"{path.stem}_embedding.npy", baseline_embed(clip_model, batch, precision))
    return time.perf_counter() - start


def embedding_cosines(dir_a: Path, dir_b: Path) -> List[float]:
    """Cosine of each video's embedding in two output folders (same file names)."""
    cosines = []
    for path in sorted(dir_a.glob("*_embedding.npy")):
        a = np.load(path).astype(np.float64)
        b = np.load(dir_b / path.name).astype(np.float64)
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return cosines


def profile(model, clip_model, preprocess, videos: Sequence[Path], batch_size: int, lanes: int,
            baseline_precision: str = "fp32") -> Dict[str, float]:
    """Seconds per video for decoding and for the model, each pipeline, measured apart."""
    from modules.decode_pool import decode_video
    from modules.forward_lanes import ForwardLanes, lane_threads
    from modules.video_sampler import normalize_uint8

    cfg = model.config
    t = time.perf_counter()
    decoded = [decode_video(str(p), cfg.num_segments, cfg.video_size, decoder_threads=1) for p in videos]
    ours_decode = (time.perf_counter() - t) / len(videos)
    frames = [normalize_uint8(d.frames) for d in decoded]

    def forward(batch):
        with torch.inference_mode():
            return [model.encode_videos(torch.stack(batch)).video_embeddings.cpu()]

    forwards = ForwardLanes(lanes, forward)
    t = time.perf_counter()
    with lane_threads(lanes):
        for i in range(0, len(frames), batch_size):
            forwards.submit(frames[i:i + batch_size])
        forwards.drain()
    ours_model = (time.perf_counter() - t) / len(videos)
    forwards.close()
    t = time.perf_counter()
    for p in videos:
        baseline_decode(p, preprocess, threaded=False)
    base_decode = (time.perf_counter() - t) / len(videos)
    t = time.perf_counter()
    batches = [baseline_decode(p, preprocess, threaded=True) for p in videos]
    tuned_decode = (time.perf_counter() - t) / len(videos)
    t = time.perf_counter()
    for b in batches:
        baseline_embed(clip_model, b, baseline_precision)
    base_model = (time.perf_counter() - t) / len(videos)
    return {"ours_decode": ours_decode, "ours_model": ours_model, "base_decode": base_decode,
            "tuned_decode": tuned_decode, "base_model": base_model}


def measure(work: Path, specs, runs: int, device: str = "cpu", precisions: Sequence[str] = ("fp32",),
            baseline_precision: str = "fp32", batch_size=None, num_workers=None, parallel_batches=None,
            with_profile: bool = True, state: Optional[Dict[str, torch.Tensor]] = None,
            config: Optional[Dict] = None, baselines: bool = True, models: Optional[Dict] = None) -> Dict:
    """Time our pipeline at each precision and the open_clip baselines on the same videos.

    ``state``: OpenAI-layout CLIP tensors shared by every pipeline (default: random
    ViT-B/32, seed 0); ``config``: our model's config dict (default: the defaults).
    Returns times (seconds per run for "ours/<precision>", "plain", "tuned"), cosines
    ("<precision>" -> per-video cosine against the first precision's embeddings), the
    model stage's wait share per precision (CUDA only: the share of its time the model
    waited for decoded input), the profile and the settings used. ``baselines=False``
    times only our precisions (no baseline rows, no profile). ``models``: already built
    models of ours by precision (built here when missing).
    """
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict

    from config import from_dict
    from modules.device_feed import default_device_workers
    from modules.decode_pool import default_num_workers
    from modules.forward_lanes import default_parallel_batches
    from unified_model import create_unified_model
    from modules.module_clip import random_state_dict

    state = random_state_dict("ViT-B/32", seed=0) if state is None else state
    config = {"clip_weights": "random"} if config is None else config
    video_dir = work / "videos"
    videos = make_videos(video_dir, specs)
    target = torch.device(device)
    on_cpu = target.type == "cpu"
    workers = num_workers if num_workers is not None else (default_num_workers() if on_cpu else default_device_workers())
    lanes = (default_parallel_batches() if parallel_batches is None else parallel_batches) if on_cpu else 1
    batch_size = (1 if on_cpu else None) if batch_size is None else batch_size  # None: the device rule
    ours = {p: (models or {}).get(p) or create_unified_model(config=from_dict({**config, "precision": p}), device=device,
                                                             clip_state_dict=state, merge_lora=True)
            for p in precisions}
    size = ours[precisions[0]].config.video_size
    clip_model = preprocess = None
    if baselines:
        # open_clip's model from the same tensors (strict load), with its own preprocessing; the builder
        # stores some weights in fp16, .float() keeps the baseline in float32 (autocast does the rest)
        clip_model = build_model_from_openai_state_dict({k: v.clone() for k, v in state.items()}, quick_gelu=True,
                                                        cast_dtype=None).float().to(target).eval()
        preprocess = open_clip.image_transform(size, is_train=False)

    # warm-up (first-call allocations, kernel selection, lazy imports), not timed
    for p in precisions:
        run_ours(ours[p], video_dir, work / "warm_ours", batch_size, workers, lanes)
    if baselines:
        run_baseline(clip_model, preprocess, videos[:1], work / "warm_base", threaded=True, precision=baseline_precision)

    times: Dict[str, List[float]] = {f"ours/{p}": [] for p in precisions}
    if baselines:
        times.update(plain=[], tuned=[])
    wait: Dict[str, List[float]] = {p: [] for p in precisions}
    settings: Dict = {}
    for r in range(runs):
        for p in precisions:
            seconds, settings_used = run_ours(ours[p], video_dir, work / f"out_ours_{p}", batch_size, workers, lanes)
            times[f"ours/{p}"].append(seconds)
            if settings_used.get("model_wait_share") is not None:
                wait[p].append(float(settings_used["model_wait_share"]))
            settings = {"batch_size": settings_used.get("batch_size"), "num_workers": settings_used.get("num_workers"),
                        "lanes": settings_used.get("parallel_batches")}
        if baselines:
            times["plain"].append(run_baseline(clip_model, preprocess, videos, work / "out_base", threaded=False,
                                               precision=baseline_precision))
            times["tuned"].append(run_baseline(clip_model, preprocess, videos, work / "out_base", threaded=True,
                                               precision=baseline_precision))
        logger.info("run %d: %s", r + 1, ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    cosines = {p: embedding_cosines(work / f"out_ours_{precisions[0]}", work / f"out_ours_{p}") for p in precisions}
    prof = profile(ours[precisions[0]], clip_model, preprocess, videos, batch_size or 4, lanes,
                   baseline_precision) if with_profile and baselines else None
    return {"times": times, "cosines": cosines, "wait_share": wait, "profile": prof, "videos": videos,
            "settings": settings, "precisions": list(precisions)}


# ----------------------------------------------------------------------------- report


def machine_description() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        cpu = f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs " \
              f"({info.get('Thread(s) per core', '?').strip()} thread(s) per core)"
    except (OSError, subprocess.SubprocessError, ValueError):
        cpu = platform.processor() or "unknown CPU"
    return (f"{cpu}; torch {torch.__version__} ({torch.get_num_threads()} threads), PyAV {av.__version__}, "
            f"Python {platform.python_version()}")


def print_report(m: Dict, specs, device: str, baseline_precision: str, load: Tuple[float, float]) -> None:
    """The tables: wall time per pipeline, ratios, precision comparison, profile."""
    n = len(m["videos"])
    precisions = m["precisions"]
    med = {k: statistics.median(v) for k, v in m["times"].items()}
    ref = f"ours/{precisions[0]}"
    st = m["settings"]
    total_seconds = sum(s for s, _, _ in specs)
    print()
    print(f"Machine: {machine_description()}")
    print(f"Device: {device_description(device)}")
    print(f"Videos: {n} h264 files, {total_seconds} s in total ({', '.join(f'{s}s {w}x{h}@{f}' for s, (w, h), f in specs)})")
    print("Weights: random ViT-B/32 (seed 0), the same tensors in every pipeline")
    print(f"Ours: default config (32 frames sampled -> 12), batch_size {st.get('batch_size')}, "
          f"{st.get('lanes')} forward(s) at once, {st.get('num_workers')} decode worker(s); "
          f"baselines in {baseline_precision}")
    print(f"Load average (1 min) before/after: {load[0]:.2f} / {load[1]:.2f}")
    print()
    rows = [(f"ours ({p}): extract_directory_embeddings", f"ours/{p}") for p in precisions] + [
        (label, key) for label, key in (("baseline: PyAV all frames (defaults) + open_clip x12 + mean", "plain"),
                                        ("tuned baseline: same, PyAV thread_type AUTO", "tuned")) if key in med]
    print(f"| pipeline | median wall (s) | videos/s | {ref} / this (videos/s) | runs (s) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, key in rows:
        ratio = "" if key.startswith("ours/") else f"**{med[key] / med[ref]:.2f}x**"
        print(f"| {label} | {med[key]:.2f} | {n / med[key]:.3f} | {ratio} | {', '.join(f'{t:.2f}' for t in m['times'][key])} |")
    if len(precisions) > 1:
        print()
        print(f"| precision | speed vs {precisions[0]} (ratio of median walls) | median of per-run ratios "
              f"(runs alternate) | cosine vs {precisions[0]}: min | median |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for p in precisions:
            cos = m["cosines"][p]
            paired = statistics.median(a / b for a, b in zip(m["times"][ref], m["times"][f"ours/{p}"]))
            print(f"| {p} | {med[ref] / med[f'ours/{p}']:.2f}x | {paired:.2f}x | {min(cos):.6f} | "
                  f"{statistics.median(cos):.6f} |")
    if any(m["wait_share"].values()):
        print()
        print("| precision | share of the model stage's time spent waiting for input (median of runs) |")
        print("| --- | ---: |")
        for p in precisions:
            if m["wait_share"][p]:
                print(f"| {p} | {statistics.median(m['wait_share'][p]):.1%} |")
    prof = m["profile"]
    if prof is not None:
        print()
        print("Profile, seconds per video, each stage measured apart (no overlap between stages; ours: decoding "
              f"on one thread as a worker does it, the model ({precisions[0]}) with its forwards side by side):")
        print()
        print("| stage | ours | baseline | tuned baseline |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| decode + preprocess | {prof['ours_decode']:.3f} | {prof['base_decode']:.3f} | {prof['tuned_decode']:.3f} |")
        print(f"| model | {prof['ours_model']:.3f} | {prof['base_model']:.3f} | {prof['base_model']:.3f} |")
        print(f"| sum | {prof['ours_decode'] + prof['ours_model']:.3f} | {prof['base_decode'] + prof['base_model']:.3f} "
              f"| {prof['tuned_decode'] + prof['base_model']:.3f} |")


def device_description(device: str) -> str:
    target = torch.device(device)
    if target.type == "cuda":
        index = target.index if target.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return f"{torch.cuda.get_device_name(index)} ({total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free), CUDA {torch.version.cuda}"
    return "CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/bench_extract", help="videos and outputs go here")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each pipeline (alternating)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for every pipeline")
    parser.add_argument("--precisions", default="fp32",
                        help="comma-separated precisions of our pipeline (fp32, bf16, fp16), timed in turn; the "
                             "first is the reference for speed ratios and embedding cosines")
    parser.add_argument("--baseline_precision", default="fp32", help="autocast dtype of the open_clip baseline")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="our videos per forward (default: the CLI's: 1 on CPU, the memory rule on CUDA)")
    parser.add_argument("--num_workers", type=int, default=None, help="our decode processes (default: the CLI's)")
    parser.add_argument("--parallel_batches", type=int, default=None,
                        help="our forwards running at once on CPU (default: the CLI's)")
    parser.add_argument("--num_videos", type=int, default=len(VIDEO_SPECS), help=f"use the first N of {len(VIDEO_SPECS)} videos")
    parser.add_argument("--no_profile", action="store_true", help="skip the decode/model breakdown")
    parser.add_argument("--no_baselines", action="store_true",
                        help="time only our pipeline at --precisions (e.g. fp32 vs bf16), no baselines, no profile")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("modules.module_clip", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    specs = VIDEO_SPECS[: args.num_videos]
    load_start = os.getloadavg()
    m = measure(Path(args.work_dir), specs, args.runs, device=args.device, precisions=precisions,
                baseline_precision=args.baseline_precision, batch_size=args.batch_size, num_workers=args.num_workers,
                parallel_batches=args.parallel_batches, with_profile=not args.no_profile,
                baselines=not args.no_baselines)
    print_report(m, specs, args.device, args.baseline_precision, (load_start[0], os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
