"""Dense features people can see and use: PCA pictures, foreground masks, patch matching, at high
resolution, for images and videos. Plain tensor functions over patch grids; the pictures are made
apart from the maths (render.py); the logistic regression is dino3.linear's; the commands
`dino3 pca`, `dino3 foreground` and `dino3 match` sit on top (commands.py).

    image = dino3.dense.load_dense(model, "photo.jpg")          # height 768, aspect kept: Meta's recipe
    rgb = dino3.dense.pca_rgb(image.features)                   # (h, w, 3) in [0, 1]
    matches = dino3.dense.match_patches(image, other, mutual=True)
"""

from .foreground import (
    ForegroundClassifier,
    Quality,
    average_precision,
    fit_logistic,
    foreground_mask,
    mask_for,
    median_filter3,
    model_probe,
    patch_labels,
    read_mask,
    read_pair,
    sweep_c,
    train_foreground,
    unsupervised_foreground,
)
from .highres import (
    HEIGHT,
    DenseImage,
    Tiling,
    attention_bytes,
    dense_features,
    load_dense,
    patch_centres,
    processor_for,
    tiled_features,
)
from .match import Matches, match_patches, nearest_patches, sparse
from .pca import PatchPCA, fit_foreground_pca, fit_pca, pca_rgb
from .pca_video import VideoResult, write_pca_video

__all__ = [
    "HEIGHT",
    "DenseImage",
    "ForegroundClassifier",
    "Matches",
    "PatchPCA",
    "Quality",
    "Tiling",
    "VideoResult",
    "attention_bytes",
    "average_precision",
    "dense_features",
    "fit_foreground_pca",
    "fit_logistic",
    "fit_pca",
    "foreground_mask",
    "load_dense",
    "mask_for",
    "match_patches",
    "median_filter3",
    "model_probe",
    "nearest_patches",
    "patch_centres",
    "patch_labels",
    "pca_rgb",
    "processor_for",
    "read_mask",
    "read_pair",
    "sparse",
    "sweep_c",
    "tiled_features",
    "train_foreground",
    "unsupervised_foreground",
    "write_pca_video",
]
