"""The `dino3` command end to end: a folder with real photos, bad files, every output format, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dino3
from dino3.cli import main
from helpers import assert_same_features

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
NAMES = ["chelsea.png", "rocket.jpg", "coffee.png", "camera.png"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    assert main(["init-random", "vits16", str(folder)]) == 0
    return folder


@pytest.fixture
def photos(tmp_path):
    """A folder with real photos, a nested folder, a corrupt JPEG, a text file posing as a PNG and a
    non-image file without an image suffix."""
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(PHOTOS / NAMES[0], root / "a_cat.png")
    shutil.copy(PHOTOS / NAMES[1], root / "nested" / "b_rocket.jpg")
    shutil.copy(PHOTOS / NAMES[2], root / "nested" / "deeper" / "c_coffee.png")
    shutil.copy(PHOTOS / NAMES[3], root / "d_camera.png")
    data = (PHOTOS / "rocket.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(data[: len(data) // 3])
    (root / "fake.png").write_text("this is not an image")
    (root / "notes.txt").write_text("ignored: no image suffix")
    return root


def expected_paths(root: Path) -> list[str]:
    good = ["a_cat.png", "d_camera.png", "nested/b_rocket.jpg", "nested/deeper/c_coffee.png"]
    return [str(root / name) for name in good]


def test_embed_folder_end_to_end(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "features.npz"
    status = main(["embed", str(photos), "-m", str(checkpoint), "-o", str(out), "-q", "--batch-size", "3"])
    assert status == 3  # some images failed
    err = capsys.readouterr().err
    assert "2 images could not be embedded" in err and "broken.jpg" in err and "fake.png" in err
    assert "ignored 1 file without an image suffix" in err
    failures = (tmp_path / "features.npz.failures.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in failures] == [str(photos / "broken.jpg"), str(photos / "fake.png")]

    data = np.load(out, allow_pickle=False)
    assert list(data["paths"]) == expected_paths(photos)  # sorted, failures left out
    assert data["features"].shape == (4, 384) and data["features"].dtype == np.float32
    assert json.loads(str(data["meta"]))["pool"] == "cls"
    # The same numbers as the pipeline gives for these images.
    pipe = dino3.pipeline(model=checkpoint, batch_size=3)
    expected = torch.cat(pipe(expected_paths(photos), pool=True, return_tensors=True)).numpy()
    assert np.abs(data["features"] - expected).max() <= 1e-5
    assert not (tmp_path / "features.npz.partial").exists()


@pytest.mark.parametrize(
    ("options", "shape"),
    [
        (["--pool", "mean"], (2, 384)),
        (["--pool", "cls+mean"], (2, 768)),
        (["--pool", "patches", "--size", "64"], (2, 4, 4, 384)),
        (["--layers", "2"], (2, 2, 384)),
        (["--layers", "0,5,11", "--pool", "cls+mean"], (2, 3, 768)),
    ],
)
def test_pooling_and_layers(checkpoint, tmp_path, options, shape):
    """Values, not only shapes, each computed here from the model's plain outputs: the mean leaves the
    registers out, patches are row-major (h, w, D), layers are the normed hidden states of those blocks."""
    out = tmp_path / "f.npz"
    inputs = [str(PHOTOS / n) for n in NAMES[:2]]
    assert main(["embed", *inputs, "-m", str(checkpoint), "-o", str(out), "-q", *options]) == 0
    got = np.load(out)["features"]
    assert got.shape == shape
    model = dino3.load(checkpoint)
    size = int(options[options.index("--size") + 1]) if "--size" in options else 224
    pixels = dino3.DINOv3ViTImageProcessor.from_pretrained(checkpoint, size={"height": size, "width": size})(inputs)
    with torch.inference_mode():
        result = model(pixels.pixel_values, output_hidden_states=True)
    prefix = 1 + model.config.num_register_tokens
    pool = options[options.index("--pool") + 1] if "--pool" in options else "cls"

    def pooled(tokens):  # (B, T, D) normed tokens -> features
        cls, patches = tokens[:, 0], tokens[:, prefix:]
        h = w = size // 16
        return {
            "cls": cls,
            "mean": patches.mean(1),
            "cls+mean": torch.cat([cls, patches.mean(1)], -1),
            "patches": patches.reshape(len(tokens), h, w, -1),
        }[pool]

    if "--layers" in options:
        text = options[options.index("--layers") + 1]
        blocks = [int(i) for i in text.split(",")] if "," in text else list(range(12 - int(text), 12))
        with torch.inference_mode():
            expected = torch.stack([pooled(model.norm(result.hidden_states[i + 1])) for i in blocks], dim=1)
    else:
        expected = pooled(result.last_hidden_state)
    assert np.abs(got - expected.numpy()).max() <= 1e-5


def test_cls_and_mean_are_the_model_outputs(checkpoint, tmp_path):
    inputs = [str(PHOTOS / n) for n in NAMES[:2]]
    main(["embed", *inputs, "-m", str(checkpoint), "-o", str(tmp_path / "f.npz"), "-q", "--pool", "cls+mean"])
    model = dino3.load(checkpoint)
    pixels = dino3.DINOv3ViTImageProcessor.from_pretrained(checkpoint)(inputs).pixel_values
    with torch.no_grad():
        out = model(pixels)
    expected = torch.cat((out.cls_token, out.patch_tokens.mean(1)), dim=-1).numpy()
    assert np.abs(np.load(tmp_path / "f.npz")["features"] - expected).max() <= 1e-5


def test_aspect_mode_patches_are_stored_ragged(checkpoint, tmp_path):
    inputs = [str(PHOTOS / n) for n in ("chelsea.png", "retina.jpg")]
    out = tmp_path / "dense.npz"
    args = ["--pool", "patches", "--keep-aspect", "shorter", "--target", "64"]
    assert main(["embed", *inputs, "-m", str(checkpoint), "-o", str(out), "-q", *args]) == 0
    data = np.load(out)
    assert data["grid_sizes"].tolist() == [[4, 6], [4, 4]]  # 300x451 -> 64x96; 1411x1411 -> 64x64
    assert data["offsets"].tolist() == [0, 24, 40] and data["features"].shape == (40, 384)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".parquet"])
def test_output_formats(checkpoint, tmp_path, suffix):
    inputs = [str(PHOTOS / n) for n in NAMES[:3]]
    out = tmp_path / f"f{suffix}"
    assert main(["embed", *inputs, "-m", str(checkpoint), "-o", str(out), "-q", "--pool", "mean"]) == 0
    reference = tmp_path / "ref.npz"
    main(["embed", *inputs, "-m", str(checkpoint), "-o", str(reference), "-q", "--pool", "mean"])
    expected = np.load(reference)["features"]
    if suffix == ".npy":
        features = np.load(out, allow_pickle=False)
        paths = (tmp_path / "f.npy.paths.txt").read_text().splitlines()
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(out), "np") as f:
            features, paths = f.get_tensor("features"), json.loads(f.metadata()["paths"])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        features = np.stack([np.asarray(v, np.float32) for v in table.column("features").to_pylist()])
        paths = table.column("path").to_pylist()
    assert paths == inputs
    assert np.array_equal(features, expected)


def test_list_file_and_glob(checkpoint, photos, tmp_path):
    (tmp_path / "list.txt").write_text("# two photos\nphotos/a_cat.png\n\nphotos/d_camera.png\n")
    out = tmp_path / "f.npz"
    assert (
        main(
            [
                "embed",
                str(tmp_path / "list.txt"),
                str(photos / "nested" / "*.jpg"),
                "-m",
                str(checkpoint),
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert list(np.load(out)["paths"]) == [
        str(photos / "a_cat.png"),
        str(photos / "d_camera.png"),
        str(photos / "nested" / "b_rocket.jpg"),
    ]


def test_user_mistakes_exit_2_without_traceback(checkpoint, tmp_path, capsys):
    cases = [
        (["embed", str(tmp_path / "*.jpg"), "-m", str(checkpoint), "-o", str(tmp_path / "f.npz")], "matches no file"),
        (["embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(tmp_path / "f.csv")], "must end in one of"),
        (
            ["embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", "x.npz", "--keep-aspect", "shorter"],
            "needs target_size",
        ),
        (["embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", "x.npz", "--layers", "a,b"], "--layers a,b"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_model_errors_exit_1(tmp_path, capsys):
    status = main(["embed", str(PHOTOS / NAMES[0]), "-m", "vits61", "-o", str(tmp_path / "f.npz"), "-q"])
    assert status == 1
    assert "unknown DINOv3 model 'vits61'. Did you mean vits16" in capsys.readouterr().err


def test_existing_output_is_not_replaced_silently(checkpoint, tmp_path):
    out = tmp_path / "f.npz"
    args = ["embed", str(PHOTOS / NAMES[0]), "-m", str(checkpoint), "-o", str(out), "-q"]
    assert main(args) == 0
    with pytest.raises(SystemExit):
        main(args)
    assert main([*args, "--overwrite"]) == 0


def test_resume_after_kill_gives_the_same_file(checkpoint, tmp_path):
    """Kill a run mid-way (SIGKILL: nothing gets to clean up), resume it, and compare with a run that
    was never interrupted: the same paths and bitwise the same features."""
    inputs = tmp_path / "many"
    inputs.mkdir()
    for i in range(48):
        shutil.copy(PHOTOS / NAMES[i % len(NAMES)], inputs / f"{i:02d}_{NAMES[i % len(NAMES)]}")
    common = ["-m", str(checkpoint), "--size", "448", "--batch-size", "2", "--checkpoint-every", "4", "-q"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed.npz"
    command = [sys.executable, "-m", "dino3.cli", "embed", str(inputs), "-o", str(killed), *common]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    partial = Path(str(killed) + ".partial")
    deadline = time.time() + 120
    while not (partial / "chunk-000001.npz").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.exists(), "the run finished before it could be interrupted"
    chunks_before = len(list(partial.glob("chunk-*.npz")))
    assert 2 <= chunks_before < 12

    with pytest.raises(SystemExit):  # an interrupted run is not silently overwritten or mixed
        main(["embed", str(inputs), "-o", str(killed), *common])
    with pytest.raises(SystemExit):  # nor resumed with other settings
        main(["embed", str(inputs), "-o", str(killed), *common, "--pool", "mean", "--resume"])
    assert main(["embed", str(inputs), "-o", str(killed), *common, "--resume"]) == 0

    whole = tmp_path / "whole.npz"
    assert main(["embed", str(inputs), "-o", str(whole), *common]) == 0
    a, b = np.load(killed), np.load(whole)
    assert list(a["paths"]) == list(b["paths"]) and len(a["paths"]) == 48
    assert_same_features(a["features"], b["features"])
    assert not partial.exists()


def test_info(capsys):
    assert main(["info", "vitl16-sat493m"]) == 0
    out = capsys.readouterr().out
    assert "DINOv3 ViT, 303.1M parameters" in out and "SAT-493M" in out and "0.43, 0.411, 0.296" in out


def test_info_on_a_folder(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "21.6M parameters" in out and "Hugging Face layout, 1 file, torch.float32" in out


def test_shards_read_back_as_one(checkpoint, tmp_path, capsys):
    """--shard K/N (a SLURM array, say): each task embeds its contiguous part; the parts read back
    as the output of one run, in input order; a missing or foreign part is refused."""
    inputs = [str(PHOTOS / n) for n in NAMES + ["horse.png", "coins.png", "rocket.jpg"]]
    whole = tmp_path / "whole.npz"
    assert main(["embed", *inputs, "-m", str(checkpoint), "-o", str(whole), "-q", "--size", "64"]) == 0
    parts = [tmp_path / f"part-{k}.npz" for k in range(3)]
    for k, part in enumerate(parts):
        assert (
            main(["embed", *inputs, "-m", str(checkpoint), "-o", str(part), "-q", "--size", "64", "--shard", f"{k}/3"])
            == 0
        )
    merged = dino3.embed.read_shards(reversed(parts))
    expected = dino3.embed.read_embeddings(whole)
    assert merged.paths == expected.paths and np.array_equal(merged.features, expected.features)
    with pytest.raises(dino3.UsageError, match=r"the job had 3 shards; these files hold shards \[0, 2\]"):
        dino3.embed.read_shards([parts[0], parts[2]])
    other = tmp_path / "other.npz"
    assert (
        main(["embed", *inputs, "-m", str(checkpoint), "-o", str(other), "-q", "--size", "96", "--shard", "1/3"]) == 0
    )
    with pytest.raises(dino3.UsageError, match="made with other settings"):
        dino3.embed.read_shards([parts[0], other, parts[2]])
    for bad in ("3/3", "a/b", "-1/3"):
        with pytest.raises(SystemExit):
            main(["embed", *inputs, "-m", str(checkpoint), "-o", str(tmp_path / "x.npz"), "--shard", bad])
    capsys.readouterr()


def test_skipped_inputs_are_counted_by_one_shard_only(checkpoint, tmp_path):
    """Bug pinned (issue 31, fresh pass 3, F-E4): with --shard K/N every shard listed the inputs the
    folder walk skipped (a dangling link, say): the shards read back as one said N failures for one
    broken input, and each task's failure list repeated it. And F-E5: the count in an output's
    metadata leaving the skipped inputs out (0 failed)."""
    root = tmp_path / "photos"
    root.mkdir()
    for name in NAMES[:4]:
        shutil.copy(PHOTOS / name, root / name)
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")  # skipped by the walk, not embedded
    parts, failures = [tmp_path / f"part-{k}.npz" for k in range(2)], []
    for k, part in enumerate(parts):
        result = dino3.embed.run([str(root)], model=str(checkpoint), output=part, shard=(k, 2), size=64, progress=False)
        failures.append([path for path, _ in result.failures])
    assert failures == [[str(root / "gone.png")], []]
    merged = dino3.embed.read_shards(parts)
    assert len(merged) == 4 and merged.meta["failed"] == 1


def test_object_storage_prefixes_are_listed_as_inputs(tmp_path, monkeypatch):
    """An s3:// prefix lists the images under it (any depth, any suffix case, sorted) as s3:// URIs;
    an object names itself; a missing prefix, an unreachable store and a missing pyarrow are usage
    errors that name the URI. A local folder stands in for the bucket."""
    import sys
    from types import SimpleNamespace

    pafs = pytest.importorskip("pyarrow.fs")
    import pyarrow

    photos = tmp_path / "bucket" / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ["b.png", "a.JPG", "notes.txt", "sub/c.png"]:
        shutil.copy(PHOTOS / NAMES[0], photos / name)

    def from_uri(uri):
        if uri.startswith("s3://down/"):
            raise OSError("connection refused")
        return pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), uri.removeprefix("s3://")

    stand_in = SimpleNamespace(FileSystem=SimpleNamespace(from_uri=from_uri), FileType=pafs.FileType,
                               FileSelector=pafs.FileSelector)  # fmt: skip
    monkeypatch.setattr(pyarrow, "fs", stand_in)
    listed = dino3.embed.expand_inputs(["s3://bucket/photos"]).paths
    assert listed == ["s3://bucket/photos/a.JPG", "s3://bucket/photos/b.png", "s3://bucket/photos/sub/c.png"]
    assert dino3.embed.expand_inputs(["s3://bucket/photos/b.png"]).paths == ["s3://bucket/photos/b.png"]
    with pytest.raises(dino3.UsageError, match="s3://bucket/gone: no such object or prefix"):
        dino3.embed.expand_inputs(["s3://bucket/gone"])
    with pytest.raises(dino3.UsageError, match="s3://down/x: cannot be reached .*connection refused"):
        dino3.embed.expand_inputs(["s3://down/x"])
    monkeypatch.setitem(sys.modules, "pyarrow.fs", None)  # pyarrow not installed
    with pytest.raises(dino3.UsageError, match=r"s3://bucket/photos: object storage is read through pyarrow"):
        dino3.embed.expand_inputs(["s3://bucket/photos"])


def test_upper_case_suffixes_are_images_too(tmp_path):
    """Bug pinned (issue 31, fresh pass 3, F-E3): the folder walk compared suffixes as written, so a
    camera's or Windows' `IMG_0001.JPG` and `scan.Png` were counted as "other files" and never
    embedded."""
    root = tmp_path / "camera"
    root.mkdir()
    for name in ["IMG_0001.JPG", "scan.Png", "small.jpeg", "notes.TXT"]:
        shutil.copy(PHOTOS / NAMES[0], root / name)
    found = dino3.embed.expand_inputs([str(root)])
    assert found.paths == [str(root / name) for name in ["IMG_0001.JPG", "scan.Png", "small.jpeg"]]
    assert found.ignored == 1


def test_folders_are_read_in_sorted_order_whatever_the_disk_lists(tmp_path):
    """Bug pinned (the fresh mutation pass of issue 31): the sub-folders of an input folder taken in
    the order the file system lists them (on ext4, by hash) instead of sorted: the rows of an
    output, and so a resumed job's input list, depended on the disk. Made in a shuffled order here."""
    root = tmp_path / "photos"
    for name in ["03", "07", "00", "09", "01", "05", "08", "02", "06", "04"]:
        (root / name / "inner").mkdir(parents=True)
        shutil.copy(PHOTOS / NAMES[0], root / name / "b.png")
        shutil.copy(PHOTOS / NAMES[0], root / name / "inner" / "a.png")
    found = dino3.embed.expand_inputs([str(root)]).paths
    expected = [str(root / f"{i:02d}" / name) for i in range(10) for name in ("b.png", "inner/a.png")]
    assert found == expected
