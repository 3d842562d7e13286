"""scripts/study_failures.py at a tiny size: files, table rows and the failures it must see."""

import dataclasses
import importlib.util
import json
import pathlib
import sys

import pytest

# Slow: runs the study at a tiny size (meta-training included).
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "study_failures", ROOT / "scripts" / "study_failures.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_tiny_study_detects_divergence_and_writes_its_report(tmp_path, small_omniglot, monkeypatch):
    study = _load_script()
    # Real Omniglot characters, 24 of them: the tasks are drawn from fewer classes, the
    # failures are the same (loading and resizing all 1623 costs seconds).
    monkeypatch.setattr(study.tf_imaml.datasets, "OMNIGLOT_PATH", small_omniglot)
    # One training run (the guard's run trains iMAML too): each new model costs a trace.
    config = dataclasses.replace(
        study.Config(**study.TINY), output_dir=str(tmp_path), runs=("fomaml",), verbose=False
    )
    summary = study.run(config)
    md = (tmp_path / "study_failures.md").read_text()
    assert "| paper setting | 2 | 0.1 | 3 | 0 |" in md
    assert "| lr far too large (50) | 2 | 50 | 3 | 0 |" in md
    assert "| fomaml | " in md and "### DivergenceGuard" in md
    for name in summary["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "study_failures.json").read_text())
    paper, too_large = saved["failure_map"]
    # lr = 0.1 with lam = 2 on this small net: gradient descent on G contracts.
    assert paper["diverged"] == 0.0 and paper["median_rel_grad_norm"] < 1.0
    # lr = 50 > 2 / (L + lam): the inner loop blows up, the library's solve flags every
    # task as failed (what failed_fraction counts), and lr (lam + L) > 2 predicts it.
    assert too_large["diverged"] == 1.0 and too_large["solve_failed"] == 1.0
    assert too_large["predicted_unstable"] == 1.0
    assert too_large["median_rel_grad_norm"] > 1e3
    # The same too-large lr in training: every task fails, every step is skipped, the weights
    # stay finite and DivergenceGuard stops the run after its first epoch.
    guard = saved["guard"]
    assert guard["stopped"] and "epoch 1:" in guard["message"]
    assert guard["epochs"][0]["failed_fraction"] == 1.0 and guard["weights_finite"]
    (fomaml,) = saved["runs"]
    # First-order MAML has no linear solve: it never fails on finite values.
    assert fomaml["failed_fraction"] == 0.0 and fomaml["test_tasks"] == 4
    assert 0.0 <= fomaml["test_accuracy"] <= 1.0
