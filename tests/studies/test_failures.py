"""scripts/studies/failures.py at a tiny size: files, table rows and the failures it must see."""

import json

import numpy as np
import pytest

# Slow: runs the study at a tiny size (meta-training included).
pytestmark = pytest.mark.slow


def test_tiny_study_detects_divergence_and_writes_its_report(
    study, tiny, tmp_path, omniglot_subset, assert_png
):
    # Two runs of two seeds (the guard's run trains iMAML too): each new model costs a trace.
    config = tiny(runs=("imaml_authors", "fomaml"), verbose=False)
    summary = study.run(config)
    md = (tmp_path / "study_failures.md").read_text()
    assert "| paper setting | 2 | 0.1 | 3 | 0 |" in md
    assert "| lr far too large (50) | 2 | 50 | 3 | 0 |" in md
    assert "| fomaml | 2 | " in md and "### DivergenceGuard" in md
    assert "| imaml_authors | fomaml | lam=0 | 2 | " in md
    for name in summary["plots"]:
        assert_png(tmp_path / name)
    saved = json.loads((tmp_path / "study_failures.json").read_text())
    paper, too_large, authors = saved["failure_map"]
    assert "| authors' system | 2 | 0.1 | 3 | 1 | 10 | True |" in md
    # lr = 0.1 with lam = 2 on this small net: gradient descent on G contracts.
    assert paper["diverged"] == 0.0 and paper["median_rel_grad_norm"] < 1.0
    # lr = 50 > 2 / (L + lam): the inner loop blows up, the library's solve flags every
    # task as failed (what failed_fraction counts), and lr (lam + L) > 2 predicts it.
    assert too_large["diverged"] == 1.0 and too_large["solve_failed"] == 1.0
    assert too_large["predicted_unstable"] == 1.0
    assert too_large["median_rel_grad_norm"] > 1e3
    # The authors' system 2 I + H/12 is positive definite unless the Hessian has an
    # eigenvalue below -24, far from what a small net at its initialisation has: Lanczos sees
    # no negative eigenvalue and no solve fails; its smallest estimate is near 2 (the damped
    # identity), above the paper's I + H/2 (near 1).
    assert authors["indefinite"] == 0.0 and authors["solve_failed"] == 0.0
    assert authors["median_min_eig"] > paper["median_min_eig"]
    # The same too-large lr in training: every task fails, every step is skipped, the weights
    # stay finite and DivergenceGuard stops the run after its first epoch.
    guard = saved["guard"]
    assert guard["stopped"] and "epoch 1:" in guard["message"]
    assert guard["epochs"][0]["failed_fraction"] == 1.0 and guard["weights_finite"]
    assert [(r["run"], r["seed"]) for r in saved["runs"]] == [
        ("imaml_authors", 0),
        ("imaml_authors", 1),
        ("fomaml", 0),
        ("fomaml", 1),
    ]
    for row in saved["runs"]:
        assert set(row["per_task"]) == {"own", "lam=0", "lam=2"} and row["test_tasks"] == 4
        assert all(len(v) == 4 for v in row["per_task"].values())
        # Oracle: both runs adapt at test time by plain GD (MAML; the authors' test_lam = 0,
        # where the pull-back is the identity), the same adaptation as the lam = 0 control,
        # computed by another code path: the same predictions on every task.
        assert row["per_task"]["own"] == row["per_task"]["lam=0"], row["run"]
    fomaml = [r for r in saved["runs"] if r["run"] == "fomaml"]
    # First-order MAML has no linear solve: it never fails on finite values.
    assert all(r["failed_fraction"] == 0.0 for r in fomaml)
    # The seed-level interval recomputed from the per-task numbers with numpy and the t
    # quantile for one degree of freedom (12.706, printed tables).
    per_seed = [np.mean(r["per_task"]["lam=2"]) for r in fomaml]
    interval = saved["arms"]["fomaml"]["lam=2"]["seed_interval"]
    assert interval["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    half = 12.706 * np.std(per_seed, ddof=1) / np.sqrt(2)
    assert interval["half_width"] == pytest.approx(half, rel=1e-4, abs=1e-12)
    # The paired test on the same tasks, recomputed: each task's accuracy averaged over
    # seeds, authors minus first-order MAML.
    (paired,) = [c for c in saved["comparisons"] if c["adaptation"] == "lam=2"]
    authors = [r for r in saved["runs"] if r["run"] == "imaml_authors"]
    d = np.mean([r["per_task"]["lam=2"] for r in authors], axis=0) - np.mean(
        [r["per_task"]["lam=2"] for r in fomaml], axis=0
    )
    assert paired["run"] == "imaml_authors" and paired["reference"] == "fomaml"
    assert paired["per_task"]["mean_difference"] == pytest.approx(d.mean(), abs=1e-12)
    assert paired["per_task"]["wins"] == int(np.sum(d > 0)) and paired["seeds"] == [0, 1]

    # Runs split over processes (here: by seed) merge into the same summaries and tests.
    for seed in (0, 1):
        part = dict(saved, runs=[r for r in saved["runs"] if r["seed"] == seed])
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(part))
    parts = [str(tmp_path / "seed0.json"), str(tmp_path / "seed1.json")]
    merged = study.merge(parts, str(tmp_path / "merged"))
    assert json.loads(json.dumps(merged["arms"])) == saved["arms"]
    assert json.loads(json.dumps(merged["comparisons"])) == saved["comparisons"]
    assert "| fomaml | 2 | " in (tmp_path / "merged" / "study_failures.md").read_text()
    with pytest.raises(ValueError, match="more than one file"):
        study.merge([parts[0], parts[0]], str(tmp_path / "twice"))
    # Split by run instead: a part without first-order MAML names its own reference run,
    # and the merge compares against the first file's.
    for name, runs in (("fomaml", {"fomaml"}), ("others", {"imaml_authors"})):
        reference = "fomaml" if name == "fomaml" else "imaml_authors"
        part = dict(
            saved,
            config=dict(saved["config"], reference_run=reference),
            runs=[r for r in saved["runs"] if r["run"] in runs],
        )
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    by_run = [str(tmp_path / "fomaml.json"), str(tmp_path / "others.json")]
    merged = study.merge(by_run, str(tmp_path / "by_run"))
    assert json.loads(json.dumps(merged["arms"])) == saved["arms"]
    assert json.loads(json.dumps(merged["comparisons"])) == saved["comparisons"]


def test_identical_adaptations_are_the_same_proximal_gd_whatever_the_model(study, omniglot_subset):
    # fewshot.adapted_accuracies, which studies 5 and 7 share: "own" is the model's own
    # test-time adaptation (here none: MAML with 0 inner steps), "lam=<x>" the same proximal
    # GD of the given steps for every model, whatever its own.
    fewshot, tf_imaml = study.fewshot, study.tf_imaml  # the modules the study uses
    data = fewshot.load_omniglot_splits(14, splits=("test",))["test"]
    test = fewshot.episodes(data, ways=5, queries=3, batch=4, seed=2, num_tasks=4)
    learner = fewshot.learner(ways=5, image_size=14, filters=8, seed=0)
    unadapted = fewshot.compile_meta(tf_imaml.MAML(learner, first_order=True, inner_steps=0))
    steps = dict(inner_steps=3, inner_learning_rate=0.5)
    scores = fewshot.adapted_accuracies(unadapted, test, eval_lams=(0.0, 2.0), **steps)
    assert list(scores) == ["own", "lam=0", "lam=2"]
    assert all(v.shape == (4,) for v in scores.values())
    # Oracle for lam 0: plain GD by another code path, MAML's own adaptation of 3 steps of
    # 0.5; the same predictions on every task.
    plain_gd = fewshot.compile_meta(tf_imaml.MAML(learner, first_order=True, **steps))
    expected = tf_imaml.evaluation.few_shot_accuracy(plain_gd, test).per_task
    np.testing.assert_array_equal(scores["lam=0"], expected)
    # Not the model's own adaptation (3 steps of 0.5 change the random net's predictions),
    # and lam reaches the adaptation (lr * lam = 1: from the second step on, phi is pulled
    # all the way back to theta before each gradient step).
    assert not np.array_equal(scores["own"], scores["lam=0"])
    assert not np.array_equal(scores["lam=2"], scores["lam=0"])
    # `skip` leaves out adaptations already scored.
    again = fewshot.adapted_accuracies(unadapted, test, eval_lams=(0.0,), skip={"own"}, **steps)
    assert list(again) == ["lam=0"]
    np.testing.assert_array_equal(again["lam=0"], scores["lam=0"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": (0, 0)}, "--seeds must be distinct"),
        ({"reference_run": "imaml_zero"}, "--reference_run imaml_zero is not among --runs"),
        ({"init_model": "/nonexistent.keras"}, "--init_model /nonexistent.keras is not a file"),
        ({"eval_lams": (-1.0,)}, "--eval_lams must be >= 0"),
    ],
)
def test_bad_config_is_refused(study, tiny, change, message):
    with pytest.raises(ValueError, match=message):
        tiny(**change).validate()
