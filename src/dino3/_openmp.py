"""One OpenMP team per process: helper threads run their torch ops on one thread.

PyTorch's CPU kernels run their parallel regions on an OpenMP team that belongs to the calling
thread; every thread that runs a large enough op gets a team of its own, parked until that thread
ends. libgomp (the OpenMP of PyTorch's Linux wheels) stops spin-waiting between parallel regions
once it manages more threads than there are cores, and a forward is hundreds of short regions: a
batch-1 ViT-S/16 forward takes a third to a half longer beside one other team
(benchmarks/threads.py). So the threads that decode and preprocess images call `helper_thread()`
first (one-thread torch ops while the model runs on the CPU), and the server loads its model
`on_passing_thread()`, so that the team the loading built ends with that thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def single_threaded() -> None:
    """From now on, torch's CPU ops on this thread run without an OpenMP team of their own."""
    import torch

    torch.get_num_threads()  # ATen sets a thread's OpenMP thread count on its first use: be after it
    library = _openmp_library()
    if library is not None:
        library.omp_set_num_threads(1)  # this thread's setting only (torch.set_num_threads is global)


def helper_thread() -> None:
    """Set up a thread that decodes or preprocesses beside a model: single_threaded(), unless this
    process drives a GPU (CUDA initialised), whose forwards use no OpenMP team, so that there the
    preprocessing keeps its multi-threaded ops."""
    import torch

    if not torch.cuda.is_initialized():
        single_threaded()


def on_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), run on a thread that ends with it (its OpenMP team ends too)."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001  (raised again on the calling thread)
            result.append((False, e))

    thread = threading.Thread(target=run, name="dino3-passing")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


@functools.cache
def _openmp_library() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (found in /proc/self/maps: Linux), or None."""
    import torch

    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    found = {line.split()[-1] for line in maps.read_text().splitlines() if re.search(r"/lib(g|i)?omp[^/]*\.so", line)}
    if not found:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    # torch's own copy first; then one that no other wheel bundled (FAISS brings a copy in faiss_cpu.libs/)
    path = sorted(found, key=lambda p: (not p.startswith(torch_dir), ".libs/" in p, p))[0]
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None
