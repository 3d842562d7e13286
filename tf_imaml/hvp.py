"""Hessian-vector products of a task-batched loss.

A loss closure `loss_fn(params) -> [T]` returns one loss per task, task `t` depending on
slice `t` of every parameter tensor alone. The Hessian of `sum_t loss_t` is then block
diagonal, and one product with it gives every task's own `H_t v_t` at once.

Two ways to compute `H v` (both exact: they agree with a dense Hessian to rounding in
float64, `tests/test_hvp.py`, and each costs a few gradients):

- `"reverse_over_reverse"`: `d/dparams <grad loss(params), v>` with nested tapes.
- `"forward_over_reverse"`: a `tf.autodiff.ForwardAccumulator` (directional derivative
  along `v`) around the tape that computes the gradient.
- `"linearized"`: reverse over reverse, with the gradient computed once under a persistent
  tape (`linearize`); each product then only runs the second backward pass,
  `tape.gradient(grad, params, output_gradients=v)`. For many products at one point (the
  conjugate-gradient iterations of iMAML) this saves a forward and a backward pass each.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tf_imaml import checks
from tf_imaml import tree

LossFn = Callable[[tree.Params], tf.Tensor]
HVP_MODES = ("reverse_over_reverse", "forward_over_reverse", "linearized")


def value_and_grad(loss_fn: LossFn, params: tree.Params) -> tuple[tf.Tensor, tree.Params]:
    """Per-task losses `[T]` and their gradients (one per task, by summing over tasks)."""
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses = loss_fn(params)
        total = tf.reduce_sum(losses)
    grads = tape.gradient(total, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return losses, grads


def hvp(
    loss_fn: LossFn,
    params: tree.Params,
    vector: tree.Params,
    *,
    mode: str = "reverse_over_reverse",
    name: str | None = None,
) -> tree.Params:
    """Hessian-vector product `H(params) @ vector`, per task.

    Args:
      loss_fn: Maps a task-batched parameter structure to per-task losses, shape `[T]`.
      params: Where the Hessian is taken; a structure of `[T, ...]` tensors.
      vector: A structure like `params`.
      mode: `"reverse_over_reverse"` or `"forward_over_reverse"`.
        Default value: `"reverse_over_reverse"`.
      name: Name scope. Default value: `None` (`"hvp"`).

    Returns:
      A structure like `params` holding `H_t v_t` for every task `t`.

    Raises:
      ValueError: If `vector` does not match `params`, or `mode` is unknown.
    """
    checks.check_choice("mode", mode, HVP_MODES)
    tree.assert_same_structure(params, vector, what="params and vector")
    if mode == "linearized":
        return linearize(loss_fn, params, name=name)(vector)
    with tf.name_scope(name or "hvp"):
        params = tree.convert(params)
        vector = tree.map_structure(tf.stop_gradient, tree.convert(vector))
        if mode == "reverse_over_reverse":
            with tf.GradientTape() as outer:
                outer.watch(params)
                _, grads = value_and_grad(loss_fn, params)
                grad_dot_v = tf.reduce_sum(tree.vdot(grads, vector))
            return outer.gradient(
                grad_dot_v, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
        with tf.autodiff.ForwardAccumulator(params, vector) as acc:
            _, grads = value_and_grad(loss_fn, params)
        return acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def linearize(
    loss_fn: LossFn, params: tree.Params, *, name: str | None = None
) -> Callable[[tree.Params], tree.Params]:
    """`v -> H(params) v` for many `v`, with the gradient at `params` computed once.

    The gradient is recorded on a persistent tape; each product differentiates it again
    along `v` (`output_gradients=v`), which is `J_grad^T v = H v` since the Hessian is
    symmetric. The returned function may be called inside a `tf.while_loop` body.

    Args:
      loss_fn: Maps a task-batched parameter structure to per-task losses, shape `[T]`.
      params: Where the Hessian is taken; a structure of `[T, ...]` tensors.
      name: Name scope. Default value: `None` (`"linearize"`).

    Returns:
      A function from a structure like `params` to `H_t v_t` for every task `t`.
    """
    with tf.name_scope(name or "linearize"):
        params = tree.convert(params)
        tape = tf.GradientTape(persistent=True)
        with tape:
            tape.watch(params)
            _, grads = value_and_grad(loss_fn, params)

    def hvp_fn(vector):
        tree.assert_same_structure(params, vector, what="params and vector")
        vector = tree.map_structure(tf.stop_gradient, tree.convert(vector))
        return tape.gradient(
            grads,
            params,
            output_gradients=vector,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    return hvp_fn


def make_proximal_matvec(
    loss_fn: LossFn,
    params: tree.Params,
    *,
    lam,
    damping=0.0,
    mode: str = "reverse_over_reverse",
) -> Callable[[tree.Params], tree.Params]:
    """The matrix of iMAML's linear system as a function: `v -> (1 + damping) v + H v / lam`.

    With `damping = 0` this is `(I + H/lam)`, whose inverse maps the query gradient at the
    adapted parameters to the implicit meta-gradient (Rajeswaran et al. 2019, eq. 6).
    `damping > 0` adds `damping * I`: the system stays positive definite when `H` has
    eigenvalues down to `-lam (1 + damping)`, at the price of a gradient biased towards a
    scaled first-order one (the authors' code uses such a term).

    Args:
      loss_fn: The support loss, per task.
      params: The adapted parameters `phi`, task-batched.
      lam: The proximal strength `lambda > 0` (scalar).
      damping: Non-negative shift of the identity term. Default value: `0.0`.
      mode: How to form `H v`; see `hvp`. Default value: `"reverse_over_reverse"`.

    Returns:
      A function from a structure like `params` to one like it.
    """
    checks.check_positive("lam", lam)
    checks.check_non_negative("damping", damping)
    checks.check_choice("mode", mode, HVP_MODES)
    if mode == "linearized":
        hvp_fn = linearize(loss_fn, params)
    else:
        hvp_fn = lambda v: hvp(loss_fn, params, v, mode=mode)  # noqa: E731

    def matvec(v):
        hv = hvp_fn(v)
        return tree.map_structure(
            lambda x, y: (1.0 + tree.cast(damping, x.dtype)) * x + y / tree.cast(lam, x.dtype),
            v,
            hv,
        )

    return matvec
