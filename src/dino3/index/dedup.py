"""Near-duplicates: every pair of images whose cosine reaches a threshold, joined into groups
(connected components: if a~b and b~c, then a, b and c are one group), and the distribution of
each image's nearest-neighbour score, to help choose the threshold.

Pairs come from the exact all-pairs products (exact.pairs_above) while the index is small, else
from the approximate search: each vector's K nearest neighbours, and, for the vectors whose K-th
neighbour still reaches the threshold (a group larger than K), an exact scan that finds them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

NEIGHBOURS = 16  # K above
# Candidates each dedup search keeps (HNSW's efSearch): far fewer than a query's calibrated setting,
# which must find all ten nearest neighbours. A near-duplicate is much closer than any other
# neighbour, and a greedy walk reaches it early. benchmarks/index.py, 1M x 384 with 10,000 planted
# copies: 197 s finding 99.2% of them at 32, where the calibrated setting (512 then) ran over 13 min.
DEDUP_EF = 32
HISTOGRAM_EDGES = (-1.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)


@dataclass
class Group:
    ids: list[int]  # the most central image first, then by score
    scores: list[float]  # each one's cosine to the first (the first's: 1.0)


def approximate_pairs(ann, vectors: np.ndarray, ids: np.ndarray, threshold: float, batch: int = 8192):
    """Like exact.pairs_above, with each vector's neighbours from the approximate search `ann`
    (ann.Approximate over these vectors); the vectors whose K-th neighbour still reaches the
    threshold get all their pairs from an exact scan."""
    count = len(ids)
    sorter = np.argsort(ids, kind="stable")
    row_of = lambda found: sorter[np.searchsorted(ids, found, sorter=sorter)]  # noqa: E731
    nearest = np.full(count, -np.inf, np.float32)
    first, second, scores = [], [], []
    k = min(NEIGHBOURS + 1, count)
    for start in range(0, count, batch):
        queries = vectors[start : start + batch]
        found_scores, found = ann.search(queries, k, ef=DEDUP_EF)  # (q, k) each
        valid = (found >= 0) & (found != ids[start : start + batch, None])
        nearest[start : start + len(queries)] = np.where(valid, found_scores, -np.inf).max(axis=1)
        full = valid.sum(axis=1) >= k - 1
        saturated = np.nonzero(full & (np.where(valid, found_scores, np.inf).min(axis=1) >= threshold))[0]
        r, c = np.nonzero(valid & (found_scores >= threshold))
        keep = ~np.isin(r, saturated)  # those come whole from the exact scan below
        first.append(start + r[keep])
        second.append(row_of(found[r[keep], c[keep]]))
        scores.append(found_scores[r[keep], c[keep]])
        if len(saturated):
            more = _pairs_of_rows(vectors, start + saturated, threshold)
            for part, found_part in zip((first, second, scores), more):
                part.append(found_part)
    first, second = np.concatenate(first), np.concatenate(second)
    scores = np.concatenate(scores).astype(np.float32)
    low, high = np.minimum(first, second), np.maximum(first, second)
    _, unique = np.unique(low * count + high, return_index=True)  # each pair once
    return low[unique], high[unique], scores[unique], nearest


def _pairs_of_rows(vectors: np.ndarray, rows: np.ndarray, threshold: float):
    """(row, other row, score) of every vector at or above the threshold from these rows, exactly."""
    from .exact import TILE

    step = max(1, TILE // len(vectors))
    first, second, scores = [], [], []
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        tile = vectors[part] @ vectors.T  # (rows, N)
        tile[np.arange(len(part)), part] = -np.inf  # not itself
        i, j = np.nonzero(tile >= threshold)
        first.append(part[i])
        second.append(j)
        scores.append(tile[i, j])
    return np.concatenate(first), np.concatenate(second), np.concatenate(scores)


def groups(vectors: np.ndarray, ids: np.ndarray, first: np.ndarray, second: np.ndarray) -> list[Group]:
    """The connected components of the pairs (rows of `vectors`), of two images or more, largest first."""
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
    except ImportError:
        raise UsageError('dedup needs SciPy for the groups: pip install "dino3[index]" (or scipy)') from None
    count = len(ids)
    if count == 0 or len(first) == 0:
        return []
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    out = []
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for label in np.nonzero(sizes >= 2)[0]:
        rows = order[bounds[label] : bounds[label + 1]]
        members = vectors[rows]  # (g, D)
        central = int(np.argmax(members @ members.mean(axis=0)))
        similarity = members @ members[central]  # (g,)
        similarity[central] = 1.0
        ranked = np.lexsort((ids[rows], -similarity))
        out.append(Group([int(ids[rows[i]]) for i in ranked], [float(similarity[i]) for i in ranked]))
    out.sort(key=lambda g: -len(g.ids))
    return out


def histogram(nearest: np.ndarray) -> list[int]:
    """How many images have their nearest-neighbour score in each bin of HISTOGRAM_EDGES."""
    values = nearest[np.isfinite(nearest)]
    counts, _ = np.histogram(np.clip(values, -1.0, 1.0), bins=np.asarray(HISTOGRAM_EDGES))
    return [int(c) for c in counts]


def format_histogram(counts: list[int], threshold: float, width: int = 40) -> str:
    """The histogram as text, one bin a line, the bins at or above the threshold marked."""
    top = max(counts) if counts and max(counts) > 0 else 1
    lines = ["nearest-neighbour cosine of each image (pairs at or above the threshold are duplicates):"]
    for low, high, count in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:], counts):
        bar = "#" * (round(width * count / top) if count else 0)
        mark = "  <- duplicates" if low >= threshold else ""
        label = f"{low:>6.3f} - {high:<5.3f}" if low > -1 else f"{'below':>6} {high:<7.3f}"
        lines.append(f"  {label} {count:>9} {bar}{mark}")
    return "\n".join(lines)
