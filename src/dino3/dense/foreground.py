"""Foreground masks from patch features: Meta's notebook (`notebooks/foreground_segmentation.ipynb`)
as a library, and DINOv2's unsupervised recipe when there is no classifier.

Training (`train_foreground`) takes the patch features of some images and their masks pooled onto the
patch grid (`patch_labels`: the mask resized as its image was, then averaged over each patch). Only
patches with a clear label (< 0.01 or > 0.99) are kept. A logistic regression is fitted for each C
of logspace(-7, 0, 8), scored by leave-one-image-out average precision, and fitted again on all
images with the C of the best mean score. Applying it (`ForegroundClassifier.mask`): the probability
of each patch, a 3x3 median filter (zeros beyond the border, as scipy's medfilt2d) and a 0.5 threshold.

The logistic regression is dino3.linear's, scikit-learn's `LogisticRegression(C=C)`: loss
sum(log(1 + exp(-y z))) + |w|^2 / 2C, the intercept not penalised, solved by Newton's method in
float64 (L-BFGS for features wider than 2048) to a gradient 1e-4 times below scikit-learn's default
tolerance: the same probabilities within 1e-4 (the tests check it), and no scikit-learn to install.
A classifier measures itself as it is trained (`Quality`: the held-out average precision, and what
its masks find on its own training images), so that a weak one can be said to be weak.

Without labels, `unsupervised_foreground` is DINOv2's recipe (paper, Fig. 9): the first principal
component of an image's patch features, with the patches on its positive side as the foreground. A
component has no sign, so it is turned so that the image's border is mostly on the negative side.
It is a heuristic: it works on photos of one object, not on scenes.

A classifier is saved with safetensors (no pickle), with what it needs to refuse a model it was not
made for: the model's fingerprint (dino3.recipe.fingerprint, `model_probe`), compared at cosine 0.99, which
bf16, int8 and the compiled runtimes pass and other weights do not.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import linear
from .._io import atomic_path
from ..errors import UsageError
from ..linear import Sweep, average_precision

__all__ = [
    "CS",
    "ForegroundClassifier",
    "Quality",
    "Sweep",
    "average_precision",
    "fit_logistic",
    "foreground_mask",
    "mask_for",
    "median_filter3",
    "model_probe",
    "patch_labels",
    "read_mask",
    "read_pair",
    "sweep_c",
    "train_foreground",
    "unsupervised_foreground",
]

CS = tuple(float(c) for c in np.logspace(-7, 0, 8))  # Meta's sweep of C
CLEAR_LABEL = 0.01  # patches with a label within this of 0 or 1 are kept for training
FORMAT = "dino3-foreground"


# -- labels -------------------------------------------------------------------------------------------------
def patch_labels(mask: torch.Tensor, processor: Any) -> torch.Tensor:
    """An image's mask (H0, W0) in [0, 1] -> its patch labels (h, w): the mask resized (and cropped or
    padded) as `processor` does the image, then averaged over each patch."""
    geometry = type(processor).from_dict(processor.to_dict(), do_normalize=False)
    pixels = geometry.pixels(mask.to(torch.float32).clamp(0, 1)[None])  # (3, H, W): the mask three times
    p = processor.patch_size
    return F.avg_pool2d(pixels[:1], p, p)[0]  # (h, w)


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask image (anything dino3.fetch reads: a path, URL, object URI) -> (H, W) float32 in
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


def mask_for(image: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The mask of an image in a folder of masks: the file with the image's name (its stem) and an
    image suffix, a PNG first. ImageError when there is none."""
    from ..embed.inputs import IMAGE_SUFFIXES
    from ..errors import ImageError

    folder, stem = Path(folder), Path(image).stem
    found = sorted(p for p in folder.glob(f"{_glob_escape(stem)}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ImageError(f"{image}: no mask for it in {folder} (looked for {stem}.png and other image suffixes)")
    found.sort(key=lambda p: p.suffix.lower() != ".png")  # a PNG first
    return found[0]


def read_pair(image: str | os.PathLike, masks: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and its mask from the folder `masks` (`mask_for`): (3, H, W) uint8 and (H, W) float32
    in [0, 1]. ImageError, naming the file, when either cannot be read or their sizes differ."""
    from ..errors import ImageError
    from ..images import load_image

    mask_path = mask_for(image, masks)
    pixels = load_image(image)
    mask = read_mask(mask_path)
    if tuple(mask.shape) != tuple(pixels.shape[-2:]):
        raise ImageError(
            f"{mask_path}: the mask is {mask.shape[1]}x{mask.shape[0]} px but {image} is "
            f"{pixels.shape[-1]}x{pixels.shape[-2]}: a mask must have its image's size"
        )
    return pixels, mask


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def foreground_mask(features: torch.Tensor, foreground: ForegroundClassifier | str | None) -> torch.Tensor | None:
    """An image's (h, w) foreground: None for no foreground choice (every patch), "auto" for DINOv2's
    unsupervised recipe, or a classifier's mask."""
    if foreground is None:
        return None
    if isinstance(foreground, str):
        if foreground != "auto":
            raise UsageError(f"foreground must be a ForegroundClassifier, 'auto' or None, got {foreground!r}")
        return unsupervised_foreground(features)
    return foreground.mask(features)


# -- the logistic regression (dino3.linear) --------------------------------------------------------------------
TOLERANCE = 1e-8  # the fits stop at this gradient of the mean loss: scikit-learn's optimum within 1e-4


def _solver(dim: int) -> dict[str, Any]:
    """Newton's method up to linear.NEWTON_MAX_DIM features (a few dozen steps, even where the
    classes are nearly separable), L-BFGS beyond."""
    if dim <= linear.NEWTON_MAX_DIM:
        return {"solver": "newton", "tol": TOLERANCE, "max_iter": 200}
    return {"solver": "lbfgs", "tol": TOLERANCE, "max_iter": 20_000}


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, C: float, init: torch.Tensor | None = None, tolerance: float = TOLERANCE
) -> torch.Tensor:
    """Deprecated: `dino3.linear.fit(x, y, 2, C, solver="newton")` fits the same model. (n, D)
    features, (n,) labels in {0, 1} -> (D + 1,) float64 parameters (weights, then the intercept)."""
    warnings.warn(
        "dino3.dense.fit_logistic is deprecated; use dino3.linear.fit(x, y, 2, C, solver='newton')",
        DeprecationWarning,
        stacklevel=2,
    )
    start = None
    if init is not None:
        init = init.to(torch.float64)
        start = linear.LinearModel(torch.stack((torch.zeros_like(init[:-1]), init[:-1])), F.pad(init[-1:], (1, 0)), 0)
    model = linear.fit(x, y, 2, C, init=start, **{**_solver(x.shape[1]), "tol": tolerance})
    return torch.cat((model.weight[1] - model.weight[0], model.bias[1:] - model.bias[:1]))


def sweep_c(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, cs: Sequence[float] = CS) -> Sweep:
    """Meta's choice of C, leave-one-image-out: for each image with patches, fit on the others'
    patches with each C and score the image's patches by average precision; the best C has the
    highest mean (the smallest C among equals)."""
    images = torch.unique(groups)
    if len(images) < 2:
        raise UsageError(
            "choosing C by leave-one-image-out needs at least 2 images with labelled patches; give C "
            "(--C on the command line; Meta's notebook settles on 0.1)"
        )
    if not any(len(torch.unique(y[groups != image])) == 2 for image in images):
        raise UsageError("no image could be held out: every other image holds foreground only, or background only")
    return linear.sweep_groups(x, y, groups, cs, metric="average_precision", **_solver(x.shape[1]))


# -- how good a classifier is ------------------------------------------------------------------------------------
WEAK_LIFT = 0.5  # a held-out AP less than half-way from a guess's (the foreground share) to 1 is weak
WEAK_SHARE = 0.5  # masks of its own training images finding less than half the foreground (or marking
# more than half the background) are weak


@dataclass
class Quality:
    """How well a classifier separates foreground, measured when it is trained."""

    validation_ap: float | None  # mean leave-one-image-out average precision at the chosen C (None: C given)
    foreground_share: float  # the foreground's share of the clear training patches: the AP a guess scores
    found: float  # share of its training images' foreground patches that its masks mark
    false_alarms: float  # share of their background patches that its masks mark
    top_probability: float  # the highest foreground probability of a training patch

    @property
    def problems(self) -> list[str]:
        """Why the classifier is weak, one sentence each (empty: it is not)."""
        out = []
        share = self.foreground_share
        if self.validation_ap is not None and self.validation_ap < share + WEAK_LIFT * (1 - share):
            out.append(
                f"its held-out average precision {self.validation_ap:.2f} is near the {share:.2f} that a guess "
                "scores (the foreground's share of the patches)"
            )
        if self.top_probability < 0.5:
            out.append(
                f"its probabilities never reach 0.5 on its own training images (at most {self.top_probability:.2f}): "
                "its masks are empty"
            )
        elif self.found < WEAK_SHARE:
            out.append(f"on its own training images its masks find only {self.found:.0%} of the foreground")
        if self.false_alarms > WEAK_SHARE:
            out.append(f"on its own training images its masks mark {self.false_alarms:.0%} of the background")
        return out

    @property
    def weak(self) -> bool:
        return bool(self.problems)

    def summary(self) -> str:
        """One line: the held-out average precision and what the masks find on the training images."""
        held = (
            f"validation average precision {self.validation_ap:.3f} (leave-one-image-out; a guess scores "
            f"{self.foreground_share:.3f})"
            if self.validation_ap is not None
            else f"no validation (C given; a guess would score {self.foreground_share:.3f})"
        )
        return (
            f"{held}; on its training images the masks find {self.found:.0%} of the foreground and mark "
            f"{self.false_alarms:.0%} of the background"
        )


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
    quality: Quality | None = None  # measured at training (None: a file of an older dino3)

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
        if self.quality is not None:
            metadata["quality"] = json.dumps(asdict(self.quality))
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
            folds = [int(i) for i in tensors["sweep_folds"]]
            sweep = Sweep(cs, tensors["sweep_scores"], float(metadata["C"]), "average_precision", folds)
        quality = None
        if "quality" in metadata:
            try:
                quality = Quality(**json.loads(metadata["quality"]))
            except (ValueError, TypeError):
                raise UsageError(f"{path}: its quality record is damaged; train the classifier again") from None
        return cls(
            weight=tensors["weight"].to(torch.float64),
            bias=float(tensors["bias"][0]),
            C=float(metadata["C"]),
            model=json.loads(metadata.get("model", "{}")),
            probe=tensors.get("probe"),
            processing=json.loads(metadata.get("processing", "{}")),
            sweep=sweep,
            quality=quality,
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
        from ..recipe import same_fingerprint

        if not same_fingerprint(self.probe.flatten().tolist(), model_probe(model).tolist()):
            raise UsageError(
                f"{name} was trained on another model's features ({trained_on}): this model computes other "
                "numbers (its fingerprint differs; a classifier from dino3 0.2 or earlier must be trained again). "
                "Train one for this model: dino3 foreground train IMAGES --masks DIR -m MODEL -o FILE"
            )


def train_foreground(
    grids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    cs: Sequence[float] = CS,
    C: float | None = None,
) -> ForegroundClassifier:
    """Meta's recipe on (h, w, D) patch features and (h, w) patch labels in [0, 1] (`patch_labels`),
    one pair per image: clear patches only, C chosen by leave-one-image-out average precision (unless
    given), then one fit on all images; its `quality` measured on the way."""
    if len(grids) != len(labels) or not grids:
        raise UsageError("give one label grid per feature grid, and at least one of each")
    xs, ys, groups, clears = [], [], [], []
    for i, (grid, label) in enumerate(zip(grids, labels)):
        if tuple(label.shape) != tuple(grid.shape[:2]):
            shapes = f"labels of shape {tuple(label.shape)} for a patch grid {tuple(grid.shape[:2])}"
            raise UsageError(f"image {i}: {shapes}")
        flat = label.reshape(-1).to(torch.float64)
        clear = (flat < CLEAR_LABEL) | (flat > 1 - CLEAR_LABEL)
        xs.append(grid.reshape(-1, grid.shape[-1])[clear])
        ys.append((flat[clear] > 0.5).to(torch.long))
        groups.append(torch.full((int(clear.sum()),), i))
        clears.append(clear)
    x, y, group = torch.cat(xs).to(torch.float64), torch.cat(ys), torch.cat(groups)
    if len(y) == 0 or y.min() == y.max():
        kind = "no clear patches" if len(y) == 0 else ("no background" if y.min() == 1 else "no foreground")
        raise UsageError(f"the masks give {kind} patches: training needs both foreground and background")
    sweep = None
    if C is None:
        sweep = sweep_c(x, y, group, cs)
        C = sweep.C
    if isinstance(C, bool) or not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise UsageError(f"C must be a number > 0, got {C!r}")
    model = linear.fit(x, y, 2, float(C), **_solver(x.shape[1]))
    weight, bias = model.weight[1] - model.weight[0], float(model.bias[1] - model.bias[0])
    classifier = ForegroundClassifier(weight=weight, bias=bias, C=float(C), sweep=sweep)
    classifier.quality = _quality(classifier, grids, clears, ys, sweep)
    return classifier


def _quality(classifier, grids, clears, ys, sweep) -> Quality:
    """The classifier's masks on its own training images, against their clear patches."""
    marked = torch.cat([classifier.mask(g).reshape(-1)[c] for g, c in zip(grids, clears)])
    top = max(float(classifier.probabilities(g).max()) for g in grids)
    y = torch.cat(ys).bool()
    validation = float(sweep.scores.mean(dim=0)[list(sweep.cs).index(sweep.C)]) if sweep is not None else None
    return Quality(
        validation_ap=validation,
        foreground_share=float(y.double().mean()),
        found=float(marked[y].double().mean()),
        false_alarms=float(marked[~y].double().mean()) if (~y).any() else 0.0,
        top_probability=top,
    )


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
def model_probe(model: Any) -> torch.Tensor:
    """The model's fingerprint (dino3.recipe.fingerprint: what it computes for a fixed input), which a
    classifier keeps to refuse a model whose features it was not trained on."""
    from ..recipe import fingerprint

    return torch.tensor(fingerprint(model), dtype=torch.float32)
