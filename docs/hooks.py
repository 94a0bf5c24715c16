"""MkDocs hooks: tables generated from the code, benchmark results, Sphinx roles in docstrings.

* ``<!-- options-table -->``, ``<!-- solver-table -->`` and ``<!-- linsolver-table -->`` are
  replaced by :func:`dqp.settings.options_table`, :func:`dqp.solvers.solver_table` and
  :func:`dqp.linsolve.linsolver_table`, so the docs never copy the options by hand.
* ``<!-- benchmark-results -->`` is replaced by one section per maintained study (``STUDIES``):
  what it answers, the command that reproduces it, its plot and its tables, read from
  ``experiments/results/`` when the docs are built; ``<!-- results-summary -->`` by the table of
  batched-QP results that the README quotes. The result files are copied under
  ``benchmarks/results/`` so that plots and CSVs can be linked.
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
    return sorted(
        p
        for p in RESULTS.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _LINKABLE
        and not any(part.startswith(".") for part in p.relative_to(RESULTS).parts)
    )


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

    return {
        "<!-- options-table -->": _escape_cells(options_table()),
        "<!-- solver-table -->": _escape_cells(solver_table()),
        "<!-- linsolver-table -->": _escape_cells(linsolver_table()),
    }


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
            parts = parts[: ncols - 1] + ["\\|".join(parts[ncols - 1 :])]
        out.append("|" + "|".join(parts) + "|")
    return "\n".join(out)


#: The maintained studies, in the order of the benchmarks page: title, script, result stems (files
#: ``experiments/results/<stem>.{md,png,csv}``) and what the study answers. A study whose results are
#: absent from the checkout is listed with its command and "no results yet".
STUDIES = [
    {
        "title": "Batched dense QPs: dqp vs qpth vs qpax",
        "script": "bench_qpth.py",
        "stems": ["qpth_cuda", "qpth_cpu"],
        "subtitles": {"qpth_cuda": "On a GPU", "qpth_cpu": "On the CPU"},
        "what": "Many small dense QPs solved at once, the OptNet use case: forward plus backward of a "
        "batch of qpth's random problems, on a GPU and on the CPU, with every gradient checked "
        "against an independent reference.",
    },
    {
        "title": "The black-box path's own cost",
        "script": "blackbox_overhead.py",
        "stems": ["blackbox_overhead"],
        "command": "python experiments/blackbox_overhead.py --libdqp-python .peers/libdqp/bin/python",
        "what": "What dqp adds to its forward solver's time when any qpsolvers backend solves the "
        "forward: small Maros–Meszaros problems, small dense batches, repeated calls, large "
        "sparse grids, next to the raw solver and to libdqp.",
    },
    {
        "title": "The polish on every small Maros–Meszaros problem",
        "script": "polish_sweep.py",
        "stems": ["polish_sweep"],
        "command": "python experiments/polish_sweep.py --compare-path DIR",
        "what": "The verdict, the polish path and the factorizations of each of the 62 problems with n, m "
        "≤ 1000 (PIQP and Clarabel), next to another build: no verified answer may be lost.",
    },
    {
        "title": "Batches in a thread pool",
        "script": "parallel_batches.py",
        "stems": ["parallel_batches"],
        "what": "A batch of black-box solves one after another, in a thread pool and with "
        "omp_parallel='auto' (the default), called in turn in one process: where the pool pays, and "
        "that the automatic choice takes it there and only there.",
    },
    {
        "title": "The Maros–Meszaros collection",
        "script": "maros_meszaros.py",
        "stems": ["maros_meszaros"],
        "what": "137 hard sparse QPs from the optimization literature through the layer, forward and "
        "backward, next to libdqp: failures, KKT residuals, finite-difference checks, times.",
    },
    {
        "title": "Projection onto the simplex, n = 10 to 100 000",
        "script": "simplex_scaling.py",
        "stems": ["simplex_scaling"],
        "what": "How forward plus backward time grows with the problem size, against an exact "
        "closed-form reference, for dqp's solvers and the peer libraries.",
    },
    {
        "title": "A bilevel loop with and without warm starts",
        "script": "bilevel_warmstart.py",
        "stems": ["bilevel_warmstart", "bilevel_warmstart_n300"],
        "subtitles": {"bilevel_warmstart": "n = 2000", "bilevel_warmstart_n300": "n = 300, more solvers"},
        "what": "100 outer gradient steps through a sparse denoising QP: what starting each solve from "
        "the previous solution saves, solver by solver, and that both loops reach the same point.",
    },
    {
        "title": "The layer's own cost on the batched path",
        "script": "layer_overhead.py",
        "stems": ["layer_overhead_cpu", "layer_overhead_cuda"],
        "subtitles": {"layer_overhead_cpu": "On the CPU", "layer_overhead_cuda": "On a GPU"},
        "what": "dQP_layer(qp_solver='dqp_ipm') against dqp.qpth.QPFunction, the same engine behind two "
        "front doors, called in turn in one process: what the general layer adds.",
    },
    {
        "title": "The CPU kernel under load",
        "script": "cpu_load_ab.py",
        "stems": ["cpu_load_ab"],
        "what": "The C++ build of the batched solver's kernel with a static or a dynamic split of the batch "
        "over threads, with and without another busy process, qpth beside it.",
    },
    {
        "title": "Small CPU batches under load",
        "script": "cpu_small_load.py",
        "stems": ["cpu_small_load"],
        "what": "dqp.qpth.QPFunction on one to 128 small QPs at 1 and 2 torch threads, with and without "
        "another process busy on a core, this build beside the one before small batches ran on one thread.",
    },
    {
        "title": "Data-parallel training: weak scaling with DDP",
        "script": "ddp_scaling.py",
        "stems": ["ddp_scaling"],
        "command": "python experiments/ddp_scaling.py --sweep 8",
        "what": "One training step of an OptNet-style model under DistributedDataParallel on 1, 2, 4, ... "
        "GPUs at a fixed batch per GPU: the weak-scaling efficiency, and the largest batch per GPU.",
    },
]

#: The README's results table is this summary (``tests/test_docs.py`` checks that they agree).
#: stem -> the cells shown: batch sizes, (B, n) pairs, or None for all.
SUMMARY_ROWS = {"qpth_cuda": [(1, 10), (128, 100), (128, 200), (128, 500), (1024, 100), (1024, 500)], "qpth_cpu": [128]}


def _read_cells(stem: str):
    """The rows of ``results/<stem>.csv`` (a ``bench_qpth.py`` table) as dicts; [] if absent."""
    import csv

    path = RESULTS / f"{stem}.csv"
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _meta(stem: str) -> dict:
    import json

    path = RESULTS / f"{stem}.json"
    return json.loads(path.read_text(encoding="utf-8")).get("meta", {}) if path.is_file() else {}


def _ms(row) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return "not run" if row["status"].startswith("skipped") else row["status"]
    t = float(row["time_median_s"])
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _ratio(ours, peer) -> str:
    if not ours or not peer or ours["status"] != "ok" or peer["status"] != "ok":
        return "—"
    r = float(peer["time_median_s"]) / float(ours["time_median_s"])
    return f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


def results_summary() -> str:
    """A markdown table of the float64 batched-QP results: device, B, n, times, dqp's speed-up."""
    head = (
        "| device | B | n = m | dqp | qpth | qpax | cuPIQP | dqp vs qpth | dqp vs qpax | dqp vs cuPIQP |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    lines = [head]
    for stem, batches in SUMMARY_ROWS.items():
        rows = [r for r in _read_cells(stem) if r["dtype"] == "float64"]
        meta = _meta(stem)
        threads = re.search(r"torch threads (\d+)", meta.get("host", ""))
        device = meta.get("gpu", "").replace("NVIDIA ", "") or (
            f"CPU, {threads.group(1)} thread{'s' if threads.group(1) != '1' else ''}" if threads else stem
        )
        cells = {}
        for r in rows:
            cells[(int(r["B"]), int(r["n"]), r["method"])] = r
        for B, n in dict.fromkeys((int(r["B"]), int(r["n"])) for r in rows):
            if batches is not None and B not in batches and (B, n) not in batches:
                continue
            get = lambda m: cells.get((B, n, m))  # noqa: E731
            lines.append(
                f"| {device} | {B} | {n} | {_ms(get('dqp'))} | {_ms(get('qpth'))} | {_ms(get('qpax'))} "
                f"| {_ms(get('cupiqp'))} | {_ratio(get('dqp'), get('qpth'))} | {_ratio(get('dqp'), get('qpax'))} "
                f"| {_ratio(get('dqp'), get('cupiqp'))} |"
            )
    return "\n".join(lines) if len(lines) > 1 else "*(no results in `experiments/results/`)*"


def _script_summary(script: str) -> str:
    """The first line of a study script's module docstring."""
    import ast

    p = ROOT / "experiments" / script
    try:
        doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):  # a missing or half-edited study must not break the docs
        doc = ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


_COMMAND = re.compile(r"(?:^- command: |^Command: `|^`)((?:[A-Z_]+=\S+ )*python[^`\n]*experiments/[^`\n]*)", re.M)


def _report_command(text: str) -> str:
    m = _COMMAND.search(text)
    return m.group(1).strip() if m else ""


def _report_body(path: Path, uri: str, files) -> str:
    """A results report for the page: title dropped, headings demoted below the section's."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if files is not None:
        text = _delink_missing(text, uri, files, rebase=True)
    out, dropped_title = [], False
    for line in text.splitlines():
        if line.startswith("#"):
            if not dropped_title:
                dropped_title = True
                continue
            line = "#### " + line.lstrip("#").strip()
        out.append(line)
    return "\n".join(out).strip() + "\n"


def _benchmarks_section(files) -> str:
    """One section per maintained study: what it answers, the command, its plot and its tables."""
    out = []
    for study in STUDIES:
        if not (ROOT / "experiments" / study["script"]).is_file():
            continue  # a study not in this checkout
        out += [f"## {study['title']}", "", study["what"], ""]
        summary = _script_summary(study["script"])
        out += [f"Script: `experiments/{study['script']}`" + (f" — {summary}" if summary else ""), ""]
        found = False
        for stem in study["stems"]:
            report = RESULTS / f"{stem}.md"
            if not report.is_file():
                continue
            found = True
            uri = f"{RESULTS_URI}/{stem}.md"
            cmd = _report_command(report.read_text(encoding="utf-8", errors="replace")) or study.get("command", "")
            if len(study["stems"]) > 1:
                out += [f"### {study.get('subtitles', {}).get(stem, stem.replace('_', ' '))}", ""]
            if cmd:
                out += ["Reproduce:", "", "```bash", cmd, "```", ""]
            png = RESULTS / f"{stem}.png"
            if png.is_file():
                out += [f"![{stem}]({RESULTS_URI}/{stem}.png)", ""]
            out += [_report_body(report, uri, files)]
            data = [
                f"[{p.name}]({RESULTS_URI}/{p.name})"
                for p in (RESULTS / f"{stem}.csv", RESULTS / f"{stem}.json")
                if p.is_file()
            ]
            if data:
                out += ["Data: " + ", ".join(data), ""]
        if not found:
            out += [
                '!!! note "No results yet"',
                f"    `experiments/results/` holds no report of this study in this checkout; run "
                f"`{study.get('command', 'python experiments/' + study['script'])}` and rebuild the docs.",
                "",
            ]
    return "\n".join(out)


#: The examples page, in this order; other ``examples/*.py`` files follow alphabetically.
EXAMPLES_ORDER = ["quickstart.py", "optnet_classifier.py", "sudoku.py", "bilevel_warmstart.py", "all_solvers.py"]


def _examples_section() -> str:
    """One section per ``examples/*.py``: its docstring as prose, the command, the source."""
    import ast

    folder = ROOT / "examples"
    files = sorted(
        folder.glob("*.py"),
        key=lambda p: (EXAMPLES_ORDER.index(p.name) if p.name in EXAMPLES_ORDER else len(EXAMPLES_ORDER), p.name),
    )
    out = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        try:
            doc = ast.get_docstring(ast.parse(source)) or ""
        except SyntaxError:
            doc = ""
        title, _, rest = doc.strip().partition("\n")
        out += [f"## {path.stem.replace('_', ' ').capitalize()}", "", f"`examples/{path.name}`: {title}", ""]
        if rest.strip():
            out += ["```text", rest.strip("\n"), "```", ""]
        out += (
            [
                f"```bash\npython examples/{path.name}\n```",
                "",
                f'??? example "Source of examples/{path.name}"',
                "",
                "    ```python",
            ]
            + [("    " + line) if line else "" for line in source.splitlines()]
            + ["    ```", ""]
        )
    return "\n".join(out)


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
    if "<!-- examples -->" in markdown:
        markdown = markdown.replace("<!-- examples -->", _examples_section())
    if "<!-- results-summary -->" in markdown:
        markdown = markdown.replace("<!-- results-summary -->", results_summary())
    if "<!-- benchmark-results -->" in markdown:
        markdown = markdown.replace("<!-- benchmark-results -->", _benchmarks_section(files))
    return markdown


def on_page_content(html, page, config, files):
    """Drop Sphinx roles (``:class:`` etc.) that docstrings carry into the rendered API pages."""
    return _ROLE.sub(r"\1", html)


def update_readme(path: Path = ROOT / "README.md") -> bool:
    """Rewrite the README's results table (between its markers) from ``results_summary()``;
    return whether the file changed. Run ``python docs/hooks.py`` after rerunning a study."""
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- results-table-start -->\n", "<!-- results-table-end -->"
    i, j = text.index(start) + len(start), text.index(end)
    new = text[:i] + results_summary() + "\n" + text[j:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already current")
