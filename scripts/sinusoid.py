"""iMAML on sinusoid regression (Finn et al. 2017) through the Keras API.

Meta-trains `tf_imaml.ImplicitMAML` around a 1-40-40-1 ReLU network on K-shot sinusoid
tasks, then evaluates held-out tasks: query MSE before adaptation (the meta-learned
initialisation alone) and after adaptation on each task's support set.

Usage:
  python scripts/sinusoid.py [--meta_steps=2000] [--shots=5] [--logdir=runs/sinusoid]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import tf_imaml  # noqa: E402

flags.DEFINE_integer("meta_steps", 2000, "Meta-training steps.", lower_bound=1)
flags.DEFINE_integer("shots", 5, "Support examples per task.", lower_bound=1)
flags.DEFINE_integer("queries", 10, "Query examples per task.", lower_bound=1)
flags.DEFINE_integer("meta_batch_size", 10, "Tasks per meta-step.", lower_bound=1)
flags.DEFINE_integer("inner_steps", 10, "Inner GD steps.", lower_bound=0)
flags.DEFINE_float("inner_learning_rate", 0.01, "Inner GD step size.", lower_bound=0)
flags.DEFINE_float("lam", 1.0, "Proximal strength lambda.", lower_bound=0)
flags.DEFINE_integer("cg_steps", 5, "Conjugate-gradient steps.", lower_bound=0)
flags.DEFINE_enum(
    "on_failure",
    "first_order",
    ["drop", "first_order", "zero"],
    "What a task whose linear solve failed contributes (see tf_imaml.meta_model).",
)
flags.DEFINE_float("outer_learning_rate", 1e-3, "Adam step size.", lower_bound=0)
flags.DEFINE_integer("eval_tasks", 600, "Held-out tasks to evaluate.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for weights and tasks.")
flags.DEFINE_string("logdir", None, "TensorBoard and results folder (optional).")


@dataclasses.dataclass(frozen=True)
class SinusoidConfig:
    meta_steps: int = 2000
    shots: int = 5
    queries: int = 10
    meta_batch_size: int = 10
    inner_steps: int = 10
    inner_learning_rate: float = 0.01
    lam: float = 1.0
    cg_steps: int = 5
    on_failure: str = "first_order"
    outer_learning_rate: float = 1e-3
    eval_tasks: int = 600
    seed: int = 0
    log_dir: str | None = None


def train(config: SinusoidConfig, *, verbose: int = 2) -> dict:
    """Meta-trains and evaluates; returns the held-out query MSE before/after adaptation."""
    keras.utils.set_random_seed(config.seed)
    learner = tf_imaml.models.mlp_regressor((40, 40))
    meta = tf_imaml.ImplicitMAML(
        learner,
        lam=config.lam,
        inner_steps=config.inner_steps,
        inner_learning_rate=config.inner_learning_rate,
        cg_steps=config.cg_steps,
        on_failure=config.on_failure,
    )
    meta.compile(optimizer=keras.optimizers.Adam(config.outer_learning_rate), loss="mse")
    episodes = dict(shots=config.shots, queries=config.queries)
    train_data = tf_imaml.episodes.sinusoid_episodes(
        **episodes, meta_batch_size=config.meta_batch_size, seed=config.seed
    )
    eval_batch = 50 if config.eval_tasks % 50 == 0 else 1
    test_data = tf_imaml.episodes.sinusoid_episodes(
        **episodes,
        meta_batch_size=eval_batch,
        seed=config.seed + 10_000,
        num_batches=config.eval_tasks // eval_batch,
    )
    epochs = min(10, config.meta_steps)
    callbacks = []
    if config.log_dir:
        # update_freq must divide the steps per epoch, or Keras 3.15 drops the epoch scalars.
        freq = math.gcd(50, config.meta_steps // epochs)
        callbacks.append(keras.callbacks.TensorBoard(config.log_dir, update_freq=freq))
    start = time.time()
    meta.fit(
        train_data,
        epochs=epochs,
        steps_per_epoch=config.meta_steps // epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    seconds = time.time() - start
    logs = meta.evaluate(test_data, verbose=0, return_dict=True)
    result = {
        "query_mse_before_adaptation": float(logs["pre_adaptation_loss"]),
        "query_mse_after_adaptation": float(logs["loss"]),
        "meta_steps": (config.meta_steps // epochs) * epochs,
        "train_seconds": round(seconds, 1),
        "config": dataclasses.asdict(config),
    }
    if config.log_dir:
        with open(os.path.join(config.log_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv):
    config = common.config_from_flags(argv, SinusoidConfig, flag_names={"log_dir": "logdir"})
    if config.lam <= 0 or config.inner_learning_rate <= 0 or config.outer_learning_rate <= 0:
        raise app.UsageError("--lam, --inner_learning_rate and --outer_learning_rate must be > 0")
    result = train(config)
    print(
        f"{config.shots}-shot sinusoid, {config.eval_tasks} held-out tasks: query MSE "
        f"{result['query_mse_before_adaptation']:.3f} before adaptation, "
        f"{result['query_mse_after_adaptation']:.3f} after "
        f"({result['meta_steps']} meta-steps, {result['train_seconds']:.0f} s)"
    )


if __name__ == "__main__":
    app.run(main)
