"""ONE-PASS group-proxy aggregation (eval mode, BatchNorm folded): kernel + launcher.

Grid ``(SPLITS, 5, B)``. The N tokens of an image are cut into T = ceil(N / BLOCK_P) tiles
of BLOCK_P consecutive tokens, and the tiles into SPLITS contiguous runs of
``tiles_per_split`` (split-N: with a small batch there are still enough programs to fill
the GPU; with a large one SPLITS is 1 or 2). Program (split, job, b) walks its run of
tiles of image b for one *job*, i.e. one disjoint channel slice of the (B, N, 3C) qkv:

* job 0: segment 0 of q, k, v:  ``hardswish(t * bn_scale[0] + bn_shift[0])`` (no halo).
* job j = 1, 2, 3: segment j of q, k, v: depthwise (2j+1)x(2j+1) (``dw3``/``dw5``/``dw7``,
  halo j rows/cols), then the s x s pointwise ``pw[j-1]`` as ``tl.dot`` into each head's d
  outputs, then the BatchNorm affine ``* bn_scale[j] + bn_shift[j]`` and hardswish.
* job 4: the local branch: depthwise 3x3 over segment 4 of q, k, v (the 3s stacked
  channels), 3s -> s pointwise (accumulated ``tl.dot``), LayerNorm, hardswish, stored
  straight into channels [C', C) of ``pre``.

So every qkv element is read by exactly one job (plus the stencil halo, through cache),
and no split/cat/permute copy ever exists. Segment j holds heads 2j and 2j+1; per head
the job stores the Q and V proxies (x.dtype, channel head*d + i of ``q``/``v``)
and, instead of K, runs the softmax over tokens as an online reduction (FlashAttention's
rescaling, applied along N) over the tiles it visits, in registers:

    M' = max(M, max_n K[n, i]);  a = exp(M - M')
    L   <- a L + sum_n exp(K[n, i] - M')
    ACC <- a ACC + sum_n exp(K[n, i] - M') V[n, k]      (the head's d x d block of Ksᵀ V)

and stores (M, L, ACC) once per split, fp32, at ``part_m/part_l[b, split, head*d + i]`` and
``part_acc[b, split, head*d + i, k]``. K never reaches memory;
``attention.gma_combine_kernel`` merges the SPLITS partials with the same rescaling.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl

from ._common import DotVariant, depthwise_tile, dot_variant, hardswish, mm


@triton.jit
def _tile(t, N, W, BLOCK_P: tl.constexpr):
    """Tokens of tile t: index, validity, row, column."""
    n = t * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, n < N, n // W, n % W


@triton.jit
def _online_softmax_kv(zk, zv, pmask, M, L, ACC, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Fold one tile of (K, V) of a head into the running (max, sum, exp(K - max)ᵀ V)."""
    kmat = tl.where(pmask[:, None], zk, float("-inf"))
    M_new = tl.maximum(M, tl.max(kmat, axis=0))                # finite: the tile has a valid token
    alpha = tl.exp(M - M_new)                                  # 0 on the first tile (M = -inf)
    p = tl.where(pmask[:, None], tl.exp(kmat - M_new[None, :]), 0.0)
    L = L * alpha + tl.sum(p, axis=0)
    vv = tl.where(pmask[:, None], zv, 0.0)
    ACC = mm(tl.trans(p), vv, ACC * alpha[:, None], DOT_PRECISION, EMULATE_DOTS)  # [i, k]
    return M_new, L, ACC


@triton.jit
def _store_partial(M, L, ACC, split, ch0, pm_b, pl_b, pacc_b,
                   CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    row = split * CP + ch0 + kk
    tl.store(pm_b + row, M, mask=kmask)
    tl.store(pl_b + row, L, mask=kmask)
    tl.store(pacc_b + row[:, None] * D + kk[None, :], ACC, mask=kmask[:, None] & kmask[None, :])


@triton.jit
def _segment0_head(qkv_b, q_b, v_b, a, sh, ch, m2, n, pmask, stride_n, M, L, ACC,
                   C: tl.constexpr, CP: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    src = qkv_b + n[:, None] * stride_n + ch[None, :]
    zq = hardswish(tl.load(src, mask=m2, other=0.0).to(tl.float32) * a + sh)
    zk = hardswish(tl.load(src + C, mask=m2, other=0.0).to(tl.float32) * a + sh)
    zv = hardswish(tl.load(src + 2 * C, mask=m2, other=0.0).to(tl.float32) * a + sh)
    dst = n[:, None] * CP + ch[None, :]
    tl.store(q_b + dst, zq.to(q_b.dtype.element_ty), mask=m2)
    tl.store(v_b + dst, zv.to(v_b.dtype.element_ty), mask=m2)
    return _online_softmax_kv(zk, zv, pmask, M, L, ACC, DOT_PRECISION, EMULATE_DOTS)


@triton.jit
def _segment0(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, bn_scale, bn_shift, split, t0, t1, N, W, stride_n,
              C: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
              BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Segment 0: hardswish(t * bn_scale[0] + bn_shift[0]) per channel, no stencil."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    a0 = tl.load(bn_scale + kk, mask=kmask, other=0.0)[None, :]
    s0 = tl.load(bn_shift + kk, mask=kmask, other=0.0)[None, :]
    a1 = tl.load(bn_scale + D + kk, mask=kmask, other=0.0)[None, :]
    s1 = tl.load(bn_shift + D + kk, mask=kmask, other=0.0)[None, :]
    M0 = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
    L0 = tl.zeros([D_PAD], dtype=tl.float32)
    A0 = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    M1 = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
    L1 = tl.zeros([D_PAD], dtype=tl.float32)
    A1 = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    t = t0
    while t < t1:
        n, pmask, y, x = _tile(t, N, W, BLOCK_P)
        m2 = pmask[:, None] & kmask[None, :]
        M0, L0, A0 = _segment0_head(qkv_b, q_b, v_b, a0, s0, kk, m2, n, pmask, stride_n, M0, L0, A0,
                                    C, CP, DOT_PRECISION, EMULATE_DOTS)
        M1, L1, A1 = _segment0_head(qkv_b, q_b, v_b, a1, s1, D + kk, m2, n, pmask, stride_n, M1, L1, A1,
                                    C, CP, DOT_PRECISION, EMULATE_DOTS)
        t += 1
    _store_partial(M0, L0, A0, split, 0, pm_b, pl_b, pacc_b, CP, D, D_PAD)
    _store_partial(M1, L1, A1, split, D, pm_b, pl_b, pacc_b, CP, D, D_PAD)


@triton.jit
def _dw_pw_heads(src_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, KS,
                 S: tl.constexpr, D: tl.constexpr, CK: tl.constexpr,
                 D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """One of q/k/v, one segment, one tile: DW_KS(t) @ pw[h*D + k, :]ᵀ for its heads h = 0, 1.

    The s input channels go in chunks of CK: depthwise on [BLOCK_P, CK], then accumulate
    into the two [BLOCK_P, D_PAD] head outputs with tl.dot. Only chunk-sized tiles are
    alive, so registers do not grow with s (s = 96 spilled when done in one piece).
    """
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    acc0 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    for c0 in range(0, S, CK):
        cs = c0 + tl.arange(0, CK)
        cmask = cs < S
        dwc = depthwise_tile(src_b, ch0 + cs, cmask, dw + cs * (KS * KS), n, y, x, pmask, H, W, stride_n,
                             KS, BLOCK_P, CK)
        wmask = cmask[:, None] & kmask[None, :]
        w0 = tl.load(pw_seg + kk[None, :] * S + cs[:, None], mask=wmask, other=0.0)        # [CK, D_PAD]
        acc0 = mm(dwc, w0, acc0, DOT_PRECISION, EMULATE_DOTS)
        w1 = tl.load(pw_seg + (D + kk)[None, :] * S + cs[:, None], mask=wmask, other=0.0)
        acc1 = mm(dwc, w1, acc1, DOT_PRECISION, EMULATE_DOTS)
    return acc0, acc1


@triton.jit
def _segment_conv(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, dw, pw, bn_scale, bn_shift,
                  split, t0, t1, N, H, W, stride_n, SEG, KS,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                  CK: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Segment SEG (1..3) of q, k, v: depthwise KSxKS -> pointwise -> BatchNorm affine -> hardswish.

    SEG and KS = 2 SEG + 1 are runtime values: one instance serves the three segments."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    pw_seg = pw + (SEG - 1) * S * S
    a0 = tl.load(bn_scale + SEG * S + kk, mask=kmask, other=0.0)[None, :]
    a1 = tl.load(bn_scale + SEG * S + D + kk, mask=kmask, other=0.0)[None, :]
    b0 = tl.load(bn_shift + SEG * S + kk, mask=kmask, other=0.0)[None, :]
    b1 = tl.load(bn_shift + SEG * S + D + kk, mask=kmask, other=0.0)[None, :]
    ch0 = SEG * S                                              # in q; k: + C, v: + 2C
    M0 = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
    L0 = tl.zeros([D_PAD], dtype=tl.float32)
    A0 = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    M1 = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
    L1 = tl.zeros([D_PAD], dtype=tl.float32)
    A1 = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    t = t0
    while t < t1:
        n, pmask, y, x = _tile(t, N, W, BLOCK_P)
        m2 = pmask[:, None] & kmask[None, :]
        dst0 = n[:, None] * CP + (ch0 + kk)[None, :]
        zq0, zq1 = _dw_pw_heads(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n,
                                KS, S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
        tl.store(q_b + dst0, hardswish(zq0 * a0 + b0).to(q_b.dtype.element_ty), mask=m2)
        tl.store(q_b + dst0 + D, hardswish(zq1 * a1 + b1).to(q_b.dtype.element_ty), mask=m2)
        # V before K: one head pair of depthwise outputs alive at a time (register pressure)
        zv0, zv1 = _dw_pw_heads(qkv_b, 2 * C + ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n,
                                KS, S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
        zv0 = hardswish(zv0 * a0 + b0)
        zv1 = hardswish(zv1 * a1 + b1)
        tl.store(v_b + dst0, zv0.to(v_b.dtype.element_ty), mask=m2)
        tl.store(v_b + dst0 + D, zv1.to(v_b.dtype.element_ty), mask=m2)
        zk0, zk1 = _dw_pw_heads(qkv_b, C + ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n,
                                KS, S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
        M0, L0, A0 = _online_softmax_kv(hardswish(zk0 * a0 + b0), zv0, pmask, M0, L0, A0, DOT_PRECISION, EMULATE_DOTS)
        M1, L1, A1 = _online_softmax_kv(hardswish(zk1 * a1 + b1), zv1, pmask, M1, L1, A1, DOT_PRECISION, EMULATE_DOTS)
        t += 1
    _store_partial(M0, L0, A0, split, ch0, pm_b, pl_b, pacc_b, CP, D, D_PAD)
    _store_partial(M1, L1, A1, split, ch0 + D, pm_b, pl_b, pacc_b, CP, D, D_PAD)


@triton.jit
def _local_branch(qkv_b, pre_b, local_dw, local_pw, ln_weight, ln_bias, ln_eps, t0, t1, N, H, W, stride_n,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, CK: tl.constexpr,
                  S_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Segment 4 of q, k, v -> DW3x3 -> (3s -> s) -> LayerNorm -> hardswish -> pre[:, C':C]."""
    co = tl.arange(0, S_PAD)                                   # output channel
    omask = co < S
    lnw = tl.load(ln_weight + co, mask=omask, other=0.0)[None, :]
    lnb = tl.load(ln_bias + co, mask=omask, other=0.0)[None, :]
    t = t0
    while t < t1:
        n, pmask, y, x = _tile(t, N, W, BLOCK_P)
        z = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
        for which in tl.static_range(3):                       # q, k, v: input channels which*s + c
            for c0 in range(0, S, CK):
                cs = c0 + tl.arange(0, CK)
                cmask = cs < S
                dwc = depthwise_tile(qkv_b, which * C + 4 * S + cs, cmask, local_dw + (which * S + cs) * 9,
                                     n, y, x, pmask, H, W, stride_n, 3, BLOCK_P, CK)
                # local_pw (s, 3s): element [out, which*s + in], loaded as [in, out]
                wT = tl.load(local_pw + co[None, :] * (3 * S) + which * S + cs[:, None],
                             mask=cmask[:, None] & omask[None, :], other=0.0)
                z = mm(dwc, wT, z, DOT_PRECISION, EMULATE_DOTS)
        mean = tl.sum(z, axis=1) / S                           # padded channels are 0
        diff = tl.where(omask[None, :], z - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / S
        yv = hardswish(diff * tl.rsqrt(var + ln_eps)[:, None] * lnw + lnb)
        tl.store(pre_b + n[:, None] * C + (CP + co)[None, :], yv.to(pre_b.dtype.element_ty),
                 mask=pmask[:, None] & omask[None, :])
        t += 1


# Shape integers are not specialised (no tt.divisibility / ==1 constants): one compiled variant
# per (C, dtype, GPU) serves every image size and batch, the AOT resource tables cover what
# runs, and a new image size or batch never triggers a JIT recompile. (tiles_per_split == 1
# at batch 1 would otherwise compile a loop-free variant, and N % 16 another.) The strides
# stay specialised: their divisibility is what aligns the vector loads of qkv.
@triton.jit(do_not_specialize=["N", "H", "W", "tiles_per_split"])
def gma_aggregate_kernel(
    qkv, q, v, pre, part_m, part_l, part_acc,
    bn_scale, bn_shift, dw3, dw5, dw7, pw, local_dw, local_pw, ln_weight, ln_bias,
    N, H, W, stride_qkv_b, stride_qkv_n, tiles_per_split, ln_eps,
    C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr, CK: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
):
    split = tl.program_id(0)
    job = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    SPLITS = tl.num_programs(0)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_P))
    qkv_b = qkv + b * stride_qkv_b
    q_b = q + b * N * CP
    v_b = v + b * N * CP
    pm_b = part_m + b * SPLITS * CP
    pl_b = part_l + b * SPLITS * CP
    pacc_b = part_acc + b * SPLITS * CP * D
    if job == 0:
        _segment0(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, bn_scale, bn_shift, split, t0, t1, N, W,
                  stride_qkv_n, C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
    elif job < 4:
        if job == 1:
            dw = dw3
        elif job == 2:
            dw = dw5
        else:
            dw = dw7
        _segment_conv(qkv_b, q_b, v_b, pm_b, pl_b, pacc_b, dw, pw, bn_scale, bn_shift,
                      split, t0, t1, N, H, W, stride_qkv_n, job, 2 * job + 1,
                      C, S, CP, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
    else:
        _local_branch(qkv_b, pre + b * N * C, local_dw, local_pw, ln_weight, ln_bias, ln_eps,
                      t0, t1, N, H, W, stride_qkv_n, C, S, CP, CK, S_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)


def split_plan(N: int, B: int, block_p: int, target_programs: int, programs_per_image: int = 5):
    """(splits, tiles_per_split): split-N so that about `target_programs` programs
    (`programs_per_image` per image per split: 5 aggregation jobs, 8 heads in the backward's
    token reductions) exist, every split owning at least one tile."""
    T = triton.cdiv(N, block_p)
    want = max(1, min(T, triton.cdiv(target_programs, programs_per_image * B)))
    tps = triton.cdiv(T, want)
    return triton.cdiv(T, tps), tps


def aggregate_call(qkv, H, W, weights, ln_eps, shape, tiles_per_split, q, v, pre, part_m, part_l, part_acc,
                   dots: DotVariant):
    """(grid, args, kwargs) of one aggregation launch (what `launch_aggregate` passes to the kernel).

    qkv: (B, N, 3C) with unit channel stride; weights: `FoldedGMAWeights`; q, v: (B, N, C')
    contiguous; pre: (B, N, C) contiguous; part_m, part_l: (B, SPLITS, C') and part_acc:
    (B, SPLITS, C', d) fp32, SPLITS = part_m.shape[1] (from `split_plan`); dots: the dot
    variant (`_common.dot_variant`). Also used, on meta tensors, to derive the AOT
    specialisations (`specializations.py`), so the two cannot drift apart.
    """
    B, N, _ = qkv.shape
    splits = part_m.shape[1]
    w = weights
    args = (qkv, q, v, pre, part_m, part_l, part_acc,
            w.bn_scale, w.bn_shift, w.dw3, w.dw5, w.dw7, w.pw, w.local_dw, w.local_pw, w.ln_weight, w.ln_bias,
            N, H, W, qkv.stride(0), qkv.stride(1), tiles_per_split, ln_eps)
    kwargs = dict(C=shape.C, S=shape.S, CP=shape.CP, D=shape.D, S_PAD=shape.S_PAD, D_PAD=shape.D_PAD,
                  CK=shape.CK, BLOCK_P=shape.AGG_BLOCK_P, DOT_PRECISION=dots.precision,
                  EMULATE_DOTS=dots.emulate, num_warps=shape.AGG_WARPS)
    return (splits, 5, B), args, kwargs


def launch_aggregate(kernel, qkv, H, W, weights, ln_eps, shape, tiles_per_split, q, v, pre, part_m, part_l,
                     part_acc, dots: Optional[DotVariant] = None):
    """Launch the aggregation kernel (``kernel``: the raw or the wrap_triton'ed kernel);
    arguments as `aggregate_call` (dots: by default the variant for qkv's dtype and device)."""
    grid, args, kwargs = aggregate_call(qkv, H, W, weights, ln_eps, shape, tiles_per_split, q, v, pre, part_m,
                                        part_l, part_acc, dots or dot_variant(qkv))
    kernel[grid](*args, **kwargs)
