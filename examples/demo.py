"""The main job on the example photos: every image of examples/images embedded into one file.

    python examples/demo.py [MODEL]        # what `make demo` runs; MODEL defaults to vits16

With access to Meta's gated weights (a Hugging Face token that was granted access) it uses them and
writes out/embeddings.npz. Without, it says so in one line and runs the same job on a checkpoint of
the same architecture with RANDOM weights, written to out/embeddings-random.npz: everything but the
features themselves is real.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dino3
from dino3.errors import HubAccessError

ROOT = Path(__file__).resolve().parents[1]


def main(model: str = "vits16") -> int:
    out = ROOT / "out"
    try:
        dino3.load_config(model)  # config.json is gated like the weights: a quick test of access
        output = out / "embeddings.npz"
    except HubAccessError as e:
        reason = str(e).split(". ")[0]
        print(f"no access to the gated DINOv3 weights ({reason}); running on RANDOM weights instead", file=sys.stderr)
        model = str(random_checkpoint(model, out / f"{model}-random"))
        output = out / "embeddings-random.npz"
    result = dino3.embed.run([ROOT / "examples" / "images"], model=model, output=output, overwrite=True)
    data = dino3.embed.read_embeddings(output)
    print(f"{output}: {len(data)} images, features {tuple(data.features.shape)}, first: {Path(data.paths[0]).name}")
    return 0 if not result.failures else 3


def random_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint with the preset's architecture and random weights (made once); the other
    examples use it too."""
    import torch

    from dino3.models import model_class_for

    if not (folder / "model.safetensors").is_file():
        preset = dino3.get_preset(name)
        torch.manual_seed(0)
        config = preset.make_config()
        model_class_for(config)(config).save_pretrained(folder)
        dino3.DINOv3ViTImageProcessor.for_preset(preset).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
