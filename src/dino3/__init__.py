"""dino3: DINOv3 vision backbones, exact to Hugging Face Transformers, fast and lean.

`import dino3` is cheap: torch and the models are imported on first use.

    import dino3
    model = dino3.load("vits16")            # preset, hub id or local folder
    out = model(pixel_values)
    out.pooler_output, out.patch_grid       # (B, D), (B, h, w, D)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "DINOv3ViTConfig": "dino3.config",
    "DINOv3ConvNextConfig": "dino3.config",
    "DINOv3ViTModel": "dino3.models.vit",
    "DINOv3ConvNextModel": "dino3.models.convnext",
    "DINOv3Backbone": "dino3.models.backbone",
    "DINOv3ViTImageProcessor": "dino3.processing",
    "load_image": "dino3.images",
    "load_images": "dino3.images",
    "ImageError": "dino3.images",
    "DINOv3Output": "dino3.models.outputs",
    "load": "dino3.models",
    "convert": "dino3.weights.convert",
    "export_onnx": "dino3.export",
    "quantize": "dino3.quantization",
    "list_models": "dino3.presets",
    "get_preset": "dino3.presets",
    "Preset": "dino3.presets",
    "Dino3Error": "dino3.errors",
    "ConfigError": "dino3.errors",
    "CheckpointError": "dino3.errors",
    "HubAccessError": "dino3.errors",
    "UnknownModelError": "dino3.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__", "pipeline"]


def __getattr__(name: str) -> Any:
    if name == "pipeline":  # the module, which is callable: dino3.pipeline("image-feature-extraction", ...)
        return importlib.import_module("dino3.pipeline")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dino3' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .config import DINOv3ConvNextConfig, DINOv3ViTConfig
    from .errors import CheckpointError, ConfigError, Dino3Error, HubAccessError, UnknownModelError
    from .export import export_onnx
    from .images import ImageError, load_image, load_images
    from .models import load
    from .models.backbone import DINOv3Backbone
    from .models.convnext import DINOv3ConvNextModel
    from .models.outputs import DINOv3Output
    from .models.vit import DINOv3ViTModel
    from .pipeline import pipeline
    from .presets import Preset, get_preset, list_models
    from .processing import DINOv3ViTImageProcessor
    from .quantization import quantize
    from .weights.convert import convert
