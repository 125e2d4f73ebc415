"""Small building blocks shared by the backbones: activations, layer scale, stochastic depth."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Sequence

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


# -- linear layers through oneDNN on the CPU ---------------------------------------------------------
# PyTorch sends fp32 F.linear on the CPU to MKL's GEMM plus a separate bias copy and activation pass.
# oneDNN's matmul with the bias and activation fused as post-ops computes the same thing (the same
# products and sums, in another accumulation order: float rounding apart, the numbers are equal) and
# measures about 2x faster in fp32 on this project's AMD EPYC CPUs (benchmarks/RESULTS.md). It has no
# autograd formula, so it is only used when no gradient is needed; set DINO3_ONEDNN=0 to turn it off.
ONEDNN_LINEAR = os.environ.get("DINO3_ONEDNN", "1") != "0"
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
        ONEDNN_LINEAR
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()  # export and torch.compile see plain F.linear
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.layout == torch.strided
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _HAS_ONEDNN
    )


_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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


# -- attention in bfloat16 on the CPU ----------------------------------------------------------------
# PyTorch's CPU SDPA kernel reaches about 130 GFLOP/s in bf16 on this project's CPUs, a seventh of the
# bf16 matmul rate. The same computation as batched matmuls over cache-sized groups of heads, with the
# RoPE applied per group, runs 1.35-1.8x faster than RoPE + SDPA (201 to 2309 tokens, batch 1 to 16):
# scores and softmax in fp32 (as the SDPA kernel keeps them), probabilities rounded to bf16 for the
# product with v (as it does too); errors against float64 within 4% of SDPA's.
ATTENTION_CHUNK_BYTES = 4 * 2**20  # fp32 scores per group of heads (2 MB: 2% slower on ViT-S/16)
# Beyond this many bytes of one head's fp32 scores (about 2900 tokens, 860 px with patch 16), SDPA's
# memory-efficient kernel is kept: ours still runs 1.3x faster at 4100 tokens, but its scores would
# take 100 MB there.
ATTENTION_MAX_HEAD_BYTES = 32 * 2**20
SCRATCH_KEEP_BYTES = 8 * 2**20  # scratch buffers up to this size are kept between calls
# The fp32 scores q k^T are products of bf16 values: each product is exact in fp32, only the fp32
# sums round. PyTorch sends fp32 batched matmuls to MKL, except with oneDNN's fp32 matmul precision
# set to bf16: then to oneDNN, which measures 2.1x faster here, and may read the inputs as bf16 --
# for these inputs a no-op (tested bitwise). That setting (torch.backends.mkldnn.matmul.fp32_precision)
# is process-wide, and dino3 sets it only during the attention. Where oneDNN really rounds fp32
# inputs to bf16 under it (CPUs with AMX; a one-off probe tells), an fp32 matmul of another thread at
# that moment would be rounded too, so there it is set only while no Python thread other than the
# caller and known harmless ones is alive. Elsewhere (this project's AMD CPUs) the setting only picks
# oneDNN's fp32 kernel. DINO3_BF16_PRODUCTS=0 turns it off.
BF16_PRODUCTS = os.environ.get("DINO3_BF16_PRODUCTS", "1") != "0"
# Threads known to run no matmul: dino3's decoders (see dino3.pipeline) and tqdm's monitor.
HARMLESS_THREADS = ("dino3-", "tqdm_monitor")


def bf16_cpu_attention_ok(q: torch.Tensor, dropout: float) -> bool:
    """Whether `bf16_cpu_attention` applies: bf16 on the CPU, inference, no tracing or compiling."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.shape[-2] ** 2 * 4 <= ATTENTION_MAX_HEAD_BYTES
        and dropout == 0.0
        and not (torch.is_grad_enabled() and q.requires_grad)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


_scratch_space = threading.local()


def _scratch(dtype: torch.dtype, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Views of one reusable buffer per thread and dtype, one per shape (kept up to
    SCRATCH_KEEP_BYTES). Fresh multi-megabyte tensors on every call cost page faults: ViT-S/16's
    attention over 4 images at 224 px took 2.3 ms instead of 1.3."""
    numel = sum(math.prod(shape) for shape in shapes)
    buffer = getattr(_scratch_space, str(dtype), None)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # usable in and out of inference mode
            buffer = torch.empty(numel, dtype=dtype)
        if numel * buffer.element_size() <= SCRATCH_KEEP_BYTES:
            setattr(_scratch_space, str(dtype), buffer)
    views, start = [], 0
    for shape in shapes:
        views.append(buffer[start : start + math.prod(shape)].view(shape))
        start += math.prod(shape)
    return views


def _bf16_products_safe() -> bool:
    """Whether the process-wide bf16-products setting may be changed now (see BF16_PRODUCTS)."""
    if not BF16_PRODUCTS or not hasattr(torch.backends.mkldnn, "matmul"):
        return False
    if not _bf16_products_round():
        return True
    current = threading.current_thread()
    return all(t is current or t.name.startswith(HARMLESS_THREADS) for t in threading.enumerate())


@functools.cache
def _bf16_products_round() -> bool:
    """Whether oneDNN, allowed to, rounds fp32 matmul inputs to bf16 on this CPU (probed once, at
    the shapes of the attention at 224 and 512 px: bf16 rounding moves these sums by ~1e-2)."""
    g = torch.Generator().manual_seed(0)
    for n, tokens in ((4, 201), (1, 1029)):
        a, b = torch.randn(n, tokens, 64, generator=g), torch.randn(n, 64, tokens, generator=g)
        with torch.inference_mode(False), torch.no_grad():
            strict = torch.bmm(a, b)
            with _bf16_products(True):
                relaxed = torch.bmm(a, b)
        if (strict - relaxed).abs().max().item() > 1e-3:
            return True
    return False


@contextlib.contextmanager
def _bf16_products(enabled: bool):
    """Let oneDNN read fp32 matmul inputs as bf16 inside the block (inputs that are bf16 values)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _copy_into(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x)


def bf16_cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rotate: Callable[[torch.Tensor, torch.Tensor], None] = _copy_into,
) -> torch.Tensor:
    """softmax(rotate(q) rotate(k)^T * scale) v for (B, nh, T, Dh) bf16 inputs, returned as (B, T, nh * Dh).

    rotate(x, out) writes x, rotated by the RoPE, into the fp32 tensor out (the default copies):
    applied per group of heads, the rotated q and k are written once, in the precision the scores need.
    """
    B, nh, T, Dh = q.shape
    out = torch.empty(B, T, nh, Dh, dtype=q.dtype)
    fit = max(1, ATTENTION_CHUNK_BYTES // (T * T * 4))  # heads whose fp32 scores fit the budget
    if fit >= nh:  # whole images at a time
        step = fit // nh
        groups = [(slice(i, i + step), slice(None)) for i in range(0, B, step)]
    else:  # some of one image's heads at a time
        step = max(d for d in range(1, fit + 1) if nh % d == 0)
        groups = [(slice(i, i + 1), slice(h, h + step)) for i in range(B) for h in range(0, nh, step)]
    size = min(fit - fit % nh, B * nh) if fit >= nh else step  # heads per group, at most
    q32, k32, scores = _scratch(torch.float32, (size, T, Dh), (size, T, Dh), (size, T, T))
    (probs,) = _scratch(q.dtype, (size, T, T))
    # A power-of-two scale is applied to q: exact, q stays bf16 values, and the scores come out the
    # same (every partial sum scaled exactly). Any other scale is applied to the scores.
    scale_q = math.frexp(scale)[0] == 0.5
    with _bf16_products(_bf16_products_safe()):
        for images, heads in groups:
            qg, kg, vg = (t[images, heads] for t in (q, k, v))  # (b, h, T, Dh)
            b, h = qg.shape[:2]
            n = b * h
            rotate(qg, q32[:n].view(b, h, T, Dh))
            rotate(kg, k32[:n].view(b, h, T, Dh))
            if scale_q:
                q32[:n].mul_(scale)
            torch.bmm(q32[:n], k32[:n].transpose(1, 2), out=scores[:n])  # (n, T, T), fp32
            if not scale_q:
                scores[:n].mul_(scale)
            torch.ops.aten._softmax.out(scores[:n], -1, False, out=scores[:n])  # in place
            probs[:n].copy_(scores[:n])
            result = torch.bmm(probs[:n], vg.flatten(0, 1))  # (n, T, Dh)
            out[images, :, heads] = result.view(b, h, T, Dh).transpose(1, 2)
    return out.view(B, T, nh * Dh)


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
    """Meta's `n` of get_intermediate_layers: the last n of `count` items, or the 0-based indices n lists."""
    chosen = list(range(count - n, count)) if isinstance(n, int) else [i % count for i in n]
    if not chosen or any(not 0 <= i < count for i in chosen):
        raise ValueError(f"n must be 1..{count} or {what} indices in [0, {count}), got {n!r}")
    return chosen


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
