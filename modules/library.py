"""A searchable video library: Parquet rows + .npy matrices + FAISS indexes, append-only shards.

Layout of a library folder (``<output_dir>/library`` by default)::

    manifest.json                    the only file ever replaced; lists the live shards
    videos-g000003-s00000.parquet    one row per video (VIDEO_SCHEMA), row groups of 65536
    videos-g000003-s00000.npy        (N, D) float32 video embeddings of those rows
    videos-g000003-s00000.faiss      the shard's index (flat up to EXACT_MAX_ROWS, IVF beyond)
    segments-g000003-s00000.*        the same for segments (SEGMENT_SCHEMA, group features)

A video's *row* (its position over all video shards in manifest order) never changes, and
segments refer to their video by that row, so shards are never renumbered. An update
(:meth:`VideoLibrary.add`) writes new shard files under a new generation number, then
replaces ``manifest.json`` atomically (write to a temporary file + ``os.replace``), then
deletes the files the old manifest listed and the new one does not. An interrupted update
therefore leaves the previous manifest and all its files in place; its stray files are
removed by the next update. Small updates merge into the last shard while it has fewer than
``OPEN_SHARD_ROWS`` rows (so adding 10 videos rewrites at most that many rows, never the
million before them); larger ones start new shards of at most ``MAX_SHARD_ROWS`` rows.
A video added again under the same name replaces the old row: the old row is listed in the
manifest's ``removed_videos`` and never returned.

One library holds embeddings of one model: the manifest records its fingerprint (the
extraction's config, CLIP weights and checkpoint) and :meth:`VideoLibrary.add` refuses
another.

Pure numpy + pyarrow + faiss: searching by vector needs no torch. Text and image queries
use a query encoder (:mod:`modules.library_query`) built on first use and kept.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from modules.library_files import (MANIFEST, ROW_GROUP_ROWS, SCHEMAS, VIDEO_DEFAULTS, LibraryError, check_matrix, segment_row,
                                   segment_schema, video_schema, write_manifest, write_shard)
from modules.json_input import read_output_json
from modules.library_index import IndexInfo, load_faiss, read_index, search_index

__all__ = ["LIBRARY_DIR", "MANIFEST", "LibraryError", "VideoLibrary", "fingerprint_id", "describe_fingerprint",
           "video_schema", "segment_schema", "library_path"]

logger = logging.getLogger(__name__)

LIBRARY_DIR = "library"
FORMAT = "unified-video-library"
VERSION = 1
#: decoded row groups kept per open library (at most 512 x 4096 rows)
ROW_GROUP_CACHE = 512
OPEN_SHARD_ROWS = 65536
MAX_SHARD_ROWS = 1_000_000
KINDS = ("videos", "segments")
#: FAISS (OpenMP) threads for searching: one query is too little work to share, and idle
#: OpenMP threads spin: on a busy 2-core machine 2 threads made a query 7x slower than 1.
#: The server runs requests side by side instead. None leaves FAISS's setting alone.
SEARCH_THREADS: Optional[int] = 1
#: fingerprint keys that do not change what the model computes
_FINGERPRINT_IGNORED = ("config_path", "embed_dim")
PathLike = Union[str, os.PathLike]


def fingerprint_id(fingerprint: Mapping[str, Any]) -> str:
    """The model's identity: extraction's ``fingerprint`` (weights identity + checkpoint +
    config) when recorded, else a hash of the config, weights and checkpoint fields."""
    if fingerprint.get("fingerprint"):  # extraction's model fingerprint (unified_model.model_fingerprint)
        return str(fingerprint["fingerprint"])
    kept = {k: v for k, v in fingerprint.items() if k not in _FINGERPRINT_IGNORED}
    if kept.get("checkpoint"):
        kept["checkpoint"] = os.path.abspath(str(kept["checkpoint"]))
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_fingerprint(fingerprint: Mapping[str, Any]) -> str:
    parts = [f"clip_weights={fingerprint.get('clip_weights')!r}", f"checkpoint={fingerprint.get('checkpoint')!r}"]
    if fingerprint.get("config_path"):
        parts.append(f"config_path={fingerprint['config_path']!r}")
    return ", ".join(parts) + f" [{fingerprint_id(fingerprint)}]"


def _file_key(st: os.stat_result) -> Tuple[int, int, int]:
    """What changes when a file is replaced (an atomic rename gives a new inode)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def library_path(output_dir: PathLike) -> str:
    """Where extraction keeps the library of ``output_dir``."""
    return os.path.join(os.fspath(output_dir), LIBRARY_DIR)


@dataclass
class _Shard:
    kind: str
    rows: int
    stem: str
    index: IndexInfo

    def file(self, root: str, ext: str) -> str:
        return os.path.join(root, f"{self.stem}.{ext}")

    def to_dict(self) -> Dict[str, Any]:
        return {"rows": self.rows, "stem": self.stem, "index": self.index.to_dict()}

    @classmethod
    def from_dict(cls, kind: str, data: Mapping[str, Any]) -> "_Shard":
        stem = str(data["stem"])
        if os.path.basename(stem) != stem or not stem.startswith(kind + "-"):
            raise ValueError(f"bad shard name {stem!r}")
        return cls(kind, int(data["rows"]), stem, IndexInfo.from_dict(data["index"]))


class VideoLibrary:
    """Videos and their moments, searchable by text, image or vector.

    ``VideoLibrary.open(path)`` for an existing library, ``VideoLibrary.create(path,
    fingerprint, dim)`` for a new one (or ``open_or_create``). ``len(lib)`` is the number of
    live videos; iterating yields their rows as dicts; :meth:`table` / :meth:`to_pandas`
    give the whole videos table; :meth:`embeddings` the (N, D) matrix memory-mapped.
    """

    def __init__(self, root: str, manifest: Dict[str, Any], encoder_factory: Optional[Callable[[Dict[str, Any]], Any]] = None,
                 search_threads: Optional[int] = SEARCH_THREADS):
        self.root = root
        self.search_threads = search_threads
        self._manifest = manifest
        self.fingerprint: Dict[str, Any] = dict(manifest["fingerprint"])
        self.fingerprint_id: str = manifest["fingerprint_id"]
        self.dim: int = int(manifest["dim"])
        self.shards: Dict[str, List[_Shard]] = {k: [_Shard.from_dict(k, s) for s in manifest[k]] for k in KINDS}
        self.removed = frozenset(int(r) for r in manifest.get("removed_videos", []))
        self._encoder_factory = encoder_factory
        self._encoder = None
        self._indexes: Dict[Tuple[str, int], Any] = {}
        self._parquet: Dict[Tuple[str, int], Any] = {}
        self._groups: "collections.OrderedDict[Tuple[str, int, int], Any]" = collections.OrderedDict()
        self._manifest_key: Optional[Tuple[int, int, int]] = None  # (inode, size, mtime_ns) of the manifest read

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: PathLike, encoder_factory: Optional[Callable[[Dict[str, Any]], Any]] = None) -> "VideoLibrary":
        """Open a library folder (or an extraction output folder containing ``library/``).

        ``encoder_factory(fingerprint) -> encoder`` builds the text/image query encoder on
        the first text or image query (default: :func:`modules.library_query.encoder_for` on this folder).
        """
        root = os.fspath(path)
        if not os.path.isfile(os.path.join(root, MANIFEST)) and os.path.isfile(os.path.join(root, LIBRARY_DIR, MANIFEST)):
            root = os.path.join(root, LIBRARY_DIR)
        manifest_path = os.path.join(root, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise LibraryError(f"no video library at {root} (missing {MANIFEST}); "
                               "build one with extract_video_embeddings.py --index")
        try:
            read: list = []
            manifest = read_output_json(manifest_path, "library manifest", stat=read)
            key = _file_key(read[0])  # of the file read, not of the name later
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            if manifest.get("format") != FORMAT or int(manifest.get("version", -1)) != VERSION:
                raise ValueError(f"not a version {VERSION} {FORMAT} manifest")
            library = cls(root, manifest, encoder_factory)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LibraryError(f"{manifest_path}: unreadable library manifest ({err})") from None
        library._manifest_key = key
        return library

    def latest(self) -> "VideoLibrary":
        """The library as it is on disk now: ``self`` when no update replaced its manifest
        since it was opened, else a new snapshot sharing this one's query encoder.

        A snapshot stays searchable through one more update (an update deletes the files of
        the generation before the one it replaces), so a reader that calls ``latest()``
        before each search never reads a deleted file; rows keep their numbers.
        """
        try:
            key = _file_key(os.stat(os.path.join(self.root, MANIFEST)))
        except OSError:
            return self
        if key == self._manifest_key:
            return self
        fresh = VideoLibrary.open(self.root, self._encoder_factory)
        fresh._encoder = self._encoder
        return fresh

    @classmethod
    def create(cls, path: PathLike, fingerprint: Mapping[str, Any], dim: int,
               encoder_factory: Optional[Callable[[Dict[str, Any]], Any]] = None) -> "VideoLibrary":
        """A new empty library for embeddings of ``dim`` dimensions from one model."""
        root = os.fspath(path)
        if os.path.exists(os.path.join(root, MANIFEST)):
            raise LibraryError(f"{root}: a library exists already (open it instead)")
        os.makedirs(root, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "generation": 0, "dim": int(dim),
                    "fingerprint": dict(fingerprint), "fingerprint_id": fingerprint_id(fingerprint),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"), "videos": [], "segments": [], "removed_videos": []}
        write_manifest(root, manifest)
        library = cls(root, manifest, encoder_factory)
        library._manifest_key = _file_key(os.stat(os.path.join(root, MANIFEST)))
        return library

    @classmethod
    def open_or_create(cls, path: PathLike, fingerprint: Mapping[str, Any], dim: int, **kw) -> "VideoLibrary":
        if os.path.isfile(os.path.join(os.fspath(path), MANIFEST)):
            library = cls.open(path, **kw)
            library.check_fingerprint(fingerprint)
            return library
        return cls.create(path, fingerprint, dim, **kw)

    def check_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        """Refuse embeddings of another model than the library's."""
        if fingerprint_id(fingerprint) != self.fingerprint_id:
            raise LibraryError(
                f"{self.root} holds embeddings of another model ({describe_fingerprint(self.fingerprint)}); "
                f"this run uses {describe_fingerprint(fingerprint)}. Pass the library's --config_path / "
                f"--checkpoint / --clip_weights, or write to another --output_dir (or delete {self.root} to rebuild)")

    # ------------------------------------------------------------------ rows
    def _rows(self, kind: str) -> int:
        return sum(s.rows for s in self.shards[kind])

    def __len__(self) -> int:
        return self._rows("videos") - len(self.removed)

    @property
    def num_segments(self) -> int:
        return self._rows("segments")

    def _shard_table(self, kind: str, i: int):
        import pyarrow.parquet as pq

        return pq.read_table(self.shards[kind][i].file(self.root, "parquet"), memory_map=True)

    def table(self, kind: str = "videos", include_removed: bool = False):
        """The whole table as a ``pyarrow.Table`` with a ``row`` column (``.to_pandas()`` with pandas installed; pandas is not a dependency)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        parts, offset = [], 0
        for i, shard in enumerate(self.shards[kind]):
            t = self._shard_table(kind, i)
            parts.append(t.add_column(0, "row", pa.array(np.arange(offset, offset + shard.rows, dtype=np.int64))))
            offset += shard.rows
        if not parts:
            return SCHEMAS[kind]().empty_table().add_column(0, "row", pa.array([], pa.int64()))
        table = pa.concat_tables(parts)
        if self.removed and not include_removed:
            column = "row" if kind == "videos" else "video_row"
            table = table.filter(pc.invert(pc.is_in(table[column], pa.array(sorted(self.removed), pa.int64()))))
        return table

    def to_pandas(self, kind: str = "videos"):
        """The table as a pandas DataFrame (needs pandas installed)."""
        return self.table(kind).to_pandas()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        offset = 0
        for i, shard in enumerate(self.shards["videos"]):
            for j, row in enumerate(self._shard_table("videos", i).to_pylist()):
                if offset + j not in self.removed:
                    yield {"row": offset + j, **row}
            offset += shard.rows

    def embeddings(self, kind: str = "videos") -> np.ndarray:
        """The (rows, D) float32 matrix, memory-mapped (rows include replaced videos' rows).

        One shard: the memory-mapped file itself. Several: their concatenation (a copy);
        :meth:`embedding_shards` gives the memory-mapped shards without copying.
        """
        shards = self.embedding_shards(kind)
        if len(shards) == 1:
            return shards[0]
        return np.concatenate(shards) if shards else np.zeros((0, self.dim), np.float32)

    def embedding_shards(self, kind: str = "videos") -> List[np.ndarray]:
        return [np.load(s.file(self.root, "npy"), mmap_mode="r", allow_pickle=False) for s in self.shards[kind]]

    def rows(self, kind: str, rows: Sequence[int]) -> List[Dict[str, Any]]:
        """The given global rows of a table as dicts, read by row group (no full table load)."""
        out: Dict[int, Dict[str, Any]] = {}
        starts = np.cumsum([0] + [s.rows for s in self.shards[kind]])
        wanted: Dict[Tuple[int, int], List[int]] = {}
        for row in rows:
            shard = int(np.searchsorted(starts, row, side="right") - 1)
            local = int(row - starts[shard])
            wanted.setdefault((shard, local // ROW_GROUP_ROWS), []).append(int(row))
        for (shard, group), members in wanted.items():
            table = self._row_group(kind, shard, group)
            base = starts[shard] + group * ROW_GROUP_ROWS
            picked = table.take([r - base for r in members]).to_pylist()
            out.update(zip(members, picked))
        return [{"row": int(r), **out[int(r)]} for r in rows]

    def _row_group(self, kind: str, shard: int, group: int):
        """One decoded row group, from a small LRU (warm searches read no Parquet)."""
        import pyarrow.parquet as pq

        key = (kind, shard, group)
        table = self._groups.get(key)
        if table is None:
            if (kind, shard) not in self._parquet:
                self._parquet[(kind, shard)] = pq.ParquetFile(self.shards[kind][shard].file(self.root, "parquet"),
                                                             memory_map=True)
            table = self._parquet[(kind, shard)].read_row_group(group)
            self._groups[key] = table
            if len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return table

    # ------------------------------------------------------------------ search
    def _index(self, kind: str, i: int):
        key = (kind, i)
        if key not in self._indexes:
            if self.search_threads is not None:
                load_faiss().omp_set_num_threads(self.search_threads)
            shard = self.shards[kind][i]
            self._indexes[key] = read_index(shard.file(self.root, "faiss"), shard.index)
        return self._indexes[key]

    def search_vectors(self, queries: np.ndarray, top_k: int, kind: str = "videos") -> List[List[Tuple[int, float]]]:
        """(Q, D) unit query vectors -> per query [(global row, score)], best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise LibraryError(f"query has {queries.shape[1]} dimensions, the library's embeddings {self.dim}")
        removed_here = self.removed if kind == "videos" else None
        fetch = top_k + (len(self.removed) if self.removed else 0)
        merged: List[List[Tuple[int, float]]] = [[] for _ in range(len(queries))]
        offset = 0
        for i, shard in enumerate(self.shards[kind]):
            if shard.rows:
                scores, ids = search_index(self._index(kind, i), queries, fetch)
                for q in range(len(queries)):
                    merged[q].extend((offset + int(j), float(s)) for s, j in zip(scores[q], ids[q]) if j >= 0)
            offset += shard.rows
        results = []
        for hits in merged:
            hits.sort(key=lambda h: (-h[1], h[0]))
            if removed_here:
                hits = [h for h in hits if h[0] not in removed_here]
            results.append(hits)
        return results

    def _segment_hits(self, query: np.ndarray, top_k: int) -> List[Tuple[int, float]]:
        fetch = top_k
        while True:  # segments of replaced videos are skipped; fetch more until enough remain
            hits = self.search_vectors(query, fetch, "segments")[0]
            if not self.removed:
                return hits[:top_k]
            rows = self.rows("segments", [h[0] for h in hits])
            live = [h for h, r in zip(hits, rows) if r["video_row"] not in self.removed]
            if len(live) >= top_k or fetch >= self.num_segments:
                return live[:top_k]
            fetch *= 4

    def encoder(self):
        """The text/image query encoder, built on first use and kept."""
        if self._encoder is None:
            if self._encoder_factory is not None:
                self._encoder = self._encoder_factory(self.fingerprint)
            else:
                from modules.library_query import encoder_for

                self._encoder = encoder_for(self.fingerprint, folder=self.root)
        return self._encoder

    def query_vector(self, query: Any, image: Optional[PathLike] = None, as_text: bool = False) -> np.ndarray:
        """Text, image path (``image=`` or an existing path with an image extension) or vector -> (D,).

        ``as_text=True``: ``query`` is a text, encoded as such whatever it looks like (the
        filesystem is never consulted; the search server's queries come this way).
        """
        from modules.library_query import is_image_path

        if as_text:
            if image is not None or not isinstance(query, str) or not query.strip():
                raise LibraryError("as_text=True needs a non-empty text query (and no image=)")
            vector = self.encoder().encode_text([query])[0]
        elif image is not None:
            vector = self.encoder().encode_image(image)
        elif isinstance(query, np.ndarray) or (isinstance(query, (list, tuple)) and query and not isinstance(query[0], str)):
            vector = np.asarray(query, dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(vector))
            if not np.isfinite(norm) or norm == 0:
                raise LibraryError("query vector is zero or not finite")
            vector = vector / norm
        elif isinstance(query, os.PathLike) or (isinstance(query, str) and is_image_path(query)):
            vector = self.encoder().encode_image(query)
        elif isinstance(query, str) and query.strip():
            vector = self.encoder().encode_text([query])[0]
        else:
            raise LibraryError(f"query must be a non-empty text, an image path or a vector, got {type(query).__name__}")
        if vector.shape[0] != self.dim:
            raise LibraryError(f"query has {vector.shape[0]} dimensions, the library's embeddings {self.dim}: "
                               "the query model is not the library's")
        return vector

    def search(self, query: Any = None, top_k: int = 10, moments: bool = False,
               image: Optional[PathLike] = None, as_text: bool = False) -> List[Dict[str, Any]]:
        """Best first: videos ``{rank, row, name, video_path, score}`` or moments ``{rank,
        row, name, video_path, video_row, start_time, end_time, frame, timestamp, score, ...}``.

        A str that names an existing picture file is a query by example; ``as_text=True``
        searches it as text instead (and never looks at the filesystem).
        """
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise LibraryError(f"top_k must be a positive integer, got {top_k!r}")
        vector = self.query_vector(query, image=image, as_text=as_text)
        return self.search_vector(vector, int(top_k), moments)

    def search_vector(self, vector: np.ndarray, top_k: int, moments: bool = False) -> List[Dict[str, Any]]:
        if not moments:
            hits = self.search_vectors(vector, top_k, "videos")[0][:top_k]
            rows = self.rows("videos", [h[0] for h in hits])
            return [{"rank": r + 1, "row": h[0], "name": row["name"], "video_path": row["video_path"],
                     "score": round(h[1], 6)} for r, (h, row) in enumerate(zip(hits, rows))]
        hits = self._segment_hits(vector, top_k)
        segments = self.rows("segments", [h[0] for h in hits])
        videos = {v["row"]: v for v in self.rows("videos", sorted({s["video_row"] for s in segments}))}
        out = []
        for r, (h, seg) in enumerate(zip(hits, segments)):
            video = videos[seg["video_row"]]
            out.append({"rank": r + 1, "segment_row": h[0], "row": seg["video_row"], "name": video["name"],
                        "video_path": video["video_path"], "score": round(h[1], 6),
                        **{k: seg[k] for k in ("start_time", "end_time", "frame", "timestamp", "start_frame",
                                               "end_frame", "window_index", "group_index")}})
        return out

    # ------------------------------------------------------------------ updates
    def add(self, videos: Sequence[Mapping[str, Any]], embeddings: np.ndarray,
            segments: Sequence[Mapping[str, Any]] = (), segment_features: Optional[np.ndarray] = None,
            fingerprint: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
        """Add videos (and their segments) in one atomic update.

        Args:
            videos: one mapping per video: ``name``, ``video_path`` (required), the other
                VIDEO_SCHEMA fields optional. A name already in the library replaces it.
            embeddings: (len(videos), D) float32 unit vectors.
            segments: mappings with ``video`` (index into ``videos``), ``group_index``,
                ``start_time``, ``end_time``, ``frame`` and optional SEGMENT_SCHEMA fields.
            segment_features: (len(segments), D) float32.
            fingerprint: the model that computed them; refused when not the library's.

        Returns:
            {"videos": added, "segments": added, "replaced": count, "rewritten_rows": rows
            of existing shards rewritten (bounded by OPEN_SHARD_ROWS per kind)}.
        """
        if fingerprint is not None:
            self.check_fingerprint(fingerprint)
        embeddings = check_matrix(embeddings, len(videos), self.dim, "embeddings")
        segment_features = check_matrix(segment_features if segment_features is not None else
                                         np.zeros((0, self.dim), np.float32), len(segments), self.dim, "segment_features")
        names = [str(v["name"]) for v in videos]
        if len(set(names)) != len(names):
            raise LibraryError("add(): the same video name twice in one update")
        with self._lock():
            fresh = VideoLibrary.open(self.root, self._encoder_factory)  # another writer may have added meanwhile
            self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k not in ("_encoder", "_encoder_factory")})
            first_row = self._rows("videos")
            existing = self._name_rows(set(names))
            video_rows = [self._video_row(v) for v in videos]
            segment_rows = []
            for s in segments:
                index = int(s["video"])
                if not 0 <= index < len(videos):
                    raise LibraryError(f"segment refers to video {index}, but {len(videos)} videos are added")
                segment_rows.append(segment_row(s, first_row + index))
            manifest = json.loads(json.dumps(self._manifest))
            generation = int(manifest["generation"]) + 1
            manifest["generation"] = generation
            rewritten = 0
            rewritten += self._append(manifest, "videos", video_rows, embeddings, generation)
            rewritten += self._append(manifest, "segments", segment_rows, segment_features, generation)
            manifest["removed_videos"] = sorted(self.removed | set(existing.values()))
            manifest["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
            # the files this update replaces stay until the next one: readers of the previous
            # manifest can finish (and see the update through latest())
            replaced = {s.stem for k in KINDS for s in self.shards[k]}
            manifest["retired"] = sorted(replaced - {s["stem"] for k in KINDS for s in manifest[k]})
            write_manifest(self.root, manifest)
            self._reload(manifest)
            self._manifest_key = _file_key(os.stat(os.path.join(self.root, MANIFEST)))
            self._remove_unlisted()
        return {"videos": len(videos), "segments": len(segments), "replaced": len(existing), "rewritten_rows": rewritten}

    def _reload(self, manifest: Dict[str, Any]) -> None:
        fresh = VideoLibrary(self.root, manifest, self._encoder_factory)
        fresh._encoder = self._encoder
        self.__dict__.update(fresh.__dict__)

    def names(self) -> Dict[str, int]:
        """Live video name -> row."""
        import pyarrow.parquet as pq

        out: Dict[str, int] = {}
        offset = 0
        for shard in self.shards["videos"]:
            column = pq.read_table(shard.file(self.root, "parquet"), columns=["name"])["name"].to_pylist()
            out.update((n, offset + j) for j, n in enumerate(column) if offset + j not in self.removed)
            offset += shard.rows
        return out

    def _name_rows(self, names: set) -> Dict[str, int]:
        return {n: r for n, r in self.names().items() if n in names} if names else {}

    def _video_row(self, video: Mapping[str, Any]) -> Dict[str, Any]:
        row = {**VIDEO_DEFAULTS, **{k: video[k] for k in video if k in video_schema().names}}
        for key in ("name", "video_path"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise LibraryError(f"add(): every video needs a non-empty {key!r}")
        row["video_path"] = os.path.abspath(row["video_path"])
        row["given_path"] = row["given_path"] if row["given_path"] is not None else video["video_path"]
        row["fingerprint"] = self.fingerprint_id
        return row

    def _append(self, manifest: Dict[str, Any], kind: str, rows: List[Dict[str, Any]], matrix: np.ndarray,
                generation: int) -> int:
        """Write the new shards of ``kind`` and list them in ``manifest``; returns rows rewritten."""
        if not rows:
            return 0
        shards = manifest[kind]
        rewritten = 0
        old_rows: List[Dict[str, Any]] = []
        old_matrix = np.zeros((0, self.dim), np.float32)
        if shards and shards[-1]["rows"] < OPEN_SHARD_ROWS:  # merge into the open tail shard
            tail = _Shard.from_dict(kind, shards.pop())
            import pyarrow.parquet as pq

            old_rows = pq.read_table(tail.file(self.root, "parquet")).to_pylist()
            old_matrix = np.load(tail.file(self.root, "npy"), allow_pickle=False)
            rewritten = tail.rows
        all_rows = old_rows + rows
        all_matrix = np.concatenate([old_matrix, matrix]) if len(old_matrix) else matrix
        for number, start in enumerate(range(0, len(all_rows), MAX_SHARD_ROWS)):
            stem = f"{kind}-g{generation:06d}-s{len(shards):05d}"
            part = slice(start, start + MAX_SHARD_ROWS)
            info = write_shard(self.root, stem, kind, all_rows[part], all_matrix[part])
            shards.append(_Shard(kind, len(all_rows[part]), stem, info).to_dict())
        return rewritten

    def _remove_unlisted(self) -> None:
        """Delete shard files the manifest neither lists nor just retired (older generations,
        interrupted updates)."""
        live = {s.stem for k in KINDS for s in self.shards[k]} | set(self._manifest.get("retired", []))
        for fname in os.listdir(self.root):
            stem, _, ext = fname.lstrip(".").partition(".")
            if stem.startswith(KINDS) and ext.split(".")[0] in ("parquet", "npy", "faiss") and stem not in live:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.root, fname))

    @contextlib.contextmanager
    def _lock(self):
        with open(os.path.join(self.root, ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
