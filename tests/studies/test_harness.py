"""scripts/studies/harness.py: flags generated from a config, the --tiny rule, comparisons."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from absl import flags


@pytest.fixture(scope="module")
def harness(study):
    return study


@pytest.fixture
def config_cls(harness):
    option = harness.option

    @dataclasses.dataclass(frozen=True)
    class Config:
        output_dir: str = option("out", "Where results go.")
        lams: tuple[float, ...] = option((0.5, 2.0), "Proximal strengths.")
        steps: tuple[int, ...] = option((1, 5), "Inner steps.")
        names: tuple[str, ...] = option(("a",), "Names.")
        num_tasks: int = option(8, "Tasks.", lower_bound=1)
        size: int | None = option(None, "Image side.")
        lam: float = option(2.0, "lam.")
        dataset: str = option("omniglot", "Data.", choices=("omniglot", "mini_imagenet"))
        use_x: bool = option(False, "A switch.")
        verbose: bool = option(True, "Not a flag.", flag=False)

    return Config


def _parse(harness, config_cls, argv, tiny=None):
    values = flags.FlagValues()
    harness.define_flags(config_cls, tiny=tiny, flag_values=values)
    values(["prog", *argv])
    return harness.config_from_flags(config_cls, tiny=tiny, flag_values=values), values


def test_flags_default_to_the_fields_and_parse_into_their_types(harness, config_cls):
    config, values = _parse(harness, config_cls, [])
    assert config == config_cls()  # Oracle: the dataclass's own defaults.
    assert "verbose" not in values and "tiny" not in values
    config, _ = _parse(
        harness,
        config_cls,
        ["--lams=0.1,1e-3", "--steps=", "--names=x,,y", "--size=14", "--dataset=mini_imagenet"],
    )
    assert config.lams == (0.1, 1e-3) and config.steps == () and config.names == ("x", "y")
    assert config.size == 14 and config.dataset == "mini_imagenet"
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(harness, config_cls, ["--num_tasks=0"])
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(harness, config_cls, ["--dataset=imagenet"])


def test_tiny_replaces_defaults_and_explicit_flags_win(harness, config_cls):
    tiny = dict(num_tasks=2, lams=(1.0,), verbose=False)
    config, _ = _parse(harness, config_cls, ["--tiny"], tiny=tiny)
    assert config == config_cls(num_tasks=2, lams=(1.0,), verbose=False)
    config, _ = _parse(harness, config_cls, ["--tiny", "--num_tasks=3"], tiny=tiny)
    assert config.num_tasks == 3 and config.lams == (1.0,)
    config, _ = _parse(harness, config_cls, ["--num_tasks=3"], tiny=tiny)
    assert config == config_cls(num_tasks=3)


def test_a_field_without_help_is_refused(harness):
    @dataclasses.dataclass(frozen=True)
    class Bad:
        x: int = 1

    with pytest.raises(TypeError, match="Bad.x has no help text"):
        harness.define_flags(Bad, flag_values=flags.FlagValues())


def test_compare_against_hand_computed_values(harness):
    # Oracle: numbers worked by hand. Row 0: g = (3, 4), g* = (3, 0): cos 0.6, error 4/3.
    # Row 1: g = g* = (1, 1): cos 1, error 0.
    estimate = np.array([[3.0, 4.0], [1.0, 1.0]])
    target = np.array([[3.0, 0.0], [1.0, 1.0]])
    got = harness.compare(estimate, target, ("cosine", "relative_error", "target_norm", "finite"))
    assert list(got) == ["cosine", "relative_error", "target_norm", "finite"]
    np.testing.assert_allclose(got["cosine"], [0.6, 1.0], rtol=1e-15)
    np.testing.assert_allclose(got["relative_error"], [4 / 3, 0.0], rtol=1e-15)
    np.testing.assert_allclose(got["target_norm"], [3.0, np.sqrt(2)], rtol=1e-15)
    assert got["finite"].tolist() == [True, True]


def test_mean_over_trusted_tasks_and_nan_unless_finite(harness):
    assert harness.mean([1.0, 3.0, 8.0], [True, True, False]) == 2.0
    assert harness.mean([1.0, 3.0], [False, False]) == 2.0  # No trusted task: all of them.
    assert harness.mean([1.0, np.inf]) == np.inf
    assert np.isnan(harness.mean([1.0, np.inf], nan_unless_finite=True))
    assert harness.tolist({"a": (np.arange(2), [np.ones(1)])}) == {"a": [[0, 1], [[1.0]]]}


def test_check_fields_enforces_declared_bounds_and_choices_on_configs_built_in_code(harness):
    @dataclasses.dataclass(frozen=True)
    class Config:
        tasks: int = harness.option(4, "Tasks.", lower_bound=1)
        steps: tuple[int, ...] = harness.option((1, 2), "Steps.", lower_bound=1)
        weights: tuple[str, ...] = harness.option(("a",), "Weights.", choices=("a", "b"))
        mode: str = harness.option("x", "Mode.", choices=("x", "y"))

    harness.check_fields(Config())
    for changes, message in [
        ({"tasks": 0}, "--tasks must be >= 1, got 0"),
        ({"steps": (1, 0)}, r"--steps must be >= 1, got \(1, 0\)"),
        ({"weights": ("a", "c")}, r"--weights must be among \('a', 'b'\), got \['c'\]"),
        ({"mode": "z"}, r"--mode must be among \('x', 'y'\), got \['z'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            harness.check_fields(Config(**changes))
