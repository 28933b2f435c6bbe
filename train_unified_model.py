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
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Dict, List, Optional

from config import ConfigError, TRAINING_MODES, DATATYPES, default_config_path, read_json_object
from modules.cli_support import EXIT_FAILED, EXIT_OK, HelpFormatter, run_cli, setup_logging

DEFAULT_CONFIG = default_config_path("training_config.json")


#: help of the training keys whose flag needs more than the key's name (TRAINING_GUIDE.md lists them all)
_KEY_HELP = {
    "datatype": "msrvtt, csv or synthetic",
    "data_path": "msrvtt: folder of the CLIP4Clip files (null = ./data/msrvtt); synthetic: output folder "
                 "(null = checkpoint_dir/synthetic_data)",
    "video_dir": "msrvtt: folder of the videos (null = data_path/videos); csv: base of relative paths",
    "checkpoint_dir": "checkpoints and TensorBoard logs (logs/) go here",
    "num_epochs": "epochs",
    "batch_size": "global batch size (all processes together)",
    "max_steps": "stop (and end the lr schedule) after this many steps",
    "num_workers": "DataLoader decoding workers per process",
    "train_backbone": "also fine-tune the CLIP weights",
    "amp": "mixed precision (training.amp_dtype: auto = bf16 on CPU, fp16 + GradScaler on CUDA)",
    "amp_dtype": "autocast dtype with --amp: auto, bf16 or fp16 (fp16 uses a GradScaler on any device)",
    "sequential_split": "epochs of sequential mode's TempMe phase (null = num_epochs // 2)",
}


def _key_type(annotation: Any, key: str):
    """argparse type for a training key: its JSON type, or null / none where the key may be null."""
    args = typing.get_args(annotation)
    nullable = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation)

    def parse(text: str) -> Any:
        if nullable and text.lower() in ("null", "none"):
            return None
        try:
            return base(text) if base in (int, float) else text
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if base is int else 'a number'}"
                                             f"{' or null' if nullable else ''}, got {text!r}") from None

    parse.__name__ = key
    return parse


def add_training_key_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per key of the 'training' section (null accepted where the key may be null)."""
    from config import TrainingConfig

    group = parser.add_argument_group("overrides of the 'training' section (each replaces the config's value)")
    hints = typing.get_type_hints(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        if f.name == "training_mode":  # --mode
            continue
        names = ["--epochs", "--num_epochs"] if f.name == "num_epochs" else [f"--{f.name}"]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        text = f"{_KEY_HELP.get(f.name, f'training.{f.name}')} (built-in default: {json.dumps(default)})"
        if hints[f.name] is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
        else:
            group.add_argument(*names, dest=f.name, type=_key_type(hints[f.name], f.name), default=argparse.SUPPRESS,
                               choices=DATATYPES if f.name == "datatype" else None, metavar="VALUE", help=text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the unified TempMe-STOP video-text model (see TRAINING_GUIDE.md).",
                                formatter_class=HelpFormatter)
    p.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                   help="JSON config with a 'training' section (default: the shipped configs/training_config.json)")
    p.add_argument("--mode", choices=TRAINING_MODES, default=None, help="training mode (default: training.training_mode)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="training checkpoint to continue exactly (a file, or a checkpoint folder: its last.pth)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a checkpoint_dir that holds another run (its checkpoints and logs are deleted)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="trained model tensors to start from / to evaluate (optimizer state not restored)")
    p.add_argument("--clip_weights", default=None,
                   help="CLIP weights: a local file or Hugging Face folder, 'ViT-B/32', 'ViT-B/16', 'ViT-L/14', "
                        "open_clip:NAME/TAG or 'random' (overrides clip_weights)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (overrides device)")
    p.add_argument("--eval_only", action="store_true", help="evaluate on the validation split and exit")
    p.add_argument("--metrics_json", default=None, metavar="PATH",
                   help="with --eval_only: where the metrics are written (default: checkpoint_dir/eval_metrics.json)")
    add_training_key_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def apply_overrides(data: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """Command-line values replace the config's (validation happens afterwards, on the result)."""
    from config import TrainingConfig

    given = vars(args)
    training = dict(data.get("training") or {})
    for f in dataclasses.fields(TrainingConfig):
        if f.name in given:
            training[f.name] = given[f.name]
    if args.mode is not None:
        training["training_mode"] = args.mode
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

    try:
        config = load_training_config(apply_overrides(read_json_object(args.config), args))
    except ConfigError as err:
        raise err.in_file(args.config) from None
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


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _print_metrics(metrics: Optional[Dict[str, Any]], header: str) -> None:
    from modules.metrics import format_metrics

    if metrics is None:
        print(f"{header}: no validation split")
        return
    info = metrics.get("info", {})
    print(f"{header} ({_plural(int(info.get('videos', 0)), 'video')}, {_plural(int(info.get('captions', 0)), 'caption')})")
    print(format_metrics(metrics))


def _write_metrics(metrics: Optional[Dict[str, Any]], path: str) -> None:
    from modules.atomic_io import save_json_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_json_atomic(path, metrics)


def _run(args: argparse.Namespace, trainers: List[Any]) -> int:
    from modules.distributed import init_distributed
    from modules.training import Trainer, TrainingDiverged

    config = validate(args)
    env = init_distributed(config.device)
    trainer = Trainer(config, args.mode, resume=args.resume, init_checkpoint=args.checkpoint, env=env,
                      progress=not args.quiet, need_train=not args.eval_only,
                      log_dir=False if args.eval_only else None, overwrite=args.overwrite)
    trainers.append(trainer)
    try:
        if args.eval_only:
            metrics = trainer.evaluate()
            if env.is_main:
                _print_metrics(metrics, "validation")
                path = args.metrics_json or os.path.join(trainer.cfg.checkpoint_dir, "eval_metrics.json")
                _write_metrics(metrics, path)
                print(f"metrics written to {path}")
            return EXIT_OK
        try:
            summary = trainer.train()
        except TrainingDiverged as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        if env.is_main:
            print(f"trained {_plural(summary['step'], 'step')} ({trainer.mode}); checkpoints in "
                  f"{trainer.cfg.checkpoint_dir}")
            if summary["metrics"] is not None:
                _print_metrics(summary["metrics"], f"validation after {_plural(summary['step'], 'step')}")
        return EXIT_OK
    finally:
        trainer.close()


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 failed, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    args.resume = _resolve_resume(args.resume)
    setup_logging(verbose=False, quiet=args.quiet or int(os.environ.get("RANK", "0")) != 0)
    trainers: List[Any] = []

    def resume_hint() -> str:
        saved = trainers[0].resume_point() if trainers else None
        return f"continue with --resume {saved}" if saved else "no checkpoint was written yet"

    from modules.distributed import cleanup_distributed

    try:
        return run_cli(lambda: _run(args, trainers), interrupted_hint=resume_hint)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
