"""dino3.anomaly: AnomalyDINO equal to anomalib's on the same patch features (golden values made by
tests/golden/make_anomaly_golden.py), synthetic defects found and located on real photos and textures,
the threshold, the saved folder, and a clear error for every bad input.

The model is the small random-weight ViT (conftest `checkpoint`). Its features are not DINO's: the
good images here are one photo under gain and noise jitter, aligned (as parts on a fixture); good
images shifted by a fraction of a patch would need real weights to look alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import dino3
import dino3.anomaly as anomaly
from dino3.anomaly import Masking, Settings, fit_features, image_score, pixel_map
from dino3.errors import ImageError, UsageError

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"
TEXTURES = ROOT / "tests" / "data"  # brick.png, grass.png


def photo(name: str) -> Path:
    """A photo of examples/images, or a texture of tests/data."""
    return PHOTOS / name if (PHOTOS / name).exists() else TEXTURES / name


GOLDEN = Path(__file__).resolve().parent / "golden"
SIZE = 224  # px: the crops, and the resolution the tests use (a 14 x 14 patch grid)


# -- parity with anomalib ------------------------------------------------------------------------------------------
def golden():
    from safetensors import safe_open

    with safe_open(str(GOLDEN / "anomaly_features.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        grids = [f.get_tensor(f"grid.{i}") for i in range(len(meta["images"]))]
    with safe_open(str(GOLDEN / "anomaly_golden.safetensors"), "pt") as f:
        reference = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return meta, grids, reference


CASES = {
    "plain": {"neighbours": 1},
    "k3": {"neighbours": 3},
    "masked": {"neighbours": 1, "masking": True, "mask_shots": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_and_maps_equal_anomalib_on_the_same_features(case):
    meta, grids, reference = golden()
    good = meta["good"]
    settings = Settings(rotations=(0,), mask=Masking(threshold=meta["mask_threshold"]), **CASES[case])
    detector = fit_features([[g] for g in grids[:good]], settings, threshold=None)
    assert len(detector.bank) == int(reference[f"{case}.bank_rows"])  # the same patches kept by the mask
    for i in range(good, len(grids)):
        distances, _ = detector.patch_distances(grids[i])
        resized = tuple(meta["images"][i]["resized"])
        upsampled = pixel_map(distances, 16, resized, settings.sigma, settings.upsample)  # anomalib's map size
        assert abs(image_score(distances) - float(reference[f"{case}.score.{i}"])) < 1e-5
        expected = reference[f"{case}.map.{i}"]
        assert upsampled.shape == expected.shape
        assert float((upsampled - expected).abs().max()) < 1e-5


def test_the_golden_features_are_what_dino3_makes(tmp_path):
    """The features the golden values were made from are dino3's own: the same model and preprocessing
    give them again (so the parity above is on dino3's features, and a change of preprocessing shows)."""
    from helpers import save_small_vit

    meta, grids, _ = golden()
    maker = anomaly.FeatureMaker.for_model(str(save_small_vit(tmp_path, seed=0)), resolution=meta["resolution"])
    made = maker.features([str(photo(image["name"])) for image in meta["images"]])
    for (item,), grid, image in zip(made, grids, meta["images"]):
        assert list(item.resized) == image["resized"]
        assert item.grid.shape == grid.shape
        assert float((item.grid - grid).abs().max()) < 1e-4


# -- synthetic defects ---------------------------------------------------------------------------------------------
def jittered(name: str, count: int, seed: int) -> list[np.ndarray]:
    """`count` takes of the centre of a photo: gain 0.95-1.05 and pixel noise (sd 3 levels)."""
    image = np.asarray(Image.open(photo(name)).convert("RGB"), dtype=np.float64)
    top, left = (image.shape[0] - SIZE) // 2, (image.shape[1] - SIZE) // 2
    centre = image[top : top + SIZE, left : left + SIZE]
    rng = np.random.default_rng(seed)
    return [
        np.clip(centre * rng.uniform(0.95, 1.05) + rng.normal(0, 3, centre.shape), 0, 255).astype(np.uint8)
        for _ in range(count)
    ]


def pasted(image: np.ndarray, n: int):
    """A 40 px square of another photo pasted in; the defect's box (top, left, bottom, right)."""
    other = np.asarray(Image.open(PHOTOS / "rocket.jpg").convert("RGB"))
    out, (y, x) = image.copy(), (40 + 30 * n, 50 + 20 * n)
    out[y : y + 40, x : x + 40] = other[200:240, 200:240]
    return out, (y, x, y + 40, x + 40)


def scratch(image: np.ndarray, n: int):
    """A thin light line across the image."""
    picture = Image.fromarray(image)
    y = 60 + 30 * n
    ImageDraw.Draw(picture).line([(40, y), (120, y + 30)], fill=(250, 250, 250), width=4)
    return np.asarray(picture), (y - 4, 40, y + 34, 120)


def spot(image: np.ndarray, n: int):
    """A round magenta spot, 28 px across."""
    picture = Image.fromarray(image)
    cx, cy = 70 + 40 * n, 90 + 20 * n
    ImageDraw.Draw(picture).ellipse([cx - 14, cy - 14, cx + 14, cy + 14], fill=(200, 30, 160))
    return np.asarray(picture), (cy - 14, cx - 14, cy + 14, cx + 14)


def holds_the_peak(patch_scores: np.ndarray, box, patch: int = 16) -> bool:
    """The highest patch score lies on a patch that the defect's box touches (one patch of slack)."""
    row, column = np.unravel_index(int(np.argmax(patch_scores)), patch_scores.shape)
    top, left, bottom, right = box
    return (
        top // patch - 1 <= row <= (bottom - 1) // patch + 1 and left // patch - 1 <= column <= (right - 1) // patch + 1
    )


@pytest.mark.parametrize("photo", ["brick.png", "grass.png", "coffee.png", "chelsea.png"])
def test_defects_rank_above_good_images_and_hold_the_highest_patch_scores(checkpoint, photo):
    detector = anomaly.fit(jittered(photo, 4, seed=0), model=str(checkpoint), resolution=SIZE, rotate=False)
    test = jittered(photo, 6, seed=1)
    good = detector.score(test)
    assert detector.threshold is not None
    for make in (pasted, scratch, spot):
        defective = [make(image, n) for n, image in enumerate(test[:3])]
        results = detector.score([image for image, _ in defective])
        assert min(r.score for r in results) > max(r.score for r in good), make.__name__
        assert all(r.anomalous for r in results), make.__name__
        for result, (_, box) in zip(results, defective):
            assert holds_the_peak(result.patch_scores, box), make.__name__
            assert result.map.shape == (SIZE, SIZE)
            row, column = np.unravel_index(int(np.argmax(result.map)), result.map.shape)
            top, left, bottom, right = box
            assert top - 24 <= row <= bottom + 24 and left - 24 <= column <= right + 24, make.__name__


def test_rotated_shots_make_a_turned_good_image_good(checkpoint):
    shots = jittered("brick.png", 2, seed=0)
    turned = np.ascontiguousarray(np.rot90(jittered("brick.png", 1, seed=1)[0]))  # a quarter turn: exact pixels
    plain = anomaly.fit(shots, model=str(checkpoint), resolution=SIZE, rotate=False, threshold=None)
    rotated = anomaly.fit(shots, model=str(checkpoint), resolution=SIZE, rotate=True, threshold=None)
    assert len(rotated.bank) == 8 * len(plain.bank)
    assert rotated.score(turned)[0].score < 0.5 * plain.score(turned)[0].score


def test_rotation_is_opencvs_warp_affine():
    """scoring.rotate against cv2.warpAffine (the paper's call), stored by the golden script."""
    from safetensors import safe_open

    with safe_open(str(GOLDEN / "anomaly_golden.safetensors"), "pt") as f:
        source = f.get_tensor("rotation.source")  # (H, W, 3) uint8
        for angle in (45, 90, 135, 200):
            expected = f.get_tensor(f"rotation.{angle}").int()
            turned = anomaly.rotate(source.permute(2, 0, 1), angle).permute(1, 2, 0).int()
            differ = (turned - expected).abs()
            assert int(differ.max()) <= 2 and float((differ > 0).float().mean()) < 0.05, angle


# -- the threshold -------------------------------------------------------------------------------------------------
def test_leave_one_out_scores_are_each_good_image_against_the_others():
    generator = torch.Generator().manual_seed(0)
    shots = [[torch.randn(6, 7, 32, generator=generator) for _ in range(2)] for _ in range(4)]  # 4 images, 2 turns
    for settings in (Settings(rotations=(0, 90)), Settings(rotations=(0, 90), neighbours=3)):
        detector = fit_features(shots, settings)
        for i in range(4):
            others = fit_features([s for j, s in enumerate(shots) if j != i], settings, threshold=None)
            alone = others.score_features([shots[i][0]])[0].score
            assert abs(detector.leave_one_out[i] - alone) < 1e-6
        assert detector.threshold == max(detector.leave_one_out)
        assert detector.threshold_source == "leave-one-out"


def test_threshold_from_one_image_or_the_user():
    grid = torch.randn(5, 5, 16)
    lone = fit_features([[grid]])
    assert lone.threshold is None and lone.score_features([grid])[0].anomalous is None
    lone.set_threshold(0.25)
    assert lone.threshold_source == "user"
    assert lone.score_features([grid])[0].anomalous is False
    assert lone.score_features([-grid])[0].anomalous is True
    assert fit_features([[grid], [grid * 2]], threshold=0.5).threshold == 0.5


@pytest.mark.parametrize("bad", ["high", -0.1, 2.5, float("nan"), True, [0.3]])
def test_a_wrong_threshold_is_refused(bad):
    with pytest.raises(UsageError, match="threshold"):
        fit_features([[torch.randn(4, 4, 8)]], threshold=bad)
    detector = fit_features([[torch.randn(4, 4, 8)]])
    with pytest.raises(UsageError, match="threshold"):
        detector.set_threshold(bad)


# -- search, mask, pictures ------------------------------------------------------------------------------------
def test_the_approximate_search_is_close_to_the_exact_one_and_never_nearer():
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(40, 48, generator=generator)
    shots = [
        [
            centres[torch.randint(0, 40, (30, 30), generator=generator)]
            + 0.3 * torch.randn(30, 30, 48, generator=generator)
        ]
    ]
    test = [
        centres[torch.randint(0, 40, (12, 12), generator=generator)]
        + 0.3 * torch.randn(12, 12, 48, generator=generator)
    ]
    exact = fit_features(shots, Settings(rotations=(0,)), threshold=None)
    approximate = fit_features(shots, Settings(rotations=(0,), exact_up_to=100), threshold=None)
    assert not exact.bank.approximate and approximate.bank.approximate
    a, _ = approximate.patch_distances(test[0])
    e, _ = exact.patch_distances(test[0])
    assert bool((a >= e - 1e-6).all())
    assert float((a - e).abs().mean()) < 0.01


def test_the_mask_keeps_the_object_and_turns_the_component():
    """A bright object in the middle of a plain background: whichever sign the PCA gives, the object
    is kept (the centre rule), dilated by one patch."""
    grid = torch.zeros(12, 12, 8)
    grid[..., 0] = -5.0
    grid[3:9, 3:9, 0] = 20.0  # 36 of the 49 centre patches
    grid += 0.01 * torch.randn(12, 12, 8)
    for sign in (1, -1):
        mask = Masking(threshold=5.0)(sign * grid)
        expected = torch.zeros(12, 12, dtype=torch.bool)
        expected[2:10, 2:10] = True
        assert torch.equal(mask, expected)


def test_maps_written_as_pictures_and_scores_as_json(checkpoint, tmp_path):
    shots = jittered("coffee.png", 3, seed=0)
    detector = anomaly.fit(shots, model=str(checkpoint), resolution=SIZE, rotate=False)
    bad, box = spot(jittered("coffee.png", 1, seed=1)[0], 0)
    paths = []
    for i, image in enumerate((bad, shots[0])):
        paths.append(tmp_path / f"in-{i}.png")
        Image.fromarray(image).save(paths[-1])
    results = detector.score([str(p) for p in paths], maps=tmp_path / "maps")
    assert [r.picture.name for r in results] == ["in-0.png", "in-1.png"]
    picture = np.asarray(Image.open(results[0].picture))
    assert picture.shape[0] == SIZE and picture.shape[1] > SIZE  # the image, then the colour bar
    assert oct(results[0].picture.stat().st_mode & 0o777) == "0o644"
    top, left, bottom, right = box
    inside = picture[top:bottom, left:right].astype(float).sum(-1).mean()
    assert inside > picture[:40, 150:SIZE].astype(float).sum(-1).mean()  # the defect glows
    document = anomaly.scores_document(results, detector.threshold)
    assert document["images"][0] == {"path": str(paths[0]), "score": results[0].score, "anomalous": True}
    anomaly.write_scores(results, tmp_path / "scores.json", detector.threshold)
    assert json.loads((tmp_path / "scores.json").read_text())["images"][1]["anomalous"] is False


# -- the saved folder ------------------------------------------------------------------------------------------------
def test_save_and_load_give_the_same_scores_and_refuse_another_model(checkpoint, tmp_path):
    from helpers import save_small_vit

    shots = jittered("chelsea.png", 3, seed=0)
    test = [spot(jittered("chelsea.png", 1, seed=1)[0], 0)[0], jittered("chelsea.png", 1, seed=2)[0]]
    detector = anomaly.fit(
        shots, model=str(checkpoint), resolution=SIZE, rotate=False, masking=True, mask_threshold=1.0
    )
    before = detector.score(test)
    folder = detector.save(tmp_path / "detector")
    assert sorted(os.listdir(folder)) == ["bank.safetensors", "detector.json"]
    for name in os.listdir(folder):
        assert oct((folder / name).stat().st_mode & 0o777) == "0o644"
    recipe = json.loads((folder / "detector.json").read_text())["recipe"]
    assert recipe["model"] == str(checkpoint) and recipe["processor"]["target_size"] == SIZE
    assert recipe["dtype"] == "float32" and len(recipe["model_fingerprint"]) > 0

    loaded = anomaly.load(folder)
    assert loaded.settings == detector.settings and loaded.threshold == detector.threshold
    after = loaded.score(test)  # loads the recorded model
    for a, b in zip(before, after):
        assert a.score == b.score and a.anomalous == b.anomalous
        assert np.array_equal(a.patch_scores, b.patch_scores) and np.array_equal(a.map, b.map)
    assert loaded.score(test, model=dino3.load(str(checkpoint)))[0].score == before[0].score

    other = save_small_vit(tmp_path / "other", seed=1)  # the same architecture, other weights
    with pytest.raises(UsageError, match="(?s)another model.*compute other numbers"):
        loaded.score(test, model=str(other))
    with pytest.raises(UsageError, match="(?s)another model.*hidden_size: 64 -> 96"):
        helpers_wider = dino3.DINOv3ViTModel(dino3.DINOv3ViTConfig(hidden_size=96, num_attention_heads=2))
        loaded.score(test, model=helpers_wider)


def test_a_damaged_or_foreign_folder_is_refused(tmp_path):
    detector = fit_features([[torch.randn(4, 4, 8)], [torch.randn(4, 4, 8)]])
    folder = detector.save(tmp_path / "d")
    with pytest.raises(UsageError, match="no such detector folder"):
        anomaly.load(tmp_path / "missing")
    with pytest.raises(UsageError, match="not a detector"):
        anomaly.load(tmp_path)
    other = fit_features([[torch.randn(4, 4, 8)]]).save(tmp_path / "e")
    os.replace(other / "bank.safetensors", folder / "bank.safetensors")
    with pytest.raises(UsageError, match="does not belong"):
        anomaly.load(folder)
    (folder / "bank.safetensors").write_bytes(b"truncated")
    with pytest.raises(UsageError, match="damaged"):
        anomaly.load(folder)
    (folder / "detector.json").write_text("{")
    with pytest.raises(UsageError, match="damaged"):
        anomaly.load(folder)
    with pytest.raises(UsageError, match="bare features"):
        fit_features([[torch.randn(4, 4, 8)]]).score(np.zeros((32, 32, 3), np.uint8))


# -- bad inputs ------------------------------------------------------------------------------------------------------
def test_bad_inputs_get_clear_errors(checkpoint, tmp_path):
    model = dino3.load(str(checkpoint))
    good = jittered("brick.png", 2, seed=0)
    with pytest.raises(UsageError, match="no good images"):
        anomaly.fit([], model=model)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="corrupt.png"):
        anomaly.fit([good[0], str(corrupt)], model=model, resolution=SIZE, rotate=False)
    with pytest.raises(ImageError, match="missing.png"):
        anomaly.fit([str(tmp_path / "missing.png")], model=model)
    for options, words in (
        ({"resolution": 8}, "resolution"),
        ({"neighbours": 0}, "neighbours"),
        ({"top_fraction": 0}, "top_fraction"),
        ({"upsample": "cubic"}, "upsample"),
        ({"mask_threshold": float("inf")}, "mask threshold"),
        ({"sigma": -1}, "sigma"),
        ({"dtype": "bfloat16"}, "dtype and device apply"),
    ):
        with pytest.raises(UsageError, match=words):
            anomaly.fit(good, model=model, **options)
    with pytest.raises(UsageError, match="float16 is refused"):
        anomaly.fit(good, model=str(checkpoint), dtype="float16")
    with pytest.raises(UsageError, match="model must be"):
        anomaly.fit(good, model=42)
    detector = anomaly.fit(good, model=model, resolution=SIZE, rotate=False)
    with pytest.raises(UsageError, match="no images to score"):
        detector.score([])
    with pytest.raises(ImageError, match="corrupt.png"):
        detector.score([good[1], str(corrupt)])
    with pytest.raises(UsageError, match=r"\(h, w, 64\)"):
        detector.score_features([torch.randn(4, 4, 32)])
    with pytest.raises(UsageError, match="at least one"):
        fit_features([])
    with pytest.raises(UsageError, match="one D"):
        fit_features([[torch.randn(4, 4, 8)], [torch.randn(4, 4, 9)]])


def test_the_commands_fit_and_score_a_folder_with_planted_defects(checkpoint, tmp_path, capsys):
    """`dino3 anomaly fit` then `score` on a folder: JSON scores in the issue's shape, an overlay per
    image, the defective images flagged and ranked above the good ones; a broken file is listed and
    the others scored (exit 3)."""
    from dino3.cli import main

    good, new = tmp_path / "good", tmp_path / "new"
    good.mkdir(), new.mkdir()
    for i, image in enumerate(jittered("coffee.png", 4, seed=0)):
        Image.fromarray(image).save(good / f"good-{i}.png")
    test = jittered("coffee.png", 4, seed=1)
    for i, image in enumerate(test[:2]):
        Image.fromarray(image).save(new / f"ok-{i}.png")
    for i, image in enumerate(test[2:]):
        Image.fromarray(spot(image, i)[0]).save(new / f"spot-{i}.png")
    (new / "broken.png").write_bytes(b"\x89PNG not really")
    detector = tmp_path / "detector"
    fit = ["anomaly", "fit", str(good), "-m", str(checkpoint), "-o", str(detector), "--resolution", str(SIZE)]
    assert main([*fit, "--no-rotate", "-q"]) == 0
    assert (detector / "detector.json").is_file()
    with pytest.raises(SystemExit):  # a detector is not replaced without --overwrite
        main([*fit, "--no-rotate", "-q"])
    scores, maps = tmp_path / "scores.json", tmp_path / "maps"
    status = main(["anomaly", "score", str(new), "--detector", str(detector), "--json", str(scores), "-o", str(maps)])
    assert status == 3 and "broken.png" in capsys.readouterr().err
    rows = {Path(r["path"]).stem: r for r in json.loads(scores.read_text())["images"]}
    assert sorted(rows) == ["ok-0", "ok-1", "spot-0", "spot-1"]
    assert all(rows[f"spot-{i}"]["anomalous"] for i in range(2))
    assert min(rows[f"spot-{i}"]["score"] for i in range(2)) > max(rows[f"ok-{i}"]["score"] for i in range(2))
    assert len(list(maps.glob("*.png"))) == 4
