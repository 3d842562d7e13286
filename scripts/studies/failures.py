"""Study 5: where iMAML breaks, what the library then does, and when first-order MAML wins.

Part 1, a failure map: on real Omniglot 5-way 1-shot training tasks at fixed meta-parameters
(the shipped model by default), each case below runs the library's own pieces, as
`ImplicitMAML.train_step` does: the inner loop (`minimize_proximal`, gradient descent from
`theta`), the query gradient at `phi`, the implicit meta-gradient by CG (`linear_solve.solve_cg`,
which stops on curvature `p.Ap <= 0`), and a Lanczos estimate of the smallest eigenvalue of the
matrix CG inverts, `(1 + damping) I + H/lam` (`tf_imaml.curvature`). Cases: the paper's
setting; `lam` small against the curvature; too few inner steps; an inner learning rate too
large for `lam` (gradient descent on the proximal objective diverges when
`lr > 2 / (L + lam)`); damping. Counted per case: tasks whose inner loop diverged
(`||grad G(phi_K)|| > ||grad G(theta)||` or not finite), tasks not delta-stationary, tasks
whose linear solve failed (the library's `failed` flag: what `failed_fraction` counts and what
`on_failure` acts on), of these the ones stopped by negative curvature, and tasks where
Lanczos shows the matrix indefinite.

Part 2, a side-by-side training comparison from the same initial weights on the same
episodes: iMAML with `on_failure` = drop / first_order / zero, iMAML with damping, a lam sweep
(0.5 to 50, each larger lam with the smaller inner step it needs), and first-order MAML; each evaluated on the same held-out test tasks (mean
+- 95% CI), with its `failed_fraction` and `skipped_steps`. Then a run with an inner learning
rate far too large under `tf_imaml.callbacks.DivergenceGuard`, to show the guard stopping it.

Writes `<output_dir>/study_failures.{md,json}` and PNG plots.

Usage:
  python scripts/studies/failures.py --output_dir=docs/studies/failures
  python scripts/studies/failures.py --tiny --output_dir=/tmp/failures  # a smoke run
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import NamedTuple

import fewshot
import harness
import keras
import numpy as np
import reporting
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
)
TINY_CASES = (
    Case("paper setting", 2.0, 0.1, 3, 0.0),
    Case("lr far too large (50)", 2.0, 50.0, 3, 0.0),
)

RUNS = {
    # name: (algorithm, keyword arguments of the meta-learner); "no_training" is evaluated
    # at the starting weights without a meta-step (iMAML's inner loop, lam = 2).
    "no_training": ("imaml", dict(lam=2.0)),
    "imaml_drop": ("imaml", dict(lam=2.0, on_failure="drop")),
    "imaml_first_order": ("imaml", dict(lam=2.0, on_failure="first_order")),
    "imaml_zero": ("imaml", dict(lam=2.0, on_failure="zero")),
    "imaml_damping1": ("imaml", dict(lam=2.0, damping=1.0, on_failure="drop")),
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
        tuple(RUNS), "Training runs compared.", tiny=("imaml_drop", "fomaml")
    )
    meta_steps: int = option(150, "Meta-steps per training run.", tiny=2)
    steps_per_epoch: int = option(50, "Meta-steps per epoch.", tiny=1)
    meta_batch_size: int = option(8, "Tasks per meta-step.", lower_bound=1, tiny=2)
    inner_steps: int = option(16, "Inner steps of the runs.", tiny=2)
    inner_learning_rate: float = option(0.1, "Inner step size of the runs.")
    test_tasks: int = option(200, "Test tasks per run.", lower_bound=2, tiny=4)
    guard_learning_rate: float = option(5.0, "Inner lr of the diverging run.", tiny=50.0)
    guard_steps: int = option(10, "Meta-steps of the diverging run.", tiny=2)
    pretrained: str = option(str(harness.PRETRAINED), "Map at this model ('' = init).", tiny="")
    train_from: str = option("init", "Start of the training runs.", choices=("init", "pretrained"))
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
    def case_fn(theta, support_x, support_y, query_x, query_y, lam, lr, num_steps, damping):
        theta = tree.broadcast_to_tasks(theta, tf.shape(support_x)[0])
        support_loss_fn = loss_fn_of(support_x, support_y)
        query_loss_fn = loss_fn_of(query_x, query_y)
        _, grad_theta = tf_imaml.hvp.value_and_grad(support_loss_fn, theta)
        inner = tf_imaml.inner_solvers.minimize_proximal(
            support_loss_fn,
            theta,
            lam=lam,
            num_steps=num_steps,
            optimizer=tf_imaml.inner_solvers.gradient_descent(lr),
        )
        phi = inner.adapted_params
        _, query_grads = tf_imaml.hvp.value_and_grad(query_loss_fn, phi)
        result = tf_imaml.implicit.implicit_meta_gradient(
            support_loss_fn,
            phi,
            query_grads,
            lam=lam,
            damping=damping,
            linear_solver=tf_imaml.linear_solve.solve_cg,
            max_iter=config.cg_steps,
            hvp_mode="linearized",
        )
        lanczos = tf_imaml.curvature.proximal_curvature(
            support_loss_fn,
            phi,
            lam=lam,
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
            "hessian_max_eig": lam * (lanczos.max_eigenvalue - 1.0 - damping),
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
            )
            for (sx, sy, qx), qy in tasks
        ]
        v = fewshot.concat_tasks(parts, config.num_tasks)
        rel = v["rel_grad_norm"]
        row = {
            **case._asdict(),
            "num_tasks": int(rel.size),
            "diverged": float(np.mean(~(rel <= 1.0))),
            "not_delta_stationary": float(np.mean(~(rel <= config.delta))),
            "solve_failed": float(np.mean(v["failed"])),
            "negative_curvature": float(np.mean(v["negative_curvature"])),
            "indefinite": float(np.mean(~(v["min_eig"] > 0))),
            "predicted_unstable": float(
                np.mean(~(case.inner_learning_rate * (case.lam + v["hessian_max_eig"]) <= 2.0))
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


def train_runs(config: Config, init: list[np.ndarray], data: dict) -> list[dict]:
    """Trains every run from `init` on the same episodes; test accuracy on the same tasks."""
    rows = []
    for name in config.runs:
        algorithm, options = RUNS[name]
        learner = _learner(config)
        learner.set_weights(init)
        meta = _meta_model(config, learner, algorithm, options)
        keras.utils.set_random_seed(config.seed)
        episodes = _episodes(
            config, data["train"], seed=config.seed, batch=config.meta_batch_size, num_tasks=None
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
            seed=config.seed + 2,
            batch=min(20, config.test_tasks),
            num_tasks=config.test_tasks,
        )
        accuracy = tf_imaml.evaluation.few_shot_accuracy(meta, test)
        failed = history.get("failed_fraction", [0.0])
        row = {
            "run": name,
            "algorithm": algorithm,
            **{k: v for k, v in options.items()},
            "test_accuracy": accuracy.mean,
            "test_ci95": accuracy.ci95,
            "test_tasks": accuracy.num_tasks,
            "failed_fraction": float(np.mean(failed)),
            "failed_fraction_per_epoch": [float(x) for x in failed],
            "skipped_steps": float(np.sum(history.get("skipped_steps", [0.0]))),
            "train_loss_per_epoch": [float(x) for x in history["loss"]],
            "train_seconds": round(seconds, 1),
        }
        rows.append(row)
        harness.log(
            config.verbose,
            f"  {name}: test {100 * accuracy.mean:.2f} +- {100 * accuracy.ci95:.2f}%, failed "
            f"{row['failed_fraction']:.2f}, {seconds:.0f} s",
        )
    return rows


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
    ("diverged", "inner GD diverged"),
    ("not_delta_stationary", "not delta-stationary"),
    ("predicted_unstable", "lr (lam+L) > 2"),
    ("indefinite", "matrix indefinite (Lanczos)"),
    ("solve_failed", "solve failed (failed_fraction)"),
    ("negative_curvature", "CG hit p·Ap ≤ 0"),
    ("median_rel_grad_norm", "median ‖∇G(φ)‖/‖∇G(θ)‖"),
    ("median_min_eig", "median λmin"),
)
RUN_COLUMNS = (
    ("run", "run"),
    ("accuracy", "test accuracy (%)"),
    ("failed_fraction", "failed_fraction"),
    ("failed_per_epoch", "failed_fraction per epoch"),
    ("skipped_steps", "skipped steps"),
    ("train_seconds", "train s"),
)


def plot(config: Config, map_rows, run_rows) -> dict:
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
        names = [r["run"] for r in run_rows]
        acc = [100 * r["test_accuracy"] for r in run_rows]
        ci = [100 * r["test_ci95"] for r in run_rows]
        ax1.barh(names, acc, xerr=ci, color="tab:blue")
        ax1.set_xlabel(f"test accuracy (%), {run_rows[0]['test_tasks']} tasks, 95% CI", fontsize=8)
        ax1.invert_yaxis()
        ax1.tick_params(labelsize=7)
        for r in run_rows:
            epochs = np.arange(1, len(r["failed_fraction_per_epoch"]) + 1) * config.steps_per_epoch
            ax2.plot(epochs, r["failed_fraction_per_epoch"], marker="o", label=r["run"])
        ax2.set_xlabel("meta-step", fontsize=8)
        ax2.set_ylabel("failed_fraction (epoch mean)", fontsize=8)
        ax2.tick_params(labelsize=7)
        ax2.legend(fontsize=6)
        figures["study_failures_training.png"] = fig
    return figures


def _report(config, out, map_rows, run_rows, guard, theta_name, start_name, start):
    """Writes the Markdown tables, JSON and plots of what is done so far; returns the JSON."""
    seconds = time.time() - start
    figures = plot(config, map_rows, run_rows)
    plots = list(figures)
    map_table = reporting.markdown_table(
        [t for _, t in MAP_COLUMNS], [[r[k] for k, _ in MAP_COLUMNS] for r in map_rows]
    )
    run_table = reporting.markdown_table(
        [t for _, t in RUN_COLUMNS],
        [
            [
                r["run"],
                f"{100 * r['test_accuracy']:.2f} ± {100 * r['test_ci95']:.2f}",
                r["failed_fraction"],
                ", ".join(f"{x:.2f}" for x in r["failed_fraction_per_epoch"]),
                r["skipped_steps"],
                r["train_seconds"],
            ]
            for r in run_rows
        ],
    )
    guard_text = (
        f"DivergenceGuard, iMAML lam=2 with inner lr {guard['inner_learning_rate']:g}, "
        f"{config.guard_steps} meta-steps in 2 epochs: "
        + (f'stopped: "{guard["message"]}"' if guard["stopped"] else "did not stop the run")
        + f"; per epoch {guard['epochs']}; weights finite afterwards: {guard['weights_finite']}."
    )
    markdown = (
        "## Study 5: where iMAML breaks\n\n"
        f"### Failure map\n\nOmniglot 5-way 1-shot training tasks ({config.num_tasks}, the "
        f"same for every case) at {theta_name}, conv net with {config.filters} filters on "
        f"{config.image_size}x{config.image_size} images; inner GD from theta; "
        f"{config.cg_steps} steps of our CG (`solve_cg`); Lanczos "
        f"{config.lanczos_iterations} iterations on (1 + damping) I + H/lam at phi_K; "
        f"delta = {config.delta:g} (relative); L = Lanczos estimate of the Hessian's largest "
        "eigenvalue at phi_K. Fractions of tasks.\n\n"
        + map_table
        + "\n\n### Training side by side\n\n"
        f"Same initial weights ({start_name}) and the same episodes for every run: "
        f"{config.meta_steps} "
        f"meta-steps of {config.meta_batch_size} tasks, Adam 1e-3, {config.inner_steps} inner "
        f"GD steps of {config.inner_learning_rate:g} (a run whose name gives lr uses its own), "
        f"{config.cg_steps} CG steps; test accuracy "
        f"on the same {config.test_tasks} Omniglot test tasks (mean ± 95% CI); "
        f"failed_fraction: mean over epochs of {config.steps_per_epoch} meta-steps.\n\n"
        + run_table
        + "\n\n### DivergenceGuard\n\n"
        + guard_text
        + "\n\n"
        + reporting.image_links(plots)
        + f"\nWall time {seconds:.0f} s; runs finished: {len(run_rows)} of {len(config.runs)}.\n"
    )
    summary = {
        "config": {**dataclasses.asdict(config), "cases": [c._asdict() for c in config.cases]},
        "command": harness.command("failures"),
        "theta": theta_name,
        "train_from": start_name,
        "failure_map": map_rows,
        "runs": run_rows,
        "guard": guard,
        "plots": plots,
        "seconds": round(seconds, 1),
    }
    reporting.write(out, "study_failures", markdown=markdown, data=summary, figures=figures, dpi=80)
    return summary


def run(config: Config) -> dict:
    """Maps the failures, runs the guard demo, then trains the runs (report after each)."""
    out = harness.output_folder(config, deterministic=True)
    start = time.time()
    data = fewshot.load_omniglot_splits(config.image_size)
    init = _learner(config).get_weights()
    if config.pretrained:
        shipped_learner = keras.models.load_model(config.pretrained).learner
        shipped = shipped_learner.get_weights()
        theta = [v.numpy() for v in shipped_learner.trainable_variables]
        theta_name = "the shipped model"
    else:
        theta, theta_name = init, "the random initialisation"
    harness.log(config.verbose, f"failure map at {theta_name} ...")
    map_rows = failure_map(config, theta, data["train"])
    start_weights = shipped if config.train_from == "pretrained" else init
    start_name = theta_name if config.train_from == "pretrained" else "the random initialisation"
    harness.log(config.verbose, "diverging run under DivergenceGuard ...")
    guard = guard_demo(config, start_weights, data["train"])
    run_rows = []
    # The report is written now and after every run, so that a run cut short keeps the rest.
    summary = _report(config, out, map_rows, run_rows, guard, theta_name, start_name, start)
    harness.log(config.verbose, f"training runs from {start_name} ...")
    for name in config.runs:
        run_rows += train_runs(dataclasses.replace(config, runs=(name,)), start_weights, data)
        summary = _report(config, out, map_rows, run_rows, guard, theta_name, start_name, start)
    harness.log(config.verbose, f"done in {summary['seconds']:.0f} s; results in {out}")
    return summary


if __name__ == "__main__":
    harness.main(Config, run, tiny=TINY)
