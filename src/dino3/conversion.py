"""Converting a checkpoint between the Hugging Face, Meta and timm layouts.

The source is read and checked strictly, as `dino3.load` does (any layout, any source), and written
in the target layout: a Hugging Face folder (config.json, model.safetensors, preprocessor_config.json),
a Meta .pth file, or a timm .safetensors / .pth file. Tensors keep their dtype and values. An
existing destination is replaced only with overwrite=True.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .errors import UsageError
from .models.pretrained import load_pretrained
from .processing import DINOv3ViTImageProcessor
from .weights import formats
from .weights.files import write_safetensors, write_torch_file

TARGETS = formats.LAYOUTS
# Meta's SAT ViT-L and 7B models carry a second final norm (`local_cls_norm`) that their own code
# loads strictly but never uses at inference; converting into Meta's layout gives them one.
_UNTIED_NORM_PRESETS = {"vitl16-sat493m", "vit7b16", "vit7b16-sat493m"}
_SUFFIXES = {"": "hf", ".pth": "meta", ".pt": "meta", ".safetensors": "timm", ".bin": "timm"}


def target_for(dst: str | os.PathLike, to: str | None = None) -> str:
    """The layout to write: `to`, or guessed from the destination (folder: hf, .pth: meta, .safetensors: timm)."""
    suffix = Path(dst).suffix.lower()
    if to is None:
        if suffix not in _SUFFIXES:
            raise UsageError(
                f"{dst}: give a folder (Hugging Face), a .pth (Meta) or a .safetensors (timm), or pass to="
            )
        return _SUFFIXES[suffix]
    if to not in TARGETS:
        raise UsageError(f"to must be one of {TARGETS}, got {to!r}")
    if to == "hf" and suffix:
        raise UsageError(f"{dst}: the Hugging Face layout is a folder; give a folder name")
    if to != "hf" and suffix not in (".pth", ".pt", ".safetensors", ".bin"):
        raise UsageError(f"{dst}: the {to} layout is one file; end its name in .pth or .safetensors")
    return to


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None, overwrite: bool = False, **load_kwargs: Any
) -> str:
    """Convert the checkpoint `src` (anything `dino3.load` takes) into the layout `to` at `dst`.

    Returns the layout written. `load_kwargs` go to `dino3.load` (config= for a bare file, token=...).
    """
    to = target_for(dst, to)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise UsageError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    model = load_pretrained(src, dtype="auto", **load_kwargs)
    if to == "hf":
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        model.save_pretrained(dst)
        DINOv3ViTImageProcessor.for_model(model).save_pretrained(dst)
        return to
    state_dict = formats.from_dino3(model.state_dict(), model.config, to)
    if to == "meta" and model.preset is not None and model.preset.name in _UNTIED_NORM_PRESETS:
        state_dict["local_cls_norm.weight"] = state_dict["norm.weight"].clone()
        state_dict["local_cls_norm.bias"] = state_dict["norm.bias"].clone()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix.lower() == ".safetensors":
        write_safetensors(state_dict, dst)
    else:
        write_torch_file(state_dict, dst)
    return to
