"""Small meta-learning problems with known answers, task-batched.

Oracles for tests, the demo and the gradient-accuracy studies:

- Ridge regression tasks. With support loss `L_t(phi) = ||X_t phi - y_t||^2 / n`, its Hessian
  is `H_t = 2 X_t^T X_t / n`, the proximal solution is closed form,
  `phi_t* = (H_t + lam I)^-1 (2 X_t^T y_t / n + lam theta)`, and so is its Jacobian,
  `d phi_t*/d theta = lam (H_t + lam I)^-1`.
- A one-hidden-layer tanh network (smooth, so finite differences mean something).
- The ridge tasks as a Keras episode for a linear Keras learner (`linear_learner`,
  `ridge_episode`), for tests of the meta-learners against the closed forms.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tf_imaml import tree


class RegressionTasks(NamedTuple):
    """A meta-batch of regression tasks; arrays have a leading task axis `T`."""

    support_x: tf.Tensor  # [T, n_support, d]
    support_y: tf.Tensor  # [T, n_support]
    query_x: tf.Tensor  # [T, n_query, d]
    query_y: tf.Tensor  # [T, n_query]


def linear_tasks(
    *,
    num_tasks: int,
    num_support: int,
    num_query: int,
    dim: int,
    noise: float = 0.1,
    seed: int = 0,
    dtype=tf.float64,
) -> RegressionTasks:
    """Tasks `y = x . w_t + noise`, `w_t ~ N(1, I)`, `x ~ N(0, I)`, seeded."""
    rng = np.random.default_rng(seed)
    w = 1.0 + rng.normal(size=(num_tasks, dim))

    def draw(n):
        x = rng.normal(size=(num_tasks, n, dim))
        y = np.einsum("tnd,td->tn", x, w) + noise * rng.normal(size=(num_tasks, n))
        return tf.constant(x, dtype), tf.constant(y, dtype)

    return RegressionTasks(*draw(num_support), *draw(num_query))


def ridge_loss_fn(x: tf.Tensor, y: tf.Tensor):
    """Per-task loss `||X_t phi_t - y_t||^2 / n` of parameters `[phi]`, `phi` shaped `[T, d]`."""

    def loss_fn(params):
        (phi,) = params
        residual = tf.einsum("tnd,td->tn", x, phi) - y
        return tf.reduce_mean(tf.square(residual), axis=1)

    return loss_fn


def linear_learner(dim: int, *, seed: int = 0) -> keras.Model:
    """A float64 Keras `Dense(1, use_bias=False)` on `dim` inputs: `phi` is its `[dim, 1]` kernel."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((dim,), dtype="float64"),
            keras.layers.Dense(1, use_bias=False, dtype="float64"),
        ]
    )


def ridge_episode(*, dim: int, seed: int = 0, num_tasks: int = 3):
    """`(tasks, episode)`: `linear_tasks` (5 support, 7 query examples) and the same data as a
    Keras episode `((support_x, support_y, query_x), query_y)`, targets `[T, n, 1]`."""
    tasks = linear_tasks(num_tasks=num_tasks, num_support=5, num_query=7, dim=dim, seed=seed)
    episode = (
        (tasks.support_x, tasks.support_y[..., None], tasks.query_x),
        tasks.query_y[..., None],
    )
    return tasks, episode


def ridge_hessian(x: tf.Tensor) -> np.ndarray:
    """`H_t = 2 X_t^T X_t / n`, shape `[T, d, d]`."""
    x = np.asarray(x)
    return 2.0 * np.einsum("tnd,tne->tde", x, x) / x.shape[1]


def ridge_proximal_solution(x, y, theta, lam) -> np.ndarray:
    """The exact minimiser of `||X phi - y||^2/n + lam/2 ||phi - theta||^2`, per task."""
    x, y, theta = np.asarray(x), np.asarray(y), np.asarray(theta)
    h = ridge_hessian(x)
    rhs = 2.0 * np.einsum("tnd,tn->td", x, y) / x.shape[1] + lam * theta
    return np.linalg.solve(h + lam * np.eye(h.shape[-1]), rhs[..., None])[..., 0]


def ridge_meta_gradient(tasks: RegressionTasks, theta, lam) -> np.ndarray:
    """Exact `d/d theta L_query(phi*(theta))`, per task: `lam (H + lam I)^-1 grad L_query`."""
    phi = ridge_proximal_solution(tasks.support_x, tasks.support_y, theta, lam)
    qx, qy = np.asarray(tasks.query_x), np.asarray(tasks.query_y)
    query_grad = 2.0 * np.einsum("tnd,tn->td", qx, np.einsum("tnd,td->tn", qx, phi) - qy)
    query_grad /= qx.shape[1]
    h = ridge_hessian(tasks.support_x)
    return lam * np.linalg.solve(h + lam * np.eye(h.shape[-1]), query_grad[..., None])[..., 0]


def dense_hessians(loss_fn, params) -> np.ndarray:
    """Per-task dense Hessians `[T, N, N]` of a task-batched loss, by `tape.jacobian` of its
    gradient: the oracle for Hessian-vector products."""
    flat = tree.flatten_tasks(params)
    hessians = []
    for t in range(flat.shape[0]):
        x = tf.Variable(flat[t])
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                full = tf.tensor_scatter_nd_update(flat, [[t]], x[tf.newaxis])
                loss = loss_fn(tree.unflatten_tasks(full, params))[t]
            grad = inner.gradient(loss, x)
        hessians.append(outer.jacobian(grad, x).numpy())
    return np.stack(hessians)


def tanh_mlp_init(*, num_tasks: int, dim: int, hidden: int, seed: int = 0, dtype=tf.float64):
    """Parameters `[w1, b1, w2, b2]` of a `dim -> hidden (tanh) -> 1` network, one copy per task."""
    rng = np.random.default_rng(seed)
    shapes = [(dim, hidden), (hidden,), (hidden, 1), (1,)]
    params = [rng.normal(size=s) / np.sqrt(max(s[0], 1)) for s in shapes]
    return tree.broadcast_to_tasks([tf.constant(p, dtype) for p in params], num_tasks)


def tanh_mlp_apply(params, x: tf.Tensor) -> tf.Tensor:
    """Outputs `[T, n]` of the task-batched tanh network on inputs `[T, n, dim]`."""
    w1, b1, w2, b2 = params
    hidden = tf.tanh(tf.einsum("tnd,tdh->tnh", x, w1) + b1[:, tf.newaxis])
    return tf.einsum("tnh,tho->tno", hidden, w2)[..., 0] + b2


def tanh_mlp_loss_fn(x: tf.Tensor, y: tf.Tensor):
    """Per-task mean squared error of the tanh network, as a loss closure."""

    def loss_fn(params):
        return tf.reduce_mean(tf.square(tanh_mlp_apply(params, x) - y), axis=1)

    return loss_fn


def sinusoid_tasks(
    *,
    num_tasks: int,
    num_support: int,
    num_query: int,
    seed: int = 0,
    dtype=tf.float32,
) -> RegressionTasks:
    """Sinusoid regression tasks of Finn et al. (2017), seeded.

    `y = A sin(x - phase)` with amplitude `A ~ U[0.1, 5]`, phase `~ U[0, pi]`, and
    `x ~ U[-5, 5]`; inputs have a trailing feature axis of size 1.
    """
    rng = np.random.default_rng(seed)
    amplitude = rng.uniform(0.1, 5.0, size=(num_tasks, 1))
    phase = rng.uniform(0.0, np.pi, size=(num_tasks, 1))

    def draw(n):
        x = rng.uniform(-5.0, 5.0, size=(num_tasks, n))
        y = amplitude * np.sin(x - phase)
        return tf.constant(x[..., None], dtype), tf.constant(y, dtype)

    return RegressionTasks(*draw(num_support), *draw(num_query))
