"""``inference.py --embeddings_dir`` on a video library: search, --index, --serve.

- :func:`run_library_search`: several ``--query`` (and ``--image``) against the library,
  one model load for all of them; videos or ``--moments``. Without a library it falls back
  to the per-file scan of :func:`modules.retrieval.search_embeddings`, with a hint.
- :func:`run_index`: build or extend the library from the folder's per-video files.
- :func:`query_encoder`: the model for text / image queries: the library's own (its
  fingerprint) unless model flags are given, which must then name the same model.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional

from modules.cli_support import UsageError
from modules.errors import printable

__all__ = ["format_moment_line", "format_library_block", "query_encoder", "run_index", "run_library_search",
           "cli_fingerprint", "has_library"]

logger = logging.getLogger(__name__)

RULE = "=" * 50


def has_library(embeddings_dir: str) -> bool:
    from modules.library import MANIFEST, library_path

    return os.path.isfile(os.path.join(library_path(embeddings_dir), MANIFEST)) or \
        os.path.isfile(os.path.join(embeddings_dir, MANIFEST))


def _model_flags_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("config_path", "checkpoint", "clip_weights"))


def cli_fingerprint(config_path: Optional[str], checkpoint: Optional[str], clip_weights: Optional[str]) -> Dict[str, Any]:
    """The fingerprint of the model these flags build, as extraction records it (model_info)."""
    from unified_model import join_fingerprint, load_model_spec, spec_fingerprint

    spec = load_model_spec(config_path, checkpoint, clip_weights)
    config = spec.config
    parts = spec_fingerprint(spec)
    return {"config_path": config_path, "checkpoint": checkpoint, "clip_weights": config.clip_weights,
            "config": config.to_dict(), "fingerprint": join_fingerprint(parts), "fingerprint_parts": parts}


def query_encoder(library, args: argparse.Namespace):
    """The library's model (built once), or the flags' model when they name the same one."""
    from modules.library_query import encoder_for

    fingerprint = library.fingerprint
    if _model_flags_given(args):
        fingerprint = cli_fingerprint(args.config_path, args.checkpoint, args.clip_weights)
        library.check_fingerprint(fingerprint)
    return encoder_for(fingerprint, device=getattr(args, "device", "auto"), folder=library.root)


def format_moment_line(hit: Dict[str, Any]) -> str:
    """``video  12.4-18.0 s  frame 311  0.287`` (the name escaped: one line whatever it holds)."""
    return f"{printable(hit['name'])}  {hit['start_time']:.1f}-{hit['end_time']:.1f} s  frame {hit['frame']}  {hit['score']:.3f}"


def format_library_block(search: Dict[str, Any]) -> str:
    lines = ["", "SEARCH RESULTS", RULE,
             f"Library: {printable(search['library'])} ({search['num_videos']} videos, {search['num_segments']} moments)",
             f"Query: {search['query']!r}" if search.get("image") is None else f"Image: {printable(search['image'])}",
             f"Top {len(search['results'])} {'moments' if search['moments'] else 'videos'}:"]
    for hit in search["results"]:
        if search["moments"]:
            lines.append("  " + format_moment_line(hit))
        else:
            lines.append(f"  {hit['rank']}. {hit['score']:.4f}  {printable(hit['name'])}  ({printable(hit['video_path'])})")
    lines.append(f"Search time: {search['search_time']:.3f}s")
    return "\n".join(lines)


def run_library_search(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every --query / --image of ``args`` against the library in ``args.embeddings_dir``."""
    from modules.library import VideoLibrary

    library = VideoLibrary.open(args.embeddings_dir, encoder_factory=lambda _fp: query_encoder(library, args))
    top_k = args.top_k if args.top_k is not None else 5
    requests = [("query", q) for q in (args.query or [])] + ([("image", args.image)] if args.image else [])
    if requests:  # what the queries need loads once, before the clock of the first search starts
        library.encoder().load(text=bool(args.query), image=bool(args.image))
    searches = []
    for kind, value in requests:
        start = time.perf_counter()
        if kind == "image":
            results = library.search(None, top_k=top_k, moments=args.moments, image=value)
        else:
            results = library.search(value, top_k=top_k, moments=args.moments)
        searches.append({"query": value if kind == "query" else None, "image": value if kind == "image" else None,
                         "library": library.root, "embeddings_dir": args.embeddings_dir, "source": "library",
                         "num_videos": len(library), "num_segments": library.num_segments,
                         "moments": bool(args.moments), "results": results,
                         "search_time": round(time.perf_counter() - start, 4)})
    return searches


def run_index(args: argparse.Namespace) -> Dict[str, Any]:
    """Build or extend the library of ``args.embeddings_dir`` from its per-video files."""
    from modules.library_builder import index_extraction_folder

    fingerprint = cli_fingerprint(args.config_path, args.checkpoint, args.clip_weights) if _model_flags_given(args) else None
    return index_extraction_folder(args.embeddings_dir, fingerprint=fingerprint)


def no_library_hint(embeddings_dir: str) -> str:
    return (f"{embeddings_dir} has no video library: searching the per-video files one by one (slow on large "
            f"folders, no --moments). Run `inference.py --embeddings_dir {embeddings_dir} --index` once "
            "(or extract with --index) for indexed search")


def check_without_library(args: argparse.Namespace) -> None:
    if args.moments or args.image:
        flag = "--moments" if args.moments else "--image"
        raise UsageError(f"{flag} needs a video library in {args.embeddings_dir}: run "
                         f"`inference.py --embeddings_dir {args.embeddings_dir} --index` first")
