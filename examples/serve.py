"""dino3 serve on the example photos: a server with an index, asked for embeddings, a PCA picture
and the nearest photos, as a client would over HTTP.

    python examples/serve.py [MODEL]          # MODEL defaults to vits16
    python examples/serve.py [MODEL] --keep   # then stays up: open the printed address in a browser

Builds an index of the example photos (out/serve-demo/photos.index), starts the service on a free
port of 127.0.0.1 (uvicorn in this process), asks POST /v1/embeddings, /v1/pca and /v1/search, and
stops. Without access to Meta's gated weights it uses the same architecture with RANDOM weights.
Needs the serve and index extras: pip install "dino3[serve,index]".
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path

from demo import random_checkpoint  # examples/demo.py: the same random-weights fallback

import dino3
import dino3.index
from dino3.errors import HubAccessError

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"


def main(model: str = "vits16", keep: bool = False) -> int:
    import uvicorn

    from dino3.serve import ServeSettings, create_app

    out = ROOT / "out" / "serve-demo"
    try:
        dino3.load_config(model)  # config.json is gated like the weights: a quick test of access
    except HubAccessError as e:
        print(f"no access to the gated DINOv3 weights ({str(e).split('. ')[0]}); using RANDOM weights", file=sys.stderr)
        model = str(random_checkpoint(model, ROOT / "out" / f"{model}-random"))
    shutil.rmtree(out, ignore_errors=True)
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
    dino3.index.build([str(p) for p in photos], model=model, folder=out / "photos.index", progress=False)

    app = create_app(dino3.load(model), ServeSettings(max_batch=16), index=dino3.index.open(out / "photos.index"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    image = "data:image/jpeg;base64," + base64.b64encode((PHOTOS / "rocket.jpg").read_bytes()).decode()
    embedded = post(url + "/v1/embeddings", {"input": [image], "pool": "cls"})
    print(f"POST /v1/embeddings: {len(embedded['data'][0]['embedding'])} numbers for rocket.jpg")
    pca = post(url + "/v1/pca", {"input": image})
    (out / "rocket_pca.png").write_bytes(base64.b64decode(pca["image"].split(",", 1)[1]))
    print(f"POST /v1/pca: a {pca['grid'][0]} x {pca['grid'][1]} patch picture, saved to {out / 'rocket_pca.png'}")
    found = post(url + "/v1/search", {"input": [image], "k": 3})
    for neighbour in found["data"][0]["neighbors"]:
        print(f"POST /v1/search: {neighbour['score']:.4f}  {Path(neighbour['path']).name}")
    if keep:
        print(f"serving {url} (the page: pick a photo); Ctrl-C stops", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            thread.join()
    server.should_exit = True
    thread.join(30)
    return 0


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--keep"]
    sys.exit(main(*arguments[:1], keep="--keep" in sys.argv))
