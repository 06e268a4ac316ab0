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
from .backward import TORCH_STAGES, Stages
from .config import BACKWARD_KERNELS_MAX_S_PAD, next_pow2
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
    """The backward stages for segment width s: Triton kernels up to
    `config.BACKWARD_KERNELS_MAX_S_PAD` (the kernels take the float32 stage tensors): B1 and B2
    (attention_backward.py: dKV, dQ/dK/dV, the CRPE input and weight gradients), the
    BatchNorm/hardswish gradient sums, B3 with dZ fused into the pointwise kernel and the
    depthwise stencils, and the local branch (aggregation_backward.py); wider segments (C = 360,
    480), where those kernels spill, the PyTorch stages."""
    from . import aggregation_backward as agb
    from . import attention_backward as ab
    if next_pow2(s) > BACKWARD_KERNELS_MAX_S_PAD:
        return TORCH_STAGES
    return Stages(b1_dkv=ab.b1_dkv, b2_proxy_grads=ab.b2_proxy_grads, b2_bn_sums=agb.b2_bn_sums,
                  b3=agb.b3_fused, local_backward=agb.local_backward)


def triton_train_pre_projection(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                                training_mode: bool) -> Tensor:
    """The Triton pre-projection with autograd, in training (batch statistics) or eval mode."""
    return TritonPreProjectionFunction.apply(*training.prepare(qkv, size, w, hp, training_mode))
