"""The package's layering, held against the code itself (parsed, not imported): every import points down the layers
or sideways within one, nothing imports in a circle, and the platform is read in one module only."""

import ast
import os
import re

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "aria_jax")

# Bottom to top; a module may import from its own layer and the layers below it.
LAYERS = (
    ("aria_jax.errors", "aria_jax.files", "aria_jax.config", "aria_jax.quant", "aria_jax.runtime", "aria_jax.compile_cache"),
    ("aria_jax.kernels",),
    ("aria_jax.model",),
    ("aria_jax.parallel",),
    ("aria_jax.checkpoint",),
    ("aria_jax.inference",),
    ("aria_jax.training",),
    ("aria_jax.serve",),
    ("aria_jax.cli",),
)
# may be imported inside functions: not needed to run Aria; tensorboardX only when a run writes TensorBoard events
# (it imports torch whenever torch is installed); wandb is not a dependency at all; PyAV only when a video is read and
# qwix only for the ragged kernel on quantized weights; fastapi / starlette / uvicorn only for `aria-jax serve` (a
# machine without them runs everything else)
OPTIONAL = ("torch", "transformers", "huggingface_hub", "tensorboardX", "wandb", "av", "qwix", "fastapi", "starlette",
            "uvicorn")
FACE = "aria_jax"  # aria_jax/__init__.py re-exports Aria, AriaConfig, AriaProcessor: above every layer


def modules() -> dict[str, ast.Module]:
    out = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = ast.parse(open(path).read(), path)
    return out


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return len(LAYERS) if module == FACE else -1


def imports(tree: ast.Module, names: set[str]) -> list[tuple[str, bool, int]]:
    """(imported aria_jax module, inside a function, line) for every import of the package in ``tree``."""
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aria_jax"):
            for alias in node.names:  # `from aria_jax.x import y`: y may be a module of its own
                full = f"{node.module}.{alias.name}"
                out.append((full if full in names else node.module, id(node) in inner, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in inner, node.lineno) for a in node.names if a.name.startswith("aria_jax")]
    return out


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) < 0] == []


def test_imports_only_point_down_or_sideways():
    tree = modules()
    upward = [f"{m}:{line} imports {target}" for m, t in tree.items() for target, _, line in imports(t, set(tree))
              if m != FACE and layer_of(target) > layer_of(m)]
    assert upward == []


def test_no_import_cycles():
    tree = modules()
    graph = {m: {t for t, _, _ in imports(tr, set(tree)) if t in tree and t != m} for m, tr in tree.items()}
    graph.pop(FACE)
    cycles = []

    def visit(node, stack, seen):
        for nxt in graph.get(node, ()):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, stack + [nxt], seen)

    for start in graph:
        visit(start, [start], {start})
    assert sorted(set(cycles))[:5] == []


def test_function_level_imports_are_only_for_optional_dependencies():
    found = []
    for m, tree in modules().items():
        functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
        for f in functions:
            for node in ast.walk(f):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    root = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                    if root not in OPTIONAL:
                        found.append(f"{m}:{node.lineno} ({root})")
    assert found == []


def test_the_platform_is_read_in_one_module():
    readers = []
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                if re.search(r"\bdefault_backend\(|\bjax\.devices\(\)\[0\]\.platform", open(path).read()):
                    readers.append(os.path.relpath(path, PACKAGE))
    assert readers == ["runtime.py"]


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_layers_are_files_under_500_lines(layer):
    long = []
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            path = os.path.join(folder, name)
            dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
            if name.endswith(".py") and layer_of(dotted.removesuffix(".__init__")) == layer:
                n = sum(1 for _ in open(path))
                if n > 500:
                    long.append(f"{dotted}: {n} lines")
    assert long == []
