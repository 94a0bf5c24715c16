"""Backward linear solvers of dqp (installed as ``dqp.linsolve``)."""

from dqp.linsolve.base import (  # noqa: F401
    Factorization,
    LinearSolver,
    available_linsolvers,
    get_linsolver,
    linsolver_table,
    register_linsolver,
    registered_linsolvers,
    resolve_linsolver_name,
)
from dqp.linsolve import scipy_solvers  # noqa: F401,E402  (qdldl, pardiso, SciPy LU/LDL/SuperLU)
from dqp.linsolve import torch_batched  # noqa: F401,E402  (batched torch, any device)
