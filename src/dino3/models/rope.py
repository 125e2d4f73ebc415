"""2D rotary position embedding (RoPE) of the DINOv3 ViT, computed as Hugging Face Transformers does.

There is no absolute position embedding: the query and key of every patch token are turned by angles
taken from the patch centre's normalised (y, x) position; CLS and registers are never turned. The
tables are always computed in fp32, then cast to the model's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import DINOv3ViTConfig


class RopeTables(nn.Module):
    """cos / sin tables of the 2D RoPE for a grid of h x w patches, computed in fp32.

    Each table is (h*w, head_dim), laid out [Y | X | Y | X] over the head dimension (a quarter of the
    dims per axis, the rotation pairing dim i with dim i + head_dim/2; see `apply_rope`).
    Tables are cached per (h, w, dtype, device), first in first out; the cache is only ever
    changed by single dict operations, so that threads running the same model never see it broken.
    In training mode with coordinate augmentation the tables are drawn afresh on every call, as the
    reference does.
    """

    CACHE_SIZE = 32

    def __init__(self, config: DINOv3ViTConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = float(config.rope_theta)
        self.shift = config.pos_embed_shift
        self.jitter = config.pos_embed_jitter
        self.rescale = config.pos_embed_rescale
        # Meta's code divides by a `periods` buffer that its checkpoints store rounded to bf16; the
        # reference (and dino3 by default) computes the frequencies in fp32. Setting `periods` (for
        # example with dino3.load(meta_file, rope_periods="checkpoint")) follows Meta exactly.
        self.periods: torch.Tensor | None = None
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def augments(self) -> bool:
        return self.training and any(v is not None for v in (self.shift, self.jitter, self.rescale))

    def inv_freq(self) -> torch.Tensor:
        # (head_dim/4,), fp32, on the CPU like the reference's buffer, so that every device agrees.
        return 1 / self.theta ** torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32)

    @staticmethod
    def patch_centres(h: int, w: int, device: torch.device) -> torch.Tensor:
        """(h*w, 2) patch-centre (y, x) coordinates in (-1, 1), each axis normalised separately."""
        ys = torch.arange(0.5, h, dtype=torch.float32, device=device) / h
        xs = torch.arange(0.5, w, dtype=torch.float32, device=device) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        return 2.0 * coords - 1.0

    def augment(self, coords: torch.Tensor) -> torch.Tensor:
        """Training-time shift, jitter and rescale of the coordinates (same draws as the reference)."""
        if self.shift is not None:
            coords = coords + torch.empty((1, 2), device=coords.device).uniform_(-self.shift, self.shift)
        if self.jitter is not None:
            log_j = math.log(self.jitter)
            coords = coords * torch.empty((1, 2), device=coords.device).uniform_(-log_j, log_j).exp()
        if self.rescale is not None:
            log_r = math.log(self.rescale)
            coords = coords * torch.empty(1, device=coords.device).uniform_(-log_r, log_r).exp()
        return coords

    def compute(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        coords = self.patch_centres(h, w, device)
        if self.augments:
            coords = self.augment(coords)
        if self.periods is not None:  # Meta's formula, with the checkpoint's periods
            angles = 2 * math.pi * coords[:, :, None] / self.periods.float().to(device)[None, None, :]
        else:
            inv_freq = self.inv_freq().to(device)
            angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]  # (N, 2, Dh/4)
        angles = angles.flatten(1, 2)  # (N, Dh/2) = [Y | X]
        cos, sin = torch.cos(angles), torch.sin(angles)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # (N, Dh) each

    def use_periods(self, periods: torch.Tensor | None) -> None:
        """Compute angles as Meta does, dividing by these periods (None: the reference's fp32 formula)."""
        if periods is not None and tuple(periods.shape) != (self.head_dim // 4,):
            raise ValueError(f"periods must have shape ({self.head_dim // 4},), got {tuple(periods.shape)}")
        self.periods = None if periods is None else periods.detach().float().cpu()
        self._cache.clear()

    def forward(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Fresh tables in training with augmentation, and when exporting or compiling (so that they
        # are computed in the graph, from the input's symbolic size).
        if self.augments or torch.compiler.is_compiling():
            cos, sin = self.compute(h, w, device)
            return cos.to(dtype), sin.to(dtype)
        key = (h, w, dtype, torch.device(device))
        tables = self._cache.get(key)
        if tables is None:
            # Plain tensors even under inference_mode, so that a later forward with autograd can use them.
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self.compute(h, w, device)
                tables = (cos.to(dtype), sin.to(dtype))
            self._cache[key] = tables
            for old in list(self._cache)[: max(0, len(self._cache) - self.CACHE_SIZE)]:
                self._cache.pop(old, None)
        return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Rotate the patch tokens of x (B, heads, T, Dh); the first `num_prefix` tokens stay as they are.

    x * cos + rotate_half(x) * sin with rotate_half([a | b]) = [-b | a], written as the reference
    writes it (two slices, a negation, a concatenation): OpenVINO recognises this form in an export
    and fuses it into one RoPE operation (ViT-S/16 int8 8% faster than with a split), and PyTorch
    runs it no slower than other forms.
    """
    prefix, patches = x.split((num_prefix, x.shape[-2] - num_prefix), dim=-2)
    half = patches.shape[-1] // 2
    rotated = torch.cat((-patches[..., half:], patches[..., :half]), dim=-1)
    return torch.cat((prefix, patches * cos + rotated * sin), dim=-2)
