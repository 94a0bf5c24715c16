"""The user's own example runs unchanged and prints the analytical values; examples run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED

SEED = SHARED / "seed_example.py"


def _arrays(text: str, label: str):
    m = re.search(re.escape(label) + r"\s*\[([^\]]*)\]", text)
    assert m, f"{label!r} not printed"
    return np.array([float(x) for x in m.group(1).split()])


@pytest.mark.skipif(not SEED.exists(), reason=f"{SEED} not found (CI has ../shared beside the clone)")
def test_seed_example_prints_analytical_values():
    out = subprocess.run([sys.executable, str(SEED)], capture_output=True, text=True, timeout=120, cwd=SHARED)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for ours, exact in [
        ("dQP z*:", "Analytical z*:"),
        ("dQP μ* :", "Analytical μ*:"),
        ("dQP ∇_P L:", "Analytical ∇_P L:"),
        ("dQP ∇_q L:", "Analytical ∇_q L:"),
        ("dQP ∇_C L:", "Analytical ∇_C L:"),
        ("dQP ∇_d L:", "Analytical ∇_d L:"),
    ]:
        np.testing.assert_allclose(_arrays(text, ours), _arrays(text, exact), atol=1e-6)


def test_quickstart_runs():
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DQP_EXAMPLES_SHORT": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "sparse z matches dense: True" in out.stdout
