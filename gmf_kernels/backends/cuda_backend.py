"""Backend "cuda": support as data, and its pre-projection = the ``gmf::cuda_pre_projection`` op.

    qkv = F.linear(x, W_qkv, b_qkv)                                  Backend.forward (base.py)
    pre = torch.ops.gmf.cuda_pre_projection(qkv, H, W, folded, scale, ln_eps)
              op + autograd:  gmf_kernels/cuda/op.py
              launcher:       gmf_kernels/cuda/launcher.py (checks: gmf_kernels/op_args.py)
              kernels:        csrc/ (gma_aggregate_kernel, gma_combine_kernel, gma_attention_kernel)
    out = F.linear(pre, W_proj, b_proj)

Importing this file needs neither a GPU nor the compiled module; `availability_reasons()`
says what is missing.
"""
from __future__ import annotations

from typing import List

import torch

from .base import FusedBackend

#: widest head the kernels take (csrc/gma_layout.h kMaxHeadDim): C <= 640
MAX_HEAD_DIM = 64


class CudaBackend(FusedBackend):
    """Eval-mode, forward-only CUDA kernels (BatchNorm folded)."""

    def availability_reasons(self) -> List[str]:
        reasons = []
        if torch.version.cuda is None:
            reasons.append("torch is built without CUDA (torch.version.cuda is None)")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device available (torch.cuda.is_available() is False)")
        try:
            from ..cuda.launcher import module
            module()
        except ImportError as e:
            reasons.append(f"CUDA extension not available: {e}")
        return reasons

    def not_supported_reasons(self, p) -> List[str]:
        reasons = super().not_supported_reasons(p)
        if p.head_dim > MAX_HEAD_DIM:
            reasons.append(f"head width d={p.head_dim} > {MAX_HEAD_DIM} (C > {10 * MAX_HEAD_DIM}) not supported")
        return reasons

    def op(self):
        from ..cuda import op  # noqa: F401  (registers the op)
        return torch.ops.gmf.cuda_pre_projection


BACKEND = CudaBackend(
    name="cuda",
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    device_types=frozenset({"cuda"}),
    supports_training=False,
    supports_grad=False,
    head_dims=None,  # d = C/10 <= 64: 4..48 specialised at compile time, others by generic code
    verified_on_gpu=False,  # no GPU has run it yet: see README "Verification status"
)
