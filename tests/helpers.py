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
