"""Opt-in: the official weights give the values Transformers' conversion script checks (spec 4.4).

Skipped unless DINO3_REAL_WEIGHTS=1 (or =all, to include the two 7B models) is set, with hub access
to Meta's gated repositories (HF_TOKEN) and to images.cocodataset.org. Never run by CI, which has no
hub access. Each checkpoint: the COCO val2017 image 000000039769 through the hub's own processor,
then the first five values of the CLS token and of the first patch token, to 1e-3.
"""

from __future__ import annotations

import os

import pytest
import torch

import dino3
from dino3.weights.hub import download

WHICH = os.environ.get("DINO3_REAL_WEIGHTS", "")
IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"

EXPECTED = {  # checkpoint: (CLS[:5], first patch token[:5])
    "vits16": (
        [0.463561, -0.415609, 0.408236, -0.126613, -0.286636],
        [-0.038754, -0.250895, -0.016392, -0.455473, 0.571582],
    ),
    "vits16plus": (
        [-0.471349, -1.365778, -0.317983, 0.377219, -0.769085],
        [0.144551, -0.388117, -0.393433, -0.157695, -0.600380],
    ),
    "vitb16": (
        [1.034643, -0.180609, -0.341018, -0.066376, -0.011383],
        [-0.082523, -0.456272, -0.728029, -0.430680, -0.152880],
    ),
    "vitl16": (
        [0.484527, -0.582214, 0.480636, 0.592040, 0.945166],
        [-0.211367, -0.490863, -0.257131, 0.101763, 0.154511],
    ),
    "vith16plus": (
        [-0.064575, -0.148866, -0.621524, 0.634878, 0.152695],
        [-0.093817, 0.287407, -0.050036, 0.428043, 0.094561],
    ),
    "vit7b16": (
        [0.275439, -0.261353, 0.067772, 0.049936, -0.158747],
        [0.044442, -0.052542, 0.070777, -0.065111, -0.026546],
    ),
    "vitl16-sat493m": ([-0.33235, 0.34052, -0.22087, 0.21434, 0.09003], [0.18488, 0.30309, -0.20689, 0.12848, 0.06207]),
    "vit7b16-sat493m": (
        [-0.19779, 0.11819, -0.00581, -0.21055, -0.03971],
        [-0.12423, 0.07879, -0.10057, 0.02835, -0.11727],
    ),
    "convnext-tiny": (
        [-6.372119, 1.300791, 2.074303, -0.079975, 0.607205],
        [0.490530, -3.713466, 1.848513, -1.040319, -1.090818],
    ),
    "convnext-small": (
        [-0.903914, 1.412183, 0.287465, 0.175296, -2.397940],
        [-1.081114, 0.637362, 3.748765, 0.170179, 1.445153],
    ),
    "convnext-base": (
        [0.155366, -0.378771, -0.735157, -2.818718, 0.015095],
        [3.039118, 0.778155, -1.961322, -1.607147, -2.411941],
    ),
    "convnext-large": (
        [-2.219094, -0.594451, -2.300294, -0.957415, -0.520473],
        [-1.477349, -0.217038, -3.128137, 0.418962, 0.334949],
    ),
}


@pytest.mark.skipif(not WHICH, reason="opt-in: set DINO3_REAL_WEIGHTS=1 (with hub access) to check the real weights")
@pytest.mark.parametrize("name", list(EXPECTED))
def test_official_weights_give_the_published_values(name):
    if "7b" in name and WHICH != "all":
        pytest.skip("the 7B models need DINO3_REAL_WEIGHTS=all (and about 30 GB of memory)")
    preset = dino3.get_preset(name)
    model = dino3.load(name)
    # The hub's own processor (the SAT checkpoints' hub copies carry ImageNet statistics: the values
    # above were computed with it, not with Meta's satellite statistics that dino3's presets use).
    processor_file = download(preset.hub_id, "preprocessor_config.json")
    processor = dino3.DINOv3ViTImageProcessor.from_pretrained(os.path.dirname(processor_file))
    with torch.inference_mode():
        out = model(processor(IMAGE_URL).pixel_values)
    cls, patch = EXPECTED[name]
    prefix = model.config.num_prefix_tokens
    torch.testing.assert_close(out.last_hidden_state[0, 0, :5], torch.tensor(cls), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.last_hidden_state[0, prefix, :5], torch.tensor(patch), atol=1e-3, rtol=1e-3)
