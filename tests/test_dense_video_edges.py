"""The PCA video of a long clip: the PCA fitted on a sample of its frames, every frame written, a bad one listed."""

from __future__ import annotations

import re

import pytest

from dino3 import dense
from test_dense import _break_frame, _write_clip, small, small_model  # noqa: F401  (fixtures)

pytest.importorskip("av")


def test_a_clip_longer_than_the_fit_sample_writes_every_frame_and_lists_a_bad_one(small_model, tmp_path, capsys):  # noqa: F811
    """40 frames, more than the 32 the PCA is fitted on: the frames skipped by the fit are embedded
    when written (all 39 good ones are), and the broken frame is listed, not written. The fit takes
    every second frame (ceil(40 / 32) = 2): 20 of them."""
    clip = tmp_path / "clip.mkv"
    _write_clip(clip, frames=40)
    _break_frame(clip, 5)
    out = tmp_path / "pca.mkv"
    result = dense.write_pca_video(small_model, clip, out, height=32, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"fitting the PCA: 100%.* 20/20", err) and re.search(r"writing: 100%.* 40/40", err)
    assert result.frames == 39 and [name for name, _ in result.failures] == [f"{clip}#t=0.500"]
    assert "cannot be decoded" in result.failures[0][1]
    import av

    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 39
