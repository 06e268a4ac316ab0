"""Backend registry and dispatch (DESIGN.md §2).

Backends in priority order: cuda, triton, torch, reference. `select_backend`
returns the first that can run a problem (`backend=None`/"auto"), or checks an
explicitly named one and raises ValueError with its reasons when it cannot.
Fused backends load lazily: importing gmf_kernels never imports Triton or a
compiled extension.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional

from .base import Backend, GMAProblem

#: name -> module that defines `BACKEND`, in priority order for "auto".
_BACKEND_MODULES = {
    "cuda": "gmf_kernels.backends.cuda_backend",
    "triton": "gmf_kernels.backends.triton_backend",
    "torch": "gmf_kernels.backends.torch_backend",
    "reference": "gmf_kernels.backends.reference_backend",
}
BACKEND_NAMES = tuple(_BACKEND_MODULES)
AUTO = ("auto", None)

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


def available_backends() -> List[str]:
    """Backends that can run on this machine at all (some may still refuse a given input)."""
    return [n for n in BACKEND_NAMES if not get_backend(n).availability_reasons()]


def unavailable_backends() -> Dict[str, List[str]]:
    return {n: r for n in BACKEND_NAMES if (r := get_backend(n).availability_reasons())}


def select_backend(problem: GMAProblem, backend: Optional[str] = None) -> Backend:
    """Pick the backend for a problem; never a silent fallback from an explicit choice."""
    name = check_backend_name(backend)
    if name != "auto":
        chosen = get_backend(name)
        reasons = chosen.not_supported_reasons(GMAProblem(**{**problem.__dict__, "explicit": True}))
        if reasons:
            raise ValueError(f"backend {name!r} cannot run this input ({problem.describe()}):\n  - "
                             + "\n  - ".join(reasons))
        return chosen
    all_reasons = {}
    for n in BACKEND_NAMES:
        b = get_backend(n)
        reasons = b.not_supported_reasons(problem)
        if not reasons:
            return b
        all_reasons[n] = reasons
    lines = [f"{n}: " + "; ".join(r) for n, r in all_reasons.items()]
    raise NotImplementedError(f"no backend can run this input ({problem.describe()}):\n  "
                              + "\n  ".join(lines))


__all__ = ["Backend", "GMAProblem", "BACKEND_NAMES", "get_backend", "available_backends",
           "unavailable_backends", "select_backend", "check_backend_name"]
