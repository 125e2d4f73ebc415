"""Inference through ONNX Runtime or OpenVINO, behind the same call as the PyTorch models.

    model = dino3.load("vits16", backend="openvino", precision="bf16")
    out = model(pixel_values)            # a DINOv3Output: last_hidden_state, pooler_output, accessors

The model is exported to ONNX once (`export.py`) and compiled by the runtime; both are cached on disk
(`cache.py`; `DINO3_CACHE`, default ~/.cache/dino3) under a key made of the weights' identity, the
backend, the precision and the exported graph's version, so a second run starts fast. The precision
is always explicit:

- "f32": float32 everywhere (OpenVINO is told so: by default it would run bf16 on CPUs that have it).
- "bf16": OpenVINO's bfloat16 inference precision (CPUs with AVX512-BF16 or AMX).
- "int8": ONNX Runtime's dynamic quantization (int8 weights and activations), or OpenVINO with NNCF
  post-training quantization calibrated on your images (`calibration=[...]`) or, without them, on the
  sample photos shipped with dino3; the layers NNCF leaves in float run in f32.

Extras: pip install "dino3[onnxruntime]" or "dino3[openvino]".
"""

from __future__ import annotations

from .model import BACKENDS, PRECISIONS, RuntimeModel, check_backend, load_runtime

__all__ = ["BACKENDS", "PRECISIONS", "RuntimeModel", "check_backend", "load_runtime"]
