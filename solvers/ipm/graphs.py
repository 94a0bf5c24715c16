"""CUDA-graph machinery of the batched IPM: the captured iterations and their cache, the tail
compaction and check schedule, whole functions as cached graphs (:func:`graphed_call`), and their
CPU emulation (:attr:`IPMOptions.graphs`)."""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from dqp.linsolve.cholesky import CholeskyFactor
from dqp.solvers.ipm.options import DEFAULT_OPTIONS, IPMOptions

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


#: Setup graphs (their keys) whose dual-form test failed in a call that had deferred it (see
#: ``_init_graphed``'s ``defer_ok``): later calls with that key test before going on.
_SETUP_DEFER_FAILED: set = set()


def _clone_value(v):
    """A copy of a tensor or a :class:`CholeskyFactor` on freshly allocated (dense) tensors."""
    cl = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
    return v.map(cl) if isinstance(v, CholeskyFactor) else cl(v)


def _value_tensors(v) -> list:
    """The tensors of a tensor or a :class:`CholeskyFactor`."""
    return list(v.tensors().values()) if isinstance(v, CholeskyFactor) else [v]


def _copy_value(dst, src) -> None:
    """Copy ``src`` into ``dst`` (tensors or factors of the same structure)."""
    for a, b in zip(_value_tensors(dst), _value_tensors(src)):
        a.copy_(b)


class _GraphData:
    """The tensors one interior-point iteration reads besides its state: the (row-scaled) data
    and the Newton solver. A CUDA graph is captured on a private copy (:meth:`static`) that
    later calls with the same shapes refill (:meth:`refill`), so the graph is captured once."""

    _DATA = ("P", "q", "C", "d", "A", "b")
    # Newton-solver tensors computed before the loop and only read inside it
    _NEWTON = {"dual": ("LP", "Abar", "PiAbt", "M", "Md", "_Piq", "_g"), "primal": ("reg_p",)}

    def __init__(self, P, q, C, d, A, b, newton, norms: Optional[Dict[str, Optional[Tensor]]] = None):
        self.P, self.q, self.C, self.d, self.A, self.b, self.newton = P, q, C, d, A, b, newton
        # per-instance norms of the data that the convergence check reads (None where absent)
        self.norms: Dict[str, Optional[Tensor]] = dict(norms or {})

    def _newton_inputs(self):
        """Newton tensors read inside the loop, less those that are data tensors themselves."""
        nt = self.newton
        data = [getattr(self, k) for k in self._DATA]
        # (the float64 dual form uses the identities of set_point: no solve with P in the loop)
        skip = ("LP",) if nt.form == "dual" and getattr(nt, "_point", None) is not None else ()
        return [
            (k, getattr(nt, k))
            for k in self._NEWTON[nt.form]
            if k not in skip
            and isinstance(getattr(nt, k, None), (Tensor, CholeskyFactor))
            and not any(getattr(nt, k) is t for t in data)
        ]

    def signature(self) -> tuple:
        """Shapes (and so code paths) of every tensor the iteration reads."""
        sh = lambda t: None if t is None else tuple(t.shape)
        return (
            tuple(sh(getattr(self, k)) for k in self._DATA),
            tuple((k, tuple(tuple(x.shape) for x in _value_tensors(t))) for k, t in self._newton_inputs()),
            tuple((k, sh(t)) for k, t in sorted(self.norms.items())),
        )

    def nbytes(self) -> int:
        """Device memory a :meth:`static` copy takes."""
        ts = (
            [getattr(self, k) for k in self._DATA]
            + [x for _, t in self._newton_inputs() for x in _value_tensors(t)]
            + list(self.norms.values())
        )
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def static(self) -> "_GraphData":
        """A copy on freshly allocated tensors (materialized: expanded views become dense)."""
        cl = lambda t: None if t is None else t.clone(memory_format=torch.contiguous_format)
        nt = copy.copy(self.newton)
        st = _GraphData(*(cl(getattr(self, k)) for k in self._DATA), nt, {k: cl(t) for k, t in self.norms.items()})
        for k, t in self._newton_inputs():
            setattr(nt, k, _clone_value(t))
        for k in self._NEWTON[nt.form] + ("P", "C", "A"):  # aliases of the data
            for dk in self._DATA:
                if getattr(self, dk) is not None and getattr(self.newton, k, None) is getattr(self, dk):
                    setattr(nt, k, getattr(st, dk))
        if nt.form == "dual":
            nt._a = nt._pending = None
            if getattr(nt, "_point", None) is not None:
                nt._point = (st.q,)
                nt.LP = None  # not read in the loop; do not keep it alive
        return st

    # per-instance tensors (B, ·) whatever their rank; the matrices are batched when 3-D
    _VECTORS = ("q", "d", "b", "Md", "_Piq", "_g", "reg_p")

    def subset(self, idx: Tensor) -> "_GraphData":
        """The data of the batch rows ``idx`` (with a Newton solver for them), for tail compaction."""

        def pick(name, t):
            if isinstance(t, CholeskyFactor):
                return t.index(idx) if t.dim() == 3 else t
            if not isinstance(t, Tensor):
                return t
            if name in self._VECTORS:
                return t[idx] if t.dim() >= 1 else t
            return t[idx] if t.dim() == 3 else t

        nt = copy.copy(self.newton)
        nt.B = int(idx.numel())
        for k in self._NEWTON[nt.form] + ("P", "C", "A"):
            if hasattr(nt, k):
                setattr(nt, k, pick(k, getattr(nt, k)))
        sub = _GraphData(
            *(pick(k, getattr(self, k)) for k in self._DATA), nt, {k: pick("q", t) for k, t in self.norms.items()}
        )
        for k in self._NEWTON[nt.form] + ("P", "C", "A"):  # keep aliases of the data aliases
            for dk in self._DATA:
                if getattr(self, dk) is not None and getattr(self.newton, k, None) is getattr(self, dk):
                    setattr(nt, k, getattr(sub, dk))
        nt._const = nt._Sbuf = None
        if nt.form == "dual":
            nt._a = nt._pending = None
            if getattr(self.newton, "_point", None) is not None:
                nt._point = (sub.q,)
        return sub

    def refill(self, src: "_GraphData") -> None:
        """Copy the values of ``src`` (same signature) into these tensors."""
        for k in self._DATA:
            t = getattr(self, k)
            if t is not None:
                t.copy_(getattr(src, k))
        for k, t in src._newton_inputs():
            _copy_value(getattr(self.newton, k), t)
        for k, t in src.norms.items():
            if t is not None:
                self.norms[k].copy_(t)


def graph_device_ok(device: torch.device, options: IPMOptions = DEFAULT_OPTIONS) -> bool:
    """Whether iterations on ``device`` run as (captured or, :attr:`IPMOptions.graphs`, emulated) graphs."""
    return options.graphs == "emulate" or (device.type == "cuda" and torch.cuda.is_available())


def _compact_size(nleft: int, Bc: int, k: int, options: IPMOptions = DEFAULT_OPTIONS) -> Optional[int]:
    """Batch size to compact to (``None``: stay) with ``nleft`` of ``Bc`` instances running: the
    tail compaction of the captured iterations (:attr:`IPMOptions.compact`), padded with finished
    instances to a power of two, at least 8, so that a training loop meets few batch sizes and
    their graphs stay cached."""
    if not options.compact or nleft > options.compact_fraction * Bc or Bc * k * k < options.compact_min_work:
        return None
    bucket = max(8, 1 << max(nleft - 1, 0).bit_length())
    return bucket if bucket < Bc else None


def _scatter_state(full: Dict[str, Tensor], gidx: Tensor, S: Dict[str, Tensor]) -> None:
    """Write the per-instance entries of the compacted state ``S`` into ``full`` at rows ``gidx``."""
    for k, v in full.items():
        v[gidx] = S[k]


# captured iterations, keyed by shapes/dtype/device/form/options (LRU); see _graph_for. The
# cached static copies of the data (P, C, the Newton factors) live on the device as long as their
# entry: entries are also evicted to keep their total below IPMOptions.graph_cache_max_bytes, and
# a problem larger than it is captured per call without caching (GPU-bound; launches matter little)
_GRAPH_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_graph_stats = {"captures": 0, "hits": 0, "compactions": 0, "replays": 0}


def graph_stats() -> Dict[str, Any]:
    """Counters of the graph machinery since the process started (captures, cache hits, tail
    compactions, iteration replays) and the cached graphs' names (``"iterations"``, and the
    ``graphed_call`` keys' first entries): for diagnostics and tests."""
    return dict(_graph_stats, iteration_graphs=len(_GRAPH_CACHE), function_graphs=[k[0] for k in _FN_GRAPHS])


def clear_graph_cache() -> None:
    """Drop the cached CUDA graphs of :func:`ipm_solve` and :func:`graphed_call` (frees their memory pools)."""
    _GRAPH_CACHE.clear()
    _FN_GRAPHS.clear()
    _SETUP_DEFER_FAILED.clear()


def _graph_for(key, live, make_body, state, options: IPMOptions = DEFAULT_OPTIONS):
    """The CUDA graph of ``make_body(data)`` (a function of the state dict) for ``live``'s data:
    from the cache (inputs and state copied into its static buffers) or freshly captured.
    ``(graph, static_state)`` or ``(None, None)`` when the capture fails. ``key=None``: capture
    without caching."""
    with torch.no_grad():
        return _graph_for_impl(key, live, make_body, state, options)


def _graph_for_impl(key, live, make_body, state, options: IPMOptions):
    if key is not None and live.nbytes() > options.graph_cache_max_bytes:
        key = None
    ent = _GRAPH_CACHE.get(key) if key is not None else None
    if ent is not None:
        graph, st, sdata = ent
        _GRAPH_CACHE.move_to_end(key)
        sdata.refill(live)
        for k, t in state.items():
            st[k].copy_(t)
        _graph_stats["hits"] += 1
        return graph, st
    sdata = live.static() if key is not None else live
    if options.graphs == "emulate":
        graph = _EmulatedGraph(make_body(sdata), state, options.split_graphs)
        st = graph.st
    else:
        graph, st = _capture(make_body(sdata), state, options.split_graphs)
    if graph is not None:
        _graph_stats["captures"] += 1
        if key is not None:
            _GRAPH_CACHE[key] = (graph, st, sdata)
            while len(_GRAPH_CACHE) > max(int(options.graph_cache_size), 0) or (
                len(_GRAPH_CACHE) > 1
                and sum(e[2].nbytes() for e in _GRAPH_CACHE.values()) > options.graph_cache_max_bytes
            ):
                _GRAPH_CACHE.popitem(last=False)
    return graph, st


class _GraphChain:
    """Graphs replayed in sequence as one (``parts``: (graph, repeats) pairs)."""

    def __init__(self, parts):
        self.parts = parts

    def replay(self, steps: Optional[int] = None) -> None:
        """Replay the parts; ``steps``: repeat the first part (an IPM step) that often instead."""
        for i, (g, reps) in enumerate(self.parts):
            for _ in range(steps if (i == 0 and steps is not None) else reps):
                g.replay()


class _CheckSchedule:
    """The iterations at which the IPM checks convergence: ``next``. Adaptive (:attr:`IPMOptions.tail_checks`):
    once at most ``tail_fraction`` of the batch is still running, the next checks come after 1, 1,
    2, 4, … steps (at most ``check_every``), so that the last instances do not step up to
    ``check_every − 1`` times past their convergence while holding up the batch. On qpth's generator
    (B=128, n=m=100) the slowest elements converge after 13 steps: 13 steps and checks at 4, 8, 12,
    13 instead of 16 steps (H100, forward+backward: 17.7 vs 19.5 ms)."""

    def __init__(self, check_every: int, batch: int, adaptive: bool, tail_fraction: float = 0.1):
        self.tail_fraction = tail_fraction
        self.ce, self.batch = check_every, batch
        self.adaptive = adaptive and check_every > 1
        self.next = check_every
        self.tail = 0

    def checked(self, it: int, nleft: int) -> None:
        """Record a check at iteration ``it`` with ``nleft`` instances still running."""
        steps = self.ce
        if self.adaptive and nleft <= self.tail_fraction * self.batch:
            steps = min(self.ce, 1 << max(self.tail - 1, 0))
            self.tail += 1
        self.next = it + steps


def _write_back(st: Dict[str, Tensor], out: Dict[str, Tensor]) -> None:
    """Copy the entries of ``out`` into the buffers of ``st`` (those that are new tensors)."""
    for k, buf in st.items():
        if out[k] is not buf:
            buf.copy_(out[k])


def _run_parts(parts, st: Dict[str, Tensor]) -> None:
    """Run ``parts`` ((function, repeats) pairs) as their graphs will: each call reads the buffers of
    ``st`` and writes its result back into them. The capture's warm-up: it initializes library
    handles and workspaces, and calls each function (compiled with ``torch.compile`` under
    ``compile=True``) on inputs laid out as in the capture: a function that saw other strides in the
    warm-up would be compiled again while capturing, which invalidates the capture."""
    for fn, reps in parts:
        for _ in range(reps):
            _write_back(st, fn(st))


def _capture(body, state, split: bool = True):
    """Capture ``state ← body(state)`` (dicts of tensors) as a CUDA graph; ``(graph, static_state)``.
    With ``body.parts`` ((function, repeats) pairs that make up body) and ``split``
    (:attr:`IPMOptions.split_graphs`): one graph per part, sharing a memory pool, as a
    :class:`_GraphChain` (the host launches later steps while the device runs the first)."""
    try:
        with torch.no_grad():
            parts = (getattr(body, "parts", None) if split else None) or ((body, 1),)
            st = {k: t.clone() for k, t in state.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _run_parts(parts, {k: t.clone() for k, t in state.items()})  # warm-up
            torch.cuda.current_stream().wait_stream(side)
            graphs = []
            for fn, reps in parts:
                # each part writes its result into the static state: a part's graph reads only st and
                # the static data, so the parts can share one pool (they run one after the other)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=graphs[0][0].pool() if graphs else None):
                    _write_back(st, fn(st))
                graphs.append((g, reps))
        return (graphs[0][0] if len(graphs) == 1 else _GraphChain(graphs)), st
    except Exception as exc:  # pragma: no cover - depends on the CUDA/torch build
        logger.warning("ipm_solve: CUDA graph capture failed (%s: %s); running eagerly", type(exc).__name__, exc)
        return None, None


# --------------------------------------------------------------------------------------------
# whole functions as cached CUDA graphs (the layer's polish and backward for small batches)
# --------------------------------------------------------------------------------------------


def _flatten(d: Dict[str, Any]) -> Tuple[Dict[str, Tensor], tuple]:
    """The tensors of ``d``, a :class:`CholeskyFactor`'s as entries of their own (``key@name``), and
    the factors' structure (their keys and options) for :func:`_unflatten`."""
    out: Dict[str, Tensor] = {}
    spec = []
    for k, v in d.items():
        if isinstance(v, CholeskyFactor):
            out.update({f"{k}@{name}": t for name, t in v.tensors().items()})
            spec.append((k, v.options))
        elif isinstance(v, Tensor):
            out[k] = v
    return out, tuple(spec)


def _unflatten(flat: Dict[str, Tensor], spec: tuple) -> Dict[str, Any]:
    """Inverse of :func:`_flatten`."""
    out: Dict[str, Any] = {k: v for k, v in flat.items() if "@" not in k}
    for k, opts in spec:
        pre = k + "@"
        out[k] = CholeskyFactor.from_tensors({n[len(pre) :]: t for n, t in flat.items() if n.startswith(pre)}, opts)
    return out


# whole functions replayed as cached CUDA graphs (graphed_call), LRU
_FN_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()


def _fn_graph_budget(device: torch.device, options: IPMOptions) -> int:
    """Device memory the graphs of :func:`graphed_call` may hold (their static inputs and outputs,
    counted ×3 for the intermediates in their pools): :attr:`IPMOptions.fn_graph_max_bytes`, else a
    tenth of the device's memory. A call whose graph would not fit runs eagerly; older graphs are
    evicted to make room."""
    if options.fn_graph_max_bytes is not None:
        return int(options.fn_graph_max_bytes)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 10
    return 2 * 1024**3


def _nbytes(d: Dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in d.values())


class _EmulatedGraph:
    """A captured iteration's stand-in (:attr:`IPMOptions.graphs` ``"emulate"``): a replay runs the
    body eagerly on the static buffers (under no_grad, as the capture does) and writes the result
    back into them, as the captured graphs do."""

    def __init__(self, body, state: Dict[str, Tensor], split: bool = True):
        self.body, self.split = body, split
        self.st = {k: t.clone() for k, t in state.items()}
        self.replays = 0

    def replay(self, steps: Optional[int] = None) -> None:
        """As :meth:`_GraphChain.replay`: ``steps`` repeats the body's first part."""
        self.replays += 1
        parts = (getattr(self.body, "parts", None) if self.split else None) or ((self.body, 1),)
        if steps is not None:
            parts = ((parts[0][0], steps),) + tuple(parts[1:])
        with torch.no_grad():
            _run_parts(parts, self.st)


class _EmulatedFnGraph:
    """:func:`graphed_call`'s capture emulated (:attr:`IPMOptions.graphs` ``"emulate"``): a replay
    runs ``fn`` on the static inputs and copies its outputs into static output buffers."""

    def __init__(self, fn, static_in: Dict[str, Tensor], spec_in: tuple):
        self.fn, self.static_in, self.spec_in = fn, static_in, spec_in
        out, self.spec_out = self._run()
        self.out = {k: v.clone() for k, v in out.items()}

    def _run(self):
        with torch.no_grad():
            return _flatten(self.fn(_unflatten(self.static_in, self.spec_in)))

    def replay(self) -> None:
        for k, v in self._run()[0].items():
            self.out[k].copy_(v)


def _capture_fn(fn, static_in: Dict[str, Tensor], spec_in: tuple):
    """Capture ``fn(static_in)`` (a dict of tensors → dict of tensors); ``(graph, static_out, spec_out)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(_unflatten({k: v.clone() for k, v in static_in.items()}, spec_in))  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, spec_out = _flatten(fn(_unflatten(static_in, spec_in)))
    return graph, out, spec_out


def on_data_device(fn):
    """Run ``fn`` with the CUDA device of its first CUDA tensor argument (positional, or a value of a
    dict argument) as the current device: the streams, events, pinned buffers and graph captures
    made inside take the current device, so the data on ``cuda:r`` never touch ``cuda:0``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            for t in a.values() if isinstance(a, dict) else (a,):
                if isinstance(t, Tensor) and t.device.type == "cuda":
                    with torch.cuda.device(t.device):
                        return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


@on_data_device
def graphed_call(
    key: tuple,
    fn,
    inputs: Dict[str, Any],
    fresh: Optional[Callable[[str], bool]] = None,
    options: IPMOptions = DEFAULT_OPTIONS,
) -> Optional[Dict[str, Any]]:
    """``fn(inputs)`` replayed from a cached CUDA graph: the inputs are copied into the graph's
    static buffers and the outputs are returned as fresh tensors (factors included).

    ``fresh``: only the outputs whose (flattened) name it accepts are copied; the others are the
    graph's static buffers themselves, for a caller that has queued all its reads of them before it
    returns (the next replay, on the same stream, comes after those reads).

    ``fn`` takes and returns dicts of tensors and :class:`CholeskyFactor` values and must not
    synchronize with the host or branch on tensor values; the key must determine everything else
    it depends on (shapes, dtypes, options). Returns None when the graph cannot be captured (the
    caller runs ``fn`` eagerly).
    """
    flat, spec = _flatten(inputs)
    dev = next(iter(flat.values())).device
    # besides the caller's key: the shapes, the options the code reads while capturing, and the
    # thread and stream (static buffers are reused by ordered calls only)
    key = (
        key
        + tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in sorted(flat.items()))
        + (
            spec,
            options,
            threading.get_ident(),
            torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0,
        )
    )
    ent = _FN_GRAPHS.get(key)
    with torch.no_grad():
        if ent is None:
            budget = _fn_graph_budget(dev, options)
            if 3 * _nbytes(flat) > budget:
                return None
            while (
                _FN_GRAPHS
                and 3 * (_nbytes(flat) + sum(_nbytes(e[1]) + _nbytes(e[2]) for e in _FN_GRAPHS.values())) > budget
            ):
                _FN_GRAPHS.popitem(last=False)
            static_in = {k: v.clone(memory_format=torch.contiguous_format) for k, v in flat.items()}
            try:
                if options.graphs == "emulate":
                    graph = _EmulatedFnGraph(fn, static_in, spec)
                    static_out, spec_out = graph.out, graph.spec_out
                else:
                    graph, static_out, spec_out = _capture_fn(fn, static_in, spec)
            except Exception as exc:  # pragma: no cover - depends on the CUDA/torch build
                logger.warning(
                    "graphed_call: CUDA graph capture failed (%s: %s); running eagerly", type(exc).__name__, exc
                )
                return None
            _graph_stats["captures"] += 1
            _FN_GRAPHS[key] = ent = (graph, static_in, static_out, spec_out)
            while len(_FN_GRAPHS) > options.fn_graph_cache_size:
                _FN_GRAPHS.popitem(last=False)
        else:
            _FN_GRAPHS.move_to_end(key)
            _graph_stats["hits"] += 1
        graph, static_in, static_out, spec_out = ent
        for k, v in flat.items():
            static_in[k].copy_(v)
        graph.replay()
        return _unflatten({k: v.clone() if fresh is None or fresh(k) else v for k, v in static_out.items()}, spec_out)
