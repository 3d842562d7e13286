"""Meta-trains a few-shot classifier on Omniglot and reports test accuracy with a 95% CI.

Keras `fit` shows progress; TensorBoard gets every metric, the hyperparameters and the
validation curve; a checkpoint is written every epoch (`--steps_per_epoch` meta-steps) and a
killed run resumes from it when started again with the same `--logdir`. At the end the model
is saved to `<logdir>/model.keras` and evaluated on `--test_episodes` held-out tasks; the
result goes to `<logdir>/results.json`, the class split to `<logdir>/split.json`.

Usage:
  python scripts/train.py --algorithm=imaml --ways=5 --shots=1 --meta_steps=2000 \\
      --logdir=runs/omniglot_5w1s
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from tensorboard.plugins.hparams import api as hparams_api  # noqa: E402

import tf_imaml  # noqa: E402

ALGORITHMS = ("imaml", "imaml_hf", "maml", "fomaml", "reptile")

_ALGORITHM = flags.DEFINE_enum("algorithm", "imaml", ALGORITHMS, "Meta-learning algorithm.")
_DATASET = flags.DEFINE_enum("dataset", "omniglot", ["omniglot"], "Benchmark.")
_SPLIT = flags.DEFINE_enum("split", "vinyals", ["vinyals", "lake"], "Omniglot class split.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Omniglot .npz (default: the shipped copy).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "Image side after resizing.", lower_bound=4)
_WAYS = flags.DEFINE_integer("ways", 5, "Classes per task.", lower_bound=2)
_SHOTS = flags.DEFINE_integer("shots", 1, "Support examples per class.", lower_bound=1)
_QUERIES = flags.DEFINE_integer("queries", 15, "Query examples per class.", lower_bound=1)
_META_BATCH = flags.DEFINE_integer("meta_batch_size", 32, "Tasks per meta-step.", lower_bound=1)
_INNER_STEPS = flags.DEFINE_integer("inner_steps", 16, "Inner steps.", lower_bound=0)
_INNER_LR = flags.DEFINE_float("inner_learning_rate", 0.1, "Inner step size.")
_LAM = flags.DEFINE_float("lam", 2.0, "iMAML proximal strength lambda.")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 5, "iMAML conjugate-gradient steps.", lower_bound=1)
_OUTER_LR = flags.DEFINE_float("outer_learning_rate", 1e-3, "Adam step size.")
_META_STEPS = flags.DEFINE_integer("meta_steps", 1000, "Meta-training steps.", lower_bound=1)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", 50, "Meta-steps between validation and checkpoints.", lower_bound=1
)
_VAL_TASKS = flags.DEFINE_integer("val_tasks", 100, "Validation tasks per epoch.", lower_bound=1)
_TEST_TASKS = flags.DEFINE_integer("test_tasks", 600, "Test tasks at the end.", lower_bound=1)
_LOGDIR = flags.DEFINE_string("logdir", "runs/omniglot", "Logs, checkpoints and results.")
_INIT_MODEL = flags.DEFINE_string(
    "init_model", None, "A saved .keras model to continue (its algorithm and settings win)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and episodes.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    algorithm: str = "imaml"
    dataset: str = "omniglot"
    split: str = "vinyals"
    data_dir: str | None = None
    image_size: int = 28
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch_size: int = 32
    inner_steps: int = 16
    inner_learning_rate: float = 0.1
    lam: float = 2.0
    cg_steps: int = 5
    outer_learning_rate: float = 1e-3
    meta_steps: int = 1000
    steps_per_epoch: int = 50
    val_tasks: int = 100
    test_tasks: int = 600
    logdir: str = "runs/omniglot"
    init_model: str | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad value."""
        for name in ("inner_learning_rate", "lam", "outer_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.meta_steps % self.steps_per_epoch:
            raise ValueError(
                f"--meta_steps ({self.meta_steps}) must be a multiple of --steps_per_epoch "
                f"({self.steps_per_epoch})"
            )
        if self.data_dir and not pathlib.Path(self.data_dir).is_file():
            raise ValueError(f"--data_dir {self.data_dir} is not a file")
        if self.init_model and not pathlib.Path(self.init_model).is_file():
            raise ValueError(f"--init_model {self.init_model} is not a file")


def build_meta_model(config: TrainConfig, learner: keras.Model) -> tf_imaml.meta_model.MetaLearner:
    """The algorithm named by `config.algorithm` around `learner`."""
    common = dict(inner_steps=config.inner_steps, inner_learning_rate=config.inner_learning_rate)
    if config.algorithm in ("imaml", "imaml_hf"):
        extra = {"inner_optimizer": "hessian_free"} if config.algorithm == "imaml_hf" else {}
        return tf_imaml.ImplicitMAML(
            learner, lam=config.lam, cg_steps=config.cg_steps, **common, **extra
        )
    if config.algorithm in ("maml", "fomaml"):
        return tf_imaml.MAML(learner, first_order=config.algorithm == "fomaml", **common)
    return tf_imaml.Reptile(learner, **common)


def episodes(config: TrainConfig, data, *, seed: int, num_tasks: int | None, batch: int):
    """Seeded episodes of `data` (rotations as new classes, as is usual for Omniglot)."""
    num_batches = None if num_tasks is None else -(-num_tasks // batch)
    return tf_imaml.episodes.few_shot_episodes(
        data.images,
        data.labels,
        ways=config.ways,
        shots=config.shots,
        queries=config.queries,
        meta_batch_size=batch,
        seed=seed,
        rotations=(0, 90, 180, 270),
        num_batches=num_batches,
    )


def train(config: TrainConfig, *, verbose: int = 1) -> dict:
    """Meta-trains, evaluates on test tasks and writes the results; returns them."""
    config.validate()
    logdir = pathlib.Path(config.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    load = dict(split=config.split, image_size=config.image_size, path=config.data_dir)
    data = {s: tf_imaml.datasets.load_omniglot(s, **load) for s in ("train", "val", "test")}
    (logdir / "split.json").write_text(
        json.dumps(
            {s: d.class_names.tolist() for s, d in data.items()} | {"split": config.split}, indent=1
        )
    )
    if config.init_model:
        meta = keras.models.load_model(config.init_model)
    else:
        learner = tf_imaml.models.conv4_classifier(
            config.ways, input_shape=(config.image_size, config.image_size, 1)
        )
        meta = build_meta_model(config, learner)
        meta.compile(
            optimizer=keras.optimizers.Adam(config.outer_learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["sparse_categorical_accuracy"],
        )
    with tf.summary.create_file_writer(str(logdir / "hparams")).as_default():
        hparams_api.hparams(
            {k: v for k, v in dataclasses.asdict(config).items() if v is not None},
            trial_id=logdir.name,
        )
    eval_batch = min(config.meta_batch_size, 20)
    train_data = episodes(
        config, data["train"], seed=config.seed, num_tasks=None, batch=config.meta_batch_size
    )
    val_data = episodes(
        config, data["val"], seed=config.seed + 1, num_tasks=config.val_tasks, batch=eval_batch
    )
    callbacks = [
        keras.callbacks.BackupAndRestore(str(logdir / "backup")),
        keras.callbacks.TensorBoard(str(logdir), update_freq=10),
        keras.callbacks.ModelCheckpoint(str(logdir / "model.keras")),
    ]
    start = time.time()
    meta.fit(
        train_data,
        epochs=config.meta_steps // config.steps_per_epoch,
        steps_per_epoch=config.steps_per_epoch,
        validation_data=val_data,
        callbacks=callbacks,
        verbose=verbose,
    )
    train_seconds = time.time() - start
    meta.save(logdir / "model.keras")
    test_data = episodes(
        config, data["test"], seed=config.seed + 2, num_tasks=config.test_tasks, batch=eval_batch
    )
    progress = keras.utils.Progbar(-(-config.test_tasks // eval_batch), verbose=verbose)
    accuracy = tf_imaml.evaluation.few_shot_accuracy(meta, test_data, on_batch=progress.update)
    result = {
        "test_accuracy": accuracy.mean,
        "test_ci95": accuracy.ci95,
        "test_tasks": accuracy.num_tasks,
        "train_seconds": round(train_seconds, 1),
        "config": dataclasses.asdict(config),
    }
    (logdir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = TrainConfig(
        algorithm=_ALGORITHM.value,
        dataset=_DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        image_size=_IMAGE_SIZE.value,
        ways=_WAYS.value,
        shots=_SHOTS.value,
        queries=_QUERIES.value,
        meta_batch_size=_META_BATCH.value,
        inner_steps=_INNER_STEPS.value,
        inner_learning_rate=_INNER_LR.value,
        lam=_LAM.value,
        cg_steps=_CG_STEPS.value,
        outer_learning_rate=_OUTER_LR.value,
        meta_steps=_META_STEPS.value,
        steps_per_epoch=_STEPS_PER_EPOCH.value,
        val_tasks=_VAL_TASKS.value,
        test_tasks=_TEST_TASKS.value,
        logdir=_LOGDIR.value,
        init_model=_INIT_MODEL.value,
        seed=_SEED.value,
    )
    try:
        config.validate()
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    result = train(config)
    print(
        f"{config.algorithm} Omniglot {config.ways}-way {config.shots}-shot: test accuracy "
        f"{100 * result['test_accuracy']:.2f} +- {100 * result['test_ci95']:.2f}% over "
        f"{result['test_tasks']} tasks ({config.meta_steps} meta-steps, "
        f"{result['train_seconds']:.0f} s); results in {config.logdir}/results.json"
    )


if __name__ == "__main__":
    app.run(main)
