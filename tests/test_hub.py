"""Hub loading, offline from a local huggingface_hub cache, and the hub's error answers from a local
stand-in server that speaks the hub's protocol (status codes and X-Error-Code headers)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from transformers import DINOv3ViTConfig as HFConfig
from transformers import DINOv3ViTModel as HFModel

import dino3
from dino3 import CheckpointError, ConfigError, DINOv3ViTModel, HubAccessError, UnknownModelError
from helpers import max_diff, randomize_

SMALL = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2, num_register_tokens=4)
REPO = "facebook/dinov3-vits16-pretrain-lvd1689m"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small Transformers checkpoint folder and its reference model."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = randomize_(HFModel(HFConfig(**SMALL)).eval())
    model.save_pretrained(folder)
    return folder, model


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay files out as huggingface_hub's cache does: snapshots/<commit>/ and refs/main."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, checkpoint):
    """A local hub cache holding the small checkpoint under the vits16 repo id; the hub is offline."""
    folder, _ = checkpoint
    cache = tmp_path / "hub"
    put_in_cache(cache, REPO, {p.name: p.read_bytes() for p in folder.iterdir()})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("name", ["vits16", REPO, "dinov3-vits16-pretrain-lvd1689m"])
def test_load_from_local_hub_cache_offline(hub_cache, checkpoint, name):
    _, reference = checkpoint
    model = dino3.load(name)
    assert isinstance(model, DINOv3ViTModel)
    assert model.preset is not None and model.preset.name == "vits16"
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert max_diff(model(x).last_hidden_state, reference(x).last_hidden_state) <= 1e-5


def test_load_config_offline(hub_cache):
    config = dino3.load_config("vits16")
    assert config.hidden_size == 64 and config.num_register_tokens == 4


def test_not_in_cache_while_offline(hub_cache):
    with pytest.raises(HubAccessError) as e:
        dino3.load("someone/not-cached")
    message = str(e.value)
    assert "someone/not-cached" in message and "not in the local cache" in message and "HF_HUB_OFFLINE" in message


def test_unknown_name_suggests_presets():
    with pytest.raises(UnknownModelError, match="Did you mean vits16"):
        dino3.load("vits61")


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        dino3.load(str(tmp_path / "nothing" / "here"))


def test_truncated_safetensors(tmp_path, checkpoint):
    folder, _ = checkpoint
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        dino3.load(tmp_path)
    assert "model.safetensors is not a readable safetensors file" in str(e.value)
    assert "truncated or corrupt" in str(e.value)


def test_missing_config(tmp_path, checkpoint):
    folder, _ = checkpoint
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="has no config.json"):
        dino3.load(tmp_path)


def test_missing_weights(tmp_path, checkpoint):
    folder, _ = checkpoint
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        dino3.load(tmp_path)


def test_wrong_model_type(tmp_path, checkpoint):
    folder, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "dinov2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError) as e:
        dino3.load(tmp_path)
    assert "model_type 'dinov2'" in str(e.value) and "dinov3_vit" in str(e.value)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "dinov3_vit", ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        dino3.load(tmp_path)


# -- a stand-in hub: gated repos, unknown repos, tokens ------------------------------------------
class FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves /<org>/<repo>/resolve/<rev>/<file> like huggingface.co does."""

    files: dict[str, dict[str, bytes]] = {}  # repo id -> file name -> bytes
    gated: set[str] = set()
    token = "hf_valid_token"

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
        authorised = self.headers.get("Authorization") == f"Bearer {self.token}"
        if repo_id not in self.files:
            return self._error(401, "RepoNotFound", "Repository not found")
        if repo_id in self.gated and not authorised:
            return self._error(401, "GatedRepo", "Access to this model is restricted. You must have access.")
        data = self.files[repo_id].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        self.send_response(200)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, checkpoint):
    folder, _ = checkpoint
    FakeHub.files = {REPO: {p.name: p.read_bytes() for p in folder.iterdir()}}
    FakeHub.gated = {REPO}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    yield endpoint
    server.shutdown()


def test_gated_repo_without_token(fake_hub):
    with pytest.raises(HubAccessError) as e:
        dino3.load("vits16")
    message = str(e.value)
    assert f"{REPO} is gated" in message
    assert f"https://hf.barry1.top/{REPO}" in message and "HF_TOKEN" in message and "hf auth login" in message


def test_gated_repo_with_token(fake_hub, checkpoint):
    _, reference = checkpoint
    model = dino3.load("vits16", token=FakeHub.token)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x).last_hidden_state, reference(x).last_hidden_state) <= 1e-5


def test_unknown_repo_or_unauthorised(fake_hub):
    with pytest.raises(HubAccessError) as e:
        dino3.load("facebook/dinov3-vitz99-pretrain-lvd1689m")
    message = str(e.value)
    assert "was not found on the hub, or you are not authorised" in message and "HF_TOKEN" in message


def test_info_reads_no_weights(hub_cache, monkeypatch, capsys):
    """`dino3 info` describes a hub model from its config.json and the weights' headers (fetched by
    range requests), never by downloading the weights (gigabytes for the 7B)."""
    from dino3.cli import main
    from dino3.weights import hub

    fetched = []
    real_download = hub.download
    monkeypatch.setattr(
        hub, "download", lambda repo, name, *a, **k: fetched.append(name) or real_download(repo, name, *a, **k)
    )
    assert main(["info", REPO]) == 0
    assert fetched == ["config.json"]
    assert "DINOv3 ViT" in capsys.readouterr().out


def test_a_preset_not_in_the_cache_offline_says_how_to_go_on(tmp_path, monkeypatch):
    """A newcomer offline with `vits16` (the README's name) learns both ways on: Meta's downloaded file
    as it is, or random weights of its shape from `dino3 init-random`."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAccessError) as e:
        dino3.load("vits16")
    message = str(e.value)
    assert "dino3 init-random vits16 DIR" in message and "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in message
    assert "\n" not in message
