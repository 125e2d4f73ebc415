"""Loading and saving backbones: `load_pretrained`, `from_state_dict`, `save_pretrained`.

Loading is strict and checks before it spends: the options are validated first, then the file's
tensor names and shapes (read from its header) are compared with what the model needs, and only then
is any tensor read. Models are built on the meta device (no memory, no random init) and take the
checkpoint's tensors as their parameters, cast to the requested dtype as each tensor is read. On
disk, dino3 writes the Hugging Face layout, so that Transformers loads what dino3 saves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import system
from ..config import CONFIG_NAME, _Config
from ..errors import CheckpointError, ConfigError
from ..presets import Preset, get_preset, preset_for_meta_file
from ..weights import formats, recognize
from ..weights.files import (
    check_file_hash,
    header_dtype,
    header_shapes,
    read_safetensors,
    read_torch_file,
    write_safetensors,
)
from ..weights.hub import SAFETENSORS_NAME, Checkpoint, HubOptions, read_config, resolve

# -- dtypes: defaulted, parsed and refused in this one place --------------------------------------------
DEFAULT_DTYPE = torch.float32
DTYPE_NAMES = ("float32", "bfloat16")  # what the command line offers
_DTYPE_ALIASES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
FP16_MESSAGE = (
    "float16 is refused: DINOv3's activations overflow its range (Meta: 'DINOv3 doesn't support FP16'), "
    "giving inf/NaN features. Use dtype=torch.bfloat16 (as fast on GPUs since Ampere and on CPUs with "
    "AVX512-BF16 or AMX) or float32 (GPUs without bfloat16, such as the T4 or V100)."
)
ROPE_PERIODS = ("exact", "checkpoint")

# Transformers' from_pretrained arguments that dino3 does not take, and why (see transformers_arguments).
NOT_IN_DINO3 = {
    "state_dict": "build a model from a state dict with from_state_dict(state_dict, config)",
    "proxies": "set HTTPS_PROXY, which huggingface_hub reads",
    "max_memory": "dino3 places a whole model on one device (device= or device_map='auto')",
    "distributed_config": "dino3 places a whole model on one device",
    "device_mesh": "dino3 places a whole model on one device",
    "offload_folder": "dino3 keeps a whole model in memory on one device",
    "offload_buffers": "dino3 keeps a whole model in memory on one device",
    "quantization_config": "quantize with quantize='int8-dynamic', 'int8-weight' or 'int4-weight'",
    "subfolder": "give the folder (or the hub repo of the checkpoint) itself",
    "variant": "give the weights file itself",
    "experts_implementation": "DINOv3 has no mixture of experts",
    "fusion_config": "dino3's layers are fused already",
    "key_mapping": "dino3 reads the Hugging Face, Meta and timm layouts itself",
    "disable_mmap": "dino3 memory-maps safetensors files and casts each tensor as it is read",
}


def transformers_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Transformers' from_pretrained arguments, in dino3's terms (a copy of `kwargs`): torch_dtype
    becomes dtype, with Transformers' deprecation note; ignore_mismatched_sizes=False,
    weights_only=True and use_safetensors=None/True, which ask for what dino3 always does, are
    accepted; anything else of Transformers' (NOT_IN_DINO3) is refused with the reason."""
    import warnings

    kwargs = dict(kwargs)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        warnings.warn("`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning, stacklevel=3)
        if kwargs.get("dtype") is None:  # both given: dtype wins, as in Transformers
            kwargs["dtype"] = torch_dtype
    for name, always in (("ignore_mismatched_sizes", False), ("weights_only", True)):
        if name in kwargs and kwargs.pop(name) != always:
            raise ValueError(
                f"{name}={not always}: dino3 always loads with {name}={always} "
                "(strictly: every tensor with its shape; .pth files without running pickled code)"
            )
    if kwargs.pop("use_safetensors", None) is False:
        raise ValueError(
            "use_safetensors=False: dino3 reads model.safetensors from folders and hub repos; to load a .pth "
            "file, give its path"
        )
    for name, reason in NOT_IN_DINO3.items():
        if name in kwargs:
            raise TypeError(f"{name}= is a Transformers argument that dino3's loading does not take: {reason}")
    return kwargs


def resolve_dtype(dtype: str | torch.dtype | None, allow_auto: bool = True) -> torch.dtype | str:
    """The dtype a model runs in: float32 for None, bfloat16, or "auto" (the checkpoint's own). float16
    is refused with the reason; anything else is an error that lists what is allowed."""
    if dtype is None:
        return DEFAULT_DTYPE
    if dtype == "auto" and allow_auto:
        return "auto"
    if isinstance(dtype, torch.dtype):
        found = dtype
    else:
        found = _DTYPE_ALIASES.get(str(dtype).removeprefix("torch."))
        if found is None:
            allowed = ", ".join(DTYPE_NAMES) + (" or 'auto'" if allow_auto else "")
            raise ValueError(f"unknown dtype {dtype!r}; use {allowed}")
    if found == torch.float16:
        raise ValueError(FP16_MESSAGE)
    if found not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"dtype {found} cannot run a model; use float32 or bfloat16 (for int8, pass quantize='int8-dynamic')"
        )
    return found


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """A torch device that exists here, or a ValueError that says which do."""
    if device is None:
        return None
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps, ...") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA GPU that PyTorch can use; use cpu")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA GPUs here")
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use cpu")
    if found.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda")
    return found


# -- the model classes --------------------------------------------------------------------------------------
def model_class_for(config: _Config) -> type:
    """The backbone class of a config (each model module registers by subclassing PretrainedMixin)."""
    for cls in PretrainedMixin.__subclasses__():
        if cls.config_class.model_type == config.model_type:
            return cls
    raise ConfigError(f"no model class for model_type {config.model_type!r}")  # pragma: no cover


def parameter_shapes(config: _Config, **model_kwargs: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of a model's own tensors, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_class_for(config)(config, **model_kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class PretrainedMixin:
    """from_pretrained / save_pretrained for an nn.Module whose constructor takes a config."""

    config_class: ClassVar[type[_Config]]
    config: _Config
    preset: Preset | None = None  # the checkpoint this model was loaded from, if known
    name_or_path: str | None = None
    source_layout: str | None = None  # the layout of the weights it was loaded from
    weight_files: list[str] | None = None  # the files it was loaded from
    quantization: str | None = None

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
        model, _ = _build(cls, state_dict, config, layout, source, consume, **model_kwargs)
        if device is not None:
            model.to(device)
        return model

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the Hugging Face layout (loadable by Transformers)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.quantization:
            raise CheckpointError(f"a quantized model ({self.quantization}) cannot be saved; save the original")
        config = self.config.replace(extra={**self.config.extra, "dtype": str(self.dtype).removeprefix("torch.")})
        write_safetensors(formats.to_hf(self.state_dict(), self.config), folder / SAFETENSORS_NAME)
        config.save_pretrained(folder)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _build(cls, state_dict, config, layout, source, consume, **model_kwargs):
    """The model, and the layout's extra tensors the file held (Meta's RoPE periods, for one)."""
    with torch.device("meta"):
        model = cls(config, **model_kwargs)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected, optional = formats.expected_shapes(ours, config, layout)
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if layout == "hf":  # current Transformers' in-memory names carry a "model." prefix
        found = formats.normalize_hf_keys(found)
    hint = f"(read as the {formats.LAYOUT_NAMES[layout]} layout of a {config.model_type} model)"
    recognize.check_shapes(found, expected, optional, source, hint=hint)
    weights, extras = formats.to_dino3(state_dict, ours, config, layout, consume=consume)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval(), extras


@dataclass
class Inspected:
    """A checkpoint, understood without reading its tensors: its config, layout and tensor shapes, and
    a function that reads the tensors (floating ones cast to the dtype asked for)."""

    checkpoint: Checkpoint
    config: _Config
    preset: Preset | None
    layout: str
    shapes: dict[str, tuple[int, ...]]
    stored_dtype: torch.dtype | None  # the dtype of the file's floating tensors
    read: Callable[[], dict[str, torch.Tensor]]
    config_from: str = "config.json"  # or "given", "preset" (shapes and name), "tensors" (no preset fits)

    @property
    def source(self) -> str:
        return self.checkpoint.source


def inspect_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    config: _Config | str | os.PathLike | None = None,
    dtype: torch.dtype | str = DEFAULT_DTYPE,
    device: torch.device | None = None,
    check_hash: bool = True,
    hub: HubOptions | None = None,
) -> Inspected:
    """Find a checkpoint and say what it is, reading only headers (see `Inspected`). A config that
    the file's shapes contradict is refused here, before any model is built."""
    checkpoint = resolve(name_or_path, hub)
    if checkpoint.config is not None:  # a folder or hub repo in the Hugging Face layout
        layout, config, preset = "hf", checkpoint.config, checkpoint.preset
        files = checkpoint.weight_files
        shapes, stored = header_shapes(files), header_dtype(files)
        model_type = recognize.detect_layout(shapes)[1]
        if dtype == "auto":  # the dtype config.json names, else the one the file stores; float16 as float32
            named = config.extra.get("dtype") or config.extra.get("torch_dtype")
            dtype = _not_half(_DTYPE_ALIASES.get(str(named)) or stored or torch.float32)
        read = lambda: read_safetensors(files, dtype=dtype, device=_read_device(device))  # noqa: E731
    else:  # one weights file: its keys say the layout, its shapes (or `config`) the architecture
        file = checkpoint.weight_files[0]
        shapes, stored, read = _open_weights_file(file, dtype, check_hash)
        layout, model_type = recognize.detect_layout(shapes)
        config, preset, config_from = _config_for_file(shapes, layout, model_type, file, config)
        recognize.check_config(config, shapes, layout, model_type, checkpoint.source)
        return Inspected(checkpoint, config, preset, layout, shapes, stored, read, config_from)
    recognize.check_config(config, shapes, layout, model_type, checkpoint.source)
    return Inspected(checkpoint, config, preset, layout, shapes, stored, read)


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    cls: type | None = None,
    config: _Config | str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    quantize: str | None = None,
    check_hash: bool = True,
    rope_periods: str = "exact",
    hub: HubOptions | None = None,
    **model_kwargs: Any,
):
    """Load any DINOv3 checkpoint as a dino3 model (of class `cls`, or the one its config names).

    config: for a single weights file without config.json: a config, a preset name or a config.json
        path; otherwise the shapes and the file name must match a known checkpoint.
    dtype: float32 (the default), bfloat16 or "auto" (the checkpoint's own dtype; float16 files load
        as float32). float16 is refused: DINOv3 overflows in it (see FP16_MESSAGE).
    device: where the model goes ("cpu", "cuda", ...).
    device_map: "auto" puts the model on the GPU when there is one with room for it, else on the CPU.
        Splitting one model over several devices is not supported.
    quantize: "int8-dynamic", "int8-weight" or "int4-weight" (see dino3.quantize).
    check_hash: check the SHA-256 prefix of Meta's own file names (`dinov3_vits16_..._-08c60483.pth`).
    rope_periods: "exact" computes the RoPE frequencies in fp32, as Transformers does; "checkpoint"
        uses the bf16-rounded `rope_embed.periods` of a Meta file, as Meta's own code does (outputs
        then differ from Transformers' by about 1e-3; see the README).
    hub: how to reach the hub; or pass token=, revision=, cache_dir=, local_files_only= directly.
    """
    from ..quantization import check_mode

    model_kwargs = transformers_arguments({"dtype": dtype, **model_kwargs})  # from_pretrained comes straight here
    dtype = model_kwargs.pop("dtype")
    if hub is None:  # token=, revision=, cache_dir=, local_files_only= may come as plain keywords
        hub = HubOptions.pop_from(model_kwargs)
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    if rope_periods not in ROPE_PERIODS:
        raise ValueError(f"rope_periods must be one of {ROPE_PERIODS}, got {rope_periods!r}")
    if quantize is not None:
        check_mode(quantize)
    if device_map is not None and device_map != "auto":
        raise ValueError(
            f"device_map={device_map!r}: dino3 places a whole model on one device; use device_map='auto' or device=..."
        )
    if device_map is not None and device is not None:
        raise ValueError("pass device or device_map, not both")

    found = inspect_checkpoint(name_or_path, config=config, dtype=dtype, device=device, check_hash=check_hash, hub=hub)
    config, layout = found.config, found.layout
    target = model_class_for(config)
    if cls is not None and cls is not target:
        raise CheckpointError(
            f"{found.source} is a {config.model_type} checkpoint, not {cls.config_class.model_type}; "
            "load it with dino3.load(), which picks the model class from the config"
        )
    # Every name and shape is checked before a byte of tensor data is read.
    ours = parameter_shapes(config, **model_kwargs)
    expected, optional = formats.expected_shapes(ours, config, layout)
    shapes = formats.normalize_hf_keys(found.shapes) if layout == "hf" else found.shapes
    hint = f"(read as the {formats.LAYOUT_NAMES[layout]} layout of a {config.model_type} model)"
    recognize.check_shapes(shapes, expected, optional, found.source, hint=hint)

    state_dict = found.read()
    if device_map is not None:
        first = next(v for v in state_dict.values() if v.is_floating_point())
        device = _auto_device(config, first.dtype, **model_kwargs)
    model, extras = _build(target, state_dict, config, layout, found.source, True, **model_kwargs)
    if device is not None:
        model.to(device)
    if rope_periods == "checkpoint":
        if "rope_embed.periods" not in extras:
            raise CheckpointError("rope_periods='checkpoint' needs a Meta checkpoint with rope_embed.periods")
        model.rope.use_periods(extras["rope_embed.periods"])
    if quantize is not None:
        from ..quantization import quantize as quantize_model

        quantize_model(model, quantize)
    note = system.precision_note(model.dtype, model.device)
    if note is not None:
        system.say_once(note)
    model.preset = found.preset
    model.name_or_path = str(name_or_path)
    model.source_layout = layout
    model.weight_files = list(found.checkpoint.weight_files)
    return model


def _not_half(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _open_weights_file(path: str, dtype, check_hash: bool):
    """(shapes, stored dtype, read) of a single weights file: its tensor shapes and floating dtype,
    known without reading the data, and a function that reads the tensors, floating ones cast to
    `dtype` ("auto": as stored, float16 as float32)."""
    if path.lower().endswith(".safetensors"):
        shapes, stored = header_shapes([path]), header_dtype([path])
        if dtype == "auto":
            dtype = _not_half(stored or torch.float32)
        return shapes, stored, lambda: read_safetensors([path], dtype=dtype)
    name = os.path.basename(path)
    official = preset_for_meta_file(name)
    if check_hash and official is not None:  # only Meta's own file names carry a hash
        check_file_hash(path, official.meta_hash)
    try:
        state_dict = recognize.unwrap(read_torch_file(path))
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(path) else f"{path}: {message}") from None
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    stored = next((v.dtype for v in state_dict.values() if v.is_floating_point()), None)

    def read():
        out = {}
        for key in list(state_dict):  # cast one by one, dropping the memory map's view as it goes
            tensor = state_dict.pop(key)
            want = dtype if dtype != "auto" else _not_half(tensor.dtype)
            out[key] = tensor.to(want) if tensor.is_floating_point() else tensor
        return out

    return shapes, stored, read


def _config_for_file(shapes, layout: str, model_type: str, file: str, config):
    """(config, preset, where the config came from) for a bare weights file: the one given, the
    config.json beside a Hugging Face file, or what its shapes and name say (see infer_config)."""
    if isinstance(config, _Config):
        return config, None, "given"
    if isinstance(config, (str, os.PathLike)) and str(config).endswith(".json"):
        if not Path(config).is_file():
            raise CheckpointError(f"config: no such file {config}")
        return read_config(config), None, "given"
    if isinstance(config, str):
        preset = get_preset(config)
        return preset.make_config(), preset, "given"
    if config is not None:
        raise TypeError(f"config must be a config, a preset name or a config.json path, got {type(config).__name__}")
    beside = Path(file).parent / CONFIG_NAME
    if layout == "hf" and beside.is_file():
        return read_config(beside), None, "config.json"
    config, preset = recognize.infer_config(shapes, layout, model_type, Path(file).name)
    return config, preset, "preset" if preset is not None else "tensors"


def _auto_device(config: _Config, dtype: torch.dtype, **model_kwargs: Any) -> torch.device:
    """The device `device_map="auto"` means: the GPU when one has room for the model, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    size = sum(_numel(s) for s in parameter_shapes(config, **model_kwargs).values()) * dtype.itemsize
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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _read_device(device: torch.device | None) -> str:
    # safetensors reads straight to a CUDA device; anything else is read on the CPU and moved.
    if device is not None and device.type == "cuda":
        return str(device)
    return "cpu"
