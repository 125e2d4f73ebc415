"""The fused linear layers: the same numbers as F.linear + activation, on every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dino3.models import layers
from helpers import max_diff


@pytest.mark.parametrize("activation", [None, "gelu", "silu", "relu", "gelu_new", "quick_gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_plain_pytorch(activation, bias):
    x = torch.randn(3, 17, 64)
    w, b = torch.randn(96, 64) / 8, torch.randn(96) if bias else None
    expected = F.linear(x, w, b)
    expected = layers.ACTIVATION_FUNCTIONS[activation](expected) if activation else expected
    with torch.no_grad():
        assert max_diff(layers.linear(x, w, b, activation), expected) <= 1e-5
        assert max_diff(layers.linear(x.transpose(0, 1), w, b, activation), expected.transpose(0, 1)) <= 1e-5


def test_linear_mul_matches_plain_pytorch():
    x, other = torch.randn(2, 9, 32), torch.randn(2, 9, 48)
    w, b = torch.randn(48, 32) / 6, torch.randn(48)
    with torch.no_grad():
        assert max_diff(layers.linear_mul(x, w, b, other), F.linear(x, w, b) * other) <= 1e-5


def test_bf16_linear_rounds_once():
    x, w, b = torch.randn(4, 64), torch.randn(128, 64) / 8, torch.randn(128)
    exact = F.gelu(F.linear(x, w, b))
    with torch.no_grad():
        fused = layers.linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), "gelu")
    assert fused.dtype == torch.bfloat16
    assert max_diff(fused, exact) <= 0.05


def test_gradients_use_the_autograd_path():
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    layers.linear(x, w, None, "gelu").sum().backward()
    expected_x = torch.autograd.grad(F.gelu(F.linear(x, w)).sum(), x)[0]
    assert max_diff(x.grad, expected_x) <= 1e-6


def test_onednn_is_used_only_when_no_gradient_is_needed(monkeypatch):
    assert layers._HAS_ONEDNN, "this PyTorch build has no oneDNN (mkldnn): the fast CPU path cannot be tested"
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    assert layers._onednn_ok(x, w)
    assert not layers._onednn_ok(x, w.requires_grad_())
    with torch.no_grad():
        assert layers._onednn_ok(x, w)
    monkeypatch.setattr(layers, "ONEDNN_LINEAR", False)  # what DINO3_ONEDNN=0 sets
    with torch.no_grad():
        assert not layers._onednn_ok(x, w)


# budget -> heads per group for 6 heads of 50 tokens (10 kB of fp32 scores each): whole images of
# 6 heads, 3 images at a time; 3 heads, 2 heads, 1 head of an image at a time.
@pytest.mark.parametrize("budget", [layers.ATTENTION_CHUNK_BYTES, 18 * 10_000, 4 * 10_000, 2 * 10_000, 1])
def test_bf16_cpu_attention_is_as_accurate_as_sdpa(monkeypatch, budget):
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", budget)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 6, 50, 32, generator=g) * 2 for _ in range(3))
    scale = 32**-0.5
    truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    truth = truth.transpose(1, 2).reshape(7, 50, 6 * 32)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(7, 50, 6 * 32)
    with torch.no_grad():
        assert layers.bf16_cpu_attention_ok(q, 0.0)
        ours = layers.bf16_cpu_attention(q, k, v, scale)
    assert ours.shape == truth.shape and ours.dtype == torch.bfloat16

    def error(x):
        return (x.double() - truth).abs()

    assert error(ours).mean() <= 1.05 * error(sdpa).mean()
    assert error(ours).max() <= 1.5 * error(sdpa).max()


def test_bf16_cpu_attention_is_only_for_inference():
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    assert not layers.bf16_cpu_attention_ok(q.float(), 0.0)  # fp32 keeps PyTorch's SDPA
    assert not layers.bf16_cpu_attention_ok(q, 0.1)  # attention dropout in training
    assert not layers.bf16_cpu_attention_ok(q.requires_grad_(), 0.0)
    long = torch.empty(1, 1, 3000, 8, dtype=torch.bfloat16)  # 3000 tokens: SDPA's memory-efficient kernel
    assert not layers.bf16_cpu_attention_ok(long, 0.0)


def test_bf16_cpu_attention_scratch_serves_inference_mode_then_no_grad():
    # The scratch buffers are made on first use; made under inference_mode they must still be
    # writable later under no_grad. A fresh thread starts with no scratch of its own.
    import threading

    q = torch.randn(2, 2, 9, 8).bfloat16()
    expected = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 9, 16)
    errors = []

    def run():
        try:
            with torch.inference_mode():
                first = layers.bf16_cpu_attention(q, q, q, 8**-0.5)
            with torch.no_grad():
                second = layers.bf16_cpu_attention(q, q, q, 8**-0.5)
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
    from dino3.models.vit import apply_rope, rope_into

    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 5 + 12, 3, 4, 16, generator=g).to(dtype)  # (B, T, 3, nh, Dh), 5 prefix tokens
    angles = torch.rand(12, 8, generator=g) * 6
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(dtype) for f in (torch.cos, torch.sin))
    q = qkv[:, :, 0].transpose(1, 2)  # a strided (B, nh, T, Dh) view, as the attention has it
    out = torch.empty(2, 4, 17, 16)
    rope_into(q, out, cos, sin, 5)
    assert torch.equal(out, apply_rope(q, cos, sin, 5).float())


@pytest.mark.parametrize("scale", [64**-0.5, 48**-0.5])  # a power of two (applied to q) and not
def test_bf16_cpu_attention_bf16_products_change_no_number(monkeypatch, scale):
    from dino3.models.vit import apply_rope, rope_into

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 41, 16, generator=g).bfloat16() * 3 for _ in range(3))
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
    monkeypatch.setattr(layers, "_bf16_products_safe", lambda: True)  # whatever threads pytest has
    with torch.no_grad():
        fast = layers.bf16_cpu_attention(q, k, v, scale, rotate)
    assert seen and set(seen) == {"bf16"}
    assert torch.backends.mkldnn.matmul.fp32_precision == precision  # put back
    monkeypatch.undo()
    monkeypatch.setattr(layers, "BF16_PRODUCTS", False)  # what DINO3_BF16_PRODUCTS=0 sets
    with torch.no_grad():
        plain = layers.bf16_cpu_attention(apply_rope(q, cos, sin, 1), apply_rope(k, cos, sin, 1), v, scale)
    assert torch.equal(fast, plain)


def test_bf16_products_only_while_no_foreign_thread_runs_where_onednn_rounds(monkeypatch):
    import threading
    from types import SimpleNamespace

    def threads(*names):
        others = [SimpleNamespace(name=name) for name in names]
        monkeypatch.setattr(layers.threading, "enumerate", lambda: [threading.current_thread(), *others])

    monkeypatch.setattr(layers, "_bf16_products_round", lambda: True)  # as on CPUs with AMX
    threads()
    assert layers._bf16_products_safe()
    threads("dino3-decode_0", "dino3-decode_1", "tqdm_monitor")  # run no matmul
    assert layers._bf16_products_safe()
    threads("dino3-decode_0", "ThreadPoolExecutor-0_0")  # might run an fp32 matmul
    assert not layers._bf16_products_safe()
    monkeypatch.setattr(layers, "_bf16_products_round", lambda: False)  # the setting only picks a kernel
    assert layers._bf16_products_safe()
    monkeypatch.setattr(layers, "BF16_PRODUCTS", False)
    assert not layers._bf16_products_safe()


@pytest.mark.parametrize("rounds", [True, False])
def test_bf16_products_probe_tells_whether_inputs_are_rounded(monkeypatch, rounds):
    torch_bmm = torch.bmm

    def bmm(a, b, **kwargs):  # a CPU whose oneDNN rounds fp32 inputs to bf16 when allowed (or not)
        if rounds and torch.backends.mkldnn.matmul.fp32_precision == "bf16":
            a, b = a.bfloat16().float(), b.bfloat16().float()
        return torch_bmm(a, b, **kwargs)

    monkeypatch.setattr(torch, "bmm", bmm)
    probe = layers._bf16_products_round.__wrapped__
    assert probe() is rounds
