"""The similarity index: build time, memory, search latency and throughput, recall, dedup and `add`,
on synthetic clustered vectors; and the measurement that chose its approximate-search library.

    python benchmarks/index.py                      # 1M x 384 and 200k x 1024; --save: RESULTS.md
    python benchmarks/index.py --sizes 100000x384 --compare 50000 --add-size 20000   # a quick run

Data: unit vectors in `dim` dimensions lying near a random 64-dimensional subspace, in clusters of
about 100 (Gaussian, spread equal to the centres' scale), plus isotropic noise (0.3 of the norm);
1% of them are near-copies of another one (cosine ~0.99), for dedup to find. Queries are 1,000
further vectors from the same clusters, none of them in the index. Recall@10 is measured against
the exact search over the same index.

Rows:
- "library choice": FAISS HNSW as dino3 builds it (M=32, efConstruction=40), FAISS IVF-Flat
  (2 sqrt(N) cells) and usearch HNSW (f32, connectivity 16, expansion_add 128), each searched with
  the smallest setting that reaches recall 0.95 on the queries; one query at a time, on all threads.
- dino3's index at each size: building it from vectors (vector file, SQLite rows, FAISS index),
  peak memory of the process while building, disk size, opening it, single-query latency (p50 and
  p99 over the queries, `Index.nearest` and `Index.search` with paths) and batched queries/s, for
  the exact and the approximate search; recall@10 of the approximate one; dedup of the whole index.
- `add` of 10 photos to an index of `--add-size` images (files on disk: hard links to one photo)
  with the ViT-S/16 architecture (random weights): the whole `Index.add` (checking every indexed
  file, embedding the 10, the transaction), against `dino3 embed` of the same 10 photos.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from common import save_section

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parent / "examples" / "images"
RANK, CLUSTER_SIZE, SPREAD, NOISE, DUPLICATES = 64, 100, 1.0, 0.3, 0.01


# -- data ---------------------------------------------------------------------------------------------------
def clustered(count: int, dim: int, queries: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(count, dim) index vectors and (queries, dim) query vectors, unit length (see the docstring)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, RANK)))[0].T.astype(np.float32)  # (RANK, dim)
    centres = rng.standard_normal((max(1, count // CLUSTER_SIZE), RANK)).astype(np.float32)
    total = count + queries
    out = np.empty((total, dim), np.float32)
    for start in range(0, total, 100_000):
        n = min(100_000, total - start)
        z = centres[rng.integers(0, len(centres), n)] + SPREAD * rng.standard_normal((n, RANK), dtype=np.float32)
        part = z @ basis / np.sqrt(RANK * (1 + SPREAD**2))  # norm ~1
        part += NOISE * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)  # norm ~NOISE
        out[start : start + n] = part
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    vectors, query = out[:count], out[count:]
    copies = int(DUPLICATES * count)  # the last 1%: near-copies of others (cosine ~0.997)
    originals = rng.choice(count - copies, copies, replace=False)
    noise = 0.08 * rng.standard_normal((copies, dim), dtype=np.float32) / np.sqrt(dim)
    vectors[count - copies :] = vectors[originals] + noise
    vectors[count - copies :] /= np.linalg.norm(vectors[count - copies :], axis=1, keepdims=True)
    return vectors, query


# -- measuring ----------------------------------------------------------------------------------------------
def rss_mb() -> float:
    return _status("VmRSS")


def peak_mb() -> float:
    return _status("VmHWM")


def reset_peak() -> None:
    with contextlib.suppress(OSError):  # Linux: the peak (VmHWM) starts again from the current size
        Path("/proc/self/clear_refs").write_text("5")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def latencies(run, queries: np.ndarray) -> tuple[float, float]:
    """p50 and p99 milliseconds of one query at a time."""
    run(queries[:1])
    times = []
    for q in queries:
        start = time.perf_counter()
        run(q[None])
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, truth)]))


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


# -- the library choice -------------------------------------------------------------------------------------
CHOICE_TEXT = (
    "Why FAISS's HNSW for the approximate search (measured below, on the same data): on clustered vectors of "
    "realistic intrinsic dimension an IVF index must scan a large part of the vectors to reach recall 0.95, so "
    "its queries are tens of times slower than HNSW's at that recall; FAISS's HNSW built faster than usearch's "
    "here and searched faster; it keeps the full vectors, so its scores are exact cosines, the same as the "
    "exact search's. It cannot remove a vector: dino3 filters removed items out of every search (an ID "
    "selector) and builds the graph again once a quarter of it is removed. LanceDB was not measured (not "
    "installed here)."
)


def compare_libraries(count: int, dim: int) -> list[str]:
    import faiss
    import usearch
    from usearch.index import Index as UsearchIndex

    from dino3.index.ann import HNSW

    vectors, queries = clustered(count, dim, seed=1)
    ids = np.arange(count, dtype=np.int64)
    truth = exact_truth(vectors, queries)
    rows = []

    start = time.perf_counter()
    graph = HNSW.build(vectors, ids)
    built = time.perf_counter() - start
    setting, found, run = tune(lambda ef: lambda q: graph.search(q, 10, ef=ef), queries, truth)
    label = f"efSearch {setting} (calibrated: {graph.ef_search})"
    rows.append(("FAISS HNSW-Flat, M=32 (dino3's)", built, label, recall(found, truth), *latencies(run, queries)))

    start = time.perf_counter()
    nlist = int(round(2 * np.sqrt(count)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors[np.random.default_rng(0).choice(count, min(count, 64 * nlist), replace=False)])
    ivf.add(vectors)
    built = time.perf_counter() - start
    setting, found, run = tune(
        lambda p: lambda q: ivf.search(q, 10, params=faiss.SearchParametersIVF(nprobe=p)), queries, truth, start=1
    )
    label = f"nprobe {setting} of {nlist}"
    rows.append(("FAISS IVF-Flat", built, label, recall(found, truth), *latencies(run, queries)))

    start = time.perf_counter()
    index = UsearchIndex(ndim=dim, metric="ip", dtype="f32", connectivity=16, expansion_add=128)
    index.add(ids, vectors)
    built = time.perf_counter() - start

    def usearch_run(ef):
        def run(q):
            index.expansion_search = ef
            return None, index.search(q, 10).keys

        return run

    setting, found, run = tune(usearch_run, queries, truth)
    name = "usearch HNSW f32, connectivity 16"
    rows.append((name, built, f"expansion {setting}", recall(found, truth), *latencies(run, queries)))

    lines = [
        CHOICE_TEXT,
        "",
        f"Library choice, {count:,} x {dim} vectors (faiss-cpu {faiss.__version__}, usearch {usearch.__version__}); "
        "each searched with the smallest setting (powers of 2) that reaches recall@10 0.95 on the 1,000 queries; "
        "latency of one query at a time:",
        "",
        "| library | build s | setting | recall@10 | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, built, setting, rec, p50, p99 in rows:
        lines.append(f"| {name} | {built:.1f} | {setting} | {rec:.3f} | {p50:.2f} | {p99:.2f} |")
    return lines


def tune(make_run, queries, truth, start: int = 16):
    """The smallest search setting (a power of 2 from `start` to 1024) whose recall@10 reaches 0.95."""
    setting = start
    while True:
        run = make_run(setting)
        found = np.vstack([run(queries[i : i + 100])[1] for i in range(0, len(queries), 100)])
        if recall(found, truth) >= 0.95 or setting >= 1024:
            return setting, found, run
        setting *= 2


def exact_truth(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    from dino3.index.exact import top_k

    return top_k(queries, [(vectors, np.arange(len(vectors)), None)], 10)[1]


# -- dino3's index at one size ------------------------------------------------------------------------------
def index_rows(count: int, dim: int, work: Path) -> dict:
    """Build an index of `count` x `dim` vectors here; measure searching it in a fresh process."""
    from dino3.index import update as update_module
    from dino3.index.store import Entry

    started = time.perf_counter()
    vectors, queries = clustered(count, dim)
    made = time.perf_counter() - started
    folder = work / f"index-{count}x{dim}"
    np.save(work / "queries.npy", queries)
    settings = {"model": "synthetic", "model_identity": {}, "pool": "cls", "processor": {}, "calibration_paths": None}
    rows = [Entry(0, synthetic_path(i), 100_000, 1_700_000_000 * 10**9, "0" * 64, (14, 14)) for i in range(count)]
    base = rss_mb()
    reset_peak()
    start = time.perf_counter()
    update_module._create(folder, settings, rows, vectors)
    out = {"count": count, "dim": dim, "data_s": made, "build_s": time.perf_counter() - start}
    out["build_peak_mb"] = peak_mb() - base
    del rows, vectors
    command = [sys.executable, __file__, "--measure", str(folder), str(work / "queries.npy"), str(count)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    out.update(json.loads(result.stdout.strip().splitlines()[-1]))
    shutil.rmtree(folder)
    return out


def synthetic_path(i: int) -> str:
    return f"/photos/{i // 1000:04d}/{i:08d}.jpg"


def measure(folder: Path, queries_file: Path, count: int) -> dict:
    """Open an index and search it (run in a fresh process, for clean memory figures)."""
    import dino3.index

    queries = np.load(queries_file)
    base = rss_mb()
    start = time.perf_counter()
    index = dino3.index.open(folder)
    out = {"open_s": time.perf_counter() - start}
    start = time.perf_counter()
    index.nearest(queries[:1], 10, exact=False)  # reads the FAISS index, adds what came after it
    out["load_ann_s"] = time.perf_counter() - start
    out["search_rss_mb"] = rss_mb() - base
    out["disk_mb"] = folder_mb(folder)
    ann = index.info()["approximate_index"]
    out["ann"] = f"HNSW, ef_search {ann['ef_search']}" if ann else "none"

    start = time.perf_counter()
    _, truth = index.nearest(queries, 10, exact=True)
    out["exact_batch_qps"] = len(queries) / (time.perf_counter() - start)
    out["exact_p50"], out["exact_p99"] = latencies(lambda q: index.nearest(q, 10, exact=True), queries[:100])
    start = time.perf_counter()
    _, found = index.nearest(queries, 10, exact=False)
    out["ann_batch_qps"] = len(queries) / (time.perf_counter() - start)
    out["ann_p50"], out["ann_p99"] = latencies(lambda q: index.nearest(q, 10, exact=False), queries)
    out["search_p50"], out["search_p99"] = latencies(lambda q: index.search(q, 10, exact=False), queries)
    out["recall"] = recall(found, truth)

    reset_peak()
    base = rss_mb()
    start = time.perf_counter()
    result = index.dedup(0.95)
    out["dedup_s"] = time.perf_counter() - start
    out["dedup_peak_mb"] = peak_mb() - base
    out["dedup_groups"] = len(result["groups"])
    out["dedup_exact"] = result["exact"]
    copies = int(DUPLICATES * count)
    grouped = {p for g in result["groups"] for p in g["paths"]}
    out["dedup_planted"] = sum(synthetic_path(i) in grouped for i in range(count - copies, count)) / max(1, copies)
    index.close()
    return out


# -- add of 10 photos ---------------------------------------------------------------------------------------
def add_rows(count: int, work: Path) -> dict:
    import dino3.embed
    import dino3.index
    from dino3.cli import main
    from dino3.embed.store import input_stat
    from dino3.index import update as update_module
    from dino3.index.store import Entry

    model = work / "vits16-random"
    main(["init-random", "vits16", str(model)])
    new = work / "new"
    new.mkdir()
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))[:9]
    for p in photos:
        shutil.copy(p, new / p.name)
    from PIL import Image

    Image.open(PHOTOS / "horse.png").rotate(90).save(new / "horse_rotated.png")

    probe = work / "probe.npz"
    dino3.embed.run([str(new / photos[0].name)], model=str(model), output=probe, progress=False)
    settings = update_module._settings(dino3.embed.read_embeddings(probe).meta)
    links = work / "indexed"
    links.mkdir()
    paths, rows = [], []
    for i in range(count):
        if i % 50_000 == 0:  # a file system allows ~65,000 links to one file: a new source every 50,000
            source = links / f"photo-{i // 50_000}.jpg"
            shutil.copy(PHOTOS / "rocket.jpg", source)
            size, mtime = input_stat(str(source))
        path = links / f"{i // 1000:03d}-{i:06d}.jpg"
        os.link(source, path)
        paths.append(str(path))
        rows.append(Entry(0, str(path), size, mtime, "0" * 64, (14, 14)))
    vectors, _ = clustered(count, 384, queries=1, seed=3)
    folder = work / "add-index"
    update_module._create(folder, settings, rows, vectors)

    index = dino3.index.open(folder)
    start = time.perf_counter()
    update = index.add([str(new)], progress=False)
    add_s = time.perf_counter() - start
    assert update.embedded == 10 and update.count == count + 10, update
    found = index.search(str(new / "horse_rotated.png"), k=1)[0]["neighbors"][0]
    assert found["path"] == str(new / "horse_rotated.png"), found

    times = []
    for attempt in range(2):
        start = time.perf_counter()
        dino3.embed.run([str(new)], model=str(model), output=work / f"ten-{attempt}.npz", progress=False)
        times.append(time.perf_counter() - start)
    embed_s = min(times)
    return {"count": count, "add_s": add_s, "embed_s": embed_s, "approximate": index.approximate}


# -- main ---------------------------------------------------------------------------------------------------
INDEX_TEXT = (
    "dino3's index. Build: from vectors in memory to the index on disk (vector file, SQLite rows, FAISS index "
    "trained and calibrated); its peak is the memory it took beyond the vectors. Search, in a fresh process: "
    "memory after opening the index and reading its FAISS index; single queries (`Index.nearest`: the lookup; "
    "with paths: `Index.search` of a vector, paths read from SQLite); batches of 1,000 queries. Exact: float32 "
    "matrix products in tiles. Approximate: the FAISS HNSW graph that the index keeps beyond 20M floats."
)
INDEX_HEADER = [
    "vectors",
    "build s",
    "build peak MB",
    "disk MB",
    "open s, + FAISS s",
    "search memory MB",
    "exact p50 / p99 ms",
    "exact q/s",
    "approx. p50 / p99 ms",
    "with paths p50 / p99 ms",
    "approx. q/s",
    "recall@10",
    "FAISS index",
    "dedup at 0.95",
]


def index_cells(r: dict) -> list[str]:
    dedup = (
        f"{r['dedup_s']:.0f} s ({'exact' if r['dedup_exact'] else 'approx.'}), {r['dedup_groups']:,} groups, "
        f"{r['dedup_planted']:.1%} of the planted copies found, peak +{r['dedup_peak_mb']:.0f} MB"
    )
    return [
        f"{r['count']:,} x {r['dim']}",
        f"{r['build_s']:.0f}",
        f"{r['build_peak_mb']:.0f}",
        f"{r['disk_mb']:.0f}",
        f"{r['open_s']:.2f}, {r['load_ann_s']:.1f}",
        f"{r['search_rss_mb']:.0f}",
        f"{r['exact_p50']:.1f} / {r['exact_p99']:.1f}",
        f"{r['exact_batch_qps']:.0f}",
        f"{r['ann_p50']:.2f} / {r['ann_p99']:.2f}",
        f"{r['search_p50']:.2f} / {r['search_p99']:.2f}",
        f"{r['ann_batch_qps']:.0f}",
        f"{r['recall']:.3f}",
        r["ann"],
        dedup,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000x384,200000x1024", help="COUNTxDIM,... for dino3's index")
    parser.add_argument("--compare", type=int, default=200_000, help="vectors (384-d) for the library choice; 0: skip")
    parser.add_argument("--add-size", type=int, default=100_000, help="index size for the `add` row; 0: skip")
    parser.add_argument("--save", action="store_true", help="write the section of benchmarks/RESULTS.md")
    parser.add_argument("--measure", nargs=3, metavar=("FOLDER", "QUERIES", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), int(args.measure[2]))))
        return

    import faiss
    import torch

    import dino3

    started = time.perf_counter()
    lines = [
        f"Date: {date.today()}; {platform.machine()}, {os.cpu_count()} cores shared with other work, FAISS on "
        f"{faiss.omp_get_max_threads()} threads; Python {platform.python_version()}, numpy {np.__version__}, "
        f"faiss-cpu {faiss.__version__}, torch {torch.__version__}, dino3 {dino3.__version__}  ",
        f"Data: synthetic clustered unit vectors (rank-{RANK} clusters of ~{CLUSTER_SIZE}, isotropic noise {NOISE} "
        f"of the norm, {DUPLICATES:.0%} planted near-copies); 1,000 held-out queries; recall@10 against exact search.",
        "",
    ]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        if args.compare:
            lines += compare_libraries(args.compare, 384) + [""]
            print("\n".join(lines), flush=True)
        results = []
        for size in args.sizes.split(","):
            if size:
                count, dim = (int(v) for v in size.lower().split("x"))
                results.append(index_rows(count, dim, work))
                print(results[-1], flush=True)
        if results:
            lines += [INDEX_TEXT, "", "| " + " | ".join(INDEX_HEADER) + " |", "|" + "---|" * len(INDEX_HEADER)]
            lines += ["| " + " | ".join(index_cells(r)) + " |" for r in results]
            lines.append("")
        if args.add_size:
            add = add_rows(args.add_size, work)
            print(add, flush=True)
            lines.append(
                f"`add` of 10 photos to an index of {add['count']:,} (ViT-S/16, random weights, CPU): "
                f"{add['add_s']:.1f} s for the whole `Index.add` (checking the {add['count']:,} indexed files, loading "
                f"the model, embedding the 10, one transaction); `dino3 embed` of the same 10 photos: "
                f"{add['embed_s']:.1f} s. A rebuild would embed {add['count']:,} images."
            )
            lines.append("")
    minutes = (time.perf_counter() - started) / 60
    lines.append(f"This run took {minutes:.0f} minutes (`python benchmarks/index.py {' '.join(sys.argv[1:])}`).")
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("Similarity index", text)


if __name__ == "__main__":
    main()
