"""The reference-compatible front door: ``from dqp import dQP``.

>>> from dqp import dQP
>>> settings = dQP.build_settings(qp_solver="clarabel", lin_solver="qdldl")
>>> layer = dQP.dQP_layer(settings=settings)
"""
from dqp.layer import dQP_layer  # noqa: F401
from dqp.settings import Settings, build_settings, options_table  # noqa: F401

__all__ = ["build_settings", "dQP_layer", "Settings", "options_table"]
