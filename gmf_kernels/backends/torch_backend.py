"""Backend "torch": the fast pure-PyTorch formulation (CPU default, torch.compile's input).

Same function as the reference, in fewer and larger calls and without split/cat copies:

* `project_qkv`: the rows of the qkv weight are permuted (once, cached) so that the projection comes
  out **segment-major**: channels [seg0 q,k,v | seg1 q,k,v | ... | seg4 q,k,v]. Read as a
  channels-last image (a free view of the (B, N, 15s) tokens), every segment is then a
  contiguous channel range and no split/cat/permute is ever materialised.
* ONE depthwise 7x7 call covers all 15s channels: identity (centre tap) for segment 0,
  the 3x3/5x5/7x7 kernels (zero-padded to 7x7, shared by q, k, v) for segments 1-3 and
  the local branch's 3x3 for segment 4.
* ONE batched matmul (15 blocks of s -> s) does every pointwise: diag(BN0) for
  segment 0, pointwise with BatchNorm folded (eval) for segments 1-3, and the local
  branch's 3s -> s split in three s -> s blocks, summed after.
* Factorized attention as two einsums on strided views; CRPE as ONE depthwise 7x7 call.

In training mode the BatchNorms use batch statistics over q, k, v (3B images) from a
single var_mean over a view, and update the running statistics like nn.BatchNorm2d. With a
process group (upstream's SyncBatchNorm, `GMAHyper.bn_process_group`) the statistics of the
four BatchNorms come from ONE all-reduce of (sum, sum of squares, count) over the ranks, and
the backward all-reduces the two gradient sums once (`gmf_kernels/distributed.py`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..distributed import sync_batch_stats
from ..folding import bn_affine, cached_derived, update_running_stats
from ..weights import GMAHyper, GMAWeights
from .base import Backend

Tensor = torch.Tensor


def _pad_to7(k: Tensor) -> Tensor:
    """(c, 1, k, k) -> (c, 1, 7, 7), zero-padded around the centre."""
    p = (7 - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p))


class _Packed(NamedTuple):
    dw: Tensor              # (15s, 1, 7, 7)
    pw: Tensor              # (15s, s, 1, 1): groups of s
    pw_bias: Tensor         # (15s) or None (training: no fold)
    crpe_w: Tensor          # (C', 1, 7, 7)
    crpe_b: Tensor          # (C')


def _segment_major(C: int, s: int, device) -> Tensor:
    """Row permutation taking upstream order (q|k|v, each seg0..4) to segment-major order."""
    return torch.arange(3 * C, device=device).view(3, 5, s).transpose(0, 1).reshape(-1)


def _segment_major_qkv(w: GMAWeights, dtype: torch.dtype):
    """The qkv weight and bias with their rows in segment-major order, in `dtype`."""
    perm = _segment_major(w.dim, w.dim // 5, w.qkv_weight.device)
    bias = None if w.qkv_bias is None else w.qkv_bias[perm].to(dtype)
    return w.qkv_weight[perm].to(dtype).contiguous(), bias


def _pack(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype, fold_bn: bool) -> _Packed:
    C = w.dim
    s = C // 5
    dev = w.qkv_weight.device
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    eye = torch.eye(s, device=dev, dtype=cd)
    centre = torch.zeros(s, 1, 7, 7, device=dev, dtype=cd)
    centre[:, 0, 3, 3] = 1
    dws = [centre] + [_pad_to7(k.to(cd)) for k in w.dw_weight] + [_pad_to7(w.local_dw_weight.to(cd))]
    dw = torch.cat([t.repeat(3, 1, 1, 1) for t in dws[:4]] + [dws[4]])          # (15s,1,7,7)
    lp = w.local_pw_weight.to(cd).flatten(1)                                      # (s, 3s)
    local_blocks = [lp[:, i * s:(i + 1) * s] for i in range(3)]
    if fold_bn:
        affine = [bn_affine(w, i, hp, cd) for i in range(4)]
        seg_w = [affine[0][0][:, None] * eye] + [  # (not torch.diag: the legacy ONNX exporter lacks it)
                                               affine[j][0][:, None] * w.pw_weight[j - 1].to(cd).flatten(1)
                                               for j in (1, 2, 3)]
        seg_b = [affine[j][1] for j in range(4)]
        pw_bias = torch.cat([b.repeat(3) for b in seg_b] + [torch.zeros(3 * s, device=dev, dtype=cd)])
    else:
        seg_w = [eye] + [w.pw_weight[j - 1].to(cd).flatten(1) for j in (1, 2, 3)]
        pw_bias = None
    pw = torch.cat([m.repeat(3, 1) for m in seg_w] + local_blocks)[:, :, None, None]  # (15s,s,1,1)
    cast = lambda t: None if t is None else t.to(dtype).contiguous()
    return _Packed(cast(dw), cast(pw), cast(pw_bias),
                   cast(torch.cat([_pad_to7(k.to(cd)) for k in w.crpe_weight])),
                   cast(torch.cat(list(w.crpe_bias)).to(cd)))


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _needs_grad(t: Tensor, w: GMAWeights) -> bool:
    return torch.is_grad_enabled() and (t.requires_grad or any(p.requires_grad for p in w.tensors()))


def _batch_norm_train(z: Tensor, w: GMAWeights, hp: GMAHyper) -> Tensor:
    """Training BatchNorm of segments 0-3 on z (B, N, 4, 3, s): statistics over B, N and q/k/v,
    and over every rank of hp.bn_process_group when one is set (SyncBatchNorm semantics)."""
    dtype = z.dtype
    if hp.bn_process_group is None:
        var, mean = torch.var_mean(z, dim=(0, 1, 3), unbiased=False)              # (4, s)
        stat_mean, stat_var, n = mean, var, z.numel() // mean.numel()             # n >= 3 (3B images)
    else:
        # ONE all-reduce of (sum, sum of squares, count) in forward and, through autograd,
        # ONE of the two gradient sums in backward: SyncBatchNorm's collectives, for all 4 BNs
        stat_mean, stat_var, n = sync_batch_stats(z, (0, 1, 3), hp.bn_process_group)  # float64; n global
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        mean, var, z = stat_mean.to(cd), stat_var.to(cd), z.to(cd)
    gamma = torch.stack(list(w.bn_weight))
    beta = torch.stack(list(w.bn_bias))
    y = (z - mean[:, None]) * (torch.rsqrt(var + hp.bn_eps) * gamma)[:, None] + beta[:, None]
    if hp.bn_process_group is not None:
        y = y.to(dtype)
    update_running_stats(w, hp, stat_mean, stat_var, n)
    return y


def torch_pre_projection(t: Tensor, size, w: GMAWeights, hp: GMAHyper, training: bool) -> Tensor:
    """Segment-major qkv t (B, N, 15s) -> pre-projection tokens (B, N, C)."""
    B, N, C3 = t.shape
    H, W = size
    s = C3 // 15
    cp = 4 * s
    d = cp // hp.num_heads
    if training or _needs_grad(t, w):
        pk = _pack(w, hp, t.dtype, fold_bn=not training)  # differentiable: rebuilt every call
    else:
        pk = cached_derived(w, ("torch-packed", t.dtype, hp), lambda: _no_grad(_pack, w, hp, t.dtype, True))

    img = t.view(B, H, W, 15 * s).permute(0, 3, 1, 2)                              # channels-last view
    z = F.conv2d(img, pk.dw, None, padding=3, groups=15 * s)                       # channels-last out
    z = z.permute(0, 2, 3, 1).reshape(B * N, 15, s)                                # free when channels-last
    # the 15 pointwise blocks as one batched matmul (a grouped 1x1 conv takes a slow per-group path on CPU)
    z = torch.bmm(z.transpose(0, 1), pk.pw.view(15, s, s).transpose(1, 2))           # (15, B*N, s)
    if pk.pw_bias is not None:
        z = z + pk.pw_bias.view(15, 1, s)
    z = z.view(5, 3, B, N, s).permute(2, 3, 0, 1, 4)                                # (B, N, 5, 3, s) view
    seg = z[:, :, :4]
    if training:
        seg = _batch_norm_train(seg, w, hp)
    P = F.hardswish(seg)                                                           # (B, N, 4, 3, s)
    loc = z[:, :, 4].sum(dim=2)                                                    # (B, N, s)
    loc = F.hardswish(F.layer_norm(loc, (s,), w.local_ln_weight, w.local_ln_bias, hp.ln_eps))

    # heads: segment j holds heads 2j, 2j+1 -> view (B, N, 4, 2, d)
    Q = P[:, :, :, 0].unflatten(-1, (2, d))
    K = P[:, :, :, 1].unflatten(-1, (2, d))
    V = P[:, :, :, 2].unflatten(-1, (2, d))
    Ks = K.softmax(dim=1)
    KV = torch.einsum("bnjti,bnjtk->bjtik", Ks, V)
    E = torch.einsum("bnjti,bjtik->bnjtk", Q, KV)
    v_img = P[:, :, :, 2].reshape(B, H, W, cp).permute(0, 3, 1, 2)
    conv_v = F.conv2d(v_img, pk.crpe_w, pk.crpe_b, padding=3, groups=cp)
    conv_v = conv_v.permute(0, 2, 3, 1).reshape(B, N, 4, 2, d)
    A = (hp.scale * E + Q * conv_v).reshape(B, N, cp)
    return torch.cat([A, loc], dim=-1)


class TorchBackend(Backend):
    def project_qkv(self, x, w, hp, training):
        """The qkv linear with its rows permuted to segment-major order (see the module docstring)."""
        if _needs_grad(x, w):
            weight, bias = _segment_major_qkv(w, x.dtype)  # differentiable gather
        else:
            weight, bias = cached_derived(w, ("torch-qkv", x.dtype), lambda: _no_grad(_segment_major_qkv, w, x.dtype))
        return F.linear(x, weight, bias)

    def pre_projection(self, qkv, size, w, hp, training):
        return torch_pre_projection(qkv, size, w, hp, training)


BACKEND = TorchBackend(
    name="torch",
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    device_types=frozenset({"cpu", "cuda"}),
    supports_training=True,
    supports_grad=True,
    supports_sync_bn=True,
)
