"""Training and gradients on the CUDA backend: its autograd Function.

    pre = cuda_train_pre_projection(qkv, (H, W), w, hp, training)

Used by the CUDA backend whenever a call trains (BatchNorm batch statistics) or needs
gradients; eval without gradients keeps the plain ``gmf::cuda_pre_projection`` op. The forward
of both modes is the eval-mode CUDA kernels on the folded weights (on CPU tensors: their
emulation, which is how tests/test_cuda_training.py checks this path without a GPU). The rest
is shared with the Triton backend (`gmf_kernels/training.py`: what each step does and what is
saved), and so are the kernels of the training-only passes:

* **kernels**, when Triton's kernels can run on the call's device and dtype
  (`triton_backward_reasons` is empty; the usual case on a GPU, where torch ships Triton): the
  statistics pass (`triton_kernels/statistics.py`) and the whole backward -- recompute, B1, B2,
  B3 and the local branch -- as the Triton backend runs it (`triton_kernels/train_op.py`: one
  op ``gmf::triton_pre_projection_backward``, or the stages one by one around SyncBatchNorm's
  all-reduce). There is no CUDA-C++ backward: those Triton kernels are this backend's backward
  kernels.
* **PyTorch ops** otherwise (no Triton installed, a GPU Triton refuses, segments wider than
  the Triton backward kernels take: `config.backward_kernels_take`): `backward.statistics`
  and `TORCH_STAGES`, with one RuntimeWarning per distinct reason saying why.

The choice is made once per call, in `cuda_train_pre_projection`, and recorded on the autograd
context (``ctx.kernels``); both choices give the same gradients to rounding
(tests/test_cuda_training.py runs both).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch

from .. import training
from ..backends.base import FallbackWarning, GMAProblem
from .._tracing import constant_under_compile, cuda_capability
from ..triton_kernels.config import BACKWARD_KERNELS_MAX_S_PAD, backward_kernels_take  # imports no Triton
from ..weights import GMAHyper, GMAWeights
from . import op as _op  # noqa: F401  (registers gmf::cuda_pre_projection)

Tensor = torch.Tensor

_WARNED = set()


def triton_backward_reasons(qkv: Tensor, H: int, W: int, num_heads: int) -> List[str]:
    """Why the Triton statistics and backward kernels cannot serve this CUDA-backend call: the
    Triton backend's own support data (device, architecture, dtype; asked as an explicit
    gradient call), then the widths its backward kernels take on this device
    (`config.backward_kernels_take`); [] when they can. Decided on plain values
    (`_backward_reasons`), so that under torch.compile the choice is made once at trace time,
    outside the graph, as `functional.dispatch` chooses the backend (the backends' probes
    are not traceable: Dynamo of torch 2.11 stopped at Triton's import check), with the sizes
    given as 1 (`functional.SIZE_FIELDS`: symbolic there, and no backend decides on them)."""
    index = None
    if qkv.is_cuda:
        index = qkv.device.index if qkv.device.index is not None else torch.cuda.current_device()
    B = qkv.shape[0]
    if torch.compiler.is_compiling():
        B = H = W = 1
    why = _backward_reasons(int(B), int(H), int(W), qkv.shape[-1] // 3, int(num_heads), qkv.dtype,
                            qkv.device.type, index)
    return why.split("\n") if why else []


@constant_under_compile
def _backward_reasons(B: int, H: int, W: int, C: int, num_heads: int, dtype: torch.dtype, device_type: str,
                      index: Optional[int]) -> str:
    """`triton_backward_reasons` by value: the reasons joined by newlines ("" when none)."""
    from ..backends.triton_backend import BACKEND as TRITON
    cap = cuda_capability(index) if index is not None else None
    p = GMAProblem(B=B, H=H, W=W, dim=C, num_heads=num_heads, dtype=dtype, device_type=device_type,
                   training=False, needs_grad=True, explicit=True, device_index=index, device_capability=cap)
    reasons = TRITON.not_supported_reasons(p)
    if not reasons:   # Triton runs here: the backward's dot precision on this device
        from ..triton_kernels._common import dot_variant_of   # imports Triton (available: no reasons)
        precision = dot_variant_of(dtype, cap if device_type == "cuda" else None).precision
        if not backward_kernels_take(C // 5, precision):
            reasons.append(f"segment width s={C // 5} (C={C}): with {precision} dots the Triton backward kernels "
                           f"take s up to {BACKWARD_KERNELS_MAX_S_PAD.get(precision, 0)} "
                           "(config.BACKWARD_KERNELS_MAX_S_PAD; wider ones spill)")
    return "\n".join(reasons)


@constant_under_compile  # warned at trace time under torch.compile (not a graph node)
def _warn_fallback(reasons: List[str]) -> None:
    why = "; ".join(reasons)
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn("gmf_kernels cuda backend: training statistics and backward run as PyTorch ops, "
                      f"not kernels, because the Triton kernels cannot run here: {why}", FallbackWarning, stacklevel=3)


class CudaPreProjectionFunction(torch.autograd.Function):
    """pre = CUDA kernels(qkv, folded weights); backward = the Triton backward kernels or the
    PyTorch stages (module docstring; the inputs: `training`'s module docstring, then
    ``kernels``, the choice)."""

    @staticmethod
    def forward(ctx, kernels, qkv, mean, rstd, count, z, y_all, zl, H, W, scale, ln_eps, group, *weights):
        pre = torch.ops.gmf.cuda_pre_projection(qkv, H, W, list(weights), scale, ln_eps)
        training.save(ctx, qkv, mean, rstd, count, z, y_all, H, W, scale, ln_eps, group, weights)
        ctx.kernels = kernels
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        if ctx.kernels:
            from ..triton_kernels.train_op import kernel_backward
            grads = kernel_backward(ctx, grad_pre)
        else:
            grads = training.backward(ctx, grad_pre)
        return (None,) + training.first_order_only(grads, "cuda",
                                                          lambda: (grad_pre, *ctx.saved_tensors))


def cuda_train_pre_projection(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                              training_mode: bool) -> Tensor:
    """The CUDA pre-projection with autograd, in training (batch statistics) or eval mode."""
    H, W = int(size[0]), int(size[1])
    reasons = triton_backward_reasons(qkv, H, W, hp.num_heads)
    if reasons:
        _warn_fallback(reasons)
        args = training.prepare(qkv, size, w, hp, training_mode)
    else:
        from ..triton_kernels.statistics import statistics  # imports Triton
        from ..triton_kernels.train_op import planes_fn_for
        args = training.prepare(qkv, size, w, hp, training_mode, statistics_fn=statistics,
                                planes_fn=planes_fn_for(qkv, local=False))   # (its forward runs its own local branch)
    return CudaPreProjectionFunction.apply(not reasons, *args)
