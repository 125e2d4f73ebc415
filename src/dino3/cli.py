"""The `dino3` command: embed folders of images, describe a model, make a random checkpoint.

    dino3 embed photos/ -m vits16 -o features.npz          # CLS embeddings of every image in photos/
    dino3 embed a.jpg b.png -m vitb16 --pool cls+mean -o f.safetensors
    dino3 info vitl16-sat493m
    dino3 convert dinov3_vits16_pretrain_lvd1689m-08c60483.pth vits16-hf/   # Meta -> Hugging Face
    dino3 export vits16 -o vits16.onnx                     # ONNX with dynamic batch and size
    dino3 init-random vits16 checkpoints/vits16-random     # offline trials, random weights

Exit status: 0 when every image was embedded, 3 when some could not be (they are listed), 1 for an
error that stopped the run, 2 for a mistake in the command line.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
OUTPUT_SUFFIXES = (".npz", ".npy", ".safetensors", ".parquet")
POOLS = ("cls", "mean", "cls+mean", "patches")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


# -- inputs ---------------------------------------------------------------------------------------
def expand_inputs(inputs: list[str]) -> tuple[list[str], int]:
    """Files, folders (recursively: image files only), globs and list files -> (paths, ignored count).

    A list file (.txt, .lst, .list) holds one path or URL per line; relative paths are relative to
    the list file. Order: as given, folders and globs sorted.
    """
    paths: list[str] = []
    ignored = 0
    for item in inputs:
        path = Path(item).expanduser()
        if item.startswith(("http://", "https://")):
            paths.append(item)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(str(file))
                else:
                    ignored += 1
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    is_url = line.startswith(("http://", "https://"))
                    paths.append(line if is_url or os.path.isabs(line) else str(path.parent / line))
        elif path.exists() or not glob.has_magic(item):
            paths.append(item)  # a file, or a missing one: reported as a failure with its reason
        else:
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise UsageError(f"{item}: the pattern matches no file")
            paths += matches
    return paths, ignored


# -- what is computed per image -----------------------------------------------------------------
@dataclass
class Settings:
    """Everything that decides the numbers; a resumed run must have the same."""

    model: str
    pool: str
    layers: list[int] | int | None
    size: int | None
    keep_aspect: str | None
    target: int | None
    fit: str
    dtype: str
    jpeg_draft: bool
    batch_size: int
    quantize: str | None
    backend: str
    precision: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def features_of(model, pixel_values, settings: Settings) -> tuple[list, tuple[int, int]]:
    """Per-image feature arrays for one batch, as float32 numpy, and the batch's patch grid."""
    import torch

    with torch.inference_mode():
        if settings.layers is None:
            out = model(pixel_values)
            pairs = [(out.patch_tokens, out.cls_token)]
            grid = out.grid_size
        else:
            maps = model.get_intermediate_layers(pixel_values, n=settings.layers, reshape=True, return_class_token=True)
            if len({(m.shape[1], *m.shape[-2:]) for m, _ in maps}) > 1:
                raise UsageError("the chosen ConvNeXt stages differ in width and size; choose one stage (--layers 3,)")
            grid = tuple(maps[0][0].shape[-2:])
            pairs = [(m.flatten(2).transpose(1, 2), cls) for m, cls in maps]  # (B, h*w, D), (B, D)
        per_layer = [_pool(patches, cls, settings.pool, grid) for patches, cls in pairs]
        stacked = per_layer[0] if settings.layers is None else torch.stack(per_layer, dim=1)
        stacked = stacked.float().cpu().numpy()
    return list(stacked), grid


def _pool(patches, cls, pool: str, grid: tuple[int, int]):
    import torch

    if pool == "cls":
        return cls
    if pool == "mean":
        return patches.mean(dim=1)
    if pool == "cls+mean":  # Meta's linear-probe input
        return torch.cat((cls, patches.mean(dim=1)), dim=-1)
    return patches.unflatten(1, grid)  # (B, h, w, D)


# -- chunks, resume, output ----------------------------------------------------------------------
@dataclass
class Run:
    """A run's partial results on disk: one .npz per chunk of inputs, written atomically."""

    output: Path
    paths: list[str]
    settings: Settings
    chunk_size: int
    folder: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(str(self.output) + ".partial")

    def manifest(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(self.paths).encode()).hexdigest()
        return {
            "inputs_sha256": digest,
            "count": len(self.paths),
            "chunk_size": self.chunk_size,
            **self.settings.as_dict(),
        }

    def start(self, resume: bool, overwrite: bool) -> None:
        if self.output.exists() and not overwrite:
            raise UsageError(f"{self.output} exists; pass --overwrite to replace it")
        if self.folder.exists():
            if overwrite:
                shutil.rmtree(self.folder)
            elif not resume:
                raise UsageError(
                    f"{self.folder} holds an interrupted run: pass --resume to continue it, "
                    "or --overwrite to start over"
                )
            else:
                found = json.loads((self.folder / "manifest.json").read_text())
                if found != self.manifest():
                    changed = sorted(
                        k for k in found.keys() | self.manifest().keys() if found.get(k) != self.manifest().get(k)
                    )
                    raise UsageError(
                        f"cannot resume {self.folder}: the inputs or settings changed ({', '.join(changed)})"
                    )
                return
        self.folder.mkdir(parents=True)
        _write_atomic(self.folder / "manifest.json", json.dumps(self.manifest(), indent=1).encode())

    def chunk_file(self, k: int) -> Path:
        return self.folder / f"chunk-{k:06d}.npz"

    def save_chunk(self, k: int, indices: list[int], features: list, grids: list, failures: list) -> None:
        import numpy as np

        arrays = {
            "indices": np.asarray(indices, dtype=np.int64),
            "grids": np.asarray(grids, dtype=np.int64).reshape(-1, 2),
            "failed": np.asarray([i for i, _ in failures], dtype=np.int64),
            "reasons": np.asarray([r for _, r in failures], dtype=str),
        }
        for j, array in enumerate(features):
            arrays[f"f{j}"] = array
        tmp = self.chunk_file(k).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.chunk_file(k))

    def load_chunks(self):
        """(index -> features, index -> grid, [(index, reason)]) over all chunks on disk."""
        import numpy as np

        features, grids, failures = {}, {}, []
        for file in sorted(self.folder.glob("chunk-*.npz")):
            with np.load(file, allow_pickle=False) as data:
                for j, (index, grid) in enumerate(zip(data["indices"], data["grids"])):
                    features[int(index)] = data[f"f{j}"]
                    grids[int(index)] = tuple(int(g) for g in grid)
                failures += [(int(i), str(r)) for i, r in zip(data["failed"], data["reasons"])]
        return features, grids, failures


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_output(output: Path, paths: list[str], features: list, grids: list, meta: dict[str, Any]) -> None:
    """Write the embeddings with their image paths, atomically, in the format the suffix names."""
    import numpy as np

    ragged = len({f.shape for f in features}) > 1  # patch grids of different sizes
    grid_sizes = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
    if ragged:  # patch rows of all images one after the other; offsets[i]:offsets[i+1] are image i's
        counts = [int(f.shape[0] * f.shape[1]) for f in features]
        array = np.concatenate([f.reshape(c, *f.shape[2:]) for f, c in zip(features, counts)])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    else:
        array = np.stack(features) if features else np.zeros((0,), np.float32)
        offsets = None
    suffix = output.suffix.lower()
    tmp = output.with_name(output.name + ".tmp")
    if suffix == ".npz":
        arrays = {"features": array, "paths": np.asarray(paths, dtype=str), "grid_sizes": grid_sizes}
        arrays["meta"] = np.asarray(json.dumps(meta))
        if offsets is not None:
            arrays["offsets"] = offsets
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    elif suffix == ".npy":
        if ragged:
            raise UsageError("patch grids of different sizes do not fit one .npy array; write .npz or .safetensors")
        with open(tmp, "wb") as f:
            np.save(f, array)
        _write_atomic(output.with_name(output.name + ".paths.txt"), ("\n".join(paths) + "\n").encode())
    elif suffix == ".safetensors":
        import torch
        from safetensors.torch import save_file

        tensors = {
            "features": torch.from_numpy(np.ascontiguousarray(array)),
            "grid_sizes": torch.from_numpy(grid_sizes),
        }
        if offsets is not None:
            tensors["offsets"] = torch.from_numpy(offsets)
        save_file(tensors, str(tmp), metadata={"paths": json.dumps(paths), "meta": json.dumps(meta)})
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("writing .parquet needs pyarrow: pip install 'dino3[parquet]' (or pyarrow)") from None
        flat = [f.reshape(-1) for f in features]
        table = pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "features": pa.array(flat, pa.list_(pa.float32())),
                "shape": pa.array([list(f.shape) for f in features], pa.list_(pa.int64())),
                "grid_h": pa.array(grid_sizes[:, 0]),
                "grid_w": pa.array(grid_sizes[:, 1]),
            }
        )
        table = table.replace_schema_metadata({"dino3": json.dumps(meta)})
        pq.write_table(table, tmp)
    os.replace(tmp, output)


# -- commands -------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"-o {output}: the output must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if args.keep_aspect and not args.target:
        raise UsageError("--keep-aspect needs --target, the size in pixels of that side")
    paths, ignored = expand_inputs(args.inputs)
    if not paths:
        raise UsageError("no images found in the inputs")
    layers = _parse_layers(args.layers)
    settings = Settings(
        model=args.model,
        pool=args.pool,
        layers=layers,
        size=None if args.keep_aspect else args.size,
        keep_aspect=args.keep_aspect,
        target=args.target,
        fit=args.fit,
        dtype=args.dtype,
        jpeg_draft=args.jpeg_draft,
        batch_size=args.batch_size,
        quantize=args.quantize,
        backend=args.backend,
        precision=args.precision,
    )
    chunk = max(1, args.checkpoint_every // args.batch_size) * args.batch_size
    run = Run(output, paths, settings, chunk)
    run.start(resume=args.resume, overwrite=args.overwrite)

    import torch

    from .models import load
    from .pipeline import iter_batches
    from .processing import DINOv3ViTImageProcessor

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "torch":
        if args.precision:
            raise UsageError("--precision is for --backend onnxruntime/openvino; with torch use --dtype and --quantize")
        model = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    else:
        if args.layers is not None:
            raise UsageError("--layers needs the torch backend (the exported graph returns the final tokens)")
        if args.quantize or args.dtype != "float32":
            raise UsageError("with --backend, choose the precision with --precision (f32, bf16, int8)")
        calibration = expand_inputs([args.calibration])[0] if args.calibration else None
        model = load(args.model, backend=args.backend, precision=args.precision or "f32", calibration=calibration)
        print(f"backend {args.backend}, precision {model.precision}", file=sys.stderr)
    overrides: dict[str, Any] = {"jpeg_draft": args.jpeg_draft}
    if args.keep_aspect:
        overrides.update(keep_aspect=args.keep_aspect, target_size=args.target, fit=args.fit)
        # sides become multiples of the ViT's patch, or of the ConvNeXt's total stride (32)
        overrides["patch_size"] = model.config.patch_size if model.config.model_type == "dinov3_vit" else 32
    else:
        overrides["size"] = {"height": args.size, "width": args.size}
    processor = DINOv3ViTImageProcessor.from_pretrained(args.model, **overrides)

    chunks = range(0, (len(paths) + chunk - 1) // chunk)
    done_chunks = [k for k in chunks if run.chunk_file(k).exists()]
    done = sum(min(chunk, len(paths) - k * chunk) for k in done_chunks)
    progress = _progress(len(paths), done, args.quiet)
    started = time.perf_counter()
    for k in chunks:
        if k in done_chunks:
            continue
        start = k * chunk
        sources = paths[start : start + chunk]
        failures: list[tuple[int, str]] = []
        indices, features, grids = [], [], []

        def failed(i, source, error, failures=failures, start=start):
            failures.append((start + i, str(error)))
            progress.update(1)

        for batch in iter_batches(sources, processor, args.batch_size, args.workers, on_error=failed):
            pixels = batch.pixel_values.to(device=model.device, dtype=model.dtype)
            per_image, grid = features_of(model, pixels, settings)
            indices += [start + i for i in batch.indices]
            features += per_image
            grids += [grid] * len(per_image)
            progress.update(len(per_image))
        run.save_chunk(k, indices, features, grids, failures)
    progress.close()

    by_index, grid_by_index, failures = run.load_chunks()
    order = sorted(by_index)
    meta = {**settings.as_dict(), "dino3_version": _version(), "failed": len(failures)}
    write_output(
        output, [paths[i] for i in order], [by_index[i] for i in order], [grid_by_index[i] for i in order], meta
    )
    failures.sort()
    if failures:
        lines = "".join(f"{paths[i]}\t{reason}\n" for i, reason in failures)
        _write_atomic(output.with_name(output.name + ".failures.tsv"), lines.encode())
    shutil.rmtree(run.folder)

    seconds = time.perf_counter() - started
    computed = len(order) - done
    rate = f", {computed / seconds:.1f} images/s" if computed and seconds > 0 else ""
    print(f"wrote {output}: {len(order)} images{rate}", file=sys.stderr)
    if ignored:
        files = "file" if ignored == 1 else "files"
        print(f"ignored {ignored} {files} without an image suffix in the folders given", file=sys.stderr)
    if failures:
        print(f"{len(failures)} images could not be embedded (also in {output.name}.failures.tsv):", file=sys.stderr)
        for i, reason in failures[:20]:
            print(f"  {reason}" if paths[i] in reason else f"  {paths[i]}: {reason}", file=sys.stderr)
        if len(failures) > 20:
            print(f"  ... and {len(failures) - 20} more", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def _parse_layers(text: str | None) -> list[int] | int | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--layers {text}: give a count (4) or block indices (2,5,8,11)") from None
    if "," not in text:
        return values[0]
    return values


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, quiet: bool):
    if quiet:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
        return _NoProgress()
    return tqdm(total=total, initial=done, unit="img", desc="embedding", file=sys.stderr, smoothing=0.1)


def _version() -> str:
    from . import __version__

    return __version__


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .models import MODEL_CLASSES
    from .presets import find_preset
    from .weights.hub import resolve

    preset = find_preset(args.model)
    lines = []
    try:
        checkpoint = resolve(args.model, need_weights=False)
        config, source = checkpoint.config, checkpoint.source
        from .weights.files import safetensors_dtype

        weights = resolve(args.model).weight_files
        where = f"Hugging Face layout, {len(weights)} safetensors file(s), {safetensors_dtype(weights)}"
        preset = preset or checkpoint.preset
    except Exception as e:  # the description of a preset needs no weights
        if preset is None:
            raise
        config, source = preset.make_config(), preset.hub_id
        where = f"not available here ({str(e).splitlines()[0]})"
    with torch.device("meta"):
        model = MODEL_CLASSES[config.model_type](config)
    lines.append(f"{args.model}  ({source})")
    if config.model_type == "dinov3_vit":
        mlp = "SwiGLU" if config.use_gated_mlp else "MLP"
        lines.append(f"  architecture   DINOv3 ViT, {model.num_parameters() / 1e6:.1f}M parameters")
        lines.append(
            f"  layers         {config.num_hidden_layers} blocks, width {config.hidden_size}, "
            f"{config.num_attention_heads} heads of {config.head_dim}, "
            f"{mlp} {config.intermediate_size} ({config.hidden_act})"
        )
        lines.append(
            f"  tokens         1 CLS + {config.num_register_tokens} registers + one per {config.patch_size}px patch"
        )
    else:
        lines.append(f"  architecture   DINOv3 ConvNeXt, {model.num_parameters() / 1e6:.1f}M parameters")
        lines.append(
            f"  stages         depths {config.depths}, widths {config.hidden_sizes}; 1 pooled token + one per 32px"
        )
    if preset is not None:
        lines.append(f"  trained on     {preset.dataset}")
        lines.append(f"  normalisation  mean {list(preset.image_mean)}, std {list(preset.image_std)}")
    lines.append(f"  weights        {where}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    path = export_onnx(args.model, args.output, opset=args.opset)
    print(
        f"wrote {path} (dynamic batch, height and width; outputs last_hidden_state, pooler_output), "
        f"with preprocessor_config.json and dino3.json beside it"
    )
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights.convert import convert

    kwargs = {"config": args.config} if args.config else {}
    if args.no_hash_check:
        kwargs["check_hash"] = False
    layout = convert(args.src, args.dst, to=args.to, **kwargs)
    names = {"hf": "Hugging Face", "meta": "Meta", "timm": "timm"}
    print(f"wrote {args.dst} in the {names[layout]} layout")
    return EXIT_OK


def cmd_init_random(args: argparse.Namespace) -> int:
    import torch

    from .models import MODEL_CLASSES
    from .presets import get_preset
    from .processing import DINOv3ViTImageProcessor

    preset = get_preset(args.model)
    config = preset.make_config()
    torch.manual_seed(args.seed)
    model = MODEL_CLASSES[config.model_type](config)
    model.save_pretrained(args.folder)
    DINOv3ViTImageProcessor.from_pretrained(preset.name).save_pretrained(args.folder)
    print(f"wrote {args.folder}: {preset.name}'s architecture with RANDOM weights (for trials, not for features)")
    return EXIT_OK


# -- argument parsing -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino3",
        description="DINOv3 features from the command line. Run `dino3 COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed",
        help="embed images (files, folders, globs, list files) into one output file",
        description="Embed images with a DINOv3 model and write the features, with the image paths in order, to "
        "one file (.npz, .npy + .paths.txt, .safetensors or .parquet). Images that cannot be read are "
        "listed and skipped. An interrupted run can be resumed with --resume.",
        epilog="examples:\n  dino3 embed photos/ -m vits16 -o features.npz\n"
        "  dino3 embed list.txt -m vitl16 --pool cls+mean --batch-size 32 -o features.safetensors\n"
        "  dino3 embed scans/ -m vits16 --pool patches --keep-aspect shorter --target 448 -o dense.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (searched recursively), globs, or list files (.txt: one path per line)",
    )
    embed.add_argument(
        "-m", "--model", required=True, help="preset name (see `dino3 info`), hub id or local checkpoint folder"
    )
    embed.add_argument("-o", "--output", required=True, help="output file: .npz, .npy, .safetensors or .parquet")
    embed.add_argument(
        "--pool",
        choices=POOLS,
        default="cls",
        help="cls token, mean of patch tokens, both concatenated (Meta's linear-probe input), "
        "or the patch grids (default: cls)",
    )
    embed.add_argument(
        "--layers",
        help="take intermediate blocks (ConvNeXt: stages) instead of the output: a count of last ones (4) "
        "or 0-based indices (2,5,8,11; one index: 7,); adds a layer axis",
    )
    embed.add_argument("--size", type=int, default=224, help="square resize, as Transformers' processor (default: 224)")
    embed.add_argument(
        "--keep-aspect",
        choices=("shorter", "longer"),
        help="keep the aspect ratio: scale this side to --target instead of squashing",
    )
    embed.add_argument("--target", type=int, help="with --keep-aspect: that side's size in pixels")
    embed.add_argument(
        "--fit",
        choices=("crop", "pad", "resize"),
        default="crop",
        help="with --keep-aspect: how both sides reach a multiple of the patch size (default: crop)",
    )
    embed.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    embed.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    embed.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype (default: float32)"
    )
    embed.add_argument(
        "--quantize",
        choices=("int8-dynamic", "int8-weight", "int4-weight"),
        help="quantize the linear layers: int8-dynamic is fastest on CPUs with VNNI (see the README)",
    )
    embed.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "openvino"),
        default="torch",
        help="inference engine; onnxruntime and openvino run a cached ONNX export (default: torch)",
    )
    embed.add_argument(
        "--precision", choices=("f32", "bf16", "int8"), help="with --backend: the precision (default: f32)"
    )
    embed.add_argument("--calibration", help="with --backend openvino --precision int8: images to calibrate on")
    embed.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the model (default: 2)")
    embed.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    embed.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode large JPEGs at reduced scale: faster, slightly different pixels",
    )
    embed.add_argument("--resume", action="store_true", help="continue an interrupted run from where it stopped")
    embed.add_argument("--overwrite", action="store_true", help="replace the output (and any interrupted run)")
    embed.add_argument("--checkpoint-every", type=int, default=256, help="save progress every N images (default: 256)")
    embed.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=cmd_embed)

    info = commands.add_parser("info", help="describe a model: architecture, size, normalisation, weights found")
    info.add_argument("model", help="preset name, hub id or local checkpoint folder")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch and size, no control flow)",
        description="Export a model to ONNX for ONNX Runtime, OpenVINO, TensorRT and others: dynamic batch, "
        "height and width, no If/Loop nodes, outputs named last_hidden_state and pooler_output. The "
        "processor's preprocessor_config.json is written beside it.",
    )
    export.add_argument("model", help="preset name, hub id, checkpoint folder or weights file")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=20, help="ONNX opset (default: 20; 17 and up work)")
    export.set_defaults(run=cmd_export)

    conv = commands.add_parser(
        "convert",
        help="convert a checkpoint between the Hugging Face, Meta and timm layouts",
        description="Read a checkpoint in any layout (a preset, hub id, folder or weights file), check it "
        "strictly, and write it in another layout: a Hugging Face folder, a Meta .pth or a timm file.",
        epilog="examples:\n  dino3 convert dinov3_vits16_pretrain_lvd1689m-08c60483.pth vits16-hf/\n"
        "  dino3 convert vits16-hf/ vits16-timm.safetensors --to timm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("src", help="preset name, hub id, checkpoint folder or weights file (.pth, .safetensors)")
    conv.add_argument("dst", help="a folder (Hugging Face) or a file (.pth: Meta, .safetensors: timm)")
    conv.add_argument("--to", choices=("hf", "meta", "timm"), help="target layout (default: from DST's suffix)")
    conv.add_argument(
        "--config",
        help="for a bare weights file: a preset name or config.json (default: read from its shapes and name)",
    )
    conv.add_argument("--no-hash-check", action="store_true", help="skip the SHA-256 check of Meta file names")
    conv.set_defaults(run=cmd_convert)

    init = commands.add_parser(
        "init-random",
        help="write a checkpoint with a preset's architecture and random weights, for offline trials",
    )
    init.add_argument("model", help="preset name, e.g. vits16")
    init.add_argument("folder", help="where to write config.json, model.safetensors, preprocessor_config.json")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=cmd_init_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import Dino3Error

    try:
        return args.run(args)
    except UsageError as e:
        parser.exit(EXIT_USAGE, f"dino3: error: {e}\n")
    except KeyboardInterrupt:
        print("\ndino3: interrupted; `--resume` continues from the last saved chunk", file=sys.stderr)
        return 130
    except (Dino3Error, OSError, ValueError) as e:
        print(f"dino3: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
