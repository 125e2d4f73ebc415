"""`dino3 serve --detector DIR` (issue 30): POST /v1/anomaly scores images as the detector itself does
(dino3.anomaly), draws the same overlays, refuses at start-up a detector of another model, computes
its features on the model's thread and scores off the event loop. The model is the small random ViT
(conftest `checkpoint`); the images are the jittered takes and planted defects of test_anomaly."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import dino3
import dino3.anomaly as anomaly
from dino3.cli import main
from dino3.errors import UsageError

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
from dino3.serve import ServeSettings, create_app  # noqa: E402
from test_anomaly import SIZE, jittered, pasted, spot  # noqa: E402
from test_serve import Server, data_url, error_of  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def detector_folder(checkpoint, tmp_path_factory):
    shots = jittered("coffee.png", 3, seed=0)
    detector = anomaly.fit(shots, model=str(checkpoint), resolution=SIZE, rotate=False)
    return detector.save(tmp_path_factory.mktemp("detector") / "detector")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two good takes, two with planted defects, the whole photo (not square: 600 x 400), and the photo
    larger than a picture is shown (1500 x 1000: its map is made at 1024 x 683)."""
    folder = tmp_path_factory.mktemp("images")
    good = jittered("coffee.png", 2, seed=1)
    pictures = [good[0], spot(good[0], 0)[0], good[1], pasted(good[1], 1)[0]]
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(folder / f"take-{i}.png")
        Image.fromarray(picture).save(paths[-1])
    with Image.open(PHOTOS / "coffee.png") as photo:
        photo.convert("RGB").resize((1500, 1000), Image.Resampling.BICUBIC).save(folder / "large.png")
    return [*paths, PHOTOS / "coffee.png", folder / "large.png"]


@pytest.fixture(scope="module")
def server(checkpoint, detector_folder):
    app = create_app(dino3.load(checkpoint), ServeSettings(max_batch=8), detector=anomaly.load(detector_folder))
    running = Server(app)
    yield running
    running.stop()


def picture_of(data_url_text: str) -> np.ndarray:
    assert data_url_text.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url_text.split(",", 1)[1]))).convert("RGB"))


def test_scores_verdicts_and_maps_equal_the_detectors(server, detector_folder, images):
    """Bugs it would catch: the features made with the model's own processor (a square bilinear
    resize) instead of the detector's (shorter side, bicubic, crop); scores given to the wrong
    images; the threshold or the verdicts left out; maps drawn on another scale than the CLI's."""
    detector = anomaly.load(detector_folder)
    expected = detector.score([str(p) for p in images])
    body = {"input": [data_url(p) for p in images], "map": True}
    answer = httpx.post(f"{server.url}/v1/anomaly", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["object"] == "list" and found["threshold"] == detector.threshold is not None
    assert [item["index"] for item in found["data"]] == list(range(len(images)))
    for item, result in zip(found["data"], expected):
        assert abs(item["score"] - result.score) <= 1e-5 and item["anomalous"] == result.anomalous
    assert [item["anomalous"] for item in found["data"][:4]] == [False, True, False, True]  # the planted defects
    low = min(float(r.map.min()) for r in expected)
    high = max(float(r.map.max()) for r in expected)
    for item, result, path in zip(found["data"], expected, images):
        drawn = anomaly.overlay(
            dino3.images.load_image(str(path)),
            result.map,
            result.score,
            low=low,
            high=high,
            threshold=detector.threshold,
            anomalous=result.anomalous,
        )
        got = picture_of(item["map"])
        difference = np.abs(got.astype(int) - drawn)
        assert got.shape == drawn.shape, path.name
        if path.name != "large.png":  # the same picture, pixel for pixel
            assert difference.max() == 0, path.name
        else:  # its map made at the size shown, not at the image's own and then shrunk: within a level
            assert difference.mean() < 0.1 and difference.max() <= 2
    plain = httpx.post(f"{server.url}/v1/anomaly", json={"input": data_url(images[1])}, timeout=60).json()
    assert "map" not in plain["data"][0] and abs(plain["data"][0]["score"] - expected[1].score) <= 1e-5


def test_a_detector_of_another_model_is_refused_at_start_up(detector_folder, tmp_path, capsys):
    from helpers import save_small_vit

    other = save_small_vit(tmp_path / "other", seed=1)  # the same architecture, other weights
    with pytest.raises(UsageError, match="(?s)the detector.*compute other numbers"):
        create_app(dino3.load(other), ServeSettings(), detector=anomaly.load(detector_folder))
    capsys.readouterr()
    for folder, words in ((detector_folder, "compute other numbers"), (tmp_path / "nothing", "no such detector")):
        with pytest.raises(SystemExit) as refused:  # a usage error: exit status 2, the reason on stderr
            main(["serve", "-m", str(other), "--detector", str(folder), "--port", "0"])
        assert refused.value.code == 2 and words in capsys.readouterr().err


def test_bad_anomaly_requests_get_their_4xx(server, checkpoint):
    url = f"{server.url}/v1/anomaly"
    good = data_url(PHOTOS / "coffee.png")
    broken = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    cases = [
        ({"input": [good, broken]}, 400, "input[1]"),
        ({"input": []}, 400, "input"),
        ({"input": [good], "model": "someone/else"}, 404, "model"),
        ({"input": [good], "map": "sometimes"}, 400, "map"),
        ({"input": ["https://example.com/part.png"]}, 400, "input[0]"),
    ]
    for body, status, param in cases:
        answer = httpx.post(url, json=body, timeout=60)
        assert answer.status_code == status and error_of(answer)["param"] == param, (param, answer.text)
    plain = Server(create_app(dino3.load(checkpoint), ServeSettings()))
    try:
        answer = httpx.post(f"{plain.url}/v1/anomaly", json={"input": [good]}, timeout=60)
        assert answer.status_code == 404 and error_of(answer)["code"] == "no_detector"
        assert httpx.get(f"{plain.url}/v1/info").json()["detector"] is None
    finally:
        plain.stop()
    info = httpx.get(f"{server.url}/v1/info").json()["detector"]
    assert info["shots"] == 3 and info["threshold"] is not None


def test_forwards_run_on_the_model_thread_and_scoring_off_the_event_loop(checkpoint, detector_folder, tmp_path):
    """Bug it would catch: a torch forward on another thread than the model's (the start-up checks of
    the detector's and the index's model on the main thread, the features on the event loop or a
    pool: each thread that runs a forward keeps an OpenMP team), or the scoring on the event loop."""
    import dino3.index

    model = dino3.load(checkpoint)
    forwards: set[str] = set()
    scoring: set[str] = set()

    class Watched:  # the model, its forwards watched
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, pixels):
            forwards.add(threading.current_thread().name)
            return model(pixels)

    detector = anomaly.load(detector_folder)
    score_features = detector.score_features

    def watched_scoring(*args, **kwargs):
        scoring.add(threading.current_thread().name)
        return score_features(*args, **kwargs)

    detector.score_features = watched_scoring
    dino3.index.build([str(PHOTOS / "coffee.png")], model=str(checkpoint), folder=tmp_path / "i", progress=False)
    server = Server(create_app(Watched(), ServeSettings(), index=dino3.index.open(tmp_path / "i"), detector=detector))
    try:
        assert forwards == {"dino3-batcher"}  # the start-up checks ran the model: on its thread
        answer = httpx.post(f"{server.url}/v1/anomaly", json={"input": [data_url(PHOTOS / "rocket.jpg")]}, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()
    assert forwards == {"dino3-batcher"}
    assert len(scoring) == 1 and scoring.pop().startswith("dino3-serve-decode")


@pytest.mark.slow
def test_the_page_shows_the_overlay_and_the_score_in_a_real_browser(server, detector_folder, images):
    from playwright.sync_api import sync_playwright

    from test_serve_page import BROWSER_FLAGS, chromium_or_skip

    chromium = chromium_or_skip()
    (expected,) = anomaly.load(detector_folder).score([str(images[1])])  # a planted defect
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('served').textContent.includes('anomaly detector')")
            assert page.locator("#anomaly-figure").is_hidden() and page.locator("#text-search").is_hidden()
            page.set_input_files("#file", str(images[1]))
            page.wait_for_selector("body[data-done='1']", timeout=60_000)
            assert page.text_content("#status") == ""
            caption = page.text_content("#anomaly-caption")
            assert caption.startswith(f"anomaly score {expected.score:.4f} · anomalous (threshold "), caption
            assert page.evaluate("document.getElementById('anomaly').naturalWidth") > SIZE  # the image and its bar
            assert page.locator("#search").is_hidden()  # no index here
        finally:
            browser.close()
