"""Probes: the logistic-regression C sweep and the k-NN search, dino3 against scikit-learn and faiss.

    python benchmarks/probe.py            # prints a markdown table; --save puts it in RESULTS.md

The C sweep: 10,000 x 768 features (ViT-S/16's cls+mean width), 80% to fit and 20% held out, as
`dino3 probe train` splits them; Meta's 45 values of C, then the final fit on all 10,000 at the
chosen C. The features are synthetic (clusters around class centres plus a mean shared by all, as
DINOv3's features have one), since no real weights are reachable here. Peers on the same features:
scikit-learn's LogisticRegression(solver="lbfgs") run the same way (warm starts up the grid,
tol 1e-4, centred features), and run as Meta's log_regression.py runs it (each C from scratch,
tol 1e-12, 1000 iterations), timed on a few C values and scaled to 45 (marked "estimated").

k-NN: 100,000 training features of width 768 (unit rows), 2,000 queries, the 200 nearest (Meta's
largest k) by cosine, then the k = 20 vote; faiss's exact inner-product index (IndexFlatIP) on the
same features for comparison, and whether both find the same neighbours.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common import save_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dino3.probe import knn, logreg  # noqa: E402
from dino3.probe.dataset import stratified_split  # noqa: E402


def features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = 3.0 * torch.randn(dim, generator=g)  # a mean all images share
    centres = 0.1 * torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return shared + centres[labels] + torch.randn(n, dim, generator=g), labels


def sweep_rows(n: int, dim: int, classes: int, peers: bool, meta_cs: int) -> list[str]:
    x, y = features(n, dim, classes)
    fit_rows, held = (torch.as_tensor(i) for i in stratified_split(y.numpy(), 0.2, seed=0))
    start = time.perf_counter()
    found = logreg.sweep(x[fit_rows], y[fit_rows], x[held], y[held], classes)
    swept = time.perf_counter() - start
    logreg.fit(x, y, classes, found.C, init=found.model)
    total = time.perf_counter() - start
    shape = f"{n:,} x {dim}, {classes} classes"
    rows = [
        f"| {shape} | dino3 (torch L-BFGS, float64) | 45 | {total:.1f} (sweep {swept:.1f}, final fit "
        f"{total - swept:.1f}) | {found.C:.3g} | {found.mean_scores()[found.C]:.4f} |"
    ]
    print(rows[-1], flush=True)
    if not peers:
        return rows
    from sklearn.linear_model import LogisticRegression

    X, Y = x.double().numpy(), y.numpy()
    Xf, Yf, Xh, Yh = X[fit_rows.numpy()], Y[fit_rows.numpy()], X[held.numpy()], Y[held.numpy()]
    mean = Xf.mean(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(solver="lbfgs", tol=1e-4, max_iter=1000, warm_start=True)
        scores = {}
        start = time.perf_counter()
        for C in logreg.C_GRID:
            clf.set_params(C=C).fit(Xf - mean, Yf)
            scores[C] = float((clf.predict(Xh - mean) == Yh).mean())
        best = max(scores, key=lambda c: (scores[c], -c))
        LogisticRegression(solver="lbfgs", tol=1e-4, max_iter=1000, C=best).fit(X - X.mean(axis=0), Y)
        seconds = time.perf_counter() - start
        rows.append(
            f"| {shape} | scikit-learn, the same sweep (warm starts, tol 1e-4, centred) | 45 | {seconds:.1f} | "
            f"{best:.3g} | {scores[best]:.4f} |"
        )
        print(rows[-1], flush=True)
        if meta_cs:
            sample = list(logreg.C_GRID[4 :: 40 // max(1, meta_cs - 1)])[:meta_cs]
            start = time.perf_counter()
            for C in sample:
                LogisticRegression(solver="lbfgs", tol=1e-12, max_iter=1000, C=C).fit(Xf, Yf)
            per_c = (time.perf_counter() - start) / len(sample)
            shown = ", ".join(f"{c:.2g}" for c in sample)
            rows.append(
                f"| {shape} | scikit-learn as Meta runs it (tol 1e-12, 1000 iterations, each C from scratch) | "
                f"{len(sample)} (C = {shown}) | {per_c * 45:.0f} estimated for 45 ({per_c:.1f} per C) | - | - |"
            )
            print(rows[-1], flush=True)
    return rows


def knn_rows(n: int, dim: int, queries: int, peers: bool) -> list[str]:
    x, y = features(n + queries, dim, 100, seed=1)
    train, q = knn.normalize(x[:n]), knn.normalize(x[n:])
    labels = y[:n]
    knn.neighbours(q[:64], train, 200)  # warm-up
    start = time.perf_counter()
    sims, indices = knn.neighbours(q, train, 200)
    knn.vote(sims[:, :20], labels[indices[:, :20]], 100)
    seconds = time.perf_counter() - start
    shape = f"{n:,} x {dim} training, {queries:,} queries, k = 200"
    rows = [f"| {shape} | dino3 (chunked matmul + top-k, float32) | {seconds:.2f} | {queries / seconds:,.0f} | - |"]
    print(rows[-1], flush=True)
    if peers:
        with contextlib.suppress(ImportError):
            import faiss

            index = faiss.IndexFlatIP(dim)
            index.add(train.numpy())
            index.search(q[:64].numpy(), 200)
            start = time.perf_counter()
            _, found = index.search(q.numpy(), 200)
            seconds = time.perf_counter() - start
            same = np.mean([set(a) == set(b) for a, b in zip(found, indices.numpy())])
            rows.append(
                f"| {shape} | faiss IndexFlatIP (exact) | {seconds:.2f} | {queries / seconds:,.0f} | "
                f"{same:.3f} of queries: the same 200 neighbours as dino3 |"
            )
            print(rows[-1], flush=True)
    return rows


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="10,100", help="class counts of the C sweep")
    parser.add_argument("--no-peers", action="store_true", help="dino3 only")
    parser.add_argument("--meta-cs", type=int, default=3, help="C values timed for Meta's settings (0: none)")
    parser.add_argument("--save", action="store_true", help="put the tables in benchmarks/RESULTS.md")
    args = parser.parse_args()
    import sklearn

    started = time.perf_counter()
    header = (
        f"Date: {date.today()}; {cpu_name()}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f} at the start; Python {platform.python_version()}, torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}"
    )
    print(header, flush=True)
    sweep = [
        "| features | solver | C values | seconds | chosen C | held-out top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for i, classes in enumerate(int(c) for c in args.classes.split(",")):
        sweep += sweep_rows(10_000, 768, classes, peers=not args.no_peers and i == 0, meta_cs=args.meta_cs)
    search = ["| search | method | seconds | queries/s | agreement |", "|---|---|---|---|---|"]
    search += knn_rows(100_000, 768, 2_000, peers=not args.no_peers)
    took = time.perf_counter() - started
    text = "\n".join(
        [
            header,
            "",
            "Logistic regression: Meta's 45 values of C on 8,000 features (2,000 held out), then the final fit on "
            "all 10,000 at the chosen C. Synthetic features (see benchmarks/probe.py). Peers on the first class "
            "count only.",
            "",
            *sweep,
            "",
            "k-NN: exact cosine search (then the k = 20 vote for dino3).",
            "",
            *search,
            "",
            f"The whole benchmark took {took:.0f} s. This machine's 2 cores are shared: timings drift between runs.",
        ]
    )
    print(f"\ntook {took:.0f} s")
    if args.save:
        save_section("Probes: C sweep and k-NN", text)


if __name__ == "__main__":
    main()
