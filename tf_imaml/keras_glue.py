"""Work-arounds and adapters between `MetaLearner` and Keras / TensorFlow internals.

Everything that touches a private member of Keras (`_compile_metrics`, `_symbolic_build`,
`_distribute_strategy`, `_loss_tracker`) or works around a Keras or TensorFlow behaviour
lives here, each with the reason it exists, so that an upgrade has one place to look:

- `EpisodeModel`: the `keras.Model` base of `MetaLearner`. Its overrides of Keras's entry
  points check episodes given as arrays before anything runs, say what `compile` is needed
  for, create state before the first trace, fix the multi-worker symbolic build, and trace
  each step function once. It also keeps the `pre_adaptation_*` copies of the compiled
  metrics.
- `apply_mean_gradient`: the optimizer step under `tf.distribute` and loss scaling.
- `multi_worker_logs`, `scale_gradient`, `loss_scale`, `trace_once_per_model`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_imaml import episode_checks

# Keras methods that consume episodes; those that also train or evaluate need an optimizer.
_NEEDS_OPTIMIZER = ("fit", "evaluate", "train_on_batch", "test_on_batch")


def scale_gradient(x, factor):
    """Identity whose gradient is multiplied by `factor` (twice differentiable)."""

    @tf.custom_gradient
    def op(x):
        def grad(dy):
            return dy * tf.cast(factor, dy.dtype)

        return tf.identity(x), grad

    return op(x)


def loss_scale(optimizer) -> tf.Tensor | None:
    """The current scale of a `LossScaleOptimizer` (Keras's under `mixed_float16`), else None."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.stop_gradient(tf.cast(optimizer.dynamic_scale, tf.float32))
    return None


def trace_once_per_model(function) -> None:
    """Silences TensorFlow's frequent-retracing warning for one model's step function.

    TensorFlow counts traces per Python code object, not per `tf.function`: N meta-models
    in one process, each tracing its own step once, look like one function retraced N
    times and log "triggered tf.function retracing". Each model traces each step once
    (`tests/test_imaml.py` counts it), so for these functions the warning is wrong.
    Keras wraps its `tf.function`s in a plain Python closure (`TensorFlowTrainer.
    _make_function`), so the closure's cells are searched too (two levels deep).
    """
    _silence_retracing_warning(function, depth=2)


def _silence_retracing_warning(function, *, depth: int) -> None:
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    if depth and getattr(function, "__closure__", None):
        for cell in function.__closure__:
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(contents) and contents is not function:
                _silence_retracing_warning(contents, depth=depth - 1)


def metric_name(metric) -> str:
    """The name Keras gives a compiled metric: the string itself, else the object's name."""
    if isinstance(metric, str):
        return metric
    return getattr(metric, "name", None) or metric.__name__


def pre_adaptation_copy(metric: keras.metrics.Metric) -> keras.metrics.Metric:
    """A fresh copy of a built compile metric, named `pre_adaptation_<its name>`."""
    config = metric.get_config()
    config["name"] = "pre_adaptation_" + metric.name
    return metric.__class__.from_config(config)


def multi_worker_logs(logs: dict) -> dict:
    """Logs with a length-1 axis under `MultiWorkerMirroredStrategy`.

    Keras 3 reduces a multi-worker step's outputs with `MEAN` over axis 0, which fails on
    scalars (tensorflow/tensorflow#72388); a length-1 axis makes that reduce the mean
    over workers.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {key: tf.reshape(value, [1]) for key, value in logs.items()}
    return logs


def apply_mean_gradient(optimizer, variables, grad_sums, num_used, *, overflow=None):
    """Applies `grad_sums / num_used` unless no task was usable or it is not finite.

    Under a `tf.distribute` strategy the counts are all-reduced, so that the step is the
    mean over all replicas' usable tasks, exactly as on one device (the optimizer sums
    the replicas' gradients). `overflow` (a bool tensor, under loss scaling) also skips the
    step and halves the `LossScaleOptimizer`'s scale, as Keras does on an overflow.

    Returns:
      `(mean gradient, this replica's share, times the number of replicas; applied)`,
      `applied` a bool tensor.
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
    if overflow is not None:
        ok &= ~overflow
    grads = [g / tf.maximum(num_used, 1.0) for g in grad_sums]
    if not optimizer.built:
        optimizer.build(variables)

    def apply(grads):
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # The meta-gradients are already unscaled (see `scale_gradient`'s use); the
            # optimizer divides by its scale, so it gets them scaled, and grows the scale.
            scale = optimizer.dynamic_scale
            grads = [g * tf.cast(scale, g.dtype) for g in grads]
        optimizer.apply_gradients(zip(grads, variables, strict=True))

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
        if overflow is not None:

            def halve_scale():
                optimizer.dynamic_scale.assign(optimizer.dynamic_scale / 2.0)
                optimizer.step_counter.assign(0)
                return tf.constant(True)

            tf.cond(overflow, halve_scale, lambda: tf.constant(False))
    return [g * num_replicas for g in grads], ok


class EpisodeModel(keras.Model):
    """Keras's `Model` for episodes `((support_x, support_y, query_x), query_y)`.

    A subclass sets `self.learner` (a built Keras model) and `self._task_loss` (the compiled
    loss, `None` before `compile`), and calls `_set_pre_adaptation_specs` from `compile`.
    """

    # ------------------------------------------------------------ entry points

    def fit(self, x=None, y=None, *args, **kwargs):
        """Keras `fit`; episodes given as arrays are checked first."""
        for name in ("class_weight", "sample_weight"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported by {type(self).__name__}.fit: every task counts "
                    "once in the meta-gradient; weight tasks or classes in the episode sampler"
                )
        self._before("fit", x, y)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """Keras `evaluate`; episodes given as arrays are checked first."""
        self._before("evaluate", x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """Keras `predict`; episodes given as arrays are checked first."""
        self._before("predict", x, None)
        return super().predict(x, *args, **kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        """Keras `train_on_batch`; the episode is checked first."""
        self._before("train_on_batch", x, y)
        return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        """Keras `test_on_batch`; the episode is checked first."""
        self._before("test_on_batch", x, y)
        return super().test_on_batch(x, y, *args, **kwargs)

    def predict_on_batch(self, x):
        """Keras `predict_on_batch`; the episode is checked first."""
        self._before("predict_on_batch", x, None)
        return super().predict_on_batch(x)

    def _before(self, method: str, x, y) -> None:
        self._require_compiled(method)
        if isinstance(x, (tuple, list)) and all(
            episode_checks.is_concrete(t) for t in (*x, y) if t is not None
        ):
            episode_checks.check_episode(self.learner, x, y, loss=self._task_loss)
        if method in _NEEDS_OPTIMIZER:
            self._build_state(x, y, optimizer=method in ("fit", "train_on_batch"))

    def _require_compiled(self, method: str) -> None:
        """Keras's "call `compile()` first", saying what each method needs."""
        if self._task_loss is not None:
            return
        needs = (
            "an optimizer and a loss: call `compile(optimizer=..., loss=...)` first"
            if method in _NEEDS_OPTIMIZER
            else "a loss for the inner loop: call `compile(loss=...)` first (prediction and "
            "`adapt` need only the loss; `fit` also uses the optimizer)"
        )
        raise ValueError(
            f"You must call `compile()` before using the model: {type(self).__name__}.{method} "
            f"needs {needs}."
        )

    def compile_from_config(self, config):
        """Re-compiles on `keras.models.load_model` (the subclass's `compile` is custom)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------ state before the first step

    def _build_state(self, x, y, *, optimizer: bool) -> None:
        """Creates the optimizer's slots and the compile metrics before the first step.

        Without a distribution strategy Keras creates them inside the first traced step,
        and `tf.function`, which allows variables to be created only on a first trace, then
        traces the whole meta-step a second time: twice the tracing time of every `fit`.
        The shapes come from `x.element_spec` or the arrays; no data is read, so the episode
        stream is untouched. Under a strategy Keras's `_symbolic_build` does this itself.
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

    # ------------------------------------------------------------ traced step functions

    def make_train_function(self, force=False):
        function = super().make_train_function(force=force)
        trace_once_per_model(self.train_function)
        return function

    def make_test_function(self, force=False):
        function = super().make_test_function(force=force)
        trace_once_per_model(self.test_function)
        return function

    def make_predict_function(self, force=False):
        function = super().make_predict_function(force=force)
        trace_once_per_model(self.predict_function)
        return function

    # ------------------------------------------------------------ metrics

    def _set_pre_adaptation_specs(self, metrics) -> None:
        """Records `compile(metrics=...)`, whose copies measure the unadapted predictions.

        Keras resolves metric identifiers ("acc", "mae", functions) and names them when it
        builds the compile metrics, from the label and output shapes; the copies are made
        from those once built, so they accept and are named as Keras's own.
        """
        if not hasattr(self, "_pre_adaptation_metrics"):
            self._pre_adaptation_metrics = []
        self._pre_adaptation_specs = list(metrics or [])
        self._pre_adaptation_metrics.clear()  # untracks a previous compile's copies
        self._pre_adaptation_resolved = not self._pre_adaptation_specs

    def _resolve_pre_adaptation_metrics(self) -> None:
        """Copies the built compile metrics as `pre_adaptation_<name>` metrics (once)."""
        if self._pre_adaptation_resolved or not getattr(self._compile_metrics, "built", False):
            return
        compiled = {m.name: m for m in self._compile_metrics.metrics}
        copies = [pre_adaptation_copy(compiled[metric_name(m)]) for m in self._pre_adaptation_specs]
        self._pre_adaptation_metrics.clear()
        self._pre_adaptation_metrics.extend(copies)
        self._pre_adaptation_resolved = True

    def _update_compiled_metrics(self, query_y, query_pred, query_pred_before, query_loss):
        """Updates Keras's loss tracker, the compile metrics and their pre-adaptation copies.

        Predictions and labels are `[T, n, ...]`; Keras's metrics take `[T * n, ...]`.
        Returns their logs.
        """
        num_tasks = tf.shape(query_loss)[0]
        self._loss_tracker.update_state(tf.reduce_mean(query_loss), sample_weight=num_tasks)
        flat_y = _merge_task_axis(query_y)
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(flat_y, _merge_task_axis(query_pred))
            self._resolve_pre_adaptation_metrics()  # when the step built the compile metrics
        for metric in self._pre_adaptation_metrics:
            metric.update_state(flat_y, _merge_task_axis(query_pred_before))
        logs = {self._loss_tracker.name: self._loss_tracker.result()}
        if self._compile_metrics is not None:
            logs.update(self._compile_metrics.result())
        logs.update({metric.name: metric.result() for metric in self._pre_adaptation_metrics})
        return logs


def _merge_task_axis(t):
    """`[T, n, ...] -> [T * n, ...]` for Keras metrics."""
    return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))
