"""Launcher of the Triton pre-projection: buffers, split plan, grids, the three launches.

    buffers = launch_pre_projection(qkv, H, W, weights, scale, ln_eps)   # dict; buffers["pre"] is the result

Launch sequence (no host synchronisation), under the input's CUDA device:
``gma_aggregate_kernel`` (SPLITS, 5, B) -> ``gma_combine_kernel`` (8, B) ->
``gma_attention_kernel`` (ceil(N / ATTN_BLOCK_P), 8, B). Launches go through
``torch.library.wrap_triton`` so that ``torch.compile`` sees the kernels inside the
``gmf::triton_pre_projection`` op (triton_kernels/op.py); outside tracing it launches them
directly.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

from ..folding import FoldedGMAWeights
from ._common import interpreting
from .aggregation import gma_aggregate_kernel, launch_aggregate, split_plan
from .attention import gma_attention_kernel, gma_combine_kernel, launch_attention, launch_combine
from .config import INTERPRETER_BLOCK_P, GMAShape, gma_shape, next_pow2

Tensor = torch.Tensor

#: Test hook: when True every buffer is allocated filled with NaN (an element that a kernel
#: forgets to write, or reads before it is written, shows up as NaN in the result).
POISON_BUFFERS = False

try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6: plain launches (op.py registers a custom_op then)
    def wrap_triton(kernel):
        return kernel


def _alloc(shape, dtype, device):
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def default_shape(C: int, N: int) -> GMAShape:
    """The specialisation a call uses: the GPU tiles, or one large tile under the interpreter."""
    if interpreting():  # one tile up to INTERPRETER_BLOCK_P tokens: no padding waste on tiny grids
        bp = min(INTERPRETER_BLOCK_P, max(16, next_pow2(N)))
        return gma_shape(C, agg_block_p=bp, attn_block_p=bp, interpreter=True)
    return gma_shape(C)


def device_guard(t: Tensor):
    """Launch under t's CUDA device (Triton launches on the current device, not the tensor's)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def launch_pre_projection(qkv: Tensor, H: int, W: int, weights: FoldedGMAWeights, scale: float, ln_eps: float,
                          shape: Optional[GMAShape] = None) -> Dict[str, Tensor]:
    """Run the three kernels; return every buffer (the op returns ``pre``; tests read all).

    qkv (B, N, 3C) in fp32/fp16/bf16 with unit channel stride; weights: `FoldedGMAWeights`
    (fp32, contiguous, on qkv's device; arguments checked by the op). Returns q, v (B, N, C')
    [qkv.dtype], part_m, part_l (B, SPLITS, C'), part_acc (B, SPLITS, C', d), kv (B, C', d)
    [fp32] and pre (B, N, C).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    shape = shape or default_shape(C, N)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    dev, dt = qkv.device, qkv.dtype
    splits, tiles_per_split = split_plan(N, B, shape.AGG_BLOCK_P, shape.SPLIT_TARGET)
    f32 = torch.float32
    buf = {
        "q": _alloc((B, N, shape.CP), dt, dev),
        "v": _alloc((B, N, shape.CP), dt, dev),
        "pre": _alloc((B, N, C), dt, dev),
        "part_m": _alloc((B, splits, shape.CP), f32, dev),
        "part_l": _alloc((B, splits, shape.CP), f32, dev),
        "part_acc": _alloc((B, splits, shape.CP, shape.D), f32, dev),
        "kv": _alloc((B, shape.CP, shape.D), f32, dev),
    }
    with device_guard(qkv):
        launch_aggregate(wrap_triton(gma_aggregate_kernel), qkv, H, W, weights, ln_eps, shape, tiles_per_split,
                         buf["q"], buf["v"], buf["pre"], buf["part_m"], buf["part_l"], buf["part_acc"])
        launch_combine(wrap_triton(gma_combine_kernel), buf["part_m"], buf["part_l"], buf["part_acc"], buf["kv"],
                       shape)
        launch_attention(wrap_triton(gma_attention_kernel), buf["q"], buf["v"], buf["kv"], buf["pre"], weights,
                         H, W, scale, shape)
    return buf
