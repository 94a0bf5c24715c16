"""Documentation: every public callable has a docstring, and the MkDocs site builds with --strict."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The modules whose public API the docs promise (the API reference pages render these).
PUBLIC_MODULES = [
    "dqp",
    "dqp.dQP",
    "dqp.settings",
    "dqp.result",
    "dqp.errors",
    "dqp.layer",
    "dqp.qpth",
    "dqp.ipm_layer",
    "dqp.solvers",
    "dqp.linsolve",
    "dqp.io",
    "dqp.diagnose",
    "dqp.layer_compat",
    "dqp.sparse_helper",
    "dqp.lin_solvers",
    "dqp.qp_diagnostic",
    "dqp.benchmark",
]
#: Packages whose ``__init__`` re-exports objects defined in submodules.
PACKAGES = {"dqp", "dqp.solvers", "dqp.linsolve"}


def _public_objects(modname: str):
    """``(qualified name, object)`` for the public functions and classes of a module.

    ``__all__`` when the module defines it; otherwise the names defined in the module itself (for
    a package: the dqp objects it re-exports). Imported helpers of a plain module are not its API.
    """
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    for n in names:
        obj = getattr(mod, n)
        if isinstance(obj, types.ModuleType) or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        origin = getattr(obj, "__module__", "") or ""
        if not origin.startswith("dqp"):
            continue  # re-exported third-party or stdlib names
        if "__all__" not in vars(mod) and modname not in PACKAGES and origin != modname:
            continue
        yield f"{modname}.{n}", obj


def _own_members(cls):
    """Public methods and properties defined in the class body itself (not inherited)."""
    for n, v in vars(cls).items():
        if n.startswith("_"):
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if inspect.isfunction(v) or isinstance(v, property):
            yield n, v


def test_public_api_is_not_empty():
    names = {name for modname in PUBLIC_MODULES for name, _ in _public_objects(modname)}
    # the objects the README and the API pages name must be found by the walk
    for expected in (
        "dqp.dQP.build_settings",
        "dqp.dQP.dQP_layer",
        "dqp.dQP.Settings",
        "dqp.QPOutput",
        "dqp.SolveInfo",
        "dqp.DQPError",
        "dqp.qpth.QPFunction",
        "dqp.ipm_layer.solve_qp_batch",
        "dqp.io.load_problem",
        "dqp.solvers.solver_table",
        "dqp.linsolve.linsolver_table",
        "dqp.diagnose.diagnose",
    ):
        assert expected in names, f"{expected} not found among the public objects"


@pytest.mark.parametrize("modname", PUBLIC_MODULES)
def test_public_callables_have_docstrings(modname):
    mod = importlib.import_module(modname)
    missing = [] if (mod.__doc__ or "").strip() else [f"module {modname}"]
    for name, obj in _public_objects(modname):
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for member, value in _own_members(obj):
                if not (value.__doc__ or "").strip():
                    missing.append(f"{name}.{member}")
    assert not missing, "public objects without a docstring:\n  " + "\n  ".join(missing)


def test_options_table_is_generated_from_the_settings():
    """The options page holds the marker, not a hand-copied table; the hook fills it from OPTIONS."""
    from dqp.settings import OPTIONS, options_table

    page = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    assert "<!-- options-table -->" in page
    assert "| `eps_active` |" not in page  # not copied by hand
    table = options_table()
    for name in OPTIONS:
        assert f"| `{name}` |" in table


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip("mkdocs / mkdocstrings[python] not installed: pip install -e '.[docs]' to build the docs")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # mkdocs must run in the repository root (mkdocs.yml's relative paths), but the checkout must not
    # shadow the installed dqp (dqp.solvers comes from solvers/): drop the working directory from sys.path
    launcher = (
        "import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; from mkdocs.__main__ import cli; cli()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", launcher, "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    options_html = (site / "options" / "index.html").read_text(encoding="utf-8")
    assert "eps_active" in options_html and "<!-- options-table -->" not in options_html
    assert "qdldl" in options_html and "clarabel" in options_html  # solver tables filled in
    assert "eps_active·max(|d_i|, |C_i||z|)" in options_html  # a '|' inside a description does not split the cell
    theory = (site / "theory" / "index.html").read_text(encoding="utf-8")
    for question in (
        "Does dqp use a neural network to solve QPs?",
        "Does dqp solve the QP by solving its KKT conditions?",
        "Why differentiate the KKT conditions",
        "Why take gradients with respect to P, q, C, d, A, b",
    ):
        assert question in theory
    api = (site / "api" / "layer" / "index.html").read_text(encoding="utf-8")
    assert "build_settings" in api and "Validate options" in api  # rendered from the docstring
    solvers_api = (site / "api" / "solvers" / "index.html").read_text(encoding="utf-8")
    assert "solver_table" in solvers_api  # dqp.solvers lives in solvers/: the hook's mirror found it
    assert ":class:" not in api


def _load_hooks(results=None):
    """A fresh instance of the docs hooks module (nothing shared with other tests), reading its
    results from ``results`` when given."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("dqp_docs_hooks", REPO / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if results is not None:
        mod.RESULTS = results
    return mod


def test_benchmarks_page_without_results(tmp_path):
    hooks = _load_hooks(tmp_path / "missing")
    assert hooks._result_files() == []
    assert "No results yet" in hooks._benchmarks_section(files=None)


def test_benchmarks_page_with_results(tmp_path):
    """A study's section: the command from its report, its plot, its tables with headings demoted."""
    from mkdocs.structure.files import File, Files

    res = tmp_path / "results"
    res.mkdir()
    (res / "simplex_scaling.md").write_text(
        "# Simplex\n\n`python experiments/simplex_scaling.py --grid 10` on a test machine\n\n## Times\n\n"
        "| n | t |\n|---|---|\n| 10 | 1 ms |\n\nsee [data](simplex_scaling.csv) and [code](../simplex_scaling.py)\n"
    )
    (res / "simplex_scaling.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (res / "simplex_scaling.csv").write_text("a,b\n1,2\n3,4\n")
    hooks = _load_hooks(res)
    files = Files(
        [
            File(
                f"benchmarks/results/{p.name}",
                src_dir=str(tmp_path),
                dest_dir=str(tmp_path / "site"),
                use_directory_urls=True,
            )
            for p in sorted(res.iterdir())
        ]
    )
    page = hooks._benchmarks_section(files)
    section = page[page.index("## Projection onto the simplex") : page.index("## A bilevel loop")]
    assert "```bash\npython experiments/simplex_scaling.py --grid 10\n```" in section
    assert "![simplex_scaling](benchmarks/results/simplex_scaling.png)" in section
    assert "#### Times" in section and "# Simplex" not in section
    assert "| 10 | 1 ms |" in section
    assert "[data](benchmarks/results/simplex_scaling.csv)" in section
    assert "code (`../simplex_scaling.py`)" in section  # a link to a file the site lacks becomes text
    # the other studies have no results in this directory: each says so
    present = [s for s in hooks.STUDIES if (REPO / "experiments" / s["script"]).is_file()]
    assert page.count("No results yet") == len(present) - 1
    assert [line for line in page.splitlines() if line.startswith("## ")] == [f"## {s['title']}" for s in present]


def test_table_cells_with_pipes_are_escaped():
    hooks = _load_hooks()
    table = "| a | b | c |\n|---|---|---|\n| `x` | 1 | norm |d| and |q| |\n| `y` | 2 | plain |"
    fixed = hooks._escape_cells(table).splitlines()
    assert fixed[2] == "| `x` | 1 | norm \\|d\\| and \\|q\\| |"
    assert fixed[3] == "| `y` | 2 | plain |"
    assert fixed[:2] == ["| a | b | c |", "|---|---|---|"]


def test_readme_options_table_matches_the_settings():
    """README.md carries a copy of the generated table (GitHub shows no hook output): it must be current.
    Regenerate it with ``dQP.options_table()`` after changing dqp.settings.OPTIONS."""
    from dqp.settings import options_table

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert options_table() in readme


def _python_blocks(path: Path):
    """The ```python code blocks of a markdown file, in order."""
    import re

    text = path.read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_code_runs_as_written(tmp_path):
    """The README's python blocks, run in order in one fresh interpreter, as a new user would paste them."""
    blocks = _python_blocks(REPO / "README.md")
    assert len(blocks) >= 2, "the README has a quickstart"
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensor(" in out.stdout  # the quickstart prints the solution and the gradients


def test_readme_results_table_matches_the_benchmarks_page():
    """The README quotes the benchmarks page's summary, generated from experiments/results/."""
    hooks = _load_hooks()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = hooks.results_summary()
    assert table.count("\n") >= 2, "the results files of the batched-QP study are present"
    assert table in readme, "README's results table is stale: run python docs/hooks.py"


def test_tutorial_code_runs_as_written(tmp_path):
    """docs/tutorial.md's python blocks, in order, in one fresh interpreter (they assert their own results)."""
    blocks = _python_blocks(REPO / "docs" / "tutorial.md")
    assert len(blocks) >= 6
    script = tmp_path / "tutorial.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rows sum to one: True" in out.stdout and "same losses: True" in out.stdout


def _api_directives():
    """``(target, members or None)`` for every ``::: target`` block of docs/api/*.md."""
    import re

    out = []
    for page in sorted((REPO / "docs" / "api").glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("::: "):
                continue
            members = None
            for opt in lines[i + 1 :]:
                if opt and not opt.startswith(" "):
                    break
                if opt.strip() == "members:":
                    members = []
                elif members is not None and re.match(r"^\s+- \w+", opt):
                    members.append(opt.strip()[2:])
            out.append((line[4:].strip(), members))
    return out


def _resolve(target: str):
    """The object a ``::: a.b.c`` directive renders (None when it is not importable as written)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


#: Modules whose every public name the API reference must render.
API_MODULES = ["dqp", "dqp.dQP", "dqp.qpth", "dqp.solvers", "dqp.linsolve", "dqp.io", "dqp.diagnose"]


@pytest.mark.parametrize("modname", API_MODULES)
def test_api_reference_covers_every_public_name(modname):
    """Each public object is rendered by a ``:::`` directive: itself (under any public path), or its
    module without a member filter, or its module with it in the ``members`` list."""
    directives = _api_directives()
    missing = []
    for qualname, obj in _public_objects(modname):
        name = qualname.rsplit(".", 1)[1]
        paths = {qualname, f"{getattr(obj, '__module__', '')}.{name}"}
        covered = any(
            target in paths
            or _resolve(target) is obj
            or (target in (modname, obj.__module__) and (members is None or name in members))
            for target, members in directives
        )
        if not covered:
            missing.append(qualname)
    assert not missing, "public names missing from docs/api/*.md:\n  " + "\n  ".join(missing)


def test_install_hints_use_the_distribution_name():
    """The index's `dqp` is another project: every install hint names `dqp-torch` (the import stays `dqp`)."""
    import re

    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    name = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
    assert name == "dqp-torch"
    wrong = re.compile(r"pip install\s+(?:-U\s+)?[\"']?dqp(?:\[|[\"']?\s|[\"']?$)")
    offenders = []
    for folder in ("dqp", "solvers", "linsolve", "docs", "examples", "experiments"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.is_file():
                for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if wrong.search(line):
                        offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if wrong.search(line):
            offenders.append(f"README.md: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_theory_page_answers_the_users_questions_first():
    """The questions new users ask are headings of their own, before the mathematics."""
    text = (REPO / "docs" / "theory.md").read_text(encoding="utf-8")
    questions = [
        "### Does dqp use a neural network to solve QPs?",
        "### Is the point of a QP layer to solve QPs faster than Gurobi?",
        "### Does dqp solve the QP by solving its KKT conditions?",
        "### Why differentiate the KKT conditions, and what are the variables there?",
        "### Why take gradients with respect to P, q, C, d, A, b when they look like fixed data?",
    ]
    positions = [text.index(q) for q in questions]
    assert max(positions) < text.index("## The KKT conditions") < text.index("## The adjoint system")
    assert "| quadratic term | \\(Q\\) | `Q` | `P` |" in text  # OptNet's and qpth's names mapped to dqp's
    assert "\\[" in text and "\\begin{bmatrix}" in text  # typeset, not Unicode in code blocks
