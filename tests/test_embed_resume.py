"""`dino3 embed --resume` embeds only what the interrupted run left: counted at the model, not only
read back from the output (issue 31: a resume that embedded everything again wrote the right file,
so no test of the file alone could tell)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import dino3

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
SIZE = 112  # the job's images are 112 x 112; the model's fingerprint input is 64 x 64


class Interrupted(Exception):
    pass


def counting_load(counts: list[int], stop_after: int | None = None):
    """A `load` stand-in: the real model, with a forward that counts the job's images (and raises
    Interrupted once `stop_after` have gone through, as a kill would stop the run)."""

    def load(name, **options):
        model = dino3.load(name, **options)
        forward = model.forward

        def counted(pixel_values, *args, **kwargs):
            if pixel_values.shape[-1] == SIZE:
                if stop_after is not None and counts[0] >= stop_after:
                    raise Interrupted
                counts[0] += pixel_values.shape[0]
            return forward(pixel_values, *args, **kwargs)

        model.forward = counted
        return model

    return load


def test_resume_embeds_only_the_images_the_interrupted_run_left(checkpoint, tmp_path, monkeypatch):
    """Bug planted: the job's resume ignoring the chunks it loaded (every image embedded again): the
    output was still right, but the count at the model was 12, not 8."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(["chelsea.png", "coffee.png", "astronaut.png", "horse.png"] * 3):
        shutil.copy(PHOTOS / name, inputs / f"{i:02d}_{name}")
    out = tmp_path / "out.npz"
    common = dict(size=SIZE, batch_size=2, checkpoint_every=2, workers=0, progress=False)

    first = [0]
    with pytest.raises(Interrupted):
        dino3.embed.run([str(inputs)], str(checkpoint), out, load=counting_load(first, stop_after=4), **common)
    assert first == [4] and not out.exists()
    assert len(list((tmp_path / "out.npz.partial").glob("chunk-*"))) == 2  # 4 images saved, in 2 chunks

    from dino3.embed import job

    bars = []
    real_bar = job.progress_bar
    monkeypatch.setattr(job, "progress_bar", lambda *a, **kw: bars.append((a[0], kw["initial"])) or real_bar(*a, **kw))
    resumed = [0]
    result = dino3.embed.run([str(inputs)], str(checkpoint), out, resume=True, load=counting_load(resumed), **common)
    assert resumed == [8] and result.computed == 8 and result.count == 12
    assert bars == [(12, 4)]  # the progress bar starts at the images the interrupted run saved

    whole = tmp_path / "whole.npz"
    dino3.embed.run([str(inputs)], str(checkpoint), whole, **common)
    a, b = dino3.embed.read_embeddings(out), dino3.embed.read_embeddings(whole)
    assert a.paths == b.paths and np.array_equal(a.features, b.features)


# -- the fresh mutation pass (issue 31) ---------------------------------------------------------------------
def bitmaps(folder: Path, count: int, mtime_ns: int | None = None) -> list[str]:
    """`count` photos as 112 x 112 BMP files: uncompressed, so that every one has the same size in
    bytes (as a dataset of fixed-size images has); all given one modification time if asked (as
    files extracted from an archive have)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = ["chelsea.png", "coffee.png", "astronaut.png", "horse.png", "rocket.jpg", "camera.png"]
    paths = []
    for i in range(count):
        path = folder / f"{i:02d}.bmp"
        Image.open(PHOTOS / names[i % len(names)]).convert("RGB").resize((SIZE, SIZE)).save(path)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
        paths.append(str(path))
    return paths


COMMON = dict(size=SIZE, batch_size=2, checkpoint_every=2, workers=0, progress=False)


def test_an_image_rewritten_at_the_same_size_is_embedded_again_on_resume(checkpoint, tmp_path):
    """Bug pinned: a saved chunk judged unchanged by its images' sizes alone (not their modification
    times): an image edited in place at the same size in bytes (an uncompressed format) kept the
    features of its old pixels in the resumed output."""
    from PIL import Image

    paths = bitmaps(tmp_path / "in", 6)
    out = tmp_path / "out.npz"
    with pytest.raises(Interrupted):
        dino3.embed.run(paths, str(checkpoint), out, load=counting_load([0], stop_after=4), **COMMON)
    before = os.stat(paths[0])
    Image.open(PHOTOS / "rocket.jpg").convert("RGB").resize((SIZE, SIZE)).save(paths[0])  # edited in place
    os.utime(paths[0], ns=(before.st_mtime_ns + 10**9, before.st_mtime_ns + 10**9))
    assert os.stat(paths[0]).st_size == before.st_size
    resumed = [0]
    dino3.embed.run(paths, str(checkpoint), out, resume=True, load=counting_load(resumed), **COMMON)
    assert resumed == [4]  # its chunk (2 images) done again, and the 2 never done
    whole = tmp_path / "whole.npz"
    dino3.embed.run(paths, str(checkpoint), whole, **COMMON)
    assert np.array_equal(dino3.embed.read_embeddings(out).features, dino3.embed.read_embeddings(whole).features)


def test_a_resume_with_the_inputs_in_another_order_is_refused(checkpoint, tmp_path):
    """Bug pinned: the saved job's manifest without the digest of its input list: a resume given the
    same images in another order (a list file written again, shuffled) was accepted, and where the
    files had one size and one modification time (extracted from an archive) each saved chunk was
    kept for the images now at its positions: every row got another image's features."""
    paths = bitmaps(tmp_path / "in", 6, mtime_ns=1_600_000_000 * 10**9)
    out = tmp_path / "out.npz"
    with pytest.raises(Interrupted):
        dino3.embed.run(paths, str(checkpoint), out, load=counting_load([0], stop_after=4), **COMMON)
    with pytest.raises(dino3.errors.UsageError, match="(?s)what decides the numbers changed.*inputs_sha256"):
        dino3.embed.run(paths[::-1], str(checkpoint), out, resume=True, **COMMON)


def test_an_image_fixed_after_it_failed_is_embedded_on_resume(checkpoint, tmp_path):
    """Bug pinned: an image that failed to decode was saved in its chunk without its file's size and
    time: once the file was fixed (downloaded again), the resumed job kept the old failure and
    left the image out."""
    paths = bitmaps(tmp_path / "in", 6)
    good = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(good[:100])  # cut short: fails to decode
    out = tmp_path / "out.npz"
    with pytest.raises(Interrupted):
        dino3.embed.run(paths, str(checkpoint), out, load=counting_load([0], stop_after=4), **COMMON)
    Path(paths[1]).write_bytes(good)  # fixed
    result = dino3.embed.run(paths, str(checkpoint), out, resume=True, **COMMON)
    assert result.count == 6 and not result.failures


def test_failures_at_the_very_end_are_reported(checkpoint, tmp_path):
    """Bug pinned (issue 31, fresh pass 4, G-E1): the last chunk of a job dropped when it held only
    failures: broken images at the end of the input list (after the last full checkpoint) were
    neither embedded nor reported, the output said nothing of them and the run exited 0."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(sorted(PHOTOS.glob("*.png"))[:4]):
        shutil.copy(photo, folder / f"{i}.png")
    for name in ("x-broken.png", "y-broken.png"):  # sorted last: a chunk of their own
        (folder / name).write_bytes(b"\x89PNG not really")
    output = tmp_path / "out.npz"
    result = dino3.embed.run(
        [str(folder)], model=str(checkpoint), output=output, size=SIZE, batch_size=2, checkpoint_every=4,
        workers=0, progress=False,
    )  # fmt: skip
    written = dino3.embed.read_embeddings(output)
    assert len(written) == 4 and written.meta["failed"] == 2
    assert sorted(Path(path).name for path, _ in result.failures) == ["x-broken.png", "y-broken.png"]
