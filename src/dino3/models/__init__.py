"""The backbones, and `load`, which picks the right one from a checkpoint's config."""

from __future__ import annotations

import os
from typing import Any

from .backbone import BackboneOutput, DINOv3Backbone
from .convnext import DINOv3ConvNextModel
from .outputs import DINOv3Output
from .pretrained import load_pretrained
from .vit import DINOv3ViTModel

MODEL_CLASSES = {
    "dinov3_vit": DINOv3ViTModel,
    "dinov3_convnext": DINOv3ConvNextModel,
}


def load(name_or_path: str | os.PathLike, **kwargs: Any):
    """Load any DINOv3 backbone: a preset name (see `dino3.list_models()`), a hub id, a local folder
    (config.json + model.safetensors) or a single weights file in Hugging Face, Meta (.pth) or timm
    layout. Returns a DINOv3ViTModel or DINOv3ConvNextModel, in eval mode.

    Keyword arguments: dtype, device, config (for a bare weights file), check_hash, attn_implementation
    (ViT), and the hub's token, revision, cache_dir, local_files_only.
    """
    return load_pretrained(name_or_path, **kwargs)


__all__ = [
    "BackboneOutput",
    "DINOv3Backbone",
    "DINOv3ConvNextModel",
    "DINOv3Output",
    "DINOv3ViTModel",
    "MODEL_CLASSES",
    "load",
]
