"""`MetaLearner`: the Keras glue shared by ImplicitMAML and the baselines.

A meta-learner wraps a built Keras `learner` whose weights are the meta-parameters `theta`.
Its data are episodes `((support_x, support_y, query_x), query_y)`, every tensor with a
leading task axis. For each task it adapts the learner to the support set, predicts the
query set with the adapted weights, and (in training) computes a per-task meta-gradient;
`train_step` averages those over tasks and hands them to the compiled optimizer. The
compiled `loss` is the outer loss on the query set and the inner loss on the support set.

Subclasses implement `_task_fn`, the per-task computation, over task-batched tensors; the
math lives in the functional core (`tf_imaml.implicit` and friends), not here.

Every core function takes the task axis, so `_task_fn` runs on a whole meta-batch at once
when the learner can be evaluated with per-task weights in one pass (`tf_imaml.batched`:
Sequential models of Dense, Conv2D, BatchStatNormalization, activations and pooling). Other
learners are evaluated one task at a time by `tf.map_fn`. Either way each task's
adaptation, Hessian-vector products and normalization statistics see that task alone, and
the paths give the same meta-gradients (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from tf_imaml import batched as batched_lib
from tf_imaml import checks
from tf_imaml import episode_checks
from tf_imaml import implicit
from tf_imaml import inner_solvers
from tf_imaml import keras_glue
from tf_imaml import layers as layers_lib
from tf_imaml import tasks as tasks_lib
from tf_imaml import tree

ON_FAILURE = implicit.ON_FAILURE
TASK_BATCHING = ("auto", "batched", "support", "per_task")


class TaskOutputs(NamedTuple):
    """What `_task_fn` returns, each with a leading task axis `[T, ...]`."""

    meta_grads: list  # Per-task meta-gradients, like the learner's trainable variables.
    fallback_grads: list  # What a failed task may use instead (query gradient at phi).
    query_pred: tf.Tensor  # Predictions on the query set after adaptation.
    query_pred_before: tf.Tensor  # Predictions on the query set at theta (no adaptation).
    query_loss: tf.Tensor  # [T] query loss after adaptation.
    query_loss_before: tf.Tensor  # [T] query loss at theta.
    support_loss: tf.Tensor  # [T] support loss after adaptation.
    inner_grad_norm: tf.Tensor  # [T] norm of the inner objective's gradient at the end.
    solver_residual: tf.Tensor  # [T] relative residual of the linear solve (0 if none).
    solver_iterations: tf.Tensor  # [T] float, iterations of the linear solve (0 if none).
    failed: tf.Tensor  # [T] bool: the task's meta-gradient is not to be trusted.
    min_curvature: tf.Tensor  # [T] Lanczos min eigenvalue of I + H/lam at phi (0 if none).


class AdaptResult(NamedTuple):
    """What a subclass's `_meta_gradient` returns for a task-batched set of tasks."""

    meta_grads: list  # Per-task meta-gradients [T, ...].
    fallback_grads: list  # Per-task gradient to use if the task failed (on_failure).
    query_loss: tf.Tensor  # [T] query loss after adaptation.
    query_pred: tf.Tensor  # Query predictions after adaptation.
    inner: inner_solvers.InnerSolveResult  # The adaptation and its diagnostics.
    solver_residual: tf.Tensor  # [T] relative residual of a linear solve, else zeros.
    solver_iterations: tf.Tensor  # [T] float iterations of a linear solve, else zeros.
    failed: tf.Tensor  # [T] bool.
    min_curvature: tf.Tensor | None = None  # [T] min eigenvalue of I + H/lam, if estimated.


def query_value_and_grad(query_loss_fn, params):
    """Query losses `[T]`, predictions and per-task gradients at `params`."""
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses, pred = query_loss_fn(params)
        total = tf.reduce_sum(losses)
    return losses, pred, tape.gradient(total, params, unconnected_gradients="zero")


class MetaLearner(keras.Model):
    """Base class: episodes in, adapted predictions out, meta-gradients averaged over tasks.

    Args:
      learner: A built Keras model (Sequential, functional or subclassed).
      inner_steps: Inner adaptation steps (training and test time), `>= 0`.
      inner_learning_rate: Inner step size, `> 0`.
      on_failure: What to do with a task whose meta-gradient failed (linear solve above
        its residual bound, negative curvature, or non-finite values): `"drop"` leaves it
        out of the mean over tasks; `"first_order"` uses its query gradient at the adapted
        parameters instead; `"zero"` counts it with a zero gradient; `"keep"` uses the
        solver's answer as it is (`tf_imaml.implicit.aggregate_tasks`). Tasks whose gradient is
        still not finite are always dropped, and a step whose mean gradient is not finite
        (or has no task left) is skipped: the weights and the optimizer do not move, and
        the `skipped_steps` metric counts it. Default value: `"drop"`.
      second_order: Whether the algorithm takes second derivatives through the learner
        (then Keras normalization layers, whose second derivatives are wrong on TensorFlow,
        are refused). Default value: `True`.
      task_batching: How the tasks of a meta-batch share ops. `"batched"`: all tasks
        together, one op per layer with per-task weights (`tf_imaml.batched`), for the
        support and the query sets. `"support"`: batched on the support sets (the inner
        loop and the Hessian-vector products, where each task has only a few examples)
        and task by task on the query sets. `"per_task"`: everything task by task with
        `tf.map_fn` (up to 10 tasks run concurrently). `"auto"` is `"support"` where the
        learner supports batching, else `"per_task"` (`"support"` is the fastest of the
        three on CPU; `scripts/benchmark.py` compares them). Default value: `"auto"`.
      name: Model name.
    """

    def __init__(
        self,
        learner: keras.Model,
        *,
        inner_steps: int,
        inner_learning_rate: float,
        on_failure: str = "drop",
        task_batching: str = "auto",
        second_order: bool = True,
        name: str | None = None,
    ):
        super().__init__(name=name)
        if not isinstance(learner, keras.Model):
            raise ValueError(f"learner must be a keras.Model, got {type(learner).__name__}")
        if not learner.built or not learner.trainable_variables:
            raise ValueError("learner must be built and have trainable weights")
        self._second_order = bool(second_order)
        if second_order:
            layers_lib.check_second_order_safe(learner)
        # Keras BatchNormalization (first-order algorithms only) normalizes each task by its
        # own batch statistics in every mode, as the paper does: the learner runs in training
        # mode for it, and its moving statistics are never used or updated.
        self._batch_statistics = layers_lib.has_keras_batch_normalization(learner)
        if self._batch_statistics and layers_lib.random_layers(learner):
            raise ValueError(
                f"{learner.name!r} has Keras BatchNormalization and random layers "
                f"({', '.join(layers_lib.random_layers(learner))}): BatchNormalization runs in "
                "training mode at every step (per-task statistics), which would leave the "
                "random layers on at test time; use tf_imaml.layers.BatchStatNormalization"
            )
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        checks.check_positive("inner_learning_rate", inner_learning_rate)
        checks.check_choice("on_failure", on_failure, ON_FAILURE)
        checks.check_choice("task_batching", task_batching, TASK_BATCHING)
        problems = batched_lib.unsupported_layers(learner)
        if task_batching in ("batched", "support") and problems:
            raise ValueError(
                f"task_batching={task_batching!r} needs a learner that tf_imaml.batched "
                "supports: " + "; ".join(problems)
            )
        self.learner = learner
        self.task_batching = task_batching
        self._batch_support = task_batching != "per_task" and not problems
        self._batch_query = task_batching == "batched"
        self.inner_steps = inner_steps
        self.inner_learning_rate = float(inner_learning_rate)
        self.on_failure = on_failure
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in (
                "pre_adaptation_loss",
                "support_loss",
                "inner_grad_norm",
                "failed_fraction",
                "meta_grad_norm",
            )
        }
        self.skipped_steps = keras.metrics.Sum(name="skipped_steps")
        self._task_loss = None  # set by compile
        self._pre_adaptation_metrics = []
        self._pre_adaptation_specs = []
        self._pre_adaptation_resolved = True
        self.built = True  # The learner is built; fit under tf.distribute needs this.

    # ----------------------------------------------------------------- compile and loss

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Keras `compile`; `loss` must be one loss (it serves as inner and outer loss)."""
        if loss is None or isinstance(loss, (list, tuple, dict)):
            raise ValueError(f"loss must be one loss function or Loss object, got {loss!r}")
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._task_loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        self._pre_adaptation_specs = list(metrics or [])
        self._pre_adaptation_metrics.clear()  # untracks a previous compile's copies
        # Keras resolves metric identifiers ("acc", "mae", functions) and names them when it
        # builds the compile metrics, from the label and output shapes; the pre-adaptation
        # copies are made from those, so they accept and are named as Keras's own.
        self._pre_adaptation_resolved = not self._pre_adaptation_specs

    def _resolve_pre_adaptation_metrics(self) -> None:
        """Copies the built compile metrics as `pre_adaptation_<name>` metrics (once)."""
        if self._pre_adaptation_resolved or not getattr(self._compile_metrics, "built", False):
            return
        compiled = {m.name: m for m in self._compile_metrics.metrics}
        copies = [
            keras_glue.pre_adaptation_copy(compiled[keras_glue.metric_name(m)])
            for m in self._pre_adaptation_specs
        ]
        self._pre_adaptation_metrics.clear()
        self._pre_adaptation_metrics.extend(copies)
        self._pre_adaptation_resolved = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras's pre-`fit` build, fixed for `MultiWorkerMirroredStrategy`.

        Keras reduces the first distributed batch with `MEAN` over replicas only to learn its
        shapes; under `MultiWorkerMirroredStrategy` (TF 2.21, Keras 3.15) that reduce fails
        on the episode tensors. This worker's first replica's batch has the same shapes.
        """
        strategy = self._distribute_strategy
        if iterator is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
            if strategy is not None:
                with strategy.scope():
                    self._resolve_pre_adaptation_metrics()
            return None
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(
                lambda x: strategy.experimental_local_results(x)[0]
                if isinstance(x, tf.distribute.DistributedValues)
                else x,
                next(it),
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)
            self._resolve_pre_adaptation_metrics()
        return None

    def compile_from_config(self, config):
        """Re-compiles on `keras.models.load_model` (our `compile` is custom)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    def _per_task_loss(self, y, pred):
        """Mean over each task's examples of the compiled loss: `[T]`."""
        return tasks_lib.per_task_loss(self._task_loss, y, pred)

    # ----------------------------------------------------------------- learner, per task

    def _theta(self):
        return [tf.convert_to_tensor(v) for v in self.learner.trainable_variables]

    def _apply(self, params, x, *, batched: bool, training: bool, task_offset=0, salt: int = 0):
        """Learner outputs for task-batched `params` and inputs `x` (`[T, n, ...]`).

        All tasks in one pass (`tf_imaml.batched`) or task by task with `stateless_call`;
        normalization statistics come from each task's own batch (the paper's setting).

        `training` is the learner's training mode (Dropout, noise layers, Keras
        normalization). In training, every random layer draws from a seed made of its own
        seed-generator state, the optimizer's iteration count, the task's index in the
        meta-batch (`task_offset + t`) and `salt` (0 support, 1 query): each task of each
        meta-step has its own masks, and they are the same at every inner step and every
        Hessian-vector product of that task, so the support loss stays one function of the
        parameters, as the implicit function theorem needs.
        """
        dtype = params[0].dtype
        scale = self._loss_scale()
        if scale is not None:
            # Loss scaling (mixed_float16): gradients flow through the float16 layers scaled
            # up by `scale` and reach the float32 parameters scaled back down, so that every
            # gradient, Hessian-vector product and linear solve outside sees true values.
            params = [keras_glue.scale_gradient(p, 1.0 / scale) for p in params]
        out = self._apply_unscaled(
            params, x, batched=batched, training=training, task_offset=task_offset, salt=salt
        )
        if scale is not None:
            out = keras_glue.scale_gradient(out, scale)
        # Outputs in the parameters' dtype (float32 under a mixed policy): the losses, the
        # proximal term and the linear solve stay in float32.
        return tf.cast(out, dtype)

    def _loss_scale(self):
        """The loss scale of a `LossScaleOptimizer` (Keras's under `mixed_float16`), else None.

        Only for first-order algorithms: through `_scale_gradient`'s custom gradient the
        second derivatives come out wrong (a float16 meta-step of iMAML was 28% off float32
        with any scale other than 1, and 5.8e-4 off without scaling; MAML 18% and 3.8e-4),
        so algorithms that take second derivatives run float16 without loss scaling.
        """
        if self._second_order:
            return None
        optimizer = getattr(self, "optimizer", None)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return tf.stop_gradient(tf.cast(optimizer.dynamic_scale, tf.float32))
        return None

    def _halve_loss_scale(self):
        """What Keras's `LossScaleOptimizer` does on an overflow: halve the scale."""
        scale = self.optimizer.dynamic_scale
        scale.assign(scale / 2.0)
        self.optimizer.step_counter.assign(0)

    def _apply_unscaled(self, params, x, *, batched, training, task_offset, salt):
        iterations = (
            self.optimizer.iterations if getattr(self, "optimizer", None) is not None else 0
        )
        return tasks_lib.apply(
            self.learner,
            params,
            x,
            batched=batched,
            training=training or self._batch_statistics,
            seed_shift=tf.stack([tf.constant(salt, tf.int64), tf.cast(iterations, tf.int64)]),
            task_offset=task_offset,
        )

    def _support_loss_fn(self, support_x, support_y, *, training: bool = False, task_offset=0):
        """The inner loss closure: task-batched parameters -> per-task support loss."""

        def loss_fn(params):
            pred = self._apply(
                params,
                support_x,
                batched=self._batch_support,
                training=training,
                task_offset=task_offset,
            )
            return self._per_task_loss(support_y, pred)

        return loss_fn

    def _inner_solve(self, theta, support_loss_fn, *, training=True):
        """Adapts task-batched `theta` on the support loss: an `InnerSolveResult`.

        `training` is false for the adaptation of `evaluate`, `predict` and `adapt`.
        """
        raise NotImplementedError

    def _meta_gradient(self, theta, support_loss_fn, query_loss_fn) -> AdaptResult:
        """Adapts and computes the per-task meta-gradients (training): an `AdaptResult`."""
        raise NotImplementedError

    # ----------------------------------------------------------------- public task seams
    # What the benchmark and the studies need from a meta-model, as documented methods: the
    # per-task closures of the task layer with this model's loss, batching and training
    # mode, and the two hooks of the algorithm.

    @property
    def resolved_task_batching(self) -> str:
        """`task_batching` as resolved for this learner: "batched", "support" or "per_task"."""
        if self._batch_query:
            return "batched"
        return "support" if self._batch_support else "per_task"

    def meta_params(self, num_tasks) -> list:
        """`theta`, the learner's trainable weights, with a leading task axis."""
        return tasks_lib.meta_params(self.learner, num_tasks)

    def support_loss_fn(self, support_x, support_y, *, training: bool = False):
        """`params -> [T]` support losses with the compiled loss (the inner loss closure)."""
        self._require_compiled("support_loss_fn")
        return self._support_loss_fn(
            tf.convert_to_tensor(support_x), tf.convert_to_tensor(support_y), training=training
        )

    def query_loss_fn(self, query_x, query_y, *, training: bool = False):
        """`params -> ([T] query losses, query predictions)` with the compiled loss."""
        self._require_compiled("query_loss_fn")
        query_x, query_y = tf.convert_to_tensor(query_x), tf.convert_to_tensor(query_y)

        def fn(params):
            pred = self._apply(
                params, query_x, batched=self._batch_query, training=training, salt=1
            )
            return self._per_task_loss(query_y, pred), pred

        return fn

    def inner_solve(self, meta_params, support_loss_fn, *, training: bool = False):
        """The algorithm's adaptation of task-batched `meta_params`: an `InnerSolveResult`."""
        return self._inner_solve(meta_params, support_loss_fn, training=training)

    def meta_gradient(self, meta_params, support_loss_fn, query_loss_fn) -> AdaptResult:
        """The algorithm's adaptation and per-task meta-gradients: an `AdaptResult`."""
        return self._meta_gradient(meta_params, support_loss_fn, query_loss_fn)

    def _task_fn(
        self, support_x, support_y, query_x, query_y, *, training: bool, task_offset=0
    ) -> TaskOutputs:
        """The per-task computation over task-batched tensors.

        `training` is true in `train_step` only: the learner then runs in training mode in
        the inner loop and on the query set; evaluation, prediction and `adapt` run it in
        inference mode throughout (no Dropout, no noise).
        """
        theta = tree.broadcast_to_tasks(self._theta(), tf.shape(support_x)[0])
        support_loss_fn = self._support_loss_fn(
            support_x, support_y, training=training, task_offset=task_offset
        )

        def query_loss_fn(params):
            pred = self._apply(
                params,
                query_x,
                batched=self._batch_query,
                training=training,
                task_offset=task_offset,
                salt=1,
            )
            return self._per_task_loss(query_y, pred), pred

        if training:
            result = self._meta_gradient(theta, support_loss_fn, query_loss_fn)
        else:
            inner = self._inner_solve(theta, support_loss_fn, training=False)
            query_loss, query_pred = query_loss_fn(inner.adapted_params)
            zeros = tf.zeros_like(query_loss)
            no_grads = tree.zeros_like(theta)
            result = AdaptResult(
                no_grads,
                no_grads,
                query_loss,
                query_pred,
                inner,
                zeros,
                zeros,
                tf.zeros_like(query_loss, tf.bool),
            )
        query_loss_before, query_pred_before = query_loss_fn(theta)
        return TaskOutputs(
            meta_grads=result.meta_grads,
            fallback_grads=result.fallback_grads,
            query_pred=result.query_pred,
            query_pred_before=query_pred_before,
            query_loss=result.query_loss,
            query_loss_before=query_loss_before,
            support_loss=result.inner.support_loss,
            inner_grad_norm=result.inner.grad_norm,
            solver_residual=result.solver_residual,
            solver_iterations=result.solver_iterations,
            failed=result.failed,
            min_curvature=(
                tf.zeros_like(result.query_loss)
                if result.min_curvature is None
                else result.min_curvature
            ),
        )

    def adapt(self, support_x, support_y) -> keras.Model:
        """Adapts to one task and returns a copy of the learner with the adapted weights.

        Args:
          support_x: One task's support inputs, `[n, ...]` (or `[1, n, ...]`).
          support_y: Its labels, `[n, ...]` (or `[1, n, ...]`).

        Returns:
          A new Keras model (a clone of the learner) holding `phi`; usable on its own.
        """
        self._require_compiled("adapt")
        support_x = tf.convert_to_tensor(support_x)
        support_y = tf.convert_to_tensor(support_y)
        learner_inputs = getattr(self.learner, "inputs", None)
        example_rank = len(learner_inputs[0].shape) - 1 if learner_inputs else None
        if example_rank is None or support_x.shape.rank == example_rank + 1:
            support_x, support_y = support_x[tf.newaxis], support_y[tf.newaxis]
        support_x, support_y, _ = self._check_inputs((support_x, support_y, support_x))
        if support_x.shape[0] != 1:
            raise ValueError(f"adapt takes one task, got {support_x.shape[0]}")
        if getattr(self, "_adapt_function", None) is None:
            self._adapt_function = tf.function(
                lambda x, y: self._inner_solve(
                    tree.broadcast_to_tasks(self._theta(), 1),
                    self._support_loss_fn(x, y),
                    training=False,
                ).adapted_params
            )
            keras_glue.trace_once_per_model(self._adapt_function)
        phi = self._adapt_function(support_x, support_y)
        model = keras.models.clone_model(self.learner)
        for variable, value in zip(model.trainable_variables, phi, strict=True):
            variable.assign(value[0])
        for variable, value in zip(
            model.non_trainable_variables, self.learner.non_trainable_variables, strict=True
        ):
            variable.assign(value)
        return model

    def _run_tasks(self, support_x, support_y, query_x, query_y, *, training):
        """`_task_fn` over the meta-batch: all at once, or one task at a time (`tf.map_fn`)."""
        if self._batch_support:
            return self._task_fn(support_x, support_y, query_x, query_y, training=training)
        dtype = self.learner.trainable_variables[0].dtype

        def one(elems):
            index, *task = elems
            outputs = self._task_fn(
                *[e[tf.newaxis] for e in task], training=training, task_offset=index
            )
            return tf.nest.map_structure(lambda t: t[0], outputs)

        grad_spec = [tf.TensorSpec(v.shape, v.dtype) for v in self.learner.trainable_variables]
        spec = TaskOutputs(
            meta_grads=grad_spec,
            fallback_grads=grad_spec,
            query_pred=tf.TensorSpec(None, dtype),
            query_pred_before=tf.TensorSpec(None, dtype),
            query_loss=tf.TensorSpec([], dtype),
            query_loss_before=tf.TensorSpec([], dtype),
            support_loss=tf.TensorSpec([], dtype),
            inner_grad_norm=tf.TensorSpec([], dtype),
            solver_residual=tf.TensorSpec([], dtype),
            solver_iterations=tf.TensorSpec([], dtype),
            failed=tf.TensorSpec([], tf.bool),
            min_curvature=tf.TensorSpec([], dtype),
        )
        index = tf.range(tf.shape(support_x)[0])
        return tf.map_fn(
            one, (index, support_x, support_y, query_x, query_y), fn_output_signature=spec
        )

    # ----------------------------------------------------------------- Keras steps

    def call(self, inputs, training=False):
        """Adapted predictions on the query set: `inputs = (support_x, support_y, query_x)`."""
        self._require_compiled("__call__")
        support_x, support_y, query_x = self._check_inputs(inputs)
        # Query labels are unknown here; zeros stand in for them (their loss is not used).
        dummy_y = tf.zeros(
            tf.concat([tf.shape(query_x)[:2], tf.shape(support_y)[2:]], 0), support_y.dtype
        )
        return self._run_tasks(support_x, support_y, query_x, dummy_y, training=False).query_pred

    def train_step(self, data):
        (support_x, support_y, query_x), query_y = self._unpack(data)
        out = self._run_tasks(support_x, support_y, query_x, query_y, training=True)
        grad_sums, num_used = self._aggregate(out)
        # Under loss scaling, a non-finite query gradient is an overflow (a failed linear
        # solve is not).
        overflow = ~tf.reduce_all(tree.all_finite(out.fallback_grads))
        grads = self._apply_mean(grad_sums, num_used, overflow=overflow)
        logs = self._update_metrics(out, query_y)
        num_tasks = tf.cast(tf.shape(out.failed)[0], out.query_loss.dtype)
        # Failed solves of tf.linalg's CG leave NaN residuals; failed_fraction counts them.
        if "solver_residual" in self._trackers:  # algorithms with a linear solve
            finite = tf.math.is_finite(out.solver_residual)
            self._trackers["solver_residual"].update_state(
                tf.boolean_mask(out.solver_residual, finite)
            )
            self._trackers["solver_iterations"].update_state(tf.reduce_mean(out.solver_iterations))
        self._trackers["failed_fraction"].update_state(
            tf.reduce_sum(tf.cast(out.failed, num_tasks.dtype)) / num_tasks
        )
        self._trackers["meta_grad_norm"].update_state(
            tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
        )
        if "min_curvature" in self._trackers:  # ImplicitMAML(curvature_iterations > 0)
            self._trackers["min_curvature"].update_state(
                tf.reduce_mean(out.min_curvature), sample_weight=num_tasks
            )
            self._trackers["indefinite_fraction"].update_state(
                tf.reduce_mean(tf.cast(out.min_curvature < 0, num_tasks.dtype))
            )
        logs.update({m.name: m.result() for m in self._trackers.values()})
        logs[self.skipped_steps.name] = self.skipped_steps.result()
        return self._multi_worker_logs(logs)

    def test_step(self, data):
        (support_x, support_y, query_x), query_y = self._unpack(data)
        out = self._run_tasks(support_x, support_y, query_x, query_y, training=False)
        return self._multi_worker_logs(self._update_metrics(out, query_y))

    def _multi_worker_logs(self, logs):
        """Logs with a length-1 axis under `MultiWorkerMirroredStrategy`.

        Keras 3 reduces a multi-worker step's outputs with `MEAN` over axis 0, which fails on
        scalars (tensorflow/tensorflow#72388); a length-1 axis makes that reduce the mean
        over workers.
        """
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            return {key: tf.reshape(value, [1]) for key, value in logs.items()}
        return logs

    def predict_step(self, data):
        if isinstance(data, (tuple, list)) and len(data) in (1, 2):
            data = data[0]  # (x,) from Keras, or (x, query_y) from an episode dataset.
        return self(data, training=False)

    # ----------------------------------------------------------------- traced functions

    def make_train_function(self, force=False):
        function = super().make_train_function(force=force)
        keras_glue.trace_once_per_model(self.train_function)
        return function

    def make_test_function(self, force=False):
        function = super().make_test_function(force=force)
        keras_glue.trace_once_per_model(self.test_function)
        return function

    def make_predict_function(self, force=False):
        function = super().make_predict_function(force=force)
        keras_glue.trace_once_per_model(self.predict_function)
        return function

    # ----------------------------------------------------------------- eager input checks

    def fit(self, x=None, y=None, *args, **kwargs):
        """Keras `fit`; episodes given as arrays are checked first (see `check_episode`)."""
        self._require_compiled("fit")
        for name in ("class_weight", "sample_weight"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported by {type(self).__name__}.fit: every task counts "
                    "once in the meta-gradient; weight tasks or classes in the episode sampler"
                )
        self._check_arrays(x, y)
        self._build_state(x, y, optimizer=True)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """Keras `evaluate`; episodes given as arrays are checked first."""
        self._require_compiled("evaluate")
        self._check_arrays(x, y)
        self._build_state(x, y, optimizer=False)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """Keras `predict`; episodes given as arrays are checked first."""
        self._require_compiled("predict")
        self._check_arrays(x, None)
        return super().predict(x, *args, **kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        """Keras `train_on_batch`; the episode is checked first."""
        self._require_compiled("train_on_batch")
        self._check_arrays(x, y)
        self._build_state(x, y, optimizer=True)
        return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        """Keras `test_on_batch`; the episode is checked first."""
        self._require_compiled("test_on_batch")
        self._check_arrays(x, y)
        self._build_state(x, y, optimizer=False)
        return super().test_on_batch(x, y, *args, **kwargs)

    def predict_on_batch(self, x):
        """Keras `predict_on_batch`; the episode is checked first."""
        self._require_compiled("predict_on_batch")
        self._check_arrays(x, None)
        return super().predict_on_batch(x)

    def _require_compiled(self, method: str) -> None:
        """Keras's "call `compile()` first", saying what each method needs."""
        if self._task_loss is not None:
            return
        needs = (
            "a loss for the inner loop: call `compile(loss=...)` first (prediction and "
            "`adapt` need only the loss; `fit` also uses the optimizer)"
            if method not in ("fit", "evaluate", "train_on_batch", "test_on_batch")
            else "an optimizer and a loss: call `compile(optimizer=..., loss=...)` first"
        )
        raise ValueError(
            f"You must call `compile()` before using the model: {type(self).__name__}.{method} "
            f"needs {needs}."
        )

    def _check_arrays(self, x, y):
        if isinstance(x, (tuple, list)) and all(
            episode_checks.is_concrete(t) for t in (*x, y) if t is not None
        ):
            episode_checks.check_episode(self.learner, x, y)

    def _build_state(self, x, y, *, optimizer: bool) -> None:
        """Creates the optimizer's slots and the compile metrics before the first step.

        Without a distribution strategy Keras creates them inside the first traced step,
        and `tf.function`, which allows variables to be created only on a first trace, then
        traces the whole meta-step a second time: twice the tracing time of every `fit`.
        The shapes come from
        `x.element_spec` or the arrays; no data is read, so the episode stream is untouched.
        Under a strategy Keras's `_symbolic_build` does this itself.
        """
        if self._distribute_strategy is not None:
            return
        if optimizer and self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.learner.trainable_variables)
        if self._compile_metrics is None or self._compile_metrics.built:
            return
        outputs = getattr(self.learner, "outputs", None)
        labels = episode_checks.query_label_spec(x, y)
        if not outputs or labels is None:
            return  # the metrics are built in the first trace, as Keras does
        y_true = tf.zeros([1, *labels.shape[2:]], labels.dtype)
        y_pred = tf.zeros([1, *outputs[0].shape[1:]], outputs[0].dtype)
        self._compile_metrics.build(y_true, y_pred)
        self._resolve_pre_adaptation_metrics()

    # ----------------------------------------------------------------- pieces of the steps

    def _update_metrics(self, out, query_y):
        num_tasks = tf.shape(out.query_loss)[0]
        self._loss_tracker.update_state(tf.reduce_mean(out.query_loss), sample_weight=num_tasks)
        for key, value in (
            ("pre_adaptation_loss", out.query_loss_before),
            ("support_loss", out.support_loss),
            ("inner_grad_norm", out.inner_grad_norm),
        ):
            self._trackers[key].update_state(tf.reduce_mean(value), sample_weight=num_tasks)
        flat_y = _merge_task_axis(query_y)
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(flat_y, _merge_task_axis(out.query_pred))
            self._resolve_pre_adaptation_metrics()  # when the step built the compile metrics
        for metric in self._pre_adaptation_metrics:
            metric.update_state(flat_y, _merge_task_axis(out.query_pred_before))
        logs = {self._loss_tracker.name: self._loss_tracker.result()}
        if self._compile_metrics is not None:
            logs.update(self._compile_metrics.result())
        for metric in self._pre_adaptation_metrics:
            logs[metric.name] = metric.result()
        for key in ("pre_adaptation_loss", "support_loss", "inner_grad_norm"):
            logs[key] = self._trackers[key].result()
        return logs

    def _aggregate(self, out):
        """Sum of the meta-gradients of the tasks that `on_failure` keeps; and how many."""
        return implicit.aggregate_tasks(
            out.meta_grads, out.fallback_grads, out.failed, on_failure=self.on_failure
        )

    def _apply_mean(self, grad_sums, num_used, *, overflow=False):
        """Applies the mean meta-gradient unless no task was usable or it is not finite.

        Under a `tf.distribute` strategy the counts are all-reduced, so that the step is the
        mean over all replicas' usable tasks, exactly as on one device (the optimizer sums
        the replicas' gradients). Returns the mean gradient (this replica's share).
        """
        replica = tf.distribute.get_replica_context()
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        distributed = replica is not None and num_replicas > 1
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grad_sums])
        num_bad = tf.cast(~finite, num_used.dtype)
        if distributed:
            num_used = replica.all_reduce(tf.distribute.ReduceOp.SUM, num_used)
            num_bad = replica.all_reduce(tf.distribute.ReduceOp.SUM, num_bad)
        ok = (num_used > 0) & (num_bad == 0)
        if self._loss_scale() is not None:
            # Dynamic loss scaling as Keras does it: a step in which any task's gradient
            # overflowed is skipped, and the LossScaleOptimizer halves its scale.
            ok &= ~overflow
        grads = [g / tf.maximum(num_used, 1.0) for g in grad_sums]
        variables = self.learner.trainable_variables
        if not self.optimizer.built:
            self.optimizer.build(variables)

        def apply(grads):
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                # The meta-gradients are already unscaled (see `_apply`); the optimizer
                # divides by its scale, so it gets them scaled, and grows the scale as usual.
                scale = self.optimizer.dynamic_scale
                grads = [g * tf.cast(scale, g.dtype) for g in grads]
            self.optimizer.apply_gradients(zip(grads, variables, strict=True))

        if distributed:
            # A cond whose branch all-reduces (the optimizer does) must be taken in the
            # cross-replica context, as Keras's LossScaleOptimizer does.
            def cross_replica(distribution, ok, grads):
                def apply_all():
                    distribution.extended.call_for_each_replica(apply, args=(grads,))
                    return tf.constant(True)

                first_ok = distribution.experimental_local_results(ok)[0]
                tf.cond(first_ok, apply_all, lambda: tf.constant(False))

            replica.merge_call(cross_replica, args=(ok, grads))
        else:
            tf.cond(ok, lambda: apply(grads) or tf.constant(True), lambda: tf.constant(False))
            if self._loss_scale() is not None:
                tf.cond(
                    overflow,
                    lambda: self._halve_loss_scale() or tf.constant(True),
                    lambda: tf.constant(False),
                )
        self.skipped_steps.update_state(1.0 - tf.cast(ok, tf.float32))
        return [g * num_replicas for g in grads]

    def _unpack(self, data):
        inputs, query_y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if query_y is None:
            raise ValueError("an episode must be ((support_x, support_y, query_x), query_y)")
        if sample_weight is not None:
            raise ValueError(
                "sample weights (sample_weight, or class_weight in fit) are not supported: "
                "weight tasks or classes in the episode sampler"
            )
        support_x, support_y, query_x = self._check_inputs(inputs)
        query_y = tf.convert_to_tensor(query_y)
        query_y = episode_checks.check_labels(
            self.learner, self._task_loss, "query", query_x, query_y
        )
        return (support_x, support_y, query_x), query_y

    def _check_inputs(self, inputs):
        if not (isinstance(inputs, (tuple, list)) and len(inputs) == 3):
            raise ValueError(
                "inputs must be (support_x, support_y, query_x), each with a leading task "
                f"axis; got {type(inputs).__name__}"
            )
        support_x, support_y, query_x = (tf.convert_to_tensor(t) for t in inputs)
        dtype = self.learner.trainable_variables[0].dtype
        support_x, query_x = tf.cast(support_x, dtype), tf.cast(query_x, dtype)
        for name, x in (("support_x", support_x), ("query_x", query_x)):
            episode_checks.check_example_shape(self.learner, name, x.shape)
        support_x = tf.debugging.assert_all_finite(support_x, "support_x has non-finite values")
        query_x = tf.debugging.assert_all_finite(query_x, "query_x has non-finite values")
        if not support_x.shape[:1].is_compatible_with(query_x.shape[:1]):
            raise ValueError(
                f"support_x and query_x have different numbers of tasks: {support_x.shape} "
                f"and {query_x.shape}"
            )
        support_y = episode_checks.check_labels(
            self.learner, self._task_loss, "support", support_x, support_y
        )
        return support_x, support_y, query_x

    # ----------------------------------------------------------------- saving

    def get_config(self):
        return {
            "learner": keras.saving.serialize_keras_object(self.learner),
            "inner_steps": self.inner_steps,
            "inner_learning_rate": self.inner_learning_rate,
            "on_failure": self.on_failure,
            "task_batching": self.task_batching,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["learner"] = keras.saving.deserialize_keras_object(config["learner"])
        return cls(**config)


def _merge_task_axis(t):
    """`[T, n, ...] -> [T * n, ...]` for Keras metrics."""
    return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))
