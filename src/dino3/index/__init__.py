"""Similar images and near-duplicates: an index of DINOv3 embeddings on disk.

    import dino3.index
    dino3.index.build(["photos/"], model="vits16", folder="photos.index")   # embeds every image
    index = dino3.index.open("photos.index")
    index.search("query.jpg", k=10)        # [{"query": ..., "neighbors": [{"path", "score"}, ...]}]
    index.add(["photos/"])                 # new and changed images only; files gone are dropped
    index.dedup(threshold=0.95)            # {"groups": [{"paths", "scores"}, ...], "histogram": ...}
    len(index)
    index.refresh()                        # see changes made on disk since (a long-lived reader, a server)
    dino3.index.load_picture(path)         # what an indexed path shows (an image, or a video's frame)

The command line: `dino3 index build|add|info`, `dino3 search`, `dino3 dedup` (dino3.cli.index).
Reading, search and dedup are in index.py; building and adding in update.py; keeping the index fast
after a change in maintenance.py; the layout on disk in store.py, the exact search in exact.py, the
approximate one in ann.py, vector helpers in vectors.py, contact sheets and pictures in report.py.
"""

from __future__ import annotations

from .index import Index
from .index import open_index as open  # noqa: A001  (dino3.index.open(DIR), as the issue asks)
from .report import load_picture
from .store import Entry
from .update import Update, build

__all__ = ["Entry", "Index", "Update", "build", "load_picture", "open"]
