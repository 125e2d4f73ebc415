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
    from dino3 import system
    from helpers import simulated_cpu

    assert system.cpu().onednn, "this PyTorch build has no oneDNN (mkldnn): the fast CPU path cannot be tested"
    monkeypatch.setattr(system, "cpu", lambda: simulated_cpu("avx512-bf16"))  # where oneDNN is the choice
    monkeypatch.delenv("DINO3_LINEAR", raising=False)
    monkeypatch.delenv("DINO3_ONEDNN", raising=False)
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    assert layers._onednn_ok(x, w)
    assert not layers._onednn_ok(x, w.requires_grad_())
    with torch.no_grad():
        assert layers._onednn_ok(x, w)
    monkeypatch.setenv("DINO3_ONEDNN", "0")
    with torch.no_grad():
        assert not layers._onednn_ok(x, w)
