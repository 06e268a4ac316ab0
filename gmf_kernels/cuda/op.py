"""The op layer of the CUDA backend: ``gmf::cuda_pre_projection`` and its autograd.

    pre = torch.ops.gmf.cuda_pre_projection(qkv, H, W, weights, scale, ln_eps)

``weights`` is the list of folded tensors in `folding.WEIGHT_NAMES` order. The op is a
``torch.library.custom_op`` with a fake implementation (`op_args.fake_pre_projection`), so
``torch.compile(fullgraph=True)`` traces through it as one opaque node. On CUDA tensors it
launches the kernels; on CPU tensors it runs the very same kernel code in the CPU emulation
(`launcher.launch_pre_projection(emulate=True)`; slow, for tests: dispatch never sends a CPU
problem to this backend).

Autograd: ``torch.library.register_autograd`` on the op (`training.OpGrad`, shared with the
Triton op: the BatchNorms as a fixed affine, PyTorch-ops backward), so ``torch.compile``
(AOTAutograd) keeps the op one node. The backend's training and gradient path is
`train_op.CudaPreProjectionFunction`, a ``torch.autograd.Function`` around this op that adds
the batch-statistics terms (training mode) and whose folded weights are differentiable
functions of the module's parameters (`gmf_kernels/training.py`).
"""
from __future__ import annotations

from typing import List

import torch

from ..op_args import fake_pre_projection
from ..training import OpGrad
from .launcher import launch_pre_projection

Tensor = torch.Tensor

OP_NAME = "gmf::cuda_pre_projection"


def cuda_pre_projection_impl(qkv: Tensor, H: int, W: int, weights: List[Tensor], scale: float,
                             ln_eps: float) -> Tensor:
    """qkv (B, N, 3C) -> pre-projection (B, N, C) with the CUDA kernels (eval, BatchNorm folded);
    CPU tensors: the kernels' CPU emulation. The op's body (the backend calls it directly on a plain
    eager call, `FusedBackend.op_impl`)."""
    return launch_pre_projection(qkv, H, W, weights, scale, ln_eps, emulate=qkv.device.type == "cpu")


cuda_pre_projection = torch.library.custom_op(OP_NAME, cuda_pre_projection_impl, mutates_args=())
cuda_pre_projection.register_fake(fake_pre_projection)
torch.library.register_autograd(OP_NAME, OpGrad.backward, setup_context=OpGrad.setup_context)
