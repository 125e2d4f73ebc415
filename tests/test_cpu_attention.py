"""The CPU attention: SDPA's numbers (bf16 and fp32), the RoPE written into it, and the oneDNN
switch it flips (set only where it changes no number)."""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dino3.models import cpu_attention as attention
from dino3.models import layers
from dino3.models.vit import apply_rope, rope_into
from helpers import max_diff


def _heads(seed: int, *shape: int, dtype=torch.float32, std: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * std).to(dtype) for _ in range(3)]


def _sdpa(q, k, v, scale):
    B, nh, T, Dh = q.shape
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, T, nh * Dh)


# budget -> heads per group for 6 heads of 50 tokens (10 kB of fp32 scores each): whole images of
# 6 heads, 3 images at a time; 3 heads, 2 heads, 1 head of an image at a time.
@pytest.mark.parametrize("budget", [attention.ATTENTION_CHUNK_BYTES, 18 * 10_000, 4 * 10_000, 2 * 10_000, 1])
def test_bf16_attention_is_as_accurate_as_sdpa(monkeypatch, budget):
    monkeypatch.setattr(attention, "ATTENTION_CHUNK_BYTES", budget)
    q, k, v = _heads(0, 7, 6, 50, 32)
    scale = 32**-0.5
    truth = _sdpa(q.double(), k.double(), v.double(), scale)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    sdpa = _sdpa(q, k, v, scale)
    with torch.no_grad():
        assert attention.cpu_attention_ok(q, 0.0)
        ours = attention.cpu_attention(q, k, v, scale)
    assert ours.shape == truth.shape and ours.dtype == torch.bfloat16

    def error(x):
        return (x.double() - truth).abs()

    assert error(ours).mean() <= 1.05 * error(sdpa).mean()
    assert error(ours).max() <= 1.5 * error(sdpa).max()


@pytest.mark.parametrize("budget", [attention.ATTENTION_CHUNK_BYTES, 4 * 10_000])
@pytest.mark.parametrize("scale", [32**-0.5, 24**-0.5])
def test_fp32_attention_matches_sdpa(monkeypatch, budget, scale):
    monkeypatch.setattr(attention, "ATTENTION_CHUNK_BYTES", budget)
    monkeypatch.setattr(attention, "_onednn_rounds", lambda: False)  # as on this project's CPUs
    q, k, v = _heads(1, 7, 6, 50, 32)
    with torch.no_grad():
        assert attention.cpu_attention_ok(q, 0.0)
        ours = attention.cpu_attention(q, k, v, scale)
    assert ours.dtype == torch.float32
    truth = _sdpa(q.double(), k.double(), v.double(), scale)

    def error(x):
        return (x.double() - truth).abs()

    sdpa = _sdpa(q, k, v, scale)
    assert max_diff(ours, sdpa) <= 1e-5  # float rounding apart, the same
    assert error(ours).mean() <= 1.1 * error(sdpa).mean()
    assert error(ours).max() <= 1.5 * error(sdpa).max()


def test_cpu_attention_is_only_for_inference_and_unrounded_fp32(monkeypatch):
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    assert not attention.cpu_attention_ok(q, 0.1)  # attention dropout in training
    assert not attention.cpu_attention_ok(q.clone().requires_grad_(), 0.0)
    assert not attention.cpu_attention_ok(q.half(), 0.0)
    long = torch.empty(1, 1, 3000, 8, dtype=torch.bfloat16)  # 3000 tokens: SDPA's memory-efficient kernel
    assert not attention.cpu_attention_ok(long, 0.0)
    monkeypatch.setattr(attention, "_onednn_rounds", lambda: False)
    assert attention.cpu_attention_ok(q.float(), 0.0)
    monkeypatch.setattr(attention, "_onednn_rounds", lambda: True)  # fp32 would be rounded: SDPA
    assert not attention.cpu_attention_ok(q.float(), 0.0)
    assert attention.cpu_attention_ok(q, 0.0)  # bf16 runs anyway (through MKL if need be)
    monkeypatch.setattr(attention, "_onednn_rounds", lambda: False)
    monkeypatch.setattr(layers, "ONEDNN_LINEAR", False)  # what DINO3_ONEDNN=0 sets
    assert not attention.cpu_attention_ok(q.float(), 0.0)


def test_cpu_attention_ok_probes_only_for_cpu_inference(monkeypatch):
    # A GPU model, training or tracing never needs to know how oneDNN rounds: no probe for them.
    monkeypatch.setattr(attention, "_onednn_rounds", lambda: pytest.fail("probed"))
    q = torch.randn(1, 2, 5, 8)
    assert not attention.cpu_attention_ok(q.to("meta"), 0.0)
    assert not attention.cpu_attention_ok(q.clone().requires_grad_(), 0.0)
    assert not attention.cpu_attention_ok(q, 0.1)
    assert not attention.cpu_attention_ok(q.half(), 0.0)


def test_scratch_made_under_inference_mode_serves_no_grad():
    # The scratch buffers are made on first use; made under inference_mode they must still be
    # writable later under no_grad. A fresh thread starts with no scratch of its own.
    q = torch.randn(2, 2, 9, 8).bfloat16()
    expected = _sdpa(q, q, q, 8**-0.5)
    errors = []

    def run():
        try:
            with torch.inference_mode():
                first = attention.cpu_attention(q, q, q, 8**-0.5)
            with torch.no_grad():
                second = attention.cpu_attention(q, q, q, 8**-0.5)
            assert torch.equal(first, second)
            assert max_diff(second, expected) <= 0.02
        except Exception as e:  # noqa: BLE001  (reported in the main thread)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_into_writes_apply_ropes_numbers(dtype):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 5 + 12, 3, 4, 16, generator=g).to(dtype)  # (B, T, 3, nh, Dh), 5 prefix tokens
    angles = torch.rand(12, 8, generator=g) * 6
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(dtype) for f in (torch.cos, torch.sin))
    q = qkv[:, :, 0].transpose(1, 2)  # a strided (B, nh, T, Dh) view, as the attention has it
    out = torch.empty(2, 4, 17, 16)
    rope_into(q, out, cos, sin, 5)
    assert torch.equal(out, apply_rope(q, cos, sin, 5).float())


@pytest.mark.parametrize("scale", [64**-0.5, 48**-0.5])  # a power of two (applied to q) and not
def test_bf16_scores_through_onednn_change_no_number(monkeypatch, scale):
    q, k, v = _heads(2, 3, 4, 41, 16, dtype=torch.bfloat16, std=3.0)
    g = torch.Generator().manual_seed(3)
    cos, sin = (torch.rand(40, 16, generator=g).bfloat16() for _ in range(2))
    precision = torch.backends.mkldnn.matmul.fp32_precision
    seen = []  # oneDNN's fp32 matmul precision at each fp32 product
    torch_bmm = torch.bmm

    def bmm(a, b, **kwargs):
        if a.dtype == torch.float32:
            seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return torch_bmm(a, b, **kwargs)

    def rotate(x, out):
        rope_into(x, out, cos, sin, 1)

    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(attention, "_onednn_bmm_allowed", lambda bf16_inputs: True)
    with torch.no_grad():
        fast = attention.cpu_attention(q, k, v, scale, rotate)
    assert seen and set(seen) == {"bf16"}
    assert torch.backends.mkldnn.matmul.fp32_precision == precision  # put back
    monkeypatch.undo()
    monkeypatch.setattr(layers, "ONEDNN_LINEAR", False)  # MKL's fp32 batched matmul
    with torch.no_grad():
        plain = attention.cpu_attention(apply_rope(q, cos, sin, 1), apply_rope(k, cos, sin, 1), v, scale)
    assert torch.equal(fast, plain)


def test_onednn_switch_waits_for_foreign_threads_only_where_it_rounds(monkeypatch):
    def threads(*names):
        others = [SimpleNamespace(name=name) for name in names]
        monkeypatch.setattr(attention.threading, "enumerate", lambda: [threading.current_thread(), *others])

    monkeypatch.setattr(attention, "_onednn_rounds", lambda: True)  # as on CPUs with AMX
    threads()
    assert attention._onednn_bmm_allowed(bf16_inputs=True)
    assert not attention._onednn_bmm_allowed(bf16_inputs=False)  # fp32 inputs would be rounded
    threads("dino3-decode_0", "dino3-decode_1", "tqdm_monitor")  # run no matmul
    assert attention._onednn_bmm_allowed(bf16_inputs=True)
    threads("dino3-decode_0", "ThreadPoolExecutor-0_0")  # might run an fp32 matmul
    assert not attention._onednn_bmm_allowed(bf16_inputs=True)
    monkeypatch.setattr(attention, "_onednn_rounds", lambda: False)  # the setting only picks a kernel
    assert attention._onednn_bmm_allowed(bf16_inputs=True)
    assert attention._onednn_bmm_allowed(bf16_inputs=False)
    monkeypatch.setattr(layers, "ONEDNN_LINEAR", False)
    assert not attention._onednn_bmm_allowed(bf16_inputs=True)


@pytest.mark.parametrize("rounds", [True, False])
def test_probe_tells_whether_onednn_rounds_inputs(monkeypatch, rounds):
    torch_bmm = torch.bmm

    def bmm(a, b, **kwargs):  # a CPU whose oneDNN rounds fp32 inputs to bf16 when allowed (or not)
        if rounds and torch.backends.mkldnn.matmul.fp32_precision == "bf16":
            a, b = a.bfloat16().float(), b.bfloat16().float()
        return torch_bmm(a, b, **kwargs)

    monkeypatch.setattr(torch, "bmm", bmm)
    assert attention._probe_rounding() is rounds


def test_probe_runs_here_only_while_no_foreign_thread_is_alive(monkeypatch):
    monkeypatch.setattr(attention, "_rounds", None)  # not probed yet
    monkeypatch.setattr(attention, "_probe_thread", None)
    monkeypatch.setattr(attention, "_probe_rounding", lambda: False)
    monkeypatch.setattr(attention, "_probe_elsewhere", lambda: None)  # an interpreter that never answers
    monkeypatch.setattr(attention, "_alone", lambda: False)
    assert attention._onednn_rounds()  # assumed meanwhile
    assert attention._rounds is None and attention._probe_thread.name.startswith("dino3-")
    attention._probe_thread.join()
    monkeypatch.setattr(attention, "_alone", lambda: True)
    assert not attention._onednn_rounds()
    assert attention._rounds is False


@pytest.mark.parametrize("answer", ["0", "1", "garbage"])
def test_probe_in_a_fresh_interpreter(monkeypatch, answer):
    monkeypatch.setattr(attention, "_rounds", None)
    ran = []

    def run(command, **kwargs):
        ran.append(command)
        return SimpleNamespace(returncode=0, stdout=f"{answer}\n")

    monkeypatch.setattr(attention.subprocess, "run", run)
    attention._probe_elsewhere()
    assert ran and ran[0][0] == sys.executable
    assert attention._rounds == {"0": False, "1": True}.get(answer)


def test_no_probe_from_a_bundled_application(monkeypatch):
    monkeypatch.setattr(attention, "_rounds", None)
    monkeypatch.setattr(attention.sys, "frozen", True, raising=False)
    monkeypatch.setattr(attention.subprocess, "run", lambda *a, **k: pytest.fail("ran sys.executable"))
    attention._probe_elsewhere()
    assert attention._rounds is None


def test_probe_in_a_fresh_interpreter_for_real(monkeypatch):
    monkeypatch.setattr(attention, "_rounds", None)
    attention._probe_elsewhere()
    assert attention._rounds is attention._probe_rounding()
