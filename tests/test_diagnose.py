"""The solver diagnostic (dqp.diagnose): library function, ranking logic and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import random_qp
from dqp import diagnose as dg
from dqp.errors import NonFiniteError, SettingsError, ShapeError
from dqp.io import QPProblem, save_problem
from dqp.solvers import registered_solvers

MM_DIR = Path(__file__).resolve().parent / "data" / "maros_meszaros"  # a small subset shipped with the tests

FAST = dict(repeat=1, progress=False)


def _problem(n=5, m=8, p=2, seed=3):
    P, q, C, d, A, b, z0, mu0, lam0 = random_qp(n, m, p, seed=seed)
    return P, q, C, d, A, b, z0


def _reference_grad(P, C, d, A, z0, w):
    """∇(wᵀz) w.r.t. (q, d, b) from the reduced KKT system on the known active set (independent of dqp)."""
    P, C, d, A, z0 = (x.numpy() for x in (P, C, d, A, z0))
    J = np.flatnonzero(np.abs(C @ z0 - d) < 1e-9)
    G = np.vstack([A, C[J]])
    n, k = P.shape[0], G.shape[0]
    K = np.block([[P, G.T], [G, np.zeros((k, k))]])
    y = np.linalg.solve(K, np.concatenate([w, np.zeros(k)]))
    gq = -y[:n]
    gb = y[n : n + A.shape[0]]
    gd = np.zeros(C.shape[0])
    gd[J] = y[n + A.shape[0] :]
    return np.concatenate([gq, gd, gb])


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
def test_diagnose_random_problem(dense):
    P, q, C, d, A, b, z0 = _problem()
    if not dense:
        P, C, A = (sp.csc_matrix(M.numpy()) for M in (P, C, A))
    report = dg.diagnose(
        P,
        q,
        C,
        d,
        A,
        b,
        solvers=["clarabel", "daqp", "dqp_ipm"],
        lin_solvers=["scipy_lu", "qdldl", "torch"],
        seed=7,
        **FAST,
    )
    assert report.input_sparse == (not dense)
    combos = {(r.qp_solver, r.lin_solver, r.solve_type) for r in report.results}
    st = "dense" if dense else "sparse"
    assert combos == {
        ("clarabel", "scipy_lu", st),
        ("clarabel", "qdldl", st),
        ("daqp", "scipy_lu", st),
        ("daqp", "qdldl", st),
        ("dqp_ipm", "torch", "dense"),
    }
    assert all(r.correct for r in report.results), report.to_markdown()
    assert report.consensus_size == 5
    # ranked: fastest first among the correct ones
    totals = [r.t_total for r in report.results]
    assert totals == sorted(totals)
    assert report.recommended is report.results[0]
    # the solution and the gradient of wᵀz agree with an independent KKT computation
    w = np.random.default_rng(7).standard_normal(5)
    ref = _reference_grad(*(torch.as_tensor(x.toarray()) if sp.issparse(x) else x for x in (P, C, d, A)), z0, w)
    for r in report.results:
        np.testing.assert_allclose(r.z, z0.numpy(), atol=1e-8)
        np.testing.assert_allclose(r.grad, ref, rtol=1e-7, atol=1e-9)
        assert r.rel_residual < 1e-9
        assert r.t_forward > 0 and r.t_backward > 0
    element_wise = [r for r in report.results if r.qp_solver != "dqp_ipm"]
    assert all(r.verified is True and r.kkt_path == "direct" for r in element_wise)
    # random_qp's duals are >= 0.5 on active rows and slacks >= 0.5 on the others
    assert all(r.complementarity_margin >= 0.5 - 1e-8 for r in element_wise)
    assert all(r.n_weakly_active == 0 for r in element_wise)
    md = report.to_markdown()
    assert "| rank | qp_solver | lin_solver |" in md
    assert f"qp_solver={report.recommended.qp_solver!r}" in md
    assert len(report.to_records()) == 5


def test_diagnose_infeasible_problem_records_typed_failures():
    # z1 <= -1 and -z1 <= -1 (z1 >= 1): no feasible point
    P = torch.eye(2, dtype=torch.float64)
    q = torch.zeros(2, dtype=torch.float64)
    C = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    report = dg.diagnose(P, q, C, d, solvers=["clarabel", "dqp_ipm"], lin_solvers=["scipy_lu", "torch"], **FAST)
    assert report.recommended is None
    assert len(report.failed) == 2
    for r in report.results:
        assert r.error_class == "InfeasibleError" and r.typed_error
        assert r.status == "PRIMAL_INFEASIBLE"
        assert not r.correct
    assert "No combination solved" in report.recommendation()
    assert "InfeasibleError" in report.to_markdown()


def _fake(qp, grad, t, residual=0.0, verified=True):
    r = dg.ComboResult(
        qp,
        "scipy_lu",
        "dense",
        status="SOLVED",
        t_forward=t,
        t_backward=t,
        primal_residual=residual,
        dual_residual=0.0,
        complementarity=0.0,
        verified=verified,
    )
    r.grad = np.asarray(grad, float)
    r.z = np.ones(2)
    return r


def test_score_flags_disagreement_residuals_and_verification():
    prob = QPProblem("toy", sp.eye(2, format="csc"), np.zeros(2), sp.csc_matrix((0, 2)), np.zeros(0))
    good = [_fake(f"s{i}", [1.0, 2.0], 0.01 * (i + 1)) for i in range(3)]
    wrong = _fake("wrong", [1.0, 2.1], 0.001)
    loose = _fake("loose", [1.0, 2.0], 0.001, residual=1e-3)
    unverified = _fake("unverified", [1.0, 2.0], 0.001, verified=False)
    results = good + [wrong, loose, unverified]
    size = dg._score(results, prob, tol=1e-6, grad_tol=1e-5)
    assert size == 4  # loose and unverified are left out of the consensus
    assert all(r.correct for r in good)
    assert not wrong.correct and any("gradient differs" in s for s in wrong.notes)
    assert wrong.grad_rel_diff == pytest.approx(0.05)
    assert not loose.correct and any("KKT residual" in s for s in loose.notes)
    assert not unverified.correct and "active set not verified" in unverified.notes
    assert [r.code for r in results] == ["ok"] * 3 + ["disagrees", "inexact", "unverified"]


def test_diagnose_skips_uninstalled_and_dense_only(monkeypatch):
    P, q, C, d, A, b, _ = _problem(n=3, m=4, p=1)
    missing = [n for n, c in registered_solvers().items() if not c.is_available()]
    monkeypatch.setattr(dg, "DENSE_LIMIT", 2)
    Ps, Cs, As = (sp.csc_matrix(M.numpy()) for M in (P, C, A))
    report = dg.diagnose(
        Ps, q, Cs, d, As, b, solvers=["clarabel", "dqp_ipm"] + missing[:1], lin_solvers=["qdldl", "torch"], **FAST
    )
    assert [(r.qp_solver, r.lin_solver) for r in report.results] == [("clarabel", "qdldl")]
    reasons = {qp: why for qp, _, why in report.skipped}
    assert "DENSE_LIMIT" not in reasons["dqp_ipm"] and "n = 3 > 2" in reasons["dqp_ipm"]
    if missing:
        assert "not installed" in reasons[missing[0]] and "pip install" in reasons[missing[0]]
    # dense=True runs the IPM anyway
    report = dg.diagnose(Ps, q, Cs, d, As, b, solvers=["dqp_ipm"], lin_solvers=["torch"], dense=True, **FAST)
    assert [r.qp_solver for r in report.results] == ["dqp_ipm"] and report.results[0].correct


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(repeat=0), "repeat must be a positive integer"),
        (dict(repeat=True), "repeat must be a positive integer"),
        (dict(options={"qp_solver": "osqp"}), "options may not set qp_solver"),
        (dict(options={"eps_abs": 2.0}), "eps_abs"),
        (dict(solvers=["no_such_solver"]), "not a known solver"),
        (dict(solvers=["clarabel"], lin_solvers=["torch"]), "No solver combination to run"),
        (dict(solvers=["dqp_ipm"], lin_solvers=["qdldl"]), "differentiates with lin_solver='torch'"),
        (dict(device="not-a-device"), "is not a torch device"),
        pytest.param(
            dict(device="cuda"),
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_diagnose_settings_errors(kwargs, match):
    P, q, C, d, A, b, _ = _problem(n=3, m=4, p=1)
    with pytest.raises(SettingsError, match=match):
        dg.diagnose(P, q, C, d, A, b, **{**FAST, **kwargs})


def test_diagnose_input_errors():
    P, q, C, d, A, b, _ = _problem(n=3, m=4, p=1)
    with pytest.raises(ShapeError, match="diagnose takes one problem: q must have shape"):
        dg.diagnose(P, q.expand(2, 3), C, d, **FAST)
    with pytest.raises(ShapeError, match="C and d come together"):
        dg.diagnose(P, q, C, None, **FAST)
    with pytest.raises(ShapeError, match="A and b come together"):
        dg.diagnose(P, q, A=None, b=b, **FAST)
    with pytest.raises(ShapeError, match="matrices must be 2-D"):
        dg.diagnose(P.numpy()[None], q, **FAST)
    with pytest.raises(ShapeError, match="matrices must be 2-D"):
        dg.diagnose(torch.ones(2, 3, 3, dtype=torch.float64).to_sparse(), q, **FAST)
    bad = q.clone()
    bad[0] = float("nan")
    with pytest.raises(NonFiniteError):
        dg.diagnose(P, bad, C, d, **FAST)


def test_progress_falls_back_to_logging(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    P, q, C, d, A, b, _ = _problem(n=3, m=4, p=1)
    with caplog.at_level("INFO", logger="dqp.diagnose"):
        dg.diagnose(P, q, C, d, A, b, solvers=["clarabel"], lin_solvers=["scipy_lu", "qdldl"], repeat=1, progress=True)
    msgs = [r.getMessage() for r in caplog.records if r.name == "dqp.diagnose"]
    assert msgs == [
        "diagnose [1/2] qp_solver=clarabel lin_solver=scipy_lu (dense)",
        "diagnose [2/2] qp_solver=clarabel lin_solver=qdldl (dense)",
    ]


def test_plot_and_missing_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib (bench extra) not installed")
    P, q, C, d, A, b, _ = _problem(n=3, m=4, p=1)
    report = dg.diagnose(P, q, C, d, A, b, solvers=["clarabel"], lin_solvers=["scipy_lu"], **FAST)
    out = report.plot(tmp_path / "sub" / "diag.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _cli(*args, cwd, timeout=240):
    # run outside the checkout: `python -m` puts the working directory first on sys.path, and the
    # checkout's dqp/ lacks dqp.solvers (installed from solvers/) in a non-editable install
    return subprocess.run(
        [sys.executable, "-m", "dqp.diagnose", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def _check_ranked_table(stdout, name):
    lines = stdout.splitlines()
    assert lines[0] == f"# dqp solver diagnosis: {name}"
    rows = [l for l in lines if l.startswith("| ") and l.split("|")[1].strip().isdigit()]
    assert [int(l.split("|")[1]) for l in rows] == [1, 2, 3, 4]
    assert {tuple(c.strip() for c in l.split("|")[2:4]) for l in rows} == {
        ("clarabel", "qdldl"),
        ("clarabel", "scipy_lu"),
        ("osqp", "qdldl"),
        ("osqp", "scipy_lu"),
    }
    assert all(l.split("|")[5].strip() == "ok" for l in rows)
    assert "**Recommendation.** Use `qp_solver=" in stdout


def _mm(name):
    path = MM_DIR / f"{name}.mat"
    assert path.is_file(), f"{path} is part of the repository's test data"
    return path


def test_cli_maros_meszaros_subprocess(tmp_path):
    path = _mm("HS21")
    pytest.importorskip("matplotlib", reason="matplotlib (bench extra) not installed")
    out = tmp_path / "plot.png"
    proc = _cli(
        path,
        "--solvers",
        "clarabel",
        "osqp",
        "--lin-solvers",
        "qdldl,scipy_lu",
        "--repeat",
        "1",
        "--no-progress",
        "--out",
        out,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    _check_ranked_table(proc.stdout, "HS21")
    assert out.is_file() and out.stat().st_size > 1000


def test_main_maros_meszaros_with_equalities(capsys):
    path = _mm("HS51")  # 3 equalities, no inequalities
    assert (
        dg.main(
            [
                str(path),
                "--solvers",
                "clarabel,osqp",
                "--lin-solvers",
                "qdldl",
                "scipy_lu",
                "--repeat",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    _check_ranked_table(capsys.readouterr().out, "HS51")


def test_console_script_npz(tmp_path):
    P, q, C, d, A, b, _ = _problem(n=4, m=5, p=1)
    prob = QPProblem(
        "rand",
        sp.csc_matrix(P.numpy()),
        q.numpy(),
        sp.csc_matrix(C.numpy()),
        d.numpy(),
        sp.csc_matrix(A.numpy()),
        b.numpy(),
    )
    path = save_problem(tmp_path / "rand.npz", prob)
    script = Path(sys.executable).parent / "dqp-diagnose"  # the console script of pyproject.toml
    if not script.is_file():
        pytest.skip(f"console script {script} not installed (pip install -e . creates it)")
    proc = subprocess.run(
        [
            str(script),
            str(path),
            "--solvers",
            "clarabel",
            "--lin-solvers",
            "qdldl",
            "--dense",
            "--repeat",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| 1 | clarabel | qdldl | dense | ok |" in proc.stdout
    assert "median of 2 run(s)" in proc.stdout


def test_main_list_and_errors(tmp_path, capsys):
    assert dg.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "| `clarabel` |" in out and "| `qdldl` |" in out
    assert dg.main([str(tmp_path / "missing.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "InputError" in err and "does not exist" in err
    assert dg.main([]) == 2
    assert "a problem file is required" in capsys.readouterr().err


def test_main_in_process(tmp_path, monkeypatch, capsys):
    P, q, C, d, A, b, _ = _problem(n=3, m=4, p=0)
    prob = QPProblem("p", sp.csc_matrix(P.numpy()), q.numpy(), sp.csc_matrix(C.numpy()), d.numpy())
    path = save_problem(tmp_path / "p.npz", prob)
    assert dg.main([str(path), "--solvers", "nope", "--no-progress"]) == 2
    assert "SettingsError" in capsys.readouterr().err
    # infeasible -> no correct combination -> exit status 1
    bad = QPProblem(
        "bad",
        sp.eye(2, format="csc"),
        np.zeros(2),
        sp.csc_matrix(np.array([[1.0, 0], [-1.0, 0]])),
        np.array([-1.0, -1.0]),
    )
    bad_path = save_problem(tmp_path / "bad.npz", bad)
    assert (
        dg.main([str(bad_path), "--solvers", "clarabel", "--lin-solvers", "qdldl", "--repeat", "1", "--no-progress"])
        == 1
    )
    assert "No combination solved" in capsys.readouterr().out
    # --out without matplotlib: a clear error, exit status 2
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert (
        dg.main(
            [
                str(path),
                "--solvers",
                "clarabel",
                "--lin-solvers",
                "qdldl",
                "--repeat",
                "1",
                "--no-progress",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "pip install matplotlib" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_diagnose_on_cuda():
    P, q, C, d, A, b, z0 = _problem()
    report = dg.diagnose(
        P, q, C, d, A, b, solvers=["clarabel", "dqp_ipm"], lin_solvers=["scipy_lu", "torch"], device="cuda", **FAST
    )
    assert report.device.startswith("cuda")
    assert {(r.qp_solver, r.lin_solver) for r in report.results} == {("clarabel", "scipy_lu"), ("dqp_ipm", "torch")}
    assert all(r.correct for r in report.results), report.to_markdown()
    for r in report.results:
        np.testing.assert_allclose(r.z, z0.numpy(), atol=1e-8)


def test_markdown_one_row_per_pair_and_each_message_once():
    prob = QPProblem("toy", sp.eye(2, format="csc"), np.zeros(2), sp.csc_matrix((0, 2)), np.zeros(0))
    rows = [_fake(f"s{i}", [1.0, 2.0], 0.01 * (i + 1)) for i in range(3)]
    long_warning = "SingularKKTWarning: " + "the reduced KKT matrix is singular " * 30
    for r in rows:
        r.notes.append(long_warning)
    failed = dg.ComboResult(
        "bad",
        "qdldl",
        "sparse",
        error_class="InfeasibleError",
        error_message="element 0: primal infeasible",
        status="PRIMAL_INFEASIBLE",
    )
    dg._score(rows + [failed], prob, tol=1e-6, grad_tol=1e-5)
    report = dg.DiagnosisReport("toy", 2, 0, 0, 2, True, rows + [failed], [], 1, 1e-6, 1e-5, 0, 3)
    md = report.to_markdown(message_chars=200)
    table = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(table) == 4
    assert [line.split("|")[5].strip() for line in table] == ["ok", "ok", "ok", "infeasible"]
    assert [line.split("|")[-2].strip() for line in table] == ["[1]", "[1]", "[1]", "[2]"]
    assert md.count("SingularKKTWarning") == 1 and md.count("primal infeasible") == 1
    assert "[1] SingularKKTWarning: the reduced" in md and "…" in md  # shortened below the table, once
    assert max(len(line) for line in table) < 160
    assert "`infeasible` the solver reports the problem infeasible" in md


def test_input_kind_inferred_from_the_data():
    small = dg.diagnose_file(_mm("HS21"), solvers=["clarabel"], lin_solvers=["qdldl"], **FAST)
    assert not small.input_sparse and "inferred from the data" in small.input_reason
    assert {r.solve_type for r in small.results} == {"dense"}
    big = dg.diagnose_file(_mm("GOULDQP3"), solvers=["osqp"], lin_solvers=["qdldl"], **FAST)
    assert big.input_sparse and {r.solve_type for r in big.results} == {"sparse"}
    forced = dg.diagnose_file(_mm("HS21"), solvers=["clarabel"], lin_solvers=["qdldl"], dense=False, **FAST)
    assert forced.input_sparse and forced.input_reason == "as given"


def test_main_json_and_csv(capsys):
    import csv
    import io
    import json

    args = [str(_mm("HS21")), "--solvers", "clarabel,osqp", "--lin-solvers", "qdldl", "--repeat", "1", "--no-progress"]
    assert dg.main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["problem"] == "HS21" and data["recommended"]["lin_solver"] == "qdldl"
    assert [r["code"] for r in data["results"]] == ["ok", "ok"]
    assert dg.main(args + ["--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["qp_solver"] for r in rows} == {"clarabel", "osqp"} and rows[0]["rank"] == "1"
    with pytest.raises(SystemExit):
        dg.main(args + ["--json", "--csv"])  # one output format at a time


def test_help_shows_defaults_and_stdout_has_only_the_report(tmp_path):
    help_text = " ".join(dg.build_parser().format_help().split())  # wrapped lines joined
    for default in ("(default: 3)", "(default: 1e-06)", "(default: 1e-05)", "(default: 0)", "(default: cpu)"):
        assert default in help_text
    pytest.importorskip("highspy")
    proc = _cli(
        _mm("HS21"),
        "--solvers",
        "highs",
        "--lin-solvers",
        "qdldl",
        "--repeat",
        "1",
        "--no-progress",
        "--csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("rank,qp_solver,lin_solver")
    assert "HiGHS" not in proc.stdout  # the solver's banner went to stderr
