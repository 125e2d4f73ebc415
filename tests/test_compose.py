"""Every output of every engine and shard feeds every consumer: the embed job's outputs (local, in each
format, as shards, and Ray's folder) are read back, built into an index that searches and dedups, and
train a probe; the field's readers (pandas, pyarrow, polars, DuckDB) read the Parquet ones as they
are. One recipe makes them all, so they must agree with one another.

Each cell was seen failing once: the Ray folder was refused by `index build` and `probe train`
(neither knew a folder for an output), and the local .parquet held a variable-length list where the
Ray engine's held a fixed-size one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import dino3
import dino3.index
from dino3.embed import read_embeddings, read_shards
from dino3.probe import train

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
FORMATS = [".npz", ".npy", ".safetensors", ".parquet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes of images (photos, and their mirror images), and a labels CSV."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rows = ["path,label"]
    for photo in sorted(PHOTOS.glob("*.[jp][pn]g"))[:6]:
        image = Image.open(photo).convert("RGB")
        for label, picture in (("plain", image), ("mirrored", image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
            path = folder / f"{photo.stem}-{label}.png"
            picture.save(path)
            rows.append(f"{path},{label}")
    labels = folder.parent / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return folder, labels


def local_output(checkpoint, images, tmp_path, suffix: str) -> Path:
    output = tmp_path / f"features{suffix}"
    result = dino3.embed.run([str(images[0])], model=str(checkpoint), output=output, pool="cls", progress=False)
    assert result.count == 12 and not result.failures
    return output


def consume(output, images, reference: np.ndarray | None, tmp_path) -> np.ndarray:
    """Read `output`, index it (search and dedup), train a probe on it; its features, for comparison."""
    data = read_embeddings(output)
    assert len(data) == 12 and all(Path(p).is_absolute() for p in data.paths)
    order = np.argsort(data.paths)
    features = np.asarray(data.features)[order]
    if reference is not None:
        np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-5)
    update = dino3.index.build([str(output)], folder=tmp_path / "index", progress=False)
    assert update.count == 12
    index = dino3.index.open(tmp_path / "index")
    hit = index.search(features[:1], k=1)[0]["neighbors"][0]
    assert hit["path"] == sorted(data.paths)[0] and hit["score"] > 0.9999
    assert index.dedup(0.9999)["groups"] == []  # no copies among them
    trained = train(str(output), labels=str(images[1]), output=tmp_path / "probe", method="knn", progress=False)
    assert trained.probe.feature_dim == features.shape[1] and trained.images == 12
    return features


@pytest.mark.parametrize("suffix", FORMATS)
def test_each_local_format_feeds_every_consumer(checkpoint, images, tmp_path, suffix):
    reference = consume(local_output(checkpoint, images, tmp_path / "npz", ".npz"), images, None, tmp_path / "a")
    consume(local_output(checkpoint, images, tmp_path, suffix), images, reference, tmp_path / "b")


def test_shards_read_back_as_one_output(checkpoint, images, tmp_path):
    whole = read_embeddings(local_output(checkpoint, images, tmp_path, ".npz"))
    parts = []
    for k in range(3):
        part = tmp_path / f"part-{k}.npz"
        dino3.embed.run([str(images[0])], model=str(checkpoint), output=part, shard=(k, 3), progress=False)
        parts.append(part)
    merged = read_shards(parts)
    assert merged.paths == whole.paths and np.allclose(merged.features, whole.features, atol=1e-5)


def test_the_parquet_of_each_engine_has_one_schema_the_field_reads(checkpoint, images, tmp_path):
    """A fixed-size list of float32: numpy-shaped in Arrow, a list DuckDB and polars take as they are."""
    import duckdb
    import pandas
    import polars
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = local_output(checkpoint, images, tmp_path, ".parquet")
    field = pq.read_schema(output).field("features").type
    assert pa.types.is_fixed_size_list(field) and field.value_type == pa.float32()
    frame = pandas.read_parquet(output)
    assert len(frame) == 12 and len(frame["features"][0]) == field.list_size
    assert polars.read_parquet(output)["features"].shape == (12,)
    (same,) = duckdb.sql(f"SELECT min(list_cosine_similarity(features, features)) FROM '{output}'").fetchall()[0]
    assert abs(same - 1) < 1e-5


@pytest.mark.slow
def test_the_ray_folder_feeds_every_consumer(checkpoint, images, tmp_path):
    """The Ray engine's folder is an output like the others: read, indexed, searched, deduped, probed."""
    pytest.importorskip("ray")
    import ray

    reference = consume(local_output(checkpoint, images, tmp_path, ".npz"), images, None, tmp_path / "a")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        folder = tmp_path / "ray"
        dino3.embed.run([str(images[0])], model=str(checkpoint), output=folder, engine="ray", progress=False)
    finally:
        ray.shutdown()
    consume(folder, images, reference, tmp_path / "b")
    moved = tmp_path / "elsewhere" / "ray"  # the folder and its manifest move together
    moved.parent.mkdir()
    shutil.move(folder, moved)
    shutil.move(str(folder) + ".manifest.json", str(moved) + ".manifest.json")
    assert len(read_embeddings(moved)) == 12
