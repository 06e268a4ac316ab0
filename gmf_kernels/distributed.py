"""Aggregator BatchNorm statistics across processes: upstream's SyncBatchNorm semantics.

Upstream trains with `torch.nn.SyncBatchNorm` in the aggregator: in training mode the batch
statistics of norm0..norm3 are taken over the images of every process. This module holds
what the layers need for that, and nothing else:

* `layer_group(norm, explicit)`: the process group one aggregator BatchNorm synchronises
  over, or None, decided as `SyncBatchNorm.forward` decides it: only in training mode,
  only for a `SyncBatchNorm` (its own `process_group`, else the default group) or when the
  caller gave a group explicitly.
* `resolve_group(group)`: None when there is nothing to synchronise (no group asked for,
  torch.distributed unavailable or not initialised, this rank outside the group, or a
  group of one rank) -- then the layer behaves exactly like BatchNorm, as torch's
  SyncBatchNorm does -- else the group.
* `all_reduce_sum(t, group)`: a differentiable sum over the ranks. Its backward is the
  same sum of the incoming gradients (the loss being the sum of every rank's loss, the
  gradient of a summed statistic is the sum of the ranks' gradients), itself differentiable
  (a gradient of a gradient, create_graph=True, sums across the ranks again). Under
  torch.compile the sum is a functional collective (`_functional_collectives.all_reduce`),
  which Dynamo traces (an in-place `dist.all_reduce` broke fullgraph compilation).
* `sync_batch_stats(x, dims, group)`: (mean, biased var, count) of x over `dims` and over
  every rank: ONE all-reduce of (sum, sum of squares, count) in forward and, through
  `all_reduce_sum`, ONE all-reduce of the two gradient sums in backward -- the
  collectives SyncBatchNorm performs. Each rank's sums are its float64 sum s1 and, from its own
  variance (`torch.var`, stable), n var + s1^2 / n in float64, so
  E[x^2] - E[x]^2 loses nothing measurable (cancellation ~1e-16 * mean^2 / var; squares of
  float32 values summed instead lost 2.5e-3 of the variance at mean 1000, std 1).
* `sync_batch_moments(s1, s2, count, group)`: the same from sums a caller already has (the
  Triton statistics kernel's per-rank (count, mean, M2), as float64 sums).

Gradients of the BatchNorm weight and bias stay per rank, as in SyncBatchNorm: the data
parallel wrapper (DistributedDataParallel) all-reduces parameter gradients.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

Tensor = torch.Tensor


def dist_ready() -> bool:
    """torch.distributed is built in and a default process group is initialised."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def layer_group(norm, explicit=None):
    """The process group aggregator BatchNorm `norm` synchronises its batch statistics over
    in this call, or None (not resolved yet: see `resolve_group`).

    As `torch.nn.SyncBatchNorm.forward`: statistics are synchronised only in training mode
    (never in eval, not even for a BatchNorm without running statistics); a SyncBatchNorm
    uses its own `process_group`, else the default (WORLD) group. An `explicit` group (the
    layer's `process_group=` argument) applies to every aggregator BatchNorm, plain
    BatchNorm2d included.
    """
    if not norm.training:
        return None
    if explicit is not None:
        return explicit
    if isinstance(norm, torch.nn.SyncBatchNorm):
        if norm.process_group is not None:
            return norm.process_group
        if dist_ready():
            import torch.distributed as dist
            return dist.group.WORLD
    return None


def resolve_group(group):
    """`group` when its batch statistics must be all-reduced, else None (plain BatchNorm)."""
    if group is None or not dist_ready():
        return None
    import torch.distributed as dist
    if dist.get_world_size(group) <= 1:  # one rank, or this rank outside the group (-1)
        return None
    return group


def _sum_over_ranks(t: Tensor, group) -> Tensor:
    """A new tensor: t summed over the ranks of `group` (no autograd)."""
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol
        return funcol.all_reduce(t, "sum", group)
    import torch.distributed as dist
    out = t.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of `group`; the backward sums the incoming gradients the same way, through
    this Function again, so that a backward that builds a graph (create_graph=True) records it."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return _sum_over_ranks(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """Differentiable sum of t over the ranks of group (every rank must call it)."""
    return _AllReduceSum.apply(t, group)


def sync_batch_stats(x: Tensor, dims: Sequence[int], group) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased variance, count) of x over `dims` on every rank of `group`, as float64.

    The reduced shape is x's shape without `dims`. One all-reduce of [sum, sum of squares,
    count]; `count` (a float64 scalar tensor, no host synchronisation) is the number of
    values per channel over all ranks; the ranks' shares may differ (a smaller last batch).
    """
    dims = tuple(d % x.dim() for d in dims)
    f64 = torch.float64
    n = 1
    for d in dims:      # (a plain loop: Dynamo cannot trace math.prod over a generator)
        n *= x.shape[d]
    xs = x if x.dtype in (f64, torch.float32) else x.float()   # a float16 variance overflows
    s1 = xs.sum(dim=dims, dtype=f64)                           # the sum itself to float64 accuracy
    if n == 0:   # an empty batch on this rank: it joins the all-reduce with count 0 (torch.var would be NaN)
        return sync_batch_moments(s1, torch.zeros_like(s1), 0, group)
    var = torch.var(xs, dim=dims, unbiased=False)             # this rank's, stable (about its own mean)
    return sync_batch_moments(s1, (var.to(f64) + (s1 / n).square()) * n, n, group)


def sync_batch_moments(s1: Tensor, s2: Tensor, local_count, group) -> Tuple[Tensor, Tensor, Tensor]:
    """`sync_batch_stats` from this rank's float64 sums: s1 = sum of x, s2 = sum of x^2 per
    channel over `local_count` values (an int). The ONE all-reduce of [s1, s2, count]; returns
    (mean, biased variance, count) over every rank, float64, s1's shape. The statistics
    kernel (`triton_kernels/statistics.py`) calls this with s1 = n mean, s2 = M2 + n mean^2
    from its (count, mean, M2)."""
    packed = torch.cat([s1.reshape(-1), s2.reshape(-1), s1.new_full((1,), float(local_count))])
    tot = all_reduce_sum(packed, group)
    k = s1.numel()
    count = tot[-1].detach()
    mean = tot[:k].view(s1.shape) / count
    var = (tot[k:2 * k].view(s1.shape) / count - mean.square()).clamp_min(0.0)
    return mean, var, count

