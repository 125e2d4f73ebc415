"""End to end: 64 JPEG photos -> CLS embeddings with ViT-S/16, dino3 against Transformers' pipeline
and against the peers' fastest path (Transformers' processor feeding OpenVINO).

    python benchmarks/embed.py            # prints a markdown table; --save puts it in RESULTS.md

Both libraries read the same files and use the same random weights (a ViT-S/16 checkpoint written
in the Hugging Face layout). Timed in one process, interleaved, medians of --reps runs, model
already loaded: Transformers' `pipeline(...)(paths, pool=True)` at batch size 1 and 16, dino3's
pipeline, and dino3's `embed` command (its `main()`, which also loads the model and writes the
file). Then once each as a fresh process, imports and model loading included.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import export_transformers_onnx, interleaved_seconds, save_section

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def runtime_rows(tmp: Path, model: Path, photos: Path, paths: list[str], cli) -> dict:
    """`dino3 embed --backend openvino` at each precision, against the peers' best path written by
    hand: Transformers' load_image and processor, then OpenVINO on Transformers' model exported to
    ONNX (NNCF int8 calibrated on the same sample photos, saved as OpenVINO IR), in batches of 16.
    Each run of either starts from the files on disk, as a script or command over a folder does: the
    peer's compiles its model file with OpenVINO's model cache (CACHE_DIR), like dino3's."""
    import logging
    import os
    import warnings

    import nncf
    import openvino as ov
    import transformers
    from transformers.image_utils import load_image

    warnings.filterwarnings("ignore")
    nncf.set_log_level(logging.ERROR)
    os.environ["DINO3_CACHE"] = str(tmp / "cache")
    reference = transformers.DINOv3ViTModel.from_pretrained(model).eval()

    onnx_path = export_transformers_onnx(reference, tmp / "transformers.onnx", output="pooler_output")
    core = ov.Core()
    processor = transformers.DINOv3ViTImageProcessor()  # for calibration
    samples = sorted((ROOT.parent / "src" / "dino3" / "assets").glob("*.jpg"))
    calibration = [processor(load_image(str(s)), return_tensors="pt").pixel_values.numpy() for s in samples]
    int8 = nncf.quantize(
        core.read_model(str(onnx_path)), nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER
    )
    int8_path = tmp / "transformers-int8.xml"
    ov.save_model(int8, str(int8_path), compress_to_fp16=False)

    def peer(source, hint):
        def run():
            core = ov.Core()
            core.set_property({"CACHE_DIR": str(tmp / "peer-cache")})
            compiled = core.compile_model(str(source), "CPU", {"INFERENCE_PRECISION_HINT": hint})
            request = compiled.create_infer_request()
            processor = transformers.DINOv3ViTImageProcessor()
            for start in range(0, len(paths), 16):
                images = [load_image(p) for p in paths[start : start + 16]]
                request.infer({0: processor(images, return_tensors="pt").pixel_values.numpy()})

        run()  # fills the model cache
        return run

    out = tmp / "rt.npz"
    rows = {}
    for precision in ("f32", "bf16", "int8"):
        source = int8_path if precision == "int8" else onnx_path
        rows[f"Transformers processor + OpenVINO {precision} (peer), batch 16"] = peer(
            source, "f32" if precision == "int8" else precision
        )
        command = ["embed", str(photos), "-m", str(model), "-o", str(out), "-q", "--overwrite"]
        command += ["--backend", "openvino", "--precision", precision]
        rows[f"dino3 embed --backend openvino --precision {precision}, batch 16"] = lambda command=command: cli(command)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    parser.add_argument("--no-runtimes", action="store_true", help="leave out the OpenVINO rows")
    args = parser.parse_args()

    import transformers

    import dino3
    from dino3.cli import main as cli
    from preprocess import make_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        photos.mkdir()
        paths = [str(p) for p in make_jpegs(photos)]
        model = tmp / "vits16-random"
        cli(["init-random", "vits16", str(model)])

        hf1 = transformers.pipeline("image-feature-extraction", model=str(model), batch_size=1)
        hf16 = transformers.pipeline("image-feature-extraction", model=str(model), batch_size=16)
        ours = dino3.pipeline(model=model, batch_size=16, workers=2)
        out = tmp / "f.npz"
        runs = {
            "Transformers pipeline, batch 1": lambda: hf1(paths, pool=True),
            "Transformers pipeline, batch 16": lambda: hf16(paths, pool=True),
            "dino3 pipeline, batch 16": lambda: ours(paths, pool=True),
            "dino3 embed (command, in process), batch 16": lambda: cli(
                ["embed", str(photos), "-m", str(model), "-o", str(out), "-q", "--overwrite"]
            ),
        }
        if not args.no_runtimes:
            runs.update(runtime_rows(tmp, model, photos, paths, cli))
        speed = {name: len(paths) / s for name, s in interleaved_seconds(runs, args.reps).items()}

        hf_script = (
            "import sys, glob; from transformers import pipeline; "
            f"p = pipeline('image-feature-extraction', model={str(model)!r}, batch_size=16); "
            f"p(sorted(glob.glob({str(photos / '*.jpg')!r})), pool=True)"
        )
        cold = {
            "Transformers pipeline script, batch 16": [sys.executable, "-c", hf_script],
            "dino3 embed command": [
                sys.executable, "-m", "dino3.cli", "embed", str(photos), "-m", str(model),
                "-o", str(tmp / "cold.npz"), "-q", "--overwrite",
            ],
        }  # fmt: skip
        cold_seconds = {}
        for name, command in cold.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            cold_seconds[name] = time.perf_counter() - start

    base = speed["Transformers pipeline, batch 1"]
    lines = [
        f"End to end, {len(paths)} JPEG photos -> ViT-S/16 CLS embeddings (PyTorch rows in fp32), "
        f"torch {torch.get_num_threads()} threads, median of {args.reps}. The pipelines run with the model "
        "loaded; each `dino3 embed` row also loads the model, compiles it from its cache and writes its "
        "file; each OpenVINO peer row compiles its model file from OpenVINO's cache:",
        "",
        "| run | images/s | vs Transformers batch 1 |",
        "|---|---|---|",
        *[f"| {name} | {s:.1f} | {s / base:.2f}x |" for name, s in speed.items()],
        "",
        "From a fresh process (imports, model loading, 64 images): "
        + "; ".join(f"{name} {s:.1f} s" for name, s in cold_seconds.items())
        + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("End to end", text)


if __name__ == "__main__":
    main()
