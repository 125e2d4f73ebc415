"""ONNX export and the ONNX Runtime / OpenVINO backends against dino3's PyTorch output.

The backends are installed by CI (the test extra); a missing one fails these tests instead of
skipping them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

import dino3
from dino3 import export_onnx
from dino3.cli import main as cli
from dino3.errors import BackendError, ExportError
from dino3.runtime import load_runtime
from helpers import max_diff, randomize_

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.[jp][pn]g"))
SIZES = [(224, 224), (96, 160), (100, 75)]  # square, non-square, not a multiple of the patch


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    vit = transformers.DINOv3ViTConfig(
        hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=2, num_register_tokens=4
    )
    randomize_(transformers.DINOv3ViTModel(vit)).save_pretrained(root / "vit")
    convnext = transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1])
    randomize_(transformers.DINOv3ConvNextModel(convnext)).save_pretrained(root / "convnext")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DINO3_CACHE", str(tmp_path_factory.getbasetemp() / "dino3-cache"))


def sizes_for(arch):
    return SIZES if arch == "vit" else [(224, 224), (96, 160), (97, 131)]


@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_exported_graph(checkpoints, tmp_path, arch):
    path = export_onnx(checkpoints / arch, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    assert not {n.op_type for n in graph.node} & {"If", "Loop", "Scan"}
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 3 and isinstance(dims[2], str) and isinstance(dims[3], str)
    assert (tmp_path / "model.preprocessor_config.json").is_file() and (tmp_path / "model.dino3.json").is_file()


def test_export_graph_is_the_form_runtimes_fuse(checkpoints, tmp_path):
    """q, k and v as separate MatMuls (no split of a fused one), a native Gelu (opset 20), and RoPE
    in the slice form that OpenVINO fuses into one operation: each measured faster in a runtime."""
    import openvino as ov

    path = export_onnx(checkpoints / "vit", tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    layers = 2
    assert ops.count("MatMul") == layers * (3 + 2 + 1 + 2)  # q, k, v, two attention products, proj, MLP
    assert "Gelu" in ops and "Erf" not in ops
    model = ov.Core().read_model(str(path))
    model.reshape({"pixel_values": ov.PartialShape([1, 3, 64, 64])})
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kinds = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    assert kinds.count("RoPE") == 2 * layers  # q and k in each layer


def test_export_refuses_an_opset_without_layer_normalization(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="opset must be 17 or newer"):
        export_onnx(checkpoints / "vit", tmp_path / "model.onnx", opset=16)
    assert not (tmp_path / "model.onnx").exists()


def test_export_leaves_the_model_as_it_was(checkpoints, tmp_path):
    model = dino3.load(checkpoints / "vit", dtype=torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "model.onnx")
    assert model.training and next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_f32_backends_match_pytorch(checkpoints, arch, backend):
    reference = dino3.load(checkpoints / arch)
    runtime = dino3.load(checkpoints / arch, backend=backend, precision="f32")
    assert runtime.precision == "f32" and backend in repr(runtime)
    for size in sizes_for(arch):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = reference(x)
        got = runtime(x)
        assert got.last_hidden_state.shape == expected.last_hidden_state.shape
        assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= 1e-4
        assert max_diff(got.pooler_output, expected.pooler_output) <= 1e-4
        assert got.grid_size == expected.grid_size and torch.equal(
            got.patch_grid, got.patch_tokens.unflatten(1, got.grid_size)
        )


# Lowest cosine to f32 over the example photos' tokens that the tests require (measured values in
# benchmarks/RESULTS.md).
LOW_PRECISION = [("openvino", "bf16", 0.999), ("onnxruntime", "int8", 0.99), ("openvino", "int8", 0.95)]


@pytest.mark.parametrize(("backend", "precision", "bound"), LOW_PRECISION)
def test_low_precision_stays_close_to_f32(checkpoints, backend, precision, bound):
    from dino3 import system

    if backend == "openvino" and precision not in system.openvino_precisions():
        # OpenVINO runs bf16 only on CPUs with AVX512-BF16 or AMX: elsewhere a clear refusal
        with pytest.raises(BackendError, match="no bfloat16 support in OpenVINO .*use f32 or int8"):
            dino3.load(checkpoints / "vit", backend=backend, precision=precision)
        return
    pixels = dino3.DINOv3ViTImageProcessor()(PHOTOS).pixel_values
    with torch.no_grad():
        truth = dino3.load(checkpoints / "vit")(pixels).last_hidden_state
    runtime = dino3.load(checkpoints / "vit", backend=backend, precision=precision)
    got = runtime(pixels).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(got, truth, dim=-1).min().item()
    assert bound <= cosine < 1 - 1e-7


def test_openvino_int8_calibrates_on_given_images(checkpoints, tmp_path):
    """Each calibration set makes its own quantized model, from the images given (not the samples)."""
    x = dino3.DINOv3ViTImageProcessor()(PHOTOS[:2]).pixel_values
    outputs = []
    for images in (PHOTOS[:3], PHOTOS[3:6]):
        runtime = dino3.load(
            checkpoints / "vit", backend="openvino", precision="int8", calibration=images, runtime_cache=tmp_path
        )
        outputs.append(runtime(x).last_hidden_state)
    quantized = sorted(tmp_path.glob("*/openvino-int8-*.xml"))
    assert len(quantized) == 2  # one per calibration set
    assert max_diff(outputs[0], outputs[1]) > 0  # different calibrations, different int8 scales
    with pytest.raises(BackendError, match="calibration images are for OpenVINO's int8"):
        dino3.load(checkpoints / "vit", backend="openvino", precision="f32", calibration=PHOTOS[:3])


def test_compiled_models_are_cached(checkpoints, monkeypatch):
    from dino3.runtime import model as runtime_model

    dino3.load(checkpoints / "vit", backend="onnxruntime")
    monkeypatch.setattr(runtime_model, "export_model", lambda *a, **k: pytest.fail("exported again"))
    dino3.load(checkpoints / "vit", backend="onnxruntime")


def test_two_checkpoints_in_one_runtime_cache_keep_their_own_graphs(checkpoints, tmp_path):
    """An explicit runtime_cache is the root of the cache, not one entry: two checkpoints given the
    same folder each run their own weights."""
    other = tmp_path / "other"
    config = transformers.DINOv3ViTConfig(
        hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=2, num_register_tokens=4
    )
    randomize_(transformers.DINOv3ViTModel(config), seed=5).save_pretrained(other)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for source in (checkpoints / "vit", other):
        got = dino3.load(source, backend="onnxruntime", runtime_cache=tmp_path / "cache")(x).last_hidden_state
        with torch.no_grad():
            assert max_diff(got, dino3.load(source)(x).last_hidden_state) <= 1e-4
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_an_interrupted_export_is_rebuilt(checkpoints, tmp_path):
    runtime = dino3.load(checkpoints / "vit", backend="onnxruntime", runtime_cache=tmp_path)
    x = torch.randn(1, 3, 48, 48)
    expected = runtime(x).last_hidden_state
    (entry,) = tmp_path.iterdir()
    (entry / "model.dino3.json").unlink()  # as an export killed before its description was written
    again = dino3.load(checkpoints / "vit", backend="onnxruntime", runtime_cache=tmp_path)
    assert torch.equal(again(x).last_hidden_state, expected)
    assert (entry / "model.dino3.json").is_file()
    assert not list(tmp_path.glob(".*partial"))  # no scratch folder left behind


def test_openvino_keeps_each_precision_apart_and_bounds_its_cache(checkpoints, tmp_path, monkeypatch):
    """OpenVINO reuses a blob compiled for f32 when bf16 is asked for from the same cache folder, and
    then returns NaN: each precision has its own folder. Compiled sizes beyond MAX_BLOBS are dropped."""
    from dino3 import system
    from dino3.runtime import openvino

    if "bf16" not in system.openvino_precisions():
        pytest.skip("OpenVINO runs bf16 only on CPUs with AVX512-BF16 or AMX (the refusal is tested above)")
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        truth = dino3.load(checkpoints / "vit")(x).last_hidden_state
    for precision in ("f32", "bf16", "f32"):
        got = dino3.load(checkpoints / "vit", backend="openvino", precision=precision, runtime_cache=tmp_path)(x)
        assert not torch.isnan(got.last_hidden_state).any(), precision
        cosine = torch.nn.functional.cosine_similarity(got.last_hidden_state, truth, dim=-1).min()
        assert cosine >= 0.999, precision
    (entry,) = tmp_path.iterdir()
    assert (entry / "openvino-f32").is_dir() and (entry / "openvino-bf16").is_dir()
    assert not list(entry.glob("*.xml"))  # no copy of the weights per image size
    monkeypatch.setattr(openvino, "MAX_BLOBS", 2)
    runtime = dino3.load(checkpoints / "vit", backend="openvino", precision="f32", runtime_cache=tmp_path)
    for side in (32, 48, 64, 80):
        runtime(torch.randn(1, 3, side, side))
    assert len(list((entry / "openvino-f32").glob("*.blob"))) == 2


def test_precision_must_exist_for_the_backend(checkpoints):
    with pytest.raises(BackendError, match=r"onnxruntime runs precision \('f32', 'int8'\), not 'bf16'; for bf16 use"):
        dino3.load(checkpoints / "vit", backend="onnxruntime", precision="bf16")
    with pytest.raises(BackendError, match="precision chooses a runtime's precision"):
        dino3.load(checkpoints / "vit", precision="bf16")


def test_missing_backend_names_the_extra(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendError, match=r"needs openvino, which is not installed: pip install 'dino3\[openvino\]'"):
        load_runtime(checkpoints / "vit", "openvino")


def test_pipeline_and_embed_on_a_backend(checkpoints, tmp_path):
    pipe = dino3.pipeline(model=checkpoints / "vit", backend="openvino", precision="f32", batch_size=2)
    torch_pipe = dino3.pipeline(model=checkpoints / "vit", batch_size=2)
    images = [str(p) for p in PHOTOS[:3]]
    for a, b in zip(pipe(images, pool=True, return_tensors=True), torch_pipe(images, pool=True, return_tensors=True)):
        assert max_diff(a, b) <= 1e-4
    out = tmp_path / "f.npz"
    args = ["embed", *images, "-m", str(checkpoints / "vit"), "-o", str(out), "-q"]
    assert cli([*args, "--backend", "onnxruntime", "--precision", "int8"]) == 0
    assert np.load(out)["features"].shape == (3, 128)
    with pytest.raises(SystemExit):
        cli([*args, "--overwrite", "--backend", "openvino", "--layers", "2"])


def test_export_command(checkpoints, tmp_path, capsys):
    assert cli(["export", str(checkpoints / "convnext"), "-o", str(tmp_path / "c.onnx")]) == 0
    assert "dynamic batch, height and width" in capsys.readouterr().out
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "c.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 96), dtype=np.float32)
    hidden, pooled = session.run(None, {"pixel_values": x})
    with torch.no_grad():
        expected = dino3.load(checkpoints / "convnext")(torch.from_numpy(x))
    assert np.abs(hidden - expected.last_hidden_state.numpy()).max() <= 1e-4
