"""The commands about models themselves and this machine: `dino3 info` (`--system`), `dino3 export`,
`dino3 convert` and `dino3 init-random`."""

from __future__ import annotations

import argparse
from typing import Any

from .common import EXIT_OK, plural


def cmd_info(args: argparse.Namespace) -> int:
    from ..models.pretrained import inspect_checkpoint, parameter_shapes
    from ..presets import all_presets, find_preset
    from ..weights.formats import LAYOUT_NAMES
    from ..weights.hub import HubOptions, resolve, weights_summary

    if args.system:
        import json

        from ..system import format_report, report

        facts = report()
        print(json.dumps(facts, indent=2) if args.json else format_report(facts))
        return EXIT_OK
    if args.model is None:
        print("known models (dino3 info NAME for one):")
        for p in all_presets():
            print(f"  {p.name:18} {p.architecture:9} {p.params:>6}  {p.dataset:10} {p.hub_id}")
        return EXIT_OK
    preset = find_preset(args.model)
    found = None
    try:
        found = inspect_checkpoint(args.model, check_hash=False, hub=HubOptions()) if _is_file(args.model) else None
        # a local folder's weight files are looked at (headers only); a hub repo's are not downloaded
        checkpoint = found.checkpoint if found else resolve(args.model, need_weights=_exists(args.model))
        config = found.config if found else checkpoint.config
        preset = preset or checkpoint.preset or (found.preset if found else None)
        if found is not None:  # a single file: what inspecting it found
            where = f"{LAYOUT_NAMES[found.layout]} layout, 1 file, {found.stored_dtype}"
        else:
            summary = weights_summary(checkpoint)
            where = f"{LAYOUT_NAMES['hf']} layout, {plural(summary.files, 'file')}, {summary.dtype}"
    except Exception as e:  # noqa: BLE001  (a preset is described without its weights)
        if preset is None:
            raise
        config = preset.make_config()
        where = f"not available here ({str(e).splitlines()[0]})"
    count = sum(_numel(s) for s in parameter_shapes(config).values())
    kind = "ViT" if config.model_type == "dinov3_vit" else "ConvNeXt"
    lines = [f"{args.model}  ({preset.hub_id if preset else args.model})"]
    lines.append(f"  architecture   DINOv3 {kind}, {count / 1e6:.1f}M parameters")
    lines += [f"  {line}" for line in config.describe()]
    if found is not None and found.config_from == "tensors":
        lines.append("  (architecture inferred from the tensors: no preset has these shapes; config= overrides)")
    if preset is not None:
        lines.append(f"  trained on     {preset.dataset}")
        lines.append(f"  normalisation  mean {list(preset.image_mean)}, std {list(preset.image_std)}")
        lines.append(f"  licence        {preset.license}")
    lines.append(f"  weights        {where}")
    print("\n".join(lines))
    return EXIT_OK


def _is_file(name: str) -> bool:
    from pathlib import Path

    return Path(name).expanduser().is_file()


def _exists(name: str) -> bool:
    from pathlib import Path

    return Path(name).expanduser().exists()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_export(args: argparse.Namespace) -> int:
    from ..api import export_onnx

    path = export_onnx(args.model, args.output, opset=args.opset, check_hash=not args.no_hash_check)
    print(
        f"wrote {path} (dynamic batch, height and width; outputs last_hidden_state, pooler_output), "
        f"with {path.stem}.preprocessor_config.json and {path.stem}.dino3.json beside it"
    )
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from ..conversion import convert
    from ..weights.formats import LAYOUT_NAMES

    kwargs: dict[str, Any] = {"check_hash": not args.no_hash_check}
    if args.config:
        kwargs["config"] = args.config
    layout = convert(args.src, args.dst, to=args.to, overwrite=args.overwrite, **kwargs)
    print(f"wrote {args.dst} in the {LAYOUT_NAMES[layout]} layout")
    return EXIT_OK


def cmd_init_random(args: argparse.Namespace) -> int:
    import torch

    from ..models import model_class_for
    from ..presets import get_preset
    from ..processing import DINOv3ViTImageProcessor

    preset = get_preset(args.model)
    config = preset.make_config()
    torch.manual_seed(args.seed)
    model = model_class_for(config)(config)
    model.save_pretrained(args.folder)
    DINOv3ViTImageProcessor.for_preset(preset).save_pretrained(args.folder)
    print(f"wrote {args.folder}: {preset.name}'s architecture with RANDOM weights (for trials, not for features)")
    return EXIT_OK


def _layouts() -> tuple[str, ...]:
    from ..weights.formats import LAYOUTS

    return LAYOUTS


def add_commands(commands: Any) -> None:
    info = commands.add_parser("info", help="describe a model (architecture, size, weights) without loading it")
    info.add_argument("model", nargs="?", help="preset name, hub id, checkpoint folder or weights file; none: list")
    info.add_argument(
        "--system",
        action="store_true",
        help="describe this machine instead: CPU features, torch and oneDNN, threads, which dtypes and backends are "
        "fast or emulated here, the extras installed, GPUs (paste it into a bug report)",
    )
    info.add_argument("--json", action="store_true", help="with --system: print it as JSON")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch and size, no control flow)",
        description="Export a model to ONNX for ONNX Runtime, OpenVINO, TensorRT and others: dynamic batch, "
        "height and width, no If/Loop nodes, outputs last_hidden_state and pooler_output. NAME.preprocessor_"
        "config.json and NAME.dino3.json are written beside NAME.onnx.",
    )
    export.add_argument("model", help="preset name, hub id, checkpoint folder or weights file")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=20, help="ONNX opset (default: 20; 17 and up work)")
    export.add_argument("--no-hash-check", action="store_true", help="skip the SHA-256 check of Meta's file names")
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
    conv.add_argument("--to", choices=_layouts(), help="target layout (default: from DST's suffix)")
    conv.add_argument("--config", help="for a bare weights file: a preset name or config.json")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    conv.add_argument("--no-hash-check", action="store_true", help="skip the SHA-256 check of Meta's file names")
    conv.set_defaults(run=cmd_convert)

    init = commands.add_parser("init-random", help="write a preset's architecture with random weights (trials)")
    init.add_argument("model", help="preset name, e.g. vits16")
    init.add_argument("folder", help="where to write config.json, model.safetensors, preprocessor_config.json")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=cmd_init_random)
