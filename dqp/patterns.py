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
    ccol, rows : ndarray (int64)
        Column pointers and row indices (copies: the caller's tensors may change later; never
        written to).
    mirror : tuple or None
        For a square pattern in canonical form (sorted rows, no duplicates): ``(pos, found)``, where
        each stored entry's transpose is stored (``found``) and at which position (``pos``); ``None``
        otherwise (a non-square or non-canonical pattern).
    canonical : bool
        Rows sorted within each column, no duplicates (SciPy's canonical format).
    index_dtype : numpy dtype
        int32 when every index and dimension fits, as SciPy stores them (an int64 index array costs
        SciPy a scan of its contents and a converted copy on every matrix built from it).
    """

    def __init__(self, ccol: np.ndarray, rows: np.ndarray, shape: Tuple[int, int]) -> None:
        # (copies, writable: torch.as_tensor warns on read-only arrays; no code writes into them)
        self.ccol = np.array(ccol, dtype=np.int64)
        self.rows = np.array(rows, dtype=np.int64)
        self.shape = shape
        keys = _column_major_keys(self.ccol, self.rows, shape[0])
        self.canonical = len(keys) < 2 or bool((keys[1:] > keys[:-1]).all())
        self.mirror = _mirror(keys, self.rows, shape[0]) if shape[0] == shape[1] and self.canonical else None
        small = max(shape[0], shape[1], len(self.rows)) < np.iinfo(np.int32).max
        self.index_dtype = np.dtype(np.int32 if small else np.int64)

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


def _column_major_keys(ccol: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Each stored entry's column-major position ``col·n + row`` (increasing for a canonical pattern)."""
    cols = np.repeat(np.arange(len(ccol) - 1, dtype=np.int64), np.diff(ccol))
    return cols * n + rows


def _mirror(keys: np.ndarray, rows: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Positions of each entry's transpose in a canonical square CSC pattern (see :class:`CheckedPattern`),
    from its column-major ``keys``."""
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, bool)
    cols = keys // n
    mirror = rows * n + cols  # the position of each entry's transpose
    pos = np.minimum(np.searchsorted(keys, mirror), len(keys) - 1)
    return pos, keys[pos] == mirror


class PatternCache:
    """The last checked patterns (thread safe; bounded, oldest out): at most ``size`` of them and at
    most ``max_entries`` stored indices in all (large patterns are few and cheap next to their solve).

    ``get(ccol, rows, shape, check)`` returns the :class:`CheckedPattern` of these arrays, running
    ``check(ccol, rows)`` (which raises on a malformed structure) only the first time they are seen.
    Patterns are found by a hash of their arrays and confirmed by comparing the arrays themselves.
    """

    def __init__(self, size: int = 64, max_entries: int = 4_000_000) -> None:
        self.size = size
        self.max_entries = max_entries
        self._items: dict = {}
        self._entries = 0
        self._lock = threading.Lock()

    def get(
        self,
        ccol: np.ndarray,
        rows: np.ndarray,
        shape: Tuple[int, int],
        check: Callable[[np.ndarray, np.ndarray], None],
    ) -> CheckedPattern:
        key = (shape, len(ccol), len(rows), hash(ccol.tobytes()), hash(rows.tobytes()))
        hit = self._items.get(key)
        if hit is not None and np.array_equal(hit.ccol, ccol) and np.array_equal(hit.rows, rows):
            return hit
        check(ccol, rows)
        pattern = CheckedPattern(ccol, rows, shape)
        size = len(ccol) + len(rows)
        with self._lock:
            old = self._items.pop(key, None)  # (a hash collision: the newer pattern replaces it)
            self._entries -= 0 if old is None else len(old.ccol) + len(old.rows)
            if size <= self.max_entries:  # (a pattern beyond the whole budget is checked, not kept)
                while self._items and (len(self._items) >= self.size or self._entries + size > self.max_entries):
                    first = self._items.pop(next(iter(self._items)))
                    self._entries -= len(first.ccol) + len(first.rows)
                self._items[key] = pattern
                self._entries += size
        return pattern

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._entries = 0


#: the patterns :func:`dqp.problem.validate` has checked (bounded; shared by every layer of the process)
PATTERNS = PatternCache()
