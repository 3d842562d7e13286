"""Inner loops that are differentiated through: the MAML and Reptile baselines' adaptation.

`unrolled_gradient_descent` runs plain gradient descent on the support loss (no proximal
term) and, unlike `inner_solvers.minimize_proximal`, lets gradients flow from the adapted
parameters back to the initial ones through every step (Finn et al. 2017). Backpropagating
through it costs memory proportional to the number of steps: that is MAML's price, which
the implicit meta-gradient avoids.
"""

from __future__ import annotations

import tensorflow as tf

from tf_imaml import checks
from tf_imaml import hvp as hvp_lib
from tf_imaml import inner_solvers
from tf_imaml import tree


def unrolled_gradient_descent(
    loss_fn: hvp_lib.LossFn,
    init_params: tree.Params,
    *,
    num_steps,
    learning_rate: float,
    first_order: bool = False,
    name: str | None = None,
) -> inner_solvers.InnerSolveResult:
    """`phi_{k+1} = phi_k - learning_rate * grad L(phi_k)` from `phi_0 = init_params`.

    Under a tape, `d phi_K / d init_params = prod_k (I - learning_rate * H(phi_k))`
    (second-order MAML); with `first_order=True` the inner gradients are treated as constants,
    so that `d phi_K / d init_params = I` (first-order MAML).

    Args:
      loss_fn: Task-batched parameters -> per-task losses `[T]`.
      init_params: `theta`, task-batched.
      num_steps: Number of steps, a Python int or int32 tensor, `>= 0`.
      learning_rate: Step size, `> 0`.
      first_order: Stop gradients through the inner gradients. Default value: `False`.
      name: Name scope. Default value: `None` (`"unrolled_gradient_descent"`).

    Returns:
      An `InnerSolveResult` whose `objective` is the support loss (there is no proximal term)
      and `grad_norm` its gradient norm at the end.

    Raises:
      ValueError: If `num_steps < 0` or `learning_rate <= 0`.
    """
    checks.check_non_negative("num_steps", num_steps)
    checks.check_positive("learning_rate", learning_rate)
    with tf.name_scope(name or "unrolled_gradient_descent"):
        params = tree.convert(init_params)
        num_steps = tf.cast(num_steps, tf.int32)

        def step(i, params):
            _, grads = _value_and_grad(loss_fn, params, first_order=first_order)
            return i + 1, tree.axpy(-learning_rate, grads, params)

        _, params = tf.while_loop(lambda i, _: i < num_steps, step, (tf.constant(0), params))
        losses, grads = _value_and_grad(loss_fn, params, first_order=True)
        return inner_solvers.InnerSolveResult(params, num_steps, losses, losses, tree.norm(grads))


def _value_and_grad(loss_fn, params, *, first_order):
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses = loss_fn(params)
        total = tf.reduce_sum(losses)
    grads = tape.gradient(total, params, unconnected_gradients="zero")
    if first_order:
        grads = tree.map_structure(tf.stop_gradient, grads)
    return losses, grads
