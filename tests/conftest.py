import os

# Tests never reach the network: the hub is unreachable here and CI must not depend on it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small ViT checkpoint folder (helpers.save_small_vit), one per test module."""
    from helpers import save_small_vit

    return save_small_vit(tmp_path_factory.mktemp("model"))
