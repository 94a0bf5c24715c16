"""Whether a solve runs the fused kernel (:mod:`dqp.solvers.fused`) or the torch loop."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from dqp.solvers import fused as _fused
from dqp.solvers.ipm.options import DEFAULT_OPTIONS, IPMOptions

from dqp.errors import SettingsError

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


def fused_flag(fused: Optional[bool], options: IPMOptions = DEFAULT_OPTIONS):
    """The effective ``fused`` setting: the call's, else :attr:`KernelOptions.mode`."""
    fused = options.kernel.mode if fused is None else fused
    if fused not in (True, False, "auto"):
        raise SettingsError(f"ipm_solve: fused must be True, False or None, got {fused!r}.")
    return fused


def fused_reasons(
    fused,
    fm: str,
    dtype: torch.dtype,
    device: torch.device,
    n: int,
    m: int,
    p: int,
    trace: Optional[list],
    refine: Optional[int] = None,
    options: IPMOptions = DEFAULT_OPTIONS,
) -> list:
    """Why the fused kernel cannot run this solve (empty: it can)."""
    # (fused=True waits for a CUDA build that is not done yet; "auto" may take the torch loop meanwhile)
    fits = _fused.fused_available(device, dtype, n, m, p, options.kernel, wait=True if fused is True else None) or (
        device.type == "cpu" and fused is True
    )
    return [
        why
        for bad, why in (
            (
                fm != "dual",
                f"the {fm} form was chosen (the kernel runs the dual form: P positive definite "
                "and well conditioned, form='dual' or 'auto')",
            ),
            (dtype != torch.float64, f"the data are {dtype} (the kernel is float64)"),
            (m + p == 0, "the problem has no constraints"),
            (trace is not None, "trace is given"),
            (refine not in (None, 0), f"refine={refine} (the kernel does not refine the Newton direction)"),
            (not fits, f"no fused build fits on {device} (CUDA, shared memory for k = {m + p})"),
        )
        if bad
    ]


def _use_fused(
    fused: Optional[bool],
    fm: str,
    dtype: torch.dtype,
    device: torch.device,
    n: int,
    m: int,
    p: int,
    trace: Optional[list],
    refine: Optional[int] = None,
    options: IPMOptions = DEFAULT_OPTIONS,
) -> bool:
    """Whether this solve runs the fused kernel (see ``ipm_solve``'s ``fused``)."""
    fused = fused_flag(fused, options)
    if fused is False:
        return False
    reasons = fused_reasons(fused, fm, dtype, device, n, m, p, trace, refine, options)
    if fused == "auto":
        return not reasons
    if reasons:
        raise SettingsError(
            "ipm_solve: fused=True does not apply here: "
            + "; ".join(reasons)
            + ". Use fused=None (automatic) or False."
        )
    return True
