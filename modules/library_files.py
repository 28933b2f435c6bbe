"""The files of a video library: table schemas, the shard writer and the manifest writer.

A shard is three files written one by one to temporary names and renamed into place
(Parquet rows, the .npy matrix, the FAISS index); the manifest is written last, synced to
disk, and renamed over the old one: that rename is the moment an update takes effect.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping

import numpy as np

from modules.cli_support import UsageError
from modules.library_index import IndexInfo, build_index, load_faiss

__all__ = ["MANIFEST", "ROW_GROUP_ROWS", "LibraryError", "video_schema", "segment_schema", "SCHEMAS", "VIDEO_DEFAULTS",
           "SEGMENT_DEFAULTS", "check_matrix", "segment_row", "write_shard", "write_manifest"]

MANIFEST = "manifest.json"
#: Parquet row group size: a search reads the few groups holding its hits
ROW_GROUP_ROWS = 4096


class LibraryError(UsageError):
    """A library that cannot be opened or updated as asked (exit code 2 in the scripts)."""


def video_schema():
    """One row per video."""
    import pyarrow as pa

    return pa.schema([
        ("name", pa.string()),          # output name (unique in the library)
        ("video_path", pa.string()),    # absolute path
        ("given_path", pa.string()),    # the path as listed / given
        ("size", pa.int64()),           # bytes, -1 unknown
        ("mtime", pa.float64()),        # seconds since the epoch, NaN unknown
        ("duration", pa.float64()),     # seconds
        ("fps", pa.float64()),
        ("num_frames", pa.int64()),
        ("status", pa.string()),        # "success" (rows are written for embedded videos)
        ("fingerprint", pa.string()),   # fingerprint_id of the model
    ])


def segment_schema():
    """One row per frame group; a long video's windows are segments with window_* set."""
    import pyarrow as pa

    return pa.schema([
        ("video_row", pa.int64()),       # row of the video in the videos table
        ("window_index", pa.int32()),    # 0 for a video embedded in one pass
        ("window_start", pa.float64()),  # seconds; the whole video: 0 .. duration
        ("window_end", pa.float64()),
        ("group_index", pa.int32()),     # frame group within the window
        ("start_time", pa.float64()),    # seconds the group covers
        ("end_time", pa.float64()),
        ("frame", pa.int64()),           # representative frame (original frame number)
        ("timestamp", pa.float64()),     # its presentation time, seconds
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("members", pa.list_(pa.int64())),  # original frame numbers of the group's frames
    ])


SCHEMAS = {"videos": video_schema, "segments": segment_schema}
VIDEO_DEFAULTS = {"given_path": None, "size": -1, "mtime": float("nan"), "duration": float("nan"),
                   "fps": float("nan"), "num_frames": -1, "status": "success"}
SEGMENT_DEFAULTS = {"window_index": 0, "window_start": float("nan"), "window_end": float("nan"),
                     "timestamp": float("nan"), "start_frame": -1, "end_frame": -1, "members": []}


def check_matrix(matrix: np.ndarray, rows: int, dim: int, what: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape != (rows, dim):
        raise LibraryError(f"add(): {what} must have shape ({rows}, {dim}), got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise LibraryError(f"add(): {what} contain non-finite values")
    return matrix


def segment_row(segment: Mapping[str, Any], video_row: int) -> Dict[str, Any]:
    row = {**SEGMENT_DEFAULTS, **{k: segment[k] for k in segment if k in segment_schema().names}}
    for key in ("group_index", "start_time", "end_time", "frame"):
        if key not in segment:
            raise LibraryError(f"add(): every segment needs {key!r}")
    row["video_row"] = video_row
    row["members"] = [int(m) for m in row["members"]]
    return row


def write_shard(root: str, stem: str, kind: str, rows: List[Dict[str, Any]], matrix: np.ndarray) -> IndexInfo:
    """The three files of one shard, each written to a temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modules.atomic_io import atomic_write

    table = pa.Table.from_pylist(rows, schema=SCHEMAS[kind]())
    atomic_write(os.path.join(root, f"{stem}.parquet"), lambda fh: pq.write_table(table, fh, row_group_size=ROW_GROUP_ROWS))
    atomic_write(os.path.join(root, f"{stem}.npy"),
                 lambda fh: np.save(fh, np.ascontiguousarray(matrix, dtype=np.float32), allow_pickle=False))
    faiss = load_faiss()
    index, info = build_index(matrix)
    atomic_write(os.path.join(root, f"{stem}.faiss"), lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)))
    return info


def write_manifest(root: str, manifest: Dict[str, Any]) -> None:
    from modules.atomic_io import atomic_write

    def write(fh) -> None:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())  # the shard files it lists are complete before it becomes visible

    atomic_write(os.path.join(root, MANIFEST), write, mode="w")
