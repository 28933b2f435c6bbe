"""Writer stage: what an extraction run leaves on disk.

A writer is one object with a small interface (:class:`Writer`)::

    bind_model(fingerprint, parts, model_info)
                       the model's fingerprint, to record with every embedding, and what
                       builds it again (config, weights, checkpoint)
    prepare(entries, cleanup)
                       before any video is decoded: check the output folder is writable,
                       remove temp files a killed run left
    model_built(model) the model, once it is built (not called when every video was done)
    is_done(entry)     resume check: this video's outputs exist, are readable, and came from
                       this source file (path, size, mtime) and this model (fingerprint)
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
    source           the source file as listed: {"rel", "size", "mtime_ns"}

``result.group_spans()`` gives the groups in original frame numbers and seconds
(unified_model.group_spans); ``<name>_frames.npz`` is built from it only when written.

:class:`OutputFilesWriter` is the writer behind the script's outputs: per video
``<name>_embedding.npy`` / ``.json`` / ``<name>_frames.npz`` (and ``<name>_windows.npz``, the window
table of a long video encoded by windows, ``modules.long_video``); per folder
``consolidated_embeddings.json`` + ``embeddings.npy`` + ``embeddings_index.json``
(``--consolidated``) and ``extraction_summary.json`` (``--summary``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from modules.atomic_io import atomic_write_all, cleanup_stale_temp_files, save_json_atomic, save_npy_atomic, \
    save_npz_atomic, save_text_atomic, temp_path, write_json
from modules.json_input import JSONInputError, read_output_json
from modules.video_listing import VideoEntry
from modules.video_sampler import SampledVideo

__all__ = ["SAVE_FORMATS", "CONSOLIDATED_JSON", "CONSOLIDATED_NPY", "CONSOLIDATED_INDEX", "SUMMARY_JSON",
           "VideoResult", "RunReport", "Writer", "OutputFilesWriter", "output_files", "load_embedding",
           "write_consolidated", "result_counts", "model_record_path", "read_model_record", "read_meta"]

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("numpy", "json", "both")
#: names of the whole-directory files written into output_dir
CONSOLIDATED_JSON = "consolidated_embeddings.json"
CONSOLIDATED_NPY = "embeddings.npy"
CONSOLIDATED_INDEX = "embeddings_index.json"
SUMMARY_JSON = "extraction_summary.json"
#: a video's record of where its outputs came from: ``.<base>.meta.json`` beside them
META_SUFFIX = ".meta.json"
#: a long video's window table (modules.long_video.WINDOWS_SUFFIX: that module imports torch)
WINDOWS_SUFFIX = "_windows.npz"
#: endings of every file this writer makes (what stale-temp cleanup may remove temps of)
#: ``.<fingerprint>.model.json`` in the output folder: one per model that wrote there
MODEL_SUFFIX = ".model.json"
OWN_SUFFIXES = ("_embedding.npy", "_embedding.json", "_frames.npz", WINDOWS_SUFFIX, META_SUFFIX, MODEL_SUFFIX, CONSOLIDATED_JSON,
                CONSOLIDATED_NPY, CONSOLIDATED_INDEX, SUMMARY_JSON)


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
        return cls(entry.name, entry.path, status, error, seconds, source=entry.source(), **fields)

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

    def bind_model(self, fingerprint: str, parts: Dict[str, str], model_info: Optional[Dict[str, Any]] = None) -> None:
        """Before ``prepare``: the model's fingerprint (unified_model.model_fingerprint) and its
        parts (weights, checkpoint, config), to store with every embedding written;
        ``model_info``: what builds the model again (the summary's "model" record)."""

    def prepare(self, entries: Sequence[VideoEntry], cleanup: bool = True) -> None:
        """Before any decode. ``cleanup``: no other process writes here now (one shard)."""

    def model_built(self, model: Any) -> None:
        """After ``prepare``, when the run builds or was handed its model (nothing to encode: never)."""

    def is_done(self, entry: VideoEntry) -> bool:
        """Whether ``entry``'s outputs exist and can be trusted (then the video is skipped)."""
        return False

    def write(self, result: VideoResult) -> None:
        """One successful video's outputs."""

    def close(self, report: Optional[RunReport]) -> None:
        """The whole-directory outputs (``report`` None: another process writes them)."""


def model_record_path(output_dir: str, fingerprint: str) -> str:
    """``<output_dir>/.<fingerprint>.model.json``: what built the embeddings of that fingerprint
    (written with a run's first video), so a folder names its model without a summary or index."""
    if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
        raise ValueError(f"not a model fingerprint: {fingerprint!r}")
    return os.path.join(output_dir, f".{fingerprint}{MODEL_SUFFIX}")


def read_model_record(output_dir: str, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The model record of ``fingerprint`` in ``output_dir``, or None (missing, unreadable, other model)."""
    try:
        info = read_output_json(model_record_path(output_dir, fingerprint), "model record")
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("fingerprint") == fingerprint else None


def meta_path(output_dir: str, name: str) -> str:
    """``<folder>/.<base>.meta.json``: where a video's outputs came from (written last)."""
    folder, base = os.path.split(os.path.join(output_dir, *name.split("/")))
    return os.path.join(folder, f".{base}{META_SUFFIX}")


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


def read_embedding_file(path: str) -> np.ndarray:
    """One ``*_embedding.npy`` / ``.json`` file -> (D,) float32.

    Raises ValueError (with the reason) for an empty, truncated or malformed file, OSError
    when it cannot be read.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read
        raise ValueError(f"{path}: unreadable embedding file (not a regular file)")
    try:
        if path.endswith(".npy"):
            vector = np.load(path, allow_pickle=False)
        else:
            vector = np.asarray(read_output_json(path, "embedding file")["embedding"], dtype=np.float32)
    except JSONInputError:
        raise  # a ValueError naming the file already
    except (EOFError, KeyError, TypeError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable embedding file ({type(err).__name__}: {err})") from None
    if vector.ndim != 1 or vector.size == 0 or vector.dtype.kind != "f":
        raise ValueError(f"{path}: not an embedding vector (shape {vector.shape}, dtype {vector.dtype})")
    return vector.astype(np.float32, copy=False)


def load_embedding(output_dir: str, name: str) -> Optional[np.ndarray]:
    """A video's saved embedding (from ``.npy``, else ``.json``), or None if neither exists
    or is readable."""
    files = output_files(output_dir, name, "both", False)
    for kind in ("npy", "json"):
        if os.path.isfile(files[kind]):
            try:
                return read_embedding_file(files[kind])
            except (OSError, ValueError) as err:
                logger.warning("%s", err)
    return None


def read_meta(output_dir: str, name: str) -> Optional[Dict[str, Any]]:
    """A video's ``.meta.json`` record, or None when missing or unreadable."""
    try:
        meta = read_output_json(meta_path(output_dir, name), "video record")
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


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
    """Per-video embedding files, the consolidated files and the summary (module docstring).

    Each video's files are written embedding files first and ``.<base>.meta.json`` last
    (source rel/size/mtime, model fingerprint): outputs are trusted only with a matching
    record, so a deleted-and-replaced video, another model or a damaged file is recomputed.
    """

    def __init__(self, output_dir: str, save_format: str = "numpy", save_frame_features: bool = False,
                 consolidated: bool = False, summary: bool = False, overwrite: bool = False):
        self.output_dir = output_dir
        self.save_format = save_format
        self.save_frame_features = save_frame_features
        self.consolidated = consolidated
        self.summary = summary
        self.overwrite = overwrite
        self.model_fingerprint: Optional[str] = None
        self.model_info: Optional[Dict[str, Any]] = None
        self._model_recorded = False
        self.untrusted: Dict[str, int] = {}  # reason -> videos whose old outputs were not reused

    def files(self, name: str) -> Dict[str, str]:
        return output_files(self.output_dir, name, self.save_format, self.save_frame_features)

    def windows_path(self, name: str) -> str:
        """A long video's window table (only videos cut into windows have one)."""
        return os.path.join(self.output_dir, *name.split("/")) + WINDOWS_SUFFIX

    def bind_model(self, fingerprint: str, parts: Dict[str, str], model_info: Optional[Dict[str, Any]] = None) -> None:
        self.model_fingerprint = fingerprint
        self.model_info = model_info

    def prepare(self, entries: Sequence[VideoEntry], cleanup: bool = True) -> None:
        check_writable(self.output_dir)
        if cleanup:
            folders = {self.output_dir} | {os.path.dirname(meta_path(self.output_dir, e.name)) for e in entries}
            removed = cleanup_stale_temp_files(self.output_dir, final_suffixes=OWN_SUFFIXES, folders=sorted(folders))
            if removed:
                logger.info("removed %d temporary files left by an interrupted run", removed)

    def trusted(self, entry: VideoEntry, files: Optional[Dict[str, str]] = None) -> Optional[str]:
        """Why ``entry``'s outputs on disk cannot be used (None: they can)."""
        files = self.files(entry.name) if files is None else files
        meta = read_meta(self.output_dir, entry.name)
        if meta is None:
            return "no record of their source"
        if meta.get("source") != entry.source():
            return "another source file"
        if meta.get("fingerprint") != self.model_fingerprint:
            return "another model"
        for kind, path in files.items():
            try:
                if kind == "frames":
                    with np.load(path, allow_pickle=False) as npz:
                        npz["frame_features"]
                else:
                    read_embedding_file(path)
            except (OSError, ValueError, EOFError, KeyError):
                return "unreadable files" if os.path.exists(path) else "missing files"
        return None

    def is_done(self, entry: VideoEntry) -> bool:
        if self.overwrite:
            return False
        files = self.files(entry.name)
        if not any(os.path.lexists(p) for p in (*files.values(), meta_path(self.output_dir, entry.name))):
            return False  # never written: nothing to report
        reason = self.trusted(entry, files)
        if reason is not None:
            self.untrusted[reason] = self.untrusted.get(reason, 0) + 1
            logger.debug("%s: recomputing its outputs (%s)", entry.path, reason)
            # removed now, so a video whose recomputation fails leaves no stale outputs behind;
            # except another model's: they stay until this model's replace them (a broken
            # checkpoint does not delete a folder's work), and their record never matches
            if reason != "another model":
                self.discard(entry.name)
        return reason is None

    def discard(self, name: str) -> None:
        """Remove a video's outputs (its record first: files without one are never trusted)."""
        paths = [meta_path(self.output_dir, name), *output_files(self.output_dir, name, "both", True).values(),
                 self.windows_path(name)]
        for path in paths:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.remove(path)

    def write(self, result: VideoResult) -> None:
        """Write one video's files (each atomically); embedding files, then the record."""
        files = self.files(result.name)
        record = meta_path(self.output_dir, result.name)
        if self.model_info is not None and not self._model_recorded:
            # before the first video's record names the fingerprint (a model that never
            # built leaves none); the same bytes from every shard: no write race
            save_json_atomic(model_record_path(self.output_dir, self.model_fingerprint), self.model_info, indent=None)
            self._model_recorded = True
        self.discard(result.name)  # the record first: untrusted until the new one is in; no old file stays
        table = result.extra.get("windows")  # a long video's window table (modules.long_video)
        if table is not None:
            from modules.long_video import frames_payload_from_table

            save_npz_atomic(self.windows_path(result.name), **table.to_arrays())
            if "frames" in files:
                save_npz_atomic(files["frames"], **frames_payload_from_table(table))
        elif "frames" in files and result.group_features is not None:
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
        save_json_atomic(record, {"video_path": result.video_path, "source": result.source,
                                  "fingerprint": self.model_fingerprint, "files": sorted(files)}, indent=None)

    def close(self, report: Optional[RunReport]) -> None:
        if self.untrusted:
            logger.info("recomputed videos whose outputs could not be reused: %s",
                        ", ".join(f"{n} ({reason})" for reason, n in sorted(self.untrusted.items())))
        if report is None:
            return
        if self.consolidated:
            trusted = [e for e in report.entries if e.problem is None and self.trusted(e, {}) is None]
            write_consolidated(self.output_dir, trusted, report.model_info, total=len(report.entries))
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


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and check that files can be created in it (UsageError)."""
    from modules.cli_support import UsageError

    try:
        os.makedirs(folder, exist_ok=True)
        probe = temp_path(os.path.join(folder, ".write-check"))
        with open(probe, "xb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"output folder is not writable: {folder} ({err.strerror or err})") from None


def write_consolidated(output_dir: str, entries: Sequence[VideoEntry], model_info: Optional[Dict[str, Any]] = None,
                       total: Optional[int] = None) -> Dict[str, Any]:
    """Assemble the whole-directory files from the per-video files of ``entries`` on disk.

    Writes ``embeddings.npy`` (M, D) float32, one row per entry with a readable embedding, in
    order; ``consolidated_embeddings.json`` ({embeddings: {name: {embedding, shape,
    video_path}}, metadata: {total_videos, successful, failed, processing_date}}); and last
    ``embeddings_index.json`` (row -> name, video_path; the matrix's sha256, so a matrix
    and an index from different runs are never paired). The three are written with plain
    writes (no memory map: a full disk is an OSError naming the file, not a SIGBUS) to temp
    files, and replace the old ones only when all three are complete. Reads one video at a time: memory does not grow with the number of videos.
    ``total``: videos listed (default len(entries)). Returns the metadata.
    """
    present: List[VideoEntry] = []
    dim = 0
    for entry in entries:
        emb = load_embedding(output_dir, entry.name)
        if emb is not None and (not present or emb.shape[0] == dim):
            present.append(entry)
            dim = int(emb.shape[0])
    total = len(entries) if total is None else total
    metadata = {
        "total_videos": total,
        "successful": len(present),
        "failed": total - len(present),
        "processing_date": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }

    def rows():
        for entry in present:
            emb = load_embedding(output_dir, entry.name)
            if emb is None or emb.shape[0] != dim:  # changed by someone else meanwhile: no file beats a wrong one
                raise RuntimeError(f"{entry.name}: embedding file changed while consolidating; rerun --consolidated")
            yield entry, emb

    digest = hashlib.sha256()

    def write_matrix(fh) -> None:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (len(present), dim) if present else (0, 0)})
        for _, emb in rows():
            data = emb.astype("<f4").tobytes()
            digest.update(data)
            fh.write(data)

    def write_consolidated_json(fh) -> None:
        fh.write('{\n  "embeddings": {')
        for row, (entry, emb) in enumerate(rows()):
            item = {"embedding": [float(x) for x in emb], "shape": list(emb.shape), "video_path": entry.path}
            fh.write(("\n" if row == 0 else ",\n") + f"    {json.dumps(entry.name, ensure_ascii=False)}: "
                     + json.dumps(item, ensure_ascii=False))
        fh.write("\n  },\n" if present else "},\n")
        fh.write('  "metadata": ' + json.dumps(metadata, indent=2, ensure_ascii=False).replace("\n", "\n  ") + "\n}\n")

    def write_index(fh) -> None:  # after write_matrix: the digest is complete
        write_json(fh, {
            "matrix": CONSOLIDATED_NPY,
            "shape": [len(present), dim],
            "dtype": "float32",
            "matrix_sha256": digest.hexdigest(),
            "names": [e.name for e in present],
            "video_paths": [e.path for e in present],
            "model": model_info or {},
        })

    # all three complete before any is replaced (a full disk keeps the old, paired files),
    # the index last (a kill between the renames leaves an index that does not match)
    atomic_write_all([(os.path.join(output_dir, CONSOLIDATED_NPY), write_matrix, "wb"),
                      (os.path.join(output_dir, CONSOLIDATED_JSON), write_consolidated_json, "w"),
                      (os.path.join(output_dir, CONSOLIDATED_INDEX), write_index, "w")])
    return metadata
