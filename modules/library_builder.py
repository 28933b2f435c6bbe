"""Build or extend a video library from an extraction output folder.

Reads what ``extract_video_embeddings.py`` writes per video: ``<name>_embedding.npy`` (or
``.json``) and, when ``--save_frame_features`` was on, ``<name>_frames.npz`` (group
features with original frame numbers and seconds), plus the model recorded in
``embeddings_index.json`` / ``extraction_summary.json``. Videos already in the library (by
name) are skipped, so a rerun after adding ten videos reads and writes only those ten;
re-extracted videos reach the library through the extraction's writer (LibraryWriter).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from modules.cli_support import UsageError
from modules.json_input import MAX_FOLDER_JSON_BYTES, read_output_json
from modules.library import LibraryError, VideoLibrary, fingerprint_id, library_path

__all__ = ["segments_from_frames_npz", "video_metadata", "scan_extraction_folder", "index_extraction_folder",
           "recorded_model"]

logger = logging.getLogger(__name__)

_EMBEDDING_SUFFIXES = ("_embedding.npy", "_embedding.json")
BATCH_VIDEOS = 4096


def segments_from_frames_npz(payload: Mapping[str, np.ndarray], video: int = 0,
                             window_index: int = 0) -> Tuple[List[Dict[str, Any]], np.ndarray]:
    """A ``<name>_frames.npz`` payload -> (segment rows for ``add``, (F, D) features).

    A windowed video's payload (``long_video.frames_payload_from_table``) carries per group
    ``window_index``, ``window_starts``, ``window_ends``; those fill the window fields.
    """
    features = np.asarray(payload["frame_features"], dtype=np.float32)
    sizes = np.asarray(payload["group_sizes"], dtype=np.int64)
    sampled = np.asarray(payload["sampled_frame_indices"], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])  # groups are contiguous runs of sampled frames
    starts, ends = np.asarray(payload["start_times"], float), np.asarray(payload["end_times"], float)
    windows = payload.get("window_index")
    first_of_window = {}
    if windows is not None:
        for g, w in enumerate(np.asarray(windows).tolist()):
            first_of_window.setdefault(w, g)
    rows = []
    for g in range(len(features)):
        in_window = windows is not None
        rows.append({
            "video": video, "window_index": int(windows[g]) if in_window else window_index,
            "group_index": g - first_of_window[int(windows[g])] if in_window else g,
            "window_start": float(payload["window_starts"][g]) if in_window else
            (float(starts.min()) if len(starts) else 0.0),
            "window_end": float(payload["window_ends"][g]) if in_window else (float(ends.max()) if len(ends) else 0.0),
            "start_time": float(starts[g]), "end_time": float(ends[g]),
            "frame": int(payload["frame_indices"][g]), "timestamp": float(payload["timestamps"][g]),
            "start_frame": int(payload["start_frames"][g]), "end_frame": int(payload["end_frames"][g]),
            "members": sampled[bounds[g]:bounds[g + 1]].tolist(),
        })
    return rows, features


def video_metadata(path: str) -> Dict[str, Any]:
    """size, mtime, duration, fps, num_frames of a video file (unknown fields left out)."""
    meta: Dict[str, Any] = {}
    try:
        st = os.stat(path)
        meta.update(size=int(st.st_size), mtime=float(st.st_mtime))
    except OSError:
        return meta
    try:
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.average_rate:
                meta["fps"] = float(stream.average_rate)
            if stream.frames:
                meta["num_frames"] = int(stream.frames)
            if stream.duration is not None and stream.time_base is not None:
                meta["duration"] = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                meta["duration"] = container.duration / 1_000_000
    except Exception as err:  # noqa: BLE001 - metadata is a nicety; the embedding is what counts
        logger.debug("%s: no metadata (%s)", path, err)
    return meta


def recorded_model(output_dir: str) -> Optional[Dict[str, Any]]:
    """The model info extraction recorded in the folder, or None.

    From the consolidated index or the summary when there is one, else from the model
    record (``.<fingerprint>.model.json``) of the one model the per-video records name;
    a folder whose videos name several models raises LibraryError.
    """
    for fname in ("embeddings_index.json", "extraction_summary.json"):
        path = os.path.join(output_dir, fname)
        if os.path.isfile(path):
            try:
                info = read_output_json(path, fname, MAX_FOLDER_JSON_BYTES).get("model")
            except (ValueError, AttributeError):
                continue
            if info:
                return info
    from modules.writers import read_meta, read_model_record

    fingerprints = sorted({f for f in (meta_fingerprint(read_meta(output_dir, name))
                                       for name, _ in scan_extraction_folder(output_dir)) if f})
    if len(fingerprints) > 1:
        raise LibraryError(f"{output_dir} holds embeddings of {len(fingerprints)} models "
                           f"({', '.join(fingerprints)}): pass the --config_path / --checkpoint / "
                           "--clip_weights of the one to index")
    return read_model_record(output_dir, fingerprints[0]) if fingerprints else None


def meta_fingerprint(meta: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The model fingerprint a video's ``.meta.json`` record names, or None."""
    value = meta.get("fingerprint") if meta else None
    return value if isinstance(value, str) else None


def scan_extraction_folder(output_dir: str) -> Iterator[Tuple[str, str]]:
    """(name, embedding file) for every per-video embedding below ``output_dir``, sorted."""
    found: Dict[str, str] = {}
    skip = os.path.abspath(library_path(output_dir))
    for folder, dirs, files in os.walk(output_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.abspath(os.path.join(folder, d)) != skip)
        for fname in files:
            for suffix in _EMBEDDING_SUFFIXES:
                if fname.endswith(suffix) and not fname.startswith("."):
                    name = os.path.relpath(os.path.join(folder, fname[: -len(suffix)]), output_dir).replace(os.sep, "/")
                    if name not in found or suffix.endswith(".npy"):
                        found[name] = os.path.join(folder, fname)
    yield from sorted(found.items())


def _json_object(path: str) -> Dict[str, Any]:
    """A per-video ``*_embedding.json`` file's object; ValueError naming the file otherwise."""
    data = read_output_json(path, "embedding file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: embedding file is not a JSON object")
    return data


def _read_video(output_dir: str, name: str, embedding_file: str,
                meta: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Any], np.ndarray, Optional[dict]]:
    """The video's row, embedding and frames payload; ``meta``: its ``.meta.json`` record."""
    video_path = None
    if embedding_file.endswith(".npy"):
        embedding = np.load(embedding_file, allow_pickle=False)
        json_file = embedding_file[: -len(".npy")] + ".json"
        if os.path.isfile(json_file):
            video_path = _json_object(json_file).get("video_path")
    else:
        data = _json_object(embedding_file)
        embedding, video_path = np.asarray(data["embedding"], dtype=np.float32), data.get("video_path")
    frames_file = os.path.join(output_dir, name + "_frames.npz")
    windows_file = os.path.join(output_dir, name + "_windows.npz")  # long_video.WINDOWS_SUFFIX
    payload = None
    if os.path.isfile(frames_file):
        with np.load(frames_file, allow_pickle=False) as npz:
            payload = {k: npz[k] for k in npz.files}
    elif os.path.isfile(windows_file):  # a long video's window table: its groups are the segments
        from modules.long_video import WindowTable, frames_payload_from_table  # torch only when needed

        with np.load(windows_file, allow_pickle=False) as npz:
            payload = frames_payload_from_table(WindowTable.from_arrays({k: npz[k] for k in npz.files}))
    if payload is not None:
        video_path = video_path or str(payload["video_path"])
    if video_path is None and meta and isinstance(meta.get("video_path"), str):
        video_path = meta["video_path"]  # a .npy-only run: the record names the source
    if video_path is None:
        raise ValueError("no video path recorded (write .json or frames files with the embedding)")
    embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if not np.isfinite(embedding).all():
        raise ValueError("non-finite embedding")
    return {"name": name, "video_path": video_path}, embedding, payload


def index_extraction_folder(output_dir: str, fingerprint: Optional[Mapping[str, Any]] = None,
                            library_dir: Optional[str] = None, with_metadata: bool = True) -> Dict[str, Any]:
    """Create or extend ``output_dir``'s library from its per-video files.

    ``fingerprint`` is the model that made them (default: the one the folder records).
    Names already in the library are skipped.
    Videos whose ``.meta.json`` names another model are left out (counted in "other_model").
    Returns {"library", "added", "skipped", "failed", "segments", "other_model", "videos"}.
    """
    from modules.writers import read_meta

    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        raise UsageError(f"embeddings directory not found: {output_dir}")
    root = library_dir or library_path(output_dir)
    if fingerprint is None:
        fingerprint = recorded_model(output_dir)
    if fingerprint is None:
        raise LibraryError(f"{output_dir} records no model (no embeddings_index.json / extraction_summary.json): "
                           "pass the extraction's --config_path / --checkpoint / --clip_weights")
    library = None
    known: Dict[str, int] = {}
    if os.path.isfile(os.path.join(root, "manifest.json")):
        library = VideoLibrary.open(root)
        library.check_fingerprint(fingerprint)
        known = library.names()
    added = skipped = failed = segments = other_model = 0
    batch: List[Tuple[Dict[str, Any], np.ndarray, Optional[dict]]] = []

    def flush() -> None:
        nonlocal library, segments
        if not batch:
            return
        if library is None:
            library = VideoLibrary.create(root, fingerprint, batch[0][1].shape[0])
        rows, seg_rows, seg_feats = [], [], []
        for i, (video, _, payload) in enumerate(batch):
            rows.append(video)
            if payload is not None:
                seg, feats = segments_from_frames_npz(payload, video=i)
                seg_rows.extend(seg)
                seg_feats.append(feats)
        matrix = np.stack([e for _, e, _ in batch])
        features = np.concatenate(seg_feats) if seg_feats else None
        library.add(rows, matrix, seg_rows, features, fingerprint=fingerprint)
        segments += len(seg_rows)
        batch.clear()

    for name, embedding_file in scan_extraction_folder(output_dir):
        if name in known:
            skipped += 1
            continue
        meta = read_meta(output_dir, name)
        made_by = meta_fingerprint(meta)
        if made_by is not None and made_by != fingerprint_id(fingerprint):
            logger.warning("%s: not indexed (made by another model, fingerprint %s; this library's is %s)",
                           embedding_file, made_by, fingerprint_id(fingerprint))
            other_model += 1
            continue
        try:
            video, embedding, payload = _read_video(output_dir, name, embedding_file, meta)
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("%s: not indexed (%s)", embedding_file, err)
            failed += 1
            continue
        if with_metadata:
            video.update(video_metadata(video["video_path"]))
        if payload is not None and "duration" not in video and len(payload["end_times"]):
            video["duration"] = float(np.max(payload["end_times"]))
        batch.append((video, embedding, payload))
        added += 1
        if len(batch) >= BATCH_VIDEOS:
            flush()
    flush()
    if library is None:
        raise LibraryError(f"no embeddings to index in {output_dir} (expected *_embedding.npy / *_embedding.json)")
    return {"library": root, "added": added, "skipped": skipped, "failed": failed, "segments": segments,
            "other_model": other_model, "videos": len(library)}
