"""`load_runtime`: a checkpoint exported (once), compiled by a runtime, and called like a dino3 model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import _Config
from ..errors import BackendError
from ..models.outputs import DINOv3Output
from ..models.pretrained import inspect_checkpoint, load_pretrained
from ..weights.hub import HubOptions
from . import cache
from .export import export_model

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = {"onnxruntime": ("f32", "int8"), "openvino": ("f32", "bf16", "int8")}
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def check_backend(backend: str, precision: str | None, calibration: Sequence[Any] | None = None) -> str:
    """Validate a backend and its precision (before anything is loaded); returns the precision."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        if precision is not None:
            raise BackendError(
                "precision chooses a runtime's precision (backend 'onnxruntime' or 'openvino'); "
                "with the torch backend use dtype= and quantize="
            )
        if calibration is not None:
            raise BackendError("calibration images are for backend='openvino' with precision='int8'")
        return "f32"
    precision = precision or "f32"
    if precision not in PRECISIONS[backend]:
        raise BackendError(
            f"{backend} runs precision {PRECISIONS[backend]}, not {precision!r}"
            + ("; for bf16 use backend='openvino' or the torch backend" if precision == "bf16" else "")
        )
    if calibration is not None and (backend, precision) != ("openvino", "int8"):
        raise BackendError(f"calibration images are for OpenVINO's int8, not {backend} {precision}")
    return precision


def _require(backend: str) -> None:
    module = _MODULES[backend]
    try:
        __import__(module)
        __import__("onnx")
    except ImportError:
        raise BackendError(
            f"backend={backend!r} needs {module}, which is not installed: pip install 'dino3[{backend}]'"
        ) from None


class RuntimeModel:
    """A backbone compiled by ONNX Runtime or OpenVINO; called like a dino3 model (eval only). Safe to
    call from several threads (calls for one image size run one at a time)."""

    dtype = torch.float32
    device = torch.device("cpu")
    training = False
    quantization = None
    source_layout = None

    def __init__(
        self, run, config: _Config, backend: str, precision: str, preset, name_or_path: str, weight_files=None
    ) -> None:
        self._run = run  # numpy (B, 3, H, W) float32 -> (last_hidden_state, pooler_output)
        self.config = config
        self.weight_files = list(weight_files or [])
        self.backend = backend
        self.precision = precision
        self.preset = preset
        self.name_or_path = name_or_path

    def __repr__(self) -> str:
        return f"RuntimeModel(backend={self.backend!r}, precision={self.precision!r}, model={self.name_or_path!r})"

    def eval(self) -> RuntimeModel:
        return self

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return self.config.grid_size(height, width)

    def __call__(self, pixel_values: torch.Tensor) -> DINOv3Output:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a tensor of shape (B, 3, H, W), got {shape}")
        stride = self.config.stride[0]
        if min(pixel_values.shape[-2:]) < stride:
            raise ValueError(f"the image ({tuple(pixel_values.shape[-2:])}) is smaller than one {stride}px patch")
        x = np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())
        hidden, pooled = self._run(x)
        return DINOv3Output(
            last_hidden_state=torch.from_numpy(np.asarray(hidden)),
            pooler_output=torch.from_numpy(np.asarray(pooled)),
            num_register_tokens=self.config.num_register_tokens,
            grid_size=self.grid_size(*pixel_values.shape[-2:]),
        )

    forward = __call__


def load_runtime(
    name_or_path: str | os.PathLike,
    backend: str,
    precision: str | None = "f32",
    calibration: Sequence[np.ndarray] | None = None,
    runtime_cache: str | os.PathLike | None = None,
    config: _Config | str | None = None,
    check_hash: bool = True,
    rope_periods: str = "exact",
    hub: HubOptions | None = None,
    **hub_kwargs: Any,
) -> RuntimeModel:
    """Export (once) and compile a checkpoint for `backend` at `precision`; see the package docstring.

    calibration: for OpenVINO's int8, pixel arrays (1, 3, H, W) to calibrate on (`dino3.load` makes
        them from images with the model's processor).
    runtime_cache: the root of the compiled-model cache (default $DINO3_CACHE/compiled); each
        checkpoint and set of options gets its own entry under it.
    """
    precision = check_backend(backend, precision, calibration)
    if backend == "torch":
        raise BackendError("load_runtime is for the onnxruntime and openvino backends; use dino3.load for torch")
    _require(backend)
    hub = hub or HubOptions(**hub_kwargs)
    found = inspect_checkpoint(name_or_path, config=config, check_hash=check_hash, hub=hub)
    options = {"rope_periods": rope_periods}
    key = cache.entry_key(found.source, found.config.to_dict(), found.checkpoint.weight_files, options)
    root = Path(runtime_cache).expanduser() if runtime_cache is not None else cache.cache_root()
    folder = root / key

    def build(scratch: Path) -> None:
        model = load_pretrained(name_or_path, config=config, check_hash=check_hash, rope_periods=rope_periods, hub=hub)
        export_model(model, scratch / cache.MODEL_FILE)

    onnx_path = cache.ensure_entry(folder, build)
    if backend == "onnxruntime":
        from .onnxruntime import compile_onnxruntime

        run = compile_onnxruntime(onnx_path, precision)
    else:
        from .openvino import compile_openvino

        run = compile_openvino(onnx_path, precision, found.config, calibration)
    return RuntimeModel(
        run, found.config, backend, precision, found.preset, str(name_or_path), found.checkpoint.weight_files
    )
