"""Exact search: float32 matrix products in pieces, so that memory stays bounded whatever the index size.

Vectors are unit length, so a dot product is the cosine. Scores come in (queries, rows) tiles of at
most TILE floats; each tile is reduced to its best k before the next one, so searching 1M vectors
takes as much memory as searching 30k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

TILE = 2**25  # floats in one tile of scores (128 MB)
ROWS = 32768  # vectors in one tile

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]]


def top_k(queries: np.ndarray, blocks: Blocks | list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, ids), each (Q, k), best first (ties: the lower id first), of the queries
    (Q, D) against blocks of (vectors (m, D), ids (m,), alive (m,) bool or None). A row with fewer
    than k live vectors to choose from ends with scores -inf and ids -1."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    source = blocks if callable(blocks) else (lambda: blocks)
    out_scores = np.full((len(queries), k), -np.inf, np.float32)
    out_ids = np.full((len(queries), k), -1, np.int64)
    step = max(1, min(len(queries), TILE // ROWS))
    for start in range(0, len(queries), step):
        q = queries[start : start + step]  # (q, D)
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_i = np.full((len(q), 0), -1, np.int64)
        for vectors, ids, alive in source():
            for at in range(0, len(ids), ROWS):  # tiles of (q, ROWS) scores at most
                scores = q @ np.asarray(vectors[at : at + ROWS]).T  # (q, m)
                if alive is not None:
                    scores[:, ~alive[at : at + ROWS]] = -np.inf
                tile_s, tile_i = _keep_best(scores, np.broadcast_to(ids[at : at + ROWS], scores.shape), k)
                best_s, best_i = _keep_best(np.hstack([best_s, tile_s]), np.hstack([best_i, tile_i]), k)
        order = np.lexsort((best_i, -best_s), axis=-1)
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        best_i = np.where(np.isfinite(best_s), best_i, -1)
        out_scores[start : start + len(q), : best_s.shape[1]] = best_s
        out_ids[start : start + len(q), : best_i.shape[1]] = best_i
    return out_scores, out_ids


def _keep_best(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] <= k:
        return scores, np.ascontiguousarray(ids)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)


def pairs_above(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pairs of rows (i < j) with cosine >= threshold, exactly: (i, j, scores), and each row's
    nearest-neighbour score (N,) (-inf for a single vector)."""
    count = len(vectors)
    step = max(1, TILE // max(count, 1))
    first, second, scores = [], [], []
    nearest = np.full(count, -np.inf, np.float32)
    for start in range(0, count, step):
        tile = vectors[start : start + step] @ vectors.T  # (rows, N)
        rows = np.arange(len(tile))
        tile[rows, start + rows] = -np.inf  # a vector is not its own neighbour
        nearest[start : start + len(tile)] = tile.max(axis=1) if count > 1 else -np.inf
        i, j = np.nonzero(tile >= threshold)
        keep = j > start + i  # each pair once
        first.append(start + i[keep])
        second.append(j[keep])
        scores.append(tile[i[keep], j[keep]])
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return cat(first, np.int64), cat(second, np.int64), cat(scores, np.float32), nearest
