"""Training a probe: labelled images (or features) -> a classifier, by Meta's protocols.

    result = dino3.probe.train("flowers/", model="vits16", output="flowers-probe")
    result.probe.predict(["rose.jpg"])

The images are embedded with `dino3 embed`'s engine (cached in the probe folder); a stratified,
seeded share of each class is held out to choose C (logistic regression: Meta's 45 values) or k
(k-NN: 10, 20, 100, 200) by top-1 accuracy; the final probe is then fitted on all the images at
that choice, as Meta's protocol does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..recipe import Recipe, check_options, model_name
from . import knn, logreg
from .dataset import Dataset, read_dataset, stratified_split
from .embedding import RUN_OPTIONS, Embedded, cached_embed, embed_images
from .probe import FEATURES, METHODS, SETTINGS_FILE, WEIGHTS_FILE, Probe

DEFAULT_FEATURES = "cls+mean"  # Meta's linear-probe input
# The recipe's options that probe training takes (the model and pooling are its own arguments)
RECIPE_OPTIONS = tuple(name for name in Recipe.__dataclass_fields__ if name not in ("model", "pool", "layers"))


@dataclass
class TrainResult:
    probe: Probe
    folder: Path | None  # where it was saved (None: not saved)
    images: int  # images it was trained on
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): images left out
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def train(
    dataset: str | os.PathLike,
    model: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    labels: str | os.PathLike | None = None,
    method: str = "logreg",
    features: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    C: float | None = None,
    k: int | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    recipe: Recipe | None = None,
    **embed_options: Any,
) -> TrainResult:
    """Train a probe on `dataset` (a folder per class, a CSV of path,label, or an embeddings file
    with `labels`) and save it in the folder `output` (None: only return it).

    method: "logreg" (multinomial logistic regression, C chosen on held-out images) or "knn".
    features: the pooling, "cls+mean" by default (an embeddings file: the file's own).
    C / k: fix the choice instead of choosing it on the held-out images.
    embed_options: the recipe's (size, keep_aspect, target, fit, dtype, quantize, backend, ...; see
        dino3.recipe.Recipe) and the embed job's (batch_size, workers, checkpoint_every, check_hash).
    """
    started = time.perf_counter()
    # -- everything checked before any work -----------------------------------------------------------------
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    if features is not None and features not in FEATURES:
        raise UsageError(f"features must be one of {FEATURES} (one vector per image), got {features!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    if C is not None and (method != "logreg" or not isinstance(C, (int, float)) or not C > 0):
        raise UsageError(f"C is logistic regression's (a number > 0); got C={C!r} with method {method!r}")
    if k is not None and (method != "knn" or isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UsageError(f"k is k-NN's (an integer >= 1); got k={k!r} with method {method!r}")
    if recipe is not None:  # how the images are embedded, whole: the model and pooling are the recipe's
        if model is not None and model_name(model) != recipe.model:
            raise UsageError(f"model {model} and the recipe's model {recipe.model} differ; give one of them")
        model, features = recipe.model, recipe.pool
    recipe_options = {k: v for k, v in embed_options.items() if k in RECIPE_OPTIONS and v is not None}
    run_options = {k: v for k, v in embed_options.items() if k in RUN_OPTIONS and v is not None}
    unknown = sorted(set(embed_options) - set(RECIPE_OPTIONS) - set(RUN_OPTIONS))
    if unknown:
        raise TypeError(f"train() got unexpected keyword arguments: {', '.join(unknown)}")
    if recipe_options:  # the same refusals as every command's, before anything is read
        check_options(pool=features or DEFAULT_FEATURES, **recipe_options)
    folder = _check_output(output, overwrite)
    data = read_dataset(dataset, labels)
    classes = data.classes
    if len(classes) < 2:
        raise UsageError(
            f"{data.source} has one class only ({classes[0]!r}): a classifier needs images of two classes or more"
        )
    notes = list(data.notes)
    if data.features is not None:
        if model is not None:
            made_by = data.meta.get("model")
            raise UsageError(f"{data.source} already holds features (made by {made_by}); leave out the model")
        if features is not None and features != data.meta.get("pool"):
            raise UsageError(f"{data.source} holds {data.meta.get('pool')!r} features, not {features!r}")
        if recipe_options:
            given = ", ".join(sorted(recipe_options))
            raise UsageError(f"{given}: embedding options do not apply to features already embedded")
        if recipe is not None:
            raise UsageError(f"{data.source} already holds features: it takes no recipe")
    elif model is None:
        raise UsageError("give the model that embeds the images (-m vits16, a folder or a weights file)")
    elif recipe is None:  # every embedding option checked here, before any image is read
        recipe = Recipe(os.fspath(model), pool=features or DEFAULT_FEATURES, **recipe_options)
    elif recipe_options:
        raise UsageError(f"{', '.join(sorted(recipe_options))}: give them in the recipe")
    if C is None and k is None and len(stratified_split(data.targets(classes), val_fraction, seed)[1]) == 0:
        raise _nothing_held_out(method)

    lock = _lock(folder)
    try:
        # -- the features ------------------------------------------------------------------------------------
        if data.features is None:
            embedded = _embed(data, recipe, folder, device, progress, run_options)
            failures, meta = embedded.failures, embedded.meta
            notes += embedded.notes
            row = {p: i for i, p in enumerate(data.paths)}
            keep = [row[p] for p in embedded.paths]
            vectors = embedded.features
            labels_kept = [data.labels[i] for i in keep]
            missing = sorted(set(classes) - set(labels_kept))
            if missing:
                raise UsageError(
                    f"no image of class(es) {', '.join(missing)} could be embedded (see the failures); a probe "
                    "needs images of every class"
                )
        else:
            failures, meta, vectors, labels_kept = [], data.meta, data.features, data.labels
        index = {name: i for i, name in enumerate(classes)}
        targets = torch.as_tensor(np.asarray([index[label] for label in labels_kept], dtype=np.int64))
        x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))  # (N, D)
        if x.ndim != 2:
            raise UsageError(f"features of shape {tuple(x.shape)}: a probe takes one vector per image")
        if not torch.isfinite(x).all():
            raise UsageError("some features are not finite (NaN or inf): the model overflowed; embed in float32")
        solver_device = torch.device(device) if device is not None else torch.device("cpu")

        # -- the choice of C or k on held-out images, then the final fit on all of them ------------------------
        train_rows, held_rows = stratified_split(targets.numpy(), val_fraction, seed)
        if C is None and k is None and len(held_rows) == 0:
            raise _nothing_held_out(method)
        validation = {
            "fraction": val_fraction,
            "seed": seed,
            "train_images": len(train_rows),
            "held_out_images": len(held_rows),
            "metric": "top-1 accuracy",
        }
        x_dev, y_dev = x.to(solver_device), targets.to(solver_device)  # (N, D), (N,)
        fit_rows = torch.as_tensor(train_rows, device=solver_device)
        held = torch.as_tensor(held_rows, device=solver_device)
        if method == "logreg":
            tensors, chosen_settings = _fit_logreg(
                x_dev, y_dev, fit_rows, held, len(classes), C, validation, progress and C is None
            )
        else:
            tensors, chosen_settings = _fit_knn(x_dev, y_dev, fit_rows, held, len(classes), k, validation)

        per_class = np.bincount(targets.numpy(), minlength=len(classes))
        settings = {
            "feature_dim": int(x.shape[1]),
            "features": meta.get("pool"),
            "model": meta.get("model"),
            "model_identity": meta.get("model_identity"),
            "model_fingerprint": meta.get("model_fingerprint"),
            "processor": meta.get("processor"),
            "embedding": {key: meta.get(key) for key in ("dtype", "quantize", "backend", "precision")},
            "recipe": meta.get("recipe"),
            **chosen_settings,
            "validation": validation,
            "trained_on": {
                "dataset": str(data.source),
                "images": int(len(targets)),
                "per_class": {name: int(n) for name, n in zip(classes, per_class)},
                "left_out": len(failures),
            },
        }
        probe = Probe(method, classes, {name: t.cpu() for name, t in tensors.items()}, settings)
        if folder is not None:
            probe.save(folder)
    finally:
        if lock is not None:
            lock.release()
    return TrainResult(probe, folder, int(len(targets)), failures, notes, time.perf_counter() - started)


def _fit_logreg(x, y, fit_rows, held, num_classes, C, validation, progress=False) -> tuple[dict, dict]:
    """Meta's sweep on the training part (unless C is given and nothing is held out), then the fit on all."""
    init = None
    if len(held):
        grid = logreg.C_GRID if C is None else (float(C),)
        chosen = logreg.sweep(x[fit_rows], y[fit_rows], x[held], y[held], num_classes, grid, progress=progress)
        scores = chosen.mean_scores()
        validation.update(scores=[[c, s] for c, s in scores.items()], best=scores[chosen.C])
        C, init = chosen.C, chosen.model
    final = logreg.fit(x, y, num_classes, float(C), init=init)
    solver = {"name": "lbfgs", "tol": logreg.TOL, "sweep_tol": logreg.SWEEP_TOL, "max_iter": logreg.MAX_ITER}
    return {"weight": final.weight, "bias": final.bias}, {"C": float(C), "solver": solver}


def _fit_knn(x, y, fit_rows, held, num_classes, k, validation) -> tuple[dict, dict]:
    """k chosen on the held-out part (unless given and nothing is held out); the probe keeps all the features."""
    unit = knn.normalize(x)  # (N, D)
    if len(held):
        ks = knn.KS if k is None else (k,)
        choice = knn.choose_k(unit[fit_rows], y[fit_rows], unit[held], y[held], num_classes, ks)
        validation.update(scores=[[kk, s] for kk, s in choice.scores.items()], best=choice.scores[choice.k])
        k = choice.k
    return {"features": unit, "labels": y}, {"k": min(int(k), len(y)), "temperature": knn.TEMPERATURE}


def _nothing_held_out(method: str) -> UsageError:
    what, remedy = ("C", "--C 1") if method == "logreg" else ("k", "--knn-k 10")
    return UsageError(
        f"no image is held out to choose {what} (--val-fraction 0, or one image per class): give {what} yourself "
        f"({remedy})"
    )


def _check_output(output: str | os.PathLike | None, overwrite: bool) -> Path | None:
    if output is None:
        return None
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; a probe is a folder: give a folder name")
    if (folder / SETTINGS_FILE).exists() and not overwrite:
        raise UsageError(f"{folder} holds a probe already; pass --overwrite to replace it")
    if folder.is_dir():
        ours = (SETTINGS_FILE, WEIGHTS_FILE)
        foreign = [
            p.name
            for p in folder.iterdir()
            if not (p.name in ours or p.name.startswith(("embeddings-", ".", SETTINGS_FILE, "confusion")))
        ]
        if foreign:
            raise UsageError(
                f"{folder} holds other files ({', '.join(sorted(foreign)[:3])}...); a probe needs a folder of its own"
            )
    return folder


def _lock(folder: Path | None):
    if folder is None:
        return None
    from ..embed.store import RunLock

    lock = RunLock(folder / SETTINGS_FILE)
    lock.acquire()
    return lock


def _embed(
    data: Dataset,
    recipe: Recipe,
    folder: Path | None,
    device: str | None,
    progress: bool,
    options: dict[str, Any],
) -> Embedded:
    if folder is not None:
        return cached_embed(
            folder, data.paths, recipe, skipped=data.skipped, device=device, progress=progress, **options
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dino3-probe-") as tmp:
        return embed_images(
            data.paths,
            recipe,
            Path(tmp) / "embeddings.npz",
            skipped=data.skipped,
            device=device,
            progress=progress,
            **options,
        )
