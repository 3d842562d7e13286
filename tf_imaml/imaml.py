"""`ImplicitMAML`: iMAML as a Keras model (Rajeswaran et al. 2019, Algorithm 2).

For each task: run the inner solver on `L_support(phi) + lam/2 ||phi - theta||^2` from
`phi = theta`; predict the query set at `phi`; take `v = grad L_query(phi)`; solve
`(I + H/lam) g = v` by conjugate gradient over Hessian-vector products. `train_step`
averages `g` over tasks and applies it with the compiled optimizer.

The authors' code (`imaml_dev`) differs in three ways, each an option here: it solves the
damped system `(1 + damping) I + H/(lam + lam_damping)` (`damping=1, lam_damping=10`),
its inner loop takes plain steps on the support loss and one proximal pull-back step
(`inner_loop="pull_back"`), and it adapts at test time with `lam = 0` (`test_lam=0.0`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_imaml import checks
from tf_imaml import curvature
from tf_imaml import hessian_free
from tf_imaml import hvp as hvp_lib
from tf_imaml import implicit
from tf_imaml import inner_solvers
from tf_imaml import linear_solve
from tf_imaml import meta_model

INNER_OPTIMIZERS = ("gd", "momentum", "nesterov", "adam", "hessian_free")
INNER_LOOPS = ("proximal", "pull_back")


@keras.saving.register_keras_serializable(package="tf_imaml")
class ImplicitMAML(meta_model.MetaLearner):
    """iMAML: meta-learning with implicit gradients, as a `keras.Model`.

    ```python
    meta = tf_imaml.ImplicitMAML(learner, lam=2.0, inner_steps=16,
                                 inner_learning_rate=0.1, cg_steps=5)
    meta.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["sparse_categorical_accuracy"])
    meta.fit(episodes, ...)
    ```

    Batch normalization: the learner's `BatchStatNormalization` layers normalize each task's
    support and query sets by their own statistics (the paper's setting). Keras
    `BatchNormalization` is refused (its second derivatives are wrong on TensorFlow).

    Args:
      learner: A built Keras model; its trainable weights are `theta`.
      lam: Proximal strength `lambda > 0`. Default value: `2.0`.
      inner_steps: Inner solver steps. Default value: `16`.
      inner_learning_rate: Inner step size. Default value: `0.1`.
      cg_steps: Conjugate-gradient iterations at most. Default value: `5`.
      inner_optimizer: `"gd"` (iMAML-GD), `"momentum"`, `"nesterov"`, `"adam"`, or
        `"hessian_free"` (iMAML-HF: `inner_steps` truncated-Newton steps, each direction
        from `inner_cg_steps` CG iterations, step length by line search; it does not use
        `inner_learning_rate`). Default value: `"gd"`.
      inner_cg_steps: CG iterations per Newton direction of `"hessian_free"`.
        Default value: `5`.
      use_line_search: Line search for `"hessian_free"` (otherwise full Newton steps).
        Default value: `True`.
      inner_momentum: `beta` of momentum/Nesterov, `beta_1` of Adam. Default value: `0.9`.
      linear_solver: `"cg_tf"` (`tf.linalg`'s CG) or `"cg"` (ours, per-task stopping).
        Default value: `"cg_tf"`.
      damping: Extra identity term of the linear system: the system solved is
        `((1 + damping) I + H / (lam + lam_damping)) g = v`. Default value: `0.0`.
      lam_damping: Added to `lam` in the linear system only (the inner loop keeps `lam`).
        The authors' code uses `damping=1.0, lam_damping=10.0`: at `lam = 2` it solves
        `(2 I + H/12) g = v`, positive definite unless `H` has an eigenvalue below `-24`.
        This is a different gradient from the paper's `(I + H/lam)^-1 v`: a damped one,
        between the implicit and a scaled first-order gradient. Default value: `0.0`.
      inner_loop: `"proximal"`: `inner_steps` steps of the inner optimizer on
        `L_support + lam/2 ||phi - theta||^2` (the paper). `"pull_back"`: `inner_steps`
        steps on `L_support` alone, then one step of size `inner_learning_rate` on the
        proximal term, `phi <- phi - inner_learning_rate * lam * (phi - theta)` (the
        authors' code; `inner_solvers.minimize_then_pull_back`). Not with
        `"hessian_free"`. Default value: `"proximal"`.
      test_lam: The `lam` of the adaptation outside training (`evaluate`, `predict`,
        `adapt`); `0.0` adapts by plain steps on the support loss, as the authors' test
        command does. Default value: `None` (the same `lam` as in training).
      cg_tol: Relative residual at which CG stops early. Default value: `1e-10`.
      max_residual: A final relative residual above this marks the task failed.
        Default value: `1.0`.
      hvp_mode: `"linearized"` (the support gradient at `phi` recorded once, each CG
        iteration only differentiates it again), `"reverse_over_reverse"` or
        `"forward_over_reverse"`; see `tf_imaml.hvp`. Default value: `"linearized"`.
      curvature_iterations: When `> 0`, `train_step` also estimates, per task, the smallest
        eigenvalue of `I + H/lam` at `phi` by this many Lanczos iterations
        (`tf_imaml.curvature.proximal_curvature`) of the system actually solved,
        `(1 + damping) I + H/(lam + lam_damping)`, and logs `min_curvature` (its mean
        over tasks) and `indefinite_fraction` (the fraction of tasks where it is negative:
        certainly indefinite, since Lanczos estimates the smallest eigenvalue from above). Each iteration costs about one Hessian-vector
        product. Default value: `0` (off).
      on_failure: See `MetaLearner`. Default value: `"drop"`.
      task_batching: See `MetaLearner`. Default value: `"auto"`.
      name: Model name. Default value: `None`.

    Raises:
      ValueError: For any argument out of range, or a learner with Keras BatchNormalization.
    """

    def __init__(
        self,
        learner: keras.Model,
        *,
        lam: float = 2.0,
        inner_steps: int = 16,
        inner_learning_rate: float = 0.1,
        cg_steps: int = 5,
        inner_optimizer: str = "gd",
        inner_momentum: float = 0.9,
        inner_cg_steps: int = 5,
        use_line_search: bool = True,
        linear_solver: str = "cg_tf",
        damping: float = 0.0,
        lam_damping: float = 0.0,
        inner_loop: str = "proximal",
        test_lam: float | None = None,
        cg_tol: float = 1e-10,
        max_residual: float = 1.0,
        hvp_mode: str = "linearized",
        curvature_iterations: int = 0,
        on_failure: str = "drop",
        task_batching: str = "auto",
        name: str | None = None,
    ):
        super().__init__(
            learner,
            inner_steps=inner_steps,
            inner_learning_rate=inner_learning_rate,
            on_failure=on_failure,
            task_batching=task_batching,
            name=name,
        )
        checks.check_positive("lam", lam)
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 0:
            raise ValueError(f"cg_steps must be an int >= 0, got {cg_steps!r}")
        checks.check_choice("inner_optimizer", inner_optimizer, INNER_OPTIMIZERS)
        if isinstance(inner_cg_steps, bool) or not isinstance(inner_cg_steps, int):
            raise ValueError(f"inner_cg_steps must be an int >= 1, got {inner_cg_steps!r}")
        checks.check_positive("inner_cg_steps", inner_cg_steps)
        checks.check_choice("linear_solver", linear_solver, tuple(linear_solve.LINEAR_SOLVERS))
        checks.check_choice("hvp_mode", hvp_mode, hvp_lib.HVP_MODES)
        checks.check_non_negative("damping", damping)
        checks.check_non_negative("lam_damping", lam_damping)
        checks.check_choice("inner_loop", inner_loop, INNER_LOOPS)
        if inner_loop == "pull_back" and inner_optimizer == "hessian_free":
            raise ValueError('inner_loop="pull_back" takes a first-order inner_optimizer')
        if test_lam is not None:
            checks.check_non_negative("test_lam", test_lam)
        checks.check_non_negative("cg_tol", cg_tol)
        checks.check_positive("max_residual", max_residual)
        if (
            isinstance(curvature_iterations, bool)
            or not isinstance(curvature_iterations, int)
            or curvature_iterations < 0
        ):
            raise ValueError(
                f"curvature_iterations must be an int >= 0, got {curvature_iterations!r}"
            )
        self.lam = float(lam)
        self.cg_steps = cg_steps
        self.inner_optimizer = inner_optimizer
        self.inner_momentum = float(inner_momentum)
        self.inner_cg_steps = inner_cg_steps
        self.use_line_search = bool(use_line_search)
        self.linear_solver = linear_solver
        self.damping = float(damping)
        self.lam_damping = float(lam_damping)
        self.inner_loop = inner_loop
        self.test_lam = None if test_lam is None else float(test_lam)
        self.cg_tol = float(cg_tol)
        self.max_residual = float(max_residual)
        self.hvp_mode = hvp_mode
        self.curvature_iterations = curvature_iterations
        for metric_name in ("solver_residual", "solver_iterations"):
            self._trackers[metric_name] = keras.metrics.Mean(name=metric_name)
        if curvature_iterations:
            for metric_name in ("min_curvature", "indefinite_fraction"):
                self._trackers[metric_name] = keras.metrics.Mean(name=metric_name)
        self._inner = _make_inner_optimizer(inner_optimizer, inner_learning_rate, inner_momentum)

    @property
    def system_lam(self) -> float:
        """The `lam` of the linear system: `lam + lam_damping`."""
        return self.lam + self.lam_damping

    def _inner_solve(self, theta, support_loss_fn, *, training=True):
        lam = self.lam if training or self.test_lam is None else self.test_lam
        if self.inner_optimizer == "hessian_free" and lam > 0:
            return hessian_free.minimize_proximal_newton(
                support_loss_fn,
                theta,
                lam=lam,
                num_steps=self.inner_steps,
                cg_steps=self.inner_cg_steps,
                use_line_search=self.use_line_search,
                hvp_mode=self.hvp_mode,
            )
        if self.inner_loop == "pull_back":
            return inner_solvers.minimize_then_pull_back(
                support_loss_fn,
                theta,
                lam=lam,
                num_steps=self.inner_steps,
                optimizer=self._inner,
                pull_back_rate=self.inner_learning_rate,
            )
        optimizer = self._inner
        if optimizer is None:  # hessian_free at lam = 0: plain steps of the inner step size.
            optimizer = inner_solvers.gradient_descent(self.inner_learning_rate)
        return inner_solvers.minimize_proximal(
            support_loss_fn, theta, lam=lam, num_steps=self.inner_steps, optimizer=optimizer
        )

    def _meta_gradient(self, theta, support_loss_fn, query_loss_fn):
        inner = self._inner_solve(theta, support_loss_fn)
        phi = inner.adapted_params
        query_loss, query_pred, query_grads = meta_model.query_value_and_grad(query_loss_fn, phi)
        result = implicit.implicit_meta_gradient(
            support_loss_fn,
            phi,
            query_grads,
            lam=self.system_lam,
            damping=self.damping,
            linear_solver=linear_solve.LINEAR_SOLVERS[self.linear_solver],
            max_iter=self.cg_steps,
            tol=self.cg_tol,
            max_residual=self.max_residual,
            hvp_mode=self.hvp_mode,
        )
        solve = result.solve
        min_curvature = None
        if self.curvature_iterations:
            min_curvature = curvature.proximal_curvature(
                support_loss_fn,
                phi,
                lam=self.system_lam,
                damping=self.damping,
                num_iter=self.curvature_iterations,
                hvp_mode=self.hvp_mode,
            ).min_eigenvalue
        return meta_model.AdaptResult(
            meta_grads=result.meta_grads,
            fallback_grads=query_grads,
            query_loss=query_loss,
            query_pred=query_pred,
            inner=inner,
            solver_residual=solve.relative_residual,
            solver_iterations=tf.cast(solve.num_iterations, query_loss.dtype),
            failed=solve.failed,
            min_curvature=min_curvature,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            lam=self.lam,
            cg_steps=self.cg_steps,
            inner_optimizer=self.inner_optimizer,
            inner_momentum=self.inner_momentum,
            inner_cg_steps=self.inner_cg_steps,
            use_line_search=self.use_line_search,
            linear_solver=self.linear_solver,
            damping=self.damping,
            lam_damping=self.lam_damping,
            inner_loop=self.inner_loop,
            test_lam=self.test_lam,
            cg_tol=self.cg_tol,
            max_residual=self.max_residual,
            hvp_mode=self.hvp_mode,
            curvature_iterations=self.curvature_iterations,
        )
        return config


def _make_inner_optimizer(kind, learning_rate, momentum):
    if kind == "gd":
        return inner_solvers.gradient_descent(learning_rate)
    if kind == "hessian_free":
        return None  # minimize_proximal_newton has its own loop.
    if kind in ("momentum", "nesterov"):
        return inner_solvers.momentum(learning_rate, beta=momentum, nesterov=kind == "nesterov")
    return inner_solvers.adam(learning_rate, beta_1=momentum)
