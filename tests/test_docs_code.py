"""The Python examples in the Markdown pages compile, name real things, and compute what they say.

The pages are README.md and docs/*.md (not the studies' outputs in docs/studies/, not the
campaign's folders). For every ```python block of a page, read in order as a reader does
(a block may use what an earlier block of the page imported):

- it compiles;
- every dotted name rooted at `tf_imaml` resolves to a real attribute or module:
  `tf_imaml.CG`, `tf_imaml.models.conv4_classifier`, and the names bound by
  `import tf_imaml...`, `from tf_imaml import x` and `from tf_imaml.x import y`, followed
  through attribute chains (`tasks.loss_fn`); a name that the block assigns to stops being
  followed from then on;
- every keyword argument passed to such a callable is accepted by its signature
  (`inspect.signature`; a callable that takes `**kwargs` accepts any).

Two examples are also run: the README's functional-core example, against the closed-form
ridge meta-gradient of `tf_imaml.testing`, and docs/api.md's task-layer example, against
`ImplicitMAML`'s own meta-gradient on the same tasks.
"""

import ast
import importlib
import inspect
import pathlib
import re

import keras
import numpy as np
import pytest

import tf_imaml
from tf_imaml import tasks as tasks_lib
from tf_imaml import testing

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a page: `(line of the block's first code line, code)`."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def resolve(dotted: str):
    """The object that `dotted` (rooted at `tf_imaml`) names.

    Raises:
      AttributeError, ImportError: When a part of it does not exist.
    """
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part) or not inspect.ismodule(obj):
            obj = getattr(obj, part)
        else:  # A submodule that its package does not import (tf_imaml.testing).
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


class _Checker(ast.NodeVisitor):
    """Collects the wrong `tf_imaml` names and keywords of one block, as `(line, message)`."""

    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases  # Local name -> the dotted `tf_imaml` name it stands for.
        self.problems = []

    def _exists(self, node: ast.AST, dotted: str) -> bool:
        try:
            resolve(dotted)
        except (AttributeError, ImportError):
            self.problems.append((node.lineno, f"{dotted} does not exist"))
            return False
        return True

    def _dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == "tf_imaml" and self._exists(node, alias.name):
                if alias.asname:
                    self.aliases[alias.asname] = alias.name
                else:
                    self.aliases["tf_imaml"] = "tf_imaml"

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level or (node.module or "").split(".")[0] != "tf_imaml":
            return
        for alias in node.names:
            dotted = f"{node.module}.{alias.name}"
            if self._exists(node, dotted):
                self.aliases[alias.asname or alias.name] = dotted

    def visit_Assign(self, node: ast.Assign):
        # The value is read before the targets are bound: `x = x.attr` still follows `x`.
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_Name(self, node: ast.Name):
        if isinstance(node.ctx, ast.Store):
            self.aliases.pop(node.id, None)

    def visit_Attribute(self, node: ast.Attribute):
        dotted = self._dotted(node)
        if dotted is None:
            self.generic_visit(node)
        else:
            self._exists(node, dotted)

    def visit_Call(self, node: ast.Call):
        dotted = self._dotted(node.func)
        if dotted is None:
            self.visit(node.func)
        elif self._exists(node.func, dotted):
            self._check_keywords(node, dotted)
        for child in [*node.args, *node.keywords]:
            self.visit(child)

    def _check_keywords(self, node: ast.Call, dotted: str):
        try:
            signature = inspect.signature(resolve(dotted))
        except (TypeError, ValueError):  # No signature to read (some builtins).
            return
        parameters = signature.parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return
        accepted = {p.name for p in parameters if p.kind in _KEYWORD_KINDS}
        for keyword in node.keywords:
            if keyword.arg is not None and keyword.arg not in accepted:
                self.problems.append(
                    (node.lineno, f"{dotted}() takes no keyword argument {keyword.arg!r}")
                )


def check_page(text: str, name: str) -> list[str]:
    """The problems of a page's python blocks, as `name:line: message` lines."""
    aliases = {"tf_imaml": "tf_imaml"}  # `tf_imaml.` always means the package on a page.
    problems = []
    for first_line, code in python_blocks(text):
        try:
            tree = ast.parse(code)
            compile(tree, f"{name}:{first_line}", "exec")
        except SyntaxError as error:
            line = first_line + (error.lineno or 1) - 1
            problems.append(f"{name}:{line}: does not compile ({error.msg})")
            continue
        checker = _Checker(aliases)
        checker.visit(tree)
        problems += [f"{name}:{first_line + n - 1}: {msg}" for n, msg in checker.problems]
    return problems


def _page_block(page: pathlib.Path, marker: str) -> str:
    """The one python block of `page` that contains `marker`."""
    found = [code for _, code in python_blocks(page.read_text()) if marker in code]
    assert len(found) == 1, f"{page.name}: {len(found)} python blocks contain {marker!r}"
    return found[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_blocks_compile_and_name_real_things(page):
    problems = check_page(page.read_text(), str(page.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_pages_with_examples_have_their_blocks():
    # The checks above pass vacuously on a page without blocks: these pages must have some.
    counts = {p.name: len(python_blocks(p.read_text())) for p in PAGES}
    assert counts["README.md"] >= 3 and counts["api.md"] >= 2, counts


def test_the_checker_flags_wrong_names_and_keywords():
    # A bad snippet: each wrong name or keyword is reported once, at its line; valid code,
    # a callable with **kwargs and a name reassigned to a variable are not reported.
    page = (
        "Text.\n\n```python\n"
        "import tf_imaml\n"  # line 4
        "from tf_imaml import tasks, no_such_module\n"
        "from tf_imaml.solvers import CG, NoSuchSolver\n"
        "meta = tf_imaml.ImplicitMAML(learner, cg_step=5, linear_solver=CG(steps=5))\n"
        "tf_imaml.models.conv4_clasifier(5)\n"
        "CG(steps=5, dampng=1.0)\n"
        "loss_fn = tasks.loss_fn(learner, loss, x, y, batched=True)\n"
        "tf_imaml.testing.ridge_meta_gradient(t, theta, lam=2.0)\n"
        "tf_imaml.ImplicitMAML.compile(meta, optimizer='adam', anything=1)\n"
        "```\n\n```python\n"
        "tasks.no_such_function(learner)\n"  # line 16: `tasks` still bound from the block above
        "tasks = 3\n"
        "tasks.anything\n"
        "```\n\n```python\n"
        "tf_imaml.CG(steps=5\n"  # line 22
        "```\n"
    )
    assert check_page(page, "page.md") == [
        "page.md:5: tf_imaml.no_such_module does not exist",
        "page.md:6: tf_imaml.solvers.NoSuchSolver does not exist",
        "page.md:7: tf_imaml.ImplicitMAML() takes no keyword argument 'cg_step'",
        "page.md:8: tf_imaml.models.conv4_clasifier does not exist",
        "page.md:9: tf_imaml.solvers.CG() takes no keyword argument 'dampng'",
        "page.md:16: tf_imaml.tasks.no_such_function does not exist",
        "page.md:22: does not compile ('(' was never closed)",
    ]


def test_the_readme_functional_core_example_gives_the_ridge_meta_gradient():
    code = _page_block(ROOT / "README.md", "testing.linear_tasks")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    tasks, theta, adapted = namespace["tasks"], namespace["theta"], namespace["adapted"]
    got = namespace["meta_grads"][0].numpy()
    # Oracle: the closed-form meta-gradient of ridge regression, lam (H + lam I)^-1 grad
    # L_query at the exact proximal point (lam = 2.0 as in the example). Tolerance: 5 CG
    # steps on these 5-dimensional systems are exact up to rounding (CG ends in at most N
    # steps: with 200 inner steps the example's gradient is 7e-12 off), so the error is the
    # inner loop's: 16 GD steps of 0.05 leave phi 2.5% from the exact proximal point, and
    # the meta-gradient was measured 1.6% to 2.5% off per task. 5e-2 is twice that.
    exact = testing.ridge_meta_gradient(tasks, theta[0].numpy(), 2.0)
    error = np.linalg.norm(got - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert np.all(error < 5e-2), error
    # The tolerance separates the implicit gradient from the first-order one (the query
    # gradient at phi, measured 31% to 64% off), so a missing linear solve would fail.
    _, query_grads = tasks_lib.value_and_grad(namespace["query_loss"], adapted)
    first_order = query_grads[0].numpy()
    first_order_error = np.linalg.norm(first_order - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert np.all(first_order_error > 0.2), first_order_error


def test_the_api_task_layer_example_gives_the_keras_models_meta_gradient():
    code = _page_block(ROOT / "docs" / "api.md", "tasks.meta_params")
    keras.utils.set_random_seed(0)  # The learner's initial weights.
    namespace = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)  # noqa: S102
    # Oracle: the Keras model on the same learner and tasks, with the example's settings
    # (lam 1.0, 10 GD steps of 0.01, CG(steps=5)), through its public seams. With all tasks
    # batched it runs the same ops, so the two agree to rounding.
    data, result = namespace["data"], namespace["result"]
    meta = tf_imaml.ImplicitMAML(
        namespace["learner"],
        lam=1.0,
        inner_steps=10,
        inner_learning_rate=0.01,
        linear_solver=tf_imaml.CG(steps=5),
        task_batching="batched",
    )
    meta.compile(optimizer="adam", loss=namespace["loss"])
    num_tasks = data.support_x.shape[0]
    expected = meta.meta_gradient(
        meta.meta_params(num_tasks),
        meta.support_loss_fn(data.support_x, namespace["support_y"]),
        meta.query_loss_fn(data.query_x, namespace["query_y"]),
    )
    np.testing.assert_array_equal(result.solve.failed, expected.failed)
    for got, want in zip(result.meta_grads, expected.meta_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, equal_nan=True)
    # The failure policy: a failed task's meta-gradient is its query gradient, the others'
    # the solver's answer.
    failed = result.solve.failed.numpy()
    for policy, raw, query in zip(
        namespace["meta_grads"], result.meta_grads, namespace["query_grads"], strict=True
    ):
        np.testing.assert_array_equal(policy.numpy()[failed], query.numpy()[failed])
        np.testing.assert_array_equal(policy.numpy()[~failed], raw.numpy()[~failed])
