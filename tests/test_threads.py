"""One model, several threads: each call gets bitwise what it gets alone (fp32 and bf16, ViT and
ConvNeXt), however the calls interleave. The models keep no state between calls but the RoPE
table cache, which must stay consistent under concurrent use."""

from __future__ import annotations

import threading

import pytest
import torch

import dino3
from helpers import randomize_

VIT = dino3.DINOv3ViTConfig(
    hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=3, num_register_tokens=4
)
CONVNEXT = dino3.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1])
# Several sizes, so that the threads fill and read the RoPE cache at once.
SIZES = [(64, 64), (96, 160), (48, 80), (112, 64), (64, 96), (160, 96)]


def run_together(model, inputs_per_thread, rounds=3):
    """Each thread runs its inputs `rounds` times; returns every thread's outputs, in order."""
    results = [[] for _ in inputs_per_thread]
    errors = []
    start = threading.Barrier(len(inputs_per_thread))

    def work(k):
        try:
            start.wait()
            with torch.inference_mode():
                for _ in range(rounds):
                    for x in inputs_per_thread[k]:
                        results[k].append(model(x).last_hidden_state)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs_per_thread))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_concurrent_calls_match_calls_alone(arch, dtype):
    config = VIT if arch == "vit" else CONVNEXT
    cls = dino3.DINOv3ViTModel if arch == "vit" else dino3.DINOv3ConvNextModel
    model = randomize_(cls(config)).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(b, 3, *size, generator=g) for b, size in zip((1, 3, 2), SIZES[k::2])] for k in range(2)]
    if arch == "vit":
        model.rope._cache.clear()  # the threads fill it while they run
    together = run_together(model, inputs)
    with torch.inference_mode():
        alone = [[model(x).last_hidden_state for x in xs] for xs in inputs]
    for k in range(2):
        for i, out in enumerate(together[k]):
            expected = alone[k][i % len(inputs[k])]
            assert out.dtype == dtype and torch.equal(out, expected), (k, i)


def test_the_comparison_notices_a_shared_buffer():
    """A model that keeps a buffer between calls (the kind of state the CPU attention once had) gives
    wrong results under threads: the test above would see it."""
    model = randomize_(dino3.DINOv3ViTModel(VIT)).eval()
    shared = {}
    forward = dino3.DINOv3ViTModel.forward

    def leaky(self, pixel_values, **kwargs):
        shared["x"] = pixel_values
        for _ in range(20):  # give the other thread time to overwrite it
            torch.sin(torch.randn(200, 200))
        return forward(self, shared["x"], **kwargs)

    inputs = [[torch.randn(1, 3, 64, 64)], [torch.randn(1, 3, 64, 64)]]
    with torch.inference_mode():
        alone = [model(xs[0]).last_hidden_state for xs in inputs]
    model.forward = leaky.__get__(model)
    mixed = False
    for _ in range(10):
        together = run_together(model, inputs, rounds=5)
        mixed |= any(not torch.equal(out, alone[k]) for k in range(2) for out in together[k])
        if mixed:
            break
    assert mixed
