"""Converting a checkpoint between the Hugging Face, Meta and timm layouts.

The source is read and checked strictly, as `dino3.load` does (any layout, any source), and written
in the target layout: a Hugging Face folder (config.json, model.safetensors, preprocessor_config.json),
a Meta .pth file, or a timm .safetensors / .pth file. Tensors keep their dtype and values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import formats
from .files import write_safetensors

TARGETS = formats.LAYOUTS
# Meta's SAT ViT-L and 7B models carry a second final norm (`local_cls_norm`) that their own code
# loads strictly but never uses at inference; converting into Meta's layout gives them one.
_UNTIED_NORM_PRESETS = {"vitl16-sat493m", "vit7b16", "vit7b16-sat493m"}


def target_for(dst: str | os.PathLike, to: str | None = None) -> str:
    """The layout to write: `to`, or guessed from the destination (folder: hf, .pth: meta, .safetensors: timm)."""
    if to is not None:
        if to not in TARGETS:
            raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
        return to
    suffix = Path(dst).suffix.lower()
    return {"": "hf", ".pth": "meta", ".pt": "meta", ".safetensors": "timm", ".bin": "timm"}.get(suffix, "hf")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None, **load_kwargs) -> str:
    """Convert the checkpoint `src` (anything `dino3.load` takes) into the layout `to` at `dst`.

    Returns the layout written. `load_kwargs` go to `dino3.load` (config= for a bare file, token=...).
    """
    from ..models import load
    from ..processing import DINOv3ViTImageProcessor

    to = target_for(dst, to)
    model = load(src, dtype="auto", **load_kwargs)
    config = model.config
    dst = Path(dst)
    if to == "hf":
        if dst.suffix:
            raise CheckpointError(f"{dst}: the Hugging Face layout is a folder; give a folder name")
        model.save_pretrained(dst)
        if model.preset is not None:
            DINOv3ViTImageProcessor.from_pretrained(model.preset.name).save_pretrained(dst)
        return to
    state_dict = formats.from_dino3(model.state_dict(), config, to)
    if to == "meta" and model.preset is not None and model.preset.name in _UNTIED_NORM_PRESETS:
        state_dict["local_cls_norm.weight"] = state_dict["norm.weight"].clone()
        state_dict["local_cls_norm.bias"] = state_dict["norm.bias"].clone()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if dst.suffix.lower() == ".safetensors":
        write_safetensors(tensors, dst)
    else:
        tmp = dst.with_name(dst.name + ".partial")
        torch.save(tensors, tmp)
        os.replace(tmp, dst)
    return to
