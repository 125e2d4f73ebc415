"""OpenVINO: models compiled per image size at f32, bf16 or int8 (NNCF, calibrated), with a bounded cache.

Compiled models are cached in the entry's `openvino-<precision>` folder: one folder per precision,
because OpenVINO 2026.4 reuses a blob compiled for f32 when bf16 is asked for and then returns NaN
(seen on an Intel Xeon with AMX). Blobs are kept without their weights (CACHE_MODE OPTIMIZE_SIZE),
and only the most recent MAX_BLOBS image sizes are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import system
from ..config import _Config
from ..errors import BackendError
from .persize import PerSize

MAX_BLOBS = 16  # compiled image sizes kept per precision


def compile_openvino(onnx_path: Path, precision: str, config: _Config, calibration: Sequence[np.ndarray] | None):
    """A function numpy (B, 3, H, W) float32 -> (last_hidden_state, pooler_output)."""
    import openvino as ov

    core = ov.Core()
    blobs = onnx_path.parent / f"openvino-{precision}"
    blobs.mkdir(exist_ok=True)
    core.set_property({"CACHE_DIR": str(blobs), "CACHE_MODE": "OPTIMIZE_SIZE"})
    if precision == "bf16" and "bf16" not in system.openvino_precisions():
        raise BackendError("this CPU has no bfloat16 support in OpenVINO (needs AVX512-BF16 or AMX); use f32 or int8")
    source = str(onnx_path)
    if precision == "int8":
        source = _nncf_int8(core, onnx_path, config, calibration)
    hint = "bf16" if precision == "bf16" else "f32"

    def compile_for(height: int, width: int):
        model = core.read_model(source)
        model.reshape({"pixel_values": ov.PartialShape([-1, 3, height, width])})
        # Threads not pinned to cores: in the embed job the decoding threads share the cores, and a
        # pinned inference thread waits for its own core (measured: RESULTS, "Embedding at scale").
        options = {"INFERENCE_PRECISION_HINT": hint, "ENABLE_CPU_PINNING": False}
        compiled = core.compile_model(model, "CPU", options)
        _prune(blobs)
        outputs = [compiled.output("last_hidden_state"), compiled.output("pooler_output")]
        return compiled.create_infer_request(), outputs

    compiled = PerSize(compile_for)

    def infer(entry, x: np.ndarray):
        request, outputs = entry
        result = request.infer({"pixel_values": x})
        return result[outputs[0]].copy(), result[outputs[1]].copy()

    def run(x: np.ndarray):
        return compiled.use(*x.shape[-2:], lambda entry: infer(entry, x))

    return run


def _prune(blobs: Path) -> None:
    """Keep the MAX_BLOBS most recently written compiled blobs."""
    files = sorted(blobs.glob("*.blob"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
    for old in files[MAX_BLOBS:]:
        old.unlink(missing_ok=True)


def default_calibration_tag(pixels: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in pixels:
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()[:12]


def _nncf_int8(core, onnx_path: Path, config: _Config, calibration: Sequence[np.ndarray] | None) -> str:
    """NNCF post-training quantization, calibrated on `calibration` pixel arrays; the quantized model
    is kept beside the graph, one per calibration set."""
    if not calibration:
        raise BackendError("OpenVINO int8 needs calibration images (dino3.load gives its sample photos by default)")
    pixels = [np.asarray(p, dtype=np.float32) for p in calibration]
    path = onnx_path.with_name(f"openvino-int8-{default_calibration_tag(pixels)}.xml")
    if not path.exists():
        import nncf
        import openvino as ov

        model_type = nncf.ModelType.TRANSFORMER if config.model_type == "dinov3_vit" else None
        nncf.set_log_level(logging.ERROR)
        quantized = nncf.quantize(
            core.read_model(str(onnx_path)), nncf.Dataset(pixels), model_type=model_type, subset_size=len(pixels)
        )
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.xml")
        ov.save_model(quantized, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))  # the weights first, the graph last
        os.replace(tmp, path)
    return str(path)
