"""The feature-extraction pipeline against Transformers' pipeline, and the batched engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import dino3
from dino3.images import ImageError
from dino3.pipeline import iter_batches
from dino3.processing import DINOv3ViTImageProcessor
from helpers import max_diff, randomize_

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
RGB_PHOTOS = [str(PHOTOS / n) for n in ("chelsea.png", "rocket.jpg", "coffee.png", "hubble_deep_field.jpg")]
VIT = dict(hidden_size=128, num_attention_heads=2, intermediate_size=192, num_hidden_layers=2, num_register_tokens=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    randomize_(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**VIT))).save_pretrained(folder)
    transformers.DINOv3ViTImageProcessor().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_transformers_pipeline(folder, pool, batch_size):
    reference = transformers.pipeline("image-feature-extraction", model=str(folder), batch_size=batch_size)
    ours = dino3.pipeline("image-feature-extraction", model=folder, batch_size=batch_size)
    expected = reference(RGB_PHOTOS, pool=pool, return_tensors=True)
    got = ours(RGB_PHOTOS, pool=pool, return_tensors=True)
    assert len(got) == len(expected) == len(RGB_PHOTOS)
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape  # (1, 1 + R + N, D) or (1, D)
        assert max_diff(mine, theirs) <= 1e-4


def test_single_image_and_nested_lists(folder):
    reference = transformers.pipeline("image-feature-extraction", model=str(folder))
    ours = dino3.pipeline(model=folder)
    expected, got = reference(RGB_PHOTOS[0]), ours(RGB_PHOTOS[0])
    assert isinstance(got, list) and len(got) == 1 and len(got[0]) == 201 and len(got[0][0]) == 128
    assert max_diff(torch.tensor(got), torch.tensor(expected)) <= 1e-4


def test_bf16_pipeline(folder):
    reference = transformers.pipeline("image-feature-extraction", model=str(folder), dtype=torch.bfloat16)
    ours = dino3.pipeline(model=folder, dtype=torch.bfloat16)
    exact = dino3.pipeline(model=folder)(RGB_PHOTOS[:2], pool=True, return_tensors=True)
    got = ours(RGB_PHOTOS[:2], pool=True, return_tensors=True)
    expected = reference(RGB_PHOTOS[:2], pool=True, return_tensors=True)
    for mine, theirs, truth in zip(got, expected, exact):
        assert mine.dtype == torch.bfloat16
        assert max_diff(mine, truth) <= 1.5 * max_diff(theirs, truth) + 1e-2


def test_convnext_pipeline(tmp_path):
    model = randomize_(
        transformers.DINOv3ConvNextModel(
            transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
        )
    )
    model.save_pretrained(tmp_path)
    transformers.DINOv3ViTImageProcessor().save_pretrained(tmp_path)
    expected = transformers.pipeline("image-feature-extraction", model=str(tmp_path))(
        RGB_PHOTOS[:2], return_tensors=True
    )
    got = dino3.pipeline(model=tmp_path, batch_size=2)(RGB_PHOTOS[:2], return_tensors=True)
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape == (1, 50, 64)
        assert max_diff(mine, theirs) <= 1e-4


def test_pipeline_with_aspect_mode(folder):
    ours = dino3.pipeline(model=folder, batch_size=4)
    out = ours(RGB_PHOTOS, return_tensors=True, image_processor_kwargs=dict(keep_aspect="shorter", target_size=160))
    # (H, W) 300x451 -> 160x241, cropped to 160x240 (10x15 patches); 427x640 and 400x600 alike;
    # 872x1000 -> 160x183, cropped to 160x176 (10x11 patches)
    assert [o.shape[1] for o in out] == [1 + 4 + 150, 1 + 4 + 150, 1 + 4 + 150, 1 + 4 + 10 * 11]


def test_engine_batches_by_size_and_reports_bad_images(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    sources = [RGB_PHOTOS[0], str(tmp_path / "bad.jpg"), RGB_PHOTOS[1], RGB_PHOTOS[2]]
    processor = DINOv3ViTImageProcessor()
    errors = []
    batches = list(iter_batches(sources, processor, batch_size=2, workers=2, on_error=lambda *e: errors.append(e)))
    assert [b.indices for b in batches] == [[0, 2], [3]]
    assert errors[0][0] == 1 and isinstance(errors[0][2], ImageError)
    with pytest.raises(ImageError, match="bad.jpg"):
        list(iter_batches(sources, processor, batch_size=2, workers=0))


def test_the_decoding_threads_have_ended_when_the_batches_have():
    """A daemon thread still freeing its last tensor as the interpreter exits is killed inside
    torch's C++, which aborts the process (exit 134 after a complete run): the pipeline waits for
    its threads."""
    import threading

    photos = sorted(PHOTOS.glob("*.jpg"))
    for _ in range(3):
        batches = list(iter_batches(photos * 3, DINOv3ViTImageProcessor(), batch_size=4, workers=2))
        assert sum(len(b.indices) for b in batches) == 3 * len(photos)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("dino3-decode")]


# -- Transformers-style arguments (issue 28) ----------------------------------------------------------
def reference_names(*functions, extra=()) -> set[str]:
    """The argument names of the pinned Transformers' functions: their signatures and the arguments
    their docstrings document (Transformers takes many through **kwargs)."""
    import inspect
    import re

    names = set(extra)
    for function in functions:
        names |= set(inspect.signature(function).parameters)
        names |= set(re.findall(r"^\s+(\w+) \(`", function.__doc__ or "", flags=re.M))
    return names - {"self", "args", "kwargs"}


def pipeline_argument_examples(folder) -> dict:
    """A value for each Transformers pipeline() argument that dino3 takes (each is tried)."""
    return {
        "task": "image-feature-extraction",
        "model": str(folder),
        "image_processor": dino3.DINOv3ViTImageProcessor.from_pretrained(folder),
        "processor": dino3.DINOv3ViTImageProcessor.from_pretrained(folder),
        "revision": "main",
        "use_fast": True,
        "token": None,
        "device": -1,
        "device_map": "auto",
        "dtype": torch.float32,
        "torch_dtype": torch.float32,
        "trust_remote_code": False,
        "model_kwargs": {"attn_implementation": "sdpa"},
        "num_workers": 2,
        "batch_size": 2,
        "framework": "pt",
        "pool": True,
        "return_tensors": True,
        "image_processor_kwargs": {"keep_aspect": "longer", "target_size": 160},
        "timeout": 5.0,
    }


def test_every_pipeline_argument_of_transformers_is_taken_or_refused_with_a_reason(folder):
    """Bug pinned (issue 28): Transformers-style arguments that Transformers 5.24 accepts failed in
    dino3 (device=-1: "unknown device -1"; framework="pt", torch_dtype=: TypeError). Read from the
    pinned reference, so that the next argument it adds fails here until dino3 takes or refuses it."""
    import re
    import warnings

    from transformers.pipelines.base import Pipeline
    from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline

    from dino3.pipeline import NOT_IN_DINO3

    names = reference_names(
        transformers.pipeline,
        Pipeline.__init__,
        ImageFeatureExtractionPipeline,
        ImageFeatureExtractionPipeline._sanitize_parameters,
        extra=("torch_dtype", "framework", "num_workers", "batch_size"),
    )
    examples = pipeline_argument_examples(folder)
    unknown = sorted(names - set(examples) - set(NOT_IN_DINO3))
    assert not unknown, f"Transformers' pipeline() takes {unknown}: give dino3 each (or refuse it with a reason)"
    expected = dino3.pipeline(model=folder)(RGB_PHOTOS[0], return_tensors=True)
    for name in sorted(names & set(examples)):
        arguments = {"model": folder, name: examples[name]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            extractor = dino3.pipeline(**arguments)
        got = extractor(RGB_PHOTOS[0])
        assert got is not None, name
        if name in (
            "revision",
            "use_fast",
            "token",
            "device",
            "dtype",
            "torch_dtype",
            "trust_remote_code",
            "framework",
        ):
            assert max_diff(torch.tensor(got), expected) == 0, name  # changes nothing here
    for name, reason in NOT_IN_DINO3.items():
        with pytest.raises(TypeError, match=re.escape(reason)):
            dino3.pipeline(model=folder, **{name: object()})


def test_every_call_argument_of_transformers_is_taken(folder):
    """The pipeline call takes each argument Transformers' image-feature-extraction call takes."""
    import inspect

    from transformers.pipelines.base import Pipeline
    from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline

    names = reference_names(
        ImageFeatureExtractionPipeline.__call__, ImageFeatureExtractionPipeline._sanitize_parameters, Pipeline.__call__
    ) - {"inputs", "images"}
    ours = set(inspect.signature(dino3.pipeline.FeatureExtractionPipeline.__call__).parameters)
    assert names <= ours, f"Transformers' call takes {sorted(names - ours)}"


def test_transformers_style_arguments_mean_what_they_mean_there(folder, tmp_path):
    """device=-1, framework="pt", torch_dtype= (with Transformers' deprecation note) and a call's
    timeout= as Transformers 5.24 reads them, against the reference pipeline."""
    import http.server
    import threading
    import time

    reference = transformers.pipeline("image-feature-extraction", model=str(folder), device=-1, framework="pt")
    ours = dino3.pipeline("image-feature-extraction", model=folder, device=-1, framework="pt")
    assert ours.device == reference.device == torch.device("cpu")
    assert max_diff(torch.tensor(ours(RGB_PHOTOS[0])), torch.tensor(reference(RGB_PHOTOS[0]))) <= 1e-4
    with pytest.raises(ValueError, match="PyTorch models only"):
        dino3.pipeline(model=folder, framework="tf")
    with pytest.warns(FutureWarning, match="`torch_dtype` is deprecated! Use `dtype` instead!"):
        bf16 = dino3.pipeline(model=folder, torch_dtype=torch.bfloat16)
    assert (
        bf16.dtype
        == transformers.pipeline("image-feature-extraction", model=str(folder), torch_dtype=torch.bfloat16).dtype
    )
    with pytest.warns(FutureWarning, match="torch_dtype"):
        model = dino3.DINOv3ViTModel.from_pretrained(folder, torch_dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.warns(FutureWarning):
        assert dino3.load(folder, torch_dtype=torch.bfloat16, dtype=torch.float32).dtype == torch.float32  # dtype wins
    with pytest.raises(TypeError, match="quantize="):
        dino3.load(folder, quantization_config={"load_in_8bit": True})

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"x")
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(ImageError, match="longer than 1 s"):
            ours(f"http://127.0.0.1:{server.server_port}/slow.png", timeout=1.0)
        assert time.monotonic() - started < 4
    finally:
        server.shutdown()


def test_every_from_pretrained_argument_of_transformers_is_taken_or_refused_with_a_reason(folder, tmp_path):
    """As above, for from_pretrained (and dino3.load): torch_dtype= was a TypeError."""
    import re
    import warnings

    from dino3.models.pretrained import NOT_IN_DINO3

    names = reference_names(transformers.PreTrainedModel.from_pretrained, extra=("torch_dtype",))
    names -= {"pretrained_model_name_or_path", "model_args"}  # the one positional; no extra model arguments
    examples = {
        "config": None,
        "cache_dir": str(tmp_path),
        "ignore_mismatched_sizes": False,
        "force_download": False,
        "local_files_only": True,
        "token": None,
        "revision": "main",
        "use_safetensors": True,
        "weights_only": True,
        "attn_implementation": "sdpa",
        "dtype": torch.float32,
        "torch_dtype": torch.float32,
        "device_map": "auto",
    }
    unknown = sorted(names - set(examples) - set(NOT_IN_DINO3))
    assert not unknown, f"Transformers' from_pretrained takes {unknown}: give dino3 each (or refuse it with a reason)"
    expected = dino3.DINOv3ViTModel.from_pretrained(folder).state_dict()
    for name in sorted(names & set(examples)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = dino3.DINOv3ViTModel.from_pretrained(folder, **{name: examples[name]})
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), name
    for name, reason in NOT_IN_DINO3.items():
        with pytest.raises(TypeError, match=re.escape(reason)):
            dino3.DINOv3ViTModel.from_pretrained(folder, **{name: object()})
    for name, value in (("ignore_mismatched_sizes", True), ("weights_only", False), ("use_safetensors", False)):
        with pytest.raises(ValueError, match=name):
            dino3.load(folder, **{name: value})
