"""Images -> features for probes, through the engine of `dino3 embed` (`dino3.embed.run`): decoding
workers, every image that cannot be read listed with its reason, progress saved as it goes, the
output written atomically, then read back with `dino3.embed.read_embeddings`.

Training keeps its embeddings in the probe folder, under a name that digests the request (model,
pooling, preprocessing, the image list): training again with the same images and model (another
method, another seed) reuses them, and an interrupted embedding resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import unescape_field
from ..embed import Inputs, read_embeddings, run
from ..embed.store import input_stat
from ..embed.writers import sidecars
from ..recipe import Recipe

# dino3.embed.run's options that decide only how fast (what decides the features is the recipe)
RUN_OPTIONS = ("batch_size", "workers", "checkpoint_every", "check_hash")


@dataclass
class Embedded:
    paths: list[str]  # the images embedded, in input order
    features: np.ndarray  # (N, D)
    meta: dict[str, Any]  # the embeddings file's settings: model, model_identity, pool, processor, ...
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)
    reused: bool = False


def embed_images(
    paths: list[str],
    recipe: Recipe,
    output: Path,
    *,
    skipped: list[tuple[str, str]] | None = None,
    load: Callable[..., Any] | None = None,
    device: str | None = None,
    progress: bool = True,
    **run_options: Any,
) -> Embedded:
    """Embed `paths` by `recipe` into `output` (resuming an interrupted run of the same request) and read
    them back."""
    result = run(
        Inputs(list(paths), list(skipped or [])),
        output=output,
        recipe=recipe,
        device=device,
        resume=True,
        progress=progress,
        load=load,
        **run_options,
    )
    data = read_embeddings(output)
    return Embedded(data.paths, np.asarray(data.features), data.meta, list(result.failures), list(result.notes))


def cached_embed(
    folder: Path, paths: list[str], recipe: Recipe, *, skipped: list[tuple[str, str]], **run_options: Any
) -> Embedded:
    """Embed into `folder`, reusing (or resuming) the embeddings of an identical earlier request."""
    request = json.dumps([recipe.model, recipe.options(), paths], default=str).encode("utf-8", "surrogateescape")
    name = f"embeddings-{hashlib.sha256(request).hexdigest()[:16]}.npz"
    output = folder / name
    if output.is_file():
        found = _reuse(output)
        if found is not None:
            return found
        output.unlink()  # the weights changed since: embed again
    found = embed_images(paths, recipe, output, skipped=skipped, **run_options)
    for stale in folder.glob("embeddings-*"):  # other requests' files, now superseded
        if not stale.name.startswith(name):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    return found


def _reuse(output: Path) -> Embedded | None:
    """An earlier embedding of the same request, unless the model's weight files changed since."""
    data = read_embeddings(output)
    for entry in (data.meta.get("model_identity") or {}).get("weight_files") or []:
        if list(input_stat(entry[0])) != list(entry[1:]):
            return None
    failures = []
    failures_file = sidecars(output)[0]
    if failures_file.is_file():
        for line in failures_file.read_text(encoding="utf-8").splitlines():
            path, _, reason = line.partition("\t")
            failures.append((unescape_field(path), unescape_field(reason)))
    note = f"reused the embeddings in {output.name} (same images, model and settings)"
    return Embedded(data.paths, np.asarray(data.features), data.meta, failures, [note], reused=True)
