"""The image loader: every kind of input, every PIL mode, and a clear error for every bad input."""

from __future__ import annotations

import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino3 import fetch, images
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
        limit = fetch.MAX_DOWNLOAD_BYTES
        fetch.MAX_DOWNLOAD_BYTES = 1000
        try:
            with pytest.raises(ImageError, match="larger than 1000 bytes, the download limit"):
                load_image(f"{base}/cat.png")
        finally:
            fetch.MAX_DOWNLOAD_BYTES = limit
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
        (np.zeros((4, 0, 3), np.uint8), r"array of shape \(3, 4, 0\): the image is empty"),  # no width
        (torch.zeros(3, 4, 0), r"tensor of shape \(3, 4, 0\): the image is empty"),
        (np.full((2, 2, 3), 0.5, np.float32) * np.array([1, 1, np.nan], np.float32), r"found \[nan, nan\]"),
        (torch.zeros(5, 4, 3), r"tensor of shape \(5, 4, 3\): expected \(C, H, W\)"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_unknown_source_type():
    with pytest.raises(ImageError, match="<int>: not an image source; pass a path, URL"):
        load_image(42)


# -- odd modes: 32-bit integers and floats (attacker findings) ------------------------------------------
def test_32_bit_integer_images_holding_8_bit_values_are_read_as_8_bit(tmp_path):
    """Bug pinned: a 32-bit "I" image holding 0..255 (PIL's own convert("I") of a grey image) divided
    by 65535: black. Read as PIL's conversions (and Transformers' loader) read it."""
    grey = np.array([[0, 50, 128, 255]], dtype=np.uint8)
    Image.fromarray(grey).convert("I").save(tmp_path / "grey.tif")
    with Image.open(tmp_path / "grey.tif") as opened:
        assert opened.mode == "I"
    got = load_image(tmp_path / "grey.tif")
    assert got.dtype == torch.uint8 and got[:, 0].tolist() == [[0, 50, 128, 255]] * 3
    wide = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))  # 16-bit values in 32 bits
    assert torch.allclose(load_image(wide)[0, 0], torch.tensor([0.0, 1000 / 65535, 1.0]))
    with pytest.raises(ImageError, match=r"32-bit integer pixels in \[0, 70000\]"):
        load_image(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_a_float_tiff_outside_0_1_is_refused_with_advice_for_a_file(tmp_path):
    """Bug pinned: a float TIFF refused with advice for tensors ("pass normalised tensors straight to
    the model"), which a user with a file cannot follow."""
    Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32), "F").save(tmp_path / "depth.tif")
    with pytest.raises(ImageError) as refused:
        load_image(tmp_path / "depth.tif")
    message = str(refused.value)
    assert "depth.tif" in message and "rescale it into [0, 1], or save it as an 8- or 16-bit image" in message
    assert "tensor" not in message


def test_a_decoded_image_keeps_its_name_in_messages(tmp_path):
    """Bug pinned: `dino3 match` on a 1 x 60000 image named the input "tensor" (the image is decoded
    before the processor sees it): images.named keeps the file's name."""
    from dino3.images import named
    from dino3.processing import DINOv3ViTImageProcessor

    thin = torch.zeros(3, 1, 60000, dtype=torch.uint8)
    processor = DINOv3ViTImageProcessor(keep_aspect="shorter", target_size=768)
    with pytest.raises(ImageError, match=r"^thin\.png: 60000x1 px would be resized"):
        processor.pixels(named(thin, "thin.png"))


# -- the one fetcher ----------------------------------------------------------------------------------
def test_data_urls_and_fetch_bytes_of_every_kind(tmp_path):
    import base64

    data = CAT.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert fetch.fetch_bytes(url) == data and fetch.fetch_bytes(CAT) == data
    assert torch.equal(load_image(url), load_image(CAT))
    assert fetch.fetch_bytes("data:text/plain,a%20b") == b"a b"
    with pytest.raises(ImageError, match="is not valid base64"):
        fetch.fetch_bytes("data:image/png;base64,%%%")
    with pytest.raises(images.ImageTooLargeError, match="larger than 100 bytes"):
        fetch.fetch_bytes(CAT, max_bytes=100)
    with pytest.raises(ImageError, match="no such file"):
        fetch.fetch_bytes(tmp_path / "nope.png")


def test_object_storage_goes_through_pyarrow(tmp_path, monkeypatch):
    """s3:// and friends are read with pyarrow.fs (a local file system stands in for the bucket)."""
    pafs = pytest.importorskip("pyarrow.fs")
    (tmp_path / "cat.png").write_bytes(CAT.read_bytes())
    asked = []

    def from_uri(uri):
        asked.append(uri)
        return pafs.LocalFileSystem(), str(tmp_path / uri.rsplit("/", 1)[1])

    from types import SimpleNamespace

    import pyarrow

    stand_in = SimpleNamespace(FileSystem=SimpleNamespace(from_uri=from_uri), FileType=pafs.FileType)
    monkeypatch.setattr(pyarrow, "fs", stand_in)
    assert torch.equal(load_image("s3://bucket/photos/cat.png"), load_image(CAT))
    assert asked == ["s3://bucket/photos/cat.png"]
    with pytest.raises(ImageError, match="s3://bucket/gone.png: no such object"):
        fetch.fetch_bytes("s3://bucket/gone.png")
    with pytest.raises(images.ImageTooLargeError):
        fetch.fetch_bytes("s3://bucket/photos/cat.png", max_bytes=10)


def test_one_thumbnail_maker_for_every_kind_of_image(tmp_path):
    """make_thumbnail fits the image in size x size, and takes 16-bit images (float pixels) too."""
    jpeg = Image.open(io.BytesIO(images.make_thumbnail(CAT, 128)))
    assert jpeg.format == "JPEG" and max(jpeg.size) == 128 and jpeg.size == (128, 85)
    deep = (np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    small = Image.open(io.BytesIO(images.make_thumbnail(tmp_path / "deep.png", 64)))
    assert small.size == (64, 43) and np.asarray(small.convert("L"))[-1, -1] > 200


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers /redirect with a 302 to `location`, anything else with the cat; records each path."""

    hits: list[str]
    location = ""

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = CAT.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def recording_server():
    handler = type("Handler", (Recorder,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


PUBLIC = "93.184.216.34"  # a public address (example.com's); never actually reached by these tests


def test_a_rebinding_name_cannot_send_the_download_to_a_private_address(monkeypatch):
    """Bug pinned (attacker finding 4): the guard resolved the name, found it public, and then urllib
    resolved it again (a rebinding DNS answers 127.0.0.1 the second time) and fetched from the
    server's own network. The download must connect to the address that was checked."""
    import socket

    server, handler = recording_server()
    real_resolve, real_connect = socket.getaddrinfo, socket.create_connection
    answers = iter([PUBLIC])  # first answer public, every later one the loopback

    def resolve(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real_resolve(host, port, *args, **kwargs)
        address = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    def connect(address, *args, **kwargs):
        if address[0] == PUBLIC:
            raise ConnectionRefusedError("the public host is not there (no network in tests)")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "create_connection", connect)
    try:
        with pytest.raises(ImageError, match="download failed"):
            fetch.fetch_bytes(f"http://rebind.test:{server.server_port}/cat.png", public_only=True, timeout=5)
        assert handler.hits == []  # the server's own network was never reached
    finally:
        server.shutdown()


def test_every_redirect_hop_is_checked(monkeypatch):
    """Bug pinned (attacker finding 4): a public URL that answers 302 to http://127.0.0.1/... was
    followed unchecked, and the private resource fetched and embedded."""
    import socket

    public, _ = recording_server()
    private, private_handler = recording_server()
    public.RequestHandlerClass.location = f"http://127.0.0.1:{private.server_port}/secret.png"
    real_resolve, real_connect = socket.getaddrinfo, socket.create_connection

    def resolve(host, port, *args, **kwargs):
        if host == "public.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port))]
        return real_resolve(host, port, *args, **kwargs)

    def connect(address, *args, **kwargs):  # the "public" host is the first local server
        if address[0] in (PUBLIC, "public.test"):
            address = ("127.0.0.1", public.server_port)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "create_connection", connect)
    try:
        url = f"http://public.test:{public.server_port}"
        assert fetch.fetch_bytes(f"{url}/cat.png", public_only=True) == CAT.read_bytes()  # a public host works
        with pytest.raises(ImageError, match="127.0.0.1 is on a private network"):
            fetch.fetch_bytes(f"{url}/redirect", public_only=True)
        assert private_handler.hits == []
        assert fetch.fetch_bytes(f"{url}/redirect") == CAT.read_bytes()  # without the guard: followed
        # Bug pinned (issue 31, fresh pass 4, G-S1): a relative redirect (Location: /cat.png, as most
        # servers send) taken as it stands instead of joined to the URL: refused as "not http(s)".
        public.RequestHandlerClass.location = "/cat.png"
        assert fetch.fetch_bytes(f"{url}/redirect", public_only=True) == CAT.read_bytes()
    finally:
        public.shutdown()
        private.shutdown()


def test_line_wrapped_base64_is_read():
    """Bug pinned (issue 31, fresh pass 4, G-S2): base64 as encoders write it for mail and PEM, in
    lines of 76 characters, refused as "not valid base64" (in a JSON request or a data URL)."""
    import base64

    data = CAT.read_bytes()
    wrapped = base64.encodebytes(data).decode()  # 76 characters a line
    assert "\n" in wrapped and fetch.decode_base64(wrapped) == data
    assert fetch.fetch_bytes("data:image/png;base64," + wrapped.replace("\n", "\r\n")) == data
    with pytest.raises(ImageError, match="not valid base64"):
        fetch.decode_base64(wrapped[:-3] + "*==")


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "10.1.2.3", "localhost"],
)
def test_private_addresses_in_every_spelling_are_refused(host):
    with pytest.raises(ImageError, match="private network"):
        fetch.fetch_bytes(f"http://{host}:9/x.png", public_only=True)


def test_an_image_larger_than_the_whole_memory_budget_runs_alone():
    """Bug pinned (the fresh mutation pass of issue 31): the memory budget's reservation not capped at
    the budget: an image larger than all of it (a scan over --memory's pixels) waited for room
    that could never be, and the job hung. It waits only for the others to finish, then runs."""
    budget = images.MemoryBudget(100)
    entered = threading.Event()

    def large() -> None:
        with budget.reserve(250):
            entered.set()

    with budget.reserve(60):  # another image being decoded
        thread = threading.Thread(target=large, daemon=True)
        thread.start()
    assert entered.wait(10), "the large image never got its turn"
    thread.join(10)
    with budget.reserve(250):  # alone, at once
        assert budget.used == 100


class Unannounced(http.server.BaseHTTPRequestHandler):
    """Answers with `size` bytes whose length no header announces: /close ends the body by closing the
    connection (HTTP/1.0), /chunked sends it in chunks (HTTP/1.1 Transfer-Encoding: chunked)."""

    size = 0

    def do_GET(self):  # noqa: N802
        body = b"\xff" * self.size
        if self.path == "/chunked":
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for start in range(0, len(body), 8192):
                part = body[start : start + 8192]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_body_of_unannounced_length_is_held_to_the_size_limit_too():
    """Bug pinned (issue 31, fresh pass 3, F-S6): the download's limit checked only against the
    Content-Length header: a server that announces no length (a body ended by closing the connection,
    or sent chunked) had its whole body read into memory, whatever its size, and a client of `dino3
    serve` could make the server download gigabytes. Both kinds are refused past max_bytes."""
    handler = type("Handler", (Unannounced,), {"size": 200_000})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        for path in ("/close", "/chunked"):
            assert len(fetch.fetch_bytes(base + path, max_bytes=200_000)) == 200_000  # the server works
            with pytest.raises(images.ImageTooLargeError, match="larger than 100000 bytes"):
                fetch.fetch_bytes(base + path, max_bytes=100_000)
    finally:
        server.shutdown()


# -- edges of the loader (issue 31: each seen failing on a planted bug) -------------------------------
def test_the_pixel_limit_sits_on_its_boundary():
    """An image of exactly max_pixels is read; one pixel more is refused, naming size and limit."""
    w, h = 451, 300  # the cat
    assert images.open_image(CAT, max_pixels=w * h).size == (w, h)
    with pytest.raises(images.ImageTooLargeError, match=r"451x300 = 0 megapixels is over the limit"):
        images.open_image(CAT, max_pixels=w * h - 1)


def test_an_empty_pil_image_is_refused():
    for size in ((0, 5), (5, 0)):
        with pytest.raises(ImageError, match=rf"the image is empty \({size[0]}x{size[1]}\)$"):
            images.open_image(Image.new("RGB", size))


def test_a_reader_that_fails_is_an_image_error_naming_it():
    """Whatever PIL's parsers or the file object raise becomes an ImageError with the source's name."""

    class Broken(io.RawIOBase):
        name = "broken.png"

        def readinto(self, buffer):
            raise ValueError("boom")

    with pytest.raises(ImageError, match=r"^broken.png: cannot be read as an image \(ValueError: boom\)$"):
        load_image(Broken())


def test_a_failing_jpeg_draft_is_a_decode_error(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    path = tmp_path / "a.jpg"
    Image.fromarray(rgb_array(64, 64)).save(path)

    def fails(self, mode, size):
        raise OSError("draft refused")

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", fails)
    with pytest.raises(ImageError, match=r"a.jpg: cannot be decoded \(OSError: draft refused\)$"):
        load_image(path, draft_size=(16, 16))
    assert load_image(path).shape == (3, 64, 64)  # no draft asked: no draft made


def test_an_unknown_alpha_mode_is_refused():
    with pytest.raises(ValueError, match=r"alpha must be one of .*got 'black'"):
        images.decode(images.open_image(CAT), alpha="black")


def test_load_pil_keeps_the_mode_and_turns_the_image_upright(tmp_path):
    grey = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6))
    assert np.array_equal(np.asarray(images.load_pil(encode(grey, "PNG"))), np.asarray(grey))
    assert images.load_pil(encode(grey, "PNG")).mode == "L"
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 40))
    assert images.load_pil(encode(rgba, "PNG")).getpixel((0, 0)) == (10, 20, 30, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 6 wide, 4 high, shown 4 wide, 6 high
    assert images.load_pil(encode(grey, "JPEG", exif=exif)).size == (4, 6)
    with pytest.raises(ImageError, match=r"^array: an array, not an image file$"):
        images.load_pil(rgb_array())


def test_running_out_of_memory_while_decoding_is_an_image_error(monkeypatch):
    from PIL import ImageOps

    def no_memory(image):
        raise MemoryError

    monkeypatch.setattr(ImageOps, "exif_transpose", no_memory)
    with pytest.raises(ImageError, match=r"chelsea.png: not enough memory to decode it \(451x300\)$"):
        load_image(CAT)


def test_a_boolean_mask_array_is_black_and_white():
    mask = np.array([[True, False], [False, True]])
    pixels = load_image(mask)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 2, 2)
    assert pixels[:, 0, 0].tolist() == [255] * 3 and pixels[:, 0, 1].tolist() == [0] * 3


def test_a_memory_budget_wait_stops_when_cancelled():
    """A reservation waiting for room gives up with an ImageError once its cancel event is set; one
    that fits exactly beside the others does not wait."""
    budget = images.MemoryBudget(100)
    cancel, outcome = threading.Event(), []

    def wait():
        try:
            with budget.reserve(41, cancel):
                outcome.append("reserved")
        except ImageError as e:
            outcome.append(str(e))

    held = budget.reserve(60)
    held.__enter__()
    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    time.sleep(0.1)
    cancel.set()
    waiting.join(5)
    with budget.reserve(40, cancel):  # fits exactly beside the 60: not a wait, not cancelled
        assert budget.used == 100
    held.__exit__(None, None, None)
    waiting.join(5)
    assert outcome == ["cancelled"] and budget.used == 0


@pytest.mark.parametrize("mode", ["P", "L"])
def test_a_transparency_key_is_composited_on_white_like_an_alpha_channel(mode, tmp_path):
    """A palette or grey PNG whose transparency is a colour key (no alpha band: PIL keeps it in
    image.info) shows white where it is transparent, as an RGBA image does; alpha="drop" keeps the
    hidden colour. Planted: only an "A" band counted as transparency (the key's hidden colour shown)."""
    from PIL import Image

    from dino3.images import load_image

    image = Image.new(mode, (8, 4), 0)  # colour 0 (black) is the transparent one
    image.paste(7 if mode == "P" else 100, (4, 0, 8, 4))  # the other half opaque
    if mode == "P":
        image.putpalette([0, 0, 0] + [10, 20, 30] * 255)
    path = tmp_path / f"keyed-{mode}.png"
    image.save(path, transparency=0)
    assert "transparency" in Image.open(path).info and "A" not in Image.open(path).getbands()
    pixels = load_image(str(path))  # (3, H, W) uint8
    assert (pixels[:, :, :4] == 255).all()  # transparent: white
    opaque = torch.tensor([10, 20, 30] if mode == "P" else [100, 100, 100], dtype=torch.uint8)
    assert (pixels[:, :, 4:] == opaque.view(-1, 1, 1)).all()
    assert (load_image(str(path), alpha="drop")[:, :, :4] == 0).all()


def test_a_jpeg_draft_covers_the_larger_side_of_a_non_square_target_and_never_grows():
    """A 800x600 JPEG asked for (height 100, width 300): PIL's draft scales by 1/2, 1/4 or 1/8, and
    the smallest reduced size still covering 300 on both sides is 1/2 (400x300; 1/4 gives 200x150),
    worked out by hand. A target larger than the image decodes it whole. Planted: the target's
    smaller side asked for (1/4 then: 200 wide, under the 300 asked)."""
    data = encode(Image.fromarray(rgb_array(600, 800)), "JPEG")
    assert load_image(data, draft_size=(100, 300)).shape == (3, 300, 400)
    assert load_image(data, draft_size=(300, 100)).shape == (3, 300, 400)
    assert load_image(data, draft_size=(1000, 2000)).shape == (3, 600, 800)


def test_brightness_ranges_are_closed_at_both_ends_and_negative_values_refused():
    """Float arrays, tensors and F images holding exactly 0.0 and 1.0 are taken as they are; a negative
    value is refused in an F image and in an I image (whose maximum would pass the 8- or 16-bit test
    alone). Planted: `high < 1.0` and `low > 0.0` for arrays, `high < 1.0` and the `low >= 0` operand
    dropped for F images, each `low >= 0` operand dropped for I images."""
    ends = np.array([[0.0, 0.25, 1.0]], np.float32)
    want = torch.tensor([[0.0, 0.25, 1.0]] * 3)
    assert torch.equal(load_image(np.repeat(ends[..., None], 3, axis=2))[:, 0], want)
    assert torch.equal(load_image(torch.from_numpy(ends))[:, 0], want)
    assert torch.equal(load_image(Image.fromarray(ends, "F"))[:, 0], want)
    with pytest.raises(ImageError, match=r"a 32-bit float image with values in \[-0.5, 1\]"):
        load_image(Image.fromarray(np.array([[-0.5, 1.0]], np.float32), "F"))
    for high in (200, 60000):
        with pytest.raises(ImageError, match=rf"32-bit integer pixels in \[-5, {high}\]"):
            load_image(Image.fromarray(np.array([[-5, high]], dtype=np.int32)))


def test_a_float_rgba_array_is_composited_on_white_in_0_1_and_float_thumbnails_are_rounded():
    """A float RGBA array: rgb 0.2 at alpha 0.5 over white is 0.2 * 0.5 + 0.5 = 0.6 (by hand), alpha
    0 is white, alpha 1 the colour. A float picture's thumbnail is the one of its values rounded to
    8 bits (0.5 -> 127.5 -> 128, not 127). Planted: the composite at the 0..255 scale for floats; the
    thumbnail's values truncated."""
    rgba = np.zeros((2, 3, 4), np.float32)
    rgba[..., :3], rgba[..., 3] = 0.2, np.array([0.5, 0.0, 1.0], np.float32)
    got = load_image(rgba)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:, 0], torch.tensor([[0.6, 1.0, 0.2]] * 3), atol=1e-6, rtol=0)
    grey = np.full((16, 16, 3), 0.5, np.float32)
    assert images.make_thumbnail(grey, 64) == images.make_thumbnail(np.full((16, 16, 3), 128, np.uint8), 64)
