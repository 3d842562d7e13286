"""scripts/studies/stats.py against closed forms and hand-computed values."""

import math

import numpy as np
import pytest


def test_t_quantiles_match_the_printed_table(study):
    # Oracle: the two-sided 95% critical values of Student's t printed in every table
    # (df 1: 12.706, 4: 2.776, 9: 2.262, 30: 2.042), given there to 3 decimals.
    for df, printed in ((1, 12.706), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert study.t_quantile(0.975, df) == pytest.approx(printed, abs=6e-4)


def test_t_tails_match_closed_forms(study):
    # Oracle: df = 1 is the Cauchy distribution, P(T > 1) = 1/4; df = 2 has the closed form
    # P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2. Float64 arithmetic: agreement to 1e-10.
    assert study.t_two_sided_pvalue(1.0, 1) == pytest.approx(0.5, abs=1e-10)
    for t in (0.3, 1.7, 4.0):
        expected = 1.0 - t / math.sqrt(t * t + 2.0)
        assert study.t_two_sided_pvalue(-t, 2) == pytest.approx(expected, abs=1e-10)


def test_sign_test_counts_binomial_tails_by_hand(study):
    # 8 wins, 2 losses: 2 (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024, exactly.
    assert study.sign_test_pvalue(8, 2) == 112 / 1024
    assert study.sign_test_pvalue(2, 8) == 112 / 1024
    assert study.sign_test_pvalue(5, 5) == 1.0 and study.sign_test_pvalue(0, 0) == 1.0
    assert study.sign_test_pvalue(6, 0) == 2 / 64


def test_seed_interval_by_hand(study):
    # Five seeds 0.5 ... 0.9: mean 0.7, s = sqrt(0.025) = 0.158114, half-width
    # 2.776445 * 0.158114 / sqrt(5) = 0.196324 (t_{0.975,4} = 2.7764451 from the table).
    interval = study.seed_interval([0.5, 0.6, 0.7, 0.8, 0.9])
    assert interval.mean == pytest.approx(0.7, abs=1e-12) and interval.num == 5
    assert interval.half_width == pytest.approx(0.196324, abs=2e-6)
    assert interval.low == pytest.approx(0.7 - interval.half_width, abs=1e-12)
    single = study.seed_interval([0.4])
    assert single.half_width == 0.0 and single.low == single.high == 0.4
    with pytest.raises(ValueError, match="at least one"):
        study.seed_interval([])


def test_paired_test_by_hand(study):
    # d = a - b = (1, 0.5, 0): mean 0.5, s = 0.5, t = sqrt(3), df 2, so the two-sided
    # p-value is 1 - sqrt(3/5) = 0.225403 (the df-2 closed form); half-width
    # t_{0.975,2} * 0.5 / sqrt(3) with t_{0.975,2} = 4.302653; 2 wins, 0 losses, 1 tie.
    result = study.paired_test([1.0, 1.0, 1.0], [0.0, 0.5, 1.0])
    assert result.mean_difference == pytest.approx(0.5, abs=1e-12)
    assert result.t_pvalue == pytest.approx(1.0 - math.sqrt(0.6), abs=1e-9)
    assert result.half_width == pytest.approx(4.302653 * 0.5 / math.sqrt(3), abs=1e-5)
    assert (result.wins, result.losses, result.ties, result.num_tasks) == (2, 0, 1, 3)
    assert result.sign_pvalue == 0.5  # 2 * P(Bin(2, 1/2) <= 0) = 2/4.
    # Swapping the arms flips the sign and keeps the p-values.
    swapped = study.paired_test([0.0, 0.5, 1.0], [1.0, 1.0, 1.0])
    assert swapped.mean_difference == pytest.approx(-0.5) and swapped.losses == 2
    assert swapped.t_pvalue == pytest.approx(result.t_pvalue)


def test_paired_test_averages_seeds_per_task_first(study):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(3, 20)), rng.uniform(size=(3, 20))
    # Oracle: the same test on the per-task means over seeds, computed by hand with numpy.
    d = a.mean(axis=0) - b.mean(axis=0)
    result = study.paired_test(a, b)
    assert result.mean_difference == pytest.approx(d.mean(), abs=1e-12)
    half = study.t_quantile(0.975, 19) * d.std(ddof=1) / math.sqrt(20)
    assert result.half_width == pytest.approx(half, abs=1e-12)
    assert result.wins == int(np.sum(d > 0))
    with pytest.raises(ValueError, match="same tasks"):
        study.paired_test(a, b[:, :10])


def test_arm_records_and_their_comparison_recompute_from_the_per_task_numbers(study):
    a = study.arm_summary({1: [1.0, 0.0, 1.0, 1.0], 0: [0.5, 0.5, 1.0, 0.0]})
    b = study.arm_summary({0: [0.0, 0.5, 1.0, 0.0], 2: [1.0, 1.0, 1.0, 1.0]})
    assert a["seeds"] == [0, 1] and a["per_seed_accuracy"] == [0.5, 0.75]
    assert a["seed_interval"]["mean"] == pytest.approx(0.625)
    # Only seed 0 is common: per task (0.5, 0, 0, 0), per seed one difference of 0.125.
    compared = study.compare_arms(a, b)
    assert compared["seeds"] == [0]
    assert compared["per_task"]["mean_difference"] == pytest.approx(0.125)
    assert compared["per_task"]["wins"] == 1 and compared["per_task"]["ties"] == 3
    assert compared["per_seed"]["mean"] == pytest.approx(0.125)
    assert compared["per_seed"]["half_width"] == 0.0
    with pytest.raises(ValueError, match="no common seed"):
        study.compare_arms(a, study.arm_summary({5: [1.0, 1.0]}))


def test_adaptation_summaries_and_comparisons_pair_arms_adaptation_by_adaptation(study):
    assert study.adaptation_names((0.0, 0.5)) == ["own", "lam=0", "lam=0.5"]
    own, lam0 = "own", "lam=0"
    records = [
        {"arm": "a", "seed": 0, "per_task": {own: [1.0, 0.0], lam0: [1.0, 1.0]}},
        {"arm": "a", "seed": 1, "per_task": {own: [0.0, 0.0], lam0: [0.5, 1.0]}},
        {"arm": "b", "seed": 1, "per_task": {own: [1.0, 1.0], lam0: [0.5, 0.0]}},
        {"arm": "b", "seed": 2, "error": "diverged"},  # a failed run: no scores, left out
    ]
    arms = study.adaptation_summaries(records, arm_key="arm")
    assert {arm: list(by) for arm, by in arms.items()} == {"a": [own, lam0], "b": [own, lam0]}
    # Each adaptation is an arm_summary of its own scores: a's seeds 0, 1 under lam 0 have
    # means 1.0 and 0.75.
    assert arms["a"][lam0] == study.arm_summary({0: [1.0, 1.0], 1: [0.5, 1.0]})
    assert arms["a"][lam0]["per_seed_accuracy"] == [1.0, 0.75]
    # Only seed 1 is common. Own: (0, 0) - (1, 1) = -1 per task; lam 0: (0.5, 1) - (0.5, 0)
    # = (0, 1), mean 0.5, one win and one tie.
    compared = study.compare_adaptations(arms["a"], arms["b"])
    assert [c["adaptation"] for c in compared] == [own, lam0]
    assert all(c["seeds"] == [1] for c in compared)
    assert compared[0]["per_task"]["mean_difference"] == pytest.approx(-1.0)
    assert compared[1]["per_task"]["mean_difference"] == pytest.approx(0.5)
    assert (compared[1]["per_task"]["wins"], compared[1]["per_task"]["ties"]) == (1, 1)
    # An adaptation that one arm lacks is not compared, and has a dash in the table.
    assert [
        c["adaptation"] for c in study.compare_adaptations(arms["a"], {own: arms["b"][own]})
    ] == [own]
    cells = study.adaptation_cells({own: arms["a"][own]}, [own, lam0])
    assert cells[1] == "—" and cells[0] == study.percent(
        study.Interval(**arms["a"][own]["seed_interval"])
    )


def test_percent_of_a_single_value_says_it_has_no_interval(study):
    # One seed (or one task) has no t interval: the table must not print "± 0.00", which a
    # reader would take for a measured, exact figure.
    assert study.percent(study.t_interval([0.2701])) == "27.01 (one value, no interval)"
    # Two values: mean 0.5, sd(ddof=1) 0.1 * sqrt(2), half-width 12.706 * 0.1 = 1.2706.
    assert study.percent(study.t_interval([0.4, 0.6])) == "50.00 ± 127.06"
