"""dino3.text: text embeddings, zero-shot classification and zero-shot segmentation on the small dino.txt
model of tests/golden, against Meta's code (its logits, and its segmentation notebook's own functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dino3
from dino3.errors import UsageError
from helpers import dinotxt_meta_files

pytest.importorskip("ftfy")
pytest.importorskip("regex")

GOLDEN = Path(__file__).parent / "golden" / "dinotxt"
PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
CORPUS = json.loads((GOLDEN / "texts.json").read_text(encoding="utf-8"))
SEGMENT = CORPUS["segment"]


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    return load_file(GOLDEN / "golden.safetensors")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return dino3.DINOv3TextModel.from_meta(*dinotxt_meta_files(tmp_path_factory.mktemp("meta")))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


# -- embeddings ------------------------------------------------------------------------------------------------
def test_texts_embed_in_sorted_batches_and_come_back_in_order(model, golden):
    texts = CORPUS["texts"]
    vectors = dino3.text.embed_texts(model, texts, batch_size=4)
    assert max_diff(vectors, F.normalize(golden["text_features"], dim=-1)) < 1e-5
    raw = dino3.text.embed_texts(model, texts, batch_size=7, normalize=False, part="patch")
    assert max_diff(raw, golden["text_features"][:, 64:]) < 1e-4
    assert dino3.text.embed_texts(model, [], part="cls").shape == (0, 64)


def test_images_embed_through_metas_transform(model, golden):
    vectors = dino3.text.embed_images(model, [PHOTOS / "chelsea.png", PHOTOS / "rocket.jpg"], batch_size=1)
    assert max_diff(vectors, F.normalize(golden["image_features"], dim=-1)) < 1e-5


# -- zero-shot classification ------------------------------------------------------------------------------------
def test_classify_gives_metas_probabilities_in_the_pipelines_shape(model, golden):
    labels = CORPUS["texts"][:3]  # with the template "{}", each label is its own text
    found = dino3.text.classify(
        model, [PHOTOS / "chelsea.png", PHOTOS / "rocket.jpg"], candidate_labels=labels, hypothesis_template="{}"
    )
    expected = golden["image_logits"][:, :3].softmax(dim=-1)  # Meta's get_logits, then the softmax over labels
    for rows, probabilities in zip(found, expected):
        assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
        assert set(rows[0]) == {"score", "label"} and sorted(r["label"] for r in rows) == sorted(labels)
        for r in rows:
            assert r["score"] == pytest.approx(probabilities[labels.index(r["label"])].item(), abs=1e-5)
    one = dino3.text.classify(model, PHOTOS / "chelsea.png", candidate_labels=labels, hypothesis_template="{}")
    assert isinstance(one, list) and isinstance(one[0], dict)
    assert [r["label"] for r in one] == [r["label"] for r in found[0]]
    assert [r["score"] for r in one] == pytest.approx([r["score"] for r in found[0]], abs=1e-6)
    best = dino3.text.classify(model, PHOTOS / "chelsea.png", labels, "{}", top_k=1)
    assert len(best) == 1 and best[0]["label"] == found[0][0]["label"]


def test_several_templates_are_a_prompt_ensemble(model):
    templates = SEGMENT["templates"]
    vectors = dino3.text.label_embeddings(model, ["cat", "dog"], templates)
    each = torch.stack(
        [dino3.text.embed_texts(model, [t.format(x) for t in templates]).mean(0) for x in ("cat", "dog")]
    )
    assert max_diff(vectors, F.normalize(each, dim=-1)) < 1e-6


def test_zero_shot_inputs_are_checked(model):
    backbone = model.backbone
    with pytest.raises(UsageError, match="dino.txt model"):
        dino3.text.classify(backbone, PHOTOS / "chelsea.png", ["cat"])
    with pytest.raises(UsageError, match="no '{}'"):
        dino3.text.classify(model, PHOTOS / "chelsea.png", ["cat"], hypothesis_template="a photo")
    with pytest.raises(UsageError, match="repeated"):
        dino3.text.classify(model, PHOTOS / "chelsea.png", ["cat", "cat"])
    with pytest.raises(UsageError, match="at least one"):
        dino3.text.classify(model, PHOTOS / "chelsea.png", [])
    with pytest.raises(UsageError, match="strings"):
        dino3.text.embed_texts(model, [1, 2])


# -- zero-shot segmentation -------------------------------------------------------------------------------------
def test_label_vectors_match_metas_notebook(model, golden):
    vectors = dino3.text.label_embeddings(model, SEGMENT["labels"], SEGMENT["templates"], part="patch")
    assert max_diff(vectors, golden["segment_label_features"]) < 1e-5


@pytest.mark.parametrize("batch_size", [1, 4])
def test_window_probabilities_match_metas_predict_slide(model, golden, batch_size):
    probabilities = dino3.text.window_probabilities(
        model,
        golden["segment_pixels"],
        golden["segment_label_features"],
        window=SEGMENT["window"],
        stride=SEGMENT["stride"],
        batch_size=batch_size,
    )
    assert max_diff(probabilities, golden["segment_probabilities"]) < 1e-4


def test_windows_are_placed_as_the_notebook_places_them():
    assert dino3.text.windows(96, 144, 64, 32) == [
        (top, left, top + 64, left + 64) for top in (0, 32) for left in (0, 32, 64, 80)
    ]
    assert dino3.text.windows(50, 40, 64, 32) == [(0, 0, 50, 40)]  # smaller than a window: the whole image


def test_segment_labels_every_pixel_of_a_photo(model, golden):
    found = dino3.text.segment(
        model,
        PHOTOS / SEGMENT["photo"],
        SEGMENT["labels"],
        SEGMENT["templates"],
        short_side=SEGMENT["short_side"],
        window=SEGMENT["window"],
        stride=SEGMENT["stride"],
    )
    assert found.label_map.shape == (300, 451) and found.label_map.dtype == torch.int64
    assert found.probabilities.shape == (3, 300, 451)
    assert torch.allclose(found.probabilities.sum(0), torch.ones(300, 451), atol=1e-5)
    assert sum(found.areas.values()) == pytest.approx(1.0)
    assert sum(int(m.sum()) for m in found.masks().values()) == 300 * 451
    # Meta's notebook resizes with PIL, dino3 with torchvision's arithmetic: the maps agree but for rounding
    reference = F.interpolate(golden["segment_probabilities"][None], size=(300, 451), mode="bilinear")[0]
    assert (found.label_map == reference.argmax(0)).float().mean() > 0.95
    head = dino3.text.segment(model, PHOTOS / SEGMENT["photo"], ["cat", "dog"], features="head", short_side=64)
    assert head.label_map.shape == (300, 451)


def test_segment_options_are_checked(model):
    with pytest.raises(UsageError, match="features"):
        dino3.text.segment(model, PHOTOS / "chelsea.png", ["cat"], features="pixels")
    with pytest.raises(UsageError, match="window"):
        dino3.text.segment(model, PHOTOS / "chelsea.png", ["cat"], window=0)
