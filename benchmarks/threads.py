"""Why a forward is slower in `dino3 serve` than alone: OpenMP teams on several threads.

    python benchmarks/threads.py          # prints the table; --save puts it in RESULTS.md

PyTorch's CPU kernels run their parallel regions on an OpenMP team of the thread that calls them;
every thread that calls them gets a team of its own. libgomp (the OpenMP of PyTorch's Linux wheels)
stops spin-waiting between parallel regions once it manages more threads than there are cores,
and a ViT forward is hundreds of short regions. The server runs torch on its model thread and on
its decoding threads. This script times one batch-1 ViT-S/16 forward (random weights) in the
situations that decide it: on the main thread alone; beside a live thread that has run torch
(its own team); beside a live thread whose OpenMP regions were limited to one thread
(omp_set_num_threads(1) in that thread, through the loaded OpenMP library); and on a second thread.
Last, in a fresh process whose main thread never runs torch (as `dino3 serve` runs now): on a second
thread, the model loaded on a thread that ended, alone and beside two limited decoding threads.
Linux only (it finds the OpenMP library in /proc/self/maps).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from common import save_section


def openmp_library() -> ctypes.CDLL:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if re.search(r"lib(g|i)?omp[^/]*\.so", line):
            return ctypes.CDLL(line.split()[-1])
    raise SystemExit("no OpenMP library loaded in this process")


class Decoder:
    """A live thread that has run torch ops the way the server's decoding does, then waits."""

    def __init__(self, single: bool, omp: ctypes.CDLL) -> None:
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(single, omp))
        self.thread.start()
        self.ready.wait()

    def _run(self, single: bool, omp: ctypes.CDLL) -> None:
        if single:
            torch.get_num_threads()  # ATen sets this thread's OpenMP threads on first use: after that
            omp.omp_set_num_threads(1)
        image = torch.randint(0, 255, (1, 3, 900, 900), dtype=torch.uint8)
        for _ in range(3):
            torch.nn.functional.interpolate(image.float() / 255, size=(224, 224), mode="bicubic", antialias=True)
        self.ready.set()
        self.stop.wait()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def forward_ms(model, pixels, reps: int, on_thread: bool = False) -> float:
    out: list[float] = []

    def run() -> None:
        with torch.inference_mode():
            model(pixels)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                model(pixels)
                times.append(time.perf_counter() - start)
        out.append(statistics.median(times) * 1000)

    if on_thread:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    else:
        run()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    parser.add_argument("--fresh", metavar="CHECKPOINT", help=argparse.SUPPRESS)  # the child process's rows
    args = parser.parse_args()

    import dino3
    from dino3.cli import main as cli

    if args.fresh:
        fresh_process(args.fresh, args.reps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cli(["init-random", "vits16", str(Path(tmp) / "vits16")])
        model = dino3.load(Path(tmp) / "vits16")
        command = [sys.executable, __file__, "--fresh", str(Path(tmp) / "vits16"), "--reps", str(args.reps)]
        fresh = json.loads(subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout)
    pixels = torch.randn(1, 3, 224, 224)
    omp = openmp_library()
    rows = [("main thread, alone", forward_ms(model, pixels, args.reps))]
    for single, name in ((False, "its own team"), (True, "regions limited to one thread")):
        decoder = Decoder(single, omp)
        rows.append((f"main thread, beside a live decoding thread ({name})", forward_ms(model, pixels, args.reps)))
        rows.append((f"a second thread, beside it ({name})", forward_ms(model, pixels, args.reps, on_thread=True)))
        decoder.close()
    rows.append(("main thread, alone again", forward_ms(model, pixels, args.reps)))
    rows += fresh  # as `dino3 serve` runs now

    lines = [
        f"One batch-1 ViT-S/16 forward, 224 px, median of {args.reps} ({platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, dino3 {dino3.__version__}):",
        "",
        "| where the forward runs | ms |",
        "|---|---|",
        *[f"| {name} | {ms:.1f} |" for name, ms in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("OpenMP teams and the server's forward", text)


def fresh_process(checkpoint: str, reps: int) -> None:
    """In a process whose main thread never runs torch, as `dino3 serve` now is: the model loaded on
    a thread that ends, the forwards on a second thread; prints the rows as JSON."""
    import dino3
    from dino3._openmp import on_passing_thread

    model = on_passing_thread(dino3.load, checkpoint)
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32))
    rows = [("a second thread, the model loaded on a thread that ended", forward_ms(model, pixels, reps, True))]
    decoders = [Decoder(True, openmp_library()) for _ in range(2)]
    name = "the same, beside two live decoding threads (regions limited to one thread)"
    rows.append((name, forward_ms(model, pixels, reps, on_thread=True)))
    for decoder in decoders:
        decoder.close()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
