"""What this machine can do, asked in one place (dino3.system), and every path that chooses by it.

The machines dino3 runs on are of two kinds, AVX-512 with bfloat16 units and AVX2 only; a path proven
on one can break on the other. The tests here run each choice with the capability simulated away
(dino3.system.cpu patched), and run the real thing in a process that PyTorch and oneDNN restrict to
AVX2 (helpers.AVX2_ENV), so that a developer on either kind of machine catches a break for the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import dino3
from dino3 import system
from dino3.models import layers
from helpers import AVX2_ENV, simulated_cpu

KINDS = ["avx2", "avx512", "avx512-bf16"]


@pytest.fixture
def cpu_kind(monkeypatch):
    """Make dino3.system.cpu() answer for another kind of CPU (no override variables set)."""
    monkeypatch.delenv("DINO3_LINEAR", raising=False)
    monkeypatch.delenv("DINO3_ONEDNN", raising=False)

    def use(kind: str) -> None:
        facts = simulated_cpu(kind)
        monkeypatch.setattr(system, "cpu", lambda: facts)

    return use


@pytest.mark.parametrize(
    ("kind", "fp32", "bf16"),
    [("avx2", "torch", "torch"), ("avx512", "onednn", "onednn"), ("avx512-bf16", "onednn", "onednn")],
)
def test_the_linear_kernel_is_chosen_by_the_cpu(cpu_kind, kind, fp32, bf16):
    """oneDNN's fused linear where it has AVX-512 kernels for the dtype, F.linear (MKL) elsewhere: on
    AVX2 oneDNN refuses bfloat16 outright and is the slower float32 GEMM."""
    cpu_kind(kind)
    assert system.linear_kernel(torch.float32) == fp32
    assert system.linear_kernel(torch.bfloat16) == bf16


def test_overrides_choose_the_kernel_but_never_one_that_cannot_run(cpu_kind, monkeypatch):
    cpu_kind("avx512-bf16")
    monkeypatch.setenv("DINO3_LINEAR", "torch")
    assert system.linear_kernel(torch.float32) == "torch"
    monkeypatch.setenv("DINO3_LINEAR", "auto")
    monkeypatch.setenv("DINO3_ONEDNN", "0")  # the older switch still works
    assert system.linear_kernel(torch.float32) == "torch"
    monkeypatch.delenv("DINO3_ONEDNN")
    cpu_kind("avx2")
    monkeypatch.setenv("DINO3_LINEAR", "onednn")
    assert system.linear_kernel(torch.float32) == "onednn"  # runs on AVX2, only slower: the user's choice
    assert system.linear_kernel(torch.bfloat16) == "torch"  # would crash: not taken


def test_without_onednn_bf16_the_linear_is_plain_pytorch(cpu_kind):
    """On an AVX2-only CPU a bfloat16 linear is exactly F.linear + activation, as in Transformers (the
    fused oneDNN op would raise 'could not create a primitive descriptor' there)."""
    cpu_kind("avx2")
    x, w, b = torch.randn(5, 64).bfloat16(), (torch.randn(96, 64) / 8).bfloat16(), torch.randn(96).bfloat16()
    with torch.no_grad():
        assert not layers._onednn_ok(x, w)
        assert torch.equal(layers.linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
        other = torch.randn(5, 96).bfloat16()
        assert torch.equal(layers.linear_mul(x, w, b, other), F.linear(x, w, b) * other)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_is_called_slow_only_where_it_is_emulated(cpu_kind, kind):
    cpu_kind(kind)
    note = system.precision_note(torch.bfloat16, "cpu")
    assert (note is None) == (kind == "avx512-bf16")
    if note is not None:
        assert "float32" in note and "faster" in note and "\n" not in note
    assert system.precision_note(torch.float32, "cpu") is None


def test_loading_in_emulated_bfloat16_says_so_once(cpu_kind, checkpoint):
    cpu_kind("avx2")
    system.say_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):
            dino3.load(checkpoint, dtype=torch.bfloat16)
        dino3.load(checkpoint)  # float32: nothing to say
    said = [w for w in caught if issubclass(w.category, system.SlowPrecisionWarning)]
    assert len(said) == 1 and "float32" in str(said[0].message)


def test_the_system_report_tells_the_truth_about_this_machine():
    facts = system.report()
    assert facts["torch"] == torch.__version__ and facts["threads"] == torch.get_num_threads()
    assert facts["cpu"]["torch_isa"] == torch.backends.cpu.get_cpu_capability()
    assert facts["dtypes"]["bfloat16"]["native"] == system.cpu().bf16_fast
    assert facts["extras"]["index"] == (__import__("importlib").util.find_spec("faiss") is not None)
    text = system.format_report(facts)
    assert "bfloat16:" in text and facts["cpu"]["torch_isa"] in text


def _run_restricted(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **AVX2_ENV, "PYTHONWARNINGS": "default"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_info_system_on_an_avx2_only_process():
    result = subprocess.run(
        [sys.executable, "-m", "dino3.cli", "info", "--system", "--json"],
        env={**os.environ, **AVX2_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["cpu"]["torch_isa"] == "AVX2" and not facts["cpu"]["onednn_bf16"]
    assert facts["dtypes"]["bfloat16"]["native"] is False and facts["dtypes"]["bfloat16"]["linear"] == "torch"
    assert facts["dtypes"]["float32"]["linear"] == "torch"
    assert facts["overrides"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_bfloat16_runs_on_an_avx2_only_cpu_as_transformers_does(tmp_path, checkpoint):
    """The bug this pins: every bfloat16 use crashed on AVX2-only CPUs ('could not create a primitive
    descriptor for the inner product forward propagation primitive'), because oneDNN's fused linear was
    used without asking whether oneDNN runs bfloat16 there. Here PyTorch and oneDNN really run as on
    such a CPU: the library, the pipeline and the embed command work in bfloat16, within bfloat16
    rounding of Transformers in bfloat16 on the same process, and say once that float32 is faster."""
    result = _run_restricted(
        f"""
        import warnings, torch, numpy, transformers, dino3, subprocess, sys
        assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
        ours = dino3.load({str(checkpoint)!r}, dtype=torch.bfloat16)
        ref = transformers.DINOv3ViTModel.from_pretrained({str(checkpoint)!r}, dtype=torch.bfloat16).eval()
        full = dino3.load({str(checkpoint)!r})
        with torch.inference_mode():
            a, b = ours(x).last_hidden_state.float(), ref(pixel_values=x.bfloat16()).last_hidden_state.float()
            truth = full(x).last_hidden_state
        err_ours, err_ref = (a - truth).abs().mean().item(), (b - truth).abs().mean().item()
        print("mean error", err_ours, err_ref)
        assert err_ours <= 1.1 * err_ref + 1e-4, (err_ours, err_ref)
        features = dino3.pipeline(model={str(checkpoint)!r}, dtype=torch.bfloat16)("{_photo()}")
        assert numpy.isfinite(numpy.asarray(features, dtype="float32")).all()
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not create a primitive" not in result.stderr
    assert result.stderr.count("SlowPrecisionWarning") == 1, result.stderr
    command = [sys.executable, "-m", "dino3.cli", "embed", _photo(), "-m", str(checkpoint), "--dtype", "bfloat16"]
    output = tmp_path / "f.npz"
    done = subprocess.run(
        [*command, "-o", str(output), "--quiet"],
        env={**os.environ, **AVX2_ENV},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert output.exists()


def _photo() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "examples" / "images" / "chelsea.png")


def test_openvino_bf16_is_refused_clearly_where_the_cpu_lacks_it(monkeypatch, checkpoint, tmp_path):
    """OpenVINO compiles bf16 only on CPUs with AVX512-BF16 or AMX: elsewhere dino3 refuses it before
    exporting anything, naming the precisions that run."""
    pytest.importorskip("openvino")
    monkeypatch.setattr(system, "openvino_precisions", lambda: ("f32", "int8"))
    with pytest.raises(dino3.BackendError, match=r"no bfloat16 support in OpenVINO.*use f32 or int8"):
        dino3.load(checkpoint, backend="openvino", precision="bf16", runtime_cache=tmp_path)
