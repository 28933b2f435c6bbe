#!/usr/bin/env python
"""Interactive walk-through of the training modes, on synthetic data (runs offline on a CPU).

    python training_example.py                                   # asks which mode to run
    python training_example.py --non_interactive --mode sequential

It generates short clips of moving coloured shapes with captions, builds a small randomly
initialised CLIP (unless --clip_weights is given), trains the unified model in the chosen
mode, and prints text-to-video retrieval before and after training together with the
equivalent train_unified_model.py command (its config is written next to the results).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional

from config import TRAINING_MODES
from modules.cli_support import HelpFormatter, int_at_least, run_cli, setup_logging

MODE_HELP = {
    "joint": "train TempMe (LoRA, clip positions) and STOP (prompts, head) together",
    "tempme_only": "train only TempMe; STOP's prompt generators stay at their initial values",
    "stop_only": "train only STOP; TempMe's LoRA stays at zero (plain CLIP attention)",
    "sequential": "TempMe for the first half of the epochs, then STOP for the rest",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--mode", choices=TRAINING_MODES, default=None, help="skip the mode question")
    p.add_argument("--non_interactive", "--yes", dest="non_interactive", action="store_true",
                   help="ask nothing; use --mode (default joint) and the other flags")
    p.add_argument("--output_dir", default=os.path.join("runs", "training_example"),
                   help="data, config, checkpoints and TensorBoard logs go here")
    p.add_argument("--epochs", type=int_at_least(1), default=6, help="epochs (asked for unless --non_interactive)")
    p.add_argument("--max_steps", type=int_at_least(1), default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch_size", type=int_at_least(1), default=16, help="clips per optimizer step")
    p.add_argument("--num_videos", type=int, default=190, help="synthetic clips in total")
    p.add_argument("--num_val", type=int, default=30, help="of which held out for validation")
    p.add_argument("--size", type=int, default=64, help="frame size of the small CLIP (multiple of 16)")
    p.add_argument("--clip_weights", default=None,
                   help="real CLIP weights (file or 'ViT-B/32') instead of the small random CLIP: slow on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    return p


def _ask(prompt: str, default: str, ask: Callable[[str], str]) -> str:
    try:
        answer = ask(f"{prompt} [{default}]: ").strip()
    except EOFError:
        answer = ""
    return answer or default


def choose_mode(ask: Callable[[str], str] = input) -> str:
    """Ask for a mode by number or name until the answer is valid."""
    print("Training modes:")
    for i, mode in enumerate(TRAINING_MODES, start=1):
        print(f"  {i}. {mode:<12} {MODE_HELP[mode]}")
    while True:
        answer = _ask("Choose a mode (1-4 or a name)", "1", ask)
        if answer.isdigit() and 1 <= int(answer) <= len(TRAINING_MODES):
            return TRAINING_MODES[int(answer) - 1]
        if answer in TRAINING_MODES:
            return answer
        print(f"  '{answer}' is not one of 1-{len(TRAINING_MODES)} or {', '.join(TRAINING_MODES)}")


def ask_epochs(default: int, ask: Callable[[str], str] = input) -> int:
    """Ask for the number of epochs until the answer is a whole number >= 1."""
    while True:
        answer = _ask("Epochs", str(default), ask)
        if answer.isdigit() and int(answer) >= 1:
            return int(answer)
        print(f"  '{answer}' is not a whole number of epochs (1 or more)")


def main(argv: Optional[List[str]] = None, ask: Callable[[str], str] = input) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    setup_logging(verbose=False, quiet=args.quiet)
    return run_cli(lambda: _run(args, ask))


def _run(args: argparse.Namespace, ask: Callable[[str], str]) -> int:
    import torch

    from config import from_dict
    from modules.metrics import format_metrics
    from modules.clip_archs import small_arch
    from modules.module_clip import random_state_dict
    from modules.training import Trainer, small_config_dict

    print("Unified TempMe-STOP training example (synthetic clips of moving coloured shapes)\n")
    mode = args.mode or ("joint" if args.non_interactive else choose_mode(ask))
    epochs = args.epochs
    if not args.non_interactive:
        epochs = ask_epochs(epochs, ask)
    out = os.path.abspath(args.output_dir)
    training = dict(training_mode=mode, datatype="synthetic", data_path=os.path.join(out, "data"),
                    synthetic_num_videos=args.num_videos, synthetic_val_videos=args.num_val, batch_size=args.batch_size,
                    num_epochs=epochs, tempme_lr=1e-3, stop_lr=1e-3,
                    weight_decay=0.2, warmup_proportion=0.1, amp=True, num_workers=1, log_every=5,
                    checkpoint_dir=os.path.join(out, "checkpoints"), max_steps=args.max_steps,
                    train_backbone=args.clip_weights is None)
    os.makedirs(out, exist_ok=True)
    if args.clip_weights is None:
        data = small_config_dict(args.size, vision_layers=4, training=training)
        data["stop"]["prompt_dim"] = 16  # the temporal prompter's 3-D convolutions dominate CPU time
        clip_file = os.path.join(out, f"small_clip_{args.size}px.pt")
        if not os.path.isfile(clip_file):
            torch.save(random_state_dict(small_arch(args.size)), clip_file)
        data["clip_weights"] = clip_file
        training["backbone_lr"] = 1e-3  # a random CLIP has to learn from scratch
    else:
        data = {"max_frames": 12, "num_segments": 12, "clip_weights": args.clip_weights, "training": training}
    data["device"] = args.device
    config = from_dict(data)
    config_path = os.path.join(out, "config.json")
    config.to_json(config_path)

    print(f"\nmode {mode}: {MODE_HELP[mode]}")
    print(f"data, checkpoints and logs: {out}\n")
    # a rerun of the example starts afresh: its folder holds only what an earlier run wrote
    trainer = Trainer(config, mode, progress=not args.quiet, overwrite=True)
    try:
        before = trainer.evaluate()
        summary = trainer.train()
        after = summary["metrics"] or trainer.evaluate()
    finally:
        trainer.close()
    chance = 100.0 / len(trainer.data.val.videos)
    print(f"\nheld-out text-to-video retrieval ({len(trainer.data.val.videos)} clips, chance R@1 {chance:.1f}):")
    print(f"  before training: R@1 {before['t2v']['R1']:.1f}")
    print(f"  after {summary['step']} steps of {mode}: R@1 {after['t2v']['R1']:.1f}")
    print(format_metrics(after))
    print("\nThe same run from the command line:")
    print(f"  python train_unified_model.py --config {config_path} --mode {mode}")
    print(f"  tensorboard --logdir {os.path.join(out, 'checkpoints', 'logs')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
