"""What scripts/benchmark.py measures: one configuration, and the meta-model it builds.

`Config` names one measured configuration (algorithm, K, meta-batch, CG steps, task
batching, net size, dtype policy, oneDNN); `build` makes its seed-0 meta-model, with the inner
settings of scripts/train.py's runs on Omniglot (study 7's on mini-ImageNet).
"""

from __future__ import annotations

import dataclasses

ALGORITHMS = ("imaml_gd", "imaml_momentum", "imaml_adam", "imaml_hf", "maml", "fomaml")
TASK_BATCHING = ("per_task", "support", "batched")
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration."""

    algorithm: str
    inner_steps: int
    meta_batch_size: int
    cg_steps: int = 5
    task_batching: str = "auto"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    filters: int = 64
    image_size: int = 28
    repeats: int = 5
    warmup: int = 2
    episodes: str = ""
    split: bool = False  # Also time the inner loop, query gradient and solve apart.
    onednn: str = ""  # TF_ENABLE_ONEDNN_OPTS for the worker: "0", "1" or "" (inherited).
    dataset: str = "omniglot"
    data_dir: str | None = None  # mini-ImageNet only
    policy: str = ""  # Keras dtype policy of the worker; set, it also reads the meta-gradient.


def is_mini_imagenet(config: Config) -> bool:
    """Whether the configuration times the mini-ImageNet net (else the Omniglot one)."""
    return config.dataset == "mini_imagenet"


def build(config: Config, *, optimizer=None):
    """The configuration's meta-model from seed-0 weights, compiled (Adam(1e-3) by default).

    TensorFlow is imported here, not at the top: the parent process never builds a model,
    and each worker sets its environment (oneDNN) before the import.
    """
    import keras

    import tf_imaml

    keras.utils.set_random_seed(0)
    mini = is_mini_imagenet(config)
    learner = tf_imaml.models.conv4_classifier(
        config.ways,
        input_shape=(config.image_size, config.image_size, 3 if mini else 1),
        filters=config.filters,
        pooling="max" if mini else None,
    )
    inner_lr = 0.01 if mini else 0.1 if config.algorithm.startswith("imaml") else 0.4
    common = dict(
        inner_steps=config.inner_steps,
        inner_learning_rate=inner_lr,
        task_batching=config.task_batching,
    )
    if config.algorithm.startswith("imaml"):
        inner = config.algorithm.split("_", 1)[1]
        meta = tf_imaml.ImplicitMAML(
            learner,
            lam=0.5 if mini else 2.0,
            cg_steps=config.cg_steps,
            inner_optimizer={"gd": "gd", "hf": "hessian_free"}.get(inner, inner),
            **common,
        )
    else:
        meta = tf_imaml.MAML(learner, first_order=config.algorithm == "fomaml", **common)
    meta.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return meta
