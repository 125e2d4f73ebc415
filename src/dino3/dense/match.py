"""Patch matching between two images (as Meta's `dense_sparse_matching` notebook): each patch of A is
matched to the patch of B whose L2-normalised last-layer feature is the most similar (cosine).

    matches = dino3.dense.match_patches(a, b, mutual=True, min_score=0.5, spacing=32)
    matches.to_json()  # {"matches": [{"a": [x, y], "b": [x, y], "score": s}, ...]}

Options: `mutual` keeps a pair only when A's patch is also B's patch's best match; `min_score` drops
pairs below a cosine; `mask_a` / `mask_b` (h, w) restrict both sides to the foreground; `spacing`
(px) gives a sparse view: the best pairs first, each kept only if its points lie at least that far
from the points kept before, in A and in B. Coordinates are patch centres in each original image's
pixels (pixel (0, 0) centred at (0, 0)), the resize undone, so that they can be drawn on the images
or compared with other tools' keypoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError

_CHUNK = 2048  # rows of A per block of the similarity matrix


@dataclass
class Matches:
    """Matched patch pairs, best score first."""

    a: torch.Tensor  # (n, 2) float64 (x, y) in image A's pixels
    b: torch.Tensor  # (n, 2) float64 (x, y) in image B's pixels
    score: torch.Tensor  # (n,) float32 cosine similarity
    index_a: torch.Tensor  # (n,) int64 patch index in A's grid (row-major)
    index_b: torch.Tensor  # (n,) int64 patch index in B's grid

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def select(self, keep: torch.Tensor) -> Matches:
        return Matches(self.a[keep], self.b[keep], self.score[keep], self.index_a[keep], self.index_b[keep])

    def to_json(self, decimals: int = 2) -> dict[str, Any]:
        return {
            "matches": [
                {
                    "a": [round(ax, decimals), round(ay, decimals)],
                    "b": [round(bx, decimals), round(by, decimals)],
                    "score": round(s, 5),
                }
                for (ax, ay), (bx, by), s in zip(self.a.tolist(), self.b.tolist(), self.score.tolist())
            ]
        }


def nearest_patches(
    grid_a: torch.Tensor, grid_b: torch.Tensor, mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each patch of A (row-major), its most similar patch of B and their cosine; and for each
    patch of B, its most similar patch of A (for mutual matching). Background patches (mask False)
    are never chosen; a background patch of A gets index -1. Returns (best_b (na,), score (na,),
    best_a (nb,))."""
    dim = grid_a.shape[-1]
    if grid_b.shape[-1] != dim:
        raise UsageError(f"the grids have different feature sizes ({dim} and {grid_b.shape[-1]}): one model for both")
    a = F.normalize(grid_a.reshape(-1, dim).float(), dim=-1)  # (na, D)
    b = F.normalize(grid_b.reshape(-1, dim).float(), dim=-1)  # (nb, D)
    keep_a = mask_a.reshape(-1) if mask_a is not None else torch.ones(a.shape[0], dtype=torch.bool)
    keep_b = mask_b.reshape(-1) if mask_b is not None else torch.ones(b.shape[0], dtype=torch.bool)
    best_b = torch.full((a.shape[0],), -1, dtype=torch.long)
    score = torch.full((a.shape[0],), float("-inf"))
    column_best = torch.full((b.shape[0],), float("-inf"))
    best_a = torch.full((b.shape[0],), -1, dtype=torch.long)
    for start in range(0, a.shape[0], _CHUNK):
        sim = a[start : start + _CHUNK] @ b.T  # (chunk, nb)
        sim[:, ~keep_b] = float("-inf")
        sim[~keep_a[start : start + _CHUNK]] = float("-inf")
        score[start : start + _CHUNK], best_b[start : start + _CHUNK] = sim.max(dim=1)
        top, where = sim.max(dim=0)  # (nb,)
        better = top > column_best
        column_best[better], best_a[better] = top[better], where[better] + start
    best_b[~keep_a] = -1
    best_a[~keep_b] = -1
    return best_b, score, best_a


def match_patches(
    a: Any,
    b: Any,
    *,
    mutual: bool = False,
    min_score: float | None = None,
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
    spacing: float | None = None,
) -> Matches:
    """Match the patches of two images (DenseImage from `load_dense`); see the module docstring."""
    grid_a, grid_b = a.features, b.features
    for name, mask, grid in (("mask_a", mask_a, grid_a), ("mask_b", mask_b, grid_b)):
        if mask is not None and tuple(mask.shape) != tuple(grid.shape[:2]):
            raise UsageError(f"{name}: shape {tuple(mask.shape)} is not the patch grid's {tuple(grid.shape[:2])}")
    best_b, score, best_a = nearest_patches(grid_a, grid_b, mask_a, mask_b)
    index_a = torch.arange(best_b.shape[0])
    keep = best_b >= 0
    if mutual:
        keep &= best_a[best_b.clamp_min(0)] == index_a
    if min_score is not None:
        keep &= score >= min_score
    index_a, index_b, score = index_a[keep], best_b[keep], score[keep]
    order = torch.argsort(score, descending=True, stable=True)
    index_a, index_b, score = index_a[order], index_b[order], score[order]
    centres_a = a.patch_centres().reshape(-1, 2)
    centres_b = b.patch_centres().reshape(-1, 2)
    matches = Matches(centres_a[index_a], centres_b[index_b], score, index_a, index_b)
    return sparse(matches, spacing) if spacing else matches


def sparse(matches: Matches, spacing: float) -> Matches:
    """The best matches first, each kept only if its points are at least `spacing` px from those of
    every match kept before, in A and in B."""
    if spacing < 0:
        raise UsageError(f"spacing must be >= 0 px, got {spacing}")
    kept: list[int] = []
    for i in range(len(matches)):
        if kept:
            near_a = (matches.a[kept] - matches.a[i]).norm(dim=1).min() < spacing
            near_b = (matches.b[kept] - matches.b[i]).norm(dim=1).min() < spacing
            if near_a or near_b:
                continue
        kept.append(i)
    return matches.select(torch.tensor(kept, dtype=torch.long))
