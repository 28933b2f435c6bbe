#!/usr/bin/env python
"""Train the unified TempMe-STOP model (see TRAINING_GUIDE.md).

    python train_unified_model.py --config configs/training_config.json --mode joint
    torchrun --nproc_per_node 4 train_unified_model.py --config configs/training_config.json
    python train_unified_model.py --config ... --resume checkpoints/unified_model/last.pth
    python train_unified_model.py --config ... --eval_only --checkpoint checkpoints/unified_model/best.pth

Every config value is validated before any work starts; a bad value exits with status 2
and a one-line message naming its dotted key (e.g. ``training.batch_size: ...``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from config import ConfigError, TRAINING_MODES, DATATYPES, default_config_path, read_json_object

DEFAULT_CONFIG = default_config_path("training_config.json")
logger = logging.getLogger("train_unified_model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the unified TempMe-STOP video-text model (see TRAINING_GUIDE.md).")
    p.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                   help="JSON config with a 'training' section (default: the shipped configs/training_config.json)")
    p.add_argument("--mode", choices=TRAINING_MODES, default=None, help="training mode (default: training.training_mode)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="training checkpoint to continue exactly (a file, or a checkpoint folder: its last.pth)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="trained model tensors to start from / to evaluate (optimizer state not restored)")
    p.add_argument("--clip_weights", default=None,
                   help="CLIP weights: a local file, 'ViT-B/32', 'ViT-B/16' or 'random' (overrides clip_weights)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (overrides device)")
    p.add_argument("--eval_only", action="store_true", help="evaluate on the validation split and exit")
    g = p.add_argument_group("overrides of the 'training' section")
    g.add_argument("--datatype", choices=DATATYPES, default=None)
    g.add_argument("--data_path", default=None, help="msrvtt: folder of the CLIP4Clip files; synthetic: output folder")
    g.add_argument("--video_dir", default=None, help="folder of the videos")
    g.add_argument("--train_csv", default=None)
    g.add_argument("--val_csv", default=None)
    g.add_argument("--checkpoint_dir", default=None, help="checkpoints and TensorBoard logs (logs/) go here")
    g.add_argument("--epochs", type=int, default=None, help="training.num_epochs")
    g.add_argument("--batch_size", type=int, default=None, help="global batch size (all processes together)")
    g.add_argument("--grad_accum_steps", type=int, default=None)
    g.add_argument("--max_steps", type=int, default=None, help="stop (and end the lr schedule) after this many steps")
    g.add_argument("--tempme_lr", type=float, default=None)
    g.add_argument("--stop_lr", type=float, default=None)
    g.add_argument("--num_workers", type=int, default=None, help="DataLoader decoding workers per process")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--train_backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="also fine-tune the CLIP weights")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p


_TRAINING_OVERRIDES = {
    "datatype": "datatype", "data_path": "data_path", "video_dir": "video_dir", "train_csv": "train_csv",
    "val_csv": "val_csv", "checkpoint_dir": "checkpoint_dir", "epochs": "num_epochs", "batch_size": "batch_size",
    "grad_accum_steps": "grad_accum_steps", "max_steps": "max_steps", "tempme_lr": "tempme_lr",
    "stop_lr": "stop_lr", "num_workers": "num_workers", "seed": "seed", "train_backbone": "train_backbone",
    "amp": "amp", "mode": "training_mode",
}


def apply_overrides(data: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """Command-line values replace the config's (validation happens afterwards, on the result)."""
    training = dict(data.get("training") or {})
    for arg, key in _TRAINING_OVERRIDES.items():
        value = getattr(args, arg)
        if value is not None:
            training[key] = value
    mode = training.get("training_mode", "joint")
    if args.epochs is not None and mode != "sequential" and isinstance(training.get("sequential_split"), int):
        # sequential_split is irrelevant outside sequential mode: keep it valid for fewer epochs
        training["sequential_split"] = min(training["sequential_split"], args.epochs)
    data = dict(data)
    data["training"] = training
    if args.clip_weights is not None:
        data["clip_weights"] = args.clip_weights
    if args.device is not None:
        data["device"] = args.device
    return data


def _resolve_resume(path: Optional[str]) -> Optional[str]:
    if path is not None and os.path.isdir(path):
        return os.path.join(path, "last.pth")
    return path


def _known_clip_names() -> List[str]:
    from modules.clip_weights import OPENAI_MODELS

    return [n for name in OPENAI_MODELS for n in (name, name.replace("/", "-"))]


def validate(args: argparse.Namespace):
    """Config + files, before any work: returns the validated UnifiedModelConfig."""
    from modules.data import check_data_paths
    from modules.training import load_training_config
    from unified_model import resolve_device

    config = load_training_config(apply_overrides(read_json_object(args.config), args))
    check_data_paths(config.training, need_train=not args.eval_only)
    from modules.clip_weights import TEMPME_PREFIX, is_official_name

    weights = config.clip_weights
    local = weights[len(TEMPME_PREFIX):] if weights and weights.startswith(TEMPME_PREFIX) else weights
    if not is_official_name(weights) and not os.path.exists(os.path.expanduser(local)):
        raise ConfigError("clip_weights", f"file not found: {weights} (nor a model name: {', '.join(_known_clip_names())})")
    for flag, path in (("--resume", args.resume), ("--checkpoint", args.checkpoint)):
        if path is not None and not os.path.isfile(path[len(TEMPME_PREFIX):] if path.startswith(TEMPME_PREFIX) else path):
            raise ConfigError(flag, f"checkpoint not found: {path}")
    if args.resume and args.checkpoint:
        raise ConfigError("--checkpoint", "give either --resume (continue a run) or --checkpoint (start from weights)")
    try:
        resolve_device(config.device)
    except RuntimeError as err:
        raise ConfigError("device", str(err)) from None
    return config


def _print_metrics(metrics: Optional[Dict[str, Any]], header: str) -> None:
    from modules.metrics import format_metrics

    if metrics is None:
        print(f"{header}: no validation split")
        return
    info = metrics.get("info", {})
    print(f"{header} ({int(info.get('videos', 0))} videos, {int(info.get('captions', 0))} captions)")
    print(format_metrics(metrics))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.resume = _resolve_resume(args.resume)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if (args.quiet or rank != 0) else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = validate(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from modules.clip_weights import WeightsError
    from modules.training import Trainer, cleanup_distributed, init_distributed
    from unified_model import CheckpointError

    env = None
    try:
        env = init_distributed(config.device)
        trainer = Trainer(config, args.mode, resume=args.resume, init_checkpoint=args.checkpoint, env=env,
                          progress=not args.quiet, need_train=not args.eval_only,
                          log_dir=False if args.eval_only else None)
        try:
            if args.eval_only:
                metrics = trainer.evaluate()
                if env.is_main:
                    _print_metrics(metrics, "validation")
            else:
                summary = trainer.train()
                if env.is_main:
                    ckpt_dir = config.training.checkpoint_dir
                    print(f"trained {summary['step']} steps ({trainer.mode}); checkpoints in {ckpt_dir}")
                    if summary["metrics"] is not None:
                        _print_metrics(summary["metrics"], "validation")
        finally:
            trainer.close()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, WeightsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
