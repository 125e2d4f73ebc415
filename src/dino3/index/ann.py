"""The approximate search: FAISS's inverted-file index with full vectors (IndexIVFFlat), inner product.

Chosen by measuring FAISS IVF-Flat, FAISS HNSW and usearch HNSW here (benchmarks/RESULTS.md, "Similarity
index"): IVF-Flat builds several times faster on 2 cores, reaches the recall goal well under the
latency goal, stores the vectors themselves (so its scores are exact cosines), removes vectors in
place (FAISS's HNSW cannot), and answers range queries (all pairs above a threshold: what dedup needs).

The vectors are split into `nlist` cells around k-means centroids; a query scans the `nprobe` cells
nearest to it. `nprobe` is chosen when the index is built, on the index's own data: the smallest
that finds at least RECALL_TARGET of the exact 10 nearest neighbours of a sample of its vectors.
Ids are the items' ids. FAISS runs on its own threads (OpenMP); nothing here changes its settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError

RECALL_TARGET = 0.97  # recall@10 the calibration asks for (the goal is 0.95; this leaves a margin)
CALIBRATION_QUERIES = 256
TRAIN_ITERATIONS = 10  # k-means iterations (FAISS's default for IVF)
POINTS_PER_CELL = 64  # k-means training sample: this many vectors per cell at most


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise UsageError(
            'the approximate search needs FAISS: pip install "dino3[index]" (or faiss-cpu), or search with --exact'
        ) from None
    return faiss


def cells_for(count: int) -> int:
    """How many cells for `count` vectors: about 2 sqrt(N), with at least ~40 training points each."""
    return max(1, min(int(round(2 * math.sqrt(count))), count // 40))


@dataclass
class IVF:
    index: Any  # faiss.IndexIVFFlat
    nprobe: int
    trained_on: int  # how many vectors the centroids were trained on (the index size then)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, seed: int = 0) -> IVF:
        """Train the centroids on `vectors` (N, D), add them all, and calibrate nprobe."""
        faiss = faiss_module()
        count, dim = vectors.shape
        nlist = cells_for(count)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = TRAIN_ITERATIONS
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # cells_for() keeps >= 40 points per cell, but for tiny indexes
        rng = np.random.default_rng(seed)
        sample = (
            vectors
            if count <= POINTS_PER_CELL * nlist
            else vectors[np.sort(rng.choice(count, POINTS_PER_CELL * nlist, replace=False))]
        )
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        for start in range(0, count, 65536):  # in pieces: no second copy of a large array
            index.add_with_ids(
                np.ascontiguousarray(vectors[start : start + 65536], dtype=np.float32), ids[start : start + 65536]
            )
        ivf = cls(index, nprobe=1, trained_on=count)
        ivf.nprobe = ivf.calibrate(vectors, ids, rng)
        return ivf

    def calibrate(self, vectors: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> int:
        """The smallest nprobe (1, 2, 4, ...) whose recall@10 on a sample of the index's own vectors
        (each query's own vector left out) reaches RECALL_TARGET."""
        from .exact import top_k

        count = len(vectors)
        nlist = int(self.index.nlist)
        if count <= 11 or nlist == 1:
            return nlist
        rows = np.sort(rng.choice(count, min(CALIBRATION_QUERIES, count), replace=False))
        queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        _, truth_ids = top_k(queries, [(vectors, ids, None)], 11)
        truth = [set(t.tolist()) - {int(ids[r])} for t, r in zip(truth_ids, rows)]  # the query itself left out
        nprobe = 1
        while nprobe < nlist:
            _, found = self.search(queries, 11, nprobe=nprobe)
            hits = sum(len(t & set(row.tolist())) for t, row in zip(truth, found))
            if hits / sum(len(t) for t in truth) >= RECALL_TARGET:
                return nprobe
            nprobe *= 2
        return nlist

    @property
    def faiss(self):
        return faiss_module()

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.index.remove_ids(self.faiss.IDSelectorBatch(np.asarray(ids, np.int64)))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first; id -1 where fewer than k were found."""
        params = self.faiss.SearchParametersIVF(nprobe=min(nprobe or self.nprobe, int(self.index.nlist)))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query, id) with score >= threshold: (lims (Q+1,), scores, ids) as FAISS gives them."""
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # FAISS keeps score > radius
        params = self.faiss.SearchParametersIVF(nprobe=min(self.nprobe, int(self.index.nlist)))
        return self.index.range_search(np.ascontiguousarray(queries, dtype=np.float32), radius, params=params)

    def write(self, file) -> None:
        self.faiss.write_index(self.index, self.faiss.PyCallbackIOWriter(file.write))

    @classmethod
    def read(cls, file, info: dict[str, Any]) -> IVF:
        faiss = faiss_module()
        file.seek(0)
        index = faiss.read_index(faiss.PyCallbackIOReader(file.read))
        return cls(index, nprobe=int(info["nprobe"]), trained_on=int(info["trained_on"]))

    def info(self) -> dict[str, Any]:
        return {
            "kind": "faiss-ivf-flat",
            "nlist": int(self.index.nlist),
            "nprobe": self.nprobe,
            "trained_on": self.trained_on,
        }
