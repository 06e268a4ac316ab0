"""Training and gradients on the Triton backend: the statistics pass, the folding, the Function.

    pre = triton_train_pre_projection(qkv, (H, W), w, hp, training)

Used by the Triton backend whenever a call trains (BatchNorm batch statistics) or needs
gradients; eval without gradients keeps the plain ``gmf::triton_pre_projection`` op.

1. Training mode: the **statistics pass** -- Z (segments 0..3 of q, k, v before their
   BatchNorm: segment 0 itself, 1..3 pointwise(depthwise)) and its per-channel mean and
   biased variance over the 3B images x H x W (`backward.statistics`; **PyTorch ops for now,
   not a kernel**; float32 for float16/bfloat16 inputs). The running statistics are updated
   as nn.BatchNorm2d does (momentum, or the cumulative average when momentum is None;
   unbiased variance; num_batches_tracked), BatchNorms without running statistics skipped.
2. The BatchNorms become the affine ``bn_scale, bn_shift`` of the folded weights:
   `folding.fold_batch_stats` (training) or the running statistics (eval with gradients),
   both **differentiable PyTorch**, so the gradients of the folded weights reach the
   module's parameters (BatchNorm weight/bias, depthwise, pointwise, LayerNorm, CRPE).
3. `TritonPreProjectionFunction` (a ``torch.autograd.Function``): its forward is the
   eval-mode Triton kernels (``gmf::triton_pre_projection``) on those folded weights -- the
   same kernels in both modes --; its backward is `backward.pre_projection_backward`
   (stages B1, B2, B3 and the local branch; **PyTorch ops for now, not kernels**), which
   recomputes what the forward did not save and, in training mode, adds the
   batch-statistics terms (the mean and variance depend on qkv, the depthwise and the
   pointwise weights) to dZ.

Saved for the backward per image: qkv (3C values per token, in qkv's dtype) and the folded
weights; everything else is recomputed. Activation memory of the whole layer, measured with
autograd's saved-tensor hooks (tests/test_triton_training.py, per image, in N*C values of the
input's dtype): Triton 5.0 (x for the qkv linear, qkv, the pre-projection tokens for `proj`)
against 18.3 for upstream's eager structure (the reference backend) and 23.5 for the torch
backend (C = 80, 160, 320 at 14x14 / 28x28, float32): 3.7x less than eager.

SyncBatchNorm (``hp.bn_process_group``, upstream's semantics): the statistics pass all-reduces
(sum, sum of squares, count) once (`distributed.sync_batch_stats`), the backward all-reduces
the two per-channel gradient sums sum(G), sum(G * Zhat) once before B3; the BatchNorm weight
and bias gradients stay per rank, as in SyncBatchNorm (the data-parallel wrapper all-reduces
parameter gradients).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..folding import FoldedGMAWeights, _build, bn_affine, compute_dtype, fold_batch_stats, update_running_stats
from ..weights import GMAHyper, GMAWeights
from . import op as _op  # noqa: F401  (registers gmf::triton_pre_projection)
from .backward import pre_projection_backward, statistics

Tensor = torch.Tensor


def fold_running_stats(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype) -> FoldedGMAWeights:
    """`folding.fold_eval` without no_grad: differentiable in the BatchNorm weight/bias and
    every other parameter (eval mode with gradients)."""
    aff = [bn_affine(w, i, hp, dtype) for i in range(4)]
    return _build(w, torch.stack([a for a, _ in aff]), torch.stack([b for _, b in aff]), dtype)


class TritonPreProjectionFunction(torch.autograd.Function):
    """pre = Triton kernels(qkv, folded weights); backward = `backward.pre_projection_backward`.

    Inputs: qkv, mean and rstd (4, s) of the batch statistics (None: eval, running statistics
    already in bn_scale/bn_shift), count (values per channel over every rank: a tensor with a
    process group, else None = 3B*H*W), H, W, scale, ln_eps, the process group (or None), then
    the 14 folded weights."""

    @staticmethod
    def forward(ctx, qkv, mean, rstd, count, H, W, scale, ln_eps, group, *weights):
        pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, list(weights), scale, ln_eps)
        ctx.save_for_backward(qkv, mean, rstd, count, *weights)
        ctx.meta = (H, W, scale, ln_eps, group)
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        qkv, mean, rstd, count, *weights = ctx.saved_tensors
        H, W, scale, ln_eps, group = ctx.meta
        reduce_sums = None if group is None else (lambda t: _all_reduce(t, group))
        with torch.autocast(qkv.device.type, enabled=False):
            d_qkv, grads = pre_projection_backward(grad_pre, qkv, H, W, FoldedGMAWeights(*weights), scale, ln_eps,
                                                   mean, rstd, None if count is None else count.to(mean.dtype),
                                                   reduce_sums)
        return (d_qkv, None, None, None, None, None, None, None, None, *grads)


def _all_reduce(t: Tensor, group) -> Tensor:
    """Sum of t over the ranks of group (the backward's two gradient sums: SyncBatchNorm's collective)."""
    import torch.distributed as dist
    out = t.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def triton_train_pre_projection(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                                training: bool) -> Tensor:
    """The Triton pre-projection with autograd, in training (batch statistics) or eval mode."""
    H, W = int(size[0]), int(size[1])
    cd = compute_dtype(qkv.dtype)
    mean: Optional[Tensor] = None
    rstd: Optional[Tensor] = None
    count: Optional[Tensor] = None
    group = hp.bn_process_group if training else None
    if training:
        with torch.no_grad(), torch.autocast(qkv.device.type, enabled=False):
            # the statistics need only the depthwise/pointwise weights: fold them without the BatchNorms
            pre_bn = _build(w, qkv.new_zeros(1, dtype=cd), qkv.new_zeros(1, dtype=cd), cd)
            mean, var, n = statistics(qkv.detach(), H, W, pre_bn, group)
            update_running_stats(w, hp, mean, var, n)
            rstd = torch.rsqrt(var + hp.bn_eps)
            if group is not None:
                count = n
        folded = fold_batch_stats(w, mean, var, hp, cd)
    else:
        folded = fold_running_stats(w, hp, cd)
    return TritonPreProjectionFunction.apply(qkv, mean, rstd, count, H, W, float(hp.scale), float(hp.ln_eps), group,
                                             *folded)
