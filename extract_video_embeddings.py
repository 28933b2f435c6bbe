#!/usr/bin/env python
"""Extract one embedding per video for every video in a directory.

Examples:
  python extract_video_embeddings.py --video_dir ./videos --output_dir ./embeddings
  python extract_video_embeddings.py --video_dir ./videos --output_dir ./embeddings \\
      --save_format both --consolidated --summary --recursive
  torchrun --standalone --nproc_per_node 4 extract_video_embeddings.py --video_dir ./videos --output_dir ./emb

Finished videos are skipped on the next run (resume); --overwrite recomputes them.
Exit status: 0 all videos done, 1 some videos failed (see the log / --summary),
2 usage error (missing directory, bad config, weights or checkpoint), 130 interrupted.

The library function is modules.extraction.extract_directory_embeddings, importable from
here as `from extract_video_embeddings import extract_directory_embeddings`.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


__all__ = ["extract_directory_embeddings", "build_parser", "main"]


def __getattr__(name: str):
    """Lazy re-export, so `--help` and argument errors answer without importing torch."""
    if name == "extract_directory_embeddings":
        from modules.extraction import extract_directory_embeddings

        return extract_directory_embeddings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    from modules.cli_support import (DEFAULT_EXTENSIONS, HelpFormatter, add_logging_arguments, add_model_arguments,
                                     add_window_arguments,
                                     int_at_least)

    parser = argparse.ArgumentParser(
        prog="extract_video_embeddings.py", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter,
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--video_dir", required=True, help="folder of videos to embed")
    io.add_argument("--output_dir", default="./embeddings",
                    help="where the outputs go (created; subfolders of --video_dir are mirrored)")
    io.add_argument("--recursive", action="store_true",
                    help="also embed videos in subfolders (symbolic links to folders are not followed)")
    io.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS),
                    help="comma-separated file endings that count as videos (case-insensitive)")
    io.add_argument("--save_format", choices=("numpy", "json", "both"), default="numpy",
                    help="per-video files: <name>_embedding.npy, <name>_embedding.json, or both")
    io.add_argument("--consolidated", action="store_true",
                    help="also write consolidated_embeddings.json plus embeddings.npy (one row per video) "
                         "and embeddings_index.json (row -> video)")
    io.add_argument("--summary", action="store_true",
                    help="also write extraction_summary.json: per-video status, error and seconds; totals with videos/s")
    io.add_argument("--save_frame_features", action="store_true",
                    help="also write <name>_frames.npz: the frame features with original frame numbers and timestamps")
    io.add_argument("--index", action="store_true",
                    help="also keep the searchable video library in OUTPUT_DIR/library up to date: videos with their "
                         "moments (search it with inference.py --embeddings_dir OUTPUT_DIR) (default: off)")
    io.add_argument("--overwrite", action="store_true",
                    help="recompute videos whose outputs already exist (default: off, they are skipped: a rerun resumes)")

    add_model_arguments(parser)
    add_window_arguments(parser)

    speed = parser.add_argument_group("speed and scale-out")
    speed.add_argument("--batch_size", type=int_at_least(1), default=None,
                       help="videos per model forward (default: 1 on CPU, 4 on CUDA)")
    speed.add_argument("--num_workers", type=int_at_least(0), default=None,
                       help="decode worker processes, each decoding single-threaded; 0 = decode in the main "
                            "process (default: half the CPU cores available to each rank, 1 to 8)")
    speed.add_argument("--parallel_batches", type=int_at_least(1), default=None,
                       help="on CPU, model forwards running at once, each on the rank's torch threads divided "
                            "by this (default: one per torch thread, at most 4; always 1 on CUDA)")
    speed.add_argument("--shard", type=int_at_least(0), default=None,
                       help="process only share SHARD of --num_shards (round-robin over the sorted list), for "
                            "shards run as separate jobs without torchrun (default: all videos)")
    speed.add_argument("--num_shards", type=int_at_least(1), default=None,
                       help="number of shards, with --shard (default: 1)")

    add_logging_arguments(parser, "warnings and errors only, no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from modules.cli_support import UsageError, check_config_file, check_dir, run_cli, setup_logging

    setup_logging(args.verbose, args.quiet)

    def job() -> int:
        # cheap checks first: a typo is answered before torch is even imported
        check_dir(args.video_dir, "video directory")
        if not args.output_dir:
            raise UsageError("--output_dir is empty")
        check_config_file(args.config_path)

        from tqdm.contrib.logging import logging_redirect_tqdm

        from modules.extraction import extract_directory_embeddings

        with logging_redirect_tqdm():
            result = extract_directory_embeddings(
                args.video_dir, args.output_dir, config_path=args.config_path, save_format=args.save_format,
                consolidated=args.consolidated, summary=args.summary, device=args.device,
                clip_weights=args.clip_weights, checkpoint=args.checkpoint, recursive=args.recursive,
                extensions=args.extensions, batch_size=args.batch_size, num_workers=args.num_workers,
                parallel_batches=args.parallel_batches,
                overwrite=args.overwrite, save_frame_features=args.save_frame_features,
                shard=args.shard, num_shards=args.num_shards, progress=not args.quiet,
                writers=_library_writers(args),
                window_seconds=args.window_seconds, window_stride=args.window_stride,
            )
        _print_result(result, args)
        if args.index and (result.get("num_shards", 1) == 1 or "global" in result):
            _print_library(args)
        totals = result.get("global", result)
        return 1 if totals["failed"] else 0

    return run_cli(job, interrupted_hint="finished videos are saved; rerun the same command to resume")


def _library_writers(args: argparse.Namespace) -> list:
    """--index: the writer that keeps OUTPUT_DIR/library up to date (refuses another model early)."""
    if not args.index:
        return []
    from modules.library_cli import cli_fingerprint
    from modules.library_writer import LibraryWriter

    return [LibraryWriter(args.output_dir, cli_fingerprint(args.config_path, args.checkpoint, args.clip_weights))]


def _print_library(args: argparse.Namespace) -> None:
    from modules.library import VideoLibrary

    library = VideoLibrary.open(args.output_dir)
    print(f"Library {library.root}: {len(library)} videos, {library.num_segments} moments")


def _print_result(result: dict, args: argparse.Namespace) -> None:
    """The CLI's result lines (stdout): one line per failure, whatever the file names hold."""
    from modules.errors import printable

    prefix = f"[shard {result['shard']}/{result['num_shards']}] " if result.get("num_shards", 1) > 1 else ""
    rate = result["videos_per_second"]
    print(f"{prefix}Embedded {result['processed']} videos, {result['failed']} failed, {result['skipped']} skipped "
          f"(already done) of {result['total']} in {result['elapsed_seconds']:.1f}s"
          + (f" ({rate:.2f} videos/s)" if rate else "") + f"; outputs in {result['output_dir']}")
    errors = result["errors"]
    for err in errors[:20]:
        print(f"{prefix}FAILED {printable(err['video_path'])}: {printable(err['error'])}")
    if len(errors) > 20:
        print(f"{prefix}... and {len(errors) - 20} more failures" + ("" if args.summary else " (use --summary to list them all)"))
    total = result.get("global")
    if total is not None and (result["shard"] == 0 or args.shard is not None):
        print(f"All {result['num_shards']} shards: {total['processed']} embedded, {total['failed']} failed, "
              f"{total['skipped']} skipped of {total['total']} videos")


if __name__ == "__main__":
    sys.exit(main())
