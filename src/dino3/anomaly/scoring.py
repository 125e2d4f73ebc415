"""The arithmetic of AnomalyDINO, on patch grids: rotations of the shots, the zero-shot background mask,
the nearest-neighbour distances to a memory bank, the image score and the pixel map. Torch and numpy
only (FAISS for the search, imported when a bank is searched); no model here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError

ROTATIONS = (0, 45, 90, 135, 180, 225, 270, 315)  # the paper's augmentation of the shots (degrees)
TOP_FRACTION = 0.01  # image score: the mean of the top 1% of patch distances
SIGMA = 4.0  # the map's Gaussian smoothing, in pixels of the model's input
MASK_THRESHOLD = 10.0  # the paper's cut on the first principal component (in DINOv2-S feature units)
MASK_BORDER = 0.2  # the centre region (20% in from each side) that must be mostly foreground
MASK_CENTRE_SHARE = 0.35  # ... more than this share of it, else the component's other side is taken
MASK_KERNEL = 3  # the 3x3 dilation and closing that fill holes in the mask
# Banks up to this many patches are searched exactly (FAISS flat inner product), larger ones with the
# index room's HNSW graph (benchmarks/anomaly.py, RESULTS.md "Anomaly detection"): on 784 queries (one
# 448 px image) HNSW was as fast as the exact search at 10k rows, 1.4x faster at 20k and 1.8x at 40k,
# where its image scores were still those of the exact search.
EXACT_UP_TO = 40_000
# The least ef_search of the anomaly search: the graph's own calibration (recall@10 on the bank) chose
# 16-32, which left single patches 0.1-0.36 too far (a patch's distance decides a top-1% score); at 64
# the image scores stayed within 0.0032 of the exact ones up to 160k rows (measured as above).
ANN_MIN_EF = 64


# -- rotations of a shot --------------------------------------------------------------------------------------
def rotate(image: torch.Tensor, angle: float) -> torch.Tensor:
    """A (3, H, W) image (uint8, or float in [0, 1]) turned by `angle` degrees anticlockwise about
    its centre, same size, as the paper's OpenCV call (getRotationMatrix2D about (W/2, H/2) and
    warpAffine: bilinear, the border mirrored without repeating the edge, BORDER_REFLECT_101). In
    float arithmetic (OpenCV quantises positions to 1/32 px): uint8 results may differ by one level."""
    if angle % 360 == 0:
        return image
    _, height, width = image.shape
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    cx, cy = width / 2, height / 2
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    # the inverse of OpenCV's forward map [[cos, sin], [-sin, cos]] about the centre
    src_x = cos * (xs - cx) - sin * (ys - cy) + cx  # (H, W)
    src_y = sin * (xs - cx) + cos * (ys - cy) + cy
    x0, y0 = torch.floor(src_x), torch.floor(src_y)
    fx, fy = (src_x - x0).float(), (src_y - y0).float()
    x0, y0 = x0.long(), y0.long()
    values = image.float()
    out = torch.zeros_like(values)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        rows = _reflect101(y0 + dy, height)
        for dx, wx in ((0, 1 - fx), (1, fx)):
            out += values[:, rows, _reflect101(x0 + dx, width)] * (wy * wx)
    if image.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.clamp(0, 1).to(image.dtype)


def _reflect101(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices mirrored into 0..size-1 about the edge pixels (... 2 1 | 0 1 2 ... n-1 | n-2 ...)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


# -- the zero-shot background mask ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Masking:
    """The paper's PCA mask of an object's background (see the package docstring)."""

    threshold: float = MASK_THRESHOLD
    border: float = MASK_BORDER
    centre_share: float = MASK_CENTRE_SHARE
    kernel: int = MASK_KERNEL

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise UsageError(f"the mask threshold must be a finite number, got {self.threshold!r}")
        if not 0 <= self.border < 0.5:
            raise UsageError(f"the mask border must lie in [0, 0.5), got {self.border!r}")
        if not (isinstance(self.kernel, int) and self.kernel >= 1 and self.kernel % 2 == 1):
            raise UsageError(f"the mask kernel must be an odd whole number, got {self.kernel!r}")

    def __call__(self, grid: torch.Tensor) -> torch.Tensor:
        """(h, w, D) raw patch features -> (h, w) bool, True on the object."""
        from ..dense.pca import fit_pca

        h, w, _ = grid.shape
        pca = fit_pca(grid, components=1)
        # the component's sign as anomalib's scikit-learn (>= 1.5) turns it: its largest loading positive
        # (dino3.dense turns it by the patches instead, for pictures; the mask follows the reference)
        loading = pca.components[0]
        sign = -1.0 if float(loading[loading.abs().argmax()]) < 0 else 1.0
        first = sign * pca.transform(grid)[..., 0].double() / pca.scale[0] if pca.scale[0] > 0 else None
        if first is None:  # every patch the same: nothing to tell apart
            return torch.ones(h, w, dtype=torch.bool)
        mask = first > self.threshold
        y0, y1, x0, x1 = (
            int(h * self.border),
            int(h * (1 - self.border)),
            int(w * self.border),
            int(w * (1 - self.border)),
        )
        centre = mask[y0:y1, x0:x1]
        if centre.sum() <= centre.numel() * self.centre_share:  # the component points the other way
            mask = -first > self.threshold
        return _close(_dilate(mask, self.kernel), self.kernel)


def _dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary dilation by a kernel x kernel square; beyond the border counts as background."""
    pad = kernel // 2
    return F.max_pool2d(mask[None, None].float(), kernel, 1, pad)[0, 0] > 0.5


def _erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary erosion; beyond the border counts as foreground (OpenCV's default border)."""
    pad = kernel // 2
    return -F.max_pool2d(-mask[None, None].float(), kernel, 1, pad)[0, 0] > 0.5


def _close(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    return _erode(_dilate(mask, kernel), kernel)


# -- the memory bank ------------------------------------------------------------------------------------------
def normalize(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) float32 rows of unit length (a zero row stays zero)."""
    return F.normalize(rows.float(), p=2, dim=1)


class Bank:
    """The good images' unit patch features, searched for each test patch's nearest ones: exactly
    (FAISS flat inner product) up to `exact_up_to` rows, with the index room's HNSW graph beyond."""

    def __init__(self, vectors: torch.Tensor, exact_up_to: int = EXACT_UP_TO) -> None:
        self.vectors = np.ascontiguousarray(vectors.float().cpu().numpy())  # (N, D) unit rows
        self.approximate = len(self.vectors) > exact_up_to
        self._index: Any = None
        self._lock = threading.Lock()  # one build, whichever thread scores first

    def __len__(self) -> int:
        return len(self.vectors)

    def _search_index(self):
        with self._lock:
            return self._build()

    def _build(self):
        if self._index is None:  # built on first use: a loaded detector that never scores builds nothing
            if self.approximate:
                from ..index.ann import HNSW

                self._index = HNSW.build(self.vectors, np.arange(len(self.vectors), dtype=np.int64))
            else:
                faiss = faiss_module()
                index = faiss.IndexFlatIP(self.vectors.shape[1])
                index.add(self.vectors)
                self._index = index
        return self._index

    def distances(self, queries: torch.Tensor, neighbours: int = 1) -> torch.Tensor:
        """(Q, D) unit rows -> (Q,) float32 cosine distances (1 - cosine, in [0, 2]) to the nearest
        bank row, or their mean over the `neighbours` nearest."""
        if len(queries) == 0:
            return torch.zeros(0)
        k = min(neighbours, len(self.vectors))
        q = np.ascontiguousarray(queries.float().cpu().numpy())
        index = self._search_index()
        if self.approximate:
            similarities, _ = index.search(q, k, ef=max(index.ef_search, ANN_MIN_EF))  # (Q, k) best first
        else:
            similarities, _ = index.search(q, k)
        return cosine_distance(torch.from_numpy(np.asarray(similarities, dtype=np.float32)))


def cosine_distance(similarities: torch.Tensor) -> torch.Tensor:
    """(Q, k) cosine similarities -> (Q,) the mean of 1 - cosine, each clamped to [0, 2]."""
    return (1.0 - similarities).clamp(0.0, 2.0).mean(dim=1)


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise UsageError('anomaly detection searches its bank with FAISS: pip install "dino3[anomaly]"') from None
    return faiss


def block_similarities(queries: torch.Tensor, blocks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The k best cosine similarities of each query row within each block, exactly: (B, Q, k), -inf
    where a block has fewer than k rows. For leave-one-out, where every shot is searched against the
    other shots' blocks."""
    faiss = faiss_module()
    q = np.ascontiguousarray(queries.float().cpu().numpy())
    out = torch.full((len(blocks), len(q), k), -math.inf)
    for b, block in enumerate(blocks):
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(np.ascontiguousarray(block.float().cpu().numpy()))
        found, ids = index.search(q, k)
        out[b] = torch.from_numpy(np.where(ids >= 0, found, -np.inf).astype(np.float32))
    return out


# -- scores and maps ------------------------------------------------------------------------------------------
def image_score(patch_distances: torch.Tensor, top_fraction: float = TOP_FRACTION) -> float:
    """The mean of the top `top_fraction` of an image's patch distances (at least the largest one)."""
    flat = patch_distances.reshape(-1)
    count = max(int(flat.numel() * top_fraction), 1)
    return float(torch.topk(flat, count).values.mean())


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The 1-D Gaussian of anomalib's map smoothing: 2 * int(4 sigma + 0.5) + 1 taps, summing to 1."""
    size = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def smooth(values: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """(H, W) -> (H, W) float32 Gaussian smoothing, the border mirrored (torch's "reflect"), in two
    separable passes (anomalib convolves with the 2-D kernel: the same sums, in another order)."""
    if sigma <= 0:
        return values.float()
    kernel = gaussian_kernel(sigma)
    pad = len(kernel) // 2
    x = values.float()[None, None]
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"  # reflect needs a side longer than pad
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), kernel.view(1, 1, -1, 1))
    return x[0, 0]


def pixel_map(
    patch_distances: torch.Tensor,
    patch: int,
    resized: tuple[int, int],
    sigma: float = SIGMA,
    upsample: str = "nearest",
) -> torch.Tensor:
    """(h, w) patch distances -> (H, W) float32 map over the resized image the model saw (before its
    centre crop to whole patches): each patch spread over its p x p pixels ("nearest", anomalib's) or
    interpolated between patch centres ("bilinear", the paper's), smoothed, and the cropped margin
    filled with the edge values (anomalib's)."""
    h, w = patch_distances.shape
    grid = patch_distances.float()[None, None]
    if upsample == "nearest":
        spread = F.interpolate(grid, size=(h * patch, w * patch), mode="nearest")
    elif upsample == "bilinear":
        spread = F.interpolate(grid, size=(h * patch, w * patch), mode="bilinear", align_corners=False)
    else:
        raise UsageError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
    smoothed = smooth(spread[0, 0], sigma)
    height, width = resized
    crop_h, crop_w = height - h * patch, width - w * patch
    if crop_h < 0 or crop_w < 0:
        raise UsageError(f"a {h}x{w} patch grid does not fit a {height}x{width} image")
    top, left = crop_h // 2, crop_w // 2
    padded = F.pad(smoothed[None, None], (left, crop_w - left, top, crop_h - top), mode="replicate")
    return padded[0, 0]


def to_image_size(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) map -> (height, width), bilinear: the map laid over the image's own pixels."""
    if tuple(values.shape) == tuple(size):
        return values
    return F.interpolate(values[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
