"""The entry points: `load` (any checkpoint, on torch or a compiled runtime), `load_config`,
`export_onnx`. They validate every option before anything is read or downloaded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .errors import UsageError
from .processing import DINOv3ViTImageProcessor
from .weights.hub import HubOptions, load_config

__all__ = ["export_onnx", "load", "load_config", "sample_images"]


def load(
    name_or_path: str | os.PathLike,
    *,
    backend: str = "torch",
    precision: str | None = None,
    calibration: Sequence[Any] | None = None,
    runtime_cache: str | os.PathLike | None = None,
    **kwargs: Any,
):
    """Load any DINOv3 backbone: a preset name (see `dino3.list_models()`), a hub id, a local folder
    (config.json + model.safetensors) or a single weights file in Hugging Face, Meta (.pth) or timm
    layout. Returns a DINOv3ViTModel or DINOv3ConvNextModel, in eval mode.

    Keyword arguments: dtype, device, device_map, quantize, config (for a bare weights file),
    check_hash, rope_periods, attn_implementation (ViT), and the hub's token, revision, cache_dir,
    local_files_only, force_download; Transformers' torch_dtype (deprecated there too) means dtype.
    backend="onnxruntime" or "openvino" (with precision="f32" / "bf16" / "int8" and,
    for OpenVINO's int8, calibration=[images]) returns a compiled RuntimeModel instead, cached under
    runtime_cache (default $DINO3_CACHE/compiled).
    """
    from .models.pretrained import transformers_arguments
    from .models.text import DINOv3TextModel, is_text_checkpoint
    from .runtime import check_backend

    kwargs = transformers_arguments(kwargs)  # torch_dtype= and the like, as Transformers takes them
    precision = check_backend(backend, precision, calibration)
    if is_text_checkpoint(name_or_path):  # dino.txt: its backbone, vision head and text tower
        if backend != "torch" or kwargs.get("quantize") is not None:
            raise UsageError("a dino.txt model runs on the torch backend, in float32 or bfloat16 (no quantization)")
        allowed = {"dtype", "device", "check_hash", "attn_implementation", "quantize"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise UsageError(f"{', '.join(unknown)}: not options of a dino.txt model")
        kwargs.pop("quantize", None)
        return DINOv3TextModel.from_pretrained(name_or_path, **kwargs)
    if backend == "torch":
        if runtime_cache is not None:
            raise UsageError("runtime_cache is for backend='onnxruntime' or 'openvino'")
        from .models.pretrained import load_pretrained

        return load_pretrained(name_or_path, **kwargs)

    from .models.pretrained import ROPE_PERIODS, inspect_checkpoint
    from .runtime import load_runtime

    for option in ("dtype", "quantize", "device", "device_map", "attn_implementation"):
        if kwargs.get(option) is not None:
            raise UsageError(f"{option}= is for the torch backend; with backend={backend!r} choose precision=")
        kwargs.pop(option, None)
    hub = HubOptions.pop_from(kwargs)
    config, check_hash = kwargs.pop("config", None), kwargs.pop("check_hash", True)
    rope_periods = kwargs.pop("rope_periods", "exact")
    if rope_periods not in ROPE_PERIODS:
        raise ValueError(f"rope_periods must be one of {ROPE_PERIODS}, got {rope_periods!r}")
    if kwargs:
        raise TypeError(f"load() got unexpected keyword arguments {sorted(kwargs)}")
    pixels = None
    if (backend, precision) == ("openvino", "int8"):  # calibrated on pixels made as the model's processor makes them
        found = inspect_checkpoint(name_or_path, config=config, check_hash=check_hash, hub=hub)
        processor = DINOv3ViTImageProcessor.for_checkpoint(found.config, found.preset, str(name_or_path))
        images = list(calibration) if calibration is not None else sample_images()
        pixels = [processor([image]).pixel_values.numpy() for image in images]
    return load_runtime(
        name_or_path,
        backend,
        precision,
        calibration=pixels,
        runtime_cache=runtime_cache,
        config=config,
        check_hash=check_hash,
        rope_periods=rope_periods,
        hub=hub,
    )


def sample_images() -> list[Path]:
    """The sample photos shipped with dino3 (public domain; see assets/SOURCES.md)."""
    return sorted((Path(__file__).parent / "assets").glob("*.jpg"))


def export_onnx(
    model: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    opset: int = 20,
    processor: DINOv3ViTImageProcessor | None = None,
    **load_kwargs: Any,
) -> Path:
    """Export a dino3 model (or anything `dino3.load` takes) to ONNX at `path`, with the model's
    processor configuration beside it; see dino3.runtime.export."""
    from .runtime.export import check_opset, export_model

    check_opset(opset)
    if Path(path).suffix.lower() != ".onnx":
        raise UsageError(f"{path}: an ONNX export is written to a .onnx file")
    if not isinstance(model, nn.Module):
        model = load(model, **load_kwargs)
    processor = processor or DINOv3ViTImageProcessor.for_model(model)
    return export_model(model, path, opset=opset, processor=processor.to_dict())
