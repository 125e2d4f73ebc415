"""Glob inputs of the embed job (and of every command that takes images through it)."""

from __future__ import annotations

from dino3.embed import expand_inputs


def test_a_double_star_glob_finds_images_at_any_depth(tmp_path):
    """`photos/**/*.png` matches at every depth, the top folder included, as a shell with globstar
    does, and lists them sorted. Planted: glob without recursive=True (`**` then matches one folder
    level only, like `*`)."""
    for name in ("a.png", "x/b.png", "x/y/c.png", "x/y/z/d.png", "x/notes.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not read here")
    found = expand_inputs([str(tmp_path / "**" / "*.png")]).paths
    assert found == [str(tmp_path / p) for p in ("a.png", "x/b.png", "x/y/c.png", "x/y/z/d.png")]
    assert expand_inputs([str(tmp_path / "*" / "*.png")]).paths == [str(tmp_path / "x" / "b.png")]
