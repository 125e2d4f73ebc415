"""What a feature is: the pooling of a model's tokens and the choice of layers, defined once.

Pooling: "cls" (the normed CLS token, the pooled token for ConvNeXt: Transformers' pooler_output),
"mean" (the mean of the patch tokens, registers left out), "cls+mean" (both, concatenated: Meta's
linear-probe input), "patches" (the patch grid, (h, w, D)) or, for a dino.txt model, "text" (its image
embedding, in the space of its text embeddings); a dino.txt model's other poolings are its backbone's.
Layers: None for the model's output, or, as Meta's `get_intermediate_layers` takes them, a count of
last blocks (ConvNeXt: stages) or their 0-based indices; each is normed with the final norm and the
features gain a layer axis.

The pipeline, the embed job, the service, search, probes and the dense tools all call `extract`,
so that a feature means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import UsageError

POOLS = ("cls", "mean", "cls+mean", "patches", "text")
Layers = int | list[int] | None


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise UsageError(f"pool must be one of {POOLS}, got {pool!r}")
    return pool


def parse_layers(text: str | None) -> Layers:
    """The command line's --layers: a count ("4": the last four) or indices ("2,5,8,11"; "7,": one)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--layers {text}: give a count (4) or block indices (2,5,8,11; one index: 7,)") from None
    if not values:
        raise UsageError(f"--layers {text!r}: give a count (4) or block indices (2,5,8,11)")
    return values if "," in text else values[0]


def check_layers(layers: Layers, model: Any) -> Layers:
    """Layers that this model has, or a UsageError that says how many it has."""
    if layers is None:
        return None
    if not hasattr(model, "get_intermediate_layers"):
        raise UsageError("intermediate layers need the torch backend (the exported graph returns the final tokens)")
    count = model.config.num_hidden_states - 1
    what = "block" if model.config.model_type == "dinov3_vit" else "stage"
    if isinstance(layers, int):  # a count (bool included, to be refused)
        if isinstance(layers, bool) or not 1 <= layers <= count:
            raise UsageError(f"layers: the model has {count} {what}s; a count must be 1..{count}, got {layers!r}")
        return layers
    chosen = list(layers)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count]
    if not chosen or bad:
        raise UsageError(f"layers: the model has {count} {what}s, indices 0..{count - 1}; got {chosen}")
    if what == "stage":
        widths = {model.config.hidden_sizes[i] for i in chosen}
        if len(widths) > 1:
            raise UsageError("the chosen ConvNeXt stages differ in width and size; choose one stage (--layers 3,)")
    return chosen


def pool_tokens(patches: torch.Tensor, cls: torch.Tensor, pool: str, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) patch tokens and (B, D) CLS tokens -> the pooled features of each image."""
    if pool == "cls":
        return cls  # (B, D)
    if pool == "mean":
        return patches.mean(dim=1)  # (B, D)
    if pool == "cls+mean":  # Meta's linear-probe input
        return torch.cat((cls, patches.mean(dim=1)), dim=-1)  # (B, 2D)
    if pool == "patches":
        return patches.unflatten(1, grid)  # (B, h, w, D)
    raise UsageError(f"pool must be one of {POOLS}, got {pool!r}")


def extract(
    model: Any, pixel_values: torch.Tensor, pool: str = "cls", layers: Layers = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Features of a batch of pixels: (B, ...) as `pool` says (with a layer axis after B when
    `layers` is given), and the patch grid (h, w) of the batch. Runs under inference_mode."""
    if hasattr(model, "encode_text"):  # dino.txt: its image embedding, or its backbone's features
        if pool == "text":
            if layers is not None:
                raise UsageError("pool 'text' is the image embedding of the model's output: give no layers")
            with torch.inference_mode():
                pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
                return model.encode_image(pixel_values), model.backbone.grid_size(*pixel_values.shape[-2:])
        model = model.backbone
    elif pool == "text":
        raise UsageError("pool 'text' (the image embedding in the space of texts) needs a dino.txt model")
    with torch.inference_mode():
        pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
        if layers is None:
            out = model(pixel_values)
            return pool_tokens(out.patch_tokens, out.cls_token, pool, out.grid_size), out.grid_size
        maps = model.get_intermediate_layers(pixel_values, n=layers, reshape=True, return_class_token=True)
        grid = tuple(maps[0][0].shape[-2:])
        per_layer = [pool_tokens(m.flatten(2).transpose(1, 2), cls, pool, grid) for m, cls in maps]
        return torch.stack(per_layer, dim=1), grid


def feature_shape(model: Any, pool: str, layers: Layers, grid: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The shape of one image's features (grid needed for "patches")."""
    if pool == "text":
        return (model.config.embed_dim,)
    config = getattr(model.config, "backbone_config", None)  # a dino.txt model: its backbone's features
    if config is not None:
        model = type("Backbone", (), {"config": config})()
    dim = model.config.feature_dim if layers is None else _layer_dim(model, layers)
    shape: tuple[int, ...] = {"cls": (dim,), "mean": (dim,), "cls+mean": (2 * dim,)}.get(pool) or (*grid, dim)
    if layers is not None:
        count = layers if isinstance(layers, int) else len(layers)
        shape = (count, *shape)
    return shape


def _layer_dim(model: Any, layers: Sequence[int] | int) -> int:
    if model.config.model_type == "dinov3_vit":
        return model.config.hidden_size
    sizes = model.config.hidden_sizes
    return sizes[-1] if isinstance(layers, int) else sizes[list(layers)[0]]
