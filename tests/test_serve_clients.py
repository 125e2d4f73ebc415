"""The clients people already use, against `dino3 serve` started from the command line: the official
`openai` client (models.list, embeddings with every accepted name and both encodings, a 400 for
`dimensions`; texts and images of a dino.txt model in one space), LangChain's OpenAIEmbeddings with
the README's setting, and the README's own serving examples (the curl lines with `-d @request.json`,
the Python blocks: each against the server its first line names), run as written against a live
server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import dino3

pytest.importorskip("fastapi")
from dino3.serve.service import checkpoint_names, recorded_hub_id, served_names  # noqa: E402
from test_serve import data_url, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROCKET = ROOT / "examples" / "images" / "rocket.jpg"
HUB_ID = "facebook/dinov3-vits16-pretrain-lvd1689m"


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A small model where the Hugging Face cache keeps vits16's snapshot (the path records the repo)."""
    from helpers import save_small_vit

    root = tmp_path_factory.mktemp("hub")
    return save_small_vit(root / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40))


def serving(arguments: list[str]):
    """`dino3 serve ARGUMENTS --port P` in a subprocess; yields its URL once it is ready."""
    port = free_port()
    command = [sys.executable, "-m", "dino3.cli", "serve", *arguments, "--port", str(port)]
    environment = {k: v for k, v in os.environ.items() if k != "DINO3_API_KEY"}  # no key: the examples send none
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and process.poll() is None, "the server did not start"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def detector_folder(hub_folder, tmp_path_factory):
    """An anomaly detector fitted with the served model (two photos, at 224 px), or None without FAISS."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    from dino3.anomaly import fit

    good = [str(ROOT / "examples" / "images" / name) for name in ("coffee.png", "chelsea.png")]
    detector = fit(good, model=str(hub_folder), resolution=224, rotate=False)
    return detector.save(tmp_path_factory.mktemp("detector") / "detector")


@pytest.fixture(scope="module")
def served(hub_folder, detector_folder):
    """`dino3 serve -m FOLDER --served-model-name vits16 my-dino --detector DIR`; yields its URL."""
    arguments = ["-m", str(hub_folder), "--served-model-name", "vits16", "my-dino"]
    arguments += ["--detector", str(detector_folder)] if detector_folder is not None else []
    yield from serving(arguments)


@pytest.fixture(scope="module")
def dinotxt_folder(tmp_path_factory):
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    from helpers import dinotxt_meta_files

    root = tmp_path_factory.mktemp("dinotxt")
    dino3.DINOv3TextModel.from_meta(*dinotxt_meta_files(root)).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def served_dinotxt(dinotxt_folder):
    """`dino3 serve -m DINOTXT_FOLDER --served-model-name dinotxt-vitl16`; yields its URL."""
    yield from serving(["-m", str(dinotxt_folder), "--served-model-name", "dinotxt-vitl16"])


@pytest.fixture(scope="module")
def expected(hub_folder):
    """The CLS embedding of rocket.jpg as dino3 computes it in this process."""
    from dino3.features import extract

    model = dino3.load(hub_folder)
    pixels = dino3.DINOv3ViTImageProcessor.for_model(model)(str(ROCKET)).pixel_values
    return extract(model, pixels, "cls")[0][0].numpy()


def test_the_names_a_model_answers_to(hub_folder, checkpoint):
    """Bug pinned (issue 28): a server of `-m FOLDER` accepted only that string or its last part;
    the preset name, the hub id and a name of the user's choice were refused. A folder that merely
    has a preset's shape must not take the preset's names."""
    assert recorded_hub_id(str(hub_folder)) == HUB_ID and recorded_hub_id(str(checkpoint)) is None
    cached = dino3.load(hub_folder)
    assert checkpoint_names(cached) == ["vits16", HUB_ID, HUB_ID]
    assert served_names(cached) == [str(hub_folder), "0" * 40, "vits16", HUB_ID]
    assert served_names(cached, ["mine"]) == ["mine", "vits16", HUB_ID]
    plain = dino3.load(checkpoint)  # a folder of its own: no preset's names
    assert served_names(plain) == [str(checkpoint), Path(checkpoint).name]
    assert served_names(plain, ["a", "b"]) == ["a", "b"]


def test_the_openai_client_lists_the_models_and_embeds_with_each_name(served, expected):
    """Bug pinned (issue 28): no GET /v1/models (client.models.list() got 404); `dimensions` was
    ignored (384 numbers back when 64 were asked)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    names = [model.id for model in client.models.list()]
    assert names == ["vits16", "my-dino", HUB_ID]
    assert client.models.retrieve("my-dino").id == "my-dino"
    image = data_url(ROCKET)
    for name in names:
        for encoding in ("float", "base64"):
            answer = client.embeddings.create(model=name, input=[image], encoding_format=encoding)
            vector = answer.data[0].embedding
            if isinstance(vector, str):
                vector = np.frombuffer(base64.b64decode(vector), dtype="<f4")
            assert answer.model == name and np.abs(np.asarray(vector) - expected).max() <= 1e-4, (name, encoding)
    default = client.embeddings.create(model="vits16", input=image)  # the client asks base64 and decodes it
    assert np.abs(np.asarray(default.data[0].embedding) - expected).max() <= 1e-4
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="vits16", input=[image], dimensions=64)
    assert "not trained to be truncated" in str(refused.value) and refused.value.body["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="someone/else", input=[image])
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model="vits16", input=[[101, 2023, 102]])
    assert "check_embedding_ctx_length=False" in str(tokens.value)


def test_langchain_with_the_documented_setting(served, expected):
    """LangChain's OpenAIEmbeddings works with check_embedding_ctx_length=False (the README's line)."""
    pytest.importorskip("langchain_openai")
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="vits16", base_url=f"{served}/v1", api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    vectors = embeddings.embed_documents([data_url(ROCKET), data_url(ROCKET)])
    assert len(vectors) == 2 and all(np.abs(np.asarray(v) - expected).max() <= 1e-4 for v in vectors)
    assert np.abs(np.asarray(embeddings.embed_query(data_url(ROCKET))) - expected).max() <= 1e-4


def test_the_openai_client_embeds_texts_and_images_in_one_space(served_dinotxt, dinotxt_folder):
    """Issue 29: a dino.txt server answers a text and an image in one request with vectors of the same
    width whose cosine is the library's (encode_text; the image embedding, pool "text")."""
    openai = pytest.importorskip("openai")
    from dino3.features import extract

    client = openai.OpenAI(base_url=f"{served_dinotxt}/v1", api_key="unused", max_retries=0)
    text = "a rocket on its launch pad"
    for encoding in ("float", "base64"):
        answer = client.embeddings.create(
            model="dinotxt-vitl16", input=[text, data_url(ROCKET)], encoding_format=encoding
        )
        vectors = [item.embedding for item in answer.data]
        vectors = [
            np.frombuffer(base64.b64decode(v), dtype="<f4") if isinstance(v, str) else np.asarray(v) for v in vectors
        ]
        model = dino3.load(dinotxt_folder)
        expected_text = model.encode_text([text])[0].detach().numpy()
        pixels = dino3.DINOv3ViTImageProcessor.for_dinotxt()(str(ROCKET)).pixel_values
        expected_image = extract(model, pixels, "text")[0][0].numpy()
        assert vectors[0].shape == vectors[1].shape == (model.config.embed_dim,)
        assert np.abs(vectors[0] - expected_text).max() <= 1e-4 and np.abs(vectors[1] - expected_image).max() <= 1e-4
        assert abs(cosine(*vectors) - cosine(expected_text, expected_image)) <= 1e-5
        assert answer.usage.prompt_tokens == 8 + model.backbone.config.num_prefix_tokens + 14 * 14


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def serve_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Serve\n") : text.index("\n## ", text.index("## Serve\n") + 1)]


def test_the_readme_curl_lines_run_as_written(served, expected, tmp_path):
    """Bug pinned (issue 28): the README's curl example failed with `Argument list too long` (a
    150 KB base64 photo in one argument). Its lines run here as written (only the address changes)."""
    if shutil.which("curl") is None or shutil.which("base64") is None:
        pytest.skip("needs curl and base64")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", serve_section(), flags=re.S) if "request.json" in b)
    script = block.replace("localhost:8000", served.removeprefix("http://"))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import json

    decoder = json.JSONDecoder()
    answer, end = decoder.raw_decode(done.stdout)
    models, _ = decoder.raw_decode(done.stdout[end:].lstrip())
    assert np.abs(np.asarray(answer["data"][0]["embedding"]) - expected).max() <= 1e-4
    assert [m["id"] for m in models["data"]] == ["vits16", "my-dino", HUB_ID]
    assert (tmp_path / "request.json").stat().st_size > 128 * 1024  # longer than one argument may be


def test_the_readme_python_client_examples_run_as_written(
    served, served_dinotxt, dinotxt_folder, detector_folder, expected, tmp_path, monkeypatch
):
    """Each block runs, in the README's order, against the server its first line names: `dino3 serve
    -m vits16 ...` (with the detector) or `dino3 serve -m dinotxt-vitl16`."""
    if detector_folder is None:
        pytest.skip("the anomaly example needs FAISS: pip install 'dino3[anomaly]'")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", serve_section(), flags=re.S) if b.startswith("# with")]
    servers = {"# with `dino3 serve -m vits16": served, "# with `dino3 serve -m dinotxt-vitl16": served_dinotxt}
    assert len(blocks) == 4
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        (url,) = [url for start, url in servers.items() if block.startswith(start)]
        exec(compile(block.replace("http://localhost:8000", url), "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["names"] == ["vits16", "my-dino", HUB_ID]
    assert np.abs(np.asarray(namespace["vector"]) - expected).max() <= 1e-4
    assert np.abs(np.asarray(namespace["vectors"][0]) - expected).max() <= 1e-4
    # the dino.txt block: the cosine of a text and an image, as the library computes it
    from dino3.features import extract

    model = dino3.load(dinotxt_folder)
    text = model.encode_text(["a rocket on its launch pad"])[0].detach().numpy()
    image = extract(model, dino3.DINOv3ViTImageProcessor.for_dinotxt()(str(ROCKET)).pixel_values, "text")[0][0]
    assert abs(namespace["cosine"] - cosine(text, image.numpy())) <= 1e-5
    # the anomaly block: the detector's own score, and the picture written
    from dino3.anomaly import load as load_detector

    (result,) = load_detector(detector_folder).score([str(ROCKET)])
    assert abs(namespace["result"]["score"] - result.score) <= 1e-5
    assert namespace["result"]["anomalous"] == result.anomalous
    from PIL import Image

    with Image.open(tmp_path / "rocket-map.png") as picture:
        assert picture.format == "PNG" and picture.height == 427  # rocket.jpg is 640 x 427
