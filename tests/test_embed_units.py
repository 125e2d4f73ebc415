"""The embed job's parts one by one, without a model: the input lister (inputs.py), the writers and
readers of its outputs (writers.py), its resumable store (store.py) and the Ray engine's folder checks
(ray_job.py). Each test states what a user gets for an edge input: the paths found, the error and the
words that name the thing, the values read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dino3.embed import inputs as inputs_mod
from dino3.embed import ray_job, store, writers
from dino3.embed.inputs import Inputs, expand_inputs, read_table_inputs
from dino3.errors import UsageError


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """The Ray actor (_Embedder) sets torch's threads for its own process; here that process is
    pytest's, whose later tests must keep the threads they had."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def image(path: Path) -> str:
    """A real 20 x 20 PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (10, 120, 200)).save(path)
    return str(path)


def touch(path: Path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


# -- inputs.py ------------------------------------------------------------------------------------------------
def test_none_found_without_skipped_says_no_images():
    """With nothing skipped, the message is the plain one (no count, no list)."""
    assert Inputs().none_found() == "no images found in the inputs"


def test_none_found_lists_ten_skipped_and_counts_the_rest():
    """The first ten skipped names are shown with their reasons; the rest only counted (boundary 10)."""
    ten = Inputs(skipped=[(f"f{i}", "bad") for i in range(10)])
    assert ten.none_found().count("\n  f") == 10 and "more" not in ten.none_found()
    assert ten.none_found().startswith("no images found in the inputs (10 skipped):")
    twelve = Inputs(skipped=[(f"f{i}", "bad") for i in range(12)])
    text = twelve.none_found()
    assert "(12 skipped)" in text and "\n  f9: bad" in text and "f10" not in text
    assert text.endswith("\n  ... and 2 more")


def test_a_url_is_kept_as_it_is_in_order(tmp_path):
    """URLs are inputs as given, between the local files, in the order given."""
    a = touch(tmp_path / "a.png")
    found = expand_inputs(["https://example.com/x.jpg", a, "http://example.com/y.JPG"])
    assert found.paths == ["https://example.com/x.jpg", a, "http://example.com/y.JPG"]


def test_an_object_store_uri_is_listed(monkeypatch):
    """An s3:// item goes to the object-store lister with the image suffixes; its result is the inputs."""
    seen = []
    monkeypatch.setattr(inputs_mod, "_list_uri", lambda uri, suffixes: seen.append((uri, suffixes)) or [uri + "k.png"])
    found = expand_inputs(["s3://bucket/photos/"])
    assert found.paths == ["s3://bucket/photos/k.png"]
    assert seen == [("s3://bucket/photos/", inputs_mod.IMAGE_SUFFIXES)]


def test_list_uri_an_object_a_prefix_and_nothing(monkeypatch):
    """_list_uri: an object is itself; a prefix its files with an image suffix (any case; not a
    folder named like one), sorted, under the URI's scheme; nothing there is refused."""
    pafs = pytest.importorskip("pyarrow.fs")
    listing = {  # as a store lists them: in no particular order
        "bucket/photos": [
            pafs.FileInfo("bucket/photos/z.png", pafs.FileType.File),
            pafs.FileInfo("bucket/photos/notes.txt", pafs.FileType.File),
            pafs.FileInfo("bucket/photos/d.png", pafs.FileType.Directory),
            pafs.FileInfo("bucket/photos/d.png/b.JPG", pafs.FileType.File),
            pafs.FileInfo("bucket/photos/a.png", pafs.FileType.File),
        ]
    }

    class Store:
        def get_file_info(self, what):
            if isinstance(what, pafs.FileSelector):
                assert what.recursive
                return listing[what.base_dir]
            kind = pafs.FileType.Directory if what in listing else pafs.FileType.NotFound
            return pafs.FileInfo(what, pafs.FileType.File if what.endswith(".png") else kind)

    monkeypatch.setattr(inputs_mod, "object_store", lambda uri, error: (pafs, Store(), uri.split("://", 1)[1]))
    suffixes = inputs_mod.IMAGE_SUFFIXES
    assert inputs_mod._list_uri("gs://bucket/photos", suffixes) == [
        "gs://bucket/photos/a.png",
        "gs://bucket/photos/d.png/b.JPG",
        "gs://bucket/photos/z.png",
    ]
    assert inputs_mod._list_uri("s3://bucket/one.png", suffixes) == ["s3://bucket/one.png"]
    with pytest.raises(UsageError, match=r"s3://bucket/none: no such object or prefix"):
        inputs_mod._list_uri("s3://bucket/none", suffixes)


def test_a_folder_with_upper_case_suffixes_and_others_ignored(tmp_path):
    """Folders: image suffixes in any case are inputs, sorted; other files are counted as ignored."""
    names = ["b.JPG", "a.png", "c.Jpeg", "notes.txt", "d.tiff", "e.raw"]
    for n in names:
        touch(tmp_path / "f" / n)
    found = expand_inputs([str(tmp_path / "f")])
    assert [Path(p).name for p in found.paths] == ["a.png", "b.JPG", "c.Jpeg", "d.tiff"]
    assert found.ignored == 2 and found.skipped == []


def test_a_dangling_link_in_a_folder_is_skipped_with_its_reason(tmp_path):
    """A link to nothing without an image suffix is skipped as dangling, not counted as ignored."""
    (tmp_path / "f").mkdir()
    touch(tmp_path / "f" / "a.png")
    os.symlink(tmp_path / "gone", tmp_path / "f" / "link")
    os.symlink(tmp_path / "gone.png", tmp_path / "f" / "z.png")
    found = expand_inputs([str(tmp_path / "f")])
    assert found.paths == [str(tmp_path / "f" / "a.png")]
    assert found.skipped == [
        (str(tmp_path / "f" / "link"), "a symbolic link to nothing (dangling)"),
        (str(tmp_path / "f" / "z.png"), "a symbolic link to nothing (dangling)"),
    ]
    assert found.ignored == 0


def test_a_glob_that_matches_a_folder_walks_it(tmp_path):
    """A pattern that names folders searches each, in sorted order, recursively."""
    b = touch(tmp_path / "set-b" / "x.png")
    a = touch(tmp_path / "set-a" / "deep" / "y.png")
    touch(tmp_path / "other" / "z.png")
    found = expand_inputs([str(tmp_path / "set-*")])
    assert found.paths == [a, b]


def test_a_glob_that_matches_files_is_sorted(tmp_path, monkeypatch):
    """A pattern's matching files, sorted (whatever order the file system lists them in), whatever
    their suffix (the user named them)."""
    import glob

    b, a = touch(tmp_path / "b.png"), touch(tmp_path / "a.webp")
    real = glob.glob
    monkeypatch.setattr(glob, "glob", lambda *args, **kw: sorted(real(*args, **kw), reverse=True))
    assert expand_inputs([str(tmp_path / "*.*")]).paths == [a, b]


def test_a_glob_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"\*\.png: the pattern matches no file"):
        expand_inputs([str(tmp_path / "*.png")])


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(UsageError, match="nothere.png: no such file or folder"):
        expand_inputs([str(tmp_path / "nothere.png")])


def test_a_file_that_cannot_be_stat_ed_is_skipped(tmp_path, monkeypatch):
    """A file whose stat fails (not for being absent) is skipped with the OS's reason."""
    path = Path(touch(tmp_path / "a.png"))
    real_stat = Path.stat

    def stat(self, *a, **k):
        if self.name == "a.png" and not k and not a:
            raise PermissionError(13, "Permission denied")
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", stat)
    found = Inputs()
    inputs_mod._add_file(path, found)
    assert found.paths == [] and found.skipped == [(str(path), "cannot be read (Permission denied)")]


def test_a_pipe_is_skipped_as_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    found = expand_inputs([str(tmp_path)])
    assert found.paths == [] and found.skipped == [
        (str(tmp_path / "pipe.png"), "not a regular file (a pipe, socket or device)")
    ]


def test_a_folder_that_cannot_be_searched_is_skipped(tmp_path):
    """A folder the walk cannot enter is listed in skipped with 'cannot be searched'."""
    found = Inputs()
    inputs_mod._walk_error(PermissionError(13, "Permission denied", str(tmp_path / "locked")), found)
    assert found.skipped == [(str(tmp_path / "locked"), "cannot be searched (Permission denied)")]


def test_a_dangling_link_given_by_name_is_skipped_not_refused(tmp_path):
    """A link to nothing named as an input is there (as a link): skipped with its reason, not
    refused as a missing file."""
    link = tmp_path / "gone-link.png"
    os.symlink(tmp_path / "gone.png", link)
    found = expand_inputs([str(link)])
    assert found.paths == []
    assert found.skipped == [(str(link), "a symbolic link to nothing (dangling)")]


def test_a_link_to_a_file_without_an_image_suffix_is_ignored_not_dangling(tmp_path):
    """In a folder, a link that resolves (to a file without an image suffix) is counted as ignored;
    only a link to nothing is skipped as dangling."""
    touch(tmp_path / "f" / "notes.txt")
    os.symlink(tmp_path / "f" / "notes.txt", tmp_path / "f" / "link")
    found = expand_inputs([str(tmp_path / "f")])
    assert (found.paths, found.skipped, found.ignored) == ([], [], 2)


def test_a_list_file_relative_paths_comments_blank_lines_and_urls(tmp_path):
    """List files: paths relative to the list's folder, comments and blank lines left out, URLs kept,
    any of its suffixes in any case (.TXT, .lst, .list)."""
    a = touch(tmp_path / "lists" / "imgs" / "a.png")
    for name in ("in.TXT", "in.lst", "in.list"):
        (tmp_path / "lists" / name).write_text(
            "# a comment\n\n  imgs/a.png  \nhttps://example.com/b.png\ns3://bucket/c.png\n", encoding="utf-8"
        )
        found = expand_inputs([str(tmp_path / "lists" / name)])
        assert found.paths == [a, "https://example.com/b.png", "s3://bucket/c.png"], name


def test_a_list_file_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "in.txt").write_bytes(b"a.png\n\xff\xfe.png\n")
    with pytest.raises(UsageError, match=r"in\.txt: a list file must be UTF-8 text \(invalid start byte at byte 6\)"):
        expand_inputs([str(tmp_path / "in.txt")])


def test_a_csv_table_of_inputs_in_its_path_column(tmp_path):
    """A CSV table: its `path` column, relative to the table's folder, empty cells left out."""
    pytest.importorskip("pyarrow")
    a = touch(tmp_path / "t" / "a.png")
    (tmp_path / "t" / "in.CSV").write_text("label,path\ncat,a.png\ndog,https://example.com/d.png\n")
    found = expand_inputs([str(tmp_path / "t" / "in.CSV")])
    assert found.paths == [a, "https://example.com/d.png"]


@pytest.mark.parametrize("column", ["path", "uri", "url"])
def test_a_parquet_table_of_inputs_in_any_of_its_columns(tmp_path, column):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"x": [1, 2, 3], column: ["a.png", None, "b.png"]}), tmp_path / "in.parquet")
    assert read_table_inputs(tmp_path / "in.parquet") == ["a.png", "b.png"]


def test_a_table_with_path_and_url_columns_takes_path(tmp_path):
    """The `path` column comes before `uri` and `url`."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"url": ["u.png"], "uri": ["i.png"], "path": ["p.png"]}), tmp_path / "in.parquet")
    assert read_table_inputs(tmp_path / "in.parquet") == ["p.png"]
    pq.write_table(pa.table({"url": ["u.png"], "uri": ["i.png"]}), tmp_path / "in.parquet")
    assert read_table_inputs(tmp_path / "in.parquet") == ["i.png"]


def test_a_table_without_a_path_column_is_refused(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "in.csv").write_text("file,label\na.png,cat\n")
    with pytest.raises(UsageError, match=r"in\.csv: the table has no path column \(found \['file', 'label'\]\)"):
        read_table_inputs(tmp_path / "in.csv")


def test_a_table_that_cannot_be_read_is_refused(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "in.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UsageError, match=r"in\.parquet: not a readable table of inputs \(ArrowInvalid"):
        read_table_inputs(tmp_path / "in.parquet")


def test_a_table_without_pyarrow_is_refused_with_the_remedy(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.csv", None)
    with pytest.raises(UsageError, match=r"in\.csv: reading a table of inputs needs pyarrow: pip install"):
        read_table_inputs(tmp_path / "in.csv")


def test_list_uri_of_an_unreachable_store_is_refused(monkeypatch):
    """A store whose listing raises is refused, naming the URI and the error class."""
    from types import SimpleNamespace

    class FS:
        def get_file_info(self, inner):
            raise OSError("no route")

    pafs = SimpleNamespace(FileType=SimpleNamespace(File=1, NotFound=0))
    monkeypatch.setattr(inputs_mod, "object_store", lambda uri, error: (pafs, FS(), "bucket/x"))
    with pytest.raises(UsageError, match=r"s3://bucket/x: cannot be listed \(OSError: no route\)"):
        inputs_mod._list_uri("s3://bucket/x", inputs_mod.IMAGE_SUFFIXES)


# -- writers.py -----------------------------------------------------------------------------------------------
def test_manifest_path_is_beside_the_folder(tmp_path):
    assert writers.manifest_path(tmp_path / "out") == tmp_path / "out.manifest.json"


def test_read_manifest_refusals(tmp_path):
    """A folder with no manifest, an unreadable one, one of another kind: each refused in its words."""
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(UsageError, match=r"out: a folder, but no dino3 embeddings dataset \(there is no out\.manifest"):
        writers.read_manifest(folder)
    (tmp_path / "out.manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"out\.manifest\.json cannot be read .*embed again with --overwrite"):
        writers.read_manifest(folder)
    for bad in ([1], {"format": "other", "dino3": {}}, {"format": writers.DATASET_FORMAT}):
        (tmp_path / "out.manifest.json").write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=r"out\.manifest\.json is not a dino3 embeddings dataset's manifest"):
            writers.read_manifest(folder)
    good = {"format": writers.DATASET_FORMAT, "dino3": {"pool": "cls"}, "shards": {}}
    (tmp_path / "out.manifest.json").write_text(json.dumps(good))
    assert writers.read_manifest(folder) == good


def test_dataset_files_in_numeric_order_without_empty_shards(tmp_path):
    """The shards done, by number (10 after 2), those with no rows left out."""
    manifest = {"shards": {"10": {"rows": 1}, "2": {"rows": 3}, "3": {"rows": 0}, "0": {"rows": 2}}}
    names = [Path(f).name for f in writers.dataset_files(tmp_path, manifest)]
    assert names == ["shard-00000.parquet", "shard-00002.parquet", "shard-00010.parquet"]


def test_is_embeddings(tmp_path):
    """By the suffix in any case; a URL never; a folder only with its manifest beside it."""
    assert writers.is_embeddings("x.NPZ") and writers.is_embeddings("x.safetensors")
    assert not writers.is_embeddings("x.png") and not writers.is_embeddings("https://h/x.npz")
    (tmp_path / "out").mkdir()
    assert not writers.is_embeddings(tmp_path / "out")
    (tmp_path / "out.manifest.json").write_text("{}")
    assert writers.is_embeddings(tmp_path / "out")


def test_check_output_refusals(tmp_path):
    with pytest.raises(UsageError, match=r"out\.csv: the output must end in one of .npz, .npy, .safetensors"):
        writers.check_output(tmp_path / "out.csv")
    with pytest.raises(UsageError, match=r"do not fit one \.npy array"):
        writers.check_output(tmp_path / "out.NPY", may_be_ragged=True)
    assert writers.check_output(tmp_path / "out.npz", may_be_ragged=True) == tmp_path / "out.npz"
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(UsageError, match=r"d\.npz is a folder; give a file name"):
        writers.check_output(tmp_path / "d.npz")


def test_check_output_parquet_without_pyarrow(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UsageError, match=r"writing \.parquet needs pyarrow"):
        writers.check_output(tmp_path / "out.parquet")


def test_check_output_in_a_folder_not_writable(tmp_path, monkeypatch):
    """A folder this user cannot write into is refused before any work (checked with os.access)."""
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(writers.os, "access", lambda path, mode: Path(path) != tmp_path / "ro" or mode != os.W_OK)
    with pytest.raises(UsageError, match=r"ro: no permission to write there"):
        writers.check_output(tmp_path / "ro" / "out.npz")
    assert writers.check_output(tmp_path / "out.npz") == tmp_path / "out.npz"


def test_sidecars(tmp_path):
    """The failures first; .npy (any case) has its paths and meta; a folder its manifest."""
    names = lambda p: [s.name for s in writers.sidecars(tmp_path / p)]  # noqa: E731
    assert names("o.npz") == ["o.npz.failures.tsv"]
    assert names("o.NPY") == ["o.NPY.failures.tsv", "o.NPY.paths.txt", "o.NPY.meta.json"]
    assert names("o") == ["o.failures.tsv", "o.manifest.json"]


def test_write_failures_removes_an_old_file_when_there_are_none(tmp_path):
    path = tmp_path / "o.failures.tsv"
    writers.write_failures(path, [("a\tb.png", "cannot\ndecode")])
    assert path.read_text() == "a\\tb.png\tcannot\\ndecode\n"
    writers.write_failures(path, [])
    assert not path.exists()
    writers.write_failures(path, [])  # none, and no file: nothing to do
    assert not path.exists()


RAGGED = [
    np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
    np.arange(1 * 2 * 4, dtype=np.float32).reshape(1, 2, 4),
]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".parquet"])
def test_ragged_grids_round_trip(tmp_path, suffix):
    """Patch grids of different sizes: rows one after the other, offsets, each item back in its shape."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"o{suffix}"
    writers.write_embeddings(out, ["a", "b"], RAGGED, [(2, 3), (1, 2)], {"pool": "patches"})
    back = writers.read_embeddings(out)
    assert back.paths == ["a", "b"] and back.meta == {"pool": "patches"}
    assert np.asarray(back.offsets).tolist() == [0, 6, 8]
    assert np.asarray(back.grid_sizes).tolist() == [[2, 3], [1, 2]]
    assert np.array_equal(back.item(0), RAGGED[0]) and np.array_equal(back.item(1), RAGGED[1])
    assert back.features.shape == (8, 4)


def test_ragged_grids_do_not_fit_npy(tmp_path):
    with pytest.raises(UsageError, match=r"do not fit one \.npy array"):
        writers.write_embeddings(tmp_path / "o.npy", ["a", "b"], RAGGED, [(2, 3), (1, 2)], {})
    assert not (tmp_path / "o.npy").exists()


def test_write_embeddings_other_suffix_refused(tmp_path):
    with pytest.raises(UsageError, match=r"o\.txt: the output must end in one of"):
        writers.write_embeddings(tmp_path / "o.txt", ["a"], [np.zeros(3, np.float32)], [(1, 1)], {})
    assert not (tmp_path / "o.txt").exists()


def test_npy_upper_case_suffix_writes_its_sidecars(tmp_path):
    """`.NPY`: the sidecars too (paths escaped), and read back the same."""
    out = tmp_path / "o.NPY"
    feats = [np.full(3, 1.0, np.float32), np.full(3, 2.0, np.float32)]
    writers.write_embeddings(out, ["a\tb", "c"], feats, [(1, 1), (2, 2)], {"pool": "cls"})
    assert (tmp_path / "o.NPY.paths.txt").read_text() == "a\\tb\nc\n"
    back = writers.read_embeddings(out)
    assert back.paths == ["a\tb", "c"] and back.meta["pool"] == "cls"
    assert np.asarray(back.grid_sizes).tolist() == [[1, 1], [2, 2]]
    assert np.array_equal(back.features, np.stack(feats))


def test_npy_without_its_meta_reads_zero_grids(tmp_path):
    """A .npy whose meta file is gone: the paths and features, grids of zeros, empty meta."""
    out = tmp_path / "o.npy"
    writers.write_embeddings(out, ["a", "b"], [np.zeros(2, np.float32)] * 2, [(1, 1)] * 2, {"pool": "cls"})
    (tmp_path / "o.npy.meta.json").unlink()
    back = writers.read_embeddings(out)
    assert back.meta == {} and np.asarray(back.grid_sizes).tolist() == [[0, 0], [0, 0]]


def test_read_embeddings_refusals(tmp_path):
    with pytest.raises(UsageError, match=r"nothere\.npz: no such embeddings file"):
        writers.read_embeddings(tmp_path / "nothere.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match=r"bad\.npz: not a readable dino3 embeddings file \(\w+Error"):
        writers.read_embeddings(tmp_path / "bad.npz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UsageError, match=r"x\.txt: the suffix must be one of .npz, .npy"):
        writers.read_embeddings(tmp_path / "x.txt")


def test_parquet_empty_and_upper_case(tmp_path):
    """An output with no image: zero rows read back; `.PARQUET` is parquet."""
    pytest.importorskip("pyarrow")
    writers.write_embeddings(tmp_path / "o.PARQUET", [], [], [], {"pool": "cls"})
    back = writers.read_embeddings(tmp_path / "o.PARQUET")
    assert back.paths == [] and back.features.size == 0 and back.meta == {"pool": "cls"}


def shard_file(tmp_path, index, count, paths, feats, sha="s", **meta):
    out = tmp_path / f"part{index}.npz"
    shard = {"index": index, "count": count, "inputs_sha256": sha}
    writers.write_embeddings(out, paths, feats, [(1, 1)] * len(paths), {"pool": "cls", "shard": shard, **meta})
    return out


def test_read_shards_in_shard_order(tmp_path):
    """Shards given in any order are read back in shard order; failures summed; shard cleared."""
    v = lambda x: np.full(2, x, np.float32)  # noqa: E731
    f1 = shard_file(tmp_path, 1, 2, ["c"], [v(3)], failed=2)
    f0 = shard_file(tmp_path, 0, 2, ["a", "b"], [v(1), v(2)], failed=1)
    back = writers.read_shards([f1, f0])
    assert back.paths == ["a", "b", "c"] and back.features[:, 0].tolist() == [1, 2, 3]
    assert back.meta["failed"] == 3 and back.meta["shard"] is None and back.offsets is None


def test_read_shards_refusals(tmp_path):
    v = np.zeros(2, np.float32)
    with pytest.raises(UsageError, match="no shard files given"):
        writers.read_shards([])
    plain = tmp_path / "plain.npz"
    writers.write_embeddings(plain, ["a"], [v], [(1, 1)], {"pool": "cls"})
    f0 = shard_file(tmp_path, 0, 3, ["a"], [v])
    with pytest.raises(UsageError, match="some of these files were not written with --shard"):
        writers.read_shards([f0, plain])
    f0_again = shard_file(tmp_path, 0, 2, ["a"], [v])
    with pytest.raises(UsageError, match=r"the job had 2 shards; these files hold shards \[0, 0\]"):
        writers.read_shards([f0_again, f0_again])
    f0 = shard_file(tmp_path, 0, 3, ["a"], [v])
    f2 = shard_file(tmp_path, 2, 3, ["c"], [v])
    with pytest.raises(UsageError, match=r"the job had 3 shards; these files hold shards \[0, 2\]"):
        writers.read_shards([f0, f2])
    g0 = shard_file(tmp_path, 0, 2, ["a"], [v])
    g1 = shard_file(tmp_path, 1, 2, ["b"], [v], sha="other")
    with pytest.raises(UsageError, match="shard 1 comes from another list of inputs"):
        writers.read_shards([g0, g1])
    h1 = shard_file(tmp_path, 1, 2, ["b"], [v], pool="mean")
    with pytest.raises(UsageError, match=r"shard 1 was made with other settings \(pool\)"):
        writers.read_shards([g0, h1])


def test_read_shards_of_different_shapes_are_joined_ragged(tmp_path):
    """Shards whose images' patch grids differ are joined as rows with offsets, each image intact."""
    a = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    b = np.arange(1 * 3 * 3, dtype=np.float32).reshape(1, 3, 3) + 100
    f0 = tmp_path / "s0.npz"
    f1 = tmp_path / "s1.npz"
    for out, paths, feat, grid, k in ((f0, ["a"], a, (2, 2), 0), (f1, ["b"], b, (1, 3), 1)):
        shard = {"index": k, "count": 2, "inputs_sha256": "s"}
        writers.write_embeddings(out, paths, [feat], [grid], {"pool": "patches", "shard": shard})
    back = writers.read_shards([f0, f1])
    assert back.offsets.tolist() == [0, 4, 7] and back.features.shape == (7, 3)
    assert np.array_equal(back.item(0), a) and np.array_equal(back.item(1), b)


# -- store.py -------------------------------------------------------------------------------------------------
def test_input_stat_of_a_url_and_a_missing_file(tmp_path):
    """(-1, -1) for what cannot be stat-ed; a file's (size, mtime_ns)."""
    assert store.input_stat("https://example.com/a.png") == (-1, -1)
    assert store.input_stat(str(tmp_path / "gone.png")) == (-1, -1)
    path = touch(tmp_path / "a.png", b"12345")
    assert store.input_stat(path) == (5, os.stat(path).st_mtime_ns)


def test_run_lock_is_exclusive_and_released(tmp_path):
    """A second lock on the same output is refused naming it; after release it can be taken again."""
    from dino3.errors import RunLockedError

    out = tmp_path / "out.npz"
    with store.RunLock(out) as lock:
        assert (tmp_path / "out.npz.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunLockedError, match=r"another dino3 job is writing out\.npz right now"):
            store.RunLock(out).acquire()
        assert lock.fd is not None
    assert not (tmp_path / "out.npz.lock").exists()
    with store.RunLock(out):
        pass


def test_check_resumable_without_a_readable_manifest(tmp_path):
    s = store.Store(tmp_path / "o.npz", {"pool": "cls"})
    s.folder.mkdir()
    with pytest.raises(UsageError, match=r"o\.npz\.partial holds no readable manifest; .*use --overwrite"):
        s.check_resumable()
    (s.folder / store.MANIFEST).write_text("{oops")
    with pytest.raises(UsageError, match="holds no readable manifest"):
        s.check_resumable()


def test_check_resumable_names_each_change_old_and_new(tmp_path):
    """Every key that changed, sorted, old then new; a long value shortened to 120 characters."""
    old = store.Store(tmp_path / "o.npz", {"pool": "cls", "dtype": "float32", "paths": "a" * 200, "gone": 2})
    old.save(store.Chunk([0], [np.zeros(2, np.float32)], [(1, 1)], [], {0: (1, 2)}))
    same = store.Store(tmp_path / "o.npz", {"pool": "cls", "dtype": "float32", "paths": "a" * 200, "gone": 2})
    same.check_resumable()  # nothing changed: no refusal
    new = store.Store(tmp_path / "o.npz", {"pool": "mean", "dtype": "float32", "paths": "b" * 200, "x": 1})
    with pytest.raises(UsageError) as info:
        new.check_resumable()
    lines = str(info.value).splitlines()
    assert lines[1:5] == [
        "  gone: was 2, now null",
        f'  paths: was "{"a" * 116}..., now "{"b" * 116}...',
        '  pool: was "cls", now "mean"',
        "  x: was null, now 1",
    ]
    assert len(lines[2]) == len("  paths: was , now ") + 2 * 120
    assert lines[-1] == "run with the settings it began with, or start over with --overwrite"


def test_store_short_keeps_120_characters():
    """The boundary of the shortening: 120 characters shown whole, 121 cut to 117 and '...'."""
    assert store._short("a" * 118) == '"' + "a" * 118 + '"'
    assert store._short("a" * 119) == '"' + "a" * 116 + "..."


def test_store_saves_numbered_chunks_and_loads_them_back(tmp_path):
    """Chunks are numbered on from the highest one there; each comes back whole (features, grids,
    failures, stats); the manifest is written with the first."""
    s = store.Store(tmp_path / "o.npz", {"pool": "cls"})
    assert s.chunk_files() == [] and not s.exists
    a = touch(tmp_path / "a.png", b"aa")
    b = touch(tmp_path / "b.png", b"bbb")
    paths = [a, b]
    s.save(store.Chunk([0], [np.full(3, 7.0, np.float32)], [(2, 5)], [], {0: store.input_stat(a)}))
    s.save(store.Chunk([], [], [], [(1, "broken")], {1: store.input_stat(b)}))
    assert json.loads((s.folder / store.MANIFEST).read_text()) == {"store_version": store.STORE_VERSION, "pool": "cls"}
    assert [f.name for f in s.chunk_files()] == ["chunk-000000.npz", "chunk-000001.npz"]
    (s.folder / "chunk-000000.npz").rename(s.folder / "chunk-000009.npz")
    s.save(store.Chunk([], [], [], [], {}))
    assert [f.name for f in s.chunk_files()][-1] == "chunk-000010.npz"
    chunks, notes = s.load(paths)
    assert notes == []
    by_first = {c.covered and min(c.covered): c for c in chunks if c.covered}
    assert by_first[0].indices == [0] and by_first[0].grids == [(2, 5)] and by_first[0].features[0].tolist() == [7] * 3
    assert by_first[1].failures == [(1, "broken")] and by_first[1].covered == {1}
    assert by_first[0].stats == {0: (2, os.stat(a).st_mtime_ns)}


def test_store_load_redoes_changed_inputs_naming_three_and_counting_the_rest(tmp_path):
    """A chunk with changed inputs is deleted and redone; the note names three and counts the rest."""
    s = store.Store(tmp_path / "o.npz", {})
    names = [touch(tmp_path / f"{i}.png", b"x") for i in range(5)]
    stats = {i: (99, 99) for i in range(5)}  # none matches the files now
    s.save(store.Chunk(list(range(5)), [np.zeros(1, np.float32)] * 5, [(1, 1)] * 5, [], stats))
    chunks, notes = s.load(names)
    assert chunks == [] and s.chunk_files() == []
    assert notes == [f"{names[0]}, {names[1]}, {names[2]} and 2 more changed since the run began; done again"]
    s.save(store.Chunk([0, 1, 2], [np.zeros(1, np.float32)] * 3, [(1, 1)] * 3, [], {i: (9, 9) for i in range(3)}))
    chunks, notes = s.load(names)
    assert notes == [f"{names[0]}, {names[1]}, {names[2]} changed since the run began; done again"]


def test_store_load_ignores_stats_of_indices_past_the_inputs(tmp_path):
    """A stat recorded for an index past the list's end is not compared (nor fails the load)."""
    s = store.Store(tmp_path / "o.npz", {})
    a = touch(tmp_path / "a.png")
    s.save(store.Chunk([0], [np.zeros(1, np.float32)], [(1, 1)], [], {0: store.input_stat(a), 1: (5, 5)}))
    chunks, notes = s.load([a])
    assert notes == [] and len(chunks) == 1


def test_a_chunk_whose_grids_and_indices_disagree_is_damaged(tmp_path):
    """A chunk file with fewer grids than images is treated as damaged: deleted, its images redone."""
    s = store.Store(tmp_path / "o.npz", {})
    s.save(store.Chunk([0], [np.zeros(1, np.float32)], [(1, 1)], [], {}))
    file = s.chunk_files()[0]
    with np.load(file) as data:
        arrays = dict(data)
    arrays["grids"] = np.zeros((0, 2), np.int64)
    with open(file, "wb") as f:
        np.savez(f, **arrays)
    chunks, notes = s.load(["a"])
    assert chunks == [] and notes == ["chunk-000000.npz was damaged (an interrupted write?); its images are done again"]
    assert not file.exists()


# -- ray_job.py (no Ray: the folder checks and the shard writer) ------------------------------------------
def write_manifest(folder: Path, **extra) -> dict:
    manifest = {"format": writers.DATASET_FORMAT, "dino3": {"pool": "cls"}, "shards": {}, **extra}
    (folder.parent / (folder.name + ".manifest.json")).write_text(json.dumps(manifest))
    return manifest


def test_previous_refuses_a_foreign_folder_and_a_resume_of_nothing(tmp_path):
    out = tmp_path / "out"
    assert ray_job._previous(out, resume=False, overwrite=False) is None  # new folder
    out.mkdir()
    assert ray_job._previous(out, resume=False, overwrite=True) is None  # empty folder
    with pytest.raises(UsageError, match=r"out holds no interrupted job to resume; leave --resume out"):
        ray_job._previous(out, resume=True, overwrite=False)
    (out / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match=r"out is not empty and holds no dino3 embeddings dataset"):
        ray_job._previous(out, resume=False, overwrite=True)


def test_previous_refuses_files_dino3_did_not_write_and_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = write_manifest(out)
    (out / "shard-00000.parquet").write_bytes(b"")
    with pytest.raises(
        UsageError, match=r"out holds a dino3 output: pass --resume to continue its job, or --overwrite"
    ):
        ray_job._previous(out, resume=False, overwrite=False)
    assert ray_job._previous(out, resume=True, overwrite=False) == manifest
    assert ray_job._previous(out, resume=False, overwrite=True) == manifest
    for name in ("shard-0000.parquet", "notes.md", "shard-00001.parquet.tmp"):
        (out / name).write_bytes(b"")
    with pytest.raises(UsageError, match=r"holds files that dino3 did not write \(notes\.md, shard-0000\.parquet, sh"):
        ray_job._previous(out, resume=True, overwrite=False)


def test_check_resumable_names_what_changed(tmp_path):
    base = {"dino3": {"pool": "cls"}, "inputs_sha256": "a", "count": 3, "shard_size": 2}
    ray_job._check_resumable(tmp_path / "out", base, dict(base))
    for key, value in (("inputs_sha256", "b"), ("count", 4), ("shard_size", 3)):
        with pytest.raises(UsageError, match=rf"cannot resume .*out: .*\n  {key}: {base[key]} -> {value}\n"):
            ray_job._check_resumable(tmp_path / "out", base, {**base, key: value})
    with pytest.raises(UsageError, match=r"\n  pool: \"cls\" -> \"mean\""):
        ray_job._check_resumable(tmp_path / "out", base, {**base, "dino3": {"pool": "mean"}})


def test_clear_removes_only_what_dino3_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00003.parquet").write_bytes(b"")
    (out / "keep.txt").write_text("mine")
    for sidecar in writers.sidecars(out):
        sidecar.write_text("x")
    (tmp_path / "other.txt").write_text("mine too")
    ray_job._clear(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "out"]


def test_remove_unfinished_keeps_the_shards_the_manifest_names(tmp_path):
    """A shard file the manifest does not name (written, never recorded) is removed; by number, so
    shard-00010 is shard 10, not '00010'."""
    out = tmp_path / "out"
    out.mkdir()
    for k in (0, 1, 10, 11):
        (out / writers.shard_file(k)).write_bytes(b"")
    (out.parent / "out.partial").mkdir()
    ray_job._remove_unfinished(out, {"shards": {"0": {}, "10": {}}})
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet", "shard-00010.parquet"]
    assert not (out.parent / "out.partial").exists()


def test_rows_of_a_list_column_and_of_a_sliced_fixed_size_column():
    """_rows: a fixed-size list column sliced (its offset honoured) and a plain list column (nulls as empty)."""
    pa = pytest.importorskip("pyarrow")
    values = np.arange(12, dtype=np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(values), 3)
    rows = ray_job._rows(pa.chunked_array([fixed.slice(1, 2)]))
    assert rows.tolist() == [[3, 4, 5], [6, 7, 8]]
    listed = ray_job._rows(pa.chunked_array([pa.array([[1.0, 2.0], None, [3.0]], pa.list_(pa.float32()))]))
    assert [r.tolist() for r in listed] == [[1, 2], [], [3]]


class Blocks:
    def __init__(self, tables):
        self.tables = tables

    def iter_batches(self, batch_size=None, batch_format="pyarrow"):
        yield from self.tables


def plan_rows(paths, errors, dim=2, start=0):
    pa = pytest.importorskip("pyarrow")
    values = np.stack([np.full(dim, start + i, np.float32) for i in range(len(paths))]).reshape(-1)
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(values), dim),
            "shape": pa.array([[dim]] * len(paths), pa.list_(pa.int64())),
            "grid_h": pa.array([1] * len(paths), pa.int64()),
            "grid_w": pa.array([2] * len(paths), pa.int64()),
            "error": pa.array(errors, pa.string()),
        }
    )


def test_write_shard_of_nothing_and_of_failures_only(tmp_path):
    """No rows: nothing written; every row failed: the failures, no file."""
    out = tmp_path / "out"
    out.mkdir()
    assert ray_job._write_shard(out, 0, Blocks([]), {}) == (0, [])
    assert ray_job._write_shard(out, 0, Blocks([plan_rows(["a"], ["bad"])]), {}) == (0, [["a", "bad"]])
    assert list(out.iterdir()) == []


def test_write_shard_keeps_the_good_rows_of_several_blocks_in_order(tmp_path):
    """Blocks joined in order; failed rows left out; the file named by the shard's number."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    out.mkdir()
    blocks = Blocks([plan_rows(["a", "b"], ["", "nope"]), plan_rows(["c"], [""], start=5)])
    assert ray_job._write_shard(out, 12, blocks, {"pool": "cls"}) == (2, [["b", "nope"]])
    table = pq.read_table(out / "shard-00012.parquet")
    assert table.column("path").to_pylist() == ["a", "c"]
    assert table.column("features").to_pylist() == [[0, 0], [5, 5]]
    assert table.column("grid_w").to_pylist() == [2, 2]
    assert json.loads(table.schema.metadata[b"dino3"]) == {"pool": "cls"}


# -- job.py: what run() refuses before any work ---------------------------------------------------------
def test_run_refusals_before_any_work(checkpoint, tmp_path):
    """Each bad argument is refused with the words that name it, and nothing is written."""
    import dino3
    from dino3.embed.job import RayOptions
    from dino3.recipe import Recipe

    a = image(tmp_path / "in" / "a.png")
    out = tmp_path / "o.npz"
    run = lambda **kw: dino3.embed.run([a], **{"model": str(checkpoint), "output": out, "progress": False, **kw})  # noqa: E731
    cases = [
        ({"engine": "spark"}, r"engine must be one of \('local', 'ray'\), got 'spark'"),
        ({"model": None}, r"give the model \(or a recipe\)"),
        ({"output": None}, "give the output"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"workers": -1}, "workers must be an integer >= 0, got -1"),
        ({"checkpoint_every": 1.5}, "checkpoint_every must be an integer >= 1, got 1.5"),
        ({"device": "tpu"}, "tpu"),
        ({"video": "every"}, "video must be a dino3.video.Sampling, got str"),
        ({"resume": True, "overwrite": True}, "resume and overwrite contradict each other"),
        ({"engine": "ray", "shard": "0/2"}, "shard, device and video sampling are for the local engine"),
        ({"ray": RayOptions()}, "ray options are for engine='ray'"),
        ({"recipe": Recipe(str(tmp_path / "other"))}, "and the recipe's model .* differ; give one of them"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            run(**kwargs)
    assert run(workers=0, batch_size=1, checkpoint_every=1).count == 1  # the lowest values allowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.npz"]


def test_run_calibration_paths_are_expanded(checkpoint, tmp_path, monkeypatch):
    """Calibration images given as a folder become its image paths in the recipe."""
    import dino3
    from dino3.embed import job

    cal = [touch(tmp_path / "cal" / n) for n in ("b.png", "a.png")]
    seen = {}

    def recipe(model, **options):
        seen.update(options)
        raise UsageError("stop here")

    monkeypatch.setattr(job, "Recipe", recipe)
    with pytest.raises(UsageError, match="stop here"):
        dino3.embed.run(["x"], model=str(checkpoint), output=tmp_path / "o.npz", calibration=[tmp_path / "cal"])
    assert seen["calibration"] == sorted(cal)


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("1/1", r"shard 1/1: K must lie in 0..N-1"),
        ("-1/2", "K must lie"),
        ("0/0", "K must lie"),
        ("a/b", "write it K/N"),
    ],
)
def test_parse_shard_refusals(shard, message):
    from dino3.embed.job import parse_shard

    with pytest.raises(UsageError, match=message):
        parse_shard(shard)


def test_parse_shard_accepts_the_bounds():
    from dino3.embed.job import parse_shard

    assert parse_shard("0/1") == (0, 1) and parse_shard("7/8") == (7, 8) and parse_shard((2, 3)) == (2, 3)
    assert parse_shard(None) is None


def test_the_skipped_inputs_are_reported_by_the_first_shard_only(checkpoint, tmp_path):
    """A sharded job lists its inputs in every shard; what the lister skipped is reported once, by
    shard 0, so that the shards' failure lists add up to the job's."""
    import dino3

    image(tmp_path / "in" / "a.png")
    image(tmp_path / "in" / "b.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "in" / "c.png")
    common = dict(model=str(checkpoint), size=32, workers=0, progress=False)
    first = dino3.embed.run([str(tmp_path / "in")], output=tmp_path / "0.npz", shard="0/2", **common)
    second = dino3.embed.run([str(tmp_path / "in")], output=tmp_path / "1.npz", shard="1/2", **common)
    assert first.failures == [(str(tmp_path / "in" / "c.png"), "a symbolic link to nothing (dangling)")]
    assert second.failures == [] and (first.count, second.count) == (1, 1)


def test_a_shard_with_no_image_is_refused(checkpoint, tmp_path):
    """More shards than images: an empty shard says how many images there are."""
    import dino3

    a = touch(tmp_path / "in" / "a.png")
    with pytest.raises(UsageError, match=r"shard 0/2 holds no image: there are only 1"):
        dino3.embed.run([a], model=str(checkpoint), output=tmp_path / "o.npz", shard="0/2", progress=False)


# -- integrations/ray.py: the stages, called as Ray would, without Ray ------------------------------------
def test_decode_gives_pixels_or_the_error_per_row(tmp_path):
    """_decode: each path's float32 pixels with their height and width, or its error naming the path."""
    from PIL import Image

    from dino3.integrations import ray as plan
    from dino3.processing import DINOv3ViTImageProcessor

    good = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    proc = DINOv3ViTImageProcessor(size={"height": 32, "width": 48})
    rows = plan._decode({"path": np.asarray([str(good), str(tmp_path / "gone.png")], object)}, proc.to_dict())
    assert rows["path"].tolist() == [str(good), str(tmp_path / "gone.png")]
    assert rows["height"].tolist() == [32, 0] and rows["width"].tolist() == [48, 0]
    expected = proc.pixels(good.read_bytes()).numpy()
    assert np.array_equal(np.frombuffer(rows["pixels"][0], np.float32).reshape(3, 32, 48), expected)
    assert rows["pixels"][1] == b"" and rows["error"][0] == ""
    assert str(tmp_path / "gone.png") in rows["error"][1] and rows["error"][1].count("gone.png") == 1


def test_embedder_groups_sizes_and_keeps_failed_rows_as_nulls(checkpoint):
    """_Embedder: rows of two sizes, each as the model computes it alone; a failed row null, in place."""
    import torch

    import dino3
    from dino3.features import extract
    from dino3.integrations import ray as plan

    model = dino3.load(str(checkpoint))
    a = torch.randn(3, 32, 32)
    b = torch.randn(3, 32, 48)
    c = torch.randn(3, 32, 32)
    batch = {
        "path": np.asarray(["a", "bad", "b", "c"], object),
        "pixels": np.asarray([a.numpy().tobytes(), b"", b.numpy().tobytes(), c.numpy().tobytes()], object),
        "height": np.asarray([32, 0, 32, 32]),
        "width": np.asarray([32, 0, 48, 32]),
        "error": np.asarray(["", "bad: cannot decode", "", ""], object),
    }
    embedder = plan._Embedder(str(checkpoint), {"check_hash": False}, "cls", None, '{"k": 1}', None, threads=1)
    table = embedder(batch)
    assert table.column("path").to_pylist() == ["a", "bad", "b", "c"]
    assert table.column("error").to_pylist() == ["", "bad: cannot decode", "", ""]
    got = table.column("features").to_pylist()
    assert got[1] is None
    with torch.inference_mode():
        want_a = extract(model, a[None], "cls")[0][0].numpy()
        want_b = extract(model, b[None], "cls")[0][0].numpy()
        want_c = extract(model, c[None], "cls")[0][0].numpy()
    np.testing.assert_allclose(got[0], want_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[2], want_b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[3], want_c, rtol=1e-4, atol=1e-5)
    assert table.column("grid_h").to_pylist() == [2, 0, 2, 2]
    assert table.column("grid_w").to_pylist() == [2, 0, 3, 2]
    assert table.column("shape").to_pylist() == [[len(want_a)], [], [len(want_b)], [len(want_c)]]
    assert table.schema.metadata[b"dino3"] == b'{"k": 1}'
    fixed = plan._Embedder(str(checkpoint), {"check_hash": False}, "cls", None, "{}", len(want_a), threads=1)(batch)
    column = fixed.column("features").combine_chunks()
    assert column.type.list_size == len(want_a) and column.null_count == 1 and column.is_null().to_pylist()[1]


def test_check_reachable_refuses_an_address_nobody_listens_at():
    """A cluster address with nothing listening fails at once, naming the address and the remedy."""
    import socket

    from dino3.errors import Dino3Error
    from dino3.integrations import ray as plan

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        Dino3Error, match=rf"cannot reach the Ray cluster at 'ray://127.0.0.1:{port}'.*ray start --head"
    ):
        plan._check_reachable(f"ray://127.0.0.1:{port}", timeout=1)
    with pytest.raises(Dino3Error, match="nothing answers there"):
        plan._check_reachable("127.0.0.1:notaport", timeout=1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        plan._check_reachable(f"ray://127.0.0.1:{server.getsockname()[1]}", timeout=1)  # someone there: no error
        plan._check_reachable(f":{server.getsockname()[1]}", timeout=1)  # no host: this machine's


def test_require_without_ray_names_the_extra(monkeypatch):
    import sys

    from dino3.integrations import ray as plan

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"the Ray engine needs Ray Data: pip install 'dino3\[ray\]'"):
        plan.require()


# -- job.py and ray_job.py around a model: what a run writes and refuses ---------------------------------
def test_chunks_are_whole_batches_of_about_checkpoint_every(checkpoint, tmp_path, monkeypatch):
    """checkpoint_every=5 with batches of 2: chunks of 4 images (whole batches, at least one), then
    the partial last one; checkpoint_every below a batch: a chunk per batch."""
    import dino3

    paths = [image(tmp_path / "in" / f"{i}.png") for i in range(5)]
    sizes = []
    real = store.Store.save
    monkeypatch.setattr(store.Store, "save", lambda self, chunk: sizes.append(len(chunk.indices)) or real(self, chunk))
    common = dict(model=str(checkpoint), size=32, batch_size=2, workers=0, progress=False)
    dino3.embed.run(paths, output=tmp_path / "a.npz", checkpoint_every=5, **common)
    assert sizes == [4, 1]
    sizes.clear()
    dino3.embed.run(paths, output=tmp_path / "b.npz", checkpoint_every=1, **common)
    assert sizes == [2, 2, 1]
    # images that fail count toward a chunk too: 2 failures + 2 images make the first chunk of 4
    broken = [touch(tmp_path / "in" / f"broken{i}.png", b"not an image") for i in range(2)]
    counted = []
    monkeypatch.setattr(
        store.Store, "save", lambda self, chunk: counted.append((len(chunk.indices), len(chunk.failures)))
    )
    dino3.embed.run(broken + paths, output=tmp_path / "c.npz", checkpoint_every=4, **common)
    assert counted == [(2, 2), (3, 0)]


def test_an_existing_output_or_interrupted_run_needs_a_choice(checkpoint, tmp_path):
    """An output already there, or an interrupted run's store, is refused without --overwrite/--resume."""
    import dino3

    a = image(tmp_path / "in" / "a.png")
    out = tmp_path / "o.npz"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match=r"o\.npz exists; pass --overwrite to replace it"):
        dino3.embed.run([a], model=str(checkpoint), output=out, progress=False)
    out.unlink()
    (tmp_path / "o.npz.partial").mkdir()
    with pytest.raises(UsageError, match=r"o\.npz\.partial holds an interrupted run: pass --resume .* or --overwrite"):
        dino3.embed.run([a], model=str(checkpoint), output=out, progress=False)
    assert out.exists() is False
    result = dino3.embed.run([a], model=str(checkpoint), output=out, size=32, overwrite=True, progress=False)
    assert result.count == 1 and not (tmp_path / "o.npz.partial").exists()


@pytest.fixture
def stand_in_ray(monkeypatch):
    """The Ray Data plan replaced by rows made here (test_ray_job's way): no Ray needed."""
    from dino3.integrations import ray as plan

    pa = pytest.importorskip("pyarrow")
    made = []

    def embed(shard, recipe, **options):
        made.append(list(shard))
        values = np.stack([np.full(3, float(len(p)), np.float32) for p in shard]).reshape(-1)
        return Blocks(
            [
                pa.table(
                    {
                        "path": pa.array(list(shard), pa.string()),
                        "features": pa.FixedSizeListArray.from_arrays(pa.array(values), 3),
                        "shape": pa.array([[3]] * len(shard), pa.list_(pa.int64())),
                        "grid_h": pa.array([2] * len(shard), pa.int64()),
                        "grid_w": pa.array([2] * len(shard), pa.int64()),
                        "error": pa.array([""] * len(shard), pa.string()),
                    }
                )
            ]
        )

    monkeypatch.setattr(plan, "require", lambda: None)
    monkeypatch.setattr(plan, "start", lambda address, progress: 0.0)
    monkeypatch.setattr(plan, "embed", embed)
    return made


def test_ray_engine_refusals(stand_in_ray, checkpoint, tmp_path):
    """The Ray engine writes a folder: a file name or an existing file is refused; so are kept-aspect
    patch grids and a shard size below 1; nothing is written."""
    import dino3
    from dino3.embed.job import RayOptions

    a = touch(tmp_path / "in" / "a.png")
    run = lambda out, **kw: dino3.embed.run([a], model=str(checkpoint), output=out, engine="ray", progress=False, **kw)  # noqa: E731
    for name in ("o.parquet", "o.NPZ"):
        with pytest.raises(UsageError, match=rf"{name}: the Ray engine writes a folder"):
            run(tmp_path / name)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="file: the Ray engine writes a folder"):
        run(tmp_path / "file")
    with pytest.raises(UsageError, match="patch grids of kept aspect ratios .* need the local engine"):
        run(tmp_path / "o", pool="patches", keep_aspect="shorter", target=64)
    from dino3.video import Sampling

    for local in ({"shard": "0/2"}, {"device": "cpu"}, {"video": Sampling()}):
        with pytest.raises(UsageError, match="shard, device and video sampling are for the local engine"):
            run(tmp_path / "o", **local)
    for bad in (0, 1.5):
        with pytest.raises(UsageError, match=rf"shard_size must be an integer >= 1, got {bad}"):
            run(tmp_path / "o", ray=RayOptions(shard_size=bad))
    with pytest.raises(UsageError, match="no images found in the inputs"):
        dino3.embed.run(dino3.embed.Inputs(), model=str(checkpoint), output=tmp_path / "o", engine="ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in"] and stand_in_ray == []


def test_ray_engine_resume_skips_the_shards_done_and_overwrite_redoes_them(stand_in_ray, checkpoint, tmp_path):
    """A resumed Ray job does only the shards its manifest does not name (saying so); --overwrite
    does them all again and keeps nothing of the old output."""
    import dino3
    from dino3.embed.job import RayOptions

    paths = [touch(tmp_path / "in" / f"{'x' * i}.png") for i in range(1, 4)]
    out = tmp_path / "out"
    run = lambda **kw: dino3.embed.run(  # noqa: E731
        paths, model=str(checkpoint), output=out, engine="ray", ray=RayOptions(shard_size=2), progress=False, **kw
    )
    assert run().count == 3 and stand_in_ray == [paths[:2], paths[2:]]
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert [(s["first"], s["last"], s["rows"]) for s in manifest["shards"].values()] == [
        (paths[0], paths[1], 2),
        (paths[2], paths[2], 1),
    ]
    del manifest["shards"]["1"]
    (tmp_path / "out.manifest.json").write_text(json.dumps(manifest))
    stand_in_ray.clear()
    result = run(resume=True)
    assert stand_in_ray == [paths[2:]] and result.notes == ["shard 0 was done already"] and result.count == 3
    back = writers.read_embeddings(out)
    assert back.paths == paths and back.features[:, 0].tolist() == [len(p) for p in paths]
    stand_in_ray.clear()
    assert run(overwrite=True).count == 3 and stand_in_ray == [paths[:2], paths[2:]]
    with pytest.raises(UsageError, match="holds a dino3 output: pass --resume"):
        run()


def test_ray_engine_overwrite_removes_the_old_outputs_before_its_work(stand_in_ray, checkpoint, tmp_path, monkeypatch):
    """--overwrite removes the old shards and failure list first: an overwrite that then fails leaves
    no failure list of the old job beside the new one's manifest."""
    import dino3
    from dino3.errors import Dino3Error
    from dino3.integrations import ray as plan

    paths = [touch(tmp_path / "in" / "a.png")]
    out = tmp_path / "out"
    dino3.embed.run(paths, model=str(checkpoint), output=out, engine="ray", progress=False)
    (tmp_path / "out.failures.tsv").write_text("old.png\tcannot decode\n")

    class Broken:
        def iter_batches(self, **kw):
            raise RuntimeError("worker died\nmore lines")

    monkeypatch.setattr(plan, "embed", lambda shard, recipe, **kw: Broken())
    with pytest.raises(Dino3Error, match=r"the Ray job failed on shard 0: RuntimeError: worker died$"):
        dino3.embed.run(paths, model=str(checkpoint), output=out, engine="ray", overwrite=True, progress=False)
    assert not (tmp_path / "out.failures.tsv").exists() and list(out.iterdir()) == []
    assert json.loads((tmp_path / "out.manifest.json").read_text())["shards"] == {}


def test_videos_are_inputs_only_with_a_sampling(tmp_path, monkeypatch):
    """With `video`, a video in a folder, named directly or in a list file gives its frames (and its
    problems as skipped); one that cannot be read is skipped with the reason. Without, a video in a
    folder is an ignored file; a URL to a video stays a URL."""
    from dino3.errors import VideoError
    from dino3.video import Sampling

    clip = touch(tmp_path / "v" / "clip.MP4")
    bad = touch(tmp_path / "v" / "bad.mkv")
    a = touch(tmp_path / "v" / "a.png")
    (tmp_path / "list.txt").write_text("v/clip.MP4\nhttps://h/remote.mp4\n")

    def list_frames(name, sampling):
        assert sampling == Sampling(every=2)
        if name.endswith("bad.mkv"):
            raise VideoError(f"{name}: no video frames")
        return [f"{name}#t=0.000", f"{name}#t=0.080"], [(f"{name}#t=0.160", "cut short")]

    monkeypatch.setattr(inputs_mod, "list_frames", list_frames)
    found = expand_inputs([str(tmp_path / "v")], video=Sampling(every=2))
    assert found.paths == [a, f"{clip}#t=0.000", f"{clip}#t=0.080"]
    assert found.skipped == [(bad, f"{bad}: no video frames"), (f"{clip}#t=0.160", "cut short")]
    listed = expand_inputs([str(tmp_path / "list.txt"), clip], video=Sampling(every=2))
    assert listed.paths == [f"{clip}#t=0.000", f"{clip}#t=0.080", "https://h/remote.mp4"] + [
        f"{clip}#t=0.000",
        f"{clip}#t=0.080",
    ]
    plain = expand_inputs([str(tmp_path / "v")])
    assert plain.paths == [a] and plain.ignored == 2 and plain.skipped == []
    assert expand_inputs([clip]).paths == [clip]  # named, without a sampling: a file as it is
    assert expand_inputs([str(tmp_path / "list.txt")]).paths == [clip, "https://h/remote.mp4"]  # listed: the same


def test_embedder_a_failed_forward_fails_only_its_group(checkpoint, monkeypatch):
    """A forward that raises for one group of sizes marks its rows failed (path, error class and
    message); the other group's rows keep their features."""
    import torch

    import dino3.features
    from dino3.integrations import ray as plan

    real = dino3.features.extract

    def extract(model, pixels, *args):
        if pixels.shape[-1] == 48:
            raise RuntimeError("out of memory")
        return real(model, pixels, *args)

    monkeypatch.setattr(dino3.features, "extract", extract)
    a, b = torch.randn(3, 32, 32), torch.randn(3, 32, 48)
    batch = {  # the failing group first: the groups after it are still done
        "path": np.asarray(["b", "a", "b2"], object),
        "pixels": np.asarray([b.numpy().tobytes(), a.numpy().tobytes(), b.numpy().tobytes()], object),
        "height": np.asarray([32, 32, 32]),
        "width": np.asarray([48, 32, 48]),
        "error": np.asarray(["", "", ""], object),
    }
    table = plan._Embedder(str(checkpoint), {"check_hash": False}, "cls", None, "{}", None, threads=1)(batch)
    assert table.column("error").to_pylist() == [
        "b: RuntimeError: out of memory",
        "",
        "b2: RuntimeError: out of memory",
    ]
    got = table.column("features").to_pylist()
    assert got[0] is None and got[1] is not None and got[2] is None


def test_plan_refusals_before_ray_runs_anything(checkpoint):
    """dino3.integrations.ray.embed: options beside a recipe, and no inputs, are refused before any
    Ray work (Ray imported, not started)."""
    pytest.importorskip("ray.data")
    from dino3.integrations import ray as plan
    from dino3.recipe import Recipe

    with pytest.raises(UsageError, match=r"give the options in the recipe, not beside it: \['pool', 'size'\]"):
        plan.embed(["a.png"], Recipe(str(checkpoint)), pool="mean", size=64)
    with pytest.raises(UsageError, match="no inputs to embed"):
        plan.embed([], str(checkpoint), check_hash=False)
    with pytest.raises(UsageError, match="no inputs to embed"):  # options beside a model name: its recipe's
        plan.embed([], str(checkpoint), pool="mean", check_hash=False)


def test_run_lock_takes_the_file_again_when_it_was_replaced_meanwhile(tmp_path, monkeypatch):
    """Between opening and locking, the previous holder may remove the lock file: the lock is taken
    again on the file that is there now (and never held on a removed one)."""
    out = tmp_path / "out.npz"
    real_stat = store.os.stat
    calls = []

    def stat(path, *a, **k):
        if Path(path) == tmp_path / "out.npz.lock" and not calls:
            calls.append(path)
            raise FileNotFoundError(path)
        return real_stat(path, *a, **k)

    monkeypatch.setattr(store.os, "stat", stat)
    lock = store.RunLock(out)
    lock.acquire()
    try:
        assert calls and lock.fd is not None
        assert (tmp_path / "out.npz.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert lock.fd is None and not (tmp_path / "out.npz.lock").exists()


def test_a_local_run_reports_failures_then_skipped_and_counts_them(checkpoint, tmp_path):
    """The failures in input order, then the inputs skipped while listing; the output's meta counts
    both; files without an image suffix are counted as ignored, by the first shard only."""
    import dino3

    root = tmp_path / "in"
    a, c = image(root / "a.png"), image(root / "c.png")
    b, d = touch(root / "b.png", b"not an image"), touch(root / "d.png", b"nor this")
    touch(root / "notes.md")
    os.symlink(root / "gone.png", root / "z.png")
    out = tmp_path / "o.npz"
    result = dino3.embed.run([str(root)], model=str(checkpoint), output=out, size=32, batch_size=1, progress=False)
    assert (result.count, result.computed, result.ignored) == (2, 2, 1)
    assert [p for p, _ in result.failures] == [b, d, str(root / "z.png")]
    assert result.failures[2][1] == "a symbolic link to nothing (dangling)"
    written = writers.read_embeddings(out)
    assert written.paths == [a, c] and written.meta["failed"] == 3
    lines = (tmp_path / "o.npz.failures.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [b, d, str(root / "z.png")]
    ignored = [
        dino3.embed.run(
            [str(root)], model=str(checkpoint), output=tmp_path / f"s{k}.npz", size=32, shard=(k, 2)
        ).ignored
        for k in (0, 1)
    ]
    assert ignored == [1, 0]


def test_parquet_features_are_a_fixed_size_list_when_every_image_has_as_many(tmp_path):
    """Equal sizes: a fixed-size list column of float32 (what DuckDB and Arrow's tensors want); sizes
    that differ: a plain list."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    same = [np.arange(4, dtype=np.float64).reshape(2, 2), np.ones((2, 2))]
    writers.write_embeddings(tmp_path / "s.parquet", ["a", "b"], same, [(1, 1), (1, 1)], {})
    column = pq.read_table(tmp_path / "s.parquet").schema.field("features").type
    assert pa.types.is_fixed_size_list(column) and column.list_size == 4 and column.value_type == pa.float32()
    back = writers.read_embeddings(tmp_path / "s.parquet")
    assert back.features.dtype == np.float32 and back.features.shape == (2, 2, 2)
    assert back.features[0].tolist() == [[0, 1], [2, 3]]
    writers.write_embeddings(tmp_path / "r.parquet", ["a", "b"], RAGGED, [(2, 3), (1, 2)], {})
    column = pq.read_table(tmp_path / "r.parquet").schema.field("features").type
    assert pa.types.is_list(column) and column.value_type == pa.float32()


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".safetensors"])
def test_an_output_with_no_image_reads_back_empty(tmp_path, suffix):
    """Every image failed: the output is still written, and reads back with no paths."""
    writers.write_embeddings(tmp_path / f"o{suffix}", [], [], [], {"pool": "cls"})
    back = writers.read_embeddings(tmp_path / f"o{suffix}")
    assert back.paths == [] and len(back) == 0 and back.features.size == 0 and back.meta["pool"] == "cls"


def test_local_paths_come_out_absolute_with_the_home_folder_expanded(tmp_path, monkeypatch):
    """A relative path is made absolute from the working folder; `~` is the home folder, in a plain
    path and in a pattern."""
    a = touch(tmp_path / "home" / "pics" / "a.png")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "home")
    assert expand_inputs(["pics/a.png"]).paths == [a]
    assert expand_inputs(["~/pics/a.png"]).paths == [a]
    assert expand_inputs(["~/pics/*.png"]).paths == [a]
