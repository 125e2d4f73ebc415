"""`dino3 serve` under load, on loopback: throughput and latency at several concurrencies, next to the
in-process pipeline on the same images.

    python benchmarks/serve.py            # prints the table; --save puts it in RESULTS.md

A real server process (`dino3 serve`, ViT-S/16 with random weights, --max-batch 32, --max-wait-ms 10)
on 127.0.0.1; clients in this process (threads with httpx) send one image per request, a JPEG photo
as a data URL, for --seconds at each concurrency (bounded in time and count). The in-process row is
`dino3.pipeline` at batch 32 over the same images, decoding included. The latency goal at
concurrency 1 is one forward (batch 1, measured here) + max-wait + 20 ms.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from common import save_section
from preprocess import make_jpegs

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_level(url: str, bodies: list[dict], concurrency: int, seconds: float, limit: int) -> dict:
    """Clients in threads, each sending requests back to back for `seconds` (at most `limit` in all)."""
    import httpx

    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.perf_counter() + seconds
    sent = [0]

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            i = k
            while time.perf_counter() < deadline:
                with lock:
                    if sent[0] >= limit:
                        return
                    sent[0] += 1
                start = time.perf_counter()
                response = http.post(f"{url}/v1/embeddings", json=bodies[i % len(bodies)])
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                i += concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "images/s": len(latencies) / wall,
        "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000 if latencies else float("nan"),
        "errors": errors[0],
        "requests": len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = parser.parse_args()

    import httpx

    import dino3
    from dino3.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        photos.mkdir()
        paths = make_jpegs(photos, 64)
        for path in paths:  # what a client sends a service: a 224 px JPEG (the shipped photos are larger)
            Image.open(path).resize((224, 224), Image.Resampling.BICUBIC).save(path, quality=92)
        checkpoint = tmp / "vits16"
        cli(["init-random", "vits16", str(checkpoint)])
        bodies = [{"input": ["data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()]} for p in paths]

        # one forward at batch 1, first: before any other thread of this process has run torch (see
        # benchmarks/threads.py); then the in-process pipeline on the same images
        model = dino3.load(checkpoint)
        x = dino3.DINOv3ViTImageProcessor.for_model(model).pixels(str(paths[0]))[None]  # (1, 3, 224, 224)
        with torch.inference_mode():
            model(x)
            start = time.perf_counter()
            for _ in range(10):
                model(x)
        forward_ms = (time.perf_counter() - start) / 10 * 1000
        del model
        pipe = dino3.pipeline(model=checkpoint, batch_size=32, workers=2)
        pipe([str(p) for p in paths], pool=True)
        start = time.perf_counter()
        pipe([str(p) for p in paths], pool=True)
        in_process = len(paths) / (time.perf_counter() - start)
        del pipe

        port = free_port()
        command = [sys.executable, "-m", "dino3.cli", "serve", "-m", str(checkpoint), "--port", str(port)]
        command += ["--max-batch", "32", "--max-wait-ms", "10", "--max-queue", "1024"]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            load_level(url, bodies, 4, 3.0, 200)  # warm-up
            levels = [int(v) for v in args.levels.split(",")]
            results = {c: load_level(url, bodies, c, args.seconds, 5000) for c in levels}
        finally:
            server.terminate()
            server.wait(timeout=60)

    goal_ms = forward_ms + 10 + 20
    lines = [
        f"`dino3 serve` on loopback ({os.cpu_count()} cores shared by server and clients; torch "
        f"{torch.__version__}, dino3 {dino3.__version__}): ViT-S/16 (random weights), --max-batch 32, "
        f"--max-wait-ms 10; one 224 px JPEG per request, {args.seconds:.0f} s per level. In-process "
        f"pipeline (batch 32, decoding included) on the same images: {in_process:.1f} images/s; one forward at "
        f"batch 1: {forward_ms:.1f} ms, so the latency goal at concurrency 1 is p99 <= {goal_ms:.0f} ms.",
        "",
        "| concurrency | images/s | of in-process | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
        *[
            f"| {c} | {r['images/s']:.1f} | {r['images/s'] / in_process:.0%} | {r['p50']:.0f} | {r['p99']:.0f} | "
            f"{r['errors']} |"
            for c, r in results.items()
        ],
    ]
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("Serving", text)


if __name__ == "__main__":
    main()
