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

from typing import Optional, Tuple

import torch


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
