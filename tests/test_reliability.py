"""Every mistake gets a clear answer and nothing is lost (issue "Every mistake gets a clear answer").

Each test reproduces one way dino3 once lost data, hung, or answered with a traceback, and checks the
answer it gives now. The numbers in comments are the issue's item numbers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dino3
from dino3 import CheckpointError, ConfigError, ImageError
from dino3.cli import main
from dino3.embed import read_embeddings
from dino3.embed.store import RunLock
from helpers import SMALL, assert_same_features, randomize_

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"
NAMES = ["chelsea.png", "rocket.jpg", "coffee.png", "camera.png", "horse.png"]


def embed(*args: str) -> int:
    return main(["embed", *args, "-q"])


def usage_error(capsys, *args: str) -> str:
    """Run a command that must fail as a usage mistake: exit 2, one line, no traceback."""
    capsys.readouterr()  # what earlier commands printed
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(("dino3: error:", "usage:"))
    return err


def photos(folder: Path, count: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shutil.copy(PHOTOS / NAMES[i % len(NAMES)], folder / f"{i:02d}_{NAMES[i % len(NAMES)]}")
    return folder


def png(width: int, height: int, chunks: list[tuple[bytes, bytes]] = (), data: bytes | None = None) -> bytes:
    """A PNG written by hand, so that its header can say anything."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = data if data is not None else zlib.compress(b"\x00" * (3 * width + 1) * min(height, 4))
    parts = [chunk(b"IHDR", header)] + [chunk(k, p) for k, p in chunks] + [chunk(b"IDAT", body), chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(parts)


# -- data lost or silently wrong --------------------------------------------------------------------------
def test_a_second_job_on_the_same_output_is_refused(checkpoint, tmp_path, capsys):  # 1
    out = tmp_path / "f.npz"
    with RunLock(out):  # as a job in another process holds it
        err = usage_error(capsys, "embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(out))
        assert "another dino3 job is writing f.npz" in err
    assert not (tmp_path / "f.npz.partial").exists()
    assert embed(str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(out)) == 0
    assert not (tmp_path / "f.npz.lock").exists()


def test_a_second_process_is_refused_while_the_first_runs(checkpoint, tmp_path):  # 1
    server = _SlowServer()  # the first job waits on this download, holding the output
    try:
        out = tmp_path / "f.npz"
        first_inputs = [server.url, str(PHOTOS / NAMES[0])]
        base = [sys.executable, "-m", "dino3.cli", "embed", "-m", str(checkpoint), "-o", str(out), "-q"]
        first = subprocess.Popen([*base, *first_inputs], stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_on)
        assert server.requested.wait(timeout=120)
        second = subprocess.run([*base, str(PHOTOS / NAMES[1])], stderr=subprocess.PIPE, text=True, timeout=120)
        assert second.returncode == 2 and "another dino3 job is writing f.npz" in second.stderr
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 130
    finally:
        server.close()
    assert not out.exists() and not (tmp_path / "f.npz.lock").exists()
    assert embed(str(PHOTOS / NAMES[1]), "-m", str(checkpoint), "-o", str(out)) == 0


def interrupted_run(checkpoint, tmp_path, inputs, extra=()):
    """Start a job in a subprocess and kill it (SIGKILL) once two chunks are on disk."""
    out = tmp_path / "killed.npz"
    common = ["-m", str(checkpoint), "--size", "448", "--batch-size", "2", "--checkpoint-every", "2", *extra]
    process = subprocess.Popen(
        [sys.executable, "-m", "dino3.cli", "embed", str(inputs), "-o", str(out), "-q", *common],
        stderr=subprocess.DEVNULL,
    )
    partial = tmp_path / "killed.npz.partial"
    deadline = time.time() + 120
    while len(list(partial.glob("chunk-*.npz"))) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "the run finished before it could be interrupted"
    return out, common


def test_resume_redoes_images_that_changed_and_refuses_new_weights(checkpoint, tmp_path, capsys):  # 2
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    inputs = photos(tmp_path / "in", 12)
    out, common = interrupted_run(model, tmp_path, inputs)
    first = sorted(inputs.iterdir())[0]
    shutil.copy(PHOTOS / "horse.png", first)  # an image's bytes change before resuming
    os.utime(first, ns=(time.time_ns(), time.time_ns()))
    assert embed(str(inputs), "-o", str(out), *common, "--resume") == 0
    assert "changed since the run began; done again" in capsys.readouterr().err
    whole = tmp_path / "whole.npz"
    assert embed(str(inputs), "-o", str(whole), *common) == 0
    assert_same_features(np.load(out)["features"], np.load(whole)["features"])

    (tmp_path / "second").mkdir()
    out2, common2 = interrupted_run(model, tmp_path / "second", inputs)
    randomize_(dino3.DINOv3ViTModel(dino3.DINOv3ViTConfig(**SMALL)), seed=7).save_pretrained(model)  # new weights
    err = usage_error(capsys, "embed", str(inputs), "-o", str(out2), *common2, "--resume")
    assert "what decides the numbers changed" in err and "model_identity: was" in err


def test_mixed_sizes_keep_input_order_and_the_last_partial_chunk(checkpoint, tmp_path):
    """Images of different aspect ratios batch by size and finish out of order; 7 inputs in chunks of
    4 leave a last chunk of 3. Each row must be its own image's features, in input order, all kept."""
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["retina.jpg", "chelsea.png", "horse.png", "rocket.jpg", "coins.png", "hubble_deep_field.jpg", "camera.png"]
    for i, name in enumerate(names):
        shutil.copy(PHOTOS / name, folder / f"{i}_{name}")
    out = tmp_path / "f.npz"
    args = ["--keep-aspect", "shorter", "--target", "64", "--batch-size", "2", "--checkpoint-every", "4"]
    assert embed(str(folder), "-m", str(checkpoint), "-o", str(out), *args) == 0
    data = read_embeddings(out)
    assert [Path(p).name for p in data.paths] == [f"{i}_{n}" for i, n in enumerate(names)]
    model = dino3.load(checkpoint)
    processor = dino3.DINOv3ViTImageProcessor.for_model(model, keep_aspect="shorter", target_size=64)
    for path, row in zip(data.paths, data.features):
        with torch.inference_mode():
            expected = model(processor(path).pixel_values).pooler_output[0].numpy()
        assert np.abs(row - expected).max() <= 1e-5, path


def test_batch_size_and_counts_must_be_positive(checkpoint, tmp_path, capsys):  # 3
    for flag, value in [
        ("--batch-size", "-3"),
        ("--batch-size", "0"),
        ("--checkpoint-every", "0"),
        ("--threads", "-1"),
    ]:
        err = usage_error(capsys, "embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", "x.npz", flag, value)
        assert "must be 1 or more" in err
    with pytest.raises(dino3.UsageError, match="batch_size must be an integer >= 1"):
        dino3.embed.run([PHOTOS / NAMES[0]], model=checkpoint, output=tmp_path / "x.npz", batch_size=0)


def test_layer_indices_out_of_range_are_refused(checkpoint, tmp_path, capsys):  # 4
    err = usage_error(
        capsys, "embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(tmp_path / "x.npz"), "--layers", "99,"
    )
    assert "the model has 2 blocks, indices 0..1; got [99]" in err
    assert not list(tmp_path.iterdir())
    model = dino3.load(checkpoint)
    x = torch.randn(1, 3, 32, 32)
    for n in ([100], [2], 3, 0, [-3]):
        with pytest.raises(ValueError, match="must"):
            model.get_intermediate_layers(x, n=n)
    last = model.get_intermediate_layers(x, n=[-1])[0]
    assert torch.equal(last, model.get_intermediate_layers(x, n=1)[0])


def test_overwrite_removes_the_old_failure_list(checkpoint, tmp_path):  # 5
    (tmp_path / "bad.jpg").write_text("not an image")
    out = tmp_path / "f.npz"
    assert embed(str(PHOTOS / NAMES[0]), str(tmp_path / "bad.jpg"), "-m", str(checkpoint), "-o", str(out)) == 3
    assert (tmp_path / "f.npz.failures.tsv").is_file()
    assert embed(str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(out), "--overwrite") == 0
    assert not (tmp_path / "f.npz.failures.tsv").exists()


def test_names_with_tabs_and_newlines_survive_every_format(checkpoint, tmp_path):  # 6
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["tab\there.png", "new\nline.png", "back\\slash.png"]
    for name in names:
        shutil.copy(PHOTOS / NAMES[0], folder / name)
    (folder / "bad\tone.jpg").write_text("broken")
    for suffix in (".npy", ".npz", ".parquet"):
        out = tmp_path / f"f{suffix}"
        assert embed(str(folder), "-m", str(checkpoint), "-o", str(out)) == 3
        assert sorted(Path(p).name for p in read_embeddings(out).paths) == sorted(names)
    lines = (tmp_path / "f.npy.paths.txt").read_text().splitlines()
    assert len(lines) == 3 and any("tab\\there.png" in line for line in lines)
    failures = (tmp_path / "f.npy.failures.tsv").read_text().splitlines()
    assert len(failures) == 1 and failures[0].split("\t")[0].endswith("bad\\tone.jpg")


def test_symlinked_folders_are_followed_and_dangling_links_reported(checkpoint, tmp_path, capsys):  # 7
    root = tmp_path / "root"
    photos(tmp_path / "elsewhere", 2)
    root.mkdir()
    shutil.copy(PHOTOS / NAMES[0], root / "a.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "loop").symlink_to(root)  # a link back: searched once
    (root / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    out = tmp_path / "f.npz"
    assert embed(str(root), "-m", str(checkpoint), "-o", str(out)) == 3
    assert len(read_embeddings(out).paths) == 3
    failures = (tmp_path / "f.npz.failures.tsv").read_text()
    assert "gone.jpg\ta symbolic link to nothing" in failures


def test_16_bit_images(tmp_path):  # 8: grayscale keeps its precision; colour is read at 8 bits, as Transformers does
    from transformers.image_utils import load_image as hf_load_image

    deep = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)
    got = dino3.load_image(Image.fromarray(deep))
    assert torch.allclose(got[0, 0], torch.from_numpy(deep[0].astype(np.float32) / 65535))
    rgb16 = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000 + 7).astype(">u2")
    raw = b"".join(b"\x00" + rgb16[i].tobytes() for i in range(4))
    data = png(5, 4, data=zlib.compress(raw)).replace(
        struct.pack(">IIBBBBB", 5, 4, 8, 2, 0, 0, 0), struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0)
    )
    data = _fix_crc(data)
    (tmp_path / "rgb16.png").write_bytes(data)
    ours = dino3.load_image(tmp_path / "rgb16.png")
    theirs = torch.from_numpy(np.asarray(hf_load_image(str(tmp_path / "rgb16.png")))).permute(2, 0, 1)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.to(torch.int64), torch.from_numpy((rgb16 >> 8).astype(np.int64)).permute(2, 0, 1))


def _fix_crc(data: bytes) -> bytes:
    """Recompute every chunk's CRC of a PNG edited in place."""
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        kind_payload = data[pos + 4 : pos + 8 + length]
        out += data[pos : pos + 4] + kind_payload + struct.pack(">I", zlib.crc32(kind_payload))
        pos += 12 + length
    return bytes(out)


# -- one bad file stops nothing ------------------------------------------------------------------------------
def hostile_files(folder: Path) -> dict[str, str]:
    """name -> what the failure must say, for files that once aborted a run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bomb.png").write_bytes(png(100_000, 100_000))  # 3 KB that declares 10 gigapixels
    image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    data = bytearray(buffer.getvalue())
    at = data.find(b"Exif") + 20
    data[at] ^= 0xFF  # one byte of the EXIF block flipped
    (folder / "exif.jpg").write_bytes(bytes(data))
    (folder / "header.ppm").write_bytes(b"P6\n4x 4\n255\n")
    (folder / "ztxt.png").write_bytes(png(4, 4, [(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 50_000_000))]))
    (folder / "dds.png").write_bytes(b"DDS " + b"\x7c\x00\x00\x00" + b"\xff" * 120)
    (folder / "strip.png").write_bytes(png(50_000, 1))
    return {
        "bomb.png": "decompression bomb",
        "exif.jpg": "",
        "header.ppm": "",
        "ztxt.png": "",
        "dds.png": "",
        "strip.png": "over max_side",
    }


def test_hostile_files_are_each_named_and_the_run_goes_on(checkpoint, tmp_path):  # 9, 13
    folder = tmp_path / "in"
    expected = hostile_files(folder)
    shutil.copy(PHOTOS / NAMES[0], folder / "good.png")
    out = tmp_path / "f.npz"
    args = ["--workers", "2", "--keep-aspect", "shorter", "--target", "64"]
    assert embed(str(folder), "-m", str(checkpoint), "-o", str(out), *args) == 3
    embedded = [Path(p).name for p in read_embeddings(out).paths]
    rows = (tmp_path / "f.npz.failures.tsv").read_text().splitlines()
    failed = {Path(line.split("\t")[0]).name: line.split("\t", 1)[1] for line in rows}
    assert "good.png" in embedded
    assert set(embedded) | set(failed) == set(expected) | {"good.png"}  # every input accounted for
    for name, reason in failed.items():
        assert name in reason and expected[name] in reason, (name, reason)
    assert {"bomb.png", "header.ppm", "dds.png", "strip.png"} <= set(failed)


def test_fuzzed_images_fail_one_by_one(tmp_path):  # 9: the hidden-input style
    """Mutated copies of real photos (flipped bytes, cut files, scrambled headers): each one is either
    decoded or an ImageError that names it; nothing else ever escapes, and the engine goes on."""
    from dino3.pipeline import iter_batches

    rng = np.random.default_rng(0)
    sources, started = [], time.monotonic()
    originals = [(PHOTOS / n).read_bytes() for n in ("rocket.jpg", "chelsea.png", "coins.png")]
    for i in range(48):
        data = bytearray(originals[i % len(originals)])
        kind = i % 4
        if kind == 0:  # flip bytes anywhere
            for at in rng.integers(0, len(data), size=8):
                data[at] ^= int(rng.integers(1, 256))
        elif kind == 1:  # cut the file
            data = data[: int(rng.integers(8, len(data)))]
        elif kind == 2:  # scramble the header
            for at in rng.integers(0, min(64, len(data)), size=6):
                data[at] = int(rng.integers(0, 256))
        else:  # garbage after a valid signature
            data = data[:16] + bytearray(rng.integers(0, 256, size=4096, dtype=np.uint8))
        path = tmp_path / f"{i:02d}{Path(NAMES[i % 3]).suffix}"
        path.write_bytes(bytes(data))
        sources.append(str(path))
    seen, failed = [], []
    processor = dino3.DINOv3ViTImageProcessor()
    for batch in iter_batches(
        sources, processor, batch_size=4, workers=2, on_error=lambda i, s, e: failed.append((i, s, e))
    ):
        seen += batch.indices
    for _, source, error in failed:
        assert isinstance(error, ImageError) and Path(source).name in str(error), error
    assert sorted(seen + [i for i, _, _ in failed]) == list(range(len(sources)))
    assert failed and time.monotonic() - started < 60


def test_decoding_threads_leave_the_warnings_filters_alone(checkpoint, tmp_path, monkeypatch):  # 10
    """PIL warns about images over its own limit (lowered here, so that a small image is 'big'):
    the decoding threads must neither turn that warning into failures nor change the filters."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 60 * 60)  # warns above 3600 px, refuses above 7200
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        PILImage.fromarray(np.full((70, 70, 3), 40 * i, np.uint8)).save(folder / f"big{i}.png")  # 4900 px: a warning
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("default")
        expected = list(warnings.filters)
        assert embed(str(folder), "-m", str(checkpoint), "-o", str(tmp_path / "f.npz"), "--workers", "3") == 0
        assert list(warnings.filters) == expected
    assert list(warnings.filters) == before
    assert len(read_embeddings(tmp_path / "f.npz")) == 6
    PILImage.open(folder / "big0.png").load()  # the user's own 'big' image still opens


def test_decoding_memory_is_bounded_in_total():  # 12
    from dino3.images import MemoryBudget

    budget = MemoryBudget(100)
    in_use, peak, lock = [0], [0], threading.Lock()

    def decode(size):
        with budget.reserve(size):
            with lock:
                in_use[0] += min(size, 100)
                peak[0] = max(peak[0], in_use[0])
            time.sleep(0.01)
            with lock:
                in_use[0] -= min(size, 100)

    threads = [threading.Thread(target=decode, args=(s,)) for s in [60, 60, 30, 250, 10, 90, 40] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] <= 100


# -- hangs and unbounded resources ----------------------------------------------------------------------------
def _ctrl_c_on() -> None:
    """In the child, before it starts: Ctrl-C as a terminal gives it. A process inherits an ignored
    SIGINT, and the tests may run as a background job of a script, which has it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _SlowServer:
    """Sends a byte every `gap` seconds, for ever."""

    def __init__(self, gap: float = 0.3) -> None:
        import http.server

        requested = self.requested = threading.Event()

        class Slow(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                requested.set()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(gap)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/slow.png"

    def close(self) -> None:
        self.server.shutdown()


def test_a_slow_url_has_a_deadline(monkeypatch):  # 11
    from dino3 import fetch

    server = _SlowServer()
    monkeypatch.setattr(fetch, "URL_TIMEOUT_SECONDS", 1.5)
    try:
        started = time.monotonic()
        with pytest.raises(ImageError, match="download took longer than 2 s"):
            dino3.load_image(server.url)
        assert time.monotonic() - started < 5
    finally:
        server.close()


def test_ctrl_c_stops_a_job_waiting_on_a_download(checkpoint, tmp_path):  # 11
    server = _SlowServer()
    try:
        command = [
            sys.executable,
            "-m",
            "dino3.cli",
            "embed",
            server.url,
            str(PHOTOS / NAMES[0]),
            "-m",
            str(checkpoint),
        ]
        process = subprocess.Popen(
            [*command, "-o", str(tmp_path / "f.npz"), "-q"], stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_on
        )
        assert server.requested.wait(timeout=120)  # the model is loaded and the download is under way
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        process.wait(timeout=15)
        assert time.monotonic() - started < 3
        assert process.returncode == 130 and "interrupted" in process.stderr.read()
    finally:
        server.close()


def test_a_fifo_is_skipped_with_its_reason(checkpoint, tmp_path):  # 15
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    shutil.copy(PHOTOS / NAMES[0], folder / "a.png")
    out = tmp_path / "f.npz"
    assert embed(str(folder), "-m", str(checkpoint), "-o", str(out)) == 3
    assert "pipe.png\tnot a regular file" in (tmp_path / "f.npz.failures.tsv").read_text()
    with pytest.raises(ImageError, match="not a regular file"):
        dino3.load_image(folder / "pipe.png")


def test_a_sparse_file_declaring_huge_tensors_is_refused_before_reading(checkpoint, tmp_path, monkeypatch):  # 14
    from dino3.models import pretrained
    from dino3.weights.files import read_header

    folder = tmp_path / "sparse"
    shutil.copytree(checkpoint, folder)
    real = read_header(checkpoint / "model.safetensors")
    entries = {
        k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [v.begin, v.end]} for k, v in real.tensors.items()
    }
    end = (
        max(v.end for v in real.tensors.values()) - real.tensors["norm.weight"].end + real.tensors["norm.weight"].begin
    )
    del entries["norm.weight"]
    for entry in entries.values():  # close the gap norm.weight leaves
        begin, stop = entry["data_offsets"]
        if begin >= real.tensors["norm.weight"].end:
            size = real.tensors["norm.weight"].end - real.tensors["norm.weight"].begin
            entry["data_offsets"] = [begin - size, stop - size]
    huge = 10 * 2**30  # 40 GiB of float32
    entries["norm.weight"] = {"dtype": "F32", "shape": [huge], "data_offsets": [end, end + 4 * huge]}
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + end + 4 * huge)  # sparse: nothing is written, nothing is stored
    monkeypatch.setattr(pretrained, "read_safetensors", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(CheckpointError, match=r"norm.weight: file \(10737418240,\), model \(64,\)"):
        dino3.load(folder)


# -- tracebacks where a message belongs -----------------------------------------------------------------------------
def _safetensors(tmp_path: Path, header) -> Path:
    text = header if isinstance(header, str) else json.dumps(header)
    data = text.encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(data).to_bytes(8, "little") + data + b"\0" * 16)
    return path


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"a": 5}, "the entry of a is not an object"),
        ({"a": {"dtype": "F32", "shape": [4]}}, "data_offsets None"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, "not two non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, "not two non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, "not two non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "its offsets give"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, "not two non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 16]}}, "needs 4398046511104 bytes"),
        ({"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, "not a list of non-negative integers"),
        ({"a": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, "dtype 'X9'"),
        ([1, 2, 3], "the header is a JSON list"),
        ("[" * 100_000, "nests JSON too deeply"),
        ("{not json", "invalid header"),
    ],
)
def test_malformed_safetensors_headers(tmp_path, header, reason):  # 16
    path = _safetensors(tmp_path, header)
    with pytest.raises(CheckpointError) as e:
        dino3.load(path)
    assert "bad.safetensors is not a readable safetensors file" in str(e.value) and reason in str(e.value)


def test_bad_pth_files_and_configs(tmp_path):  # 16
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth is empty"):
        dino3.load(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("these are my notes, not weights\n" * 20)
    with pytest.raises(CheckpointError, match="text.pth is not"):
        dino3.load(tmp_path / "text.pth")
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"model_type": "dinov3_vit", "name": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="config.json is not UTF-8 text"):
        dino3.load(folder)
    (folder / "config.json").write_text(json.dumps(dino3.DINOv3ViTConfig(**SMALL).to_dict()))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ["model-1.safetensors"]}')
    with pytest.raises(CheckpointError, match="is not a shard index"):
        dino3.load(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    with pytest.raises(CheckpointError, match="names shards outside its folder"):
        dino3.load(folder)


@pytest.fixture(scope="module")
def vits16_files(tmp_path_factory):
    """A ViT-S/16-shaped model with random weights, as a Meta .pth and a timm .safetensors."""
    from dino3.weights import formats

    folder = tmp_path_factory.mktemp("vits16")
    model = dino3.DINOv3ViTModel(dino3.get_preset("vits16").make_config())
    torch.save(formats.from_dino3(model.state_dict(), model.config, "meta"), folder / "vits16.pth")
    save_file(
        {k: v.contiguous() for k, v in formats.from_dino3(model.state_dict(), model.config, "timm").items()},
        folder / "vits16-timm.safetensors",
    )
    return folder


def test_info_on_single_weights_files(vits16_files, capsys):  # 17
    for name, layout in [("vits16.pth", "Meta (original)"), ("vits16-timm.safetensors", "timm")]:
        assert main(["info", str(vits16_files / name)]) == 0
        out = capsys.readouterr().out
        assert f"{layout} layout, 1 file, torch.float32" in out and "21.6M parameters" in out
        assert "LVD-1689M" in out  # recognised as the vits16 preset


def test_truncated_and_empty_chunks_are_redone_on_resume(checkpoint, tmp_path, capsys):  # 19
    inputs = photos(tmp_path / "in", 12)
    out, common = interrupted_run(checkpoint, tmp_path, inputs)
    chunks = sorted((tmp_path / "killed.npz.partial").glob("chunk-*.npz"))
    data = chunks[0].read_bytes()
    chunks[0].write_bytes(data[: len(data) // 2])
    chunks[1].write_bytes(b"")
    assert embed(str(inputs), "-o", str(out), *common, "--resume") == 0
    assert capsys.readouterr().err.count("was damaged") == 2
    whole = tmp_path / "whole.npz"
    assert embed(str(inputs), "-o", str(whole), *common) == 0
    a, b = np.load(out), np.load(whole)
    assert list(a["paths"]) == list(b["paths"]) and np.array_equal(a["features"], b["features"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "-5"], "must be 1 or more"),
        (["--size", "100000"], "size must hold positive integers up to max_side"),
        (["--size", "8"], "smaller than one 16px patch"),
        (["--threads", "-1"], "must be 1 or more"),
        (["--workers", "-1"], "must be 0 or more"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--target", "64"], "target and fit apply with keep_aspect"),
        (["--fit", "pad"], "target and fit apply with keep_aspect"),
        (["--calibration", "x"], "calibration images are for"),
        (["--backend", "openvino", "--dtype", "bfloat16"], "choose the precision"),
        (["--backend", "onnxruntime", "--precision", "bf16"], "onnxruntime runs precision"),
        (["--resume", "--overwrite"], "contradict"),
    ],
)
def test_flags_get_one_line_answers(checkpoint, tmp_path, capsys, flags, message):  # 20, 26
    err = usage_error(
        capsys, "embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(tmp_path / "f.npz"), *flags
    )
    assert message in err
    assert not list(tmp_path.iterdir())  # nothing was created


def test_when_every_input_is_skipped_the_reasons_are_given(checkpoint, tmp_path, capsys):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    err = usage_error(capsys, "embed", str(tmp_path / "gone.jpg"), "-m", str(checkpoint), "-o", str(tmp_path / "f.npz"))
    assert "no images found in the inputs (1 skipped)" in err and "gone.jpg: a symbolic link to nothing" in err


def test_a_closed_pipe_is_not_an_error_message(checkpoint, tmp_path):
    import subprocess
    import sys

    command = f"{sys.executable} -m dino3.cli info | true"  # the reader is gone before the first line
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert "Broken pipe" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(checkpoint, tmp_path, capsys):  # 20
    err = usage_error(
        capsys,
        "embed",
        str(PHOTOS / NAMES[0]),
        "-m",
        str(checkpoint),
        "-o",
        str(tmp_path / "f.npz"),
        "--device",
        "cuda",
    )
    assert "no CUDA GPU" in err
    with pytest.raises(ValueError, match="dtype torch.int8 cannot run a model"):
        dino3.load(checkpoint, dtype=torch.int8)


# -- the first five minutes ---------------------------------------------------------------------------------------
def test_a_failed_start_leaves_nothing(checkpoint, tmp_path, capsys):  # 21
    out = tmp_path / "f.npz"
    assert main(["embed", str(PHOTOS / NAMES[0]), "-m", "vits61", "-o", str(out), "-q"]) == 1
    assert "Did you mean vits16" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert embed(str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(out)) == 0


def test_resume_needs_only_what_changes_the_numbers(checkpoint, tmp_path, capsys):  # 22
    inputs = photos(tmp_path / "in", 12)
    out, common = interrupted_run(checkpoint, tmp_path, inputs)
    other = ["-m", str(checkpoint), "--size", "448", "--batch-size", "3", "--checkpoint-every", "5"]
    err = usage_error(capsys, "embed", str(inputs), "-o", str(out), *other, "--resume", "--pool", "mean")
    assert 'pool: was "cls", now "mean"' in err
    assert embed(str(inputs), "-o", str(out), *other, "--resume") == 0
    whole = tmp_path / "whole.npz"
    assert embed(str(inputs), "-o", str(whole), *common) == 0
    a, b = np.load(out), np.load(whole)
    assert list(a["paths"]) == list(b["paths"])
    assert np.abs(a["features"] - b["features"]).max() <= 1e-5  # another batch size: float rounding at most


def test_output_problems_are_found_before_the_work(checkpoint, tmp_path, capsys, monkeypatch):  # 23
    args = ["embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint)]
    err = usage_error(
        capsys, *args, "-o", str(tmp_path / "f.npy"), "--pool", "patches", "--keep-aspect", "shorter", "--target", "64"
    )
    assert ".npz, .safetensors or .parquet" in err
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    err = usage_error(capsys, *args, "-o", str(tmp_path / "f.parquet"))
    assert "needs pyarrow" in err
    assert not list(tmp_path.iterdir())


def test_missing_inputs_and_paths_say_so(checkpoint, tmp_path, capsys):  # 24
    err = usage_error(
        capsys, "embed", str(tmp_path / "nothere.jpg"), "-m", str(checkpoint), "-o", str(tmp_path / "f.npz")
    )
    assert "nothere.jpg: no such file or folder" in err
    with pytest.raises(CheckpointError, match="no such file or folder: .*nothere.pth"):
        dino3.load(str(tmp_path / "nothere.pth"))
    assert main(["convert", str(tmp_path / "nothere.pth"), str(tmp_path / "x")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    folder = photos(tmp_path / "in", 2)
    odd = os.fsencode(str(folder)) + b"/caf\xe9.png"  # Latin-1, not UTF-8
    shutil.copy(PHOTOS / NAMES[0], odd)
    out = tmp_path / "f.npz"
    assert embed(str(folder), "-m", str(checkpoint), "-o", str(out)) == 3
    assert len(read_embeddings(out).paths) == 2
    assert "caf\\xe9.png\tthe file name is not valid UTF-8" in (tmp_path / "f.npz.failures.tsv").read_text()


def test_hash_check_only_for_metas_own_names(checkpoint, tmp_path, capsys):  # 25
    dino3.convert(checkpoint, tmp_path / "my_finetune-20250101.pth", to="meta")
    config = str(checkpoint / "config.json")
    assert dino3.load(tmp_path / "my_finetune-20250101.pth", config=config).source_layout == "meta"
    meta_name = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    vits16 = dino3.DINOv3ViTModel(dino3.get_preset("vits16").make_config())
    from dino3.weights import formats

    torch.save(formats.from_dino3(vits16.state_dict(), vits16.config, "meta"), meta_name)
    out = tmp_path / "f.npz"
    assert main(["embed", str(PHOTOS / NAMES[0]), "-m", str(meta_name), "-o", str(out), "-q"]) == 1
    assert "SHA-256 starts with 08c60483" in capsys.readouterr().err
    assert main(["embed", str(PHOTOS / NAMES[0]), "-m", str(meta_name), "-o", str(out), "-q", "--no-hash-check"]) == 0
    assert main(["convert", str(meta_name), str(tmp_path / "hf"), "--no-hash-check"]) == 0


def test_misleading_options(checkpoint, tmp_path, capsys):  # 26
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dino3 {dino3.__version__}"
    assert main(["info"]) == 0
    listed = capsys.readouterr().out
    assert "vits16" in listed and "convnext-large" in listed
    err = usage_error(capsys, "export", str(checkpoint), "-o", str(tmp_path / "v.pt"))
    assert "written to a .onnx file" in err
    assert main(["convert", str(checkpoint), str(tmp_path / "t.safetensors")]) == 0
    assert "exists; pass overwrite=True (--overwrite)" in usage_error(
        capsys, "convert", str(checkpoint), str(tmp_path / "t.safetensors")
    )
    assert main(["convert", str(checkpoint), str(tmp_path / "t.safetensors"), "--overwrite"]) == 0
    assert embed(str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(tmp_path / "one.npz")) == 0
    assert ": 1 image," in capsys.readouterr().err


def test_two_exports_in_one_folder_keep_their_own_sidecars(checkpoint, tmp_path):  # 26
    other = tmp_path / "other"
    randomize_(
        dino3.DINOv3ConvNextModel(dino3.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1]))
    ).save_pretrained(other)
    dino3.export_onnx(checkpoint, tmp_path / "vit.onnx")
    dino3.export_onnx(other, tmp_path / "convnext.onnx")
    assert json.loads((tmp_path / "vit.dino3.json").read_text())["model_type"] == "dinov3_vit"
    assert json.loads((tmp_path / "convnext.dino3.json").read_text())["model_type"] == "dinov3_convnext"
    assert (tmp_path / "vit.preprocessor_config.json").is_file()


def test_the_demo_runs_offline(tmp_path, monkeypatch):  # 27
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    (tmp_path / "examples").mkdir()
    shutil.copytree(PHOTOS, tmp_path / "examples" / "images")
    started = time.monotonic()
    assert demo.main("vits16") == 0
    assert time.monotonic() - started < 120
    data = read_embeddings(tmp_path / "out" / "embeddings-random.npz")
    assert len(data) == len(list(PHOTOS.glob("*.[jp][pn]g")))


def test_every_output_has_one_file_mode(checkpoint, tmp_path):
    """The bug this pins: files written by safetensors (model.safetensors, probe.safetensors,
    features.safetensors) were 0600 while the others were 0644."""
    import stat

    from dino3._io import file_mode

    out = tmp_path / "f.safetensors"
    assert embed(str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(out)) == 0
    assert main(["convert", str(checkpoint), str(tmp_path / "hf")]) == 0
    written = [out, *sorted((tmp_path / "hf").iterdir())]
    assert len(written) >= 3
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode(), path
    assert file_mode() & 0o044  # readable by others under the usual umask, as any file a tool writes
