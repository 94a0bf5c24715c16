"""Forward solvers of dqp (installed as ``dqp.solvers``)."""

from dqp.solvers.base import (  # noqa: F401
    ForwardSolver,
    RawSolution,
    available_solvers,
    get_solver,
    register_solver,
    registered_solvers,
    resolve_solver_name,
    solver_table,
)
from dqp.solvers import qpsolvers_backend  # noqa: F401,E402  (registers the qpsolvers backends)
from dqp.solvers import osqp_native  # noqa: F401,E402  (OSQP direct: workspace reuse, dual warm start)
from dqp.solvers import piqp_native  # noqa: F401,E402  (PIQP direct on sparse data: workspace reuse)
from dqp.solvers import ipm  # noqa: F401,E402  (registers the built-in interior-point method)
