"""Foreground masks from patch features: Meta's notebook (`notebooks/foreground_segmentation.ipynb`)
as a library, and DINOv2's unsupervised recipe when there is no classifier.

Training (`train_foreground`) takes the patch features of some images and their masks pooled onto the
patch grid (`patch_labels`: the mask resized as its image was, then averaged over each patch). Only
patches with a clear label (< 0.01 or > 0.99) are kept. A logistic regression is fitted for each C
of logspace(-7, 0, 8), scored by leave-one-image-out average precision, and fitted again on all
images with the C of the best mean score. Applying it (`ForegroundClassifier.mask`): the probability
of each patch, a 3x3 median filter (zeros beyond the border, as scipy's medfilt2d) and a 0.5 threshold.

The logistic regression is scikit-learn's `LogisticRegression(C=C)`: loss sum(log(1 + exp(-y z))) +
|w|^2 / 2C, the intercept not penalised. It is solved here by Newton's method in float64 in torch
(L-BFGS for features wider than 2048), to a gradient 1e-4 times below scikit-learn's default
tolerance: the same probabilities within 1e-4 (the tests check it), and no scikit-learn to install.

Without labels, `unsupervised_foreground` is DINOv2's recipe (paper, Fig. 9): the first principal
component of an image's patch features, with the patches on its positive side as the foreground. A
component has no sign, so it is turned so that the image's border is mostly on the negative side.
It is a heuristic: it works on photos of one object, not on scenes.

A classifier is saved with safetensors (no pickle), with what it needs to refuse a model it was not
made for: the model's answer to a fixed probe image (`model_probe`), compared at cosine 0.99, which
bf16, int8 and the compiled runtimes pass and other weights do not.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._io import atomic_path
from ..errors import UsageError

CS = tuple(float(c) for c in np.logspace(-7, 0, 8))  # Meta's sweep of C
CLEAR_LABEL = 0.01  # patches with a label within this of 0 or 1 are kept for training
FORMAT = "dino3-foreground"
PROBE_COSINE = 0.99  # the least cosine of a model's probe answer to the classifier's model


# -- labels -------------------------------------------------------------------------------------------------
def patch_labels(mask: torch.Tensor, processor: Any) -> torch.Tensor:
    """An image's mask (H0, W0) in [0, 1] -> its patch labels (h, w): the mask resized (and cropped or
    padded) as `processor` does the image, then averaged over each patch."""
    geometry = type(processor).from_dict(processor.to_dict(), do_normalize=False)
    pixels = geometry.pixels(mask.to(torch.float32).clamp(0, 1)[None])  # (3, H, W): the mask three times
    p = processor.patch_size
    return F.avg_pool2d(pixels[:1], p, p)[0]  # (h, w)


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask image (anything dino3.images fetches: a path, URL, object URI) -> (H, W) float32 in
    [0, 1]: its alpha channel if it has one (Meta's label files), else its grey level (16-bit and
    32-bit masks on dino3.images' scales)."""
    from ..errors import ImageError
    from ..images import grey_levels, load_pil

    name = os.fspath(path)
    try:
        image = load_pil(path)
    except ImageError as e:
        raise ImageError(f"{e} (a mask)") from None
    if "A" in image.getbands():
        grey = np.asarray(image.getchannel("A"), dtype=np.uint8)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = grey_levels(image, name)
    else:
        grey = np.asarray(image.convert("L"), dtype=np.uint8)
    values = grey.astype(np.float32) / 255.0 if grey.dtype == np.uint8 else grey.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(values))


# -- the logistic regression ----------------------------------------------------------------------------------
NEWTON_MAX_DIM = 2048  # up to this width the exact Hessian is cheap: Newton's method; beyond, L-BFGS


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, C: float, init: torch.Tensor | None = None, tolerance: float = 1e-8
) -> torch.Tensor:
    """scikit-learn's L2 logistic regression: (n, D) features, (n,) labels in {0, 1} -> (D + 1,)
    float64 parameters (weights, then the intercept), in float64 to a gradient (of the mean loss)
    below `tolerance`: by Newton's method (a few dozen steps, even where the classes are nearly
    separable and first-order methods crawl) up to NEWTON_MAX_DIM features, by L-BFGS beyond.
    `init` starts from other parameters (a neighbouring C's)."""
    x = x.to(torch.float64)
    sign = y.to(torch.float64) * 2 - 1  # (n,) +-1
    n, dim = x.shape
    params = init.clone() if init is not None else torch.zeros(dim + 1, dtype=torch.float64)

    def loss_and_grad(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = torch.addmv(theta[dim:].expand(n), x, theta[:dim])  # (n,)
        margin = -sign * z
        value = (F.softplus(margin).sum() + 0.5 / C * theta[:dim].square().sum()) / n
        slope = -sign * torch.sigmoid(margin)  # d loss / d z, (n,)
        grad = torch.empty_like(theta)
        grad[:dim] = (x.T @ slope + theta[:dim] / C) / n
        grad[dim] = slope.sum() / n
        return value, grad, z

    if dim <= NEWTON_MAX_DIM:
        return _newton(x, params, C, tolerance, loss_and_grad)
    optimizer = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=20_000,
        max_eval=25_000,
        tolerance_grad=tolerance,
        tolerance_change=1e-18,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        value, params.grad, _ = loss_and_grad(params)
        return value

    optimizer.step(closure)
    return params


def _newton(x: torch.Tensor, params: torch.Tensor, C: float, tolerance: float, loss_and_grad) -> torch.Tensor:
    """Newton's method with a backtracking line search on the (strictly convex) mean loss."""
    n, dim = x.shape
    ridge = torch.full((dim + 1,), 1.0 / (C * n), dtype=torch.float64)
    ridge[dim] = 1e-12  # the intercept is not penalised; a whisker keeps the system solvable
    value, grad, z = loss_and_grad(params)
    for _ in range(200):
        if float(grad.abs().max()) <= tolerance:
            break
        weight = torch.sigmoid(z) * torch.sigmoid(-z) / n  # (n,) the loss's curvature at each sample
        hessian = torch.empty(dim + 1, dim + 1, dtype=torch.float64)
        hessian[:dim, :dim] = (x.T * weight) @ x
        hessian[:dim, dim] = hessian[dim, :dim] = x.T @ weight
        hessian[dim, dim] = weight.sum()
        hessian.diagonal().add_(ridge)
        step = torch.linalg.solve(hessian, -grad)
        slope, size = float(grad @ step), 1.0
        while True:  # Armijo: accept the first size that lowers the loss enough
            trial = params + size * step
            new_value, new_grad, new_z = loss_and_grad(trial)
            if float(new_value) <= float(value) + 1e-4 * size * slope or size < 1e-10:
                break
            size /= 2
        if size < 1e-10:  # no progress left at float64's precision
            break
        params, value, grad, z = trial, new_value, new_grad, new_z
    return params


def average_precision(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """scikit-learn's average_precision_score: the precision at each distinct score threshold
    (highest first), weighted by the recall it adds. 0 when there is no positive."""
    order = torch.argsort(scores.to(torch.float64), descending=True, stable=True)
    y, s = labels.to(torch.float64)[order], scores.to(torch.float64)[order]
    last = torch.ones_like(s, dtype=torch.bool)  # the last position of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    true_pos = torch.cumsum(y, 0)[last]
    predicted = (torch.arange(1, len(s) + 1, dtype=torch.float64))[last]
    positives = float(true_pos[-1]) if len(true_pos) else 0.0
    if positives == 0:
        return 0.0
    precision = true_pos / predicted
    recall = true_pos / positives
    gained = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((gained * precision).sum())


@dataclass
class Sweep:
    """The choice of C: the mean leave-one-image-out average precision of each C, and the best."""

    cs: tuple[float, ...]
    scores: torch.Tensor  # (folds, len(cs)) average precision of each held-out image and C
    folds: list[int]  # the images held out, in order (those with clear patches to score)
    best: float


def sweep_c(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, cs: Sequence[float] = CS) -> Sweep:
    """Leave-one-image-out: for each image with patches, fit on the others' patches with each C and
    score the image's patches by average precision; the best C has the highest mean (the first one on
    a tie, as numpy's argmax)."""
    images = [int(g) for g in torch.unique(groups)]
    if len(images) < 2:
        raise UsageError(
            "choosing C by leave-one-image-out needs at least 2 images with labelled patches; give C "
            "(--C on the command line; Meta's notebook settles on 0.1)"
        )
    rows, folds = [], []
    for image in images:
        held = groups == image
        train_y = y[~held]
        if train_y.min() == train_y.max():  # the other images hold one class only: nothing to fit
            continue
        params, scores = None, []
        for c in sorted(cs):  # from the strongest penalty up, each fit starting from the last
            params = fit_logistic(x[~held], train_y, c, init=params)
            probabilities = torch.sigmoid(x[held].to(torch.float64) @ params[:-1] + params[-1])
            scores.append((c, average_precision(y[held], probabilities)))
        by_c = dict(scores)
        rows.append([by_c[c] for c in cs])
        folds.append(image)
    if not rows:
        raise UsageError("no image could be held out: every other image holds foreground only, or background only")
    table = torch.tensor(rows, dtype=torch.float64)
    best = cs[int(torch.argmax(table.mean(dim=0)))]
    return Sweep(tuple(cs), table, folds, best)


# -- the classifier -------------------------------------------------------------------------------------------
@dataclass
class ForegroundClassifier:
    """A patch-level foreground classifier: a logistic regression on one model's patch features."""

    weight: torch.Tensor  # (D,) float64
    bias: float
    C: float
    model: dict[str, Any] = field(default_factory=dict)  # what the features came from (see model_probe)
    probe: torch.Tensor | None = None  # (n, D) the model's features of the probe image
    processing: dict[str, Any] = field(default_factory=dict)  # how images were resized for training
    sweep: Sweep | None = None

    def probabilities(self, grid: torch.Tensor) -> torch.Tensor:
        """(h, w, D) patch features -> (h, w) float32 foreground probabilities."""
        if grid.shape[-1] != self.weight.shape[0]:
            raise UsageError(
                f"this classifier takes {self.weight.shape[0]}-dim patch features; got {grid.shape[-1]}-dim ones "
                "(features of another model)"
            )
        z = grid.to(torch.float64) @ self.weight + self.bias
        return torch.sigmoid(z).float()

    def mask(self, grid: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """(h, w, D) patch features -> (h, w) bool: the probabilities, median-filtered 3x3, above 0.5."""
        return median_filter3(self.probabilities(grid)) > threshold

    # -- the file --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        tensors = {"weight": self.weight.to(torch.float64).contiguous(), "bias": torch.tensor([self.bias])}
        if self.probe is not None:
            tensors["probe"] = self.probe.float().contiguous()
        if self.sweep is not None:
            tensors["sweep_cs"] = torch.tensor(self.sweep.cs, dtype=torch.float64)
            tensors["sweep_scores"] = self.sweep.scores.contiguous()
            tensors["sweep_folds"] = torch.tensor(self.sweep.folds, dtype=torch.int64)
        metadata = {
            "format": FORMAT,
            "version": "1",
            "C": repr(self.C),
            "model": json.dumps(self.model),
            "processing": json.dumps(self.processing),
            "features": "the last layer's patch tokens after the final norm",
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ForegroundClassifier:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise UsageError(f"{path}: no such classifier file") from None
        except Exception as e:  # noqa: BLE001  (safetensors raises its own errors on a bad file)
            raise UsageError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
        if metadata.get("format") != FORMAT or "weight" not in tensors or "bias" not in tensors:
            raise UsageError(f"{path}: not a dino3 foreground classifier (made by `dino3 foreground train`)")
        sweep = None
        if "sweep_scores" in tensors:
            cs = tuple(float(c) for c in tensors["sweep_cs"])
            sweep = Sweep(cs, tensors["sweep_scores"], [int(i) for i in tensors["sweep_folds"]], float(metadata["C"]))
        return cls(
            weight=tensors["weight"].to(torch.float64),
            bias=float(tensors["bias"][0]),
            C=float(metadata["C"]),
            model=json.loads(metadata.get("model", "{}")),
            probe=tensors.get("probe"),
            processing=json.loads(metadata.get("processing", "{}")),
            sweep=sweep,
        )

    def check_model(self, model: Any, name: str = "the classifier") -> None:
        """Refuse a model whose features this classifier was not trained on (UsageError that says why)."""
        trained_on = self.model.get("name") or "another model"
        dim = model.config.feature_dim
        if dim != self.weight.shape[0]:
            raise UsageError(
                f"{name} was trained on {trained_on}'s {self.weight.shape[0]}-dim features; this model's are "
                f"{dim}-dim. Train one for this model: dino3 foreground train IMAGES --masks DIR -m MODEL -o FILE"
            )
        if self.probe is None:
            return
        answer = model_probe(model)
        cosine = float(F.cosine_similarity(answer.flatten(), self.probe.float().flatten(), dim=0))
        if not cosine >= PROBE_COSINE:
            raise UsageError(
                f"{name} was trained on another model's features ({trained_on}): this model answers a fixed probe "
                f"image differently (cosine {cosine:.3f} < {PROBE_COSINE}). Train one for this model: "
                "dino3 foreground train IMAGES --masks DIR -m MODEL -o FILE"
            )


def train_foreground(
    grids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    cs: Sequence[float] = CS,
    C: float | None = None,
) -> ForegroundClassifier:
    """Meta's recipe on (h, w, D) patch features and (h, w) patch labels in [0, 1] (`patch_labels`),
    one pair per image: clear patches only, C chosen by leave-one-image-out average precision (unless
    given), then one fit on all images."""
    if len(grids) != len(labels) or not grids:
        raise UsageError("give one label grid per feature grid, and at least one of each")
    xs, ys, groups = [], [], []
    for i, (grid, label) in enumerate(zip(grids, labels)):
        if tuple(label.shape) != tuple(grid.shape[:2]):
            shapes = f"labels of shape {tuple(label.shape)} for a patch grid {tuple(grid.shape[:2])}"
            raise UsageError(f"image {i}: {shapes}")
        flat = label.reshape(-1).to(torch.float64)
        clear = (flat < CLEAR_LABEL) | (flat > 1 - CLEAR_LABEL)
        xs.append(grid.reshape(-1, grid.shape[-1])[clear])
        ys.append((flat[clear] > 0.5).to(torch.float64))
        groups.append(torch.full((int(clear.sum()),), i))
    x, y, group = torch.cat(xs).to(torch.float64), torch.cat(ys), torch.cat(groups)
    if len(y) == 0 or y.min() == y.max():
        kind = "no clear patches" if len(y) == 0 else ("no background" if y.min() == 1 else "no foreground")
        raise UsageError(f"the masks give {kind} patches: training needs both foreground and background")
    sweep = None
    if C is None:
        sweep = sweep_c(x, y, group, cs)
        C = sweep.best
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise UsageError(f"C must be a number > 0, got {C!r}")
    params = fit_logistic(x, y, float(C))
    return ForegroundClassifier(weight=params[:-1], bias=float(params[-1]), C=float(C), sweep=sweep)


def median_filter3(values: torch.Tensor) -> torch.Tensor:
    """scipy.signal.medfilt2d(values, 3): the median of each 3x3 neighbourhood, zeros beyond the border."""
    padded = F.pad(values[None, None].float(), (1, 1, 1, 1))  # (1, 1, h + 2, w + 2)
    windows = F.unfold(padded, 3)  # (1, 9, h * w)
    return windows.median(dim=1).values.reshape(values.shape)


# -- without labels -------------------------------------------------------------------------------------------
def unsupervised_foreground(grid: torch.Tensor) -> torch.Tensor:
    """DINOv2's recipe: (h, w, D) patch features -> (h, w) bool, the patches on the positive side of
    the first principal component, its sign turned so that the image border is mostly background."""
    from .pca import fit_pca

    pca = fit_pca(grid, components=1)
    first = pca.transform(grid)[..., 0]  # (h, w)
    border = torch.cat([first[0], first[-1], first[1:-1, 0], first[1:-1, -1]])
    if border.mean() > 0:
        first = -first
    return first > 0


# -- the model a classifier belongs to --------------------------------------------------------------------------
def probe_pixels(size: int = 128) -> torch.Tensor:
    """A fixed (1, 3, size, size) input: smooth waves and a disc, in the range of normalised pixels."""
    coords = torch.linspace(-1.0, 1.0, size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    red = torch.sin(3.0 * xx + 1.0) + 0.5 * torch.cos(5.0 * yy)
    green = torch.cos(4.0 * (xx + yy)) - 0.5 * torch.sin(2.0 * yy)
    blue = ((xx - 0.2).square() + (yy + 0.1).square() < 0.3).float() * 2.0 - 1.0
    return torch.stack([red, green, blue])[None]


def model_probe(model: Any) -> torch.Tensor:
    """The model's last-layer patch features of `probe_pixels()`, (n, D) float32: what tells one
    model's features from another's."""
    from ..features import extract

    grid, _ = extract(model, probe_pixels(), "patches")  # (1, h, w, D)
    return grid[0].reshape(-1, grid.shape[-1]).float().cpu()
