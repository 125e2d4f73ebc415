"""Classifying with a probe: images (or their `dino3 embed` features) -> the top classes of each.

    found = dino3.probe.classify(["photos/"], "flowers-probe", top_k=5)
    found.predictions.labels[0], found.predictions.scores[0]     # best first

Images are embedded as the probe's training embedded its own: the probe's model (another one is
refused before any image is read), pooling and preprocessing, through `dino3 embed`'s engine; an
image that cannot be read is listed with its reason and the others go on.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..embed import Inputs, expand_inputs, read_embeddings
from ..errors import UsageError
from ..recipe import check_options
from .dataset import is_embeddings_file
from .embedding import Embedded, embed_images
from .probe import Predictions, Probe

# what runs the probe's model another way (the same weights: its features stay the probe's)
RUNTIME_OPTIONS = ("dtype", "quantize", "backend", "precision", "calibration")


@dataclass
class Classified:
    paths: list[str]  # the images classified, in input order
    predictions: Predictions
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """{"predictions": [{"path", "labels", "scores"}, ...]}, each best first."""
        rows = [
            {"path": p, "labels": labels, "scores": [round(float(s), 6) for s in scores]}
            for p, labels, scores in zip(self.paths, self.predictions.labels, self.predictions.scores)
        ]
        out: dict[str, Any] = {"predictions": rows}
        if self.failures:
            out["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return out


def load_probe(probe: Probe | str | os.PathLike, device: str | None = None) -> Probe:
    return probe if isinstance(probe, Probe) else Probe.load(probe, device=device)


def features_for(
    probe: Probe,
    inputs: Inputs | str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Embedded:
    """The probe's features of some images (Inputs), or of an embeddings file (checked against the probe)."""
    if not isinstance(inputs, Inputs):
        data = read_embeddings(inputs)
        probe.check_embeddings(data.meta or {}, str(inputs))
        features = np.asarray(data.features)
        if features.ndim != 2 or features.shape[1] != probe.feature_dim:
            raise UsageError(
                f"{inputs} holds features of shape {tuple(features.shape[1:])}, but the probe takes width "
                f"{probe.feature_dim} ({probe.pool} features of {probe.model_name})"
            )
        return Embedded(data.paths, features, data.meta or {})
    runtime = {key: options.pop(key) for key in RUNTIME_OPTIONS if options.get(key) is not None}
    for key in RUNTIME_OPTIONS:
        options.pop(key, None)
    made = probe.made(model, device, **runtime)  # checked before any image is read
    with tempfile.TemporaryDirectory(prefix="dino3-probe-") as tmp:
        found = embed_images(
            inputs.paths,
            made.recipe,
            Path(tmp) / "embeddings.npz",
            skipped=inputs.skipped,
            load=lambda *args, **kwargs: made.model,  # the model loaded and checked above
            device=device,
            progress=progress,
            **options,
        )
    probe.check_embeddings(found.meta, "the embedded images")
    return found


def classify(
    images: Sequence[str | os.PathLike] | str | os.PathLike,
    probe: Probe | str | os.PathLike,
    *,
    top_k: int = 5,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Classified:
    """Classify image files, folders, globs and list files (as `dino3 embed` takes them), or one
    embeddings file written by `dino3 embed` with the probe's model and pooling."""
    runtime = {key: options[key] for key in RUNTIME_OPTIONS if options.get(key) is not None}
    check_options(**runtime)  # the same refusals as every command's, before the probe is read
    probe = load_probe(probe, device)
    items = [os.fspath(images)] if isinstance(images, (str, os.PathLike)) else [os.fspath(i) for i in images]
    if not items:
        raise UsageError("no images given")
    embeddings = [item for item in items if is_embeddings_file(item)]
    if embeddings and len(items) > 1:
        raise UsageError(f"{embeddings[0]} is an embeddings file: give it alone, or give images only")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
    if embeddings:
        found = features_for(probe, items[0])
    else:
        inputs = expand_inputs(items)
        if not inputs.paths:
            raise UsageError(inputs.none_found())
        found = features_for(probe, inputs, model=model, device=device, progress=progress, **options)
    predictions = probe.predict(found.features, top_k)
    return Classified(found.paths, predictions, found.failures, found.notes)
