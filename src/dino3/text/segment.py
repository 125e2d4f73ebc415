"""Zero-shot segmentation: an image and label names -> a label for every pixel, with no training.

It follows Meta's dino.txt segmentation notebook (`notebooks/dinotxt_segmentation_inference.ipynb`):

1. each label's texts (label x templates) are embedded, the halves aligned to the mean patch token kept,
   normalised, averaged and normalised again;
2. the image's shorter side is resized to `short_side` (512) and windows of `window` x `window` pixels
   (384) are taken every `stride` pixels (192), the last ones flush with the edges;
3. each window is stretched to a multiple of the patch size, its patch tokens compared (cosine) with
   the labels, the maps upsampled (bilinear) to the window and turned into probabilities over the labels
   (softmax), which are averaged where windows overlap;
4. the map is upsampled (bilinear) to the image's size; each pixel takes its most probable label.

`features="backbone"` compares the backbone's patch tokens, as the notebook does (Meta's issue #355
asks whether the vision head's were meant; they are `features="head"`). The notebook resizes with
PIL; dino3 resizes with torchvision's arithmetic (`reference="torchvision"`), so the pixels differ by
resampling rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..models.text import DINOv3TextModel
from ..processing import DINOv3ViTImageProcessor
from .embeddings import check_model, check_texts, label_embeddings

FEATURES = ("backbone", "head")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class Segmentation:
    """A label per pixel. `label_map` (H, W) int64 indexes `labels`; `probabilities` (L, H, W) float32
    are the averaged window probabilities, upsampled to the image's size."""

    labels: list[str]
    label_map: torch.Tensor
    probabilities: torch.Tensor

    @property
    def areas(self) -> dict[str, float]:
        """The fraction of the image's pixels each label takes."""
        counts = torch.bincount(self.label_map.flatten(), minlength=len(self.labels)).float()
        return {label: float(c) for label, c in zip(self.labels, counts / self.label_map.numel())}

    def masks(self) -> dict[str, torch.Tensor]:
        """(H, W) bool masks, one per label."""
        return {label: self.label_map == i for i, label in enumerate(self.labels)}


@torch.inference_mode()
def segment(
    model: DINOv3TextModel,
    image: Any,
    labels: Sequence[str],
    templates: str | Sequence[str] = DEFAULT_TEMPLATES,
    *,
    features: str = "backbone",
    short_side: int = 512,
    window: int = 384,
    stride: int = 192,
    batch_size: int = 4,
    output_size: tuple[int, int] | None = None,
) -> Segmentation:
    """Label every pixel of one image (anything dino3's processor takes) with one of `labels` (see the
    module docstring). output_size: (H, W) of the maps; the image's own size by default."""
    model = check_model(model)
    labels = check_texts(labels, "labels")
    if not labels:
        raise UsageError("give at least one label")
    _check_options(model, features, short_side=short_side, window=window, stride=stride, batch_size=batch_size)
    classes = label_embeddings(model, labels, templates, part="patch").to(model.device)  # (L, D/2)
    processor = DINOv3ViTImageProcessor(size={"shortest_edge": short_side}, resample=3, reference="torchvision")
    from ..images import load_image

    original = load_image(image)  # (3, H0, W0) uint8
    pixels = processor(original).pixel_values[0].to(model.device)  # (3, H, W)
    probabilities = window_probabilities(
        model, pixels, classes, features=features, window=window, stride=stride, batch_size=batch_size
    )  # (L, H, W)
    size = tuple(output_size) if output_size is not None else tuple(original.shape[-2:])
    probabilities = F.interpolate(probabilities[None], size=size, mode="bilinear", align_corners=False)[0]
    return Segmentation(labels, probabilities.argmax(dim=0).cpu(), probabilities.float().cpu())


def windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of the sliding windows, as the notebook places them: every `stride`
    pixels, the last ones moved back flush with the edge; one window when the image is smaller."""
    rows = max(height - window + stride - 1, 0) // stride + 1
    columns = max(width - window + stride - 1, 0) // stride + 1
    out = []
    for i in range(rows):
        for j in range(columns):
            bottom, right = min(i * stride + window, height), min(j * stride + window, width)
            out.append((max(bottom - window, 0), max(right - window, 0), bottom, right))
    return out


@torch.inference_mode()
def window_probabilities(
    model: DINOv3TextModel,
    pixels: torch.Tensor,
    label_vectors: torch.Tensor,
    *,
    features: str = "backbone",
    window: int = 384,
    stride: int = 192,
    batch_size: int = 4,
) -> torch.Tensor:
    """(L, H, W) label probabilities of (3, H, W) normalised pixels, averaged over the sliding windows
    (steps 2-3 of the module docstring; the notebook's `predict_slide`). label_vectors: (L, D/2) unit
    vectors, as `label_embeddings(..., part="patch")` makes them."""
    _check_options(model, features, window=window, stride=stride, batch_size=batch_size)
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3 or not pixels.is_floating_point():
        raise UsageError("pixels must be one (3, H, W) float tensor of normalised pixels")
    _, height, width = pixels.shape
    classes = label_vectors.to(pixels.device)
    total = torch.zeros(len(classes), height, width, device=pixels.device)
    counts = torch.zeros(height, width, device=pixels.device)
    boxes = windows(height, width, window, stride)
    for start in range(0, len(boxes), batch_size):  # every window has the same size
        batch = boxes[start : start + batch_size]
        crops = torch.stack([pixels[:, top:bottom, left:right] for top, left, bottom, right in batch])  # (B, 3, h, w)
        maps = _patch_similarities(model, crops, classes, features)  # (B, L, h/P, w/P)
        maps = F.interpolate(maps, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        for (top, left, bottom, right), scores in zip(batch, maps.softmax(dim=1)):
            total[:, top:bottom, left:right] += scores
            counts[top:bottom, left:right] += 1
    return total / counts


def _check_options(model: DINOv3TextModel, features: str, **sizes: int) -> None:
    check_model(model)
    if features not in FEATURES:
        raise UsageError(f"features must be one of {FEATURES}, got {features!r}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if features == "backbone" and model.config.vision_width != model.config.embed_dim // 2:
        raise UsageError(
            f"this model's backbone tokens ({model.config.vision_width} wide) cannot be compared with its texts "
            f"({model.config.embed_dim // 2}-wide halves): use features='head'"
        )


def _patch_similarities(model, crops: torch.Tensor, classes: torch.Tensor, features: str) -> torch.Tensor:
    """(B, L, h, w) cosine similarities of the crops' patch tokens with the labels."""
    patch = model.config.backbone_config.patch_size
    height, width = crops.shape[-2:]
    stretched = (math.ceil(height / patch) * patch, math.ceil(width / patch) * patch)
    if stretched != (height, width):  # as the notebook: stretch to a multiple of the patch size
        crops = F.interpolate(crops, size=stretched, mode="bicubic", align_corners=False)
    _, head, backbone = model.encode_image_with_patch_tokens(crops.to(model.dtype))
    tokens = F.normalize((head if features == "head" else backbone).float(), dim=-1)  # (B, h*w, D/2)
    grid = (stretched[0] // patch, stretched[1] // patch)
    maps = torch.einsum("bnd,ld->bln", tokens, classes.float())
    return maps.unflatten(-1, grid)
