"""Training and gradients on the Triton backend: its autograd Function.

    pre = triton_train_pre_projection(qkv, (H, W), w, hp, training)

Used by the Triton backend whenever a call trains (BatchNorm batch statistics) or needs
gradients; eval without gradients keeps the plain ``gmf::triton_pre_projection`` op. The
statistics pass, the running statistics, the differentiable folding and the backward stages
are shared with the CUDA backend (`gmf_kernels/training.py`, which says what each does and what
is saved); the forward of both modes is the eval-mode Triton kernels on the folded weights,
and the training statistics pass is the Triton kernel of `statistics.py` (op
``gmf::triton_z_moments``, opaque to torch.compile: compiled training runs it too).
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch

from .. import training
from ..weights import GMAHyper, GMAWeights
from ..folding import FoldedGMAWeights
from .backward import TORCH_STAGES, KeptPlanes, Stages, pre_projection_backward
from ._common import DotVariant
from . import aggregation_backward as agb
from . import attention_backward as ab
from . import recompute as rcp  # (these three register their tuning families, `tile_spaces`)
from .aggregation_backward import BACKWARD_FAMILY, BackwardTiles, tiles_of
from . import tile_spaces
from .config import backward_kernels_take, check_train_size
from . import op as _op  # noqa: F401  (registers gmf::triton_pre_projection)
from .dense_z import planes_without_y   # (registers gmf::triton_dense_z_moments_planes)
from .statistics import backward_dots, statistics, statistics_planes  # the statistics pass as a kernel (registers
#                       gmf::triton_z_moments, and gmf::triton_proxy_z, the recompute's first launch)

Tensor = torch.Tensor


class TritonPreProjectionFunction(torch.autograd.Function):
    """pre = Triton kernels(qkv, folded weights); backward = `training.backward` (its inputs:
    `training`'s module docstring). Where the statistics pass kept the planes (z), the forward reads
    segments 1-3 from Z instead of running their stencils a second time
    (``gmf::triton_pre_projection_from_planes``), and where its dense form computed the local branch's Z (zl),
    that too."""

    @staticmethod
    def forward(ctx, qkv, mean, rstd, count, z, y_all, zl, H, W, scale, ln_eps, group, *weights):
        if z is not None:   # [pre, *what the backward's recompute would make] (`launcher.KEPT`); no w4 for a
            #                 backward in the dense form (`aggregation_backward.tuned_dense_b3`), which reads none;
            #                 zl: the local branch's Z from the dense statistics pass (not saved)
            pre, *kept = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, H, W, list(weights), scale, ln_eps,
                                                                         not agb.tuned_dense_b3(qkv), zl)
        else:
            pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, list(weights), scale, ln_eps)
            kept = (None,) * training.NUM_KEPT
        training.save(ctx, qkv, mean, rstd, count, z, y_all, H, W, scale, ln_eps, group, weights, tuple(kept))
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        return training.first_order_only(kernel_backward(ctx, grad_pre), "triton",
                                         lambda: (grad_pre, *ctx.saved_tensors))


def kernel_backward(ctx, grad_pre) -> tuple:
    """`training.backward` on the Triton stages: the backward of both fused backends' Functions
    whenever the Triton kernels run (`training.save` filled ctx)."""
    H, W, scale, ln_eps, group = ctx.meta
    if group is None:   # the usual case: the whole backward as ONE op (opaque to torch.compile)
        qkv, mean, rstd, _, planes, weights = training.saved(ctx)
        d_qkv, *grads = torch.ops.gmf.triton_pre_projection_backward(grad_pre, qkv, H, W, weights, scale, ln_eps,
                                                                     mean, rstd, *(planes or ()))
        return (d_qkv,) + (None,) * (training.NUM_LEADING_INPUTS - 1) + tuple(grads)
    # SyncBatchNorm: an all-reduce between B2 and B3, so the stages are called one by one; under
    # torch.compile the PyTorch stages (the interpreter's kernels cannot be traced)
    qkv = ctx.saved_tensors[0]
    stages = TORCH_STAGES if torch.compiler.is_compiling() else stages_for(qkv)
    return training.backward(ctx, grad_pre, stages)


@torch.library.custom_op("gmf::triton_pre_projection_backward", mutates_args=())
def triton_pre_projection_backward(grad_pre: Tensor, qkv: Tensor, H: int, W: int, weights: List[Tensor],
                                   scale: float, ln_eps: float, mean: Optional[Tensor],
                                   rstd: Optional[Tensor], z: Optional[Tensor] = None,
                                   y_all: Optional[Tensor] = None, w4: Optional[Tensor] = None,
                                   xh4: Optional[Tensor] = None, rstd4: Optional[Tensor] = None,
                                   R: Optional[Tensor] = None, kv: Optional[Tensor] = None,
                                   k_max: Optional[Tensor] = None, k_sum: Optional[Tensor] = None) -> List[Tensor]:
    """[d_qkv, *the folded weights' gradients] (contiguous, none aliasing another) of `backward.pre_projection_backward` on
    the Triton stages (`triton_stages`), batch statistics mean / rstd or None (running statistics):
    one op, so that torch.compile keeps the backward one opaque node (the Triton interpreter's
    kernels cannot be traced; on a GPU the op spares Dynamo the launchers' planning code). z, y_all: the
    planes the training forward's statistics pass kept (`statistics.statistics_planes`), or None
    (recomputed); w4 .. k_sum: what the forward that read z kept (`backward.KeptPlanes`), or None."""
    check_train_size(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    with torch.autocast(qkv.device.type, enabled=False):
        d_qkv, grads = pre_projection_backward(grad_pre, qkv, H, W, FoldedGMAWeights(*weights), scale, ln_eps,
                                               mean, rstd, None, None, stages_for(qkv),
                                               None if z is None else KeptPlanes(z, y_all, w4, xh4, rstd4, R, kv,
                                                                                 k_max, k_sum))
    return distinct_outputs([d_qkv] + list(grads), [grad_pre, qkv, *weights, mean, rstd])


def distinct_outputs(outputs: List[Tensor], inputs: List[Optional[Tensor]]) -> List[Tensor]:
    """outputs as a custom op may return them: contiguous (the strides its fake gives), none sharing
    storage with another output or an input. Some weight gradients are views of one buffer of sums
    (bn_scale's and bn_shift's) or slices of a padded one: those are copied, the others, fresh
    tensors of their own, returned as they are (a copy of every gradient was 14 more small kernels a
    layer)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    out = []
    for t in outputs:
        key = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or key in seen:
            t = t.clone(memory_format=torch.contiguous_format)
            key = t.untyped_storage().data_ptr()
        seen.add(key)
        out.append(t)
    return out


@triton_pre_projection_backward.register_fake
def _(grad_pre, qkv, H, W, weights, scale, ln_eps, mean, rstd, z=None, y_all=None, w4=None, xh4=None, rstd4=None,
      R=None, kv=None, k_max=None, k_sum=None):
    return [torch.empty_like(qkv, memory_format=torch.contiguous_format)] + [
        torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]


class TrainTiles(NamedTuple):
    """The tiles of one backward call's B1, B2 and aggregation-backward kernels (None: the
    module's default). The statistics pass and the recompute look theirs up themselves
    (`tile_spaces.tuned_tiles` of the layer's qkv)."""
    b1: Optional[Tuple[int, int]] = None
    b2: Optional[Tuple[int, int]] = None
    b2_crpe: Optional[Tuple[int, int, int]] = None
    backward: Optional[BackwardTiles] = None


def train_tiles(qkv: Tensor) -> TrainTiles:
    """The tuning table's tiles (`gmf_kernels.tuning`, families of `tile_spaces`) for a backward
    of the layer whose input is qkv, on its GPU, width and dtype; every field None off CUDA and
    under the interpreter."""
    C = qkv.shape[-1] // 3
    bw = tile_spaces.tuned_tiles(BACKWARD_FAMILY, C, qkv)
    return TrainTiles(b1=tile_spaces.tuned_tiles(ab.B1_FAMILY, C, qkv), b2=tile_spaces.tuned_tiles(ab.B2_FAMILY, C, qkv),
                      b2_crpe=tile_spaces.tuned_tiles(ab.CRPE_FAMILY, C, qkv),
                      backward=None if bw is None else tiles_of(bw))


def stages_for(qkv: Tensor) -> Stages:
    """The Triton stages of the backward of the layer whose input is qkv: `triton_stages` with its
    segment width, its dots (`statistics.backward_dots`) and its tuned tiles (`train_tiles`)."""
    return triton_stages(qkv.shape[-1] // 15, backward_dots(qkv), train_tiles(qkv))


def triton_stages(s: int, dots: DotVariant, tiles: Optional[TrainTiles] = None) -> Stages:
    """The backward stages for segment width s and the backward's dot variant
    (`statistics.backward_dots` of the layer's qkv: the forward's, one TF32 pass for fp16/bf16
    on sm_80+), bound into every stage that runs dots: Triton kernels where
    `config.backward_kernels_take` (the stage tensors in the layer's dtype, `config.stage_dtype`): B1 and B2
    (attention_backward.py: dKV, dQ/dK/dV, the CRPE input and weight gradients, with the
    BatchNorm/hardswish backward fused in: G and its sums, `Stages.b2_fused_bn`), B3 (dZ fused into the pointwise kernel, or written first
    at S_PAD 128) and the depthwise stencils, and the local branch
    (aggregation_backward.py), and the recompute of what they read (recompute.py: Z, V, y by
    statistics.py's `gma_recompute_z_kernel`, the softmax statistics, KV and the CRPE, the local
    branch); elsewhere (S_PAD 128 with sm_70/75's FMA dots, where those kernels spill) the
    PyTorch stages. tiles: B1's, B2's and the aggregation backward's (`train_tiles`; default
    the modules' own)."""
    if not backward_kernels_take(s, dots.precision):
        return TORCH_STAGES

    tiles = tiles or TrainTiles()

    def bind(stage, **kw):
        return functools.partial(stage, dots=dots, **kw)
    return Stages(b1_dkv=bind(ab.b1_stage, tile=tiles.b1), b2_proxy_grads=bind(ab.b2_proxy_grads,
                                                                              tiles=(tiles.b2, tiles.b2_crpe),
                                                                              wgrad_tiles=tiles.backward),
                  b2_bn_sums=None,
                  b3=bind(agb.b3_fused, tiles=tiles.backward), local_backward=bind(agb.local_backward,
                                                                                   tiles=tiles.backward),
                  recompute=rcp.recompute, into_d_qkv=True, grad_pre_as_is=True, b2_fused_bn=True,
                  takes_planes=True)


def triton_train_pre_projection(qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                                training_mode: bool) -> Tensor:
    """The Triton pre-projection with autograd, in training (batch statistics) or eval mode."""
    return TritonPreProjectionFunction.apply(*training.prepare(qkv, size, w, hp, training_mode,
                                                               statistics_fn=statistics,
                                                               planes_fn=planes_fn_for(qkv)))


def planes_fn_for(qkv: Tensor, local: bool = True):
    """The statistics pass that keeps Z and y for the backward (`statistics.statistics_planes`) where the
    backward of the layer whose input is qkv runs the Triton stages, which read them
    (`Stages.takes_planes`); without y where that backward runs B3's dense form (`tuned_dense_b3`), which reads
    none, and then in the dense form itself where it applies (`dense_z.dense_statistics_planes`), which with
    `local` (a Triton forward: it reads it) computes the local branch's Z too; None where it runs the PyTorch
    stages (they recompute their own)."""
    if qkv.dtype == torch.float64:      # the PyTorch stages (`recompute.recompute`)
        return None
    if not triton_stages(qkv.shape[-1] // 15, backward_dots(qkv)).takes_planes:
        return None
    if not agb.tuned_dense_b3(qkv):
        return statistics_planes
    return planes_without_y(qkv, local)     # on tensor cores too where the dense form applies (dense_z.py)
