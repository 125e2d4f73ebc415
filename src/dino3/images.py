"""Anything image-like -> an RGB image tensor, or an ImageError that names the input and the reason.

Accepted: a path (str or pathlib.Path), an http(s) URL, bytes, a binary file object, a PIL image, a
numpy array (HWC or HW; uint8, uint16, or float in [0, 1]), a torch tensor (CHW or HW, same dtypes),
and lists of these. Every image comes out as a (3, H, W) tensor: uint8 for 8-bit sources, float32
in [0, 1] for 16-bit grayscale and float sources (so no precision is thrown away).

Conversions: the EXIF orientation is applied; grayscale and bitmap are repeated to three channels;
palette, CMYK, YCbCr and the like go through PIL's RGB conversion; 16-bit grayscale keeps its
precision (16-bit colour PNGs are read by PIL at 8 bits per channel, as Transformers' loader reads
them). Transparent images (RGBA, LA, palette with transparency) are composited on white by default,
as Transformers' image processor does with `do_convert_rgb`; `alpha="drop"` throws the alpha channel
away instead, as Transformers' pipeline (`load_image`, PIL's `convert("RGB")`) does.

Whatever goes wrong with one input (a truncated file, a corrupt EXIF block, a header PIL cannot
parse, an image too large to decode safely) is an ImageError about that input, never another
exception. Nothing here changes process-wide state (warning filters, PIL's limits), so that decoding
threads and the user's own code never see each other's settings.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError, ImageTooLargeError

# Larger images are refused before they are decoded: 12k x 12k by default. Raise it for trusted
# sources (a gigapixel scan); it guards against decompression bombs. PIL refuses images over twice
# its own PIL.Image.MAX_IMAGE_PIXELS (179 MP by default) whatever this says: raise both to go beyond.
MAX_PIXELS = 144_000_000
MAX_DOWNLOAD_BYTES = 100 * 2**20
URL_TIMEOUT_SECONDS = 30.0  # for a whole download, however slowly the server sends it
ALPHA_MODES = ("white", "drop")


@dataclass
class Opened:
    """A source opened far enough to know its size, before its pixels are decoded."""

    name: str
    size: tuple[int, int]  # (width, height)
    image: Any = None  # a PIL image, not yet loaded
    array: Any = None  # or a (3, H, W) tensor, for array and tensor sources


def load_images(sources: Any, *, alpha: str = "white", draft_size: tuple[int, int] | None = None) -> list:
    """Each source (or the single one) as a (3, H, W) tensor; see `load_image`."""
    if isinstance(sources, (list, tuple)):
        return [load_image(s, alpha=alpha, draft_size=draft_size) for s in sources]
    return [load_image(sources, alpha=alpha, draft_size=draft_size)]


def load_image(
    source: Any,
    *,
    alpha: str = "white",
    draft_size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    cancel: threading.Event | None = None,
):
    """One image-like `source` as a (3, H, W) tensor (uint8, or float32 in [0, 1]).

    alpha: "white" composites transparent images on white; "drop" discards the alpha channel.
    draft_size: (height, width) that the image will be resized to. A JPEG much larger than that is
        then decoded at a reduced scale (1/2, 1/4 or 1/8, never below draft_size): much faster, with
        slightly different pixels. None (the default) decodes at full size.
    max_pixels: refuse larger images (default: dino3.images.MAX_PIXELS).
    cancel: an event that stops a download in progress (within about a second) when set.
    """
    return decode(open_image(source, draft_size=draft_size, max_pixels=max_pixels, cancel=cancel), alpha=alpha)


def open_image(
    source: Any,
    *,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    cancel: threading.Event | None = None,
) -> Opened:
    """Open a source far enough to know its size (the header of a file); see `load_image`."""
    import torch

    if isinstance(source, torch.Tensor):
        array = _from_array(source.detach().cpu(), "tensor", channels_first=True)
        return Opened("tensor", (array.shape[2], array.shape[1]), array=array)
    if isinstance(source, np.ndarray):
        array = np.ascontiguousarray(source)
        array = array if array.flags.writeable else array.copy()  # torch wants writable memory
        tensor = _from_array(torch.from_numpy(array), "array", channels_first=False)
        return Opened("array", (tensor.shape[2], tensor.shape[1]), array=tensor)
    name = _describe(source)
    try:
        image = _open_pil(source, name, cancel)
        width, height = image.size
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001  (PIL's parsers raise anything on hostile headers)
        raise ImageError(f"{name}: cannot be read as an image ({type(e).__name__}: {_first_line(e)})") from None
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if width * height > limit:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height / 1e6:.0f} megapixels is over the limit of "
            f"{limit / 1e6:.0f} (a guard against decompression bombs); if you trust this image, "
            "raise dino3.images.MAX_PIXELS"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name}: the image is empty ({width}x{height})")
    if draft_size is not None and image.format == "JPEG":
        try:  # ask the JPEG decoder for a reduced scale that still covers the target size
            image.draft("RGB", _draft_request(image.size, draft_size))
        except Exception as e:  # noqa: BLE001
            raise ImageError(f"{name}: cannot be decoded ({type(e).__name__}: {_first_line(e)})") from None
    return Opened(name, image.size, image=image)


def decode(opened: Opened, *, alpha: str = "white"):
    """The pixels of an opened source as a (3, H, W) tensor, EXIF orientation applied."""
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    if opened.array is not None:
        return opened.array
    from PIL import ImageOps

    try:
        image = opened.image
        image.load()
        image = ImageOps.exif_transpose(image)
        return _from_pil(image, opened.name, alpha)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{opened.name}: not enough memory to decode it ({opened.size[0]}x{opened.size[1]})") from None
    except Exception as e:  # noqa: BLE001  (truncated data, corrupt EXIF, unsupported content, ...)
        raise ImageError(
            f"{opened.name}: the image data is truncated or corrupt ({type(e).__name__}: {_first_line(e)})"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else "no details"


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", None) or f"<{type(source).__name__}>")


def _open_pil(source: Any, name: str, cancel: threading.Event | None):
    """A PIL image, opened (its header read) but not decoded."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    stream = _stream(source, name, cancel)
    try:
        return Image.open(stream)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image PIL can read (unknown or unsupported format)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{name}: PIL refuses to decode it ({_first_line(e)}); if you trust this image, raise "
            "PIL.Image.MAX_IMAGE_PIXELS and dino3.images.MAX_PIXELS"
        ) from None


def _draft_request(size: tuple[int, int], draft_size: tuple[int, int]) -> tuple[int, int]:
    # PIL's draft keeps the decoded size >= the requested (width, height), whatever the orientation
    # (EXIF rotation comes after decoding), so ask for the target's larger side in both directions.
    side = max(draft_size)
    return (min(side, size[0]), min(side, size[1]))


def _stream(source: Any, name: str, cancel: threading.Event | None):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text.startswith(("http://", "https://")):
            return io.BytesIO(download(text, cancel=cancel))
        path = Path(text).expanduser()
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
        if stat.S_ISDIR(mode):
            raise ImageError(f"{name}: is a folder, not an image file")
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            raise ImageError(f"{name}: not a regular file (a pipe, socket or device)")
        return path  # PIL opens it, and closes it once the pixels are loaded
    raise ImageError(
        f"{name}: not an image source; pass a path, URL, bytes, file object, PIL image, numpy array or torch tensor"
    )


def download(
    url: str,
    *,
    max_bytes: int | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> bytes:
    """The bytes at an http(s) URL, within a deadline for the whole download (not per read) and a
    size limit; `cancel` stops it within about a second."""
    import urllib.error
    import urllib.request

    max_bytes = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    budget = URL_TIMEOUT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + budget
    request = urllib.request.Request(url, headers={"User-Agent": "dino3"})
    chunks, total = [], 0
    try:  # each read waits at most 10 s for data; the deadline bounds the whole download
        with urllib.request.urlopen(request, timeout=min(10.0, budget)) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageTooLargeError(_too_large(url, max_bytes))
            while True:
                if cancel is not None and cancel.is_set():
                    raise ImageError(f"{url}: download cancelled")
                if time.monotonic() > deadline:
                    raise ImageError(f"{url}: download took longer than {budget:.0f} s; gave up")
                chunk = response.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise ImageTooLargeError(_too_large(url, max_bytes))
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"{url}: download failed with HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        raise ImageError(f"{url}: the server sent nothing for 10 s; gave up") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"{url}: download failed ({reason})") from None
    return b"".join(chunks)


def _too_large(url: str, max_bytes: int) -> str:
    return f"{url}: larger than {max_bytes // 2**20} MiB, the download limit (dino3.images.MAX_DOWNLOAD_BYTES)"


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


class MemoryBudget:
    """A bound on the pixels being decoded and processed at once, shared by the decoding threads of
    one job: each image reserves its width x height before it is decoded and returns it when its
    pixels are ready. An image larger than the whole budget waits until it can run alone."""

    def __init__(self, pixels: int) -> None:
        self.capacity = max(1, int(pixels))
        self.used = 0
        self.condition = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, pixels: int, cancel: threading.Event | None = None):
        amount = min(max(1, int(pixels)), self.capacity)
        with self.condition:
            while self.used + amount > self.capacity:
                if cancel is not None and cancel.is_set():
                    raise ImageError("cancelled")
                self.condition.wait(timeout=0.5)
            self.used += amount
        try:
            yield
        finally:
            with self.condition:
                self.used -= amount
                self.condition.notify_all()
