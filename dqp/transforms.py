"""What the QP layers support of PyTorch's program transforms, and typed errors for the rest.

* ``torch.compile``: the layers' forward is a graph break (:func:`graph_break`): the code around
  them compiles; the solve and its backward run eagerly.
* ``torch.func`` transforms (vmap, grad, jacrev, jacfwd, hessian): not supported (the forward calls
  solvers outside torch). :func:`reject_functorch` raises :class:`~dqp.errors.NotSupportedError`
  naming what to use instead.
* ``torch.autograd.Function.apply`` binds its arguments through ``inspect.signature(forward)`` on
  every call; :func:`fixed_signature` stores the signature once.
* Second derivatives (``create_graph=True`` through the layer): not supported. The backward solves
  with the forward's KKT factorization outside autograd, so its result would silently be a
  constant; :func:`first_order_only` raises instead.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable

import torch

from dqp.errors import NotSupportedError


def fixed_signature(cls: type) -> type:
    """Decorate a ``torch.autograd.Function``: store its ``forward``'s signature on the function.
    ``Function.apply`` binds its arguments through ``inspect.signature(forward)`` on every call, tens
    of microseconds on a small problem; a stored signature is returned as it is."""
    cls.forward.__signature__ = inspect.signature(cls.forward)
    return cls


def graph_break(fn: Callable) -> Callable:
    """``fn`` run eagerly by ``torch.compile`` (a graph break around the call, nothing inside traced)."""
    return torch.compiler.disable(fn)


def _wrapped(t: Any) -> bool:
    if isinstance(t, (list, tuple)):
        return any(_wrapped(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return False
    # torch.func's BatchedTensor (vmap) and its grad/jvp wrappers (grad, jacrev, jacfwd, hessian)
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def reject_functorch(tensors: Iterable[Any], where: str) -> None:
    """Raise :class:`NotSupportedError` when a ``torch.func`` transform reaches ``where``."""
    if any(_wrapped(t) for t in tensors):
        raise NotSupportedError(
            f"{where}: torch.func transforms (vmap, grad, jacrev, jacfwd, hessian) are not supported: the "
            f"forward runs a QP solver outside torch. Instead of vmap, pass the problems as a batch (a leading "
            f"dimension of P, q, C, d, A, b); for Jacobians use torch.autograd.functional.jacobian(f, x) "
            f"(vectorize=False), which runs one backward pass per output entry."
        )


def first_order_only(backward: Callable) -> Callable:
    """Decorate an ``autograd.Function.backward``: raise :class:`NotSupportedError` under
    ``create_graph=True`` (grad mode is on in the backward only then)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise NotSupportedError(
                "dqp: second derivatives through the QP layer are not supported (its backward was called with "
                "create_graph=True, e.g. for a gradient penalty, a Hessian-vector product or MAML). The "
                "backward solves with the forward's KKT factorization outside autograd, so the gradient it "
                "returns cannot be differentiated again. Compute the gradient without create_graph=True, or "
                "keep the layer out of the part of the model that is differentiated twice."
            )
        return backward(ctx, *grads)

    return wrapper
