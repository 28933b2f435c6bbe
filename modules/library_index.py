"""FAISS indexes of one library shard: exact up to a size, IVF beyond it, recall calibrated.

A shard's matrix (N, D) float32 of unit vectors gets:

- ``IndexFlatIP`` (exact inner product) when ``N <= EXACT_MAX_ROWS``: one query scans
  N x D floats (32768 x 512 = 64 MiB). A flat scan of 100k rows measured 82 ms per query
  in benchmarks/bench_search.py on the busy 2-core machine, too slow for the 20 ms target:
  beyond 32768 rows the IVF index answers;
- ``IndexIVFFlat`` (inner product, ``nlist`` k-means cells) beyond it. ``nprobe`` is chosen
  at build time: the smallest power of two whose recall@10 against exact search, on
  ``CALIBRATION_QUERIES`` queries made from the shard's own rows plus noise, reaches
  ``TARGET_RECALL``. The chosen value and the recall it measured are returned and stored
  in the library manifest.

IVF indexes are read memory-mapped (``IO_FLAG_MMAP``), flat ones with ``IO_FLAG_MMAP_IFC``,
so opening a library of a million rows does not read the whole matrix before the first
query. Pure numpy + faiss: no torch here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["EXACT_MAX_ROWS", "TARGET_RECALL", "IndexInfo", "build_index", "read_index", "search_index",
           "recall_at_k", "exact_top_k", "load_faiss"]

#: largest shard searched exactly (IndexFlatIP); larger shards get an IVF index
EXACT_MAX_ROWS = 32768
#: recall@10 against exact search that the IVF nprobe calibration aims for
TARGET_RECALL = 0.97
CALIBRATION_QUERIES = 200
#: k-means training points per IVF cell (faiss warns below 39)
TRAIN_POINTS_PER_CELL = 48


@dataclass
class IndexInfo:
    """What the manifest records about a shard's index."""

    kind: str  # "flat" | "ivf"
    nlist: int = 0
    nprobe: int = 0
    calibrated_recall: Optional[float] = None

    def to_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe,
                "calibrated_recall": self.calibrated_recall}

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "IndexInfo":
        return cls(str(data["kind"]), int(data.get("nlist") or 0), int(data.get("nprobe") or 0),
                   data.get("calibrated_recall"))


def load_faiss():
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs two INFO lines on import
    import faiss

    return faiss


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, k: int, block: int = 65536) -> np.ndarray:
    """Row ids of the k largest inner products per query, best first: (Q, k) int64 (numpy)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(matrix), block):
        scores = queries @ np.asarray(matrix[start:start + block], dtype=np.float32).T
        ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
            best_ids = np.take_along_axis(best_ids, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean share of the true top-k ids that ``found`` (Q, >= k) also lists in its top k."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def _nlist_for(rows: int) -> int:
    """IVF cells: about sqrt(rows), a power of two between 256 and 4096."""
    return int(min(4096, max(256, 2 ** round(math.log2(math.sqrt(rows))))))


def _calibration_queries(matrix: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of the shard moved off themselves by noise of their own norm, renormalised."""
    rows = np.asarray(matrix[np.sort(rng.choice(len(matrix), size=min(count, len(matrix)), replace=False))],
                      dtype=np.float32)
    noise = rng.standard_normal(rows.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    queries = rows + noise * np.linalg.norm(rows, axis=1, keepdims=True)
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def build_index(matrix: np.ndarray, exact_max_rows: Optional[int] = None, seed: int = 0):
    """(faiss index, IndexInfo) for an (N, D) float32 matrix of unit vectors.

    ``exact_max_rows``: largest matrix indexed exactly (default: ``EXACT_MAX_ROWS``).
    """
    faiss = load_faiss()
    rows, dim = matrix.shape
    exact_max_rows = EXACT_MAX_ROWS if exact_max_rows is None else exact_max_rows
    if rows <= exact_max_rows:
        index = faiss.IndexFlatIP(dim)
        if rows:
            index.add(np.ascontiguousarray(matrix, dtype=np.float32))
        return index, IndexInfo("flat")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building is big work: every core (searching uses one)
    try:
        return _build_ivf(matrix, seed)
    finally:
        faiss.omp_set_num_threads(threads)


def _build_ivf(matrix: np.ndarray, seed: int):
    faiss = load_faiss()
    rows, dim = matrix.shape
    rng = np.random.default_rng(seed)
    nlist = _nlist_for(rows)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    train = np.sort(rng.choice(rows, size=min(rows, nlist * TRAIN_POINTS_PER_CELL), replace=False))
    index.train(np.ascontiguousarray(matrix[train], dtype=np.float32))
    for start in range(0, rows, 262144):  # in blocks: a memory-mapped matrix is not copied whole
        index.add(np.ascontiguousarray(matrix[start:start + 262144], dtype=np.float32))
    queries = _calibration_queries(matrix, CALIBRATION_QUERIES, rng)
    truth = exact_top_k(matrix, queries, 10)
    nprobe, recall = nlist, 1.0
    probe = 1
    while probe <= nlist:
        index.nprobe = probe
        _, found = index.search(queries, 10)
        recall = recall_at_k(found, truth, 10)
        if recall >= TARGET_RECALL:
            nprobe = probe
            break
        probe *= 2
    index.nprobe = nprobe
    return index, IndexInfo("ivf", nlist=nlist, nprobe=nprobe, calibrated_recall=round(recall, 4))


def read_index(path: str, info: IndexInfo):
    """The shard index, memory-mapped, with the manifest's nprobe applied."""
    faiss = load_faiss()
    flag = faiss.IO_FLAG_MMAP if info.kind == "ivf" else faiss.IO_FLAG_MMAP_IFC
    index = faiss.read_index(os.fspath(path), flag | faiss.IO_FLAG_READ_ONLY)
    if info.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = info.nprobe
    return index


def search_index(index, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k'), local row ids (Q, k')) with k' = min(k, rows); ids -1 dropped by callers."""
    k = min(k, index.ntotal)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
