"""The Ray engine's job (dino3.embed.ray_job) around a stand-in for the Ray Data plan: what it writes
into the output folder, and in what order it reports, whatever the plan hands back. Quick, and no
Ray needed: tests/test_ray.py runs the real plan on a local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dino3
from dino3.errors import Dino3Error
from dino3.integrations import ray as plan

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

DIM = 8


class Rows:
    """What the plan's dataset gives back for one shard: a row per input, features or an error."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def iter_batches(self, batch_size=None, batch_format="pyarrow"):
        broken = ["broken" in Path(p).name for p in self.paths]
        values = np.stack([np.full(DIM, float(i), np.float32) for i in range(len(self.paths))])  # (N, DIM)
        features = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), DIM, mask=pa.array(broken))
        yield pa.table(
            {
                "path": pa.array(self.paths, pa.string()),
                "features": features,
                "shape": pa.array([[DIM]] * len(self.paths), pa.list_(pa.int64())),
                "grid_h": pa.array([14] * len(self.paths), pa.int64()),
                "grid_w": pa.array([14] * len(self.paths), pa.int64()),
                "error": pa.array(["cannot decode" if b else "" for b in broken], pa.string()),
            }
        )


@pytest.fixture
def stand_in_plan(monkeypatch):
    monkeypatch.setattr(plan, "require", lambda: None)
    monkeypatch.setattr(plan, "start", lambda address, progress: 0.0)
    monkeypatch.setattr(plan, "embed", lambda shard, recipe, **options: Rows(list(shard)))


def inputs(folder: Path, names: list[str]) -> list[str]:
    """Files that exist (the job lists its inputs itself); their bytes never matter here."""
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"an image")
    return [str(folder / name) for name in names]


def embed(paths, checkpoint, output, shard_size):
    return dino3.embed.run(
        paths,
        model=str(checkpoint),
        output=output,
        engine="ray",
        ray=dino3.embed.RayOptions(shard_size=shard_size),
        progress=False,
    )


def test_failures_are_listed_in_shard_order_past_ten_shards(stand_in_plan, checkpoint, tmp_path):
    """Bug pinned (issue 31, fresh pass 3, F-R3): the failures gathered from the manifest's shards in
    the string order of their numbers: shard 10's before shard 2's, so the failure list (and
    OUT.failures.tsv) was out of input order once a job had more than ten shards."""
    names = [f"{i:02d}{'-broken' if i in (2, 10) else ''}.png" for i in range(12)]
    paths = inputs(tmp_path / "photos", names)
    result = embed(paths, checkpoint, tmp_path / "out", shard_size=1)
    assert [path for path, _ in result.failures] == [paths[2], paths[10]]
    listed = (tmp_path / "out.failures.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed if not line.startswith("#")][-2:] == [paths[2], paths[10]]


def test_a_shard_of_failures_only_writes_no_file(stand_in_plan, checkpoint, tmp_path):
    """Bug pinned (issue 31, fresh pass 3, F-R4): a shard whose every image failed written as an empty
    Parquet file whose features column had another type (a variable-length list): the folder then
    held two schemas, and readers of the dataset failed or mixed them."""
    names = ["a.png", "b.png", "c-broken.png", "d-broken.png", "e.png", "f.png"]
    paths = inputs(tmp_path / "photos", names)
    out = tmp_path / "out"
    result = embed(paths, checkpoint, out, shard_size=2)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet", "shard-00002.parquet"]
    assert len(result.failures) == 2
    table = pq.read_table(out)
    assert pa.types.is_fixed_size_list(table.schema.field("features").type)
    assert pd.read_parquet(out)["path"].tolist() == [paths[i] for i in (0, 1, 4, 5)]


def test_a_shard_cut_off_while_written_never_shows_in_the_dataset(stand_in_plan, checkpoint, tmp_path, monkeypatch):
    """Bug pinned (issue 31, fresh pass 3, F-R2): a shard's file written in place in the dataset folder:
    a job killed, or a disk that filled, while it was written left half a Parquet file that every
    reader of the folder then failed on. It is written beside the folder and renamed when whole."""
    paths = inputs(tmp_path / "photos", ["a.png", "b.png", "c.png", "d.png"])
    write_table = pq.write_table

    def cut_off(table, where, **options):
        if Path(where).name == "shard-00001.parquet":  # the second shard: half its bytes, then the disk is full
            write_table(table, where, **options)
            data = Path(where).read_bytes()
            Path(where).write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return write_table(table, where, **options)

    monkeypatch.setattr(pq, "write_table", cut_off)
    out = tmp_path / "out"
    with pytest.raises(Dino3Error, match="shard 1"):
        embed(paths, checkpoint, out, shard_size=2)
    assert [p.name for p in out.iterdir()] == ["shard-00000.parquet"]
    assert pd.read_parquet(out)["path"].tolist() == paths[:2]


def test_resume_on_a_folder_with_no_job_is_refused(stand_in_plan, checkpoint, tmp_path):
    """Bug pinned (issue 31, fresh pass 4, G-R3): `--resume` on a folder that holds no interrupted job
    (a typo in -o, another machine's path) silently started the whole job afresh, as if the user had
    not asked to continue one."""
    paths = inputs(tmp_path / "photos", ["a.png", "b.png"])
    out = tmp_path / "no-such-job"
    with pytest.raises(dino3.UsageError, match="holds no interrupted job to resume"):
        dino3.embed.run(paths, model=str(checkpoint), output=out, engine="ray", resume=True, progress=False)
    assert not out.exists()


def test_inputs_skipped_while_listing_follow_the_failures(stand_in_plan, checkpoint, tmp_path):
    """What the lister skipped (a dangling link in the folder) is reported, after the images that
    failed in the plan, in the result and in OUT.failures.tsv; the rows hold only the good images."""
    import os

    paths = inputs(tmp_path / "photos", ["a.png", "b-broken.png"])
    os.symlink(tmp_path / "gone.png", tmp_path / "photos" / "c.png")
    result = dino3.embed.run(
        [str(tmp_path / "photos")], model=str(checkpoint), output=tmp_path / "out", engine="ray", progress=False
    )
    dangling = (str(tmp_path / "photos" / "c.png"), "a symbolic link to nothing (dangling)")
    assert result.count == 1 and result.failures == [(paths[1], "cannot decode"), dangling]
    listed = [line.split("\t") for line in (tmp_path / "out.failures.tsv").read_text().splitlines()]
    assert listed == [[paths[1], "cannot decode"], list(dangling)]


def test_start_takes_local_and_auto_as_names_not_addresses(monkeypatch):
    """`--ray-address local` or `auto` goes to ray.init as it is; a host:port is checked for an
    answer first (in seconds, not minutes of Ray's retries). Ray is not started: a Ray that is
    already initialised stands in. Planted: "local" left out of the names (J-R3, issue 31's sixth
    mutation pass: `--ray-address local` refused as an unreachable cluster)."""
    pytest.importorskip("ray")
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for name in (None, "auto", "local"):
        assert plan.start(name, progress=False) >= 0
    with pytest.raises(Dino3Error, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        plan.start("127.0.0.1:1", progress=False)
