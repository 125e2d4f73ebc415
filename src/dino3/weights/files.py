"""Weight files: safetensors (single or sharded) and PyTorch .pth, read strictly and tensor by tensor.

A safetensors header is checked whole before any tensor is read: every entry's dtype, shape and
offsets must agree with each other and with the file's size, so that a truncated, corrupt or hostile
file is refused with its name and the reason, and never makes dino3 allocate what the file does not
hold. Shapes can be read from the header alone (`header_shapes`), so that a loader checks them
against the model before reading a byte of data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .._io import atomic_path
from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # where the data section begins in the file


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The checked header of a safetensors file (see the module docstring)."""
    path = os.fspath(path)

    def corrupt(reason: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is not a readable safetensors file ({reason}). It may be truncated or corrupt: "
            "delete it and download or save it again."
        )

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise corrupt("shorter than its 8-byte header length")
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > size - 8 or header_size > MAX_HEADER_BYTES:
            raise corrupt(f"the header claims {header_size} bytes, the file has {size - 8}")
        raw = f.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"invalid header: {_first_line(e)}") from None
    except RecursionError:
        raise corrupt("the header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise corrupt(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map names to strings")
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        tensors[key] = _tensor_info(key, info, corrupt)
    # The tensors must tile the data section exactly, in offset order.
    position = 0
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            raise corrupt(f"tensor {key} starts at byte {info.begin}, where byte {position} was expected")
        position = info.end
    if 8 + header_size + position != size:
        raise corrupt(f"the header describes {8 + header_size + position} bytes, the file has {size}")
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + header_size)


def _tensor_info(key: str, info, corrupt) -> TensorInfo:
    if not isinstance(info, dict):
        raise corrupt(f"the entry of {key} is not an object")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise corrupt(f"tensor {key} has dtype {info.get('dtype')!r}, which dino3 does not read")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise corrupt(f"tensor {key} has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise corrupt(f"tensor {key} has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if end < begin or end - begin != nbytes:
        raise corrupt(
            f"tensor {key}: shape {shape} in {info['dtype']} needs {nbytes} bytes, its offsets give {end - begin}"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def header_shapes(files: Iterable[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in these safetensors files, read from their headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        for key, info in read_header(file).tensors.items():
            if key in shapes:
                raise CheckpointError(f"{file}: tensor {key} is also in another shard of this checkpoint")
            shapes[key] = info.shape
    return shapes


def header_dtype(files: Iterable[str | os.PathLike]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in the files (from the headers only)."""
    for file in files:
        for info in read_header(file).tensors.values():
            if info.dtype.is_floating_point:
                return info.dtype
    return None


def read_safetensors(
    files: Iterable[str | os.PathLike], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> StateDict:
    """All tensors of one or more safetensors files, floating ones cast to `dtype` as each is read.

    Each tensor is read straight into its own buffer (no memory map, whose pages would count twice
    while loading), then cast and moved one at a time: the peak stays near the final model's size.
    """
    out: StateDict = {}
    move = torch.device(device).type != "cpu"
    for file in files:
        for key, tensor in _read_tensors(read_header(file), dtype):
            out[key] = tensor.to(device) if move else tensor
    return out


def _read_tensors(header: SafetensorsHeader, dtype: torch.dtype | None):
    """(name, tensor) for each tensor, in file order. A tensor that must change dtype is read into one
    reused scratch buffer and cast from there, so that the reading leaves no freed buffers behind
    (they fragment the heap and raise the peak)."""
    scratch = torch.empty(0, dtype=torch.uint8)
    with open(header.path, "rb") as f:
        for key, info in sorted(header.tensors.items(), key=lambda item: item[1].begin):
            count = info.end - info.begin
            cast = dtype is not None and info.dtype.is_floating_point and info.dtype != dtype
            if cast and scratch.numel() < count:
                scratch = torch.empty(count, dtype=torch.uint8)
            raw = scratch[:count] if cast else torch.empty(count, dtype=torch.uint8)
            f.seek(header.data_start + info.begin)
            if count and f.readinto(memoryview(raw.numpy())) != count:
                raise CheckpointError(f"{header.path}: tensor {key} ends early; the file is truncated")
            tensor = raw.view(info.dtype).reshape(info.shape)
            yield key, tensor.to(dtype) if cast else tensor


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write a state dict as Transformers does (metadata format=pt), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def write_torch_file(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict with torch.save, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)


def read_torch_file(path: str | os.PathLike):
    """A PyTorch checkpoint file (.pth / .pt / .bin), loaded with weights_only=True: tensors and plain
    containers only, never arbitrary objects. Zip files are memory-mapped (nothing is read yet)."""
    import pickle

    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty; download or save it again")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds objects other than tensors ({_first_line(e)}). dino3 loads with weights_only=True "
                "and never unpickles arbitrary objects; if you trust the file, load it yourself and pass "
                "the state dict"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(e)})") from None
    except MemoryError:
        raise CheckpointError(
            f"{path} declares more data than fits in memory; it is corrupt or not a checkpoint"
        ) from None
    except Exception as e:  # noqa: BLE001  (the unpickler raises anything on a file that is not one)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); it may be "
            "truncated or corrupt: download it again"
        ) from None


def check_file_hash(path: str | os.PathLike, expected_prefix: str) -> None:
    """Check that the file's SHA-256 starts with `expected_prefix` (Meta's names carry 8 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    found = digest.hexdigest()
    if not found.startswith(expected_prefix):
        raise CheckpointError(
            f"{path}: its name says its SHA-256 starts with {expected_prefix}, but it starts with "
            f"{found[: len(expected_prefix)]}. The file is corrupt or incomplete: download it again (or, if you "
            "renamed another file to this name, pass check_hash=False / --no-hash-check)"
        )
