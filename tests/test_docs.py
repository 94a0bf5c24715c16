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
PUBLIC_MODULES = ["dqp", "dqp.dQP", "dqp.settings", "dqp.result", "dqp.errors", "dqp.layer", "dqp.qpth",
                  "dqp.ipm_layer", "dqp.solvers", "dqp.linsolve", "dqp.io", "dqp.diagnose",
                  "dqp.layer_compat", "dqp.sparse_helper", "dqp.lin_solvers", "dqp.qp_diagnostic", "dqp.benchmark"]
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
    for expected in ("dqp.dQP.build_settings", "dqp.dQP.dQP_layer", "dqp.dQP.Settings", "dqp.QPOutput",
                     "dqp.SolveInfo", "dqp.DQPError", "dqp.qpth.QPFunction", "dqp.ipm_layer.solve_qp_batch",
                     "dqp.io.load_problem", "dqp.solvers.solver_table", "dqp.linsolve.linsolver_table",
                     "dqp.diagnose.diagnose"):
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
    launcher = "import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; from mkdocs.__main__ import cli; cli()"
    proc = subprocess.run([sys.executable, "-c", launcher, "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    options_html = (site / "options" / "index.html").read_text(encoding="utf-8")
    assert "eps_active" in options_html and "<!-- options-table -->" not in options_html
    assert "qdldl" in options_html and "clarabel" in options_html  # solver tables filled in
    assert "eps_active·(1+|d_i|)" in options_html  # a '|' inside a description does not split the cell
    theory = (site / "theory" / "index.html").read_text(encoding="utf-8")
    for question in ("Does dqp use a neural network to solve QPs?", "How is the forward pass solved?",
                     "Why differentiate the KKT conditions", "Why take gradients with respect to P, q, C, d, A, b"):
        assert question in theory
    api = (site / "api" / "layer" / "index.html").read_text(encoding="utf-8")
    assert "build_settings" in api and "Validate options" in api  # rendered from the docstring
    solvers_api = (site / "api" / "solvers" / "index.html").read_text(encoding="utf-8")
    assert "solver_table" in solvers_api  # dqp.solvers lives in solvers/: the hook's mirror found it
    assert ":class:" not in api


def _load_hooks():
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("dqp_docs_hooks", REPO / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_page_without_results(tmp_path, monkeypatch):
    hooks = _load_hooks()
    monkeypatch.setattr(hooks, "RESULTS", tmp_path / "missing")
    assert hooks._result_files() == []
    assert "No results yet" in hooks._benchmarks_section(files=None)


def test_benchmarks_page_with_results(tmp_path, monkeypatch):
    from mkdocs.structure.files import File, Files

    hooks = _load_hooks()
    res = tmp_path / "results"
    res.mkdir()
    (res / "study.md").write_text("# Study\n\n![plot](study.png) see [data](study.csv) and [code](../study.py)\n")
    (res / "study.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (res / "study.csv").write_text("a,b\n1,2\n3,4\n")
    monkeypatch.setattr(hooks, "RESULTS", res)
    files = Files([File(f"benchmarks/results/{p.name}", src_dir=str(tmp_path), dest_dir=str(tmp_path / "site"),
                        use_directory_urls=True) for p in sorted(res.iterdir())])
    section = hooks._benchmarks_section(files)
    assert "![study](benchmarks/results/study.png)" in section
    assert "[study.csv](benchmarks/results/study.csv) (2 rows)" in section
    assert '??? abstract "Report: study.md"' in section
    assert "    **Study**" in section
    # links inside the inlined report point at the copied files; a link to a missing file becomes text
    assert "[data](benchmarks/results/study.csv)" in section
    assert "code (`../study.py`)" in section


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
