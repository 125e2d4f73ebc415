"""The house stays straight: imports run one way, down the layers of DESIGN.md, with no cycle, and
the models keep no process-wide state.

Every import in the package is read from the source (function-level ones included), so that a lazy
import that goes up a layer is caught as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dino3"

# Lowest first. A module may import modules of its own layer or of lower ones, never higher ones.
LAYERS = [
    ["dino3._version", "dino3.errors", "dino3._io", "dino3._openmp", "dino3.system", "dino3._progress"],
    ["dino3.config"],
    ["dino3.presets"],
    ["dino3.weights"],
    ["dino3.quantization"],
    ["dino3.models"],
    ["dino3.runtime"],
    ["dino3.fetch"],
    ["dino3.images", "dino3.video"],
    ["dino3.processing"],
    ["dino3.features", "dino3.linear"],
    ["dino3.api", "dino3.conversion"],
    ["dino3.pipeline", "dino3.recipe", "dino3.text"],
    ["dino3.embed", "dino3.integrations"],
    ["dino3.dense", "dino3.index", "dino3.probe", "dino3.anomaly"],
    ["dino3.serve"],
    ["dino3.cli"],
]


def module_names() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        name = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = file
    return found


def imports_of(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The dino3 modules `name` imports, anywhere in its source."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            base = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "dino3":
                out.add(target)
    return out


def layer_of(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{name} is in no layer of LAYERS: add it where it belongs (and to DESIGN.md)")


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, file, known) for name, file in known.items() if name != "dino3"}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_only_go_down_the_layers():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in graph().items()
        for b in targets
        if layer_of(b) > layer_of(a)
    ]
    assert upward == []


def test_the_checks_notice_a_cycle_and_an_upward_arrow():
    edges = {"dino3.config": {"dino3.weights.hub"}, "dino3.weights.hub": {"dino3.config"}}
    assert cycles(edges) == [["dino3.config", "dino3.weights.hub"]]
    assert layer_of("dino3.weights.hub") > layer_of("dino3.config")  # so the arrow config -> hub is upward


# -- no process-wide state in the models ---------------------------------------------------------------------
# Calls that start a process or change a process-wide setting, and settings that must not be assigned.
FORBIDDEN_CALLS = (
    "subprocess.",
    "multiprocessing.",
    "os.system",
    "os.fork",
    "os.spawn",
    "os.putenv",
    "torch.set_",  # set_num_threads, set_default_dtype, set_float32_matmul_precision, ...
    "torch.use_deterministic_algorithms",
    "warnings.simplefilter",
    "warnings.filterwarnings",
)
FORBIDDEN_SETTINGS = ("torch.backends.", "os.environ", "Image.MAX_IMAGE_PIXELS", "PIL.Image.MAX_IMAGE_PIXELS")
# torch's process-wide flags, however they are reached (`matmul = torch.backends.mkldnn.matmul` first).
SETTING_ATTRIBUTES = {"fp32_precision", "allow_tf32", "allow_bf16_reduced_precision_reduction", "benchmark", "engine"}


@pytest.mark.parametrize("file", sorted((PACKAGE / "models").glob("*.py")), ids=lambda f: f.name)
def test_models_start_no_process_and_change_no_process_wide_setting(file):
    tree = ast.parse(file.read_text(encoding="utf-8"))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"imports {n}" for n in names if n and n.split(".")[0] in ("subprocess", "multiprocessing")]
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                text = ast.unparse(target)
                setting = isinstance(target, ast.Attribute) and target.attr in SETTING_ATTRIBUTES
                if setting or any(text.startswith(s) for s in FORBIDDEN_SETTINGS):
                    problems.append(f"sets {text}")
        if isinstance(node, ast.Call):
            text = ast.unparse(node.func)
            if any(text.startswith(s) for s in FORBIDDEN_CALLS):
                problems.append(f"calls {text}")
        if isinstance(node, ast.Global):
            problems.append(f"global {', '.join(node.names)}")
    assert problems == [], f"{file.name}: {problems}"
