"""Maps people can look at: the image with its anomaly map laid over it in colour, a colour bar with
the threshold marked, and the score written on it. Arrays in, (H, W, 3) uint8 out (PIL draws)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..dense.render import resize, save_png, to_uint8

# A perceptual dark-to-bright scale (close to matplotlib's "inferno"): positions in [0, 1] and colours.
_STOPS = np.linspace(0.0, 1.0, 9)
_COLOURS = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
MAX_SIDE = 1024  # the longer side of a picture, px (larger images are shown smaller)
BAR = 18  # px: the colour bar's width
ALPHA = 0.5  # how much of the colour covers the image


def colourize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 colours, `low` darkest and `high` brightest."""
    span = high - low if high > low else 1.0
    t = np.clip((values.astype(np.float64) - low) / span, 0.0, 1.0)
    channels = [np.interp(t, _STOPS, _COLOURS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay(
    image: Any,
    anomaly_map: np.ndarray,
    score: float,
    *,
    low: float | None = None,
    high: float | None = None,
    threshold: float | None = None,
    anomalous: bool | None = None,
) -> np.ndarray:
    """The picture of one scored image: `image` ((3, H, W) tensor or (H, W, 3) array) under its map
    ((H, W), the image's own size) coloured from `low` to `high` (the map's own range by default),
    a colour bar on the right (the threshold marked in white), the score written at the top left."""
    from PIL import Image, ImageDraw, ImageFont

    picture = to_uint8(image)
    height, width = picture.shape[:2]
    if anomaly_map.shape != (height, width):
        raise ValueError(f"the map is {anomaly_map.shape}, the image {(height, width)}")
    low = float(anomaly_map.min()) if low is None else low
    high = float(anomaly_map.max()) if high is None else high
    scale = min(1.0, MAX_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    picture = resize(picture, size)
    colours = resize(colourize(anomaly_map, low, high), size)
    blended = np.rint(picture * (1 - ALPHA) + colours * ALPHA).astype(np.uint8)

    font = ImageFont.load_default(size=max(11, size[0] // 28))
    label_width = int(font.getlength("0.000")) + 8
    canvas = Image.new("RGB", (size[1] + 8 + BAR + 4 + label_width, size[0]), (0, 0, 0))
    canvas.paste(Image.fromarray(blended), (0, 0))
    ramp = np.linspace(high, low, size[0])[:, None].repeat(BAR, axis=1)  # the top is the highest
    canvas.paste(Image.fromarray(colourize(ramp, low, high)), (size[1] + 8, 0))
    draw = ImageDraw.Draw(canvas)
    left = size[1] + 8 + BAR + 4
    for value, y in ((high, 0), ((low + high) / 2, size[0] // 2), (low, size[0] - font.size - 2)):
        draw.text((left, max(0, min(y, size[0] - font.size - 2))), f"{value:.3f}", fill=(255, 255, 255), font=font)
    if threshold is not None and high > low and low <= threshold <= high:
        y = round((high - threshold) / (high - low) * (size[0] - 1))
        draw.line([(size[1] + 6, y), (size[1] + 8 + BAR + 2, y)], fill=(255, 255, 255), width=2)
    verdict = "" if anomalous is None else ("  ANOMALOUS" if anomalous else "  good")
    text = f"score {score:.4f}{verdict}"
    box = draw.textbbox((6, 6), text, font=font)
    draw.rectangle([box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3], fill=(0, 0, 0))
    colour = (255, 80, 80) if anomalous else (255, 255, 255)
    draw.text((6, 6), text, fill=colour, font=font)
    return np.asarray(canvas)


def write_overlays(
    results: Sequence[Any], sources: Sequence[Any], folder: str | os.PathLike, threshold: float | None = None
) -> list[Path]:
    """One PNG per scored image into `folder` (named after the image; repeated names get -2, -3, ...),
    all coloured on one scale (the lowest to the highest value of all the maps) so that they compare;
    each result's `picture` is set to its file."""
    from ..images import load_image

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        from ..errors import UsageError

        raise UsageError(f"{folder} is a file; the maps go into a folder")
    folder.mkdir(parents=True, exist_ok=True)
    low = min(float(r.map.min()) for r in results)
    high = max(float(r.map.max()) for r in results)
    written, taken = [], set()
    for i, (result, source) in enumerate(zip(results, sources)):
        stem = Path(os.fspath(source)).stem if isinstance(source, (str, os.PathLike)) else f"image-{i}"
        name, n = f"{stem}.png", 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name)
        picture = overlay(
            load_image(source),
            result.map,
            result.score,
            low=low,
            high=high,
            threshold=threshold,
            anomalous=result.anomalous,
        )
        result.picture = save_png(picture, folder / name)
        written.append(result.picture)
    return written
