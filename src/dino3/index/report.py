"""Contact sheets: search results and duplicate groups as one HTML file that opens without a server,
and `load_picture`, what an indexed path shows (an image file, or a video frame from its video).

Thumbnails are embedded as JPEG data URLs (the page can be moved or mailed on its own); an image on
the web is linked by its URL. An image that cannot be read shows its name and the reason instead.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from ..fetch import is_url

THUMBNAIL = 160  # pixels, the longer side
MAX_GROUPS = 500  # groups shown on a dedup page (the JSON has them all)
MAX_MEMBERS = 60  # images shown per group

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1em; margin: 1.5em 0 0.4em; word-break: break-all; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; width: 170px; font-size: 0.75em; }
figure img { max-width: 160px; max-height: 160px; display: block; border: 1px solid #ccc; }
figure.query img { border: 3px solid #36c; }
figcaption { word-break: break-all; } .score { font-weight: bold; } .missing { color: #a00; }
"""


class Thumbnails:
    """Each image's thumbnail as an <img> source, made once per page."""

    def __init__(self, size: int = THUMBNAIL) -> None:
        self.size = size
        self.made: dict[str, tuple[str | None, str | None]] = {}

    def source(self, path: str) -> tuple[str | None, str | None]:
        """(src, None), or (None, why not)."""
        if path not in self.made:
            self.made[path] = self._make(path)
        return self.made[path]

    def _make(self, path: str) -> tuple[str | None, str | None]:
        if is_url(path):
            return path, None
        from ..errors import ImageError
        from ..images import make_thumbnail

        try:
            picture = make_thumbnail(load_picture(path, draft_size=(self.size, self.size)), self.size, quality=80)
        except ImageError as e:
            return None, str(e)
        return "data:image/jpeg;base64," + base64.b64encode(picture).decode("ascii"), None


def load_picture(path: str, *, draft_size: tuple[int, int] | None = None, max_pixels: int | None = None):
    """What an indexed path shows, as a (3, H, W) tensor: its image file, or, for a video frame
    (`clip.mp4#t=12.480`, see dino3.video), that frame decoded from its video. For thumbnails of
    indexed images (contact sheets, the server's); an ImageError (VideoError) says why not."""
    from ..images import load_image
    from ..video import frame_sources

    with frame_sources([path]) as (source,):
        return load_image(source, draft_size=draft_size, max_pixels=max_pixels)


def _figure(thumbs: Thumbnails, path: str, caption: str, css: str = "") -> str:
    src, why = thumbs.source(path)
    name = html.escape(path)
    picture = (
        f'<img src="{html.escape(src)}" alt="{name}" loading="lazy">'
        if src
        else f'<div class="missing">{html.escape(why or "")}</div>'
    )
    return f'<figure class="{css}" title="{name}">{picture}<figcaption>{caption}<br>{name}</figcaption></figure>'


def _page(title: str, body: list[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def search_page(results: list[dict[str, Any]], title: str = "dino3 search") -> str:
    thumbs = Thumbnails()
    body = []
    for result in results:
        query = str(result["query"])
        figures = [_figure(thumbs, query, "query", "query")] if _is_image_path(query) else []
        for neighbour in result["neighbors"]:
            score = f'<span class="score">{neighbour["score"]:.4f}</span>'
            figures.append(_figure(thumbs, neighbour["path"], score))
        body.append(f'<h2>{html.escape(query)}</h2><div class="row">{"".join(figures)}</div>')
    return _page(title, body)


def dedup_page(result: dict[str, Any], title: str = "dino3 dedup") -> str:
    thumbs = Thumbnails()
    groups = result["groups"]
    body = [f"<p>{len(groups)} groups of near-duplicates at cosine &ge; {result['threshold']}.</p>"]
    for number, group in enumerate(groups[:MAX_GROUPS], 1):
        figures = [
            _figure(thumbs, path, f'<span class="score">{score:.4f}</span>', "query" if i == 0 else "")
            for i, (path, score) in enumerate(zip(group["paths"][:MAX_MEMBERS], group["scores"]))
        ]
        more = len(group["paths"]) - MAX_MEMBERS
        note = f"<p>... and {more} more (in the JSON)</p>" if more > 0 else ""
        size = len(group["paths"])
        body.append(
            f"<h2>group {number}: {size} images (scores: cosine to the first)</h2>"
            f'<div class="row">{"".join(figures)}</div>{note}'
        )
    if len(groups) > MAX_GROUPS:
        body.append(f"<p>... and {len(groups) - MAX_GROUPS} more groups (in the JSON)</p>")
    return _page(title, body)


def _is_image_path(query: str) -> bool:
    import os

    return is_url(query) or os.path.isfile(query)
