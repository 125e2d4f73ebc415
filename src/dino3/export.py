"""ONNX export of the backbones: dynamic batch, height and width, no control flow.

The graph is traced with torch.export (PyTorch's dynamo-based ONNX exporter), with the RoPE tables
computed inside it from the input's symbolic size, SDPA decomposed into MatMul / Softmax and plain
linear layers, so that ONNX Runtime, OpenVINO, TensorRT and other compilers take it as it is. Its
outputs are named like the PyTorch ones: `last_hidden_state` (B, T, D) and `pooler_output` (B, D).
Beside the .onnx file go the processor's `preprocessor_config.json` and `dino3.json` (what the
tokens are: model type, registers, patch size).

Needs the `onnx` extra: pip install "dino3[onnx]".
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import Dino3Error

OUTPUT_NAMES = ["last_hidden_state", "pooler_output"]
EXPORT_INFO_NAME = "dino3.json"
# Changes whenever the exported graph does, so that compiled caches made from older exports go stale.
GRAPH_VERSION = 2
MIN_OPSET = 17


class ExportError(Dino3Error, RuntimeError):
    """An export that cannot be made here, or a graph that is not what dino3 promises."""


class _Outputs(nn.Module):
    """The model with plain tensor outputs, for tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values)
        return out.last_hidden_state, out.pooler_output


def export_onnx(
    model: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    opset: int = 20,
    processor=None,
) -> Path:
    """Export a dino3 model (or anything `dino3.load` takes) to ONNX at `path`; returns the path."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset must be {MIN_OPSET} or newer (the first with LayerNormalization), got {opset}")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'dino3[onnx]'") from None
    from .models import load
    from .processing import DINOv3ViTImageProcessor

    name = None
    if not isinstance(model, nn.Module):
        name = str(model)
        model = load(model)
    if getattr(model, "quantization", None):
        raise ExportError("export the unquantized model; quantize in the runtime (precision='int8')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    config = model.config
    is_vit = config.model_type == "dinov3_vit"
    stride = config.patch_hw[0] if is_vit else 32
    example = torch.randn(2, 3, 7 * stride, 9 * stride)
    dims = {
        0: torch.export.Dim("batch", min=1, max=4096),
        2: torch.export.Dim("height", min=stride, max=16384),
        3: torch.export.Dim("width", min=stride, max=16384),
    }
    with torch.no_grad(), warnings.catch_warnings(), _prepared(model):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Outputs(model),
            (example,),
            dynamo=True,
            dynamic_shapes={"pixel_values": dims},
            input_names=["pixel_values"],
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            verbose=False,
        )
    program.save(str(path))  # weights over 2 GB go to an external data file beside it
    try:
        check_graph(path)
    except ExportError:
        path.unlink()
        raise

    if processor is None:
        preset = getattr(model, "preset", None)
        source = preset.name if preset is not None else (name or getattr(model, "name_or_path", None))
        processor = DINOv3ViTImageProcessor.from_pretrained(source) if source else DINOv3ViTImageProcessor()
    processor.save_pretrained(path.parent)
    info = {
        "model_type": config.model_type,
        "num_register_tokens": getattr(config, "num_register_tokens", 0),
        "patch_size": stride,
        "hidden_size": config.hidden_size if is_vit else config.hidden_sizes[-1],
        "source": name or getattr(model, "name_or_path", None),
        "opset": opset,
    }
    (path.parent / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return path


@contextlib.contextmanager
def _prepared(model: nn.Module):
    """The model as it is traced: float32, eval mode, each attention's q, k and v as three
    projections (ONNX Runtime and OpenVINO's int8 ran them 3-5% faster than one and a split, as in
    an export of Transformers' model). Put back as it was afterwards."""
    from .models.vit import Attention

    dtype, training = next(model.parameters()).dtype, model.training
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    model.float().eval()
    for attention in attentions:
        attention.split_qkv(True)
    try:
        yield
    finally:
        for attention in attentions:
            attention.split_qkv(False)
        model.to(dtype).train(training)


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
