"""Values that torch.compile takes as constants: decided once, eagerly, at trace time.

The layers choose a backend (`functional.dispatch`) and the CUDA backend chooses its training
kernels (`cuda/train_op.py`) from plain values: device queries, probes of installed packages
and built modules, the environment. Dynamo cannot trace those (each was a graph break, and
torch 2.11 stops at ``importlib.util.find_spec``), so the functions making such a choice are
marked `constant_under_compile`: Dynamo runs them as Python at trace time and keeps the
result in the graph; its guards on the inputs re-trace, and so choose again, when the inputs
change.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def constant_under_compile(fn):
    """`torch.compiler.assume_constant_result(fn)` without importing torch._dynamo when this
    module is imported (that import costs seconds for every user): the decorator does nothing
    but set this attribute, which Dynamo reads when it traces a call of fn
    (tests/test_whole_model_compile.py checks both that and the traced graphs). fn takes and
    returns plain values (no tensors)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile  # a device query, not a graph node, under torch.compile
def cuda_capability(index: int) -> Optional[Tuple[int, int]]:
    """(major, minor) of CUDA device `index`; None without a driver."""
    try:
        return tuple(torch.cuda.get_device_capability(index))
    except (RuntimeError, AssertionError):  # pragma: no cover - no driver
        return None


#: the infra dispatch modes a trace pushes (fake, proxy, functional tensors), looked up once
_TRACE_MODE_KEYS = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL")
                         if hasattr(torch._C._TorchDispatchModeKey, k))

#: tensor types taken as plain: a plain tensor and a plain nn.Parameter (a Parameter of a tensor subclass
#: has the subclass's type). The folded weights pass some parameters through unchanged (the LayerNorm's,
#: fp32): until 2026-12-05 a Parameter counted as a subclass, so every training step sent each layer's
#: local-branch backward launch through torch's wrapper: ~0.5 ms of host time per launch here, and two
#: entries of torch's global kernel side table per launch, never freed
#: (tests/test_triton_compile.py::test_training_launches_are_direct).
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

#: the argument types of a launch that are never a tensor subclass: the plain tensor types and the scalars
_PLAIN_ARG_TYPES = frozenset(PLAIN_TENSOR_TYPES + (int, float, bool, str, type(None)))


def trace_running(values: Iterable) -> bool:
    """Is a trace running over a call with these values: Dynamo, a dispatch mode (make_fx's proxy, fake
    or functional tensors: torch.compile's AOT pass, torch.export), or a tensor subclass among them
    (not a plain Parameter: `PLAIN_TENSOR_TYPES`)?"""
    if torch.compiler.is_compiling():
        return True
    if _get_current_dispatch_mode() is not None:
        return True
    if any(torch._C._get_dispatch_mode(k) is not None for k in _TRACE_MODE_KEYS):
        return True
    # the argument types once each (a launch passes ~25 values of a few types): 1-2 us against ~4 us a launch
    # for a test of every value, on the ~480 launches of a GroupMixFormer-S training step
    return any(t not in _PLAIN_ARG_TYPES and issubclass(t, torch.Tensor) for t in set(map(type, values)))


def plain_eager(tensors: Iterable) -> bool:
    """Is a call on these tensors plain eager PyTorch, so that a library op's Python implementation may be
    called directly instead of through the dispatcher: no trace running (`trace_running`), no
    torch.jit.trace recording (it must record the op), no functorch transform (vmap, grad: they dispatch
    through the op). The caller makes sure no gradient is needed. Dynamo's check first: under torch.compile
    it is a constant, and nothing after it is traced."""
    if torch.compiler.is_compiling():
        return False
    if torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    return not trace_running(tensors)
