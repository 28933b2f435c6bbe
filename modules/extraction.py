"""Directory embedding extraction: the library behind ``extract_video_embeddings.py``.

``extract_directory_embeddings`` is plan -> run -> finish over the stages, one module each::

    plan    video_listing   sorted VideoEntry list, unique output names, problems
            distributed     this process's place (torchrun rank or --shard) and device
            unified_model   config + checkpoint read once (load_model_spec)
            writers         output folder checked, stale temps removed, finished videos skipped
    run     decode_pool     sample_video in worker processes, uint8 frames back
            unified_model   the model, built once (create_unified_model) while workers decode
            forward_lanes   batches of batch_size through encode_videos (side by side on CPU)
            device_feed     on CUDA: pinned uploads of batch k+1 overlap batch k's forward
            writers         write(VideoResult): <name>_embedding.npy / .json / <name>_frames.npz
    finish  distributed     shards publish their records; rank 0 / the last shard merges them
            writers         close(report): consolidated files + index, summary

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

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from modules.cli_support import UsageError
from modules.decode_pool import DecodedVideo, decode_stream, default_num_workers
from modules.device_feed import MAX_DEVICE_BATCH, DeviceFeeder, DeviceLane, default_device_workers, device_batch_size
from modules.distributed import DistEnv, barrier, cleanup_distributed, init_distributed, listing_signature, \
    publish_share, read_shares
from modules.errors import one_line, printable
from modules.forward_lanes import ForwardLanes, default_parallel_batches, encode_batch, lane_threads
from modules.video_listing import VideoEntry, list_videos, parse_extensions, shard_entries
from modules.writers import SAVE_FORMATS, OutputFilesWriter, RunReport, VideoResult, Writer, result_counts

__all__ = ["extract_directory_embeddings", "ExtractionOptions"]

logger = logging.getLogger(__name__)

#: how long ranks wait for each other at the final barrier under torchrun
_DIST_TIMEOUT = timedelta(hours=24)


@dataclass
class ExtractionOptions:
    """The arguments of :func:`extract_directory_embeddings` (documented there)."""

    video_dir: Union[str, os.PathLike]
    output_dir: Union[str, os.PathLike]
    config_path: Optional[Union[str, os.PathLike]] = None
    save_format: str = "numpy"
    consolidated: bool = False
    summary: bool = False
    device: str = "auto"
    clip_weights: Optional[str] = None
    checkpoint: Optional[Union[str, os.PathLike]] = None
    model: Any = None
    recursive: bool = False
    extensions: Union[None, str, Sequence[str]] = None
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    parallel_batches: Optional[int] = None
    overwrite: bool = False
    save_frame_features: bool = False
    shard: Optional[int] = None
    num_shards: Optional[int] = None
    progress: bool = True
    merge_lora: bool = True
    writers: Sequence[Writer] = ()
    window_seconds: Optional[float] = None
    window_stride: Optional[float] = None

    def check(self) -> None:
        """UsageError for an option out of range."""
        if self.save_format not in SAVE_FORMATS:
            raise UsageError(f"save_format must be one of {', '.join(SAVE_FORMATS)}, got {self.save_format!r}")
        for key, low in (("batch_size", 1), ("num_workers", 0), ("parallel_batches", 1), ("window_seconds", 0)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise UsageError(f"{key} must be >= {low}, got {value}")


@dataclass
class ExtractionPlan:
    """What :func:`plan_extraction` decided: the listing, this share, the model inputs,
    the writers, and which videos still need work (the others already have a record)."""

    options: ExtractionOptions
    start: float
    video_dir: str
    output_dir: str
    entries: List[VideoEntry]
    mine: List[VideoEntry]
    env: DistEnv
    spec: Any  # unified_model.ModelSpec, or None when a model was given
    config: Any
    writers: List[Writer]
    pending: List[VideoEntry]
    records: Dict[str, VideoResult]
    batch_size: Optional[int]
    lanes: int
    workers: int
    settings: Dict[str, Any] = field(default_factory=dict)
    model_info: Dict[str, Any] = field(default_factory=dict)


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
    writers: Sequence[Writer] = (),
    window_seconds: Optional[float] = None,
    window_stride: Optional[float] = None,
) -> Dict[str, Any]:
    """Embed every video in ``video_dir``; write one file set per video into ``output_dir``.

    video_dir: folder of videos (see ``video_listing.list_videos``); output_dir: created if
    missing, subfolders mirrored. config_path, device ("auto", "cpu", "cuda", "cuda:N"; under
    torchrun CUDA is each rank's local GPU), clip_weights, checkpoint: the model, as in
    ``create_unified_model``; ``model``: an already built model (then those are ignored).
    save_format: "numpy" (``<name>_embedding.npy``), "json" (``<name>_embedding.json``) or
    "both"; save_frame_features: also ``<name>_frames.npz``; consolidated: also
    ``consolidated_embeddings.json``, ``embeddings.npy``, ``embeddings_index.json``;
    summary: also ``extraction_summary.json``; writers: more writers (``modules.writers``).
    recursive, extensions: what is listed. batch_size: videos per forward (None: 1 on CPU; on
    CUDA what free device memory holds, ``device_feed.device_batch_size``). num_workers:
    decode processes (None: ``default_num_workers`` on CPU, ``default_device_workers`` on
    CUDA; 0: inline).
    parallel_batches: CPU forwards side by side, each on an equal share of torch's threads
    (restored on return). overwrite: recompute finished videos (default: resume).
    shard, num_shards: process one share without torchrun. progress: a tqdm bar.
    merge_lora: fold LoRA into the weights of a model built here (same outputs, faster).
    window_seconds, window_stride: override the config's keys of the same names (long
    videos as a timeline of windows, ``modules.long_video``; None: the config's, whose
    default windows only videos over 10 minutes); a windowed video also gets
    ``<name>_windows.npz`` (the window table) and its embedding is the size-weighted mean.

    Returns dict with processed, failed, skipped, total (this process's share), errors
    ([{video_path, error}]), elapsed_seconds, videos_per_second, output_dir, shard,
    num_shards; with several shards also ``global`` (counts over all shards, known to
    torchrun ranks and to the last --shard to finish).

    Raises UsageError (missing video_dir, bad option), ConfigError / CheckpointError before
    any video is decoded; WeightsError while the first videos decode.
    """
    options = ExtractionOptions(**locals())  # every argument, by name
    options.check()
    plan = plan_extraction(options)
    built = run_extraction(plan)
    return finish_extraction(plan, built)


def plan_extraction(options: ExtractionOptions) -> ExtractionPlan:
    """List, place this process, read the model inputs, prepare the writers, find the work."""
    from unified_model import join_fingerprint, load_model_spec, spec_fingerprint

    start = time.perf_counter()
    video_dir, output_dir = os.fspath(options.video_dir), os.fspath(options.output_dir)
    if not output_dir:
        raise UsageError("the output folder is an empty string")
    exts = parse_extensions(options.extensions)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"output path exists and is not a directory: {output_dir}")
    entries = list_videos(video_dir, exts, recursive=options.recursive, exclude=[output_dir])
    model = options.model
    spec = None if model is not None else load_model_spec(options.config_path, options.checkpoint, options.clip_weights)
    config = model.config if model is not None else spec.config
    if options.window_seconds is not None or options.window_stride is not None:
        import dataclasses

        from config import ConfigError

        try:
            config = dataclasses.replace(
                config, window_seconds=config.window_seconds if options.window_seconds is None else options.window_seconds,
                window_stride=options.window_stride)
        except ConfigError as err:
            raise UsageError(str(err)) from None
    env = init_distributed(model.device if model is not None else options.device, config, shard=options.shard,
                           num_shards=options.num_shards, timeout=_DIST_TIMEOUT, share_cpu_threads=True)
    if not entries:
        logger.warning("no video files (%s) in %s%s", " ".join(exts), video_dir,
                       "" if options.recursive else " (not recursive)")
    parts = model.fingerprint_parts if model is not None else spec_fingerprint(spec)
    model_info = {
        "config_path": None if spec is None or options.config_path is None else os.fspath(options.config_path),
        "checkpoint": None if spec is None else spec.checkpoint,
        "clip_weights": config.clip_weights,
        "config": config.to_dict(),
        "fingerprint": join_fingerprint(parts),
        "fingerprint_parts": parts,
    }
    writers = [OutputFilesWriter(output_dir, options.save_format, options.save_frame_features, options.consolidated,
                                 options.summary, options.overwrite), *options.writers]
    for writer in writers:
        writer.bind_model(join_fingerprint(parts), parts, model_info)
        writer.prepare(entries, cleanup=env.world_size == 1)
    mine = shard_entries(entries, env.rank, env.world_size)
    records: Dict[str, VideoResult] = {}
    pending: List[VideoEntry] = []
    for entry in mine:
        if entry.problem is not None:
            records[entry.name] = VideoResult.of(entry, "failed", entry.problem, 0.0)
            logger.warning("%s: %s", printable(entry.path), one_line(entry.problem))
        elif all(w.is_done(entry) for w in writers):
            records[entry.name] = VideoResult.of(entry, "skipped")
        else:
            pending.append(entry)
    skipped = sum(1 for r in records.values() if r.status == "skipped")
    if skipped:
        logger.info("skipping %d videos whose outputs already exist (use --overwrite to redo them)", skipped)
    on_cpu = (model.device if model is not None else env.device).type == "cpu"
    workers = options.num_workers if options.num_workers is not None else (
        default_num_workers(env.local_world_size) if on_cpu else default_device_workers(env.local_world_size))
    plan = ExtractionPlan(
        options, start, video_dir, output_dir, entries, mine, env, spec, config, writers, pending, records,
        batch_size=options.batch_size or (1 if on_cpu else None),  # CUDA: set once the model is on the device
        lanes=(options.parallel_batches or default_parallel_batches()) if on_cpu else 1, workers=workers)
    plan.settings = {
        "video_dir": video_dir, "output_dir": output_dir, "save_format": options.save_format,
        "recursive": options.recursive, "extensions": list(exts), "batch_size": plan.batch_size,
        "num_workers": workers, "parallel_batches": plan.lanes, "overwrite": options.overwrite,
        "save_frame_features": options.save_frame_features, "world_size": env.world_size,
    }
    plan.model_info = model_info
    return plan


class _Tally:
    """The run's bookkeeping in the caller's thread: records, failures, the progress bar."""

    def __init__(self, plan: ExtractionPlan, bar) -> None:
        self.plan, self.bar = plan, bar
        self.failed = sum(1 for r in plan.records.values() if r.status == "failed")
        bar.set_postfix(failed=self.failed)

    def write(self, result: VideoResult) -> None:
        """Hand a successful result to every writer (a write error fails only this video)."""
        if result.status == "success":
            try:
                for writer in self.plan.writers:
                    writer.write(result)
            except OSError as err:
                result = VideoResult(result.name, result.video_path, "failed",
                                     one_line(f"cannot write outputs: {err}"))
        self.record(result)

    def record(self, result: VideoResult) -> None:
        # the summary keeps only the row, not the arrays
        self.plan.records[result.name] = VideoResult(result.name, result.video_path, result.status, result.error,
                                                     result.seconds, warning=result.warning)
        if result.status == "failed":
            self.failed += 1
            logger.warning("%s: %s", printable(result.video_path), result.error)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)


def run_extraction(plan: ExtractionPlan):
    """Decode, encode and write the pending videos; returns the model built here (or None)."""
    from tqdm import tqdm

    from unified_model import create_unified_model

    options, env = plan.options, plan.env
    model, stream, forwards, bar = options.model, None, None, None
    try:
        if plan.pending:
            # start the decode workers first: they work while the model loads, and they
            # are forked before any helper thread (tqdm's monitor, forward lanes) exists
            stream = decode_stream([e.path for e in plan.pending], plan.config, plan.workers,
                                   max_in_flight=(plan.batch_size or MAX_DEVICE_BATCH) * plan.lanes
                                   + 2 * max(1, plan.workers), windows=True)
            if model is None:
                model = create_unified_model(spec=plan.spec, device=env.device, merge_lora=options.merge_lora)
            for writer in plan.writers:
                writer.model_built(model)
            if plan.batch_size is None:  # CUDA: the batch free device memory holds
                plan.batch_size = plan.settings["batch_size"] = device_batch_size(model)
        failed = sum(1 for r in plan.records.values() if r.status == "failed")
        bar = tqdm(total=len(plan.pending) + failed, initial=failed, unit="video", desc="extracting",
                   disable=not options.progress or (env.distributed and env.rank != 0),
                   dynamic_ncols=True, smoothing=0.1)
        if plan.pending:
            tally = _Tally(plan, bar)
            if model.device.type == "cuda":  # uploads overlap the forwards (modules/device_feed.py)
                forwards = DeviceLane(DeviceFeeder(model.device), lambda items, frames: encode_batch(model, items, frames),
                                      frames_of=lambda item: item[1].video.frames)
            else:
                forwards = ForwardLanes(plan.lanes, lambda items: encode_batch(model, items))
            _encode_stream(plan, stream, forwards, tally, model)
            if isinstance(forwards, DeviceLane):
                plan.settings["model_wait_share"] = round(forwards.wait_share, 4)
    finally:
        if forwards is not None:
            forwards.close()
        if stream is not None:
            stream.close()  # stops the decode workers, also on errors and Ctrl-C
        if bar is not None:
            bar.close()
    return model


def _encode_stream(plan: ExtractionPlan, stream, forwards: Union[ForwardLanes, DeviceLane], tally: _Tally,
                   model) -> None:
    from modules.long_video import default_batch_windows, encode_windowed_result

    by_path = {e.path: e for e in plan.pending}
    # long videos: their windows share a forward on CUDA (the device batch), one each on CPU
    windows_per_forward = default_batch_windows(model, plan.batch_size)
    batch: List[Tuple[VideoEntry, DecodedVideo]] = []
    with lane_threads(plan.lanes):
        for (path, *_), decoded in stream:
            entry = by_path[path]
            if not decoded.ok:
                tally.record(VideoResult.of(entry, "failed", decoded.error, decoded.seconds))
                continue
            if decoded.window is not None:  # a long video: decoded here, window by window
                tally.write(encode_windowed_result(model, entry, decoded.window, plan.lanes, windows_per_forward))
                continue
            batch.append((entry, decoded))
            if len(batch) >= plan.batch_size:
                for result in forwards.submit(batch):
                    tally.write(result)
                batch = []
        if batch:
            for result in forwards.submit(batch):
                tally.write(result)
        for result in forwards.drain():
            tally.write(result)


def finish_extraction(plan: ExtractionPlan, model) -> Dict[str, Any]:
    """Counts for this share; the whole-directory outputs from the process that writes them."""
    env, output_dir = plan.env, plan.output_dir
    if model is not None:
        plan.model_info["embed_dim"] = int(model.embed_dim)
    ordered = [plan.records[e.name] for e in plan.mine]
    elapsed = time.perf_counter() - plan.start
    result = result_counts(ordered, elapsed, output_dir)
    result.update(shard=env.rank, num_shards=env.world_size)
    if env.world_size == 1:
        report = RunReport(plan.entries, ordered, elapsed, plan.settings, plan.model_info)
        for writer in plan.writers:
            writer.close(report)
        return result
    # several ranks / shards: publish this share's records; rank 0 (torchrun) or the
    # last shard to finish (--shard) merges them and writes the whole-directory files
    signature = listing_signature([e.rel for e in plan.entries])
    publish_share(output_dir, env, signature, {"elapsed_seconds": elapsed, "records": [r.to_dict() for r in ordered]})
    barrier(env)
    statuses = read_shares(output_dir, env, signature)
    report = None
    if statuses is None:
        if plan.options.consolidated or plan.options.summary:
            logger.info("shard %d of %d done; the last shard to finish writes the consolidated files and summary",
                        env.rank, env.world_size)
    else:
        merged = {row["name"]: VideoResult.from_dict(row) for status in statuses for row in status["records"]}
        all_records = [merged.get(e.name) or VideoResult.of(e, "failed", "no shard reported this video")
                       for e in plan.entries]
        global_elapsed = max(float(s.get("elapsed_seconds") or 0.0) for s in statuses)
        counts = result_counts(all_records, global_elapsed, output_dir)
        result["global"] = {k: v for k, v in counts.items() if k != "errors"}
        if env.rank == 0 or not env.distributed:
            report = RunReport(plan.entries, all_records, global_elapsed, plan.settings, plan.model_info)
    for writer in plan.writers:
        writer.close(report)
    barrier(env)
    cleanup_distributed(env)
    return result
