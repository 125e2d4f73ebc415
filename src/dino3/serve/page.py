"""The service's web page: GET / (pick or drop an image, see its PCA picture; with an index, its
nearest indexed images; with a detector, its anomaly map and score; with a dino.txt model and an
index of its image embeddings, a text search box), POST /v1/pca (the picture the page shows) and GET
/v1/info (what the page offers).

The page is three static files (static/), no build step and no third-party script; it reads the
API with the key the user types when the server asks for one. Names from the index are shown as
text, never as HTML.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from .service import ApiError, Service, parse, png_data_url

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

    processor = DINOv3ViTImageProcessor.for_model(  # the backbone's patches (a dino.txt model's too)
        service.backbone, keep_aspect="longer", target_size=PCA_SIDE, fit="resize"
    )

    @app.get("/", summary="The web page", include_in_schema=False)
    async def page():
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise ApiError(404, f"no such file: {name}")
        return Response(_static(name), media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get("/v1/info", summary="What this server serves: the model, the index, the detector")
    async def info():
        index, detector = service.extras.get("index"), service.extras.get("detector")
        return {
            "model": service.name,
            "feature_dim": _feature_dim(service),
            "texts": service.texts,  # a dino.txt model: /v1/embeddings takes texts, and a text index texts too
            "index": None if index is None else {"size": len(index), "pool": index.settings["pool"]},
            "detector": None
            if detector is None
            else {"shots": len(detector.shots), "threshold": detector.threshold, "bank": len(detector.bank)},
        }

    @app.post("/v1/pca", summary="The PCA picture of an image's patch features (a PNG data URL)")
    async def pca(request: Request):
        from ..dense import pca_rgb
        from ..dense.render import colour_map

        payload = await parse(request, PcaRequest, service.settings)
        sources, names, _ = await service.inputs([payload.input])
        pixels = await service.pixels(sources, names, processor)
        (grid,) = await service.features(pixels, "patches")  # (h, w, D)
        height, width = pixels[0].shape[-2:]

        def render():  # off the event loop, on a decoding thread
            rgb = pca_rgb(grid.float())  # (h, w, 3) in [0, 1]
            return colour_map(rgb, (int(height), int(width)))  # each patch a block of whole pixels

        picture = await service.submit(service.decoders, render)
        return {"object": "pca", "grid": list(grid.shape[:2]), "image": png_data_url(picture)}


def _feature_dim(service: Service) -> int:
    """The width of the vectors /v1/embeddings gives by default (dino.txt: its joint space's)."""
    config = service.model.config
    return int(config.embed_dim if service.texts else config.feature_dim)


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()
