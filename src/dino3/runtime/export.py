"""ONNX export of the backbones: dynamic batch, height and width, no control flow.

The graph is traced with torch.export (PyTorch's dynamo-based ONNX exporter), with the RoPE tables
computed inside it from the input's symbolic size, SDPA decomposed into MatMul / Softmax, and q, k
and v as three projections (the ViT's attention sees the export and writes itself so), so that ONNX
Runtime, OpenVINO, TensorRT and other compilers take it as it is. Its outputs are named like the
PyTorch ones: `last_hidden_state` (B, T, D) and `pooler_output` (B, D). Beside `NAME.onnx` go
`NAME.preprocessor_config.json` (the processor) and `NAME.dino3.json` (what the tokens are: model
type, registers, patch size), named after it so that several exports can share a folder.

Needs the `onnx` extra: pip install "dino3[onnx]".
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write_text, fsync_dir
from ..errors import ExportError

OUTPUT_NAMES = ["last_hidden_state", "pooler_output"]
# Changes whenever the exported graph does, so that compiled caches made from older exports go stale.
GRAPH_VERSION = 3
MIN_OPSET = 17
DEFAULT_OPSET = 20


def info_path(onnx_path: str | os.PathLike) -> Path:
    """Where an export's description (`NAME.dino3.json`) lies."""
    path = Path(onnx_path)
    return path.with_name(path.stem + ".dino3.json")


def processor_path(onnx_path: str | os.PathLike) -> Path:
    """Where an export's processor configuration (`NAME.preprocessor_config.json`) lies."""
    path = Path(onnx_path)
    return path.with_name(path.stem + ".preprocessor_config.json")


def read_info(onnx_path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(info_path(onnx_path).read_text(encoding="utf-8"))


class _Outputs(nn.Module):
    """The model with plain tensor outputs, for tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values)
        return out.last_hidden_state, out.pooler_output


def check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset must be {MIN_OPSET} or newer (the first with LayerNormalization), got {opset!r}")


def export_model(
    model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET, processor: dict | None = None
) -> Path:
    """Export a loaded dino3 model to ONNX at `path` (a .onnx file); returns the path.

    The model is left as it was: a bfloat16 or training-mode model is exported from an fp32 eval copy.
    `processor` (a processor's to_dict()) is written beside the graph when given. See the module
    docstring; `dino3.export_onnx` also takes a model name and writes the model's own processor.
    """
    check_opset(opset)
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ExportError(f"{path}: an ONNX export is written to a .onnx file")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'dino3[onnx]'") from None
    if getattr(model, "quantization", None):
        raise ExportError("export the unquantized model; quantize in the runtime (precision='int8')")
    path.parent.mkdir(parents=True, exist_ok=True)

    config = model.config
    traced = model
    if next(model.parameters()).dtype != torch.float32 or model.training:
        traced = copy.deepcopy(model).float().eval()  # the user's model stays as it is
    stride = config.stride[0]
    example = torch.randn(2, 3, 7 * stride, 9 * stride)
    dims = {
        0: torch.export.Dim("batch", min=1, max=4096),
        2: torch.export.Dim("height", min=stride, max=16384),
        3: torch.export.Dim("width", min=stride, max=16384),
    }
    # Written in a scratch folder beside it, then moved into place (weights over 2 GB go to an
    # external data file, which the graph names): an interrupted export leaves no half-written graph.
    scratch = path.parent / f".{path.name}.{os.getpid()}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Outputs(traced),
                (example,),
                dynamo=True,
                dynamic_shapes={"pixel_values": dims},
                input_names=["pixel_values"],
                output_names=OUTPUT_NAMES,
                opset_version=opset,
                verbose=False,
            )
        program.save(str(scratch / path.name))
        check_graph(scratch / path.name)
        made = sorted(scratch.iterdir(), key=lambda f: f.name == path.name)  # the graph last
        for file in made:
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(file, path.parent / file.name)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if processor is not None:
        atomic_write_text(processor_path(path), json.dumps(processor, indent=2) + "\n")
    info = {
        "model_type": config.model_type,
        "num_register_tokens": config.num_register_tokens,
        "patch_size": stride,
        "hidden_size": config.feature_dim,
        "config": config.to_dict(),
        "source": getattr(model, "name_or_path", None),
        "opset": opset,
        "graph_version": GRAPH_VERSION,
    }
    atomic_write_text(info_path(path), json.dumps(info, indent=2) + "\n")
    return path


def check_graph(path: str | os.PathLike) -> None:
    """The exported graph must be free of control flow and have dino3's input and output names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    control = sorted({n.op_type for n in graph.node if n.op_type in ("If", "Loop", "Scan")})
    if control:
        raise ExportError(f"the exported graph has control-flow nodes {control}; please report this")
    names = [o.name for o in graph.output]
    if names != OUTPUT_NAMES or [i.name for i in graph.input] != ["pixel_values"]:
        raise ExportError(f"unexpected graph inputs/outputs: {[i.name for i in graph.input]} -> {names}")
