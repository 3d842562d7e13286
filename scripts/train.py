"""Meta-trains a few-shot classifier (Omniglot or mini-ImageNet); test accuracy with a 95% CI.

Keras `fit` shows progress; TensorBoard gets every metric, the hyperparameters and the
validation curve; a checkpoint is written every epoch (`--steps_per_epoch` meta-steps) and a
killed run resumes from it when started again with the same `--logdir`. At the end the model
is saved to `<logdir>/model.keras` and evaluated on `--test_episodes` held-out tasks; the
result goes to `<logdir>/results.json`, the class split to `<logdir>/split.json`.

Omniglot (shipped) uses the strided 64-filter conv net on 28x28 images with rotations as
extra classes; mini-ImageNet (read from `--data_dir`, default `../shared/data/mini_imagenet`)
uses the 32-filter conv net with exact max pooling on 84x84 RGB images, decoded from JPEG in
the `tf.data` pipeline.

Usage:
  python scripts/train.py --algorithm=imaml --ways=5 --shots=1 --meta_steps=2000 \\
      --logdir=runs/omniglot_5w1s
  python scripts/train.py --dataset=mini_imagenet --algorithm=maml --inner_steps=5 \\
      --inner_learning_rate=0.01 --meta_batch_size=4 --logdir=runs/mini_imagenet
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The project's copy of mini-ImageNet (beside the repository), unless the user names one.
_SHARED_MINI_IMAGENET = (
    pathlib.Path(__file__).resolve().parent.parent.parent / "shared/data/mini_imagenet"
)
if _SHARED_MINI_IMAGENET.is_dir():
    os.environ.setdefault("TF_IMAML_MINI_IMAGENET", str(_SHARED_MINI_IMAGENET))

import common  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from tensorboard.plugins.hparams import api as hparams_api  # noqa: E402

import tf_imaml  # noqa: E402

ALGORITHMS = ("imaml", "imaml_hf", "maml", "fomaml", "reptile")

FLAGS = flags.FLAGS
flags.DEFINE_enum("algorithm", "imaml", ALGORITHMS, "Meta-learning algorithm.")
DATASETS = ("omniglot", "mini_imagenet")
flags.DEFINE_enum("dataset", "omniglot", DATASETS, "Benchmark.")
flags.DEFINE_enum("split", "vinyals", ["vinyals", "lake"], "Omniglot class split.")
flags.DEFINE_string(
    "data_dir",
    None,
    "Omniglot .npz (default: the shipped copy), or the mini-ImageNet folder (default: "
    "$TF_IMAML_MINI_IMAGENET, which this script sets to ../shared/data/mini_imagenet beside "
    "the repository when that exists).",
)
flags.DEFINE_integer(
    "image_size",
    None,
    "Image side after resizing (default: 28 Omniglot, 84 mini-ImageNet).",
    lower_bound=4,
)
flags.DEFINE_integer("ways", 5, "Classes per task.", lower_bound=2)
flags.DEFINE_integer("shots", 1, "Support examples per class.", lower_bound=1)
flags.DEFINE_integer("queries", 15, "Query examples per class.", lower_bound=1)
flags.DEFINE_integer("meta_batch_size", 32, "Tasks per meta-step.", lower_bound=1)
flags.DEFINE_integer("inner_steps", 16, "Inner steps.", lower_bound=0)
flags.DEFINE_float("inner_learning_rate", 0.1, "Inner step size.")
flags.DEFINE_float("lam", 2.0, "iMAML proximal strength lambda.")
flags.DEFINE_integer("cg_steps", 5, "iMAML conjugate-gradient steps.", lower_bound=1)
flags.DEFINE_enum(
    "cg_implementation",
    None,
    ["cg", "cg_tf"],
    "iMAML: the CG solver, per task (cg) or tf.linalg's (cg_tf, which can mark a task that "
    "converged exactly as failed; see docs/api.md); default: the library's (cg), or with "
    "--init_model the model's.",
)
flags.DEFINE_float(
    "damping",
    0.0,
    "iMAML: the linear system is ((1 + damping) I + H / (lam + lam_damping)) g = v.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "lam_damping",
    0.0,
    "iMAML: added to lam in the linear system only (the authors' code: --damping=1 "
    "--lam_damping=10).",
    lower_bound=0.0,
)
flags.DEFINE_enum(
    "inner_loop",
    "proximal",
    ["proximal", "pull_back"],
    "iMAML: steps on the proximal objective (the paper), or plain steps on the support loss "
    "and one proximal pull-back step (the authors' code).",
)
flags.DEFINE_float(
    "test_lam",
    None,
    "iMAML: lam of the adaptation at validation and test time (0: plain fine-tuning, as the "
    "authors' test command); default: --lam.",
    lower_bound=0.0,
)
flags.DEFINE_integer(
    "curvature_iterations",
    0,
    "iMAML: Lanczos iterations for the min_curvature / indefinite_fraction metrics "
    "(smallest eigenvalue of I + H/lam per task); 0 = off.",
    lower_bound=0,
)
flags.DEFINE_float("outer_learning_rate", 1e-3, "Adam step size.")
flags.DEFINE_integer("meta_steps", 1000, "Meta-training steps.", lower_bound=1)
flags.DEFINE_integer(
    "steps_per_epoch", 50, "Meta-steps between validation and checkpoints.", lower_bound=1
)
flags.DEFINE_integer("val_tasks", 100, "Validation tasks per epoch.", lower_bound=1)
flags.DEFINE_integer("test_tasks", 600, "Test tasks at the end.", lower_bound=1)
flags.DEFINE_string("logdir", "runs/omniglot", "Logs, checkpoints and results.")
flags.DEFINE_string(
    "init_model",
    None,
    "A saved .keras model to continue. Its algorithm and settings hold; of the meta-learner's "
    "flags, --inner_steps, --inner_learning_rate, --test_lam and --cg_implementation given on "
    "the command line are applied, and any other that differs from the model's value is an "
    "error.",
)
flags.DEFINE_float(
    "init_learning_rate",
    None,
    "With --init_model: the Adam step size from now on (default: the saved optimizer's); a "
    "lower one continues a run with a decayed step.",
)
flags.DEFINE_integer(
    "first_meta_batch",
    None,
    "Where the seeded training stream starts (default 0): a run continued from --init_model "
    "with the same --seed passes the meta-steps already taken, so it meets new tasks.",
    lower_bound=0,
)
flags.DEFINE_integer("seed", 0, "Seed for weights and episodes.")
STRATEGIES = ("default", "mirrored", "multi_worker")
flags.DEFINE_enum(
    "strategy",
    "default",
    STRATEGIES,
    "tf.distribute strategy: one device; MirroredStrategy over this machine's devices; or "
    "MultiWorkerMirroredStrategy over the workers listed in $TF_CONFIG (run the same command "
    "on every worker, each with its own TF_CONFIG task index).",
)
flags.DEFINE_enum(
    "on_failure",
    "drop",
    ["drop", "first_order", "zero"],
    "What a task whose meta-gradient failed contributes (see tf_imaml.MetaLearner).",
)
flags.DEFINE_float(
    "max_skipped_fraction", 0.5, "Stop when an epoch skipped more meta-steps than this."
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    algorithm: str = "imaml"
    dataset: str = "omniglot"
    split: str = "vinyals"
    data_dir: str | None = None
    image_size: int | None = None  # None: 28 for Omniglot, 84 for mini-ImageNet.
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch_size: int = 32
    inner_steps: int = 16
    inner_learning_rate: float = 0.1
    lam: float = 2.0
    cg_steps: int = 5
    cg_implementation: str | None = None  # None: tf_imaml.CG's default, or --init_model's.
    damping: float = 0.0
    lam_damping: float = 0.0
    inner_loop: str = "proximal"
    test_lam: float | None = None
    curvature_iterations: int = 0
    outer_learning_rate: float = 1e-3
    meta_steps: int = 1000
    steps_per_epoch: int = 50
    val_tasks: int = 100
    test_tasks: int = 600
    logdir: str = "runs/omniglot"
    init_model: str | None = None
    init_learning_rate: float | None = None
    first_meta_batch: int | None = None  # None (as in runs recorded before the flag): 0.
    seed: int = 0
    strategy: str = "default"
    on_failure: str = "drop"
    max_skipped_fraction: float = 0.5

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
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs $TF_CONFIG (see README)")
        if not 0.0 <= self.max_skipped_fraction < 1.0:
            raise ValueError(
                f"--max_skipped_fraction must be in [0, 1), got {self.max_skipped_fraction}"
            )
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.data_dir and self.dataset == "omniglot":
            if not pathlib.Path(self.data_dir).is_file():
                raise ValueError(f"--data_dir {self.data_dir} is not a file")
        if self.dataset == "mini_imagenet":
            if self.data_dir and not pathlib.Path(self.data_dir).is_dir():
                raise ValueError(f"--data_dir {self.data_dir} is not a folder")
            if not self.data_dir and tf_imaml.mini_imagenet.default_path() is None:
                raise ValueError(
                    "--dataset=mini_imagenet needs --data_dir or $TF_IMAML_MINI_IMAGENET (no "
                    "../shared/data/mini_imagenet beside the repository)"
                )
        if self.init_model and not pathlib.Path(self.init_model).is_file():
            raise ValueError(f"--init_model {self.init_model} is not a file")
        if self.init_learning_rate is not None:
            if not self.init_model:
                raise ValueError("--init_learning_rate needs --init_model")
            if not self.init_learning_rate > 0:
                raise ValueError(f"--init_learning_rate must be > 0, got {self.init_learning_rate}")


def build_meta_model(config: TrainConfig, learner: keras.Model) -> tf_imaml.meta_model.MetaLearner:
    """The algorithm named by `config.algorithm` around `learner`."""
    common = dict(
        inner_steps=config.inner_steps,
        inner_learning_rate=config.inner_learning_rate,
        on_failure=config.on_failure,
    )
    if config.algorithm in ("imaml", "imaml_hf"):
        extra = {"inner_optimizer": "hessian_free"} if config.algorithm == "imaml_hf" else {}
        return tf_imaml.ImplicitMAML(
            learner,
            lam=config.lam,
            cg_steps=config.cg_steps,
            linear_solver=config.cg_implementation,
            damping=config.damping,
            lam_damping=config.lam_damping,
            inner_loop=config.inner_loop,
            test_lam=config.test_lam,
            curvature_iterations=config.curvature_iterations,
            **common,
            **extra,
        )
    if config.algorithm in ("maml", "fomaml"):
        return tf_imaml.MAML(learner, first_order=config.algorithm == "fomaml", **common)
    return tf_imaml.Reptile(learner, **common)


# Flags that define the meta-learner. With --init_model the saved model's values hold; a flag
# given on the command line is applied if the model can change it after training
# (`ADJUSTABLE_FLAGS`, applied by `common.SETTINGS`), and otherwise refused when it differs
# from the model's value, instead of being silently ignored.
ADJUSTABLE_FLAGS = ("inner_steps", "inner_learning_rate", "test_lam", "cg_implementation")
MODEL_FLAGS = ADJUSTABLE_FLAGS + (
    "algorithm",
    "lam",
    "cg_steps",
    "damping",
    "lam_damping",
    "inner_loop",
    "on_failure",
    "curvature_iterations",
)


class InitModelConflict(ValueError):
    """A flag given with --init_model changes a setting the saved model fixes."""


def model_settings(meta: tf_imaml.meta_model.MetaLearner) -> dict:
    """A saved meta-learner's values of the `MODEL_FLAGS` it has, read from its config."""
    cfg = meta.get_config()
    if isinstance(meta, tf_imaml.ImplicitMAML):
        solver = cfg["linear_solver"]["config"]
        hessian_free = cfg["inner_solver"]["type"] == "HessianFree"
        settings = {
            "algorithm": "imaml_hf" if hessian_free else "imaml",
            "lam": cfg["lam"],
            "cg_steps": solver.get("steps"),
            "cg_implementation": solver.get("implementation"),
            "damping": solver.get("damping"),
            "lam_damping": solver.get("lam_damping"),
            "inner_loop": cfg["inner_solver"]["config"].get("loop"),
            "test_lam": cfg["test_lam"],
            "curvature_iterations": cfg["curvature_iterations"],
        }
    elif isinstance(meta, tf_imaml.MAML):
        settings = {"algorithm": "fomaml" if cfg.get("first_order") else "maml"}
    else:
        settings = {"algorithm": "reptile"}
    settings.update(
        inner_steps=cfg["inner_steps"],
        inner_learning_rate=cfg["inner_learning_rate"],
        on_failure=cfg["on_failure"],
    )
    return settings


def apply_given_flags(meta, config: TrainConfig, given) -> list[str]:
    """Applies the model flags given on the command line to a loaded meta-learner.

    Args:
      meta: The meta-learner loaded from `--init_model`.
      config: The run's configuration.
      given: Names of the flags given on the command line.

    Returns:
      `"name: old -> new"` for each flag applied.

    Raises:
      InitModelConflict: Naming every given flag that differs from the model's value and
        that the model cannot take after training.
    """
    settings = model_settings(meta)
    applied, refused = [], []
    for name in (n for n in MODEL_FLAGS if n in given):
        if name not in settings:
            refused.append(f"--{name} (a {type(meta).__name__} has no such setting)")
            continue
        old, new = settings[name], getattr(config, name)
        if old == new:
            continue
        if name in ADJUSTABLE_FLAGS:
            common.SETTINGS[name](meta, new)
            applied.append(f"{name}: {old} -> {new}")
        else:
            refused.append(f"--{name}={new} (the model's: {old})")
    if refused:
        raise InitModelConflict(
            f"--init_model {config.init_model} fixes these settings, which the command line "
            f"changes: {', '.join(refused)}. Only {', '.join('--' + f for f in ADJUSTABLE_FLAGS)} "
            "can change after training; leave the others out or give the model's values."
        )
    return applied


def image_size(config: TrainConfig) -> int:
    if config.image_size is not None:
        return config.image_size
    return 84 if config.dataset == "mini_imagenet" else 28


def load_data(config: TrainConfig) -> dict:
    """The train, val and test subsets of the configured dataset."""
    if config.dataset == "mini_imagenet":
        return {
            s: tf_imaml.mini_imagenet.load_mini_imagenet(s, path=config.data_dir)
            for s in ("train", "val", "test")
        }
    load = dict(split=config.split, image_size=image_size(config), path=config.data_dir)
    return {s: tf_imaml.datasets.load_omniglot(s, **load) for s in ("train", "val", "test")}


def build_learner(config: TrainConfig) -> keras.Model:
    """The conv net of the MAML papers for the configured dataset."""
    size = image_size(config)
    if config.dataset == "mini_imagenet":
        return tf_imaml.models.conv4_classifier(
            config.ways, input_shape=(size, size, 3), filters=32, pooling="max"
        )
    return tf_imaml.models.conv4_classifier(config.ways, input_shape=(size, size, 1))


def episodes(
    config: TrainConfig, data, *, seed: int, num_tasks: int | None, batch: int, first_batch=0
):
    """Seeded episodes of `data` (Omniglot: rotations as new classes, as is usual)."""
    num_batches = None if num_tasks is None else -(-num_tasks // batch)
    common = dict(
        ways=config.ways,
        shots=config.shots,
        queries=config.queries,
        meta_batch_size=batch,
        seed=seed,
        num_batches=num_batches,
        first_batch=first_batch,
    )
    if config.dataset == "mini_imagenet":
        size = image_size(config)
        return tf_imaml.episodes.jpeg_few_shot_episodes(
            data.images, data.labels, image_size=None if size == 84 else size, **common
        )
    return tf_imaml.episodes.few_shot_episodes(
        data.images, data.labels, rotations=(0, 90, 180, 270), **common
    )


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


# Flags that may change when a run is resumed: a campaign is extended by raising
# --meta_steps, and the final test may use more or fewer tasks.
RESUMABLE_FLAGS = frozenset({"meta_steps", "test_tasks"})


def check_resume(config: TrainConfig, logdir: pathlib.Path) -> None:
    """Refuses to resume a run in `logdir` whose recorded flags differ from `config`.

    Raises:
      ValueError: Naming every differing flag, with its recorded and its new value.
    """
    recorded = logdir / "flags.json"
    if not (logdir / "backup").is_dir() or not recorded.is_file():
        return
    before = json.loads(recorded.read_text())
    now = dataclasses.asdict(config)
    differ = [
        f"--{k}: {before.get(k)!r} in {recorded}, {now.get(k)!r} now"
        for k in sorted(set(before) | set(now))
        if k not in RESUMABLE_FLAGS and before.get(k) != now.get(k)
    ]
    if differ:
        raise ValueError(
            f"{logdir} holds a run with other flags; resume it with its own flags or choose "
            "another --logdir. Differing: " + "; ".join(differ)
        )


def check_backup(meta: keras.Model, backup_dir: pathlib.Path) -> str | None:
    """Makes sure that `BackupAndRestore` will find a readable checkpoint in `backup_dir`.

    An unreadable latest checkpoint (weights or metadata) is replaced by the previous one
    that `BackupAndRestore(double_checkpoint=True)` keeps; the model's weights are then
    those of the checkpoint it will resume from.

    Returns:
      A message when it fell back to the previous checkpoint, else `None`.

    Raises:
      ValueError: If neither checkpoint can be read.
    """
    weights = backup_dir / "latest.weights.h5"
    metadata = backup_dir / "training_metadata.json"
    if not weights.exists() and not metadata.exists():
        return None

    def load(weights_path, metadata_path):
        epoch = int(json.loads(metadata_path.read_text())["epoch"])
        if meta.optimizer is not None and not meta.optimizer.built:
            meta.optimizer.build(meta.trainable_variables)
        meta.load_weights(str(weights_path))
        return epoch

    try:
        load(weights, metadata)
        return None
    except Exception as err:  # noqa: BLE001 - any unreadable file means: use the previous one.
        latest_error = f"{type(err).__name__}: {err}"
    previous_weights = backup_dir / (weights.name + ".bkp")
    previous_metadata = backup_dir / (metadata.name + ".bkp")
    # Keras loads weights only from a file named *.weights.h5.
    candidate = backup_dir / "previous.weights.h5"
    try:
        shutil.copyfile(previous_weights, candidate)
        epoch = load(candidate, previous_metadata)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"the checkpoint in {backup_dir} is unreadable ({latest_error}) and so is the "
            f"previous one ({type(err).__name__}: {err}); delete {backup_dir} to start afresh"
        ) from None
    finally:
        candidate.unlink(missing_ok=True)
    shutil.copyfile(previous_weights, weights)
    shutil.copyfile(previous_metadata, metadata)
    return (
        f"the latest checkpoint in {backup_dir} is unreadable ({latest_error}); resuming from "
        f"the previous one (after epoch {epoch})"
    )


def resumed_epoch(backup_dir: pathlib.Path) -> int:
    """The epoch `BackupAndRestore` will resume at (0 for a fresh run)."""
    metadata = backup_dir / "training_metadata.json"
    if not metadata.is_file():
        return 0
    return int(json.loads(metadata.read_text())["epoch"])


def train(config: TrainConfig, *, verbose: int = 1, given_flags=()) -> dict:
    """Meta-trains, evaluates on test tasks and writes the results; returns them."""
    config.validate()
    logdir = pathlib.Path(config.logdir)
    check_resume(config, logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    # Same seed, same episodes, same weights: TensorFlow's CPU kernels are deterministic
    # once op determinism is on (it costs little here; see docs/reliability.md).
    tf.config.experimental.enable_op_determinism()
    strategy = make_strategy(config.strategy)
    resolver = getattr(strategy, "cluster_resolver", None)
    if (
        resolver is not None
        and resolver.task_type not in (None, "chief")
        and (resolver.task_type != "worker" or resolver.task_id != 0)
    ):
        # Only the chief (or worker 0) writes the run; the others keep their own copy.
        logdir = logdir / f"{resolver.task_type}_{resolver.task_id}"
        logdir.mkdir(parents=True, exist_ok=True)
    data = load_data(config)
    (logdir / "split.json").write_text(
        json.dumps(
            {s: d.class_names.tolist() for s, d in data.items()}
            | {"dataset": config.dataset, "split": config.split},
            indent=1,
        )
    )
    with strategy.scope():
        if config.init_model:
            meta = keras.models.load_model(config.init_model)
            for change in apply_given_flags(meta, config, set(given_flags)):
                print(f"--init_model: {change} (from the command line)", flush=True)
            if config.init_learning_rate is not None:
                meta.optimizer.learning_rate = config.init_learning_rate
        else:
            learner = build_learner(config)
            meta = build_meta_model(config, learner)
            meta.compile(
                optimizer=keras.optimizers.Adam(config.outer_learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["sparse_categorical_accuracy"],
            )
        message = check_backup(meta, logdir / "backup")
    if message:
        print(message, flush=True)
    (logdir / "flags.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    with tf.summary.create_file_writer(str(logdir / "hparams")).as_default():
        hparams_api.hparams(
            {k: v for k, v in dataclasses.asdict(config).items() if v is not None},
            trial_id=logdir.name,
        )
    eval_batch = min(config.meta_batch_size, 20)
    # A resumed run continues the episode stream where its checkpoint left it.
    first_batch = (config.first_meta_batch or 0) + resumed_epoch(
        logdir / "backup"
    ) * config.steps_per_epoch
    train_data = episodes(
        config,
        data["train"],
        seed=config.seed,
        num_tasks=None,
        batch=config.meta_batch_size,
        first_batch=first_batch,
    )
    val_data = episodes(
        config, data["val"], seed=config.seed + 1, num_tasks=config.val_tasks, batch=eval_batch
    )
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Each worker takes its share of every meta-batch (not whole meta-batches in turn).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        train_data = train_data.with_options(options)
        val_data = val_data.with_options(options)
    callbacks = [
        # First, so that a diverged epoch is not written over the last good checkpoint.
        tf_imaml.callbacks.DivergenceGuard(max_skipped_fraction=config.max_skipped_fraction),
        # The checkpoint is kept after the last epoch, so that raising --meta_steps continues.
        keras.callbacks.BackupAndRestore(
            str(logdir / "backup"), double_checkpoint=True, delete_checkpoint=False
        ),
        tf_imaml.callbacks.TimeToAccuracy(
            logdir / "curve.json", log_dir=str(logdir / "time_to_accuracy")
        ),
        # Keras 3.15 writes the epoch scalars only when the global step at the epoch's end is
        # a multiple of update_freq (measured), so update_freq must divide steps_per_epoch.
        keras.callbacks.TensorBoard(str(logdir), update_freq=math.gcd(10, config.steps_per_epoch)),
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
    plot_curve(
        logdir / "curve.json",
        logdir / "curve.png",
        title=f"{config.algorithm} {config.dataset} {config.ways}-way {config.shots}-shot",
    )
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
        # The whole run, over every resume (validation excluded): see curve.json.
        "meta_steps": int(meta.optimizer.iterations.numpy()),
        "total_train_seconds": json.loads((logdir / "curve.json").read_text())[-1]["train_seconds"],
        "config": dataclasses.asdict(config),
    }
    (logdir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def plot_curve(curve_path: pathlib.Path, png_path: pathlib.Path, *, title: str = "") -> None:
    """Validation accuracy against meta-steps and against training hours, as a PNG."""
    entries = common.validation_curve(curve_path)
    if entries:
        common.plot_validation_curves(
            [("", entries)], png_path, seconds_key="train_seconds", title=title
        )


def main(argv):
    config = common.config_from_flags(argv, TrainConfig)
    try:
        config.validate()
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    try:
        # A progress bar for a person at a terminal; one line per epoch in a log file.
        result = train(
            config,
            verbose=1 if sys.stdout.isatty() else 2,
            given_flags=[name for name in MODEL_FLAGS if FLAGS[name].present],
        )
    except InitModelConflict as err:
        raise app.UsageError(str(err)) from None
    except tf_imaml.callbacks.TrainingDiverged as err:
        raise SystemExit(f"training diverged: {err}") from None
    print(
        f"{config.algorithm} {config.dataset} {config.ways}-way {config.shots}-shot: test accuracy "
        f"{100 * result['test_accuracy']:.2f} +- {100 * result['test_ci95']:.2f}% over "
        f"{result['test_tasks']} tasks ({config.meta_steps} meta-steps, "
        f"{result['train_seconds']:.0f} s); results in {config.logdir}/results.json"
    )


if __name__ == "__main__":
    app.run(main)
