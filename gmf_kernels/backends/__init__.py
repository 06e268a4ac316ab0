"""Backend registry and dispatch (docs/architecture.md).

Backends: cuda, triton, torch, reference. `select_backend` returns, for
`backend=None`/"auto", the one the tuning table measured fastest for the problem, else the
first that can run it in the declared order (`DECLARED_ORDER`: per kind of call, as data), or
checks an explicitly named one and raises ValueError with its reasons when it cannot.
Fused backends load lazily: importing gmf_kernels never imports Triton or a
compiled extension.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Dict, Iterator, List, Optional, Tuple

import warnings

from ..tuning import arch_key, backend_times
from .base import Backend, FallbackWarning, FusedBackend, GMAProblem

#: name -> module that defines `BACKEND` (the registry's order; "auto" takes `DECLARED_ORDER`'s).
_BACKEND_MODULES = {
    "cuda": "gmf_kernels.backends.cuda_backend",
    "triton": "gmf_kernels.backends.triton_backend",
    "torch": "gmf_kernels.backends.torch_backend",
    "reference": "gmf_kernels.backends.reference_backend",
}
BACKEND_NAMES = tuple(_BACKEND_MODULES)
AUTO = ("auto", None)

#: "auto"'s order where the tuning table has no measurement for the call, by kind of call (False: eval without
#: gradients; True: training mode or gradients). It follows the one GPU measurement so far (H200, 2026-12-04,
#: benchmarks/results/gpu_report_h200_20261204/): inference, triton before cuda (GroupMixFormer-S bf16 batch 256:
#: 46.8 against 64.1 ms a forward; the fused pre-projection at batch 128 1.5-2.1x faster at the 56x56, 28x28 and
#: 14x14 stages in bf16 and fp32; its kernels faster at every stage measured, batch 1 included, but the op slower
#: per eager call at 7x7 and at batch 1, where its host time (three Triton launches) exceeds the kernels':
#: 0.38 against 0.28 ms at 7x7, 0.36 against 0.18 ms at batch 1; CUDA graphs, `optimize_for_inference`'s small-
#: batch mode, remove that); training, cuda before triton (an AMP step at batch 128: 479 against 412 images/s).
DECLARED_ORDER: Dict[bool, Tuple[str, ...]] = {
    False: ("triton", "cuda", "torch", "reference"),
    True: ("cuda", "triton", "torch", "reference"),
}

_loaded: Dict[str, Backend] = {}


class _Unloadable(Backend):
    """Stands in for a backend whose Python module failed to import."""

    def __init__(self, name: str, error: BaseException):
        super().__init__(name=name)
        self._error = error

    def availability_reasons(self) -> List[str]:
        return [f"could not import {_BACKEND_MODULES[self.name]}: {type(self._error).__name__}: {self._error}"]


def get_backend(name: str) -> Backend:
    """The backend object for a name (raises ValueError for an unknown name)."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)} or 'auto'")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_BACKEND_MODULES[name]).BACKEND
        except ImportError as e:  # a backend's own dependency is missing
            _loaded[name] = _Unloadable(name, e)
    return _loaded[name]


def check_backend_name(name: Optional[str]) -> Optional[str]:
    if name in AUTO:
        return "auto"
    get_backend(name)
    return name


def check_backend_usable(name: Optional[str]) -> str:
    """`check_backend_name`, and for an explicitly named backend also that it can run on this
    machine at all (its `availability_reasons`: package installed, module built, device
    present): ValueError with those reasons now, not at the first forward. "auto" always
    passes (dispatch picks among what can run); whether a given input fits is still
    checked per call (`select_backend`)."""
    name = check_backend_name(name)
    if name != "auto":
        reasons = get_backend(name).availability_reasons()
        if reasons:
            raise ValueError(f"backend {name!r} cannot run on this machine:\n  - " + "\n  - ".join(reasons)
                             + "\n(use backend='auto' to take the best backend that can; "
                             "`python -m gmf_kernels.info` lists every backend's availability)")
    return name


def available_backends() -> List[str]:
    """Backends that can run on this machine at all (some may still refuse a given input)."""
    return [n for n in BACKEND_NAMES if not get_backend(n).availability_reasons()]


def unavailable_backends() -> Dict[str, List[str]]:
    return {n: r for n in BACKEND_NAMES if (r := get_backend(n).availability_reasons())}


#: the lists of the `record_choices` blocks open now: each takes every choice `select_backend` makes
_RECORDERS: List[List[Tuple[int, str, bool, str]]] = []


@contextlib.contextmanager
def record_choices() -> Iterator[List[Tuple[int, str, bool, str]]]:
    """Which backend each GMA call chooses while the block runs: a list of (C, dtype, training or
    gradients, backend name), one entry per choice. A layer's choice is made at its call in eager
    mode, and once per trace under torch.compile (at trace time, `functional.dispatch`): a compiled
    model's first call records its layers, a call that reuses the compiled graph none.
    benchmarks/throughput.py records each row's (``gma_backends``): which backend ``auto`` took."""
    chosen: List[Tuple[int, str, bool, str]] = []
    _RECORDERS.append(chosen)
    try:
        yield chosen
    finally:
        _RECORDERS.remove(chosen)


def select_backend(problem: GMAProblem, backend: Optional[str] = None) -> Backend:
    """`_select_backend`, the choice also told to the open `record_choices` blocks."""
    chosen = _select_backend(problem, backend)
    for rec in _RECORDERS:
        rec.append((problem.dim, str(problem.dtype).replace("torch.", ""), problem.training or problem.needs_grad,
                    chosen.name))
    return chosen


def _select_backend(problem: GMAProblem, backend: Optional[str] = None) -> Backend:
    """Pick the backend for a problem; never a silent fallback from an explicit choice.

    "auto": among the backends that can run the problem, the one measured fastest for this GPU
    architecture, width and dtype in the tuning table (`gmf_kernels.tuning.backend_times`,
    written by benchmarks/tune.py on a GPU): for a training call (train mode or gradients) its
    training-step times, for any other the pre-projection's; without a measurement of that kind,
    the first in the declared order of that kind of call (`DECLARED_ORDER`): a forward's times do not
    rank backwards."""
    name = check_backend_name(backend)
    if name != "auto":
        chosen = get_backend(name)
        reasons = chosen.not_supported_reasons(GMAProblem(**{**problem.__dict__, "explicit": True}))
        if reasons:
            raise ValueError(f"backend {name!r} cannot run this input ({problem.describe()}):\n  - "
                             + "\n  - ".join(reasons))
        return chosen
    times = _times(problem)
    viable: List[Backend] = []
    all_reasons = {}
    for n in DECLARED_ORDER[_training(problem)]:
        b = get_backend(n)
        reasons = b.not_supported_reasons(problem)
        if reasons:
            all_reasons[n] = reasons
            continue
        if not times:
            return _told(problem, b, all_reasons)  # declared order: the first that can run it
        viable.append(b)
    if viable:
        measured = [b for b in viable if b.name in times]
        return _told(problem, min(measured, key=lambda b: times[b.name]) if measured else viable[0], all_reasons)
    lines = [f"{n}: " + "; ".join(r) for n, r in all_reasons.items()]
    raise NotImplementedError(f"no backend can run this input ({problem.describe()}):\n  "
                              + "\n  ".join(lines))


#: the fallbacks `_told` has warned of (their reasons): each once per process
_FALLBACKS_TOLD: set = set()


def _told(problem: GMAProblem, chosen: Backend, refused: Dict[str, List[str]]) -> Backend:
    """`chosen`, after warning (`FallbackWarning`, once per process for each distinct set of reasons) when "auto"
    takes a non-fused backend for a GPU problem that a fused backend refused: a user on a GPU should not get
    PyTorch-op speed without a word. The message names the first such call and each refusing fused backend's
    reasons (e.g. the architecture not yet in gpu_verified.json, the CUDA module not built, a width the kernels
    do not take); the layers of a model that share the reasons share the one warning."""
    if problem.device_type != "cuda" or isinstance(chosen, FusedBackend):
        return chosen
    fused = {n: r for n, r in refused.items() if isinstance(get_backend(n), FusedBackend)}
    why = " | ".join(f"{n}: " + "; ".join(r) for n, r in fused.items())
    if why and why not in _FALLBACKS_TOLD:
        _FALLBACKS_TOLD.add(why)
        warnings.warn(f"gmf_kernels: backend='auto' runs GroupMixAttention ({problem.describe()}) on the "
                      f"{chosen.name!r} backend, not a fused one. {why} (name a backend to run it anyway; "
                      f"gmf_kernels.backends.explain(problem) lists every backend's reasons)", FallbackWarning,
                      stacklevel=4)
    return chosen


def explain(problem: GMAProblem) -> Dict[str, List[str]]:
    """Why `auto` would or would not take each backend for this problem: name -> reasons
    ([] = can run it); the measured times of the tuning table that rank them, when any, under "tuned"
    (what was timed under "tuned_on": the pre-projection, or for a training call one layer's training step)."""
    out = {n: get_backend(n).not_supported_reasons(problem) for n in BACKEND_NAMES}
    times = _times(problem)
    if times:
        out["tuned"] = [f"{k}: {v:g}" for k, v in sorted(times.items(), key=lambda kv: kv[1])]
        out["tuned_on"] = ["training step" if _training(problem) else "pre-projection"]
    return out


def _training(problem: GMAProblem) -> bool:
    return bool(problem.training or problem.needs_grad)


def _times(problem: GMAProblem) -> Dict[str, float]:
    """The tuning table's times that rank backends for this problem (`select_backend`)."""
    return backend_times(arch_key(problem.device_capability), problem.dim, problem.dtype, training=_training(problem))


__all__ = ["Backend", "FallbackWarning", "GMAProblem", "BACKEND_NAMES", "DECLARED_ORDER", "get_backend",
           "available_backends", "explain", "unavailable_backends", "select_backend", "check_backend_name",
           "check_backend_usable"]
