"""A classifier from a folder of labelled images, end to end: scikit-learn's handwritten digits
written out as a folder per class, a logistic-regression probe on ViT-S/16 features, its accuracy on
held-out digits, and a few predictions.

    python examples/probe.py [MODEL]        # MODEL defaults to vits16

With access to Meta's gated weights it uses them; without, it says so and runs the same steps on a
checkpoint of the same architecture with RANDOM weights (out/vits16-random), where the probe still
reaches about 0.9 (the digits are easy; real weights do better on real photos). Needs scikit-learn
for the digits themselves (pip install scikit-learn); the probe does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

import dino3
from dino3.cli import main as dino3_command
from dino3.errors import HubAccessError

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out"


def write_digits(folder: Path, indices, digits) -> None:
    for i in indices:
        (folder / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8))
        image.save(folder / str(digits.target[i]) / f"{i:04d}.png")


def main(model: str = "vits16") -> int:
    from sklearn.datasets import load_digits

    try:
        dino3.load_config(model)  # config.json is gated like the weights: a quick test of access
    except HubAccessError as e:
        print(f"no access to the gated DINOv3 weights ({str(e).split('. ')[0]}); using RANDOM weights", file=sys.stderr)
        folder = OUT / f"{model}-random"
        if not (folder / "model.safetensors").is_file():
            dino3_command(["init-random", model, str(folder)])
        model = str(folder)

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    data = OUT / "digits"
    if not data.is_dir():
        write_digits(data / "train", order[:300], digits)  # 300 to train on (20% of them held out to choose C)
        write_digits(data / "test", order[300:500], digits)  # 200 never seen

    result = dino3.probe.train(data / "train", model=model, output=OUT / "digits-probe", overwrite=True)
    probe = result.probe
    print(f"{probe}: C chosen on {probe.settings['validation']['held_out_images']} held-out digits")

    report = dino3.probe.evaluate(data / "test", probe)
    print(report.table())
    print("confusion matrix:", report.draw(OUT / "digits-confusion.png"))

    some = sorted((data / "test").rglob("*.png"))[:3]
    predictions = probe.predict([str(path) for path in some], top_k=3)  # best first
    for path, labels, scores in zip(some, predictions.labels, predictions.scores):
        shown = ", ".join(f"{label} {score:.2f}" for label, score in zip(labels, scores))
        print(f"{path.parent.name}/{path.name}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
