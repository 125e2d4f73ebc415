"""A trained probe: a folder holding the weights (`probe.safetensors`) and what they mean (`probe.json`).

probe.json holds the classes, the method and its setting (C, or k and the temperature), the
validation scores, and everything that decides the features the probe expects: the model's identity
(`dino3.embed.model_identity`), the pooling, the image processor's settings. Nothing is pickled.
The JSON is written last and names the weights file's id, so that a folder whose training did not
finish, or whose two files come from different runs, is refused with the reason, never half-used.

    probe = Probe.load("my-probe")
    probe.predict(features)                   # (N, D) features -> labels and scores, best first
    probe.predict(["a.jpg", "b.jpg"])         # images: embedded with the probe's model and settings
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path, atomic_write_text
from .._version import __version__
from ..errors import UsageError
from ..features import POOLS
from ..recipe import Made, Recipe, differences
from . import knn
from .logreg import LinearModel

FORMAT = "dino3-probe"
FORMAT_VERSION = 1
SETTINGS_FILE = "probe.json"
WEIGHTS_FILE = "probe.safetensors"
METHODS = ("logreg", "knn")
FEATURES = tuple(pool for pool in POOLS if pool != "patches")  # one vector per image
REQUIRED = ("method", "classes", "feature_dim", "features", "model", "model_identity", "processor", "id")


@dataclass
class Predictions:
    """The top classes of each input, best first."""

    labels: list[list[str]]  # (N, top_k) class names
    scores: np.ndarray  # (N, top_k) probabilities (logreg) or vote shares (knn)
    indices: np.ndarray  # (N, top_k) class indices

    def __len__(self) -> int:
        return len(self.labels)


class Probe:
    """A linear (logistic regression) or k-NN classifier over one model's pooled features."""

    def __init__(
        self,
        method: str,
        classes: Sequence[str],
        tensors: dict[str, torch.Tensor],
        settings: dict[str, Any],
        source: str | None = None,
    ) -> None:
        where = source or f"this {method} probe"
        _check_settings(method, classes, settings, where)
        self.method = method
        self.classes = list(classes)
        self.tensors = tensors  # logreg: weight (K, D) float64, bias (K,); knn: features (N, D) unit rows, labels (N,)
        self.settings = settings
        self._loaded: tuple[Any, Made] | None = None  # (request, model) that `made` loaded
        self._check_tensors(where)

    # -- what it expects ----------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.settings["feature_dim"])

    @property
    def pool(self) -> str:
        return self.settings["features"]

    @property
    def model_name(self) -> str:
        return self.settings["model"]

    @property
    def processor(self) -> dict[str, Any]:
        return self.settings["processor"]

    def __repr__(self) -> str:
        chosen = f"C={self.settings.get('C')}" if self.method == "logreg" else f"k={self.settings.get('k')}"
        return (
            f"Probe({self.method}, {len(self.classes)} classes, {chosen}, {self.pool} features of "
            f"{self.feature_dim} from {self.model_name})"
        )

    # -- predictions --------------------------------------------------------------------------------------
    def probabilities(self, features: Any) -> torch.Tensor:
        """(N, D) features (numpy or torch) -> (N, K) class scores that sum to 1 (float64 for logreg)."""
        x = self._features(features)
        if self.method == "logreg":
            model = LinearModel(self.tensors["weight"], self.tensors["bias"], 0)
            return model.probabilities(x)
        train = self.tensors["features"]
        sims, indices = knn.neighbours(knn.normalize(x).to(train.device), train, int(self.settings["k"]))
        labels = self.tensors["labels"][indices]
        return knn.vote(sims, labels, len(self.classes), float(self.settings["temperature"]))

    def predict(
        self, inputs: Any, top_k: int = 5, *, model: Any = None, batch_size: int = 16, workers: int = 2
    ) -> Predictions:
        """Inputs: (N, D) features (numpy or torch), or images (a path, URL, PIL image, array, or a
        list of them), which are embedded with the probe's model (or `model`, which must be the same
        one: a name, a folder or a loaded model) and its preprocessing."""
        if _is_features(inputs):
            probabilities = self.probabilities(inputs)
        else:
            probabilities = self.probabilities(self.embed(inputs, model=model, batch_size=batch_size, workers=workers))
        return self.top(probabilities, top_k)

    def top(self, probabilities: torch.Tensor, top_k: int = 5) -> Predictions:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
        top = probabilities.topk(min(top_k, len(self.classes)), dim=1)
        indices = top.indices.cpu().numpy()
        labels = [[self.classes[i] for i in row] for row in indices]
        return Predictions(labels, top.values.float().cpu().numpy(), indices)

    def embed(self, images: Any, *, model: Any = None, batch_size: int = 16, workers: int = 2) -> torch.Tensor:
        """Images -> (N, D) features, as the probe's training embedded its images: its recipe (the same
        model, checked; pooling, preprocessing, dtype, quantization, backend), through the batched engine
        of `dino3 embed`."""
        from ..pipeline import iter_batches

        made = self.made(model)
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        rows: list[torch.Tensor | None] = [None] * len(sources)
        for batch in iter_batches(sources, made.processor, batch_size, workers):
            values, _ = made.features(batch.pixel_values)
            for row, index in enumerate(batch.indices):
                rows[index] = values[row].float().cpu()
        return torch.stack(rows) if rows else torch.zeros(0, self.feature_dim)

    # -- the recipe of its features, and refusals -----------------------------------------------------------
    @property
    def recorded(self) -> dict[str, Any]:
        """How the probe's features were made, in dino3.recipe's keys (what Recipe.from_meta reads)."""
        s, embedding = self.settings, self.settings.get("embedding") or {}
        return {
            "model": s["model"],
            "model_identity": s["model_identity"],
            "model_fingerprint": s.get("model_fingerprint"),
            "pool": s["features"],
            "layers": None,
            "processor": s["processor"],
            "recipe": s.get("recipe"),
            **{key: embedding.get(key) for key in ("dtype", "quantize", "backend", "precision")},
        }

    def made(self, model: Any = None, device: str | None = None, **runtime: Any) -> Made:
        """The probe's recipe with its model: loaded (once; `model`: where it lies now, if it moved), or
        `model` itself if it is a loaded one; checked to be the probe's. `runtime` (dtype, quantize,
        backend, precision, calibration) runs the same weights another way."""
        if model is not None and not isinstance(model, (str, os.PathLike)):
            recipe = Recipe.from_meta(self.recorded)
            made = Made(recipe, model, recipe.processor_for(model))
            self.check_made(made, getattr(model, "name_or_path", None) or type(model).__name__)
            return made
        name = os.fspath(model) if model is not None else self.model_name
        key = (name, device, tuple(sorted(runtime.items())))
        if self._loaded is None or self._loaded[0] != key:  # loaded on first use, kept for the next calls
            recipe = Recipe.from_meta(self.recorded, model=name)
            if runtime:
                recipe = replace(recipe, **runtime)
            made = recipe.load(device=device)
            self.check_made(made, name)
            self._loaded = (key, made)
        return self._loaded[1]

    def check_made(self, made: Made, name: str) -> None:
        """Refuse a model other than the one the probe was made with, saying what differs. Its weights
        count by what they compute (the fingerprint), wherever their files lie; its dtype, quantization
        and backend may differ (the same weights, run another way)."""
        self._refuse_other_model(made.describe(), name)

    def _refuse_other_model(self, found: dict[str, Any], name: str) -> None:
        changed = differences(self.recorded, found, keys=("model_identity",))  # without fingerprints: the files
        if changed:
            raise UsageError(
                f"this probe was made with {self.model_name}; {name} is another model ("
                + "; ".join(changed[:6])
                + "). Use the probe's model, or train a probe for this one"
            )

    def check_embeddings(self, meta: dict[str, Any], source: str) -> None:
        """Refuse features (an embeddings file's settings) that are not the ones the probe expects."""
        if meta.get("model_identity") is None:
            raise UsageError(f"{source} records no model identity; it was not written by `dino3 embed`")
        self._refuse_other_model(meta, f"{source}'s model ({meta.get('model')})")
        if meta.get("pool") != self.pool or meta.get("layers") is not None:
            raise UsageError(
                f"this probe takes {self.pool} features; {source} holds {meta.get('pool')!r} features"
                + (f" of layers {meta.get('layers')}" if meta.get("layers") is not None else "")
                + f": embed with --pool {self.pool}"
            )
        changed = differences(self.recorded, meta, keys=("processor",)) if meta.get("processor") is not None else []
        if changed:
            raise UsageError(
                f"{source} was preprocessed differently from the probe's images ({'; '.join(changed[:3])}); "
                "embed with the probe's preprocessing (probe.json, 'processor')"
            )

    def _features(self, features: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2:
            raise UsageError(f"features must be (N, D), one vector per image; got shape {tuple(x.shape)}")
        if x.shape[1] != self.feature_dim:
            raise UsageError(
                f"features of width {x.shape[1]}, but this probe was made for width {self.feature_dim} "
                f"({self.pool} features of {self.model_name}): embed with the probe's model and --pool {self.pool}"
            )
        if not x.is_floating_point():
            x = x.double()
        if not torch.isfinite(x).all():
            rows = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten().tolist()
            raise UsageError(
                f"the features of {len(rows)} input(s) (rows {rows[:5]}) hold NaN or inf (a model that overflowed, "
                "as float16 does): embed them in float32 or bfloat16"
            )
        return x

    def _check_tensors(self, where: str) -> None:
        """The weights, whole: their shapes agree with the settings, their numbers are finite, a k-NN
        probe has rows and integer labels within its classes."""
        K, D = len(self.classes), self.feature_dim
        if self.method == "logreg":
            expected = {"weight": (K, D), "bias": (K,)}
        else:
            expected = {"features": (-1, D), "labels": (-1,)}
        for name, shape in expected.items():
            tensor = self.tensors.get(name)
            if tensor is None:
                raise UsageError(f"{where} is incomplete: the weights hold no {name!r}{_AGAIN}")
            if tensor.ndim != len(shape) or any(s not in (-1, t) for s, t in zip(shape, tensor.shape)):
                raise UsageError(
                    f"{where} is damaged: {name!r} has shape {tuple(tensor.shape)}, but probe.json says "
                    f"{len(self.classes)} classes and features of width {D}{_AGAIN}"
                )
        numbers = ("weight", "bias") if self.method == "logreg" else ("features",)
        for name in numbers:
            tensor = self.tensors[name]
            if not tensor.is_floating_point():
                raise UsageError(f"{where} is damaged: {name!r} holds {tensor.dtype}, not floating point{_AGAIN}")
            if not torch.isfinite(tensor).all():
                raise UsageError(f"{where} is damaged: {name!r} holds NaN or inf{_AGAIN}")
        if self.method == "knn":
            labels = self.tensors["labels"]
            if len(labels) != len(self.tensors["features"]):
                count = len(self.tensors["features"])
                raise UsageError(f"{where} is damaged: {len(labels)} labels for {count} features{_AGAIN}")
            if len(labels) == 0:
                raise UsageError(f"{where} is damaged: a k-NN probe with no training features{_AGAIN}")
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise UsageError(f"{where} is damaged: 'labels' holds {labels.dtype}, not class indices{_AGAIN}")
            if not 0 <= int(labels.min()) <= int(labels.max()) < K:
                raise UsageError(f"{where} is damaged: a label index outside the {K} classes{_AGAIN}")

    # -- files --------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the folder: the weights first, then probe.json (which names the weights' id)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        probe_id = uuid.uuid4().hex
        self.settings = {**self.settings, "id": probe_id}
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors.items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "id": probe_id})
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dino3_version": __version__,
            "method": self.method,
            "classes": self.classes,
            **{k: v for k, v in self.settings.items() if k not in ("method", "classes")},
        }
        text = json.dumps(document, indent=1, default=_json_default, allow_nan=False)  # no NaN: valid JSON
        atomic_write_text(folder / SETTINGS_FILE, text + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> Probe:
        """A probe folder, checked whole: an incomplete or damaged one is refused with the reason."""
        from safetensors import SafetensorError, safe_open

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such probe folder")
        settings_file, weights_file = folder / SETTINGS_FILE, folder / WEIGHTS_FILE
        if not settings_file.is_file():
            if weights_file.exists() or any(folder.glob("embeddings*")):
                raise UsageError(
                    f"{folder} is an incomplete probe: it has no {SETTINGS_FILE} (a training that did not finish?); "
                    "run `dino3 probe train` again"
                )
            raise UsageError(f"{folder} is not a probe folder (no {SETTINGS_FILE}); make one with `dino3 probe train`")
        try:
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"{settings_file} is damaged: not readable JSON ({e})") from None
        if not isinstance(settings, dict) or settings.get("format") != FORMAT:
            raise UsageError(f'{settings_file} is not a dino3 probe\'s settings (no "format": "{FORMAT}")')
        version = settings.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise UsageError(f"{settings_file} is damaged: 'format_version' is {version!r}, not a whole number{_AGAIN}")
        if version > FORMAT_VERSION:
            raise UsageError(f"{folder} was written by a newer dino3 ({settings.get('dino3_version')}); upgrade dino3")
        missing = [key for key in REQUIRED if key not in settings]
        if settings.get("method") == "logreg" and "C" not in settings:
            missing.append("C")
        if settings.get("method") == "knn":
            missing += [key for key in ("k", "temperature") if key not in settings]
        if missing:
            raise UsageError(f"{settings_file} is incomplete: it lacks {', '.join(missing)}")
        if not weights_file.is_file():
            raise UsageError(f"{folder} is an incomplete probe: {WEIGHTS_FILE} is missing")
        try:
            with safe_open(str(weights_file), "pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except (OSError, SafetensorError, ValueError) as e:
            raise UsageError(f"{weights_file} is damaged: not a readable safetensors file ({e})") from None
        if not isinstance(settings["id"], str) or metadata.get("id") != settings["id"]:
            raise UsageError(
                f"{folder}: {WEIGHTS_FILE} does not belong to {SETTINGS_FILE} (they come from different training "
                "runs: one was interrupted or replaced); run `dino3 probe train` again"
            )
        if device is not None:
            tensors = {name: t.to(device) for name, t in tensors.items()}
        settings = {k: v for k, v in settings.items() if k not in ("format", "format_version")}
        return cls(settings.pop("method"), settings.pop("classes"), tensors, settings, source=str(folder))


_AGAIN = "; train the probe again (dino3 probe train)"


def _check_settings(method: Any, classes: Any, settings: dict[str, Any], where: str) -> None:
    """Every field a probe reads, of the type and range it needs: a damaged or hand-edited probe.json
    is refused here, naming the field, never half-used (a zero temperature or a NaN C would give NaN
    scores; k = 0 none)."""

    def damaged(field: str, value: Any, need: str) -> UsageError:
        return UsageError(f"{where} is damaged: {field!r} is {value!r}; it must be {need}{_AGAIN}")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if method not in METHODS:
        raise damaged("method", method, f"one of {', '.join(METHODS)}")
    if (
        not isinstance(classes, (list, tuple))
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise damaged("classes", classes, "a list of two class names or more, each once")
    dim = settings.get("feature_dim")
    if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
        raise damaged("feature_dim", dim, "a whole number >= 1 (the width of the features)")
    if settings.get("features") not in FEATURES:
        raise damaged("features", settings.get("features"), f"one of {', '.join(FEATURES)} (one vector per image)")
    for key, kind in (("model", str), ("model_identity", dict), ("processor", dict)):
        if key in settings and not isinstance(settings[key], kind):
            raise damaged(key, settings[key], f"a {kind.__name__}")
    if method == "logreg" and "C" in settings and not (number(settings["C"]) and settings["C"] > 0):
        raise damaged("C", settings["C"], "a finite number > 0")
    if method == "knn":
        k = settings.get("k")
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise damaged("k", k, "a whole number >= 1")
        temperature = settings.get("temperature")
        if not (number(temperature) and temperature > 0):
            raise damaged("temperature", temperature, f"a finite number > 0 (Meta's is {knn.TEMPERATURE})")


def _is_features(inputs: Any) -> bool:
    """A floating-point (N, D) or (D,) array or tensor is features; anything else (a list, a path, an
    image, an integer array) is images. A single grayscale image as a float array goes in a list."""
    if isinstance(inputs, torch.Tensor):
        return inputs.ndim in (1, 2) and inputs.is_floating_point()
    if isinstance(inputs, np.ndarray):
        return inputs.ndim in (1, 2) and np.issubdtype(inputs.dtype, np.floating)
    return False


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)
