"""`dino3 embed --resume` embeds only what the interrupted run left: counted at the model, not only
read back from the output (issue 31: a resume that embedded everything again wrote the right file,
so no test of the file alone could tell)."""

from __future__ import annotations

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


def test_resume_embeds_only_the_images_the_interrupted_run_left(checkpoint, tmp_path):
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

    resumed = [0]
    result = dino3.embed.run([str(inputs)], str(checkpoint), out, resume=True, load=counting_load(resumed), **common)
    assert resumed == [8] and result.computed == 8 and result.count == 12

    whole = tmp_path / "whole.npz"
    dino3.embed.run([str(inputs)], str(checkpoint), whole, **common)
    a, b = dino3.embed.read_embeddings(out), dino3.embed.read_embeddings(whole)
    assert a.paths == b.paths and np.array_equal(a.features, b.features)
