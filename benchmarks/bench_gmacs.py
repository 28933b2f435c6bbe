"""GMACs per video for ViT-B/32, B/16 and L/14: plain CLIP next to TempMe merging and the full stack.

Counts multiply-accumulates (torch.utils.flop_counter FLOPs / 2, attention included) of one
12-frame video on random weights of each architecture's shapes; counts do not depend on
the weights. Columns:
  plain CLIP    12 frames through CLIP's image tower (CLIP4Clip meanP)
  TempMe        the default merge schedule of the architecture, no prompts, 12 frames
  full stack    the default config: 32 sampled frames compressed to 12, STOP prompts, merging

    python benchmarks/bench_gmacs.py [--archs ViT-B/32 ViT-B/16 ViT-L/14]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import from_dict  # noqa: E402
from modules.clip_archs import CLIP_ARCHS, DEFAULT_MERGE_SCHEDULES  # noqa: E402
from modules.module_clip import register_cpu_sdpa_flops, random_state_dict  # noqa: E402
from unified_model import UnifiedTempMeSTOPModel  # noqa: E402


def gmacs(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(CLIP_ARCHS))
    args = parser.parse_args()
    register_cpu_sdpa_flops()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"{'arch':9} {'plain CLIP':>11} {'TempMe':>9} {'ratio':>6} {'full stack':>11} {'ratio':>6}")
    for arch in args.archs:
        state = random_state_dict(arch)
        size = CLIP_ARCHS[arch]["image_resolution"]
        schedule = DEFAULT_MERGE_SCHEDULES[arch]
        tempme = {"base_encoder": arch, **schedule}
        plain_cfg = from_dict({"tempme": {"base_encoder": arch, "lora_dim": 0, "merge_frame_num": "", "merge_layer": [],
                                          "tome_r": 0}, "stop": {"temporal_prompt": "none", "spatial_prompt": "none",
                                                                  "pretrained_clip_name": arch},
                               "max_frames": 12, "num_segments": 12})
        merge_cfg = from_dict({"tempme": tempme, "stop": {"temporal_prompt": "none", "spatial_prompt": "none",
                                                          "pretrained_clip_name": arch},
                               "max_frames": 12, "num_segments": 12})
        full_cfg = from_dict({"tempme": tempme, "stop": {"pretrained_clip_name": arch}})
        frames12 = torch.randn(1, 12, 3, size, size)
        frames32 = torch.randn(1, 32, 3, size, size)
        row = []
        for config, frames in ((plain_cfg, frames12), (merge_cfg, frames12), (full_cfg, frames32)):
            model = UnifiedTempMeSTOPModel(config, state).eval()
            model.merge_lora()
            row.append(gmacs(lambda: model.encode_videos(frames)))
            del model
        plain, merged, full = row
        print(f"{arch:9} {plain:11.1f} {merged:9.1f} {merged / plain:6.2f} {full:11.1f} {full / plain:6.2f}", flush=True)


if __name__ == "__main__":
    main()
