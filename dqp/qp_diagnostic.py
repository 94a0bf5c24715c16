"""libdqp's ``qp_diagnostic`` matrices and entry point, over dqp's own code.

* :func:`get_full_D` — the Jacobian of the full KKT conditions (all inequalities, complementarity
  rows included), whose conditioning the dQP paper compares with the reduced system.
* :func:`get_reduced_KKT` — the reduced KKT matrix on the active set (dqp's
  :func:`dqp.kkt.assemble_kkt`, active set by :func:`dqp.engine.detect_active`).
* :func:`benchmark` — the solver diagnostic, routed to :func:`dqp.diagnose.diagnose`
  (see :mod:`dqp.benchmark`).

Data are NumPy arrays or SciPy sparse matrices; vectors may be columns ``(k, 1)``. libdqp's timing
and plotting internals (``test_qp``, ``test_linear``, ``visualize_*``) are replaced by
:mod:`dqp.diagnose`.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import scipy.sparse as sp

from dqp.benchmark import benchmark  # noqa: F401  (libdqp exposed it here as well)

__all__ = ["get_full_D", "get_reduced_KKT", "benchmark"]


def _v(x: Any) -> Optional[np.ndarray]:
    return None if x is None else np.asarray(x, dtype=np.float64).reshape(-1)


def get_full_D(Q, q, G, h, A, b, x, nu, is_sparse: bool):  # noqa: N802  (libdqp's name)
    """The full KKT Jacobian at ``(x, ν)``.

    ``D = [[Q, Aᵀ, Gᵀ diag(ν)], [A, 0, 0], [G, 0, −diag(h − Gx)]]`` (the ``A`` block row and column
    only with equalities). The equality duals do not enter D, so they are not arguments (libdqp's
    signature). Returns a dense ``ndarray`` (``np.matrix`` in libdqp) or, with ``is_sparse``, a
    SciPy CSC matrix.
    """
    x, nu, h = _v(x), _v(nu), _v(h)
    slack = h - np.asarray(G @ x).reshape(-1)
    if is_sparse:
        Gs = sp.csc_matrix(G)
        rows = [[sp.csc_matrix(Q), None, Gs.T @ sp.diags(nu)]]
        if A is not None:
            rows[0][1] = sp.csc_matrix(A).T
            rows.append([sp.csc_matrix(A), None, None])
        rows.append([Gs, None, -sp.diags(slack)])
        if A is None:
            rows = [[r[0], r[2]] for r in rows]
        return sp.bmat(rows, format="csc")
    Qd, Gd = np.asarray(Q, dtype=np.float64), np.asarray(G, dtype=np.float64)
    n, m = Qd.shape[0], Gd.shape[0]
    p = 0 if A is None else np.asarray(A).shape[0]
    D = np.zeros((n + p + m, n + p + m))
    D[:n, :n] = Qd
    D[:n, n + p :] = Gd.T * nu
    D[n + p :, :n] = Gd
    D[n + p :, n + p :] = -np.diag(slack)
    if p:
        Ad = np.asarray(A, dtype=np.float64)
        D[:n, n : n + p] = Ad.T
        D[n : n + p, :n] = Ad
    return D


def get_reduced_KKT(Q, q, G, h, A, b, x, nu, is_sparse: bool, eps_active: float) -> Tuple[Any, np.ndarray]:  # noqa: N802
    """The reduced KKT matrix ``[[Q, Āᵀ], [Ā, 0]]``, ``Ā = [A; G_J]``, and the active mask ``J``.

    ``J`` is dqp's active set (:func:`dqp.engine.detect_active`: slack or dual beyond
    ``eps_active``, each relative to its scale), where libdqp required a small slack *and* a
    positive dual.
    """
    from dqp.engine import detect_active
    from dqp.kkt import assemble_kkt

    Gm = sp.csr_matrix(G) if is_sparse else np.asarray(G, dtype=np.float64)
    active, _ = detect_active(Gm, _v(h), _v(x), _v(nu), float(eps_active))
    return assemble_kkt(Q, A, Gm[active], sparse=is_sparse), active
