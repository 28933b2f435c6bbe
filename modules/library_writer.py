"""The extraction writer that keeps a video library up to date (``extract_video_embeddings.py --index``).

:class:`LibraryWriter` is a :class:`modules.writers.Writer`: ``prepare`` opens the output
folder's library and refuses another model before any video is decoded; ``write`` buffers
each video's row, embedding and frame groups (in original frame numbers and seconds) and
adds them to the library every ``flush_every`` videos (one atomic update each); ``close``
adds the rest, then back-fills videos whose per-video files (``<name>_frames.npz``) exist
from an earlier run without ``--index``. Shards of one run may write concurrently: each
update takes the library's lock and re-reads the manifest.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from modules.library import VideoLibrary, library_path
from modules.writers import RunReport, VideoEntry, VideoResult, Writer

__all__ = ["LibraryWriter", "result_rows", "window_table_segments"]

logger = logging.getLogger(__name__)


def window_table_segments(table, video: int = 0):
    """A long video's :class:`modules.long_video.WindowTable` -> (segment rows, (K * F, D) features).

    One segment per frame group of every window, with ``window_index`` / ``window_start`` /
    ``window_end``; a group's members are its run of the window's sampled frames.
    """
    segments: List[Dict[str, Any]] = []
    for k in range(table.num_windows):
        bounds = np.concatenate([[0], np.cumsum(np.asarray(table.group_sizes[k], dtype=np.int64))])
        sampled = np.asarray(table.sampled_frame_indices[k], dtype=np.int64)
        for g in range(len(bounds) - 1):
            segments.append({
                "video": video, "window_index": k, "window_start": float(table.start_times[k]),
                "window_end": float(table.end_times[k]), "group_index": g,
                "start_time": float(table.group_start_times[k, g]), "end_time": float(table.group_end_times[k, g]),
                "frame": int(table.group_frames[k, g]), "timestamp": float(table.group_timestamps[k, g]),
                "start_frame": int(table.group_start_frames[k, g]), "end_frame": int(table.group_end_frames[k, g]),
                "members": sampled[bounds[g]:bounds[g + 1]].tolist(),
            })
    features = np.asarray(table.group_features, dtype=np.float32)
    return segments, features.reshape(-1, features.shape[-1])


def result_rows(result: VideoResult, video: int = 0):
    """One VideoResult -> (video row, (D,) embedding, segment rows, (F, D) features).

    A windowed long video (``result.extra["windows"]``, a WindowTable) gives one segment per
    group of every window; otherwise the video's F frame groups are its segments.
    """
    sampled = result.video
    row: Dict[str, Any] = {"name": result.name, "video_path": result.video_path, "given_path": result.video_path,
                           "status": "success"}
    if sampled is not None:
        row.update(duration=float(sampled.duration), fps=float(sampled.fps or float("nan")),
                   num_frames=int(sampled.num_frames if sampled.num_frames is not None else -1))
    if result.source:
        row.update({k: result.source[k] for k in ("size", "mtime") if result.source.get(k) is not None})
    segments: List[Dict[str, Any]] = []
    features = np.zeros((0, len(result.embedding)), np.float32)
    windows = result.extra.get("windows") if result.extra else None
    if windows is not None:
        row.update(duration=float(windows.duration), fps=float(windows.fps), num_frames=int(windows.num_frames))
        segments, features = window_table_segments(windows, video)
    elif result.group_features is not None and result.groups is not None and sampled is not None:
        spans = result.group_spans()
        indices = np.asarray(sampled.frame_indices, dtype=np.int64)
        for g, members in enumerate(result.groups):
            segments.append({
                "video": video, "window_index": 0, "window_start": 0.0, "window_end": float(sampled.duration),
                "group_index": g, "start_time": float(spans.start_times[g]), "end_time": float(spans.end_times[g]),
                "frame": int(spans.frames[g]), "timestamp": float(spans.timestamps[g]),
                "start_frame": int(spans.start_frames[g]), "end_frame": int(spans.end_frames[g]),
                "members": indices[list(members)].tolist(),
            })
        features = np.asarray(result.group_features, dtype=np.float32)
    return row, np.asarray(result.embedding, dtype=np.float32), segments, features


class LibraryWriter(Writer):
    """Adds every embedded video (and its moments) to ``output_dir``'s library."""

    def __init__(self, output_dir: str, fingerprint: Mapping[str, Any], flush_every: int = 1024,
                 backfill: bool = True):
        self.output_dir = os.fspath(output_dir)
        self.root = library_path(self.output_dir)
        self.fingerprint = dict(fingerprint)
        self.flush_every = flush_every
        self.backfill = backfill
        self.library: Optional[VideoLibrary] = None
        self.known: set = set()
        self._buffer: List[tuple] = []
        self.added = 0

    def bind_model(self, fingerprint: str, parts: Dict[str, str], model_info: Optional[Dict[str, Any]] = None) -> None:
        """The running model's fingerprint (unified_model.model_fingerprint) is the library's identity."""
        self.fingerprint.update(fingerprint=fingerprint, fingerprint_parts=dict(parts))

    def model_built(self, model) -> None:
        """Keep the model's text tower in the library, so that even the first text search
        after this run imports no torch (modules.text_tower); an unmerged LoRA model, whose
        tower is not plain CLIP weights yet, leaves that to the first search."""
        from modules.library import fingerprint_id
        from modules.text_tower import TextTowerError, save_text_tower, text_tower_of, text_tower_path

        try:
            tower = text_tower_of(model, fingerprint_id(self.fingerprint))
        except TextTowerError as err:
            logger.debug("no text tower written at extraction: %s", err)
            return
        path = text_tower_path(self.root, tower.fingerprint_id)
        if not os.path.isfile(path):
            try:
                save_text_tower(tower, path)
            except OSError as err:  # the embeddings matter more: the first search writes it instead
                logger.warning("cannot keep the text tower in %s: %s", self.root, err)

    def prepare(self, entries: Sequence[VideoEntry], cleanup: bool = True) -> None:
        if os.path.isfile(os.path.join(self.root, "manifest.json")):
            self.library = VideoLibrary.open(self.root)
            self.library.check_fingerprint(self.fingerprint)
            self.known = set(self.library.names())

    def is_done(self, entry: VideoEntry) -> bool:
        """In the library, or back-filled from its frames file at close."""
        return entry.name in self.known or (
            self.backfill and os.path.isfile(os.path.join(self.output_dir, entry.name + "_frames.npz")))

    def write(self, result: VideoResult) -> None:
        if result.status != "success" or result.embedding is None:
            return
        self._buffer.append(result_rows(result))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        dim = len(self._buffer[0][1])
        if self.library is None:
            self.library = VideoLibrary.open_or_create(self.root, self.fingerprint, dim)
        rows, embeddings, segments, features = [], [], [], []
        for i, (row, embedding, segs, feats) in enumerate(self._buffer):
            rows.append(row)
            embeddings.append(embedding)
            segments.extend({**s, "video": i} for s in segs)
            features.append(feats)
        self.library.add(rows, np.stack(embeddings), segments,
                         np.concatenate(features) if segments else None, fingerprint=self.fingerprint)
        self.known.update(r["name"] for r in rows)
        self.added += len(rows)
        self._buffer.clear()

    def close(self, report: Optional[RunReport]) -> None:
        self.flush()
        if report is not None and self.backfill:
            from modules.library_builder import index_extraction_folder

            if any(f.endswith("_frames.npz") for f in _names_below(self.output_dir)):
                filled = index_extraction_folder(self.output_dir, fingerprint=self.fingerprint)
                self.added += filled["added"]
        if self.library is not None or os.path.isfile(os.path.join(self.root, "manifest.json")):
            library = VideoLibrary.open(self.root)
            logger.info("library %s: %d videos, %d moments", self.root, len(library), library.num_segments)


def _names_below(folder: str):
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "library"]
        yield from files
