"""How features are made: one recipe for every room.

A `Recipe` says everything that decides a feature's numbers: the model, the pooling and layers, the
preprocessing, and how the model runs (dtype, quantization, runtime backend and its precision and
calibration). Every room that makes or takes features (the embed job on either engine, the index,
probes, the foreground classifier, anomaly detectors, the server, Ray) builds its model and
processor from one, writes `recipe.describe(...)` into its output's metadata, and checks a model
against recorded metadata with `check_model`, so that:

- a bad combination gets the same refusal everywhere (checked when the recipe is made, before any
  model is loaded);
- an output says how it was made, in the same keys everywhere: `model`, `model_identity`,
  `model_fingerprint`, `pool`, `layers`, `dtype`, `quantize`, `backend`, `precision`,
  `calibration` (a digest), `processor` (the processor's settings) and `recipe` (the options, to
  make the same features again: `Recipe.from_meta`);
- a model is refused, with what differs, wherever it is not the one that made the features.

A model's identity is its config and weight files; its fingerprint is what it computes for a fixed
input (`fingerprint`), compared at cosine 0.99, which the same weights pass in bf16, int8 and the
compiled runtimes and other weights do not: the weights count by their numbers, wherever their files
lie now.

    recipe = Recipe("vits16", pool="cls+mean", dtype="bfloat16")
    made = recipe.load()                       # the model and its processor, checked
    meta = made.describe()                     # what an output records
    Recipe.from_meta(meta).load()              # the same features again, elsewhere
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendError, QuantizationError, UsageError
from .features import POOLS, Layers, check_layers, check_pool, extract, parse_layers

# The metadata keys whose values decide the numbers: two outputs agree on all of them or do not mix.
DECIDING = ("model_identity", "pool", "layers", "processor", "dtype", "quantize", "backend", "precision", "calibration")
FINGERPRINT_SIZE = 32  # values kept of each patch's features
FINGERPRINT_COSINE = 0.99  # the least cosine of the same weights' fingerprints (bf16, int8, runtimes pass)


@dataclass(frozen=True)
class Recipe:
    """How features are made; see the module docstring. Checked when made (UsageError)."""

    model: str  # a preset name, hub id, or a local folder or file (recorded as its absolute path)
    pool: str = "cls"  # features.POOLS
    layers: Layers = None  # None: the model's output; a count of last blocks, or their indices
    # preprocessing: a square resize to `size`, or the aspect kept (`keep_aspect` side to `target`)
    size: int = 224
    keep_aspect: str | None = None
    target: int | None = None
    fit: str | None = None
    max_side: int | None = None
    jpeg_draft: bool = False
    resample: int | None = None  # PIL's filter code (3: bicubic); None: the model's processor's (bilinear)
    # how the model runs
    dtype: str = "float32"
    quantize: str | None = None
    backend: str = "torch"
    precision: str | None = None  # a runtime backend's: f32, bf16, int8
    calibration: tuple[str, ...] | None = field(default=None)  # OpenVINO int8's calibration images

    def __post_init__(self) -> None:
        from .models.pretrained import resolve_dtype
        from .processing import DINOv3ViTImageProcessor
        from .quantization import check_mode
        from .runtime import check_backend

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (a frozen dataclass)
        set_("model", model_name(self.model))
        try:
            check_pool(self.pool)
            layers = parse_layers(self.layers) if isinstance(self.layers, str) else self.layers
            set_("layers", list(layers) if isinstance(layers, (list, tuple)) else layers)
            precision = check_backend(self.backend, self.precision, self.calibration)
            if self.backend != "torch":
                if self.dtype not in (None, "float32") or self.quantize is not None:
                    raise UsageError(
                        "with a runtime backend, choose the precision with precision= (--precision f32, bf16, int8)"
                    )
                if self.layers is not None:
                    raise UsageError("layers need the torch backend (the exported graph returns the final tokens)")
            set_("precision", precision if self.backend != "torch" else None)
            dtype = resolve_dtype(self.dtype, allow_auto=False)
            set_("dtype", str(dtype).removeprefix("torch."))
            if self.quantize is not None:
                check_mode(self.quantize)
            if self.keep_aspect is None and (self.target is not None or self.fit is not None):
                raise UsageError("target and fit apply with keep_aspect ('shorter' or 'longer'); give keep_aspect too")
            if self.calibration is not None:
                set_("calibration", tuple(_absolute(c) for c in self.calibration))
            DINOv3ViTImageProcessor(**self.processing)  # sizes checked (ConfigError) before any work
        except (ValueError, BackendError, QuantizationError) as e:  # an option that cannot work
            raise UsageError(str(e)) from None

    # -- what it makes ------------------------------------------------------------------------------------
    @property
    def processing(self) -> dict[str, Any]:
        """The image processor's settings this recipe asks for (on top of the model's mean and std)."""
        from .processing import MAX_SIDE

        options: dict[str, Any] = {"jpeg_draft": self.jpeg_draft, "max_side": self.max_side or MAX_SIDE}
        if self.resample is not None:
            options["resample"] = self.resample
        if self.keep_aspect is not None:
            options.update(keep_aspect=self.keep_aspect, target_size=self.target, fit=self.fit or "crop")
        else:
            options["size"] = {"height": self.size, "width": self.size}
        return options

    @property
    def ragged(self) -> bool:
        """Whether images may get features of different shapes (patch grids of kept aspect ratios)."""
        return self.pool == "patches" and self.keep_aspect is not None

    def load_options(self, device: str | None = None, check_hash: bool = True) -> dict[str, Any]:
        """The keyword arguments of dino3.load that run the model as this recipe says."""
        options: dict[str, Any] = {"check_hash": check_hash}
        if self.backend == "torch":
            options.update(dtype=self.dtype, device=device, quantize=self.quantize)
        else:
            options.update(backend=self.backend, precision=self.precision)
            if self.calibration:
                options["calibration"] = list(self.calibration)
        return options

    def processor_for(self, model: Any):
        """The processor of a loaded model with this recipe's preprocessing (a dino.txt model's: Meta's
        transform, which its text space was trained with)."""
        from .processing import DINOv3ViTImageProcessor

        if hasattr(model, "encode_text"):
            if self.keep_aspect is not None or self.size != 224 or self.resample is not None:
                raise UsageError(
                    "a dino.txt model embeds images with Meta's transform (shorter side 256, centre crop 224): "
                    "leave out size, keep_aspect and resample"
                )
            return DINOv3ViTImageProcessor.for_dinotxt(jpeg_draft=self.jpeg_draft, max_side=self.processing["max_side"])
        return DINOv3ViTImageProcessor.for_model(model, **self.processing)

    def load(self, device: str | None = None, check_hash: bool = True, load: Callable[..., Any] | None = None) -> Made:
        """The model and its processor, as this recipe says (`load`: dino3.load or a stand-in)."""
        if load is None:
            from .api import load
        model = load(self.model, **self.load_options(device, check_hash))
        layers = check_layers(self.layers, model)
        return Made(replace(self, layers=layers) if layers != self.layers else self, model, self.processor_for(model))

    def options(self) -> dict[str, Any]:
        """The recipe as plain JSON-able values (what `from_meta` reads back; the model is the
        metadata's `model`, so that there is one place to say where it lies now)."""
        values = asdict(self)
        del values["model"]
        values["calibration"] = list(self.calibration) if self.calibration else None
        return values

    @classmethod
    def from_meta(cls, meta: dict[str, Any], model: str | None = None) -> Recipe:
        """The recipe that made an output, from its metadata (`model` where the model lies now). Outputs
        of dino3 0.2 and earlier record no `recipe`: it is read back from their processor settings."""
        named = (meta.get("recipe") or {}).get("calibration") or meta.get("calibration_paths")
        if meta.get("calibration") and not named:
            raise UsageError(
                "these features were made by an OpenVINO int8 model calibrated on images they do not name; "
                "make them again"
            )
        recorded = meta.get("recipe")
        if recorded is not None:  # the model: as the metadata names it (an index that moved renames it there)
            known = {k: v for k, v in recorded.items() if k in cls.__dataclass_fields__}
            return cls(**{**known, "model": model or meta["model"]})
        options: dict[str, Any] = {
            "model": model or meta["model"],
            "pool": meta["pool"],
            "layers": meta.get("layers"),
            "dtype": meta.get("dtype") if (meta.get("backend") or "torch") == "torch" else None,
            "quantize": meta.get("quantize"),
            "backend": meta.get("backend") or "torch",
            "precision": meta.get("precision"),
            "calibration": meta.get("calibration_paths"),
        }
        processor = meta["processor"]
        options["jpeg_draft"] = bool(processor.get("jpeg_draft", False))
        options["max_side"] = processor.get("max_side")
        from .processing import DINOv3ViTImageProcessor

        if processor.get("resample") not in (None, DINOv3ViTImageProcessor().resample):  # not the default's
            options["resample"] = processor["resample"]
        if processor.get("keep_aspect"):
            options.update(
                keep_aspect=processor["keep_aspect"], target=processor.get("target_size"), fit=processor.get("fit")
            )
        else:
            size = processor.get("size") or {}
            if size.get("height") is None or size.get("height") != size.get("width"):
                raise UsageError(
                    f"the recorded preprocessing (size {size}) cannot be made again; make the features again"
                )
            options["size"] = size["height"]
        return cls(**{k: v for k, v in options.items() if v is not None or k == "layers"})


@dataclass(frozen=True)
class Made:
    """A recipe with its loaded model and processor."""

    recipe: Recipe
    model: Any
    processor: Any

    def features(self, pixel_values: Any):
        """A batch of pixels -> (features, grid), pooled as the recipe says."""
        return extract(self.model, pixel_values, self.recipe.pool, self.recipe.layers)

    def describe(self) -> dict[str, Any]:
        """What an output records of how its features were made (the module docstring's keys)."""
        recipe = self.recipe
        return {
            "model": recipe.model,
            "model_identity": identity(self.model),
            "model_fingerprint": fingerprint(self.model),
            "pool": recipe.pool,
            "layers": recipe.layers,
            "dtype": recipe.dtype if recipe.backend == "torch" else "float32",
            "quantize": recipe.quantize,
            "backend": recipe.backend,
            "precision": recipe.precision,
            "calibration": digest(list(recipe.calibration)) if recipe.calibration else None,
            "processor": json.loads(json.dumps(self.processor.to_dict())),
            "recipe": recipe.options(),
        }


def check_options(**options: Any) -> None:
    """Refuse (UsageError) recipe options that cannot work together, before the model is known (a
    probe's runtime options, say, checked before the probe is read)."""
    Recipe("(the model)", **options)


# -- a model's identity and fingerprint ------------------------------------------------------------------------
def model_name(model: Any) -> str:
    """How a model is recorded: a local folder or file by its absolute path (so that the record still
    names it from another working folder), a preset or hub id as given."""
    text = os.fspath(model) if isinstance(model, (str, os.PathLike)) else str(model)
    local = Path(text).expanduser()
    return str(local.resolve()) if local.exists() else text


def identity(model: Any) -> dict[str, Any]:
    """What says which weights and architecture a loaded model has: its config and the size and
    modification time of each weight file (new weights in the same folder count as another model)."""
    files = []
    for file in getattr(model, "weight_files", None) or []:
        stat = os.stat(file)
        files.append([os.path.realpath(file), stat.st_size, stat.st_mtime_ns])
    found = {
        "config": model.config.to_dict(),
        "weight_files": files,
        "quantization": getattr(model, "quantization", None),
    }
    return json.loads(json.dumps(found, default=str))


def fingerprint(model: Any) -> list[float]:
    """What the model computes, in a few numbers: the first values of each patch's last-layer
    features for a fixed 64 x 64 input (the patches, not the CLS token: models that differ little in
    their pooled output still differ there). The same weights give the same numbers wherever the
    files lie; other weights give others. Compare with same_fingerprint."""
    import torch

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64, generator=generator)  # 64: a multiple of 16 (ViT) and 32 (ConvNeXt)
    grid, _ = extract(model, pixels, "patches")  # (1, h, w, D)
    values = grid.reshape(-1, grid.shape[-1])[:, :FINGERPRINT_SIZE].float().cpu().reshape(-1)
    if hasattr(model, "encode_text"):  # dino.txt: its head and text tower too, not only its backbone
        import torch

        with torch.inference_mode():
            image = extract(model, pixels, "text")[0][0, :FINGERPRINT_SIZE].float().cpu()
            text = model.encode_text(["a photo of a cat"])[0, :FINGERPRINT_SIZE].float().cpu()
        values = torch.cat([values, image, text])
    return [round(float(v), 5) for v in values]


def same_fingerprint(recorded: Sequence[float] | None, found: Sequence[float] | None) -> bool:
    """Whether two fingerprints come from the same weights: cosine >= FINGERPRINT_COSINE."""
    if recorded is None or found is None:
        return False
    a, b = np.asarray(recorded, dtype=np.float64), np.asarray(found, dtype=np.float64)
    if a.shape != b.shape or not np.isfinite(a).all() or not np.isfinite(b).all():
        return False
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return norms > 0 and float(a @ b) / norms >= FINGERPRINT_COSINE


# -- comparing -----------------------------------------------------------------------------------------------
def differences(recorded: dict[str, Any], found: dict[str, Any], keys: Sequence[str] = DECIDING) -> list[str]:
    """What differs, in the keys that decide the numbers, between two outputs' metadata ("key: old ->
    new" lines). Where both record a fingerprint, the weights count by it, not by their files (a
    copied or moved model is the same model)."""
    old = {k: recorded.get(k) for k in keys}
    new = {k: found.get(k) for k in keys}
    by_numbers = recorded.get("model_fingerprint") is not None and found.get("model_fingerprint") is not None
    if by_numbers and "model_identity" in keys:
        for side in (old, new):
            side["model_identity"] = {k: v for k, v in (side["model_identity"] or {}).items() if k != "weight_files"}
    out = _differences(old, new)
    architecture = any(line.startswith("model_identity") for line in out)  # says it already
    if (
        by_numbers
        and not architecture
        and not same_fingerprint(recorded["model_fingerprint"], found["model_fingerprint"])
    ):
        out.insert(0, "weights: they compute other numbers (other weights)")
    return out


def check_model(recorded: dict[str, Any], made: Made, what: str) -> None:
    """Refuse a model (with its processor) that would not make the features `recorded` describes,
    saying what differs. `what` names the recorded thing ("the index photos.index")."""
    changed = differences(recorded, made.describe())
    if changed:
        shown = "\n  ".join(changed[:12]) + (f"\n  ... and {len(changed) - 12} more" if len(changed) > 12 else "")
        raise UsageError(
            f"{what} was made with another model or settings than these ({recorded.get('model')} then); what "
            f"differs (then -> now):\n  {shown}\nuse the model and settings it was made with, or make it again"
        )


def replay(
    recorded: dict[str, Any],
    what: str,
    *,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    check_hash: bool = True,
    load: Callable[..., Any] | None = None,
) -> Made:
    """The model and processor that make again the features `recorded` describes (from `model` where
    the model lies now, if it moved), checked: refused with what differs. `what` names the recorded
    thing in the messages ("the index photos.index")."""
    name = recorded.get("model")
    if model is None and name and os.path.isabs(name) and not os.path.exists(name):
        raise UsageError(f"{what}'s model {name} is not there any more; give where it lies now (-m DIR, or model=...)")
    recipe = Recipe.from_meta(recorded, model=os.fspath(model) if model is not None else None)
    made = recipe.load(device=device, check_hash=check_hash, load=load)
    check_model(recorded, made, what)
    return made


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 100 else text[:97] + "..."


def digest(items: list[str]) -> str:
    """A SHA-256 of a list of strings (names that are not UTF-8 included)."""
    return hashlib.sha256(json.dumps(items).encode("utf-8", "surrogateescape")).hexdigest()


def _absolute(path: Any) -> str:
    text = os.fspath(path)
    from .fetch import is_url

    return text if is_url(text) else os.path.abspath(text)


__all__ = [
    "DECIDING",
    "POOLS",
    "Made",
    "Recipe",
    "check_model",
    "check_options",
    "differences",
    "fingerprint",
    "identity",
    "model_name",
    "replay",
    "same_fingerprint",
]
