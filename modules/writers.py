"""Writer stage: what an extraction run leaves on disk.

A writer is one object with a small interface (:class:`Writer`)::

    prepare(entries)   before any video is decoded: check the output folder is writable,
                       remove temp files a killed run left
    is_done(entry)     resume check: this video's outputs exist and can be trusted
    write(result)      one video's outputs, each file atomically; OSError = that video failed
    close(report)      the whole-directory outputs (called once per process; ``report`` is
                       None on a shard that does not write them)

Adding an output kind (e.g. a video library index) is one class: subclass :class:`Writer`
and pass an instance in ``extract_directory_embeddings(..., writers=[...])``.

The per-video record, :class:`VideoResult`, is built by the model stage and read by every
writer. Fields (all but name/video_path/status optional, so adding one breaks no writer):

    name, video_path, status ("success" | "failed" | "skipped"), error (one line), seconds
    embedding        (D,) float32, unit norm: the video embedding
    group_features   (F, D) float32, unit norm: one feature per compressed frame group
    group_sizes      (F,) sampled frames in each group
    groups           F lists of member positions (0..N-1) in the sampled frame list
    representatives  (F,) position of each group's representative sampled frame
    video            the :class:`SampledVideo` without its frames: original frame numbers and
                     timestamps of the N sampled frames, duration, fps, frame count
    source           the source file's size and mtime when it was listed

``result.group_spans()`` gives the groups in original frame numbers and seconds
(unified_model.group_spans); ``<name>_frames.npz`` is built from it only when written.

:class:`OutputFilesWriter` is the writer behind the script's outputs: per video
``<name>_embedding.npy`` / ``.json`` / ``<name>_frames.npz``; per folder
``consolidated_embeddings.json`` + ``embeddings.npy`` + ``embeddings_index.json``
(``--consolidated``) and ``extraction_summary.json`` (``--summary``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from modules.atomic_io import atomic_write, cleanup_stale_temp_files, save_json_atomic, save_npy_atomic, \
    save_npz_atomic, save_text_atomic, temp_path
from modules.video_listing import VideoEntry
from modules.video_sampler import SampledVideo

__all__ = ["SAVE_FORMATS", "CONSOLIDATED_JSON", "CONSOLIDATED_NPY", "CONSOLIDATED_INDEX", "SUMMARY_JSON",
           "VideoResult", "RunReport", "Writer", "OutputFilesWriter", "output_files", "load_embedding",
           "write_consolidated", "result_counts"]

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("numpy", "json", "both")
#: names of the whole-directory files written into output_dir
CONSOLIDATED_JSON = "consolidated_embeddings.json"
CONSOLIDATED_NPY = "embeddings.npy"
CONSOLIDATED_INDEX = "embeddings_index.json"
SUMMARY_JSON = "extraction_summary.json"
#: endings of every per-video file (what stale-temp cleanup may remove temps of)
PER_VIDEO_SUFFIXES = ("_embedding.npy", "_embedding.json", "_frames.npz")


@dataclass
class VideoResult:
    """One video's outcome, as the model stage hands it to the writers (see module docstring)."""

    name: str
    video_path: str
    status: str  # success | failed | skipped
    error: Optional[str] = None
    seconds: Optional[float] = None
    embedding: Optional[np.ndarray] = None
    group_features: Optional[np.ndarray] = None
    group_sizes: Optional[np.ndarray] = None
    groups: Optional[List[List[int]]] = None
    representatives: Optional[np.ndarray] = None
    video: Optional[SampledVideo] = None
    source: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # room for later stages (e.g. windows)
    warning: Optional[str] = None  # e.g. a truncated file: embedded, but shorter than declared

    @classmethod
    def of(cls, entry: VideoEntry, status: str, error: Optional[str] = None,
           seconds: Optional[float] = None, **fields: Any) -> "VideoResult":
        return cls(entry.name, entry.path, status, error, seconds, **fields)

    def group_spans(self):
        """The groups in original frame numbers and seconds (:class:`unified_model.GroupSpans`)."""
        from unified_model import group_spans

        return group_spans(self.groups, self.representatives, self.video)

    def to_dict(self) -> Dict[str, Any]:
        """The summary's row for this video."""
        return {"name": self.name, "video_path": self.video_path, "status": self.status,
                "error": self.error, "seconds": None if self.seconds is None else round(self.seconds, 4),
                "warning": self.warning}

    @classmethod
    def from_dict(cls, row: Dict[str, Any]) -> "VideoResult":
        return cls(row["name"], row["video_path"], row["status"], row.get("error"), row.get("seconds"),
                   warning=row.get("warning"))


@dataclass
class RunReport:
    """What ``close`` gets on the process that writes the whole-directory outputs.

    entries: the whole listing (every shard's videos). records: one VideoResult per entry
    (no arrays). elapsed: seconds (the slowest shard's). settings / model_info: as the
    summary records them.
    """

    entries: Sequence[VideoEntry]
    records: Sequence[VideoResult]
    elapsed: float
    settings: Dict[str, Any]
    model_info: Dict[str, Any]


class Writer:
    """Base of every writer (the defaults do nothing); see the module docstring."""

    def prepare(self, entries: Sequence[VideoEntry], cleanup: bool = True) -> None:
        """Before any decode. ``cleanup``: no other process writes here now (one shard)."""

    def is_done(self, entry: VideoEntry) -> bool:
        """Whether ``entry``'s outputs exist and can be trusted (then the video is skipped)."""
        return False

    def write(self, result: VideoResult) -> None:
        """One successful video's outputs."""

    def close(self, report: Optional[RunReport]) -> None:
        """The whole-directory outputs (``report`` None: another process writes them)."""


def output_files(output_dir: str, name: str, save_format: str, save_frame_features: bool) -> Dict[str, str]:
    """The per-video files a run writes: keys ``npy``, ``json``, ``frames`` as requested."""
    base = os.path.join(output_dir, *name.split("/"))
    files = {}
    if save_format in ("numpy", "both"):
        files["npy"] = base + "_embedding.npy"
    if save_format in ("json", "both"):
        files["json"] = base + "_embedding.json"
    if save_frame_features:
        files["frames"] = base + "_frames.npz"
    return files


def load_embedding(output_dir: str, name: str) -> Optional[np.ndarray]:
    """A video's saved embedding (from ``.npy``, else ``.json``), or None if neither exists."""
    files = output_files(output_dir, name, "both", False)
    if os.path.isfile(files["npy"]):
        return np.load(files["npy"], allow_pickle=False).astype(np.float32, copy=False)
    if os.path.isfile(files["json"]):
        with open(files["json"], encoding="utf-8") as fh:
            return np.asarray(json.load(fh)["embedding"], dtype=np.float32)
    return None


def _embedding_json_text(fields: Dict[str, Any]) -> str:
    """A flat JSON object with one key per line and lists kept on one line (readable)."""
    lines = [f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in fields.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def frames_payload(result: VideoResult) -> Dict[str, np.ndarray]:
    """The ``<name>_frames.npz`` arrays: F frame features in original-video coordinates."""
    spans = result.group_spans()
    return {
        "frame_features": result.group_features.astype(np.float32),
        "frame_indices": spans.frames,
        "timestamps": spans.timestamps,
        "start_frames": spans.start_frames,
        "end_frames": spans.end_frames,
        "start_times": spans.start_times,
        "end_times": spans.end_times,
        "group_sizes": np.asarray(result.group_sizes).astype(np.int64),
        "sampled_frame_indices": np.asarray(result.video.frame_indices, dtype=np.int64),
        "sampled_timestamps": np.asarray(result.video.timestamps, dtype=np.float64),
        "video_path": np.array(result.video_path),
    }


def result_counts(records: Sequence[VideoResult], elapsed: float, output_dir: str) -> Dict[str, Any]:
    """processed / failed / skipped / total, errors, elapsed_seconds, videos_per_second."""
    processed = sum(1 for r in records if r.status == "success")
    return {
        "processed": processed,
        "failed": sum(1 for r in records if r.status == "failed"),
        "skipped": sum(1 for r in records if r.status == "skipped"),
        "total": len(records),
        "errors": [{"video_path": r.video_path, "error": r.error} for r in records if r.status == "failed"],
        "elapsed_seconds": round(elapsed, 3),
        "videos_per_second": round(processed / elapsed, 4) if elapsed > 0 else None,
        "output_dir": output_dir,
    }


class OutputFilesWriter(Writer):
    """Per-video embedding files, the consolidated files and the summary (module docstring)."""

    def __init__(self, output_dir: str, save_format: str = "numpy", save_frame_features: bool = False,
                 consolidated: bool = False, summary: bool = False, overwrite: bool = False):
        self.output_dir = output_dir
        self.save_format = save_format
        self.save_frame_features = save_frame_features
        self.consolidated = consolidated
        self.summary = summary
        self.overwrite = overwrite

    def files(self, name: str) -> Dict[str, str]:
        return output_files(self.output_dir, name, self.save_format, self.save_frame_features)

    def prepare(self, entries: Sequence[VideoEntry], cleanup: bool = True) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        if cleanup:
            removed = cleanup_stale_temp_files(self.output_dir)
            if removed:
                logger.info("removed %d temporary files left by an interrupted run", removed)

    def is_done(self, entry: VideoEntry) -> bool:
        return not self.overwrite and all(os.path.isfile(p) for p in self.files(entry.name).values())

    def write(self, result: VideoResult) -> None:
        """Write one video's files (each atomically); the embedding files last."""
        files = self.files(result.name)
        if "frames" in files and result.group_features is not None:
            save_npz_atomic(files["frames"], **frames_payload(result))
        embedding = result.embedding
        if "json" in files:
            save_text_atomic(files["json"], _embedding_json_text({
                "video_path": result.video_path,
                "embedding": [float(x) for x in embedding],
                "shape": list(embedding.shape),
                "dtype": str(embedding.dtype),
            }))
        if "npy" in files:
            save_npy_atomic(files["npy"], embedding)

    def close(self, report: Optional[RunReport]) -> None:
        if report is None:
            return
        if self.consolidated:
            write_consolidated(self.output_dir, report.entries, report.model_info)
        if self.summary:
            counts = result_counts(report.records, report.elapsed, self.output_dir)
            totals = {k: counts[k] for k in ("total", "processed", "skipped", "failed", "elapsed_seconds",
                                             "videos_per_second")}
            save_json_atomic(os.path.join(self.output_dir, SUMMARY_JSON), {
                "totals": totals,
                "processing_date": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                "settings": report.settings,
                "model": report.model_info,
                "videos": [r.to_dict() for r in report.records],
            })


def write_consolidated(output_dir: str, entries: Sequence[VideoEntry],
                       model_info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Assemble the whole-directory files from the per-video files on disk.

    Writes (each atomically) ``consolidated_embeddings.json`` ({embeddings: {name:
    {embedding, shape, video_path}}, metadata: {total_videos, successful, failed,
    processing_date}}), ``embeddings.npy`` (M, D) float32 with one row per video that has
    an embedding, in sorted order, and ``embeddings_index.json`` (row -> name, video_path).
    Reads one video at a time: memory does not grow with the number of videos.
    Returns the metadata.
    """
    present: List[VideoEntry] = []
    for entry in entries:
        files = output_files(output_dir, entry.name, "both", False)
        if os.path.isfile(files["npy"]) or os.path.isfile(files["json"]):
            present.append(entry)
    metadata = {
        "total_videos": len(entries),
        "successful": len(present),
        "failed": len(entries) - len(present),
        "processing_date": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }
    npy_path = os.path.join(output_dir, CONSOLIDATED_NPY)
    matrix_tmp = temp_path(npy_path)
    state: Dict[str, Any] = {"matrix": None, "dim": None}
    try:
        def write_json(fh) -> None:
            fh.write('{\n  "embeddings": {')
            for row, entry in enumerate(present):
                emb = load_embedding(output_dir, entry.name)
                if emb is None:  # deleted by someone else meanwhile: better no file than a wrong one
                    raise RuntimeError(f"{entry.name}: embedding file disappeared while consolidating")
                if state["matrix"] is None:
                    state["dim"] = int(emb.shape[0])
                    state["matrix"] = np.lib.format.open_memmap(matrix_tmp, mode="w+", dtype=np.float32,
                                                                shape=(len(present), state["dim"]))
                state["matrix"][row] = emb
                item = {"embedding": [float(x) for x in emb], "shape": list(emb.shape), "video_path": entry.path}
                fh.write(("\n" if row == 0 else ",\n") + f"    {json.dumps(entry.name, ensure_ascii=False)}: "
                         + json.dumps(item, ensure_ascii=False))
            fh.write("\n  },\n" if present else "},\n")
            fh.write('  "metadata": ' + json.dumps(metadata, indent=2, ensure_ascii=False).replace("\n", "\n  ") + "\n}\n")

        atomic_write(os.path.join(output_dir, CONSOLIDATED_JSON), write_json, mode="w")
        if state["matrix"] is None:
            state["matrix"] = np.lib.format.open_memmap(matrix_tmp, mode="w+", dtype=np.float32, shape=(0, 0))
        state["matrix"].flush()
        state["matrix"] = None
        os.replace(matrix_tmp, npy_path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(matrix_tmp)
    save_json_atomic(os.path.join(output_dir, CONSOLIDATED_INDEX), {
        "matrix": CONSOLIDATED_NPY,
        "shape": [len(present), state["dim"] or 0],
        "dtype": "float32",
        "names": [e.name for e in present],
        "video_paths": [e.path for e in present],
        "model": model_info or {},
    })
    return metadata
