"""The fused stage qkv -> pre-projection as the torch.library op ``gmf::triton_pre_projection``.

    pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, *folded tensors, scale, ln_eps)

* On a GPU (Triton JIT kernels) it is a ``torch.library.triton_op`` whose launches go
  through ``torch.library.wrap_triton``: ``torch.compile`` traces into it and Inductor
  sees the three kernels. Its fake implementation is the function itself (allocation
  and launches are no-ops on fake tensors).
* Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU) the kernels are
  ``InterpretedFunction`` objects that ``wrap_triton`` passes through untraced, so a
  ``triton_op`` would trace to a graph without the kernels. There (and on torch < 2.6)
  the op is a ``torch.library.custom_op`` with an explicit fake implementation: opaque
  to Inductor, still one node for ``torch.compile(fullgraph=True)``.

Launch sequence (three kernels, no host synchronisation):
``gma_aggregate_kernel`` (SPLITS, 5, B) -> ``gma_kv_combine_kernel`` (8, B) ->
``gma_attention_kernel`` (ceil(N / ATTN_BLOCK_P), 8, B).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..folding import FoldedGMAWeights
from ._common import interpreting
from .aggregation import gma_aggregate_kernel, launch_aggregate, split_plan
from .attention import gma_attention_kernel, gma_kv_combine_kernel, launch_attention, launch_combine
from .config import INTERPRETER_BLOCK_P, GMAShape, gma_shape, next_pow2

Tensor = torch.Tensor

OP_NAME = "gmf::triton_pre_projection"

#: Test hook: when True every buffer is allocated filled with NaN (an element that a kernel
#: forgets to write, or reads before it is written, shows up as NaN in the result).
POISON_BUFFERS = False

try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6: plain launches (custom_op path below)
    def wrap_triton(kernel):
        return kernel

#: "triton_op" or "custom_op": how the op was registered (see module docstring).
REGISTRATION = ("custom_op" if interpreting() or not hasattr(torch.library, "triton_op")
                else "triton_op")


def _alloc(shape, dtype, device):
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def run_stages(qkv: Tensor, H: int, W: int, bn0_scale: Tensor, bn0_shift: Tensor, dw1: Tensor,
               dw2: Tensor, dw3: Tensor, pw: Tensor, pw_bias: Tensor, local_dw: Tensor,
               local_pw: Tensor, ln_weight: Tensor, ln_bias: Tensor, crpe_w0: Tensor,
               crpe_w1: Tensor, crpe_w2: Tensor, crpe_b: Tensor, scale: float, ln_eps: float,
               shape: Optional[GMAShape] = None) -> Dict[str, Tensor]:
    """Run the three kernels; return every buffer (the op returns ``pre``; tests read all).

    qkv (B, N, 3C) in fp32/fp16/bf16 with unit channel stride; folded tensors fp32,
    contiguous, on qkv's device. Returns q, v (B, N, C') [x.dtype], part_m, part_l
    (B, T, C'), part_acc (B, T, C', d), kv (B, C', d) [fp32] and pre (B, N, C).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    if shape is None:
        if interpreting():  # one tile up to INTERPRETER_BLOCK_P tokens: no padding waste on tiny grids
            bp = min(INTERPRETER_BLOCK_P, max(16, next_pow2(N)))
            shape = gma_shape(C, agg_block_p=bp, attn_block_p=bp, interpreter=True)
        else:
            shape = gma_shape(C)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    dev, dt = qkv.device, qkv.dtype
    splits, tiles_per_split = split_plan(N, B, shape.AGG_BLOCK_P, shape.SPLIT_TARGET)
    f32 = torch.float32
    q = _alloc((B, N, shape.CP), dt, dev)
    v = _alloc((B, N, shape.CP), dt, dev)
    pre = _alloc((B, N, C), dt, dev)
    part_m = _alloc((B, splits, shape.CP), f32, dev)
    part_l = _alloc((B, splits, shape.CP), f32, dev)
    part_acc = _alloc((B, splits, shape.CP, shape.D), f32, dev)
    kv = _alloc((B, shape.CP, shape.D), f32, dev)
    launch_aggregate(wrap_triton(gma_aggregate_kernel), qkv, H, W, shape, tiles_per_split, bn0_scale, bn0_shift,
                     dw1, dw2, dw3, pw, pw_bias, local_dw, local_pw, ln_weight, ln_bias, ln_eps,
                     q, v, pre, part_m, part_l, part_acc)
    launch_combine(wrap_triton(gma_kv_combine_kernel), part_m, part_l, part_acc, kv, shape)
    launch_attention(wrap_triton(gma_attention_kernel), q, v, kv, pre, crpe_w0, crpe_w1, crpe_w2, crpe_b,
                     H, W, scale, shape)
    return {"q": q, "v": v, "part_m": part_m, "part_l": part_l, "part_acc": part_acc, "kv": kv,
            "pre": pre}


def _check(qkv: Tensor, H: int, W: int, tensors) -> None:
    if qkv.dim() != 3 or qkv.shape[2] % 30 != 0:
        raise ValueError(f"qkv must be (B, N, 3C) with C a multiple of 10, got {tuple(qkv.shape)}")
    if qkv.shape[1] != H * W:
        raise ValueError(f"qkv has N={qkv.shape[1]} tokens, H*W={H * W}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"qkv dtype {qkv.dtype} not supported (float32, float16, bfloat16)")
    for t in tensors:
        if t.dtype != torch.float32 or t.device != qkv.device or not t.is_contiguous():
            raise TypeError("folded weights must be contiguous float32 tensors on qkv's device "
                            f"(got {t.dtype} on {t.device}, contiguous={t.is_contiguous()})")


def triton_pre_projection(qkv: Tensor, H: int, W: int, bn0_scale: Tensor, bn0_shift: Tensor,
                          dw1: Tensor, dw2: Tensor, dw3: Tensor, pw: Tensor, pw_bias: Tensor,
                          local_dw: Tensor, local_pw: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                          crpe_w0: Tensor, crpe_w1: Tensor, crpe_w2: Tensor, crpe_b: Tensor,
                          scale: float, ln_eps: float) -> Tensor:
    """Eval-mode GMA from the qkv projection to the pre-projection tokens (B, N, C)."""
    _check(qkv, H, W, (bn0_scale, bn0_shift, dw1, dw2, dw3, pw, pw_bias, local_dw, local_pw,
                       ln_weight, ln_bias, crpe_w0, crpe_w1, crpe_w2, crpe_b))
    return run_stages(qkv, H, W, bn0_scale, bn0_shift, dw1, dw2, dw3, pw, pw_bias, local_dw, local_pw,
                      ln_weight, ln_bias, crpe_w0, crpe_w1, crpe_w2, crpe_b, scale, ln_eps)["pre"]


def _fake(qkv, H, W, bn0_scale, bn0_shift, dw1, dw2, dw3, pw, pw_bias, local_dw, local_pw,
          ln_weight, ln_bias, crpe_w0, crpe_w1, crpe_w2, crpe_b, scale, ln_eps):
    B, N, C3 = qkv.shape
    return qkv.new_empty((B, N, C3 // 3))


def _register():
    if REGISTRATION == "triton_op":
        return torch.library.triton_op(OP_NAME, triton_pre_projection, mutates_args=())
    op = torch.library.custom_op(OP_NAME, triton_pre_projection, mutates_args=())
    op.register_fake(_fake)
    return op


def _op_exists() -> bool:
    try:
        torch.ops.gmf.triton_pre_projection  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


# registered once per process (a re-import, e.g. importlib.reload, keeps the first)
pre_projection_op = None if _op_exists() else _register()


def pre_projection(qkv: Tensor, H: int, W: int, f: FoldedGMAWeights, scale: float) -> Tensor:
    """Call the registered op with a `FoldedGMAWeights` (the contract of folding.py)."""
    return torch.ops.gmf.triton_pre_projection(
        qkv, H, W, f.bn0_scale, f.bn0_shift, f.dw[0], f.dw[1], f.dw[2], f.pw, f.pw_bias,
        f.local_dw, f.local_pw, f.ln_weight, f.ln_bias, f.crpe_w[0], f.crpe_w[1], f.crpe_w[2],
        f.crpe_b, float(scale), float(f.ln_eps))


def folded_args(f: FoldedGMAWeights):
    """The folded tensors in the op's argument order (after qkv, H, W)."""
    return (f.bn0_scale, f.bn0_shift, f.dw[0], f.dw[1], f.dw[2], f.pw, f.pw_bias, f.local_dw, f.local_pw,
            f.ln_weight, f.ln_bias, f.crpe_w[0], f.crpe_w[1], f.crpe_w[2], f.crpe_b)
