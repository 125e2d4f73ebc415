"""dino3.recipe: how features are made, one concept for every room. A bad combination gets the same
refusal from every command; an output's description replays into the same recipe; a model is told
apart by what its weights compute, wherever its files lie."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import dino3
from dino3.cli import main
from dino3.errors import UsageError
from dino3.recipe import Made, Recipe, check_model, differences, fingerprint, same_fingerprint
from helpers import save_small_vit

PHOTO = str(Path(__file__).resolve().parents[1] / "examples" / "images" / "chelsea.png")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool": "max"}, "pool must be one of"),
        ({"dtype": "float16"}, "float16 is refused"),
        ({"backend": "openvino", "dtype": "bfloat16"}, "choose the precision"),
        ({"backend": "onnxruntime", "quantize": "int8"}, "choose the precision"),  # float32 dtype: quantize alone
        ({"backend": "onnxruntime", "layers": 2}, "layers need the torch backend"),
        ({"backend": "onnxruntime", "precision": "bf16"}, "onnxruntime runs precision"),
        ({"target": 448}, "target and fit apply with keep_aspect"),
        ({"fit": "crop"}, "target and fit apply with keep_aspect"),  # fit alone, without a target
        ({"quantize": "int3"}, "unknown quantization mode"),
        ({"size": 8}, "smaller than one 16px patch"),
        ({"calibration": ["a.jpg"]}, "calibration images are for"),
    ],
)
def test_bad_combinations_are_refused_before_anything_is_loaded(options, message):
    with pytest.raises(UsageError, match=message):
        Recipe("no/such-model", **options)  # never loaded: the model need not exist


COMMANDS = {  # every command that makes features, with the same bad runtime options
    "embed": ["embed", PHOTO, "-o", "{tmp}/f.npz"],
    "serve": ["serve"],
    "index build": ["index", "build", PHOTO, "--index", "{tmp}/index"],
    "probe train": ["probe", "train", "{tmp}", "-o", "{tmp}/probe"],
    "classify": ["classify", PHOTO, "--probe", "{tmp}/probe"],
    "pca": ["pca", PHOTO, "-o", "{tmp}/pca"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_same_bad_combination_gets_the_same_refusal_from_every_command(command, checkpoint, tmp_path, capsys):
    """The bug this pins: serve silently ignored --dtype and --quantize with a runtime backend where
    embed and the dense tools refused them."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in COMMANDS[command]]
    with pytest.raises(SystemExit) as e:
        main([*args, "-m", str(checkpoint), "--backend", "openvino", "--dtype", "bfloat16"])
    assert e.value.code == 2
    assert "with a runtime backend, choose the precision" in capsys.readouterr().err
    assert not (tmp_path / "f.npz").exists() and not (tmp_path / "index").exists()


def test_an_outputs_description_replays_into_the_same_recipe(checkpoint, tmp_path):
    recipe = Recipe(str(checkpoint), pool="cls+mean", keep_aspect="shorter", target=96, fit="pad", jpeg_draft=True)
    made = recipe.load()
    meta = made.describe()
    assert Recipe.from_meta(meta) == recipe
    result = dino3.embed.run([PHOTO], output=tmp_path / "f.npz", recipe=recipe, progress=False)
    written = dino3.embed.read_embeddings(result.output).meta
    assert Recipe.from_meta(written) == recipe and written["model_fingerprint"] == meta["model_fingerprint"]
    older = {k: v for k, v in meta.items() if k != "recipe"}  # dino3 0.2's outputs: no "recipe" key
    assert Recipe.from_meta(older) == recipe
    moved = Recipe.from_meta(meta, model=str(tmp_path / "elsewhere"))
    assert moved.model == str(tmp_path / "elsewhere") and moved.pool == "cls+mean"


def test_a_model_counts_by_what_it_computes_wherever_its_files_lie(checkpoint, tmp_path):
    recorded = Recipe(str(checkpoint)).load().describe()
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)  # new modification times, another place: the same model
    check_model(recorded, Recipe(str(copy)).load(), "the output")
    other = save_small_vit(tmp_path / "other", seed=5)  # the same architecture, other weights
    with pytest.raises(UsageError, match="compute other numbers"):
        check_model(recorded, Recipe(str(other)).load(), "the output")
    with pytest.raises(UsageError, match="processor.size"):
        check_model(recorded, Recipe(str(copy), size=448).load(), "the output")
    bf16 = Recipe(str(copy), dtype="bfloat16").load()
    assert same_fingerprint(recorded["model_fingerprint"], fingerprint(bf16.model))  # bf16 passes the fingerprint
    assert differences(recorded, bf16.describe()) == ['dtype: "float32" -> "bfloat16"']


def test_made_features_are_the_pooled_features_of_its_processor(checkpoint):
    made = Recipe(str(checkpoint), pool="mean", size=112).load()
    assert isinstance(made, Made)
    pixels = made.processor(PHOTO).pixel_values
    assert pixels.shape[-2:] == (112, 112)
    features, grid = made.features(pixels)
    expected, _ = dino3.extract(made.model, pixels, "mean")
    assert grid == (7, 7) and np.array_equal(features.numpy(), expected.numpy())


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


def test_a_model_given_by_a_relative_path_is_recorded_by_its_absolute_path(checkpoint, tmp_path, monkeypatch):
    """Bug pinned (issue 31, fresh pass 4, G-E5): a local model given by a relative path recorded as
    written: an output made with `-m models/vits16` named a folder that an index build, a probe or
    a resume run from another working folder could not find."""
    shutil.copytree(checkpoint, tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "f.npz"
    dino3.embed.run([PHOTO], model="models/mine", output=output, progress=False)
    recorded = dino3.embed.read_embeddings(output).meta
    assert recorded["model"] == str(tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path / "models")  # elsewhere: the record still names the model
    assert Recipe.from_meta(recorded).load().describe()["model_fingerprint"] == recorded["model_fingerprint"]


def test_ragged_means_patch_grids_of_kept_aspect_ratios_only():
    """Features of different shapes come only from pool patches with keep_aspect; either alone gives
    one shape for every image."""
    assert Recipe("no/such-model", pool="patches", keep_aspect="shorter", target=64).ragged
    assert not Recipe("no/such-model", pool="patches").ragged
    assert not Recipe("no/such-model", pool="cls", keep_aspect="shorter", target=64).ragged


def test_differences_count_weights_by_numbers_only_where_both_sides_have_a_fingerprint():
    """Hand-made metadata: one side without a fingerprint (an output of an older dino3) is compared by
    its weight files, the same files then being the same model; with both fingerprints, the files
    are left out and the numbers decide."""
    identity = {"config": {"hidden_size": 8}, "weight_files": [["/m/model.safetensors", 10, 1]]}
    moved = {**identity, "weight_files": [["/n/model.safetensors", 10, 2]]}
    recorded = {"model_identity": identity, "model_fingerprint": [1.0, 0.0]}
    assert differences(recorded, {"model_identity": identity}) == []
    assert differences({"model_identity": identity}, recorded) == []
    assert differences(recorded, {"model_identity": moved})[0].startswith("model_identity.weight_files")
    assert differences(recorded, {"model_identity": moved, "model_fingerprint": [1.0, 0.0]}) == []
    other = differences(recorded, {"model_identity": moved, "model_fingerprint": [0.0, 1.0]})
    assert other == ["weights: they compute other numbers (other weights)"]
    # left out of `keys`, the identity is not compared at all, but the numbers still are
    assert differences(recorded, {"model_identity": moved, "model_fingerprint": [0.0, 1.0]}, keys=("pool",)) == [
        "weights: they compute other numbers (other weights)"
    ]
    # another architecture says so in its identity; no second line about the numbers
    wider = {**identity, "config": {"hidden_size": 16}}
    assert differences(recorded, {"model_identity": wider, "model_fingerprint": [0.0, 1.0]}) == [
        "model_identity.config.hidden_size: 8 -> 16"
    ]


def test_replay_looks_for_a_missing_model_only_where_it_was_a_local_path(tmp_path):
    """A recorded preset or hub id is loaded as it is (here: a stand-in load that says it was called);
    a recorded absolute path that is gone is refused, naming it, before any load."""
    from dino3.recipe import replay

    class Loaded(Exception):
        pass

    def load(name, **options):
        raise Loaded(name)

    meta = {"model": "vits16", "pool": "cls", "processor": {"size": {"height": 224, "width": 224}}}
    with pytest.raises(Loaded, match="vits16"):
        replay(meta, "the index", load=load)
    gone = str(tmp_path / "gone")
    with pytest.raises(UsageError, match="the index's model .*gone is not there any more"):
        replay({**meta, "model": gone}, "the index", load=load)
    with pytest.raises(Loaded, match="elsewhere"):
        replay({**meta, "model": gone}, "the index", model="elsewhere", load=load)
    with pytest.raises(Loaded, match=str(tmp_path)):  # an absolute path that is there: loaded
        replay({**meta, "model": str(tmp_path)}, "the index", load=load)


def test_model_name_of_a_local_model_is_its_real_absolute_path(tmp_path, monkeypatch):
    """A local model by a relative path through a link and '..': recorded as the real folder; a name
    that is no local path (a preset, a hub id) as given."""
    from dino3.recipe import model_name

    (tmp_path / "real").mkdir()
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "sub")
    assert model_name("../link") == str((tmp_path / "real").resolve())
    assert model_name("facebook/dinov3-vits16-pretrain-lvd1689m") == "facebook/dinov3-vits16-pretrain-lvd1689m"


def test_differences_show_values_of_100_characters_whole():
    """A changed value is shown whole up to 100 characters (its JSON), cut to 97 and '...' past that."""
    exact, longer = "x" * 98, "y" * 99  # JSON: 100 and 101 characters
    assert differences({"pool": exact}, {"pool": longer}, keys=("pool",)) == [f'pool: "{exact}" -> "{"y" * 96}...']


def test_differences_name_a_setting_present_on_one_side_only():
    """A nested setting that only one side records (either side) is a difference, named by its path."""
    old, new = {"processor": {"size": 224}}, {"processor": {"size": 224, "fit": "crop"}}
    assert differences(old, new, keys=("processor",)) == ['processor.fit: null -> "crop"']
    assert differences(new, old, keys=("processor",)) == ['processor.fit: "crop" -> null']
