"""Small building blocks shared by the backbones: activations, layer scale, stochastic depth."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import system


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # Transformers' "gelu_new": the tanh approximation written out (as in GPT-2).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "relu": F.relu,
    "selu": F.selu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


# -- linear layers through oneDNN on the CPU ---------------------------------------------------------
# PyTorch sends fp32 F.linear on the CPU to MKL's GEMM plus a separate bias copy and activation pass.
# oneDNN's matmul with the bias and activation fused as post-ops computes the same thing (the same
# products and sums, in another accumulation order: float rounding apart, the numbers are equal). Which
# of the two is faster depends on the CPU (oneDNN on AVX-512, MKL on AVX2) and whether it runs at all
# on the dtype (oneDNN refuses bfloat16 without AVX-512): dino3.system.linear_kernel decides, per dtype,
# for every call (DINO3_LINEAR overrides it). oneDNN's op has no autograd formula, so it is only used
# when no gradient is needed. No process-wide setting is read or changed.
_ONEDNN_POST_OPS = {
    None: ("none", ""),
    "gelu": ("gelu", "none"),  # exact (erf) GELU
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "swish": ("swish", ""),
}


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.layout == torch.strided
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()  # export and torch.compile see plain F.linear
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and system.linear_kernel(x.dtype) == "onednn"
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None
) -> torch.Tensor:
    """activation(x @ weight.T + bias), with the bias and activation fused into the matmul where possible."""
    if _onednn_ok(x, weight):
        post_op = _ONEDNN_POST_OPS.get(activation)
        attr, algorithm = post_op if post_op is not None else _ONEDNN_POST_OPS[None]
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, attr, [], algorithm)
        return y if post_op is not None else ACTIVATION_FUNCTIONS[activation](y)
    y = F.linear(x, weight, bias)
    return ACTIVATION_FUNCTIONS[activation](y) if activation is not None else y


def linear_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """(x @ weight.T + bias) * other, the multiplication fused into the matmul where possible."""
    if _onednn_ok(x, weight) and other.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other.contiguous(), weight, bias, "mul")
    return F.linear(x, weight, bias) * other


def is_plain_linear(module: nn.Module) -> bool:
    """An ordinary nn.Linear with plain tensors, as opposed to one that quantization replaced."""
    return type(module) is nn.Linear and type(module.weight.data) is torch.Tensor


def apply_linear(
    module: nn.Module, x: torch.Tensor, activation: str | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """activation(module(x) + bias): through the fused `linear` for an ordinary nn.Linear, through
    the module itself for a quantized one. `bias` is for a Linear created without one (fused qkv)."""
    if is_plain_linear(module):
        return linear(x, module.weight, bias if bias is not None else module.bias, activation)
    y = module(x)
    if bias is not None:
        y = y + bias
    return ACTIVATION_FUNCTIONS[activation](y) if activation is not None else y


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability `rate`, scale the rest by 1/(1-rate)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    mask = torch.floor(mask + keep)
    return x.div(keep) * mask


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def resolve_indices(indices: int | Sequence[int], count: int) -> list[int]:
    """Indices into `count` items, negative ones counted from the end; an error if out of range."""
    indices = [indices] if isinstance(indices, int) else list(indices)
    resolved = [i + count if i < 0 else i for i in indices]
    if not resolved or any(not 0 <= i < count for i in resolved):
        raise ValueError(f"indices must lie in [-{count}, {count}), got {indices}")
    return resolved


def last_or_chosen(n: int | Sequence[int], count: int, what: str) -> list[int]:
    """Meta's `n` of get_intermediate_layers: the last n of `count` items, or the 0-based indices n
    lists (negative ones count from the end, as in Python). Anything out of range is an error."""
    if (
        isinstance(n, bool)
        or not isinstance(n, int)
        and not all(isinstance(i, int) and not isinstance(i, bool) for i in n)
    ):
        raise ValueError(f"n must be a count or a list of {what} indices, got {n!r}")
    if isinstance(n, int):
        if not 1 <= n <= count:
            raise ValueError(f"n must be 1..{count} (the last n {what}s), got {n}")
        return list(range(count - n, count))
    chosen = list(n)
    if not chosen or any(not -count <= i < count for i in chosen):
        raise ValueError(f"{what} indices must lie in [-{count}, {count}) (there are {count} {what}s), got {chosen}")
    return [i % count for i in chosen]


def cpu_chunk_size(x: torch.Tensor, budget: int | None, bytes_per_image: int) -> int:
    """How many images of the batch x to run at a time so that the widest activation stays under
    `budget` bytes: on the CPU, in inference, when not tracing; otherwise the whole batch."""
    if x.device.type != "cpu" or budget is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return x.shape[0]
    return max(1, budget // bytes_per_image)


def trunc_normal_(tensor: torch.Tensor, std: float) -> None:
    """Truncated normal init at +-2 (absolute, as Transformers), computed in fp32 then cast."""
    with torch.no_grad():
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor.copy_(nn.init.trunc_normal_(torch.empty_like(tensor, dtype=torch.float32), std=std))
        else:
            nn.init.trunc_normal_(tensor, std=std)
