"""tf_imaml: meta-learning with implicit gradients (iMAML) for TensorFlow and Keras.

Rajeswaran, Finn, Kakade, Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019.

The functional core (pure functions over task-batched lists of tensors):
`tree`, `hvp`, `linear_solve`, `inner_solvers`, `implicit`, `curvature`, and the configured
solvers `CG`, `ProximalDescent` and `HessianFree` (`solvers`). The task layer
(a Keras learner and a loss as per-task closures): `tasks`. Keras pieces: `layers`,
`models`. Shipped meta-learners, loaded by name: `pretrained`.

Not imported here: `tf_imaml.testing` (problems with known answers, for tests and the
demo) and `tf_imaml.reference` (the exact proximal point by L-BFGS, an oracle for checking
meta-gradients), which are imported where needed.
"""

from tf_imaml import baselines
from tf_imaml import batched
from tf_imaml import callbacks
from tf_imaml import curvature
from tf_imaml import datasets
from tf_imaml import episode_checks
from tf_imaml import episodes
from tf_imaml import evaluation
from tf_imaml import hessian_free
from tf_imaml import hvp
from tf_imaml import implicit
from tf_imaml import inner_solvers
from tf_imaml import layers
from tf_imaml import linear_solve
from tf_imaml import meta_batch
from tf_imaml import meta_model
from tf_imaml import mini_imagenet
from tf_imaml import models
from tf_imaml import pretrained
from tf_imaml import solvers
from tf_imaml import tasks
from tf_imaml import tree
from tf_imaml import unrolled
from tf_imaml.baselines import MAML
from tf_imaml.baselines import Reptile
from tf_imaml.curvature import lanczos_extreme_eigenvalues
from tf_imaml.curvature import proximal_curvature
from tf_imaml.imaml import ImplicitMAML
from tf_imaml.implicit import attach_implicit_gradient
from tf_imaml.implicit import implicit_meta_gradient
from tf_imaml.implicit import proximal_adapt
from tf_imaml.inner_solvers import minimize_proximal
from tf_imaml.layers import BatchStatNormalization
from tf_imaml.layers import ExactMaxPool2D
from tf_imaml.linear_solve import solve_cg
from tf_imaml.linear_solve import solve_cg_tf
from tf_imaml.solvers import CG
from tf_imaml.solvers import HessianFree
from tf_imaml.solvers import ProximalDescent

__version__ = "0.1.0"

__all__ = [
    "BatchStatNormalization",
    "CG",
    "ExactMaxPool2D",
    "HessianFree",
    "ImplicitMAML",
    "MAML",
    "ProximalDescent",
    "Reptile",
    "attach_implicit_gradient",
    "baselines",
    "batched",
    "callbacks",
    "curvature",
    "datasets",
    "episode_checks",
    "episodes",
    "evaluation",
    "hvp",
    "implicit",
    "implicit_meta_gradient",
    "inner_solvers",
    "lanczos_extreme_eigenvalues",
    "layers",
    "linear_solve",
    "meta_batch",
    "meta_model",
    "mini_imagenet",
    "minimize_proximal",
    "proximal_curvature",
    "models",
    "pretrained",
    "tasks",
    "proximal_adapt",
    "solve_cg",
    "solve_cg_tf",
    "solvers",
    "tree",
    "unrolled",
    "hessian_free",
]
