"""Loading and saving backbones: `from_pretrained`, `from_state_dict`, `save_pretrained`.

Models are built on the meta device (no memory, no random init) and take the checkpoint's tensors
as their parameters, cast to the requested dtype as each tensor is read. On disk, dino3 writes the
Hugging Face layout, so that Transformers loads what dino3 saves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import _Config
from ..errors import CheckpointError
from ..presets import Preset
from ..weights import formats
from ..weights.files import read_safetensors, safetensors_dtype, write_safetensors
from ..weights.hub import SAFETENSORS_NAME, resolve

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype from a dtype or its name; "auto" and None are passed through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 or 'auto'")
    return DTYPES[name]


class PretrainedMixin:
    """from_pretrained / save_pretrained for an nn.Module whose constructor takes a config."""

    config_class: ClassVar[type[_Config]]
    config: _Config
    preset: Preset | None = None  # the official checkpoint this model was loaded from, if known
    name_or_path: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        **model_kwargs: Any,
    ):
        """Load a preset name ("vits16"), a hub id ("facebook/dinov3-vits16-pretrain-lvd1689m") or a
        local folder with config.json and model.safetensors (or a sharded index).

        dtype: float32 (the default), bfloat16, float16 or "auto" (the checkpoint's own dtype).
        device: where the model goes ("cpu", "cuda", ...); tensors are read straight onto it.
        token, revision, cache_dir, local_files_only: passed to huggingface_hub.
        """
        checkpoint = resolve(
            name_or_path, token=token, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        config = checkpoint.config
        if not isinstance(config, cls.config_class):
            raise CheckpointError(
                f"{checkpoint.source} is a {config.model_type} checkpoint, not {cls.config_class.model_type}; "
                "load it with dino3.load(), which picks the model class from the config"
            )
        dtype = parse_dtype(dtype)
        if dtype == "auto":
            dtype = parse_dtype(config.extra.get("dtype") or config.extra.get("torch_dtype"))
            dtype = dtype if isinstance(dtype, torch.dtype) else safetensors_dtype(checkpoint.weight_files)
        dtype = dtype or torch.float32
        state_dict = read_safetensors(checkpoint.weight_files, dtype=dtype, device=_read_device(device))
        model = cls.from_state_dict(state_dict, config, source=checkpoint.source, device=device, **model_kwargs)
        model.preset = checkpoint.preset
        model.name_or_path = str(name_or_path)
        return model

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: _Config,
        *,
        source: str = "the state dict",
        device: str | torch.device | None = None,
        **model_kwargs: Any,
    ):
        """Build a model from a Hugging Face layout state dict, strictly: every tensor the model needs
        must be there with its shape, and nothing else."""
        with torch.device("meta"):
            model = cls(config, **model_kwargs)
        expected = {k: v.shape for k, v in formats.to_hf(model.state_dict(), config).items()}
        state_dict = formats.normalize_hf_keys(state_dict)
        formats.check_state_dict({k: v.shape for k, v in state_dict.items()}, expected, source)
        model.load_state_dict(formats.from_hf(state_dict, config), strict=True, assign=True)
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the Hugging Face layout (loadable by Transformers)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.replace(extra={**self.config.extra, "dtype": str(self.dtype).removeprefix("torch.")})
        config.save_pretrained(folder)
        write_safetensors(formats.to_hf(self.state_dict(), self.config), folder / SAFETENSORS_NAME)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _read_device(device: str | torch.device | None) -> str:
    # safetensors reads straight to a CUDA device; anything else is read on the CPU and moved.
    if device is not None and torch.device(device).type == "cuda":
        return str(torch.device(device))
    return "cpu"
