"""Reading and writing weight files: safetensors (single or sharded), tensor by tensor."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping

import torch

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]


_SAFETENSORS_DTYPES = {
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


def read_safetensors(
    files: Iterable[str | os.PathLike], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> StateDict:
    """All tensors of one or more safetensors files, floating ones cast to `dtype` as each is read.

    Each tensor is read straight into its own buffer (no memory map, whose pages would count twice
    while loading), then cast and moved one at a time: the peak stays near the final model's size.
    """
    out: StateDict = {}
    for file in files:
        for key, tensor in _read_safetensors_file(os.fspath(file), dtype):
            out[key] = tensor.to(device) if torch.device(device).type != "cpu" else tensor
    return out


def _read_safetensors_file(path: str, dtype: torch.dtype | None):
    """(name, tensor) for each tensor of a safetensors file, checked against the header. A tensor
    that must change dtype is read into one reused scratch buffer and cast from there, so that the
    reading leaves no freed buffers behind (they fragment the heap and raise the peak)."""

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
        if header_size > size - 8:
            raise corrupt(f"the header claims {header_size} bytes, the file has {size - 8}")
        try:
            header = json.loads(f.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"invalid header: {e}") from None
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if 8 + header_size + end != size:
            raise corrupt(f"the header describes {8 + header_size + end} bytes, the file has {size}")
        scratch = torch.empty(0, dtype=torch.uint8)
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            stored = _SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise corrupt(f"tensor {key} has dtype {info['dtype']}, which dino3 does not read")
            begin, stop = info["data_offsets"]
            cast = dtype is not None and stored.is_floating_point and stored != dtype
            if cast and scratch.numel() < stop - begin:
                scratch = torch.empty(stop - begin, dtype=torch.uint8)
            raw = scratch[: stop - begin] if cast else torch.empty(stop - begin, dtype=torch.uint8)
            f.seek(8 + header_size + begin)
            if f.readinto(memoryview(raw.numpy())) != stop - begin:
                raise corrupt(f"tensor {key} ends early")
            tensor = raw.view(stored).reshape(info["shape"])
            yield key, tensor.to(dtype) if cast else tensor


def safetensors_dtype(files: Iterable[str | os.PathLike]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor stored in the files (read from the header only)."""
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if key != "__metadata__" else None
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return None


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as Transformers does (metadata format=pt), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = f"{os.fspath(path)}.partial"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


# Meta's file names end in the first hex digits of the file's SHA-256, as torch.hub names them.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.(pth|pt)$")


def read_torch_file(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict:
    """A PyTorch checkpoint file (.pth / .pt / .bin), loaded with weights_only=True: tensors and plain
    containers only, never arbitrary objects. Floating tensors are cast to `dtype` one by one."""
    import pickle

    path = os.fspath(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(
            f"{path} holds objects other than tensors ({reason}). dino3 loads with weights_only=True "
            "and never unpickles arbitrary objects; if you trust the file, load it yourself and pass "
            "the state dict"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]}); it may be truncated "
            "or corrupt: download it again"
        ) from None
    if dtype is not None and isinstance(obj, dict):
        obj = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in obj.items()}
    return obj


def check_file_hash(path: str | os.PathLike) -> None:
    """If the file name carries a hash prefix (Meta's `...-08c60483.pth`), check the file's SHA-256."""
    match = _HASH_IN_NAME.search(os.path.basename(os.fspath(path)))
    if match is None:
        return
    expected = match.group(1)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    found = digest.hexdigest()
    if not found.startswith(expected):
        raise CheckpointError(
            f"{path}: its name says its SHA-256 starts with {expected}, but it starts with {found[: len(expected)]}. "
            "The file is corrupt or incomplete: download it again (or, if you renamed another file to this "
            "name, pass check_hash=False)"
        )


def read_weights_file(path: str | os.PathLike, dtype: torch.dtype | None = None, check_hash: bool = True) -> StateDict:
    """The state dict in a single weights file (.safetensors, or a PyTorch .pth / .pt / .bin)."""
    from .formats import unwrap

    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return read_safetensors([path], dtype=dtype)
    if check_hash:
        check_file_hash(path)
    try:
        return unwrap(read_torch_file(path, dtype))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
