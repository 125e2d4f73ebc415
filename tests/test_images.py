"""The image loader: every kind of input, every PIL mode, and a clear error for every bad input."""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino3 import images
from dino3.images import ImageError, load_image, load_images

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
CAT = PHOTOS / "chelsea.png"


def rgb_array(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# -- sources ----------------------------------------------------------------------------------------
def test_every_source_kind_gives_the_same_pixels():
    expected = torch.from_numpy(np.asarray(Image.open(CAT).convert("RGB")).copy()).permute(2, 0, 1)
    sources = [str(CAT), CAT, CAT.read_bytes(), io.BytesIO(CAT.read_bytes()), Image.open(CAT)]
    sources += [np.asarray(Image.open(CAT)), expected.clone()]  # an HWC array, a CHW tensor
    for source in sources:
        got = load_image(source)
        assert got.dtype == torch.uint8 and got.shape == (3, 300, 451), type(source)
        assert torch.equal(got, expected), type(source)
    assert len(load_images(sources)) == len(sources)
    assert len(load_images(str(CAT))) == 1


def test_float_and_uint16_arrays_keep_their_precision():
    values = np.random.default_rng(1).random((5, 7, 3), dtype=np.float32)
    got = load_image(values)
    assert got.dtype == torch.float32 and torch.allclose(got, torch.from_numpy(values).permute(2, 0, 1))
    wide = (values * 65535).astype(np.uint16)
    assert torch.allclose(load_image(wide), torch.from_numpy(wide.astype(np.float32) / 65535).permute(2, 0, 1))
    gray = load_image(torch.rand(9, 4))  # HW tensor
    assert gray.shape == (3, 9, 4) and torch.equal(gray[0], gray[2])


def test_url(tmp_path):
    (tmp_path / "cat.png").write_bytes(CAT.read_bytes())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert torch.equal(load_image(f"{base}/cat.png"), load_image(CAT))
        with pytest.raises(ImageError, match=r"cat.jpg: download failed with HTTP 404"):
            load_image(f"{base}/cat.jpg")
        limit = images.MAX_DOWNLOAD_BYTES
        images.MAX_DOWNLOAD_BYTES = 1000
        try:
            with pytest.raises(ImageError, match="larger than 1000 bytes, the download limit"):
                load_image(f"{base}/cat.png")
        finally:
            images.MAX_DOWNLOAD_BYTES = limit
    finally:
        server.shutdown()


# -- modes ------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied():
    image = Image.fromarray(rgb_array(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(encode(image, "JPEG", exif=exif))
    assert loaded.shape == (3, 40, 20)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_pils_pixels(orientation):
    """Pixel for pixel what PIL's exif_transpose shows, for the 8 orientations (mirrors included)."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(rgb_array(5, 7, seed=orientation)), "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = load_image(data).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert got.shape[:2] == ((7, 5) if orientation in (5, 6, 7, 8) else (5, 7))


def test_grayscale_and_bitmap_become_three_equal_channels():
    for mode in ("L", "1"):
        image = Image.fromarray(rgb_array()).convert(mode)
        got = load_image(encode(image, "PNG"))
        assert got.shape == (3, 6, 8) and torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])


def test_transparency_is_composited_on_white_or_dropped():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half
    rgba[:, 2:, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    white = load_image(encode(image, "PNG"))
    assert white[:, 0, 0].tolist() == [255, 255, 255] and white[:, 0, 3].tolist() == [200, 0, 0]
    dropped = load_image(encode(image, "PNG"), alpha="drop")
    assert dropped[:, 0, 0].tolist() == [200, 0, 0]
    assert load_image(np.asarray(image))[:, 0, 0].tolist() == [255, 255, 255]  # RGBA arrays too
    palette = image.convert("P")  # palette with a transparent entry
    assert load_image(encode(palette, "PNG")).shape == (3, 4, 4)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert load_image(encode(la, "PNG"))[:, 0, 0].tolist() == [255, 255, 255]


def test_cmyk_and_16_bit_and_float_images():
    cmyk = Image.fromarray(rgb_array()).convert("CMYK")
    assert load_image(encode(cmyk, "JPEG")).shape == (3, 6, 8)
    deep = np.array([[0, 257, 65535]], dtype=np.uint16)
    got = load_image(encode(Image.fromarray(deep), "PNG"))  # mode I;16: PIL's RGB conversion would clip it
    assert got.dtype == torch.float32 and torch.allclose(got[0, 0], torch.tensor([0.0, 257 / 65535, 1.0]))
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), "F")
    assert torch.allclose(load_image(encode(floats, "TIFF"))[1, 0], torch.tensor([0.0, 0.25, 1.0]))


# -- bad inputs -------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")


def test_folder(tmp_path):
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image PIL can read"):
        load_image(tmp_path / "notes.jpg")


def test_truncated_image(tmp_path):
    data = encode(Image.fromarray(rgb_array(200, 200)), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: the image data is truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")
    png = encode(Image.fromarray(rgb_array(200, 200)), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(png[: len(png) // 2])


def test_decompression_bomb(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"451x300 = 0 megapixels is over the limit.*raise dino3.images.MAX_PIXELS"):
        load_image(CAT)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 4, 4, 3), np.uint8), r"array of shape \(2, 4, 4, 3\): an image must be HWC or HW"),
        (np.zeros((4, 4, 2), np.uint8), r"expected \(H, W, C\) with 1, 3 or 4 channels"),
        (np.zeros((4, 4, 3), np.int64), "dtype torch.int64: use uint8"),
        (np.full((4, 4, 3), 255.0, np.float32), r"float pixels must lie in \[0, 1\], found \[255, 255\]"),
        (np.zeros((0, 4, 3), np.uint8), "the image is empty"),
        (torch.zeros(5, 4, 3), r"tensor of shape \(5, 4, 3\): expected \(C, H, W\)"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_unknown_source_type():
    with pytest.raises(ImageError, match="<int>: not an image source; pass a path, URL"):
        load_image(42)
