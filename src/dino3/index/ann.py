"""The approximate search: FAISS's HNSW graph over the full vectors (IndexHNSWFlat, inner product),
with the item id of each of its vectors beside it.

Chosen by measuring FAISS HNSW, FAISS IVF-Flat and usearch's HNSW here (benchmarks/RESULTS.md,
"Similarity index"): on clustered vectors of realistic intrinsic dimension, IVF needs to scan a large
part of the index to reach the recall goal (24 ms a query at 200k vectors), HNSW well under a
millisecond; FAISS's HNSW built faster than usearch's and searched faster, and keeps the full
vectors, so its scores are exact cosines, as the exact search's.

An HNSW graph cannot drop a vector; removed items are left in the graph (they still help to find
the way) and filtered out of every search (`keep_only`): a program that reads the graph file with
FAISS itself gets them back unless it leaves out the ids of store.py's `tombstones` too. The index
rebuilds the graph when too many are dead, and searches what was added since the graph was written
exactly, beside it (`Approximate`).
`ef_search` (how many candidates a search keeps) is chosen when the graph is built, on the index's
own data: the smallest that finds RECALL_TARGET of the exact 10 nearest neighbours of a sample of
its vectors, held out of the graph until then. FAISS runs on its own threads (OpenMP); nothing here
changes its settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadIndexError, UsageError

RECALL_TARGET = 0.96  # recall@10 the calibration asks for (the goal is 0.95; this leaves a margin)
CALIBRATION_QUERIES = 1000  # at most a tenth of the vectors; 256 were too few (a noisy choice)
LINKS = 32  # HNSW's M: neighbours per node
EF_CONSTRUCTION = 40  # candidates kept while inserting (FAISS's default); in a trial at 1M x 384, 100
# built 3x slower and reached no better recall at a given query time
EF_CHOICES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # steps of 1.5x and 1.33x


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise UsageError(
            'the approximate search needs FAISS: pip install "dino3[index]" (or faiss-cpu), or search with --exact'
        ) from None
    return faiss


@dataclass
class HNSW:
    index: Any  # faiss.IndexHNSWFlat; its labels are positions in `ids`
    ids: np.ndarray  # (n,) int64: the item id of each vector in the graph
    ef_search: int
    _selector: Any = None  # the positions never to be found (removed items), or None

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, seed: int = 0) -> HNSW:
        """A graph of `vectors` (N, D) with their `ids`, and its calibrated ef_search: the graph is built
        without a sample of the vectors, calibrated with them as queries from outside (a vector already
        in the graph is found more easily than a new image: calibrating on those overstated the recall),
        and then they are added."""
        faiss = faiss_module()
        graph = faiss.IndexHNSWFlat(vectors.shape[1], LINKS, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = EF_CONSTRUCTION
        hnsw = cls(graph, np.zeros(0, np.int64), ef_search=EF_CHOICES[0])
        count = len(ids)
        held = np.zeros(count, bool)
        samples = min(CALIBRATION_QUERIES, count // 10)
        if samples >= 10:
            held[np.random.default_rng(seed).choice(count, samples, replace=False)] = True
        hnsw.add(vectors, ids, ~held if held.any() else None)  # a mask copies; none to hold out: no copy
        if held.any():
            hnsw.ef_search = hnsw.calibrate(vectors, ids, held)
            hnsw.add(vectors, ids, held)
        return hnsw

    def calibrate(self, vectors: np.ndarray, ids: np.ndarray, held: np.ndarray) -> int:
        """The smallest ef_search whose recall@10 reaches RECALL_TARGET for the `held` vectors (a mask
        over `vectors`), which are not in the graph, against the exact search of those that are."""
        from .exact import top_k

        queries = np.ascontiguousarray(vectors[held], dtype=np.float32)  # (S, D)
        _, truth_ids = top_k(queries, [(vectors, ids, ~held)], 10)
        truth = [set(t.tolist()) for t in truth_ids]
        for ef in EF_CHOICES:
            _, found = self.search(queries, 10, ef=ef)
            hits = sum(len(t & set(row.tolist())) for t, row in zip(truth, found))
            if hits / sum(len(t) for t in truth) >= RECALL_TARGET:
                return ef
        return EF_CHOICES[-1]

    @property
    def faiss(self):
        return faiss_module()

    def add(self, vectors: np.ndarray, ids: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Add `vectors` (N, D) with their `ids`, or only the `rows` (a mask) of them."""
        ids = np.asarray(ids, np.int64)
        for start in range(0, len(ids), 65536):  # in pieces: no second copy of a large array
            part = slice(start, start + 65536)
            chosen = vectors[part] if rows is None else vectors[part][rows[part]]
            if len(chosen):
                self.index.add(np.ascontiguousarray(chosen, dtype=np.float32))
        self.ids = np.concatenate([self.ids, ids if rows is None else ids[rows]])

    def keep_only(self, live: np.ndarray) -> None:
        """Never find the items of the graph that are not in `live` (sorted ids): they were removed."""
        dead = np.nonzero(~np.isin(self.ids, live))[0]
        faiss = self.faiss
        self._selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead.astype(np.int64))) if len(dead) else None

    def search(self, queries: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first; id -1 where fewer than k were found."""
        # A bare IndexHNSWFlat, no IndexIDMap: the map's own parallel loop made a single query cost a
        # thread hand-over (4-9 ms instead of 0.1 on a busy machine); positions are mapped here.
        params = self.faiss.SearchParametersHNSW(efSearch=max(ef or self.ef_search, k))
        if self._selector is not None:
            params.sel = self._selector
        scores, positions = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return scores, np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)

    def write(self, file, ids_file) -> None:
        self.faiss.write_index(self.index, self.faiss.PyCallbackIOWriter(file.write))
        np.save(ids_file, self.ids)

    @classmethod
    def read(
        cls, file, ids: np.ndarray, info: dict[str, Any], folder: Any = "the index", dim: int | None = None
    ) -> HNSW:
        """The graph written by `write` (its file open; `ids` read), checked against what the index
        records of it: a damaged one is a BadIndexError naming `folder`, not FAISS's exception."""
        faiss = faiss_module()
        try:
            file.seek(0)
            index = faiss.read_index(faiss.PyCallbackIOReader(file.read))
            ef_search = int(info["ef_search"])
        except (RuntimeError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
            why = str(e).strip().rpartition("Error: ")[2][:120] or type(e).__name__
            raise BadIndexError(
                f"{folder}: the approximate index cannot be read ({why}); build the index again"
            ) from None
        if index.ntotal != len(ids) or (dim is not None and index.d != dim):
            raise BadIndexError(
                f"{folder}: its approximate index is damaged (a graph of {index.ntotal} {index.d}-d vectors, "
                f"{len(ids)} ids); build the index again"
            )
        return cls(index, np.asarray(ids, np.int64), ef_search=ef_search)

    def info(self) -> dict[str, Any]:
        return {"kind": "faiss-hnsw-flat", "links": LINKS, "ef_search": self.ef_search}


@dataclass
class Approximate:
    """The graph, with the vectors added since it was written searched exactly beside it."""

    graph: HNSW
    recent: np.ndarray  # (r, D) vectors not in the graph
    recent_ids: np.ndarray  # (r,)

    def search(self, queries: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.graph.search(queries, k, ef=ef)
        if not len(self.recent_ids):
            return scores, ids
        from .exact import top_k

        more_scores, more_ids = top_k(queries, [(self.recent, self.recent_ids, None)], k)
        scores, ids = np.hstack([scores, more_scores]), np.hstack([ids, more_ids])
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
