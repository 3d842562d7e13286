"""Extreme eigenvalues of a task-batched symmetric operator, by the Lanczos method.

iMAML's linear system `(I + H_t/lam) g_t = v_t` is symmetric positive definite only when
the support-loss Hessian `H_t` at the adapted parameters has no eigenvalue below `-lam`
(Rajeswaran et al. 2019, Lemma 1 and Theorem 1 assume it). `lanczos_extreme_eigenvalues`
estimates the smallest and largest eigenvalues of any symmetric operator given as a matvec
over parameter structures; `proximal_curvature` applies it to `I + H/lam`.

Lanczos (Lanczos 1950; Golub & Van Loan, "Matrix Computations", 4th ed., section 10.1)
builds an orthonormal basis `Q = [q_1 .. q_m]` of the Krylov space of a start vector and the
tridiagonal `T_m = Q^T A Q`; the eigenvalues of `T_m` (Ritz values) approximate `A`'s
extreme eigenvalues from the inside, fast when they are separated from the rest. Here every
new vector is orthogonalised against the whole basis, twice ("full reorthogonalisation"), so
`Q` stays orthonormal to rounding error and `T_m` is `Q^T A Q` itself. Cauchy interlacing
then gives, for every `m`,

    lambda_min(A) <= min Ritz value   and   max Ritz value <= lambda_max(A),

so a negative `min_eigenvalue` certifies (up to rounding) that `A` is indefinite, while a
positive one is an upper bound, not a proof of definiteness. When the Krylov space is
exhausted (an invariant subspace, or `m` equal to the dimension), the basis is continued with
a fresh random vector orthogonal to it (and a zero off-diagonal), which keeps `T_m = Q^T A Q`;
with `m` equal to the dimension the Ritz values are all of `A`'s eigenvalues.

Every task runs its own Lanczos process in the same loop; the matvec must act on each
task's slice separately, as the Hessian-vector products of `tf_imaml.hvp` do. The basis is
held as a `[T, m, N]` tensor: for the Omniglot conv net (N = 112,965), 8 tasks and 20
iterations that is 72 MB in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from tf_imaml import hvp as hvp_lib
from tf_imaml import tree
from tf_imaml.linear_solve import MatvecFn


class LanczosResult(NamedTuple):
    """Lanczos estimates of the extreme eigenvalues, per task."""

    min_eigenvalue: tf.Tensor  # [T] smallest Ritz value: an upper bound on lambda_min.
    max_eigenvalue: tf.Tensor  # [T] largest Ritz value: a lower bound on lambda_max.
    ritz_values: tf.Tensor  # [T, m] all Ritz values, ascending.
    num_iterations: tf.Tensor  # int32 scalar: m, the size of the tridiagonal matrix.


def lanczos_extreme_eigenvalues(
    matvec_fn: MatvecFn,
    like: tree.Params,
    *,
    num_iter: int,
    seed: int = 0,
    name: str | None = None,
) -> LanczosResult:
    """Estimates the extreme eigenvalues of a symmetric operator for every task.

    Args:
      matvec_fn: Maps a task-batched structure like `like` to `A_t v_t` for every task;
        `A_t` must be symmetric.
      like: A task-batched structure giving the shapes and dtype (its values are unused).
      num_iter: Lanczos iterations `m >= 1` (matvecs per task); capped at the dimension `N`
        of one task's parameters. A Python int.
      seed: Seed of the random start vectors (a stateless normal draw: the same seed gives
        the same estimate). Default value: `0`.
      name: Name scope. Default value: `None` (`"lanczos_extreme_eigenvalues"`).

    Returns:
      A `LanczosResult`.

    Raises:
      ValueError: If `num_iter` is not an int `>= 1`.
    """
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be an int >= 1, got {num_iter!r}")
    with tf.name_scope(name or "lanczos_extreme_eigenvalues"):
        like = tree.convert(like)
        flat_like = tree.flatten_tasks(like)
        dtype = flat_like.dtype
        dim = int(flat_like.shape[1])
        num_iter = min(num_iter, dim)
        num_tasks = tf.shape(flat_like)[0]
        eps = tf.constant(tf.experimental.numpy.finfo(dtype.as_numpy_dtype).eps, dtype)

        def matvec(q):
            return tree.flatten_tasks(matvec_fn(tree.unflatten_tasks(q, like)))

        def orthogonalize(w, basis):
            # Twice is enough (Kahan, Parlett): a second pass restores orthogonality to
            # rounding error even when the first cancelled most of w.
            for _ in range(2):
                w = w - tf.einsum("tm,tmn->tn", tf.einsum("tmn,tn->tm", basis, w), basis)
            return w

        def random_unit(index, basis):
            r = tf.random.stateless_normal(
                tf.stack([num_tasks, dim]), seed=tf.stack([seed, index]), dtype=dtype
            )
            r = orthogonalize(r, basis)
            return r / tf.norm(r, axis=1, keepdims=True)

        def put(basis, j, q):
            one_hot = tf.one_hot(j, num_iter, dtype=dtype)
            return basis + one_hot[tf.newaxis, :, tf.newaxis] * q[:, tf.newaxis, :]

        basis = tf.zeros(tf.stack([num_tasks, num_iter, dim]), dtype)
        q = random_unit(0, basis)
        basis = put(basis, 0, q)
        alphas = tf.TensorArray(dtype, size=num_iter)
        betas = tf.TensorArray(dtype, size=num_iter)

        def body(j, q, basis, alphas, betas, scale):
            w = matvec(q)
            alpha = tf.reduce_sum(q * w, axis=1)
            w = orthogonalize(w, basis)
            beta = tf.norm(w, axis=1)
            scale = tf.maximum(scale, tf.maximum(tf.abs(alpha), beta))
            # Breakdown (an invariant subspace): continue with a random orthogonal vector.
            restart = beta <= tf.sqrt(eps) * scale
            fresh = random_unit(j + 1, basis)
            q_next = tf.where(
                restart[:, tf.newaxis],
                fresh,
                w / tf.where(restart, tf.ones_like(beta), beta)[:, tf.newaxis],
            )
            beta = tf.where(restart, tf.zeros_like(beta), beta)
            basis = tf.cond(j + 1 < num_iter, lambda: put(basis, j + 1, q_next), lambda: basis)
            return j + 1, q_next, basis, alphas.write(j, alpha), betas.write(j, beta), scale

        _, _, _, alphas, betas, _ = tf.while_loop(
            lambda j, *_: j < num_iter,
            body,
            (tf.constant(0), q, basis, alphas, betas, tf.zeros([num_tasks], dtype)),
        )
        alpha = tf.transpose(alphas.stack())  # [T, m]
        beta = tf.transpose(betas.stack())[:, : num_iter - 1]  # [T, m - 1]
        ritz = tf.map_fn(
            lambda ab: tf.linalg.eigh_tridiagonal(ab[0], ab[1], eigvals_only=True),
            (alpha, beta),
            fn_output_signature=tf.TensorSpec([num_iter], dtype),
        )
        return LanczosResult(ritz[:, 0], ritz[:, -1], ritz, tf.constant(num_iter))


def proximal_curvature(
    support_loss_fn: hvp_lib.LossFn,
    adapted_params: tree.Params,
    *,
    lam,
    num_iter: int = 20,
    damping=0.0,
    seed: int = 0,
    hvp_mode: str = "linearized",
    name: str | None = None,
) -> LanczosResult:
    """Lanczos estimates of the extreme eigenvalues of `(1 + damping) I + H_t / lam`.

    `H_t` is the support-loss Hessian of task `t` at `adapted_params` (`phi`). The matrix is
    the one iMAML's conjugate gradient inverts (`hvp.make_proximal_matvec`): a negative
    `min_eigenvalue` means it is indefinite for that task and CG's answer is meaningless.
    Its eigenvalues are `1 + damping + mu / lam` for the Hessian's eigenvalues `mu`.

    Args:
      support_loss_fn: Task-batched parameters -> per-task support losses `[T]`.
      adapted_params: `phi`, task-batched.
      lam: Proximal strength `> 0`.
      num_iter: Lanczos iterations (Hessian-vector products per task). Default value: `20`.
      damping: Non-negative extra identity term. Default value: `0.0`.
      seed: Seed of the start vectors. Default value: `0`.
      hvp_mode: See `tf_imaml.hvp`. Default value: `"linearized"` (the support gradient is
        recorded once; each iteration costs one more backward pass).
      name: Name scope. Default value: `None` (`"proximal_curvature"`).

    Returns:
      A `LanczosResult`.
    """
    with tf.name_scope(name or "proximal_curvature"):
        adapted_params = tree.map_structure(tf.stop_gradient, tree.convert(adapted_params))
        matvec_fn = hvp_lib.make_proximal_matvec(
            support_loss_fn, adapted_params, lam=lam, damping=damping, mode=hvp_mode
        )
        return lanczos_extreme_eigenvalues(matvec_fn, adapted_params, num_iter=num_iter, seed=seed)
