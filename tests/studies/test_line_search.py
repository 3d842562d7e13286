"""scripts/studies/line_search.py at a tiny size: files, rows, and what the line search buys.

Part 2 (training iMAML-HF) is left out here (`train_meta_steps=0`): tracing a train step with
Hager-Zhang inside takes longer than this file's time budget; the study's real run covers it.
"""

import dataclasses
import json

import numpy as np
import pytest

# Slow: runs the study at a tiny size.
pytestmark = pytest.mark.slow


def test_tiny_study_traces_newton_steps_under_each_step_rule(study, tiny, tmp_path, assert_png):
    config = tiny(lams=(2.0, 10.0), train_meta_steps=0)
    results = study.run(config)
    assert_png(tmp_path / "line_search.png")
    saved = json.loads((tmp_path / "line_search.json").read_text())
    assert saved["traces"] == json.loads(json.dumps(results["traces"]))
    assert saved["training"] == []
    cells = {(r["lam"], r["step_rule"]) for r in saved["traces"]}
    assert cells == {(lam, rule) for lam in (2.0, 10.0) for rule in study.STEP_RULES}
    table = (tmp_path / "line_search.md").read_text()
    for label in ("line search", "full steps", "fixed step 0.3", "damped (mu=10)"):
        assert f"| random | 10 | {label} |" in table
    for row in saved["traces"]:
        objectives = np.asarray(row["objectives"])  # [K + 1, T]
        sizes = np.asarray(row["step_sizes"])
        status = np.asarray(row["step_status"])
        assert objectives.shape == (3, 4) and status.shape == (2, 4)
        assert sum(row["status_counts"].values()) == row["num_steps_total"] == 8
        # The status the library reports agrees with the trace the script reads: a finite
        # step that raised G is "increased", and nothing else raised it.
        assert row["num_rises"] == row["status_counts"]["increased"]
        if row["line_search"]:
            # Hager-Zhang's approximate Wolfe condition admits a rise of at most 1e-6 |G|;
            # 1e-5 covers float32 rounding of G. With the search G never goes up more.
            rise = np.diff(objectives, axis=0)
            assert (rise <= 1e-5 * np.abs(objectives[:-1])).all(), rise
            # A step not taken has length 0 and leaves G exactly as it was.
            hf = study.hessian_free
            not_taken = [hf.STEP_NON_DESCENT, hf.STEP_SEARCH_FAILED, hf.STEP_SEARCH_NOT_CONVERGED]
            skipped = np.isin(status, not_taken)
            assert (sizes[skipped] == 0).all()
            assert (np.diff(objectives, axis=0)[skipped] == 0).all()
        else:
            # Fixed step lengths: 1 (full and damped Newton steps) or the fixed step.
            expected = config.fixed_step if row["step_rule"] == "fixed" else 1.0
            np.testing.assert_allclose(sizes, expected, rtol=1e-7)
            assert row["status_counts"]["search_failed"] == 0
        accuracy = np.asarray(row["query_accuracy_per_task"])
        assert accuracy.shape == (4,) and row["query_accuracy"] == pytest.approx(accuracy.mean())
    by_cell = {(r["lam"], r["step_rule"]): r for r in saved["traces"]}
    for lam in (2.0, 10.0):
        full, fixed = by_cell[(lam, "full")], by_cell[(lam, "fixed")]
        # Same theta, same first direction: the first fixed step is 0.3 of the full one, so
        # the two first steps differ (their G after step 1 is not the same).
        first_full = np.asarray(full["objectives"])[1]
        first_fixed = np.asarray(fixed["objectives"])[1]
        assert np.all(first_full != first_fixed)
        np.testing.assert_array_equal(
            np.asarray(full["objectives"])[0], np.asarray(fixed["objectives"])[0]
        )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weights": ("shipped",), "image_size": 14}, "--image_size=28"),
        ({"weights": ("imagenet",)}, "--weights"),
        ({"lams": (0.0,)}, "--lams"),
    ],
)
def test_bad_config_is_refused_before_any_work(study, change, message, tmp_path):
    config = dataclasses.replace(study.Config(output_dir=str(tmp_path / "out")), **change)
    with pytest.raises(ValueError, match=message):
        study.run(config)
    assert not (tmp_path / "out").exists()
