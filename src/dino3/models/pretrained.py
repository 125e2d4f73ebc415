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
from ..weights.files import read_safetensors, read_weights_file, safetensors_dtype, write_safetensors
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
    source_layout: str | None = None  # the layout of the weights it was loaded from

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a preset name ("vits16"), a hub id ("facebook/dinov3-vits16-pretrain-lvd1689m"), a
        local folder with config.json and model.safetensors (or a sharded index), or a single
        weights file in Hugging Face, Meta (.pth) or timm layout. See `dino3.load` for the options."""
        return load_pretrained(name_or_path, cls=cls, **kwargs)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: _Config,
        *,
        layout: str = "hf",
        source: str = "the state dict",
        device: str | torch.device | None = None,
        consume: bool = False,
        **model_kwargs: Any,
    ):
        """Build a model from a state dict in `layout` ("hf", "meta" or "timm"), strictly: every
        tensor the model needs must be there with its shape, and nothing else it does not know.
        The model takes the tensors themselves (no copy); consume=True also empties `state_dict` as
        it goes, which keeps the peak memory of loading near the model's size."""
        with torch.device("meta"):
            model = cls(config, **model_kwargs)
        expected = {k: v.shape for k, v in formats.from_dino3(model.state_dict(), config, layout).items()}
        found = {k: v.shape for k, v in state_dict.items()}
        if layout == "hf":  # current Transformers' in-memory names carry a "model." prefix
            found = formats.normalize_hf_keys(found)
        hint = f"(read as the {formats.LAYOUT_NAMES[layout]} layout of a {config.model_type} model)"
        formats.check_state_dict(found, expected, source, hint=hint, layout=layout)
        weights = formats.to_dino3(state_dict, config, layout, consume=consume)
        model.load_state_dict(weights, strict=True, assign=True)
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


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    cls: type | None = None,
    config: _Config | str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    quantize: str | None = None,
    check_hash: bool = True,
    rope_periods: str = "exact",
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    **model_kwargs: Any,
):
    """Load any DINOv3 checkpoint as a dino3 model (of class `cls`, or the one its config names).

    config: for a single weights file without config.json: a config, a preset name or a config.json
        path; otherwise the shapes and the file name must match an official checkpoint.
    dtype: float32 (the default), bfloat16 or "auto" (the checkpoint's own dtype; float16 files load
        as float32). float16 is refused: DINOv3 overflows in it (see FP16_MESSAGE).
    device: where the model goes ("cpu", "cuda", ...).
    device_map: "auto" puts the model on the GPU when there is one with room for it, else on the CPU.
        Splitting one model over several devices is not supported.
    quantize: "int8-dynamic", "int8-weight" or "int4-weight" (see dino3.quantize).
    check_hash: check the SHA-256 prefix in Meta's file names (`...-08c60483.pth`).
    rope_periods: "exact" computes the RoPE frequencies in fp32, as Transformers does; "checkpoint"
        uses the bf16-rounded `rope_embed.periods` of a Meta file, as Meta's own code does (outputs
        then differ from Transformers' by about 1e-3; see the README).
    token, revision, cache_dir, local_files_only: passed to huggingface_hub.
    """
    checkpoint = resolve(
        name_or_path, token=token, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    dtype = parse_dtype(dtype)
    if dtype == torch.float16:
        raise ValueError(FP16_MESSAGE)
    if rope_periods not in ("exact", "checkpoint"):
        raise ValueError(f"rope_periods must be 'exact' or 'checkpoint', got {rope_periods!r}")
    if checkpoint.config is not None:  # a folder or hub repo in the Hugging Face layout
        layout, config = "hf", checkpoint.config
        if dtype == "auto":
            dtype = parse_dtype(config.extra.get("dtype") or config.extra.get("torch_dtype"))
            dtype = dtype if isinstance(dtype, torch.dtype) else safetensors_dtype(checkpoint.weight_files)
            dtype = torch.float32 if dtype == torch.float16 else dtype
        if device_map is not None:
            device = _auto_device(device_map, device, config, dtype or torch.float32)
        state_dict = read_safetensors(
            checkpoint.weight_files, dtype=dtype or torch.float32, device=_read_device(device)
        )
    else:  # one weights file: its keys say the layout, its shapes (or `config`) the architecture
        file = checkpoint.weight_files[0]
        state_dict = read_weights_file(file, None if dtype == "auto" else dtype or torch.float32, check_hash)
        if dtype == "auto":  # keep the file's dtype, except float16
            state_dict = {k: v.float() if v.dtype == torch.float16 else v for k, v in state_dict.items()}
        layout, model_type = formats.detect_layout(state_dict)
        config, checkpoint.preset = _config_for_file(state_dict, layout, model_type, file, config)
        if device_map is not None:
            first = next(v for v in state_dict.values() if v.is_floating_point())
            device = _auto_device(device_map, device, config, first.dtype)
    classes = {c.config_class.model_type: c for c in PretrainedMixin.__subclasses__()}
    target = classes[config.model_type]
    if cls is not None and cls is not target:
        raise CheckpointError(
            f"{checkpoint.source} is a {config.model_type} checkpoint, not {cls.config_class.model_type}; "
            "load it with dino3.load(), which picks the model class from the config"
        )
    periods = state_dict.get("rope_embed.periods") if rope_periods == "checkpoint" else None
    model = target.from_state_dict(
        state_dict, config, layout=layout, source=checkpoint.source, device=device, consume=True, **model_kwargs
    )
    if rope_periods == "checkpoint":
        if layout != "meta" or periods is None:
            raise CheckpointError("rope_periods='checkpoint' needs a Meta checkpoint with rope_embed.periods")
        model.rope.use_periods(periods)
    if quantize is not None:
        from ..quantization import quantize as quantize_model

        quantize_model(model, quantize)
    model.preset = checkpoint.preset
    model.name_or_path = str(name_or_path)
    model.source_layout = layout
    return model


FP16_MESSAGE = (
    "float16 is refused: DINOv3's activations overflow its range (Meta: 'DINOv3 doesn't support FP16'), "
    "giving inf/NaN features. Use dtype=torch.bfloat16 (as fast on GPUs since Ampere and on CPUs with "
    "AVX512-BF16 or AMX) or float32 (GPUs without bfloat16, such as the T4 or V100)."
)


def _auto_device(device_map: str, device, config: _Config, dtype: torch.dtype) -> torch.device:
    """The device `device_map="auto"` means: the GPU when one has room for the model, else the CPU."""
    if device_map != "auto":
        raise ValueError(
            f"device_map={device_map!r}: dino3 places a whole model on one device; use device_map='auto' or device=..."
        )
    if device is not None:
        raise ValueError("pass device or device_map, not both")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    classes = {c.config_class.model_type: c for c in PretrainedMixin.__subclasses__()}
    with torch.device("meta"):
        size = classes[config.model_type](config).num_parameters() * torch.empty(0, dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info()
    if size * 1.2 > free:
        import warnings

        warnings.warn(
            f"the model needs {size / 2**30:.1f} GiB and the GPU has {free / 2**30:.1f} GiB free: it stays on "
            "the CPU. dtype=torch.bfloat16 or quantize='int4-weight' make it smaller.",
            stacklevel=3,
        )
        return torch.device("cpu")
    return torch.device("cuda")


def _config_for_file(state_dict, layout: str, model_type: str, file: str, config: _Config | str | None):
    from ..presets import get_preset

    if isinstance(config, (str, os.PathLike)) and str(config).endswith(".json"):
        from ..weights.hub import read_config

        return read_config(config, str(config)), None
    if isinstance(config, str):
        preset = get_preset(config)
        return preset.make_config(), preset
    if config is not None:
        return config, None
    beside = Path(file).parent / "config.json"
    if layout == "hf" and beside.is_file():
        from ..weights.hub import resolve_config

        return resolve_config(beside.parent), None
    return formats.infer_config(state_dict, layout, model_type, Path(file).name)


def _read_device(device: str | torch.device | None) -> str:
    # safetensors reads straight to a CUDA device; anything else is read on the CPU and moved.
    if device is not None and torch.device(device).type == "cuda":
        return str(torch.device(device))
    return "cpu"
