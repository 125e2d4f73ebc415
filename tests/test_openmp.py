"""One OpenMP team per process: the server and the embed pipeline leave the model's thread the only
thread with a team, so that libgomp keeps spin-waiting between the forward's parallel regions
(benchmarks/threads.py: a forward beside a second team takes a third to a half longer).

An OpenMP team's helper threads are native threads that Python does not know: the tests count them
in a fresh process (Linux: /proc/self/task) with OpenMP at two threads, where each team has one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc (Linux)")

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.jpg"))[:3]

COUNTING = """
import os, sys, threading, time
import numpy, torch

def team_threads():  # native threads beyond those at start: OpenMP helpers
    time.sleep(0.5)  # threads that are ending (a passing thread's team) are gone by then
    return len(os.listdir("/proc/self/task")) - threading.active_count() - BASE

BASE = 0
BASE = team_threads()
"""


def count_teams(script: str, checkpoint: Path) -> list[int]:
    """What the script prints: counts of OpenMP helper threads."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    code = textwrap.dedent(COUNTING) + textwrap.dedent(script)
    run = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint), *map(str, PHOTOS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [int(word) for word in run.stdout.split()]


def test_the_server_keeps_one_team_on_its_model_thread(checkpoint):
    pytest.importorskip("fastapi")
    script = """
    import asyncio
    import dino3
    from dino3._openmp import on_passing_thread
    from dino3.serve.service import ServeSettings, Service

    model = on_passing_thread(dino3.load, sys.argv[1])  # as `dino3 serve` loads it
    service = Service(model, ServeSettings())
    blobs = [open(path, "rb").read() for path in sys.argv[2:]]

    async def serve():
        await service.warm_up()
        for _ in range(2):
            pixels = await service.pixels(blobs, [f"input[{i}]" for i in range(len(blobs))])
            await service.features(pixels, "cls")

    asyncio.run(serve())
    print(team_threads())
    """
    assert count_teams(script, checkpoint) == [1]


def test_the_embed_pipeline_keeps_one_team_on_its_consumer_thread(checkpoint):
    script = """
    import dino3
    from dino3.pipeline import iter_batches

    model = dino3.load(sys.argv[1])
    processor = dino3.DINOv3ViTImageProcessor.for_model(model)
    counts = []
    with torch.inference_mode():
        for batch in iter_batches(sys.argv[2:] * 4, processor, batch_size=2, workers=2):
            model(batch.pixel_values)
            counts.append(team_threads())  # while the decoding threads live
    print(*counts)
    """
    counts = count_teams(script, checkpoint)
    assert set(counts) == {1}, counts


def test_a_passing_thread_hands_back_its_result_or_its_error():
    from dino3._openmp import on_passing_thread

    assert on_passing_thread(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    with pytest.raises(ZeroDivisionError):
        on_passing_thread(lambda: 1 / 0)


def test_helper_threads_keep_their_threads_where_a_gpu_runs_the_model(monkeypatch):
    """A GPU's forwards use no OpenMP team: there, preprocessing keeps its multi-threaded ops."""
    import threading

    import torch

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread here: single- and multi-threaded ops look alike")

    from dino3._openmp import helper_thread

    counts = {}

    def probe(name: str) -> None:
        helper_thread()
        counts[name] = torch.get_num_threads()

    for name, cuda in (("cpu", False), ("gpu", True)):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda cuda=cuda: cuda)
        thread = threading.Thread(target=probe, args=(name,))
        thread.start()
        thread.join()
    assert counts["cpu"] == 1
    assert counts["gpu"] == torch.get_num_threads()  # as every thread gets it (conftest: 2 or more)


def test_the_server_keeps_one_team_with_texts_a_detector_and_an_index(checkpoint, tmp_path, monkeypatch):
    """Bug it would catch: a forward off the model's thread (the start-up checks of the index's and the
    detector's model on the main thread, the texts or the detector's features on a pool), or the
    anomaly scoring's torch ops on a thread with a team of its own."""
    pytest.importorskip("fastapi")
    pytest.importorskip("faiss")
    import dino3
    import dino3.anomaly
    import dino3.index

    detector = dino3.anomaly.fit([str(p) for p in PHOTOS[:2]], model=str(checkpoint), resolution=224, rotate=False)
    detector.save(tmp_path / "detector")
    dino3.index.build([str(p) for p in PHOTOS], model=str(checkpoint), folder=tmp_path / "index", progress=False)
    monkeypatch.setenv("DINO3_TEST_FOLDER", str(tmp_path))
    script = """
    import base64
    import dino3, dino3.anomaly, dino3.index
    from fastapi.testclient import TestClient
    from dino3._openmp import on_passing_thread
    from dino3.serve import ServeSettings, create_app

    folder = os.environ["DINO3_TEST_FOLDER"]
    model = on_passing_thread(dino3.load, sys.argv[1])  # as `dino3 serve` loads it
    app = create_app(
        model,
        ServeSettings(),
        index=dino3.index.open(folder + "/index"),
        detector=dino3.anomaly.load(folder + "/detector"),
    )
    images = ["data:image/jpeg;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[2:]]
    with TestClient(app) as client:
        for _ in range(2):
            assert client.post("/v1/anomaly", json={"input": images, "map": True}).status_code == 200
            assert client.post("/v1/search", json={"input": images, "k": 2}).status_code == 200
        print(team_threads())
    """
    assert count_teams(script, checkpoint) == [1]


def test_the_server_keeps_one_team_with_a_dinotxt_model(tmp_path):
    """Bug it would catch: texts tokenized or encoded on a pool or the event loop (a team of their own)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("ftfy")
    import dino3
    from helpers import dinotxt_meta_files

    dino3.DINOv3TextModel.from_meta(*dinotxt_meta_files(tmp_path)).save_pretrained(tmp_path / "model")
    script = """
    import base64
    import dino3
    from fastapi.testclient import TestClient
    from dino3._openmp import on_passing_thread
    from dino3.serve import ServeSettings, create_app

    model = on_passing_thread(dino3.load, sys.argv[1])
    images = ["data:image/jpeg;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[2:]]
    texts = ["a photo of a cat " * k for k in range(1, 9)]
    with TestClient(create_app(model, ServeSettings())) as client:
        for _ in range(2):
            assert client.post("/v1/embeddings", json={"input": texts + images}).status_code == 200
        print(team_threads())
    """
    assert count_teams(script, tmp_path / "model") == [1]
