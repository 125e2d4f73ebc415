"""dino3's backends and precisions against the peers' fast paths, in one run.

    python benchmarks/backends.py           # prints a markdown table; --save puts it in RESULTS.md

ViT-S/16 with random weights of realistic scale at 224 px, batch 32 (--batch), on the CPU. dino3:
PyTorch (fp32, bf16, int8-dynamic), ONNX Runtime (f32, int8) and OpenVINO (f32, bf16, int8 with
NNCF) through `dino3.load(..., backend=...)`. Peers: Transformers eager (fp32, bf16), and the
Transformers model exported to ONNX run by ONNX Runtime (f32, dynamic int8) and OpenVINO (f32,
bf16, NNCF int8 calibrated on the same sample photos). Median images/s of --reps interleaved runs;
the cosine of the CLS token to dino3's fp32, lowest over the example photos.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from common import export_transformers_onnx, interleaved_seconds, save_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vits16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)

    import nncf
    import onnxruntime as ort
    import openvino as ov
    import transformers
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import dino3
    from helpers import randomize_

    nncf.set_log_level(logging.ERROR)
    tmp = Path(tempfile.mkdtemp())
    os.environ["DINO3_CACHE"] = str(tmp / "cache")
    config = dino3.get_preset(args.preset).make_config()
    torch.manual_seed(0)
    ours = randomize_(dino3.DINOv3ViTModel(config)).eval()
    ours.save_pretrained(tmp / "model")
    reference = transformers.DINOv3ViTModel.from_pretrained(tmp / "model").eval()

    photos = dino3.DINOv3ViTImageProcessor()(sorted((ROOT / "examples" / "images").glob("*.[jp][pn]g"))).pixel_values
    samples = sorted((ROOT / "src" / "dino3" / "assets").glob("*.jpg"))
    calibration = [dino3.DINOv3ViTImageProcessor()(s).pixel_values.numpy() for s in samples]

    # The peers' path: Transformers' model exported to ONNX (fixed 224 x 224, dynamic batch).
    hf_onnx = export_transformers_onnx(reference, tmp / "transformers.onnx")
    hf_onnx_int8 = tmp / "transformers-int8.onnx"
    quantize_dynamic(str(hf_onnx), str(hf_onnx_int8), weight_type=QuantType.QInt8)
    core = ov.Core()
    ov_int8 = nncf.quantize(
        core.read_model(str(hf_onnx)), nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER
    )

    def ort_runner(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])

    def ov_runner(model, hint):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        request = compiled.create_infer_request()
        return lambda x: torch.from_numpy(request.infer({"pixel_values": x.numpy()})[compiled.output(0)].copy())

    def torch_runner(model, dtype=torch.float32):
        return lambda x: model(x.to(dtype)).last_hidden_state.float()

    def dino3_runtime(backend, precision):
        runtime = dino3.load(tmp / "model", backend=backend, precision=precision, calibration=samples)
        return lambda x: runtime(x).last_hidden_state

    runs = {
        "Transformers eager fp32": torch_runner(reference),
        "Transformers eager bf16": torch_runner(
            transformers.DINOv3ViTModel.from_pretrained(tmp / "model", dtype=torch.bfloat16).eval(), torch.bfloat16
        ),
        "Transformers ONNX + ONNX Runtime f32": ort_runner(hf_onnx),
        "Transformers ONNX + ONNX Runtime int8 (dynamic)": ort_runner(hf_onnx_int8),
        "Transformers ONNX + OpenVINO f32": ov_runner(str(hf_onnx), "f32"),
        "Transformers ONNX + OpenVINO bf16": ov_runner(str(hf_onnx), "bf16"),
        "Transformers ONNX + OpenVINO int8 (NNCF)": ov_runner(ov_int8, "f32"),
        "dino3 torch fp32": torch_runner(ours),
        "dino3 torch bf16": torch_runner(dino3.load(tmp / "model", dtype=torch.bfloat16), torch.bfloat16),
        "dino3 torch int8-dynamic": torch_runner(dino3.load(tmp / "model", quantize="int8-dynamic")),
        "dino3 onnxruntime f32": dino3_runtime("onnxruntime", "f32"),
        "dino3 onnxruntime int8": dino3_runtime("onnxruntime", "int8"),
        "dino3 openvino f32": dino3_runtime("openvino", "f32"),
        "dino3 openvino bf16": dino3_runtime("openvino", "bf16"),
        "dino3 openvino int8": dino3_runtime("openvino", "int8"),
    }
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        truth = ours(photos).cls_token
        cos = torch.nn.functional.cosine_similarity
        cosines = {name: cos(run(photos)[:, 0], truth).min().item() for name, run in runs.items()}
        seconds = interleaved_seconds({name: (lambda run=run: run(x)) for name, run in runs.items()}, args.reps)
    speed = {name: args.batch / s for name, s in seconds.items()}
    base = speed["Transformers eager fp32"]
    lines = [
        f"Backends and precisions, {args.preset} at 224 px, batch {args.batch}, CPU ({torch.get_num_threads()} "
        f"threads), median of {args.reps}; ONNX Runtime {ort.__version__}, OpenVINO {ov.__version__}, "
        f"NNCF {nncf.__version__}:",
        "",
        "| path | images/s | vs Transformers eager fp32 | CLS cosine to fp32 (lowest) |",
        "|---|---|---|---|",
        *[f"| {name} | {s:.1f} | {s / base:.2f}x | {cosines[name]:.5f} |" for name, s in speed.items()],
    ]
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("Backends", text)


if __name__ == "__main__":
    main()
