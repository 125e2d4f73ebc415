"""Golden values of anomalib's AnomalyDINO for tests/test_anomaly.py: image scores and pixel maps that
anomalib's own scoring code computes from patch features that dino3 made.

How to run it (from the repository root; anomalib drags in Lightning, OpenCV and more, so it lives in a
virtual environment of its own):

    python -m venv /work/venvs/anomalib
    /work/venvs/anomalib/bin/pip install anomalib==2.7.0
    PYTHONPATH=src:tests python tests/golden/make_anomaly_golden.py --anomalib-python /work/venvs/anomalib/bin/python

It runs in two steps. Here (dino3's environment): the small random-weight ViT of tests/helpers.py
(`save_small_vit`, seed 0) turns six photos of examples/images (three good, three to score) into patch
features at 160 px (shorter side, the anomaly room's preprocessing), written to
tests/golden/anomaly_features.safetensors. Then, in anomalib's environment (`--reference`), those
features are given to `anomalib.models.image.anomaly_dino.torch_model.AnomalyDINOModel.forward` in
place of its timm backbone's (extract_features is replaced; everything after it is anomalib's:
masking, L2 normalisation, the memory bank, the distances, the top 1% score, the map with its
nearest upsampling, Gaussian smoothing, centre crop and replicate padding), and its scores and maps
are written to tests/golden/anomaly_golden.safetensors, one set per case (and OpenCV's rotation of a
piece of a photo, the paper's augmentation of the shots, for scoring.rotate):

- plain: 1 neighbour, no mask;
- k3: the mean distance to the 3 nearest;
- masked: anomalib's PCA mask on the good and the scored images, with the threshold scaled to the
  small model's features (anomalib's 10 is in DINOv2-S units; here 0.5 x the standard deviation of
  the first component over all images, written to the file).

Made with anomalib 2.7.0, torch 2.14.1, scikit-learn 1.9.1, opencv-python-headless 5.1.0.95, numpy
2.4.6, Python 3.11 (the versions are written into the file's metadata as well).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FEATURES = HERE / "anomaly_features.safetensors"
GOLDEN = HERE / "anomaly_golden.safetensors"
ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "examples" / "images"

GOOD = ["coffee.png", "chelsea.png", "astronaut.png"]
SCORED = ["camera.png", "horse.png", "rocket.jpg"]
RESOLUTION = 160
PATCH = 16
ROTATION_ANGLES = (45, 90, 135, 200)
CASES = {"plain": {"k": 1, "masking": False}, "k3": {"k": 3, "masking": False}, "masked": {"k": 1, "masking": True}}


def make_features(photos: Path) -> None:
    """dino3's patch features of the photos (the small random ViT), written to FEATURES."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from dino3.anomaly import FeatureMaker
    from helpers import save_small_vit

    with tempfile.TemporaryDirectory() as folder:
        maker = FeatureMaker.for_model(str(save_small_vit(folder, seed=0)), resolution=RESOLUTION)
        made = maker.features([str(photos / name) for name in GOOD + SCORED])
    tensors, images = {}, []
    for i, (item,) in enumerate(made):
        tensors[f"grid.{i}"] = item.grid.contiguous()  # (h, w, D)
        images.append({"name": Path(item.name).name, "size": item.size, "resized": item.resized})
    first = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors.values()])
    spread = float(torch.pca_lowrank(first - first.mean(0), q=1, center=False)[1][0]) / (len(first) - 1) ** 0.5
    meta = {"images": images, "good": len(GOOD), "resolution": RESOLUTION, "mask_threshold": 0.5 * spread}
    save_file(tensors, str(FEATURES), metadata={"meta": json.dumps(meta), "torch": torch.__version__})
    FEATURES.chmod(0o644)
    print(f"wrote {FEATURES}")


def make_reference() -> None:
    """anomalib's scores and maps of the features in FEATURES, written to GOLDEN (anomalib's environment)."""
    import anomalib
    import cv2
    import numpy as np
    import sklearn
    import torch
    from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(FEATURES), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        grids = [f.get_tensor(f"grid.{i}") for i in range(len(meta["images"]))]
    threshold = meta["mask_threshold"]

    def reference_model(k: int, masking: bool) -> AnomalyDINOModel:
        """anomalib's model without its timm backbone (which would download DINOv2 weights)."""
        model = AnomalyDINOModel.__new__(AnomalyDINOModel)
        torch.nn.Module.__init__(model)
        model.num_neighbours, model.masking, model.coreset_subsampling = k, masking, False
        model.patch_size = PATCH
        model.register_buffer("memory_bank", torch.empty(0))
        model.embedding_store = []
        model.anomaly_map_generator = AnomalyMapGenerator()
        static = AnomalyDINOModel.compute_background_masks
        model.compute_background_masks = lambda features, grid: static(features, grid, threshold=threshold)
        return model

    def run(model: AnomalyDINOModel, index: int):
        """anomalib's forward on one image of its resized size, with dino3's features put in."""
        height, width = meta["images"][index]["resized"]
        grid = grids[index]
        model.extract_features = lambda _: grid.reshape(1, -1, grid.shape[-1])  # (1, N, D)
        return model(torch.zeros(1, 3, height, width))

    tensors = {}
    good = meta["good"]
    for case, options in CASES.items():
        model = reference_model(options["k"], options["masking"])
        model.train()
        for i in range(good):
            run(model, i)
        model.fit()
        model.eval()
        with torch.no_grad():
            for i in range(good, len(grids)):
                out = run(model, i)
                tensors[f"{case}.score.{i}"] = out.pred_score.reshape(1).float().contiguous()
                tensors[f"{case}.map.{i}"] = out.anomaly_map[0, 0].float().contiguous()
        tensors[f"{case}.bank_rows"] = torch.tensor([len(model.memory_bank)])
    # the paper's rotation of a shot (src/utils.py rotate_image), on a 40 x 56 piece of a photo
    from PIL import Image

    source = np.ascontiguousarray(np.asarray(Image.open(PHOTOS / "coffee.png").convert("RGB"))[100:140, 200:256])
    tensors["rotation.source"] = torch.from_numpy(source.copy())
    for angle in ROTATION_ANGLES:
        matrix = cv2.getRotationMatrix2D(tuple(np.array(source.shape[1::-1]) / 2), angle, 1.0)
        turned = cv2.warpAffine(
            source, matrix, source.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_DEFAULT
        )
        tensors[f"rotation.{angle}"] = torch.from_numpy(turned.copy())
    versions = {
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    save_file(tensors, str(GOLDEN), metadata={"versions": json.dumps(versions), "cases": json.dumps(CASES)})
    GOLDEN.chmod(0o644)
    print(f"wrote {GOLDEN} ({versions})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anomalib-python", help="the Python of an environment with anomalib installed")
    parser.add_argument("--reference", action="store_true", help="only the anomalib step (in its environment)")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    args = parser.parse_args()
    if args.reference:
        make_reference()
        return
    make_features(args.photos)
    if args.anomalib_python:
        subprocess.run([args.anomalib_python, __file__, "--reference"], check=True)


if __name__ == "__main__":
    main()
