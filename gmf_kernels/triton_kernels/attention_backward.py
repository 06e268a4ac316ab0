"""Backward of the factorized attention (stages B1 and B2 of `backward.py`): kernels, then launchers.

Drop-in replacements, same returns, for two stage functions of backward.py:

    dKV = b1_dkv(Zq, dA, scale, bn_scale, bn_shift)               # backward.b1_dkv of Q
    dP, g_crpe_w, g_crpe_b = b2_proxy_grads(dA, dKV, rc, wts, scale)   # backward.b2_proxy_grads

**The proxies of q and k are not read: they are computed on load from Z** (Q = hardswish(Zq
bn_scale + bn_shift), the same for K), since B2 reads Z of q and k for the BatchNorm backward
anyway; the recompute keeps only the v images' proxies V (the CRPE stencils read them with
their halos, where a transform per tap would cost more than the bytes). So the recompute writes
2 B C' N e fewer bytes and B2 reads 2 B C' N e fewer; B1 reads Z of q where it read Q.

Tensors are the stage functions' (B, 8, d, N) views, any strides (dA is a token-major view of
grad_pre, Zq/V/R channels-first slices of Z, V and R), fp32 or fp16/bf16; the kernels load in
the input dtype, compute and accumulate in fp32 and write dP and dR in Z's dtype: the stage
dtype (`config.stage_dtype`: the layer's own for fp16/bf16, as eager AMP keeps activations;
fp32 for fp32 layers and for backward.py's PyTorch recompute), rounded once on store; dKV and the
CRPE weight-gradient partials fp32. The dots are `_common.mm` with the dot variant passed
(the Triton stage set passes the backward's, `statistics.backward_dots`: the layer's input
dtype's, so one TF32 pass for an fp16/bf16 layer on sm_80+), else the input's
(`config.ARCH_DOTS`: 3xTF32 for fp32 on sm_80+, so about fp32 accuracy).

Kernels (per head h, d = C'/8 channels, N = H*W tokens; e = the stage tensors' element size,
4 for fp32 activations, 2 for fp16/bf16):

* ``gma_b1_dkv_kernel``, grid ``(SPLITS, 8, B)``: dKV[b,h] = scale * Q[b,h] dA[b,h]^T (Q from Zq), a
  reduction over tokens: program (split, h, b) walks its run of token tiles with a
  [d, d] fp32 accumulator (``tl.dot`` of [D_PAD, BLOCK_N] x [BLOCK_N, D_PAD] tiles) and
  writes one fp32 partial; the launcher sums the SPLITS partials (none when SPLITS = 1, as
  at batch 128). Split-N as the forward's aggregation (`_split_plan`): about SPLIT_TARGET
  programs even at batch 1, deterministic (no atomics).
  Cost: reads Zq and dA once, 2 B C' N e bytes, writes B SPLITS C' d x 4; 2 B C' d N flops.
  d/e flop per byte (8 at d = 32): far below any GPU's ridge point, so the bound aimed at
  is HBM bandwidth.
* ``gma_b2_attention_kernel``, grid ``(ceil(N / BLOCK_P), 8, B)``: per token tile and head, in
  one pass over N (token-major [BLOCK_P, D_PAD] tiles):

      dQ = scale dA KV^T + dA * R        dR = dA * Q   (written: the CRPE kernel reads it)
      Ks = exp(K - M) / L                dV = Ks dKV   (the CRPE input gradient added next)
      dKs = V dKV^T,  c = rowsum(KV * dKV),  dK = Ks * (dKs - c)

  three ``tl.dot`` [BLOCK_P, D_PAD] x [D_PAD, D_PAD]. **Ks is recomputed from K and the
  softmax statistics (M, L) per (b, h, i)** (row maximum, sum of exp(K - M)), not read:
  reading K costs exactly the bytes reading Ks would (B C' N e), while a stored Ks costs its
  own write and read elsewhere (2 B C' N x 4 bytes in the recompute stage, one more
  activation-sized buffer held), against 2 B C' x 4 bytes of statistics. The Triton stage
  set's recompute (recompute.py) gets (M, L) from its online softmax
  (`aggregation._online_softmax_kv` and a merge of the per-split partials) as ``rc["k_max"]``
  / ``rc["k_sum"]``; given an ``rc`` without them (`backward.recompute`'s, as in the tests),
  `plan_b2` computes them from K with PyTorch ops. (M, L) rather than one log-sum-exp lse: exp(K - lse)
  loses |K - lse| ulps to the rounding of lse; over 9 seeded cases (C = 40, 80, 200) the dK
  error relative to the fp32 PyTorch stage's had median 2.2 (max 4.8) with lse, 1.7 (max 4.0)
  with (M, L), the rest being the 3xTF32 dots.)
  Cost: reads dA, Zq, Zk, V, R (5 B C' N e) and KV, dKV, M, L (small), writes dQ, dK, dV, dR
  (4 B C' N e); 6 B C' d N flops of dots: d/6 flop per byte at fp32, HBM-bound.

  **The BatchNorm/hardswish backward is fused in** (FUSE_BN, the Triton stage set: `plan_b2`'s
  bn, `backward.Stages.b2_fused_bn`): dQ and dK are not written; G = dQ hardswish'(Zq a + b)
  and G = dK hardswish'(Zk a + b) are (Z of q and k read once for Q, K and G), with this
  program's per-channel partial sums sum G, sum G Z, sum G Zhat (`_bn_backward_tile`, stored at
  once: the kernel runs near 255 registers). The CRPE kernel does the same for V once dV is
  complete. Without it, B2 wrote dP (3 B C' N e) and a separate kernel read dP and Z and wrote
  G (9 B C' N e); fused, B2 reads Z and writes G (6 B C' N e): 6 B C' N e less per call
  (and since Q and K come from Z, 2 B C' N e less again).
* ``gma_b2_crpe_kernel``, grid ``(SPLITS, 8, B)``: the CRPE input gradient (in a kernel, no
  PyTorch ops left), program (split, h, b) walking its token tiles with the head's window
  KS (3, 5, 7) in one tap loop per tile: dV += dR correlated with the flipped taps (the
  adjoint of the depthwise convolution), and the bias gradient sum_n dR as per-program fp32
  partials (B, SPLITS, C') that the launcher sums (deterministic, no atomics). The weight
  gradient dW[c, ky, kx] = sum_n dR[c, n] V[c, n + (ky-R, kx-R)] is
  `aggregation_backward.gma_dw_wgrad_kernel`'s, one launch per window over its heads' channels
  of dR and V (`plan_b2`; until 2026-12-05 this kernel formed it in the same tap loop, with a
  cross-thread sum and a read-modify-write of global partials per tap and tile).
  Cost: reads dR and dV once (halos from L1/L2; 2 B C' N e), writes dV (B C' N e; fused:
  G of v in its place, Z of v read, B C' N e, and the BatchNorm sums' partials); per channel
  and token a multiply-add per tap, 30 taps on average (240 d taps over 8 d channels): 60
  flops per 12 bytes (fp32), 5 flop per byte, below the fp32 FMA ridge (about 20 on H100):
  HBM-bound. Its taps are a runtime loop, each iteration a shifted load with its address and mask
  arithmetic (sm_90 SASS, fp16: 44 instructions for 4 FFMA at C = 160, 78 for 8 at C = 320). With
  ROWS (the GPU default at D_PAD 16, `CRPE_ROWS_DEFAULT`; elsewhere a tuning candidate, `CRPE_ROWS_TILES`;
  not timed) a program walks runs of rows of BLOCK_P-column strips instead (`_crpe_backward_walk`, the
  forward's row walk of dR with the filter turned half a turn): KS independent loads per input row, the
  taps unrolled per window, the same bytes (compiler figures in docs/performance.md).

Tiles: `B1_TILES` / `B2_TILES` / `config.crpe_bwd_tiles` by D_PAD (and by dot precision where
the GPU generations need others), chosen by compiling (ptxas -v, the JIT's specialisations of
the real calls): zero spills for every released width at its stage grid on sm_70/75/80/90
(benchmarks/results/triton_backward_resources_*.md, regenerated with each kernel change); not
timed (no GPU where they were written; 200-255 registers at D_PAD = 32 limit occupancy, a GPU
run is to weigh smaller tiles: `benchmarks/tune.py --train`). tests/test_triton_attention_backward.py
compiles C = 320. One large tile under the interpreter.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..folding import FoldedGMAWeights
from ._common import (DotVariant, crpe_group, dot_variant, hardswish, hardswish_grad, interpreting, mm, rows_input,
                      rows_piece, rows_shift, stored)
from .aggregation import split_plan
from .aggregation_backward import dw_rows_plan, plan_dw_wgrad, taps_of
from .backward import crpe_groups
from .config import B1_TILES, B2_TILES, INTERPRETER_BLOCK_P, NUM_HEADS, cdiv, crpe_bwd_tiles, dot_pad, next_pow2
from ._launch import device_guard, wrap_triton
from .launcher import _alloc
from .tile_spaces import register_tiles

Tensor = torch.Tensor
#: one launch: (kernel, grid, positional args, keyword args incl. constexprs and num_warps)
Launch = Tuple[Any, Tuple[int, ...], tuple, Dict[str, Any]]


# ================================================================ kernels
@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def gma_b1_dkv_kernel(zq, da, part, bn_scale, bn_shift, N, tiles_per_split, scale,
                      sq_b, sq_h, sq_i, sq_n, sa_b, sa_h, sa_i, sa_n,
                      D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """part[b, h, split] = scale * sum over the split's tokens of Q[b,h,:,n] dA[b,h,:,n]^T, Q =
    hardswish(Zq bn_scale + bn_shift) computed on load from Z of the q images (zq, strides sq_*)."""
    split = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    SPLITS = tl.num_programs(0)
    i = tl.arange(0, D_PAD)
    imask = i < D
    q_bh = zq + b * sq_b + head * sq_h
    a_bh = da + b * sa_b + head * sa_h
    bn_a = tl.load(bn_scale + head * D + i, mask=imask, other=0.0)[:, None]
    bn_b = tl.load(bn_shift + head * D + i, mask=imask, other=0.0)[:, None]
    acc = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    t = split * tiles_per_split
    t1 = tl.minimum(t + tiles_per_split, tl.cdiv(N, BLOCK_N))
    while t < t1:
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m2 = imask[:, None] & nmask[None, :]
        zt = tl.load(q_bh + (i[:, None] * sq_i + n[None, :] * sq_n), mask=m2, other=0.0).to(tl.float32)
        qt = tl.where(m2, hardswish(zt * bn_a + bn_b), 0.0)                     # [D_PAD, BLOCK_N]
        at = tl.load(a_bh + (n[:, None] * sa_n + i[None, :] * sa_i), mask=nmask[:, None] & imask[None, :],
                     other=0.0).to(tl.float32)                                   # [BLOCK_N, D_PAD]
        acc = mm(qt, at, acc, DOT_PRECISION, EMULATE_DOTS)
        t += 1
    out = part + ((b * 8 + head) * SPLITS + split) * (D * D)
    tl.store(out + i[:, None] * D + i[None, :], acc * scale, mask=imask[:, None] & imask[None, :])


@triton.jit
def _bn_backward_tile(dp, z_ptr, m2, ch, cmask, a, bb, mean, rstd, row, CP: tl.constexpr,
                      BATCH_STATS: tl.constexpr):
    """G = dp hardswish'(Z a + b) of a [BLOCK_P, D_PAD] tile (tokens x the channels ch; Z loaded at
    z_ptr, widened; a, bb the channels' BatchNorm affine [1, D_PAD]), returned; its per-channel
    sums sum G, sum G Z, sum G Zhat (BATCH_STATS) stored at row, row + CP, row + 2 CP
    (`backward.b2_bn_sums`)."""
    z = tl.load(z_ptr, mask=m2, other=0.0).to(tl.float32)
    g = dp * hardswish_grad(z * a + bb)
    tl.store(row + ch, tl.sum(g, axis=0), mask=cmask)
    tl.store(row + CP + ch, tl.sum(g * z, axis=0), mask=cmask)
    if BATCH_STATS:
        mu = tl.load(mean + ch, mask=cmask, other=0.0)[None, :]
        rs = tl.load(rstd + ch, mask=cmask, other=0.0)[None, :]
        tl.store(row + 2 * CP + ch, tl.sum(g * ((z - mu) * rs), axis=0), mask=cmask)
    return g


@triton.jit(do_not_specialize=["N"])
def gma_b2_attention_kernel(da, v, r, kv, dkv, k_max, k_sum, dq, dk, dv, dr, zq, zk, bn_scale, bn_shift,
                            mean, rstd, part_bn, N, scale,
                            sa_b, sa_h, sa_i, sa_n,
                            CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                            FUSE_BN: tl.constexpr, BATCH_STATS: tl.constexpr):
    """dQ, dK, dV (attention part) and dR = dA * Q of one token tile and head.

    Q and K are computed on load from zq, zk (Z of the q and k images): hardswish(Z bn_scale +
    bn_shift); v (the v images' proxies), r, zq, zk and the outputs dq, dk, dv, dr are
    channels-first (B, C', N) contiguous
    (element (b, c, n) at (b C' + c) N + n); dA has its own strides; kv, dkv (B, 8, d, d) and
    the softmax statistics k_max, k_sum (B, 8, d) contiguous fp32.

    FUSE_BN (the BatchNorm/hardswish backward fused in, `_bn_backward_tile`): dq, dk receive
    G = dQ hardswish'(Zq a + b), G = dK hardswish'(Zk a + b) instead (Z reloaded: from the cache),
    and part_bn (B, T, 2, 3, C') fp32 rows (b, tile, q | k) this
    program's per-channel sums over its tokens: sum G, sum G Z and (BATCH_STATS) sum G Zhat."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = n < N
    c = tl.arange(0, D_PAD)
    cmask = c < D
    m2 = pmask[:, None] & cmask[None, :]
    mm2 = cmask[:, None] & cmask[None, :]
    base = (b * CP + head * D) * N                      # the head's first channel row (int64)
    tok = c[None, :] * N + n[:, None]                   # [BLOCK_P, D_PAD] offsets in it (int32)
    da_t = tl.load(da + b * sa_b + head * sa_h + (c[None, :] * sa_i + n[:, None] * sa_n), mask=m2,
                   other=0.0).to(tl.float32)
    ch = head * D + c
    bn_a = tl.load(bn_scale + ch, mask=cmask, other=0.0)[None, :]
    bn_b = tl.load(bn_shift + ch, mask=cmask, other=0.0)[None, :]
    q_t = tl.where(m2, hardswish(tl.load(zq + base + tok, mask=m2, other=0.0).to(tl.float32) * bn_a + bn_b), 0.0)
    r_t = tl.load(r + base + tok, mask=m2, other=0.0).to(tl.float32)
    tl.store(dr + base + tok, stored(da_t * q_t, dr, EMULATE_DOTS), mask=m2)
    # [k, i] tiles: KV^T and dKV^T (element [k, i] = X[i, k]); dKV as [i, k]
    bh = (b * 8 + head) * (D * D)
    tr = c[None, :] * D + c[:, None]
    kvT = tl.load(kv + bh + tr, mask=mm2, other=0.0)
    dkvT = tl.load(dkv + bh + tr, mask=mm2, other=0.0)
    dkv_t = tl.load(dkv + bh + c[:, None] * D + c[None, :], mask=mm2, other=0.0)
    dq_t = scale * mm(da_t, kvT, tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32), DOT_PRECISION, EMULATE_DOTS) + da_t * r_t
    if FUSE_BN:          # q's G and sums, stored at once (nothing of it kept alive: the kernel is near 255 registers)
        dq_t = _bn_backward_tile(dq_t, zq + base + tok, m2, ch, cmask, bn_a, bn_b, mean, rstd,
                                 part_bn + ((b * tl.num_programs(0) + t) * 2) * (3 * CP), CP, BATCH_STATS)
    tl.store(dq + base + tok, stored(dq_t, dq, EMULATE_DOTS), mask=m2)
    # softmax over tokens recomputed: Ks = exp(K - M) / L (K - M is exact near the maximum,
    # where Ks matters; exp(K - lse) would lose |K - lse| ulps to the rounding of lse)
    stat = (b * 8 + head) * D + c
    m_t = tl.load(k_max + stat, mask=cmask, other=0.0)
    inv_l = 1.0 / tl.load(k_sum + stat, mask=cmask, other=1.0)
    k_t = hardswish(tl.load(zk + base + tok, mask=m2, other=0.0).to(tl.float32) * bn_a + bn_b)
    ks = tl.where(m2, tl.exp(k_t - m_t[None, :]) * inv_l[None, :], 0.0)
    dv_t = mm(ks, dkv_t, tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32), DOT_PRECISION, EMULATE_DOTS)
    tl.store(dv + base + tok, stored(dv_t, dv, EMULATE_DOTS), mask=m2)
    v_t = tl.load(v + base + tok, mask=m2, other=0.0).to(tl.float32)
    dks = mm(v_t, dkvT, tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32), DOT_PRECISION, EMULATE_DOTS)
    cc = tl.sum(kvT * dkvT, axis=0)                                           # [i]: sum_k KV[i,k] dKV[i,k]
    dk_t = ks * (dks - cc[None, :])
    if FUSE_BN:
        dk_t = _bn_backward_tile(dk_t, zk + base + tok, m2, ch, cmask, bn_a, bn_b, mean, rstd,
                                 part_bn + ((b * tl.num_programs(0) + t) * 2 + 1) * (3 * CP), CP, BATCH_STATS)
    tl.store(dk + base + tok, stored(dk_t, dk, EMULATE_DOTS), mask=m2)


@triton.jit
def _bn_channels(bn_scale, bn_shift, mean, rstd, ch, cmask, D_PAD: tl.constexpr, FUSE_BN: tl.constexpr):
    """The CRPE backward's BatchNorm per channel ch ([D_PAD] each: scale, shift, mean, rstd), zeros when
    FUSE_BN is off (unread then)."""
    a = tl.zeros([D_PAD], dtype=tl.float32)
    bb = a
    mu = a
    rs = a
    if FUSE_BN:
        a = tl.load(bn_scale + ch, mask=cmask, other=0.0)
        bb = tl.load(bn_shift + ch, mask=cmask, other=0.0)
        mu = tl.load(mean + ch, mask=cmask, other=0.0)
        rs = tl.load(rstd + ch, mask=cmask, other=0.0)
    return a, bb, mu, rs


@triton.jit
def _crpe_dv_epilogue(dv_t, z_ptr, m2, a, bb, mu, rs, s_g, s_gz, s_gzh, FUSE_BN: tl.constexpr):
    """The CRPE backward's complete dV of a tile (the attention part plus the CRPE input gradient, fp32):
    with FUSE_BN, G = dV hardswish'(Zv a + b) (Z loaded at z_ptr) and its BatchNorm sums' per-element
    accumulators advanced; returned (G or dV, s_g, s_gz, s_gzh). The tile kernel's tiles are [D_PAD,
    BLOCK_P], the row walk's [BLOCK_P, D_PAD]: a, bb, mu, rs come broadcast to the tile's orientation."""
    if FUSE_BN:
        z_t = tl.load(z_ptr, mask=m2, other=0.0).to(tl.float32)
        dv_t = dv_t * hardswish_grad(z_t * a + bb)
        s_g += dv_t                                # dv_t, z_t: 0 outside the tile's valid elements
        s_gz += dv_t * z_t
        s_gzh += dv_t * ((z_t - mu) * rs)
    return dv_t, s_g, s_gz, s_gzh


@triton.jit
def _crpe_backward_walk(dr_h, dv_h, zv_h, w_last, tap_stride, c, cmask, strip, ya, yb, N, H, W,
                        a, bb, mu, rs, gb, s_g, s_gz, s_gzh, KS: tl.constexpr, BLOCK_P: tl.constexpr,
                        D_PAD: tl.constexpr, EMULATE_STORES: tl.constexpr, FUSE_BN: tl.constexpr):
    """ROWS: rows [ya, yb) of one BLOCK_P-column strip of one head's CRPE input gradient, walked down the strip
    (`_common.rows_input`, as the depthwise input gradient's `aggregation_backward._dw_backward_walk`): the
    gradient is the forward stencil of dR with the head's filter turned half a turn (w_last: each channel's
    last tap, tap_stride the group's -GROUP_HEADS d), so each dR row in reach is read once as its KS column
    shifts into KS rolling [BLOCK_P, D_PAD] accumulators; after input row i, output row i - R is complete:
    dV read, the CRPE gradient added, the BatchNorm backward fused in (`_crpe_dv_epilogue`), stored; its own
    dR row read again (from the cache) for the bias gradient. The per-element sums gb, s_* come and go."""
    R = KS // 2
    x = strip * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = x < W
    m2 = pmask[:, None] & cmask[None, :]
    chan = c * N                                                # the channels' rows in the head's planes
    zt = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6 = zt, zt, zt, zt, zt, zt, zt
    i = tl.maximum(ya - R, 0)
    while i < yb + R:
        a0, a1, a2, a3, a4, a5, a6, _b0, _b1, _b2, _b3, _b4, _b5, _b6 = rows_input(
            a0, a1, a2, a3, a4, a5, a6, zt, zt, zt, zt, zt, zt, zt, i, H, dr_h, x, cmask, chan, w_last, tap_stride,
            0, W, 1, KS, 1)
        o = i - R
        if o >= ya:
            own = chan[None, :] + (o * W + x)[:, None]
            gb += tl.load(dr_h + own, mask=m2, other=0.0).to(tl.float32)
            # lanes past W hold taps of the columns within reach: 0 there, for the sums
            dv_t = tl.where(m2, tl.load(dv_h + own, mask=m2, other=0.0).to(tl.float32) + a0, 0.0)
            dv_t, s_g, s_gz, s_gzh = _crpe_dv_epilogue(dv_t, zv_h + own, m2, a, bb, mu, rs, s_g, s_gz, s_gzh,
                                                       FUSE_BN)
            tl.store(dv_h + own, stored(dv_t, dv_h, EMULATE_STORES), mask=m2)
        a0, a1, a2, a3, a4, a5, a6 = rows_shift(a0, a1, a2, a3, a4, a5, a6, KS)
        i += 1
    return gb, s_g, s_gz, s_gzh


@triton.jit
def _crpe_backward_rows(dr_h, dv_h, zv_h, crpe_w3, crpe_w5, crpe_w7, head, c, cmask, t, t1, N, H, W,
                        a, bb, mu, rs, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                        EMULATE_STORES: tl.constexpr, FUSE_BN: tl.constexpr):
    """`gma_b2_crpe_kernel` with ROWS: the program's row tiles [t, t1) of its head and image (tile t: row
    t % H of strip t // H), one walk per piece of strip (`_crpe_backward_walk`, an instance per window,
    the filter's last tap first). Returns the per-element sums [BLOCK_P, D_PAD] (bias, and with FUSE_BN
    the BatchNorm's three)."""
    gb = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    s_g = gb
    s_gz = gb
    s_gzh = gb
    while t < t1:
        strip, ya, yb = rows_piece(t, t1, H)
        if head < 2:        # `_common.crpe_group`'s groups, each window a constexpr
            gb, s_g, s_gz, s_gzh = _crpe_backward_walk(
                dr_h, dv_h, zv_h, crpe_w3 + 8 * (2 * D) + head * D + c, -2 * D, c, cmask, strip, ya, yb, N, H, W,
                a, bb, mu, rs, gb, s_g, s_gz, s_gzh, 3, BLOCK_P, D_PAD, EMULATE_STORES, FUSE_BN)
        elif head < 5:
            gb, s_g, s_gz, s_gzh = _crpe_backward_walk(
                dr_h, dv_h, zv_h, crpe_w5 + 24 * (3 * D) + (head - 2) * D + c, -3 * D, c, cmask, strip, ya, yb, N,
                H, W, a, bb, mu, rs, gb, s_g, s_gz, s_gzh, 5, BLOCK_P, D_PAD, EMULATE_STORES, FUSE_BN)
        else:
            gb, s_g, s_gz, s_gzh = _crpe_backward_walk(
                dr_h, dv_h, zv_h, crpe_w7 + 48 * (3 * D) + (head - 5) * D + c, -3 * D, c, cmask, strip, ya, yb, N,
                H, W, a, bb, mu, rs, gb, s_g, s_gz, s_gzh, 7, BLOCK_P, D_PAD, EMULATE_STORES, FUSE_BN)
        t += yb - ya
    return gb, s_g, s_gz, s_gzh


@triton.jit(do_not_specialize=["N", "H", "W", "tiles_per_split"])
def gma_b2_crpe_kernel(dr, dv, crpe_w3, crpe_w5, crpe_w7, part_b, zv, bn_scale, bn_shift, mean, rstd,
                       part_bn, N, H, W, tiles_per_split,
                       CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                       EMULATE_STORES: tl.constexpr, FUSE_BN: tl.constexpr, BATCH_STATS: tl.constexpr,
                       ROWS: tl.constexpr = False):
    """CRPE input gradient of one head over a run of token tiles, one KS x KS tap loop per tile:
    for the offset o = (ky - R, kx - R) of tap (ky, kx), dv[n] += dR[n + o] * w[KS-1-ky, KS-1-kx]
    (correlation with the flipped taps), and part_b[b, split, c] = sum_n dR[n]. The weight
    gradient sum_n dR[n] V[n + o] is `aggregation_backward.gma_dw_wgrad_kernel`'s, one launch per
    window (`plan_b2`): until 2026-12-05 this kernel formed it too, summing each tap's products over
    the tile's tokens and adding them to its fp32 partials in global memory at every tile (a
    read-modify-write per tap and tile, a CTA barrier per tile). dr, dv channels-first (B, C', N) contiguous, in
    the stage dtype (widened on load; dv rounded on store as `stored` does: EMULATE_STORES
    under the interpreter). FUSE_BN: dv receives, in place, G = dV hardswish'(Zv a + b) of the
    complete dV (zv: Z of the v images, laid out as v), and part_bn (B, SPLITS, 3, C') fp32 row
    (b, split) this program's sums over its tokens, as the attention kernel's (`gma_b2_attention_kernel`).
    The taps are runtime loops for the reasons given in `_common.depthwise_tile`.

    ROWS (the "triton.b2_crpe" family's knob: the GPU default at D_PAD 16, `crpe_gpu_tile`; a tuning
    candidate elsewhere, `CRPE_ROWS_TILES`): the program's tiles
    are rows of BLOCK_P-column strips of its head and image (ceil(W / BLOCK_P) H of them, `tiles_per_split`
    a run, `crpe_rows_plan`), walked down their strip (`_crpe_backward_rows`): each dR element loaded KS
    times (and once more for the bias gradient) instead of KS x KS, the taps unrolled per window."""
    split = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    SPLITS = tl.num_programs(0)
    c = tl.arange(0, D_PAD)
    cmask = c < D
    base = (b * CP + head * D) * N                      # the head's first channel row (int64)
    dr_h = dr + base
    dv_h = dv + base
    prow = (b * SPLITS + split) * CP + head * D + c
    a, bb, mu, rs = _bn_channels(bn_scale, bn_shift, mean, rstd, head * D + c, cmask, D_PAD, FUSE_BN)
    if ROWS:
        t0 = split * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(W, BLOCK_P) * H)
        gb, s_g, s_gz, s_gzh = _crpe_backward_rows(dr_h, dv_h, zv + base, crpe_w3, crpe_w5, crpe_w7, head, c, cmask,
                                                   t0, t1, N, H, W, a[None, :], bb[None, :], mu[None, :], rs[None, :],
                                                   D, D_PAD, BLOCK_P, EMULATE_STORES, FUSE_BN)
        sum_axis: tl.constexpr = 0
    else:
        sum_axis: tl.constexpr = 1
        gb, s_g, s_gz, s_gzh = _crpe_backward_tiles(dr_h, dv_h, zv + base, crpe_w3, crpe_w5, crpe_w7, a[:, None],
                                                    bb[:, None], mu[:, None], rs[:, None], head, c, cmask, split,
                                                    tiles_per_split, N, H, W, D, D_PAD, BLOCK_P, EMULATE_STORES, FUSE_BN)
    tl.store(part_b + prow, tl.sum(gb, axis=sum_axis), mask=cmask)
    if FUSE_BN:
        row = part_bn + (b * SPLITS + split) * (3 * CP) + head * D + c
        tl.store(row, tl.sum(s_g, axis=sum_axis), mask=cmask)
        tl.store(row + CP, tl.sum(s_gz, axis=sum_axis), mask=cmask)
        if BATCH_STATS:
            tl.store(row + 2 * CP, tl.sum(s_gzh, axis=sum_axis), mask=cmask)


@triton.jit
def _crpe_backward_tiles(dr_h, dv_h, zv_h, crpe_w3, crpe_w5, crpe_w7, a, bb, mu, rs, head, c, cmask,
                         split, tiles_per_split, N, H, W, D: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_P: tl.constexpr, EMULATE_STORES: tl.constexpr, FUSE_BN: tl.constexpr):
    """`gma_b2_crpe_kernel`'s token tiles [D_PAD, BLOCK_P] (channels x tokens) of its split, one KS x KS tap
    loop per tile (a, bb, mu, rs: the BatchNorm's per channel, [D_PAD, 1]); returns the per-element sums
    (bias, and with FUSE_BN the BatchNorm's three)."""
    ks, first, crpe_w, group_heads = crpe_group(head, crpe_w3, crpe_w5, crpe_w7)
    R = ks // 2
    last = ks * ks - 1
    w_taps = crpe_w + (head - first) * D + c            # tap-major (ks, ks, group_heads D)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_P))
    # the per-channel sums are kept per element ([D_PAD, BLOCK_P]) across the tiles and summed over the
    # tokens once, after the last: a sum per tile cost CTA barriers (sm_90 SASS: 12 per tile for the four)
    gb = tl.zeros([D_PAD, BLOCK_P], dtype=tl.float32)
    s_g = gb
    s_gz = gb
    s_gzh = gb
    t = t0
    while t < t1:                                       # [D_PAD, BLOCK_P] tiles: channels x tokens
        n = t * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = n < N
        y = n // W
        x = n % W
        own = c[:, None] * N + n[None, :]               # offsets in the head's rows (int32)
        dr_t = tl.load(dr_h + own, mask=cmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
        gb += dr_t
        conv = tl.zeros([D_PAD, BLOCK_P], dtype=tl.float32)
        ky = 0
        while ky < ks:
            row_ok = pmask & (y + ky - R >= 0) & (y + ky - R < H)
            row = own + ((ky - R) * W - R)                                    # tap (ky, 0)
            kx = 0
            while kx < ks:
                ok = row_ok & (x + kx - R >= 0) & (x + kx - R < W)
                mk = cmask[:, None] & ok[None, :]
                tap = ky * ks + kx
                wv = tl.load(w_taps + (last - tap) * (group_heads * D), mask=cmask, other=0.0)
                conv += tl.load(dr_h + (row + kx), mask=mk, other=0.0).to(tl.float32) * wv[:, None]
                kx += 1
            ky += 1
        ptr = dv_h + own
        m2 = cmask[:, None] & pmask[None, :]
        dv_t = tl.load(ptr, mask=m2, other=0.0).to(tl.float32) + conv
        dv_t, s_g, s_gz, s_gzh = _crpe_dv_epilogue(dv_t, zv_h + own, m2, a, bb, mu, rs, s_g, s_gz, s_gzh, FUSE_BN)
        tl.store(ptr, stored(dv_t, ptr, EMULATE_STORES), mask=m2)
        t += 1
    return gb, s_g, s_gz, s_gzh


# ================================================================ launchers
#: split-N: about this many programs for the token reductions (B1, CRPE), as the forward
SPLIT_TARGET = 1024


def _split_plan(N: int, B: int, block: int) -> Tuple[int, int]:
    """(splits, tiles_per_split) for about SPLIT_TARGET programs, 8 (heads) per image and split."""
    return split_plan(N, B, block, SPLIT_TARGET, NUM_HEADS)


def _tile(table: Dict[int, Tuple[int, int]], d: int, N: int, block: int = 0) -> Tuple[int, int]:
    """(tokens per tile, num_warps): `block` if given, one large tile under the interpreter, else the table's."""
    bp, warps = table[dot_pad(d)]
    if block:
        return block, warps
    if interpreting():
        return min(INTERPRETER_BLOCK_P, max(16, next_pow2(N))), warps
    return bp, warps


def _crpe_tile(tile: Optional[Tuple[int, ...]], d: int, N: int, block: int, precision: str) -> Tuple[int, int, int]:
    """(tokens per tile or strip columns, num_warps, ROWS) of the CRPE backward: a "triton.b2_crpe" tile
    (ROWS 0 where the tuple stops before it), else the GPU default (`crpe_gpu_tile`), or under the interpreter
    or with a `block` `_tile`'s of `config.crpe_bwd_tiles` (the tile kernel)."""
    if tile:
        return int(tile[0]), int(tile[1]), int(tile[2]) if len(tile) > 2 else 0
    if block or interpreting():
        return _tile(crpe_bwd_tiles(precision), d, N, block) + (0,)
    return crpe_gpu_tile(d, precision)


#: The CRPE backward's default on a GPU where it is a row walk (ROWS), by D_PAD, since 2026-12-05: at D_PAD 16
#: (C = 80, 160) (16, 4) issues about half the tile kernel's instructions per element (sm_90 SASS, fp16: ~190
#: against ~400 at C = 160) at 32 warps per SM or more where the tile kernel had as many (61-80 registers at 4
#: warps against the tile kernel's 48-110 at 8 on sm_80/90: 24 warps against 16 at C = 160, 32 against 32-40
#: at C = 80). Only with tensor-core dots (`CRPE_ROWS_DEFAULT_PRECISIONS`, sm_80+; the kernel has no dots, the
#: precision stands for the GPU generation): on sm_70 the walk spilled 12 B at C = 80 (72 registers; sm_75, the
#: same "ieee" precision, none at 70-80 against the tile kernel's 115-161). Not at d < `CRPE_ROWS_DEFAULT_MIN_D`
#: (C = 40: 4 B spilled on sm_80), nor at D_PAD 32 and 64, where the walk holds more registers than the tile
#: kernel (116-158 against 107-154 at C = 200-320) or spills ((16, 8) at C = 200 / 240 fp32 on sm_80): there
#: the walks stay tuning candidates. Not timed.
CRPE_ROWS_DEFAULT: Dict[int, Tuple[int, int, int]] = {16: (16, 4, 1)}
CRPE_ROWS_DEFAULT_MIN_D = 8
CRPE_ROWS_DEFAULT_PRECISIONS = ("tf32", "tf32x3")


def crpe_gpu_tile(d: int, precision: str) -> Tuple[int, int, int]:
    """The CRPE backward's GPU default (tokens per tile or strip columns, num_warps, ROWS) for heads of d
    channels: `CRPE_ROWS_DEFAULT`'s row walk where it applies, else the tile kernel's `config.crpe_bwd_tiles`."""
    dp = dot_pad(d)
    if dp in CRPE_ROWS_DEFAULT and d >= CRPE_ROWS_DEFAULT_MIN_D and precision in CRPE_ROWS_DEFAULT_PRECISIONS:
        return CRPE_ROWS_DEFAULT[dp]
    return crpe_bwd_tiles(precision)[dp] + (0,)


#: ROWS: runs of at least this many rows (or H), the widest window's: a run re-reads R rows above and below
#: it (`aggregation_backward.dw_rows_plan`'s reason); one plan for the three windows of a launch
CRPE_ROWS_MIN_RUN = 7


def crpe_rows_plan(H: int, W: int, B: int, strip: int) -> Tuple[int, int]:
    """(splits, tiles_per_split) of `gma_b2_crpe_kernel`'s row walks (ROWS): the ceil(W / strip) H row tiles
    of each head and image cut into about SPLIT_TARGET / (8 B) runs of at least CRPE_ROWS_MIN_RUN rows
    (runs cross strips: `_crpe_backward_rows`)."""
    return dw_rows_plan(1, H, W, CRPE_ROWS_MIN_RUN, strip, NUM_HEADS * B, SPLIT_TARGET)


def _channels_first(x: Tensor) -> Tensor:
    """x (B, 8, d, N) as a contiguous channels-first tensor (a copy only when it is not one)."""
    return x if x.is_contiguous() else x.contiguous()


def plan_b1(Zq: Tensor, dA: Tensor, scale: float, bn_scale: Tensor, bn_shift: Tensor,
            dots: Optional[DotVariant] = None, block: int = 0, tile: Optional[Tuple[int, int]] = None
            ) -> Tuple[Tensor, List[Launch]]:
    """(fp32 partials (B, 8, SPLITS, d, d), [launch]) of B1 without launching (meta tensors work).
    Zq: Z of the q images as (B, 8, d, N) (Q = hardswish(Zq bn_scale + bn_shift), computed on
    load; bn_scale, bn_shift: C' = 8d values). tile: (tokens per tile, num_warps), default
    `_tile`'s (the "triton.b1" tuning family's entry comes through `train_op.triton_stages`)."""
    B, h, d, N = Zq.shape
    assert h == NUM_HEADS and dA.shape == Zq.shape, (Zq.shape, dA.shape)
    dots = dots or dot_variant(Zq)
    bn, warps = tile or _tile(B1_TILES, d, N, block)
    splits, tps = _split_plan(N, B, bn)
    part = _alloc((B, h, splits, d, d), torch.float32, Zq.device)
    affine = [t.reshape(-1).float().contiguous() for t in (bn_scale, bn_shift)]
    args = (Zq, dA, part, *affine, N, tps, float(scale), *Zq.stride(), *dA.stride())
    kwargs = dict(D=d, D_PAD=dot_pad(d), BLOCK_N=bn, DOT_PRECISION=dots.precision, EMULATE_DOTS=dots.emulate,
                  num_warps=warps)
    return part, [(gma_b1_dkv_kernel, (splits, h, B), args, kwargs)]


def _run(launches: List[Launch], like: Tensor) -> None:
    """Launch in order under like's CUDA device, through `_launch.wrap_triton` (torch.compile sees the kernels while tracing)."""
    with device_guard(like):
        for kernel, grid, args, kwargs in launches:
            wrap_triton(kernel)[grid](*args, **kwargs)


def b1_dkv(Zq: Tensor, dA: Tensor, scale: float, bn_scale: Tensor, bn_shift: Tensor, block: int = 0,
           dots: Optional[DotVariant] = None, tile: Optional[Tuple[int, int]] = None) -> Tensor:
    """B1 as kernels: dKV (B, 8, d, d) fp32 = scale * Q dA^T over tokens, Q = hardswish(Zq bn_scale
    + bn_shift) (`backward.b1_dkv` of that Q); Zq, dA (B, 8, d, N), any strides, fp32/fp16/bf16.
    `block`: tokens per tile (tests; default the tile table's); dots: default Zq's variant;
    tile: `plan_b1`'s."""
    part, launches = plan_b1(Zq, dA, scale, bn_scale, bn_shift, dots, block=block, tile=tile)
    _run(launches, Zq)
    return part[:, :, 0] if part.shape[2] == 1 else part.sum(2)


def b1_stage(rc: Dict[str, Tensor], dA: Tensor, scale: float, wts: FoldedGMAWeights, **kw) -> Tensor:
    """`backward.Stages.b1_dkv` on the kernel: `b1_dkv` of Z's q images (rc["Z"]) and the
    BatchNorm affine."""
    return b1_dkv(rc["Z"][:dA.shape[0]].reshape(dA.shape), dA, scale, wts.bn_scale, wts.bn_shift, **kw)


def plan_b2(dA: Tensor, dKV: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, scale: float,
            dots: Optional[DotVariant] = None, block: int = 0,
            tiles: Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, ...]]] = (None, None),
            bn: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None, wgrad_tiles=None
            ) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """Buffers and the launches of B2 without launching (meta tensors work): the attention kernel, the
    CRPE kernel, and the CRPE weight gradient (`aggregation_backward.plan_dw_wgrad`, one launch per
    window). tiles: (the attention kernel's, the CRPE kernel's) (tokens per tile, num_warps), each
    default `_tile`'s (the "triton.b2" / "triton.b2_crpe" tuning families' entries come through
    `train_op.triton_stages`); wgrad_tiles: the weight gradient's (`aggregation_backward.BackwardTiles`,
    the "triton.backward" family's stencil tile; default its default).

    bn: (mean, rstd) of the batch statistics, or (None, None) with running statistics: the
    BatchNorm/hardswish backward fused into both kernels (their FUSE_BN; rc["Z"] read): "dP"
    then holds G = dP hardswish'(Z bn_scale + bn_shift) (`backward.b2_bn_sums`' G), and
    part_bn_attention (B, T, 2, 3, C') / part_bn_crpe (B, SPLITS, 3, C') fp32 the per-program
    sums sum G, sum G Z, sum G Zhat (the last with batch statistics). None: dP itself.

    Reads rc["Z"] (3B, C', H, W) (Q and K: hardswish(Z bn_scale + bn_shift) of the q and k
    images, computed on load), rc["V"] (B, C', H, W) (the v images' proxies), rc["KV"], rc["R"],
    all but KV in one stage dtype.
    Buffers: dP (3B, C', H, W) (the result) and dR (B, C', N) in the stage dtype,
    k_max, k_sum (B, 8, d) fp32, part_b (B, SPLITS, C') fp32 (the CRPE bias gradient's partials) and
    part_w3, part_w5, part_w7 fp32 (the CRPE weight gradient's per window: `plan_dw_wgrad`'s part_gw,
    summed by `aggregation_backward.taps_of`)."""
    Z, V, KV, R = rc["Z"], _channels_first(rc["V"]), rc["KV"], rc["R"]
    B, h, d, N = dA.shape
    H, W = Z.shape[-2:]
    cp = h * d
    if V.dtype != Z.dtype or tuple(Z.shape) != (3 * B, cp, H, W) or tuple(V.shape) != (B, cp, H, W):
        raise TypeError(f"Z {Z.dtype} {tuple(Z.shape)}, V {V.dtype} {tuple(V.shape)}: expected "
                        f"(3B, C', H, W) and (B, C', H, W) = ({3 * B}, {cp}, {H}, {W}) and ({B}, ...) in one dtype")
    dots = dots or dot_variant(dA)
    zq, zk = (_channels_first(Z[j * B:(j + 1) * B]) for j in range(2))
    k_max, k_sum = rc.get("k_max"), rc.get("k_sum")
    if k_max is None:     # not from a recompute kernel (yet): PyTorch passes over K
        pre = zk.float() * wts.bn_scale.reshape(-1)[:, None, None] + wts.bn_shift.reshape(-1)[:, None, None]
        Kh = torch.nn.functional.hardswish(pre).reshape(B, h, d, N)
        k_max = Kh.amax(dim=-1)
        k_sum = torch.exp(Kh - k_max[..., None]).sum(dim=-1)
    f32 = (torch.float32, dA.device)
    st = (Z.dtype, dA.device)            # the stage dtype (`config.stage_dtype`: Z's, from the recompute)
    buf = {"dP": _alloc((3 * B, cp, H, W), *st), "dR": _alloc((B, cp, N), *st),
           "k_max": k_max.float().contiguous(), "k_sum": k_sum.float().contiguous()}
    dP = buf["dP"]
    bp, warps = tiles[0] or _tile(B2_TILES, d, N, block)
    bc, cwarps, crpe_rows = _crpe_tile(tiles[1], d, N, block, dots.precision)
    splits, tps = crpe_rows_plan(H, W, B, bc) if crpe_rows else _split_plan(N, B, bc)
    T = cdiv(N, bp)
    stats = bn is not None and bn[0] is not None
    bn_t = [t.reshape(-1).float().contiguous() for t in (wts.bn_scale, wts.bn_shift)]
    if bn is not None:
        zv = _channels_first(Z[2 * B:])
        bn_t += [t.reshape(-1).float().contiguous() for t in bn] if stats else bn_t
        buf["part_bn_attention"] = _alloc((B, T, 2, 3, cp), *f32)
        buf["part_bn_crpe"] = _alloc((B, splits, 3, cp), *f32)
    else:                  # unread (FUSE_BN off): any tensors of the right kinds
        zv = zq
        bn_t += bn_t
        buf["part_bn_attention"] = buf["part_bn_crpe"] = buf["k_max"]
    args = (dA, V, _channels_first(R), KV.float().contiguous(), dKV.float().contiguous(), buf["k_max"],
            buf["k_sum"], dP[:B], dP[B:2 * B], dP[2 * B:], buf["dR"], zq, zk, *bn_t, buf["part_bn_attention"],
            N, float(scale), *dA.stride())
    kwargs = dict(CP=cp, D=d, D_PAD=dot_pad(d), BLOCK_P=bp, DOT_PRECISION=dots.precision,
                  EMULATE_DOTS=dots.emulate, FUSE_BN=bn is not None, BATCH_STATS=stats, num_warps=warps)
    attn = (gma_b2_attention_kernel, (T, h, B), args, kwargs)
    buf["part_b"] = _alloc((B, splits, cp), *f32)
    crpe_w = [w.float().contiguous() for w in (wts.crpe_w3, wts.crpe_w5, wts.crpe_w7)]
    cargs = (buf["dR"], dP[2 * B:], *crpe_w, buf["part_b"], zv, *bn_t, buf["part_bn_crpe"], N, H, W, tps)
    ckwargs = dict(CP=cp, D=d, D_PAD=dot_pad(d), BLOCK_P=bc, EMULATE_STORES=interpreting(), FUSE_BN=bn is not None,
                   BATCH_STATS=stats, num_warps=cwarps)
    if crpe_rows:
        ckwargs["ROWS"] = True
    crpe = (gma_b2_crpe_kernel, (splits, h, B), cargs, ckwargs)
    # the CRPE weight gradients: one launch of the depthwise weight-gradient kernel per window, over
    # the window's heads' channels of dR and V (the kernel's partials: `aggregation_backward.taps_of`)
    dr_img, v_img = buf["dR"].view(B, cp, H, W), V.view(B, cp, H, W)
    wgrad = []
    for (a, b_), k in zip(crpe_groups(d), (3, 5, 7)):
        wbuf, lw = plan_dw_wgrad(dr_img[:, a:b_], v_img[:, a:b_], k, wgrad_tiles)
        buf[f"part_w{k}"] = wbuf["part_gw"]
        wgrad += lw
    return buf, [attn, crpe] + wgrad


def b2_proxy_grads(dA: Tensor, dKV: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, scale: float,
                   block: int = 0, dots: Optional[DotVariant] = None,
                   tiles: Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, ...]]] = (None, None),
                   bn: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None, wgrad_tiles=None) -> tuple:
    """B2 as kernels: dP (3B, C', H, W) = [dQ; dK; dV] in the stage dtype, the CRPE weight gradients (3x3, 5x5,
    7x7) and the bias gradient, as `backward.b2_proxy_grads`. Reads rc["Z"], rc["V"], rc["KV"], rc["R"]
    and the softmax statistics rc["k_max"], rc["k_sum"] (B, 8, d) when present (else computed from K;
    rc["Ks"], rc["P"] are not read). dots: default dA's variant; tiles: `plan_b2`'s. bn (`plan_b2`): the
    BatchNorm/hardswish backward fused in: (G, the CRPE gradients, (sum G, sum G Z, sum G Zhat or
    None)), `backward.b2_bn_sums`' G and sums, instead of dP (`backward.Stages.b2_fused_bn`)."""
    buf, launches = plan_b2(dA, dKV, rc, wts, scale, dots, block=block, tiles=tiles, bn=bn, wgrad_tiles=wgrad_tiles)
    _run(launches, dA)
    d = dA.shape[2]
    g_w = [taps_of(buf[f"part_w{k}"], b - a, k) for (a, b), k in zip(crpe_groups(d), (3, 5, 7))]
    if bn is None:
        return buf["dP"], g_w, buf["part_b"].sum(dim=(0, 1))
    sums = buf["part_bn_attention"].sum(dim=(0, 1, 2)) + buf["part_bn_crpe"].sum(dim=(0, 1))      # (3, C')
    return buf["dP"], g_w, buf["part_b"].sum(dim=(0, 1)), (sums[0], sums[1], sums[2] if bn[0] is not None else None)


B1_FAMILY = "triton.b1"
B2_FAMILY = "triton.b2"
CRPE_FAMILY = "triton.b2_crpe"
#: Further (tokens per tile, num_warps) the tuner tries for each of the three kernels
#: (benchmarks/tune.py --train refuses one that spills at the call's width). AOT sweep of the
#: candidates (2026-12-02, `specializations.candidate_specializations`: GroupMixFormer-S's real calls
#: at batch 128, fp32 and bf16, sm_90): none spilled then (at most 170 / 188 / 244 registers for
#: B1 / B2 / CRPE); since B2 forms Q, K from Z (2026-12-03) B2's (64, 4) and (64, 8) spill at
#: D_PAD = 32 on some architectures (`config.B2_TILES`' note), which the tuner refuses there.
TILE_SEARCH = ((64, 4), (32, 4), (32, 8), (16, 4), (64, 8))


def _gpu_tile(table: Dict[int, Tuple[int, int]]):
    return lambda C, precision: table[dot_pad(C // 10)]


register_tiles(B1_FAMILY, ("BLOCK_P", "num_warps"), _gpu_tile(B1_TILES), lambda C, p: TILE_SEARCH,
               [gma_b1_dkv_kernel])
register_tiles(B2_FAMILY, ("BLOCK_P", "num_warps"), _gpu_tile(B2_TILES), lambda C, p: TILE_SEARCH,
               [gma_b2_attention_kernel])
#: The CRPE backward's row walks by D_PAD (ROWS 1: BLOCK_P the strip's columns), tried right after the default
#: (`_crpe_search`), so a tune cut short still times them. Not timed. AOT compile (2026-12-05, Triton 3.6,
#: batch 128, the training step's launches, fp16 and fp32): at D_PAD 16 (C = 80, 160) (16, 4) takes 60-80
#: registers and (32, 4) 79-155 on sm_80/90; at D_PAD 32 (C = 320) (16, 4) 116-158, while (32, 4) ran into
#: 255 and spilled 28 B on sm_80 with batch statistics, so (16, 8) there (two elements a thread).
CRPE_ROWS_TILES: Dict[int, Tuple[Tuple[int, int, int], ...]] = {16: ((16, 4, 1), (32, 4, 1)),
                                                                  32: ((16, 4, 1), (16, 8, 1)), 64: ((16, 8, 1),)}


def _crpe_search(C: int, precision: str) -> List[Tuple[int, ...]]:
    """`CRPE_ROWS_TILES` of the width's D_PAD, the tile kernel at `config.crpe_bwd_tiles`' tile, then
    TILE_SEARCH's token tiles (the default, `crpe_gpu_tile`, dropped where it recurs; the family keeps
    `tile_spaces.MAX_CANDIDATES`: the first ones)."""
    dp = dot_pad(C // 10)
    return (list(CRPE_ROWS_TILES.get(dp, ())) + [crpe_bwd_tiles(precision)[dp] + (0,)]
            + [t + (0,) for t in TILE_SEARCH])


register_tiles(CRPE_FAMILY, ("BLOCK_P", "num_warps", "ROWS"), lambda C, p: crpe_gpu_tile(C // 10, p),
               _crpe_search, [gma_b2_crpe_kernel])
