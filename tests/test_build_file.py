"""BUILD declares every module, test and script, with the dependencies their imports need.

Bazel cannot run offline here (Debian's bazel-bootstrap stops fetching rules_cc), so this
test stands in for `bazel build`'s dependency checking: it reads BUILD as Starlark (a Python
subset), and compares each target's `deps` with the imports of its source.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Import name -> the PyPI requirement that provides it.
THIRD_PARTY = {
    "tensorflow": "tensorflow",
    "keras": "keras",
    "numpy": "numpy",
    "absl": "absl-py",
    "tensorflow_probability": "tensorflow-probability",
    "tensorboard": "tensorboard",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "matplotlib": "matplotlib",
}
RULES = ("py_library", "py_test", "py_binary")


def _targets():
    """Evaluates BUILD with stand-ins for its rules; returns {name: (rule, srcs, deps)}."""
    targets = {}

    def rule(kind):
        def add(name, srcs=(), deps=(), **kwargs):
            assert name not in targets, f"BUILD declares {name} twice"
            targets[name] = (kind, list(srcs), list(deps))

        return add

    scope = {kind: rule(kind) for kind in RULES}
    scope.update(
        load=lambda *args: None,
        package=lambda **kwargs: None,
        licenses=lambda kinds: None,
        requirement=lambda name: f"@pypi//{name}",
        glob=lambda patterns, **kwargs: [],
    )
    exec(compile((ROOT / "BUILD").read_text(), "BUILD", "exec"), scope)  # noqa: S102
    return targets


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "tf_imaml":
                names.add(node.module)
                continue
            # `from tf_imaml import tree` needs the module, not the package's __init__.
            for alias in node.names:
                package = ROOT / "tf_imaml" / alias.name / "__init__.py"
                is_module = (ROOT / "tf_imaml" / f"{alias.name}.py").exists() or package.exists()
                names.add(f"tf_imaml.{alias.name}" if is_module else "tf_imaml")
    return names


def _expected_deps(path: pathlib.Path, src_to_target: dict) -> set[str]:
    deps = set()
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "tf_imaml":
            module = ROOT / (name.replace(".", "/") + ".py")
            package = ROOT / name.replace(".", "/") / "__init__.py"
            for candidate in (module, package):
                rel = str(candidate.relative_to(ROOT))
                if candidate.exists() and rel != str(path.relative_to(ROOT)):
                    deps.add(":" + src_to_target[rel])
        elif top in THIRD_PARTY:
            deps.add(f"@pypi//{THIRD_PARTY[top]}")
        elif top not in sys.stdlib_module_names and top not in ("conftest",):
            raise AssertionError(f"{path}: import {name} is neither ours, stdlib nor known")
    return deps


def _sources():
    return (
        sorted((ROOT / "tf_imaml").rglob("*.py"))
        + sorted((ROOT / "tests").glob("test_*.py"))
        + sorted((ROOT / "scripts").glob("*.py"))
    )


def test_every_file_has_exactly_one_target_of_the_right_kind():
    targets = _targets()
    owners = {}
    for name, (_, srcs, _) in targets.items():
        for src in srcs:
            owners.setdefault(src, []).append(name)
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        assert len(owners.get(rel, [])) == 1, f"{rel} must be in exactly one BUILD target"
        kind = targets[owners[rel][0]][0]
        want = {"tf_imaml": "py_library", "tests": "py_test", "scripts": "py_binary"}[
            rel.split("/")[0]
        ]
        assert kind == want, f"{rel} is a {kind}, should be a {want}"
    for src in owners:
        assert (ROOT / src).exists(), f"BUILD names {src}, which does not exist"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_deps_match_imports(path):
    targets = _targets()
    src_to_target = {src: name for name, (_, srcs, _) in targets.items() for src in srcs}
    rel = str(path.relative_to(ROOT))
    _, _, deps = targets[src_to_target[rel]]
    declared = {d for d in deps if d.startswith((":", "@pypi//"))}
    expected = _expected_deps(path, src_to_target)
    if rel.startswith("tests/"):
        expected.add(":conftest")
    for dep in declared:
        assert not dep.startswith(":") or dep[1:] in targets, f"{rel}: no target {dep}"
    assert declared == expected, (
        f"{rel}: missing {expected - declared}, extra {declared - expected}"
    )
