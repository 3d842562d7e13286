"""Configured solvers: iMAML's linear solve and inner solver, each one argument.

As jaxopt passes one configured `solve` callable instead of threading its options, iMAML
takes its two solvers as values that hold their own options and defaults:

- `CG`: the linear solve of the implicit meta-gradient,
  `((1 + damping) I + H / (lam + lam_damping)) g = v`, by conjugate gradient over
  Hessian-vector products. Called as a linear solver of `linear_solve`'s shape,
  `cg(matvec_fn, b) -> LinearSolveResult`; `cg.matvec_fn(support_loss_fn, phi, lam=lam)`
  builds the system's matrix-vector product.
- `ProximalDescent` and `HessianFree`: the inner solvers, each called as
  `solver(support_loss_fn, meta_params, *, lam, num_steps, learning_rate) -> InnerSolveResult`.

```python
meta = tf_imaml.ImplicitMAML(
    learner,
    inner_solver=tf_imaml.ProximalDescent(optimizer="momentum"),
    linear_solver=tf_imaml.CG(steps=10, damping=1.0),
)
```

They are frozen dataclasses: their defaults are the library's defaults (nothing else
repeats them), they compare by value and `get_config`/`from_config` turn them into plain
dicts and back. `linear_solver_from` and `inner_solver_from` resolve the string and keyword
shortcuts (`linear_solver="cg"`, `cg_steps=10`, `inner_optimizer="adam"`, ...) into them once.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any
from typing import ClassVar

from tf_imaml import checks
from tf_imaml import hessian_free
from tf_imaml import hvp as hvp_lib
from tf_imaml import inner_solvers
from tf_imaml import linear_solve
from tf_imaml import tree

# How Hessian-vector products are formed by default, in every solver: the support gradient
# at phi is recorded once and each product differentiates it again (`tf_imaml.hvp`); exact,
# and the cheapest of the three when several products are taken at one point.
DEFAULT_HVP_MODE = "linearized"
FIRST_ORDER_OPTIMIZERS = ("gd", "momentum", "nesterov", "adam")
INNER_LOOPS = ("proximal", "pull_back")


def _check_int(minimum: int, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_fraction(name: str, value) -> None:
    checks.check_non_negative(name, value)
    if not value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _choice(choices, name: str, value) -> None:
    checks.check_choice(name, value, choices)


class _Config:
    """Checks, `get_config`/`from_config` and `replace` of the frozen dataclasses below.

    `_CHECKS` maps each field to `check(name, value)`, which raises naming `name`: the
    field's own name when the object is built, the keyword's when a shortcut sets it.
    """

    _CHECKS: ClassVar[dict] = {}

    def __post_init__(self):
        for field, check in self._CHECKS.items():
            check(field, getattr(self, field))

    def get_config(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serializable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        return cls(**config)

    def replace(self, **changes):
        """A copy with `changes` applied (and checked)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class CG(_Config):
    """Conjugate gradient on iMAML's linear system, configured.

    Solves `((1 + damping) I + H / (lam + lam_damping)) g = v` per task, `H` the support-loss
    Hessian at the adapted parameters (Rajeswaran et al. 2019, eq. 6, with the authors'
    damping terms as options). A solve fails when its final relative residual exceeds
    `max_residual`, when it meets curvature `p.Ap <= 0`, or when its answer is not finite
    (`linear_solve`); what a failed task contributes is the meta-learner's `on_failure`,
    which is not a solver option because it also decides how many tasks the mean over a
    meta-batch divides by.

    Args:
      steps: Conjugate-gradient iterations at most (the paper's "CG steps"), `>= 0`.
        Default value: `5`.
      tol: Relative residual at which a task stops early, `>= 0`. Default value: `1e-10`
        (in practice all `steps` are taken).
      max_residual: A final relative residual above this marks the task failed, `> 0`;
        `1.0` is the residual of `g = 0`. Default value: `1.0`.
      damping: Extra identity term, `>= 0` (jaxopt's `ridge`). Default value: `0.0`.
      lam_damping: Added to `lam` in the system only, `>= 0` (the inner loop keeps `lam`).
        The authors' code uses `damping=1.0, lam_damping=10.0`: at `lam = 2` it solves
        `(2 I + H/12) g = v`, a damped gradient between the implicit and a scaled
        first-order one. Default value: `0.0`.
      hvp_mode: How `H v` is formed: `"linearized"`, `"reverse_over_reverse"` or
        `"forward_over_reverse"` (`tf_imaml.hvp`). Default value: `"linearized"`.
      implementation: `"cg"` (ours, per-task stopping, `linear_solve.solve_cg`) or
        `"cg_tf"` (`tf.linalg`'s CG, `linear_solve.solve_cg_tf`). Default value: `"cg"`:
        `tf.linalg`'s batch keeps stepping a task that has converged, and a task whose
        residual reaches exactly 0 (its Hessian is exactly 0, as for a support loss a trained
        model has memorised) then divides 0 by 0 and reads as a failed solve.

    Raises:
      ValueError: For a field out of range, naming it.
    """

    steps: int = 5
    tol: float = 1e-10
    max_residual: float = 1.0
    damping: float = 0.0
    lam_damping: float = 0.0
    hvp_mode: str = DEFAULT_HVP_MODE
    implementation: str = "cg"

    _CHECKS: ClassVar[dict] = dict(
        steps=functools.partial(_check_int, 0),
        tol=checks.check_non_negative,
        max_residual=checks.check_positive,
        damping=checks.check_non_negative,
        lam_damping=checks.check_non_negative,
        hvp_mode=functools.partial(_choice, hvp_lib.HVP_MODES),
        implementation=functools.partial(_choice, tuple(linear_solve.LINEAR_SOLVERS)),
    )

    def system_lam(self, lam):
        """The `lam` of the linear system: `lam + lam_damping`."""
        return lam + self.lam_damping

    def matvec_fn(self, support_loss_fn: hvp_lib.LossFn, adapted_params: tree.Params, *, lam):
        """`v -> (1 + damping) v + H v / (lam + lam_damping)`, `H` at `adapted_params`."""
        return hvp_lib.make_proximal_matvec(
            support_loss_fn,
            adapted_params,
            lam=self.system_lam(lam),
            damping=self.damping,
            mode=self.hvp_mode,
        )

    def __call__(
        self, matvec_fn: linear_solve.MatvecFn, b: tree.Params, *, x0: tree.Params | None = None
    ) -> linear_solve.LinearSolveResult:
        """Solves `A x = b` per task, `A` given by `matvec_fn`: a `LinearSolveResult`."""
        solve = linear_solve.LINEAR_SOLVERS[self.implementation]
        return solve(
            matvec_fn,
            b,
            x0=x0,
            tol=self.tol,
            max_iter=self.steps,
            max_residual=self.max_residual,
        )


@dataclasses.dataclass(frozen=True)
class ProximalDescent(_Config):
    """A first-order inner solver: `num_steps` of an update rule from `phi = theta`.

    `loop="proximal"` steps on `L_support(phi) + lam/2 ||phi - theta||^2` (the paper's
    iMAML-GD with `optimizer="gd"`; `inner_solvers.minimize_proximal`). `loop="pull_back"`
    steps on `L_support` alone, then takes one step of size `learning_rate` on the proximal
    term, `phi <- phi - learning_rate * lam * (phi - theta)` (the authors' code;
    `inner_solvers.minimize_then_pull_back`).

    Args:
      optimizer: `"gd"`, `"momentum"`, `"nesterov"` or `"adam"` (`inner_solvers`).
        Default value: `"gd"`.
      momentum: `beta` of momentum and Nesterov, `beta_1` of Adam, in `[0, 1)`.
        Default value: `0.9`.
      loop: `"proximal"` or `"pull_back"`. Default value: `"proximal"`.

    Raises:
      ValueError: For a field out of range, naming it.
    """

    optimizer: str = "gd"
    momentum: float = 0.9
    loop: str = "proximal"

    _CHECKS: ClassVar[dict] = dict(
        optimizer=functools.partial(_choice, FIRST_ORDER_OPTIMIZERS),
        momentum=_check_fraction,
        loop=functools.partial(_choice, INNER_LOOPS),
    )

    def update_rule(self, learning_rate: float) -> inner_solvers.InnerOptimizer:
        """The `InnerOptimizer` of `optimizer` with step size `learning_rate`."""
        if self.optimizer == "gd":
            return inner_solvers.gradient_descent(learning_rate)
        if self.optimizer == "adam":
            return inner_solvers.adam(learning_rate, beta_1=self.momentum)
        nesterov = self.optimizer == "nesterov"
        return inner_solvers.momentum(learning_rate, beta=self.momentum, nesterov=nesterov)

    def __call__(
        self, support_loss_fn, meta_params, *, lam, num_steps, learning_rate
    ) -> inner_solvers.InnerSolveResult:
        """Adapts every task of task-batched `meta_params`: an `InnerSolveResult`."""
        optimizer = self.update_rule(learning_rate)
        if self.loop == "pull_back":
            return inner_solvers.minimize_then_pull_back(
                support_loss_fn,
                meta_params,
                lam=lam,
                num_steps=num_steps,
                optimizer=optimizer,
                pull_back_rate=learning_rate,
            )
        return inner_solvers.minimize_proximal(
            support_loss_fn, meta_params, lam=lam, num_steps=num_steps, optimizer=optimizer
        )


@dataclasses.dataclass(frozen=True)
class HessianFree(_Config):
    """iMAML-HF's inner solver: `num_steps` truncated-Newton steps on the proximal objective.

    Each direction comes from `cg_steps` CG iterations on `(H + lam I) d = -grad G`, the
    step length from a line search (`hessian_free.proximal_newton`). The inner
    learning rate is not used, except at `lam = 0` (a test-time adaptation without the
    proximal term, where the Newton system may be singular): there the solver takes
    `num_steps` plain gradient steps of that size.

    Args:
      cg_steps: CG iterations per Newton direction, `>= 1`. Default value: `5`.
      use_line_search: Hager-Zhang line search for the step length; otherwise steps of
        length `step_size`. Default value: `True`.
      step_size: The step length without the line search, `> 0`. Default value: `1.0`
        (full Newton steps).
      newton_damping: Added to `lam` in the Newton system only (Tikhonov damping),
        `>= 0`. Default value: `0.0`.
      hvp_mode: See `CG`. Default value: `"linearized"`.

    Raises:
      ValueError: For a field out of range, naming it.
    """

    cg_steps: int = 5
    use_line_search: bool = True
    step_size: float = 1.0
    newton_damping: float = 0.0
    hvp_mode: str = DEFAULT_HVP_MODE

    _CHECKS: ClassVar[dict] = dict(
        cg_steps=functools.partial(_check_int, 1),
        use_line_search=_check_bool,
        step_size=checks.check_positive,
        newton_damping=checks.check_non_negative,
        hvp_mode=functools.partial(_choice, hvp_lib.HVP_MODES),
    )

    def __call__(
        self, support_loss_fn, meta_params, *, lam, num_steps, learning_rate
    ) -> inner_solvers.InnerSolveResult:
        """Adapts every task of task-batched `meta_params`: an `InnerSolveResult`."""
        if not lam > 0:
            return ProximalDescent()(
                support_loss_fn,
                meta_params,
                lam=lam,
                num_steps=num_steps,
                learning_rate=learning_rate,
            )
        return hessian_free.proximal_newton(
            support_loss_fn,
            meta_params,
            lam=lam,
            num_steps=num_steps,
            cg_steps=self.cg_steps,
            use_line_search=self.use_line_search,
            step_size=self.step_size,
            newton_damping=self.newton_damping,
            hvp_mode=self.hvp_mode,
        ).inner


InnerSolver = ProximalDescent | HessianFree
_TYPES = {cls.__name__: cls for cls in (CG, ProximalDescent, HessianFree)}


def serialize(solver: CG | InnerSolver) -> dict[str, Any]:
    """`{"type": class name, "config": fields}`, for a Keras `get_config`."""
    return {"type": type(solver).__name__, "config": solver.get_config()}


def deserialize(config: dict[str, Any]) -> CG | InnerSolver:
    """The solver that `serialize` wrote."""
    if not (isinstance(config, dict) and config.get("type") in _TYPES):
        raise ValueError(f"not a serialized solver (one of {sorted(_TYPES)}): {config!r}")
    return _TYPES[config["type"]].from_config(config["config"])


# The keyword shortcuts of `ImplicitMAML` (and of `implicit`'s functions): keyword -> field.
CG_SHORTCUTS = {
    "cg_steps": "steps",
    "cg_tol": "tol",
    "max_residual": "max_residual",
    "damping": "damping",
    "lam_damping": "lam_damping",
    "hvp_mode": "hvp_mode",
}
INNER_SHORTCUTS = {
    ProximalDescent: {"inner_momentum": "momentum", "inner_loop": "loop"},
    HessianFree: {
        "inner_cg_steps": "cg_steps",
        "use_line_search": "use_line_search",
        "hvp_mode": "hvp_mode",
    },
}


def _fields(kind: str, solver, cls, shortcuts: dict[str, Any], names: dict[str, str]):
    """The fields that the given (non-None) shortcuts set, each checked under its keyword."""
    given = {name: value for name, value in shortcuts.items() if value is not None}
    if given and not isinstance(solver, str):
        raise ValueError(
            f"{', '.join(sorted(given))}: keyword shortcuts for a {kind} given by name; with a "
            f"configured {type(solver).__name__}, set them in it"
        )
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of {kind}={solver!r}")
    for name, value in given.items():
        cls._CHECKS[names[name]](name, value)
    return {names[name]: value for name, value in given.items()}


def linear_solver_from(linear_solver: CG | str = "cg", shortcuts: dict | None = None) -> CG:
    """A `CG` from a configured one, or from a name and keyword shortcuts.

    Args:
      linear_solver: A `CG`; or `"cg_tf"`/`"cg"` (or the functions `linear_solve.solve_cg_tf`,
        `linear_solve.solve_cg`), the `implementation` of a `CG` whose other fields are
        the shortcuts' values, or `CG`'s defaults where a shortcut is `None`.
      shortcuts: `{keyword: value or None}`, keywords of `CG_SHORTCUTS`.
        Default value: `None` (none).

    Raises:
      ValueError: On an unknown name, a shortcut given with a configured `CG`, or a field
        out of range (named by its keyword).
    """
    names = {fn: name for name, fn in linear_solve.LINEAR_SOLVERS.items()}
    if callable(linear_solver) and not isinstance(linear_solver, CG):
        if linear_solver not in names:
            raise ValueError(
                "linear_solver must be a tf_imaml.CG, one of "
                f"{sorted(linear_solve.LINEAR_SOLVERS)} or its function, got {linear_solver!r}"
            )
        linear_solver = names[linear_solver]
    options = _fields("linear_solver", linear_solver, CG, shortcuts or {}, CG_SHORTCUTS)
    if isinstance(linear_solver, CG):
        return linear_solver
    checks.check_choice("linear_solver", linear_solver, tuple(linear_solve.LINEAR_SOLVERS))
    return CG(implementation=linear_solver, **options)


def inner_solver_from(
    inner_solver: InnerSolver | str = "gd", shortcuts: dict | None = None
) -> InnerSolver:
    """A `ProximalDescent` or `HessianFree` from a configured one, or a name and shortcuts.

    Args:
      inner_solver: A configured inner solver; or `"gd"`, `"momentum"`, `"nesterov"`,
        `"adam"` (a `ProximalDescent` with that `optimizer`) or `"hessian_free"` (a
        `HessianFree`), whose other fields are the shortcuts' values or their defaults.
      shortcuts: `{keyword: value or None}`, keywords of `INNER_SHORTCUTS` for the solver
        named. `hvp_mode` is ignored for a `ProximalDescent`, which takes no Hessian-vector
        products. Default value: `None` (none).

    Raises:
      ValueError: On an unknown name, a shortcut that the solver does not have (naming
        it), a shortcut given with a configured solver, or a field out of range.
    """
    shortcuts = dict(shortcuts or {})
    hessian_free_named = isinstance(inner_solver, HessianFree) or inner_solver == "hessian_free"
    if hessian_free_named and shortcuts.get("inner_loop") == "pull_back":
        raise ValueError('inner_loop="pull_back" takes a first-order inner_optimizer')
    cls = HessianFree if hessian_free_named else ProximalDescent
    if cls is ProximalDescent:
        shortcuts.pop("hvp_mode", None)
    kind = "inner_optimizer" if isinstance(inner_solver, str) else "inner_solver"
    options = _fields(kind, inner_solver, cls, shortcuts, INNER_SHORTCUTS[cls])
    if not isinstance(inner_solver, str):
        return inner_solver
    checks.check_choice("inner_optimizer", inner_solver, (*FIRST_ORDER_OPTIMIZERS, "hessian_free"))
    if cls is ProximalDescent:
        options["optimizer"] = inner_solver
    return cls(**options)
