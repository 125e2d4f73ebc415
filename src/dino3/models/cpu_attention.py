"""Attention on the CPU as batched matmuls over cache-sized groups of heads, RoPE included.

PyTorch's CPU SDPA kernel reaches about 130 GFLOP/s in bf16 on this project's CPUs, a seventh of the
bf16 matmul rate, and is slow in fp32 too. The same computation as batched matmuls over groups of
heads whose scores fit the cache, with the RoPE applied per group, runs faster (RoPE + attention,
201 to 2309 tokens, batch 1 to 16: bf16 1.35-1.8x, fp32 1.1-1.7x) with SDPA's numerics: scores and
softmax in fp32, probabilities rounded to bf16 for the product with v in bf16 (as the SDPA kernel
does); bf16 errors against float64 within 4% of SDPA's.

The scores' fp32 matmul is the expensive part. PyTorch sends fp32 batched matmuls to MKL, except
with oneDNN's fp32 matmul precision set to bf16 (`torch.backends.mkldnn.matmul.fp32_precision`):
then to oneDNN, 2.1x faster here, which may then read fp32 inputs as bf16. On this project's AMD
CPUs it does not (a one-off probe tells, run while no foreign thread is alive, or else in a fresh
interpreter in the background; until it answers, rounding is assumed): the setting only picks
oneDNN's fp32 kernel, and fp32 attention uses it too. On CPUs where it rounds (those with AMX), only
bf16 attention uses it, whose scores multiply bf16 values (rounding them is a no-op; tested
bitwise), and only while no Python thread but the caller and known harmless ones is alive, because
the setting is process-wide and would round another thread's fp32 matmul too. It is set only during
the attention. DINO3_ONEDNN=0 turns it off (as it does oneDNN's linear layers).
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from . import layers

ATTENTION_CHUNK_BYTES = 4 * 2**20  # fp32 scores per group of heads (2 MB: 2% slower on ViT-S/16)
# Beyond this many bytes of one head's fp32 scores (about 2900 tokens, 860 px with patch 16), SDPA's
# memory-efficient kernel is kept: ours still runs 1.3x faster at 4100 tokens in bf16, but its
# scores would take 100 MB there.
ATTENTION_MAX_HEAD_BYTES = 32 * 2**20
SCRATCH_KEEP_BYTES = 8 * 2**20  # scratch buffers up to this size are kept between calls
# Threads known to run no matmul: dino3's decoders (see dino3.pipeline) and tqdm's monitor.
HARMLESS_THREADS = ("dino3-", "tqdm_monitor")


def cpu_attention_ok(q: torch.Tensor, dropout: float) -> bool:
    """Whether `cpu_attention` applies: on the CPU, in inference, not tracing or compiling; bf16, or
    fp32 where oneDNN computes fp32 matmuls unrounded (asked last: the first ask probes oneDNN)."""
    if not (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float32)
        and q.shape[-2] ** 2 * 4 <= ATTENTION_MAX_HEAD_BYTES
        and dropout == 0.0
        and not (torch.is_grad_enabled() and q.requires_grad)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    ):
        return False
    return q.dtype == torch.bfloat16 or _onednn_bmm_allowed(bf16_inputs=False)


def _copy_into(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x)


def cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rotate: Callable[[torch.Tensor, torch.Tensor], None] = _copy_into,
) -> torch.Tensor:
    """softmax(rotate(q) rotate(k)^T * scale) v for (B, nh, T, Dh) bf16 or fp32 inputs, returned as
    (B, T, nh * Dh) in their dtype.

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
    probs = scores if q.dtype == torch.float32 else _scratch(q.dtype, (size, T, T))[0]
    # A power-of-two scale is applied to q: exact, bf16 values stay bf16 values, and the scores come
    # out the same (every partial sum scaled exactly). Any other scale is applied to the scores.
    scale_q = math.frexp(scale)[0] == 0.5
    with _onednn_bmm(_onednn_bmm_allowed(bf16_inputs=q.dtype == torch.bfloat16)):
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
            if probs is not scores:
                probs[:n].copy_(scores[:n])
            result = torch.bmm(probs[:n], vg.flatten(0, 1))  # (n, T, Dh)
            out[images, :, heads] = result.view(b, h, T, Dh).transpose(1, 2)
    return out.view(B, T, nh * Dh)


# -- scratch buffers ---------------------------------------------------------------------------------
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


# -- fp32 batched matmuls through oneDNN ---------------------------------------------------------------
def _onednn_bmm_allowed(bf16_inputs: bool) -> bool:
    """Whether fp32 batched matmuls may go to oneDNN now (see the module's docstring); bf16_inputs:
    the matmuls' inputs are all bf16 values."""
    if not layers.ONEDNN_LINEAR or not hasattr(torch.backends.mkldnn, "matmul"):
        return False
    if not _onednn_rounds():
        return True
    return bf16_inputs and _alone()


def _alone() -> bool:
    """Whether no Python thread but this one and known harmless ones is alive."""
    current = threading.current_thread()
    return all(t is current or t.name.startswith(HARMLESS_THREADS) for t in threading.enumerate())


@contextlib.contextmanager
def _onednn_bmm(enabled: bool):
    """Send fp32 (batched) matmuls to oneDNN inside the block, allowing it to read inputs as bf16."""
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


_rounds: bool | None = None  # what the probe found
_probe_thread: threading.Thread | None = None


def _onednn_rounds() -> bool:
    """Whether oneDNN, allowed to, rounds fp32 matmul inputs to bf16 on this CPU; assumed until known.

    The probe flips the process-wide setting, so it runs here only while no foreign thread is alive.
    Otherwise a fresh interpreter probes (in the background, about 2 s; a daemon thread waits for it).
    """
    global _rounds, _probe_thread
    if _rounds is None:
        if _alone():
            _rounds = _probe_rounding()
        elif _probe_thread is None:
            _probe_thread = threading.Thread(target=_probe_elsewhere, name="dino3-probe", daemon=True)
            _probe_thread.start()
    return True if _rounds is None else _rounds


def _probe_elsewhere() -> None:
    """Probe in a fresh interpreter (whose only thread is the probe's) and keep what it finds."""
    global _rounds
    if getattr(sys, "frozen", False):  # a bundled application: sys.executable is not an interpreter
        return
    package_root = str(Path(__file__).resolve().parents[2])  # where this dino3 is imported from
    code = (
        f"import sys; sys.path.insert(0, {package_root!r}); "
        "from dino3.models.cpu_attention import _probe_rounding; print(int(_probe_rounding()))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        found = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return  # no answer: rounding stays assumed
    if found in ("0", "1") and _rounds is None:
        _rounds = found == "1"


def _probe_rounding() -> bool:
    """Run fp32 matmuls at attention-like shapes (201 and 400 tokens) with and without the setting:
    bf16 rounding of the inputs moves these sums by ~1e-2, a change of kernel by ~1e-6. Small, so
    that the probe adds little to the first call's memory."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        for n, tokens in ((2, 201), (1, 400)):
            a, b = torch.randn(n, tokens, 64, generator=g), torch.randn(n, 64, tokens, generator=g)
            strict = torch.bmm(a, b)
            with _onednn_bmm(True):
                moved = torch.bmm(a, b).sub_(strict).abs_().max().item()
            del a, b, strict
            if moved > 1e-3:
                return True
    return False
