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


def read_safetensors(
    files: Iterable[str | os.PathLike], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> StateDict:
    """All tensors of one or more safetensors files, floating ones cast to `dtype` as each is read,
    so that no full-precision copy of the whole checkpoint is ever held."""
    from safetensors import SafetensorError, safe_open

    out: StateDict = {}
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    out[key] = tensor
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({e}). It may be truncated or corrupt: "
                "delete it and download or save it again."
            ) from None
    return out


def safetensors_dtype(files: Iterable[str | os.PathLike]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor stored in the files (read from the header only)."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in names:
                return names[info["dtype"]]
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
