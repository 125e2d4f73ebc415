"""Pictures of dense features, kept apart from the maths: the input beside its PCA colours, a mask,
a mask over its image, two images with lines between matched points, an image under its label map
with a legend (zero-shot segmentation). Arrays in, (H, W, 3) uint8 arrays out; `save_png` writes
them. Everything is deterministic: the same inputs give the same bytes."""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path

GAP = 8  # px of black between the pictures side by side
OVERLAY_TINT = (40, 220, 70)  # the foreground's colour in a mask overlay


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) tensor (uint8, or float in [0, 1]) or (H, W, 3) array -> (H, W, 3) uint8."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, bilinear (antialiased when shrinking) or nearest."""
    from PIL import Image

    height, width = size
    if array.shape[:2] == (height, width):
        return array
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((width, height), mode))


def side_by_side(*pictures: np.ndarray) -> np.ndarray:
    """(H_i, W_i, 3) uint8 pictures left to right on black, top-aligned, GAP px apart."""
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + GAP * (len(pictures) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    left = 0
    for p in pictures:
        canvas[: p.shape[0], left : left + p.shape[1]] = p
        left += p.shape[1] + GAP
    return canvas


def colour_map(rgb: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) colours in [0, 1] -> (height, width, 3) uint8, each patch a block (nearest)."""
    return resize(to_uint8(rgb.clamp(0, 1).numpy()), size, nearest=True)


def pca_picture(image: torch.Tensor | np.ndarray, rgb: torch.Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
    """The image beside its PCA colours (Meta's picture), both at `size` (height, width: the size
    the model saw, so that each patch is a block of whole pixels), or at the image's own size."""
    picture = to_uint8(image)
    if size is not None:
        picture = resize(picture, tuple(size))
    return side_by_side(picture, colour_map(rgb, picture.shape[:2]))


def mask_picture(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) bool patch mask -> (H, W) uint8, 255 foreground, 0 background, each patch a block."""
    values = mask.to(torch.uint8).numpy() * 255
    return resize(values[..., None].repeat(3, axis=-1), size, nearest=True)[..., 0]


def mask_overlay(image: torch.Tensor | np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """The image with its (h, w) patch mask over it, at the image's own size: the foreground tinted
    green, the background dimmed, so that a mask can be judged at a glance. (H, W, 3) uint8."""
    picture = to_uint8(image).astype(np.float32)  # (H, W, 3)
    inside = mask_picture(mask, picture.shape[:2])[..., None] > 0  # (H, W, 1)
    tinted = 0.6 * picture + 0.4 * np.array(OVERLAY_TINT, dtype=np.float32)
    return np.rint(np.where(inside, tinted, 0.35 * picture)).astype(np.uint8)


def match_picture(
    image_a: torch.Tensor | np.ndarray,
    image_b: torch.Tensor | np.ndarray,
    points_a: torch.Tensor,
    points_b: torch.Tensor,
    height: int = 768,
) -> np.ndarray:
    """Both images side by side at `height` px (or their own height if smaller), a line from each
    point of A to its match in B, coloured by where it starts in A."""
    from PIL import Image, ImageDraw

    a, b = to_uint8(image_a), to_uint8(image_b)
    height = min(height, max(a.shape[0], b.shape[0]))
    scale_a, scale_b = height / a.shape[0], height / b.shape[0]
    a = resize(a, (height, max(1, round(a.shape[1] * scale_a))))
    b = resize(b, (height, max(1, round(b.shape[1] * scale_b))))
    canvas = Image.fromarray(side_by_side(a, b))
    draw = ImageDraw.Draw(canvas)
    offset = a.shape[1] + GAP
    width_a = max(a.shape[1], 1)
    for (ax, ay), (bx, by) in zip(points_a.tolist(), points_b.tolist()):
        start = ((ax + 0.5) * scale_a - 0.5, (ay + 0.5) * scale_a - 0.5)
        end = ((bx + 0.5) * scale_b - 0.5 + offset, (by + 0.5) * scale_b - 0.5)
        hue = min(max(start[0] / width_a, 0.0), 1.0) * 0.8
        value = 1.0 - 0.4 * min(max(start[1] / height, 0.0), 1.0)
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, value))
        draw.line([start, end], fill=colour, width=1)
        for x, y in (start, end):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    return np.asarray(canvas)


def save_png(picture: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as a PNG, atomically (no time or text chunks: the
    same picture gives the same bytes)."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(picture)).save(tmp, format="PNG")
    return path


# -- label maps (zero-shot segmentation) ---------------------------------------------------------------------
# Distinct colours for up to 12 labels, then repeated with another brightness
PALETTE = np.asarray(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
    ],
    dtype=np.float32,
)  # fmt: skip


def label_colours(count: int) -> np.ndarray:
    """(count, 3) uint8 colours, one per label."""
    rows = [PALETTE[i % len(PALETTE)] * (0.6 if (i // len(PALETTE)) % 2 else 1.0) for i in range(count)]
    return np.clip(np.asarray(rows), 0, 255).astype(np.uint8)


def segmentation_picture(image: Any, segmentation: Any, alpha: float = 0.55) -> np.ndarray:
    """(H, W + legend, 3) uint8: the image blended with its label colours (a segmentation's `labels`,
    `label_map` (H, W) and `areas`, as dino3.text.segment gives), the legend on the right."""
    from PIL import Image, ImageDraw

    labels, label_map = segmentation.labels, segmentation.label_map.cpu().numpy()
    height, width = label_map.shape
    photo = resize(to_uint8(image), (height, width)).astype(np.float32)
    colours = label_colours(len(labels))
    blended = ((1 - alpha) * photo + alpha * colours[label_map].astype(np.float32)).round().astype(np.uint8)
    areas = segmentation.areas
    line = 18
    legend = Image.new("RGB", (220, max(height, line * len(labels) + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, label in enumerate(labels):
        top = 6 + i * line
        draw.rectangle([8, top, 22, top + 12], fill=tuple(int(c) for c in colours[i]))
        draw.text((30, top), f"{label[:22]} {100 * areas[label]:.0f}%", fill=(0, 0, 0))
    picture = np.full((max(height, legend.height), width + legend.width, 3), 255, np.uint8)
    picture[:height, :width] = blended
    picture[: legend.height, width:] = np.asarray(legend)
    return picture
