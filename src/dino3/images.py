"""Anything image-like -> an RGB image tensor, or an error that names the input and the reason.

Accepted: a path (str or pathlib.Path), an http(s) URL, bytes, a binary file object, a PIL image, a
numpy array (HWC or HW; uint8, uint16, or float in [0, 1]), a torch tensor (CHW or HW, same dtypes),
and lists of these. Every image comes out as a (3, H, W) tensor: uint8 for 8-bit sources, float32
in [0, 1] for 16-bit and float sources (so no precision is thrown away).

Conversions: the EXIF orientation is applied; grayscale and bitmap are repeated to three channels;
palette, CMYK, YCbCr and the like go through PIL's RGB conversion; 16-bit images keep their
precision. Transparent images (RGBA, LA, palette with transparency) are composited on white by
default, as Transformers' image processor does with `do_convert_rgb`; `alpha="drop"` throws the
alpha channel away instead, as Transformers' pipeline (`load_image`, PIL's `convert("RGB")`) does.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Dino3Error

# Larger images are refused before they are decoded: 12k x 12k by default. Raise it for trusted
# sources (a gigapixel scan); it guards against decompression bombs.
MAX_PIXELS = 144_000_000
MAX_DOWNLOAD_BYTES = 100 * 2**20
URL_TIMEOUT_SECONDS = 20.0
ALPHA_MODES = ("white", "drop")


class ImageError(Dino3Error, ValueError):
    """An input that is not a usable image; the message names the input and the reason."""


def load_images(sources: Any, *, alpha: str = "white", draft_size: tuple[int, int] | None = None) -> list:
    """Each source (or the single one) as a (3, H, W) tensor; see `load_image`."""
    if isinstance(sources, (list, tuple)):
        return [load_image(s, alpha=alpha, draft_size=draft_size) for s in sources]
    return [load_image(sources, alpha=alpha, draft_size=draft_size)]


def load_image(source: Any, *, alpha: str = "white", draft_size: tuple[int, int] | None = None):
    """One image-like `source` as a (3, H, W) tensor (uint8, or float32 in [0, 1]).

    alpha: "white" composites transparent images on white; "drop" discards the alpha channel.
    draft_size: (height, width) that the image will be resized to. A JPEG much larger than that is
        then decoded at a reduced scale (1/2, 1/4 or 1/8, never below draft_size): much faster, with
        slightly different pixels. None (the default) decodes at full size.
    """
    import torch

    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    if isinstance(source, torch.Tensor):
        return _from_array(source.detach().cpu(), "tensor", channels_first=True)
    if isinstance(source, np.ndarray):
        array = np.ascontiguousarray(source)
        array = array if array.flags.writeable else array.copy()  # torch wants writable memory
        return _from_array(torch.from_numpy(array), "array", channels_first=False)
    return _from_pil(_open(source, draft_size), _describe(source), alpha)


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _open(source: Any, draft_size: tuple[int, int] | None):
    """A decoded PIL image with its EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image, name = source, "PIL image"
    else:
        name = _describe(source)
        stream = _stream(source, name)
        try:
            image = Image.open(stream)
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image PIL can read (unknown or unsupported format)") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot be read as an image ({e})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height / 1e6:.0f} megapixels is over the limit of "
            f"{MAX_PIXELS / 1e6:.0f} (a guard against decompression bombs); if you trust this image, "
            "raise dino3.images.MAX_PIXELS"
        )
    if draft_size is not None and image.format == "JPEG":
        # Ask the JPEG decoder for a reduced scale that still covers the target size.
        image.draft("RGB", _draft_request(image.size, draft_size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: the image data is truncated or corrupt ({e})") from None
    return image


def _draft_request(size: tuple[int, int], draft_size: tuple[int, int]) -> tuple[int, int]:
    # PIL's draft keeps the decoded size >= the requested (width, height), whatever the orientation
    # (EXIF rotation comes after decoding), so ask for the target's larger side in both directions.
    side = max(draft_size)
    return (min(side, size[0]), min(side, size[1]))


def _stream(source: Any, name: str):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text.startswith(("http://", "https://")):
            return io.BytesIO(_download(text))
        path = Path(text).expanduser()
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image file")
        return path  # PIL opens it, and closes it once the pixels are loaded
    raise ImageError(
        f"{name}: not an image source; pass a path, URL, bytes, file object, PIL image, numpy array or torch tensor"
    )


def _download(url: str) -> bytes:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "dino3"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_SECONDS) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"{url}: download failed with HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"{url}: download failed ({reason})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageError(
            f"{url}: larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB, the download limit "
            "(dino3.images.MAX_DOWNLOAD_BYTES)"
        )
    return data


def _from_pil(image, name: str, alpha: str):
    """PIL image of any mode -> (3, H, W) uint8, or float32 in [0, 1] for 16-bit and float modes."""
    import torch
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float32) / 65535.0
        if mode == "I" and (values.min() < 0 or values.max() > 1):
            raise ImageError(f"{name}: 32-bit integer pixels outside 0..65535 have no defined brightness scale")
        return torch.from_numpy(values)[None].expand(3, -1, -1).contiguous()
    if mode == "F":
        values = np.array(image, dtype=np.float32)
        _check_unit_range(values, name)
        return torch.from_numpy(values)[None].expand(3, -1, -1).contiguous()
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha and alpha == "white":
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _from_array(tensor, kind: str, channels_first: bool):
    """A numpy array (HWC / HW) or torch tensor (CHW / HW) -> (3, H, W) uint8 or float32 in [0, 1]."""
    import torch

    if tensor.ndim == 2:
        tensor = tensor[None] if channels_first else tensor[..., None]
    if tensor.ndim != 3:
        layout = "CHW or HW" if channels_first else "HWC or HW"
        raise ImageError(f"{kind} of shape {tuple(tensor.shape)}: an image must be {layout}")
    if not channels_first:
        tensor = tensor.permute(2, 0, 1)
    channels = tensor.shape[0]
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ImageError(f"{kind} of shape {tuple(tensor.shape)}: the image is empty")
    if channels not in (1, 3, 4):
        layout = "(C, H, W)" if channels_first else "(H, W, C)"
        raise ImageError(f"{kind} of shape {tuple(tensor.shape)}: expected {layout} with 1, 3 or 4 channels")
    if tensor.dtype == torch.uint8:
        pass
    elif tensor.dtype == torch.uint16:
        tensor = tensor.to(torch.float32) / 65535.0
    elif tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8) * 255
    elif tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
        _check_unit_range(tensor, kind)
    else:
        raise ImageError(f"{kind} of dtype {tensor.dtype}: use uint8 (0..255), uint16 or float in [0, 1]")
    if channels == 4:  # composite on white, the only reading an RGBA array has without a mode
        rgb, a = tensor[:3].float(), tensor[3:].float()
        scale = 255.0 if tensor.dtype == torch.uint8 else 1.0
        out = rgb * (a / scale) + scale * (1 - a / scale)
        tensor = out.round().to(torch.uint8) if tensor.dtype == torch.uint8 else out
    elif channels == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous()


def _check_unit_range(values, name: str) -> None:
    low, high = float(values.min()), float(values.max())
    if not (low >= 0.0 and high <= 1.0) or np.isnan(low) or np.isnan(high):
        raise ImageError(
            f"{name}: float pixels must lie in [0, 1], found [{low:.4g}, {high:.4g}]; pass uint8 for 0..255 values, "
            "or normalised tensors straight to the model"
        )
