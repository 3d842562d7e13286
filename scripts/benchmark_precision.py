"""Dtype policies compared: each policy's meta-gradient against float32's.

A worker under a dtype policy reads the meta-gradient of one step from the seed-0 weights
(`read_meta_gradient`, for the meta-batch and for each task alone) and saves it beside the
episodes; the parent then compares every policy's with float32's
(`add_meta_gradient_errors`).
"""

from __future__ import annotations

import hashlib
import pathlib

import benchmark_config
import numpy as np


def meta_gradient_file(config: benchmark_config.Config) -> pathlib.Path:
    """Where the worker of a dtype policy leaves its meta-gradients, next to the episodes."""
    name = f"meta_grad_{config.policy}_onednn{config.onednn}.npz"
    return pathlib.Path(config.episodes).parent / name


def read_meta_gradient(config: benchmark_config.Config, episode) -> dict:
    """The meta-gradient of one step from the seed-0 weights, read off `SGD(1.0)` steps.

    With the public API, as `tests/test_keras_conformance.py` reads it: `theta - theta'`
    after `train_on_batch` on a fresh model built under the process's dtype policy, with
    `theta` restored before each step. Read for the whole meta-batch (the meta-step's
    gradient: the mean over the tasks whose solve did not fail) and for each task alone
    (its gradient and whether its solve failed), so that policies can be compared on the
    tasks solved under both. The single tasks go through a second model (given the same
    `theta`), whose step is traced for one task, as a one-task step is on its own: the
    first model's step, retraced with its task axis relaxed, would compute in another
    order, which under a low-precision policy can decide whether a task's solve fails.
    The difference is taken in float64: its only error is the rounding of the float32
    `theta'`, at most `2**-24 * |theta'|` per weight, which `readoff_bound` states relative
    to the meta-step gradient's norm. Saves the vectors to `meta_gradient_file(config)`.
    """
    import keras

    def build():
        return benchmark_config.build(config, optimizer=keras.optimizers.SGD(learning_rate=1.0))

    meta = build()
    initial = [v.numpy() for v in meta.learner.trainable_variables]
    theta = np.concatenate([np.ravel(w) for w in initial]).astype(np.float64)

    def read_step(model, inputs, labels):
        variables = model.learner.trainable_variables
        for variable, value in zip(variables, initial, strict=True):
            variable.assign(value)
        logs = model.train_on_batch(inputs, labels, return_dict=True)
        after = np.concatenate([np.ravel(v.numpy()) for v in variables]).astype(np.float64)
        return theta - after, after, float(logs.get("failed_fraction", 0.0))

    (support_x, support_y, query_x), query_y = episode
    grad, after, failed_fraction = read_step(meta, (support_x, support_y, query_x), query_y)
    one_task_meta = build()
    task_grads, task_failed = [], []
    for t in range(int(query_y.shape[0])):
        one = slice(t, t + 1)
        g, _, failed = read_step(
            one_task_meta, (support_x[one], support_y[one], query_x[one]), query_y[one]
        )
        task_grads.append(g)
        task_failed.append(failed > 0)
    task_grads, task_failed = np.stack(task_grads), np.array(task_failed)
    np.savez(
        meta_gradient_file(config), meta_grad=grad, task_grads=task_grads, task_failed=task_failed
    )
    norm = float(np.linalg.norm(grad))
    # The meta-step's gradient rebuilt from the tasks alone: the mean over the solved ones.
    rebuilt = task_grads[~task_failed].mean(axis=0) if (~task_failed).any() else 0.0 * grad
    return {
        "compute_dtype": meta.learner.dtype_policy.compute_dtype,
        "variable_dtype": str(meta.learner.trainable_variables[0].dtype),
        "initial_weights_sha1": hashlib.sha1(theta.tobytes()).hexdigest(),
        "meta_grad_norm": norm,
        # None when every task's solve failed (the step was skipped: no gradient to read).
        "readoff_bound": float(2.0**-24 * np.linalg.norm(after) / norm) if norm else None,
        "meta_grad_failed_fraction": failed_fraction,
        "failed_tasks": [int(t) for t in np.flatnonzero(task_failed)],
        "rebuilt_from_tasks_error": (
            float(np.linalg.norm(rebuilt - grad) / norm) if norm else None
        ),
    }


def add_meta_gradient_errors(rows: list[dict]) -> None:
    """Each dtype-policy row's meta-gradient errors against float32's, in place.

    All relative L2 errors `||g - g_float32|| / ||g_float32||`, with both gradients read
    off from the same weights and episode (`read_meta_gradient`):

    - `meta_grad_error_vs_float32`: the meta-step's gradient, as the library takes it (the
      mean over the tasks whose solve did not fail, which can differ between policies);
    - `common_tasks_error_vs_float32`: the mean over the `solved_in_both` tasks solved under
      both policies, each task's gradient read alone: free of the tasks that one policy
      drops and the other keeps;
    - `median_task_error_vs_float32`: the median over those tasks of each task's error;
    - `failure_flips_vs_float32`: tasks whose solve failed under one policy only.

    `None` where either run failed or float32's gradient is zero (every solve failed).
    """
    section = [r for r in rows if r["sweep"] == "precision"]
    reference = next(
        (
            meta_gradient_file(benchmark_config.Config(**r["config"]))
            for r in section
            if (r["config"]["policy"], r["config"]["onednn"]) == ("float32", "1")
        ),
        None,
    )
    want = dict(np.load(reference)) if reference and reference.exists() else None
    for row in section:
        path = meta_gradient_file(benchmark_config.Config(**row["config"]))
        errors = dict.fromkeys(
            (
                "meta_grad_error_vs_float32",
                "common_tasks_error_vs_float32",
                "median_task_error_vs_float32",
                "solved_in_both",
                "failure_flips_vs_float32",
            )
        )
        if want is not None and "error" not in row["result"] and path.exists():
            got = dict(np.load(path))
            both = ~got["task_failed"] & ~want["task_failed"]
            errors["solved_in_both"] = int(both.sum())
            errors["failure_flips_vs_float32"] = int(
                (got["task_failed"] != want["task_failed"]).sum()
            )
            errors["meta_grad_error_vs_float32"] = relative_error(
                got["meta_grad"], want["meta_grad"]
            )
            if both.any():
                errors["common_tasks_error_vs_float32"] = relative_error(
                    got["task_grads"][both].sum(axis=0), want["task_grads"][both].sum(axis=0)
                )
                per_task = [
                    relative_error(g, w)
                    for g, w in zip(got["task_grads"][both], want["task_grads"][both], strict=True)
                ]
                errors["median_task_error_vs_float32"] = float(np.median(per_task))
        row.update(errors)


def relative_error(got: np.ndarray, want: np.ndarray) -> float | None:
    """`||got - want|| / ||want||`, or None where `want` is zero."""
    norm = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / norm) if norm > 0 else None
