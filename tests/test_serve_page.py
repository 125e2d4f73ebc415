"""`dino3 serve` with an index: /v1/search and /v1/thumbnails against the index's own search,
/v1/pca against dino3.dense, the API key on the page's routes, and the web page itself in a real
headless browser (Debian's chromium driven by Playwright), including a hostile file name.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import dino3
import dino3.index
from dino3.errors import UsageError
from helpers import SMALL, randomize_

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
from dino3.serve import ServeSettings, create_app  # noqa: E402
from test_serve import Server, data_url  # noqa: E402

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.[jp][pn]g"))
BROWSER_FLAGS = ["--no-sandbox", "--disable-dev-shm-usage"]  # as root, in a container with a small /dev/shm
HOSTILE = '<img src=x onerror="document.title=1">.png'  # a legal file name on Linux


@pytest.fixture(scope="module")
def indexed(checkpoint, tmp_path_factory):
    """An index of the example photos, one under a hostile name, and one whose file is gone since."""
    photos = tmp_path_factory.mktemp("photos")
    for photo in PHOTOS:
        shutil.copy(photo, photos / photo.name)
    shutil.copy(PHOTOS[0], photos / HOSTILE)
    shutil.copy(PHOTOS[1], photos / "gone.jpg")
    folder = tmp_path_factory.mktemp("index") / "photos.index"
    dino3.index.build([str(photos)], model=str(checkpoint), folder=folder, progress=False)
    (photos / "gone.jpg").unlink()
    return photos, dino3.index.open(folder)


@pytest.fixture(scope="module")
def server(checkpoint, indexed):
    running = Server(create_app(dino3.load(checkpoint), ServeSettings(max_batch=8), index=indexed[1]))
    yield running
    running.stop()


def test_search_answers_as_the_index_does(server, indexed):
    photos, index = indexed
    query = photos / "chelsea.png"
    response = httpx.post(f"{server.url}/v1/search", json={"input": [data_url(query)], "k": 4}, timeout=60)
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]
    expected = index.search(str(query), k=4, exact=True)[0]["neighbors"]
    assert [n["id"] for n in result["neighbors"]] == [n["id"] for n in expected]
    assert np.allclose([n["score"] for n in result["neighbors"]], [n["score"] for n in expected], atol=1e-4)
    assert result["neighbors"][0]["path"] == str(query) and result["neighbors"][0]["score"] > 0.999


def test_thumbnails_come_only_from_the_index(server, indexed):
    photos, index = indexed
    entries = {Path(e.path).name: e for e in index.entries()}
    response = httpx.get(f"{server.url}/v1/thumbnails/{entries['rocket.jpg'].id}", params={"size": 128})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(response.content)).size) == 128
    for path, status in [
        (f"/v1/thumbnails/{max(e.id for e in entries.values()) + 1}", 404),  # no such item
        (f"/v1/thumbnails/{entries['gone.jpg'].id}", 404),  # its file is gone
        ("/v1/thumbnails/..%2F..%2Fetc%2Fpasswd", 404),  # ids only, never paths
        ("/v1/thumbnails/rocket.jpg", 400),
        (f"/v1/thumbnails/{entries['rocket.jpg'].id}?size=100000", 400),
    ]:
        answer = httpx.get(server.url + path)
        assert answer.status_code == status, (path, answer.text)
        assert "error" in answer.json()
    bad = httpx.post(f"{server.url}/v1/search", json={"input": [data_url(PHOTOS[0])], "k": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "k"


def test_the_thumbnail_reader_reads_only_local_files():
    """Bug pinned (mutation S5 of issue 31): the thumbnail reader's own refusal of anything but a
    local file dropped: an index whose records name a data URL or an object-store URI with a size
    (edited, or written by another tool, so the route's "recorded as a URL" check passes) made the
    server decode or fetch it. The reader refuses them itself."""
    from dino3.serve.search import _thumbnail
    from dino3.serve.service import ApiError

    assert _thumbnail(str(PHOTOS[0]), 64, 10**8)[:2] == b"\xff\xd8"  # a local file: a JPEG
    for path in [data_url(PHOTOS[0]), "s3://bucket/photo.jpg", "http://127.0.0.1:9/photo.jpg"]:
        with pytest.raises(ApiError) as refused:
            _thumbnail(path, 64, 10**8)
        assert refused.value.status == 404 and "not a local file" in refused.value.message


def test_pca_is_dense_pca_of_the_patches(server, checkpoint):
    from dino3.dense import pca_rgb
    from dino3.dense.render import colour_map
    from dino3.features import extract
    from dino3.processing import DINOv3ViTImageProcessor

    response = httpx.post(f"{server.url}/v1/pca", json={"input": data_url(PHOTOS[0])}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    from PIL import Image

    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1]))))
    model = dino3.load(checkpoint)
    processor = DINOv3ViTImageProcessor.for_model(model, keep_aspect="longer", target_size=448, fit="resize")
    pixels = processor(str(PHOTOS[0]), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        grid, _ = extract(model, pixels, "patches")
    expected = colour_map(pca_rgb(grid[0].float()), tuple(pixels.shape[-2:]))
    assert body["grid"] == list(grid.shape[1:3]) and max(picture.shape[:2]) == 448
    assert picture.shape == expected.shape and np.abs(picture.astype(int) - expected).mean() < 1.0


def test_an_index_of_another_model_is_refused(indexed):
    other = randomize_(dino3.DINOv3ViTModel(dino3.DINOv3ViTConfig(**SMALL)), seed=1)
    with pytest.raises(UsageError):
        create_app(other, ServeSettings(), index=indexed[1])


def test_without_an_index_search_is_a_clear_404_and_the_key_guards_the_api(checkpoint):
    guarded = Server(create_app(dino3.load(checkpoint), ServeSettings(api_key="s3cret")))
    try:
        page = httpx.get(guarded.url + "/")  # the page holds no data: open
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(guarded.url + "/static/page.js").status_code == 200
        assert httpx.get(guarded.url + "/v1/info").status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        for name in ("service.py", "..%2Fservice.py", "..%2F..%2F__init__.py"):  # the page's files only
            assert httpx.get(f"{guarded.url}/static/{name}", headers=key).status_code == 404
        assert httpx.get(guarded.url + "/v1/info", headers=key).json()["index"] is None
        answer = httpx.post(guarded.url + "/v1/search", json={"input": data_url(PHOTOS[0])}, headers=key)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "no_index"
    finally:
        guarded.stop()


def chromium_or_skip() -> str:
    pytest.importorskip("playwright", reason="the browser test needs Playwright: pip install playwright")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium here: apt-get install chromium (.ci/run does) to run the browser test")
    return path


@pytest.mark.slow
def test_the_page_shows_pca_and_neighbours_in_a_real_browser(server, indexed):
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    photos, _ = indexed
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
        try:
            page = browser.new_page()
            dialogs = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('served').textContent.includes('index')")
            # before any upload: no empty pictures (a CSS display rule once overrode `hidden`: two
            # broken-image icons greeted every visitor)
            assert page.locator("#pictures").is_hidden() and page.locator("#search").is_hidden()
            assert page.locator("img:visible").count() == 0
            page.set_input_files("#file", str(photos / HOSTILE))
            page.wait_for_selector("body[data-done='1']", timeout=60_000)
            assert (
                page.text_content("#status") == "" and page.evaluate("document.getElementById('pca').naturalWidth") > 0
            )
            shown = "#neighbors figure:not(.missing) img"
            page.wait_for_function(
                f"[...document.querySelectorAll('{shown}')].every(i => i.complete && i.naturalWidth > 0)"
            )
            captions = page.locator("#neighbors figcaption").all_text_contents()
            assert len(captions) == 8 and page.locator(shown).count() >= 7  # gone.jpg may be among them
            assert all("gone.jpg" in c for c in page.locator("#neighbors .missing figcaption").all_text_contents())
            # the image itself and its copy lead, and the hostile name is shown as text, never run as HTML
            assert {c.split(" · ", 1)[1] for c in captions[:2]} == {str(photos / HOSTILE), str(photos / PHOTOS[0].name)}
            assert page.title() == "dino3" and not dialogs
            assert page.locator("#neighbors figcaption img").count() == 0
        finally:
            browser.close()


@pytest.mark.slow
def test_the_page_asks_for_the_key(checkpoint):
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    guarded = Server(create_app(dino3.load(checkpoint), ServeSettings(api_key="s3cret")))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
            page = browser.new_page()
            page.goto(guarded.url + "/")
            page.wait_for_selector("#key-row:not([hidden])")
            page.fill("#key", "s3cret")
            page.click("#key-save")
            page.set_input_files("#file", str(PHOTOS[0]))
            page.wait_for_selector("body[data-done='1']", timeout=60_000)
            assert page.evaluate("document.getElementById('pca').naturalWidth") > 0
            assert page.locator("#search").is_hidden()  # no index on this server
            browser.close()
    finally:
        guarded.stop()


def test_slow_url_downloads_never_hold_up_thumbnails_or_search(checkpoint, indexed):
    """Bug pinned (finding 8): a request of 64 slow URLs took every thread of asyncio's shared default
    pool, which the thumbnails and the search use too: a thumbnail took 197 s. Downloads now run in a
    pool of their own, a few at a time per request."""
    import concurrent.futures
    import http.server
    import threading
    import time

    from test_serve_security import Trickle

    _, index = indexed
    Trickle.ending.clear()
    trickle = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=trickle.serve_forever, daemon=True).start()
    slow = f"http://127.0.0.1:{trickle.server_port}/slow"
    settings = ServeSettings(allow_urls=True, allow_private_urls=True, max_images=64, url_timeout_s=60)
    server = Server(create_app(dino3.load(checkpoint), settings, index=index))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        stuck = pool.submit(httpx.post, f"{server.url}/v1/embeddings", json={"input": [slow] * 64}, timeout=120)
        deadline = time.monotonic() + 30
        while Trickle.open_now < 4:
            assert time.monotonic() < deadline and not stuck.done()
            time.sleep(0.05)
        started = time.monotonic()
        first = index.entries()[0]
        assert httpx.get(f"{server.url}/v1/thumbnails/{first.id}", timeout=60).status_code == 200
        found = httpx.post(f"{server.url}/v1/search", json={"input": data_url(PHOTOS[0]), "k": 2}, timeout=60)
        assert found.status_code == 200 and time.monotonic() - started < 5
    finally:
        Trickle.ending.set()
        stuck.result(timeout=60)
        pool.shutdown()
        server.stop()
        trickle.shutdown()


def test_a_huge_thumbnail_id_is_a_404_and_invalid_utf8_a_400(server):
    """Bug pinned (finding 13): a thumbnail id beyond SQLite's integers (OverflowError) and invalid
    UTF-8 in /v1/search's JSON answered 500."""
    for item in (2**63, 10**30, -1):
        answer = httpx.get(f"{server.url}/v1/thumbnails/{item}")
        assert answer.status_code == 404 and answer.json()["error"]["param"] == "item", answer.text
    bad = httpx.post(f"{server.url}/v1/search", content=b'{"input": "\xc3\x28"}')
    assert bad.status_code == 400 and "UTF-8" in bad.json()["error"]["message"]


# -- the fresh mutation pass (issue 31) ---------------------------------------------------------------------
def test_search_takes_k_up_to_the_size_of_the_index(server, indexed):
    """Bug pinned: /v1/search refused k equal to the number of images (`<` for `<=`): a client could
    not rank the whole index."""
    _, index = indexed
    body = {"input": [data_url(PHOTOS[0])], "k": len(index)}
    response = httpx.post(f"{server.url}/v1/search", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["neighbors"]) == len(index)
    too_many = httpx.post(f"{server.url}/v1/search", json={**body, "k": len(index) + 1}, timeout=60)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "k"


def test_search_passes_exact_to_the_index(server, indexed, monkeypatch):
    """Bug pinned (issue 31): `"exact": true` on /v1/search ignored, so that an index of approximate
    size answered approximately (the route called the index's search without it). The request's
    `exact` reaches the index's search: true, false, or the index's default (None) when left out."""
    _, index = indexed
    asked = []
    search = index.search

    def recording(*args, **kwargs):
        asked.append(kwargs.get("exact"))
        return search(*args, **kwargs)

    monkeypatch.setattr(index, "search", recording)
    for exact in (True, False, None):
        body = {"input": [data_url(PHOTOS[0])], "k": 2, **({} if exact is None else {"exact": exact})}
        response = httpx.post(f"{server.url}/v1/search", json=body, timeout=60)
        assert response.status_code == 200, response.text
    assert asked == [True, False, None]


def test_queries_are_preprocessed_as_the_index_was_not_as_the_server_would(checkpoint, tmp_path):
    """Bug pinned (issue 31, fresh pass 3, F-S3): /v1/search preprocessed its queries with the server's
    own processor (224 px) instead of the index's: an index built at another size answered with
    neighbours from vectors of another resolution, so that an indexed image searched for was not
    found at score 1 and the scores differed from the index's own search of that image."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in PHOTOS[:4]:
        shutil.copy(photo, photos / photo.name)
    folder = tmp_path / "photos.index"
    dino3.index.build([str(photos)], model=str(checkpoint), folder=folder, size=160, progress=False)
    index = dino3.index.open(folder)
    assert index.settings["processor"]["size"] != {"height": 224, "width": 224}  # not the server's default
    running = Server(create_app(dino3.load(checkpoint), ServeSettings(), index=index))
    try:
        for query in sorted(photos.iterdir()):
            body = {"input": [data_url(query)], "k": 3, "exact": True}
            response = httpx.post(f"{running.url}/v1/search", json=body, timeout=60)
            assert response.status_code == 200, response.text
            (result,) = response.json()["data"]
            expected = index.search(str(query), k=3, exact=True)[0]["neighbors"]
            assert result["neighbors"][0]["path"] == str(query) and result["neighbors"][0]["score"] > 0.999
            assert [n["id"] for n in result["neighbors"]] == [n["id"] for n in expected]
            assert np.allclose([n["score"] for n in result["neighbors"]], [n["score"] for n in expected], atol=1e-4)
    finally:
        running.stop()


def test_an_index_rebuilt_with_another_model_under_a_running_server_is_refused(checkpoint, tmp_path):
    """Bug pinned: the served index, refreshed after `index build --overwrite` in its folder, was not
    checked against the served model again: rebuilt with another model's vectors, every search
    answered 200 with neighbours that meant nothing. It answers 503 (index_changed)."""
    from helpers import save_small_vit

    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in PHOTOS[:3]:
        shutil.copy(photo, photos / photo.name)
    folder = tmp_path / "photos.index"
    dino3.index.build([str(photos)], model=str(checkpoint), folder=folder, progress=False)
    running = Server(create_app(dino3.load(checkpoint), ServeSettings(), index=dino3.index.open(folder)))
    try:
        body = {"input": [data_url(PHOTOS[0])], "k": 1}
        assert httpx.post(f"{running.url}/v1/search", json=body, timeout=60).status_code == 200
        other = save_small_vit(tmp_path / "other", seed=1)
        dino3.index.build([str(photos)], model=str(other), folder=folder, overwrite=True, progress=False)
        response = httpx.post(f"{running.url}/v1/search", json=body, timeout=60)
        assert response.status_code == 503 and response.json()["error"]["code"] == "index_changed"
    finally:
        running.stop()


def test_a_search_read_as_the_index_is_rebuilt_is_tried_once_more_then_a_503(checkpoint, indexed, monkeypatch):
    """/v1/search whose read meets a rebuild (StaleIndexError) reads once more after a refresh, and
    answers 503 `index_changed` when the second read meets one too. Planted: no second read (a 503
    at the first), a third read, the error let through as a 500."""
    from fastapi.testclient import TestClient

    from dino3.errors import StaleIndexError

    _, index = indexed
    search = index.search
    calls = []

    def stale(*args, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            raise StaleIndexError("rebuilt meanwhile")
        return search(*args, **kwargs)

    monkeypatch.setattr(index, "search", stale)
    body = {"input": [data_url(PHOTOS[0])], "k": 2}
    with TestClient(create_app(dino3.load(checkpoint), ServeSettings(), index=index, warm=False)) as client:
        failures = 1
        answer = client.post("/v1/search", json=body)
        assert answer.status_code == 200 and len(calls) == 2, answer.text
        calls.clear()
        failures = 5
        answer = client.post("/v1/search", json=body)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "index_changed"
        assert len(calls) == 2


def test_thumbnails_of_url_items_are_404_and_sizes_are_bounded_on_both_ends(checkpoint, tmp_path):
    """An indexed URL has no thumbnail here (404 naming it a URL); sizes 64 and 512 are given,
    63 and 513 refused. Planted: the URL check dropped (the server would download it), either bound
    made strict or loosened by one."""
    from fastapi.testclient import TestClient
    from PIL import Image

    features = tmp_path / "e.npz"
    dino3.embed.run([str(PHOTOS[0]), str(PHOTOS[1])], model=str(checkpoint), output=features, progress=False)
    data = dict(np.load(features, allow_pickle=False))
    data["paths"] = np.asarray([str(PHOTOS[0]), "https://example.org/photo.jpg"])
    np.savez(features, **data)
    folder = tmp_path / "i.index"
    dino3.index.build([str(features)], folder=folder, progress=False)
    index = dino3.index.open(folder)
    ids = {e.path: e.id for e in index.entries()}
    with TestClient(create_app(dino3.load(checkpoint), ServeSettings(), index=index, warm=False)) as client:
        answer = client.get(f"/v1/thumbnails/{ids['https://example.org/photo.jpg']}")
        assert answer.status_code == 404 and "is a URL" in answer.json()["error"]["message"]
        local = ids[str(PHOTOS[0])]
        for size, status in ((64, 200), (512, 200), (63, 400), (513, 400)):
            answer = client.get(f"/v1/thumbnails/{local}", params={"size": size})
            assert answer.status_code == status, (size, answer.text)
            if status == 200:
                assert max(Image.open(io.BytesIO(answer.content)).size) == size
