"""Shared test helpers: reference models with random weights that exercise every path."""

from __future__ import annotations

import math

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values of a realistic scale, in place.

    Default inits hide bugs: layer scale 1e-5 or zero biases make blocks vanish and zero tokens hide
    token-order mistakes. Here norms get weights near 1, every bias and token is non-zero, layer
    scales are near 1 and linear weights have std 1/sqrt(fan_in), so that attention is far from
    uniform and every block changes the output.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                value = 1.0 + 0.2 * r
            elif leaf in ("lambda1", "gamma") or name.rsplit(".", 1)[-1] in ("ls1", "ls2"):
                value = 0.6 + 0.4 * torch.rand(p.shape, generator=g)
            elif leaf == "bias" or leaf.endswith("_bias"):
                value = 0.1 * r
            elif p.ndim >= 2 and "token" not in name:
                fan_in = math.prod(p.shape[1:])
                value = r / math.sqrt(fan_in)
            else:  # cls / register / mask tokens
                value = r
            p.copy_(value.to(p.dtype))
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


SMALL = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2, num_register_tokens=4)


def save_small_vit(folder, seed: int = 0):
    """A small ViT with random weights and the default processor, saved the way a user's folder is."""
    import dino3

    randomize_(dino3.DINOv3ViTModel(dino3.DINOv3ViTConfig(**SMALL)), seed=seed).save_pretrained(folder)
    dino3.DINOv3ViTImageProcessor().save_pretrained(folder)
    return folder


# -- CPUs of the other kind, simulated -----------------------------------------------------------------
# dino3.system.cpu() is the one place every path asks what this CPU can do; patching it says "no" (or
# "yes") to a capability. Setting ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 in a fresh
# process (AVX2_ENV) goes further: PyTorch and oneDNN then really run as on an AVX2-only CPU.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def simulated_cpu(kind: str):
    """A dino3.system.CPU of one kind: "avx2" (no AVX-512, no bfloat16 anywhere), "avx512" (AVX-512
    without bfloat16 units: oneDNN emulates bfloat16), "avx512-bf16" (AVX512-BF16 and AMX)."""
    from dino3.system import CPU

    base = {"avx2", "fma"}
    kinds = {
        "avx2": (base, "AVX2", False),
        "avx512": (base | {"avx512f", "avx512bw", "avx512_vnni"}, "AVX512", True),
        "avx512-bf16": (base | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16"}, "AVX512", True),
    }
    features, isa, onednn_bf16 = kinds[kind]
    return CPU(f"simulated {kind}", "x86_64", frozenset(features), isa, True, onednn_bf16)


def assert_same_features(a, b) -> None:
    """Features of the same images computed in two runs: bitwise equal where the linear layers run on
    oneDNN (AVX-512), within float rounding where they run on MKL (AVX2: MKL's GEMM rounds according
    to the memory alignment of its operands and the batch's size, so two runs may differ in the last
    bits; MKL_CBWR would pin it, process-wide, which dino3 leaves to the user)."""
    import numpy as np
    import torch

    from dino3 import system

    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    if system.linear_kernel(torch.float32) == "onednn":
        assert np.array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def dinotxt_meta_files(folder):
    """The small dino.txt pair of tests/golden (Meta's two .pth files, unzipped byte for byte into folder)."""
    import gzip
    from pathlib import Path

    golden = Path(__file__).parent / "golden" / "dinotxt"
    paths = []
    for name in ("backbone", "head_and_text"):
        path = Path(folder) / f"{name}.pth"
        path.write_bytes(gzip.decompress((golden / f"{name}.pth.gz").read_bytes()))
        paths.append(path)
    return tuple(paths)
