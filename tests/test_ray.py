"""`dino3 embed --engine ray` and dino3.ray.embed on a local Ray (started here, 2 CPUs, and stopped):
the rows equal the local job's; the output folder is a Parquet dataset that the field's readers read
as it is, failures never among its rows; broken files are named; a killed driver resumes; a killed
worker is replaced and the output is whole; and every mistake is a clear error."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import dino3
from dino3.cli import main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def inputs(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(PHOTOS.glob("*.[jp][pn]g"))
    for i in range(count):
        shutil.copy(photos[i % len(photos)], folder / f"{i:03d}{photos[i % len(photos)].suffix}")
    return folder


def test_rows_equal_the_local_job_and_failures_are_named(local_ray, checkpoint, tmp_path):
    folder = inputs(tmp_path / "in", 10)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    local, distributed = tmp_path / "local.npz", tmp_path / "ray"
    common = ["-m", str(checkpoint), "-q", "--pool", "cls+mean"]
    assert main(["embed", str(folder), "-o", str(local), *common]) == 3
    assert (
        main(["embed", str(folder), "-o", str(distributed), *common, "--engine", "ray", "--ray-shard-size", "4"]) == 3
    )
    a, b = dino3.embed.read_embeddings(distributed), dino3.embed.read_embeddings(local)
    assert a.paths == b.paths and np.abs(a.features - b.features).max() <= 1e-5
    assert a.meta["model_fingerprint"] == b.meta["model_fingerprint"] and a.meta["recipe"] == b.meta["recipe"]
    failures = (tmp_path / "ray.failures.tsv").read_text().splitlines()
    assert len(failures) == 1 and Path(failures[0].split("\t")[0]).name == "broken.jpg"
    assert "broken.jpg" in failures[0].split("\t")[1]
    # dino3.ray.embed keeps a row for a broken image: its error, and null features (issue 31, fresh pass
    # 3, F-R6: zeros there were taken for a vector by whoever read the rows without the error column)
    sources = [*[str(p) for p in sorted(folder.glob("0*"))][:3], str(folder / "broken.jpg")]
    rows = dino3.ray.embed(sources, str(checkpoint), pool="cls+mean").take_all()
    assert len(rows) == 4 and np.abs(np.asarray(rows[0]["features"]) - b.features[0]).max() <= 1e-5
    assert [row["error"] == "" for row in rows] == [True, True, True, False] and rows[3]["features"] is None


def test_the_output_folder_is_a_dataset_every_reader_reads(local_ray, checkpoint, tmp_path):
    """The bug this pins: pandas, pyarrow and polars failed on the folder's manifest.json, and
    failures.parquet (another schema) sat among the data, so Ray Data returned the failed paths with
    null features and DuckDB's and polars' globs failed. Each reader gets exactly the good rows."""
    import duckdb
    import pandas
    import polars
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    folder = inputs(tmp_path / "in", 6)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "ray"
    common = ["-m", str(checkpoint), "-q", "--engine", "ray", "--ray-shard-size", "4"]
    assert main(["embed", str(folder), "-o", str(out), *common]) == 3
    good = sorted(str(p) for p in folder.glob("0*"))
    frame = pandas.read_parquet(out)
    assert sorted(frame["path"]) == good
    assert sorted(pads.dataset(out).to_table().column("path").to_pylist()) == good
    assert sorted(pq.read_table(out).column("path").to_pylist()) == good
    assert sorted(polars.read_parquet(out)["path"].to_list()) == good
    assert sorted(polars.read_parquet(f"{out}/*.parquet")["path"].to_list()) == good
    assert sorted(r["path"] for r in ray.data.read_parquet(str(out)).take_all()) == good
    rows = duckdb.sql(f"SELECT path, features FROM read_parquet('{out}/*.parquet')").fetchall()
    assert sorted(r[0] for r in rows) == good
    same = duckdb.sql(
        f"SELECT min(list_cosine_similarity(features, features)) FROM read_parquet('{out}/*.parquet')"
    ).fetchall()[0][0]
    assert abs(same - 1) < 1e-5
    assert all(name.startswith("shard-") and name.endswith(".parquet") for name in os.listdir(out))


def test_a_killed_worker_is_replaced_and_the_output_is_whole(local_ray, checkpoint, tmp_path):
    folder = inputs(tmp_path / "in", 80)  # ~15 s of work on 2 cores: time to find the actor and kill it mid-job
    out = tmp_path / "ray"
    killed, finished = [], threading.Event()

    def kill_an_actor():
        import psutil

        while not finished.is_set() and not killed:
            for process in psutil.process_iter(["pid", "cmdline"]):
                if "_Embedder" not in " ".join(process.info["cmdline"] or []):  # Ray's title for the model actor
                    continue
                time.sleep(0.5)  # let it load the model and start on a batch
                try:
                    os.kill(process.info["pid"], signal.SIGKILL)
                except ProcessLookupError:  # gone already (Ray replaced it or the job ended): look again
                    continue
                killed.append(process.info["pid"])
                return
            time.sleep(0.1)

    thread = threading.Thread(target=kill_an_actor)
    thread.start()
    common = ["-m", str(checkpoint), "-q", "--size", "448", "--batch-size", "2"]
    try:
        assert main(["embed", str(folder), "-o", str(out), *common, "--engine", "ray"]) == 0
    finally:
        finished.set()
        thread.join()
    assert killed, "no model worker was found to kill"
    local = tmp_path / "local.npz"
    assert main(["embed", str(folder), "-o", str(local), *common]) == 0
    a, b = dino3.embed.read_embeddings(out), dino3.embed.read_embeddings(local)
    assert a.paths == b.paths and np.abs(a.features - b.features).max() <= 1e-5


def test_resume_after_the_driver_is_killed(checkpoint, tmp_path):
    folder = inputs(tmp_path / "in", 16)
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "dino3.cli", "embed", str(folder), "-m", str(checkpoint), "-o", str(out), "-q"]
    command += ["--engine", "ray", "--ray-shard-size", "4", "--size", "448"]
    # its own process group: the kill below takes the driver and what of its local Ray shares the group;
    # dino3's watchdog (in a session of its own) stops the rest, workers included (they have their own groups)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "shard-00000.parquet").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert done and len(done) < 4, done
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    local = tmp_path / "local.npz"
    assert main(["embed", str(folder), "-o", str(local), "-m", str(checkpoint), "-q", "--size", "448"]) == 0
    a, b = dino3.embed.read_embeddings(out), dino3.embed.read_embeddings(local)
    assert a.paths == b.paths and np.abs(a.features - b.features).max() <= 1e-5


def test_mistakes_get_clear_errors(local_ray, checkpoint, tmp_path, capsys):
    folder = inputs(tmp_path / "in", 2)
    table = tmp_path / "list.csv"
    table.write_text("file\n" + "\n".join(str(p) for p in folder.iterdir()) + "\n")
    out = tmp_path / "ray"
    args = ["-m", str(checkpoint), "-q", "--engine", "ray"]
    with pytest.raises(SystemExit) as e:
        main(["embed", str(table), "-o", str(out), *args])
    assert e.value.code == 2 and "no path column" in capsys.readouterr().err
    table.write_text("path\n" + "\n".join(str(p) for p in folder.iterdir()) + "\n")
    assert main(["embed", str(table), "-o", str(out), *args]) == 0
    with pytest.raises(SystemExit):  # the folder holds this job already
        main(["embed", str(table), "-o", str(out), *args])
    with pytest.raises(SystemExit) as e:  # resuming another job's folder
        main(["embed", str(table), "-o", str(out), *args, "--resume", "--pool", "mean"])
    assert "pool" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", str(table), "-o", str(tmp_path / "f.npz"), *args, "--shard", "0/2"])
    if ray.is_initialized():
        ray.shutdown()
    try:
        status = main(["embed", str(table), "-o", str(tmp_path / "other"), *args, "--ray-address", "127.0.0.1:1"])
        assert status == 1 and "cannot reach the Ray cluster" in capsys.readouterr().err
    finally:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def test_overwrite_never_empties_a_folder_that_is_not_a_dino3_output(local_ray, checkpoint, tmp_path, capsys):
    """The bug this pins: --overwrite deleted any non-empty folder given as -o (precious.txt and sub/
    were gone before Ray started). Only a dino3 output's own files are replaced."""
    folder = inputs(tmp_path / "in", 2)
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["embed", str(folder), "-o", str(out), "-m", str(checkpoint), "-q", "--engine", "ray", "--overwrite"])
    assert e.value.code == 2 and "holds no dino3 embeddings dataset" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and (out / "sub").is_dir()


def test_resume_is_refused_when_the_weights_changed(local_ray, checkpoint, tmp_path, capsys):
    """The bug this pins: resuming after the weights at the same model path changed gave exit 0 and
    shards from two models, every shard's metadata naming the same one."""
    from helpers import save_small_vit

    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    folder = inputs(tmp_path / "in", 4)
    out = tmp_path / "ray"
    args = ["-m", str(model), "-q", "--engine", "ray", "--ray-shard-size", "2"]
    assert main(["embed", str(folder), "-o", str(out), *args]) == 0
    manifest = json.loads((tmp_path / "ray.manifest.json").read_text())
    del manifest["shards"]["1"]  # as if the job had been killed after its first shard
    (tmp_path / "ray.manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(model)
    save_small_vit(model, seed=7)  # new weights where the old ones were
    with pytest.raises(SystemExit) as e:
        main(["embed", str(folder), "-o", str(out), *args, "--resume"])
    assert e.value.code == 2 and "weights" in capsys.readouterr().err


def test_two_jobs_on_one_output_are_refused(checkpoint, tmp_path):
    """The lock the local job has: a second job on the same folder is refused at once."""
    from dino3.embed.store import RunLock
    from dino3.errors import RunLockedError

    folder = inputs(tmp_path / "in", 2)
    out = tmp_path / "ray"
    with RunLock(out), pytest.raises(RunLockedError):
        dino3.embed.run([str(folder)], str(checkpoint), out, engine="ray", progress=False)


# -- the fresh mutation pass (issue 31): a finished job's folder, then what a resume or a rerun does to it ------
@pytest.fixture(scope="module")
def finished(local_ray, checkpoint, tmp_path_factory):
    """A Ray job over 6 photos and a dangling link, in shards of 2: (its inputs, its output folder)."""
    root = tmp_path_factory.mktemp("finished")
    folder = inputs(root / "in", 6)
    (folder / "zz_gone.png").symlink_to(root / "nowhere.png")
    out = root / "ray"
    assert main(["embed", str(folder), "-o", str(out), "-m", str(checkpoint), "-q", "--engine", "ray",
                 "--ray-shard-size", "2"]) == 3  # fmt: skip
    return folder, out


def copy_output(out: Path, to: Path) -> Path:
    """A copy of a Ray output folder with its sidecars (manifest, failures)."""
    to.mkdir(parents=True)
    shutil.copytree(out, to / out.name)
    for sidecar in out.parent.glob(f"{out.name}.*"):
        shutil.copy(sidecar, to / sidecar.name)
    return to / out.name


def unrecord(out: Path, *shards: int) -> None:
    """Take shards out of the manifest, as a job killed before it recorded them would have left it."""
    path = out.with_name(out.name + ".manifest.json")
    manifest = json.loads(path.read_text())
    for k in shards:
        del manifest["shards"][str(k)]
    path.write_text(json.dumps(manifest))


def test_skipped_inputs_are_listed_with_the_failures(finished):
    """Bug pinned: the Ray engine's failures list held the images that failed to decode but not the
    inputs skipped while listing (a dangling link, a pipe): they were left out without a word, where
    the local engine names them."""
    _, out = finished
    failures = out.with_name(out.name + ".failures.tsv").read_text().splitlines()
    assert len(failures) == 1 and failures[0].startswith(str(finished[0] / "zz_gone.png"))
    assert "dangling" in failures[0]


def test_a_resume_with_another_shard_size_is_refused(finished, checkpoint, tmp_path, capsys):
    """Bug pinned: a resume compared the inputs and the recipe but not the shard size: resumed with
    --ray-shard-size 3, the shards recorded (images 0-1, 2-3) were kept and shard 2 was made of
    images 6-8 of the new cut: images done twice, others never."""
    folder, out = finished
    out = copy_output(out, tmp_path / "copy")
    unrecord(out, 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["embed", str(folder), "-o", str(out), "-m", str(checkpoint), "-q", "--engine", "ray", "--resume",
              "--ray-shard-size", "3"])  # fmt: skip
    assert e.value.code == 2 and "shard_size: 2 -> 3" in capsys.readouterr().err


def test_a_resume_first_removes_the_shard_files_its_manifest_does_not_name(finished, checkpoint, tmp_path, monkeypatch):
    """Bug pinned: a shard file written by a job killed before it recorded it (in the manifest) was
    left in the folder by the resume until that shard was done again: a resume stopped before then
    (Ctrl-C, a lost cluster) left a folder where polars, DuckDB or pyarrow read rows the manifest
    does not name. Here the resume stops as it starts its first shard."""
    import dino3.integrations.ray as plan

    folder, out = finished
    out = copy_output(out, tmp_path / "copy")
    unrecord(out, 1, 2)
    (out / "shard-00002.parquet").unlink()  # not written yet when the job was killed; shard 1's was

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "embed", stopped)
    with pytest.raises(KeyboardInterrupt):
        dino3.embed.run([str(folder)], str(checkpoint), out, engine="ray", resume=True, progress=False,
                        ray=dino3.embed.RayOptions(shard_size=2))  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet"]


def test_overwrite_refuses_a_dino3_folder_that_holds_other_files(finished, checkpoint, tmp_path, capsys):
    """Bug pinned: --overwrite of a dino3 output that also holds a file dino3 did not write went
    ahead (only the shard files replaced): the folder then held a foreign file among the shards,
    which polars refuses to read. It is refused, and the file kept."""
    folder, out = finished
    out = copy_output(out, tmp_path / "copy")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["embed", str(folder), "-o", str(out), "-m", str(checkpoint), "-q", "--engine", "ray", "--overwrite"])
    assert e.value.code == 2 and "did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_images_of_other_aspect_ratios_in_one_batch(local_ray, checkpoint, tmp_path):
    """Bug pinned: the model actor stacked a batch's images as if all had one size: with the aspect
    kept (--keep-aspect, pooled features), images of other shapes in one batch broke the whole
    batch and the job. Rows equal the local job's."""
    folder = inputs(tmp_path / "in", 9)  # squares, 3:2, 4:3, ...: six sizes of pixels
    common = ["-m", str(checkpoint), "-q", "--keep-aspect", "shorter", "--target", "112", "--pool", "cls+mean"]
    out, local = tmp_path / "ray", tmp_path / "local.npz"
    assert main(["embed", str(folder), "-o", str(out), *common, "--engine", "ray"]) == 0
    assert main(["embed", str(folder), "-o", str(local), *common]) == 0
    a, b = dino3.embed.read_embeddings(out), dino3.embed.read_embeddings(local)
    assert a.paths == b.paths and np.abs(a.features - b.features).max() <= 1e-5


def test_rows_keep_the_input_order_when_later_blocks_finish_first(local_ray, checkpoint, tmp_path):
    """Bug pinned: Ray Data's order not asked for (execution_options.preserve_order): a shard's rows
    came in the order its blocks finished, so that a block of large images decoded last put its
    rows last. The first 32 inputs are large JPEGs here, the next 64 small PNGs."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    large = Image.open(PHOTOS / "retina.jpg").convert("RGB").resize((2400, 2400))
    for i in range(32):
        large.save(folder / f"{i:03d}.jpg", quality=95)
    for i in range(32, 96):
        shutil.copy(PHOTOS / "horse.png", folder / f"{i:03d}.png")
    out = tmp_path / "ray"
    dino3.embed.run([str(folder)], str(checkpoint), out, engine="ray", size=112, progress=False)
    assert dino3.embed.read_embeddings(out).paths == sorted(str(p) for p in folder.iterdir())


# -- a driver that dies: the local Ray it started ends with it (issue 27) -------------------------------------
def ray_command(folder: Path, checkpoint, out: Path) -> list[str]:
    command = [sys.executable, "-m", "dino3.cli", "embed", str(folder), "-m", str(checkpoint), "-o", str(out), "-q"]
    return command + ["--engine", "ray", "--ray-shard-size", "4", "--size", "448"]


def record(driver: int, seen: dict) -> None:
    """Add to `seen` the processes of the driver's Ray (its descendants) and its watchdog."""
    import psutil

    try:
        processes = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    processes += [p for p in psutil.process_iter(["cmdline"]) if f"--driver={driver}" in (p.info["cmdline"] or [])]
    for process in processes:
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            seen.setdefault(process.pid, (process, " ".join(process.cmdline())[:120]))


def left_after(seen: dict, seconds: float) -> list[str]:
    """What of `seen` still runs after up to `seconds` (then ended here, so that no test leaves any)."""
    import psutil

    def running():
        alive = []
        for process, name in seen.values():
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(name)
        return alive

    deadline = time.time() + seconds
    while running() and time.time() < deadline:
        time.sleep(0.25)
    left = running()
    for process, _ in seen.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    return left


def test_a_killed_driver_leaves_no_ray_process(checkpoint, tmp_path):
    """The bug this pins: a driver killed with SIGKILL (or by the out-of-memory killer) left Ray's two
    agents running for a minute, and a worker it was starting for ~25 s. The kernel ends Ray's GCS and
    raylet with the driver, not what the raylet started: dino3's watchdog ends every process of the
    session (and itself) within seconds."""
    folder = inputs(tmp_path / "in", 16)
    out = tmp_path / "ray"
    # its own session only to keep a stray signal away from pytest; the kill below is of the driver alone
    driver = subprocess.Popen(ray_command(folder, checkpoint, out), stderr=subprocess.DEVNULL, start_new_session=True)
    seen: dict = {}
    try:
        deadline = time.time() + 300
        while not (out / "shard-00000.parquet").exists() and time.time() < deadline and driver.poll() is None:
            record(driver.pid, seen)
            time.sleep(0.1)
        record(driver.pid, seen)
        assert driver.poll() is None, "the job ended before its first shard was written"
        assert any("raylet" in name for _, name in seen.values()), "no Ray was started"
        started = time.time()
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        left = left_after(seen, 15)
        assert not left, f"still running {time.time() - started:.0f} s after the driver was killed: {left}"
    finally:
        driver.kill()
        driver.wait()
        left_after(seen, 0)


def test_a_finished_driver_leaves_no_ray_process(checkpoint, tmp_path):
    """A job that ends normally: Ray stops with it as before, and the watchdog ends too."""
    folder = inputs(tmp_path / "in", 2)
    out = tmp_path / "ray"
    driver = subprocess.Popen(ray_command(folder, checkpoint, out), stderr=subprocess.PIPE, text=True)
    seen: dict = {}
    try:
        while driver.poll() is None:
            record(driver.pid, seen)
            time.sleep(0.1)
        assert driver.returncode == 0, driver.stderr.read()[-2000:]
        assert any("ray_watchdog" in name for _, name in seen.values()), [name for _, name in seen.values()]
        left = left_after(seen, 10)
        assert not left, left
    finally:
        driver.kill()
        driver.wait()
        left_after(seen, 0)


def test_no_watchdog_over_a_ray_that_is_not_ours(local_ray, tmp_path):
    """A Ray the caller initialised, or a cluster dino3 connected to, is not dino3's to stop."""
    import psutil

    from dino3.integrations import ray as plan
    from dino3.integrations.ray_watchdog import guard

    plan.start(None, False)  # Ray is initialised already (the fixture's)
    assert not guard(str(tmp_path / "session_of_another_cluster"))  # no child of this process belongs to it
    mine = f"--driver={os.getpid()}"
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if mine in (p.info["cmdline"] or [])]


def test_the_watchdog_ends_when_ray_is_shut_down():
    """A program that started a local Ray through dino3 and shut it down goes on without Ray's processes
    or dino3's watchdog."""
    script = """if True:
        import sys

        import ray

        from dino3.integrations import ray as plan

        plan.start(None, False)
        print(1, flush=True)
        ray.shutdown()
        print(2, flush=True)
        sys.stdin.readline()
    """
    driver = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen: dict = {}
    try:
        assert driver.stdout.readline() == "1\n"
        record(driver.pid, seen)
        assert any("ray_watchdog" in name for _, name in seen.values()), [name for _, name in seen.values()]
        assert driver.stdout.readline() == "2\n"
        left = left_after(seen, 10)
        assert driver.poll() is None and not left, left
    finally:
        driver.kill()
        driver.wait()
        left_after(seen, 0)


def test_the_watchdog_stops_the_workers_the_dead_raylet_was_starting():
    """A worker that the raylet started after the watchdog's last record has another parent once the
    raylet died with the driver: the watchdog still finds it by the raylet it names (RAY_RAYLET_PID),
    even after a record that no longer holds the raylet (the bug of a first version: a worker still
    starting outlived the job by ~25 s), and leaves alone a process that names another raylet. Played
    without Ray: a sleeping "raylet" with an "agent" child, a "worker" that is not its child, the raylet
    killed, and the pipe closed as the driver's death closes it."""
    import psutil

    from dino3.integrations import ray_watchdog

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    with_agent = f"import subprocess, time; print(subprocess.Popen({sleep!r}).pid, flush=True); time.sleep(60)"
    raylet = subprocess.Popen([sys.executable, "-c", with_agent], stdout=subprocess.PIPE, text=True)
    agent = psutil.Process(int(raylet.stdout.readline()))
    worker = subprocess.Popen(sleep, env={**os.environ, "RAY_RAYLET_PID": str(raylet.pid)})
    other = subprocess.Popen(sleep, env={**os.environ, "RAY_RAYLET_PID": str(raylet.pid + 100000)})
    read_end, write_end = os.pipe()
    try:
        root = f"{raylet.pid}:{ray_watchdog._start_time(raylet.pid)}"
        subprocess.run([sys.executable, "-I", ray_watchdog.__file__, "--driver=0", root], stdin=read_end, check=True)
        time.sleep(2 * ray_watchdog.INTERVAL)  # recorded: the raylet and the agent, not the worker (not a child)
        raylet.kill()
        raylet.wait()
        time.sleep(2 * ray_watchdog.INTERVAL)  # recorded: the agent alone
        os.close(write_end)
        write_end = None
        assert worker.wait(timeout=10) == -signal.SIGTERM
        agent.wait(timeout=10)
        time.sleep(ray_watchdog.INTERVAL)
        assert other.poll() is None
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)
        for process in (raylet, worker, other):
            process.kill()
            process.wait()
        raylet.stdout.close()
        with contextlib.suppress(psutil.Error):
            agent.kill()
