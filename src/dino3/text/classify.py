"""Zero-shot classification: images and label names -> each label's probability, with no training.

The call shape of Transformers' `zero-shot-image-classification` pipeline:

    dino3.text.classify(model, "cat.jpg", candidate_labels=["cat", "dog"])
    # [{"score": 0.93, "label": "cat"}, {"score": 0.07, "label": "dog"}]   (a list of these per image for a list)

Each label becomes the text `hypothesis_template.format(label)` (several templates: CLIP's prompt ensemble,
see `label_embeddings`); the scores are the softmax, over the labels, of the model's logit scale times
the cosine similarity of image and text embeddings (CLIP's and Meta's zero-shot recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UsageError
from ..models.text import DINOv3TextModel
from ..processing import DINOv3ViTImageProcessor
from .embeddings import DEFAULT_TEMPLATE, check_model, check_texts, embed_images, label_embeddings


@torch.inference_mode()
def classify(
    model: DINOv3TextModel,
    images: Any,
    candidate_labels: Sequence[str],
    hypothesis_template: str | Sequence[str] = DEFAULT_TEMPLATE,
    *,
    processor: DINOv3ViTImageProcessor | None = None,
    batch_size: int = 8,
    top_k: int | None = None,
) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
    """[{"score", "label"}, ...] sorted by score (best first) for one image; a list of those for a list.

    images: anything dino3's processor takes (paths, URLs, PIL images, arrays, tensors), one or a list.
    candidate_labels: the label names; hypothesis_template: "This is a photo of {}." (Transformers'
    default), or a list of templates whose embeddings are averaged per label. top_k keeps the best k.
    """
    model = check_model(model)
    labels = check_texts(candidate_labels, "candidate_labels")
    if not labels:
        raise UsageError("candidate_labels must name at least one label")
    if len(set(labels)) != len(labels):
        raise UsageError(f"candidate_labels has repeated names: {sorted({x for x in labels if labels.count(x) > 1})}")
    classes = label_embeddings(model, labels, hypothesis_template)  # (L, D), unit vectors
    single = not isinstance(images, (list, tuple))
    features = embed_images(model, images, processor=processor, batch_size=batch_size)  # (N, D), unit vectors
    probabilities = (model.logit_scale.exp().float().cpu() * features @ classes.T).softmax(dim=-1)  # (N, L)
    keep = len(labels) if top_k is None else max(1, min(int(top_k), len(labels)))
    results = []
    for row in probabilities:
        scores, indices = row.topk(keep)
        results.append([{"score": float(s), "label": labels[i]} for s, i in zip(scores, indices.tolist())])
    return results[0] if single else results
