"""Evaluates a saved meta-learner on held-out Omniglot tasks: accuracy +- 95% CI.

By default it evaluates the shipped pretrained iMAML model (`omniglot_5way_1shot`, in
`tf_imaml/pretrained/`) on 600 test tasks of the Vinyals split, each with as many query
images per class as support images (`--queries`, default `--shots`): the protocol of MAML's and
the iMAML authors' Omniglot code. `--model` is a `.keras` file or a shipped model's name
(`tf_imaml.pretrained.names()`).

The test-time adaptation is the model's own unless a flag changes it: `--inner_steps`,
`--inner_learning_rate`, and for iMAML `--test_lam` and `--inner_loop` (`proximal`: gradient
steps on the proximal objective; `pull_back`: plain steps, then one proximal pull-back step,
the authors' loop). The result JSON records the adaptation used.

Usage:
  python scripts/evaluate.py [--model=runs/omniglot/model.keras] [--tasks=600] \\
      [--inner_steps=16] [--test_lam=2] [--inner_loop=proximal] [--output=results.json]
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import tf_imaml  # noqa: E402

PRETRAINED = "omniglot_5way_1shot"

flags.DEFINE_string("model", PRETRAINED, "A .keras meta-learner file, or a shipped model's name.")
flags.DEFINE_integer("tasks", 600, "Test tasks.", lower_bound=1)
flags.DEFINE_integer(
    "inner_steps", None, "Inner steps at test time (default: the model's).", lower_bound=0
)
flags.DEFINE_float(
    "test_lam",
    None,
    "iMAML: lam of the test-time adaptation (0: plain fine-tuning); default: the model's.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "inner_learning_rate",
    None,
    "Inner step size at test time (default: the model's).",
    lower_bound=0.0,
)
flags.DEFINE_enum(
    "inner_loop",
    None,
    list(tf_imaml.solvers.INNER_LOOPS),
    "iMAML: the test-time inner loop (proximal: steps on the proximal objective; pull_back: "
    "plain steps, then one proximal pull-back step); default: the model's.",
)
flags.DEFINE_integer("shots", 1, "Support examples per class.", lower_bound=1)
flags.DEFINE_integer(
    "queries",
    None,
    "Query examples per class (default: --shots, the protocol of MAML's and the iMAML "
    "authors' Omniglot code). The conv nets normalise by the statistics of the batch they "
    "see, so the size of the query batch changes the accuracy.",
    lower_bound=1,
)
flags.DEFINE_enum(
    "split",
    None,
    ["vinyals", "lake"],
    "Omniglot class split (default: a shipped model's own, else vinyals). Another split than a "
    "shipped model's own is refused when its --subset classes include classes that model "
    "was meta-trained or validated on.",
)
flags.DEFINE_enum("subset", "test", ["train", "val", "test"], "Which classes.")
flags.DEFINE_string("data_dir", None, "Omniglot .npz (default: the shipped copy).")
flags.DEFINE_integer("seed", 2, "Episode seed (train.py tests with seed + 2).")
flags.DEFINE_string("output", None, "Also write the result as JSON here.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = PRETRAINED
    tasks: int = 600
    inner_steps: int | None = None
    test_lam: float | None = None
    inner_learning_rate: float | None = None
    inner_loop: str | None = None
    shots: int = 1
    queries: int | None = None  # None: as many as shots.
    split: str | None = None  # None: the shipped model's split, else "vinyals".
    subset: str = "test"
    data_dir: str | None = None
    seed: int = 2
    output: str | None = None


def model_file(model: str) -> pathlib.Path:
    """Resolves `--model`: an existing file, else a name from `tf_imaml.pretrained.names()`.

    Raises:
      ValueError: If `model` is neither a file nor a shipped model's name.
    """
    if pathlib.Path(model).is_file():
        return pathlib.Path(model)
    if model in tf_imaml.pretrained.names():
        return tf_imaml.pretrained.path(model)
    shipped = ", ".join(tf_imaml.pretrained.names())
    raise ValueError(f"--model {model} is not a file nor a shipped model ({shipped})")


def class_split(config: EvalConfig) -> str:
    """The Omniglot split to score `config.model` on: `--split`, else a shipped model's own.

    Raises:
      ValueError: If `--split` is another split than the shipped model was meta-trained on
        and its `--subset` classes include classes of that training (its training and
        validation classes): the score would not be a held-out one.
    """
    shipped = tf_imaml.pretrained.MODELS.get(config.model)
    if shipped is None or pathlib.Path(config.model).is_file():
        return config.split or "vinyals"
    if config.split in (None, shipped.split):
        return shipped.split

    # Class indices into the same file, so no image is loaded to compare the splits.
    own = tf_imaml.datasets.omniglot_class_split(split=shipped.split, path=config.data_dir)
    other = tf_imaml.datasets.omniglot_class_split(split=config.split, path=config.data_dir)
    overlap = np.intersect1d(other[config.subset], np.union1d(own["train"], own["val"]))
    if overlap.size:
        raise ValueError(
            f"--split={config.split}: {overlap.size} of the {config.subset} classes of that split "
            f"are classes the shipped model {config.model} was meta-trained or validated on "
            f"(it was trained on the {shipped.split} split); use --split={shipped.split} (or "
            "leave --split out)"
        )
    return config.split


class AdaptationFlagError(ValueError):
    """A test-time adaptation flag that the loaded model cannot take."""


def set_adaptation(meta, config: EvalConfig) -> None:
    """Applies the test-time adaptation flags given in `config` to a loaded meta-learner.

    Raises:
      AdaptationFlagError: If `--inner_learning_rate` is not positive, `--test_lam` or
        `--inner_loop` is given for a model without a proximal term, or `--inner_loop` for
        an iMAML whose inner solver has no loop (iMAML-HF).
    """
    name = type(meta).__name__
    solver = getattr(meta, "inner_solver", None)
    if config.inner_learning_rate is not None and not config.inner_learning_rate > 0:
        raise AdaptationFlagError(
            f"--inner_learning_rate must be > 0, got {config.inner_learning_rate}"
        )
    if config.test_lam is not None and not hasattr(meta, "test_lam"):
        raise AdaptationFlagError(f"--test_lam: a {name} has no proximal term")
    if config.inner_loop is not None and not isinstance(solver, tf_imaml.ProximalDescent):
        detail = "" if solver is None else f" (its inner solver is {type(solver).__name__})"
        raise AdaptationFlagError(f"--inner_loop: a {name} has no proximal inner loop{detail}")
    for setting in ("inner_steps", "inner_learning_rate", "test_lam", "inner_loop"):
        if getattr(config, setting) is not None:
            common.SETTINGS[setting](meta, getattr(config, setting))
    meta.make_predict_function(force=True)


def evaluate(config: EvalConfig, *, verbose: int = 1) -> dict:
    """Loads the model, adapts it to `config.tasks` tasks and scores their query sets."""
    meta = keras.models.load_model(str(model_file(config.model)))
    set_adaptation(meta, config)
    ways = int(meta.learner.outputs[0].shape[-1])
    size = int(meta.learner.inputs[0].shape[1])
    queries = config.shots if config.queries is None else config.queries
    split = class_split(config)
    data = tf_imaml.datasets.load_omniglot(
        config.subset, split=split, image_size=size, path=config.data_dir
    )
    batch = 20
    episodes = tf_imaml.episodes.few_shot_episodes(
        data.images,
        data.labels,
        ways=ways,
        shots=config.shots,
        queries=queries,
        meta_batch_size=batch,
        seed=config.seed,
        rotations=(0, 90, 180, 270),
        num_batches=-(-config.tasks // batch),
    )
    progress = keras.utils.Progbar(-(-config.tasks // batch), verbose=verbose)
    accuracy = tf_imaml.evaluation.few_shot_accuracy(meta, episodes, on_batch=progress.update)
    result = {
        "accuracy": accuracy.mean,
        "ci95": accuracy.ci95,
        "tasks": accuracy.num_tasks,
        "non_finite_tasks": accuracy.non_finite,
        "ways": ways,
        "split": split,
        "queries": queries,
        "inner_steps": meta.inner_steps,
        "inner_learning_rate": float(meta.inner_learning_rate),
        "test_lam": getattr(meta, "test_lam", None),
        "inner_loop": getattr(getattr(meta, "inner_solver", None), "loop", None),
        "config": dataclasses.asdict(config),
    }
    if config.output:
        pathlib.Path(config.output).write_text(json.dumps(result, indent=2))
    return result


def main(argv):
    config = common.config_from_flags(argv, EvalConfig)
    try:
        model_file(config.model)
        class_split(config)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    # A progress bar redrawn in place only makes sense on a terminal; a log gets one line.
    try:
        result = evaluate(config, verbose=1 if sys.stdout.isatty() else 2)
    except AdaptationFlagError as error:
        raise app.UsageError(str(error)) from None
    print(
        f"{pathlib.Path(config.model).name}: Omniglot {result['ways']}-way {config.shots}-shot "
        f"{config.subset} accuracy {100 * result['accuracy']:.2f} +- "
        f"{100 * result['ci95']:.2f}% over {result['tasks']} tasks of the {result['split']} split "
        f"({result['queries']} {'query' if result['queries'] == 1 else 'queries'} per class, "
        f"{result['inner_steps']} inner steps)"
    )
    if result["non_finite_tasks"]:
        print(
            f"WARNING: the adaptation diverged (non-finite logits) on "
            f"{result['non_finite_tasks']} of {result['tasks']} tasks; their predictions are "
            "arbitrary, so the accuracy above is not a score of the model"
        )


if __name__ == "__main__":
    app.run(main)
