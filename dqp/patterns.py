"""Checked sparse patterns, kept per pattern: a layer called in a loop passes the same CSC structure
with new values, and its structure check, index arrays and transpose positions are made once.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

import numpy as np


class CheckedPattern:
    """One CSC pattern that passed its structure check.

    Attributes
    ----------
    ccol, rows : ndarray (int64, read only)
        Column pointers and row indices (copies: the caller's tensors may change later).
    mirror : tuple or None
        For a square pattern in canonical form (sorted rows, no duplicates): ``(pos, found)``, where
        each stored entry's transpose is stored (``found``) and at which position (``pos``); ``None``
        otherwise (a non-square or non-canonical pattern).
    """

    def __init__(self, ccol: np.ndarray, rows: np.ndarray, shape: Tuple[int, int]) -> None:
        self.ccol = np.array(ccol, dtype=np.int64)
        self.rows = np.array(rows, dtype=np.int64)
        self.ccol.flags.writeable = False
        self.rows.flags.writeable = False
        self.shape = shape
        self.mirror = _mirror(self.ccol, self.rows, shape[0]) if shape[0] == shape[1] else None

    def asymmetry(self, vals: np.ndarray) -> Optional[float]:
        """``max |M − Mᵀ|`` for values ``vals`` on this (square) pattern; ``None`` when the pattern is
        not canonical (the caller then measures a summed copy)."""
        if not len(vals):
            return 0.0
        if self.mirror is None:
            return None
        pos, found = self.mirror
        diff = np.where(found, vals - vals[pos], vals)  # an entry without a stored mirror differs by itself
        return float(np.max(np.abs(diff)))


def _mirror(ccol: np.ndarray, rows: np.ndarray, n: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Positions of each entry's transpose in a canonical square CSC pattern (see :class:`CheckedPattern`)."""
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, bool)
    cols = np.repeat(np.arange(n, dtype=np.int64), np.diff(ccol))
    keys = cols * n + rows  # column-major position: increasing for a canonical pattern
    if len(keys) > 1 and not np.all(keys[1:] > keys[:-1]):
        return None
    mirror = rows * n + cols  # the position of each entry's transpose
    pos = np.minimum(np.searchsorted(keys, mirror), len(keys) - 1)
    return pos, keys[pos] == mirror


class PatternCache:
    """The last ``size`` checked patterns, by their bytes (thread safe; a bounded, oldest-out cache).

    ``get(ccol, rows, shape, check)`` returns the :class:`CheckedPattern` of these arrays, running
    ``check(ccol, rows)`` (which raises on a malformed structure) only the first time they are seen.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(
        self,
        ccol: np.ndarray,
        rows: np.ndarray,
        shape: Tuple[int, int],
        check: Callable[[np.ndarray, np.ndarray], None],
    ) -> CheckedPattern:
        key = (shape, ccol.dtype.str, rows.dtype.str, ccol.tobytes(), rows.tobytes())
        hit = self._items.get(key)
        if hit is not None:
            return hit
        check(ccol, rows)
        pattern = CheckedPattern(ccol, rows, shape)
        with self._lock:
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[key] = pattern
        return pattern

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: the patterns :func:`dqp.problem.validate` has checked (bounded; shared by every layer of the process)
PATTERNS = PatternCache()
