#!/usr/bin/env python
"""Find the frames of a video that match a text query (and search extracted embeddings).

Modes (pick one):
  --video_path V --query Q [--top_k K]       one video: the INFERENCE RESULTS report
  --batch_file B.json [--output R.json]      many {"video_path", "query"} pairs -> JSON results
  --embeddings_dir D --query Q [--top_k K]   rank the videos of an extracted folder by similarity
      [--query Q2 ...] [--moments] [--image P]  (with a video library: several queries, one model
                                               load; --moments lists time spans; --image queries
                                               by example)
  --embeddings_dir D --index                 build or extend D's video library from its files
  --embeddings_dir D --serve [--port 8000]   search page + JSON API on http://127.0.0.1:8000
  --demo                                     make small videos and run the whole chain end to end

Exit status: 0 success, 1 some pair failed (its result says why), 2 usage error
(missing file, bad config, weights or checkpoint), 130 interrupted.

The library function is modules.retrieval.batch_retrieve_events, importable from here as
`from inference import batch_retrieve_events`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import List, Optional

from modules.errors import printable

__all__ = ["batch_retrieve_events", "build_parser", "main"]

DEMO_QUERY = "a red circle moving from left to right"


def __getattr__(name: str):
    """Lazy re-export, so `--help` and argument errors answer without importing torch."""
    if name == "batch_retrieve_events":
        from modules.retrieval import batch_retrieve_events

        return batch_retrieve_events
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    from modules.cli_support import HelpFormatter, add_logging_arguments, add_model_arguments, \
        add_window_arguments, int_at_least, int_between

    parser = argparse.ArgumentParser(
        prog="inference.py", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter,
    )
    mode = parser.add_argument_group("what to run (one of --video_path, --batch_file, --embeddings_dir, --demo)")
    mode.add_argument("--video_path", default=None, help="video to search in, with --query")
    mode.add_argument("--query", action="append", default=None,
                      help="text describing the moment (or, with --embeddings_dir, the video); with --embeddings_dir "
                           "it may be given several times (one model load for all)")
    mode.add_argument("--library", default=None,
                      help="with --video_path: a video library (or an extraction folder with one) that holds the "
                           "video's segments: moments are scored from it without decoding the video")
    mode.add_argument("--top_k", type=int_at_least(1), default=None,
                      help="frames to return (videos with --embeddings_dir) (default: the config's top_k, 5)")
    mode.add_argument("--batch_file", default=None,
                      help="JSON list of {\"video_path\", \"query\"} objects (optional per-item \"top_k\"); "
                           "relative video paths are resolved against the batch file's folder")
    mode.add_argument("--output", default=None,
                      help="also write the results as JSON to this file (default: none; --batch_file then prints "
                           "the JSON to stdout)")
    mode.add_argument("--embeddings_dir", default=None,
                      help="folder written by extract_video_embeddings.py: rank its videos by cosine similarity "
                           "with --query")
    library = parser.add_argument_group("video library (with --embeddings_dir)")
    library.add_argument("--moments", action="store_true",
                         help="list matching moments (video, time span, frame) instead of videos; needs the library")
    library.add_argument("--image", default=None,
                         help="query by example: a picture whose CLIP image embedding is searched for")
    library.add_argument("--index", action="store_true",
                         help="build or extend the folder's video library (library/) from its per-video files")
    library.add_argument("--serve", action="store_true",
                         help="serve the search page and JSON API for the folder's library")
    library.add_argument("--host", default="127.0.0.1", help="address --serve binds to (default: 127.0.0.1, this machine only)")
    library.add_argument("--port", type=int_between(1, 65535), default=8000,
                         help="port of --serve, 1-65535 (default: 8000)")
    mode.add_argument("--demo", action="store_true",
                      help="write two small videos to a temporary folder and run extraction, retrieval and search "
                           "on them (random CLIP weights when no real ones are available offline, and it says so)")

    add_window_arguments(parser)
    model = add_model_arguments(parser)
    model.add_argument("--num_workers", type=int_at_least(0), default=0,
                       help="decode worker processes for --batch_file (0 = decode in the main process)")
    add_logging_arguments(parser, "warnings and errors only, no progress bar")
    return parser


def _check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    modes = [name for name, on in (("demo", args.demo), ("batch_file", args.batch_file is not None),
                                   ("embeddings_dir", args.embeddings_dir is not None),
                                   ("video_path", args.video_path is not None)) if on]
    if not modes:
        parser.error("nothing to do: give --video_path with --query, --batch_file, --embeddings_dir with --query, or --demo")
    if len(modes) > 1:
        parser.error("choose one of " + ", ".join("--" + m for m in modes))
    mode = modes[0]
    queries = args.query or []
    if any(not q.strip() for q in queries):
        parser.error("--query must not be empty")
    library_flags = [f for f, on in (("--moments", args.moments), ("--image", args.image is not None),
                                     ("--index", args.index), ("--serve", args.serve)) if on]
    if library_flags and mode != "embeddings_dir":
        parser.error(f"{library_flags[0]} is used with --embeddings_dir")
    if mode == "embeddings_dir":
        if args.index or args.serve:
            if queries or args.image or args.moments or (args.index and args.serve):
                parser.error("--index and --serve run alone (no --query, --image, --moments)")
            return "index" if args.index else "serve"
        if not queries and args.image is None:
            parser.error("--embeddings_dir needs --query (or --image, --index, --serve)")
        return mode
    if args.library is not None and mode != "video_path":
        parser.error("--library is used with --video_path")
    if mode == "video_path" and len(queries) != 1:
        parser.error("--video_path needs one --query")
    if mode in ("batch_file", "demo") and queries:
        parser.error(f"--query is not used with --{mode}")
    if mode == "video_path":
        args.query = queries[0]
    return mode


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = _check_mode(parser, args)
    from modules.cli_support import check_config_file, check_dir, check_file, check_output_file, run_cli, \
        setup_logging

    setup_logging(args.verbose, args.quiet)

    def job() -> int:
        # cheap checks first: a typo is answered before torch is even imported
        if mode == "video_path":
            check_file(args.video_path, "video")
        elif mode == "batch_file":
            check_file(args.batch_file, "batch file")
        elif mode in ("embeddings_dir", "index", "serve"):
            check_dir(args.embeddings_dir, "embeddings directory")
        if args.image is not None:
            check_file(args.image, "image")
        check_output_file(args.output)
        check_config_file(args.config_path)
        jobs = {"video_path": run_single, "batch_file": run_batch, "embeddings_dir": run_search, "demo": run_demo,
                "index": run_index, "serve": run_serve}
        return jobs[mode](args)

    return run_cli(job)


def _model(args: argparse.Namespace):
    from unified_model import create_unified_model

    return create_unified_model(args.config_path, device=args.device, checkpoint=args.checkpoint,
                                clip_weights=args.clip_weights, merge_lora=True)


def _write_json(path: str, obj) -> None:
    from modules.atomic_io import save_json_atomic

    save_json_atomic(path, obj)
    print(f"Wrote {printable(path)}")


def run_single(args: argparse.Namespace) -> int:
    from modules.long_video import retrieve_moments, video_window
    from modules.retrieval import batch_retrieve_events, format_inference_block

    model = _model(args)
    seconds = model.config.window_seconds if args.window_seconds is None else args.window_seconds
    stride = model.config.window_stride if args.window_seconds is None else args.window_stride
    window = video_window(args.video_path, seconds, stride)
    if window is not None or args.library is not None:
        # the whole timeline: windows from the library, else decoded here in one pass
        result = retrieve_moments(model, args.video_path, args.query, args.top_k, window, args.library)
    else:
        result = batch_retrieve_events([{"video_path": args.video_path, "query": args.query}], top_k=args.top_k,
                                       model=model)[0]
    print(format_inference_block(result, args.top_k or model.config.top_k))
    if args.output:
        _write_json(args.output, [result])
    return 0 if result["status"] == "success" else 1


def run_batch(args: argparse.Namespace) -> int:
    from modules.retrieval import batch_retrieve_events, load_batch_file

    items = load_batch_file(args.batch_file)
    model = _model(args) if items else None
    results = batch_retrieve_events(
        items, top_k=args.top_k, model=model, num_workers=args.num_workers,
        base_dir=os.path.dirname(os.path.abspath(args.batch_file)), progress=not args.quiet,
    ) if items else []
    errors = sum(1 for r in results if r["status"] != "success")
    if args.output:
        for r in results:
            tag = "ok   " if r["status"] == "success" else "ERROR"
            detail = f"frames {r['frames']}" if r["status"] == "success" else r["error"]
            print(f"[{tag}] {printable(r['video_path'])} | '{printable(r['query'])}': {printable(detail)}")
        _write_json(args.output, results)
    else:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"{len(results)} pairs, {len(results) - errors} succeeded, {errors} failed", file=sys.stderr)
    return 1 if errors else 0


def run_search(args: argparse.Namespace) -> int:
    import logging

    from modules import library_cli

    if library_cli.has_library(args.embeddings_dir):  # text queries need no torch (modules.text_tower)
        searches = library_cli.run_library_search(args)
        for search in searches:
            print(library_cli.format_library_block(search))
    else:
        from modules.retrieval import format_search_block, search_embeddings

        library_cli.check_without_library(args)
        logging.getLogger("inference").warning(library_cli.no_library_hint(args.embeddings_dir))
        model = _model(args)
        searches = [search_embeddings(model, args.embeddings_dir, q, top_k=args.top_k) for q in args.query]
        for search in searches:
            print(format_search_block(search))
    if args.output:
        _write_json(args.output, searches[0] if len(searches) == 1 else searches)
    return 0


def run_index(args: argparse.Namespace) -> int:
    from modules import library_cli

    report = library_cli.run_index(args)
    print(f"Library {printable(report['library'])}: {report['videos']} videos ({report['added']} added with "
          f"{report['segments']} moments, {report['skipped']} already there, {report['failed']} unreadable"
          + (f", {report['other_model']} of another model left out" if report.get("other_model") else "") + ")")
    return 1 if report["failed"] else 0


def run_serve(args: argparse.Namespace) -> int:
    from modules import library_cli
    from modules.search_server import serve

    serve(args.embeddings_dir, host=args.host, port=args.port,
          encoder_factory=lambda library: library_cli.query_encoder(library, args))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Two synthetic videos -> directory extraction -> frame retrieval -> embedding search."""
    from modules.extraction import extract_directory_embeddings
    from modules.clip_weights import WeightsError, load_clip_weights
    from modules.module_clip import random_state_dict
    from modules.retrieval import batch_retrieve_events, format_inference_block, format_search_block, search_embeddings
    from modules.synthetic_video import MovingShape, write_moving_shapes_video
    from unified_model import create_unified_model, load_model_spec

    spec = load_model_spec(args.config_path, args.checkpoint, args.clip_weights)
    config = spec.config
    state = None
    if config.clip_weights != "random":
        try:  # real weights only if they are already here: the demo never downloads
            state = load_clip_weights(config.clip_weights or config.tempme.base_encoder, download=False)
            print(f"Demo: using CLIP weights {config.clip_weights or config.tempme.base_encoder}")
        except WeightsError as err:
            print(f"Demo: no CLIP weights available offline ({err}).")
            config = dataclasses.replace(config, clip_weights="random")
    if config.clip_weights == "random":
        print("Demo: using RANDOM CLIP weights: this shows the pipeline working, the matches are not meaningful. "
              "Run extraction or inference once without --demo to download the official weights "
              "(or pass --clip_weights PATH).")
        state = random_state_dict(config.tempme.base_encoder)
    spec = dataclasses.replace(spec, config=config)
    model = create_unified_model(spec=spec, device=args.device, clip_state_dict=state, merge_lora=True)

    with tempfile.TemporaryDirectory(prefix="unified_demo_") as tmp:
        def shown(text: str) -> str:  # the folder is deleted at the end: name files relative to it
            return text.replace(tmp + os.sep, "").replace(tmp, "the demo folder")

        print("Demo: working in a temporary folder (deleted when the demo ends)")
        videos = os.path.join(tmp, "videos")
        os.makedirs(videos)
        shapes = {
            "red_circle_left_to_right.mp4": MovingShape("circle", (220, 30, 30), start=(0.15, 0.5), end=(0.85, 0.5), radius=0.2),
            "blue_square_moving_up.mp4": MovingShape("square", (30, 60, 220), start=(0.5, 0.8), end=(0.5, 0.2), radius=0.18),
        }
        for name, shape in shapes.items():
            write_moving_shapes_video(os.path.join(videos, name), 45, fps=15, size=(160, 120), shapes=[shape])
        print(f"Demo: wrote {len(shapes)} videos (3 s, 160x120, 15 fps) to {shown(videos)}/")

        embeddings = os.path.join(tmp, "embeddings")
        extracted = extract_directory_embeddings(videos, embeddings, save_format="both", consolidated=True,
                                                 model=model, num_workers=0, progress=False)
        print(f"Demo: extracted {extracted['processed']} video embeddings to {shown(embeddings)}/ "
              f"({extracted['failed']} failed)")

        video = os.path.join(videos, "red_circle_left_to_right.mp4")
        result = batch_retrieve_events([{"video_path": video, "query": DEMO_QUERY}], top_k=args.top_k, model=model)[0]
        print(shown(format_inference_block(result, args.top_k or model.config.top_k)))
        search = search_embeddings(model, embeddings, DEMO_QUERY, top_k=args.top_k)
        print(shown(format_search_block(search)))
        if args.output:
            _write_json(args.output, {"retrieval": result, "search": search})
    ok = result["status"] == "success" and extracted["failed"] == 0
    print("\nDemo finished: " + ("every stage ran." if ok else "some stage failed (see above)."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
