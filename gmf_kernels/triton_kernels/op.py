"""The op layer of the Triton backend: ``gmf::triton_pre_projection`` and its autograd.

    pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, weights, scale, ln_eps)

``weights`` is the list of folded tensors in `folding.WEIGHT_NAMES` order.

* On a GPU (Triton JIT kernels) it is a ``torch.library.triton_op`` whose launches go
  through ``torch.library.wrap_triton`` (launcher.py): ``torch.compile`` traces into it and
  Inductor sees the three kernels. Its fake implementation is the function itself
  (allocation and launches are no-ops on fake tensors).
* Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU) the kernels are
  ``InterpretedFunction`` objects that ``wrap_triton`` passes through untraced, so a
  ``triton_op`` would trace to a graph without the kernels. There (and on torch < 2.6)
  the op is a ``torch.library.custom_op`` with an explicit fake implementation: opaque
  to Inductor, still one node for ``torch.compile(fullgraph=True)``.

Autograd: ``torch.library.register_autograd`` on the op (`training.OpGrad`, shared with the CUDA
op): the op is ``pre = f(qkv, weights)`` with the BatchNorms a fixed affine (bn_scale, bn_shift),
and its backward is `backward.pre_projection_backward` without batch-statistics terms (gradients
of qkv and of every folded weight; **PyTorch ops for now, not kernels**). The backend's training
and gradient path is `train_op.TritonPreProjectionFunction`, a ``torch.autograd.Function``
around this op that adds the batch-statistics terms (training mode) and whose folded weights
are differentiable functions of the module's parameters.
"""
from __future__ import annotations

from typing import List

import torch

from ..op_args import check_pre_projection_args, fake_pre_projection
from ..training import OpGrad
from . import config
from ._common import interpreting
from .launcher import launch_pre_projection

Tensor = torch.Tensor

OP_NAME = "gmf::triton_pre_projection"

#: "triton_op" or "custom_op": how the op was registered (see module docstring).
REGISTRATION = ("custom_op" if interpreting() or not hasattr(torch.library, "triton_op")
                else "triton_op")


def triton_pre_projection(qkv: Tensor, H: int, W: int, weights: List[Tensor], scale: float,
                          ln_eps: float) -> Tensor:
    """Eval-mode GMA from the qkv projection to the pre-projection tokens (B, N, C). A batch of more
    than `config.MAX_GRID_BATCH` images (a grid dimension's limit) runs in chunks of that many."""
    B, _, _, folded = check_pre_projection_args(qkv, H, W, weights, scale, ln_eps)
    step = config.MAX_GRID_BATCH
    if B <= step:
        return launch_pre_projection(qkv, H, W, folded, scale, ln_eps)["pre"]
    return torch.cat([launch_pre_projection(qkv[b0:b0 + step], H, W, folded, scale, ln_eps)["pre"]
                      for b0 in range(0, B, step)])


def _register():
    if REGISTRATION == "triton_op":
        op = torch.library.triton_op(OP_NAME, triton_pre_projection, mutates_args=())
    else:
        op = torch.library.custom_op(OP_NAME, triton_pre_projection, mutates_args=())
        op.register_fake(fake_pre_projection)
    torch.library.register_autograd(OP_NAME, OpGrad.backward, setup_context=OpGrad.setup_context)
    return op


def _op_exists() -> bool:
    try:
        torch.ops.gmf.triton_pre_projection  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


# registered once per process (a re-import, e.g. importlib.reload, keeps the first)
pre_projection_op = None if _op_exists() else _register()
