"""The report of :func:`dqp.diagnose.diagnose`: one row per (forward, backward) solver pair, short
status codes with each distinct message once below the table, and its text, Markdown, JSON and CSV
renderings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from dqp.errors import Status
from dqp.io import PathLike


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
_ERROR_CODES = {
    "InfeasibleError": "infeasible",
    "UnboundedError": "unbounded",
    "MaxIterationsError": "max-iter",
    "NotPSDError": "not-psd",
    "SolverFailedError": "failed",
}


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
                return (
                    f"No combination solved this problem ({total} tried; failures: {', '.join(classes)}). "
                    f"Check feasibility and scaling (normalize_constraints=True), or see the messages below."
                )
            return (
                f"No combination met the tolerances ({len(solved)} of {total} solved; residual tol {self.tol:g}, "
                f"agreement tol {self.grad_tol:g}). The problem may be degenerate (weakly active "
                f"constraints, dependent active rows): see the verified/KKT path/weak columns."
            )
        text = (
            f"Use `qp_solver={r.qp_solver!r}, lin_solver={r.lin_solver!r}` (solve_type={r.solve_type!r}): "
            f"correct and fastest, {_ms(r.t_forward)} ms forward + {_ms(r.t_backward)} ms backward. "
            f"{len(self.correct)} of {total} combinations are correct."
        )
        best_lin = [x for x in self.correct if x.qp_solver == r.qp_solver]
        if len(best_lin) > 1:
            text += f" With {r.qp_solver}, the linear solvers rank {', '.join(x.lin_solver for x in best_lin[:4])}."
        return text

    def to_markdown(self, max_rows: Optional[int] = None, message_chars: int = 400) -> str:
        """The report as Markdown: a header, the recommendation, one row per pair, then the details.

        Each row has a short status code (legend below the table) and references ``[k]`` to the
        messages behind it; each distinct message is printed once, shortened to ``message_chars``.
        """
        kind = "sparse" if self.input_sparse else "dense"
        why = f" ({self.input_reason})" if self.input_reason else ""
        lines = [
            f"# dqp solver diagnosis: {self.problem}",
            "",
            f"n = {self.n} variables, m = {self.m} inequalities, p = {self.p} equalities, "
            f"{self.nnz} stored nonzeros; {kind} input{why}; float64 on {self.device}; "
            f"median of {self.repeat} run(s); loss wᵀz with a random w (seed {self.seed}); "
            f"consensus of {self.consensus_size} solved pair(s).",
            "",
            f"**Recommendation.** {self.recommendation()}",
            "",
            "| rank | qp_solver | lin_solver | input | status | forward [ms] | backward [ms] "
            "| KKT residual | grad diff | details |",
            "|---:|---|---|---|---|---:|---:|---:|---:|---|",
        ]
        rows = self.results if max_rows is None else self.results[:max_rows]
        index: Dict[str, int] = {}
        for i, r in enumerate(rows, 1):
            refs = [index.setdefault(_oneline(msg, message_chars), len(index) + 1) for msg in r.messages]
            lines.append(
                f"| {i} | {r.qp_solver} | {r.lin_solver} | {r.solve_type} | {r.code} | "
                f"{_ms(r.t_forward)} | {_ms(r.t_backward)} | {_sci(r.rel_residual)} | {_sci(r.grad_rel_diff)} | "
                f"{', '.join(f'[{k}]' for k in refs)} |"
            )
        if max_rows is not None and len(self.results) > max_rows:
            lines.append(f"\n({len(self.results) - max_rows} more pairs not shown.)")
        codes = unique_in_order(r.code for r in rows)
        lines += ["", "Status: " + "; ".join(f"`{c}` {STATUS_CODES.get(c, 'see the details')}" for c in codes) + "."]
        if index:
            lines += ["", "Details:", ""] + [f"[{k}] {_cell(msg)}" + "  " for msg, k in index.items()]
            lines[-1] = lines[-1].rstrip()
        if self.skipped:
            lines += ["", "Not run:", ""]
            lines += [f"- `{qp}` × `{lin}`: {reason}" for qp, lin, reason in self.skipped]
        lines += [
            "",
            f"A pair is `ok` when it solved, its relative KKT residual is at most {self.tol:g}, z and the "
            f"gradient are within {self.grad_tol:g} (relative, ∞-norm) of the consensus (the "
            f"element-wise median over the pairs that solved), and the active-set check accepted it.",
        ]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """The whole report as plain data (for ``--json``): the header, the recommendation, the
        ranked rows (:meth:`to_records`) and the pairs not run. NaN becomes ``None``."""
        head = {k: v for k, v in self.__dict__.items() if k not in ("results", "skipped")}
        rec = self.recommended
        return _jsonable(
            {
                **head,
                "recommendation": self.recommendation(),
                "recommended": None
                if rec is None
                else {"qp_solver": rec.qp_solver, "lin_solver": rec.lin_solver, "solve_type": rec.solve_type},
                "results": self.to_records(),
                "skipped": [{"qp_solver": qp, "lin_solver": lin, "reason": why} for qp, lin, why in self.skipped],
            }
        )

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
            raise ImportError(
                "Saving the diagnosis plot needs matplotlib: pip install matplotlib "
                "(or pip install 'dqp-torch[plots]')."
            ) from exc
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
            ax2.annotate(
                f"{best.qp_solver} / {best.lin_solver}",
                (1e3 * best.t_total, max(best.grad_rel_diff, 1e-17)),
                fontsize=8,
            )
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=110)
        return path


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


def unique_in_order(names: Iterable[str]) -> List[str]:
    out: List[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out
