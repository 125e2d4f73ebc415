"""The service's web page: GET / (pick or drop an image, see its PCA picture and, with an index,
its nearest indexed images), POST /v1/pca (the picture the page shows) and GET /v1/info.

The page is three static files (static/), no build step and no third-party script; it reads the
API with the key the user types when the server asks for one. Names from the index are shown as
text, never as HTML.
"""

from __future__ import annotations

import base64
import io
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from .service import ApiError, Service, parse

PCA_SIDE = 448  # the longer side the PCA picture is computed at: a 28-patch grid for /16 models
STATIC = {"page.js": "text/javascript", "page.css": "text/css"}
PAGE_HEADERS = {  # the page runs only its own script and shows only its own and the API's pictures
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
PUBLIC_ROUTES = ("/", "/static/page.js", "/static/page.css")  # the page itself holds no data


class PcaRequest(BaseModel):
    input: str


def add_page_routes(app: FastAPI, service: Service) -> None:
    from ..processing import DINOv3ViTImageProcessor

    processor = DINOv3ViTImageProcessor.for_model(
        service.model, keep_aspect="longer", target_size=PCA_SIDE, fit="resize"
    )

    @app.get("/", summary="The web page", include_in_schema=False)
    async def page():
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise ApiError(404, f"no such file: {name}")
        return Response(_static(name), media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get("/v1/info", summary="What this server serves: the model, the index")
    async def info():
        index = service.extras.get("index")
        return {
            "model": service.name,
            "feature_dim": int(service.model.config.feature_dim),
            "index": None if index is None else {"size": len(index), "pool": index.settings["pool"]},
        }

    @app.post("/v1/pca", summary="The PCA picture of an image's patch features (a PNG data URL)")
    async def pca(request: Request):
        from ..dense import pca_rgb
        from ..dense.render import colour_map

        payload = await parse(request, PcaRequest, service.settings)
        sources, names = await service.inputs([payload.input])
        pixels = await service.pixels(sources, names, processor)
        (grid,) = await service.features(pixels, "patches")  # (h, w, D)
        height, width = pixels[0].shape[-2:]

        def render():  # off the event loop, on a decoding thread
            rgb = pca_rgb(grid.float())  # (h, w, 3) in [0, 1]
            return colour_map(rgb, (int(height), int(width)))  # each patch a block of whole pixels

        picture = await service.submit(service.decoders, render)
        return {"object": "pca", "grid": list(grid.shape[:2]), "image": _png_data_url(picture)}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _png_data_url(picture) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
