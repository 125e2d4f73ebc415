"""The embed job: inputs (files, folders, globs, lists, tables, object storage) -> one embeddings
output, resumable, on this machine or on Ray Data.

result = dino3.embed.run(["photos/"], model="vits16", output="features.npz")
data = dino3.embed.read_embeddings("features.npz")   # paths, features, grid_sizes, meta
"""

from __future__ import annotations

from .inputs import IMAGE_SUFFIXES, Inputs, expand_inputs
from .job import ENGINES, EmbedResult, RayOptions, run
from .writers import OUTPUT_SUFFIXES, Embeddings, is_embeddings, read_embeddings, read_shards, write_embeddings

__all__ = [
    "IMAGE_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "ENGINES",
    "EmbedResult",
    "RayOptions",
    "Embeddings",
    "Inputs",
    "expand_inputs",
    "is_embeddings",
    "read_embeddings",
    "read_shards",
    "run",
    "write_embeddings",
]
