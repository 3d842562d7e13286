"""Seed-level intervals and paired per-task tests for the studies that rank algorithms.

A study that ranks arms (an algorithm with its settings) trains each arm once per training
seed and evaluates every trained model on the same test tasks. Two questions follow:

- How much does an arm's accuracy vary with the training seed? `seed_interval` gives the
  mean over seeds and its 95% interval from Student's t with `n - 1` degrees of freedom,
  `mean +- t_{0.975, n-1} s / sqrt(n)`.
- Is arm A better than arm B on the same tasks? `paired_test` takes the per-task differences
  `d_i = a_i - b_i` (each task's accuracy averaged over seeds first, when there are several)
  and gives their mean, its t interval, the two-sided t-test p-value
  `2 P(T_{n-1} > |mean / (s / sqrt(n))|)` and the two-sided exact sign-test p-value
  `min(1, 2 P(Binomial(n_+ + n_-, 1/2) <= min(n_+, n_-)))` (ties dropped).

When every trained model is also scored under identical test-time adaptations (so that a
difference in adaptation cannot pass for one in training), `adaptation_summaries` gives each
arm one summary per adaptation and `compare_adaptations` pairs two arms adaptation by
adaptation.

The t distribution comes from TensorFlow Probability (`tfp.distributions.StudentT`), which
the project already depends on; it is imported only when a quantile or tail is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

# The name of a model's own test-time adaptation among `adaptation_names`.
OWN = "own"


class Interval(NamedTuple):
    """A mean and its 95% t interval."""

    mean: float  # Mean of the values.
    half_width: float  # t_{0.975, n-1} * std(ddof=1) / sqrt(n); 0.0 for a single value.
    low: float  # mean - half_width.
    high: float  # mean + half_width.
    num: int  # Number of values (seeds, or tasks).


class PairedResult(NamedTuple):
    """A paired comparison of two arms on the same tasks: differences `a - b`."""

    mean_difference: float  # Mean of a_i - b_i.
    half_width: float  # Its 95% t half-width.
    low: float  # mean_difference - half_width.
    high: float  # mean_difference + half_width.
    t_pvalue: float  # Two-sided paired t-test p-value (1.0 when every difference is 0).
    sign_pvalue: float  # Two-sided exact sign-test p-value (ties dropped; 1.0 if all tie).
    wins: int  # Tasks where a > b.
    losses: int  # Tasks where a < b.
    ties: int  # Tasks where a == b.
    num_tasks: int  # Number of paired tasks.


def _student_t(df: float):
    import tensorflow_probability as tfp

    one = np.float64(1.0)
    return tfp.distributions.StudentT(df=np.float64(df), loc=0.0 * one, scale=one)


def t_quantile(probability: float, df: float) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom."""
    return float(_student_t(df).quantile(np.float64(probability)).numpy())


def t_two_sided_pvalue(t: float, df: float) -> float:
    """`2 P(T_df > |t|)`."""
    return float(2.0 * _student_t(df).survival_function(np.float64(abs(t))).numpy())


def sign_test_pvalue(wins: int, losses: int) -> float:
    """Two-sided exact sign test: `min(1, 2 P(Binomial(wins + losses, 1/2) <= min))`."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


def t_interval(values, *, confidence: float = 0.95) -> Interval:
    """The mean of `values` and its two-sided t interval at `confidence`.

    Raises:
      ValueError: If `values` is empty.
    """
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(values.mean())
    if values.size == 1:
        return Interval(mean, 0.0, mean, mean, 1)
    quantile = t_quantile(0.5 + confidence / 2.0, values.size - 1)
    half = float(quantile * values.std(ddof=1) / math.sqrt(values.size))
    return Interval(mean, half, mean - half, mean + half, int(values.size))


def seed_interval(per_seed_means) -> Interval:
    """The mean over training seeds of an arm's accuracy and its 95% t interval over seeds."""
    return t_interval(per_seed_means)


def paired_test(a, b) -> PairedResult:
    """Compares arms `a` and `b` on the same tasks.

    Args:
      a, b: Per-task accuracies `[num_tasks]`, or `[num_seeds, num_tasks]` (each task's
        accuracy is then averaged over seeds before pairing); task `i` of `a` and of `b` is
        the same task.

    Returns:
      A `PairedResult` of the differences `a - b`.

    Raises:
      ValueError: If the shapes differ, or there are fewer than 2 tasks.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[-1:] != b.shape[-1:] or a.ndim > 2 or b.ndim > 2:
        raise ValueError(f"paired_test needs the same tasks in a and b, got {a.shape}, {b.shape}")
    if a.ndim == 2:
        a = a.mean(axis=0)
    if b.ndim == 2:
        b = b.mean(axis=0)
    if a.size < 2:
        raise ValueError(f"paired_test needs at least 2 tasks, got {a.size}")
    d = a - b
    interval = t_interval(d)
    sd = d.std(ddof=1)
    if sd > 0:
        t_pvalue = t_two_sided_pvalue(d.mean() / (sd / math.sqrt(d.size)), d.size - 1)
    else:
        t_pvalue = 1.0 if d.mean() == 0 else 0.0
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    return PairedResult(
        mean_difference=interval.mean,
        half_width=interval.half_width,
        low=interval.low,
        high=interval.high,
        t_pvalue=float(t_pvalue),
        sign_pvalue=sign_test_pvalue(wins, losses),
        wins=wins,
        losses=losses,
        ties=int(d.size - wins - losses),
        num_tasks=int(d.size),
    )


def percent(interval: Interval | PairedResult) -> str:
    """`mean ± half` in percentage points, two decimals (for the Markdown tables).

    A mean of a single value has no interval, and says so instead of showing `± 0.00`.
    """
    mean = interval.mean if isinstance(interval, Interval) else interval.mean_difference
    if isinstance(interval, Interval) and interval.num == 1:
        return f"{100 * mean:.2f} (one value, no interval)"
    return f"{100 * mean:.2f} ± {100 * interval.half_width:.2f}"


def comparison_headers(*, tally: bool = True) -> list[str]:
    """The column names of `comparison_cells`."""
    tallied = ["wins / losses / ties"] if tally else []
    return [
        "seeds",
        "per task: difference (points)",
        "t-test p",
        "sign test p",
        *tallied,
        "per seed: difference (points)",
    ]


def comparison_cells(comparison: dict, *, tally: bool = True) -> list:
    """The Markdown cells of one `compare_arms` record: seeds, the per-task difference, its
    t-test and sign-test p-values, (with `tally`) wins / losses / ties, the per-seed
    difference."""
    test = comparison["per_task"]
    cells = [
        len(comparison["seeds"]),
        percent(PairedResult(**test)),
        test["t_pvalue"],
        test["sign_pvalue"],
    ]
    if tally:
        cells.append(f"{test['wins']} / {test['losses']} / {test['ties']}")
    return cells + [percent(Interval(**comparison["per_seed"]))]


def arm_summary(per_seed_per_task: dict) -> dict:
    """`{seed: per-task accuracies}` -> the JSON record of one arm.

    The record holds the per-seed means, their seed-level interval and the per-task
    accuracies (seed by seed), so that a reader can recompute every number.
    """
    seeds = sorted(per_seed_per_task)
    per_seed = [float(np.mean(per_seed_per_task[s])) for s in seeds]
    return {
        "seeds": seeds,
        "per_seed_accuracy": per_seed,
        "seed_interval": seed_interval(per_seed)._asdict(),
        "per_task": [np.asarray(per_seed_per_task[s], np.float64).tolist() for s in seeds],
    }


def compare_arms(a: dict, b: dict) -> dict:
    """Paired tests of two `arm_summary` records on their common seeds.

    Returns `{"seeds", "per_task": PairedResult dict, "per_seed": Interval dict}`: the
    per-task test on each task's accuracy averaged over the common seeds, and the t interval
    over seeds of the per-seed mean differences (seeds paired: same initial weights and
    training episodes).

    Raises:
      ValueError: If the two arms share no seed.
    """
    common = [s for s in a["seeds"] if s in b["seeds"]]
    if not common:
        raise ValueError(f"no common seed: {a['seeds']} and {b['seeds']}")
    rows_a = np.asarray([a["per_task"][a["seeds"].index(s)] for s in common])
    rows_b = np.asarray([b["per_task"][b["seeds"].index(s)] for s in common])
    return {
        "seeds": common,
        "per_task": paired_test(rows_a, rows_b)._asdict(),
        "per_seed": t_interval(rows_a.mean(axis=1) - rows_b.mean(axis=1))._asdict(),
    }


def adaptation_names(eval_lams: Iterable[float]) -> list[str]:
    """`"own"` (each model's own test-time adaptation), then `"lam=<x>"` per lam of
    `eval_lams` (the identical adaptations of `fewshot.adapted_accuracies`)."""
    return [OWN] + [f"lam={lam:g}" for lam in eval_lams]


def adaptation_summaries(records: Iterable[dict], *, arm_key: str) -> dict:
    """`{arm: {adaptation: arm_summary}}` of trained models scored under several adaptations.

    Args:
      records: One dict per trained model, with its arm under `arm_key`, its `seed` and its
        `per_task` accuracies `{adaptation: [num_tasks]}` (e.g. the model's own test-time
        adaptation and identical ones: `fewshot.adapted_accuracies`). Records without
        `per_task` (failed runs) are left out.
      arm_key: The record key that names the arm.
    """
    by_arm = {}
    for record in (r for r in records if "per_task" in r):
        arm = by_arm.setdefault(record[arm_key], {})
        for adaptation, values in record["per_task"].items():
            arm.setdefault(adaptation, {})[record["seed"]] = values
    return {
        arm: {a: arm_summary(by_seed) for a, by_seed in by_adaptation.items()}
        for arm, by_adaptation in by_arm.items()
    }


def compare_adaptations(a: dict, b: dict) -> list[dict]:
    """`compare_arms` of two arms under each adaptation of `a` that `b` also has.

    Args:
      a, b: `{adaptation: arm_summary}` records (an arm of `adaptation_summaries`).

    Returns:
      One `{"adaptation": name, **compare_arms(a[name], b[name])}` per adaptation, in `a`'s
      order: both arms adapted the same way, so that a difference in adaptation cannot pass
      for a difference in training (with `own`, each arm in its own adaptation).

    Raises:
      ValueError: If the two arms share no seed.
    """
    return [
        {"adaptation": name, **compare_arms(summary, b[name])}
        for name, summary in a.items()
        if name in b
    ]


def adaptation_cells(by_adaptation: dict, adaptations: Iterable[str]) -> list[str]:
    """`percent` of an arm's seed interval under each of `adaptations` (a dash when missing)."""
    return [
        percent(Interval(**by_adaptation[a]["seed_interval"])) if a in by_adaptation else "—"
        for a in adaptations
    ]
