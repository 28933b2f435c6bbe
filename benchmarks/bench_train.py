#!/usr/bin/env python
"""Proof that training learns: a small unified model trained from scratch on synthetic clips.

Part 1 trains a randomly initialised small CLIP (64 px, 16 px patches, width 128, 4 vision
and 4 text blocks) with TempMe merging, LoRA, STOP prompts and train_backbone on, in joint
mode, through the real training code (modules.training.Trainer: AdamW, warmup + cosine,
bf16 autocast, DataLoader decoding), and prints held-out text-to-video R@1 before and after,
with chance level.

Part 2 freezes the backbone trained in part 1, re-initialises the TempMe and STOP groups,
and trains each mode for a few steps from that same start: it prints the training loss on a
fixed probe set before and after, and how far each group moved (max |change|), showing that
every mode lowers the loss through its own group only.

    python benchmarks/bench_train.py               # about 10 minutes on 2 CPU cores
    python benchmarks/bench_train.py --quick       # a 1-minute smoke run (not a result)

Run from the repository root. Everything is written under --work_dir (default a temp dir).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import from_dict  # noqa: E402
from modules.tokenization_clip import tokenize_for_model  # noqa: E402
from modules.clip_archs import small_arch  # noqa: E402
from modules.module_clip import random_state_dict  # noqa: E402
from modules.training import Trainer, contrastive_loss, small_config_dict  # noqa: E402
from modules.video_sampler import sample_video  # noqa: E402

SIZE = 64
LAYERS = 4
WIDTH = 128


def model_config(work: str, training: Dict) -> Dict:
    data = small_config_dict(SIZE, vision_layers=LAYERS, training=training)
    data["stop"]["prompt_dim"] = 16  # the temporal prompter's Conv3d dominates CPU time
    return data


def training_settings(work: str, args: argparse.Namespace, **overrides) -> Dict:
    settings = dict(
        datatype="synthetic", data_path=os.path.join(work, "data"), synthetic_num_videos=args.train_videos + args.val_videos,
        synthetic_val_videos=args.val_videos, seed=0, batch_size=args.batch_size, num_epochs=args.epochs,
        tempme_lr=1e-3, stop_lr=1e-3, backbone_lr=args.backbone_lr, weight_decay=0.2, warmup_proportion=0.1,
        max_grad_norm=1.0, amp=True, num_workers=1, eval_every=max(1, args.epochs // 4), log_every=20,
        checkpoint_dir=os.path.join(work, "part1"), train_backbone=True, max_steps=args.max_steps, keep_checkpoints=0,
    )
    settings.update(overrides)
    return settings


@torch.no_grad()
def probe_loss(trainer: Trainer, batches: List[List[int]]) -> float:
    """Mean contrastive loss of fixed training batches, centre-of-segment frames (deterministic)."""
    model = trainer.model
    was = model.training
    model.eval()
    split = trainer.data.train
    cfg = trainer.config
    losses = []
    for batch in batches:
        frames = torch.stack([sample_video(split.videos[split.caption_video[t]], cfg.num_segments, cfg.video_size).frames
                              for t in batch])
        tokens = tokenize_for_model([split.captions[t] for t in batch], trainer.config.max_words)
        with trainer._autocast():
            video = model.encode_videos(frames).video_embeddings
            text = model.encode_text_tokens(tokens)
        losses.append(float(contrastive_loss(F.normalize(text.float(), dim=-1), video, trainer.logit_scale)[0]))
    model.train(was)
    return sum(losses) / len(losses)


def group_change(before: Dict[str, torch.Tensor], trainer: Trainer, group: str) -> float:
    changes = [float((p.detach() - before[n]).abs().max()) for n, p in trainer.model.named_group_parameters(group)
               if n != "clip.logit_scale"]
    return max(changes) if changes else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default=None)
    p.add_argument("--train_videos", type=int, default=480)
    p.add_argument("--val_videos", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--backbone_lr", type=float, default=5e-4)
    p.add_argument("--mode_epochs", type=int, default=2, help="part 2: epochs per mode (sequential: 1 TempMe + rest STOP)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="log training progress")
    args = p.parse_args(argv)
    if args.quick:
        args.train_videos, args.val_videos, args.epochs = 64, 16, 2
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_train_")
    t_start = time.time()

    # ------------------------------------------------------------------ part 1
    clip_state = random_state_dict(small_arch(SIZE, vision_width=WIDTH, vision_layers=LAYERS, text_width=WIDTH, text_layers=LAYERS))
    config = from_dict(model_config(work, training_settings(work, args)))
    trainer = Trainer(config, "joint", clip_state_dict=clip_state, progress=False, log_dir=False)
    num_val = len(trainer.data.val.videos)
    chance = 100.0 / num_val
    before = trainer.evaluate()
    t0 = time.time()
    summary = trainer.train()
    train_seconds = time.time() - t0
    after = summary["metrics"]
    trainer.close()
    params = sum(p.numel() for p in trainer.model.parameters())

    print("## Training\n")
    print(f"`python benchmarks/bench_train.py` on {torch.get_num_threads()} CPU threads, torch {torch.__version__}.\n")
    print(f"Part 1: from scratch. Small CLIP ({SIZE} px, 16 px patches, width {WIDTH}, {LAYERS}+{LAYERS} blocks, "
          f"{params / 1e6:.1f} M parameters incl. the 49408-token embedding), 8 sampled frames -> 4 (TempMe), "
          f"merge 2-2 at blocks {LAYERS - 2}-{LAYERS - 1}, LoRA 4, STOP prompts, meanP; joint mode with train_backbone, "
          f"batch {args.batch_size}, bf16 autocast. Synthetic set: {len(trainer.data.train.videos)} training clips, "
          f"{num_val} held-out clips with distinct captions.\n")
    print("| | t2v R@1 | t2v R@5 | t2v MdR | v2t R@1 | steps | train time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| chance | {chance:.1f} | {min(100, 5 * chance):.1f} | {(num_val + 1) / 2:.1f} | {chance:.1f} | | |")
    print(f"| before training | {before['t2v']['R1']:.1f} | {before['t2v']['R5']:.1f} | {before['t2v']['MdR']:.1f} | "
          f"{before['v2t']['R1']:.1f} | 0 | |")
    print(f"| after training | {after['t2v']['R1']:.1f} | {after['t2v']['R5']:.1f} | {after['t2v']['MdR']:.1f} | "
          f"{after['v2t']['R1']:.1f} | {summary['step']} | {train_seconds / 60:.1f} min |")
    ratio = after["t2v"]["R1"] / chance
    print(f"\nHeld-out text-to-video R@1 after training: {after['t2v']['R1']:.1f} = {ratio:.1f} x chance "
          f"(target >= 3 x).\n", flush=True)

    # ------------------------------------------------------------------ part 2
    backbone = {k: v.detach().clone() for k, v in trainer.model.clip.state_dict().items()}
    del trainer
    print(f"Part 2: backbone from part 1 frozen, TempMe and STOP groups re-initialised, {args.mode_epochs} epochs "
          f"per mode (sequential: 1 TempMe epoch, then STOP), lr 1e-3. Loss = contrastive loss on 4 fixed training "
          f"batches (centre frames); change = max |tensor change| of the group.\n")
    print("| mode | steps | loss before | loss after | TempMe change | STOP change | backbone change |")
    print("|---|---|---|---|---|---|---|")
    probe = None
    for mode in ("tempme_only", "stop_only", "joint", "sequential"):
        # two epochs per mode; sequential: epoch 1 TempMe, epoch 2 STOP
        settings = training_settings(work, args, train_backbone=False, num_epochs=args.mode_epochs, sequential_split=1,
                                     max_steps=None, warmup_proportion=0.0, eval_every=100,
                                     checkpoint_dir=os.path.join(work, f"part2_{mode}"))
        t = Trainer(from_dict(model_config(work, settings)), mode, clip_state_dict=backbone, progress=False, log_dir=False)
        if probe is None:
            g = torch.Generator().manual_seed(1)
            order = torch.randperm(len(t.data.train.captions), generator=g).tolist()
            probe = [order[i * args.batch_size:(i + 1) * args.batch_size]
                     for i in range(min(4, len(order) // args.batch_size))]
        start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        loss_before = probe_loss(t, probe)
        t.train()
        loss_after = probe_loss(t, probe)
        t.close()
        print(f"| {mode} | {t.step} | {loss_before:.3f} | {loss_after:.3f} | {group_change(start, t, 'tempme'):.2e} | "
              f"{group_change(start, t, 'stop'):.2e} | {group_change(start, t, 'backbone'):.1e} |", flush=True)
    print(f"\nTotal wall time {(time.time() - t_start) / 60:.1f} min (data generation, evaluation and both parts).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
