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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch

from dqp.errors import DQPError, SettingsError, ShapeError, Status
from dqp.io import PathLike, QPProblem, load_problem

logger = logging.getLogger("dqp.diagnose")

__all__ = ["ComboResult", "DiagnosisReport", "STATUS_CODES", "diagnose", "diagnose_problem", "diagnose_file",
           "build_parser", "main"]

#: Problems with more variables than this are not densified for dense-only batched solvers
#: (the built-in IPM) unless ``dense=True`` is asked for.
DENSE_LIMIT = 2000
#: A file's problem is handed over dense when at least this fraction of the entries of P, C and A
#: are stored (and n ≤ DENSE_LIMIT); sparse otherwise. ``--dense``/``--sparse`` override it.
DENSE_FRACTION = 0.1

_BETA_WARNINGS = ("Sparse CSR tensor support is in beta", "Sparse CSC tensor support is in beta",
                  "Sparse invariant checks are implicitly disabled")


@dataclass
class ComboResult:
    """The outcome of one ``qp_solver`` × ``lin_solver`` combination.

    Attributes
    ----------
    qp_solver, lin_solver : str
        The combination (registry names).
    solve_type : str
        ``"dense"`` or ``"sparse"``: how the data was handed to the layer.
    status : str
        ``"SOLVED"``, another :class:`dqp.errors.Status` name, or ``"ERROR"`` when the call raised.
    error_class, error_message : str
        The exception raised by the forward or backward (empty when none).
    typed_error : bool
        Whether that exception derives from :class:`dqp.errors.DQPError` (False for an
        exception that escaped a solver untyped).
    t_forward, t_backward : float
        Median seconds of the layer call and of the backward (NaN when it failed).
    t_solver : float
        Median seconds inside the forward solver (``layer.info.solve_time``).
    primal_residual, dual_residual, complementarity : float
        KKT residuals from ``layer.info`` (∞-norms, absolute).
    rel_residual : float
        The largest of the three, each relative to the data (see :func:`diagnose_problem`).
    verified : bool or None
        ``layer.info.verified`` (``None`` when the solver path does not report it, e.g. the IPM).
    kkt_path : str
        ``"direct"``, ``"regularized"`` or ``""`` when not reported.
    n_weakly_active, n_active, refine_iterations : int or None
        From ``layer.info``.
    complementarity_margin : float or None
        ``layer.info.complementarity_margin``: distance to a change of active set.
    backward_residual : float or None
        Relative residual of the backward linear solve.
    z_rel_diff, grad_rel_diff : float
        ``‖x − consensus‖∞ / max(‖consensus‖∞, 1e-8)`` for z and for the gradient
        ``(∇q, ∇d, ∇b)`` of the fixed linear loss (NaN when it failed).
    correct : bool
        Solved, residuals within ``tol``, agreement within ``grad_tol``, not rejected by the
        verification.
    reasons : list of str
        Why the combination is not correct (empty when it is).
    notes : list of str
        Why the combination is not correct, then the layer's messages and the warnings raised
        during the call.
    """

    qp_solver: str
    lin_solver: str
    solve_type: str
    status: str = "ERROR"
    error_class: str = ""
    error_message: str = ""
    typed_error: bool = True
    t_forward: float = math.nan
    t_backward: float = math.nan
    t_solver: float = math.nan
    primal_residual: float = math.nan
    dual_residual: float = math.nan
    complementarity: float = math.nan
    rel_residual: float = math.nan
    verified: Optional[bool] = None
    kkt_path: str = ""
    n_weakly_active: Optional[int] = None
    n_active: Optional[int] = None
    refine_iterations: Optional[int] = None
    complementarity_margin: Optional[float] = None
    backward_residual: Optional[float] = None
    z_rel_diff: float = math.nan
    grad_rel_diff: float = math.nan
    correct: bool = False
    reasons: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    z: Optional[np.ndarray] = field(default=None, repr=False)
    grad: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def solved(self) -> bool:
        """Whether the forward and backward ran and the status is SOLVED."""
        return self.status == Status.SOLVED.name and self.grad is not None

    @property
    def t_total(self) -> float:
        """Forward + backward seconds (NaN when the combination failed)."""
        return self.t_forward + self.t_backward

    @property
    def code(self) -> str:
        """A short status code for the table (the legend is :data:`STATUS_CODES`)."""
        if self.error_class:
            return _ERROR_CODES.get(self.error_class, "error" if self.typed_error else "untyped-error")
        if not self.solved:
            return self.status.lower().replace("_", "-")
        if self.correct:
            return "ok"
        first = self.reasons[0] if self.reasons else ""
        if first.startswith("KKT residual"):
            return "inexact"
        if "differs from consensus" in first:
            return "disagrees"
        return "unverified" if "not verified" in first else "not-ok"

    @property
    def messages(self) -> List[str]:
        """The details behind the row: the error, or the layer's messages and warnings."""
        if self.error_class:
            return [f"{self.error_class}{'' if self.typed_error else ' (untyped)'}: {self.error_message}"]
        return [m for m in self.notes if m not in self.reasons]

    def as_dict(self) -> Dict[str, Any]:
        """The scalar fields as a dict (for CSV/JSON); arrays are left out."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("z", "grad", "reasons")}
        out["code"] = self.code
        out["notes"] = "; ".join(self.notes)
        return out


#: The short codes of the table's status column.
STATUS_CODES = {
    "ok": "solved; KKT residual, z and gradient within the tolerances; active set verified",
    "inexact": "solved, but the relative KKT residual is above --tol",
    "disagrees": "solved, but z or the gradient differs from the consensus by more than --grad-tol",
    "unverified": "solved, but the active-set check rejected the point",
    "infeasible": "the solver reports the problem infeasible (InfeasibleError)",
    "unbounded": "the solver reports the problem unbounded (UnboundedError)",
    "max-iter": "the solver stopped at its iteration limit (MaxIterationsError)",
    "not-psd": "P is not positive semidefinite (NotPSDError)",
    "failed": "the solver failed (SolverFailedError)",
    "error": "another dqp error (see the details)",
    "untyped-error": "an exception that is not a dqp error escaped (a bug: report it)",
}
_ERROR_CODES = {"InfeasibleError": "infeasible", "UnboundedError": "unbounded", "MaxIterationsError": "max-iter",
                "NotPSDError": "not-psd", "SolverFailedError": "failed"}


@dataclass
class DiagnosisReport:
    """The ranked results of :func:`diagnose` (correct first, then fastest).

    Attributes
    ----------
    problem : str
        Problem name.
    n, m, p : int
        Variables, inequality rows, equality rows.
    nnz : int
        Stored nonzeros of P, C and A.
    input_sparse : bool
        Whether the problem came as sparse matrices (files always do).
    results : list of ComboResult
        Ranked.
    skipped : list of (str, str, str)
        ``(qp_solver, lin_solver, reason)`` for combinations that were not run.
    repeat : int
        Timed runs per combination.
    tol, grad_tol : float
        The residual and agreement tolerances that define "correct".
    seed : int
        Seed of the random linear loss.
    consensus_size : int
        Number of combinations the consensus gradient is the median of.
    device : str
        Device of the tensors handed to the layer.
    input_reason : str
        How the input kind was chosen (given, or inferred from the data).
    """

    problem: str
    n: int
    m: int
    p: int
    nnz: int
    input_sparse: bool
    results: List[ComboResult]
    skipped: List[Tuple[str, str, str]]
    repeat: int
    tol: float
    grad_tol: float
    seed: int
    consensus_size: int
    device: str = "cpu"
    input_reason: str = ""

    @property
    def correct(self) -> List[ComboResult]:
        """The correct combinations, fastest first."""
        return [r for r in self.results if r.correct]

    @property
    def failed(self) -> List[ComboResult]:
        """Combinations that raised or did not solve."""
        return [r for r in self.results if not r.solved]

    @property
    def recommended(self) -> Optional[ComboResult]:
        """The fastest correct combination, or ``None`` when none is correct."""
        ok = self.correct
        return ok[0] if ok else None

    def recommendation(self) -> str:
        """One or two sentences: what to use, and why."""
        r = self.recommended
        total = len(self.results)
        if r is None:
            solved = [x for x in self.results if x.solved]
            if not solved:
                classes = sorted({x.error_class or x.status for x in self.results})
                return (f"No combination solved this problem ({total} tried; failures: {', '.join(classes)}). "
                        f"Check feasibility and scaling (normalize_constraints=True), or see the messages below.")
            return (f"No combination met the tolerances ({len(solved)} of {total} solved; residual tol {self.tol:g}, "
                    f"agreement tol {self.grad_tol:g}). The problem may be degenerate (weakly active "
                    f"constraints, dependent active rows): see the verified/KKT path/weak columns.")
        text = (f"Use `qp_solver={r.qp_solver!r}, lin_solver={r.lin_solver!r}` (solve_type={r.solve_type!r}): "
                f"correct and fastest, {_ms(r.t_forward)} ms forward + {_ms(r.t_backward)} ms backward. "
                f"{len(self.correct)} of {total} combinations are correct.")
        best_lin = [x for x in self.correct if x.qp_solver == r.qp_solver]
        if len(best_lin) > 1:
            text += (f" With {r.qp_solver}, the linear solvers rank "
                     f"{', '.join(x.lin_solver for x in best_lin[:4])}.")
        return text

    def to_markdown(self, max_rows: Optional[int] = None, message_chars: int = 400) -> str:
        """The report as Markdown: a header, the recommendation, one row per pair, then the details.

        Each row has a short status code (legend below the table) and references ``[k]`` to the
        messages behind it; each distinct message is printed once, shortened to ``message_chars``.
        """
        kind = "sparse" if self.input_sparse else "dense"
        why = f" ({self.input_reason})" if self.input_reason else ""
        lines = [f"# dqp solver diagnosis: {self.problem}", "",
                 f"n = {self.n} variables, m = {self.m} inequalities, p = {self.p} equalities, "
                 f"{self.nnz} stored nonzeros; {kind} input{why}; float64 on {self.device}; "
                 f"median of {self.repeat} run(s); loss wᵀz with a random w (seed {self.seed}); "
                 f"consensus of {self.consensus_size} solved pair(s).", "",
                 f"**Recommendation.** {self.recommendation()}", "",
                 "| rank | qp_solver | lin_solver | input | status | forward [ms] | backward [ms] "
                 "| KKT residual | grad diff | details |",
                 "|---:|---|---|---|---|---:|---:|---:|---:|---|"]
        rows = self.results if max_rows is None else self.results[:max_rows]
        index: Dict[str, int] = {}
        for i, r in enumerate(rows, 1):
            refs = [index.setdefault(_oneline(msg, message_chars), len(index) + 1) for msg in r.messages]
            lines.append(
                f"| {i} | {r.qp_solver} | {r.lin_solver} | {r.solve_type} | {r.code} | "
                f"{_ms(r.t_forward)} | {_ms(r.t_backward)} | {_sci(r.rel_residual)} | {_sci(r.grad_rel_diff)} | "
                f"{', '.join(f'[{k}]' for k in refs)} |")
        if max_rows is not None and len(self.results) > max_rows:
            lines.append(f"\n({len(self.results) - max_rows} more pairs not shown.)")
        codes = _unique(r.code for r in rows)
        lines += ["", "Status: " + "; ".join(f"`{c}` {STATUS_CODES.get(c, 'see the details')}" for c in codes) + "."]
        if index:
            lines += ["", "Details:", ""] + [f"[{k}] {_cell(msg)}" + "  " for msg, k in index.items()]
            lines[-1] = lines[-1].rstrip()
        if self.skipped:
            lines += ["", "Not run:", ""]
            lines += [f"- `{qp}` × `{lin}`: {reason}" for qp, lin, reason in self.skipped]
        lines += ["", f"A pair is `ok` when it solved, its relative KKT residual is at most {self.tol:g}, z and the "
                      f"gradient are within {self.grad_tol:g} (relative, ∞-norm) of the consensus (the "
                      f"element-wise median over the pairs that solved), and the active-set check accepted it."]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """The whole report as plain data (for ``--json``): the header, the recommendation, the
        ranked rows (:meth:`to_records`) and the pairs not run. NaN becomes ``None``."""
        head = {k: v for k, v in self.__dict__.items() if k not in ("results", "skipped")}
        rec = self.recommended
        return _jsonable({**head, "recommendation": self.recommendation(),
                          "recommended": None if rec is None else {"qp_solver": rec.qp_solver,
                                                                   "lin_solver": rec.lin_solver,
                                                                   "solve_type": rec.solve_type},
                          "results": self.to_records(),
                          "skipped": [{"qp_solver": qp, "lin_solver": lin, "reason": why}
                                      for qp, lin, why in self.skipped]})

    def to_csv(self) -> str:
        """The ranked rows as CSV text (header line first), for ``--csv``."""
        import csv
        import io

        records = self.to_records()
        buf = io.StringIO()
        if records:
            writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        return buf.getvalue()

    def to_records(self) -> List[Dict[str, Any]]:
        """One dict per combination, in rank order (for CSV or a DataFrame)."""
        return [dict(rank=i, **r.as_dict()) for i, r in enumerate(self.results, 1)]

    def plot(self, path: PathLike) -> Path:
        """Save a figure: time per combination (forward and backward) and gradient agreement vs time.

        Raises
        ------
        ImportError
            matplotlib is not installed (the message gives the pip command).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("Saving the diagnosis plot needs matplotlib: pip install matplotlib "
                              "(or pip install 'dqp-torch[plots]').") from exc
        path = Path(path)
        ran = [r for r in self.results if np.isfinite(r.t_total)]
        height = max(3.0, 0.22 * len(ran) + 1.2)
        fig = Figure(figsize=(13, height))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        labels = [f"{r.qp_solver} / {r.lin_solver}" for r in ran]
        y = np.arange(len(ran))[::-1]
        fwd = np.array([1e3 * r.t_forward for r in ran])
        bwd = np.array([1e3 * r.t_backward for r in ran])
        colors = ["tab:green" if r.correct else "tab:orange" for r in ran]
        ax1.barh(y, fwd, color=colors, alpha=0.9, label="forward")
        ax1.barh(y, bwd, left=fwd, color=colors, alpha=0.45, hatch="//", label="backward")
        ax1.set_yticks(y)
        ax1.set_yticklabels(labels, fontsize=7)
        ax1.set_xscale("log")
        ax1.set_xlabel("time [ms] (forward solid, backward hatched; green = correct)")
        ax1.set_title(f"{self.problem}: n={self.n}, m={self.m}, p={self.p}")
        for r in ran:
            g = max(r.grad_rel_diff, 1e-17) if np.isfinite(r.grad_rel_diff) else np.nan
            ax2.scatter(1e3 * r.t_total, g, color="tab:green" if r.correct else "tab:orange", s=18)
        ax2.axhline(self.grad_tol, color="gray", lw=0.8, ls="--")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("forward + backward [ms]")
        ax2.set_ylabel("gradient difference to consensus")
        best = self.recommended
        if best is not None:
            ax2.annotate(f"{best.qp_solver} / {best.lin_solver}", (1e3 * best.t_total, max(best.grad_rel_diff, 1e-17)),
                         fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=110)
        return path


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def diagnose(P, q, C=None, d=None, A=None, b=None, *, solvers: Optional[Sequence[str]] = None,
             lin_solvers: Optional[Sequence[str]] = None, dense: Optional[bool] = None, repeat: int = 3,
             tol: float = 1e-6, grad_tol: float = 1e-5, seed: int = 0,
             options: Optional[Mapping[str, Any]] = None, progress: bool = True,
             name: str = "problem", device: Optional[Union[str, torch.device]] = None) -> DiagnosisReport:
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
    return diagnose_problem(problem, solvers=solvers, lin_solvers=lin_solvers,
                            dense=(not was_sparse) if dense is None else dense, repeat=repeat, tol=tol,
                            grad_tol=grad_tol, seed=seed, options=options, progress=progress, device=device)


def diagnose_file(path: PathLike, **kwargs: Any) -> DiagnosisReport:
    """:func:`diagnose_problem` on :func:`dqp.io.load_problem(path) <dqp.io.load_problem>`.

    Keyword arguments are those of :func:`diagnose_problem`. Raises what ``load_problem`` raises
    (:class:`dqp.errors.InputError` for a missing or malformed file) and what
    :func:`diagnose_problem` raises.
    """
    return diagnose_problem(load_problem(path), **kwargs)


def diagnose_problem(problem: QPProblem, *, solvers: Optional[Sequence[str]] = None,
                     lin_solvers: Optional[Sequence[str]] = None, dense: Optional[bool] = None, repeat: int = 3,
                     tol: float = 1e-6, grad_tol: float = 1e-5, seed: int = 0,
                     options: Optional[Mapping[str, Any]] = None, progress: bool = True,
                     device: Optional[Union[str, torch.device]] = None) -> DiagnosisReport:
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
        raise SettingsError(f"options may not set {', '.join(reserved)}: the diagnosis chooses them "
                            f"(use solvers=..., lin_solvers=..., dense=...).")
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
    return DiagnosisReport(problem.name, problem.n, problem.n_ineq, problem.n_eq, nnz, not dense, results,
                           skipped, repeat, tol, grad_tol, seed, consensus_size, str(dev), input_reason)


def _infer_dense(problem: QPProblem) -> Tuple[bool, str]:
    """Whether to hand the data over dense, and why (a phrase for the report)."""
    n = problem.n
    size = n * n + (problem.n_ineq + problem.n_eq) * n
    nnz = problem.P.nnz + problem.C.nnz + (problem.A.nnz if problem.A is not None else 0)
    fill = nnz / size if size else 1.0
    dense = fill >= DENSE_FRACTION and n <= DENSE_LIMIT
    return dense, (f"inferred from the data: {100 * fill:.3g} % of the matrix entries are stored; "
                   f"{'--sparse' if dense else '--dense'} to override")


def _plan(problem: QPProblem, solvers: Optional[Sequence[str]], lin_solvers: Optional[Sequence[str]],
          dense: bool) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str, str]]]:
    """The combinations to run ``(qp, lin, solve_type)`` and those skipped ``(qp, lin, reason)``."""
    from dqp.linsolve import available_linsolvers, registered_linsolvers, resolve_linsolver_name
    from dqp.solvers import available_solvers, registered_solvers, resolve_solver_name

    skipped: List[Tuple[str, str, str]] = []
    reg_qp, reg_lin = registered_solvers(), registered_linsolvers()
    qps = available_solvers() if solvers is None else _unique(resolve_solver_name(s) for s in solvers)
    lins = available_linsolvers() if lin_solvers is None else _unique(resolve_linsolver_name(s) for s in lin_solvers)
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
                skipped.append((qp, "torch", "the batched IPM differentiates with lin_solver='torch', "
                                             "which is not in lin_solvers"))
                continue
            if not dense and problem.n > DENSE_LIMIT:
                skipped.append((qp, batched_lins[0], f"dense-only batched solver; n = {problem.n} > {DENSE_LIMIT} "
                                                     f"(pass dense=True / --dense to force)"))
                continue
            combos += [(qp, lin, "dense") for lin in batched_lins]
        else:
            combos += [(qp, lin, "dense" if dense else "sparse") for lin in lins if not reg_lin[lin].batched]
    return combos, skipped


def _unique(names: Iterable[str]) -> List[str]:
    out: List[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


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


def _run_combo(problem: QPProblem, qp: str, lin: str, solve_type: str, w: np.ndarray, repeat: int,
               options: Mapping[str, Any], device: Optional[torch.device] = None) -> ComboResult:
    """Forward + backward ``repeat`` times; record times, ``layer.info`` and the gradient."""
    from dqp.dQP import build_settings, dQP_layer

    device = torch.device("cpu") if device is None else device
    res = ComboResult(qp, lin, solve_type)
    t_fwd, t_bwd, t_sol = [], [], []
    caught: List[str] = []
    try:
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            layer = dQP_layer(settings=build_settings(qp_solver=qp, lin_solver=lin, solve_type=solve_type,
                                                      **{"empty_batch": False, **options}))  # one problem: (n,) outputs
            wt = torch.as_tensor(w, dtype=torch.float64, device=device)
            for _ in range(repeat):
                # fresh tensors each run: a sparse matrix built from its value leaves is a graph node
                (P, q, C, d, A, b), leaves = problem.to_torch(sparse=solve_type == "sparse", requires_grad=True, device=device,
                                                              return_leaves=True)
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
            caught = _unique(f"{x.category.__name__}: {x.message}" for x in wlist
                             if not any(s in str(x.message) for s in _BETA_WARNINGS))
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
            raise ShapeError(f"diagnose: {mat} and {vec} come together ({form}); got only "
                             f"{mat if given[mat] is not None else vec}.")
    qv = _vec(q)
    if qv.ndim != 1:
        raise ShapeError(f"diagnose takes one problem: q must have shape (n,), got {qv.shape}. "
                         f"Pass one batch element (e.g. P[0], q[0], ...).")
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
        raise ShapeError(f"diagnose takes one problem: matrices must be 2-D, got shape {M.shape}. "
                         f"Pass one batch element (e.g. P[0]).")
    return sp.csc_matrix(M)


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------
def _ms(t: float) -> str:
    return "-" if not np.isfinite(t) else f"{1e3 * t:.3g}"


def _sci(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.1e}"


def _oneline(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _jsonable(x: Any) -> Any:
    """Plain JSON data: NaN/inf -> None, NumPy scalars -> Python numbers, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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
        if "default" not in text and action.default is not None and action.default is not False \
                and action.default != argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m dqp.diagnose`` / ``dqp-diagnose``."""
    ap = argparse.ArgumentParser(
        prog="dqp-diagnose", formatter_class=_HelpFormatter,
        description="Run a QP through every installed qp_solver x lin_solver pair of dqp (forward and "
                    "backward), check the results, and rank the pairs: correct first, then fastest. "
                    "The report goes to stdout (Markdown, or --json/--csv); progress and solver output "
                    "go to stderr.")
    ap.add_argument("problem", nargs="?", help="problem file: .npz (keys P, q[, C, d][, A, b]) or a "
                                               "Maros-Meszaros .mat")
    ap.add_argument("--solvers", nargs="+", metavar="NAME", default=None,
                    help="forward solvers, space or comma separated (default: every installed one)")
    ap.add_argument("--lin-solvers", nargs="+", metavar="NAME", default=None,
                    help="backward linear solvers (default: every installed one)")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--dense", dest="dense", action="store_const", const=True, default=None,
                      help="hand the data over as dense tensors (default: inferred from the data's fill)")
    kind.add_argument("--sparse", dest="dense", action="store_const", const=False,
                      help="hand the data over as sparse CSC tensors")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per pair (the median is reported)")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest relative KKT residual of a correct pair")
    ap.add_argument("--grad-tol", type=float, default=1e-5,
                    help="largest relative difference of z and the gradient to the consensus")
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

        print("## Forward solvers (qp_solver)\n\n" + solver_table() + "\n\n## Linear solvers (lin_solver)\n\n"
              + linsolver_table())
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
            report = diagnose_file(args.problem, solvers=_names(args.solvers), lin_solvers=_names(args.lin_solvers),
                                   dense=args.dense, repeat=args.repeat, tol=args.tol, grad_tol=args.grad_tol,
                                   seed=args.seed, progress=not args.no_progress, device=args.device)
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
