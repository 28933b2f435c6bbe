#!/usr/bin/env python
"""Everything a lent GPU should run, in one command that fits in 8 minutes on one card.

    python benchmarks/gpu_check.py                # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run      # on CPU with tiny sizes: proves the script works

Steps, each timed, each reported (a failing step does not stop the others):

1. the test subset that needs CUDA (``pytest -m cuda``: fp32 CUDA vs CPU, fp16 vs fp32
   forward, pinned non_blocking uploads, the batch-size rule against the card's memory);
2. sizing: free memory, the derived per-video bytes, the batch the rule picks;
3. the extraction benchmark (``bench_extract.measure``): our pipeline vs the open_clip
   baseline, both fp16, on the same generated videos, with the share of time the model
   waited for decoded input, and the decode-worker count that would keep the card busy;
4. a short fp16 training run with GradScaler, interrupted and resumed, against an
   uninterrupted run;
5. extraction under ``torchrun`` with 2 processes on nccl if the machine has 2 GPUs
   (skipped with a message otherwise).

It ends with one table headed by the card's name. Exit code 0 when every step passed or
was skipped, 1 otherwise. ``--dry-run`` runs steps 1-4 on CPU with a small random CLIP, two
short videos, bf16/fp32 where CUDA would use fp16 and CPU's bf16 autocast for training
(step 5 is skipped), so CI keeps it from rotting; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

import torch  # noqa: E402

logger = logging.getLogger("gpu_check")

#: the whole check must fit a lent GPU's 8 minutes; later steps are skipped past this
TIME_BUDGET_S = 7.5 * 60
SMALL_SIZE = 64
SMALL_LAYERS = 2


@dataclass
class Step:
    name: str
    status: str = "skipped"  # passed | failed | skipped
    seconds: float = 0.0
    detail: str = ""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- steps


class _Outcomes:
    """pytest plugin: counts test outcomes (the run happens in this process)."""

    def __init__(self) -> None:
        self.counts: Dict[str, int] = {}
        self.failed: List[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            outcome = report.outcome
            if report.when != "call" and outcome == "failed":
                outcome = "error"
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if outcome in ("failed", "error"):
                self.failed.append(report.nodeid)


def step_cuda_tests(args, ctx) -> str:
    import pytest

    targets = ["tests/test_cuda.py"] if args.dry_run else ["tests"]
    outcomes = _Outcomes()
    cwd = os.getcwd()
    os.chdir(_ROOT)
    try:
        code = pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", "--no-header", *targets], plugins=[outcomes])
    finally:
        os.chdir(cwd)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.counts.items())) or "no tests"
    if code not in (0, 5) or outcomes.failed:
        raise RuntimeError(f"pytest -m cuda: {summary}; {'; '.join(outcomes.failed[:4])}")
    return summary


def step_sizing(args, ctx) -> str:
    from modules.device_feed import (ForwardShapes, activation_bytes_per_video, choose_batch_size,
                                     device_bytes_per_video)

    model = ctx["build"]("fp16" if ctx["cuda"] else "fp32")  # cached: the benchmark reuses it
    shapes = ForwardShapes.of_model(model)
    per_video = device_bytes_per_video(shapes)
    if ctx["cuda"]:
        free, total = torch.cuda.mem_get_info(model.device)
    else:  # no device memory to ask: pretend a 16 GiB card to show the arithmetic
        free, total = 16 * 2**30, 16 * 2**30
    batch = choose_batch_size(free, per_video)
    from config import UnifiedModelConfig

    default = ForwardShapes.of_config(UnifiedModelConfig())
    return (f"default config (ViT-B/32, 32 frames): {activation_bytes_per_video(default) / 2**20:.1f} MiB activations + "
            f"{(device_bytes_per_video(default) - activation_bytes_per_video(default)) / 2**20:.1f} MiB upload per video; "
            f"this model: free {free / 2**30:.1f} of {total / 2**30:.1f} GiB; derived {activation_bytes_per_video(shapes) / 2**20:.1f}"
            f" MiB activations + {(per_video - activation_bytes_per_video(shapes)) / 2**20:.1f} MiB upload per video"
            f" -> batch {batch}{'' if ctx['cuda'] else ' (dry run: 16 GiB assumed)'}")


def step_extraction(args, ctx) -> str:
    import bench_extract

    from modules.device_feed import decode_workers_to_keep_up

    if args.dry_run:
        specs = [(2, (96, 64), 25), (3, (64, 96), 30)]
        precisions, baseline = ("fp32", "bf16"), "bf16"
    else:
        specs = bench_extract.VIDEO_SPECS
        precisions, baseline = ("fp16",), "fp16"
    m = bench_extract.measure(ctx["work"] / "bench", specs, runs=args.runs, device=ctx["device"],
                              precisions=precisions, baseline_precision=baseline, with_profile=True,
                              state=ctx["state"], config=ctx["config"], models=ctx["models"])
    n = len(m["videos"])
    ours = statistics.median(m["times"][f"ours/{precisions[0]}"])
    plain = statistics.median(m["times"]["plain"])
    tuned = statistics.median(m["times"]["tuned"])
    wait = m["wait_share"][precisions[0]]
    prof = m["profile"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = decode_workers_to_keep_up(prof["ours_model"], prof["ours_decode"], cpus)
    parts = [f"{n} videos; ours ({precisions[0]}) {n / ours:.2f} videos/s, {plain / ours:.2f}x the baseline "
             f"({baseline}), {tuned / ours:.2f}x the tuned one",
             f"model waits for input {statistics.median(wait):.0%} of its time" if wait else "wait share: CPU lanes",
             f"decode {prof['ours_decode']:.3f} s/video/worker, model {prof['ours_model']:.4f} s/video -> "
             f"{workers} decode workers keep it busy ({m['settings'].get('num_workers')} used, batch "
             f"{m['settings'].get('batch_size')})"]
    for p in precisions[1:]:
        cos = m["cosines"][p]
        parts.append(f"{p}: {ours / statistics.median(m['times'][f'ours/{p}']):.2f}x speed, cosine min {min(cos):.5f}")
    return "; ".join(parts)


def step_training(args, ctx) -> str:
    from config import from_dict
    from modules.synthetic_data import generate_synthetic_dataset
    from modules.training import Trainer, small_config_dict

    work = ctx["work"] / "train"
    data = work / "data"
    generate_synthetic_dataset(str(data), num_videos=12, num_val=4, seed=0, size=(SMALL_SIZE, SMALL_SIZE),
                               num_frames=12)

    def config(name: str):
        # 8 training clips in batches of 4: 2 steps per epoch, interrupted after the first (mid-epoch)
        training = dict(datatype="synthetic", data_path=str(data), synthetic_num_videos=12, synthetic_val_videos=4,
                        seed=0, batch_size=4, num_epochs=1, num_workers=0, checkpoint_dir=str(work / name),
                        amp=True, tempme_lr=1e-3, stop_lr=1e-3, warmup_proportion=0.0, keep_checkpoints=0)
        data_cfg = small_config_dict(SMALL_SIZE, vision_layers=SMALL_LAYERS, training=training)
        data_cfg["stop"]["prompt_dim"] = 16  # the temporal prompter's convolutions dominate CPU time
        return from_dict({**data_cfg, "device": ctx["device"]})

    def run(name: str, stop_at_step: Optional[int] = None, resume: Optional[str] = None):
        trainer = Trainer(config(name), "joint", clip_state_dict=ctx["small_state"], resume=resume,
                          progress=False, log_dir=False)
        summary = trainer.train(stop_at_step=stop_at_step)
        trainer.close()
        return trainer, summary

    full, summary = run("full")
    # amp on CUDA is fp16 + GradScaler; the dry run trains with CPU's bf16 autocast (fp16 on
    # CPU is very slow and its GradScaler logic is covered by tests/test_training.py)
    if ctx["cuda"] and not full.scaler.is_enabled():
        raise RuntimeError("fp16 training ran without its GradScaler")
    steps = summary["step"]
    part, _ = run("part", stop_at_step=steps // 2)
    resumed, summary_resumed = run("part", resume=str(work / "part" / "last.pth"))
    if summary_resumed["step"] != steps:
        raise RuntimeError(f"resumed run ended at step {summary_resumed['step']}, the full run at {steps}")
    losses = [h["loss"] for h in full.history]
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise RuntimeError(f"non-finite training loss: {losses}")
    a = {n: p.detach().float().cpu() for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p.detach().float().cpu() for n, p in resumed.model.named_parameters() if p.requires_grad}
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    same_scale = full.scaler.get_scale() == resumed.scaler.get_scale()
    if not same_scale:
        raise RuntimeError(f"loss scale after resume {resumed.scaler.get_scale()} != {full.scaler.get_scale()}")
    scale = f"loss scale {full.scaler.get_scale():g} (same after resume)" if full.scaler.is_enabled() else \
        f"{str(full.amp_dtype).replace('torch.', '')} autocast, no loss scaling"
    return (f"{steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {scale}; interrupted at step {steps // 2} and resumed: max |param diff| {diff:.1e}")


def step_nccl(args, ctx) -> str:
    if args.dry_run:
        return "skipped: dry run"
    count = torch.cuda.device_count()
    if count < 2:
        raise _Skip(f"this machine has {count} GPU; the 2-process nccl run needs 2")
    import json

    import bench_extract

    videos = bench_extract.make_videos(ctx["work"] / "bench" / "videos", bench_extract.VIDEO_SPECS)
    out = ctx["work"] / "ddp"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(_ROOT / "extract_video_embeddings.py"), "--video_dir", str(videos[0].parent), "--output_dir", str(out),
           "--clip_weights", "random", "--device", "cuda", "--summary", "--consolidated", "--quiet"]
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exit {proc.returncode}: {_one_line(proc.stderr[-600:])}")
    totals = json.loads((out / "extraction_summary.json").read_text())["totals"]
    if totals["processed"] != len(videos):
        raise RuntimeError(f"torchrun extraction processed {totals['processed']} of {len(videos)}")
    return f"2 ranks (nccl): {totals['processed']} videos, {totals['videos_per_second']} videos/s"


class _Skip(Exception):
    """A step that cannot run here (the reason is reported)."""


STEPS: List[tuple] = [
    ("CUDA tests (pytest -m cuda)", step_cuda_tests),
    ("batch-size rule", step_sizing),
    ("extraction benchmark", step_extraction),
    ("fp16 training + GradScaler + resume", step_training),
    ("2-process nccl extraction", step_nccl),
]


# ----------------------------------------------------------------------------- main


def _context(args, work: Path) -> Dict:
    from config import from_dict
    from modules.module_clip import random_state_dict
    from modules.clip_archs import small_arch
    from modules.training import small_config_dict
    from unified_model import create_unified_model

    cuda = not args.dry_run
    small_state = random_state_dict(small_arch(SMALL_SIZE, vision_layers=SMALL_LAYERS, text_layers=SMALL_LAYERS))
    if args.dry_run:
        state = small_state
        config = {**small_config_dict(SMALL_SIZE, vision_layers=SMALL_LAYERS), "clip_weights": "random"}
    else:
        state = random_state_dict("ViT-B/32", seed=0)
        config = {"clip_weights": "random"}
    device = "cuda" if cuda else "cpu"

    models: Dict[str, object] = {}

    def build(precision: str):
        if precision not in models:
            models[precision] = create_unified_model(config=from_dict({**config, "precision": precision}),
                                                     device=device, clip_state_dict=state, merge_lora=True)
        return models[precision]

    return {"cuda": cuda, "device": device, "work": work, "state": state, "config": config,
            "small_state": small_state, "build": build, "models": models}


def card_name(dry_run: bool) -> str:
    if dry_run or not torch.cuda.is_available():
        return "none (dry run on CPU)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{names[0]} x{len(names)}" if len(set(names)) == 1 else ", ".join(names)


def run_steps(args, work: Path) -> List[Step]:
    start = time.perf_counter()
    ctx = _context(args, work)
    results = []
    for name, fn in STEPS:
        step = Step(name)
        if time.perf_counter() - start > TIME_BUDGET_S:
            step.detail = "skipped: the time budget is spent"
            results.append(step)
            continue
        t = time.perf_counter()
        try:
            step.detail = fn(args, ctx)
            step.status = "skipped" if step.detail.startswith("skipped") else "passed"
        except _Skip as skip:
            step.detail = f"skipped: {skip}"
        except Exception as err:  # noqa: BLE001 - every step is reported, the next one still runs
            step.status = "failed"
            step.detail = _one_line(f"{type(err).__name__}: {err}")
            logger.debug("%s", traceback.format_exc())
        step.seconds = time.perf_counter() - t
        logger.info("%s: %s (%.1fs) %s", name, step.status, step.seconds, step.detail)
        results.append(step)
    return results


def print_table(steps: List[Step], dry_run: bool) -> None:
    print()
    print(f"GPU: {card_name(dry_run)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print()
    print("| step | status | seconds | result |")
    print("| --- | --- | ---: | --- |")
    for s in steps:
        print(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="run on CPU with tiny sizes (no GPU needed; numbers mean nothing)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a new temporary folder, removed)")
    parser.add_argument("--runs", type=int, default=None, help="timed benchmark runs (default 3; 1 with --dry-run)")
    parser.add_argument("--verbose", action="store_true", help="debug logging (tracebacks of failed steps)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("modules.module_clip", "modules.training", "modules.extraction", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.runs = args.runs or (1 if args.dry_run else 3)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        steps = run_steps(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(steps, args.dry_run)
    return 1 if any(s.status == "failed" for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
