"""Shared fixtures of the study tests: the study under test, its tiny config, checks.

The studies are scripts in `scripts/studies/` that import their harness as sibling modules;
`study` puts that folder on `sys.path` and imports the module the test file is named after
(`test_<name>.py` -> `scripts/studies/<name>.py`).
"""

import importlib
import pathlib
import sys

import pytest

STUDIES = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "studies"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_study(name: str):
    """Imports `scripts/studies/<name>.py` (and makes its siblings importable)."""
    if str(STUDIES) not in sys.path:
        sys.path.insert(0, str(STUDIES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def study(request):
    """The module `scripts/studies/<name>.py` of the test file `test_<name>.py`."""
    return load_study(pathlib.Path(request.module.__file__).stem.removeprefix("test_"))


@pytest.fixture
def tiny(study, tmp_path):
    """`tiny(**changes)`: the study's `--tiny` config writing into `tmp_path`, with changes."""

    def make(**changes):
        return study.Config(**{**study.TINY, "output_dir": str(tmp_path), **changes})

    return make


@pytest.fixture
def omniglot_subset(small_omniglot, monkeypatch):
    """The studies load the 24-character Omniglot subset (loading all 1623 costs seconds)."""
    import tf_imaml

    monkeypatch.setattr(tf_imaml.datasets, "OMNIGLOT_PATH", small_omniglot)


@pytest.fixture
def assert_png():
    """`assert_png(path)`: the file starts with the PNG signature."""

    def check(path):
        assert pathlib.Path(path).read_bytes()[:8] == PNG_SIGNATURE, path

    return check
