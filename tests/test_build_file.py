"""BUILD declares every module, test and script, with the dependencies their imports need.

Bazel cannot run offline here (Debian's bazel-bootstrap stops fetching rules_cc), so this
test stands in for `bazel build`'s dependency checking: it reads BUILD as Starlark (a Python
subset), and compares each target's `deps` with the imports of its sources. It also checks
that every py_test runs pytest on its own file (through tests/pytest_main.py), and that
the runner's exit status fails when a test fails or none ran.
"""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import NamedTuple

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
# The `main` of every py_test: a test file has no `__main__`, so as its own main it would
# pass under `bazel test` without running a test.
RUNNER = "tests/pytest_main.py"


class Target(NamedTuple):
    kind: str  # "py_library", "py_test" or "py_binary"
    srcs: list  # source files, relative to the repository root
    deps: list  # ":target" and "@pypi//requirement" labels
    main: str | None  # the `main` attribute, if any
    args: list  # the `args` attribute (the runner's arguments, for a py_test)


def _targets():
    """Evaluates BUILD with stand-ins for its rules; returns {name: Target}."""
    targets = {}

    def rule(kind):
        def add(name, srcs=(), deps=(), main=None, args=(), **kwargs):
            assert name not in targets, f"BUILD declares {name} twice"
            targets[name] = Target(kind, list(srcs), list(deps), main, list(args))

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
        elif (path.parent / f"{top}.py").exists() and "scripts" in path.relative_to(ROOT).parts:
            # Scripts import the modules beside them (scripts/common.py, the studies' harness).
            deps.add(":" + src_to_target[str((path.parent / f"{top}.py").relative_to(ROOT))])
        elif top not in sys.stdlib_module_names and top not in ("conftest",):
            raise AssertionError(f"{path}: import {name} is neither ours, stdlib nor known")
    return deps


def _sources():
    return (
        sorted((ROOT / "tf_imaml").rglob("*.py"))
        + sorted((ROOT / "tests").rglob("test_*.py"))
        + sorted((ROOT / "scripts").rglob("*.py"))
    )


def _kind(path: pathlib.Path) -> str:
    """The rule a source needs: scripts are binaries, except modules the studies share."""
    top = str(path.relative_to(ROOT)).split("/")[0]
    if top == "scripts" and 'if __name__ == "__main__":' not in path.read_text():
        return "py_library"
    return {"tf_imaml": "py_library", "tests": "py_test", "scripts": "py_binary"}[top]


def test_every_file_has_exactly_one_target_of_the_right_kind():
    targets = _targets()
    owners = {}
    for name, target in targets.items():
        for src in target.srcs:
            owners.setdefault(src, []).append(name)
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        assert len(owners.get(rel, [])) == 1, f"{rel} must be in exactly one BUILD target"
        kind = targets[owners[rel][0]].kind
        want = _kind(path)
        assert kind == want, f"{rel} is a {kind}, should be a {want}"
    for src in owners:
        assert (ROOT / src).exists(), f"BUILD names {src}, which does not exist"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_deps_match_imports(path):
    targets = _targets()
    src_to_target = {
        src: name for name, target in targets.items() for src in target.srcs if src != RUNNER
    }
    rel = str(path.relative_to(ROOT))
    target = targets[src_to_target[rel]]
    declared = {d for d in target.deps if d.startswith((":", "@pypi//"))}
    # A target needs what any of its sources imports (a py_test's include the runner).
    expected = set().union(*(_expected_deps(ROOT / src, src_to_target) for src in target.srcs))
    if rel.startswith("tests/"):
        # Every conftest.py from tests/ down to the test's folder applies to it.
        for folder in path.relative_to(ROOT / "tests").parents:
            conftest = f"tests/{folder}/conftest.py".replace("/./", "/")
            if conftest in src_to_target:
                expected.add(":" + src_to_target[conftest])
    for dep in declared:
        assert not dep.startswith(":") or dep[1:] in targets, f"{rel}: no target {dep}"
    assert declared == expected, (
        f"{rel}: missing {expected - declared}, extra {declared - expected}"
    )


def test_every_py_test_runs_pytest_on_its_own_file():
    tests = {name: t for name, t in _targets().items() if t.kind == "py_test"}
    for name, target in tests.items():
        own = f"tests/{name}.py"
        assert target.main == RUNNER, f"{name}: main is {target.main}, should be {RUNNER}"
        assert sorted(target.srcs) == sorted([RUNNER, own]), f"{name}: srcs {target.srcs}"
        # The runner takes its file from the first argument: the target's own, not another's.
        assert target.args == [own], f"{name}: args {target.args}, should be [{own!r}]"


def _run_runner(tmp_path, source, **environ):
    """Runs tests/pytest_main.py on a test file holding `source`, as `bazel test` would."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, str(ROOT / RUNNER), "test_sample.py"],
        cwd=tmp_path,
        env=dict(env, **environ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "source, status",
    [
        ("def test_passes():\n    assert True\n", 0),
        ("def test_fails():\n    assert 1 == 2\n", 1),
        ("def helper():\n    pass\n", 5),  # no test ran: pytest's status 5, a failure
    ],
    ids=["pass", "fail", "no_tests"],
)
def test_runner_exits_with_pytests_status(tmp_path, source, status):
    # Oracle: pytest's documented exit codes (0 all passed, 1 some failed, 5 none collected).
    proc = _run_runner(tmp_path, source)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_runner_honours_bazels_filter_and_xml_report(tmp_path):
    source = """
        def test_kept():
            pass

        def test_dropped():
            assert False
    """
    xml = tmp_path / "report.xml"
    proc = _run_runner(tmp_path, source, TESTBRIDGE_TEST_ONLY="kept", XML_OUTPUT_FILE=str(xml))
    # Status 0: the failing test was filtered out; the report lists only the kept one.
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = xml.read_text()
    assert 'name="test_kept"' in report and "test_dropped" not in report


def test_runner_refuses_a_missing_file(tmp_path, run_python):
    proc = run_python(ROOT / RUNNER, "tests/test_nothing_here.py", timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "must be a test file" in proc.stderr
