"""Training and gradients on the fused backends (Triton, CUDA): the part both share.

    args = prepare(qkv, size, w, hp, training)          # statistics pass, running stats, folding
    pre = TritonPreProjectionFunction.apply(*args)       # or CudaPreProjectionFunction.apply(kernels, *args)

Each fused backend has its own ``torch.autograd.Function`` (`triton_kernels/train_op.py`,
`cuda/train_op.py`) whose forward is that backend's eval-mode kernels (``gmf::*_pre_projection``
on folded weights: the same kernels in both modes; the Triton backend's reads segments 1-3 from the
statistics pass's kept Z where it kept them, ``gmf::triton_pre_projection_from_planes``) and whose
backward is `backward` below. What
happens before the Function is the same for both and lives here:

1. Training mode: the **statistics pass** -- Z (segments 0..3 of q, k, v before their
   BatchNorm: segment 0 itself, 1..3 pointwise(depthwise)) and its per-channel mean and
   biased variance over the 3B images x H x W, float32 for float16/bfloat16 inputs
   (``prepare(statistics_fn=...)``: the Triton backend's kernel,
   `triton_kernels/statistics.py`, which reads qkv once, for the CUDA backend too where Triton runs,
   and which also stores Z and y for the backward when one follows on the Triton stages,
   ``prepare(planes_fn=...)``; otherwise `backward.statistics`, PyTorch ops materialising Z). The running statistics are
   updated as nn.BatchNorm2d does (`folding.update_running_stats`: momentum, or the
   cumulative average when momentum is None; unbiased variance; num_batches_tracked),
   BatchNorms without running statistics skipped.
2. The BatchNorms become the affine ``bn_scale, bn_shift`` of the folded weights:
   `folding.fold_batch_stats` (training) or the running statistics (eval with gradients,
   `fold_running_stats`), both **differentiable PyTorch**, so the gradients of the folded
   weights reach the module's parameters (BatchNorm weight/bias, depthwise, pointwise,
   LayerNorm, CRPE).
3. The backend's Function; its backward (`backward`) is `backward.pre_projection_backward`
   (stages B1, B2, B3 and the local branch, each from a stage set: the Triton kernels for the
   Triton backend and for CUDA where Triton runs, `triton_kernels/train_op.kernel_backward`;
   else PyTorch ops, `TORCH_STAGES`: `cuda/train_op.py`), which
   recomputes what the forward did not save and, in training mode, adds the batch-statistics
   terms (the mean and variance depend on qkv, the depthwise and the pointwise weights) to dZ.

Saved for the backward per image: qkv (3C values per token, in qkv's dtype), the folded
weights and, in training mode where the backward runs the Triton stages, the planes the statistics
pass kept (Z and the depthwise outputs y, 4.2 C values per token in the stage dtype: computing them
once instead of again in the backward, statistics.py, "Planes kept for the backward") and what the
Triton forward that read them kept of what the backward's recompute would make (`config.from_planes`,
`backward.KeptPlanes`: the local branch's w4 and xh4, 0.8 C values per token in the stage dtype, and
rstd4, one fp32 value per token; the attention's R, 0.8 C per token, and per image KV and the softmax
statistics, C' (d + 2) fp32 values); everything else is recomputed. Activation memory of the whole
layer, measured with autograd's saved-tensor hooks (tests/test_triton_training.py, per image, in N*C
values of the input's dtype): Triton 10.8 + 1/C + C' (d + 2) / (N C) (x for the qkv linear, qkv, the
pre-projection tokens for `proj`, the kept tensors: measured 10.96 at C = 40 5x7, 11.21 at C = 80 4x5;
5.0 before 2026-12-05, when nothing was kept; 8.81 at C = 80 4x5 where the backward runs B3's dense form,
`aggregation_backward.BackwardTiles.DENSE`, whose forward keeps neither y nor w4) against 18.3 for upstream's
eager structure (the
reference backend; C = 80, 160, 320 at 14x14 / 28x28, float32; 19.9-20.1 on the tiny grids) and 23.5
for the torch backend: about 1.7x less than eager at the model's grids.

SyncBatchNorm (``hp.bn_process_group``, upstream's semantics): the statistics pass all-reduces
(sum, sum of squares, count) once (`distributed.sync_batch_stats`; the kernel's (count, mean,
M2) as float64 sums through `distributed.sync_batch_moments`), the backward all-reduces
the two per-channel gradient sums sum(G), sum(G * Zhat) once before B3; the BatchNorm weight
and bias gradients stay per rank, as in SyncBatchNorm (the data-parallel wrapper all-reduces
parameter gradients).

The Function's inputs, in order: qkv, mean and rstd (4, s) of the batch statistics (None: eval,
running statistics already in bn_scale/bn_shift), count (values per channel over every rank: a
tensor with a process group, else None = 3B*H*W), the kept planes Z (3B, 4s, H, W) and y_all (3, 3B,
s, H, W) (None when not kept), zl: the local branch's Z before its LayerNorm (B, s, H, W), where the
statistics pass computed it for the forward to read (the dense form's, `triton_kernels/dense_z.py`; not
saved), else None; H, W, scale, ln_eps, the process group (or None), then the 14 folded
weights (`folding.WEIGHT_NAMES` order).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .folding import (FoldedGMAWeights, _build, bn_affine, compute_dtype, fold_batch_stats, fold_filters,
                      update_running_stats)
from .triton_kernels.backward import (TORCH_STAGES, KeptPlanes, Stages, pre_projection_backward,  # imports no Triton
                                      statistics)
from .weights import GMAHyper, GMAWeights

Tensor = torch.Tensor
#: how many non-weight inputs the Functions take before the folded weights (see the module docstring)
NUM_LEADING_INPUTS = 12
#: a statistics pass: (qkv, H, W, pre-BatchNorm folded weights, group) -> (mean, var, count); one that keeps
#: the planes (`prepare`'s planes_fn) returns (mean, var, count, (Z, y_all, zl or None) or None)
StatisticsFn = Callable[[Tensor, int, int, FoldedGMAWeights, object], tuple]


def fold_running_stats(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype) -> FoldedGMAWeights:
    """`folding.fold_eval` without no_grad: differentiable in the BatchNorm weight/bias and
    every other parameter (eval mode with gradients)."""
    aff = [bn_affine(w, i, hp, dtype) for i in range(4)]
    return _build(w, torch.stack([a for a, _ in aff]), torch.stack([b for _, b in aff]), dtype)


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """Sum of t over the ranks of group (the backward's two gradient sums: SyncBatchNorm's collective)."""
    import torch.distributed as dist
    out = t.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def spans_beyond_numel(t: Tensor) -> bool:
    """Does t's largest element offset (sum of (size - 1) * stride) reach past its element count
    (padding between rows, a slice of a wider buffer)?"""
    if t.numel() == 0:
        return False
    return sum((n - 1) * st for n, st in zip(t.shape, t.stride())) >= t.numel()


def prepare(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper, training: bool,
            statistics_fn: StatisticsFn = statistics, planes_fn: Optional[StatisticsFn] = None) -> tuple:
    """Steps 1 and 2 of the module docstring: the arguments of a fused backend's Function.
    statistics_fn: the statistics pass, with `backward.statistics`' signature and contract (the
    Triton backend passes its kernel, `triton_kernels.statistics.statistics`). planes_fn: a pass that
    also keeps Z and the depthwise outputs for the backward (`triton_kernels.statistics.statistics_planes`),
    run instead when a backward will follow (`backward_follows`)."""
    H, W = int(size[0]), int(size[1])
    if spans_beyond_numel(qkv):
        # a view into a wider buffer (a slice of a fused projection's output): the training kernels
        # address qkv and its gradient with 32-bit offsets that check_train_size bounds by its numel
        qkv = qkv.contiguous()
    cd = compute_dtype(qkv.dtype)
    mean: Optional[Tensor] = None
    rstd: Optional[Tensor] = None
    count: Optional[Tensor] = None
    planes = None
    group = hp.bn_process_group if training else None
    if training:
        keep_planes = planes_fn is not None and backward_follows(qkv, w)     # (before no_grad below)
        filters = fold_filters(w, cd)     # once: the statistics pass reads them, the folded weights hold them
        with torch.no_grad(), torch.autocast(qkv.device.type, enabled=False):
            # the statistics need only the depthwise/pointwise weights: the filters without the BatchNorms.
            # Not detached: no_grad covers the call, and a torch.jit.trace, which does not record no_grad,
            # replays it on inputs that need gradients, where the op (no autograd formula) refuses a
            # backward instead of the traced graph returning gradients without the batch-statistics
            # terms (tests/test_export.py::test_jit_trace_training_layer_fused)
            zero = qkv.new_zeros(1, dtype=cd)
            pre_bn = FoldedGMAWeights(bn_scale=zero, bn_shift=zero, **filters)
            if keep_planes:
                mean, var, n, planes = planes_fn(qkv.detach(), H, W, pre_bn, group)
            else:
                mean, var, n = statistics_fn(qkv.detach(), H, W, pre_bn, group)
            update_running_stats(w, hp, mean, var, n)
            rstd = torch.rsqrt(var + hp.bn_eps)
            if group is not None:
                count = n
        folded = fold_batch_stats(w, mean, var, hp, cd, filters)
    else:
        folded = fold_running_stats(w, hp, cd)
    z, y_all, zl = planes if planes is not None else (None, None, None)
    return (qkv, mean, rstd, count, z, y_all, zl, H, W, float(hp.scale), float(hp.ln_eps), group, *folded)


def backward_follows(qkv: Tensor, w: GMAWeights) -> bool:
    """Will autograd record this call (grad mode on, and qkv or a parameter needing a gradient), so that
    planes kept by the statistics pass would be read by a backward? (Training mode under no_grad, e.g.
    re-estimating BatchNorm statistics, keeps none; nor does a torch.jit.trace, whose graph is forward-only
    and whose check re-runs the call without gradients: tests/test_export.py.)"""
    if not torch.is_grad_enabled() or torch.jit.is_tracing():
        return False
    return qkv.requires_grad or any(t.requires_grad for t in w.tensors())


#: how many tensors a forward may keep beside Z and y (`KeptPlanes` after y_all: the Triton forward's, `launcher.KEPT`)
NUM_KEPT = len(KeptPlanes._fields) - 2


def save(ctx, qkv, mean, rstd, count, z, y_all, H, W, scale, ln_eps, group, weights,
         kept: Tuple[Optional[Tensor], ...] = (None,) * NUM_KEPT) -> None:
    """What every fused Function's forward keeps for `backward`; kept: what the forward itself kept of what
    the backward's recompute would make (`KeptPlanes` after y_all: the Triton forward from the kept planes),
    else Nones."""
    ctx.save_for_backward(qkv, mean, rstd, count, z, y_all, *kept, *weights)
    ctx.meta = (H, W, scale, ln_eps, group)


def saved(ctx) -> tuple:
    """(qkv, mean, rstd, count, planes or None, weights) of what `save` kept."""
    qkv, mean, rstd, count, z, y_all, *rest = ctx.saved_tensors
    planes = None if z is None else KeptPlanes(z, y_all, *rest[:NUM_KEPT])
    return qkv, mean, rstd, count, planes, rest[NUM_KEPT:]


def backward(ctx, grad_pre, stages: Stages = TORCH_STAGES) -> tuple:
    """The gradients of a fused Function's inputs (None for the non-tensor and statistics inputs);
    `stages`: the implementation of each backward stage (default: PyTorch ops)."""
    qkv, mean, rstd, count, planes, weights = saved(ctx)
    H, W, scale, ln_eps, group = ctx.meta
    reduce_sums = None if group is None else (lambda t: all_reduce_sum(t, group))
    with torch.autocast(qkv.device.type, enabled=False):
        d_qkv, grads = pre_projection_backward(grad_pre, qkv, H, W, FoldedGMAWeights(*weights), scale, ln_eps,
                                               mean, rstd, None if count is None else count.to(mean.dtype),
                                               reduce_sums, stages, planes)
    return (d_qkv,) + (None,) * (NUM_LEADING_INPUTS - 1) + tuple(grads)


def first_order_only(grads: tuple, backend: str, anchors: Callable[[], tuple]) -> tuple:
    """A fused Function's gradients, refusing a double backward: when the backward builds a graph
    (``create_graph=True``), every gradient tensor comes out through a node whose own backward raises
    an error naming the backend, and that node is linked to `anchors()` (grad_pre and the saved inputs;
    called only then: torch.utils.checkpoint lets a backward unpack its saved tensors once), so that any
    gradient of these gradients, towards the layer's input or any parameter, passes through it. The
    stages differentiate nothing themselves (kernels, and batch statistics taken as constants): a
    gradient of their gradients would miss terms, silently wrong, where this makes it an error.
    Plain backward (no graph) and torch.compile's traced backward are untouched."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    tensors = [g for g in grads if isinstance(g, Tensor)]
    if not tensors:
        return grads
    # an exact 0 connected to every anchor that is in the graph (an empty slice's sum: no inf * 0)
    links = [t.reshape(-1)[:0].sum() for t in anchors() if isinstance(t, Tensor) and t.requires_grad]
    err = torch._C._functions.DelayedError(
        (f"double backward (a gradient of a gradient: create_graph=True, then backward through its result) is "
         f"not supported by the {backend} backend's fused kernels; use backend='torch' (or 'reference') for "
         f"higher-order gradients").encode(), len(tensors))
    link = sum(links[1:], links[0]) if links else None
    out = err(*[g.detach().requires_grad_() if link is None else g.detach() + link.to(g.dtype) for g in tensors])
    out = iter(out if isinstance(out, tuple) else (out,))
    return tuple(next(out) if isinstance(g, Tensor) else g for g in grads)


class OpGrad:
    """Autograd registered on the fused ops themselves (``torch.library.register_autograd`` of
    ``gmf::triton_pre_projection`` and ``gmf::cuda_pre_projection``): the op is
    ``pre = f(qkv, weights)`` with the BatchNorms the fixed affine (bn_scale, bn_shift), so its
    backward is `pre_projection_backward` without batch-statistics terms (gradients of qkv and
    of every folded weight). The layers train through the Functions above instead, which add
    the batch-statistics terms and make the folded weights differentiable in the parameters."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, H, W, weights, scale, ln_eps = inputs
        ctx.save_for_backward(qkv, *weights)
        ctx.meta = (H, W, scale, ln_eps)

    @staticmethod
    def backward(ctx, grad_pre):
        qkv, *weights = ctx.saved_tensors
        H, W, scale, ln_eps = ctx.meta
        # `loss.backward()` inside `torch.autocast` runs with autocast on: the stages choose their
        # own precisions, as `backward` and the fused backward ops do
        with torch.autocast(qkv.device.type, enabled=False):
            d_qkv, grads = pre_projection_backward(grad_pre, qkv, H, W, FoldedGMAWeights(*weights), scale, ln_eps)
        return d_qkv, None, None, list(grads), None, None
