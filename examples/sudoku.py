"""Learning to play 4×4 Sudoku with an OptNet layer (Amos & Kolter, 2017, §5.2).

A board is a one-hot tensor of shape (4, 4, 4) (row, column, digit), flattened to z ∈ R^64. The
layer solves

    z* = argmin_z ½·0.1‖z‖² − pᵀz   s.t.  Az = b,  z ≥ 0

where p is the one-hot puzzle (zeros for blanks). The constraint matrix A (40 × 64, the number of
independent Sudoku constraints) is *learned* from (puzzle, solution) pairs, starting from random
values; b = A·exp(log z0) keeps the problem feasible. Nothing else is given to the model: after
training, the layer has discovered the rules well enough to fill in unseen puzzles.

The data are generated here: random valid 4×4 grids (a base grid with digits relabelled and
rows/columns permuted within bands/stacks, bands/stacks permuted, optionally transposed) with
cells removed.

The layer is the qpth-compatible ``QPFunction``; OptNet's sudoku code runs after changing its
import only.

Run ``python examples/sudoku.py`` (a few minutes on a laptop CPU) or with ``--short`` /
``DQP_EXAMPLES_SHORT=1`` (fewer puzzles and epochs, seconds; used in CI).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
from torch import nn

from dqp.qpth import QPFunction  # was: from qpth.qp import QPFunction

N = 2  # box size; the board is N² × N²
D = N * N  # 4 digits
NX = D**3  # 64 variables


def sudoku_constraints() -> torch.Tensor:
    """The true equality constraints (cell, row, column, box: 'exactly one'), independent rows only."""
    rows = []
    idx = lambda r, c, v: (r * D + c) * D + v
    for r, c in itertools.product(range(D), range(D)):  # each cell holds one digit
        rows.append([idx(r, c, v) for v in range(D)])
    for r, v in itertools.product(range(D), range(D)):  # each digit once per row
        rows.append([idx(r, c, v) for c in range(D)])
    for c, v in itertools.product(range(D), range(D)):  # ... per column
        rows.append([idx(r, c, v) for r in range(D)])
    for br, bc, v in itertools.product(range(N), range(N), range(D)):  # ... per box
        rows.append([idx(br * N + i, bc * N + j, v) for i in range(N) for j in range(N)])
    A = torch.zeros(len(rows), NX, dtype=torch.float64)
    for k, cols in enumerate(rows):
        A[k, cols] = 1.0
    keep = []  # greedy independent subset
    for k in range(A.shape[0]):
        if torch.linalg.matrix_rank(A[keep + [k]]) > len(keep):
            keep.append(k)
    return A[keep]


def random_grid(g: torch.Generator) -> torch.Tensor:
    """A random valid D×D grid of digits 0..D−1."""
    base = torch.tensor([[(N * (r % N) + r // N + c) % D for c in range(D)] for r in range(D)])

    def perm_groups():
        groups = torch.randperm(N, generator=g)
        return torch.cat([grp * N + torch.randperm(N, generator=g) for grp in groups])

    grid = base[perm_groups()][:, perm_groups()]
    grid = torch.randperm(D, generator=g)[grid]  # relabel digits
    if torch.rand(1, generator=g).item() < 0.5:
        grid = grid.T
    return grid


def make_data(n: int, n_blank: int, g: torch.Generator):
    sols = torch.stack([random_grid(g) for _ in range(n)])  # (n, D, D)
    onehot = torch.nn.functional.one_hot(sols, D).double()  # (n, D, D, D)
    mask = torch.ones(n, D * D, dtype=torch.float64)
    for i in range(n):
        mask[i, torch.randperm(D * D, generator=g)[:n_blank]] = 0.0
    puzzles = onehot * mask.view(n, D, D, 1)
    return puzzles, onehot


class OptNetSudoku(nn.Module):
    """OptNet's equality-constrained model: A learned, Q = 0.1·I, G = −I, h = 0."""

    def __init__(self, n_eq: int, q_penalty: float = 0.1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.rand(n_eq, NX, generator=g, dtype=torch.float64))
        self.log_z0 = nn.Parameter(torch.zeros(NX, dtype=torch.float64))
        self.register_buffer("Q", q_penalty * torch.eye(NX, dtype=torch.float64))
        self.register_buffer("G", -torch.eye(NX, dtype=torch.float64))
        self.register_buffer("h", torch.zeros(NX, dtype=torch.float64))

    def forward(self, puzzles: torch.Tensor) -> torch.Tensor:
        p = -puzzles.reshape(puzzles.shape[0], -1)
        b = self.A @ self.log_z0.exp()
        z = QPFunction(verbose=-1)(self.Q, p, self.G, self.h, self.A, b)
        return z.view_as(puzzles)


def board_error(pred: torch.Tensor, sol: torch.Tensor) -> float:
    """Fraction of boards with at least one wrong cell (argmax over digits)."""
    return (pred.argmax(-1) != sol.argmax(-1)).flatten(1).any(-1).double().mean().item()


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="small run for CI (also DQP_EXAMPLES_SHORT=1)")
    args = ap.parse_args(argv)
    short = args.short or os.environ.get("DQP_EXAMPLES_SHORT") == "1"

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n_train, n_test, epochs, batch = (100, 50, 2, 25) if short else (2000, 500, 10, 50)
    puzzles, sols = make_data(n_train + n_test, n_blank=6, g=g)
    ptr, strn, pte, ste = puzzles[:n_train], sols[:n_train], puzzles[n_train:], sols[n_train:]
    A_true = sudoku_constraints()
    print(
        f"4x4 Sudoku: {n_train} training / {n_test} test puzzles; "
        f"learning A of shape {tuple(A_true.shape)} from random values"
    )

    model = OptNetSudoku(A_true.shape[0])
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    mse = nn.MSELoss()

    def evaluate():
        with torch.no_grad():
            pred = model(pte)
            return mse(pred, ste).item(), board_error(pred, ste)

    loss0, err0 = evaluate()
    print(f"before training: test loss {loss0:.4f}, test board error {err0:.3f}")
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=g)
        total = 0.0
        for i in range(0, n_train, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = mse(model(ptr[idx]), strn[idx])
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        if short:
            print(f"epoch {epoch + 1}/{epochs}: train loss {total / n_train:.4f}")
        else:
            tl, te = evaluate()
            print(
                f"epoch {epoch + 1}/{epochs}: train loss {total / n_train:.4f}, test loss {tl:.4f}, "
                f"test board error {te:.3f}"
            )
    loss1, err1 = evaluate()
    print(
        f"after {epochs} epochs ({time.perf_counter() - t0:.1f} s): test loss {loss0:.4f} -> {loss1:.4f}, "
        f"board error {err0:.3f} -> {err1:.3f}"
    )
    assert loss1 < 0.5 * loss0, "the OptNet layer did not learn the constraints"
    if not short:
        assert err1 < 0.1, f"test board error {err1:.3f} is not low"
    return err1


if __name__ == "__main__":
    main()
