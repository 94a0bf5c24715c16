"""Validated settings of a dQP layer.

:func:`build_settings` is the one place options are checked; the layer trusts the resulting
:class:`Settings`. The option table in the docs and README is generated from :data:`OPTIONS`.

:class:`Settings` reads and writes like the dict that libdqp's ``build_settings`` returns:
``settings["eps_abs"]``, ``settings["eps_abs"] = 1e-7`` (validated again, with the same typed
errors), ``dict(settings)``, ``settings.items()``. A layer takes a copy when it is built, as libdqp's
layer copies the dict into its attributes.
"""

from __future__ import annotations

import copy

import difflib
import os
from collections.abc import Mapping as _MappingABC
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from dqp.errors import SettingsError

#: Solvers ``fallback_solver='auto'`` tries, in this order, when installed: Clarabel (a robust
#: interior point with infeasibility certificates), PIQP (proximal interior point) and HiGHS
#: (active set). Measured on Maros–Meszaros: Clarabel stops at 'almostsolved' on YAO, LISWET9,
#: LISWET12 and QSIERRA; PIQP gives verified solutions on the first three, HiGHS on all four.
AUTO_FALLBACKS: Tuple[str, ...] = ("clarabel", "piqp", "highs")

#: name -> (default, allowed types, one-line description). The single source of truth.
OPTIONS: Dict[str, Tuple[Any, tuple, str]] = {
    "qp_solver": (
        "auto",
        (str, type(None)),
        "Forward solver: a registered name (see `dqp.solvers.solver_table()`), "
        "or 'auto' / None (the batched IPM for dense inputs on a GPU or large batches, Clarabel otherwise).",
    ),
    "lin_solver": (
        "auto",
        (str, type(None)),
        "Backward linear solver for the reduced KKT system: a registered name "
        "(see `dqp.linsolve.linsolver_table()`) or 'auto' / None (QDLDL for sparse, dense LU for dense, "
        "batched torch for the batched IPM). Chosen independently of qp_solver: e.g. 'torch' "
        "differentiates a black-box forward with one batched factorization on the data's device.",
    ),
    "solve_type": ("dense", (str,), "'dense' (torch dense tensors) or 'sparse' (torch CSC tensors)."),
    "eps_abs": (
        1e-8,
        (float, int),
        "Absolute tolerance, translated to each solver's own keywords (the "
        "batched IPM: its stopping tolerance, the tighter of eps_abs and eps_rel).",
    ),
    "eps_rel": (1e-8, (float, int), "Relative tolerance, translated to each solver's own keywords (0 allowed)."),
    "eps_active": (
        1e-6,
        (float, int),
        "Active-set threshold: constraint i is active when its slack is "
        "below eps_active·max(|d_i|, |C_i||z|) or its dual above eps_active·‖μ‖∞ (the docs' theory "
        "page gives the whole rule). With refine_active, "
        "stricter and looser thresholds are tried when the set fails the KKT check.",
    ),
    "dual_available": (
        True,
        (bool, type(None)),
        "Use the solver's duals for the active set. False: detect from "
        "slacks only and compute the duals from the reduced KKT system (element-wise solvers; "
        "the batched IPM warns).",
    ),
    "normalize_constraints": (
        False,
        (bool,),
        "Scale the rows of C and A to unit norm (differentiably) "
        "before solving; duals are reported in the original scale.",
    ),
    "refine_active": (
        True,
        (bool,),
        "Polish the solution on the detected active set and repair the set "
        "(add violated rows, drop negative duals) until it is consistent (the batched IPM: "
        "its polish).",
    ),
    "max_refine_iter": (
        10,
        (int,),
        "Maximum repairs of the active set when refine_active=True (the batched "
        "IPM: its polish rounds, when set; else 3, 6 for float32).",
    ),
    "warm_start_from_previous": (
        False,
        (bool,),
        "Start each solve from the previous call's solution "
        "(per batch element; element-wise solvers, the batched IPM warns).",
    ),
    "omp_parallel": (
        "auto",
        (bool, str),
        "Solve the elements of a batch concurrently in a thread pool (created once): True, False, or "
        "'auto': only with a forward solver that runs without the GIL while it solves (the solver table's "
        "'parallel' column) and elements that take 4 ms of CPU time or more each, as measured on the previous "
        "call when it had the same problem shape (else on the call's first element). Element-wise solvers; the "
        "batched IPM is one solve already: it ignores 'auto' and warns for True.",
    ),
    "n_cpu": (None, (int, type(None)), "Workers for omp_parallel (default: os.cpu_count())."),
    "empty_batch": (
        True,
        (bool,),
        "Return outputs with a leading batch dimension of 1 for unbatched "
        "inputs, as libdqp does (False: unbatched inputs give unbatched outputs).",
    ),
    "qp_solver_keywords": (None, (dict, type(None)), "Extra keyword arguments passed to the forward solver."),
    "verbose": (
        False,
        (bool,),
        "Log what the layer chooses and does at INFO level (logger 'dqp'), and let the solver print its own output.",
    ),
    "time": (False, (bool,), "Measure and return solve_time and forward_time (seconds); None otherwise."),
    "check_PSD": (
        False,
        (bool,),
        "Check that P is positive semidefinite (an eigenvalue test) and raise NotPSDError if not.",
    ),
    "fallback_solver": (
        "auto",
        (str, tuple, list, type(None)),
        "When qp_solver fails on an element "
        "(or claims infeasibility that a second opinion does not confirm), these solvers "
        "are tried in turn before the failure is reported: a name, a sequence of names, "
        "'auto' (the installed ones of " + ", ".join(repr(x) for x in AUTO_FALLBACKS) + ") "
        "or None (no fallback). The first verified solution is kept; a certificate of "
        "infeasibility ends the chain. Element-wise solvers; the batched IPM warns on an explicit "
        "chain ('auto': none there).",
    ),
    "fallback_on_unverified": (
        True,
        (bool,),
        "Also run the fallback_solver chain when qp_solver's answer "
        "is solved but its KKT point cannot be verified (often the solver's accuracy, "
        "not the problem: on Maros–Meszaros PIQP verifies GOULDQP3, QSCFXM1, QGROW22 "
        "where Clarabel's point does not); a verified answer replaces it. One second opinion: the "
        "chain stops at the first fallback that solves.",
    ),
    "time_limit": (
        None,
        (float, int, type(None)),
        "Wall-clock limit in seconds for each element's solve, "
        "passed to the solver's own option (Clarabel, OSQP, HiGHS, SCS, QPALM); naming a solver without "
        "one (qp_solver or fallback_solver) raises SettingsError, and fallback_solver='auto' keeps only "
        "those with one. An element that hits it fails with MaxIterationsError.",
    ),
    "on_failure": (
        "raise",
        (str,),
        "'raise': a failed element raises a typed SolveError naming it. "
        "'mask': failed elements return zeros, zero gradients and a status in layer.info.",
    ),
}

_CHOICES = {"solve_type": ("dense", "sparse"), "on_failure": ("raise", "mask"), "omp_parallel": (True, False, "auto")}


class UnknownOptionError(SettingsError, KeyError):
    """``settings[key]`` with a key that is not an option (a ``KeyError`` too, as for a dict)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


#: Read-only keys of libdqp's settings dict that are not options (``settings[key]`` answers them).
INFO_KEYS: Tuple[str, ...] = ("available_qp_solvers",)


@dataclass(frozen=True)
class Settings(_MappingABC):
    """Validated layer settings; build with :func:`build_settings`.

    Also a mapping from option name to value (libdqp's settings were a dict): item assignment
    validates the new value with :func:`build_settings` and raises the same
    :class:`~dqp.errors.SettingsError` / :class:`~dqp.errors.SolverNotAvailableError`, leaving the
    settings unchanged. Attribute assignment stays an error.
    """

    qp_solver: str = "auto"
    lin_solver: str = "auto"
    solve_type: str = "dense"
    eps_abs: float = 1e-8
    eps_rel: float = 1e-8
    eps_active: float = 1e-6
    dual_available: bool = True
    normalize_constraints: bool = False
    refine_active: bool = True
    max_refine_iter: int = 10
    warm_start_from_previous: bool = False
    omp_parallel: Union[bool, str] = "auto"
    n_cpu: Optional[int] = None
    empty_batch: bool = True
    qp_solver_keywords: Mapping[str, Any] = field(default_factory=dict)
    verbose: bool = False
    time: bool = False
    check_PSD: bool = False
    fallback_solver: Tuple[str, ...] = AUTO_FALLBACKS  # build_settings keeps the installed ones
    fallback_on_unverified: bool = True
    time_limit: Optional[float] = None
    on_failure: str = "raise"

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some options changed (validated again)."""
        return build_settings(**{**self.as_dict(), **changes})

    # -- the mapping protocol (libdqp's settings dict) ----------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in OPTIONS:
            return getattr(self, key)
        if key == "available_qp_solvers":
            from dqp.solvers import available_solvers

            return list(available_solvers())
        raise UnknownOptionError(_unknown_message([key]))

    def __setitem__(self, key: str, value: Any) -> None:
        if key in INFO_KEYS:
            raise SettingsError(f"settings[{key!r}] is read-only information, not an option.")
        new = self.replace(**{key: value})  # raises the typed errors; self is left unchanged
        for f in fields(self):
            object.__setattr__(self, f.name, getattr(new, f.name))

    def __delitem__(self, key: str) -> None:
        raise SettingsError(
            f"Options cannot be deleted (del settings[{key!r}]); set a value instead, "
            f"e.g. settings[{key!r}] = {OPTIONS[key][0]!r}."
            if key in OPTIONS
            else _unknown_message([key])
        )

    def __iter__(self) -> Iterator[str]:
        return iter(OPTIONS)

    def __len__(self) -> int:
        return len(OPTIONS)

    __hash__ = None  # mutable through item assignment

    def as_dict(self) -> Dict[str, Any]:
        """The options as a plain dict (what :func:`build_settings` accepts)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_settings(**options: Any) -> Settings:
    """Validate options and return :class:`Settings`.

    Parameters
    ----------
    **options
        Any of the options in :data:`OPTIONS` (see the docs' options table).

    Raises
    ------
    SettingsError
        An unknown option, a wrong type or an out-of-range value; the message lists valid choices.
    SolverNotAvailableError
        ``qp_solver`` or ``lin_solver`` names a known solver that is not installed; the message
        gives the pip command.
    """
    from dqp.linsolve import get_linsolver, resolve_linsolver_name  # registries (lazy: avoid cycles)
    from dqp.solvers import get_solver, resolve_solver_name

    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise SettingsError(_unknown_message(unknown))
    values: Dict[str, Any] = {k: v[0] for k, v in OPTIONS.items()}
    values.update(options)
    for k, v in values.items():
        default, types, _ = OPTIONS[k]
        if isinstance(v, bool) and bool not in types:
            raise SettingsError(f"Option {k!r} expects {_typename(types)}, got bool {v!r}.")
        if not isinstance(v, types):
            raise SettingsError(f"Option {k!r} expects {_typename(types)}, got {type(v).__name__} {v!r}.")
        if k in _CHOICES and v not in _CHOICES[k]:
            raise SettingsError(f"Option {k!r} must be one of {_CHOICES[k]}, got {v!r}.")
    for k in ("eps_abs", "eps_rel", "eps_active"):
        lo_ok = float(values[k]) >= 0 if k == "eps_rel" else float(values[k]) > 0
        if not (lo_ok and float(values[k]) < 1):
            raise SettingsError(
                f"Option {k!r} must lie in {'[0, 1)' if k == 'eps_rel' else '(0, 1)'}, got {values[k]!r}."
            )
        values[k] = float(values[k])
    # None means "choose for me", as in the reference implementation
    for k in ("qp_solver", "lin_solver"):
        if values[k] is None:
            values[k] = "auto"
    if values["dual_available"] is None:
        values["dual_available"] = True
    if values["max_refine_iter"] < 0:
        raise SettingsError(f"Option 'max_refine_iter' must be >= 0, got {values['max_refine_iter']}.")
    if values["n_cpu"] is not None and values["n_cpu"] < 1:
        raise SettingsError(f"Option 'n_cpu' must be a positive integer or None, got {values['n_cpu']}.")
    if values["n_cpu"] is None:
        values["n_cpu"] = os.cpu_count() or 1
    values["qp_solver_keywords"] = dict(values["qp_solver_keywords"] or {})
    if values["qp_solver"] != "auto":
        values["qp_solver"] = resolve_solver_name(values["qp_solver"])
        get_solver(values["qp_solver"])  # raises SolverNotAvailableError with the install hint
    auto_chain = values["fallback_solver"] == "auto"
    values["fallback_solver"] = _fallback_chain(values["fallback_solver"])
    if values["time_limit"] is not None and auto_chain:  # 'auto' keeps the solvers that can honour it
        values["fallback_solver"] = tuple(
            n for n in values["fallback_solver"] if get_solver(n).time_limit_keywords(1.0)
        )
    if values["time_limit"] is not None:
        values["time_limit"] = _time_limit(values["time_limit"], values["qp_solver"], values["fallback_solver"])
    if values["lin_solver"] != "auto":
        values["lin_solver"] = resolve_linsolver_name(values["lin_solver"])
        get_linsolver(values["lin_solver"])
    return Settings(**values)


def settings_from(value: Any) -> Settings:
    """``Settings`` from what ``dQP_layer(settings=...)`` accepts: ``None`` (defaults), a
    :class:`Settings` (copied, so later item assignment does not reach a built layer) or a mapping
    of options such as a plain dict (validated; the informational ``available_qp_solvers`` key of
    libdqp's dict is ignored).

    Raises
    ------
    SettingsError
        Any other type, or an invalid option in the mapping.
    """
    if value is None:
        return build_settings()
    if isinstance(value, Settings):
        return replace(value, qp_solver_keywords=copy.deepcopy(value.qp_solver_keywords))
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise SettingsError(f"Option names must be strings, got {bad[:3]!r}.")
        return build_settings(**{k: v for k, v in value.items() if k not in INFO_KEYS})
    raise SettingsError(f"settings must be dQP.build_settings(...) or a dict of options, got {type(value).__name__}.")


def _unknown_message(keys: List[str]) -> str:
    hints = []
    for k in keys:
        close = difflib.get_close_matches(str(k), OPTIONS, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"Unknown option(s) {', '.join(hints)}. Valid options: {', '.join(OPTIONS)}."


def _fallback_chain(value: Any) -> Tuple[str, ...]:
    """Normalize ``fallback_solver`` to a tuple of registered, installed solver names."""
    if value is None:
        return ()
    from dqp.solvers import available_solvers, get_solver, resolve_solver_name

    if value == "auto":
        have = set(available_solvers())
        return tuple(name for name in AUTO_FALLBACKS if name in have)
    names = [value] if isinstance(value, str) else list(value)
    out = []
    for name in names:
        if not isinstance(name, str):
            raise SettingsError(
                f"Option 'fallback_solver' takes solver names, got {type(name).__name__} {name!r} in {value!r}."
            )
        name = resolve_solver_name(name)
        get_solver(name)  # raises SolverNotAvailableError with the install hint
        if name not in out:
            out.append(name)
    return tuple(out)


def _time_limit(seconds: Any, qp_solver: str, fallbacks: Tuple[str, ...]) -> float:
    """Validate ``time_limit``: positive, and every named solver must have a time-limit option."""
    from dqp.solvers import get_solver

    if not float(seconds) > 0:
        raise SettingsError(f"Option 'time_limit' must be a positive number of seconds or None, got {seconds!r}.")
    names = ([qp_solver] if qp_solver != "auto" else ["clarabel"]) + list(fallbacks)
    lacking = [n for n in dict.fromkeys(names) if not get_solver(n).time_limit_keywords(1.0)]
    if lacking:
        raise SettingsError(
            f"Option 'time_limit' cannot be honoured: {', '.join(map(repr, lacking))} "
            f"{'has' if len(lacking) == 1 else 'have'} no time-limit option. Use a solver that "
            f"has one (clarabel, osqp, highs, scs, qpalm), drop it from fallback_solver, or bound "
            f"the work with an iteration limit in qp_solver_keywords."
        )
    return float(seconds)


def options_table() -> str:
    """Markdown table of every option (generated for the README and docs)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for k, (default, _, text) in OPTIONS.items():
        rows.append(f"| `{k}` | `{default!r}` | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def _typename(types: tuple) -> str:
    names = [t.__name__ if t is not type(None) else "None" for t in types]
    return " or ".join(names)
