"""MAML, first-order MAML and Reptile under the same Keras API as `ImplicitMAML`.

Same episodes, `fit`/`evaluate`/`predict`/`adapt`, metrics, TensorBoard, saving and
`tf.distribute` behaviour: all of it is `meta_model.MetaLearner`; these classes only say how
a task adapts and what its meta-gradient is.

- `MAML` (Finn et al. 2017): `inner_steps` of gradient descent on the support loss from
  `theta`; the meta-gradient backpropagates through the unrolled loop,
  `prod_k (I - alpha H(phi_k))^T grad L_query(phi_K)` (memory grows with `inner_steps`).
  `first_order=True` is first-order MAML: `grad L_query(phi_K)`.
- `Reptile` (Nichol et al. 2018): the same adaptation; the outer "gradient" handed to the
  compiled optimizer is `theta - phi_K`, averaged over tasks (so Adam works as in the paper).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_imaml import meta_model
from tf_imaml import tree
from tf_imaml import unrolled


class _GradientDescentAdaptation(meta_model.MetaLearner):
    """Adaptation by plain gradient descent on the support loss (no proximal term).

    Args:
      learner: A built Keras model; its trainable weights are `theta`.
      inner_steps: Inner gradient-descent steps. Default value: `5`.
      inner_learning_rate: Inner step size `alpha`. Default value: `0.4`.
      on_failure: See `MetaLearner`. Default value: `"drop"`.
      task_batching: See `MetaLearner`. Default value: `"auto"`.
      second_order: See `MetaLearner`. Default value: `False`.
      name: Model name. Default value: `None`.
    """

    def __init__(
        self,
        learner: keras.Model,
        *,
        inner_steps: int = 5,
        inner_learning_rate: float = 0.4,
        on_failure: str = "drop",
        task_batching: str = "auto",
        second_order: bool = False,
        name: str | None = None,
    ):
        super().__init__(
            learner,
            inner_steps=inner_steps,
            inner_learning_rate=inner_learning_rate,
            on_failure=on_failure,
            task_batching=task_batching,
            second_order=second_order,
            name=name,
        )

    def _adapt(self, theta, support_loss_fn, *, first_order: bool):
        return unrolled.unrolled_gradient_descent(
            support_loss_fn,
            theta,
            num_steps=self.inner_steps,
            learning_rate=self.inner_learning_rate,
            first_order=first_order,
        )

    def _inner_solve(self, theta, support_loss_fn, *, training=True):
        del training  # The same adaptation in training and at test time.
        return self._adapt(theta, support_loss_fn, first_order=True)


@keras.saving.register_keras_serializable(package="tf_imaml")
class MAML(_GradientDescentAdaptation):
    """MAML and first-order MAML as a `keras.Model`.

    Args:
      learner, inner_steps, inner_learning_rate, name: As for `Reptile`.
      first_order: First-order MAML (no backpropagation through the inner gradients).
        Default value: `False`.
      on_failure: See `MetaLearner`; a MAML task "fails" only with non-finite values.
        Default value: `"drop"`.
      task_batching: See `MetaLearner`; `"auto"` is `"per_task"` for second-order MAML.
        Default value: `"auto"`.
    """

    def __init__(
        self,
        learner: keras.Model,
        *,
        inner_steps: int = 5,
        inner_learning_rate: float = 0.4,
        first_order: bool = False,
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
            second_order=not first_order,
        )
        self.first_order = bool(first_order)

    def _auto_task_batching(self) -> str:
        # Second-order MAML through 32 tasks' unstacked convolutions fails in TF 2.21's
        # while-loop gradient (a TemporaryVariable of AddN goes missing; measured with
        # scripts/benchmark.py at meta-batch 32); task by task it works.
        return "support" if self.first_order else "per_task"

    def _meta_gradient(self, theta, support_loss_fn, query_loss_fn):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            inner = self._adapt(theta, support_loss_fn, first_order=self.first_order)
            query_loss, query_pred = query_loss_fn(inner.adapted_params)
            total = tf.reduce_sum(query_loss)
        meta_grads = tape.gradient(total, theta, unconnected_gradients="zero")
        return _result(inner, meta_grads, query_loss, query_pred)

    def get_config(self):
        return {**super().get_config(), "first_order": self.first_order}


@keras.saving.register_keras_serializable(package="tf_imaml")
class Reptile(_GradientDescentAdaptation):
    """Reptile as a `keras.Model`: outer gradient `theta - phi_K`, averaged over tasks.

    Args:
      learner: A built Keras model; its trainable weights are `theta`.
      inner_steps: Inner gradient-descent steps. Default value: `5`.
      inner_learning_rate: Inner step size. Default value: `0.4`.
      on_failure: See `MetaLearner`. Default value: `"drop"`.
      task_batching: See `MetaLearner`. Default value: `"auto"`.
      name: Model name. Default value: `None`.
    """

    def _meta_gradient(self, theta, support_loss_fn, query_loss_fn):
        inner = self._inner_solve(theta, support_loss_fn)
        phi = inner.adapted_params
        query_loss, query_pred = query_loss_fn(phi)
        return _result(inner, tree.sub(theta, phi), query_loss, query_pred)


def _result(inner, meta_grads, query_loss, query_pred):
    """An `AdaptResult` without a linear solve: a task fails only on non-finite values."""
    zeros = tf.zeros_like(query_loss)
    return meta_model.AdaptResult(
        meta_grads=meta_grads,
        fallback_grads=meta_grads,
        query_loss=query_loss,
        query_pred=query_pred,
        inner=inner,
        solver_residual=zeros,
        solver_iterations=zeros,
        failed=~tree.all_finite(meta_grads),
    )
