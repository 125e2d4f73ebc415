"""Few-shot anomaly detection from a handful of good images: AnomalyDINO (Damm et al., WACV 2025) on
DINOv3 patch features, with maps people can look at.

    import dino3.anomaly
    detector = dino3.anomaly.fit(["good1.png", "good2.png", "good3.png"], model="vits16")
    results = detector.score(["new.png"], maps="maps/")   # one overlay PNG per image
    results[0].score, results[0].anomalous, results[0].patch_scores, results[0].map
    detector.save("detector/")
    detector = dino3.anomaly.load("detector/")              # refuses another model when scoring

The algorithm, each part a switch of `fit` (whose it is in brackets):

- Features (paper): the last layer's patch tokens after the final norm, of the image resized so that
  its shorter side is `resolution` px (default 448, the paper's; it also reports 672), bicubic and
  antialiased, aspect ratio kept, centre-cropped to whole patches. L2-normalised, so that the inner
  product is the cosine.
- Memory bank (paper): every patch of the good images, and with `rotate=True` (default, the paper's
  "agnostic" setting) of each image turned by 0, 45, ..., 315 degrees (OpenCV's warpAffine: same
  size, bilinear, mirrored border; see scoring.rotate).
- Distance (paper, anomalib): each test patch's cosine distance (1 - cosine, clamped to [0, 2]) to
  its nearest bank patch; the mean over the `neighbours` nearest when neighbours > 1.
- Image score (paper, anomalib): the mean of the top `top_fraction` (1%) of the patch distances,
  at least one: int(n * 0.01) patches, e.g. 7 of 784 at 448 px.
- Background mask (paper, for object categories; off by default): the first principal component of
  the image's raw patch features; patches above `mask_threshold` (10, the paper's, in DINOv2-S
  feature units: not re-tuned for DINOv3, which needs its weights) are the object, unless fewer than
  35% of the centre region (20% in from each side) are, when the other side of the component is
  taken; then a 3x3 dilation and a 3x3 closing. Masked-out patches score 0. The mask applies to the
  images scored and, with `mask_shots=True`, to the good images too (the paper masks test images
  only; anomalib masks both). The PCA is dino3.dense.fit_pca (float64; scikit-learn's sign).
- Search: exact (FAISS flat inner product) up to `exact_up_to` bank patches (40,000: where the
  index room's HNSW graph had become 1.8x faster with the same image scores, measured in
  benchmarks/anomaly.py), HNSW beyond (ef_search at least 64: image scores within 0.0032 of the exact
  ones up to 160k patches, as measured). An approximate neighbour is never nearer than the true one:
  approximate distances are >= the exact ones. A 16-shot bank with the 8 rotations (100k patches at
  448 px) is searched approximately; pass exact_up_to= to choose.
- Map (anomalib): the patch distances spread over their p x p pixels (`upsample="nearest"`;
  "bilinear" interpolates between patch centres, as the paper's OpenCV resize does), smoothed by a
  Gaussian of `sigma`=4 px (33 taps, mirrored border), the crop margin filled with the edge values,
  all at the size the model saw; then resized bilinearly onto the image's own pixels (`Result.map`).
- Threshold: "auto" takes the highest leave-one-out score of the good images: each good image
  (unrotated, masked as a test image) scored against a bank of the others (their rotations
  included). A good image like the shots is then flagged only when it scores above all of them: with
  n exchangeable good images that happens to about 1 in n + 1 of them, fewer in practice since the
  held-out scores came from a bank one image smaller. One good image has no leave-one-out: no
  threshold (anomalous is None) unless you give one (`threshold=` or `detector.set_threshold`).
  A result is anomalous when score > threshold.

Differences from anomalib's AnomalyDINO (2.7.0), on the same patch features (the tests check scores
and maps equal within 1e-5):
- anomalib has no rotation of the shots and no threshold rule (its post-processor picks one from
  labelled validation images); both are the paper's here.
- anomalib resizes to 252 x 252 (squashed) by default; here the paper's aspect-kept 448.
- anomalib's optional coreset subsampling of the bank is not kept (not in the paper).
- the Gaussian is applied as two 1-D passes instead of one 2-D kernel (the same sums, rounded in
  another order: the maps agree within 2e-6).
- the mask's PCA is exact (eigendecomposition in float64) where anomalib's scikit-learn call is
  randomised, in float32: a patch within rounding of the threshold can fall on the other side.
Differences from the paper's code (github.com/dammsi/AnomalyDINO): its map is resized to the
image's own size before smoothing (sigma 4 px of the original image) and its crop to whole patches
takes the top-left corner; here (as anomalib) the map is smoothed at the model's size and the crop is
centred. Its resize is torchvision's on the PIL image (integer pixels); here it is on floats.

Saved as a folder: detector.json (the settings, the recipe of the features: model name, identity
and fingerprint, processor, dtype; the threshold and the leave-one-out scores) and bank.safetensors
(the unit patch features and the good image each came from). Nothing is pickled.
"""

from .detector import (
    Detector,
    Result,
    Settings,
    fit,
    fit_features,
    leave_one_out,
    scores_document,
    write_scores,
)
from .features import FeatureMaker, ImageFeatures
from .render import colourize, overlay, write_overlays
from .scoring import Bank, Masking, image_score, pixel_map, rotate


def load(folder) -> Detector:
    """A saved detector (`Detector.save`)."""
    return Detector.load(folder)


__all__ = [
    "Bank",
    "Detector",
    "FeatureMaker",
    "ImageFeatures",
    "Masking",
    "Result",
    "Settings",
    "colourize",
    "fit",
    "fit_features",
    "image_score",
    "leave_one_out",
    "load",
    "overlay",
    "pixel_map",
    "rotate",
    "scores_document",
    "write_overlays",
    "write_scores",
]
