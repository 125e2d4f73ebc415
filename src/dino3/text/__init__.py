"""Texts and images in one space (dino.txt): text embeddings, zero-shot classification and zero-shot
segmentation, on a `dino3.DINOv3TextModel`.

    model = dino3.DINOv3TextModel.from_pretrained("dinotxt-vitl16")
    dino3.text.classify(model, "cat.jpg", candidate_labels=["cat", "dog", "car"])   # [{"score", "label"}, ...]
    vectors = dino3.text.embed_texts(model, ["a red bicycle", "a cat"])              # (2, 2048), unit length
    found = dino3.text.segment(model, "street.jpg", ["road", "car", "sky"])          # found.label_map (H, W)
"""

from __future__ import annotations

from .classify import classify
from .embeddings import DEFAULT_TEMPLATE, PARTS, embed_images, embed_texts, label_embeddings
from .segment import FEATURES, Segmentation, segment, window_probabilities, windows

__all__ = [
    "DEFAULT_TEMPLATE",
    "FEATURES",
    "PARTS",
    "Segmentation",
    "classify",
    "embed_images",
    "embed_texts",
    "label_embeddings",
    "segment",
    "window_probabilities",
    "windows",
]
