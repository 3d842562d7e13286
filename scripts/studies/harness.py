"""The studies' harness: flags generated from a config dataclass, one `--tiny` rule, one main.

A study is a frozen dataclass `Config` (each field declared once with `option`: its default,
its help text and its value for a seconds-long smoke run, `tiny=`), and a function `run(config) -> results` that writes its Markdown, JSON and figures through
`reporting.write`. `main(Config, run, tiny=tiny_values(Config))` does the rest:

- one absl flag per field, its type read from the annotation: `bool`, `int`, `float`, `str`
  (an enum when the field names its `choices`), any of these or `None`, and `tuple[...]` of
  `int`, `float` or `str` as a comma-separated list (empty items dropped). Fields declared
  with `flag=False` have no flag.
- `--tiny`: the fields' `tiny=` values replace their defaults; a flag given explicitly on
  the command line still wins over both.
- `config.validate()` before any work; its `ValueError` becomes a usage error.

Nothing here imports TensorFlow, so a study that only launches other processes stays light.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time
import types
import typing
from collections.abc import Callable

import numpy as np
from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The project's copy of mini-ImageNet beside the repository, unless the user names one.
_SHARED_MINI_IMAGENET = pathlib.Path(__file__).resolve().parents[3] / "shared/data/mini_imagenet"
if _SHARED_MINI_IMAGENET.is_dir():
    os.environ.setdefault("TF_IMAML_MINI_IMAGENET", str(_SHARED_MINI_IMAGENET))

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRETRAINED = ROOT / "tf_imaml" / "pretrained" / "omniglot_5way_1shot.keras"


_NOT_TINY = object()


def option(
    default,
    help: str,  # noqa: A002
    *,
    tiny=_NOT_TINY,
    choices=None,
    lower_bound=None,
    flag: bool = True,
):
    """A config field: its default, its flag's help text and, if given, its `--tiny` value.

    Args:
      default: The field's default (and its flag's).
      help: The flag's help text.
      tiny: The value under `--tiny` (not given: the default).
      choices: The allowed values of a `str` field (its flag is then an enum) or of the
        items of a tuple field.
      lower_bound: The smallest value of an `int` field (or of each item of a tuple field).
      flag: Whether the field has a flag at all.
    """
    metadata = {"help": help, "choices": choices, "lower_bound": lower_bound, "flag": flag}
    if tiny is not _NOT_TINY:
        metadata["tiny"] = tiny
    return dataclasses.field(default=default, metadata=metadata)


def tiny_values(config_cls) -> dict:
    """`{field: value}` of the fields whose `option` names a `--tiny` value."""
    return {
        f.name: f.metadata["tiny"] for f in dataclasses.fields(config_cls) if "tiny" in f.metadata
    }


def _flag_fields(config_cls) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(config_cls)
    fields = []
    for field in dataclasses.fields(config_cls):
        if not field.metadata.get("flag", True):
            continue
        if "help" not in field.metadata:
            raise TypeError(f"{config_cls.__name__}.{field.name} has no help text (use option)")
        fields.append((field, hints[field.name]))
    return fields


def _base_type(hint) -> tuple[type, type | None]:
    """`(outer, item)`: `int | None` -> `(int, None)`, `tuple[float, ...]` -> `(tuple, float)`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return tuple, typing.get_args(hint)[0]
    return hint, None


def define_flags(config_cls, *, tiny: dict | None = None, flag_values=flags.FLAGS) -> None:
    """Defines one absl flag per field of `config_cls` (and `--tiny` when `tiny` is given)."""
    fv = dict(flag_values=flag_values)
    for field, hint in _flag_fields(config_cls):
        kind, item = _base_type(hint)
        meta, name, default = field.metadata, field.name, field.default
        if kind is tuple:
            flags.DEFINE_list(name, [str(v) for v in default], meta["help"], **fv)
        elif kind is bool:
            flags.DEFINE_bool(name, default, meta["help"], **fv)
        elif kind is int:
            flags.DEFINE_integer(name, default, meta["help"], lower_bound=meta["lower_bound"], **fv)
        elif kind is float:
            flags.DEFINE_float(name, default, meta["help"], **fv)
        elif kind is str and meta["choices"]:
            flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"], **fv)
        elif kind is str:
            flags.DEFINE_string(name, default, meta["help"], **fv)
        else:
            raise TypeError(f"{config_cls.__name__}.{name}: no flag for type {hint}")
    if tiny is not None:
        flags.DEFINE_bool(
            "tiny",
            False,
            "A seconds-long smoke run: the study's TINY sizes replace the defaults "
            f"({', '.join(sorted(tiny))}); flags given explicitly still win.",
            **fv,
        )


def check_fields(config) -> None:
    """Raises `ValueError` for the first field outside its declared `lower_bound` or `choices`.

    The flags enforce these for the command line; this enforces them for a config built in
    code, and for the items of tuple fields (a list flag has no bound of its own).
    """
    for field in dataclasses.fields(config):
        meta, value = field.metadata, getattr(config, field.name)
        if value is None or not meta:
            continue
        items = value if isinstance(value, tuple) else (value,)
        bound, choices = meta.get("lower_bound"), meta.get("choices")
        if bound is not None and any(v < bound for v in items):
            raise ValueError(f"--{field.name} must be >= {bound}, got {value}")
        unknown = sorted(set(items) - set(choices)) if choices else []
        if unknown:
            raise ValueError(f"--{field.name} must be among {tuple(choices)}, got {unknown}")


def config_from_flags(config_cls, *, tiny: dict | None = None, flag_values=flags.FLAGS):
    """The config the parsed flags describe, `--tiny` applied (see the module docstring)."""
    values = {}
    for field, hint in _flag_fields(config_cls):
        kind, item = _base_type(hint)
        value = flag_values[field.name].value
        if kind is tuple and value is not None:
            value = tuple(item(v) for v in value if v)
        values[field.name] = value
    if tiny is not None and flag_values.tiny:
        for name, value in tiny.items():
            if name not in flag_values or not flag_values[name].present:
                values[name] = value
    return config_cls(**values)


def main(
    config_cls,
    run: Callable,
    *,
    tiny: dict | None = None,
    merge: Callable | None = None,
    merge_help: str = "",
) -> None:
    """Defines the flags, parses them, validates the config and calls `run(config)`.

    With `merge` (`merge(paths, output_dir)`), a `--merge` flag is defined too (its help:
    `merge_help`); given, it combines finished runs' JSON files instead of running.
    """
    define_flags(config_cls, tiny=tiny)
    if merge is not None:
        flags.DEFINE_list("merge", [], "Instead of running: " + merge_help)

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if merge is not None and flags.FLAGS.merge:
            try:
                merge(flags.FLAGS.merge, flags.FLAGS.output_dir)
            except (ValueError, OSError) as err:
                raise app.UsageError(f"--merge: {err}") from None
            print(f"merged {len(flags.FLAGS.merge)} runs into {flags.FLAGS.output_dir}")
            return
        try:
            config = config_from_flags(config_cls, tiny=tiny)
            check_fields(config)
            config.validate()
        except ValueError as err:
            raise app.UsageError(str(err)) from None
        start = time.time()
        run(config)
        print(f"done in {time.time() - start:.0f} s; results in {config.output_dir}")

    app.run(_main)


def check_same(path, config: dict, reference: dict, fields) -> None:
    """Raises `ValueError` naming the first of `fields` in which the recorded `config` of the
    run in `path` differs from `reference` (runs to be merged must agree on them)."""
    for field in fields:
        if config.get(field) != reference.get(field):
            raise ValueError(
                f"{path} has {field}={config.get(field)!r}, another run has "
                f"{reference.get(field)!r}"
            )


def repeated(keys: list) -> list:
    """The keys met more than once, sorted."""
    return sorted({k for k in keys if keys.count(k) > 1}, key=str)


def command(study: str) -> str:
    """The command line that ran this study, as recorded in its JSON."""
    return f"python scripts/studies/{study}.py " + " ".join(sys.argv[1:])


def output_folder(config, *, deterministic: bool) -> pathlib.Path:
    """Validates `config`, creates its `output_dir`; with `deterministic`, op determinism on."""
    check_fields(config)
    config.validate()
    out = pathlib.Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    return out


def log(verbose: bool, message: str) -> None:
    """Prints a progress line when `verbose`."""
    if verbose:
        print(message, flush=True)


def tolist(value):
    """Arrays inside nested dicts, lists and tuples as lists (for JSON)."""
    if isinstance(value, dict):
        return {k: tolist(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tolist(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def mean(values, ok=None, *, nan_unless_finite: bool = False) -> float:
    """The mean of `values` over the tasks where `ok` is true (all when none or no `ok`).

    With `nan_unless_finite`, NaN when any value is not finite (instead of inf or NaN).
    """
    values = np.asarray(values, np.float64)
    if nan_unless_finite and not np.all(np.isfinite(values)):
        return float("nan")
    if ok is not None and np.any(ok):
        values = values[np.asarray(ok)]
    return float(np.mean(values))


def compare(estimate, target, fields=("cosine", "one_minus_cosine", "relative_error")) -> dict:
    """Per-task agreement of gradients `[T, N]` with `target` `[T, N]`, the named `fields`.

    `cosine`, `one_minus_cosine`, `relative_error` (`||g - g*|| / ||g*||`), `target_norm`
    and `finite` (both rows finite), each `[T]`, in the order asked.
    """
    estimate = np.asarray(estimate, np.float64)
    target = np.asarray(target, np.float64)
    target_norm = np.linalg.norm(target, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.sum(estimate * target, axis=1) / (
            np.linalg.norm(estimate, axis=1) * target_norm
        )
        values = {
            "cosine": cosine,
            "one_minus_cosine": 1.0 - cosine,
            "relative_error": np.linalg.norm(estimate - target, axis=1) / target_norm,
            "target_norm": target_norm,
            "finite": np.isfinite(estimate).all(axis=1) & np.isfinite(target).all(axis=1),
        }
    return {name: values[name] for name in fields}
