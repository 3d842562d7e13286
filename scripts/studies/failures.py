"""Study 5: where iMAML breaks, what the library then does, and when first-order MAML wins.

Part 1, a failure map: on real Omniglot 5-way 1-shot training tasks at fixed meta-parameters
(the shipped model by default), each case below runs the library's own pieces, as
`ImplicitMAML.train_step` does: the inner loop (`minimize_proximal`, gradient descent from
`theta`; or the authors' `minimize_then_pull_back`), the query gradient at `phi`, the implicit
meta-gradient by CG (`linear_solve.solve_cg`, which stops on curvature `p.Ap <= 0`), and a
Lanczos estimate of the smallest eigenvalue of the matrix CG inverts,
`(1 + damping) I + H/(lam + lam_damping)` (`tf_imaml.curvature`). Cases: the paper's
setting; `lam` small against the curvature; too few inner steps; an inner learning rate too
large for `lam` (gradient descent on the proximal objective diverges when
`lr > 2 / (L + lam)`); damping; the authors' system (pull-back loop, `2 I + H/(lam + 10)`).
Counted per case: tasks whose inner loop diverged
(`||grad G(phi_K)|| > ||grad G(theta)||` or not finite), tasks not delta-stationary, tasks
whose linear solve failed (the library's `failed` flag: what `failed_fraction` counts and what
`on_failure` acts on), of these the ones stopped by negative curvature, and tasks where
Lanczos shows the matrix indefinite.

Part 2, a side-by-side training comparison: every run (iMAML with `on_failure` = drop /
first_order / zero, iMAML with damping, the authors' system `imaml_authors`, a lam sweep from
0.5 to 50 with the smaller inner step a larger lam needs, first-order MAML, and no training)
is trained once per training seed (`--seeds`; a seed sets the episodes, and the initial
weights unless all runs start from one model: `--train_from=pretrained` or `--init_model`).
Every trained model is scored on the same held-out test tasks under its own test-time
adaptation and under identical adaptations (`--eval_lams`: proximal GD from theta at each lam,
lam 0 being plain GD fine-tuning), so that a difference in adaptation cannot pass for a
difference in training. Reported per run and adaptation: the mean over seeds with its 95% t
interval (`stats.seed_interval`), the per-task accuracies of every seed, `failed_fraction` and
`skipped_steps`; per run against `--reference_run`: paired per-task and per-seed tests
(`stats.compare_arms`). A run with an inner learning rate far too large runs under
`tf_imaml.callbacks.DivergenceGuard`, to show the guard stopping it.

Writes `<output_dir>/study_failures.{md,json}` and PNG plots.

Usage:
  python scripts/studies/failures.py --output_dir=docs/studies/failures
  python scripts/studies/failures.py --tiny --output_dir=/tmp/failures  # a smoke run
  python scripts/studies/failures.py --output_dir=out --merge=a/study_failures.json,b/...
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import NamedTuple

import fewshot
import harness
import keras
import numpy as np
import reporting
import stats
import tensorflow as tf
from harness import option

import tf_imaml
from tf_imaml import tree


class Case(NamedTuple):
    """One inner-problem setting of the failure map."""

    name: str  # Row label.
    lam: float  # Proximal strength.
    inner_learning_rate: float  # Inner GD step size.
    inner_steps: int  # Inner GD steps K.
    damping: float  # Extra identity term of the linear system.
    lam_damping: float = 0.0  # Added to lam in the linear system only.
    pull_back: bool = False  # Inner loop: plain steps and one pull-back (the authors').


CASES = (
    Case("paper setting", 2.0, 0.1, 16, 0.0),
    Case("lam small (0.5)", 0.5, 0.1, 16, 0.0),
    Case("lam very small (0.1)", 0.1, 0.1, 16, 0.0),
    Case("lam large (10)", 10.0, 0.1, 16, 0.0),
    Case("lam 10, lr 0.05", 10.0, 0.05, 16, 0.0),
    Case("few steps (K=1)", 2.0, 0.1, 1, 0.0),
    Case("few steps (K=4)", 2.0, 0.1, 4, 0.0),
    Case("lr too large (0.5)", 2.0, 0.5, 16, 0.0),
    Case("lr far too large (2.0)", 2.0, 2.0, 16, 0.0),
    Case("damping 1.0", 2.0, 0.1, 16, 1.0),
    Case("authors' system", 2.0, 0.1, 16, 1.0, lam_damping=10.0, pull_back=True),
)
TINY_CASES = (
    Case("paper setting", 2.0, 0.1, 3, 0.0),
    Case("lr far too large (50)", 2.0, 50.0, 3, 0.0),
    Case("authors' system", 2.0, 0.1, 3, 1.0, lam_damping=10.0, pull_back=True),
)

RUNS = {
    # name: (algorithm, keyword arguments of the meta-learner); "no_training" is evaluated
    # at the starting weights without a meta-step (iMAML's inner loop, lam = 2).
    "no_training": ("imaml", dict(lam=2.0)),
    "imaml_drop": ("imaml", dict(lam=2.0, on_failure="drop")),
    "imaml_first_order": ("imaml", dict(lam=2.0, on_failure="first_order")),
    "imaml_zero": ("imaml", dict(lam=2.0, on_failure="zero")),
    "imaml_damping1": ("imaml", dict(lam=2.0, damping=1.0, on_failure="drop")),
    # The authors' system (imaml_dev): plain inner steps on the support loss and one
    # proximal pull-back, the damped system (1 + 1) I + H / (lam + 10), test-time lam 0.
    "imaml_authors": (
        "imaml",
        dict(
            lam=2.0,
            damping=1.0,
            lam_damping=10.0,
            inner_loop="pull_back",
            test_lam=0.0,
            on_failure="drop",
        ),
    ),
    "imaml_lam5": ("imaml", dict(lam=5.0, on_failure="drop")),
    # A lam sweep in training: does a larger lam make the implicit gradient usable (fewer
    # failed solves) without giving up the adaptation that a small lam allows? A larger lam
    # needs a smaller inner step (inner GD on the proximal objective diverges once
    # lr * (lam + L) > 2; study 4), so those runs set their own.
    "imaml_lam0.5_first_order": ("imaml", dict(lam=0.5, on_failure="first_order")),
    "imaml_lam10_lr0.03_first_order": (
        "imaml",
        dict(lam=10.0, inner_learning_rate=0.03, on_failure="first_order"),
    ),
    "imaml_lam50_lr0.01_first_order": (
        "imaml",
        dict(lam=50.0, inner_learning_rate=0.01, on_failure="first_order"),
    ),
    "fomaml": ("fomaml", dict()),
}
DEFAULT_RUNS = ("no_training", "imaml_drop", "imaml_first_order", "imaml_authors", "fomaml")


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = option("runs/study_failures", "Where results go.")
    cases: tuple[Case, ...] = option(CASES, "Failure-map cases.", flag=False, tiny=TINY_CASES)
    num_tasks: int = option(32, "Tasks per failure-map case.", lower_bound=1, tiny=2)
    task_batch: int = option(8, "Tasks evaluated together.", lower_bound=1, tiny=2)
    cg_steps: int = option(5, "CG iterations.", lower_bound=1, tiny=2)
    lanczos_iterations: int = option(20, "Lanczos iterations.", lower_bound=2, tiny=4)
    delta: float = option(0.1, "Relative stationarity threshold.")
    runs: tuple[str, ...] = option(
        DEFAULT_RUNS,
        f"Training runs compared, among {sorted(RUNS)}.",
        tiny=("imaml_drop", "imaml_authors", "fomaml"),
    )
    seeds: tuple[int, ...] = option(
        (0, 1, 2, 3, 4),
        "Training seeds of every run (initial weights when training from init, and the "
        "training episodes); the test tasks are the same for every seed.",
        tiny=(0, 1),
    )
    meta_steps: int = option(2000, "Meta-steps per training run.", tiny=2)
    steps_per_epoch: int = option(100, "Meta-steps per epoch.", tiny=1)
    meta_batch_size: int = option(8, "Tasks per meta-step.", lower_bound=1, tiny=2)
    inner_steps: int = option(16, "Inner steps of the runs.", tiny=2)
    inner_learning_rate: float = option(0.1, "Inner step size of the runs.")
    test_tasks: int = option(200, "Test tasks per run.", lower_bound=2, tiny=4)
    test_seed: int = option(2, "Seed of the test tasks (the same for every run and seed).")
    eval_lams: tuple[float, ...] = option(
        (0.0, 2.0),
        "Every trained model is also adapted the same way, whatever its training: "
        "--inner_steps proximal GD steps of --inner_learning_rate from theta at each lam here "
        "(0: plain GD fine-tuning of the support loss).",
    )
    reference_run: str = option(
        "fomaml", "Each run is compared with this one on the same test tasks (paired tests)."
    )
    guard_learning_rate: float = option(5.0, "Inner lr of the diverging run.", tiny=50.0)
    guard_steps: int = option(10, "Meta-steps of the diverging run.", tiny=2)
    pretrained: str = option(str(harness.PRETRAINED), "Map at this model ('' = init).", tiny="")
    train_from: str = option("init", "Start of the training runs.", choices=("init", "pretrained"))
    init_model: str = option(
        "",
        "A saved .keras meta-learner whose learner weights start every training run (e.g. a "
        "campaign model; overrides --train_from). '' = none.",
    )
    image_size: int = option(28, "Image side.", lower_bound=8, tiny=14)
    filters: int = option(64, "Conv filters.", lower_bound=1, tiny=8)
    seed: int = option(0, "Seed for weights, episodes and Lanczos.")
    verbose: bool = option(True, "Print progress.", flag=False)

    def validate(self) -> None:
        unknown = sorted(set(self.runs) - set(RUNS))
        if unknown:
            raise ValueError(f"--runs has unknown names {unknown}; known: {sorted(RUNS)}")
        if self.meta_steps % self.steps_per_epoch or self.guard_steps % 2:
            raise ValueError(
                "--meta_steps must be a multiple of --steps_per_epoch, and --guard_steps even"
            )
        if self.pretrained and not pathlib.Path(self.pretrained).is_file():
            raise ValueError(f"--pretrained {self.pretrained} is not a file")
        if self.train_from == "pretrained" and not self.pretrained:
            raise ValueError("--train_from=pretrained needs --pretrained")
        if self.pretrained and (self.image_size != 28 or self.filters != 64):
            raise ValueError("the shipped model needs --image_size=28 --filters=64")
        if self.init_model and not pathlib.Path(self.init_model).is_file():
            raise ValueError(f"--init_model {self.init_model} is not a file")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and non-empty, got {self.seeds}")
        if any(lam < 0 for lam in self.eval_lams):
            raise ValueError(f"--eval_lams must be >= 0, got {self.eval_lams}")
        if self.reference_run not in self.runs and self.reference_run:
            raise ValueError(f"--reference_run {self.reference_run} is not among --runs")


TINY = harness.tiny_values(Config)


def _learner(config: Config) -> keras.Model:
    return fewshot.learner(
        ways=5, image_size=config.image_size, filters=config.filters, seed=config.seed
    )


def _episodes(config: Config, data, *, seed: int, batch: int, num_tasks: int | None):
    return fewshot.episodes(data, ways=5, queries=15, batch=batch, seed=seed, num_tasks=num_tasks)


# ------------------------------------------------------------------------ part 1: the map


def make_case_fn(learner: keras.Model, config: Config):
    """A `tf.function` of (theta, episode, case numbers) -> per-task diagnostics `[T]`."""

    def loss_fn_of(x, y):
        def loss_fn(params):
            logits = tf_imaml.batched.apply(learner, params, x)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            return tf.reduce_mean(per_example, axis=1)

        return loss_fn

    @tf.function(reduce_retracing=True)
    def case_fn(
        theta,
        support_x,
        support_y,
        query_x,
        query_y,
        lam,
        lr,
        num_steps,
        damping,
        system_lam,
        pull_back: bool,
    ):
        theta = tree.broadcast_to_tasks(theta, tf.shape(support_x)[0])
        support_loss_fn = loss_fn_of(support_x, support_y)
        query_loss_fn = loss_fn_of(query_x, query_y)
        _, grad_theta = tf_imaml.hvp.value_and_grad(support_loss_fn, theta)
        optimizer = tf_imaml.inner_solvers.gradient_descent(lr)
        if pull_back:  # a Python bool: one trace per inner loop
            inner = tf_imaml.inner_solvers.minimize_then_pull_back(
                support_loss_fn,
                theta,
                lam=lam,
                num_steps=num_steps,
                optimizer=optimizer,
                pull_back_rate=lr,
            )
        else:
            inner = tf_imaml.inner_solvers.minimize_proximal(
                support_loss_fn, theta, lam=lam, num_steps=num_steps, optimizer=optimizer
            )
        phi = inner.adapted_params
        _, query_grads = tf_imaml.hvp.value_and_grad(query_loss_fn, phi)
        # The system (1 + damping) I + H / system_lam, system_lam = lam + lam_damping.
        result = tf_imaml.implicit.implicit_meta_gradient(
            support_loss_fn,
            phi,
            query_grads,
            lam=system_lam,
            damping=damping,
            linear_solver=tf_imaml.linear_solve.solve_cg,
            max_iter=config.cg_steps,
            hvp_mode="linearized",
        )
        lanczos = tf_imaml.curvature.proximal_curvature(
            support_loss_fn,
            phi,
            lam=system_lam,
            damping=damping,
            num_iter=config.lanczos_iterations,
            seed=config.seed,
        )
        return {
            "rel_grad_norm": inner.grad_norm / tree.norm(grad_theta),
            "failed": result.solve.failed,
            "negative_curvature": result.solve.negative_curvature,
            "relative_residual": result.solve.relative_residual,
            "min_eig": lanczos.min_eigenvalue,
            "hessian_max_eig": system_lam * (lanczos.max_eigenvalue - 1.0 - damping),
        }

    return case_fn


def failure_map(config: Config, theta: list[np.ndarray], data) -> list[dict]:
    """One row per case: counts over `num_tasks` training tasks."""
    case_fn = make_case_fn(_learner(config), config)
    seed, batch = config.seed + 100, config.task_batch  # the same tasks for every case
    tasks = list(_episodes(config, data, seed=seed, batch=batch, num_tasks=config.num_tasks))
    theta = [tf.constant(w) for w in theta]
    rows, start = [], time.time()
    for case in config.cases:
        parts = [
            case_fn(
                theta,
                sx,
                sy,
                qx,
                qy,
                tf.constant(case.lam),
                tf.constant(case.inner_learning_rate),
                tf.constant(case.inner_steps),
                tf.constant(case.damping),
                tf.constant(case.lam + case.lam_damping),
                case.pull_back,
            )
            for (sx, sy, qx), qy in tasks
        ]
        v = fewshot.concat_tasks(parts, config.num_tasks)
        inner_lam = 0.0 if case.pull_back else case.lam  # the lam of the inner GD steps
        rel = v["rel_grad_norm"]
        row = {
            **case._asdict(),
            "num_tasks": int(rel.size),
            "diverged": float(np.mean(~(rel <= 1.0))),
            "not_delta_stationary": float(np.mean(~(rel <= config.delta))),
            "solve_failed": float(np.mean(v["failed"])),
            "negative_curvature": float(np.mean(v["negative_curvature"])),
            "indefinite": float(np.mean(~(v["min_eig"] > 0))),
            # GD is unstable once lr (lam + L) > 2; the pull-back loop's plain steps once lr L > 2.
            "predicted_unstable": float(
                np.mean(~(case.inner_learning_rate * (inner_lam + v["hessian_max_eig"]) <= 2.0))
            ),
            "median_rel_grad_norm": float(np.median(rel)),
            "median_min_eig": float(np.median(v["min_eig"])),
            "median_hessian_max_eig": float(np.median(v["hessian_max_eig"])),
            "per_task": {k: a.tolist() for k, a in v.items()},
        }
        rows.append(row)
        harness.log(
            config.verbose,
            f"  {case.name}: diverged {row['diverged']:.2f}, solve failed "
            f"{row['solve_failed']:.2f}, indefinite {row['indefinite']:.2f} "
            f"({time.time() - start:.0f} s)",
        )
    return rows


# ------------------------------------------------------------------------ part 2: training


def _meta_model(config: Config, learner, algorithm: str, options: dict, *, inner_lr=None):
    # A run's own options (e.g. its inner step size) take precedence over the flags.
    options = dict(
        inner_steps=config.inner_steps,
        inner_learning_rate=inner_lr or config.inner_learning_rate,
    ) | dict(options)
    if algorithm == "imaml":
        meta = tf_imaml.ImplicitMAML(learner, cg_steps=config.cg_steps, **options)
    else:
        meta = tf_imaml.MAML(learner, first_order=True, **options)
    return fewshot.compile_meta(meta)


def train_one(config: Config, name: str, seed: int, init, data: dict) -> dict:
    """Trains run `name` with training seed `seed` from `init` (or from the seed's own
    initial weights when `init` is None); scores it on the shared test tasks."""
    algorithm, options = RUNS[name]
    learner = fewshot.learner(
        ways=5, image_size=config.image_size, filters=config.filters, seed=seed
    )
    if init is not None:
        learner.set_weights(init)
    meta = _meta_model(config, learner, algorithm, options)
    keras.utils.set_random_seed(seed)
    episodes = _episodes(
        config, data["train"], seed=seed, batch=config.meta_batch_size, num_tasks=None
    )
    start = time.time()
    history = {"loss": []}
    if name != "no_training":
        history = meta.fit(
            episodes,
            epochs=config.meta_steps // config.steps_per_epoch,
            steps_per_epoch=config.steps_per_epoch,
            verbose=0,
        ).history
    seconds = time.time() - start
    test = _episodes(
        config,
        data["test"],
        seed=config.test_seed,
        batch=min(20, config.test_tasks),
        num_tasks=config.test_tasks,
    )
    per_task = fewshot.adapted_accuracies(
        meta,
        test,
        eval_lams=config.eval_lams,
        inner_steps=config.inner_steps,
        inner_learning_rate=config.inner_learning_rate,
    )
    failed = history.get("failed_fraction", [0.0])
    own = per_task[stats.OWN]
    return {
        "run": name,
        "seed": seed,
        "algorithm": algorithm,
        **dict(options),
        "test_accuracy": float(own.mean()),
        "test_ci95": reporting.mean_ci95(own)[1],
        "test_tasks": int(own.size),
        "accuracy": {k: float(v.mean()) for k, v in per_task.items()},
        "per_task": {k: v.tolist() for k, v in per_task.items()},
        "failed_fraction": float(np.mean(failed)),
        "failed_fraction_per_epoch": [float(x) for x in failed],
        "skipped_steps": float(np.sum(history.get("skipped_steps", [0.0]))),
        "train_loss_per_epoch": [float(x) for x in history["loss"]],
        "train_seconds": round(seconds, 1),
    }


def summarize(config: Config, run_rows: list[dict]) -> tuple[dict, list[dict]]:
    """Seed-level summaries per run and adaptation, and paired tests against the reference.

    Returns `(arms, comparisons)`: `arms[run][adaptation]` is a `stats.arm_summary` record;
    each comparison is `stats.compare_arms` of a run against `config.reference_run` under
    the same adaptation, on the same test tasks and their common seeds.
    """
    arms = stats.adaptation_summaries(run_rows, arm_key="run")
    reference = arms.get(config.reference_run)
    comparisons = [
        {"run": run, "reference": config.reference_run, **comparison}
        for run, by_adaptation in arms.items()
        if reference is not None and run != config.reference_run
        for comparison in stats.compare_adaptations(by_adaptation, reference)
    ]
    return arms, comparisons


def guard_demo(config: Config, init: list[np.ndarray], data) -> dict:
    """A run with a far too large inner lr under `DivergenceGuard`: what stops it, and when."""
    learner = _learner(config)
    learner.set_weights(init)
    meta = _meta_model(config, learner, "imaml", dict(lam=2.0), inner_lr=config.guard_learning_rate)
    episodes = _episodes(
        config, data, seed=config.seed, batch=config.meta_batch_size, num_tasks=None
    )
    guard = tf_imaml.callbacks.DivergenceGuard(max_skipped_fraction=0.5)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(
            {k: float(logs[k]) for k in ("failed_fraction", "skipped_steps", "inner_grad_norm")}
        )
    )
    message = None
    try:
        meta.fit(
            episodes,
            epochs=2,
            steps_per_epoch=config.guard_steps // 2,
            callbacks=[record, guard],
            verbose=0,
        )
    except tf_imaml.callbacks.TrainingDiverged as err:
        message = str(err)
    weights_finite = all(np.all(np.isfinite(w)) for w in learner.get_weights())
    return {
        "inner_learning_rate": config.guard_learning_rate,
        "lam": 2.0,
        "stopped": message is not None,
        "message": message,
        "epochs": seen,
        "weights_finite": weights_finite,
    }


# ------------------------------------------------------------------------ report

MAP_COLUMNS = (
    ("name", "case"),
    ("lam", "lam"),
    ("inner_learning_rate", "lr"),
    ("inner_steps", "K"),
    ("damping", "damping"),
    ("lam_damping", "lam_damping"),
    ("pull_back", "pull-back loop"),
    ("diverged", "inner GD diverged"),
    ("not_delta_stationary", "not delta-stationary"),
    ("predicted_unstable", "lr (lam+L) > 2 (pull-back: lr L > 2)"),
    ("indefinite", "matrix indefinite (Lanczos)"),
    ("solve_failed", "solve failed (failed_fraction)"),
    ("negative_curvature", "CG hit p·Ap ≤ 0"),
    ("median_rel_grad_norm", "median ‖∇G(φ)‖/‖∇G(θ)‖"),
    ("median_min_eig", "median λmin"),
)


def plot(config: Config, map_rows, run_rows, arms) -> dict:
    """The failure map and, once runs are done, their accuracy and failed fractions."""
    plt = reporting.pyplot()
    figures = {}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(map_rows) + 1.2))
    y = np.arange(len(map_rows))
    for i, (key, label) in enumerate(
        (
            ("diverged", "inner GD diverged"),
            ("indefinite", "indefinite"),
            ("solve_failed", "solve failed"),
        )
    ):
        ax.barh(y + (i - 1) * 0.27, [r[key] for r in map_rows], height=0.27, label=label)
    ax.set_yticks(y, [r["name"] for r in map_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"fraction of {config.num_tasks} tasks", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("Failure map (fixed theta)", fontsize=9)
    figures["study_failures_map.png"] = fig
    if run_rows:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
        names = list(arms)
        adaptations = stats.adaptation_names(config.eval_lams)
        height = 0.8 / len(adaptations)
        for i, adaptation in enumerate(adaptations):
            intervals = [arms[n][adaptation]["seed_interval"] for n in names]
            ax1.barh(
                np.arange(len(names)) + i * height,
                [100 * v["mean"] for v in intervals],
                xerr=[100 * v["half_width"] for v in intervals],
                height=height,
                label=adaptation,
            )
        ax1.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names)
        ax1.set_xlabel(
            f"test accuracy (%), {config.test_tasks} tasks, 95% t interval over seeds",
            fontsize=8,
        )
        ax1.invert_yaxis()
        ax1.tick_params(labelsize=7)
        ax1.legend(fontsize=6, title="adaptation", title_fontsize=6)
        for r in run_rows:
            if r["seed"] != config.seeds[0]:
                continue
            epochs = np.arange(1, len(r["failed_fraction_per_epoch"]) + 1) * config.steps_per_epoch
            ax2.plot(epochs, r["failed_fraction_per_epoch"], marker="o", label=r["run"])
        ax2.set_xlabel(f"meta-step (seed {config.seeds[0]})", fontsize=8)
        ax2.set_ylabel("failed_fraction (epoch mean)", fontsize=8)
        ax2.tick_params(labelsize=7)
        ax2.legend(fontsize=6)
        figures["study_failures_training.png"] = fig
    return figures


def _run_tables(config: Config, run_rows: list[dict], arms: dict, comparisons: list[dict]):
    """The training table (one row per run) and the paired-test table."""
    adaptations = stats.adaptation_names(config.eval_lams)
    rows = []
    for name, by_adaptation in arms.items():
        mine = [r for r in run_rows if r["run"] == name]
        rows.append(
            [name, len(mine)]
            + stats.adaptation_cells(by_adaptation, adaptations)
            + [
                float(np.mean([r["failed_fraction"] for r in mine])),
                float(np.mean([r["skipped_steps"] for r in mine])),
                float(np.mean([r["train_seconds"] for r in mine])),
            ]
        )
    runs = reporting.markdown_table(
        ["run", "seeds"]
        + [f"test accuracy (%), adapted by {a}" for a in adaptations]
        + ["failed_fraction", "skipped steps", "train s (mean)"],
        rows,
    )
    tests = reporting.markdown_table(
        [
            "run",
            "against",
            "adaptation",
            *stats.comparison_headers(),
        ],
        [
            [
                c["run"],
                c["reference"],
                c["adaptation"],
                *stats.comparison_cells(c),
            ]
            for c in comparisons
        ],
    )
    return runs, tests


def _report(config, out, map_rows, run_rows, guard, theta_name, start_name, start):
    """Writes the Markdown tables, JSON and plots of what is done so far; returns the JSON."""
    seconds = time.time() - start
    arms, comparisons = summarize(config, run_rows)
    figures = plot(config, map_rows, run_rows, arms)
    plots = list(figures)
    map_table = reporting.markdown_table(
        [t for _, t in MAP_COLUMNS], [[r[k] for k, _ in MAP_COLUMNS] for r in map_rows]
    )
    run_table, test_table = _run_tables(config, run_rows, arms, comparisons)
    guard_text = (
        f"DivergenceGuard, iMAML lam=2 with inner lr {guard['inner_learning_rate']:g}, "
        f"{config.guard_steps} meta-steps in 2 epochs: "
        + (f'stopped: "{guard["message"]}"' if guard["stopped"] else "did not stop the run")
        + f"; per epoch {guard['epochs']}; weights finite afterwards: {guard['weights_finite']}."
    )
    seeds = ", ".join(str(s) for s in config.seeds)
    markdown = (
        "## Study 5: where iMAML breaks\n\n"
        f"### Failure map\n\nOmniglot 5-way 1-shot training tasks ({config.num_tasks}, the "
        f"same for every case) at {theta_name}, conv net with {config.filters} filters on "
        f"{config.image_size}x{config.image_size} images; inner GD from theta on the proximal "
        "objective (pull-back loop: plain GD on the support loss, then one proximal step); "
        f"{config.cg_steps} steps of our CG (`solve_cg`) and Lanczos "
        f"{config.lanczos_iterations} iterations on (1 + damping) I + H/(lam + lam_damping) "
        "at phi_K; "
        f"delta = {config.delta:g} (relative); L = Lanczos estimate of the Hessian's largest "
        "eigenvalue at phi_K. Fractions of tasks.\n\n"
        + map_table
        + "\n\n### Training side by side\n\n"
        f"Start: {start_name}; training seeds {seeds} (a seed sets the training episodes, "
        "and the initial weights when training from init); for each seed every run meets the "
        f"same episodes: {config.meta_steps} "
        f"meta-steps of {config.meta_batch_size} tasks, Adam 1e-3, {config.inner_steps} inner "
        f"GD steps of {config.inner_learning_rate:g} (a run whose name gives lr uses its own), "
        f"{config.cg_steps} CG steps. Test: the same {config.test_tasks} Omniglot test tasks "
        f"(seed {config.test_seed}) for every run and seed, each model adapted by its own "
        "test-time adaptation (`own`: the training lam for iMAML unless its test_lam says "
        "otherwise, plain GD for MAML) and by the same proximal GD "
        f"({config.inner_steps} steps of {config.inner_learning_rate:g} from theta) at each lam "
        "of `lam=<x>` (lam 0: plain GD fine-tuning). Accuracy: mean over seeds ± 95% t "
        f"interval over seeds; failed_fraction: mean over epochs of {config.steps_per_epoch} "
        "meta-steps and seeds.\n\n" + run_table + "\n\n### Paired tests on the same test tasks\n\n"
        "Per task: differences of each task's accuracy (averaged over the common seeds), "
        "their mean ± 95% t interval, two-sided t-test and exact sign-test p-values. Per "
        "seed: the t interval of the per-seed mean differences.\n\n"
        + test_table
        + "\n\n### DivergenceGuard\n\n"
        + guard_text
        + "\n\n"
        + reporting.image_links(plots)
        + f"\nWall time {seconds:.0f} s; runs finished: {len(run_rows)} of "
        f"{len(config.runs) * len(config.seeds)}.\n"
    )
    summary = {
        "config": {**dataclasses.asdict(config), "cases": [c._asdict() for c in config.cases]},
        "command": harness.command("failures"),
        "theta": theta_name,
        "train_from": start_name,
        "failure_map": map_rows,
        "runs": run_rows,
        "arms": arms,
        "comparisons": comparisons,
        "guard": guard,
        "plots": plots,
        "seconds": round(seconds, 1),
    }
    reporting.write(out, "study_failures", markdown=markdown, data=summary, figures=figures, dpi=80)
    return summary


def _start_weights(config: Config, shipped):
    """The training runs' common initial weights and their name (None: each seed's own)."""
    if config.init_model:
        weights = keras.models.load_model(config.init_model).learner.get_weights()
        return weights, f"the model {config.init_model}"
    if config.train_from == "pretrained":
        return shipped, "the shipped model"
    return None, "the random initialisation of each seed"


def run(config: Config) -> dict:
    """Maps the failures, runs the guard demo, then trains the runs (report after each)."""
    out = harness.output_folder(config, deterministic=True)
    start = time.time()
    data = fewshot.load_omniglot_splits(config.image_size)
    init = _learner(config).get_weights()
    shipped = None
    if config.pretrained:
        shipped_learner = keras.models.load_model(config.pretrained).learner
        shipped = shipped_learner.get_weights()
        theta = [v.numpy() for v in shipped_learner.trainable_variables]
        theta_name = "the shipped model"
    else:
        theta, theta_name = init, "the random initialisation"
    harness.log(config.verbose, f"failure map at {theta_name} ...")
    map_rows = failure_map(config, theta, data["train"])
    start_weights, start_name = _start_weights(config, shipped)
    harness.log(config.verbose, "diverging run under DivergenceGuard ...")
    guard = guard_demo(config, init if start_weights is None else start_weights, data["train"])
    run_rows = []
    # The report is written now and after every run, so that a run cut short keeps the rest.
    summary = _report(config, out, map_rows, run_rows, guard, theta_name, start_name, start)
    harness.log(config.verbose, f"training runs from {start_name} ...")
    for name in config.runs:
        for seed in config.seeds:
            untrained = name == "no_training" and start_weights is not None
            if untrained and seed != config.seeds[0]:
                # The same weights for every seed and no training: the first seed's scores.
                row = dict(next(r for r in run_rows if r["run"] == name), seed=seed)
            else:
                row = train_one(config, name, seed, start_weights, data)
            run_rows.append(row)
            harness.log(
                config.verbose,
                f"  {name} seed {seed}: "
                + ", ".join(f"{a} {100 * v:.2f}%" for a, v in row["accuracy"].items())
                + f"; failed {row['failed_fraction']:.2f}, {row['train_seconds']:.0f} s",
            )
            summary = _report(config, out, map_rows, run_rows, guard, theta_name, start_name, start)
    harness.log(config.verbose, f"done in {summary['seconds']:.0f} s; results in {out}")
    return summary


# Config fields that runs must share to be merged: the same test tasks and adaptations, the
# same training setting and start. Not `reference_run`: the merge recomputes every comparison
# against the first file's, so a part holding only other runs names one of its own.
_MERGE_FIELDS = (
    "meta_steps",
    "steps_per_epoch",
    "meta_batch_size",
    "inner_steps",
    "inner_learning_rate",
    "cg_steps",
    "test_tasks",
    "test_seed",
    "eval_lams",
    "train_from",
    "init_model",
    "image_size",
    "filters",
)


def merge(paths: list[str], output_dir: str) -> dict:
    """Combines several runs' `study_failures.json` (each with its share of the runs or
    seeds) into one report; the failure map and guard demo are the first file's.

    Raises:
      ValueError: If the files differ in a field of `_MERGE_FIELDS`, or two hold the same
        run and seed.
    """
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    first = parts[0]["config"]
    for path, part in zip(paths, parts, strict=True):
        harness.check_same(path, part["config"], first, _MERGE_FIELDS)
    run_rows = [row for part in parts for row in part["runs"]]
    keys = [(row["run"], row["seed"]) for row in run_rows]
    twice = harness.repeated(keys)
    if twice:
        raise ValueError(f"runs met in more than one file: {twice}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in first.items()}
    values["cases"] = tuple(Case(**c) for c in first["cases"])
    values["runs"] = tuple(dict.fromkeys(r for r, _ in keys))
    values["seeds"] = tuple(sorted({s for _, s in keys}))
    values["output_dir"] = output_dir
    values["verbose"] = False
    config = Config(**values)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = _report(
        config,
        out,
        parts[0]["failure_map"],
        run_rows,
        parts[0]["guard"],
        parts[0]["theta"],
        parts[0]["train_from"],
        time.time(),
    )
    summary["merged_from"] = [str(p) for p in paths]
    reporting.write_json(out / "study_failures.json", summary)
    return summary


if __name__ == "__main__":
    harness.main(
        Config,
        run,
        tiny=TINY,
        merge=merge,
        merge_help="combine the study_failures.json of runs with the same setting (each with "
        "its share of --runs or --seeds, e.g. one process per core) into one report in "
        "--output_dir.",
    )
