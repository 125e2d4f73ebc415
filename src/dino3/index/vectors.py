"""The index's vector helpers: unit rows, query vectors, and reading stored vectors by id."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UsageError
from .store import State


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.size == 0:
        return vectors if vectors.ndim == 2 else np.zeros((len(vectors), 0), np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def is_vectors(queries: Any) -> bool:
    if isinstance(queries, np.ndarray):
        return queries.ndim <= 2 and np.issubdtype(queries.dtype, np.floating)
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(queries, torch.Tensor) and queries.ndim <= 2 and queries.is_floating_point()


def as_vectors(queries: Any, dim: int) -> np.ndarray:
    """Query vectors, an array or tensor (D,) or (Q, D) of any float dtype -> float32 (Q, D), of the
    index's width (their values are checked where they are searched)."""
    if not isinstance(queries, np.ndarray):
        queries = queries.detach().float().cpu().numpy()
    vectors = np.asarray(queries, dtype=np.float32)
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.shape[1] != dim:
        raise UsageError(f"query vectors have {vectors.shape[1]} values; the index's have {dim}")
    return vectors


def live_after(state: State, max_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The live vectors and ids with id > max_id (added since the approximate index was written)."""
    vectors, ids = [], []
    for block, block_ids, alive in state.blocks():
        keep = block_ids > max_id
        if alive is not None:
            keep &= alive
        if keep.any():
            vectors.append(np.asarray(block[keep]))
            ids.append(block_ids[keep])
    if not ids:
        return np.zeros((0, state.dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(vectors), np.concatenate(ids)


def vectors_of(state: State, wanted: list[int]) -> np.ndarray:
    """The vectors of these item ids, in that order (an id may be asked for more than once)."""
    out = np.zeros((len(wanted), state.dim), np.float32)
    positions: dict[int, list[int]] = {}
    for position, item in enumerate(wanted):
        positions.setdefault(int(item), []).append(position)
    if not positions:
        return out
    want = np.fromiter(positions, np.int64)
    for block, block_ids, _ in state.blocks():
        for row in np.nonzero(np.isin(block_ids, want))[0]:
            out[positions[int(block_ids[row])]] = block[row]
    return out
