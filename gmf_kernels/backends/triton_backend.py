"""Backend "triton": support as data, and its pre-projection = the ``gmf::triton_pre_projection`` op.

    qkv = F.linear(x, Wqkv, bqkv)                                   Backend.forward (base.py)
    pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, folded, scale, ln_eps)
              op + autograd:  gmf_kernels/triton_kernels/op.py
              launcher:       gmf_kernels/triton_kernels/launcher.py
              kernels:        gmf_kernels/triton_kernels/aggregation.py, attention.py
    out = F.linear(pre, Wproj, bproj)

Triton is imported only when this backend first runs: importing this module never
fails without Triton; `availability_reasons()` says why instead.

Devices: "cuda"; "cpu" only through the Triton interpreter (TRITON_INTERPRET=1) and
only when the caller names this backend explicitly: "auto" must never pick the
interpreter, which is orders of magnitude slower than the torch backend.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import List

import torch

from .base import FusedBackend, GMAProblem


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def _triton_import_error() -> str:
    # find_spec, not import: importing triton fixes TRITON_INTERPRET for the whole process,
    # and a mere availability query (info, available_backends) must not do that
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; pip install triton"
    return ""


class TritonBackend(FusedBackend):
    def availability_reasons(self) -> List[str]:
        err = _triton_import_error()
        return [err] if err else []

    def not_supported_reasons(self, p: GMAProblem) -> List[str]:
        reasons = super().not_supported_reasons(p)
        if p.device_type == "cpu":
            if not _interpreting():
                reasons.append("device cpu needs the Triton interpreter (set TRITON_INTERPRET=1 "
                               "before importing triton); use the torch backend on CPU")
            elif not p.explicit:
                reasons.append("device cpu runs only through the (slow) Triton interpreter: "
                               "never chosen automatically, name backend='triton' to use it")
        elif p.device_type == "cuda" and _interpreting():
            reasons.append("TRITON_INTERPRET=1 is set: Triton kernels run in the CPU interpreter, "
                           "not on the GPU")
        if p.dim % 10 != 0:
            reasons.append(f"C={p.dim}: the kernels need C a multiple of 10 (heads of d = C'/8)")
        return reasons

    def op(self):
        from ..triton_kernels import op  # noqa: F401  (lazy: Triton loads on first use; registers the op)
        return torch.ops.gmf.triton_pre_projection


BACKEND = TritonBackend(
    name="triton",
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    device_types=frozenset({"cuda", "cpu"}),
    supports_training=False,
    supports_grad=False,
    verified_on_gpu=False,  # parity so far only through the interpreter + AOT compiles: README "Verification status"
    emulated_on_cpu=True,   # the Triton interpreter
)
