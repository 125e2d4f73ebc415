"""dino3.recipe: what an output records of how its features were made, read back and compared.

The other rooms' tests use recipes through their own jobs; these pin the recipe's own promises, each
found unpinned by the fresh mutation pass of issue 31."""

from __future__ import annotations

import shutil

import pytest

from dino3.errors import UsageError
from dino3.recipe import Recipe, check_model, differences
from helpers import save_small_vit


@pytest.mark.parametrize(
    "options",
    [dict(resample=3), dict(keep_aspect="shorter", target=128, fit="resize"), dict(size=160, jpeg_draft=True)],
    ids=["bicubic", "aspect", "size"],
)
def test_an_older_outputs_recipe_is_read_back_from_its_processor(checkpoint, options):
    """Bug pinned: Recipe.from_meta of an output of dino3 0.2 (no `recipe` recorded, only the
    processor's settings) forgot the resample filter: such an output made with bicubic resizing was
    read back as bilinear, and its own model was then refused for it (an index of it refused every
    query) with "processor.resample" as the difference."""
    made = Recipe(str(checkpoint), **options).load()
    meta = made.describe()
    del meta["recipe"]  # what dino3 0.2 wrote
    again = Recipe.from_meta(meta).load()
    check_model(meta, again, "the older output")  # no difference
    assert again.processor.to_dict() == made.processor.to_dict()


def test_a_copied_model_is_the_same_model_and_other_weights_are_not(checkpoint, tmp_path):
    """Bug pinned: differences() comparing the weight files (their paths, sizes and times) even where
    both sides record a fingerprint: a model copied to another folder (new times) counted as another
    model, and every index, probe and Ray job made with it refused it."""
    copied = tmp_path / "copied"
    shutil.copytree(checkpoint, copied, copy_function=shutil.copy)  # other paths, other times
    original = Recipe(str(checkpoint)).load().describe()
    assert differences(original, Recipe(str(copied)).load().describe()) == []
    other = Recipe(str(save_small_vit(tmp_path / "other", seed=1))).load()
    assert differences(original, other.describe())[0].startswith("weights: they compute other numbers")
    with pytest.raises(UsageError, match="compute other numbers"):
        check_model(original, other, "the output")
