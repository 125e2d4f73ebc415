"""Images -> pixel tensors: the Transformers-exact DINOv3 image processor, and an aspect-preserving mode.

The reference order (Transformers' DINOv3ViTImageProcessor) is kept exactly: rescale the uint8 image
to float (x * 1/255), resize the float image (bilinear, antialiased; 224x224 by default, ignoring
the aspect ratio), optionally centre-crop, then normalise ((x - mean) / std). All of it runs in
torch, one image at a time (faster on the CPU than stacking images first); torchvision is not needed.

Beyond the reference, `keep_aspect="shorter"` or `"longer"` scales the image so that that side
becomes `target_size`, keeping the aspect ratio, and brings both sides to a multiple of
`patch_size` by a centre `fit="crop"` (drop < patch_size pixels), `fit="pad"` (zeros after
normalisation, i.e. the mean colour, at the bottom and right) or `fit="resize"` (round each side to
the nearest multiple: a tiny stretch, as Meta's notebooks do). The result carries each image's patch
grid size.

`reference="torchvision"` computes as torchvision's transforms do instead (Meta's eval transforms,
which dino.txt uses: `for_dinotxt`): the 8-bit image is resized by torch's uint8 kernel and rounded
to 8 bits, the crop's corner is rounded (not floored), and only then is it rescaled and normalised.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._io import atomic_write_text
from .config import read_json_object
from .errors import ConfigError, ImageError, ImageTooLargeError
from .images import MemoryBudget, decode, open_image
from .presets import IMAGENET_MEAN, IMAGENET_STD, Preset, find_preset
from .weights.hub import HubOptions, download

PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
# PIL's resampling constants, as preprocessor_config.json stores them, and what they run here.
RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
KEEP_ASPECT = ("shorter", "longer")
FITS = ("crop", "pad", "resize")
# The longest side an image may be resized to (16384 px, as the ONNX export's largest size). A guard
# against inputs such as a 1x50000 strip, which keep_aspect="shorter" would blow up; raise it at will.
MAX_SIDE = 16384
# Whose arithmetic the processor reproduces: Transformers' (rescale, then resize the float image) or
# torchvision's on uint8 images (resize the 8-bit image, round, then rescale), which Meta's eval transforms use.
REFERENCES = ("transformers", "torchvision")
# Meta's dino.txt transform (`make_classification_eval_transform`): shorter side to 256 (bicubic), centre 224.
DINOTXT_PROCESSING = {
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "reference": "torchvision",
}


class BatchFeature(dict):
    """The processor's output: a dict holding `pixel_values`, so that `model(**inputs)` works, with
    attribute access (`inputs.pixel_values`) and each image's patch grid in `inputs.grid_sizes`."""

    def __init__(self, data: dict[str, Any], grid_sizes: list[tuple[int, int]] | None = None) -> None:
        super().__init__(data)
        self.grid_sizes = grid_sizes

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> BatchFeature:
        """Move / cast the floating-point tensors (pixel_values), as Transformers' BatchFeature does."""
        moved = {}
        for key, value in self.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.to(*args, **kwargs)
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                value = [v.to(*args, **kwargs) for v in value]
            moved[key] = value
        return BatchFeature(moved, self.grid_sizes)


class DINOv3ViTImageProcessor:
    """The DINOv3 image processor (used by the ViT and ConvNeXt checkpoints alike).

    Fields and defaults are those of Transformers' processor and of the hub's preprocessor_config.json;
    `keep_aspect`, `target_size`, `patch_size` and `fit` are dino3's aspect-preserving mode.
    """

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = 2,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_center_crop: bool | None = None,
        crop_size: dict[str, int] | None = None,
        do_convert_rgb: bool | None = None,
        keep_aspect: str | None = None,
        target_size: int | None = None,
        patch_size: int = 16,
        fit: str = "crop",
        jpeg_draft: bool = False,
        alpha: str = "white",
        max_side: int = MAX_SIDE,
        reference: str = "transformers",
        **extra: Any,
    ) -> None:
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.do_center_crop = do_center_crop
        self.crop_size = dict(crop_size) if crop_size is not None else None
        self.do_convert_rgb = do_convert_rgb
        self.keep_aspect = keep_aspect
        self.target_size = target_size
        self.patch_size = patch_size
        self.fit = fit
        self.jpeg_draft = jpeg_draft
        self.alpha = alpha
        self.max_side = max_side
        self.reference = reference
        self.extra = extra  # other preprocessor_config.json keys, written back unchanged
        self.validate()

    # -- configuration ----------------------------------------------------------------------------
    _FIELDS = (
        "do_resize",
        "size",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_center_crop",
        "crop_size",
        "do_convert_rgb",
    )
    _DINO3_DEFAULTS = {
        "keep_aspect": None,
        "target_size": None,
        "patch_size": 16,
        "fit": "crop",
        "jpeg_draft": False,
        "alpha": "white",
        "max_side": MAX_SIDE,
        "reference": "transformers",
    }

    def validate(self) -> None:
        if self.resample not in RESAMPLE_MODES:
            raise ConfigError(
                f"resample={self.resample} is not supported; use 2 (bilinear, the default), 3 (bicubic) or 0 (nearest)"
            )
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) not in (1, 3) or not all(_is_number(v) for v in values):
                raise ConfigError(f"{name} needs 1 or 3 numbers, got {values}")
        if any(s == 0 for s in self.image_std):
            raise ConfigError("image_std must not contain 0")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.alpha not in ("white", "drop"):
            raise ConfigError(f"alpha must be 'white' or 'drop', got {self.alpha!r}")
        for name in ("patch_size", "max_side"):
            if not _is_positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.keep_aspect is not None:
            if self.keep_aspect not in KEEP_ASPECT:
                raise ConfigError(f"keep_aspect must be None, 'shorter' or 'longer', got {self.keep_aspect!r}")
            if not _is_positive_int(self.target_size) or not self.patch_size <= self.target_size <= self.max_side:
                raise ConfigError(
                    f"keep_aspect={self.keep_aspect!r} needs target_size, an integer from patch_size "
                    f"({self.patch_size}) to max_side ({self.max_side}); got {self.target_size!r}"
                )
            if self.fit not in FITS:
                raise ConfigError(f"fit must be one of {FITS}, got {self.fit!r}")
        elif self.target_size is not None:
            raise ConfigError("target_size sets the kept side's length: it needs keep_aspect='shorter' or 'longer'")
        elif self.do_resize:
            sizes = [v for v in self.size.values() if v is not None] if isinstance(self.size, dict) else [self.size]
            if not sizes or not all(_is_positive_int(v) and v <= self.max_side for v in sizes):
                raise ConfigError(f"size must hold positive integers up to max_side ({self.max_side}), got {self.size}")
            _output_size((100, 100), self.size)  # raises on an unusable size dict
            fixed = [self.size.get(k) for k in ("height", "width") if self.size.get(k)]
            if any(v < self.patch_size for v in fixed):
                raise ConfigError(
                    f"size {self.size} is smaller than one {self.patch_size}px patch: the model would see no patch"
                )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_processor_type": "DINOv3ViTImageProcessorFast"}
        out.update(self.extra)
        out.update({name: getattr(self, name) for name in self._FIELDS})
        # dino3's own fields only when they differ from the defaults, so the file stays Transformers'
        out.update({k: getattr(self, k) for k, v in self._DINO3_DEFAULTS.items() if getattr(self, k) != v})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> DINOv3ViTImageProcessor:
        data = {**data, **overrides}
        data.pop("image_processor_type", None)
        try:
            return cls(**data)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"not a usable image processor configuration ({e})") from None

    def save_pretrained(self, folder: str | os.PathLike) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, PROCESSOR_CONFIG_NAME)
        self.save_file(path)
        return path

    def save_file(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> DINOv3ViTImageProcessor:
        """The processor of a preset name, hub id, local folder or weights file; keyword arguments
        override fields (token=, revision=, cache_dir=, local_files_only= reach the hub).

        A known checkpoint (preset name or its hub id) gets its own normalisation: ImageNet
        statistics for the LVD-1689M models, Meta's SAT-493M statistics for the satellite ones. A
        folder (or the folder of a weights file) is read from its preprocessor_config.json, and one
        without it gets the defaults; another hub repo is read from its preprocessor_config.json.
        """
        hub = HubOptions.pop_from(overrides)
        path = Path(os.fspath(name_or_path)).expanduser()
        preset = find_preset(str(name_or_path)) if not path.exists() else None
        if preset is not None:
            return cls.for_preset(preset, **overrides)
        if path.exists():
            folder = path if path.is_dir() else path.parent
            config_file = folder / PROCESSOR_CONFIG_NAME
            if not config_file.is_file():
                return cls(**overrides)  # a checkpoint saved without a processor: the defaults
        else:
            config_file = Path(download(str(name_or_path), PROCESSOR_CONFIG_NAME, hub))
        return cls.from_dict(read_json_object(config_file), **overrides)

    @classmethod
    def for_preset(cls, preset: Preset, **overrides: Any) -> DINOv3ViTImageProcessor:
        size = {"height": preset.image_size, "width": preset.image_size}
        return cls(**{"image_mean": preset.image_mean, "image_std": preset.image_std, "size": size, **overrides})

    @classmethod
    def for_dinotxt(cls, **overrides: Any) -> DINOv3ViTImageProcessor:
        """Meta's dino.txt transform: shorter side to 256 (bicubic), centre crop 224, ImageNet statistics,
        in torchvision's arithmetic (equal to Meta's `make_classification_eval_transform` on uint8 images)."""
        return cls(**{**DINOTXT_PROCESSING, **overrides})

    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> DINOv3ViTImageProcessor:
        """The processor that goes with a loaded model (a dino3 model or runtime); see for_checkpoint."""
        preset, source = getattr(model, "preset", None), getattr(model, "name_or_path", None)
        return cls.for_checkpoint(model.config, preset, source, **overrides)

    @classmethod
    def for_checkpoint(cls, config: Any, preset: Preset | None = None, source: str | None = None, **overrides: Any):
        """The processor of a checkpoint: its preset's, else its folder's preprocessor_config.json,
        else the defaults; in the aspect-preserving mode, sides become multiples of the model's
        stride (the ViT's patch, the ConvNeXt's 32)."""
        overrides.setdefault("patch_size", config.stride[0])
        if preset is not None:
            return cls.for_preset(preset, **overrides)
        if source is not None and Path(source).expanduser().exists():
            return cls.from_pretrained(source, **overrides)
        return cls(**overrides)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "image_processor_type")
        return f"{type(self).__name__}({fields})"

    # -- processing -------------------------------------------------------------------------------
    def __call__(self, images: Any, return_tensors: str | None = "pt", **overrides: Any) -> BatchFeature:
        """Process one image or a list of them (anything `dino3.images.load_image` takes).

        Returns a BatchFeature with `pixel_values`: a (B, 3, H, W) float32 tensor ("pt"), a numpy
        array ("np"), or a list of (3, H, W) tensors (None, or when the images' sizes differ, as
        they can in the aspect-preserving mode); and `grid_sizes`, each image's (rows, columns) of
        patches. Keyword arguments override the processor's fields for this call.
        """
        proc = self if not overrides else self.from_dict(self.to_dict(), **overrides)
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        # One image at a time: on the CPU each image's steps then stay in cache, which measured faster
        # than batching same-size images (Transformers found the same). The numbers are identical.
        sources = images if isinstance(images, (list, tuple)) else [images]
        outputs = [proc.pixels(source) for source in sources]
        grid = [(t.shape[-2] // proc.patch_size, t.shape[-1] // proc.patch_size) for t in outputs]
        same_size = len({tuple(t.shape) for t in outputs}) == 1
        if return_tensors is None or not same_size:
            pixel_values: Any = outputs
        else:
            pixel_values = torch.stack(outputs)
            if return_tensors == "np":
                pixel_values = pixel_values.numpy()
        return BatchFeature({"pixel_values": pixel_values}, grid_sizes=grid)

    preprocess = __call__

    def pixels(
        self,
        image: Any,
        memory: MemoryBudget | None = None,
        cancel: threading.Event | None = None,
        max_pixels: int | None = None,
        timeout: float | None = None,
    ) -> torch.Tensor:
        """One image-like input -> its (3, H, W) float32 pixel values.

        memory: a budget of pixels being decoded at once, shared with other threads (see
        dino3.images.MemoryBudget); cancel: an event that stops a download; max_pixels: refuse larger
        images (default dino3.images.MAX_PIXELS); timeout: seconds for a URL's whole download.
        Anything that goes wrong is an ImageError that names the input (ImageTooLargeError for a
        size limit).
        """
        opened = open_image(image, draft_size=self._draft_size(), cancel=cancel, max_pixels=max_pixels, timeout=timeout)
        width, height = opened.size
        if self.keep_aspect is not None:
            h, w = self.aspect_size(height, width)
            if max(h, w) > self.max_side:
                raise ImageTooLargeError(
                    f"{opened.name}: {width}x{height} px would be resized to {w}x{h} "
                    f"(keep_aspect={self.keep_aspect!r}), over max_side={self.max_side}; "
                    "use keep_aspect='longer' or raise max_side"
                )
        reserve = memory.reserve(width * height, cancel) if memory is not None else contextlib.nullcontext()
        with reserve:
            decoded = decode(opened, alpha=self.alpha)
            try:
                return self._process_batch(decoded[None])[0]
            except (RuntimeError, MemoryError) as e:  # an allocation that failed
                raise ImageError(f"{opened.name}: cannot be processed ({type(e).__name__}: {str(e)[:200]})") from None

    def _process_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or float images of one size -> (B, 3, H', W') float32 pixel values."""
        x = images
        # Transformers rescales the uint8 image first; torchvision resizes and crops it as uint8.
        if x.dtype == torch.uint8 and self.reference == "transformers":
            x = self._rescale(x)
        # float inputs are already in [0, 1] (dino3.images checks it): no second rescale
        if self.keep_aspect is not None:
            x = self._resize_keep_aspect(x)
        else:
            if self.do_resize:
                x = _resize(x, _output_size(tuple(x.shape[-2:]), self.size), RESAMPLE_MODES[self.resample])
            if self.do_center_crop and self.crop_size:
                x = _center_crop(x, self.crop_size["height"], self.crop_size["width"], self._round_corner)
        if x.dtype == torch.uint8:
            x = self._rescale(x)
        if self.do_normalize:
            x = _normalize(x, self.image_mean, self.image_std)
        if self.keep_aspect is not None and self.fit == "pad":
            x = _pad_to_multiple(x, self.patch_size)
        return x

    def _rescale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.rescale_factor if self.do_rescale else x.to(torch.float32)

    @property
    def _round_corner(self) -> bool:
        return self.reference == "torchvision"

    def _draft_size(self) -> tuple[int, int] | None:
        """The smallest size a JPEG may be decoded at in draft mode, or None (decode at full size)."""
        if not self.jpeg_draft:
            return None
        if self.keep_aspect is not None:
            return (self.target_size, self.target_size)
        if self.do_resize:
            size = _output_size((10**6, 10**6), self.size)  # a square probe gives the target's scale
            return (max(size), max(size))
        return None

    def aspect_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image is resized to in the aspect-preserving mode (before crop/pad)."""
        side = min(height, width) if self.keep_aspect == "shorter" else max(height, width)
        scale = self.target_size / side
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        if self.fit == "resize":
            p = self.patch_size
            h, w = max(p, round(h / p) * p), max(p, round(w / p) * p)
        return h, w

    def _resize_keep_aspect(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.aspect_size(*x.shape[-2:])
        x = _resize(x, (h, w), RESAMPLE_MODES[self.resample])
        if self.fit == "crop":
            p = self.patch_size
            x = _center_crop(x, max(p, h // p * p), max(p, w // p * p), self._round_corner)
        return x


# -- the operations, with the reference's arithmetic ---------------------------------------------
def _output_size(size_hw: tuple[int, int], size: dict[str, int]) -> tuple[int, int]:
    """The resize target for a Transformers `size` dict."""
    height, width = size_hw
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    if size.get("shortest_edge"):
        short = size["shortest_edge"]
        longest = size.get("longest_edge")
        low, high = min(height, width), max(height, width)
        raw = None
        if longest and high / low * short > longest:
            raw = longest * low / high
            short = int(round(raw))
        if low == short:
            return height, width
        other = int((raw if raw is not None else short) * high / low)
        return (other, short) if width < height else (short, other)
    if size.get("max_height") and size.get("max_width"):
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    raise ConfigError(
        f"size must hold 'height' and 'width', 'shortest_edge' (and 'longest_edge'), or 'max_height' and "
        f"'max_width'; got {size}"
    )


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # torchvision returns the input unchanged too
    if mode == "nearest-exact":
        return F.interpolate(x, size=size, mode=mode)
    if x.dtype == torch.uint8:  # torchvision's uint8 path: torch's own uint8 kernel, else float, clamp, round
        try:
            return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
        except (RuntimeError, NotImplementedError):  # a torch without that uint8 kernel
            y = F.interpolate(x.float(), size=size, mode=mode, align_corners=False, antialias=True)
            return y.clamp_(0, 255).round_().to(torch.uint8)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _center_crop(x: torch.Tensor, height: int, width: int, round_corner: bool = False) -> torch.Tensor:
    H, W = x.shape[-2:]
    if height > H or width > W:  # pad with zeros first, as torchvision's center_crop
        left, top = max(width - W, 0) // 2, max(height - H, 0) // 2
        right, bottom = (max(width - W, 0) + 1) // 2, (max(height - H, 0) + 1) // 2
        x = F.pad(x, (left, right, top, bottom))
        H, W = x.shape[-2:]
    # The corner: floored as Transformers does, or rounded (half to even) as torchvision does.
    place = round if round_corner else int
    top, left = int(place((H - height) / 2.0)), int(place((W - width) / 2.0))
    return x[..., top : top + height, left : left + width]


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    return F.pad(x, (0, math.ceil(W / multiple) * multiple - W, 0, math.ceil(H / multiple) * multiple - H))
