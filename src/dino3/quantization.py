"""Quantized linear layers: smaller models, and on this kind of CPU, faster ones.

Only the transformer's (or ConvNeXt's) Linear layers are quantized; the patch embedding, the norms,
the layer scales and RoPE stay exact. Modes:

- "int8-dynamic": int8 weights (per output channel) and int8 activations quantized on the fly,
  through PyTorch's dynamic quantization on oneDNN (CPUs with VNNI). CPU and float32 models only.
- "int8-weight": int8 weights, computed in the model's dtype, through torchao (optional extra:
  `pip install "dino3[torchao]"`). CPU or GPU; it saves memory more than time.
- "int4-weight": int4 weights in groups of 128 (torchao's Int4WeightOnlyConfig, as the Transformers
  documentation's example for the 7B model), bfloat16 model, CUDA only: torchao has no int4 kernel
  for the CPU.

What each costs in accuracy and buys in speed is measured by benchmarks/quantization.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import QuantizationError

MODES = ("int8-dynamic", "int8-weight", "int4-weight")


def check_mode(mode: str) -> str:
    """The mode, if dino3 knows it; else a QuantizationError that lists the modes."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; choose one of {MODES}")
    return mode


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Quantize the model's Linear layers in place (see the module docstring); returns the model."""
    check_mode(mode)
    if getattr(model, "quantization", None):
        raise QuantizationError(f"the model is already quantized ({model.quantization})")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if mode == "int8-dynamic":
        _int8_dynamic(model, device, dtype)
    else:
        _torchao(model, mode, device, dtype)
    model.quantization = mode
    return model.eval()


def _int8_dynamic(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu":
        raise QuantizationError("int8-dynamic runs on the CPU; on a GPU use int8-weight or int4-weight")
    if dtype != torch.float32:
        raise QuantizationError("int8-dynamic quantizes float32 activations: load the model in float32")
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:  # pragma: no cover (PyTorch has deprecated torch.ao.quantization)
        raise QuantizationError(
            "this PyTorch has no torch.ao.quantization; use int8-weight (torchao) instead"
        ) from None
    engines = torch.backends.quantized.supported_engines
    engine = "onednn" if "onednn" in engines else torch.backends.quantized.engine
    with _quantized_engine(engine), _quiet_deprecation():
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _torchao(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise QuantizationError(
            f"{mode} needs torchao, which is not installed: pip install 'dino3[torchao]' (or torchao)"
        ) from None
    if mode == "int4-weight":
        if device.type != "cuda":
            raise QuantizationError(
                "int4-weight runs on CUDA (torchao's int4 kernels); torchao has none for the CPU: there, "
                "use int8-dynamic (fastest) or int8-weight (smallest)"
            )
        if dtype != torch.bfloat16:
            raise QuantizationError("int4-weight computes in bfloat16: load the model with dtype=torch.bfloat16")
        config = Int4WeightOnlyConfig(group_size=128)
    else:
        config = Int8WeightOnlyConfig()
    quantize_(model, config, filter_fn=lambda module, name: isinstance(module, nn.Linear))


@contextlib.contextmanager
def _quantized_engine(engine: str):
    """The quantized engine packs the weights; its kernels then run whatever the global setting."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def _quiet_deprecation():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield
