"""What the example apps (train, evaluate, sinusoid, demo, compare_recipes) share.

- `config_from_flags`: the parsed absl flags, read once into the app's frozen config.
- `SETTINGS`: how a loaded meta-learner takes a setting changed after training
  (`train.py --init_model`, `evaluate.py`'s test-time flags).
- `validation_curve`: the validation entries of a run's `curve.json` (written by
  `tf_imaml.callbacks.TimeToAccuracy` in `scripts/train.py`).
- `accuracy_axes` and `save_figure`: the two panels of validation accuracy that train.py and
  compare_recipes.py draw, and the finish both figures share.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from absl import app
from absl import flags

# The validation metric that curve.json records and the curves plot.
MONITOR = "val_sparse_categorical_accuracy"


def _set(name):
    return lambda meta, value: setattr(meta, name, value)


def _replace(solver, field):
    # The solvers are frozen dataclasses: swap one for a copy with the field changed.
    return lambda meta, value: setattr(
        meta, solver, dataclasses.replace(getattr(meta, solver), **{field: value})
    )


# A meta-learner setting that can change after training -> how to apply it to a loaded model.
SETTINGS = {
    "inner_steps": _set("inner_steps"),
    "inner_learning_rate": _set("inner_learning_rate"),
    "test_lam": _set("test_lam"),
    "cg_implementation": _replace("linear_solver", "implementation"),
    "inner_loop": _replace("inner_solver", "loop"),
}


def config_from_flags(
    argv: list[str],
    config_cls,
    *,
    flag_names: dict[str, str] | None = None,
    keep_default: tuple[str, ...] = (),
):
    """The `config_cls` whose fields hold the parsed values of the flags of the same names.

    Args:
      argv: The arguments absl left after parsing the flags (the program name only, or the
        call is a usage error).
      config_cls: A dataclass whose fields are named like the app's flags.
      flag_names: Fields read from a flag of another name, as `{field: flag}`.
        Default value: `None` (every flag is named like its field).
      keep_default: Fields that have no flag and keep their default.
        Default value: `()`.

    Returns:
      `config_cls(...)` with every other field read from its flag.

    Raises:
      app.UsageError: If `argv` holds arguments that are not flags.
      KeyError: If a field has no flag and is not in `keep_default`.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    flag_names = flag_names or {}
    values = {
        field.name: flags.FLAGS[flag_names.get(field.name, field.name)].value
        for field in dataclasses.fields(config_cls)
        if field.name not in keep_default
    }
    return config_cls(**values)


def validation_curve(path: pathlib.Path, *, until_seconds: float = math.inf) -> list[dict]:
    """The entries of a `curve.json` that hold a validation accuracy, up to `until_seconds`
    of training."""
    return [
        e
        for e in json.loads(pathlib.Path(path).read_text())
        if MONITOR in e["logs"] and e["train_seconds"] <= until_seconds
    ]


def accuracy_axes(*, figsize: tuple[float, float]):
    """A figure of two panels that share the validation-accuracy axis: `(fig, axes)`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(1, 2, figsize=figsize, sharey=True)


def plot_validation_curves(
    curves: list[tuple[str, list[dict]]], path: pathlib.Path, *, seconds_key: str, title: str
) -> None:
    """Validation accuracy against meta-steps and against hours (`entry[seconds_key]`), one
    line per `(label, entries)`, as a PNG; a legend when there is more than one line."""
    fig, axes = accuracy_axes(figsize=(10, 3.8))
    for label, entries in curves:
        accuracy = [100 * e["logs"][MONITOR] for e in entries]
        axes[0].plot([e["meta_steps"] for e in entries], accuracy, marker=".", label=label)
        axes[1].plot([e[seconds_key] / 3600 for e in entries], accuracy, marker=".")
    axes[0].set_xlabel("meta-steps")
    axes[0].set_ylabel("validation accuracy (%)")
    if len(curves) > 1:
        axes[0].legend()
    axes[1].set_xlabel("training hours (wall clock, validation excluded)")
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path: pathlib.Path) -> None:
    """Grids every panel, fits the layout, writes the PNG (100 dpi) and frees the figure."""
    from matplotlib import pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
