"""Query-to-frame retrieval and embedding search: the library behind ``inference.py``.

- :func:`batch_retrieve_events`: many (video, query) pairs -> one result dict each, with
  ``status`` "success" or "error" (a bad pair never stops the others). Each video is
  decoded and encoded once however many queries ask about it; decoding can run in worker
  processes (``num_workers``), overlapping the model.
- :func:`search_embeddings`: rank the videos of an extracted embeddings folder by cosine
  similarity with a text query.
- :func:`format_inference_block` / :func:`format_search_block`: the printed reports.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from modules.cli_support import UsageError
from modules.decode_pool import decode_stream
from modules.forward_lanes import NON_FINITE_ERROR, degenerate_rows, model_error
from modules.errors import one_line, printable
from modules.json_input import MAX_FOLDER_JSON_BYTES, JSONInputError, read_json_file, read_output_json
from modules.video_sampler import normalize_uint8
from modules.writers import CONSOLIDATED_INDEX, CONSOLIDATED_NPY, read_embedding_file, read_meta

__all__ = [
    "batch_retrieve_events",
    "check_same_model",
    "load_batch_file",
    "load_embedding_index",
    "search_embeddings",
    "format_inference_block",
    "format_search_block",
]

logger = logging.getLogger(__name__)

RULE = "=" * 50
#: queries per text forward in batch retrieval: activation memory stays flat however many
#: queries ask about one video (one forward of 10k queries peaked at 12.4 GB)
TEXT_CHUNK = 256


# ----------------------------------------------------------------------------- batch retrieval


def _result(video_path: Any, query: Any, status: str = "success", error: Optional[str] = None) -> Dict[str, Any]:
    return {"video_path": video_path, "query": query, "frames": [], "scores": [], "segments": [],
            "inference_time": 0.0, "status": status, "error": error}


def batch_retrieve_events(
    video_queries: Sequence[Dict[str, Any]],
    config_path: Optional[Union[str, os.PathLike]] = None,
    top_k: Optional[int] = None,
    device: str = "auto",
    *,
    model=None,
    clip_weights: Optional[str] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    num_workers: int = 0,
    base_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """Retrieve the frames matching each query in its video.

    Args:
        video_queries: items ``{"video_path": str, "query": str}`` (optionally
            ``"top_k": int``). Malformed items become error results.
        config_path, device, clip_weights, checkpoint: how to build the model (ignored
            when ``model`` is given).
        top_k: frames per query (default: the config's top_k).
        num_workers: decode processes (0 = decode in this process).
        base_dir: folder that relative video paths are resolved against (default: the
            current directory; ``inference.py --batch_file`` passes the batch file's folder).
        progress: show a tqdm bar over the videos.

    Returns:
        One dict per input item, in input order: video_path, query, frames (original frame
        numbers, best first), scores (cosine similarities), segments (per frame: frame,
        score, start_frame, end_frame, start_time, end_time, timestamp), inference_time
        (seconds for this pair; a video's decode and encode are shared equally among the
        queries about it), status ("success" | "error"), error (None or one line).
    """
    from tqdm import tqdm

    from unified_model import create_unified_model, rank_hits

    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    results: List[Dict[str, Any]] = []
    by_video: "OrderedDict[str, List[int]]" = OrderedDict()
    for i, item in enumerate(video_queries):
        problem = _item_problem(item)
        if problem is not None:
            vp = item.get("video_path") if isinstance(item, dict) else None
            q = item.get("query") if isinstance(item, dict) else None
            results.append(_result(vp, q, "error", problem))
            continue
        results.append(_result(item["video_path"], item["query"]))
        path = item["video_path"]
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(base_dir), path)
        by_video.setdefault(path, []).append(i)
    if not by_video:
        return results
    if model is None:
        model = create_unified_model(config_path, device=device, checkpoint=checkpoint, clip_weights=clip_weights,
                                     merge_lora=True)
    default_k = model.config.top_k if top_k is None else top_k
    stream = decode_stream(by_video, model.config, num_workers)
    bar = tqdm(total=len(by_video), unit="video", desc="retrieving", disable=not progress)
    try:
        for (path, *_), decoded in stream:
            indices = by_video[path]
            start = time.perf_counter()
            if not decoded.ok:
                for i in indices:
                    results[i].update(status="error", error=f"{path}: {decoded.error}",
                                      inference_time=round(decoded.seconds / len(indices), 4))
                bar.update(1)
                continue
            try:
                with torch.inference_mode():
                    features = model.encode_videos(normalize_uint8(decoded.frames).unsqueeze(0))
                    texts = torch.cat([model.encode_text([str(video_queries[i]["query"]) for i in chunk])
                                       for chunk in _chunks(indices, TEXT_CHUNK)])
                    scores = texts @ features.frame_features[0].T  # (Q, F)
            except Exception as err:  # noqa: BLE001 - one bad video must not stop the batch
                message = model_error(err)
                for i in indices:
                    results[i].update(status="error", error=f"{path}: {message}")
                bar.update(1)
                continue
            shared = (decoded.seconds + time.perf_counter() - start) / len(indices)
            reps = features.representatives[0].cpu()
            bad = (degenerate_rows(texts) | ~torch.isfinite(scores).all(dim=1).numpy()
                   | degenerate_rows(features.video_embeddings).any())
            for row, i in enumerate(indices):
                if bad[row]:  # NaN scores (or a zero text vector) are no ranking: never a result
                    results[i].update(status="error", error=f"{path}: {NON_FINITE_ERROR}")
                    continue
                t0 = time.perf_counter()
                k = video_queries[i].get("top_k", default_k)
                hits = rank_hits(scores[row].cpu(), features.groups[0], reps, decoded.video, k)
                results[i].update(
                    frames=[h.frame for h in hits],
                    scores=[round(h.score, 6) for h in hits],
                    segments=[{**h.to_dict(), "score": round(h.score, 6)} for h in hits],
                    inference_time=round(shared + time.perf_counter() - t0, 4),
                )
                if decoded.video.warning:
                    results[i]["warning"] = decoded.video.warning
            bar.update(1)
    finally:
        stream.close()
        bar.close()
    return results


def _chunks(items: Sequence[int], size: int) -> List[Sequence[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _item_problem(item: Any) -> Optional[str]:
    if not isinstance(item, dict):
        return f"expected an object with video_path and query, got {type(item).__name__}"
    for key in ("video_path", "query"):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key!r} must be a string, got {type(value).__name__} {value!r}"
        if value is None or not value.strip():
            return f"missing or empty {key!r}"
    try:
        item["query"].encode("utf-8")
    except UnicodeEncodeError as err:  # e.g. "\ud800" in the batch file: no text to encode
        return f"query is not valid Unicode text (lone surrogate {item['query'][err.start]!r} at {err.start})"
    k = item.get("top_k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        return f"top_k must be a positive integer, got {k!r}"
    return None


def load_batch_file(path: Union[str, os.PathLike]) -> List[Any]:
    """A batch file: a JSON list of {"video_path", "query"} objects (or {"queries": [...]}),
    read as hostile data (``modules.json_input``); problems are one-line UsageErrors."""
    path = os.fspath(path)
    try:
        data = read_json_file(path, "batch file")
    except JSONInputError as err:
        raise UsageError(str(err)) from None
    if isinstance(data, dict) and isinstance(data.get("queries"), list):
        data = data["queries"]
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of {{\"video_path\": ..., \"query\": ...}} objects")
    return data


# ----------------------------------------------------------------------------- embedding search


def _per_video_files(root: str) -> Dict[str, Dict[str, str]]:
    """name -> {"npy": file, "json": file} for every per-video embedding file below ``root``."""
    found: Dict[str, Dict[str, str]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in files:
            for kind in ("npy", "json"):
                suffix = f"_embedding.{kind}"
                if fname.endswith(suffix) and not fname.startswith("."):
                    name = os.path.relpath(os.path.join(folder, fname[: -len(suffix)]), root).replace(os.sep, "/")
                    found.setdefault(name, {})[kind] = os.path.join(folder, fname)
    return found


def _load_consolidated(root: str, index_path: str, matrix_path: str, found: Dict[str, Dict[str, str]]):
    rerun = "rerun extract_video_embeddings.py with --consolidated to rebuild it"
    try:
        index = read_output_json(index_path, "consolidated index", MAX_FOLDER_JSON_BYTES)
        if not isinstance(index, dict):
            raise ValueError(f"{index_path}: not a JSON object")
        with open(matrix_path, "rb") as fh:
            data = fh.read()
        matrix = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"{index_path}: cannot read the consolidated embeddings ({one_line(err)}); "
                         "rerun extract_video_embeddings.py with --consolidated") from None
    names = index.get("names", [])
    paths = index.get("video_paths", [None] * len(names)) if isinstance(names, list) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(paths, list)
            and len(paths) == len(names) and all(p is None or isinstance(p, str) for p in paths)
            and isinstance(index.get("model", {}), dict)):
        raise UsageError(f"{index_path}: not a consolidated index (names / video_paths / model malformed); {rerun}")
    if matrix.ndim != 2 or len(names) != matrix.shape[0]:
        raise UsageError(f"{matrix_path}: {matrix.shape} rows do not match the {len(names)} names in {index_path}; {rerun}")
    expected = index.get("matrix_sha256")
    if expected is not None and hashlib.sha256(matrix.astype("<f4", copy=False).tobytes()).hexdigest() != expected:
        raise UsageError(f"{matrix_path} is not the matrix {index_path} describes (an interrupted run?); {rerun}")
    index_time = os.stat(index_path).st_mtime_ns
    indexed = set(names)
    newer = [n for n, files in found.items() if n not in indexed
             or any(os.stat(p).st_mtime_ns > index_time for p in files.values())]
    if newer:
        raise UsageError(f"{index_path} is older than {len(newer)} per-video embedding files (e.g. {newer[0]!r}: "
                         f"videos extracted without --consolidated); {rerun}")
    return names, paths, matrix.astype(np.float32, copy=False), f"{CONSOLIDATED_NPY} + {CONSOLIDATED_INDEX}", index.get("model", {})


def load_embedding_index(embeddings_dir: Union[str, os.PathLike]) -> Tuple[List[str], List[Optional[str]], np.ndarray, str, Dict[str, Any]]:
    """Embeddings written by extract_video_embeddings.py.

    Uses ``embeddings.npy`` + ``embeddings_index.json`` (written by ``--consolidated``)
    when present, otherwise every ``*_embedding.npy`` / ``*_embedding.json`` below the folder
    (unreadable ones are skipped with a warning).

    Returns:
        (names, video_paths (None where unknown), matrix (M, D) float32, source description,
        model info recorded at extraction time ({"fingerprint": ...} for per-video files),
        or {}).

    Raises:
        UsageError: no embeddings; a consolidated index older than the per-video files or
        not matching its matrix; per-video embeddings of several models.
    """
    root = os.fspath(embeddings_dir)
    if not os.path.isdir(root):
        raise UsageError(f"embeddings directory not found: {root}")
    found = _per_video_files(root)
    index_path = os.path.join(root, CONSOLIDATED_INDEX)
    matrix_path = os.path.join(root, CONSOLIDATED_NPY)
    if os.path.isfile(index_path) and os.path.isfile(matrix_path):
        return _load_consolidated(root, index_path, matrix_path, found)
    names, paths, rows, fingerprints = [], [], [], set()
    for name in sorted(found):
        files = found[name]
        try:
            vector = read_embedding_file(files.get("npy") or files["json"])
            data = read_output_json(files["json"], "embedding file") if "json" in files else {}
        except (OSError, ValueError) as err:
            logger.warning("%s: unreadable embedding file skipped (%s)", name, err)
            continue
        meta = read_meta(root, name)
        if meta is not None and meta.get("fingerprint"):
            fingerprints.add(meta["fingerprint"])
        names.append(name)
        paths.append(data.get("video_path") if isinstance(data, dict) else (meta or {}).get("video_path"))
        rows.append(vector)
    if not rows:
        raise UsageError(f"no embeddings in {root} (expected *_embedding.npy / *_embedding.json or {CONSOLIDATED_NPY})")
    dims = {r.shape[0] for r in rows}
    if len(dims) != 1:
        raise UsageError(f"{root}: embeddings of different sizes {sorted(dims)}")
    if len(fingerprints) > 1:
        raise UsageError(f"{root}: the embeddings mix {len(fingerprints)} models; re-extract the folder with one "
                         "model (extract_video_embeddings.py --overwrite)")
    info = {"fingerprint": fingerprints.pop()} if fingerprints else {}
    return names, paths, np.stack(rows), "per-video files", info


def search_embeddings(model, embeddings_dir: Union[str, os.PathLike], query: str, top_k: Optional[int] = None) -> Dict[str, Any]:
    """Rank the videos of an extracted folder by cosine similarity with ``query``.

    Returns {"query", "embeddings_dir", "source", "num_videos", "results": [{rank, name,
    video_path, score}], "search_time"}.
    """
    start = time.perf_counter()
    names, paths, matrix, source, info = load_embedding_index(embeddings_dir)
    k = model.config.top_k if top_k is None else top_k
    if k < 1:
        raise UsageError(f"top_k must be >= 1, got {k}")
    with torch.inference_mode():
        text = model.encode_text([query])[0].float().cpu().numpy()
    if degenerate_rows(text[None]).any():
        raise UsageError(f"the text embedding of {query!r} is non-finite (NaN or inf) or zero: the model's "
                         "checkpoint or weights hold non-finite or huge numbers")
    if matrix.shape[1] != text.shape[0]:
        raise UsageError(f"{embeddings_dir}: embeddings have {matrix.shape[1]} dimensions, "
                         f"the model's text embeddings {text.shape[0]}: extracted with another model")
    check_same_model(info, model, embeddings_dir)
    norms = np.linalg.norm(matrix, axis=1)
    scores = (matrix @ text) / np.maximum(norms, 1e-12)
    finite = np.isfinite(scores)
    if not finite.all():
        logger.warning("%s: %d videos with non-finite embeddings left out of the ranking (re-extract them)",
                       embeddings_dir, int((~finite).sum()))
    ranked = np.flatnonzero(finite)
    order = ranked[np.argsort(-scores[ranked], kind="stable")][:k]
    return {
        "query": query,
        "embeddings_dir": os.fspath(embeddings_dir),
        "source": source,
        "num_videos": len(names),
        "results": [{"rank": r + 1, "name": names[i], "video_path": paths[i], "score": round(float(scores[i]), 6)}
                    for r, i in enumerate(order)],
        "search_time": round(time.perf_counter() - start, 4),
    }


#: what to pass when a fingerprint part differs
_PART_FLAGS = {"weights": "--clip_weights", "checkpoint": "--checkpoint", "config": "--config_path"}
#: the model-info key that recorded what extraction passed for each part
_RECORDED = {"weights": "clip_weights", "checkpoint": "checkpoint", "config": "config_path"}


def check_same_model(info: Dict[str, Any], model, embeddings_dir) -> None:
    """Embeddings and text must come from the same model (fingerprint): refuse otherwise,
    naming what differs and what to pass."""
    recorded = info.get("fingerprint")
    if recorded is None:  # written before fingerprints were recorded: compare what is known
        here = {"clip_weights": model.config.clip_weights, "config": model.config.to_dict()}
        for key in ("clip_weights", "config"):
            if key in info and info[key] != here[key]:
                logger.warning("%s was extracted with a different %s than this model uses; scores may be "
                               "meaningless", embeddings_dir, key)
                return
        return
    if recorded == model.fingerprint:
        return
    parts = info.get("fingerprint_parts") or {}
    ours = model.fingerprint_parts
    differ = [k for k in ("weights", "checkpoint", "config") if k in parts and parts[k] != ours.get(k)]
    what = " and ".join(f"the {k}" for k in differ) or "the model"
    used = ", ".join(f"{_PART_FLAGS[k]} {info.get(_RECORDED[k])}" for k in differ)
    raise UsageError(f"{embeddings_dir} was extracted with another model ({what} differ"
                     + (f"; extraction used {used}" if used else "") + "): pass the same "
                     "--checkpoint / --clip_weights / --config_path as the extraction, or re-extract")


# ----------------------------------------------------------------------------- reports


def format_inference_block(result: Dict[str, Any], top_k: Optional[int] = None) -> str:
    """The INFERENCE RESULTS report of one (video, query) result.

    top_k: the number of frames asked for; when the video has fewer frame groups the
    report says that only those exist. Paths, queries and errors are printed escaped
    (``errors.printable``): a newline or ESC in a file name stays on its line.
    """
    lines = [
        "",
        "INFERENCE RESULTS",
        RULE,
        f"Video: {printable(result['video_path'])}",
        f"Query: '{printable(result['query'])}'",
    ]
    if result["status"] != "success":
        lines.append(f"Error: {printable(one_line(result['error']))}")
        return "\n".join(lines)
    lines += [
        f"Relevant frames: {result['frames']}",
        f"Number of frames: {len(result['frames'])}" + (
            f" (only {len(result['frames'])} frame groups exist; {top_k} asked for)"
            if top_k is not None and len(result["frames"]) < top_k else ""),
        f"Inference time: {result['inference_time']:.2f}s",
        "Time spans (best first):",
    ]
    for rank, seg in enumerate(result["segments"], 1):
        lines.append(
            f"  {rank}. frame {seg['frame']} at {seg['timestamp']:.2f}s: "
            f"{seg['start_time']:.2f}s-{seg['end_time']:.2f}s (frames {seg['start_frame']}-{seg['end_frame']}), "
            f"score {seg['score']:.4f}"
            + (f" [window {seg['window']}: {seg['window_start']:.1f}s-{seg['window_end']:.1f}s, group {seg['group']}]"
               if "window" in seg else "")
        )
    return "\n".join(lines)


def format_search_block(search: Dict[str, Any]) -> str:
    """The SEARCH RESULTS report of :func:`search_embeddings` (names and paths escaped)."""
    lines = [
        "",
        "SEARCH RESULTS",
        RULE,
        f"Embeddings: {printable(search['embeddings_dir'])} ({search['num_videos']} videos, from {search['source']})",
        f"Query: '{printable(search['query'])}'",
        f"Top {len(search['results'])} videos:",
    ]
    for hit in search["results"]:
        where = f"  ({printable(hit['video_path'])})" if hit["video_path"] else ""
        lines.append(f"  {hit['rank']}. {hit['score']:.4f}  {printable(hit['name'])}{where}")
    lines.append(f"Search time: {search['search_time']:.2f}s")
    return "\n".join(lines)
