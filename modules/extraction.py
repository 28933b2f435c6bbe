"""Directory embedding extraction: the library behind ``extract_video_embeddings.py``.

Pipeline (one process, or one per rank under ``torchrun`` / ``--shard``)::

    list_videos(video_dir)           sorted VideoEntry list, unique output names, problems
      -> this rank's share            entries[rank::world] of the sorted list
      -> skip finished videos         every requested output file already exists
      -> DecodePool (processes)       sample_video in worker processes, uint8 frames back
      -> batches of batch_size        model.encode_videos under torch.inference_mode, on CPU
                                      parallel_batches forwards side by side (ForwardLanes)
      -> atomic writers               <name>_embedding.npy / .json / <name>_frames.npz
      -> rank 0 / last shard          consolidated JSON + embeddings.npy + index, summary

Robustness rules: every output is written to a temporary file in the same folder and
renamed into place, so an interrupted run leaves only complete files and the next run
resumes by skipping videos whose outputs exist. A video that cannot be decoded (or that
makes the decoder crash) is recorded with a one-line reason and never stops the run.
Memory stays flat: at most ``max_in_flight`` (batch_size x parallel_batches + 2 x
num_workers) decoded videos are queued in the decode pool, plus the batch being assembled
and the parallel_batches batches in the model, and the consolidated files are assembled
from the per-video files on disk, one video at a time.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from modules.cli_support import DEFAULT_EXTENSIONS, UsageError
from modules.video_sampler import VideoDecodeError, normalize_uint8, sample_video

__all__ = [
    "DEFAULT_EXTENSIONS",
    "SAVE_FORMATS",
    "CONSOLIDATED_JSON",
    "CONSOLIDATED_NPY",
    "CONSOLIDATED_INDEX",
    "SUMMARY_JSON",
    "UsageError",
    "VideoEntry",
    "DecodedVideo",
    "DecodePool",
    "ShardInfo",
    "atomic_write",
    "save_npy_atomic",
    "save_json_atomic",
    "save_npz_atomic",
    "check_video_file",
    "check_device",
    "build_inference_model",
    "list_videos",
    "unique_names",
    "parse_extensions",
    "output_files",
    "shard_entries",
    "decode_video",
    "decode_stream",
    "model_error",
    "default_num_workers",
    "default_parallel_batches",
    "ForwardLanes",
    "lane_threads",
    "threads_per_lane",
    "write_consolidated",
    "load_embedding",
    "extract_directory_embeddings",
]

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("numpy", "json", "both")
#: names of the whole-directory files written into output_dir
CONSOLIDATED_JSON = "consolidated_embeddings.json"
CONSOLIDATED_NPY = "embeddings.npy"
CONSOLIDATED_INDEX = "embeddings_index.json"
SUMMARY_JSON = "extraction_summary.json"
#: per-rank / per-shard status files (hidden folder inside output_dir)
_SHARD_DIR = ".extract_shards"
_TMP_SUFFIX = ".tmp"
#: a pool whose workers die this often before any result means workers cannot run at all
_MAX_STARTUP_CRASHES = 3
#: how long ranks wait for each other at the final barrier under torchrun
_DIST_TIMEOUT = timedelta(hours=24)


# ----------------------------------------------------------------------------- atomic files


def _temp_path(path: str) -> str:
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}.{os.getpid()}{_TMP_SUFFIX}")


def atomic_write(path: Union[str, os.PathLike], write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, then rename it to ``path``.

    The rename is atomic on POSIX and Windows, so readers (and a resumed run) see either
    the old file, no file, or the complete new file, never a partial one. Parent folders
    are created. On any error the temp file is removed and the error re-raised.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_npy_atomic(path: Union[str, os.PathLike], array: np.ndarray) -> None:
    """``np.save`` atomically (no ``.npy`` appended: the name is used as given)."""
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def save_npz_atomic(path: Union[str, os.PathLike], **arrays: np.ndarray) -> None:
    """``np.savez`` atomically (no ``.npz`` appended: the name is used as given)."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def save_json_atomic(path: Union[str, os.PathLike], obj: Any, indent: Optional[int] = 2) -> None:
    """JSON (UTF-8, non-ASCII kept) atomically."""
    def write(fh):
        json.dump(obj, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")

    atomic_write(path, write, mode="w")


def _embedding_json_text(fields: Dict[str, Any]) -> str:
    """A flat JSON object with one key per line and lists kept on one line (readable)."""
    lines = [f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in fields.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def cleanup_stale_temp_files(output_dir: str) -> int:
    """Remove temp files left by killed runs (``.<name>.<pid>.tmp`` whose pid is gone)."""
    removed = 0
    for root, dirs, files in os.walk(output_dir):
        for name in files:
            if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
                continue
            pid_text = name[: -len(_TMP_SUFFIX)].rsplit(".", 1)[-1]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, name))
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# ----------------------------------------------------------------------------- listing


@dataclass
class VideoEntry:
    """One listed video.

    path: the file as opened (``video_dir`` joined with ``rel``, as the user spelled the
    directory). rel: path relative to video_dir (``/``-separated). name: the unique output
    name (rel without extension, or with it when two files would share a name).
    problem: a reason found while listing (broken link, FIFO, directory...), else None.
    """

    path: str
    rel: str
    name: str = ""
    problem: Optional[str] = None


def parse_extensions(value: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
    """``"mp4,.MOV webm"`` or a list -> ``(".mp4", ".mov", ".webm")``; None -> defaults."""
    if value is None:
        return DEFAULT_EXTENSIONS
    parts = value.replace(",", " ").split() if isinstance(value, str) else [str(v) for v in value]
    exts = []
    for part in parts:
        part = part.strip().lower()
        if not part:
            continue
        ext = part if part.startswith(".") else "." + part
        if ext not in exts:
            exts.append(ext)
    if not exts:
        raise UsageError(f"--extensions: no extension given in {value!r}")
    return tuple(exts)


def check_video_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be a readable video file, or None if it looks fine.

    Catches what would make a decoder hang or give a vague error: broken symbolic links,
    directories, FIFOs (opening one blocks until a writer appears), sockets, devices,
    unreadable files. Empty and non-video files are left to the decoder.
    """
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (target {os.readlink(path)!r} does not exist)"
        return "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as err:
        return f"cannot stat file ({err.strerror or err})"
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "is a directory, not a video file"
    if not stat.S_ISREG(mode):
        kind = ("named pipe (FIFO)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
        return f"not a regular file: {kind}"
    if not os.access(path, os.R_OK):
        return "permission denied (file is not readable)"
    return None


def _has_extension(name: str, extensions: Sequence[str]) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext) and len(lower) > len(ext) for ext in extensions)


def list_videos(
    video_dir: Union[str, os.PathLike],
    extensions: Optional[Sequence[str]] = None,
    recursive: bool = False,
    exclude: Sequence[Union[str, os.PathLike]] = (),
) -> List[VideoEntry]:
    """Video files in ``video_dir`` sorted by relative path, with unique output names.

    Entries whose name ends with one of ``extensions`` (case-insensitive) are listed even
    when they are not usable files (broken links, FIFOs, directories when not recursive):
    those carry a ``problem`` and are reported as failures rather than silently dropped.
    Hidden entries (name starting with ".") are skipped. ``recursive`` descends into
    subfolders (symbolic links to folders are not followed); folders in ``exclude`` (e.g.
    an output folder inside ``video_dir``) are never entered.

    Raises:
        UsageError: ``video_dir`` missing or not a directory.
    """
    video_dir = os.fspath(video_dir)
    if not os.path.exists(video_dir):
        raise UsageError(f"video directory not found: {video_dir}")
    if not os.path.isdir(video_dir):
        raise UsageError(f"not a directory: {video_dir}")
    exts = tuple(extensions) if extensions is not None else DEFAULT_EXTENSIONS
    excluded = {os.path.realpath(os.fspath(p)) for p in exclude}
    found: List[Tuple[str, str]] = []  # (rel, full path)

    def walk(folder: str, rel_prefix: str) -> None:
        try:
            items = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            logger.warning("%s: cannot list folder (%s); skipped", folder, err.strerror or err)
            return
        for item in items:
            if item.name.startswith("."):
                continue
            rel = f"{rel_prefix}{item.name}"
            full = os.path.join(folder, item.name)
            try:
                is_dir = item.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir and recursive:
                if os.path.realpath(full) not in excluded:
                    walk(full, rel + "/")
                continue
            if _has_extension(item.name, exts):
                found.append((rel, full))

    walk(video_dir, "")
    found.sort(key=lambda pair: pair[0])
    entries = [VideoEntry(path=full, rel=rel, problem=check_video_file(full)) for rel, full in found]
    for entry, name in zip(entries, unique_names([e.rel for e in entries])):
        entry.name = name
    return entries


def unique_names(rels: Sequence[str]) -> List[str]:
    """Output names for relative video paths: unique, deterministic, filesystem-safe.

    ``sub/clip.mp4`` -> ``sub/clip``. When several files would get the same name
    (``clip.mp4`` and ``clip.webm``; compared case-insensitively for case-insensitive
    file systems) they keep their extension (``clip.mp4``, ``clip.webm``); any clash left
    after that gets a short hash of the relative path.
    """
    def stem(rel: str) -> str:
        folder, base = rel.rsplit("/", 1) if "/" in rel else ("", rel)
        root = os.path.splitext(base)[0] or base
        return f"{folder}/{root}" if folder else root

    names = [stem(r) for r in rels]
    for attempt in range(2):
        counts: Dict[str, int] = {}
        for n in names:
            counts[n.casefold()] = counts.get(n.casefold(), 0) + 1
        clashes = [i for i, n in enumerate(names) if counts[n.casefold()] > 1]
        if not clashes:
            break
        for i in clashes:
            names[i] = rels[i] if attempt == 0 else f"{stem(rels[i])}-{hashlib.sha1(rels[i].encode()).hexdigest()[:8]}"
    return names


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


# ----------------------------------------------------------------------------- sharding


@dataclass
class ShardInfo:
    """This process's share: ``rank`` of ``world``; mode "single", "torchrun" or "shard"."""

    rank: int = 0
    world: int = 1
    mode: str = "single"
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.mode == "torchrun"


def shard_entries(entries: Sequence[VideoEntry], rank: int, world: int) -> List[VideoEntry]:
    """Round-robin share of the sorted list: entries[rank], entries[rank + world], ...

    Deterministic (depends only on the sorted listing) and balanced to within one video.
    """
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"shard {rank} is not in [0, {world})")
    return list(entries[rank::world])


def _detect_shard(shard: Optional[int], num_shards: Optional[int]) -> ShardInfo:
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if (shard is None) != (num_shards is None):
        raise UsageError("--shard and --num_shards go together")
    if shard is not None:
        if env_world > 1:
            raise UsageError("--shard/--num_shards cannot be combined with torchrun (it shards by rank already)")
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise UsageError(f"--shard must be in [0, --num_shards={num_shards}), got {shard}")
        return ShardInfo(rank=shard, world=num_shards, mode="shard" if num_shards > 1 else "single")
    if env_world > 1:
        return ShardInfo(
            rank=int(os.environ.get("RANK", "0")), world=env_world, mode="torchrun",
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(env_world))),
        )
    return ShardInfo()


# ----------------------------------------------------------------------------- decoding


@dataclass
class DecodedVideo:
    """What a decode worker sends back for one video (picklable, small)."""

    path: str
    frames: Optional[np.ndarray] = None  # uint8 (N, 3, S, S)
    frame_indices: Optional[np.ndarray] = None  # int64 (N,)
    timestamps: Optional[np.ndarray] = None  # float64 (N,)
    duration: float = 0.0
    fps: float = 0.0
    num_frames: int = 0
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def model_error(err: BaseException) -> str:
    """One-line reason for a video whose forward raised ``err``."""
    return _one_line(f"model error: {type(err).__name__}: {err}")


def decode_video(path: str, num_segments: int, size: int, decoder_threads: int = 0) -> DecodedVideo:
    """Sample one video for the model; never raises (errors come back as ``error``).

    ``decoder_threads`` as in :func:`sample_video` (worker processes use 1).
    """
    start = time.perf_counter()
    try:
        problem = check_video_file(path)
        if problem is not None:
            return DecodedVideo(path=path, error=problem, seconds=time.perf_counter() - start)
        sampled = sample_video(path, num_segments=num_segments, size=size, decoder_threads=decoder_threads,
                               normalize=False)
        return DecodedVideo(
            path=path,
            frames=sampled.frames.numpy(),
            frame_indices=sampled.frame_indices.numpy().astype(np.int64),
            timestamps=sampled.timestamps.numpy().astype(np.float64),
            duration=float(sampled.duration),
            fps=float(sampled.fps),
            num_frames=int(sampled.num_frames),
            seconds=time.perf_counter() - start,
        )
    except VideoDecodeError as err:
        return DecodedVideo(path=path, error=_one_line(err.reason), seconds=time.perf_counter() - start)
    except MemoryError:
        return DecodedVideo(path=path, error="out of memory while decoding", seconds=time.perf_counter() - start)
    except Exception as err:  # a bug or an odd file: record it, keep going
        return DecodedVideo(path=path, error=_one_line(f"{type(err).__name__}: {err}"), seconds=time.perf_counter() - start)


def _worker_init(log_level: int, parent_pid: int) -> None:
    """Decode worker setup: one torch thread, no SIGINT, exit when the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    logging.basicConfig(level=log_level, format="%(levelname)s: %(message)s")
    logging.getLogger().setLevel(log_level)

    def watch() -> None:  # a parent killed with SIGKILL must not leave workers behind
        while True:
            time.sleep(1.0)
            if not _pid_alive(parent_pid) or os.getppid() == 1:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _mp_context():
    """fork on Linux (like torch's DataLoader): fast, and the caller's script is not re-imported,
    so it needs no ``if __name__ == "__main__"`` guard. Workers use one torch thread, which
    keeps OpenMP safe after fork. Elsewhere spawn (macOS, Windows: guard your script)."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class DecodePool:
    """Run a picklable function over many items in worker processes, results unordered.

    At most ``max_in_flight`` items are queued or held at once, so memory does not grow
    with the number of items. ``fn`` should return errors rather than raise. If a worker
    dies (e.g. a segfault inside a decoder), the pool is rebuilt and the items that were
    in flight are retried one at a time; the item that kills a worker on its own is
    reported through ``on_crash(item) -> result``. ``num_workers == 0`` runs inline.
    """

    def __init__(self, num_workers: int, max_in_flight: Optional[int] = None, log_level: int = logging.WARNING):
        if num_workers < 0:
            raise UsageError(f"--num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self.max_in_flight = max(1, max_in_flight or 2 * max(1, num_workers))
        self.log_level = log_level
        self.crashes = 0
        self.succeeded = False

    @property
    def decoder_threads(self) -> int:
        """FFmpeg threads per decode: 1 in worker processes (the least CPU per video while
        they run side by side), FFmpeg's choice when decoding inline."""
        return 1 if self.num_workers > 0 else 0

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.num_workers, mp_context=_mp_context(),
            initializer=_worker_init, initargs=(self.log_level, os.getpid()),
        )

    def imap_unordered(
        self, fn: Callable[..., Any], items: Iterable[Tuple[Any, ...]], on_crash: Callable[[Tuple[Any, ...]], Any]
    ) -> "PoolRun":
        """An iterator of ``(item, fn(*item))`` in completion order.

        The first items are submitted right away, so workers decode while the caller
        does something else (e.g. loads the model). Call ``close()`` when stopping early.
        """
        return PoolRun(self, fn, iter(items), on_crash)

    @staticmethod
    def _shutdown(executor: concurrent.futures.ProcessPoolExecutor) -> None:
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for proc in processes:  # do not wait for a long decode after an interrupt
            with contextlib.suppress(Exception):
                if proc.is_alive():
                    proc.terminate()
        for proc in processes:
            with contextlib.suppress(Exception):
                proc.join(timeout=5)


class PoolRun:
    """One :meth:`DecodePool.imap_unordered` run: submits work on creation, yields results."""

    def __init__(self, pool: DecodePool, fn: Callable[..., Any], items: Iterator[Tuple[Any, ...]],
                 on_crash: Callable[[Tuple[Any, ...]], Any]):
        self.pool, self.fn, self.items, self.on_crash = pool, fn, items, on_crash
        self.ready: deque = deque()  # finished (item, result) pairs not yet handed out
        self.in_flight: Dict[concurrent.futures.Future, Tuple[Any, ...]] = {}
        self.suspects: deque = deque()  # items to retry alone after a worker crash
        self.isolating = False  # the single item in flight was submitted alone
        self.exhausted = False
        self.executor = pool._executor() if pool.num_workers > 0 else None
        if self.executor is not None:
            self._fill()

    def __iter__(self) -> "PoolRun":
        return self

    def __next__(self) -> Tuple[Tuple[Any, ...], Any]:
        if self.executor is None:
            if self.pool.num_workers > 0:  # closed
                raise StopIteration
            item = next(self.items)  # inline mode; StopIteration ends the run
            return item, self.fn(*item)
        while not self.ready:
            self._fill()
            if not self.in_flight:
                self.close()
                raise StopIteration
            self._wait()
        return self.ready.popleft()

    def _submit(self, item: Tuple[Any, ...]) -> None:
        self.in_flight[self.executor.submit(self.fn, *item)] = item

    def _fill(self) -> None:
        if self.suspects or self.isolating:
            if not self.in_flight and self.suspects:
                self._submit(self.suspects.popleft())
                self.isolating = True
            elif not self.in_flight:
                self.isolating = False
        if not self.isolating:
            while not self.exhausted and len(self.in_flight) < self.pool.max_in_flight:
                item = next(self.items, None)
                if item is None:
                    self.exhausted = True
                    break
                self._submit(item)

    def _wait(self) -> None:
        done, _ = concurrent.futures.wait(self.in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        broken = False
        for future in done:
            try:
                result = future.result()
            except BrokenProcessPool:
                broken = True
                continue
            self.pool.succeeded = True
            self.ready.append((self.in_flight.pop(future), result))
        if not broken:
            return
        pool = self.pool
        pool.crashes += 1
        lost = list(self.in_flight.values())
        self.in_flight.clear()
        DecodePool._shutdown(self.executor)
        self.executor = None
        if not pool.succeeded and pool.crashes >= _MAX_STARTUP_CRASHES:
            raise RuntimeError(
                f"decode worker processes died {pool.crashes} times without finishing any video; they cannot "
                "run here: rerun with --num_workers 0 to decode in the main process")
        self.executor = pool._executor()
        if self.isolating:  # it crashed a worker on its own: give up on it
            self.isolating = False
            self.ready.extend((item, self.on_crash(item)) for item in lost)
        else:
            logger.warning("a decode worker died; retrying %d videos one at a time", len(lost))
            self.suspects.extend(lost)

    def close(self) -> None:
        """Stop the workers (pending items are dropped). Safe to call twice."""
        if self.executor is not None:
            DecodePool._shutdown(self.executor)
            self.executor = None
        self.in_flight.clear()


def _decoder_crashed(item: Tuple[Any, ...]) -> DecodedVideo:
    return DecodedVideo(path=item[0], error="the decoder process crashed on this file")


def decode_stream(paths: Iterable[str], config, num_workers: int, max_in_flight: Optional[int] = None) -> PoolRun:
    """Sample ``paths`` for a model with ``config`` in ``num_workers`` processes (0: inline).

    Yields ``(item, DecodedVideo)`` in completion order, ``item[0]`` the path; workers
    start at once and decode single-threaded. ``close()`` it when stopping early.
    """
    pool = DecodePool(num_workers, max_in_flight=max_in_flight, log_level=logging.getLogger().getEffectiveLevel())
    return pool.imap_unordered(
        decode_video, ((p, config.num_segments, config.video_size, pool.decoder_threads) for p in paths),
        on_crash=_decoder_crashed,
    )


def default_parallel_batches(threads: Optional[int] = None) -> int:
    """Batches the model runs at once on CPU: one per torch thread, at most 4.

    On a few cores, single-threaded forwards side by side beat one forward that splits every
    matrix product across the cores: they never wait for each other, and a decode worker
    that takes a core for a moment delays one forward instead of stalling all threads at
    the next synchronisation point (benchmarks/RESULTS.md).
    """
    threads = torch.get_num_threads() if threads is None else threads
    return max(1, min(4, threads))


class ForwardLanes:
    """Run batches through ``run`` on up to ``lanes`` threads at once (torch releases the GIL).

    ``submit`` and ``drain`` return the finished batches' results in the caller's thread, so
    bookkeeping (records, progress bar) stays single-threaded. At most ``lanes`` batches
    are running or finished-but-unread, which keeps memory flat. ``lanes == 1`` runs
    each batch inline.
    """

    def __init__(self, lanes: int, run: Callable[[List[Any]], List[Any]]):
        self.lanes = max(1, int(lanes))
        self.run = run
        self.executor = (concurrent.futures.ThreadPoolExecutor(self.lanes, thread_name_prefix="forward")
                         if self.lanes > 1 else None)
        self.running: set = set()

    def submit(self, batch: List[Any]) -> List[Any]:
        """Start ``batch``; returns the results of batches that finished while lanes were full."""
        if self.executor is None:
            return list(self.run(batch))
        self.running.add(self.executor.submit(self.run, batch))
        finished: List[Any] = []
        while len(self.running) >= self.lanes:
            finished += self._collect()
        return finished

    def drain(self) -> List[Any]:
        """Wait for every running batch; their results."""
        finished: List[Any] = []
        while self.running:
            finished += self._collect()
        return finished

    def _collect(self) -> List[Any]:
        done, self.running = concurrent.futures.wait(self.running, return_when=concurrent.futures.FIRST_COMPLETED)
        return [result for future in done for result in future.result()]

    def close(self) -> None:
        """Wait for running batches, drop queued ones. Safe to call twice."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        self.running = set()


def threads_per_lane(lanes: int) -> int:
    """torch threads each of ``lanes`` side-by-side forwards gets: an equal share, at least 1."""
    return max(1, torch.get_num_threads() // max(1, lanes))


@contextlib.contextmanager
def lane_threads(lanes: int) -> Iterator[None]:
    """Give torch :func:`threads_per_lane` threads for a block (unchanged for one lane), then restore."""
    before = torch.get_num_threads()
    share = threads_per_lane(lanes)
    if share != before:
        torch.set_num_threads(share)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def default_num_workers(local_world: int = 1) -> int:
    """Decode processes per rank: half the CPU cores available to this rank, 1 to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world) // 2))


# ----------------------------------------------------------------------------- per-video outputs


@dataclass
class _Record:
    """Outcome of one video, as the summary reports it."""

    name: str
    video_path: str
    status: str  # success | failed | skipped
    error: Optional[str] = None
    seconds: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "video_path": self.video_path, "status": self.status,
                "error": self.error, "seconds": None if self.seconds is None else round(self.seconds, 4)}


def _frame_feature_arrays(decoded: DecodedVideo, frame_features: np.ndarray, sizes: np.ndarray,
                          groups: List[List[int]], representatives: np.ndarray) -> Dict[str, np.ndarray]:
    """The ``<name>_frames.npz`` payload: F frame features in original-video coordinates."""
    from unified_model import group_time_span

    indices = decoded.frame_indices
    times = decoded.timestamps
    spans = [group_time_span(g, decoded.duration, len(indices)) for g in groups]
    reps = representatives.astype(np.int64)
    return {
        "frame_features": frame_features.astype(np.float32),
        "frame_indices": indices[reps].astype(np.int64),
        "timestamps": times[reps].astype(np.float64),
        "start_frames": np.array([indices[g[0]] for g in groups], dtype=np.int64),
        "end_frames": np.array([indices[g[-1]] for g in groups], dtype=np.int64),
        "start_times": np.array([start for start, _ in spans], dtype=np.float64),
        "end_times": np.array([end for _, end in spans], dtype=np.float64),
        "group_sizes": sizes.astype(np.int64),
        "sampled_frame_indices": indices.astype(np.int64),
        "sampled_timestamps": times.astype(np.float64),
        "video_path": np.array(decoded.path),
    }


def _write_outputs(files: Dict[str, str], video_path: str, embedding: np.ndarray,
                   frames_payload: Optional[Dict[str, np.ndarray]]) -> None:
    """Write one video's files (each atomically); the embedding files last."""
    if "frames" in files and frames_payload is not None:
        save_npz_atomic(files["frames"], **frames_payload)
    if "json" in files:
        text = _embedding_json_text({
            "video_path": video_path,
            "embedding": [float(x) for x in embedding],
            "shape": list(embedding.shape),
            "dtype": str(embedding.dtype),
        })
        atomic_write(files["json"], lambda fh: fh.write(text), mode="w")
    if "npy" in files:
        save_npy_atomic(files["npy"], embedding)


# ----------------------------------------------------------------------------- consolidated / summary


def write_consolidated(output_dir: str, entries: Sequence[VideoEntry], model_info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Assemble the whole-directory files from the per-video files on disk.

    Writes (each atomically) ``consolidated_embeddings.json`` ({embeddings: {name:
    {embedding, shape, video_path}}, metadata: {total_videos, successful, failed,
    processing_date}}), ``embeddings.npy`` (M, D) float32 with one row per video that has
    an embedding, in sorted order, and ``embeddings_index.json`` (row -> name, video_path).
    Reads one video at a time: memory does not grow with the number of videos.
    Returns the metadata.
    """
    present: List[VideoEntry] = []
    dim = None
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
    json_path = os.path.join(output_dir, CONSOLIDATED_JSON)
    npy_path = os.path.join(output_dir, CONSOLIDATED_NPY)
    matrix_tmp = _temp_path(npy_path)
    matrix = None
    try:
        def write_json(fh) -> None:
            nonlocal matrix, dim
            fh.write('{\n  "embeddings": {')
            for row, entry in enumerate(present):
                emb = load_embedding(output_dir, entry.name)
                if emb is None:  # deleted by someone else meanwhile: better no file than a wrong one
                    raise RuntimeError(f"{entry.name}: embedding file disappeared while consolidating")
                if matrix is None:
                    dim = int(emb.shape[0])
                    matrix = np.lib.format.open_memmap(matrix_tmp, mode="w+", dtype=np.float32, shape=(len(present), dim))
                matrix[row] = emb
                item = {"embedding": [float(x) for x in emb], "shape": list(emb.shape), "video_path": entry.path}
                fh.write(("\n" if row == 0 else ",\n") + f"    {json.dumps(entry.name, ensure_ascii=False)}: "
                         + json.dumps(item, ensure_ascii=False))
            fh.write("\n  },\n" if present else "},\n")
            fh.write('  "metadata": ' + json.dumps(metadata, indent=2, ensure_ascii=False).replace("\n", "\n  ") + "\n}\n")

        atomic_write(json_path, write_json, mode="w")
        if matrix is None:
            matrix = np.lib.format.open_memmap(matrix_tmp, mode="w+", dtype=np.float32, shape=(0, 0))
        matrix.flush()
        del matrix
        os.replace(matrix_tmp, npy_path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(matrix_tmp)
    save_json_atomic(os.path.join(output_dir, CONSOLIDATED_INDEX), {
        "matrix": CONSOLIDATED_NPY,
        "shape": [len(present), dim or 0],
        "dtype": "float32",
        "names": [e.name for e in present],
        "video_paths": [e.path for e in present],
        "model": model_info or {},
    })
    return metadata


def _write_summary(output_dir: str, records: Sequence[_Record], elapsed: float, settings: Dict[str, Any],
                   model_info: Dict[str, Any]) -> Dict[str, Any]:
    counts = _result_dict(records, elapsed, output_dir)
    totals = {k: counts[k] for k in ("total", "processed", "skipped", "failed", "elapsed_seconds", "videos_per_second")}
    save_json_atomic(os.path.join(output_dir, SUMMARY_JSON), {
        "totals": totals,
        "processing_date": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings,
        "model": model_info,
        "videos": [r.to_dict() for r in records],
    })
    return totals


def _listing_signature(entries: Sequence[VideoEntry]) -> str:
    h = hashlib.sha1()
    for e in entries:
        h.update(e.rel.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _shard_status_path(output_dir: str, shard: ShardInfo) -> str:
    return os.path.join(output_dir, _SHARD_DIR, f"shard-{shard.rank:05d}-of-{shard.world:05d}.json")


def _read_shard_statuses(output_dir: str, shard: ShardInfo, signature: str) -> Optional[List[Dict[str, Any]]]:
    """All shards' status files for this listing, or None while some are missing."""
    statuses = []
    for rank in range(shard.world):
        path = _shard_status_path(output_dir, ShardInfo(rank=rank, world=shard.world))
        try:
            with open(path, encoding="utf-8") as fh:
                status = json.load(fh)
        except (OSError, ValueError):
            return None
        if status.get("signature") != signature:
            return None
        statuses.append(status)
    return statuses


# ----------------------------------------------------------------------------- main entry point


def _init_distributed(shard: ShardInfo, device: str) -> Tuple[bool, str]:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA).

    Returns (whether this call created the group, the device this rank computes on).
    """
    import torch.distributed as dist

    use_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(shard.local_rank)
        device = f"cuda:{shard.local_rank}"
    else:
        device = "cpu"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, shard.local_world)))
    if dist.is_initialized():
        return False, device
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=_DIST_TIMEOUT)
    return True, device


def _barrier(device: str) -> None:
    import torch.distributed as dist

    if device.startswith("cuda"):
        dist.barrier(device_ids=[torch.device(device).index or 0])
    else:
        dist.barrier()


def _resolve_config(config_path, checkpoint, clip_weights):
    """The config a model built here will use (read before any work: bad files fail early)."""
    from config import UnifiedModelConfig, from_dict, from_json

    if config_path is not None:
        config = from_json(config_path)
    elif checkpoint is not None:
        from unified_model import read_checkpoint

        config = from_dict(read_checkpoint(checkpoint)["config"])
    else:
        config = UnifiedModelConfig()
    if clip_weights is not None:
        config.clip_weights = clip_weights
    return config


def build_inference_model(config=None, device: str = "auto", checkpoint=None, clip_state_dict=None,
                          merge_lora: bool = True):
    """An eval-mode model, identical in every process that builds it with the same inputs.

    (The model seeds its own untrained tensors, so ranks and runs agree.) LoRA is folded
    into the CLIP weights (same outputs, less compute) unless ``merge_lora`` is False.
    Raises ConfigError / WeightsError / CheckpointError / UsageError (device) with
    one-line messages.
    """
    from config import UnifiedModelConfig
    from unified_model import UnifiedTempMeSTOPModel, create_unified_model

    config = config if config is not None else UnifiedModelConfig()
    target = check_device(device, config)
    if clip_state_dict is None:
        model = create_unified_model(device=device, checkpoint=checkpoint, config=config)
    else:
        model = UnifiedTempMeSTOPModel(config, clip_state_dict)
        if checkpoint is not None:
            model.load_checkpoint(checkpoint)
        model = model.to(target).eval()
    if merge_lora:
        model.merge_lora()
    return model


def check_device(device: str, config=None) -> torch.device:
    """The device a model built here runs on (``device``, or the config's when "auto").

    Fails early (UsageError) on a device this machine does not have.
    """
    from unified_model import resolve_model_device

    try:
        return resolve_model_device(device, config)
    except (RuntimeError, ValueError) as err:
        raise UsageError(str(err)) from None


def extract_directory_embeddings(
    video_dir: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    config_path: Optional[Union[str, os.PathLike]] = None,
    save_format: str = "numpy",
    consolidated: bool = False,
    summary: bool = False,
    *,
    device: str = "auto",
    clip_weights: Optional[str] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    model=None,
    recursive: bool = False,
    extensions: Union[None, str, Sequence[str]] = None,
    batch_size: Optional[int] = None,
    num_workers: Optional[int] = None,
    parallel_batches: Optional[int] = None,
    overwrite: bool = False,
    save_frame_features: bool = False,
    shard: Optional[int] = None,
    num_shards: Optional[int] = None,
    progress: bool = True,
    merge_lora: bool = True,
) -> Dict[str, Any]:
    """Embed every video in ``video_dir``; write one file set per video into ``output_dir``.

    Args:
        video_dir: folder of videos (see :func:`list_videos` for what is listed).
        output_dir: created if missing; subfolders of ``video_dir`` are mirrored.
        config_path: model config JSON (default: built-in defaults / the checkpoint's).
        save_format: "numpy" (``<name>_embedding.npy``), "json" (``<name>_embedding.json``)
            or "both".
        consolidated: also write ``consolidated_embeddings.json``, ``embeddings.npy`` and
            ``embeddings_index.json`` covering every video with an embedding.
        summary: also write ``extraction_summary.json`` (per-video status, error, seconds;
            totals with videos/s).
        device: "auto", "cpu", "cuda" or "cuda:N" (torchrun: each rank uses its local GPU).
        clip_weights: overrides the config's clip_weights (file, model name or "random").
        checkpoint: trained model checkpoint.
        model: an already built model (then config_path, device, clip_weights and
            checkpoint are ignored and the model is used as it is).
        recursive: descend into subfolders.
        extensions: which file endings count as videos (default ``DEFAULT_EXTENSIONS``).
        batch_size: videos per model forward (None: 1 on CPU, where one video already
            fills the matrix units and smaller batches start sooner; 4 on CUDA).
        num_workers: decode processes (None = :func:`default_num_workers`; 0 = decode in
            this process). Workers decode single-threaded (the least CPU per video).
        parallel_batches: on CPU, forwards running at once, each on torch's threads
            divided by this (None = :func:`default_parallel_batches`); 1 on CUDA. While
            the call runs, torch's (process-wide) thread count is set to that share; it
            is restored on return.
        overwrite: recompute videos whose outputs exist (default: skip them, i.e. resume).
        save_frame_features: also write ``<name>_frames.npz`` (F frame features with their
            original frame numbers, timestamps and time spans).
        shard, num_shards: process only share ``shard`` of ``num_shards`` (without
            torchrun). Under torchrun the rank and world size come from the environment.
        progress: show a tqdm bar (videos/s, failures).
        merge_lora: fold LoRA into the weights of a model built here (faster, same outputs).

    Returns:
        dict with processed, failed, skipped, total (this process's share), errors (list
        of {video_path, error}), elapsed_seconds, videos_per_second, output_dir, shard,
        num_shards; with several shards also ``global`` (the counts over all shards, known
        to torchrun ranks after the final barrier and to the last --shard to finish).

    Raises:
        UsageError: missing video_dir, bad option. ConfigError, WeightsError,
        CheckpointError: bad config, weights or checkpoint (raised before any video is
        decoded, except weights: they load while the first videos decode).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    video_dir = os.fspath(video_dir)
    output_dir = os.fspath(output_dir)
    if save_format not in SAVE_FORMATS:
        raise UsageError(f"save_format must be one of {', '.join(SAVE_FORMATS)}, got {save_format!r}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    if parallel_batches is not None and parallel_batches < 1:
        raise UsageError(f"parallel_batches must be >= 1, got {parallel_batches}")
    exts = parse_extensions(extensions)
    shard_info = _detect_shard(shard, num_shards)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"output path exists and is not a directory: {output_dir}")
    entries = list_videos(video_dir, exts, recursive=recursive, exclude=[output_dir])
    config = model.config if model is not None else _resolve_config(config_path, checkpoint, clip_weights)
    compute_device = model.device if model is not None else check_device(device, config)
    if not entries:
        logger.warning("no video files (%s) in %s%s", " ".join(exts), video_dir, "" if recursive else " (not recursive)")
    os.makedirs(output_dir, exist_ok=True)

    created_pg = False
    if shard_info.distributed:
        created_pg, device = _init_distributed(shard_info, device)
        if model is None:
            compute_device = torch.device(device)
    my_entries = shard_entries(entries, shard_info.rank, shard_info.world)
    if shard_info.world == 1:
        removed = cleanup_stale_temp_files(output_dir)
        if removed:
            logger.info("removed %d temporary files left by an interrupted run", removed)

    records: Dict[str, _Record] = {}
    pending: List[VideoEntry] = []
    for entry in my_entries:
        files = output_files(output_dir, entry.name, save_format, save_frame_features)
        if entry.problem is not None:
            records[entry.name] = _Record(entry.name, entry.path, "failed", entry.problem, 0.0)
            logger.warning("%s: %s", entry.path, entry.problem)
        elif not overwrite and all(os.path.isfile(p) for p in files.values()):
            records[entry.name] = _Record(entry.name, entry.path, "skipped")
        else:
            pending.append(entry)
    skipped = sum(1 for r in records.values() if r.status == "skipped")
    if skipped:
        logger.info("skipping %d videos whose outputs already exist (use --overwrite to redo them)", skipped)

    workers = default_num_workers(shard_info.local_world) if num_workers is None else num_workers
    on_cpu = compute_device.type == "cpu"
    batch_size = batch_size if batch_size is not None else (1 if on_cpu else 4)
    lanes = (parallel_batches or default_parallel_batches()) if on_cpu else 1
    model_info = {
        "config_path": os.fspath(config_path) if config_path is not None and model is None else None,
        "checkpoint": os.fspath(checkpoint) if checkpoint is not None and model is None else None,
        "clip_weights": config.clip_weights,
        "config": config.to_dict(),
    }
    failed_count = sum(1 for r in records.values() if r.status == "failed")
    results = None
    bar = None
    forwards = None
    try:
        if pending:
            # start the decode workers first: they work while the model loads, and they
            # are forked before any helper thread (tqdm's monitor, forward lanes) exists
            results = decode_stream([e.path for e in pending], config, workers,
                                    max_in_flight=batch_size * lanes + 2 * max(1, workers))
            by_path = {e.path: e for e in pending}
            if model is None:
                model = build_inference_model(config, device=device, checkpoint=checkpoint, merge_lora=merge_lora)
        bar = tqdm(total=len(pending) + failed_count, initial=failed_count, unit="video", desc="extracting",
                   disable=not progress or (shard_info.distributed and shard_info.rank != 0),
                   dynamic_ncols=True, smoothing=0.1)
        if pending:
            bar.set_postfix(failed=failed_count)
            batch: List[Tuple[VideoEntry, DecodedVideo]] = []

            def finish(entry: VideoEntry, outcome: _Record) -> None:
                nonlocal failed_count
                records[entry.name] = outcome
                if outcome.status == "failed":
                    failed_count += 1
                    logger.warning("%s: %s", entry.path, outcome.error)
                    bar.set_postfix(failed=failed_count, refresh=False)
                bar.update(1)

            forwards = ForwardLanes(lanes, lambda items: list(
                _run_batch(model, items, output_dir, save_format, save_frame_features)))

            def flush() -> None:
                for entry, outcome in forwards.submit(list(batch)):
                    finish(entry, outcome)
                batch.clear()

            with lane_threads(lanes):
                for (path, *_), decoded in results:
                    entry = by_path[path]
                    if not decoded.ok:
                        finish(entry, _Record(entry.name, entry.path, "failed", decoded.error, decoded.seconds))
                        continue
                    batch.append((entry, decoded))
                    if len(batch) >= batch_size:
                        flush()
                if batch:
                    flush()
                for entry, outcome in forwards.drain():
                    finish(entry, outcome)
    finally:
        if forwards is not None:
            forwards.close()
        if results is not None:
            results.close()  # stops the decode workers, also on errors and Ctrl-C
        if bar is not None:
            bar.close()

    if model is not None:
        model_info["embed_dim"] = int(model.embed_dim)
    ordered = [records[e.name] for e in my_entries]
    elapsed = time.perf_counter() - start
    settings = {
        "video_dir": video_dir, "output_dir": output_dir, "save_format": save_format,
        "recursive": recursive, "extensions": list(exts), "batch_size": batch_size,
        "num_workers": workers, "parallel_batches": lanes, "overwrite": overwrite, "save_frame_features": save_frame_features,
        "world_size": shard_info.world,
    }
    result = _result_dict(ordered, elapsed, output_dir)
    result.update(shard=shard_info.rank, num_shards=shard_info.world)

    if shard_info.world == 1:
        if consolidated:
            write_consolidated(output_dir, entries, model_info)
        if summary:
            _write_summary(output_dir, ordered, elapsed, settings, model_info)
        return result

    # several ranks / shards: publish this share's records; rank 0 (torchrun) or the
    # last shard to finish (--shard) merges them and writes the whole-directory files
    signature = _listing_signature(entries)
    save_json_atomic(_shard_status_path(output_dir, shard_info), {
        "signature": signature, "rank": shard_info.rank, "world": shard_info.world,
        "elapsed_seconds": elapsed, "records": [r.to_dict() for r in ordered],
    }, indent=None)
    if shard_info.distributed:
        _barrier(device)
    statuses = _read_shard_statuses(output_dir, shard_info, signature)
    writer = statuses is not None and (shard_info.rank == 0 or not shard_info.distributed)
    if statuses is None and (consolidated or summary):
        logger.info("shard %d of %d done; the last shard to finish writes the consolidated files and summary",
                    shard_info.rank, shard_info.world)
    if statuses is not None:
        merged = {rec["name"]: _Record(rec["name"], rec["video_path"], rec["status"], rec["error"], rec["seconds"])
                  for status in statuses for rec in status["records"]}
        all_records = [merged.get(e.name) or _Record(e.name, e.path, "failed", "no shard reported this video")
                       for e in entries]
        global_elapsed = max(float(s.get("elapsed_seconds") or 0.0) for s in statuses)
        global_result = _result_dict(all_records, global_elapsed, output_dir)
        result["global"] = {k: v for k, v in global_result.items() if k != "errors"}
        if writer:
            if consolidated:
                write_consolidated(output_dir, entries, model_info)
            if summary:
                _write_summary(output_dir, all_records, global_elapsed, settings, model_info)
    if shard_info.distributed:
        _barrier(device)
        if created_pg:
            import torch.distributed as dist

            dist.destroy_process_group()
    return result


def _result_dict(records: Sequence[_Record], elapsed: float, output_dir: str) -> Dict[str, Any]:
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


def _run_batch(model, batch: Sequence[Tuple[VideoEntry, DecodedVideo]], output_dir: str, save_format: str,
               save_frame_features: bool) -> Iterator[Tuple[VideoEntry, _Record]]:
    """One forward for the batch (each video alone if the batch fails), then write outputs."""
    start = time.perf_counter()
    try:
        outputs = _encode(model, [d for _, d in batch])
        share = (time.perf_counter() - start) / len(batch)
        items = [(entry, decoded, out, share) for (entry, decoded), out in zip(batch, outputs)]
    except Exception as err:
        if len(batch) == 1:
            entry, decoded = batch[0]
            yield entry, _Record(entry.name, entry.path, "failed", model_error(err),
                                 decoded.seconds + time.perf_counter() - start)
            return
        logger.warning("batch of %d failed (%s); retrying one video at a time", len(batch), _one_line(str(err)))
        for one in batch:
            yield from _run_batch(model, [one], output_dir, save_format, save_frame_features)
        return
    for entry, decoded, out, share in items:
        t0 = time.perf_counter()
        embedding, frames_payload = out
        files = output_files(output_dir, entry.name, save_format, save_frame_features)
        try:
            _write_outputs(files, entry.path, embedding, frames_payload)
        except OSError as err:
            yield entry, _Record(entry.name, entry.path, "failed", _one_line(f"cannot write outputs: {err}"))
            continue
        yield entry, _Record(entry.name, entry.path, "success", None, decoded.seconds + share + time.perf_counter() - t0)


def _encode(model, decoded: Sequence[DecodedVideo]) -> List[Tuple[np.ndarray, Optional[Dict[str, np.ndarray]]]]:
    """Batched forward -> per video (embedding (D,) float32, frame-feature payload)."""
    frames = normalize_uint8(np.stack([d.frames for d in decoded]))
    with torch.inference_mode():
        features = model.encode_videos(frames)
    embeddings = features.video_embeddings.detach().cpu().numpy().astype(np.float32)
    frame_features = features.frame_features.detach().cpu().numpy()
    sizes = features.frame_sizes.detach().cpu().numpy()
    reps = features.representatives.detach().cpu().numpy()
    out = []
    for i, d in enumerate(decoded):
        payload = _frame_feature_arrays(d, frame_features[i], sizes[i], features.groups[i], reps[i])
        out.append((np.ascontiguousarray(embeddings[i]), payload))
    return out
