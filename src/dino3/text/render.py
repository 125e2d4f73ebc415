"""Pictures of a zero-shot segmentation: the image under its label map, each label its own colour,
and a legend that names the colours (and each label's share of the image)."""

from __future__ import annotations

from typing import Any

import numpy as np

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
    """(H, W + legend, 3) uint8: the image blended with its label colours, the legend on the right."""
    from PIL import Image, ImageDraw

    from ..dense.render import resize, to_uint8

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
