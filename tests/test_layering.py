"""The package's layers as a reader sees them: what `import tf_imaml` loads, and what the
scripts may touch (public names only, checked on their syntax trees)."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The scripts, the studies in scripts/studies/ included.
SCRIPTS = sorted((ROOT / "scripts").rglob("*.py"))
# Public methods of NamedTuples, underscored only to stay out of the field names' way.
NAMEDTUPLE_API = ("_asdict", "_replace", "_fields", "_make")


def test_import_tf_imaml_loads_the_library_only():
    # The oracles load only where they are imported; the studies' writer is not in the package.
    assert not (ROOT / "tf_imaml" / "reporting.py").exists()
    code = (
        "import sys, tf_imaml; "
        "print(sorted(m for m in sys.modules if m in ('tf_imaml.testing', 'tf_imaml.reference')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]", out.stdout


def _private_uses(path: pathlib.Path) -> list[str]:
    """`from tf_imaml... import _x` and `obj._x` on anything but `self`/`cls`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tf_imaml"):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            if node.attr in NAMEDTUPLE_API:
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize(
    "path",
    SCRIPTS,
    ids=lambda p: str(p.relative_to(ROOT / "scripts")),
)
def test_scripts_touch_no_private_name_of_the_library(path):
    assert not _private_uses(path), _private_uses(path)


def test_the_checker_finds_private_uses(tmp_path):
    # The check above could pass by finding nothing at all: show that it finds both kinds.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from tf_imaml.meta_model import _helper\nmeta._theta()\nself._ok\nx.__class__\n"
    )
    assert _private_uses(sample) == ["import _helper", "line 2: ._theta"]


# The library's layers, in import order: a module imports only modules of its own layer or of
# earlier ones (docs/layout.md). The core imports no Keras.
LAYERS = {
    "core": (
        "tree checks hvp linear_solve inner_solvers implicit hessian_free curvature unrolled "
        "solvers reference"
    ),
    # testing builds Keras learners for its problems with known answers.
    "task layer": "tasks batched meta_batch layers testing",
    "keras glue": "meta_model imaml baselines keras_glue episode_checks callbacks models evaluation",
    "data": "datasets episodes mini_imagenet pretrained",
}
LAYER_OF = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods.split()}


def _library_imports(path: pathlib.Path) -> set[str]:
    """The `tf_imaml` modules and the top-level packages a library module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {
                a.name.split(".")[0] if not a.name.startswith("tf_imaml.") else a.name.split(".")[1]
                for a in node.names
            }
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tf_imaml":
                found |= {a.name for a in node.names}
            elif node.module.startswith("tf_imaml."):
                found.add(node.module.split(".")[1])
            else:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found


def _module_path(module: str) -> pathlib.Path:
    path = ROOT / "tf_imaml" / f"{module}.py"
    return path if path.is_file() else ROOT / "tf_imaml" / module / "__init__.py"


def test_every_library_module_has_a_layer():
    package = ROOT / "tf_imaml"
    modules = {p.stem for p in package.glob("*.py")} | {
        p.parent.name for p in package.glob("*/__init__.py")
    }
    modules -= {"__init__"}
    assert modules == set(LAYER_OF), (modules - set(LAYER_OF), set(LAYER_OF) - modules)


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_imports_flow_down_the_layers(module):
    imports = _library_imports(_module_path(module))
    later = sorted(m for m in imports & set(LAYER_OF) if LAYER_OF[m] > LAYER_OF[module])
    assert not later, f"{module} ({list(LAYERS)[LAYER_OF[module]]}) imports later layers: {later}"
    if LAYER_OF[module] == 0:
        assert "keras" not in imports, f"{module} is in the functional core but imports keras"


def test_library_imports_sees_every_form_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import keras\nimport tf_imaml.imaml\nfrom tf_imaml import tasks\n"
        "from tf_imaml.meta_model import MetaLearner\nfrom . import batched\nfrom .tree import x\n"
    )
    assert _library_imports(sample) == {"keras", "imaml", "tasks", "meta_model", "batched", "tree"}
