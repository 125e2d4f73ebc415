"""Edge inputs of the dense tools at unit level: every refusal names the thing, and the results equal
independent answers."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from dino3 import dense, linear
from dino3.dense import foreground as fg
from dino3.dense import pca
from dino3.errors import UsageError


def grids_and_labels(seed=0, dim=4):
    """Two (3, 3, dim) grids whose foreground (label 1) patches are shifted along the first axis."""
    g = torch.Generator().manual_seed(seed)
    labels = [torch.zeros(3, 3), torch.zeros(3, 3)]
    labels[0][0, :] = 1
    labels[1][1:, 1] = 1
    grids = [torch.randn(3, 3, dim, generator=g) + 2.0 * lab[..., None] * torch.eye(dim)[0] for lab in labels]
    return grids, labels


# -- foreground ---------------------------------------------------------------------------------------------
def test_a_foreground_choice_other_than_auto_is_refused():
    """foreground is a classifier, "auto" or None: another string is refused naming it; None: every patch."""
    grid = torch.randn(4, 4, 8)
    with pytest.raises(UsageError, match="foreground must be a ForegroundClassifier, 'auto' or None, got 'Auto'"):
        dense.foreground_mask(grid, "Auto")
    assert dense.foreground_mask(grid, None) is None


def test_training_refuses_grids_and_labels_that_do_not_pair():
    """Counts, shapes, masks with one kind of patch only, and a bad C are refused naming the problem."""
    grids, labels = grids_and_labels()
    for args, kwargs, message in [
        ((grids, labels[:1]), {}, "give one label grid per feature grid, and at least one of each"),
        (([], []), {}, "give one label grid per feature grid"),
        ((grids, [labels[0], torch.zeros(3, 4)]), {}, "image 1: labels of shape (3, 4) for a patch grid (3, 3)"),
        ((grids, [torch.zeros(3, 3)] * 2), {}, "the masks give no foreground patches"),
        ((grids, [torch.ones(3, 3)] * 2), {}, "the masks give no background patches"),
        ((grids, [torch.full((3, 3), 0.5)] * 2), {}, "the masks give no clear patches"),
        ((grids, labels), {"C": 0}, "C must be a number > 0, got 0"),
        ((grids, labels), {"C": True}, "C must be a number > 0, got True"),
        ((grids, labels), {"C": float("inf")}, "C must be a number > 0, got inf"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            dense.train_foreground(*args, **kwargs)


def test_labels_within_the_clear_margin_are_kept_and_beyond_it_left_out():
    """A label of exactly 0.01 (or 0.99) is not clear; 0.009 is (kept, as background)."""
    grids, labels = grids_and_labels()
    near = [lab.double() for lab in labels]  # float64: the boundary exactly
    near[0][2, 2] = 0.009
    near[1][0, 0] = 0.01  # left out
    near[1][2, 2] = 0.99  # left out
    classifier = dense.train_foreground(grids, near, C=1.0)
    kept = torch.cat([g.reshape(-1, 4) for g in grids])
    keep = torch.ones(18, dtype=torch.bool)
    keep[9 + 0] = keep[9 + 8] = False
    y = torch.cat([lab.reshape(-1) for lab in labels]).long()
    model = linear.fit(kept[keep].double(), y[keep], 2, 1.0, solver="newton", tol=1e-10, max_iter=200)
    assert torch.allclose(classifier.weight, model.weight[1] - model.weight[0], atol=1e-6)


def test_choosing_c_needs_two_images_and_one_that_can_be_held_out():
    """Leave-one-image-out needs 2 images; and an image whose others hold both classes."""
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(UsageError, match="needs at least 2 images with labelled patches; give C"):
        dense.sweep_c(x, torch.tensor([0, 1, 0, 1, 0, 1]), torch.zeros(6, dtype=torch.long))
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(UsageError, match="no image could be held out"):
        dense.sweep_c(x, y, y.clone())


def test_the_deprecated_fit_from_a_start_reaches_the_same_parameters():
    """fit_logistic's init (weights then intercept) is a warm start: the same optimum as without one."""
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    y[:4] = 1 - y[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cold = dense.fit_logistic(x, y, 0.5)
        warm = dense.fit_logistic(x, y, 0.5, init=torch.tensor([5.0, -2.0, 1.0, 3.0]))
    assert torch.allclose(cold, warm, atol=1e-7)
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=0.5 * 40 / 40, tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
    assert np.allclose(warm[:-1].numpy(), ref.coef_[0], atol=1e-4) and abs(float(warm[-1]) - ref.intercept_[0]) < 1e-4


def test_a_classifier_of_another_width_is_refused():
    """Patch features of another width than the classifier's are refused naming both widths."""
    grids, labels = grids_and_labels()
    classifier = dense.train_foreground(grids, labels, C=1.0)
    with pytest.raises(UsageError, match="takes 4-dim patch features; got 6-dim ones"):
        classifier.probabilities(torch.zeros(3, 3, 6))
    p = classifier.probabilities(grids[0].float()).double()
    logit = grids[0].double() @ classifier.weight + classifier.bias
    assert torch.allclose(p, torch.sigmoid(logit), atol=1e-6)


def test_classifier_files_that_are_not_classifiers_are_refused(tmp_path):
    """No file, not safetensors, safetensors of something else, a damaged quality record."""
    from safetensors.torch import save_file

    with pytest.raises(UsageError, match="gone.safetensors: no such classifier file"):
        dense.ForegroundClassifier.load(tmp_path / "gone.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(UsageError, match="bad.safetensors: not a safetensors file"):
        dense.ForegroundClassifier.load(bad)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(4), "bias": torch.zeros(1)}, str(other), metadata={"format": "x"})
    with pytest.raises(UsageError, match="not a dino3 foreground classifier"):
        dense.ForegroundClassifier.load(other)
    save_file({"weight": torch.zeros(4)}, str(other), metadata={"format": fg.FORMAT})
    with pytest.raises(UsageError, match="not a dino3 foreground classifier"):
        dense.ForegroundClassifier.load(other)
    grids, labels = grids_and_labels()
    good = dense.train_foreground(grids, labels).save(tmp_path / "good.safetensors")
    back = dense.ForegroundClassifier.load(good)
    assert back.sweep is not None and back.sweep.folds == [0, 1] and back.quality is not None
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(other), metadata={**metadata, "quality": '{"nonsense": 1}'})
    with pytest.raises(UsageError, match="its quality record is damaged; train the classifier again"):
        dense.ForegroundClassifier.load(other)


# -- PCA ----------------------------------------------------------------------------------------------------
def test_pca_inputs_that_are_not_patch_grids_are_refused():
    """2-D or integer grids, grids of two widths, no grids, a mask count or shape that does not fit."""
    grid = torch.randn(3, 3, 4)
    for args, message in [
        ((torch.randn(3, 4),), "grid: expected patch features of shape (h, w, D) in floating point, got (3, 4)"),
        ((torch.zeros(3, 3, 4, dtype=torch.long),), "got (3, 3, 4) torch.int64"),
        (([grid, torch.randn(3, 3, 8)],), "the grids have different feature sizes [4, 8]"),
        (([],), "no patch grids given"),
        (([grid, grid], [torch.ones(3, 3, dtype=torch.bool)]), "give one mask per grid"),
        ((grid, torch.ones(2, 2)), "mask: its shape (2, 2) is not the patch grid's (3, 3)"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            dense.pca_rgb(*args)
    fitted = dense.fit_pca([grid])
    with pytest.raises(UsageError, match="this PCA was fitted on 4-dim features; got 8-dim ones"):
        fitted.transform(torch.randn(3, 3, 8))


def test_pca_keeps_float64_and_takes_a_float_mask_at_one_half():
    """float64 grids stay float64; a float mask counts above 0.5 as foreground (0.5 itself is not)."""
    assert pca._as_grid(torch.zeros(2, 2, 3, dtype=torch.float64), "g").dtype == torch.float64
    assert pca._as_grid(np.zeros((2, 2, 3), np.float16), "g").dtype == torch.float32
    mask = pca._as_mask(np.array([[0.5, 0.51], [0.0, 1.0]]), (2, 2), "m")
    assert mask.tolist() == [[False, True], [False, True]]


def test_too_few_foreground_patches_fit_the_pca_on_every_patch_with_a_note():
    """Foreground patches <= 3 (the components): the PCA is fitted on every patch and a note says so."""
    grid = torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, :3] = True  # 3 patches: too few
    fitted, note = dense.fit_foreground_pca([grid], [mask])
    assert note.startswith("3 foreground patches, too few for the PCA")
    assert torch.allclose(fitted.mean, dense.fit_pca([grid]).mean)
    mask[0, 3] = True  # 4: enough
    fitted, note = dense.fit_foreground_pca([grid], [mask])
    assert note is None and torch.allclose(fitted.mean.float(), grid[0].mean(dim=0), atol=1e-5)
    for masks in (None, [None]):  # no mask, or an image without one: every patch
        fitted, note = dense.fit_foreground_pca([grid], masks)
        assert note is None and torch.allclose(fitted.mean.float(), grid.reshape(16, 6).mean(dim=0), atol=1e-5)


# -- matching and high resolution ---------------------------------------------------------------------------
def test_grids_of_two_widths_and_a_negative_spacing_are_refused():
    """Matching needs one model's features for both grids; sparse() needs a spacing >= 0 (0 is fine)."""
    with pytest.raises(UsageError, match=re.escape("different feature sizes (4 and 8): one model for both")):
        dense.nearest_patches(torch.randn(2, 2, 4), torch.randn(2, 2, 8))
    matches = dense.Matches(
        torch.zeros(2, 2, dtype=torch.float64),
        torch.zeros(2, 2, dtype=torch.float64),
        torch.tensor([0.9, 0.8]),
        torch.tensor([0, 1]),
        torch.tensor([0, 1]),
    )
    with pytest.raises(UsageError, match="spacing must be >= 0 px, got -1"):
        dense.sparse(matches, -1)
    assert len(dense.sparse(matches, 0)) == 2 and len(dense.sparse(matches, 0.5)) == 1


def test_a_bad_height_or_pixels_of_another_shape_are_refused():
    """height is a whole number >= 1 (1 passes the check); pixels are one (3, H, W) image."""
    for height in (0, -5, True, 1.5):
        with pytest.raises(UsageError, match=re.escape(f"height must be a whole number of pixels, got {height!r}")):
            dense.processor_for(object(), height=height)
    with pytest.raises(UsageError, match=re.escape("pixels must be one (3, H, W) image, got (1, 32, 32)")):
        dense.dense_features(object(), torch.zeros(1, 32, 32))
    with pytest.raises(UsageError, match=re.escape("got (1, 3, 32, 32)")):
        dense.dense_features(object(), torch.zeros(1, 3, 32, 32))


def test_a_model_without_attention_needs_no_attention_memory():
    """ConvNeXt (no attention heads in its config): 0 bytes."""
    from types import SimpleNamespace

    assert dense.attention_bytes(SimpleNamespace(config=SimpleNamespace()), 512, 512) == 0


# -- pictures -----------------------------------------------------------------------------------------------
def test_to_uint8_takes_grey_channel_first_and_float_images():
    """(H, W) and (1, H, W) grey repeat to 3 channels; floats are scaled by 255 and rounded, clipped."""
    from dino3.dense.render import to_uint8

    grey = np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)
    expected = np.repeat(np.array([[0, 128], [255, 255]], np.uint8)[..., None], 3, axis=-1)
    assert np.array_equal(to_uint8(grey), expected)
    assert np.array_equal(to_uint8(torch.from_numpy(grey)[None]), expected)
    assert np.array_equal(
        to_uint8(np.array([[-0.2, 0.002]])), np.repeat(np.array([[0, 1]], np.uint8)[..., None], 3, -1)
    )
    chw = torch.arange(3 * 2 * 4, dtype=torch.uint8).reshape(3, 2, 4)
    assert np.array_equal(to_uint8(chw), chw.permute(1, 2, 0).numpy())


def test_label_colours_repeat_the_palette_darker_past_its_end():
    """Colours cycle through the palette; the second round is the palette at 0.6, the third as the first."""
    from dino3.dense.render import PALETTE, label_colours

    n = len(PALETTE)
    colours = label_colours(3 * n)
    assert np.array_equal(colours[:n], PALETTE.astype(np.uint8))
    assert np.array_equal(colours[n : 2 * n], (PALETTE * 0.6).astype(np.uint8))
    assert np.array_equal(colours[2 * n :], colours[:n])


def test_a_segmentation_picture_blends_the_label_colours_and_draws_a_legend():
    """Each pixel is (1 - alpha) photo + alpha colour of its label, rounded; the legend sits on the right."""
    from types import SimpleNamespace

    from dino3.dense.render import label_colours, segmentation_picture

    photo = np.full((40, 30, 3), 100, np.uint8)
    label_map = torch.zeros(40, 30, dtype=torch.long)
    label_map[:, 15:] = 1
    segmentation = SimpleNamespace(labels=["sky", "sea"], label_map=label_map, areas={"sky": 0.5, "sea": 0.5})
    picture = segmentation_picture(photo, segmentation, alpha=0.5)
    assert picture.shape == (18 * 2 + 8, 30 + 220, 3)  # the legend is taller than the photo
    assert (picture[40:, :30] == 255).all()  # white below the photo
    colours = label_colours(2).astype(np.float64)
    assert np.array_equal(picture[0, 0], np.round(0.5 * 100 + 0.5 * colours[0]).astype(np.uint8))
    assert np.array_equal(picture[39, 29], np.round(0.5 * 100 + 0.5 * colours[1]).astype(np.uint8))
    assert np.array_equal(picture[10, 30 + 15], colours[0].astype(np.uint8))  # the first swatch
    # the second swatch, a line (18 px) below: rows 24 to 36, white past them
    assert np.array_equal(picture[24, 30 + 15], colours[1].astype(np.uint8))
    assert np.array_equal(picture[36, 30 + 15], colours[1].astype(np.uint8)) and (picture[37, 30 + 15] == 255).all()
    tall = SimpleNamespace(
        labels=[f"l{i}" for i in range(5)],
        label_map=torch.zeros(40, 30, dtype=torch.long),
        areas={f"l{i}": 0.2 for i in range(5)},
    )
    assert segmentation_picture(photo, tall).shape == (max(40, 18 * 5 + 8), 250, 3)


# -- masks --------------------------------------------------------------------------------------------------
def test_masks_are_read_from_alpha_16_bit_grey_or_grey_and_a_bad_file_is_named(tmp_path):
    """An RGBA mask is its alpha (not its colour); a 16-bit mask is value / 65535; grey is / 255;
    a file that is no image is an ImageError that says it was the mask."""
    from PIL import Image

    from dino3.errors import ImageError

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = 255  # white colour everywhere
    rgba[0, 1, 3] = 255
    rgba[1, 2, 3] = 51
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert torch.allclose(dense.read_mask(tmp_path / "alpha.png"), torch.tensor([[0, 1, 0], [0, 0, 0.2]]))
    Image.fromarray(np.array([[0, 65535], [32768, 13107]], np.uint16)).save(tmp_path / "deep.png")
    mask = dense.read_mask(tmp_path / "deep.png")
    assert mask.dtype == torch.float32
    assert torch.allclose(mask, torch.tensor([[0, 1], [32768 / 65535, 0.2]]), atol=1e-6)
    Image.fromarray(np.array([[0, 255], [102, 0]], np.uint8)).convert("RGB").save(tmp_path / "rgb.png")
    assert torch.allclose(dense.read_mask(tmp_path / "rgb.png"), torch.tensor([[0, 1], [0.4, 0]]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"bad.png.*\(a mask\)$"):
        dense.read_mask(tmp_path / "bad.png")


def test_newton_fits_up_to_its_dimension_and_lbfgs_beyond():
    """The foreground solver: Newton at exactly linear.NEWTON_MAX_DIM features, L-BFGS one above."""
    assert fg._solver(linear.NEWTON_MAX_DIM)["solver"] == "newton"
    assert fg._solver(linear.NEWTON_MAX_DIM + 1)["solver"] == "lbfgs"
    assert fg._solver(1)["solver"] == "newton"


def test_a_classifier_as_the_foreground_choice_gives_its_mask():
    """foreground_mask(grid, classifier) is the classifier's mask: the median-filtered probability > 0.5
    (the filter is checked against scipy in test_dense)."""
    g = torch.Generator().manual_seed(1)
    labels = [torch.zeros(6, 6), torch.zeros(6, 6)]
    labels[0][:3] = 1
    labels[1][:, :2] = 1
    grids = [0.5 * torch.randn(6, 6, 4, generator=g) + 3.0 * lab[..., None] * torch.eye(4)[0] for lab in labels]
    classifier = dense.train_foreground(grids, labels, C=1.0)
    expected = dense.median_filter3(classifier.probabilities(grids[0])) > 0.5
    assert torch.equal(dense.foreground_mask(grids[0], classifier), classifier.mask(grids[0]))
    assert torch.equal(classifier.mask(grids[0]), expected) and expected.any() and not expected.all()


def test_patch_centres_undo_a_plain_resize_a_centre_crop_and_no_resize():
    """Hand-computed centres (x, y) = ((i + 0.5) * 16 + crop offset) * (original / resized) - 0.5."""
    import dino3

    plain = dino3.DINOv3ViTImageProcessor()  # 224 x 224, aspect not kept
    centres = dense.patch_centres((2, 2), (448, 224), plain)
    assert centres[..., 0].tolist() == [[7.5, 23.5], [7.5, 23.5]]  # x: 224 px wide, not scaled
    assert centres[..., 1].tolist() == [[15.5, 15.5], [47.5, 47.5]]  # y: 448 -> 224, scaled by 2
    cropped = dino3.DINOv3ViTImageProcessor(
        size={"height": 256, "width": 256}, do_center_crop=True, crop_size={"height": 224, "width": 224}
    )
    assert dense.patch_centres((1, 1), (512, 256), cropped).tolist() == [[[(8 + 16) * 1 - 0.5, (8 + 16) * 2 - 0.5]]]
    unresized = dino3.DINOv3ViTImageProcessor(do_resize=False)
    centres = dense.patch_centres((2, 3), (32, 48), unresized)
    assert centres[1, 2].tolist() == [39.5, 23.5] and centres[0, 0].tolist() == [7.5, 7.5]


def test_match_lines_end_where_b_is_drawn_when_the_images_differ_in_height():
    """match_picture scales each image to the picture's height by its own factor: a match into a
    half-height B ends at twice B's coordinates, right of A and the gap. Planted: B's points scaled
    by A's factor (the lines end in the wrong place)."""
    from dino3.dense.render import GAP, match_picture

    a = np.zeros((100, 60, 3), np.uint8)
    b = np.zeros((50, 40, 3), np.uint8)  # drawn at 100 px: twice its size
    picture = match_picture(a, b, torch.tensor([[10.0, 20.0]]), torch.tensor([[30.0, 10.0]]), height=100)
    assert picture.shape == (100, 60 + GAP + 80, 3)
    x, y = round(30.5 * 2 - 0.5) + 60 + GAP, round(10.5 * 2 - 0.5)  # B's point, scaled by 2, moved right
    assert picture[y - 1 : y + 2, x - 1 : x + 2].any()
    assert picture[19:22, 9:12].any()  # A's point, at scale 1
    wrong_x, wrong_y = 30 + 60 + GAP, 10  # where B's point would be at A's scale
    assert not picture[wrong_y - 3 : wrong_y - 1, wrong_x + 3 : wrong_x + 6].any()


def test_tiles_side_by_side_are_allowed_and_a_stride_past_the_crop_is_not():
    """Tiling: stride == crop (windows that touch, none overlapping) is valid; stride > crop (gaps
    between windows) or 0 is refused. Planted: `stride < crop` (the touching windows refused)."""
    from dino3.dense.highres import Tiling

    assert Tiling(crop=32, stride=32).windows(100, 16) == [0, 32, 64]
    for stride in (48, 0):
        with pytest.raises(UsageError, match="0 < stride <= crop"):
            Tiling(crop=32, stride=stride).windows(100, 16)


# -- conditions on their boundaries (issue 31, sixth sweep) ------------------------------------------------
def test_quality_thresholds_are_strict_on_their_boundaries():
    """Each weakness test on its boundary: a held-out AP exactly half-way from a guess to 1, a top
    probability of exactly 0.5, masks finding (or marking) exactly half: none is weak; just past each,
    that one is. Planted: `<=` for `<` (and `>=` for `>`) in each test of Quality.problems."""
    assert dense.Quality(0.75, 0.5, 0.9, 0.02, 0.99).problems == []  # 0.5 + 0.5 * (1 - 0.5)
    assert dense.Quality(0.5, 0.5, 0.5, 0.5, 0.5).problems[1:] == []  # only the AP: 0.5 < 0.75
    assert dense.Quality(None, 0.5, 0.5, 0.5, 0.5).problems == []
    assert dense.Quality(0.74, 0.5, 0.9, 0.02, 0.99).weak
    assert "never reach 0.5" in dense.Quality(None, 0.5, 0.9, 0.02, 0.49).problems[0]
    assert dense.Quality(None, 0.5, 0.49, 0.02, 0.99).problems == [
        "on its own training images its masks find only 49% of the foreground"
    ]
    assert dense.Quality(None, 0.5, 0.9, 0.51, 0.99).problems == [
        "on its own training images its masks mark 51% of the background"
    ]


def _runtime(backend, heads=2, grid=(4, 4), prefix=5):
    """A stand-in runtime: `heads` heads, a fixed patch grid and `prefix` class and register tokens."""
    from types import SimpleNamespace

    config = SimpleNamespace(num_attention_heads=heads, num_prefix_tokens=prefix, grid_size=lambda h, w: grid)
    return SimpleNamespace(backend=backend, config=config)


def test_attention_memory_counts_the_prefix_tokens_and_refuses_only_past_the_limit():
    """Hand count: 2 heads x (4 x 4 patches + 5 prefix tokens)^2 x 4 bytes = 3528; ONNX Runtime holds
    2.7 copies (9525 bytes), OpenVINO 0.1 (352). A limit of exactly that passes, one byte less is
    refused; torch never is. Planted: `>=` for `>`; the prefix tokens left out of the count."""
    from dino3.dense.highres import check_attention_memory

    onnx, openvino = _runtime("onnxruntime"), _runtime("openvino")
    assert dense.attention_bytes(onnx, 64, 64) == 2 * 21 * 21 * 4 == 3528
    assert dense.attention_bytes(onnx, 64, 64, batch=3) == 3 * 3528
    check_attention_memory(onnx, 64, 64, limit=9525)
    with pytest.raises(dense.highres.BackendError, match=r"a 64x64 image is 21 tokens: onnxruntime .* or OpenVINO"):
        check_attention_memory(onnx, 64, 64, limit=9524)
    check_attention_memory(openvino, 64, 64, limit=352)
    with pytest.raises(dense.highres.BackendError, match=r"21 tokens: openvino .*scores\), tiles"):
        check_attention_memory(openvino, 64, 64, limit=351)
    check_attention_memory(_runtime("torch"), 64, 64, limit=0)


def _stub(features, centres):
    """A DenseImage stand-in: (h, w, D) features and its patch centres (h, w, 2)."""
    from types import SimpleNamespace

    return SimpleNamespace(features=features, patch_centres=lambda: centres)


def test_a_match_to_patch_0_a_score_on_min_score_and_a_pair_near_in_one_image_only():
    """A's patches i and B's i share a unit feature: every pair scores exactly 1, patch 0 included,
    and min_score=1 keeps them all. With spacing 20: A's 1 is 10 px from A's 0 (near in A only, left
    out) and A's 2 maps 3 px from B's 0 (near in B only, left out). Planted: `best_b > 0` (patch 0
    unmatched); `score > min_score`; near in A alone or in B alone counted."""
    eye = torch.eye(3).reshape(1, 3, 3)
    a = _stub(eye, torch.tensor([[[0.0, 0.0], [10.0, 0.0], [100.0, 0.0]]], dtype=torch.float64))
    b = _stub(eye, torch.tensor([[[0.0, 0.0], [100.0, 0.0], [3.0, 0.0]]], dtype=torch.float64))
    found = dense.match_patches(a, b, min_score=1.0)
    assert found.index_a.tolist() == [0, 1, 2] and found.index_b.tolist() == [0, 1, 2]
    assert found.score.tolist() == [1.0, 1.0, 1.0]
    assert dense.match_patches(a, b, spacing=20).index_a.tolist() == [0]
    assert dense.match_patches(a, b, spacing=2).index_a.tolist() == [0, 1, 2]


def test_each_mask_is_checked_against_its_own_grid():
    """A (1, 3) grid and a (3, 1) one: mask_b of B's shape is taken, of A's refused naming mask_b.
    Planted: both masks checked against A's grid."""
    a = _stub(torch.eye(3).reshape(1, 3, 3), torch.zeros(1, 3, 2, dtype=torch.float64))
    b = _stub(torch.eye(3).reshape(3, 1, 3), torch.zeros(3, 1, 2, dtype=torch.float64))
    found = dense.match_patches(a, b, mask_b=torch.tensor([[True], [False], [True]]), min_score=0.5)
    assert found.index_a.tolist() == [0, 2] and found.index_b.tolist() == [0, 2]  # A's 1 scores 0 elsewhere
    with pytest.raises(UsageError, match=re.escape("mask_b: shape (1, 3) is not the patch grid's (3, 1)")):
        dense.match_patches(a, b, mask_b=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(UsageError, match=re.escape("mask_a: shape (3, 1) is not the patch grid's (1, 3)")):
        dense.match_patches(a, b, mask_a=torch.ones(3, 1, dtype=torch.bool))


def test_a_pca_needs_one_patch_more_than_its_components():
    """3 patches for 3 components are refused (saying whether the mask or the image is short), 4
    are fitted, and 2 components fit on 3 patches. Planted: `count < components`; the mask's
    wording for an image with no mask."""
    g = torch.Generator().manual_seed(0)
    three, four = torch.randn(1, 3, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    with pytest.raises(UsageError, match=re.escape("there are 3 patches; a 3-component PCA needs at least 4")):
        dense.fit_pca(three)
    with pytest.raises(UsageError, match=re.escape("the mask keeps 3 patches; a 3-component PCA needs at least 4")):
        dense.fit_pca(four, torch.tensor([[True, True, False, True]]))
    assert dense.fit_pca(four).components.shape == (3, 5)
    assert dense.fit_pca(three, components=2).components.shape == (2, 5)


def test_patch_centres_undo_an_aspect_keeping_crop_on_each_side_by_its_own_amount():
    """keep_aspect with fit='crop': the resized image (here 224 x 362) is cut to whole patches on each
    side, its own margin on each: 0 px off the top, (362 - 352) / 2 = 5 px off the left. Centres
    counted by hand. Planted: the left margin computed from the height (J-D2, issue 31's sixth
    mutation pass)."""
    import dino3

    processor = dino3.DINOv3ViTImageProcessor(keep_aspect="shorter", target_size=224, fit="crop")
    assert processor.aspect_size(448, 724) == (224, 362)
    centres = dense.patch_centres((14, 22), (448, 724), processor)  # 224 // 16 x 362 // 16 patches
    assert centres[0, 0].tolist() == [(8 + 5) * 2 - 0.5, 8 * 2 - 0.5]
    assert centres[13, 21].tolist() == [(21 * 16 + 8 + 5) * 2 - 0.5, (13 * 16 + 8) * 2 - 0.5]
