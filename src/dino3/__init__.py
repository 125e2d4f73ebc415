"""dino3: DINOv3 vision backbones, exact to Hugging Face Transformers, fast and lean.

`import dino3` is cheap: torch and the models are imported on first use.

    import dino3
    model = dino3.load("vits16")            # preset, hub id, local folder or weights file
    out = model(pixel_values)
    out.pooler_output, out.patch_grid       # (B, D), (B, h, w, D)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "DINOv3ViTConfig": "dino3.config",
    "DINOv3ConvNextConfig": "dino3.config",
    "DINOv3TextConfig": "dino3.config",
    "DINOv3ViTModel": "dino3.models.vit",
    "DINOv3ConvNextModel": "dino3.models.convnext",
    "DINOv3TextModel": "dino3.models.text",
    "DINOv3Backbone": "dino3.models.backbone",
    "DINOv3Output": "dino3.models.outputs",
    "DINOv3ViTImageProcessor": "dino3.processing",
    "load_image": "dino3.images",
    "load_images": "dino3.images",
    "load": "dino3.api",
    "load_config": "dino3.api",
    "export_onnx": "dino3.api",
    "convert": "dino3.conversion",
    "quantize": "dino3.quantization",
    "extract": "dino3.features",
    "list_models": "dino3.presets",
    "get_preset": "dino3.presets",
    "register_preset": "dino3.presets",
    "Preset": "dino3.presets",
    "Dino3Error": "dino3.errors",
    "ConfigError": "dino3.errors",
    "CheckpointError": "dino3.errors",
    "HubAccessError": "dino3.errors",
    "UnknownModelError": "dino3.errors",
    "ImageError": "dino3.errors",
    "UsageError": "dino3.errors",
    "BackendError": "dino3.errors",
    "ExportError": "dino3.errors",
    "QuantizationError": "dino3.errors",
    "VideoError": "dino3.errors",
}
# dino3.pipeline(...) is callable; dino3.embed.run(...); dino3.probe.train(...); dino3.ray.embed(...) (Ray Data);
# dino3.anomaly.fit(...); dino3.text.classify(...) (dino.txt)
_SUBMODULES = {
    "pipeline": "dino3.pipeline",
    "embed": "dino3.embed",
    "probe": "dino3.probe",
    "dense": "dino3.dense",
    "index": "dino3.index",
    "anomaly": "dino3.anomaly",
    "text": "dino3.text",
    "video": "dino3.video",
    "ray": "dino3.integrations.ray",
}

__all__ = sorted(_EXPORTS) + ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dino3' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from . import anomaly, dense, embed, index, pipeline, probe, text, video
    from .api import export_onnx, load, load_config
    from .config import DINOv3ConvNextConfig, DINOv3TextConfig, DINOv3ViTConfig
    from .conversion import convert
    from .errors import (
        BackendError,
        CheckpointError,
        ConfigError,
        Dino3Error,
        ExportError,
        HubAccessError,
        ImageError,
        QuantizationError,
        UnknownModelError,
        UsageError,
        VideoError,
    )
    from .features import extract
    from .images import load_image, load_images
    from .models.backbone import DINOv3Backbone
    from .models.convnext import DINOv3ConvNextModel
    from .models.outputs import DINOv3Output
    from .models.text import DINOv3TextModel
    from .models.vit import DINOv3ViTModel
    from .presets import Preset, get_preset, list_models, register_preset
    from .processing import DINOv3ViTImageProcessor
    from .quantization import quantize
