"""OptNet-style classifier: a QP layer as the last layer of a network (Amos & Kolter, 2017).

The head solves, for each sample,

    z*(x) = argmin_z ½ zᵀQz + q(x)ᵀz   s.t.  Gz ≤ h,

with learnable Q = LLᵀ + εI, G, and h = G z0 + s0 (s0 > 0, so z0 is always strictly feasible),
and q(x) produced by a small network. z* are the class scores. The data are synthetic
(Gaussian clusters in 20 dimensions, 4 classes); the example trains for a few epochs and reports
train/test accuracy.

It uses the qpth-compatible API: only the import differs from qpth code.

Run ``python examples/optnet_classifier.py`` (about a minute on a laptop CPU) or with
``--short`` / ``DQP_EXAMPLES_SHORT=1`` (a few seconds, used in CI).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from dqp.qpth import QPFunction  # was: from qpth.qp import QPFunction


class OptNetHead(nn.Module):
    """Linear features → QP layer (n_classes variables, n_ineq inequalities)."""

    def __init__(self, n_features: int, n_classes: int, n_ineq: int, eps: float = 1e-4):
        super().__init__()
        self.fc = nn.Linear(n_features, n_classes)
        self.L = nn.Parameter(0.5 * torch.eye(n_classes) + 0.05 * torch.randn(n_classes, n_classes))
        self.G = nn.Parameter(torch.randn(n_ineq, n_classes) / n_classes**0.5)
        self.z0 = nn.Parameter(torch.zeros(n_classes))
        self.s0 = nn.Parameter(torch.ones(n_ineq))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.L.shape[0]
        Q = self.L @ self.L.T + self.eps * torch.eye(n, dtype=x.dtype)
        q = -self.fc(x)  # maximize the linear score, regularized
        h = self.G @ self.z0 + self.s0.abs() + 1e-3
        e = torch.Tensor()
        return QPFunction(verbose=-1)(Q, q, self.G, h, e, e)


def make_data(n: int, n_features: int, n_classes: int, generator: torch.Generator):
    centers = 1.5 * torch.randn(n_classes, n_features, generator=generator)
    y = torch.randint(0, n_classes, (n,), generator=generator)
    x = centers[y] + torch.randn(n, n_features, generator=generator)
    return x, y


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="tiny run for CI (also DQP_EXAMPLES_SHORT=1)")
    args = ap.parse_args(argv)
    short = args.short or os.environ.get("DQP_EXAMPLES_SHORT") == "1"

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_features, n_classes, n_ineq = 20, 4, 6
    n_train, n_test, epochs, batch = (256, 256, 4, 32) if short else (2000, 1000, 10, 50)
    x, y = make_data(n_train + n_test, n_features, n_classes, g)
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    model = OptNetHead(n_features, n_classes, n_ineq).double()
    xtr, xte = xtr.double(), xte.double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = nn.CrossEntropyLoss()

    def accuracy(xs, ys):
        with torch.no_grad():
            return (model(xs).argmax(-1) == ys).double().mean().item()

    acc0 = accuracy(xte, yte)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=g)
        total = 0.0
        for i in range(0, n_train, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / n_train:.4f}, test accuracy {accuracy(xte, yte):.3f}")
    acc = accuracy(xte, yte)
    print(
        f"OptNet head: test accuracy {acc0:.3f} -> {acc:.3f} "
        f"(train {accuracy(xtr, ytr):.3f}) in {time.perf_counter() - t0:.1f} s"
    )
    assert acc > max(0.8, acc0 + 0.2), f"the QP layer did not learn (accuracy {acc:.3f})"
    return acc


if __name__ == "__main__":
    main()
