"""Small building blocks shared by the backbones: activations, layer scale, stochastic depth."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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


def trunc_normal_(tensor: torch.Tensor, std: float) -> None:
    """Truncated normal init at +-2 (absolute, as Transformers), computed in fp32 then cast."""
    with torch.no_grad():
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor.copy_(nn.init.trunc_normal_(torch.empty_like(tensor, dtype=torch.float32), std=std))
        else:
            nn.init.trunc_normal_(tensor, std=std)
