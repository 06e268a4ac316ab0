"""How every Triton launch of the package goes: `wrap_triton` (torch's wrapper only while a trace runs)
and `device_guard` (under the input's CUDA device). A leaf module: the launchers (launcher.py, statistics.py,
recompute.py, the backward modules) import it, it imports none of them.

Tests that record or redirect launches patch this module's `wrap_triton` (and `_torch_wrap_triton`); the
launchers look it up here at each launch."""
from __future__ import annotations

import contextlib

import torch

from .._tracing import trace_running
from ._common import interpreting

Tensor = torch.Tensor

try:
    from torch.library import wrap_triton as _torch_wrap_triton
except ImportError:  # torch < 2.6: plain launches (op.py registers a custom_op then)
    _torch_wrap_triton = None


def wrap_triton(kernel):
    """``kernel`` to launch as ``wrap_triton(kernel)[grid](*args, **kwargs)``: through
    ``torch.library.wrap_triton`` while a trace is running (`_tracing`), so that torch.compile
    sees the kernel; a direct launch on real tensors. The kernel itself under the interpreter
    (its ``InterpretedFunction`` cannot be traced, and torch <= 2.11 refuses it: "wrap_triton
    only works on functions annotated with triton.jit", where 2.13 passes it through) and on
    torch < 2.6.

    Why not torch's wrapper always: outside a ``triton_op`` (whose eager body torch runs with
    wrapping off) torch's wrapper launches through its higher-order op, which, for every call
    that passes ``num_warps``, builds a one-config Autotuner and files it, with the constant
    arguments, in a global side table that is never cleared: ~1.5 KB of host memory and ~0.1 ms
    of host time per launch. The statistics, recompute and backward kernels run inside plain
    ``custom_op`` bodies (real tensors only: each op has its own fake) and eagerly on the
    SyncBatchNorm path: ~300 launches per GroupMixFormer-S training step."""
    if _torch_wrap_triton is None or interpreting():
        return kernel
    return _GridLaunch(kernel)


def _tracing(args, kwargs) -> bool:
    """Is a trace running over this launch (`_tracing.trace_running`: Dynamo, a dispatch mode, a tensor
    subclass; a plain Parameter is plain)?"""
    return trace_running((*args, *kwargs.values()))


class _GridLaunch:
    """``_GridLaunch(kernel)[grid](*args, **kwargs)``: see `wrap_triton`."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if _tracing(args, kwargs):
                return _torch_wrap_triton(self.kernel)[grid](*args, **kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def device_guard(t: Tensor):
    """Launch under t's CUDA device (Triton launches on the current device, not the tensor's)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
