"""Runs pytest on one test file and exits with its status: the `main` of every py_test in BUILD.

A test file has no `__main__` of its own, so a py_test whose `main` were the file would
import it, define the tests, run none and pass. Each py_test instead runs this runner with
its file as the first argument (`args = ["tests/test_x.py"]`). Extra arguments are passed to
pytest (`bazel test --test_arg=-x`); Bazel's test filter becomes `-k` and its XML report path
`--junitxml`.

Usage:
  python tests/pytest_main.py tests/test_x.py [pytest options]
"""

import os
import pathlib
import sys

import pytest


def pytest_args(argv: list[str], environ: dict[str, str]) -> list[str]:
    """The pytest command line for `argv` (this script's arguments) under `environ`.

    Raises:
      ValueError: if the first argument is not an existing .py file.
    """
    if not argv or not pathlib.Path(argv[0]).is_file() or not argv[0].endswith(".py"):
        raise ValueError(f"the first argument must be a test file, got {argv[:1]}")
    # Runfiles are read-only under Bazel: no .pytest_cache.
    args = [argv[0], "-q", "-p", "no:cacheprovider", *argv[1:]]
    if environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", environ["TESTBRIDGE_TEST_ONLY"]]
    if environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={environ['XML_OUTPUT_FILE']}")
    return args


if __name__ == "__main__":
    # pytest's status: 0 only when tests ran and all passed (5 when none was collected).
    sys.exit(pytest.main(pytest_args(sys.argv[1:], dict(os.environ))))
