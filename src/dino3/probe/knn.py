"""k-nearest-neighbour classification on frozen features, as Meta's protocol runs it
(dinov3/eval/knn.py): features normalised to unit length, cosine similarity, the k most similar
training images vote for their class with weights softmax(similarity / 0.07) over those k.

The search is exact: queries in chunks, one matmul against all training features per chunk and a
top-k, so that memory stays bounded (a chunk's similarities take at most CHUNK_ELEMENTS floats)
whatever the number of queries.

Meta computes the softmax once over its largest k (200) and sums the first k terms for each smaller
k; here each k has its own softmax over its k neighbours, so that the scores sum to 1. The two
differ by a factor common to all classes of a query: the ranking of the classes, and so every
prediction, is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KS: tuple[int, ...] = (10, 20, 100, 200)  # Meta's values of k
TEMPERATURE = 0.07  # Meta's
CHUNK_ELEMENTS = 1 << 25  # similarities computed at once (32M floats: 128 MB in float32)


def normalize(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) float32 rows of unit length (a zero row stays zero)."""
    return torch.nn.functional.normalize(features.float(), dim=1)


def neighbours(queries: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar rows of `train` for each row of `queries` (both unit rows, (Q, D) and
    (N, D), on one device), most similar first: similarities (Q, k) and indices (Q, k)."""
    k = min(k, train.shape[0])
    chunk = max(1, CHUNK_ELEMENTS // max(1, train.shape[0]))
    sims, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ train.T  # (chunk, N)
        top = similarity.topk(k, dim=1, largest=True, sorted=True)
        sims.append(top.values)
        indices.append(top.indices)
    if not sims:
        empty = queries.new_zeros((0, k))
        return empty, empty.long()
    return torch.cat(sims), torch.cat(indices)


def vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """Weighted vote of k neighbours: sims (Q, k), their labels (Q, k) -> class scores (Q, K) that sum to 1."""
    weights = torch.softmax(sims / temperature, dim=1)  # (Q, k)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


@dataclass
class KChoice:
    k: int  # the chosen one
    scores: dict[int, float]  # k -> held-out top-1 accuracy


def choose_k(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    val: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    ks: tuple[int, ...] = KS,
    temperature: float = TEMPERATURE,
) -> KChoice:
    """Score each k on the held-out part (unit rows), with one search for the largest; k larger than
    the training part is cut to its size, as Meta does. The best accuracy wins, the smallest k among equals."""
    ks = tuple(sorted({min(k, train.shape[0]) for k in ks}))
    sims, indices = neighbours(val, train, max(ks))
    labels = train_labels.to(indices.device)[indices]  # (Q, max k)
    val_labels = val_labels.to(indices.device)
    scores = {}
    for k in ks:
        predicted = vote(sims[:, :k], labels[:, :k], num_classes, temperature).argmax(dim=1)
        scores[k] = (predicted == val_labels).double().mean().item()
    best = max(ks, key=lambda k: (scores[k], -k))
    return KChoice(best, scores)
