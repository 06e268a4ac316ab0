"""Backward of the fused pre-projection (qkv -> pre), stage by stage, in PyTorch ops.

Every stage below is written with PyTorch ops, in the decomposition the backward kernels
follow, one function per stage: the oracle the Triton backward kernels are tested against
(attention_backward.py: B1, B2; aggregation_backward.py: the BatchNorm sums, B3, the local
branch; `train_op.triton_stages` picks them), and the CUDA backend's backward until it has
kernels (`TORCH_STAGES`). `recompute` is the PyTorch stage set's (`Stages.recompute`: the
Triton set's is recompute.py, kernels producing the same tensors; the oracle of those);
`statistics` (PyTorch ops) is the CUDA backend's statistics pass and the oracle of the Triton
backend's kernel (statistics.py).

* ``recompute``        : what the forward kernels do not save, recomputed from qkv and the
                         folded weights: Z (segments 0..3 of q, k, v before the BatchNorm
                         affine: segment 0 itself, 1..3 pointwise(depthwise)), the proxies
                         P = hardswish(Z * bn_scale + bn_shift), the softmax over tokens Ks
                         of K, KV = Ks^T V, the CRPE R = conv(V) and the local branch's
                         pointwise output / normalised values (``statistics`` reuses its
                         Z part: the training forward's statistics pass).
* ``b1_dkv``           : B1, dKV = scale * Q^T dA (a reduction over tokens).
* ``b2_proxy_grads``   : B2, per token: dQ, dK (softmax backward), dV (+ CRPE input
                         gradient) and the CRPE weight/bias gradients.
* ``b2_bn_sums``       : B2, G = dP * hardswish'(pre-activation) and its per-channel
                         sums sum(G), sum(G * Zhat), sum(G * Z) (the BatchNorm gradients).
* ``b3_dz``            : B3, dZ: a * G, minus the batch-statistics terms in training mode.
* ``b3_pointwise_depthwise``: B3, input gradients of segments 0..3 through the pointwise
                         and depthwise convolutions, and their weight gradients.
* ``local_backward``   : the local branch: hardswish, LayerNorm, pointwise, depthwise.

`pre_projection_backward` runs them in order and returns the gradient of qkv and of every
folded weight (`folding.WEIGHT_NAMES` order). Everything is computed in the compute dtype
(float32 for float16/bfloat16/float32 inputs).

Layouts: images channels-first; q, k, v stacked on the batch axis as 3B images (upstream's
order); Z and P are (3B, 4s, H, W) with channel j*s + c (segment j) = the proxy channel
head*d + i; attention tensors are (B, 8, d, N).
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..folding import FoldedGMAWeights, channels_first, taps_first

Tensor = torch.Tensor


# ---------------------------------------------------------------- small pieces
def dwconv(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Depthwise 'same' convolution of x (B, c, H, W) with the tap-major folded weight w (k, k, c)."""
    k = w.shape[0]
    return F.conv2d(x, channels_first(w)[:, None], bias, padding=k // 2, groups=x.shape[1])


def dwconv_input_grad(g: Tensor, w: Tensor) -> Tensor:
    """Adjoint of `dwconv` with respect to its input: correlation with the flipped kernel."""
    k = w.shape[0]
    return F.conv2d(g, channels_first(w).flip(-1, -2)[:, None], None, padding=k // 2, groups=g.shape[1])


def dwconv_weight_grad(g: Tensor, x: Tensor, k: int) -> Tensor:
    """dW[ky, kx, c] = sum_{b,y,x} g[b,c,y,x] * x[b,c,y+ky-r,x+kx-r]: (k, k, c), tap-major as the
    folded weights."""
    c = x.shape[1]
    return taps_first(torch.nn.grad.conv2d_weight(x, (c, 1, k, k), g, padding=k // 2, groups=c)[:, 0])


def pointwise(x: Tensor, w: Tensor) -> Tensor:
    """1x1 convolution: x (B, i, H, W), w (o, i) -> (B, o, H, W)."""
    return F.conv2d(x, w[:, :, None, None])


def token_mix(a: Tensor, b: Tensor) -> Tensor:
    """The product over tokens per head: a (B, 8, i, N), b (B, 8, k, N) -> a b^T (B, 8, i, k)."""
    return torch.einsum("bhin,bhkn->bhik", a, b)


def hardswish_grad(x: Tensor) -> Tensor:
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))


def crpe_groups(d: int) -> List[Tuple[int, int]]:
    """Channel ranges of V using the 3x3, 5x5 and 7x7 CRPE kernels (heads 0-1, 2-4, 5-7)."""
    return [(0, 2 * d), (2 * d, 5 * d), (5 * d, 8 * d)]


def segment_streams(qkv: Tensor, H: int, W: int, dtype: torch.dtype) -> Tensor:
    """qkv (B, N, 3C) -> (3, B, 5, s, H, W) in `dtype`: q, k, v, their 5 segments, as images."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    return qkv.to(dtype).reshape(B, H, W, 3, 5, s).permute(3, 0, 4, 5, 1, 2)


def qkv_from_streams(g: Tensor) -> Tensor:
    """Inverse layout of `segment_streams`: (3, B, 5, s, H, W) -> (B, N, 3C)."""
    _, B, _, s, H, W = g.shape
    return g.permute(1, 4, 5, 0, 2, 3).reshape(B, H * W, 15 * s)


# ---------------------------------------------------------------- forward pieces
def proxy_z(streams: Tensor, wts: FoldedGMAWeights) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Z (3B, 4s, H, W): segments 0..3 before the BatchNorm affine, with the depthwise inputs
    u_j and outputs (pointwise inputs) y_j of segments 1..3 (3B, s, H, W) for the backward."""
    _, B, _, s, H, W = streams.shape
    u = [streams[:, :, j].reshape(3 * B, s, H, W) for j in range(4)]
    dws = (wts.dw3, wts.dw5, wts.dw7)
    y = [dwconv(u[j], dws[j - 1]) for j in (1, 2, 3)]
    Z = torch.cat([u[0]] + [pointwise(y[j - 1], wts.pw[j - 1]) for j in (1, 2, 3)], dim=1)
    return Z, u, y


def statistics(qkv: Tensor, H: int, W: int, wts: FoldedGMAWeights, group=None):
    """The training forward's statistics pass: per-channel (mean, biased variance) of Z over the
    3B images x H x W, as (4, s) in the weights' dtype, and the count of values per channel.

    group: a process group (SyncBatchNorm): the statistics are then those of every rank's images,
    from ONE all-reduce of (sum, sum of squares, count) (`distributed.sync_batch_stats`), and the
    count is a float64 scalar tensor.

    PyTorch ops materialising Z: the CUDA backend's pass and the oracle of the Triton backend's
    kernel (`triton_kernels/statistics.py`, same contract, `training.prepare(statistics_fn=...)`)."""
    streams = segment_streams(qkv, H, W, wts.pw.dtype)
    Z, _, _ = proxy_z(streams, wts)
    s = Z.shape[1] // 4
    if group is not None:
        from ..distributed import sync_batch_stats
        mean, var, count = sync_batch_stats(Z, (0, 2, 3), group)
        return mean.to(Z.dtype).view(4, s), var.to(Z.dtype).view(4, s), count
    var, mean = torch.var_mean(Z, dim=(0, 2, 3), unbiased=False)
    return mean.view(4, s), var.view(4, s), Z.numel() // Z.shape[1]


def crpe(V: Tensor, wts: FoldedGMAWeights, d: int) -> Tensor:
    """CRPE conv(V) with bias, V (B, C', H, W)."""
    ws = (wts.crpe_w3, wts.crpe_w5, wts.crpe_w7)
    return torch.cat([dwconv(V[:, a:b], w, wts.crpe_b[a:b]) for (a, b), w in zip(crpe_groups(d), ws)], dim=1)


def recompute(qkv: Tensor, H: int, W: int, wts: FoldedGMAWeights, ln_eps: float) -> Dict[str, Tensor]:
    """Everything the backward needs that the forward kernels did not keep, in PyTorch ops (the
    PyTorch stage set's `Stages.recompute`; the Triton set's is recompute.py's kernels)."""
    dt = wts.pw.dtype
    streams = segment_streams(qkv, H, W, dt)
    _, B, _, s, _, _ = streams.shape
    d, N = s // 2, H * W
    Z, u, y = proxy_z(streams, wts)
    pre_act = Z * wts.bn_scale.reshape(-1)[:, None, None] + wts.bn_shift.reshape(-1)[:, None, None]
    P = F.hardswish(pre_act)
    K, V = P[B:2 * B], P[2 * B:]
    Kh, Vh = K.reshape(B, 8, d, N), V.reshape(B, 8, d, N)
    Ks = torch.softmax(Kh, dim=-1)
    KV = token_mix(Ks, Vh)
    R = crpe(V, wts, d)
    # local branch
    u4 = streams[:, :, 4].transpose(0, 1).reshape(B, 3 * s, H, W)
    w4 = dwconv(u4, wts.local_dw)
    z4 = pointwise(w4, wts.local_pw)
    v4, m4 = torch.var_mean(z4, dim=1, unbiased=False, keepdim=True)
    rstd4 = torch.rsqrt(v4 + ln_eps)
    xh4 = (z4 - m4) * rstd4
    return dict(streams=streams, Z=Z, u=u, y=y, pre_act=pre_act, P=P, V=V, Ks=Ks, KV=KV, R=R,
                u4=u4, w4=w4, xh4=xh4, rstd4=rstd4)


# ---------------------------------------------------------------- backward stages
def b1_dkv(Q: Tensor, dA: Tensor, scale: float) -> Tensor:
    """B1: dKV[b,h,i,k] = scale * sum_n Q[b,h,i,n] dA[b,h,k,n]; Q, dA (B, 8, d, N)."""
    return scale * token_mix(Q, dA)


def b2_proxy_grads(dA: Tensor, dKV: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, scale: float
                   ) -> Tuple[Tensor, List[Tensor], Tensor]:
    """B2: dP (3B, C', H, W) = [dQ; dK; dV], the CRPE weight gradients (3x3, 5x5, 7x7) and bias gradient."""
    P, Ks, KV, R = rc["P"], rc["Ks"], rc["KV"], rc["R"]
    B, h, d, N = dA.shape
    H, W = P.shape[-2:]
    cp = h * d
    Q, V = P[:B], P[2 * B:]
    Qh, Vh, Rh = Q.reshape(B, h, d, N), V.reshape(B, h, d, N), R.reshape(B, h, d, N)
    dQ = scale * torch.einsum("bhkn,bhik->bhin", dA, KV) + dA * Rh
    dR = (dA * Qh).reshape(B, cp, H, W)
    dV = torch.einsum("bhin,bhik->bhkn", Ks, dKV)
    dKs = torch.einsum("bhkn,bhik->bhin", Vh, dKV)
    c = (KV * dKV).sum(-1, keepdim=True)                                      # sum_n Ks dKs
    dK = Ks * (dKs - c)
    ws = (wts.crpe_w3, wts.crpe_w5, wts.crpe_w7)
    groups = crpe_groups(d)
    dV = dV.reshape(B, cp, H, W) + torch.cat([dwconv_input_grad(dR[:, a:b], w) for (a, b), w in zip(groups, ws)], 1)
    g_crpe_w = [dwconv_weight_grad(dR[:, a:b], V[:, a:b], w.shape[0]) for (a, b), w in zip(groups, ws)]
    g_crpe_b = dR.sum(dim=(0, 2, 3))
    dP = torch.cat([dQ.reshape(B, cp, H, W), dK.reshape(B, cp, H, W), dV], dim=0)
    return dP, g_crpe_w, g_crpe_b


def b2_bn_sums(dP: Tensor, rc: Dict[str, Tensor], mean: Optional[Tensor], rstd: Optional[Tensor]
               ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """B2: G = dP * hardswish'(Z a + b) and its per-channel sums over 3B x H x W:
    sum(G) (= d bn_shift), sum(G * Z) (= d bn_scale) and, with batch statistics, sum(G * Zhat)."""
    G = dP * hardswish_grad(rc["pre_act"])
    Z = rc["Z"]
    sum_g = G.sum(dim=(0, 2, 3))
    sum_gz = (G * Z).sum(dim=(0, 2, 3))
    sum_gzh = None
    if mean is not None:
        zh = (Z - mean.reshape(-1)[:, None, None]) * rstd.reshape(-1)[:, None, None]
        sum_gzh = (G * zh).sum(dim=(0, 2, 3))
    return G, sum_g, sum_gz, sum_gzh


def b3_dz(G: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, mean: Optional[Tensor], rstd: Optional[Tensor],
          sum_g: Tensor, sum_gzh: Optional[Tensor], count) -> Tensor:
    """B3: dZ = a * G (running statistics), or with batch statistics
    dZ = a * (G - sum(G) / M - Zhat * sum(G * Zhat) / M), M = count (3B x H x W, over every rank)."""
    a = wts.bn_scale.reshape(-1)[:, None, None]
    if mean is None:
        return a * G
    zh = (rc["Z"] - mean.reshape(-1)[:, None, None]) * rstd.reshape(-1)[:, None, None]
    return a * (G - (sum_g / count)[:, None, None] - zh * (sum_gzh / count)[:, None, None])


def b3_pointwise_depthwise(dZ: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights
                           ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """B3: input gradients of segments 0..3 (each (3B, s, H, W)), depthwise weight gradients
    (k, k, s) for k = 3, 5, 7 and the pointwise weight gradient (3, s, s)."""
    s = dZ.shape[1] // 4
    u, y = rc["u"], rc["y"]
    dws = (wts.dw3, wts.dw5, wts.dw7)
    du = [dZ[:, :s]]
    g_dw, g_pw = [], []
    for j in (1, 2, 3):
        dzj = dZ[:, j * s:(j + 1) * s]
        g_pw.append(torch.einsum("bohw,bihw->oi", dzj, y[j - 1]))
        dy = torch.einsum("oi,bohw->bihw", wts.pw[j - 1], dzj)
        du.append(dwconv_input_grad(dy, dws[j - 1]))
        g_dw.append(dwconv_weight_grad(dy, u[j], 2 * j + 1))
    return du, g_dw, torch.stack(g_pw)


def local_backward(dL: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights) -> Tuple[Tensor, ...]:
    """Local branch backward, dL (B, s, H, W): the gradient of the 3s input channels
    (B, 3s, H, W) and of local_dw, local_pw, ln_weight, ln_bias."""
    xh, rstd4 = rc["xh4"], rc["rstd4"]
    lnw = wts.ln_weight[:, None, None]
    gL = dL * hardswish_grad(xh * lnw + wts.ln_bias[:, None, None])
    g_lnw = (gL * xh).sum(dim=(0, 2, 3))
    g_lnb = gL.sum(dim=(0, 2, 3))
    dxh = gL * lnw
    dz4 = (dxh - dxh.mean(1, keepdim=True) - xh * (dxh * xh).mean(1, keepdim=True)) * rstd4
    g_lpw = torch.einsum("bohw,bihw->oi", dz4, rc["w4"])
    dw4 = torch.einsum("oi,bohw->bihw", wts.local_pw, dz4)
    du4 = dwconv_input_grad(dw4, wts.local_dw)
    g_ldw = dwconv_weight_grad(dw4, rc["u4"], 3)
    return du4, g_ldw, g_lpw, g_lnw, g_lnb


# ---------------------------------------------------------------- stage sets
class Stages(NamedTuple):
    """One implementation of every backward stage (same arguments and results as the PyTorch
    functions above): `TORCH_STAGES` here, the Triton kernels' set in `train_op.triton_stages`.
    ``b3`` is B3 whole (dZ, then the pointwise/depthwise gradients), so that a kernel set may
    fuse the dZ epilogue into the pointwise kernel. ``recompute`` rebuilds what the stages read
    (`recompute` here unless a set says otherwise: the Triton set's is recompute.py's kernels).
    ``into_d_qkv``: ``b3`` and ``local_backward`` take a keyword ``d_qkv`` (the qkv gradient,
    (B, N, 3C) in qkv's dtype, allocated by `pre_projection_backward`) and store their input
    gradients there themselves (returning None for them), instead of returning them for
    `qkv_from_streams` to assemble (a stack, a cat, a layout copy and a cast). ``grad_pre_as_is``:
    ``b1_dkv``, ``b2_proxy_grads`` and ``local_backward`` take their views of grad_pre (dA, dL) in
    grad_pre's own dtype (fp16/bf16 loads widened in registers) instead of an fp32 copy of it.
    ``b2_fused_bn``: ``b2_proxy_grads`` takes a keyword ``bn=(mean, rstd)`` (both None with
    running statistics) and returns G and the BatchNorm sums itself, (G, g_crpe_w, g_crpe_b,
    (sum_g, sum_gz, sum_gzh)) (`attention_backward.b2_proxy_grads`), and ``b2_bn_sums`` is not
    called: dP is never written, nor read back."""
    b1_dkv: Callable       # (rc, dA, scale, wts) -> dKV (`b1_dkv` of Q, P's q images, or its kernel from Z)
    b2_proxy_grads: Callable
    b2_bn_sums: Optional[Callable]   # (dP, rc, mean, rstd, wts); None where b2_fused_bn
    b3: Callable           # (G, rc, wts, mean, rstd, sum_g, sum_gzh, count) -> (du, g_dw, g_pw)
    local_backward: Callable
    recompute: Callable = recompute     # (qkv, H, W, wts, ln_eps) -> the dict the stages read
    #: ``recompute`` takes a keyword ``planes`` (`KeptPlanes`) the training forward kept
    #: (`training.prepare`), and rebuilds only the rest
    takes_planes: bool = False
    into_d_qkv: bool = False
    grad_pre_as_is: bool = False
    b2_fused_bn: bool = False


def _b1_torch(rc, dA, scale, wts):
    return b1_dkv(rc["P"][:dA.shape[0]].reshape(dA.shape), dA, scale)


def _b3_torch(G, rc, wts, mean, rstd, sum_g, sum_gzh, count):
    return b3_pointwise_depthwise(b3_dz(G, rc, wts, mean, rstd, sum_g, sum_gzh, count), rc, wts)


TORCH_STAGES = Stages(b1_dkv=_b1_torch, b2_proxy_grads=b2_proxy_grads,
                      b2_bn_sums=lambda dP, rc, mean, rstd, wts: b2_bn_sums(dP, rc, mean, rstd),
                      b3=_b3_torch, local_backward=local_backward)


class KeptPlanes(NamedTuple):
    """What a training forward kept for its backward (`training.save`), so that the backward's recompute
    (`Stages.recompute` with ``planes``) need not compute it again: Z (3B, 4s, H, W) and the depthwise
    outputs y_all (3, 3B, s, H, W) of the statistics pass (`statistics.statistics_planes`), and, where the
    Triton forward read them (`config.from_planes`; `launcher.KEPT`), its local branch's w4 (B, 3s, H, W),
    xh4 (B, s, H, W) (stage dtype) and rstd4 (B, 1, H, W) (fp32), and of its attention R = CRPE(V) + bias
    (B, 4s, H, W) (stage dtype), kv (B, 4s, d) and the softmax's k_max, k_sum (B, 4s) (fp32); else None."""
    z: Tensor
    y_all: Tensor
    w4: Optional[Tensor] = None
    xh4: Optional[Tensor] = None
    rstd4: Optional[Tensor] = None
    R: Optional[Tensor] = None
    kv: Optional[Tensor] = None
    k_max: Optional[Tensor] = None
    k_sum: Optional[Tensor] = None


# ---------------------------------------------------------------- all stages
def pre_projection_backward(grad_pre: Tensor, qkv: Tensor, H: int, W: int, wts: FoldedGMAWeights, scale: float,
                            ln_eps: float, mean: Optional[Tensor] = None, rstd: Optional[Tensor] = None,
                            count=None, reduce_sums=None, stages: Stages = TORCH_STAGES,
                            planes: Optional[KeptPlanes] = None) -> Tuple[Tensor, FoldedGMAWeights]:
    """Gradients of qkv (qkv.dtype) and of every folded weight (their dtype) given grad_pre (B, N, C).

    mean, rstd (4, s): the batch statistics the forward normalised with (training mode), or None
    (running statistics folded into bn_scale/bn_shift: no batch-statistics terms). count: the
    number of values per channel behind them (default 3B*H*W). reduce_sums: optional callable
    applied to the concatenated [sum(G), sum(G*Zhat)] before B3 (SyncBatchNorm's all-reduce);
    the returned bn_scale / bn_shift gradients stay this process's own. stages: the
    implementation of each stage (default: the PyTorch functions of this file). planes: what the training
    forward kept (`KeptPlanes`: Z and y of the statistics pass, `training.prepare`; the local branch's
    buffers where the Triton forward kept them), handed to a stage set whose recompute takes them
    (`Stages.takes_planes`); others recompute them."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s = C // 5
    cp, d = 4 * s, s // 2
    dt = wts.pw.dtype
    if planes is not None and stages.takes_planes:
        rc = stages.recompute(qkv, H, W, wts, ln_eps, planes=planes)
    else:
        rc = stages.recompute(qkv, H, W, wts, ln_eps)
    g = grad_pre if stages.grad_pre_as_is else grad_pre.to(dt)
    dA = g[..., :cp].transpose(1, 2).reshape(B, 8, d, N)
    dL = g[..., cp:].transpose(1, 2).reshape(B, s, H, W)
    dKV = stages.b1_dkv(rc, dA, scale, wts)
    if stages.b2_fused_bn:
        G, g_crpe_w, g_crpe_b, (sum_g, sum_gz, sum_gzh) = stages.b2_proxy_grads(dA, dKV, rc, wts, scale,
                                                                                bn=(mean, rstd))
    else:
        dP, g_crpe_w, g_crpe_b = stages.b2_proxy_grads(dA, dKV, rc, wts, scale)
        G, sum_g, sum_gz, sum_gzh = stages.b2_bn_sums(dP, rc, mean, rstd, wts)
    sg, sgzh = sum_g, sum_gzh
    if mean is not None:
        if count is None:
            count = 3 * B * N
        if reduce_sums is not None:
            both = reduce_sums(torch.cat([sum_g, sum_gzh]))
            sg, sgzh = both[:cp], both[cp:]
    if stages.into_d_qkv:
        d_qkv = torch.empty(B, N, C3, dtype=qkv.dtype, device=qkv.device)
        _, g_dw, g_pw = stages.b3(G, rc, wts, mean, rstd, sg, sgzh, count, d_qkv=d_qkv)
        _, g_ldw, g_lpw, g_lnw, g_lnb = stages.local_backward(dL, rc, wts, d_qkv=d_qkv)
    else:
        du, g_dw, g_pw = stages.b3(G, rc, wts, mean, rstd, sg, sgzh, count)
        du4, g_ldw, g_lpw, g_lnw, g_lnb = stages.local_backward(dL, rc, wts)
        seg = torch.stack(du, dim=1).view(3, B, 4, s, H, W)
        loc = du4.view(B, 3, s, H, W).transpose(0, 1)[:, :, None]
        d_qkv = qkv_from_streams(torch.cat([seg, loc], dim=2)).to(qkv.dtype)
    grads = FoldedGMAWeights(
        bn_scale=sum_gz.view(4, s), bn_shift=sum_g.view(4, s),
        dw3=g_dw[0], dw5=g_dw[1], dw7=g_dw[2], pw=g_pw,
        local_dw=g_ldw, local_pw=g_lpw, ln_weight=g_lnw, ln_bias=g_lnb,
        crpe_w3=g_crpe_w[0], crpe_w5=g_crpe_w[1], crpe_w7=g_crpe_w[2], crpe_b=g_crpe_b)
    return d_qkv, grads
