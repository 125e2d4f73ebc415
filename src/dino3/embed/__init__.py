"""The embed job: inputs (files, folders, globs, lists) -> one embeddings file, resumable.

result = dino3.embed.run(["photos/"], model="vits16", output="features.npz")
data = dino3.embed.read_embeddings("features.npz")   # paths, features, grid_sizes, meta
"""

from __future__ import annotations

from .inputs import IMAGE_SUFFIXES, Inputs, expand_inputs
from .job import EmbedResult, model_fingerprint, model_identity, run, same_fingerprint
from .writers import OUTPUT_SUFFIXES, Embeddings, read_embeddings, read_shards, write_embeddings

__all__ = [
    "IMAGE_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "EmbedResult",
    "Embeddings",
    "Inputs",
    "expand_inputs",
    "model_fingerprint",
    "model_identity",
    "read_embeddings",
    "read_shards",
    "run",
    "same_fingerprint",
    "write_embeddings",
]
