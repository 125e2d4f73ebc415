"""Images -> patch features, and the record of how they were made: the ONE place of the anomaly room
that loads a model and runs it (the shared `dino3.recipe`, when it lands, takes its place).

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
    """A loaded model and its preprocessing, with the record that refuses another model later.

    model: a preset name, hub id, folder or weights file (loaded here), or a loaded dino3 model.
    processor: a recorded processor (its to_dict()), used as it is instead of one made for `model`.
    """

    def __init__(
        self,
        model: Any,
        *,
        resolution: int = RESOLUTION,
        dtype: str | None = None,
        device: str | None = None,
        processor: dict[str, Any] | None = None,
        batch_size: int = 8,
    ) -> None:
        from ..api import load
        from ..embed.job import model_name
        from ..processing import DINOv3ViTImageProcessor

        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
            raise UsageError(f"resolution must be a whole number of pixels >= 16, got {resolution!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(model, (str, os.PathLike)):
            try:
                self.model = load(model, dtype=dtype, device=device)
            except ValueError as e:  # an unknown dtype or device
                raise UsageError(str(e)) from None
            self.name = model_name(model)
        elif hasattr(model, "config") and callable(model):
            if dtype is not None or device is not None:
                raise UsageError(
                    "dtype and device apply to a model loaded here: give the model's name, or move it first"
                )
            self.model = model
            self.name = getattr(model, "name_or_path", None) or type(model).__name__
        else:
            raise UsageError(
                f"model must be a model name, folder or file, or a loaded dino3 model; got {type(model).__name__}"
            )
        if processor is not None:
            self.processor = DINOv3ViTImageProcessor.from_dict(processor)
        else:
            self.processor = DINOv3ViTImageProcessor.for_model(
                self.model, keep_aspect="shorter", target_size=resolution, fit="crop", resample=BICUBIC
            )
        self.batch_size = batch_size
        self._record: dict[str, Any] | None = None

    # -- the record --------------------------------------------------------------------------------------
    @property
    def record(self) -> dict[str, Any]:
        """How the features are made: the model (name, identity, fingerprint), the processor, the dtype."""
        if self._record is None:
            from ..embed.job import model_fingerprint, model_identity
            from ..probe.probe import _canonical

            self._record = _canonical(
                {
                    "model": self.name,
                    "model_identity": model_identity(self.model),
                    "model_fingerprint": model_fingerprint(self.model),
                    "processor": self.processor.to_dict(),
                    "dtype": str(getattr(self.model, "dtype", "float32")).removeprefix("torch."),
                    "features": "last layer patch tokens after the final norm",
                }
            )
        return self._record

    def check(self, recorded: dict[str, Any], what: str = "the detector") -> None:
        """Refuse (UsageError) a model other than the one `recorded` was made with, saying what differs.
        The weights count by what they compute (the fingerprint), wherever their files lie; another
        dtype of the same weights passes (its fingerprint is within the tolerance)."""
        from ..embed.job import same_fingerprint
        from ..probe.probe import identity_differences

        found = self.record
        differences = identity_differences(recorded["model_identity"], found["model_identity"], files=False)
        if not differences and not same_fingerprint(recorded["model_fingerprint"], found["model_fingerprint"]):
            differences = ["its weights compute other numbers"]
        if differences:
            raise UsageError(
                f"{what} was made with {recorded.get('model')}; {self.name} is another model ("
                + "; ".join(differences)
                + "). Score with the detector's model, or fit a detector for this one"
            )

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
