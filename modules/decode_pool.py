"""Decode stage: sampling videos in worker processes, where a crash costs one video.

:class:`DecodePool` runs a picklable function over many items in processes with bounded
memory and crash isolation (a worker that dies is replaced; the items it held are retried
one at a time; the item that kills a worker alone is reported through ``on_crash``).
:func:`decode_stream` is the pool applied to video files: it yields
``(item, DecodedVideo)``, the one decode record used by extraction and batch retrieval.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from modules.atomic_io import pid_alive
from modules.cli_support import UsageError
from modules.errors import error_line, one_line
from modules.long_video import video_window
from modules.video_listing import check_video_file
from modules.video_sampler import SampledVideo, VideoDecodeError, sample_video

__all__ = ["DecodedVideo", "DecodeWorkersError", "decode_video", "DecodePool", "PoolRun", "decode_stream",
           "default_num_workers"]

logger = logging.getLogger(__name__)

#: after this many worker deaths without any result, a probe asks whether workers run at all
_MAX_STARTUP_CRASHES = 3
#: seconds a probe worker may take to start and answer
_PROBE_TIMEOUT = 60.0


class DecodeWorkersError(OSError):
    """Decode worker processes cannot run on this machine (a one-line error in the scripts)."""


def _probe_worker() -> int:
    """What a probe worker runs: nothing a video could make it die of."""
    return os.getpid()


@dataclass
class DecodedVideo:
    """The outcome of decoding one video: its :class:`SampledVideo` (frames uint8
    (N, 3, S, S), not normalised) or a one-line ``error``, and the seconds it took.

    Pickles its tensors as numpy arrays (a decode worker sends it through a pipe, not
    through torch's shared-memory file descriptors); unpickling wraps them without a copy.
    """

    path: str
    video: Optional[SampledVideo] = None
    error: Optional[str] = None
    seconds: float = 0.0
    #: (W, S) for a long video: not sampled here, the model stage decodes it by windows
    window: Optional[Tuple[float, float]] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def frames(self) -> Optional[np.ndarray]:
        """uint8 (N, 3, S, S) as numpy (a view of the tensor), or None after an error."""
        return None if self.video is None else self.video.frames.numpy()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        if self.video is not None:
            fields = dict(self.video.__dict__)
            for key, value in fields.items():
                if isinstance(value, torch.Tensor):
                    fields[key] = value.numpy()
            state["video"] = fields
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        fields = state.get("video")
        if fields is not None:
            state = dict(state, video=SampledVideo(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                                     for k, v in fields.items()}))
        self.__dict__.update(state)


def decode_video(path: str, num_segments: int, size: int, decoder_threads: int = 0,
                 window_seconds: Optional[float] = 0.0, window_stride: Optional[float] = None) -> DecodedVideo:
    """Sample one video for the model; never raises (errors come back as ``error``).

    ``decoder_threads`` as in :func:`sample_video` (worker processes use 1).
    ``window_seconds`` / ``window_stride`` as the config keys (0: never windows, None:
    automatic): a video to be windowed comes back unsampled with ``window`` set.
    """
    start = time.perf_counter()
    try:
        problem = check_video_file(path)
        if problem is not None:
            return DecodedVideo(path=path, error=problem, seconds=time.perf_counter() - start)
        window = video_window(path, window_seconds, window_stride)
        if window is not None:
            return DecodedVideo(path=path, window=window, seconds=time.perf_counter() - start)
        sampled = sample_video(path, num_segments=num_segments, size=size, decoder_threads=decoder_threads,
                               normalize=False)
        return DecodedVideo(path=path, video=sampled, seconds=time.perf_counter() - start)
    except VideoDecodeError as err:
        return DecodedVideo(path=path, error=one_line(err.reason), seconds=time.perf_counter() - start)
    except MemoryError:
        return DecodedVideo(path=path, error="out of memory while decoding", seconds=time.perf_counter() - start)
    except Exception as err:  # a bug or an odd file: record it, keep going
        return DecodedVideo(path=path, error=error_line(err, with_type=True), seconds=time.perf_counter() - start)


def _worker_init(log_level: int, parent_pid: int) -> None:
    """Decode worker setup: one torch thread, no SIGINT, exit when the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    logging.basicConfig(level=log_level, format="%(levelname)s: %(message)s")
    logging.getLogger().setLevel(log_level)

    def watch() -> None:  # a parent killed with SIGKILL must not leave workers behind
        while True:
            time.sleep(1.0)
            if not pid_alive(parent_pid) or os.getppid() == 1:
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

    def workers_run(self) -> bool:
        """Whether a fresh worker runs a task that no video is part of. Deaths before any
        result may be the first videos' fault (each killed a worker alone): then it does,
        and the pool counts as working from here on."""
        executor = self._executor()
        try:
            executor.submit(_probe_worker).result(timeout=_PROBE_TIMEOUT)
        except Exception:  # noqa: BLE001 - a broken pool, a timeout: workers do not run
            return False
        finally:
            DecodePool._shutdown(executor)
        self.succeeded = True
        return True

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
            if self.ready:  # results kept from a pool that broke while filling
                break
            if not self.in_flight:
                self.close()
                raise StopIteration
            self._wait()
        return self.ready.popleft()

    def _submit(self, item: Tuple[Any, ...]) -> bool:
        """Queue ``item``; False when the pool turned out broken (then it is recovered)."""
        try:
            self.in_flight[self.executor.submit(self.fn, *item)] = item
        except BrokenProcessPool:
            # a worker died while the caller was busy with earlier results: nothing ran
            # this item; the caller puts it back and fills the new pool
            self._recover()
            return False
        return True

    def _fill(self) -> None:
        while not self._fill_once():
            pass

    def _fill_once(self) -> bool:
        """Submit what the rules allow; False if the pool broke and filling must restart."""
        if self.suspects or self.isolating:
            if not self.in_flight and self.suspects:
                item = self.suspects.popleft()
                if not self._submit(item):
                    self.suspects.appendleft(item)
                    return False
                self.isolating = True
            elif not self.in_flight:
                self.isolating = False
        if not self.isolating:
            while not self.exhausted and len(self.in_flight) < self.pool.max_in_flight:
                item = next(self.items, None)
                if item is None:
                    self.exhausted = True
                    break
                if not self._submit(item):
                    self.items = itertools.chain([item], self.items)
                    return False
        return True

    def _wait(self) -> None:
        done, _ = concurrent.futures.wait(self.in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        if not self._harvest(done):
            self._recover()

    def _harvest(self, done) -> bool:
        """Move finished futures' results to ``ready``; False if one reports a broken pool."""
        intact = True
        for future in done:
            try:
                result = future.result()
            except BrokenProcessPool:
                intact = False
                continue
            self.pool.succeeded = True
            self.ready.append((self.in_flight.pop(future), result))
        return intact

    def _recover(self) -> None:
        """After a worker died: keep finished results, replace the pool, retry or give up on the rest."""
        self._harvest([f for f in self.in_flight if f.done()])
        pool = self.pool
        pool.crashes += 1
        lost = list(self.in_flight.values())
        self.in_flight.clear()
        DecodePool._shutdown(self.executor)
        self.executor = None
        if not pool.succeeded and pool.crashes >= _MAX_STARTUP_CRASHES and not pool.workers_run():
            raise DecodeWorkersError(
                f"decode worker processes died {pool.crashes} times without finishing any video and a probe "
                "worker died too; they cannot run here: rerun with --num_workers 0 to decode in the main process")
        self.executor = pool._executor()
        if self.isolating:  # it crashed a worker on its own: give up on it
            self.isolating = False
            self.ready.extend((item, self.on_crash(item)) for item in lost)
        elif lost:
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


def decode_stream(paths: Iterable[str], config, num_workers: int, max_in_flight: Optional[int] = None,
                  windows: bool = False) -> PoolRun:
    """Sample ``paths`` for a model with ``config`` in ``num_workers`` processes (0: inline).

    Yields ``(item, DecodedVideo)`` in completion order, ``item[0]`` the path; workers
    start at once and decode single-threaded. ``close()`` it when stopping early.
    ``windows``: long videos (config.window_seconds / window_stride) come back unsampled
    with ``DecodedVideo.window`` set, for the caller to encode by windows.
    """
    pool = DecodePool(num_workers, max_in_flight=max_in_flight, log_level=logging.getLogger().getEffectiveLevel())
    window = (config.window_seconds, config.window_stride) if windows else (0.0, None)
    return pool.imap_unordered(
        decode_video, ((p, config.num_segments, config.video_size, pool.decoder_threads, *window) for p in paths),
        on_crash=_decoder_crashed,
    )


def default_num_workers(local_world: int = 1) -> int:
    """Decode processes per rank: half the CPU cores available to this rank, 1 to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world) // 2))
