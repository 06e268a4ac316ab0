"""Training and gradients on the CUDA backend: its autograd Function.

    pre = cuda_train_pre_projection(qkv, (H, W), w, hp, training)

Used by the CUDA backend whenever a call trains (BatchNorm batch statistics) or needs
gradients; eval without gradients keeps the plain ``gmf::cuda_pre_projection`` op. The
statistics pass, the running statistics, the differentiable folding and the backward stages
(**PyTorch ops for now, not CUDA kernels**) are shared with the Triton backend
(`gmf_kernels/training.py`, which says what each does and what is saved); the forward of both
modes is the eval-mode CUDA kernels on the folded weights (on CPU tensors: their emulation,
which is how tests/test_cuda_training.py checks this path without a GPU).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import training
from ..weights import GMAHyper, GMAWeights
from . import op as _op  # noqa: F401  (registers gmf::cuda_pre_projection)

Tensor = torch.Tensor


class CudaPreProjectionFunction(torch.autograd.Function):
    """pre = CUDA kernels(qkv, folded weights); backward = `training.backward` (its inputs:
    `training`'s module docstring)."""

    @staticmethod
    def forward(ctx, qkv, mean, rstd, count, H, W, scale, ln_eps, group, *weights):
        pre = torch.ops.gmf.cuda_pre_projection(qkv, H, W, list(weights), scale, ln_eps)
        training.save(ctx, qkv, mean, rstd, count, H, W, scale, ln_eps, group, weights)
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        return training.backward(ctx, grad_pre)


def cuda_train_pre_projection(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                              training_mode: bool) -> Tensor:
    """The CUDA pre-projection with autograd, in training (batch statistics) or eval mode."""
    return CudaPreProjectionFunction.apply(*training.prepare(qkv, size, w, hp, training_mode))
