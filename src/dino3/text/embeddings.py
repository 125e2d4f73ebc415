"""Texts and images into dino.txt's shared space, in batches.

`embed_texts` sorts the texts by token count before batching: a batch runs only up to its longest
text (causal attention makes the tokens after an end-of-text irrelevant), so short prompts cost little
even beside long ones. `label_embeddings` is CLIP's prompt ensemble (each label's templates embedded,
normalised, averaged and normalised again), as Meta's notebooks build classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._progress import progress_bar
from ..errors import UsageError
from ..models.text import DINOv3TextModel
from ..processing import DINOv3ViTImageProcessor

DEFAULT_TEMPLATE = "This is a photo of {}."  # Transformers' zero-shot-image-classification default
PARTS = ("all", "cls", "patch")  # the whole embedding, or the half aligned to the CLS / mean patch token


def check_model(model: Any) -> DINOv3TextModel:
    if not isinstance(model, DINOv3TextModel):
        raise UsageError(
            f"text and zero-shot features need a dino.txt model (dino3.DINOv3TextModel), got {type(model).__name__}; "
            "load one with dino3.DINOv3TextModel.from_pretrained('dinotxt-vitl16') or .from_meta(...)"
        )
    return model


def check_texts(texts: Any, what: str = "texts") -> list[str]:
    items = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, Sequence) else None
    if items is None or not all(isinstance(t, str) for t in items):
        raise UsageError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    return items


def check_templates(templates: str | Sequence[str]) -> list[str]:
    """One template or several (a prompt ensemble); each must have a "{}" (or "{0}") for the label."""
    items = check_texts(templates, "hypothesis_template")
    if not items:
        raise UsageError("give at least one template, such as 'a photo of a {}.'")
    for template in items:
        if template.format("\0") == template:
            raise UsageError(f"the template {template!r} has no '{{}}' where the label goes")
    return items


@torch.inference_mode()
def embed_texts(
    model: DINOv3TextModel,
    texts: str | Sequence[str],
    *,
    batch_size: int = 64,
    normalize: bool = True,
    part: str = "all",
    progress: bool = False,
) -> torch.Tensor:
    """(N, D) text embeddings in input order (float32, on the CPU); normalised by default.

    part: "all" (the embedding, embed_dim wide), "cls" (the first half, aligned to the image's CLS half)
    or "patch" (the second half, aligned to the mean patch token: what dense maps compare with).
    """
    model = check_model(model)
    items = check_texts(texts)
    if part not in PARTS:
        raise UsageError(f"part must be one of {PARTS}, got {part!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not items:
        return torch.zeros(0, _width(model, part))
    tokens = model.tokenize(items)  # (N, 77)
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # by the end-of-text position
    out = torch.empty(len(items), model.config.embed_dim)
    with progress_bar(len(items), "embedding texts", "text", progress) as bar:
        for start in range(0, len(items), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = model.encode_text(tokens[rows].to(model.device)).float().cpu()
            bar.update(len(rows))
    out = _part(out, part)
    return F.normalize(out, dim=-1) if normalize else out


@torch.inference_mode()
def label_embeddings(
    model: DINOv3TextModel,
    labels: Sequence[str],
    templates: str | Sequence[str] = DEFAULT_TEMPLATE,
    *,
    part: str = "all",
    batch_size: int = 64,
) -> torch.Tensor:
    """(L, D) unit vectors, one per label: its templates' embeddings (of `part`), each normalised, averaged,
    normalised again (CLIP's prompt ensemble, as Meta's notebooks build zero-shot classifiers)."""
    labels = check_texts(labels, "labels")
    if not labels:
        raise UsageError("give at least one label")
    templates = check_templates(templates)
    prompts = [template.format(label) for label in labels for template in templates]
    embedded = embed_texts(model, prompts, batch_size=batch_size, part=part)  # (L * T, D), normalised
    return F.normalize(embedded.view(len(labels), len(templates), -1).mean(dim=1), dim=-1)


@torch.inference_mode()
def embed_images(
    model: DINOv3TextModel,
    images: Any,
    *,
    processor: DINOv3ViTImageProcessor | None = None,
    batch_size: int = 8,
    normalize: bool = True,
) -> torch.Tensor:
    """(N, embed_dim) image embeddings (float32, on the CPU) of anything dino3's processor takes, one image
    or a list; preprocessed as Meta's dino.txt transform (DINOv3ViTImageProcessor.for_dinotxt) by default."""
    model = check_model(model)
    processor = processor or DINOv3ViTImageProcessor.for_dinotxt()
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    out = []
    for start in range(0, len(items), batch_size):
        pixels = processor(items[start : start + batch_size]).pixel_values
        if isinstance(pixels, list):  # sizes differ (an aspect-preserving processor): one at a time
            out += [model.encode_image(p[None].to(model.device)).float().cpu() for p in pixels]
        else:
            out.append(model.encode_image(pixels.to(model.device)).float().cpu())
    features = torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)
    return F.normalize(features, dim=-1) if normalize else features


def _part(features: torch.Tensor, part: str) -> torch.Tensor:
    half = features.shape[-1] // 2
    return features if part == "all" else features[..., :half] if part == "cls" else features[..., half:]


def _width(model: DINOv3TextModel, part: str) -> int:
    return model.config.embed_dim if part == "all" else model.config.embed_dim // 2
