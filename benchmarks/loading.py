"""Peak memory while loading a large checkpoint, against the loaded model's own size.

    python benchmarks/loading.py            # prints a markdown table; --save puts it in RESULTS.md

For ViT-L/16 and ViT-H+/16 a random checkpoint is written in the Hugging Face layout (fp32 and
bf16 files); a fresh process then loads it with dino3 (and with Transformers, for reference) in
fp32 or bf16. "peak" is the largest resident memory growth while loading (VmHWM after, minus the
resident memory before), "model" the bytes of the loaded parameters; their ratio should stay near 1.
Transformers memory-maps the file when it keeps the file's dtype, so its parameters are paged in
later, at the first forward pass: its small peaks there are not the memory it will use.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import save_section

HERE = Path(__file__).resolve().parent

PROBE = """
import sys, torch
library, folder, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if library == "dino3":
    import dino3, dino3.models
    load = lambda: dino3.load(folder, dtype=dtype)
else:
    import transformers
    load = lambda: transformers.DINOv3ViTModel.from_pretrained(folder, dtype=dtype)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
model = load()
peak = status("VmHWM:") - before
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(peak, size)
"""


def write_checkpoint(preset: str, dtype: torch.dtype, folder: Path) -> None:
    """A random checkpoint of the preset's architecture, in the Hugging Face layout."""
    import dino3
    from dino3.weights.files import write_safetensors
    from dino3.weights.formats import to_hf

    config = dino3.get_preset(preset).make_config()
    with torch.device("meta"):
        model = dino3.DINOv3ViTModel(config)
    shapes = to_hf(model.state_dict(), config)
    generator = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=generator) * 0.02).to(dtype) for k, v in shapes.items()}
    folder.mkdir(parents=True)
    config.replace(extra={"dtype": str(dtype).removeprefix("torch.")}).save_pretrained(folder)
    write_safetensors(tensors, folder / "model.safetensors")


def probe(library: str, folder: Path, dtype: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, library, str(folder), dtype], check=True, capture_output=True)
    peak, size = (int(v) for v in out.stdout.decode().split()[-2:])
    return peak / 2**20, size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="vitl16,vith16plus")
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = parser.parse_args()

    lines = [
        "Peak memory while loading (fresh process; peak growth of resident memory / the loaded model's bytes):",
        "",
        "| model | file dtype | load dtype | model MB | dino3 peak MB | dino3 ratio | Transformers peak MB "
        "| Transformers ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            for file_dtype in ("float32", "bfloat16"):
                folder = Path(tmp) / f"{preset}-{file_dtype}"
                write_checkpoint(preset, getattr(torch, file_dtype), folder)
                for load_dtype in ("float32", "bfloat16"):
                    ours, size = probe("dino3", folder, load_dtype)
                    theirs, their_size = probe("transformers", folder, load_dtype)
                    lines.append(
                        f"| {preset} | {file_dtype} | {load_dtype} | {size:.0f} | {ours:.0f} | {ours / size:.2f} | "
                        f"{theirs:.0f} | {theirs / their_size:.2f} |"
                    )
                    print(lines[-1], flush=True)
                (folder / "model.safetensors").unlink()
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("Loading memory", text)


if __name__ == "__main__":
    main()
