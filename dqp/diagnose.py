"""Solver diagnostic: run one QP through every installed ``qp_solver`` × ``lin_solver`` pair.

For a problem given as a file (``.npz`` in dqp's form or a Maros–Meszaros ``.mat``, read by
:func:`dqp.io.load_problem`) or as arrays from Python, every combination goes through
:class:`dqp.dQP.dQP_layer` forward and backward, and the report records

* time: forward (the layer call) and backward (``torch.autograd.grad``), median over
  ``repeat`` runs, and the forward solver's own time (``layer.info.solve_time``);
* accuracy: the KKT residuals from ``layer.info`` (absolute, and relative to the data), the
  active-set verification (``layer.info.verified``), the KKT path (``"direct"`` or
  ``"regularized"``) and the number of weakly active constraints;
* agreement: the gradient of a fixed random linear loss ``wᵀz`` with respect to ``q``, ``d`` and
  ``b`` (and ``z`` itself) against the element-wise median over the combinations that solved —
  a combination that disagrees with the consensus is wrong, or the problem is degenerate;
* failures: the typed error class and its message (an untyped error is flagged as such).

Combinations are ranked correct first, then fastest (forward + backward). Run it as

    python -m dqp.diagnose PROBLEM.npz [--out plot.png] [--solvers clarabel osqp] \\
        [--lin-solvers qdldl scipy_lu] [--dense] [--repeat 3]

(or the console script ``dqp-diagnose``), or from Python::

    from dqp.diagnose import diagnose
    report = diagnose(P, q, C, d, A, b)
    print(report.to_markdown())
    report.recommended      # the best correct combination (ComboResult) or None

Library functions never print; :func:`main` (the CLI) prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch

from dqp.errors import DQPError, SettingsError, ShapeError, Status
from dqp.diagnose_report import STATUS_CODES, ComboResult, DiagnosisReport, unique_in_order
from dqp.io import PathLike, QPProblem, load_problem

logger = logging.getLogger("dqp.diagnose")

__all__ = [
    "ComboResult",
    "DiagnosisReport",
    "STATUS_CODES",
    "diagnose",
    "diagnose_problem",
    "diagnose_file",
    "build_parser",
    "main",
]

#: Problems with more variables than this are not densified for dense-only batched solvers
#: (the built-in IPM) unless ``dense=True`` is asked for.
DENSE_LIMIT = 2000
#: A file's problem is handed over dense when at least this fraction of the entries of P, C and A
#: are stored (and n ≤ DENSE_LIMIT); sparse otherwise. ``--dense``/``--sparse`` override it.
DENSE_FRACTION = 0.1

_BETA_WARNINGS = (
    "Sparse CSR tensor support is in beta",
    "Sparse CSC tensor support is in beta",
    "Sparse invariant checks are implicitly disabled",
)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def diagnose(
    P,
    q,
    C=None,
    d=None,
    A=None,
    b=None,
    *,
    solvers: Optional[Sequence[str]] = None,
    lin_solvers: Optional[Sequence[str]] = None,
    dense: Optional[bool] = None,
    repeat: int = 3,
    tol: float = 1e-6,
    grad_tol: float = 1e-5,
    seed: int = 0,
    options: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    name: str = "problem",
    device: Optional[Union[str, torch.device]] = None,
) -> DiagnosisReport:
    """Run one QP through every installed solver combination and rank them.

    Parameters
    ----------
    P, q, C, d, A, b
        One problem ``min ½zᵀPz + qᵀz  s.t.  Cz ≤ d,  Az = b`` as torch tensors (dense or sparse),
        NumPy arrays or SciPy sparse matrices. ``C``/``d`` and ``A``/``b`` are optional pairs.
    solvers : sequence of str, optional
        Forward solvers to try (names or aliases; default: every installed one).
    lin_solvers : sequence of str, optional
        Backward linear solvers to try (default: every installed one). The built-in IPM
        (``dqp_ipm``) always differentiates with ``torch`` and is skipped when ``torch`` is not
        in this list.
    dense : bool, optional
        Hand the data to the layer as dense tensors (``True``) or sparse CSC (``False``). Default:
        as the input came (sparse for SciPy/torch sparse matrices and files). The built-in IPM
        always gets dense tensors (problems with more than ``DENSE_LIMIT`` variables are skipped
        for it unless ``dense=True``).
    repeat : int
        Timed forward+backward runs per combination (the median is reported).
    tol : float
        Tolerance on the relative KKT residual (primal / (1 + max(‖d‖∞, ‖b‖∞)), dual /
        (1 + ‖q‖∞), complementarity / (1 + ‖q‖∞ + ‖d‖∞)).
    grad_tol : float
        Tolerance on the relative difference of z and of the gradient to the consensus.
    seed : int
        Seed of the random loss weights ``w`` in ``loss = wᵀz``.
    options : mapping, optional
        Further :func:`dqp.dQP.build_settings` options for every combination (e.g. ``eps_abs``).
    progress : bool
        Show a progress bar (tqdm when installed, else INFO log lines on logger ``dqp.diagnose``).
    name : str
        Problem name for the report.
    device : str or torch.device, optional
        Device of the tensors handed to the layer (default CPU). On ``"cuda"`` the built-in IPM
        solves on the GPU, element-wise solvers include the host transfers in their time, and
        timings synchronize the device.

    Returns
    -------
    DiagnosisReport

    Raises
    ------
    ShapeError
        A batched ``q`` (diagnose one problem at a time), or half a constraint pair.
    SettingsError
        ``repeat < 1``, an unknown solver name, an option of ``options`` that is invalid, an
        invalid or unavailable ``device``, or no combination left to run.
    InputError
        The data fails dqp's validation (shapes, NaN, asymmetric P, ...).
    """
    problem, was_sparse = _as_problem(P, q, C, d, A, b, name)
    return diagnose_problem(
        problem,
        solvers=solvers,
        lin_solvers=lin_solvers,
        dense=(not was_sparse) if dense is None else dense,
        repeat=repeat,
        tol=tol,
        grad_tol=grad_tol,
        seed=seed,
        options=options,
        progress=progress,
        device=device,
    )


def diagnose_file(path: PathLike, **kwargs: Any) -> DiagnosisReport:
    """:func:`diagnose_problem` on :func:`dqp.io.load_problem(path) <dqp.io.load_problem>`.

    Keyword arguments are those of :func:`diagnose_problem`. Raises what ``load_problem`` raises
    (:class:`dqp.errors.InputError` for a missing or malformed file) and what
    :func:`diagnose_problem` raises.
    """
    return diagnose_problem(load_problem(path), **kwargs)


def diagnose_problem(
    problem: QPProblem,
    *,
    solvers: Optional[Sequence[str]] = None,
    lin_solvers: Optional[Sequence[str]] = None,
    dense: Optional[bool] = None,
    repeat: int = 3,
    tol: float = 1e-6,
    grad_tol: float = 1e-5,
    seed: int = 0,
    options: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> DiagnosisReport:
    """Diagnose a :class:`dqp.io.QPProblem` (see :func:`diagnose` for the parameters).

    A ``QPProblem`` always holds SciPy CSC matrices, so ``dense=None`` (the default) infers the
    input kind from the data: dense when at least :data:`DENSE_FRACTION` of the entries of
    ``P``, ``C`` and ``A`` are stored and ``n ≤ DENSE_LIMIT``, sparse otherwise.
    """
    from dqp.dQP import build_settings
    from dqp.problem import validate

    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise SettingsError(f"repeat must be a positive integer, got {repeat!r}.")
    options = dict(options or {})
    reserved = sorted(set(options) & {"qp_solver", "lin_solver", "solve_type"})
    if reserved:
        raise SettingsError(
            f"options may not set {', '.join(reserved)}: the diagnosis chooses them "
            f"(use solvers=..., lin_solvers=..., dense=...)."
        )
    build_settings(**options)  # validate the options once (raises SettingsError)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message="Sparse")
        validate(*problem.to_torch(sparse=not dense), sparse=not dense)  # typed InputError on bad data
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as exc:
        raise SettingsError(f"device={device!r} is not a torch device ({exc}).") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device={device!r} but CUDA is not available in this torch build or machine.")
    if dense is None:
        dense, input_reason = _infer_dense(problem)
    else:
        input_reason = "as given"
    combos, skipped = _plan(problem, solvers, lin_solvers, dense)
    if not combos:
        reasons = "; ".join(f"{qp} × {lin}: {why}" for qp, lin, why in skipped) or "nothing selected"
        raise SettingsError(f"No solver combination to run ({reasons}).")
    w = np.random.default_rng(seed).standard_normal(problem.n)
    results = []
    for qp, lin, solve_type in _progress(combos, progress):
        results.append(_run_combo(problem, qp, lin, solve_type, w, repeat, options, dev))
    consensus_size = _score(results, problem, tol, grad_tol)
    results.sort(key=lambda r: (not r.correct, not r.solved, r.t_total if np.isfinite(r.t_total) else math.inf))
    nnz = int(problem.P.nnz + problem.C.nnz + (problem.A.nnz if problem.A is not None else 0))
    return DiagnosisReport(
        problem.name,
        problem.n,
        problem.n_ineq,
        problem.n_eq,
        nnz,
        not dense,
        results,
        skipped,
        repeat,
        tol,
        grad_tol,
        seed,
        consensus_size,
        str(dev),
        input_reason,
    )


def _infer_dense(problem: QPProblem) -> Tuple[bool, str]:
    """Whether to hand the data over dense, and why (a phrase for the report)."""
    n = problem.n
    size = n * n + (problem.n_ineq + problem.n_eq) * n
    nnz = problem.P.nnz + problem.C.nnz + (problem.A.nnz if problem.A is not None else 0)
    fill = nnz / size if size else 1.0
    dense = fill >= DENSE_FRACTION and n <= DENSE_LIMIT
    return dense, (
        f"inferred from the data: {100 * fill:.3g} % of the matrix entries are stored; "
        f"{'--sparse' if dense else '--dense'} to override"
    )


def _plan(
    problem: QPProblem, solvers: Optional[Sequence[str]], lin_solvers: Optional[Sequence[str]], dense: bool
) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str, str]]]:
    """The combinations to run ``(qp, lin, solve_type)`` and those skipped ``(qp, lin, reason)``."""
    from dqp.linsolve import available_linsolvers, registered_linsolvers, resolve_linsolver_name
    from dqp.solvers import available_solvers, registered_solvers, resolve_solver_name

    skipped: List[Tuple[str, str, str]] = []
    reg_qp, reg_lin = registered_solvers(), registered_linsolvers()
    qps = available_solvers() if solvers is None else unique_in_order(resolve_solver_name(s) for s in solvers)
    lins = (
        available_linsolvers()
        if lin_solvers is None
        else unique_in_order(resolve_linsolver_name(s) for s in lin_solvers)
    )
    for name in list(qps):
        if not reg_qp[name].is_available():
            skipped.append((name, "-", f"not installed ({reg_qp[name].install_hint()})"))
            qps.remove(name)
    for name in list(lins):
        if not reg_lin[name].is_available():
            skipped.append(("-", name, f"not installed ({reg_lin[name].install_hint()})"))
            lins.remove(name)
    combos = []
    for qp in qps:
        if reg_qp[qp].batched:
            batched_lins = [lin for lin in lins if reg_lin[lin].batched]
            if not batched_lins:
                skipped.append(
                    (qp, "torch", "the batched IPM differentiates with lin_solver='torch', which is not in lin_solvers")
                )
                continue
            if not dense and problem.n > DENSE_LIMIT:
                skipped.append(
                    (
                        qp,
                        batched_lins[0],
                        f"dense-only batched solver; n = {problem.n} > {DENSE_LIMIT} "
                        f"(pass dense=True / --dense to force)",
                    )
                )
                continue
            combos += [(qp, lin, "dense") for lin in batched_lins]
        else:
            combos += [(qp, lin, "dense" if dense else "sparse") for lin in lins if not reg_lin[lin].batched]
    return combos, skipped


def _progress(items: List[Tuple[str, str, str]], enabled: bool) -> Iterator[Tuple[str, str, str]]:
    """Iterate with a tqdm bar (stderr) when installed and enabled, else with INFO log lines."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        for i, item in enumerate(items, 1):
            logger.info("diagnose [%d/%d] qp_solver=%s lin_solver=%s (%s)", i, len(items), *item)
            yield item
        return
    bar = tqdm(items, desc="dqp-diagnose", unit="combo", file=sys.stderr, leave=False)
    for item in bar:
        bar.set_postfix_str(f"{item[0]} / {item[1]}")
        yield item


def _run_combo(
    problem: QPProblem,
    qp: str,
    lin: str,
    solve_type: str,
    w: np.ndarray,
    repeat: int,
    options: Mapping[str, Any],
    device: Optional[torch.device] = None,
) -> ComboResult:
    """Forward + backward ``repeat`` times; record times, ``layer.info`` and the gradient."""
    from dqp.dQP import build_settings, dQP_layer

    device = torch.device("cpu") if device is None else device
    res = ComboResult(qp, lin, solve_type)
    t_fwd, t_bwd, t_sol = [], [], []
    caught: List[str] = []
    try:
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            layer = dQP_layer(
                settings=build_settings(
                    qp_solver=qp, lin_solver=lin, solve_type=solve_type, **{"empty_batch": False, **options}
                )
            )  # one problem: (n,) outputs
            wt = torch.as_tensor(w, dtype=torch.float64, device=device)
            for _ in range(repeat):
                # fresh tensors each run: a sparse matrix built from its value leaves is a graph node
                (P, q, C, d, A, b), leaves = problem.to_torch(
                    sparse=solve_type == "sparse", requires_grad=True, device=device, return_leaves=True
                )
                keys = [k for k in ("q", "d", "b") if k in leaves]
                inputs = list(leaves.values())
                _sync(device)
                t0 = time.perf_counter()
                z, lam, mu, _, _ = layer(P, q, C, d, A, b)
                _sync(device)
                t1 = time.perf_counter()
                grads = torch.autograd.grad((wt * z).sum(), inputs, allow_unused=True)
                _sync(device)
                t2 = time.perf_counter()
                t_fwd.append(t1 - t0)
                t_bwd.append(t2 - t1)
                t_sol.append(float(sum(layer.info.solve_time)))
            caught = unique_in_order(
                f"{x.category.__name__}: {x.message}"
                for x in wlist
                if not any(s in str(x.message) for s in _BETA_WARNINGS)
            )
    except Exception as exc:  # a diagnostic records every failure, typed or not
        res.status = "ERROR"
        res.error_class = type(exc).__name__
        res.error_message = str(exc)
        res.typed_error = isinstance(exc, DQPError)
        statuses = getattr(exc, "statuses", None)
        if statuses:
            res.status = Status(statuses[0]).name
        return res
    info = layer.info
    gmap = dict(zip(leaves, grads))
    res.grad = np.concatenate([_np(gmap[k], leaves[k]) for k in keys])
    res.z = z.detach().cpu().numpy().astype(np.float64)
    res.status = info.status[0].name if info.status else Status.SOLVED.name
    res.t_forward, res.t_backward = statistics.median(t_fwd), statistics.median(t_bwd)
    res.t_solver = statistics.median(t_sol)
    res.primal_residual = float(info.primal_residual[0]) if info.primal_residual else math.nan
    res.dual_residual = float(info.dual_residual[0]) if info.dual_residual else math.nan
    res.complementarity = float(info.complementarity[0]) if info.complementarity else math.nan
    res.verified = bool(info.verified[0]) if info.verified else None
    res.kkt_path = info.kkt_path[0] if info.kkt_path else ""
    res.n_weakly_active = int(info.n_weakly_active[0]) if info.n_weakly_active else None
    res.refine_iterations = int(info.refine_iterations[0]) if info.refine_iterations else None
    margin = getattr(info, "complementarity_margin", None)
    res.complementarity_margin = float(margin[0]) if margin else None
    res.n_active = int(np.count_nonzero(info.active[0])) if info.active else None
    br = info.backward_residual[0] if info.backward_residual else None
    res.backward_residual = None if br is None else float(br)
    if info.messages and info.messages[0]:
        res.notes.append(info.messages[0])
    res.notes += caught
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _np(g: Optional[torch.Tensor], like: torch.Tensor) -> np.ndarray:
    if g is None:
        return np.zeros(like.numel())
    return g.detach().cpu().to(torch.float64).numpy().ravel()


def _score(results: List[ComboResult], problem: QPProblem, tol: float, grad_tol: float) -> int:
    """Relative residuals, agreement with the consensus, and the ``correct`` flag; returns the consensus size."""
    inf = lambda v: float(np.max(np.abs(v), initial=0.0)) if v is not None else 0.0
    scale_p = 1.0 + max(inf(problem.d), inf(problem.b))
    scale_d = 1.0 + inf(problem.q)
    scale_c = 1.0 + inf(problem.q) + inf(problem.d)
    solved = [r for r in results if r.solved]
    for r in solved:
        r.rel_residual = max(r.primal_residual / scale_p, r.dual_residual / scale_d, r.complementarity / scale_c)
    members = [r for r in solved if r.rel_residual <= tol and r.verified is not False] or solved
    if members:
        g_med = np.median(np.stack([r.grad for r in members]), axis=0)
        z_med = np.median(np.stack([r.z for r in members]), axis=0)
        for r in solved:
            r.grad_rel_diff = inf(r.grad - g_med) / max(inf(g_med), 1e-8)
            r.z_rel_diff = inf(r.z - z_med) / max(inf(z_med), 1e-8)
    for r in results:
        if not r.solved:
            continue
        why = []
        if not r.rel_residual <= tol:
            why.append(f"KKT residual {r.rel_residual:.1e} > {tol:g}")
        if not r.grad_rel_diff <= grad_tol:
            why.append(f"gradient differs from consensus by {r.grad_rel_diff:.1e}")
        if not r.z_rel_diff <= grad_tol:
            why.append(f"z differs from consensus by {r.z_rel_diff:.1e}")
        if r.verified is False:
            why.append("active set not verified")
        r.correct = not why
        r.reasons = why
        r.notes = why + r.notes
    return len(members)


# ----------------------------------------------------------------------------------------------
# input conversion
# ----------------------------------------------------------------------------------------------
def _as_problem(P, q, C, d, A, b, name: str) -> Tuple[QPProblem, bool]:
    """A :class:`QPProblem` (SciPy CSC, float64) from torch/NumPy/SciPy data; also whether it was sparse."""
    given = dict(C=C, d=d, A=A, b=b)
    for mat, vec, form in (("C", "d", "C z <= d"), ("A", "b", "A z = b")):
        if (given[mat] is None) != (given[vec] is None):
            raise ShapeError(
                f"diagnose: {mat} and {vec} come together ({form}); got only {mat if given[mat] is not None else vec}."
            )
    qv = _vec(q)
    if qv.ndim != 1:
        raise ShapeError(
            f"diagnose takes one problem: q must have shape (n,), got {qv.shape}. "
            f"Pass one batch element (e.g. P[0], q[0], ...)."
        )
    n = qv.shape[0]
    sparse_in = any(_is_sparse(M) for M in (P, C, A) if M is not None)
    Pm = _csc(P)
    Cm, dv = (_csc(C), _vec(d)) if C is not None else (sp.csc_matrix((0, n)), np.zeros(0))
    Am, bv = (_csc(A), _vec(b)) if A is not None else (None, None)
    if Am is not None and Am.shape[0] == 0:
        Am = bv = None
    return QPProblem(name=name, P=Pm, q=qv, C=Cm, d=dv, A=Am, b=bv), sparse_in


def _is_sparse(M: Any) -> bool:
    return sp.issparse(M) or (isinstance(M, torch.Tensor) and M.layout != torch.strided)


def _vec(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().to(torch.float64).numpy()
    return np.asarray(v, dtype=np.float64)


def _csc(M: Any) -> sp.csc_matrix:
    if isinstance(M, torch.Tensor):
        M = M.detach().cpu().to(torch.float64)
        if M.layout != torch.strided:
            coo = M.to_sparse_coo().coalesce()
            i = coo.indices().numpy()
            if i.shape[0] != 2:
                raise ShapeError(f"diagnose takes one problem: matrices must be 2-D, got shape {tuple(M.shape)}.")
            return sp.csc_matrix((coo.values().numpy(), (i[0], i[1])), shape=tuple(M.shape))
        M = M.numpy()
    if sp.issparse(M):
        return sp.csc_matrix(M, dtype=np.float64)
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ShapeError(
            f"diagnose takes one problem: matrices must be 2-D, got shape {M.shape}. "
            f"Pass one batch element (e.g. P[0])."
        )
    return sp.csc_matrix(M)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 (solver banners) to stderr meanwhile.

    The report is the only thing the command prints on stdout, so that it can be piped; solver
    libraries written in C/C++ (HiGHS, for one) print banners straight to the descriptor.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (a test's capture): nothing native to catch
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        os.dup2(sys.stderr.fileno(), fd)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _names(values: Optional[List[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return [x for v in values for x in v.split(",") if x.strip()]


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines end with the default value, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" not in text
            and action.default is not None
            and action.default is not False
            and action.default != argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m dqp.diagnose`` / ``dqp-diagnose``."""
    ap = argparse.ArgumentParser(
        prog="dqp-diagnose",
        formatter_class=_HelpFormatter,
        description="Run a QP through every installed qp_solver x lin_solver pair of dqp (forward and "
        "backward), check the results, and rank the pairs: correct first, then fastest. "
        "The report goes to stdout (Markdown, or --json/--csv); progress and solver output "
        "go to stderr.",
    )
    ap.add_argument(
        "problem", nargs="?", help="problem file: .npz (keys P, q[, C, d][, A, b]) or a Maros-Meszaros .mat"
    )
    ap.add_argument(
        "--solvers",
        nargs="+",
        metavar="NAME",
        default=None,
        help="forward solvers, space or comma separated (default: every installed one)",
    )
    ap.add_argument(
        "--lin-solvers",
        nargs="+",
        metavar="NAME",
        default=None,
        help="backward linear solvers (default: every installed one)",
    )
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument(
        "--dense",
        dest="dense",
        action="store_const",
        const=True,
        default=None,
        help="hand the data over as dense tensors (default: inferred from the data's fill)",
    )
    kind.add_argument(
        "--sparse", dest="dense", action="store_const", const=False, help="hand the data over as sparse CSC tensors"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per pair (the median is reported)")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest relative KKT residual of a correct pair")
    ap.add_argument(
        "--grad-tol",
        type=float,
        default=1e-5,
        help="largest relative difference of z and the gradient to the consensus",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random linear loss w'z")
    ap.add_argument("--device", default="cpu", help="device of the tensors, e.g. cuda")
    ap.add_argument("--max-rows", type=int, default=None, help="show only the best N rows (default: all)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON instead of Markdown")
    out.add_argument("--csv", action="store_true", help="print the ranked rows as CSV instead of Markdown")
    ap.add_argument("--out", metavar="PLOT", default=None, help="also save a plot (PNG/PDF/SVG; needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--list", action="store_true", help="list the registered solvers and exit")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status.

    0: at least one combination is correct; 1: none is; 2: bad arguments, a missing or malformed
    problem file, or nothing to run (the error is printed to stderr).
    """
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        from dqp.linsolve import linsolver_table
        from dqp.solvers import solver_table

        print(
            "## Forward solvers (qp_solver)\n\n"
            + solver_table()
            + "\n\n## Linear solvers (lin_solver)\n\n"
            + linsolver_table()
        )
        return 0
    if not args.problem:
        ap.print_usage(sys.stderr)
        print("dqp-diagnose: error: a problem file is required (or --list)", file=sys.stderr)
        return 2
    if not args.no_progress:  # the progress lines when tqdm is missing; dqp's own warnings as usual
        logging.basicConfig(format="%(message)s")
        logger.setLevel(logging.INFO)
    try:
        with _stdout_to_stderr():
            report = diagnose_file(
                args.problem,
                solvers=_names(args.solvers),
                lin_solvers=_names(args.lin_solvers),
                dense=args.dense,
                repeat=args.repeat,
                tol=args.tol,
                grad_tol=args.grad_tol,
                seed=args.seed,
                progress=not args.no_progress,
                device=args.device,
            )
    except DQPError as exc:
        print(f"dqp-diagnose: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=1))
    elif args.csv:
        sys.stdout.write(report.to_csv())
    else:
        print(report.to_markdown(max_rows=args.max_rows))
    if args.out:
        try:
            path = report.plot(args.out)
        except ImportError as exc:
            print(f"dqp-diagnose: error: {exc}", file=sys.stderr)
            return 2
        print(f"Plot saved to {path}", file=sys.stderr)
    return 0 if report.recommended is not None else 1


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess in the tests
    sys.exit(main())
