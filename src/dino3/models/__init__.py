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

    Keyword arguments: dtype, device, device_map, quantize, config (for a bare weights file),
    check_hash, rope_periods, attn_implementation (ViT), and the hub's token, revision, cache_dir,
    local_files_only. backend="onnxruntime" or "openvino" (with precision="f32" / "bf16" / "int8"
    and, for OpenVINO's int8, calibration=[images]) returns a compiled RuntimeModel instead.
    """
    backend = kwargs.pop("backend", None) or "torch"
    if backend != "torch":
        from ..backends import load_runtime

        runtime = {k: kwargs.pop(k) for k in ("precision", "calibration") if k in kwargs}
        return load_runtime(name_or_path, backend, **runtime, **kwargs)
    if "precision" in kwargs:
        raise ValueError(
            "precision= chooses a runtime's precision (backend='onnxruntime' or 'openvino'); "
            "with the torch backend use dtype= and quantize="
        )
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
