"""Meta-learners shipped with the package, loaded by name.

```python
tf_imaml.pretrained.names()  # ['omniglot_20way_1shot_lake', 'omniglot_5way_1shot']
meta = tf_imaml.pretrained.load("omniglot_5way_1shot")
logits = meta.predict_on_batch((support_x, support_y, query_x))
tf_imaml.pretrained.results("omniglot_5way_1shot")["test_accuracy"]  # as evaluate.py scores it
```

Each model is a `.keras` file in this package (package data, so it comes with the wheel),
beside `<name>.results.json` (its test accuracy and training command) and described in
`README.md` here. Shipping another model takes its files and one line in `MODELS`.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
from typing import NamedTuple

import keras

# Register every meta-learner class a shipped file may hold, for `keras.models.load_model`.
from tf_imaml import baselines  # noqa: F401
from tf_imaml import imaml  # noqa: F401


class ShippedModel(NamedTuple):
    """One shipped model: its file in this package and what it was trained for."""

    file: str  # File name in `tf_imaml/pretrained/`.
    description: str  # Dataset, ways, shots, class split and algorithm; scores: `results`.
    split: str = "vinyals"  # The Omniglot class split it was meta-trained on and is tested on.


# The registry: one line per shipped model, name -> file and description. Scores live in the
# model's results.json only (`results`), so that replacing a model cannot leave one stale here.
# fmt: off
MODELS = {
    "omniglot_5way_1shot": ShippedModel("omniglot_5way_1shot.keras", "Omniglot, 5-way 1-shot, Vinyals split (iMAML, the authors' system)"),
    "omniglot_20way_1shot_lake": ShippedModel("omniglot_20way_1shot_lake.keras", "Omniglot, 20-way 1-shot, Lake split: meta-trained on the background alphabets only (iMAML, the authors' system)", split="lake"),
}
# fmt: on


def names() -> list[str]:
    """Returns the names of the shipped models, sorted."""
    return sorted(MODELS)


def path(name: str) -> pathlib.Path:
    """Returns the `.keras` file of a shipped model.

    Args:
      name: A name from `names()`, e.g. `"omniglot_5way_1shot"`.

    Returns:
      The file's path inside the installed package.

    Raises:
      ValueError: If `name` is not a shipped model (the message lists those there are).
      FileNotFoundError: If the package was installed without its model files, or not as
        files on disk (e.g. zipped).
    """
    if name not in MODELS:
        raise ValueError(f"no shipped model named {name!r}; available: {', '.join(names())}")
    resource = importlib.resources.files(__name__).joinpath(MODELS[name].file)
    if not isinstance(resource, pathlib.Path) or not resource.is_file():
        raise FileNotFoundError(
            f"shipped model {name!r}: {resource} is missing (is tf_imaml installed as files, "
            "with its package data?)"
        )
    return resource


def load(name: str) -> keras.Model:
    """Loads a shipped meta-learner with `keras.models.load_model`.

    Args:
      name: A name from `names()`, e.g. `"omniglot_5way_1shot"`.

    Returns:
      The meta-learner (for `"omniglot_5way_1shot"`, a compiled `tf_imaml.ImplicitMAML`);
      its `learner` is the network it adapts.

    Raises:
      ValueError: If `name` is not a shipped model (the message lists those there are).
      FileNotFoundError: If the model's file is not installed (see `path`).
    """
    return keras.models.load_model(str(path(name)))


# Keys every `<name>.results.json` has: the test score as `scripts/evaluate.py --model=<name>`
# measures it by default (1 query image per class), and the command that measured it.
RESULT_KEYS = (
    "test_accuracy",
    "test_ci95",
    "test_tasks",
    "test_queries_per_class",
    "meta_steps",
    "train_seconds",
    "evaluate_command",
)


def results(name: str) -> dict:
    """Returns a shipped model's `<name>.results.json`: how it was trained and what it scores.

    Its `test_accuracy` and `test_ci95` (fractions; mean and 95% interval over `test_tasks`
    test tasks) are what `scripts/evaluate.py --model=<name>` prints, with
    `test_queries_per_class` query images per class; `evaluate_command` names the flags.

    Raises:
      ValueError: If `name` is not a shipped model (the message lists those there are).
      FileNotFoundError: If the model's files are not installed (see `path`).
    """
    file = path(name).with_name(f"{name}.results.json")
    if not file.is_file():
        raise FileNotFoundError(f"shipped model {name!r}: {file} is missing")
    return json.loads(file.read_text())
