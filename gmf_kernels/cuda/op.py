"""The op layer of the CUDA backend: ``gmf::cuda_pre_projection`` and its autograd.

    pre = torch.ops.gmf.cuda_pre_projection(qkv, H, W, weights, scale, ln_eps)

``weights`` is the list of folded tensors in `folding.WEIGHT_NAMES` order. The op is a
``torch.library.custom_op`` with a fake implementation (`op_args.fake_pre_projection`), so
``torch.compile(fullgraph=True)`` traces through it as one opaque node.

Autograd ("the Function" of this backend): ``torch.library.register_autograd`` on the op,
not a ``torch.autograd.Function`` around it, so that ``torch.compile`` (AOTAutograd) keeps
the op one node and differentiates through the registered formula without a graph break.
Its backward (`CudaPreProjectionGrad`) raises until the backward kernels exist; dispatch
never sends a problem that needs gradients here (``supports_grad=False``).
"""
from __future__ import annotations

from typing import List

import torch

from ..op_args import fake_pre_projection
from .launcher import launch_pre_projection

Tensor = torch.Tensor

OP_NAME = "gmf::cuda_pre_projection"


@torch.library.custom_op(OP_NAME, mutates_args=())
def cuda_pre_projection(qkv: Tensor, H: int, W: int, weights: List[Tensor], scale: float,
                        ln_eps: float) -> Tensor:
    """qkv (B, N, 3C) -> pre-projection (B, N, C) with the CUDA kernels (eval, BatchNorm folded)."""
    return launch_pre_projection(qkv, H, W, weights, scale, ln_eps)


cuda_pre_projection.register_fake(fake_pre_projection)


class CudaPreProjectionGrad:
    """Autograd of ``gmf::cuda_pre_projection`` (registered with register_autograd)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_pre):
        raise NotImplementedError(
            "gmf::cuda_pre_projection has no backward: the CUDA backward kernels (hardswish, BatchNorm, "
            "pointwise/depthwise, local branch, softmax over tokens, KV products, CRPE) are not written. "
            "Run the layer under torch.no_grad(), or train with backend='torch'.")


torch.library.register_autograd(OP_NAME, CudaPreProjectionGrad.backward,
                                setup_context=CudaPreProjectionGrad.setup_context)
