"""`dino3 serve` with a dino.txt model (issue 29): /v1/embeddings takes texts and images in one request
and answers both in one space, in input order, as the library computes them; texts go through the
model's thread in batches; /v1/search over an index of the model's image embeddings takes texts; the
page offers a text search box. The model is the small dino.txt model of tests/golden, saved as a
user's folder."""

from __future__ import annotations

import base64
import concurrent.futures
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import dino3
import dino3.index
from helpers import dinotxt_meta_files

pytest.importorskip("fastapi")
pytest.importorskip("ftfy")
pytest.importorskip("regex")
from dino3.serve import ServeSettings, create_app  # noqa: E402
from test_serve import Server, data_url, error_of  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
CHELSEA, ROCKET, COFFEE = PHOTOS / "chelsea.png", PHOTOS / "rocket.jpg", PHOTOS / "coffee.png"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The small dino.txt model, saved with save_pretrained (a folder `dino3 serve -m` takes)."""
    root = tmp_path_factory.mktemp("dinotxt")
    dino3.DINOv3TextModel.from_meta(*dinotxt_meta_files(root)).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def model(folder):
    return dino3.load(folder)


@pytest.fixture(scope="module")
def server(model):
    running = Server(create_app(model, ServeSettings(max_batch=8, max_images=8, max_text_chars=2000)))
    yield running
    running.stop()


def library_images(model, paths) -> torch.Tensor:
    """(N, D) the library's image embeddings in the space of texts (pool "text", Meta's transform)."""
    from dino3.features import extract

    pixels = dino3.DINOv3ViTImageProcessor.for_dinotxt()([str(p) for p in paths]).pixel_values
    return extract(model, pixels, "text")[0]


def vector_of(item: dict) -> np.ndarray:
    value = item["embedding"]
    return np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str) else np.asarray(value)


def test_texts_and_images_come_back_in_one_space_in_input_order(server, model):
    """Bugs it would catch: texts and images answered in another order than asked (all images first);
    texts embedded by another part of the model or normalised, images by the backbone (pool cls)
    rather than in the texts' space; `usage` counting every text as the full 77-token context."""
    texts = ["a photo of a cat", "", "a rocket on its launch pad " * 20]  # empty, and one cut to 77 tokens
    inputs = [texts[0], data_url(CHELSEA), texts[1], data_url(ROCKET), texts[2]]
    for encoding in ("float", "base64"):
        answer = httpx.post(
            f"{server.url}/v1/embeddings", json={"input": inputs, "encoding_format": encoding}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [item["index"] for item in body["data"]] == list(range(5))
        got = [vector_of(item) for item in body["data"]]
        with torch.inference_mode():
            text_vectors = model.encode_text(texts).numpy()
        image_vectors = library_images(model, [CHELSEA, ROCKET]).numpy()
        expected = [text_vectors[0], image_vectors[0], text_vectors[1], image_vectors[1], text_vectors[2]]
        for i, (vector, wanted) in enumerate(zip(got, expected)):
            assert vector.shape == (128,) and np.abs(vector - wanted).max() <= 1e-4, i
    tokens = model.tokenize(texts)
    read = int((tokens.argmax(-1) + 1).sum())  # each text up to its end-of-text: 7 + 2 + 77
    assert read == 7 + 2 + 77
    backbone = model.backbone.config
    per_image = backbone.num_prefix_tokens + 14 * 14  # 224 px: a 14 x 14 grid
    assert body["usage"] == {
        "prompt_tokens": read + 2 * per_image,
        "total_tokens": read + 2 * per_image,
        "images": 2,
        "texts": 3,
    }


def test_backbone_pools_patches_and_pca_still_serve_images(server, model):
    """A dino.txt model's other pools are its backbone's (as dino3.features.extract gives them)."""
    from dino3.features import extract

    pixels = dino3.DINOv3ViTImageProcessor.for_dinotxt()(str(COFFEE)).pixel_values
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": [data_url(COFFEE)], "pool": "cls"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert np.abs(vector_of(answer.json()["data"][0]) - extract(model, pixels, "cls")[0][0].numpy()).max() <= 1e-4
    patches = httpx.post(f"{server.url}/v1/patches", json={"input": [data_url(COFFEE)]}, timeout=60).json()
    assert patches["data"][0]["grid"] == [14, 14] and patches["data"][0]["dim"] == 64
    assert httpx.post(f"{server.url}/v1/pca", json={"input": data_url(COFFEE)}, timeout=60).status_code == 200
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["texts"] is True and info["feature_dim"] == 128 and info["index"] is None
    files = [("files", ("coffee.png", COFFEE.read_bytes()))]  # an upload: an image, by default in the texts' space
    uploaded = httpx.post(f"{server.url}/v1/embeddings/upload", files=files, timeout=60)
    assert uploaded.status_code == 200, uploaded.text
    assert np.abs(vector_of(uploaded.json()["data"][0]) - library_images(model, [COFFEE])[0].numpy()).max() <= 1e-4


def test_what_a_text_model_cannot_do_gets_a_clear_4xx(server):
    """Bugs it would catch: texts mixed with backbone features (pool cls) answered as if comparable; a
    megabyte "text" tokenized whole on a decoding thread; a URL read as a text when URLs are off."""
    url = f"{server.url}/v1/embeddings"
    cases = [
        ({"input": ["a cat", data_url(ROCKET)], "pool": "cls"}, 400, "pool", "space of pool 'text'"),
        ({"input": ["a cat", "x" * 2001]}, 413, "input[1]", "at most 2000"),
        ({"input": ["a cat", "https://example.com/cat.png"]}, 400, "input[1]", "--allow-urls"),
        ({"input": ["a cat", 7]}, 400, "input[1]", "a text, a data URL"),
        ({"input": []}, 400, "input", "no input"),
        ({"input": ["a cat"] * 9}, 413, "input", "at most 8"),
        ({"input": [[49406, 320, 49407]]}, 400, "input", "check_embedding_ctx_length"),
        ({"input": ["a cat"], "pool": "patches"}, 400, "pool", "pool must be one of"),
    ]
    for body, status, param, words in cases:
        answer = httpx.post(url, json=body, timeout=60)
        assert answer.status_code == status, (param, answer.text)
        assert error_of(answer)["param"] == param and words in error_of(answer)["message"], answer.text
    assert httpx.post(url, json={"input": "a cat"}, timeout=60).status_code == 200  # still serving


def test_plain_strings_stay_images_for_an_image_model(checkpoint):
    """With a model without texts, a plain string is base64 image bytes, as before; pool text is refused."""
    server = Server(create_app(dino3.load(checkpoint), ServeSettings()))
    try:
        raw = base64.b64encode(ROCKET.read_bytes()).decode()
        answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": [raw]}, timeout=60)
        assert answer.status_code == 200 and "texts" not in answer.json()["usage"]
        text = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["a photo of a cat."]}, timeout=60)
        assert text.status_code == 400 and "neither a data URL nor base64" in error_of(text)["message"]
        pool = httpx.post(f"{server.url}/v1/embeddings", json={"input": [raw], "pool": "text"}, timeout=60)
        assert pool.status_code == 400 and "needs a dino.txt model" in error_of(pool)["message"]
        assert httpx.get(f"{server.url}/v1/info").json()["texts"] is False
    finally:
        server.stop()


def test_concurrent_texts_are_batched_on_the_model_thread(model):
    """Bug it would catch: each request's texts encoded alone, or off the model's thread (on the event
    loop or a pool: a second OpenMP team). Texts of 16 concurrent requests must share forwards, all
    run by the batcher's thread, and each gets its own vector."""
    import threading

    threads: set[str] = set()
    encode_text = model.encode_text

    class Watched:  # the model, its text tower watched
        def __getattr__(self, name):
            return getattr(model, name)

        def encode_text(self, tokens, normalize=False):
            threads.add(threading.current_thread().name)
            return encode_text(tokens, normalize)

    server = Server(create_app(Watched(), ServeSettings(max_batch=16, max_wait_ms=50)))
    texts = [f"a photo of {n} cats" for n in range(16)]
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda t: httpx.post(f"{server.url}/v1/embeddings", json={"input": t}, timeout=120), texts)
            )
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    with torch.inference_mode():
        expected = model.encode_text(texts).numpy()
    for answer, wanted in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        assert np.abs(vector_of(answer.json()["data"][0]) - wanted).max() <= 1e-4
    line = lambda name: next(x for x in metrics.splitlines() if x.startswith(name))  # noqa: E731
    forwards = float(line('dino3_batch_size_count{kind="text"}').split()[-1])
    assert float(line('dino3_batch_size_sum{kind="text"}').split()[-1]) == 16 + 1  # and the warm-up's text
    assert forwards < 16, "no two texts of concurrent requests shared a forward"
    assert threads == {"dino3-batcher"}


@pytest.fixture(scope="module")
def text_index(folder, tmp_path_factory):
    photos = tmp_path_factory.mktemp("photos")
    for path in (CHELSEA, ROCKET, COFFEE, PHOTOS / "astronaut.png"):
        shutil.copy(path, photos / path.name)
    index_folder = tmp_path_factory.mktemp("index") / "photos.index"
    dino3.index.build([str(photos)], model=str(folder), folder=index_folder, progress=False)
    return photos, dino3.index.open(index_folder)


def test_a_text_index_is_searched_by_texts_and_images_as_the_index_does(model, text_index):
    """Bugs it would catch: a text query embedded by the image tower's processor or as base64, the
    texts' results given to the images of the same request, or a text refused by a text index."""
    photos, index = text_index
    assert index.settings["pool"] == "text"
    server = Server(create_app(model, ServeSettings(), index=index))
    try:
        body = {"input": ["a photo of a cat", data_url(photos / "coffee.png"), "a rocket"], "k": 3, "exact": True}
        answer = httpx.post(f"{server.url}/v1/search", json=body, timeout=120)
        info = httpx.get(f"{server.url}/v1/info").json()
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    found = answer.json()["data"]
    expected = index.search_text(["a photo of a cat", "a rocket"], k=3, exact=True)
    image = index.search(str(photos / "coffee.png"), k=3, exact=True)[0]
    for got, wanted in zip([found[0], found[1], found[2]], [expected[0], image, expected[1]]):
        assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in wanted["neighbors"]]
        assert np.allclose([n["score"] for n in got["neighbors"]], [n["score"] for n in wanted["neighbors"]], atol=1e-4)
    assert found[1]["neighbors"][0]["path"].endswith("coffee.png")
    assert info["texts"] is True and info["index"]["pool"] == "text"


def test_texts_cannot_search_an_index_of_backbone_features(model, folder, text_index, tmp_path):
    photos, _ = text_index
    index_folder = tmp_path / "cls.index"
    dino3.index.build([str(photos)], model=str(folder), folder=index_folder, pool="cls", progress=False)
    server = Server(create_app(model, ServeSettings(), index=dino3.index.open(index_folder)))
    try:
        answer = httpx.post(f"{server.url}/v1/search", json={"input": [data_url(ROCKET), "a cat"], "k": 2}, timeout=60)
        assert answer.status_code == 400 and error_of(answer)["param"] == "input[1]", answer.text
        assert "build it with pool text" in error_of(answer)["message"]
        image = httpx.post(f"{server.url}/v1/search", json={"input": [data_url(ROCKET)], "k": 1}, timeout=60)
        assert image.json()["data"][0]["neighbors"][0]["path"].endswith("rocket.jpg")
    finally:
        server.stop()


@pytest.mark.slow
def test_the_page_searches_a_text_index_by_text_in_a_real_browser(model, text_index):
    """The text box shows only with a dino.txt model and a text index; a text typed there (a hostile
    one too) finds what Index.search_text finds, and is shown as text, never run as HTML."""
    from playwright.sync_api import sync_playwright

    from test_serve_page import BROWSER_FLAGS, chromium_or_skip

    chromium = chromium_or_skip()
    photos, index = text_index
    hostile = '<img src=x onerror="document.title=1"> a cat'
    expected = index.search_text([hostile], k=4, exact=True)[0]["neighbors"]
    server = Server(create_app(model, ServeSettings(), index=index))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
            try:
                page = browser.new_page()
                dialogs = []
                page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
                page.goto(server.url + "/")
                page.wait_for_selector("#text-search:not([hidden])")
                page.fill("#text", hostile)
                page.press("#text", "Enter")
                page.wait_for_selector("body[data-done='1']", timeout=60_000)
                assert page.text_content("#status") == ""
                captions = page.locator("#neighbors figcaption").all_text_contents()
                assert [c.split(" · ", 1)[1] for c in captions] == [n["path"] for n in expected]
                assert page.text_content("#search-title") == f"Nearest to “{hostile}”"
                page.wait_for_function(
                    "[...document.querySelectorAll('#neighbors img')].every(i => i.complete && i.naturalWidth > 0)"
                )
                assert page.title() == "dino3" and not dialogs and page.locator("#search-title img").count() == 0
                page.set_input_files("#file", str(photos / "rocket.jpg"))  # and an image, as before
                page.wait_for_selector("body[data-done='2']", timeout=60_000)
                assert page.text_content("#neighbors figcaption").endswith("rocket.jpg")
                assert page.locator("#anomaly-figure").is_hidden()  # no detector here
            finally:
                browser.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_the_page_has_no_text_box_without_a_text_index(model, checkpoint):
    from playwright.sync_api import sync_playwright

    from test_serve_page import BROWSER_FLAGS, chromium_or_skip

    chromium = chromium_or_skip()
    server = Server(create_app(model, ServeSettings()))  # a dino.txt model, but no index
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_function("document.getElementById('served').textContent.includes('no index')")
                assert page.locator("#text-search").is_hidden()
            finally:
                browser.close()
    finally:
        server.stop()


def test_a_dinotxt_preset_gives_the_server_its_name():
    """Bug it would catch: a dino.txt model loaded by its preset name (which has no hub id) crashing the
    server's names (AttributeError at start-up)."""
    from types import SimpleNamespace

    from dino3.presets import find_text_preset
    from dino3.serve.service import served_names

    loaded = SimpleNamespace(preset=find_text_preset("dinotxt-vitl16"), name_or_path="dinotxt-vitl16")
    assert served_names(loaded) == ["dinotxt-vitl16"]


def test_a_request_of_texts_and_images_is_queued_whole_or_refused_at_once(model):
    """Bug it would catch: a request's image queued while its text is refused: the 429 then waits for
    the image's forward (computed for nobody), or the image stays announced and later batches wait for
    it. With a text held in a forward and two queued, a request of a text and an image does not fit a
    queue of three: it is answered 429 at once, and leaves nothing behind."""
    from test_serve_batcher import Gate, wait_until

    gate = Gate()

    class GatedTexts:  # the model, its text tower held at a gate
        def __getattr__(self, name):
            return getattr(model, name)

        def encode_text(self, tokens, normalize=False):
            gate.pass_through()
            return model.encode_text(tokens, normalize)

    server = Server(create_app(GatedTexts(), ServeSettings(max_batch=1, max_wait_ms=0, max_queue=3)))
    batcher = server.server.config.app.state.service.batcher
    url = f"{server.url}/v1/embeddings"
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        gate.close()
        held = pool.submit(httpx.post, url, json={"input": ["a cat"]}, timeout=60)
        gate.wait_for_a_forward()
        queued = pool.submit(httpx.post, url, json={"input": ["a dog", "a car"]}, timeout=60)
        wait_until(lambda: batcher.depth == 2)
        mixed = pool.submit(httpx.post, url, json={"input": ["a bird", data_url(ROCKET)]}, timeout=60)
        refused = mixed.result(timeout=20)  # while the forward is still held
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert batcher.depth == 2 and batcher.expected == 0
        gate.opened.set()
        assert held.result().status_code == 200 and queued.result().status_code == 200
    finally:
        gate.opened.set()
        pool.shutdown()
        server.stop()
