"""dino.txt's uses end to end, on the small dino.txt model of tests/golden saved as a user's folder:
an index of its image embeddings searched by text (library and command), zero-shot labels with
`dino3 classify --labels`, zero-shot segmentation with `dino3 segment`, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dino3
import dino3.index
from dino3.cli import main
from dino3.errors import UsageError
from helpers import dinotxt_meta_files

pytest.importorskip("ftfy")
pytest.importorskip("regex")

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The small dino.txt model, saved with save_pretrained (a folder dino3.load takes)."""
    root = tmp_path_factory.mktemp("dinotxt")
    model = dino3.DINOv3TextModel.from_meta(*dinotxt_meta_files(root))
    model.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"):
        shutil.copy(PHOTOS / name, root / name)
    return root


def test_text_search_finds_the_image_whose_embedding_is_nearest(folder, photos, tmp_path, capsys):
    """The bug it would catch: texts embedded by another part of the model (or not normalised), or the
    index holding backbone features: the text's best image must be the one the model itself ranks first."""
    index_dir = tmp_path / "index"
    assert main(["index", "build", str(photos), "-m", str(folder), "--index", str(index_dir), "-q"]) == 0
    index = dino3.index.open(index_dir)
    assert index.settings["pool"] == "text" and index.dim == 128
    model = dino3.load(folder)
    texts = ["a photo of a cat", "a rocket launch"]
    expected_vectors = model.encode_text(texts, normalize=True).detach().numpy()
    images = np.asarray(index.vectors())
    paths = [e.path for e in index.entries()]
    results = index.search_text(texts, k=2)
    for result, text, vector in zip(results, texts, expected_vectors):
        assert result["query"] == text
        scores = images @ vector
        assert result["neighbors"][0]["path"] == paths[int(np.argmax(scores))]
        assert abs(result["neighbors"][0]["score"] - float(scores.max())) < 1e-5
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert main(["search", "--text", "a photo of a cat", "--index", str(index_dir), "--json", str(out), "-k", "2"]) == 0
    written = json.loads(out.read_text())["results"]
    assert written[0]["neighbors"][0]["path"] == results[0]["neighbors"][0]["path"]
    # images and texts in one index: an image query lands on itself
    hit = index.search(str(photos / "coffee.png"), k=1)[0]["neighbors"][0]
    assert hit["path"].endswith("coffee.png") and hit["score"] > 0.9999


def test_text_search_needs_an_index_of_text_embeddings(checkpoint, photos, tmp_path):
    index_dir = tmp_path / "index"
    dino3.index.build([str(photos)], model=str(checkpoint), folder=index_dir, progress=False)
    with pytest.raises(UsageError, match="build it with a dino.txt model"):
        dino3.index.open(index_dir).search_text("a cat")


def test_classify_by_label_names_matches_the_library(folder, photos, tmp_path):
    out = tmp_path / "p.json"
    labels = "cat,coffee,rocket"
    command = ["classify", str(photos), "-m", str(folder), "--labels", labels, "--json", str(out), "-q"]
    assert main(command) == 0
    rows = json.loads(out.read_text())["predictions"]
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in photos.iterdir())
    model = dino3.load(folder)
    expected = dino3.text.classify(model, [r["path"] for r in rows], labels.split(","), "This is a photo of {}.")
    for row, best in zip(rows, expected):
        assert row["labels"] == [b["label"] for b in best]
        assert np.allclose(row["scores"], [b["score"] for b in best], atol=1e-6)
        assert abs(sum(row["scores"]) - 1) < 1e-5


def test_segment_writes_a_labelled_picture_and_a_mask_per_label(folder, tmp_path, capsys):
    out, masks = tmp_path / "labels.png", tmp_path / "masks"
    command = ["segment", str(PHOTOS / "chelsea.png"), "-m", str(folder), "--labels", "cat,grass,sky"]
    assert main([*command, "-o", str(out), "--masks", str(masks), "--short-side", "224"]) == 0
    picture = Image.open(out)
    assert picture.size[0] > 451 and picture.size[1] >= 300  # the image (451 x 300) and its legend
    names = json.loads((masks / "labels.json").read_text())
    assert sorted(names.values()) == ["cat", "grass", "sky"]
    total = sum(np.asarray(Image.open(masks / name).convert("L")) > 127 for name in names)
    assert total.shape == (300, 451) and (total == 1).all()  # each pixel has exactly one label
    printed = capsys.readouterr().out
    assert "cat" in printed and "%" in printed


def test_zero_shot_commands_need_a_dino_txt_model(checkpoint, tmp_path, capsys):
    for command in (
        [
            "segment",
            str(PHOTOS / "chelsea.png"),
            "-m",
            str(checkpoint),
            "--labels",
            "a,b",
            "-o",
            str(tmp_path / "x.png"),
        ],
        ["classify", str(PHOTOS / "chelsea.png"), "-m", str(checkpoint), "--labels", "a,b"],
    ):
        with pytest.raises(SystemExit) as e:
            main(command)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "dino.txt" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["classify", str(PHOTOS / "chelsea.png"), "-m", str(checkpoint), "--labels", "a,,b"])
    assert "none empty" in capsys.readouterr().err


def test_the_official_preset_without_its_files_says_what_to_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DINO3_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    status = main(["segment", str(PHOTOS / "chelsea.png"), "-m", "dinotxt-vitl16", "--labels", "a,b", "-o", "x.png"])
    err = capsys.readouterr().err
    assert status == 1 and "dinov3_vitl16_dinotxt_vision_head_and_text_encoder" in err
    assert len(err.strip().splitlines()) == 1
    assert torch.__version__  # (torch imported: the command ran in this process)


def test_the_transformers_zero_shot_pipeline_call_shape(folder):
    """pipeline("zero-shot-image-classification", model=...)(image, candidate_labels=[...],
    hypothesis_template=...), as Transformers' pipeline is called: the same answer as dino3.text.classify."""
    pipe = dino3.pipeline("zero-shot-image-classification", model=str(folder))
    image = str(PHOTOS / "chelsea.png")
    got = pipe(image, candidate_labels=["cat", "rocket"], hypothesis_template="a photo of a {}.")
    expected = dino3.text.classify(dino3.load(folder), image, ["cat", "rocket"], "a photo of a {}.")
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert np.allclose([g["score"] for g in got], [e["score"] for e in expected], atol=1e-6)
    with pytest.raises(ValueError, match="needs a dino.txt model"):
        dino3.pipeline(
            "zero-shot-image-classification",
            model=dino3.DINOv3ViTModel(
                dino3.DINOv3ViTConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2)
            ),
        )
