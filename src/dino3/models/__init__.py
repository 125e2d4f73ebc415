"""The backbones (torch only): the ViT and ConvNeXt models, their outputs, the backbone view, and
`load_pretrained`, which builds the right one from a checkpoint."""

from __future__ import annotations

from .backbone import BackboneOutput, DINOv3Backbone
from .convnext import DINOv3ConvNextModel
from .outputs import DINOv3Output
from .pretrained import load_pretrained, model_class_for, parameter_shapes, resolve_dtype
from .vit import DINOv3ViTModel

__all__ = [
    "BackboneOutput",
    "DINOv3Backbone",
    "DINOv3ConvNextModel",
    "DINOv3Output",
    "DINOv3ViTModel",
    "load_pretrained",
    "model_class_for",
    "parameter_shapes",
    "resolve_dtype",
]
