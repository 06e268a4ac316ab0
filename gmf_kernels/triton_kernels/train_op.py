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
        return training.backward(ctx, grad_pre)


def triton_train_pre_projection(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                                training_mode: bool) -> Tensor:
    """The Triton pre-projection with autograd, in training (batch statistics) or eval mode."""
    return TritonPreProjectionFunction.apply(*training.prepare(qkv, size, w, hp, training_mode))
