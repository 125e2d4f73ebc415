"""What this machine can do, asked in one place by every path that chooses by capability.

DINOv3 users run on CPUs of very different kinds: AVX-512 with bfloat16 units (AVX512-BF16, AMX), AVX2
only (no bfloat16 hardware: bfloat16 is emulated, and oneDNN refuses a bfloat16 matmul outright), ARM
with NEON/SVE. What is fastest, or even what runs, differs between them, so no path decides by itself:

- `cpu()` reads the CPU once: its vector extensions (from the OS), what PyTorch's own kernels use
  (`torch.backends.cpu.get_cpu_capability()`, which honours ATEN_CPU_CAPABILITY) and whether oneDNN
  runs bfloat16 here (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`, which honours
  ONEDNN_MAX_CPU_ISA). Setting those two variables to AVX2 on an AVX-512 machine gives a faithful
  AVX2-only process, which is how the tests check the other kind of machine.
- `linear_kernel(dtype)` picks the CPU matmul of the models' linear layers: oneDNN's fused linear
  (bias and activation as post-ops) where oneDNN has AVX-512 kernels for that dtype, else PyTorch's
  own `F.linear` (MKL's GEMM in float32; the same call as Transformers). Measured (RESULTS.md): on
  AVX-512 the fused oneDNN linear is faster (AMD Zen 4 fp32: 452 against 213 GFLOP/s), on AVX2 MKL is
  (Zen 3 fp32: 174-188 against 127-138), and in bfloat16 without oneDNN support only `F.linear` runs.
  `DINO3_LINEAR=onednn|torch|auto` overrides it (`DINO3_ONEDNN=0` still means torch); an override
  that this CPU cannot run falls back to `F.linear` rather than crash.
- `precision_note(dtype, device)` is the one line that says when a precision is slower than float32
  here (bfloat16 on a CPU without bfloat16 units), naming the faster choice.
- `report()` is what `dino3 info --system` prints: a user filing a bug pastes it.

Nothing here changes a setting; the facts about the CPU are read once per process (they do not change
while it runs), the overrides on every call.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
from dataclasses import dataclass
from typing import Any

# The CPU features that matter to dino3's paths, as Linux names them in /proc/cpuinfo.
X86_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
ARM_FEATURES = ("asimd", "sve", "sve2", "bf16", "i8mm")  # asimd is NEON
# Variables that change what the kernels use (the last three restrict PyTorch, oneDNN and MKL to an
# older vector extension: how an AVX2-only machine is simulated on an AVX-512 one).
OVERRIDES = (
    "DINO3_LINEAR",
    "DINO3_ONEDNN",
    "OMP_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)


@dataclass(frozen=True)
class CPU:
    """The facts about this CPU that dino3 chooses by."""

    name: str  # the model name, as the OS reports it
    arch: str  # x86_64, aarch64, arm64, ...
    features: frozenset[str]  # of X86_FEATURES / ARM_FEATURES that the hardware has
    torch_isa: str  # the vector extension PyTorch's own kernels use: AVX512, AVX2, SVE256, DEFAULT, ...
    onednn: bool  # oneDNN (mkldnn) and its fused linear are built into this PyTorch
    onednn_bf16: bool  # oneDNN runs bfloat16 matmuls here (False on AVX2-only CPUs: it refuses them)

    @property
    def bf16_hardware(self) -> bool:
        """bfloat16 arithmetic units: AVX512-BF16 or AMX on x86, the BF16 extension on ARM."""
        return bool(self.features & {"avx512_bf16", "amx_bf16", "bf16"})

    @property
    def bf16_fast(self) -> bool:
        """bfloat16 runs natively (faster than float32); otherwise it is emulated and slower."""
        return self.bf16_hardware and self.onednn_bf16

    @property
    def avx512(self) -> bool:
        """PyTorch and oneDNN run AVX-512 kernels here (not merely: the hardware has AVX-512)."""
        return self.torch_isa.upper().startswith("AVX512")


@functools.lru_cache(maxsize=1)
def cpu() -> CPU:
    """This CPU, read once per process."""
    import torch

    name, flags = _cpuinfo()
    machine = platform.machine().lower()
    known = ARM_FEATURES if machine in ("aarch64", "arm64") else X86_FEATURES
    if not flags and hasattr(torch, "cpu"):  # no /proc/cpuinfo (macOS, Windows): ask PyTorch
        flags = _torch_flags(torch)
    onednn = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    try:
        onednn_bf16 = onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an old or a stripped-down PyTorch
        onednn_bf16 = False
    return CPU(
        name=name or platform.processor() or machine,
        arch=machine,
        features=frozenset(f for f in known if f in flags),
        torch_isa=str(torch.backends.cpu.get_cpu_capability()),
        onednn=onednn,
        onednn_bf16=onednn_bf16,
    )


def _cpuinfo() -> tuple[str, set[str]]:
    """The model name and feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not name:
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def _torch_flags(torch: Any) -> set[str]:
    checks = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512_vnni": "_is_vnni_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_bf16": "_is_amx_tile_supported",
    }
    found = set()
    for flag, check in checks.items():
        try:
            if getattr(torch.cpu, check)():
                found.add(flag)
        except (AttributeError, RuntimeError):
            pass
    return found


# -- choices ---------------------------------------------------------------------------------------------------
def linear_kernel(dtype: Any) -> str:
    """The CPU kernel for the models' linear layers in `dtype`: "onednn" (fused bias and activation) or
    "torch" (`F.linear`). DINO3_LINEAR (onednn, torch, auto) overrides the choice where it can run."""
    import torch

    facts = cpu()
    runs = facts.onednn and (dtype == torch.float32 or (dtype == torch.bfloat16 and facts.onednn_bf16))
    asked = os.environ.get("DINO3_LINEAR", "auto").strip().lower()
    if os.environ.get("DINO3_ONEDNN", "1") == "0":
        asked = "torch"
    if asked == "torch" or not runs:
        return "torch"
    if asked == "onednn":
        return "onednn"
    return "onednn" if facts.avx512 else "torch"


def precision_note(dtype: Any, device: Any = "cpu") -> str | None:
    """One line when `dtype` is slower than float32 on `device` here (bfloat16 on a CPU without bfloat16
    units, where it is emulated), naming the faster choice; None when there is nothing to say."""
    import torch

    if torch.device(device).type != "cpu" or dtype != torch.bfloat16 or cpu().bf16_fast:
        return None
    return (
        "bfloat16 is emulated on this CPU (it has no AVX512-BF16 or AMX units), several times slower than "
        "float32: float32 (the default) is the faster choice here; bfloat16 still halves the memory"
    )


class SlowPrecisionWarning(UserWarning):
    """A precision runs here, but slower than float32."""


@functools.cache
def say_once(note: str) -> None:
    """Warn with `note` the first time only (per process). The warnings module's own once-per-place
    is not enough: any library that changes the warning filters (Transformers does) resets it."""
    import warnings

    warnings.warn(note, SlowPrecisionWarning, stacklevel=3)


# -- the report -------------------------------------------------------------------------------------------------
EXTRAS = {  # extra -> the modules it installs
    "parquet": ["pyarrow"],
    "torchao": ["torchao"],
    "onnx": ["onnx", "onnxscript"],
    "onnxruntime": ["onnxruntime"],
    "openvino": ["openvino", "nncf"],
    "serve": ["fastapi", "uvicorn", "multipart", "prometheus_client"],
    "ray": ["ray"],
    "video": ["av"],
    "index": ["faiss", "scipy"],
}


def extras() -> dict[str, bool]:
    """Which of dino3's extras are installed (found, not imported)."""
    return {extra: all(importlib.util.find_spec(m) is not None for m in modules) for extra, modules in EXTRAS.items()}


def openvino_precisions() -> tuple[str, ...]:
    """The precisions OpenVINO's CPU plugin runs here (bf16 needs AVX512-BF16 or AMX); () without OpenVINO."""
    if importlib.util.find_spec("openvino") is None:
        return ()
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    # OpenVINO's CPU plugin is built on oneDNN: bf16 also needs oneDNN's bf16 here (which a process
    # restricted by ONEDNN_MAX_CPU_ISA lacks, though the hardware has it)
    return ("f32", "int8") + (("bf16",) if "BF16" in capabilities and cpu().bf16_fast else ())


def report() -> dict[str, Any]:
    """What dino3 knows about this machine, for `dino3 info --system` and bug reports."""
    import torch

    from ._version import __version__

    facts = cpu()
    found = re.search(r"(?:MKL-DNN|oneDNN)[^\n]*?v(\d+\.\d+(?:\.\d+)?)", torch.__config__.show())
    onednn_version = found.group(1) if found and facts.onednn else None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(i)
            gpus.append({"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1)})
    installed = extras()
    return {
        "dino3": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onednn": onednn_version,
        "mkl": bool(torch.backends.mkl.is_available()),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cpu": {
            "name": facts.name,
            "arch": facts.arch,
            "features": sorted(facts.features),
            "torch_isa": facts.torch_isa,
            "onednn_bf16": facts.onednn_bf16,
        },
        "dtypes": {
            "float32": {"runs": True, "linear": linear_kernel(torch.float32)},
            "bfloat16": {
                "runs": True,
                "native": facts.bf16_fast,
                "linear": linear_kernel(torch.bfloat16),
                "note": precision_note(torch.bfloat16),
            },
            "float16": {"runs": False, "note": "refused: DINOv3's activations overflow float16; use bfloat16"},
        },
        "quantization": {"int8-dynamic": "cpu", "int8-weight": "cpu, cuda" if installed["torchao"] else None},
        "backends": {
            "torch": True,
            "onnxruntime": ["f32", "int8"] if installed["onnxruntime"] else None,
            "openvino": list(openvino_precisions()) or None,
        },
        "extras": installed,
        "gpus": gpus,
        "gpu_note": None
        if gpus
        else "no GPU: a CUDA GPU runs bfloat16 natively (Ampere and newer) and int4-weight quantization",
        "overrides": {k: os.environ[k] for k in OVERRIDES if k in os.environ},
    }


def format_report(facts: dict[str, Any]) -> str:
    """report() as lines a person reads."""
    cpu_facts, dtypes = facts["cpu"], facts["dtypes"]
    bf16 = dtypes["bfloat16"]
    lines = [
        f"dino3 {facts['dino3']} · Python {facts['python']} · torch {facts['torch']} · oneDNN {facts['onednn']}"
        f" · MKL {'yes' if facts['mkl'] else 'no'}",
        f"platform: {facts['platform']}",
        f"cpu: {cpu_facts['name']} ({cpu_facts['arch']}), {facts['cores']} cores, torch uses {facts['threads']} "
        f"threads",
        f"cpu features: {' '.join(cpu_facts['features']) or 'none of note'}; torch kernels: {cpu_facts['torch_isa']};"
        f" oneDNN bfloat16: {'yes' if cpu_facts['onednn_bf16'] else 'no'}",
        f"float32: linear layers through {dtypes['float32']['linear']}",
        f"bfloat16: {'native' if bf16['native'] else 'emulated (slower than float32)'}, linear layers through "
        f"{bf16['linear']}",
        "float16: " + dtypes["float16"]["note"],
    ]
    backends = facts["backends"]
    for name in ("onnxruntime", "openvino"):
        precisions = backends[name]
        lines.append(f"backend {name}: {', '.join(precisions) if precisions else 'not installed'}")
    lines.append("extras: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in facts["extras"].items()))
    if facts["gpus"]:
        lines += [f"gpu {i}: {g['name']}, {g['memory_gib']} GiB" for i, g in enumerate(facts["gpus"])]
    else:
        lines.append(facts["gpu_note"])
    if facts["overrides"]:
        lines.append("overrides: " + ", ".join(f"{k}={v}" for k, v in facts["overrides"].items()))
    return "\n".join(lines)
