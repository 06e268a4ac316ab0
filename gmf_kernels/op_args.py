"""Argument checks of the fused pre-projection ops (Triton and CUDA): one definition.

Both ops take ``(qkv, H, W, weights, scale, ln_eps)``: qkv (B, N, 3C) in float32,
float16 or bfloat16, N = H * W, C a multiple of 10, and the folded weights
(`folding.FoldedGMAWeights`, in `folding.WEIGHT_NAMES` order) in float32, on qkv's device,
with the shapes `folding.weight_shapes(C)`. Wrong types, dtypes and devices raise
TypeError; wrong shapes and values raise ValueError — before any kernel is launched.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from .folding import WEIGHT_NAMES, FoldedGMAWeights, weight_shapes

Tensor = torch.Tensor

#: input dtypes of the fused kernels (folded weights are always float32)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_pre_projection_args(qkv: Tensor, H: int, W: int, weights: Sequence[Tensor], scale: float,
                              ln_eps: float) -> Tuple[int, int, int, FoldedGMAWeights]:
    """Validate the op's arguments; return (B, N, C, the weights as a FoldedGMAWeights)."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a Tensor, got {type(qkv).__name__}")
    if qkv.dtype not in KERNEL_DTYPES:
        raise TypeError(f"qkv has dtype {qkv.dtype}; the fused kernels take float32, float16 or bfloat16")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, N, 3C), got shape {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    if int(H) < 1 or int(W) < 1 or N != int(H) * int(W):
        raise ValueError(f"qkv has N={N} tokens, but (H, W)=({H}, {W})")
    if B < 1:
        raise ValueError("qkv has an empty batch")
    if C3 % 3 != 0 or (C3 // 3) % 10 != 0 or C3 == 0:
        raise ValueError(f"qkv has {C3} channels: expected 3C with C a positive multiple of 10")
    C = C3 // 3
    if len(weights) != len(WEIGHT_NAMES):
        raise ValueError(f"expected {len(WEIGHT_NAMES)} folded weight tensors {WEIGHT_NAMES}, got {len(weights)}")
    shapes = weight_shapes(C)
    for name, t in zip(WEIGHT_NAMES, weights):
        if not isinstance(t, Tensor):
            raise TypeError(f"weight {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"weight {name} has dtype {t.dtype}; folded weights must be float32 "
                            f"(gmf_kernels.folding.folded_weights)")
        if t.device != qkv.device:
            raise TypeError(f"weight {name} is on {t.device}, qkv on {qkv.device}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {shapes[name]} for C={C}")
    if not (isinstance(scale, (int, float)) and math.isfinite(float(scale))):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not (isinstance(ln_eps, (int, float)) and math.isfinite(float(ln_eps)) and float(ln_eps) > 0):
        raise ValueError(f"ln_eps must be finite and > 0, got {ln_eps!r}")
    return B, N, C, FoldedGMAWeights(*(t.contiguous() for t in weights))


def fake_pre_projection(qkv: Tensor, H: int, W: int, weights: Sequence[Tensor], scale: float,
                        ln_eps: float) -> Tensor:
    """The ops' fake (meta) implementation: the output's shape, dtype and device."""
    torch._check(qkv.dim() == 3, lambda: f"qkv must be (B, N, 3C), got {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    torch._check(C3 % 30 == 0, lambda: f"qkv has {C3} channels: expected 3C with C a multiple of 10")
    torch._check(len(weights) == len(WEIGHT_NAMES), lambda: f"expected {len(WEIGHT_NAMES)} folded weights")
    return qkv.new_empty((B, N, C3 // 3))
