"""Training and gradients on the Triton backend: its autograd Function.

    pre = triton_train_pre_projection(qkv, (H, W), w, hp, training)

Used by the Triton backend whenever a call trains (BatchNorm batch statistics) or needs
gradients; eval without gradients keeps the plain ``gmf::triton_pre_projection`` op. The
statistics pass, the running statistics, the differentiable folding and the backward stages
are shared with the CUDA backend (`gmf_kernels/training.py`, which says what each does and what
is saved); the forward of both modes is the eval-mode Triton kernels on the folded weights.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import training
from ..weights import GMAHyper, GMAWeights
from .backward import Stages
from .config import BACKWARD_FUSED_MAX_S_PAD, next_pow2
from . import op as _op  # noqa: F401  (registers gmf::triton_pre_projection)

Tensor = torch.Tensor


class TritonPreProjectionFunction(torch.autograd.Function):
    """pre = Triton kernels(qkv, folded weights); backward = `training.backward` (its inputs:
    `training`'s module docstring)."""

    @staticmethod
    def forward(ctx, qkv, mean, rstd, count, H, W, scale, ln_eps, group, *weights):
        pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, list(weights), scale, ln_eps)
        training.save(ctx, qkv, mean, rstd, count, H, W, scale, ln_eps, group, weights)
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        qkv = ctx.saved_tensors[0]
        return training.backward(ctx, grad_pre, triton_stages(qkv.shape[-1] // 15))


def triton_stages(s: int) -> Stages:
    """The backward stages on Triton kernels for segment width s (the compute dtype is float32:
    the kernels take float32 stage tensors). B1 and B2 (attention_backward.py: dKV, dQ/dK/dV, the
    CRPE input and weight gradients), the BatchNorm/hardswish gradient sums and B3
    (aggregation_backward.py: dZ fused into the pointwise kernel, the depthwise stencils) and the
    local branch -- up to `config.BACKWARD_FUSED_MAX_S_PAD`; wider segments take the separate dZ
    kernel and the PyTorch local-branch backward (the fused kernels spill there)."""
    from . import aggregation_backward as agb
    from . import attention_backward as ab
    from . import backward as bw
    if next_pow2(s) <= BACKWARD_FUSED_MAX_S_PAD:
        return Stages(b1_dkv=ab.b1_dkv, b2_proxy_grads=ab.b2_proxy_grads, b2_bn_sums=agb.b2_bn_sums,
                      b3=agb.b3_fused, local_backward=agb.local_backward)

    def b3_separate(G, rc, wts, mean, rstd, sum_g, sum_gzh, count):
        return agb.b3_pointwise_depthwise(agb.b3_dz(G, rc, wts, mean, rstd, sum_g, sum_gzh, count), rc, wts)

    return Stages(b1_dkv=ab.b1_dkv, b2_proxy_grads=ab.b2_proxy_grads, b2_bn_sums=agb.b2_bn_sums,
                  b3=b3_separate, local_backward=bw.local_backward)


def triton_train_pre_projection(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                                training_mode: bool) -> Tensor:
    """The Triton pre-projection with autograd, in training (batch statistics) or eval mode."""
    return TritonPreProjectionFunction.apply(*training.prepare(qkv, size, w, hp, training_mode))
