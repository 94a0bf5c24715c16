"""dqp: differentiable quadratic programming layers for PyTorch.

``min ½zᵀPz + qᵀz  s.t.  Cz ≤ d,  Az = b`` as a layer, with gradients to P, q, C, d, A, b.

* ``from dqp import dQP`` — ``dQP.build_settings(...)`` and ``dQP.dQP_layer(settings=...)``: any
  :mod:`qpsolvers` backend forward (dense or sparse), exact active-set KKT backward.
* ``from dqp.qpth import QPFunction`` — the qpth/OptNet API on the built-in batched
  interior-point method (CPU or GPU).
"""

import logging as _logging

from dqp import dQP  # noqa: F401
from dqp.errors import (  # noqa: F401
    DQPError,
    InfeasibleError,
    InputError,
    LayoutError,
    MaxIterationsError,
    NonFiniteError,
    NotPSDError,
    NotSymmetricError,
    SettingsError,
    ShapeError,
    SolveError,
    SolverFailedError,
    SolverNotAvailableError,
    Status,
    UnboundedError,
)
from dqp.autograd import GradientAccuracyWarning  # noqa: F401
from dqp.errors import NotSupportedError  # noqa: F401
from dqp.kkt import SingularKKTWarning  # noqa: F401
from dqp.layer import UnverifiedSolutionWarning, dQP_layer  # noqa: F401
from dqp.result import QPOutput, SolveInfo  # noqa: F401
from dqp.settings import Settings, build_settings  # noqa: F401
from dqp.sparse import sparse_csc_tensor  # noqa: F401

__version__ = "0.1.0"
__all__ = [
    "dQP",
    "dQP_layer",
    "build_settings",
    "Settings",
    "QPOutput",
    "SolveInfo",
    "Status",
    "DQPError",
    "SettingsError",
    "SolverNotAvailableError",
    "InputError",
    "ShapeError",
    "NonFiniteError",
    "NotSymmetricError",
    "NotPSDError",
    "LayoutError",
    "SolveError",
    "InfeasibleError",
    "UnboundedError",
    "MaxIterationsError",
    "SolverFailedError",
    "sparse_csc_tensor",
    "NotSupportedError",
    "UnverifiedSolutionWarning",
    "SingularKKTWarning",
    "GradientAccuracyWarning",
]
_logging.getLogger("dqp").addHandler(_logging.NullHandler())

#: libdqp's top-level helpers, imported on first use (``from dqp import initialize_torch_from_npz``).
_LIBDQP_NAMES = {
    "initialize_torch_from_npz": "dqp.sparse_helper",
    "csc_torch_to_scipy": "dqp.sparse_helper",
    "csc_scipy_to_torch": "dqp.sparse_helper",
    "get_dense_solvers": "dqp.lin_solvers",
    "get_sparse_solvers": "dqp.lin_solvers",
}


def __getattr__(name: str):
    if name in _LIBDQP_NAMES:
        import importlib

        return getattr(importlib.import_module(_LIBDQP_NAMES[name]), name)
    raise AttributeError(f"module 'dqp' has no attribute {name!r}")
