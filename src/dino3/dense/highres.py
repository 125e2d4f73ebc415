"""Dense features at high resolution: an image -> its grid of patch features, with the geometry that
maps each patch back to the image's own pixels.

Meta's recipe (the PCA and foreground notebooks): the image resized so that its height is 768 px, the
aspect ratio kept and both sides a multiple of the patch (here each side is rounded to the nearest
multiple, `fit="resize"`, a stretch under half a patch; Meta's notebooks round the width down), and
the last layer's patch tokens after the final norm.

Memory. The torch backend's attention is PyTorch's SDPA, whose CPU and GPU kernels are
flash-attention kernels that never hold the T x T scores: a 2048 x 2048 image on ViT-B/16 (16,389
tokens) peaks at 1.5 GB (benchmarks/dense.py). The compiled runtimes hold scores: ONNX Runtime
computes attention as MatMul and Softmax and holds those of all heads (about 2.7 x heads x T^2 x 4
bytes, measured), OpenVINO a part of them that grows with T^2 (about a tenth of that, measured at
16,389 tokens: 3.4 GB in all for ViT-B/16 at 2048 px); beyond `max_attention_bytes` of it they are
refused, with what to use instead. `tiles=Tiling()` is Meta's sliding
window of the segmentation evaluation (512 px crops, stride 341 px, here 336 so that windows stay on
the patch grid): each window runs alone and overlapping patches are averaged; it bounds memory on
any backend, at the price of attention that sees only its window (benchmarks/dense.py measures the
cosine to full attention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BackendError, UsageError
from ..features import extract
from ..processing import DINOv3ViTImageProcessor

HEIGHT = 768  # Meta's notebooks
MAX_ATTENTION_BYTES = 4 * 2**30  # what a runtime that holds the attention scores may use for them
# What a runtime holds for attention, in copies of one layer's scores of all heads (measured on this
# project's CPU): ONNX Runtime's peak growth at 4,101 tokens, OpenVINO's at 16,389.
SCORE_COPIES = {"onnxruntime": 2.7, "openvino": 0.1}


@dataclass(frozen=True)
class Tiling:
    """Meta's sliding window: square crops of `crop` px every `stride` px (multiples of the patch)."""

    crop: int = 512
    stride: int = 336  # Meta's 341, rounded down to a multiple of 16 so that windows share one patch grid

    def windows(self, size: int, patch: int) -> list[int]:
        """Start offsets (px) of the windows along a side of `size` px; the last one ends at the border."""
        crop, stride = self._checked(patch)
        if size <= crop:
            return [0]
        count = (size - crop + stride - 1) // stride + 1
        return sorted({min(i * stride, size - crop) // patch * patch for i in range(count)})

    def _checked(self, patch: int) -> tuple[int, int]:
        if self.crop % patch or self.stride % patch or not 0 < self.stride <= self.crop:
            raise UsageError(
                f"tiles of {self.crop} px every {self.stride} px: both must be multiples of the patch ({patch} px), "
                "with 0 < stride <= crop"
            )
        return self.crop, self.stride


def processor_for(model: Any, height: int = HEIGHT, image_size: tuple[int, int] | None = None, **overrides):
    """The processor that gives an image of `image_size` (H0, W0) the height `height`, aspect kept,
    sides rounded to multiples of the patch (Meta's recipe); without image_size, a landscape one."""
    if not isinstance(height, int) or isinstance(height, bool) or height < 1:
        raise UsageError(f"height must be a whole number of pixels, got {height!r}")
    portrait = image_size is not None and image_size[0] > image_size[1]
    options = {"keep_aspect": "longer" if portrait else "shorter", "target_size": height, "fit": "resize"}
    return DINOv3ViTImageProcessor.for_model(model, **{**options, **overrides})


def attention_bytes(model: Any, height: int, width: int, batch: int = 1) -> int:
    """The bytes of one layer's attention scores for all heads (batch x heads x T x T in float32)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:  # ConvNeXt: no attention
        return 0
    h, w = config.grid_size(height, width)
    tokens = h * w + config.num_prefix_tokens
    return batch * heads * tokens * tokens * 4


def check_attention_memory(model: Any, height: int, width: int, limit: int = MAX_ATTENTION_BYTES) -> None:
    """Refuse (BackendError) a runtime whose attention would hold more than `limit` bytes here."""
    backend = getattr(model, "backend", "torch")
    if backend not in SCORE_COPIES:
        return
    need = int(attention_bytes(model, height, width) * SCORE_COPIES[backend])
    if need > limit:
        h, w = model.config.grid_size(height, width)
        tokens = h * w + model.config.num_prefix_tokens
        how = {
            "onnxruntime": "computes attention as MatMul and Softmax and holds the T x T scores of every head at once",
            "openvino": "holds a part of the T x T attention scores that grows with the square of the tokens",
        }[backend]
        other = " or OpenVINO" if backend == "onnxruntime" else ""
        raise BackendError(
            f"a {width}x{height} image is {tokens:,} tokens: {backend} {how}, about {need / 2**30:.1f} GiB "
            f"here (over the {limit / 2**30:.1f} GiB allowed). Use the torch backend (flash attention, no T x T "
            f"scores){other}, tiles (--tiles: 512 px windows), or a smaller --height"
        )


def dense_features(
    model: Any, pixels: torch.Tensor, tiles: Tiling | None = None, max_attention_bytes: int = MAX_ATTENTION_BYTES
) -> torch.Tensor:
    """(3, H, W) pixel values -> (h, w, D) float32 patch features of the last layer (after the final
    norm), over the whole image, or window by window with `tiles`."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise UsageError(f"pixels must be one (3, H, W) image, got {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    if tiles is not None:
        return tiled_features(model, pixels, tiles)
    check_attention_memory(model, height, width, max_attention_bytes)
    grid, _ = extract(model, pixels[None], "patches")  # (1, h, w, D)
    return grid[0].float().cpu()


def tiled_features(model: Any, pixels: torch.Tensor, tiles: Tiling = Tiling()) -> torch.Tensor:
    """(3, H, W) -> (h, w, D): each window's patch features, averaged where windows overlap."""
    patch = model.config.stride[0]
    height, width = pixels.shape[-2:]
    h, w = height // patch, width // patch
    total: torch.Tensor | None = None
    count = torch.zeros(h, w, 1)
    for top in tiles.windows(h * patch, patch):
        for left in tiles.windows(w * patch, patch):
            window = pixels[:, top : top + tiles.crop, left : left + tiles.crop]
            grid, _ = extract(model, window[None], "patches")  # (1, wh, ww, D)
            grid = grid[0].float().cpu()
            rows = slice(top // patch, top // patch + grid.shape[0])
            cols = slice(left // patch, left // patch + grid.shape[1])
            if total is None:
                total = torch.zeros(h, w, grid.shape[-1])
            total[rows, cols] += grid
            count[rows, cols] += 1
    return total / count


@dataclass
class DenseImage:
    """One image's dense features, and how they sit on the image."""

    name: str
    image: torch.Tensor  # (3, H0, W0): the image as decoded (uint8, or float in [0, 1])
    pixels: torch.Tensor  # (3, H, W) float32: what the model saw
    features: torch.Tensor  # (h, w, D) float32
    processor: DINOv3ViTImageProcessor

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[:2])

    def patch_centres(self) -> torch.Tensor:
        """(h, w, 2) float64: each patch's centre (x, y) in the original image's pixel coordinates
        (pixel (0, 0) is centred at (0, 0)), the resize, crop or pad undone."""
        return patch_centres(self.grid, tuple(self.image.shape[-2:]), self.processor)


def patch_centres(grid: tuple[int, int], image_size: tuple[int, int], processor: Any) -> torch.Tensor:
    """(h, w, 2) centres (x, y) of a patch grid in the pixels of the original (H0, W0) image that
    `processor` turned into it."""
    from ..processing import _output_size

    p = processor.patch_size
    H0, W0 = image_size
    top = left = 0
    if processor.keep_aspect is not None:
        rh, rw = processor.aspect_size(H0, W0)  # the resized size, before crop / pad
        if processor.fit == "crop":
            top, left = int((rh - max(p, rh // p * p)) / 2.0), int((rw - max(p, rw // p * p)) / 2.0)
    elif processor.do_resize:
        rh, rw = _output_size((H0, W0), processor.size)
        if processor.do_center_crop and processor.crop_size:
            top = int((rh - processor.crop_size["height"]) / 2.0)
            left = int((rw - processor.crop_size["width"]) / 2.0)
    else:
        rh, rw = H0, W0
    h, w = grid
    ys = ((torch.arange(h, dtype=torch.float64) + 0.5) * p + top) * (H0 / rh) - 0.5
    xs = ((torch.arange(w, dtype=torch.float64) + 0.5) * p + left) * (W0 / rw) - 0.5
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2)


def load_dense(
    model: Any,
    source: Any,
    height: int = HEIGHT,
    tiles: Tiling | None = None,
    max_attention_bytes: int = MAX_ATTENTION_BYTES,
    name: str | None = None,
    **processor_options: Any,
) -> DenseImage:
    """An image (anything dino3's image loader reads) -> its DenseImage at `height` px (Meta's recipe).
    processor_options (keep_aspect, target_size, fit, ...) replace the recipe's resize."""
    from ..images import load_image, named

    image = load_image(source)  # (3, H0, W0), EXIF orientation applied
    if name is None:
        name = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    if processor_options:
        processor = DINOv3ViTImageProcessor.for_model(model, **processor_options)
    else:
        processor = processor_for(model, height, tuple(image.shape[-2:]))
    pixels = processor.pixels(named(image, name))  # a refusal names the image, not "tensor"
    features = dense_features(model, pixels, tiles, max_attention_bytes)
    return DenseImage(name, image, pixels, features, processor)
