"""The op layer of the Triton backend: ``gmf::triton_pre_projection`` and its autograd.

    pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, weights, scale, ln_eps)
    pre = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, H, W, weights, scale, ln_eps)  # training

``weights`` is the list of folded tensors in `folding.WEIGHT_NAMES` order.

* On a GPU (Triton JIT kernels) it is a ``torch.library.triton_op`` whose launches go
  through ``torch.library.wrap_triton`` (launcher.py): ``torch.compile`` traces into it and
  Inductor sees the kernels (three; four with the split forward). Its fake implementation is the
  function itself (allocation and launches are no-ops on fake tensors).
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

from typing import List, Optional

import torch

from ..op_args import check_pre_projection_args, fake_pre_projection
from ..training import OpGrad
from . import config
from ._common import interpreting
from .launcher import KEPT, launch_pre_projection, planes_view

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


def triton_pre_projection_from_planes(qkv: Tensor, z: Tensor, H: int, W: int, weights: List[Tensor], scale: float,
                                      ln_eps: float, keep_w4: bool = True,
                                      zl: Optional[Tensor] = None) -> List[Tensor]:
    """`triton_pre_projection` in a training step whose statistics pass kept Z (`statistics.statistics_planes`:
    (3B, C', H, W), segments 0..3 of q, k, v before their BatchNorm, in the stage dtype): the aggregation
    reads segments 1-3 from z instead of running their stencils and channel mixes again
    (`config.from_planes`). Returns [pre, w4, xh4, rstd4, R, kv, k_max, k_sum] (`KEPT_OUTPUTS`): the
    pre-projection and what the backward's recompute would make (`launcher.KEPT`), kept by the same
    launches. keep_w4 False (a backward in the dense form, which reads no w4): w4 returned empty, (0,). zl (with
    keep_w4 False): the local branch's Z before its LayerNorm, (B, s, H, W) in the stage dtype, as the dense
    statistics pass computed it (`dense_z.dense_statistics_planes`): the aggregation reads it instead of running
    the branch's stencil (`launcher.plan_pre_projection`'s zl). No autograd of its own:
    `train_op.TritonPreProjectionFunction` calls it."""
    B, N, C, folded = check_pre_projection_args(qkv, H, W, weights, scale, ln_eps)
    cp = 4 * (C // 5)
    if not isinstance(z, Tensor) or tuple(z.shape) != (3 * B, cp, int(H), int(W)) or not z.is_contiguous():
        raise ValueError(f"planes z: expected a contiguous (3B, C', H, W) = {(3 * B, cp, int(H), int(W))} tensor, "
                         f"got {tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    if z.dtype != config.stage_dtype(qkv.dtype) or z.device != qkv.device:
        raise TypeError(f"planes z is {z.dtype} on {z.device}; a {qkv.dtype} layer on {qkv.device} keeps "
                        f"{config.stage_dtype(qkv.dtype)} planes there")
    if zl is not None:
        want = (B, C // 5, int(H), int(W))
        if not isinstance(zl, Tensor) or tuple(zl.shape) != want or not zl.is_contiguous() or zl.dtype != z.dtype \
                or zl.device != z.device:
            raise ValueError(f"local branch's Z zl: expected a contiguous {want} {z.dtype} tensor on {z.device}, got "
                             + (f"{tuple(zl.shape)} {zl.dtype} on {zl.device}" if isinstance(zl, Tensor)
                                else type(zl).__name__))
    planes = planes_view(z, B)
    step = config.MAX_GRID_BATCH
    chunks = [launch_pre_projection(qkv[b0:b0 + step], H, W, folded, scale, ln_eps, planes=planes[:, b0:b0 + step],
                                    keep_w4=keep_w4, zl=None if zl is None else zl[b0:b0 + step])
              for b0 in range(0, B, step)]
    if len(chunks) == 1:
        return [chunks[0][k] for k in KEPT_OUTPUTS]
    return [torch.cat([c[k] for c in chunks]) for k in KEPT_OUTPUTS]


#: what `triton_pre_projection_from_planes` returns, in order (launcher buffers: `launcher.KEPT`)
KEPT_OUTPUTS = ("pre",) + KEPT


def _fake_from_planes(qkv, z, H, W, weights, scale, ln_eps, keep_w4=True, zl=None):
    pre = fake_pre_projection(qkv, H, W, weights, scale, ln_eps)
    B, N, C = pre.shape
    s, H, W = C // 5, int(H), int(W)
    f32 = dict(dtype=torch.float32)
    return [pre, z.new_empty((B, 3 * s, H, W) if keep_w4 else (0,)), z.new_empty((B, s, H, W)),
            z.new_empty((B, 1, H, W), **f32),
            z.new_empty((B, 4 * s, H, W)), z.new_empty((B, 4 * s, s // 2), **f32), z.new_empty((B, 4 * s), **f32),
            z.new_empty((B, 4 * s), **f32)]


def _register(name, fn, fake):
    if REGISTRATION == "triton_op":
        return torch.library.triton_op(name, fn, mutates_args=())
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.gmf, name.split("::")[1])
        return True
    except (AttributeError, RuntimeError):
        return False


# registered once per process (a re-import, e.g. importlib.reload, keeps the first)
if _op_exists(OP_NAME):
    pre_projection_op = None
else:
    pre_projection_op = _register(OP_NAME, triton_pre_projection, fake_pre_projection)
    torch.library.register_autograd(OP_NAME, OpGrad.backward, setup_context=OpGrad.setup_context)
FROM_PLANES_OP_NAME = "gmf::triton_pre_projection_from_planes"
from_planes_op = (None if _op_exists(FROM_PLANES_OP_NAME) else
                  _register(FROM_PLANES_OP_NAME, triton_pre_projection_from_planes, _fake_from_planes))
