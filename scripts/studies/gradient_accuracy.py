"""Study 1: how accurate is iMAML's implicit meta-gradient?

The exact meta-gradient of a task is `d/d theta L_query(phi*(theta))`, `phi*` the exact
minimiser of the proximal objective `G(phi) = L_support(phi) + lam/2 ||phi - theta||^2`
(Rajeswaran et al. 2019, Figure 2a). Three approximations of it are compared, each after `K`
inner gradient-descent steps on `G` from `phi_0 = theta`:

- iMAML: `(I + H(phi_K)/lam)^-1 grad L_query(phi_K)` by `C` conjugate-gradient steps
  (`tf_imaml.implicit.implicit_meta_gradient`).
- damped iMAML, the system the authors' code solves:
  `((1 + damping) I + H(phi_K)/(lam + lam_damping))^-1 grad L_query(phi_K)` (`--damping=1`,
  `--lam_damping=10`: `2I + H/12` at lam 2), with the largest `C`. Its error against the
  exact target includes its bias; the same system solved at the reference point `phi*`
  (reported with the reference) is the bias alone.
- MAML: backpropagation through the `K` unrolled steps on the same proximal objective
  (`tf_imaml.unrolled`), so that it converges to the same target as `K` grows.
- first-order MAML: `grad L_query(phi_K)`.

Two problems:

- Ridge regression tasks (`tf_imaml.testing`), whose exact target is closed form.
- The Omniglot conv net (`tf_imaml.models.conv4_classifier`) on real 5-way 1-shot test tasks,
  at the shipped meta-trained weights and at a random initialisation (ReLU, or a smooth
  activation by `--activation`). The reference is computed in float64: the inner problem by
  `--reference_inner_steps` gradient-descent steps or, with `--reference_solver=lbfgs`, as
  many L-BFGS iterations (`tf_imaml.reference.lbfgs_proximal_minimum`; the remaining
  proximal gradient norm is reported), from theta or, with `--reference_init=phi_K`, from
  GD's iterate at the largest `K` (so that L-BFGS finds the minimiser GD's path approaches);
  then conjugate gradient to a tiny residual (reported, with the tasks where `I + H/lam`
  showed non-positive curvature). `||phi_K - phi*||` is reported for every `K`. Only tasks
  whose inner problem was solved to a gradient norm below 1e-6 are compared.

Each approximation is computed in float32 (what users run) and in float64, both against the
float64 reference, so that truncation and rounding errors can be told apart. Writes
`gradient_accuracy.md` (tables), `gradient_accuracy.json` (every number) and
`gradient_accuracy.png` into `--output_dir`.

Usage:
  python scripts/studies/gradient_accuracy.py --output_dir=docs/studies/gradient_accuracy
  python scripts/studies/gradient_accuracy.py --tiny --output_dir=/tmp/gradient_accuracy
"""

from __future__ import annotations

import dataclasses
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
from tf_imaml import batched
from tf_imaml import hvp as hvp_lib
from tf_imaml import implicit
from tf_imaml import inner_solvers
from tf_imaml import reference
from tf_imaml import testing
from tf_imaml import tree
from tf_imaml import unrolled

NAME = "gradient_accuracy"
WEIGHTS = ("pretrained", "random")
METHODS = ("imaml", "imaml_damped", "maml", "fomaml")
DTYPES = ("float32", "float64")
REFERENCE_SOLVERS = ("gd", "lbfgs")
REFERENCE_INITS = ("theta", "phi_K")


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = option("runs/study_gradient_accuracy", "Where to write results.")
    inner_steps: tuple[int, ...] = option(
        (1, 2, 5, 10, 16, 25, 50, 100), "Inner steps K.", tiny=(1, 5, 40)
    )
    cg_steps: tuple[int, ...] = option((1, 2, 5, 10, 20), "CG steps C.", tiny=(1, 3, 10))
    ridge_tasks: int = option(
        32, "Ridge regression tasks (closed-form target).", tiny=8, lower_bound=1
    )
    ridge_dim: int = option(20, "Ridge parameters d.", tiny=6, lower_bound=1)
    ridge_support: int = option(10, "Ridge support points per task.", tiny=4, lower_bound=1)
    ridge_query: int = option(20, "Ridge query points per task.", tiny=8, lower_bound=1)
    ridge_lam: float = option(1.0, "Proximal strength (ridge).")
    ridge_learning_rate: float = option(0.1, "Inner GD step (ridge).", tiny=0.1)
    weights: tuple[str, ...] = option(
        WEIGHTS,
        "Conv-net weights: pretrained and/or random (or none).",
        tiny=("random",),
        choices=WEIGHTS,
    )
    conv_tasks: int = option(32, "Omniglot tasks.", tiny=2, lower_bound=1)
    lam: float = option(2.0, "Proximal strength on the conv net.")
    inner_learning_rate: float = option(0.1, "Inner GD step on the conv net.")
    queries: int = option(15, "Query examples per class (conv net).", tiny=2, lower_bound=1)
    image_size: int = option(28, "Image side (conv net).", tiny=14)
    filters: int = option(64, "Conv filters.", tiny=4, lower_bound=1)
    activation: str = option(
        "relu", "Activation of the random-init conv net (Keras name); the shipped one is ReLU."
    )
    reference_solver: str = option(
        "gd",
        "Inner solver of the float64 reference: gradient descent or L-BFGS.",
        choices=REFERENCE_SOLVERS,
    )
    reference_init: str = option(
        "theta",
        "Start of the L-BFGS reference: theta, or phi_K (GD's iterate at the largest K).",
        choices=REFERENCE_INITS,
    )
    damping: float = option(1.0, "Damped iMAML's extra identity term (the authors' 1).")
    lam_damping: float = option(10.0, "Damped iMAML's addition to lam (the authors' 10).")
    reference_inner_steps: int = option(
        2000, "GD steps (or L-BFGS iterations at most) of the reference.", tiny=300, lower_bound=1
    )
    reference_cg_steps: int = option(300, "CG steps of the reference.", tiny=100, lower_bound=1)
    maml_task_chunk: int = option(
        2, "Conv-net tasks unrolled together by MAML (its memory grows with K).", lower_bound=1
    )
    seed: int = option(0, "Seed of tasks and random weights.")

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad value."""
        for name in ("inner_steps", "cg_steps"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or min(values) < 1:
                raise ValueError(f"--{name} must be increasing positive ints, got {values}")
        for name in ("ridge_lam", "ridge_learning_rate", "lam", "inner_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("damping", "lam_damping"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.reference_init == "phi_K" and self.reference_solver != "lbfgs":
            raise ValueError("--reference_init=phi_K needs --reference_solver=lbfgs")
        if "pretrained" in self.weights and (self.image_size, self.filters) != (28, 64):
            raise ValueError("--weights=pretrained needs --image_size=28 and --filters=64")
        if self.reference_solver not in REFERENCE_SOLVERS:
            raise ValueError(
                f"--reference_solver must be one of {REFERENCE_SOLVERS}, "
                f"got {self.reference_solver!r}"
            )
        if self.reference_solver == "gd" and self.reference_inner_steps < max(self.inner_steps):
            raise ValueError("--reference_inner_steps must be >= the largest --inner_steps")
        try:
            keras.activations.get(self.activation)
        except ValueError:
            raise ValueError(
                f"--activation must be a Keras activation name, got {self.activation!r}"
            ) from None


TINY = harness.tiny_values(Config)


# --------------------------------------------------------------------------- problems


LossFn = object  # (params, x, y) -> per-task losses [T].


@dataclasses.dataclass(frozen=True)
class Problem:
    """A task-batched meta-learning problem in one dtype; data passed to compiled functions."""

    loss_fn: LossFn  # (task-batched params, x, y) -> per-task mean loss [T].
    support: tuple  # (x, y), leading task axis.
    query: tuple  # (x, y), leading task axis.
    meta_params: list  # theta, task-batched [T, ...].

    @property
    def num_tasks(self) -> int:
        return int(self.meta_params[0].shape[0])

    def tasks(self, start: int, stop: int) -> Problem:
        """The same problem restricted to tasks `start:stop`."""
        cut = lambda xs: [x[start:stop] for x in xs]  # noqa: E731
        return Problem(self.loss_fn, cut(self.support), cut(self.query), cut(self.meta_params))


def ridge_tasks(config: Config) -> testing.RegressionTasks:
    """The study's seeded ridge tasks (float64)."""
    return testing.linear_tasks(
        num_tasks=config.ridge_tasks,
        num_support=config.ridge_support,
        num_query=config.ridge_query,
        dim=config.ridge_dim,
        seed=config.seed,
    )


def ridge_problems(config: Config) -> tuple[dict, np.ndarray]:
    """The ridge tasks in float32 and float64, and the closed-form target `[T, d]`."""
    tasks = ridge_tasks(config)
    rng = np.random.default_rng([config.seed, 1])
    theta = rng.normal(size=(config.ridge_tasks, config.ridge_dim))
    largest = np.linalg.eigvalsh(testing.ridge_hessian(tasks.support_x)).max()
    if config.ridge_learning_rate * (config.ridge_lam + largest) >= 2.0:
        raise ValueError(
            f"--ridge_learning_rate={config.ridge_learning_rate} diverges: gradient descent "
            f"needs learning_rate * (lam + {largest:.3g}) < 2"
        )
    target = testing.ridge_meta_gradient(tasks, theta, config.ridge_lam)

    def loss_fn(params, x, y):
        return testing.ridge_loss_fn(x, y)(params)

    by_dtype = {
        dtype: Problem(
            loss_fn,
            (tf.cast(tasks.support_x, dtype), tf.cast(tasks.support_y, dtype)),
            (tf.cast(tasks.query_x, dtype), tf.cast(tasks.query_y, dtype)),
            [tf.constant(theta, dtype)],
        )
        for dtype in DTYPES
    }
    return by_dtype, target


def omniglot_tasks(config: Config) -> tuple:
    """`config.conv_tasks` seeded 5-way 1-shot tasks from Omniglot's test characters."""
    data = tf_imaml.datasets.load_omniglot("test", image_size=config.image_size)
    episodes = fewshot.episodes(
        data,
        ways=5,
        queries=config.queries,
        batch=config.conv_tasks,
        seed=config.seed,
        num_tasks=config.conv_tasks,
    )
    for (support_x, support_y, query_x), query_y in episodes:
        return support_x, support_y, query_x, query_y
    raise AssertionError("the episode dataset is empty")


def conv_model(config: Config, dtype: str, weights: str) -> keras.Model:
    """The Omniglot conv net with every layer computing in `dtype`.

    The dtype matters: `batched.apply` calls the weightless layers (activations, flatten)
    themselves, and a Keras layer casts its inputs to its own compute dtype, so a float32
    model would silently round float64 activations.
    """
    return fewshot.learner(
        ways=5,
        image_size=config.image_size,
        filters=config.filters,
        activation="relu" if weights == "pretrained" else config.activation,
        dtype=dtype,
    )


def conv_weights(config: Config, weights: str) -> list[np.ndarray]:
    """The conv net's trainable weights: the shipped model's, or a seeded random init."""
    if weights == "pretrained":
        return fewshot.pretrained_weights(harness.PRETRAINED)
    keras.utils.set_random_seed(config.seed)
    return [v.numpy() for v in conv_model(config, "float32", weights).trainable_variables]


def conv_problems(config: Config, tasks: tuple, weights: str) -> dict:
    """The conv-net problem in float32 and float64: same tasks, same weights."""
    support_x, support_y, query_x, query_y = tasks
    values = conv_weights(config, weights)
    by_dtype = {}
    for dtype in DTYPES:
        model = conv_model(config, dtype, weights)

        def loss_fn(params, x, y, model=model):
            logits = batched.apply(model, params, x)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            return tf.reduce_mean(losses, axis=1)

        by_dtype[dtype] = Problem(
            loss_fn,
            (tf.cast(support_x, dtype), support_y),
            (tf.cast(query_x, dtype), query_y),
            tree.broadcast_to_tasks([tf.constant(w, dtype) for w in values], config.conv_tasks),
        )
    return by_dtype


# --------------------------------------------------------------------------- meta-gradients


class ImplicitResult(NamedTuple):
    """iMAML's meta-gradient after `C` CG steps, flattened, and how the solve went."""

    meta_grads: tf.Tensor  # [T, N].
    residual: tf.Tensor  # [T] true relative residual ||v - A g|| / ||v||.
    negative_curvature: tf.Tensor  # [T] bool: CG met p.Ap <= 0 (A not positive definite).


class Estimators:
    """The study's compiled computations for one loss and one `(lam, learning_rate)`.

    Data are arguments, so one trace serves every meta-batch of the same shape; the CG step
    count and tolerance are Python numbers (the solver's fields), one trace per value.
    """

    def __init__(self, loss_fn: LossFn, *, lam: float, learning_rate: float):
        self.loss_fn = loss_fn
        self.lam = lam
        self.learning_rate = learning_rate
        self.inner = tf.function(self._inner)
        self.query_grad = tf.function(self._query_grad)
        self.imaml = tf.function(self._imaml)
        self.maml = tf.function(self._maml)

    def _inner(self, meta_params, params, num_steps, support):
        """`num_steps` more GD steps on `G` from `params` (plain GD keeps no state)."""
        return inner_solvers.minimize_proximal(
            lambda p: self.loss_fn(p, *support),
            meta_params,
            lam=self.lam,
            num_steps=num_steps,
            optimizer=inner_solvers.gradient_descent(self.learning_rate),
            init_params=params,
        )

    def _query_grad(self, params, query):
        return hvp_lib.value_and_grad(lambda p: self.loss_fn(p, *query), params)[1]

    def _imaml(self, params, query_grads, max_iter, tol, support, damping=0.0, lam_damping=0.0):
        """CG on `((1 + damping) I + H/(lam + lam_damping)) g = v` (iMAML's at zero damping)."""
        support_loss_fn = lambda p: self.loss_fn(p, *support)  # noqa: E731
        cg = tf_imaml.CG(
            steps=max_iter,
            tol=tol,
            damping=damping,
            lam_damping=lam_damping,
            hvp_mode="linearized",
            implementation="cg",  # linear_solve.solve_cg: per-task stopping
        )
        result = implicit.implicit_meta_gradient(
            support_loss_fn, params, query_grads, lam=self.lam, linear_solver=cg
        )
        # The true residual (CG's recursive one drifts from it in float32): one more matvec.
        matvec = cg.matvec_fn(support_loss_fn, params, lam=self.lam)
        residual = tree.norm(tree.sub(query_grads, matvec(result.meta_grads)))
        return ImplicitResult(
            tree.flatten_tasks(result.meta_grads),
            residual / tree.norm(query_grads),
            result.solve.negative_curvature,
        )

    def _maml(self, meta_params, num_steps, support, query):
        """Backpropagation through `num_steps` GD steps on `G` (theta in both of its roles)."""
        with tf.GradientTape() as tape:
            tape.watch(meta_params)
            objective_fn = inner_solvers.proximal_objective_fn(
                lambda p: self.loss_fn(p, *support), meta_params, self.lam
            )
            inner = unrolled.unrolled_gradient_descent(
                objective_fn, meta_params, num_steps=num_steps, learning_rate=self.learning_rate
            )
            total = tf.reduce_sum(self.loss_fn(inner.adapted_params, *query))
        return tree.flatten_tasks(tape.gradient(total, meta_params))

    def maml_by_chunks(self, problem: Problem, num_steps: int, chunk: int) -> np.ndarray:
        """MAML's meta-gradients `[T, N]`, `chunk` tasks at a time (its memory grows with K)."""
        out = []
        for start in range(0, problem.num_tasks, chunk):
            part = problem.tasks(start, start + chunk)
            out.append(
                self.maml(part.meta_params, tf.constant(num_steps), part.support, part.query)
            )
        return np.concatenate([o.numpy() for o in out], axis=0)


compare = harness.compare

APPROX_CG_TOL = 1e-10  # ImplicitMAML's default cg_tol: what users run.
REFERENCE_CG_TOL = 1e-14
REFERENCE_MAX_GRAD_NORM = 1e-6  # A reference task counts as solved below these.
REFERENCE_MAX_RESIDUAL = 1e-8


def reference_gradient(problem: Problem, est: Estimators, config: Config) -> dict:
    """The float64 reference: the inner problem solved (GD or L-BFGS), then CG to a tiny residual.

    GD runs in segments; at every checkpoint (each `K` of the study, and with the `"gd"`
    solver the reference's own step count) the proximal gradient norm and a full CG solve are
    recorded, so the report shows how the inner problem converges (or does not). With the
    `"lbfgs"` solver the reference point is L-BFGS's, from theta or (`reference_init="phi_K"`)
    from GD's last checkpoint, recorded as the last row. Once the reference point `phi*` is
    known, GD is run again from theta to record `||phi_k - phi*||` at every checkpoint.

    Returns per-task arrays for the end point: `target` `[T, N]`, the remaining proximal
    gradient norm `inner_grad_norm`, the CG `residual` (true, recomputed),
    `negative_curvature`, and `ok`: the tasks whose reference is trusted (finite, positive
    definite, gradient norm and residual below `REFERENCE_MAX_GRAD_NORM` and
    `REFERENCE_MAX_RESIDUAL`); `theta_distance`, `||theta - phi*||`; `damped_bias`, the
    damped system's solution at `phi*` (`config.damping`, `config.lam_damping`, the
    reference's CG) against `target` (`cosine`, `relative_error`, its true `residual`);
    and `trajectory`, the same diagnostics at every checkpoint, with
    `distance_to_reference` `||phi_k - phi*||`.
    """
    theta = problem.meta_params
    gd_end = (
        config.reference_inner_steps if config.reference_solver == "gd" else max(config.inner_steps)
    )
    checkpoints = sorted({k for k in config.inner_steps if k < gd_end} | {gd_end})
    trajectory = []

    def record(label, phi, grad_norm):
        v = est.query_grad(phi, problem.query)
        solve = est.imaml(
            phi,
            v,
            config.reference_cg_steps,
            REFERENCE_CG_TOL,
            problem.support,
        )
        trajectory.append(
            {
                "inner_steps": label,
                "inner_grad_norm": np.asarray(grad_norm),
                "residual": solve.residual.numpy(),
                "negative_curvature": solve.negative_curvature.numpy(),
            }
        )
        return solve

    phi, done = theta, 0
    for k in checkpoints:
        inner = est.inner(theta, phi, tf.constant(k - done), problem.support)
        phi, done = inner.adapted_params, k
        solve = record(k, phi, inner.grad_norm.numpy())
    if config.reference_solver == "lbfgs":
        lbfgs = reference.lbfgs_proximal_minimum(
            lambda p: problem.loss_fn(p, *problem.support),
            theta,
            lam=est.lam,
            max_iterations=config.reference_inner_steps,
            init_params=phi if config.reference_init == "phi_K" else None,
        )
        phi = lbfgs.adapted_params
        solve = record(f"L-BFGS {int(lbfgs.num_iterations)}", phi, lbfgs.grad_norm.numpy())
    target = solve.meta_grads.numpy()
    phi_star = tree.flatten_tasks(phi).numpy()
    # Second pass: GD from theta again, each checkpoint's distance to phi*.
    phi_k, done = theta, 0
    for row, k in zip(trajectory, checkpoints, strict=False):
        phi_k = est.inner(theta, phi_k, tf.constant(k - done), problem.support).adapted_params
        done = k
        row["distance_to_reference"] = _distance(phi_k, phi_star)
    if config.reference_solver == "lbfgs":
        trajectory[-1]["distance_to_reference"] = np.zeros(problem.num_tasks)
    damped = est.imaml(
        phi,
        est.query_grad(phi, problem.query),
        config.reference_cg_steps,
        REFERENCE_CG_TOL,
        problem.support,
        config.damping,
        config.lam_damping,
    )
    damped_bias = compare(damped.meta_grads, target, ("cosine", "relative_error")) | {
        "residual": damped.residual.numpy()
    }
    end = trajectory[-1]
    ok = (
        ~end["negative_curvature"]
        & (end["residual"] < REFERENCE_MAX_RESIDUAL)
        & (end["inner_grad_norm"] < REFERENCE_MAX_GRAD_NORM)
        & np.isfinite(target).all(axis=1)
    )
    return {"target": target, **{k: v for k, v in end.items() if k != "inner_steps"}} | {
        "ok": ok,
        "theta_distance": _distance(theta, phi_star),
        "damped_bias": damped_bias,
        "trajectory": trajectory,
    }


def _distance(params, flat: np.ndarray) -> np.ndarray:
    """Per-task `||params - flat||`, `flat` the `[T, N]` flattened point."""
    return np.linalg.norm(tree.flatten_tasks(params).numpy() - flat, axis=1)


def trajectory_table(trajectory: list) -> str:
    """Markdown: the reference's inner convergence and curvature at every checkpoint."""
    return reporting.markdown_table(
        [
            "inner steps (GD, or L-BFGS iterations)",
            "‖∇G‖ mean",
            "‖∇G‖ max",
            "‖φ − φ*‖ mean",
            "‖φ − φ*‖ max",
            "tasks with non-positive curvature",
            "CG true residual (median)",
        ],
        [
            [
                row["inner_steps"],
                float(np.mean(row["inner_grad_norm"])),
                float(np.max(row["inner_grad_norm"])),
                float(np.mean(row["distance_to_reference"])),
                float(np.max(row["distance_to_reference"])),
                f"{int(np.sum(row['negative_curvature']))} of {len(row['negative_curvature'])}",
                float(np.median(row["residual"])),
            ]
            for row in trajectory
        ],
    )


def sweep(
    by_dtype: dict,
    target: np.ndarray,
    est: dict,
    *,
    config: Config,
    maml_chunk: int,
    label: str,
) -> dict:
    """Every approximation at every `K` (and `C`), in both dtypes, against `target`.

    Returns `{dtype: {"inner_grad_norm": [nK][T], "imaml": [nK][nC]{...},
    "imaml_damped": [nK]{...}, "maml": [nK]{...}, "fomaml": [nK]{...}}, "precision":
    {method: [nK]{...}}}` where `{...}` holds per-task `cosine` and `relative_error` (iMAML
    and damped iMAML also their CG `residual` and `negative_curvature`), and `precision`
    compares float32 with float64 at the same `K` (and `C = max`): the rounding error
    alone. Damped iMAML solves `config.damping`, `config.lam_damping`'s system with
    `C = max`.
    """
    out = {d: {"inner_grad_norm": [], **{m: [] for m in METHODS}} for d in DTYPES}
    out["precision"] = {m: [] for m in METHODS}
    phi = {d: by_dtype[d].meta_params for d in DTYPES}
    done = 0
    for k in config.inner_steps:
        start = time.time()
        grads = {}
        for d in DTYPES:
            problem, e = by_dtype[d], est[d]
            inner = e.inner(problem.meta_params, phi[d], tf.constant(k - done), problem.support)
            phi[d] = inner.adapted_params
            out[d]["inner_grad_norm"].append(inner.grad_norm.numpy())
            v = e.query_grad(phi[d], problem.query)
            row = []
            for c in config.cg_steps:
                r = e.imaml(
                    phi[d],
                    v,
                    c,
                    APPROX_CG_TOL,
                    problem.support,
                )
                row.append(
                    compare(r.meta_grads, target)
                    | {
                        "residual": r.residual.numpy(),
                        "negative_curvature": r.negative_curvature.numpy(),
                    }
                )
            out[d]["imaml"].append(row)
            damped = e.imaml(
                phi[d],
                v,
                config.cg_steps[-1],
                APPROX_CG_TOL,
                problem.support,
                config.damping,
                config.lam_damping,
            )
            out[d]["imaml_damped"].append(
                compare(damped.meta_grads, target)
                | {
                    "residual": damped.residual.numpy(),
                    "negative_curvature": damped.negative_curvature.numpy(),
                }
            )
            grads[d] = {
                "imaml": r.meta_grads.numpy(),
                "imaml_damped": damped.meta_grads.numpy(),
                "fomaml": tree.flatten_tasks(v).numpy(),
                "maml": e.maml_by_chunks(problem, k, maml_chunk),
            }
            for method in ("maml", "fomaml"):
                out[d][method].append(compare(grads[d][method], target))
        for method in METHODS:
            out["precision"][method].append(
                compare(grads["float32"][method], grads["float64"][method])
            )
        done = k
        print(
            f"[{label}] K={k}: rel. error float32/float64  iMAML(C={config.cg_steps[-1]}) "
            f"{harness.mean(out['float32']['imaml'][-1][-1]['relative_error']):.2e}/"
            f"{harness.mean(out['float64']['imaml'][-1][-1]['relative_error']):.2e}  damped "
            f"{harness.mean(out['float64']['imaml_damped'][-1]['relative_error']):.2e}  MAML "
            f"{harness.mean(out['float32']['maml'][-1]['relative_error']):.2e}/"
            f"{harness.mean(out['float64']['maml'][-1]['relative_error']):.2e}  FOMAML "
            f"{harness.mean(out['float32']['fomaml'][-1]['relative_error']):.2e}  "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- reporting


def tables(name: str, setting: str, result: dict, config: Config, ok=None) -> str:
    """Markdown: errors against the exact target vs K, the iMAML K x C grid, precision."""
    ks, cs = config.inner_steps, config.cg_steps
    c_max = cs[-1]
    m = lambda x: harness.mean(x, ok)  # noqa: E731
    f32, f64 = result["float32"], result["float64"]
    lines = [f"### {name}", "", setting, ""]
    for metric, title in (
        ("relative_error", "Relative error ‖g − g*‖/‖g*‖"),
        ("one_minus_cosine", "1 − cosine similarity"),
    ):
        lines += [
            f"{title} against the exact meta-gradient (mean over tasks), by inner steps K "
            f"(iMAML and damped iMAML with C = {c_max} CG steps; damped: "
            f"`{1 + config.damping:g}I + H/(lam + {config.lam_damping:g})`):",
            "",
            reporting.markdown_table(
                [
                    "K",
                    "‖∇G(φ_K)‖ (f64)",
                    "iMAML f32",
                    "iMAML f64",
                    "damped f32",
                    "damped f64",
                    "MAML f32",
                    "MAML f64",
                    "FOMAML f32",
                    "FOMAML f64",
                ],
                [
                    [
                        k,
                        m(f64["inner_grad_norm"][i]),
                        m(f32["imaml"][i][-1][metric]),
                        m(f64["imaml"][i][-1][metric]),
                        m(f32["imaml_damped"][i][metric]),
                        m(f64["imaml_damped"][i][metric]),
                        m(f32["maml"][i][metric]),
                        m(f64["maml"][i][metric]),
                        m(f32["fomaml"][i][metric]),
                        m(f64["fomaml"][i][metric]),
                    ]
                    for i, k in enumerate(ks)
                ],
            ),
            "",
        ]
    for d, res in (("float32", f32), ("float64", f64)):
        lines += [
            f"iMAML relative error in {d}, K inner steps (rows) x C CG steps (columns); in "
            "brackets the true relative CG residual ‖v − A g‖/‖v‖, and * where CG met "
            "non-positive curvature on some task:",
            "",
            reporting.markdown_table(
                ["K"] + [f"C={c}" for c in cs],
                [
                    [k]
                    + [
                        f"{reporting.format_cell(m(res['imaml'][i][j]['relative_error']))} "
                        f"({reporting.format_cell(m(res['imaml'][i][j]['residual']))})"
                        + ("*" if np.any(res["imaml"][i][j]["negative_curvature"]) else "")
                        for j in range(len(cs))
                    ]
                    for i, k in enumerate(ks)
                ],
            ),
            "",
        ]
    prec = result["precision"]
    lines += [
        "Rounding error alone: relative difference of the float32 and the float64 "
        f"meta-gradient with the same K (iMAML: C = {c_max}):",
        "",
        reporting.markdown_table(
            ["K", "iMAML", "damped iMAML", "MAML", "FOMAML"],
            [
                [k] + [m(prec[method][i]["relative_error"]) for method in METHODS]
                for i, k in enumerate(ks)
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def plot(panels: list, config: Config):
    """Relative error vs K and vs C (at the largest K), one row per problem."""
    plt = reporting.pyplot()
    ks, cs = np.array(config.inner_steps), np.array(config.cg_steps)
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.2 * len(panels)), squeeze=False)
    colors = {
        "imaml": "tab:blue",
        "imaml_damped": "tab:red",
        "maml": "tab:orange",
        "fomaml": "tab:green",
    }
    for row, (title, result, ok) in enumerate(panels):
        ax_k, ax_c = axes[row]
        for d, style in (("float32", "-"), ("float64", "--")):
            res = result[d]
            curves = {
                f"iMAML C={cs[-1]}": (
                    "imaml",
                    [harness.mean(r[-1]["relative_error"], ok) for r in res["imaml"]],
                ),
                "damped iMAML": (
                    "imaml_damped",
                    [harness.mean(r["relative_error"], ok) for r in res["imaml_damped"]],
                ),
                "MAML": ("maml", [harness.mean(r["relative_error"], ok) for r in res["maml"]]),
                "FOMAML": (
                    "fomaml",
                    [harness.mean(r["relative_error"], ok) for r in res["fomaml"]],
                ),
            }
            for name, (method, ys) in curves.items():
                ax_k.plot(
                    ks, ys, style, color=colors[method], marker="o", ms=3, label=f"{name} {d}"
                )
            if len(cs) > 1:
                small = [harness.mean(r[0]["relative_error"], ok) for r in res["imaml"]]
                ax_k.plot(
                    ks,
                    small,
                    style,
                    color="tab:purple",
                    marker=".",
                    ms=3,
                    label=f"iMAML C={cs[0]} {d}",
                )
            ax_c.plot(
                cs,
                [harness.mean(r["relative_error"], ok) for r in res["imaml"][-1]],
                style,
                color=colors["imaml"],
                marker="o",
                ms=3,
                label=f"iMAML K={ks[-1]} {d}",
            )
        for ax, xlabel in ((ax_k, "inner steps K"), (ax_c, "CG steps C")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("relative error")
            ax.grid(True, which="major", alpha=0.3)
        ax_k.set_title(f"{title}: vs K", fontsize=9)
        ax_c.set_title(f"{title}: vs C at K={ks[-1]}", fontsize=9)
        ax_k.legend(fontsize=6, ncol=2)
        ax_c.legend(fontsize=6)
    return fig


# --------------------------------------------------------------------------- the study


def run(config: Config) -> dict:
    """Runs the study, writes the Markdown, JSON and PNG; returns the JSON's content."""
    out_dir = harness.output_folder(config, deterministic=False)
    start = time.time()
    results = {"config": dataclasses.asdict(config), "problems": {}}
    sections, panels = [], []

    by_dtype, target = ridge_problems(config)
    est = {
        d: Estimators(
            by_dtype[d].loss_fn, lam=config.ridge_lam, learning_rate=config.ridge_learning_rate
        )
        for d in DTYPES
    }
    ridge = sweep(
        by_dtype,
        target,
        est,
        config=config,
        maml_chunk=config.ridge_tasks,
        label="ridge",
    )
    results["problems"]["ridge"] = {"result": ridge}
    setting = (
        f"{config.ridge_tasks} ridge-regression tasks, d = {config.ridge_dim}, "
        f"{config.ridge_support} support / {config.ridge_query} query points, "
        f"lam = {config.ridge_lam}, inner GD step {config.ridge_learning_rate}; exact target: "
        "the closed form `lam (H + lam I)^-1 grad L_query(phi*)` "
        "(`tf_imaml.testing.ridge_meta_gradient`)."
    )
    sections.append(tables("Ridge regression (closed form)", setting, ridge, config))
    panels.append(("ridge", ridge, None))

    if config.weights:
        tasks = omniglot_tasks(config)
    for weights in config.weights:
        by_dtype = conv_problems(config, tasks, weights)
        est = {
            d: Estimators(
                by_dtype[d].loss_fn, lam=config.lam, learning_rate=config.inner_learning_rate
            )
            for d in DTYPES
        }
        t0 = time.time()
        ref = reference_gradient(by_dtype["float64"], est["float64"], config)
        print(
            f"[conv {weights}] reference ({time.time() - t0:.0f} s): proximal gradient norm "
            f"{_fmt_list(ref['inner_grad_norm'])}; CG residual {_fmt_list(ref['residual'])}; "
            f"non-positive curvature on {int(ref['negative_curvature'].sum())} of "
            f"{len(ref['ok'])} tasks; trusted: {int(ref['ok'].sum())}",
            flush=True,
        )
        activation = "relu" if weights == "pretrained" else config.activation
        lbfgs_start = (
            f"GD's phi_K (K = {max(config.inner_steps)})"
            if config.reference_init == "phi_K"
            else "theta"
        )
        reference_inner = (
            f"{config.reference_inner_steps} GD steps"
            if config.reference_solver == "gd"
            else f"L-BFGS from {lbfgs_start} ({ref['trajectory'][-1]['inner_steps'].split()[1]} "
            f"iterations, at most {config.reference_inner_steps})"
        )
        if ref["ok"].any():
            bias = {k: harness.mean(v, ref["ok"]) for k, v in ref["damped_bias"].items()}
            bias_text = (
                "(its bias alone, mean over trusted tasks): relative error "
                f"{reporting.format_cell(bias['relative_error'])}, cosine "
                f"{reporting.format_cell(bias['cosine'])} (CG residual "
                f"{reporting.format_cell(float(np.max(ref['damped_bias']['residual'])))} at most)."
            )
        else:  # The exact implicit gradient it would be compared with does not exist.
            bias_text = "(its bias alone): not measured, no task's reference is trusted."
        setting = (
            f"Omniglot conv net ({ref['target'].shape[1]:,} weights, {config.image_size}x"
            f"{config.image_size}, {config.filters} filters, {activation}), {weights} weights, "
            f"{config.conv_tasks} 5-way 1-shot test tasks ({config.queries} queries per class), "
            f"lam = {config.lam}, inner GD step {config.inner_learning_rate}. Reference in "
            f"float64: {reference_inner} (remaining proximal gradient "
            f"norm ‖∇G‖ per task: {_fmt_list(ref['inner_grad_norm'])}), then CG (at most "
            f"{config.reference_cg_steps} steps; true relative residual per task: "
            f"{_fmt_list(ref['residual'])}). `I + H/lam` showed non-positive curvature at the "
            f"reference point on {int(ref['negative_curvature'].sum())} of "
            f"{config.conv_tasks} tasks. A task's reference is trusted when ‖∇G‖ < "
            f"{REFERENCE_MAX_GRAD_NORM:g}, CG saw only positive curvature and its residual is "
            f"< {REFERENCE_MAX_RESIDUAL:g}: {int(ref['ok'].sum())} of {config.conv_tasks} tasks. "
            f"‖θ − φ*‖ per task: {_fmt_list(ref['theta_distance'])}. Damped iMAML's system "
            f"`{1 + config.damping:g}I + H/(lam + {config.lam_damping:g})` solved at φ* by the "
            f"reference's CG {bias_text}"
        )
        entry = {"reference": {k: v for k, v in ref.items() if k != "target"}}
        results["problems"][f"conv_{weights}"] = entry
        convergence = (
            "The float64 reference's inner loop (GD on `G` from theta"
            + (
                f"; the last row L-BFGS from {lbfgs_start}"
                if config.reference_solver == "lbfgs"
                else ""
            )
            + "; CG on `I + H/lam` "
            f"with the query gradient, at most {config.reference_cg_steps} steps) at each "
            "checkpoint; ‖φ − φ*‖ is the distance to the reference point:\n\n"
            + trajectory_table(ref["trajectory"])
            + "\n"
        )
        if not ref["ok"].any():
            sections.append(
                f"### Omniglot conv net, {weights} weights\n\n{setting}\n\n{convergence}\n"
                "No task has an exact target: the comparison with the approximations is "
                "skipped for this setting.\n"
            )
            continue
        result = sweep(
            by_dtype,
            ref["target"],
            est,
            config=config,
            maml_chunk=config.maml_task_chunk,
            label=f"conv {weights}",
        )
        if not ref["ok"].all():
            setting += " Means are over the trusted tasks only."
        sections.append(
            tables(f"Omniglot conv net, {weights} weights", setting, result, config, ref["ok"])
            + "\n"
            + convergence
        )
        panels.append((f"conv net, {weights} weights", result, ref["ok"]))
        entry["result"] = result

    results["wall_seconds"] = round(time.time() - start, 1)
    header = (
        f"## Accuracy of the implicit meta-gradient\n\n"
        f"Produced by `scripts/studies/gradient_accuracy.py` in {results['wall_seconds']:.0f} s. "
        "Approximations after K inner GD steps on the proximal objective from theta: iMAML "
        "(C conjugate-gradient steps on `(I + H/lam) g = grad L_query(phi_K)`, CG tolerance "
        f"{APPROX_CG_TOL:g}), MAML (backpropagation through the K steps on the same proximal "
        "objective), FOMAML (`grad L_query(phi_K)`), damped iMAML (the authors' system "
        f"`{1 + config.damping:g}I + H/(lam + {config.lam_damping:g})`, same C as iMAML: "
        "damping buys definiteness at the price of a different gradient, so its error "
        "includes that bias). f32/f64: the approximation computed in "
        "float32 or float64, both against the same float64 (or closed-form) target.\n"
    )
    reporting.write(
        out_dir,
        NAME,
        markdown=header + "\n" + "\n".join(sections),
        data=harness.tolist(results),
        figures={f"{NAME}.png": plot(panels, config)},
        dpi=90,
    )
    print(f"wrote {out_dir}/{NAME}.md, .json, .png in {results['wall_seconds']:.0f} s")
    return results


def _fmt_list(values) -> str:
    return ", ".join(reporting.format_cell(float(v)) for v in np.asarray(values))


if __name__ == "__main__":
    harness.main(Config, run, tiny=TINY)
