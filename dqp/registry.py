"""One registry implementation for forward solvers and linear solvers.

A plugin is a class with a ``name`` (plus ``aliases``), the ``modules`` whose importability makes
it available, the pip ``extra`` that installs it, and the formats it takes. Error messages, the
docs tables and ``python -m dqp.diagnose`` are all generated from the registries.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar, Dict, Generic, List, Tuple, Type, TypeVar

from dqp.errors import SettingsError, SolverNotAvailableError


class Plugin:
    """Class attributes shared by every registered solver (see the subclasses for more)."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()
    modules: ClassVar[tuple] = ()
    extra: ClassVar[str] = ""
    dense: ClassVar[bool] = True
    sparse: ClassVar[bool] = True
    batched: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @classmethod
    def is_available(cls) -> bool:
        """Whether every module in ``modules`` is importable (nothing is imported)."""
        return all(importlib.util.find_spec(m) is not None for m in cls.modules)

    @classmethod
    def install_hint(cls) -> str:
        """The pip command that installs this plugin."""
        pkgs = " ".join(cls.modules)
        if cls.extra:
            return f"pip install 'dqp-torch[{cls.extra}]'  (or: pip install {pkgs})"
        return f"pip install {pkgs}" if pkgs else "(built in)"


T = TypeVar("T", bound=Plugin)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


class Registry(Generic[T]):
    """Plugins by name and alias.

    Parameters
    ----------
    option : str
        The settings option that takes these names (``"qp_solver"``, ``"lin_solver"``), used in
        error messages.
    what : str
        What a plugin is, in words (``"solver"``, ``"linear solver"``).
    """

    def __init__(self, option: str, what: str):
        self.option = option
        self.what = what
        self._classes: Dict[str, Type[T]] = {}
        self._aliases: Dict[str, str] = {}

    def register(self, cls: Type[T]) -> Type[T]:
        """Class decorator adding ``cls`` (a later class with the same name replaces the earlier)."""
        if not cls.name:
            raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
        self._classes[cls.name] = cls
        for a in (cls.name, *cls.aliases):
            self._aliases[_norm(a)] = cls.name
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (for tests and plugins that replace others)."""
        self._classes.pop(name, None)
        for a in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[a]

    def classes(self) -> Dict[str, Type[T]]:
        """All registered classes by name (available or not)."""
        return dict(self._classes)

    def available(self) -> List[str]:
        """Names whose packages are importable."""
        return [n for n, c in self._classes.items() if c.is_available()]

    def resolve(self, name: str) -> str:
        """Map a name or alias to the registry name; raise a :class:`SettingsError` listing the choices."""
        if not isinstance(name, str):
            raise SettingsError(
                f"{self.option} must be a string, got {type(name).__name__}. "
                f"Valid choices: {', '.join(sorted(self._classes))}."
            )
        key = _norm(name)
        if key not in self._aliases:
            aliases = sorted(a for a in self._aliases if a not in self._classes)
            raise SettingsError(
                f"{self.option}={name!r} is not a known {self.what}. Registered: {', '.join(sorted(self._classes))} "
                f"(installed: {', '.join(self.available()) or 'none'}; aliases: {', '.join(aliases)})."
            )
        return self._aliases[key]

    def get(self, name: str) -> T:
        """Instantiate ``name``; raise :class:`SolverNotAvailableError` with the install hint if missing."""
        cls = self._classes[self.resolve(name)]
        if not cls.is_available():
            raise SolverNotAvailableError(
                f"{self.option}={cls.name!r} is registered but not installed. Install it with: "
                f"{cls.install_hint()}. Installed: {', '.join(self.available()) or 'none'}."
            )
        return cls()

    def table(
        self, last: Tuple[str, str] = ("install", "install_hint"), flags: Tuple[Tuple[str, str], ...] = ()
    ) -> str:
        """Markdown table: name, aliases, formats, the yes/no ``flags`` (column, attribute), installed, and
        one more column (``last``)."""
        head, attr = last
        cols = ["name", "aliases", "dense", "sparse", "batched", *(f for f, _ in flags), "installed", head]
        rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        yn = lambda b: "yes" if b else "no"
        for n, c in sorted(self._classes.items()):
            val = getattr(c, attr)
            val = val() if callable(val) else val
            marks = "".join(f"{yn(getattr(c, a))} | " for _, a in flags)
            rows.append(
                f"| `{n}` | {', '.join(c.aliases) or '-'} | {yn(c.dense)} | {yn(c.sparse)} | "
                f"{yn(c.batched)} | {marks}{yn(c.is_available())} | {val} |"
            )
        return "\n".join(rows)
