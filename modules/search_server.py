"""The search server: a JSON API and one web page over a video library (FastAPI + uvicorn).

Routes (all GET):

- ``/``: the page (``modules/static/search.html``, plain HTML + JavaScript, no build step).
- ``/api/search?q=TEXT&top_k=K&moments=1``: ``{"query", "moments", "num_videos",
  "results": [{rank, name, score, row, video_url, thumb_url, [start_time, end_time, frame,
  timestamp]}], "search_time"}``. ``q`` is at most ``MAX_QUERY_CHARS`` characters, ``top_k``
  at most ``MAX_TOP_K``.
- ``/video/{row}``: the video file of library row ``row`` (HTTP range requests, so the
  player can start at the moment). Only files the library lists are served: the request
  carries a row number, never a path.
- ``/thumb/moment/{segment_row}.jpg``, ``/thumb/video/{row}.jpg``: the matched frame
  (the moment's representative frame; for a video, its middle), cut from
  the video with PyAV at request time and kept in an LRU cache.

Bad requests get a 4xx status and ``{"error": "..."}``, an unexpected failure a 500 and
``{"error": "internal server error"}``. ``q`` is always encoded as text: no request value
is ever read as a path. The server binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import collections
from fractions import Fraction
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

__all__ = ["MAX_QUERY_CHARS", "MAX_TOP_K", "create_app", "serve", "cut_frame", "encode_jpeg"]

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 200
MAX_TOP_K = 100
THUMB_WIDTH = 320
THUMB_CACHE = 4096
QUERY_CACHE = 1024
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "search.html")


def cut_frame(path: str, timestamp: float) -> np.ndarray:
    """The frame shown at ``timestamp`` seconds: uint8 (H, W, 3) RGB (the last one if past the end)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        base = float(stream.time_base) if stream.time_base else 1e-6
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        target = max(0.0, timestamp) - 0.5 / rate  # a frame whose time is within half a frame of it
        container.seek(int(max(0.0, timestamp - 1.0) / base), stream=stream, backward=True, any_frame=False)
        last = None
        for frame in container.decode(stream):
            last = frame
            if frame.pts is not None and frame.pts * base >= target:
                break
        if last is None:
            raise ValueError(f"{path}: no frame at {timestamp:.3f} s")
        return last.to_ndarray(format="rgb24")


def encode_jpeg(rgb: np.ndarray, width: int = THUMB_WIDTH) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes (PyAV's MJPEG encoder), scaled to ``width``."""
    import av

    height, src_width = rgb.shape[:2]
    width = min(width, src_width)
    out_h = max(2, int(round(height * width / src_width / 2)) * 2)
    out_w = max(2, width // 2 * 2)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
        width=out_w, height=out_h, format="yuvj420p")
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = out_w, out_h, "yuvj420p"
    codec.time_base = Fraction(1, 25)
    codec.options = {"q:v": "3"}
    packets = list(codec.encode(frame)) + list(codec.encode(None))
    return b"".join(bytes(p) for p in packets)


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


def create_app(library, max_query_chars: int = MAX_QUERY_CHARS, max_top_k: int = MAX_TOP_K):
    """The FastAPI application serving ``library`` (a :class:`modules.library.VideoLibrary`)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="video library search", docs_url=None, redoc_url=None, openapi_url=None)
    thumbs, vectors = _LRU(THUMB_CACHE), _LRU(QUERY_CACHE)
    encode_lock, snapshot_lock = threading.Lock(), threading.Lock()
    snapshot = [library]

    def current():
        """The library as on disk now (an extraction with --index may add videos while we
        serve): one snapshot per request, so no request sees two states."""
        with snapshot_lock:
            snapshot[0] = snapshot[0].latest()
            return snapshot[0]

    class Problem(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(Problem)
    async def _problem(_request: Request, err: Problem):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, err: HTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        # anything else is a bug or a broken file: logged here, a JSON 500 (no traceback) there
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse({"error": "internal server error"}, status_code=500)

    @app.get("/")
    def page():
        return FileResponse(PAGE, media_type="text/html")

    def query_vector(library, text: str) -> np.ndarray:
        vector = vectors.get(text)
        if vector is None:
            with encode_lock:  # one model, one query at a time through it
                vector = library.query_vector(text, as_text=True)  # q is text, never a server path
            vectors.put(text, vector)
        return vector

    @app.get("/api/search")
    def search(q: str = Query(..., description="query text"), top_k: int = 12, moments: bool = False):
        text = q.strip()
        if not text:
            raise Problem(400, "q: empty query")
        if len(text) > max_query_chars:
            raise Problem(400, f"q: longer than {max_query_chars} characters")
        if not 1 <= top_k <= max_top_k:
            raise Problem(400, f"top_k: must be between 1 and {max_top_k}")
        start = time.perf_counter()
        library = current()
        hits = library.search_vector(query_vector(library, text), top_k, moments=moments)
        results = []
        for hit in hits:
            item = {"rank": hit["rank"], "name": hit["name"], "score": hit["score"], "row": hit["row"],
                    "video_url": f"/video/{hit['row']}"}
            if moments:
                item.update({k: _json_number(hit[k]) for k in ("start_time", "end_time", "timestamp")},
                            frame=hit["frame"], thumb_url=f"/thumb/moment/{hit['segment_row']}.jpg")
            else:
                item["thumb_url"] = f"/thumb/video/{hit['row']}.jpg"
            results.append(item)
        return {"query": text, "moments": moments, "num_videos": len(library), "results": results,
                "search_time": round(time.perf_counter() - start, 4)}

    def video_row(row: int) -> Dict[str, Any]:
        library = current()
        total = sum(s.rows for s in library.shards["videos"])
        if not 0 <= row < total or row in library.removed:
            raise Problem(404, f"no video {row} in the library")
        return library.rows("videos", [row])[0]

    def video_file(row: int) -> str:
        path = video_row(row)["video_path"]
        if not os.path.isfile(path):
            raise Problem(404, f"video {row}: file missing")
        return path

    @app.get("/video/{row}")
    def video(row: int):
        return FileResponse(video_file(row), filename=os.path.basename(video_file(row)))

    def thumbnail(key, path: str, timestamp: float) -> Response:
        data = thumbs.get(key)
        if data is None:
            try:
                data = encode_jpeg(cut_frame(path, timestamp))
            except Exception as err:  # noqa: BLE001 - a broken video is a 404 thumbnail, not a crash
                raise Problem(404, f"no thumbnail: {' '.join(str(err).split())}") from None
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/thumb/moment/{segment_row}.jpg")
    def moment_thumb(segment_row: int):
        library = current()
        if not 0 <= segment_row < library.num_segments:
            raise Problem(404, f"no moment {segment_row} in the library")
        seg = library.rows("segments", [segment_row])[0]
        t = seg["timestamp"] if _finite(seg["timestamp"]) else seg["start_time"]
        return thumbnail(("m", segment_row), video_file(seg["video_row"]), t)

    @app.get("/thumb/video/{row}.jpg")
    def video_thumb(row: int):
        meta = video_row(row)
        duration = meta.get("duration")
        t = duration / 2 if _finite(duration) else 0.0
        return thumbnail(("v", row), video_file(row), t)

    return app


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _json_number(x: Any) -> Optional[float]:
    return round(float(x), 6) if _finite(x) else None


def serve(embeddings_dir: str, host: str = "127.0.0.1", port: int = 8000,
          encoder_factory: Optional[Callable[[Any], Any]] = None) -> None:
    """Open the library of ``embeddings_dir`` and serve it until interrupted.

    The address is bound before anything is printed: a port in use (or a host that is not
    this machine's) is a :class:`~modules.cli_support.UsageError`, and uvicorn serves on
    that very socket (no window for another process to take the port).
    """
    import socket

    import uvicorn

    from modules.cli_support import UsageError
    from modules.library import VideoLibrary

    if not 1 <= int(port) <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    library = VideoLibrary.open(embeddings_dir, encoder_factory=(lambda _fp: encoder_factory(library))
                                if encoder_factory is not None else None)
    app = create_app(library)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as err:
        sock.close()
        reason = err.strerror or str(err)
        raise UsageError(f"cannot serve on {host}:{port}: {reason} (choose another --port or --host)") from None
    sock.set_inheritable(True)
    config = uvicorn.Config(app, host=host, port=int(port), log_level="warning")
    print(f"Serving {len(library)} videos ({library.num_segments} moments) from {library.root} "
          f"on http://{host}:{port}  (Ctrl-C stops)", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
