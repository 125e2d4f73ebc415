"""The clients people already use, against `dino3 serve` started from the command line: the official
`openai` client (models.list, embeddings with every accepted name and both encodings, a 400 for
`dimensions`), LangChain's OpenAIEmbeddings with the README's setting, and the README's own serving
examples (the curl lines with `-d @request.json`, the Python blocks), run as written against a
live server on 127.0.0.1.
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


@pytest.fixture(scope="module")
def served(hub_folder):
    """`dino3 serve -m FOLDER --served-model-name vits16 my-dino` in a subprocess; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "dino3.cli", "serve", "-m", str(hub_folder), "--port", str(port)]
    command += ["--served-model-name", "vits16", "my-dino"]
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


def test_the_readme_python_client_examples_run_as_written(served, expected, tmp_path, monkeypatch):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", serve_section(), flags=re.S) if b.startswith("# with")]
    assert len(blocks) == 2
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("http://localhost:8000", served), "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["names"] == ["vits16", "my-dino", HUB_ID]
    assert np.abs(np.asarray(namespace["vector"]) - expected).max() <= 1e-4
    assert np.abs(np.asarray(namespace["vectors"][0]) - expected).max() <= 1e-4
