"""`ImplicitMAML`: iMAML as a Keras model (Rajeswaran et al. 2019, Algorithm 2).

For each task: run the inner solver on `L_support(phi) + lam/2 ||phi - theta||^2` from
`phi = theta`; predict the query set at `phi`; take `v = grad L_query(phi)`; solve
`(I + H/lam) g = v` by conjugate gradient over Hessian-vector products. `train_step`
averages `g` over tasks and applies it with the compiled optimizer.

The authors' code (`imaml_dev`) differs in three ways, each an option here: it solves the
damped system `(1 + damping) I + H/(lam + lam_damping)`
(`linear_solver=CG(damping=1.0, lam_damping=10.0)`), its inner loop takes plain steps on the
support loss and one proximal pull-back step (`inner_solver=ProximalDescent(loop="pull_back")`),
and it adapts at test time with `lam = 0` (`test_lam=0.0`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_imaml import checks
from tf_imaml import curvature
from tf_imaml import implicit
from tf_imaml import meta_model
from tf_imaml import solvers


@keras.saving.register_keras_serializable(package="tf_imaml")
class ImplicitMAML(meta_model.MetaLearner):
    """iMAML: meta-learning with implicit gradients, as a `keras.Model`.

    ```python
    meta = tf_imaml.ImplicitMAML(learner, lam=2.0, inner_steps=16, inner_learning_rate=0.1,
                                 linear_solver=tf_imaml.CG(steps=5))
    meta.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["sparse_categorical_accuracy"])
    meta.fit(episodes, ...)
    ```

    The two solvers are configured objects (`tf_imaml.solvers`), whose defaults are the
    library's: `inner_solver` adapts each task, `linear_solver` solves the implicit system.
    The keyword shortcuts (`cg_steps=10`, `inner_optimizer="adam"`, ...) build the same
    objects from their names; they cannot be combined with a configured object.

    Batch normalization: the learner's `BatchStatNormalization` layers normalize each task's
    support and query sets by their own statistics (the paper's setting). Keras
    `BatchNormalization` is refused (its second derivatives are wrong on TensorFlow).

    Args:
      learner: A built Keras model; its trainable weights are `theta`.
      lam: Proximal strength `lambda > 0`. Default value: `2.0`.
      inner_steps: Inner solver steps. Default value: `16`.
      inner_learning_rate: Inner step size (`tf_imaml.HessianFree` uses it only at
        `lam = 0`). Default value: `0.1`.
      inner_solver: A `tf_imaml.ProximalDescent` or `tf_imaml.HessianFree`, or the name of
        one (`"gd"`, `"momentum"`, `"nesterov"`, `"adam"`, `"hessian_free"`).
        Default value: `None` (`ProximalDescent()`: iMAML-GD).
      linear_solver: A `tf_imaml.CG`, or `"cg"`/`"cg_tf"` (its `implementation`).
        Default value: `None` (`CG()`).
      test_lam: The `lam` of the adaptation outside training (`evaluate`, `predict`,
        `adapt`); `0.0` adapts by plain steps on the support loss, as the authors' test
        command does. Default value: `None` (the same `lam` as in training).
      curvature_iterations: When `> 0`, `train_step` also estimates, per task, the smallest
        eigenvalue of the system actually solved, `(1 + damping) I + H/(lam + lam_damping)`,
        at `phi`, by this many Lanczos iterations (`tf_imaml.curvature.proximal_curvature`,
        about one Hessian-vector product each), and logs `min_curvature` (its mean over
        tasks) and `indefinite_fraction` (the fraction of tasks where it is negative:
        certainly indefinite, since Lanczos estimates the smallest eigenvalue from above).
        Default value: `0` (off).
      on_failure: See `MetaLearner`. Default value: `"drop"`.
      task_batching: See `MetaLearner`. Default value: `"auto"`.
      name: Model name. Default value: `None`.
      inner_optimizer: Shortcut: the name `inner_solver` takes. Default value: `None`.
      inner_momentum, inner_loop: Shortcuts for `ProximalDescent`'s `momentum`, `loop`.
      inner_cg_steps, use_line_search: Shortcuts for `HessianFree`'s `cg_steps`,
        `use_line_search`.
      cg_steps, cg_tol, max_residual, damping, lam_damping: Shortcuts for `CG`'s `steps`,
        `tol`, `max_residual`, `damping`, `lam_damping`.
      hvp_mode: Shortcut for the `hvp_mode` of `CG` and of `HessianFree`.

    Raises:
      ValueError: For any argument out of range (naming it), a shortcut given with a
        configured solver or one that the solver does not have, or a learner with Keras
        BatchNormalization.
    """

    def __init__(
        self,
        learner: keras.Model,
        *,
        lam: float = 2.0,
        inner_steps: int = 16,
        inner_learning_rate: float = 0.1,
        inner_solver: solvers.InnerSolver | str | None = None,
        linear_solver: solvers.CG | str | None = None,
        test_lam: float | None = None,
        curvature_iterations: int = 0,
        on_failure: str = "drop",
        task_batching: str = "auto",
        name: str | None = None,
        inner_optimizer: str | None = None,
        inner_momentum: float | None = None,
        inner_loop: str | None = None,
        inner_cg_steps: int | None = None,
        use_line_search: bool | None = None,
        cg_steps: int | None = None,
        cg_tol: float | None = None,
        max_residual: float | None = None,
        damping: float | None = None,
        lam_damping: float | None = None,
        hvp_mode: str | None = None,
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
        if test_lam is not None:
            checks.check_non_negative("test_lam", test_lam)
        if inner_solver is not None and inner_optimizer is not None:
            raise ValueError("give inner_solver or its shortcut inner_optimizer, not both")
        configured_inner = not isinstance(inner_solver or inner_optimizer or "gd", str)
        inner_shortcuts = dict(
            inner_momentum=inner_momentum,
            inner_loop=inner_loop,
            inner_cg_steps=inner_cg_steps,
            use_line_search=use_line_search,
            hvp_mode=None if configured_inner else hvp_mode,
        )
        self.inner_solver = solvers.inner_solver_from(
            inner_solver or inner_optimizer or "gd", inner_shortcuts
        )
        cg_shortcuts = (cg_steps, cg_tol, max_residual, damping, lam_damping, hvp_mode)
        self.linear_solver = solvers.linear_solver_from(
            linear_solver or "cg", dict(zip(solvers.CG_SHORTCUTS, cg_shortcuts, strict=True))
        )
        if (
            isinstance(curvature_iterations, bool)
            or not isinstance(curvature_iterations, int)
            or curvature_iterations < 0
        ):
            raise ValueError(
                f"curvature_iterations must be an int >= 0, got {curvature_iterations!r}"
            )
        self.lam = float(lam)
        self.test_lam = None if test_lam is None else float(test_lam)
        self.curvature_iterations = curvature_iterations
        self._add_metrics("solver_residual", "solver_iterations")
        if curvature_iterations:
            self._add_metrics("min_curvature", "indefinite_fraction")

    def _task_metrics(self, out):
        # Failed solves of tf.linalg's CG leave NaN residuals; failed_fraction counts them.
        residual = tf.boolean_mask(out.solver_residual, tf.math.is_finite(out.solver_residual))
        metrics = {
            "solver_residual": (residual, None),
            "solver_iterations": (tf.reduce_mean(out.solver_iterations), None),
        }
        if self.curvature_iterations:
            num_tasks = tf.cast(tf.shape(out.min_curvature)[0], out.min_curvature.dtype)
            negative = tf.cast(out.min_curvature < 0, num_tasks.dtype)
            metrics["min_curvature"] = (tf.reduce_mean(out.min_curvature), num_tasks)
            metrics["indefinite_fraction"] = (tf.reduce_mean(negative), None)
        return metrics

    @property
    def system_lam(self) -> float:
        """The `lam` of the linear system: `lam + lam_damping`."""
        return self.linear_solver.system_lam(self.lam)

    def _inner_solve(self, theta, support_loss_fn, *, training=True):
        return self.inner_solver(
            support_loss_fn,
            theta,
            lam=self.lam if training or self.test_lam is None else self.test_lam,
            num_steps=self.inner_steps,
            learning_rate=self.inner_learning_rate,
        )

    def _meta_gradient(self, theta, support_loss_fn, query_loss_fn):
        inner = self._inner_solve(theta, support_loss_fn)
        phi = inner.adapted_params
        query_loss, query_pred, query_grads = meta_model.query_value_and_grad(query_loss_fn, phi)
        result = implicit.implicit_meta_gradient(
            support_loss_fn, phi, query_grads, lam=self.lam, linear_solver=self.linear_solver
        )
        min_curvature = None
        if self.curvature_iterations:
            min_curvature = curvature.proximal_curvature(
                support_loss_fn,
                phi,
                lam=self.system_lam,
                damping=self.linear_solver.damping,
                num_iter=self.curvature_iterations,
                hvp_mode=self.linear_solver.hvp_mode,
            ).min_eigenvalue
        return meta_model.AdaptResult(
            meta_grads=result.meta_grads,
            fallback_grads=query_grads,
            query_loss=query_loss,
            query_pred=query_pred,
            inner=inner,
            solver_residual=result.solve.relative_residual,
            solver_iterations=tf.cast(result.solve.num_iterations, query_loss.dtype),
            failed=result.solve.failed,
            min_curvature=min_curvature,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "lam": self.lam,
            "inner_solver": solvers.serialize(self.inner_solver),
            "linear_solver": solvers.serialize(self.linear_solver),
            "test_lam": self.test_lam,
            "curvature_iterations": self.curvature_iterations,
        }

    @classmethod
    def from_config(cls, config):
        """Reads `get_config`'s dict, and the keyword form that older versions wrote."""
        config = dict(config)
        for key in ("inner_solver", "linear_solver"):
            if isinstance(config.get(key), dict):
                config[key] = solvers.deserialize(config[key])
        if config.get("inner_optimizer") is not None:  # the keyword form: every shortcut set
            hessian_free = config["inner_optimizer"] == "hessian_free"
            unused = ("inner_momentum", "inner_loop") if hessian_free else ()
            unused += () if hessian_free else ("inner_cg_steps", "use_line_search")
            for key in unused:
                config.pop(key, None)
        return super().from_config(config)
