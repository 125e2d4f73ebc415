"""Edge inputs of probe training and its datasets: every refusal names the thing and the remedy."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import dino3
from dino3.errors import UsageError
from dino3.probe import knn
from dino3.probe.dataset import read_dataset, read_labels_csv, stratified_split
from dino3.recipe import Recipe
from test_probe import digits_subset, small_digits, tiny, write_digits  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """2 classes x 3 digit images."""
    return write_digits(tmp_path_factory.mktemp("two") / "data", digits_subset(2, 3))


@pytest.fixture(scope="module")
def embedded(tiny, two_classes, tmp_path_factory):  # noqa: F811
    """The 6 images embedded (cls), and a labels CSV naming them all."""
    folder = tmp_path_factory.mktemp("emb")
    features = folder / "features.npz"
    dino3.embed.run([str(two_classes)], model=str(tiny), output=features, pool="cls", progress=False)
    images = sorted(two_classes.rglob("*.png"))
    labels = folder / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    return features, labels, images


# -- read_dataset -------------------------------------------------------------------------------------------
def test_labels_with_a_folder_or_csv_dataset_are_refused(two_classes, tmp_path):
    """labels= goes with an embeddings file only; a folder dataset given labels is refused, naming them."""
    with pytest.raises(UsageError, match=r"labels \(x.csv\) go with an embeddings file"):
        read_dataset(two_classes, labels="x.csv")


def test_a_missing_or_unknown_dataset_is_named(tmp_path):
    """A path that does not exist, and a file that is no dataset, get each its own message."""
    with pytest.raises(UsageError, match="no such folder or file"):
        read_dataset(tmp_path / "gone")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(UsageError, match=r"notes.txt: a dataset is a folder with a folder per class"):
        read_dataset(other)


def test_a_csv_dataset_with_an_upper_case_suffix_is_read(two_classes, tmp_path):
    """The .CSV suffix is matched whatever its case."""
    images = sorted(two_classes.rglob("*.png"))
    csv = tmp_path / "LABELS.CSV"
    csv.write_text("".join(f"{p},{p.parent.name}\n" for p in images))
    found = read_dataset(csv)
    assert found.paths == [str(p) for p in images] and found.labels == [p.parent.name for p in images]


def test_many_missing_images_of_a_csv_are_counted_beyond_the_five_shown(tmp_path):
    """The message lists 5 missing files and counts the rest ("and 2 more"); exactly 5: no count."""
    csv = tmp_path / "labels.csv"
    csv.write_text("".join(f"gone{i}.png,a\n" for i in range(7)))
    with pytest.raises(UsageError, match=r"names 7 image file\(s\) .*gone4.png \(line 5\) and 2 more\.") as e:
        read_dataset(csv)
    assert "gone5.png" not in str(e.value)
    csv.write_text("".join(f"gone{i}.png,a\n" for i in range(5)))
    with pytest.raises(UsageError, match=r"names 5 image file\(s\)") as e:
        read_dataset(csv)
    assert "more" not in str(e.value) and "gone4.png (line 5)" in str(e.value)


def test_loose_files_beside_the_class_folders_are_left_out_with_a_note(two_classes, tmp_path):
    """Images directly in the dataset folder belong to no class: left out, and a note says how many."""
    root = tmp_path / "data"
    shutil.copytree(two_classes, root)
    shutil.copy(next(two_classes.rglob("*.png")), root / "loose.png")
    (root / ".hidden").write_text("x")
    found = read_dataset(root)
    assert len(found.paths) == 6 and found.notes == [
        f"1 file(s) directly in {root} are in no class folder and were left out"
    ]
    assert read_dataset(two_classes).notes == []


# -- read_labels_csv ----------------------------------------------------------------------------------------
def test_a_labels_csv_that_cannot_be_read_is_named(tmp_path):
    """A missing file and a file not in UTF-8 are refused with the reason."""
    with pytest.raises(UsageError, match="no such labels file"):
        read_labels_csv(tmp_path / "gone.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("caf\u00e9.png,a\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"must be UTF-8 text \(invalid continuation byte at byte 3\)"):
        read_labels_csv(latin)


def test_a_header_names_the_columns_in_any_order(tmp_path):
    """With a header the columns are found by name (any order, any case, other columns allowed);
    relative paths are made relative to the CSV's folder, absolute ones kept."""
    csv = tmp_path / "labels.csv"
    csv.write_text(" Label ,extra,PATH\ncat,1,a.png\ndog,2,/abs/b.png\n")
    assert read_labels_csv(csv) == [(2, str(tmp_path / "a.png"), "cat"), (3, "/abs/b.png", "dog")]


def test_short_rows_and_empty_fields_name_their_line(tmp_path):
    """A row that lacks its path or label column, or has it empty, is refused naming the line and the field."""
    csv = tmp_path / "labels.csv"
    for text, message in [
        ("label,path\ncat,a.png\ndog\n", "line 3: the row has no path"),
        ("path,label\na.png,cat\nb.png\n", "line 3: the row has no label"),
        ("path,label\na.png, \n", "line 2: the label is empty"),
        ("path,label\n ,cat\n", "line 2: the path is empty"),
        ("a.png\n", "line 1: expected two fields, path and label, got 1"),
        ("a.png,cat,x\n", "line 1: expected two fields, path and label, got 3"),  # no header: no extra column
    ]:
        csv.write_text(text)
        with pytest.raises(UsageError, match=message):
            read_labels_csv(csv)


def test_a_path_repeated_with_the_same_label_is_kept_once(tmp_path):
    """The same image twice under the same label is one row (the first line's)."""
    csv = tmp_path / "labels.csv"
    csv.write_text("/a.png,cat\n/b.png,dog\n/a.png,cat\n")
    assert read_labels_csv(csv) == [(1, "/a.png", "cat"), (2, "/b.png", "dog")]


# -- labelled embeddings ------------------------------------------------------------------------------------
def test_labels_that_leave_images_out_say_how_many(embedded, tmp_path):
    """Embedded images with no label are left out, with a note counting them; features follow the CSV's order."""
    features, _, images = embedded
    labels = tmp_path / "labels.csv"
    chosen = [images[4], images[0]]
    labels.write_text("".join(f"{p},{p.parent.name}\n" for p in chosen))
    found = read_dataset(features, labels=labels)
    assert found.paths == [str(p) for p in chosen] and found.labels == [p.parent.name for p in chosen]
    assert found.notes == [f"4 image(s) of {features} have no label in {labels} and were left out"]
    whole = read_dataset(features, labels=embedded[1])
    assert np.array_equal(found.features, whole.features[[4, 0]])


def test_an_image_labelled_under_two_spellings_is_refused(embedded, tmp_path):
    """The same embedded image labelled twice (its path written two ways) is refused."""
    features, _, images = embedded
    labels = tmp_path / "labels.csv"
    twisted = f"{images[0].parent}/../{images[0].parent.name}/{images[0].name}"
    labels.write_text(f"{images[0]},0\n{twisted},0\n{images[3]},1\n")
    with pytest.raises(UsageError, match="labels some images of .* twice"):
        read_dataset(features, labels=labels)


def test_patch_features_are_refused_for_a_probe(tiny, two_classes, tmp_path):  # noqa: F811
    """Per-patch features are no vector per image: refused, naming the pooling and the remedy."""
    features = tmp_path / "patches.npz"
    dino3.embed.run([str(two_classes)], model=str(tiny), output=features, pool="patches", progress=False)
    with pytest.raises(UsageError, match=r"\(pool 'patches'\); a probe takes one vector per image"):
        read_dataset(features, labels=tmp_path / "unused.csv")


def test_a_split_at_fraction_zero_holds_nothing_and_a_negative_fraction_is_refused():
    """fraction 0 holds out nothing; a class of one image is never held out; < 0 is refused."""
    targets = np.array([0, 0, 0, 1])
    train, held = stratified_split(targets, 0.0, 0)
    assert sorted(train) == [0, 1, 2, 3] and len(held) == 0
    train, held = stratified_split(targets, 0.5, 0)
    assert 3 in train and len(held) == 2 and set(targets[held]) == {0}  # round(1.5) = 2, never all 3
    with pytest.raises(UsageError, match=r"must lie in \[0, 1\), got -0.1"):
        stratified_split(targets, -0.1, 0)


# -- train(): every option checked before any work ----------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"seed": True}, "seed must be an integer, got True"),
        ({"method": "svm"}, "method must be one of"),
        ({"features": "patches"}, "features must be one of"),
        ({"C": 1.0, "method": "knn"}, "C is logistic regression's"),
        ({"C": -1.0}, "got C=-1.0 with method 'logreg'"),
        ({"C": "1"}, "got C='1'"),
        ({"k": 5}, "k is k-NN's .*got k=5 with method 'logreg'"),
        ({"k": 0, "method": "knn"}, "got k=0"),
        ({"k": True, "method": "knn"}, "got k=True"),
        ({"k": 2.0, "method": "knn"}, "got k=2.0"),
    ],
)
def test_bad_train_options_are_refused_naming_the_option(options, message, tmp_path):
    """Each bad option is refused up front (the dataset does not even exist)."""
    with pytest.raises(UsageError, match=message):
        dino3.probe.train(tmp_path / "no-such-dataset", model="no-such-model", **options)


def test_k_at_its_bound_and_C_above_zero_pass_the_checks(tmp_path):
    """k=1 and a small positive C are accepted (the error is then the missing dataset's)."""
    for options in ({"k": 1, "method": "knn"}, {"C": 1e-9}, {"seed": 0}):
        with pytest.raises(UsageError, match="no such folder or file"):
            dino3.probe.train(tmp_path / "no-such-dataset", model="no-such-model", **options)


def test_unknown_keyword_arguments_are_a_type_error(tmp_path):
    """A misspelt embedding option is a TypeError naming it, as Python's own."""
    with pytest.raises(TypeError, match="unexpected keyword arguments: batchsize, sise"):
        dino3.probe.train(tmp_path / "x", model="m", batchsize=4, sise=224)


def test_recipe_options_are_checked_before_the_dataset_is_read(tmp_path):
    """A bad embedding option (size) is refused before the missing dataset is noticed."""
    with pytest.raises(UsageError, match="size"):
        dino3.probe.train(tmp_path / "no-such-dataset", model="m", size=-3)


def test_a_recipe_and_another_model_are_refused(tiny, two_classes, tmp_path):  # noqa: F811
    """A recipe fixes the model: another model beside it is refused; so are options given beside it."""
    recipe = Recipe(str(tiny), pool="cls")
    with pytest.raises(UsageError, match="and the recipe's model .* differ"):
        dino3.probe.train(two_classes, model="vits16", recipe=recipe)
    with pytest.raises(UsageError, match="size: give them in the recipe"):
        dino3.probe.train(two_classes, recipe=recipe, size=112, C=1.0)


def test_features_already_embedded_take_no_model_recipe_or_options(embedded, tiny):  # noqa: F811
    """An embeddings file holds its features: a model, another pooling, embedding options or a recipe are refused."""
    features, labels, _ = embedded
    for options, message in [
        ({"model": str(tiny)}, r"already holds features \(made by .*\); leave out the model"),
        ({"features": "mean"}, "holds 'cls' features, not 'mean'"),
        ({"size": 112}, "size: embedding options do not apply to features already embedded"),
        ({"recipe": Recipe(str(tiny), pool="cls")}, "already holds features .*leave out the model"),
    ]:
        with pytest.raises(UsageError, match=message):
            dino3.probe.train(features, labels=labels, C=1.0, progress=False, **options)
    result = dino3.probe.train(features, labels=labels, features="cls", C=1.0, progress=False)
    assert result.images == 6 and result.probe.pool == "cls"


def test_an_output_that_is_a_file_or_a_foreign_folder_is_refused(embedded, tmp_path):
    """A probe needs a folder of its own: a file, or a folder holding other files, is refused."""
    features, labels, _ = embedded
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(UsageError, match="is a file; a probe is a folder"):
        dino3.probe.train(features, labels=labels, C=1.0, output=file)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    (foreign / ".DS_Store").write_text("x")
    with pytest.raises(UsageError, match=r"holds other files \(thesis.tex\.\.\.\)"):
        dino3.probe.train(features, labels=labels, C=1.0, output=foreign)
    assert sorted(p.name for p in foreign.iterdir()) == [".DS_Store", "thesis.tex"]


# -- Probe, built by hand: predictions against numpy ---------------------------------------------------------
from dino3.probe.probe import FORMAT_VERSION, SETTINGS_FILE, WEIGHTS_FILE, Probe, _is_features  # noqa: E402

CLASSES = ["ant", "bee", "cat"]


def logreg_probe(seed=0) -> Probe:
    g = torch.Generator().manual_seed(seed)
    settings = {"feature_dim": 4, "features": "cls", "model": "test", "model_identity": {}, "processor": {}, "C": 0.5}
    tensors = {
        "weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "bias": torch.randn(3, generator=g, dtype=torch.float64),
    }
    return Probe("logreg", CLASSES, tensors, settings)


def numpy_softmax(probe: Probe, x: np.ndarray) -> np.ndarray:
    logits = x @ probe.tensors["weight"].numpy().T + probe.tensors["bias"].numpy()
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predictions_are_the_softmax_ranked_and_cut_to_the_classes():
    """top_k above the number of classes gives every class, best first, scores = numpy's softmax."""
    probe = logreg_probe()
    x = np.random.default_rng(0).normal(size=(5, 4))
    expected = numpy_softmax(probe, x)
    got = probe.predict(x, top_k=10)
    assert len(got) == 5 and got.scores.shape == (5, 3)
    order = np.argsort(-expected, axis=1)
    assert np.array_equal(got.indices, order)
    assert got.labels == [[CLASSES[i] for i in row] for row in order]
    assert np.allclose(got.scores, np.take_along_axis(expected, order, axis=1), atol=1e-12)
    one = probe.predict(x, top_k=1)
    assert one.scores.shape == (5, 1) and np.array_equal(one.indices[:, 0], order[:, 0])


def test_a_bad_top_k_is_refused():
    """top_k is a positive integer: 0, a bool or a float is refused."""
    probe = logreg_probe()
    for top_k in (0, -1, True, 1.5):
        with pytest.raises(UsageError, match=f"top_k must be a positive integer, got {top_k!r}"):
            probe.predict(np.zeros((1, 4)), top_k=top_k)


def test_one_vector_and_integer_features_are_taken_and_3d_is_refused():
    """A (D,) vector is one row; integer features count as numbers; (N, D, 1) is refused with its shape."""
    probe = logreg_probe()
    x = np.array([1, -2, 3, 0])
    expected = numpy_softmax(probe, x[None].astype(np.float64))
    assert np.allclose(probe.probabilities(torch.as_tensor(x)).numpy(), expected, atol=1e-12)
    assert np.allclose(probe.probabilities(x.astype(np.float32)).numpy(), expected, atol=1e-6)
    with pytest.raises(UsageError, match=r"features must be \(N, D\), one vector per image; got shape \(2, 4, 1\)"):
        probe.probabilities(np.zeros((2, 4, 1)))


def test_what_counts_as_features_and_what_as_images():
    """Float (N, D) or (D,) arrays or tensors are features; integer arrays, 3-D arrays and lists are images."""
    assert _is_features(np.zeros((2, 4), np.float32)) and _is_features(np.zeros(4)) and _is_features(torch.zeros(2, 4))
    assert _is_features(torch.zeros(4, dtype=torch.float16))
    assert not _is_features(np.zeros((2, 4), np.uint8)) and not _is_features(torch.zeros(2, 4, dtype=torch.long))
    assert not _is_features(np.zeros((8, 8, 3), np.float32)) and not _is_features(torch.zeros(1, 2, 4))
    assert not _is_features([[0.0, 1.0]]) and not _is_features("a.png")


def test_repr_names_the_method_its_choice_and_features():
    probe = logreg_probe()
    assert repr(probe) == "Probe(logreg, 3 classes, C=0.5, cls features of 4 from test)"
    knn_probe = Probe(
        "knn",
        CLASSES,
        {"features": torch.eye(4)[:3], "labels": torch.tensor([0, 1, 2])},
        {**probe.settings, "k": 2, "temperature": 0.07},
    )
    assert repr(knn_probe) == "Probe(knn, 3 classes, k=2, cls features of 4 from test)"


def test_damaged_weights_built_by_hand_are_refused():
    """A missing tensor, knn labels that do not match the rows, bool labels, a negative label, a model not text."""
    probe = logreg_probe()
    with pytest.raises(UsageError, match="this logreg probe is incomplete: the weights hold no 'bias'"):
        Probe("logreg", CLASSES, {"weight": probe.tensors["weight"]}, probe.settings)
    knn_settings = {**probe.settings, "k": 2, "temperature": 0.07}
    rows = torch.eye(4)[:3]
    for labels, message in [
        (torch.tensor([0, 1]), "damaged: 2 labels for 3 features"),
        (torch.tensor([True, False, True]), "'labels' holds torch.bool, not class indices"),
        (torch.tensor([0, -1, 2]), "a label index outside the 3 classes"),
        (torch.tensor([0, 1, 3]), "a label index outside the 3 classes"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            Probe("knn", CLASSES, {"features": rows, "labels": labels}, knn_settings)
    Probe("knn", CLASSES, {"features": rows, "labels": torch.tensor([0, 1, 2])}, knn_settings)  # on the bounds: fine
    for key, value, need in [("model", 5, "a str"), ("processor", [], "a dict"), ("model_identity", "x", "a dict")]:
        with pytest.raises(UsageError, match=re.escape(f"'{key}' is {value!r}; it must be {need}")):
            Probe("logreg", CLASSES, probe.tensors, {**probe.settings, key: value})


def test_save_and_load_round_trip_with_numpy_values_in_the_settings(tmp_path):
    """numpy numbers, tuples and sets in the settings are written as JSON numbers and lists; load gives it back."""
    probe = logreg_probe()
    probe.settings.update(
        C=np.float64(0.25), validation={"seed": np.int64(3), "ks": (1, 2), "only": {7}, "where": tmp_path}
    )
    probe.save(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / SETTINGS_FILE).read_text())
    assert saved["C"] == 0.25 and saved["validation"] == {"seed": 3, "ks": [1, 2], "only": [7], "where": str(tmp_path)}
    assert saved["format_version"] == FORMAT_VERSION
    back = Probe.load(tmp_path / "p", device="cpu")
    assert back.classes == CLASSES and torch.equal(back.tensors["weight"], probe.tensors["weight"])
    x = np.random.default_rng(1).normal(size=(2, 4))
    assert np.allclose(back.probabilities(x).numpy(), numpy_softmax(probe, x), atol=1e-12)


def test_probe_folders_that_are_not_probes_are_refused(tmp_path):
    """No folder, settings not a probe's, a newer format, a knn probe lacking k, unreadable weights."""
    with pytest.raises(UsageError, match="gone: no such probe folder"):
        Probe.load(tmp_path / "gone")
    logreg_probe().save(tmp_path / "p")
    settings_file = tmp_path / "p" / SETTINGS_FILE
    good = json.loads(settings_file.read_text())
    for document, message in [
        ([1, 2], 'is not a dino3 probe\'s settings (no "format": "dino3-probe")'),
        ({**good, "format": "other"}, "is not a dino3 probe's settings"),
        (
            {**good, "format_version": FORMAT_VERSION + 1, "dino3_version": "9.9"},
            "written by a newer dino3 (9.9); upgrade",
        ),
        ({**good, "method": "knn"}, "it lacks k, temperature"),
    ]:
        settings_file.write_text(json.dumps(document))
        with pytest.raises(UsageError, match=re.escape(message)):
            Probe.load(tmp_path / "p")
    settings_file.write_text(json.dumps(good))
    (tmp_path / "p" / WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UsageError, match="probe.safetensors is damaged: not a readable safetensors file"):
        Probe.load(tmp_path / "p")


def test_embeddings_without_identity_or_with_layers_are_refused():
    """Features from elsewhere (no model identity), or of chosen layers, are refused naming why."""
    probe = logreg_probe()
    with pytest.raises(UsageError, match="x.npz records no model identity; it was not written by `dino3 embed`"):
        probe.check_embeddings({"pool": "cls"}, "x.npz")
    meta = {"model_identity": {}, "model": "test", "pool": "cls", "layers": [1, 2]}
    with pytest.raises(UsageError, match=re.escape("holds 'cls' features of layers [1, 2]: embed with --pool cls")):
        probe.check_embeddings(meta, "x.npz")
    probe.check_embeddings({**meta, "layers": None}, "x.npz")  # the probe's own: accepted


# -- classify: refusals before any image is read -------------------------------------------------------------
def test_classify_refuses_no_images_a_mixed_list_and_a_bad_top_k(tmp_path):
    """No images; an embeddings file among images; top_k not a positive integer; a folder of no images."""
    from dino3.probe.classify import classify

    probe = logreg_probe()
    (tmp_path / "f.npz").write_bytes(b"x")
    (tmp_path / "f.NPZ").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    for images, kwargs, message in [
        ([], {}, "no images given"),
        (
            [str(tmp_path / "f.npz"), str(tmp_path / "a.png")],
            {},
            "f.npz is an embeddings file: give it alone, or give images only",
        ),
        ([str(tmp_path / "a.png"), str(tmp_path / "f.NPZ")], {}, "f.NPZ is an embeddings file"),
        ([str(tmp_path)], {"top_k": 0}, "top_k must be a positive integer, got 0"),
        ([str(tmp_path)], {"top_k": False}, "top_k must be a positive integer, got False"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            classify(images, probe, **kwargs)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="no image"):
        classify(tmp_path / "empty", probe, progress=False)


def test_knn_neighbours_of_no_queries_are_empty_and_k_is_cut_to_the_rows():
    """No queries: (0, k) similarities and indices; k above the training rows is cut to them."""
    train = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    sims, indices = knn.neighbours(torch.zeros(0, 4), train, 5)
    assert sims.shape == (0, 3) and indices.shape == (0, 3) and indices.dtype == torch.long
    sims, indices = knn.neighbours(train, train, 5)
    assert indices.shape == (3, 3) and indices[:, 0].tolist() == [0, 1, 2]
    assert torch.allclose(sims, torch.sort(train @ train.T, dim=1, descending=True).values)


# -- evaluate -----------------------------------------------------------------------------------------------
def test_evaluating_on_many_unknown_classes_names_five_and_counts_the_rest(small_digits, tmp_path):  # noqa: F811
    """7 unknown classes: 5 named and "and 2 more"; a probe of 11 classes lists its first 10 and "..."."""
    from dino3.probe.evaluate import evaluate

    images = sorted((small_digits / "train").rglob("*.png"))[:7]
    csv = tmp_path / "labels.csv"
    csv.write_text("".join(f"{p},z{i}\n" for i, p in enumerate(images)))
    base = logreg_probe()
    classes = [f"c{i}" for i in range(11)]
    tensors = {"weight": torch.zeros(11, 4, dtype=torch.float64), "bias": torch.zeros(11, dtype=torch.float64)}
    probe = Probe("logreg", classes, tensors, base.settings)
    with pytest.raises(UsageError) as refused:
        evaluate(csv, probe, progress=False)
    assert "has classes the probe does not know: z0, z1, z2, z3, z4 and 2 more (the probe knows c0, c1" in str(
        refused.value
    )
    assert str(refused.value).endswith("c8, c9...)")
    csv.write_text("".join(f"{p},z{i}\n" for i, p in enumerate(images[:5])))
    probe = Probe("logreg", classes[:10], {k: v[:10] for k, v in tensors.items()}, base.settings)
    with pytest.raises(UsageError) as refused:
        evaluate(csv, probe, progress=False)
    assert str(refused.value).endswith("z4 (the probe knows c0, c1, c2, c3, c4, c5, c6, c7, c8, c9)")


def test_evaluating_features_of_another_model_is_refused(embedded):
    """An embeddings file is checked against the probe before it is scored: another model is named."""
    from dino3.probe.evaluate import evaluate

    features, labels, _ = embedded
    base = logreg_probe()
    tensors = {"weight": torch.zeros(2, 64, dtype=torch.float64), "bias": torch.zeros(2, dtype=torch.float64)}
    probe = Probe("logreg", ["0", "1"], tensors, {**base.settings, "feature_dim": 64, "model_identity": {"x": 1}})
    with pytest.raises(UsageError, match="is another model"):
        evaluate(features, probe, labels=labels, progress=False)


# -- the embeddings cached in a probe folder ----------------------------------------------------------------
def test_cached_embeddings_are_reused_with_their_failures_until_the_weights_change(tiny, two_classes, tmp_path):  # noqa: F811
    """Training again into the folder reuses its embeddings and lists the same failed image; once the
    model's weight file changes (its time), the images are embedded again and the old file removed."""
    import os

    data = tmp_path / "data"
    shutil.copytree(two_classes, data)
    (data / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder = tmp_path / "probe"
    first = dino3.probe.train(data, model=str(tiny), output=folder, C=1.0, progress=False)
    assert [p for p, _ in first.failures] == [str(data / "0" / "broken.png")] and first.images == 6
    cached = sorted(folder.glob("embeddings-*.npz"))
    again = dino3.probe.train(data, model=str(tiny), output=folder, C=1.0, progress=False, overwrite=True)
    assert any(n.startswith("reused the embeddings in") for n in again.notes)
    assert again.failures == first.failures and sorted(folder.glob("embeddings-*.npz")) == cached
    weights = next(tiny.glob("*.safetensors"))
    stat = weights.stat()
    try:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        fresh = dino3.probe.train(data, model=str(tiny), output=folder, C=1.0, progress=False, overwrite=True)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not any(n.startswith("reused") for n in fresh.notes) and fresh.failures == first.failures
    assert len(list(folder.glob("embeddings-*.npz"))) == 1


def test_a_labels_csv_may_name_images_in_object_storage_and_on_the_web(tmp_path):
    """s3:// (and gs://, ...) names in a labels CSV stay as they are, like http URLs: not made relative
    to the CSV's folder, not refused as missing files. Bug found by issue 31's fifth mutation pass:
    only http(s) counted as remote, so s3://b/x.jpg became CSVFOLDER/s3:/b/x.jpg and was refused."""
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label\ns3://bucket/cats/1.jpg,cat\ngs://bucket/dogs/2.jpg,dog\nhttps://example.org/3.jpg,dog\n"
    )
    found = read_dataset(csv)
    assert found.paths == ["s3://bucket/cats/1.jpg", "gs://bucket/dogs/2.jpg", "https://example.org/3.jpg"]
    assert found.labels == ["cat", "dog", "dog"]


# -- conditions on their boundaries (issue 31, sixth sweep) ------------------------------------------------
def test_settings_on_each_side_of_their_bounds():
    """feature_dim 1 (with one-column weights) and k 1 are taken, 0 and True refused; C and the
    temperature True refused (a bool is no number); classes as one string refused, even one whose
    letters are two distinct names; a logistic probe built without C is taken (C is checked only when
    given). Planted, one at a time: `dim >= 0`, `dim > 1`, the bool test of feature_dim, of number(),
    the list test of classes, `"C" in settings` dropped."""
    base = logreg_probe()
    g = torch.Generator().manual_seed(0)
    narrow = {"weight": torch.randn(3, 1, generator=g, dtype=torch.float64), "bias": base.tensors["bias"]}
    one = Probe("logreg", CLASSES, narrow, {**base.settings, "feature_dim": 1})
    assert one.probabilities(np.array([[2.0]])).shape == (1, 3)
    for dim in (0, True):
        with pytest.raises(UsageError, match=re.escape(f"'feature_dim' is {dim!r}; it must be a whole number >= 1")):
            Probe("logreg", CLASSES, narrow, {**base.settings, "feature_dim": dim})
    with pytest.raises(UsageError, match="'C' is True; it must be a finite number > 0"):
        Probe("logreg", CLASSES, base.tensors, {**base.settings, "C": True})
    with pytest.raises(UsageError, match="'classes' is 'ab'; it must be a list of two class names"):
        Probe("logreg", "ab", {k: v[:2] for k, v in base.tensors.items()}, base.settings)
    settings = {k: v for k, v in base.settings.items() if k != "C"}
    assert repr(Probe("logreg", CLASSES, base.tensors, settings)).startswith("Probe(logreg, 3 classes, C=None")
    knn_tensors = {"features": torch.eye(4)[:3], "labels": torch.tensor([0, 1, 2])}
    knn_settings = {**base.settings, "k": 1, "temperature": 0.07}
    Probe("knn", CLASSES, knn_tensors, knn_settings)
    for key, value in (("k", 0), ("k", True), ("temperature", True)):
        with pytest.raises(UsageError, match=re.escape(f"'{key}' is {value!r}")):
            Probe("knn", CLASSES, knn_tensors, {**knn_settings, key: value})


def test_a_folder_with_only_weights_or_only_embeddings_is_an_incomplete_probe(tmp_path):
    """No probe.json: a folder holding the weights alone, or embeddings alone, is an incomplete
    probe; one holding neither is no probe; a format_version of True is refused, not read as 1.
    Planted: either operand of `weights or embeddings` dropped; the bool test of format_version."""
    for name, files in (("weights", [WEIGHTS_FILE]), ("embeddings", ["embeddings.npz"]), ("other", ["notes.txt"])):
        folder = tmp_path / name
        folder.mkdir()
        for file in files:
            (folder / file).write_bytes(b"")
        message = "is not a probe folder" if name == "other" else "is an incomplete probe: it has no probe.json"
        with pytest.raises(UsageError, match=message):
            Probe.load(folder)
    logreg_probe().save(tmp_path / "p")
    settings_file = tmp_path / "p" / SETTINGS_FILE
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "format_version": True}))
    with pytest.raises(UsageError, match="'format_version' is True, not a whole number"):
        Probe.load(tmp_path / "p")
