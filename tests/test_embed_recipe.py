"""The recipe's branches that the room tests leave unchecked: a runtime backend's load options and
calibration paths, a dino.txt model's fixed preprocessing, outputs whose recipe cannot be made again,
the fingerprint comparison's edges, and replaying a recorded recipe."""

from __future__ import annotations

import numpy as np
import pytest

from dino3.errors import UsageError
from dino3.recipe import FINGERPRINT_COSINE, Made, Recipe, check_model, replay, same_fingerprint


def test_runtime_backend_load_options_and_absolute_calibration(tmp_path, monkeypatch):
    """A runtime backend loads with its backend and precision (no dtype); calibration images are
    recorded by absolute path, URLs as given."""
    monkeypatch.chdir(tmp_path)
    recipe = Recipe("vits16", backend="openvino", precision="int8", calibration=["cal/a.png", "https://h/b.png"])
    assert recipe.calibration == (str(tmp_path / "cal" / "a.png"), "https://h/b.png")
    assert recipe.load_options(device="cpu", check_hash=False) == {
        "check_hash": False,
        "backend": "openvino",
        "precision": "int8",
        "calibration": [str(tmp_path / "cal" / "a.png"), "https://h/b.png"],
    }
    assert Recipe("vits16", backend="onnxruntime").load_options() == {
        "check_hash": True,
        "backend": "onnxruntime",
        "precision": "f32",
    }
    assert Recipe("vits16", dtype="bfloat16").load_options(device="cpu") == {
        "check_hash": True,
        "dtype": "bfloat16",
        "device": "cpu",
        "quantize": None,
    }


class TextModel:
    """What processor_for looks at in a dino.txt model: that it encodes text."""

    def encode_text(self, texts):  # pragma: no cover - never called here
        raise AssertionError


@pytest.mark.parametrize("options", [dict(size=256), dict(keep_aspect="shorter", target=256), dict(resample=3)])
def test_a_dinotxt_model_refuses_other_preprocessing(options):
    with pytest.raises(UsageError, match=r"a dino\.txt model embeds images with Meta's transform .*leave out size"):
        Recipe("vits16", **options).processor_for(TextModel())


def test_a_dinotxt_model_gets_metas_transform():
    """Default options: the dino.txt processor (shorter side 256, centre crop 224), with jpeg_draft
    and max_side passed on."""
    from dino3.processing import DINOv3ViTImageProcessor

    got = Recipe("vits16", jpeg_draft=True, max_side=999).processor_for(TextModel())
    assert got.to_dict() == DINOv3ViTImageProcessor.for_dinotxt(jpeg_draft=True, max_side=999).to_dict()


def older_meta(**processor):
    return {"model": "vits16", "pool": "cls", "processor": {"size": {"height": 224, "width": 224}, **processor}}


def test_from_meta_refuses_an_unnamed_calibration():
    """An OpenVINO int8 output whose calibration images are not named cannot be made again."""
    with pytest.raises(UsageError, match="calibrated on images they do not name; make them again"):
        Recipe.from_meta({**older_meta(), "calibration": "abc123"})


def test_from_meta_of_a_calibration_it_names_makes_it_again():
    """A calibration digest with its images named (an older output's calibration_paths, or the
    recipe's) is read back into the recipe, not refused."""
    runtime = {"backend": "openvino", "precision": "int8", "calibration": "abc123"}
    older = Recipe.from_meta({**older_meta(), **runtime, "calibration_paths": ["/cal/a.png"]})
    assert (older.backend, older.precision, older.calibration) == ("openvino", "int8", ("/cal/a.png",))
    recipe = Recipe("vits16", backend="openvino", precision="int8", calibration=["/cal/b.png"])
    again = Recipe.from_meta({"model": "vits16", **runtime, "recipe": recipe.options()})
    assert again == recipe


@pytest.mark.parametrize("size", [{"height": 224, "width": 160}, {}, {"width": 224}])
def test_from_meta_refuses_a_preprocessing_it_cannot_make_again(size):
    """A recorded size that is not a square (or not there) cannot be a recipe's `size`."""
    with pytest.raises(UsageError, match=r"the recorded preprocessing \(size .*\) cannot be made again"):
        Recipe.from_meta({**older_meta(), "processor": {"size": size}})


def test_from_meta_of_an_older_output_reads_its_options():
    """An output of dino3 0.2: its options read back from its keys and processor, a runtime backend's
    dtype left to the backend."""
    recipe = Recipe.from_meta({**older_meta(jpeg_draft=True, max_side=800), "layers": None, "dtype": "bfloat16"})
    assert (recipe.size, recipe.jpeg_draft, recipe.max_side, recipe.dtype) == (224, True, 800, "bfloat16")
    onnx = Recipe.from_meta({**older_meta(), "dtype": "bfloat16", "backend": "onnxruntime", "precision": "f32"})
    assert (onnx.backend, onnx.precision, onnx.dtype) == ("onnxruntime", "f32", "float32")


def test_same_fingerprint_edges():
    """None, other lengths, non-finite values and zero vectors never match; the threshold is cosine
    FINGERPRINT_COSINE itself (met: the same), just under it: other weights."""
    a = [1.0, 0.0]
    assert not same_fingerprint(None, a) and not same_fingerprint(a, None)
    assert not same_fingerprint(a, [1.0, 0.0, 0.0])
    assert not same_fingerprint([1.0, np.nan], [1.0, 0.0]) and not same_fingerprint([1.0, 0.0], [np.inf, 0.0])
    assert not same_fingerprint([0.0, 0.0], [0.0, 0.0])
    assert same_fingerprint([1.0, 2.0], [2.0, 4.0])  # the same direction, another scale

    def at(cosine):
        return [cosine, float(np.sqrt(1 - cosine**2))]

    assert same_fingerprint(a, at(FINGERPRINT_COSINE + 1e-9))
    assert not same_fingerprint(a, at(FINGERPRINT_COSINE - 1e-9))
    # exactly on it: 99 / |(99, 14, 1, 1, 1)| = 99 / 100, no rounding on the way
    assert same_fingerprint([1.0, 0, 0, 0, 0], [99.0, 14.0, 1.0, 1.0, 1.0])
    assert FINGERPRINT_COSINE == 0.99


def test_replay_refuses_a_model_that_is_not_there_any_more(tmp_path):
    gone = str(tmp_path / "model")
    with pytest.raises(UsageError, match=rf"the index x's model {gone} is not there any more; give where it lies now"):
        replay({"model": gone, "pool": "cls"}, "the index x")


def test_replay_makes_the_recorded_recipe_again_and_checks_it(checkpoint, tmp_path):
    """replay: the recorded recipe from where the model lies now, its model checked; another pool
    recorded is refused, naming it."""
    import shutil

    made = Recipe(str(checkpoint), pool="cls+mean", size=64).load()
    meta = made.describe()
    again = replay(meta, "the output")
    assert isinstance(again, Made) and again.recipe == made.recipe
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    meta_gone = {**meta, "model": str(tmp_path / "gone")}
    assert replay(meta_gone, "the output", model=moved).recipe.model == str(moved)
    other_weights = {**meta, "model_fingerprint": [-v for v in meta["model_fingerprint"]]}
    with pytest.raises(
        UsageError, match=r"the output was made with another model.*\n  weights: they compute other numbers"
    ):
        replay(other_weights, "the output")
    other = {**meta, "recipe": {**meta["recipe"], "pool": "mean"}}
    with pytest.raises(
        UsageError, match=r"the output was made with another model.*\n  pool: \"cls\+mean\" -> \"mean\""
    ):
        check_model(meta, Recipe.from_meta(other).load(), "the output")


def test_check_model_shows_twelve_differences_and_counts_the_rest(checkpoint):
    made = Recipe(str(checkpoint), size=64).load()
    meta = made.describe()
    processor = {f"k{i:02d}": i for i in range(14)}  # 14 differences under processor.
    with pytest.raises(UsageError) as info:
        check_model({**meta, "processor": {**meta["processor"], **processor}}, made, "it")
    text = str(info.value)
    assert text.count("\n  processor.k") == 12 and "\n  ... and 2 more\n" in text
    thirteen = dict(list(processor.items())[:12])
    with pytest.raises(UsageError) as info:
        check_model({**meta, "processor": {**meta["processor"], **thirteen}}, made, "it")
    assert str(info.value).count("\n  processor.k") == 12 and "more" not in str(info.value)


def test_a_dinotxt_fingerprint_covers_its_head_and_text_tower(tmp_path):
    """A dino.txt model's fingerprint: its backbone's patch values, then its image embedding and the
    embedding of a fixed text (their first values each), rounded to 5 decimals."""
    import torch

    import dino3
    from dino3.features import extract
    from dino3.recipe import FINGERPRINT_SIZE, fingerprint
    from helpers import dinotxt_meta_files

    model = dino3.DINOv3TextModel.from_meta(*dinotxt_meta_files(tmp_path)).eval()
    got = fingerprint(model)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        grid = extract(model, pixels, "patches")[0]
        image = extract(model, pixels, "text")[0][0, :FINGERPRINT_SIZE]
        text = model.encode_text(["a photo of a cat"])[0, :FINGERPRINT_SIZE]
    patches = grid.reshape(-1, grid.shape[-1])[:, :FINGERPRINT_SIZE].reshape(-1)
    want = [round(float(v), 5) for v in torch.cat([patches, image, text])]
    assert len(got) == patches.numel() + 2 * FINGERPRINT_SIZE
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert got[-FINGERPRINT_SIZE:] != got[-2 * FINGERPRINT_SIZE : -FINGERPRINT_SIZE]
