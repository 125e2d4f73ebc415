"""A video's PCA as a video: each sampled frame beside its PCA colours, with one PCA for all frames,
so that a colour means the same part in every frame and nothing flickers.

    dino3.dense.write_pca_video(model, "clip.mp4", "clip-pca.mp4", sampling=Sampling(fps=5))

Two passes over the frames: the PCA is fitted on up to FIT_FRAMES frames spread over the video
(their features kept for the second pass, not their pixels, so memory stays bounded), then every
sampled frame is coloured with it and written.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .._progress import progress_bar
from ..errors import ImageError, VideoError
from .foreground import ForegroundClassifier, foreground_mask
from .highres import HEIGHT, Tiling, load_dense
from .pca import fit_foreground_pca
from .render import pca_picture

FIT_FRAMES = 32  # frames the PCA is fitted on, spread over the video


@dataclass
class VideoResult:
    output: Path
    frames: int  # frames written
    rate: Fraction  # frames per second
    failures: list[tuple[str, str]] = field(default_factory=list)  # (frame name, reason)
    notes: list[str] = field(default_factory=list)


def write_pca_video(
    model: Any,
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    sampling: Any = None,
    height: int = HEIGHT,
    tiles: Tiling | None = None,
    foreground: ForegroundClassifier | str | None = None,
    progress: bool = False,
) -> VideoResult:
    """Write the side-by-side PCA video of the video at `path` (frames as `sampling`, a
    dino3.video.Sampling, takes them; default every frame). `foreground`: None, "auto" or a
    classifier (the PCA is fitted on the foreground, the rest black). A frame that cannot be decoded
    is left out and listed; VideoError when the video cannot be read at all."""
    from ..video import Sampling, VideoWriter, frame_rate, iter_frames, list_frames

    path, output = os.fspath(path), Path(output)
    sampling = sampling or Sampling()
    listed, _ = list_frames(path, sampling)
    rate = sampling.rate(frame_rate(path))
    step = max(1, math.ceil(len(listed) / FIT_FRAMES))

    def features_of(frame) -> tuple[Any, Any, tuple[int, int]]:
        image = torch.from_numpy(frame.pixels).permute(2, 0, 1)
        dense = load_dense(model, image, height=height, tiles=tiles, name=frame.name)
        return dense.features, foreground_mask(dense.features, foreground), tuple(dense.pixels.shape[-2:])

    fitted: dict[str, tuple[Any, Any, tuple[int, int]]] = {}  # name -> (features, mask, pixel size)
    with progress_bar(math.ceil(len(listed) / step), "fitting the PCA", "frame", progress) as bar:
        for position, frame in enumerate(iter_frames(path, sampling)):
            if frame.error is None and position % step == 0:
                with contextlib.suppress(ImageError):  # said in the second pass
                    fitted[frame.name] = features_of(frame)
                bar.update(1)
    if not fitted:
        raise VideoError(f"{path}: no frame could be read")
    values = list(fitted.values())
    pca, note = fit_foreground_pca([f for f, _, _ in values], [m for _, m, _ in values])
    result = VideoResult(output, 0, rate, notes=[f"{path}: {note}"] if note else [])
    with VideoWriter(output, rate) as writer, progress_bar(len(listed), "writing", "frame", progress) as bar:
        for frame in iter_frames(path, sampling):
            bar.update(1)
            if frame.error is not None:
                result.failures.append((frame.name, frame.error))
                continue
            if frame.name in fitted:
                features, mask, size = fitted.pop(frame.name)
            else:
                try:
                    features, mask, size = features_of(frame)
                except ImageError as e:
                    result.failures.append((frame.name, str(e)))
                    continue
            image = torch.from_numpy(frame.pixels).permute(2, 0, 1)
            writer.write(pca_picture(image, pca.rgb(features, mask), size))
            result.frames += 1
    return result
