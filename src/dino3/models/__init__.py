"""The backbones, and `load`, which picks the right one from a checkpoint's config."""

from __future__ import annotations

import os
from typing import Any

from .backbone import BackboneOutput, DINOv3Backbone
from .convnext import DINOv3ConvNextModel
from .outputs import DINOv3Output
from .vit import DINOv3ViTModel

MODEL_CLASSES = {
    "dinov3_vit": DINOv3ViTModel,
    "dinov3_convnext": DINOv3ConvNextModel,
}


def load(name_or_path: str | os.PathLike, **kwargs: Any):
    """Load any DINOv3 backbone: a preset name (see `dino3.list_models()`), a hub id or a local folder.

    Keyword arguments are those of `from_pretrained` (dtype, device, token, revision, ...).
    """
    from ..weights.hub import resolve

    hub_keys = ("token", "revision", "cache_dir", "local_files_only")
    config = resolve(name_or_path, need_weights=False, **{k: kwargs[k] for k in hub_keys if k in kwargs}).config
    return MODEL_CLASSES[config.model_type].from_pretrained(name_or_path, **kwargs)


__all__ = [
    "BackboneOutput",
    "DINOv3Backbone",
    "DINOv3ConvNextModel",
    "DINOv3Output",
    "DINOv3ViTModel",
    "MODEL_CLASSES",
    "load",
]
