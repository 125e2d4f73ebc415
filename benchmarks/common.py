"""What the benchmark scripts share: interleaved timing, the peers' ONNX export, and RESULTS.md."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# Benchmark results"


def interleaved_seconds(
    runs: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds of each run: one warm-up call each, then `reps` rounds in which they take turns
    (so that a slow phase of the machine hits them all alike)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def export_transformers_onnx(model: torch.nn.Module, path: Path, output: str = "last_hidden_state") -> Path:
    """A Transformers model exported the way its users do: 224 x 224 fixed, batch dynamic, one output."""

    class OneOutput(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return getattr(self.inner(pixel_values), output)

    with torch.no_grad():
        torch.onnx.export(
            OneOutput(model),
            (torch.randn(2, 3, 224, 224),),
            str(path),
            dynamo=True,
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=1024)}},
            input_names=["pixel_values"],
            output_names=[output],
        )
    return path


def save_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` under "## title" in RESULTS.md, replacing that section if it is there already."""
    content = path.read_text() if path.exists() else TITLE + "\n"
    header = f"## {title}\n"
    body = f"{header}\n{text.rstrip()}\n"
    if header in content:
        start = content.index(header)
        following = content.find("\n## ", start + len(header))
        end = len(content) if following < 0 else following + 1
        content = content[:start] + body + ("\n" + content[end:] if following >= 0 else "")
    else:
        content = content.rstrip() + "\n\n" + body
    path.write_text(content)
    print(f"wrote the '{title}' section of {path}")
