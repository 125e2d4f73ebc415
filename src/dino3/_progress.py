"""Progress bars on stderr for long work: tqdm's (huggingface_hub brings it), or none when asked for
none or when tqdm is missing. Libraries take `progress: bool`; commands pass `not args.quiet`."""

from __future__ import annotations

import sys
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int | None, description: str, unit: str = "img", show: bool = True, initial: int = 0) -> Any:
    """A bar with `update(n)` and `close()` (a context manager too); `total` None for an unknown count,
    `initial` what was done before (a resumed job)."""
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(
        total=total, initial=initial, unit=unit, desc=description, file=sys.stderr, smoothing=0.1, dynamic_ncols=True
    )
