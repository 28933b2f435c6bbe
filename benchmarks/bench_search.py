#!/usr/bin/env python
"""Video library search at scale vs today's brute-force embeddings search, in one run.

Synthetic data (the library layer does not care where vectors come from): unit vectors
in 512 dimensions drawn around 1024 random "topic" centres (cosine about 0.6 to their
centre), the way CLIP embeddings cluster; queries are drawn the same way. Per size:

- build: ``VideoLibrary.add`` of all rows (Parquet + .npy + FAISS index, IVF calibration);
- disk: the library folder's bytes; index: the .faiss files' bytes;
- RSS: peak RSS of a separate search process (open + 50 vector queries, no model), and
  its ratio to the index size;
- warm p50/p99: in-process latency of one query, the vector already encoded ("vec"),
  and including the text encoding by the library's own query encoder ("text": the NumPy
  text tower the library keeps, modules/text_tower.py, of random-weight ViT-B/32);
- recall@10 of the library's search against exact search (1.0 where the shard is exact);
- cold CLI: ``inference.py --embeddings_dir D --query Q`` wall time (a fresh process:
  imports, library open, text tower, search), median of runs, after a first query that
  built the model and wrote the library's text tower (its time is printed too); and the
  same with the model flags given (``--config_path``), which are checked against the
  library's model (torch, the weights' identity) before searching;
- baseline, same vectors: today's path, ``search_embeddings`` on ``embeddings.npy`` +
  ``embeddings_index.json`` (in process: parse + brute force + encoding per call; and
  its cold CLI), plus a plain numpy matrix-vector product over the matrix in memory.
- +1k: adding 1000 videos to the largest video library (median of 3 adds).
- load: ``inference.py --serve`` on 127.0.0.1 with ``--clients`` threads sending search
  requests for ``--load_seconds`` (each client's loop is bounded in time and count).

    .venv/bin/python benchmarks/bench_search.py [--videos 10000,100000,1000000]
        [--segments 120000,1200000] [--cli_runs 3] [--load_seconds 10] [--clients 50]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

DIM = 512
CENTRES = 1024
SEGMENTS_PER_VIDEO = 12
QUERY = "a dog catching a frisbee on the beach"


def clustered(rows: int, seed: int, centres: np.ndarray, block: int = 262144) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((rows, DIM), np.float32)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        x = centres[rng.integers(0, len(centres), n)] + 1.3 * rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


#: model flags of the libraries' model with --weights random; --weights file uses
#: ``--config_path CFG`` naming random ViT-B/32 weights saved as a file (write_weights_file)
RANDOM_FLAGS: List[str] = ["--clip_weights", "random"]


def fingerprint(flags: List[str]) -> Dict:
    """The library fingerprint of the model these CLI model flags build."""
    from modules.library_cli import cli_fingerprint

    if flags[0] == "--config_path":
        return cli_fingerprint(flags[1], None, None)
    return cli_fingerprint(None, None, "random")


def write_weights_file(work: Path) -> List[str]:
    """Random ViT-B/32 weights (seed 0) saved as a float16 state-dict file (OpenAI publishes
    ViT-B/32 in float16: 302 MB of tensors here), and a config naming it."""
    import torch

    from modules.module_clip import random_state_dict

    weights, config = work / "ViT-B-32-random-fp16.pt", work / "model_config.json"
    if not weights.is_file():
        torch.save({k: v.half() for k, v in random_state_dict("ViT-B/32").items()}, weights)
    config.write_text(json.dumps({"clip_weights": str(weights), "clip_activation": "quick_gelu"}))
    return ["--config_path", str(config)]


def import_torch_floor(runs: int) -> float:
    """Median wall time of a fresh ``python -c 'import torch'``: the floor of any cold CLI."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(root: Path, videos: int, segments: int, centres: np.ndarray, seed: int, flags: List[str],
          reuse: bool = False):
    from modules.library import VideoLibrary

    if reuse and (root / "library" / "manifest.json").is_file():  # a library an earlier run built here
        library = VideoLibrary.open(root / "library")
        kinds = library.embedding_shards("videos"), library.embedding_shards("segments")
        return library, float("nan"), kinds[0][0], (kinds[1][0] if kinds[1] else None)

    emb = clustered(videos, seed, centres)
    rows = [{"name": f"video_{i:07d}", "video_path": f"/data/videos/video_{i:07d}.mp4", "duration": 60.0}
            for i in range(videos)]
    seg_rows, seg = [], None
    if segments:
        seg = clustered(segments, seed + 1, centres)
        seg_rows = [{"video": i // SEGMENTS_PER_VIDEO, "group_index": i % SEGMENTS_PER_VIDEO, "start_time": 5.0 * (i % 12),
                     "end_time": 5.0 * (i % 12) + 5, "frame": 125 * (i % 12) + 60} for i in range(segments)]
    library = VideoLibrary.create(root / "library", fingerprint(flags), DIM)
    start = time.perf_counter()
    library.add(rows, emb, seg_rows, seg, fingerprint=fingerprint(flags))
    return library, time.perf_counter() - start, emb, seg


def write_baseline(folder: Path, emb: np.ndarray, flags: List[str]) -> None:
    """The files ``extract_video_embeddings.py --consolidated`` writes today."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", emb)
    names = [f"video_{i:07d}" for i in range(len(emb))]
    (folder / "embeddings_index.json").write_text(json.dumps({
        "matrix": "embeddings.npy", "shape": list(emb.shape), "dtype": "float32", "names": names,
        "video_paths": [f"/data/videos/{n}.mp4" for n in names], "model": fingerprint(flags)}))


def search_rss(root: Path, kind: str) -> int:
    """Peak RSS (bytes) of a fresh process that opens the library and runs 50 vector queries."""
    code = (
        "import sys, numpy as np; sys.path.insert(0, %r)\n"
        "from modules.library import VideoLibrary\n"
        "lib = VideoLibrary.open(%r)\n"
        "q = np.random.default_rng(0).standard_normal((50, %d)).astype('float32')\n"
        "[lib.search_vector(v / np.linalg.norm(v), 10, moments=%r) for v in q]\n"
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    ) % (str(_ROOT), str(root / "library"), DIM, kind == "segments")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def first_query(folder: Path, extra: List[str]) -> float:
    """A cold CLI with no text tower in the library yet: it builds the model and writes the tower."""
    for tower in (folder / "library").glob("text-tower-*"):
        tower.unlink()
    return cold_cli(folder, 1, extra, [])


def cold_cli(folder: Path, runs: int, extra: List[str], flags: List[str], rss: Optional[List[int]] = None) -> float:
    """Median wall time of ``runs`` fresh CLI searches (:func:`cold_cli_runs`)."""
    return statistics.median(cold_cli_runs(folder, runs, extra, flags, rss))


# inference.py as a script, then its peak RSS (VmHWM of its own memory) as stderr's last line.
# Not the rusage of the child: Linux counts the parent's resident memory at fork into a
# child's ru_maxrss, and this benchmark's process holds a model (a 310 MB search read 2.5 GB).
_CLI_WITH_PEAK = (
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path.insert(0, %r)\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n"
    "    print('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0],\n"
    "          file=sys.stderr)\n"
) % str(_ROOT)


def cold_cli_runs(folder: Path, runs: int, extra: List[str], flags: List[str],
                  rss: Optional[List[int]] = None) -> List[float]:
    """Wall times of ``runs`` fresh CLI searches; their peak RSS bytes go to ``rss``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CLI_WITH_PEAK, str(_ROOT / "inference.py"), "--embeddings_dir",
                               str(folder), "--query", QUERY, *flags, "--top_k", "10", "-q", *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"CLI failed: {proc.stderr[-500:]}")
        if rss is not None:
            rss.append(int(proc.stderr.strip().splitlines()[-1].split()[1]) * 1024)
    return times


def cli_times(root: Path, runs: int, extra: List[str], flags: List[str]) -> Dict[str, Any]:
    """The first query (no tower yet), then ``runs`` cold searches without and with model flags."""
    first = first_query(root, extra)
    rss: List[int] = []
    plain = cold_cli_runs(root, runs, extra, [], rss)
    flagged = cold_cli_runs(root, runs, extra, flags)
    return {"first_cli": first, "cli": statistics.median(plain), "cli_runs": plain, "cli_rss": max(rss),
            "cli_flags": statistics.median(flagged), "cli_flags_runs": flagged}


def warm(library, kind: str, queries: np.ndarray, texts: List[str]) -> Dict[str, float]:
    """In-process query latency: vectors, and texts through the library's own encoder."""
    moments = kind == "segments"
    encoder = library.encoder()
    encoder.encode_text(texts[:1])  # builds the model / reads the text tower once
    for q in queries[:5]:
        library.search_vector(q, 10, moments)
    vec = []
    for q in queries:
        t0 = time.perf_counter()
        library.search_vector(q, 10, moments)
        vec.append(time.perf_counter() - t0)
    text = []
    for t in texts:
        t0 = time.perf_counter()
        library.search_vector(encoder.encode_text([t])[0], 10, moments)
        text.append(time.perf_counter() - t0)
    return {"vec_p50": percentile(vec, 50), "vec_p99": percentile(vec, 99), "text_p50": percentile(text, 50),
            "text_p99": percentile(text, 99)}


def recall(library, kind: str, matrix: np.ndarray, queries: np.ndarray) -> float:
    from modules.library_index import exact_top_k, recall_at_k

    found = np.array([[r for r, _ in hits[:10]] for hits in library.search_vectors(queries, 10, kind)])
    return recall_at_k(found, exact_top_k(matrix, queries, 10), 10)


def numpy_brute_force(matrix: np.ndarray, queries: np.ndarray) -> float:
    times = []
    for q in queries[:20]:
        t0 = time.perf_counter()
        scores = matrix @ q
        np.argpartition(-scores, 10)[:10]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_test(folder: Path, clients: int, seconds: float, max_requests: int, flags: List[str]) -> Dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(_ROOT / "inference.py"), "--embeddings_dir", str(folder), "--serve",
                               "--port", str(port), *flags, "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        texts = [f"{QUERY} number {i}" for i in range(clients)]
        for t in texts:  # warm-up: each client's text is encoded once; the server's query cache serves the rest
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/api/search?" + urllib.parse.urlencode({"q": t, "top_k": 10}))
            conn.getresponse().read()
        latencies: List[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            url = "/api/search?" + urllib.parse.urlencode({"q": texts[i], "top_k": 10})
            mine = []
            while time.monotonic() < stop_at and len(mine) < max_requests:
                t0 = time.perf_counter()
                try:
                    conn.request("GET", url)
                    response = conn.getresponse()
                    body = response.read()
                    ok = response.status == 200 and b'"results"' in body
                except OSError:
                    ok = False
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                mine.append(time.perf_counter() - t0)
                if not ok:
                    with lock:
                        errors[0] += 1
            with lock:
                latencies.extend(mine)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        return {"requests": len(latencies), "errors": errors[0], "rps": len(latencies) / elapsed,
                "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def thumbnail_cost(work: Path, cuts: int = 10) -> Dict[str, float]:
    """Cutting a thumbnail at request time vs storing one per moment at index time."""
    from modules.search_server import cut_frame, encode_jpeg
    from modules.synthetic_video import MovingShape, write_moving_shapes_video

    path = work / "thumb_source.mp4"
    fps, frames = 25, 25 * 30
    write_moving_shapes_video(str(path), frames, fps=fps, size=(640, 360),
                              shapes=[MovingShape("circle", (220, 30, 30), start=(0.1, 0.5), end=(0.9, 0.5), radius=0.2)], gop=250)
    times, sizes = [], []
    for t in np.linspace(0.5, frames / fps - 0.5, cuts):
        t0 = time.perf_counter()
        data = encode_jpeg(cut_frame(str(path), float(t)))
        times.append(time.perf_counter() - t0)
        sizes.append(len(data))
    return {"cut_ms": statistics.median(times) * 1e3, "jpeg_bytes": statistics.median(sizes)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", default="10000,100000,1000000", help="video library sizes")
    parser.add_argument("--segments", default="120000,1200000", help="moment library sizes (12 moments per video)")
    parser.add_argument("--queries", type=int, default=100, help="warm queries per size")
    parser.add_argument("--cli_runs", type=int, default=3, help="cold CLI runs per size (0 = skip)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--load_seconds", type=float, default=10.0, help="load test length (0 = skip)")
    parser.add_argument("--work_dir", default=None, help="where the libraries are written (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="open the libraries an earlier run left in --work_dir instead of building them "
                             "(build time then reads nan)")
    parser.add_argument("--weights", choices=("file", "random"), default="file",
                        help="the model's CLIP weights: random ViT-B/32 weights saved as a file and named by a "
                             "config (as a user's weights file is read), or generated in each process "
                             "(--clip_weights random)")
    parser.add_argument("--only_cli", action="store_true",
                        help="with --reuse: only the cold CLI timings of the libraries already built")
    args = parser.parse_args(argv)

    import torch

    from unified_model import create_unified_model

    torch.set_num_threads(2)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)
    centres = np.random.default_rng(2).standard_normal((CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    flags = write_weights_file(work) if args.weights == "file" else RANDOM_FLAGS
    if args.only_cli:
        return only_cli(work, args, flags)
    if flags[0] == "--config_path":
        model = create_unified_model(config_path=flags[1], device="cpu", merge_lora=True)
    else:
        model = create_unified_model(clip_weights="random", device="cpu", merge_lora=True)
    texts = [f"{QUERY} {i}" for i in range(20)]
    queries = clustered(args.queries, 99, centres)
    print(f"# bench_search: {os.cpu_count()} CPUs, dim {DIM}, {CENTRES} clusters, work dir {work}, "
          f"model flags {' '.join(flags)}, load average {os.getloadavg()[0]:.2f}", flush=True)
    sizes = [("videos", int(n)) for n in args.videos.split(",") if n] + \
            [("segments", int(n)) for n in args.segments.split(",") if n]
    rows = []
    largest_videos = None
    for kind, n in sizes:
        root = work / f"{kind}_{n}"
        if not args.reuse:
            shutil.rmtree(root, ignore_errors=True)
        videos = n if kind == "videos" else max(1, n // SEGMENTS_PER_VIDEO)
        library, build_s, emb, seg = build(root, videos, n if kind == "segments" else 0, centres, seed=n,
                                           flags=flags, reuse=args.reuse)
        matrix = emb if kind == "videos" else seg
        info = library.shards[kind][0].index
        result = {"kind": kind, "rows": n, "build_s": build_s, "disk": folder_bytes(root / "library"),
                  "index": sum(os.path.getsize(s.file(library.root, "faiss")) for s in library.shards[kind]),
                  "index_kind": info.kind + (f" nlist {info.nlist} nprobe {info.nprobe}" if info.kind == "ivf" else "")}
        result["rss"] = search_rss(root, kind)
        result.update(warm(library, kind, queries, texts))
        result["recall"] = recall(library, kind, matrix, queries)
        result["numpy_p50"] = numpy_brute_force(matrix, queries)
        if kind == "videos":
            base = work / f"baseline_{n}"
            write_baseline(base, emb, flags)
            from modules.retrieval import search_embeddings

            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                search_embeddings(model, base, QUERY, top_k=10)
                times.append(time.perf_counter() - t0)
            result["today_warm"] = statistics.median(times)
            if args.cli_runs:
                result.update(cli_times(root, args.cli_runs, [], flags))
                result["today_cli"] = cold_cli(base, args.cli_runs, [], flags)
            largest_videos = (root, library, n)
        elif args.cli_runs:
            result.update(cli_times(root, args.cli_runs, ["--moments"], flags))
        del emb, seg, matrix
        rows.append(result)
        print(json.dumps(result), flush=True)
    adds = None
    if largest_videos is not None:
        root, library, n = largest_videos
        adds = []
        for k in range(3):
            more = clustered(1000, 7000 + k, centres)
            rows_1k = [{"name": f"added_{k}_{i:04d}", "video_path": f"/data/new/{k}_{i}.mp4"} for i in range(1000)]
            t0 = time.perf_counter()
            library.add(rows_1k, more, fingerprint=fingerprint(flags))
            adds.append(time.perf_counter() - t0)
    load = load_test(largest_videos[0], args.clients, args.load_seconds, 100000, flags) if largest_videos and args.load_seconds else None

    mib = 1024 * 1024
    print("\n| library | rows | index | build s | disk MiB | index MiB | search RSS MiB (x index) | warm p50 / p99 ms (vector) "
          "| warm p50 / p99 ms (with text encoding) | recall@10 | cold CLI s (first query) | cold CLI RSS MiB (x index) "
          "| cold CLI s, model flags "
          "| today: warm search s | today: cold CLI s | numpy brute force p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['rows']:,} | {r['index_kind']} | {r['build_s']:.1f} | {r['disk'] / mib:.0f} | "
              f"{r['index'] / mib:.0f} | {r['rss'] / mib:.0f} ({r['rss'] / max(r['index'], 1):.2f}x) | "
              f"{r['vec_p50'] * 1e3:.2f} / {r['vec_p99'] * 1e3:.2f} | {r['text_p50'] * 1e3:.1f} / {r['text_p99'] * 1e3:.1f} | "
              f"{r['recall']:.3f} | {r.get('cli', float('nan')):.2f} ({r.get('first_cli', float('nan')):.2f}) | "
              f"{r.get('cli_rss', float('nan')) / mib:.0f} ({r.get('cli_rss', float('nan')) / max(r['index'], 1):.2f}x) | "
              f"{r.get('cli_flags', float('nan')):.2f} | {r.get('today_warm', float('nan')):.2f} | "
              f"{r.get('today_cli', float('nan')):.2f} | {r['numpy_p50'] * 1e3:.1f} |")
    if adds:
        print(f"\n+1000 videos to the {largest_videos[2]:,}-video library: median {statistics.median(adds):.2f} s "
              f"(runs: {', '.join(f'{a:.2f}' for a in adds)})")
    if load:
        print(f"load test, {args.clients} clients x {args.load_seconds:.0f} s on 127.0.0.1 ({largest_videos[2]:,} videos): "
              f"{load['requests']} requests, {load['errors']} errors, {load['rps']:.0f} requests/s, "
              f"p50 {load['p50'] * 1e3:.1f} ms, p99 {load['p99'] * 1e3:.1f} ms")
    if args.cli_runs:
        print(f"fresh `python -c 'import torch'` (the floor of any cold CLI): median "
              f"{import_torch_floor(args.cli_runs):.2f} s")
    thumbs = thumbnail_cost(work)
    print(f"thumbnail at request time (640x360 H.264, 30 s, GOP 250): median {thumbs['cut_ms']:.1f} ms to seek, "
          f"decode and encode a {thumbs['jpeg_bytes'] / 1024:.1f} KiB JPEG; stored per moment at index time it would "
          f"be {thumbs['jpeg_bytes'] * SEGMENTS_PER_VIDEO / 1024:.0f} KiB per video "
          f"({thumbs['jpeg_bytes'] * SEGMENTS_PER_VIDEO * 1_000_000 / 2**30:.1f} GiB per million videos)")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def only_cli(work: Path, args: argparse.Namespace, flags: List[str]) -> int:
    """Cold CLI timings of libraries an earlier run built in ``work`` (quick, for a quiet machine)."""
    print(f"# cold CLI only: model flags {' '.join(flags)}, load average {os.getloadavg()[0]:.2f}")
    print(f"fresh `python -c 'import torch'`: median {import_torch_floor(args.cli_runs):.2f} s")
    print("\n| library | rows | cold CLI s (median) | runs | peak RSS MiB | first query s | with model flags s (median) "
          "| runs |\n|---|---|---|---|---|---|---|---|")
    for kind, n in [("videos", int(v)) for v in args.videos.split(",") if v] + \
                   [("segments", int(v)) for v in args.segments.split(",") if v]:
        root = work / f"{kind}_{n}"
        if not (root / "library" / "manifest.json").is_file():
            continue
        r = cli_times(root, args.cli_runs, ["--moments"] if kind == "segments" else [], flags)
        print(f"| {kind} | {n:,} | {r['cli']:.2f} | {', '.join(f'{t:.2f}' for t in r['cli_runs'])} | "
              f"{r['cli_rss'] / 2**20:.0f} | {r['first_cli']:.2f} | {r['cli_flags']:.2f} | "
              f"{', '.join(f'{t:.2f}' for t in r['cli_flags_runs'])} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
