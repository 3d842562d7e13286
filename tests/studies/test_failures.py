"""scripts/studies/failures.py at a tiny size: files, table rows and the failures it must see."""

import json

import pytest

# Slow: runs the study at a tiny size (meta-training included).
pytestmark = pytest.mark.slow


def test_tiny_study_detects_divergence_and_writes_its_report(
    study, tiny, tmp_path, omniglot_subset, assert_png
):
    # One training run (the guard's run trains iMAML too): each new model costs a trace.
    config = tiny(runs=("fomaml",), verbose=False)
    summary = study.run(config)
    md = (tmp_path / "study_failures.md").read_text()
    assert "| paper setting | 2 | 0.1 | 3 | 0 |" in md
    assert "| lr far too large (50) | 2 | 50 | 3 | 0 |" in md
    assert "| fomaml | " in md and "### DivergenceGuard" in md
    for name in summary["plots"]:
        assert_png(tmp_path / name)
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
