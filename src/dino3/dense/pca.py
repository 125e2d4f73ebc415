"""The PCA picture of patch features, Meta's recipe (`notebooks/pca.ipynb`): the 3 whitened principal
components of the foreground patches, coloured by sigmoid(2x), the background black.

    rgb = dino3.dense.pca_rgb(grid)                  # (h, w, D) -> (h, w, 3) in [0, 1]
    rgbs = dino3.dense.pca_rgb([grid_a, grid_b])     # one PCA over both: a colour means the same in each
    rgb = dino3.dense.pca_rgb(grid, mask=foreground) # fitted on the foreground, background black

The numbers are scikit-learn's `PCA(n_components=3, whiten=True)` then `sigmoid(2 * x)`, up to the
sign of each component. A principal direction has no sign; here the patch farthest along each
component lies on its positive side (scikit-learn's rule before 1.5; since 1.5 it makes the largest
loading positive, which depends on the feature axes: negated features would flip the colours).
Fitted in float64 in torch; scikit-learn is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UsageError

COMPONENTS = 3
_CHUNK_ROWS = 8192  # patches per float64 block while the covariance is summed


@dataclass
class PatchPCA:
    """A fitted PCA of patch features: `transform` gives whitened coordinates, `rgb` the colours."""

    mean: torch.Tensor  # (D,) float64
    components: torch.Tensor  # (k, D) float64, rows of unit length, largest variance first
    scale: torch.Tensor  # (k,) float64: 1 / sqrt(explained variance); 0 for a component with none
    explained_variance: torch.Tensor  # (k,) float64, as scikit-learn's explained_variance_

    def transform(self, grid: Any) -> torch.Tensor:
        """(h, w, D) features -> (h, w, k) float32 whitened coordinates."""
        grid = _as_grid(grid, "grid")
        if grid.shape[-1] != self.mean.shape[0]:
            raise UsageError(f"this PCA was fitted on {self.mean.shape[0]}-dim features; got {grid.shape[-1]}-dim ones")
        h, w, dim = grid.shape
        flat = grid.reshape(h * w, dim)
        out = torch.empty(h * w, self.components.shape[0], dtype=torch.float64)
        for start in range(0, h * w, _CHUNK_ROWS):
            rows = flat[start : start + _CHUNK_ROWS].to(torch.float64) - self.mean
            out[start : start + _CHUNK_ROWS] = rows @ self.components.T * self.scale
        return out.reshape(h, w, -1).float()

    def rgb(self, grid: Any, mask: Any = None) -> torch.Tensor:
        """(h, w, D) features -> (h, w, 3) float32 colours in [0, 1]: sigmoid(2x) of the first three
        whitened components; black where `mask` (h, w) is False."""
        colours = torch.sigmoid(2.0 * self.transform(grid)[..., :3])
        if mask is not None:
            colours = colours * _as_mask(mask, tuple(colours.shape[:2]), "mask")[..., None]
        return colours


def fit_pca(grids: Any, mask: Any = None, components: int = COMPONENTS) -> PatchPCA:
    """Fit a PCA on the patches of one (h, w, D) grid or a list of them (one PCA over all), keeping
    only the patches where `mask` (one (h, w) mask per grid; True, or > 0.5, is foreground) is set."""
    grids_list, masks = _grids_and_masks(grids, mask)
    dim = grids_list[0].shape[-1]
    rows = [g.reshape(-1, dim) if m is None else g.reshape(-1, dim)[m.reshape(-1)] for g, m in zip(grids_list, masks)]
    count = sum(r.shape[0] for r in rows)
    if count <= components:
        where = "the mask keeps" if mask is not None else "there are"
        raise UsageError(
            f"{where} {count} patches; a {components}-component PCA needs at least {components + 1} "
            "(use a larger image, or a mask with more foreground)"
        )
    # mean and covariance in float64, summed over blocks of patches: (D,), (D, D)
    total = torch.zeros(dim, dtype=torch.float64)
    for r in rows:
        total += r.to(torch.float64).sum(dim=0)
    mean = total / count
    covariance = torch.zeros(dim, dim, dtype=torch.float64)
    for r in rows:
        for start in range(0, r.shape[0], _CHUNK_ROWS):
            block = r[start : start + _CHUNK_ROWS].to(torch.float64) - mean
            covariance += block.T @ block
    covariance /= count - 1
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values = values.flip(0)[:components].clamp_min(0.0)
    vectors = vectors.flip(1)[:, :components].T.contiguous()  # (k, D)
    vectors *= _signs(rows, mean, vectors)[:, None]
    tiny = torch.finfo(torch.float64).eps * max(float(values[0]), 1.0)
    scale = torch.where(values > tiny, values.clamp_min(tiny).rsqrt(), torch.zeros_like(values))
    return PatchPCA(mean, vectors, scale, values)


def _signs(rows: list[torch.Tensor], mean: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(k,) +-1: each component turned so that the fitted patch farthest along it lies on its positive
    side (scikit-learn's svd_flip on U, its PCA's rule before 1.5). The rule reads the patches, not
    the axes of the feature space: negated or rotated features give the same picture."""
    k = vectors.shape[0]
    farthest = torch.zeros(k, dtype=torch.float64)  # the projection of largest magnitude so far, per component
    for r in rows:
        for start in range(0, r.shape[0], _CHUNK_ROWS):
            projected = (r[start : start + _CHUNK_ROWS].to(torch.float64) - mean) @ vectors.T  # (n, k)
            top = projected.gather(0, projected.abs().argmax(dim=0, keepdim=True))[0]  # (k,)
            farthest = torch.where(top.abs() > farthest.abs(), top, farthest)
    return torch.where(farthest < 0, -1.0, 1.0).to(torch.float64)


def fit_foreground_pca(grids: Sequence[Any], masks: Sequence[Any] | None) -> tuple[PatchPCA, str | None]:
    """The PCA of the grids' foreground patches (one (h, w) mask per grid), or of all their patches
    when there is no mask or too little foreground; then also a note that says so."""
    if masks is None or any(m is None for m in masks):
        return fit_pca(list(grids)), None
    count = sum(int(_as_mask(m, tuple(g.shape[:2]), "mask").sum()) for g, m in zip(grids, masks))
    if count <= COMPONENTS:
        note = (
            f"{count} foreground patches, too few for the PCA: fitted on every patch (the picture stays black "
            "where there is no foreground)"
        )
        return fit_pca(list(grids)), note
    return fit_pca(list(grids), list(masks)), None


def pca_rgb(grids: Any, mask: Any = None) -> torch.Tensor | list[torch.Tensor]:
    """Meta's PCA colours of one (h, w, D) grid, or of a list of grids with one PCA over all of them
    (consistent colours across images): (h, w, 3) float32 tensors in [0, 1], black where `mask` is
    False. The PCA is fitted on the masked (foreground) patches, or on all when there is no mask."""
    single = not isinstance(grids, (list, tuple))
    grids_list, masks = _grids_and_masks(grids, mask)
    pca = fit_pca(grids_list, masks if mask is not None else None)
    out = [pca.rgb(g, m) for g, m in zip(grids_list, masks)]
    return out[0] if single else out


# -- inputs ---------------------------------------------------------------------------------------------------
def _as_grid(grid: Any, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(grid) if not isinstance(grid, torch.Tensor) else grid).detach().cpu()
    if tensor.ndim != 3 or not tensor.is_floating_point():
        raise UsageError(
            f"{what}: expected patch features of shape (h, w, D) in floating point, got {tuple(tensor.shape)} "
            f"{tensor.dtype} (a batch (B, h, w, D) is passed as list(batch))"
        )
    return tensor.float() if tensor.dtype != torch.float64 else tensor


def _as_mask(mask: Any, shape: tuple[int, int], what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).detach().cpu()
    if tuple(tensor.shape) != shape:
        raise UsageError(f"{what}: its shape {tuple(tensor.shape)} is not the patch grid's {shape}")
    return tensor if tensor.dtype == torch.bool else tensor.float() > 0.5


def _grids_and_masks(grids: Any, mask: Any) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    single = not isinstance(grids, (list, tuple))
    grids_list = [_as_grid(g, "grid" if single else f"grid {i}") for i, g in enumerate([grids] if single else grids)]
    if not grids_list:
        raise UsageError("no patch grids given")
    dims = {g.shape[-1] for g in grids_list}
    if len(dims) > 1:
        raise UsageError(f"the grids have different feature sizes {sorted(dims)}: one PCA needs one model's features")
    if mask is None:
        return grids_list, [None] * len(grids_list)
    masks = [mask] if single else list(mask) if isinstance(mask, Sequence) else None
    if masks is None or len(masks) != len(grids_list):
        raise UsageError("give one mask per grid (a list of masks for a list of grids)")
    return grids_list, [
        _as_mask(m, tuple(g.shape[:2]), "mask" if single else f"mask {i}")
        for i, (g, m) in enumerate(zip(grids_list, masks))
    ]
