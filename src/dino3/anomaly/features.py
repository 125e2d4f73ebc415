"""Images -> patch features, and the record of how they were made: the one place of the anomaly room
that loads a model and runs it, through the shared recipe (dino3.recipe), which records the features'
making in the detector and refuses a model that would make other numbers.

The features are the last layer's patch tokens after the final norm (the paper's and anomalib's: the
last block's output, normalised), of the image resized so that its shorter side is `resolution` px
(bicubic, antialiased, the aspect ratio kept: the paper's), centre-cropped to whole patches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError
from ..recipe import Made, Recipe, check_model, replay

RESOLUTION = 448  # the paper's default shorter side (it reports 448 and 672)
BICUBIC = 3  # PIL's code for bicubic, as preprocessor_config.json stores it


@dataclass
class ImageFeatures:
    """One image (or one rotation of it) as the model saw it."""

    name: str
    size: tuple[int, int]  # (H0, W0) the image's own size
    resized: tuple[int, int]  # (H, W) after the resize, before the crop to whole patches
    grid: torch.Tensor  # (h, w, D) float32 patch features


class FeatureMaker:
    """A recipe's model and processor (dino3.recipe.Made) for the anomaly room's patch features."""

    def __init__(self, made: Made, batch_size: int = 8) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.made, self.model, self.processor = made, made.model, made.processor
        self.name = made.recipe.model
        self.batch_size = batch_size
        self._record: dict[str, Any] | None = None

    @classmethod
    def for_model(
        cls,
        model: Any,
        *,
        resolution: int = RESOLUTION,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 8,
    ) -> FeatureMaker:
        """model: a preset name, hub id, folder or weights file (loaded here), or a loaded dino3 model."""
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
            raise UsageError(f"resolution must be a whole number of pixels >= 16, got {resolution!r}")
        options = {"pool": "patches", "keep_aspect": "shorter", "target": resolution, "fit": "crop"}
        options["resample"] = BICUBIC
        if isinstance(model, (str, os.PathLike)):
            made = Recipe(os.fspath(model), dtype=dtype, **options).load(device=device)
        elif hasattr(model, "config") and callable(model):
            if dtype is not None or device is not None:
                raise UsageError(
                    "dtype and device apply to a model loaded here: give the model's name, or move it first"
                )
            name = getattr(model, "name_or_path", None) or type(model).__name__
            dtype = str(getattr(model, "dtype", "float32")).removeprefix("torch.")
            recipe = Recipe(str(name), dtype=dtype, **options)
            made = Made(recipe, model, recipe.processor_for(model))
        else:
            raise UsageError(
                f"model must be a model name, folder or file, or a loaded dino3 model; got {type(model).__name__}"
            )
        return cls(made, batch_size)

    @classmethod
    def replay(cls, record: dict[str, Any], model: Any = None, batch_size: int = 8) -> FeatureMaker:
        """The model that makes the features `record` (a detector's) describes: loaded again (from
        `model` where it lies now), or `model` itself if it is a loaded one; refused if it would make
        other numbers."""
        what = "the detector"
        if model is not None and not isinstance(model, (str, os.PathLike)):
            recipe = Recipe.from_meta(record)
            made = Made(recipe, model, recipe.processor_for(model))
            check_model(record, made, what)
        else:
            made = replay(record, what, model=model)
        return cls(made, batch_size)

    @property
    def record(self) -> dict[str, Any]:
        """How the features are made (dino3.recipe's description)."""
        if self._record is None:
            self._record = self.made.describe()
        return self._record

    # -- the features ------------------------------------------------------------------------------------
    def features(
        self,
        images: Sequence[Any],
        angles: Sequence[float] = (0,),
        progress: Callable[[int], None] | None = None,
    ) -> list[list[ImageFeatures]]:
        """For each image, one ImageFeatures per angle (the image turned first, see scoring.rotate).
        A bad image is an ImageError that names it."""
        from ..features import extract
        from ..images import load_image
        from .scoring import rotate

        out: list[list[ImageFeatures]] = []
        chunk = max(1, self.batch_size // max(len(angles), 1))  # images decoded and run together
        for first in range(0, len(images), chunk):
            items = []  # (image in chunk, name, size, resized, (3, H, W) pixels) for each angle
            for i, source in enumerate(images[first : first + chunk], start=first):
                name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"image {i}"
                image = load_image(source)  # (3, H0, W0); a bad image: ImageError with its name
                size = (int(image.shape[1]), int(image.shape[2]))
                resized = tuple(self.processor.aspect_size(*size))
                items += [(i - first, name, size, resized, self.processor.pixels(rotate(image, a))) for a in angles]
            grids: list[torch.Tensor | None] = [None] * len(items)
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for n, item in enumerate(items):
                by_shape.setdefault(tuple(item[4].shape), []).append(n)
            for members in by_shape.values():
                for start in range(0, len(members), self.batch_size):
                    part = members[start : start + self.batch_size]
                    grid, _ = extract(self.model, torch.stack([items[n][4] for n in part]), "patches")  # (B, h, w, D)
                    for n, g in zip(part, grid.float().cpu()):
                        grids[n] = g
            for n in range(0, len(items), len(angles)):
                _, name, size, resized, _ = items[n]
                out.append([ImageFeatures(name, size, resized, grids[m]) for m in range(n, n + len(angles))])
            if progress is not None:
                progress(len(items) // len(angles))
        return out
