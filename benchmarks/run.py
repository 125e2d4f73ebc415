"""Throughput and memory of dino3 against Transformers (and timm) on the same weights, in one run.

    python benchmarks/run.py                 # every row, fp32 and bf16; its section of benchmarks/RESULTS.md
    python benchmarks/run.py --rows vits16   # rows whose name contains "vits16"
    python benchmarks/run.py --device cuda   # the same table on a GPU

Method: for each row the libraries get the same random weights (dino3 loads Transformers' state
dict) and the same input. After a warm-up, the libraries run in turn (interleaved), `--reps` times
each; the table shows the median images/s. FLOPs per image come from torch.utils.flop_counter; the
roofline is the best measured dense matmul throughput of this machine (torch.mm through MKL, and
oneDNN's matmul where it runs the dtype), so "of best GEMM" is the distance to the hardware.
Peak memory is measured in a fresh process for each library and row: the model's weights plus the
largest growth of resident memory (on CUDA the allocator's peak) while one batch runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from common import interleaved_seconds, save_section

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    name: str
    preset: str
    size: int
    batch: int


ROWS = [
    Row("vits16-224-b1", "vits16", 224, 1),
    Row("vits16-224-b8", "vits16", 224, 8),
    Row("vits16-224-b32", "vits16", 224, 32),
    Row("vitb16-224-b32", "vitb16", 224, 32),
    Row("vits16-512-b4", "vits16", 512, 4),
    Row("convnext-tiny-224-b1", "convnext-tiny", 224, 1),
    Row("convnext-tiny-224-b32", "convnext-tiny", 224, 32),
]
TIMM_NAMES = {"vits16": "vit_small_patch16_dinov3_qkvb", "vitb16": "vit_base_patch16_dinov3_qkvb"}


# -- models ---------------------------------------------------------------------------------------
def build(library: str, preset_name: str, dtype: torch.dtype, device: str, state_dict=None):
    """(model, hf_state_dict) for one library; dino3 gets the Transformers weights it is given."""
    import dino3
    from dino3.presets import get_preset

    preset = get_preset(preset_name)
    config = preset.make_config()
    if library == "transformers":
        import transformers

        if preset.architecture == "vit":
            model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**preset.config))
        else:
            model = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**preset.config))
        model = model.to(device=device, dtype=dtype).eval()
        return model, {k: v for k, v in model.state_dict().items()}
    if library == "dino3":
        cls = dino3.DINOv3ViTModel if preset.architecture == "vit" else dino3.DINOv3ConvNextModel
        if state_dict is None:  # its own random weights
            return cls(config).to(device=device, dtype=dtype).eval(), None
        return cls.from_state_dict(state_dict, config, device=device).to(dtype), state_dict
    if library == "timm":
        import timm

        if preset.architecture == "vit":
            model = timm.create_model(TIMM_NAMES[preset_name], pretrained=False, num_classes=0)
        else:
            model = timm.create_model("convnext_" + preset_name.split("-")[1], pretrained=False, num_classes=0)
        return model.to(device=device, dtype=dtype).eval(), None
    raise ValueError(library)


def forward_fn(library: str, model):
    if library == "timm":
        return model.forward_features
    return model


def libraries(args) -> list[str]:
    libs = ["dino3", "transformers"]
    if not args.no_timm:
        try:
            import timm  # noqa: F401

            libs.append("timm")
        except ImportError:
            print("timm is not installed: its rows are left out (pip install timm)")
    return libs


# -- measurements ---------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(fns: dict, x: torch.Tensor, reps: int, device: str) -> dict[str, float]:
    """Median images/s of each function, run interleaved after one warm-up call each."""
    runs = {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
    with torch.inference_mode():
        seconds = interleaved_seconds(runs, reps, sync=lambda: sync(device))
    return {name: x.shape[0] / s for name, s in seconds.items()}


def flops_per_image(model, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x[:1])
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of a square matmul through torch.mm and, on the CPU, through oneDNN."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    result = {}
    candidates = {"torch.mm": lambda: torch.mm(a, b)}
    from dino3 import system

    onednn_runs = system.cpu().onednn and (dtype == torch.float32 or system.cpu().onednn_bf16)
    if device == "cpu" and onednn_runs:  # oneDNN refuses bfloat16 on AVX2-only CPUs
        candidates["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    for name, fn in candidates.items():
        fn()
        runs = []
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            runs.append(time.perf_counter() - start)
        result[name] = 2 * n**3 / min(runs) / 1e9
    return result


def peak_memory_mb(library: str, row: Row, dtype: torch.dtype, device: str) -> float:
    """Peak memory of building the model and running one batch, in a fresh process."""
    command = [sys.executable, __file__, "--memory-probe", library, row.preset, str(row.size), str(row.batch)]
    command += [str(dtype).removeprefix("torch."), device]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def memory_probe(library: str, preset: str, size: int, batch: int, dtype_name: str, device: str) -> float:
    """Peak MB of one forward pass: the largest resident set size while one batch runs (on CUDA,
    the allocator's peak), above what the process held with the model built, its weights included.
    Memory freed while building is handed back to the system first (malloc_trim), so that a library
    whose initialisation leaves a large free heap behind does not look lighter than it is."""
    dtype = getattr(torch, dtype_name)
    x = torch.randn(batch, 3, size, size, device=device).to(dtype)
    import transformers.models.dinov3_convnext.modeling_dinov3_convnext  # noqa: F401
    import transformers.models.dinov3_vit.modeling_dinov3_vit  # noqa: F401

    import dino3.models  # noqa: F401  (imports are not part of the model's memory)

    if library == "timm":
        import timm  # noqa: F401
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model, _ = build(library, preset, dtype, device)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            forward_fn(library, model)(x)
        return torch.cuda.max_memory_allocated() / 2**20
    model, _ = build(library, preset, dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _reset_peak_rss()
    with torch.inference_mode():
        forward_fn(library, model)(x)
    return (_peak_rss() - base + weights) / 2**20


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; return it in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _peak_rss()


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def import_seconds(statement: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter running `statement`, minus an empty interpreter's."""

    def run(code):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - start

    empty = statistics.median(run("pass") for _ in range(repeats))
    return statistics.median(run(statement) for _ in range(repeats)) - empty


def cold_start_seconds(repeats: int = 3) -> dict[str, float]:
    """Wall time of a fresh interpreter that loads a ViT-S/16 checkpoint and embeds one photo."""
    import tempfile

    from dino3.cli import main as dino3_cli

    photo = str(HERE.parent / "examples" / "images" / "chelsea.png")
    with tempfile.TemporaryDirectory() as folder:
        dino3_cli(["init-random", "vits16", folder])
        scripts = {
            "dino3": (
                "import torch, dino3\n"
                f"model = dino3.load({folder!r})\n"
                f"processor = dino3.DINOv3ViTImageProcessor.from_pretrained({folder!r})\n"
                f"with torch.inference_mode(): model(**processor({photo!r})).pooler_output"
            ),
            "transformers": (
                "import torch\nfrom transformers import AutoModel, AutoImageProcessor\n"
                "from transformers.image_utils import load_image\n"
                f"model = AutoModel.from_pretrained({folder!r})\n"
                f"processor = AutoImageProcessor.from_pretrained({folder!r})\n"
                f"inputs = processor(load_image({photo!r}), return_tensors='pt')\n"
                "with torch.inference_mode(): model(**inputs).pooler_output"
            ),
        }
        result = {}
        for name, code in scripts.items():
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
                runs.append(time.perf_counter() - start)
            result[name] = statistics.median(runs)
    return result


# -- report ---------------------------------------------------------------------------------------
def versions() -> str:
    import dino3

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"dino3 {dino3.__version__}"]
    for name in ("transformers", "timm"):
        with contextlib.suppress(ImportError):
            parts.append(f"{name} {__import__(name).__version__}")
    return ", ".join(parts)


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_kind(short: bool = False) -> str:
    """What dino3.system says of this CPU: the kernels torch uses, bfloat16, the linear dino3 chose;
    and whether that was simulated (a process restricted to AVX2 on an AVX-512 machine)."""
    from dino3 import system

    facts = system.cpu()
    simulated = [f"{k}={v}" for k, v in os.environ.items() if k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")]
    kind = f"{facts.torch_isa} kernels" + (", simulated" if simulated else "")
    if short:
        return kind
    return (
        f"{kind}; bfloat16 {'native' if facts.bf16_fast else 'emulated'}; dino3's linear layers through "
        f"{system.linear_kernel(torch.float32)} (float32) and {system.linear_kernel(torch.bfloat16)} (bfloat16)"
        + (f"; restricted by {' '.join(simulated)}" if simulated else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="", help="only rows whose name contains this text")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="print only; do not update benchmarks/RESULTS.md")
    parser.add_argument("--memory-probe", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        lib, preset, size, batch, dtype_name, device = args.memory_probe
        print(memory_probe(lib, preset, int(size), int(batch), dtype_name, device))
        return

    torch.manual_seed(0)
    libs = libraries(args)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    rows = [row for row in ROWS if args.rows in row.name]
    peaks = {dtype: matmul_peak(dtype, args.device) for dtype in dict.fromkeys([torch.float32, *dtypes])}
    header = [
        f"Date: {date.today()}; device: {args.device}"
        + (f" ({cpu_name()}, {torch.get_num_threads()} threads)" if args.device == "cpu" else ""),
        f"Versions: {versions()}",
        f"CPU kind: {cpu_kind()}",
        "Matmul throughput (2048x2048): "
        + "; ".join(
            f"{str(d).removeprefix('torch.')} " + ", ".join(f"{k} {v:.3g} GFLOP/s" for k, v in p.items())
            for d, p in peaks.items()
        ),
        f"Median of {args.reps} interleaved runs after a warm-up. 'of best GEMM' = achieved GFLOP/s over "
        "the best matmul GFLOP/s above, of the row's dtype or float32 (an emulated bfloat16 is measured "
        "against float32, the fastest way this CPU multiplies). Peak MB: weights plus the peak growth "
        "of memory during one batch, in a fresh process.",
    ]
    print("\n".join(header), flush=True)

    table = [
        "| row | dtype | GFLOP/img | " + " | ".join(f"{lib} img/s" for lib in libs) + " | dino3 / transformers | "
        "dino3 of best GEMM | transformers of best GEMM |"
        + ("" if args.no_memory else " " + " | ".join(f"{lib} peak MB" for lib in libs) + " |"),
        "|" + "---|" * (6 + len(libs) + (0 if args.no_memory else len(libs))),
    ]
    for row in rows:
        for dtype in dtypes:
            reference, state_dict = build("transformers", row.preset, dtype, args.device)
            models = {"transformers": reference, "dino3": build("dino3", row.preset, dtype, args.device, state_dict)[0]}
            if "timm" in libs:
                models["timm"] = build("timm", row.preset, dtype, args.device)[0]
            x = torch.randn(row.batch, 3, row.size, row.size, device=args.device).to(dtype)
            flops = flops_per_image(reference, x)
            speed = throughput({lib: forward_fn(lib, models[lib]) for lib in libs}, x, args.reps, args.device)
            del models, reference
            best = max(max(p.values()) for d, p in peaks.items() if d in (dtype, torch.float32)) * 1e9
            cells = [row.name, str(dtype).removeprefix("torch."), f"{flops / 1e9:.2f}"]
            cells += [f"{speed[lib]:.2f}" for lib in libs]
            cells += [f"{speed['dino3'] / speed['transformers']:.2f}x"]
            cells += [f"{100 * speed[lib] * flops / best:.0f}%" for lib in ("dino3", "transformers")]
            if not args.no_memory:
                cells += [f"{peak_memory_mb(lib, row, dtype, args.device):.0f}" for lib in libs]
            table.append("| " + " | ".join(cells) + " |")
            print(table[-1], flush=True)

    imports = {
        "torch": "import torch",
        "dino3": "import dino3; dino3.DINOv3ViTModel",
        "transformers": "from transformers import DINOv3ViTModel",
    }
    times = {name: import_seconds(code) for name, code in imports.items()}
    import_line = "Import time (fresh interpreter, median of 3): " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in times.items()
    )
    print(import_line)
    cold = cold_start_seconds()
    cold_line = (
        "Cold start, a fresh process to the first embedding of one photo (imports, loading a ViT-S/16 "
        "checkpoint folder, preprocessing, one forward; median of 3): "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in cold.items())
        + f"; dino3 / Transformers = {cold['dino3'] / cold['transformers']:.2f}"
    )
    print(cold_line)

    if not args.no_save:
        text = "\n".join([*[h + "  " for h in header], "", *table, "", import_line, "", cold_line])
        vendor = cpu_name().split()[0].removesuffix("(R)")  # Intel, AMD, ...: their kernels differ
        title = "Model throughput" if args.device != "cpu" else f"Model throughput ({vendor}, {cpu_kind(short=True)})"
        save_section(title, text)


if __name__ == "__main__":
    main()
