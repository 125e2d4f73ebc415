"""Compiled runtimes kept per image size, each called by one thread at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class PerSize:
    """Runtimes compiled for one image size each (the batch stays dynamic): with the height and width
    fixed, the RoPE tables and shapes fold into constants, about 10% faster than a fully dynamic
    graph. The most recent few are kept; `use` runs one call at a time per size."""

    KEEP = 8

    def __init__(self, make: Callable[[int, int], Any]) -> None:
        self.make = make
        self.compiled: dict[tuple[int, int], tuple[Any, threading.Lock]] = {}
        self.lock = threading.Lock()

    def use(self, height: int, width: int, call: Callable[[Any], Any]):
        key = (int(height), int(width))
        with self.lock:
            entry = self.compiled.pop(key, None)
            if entry is None:
                entry = (self.make(*key), threading.Lock())
            self.compiled[key] = entry
            while len(self.compiled) > self.KEEP:
                self.compiled.pop(next(iter(self.compiled)))
        runtime, lock = entry
        with lock:
            return call(runtime)
