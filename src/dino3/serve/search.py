"""The service's similarity search, when it serves an index: POST /v1/search, and GET
/v1/thumbnails/{id}, small pictures of the indexed images read only from the files the index lists.

The queries are embedded exactly as the indexed images were (the index's processor and pool, the
served model, which must be the index's), batched with every other request's images. An index of a
dino.txt model's image embeddings (pool "text") is searched by texts too: plain strings are texts,
embedded by the model's text tower (as Index.search_text does), batched with other requests' texts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from ..errors import Dino3Error, StaleIndexError, UsageError
from .routes import input_list
from .service import TEXT, ApiError, Service, parse

THUMBNAIL_SIDES = (64, 512)  # the smallest and largest side a client may ask for


class SearchRequest(BaseModel):
    input: Any
    k: int = 10
    exact: bool | None = None  # None: the index's default


def attach_index(service: Service, index: Any) -> None:
    """Serve `index` beside the model: refused unless the model is the one the index was built with.
    The check runs the model (its fingerprint): on the model's thread, waited for here."""
    from ..processing import DINOv3ViTImageProcessor
    from ..recipe import Made, Recipe, check_model

    recipe = Recipe.from_meta(index.settings)
    made = Made(recipe, service.model, recipe.processor_for(service.model))
    # a UsageError that names the difference
    service.on_model_thread(check_model, index.settings, made, f"the index {index.folder}")
    service.extras["index"] = index
    service.extras["index_processor"] = DINOv3ViTImageProcessor.from_dict(index.settings["processor"])


def add_search_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings

    async def the_index() -> Any:
        """The served index as it is now on disk: one consistent build (index.refresh), checked again
        against the served model whenever it changed (a rebuild with another model: 503)."""
        index = service.extras.get("index")
        if index is None:
            raise ApiError(404, "this server holds no index: start it with --index DIR", code="no_index")
        if await asyncio.to_thread(index.refresh):
            try:
                await asyncio.to_thread(attach_index, service, index)  # waits for the model's thread
            except UsageError:
                service.extras.pop("index_processor", None)
                raise ApiError(
                    503,
                    f"the index {index.folder} was built again with another model than the one served: restart the "
                    "server with that model",
                    code="index_changed",
                ) from None
        return index

    async def reading(index: Any, read):
        """read(index) off the event loop; a rebuild landing meanwhile (StaleIndexError): once again."""
        try:
            return await asyncio.to_thread(read)
        except StaleIndexError:
            await the_index()
            try:
                return await asyncio.to_thread(read)
            except StaleIndexError:
                raise ApiError(503, "the index is being rebuilt; try again", code="index_changed") from None

    @app.post("/v1/search", summary="The indexed images nearest to each input image (or text, in a dino.txt index)")
    async def search(request: Request):
        index = await the_index()
        payload = await parse(request, SearchRequest, settings)
        if not 1 <= payload.k <= min(len(index), 1000):
            raise ApiError(400, f"k must lie in 1..{min(len(index), 1000)} (the index holds {len(index)})", "k")
        sources, names, texts = await service.inputs(input_list(payload.input), texts=True)
        pool = index.settings["pool"]
        if texts and pool != TEXT:
            raise ApiError(
                400,
                f"{names[min(texts)]} is a text; the index {index.folder} holds {pool!r} features, not a dino.txt "
                "model's image embeddings (pool 'text'), so texts cannot search it: build it with pool text",
                names[min(texts)],
            )
        vectors, _ = await service.embeddings(sources, names, texts, pool, service.extras["index_processor"])
        queries = [v.float().numpy() for v in vectors]  # each (D,)

        def nearest() -> list[dict[str, Any]]:
            import numpy as np

            return index.search(np.stack(queries), k=payload.k, exact=payload.exact)

        found = await reading(index, nearest)
        data = [{"object": "search_result", "index": i, "neighbors": r["neighbors"]} for i, r in enumerate(found)]
        return {"object": "list", "data": data, "model": service.name, "index_size": len(index)}

    @app.get("/v1/thumbnails/{item}", summary="A small JPEG of one indexed image (its id from a search)")
    async def thumbnail(item: int, size: int = 256):
        index = await the_index()
        if not THUMBNAIL_SIDES[0] <= size <= THUMBNAIL_SIDES[1]:
            raise ApiError(400, f"size must lie in {THUMBNAIL_SIDES[0]}..{THUMBNAIL_SIDES[1]}", "size")
        if not 0 <= item < 2**63:  # ids are SQLite integers: anything else names no item
            raise ApiError(404, f"the index holds no item {item}", "item")
        entry = await reading(index, lambda: index.entry(item))
        if entry is None:
            raise ApiError(404, f"the index holds no item {item}", "item")
        if entry.size < 0:
            raise ApiError(404, f"item {item} is a URL, not a file of the index's", "item")
        picture = await asyncio.to_thread(_thumbnail, entry.path, size, settings.max_pixels)
        return Response(picture, media_type="image/jpeg")


def _thumbnail(path: str, size: int, max_pixels: int) -> bytes:
    """The file at `path` (one the index lists, never a URL; a video frame decoded from its video)
    scaled to fit size x size, as JPEG bytes."""
    from ..fetch import is_data_url, is_object_uri, is_url
    from ..images import make_thumbnail
    from ..index import load_picture

    if is_url(path) or is_data_url(path) or is_object_uri(path):  # the server reads only local files
        raise ApiError(404, "this item is not a local file of the index's", "item")
    try:
        picture = load_picture(path, draft_size=(size, size), max_pixels=max_pixels)
        return make_thumbnail(picture, size, max_pixels=max_pixels)
    except (Dino3Error, OSError) as e:
        raise ApiError(404, f"the indexed file cannot be read now: {e}", "item") from None
