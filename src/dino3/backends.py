"""Inference through ONNX Runtime or OpenVINO, behind the same call as the PyTorch models.

    model = dino3.load("vits16", backend="openvino", precision="bf16")
    out = model(pixel_values)            # a DINOv3Output: last_hidden_state, pooler_output, accessors

The model is exported to ONNX once (dino3.export) and compiled by the runtime; both are cached on
disk (`DINO3_CACHE`, default ~/.cache/dino3) under a key made of the weights' identity, the backend,
the precision and dino3's version, so a second run starts fast (OpenVINO also keeps the model
reshaped to each image size it has run, for models up to 1 GB). The precision is always explicit:

- "f32": float32 everywhere (OpenVINO is told so: by default it would run bf16 on CPUs that have it).
- "bf16": OpenVINO's bfloat16 inference precision (CPUs with AVX512-BF16 or AMX).
- "int8": ONNX Runtime's dynamic quantization (int8 weights and activations), or OpenVINO with NNCF
  post-training quantization calibrated on your images (`calibration=[...]`) or, without them, on the
  sample photos shipped with dino3; the layers NNCF leaves in float run in f32.

Extras: pip install "dino3[onnxruntime]" or "dino3[openvino]".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import Dino3Error
from .models.outputs import DINOv3Output

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = {"onnxruntime": ("f32", "int8"), "openvino": ("f32", "bf16", "int8")}
EXTRAS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


class BackendError(Dino3Error, RuntimeError):
    """A backend that is missing or cannot run the requested precision here."""


def cache_root() -> Path:
    return Path(os.environ.get("DINO3_CACHE", Path.home() / ".cache" / "dino3")).expanduser()


class RuntimeModel:
    """A backbone compiled by ONNX Runtime or OpenVINO; called like a dino3 model (eval only)."""

    dtype = torch.float32
    device = torch.device("cpu")
    training = False
    quantization = None

    def __init__(self, run, config, info: dict[str, Any], backend: str, precision: str, preset, name_or_path: str):
        self._run = run  # numpy (B, 3, H, W) float32 -> (last_hidden_state, pooler_output)
        self.config = config
        self.info = info
        self.backend = backend
        self.precision = precision
        self.preset = preset
        self.name_or_path = name_or_path

    def __repr__(self) -> str:
        return f"RuntimeModel(backend={self.backend!r}, precision={self.precision!r}, model={self.name_or_path!r})"

    def eval(self) -> RuntimeModel:
        return self

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        if self.info["model_type"] == "dinov3_vit":
            p = self.info["patch_size"]
            return height // p, width // p
        h, w = height // 4, width // 4
        for _ in range(3):
            h, w = h // 2, w // 2
        return h, w

    def __call__(self, pixel_values: torch.Tensor) -> DINOv3Output:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        x = np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())
        hidden, pooled = self._run(x)
        return DINOv3Output(
            last_hidden_state=torch.from_numpy(np.asarray(hidden)),
            pooler_output=torch.from_numpy(np.asarray(pooled)),
            num_register_tokens=self.info["num_register_tokens"],
            grid_size=self.grid_size(*pixel_values.shape[-2:]),
        )

    forward = __call__


def load_runtime(
    name_or_path: str | os.PathLike,
    backend: str,
    precision: str = "f32",
    calibration: Sequence[Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> RuntimeModel:
    """Export (once) and compile a checkpoint for `backend` at `precision`; see the module docstring."""
    if backend not in PRECISIONS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS[backend]:
        raise BackendError(
            f"{backend} runs precision {PRECISIONS[backend]}, not {precision!r}"
            + ("; for bf16 use backend='openvino' or the torch backend" if precision == "bf16" else "")
        )
    _require(backend)
    from .models import load
    from .weights.hub import resolve

    hub = {k: load_kwargs[k] for k in ("token", "revision", "cache_dir", "local_files_only") if k in load_kwargs}
    checkpoint = resolve(name_or_path, **hub)
    folder = Path(cache_dir) if cache_dir else cache_root() / "compiled" / _cache_key(checkpoint, load_kwargs)
    onnx_path = folder / "model.onnx"
    model = None
    if not onnx_path.exists() or checkpoint.config is None:  # a bare weights file: its config is in it
        model = load(name_or_path, **{k: v for k, v in load_kwargs.items() if k != "dtype"})
    if not onnx_path.exists():
        from .export import export_onnx

        export_onnx(model, onnx_path)
    config = model.config if model is not None else checkpoint.config
    preset = model.preset if model is not None else checkpoint.preset
    del model  # the runtime holds its own copy of the weights
    info = json.loads((folder / "dino3.json").read_text())
    if backend == "onnxruntime":
        run = _onnxruntime(onnx_path, precision)
    else:
        run = _openvino(onnx_path, precision, info, calibration, folder)
    return RuntimeModel(run, config, info, backend, precision, preset, str(name_or_path))


def _require(backend: str) -> None:
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}[backend]
    try:
        __import__(module)
        __import__("onnx")
    except ImportError:
        raise BackendError(
            f"backend={backend!r} needs {module}, which is not installed: pip install 'dino3[{EXTRAS[backend]}]'"
        ) from None


def _cache_key(checkpoint, load_kwargs: dict[str, Any]) -> str:
    """The weights' identity (files, sizes, modification times), what changes the numbers among the
    load options, and the versions of dino3 and of its exported graph."""
    from . import __version__
    from .export import GRAPH_VERSION

    parts = [
        __version__,
        f"graph {GRAPH_VERSION}",
        str(checkpoint.config.to_dict()) if checkpoint.config is not None else "",
    ]
    for file in checkpoint.weight_files:
        stat = os.stat(file)
        parts.append(f"{os.path.realpath(file)}:{stat.st_size}:{stat.st_mtime_ns}")
    parts += [f"{k}={load_kwargs[k]!r}" for k in ("config", "rope_periods") if k in load_kwargs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _onnxruntime(onnx_path: Path, precision: str):
    import onnxruntime as ort

    path = onnx_path
    if precision == "int8":
        path = onnx_path.with_name("model-int8-dynamic.onnx")
        if not path.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = path.with_name("partial-" + path.name)
            with _quiet_logging():  # it advises a pre-processing step that changes nothing here
                quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8)
            os.replace(tmp, path)

    def session(height: int, width: int):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_free_dimension_override_by_name("height", height)
        options.add_free_dimension_override_by_name("width", width)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = _PerSize(session)

    def run(x: np.ndarray):
        return sessions.get(*x.shape[-2:]).run(["last_hidden_state", "pooler_output"], {"pixel_values": x})

    return run


class _PerSize:
    """Runtimes compiled for one image size each (the batch stays dynamic): with the height and width
    fixed, the RoPE tables and shapes fold into constants, about 10% faster than a fully dynamic graph.
    The most recent few are kept."""

    KEEP = 8

    def __init__(self, make) -> None:
        self.make = make
        self.compiled: dict[tuple[int, int], Any] = {}

    def get(self, height: int, width: int):
        key = (int(height), int(width))
        runtime = self.compiled.pop(key, None) or self.make(*key)
        self.compiled[key] = runtime
        if len(self.compiled) > self.KEEP:
            self.compiled.pop(next(iter(self.compiled)))
        return runtime


def _openvino(onnx_path: Path, precision: str, info: dict, calibration, folder: Path):
    import openvino as ov

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(folder / "openvino-cache")})
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise BackendError("this CPU has no bfloat16 support in OpenVINO (needs AVX512-BF16 or AMX); use f32 or int8")
    source: Any = str(onnx_path)
    if precision == "int8":
        source = _nncf_int8(core, onnx_path, info, calibration, folder)
    hint = "bf16" if precision == "bf16" else "f32"

    def compile_for(height: int, width: int):
        model = _sized_model_file(core, source, height, width)
        if model is None:  # a large model: no second copy of its weights on disk
            model = core.read_model(source)
            model.reshape({"pixel_values": ov.PartialShape([-1, 3, height, width])})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        outputs = [compiled.output("last_hidden_state"), compiled.output("pooler_output")]
        return compiled.create_infer_request(), outputs

    compiled = _PerSize(compile_for)

    def run(x: np.ndarray):
        request, outputs = compiled.get(*x.shape[-2:])
        result = request.infer({"pixel_values": x})
        return result[outputs[0]].copy(), result[outputs[1]].copy()

    return run


SIZED_FILES_UP_TO = 2**30  # bytes of weights


def _sized_model_file(core, source: str, height: int, width: int) -> str | None:
    """The model reshaped to one image size, saved once beside its source, for models up to
    SIZED_FILES_UP_TO: OpenVINO then finds the compiled model in its cache by the file's path,
    without reading and reshaping the model first (0.1 s instead of 0.2 s for ViT-S/16 per run)."""
    import openvino as ov

    source = Path(source)
    files = source.parent.glob(source.stem + ".*")  # model.onnx (+ .data), or an IR's .xml and .bin
    if sum(f.stat().st_size for f in files) > SIZED_FILES_UP_TO:
        return None
    path = source.with_name(f"{source.stem}-{height}x{width}.xml")
    if not path.exists():
        model = core.read_model(str(source))
        model.reshape({"pixel_values": ov.PartialShape([-1, 3, height, width])})
        partial = path.with_name("partial-" + path.name)
        ov.save_model(model, str(partial), compress_to_fp16=False)
        os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(partial, path)
    return str(path)


@contextlib.contextmanager
def _quiet_logging():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _nncf_int8(core, onnx_path: Path, info: dict, calibration, folder: Path) -> str:
    """NNCF post-training quantization, calibrated on `calibration` images (or dino3's samples)."""
    from .processing import DINOv3ViTImageProcessor

    if calibration is None:
        calibration = sorted((Path(__file__).parent / "assets").glob("*.jpg"))
    names = "\n".join(str(c) for c in calibration if isinstance(c, (str, os.PathLike)))
    tag = hashlib.sha256(f"{len(calibration)}\n{names}".encode()).hexdigest()[:12]
    path = folder / f"openvino-int8-{tag}.xml"
    if not path.exists():
        import nncf
        import openvino as ov

        processor = DINOv3ViTImageProcessor.from_pretrained(folder)
        pixels = [processor(image).pixel_values.numpy() for image in calibration]
        model_type = nncf.ModelType.TRANSFORMER if info["model_type"] == "dinov3_vit" else None
        nncf.set_log_level(logging.ERROR)
        quantized = nncf.quantize(
            core.read_model(str(onnx_path)),
            nncf.Dataset(pixels),
            model_type=model_type,
            subset_size=len(pixels),
        )
        tmp = path.with_name("partial-" + path.name)
        ov.save_model(quantized, str(tmp))
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    return str(path)
