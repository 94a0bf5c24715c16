"""The built-in batched interior-point engine (pure torch, any device; a fused CUDA/C++ kernel).

:func:`ipm_solve` solves a batch of convex QPs; :class:`IPMOptions` holds its engine tuning;
:class:`IPMSolver` is its entry in the forward-solver registry.
"""

from dqp.solvers.ipm.dispatch import fused_flag, fused_reasons
from dqp.solvers.ipm.graphs import clear_graph_cache, graph_device_ok, graph_stats, graphed_call
from dqp.solvers.ipm.newton import dual_factors, factor_ok, form_by_cost
from dqp.solvers.ipm.options import DEFAULT_OPTIONS, CholeskyOptions, IPMOptions, KernelOptions
from dqp.solvers.ipm.problem import IPMResult, default_eps
from dqp.solvers.ipm.solve import IPMSolver, ipm_solve

__all__ = [
    "IPMResult",
    "IPMSolver",
    "IPMOptions",
    "CholeskyOptions",
    "KernelOptions",
    "DEFAULT_OPTIONS",
    "ipm_solve",
    "default_eps",
    "clear_graph_cache",
    "graphed_call",
    "factor_ok",
    "form_by_cost",
    "fused_flag",
    "fused_reasons",
    "dual_factors",
    "graph_device_ok",
    "graph_stats",
]
