"""ONNX Runtime: sessions per image size, f32 or int8 (dynamic quantization, made once beside the graph)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from .._io import atomic_path
from .persize import PerSize


def compile_onnxruntime(onnx_path: Path, precision: str):
    """A function numpy (B, 3, H, W) float32 -> (last_hidden_state, pooler_output)."""
    import onnxruntime as ort

    path = onnx_path
    if precision == "int8":
        path = onnx_path.with_name("model-int8-dynamic.onnx")
        if not path.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with (
                atomic_path(path) as tmp,
                _quiet_logging(),
            ):  # it advises a pre-processing step that changes nothing here
                quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8)

    def session(height: int, width: int):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_free_dimension_override_by_name("height", height)
        options.add_free_dimension_override_by_name("width", width)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = PerSize(session)

    def run(x: np.ndarray):
        return sessions.use(*x.shape[-2:], lambda s: s.run(["last_hidden_state", "pooler_output"], {"pixel_values": x}))

    return run


@contextlib.contextmanager
def _quiet_logging():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
