"""`MetaLearner`: the Keras glue shared by ImplicitMAML and the baselines.

A meta-learner wraps a built Keras `learner` whose weights are the meta-parameters `theta`.
Its data are episodes `((support_x, support_y, query_x), query_y)`, every tensor with a
leading task axis. For each task it adapts the learner to the support set, predicts the
query set with the adapted weights, and (in training) computes a per-task meta-gradient;
`train_step` averages those over tasks (`implicit.aggregate_tasks`) and hands them to the
compiled optimizer. The compiled `loss` is the outer loss on the query set and the inner
loss on the support set.

A subclass is an algorithm: it implements two hooks, `_inner_solve` (the adaptation) and
`_meta_gradient` (adaptation and per-task meta-gradients), over task-batched tensors, with
the math in the functional core. Two more hooks are optional: `_auto_task_batching` and
`_task_metrics` (with `_add_metrics` in `__init__`). The episode checks live in
`tf_imaml.episode_checks`, the meta-batch plumbing in `tf_imaml.meta_batch` and the Keras
and `tf.distribute` work-arounds in `tf_imaml.keras_glue`.

Every core function takes the task axis, so the hooks run on a whole meta-batch at once
when the learner can be evaluated with per-task weights in one pass (`tf_imaml.batched`:
Sequential models of Dense, Conv2D, BatchStatNormalization, activations and pooling). Other
learners are evaluated one task at a time by `tf.map_fn`. Either way each task's
adaptation, Hessian-vector products and normalization statistics see that task alone, and
the paths give the same meta-gradients (tested).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_imaml import checks
from tf_imaml import episode_checks
from tf_imaml import implicit
from tf_imaml import keras_glue
from tf_imaml import layers as layers_lib
from tf_imaml import meta_batch
from tf_imaml import tasks as tasks_lib
from tf_imaml import tree

ON_FAILURE = implicit.ON_FAILURE
TASK_BATCHING = meta_batch.TASK_BATCHING
AdaptResult = meta_batch.AdaptResult
query_value_and_grad = meta_batch.query_value_and_grad


class MetaLearner(keras_glue.EpisodeModel):
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
      task_batching: How the tasks of a meta-batch share ops. `"batched"`: all tasks
        together, one op per layer with per-task weights (`tf_imaml.batched`), for the
        support and the query sets. `"support"`: batched on the support sets (the inner
        loop and the Hessian-vector products, where each task has only a few examples)
        and task by task on the query sets. `"per_task"`: everything task by task with
        `tf.map_fn` (up to 10 tasks run concurrently). `"auto"` is `_auto_task_batching()`
        (`"support"` unless an algorithm says otherwise) where the learner supports
        batching, else `"per_task"` (`"support"` is the fastest of the three on CPU;
        `scripts/benchmark.py` compares them). Default value: `"auto"`.
      second_order: Whether the algorithm takes second derivatives through the learner
        (then Keras normalization layers, whose second derivatives are wrong on TensorFlow,
        are refused). Default value: `True`.
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
        self._batching_problems = meta_batch.check_learner(
            learner, second_order=second_order, task_batching=task_batching
        )
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        checks.check_positive("inner_learning_rate", inner_learning_rate)
        checks.check_choice("on_failure", on_failure, ON_FAILURE)
        self.learner = learner
        self.inner_steps = inner_steps
        self.inner_learning_rate = float(inner_learning_rate)
        self.on_failure = on_failure
        self.task_batching = task_batching
        self._second_order = bool(second_order)
        # Keras BatchNormalization (first-order algorithms only) normalizes each task by its
        # own batch statistics in every mode, as the paper does: the learner runs in training
        # mode for it, and its moving statistics are never used or updated.
        self._batch_statistics = layers_lib.has_keras_batch_normalization(learner)
        self._trackers = {}
        self._add_metrics(
            "pre_adaptation_loss",
            "support_loss",
            "inner_grad_norm",
            "failed_fraction",
            "meta_grad_norm",
        )
        self.skipped_steps = keras.metrics.Sum(name="skipped_steps")
        self._task_loss = None  # set by compile
        self._set_pre_adaptation_specs([])
        self.built = True  # The learner is built; fit under tf.distribute needs this.

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Keras `compile`; `loss` must be one loss (it serves as inner and outer loss)."""
        if loss is None or isinstance(loss, (list, tuple, dict)):
            raise ValueError(f"loss must be one loss function or Loss object, got {loss!r}")
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._task_loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        self._set_pre_adaptation_specs(metrics)

    # ----------------------------------------------------------------- hooks

    def _inner_solve(self, theta, support_loss_fn, *, training=True):
        """Hook: adapts task-batched `theta` on the support loss; an `InnerSolveResult`.

        `training` is false for the adaptation of `evaluate`, `predict` and `adapt`.
        """
        raise NotImplementedError

    def _meta_gradient(self, theta, support_loss_fn, query_loss_fn) -> AdaptResult:
        """Hook: adapts and computes the per-task meta-gradients (training): an `AdaptResult`."""
        raise NotImplementedError

    def _auto_task_batching(self) -> str:
        """Hook: what `task_batching="auto"` means for a learner that can be batched."""
        return "support"

    def _add_metrics(self, *names: str) -> None:
        """For `__init__`: `keras.metrics.Mean` trackers, logged by `train_step`."""
        self._trackers.update({name: keras.metrics.Mean(name=name) for name in names})

    def _task_metrics(self, out: AdaptResult) -> dict:
        """Hook: `{name: (values, sample_weight or None)}` for the metrics a subclass added."""
        del out
        return {}

    # ----------------------------------------------------------------- public task seams

    @property
    def resolved_task_batching(self) -> str:
        """`task_batching` as resolved for this learner: "batched", "support" or "per_task"."""
        if self._batching_problems:
            return "per_task"
        return self._auto_task_batching() if self.task_batching == "auto" else self.task_batching

    @property
    def _batch_support(self) -> bool:
        return self.resolved_task_batching != "per_task"

    def meta_params(self, num_tasks) -> list:
        """`theta`, the learner's trainable weights, with a leading task axis."""
        return tasks_lib.meta_params(self.learner, num_tasks)

    def support_loss_fn(self, support_x, support_y, *, training: bool = False, task_offset=0):
        """`params -> [T]` support losses with the compiled loss (the inner loss closure)."""
        self._require_compiled("support_loss_fn")
        loss_fn = self._loss_fn(support_x, support_y, "support", training, task_offset)
        return lambda params: loss_fn(params)[0]

    def query_loss_fn(self, query_x, query_y, *, training: bool = False, task_offset=0):
        """`params -> ([T] query losses, query predictions)` with the compiled loss."""
        self._require_compiled("query_loss_fn")
        return self._loss_fn(query_x, query_y, "query", training, task_offset)

    def inner_solve(self, meta_params, support_loss_fn, *, training: bool = False):
        """The algorithm's adaptation of task-batched `meta_params`: an `InnerSolveResult`."""
        return self._inner_solve(meta_params, support_loss_fn, training=training)

    def meta_gradient(self, meta_params, support_loss_fn, query_loss_fn) -> AdaptResult:
        """The algorithm's adaptation and per-task meta-gradients: an `AdaptResult`."""
        return self._meta_gradient(meta_params, support_loss_fn, query_loss_fn)

    def _loss_fn(self, x, y, split: str, training: bool, task_offset):
        """`params -> ([T] losses, outputs)` of the learner on one split of an episode.

        In training, every random layer draws from a seed made of its own seed-generator
        state, the optimizer's iteration count, the task's index in the meta-batch and the
        split: each task of each meta-step has its own masks, the same at every inner step
        and Hessian-vector product of that task, so the support loss stays one function of
        the parameters, as the implicit function theorem needs.
        """
        x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        optimizer = getattr(self, "optimizer", None)
        iterations = optimizer.iterations if optimizer is not None else 0
        batched = self.resolved_task_batching == "batched" or (
            split == "support" and self._batch_support
        )
        scale = None if self._second_order else keras_glue.loss_scale(optimizer)

        def fn(params):
            dtype = params[0].dtype
            if scale is not None:
                # Loss scaling (mixed_float16, first-order algorithms only: through the
                # custom gradient second derivatives come out wrong): gradients flow through
                # the float16 layers scaled up and reach the float32 parameters scaled back,
                # so every gradient and linear solve outside sees true values.
                params = [keras_glue.scale_gradient(p, 1.0 / scale) for p in params]
            salt = tf.constant(0 if split == "support" else 1, tf.int64)
            out = tasks_lib.apply(
                self.learner,
                params,
                x,
                batched=batched,
                training=training or self._batch_statistics,
                seed_shift=tf.stack([salt, tf.cast(iterations, tf.int64)]),
                task_offset=task_offset,
            )
            if scale is not None:
                out = keras_glue.scale_gradient(out, scale)
            # In the parameters' dtype (float32 under a mixed policy): the losses, the
            # proximal term and the linear solve stay in float32.
            out = tf.cast(out, dtype)
            return tasks_lib.per_task_loss(self._task_loss, y, out), out

        return fn

    # ----------------------------------------------------------------- Keras steps

    def _run_tasks(self, episode: episode_checks.Episode, *, training: bool) -> AdaptResult:
        """The algorithm on every task, with the predictions before adaptation.

        `training` is true in `train_step` only: the learner then runs in training mode in
        the inner loop and on the query set; evaluation, prediction and `adapt` run it in
        inference mode throughout (no Dropout, no noise).
        """

        def task_fn(support_x, support_y, query_x, query_y, *, task_offset):
            theta = self.meta_params(tf.shape(support_x)[0])
            support_fn = self.support_loss_fn(
                support_x, support_y, training=training, task_offset=task_offset
            )
            query_fn = self.query_loss_fn(
                query_x, query_y, training=training, task_offset=task_offset
            )
            if training:
                result = self._meta_gradient(theta, support_fn, query_fn)
            else:
                inner = self._inner_solve(theta, support_fn, training=False)
                result = AdaptResult.without_gradients(inner, *query_fn(inner.adapted_params))
            query_loss_before, query_pred_before = query_fn(theta)
            return result._replace(
                min_curvature=tf.zeros_like(result.query_loss)
                if result.min_curvature is None
                else result.min_curvature,
                query_loss_before=query_loss_before,
                query_pred_before=query_pred_before,
            )

        return meta_batch.run_tasks(
            task_fn,
            episode,
            per_task=not self._batch_support,
            signature=AdaptResult.signature(self.learner),
        )

    def _episode(self, data) -> episode_checks.Episode:
        inputs, query_y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if query_y is None:
            raise ValueError("an episode must be ((support_x, support_y, query_x), query_y)")
        if sample_weight is not None:
            raise ValueError(
                "sample weights (sample_weight, or class_weight in fit) are not supported: "
                "weight tasks or classes in the episode sampler"
            )
        return self._check_episode(inputs, query_y)

    def _check_episode(self, inputs, query_y=None) -> episode_checks.Episode:
        dtype = self.learner.trainable_variables[0].dtype
        return episode_checks.check_episode(
            self.learner, inputs, query_y, loss=self._task_loss, dtype=dtype
        )

    def call(self, inputs, training=False):
        """Adapted predictions on the query set: `inputs = (support_x, support_y, query_x)`."""
        self._require_compiled("__call__")
        support_x, support_y, query_x, _ = self._check_episode(inputs)
        # Query labels are unknown here; zeros stand in for them (their loss is not used).
        dummy_y = tf.zeros(
            tf.concat([tf.shape(query_x)[:2], tf.shape(support_y)[2:]], 0), support_y.dtype
        )
        episode = (support_x, support_y, query_x, dummy_y)
        return self._run_tasks(episode, training=False).query_pred

    def train_step(self, data):
        episode = self._episode(data)
        out = self._run_tasks(episode, training=True)
        grad_sums, num_used = implicit.aggregate_tasks(
            out.meta_grads, out.fallback_grads, out.failed, on_failure=self.on_failure
        )
        loss_scaled = not self._second_order and keras_glue.loss_scale(self.optimizer) is not None
        grads, applied = keras_glue.apply_mean_gradient(
            self.optimizer,
            self.learner.trainable_variables,
            grad_sums,
            num_used,
            # Under loss scaling, a non-finite query gradient is an overflow (a failed
            # linear solve is not).
            overflow=~tf.reduce_all(tree.all_finite(out.fallback_grads)) if loss_scaled else None,
        )
        self.skipped_steps.update_state(1.0 - tf.cast(applied, tf.float32))
        num_tasks = tf.cast(tf.shape(out.failed)[0], out.query_loss.dtype)
        metrics = {
            "failed_fraction": tf.reduce_sum(tf.cast(out.failed, num_tasks.dtype)) / num_tasks,
            "meta_grad_norm": tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])),
        }
        for name, value in metrics.items():
            self._trackers[name].update_state(value)
        for name, (values, weight) in self._task_metrics(out).items():
            self._trackers[name].update_state(values, sample_weight=weight)
        logs = self._update_metrics(out, episode.query_y)
        logs.update({tracker.name: tracker.result() for tracker in self._trackers.values()})
        logs[self.skipped_steps.name] = self.skipped_steps.result()
        return keras_glue.multi_worker_logs(logs)

    def test_step(self, data):
        episode = self._episode(data)
        out = self._run_tasks(episode, training=False)
        return keras_glue.multi_worker_logs(self._update_metrics(out, episode.query_y))

    def predict_step(self, data):
        if isinstance(data, (tuple, list)) and len(data) in (1, 2):
            data = data[0]  # (x,) from Keras, or (x, query_y) from an episode dataset.
        return self(data, training=False)

    def _update_metrics(self, out: AdaptResult, query_y) -> dict:
        """The metrics of every step: the compiled ones and the adaptation's."""
        logs = self._update_compiled_metrics(
            query_y, out.query_pred, out.query_pred_before, out.query_loss
        )
        num_tasks = tf.shape(out.query_loss)[0]
        for name, value in (
            ("pre_adaptation_loss", out.query_loss_before),
            ("support_loss", out.inner.support_loss),
            ("inner_grad_norm", out.inner.grad_norm),
        ):
            self._trackers[name].update_state(tf.reduce_mean(value), sample_weight=num_tasks)
            logs[name] = self._trackers[name].result()
        return logs

    # ----------------------------------------------------------------- adaptation

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
        support_x, support_y, _, _ = self._check_episode((support_x, support_y, support_x))
        if support_x.shape[0] != 1:
            raise ValueError(f"adapt takes one task, got {support_x.shape[0]}")
        if getattr(self, "_adapt_function", None) is None:
            self._adapt_function = tf.function(
                lambda x, y: self._inner_solve(
                    self.meta_params(1), self.support_loss_fn(x, y), training=False
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
