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
