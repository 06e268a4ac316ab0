"""ONE-PASS group-proxy aggregation (eval mode, BatchNorm folded): kernel + launcher.

Grid ``(T, 5, B)``: program (t, job, b) owns tokens [t*BLOCK_P, (t+1)*BLOCK_P) of image b
and one *job*, i.e. one disjoint channel slice of the (B, N, 3C) qkv projection:

* job 0: segment 0 of q, k, v:  ``hardswish(t * bn0_scale + bn0_shift)`` (no halo).
* job j = 1, 2, 3: segment j of q, k, v: depthwise (2j+1)x(2j+1) (halo j rows/cols),
  then the s x s pointwise with BatchNorm folded, as one ``tl.dot`` per head
  ([BLOCK_P, s] x [s, d]) + bias + hardswish.
* job 4: the local branch: depthwise 3x3 over segment 4 of q, k, v (the 3s stacked
  channels), 3s -> s pointwise (three accumulated ``tl.dot``), LayerNorm, hardswish,
  stored straight into channels [C', C) of ``pre``.

So every qkv element is read by exactly one job (plus the stencil halo, through cache),
and no split/cat/permute copy ever exists. Segment j holds heads 2j and 2j+1; per head
the job stores the Q and V proxies (x.dtype, channel head*d + i of ``q_out``/``v_out``)
and, instead of K, the tile's online-softmax partials over tokens:

    m[i]      = max_n K[n, i]                       (this tile's tokens)
    l[i]      = sum_n exp(K[n, i] - m[i])
    acc[i, k] = sum_n exp(K[n, i] - m[i]) * V[n, k]     (the head's d x d block of Ksᵀ V)

in fp32, at ``part_m/part_l[b, t, head*d + i]`` and ``part_acc[b, t, head*d + i, k]``.
``attention.combine`` merges the T tiles (split-N) with the usual rescaling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import depthwise_tile, hardswish, mm


@triton.jit
def _kv_partial(zk, zv, pmask, t, ch0, pm_b, pl_b, pacc_b,
                CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Store this tile's softmax-over-tokens partials of one head (K never hits memory)."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    kmat = tl.where(pmask[:, None], zk, float("-inf"))
    m = tl.max(kmat, axis=0)                                   # [D_PAD], finite: >= 1 valid token
    p = tl.where(pmask[:, None], tl.exp(kmat - m[None, :]), 0.0)
    l = tl.sum(p, axis=0)
    vv = tl.where(pmask[:, None], zv, 0.0)
    acc = mm(tl.trans(p), vv, DOT_IEEE)                        # [D_PAD(i), D_PAD(k)]
    row = t * CP + ch0 + kk
    tl.store(pm_b + row, m, mask=kmask)
    tl.store(pl_b + row, l, mask=kmask)
    tl.store(pacc_b + row[:, None] * D + kk[None, :], acc, mask=kmask[:, None] & kmask[None, :])


@triton.jit
def _segment0(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, a_ptr, sh_ptr, n, pmask, t, stride_n,
              C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
              D_PAD: tl.constexpr, DOT_IEEE: tl.constexpr):
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    m2 = pmask[:, None] & kmask[None, :]
    for hl in tl.static_range(2):
        ch = hl * D + kk                                       # channel inside segment 0
        a = tl.load(a_ptr + ch, mask=kmask, other=0.0)[None, :]
        sh = tl.load(sh_ptr + ch, mask=kmask, other=0.0)[None, :]
        src = qkv_b + n[:, None] * stride_n + ch[None, :]
        zq = hardswish(tl.load(src, mask=m2, other=0.0).to(tl.float32) * a + sh)
        zk = hardswish(tl.load(src + C, mask=m2, other=0.0).to(tl.float32) * a + sh)
        zv = hardswish(tl.load(src + 2 * C, mask=m2, other=0.0).to(tl.float32) * a + sh)
        dst = n[:, None] * CP + ch[None, :]
        tl.store(q_b + dst, zq.to(q_b.dtype.element_ty), mask=m2)
        tl.store(v_b + dst, zv.to(v_b.dtype.element_ty), mask=m2)
        _kv_partial(zk, zv, pmask, t, hl * D, pm_b, pl_b, pacc_b, CP, D, D_PAD, DOT_IEEE)


@triton.jit
def _segment_conv(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, dw_ptr, pw_ptr, pwb_ptr,
                  n, y, x, pmask, t, H, W, stride_n,
                  SEG: tl.constexpr, KS: tl.constexpr,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                  S_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                  DOT_IEEE: tl.constexpr):
    """Segment SEG (1..3): depthwise KSxKS -> pointwise (BN folded) -> hardswish."""
    cs = tl.arange(0, S_PAD)
    cmask = cs < S
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    m2 = pmask[:, None] & kmask[None, :]
    w_rows = dw_ptr + cs * (KS * KS)
    pw_seg = pw_ptr + (SEG - 1) * S * S
    ch_in = SEG * S + cs                                       # within q (k, v: + C, + 2C)
    dq = depthwise_tile(qkv_b, ch_in, cmask, w_rows, n, y, x, pmask, H, W, stride_n, KS, BLOCK_P, S_PAD)
    for hl in tl.static_range(2):
        out = hl * D + kk                                      # output channel inside the segment
        wT = tl.load(pw_seg + out[None, :] * S + cs[:, None], mask=cmask[:, None] & kmask[None, :], other=0.0)
        bias = tl.load(pwb_ptr + (SEG - 1) * S + out, mask=kmask, other=0.0)[None, :]
        zq = hardswish(mm(dq, wT, DOT_IEEE) + bias)
        tl.store(q_b + n[:, None] * CP + (SEG * S + out)[None, :], zq.to(q_b.dtype.element_ty), mask=m2)
    dk = depthwise_tile(qkv_b, C + ch_in, cmask, w_rows, n, y, x, pmask, H, W, stride_n, KS, BLOCK_P, S_PAD)
    dv = depthwise_tile(qkv_b, 2 * C + ch_in, cmask, w_rows, n, y, x, pmask, H, W, stride_n, KS, BLOCK_P, S_PAD)
    for hl in tl.static_range(2):
        out = hl * D + kk
        wT = tl.load(pw_seg + out[None, :] * S + cs[:, None], mask=cmask[:, None] & kmask[None, :], other=0.0)
        bias = tl.load(pwb_ptr + (SEG - 1) * S + out, mask=kmask, other=0.0)[None, :]
        zk = hardswish(mm(dk, wT, DOT_IEEE) + bias)
        zv = hardswish(mm(dv, wT, DOT_IEEE) + bias)
        tl.store(v_b + n[:, None] * CP + (SEG * S + out)[None, :], zv.to(v_b.dtype.element_ty), mask=m2)
        _kv_partial(zk, zv, pmask, t, SEG * S + hl * D, pm_b, pl_b, pacc_b, CP, D, D_PAD, DOT_IEEE)


@triton.jit
def _local_branch(qkv_b, pre_b, ldw_ptr, lpw_ptr, lnw_ptr, lnb_ptr, ln_eps,
                  n, y, x, pmask, H, W, stride_n,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr,
                  S_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Segment 4 of q, k, v -> DW3x3 -> (3s -> s) -> LayerNorm -> hardswish -> pre[:, C':C]."""
    cs = tl.arange(0, S_PAD)
    cmask = cs < S
    z = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
    for which in tl.static_range(3):                           # q, k, v
        dwv = depthwise_tile(qkv_b, which * C + 4 * S + cs, cmask, ldw_ptr + (which * S + cs) * 9,
                             n, y, x, pmask, H, W, stride_n, 3, BLOCK_P, S_PAD)
        # local_pw (s, 3s): element [out, which*s + in]; load as [in, out]
        wT = tl.load(lpw_ptr + cs[None, :] * (3 * S) + which * S + cs[:, None],
                     mask=cmask[:, None] & cmask[None, :], other=0.0)
        z += mm(dwv, wT, DOT_IEEE)
    mean = tl.sum(z, axis=1) / S                               # padded channels are 0
    diff = tl.where(cmask[None, :], z - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / S
    lnw = tl.load(lnw_ptr + cs, mask=cmask, other=0.0)[None, :]
    lnb = tl.load(lnb_ptr + cs, mask=cmask, other=0.0)[None, :]
    yv = hardswish(diff * tl.rsqrt(var + ln_eps)[:, None] * lnw + lnb)
    tl.store(pre_b + n[:, None] * C + (CP + cs)[None, :], yv.to(pre_b.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])


@triton.jit
def gma_aggregate_kernel(
    qkv_ptr, q_ptr, v_ptr, pre_ptr, pm_ptr, pl_ptr, pacc_ptr,
    bn0_scale_ptr, bn0_shift_ptr, dw1_ptr, dw2_ptr, dw3_ptr, pw_ptr, pwb_ptr,
    ldw_ptr, lpw_ptr, lnw_ptr, lnb_ptr,
    N, H, W, stride_qkv_b, stride_qkv_n, ln_eps,
    C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    t = tl.program_id(0)
    job = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    T = tl.num_programs(0)
    n = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = n < N
    y = n // W
    x = n % W
    qkv_b = qkv_ptr + b * stride_qkv_b
    q_b = q_ptr + b * N * CP
    v_b = v_ptr + b * N * CP
    pm_b = pm_ptr + b * T * CP
    pl_b = pl_ptr + b * T * CP
    pacc_b = pacc_ptr + b * T * CP * D
    if job == 0:
        _segment0(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, bn0_scale_ptr, bn0_shift_ptr, n, pmask, t,
                  stride_qkv_n, C, S, CP, D, D_PAD, DOT_IEEE)
    elif job == 1:
        _segment_conv(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, dw1_ptr, pw_ptr, pwb_ptr,
                      n, y, x, pmask, t, H, W, stride_qkv_n, 1, 3,
                      C, S, CP, D, S_PAD, D_PAD, BLOCK_P, DOT_IEEE)
    elif job == 2:
        _segment_conv(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, dw2_ptr, pw_ptr, pwb_ptr,
                      n, y, x, pmask, t, H, W, stride_qkv_n, 2, 5,
                      C, S, CP, D, S_PAD, D_PAD, BLOCK_P, DOT_IEEE)
    elif job == 3:
        _segment_conv(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, dw3_ptr, pw_ptr, pwb_ptr,
                      n, y, x, pmask, t, H, W, stride_qkv_n, 3, 7,
                      C, S, CP, D, S_PAD, D_PAD, BLOCK_P, DOT_IEEE)
    else:
        _local_branch(qkv_b, pre_ptr + b * N * C, ldw_ptr, lpw_ptr, lnw_ptr, lnb_ptr, ln_eps,
                      n, y, x, pmask, H, W, stride_qkv_n, C, S, CP, S_PAD, BLOCK_P, DOT_IEEE)


def launch_aggregate(kernel, qkv, H, W, shape, bn0_scale, bn0_shift, dw1, dw2, dw3, pw, pw_bias,
                     local_dw, local_pw, ln_weight, ln_bias, ln_eps,
                     q_out, v_out, pre, part_m, part_l, part_acc):
    """Launch the aggregation kernel (``kernel`` is the raw or wrap_triton'ed kernel).

    qkv: (B, N, 3C) with unit channel stride; q_out, v_out: (B, N, C') contiguous;
    pre: (B, N, C) contiguous; part_m, part_l: (B, T, C') and part_acc: (B, T, C', d) fp32.
    """
    B, N, _ = qkv.shape
    T = shape.num_tiles(N)
    kernel[(T, 5, B)](
        qkv, q_out, v_out, pre, part_m, part_l, part_acc,
        bn0_scale, bn0_shift, dw1, dw2, dw3, pw, pw_bias, local_dw, local_pw, ln_weight, ln_bias,
        N, H, W, qkv.stride(0), qkv.stride(1), ln_eps,
        C=shape.C, S=shape.S, CP=shape.CP, D=shape.D, S_PAD=shape.S_PAD, D_PAD=shape.D_PAD,
        BLOCK_P=shape.AGG_BLOCK_P, DOT_IEEE=int(qkv.dtype == torch.float32),
        num_warps=shape.NUM_WARPS,
    )

