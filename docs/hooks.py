"""MkDocs hooks: tables generated from the code, benchmark results, Sphinx roles in docstrings.

* ``<!-- options-table -->``, ``<!-- solver-table -->`` and ``<!-- linsolver-table -->`` are
  replaced by :func:`dqp.settings.options_table`, :func:`dqp.solvers.solver_table` and
  :func:`dqp.linsolve.linsolver_table`, so the docs never copy the options by hand.
* ``<!-- benchmark-results -->`` is replaced by whatever ``experiments/results/`` holds when the
  docs are built: each ``*.md`` report becomes a page under ``benchmarks/results/``, each image
  is embedded, each CSV is linked. Missing files just mean a shorter page.
* Sphinx roles left in docstrings (``:class:`X```) are reduced to ``X`` in the rendered HTML.
* The package layout maps ``solvers/`` to ``dqp.solvers`` and ``linsolve/`` to ``dqp.linsolve``
  (``package-dir`` in pyproject). mkdocstrings' static analysis (griffe) cannot follow that
  mapping, so this module builds a mirror of the installed layout in ``build/docs-src/`` (git
  ignored; symlinks ``dqp/*``, ``dqp/solvers``, ``dqp/linsolve``) and ``mkdocs.yml`` points the
  Python handler's ``paths`` there. Run ``mkdocs`` from the repository root.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mkdocs.structure.files import File


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RESULTS_URI = "benchmarks/results"
_IMAGES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
_LINKABLE = _IMAGES + (".csv", ".md", ".json", ".txt")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):(<code>[^<]*</code>)")
_MD_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


MIRROR = ROOT / "build" / "docs-src"


def _mirror_package(base: Path = MIRROR) -> Path:
    """Make ``base/dqp/`` the installed layout, as symlinks into the checkout; return ``base``."""
    pkg = base / "dqp"
    if pkg.is_symlink() or pkg.is_file():
        pkg.unlink()
    elif pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for child in (ROOT / "dqp").iterdir():
        if child.name != "__pycache__":
            os.symlink(child, pkg / child.name)
    for sub in ("solvers", "linsolve"):
        os.symlink(ROOT / sub, pkg / sub)
    return base


# At import: MkDocs loads the hooks while it reads mkdocs.yml, before mkdocstrings looks for code.
_mirror_package()


def _result_files():
    if not RESULTS.is_dir():
        return []
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.suffix.lower() in _LINKABLE
                  and not any(part.startswith(".") for part in p.relative_to(RESULTS).parts))


def on_files(files, config):
    """Add the files of ``experiments/results`` under ``benchmarks/results/``."""
    for p in _result_files():
        uri = f"{RESULTS_URI}/{p.relative_to(RESULTS).as_posix()}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(p)))
    return files


def _tables() -> dict:
    from dqp.linsolve import linsolver_table
    from dqp.settings import options_table
    from dqp.solvers import solver_table

    return {"<!-- options-table -->": _escape_cells(options_table()),
            "<!-- solver-table -->": _escape_cells(solver_table()),
            "<!-- linsolver-table -->": _escape_cells(linsolver_table())}


def _escape_cells(table: str) -> str:
    """Escape ``|`` inside the last cell of each row (e.g. ``|d_i|`` in a description).

    The column count comes from the header row; extra separators in a body row can only come
    from the text of its last cell, which is where the generated tables put free text.
    """
    lines = table.splitlines()
    if not lines:
        return table
    cells = lambda line: re.split(r"(?<!\\)\|", line.strip().strip("|"))  # already-escaped \| stays
    ncols = len(cells(lines[0]))
    out = []
    for line in lines:
        parts = cells(line)
        if len(parts) > ncols and not line.startswith("|---"):
            parts = parts[:ncols - 1] + ["\\|".join(parts[ncols - 1:])]
        out.append("|" + "|".join(parts) + "|")
    return "\n".join(out)


def _experiments_table() -> str:
    """The studies in ``experiments/*.py`` with the first line of each module docstring."""
    import ast

    rows = ["| script | what it does |", "|---|---|"]
    for p in sorted((ROOT / "experiments").glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or ""
        except SyntaxError:  # a study being edited must not break the docs
            doc = ""
        first = doc.strip().splitlines()[0] if doc.strip() else "(no description)"
        first = first.replace("|", "\\|")
        rows.append(f"| `experiments/{p.name}` | {first} |")
    return "\n".join(rows) if len(rows) > 2 else "*(no studies in `experiments/`)*"


def _benchmarks_section(files) -> str:
    found = _result_files()
    if not found:
        return ('!!! note "No results yet"\n    `experiments/results/` holds no reports in this checkout; '
                'run the scripts in `experiments/` (see below) and rebuild the docs.\n')
    out = []
    by_stem = {}
    for p in found:
        by_stem.setdefault(p.relative_to(RESULTS).with_suffix("").as_posix(), []).append(p)
    for stem, group in sorted(by_stem.items()):
        out.append(f"### {stem}\n")
        inline = []
        for p in sorted(group, key=lambda x: (x.suffix != ".md", x.suffix)):
            uri = f"{RESULTS_URI}/{p.relative_to(RESULTS).as_posix()}"
            if p.suffix.lower() in _IMAGES:
                out.append(f"![{stem}]({uri})\n")
            elif p.suffix.lower() == ".md":
                out.append(f"- Report: [{p.name}]({uri}) (also below)")
                inline.append(_inline_report(p, uri, files))
            elif p.suffix.lower() == ".csv":
                rows = max(sum(1 for _ in p.open(encoding="utf-8", errors="replace")) - 1, 0)
                out.append(f"- Data: [{p.name}]({uri}) ({rows} rows)")
            else:
                out.append(f"- [{p.name}]({uri})")
        out.append("")
        out.extend(inline)
    return "\n".join(out)


def _inline_report(path: Path, uri: str, files) -> str:
    """A results report as a collapsed block on the benchmarks page (headings become bold lines)."""
    text = _delink_missing(path.read_text(encoding="utf-8", errors="replace"), uri, files,
                           rebase=True)
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            line = f"**{line.lstrip('#').strip()}**"
        lines.append(("    " + line) if line.strip() else "")
    return f'??? abstract "Report: {path.name}"\n' + "\n".join(lines) + "\n"


def _delink_missing(markdown: str, page_src: str, files, rebase: bool = False) -> str:
    """In a copied results report, turn links to files the site does not have into plain text."""
    base = Path(page_src).parent

    def fix(m):
        bang, text, target = m.groups()
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            return m.group(0)
        path = (base / target.split("#")[0]).as_posix()
        norm = str(Path(path))
        parts = []
        for part in Path(norm).parts:  # resolve .. without touching the file system
            if part == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(part)
        if files.get_file_from_path("/".join(parts)) is not None:
            if rebase:  # the text moves to a page at the docs root: make the link relative to it
                return f"{bang}[{text}]({'/'.join(parts)})"
            return m.group(0)
        return f"{text} (`{target}`)" if not bang else f"*(image `{target}` not available)*"

    return _MD_LINK.sub(fix, markdown)


def on_page_markdown(markdown, page, config, files):
    """Fill the generated tables and the benchmark section."""
    src = page.file.src_uri
    if src.startswith(RESULTS_URI + "/"):
        return _delink_missing(markdown, src, files)
    if "<!-- " not in markdown:
        return markdown
    for marker, table in _tables().items():
        markdown = markdown.replace(marker, table)
    if "<!-- experiment-scripts -->" in markdown:
        markdown = markdown.replace("<!-- experiment-scripts -->", _experiments_table())
    if "<!-- benchmark-results -->" in markdown:
        markdown = markdown.replace("<!-- benchmark-results -->", _benchmarks_section(files))
    return markdown


def on_page_content(html, page, config, files):
    """Drop Sphinx roles (``:class:`` etc.) that docstrings carry into the rendered API pages."""
    return _ROLE.sub(r"\1", html)
