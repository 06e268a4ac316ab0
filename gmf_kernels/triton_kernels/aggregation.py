"""ONE-PASS group-proxy aggregation (eval mode, BatchNorm folded): kernel + launcher.

Grid ``(PROGRAMS, B)``, a flat, cost-balanced list of programs per image. The N tokens of an
image are cut into T = ceil(N / BLOCK_P) tiles of BLOCK_P tokens consecutive in *strip order*
(`_tile`: vertical strips of about 16 columns, `config.strip_width`, row by row within a strip;
an image at most 16 wide is one strip, i.e. row-major), so that a program's run of tiles walks
down a strip and the stencil halo its next tile needs is mostly in L1 already. The work is five
*jobs*, each one disjoint channel slice of the (B, N, 3C) qkv:

* job 0: segment 0 of q, k, v:  ``hardswish(t * bn_scale[0] + bn_shift[0])`` (no halo).
* job j = 1, 2, 3: segment j of q, k, v: depthwise (2j+1)x(2j+1) (``dw3``/``dw5``/``dw7``,
  halo j rows/cols), then the s x s pointwise ``pw[j-1]`` as ``tl.dot`` into each head's d
  outputs, then the BatchNorm affine ``* bn_scale[j] + bn_shift[j]`` and hardswish. The three
  streams share the filters: by default one depthwise pass per channel chunk computes all
  three (`_dw_pw_qkv`, MERGE_QKV), else stream after stream (`config.AGG_SEPARATE_STREAMS`); with
  PAIR (`GMAShape.AGG_PAIR`, a tuning candidate where s is a power of two) the two heads of the
  segment as one [BLOCK_P, s] tensor per stream (`_segment_pair`).
  With ROWS (`GMAShape.AGG_ROWS`, a tuning candidate with PAIR) the tiles are rows of
  BLOCK_P-column strips and jobs 1-3 walk them down each strip (`_segment_rows`): each input row
  read once per walk into KS rolling accumulators instead of KS x KS taps per tile.
* job 4: the local branch: depthwise 3x3 over segment 4 of q, k, v (the 3s stacked
  channels), 3s -> s pointwise (accumulated ``tl.dot``), LayerNorm, hardswish, stored
  straight into channels [C', C) of ``pre`` (with ZDENSE the pointwise's output read from the dense Z
  pass, `config.GMAShape.local_from_z`: LayerNorm, hardswish and the store only).

Their costs per tile differ several-fold (taps 0 : 9 : 25 : 49 : 27 plus the channel mixes), so
job j is cut into its own number of splits ``splits[j]`` (`job_plan`: programs of each job in
proportion to its cost per tile, `aggregate_job_costs`), each split a contiguous run of
``ceil(T / splits[j])`` tiles. Program ``pid`` of image ``b`` decodes (job, split) from the
running sums of ``splits`` (five runtime integers): jobs 0, 1, 2, 3, 4 own the program ranges
[0, e1), [e1, e2), [e2, e3), [e3, e4), [e4, e4 + splits[4]). With a small batch this cuts the
7x7 job finer than the others (it was the critical path: every job had the same splits); with a
large batch every program carries about the same work, so the tail is one average program.

So every qkv element is read by exactly one job (plus the stencil halo, through cache),
and no split/cat/permute copy ever exists. Segment j holds heads 2j and 2j+1; per head
the job stores the Q and V proxies (x.dtype, channel head*d + i of ``q``/``v``)
and, instead of K, runs the softmax over tokens as an online reduction (FlashAttention's
rescaling, applied along N) over the tiles it visits, in registers:

    M' = max(M, max_n K[n, i]);  a = exp(M - M')
    L   <- a L + sum_n exp(K[n, i] - M')
    ACC <- a ACC + sum_n exp(K[n, i] - M') V[n, k]      (the head's d x d block of Ksᵀ V)

and stores (M, L, ACC) once per split, fp32, in a *packed* layout: the splits of segments
0..3 are rows ``r`` = the program index ``pid`` (segment j's splits are rows [e_j, e_j+1)), so
R = e4 rows per image; ``part_m/part_l[b, r, e*d + i]`` and ``part_acc[b, r, e*d + i, k]`` for
head 2j + e (a row holds the segment's two heads, s = 2d channels). K never reaches memory;
``attention.gma_combine_kernel`` merges segment j's ``splits[j]`` partials with the same
rescaling. (Packed, not padded to max_j splits[j] per segment: that layout would write and read
4 max_j splits[j] rows instead of sum_j splits[j] (e.g. 392 against 240 at C=80 56x56 batch 1)
and need the unused rows initialised to the neutral (-inf, 0, 0) by an extra fill.)

Weights per program: the BatchNorm scale/shift (and the local branch's LayerNorm weight/bias)
are loaded once, before the tile loop. The pointwise weights (``pw``: [CK, D_PAD] per head and
chunk; ``local_pw``: [CK, S_PAD] per chunk) are tile-invariant too but stay inside the loop (L1
hits; in the merged q/k/v pass one load per chunk serves the three streams' six dots): loaded
once per program where the segment is one chunk (S <= CK, i.e. C = 40, 80, 160),
they raised ptxas's registers by 27-77 per thread against the same kernel without it (C=80 fp32
sm_90 176 -> 253, C=160 bf16 sm_80 168 -> 224, C=40 fp16 sm_70 128 -> 166: a dot's right
operand is replicated across the warps), i.e. fewer resident CTAs, to save about a tenth of
the loop's L1 loads (AOT compile, sm_70/75/80/90, Triton 3.6), so they are not hoisted.

The depthwise taps' weights cannot live in registers either: indexed by the runtime tap loops,
and a thread would need KS² x its 4 channels of them (196 registers for a 7x7 chunk). They are
read per tap from L1, laid out for it: the folded depthwise weights are tap-major, (KS, KS, s)
(`folding`), so one tap of a 32-channel chunk is one contiguous 128-byte line, one vector load
per thread (``ld.v4``) beside the activation load of the same tap. With the (s, KS, KS) layout
of the parameters the same load was 4 scalar loads per thread touching one line per channel
(stride KS² floats): per tap and warp 5 load instructions over up to 36 lines and 48 sectors
(7x7, fp32: 32 weight + 16 activation sectors), now 2 instructions over 5 lines and 20
sectors (4 + 16; bf16 activations: 12 against 40). Bound aimed at: the taps are L1-bound (one
activation load per multiply-add per thread-channel), the kernel as a whole HBM-bound on its
compulsory bytes (qkv read once, q, v and pre written once: `costs.aggregate_bytes`); these
figures are from the compiled code's layouts (TTGIR, sm_90), not a measurement.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (DotVariant, depthwise_taps, depthwise_tile, dot_variant, hardswish, interpreting, mm,
                      rows_input, rows_piece, rows_shift, stored)
from ._launch import device_guard
from .config import cdiv, dtype_name, operand_precision, stage_dtype, strip_width


@triton.jit
def _tile(t, N, H, W, SW, BLOCK_P: tl.constexpr, ROWS: tl.constexpr = False):
    """Tokens of tile t: index n = y W + x, validity, row y, column x.

    Strip order (`config.strip_width`): the image is cut into vertical strips of SW columns (the
    last one W - (strips - 1) SW wide), tokens are numbered strip by strip and row by row within
    a strip, and tile t is positions [t BLOCK_P, (t + 1) BLOCK_P) of that order (so T =
    ceil(N / BLOCK_P) tiles, no padded lanes but the last tile's; a tile may span rows and
    strips). A program walks consecutive tiles, i.e. down its strip: the next tile's stencil
    halo is mostly rows the last tiles read, still in L1, where a walk along whole rows of a
    wide image (SW = W) finds them evicted by the time it comes back a row lower. SW = W is
    row-major order.

    ROWS (`GMAShape.AGG_ROWS`): tile t is ONE row of a strip BLOCK_P columns wide, strip t // H,
    row t % H (T = ceil(W / BLOCK_P) H tiles; the lanes past W invalid), the tiles the row walk of
    `_segment_rows` emits."""
    if ROWS:
        strip = t // H
        row = t - strip * H
        x = strip * BLOCK_P + tl.arange(0, BLOCK_P)
        y = tl.zeros([BLOCK_P], dtype=tl.int32) + row
        return y * W + x, x < W, y, x
    else:
        i = t * BLOCK_P + tl.arange(0, BLOCK_P)
        strip = i // (H * SW)
        local = i - strip * (H * SW)
        width = tl.maximum(tl.minimum(SW, W - strip * SW), 1)     # >= 1 on the lanes past N too
        y = local // width
        x = strip * SW + local % width
        return y * W + x, i < N, y, x


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
def _store_partial(M, L, ACC, row, e, part_m, part_l, part_acc, D: tl.constexpr, D_PAD: tl.constexpr):
    """(M, L, ACC) of head e (0, 1) of a segment into partial row `row` (int64, counted over the
    whole batch: b R + pid; 2 D channels a row). The row's pointers are formed here, after the
    tile loop, not kept in registers across it (the kernel runs near ptxas's register limit)."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    ch = row * (2 * D) + e * D + kk
    tl.store(part_m + ch, M, mask=kmask)
    tl.store(part_l + ch, L, mask=kmask)
    tl.store(part_acc + ch[:, None] * D + kk[None, :], ACC, mask=kmask[:, None] & kmask[None, :])


@triton.jit
def _segment0_head(qkv_b, q_b, v_b, a, sh, ch, m2, n, pmask, stride_n, M, L, ACC,
                   C: tl.constexpr, CP: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    src = qkv_b + n[:, None] * stride_n + ch[None, :]
    return _elementwise_head(src, C, 2 * C, q_b, v_b, a, sh, ch, m2, n, pmask, M, L, ACC, CP, DOT_PRECISION,
                             EMULATE_DOTS)


@triton.jit
def _segment0_tile(t, qkv_b, q_b, v_b, a0, s0, a1, s1, kk, kmask, M0, L0, A0, M1, L1, A1, N, H, W, stride_n,
                   C: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, ROWS: tl.constexpr):
    """One tile of segment 0, both heads."""
    n, pmask, y, x = _tile(t, N, H, W, W, BLOCK_P, ROWS)
    m2 = pmask[:, None] & kmask[None, :]
    M0, L0, A0 = _segment0_head(qkv_b, q_b, v_b, a0, s0, kk, m2, n, pmask, stride_n, M0, L0, A0,
                                C, CP, DOT_PRECISION, EMULATE_DOTS)
    M1, L1, A1 = _segment0_head(qkv_b, q_b, v_b, a1, s1, D + kk, m2, n, pmask, stride_n, M1, L1, A1,
                                C, CP, DOT_PRECISION, EMULATE_DOTS)
    return M0, L0, A0, M1, L1, A1


@triton.jit
def _segment0(qkv_b, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift, row, t0, t1, N, H, W, stride_n,
              C: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
              BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
              ROWS: tl.constexpr = False, PIPE: tl.constexpr = 0):
    """Segment 0: hardswish(t * bn_scale[0] + bn_shift[0]) per channel, no stencil (its tiles
    in row-major order: strips buy nothing without a halo). PIPE > 0: the tile loop software-pipelined
    (`GMAShape.AGG_PIPE`)."""
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
    if PIPE > 0:
        for t in tl.range(t0, t1, num_stages=PIPE):
            M0, L0, A0, M1, L1, A1 = _segment0_tile(t, qkv_b, q_b, v_b, a0, s0, a1, s1, kk, kmask, M0, L0, A0, M1, L1,
                                                    A1, N, H, W, stride_n, C, CP, D, BLOCK_P, DOT_PRECISION,
                                                    EMULATE_DOTS, ROWS)
    else:
        t = t0
        while t < t1:
            M0, L0, A0, M1, L1, A1 = _segment0_tile(t, qkv_b, q_b, v_b, a0, s0, a1, s1, kk, kmask, M0, L0, A0, M1, L1,
                                                    A1, N, H, W, stride_n, C, CP, D, BLOCK_P, DOT_PRECISION,
                                                    EMULATE_DOTS, ROWS)
            t += 1
    _store_partial(M0, L0, A0, row, 0, part_m, part_l, part_acc, D, D_PAD)
    _store_partial(M1, L1, A1, row, 1, part_m, part_l, part_acc, D, D_PAD)


@triton.jit
def _elementwise_head(src, off_k, off_v, q_b, v_b, a, sh, ch, m2, n, pmask, M, L, ACC,
                      CP: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """One head of an element-wise segment, one tile: q, k, v loaded from src, src + off_k, src + off_v, then
    `_head_epilogue` (Q and V stored at channel ch of q / v)."""
    dst = n[:, None] * CP + ch[None, :]
    return _head_epilogue(tl.load(src, mask=m2, other=0.0).to(tl.float32),
                          tl.load(src + off_k, mask=m2, other=0.0).to(tl.float32),
                          tl.load(src + off_v, mask=m2, other=0.0).to(tl.float32),
                          a, sh, q_b + dst, v_b + dst, m2, pmask, M, L, ACC, DOT_PRECISION, EMULATE_DOTS)


@triton.jit
def _head_epilogue(zq, zk, zv, a, sh, q_dst, v_dst, m2, pmask, M, L, ACC,
                   DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """One head's tile of Z, the three streams on registers (fp32 [tokens, channels]): BatchNorm affine (a, sh) ->
    hardswish; Q and V stored at q_dst, v_dst (pointer blocks of the same shape, masked by m2), K and V into the
    head's online softmax (M, L, ACC; returned). The element-wise segments load Z (`_elementwise_head`); the fused
    forward computes it (`dense_z._dense_head`)."""
    zq = hardswish(zq * a + sh)
    zk = hardswish(zk * a + sh)
    zv = hardswish(zv * a + sh)
    tl.store(q_dst, stored(zq, q_dst, EMULATE_DOTS), mask=m2)
    tl.store(v_dst, stored(zv, v_dst, EMULATE_DOTS), mask=m2)
    return _online_softmax_kv(zk, zv, pmask, M, L, ACC, DOT_PRECISION, EMULATE_DOTS)


@triton.jit
def _segment_z(z_b, stride_z_stream, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift, row, t0, t1, N, SEG,
               CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
               DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr = 0):
    """Segment SEG (1..3) of q, k, v from the Z the statistics pass kept (AGG_FROM_Z: the training forward,
    `launcher.plan_pre_projection`'s planes; statistics.py, "Planes kept for the backward"; Z =
    pointwise(depthwise(.)) before its BatchNorm, (3B, C', N) in the stage dtype, image b of stream q
    at z_b, of k and v one and two streams further): as segment 0 (`_segment0`), BatchNorm affine,
    hardswish, Q and V stored, the online softmax. No stencil and no channel mix: the job costs what
    job 0 costs (`aggregate_job_costs`).

    Tiles: tokens [t BLOCK_P, (t + 1) BLOCK_P), written so that the compiler sees them contiguous (the
    loads go along Z's planes). Each head's channels are planes of their own, so where D_PAD >= 64 the
    heads take one walk each (one [D_PAD, D_PAD] exp(K)^T V alive instead of two: with both, d = 36, 48
    spilled 12-312 B in fp32 on sm_80/90; one walk each at every width made C = 320 bf16 spill 8 B on
    sm_90, ptxas stopping at 128 registers; AOT compiles, Triton 3.6). PIPE > 0: the tile loop
    software-pipelined (`GMAShape.AGG_PIPE`)."""
    if D_PAD >= 64:
        _z_heads(z_b, stride_z_stream, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift, row, t0, t1, N,
                 SEG, 0, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, False, PIPE)
        _z_heads(z_b, stride_z_stream, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift, row, t0, t1, N,
                 SEG, 1, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, False, PIPE)
    else:
        _z_heads(z_b, stride_z_stream, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift, row, t0, t1, N,
                 SEG, 0, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, True, PIPE)


@triton.jit
def _z_tile(t, z_b, stride_z_stream, q_b, v_b, a0, s0, a1, s1, c0, kmask, M0, L0, A0, M1, L1, A1, N,
            CP: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
            EMULATE_DOTS: tl.constexpr, TWO: tl.constexpr):
    """One tile of `_z_heads`: head E0 (channels c0), and head E0 + 1 beside it with TWO."""
    n = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = n < N
    m2 = pmask[:, None] & kmask[None, :]
    src = z_b + c0[None, :] * N + n[:, None]
    M0, L0, A0 = _elementwise_head(src, stride_z_stream, 2 * stride_z_stream, q_b, v_b, a0, s0, c0, m2, n, pmask,
                                   M0, L0, A0, CP, DOT_PRECISION, EMULATE_DOTS)
    if TWO:
        M1, L1, A1 = _elementwise_head(src + D * N, stride_z_stream, 2 * stride_z_stream, q_b, v_b, a1, s1, D + c0,
                                       m2, n, pmask, M1, L1, A1, CP, DOT_PRECISION, EMULATE_DOTS)
    return M0, L0, A0, M1, L1, A1


@triton.jit
def _z_heads(z_b, stride_z_stream, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift, row, t0, t1, N, SEG, E0,
             CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
             DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, TWO: tl.constexpr, PIPE: tl.constexpr = 0):
    """`_segment_z`'s walk over tiles [t0, t1) for head E0 of the segment, and head E0 + 1 beside it with
    TWO; each head's softmax partials into its half of partial row `row`."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    c0 = (SEG * 2 + E0) * D + kk                               # head E0's channels; the next head: + D
    a0 = tl.load(bn_scale + c0, mask=kmask, other=0.0)[None, :]
    s0 = tl.load(bn_shift + c0, mask=kmask, other=0.0)[None, :]
    M0 = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
    L0 = tl.zeros([D_PAD], dtype=tl.float32)
    A0 = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    if TWO:
        a1 = tl.load(bn_scale + D + c0, mask=kmask, other=0.0)[None, :]
        s1 = tl.load(bn_shift + D + c0, mask=kmask, other=0.0)[None, :]
        M1 = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
        L1 = tl.zeros([D_PAD], dtype=tl.float32)
        A1 = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    else:   # unused (TWO false): placeholders of the tile function's signature
        a1, s1, M1, L1, A1 = a0, s0, M0, L0, A0
    if PIPE > 0:
        for t in tl.range(t0, t1, num_stages=PIPE):
            M0, L0, A0, M1, L1, A1 = _z_tile(t, z_b, stride_z_stream, q_b, v_b, a0, s0, a1, s1, c0, kmask, M0, L0, A0,
                                             M1, L1, A1, N, CP, D, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, TWO)
    else:
        t = t0
        while t < t1:
            M0, L0, A0, M1, L1, A1 = _z_tile(t, z_b, stride_z_stream, q_b, v_b, a0, s0, a1, s1, c0, kmask, M0, L0, A0,
                                             M1, L1, A1, N, CP, D, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, TWO)
            t += 1
    _store_partial(M0, L0, A0, row, E0, part_m, part_l, part_acc, D, D_PAD)
    if TWO:
        _store_partial(M1, L1, A1, row, E0 + 1, part_m, part_l, part_acc, D, D_PAD)


@triton.jit
def _dw_pw_heads(src_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, KS,
                 S: tl.constexpr, D: tl.constexpr, CK: tl.constexpr,
                 D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                 y_dst=None, N=0, STORE_Y: tl.constexpr = False, UNROLL_KX: tl.constexpr = False):
    """One of q/k/v, one segment, one tile: DW_KS(t) @ pw[h*D + k, :]ᵀ for its heads h = 0, 1.

    The s input channels go in chunks of CK: depthwise on [BLOCK_P, CK], then accumulate
    into the two [BLOCK_P, D_PAD] head outputs with tl.dot. Only chunk-sized tiles are
    alive, so registers do not grow with s (s = 96 spilled when done in one piece).
    STORE_Y (the backward's recompute, statistics.py): also store each depthwise chunk y to
    the channel-first image y_dst (element (n, c) at y_dst + c * N + n).
    """
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    acc0 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    for c0 in range(0, S, CK):
        cs = c0 + tl.arange(0, CK)
        cmask = cs < S
        dwc = depthwise_tile(src_b, ch0 + cs, cmask, dw + cs, S, n, y, x, pmask, H, W, stride_n,
                             KS, BLOCK_P, CK, UNROLL_KX)
        if STORE_Y:
            tl.store(y_dst + cs[None, :] * N + n[:, None], stored(dwc, y_dst, EMULATE_DOTS),
                     mask=pmask[:, None] & cmask[None, :])
        wmask = cmask[:, None] & kmask[None, :]
        w0 = tl.load(pw_seg + kk[None, :] * S + cs[:, None], mask=wmask, other=0.0)        # [CK, D_PAD]
        acc0 = mm(dwc, w0, acc0, DOT_PRECISION, EMULATE_DOTS)
        w1 = tl.load(pw_seg + (D + kk)[None, :] * S + cs[:, None], mask=wmask, other=0.0)
        acc1 = mm(dwc, w1, acc1, DOT_PRECISION, EMULATE_DOTS)
    return acc0, acc1


@triton.jit
def _dw_pw_seg(src_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, KS,
               S: tl.constexpr, CK: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
               EMULATE_DOTS: tl.constexpr, y_dst=None, N=0, STORE_Y: tl.constexpr = False):
    """`_dw_pw_heads` with the two heads as ONE [BLOCK_P, S] output (S = 2 d a power of two:
    `config.pair_applies`), for the training kernels' single stream (statistics.py): per chunk one
    depthwise tile and one dot with the [CK, S] pointwise weights instead of two sibling dots (which
    Triton 3.6 places on the same rows of several warps, `_segment_pair`), and no padding column."""
    co = tl.arange(0, S)
    acc = tl.zeros([BLOCK_P, S], dtype=tl.float32)
    for c0 in range(0, S, CK):
        cs = c0 + tl.arange(0, CK)
        cmask = cs < S
        dwc = depthwise_tile(src_b, ch0 + cs, cmask, dw + cs, S, n, y, x, pmask, H, W, stride_n,
                             KS, BLOCK_P, CK, False)
        if STORE_Y:
            tl.store(y_dst + cs[None, :] * N + n[:, None], stored(dwc, y_dst, EMULATE_DOTS),
                     mask=pmask[:, None] & cmask[None, :])
        w = tl.load(pw_seg + co[None, :] * S + cs[:, None], mask=cmask[:, None], other=0.0)     # [CK, S]: pw[o, c]
        acc = mm(dwc, w, acc, DOT_PRECISION, EMULATE_DOTS)
    return acc


@triton.jit
def _dw_pw_qkv(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, KS,
               C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, CK: tl.constexpr,
               D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
               UNROLL_KX: tl.constexpr = False):
    """`_dw_pw_heads` of q, k and v of one segment at once (channels ch0 + c of q, + C of k,
    + 2C of v): per chunk ONE depthwise pass over the three streams (`depthwise_taps`: each
    tap's mask, addresses and filter load serve all three) and one load of the two heads'
    pointwise weights for the six dots. Returns the six [BLOCK_P, D_PAD] head outputs
    (q0, q1, k0, k1, v0, v1)."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    q0 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    q1 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    k0 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    k1 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    v0 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    v1 = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    for c0 in range(0, S, CK):
        cs = c0 + tl.arange(0, CK)
        cmask = cs < S
        dq, dk, dv = depthwise_taps(qkv_b, ch0 + cs, cmask, dw + cs, S, n, y, x, pmask, H, W, stride_n, KS, C,
                                    BLOCK_P, CK, 3, UNROLL_KX)
        wmask = cmask[:, None] & kmask[None, :]
        w0 = tl.load(pw_seg + kk[None, :] * S + cs[:, None], mask=wmask, other=0.0)        # [CK, D_PAD]
        w1 = tl.load(pw_seg + (D + kk)[None, :] * S + cs[:, None], mask=wmask, other=0.0)
        q0 = mm(dq, w0, q0, DOT_PRECISION, EMULATE_DOTS)
        q1 = mm(dq, w1, q1, DOT_PRECISION, EMULATE_DOTS)
        k0 = mm(dk, w0, k0, DOT_PRECISION, EMULATE_DOTS)
        k1 = mm(dk, w1, k1, DOT_PRECISION, EMULATE_DOTS)
        v0 = mm(dv, w0, v0, DOT_PRECISION, EMULATE_DOTS)
        v1 = mm(dv, w1, v1, DOT_PRECISION, EMULATE_DOTS)
    return q0, q1, k0, k1, v0, v1


@triton.jit
def _store_heads(dst, z0, z1, a0, b0, a1, b1, m2, D: tl.constexpr, EMULATE: tl.constexpr):
    """hardswish(z * a + b) of a segment's two heads, stored at dst (head 1: + D); returned."""
    h0 = hardswish(z0 * a0 + b0)
    h1 = hardswish(z1 * a1 + b1)
    tl.store(dst, stored(h0, dst, EMULATE), mask=m2)
    tl.store(dst + D, stored(h1, dst, EMULATE), mask=m2)
    return h0, h1


@triton.jit
def _dw_pw_pair(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, KS,
                C: tl.constexpr, S: tl.constexpr, CK: tl.constexpr, BLOCK_P: tl.constexpr,
                DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, UNROLL_KX: tl.constexpr = False):
    """`_dw_pw_qkv` with the segment's two heads in one [BLOCK_P, S] output per stream (PAIR: S = 2 d,
    a power of two, so no column is padding): per chunk one depthwise pass over q, k and v, one load
    of the [CK, S] pointwise weights, three dots. Returns (q, k, v)."""
    co = tl.arange(0, S)
    zq = tl.zeros([BLOCK_P, S], dtype=tl.float32)
    zk = tl.zeros([BLOCK_P, S], dtype=tl.float32)
    zv = tl.zeros([BLOCK_P, S], dtype=tl.float32)
    for c0 in range(0, S, CK):
        cs = c0 + tl.arange(0, CK)
        cmask = cs < S
        dq, dk, dv = depthwise_taps(qkv_b, ch0 + cs, cmask, dw + cs, S, n, y, x, pmask, H, W, stride_n, KS, C,
                                    BLOCK_P, CK, 3, UNROLL_KX)
        w = tl.load(pw_seg + co[None, :] * S + cs[:, None], mask=cmask[:, None], other=0.0)   # [CK, S]: pw[o, c]
        zq = mm(dq, w, zq, DOT_PRECISION, EMULATE_DOTS)
        zk = mm(dk, w, zk, DOT_PRECISION, EMULATE_DOTS)
        zv = mm(dv, w, zv, DOT_PRECISION, EMULATE_DOTS)
    return zq, zk, zv


@triton.jit
def _segment_pair(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw, pw, bn_scale, bn_shift,
                  row, t0, t1, N, H, W, SW, stride_n, SEG, KS,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                  CK: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                  UNROLL_KX: tl.constexpr = False):
    """`_segment_heads` (merged q/k/v) with the segment's two heads as ONE tensor of S = 2 d channels
    (`GMAShape.AGG_PAIR`, where S is a power of two: C = 80, 160, 320), instead of two of D_PAD each.

    Why (the compiled code, not a timing): the pointwise dots of q, k and v share their weights, so
    Triton gives their results the warp grid [num_warps, 1] when BLOCK_P >= their width, and two
    [BLOCK_P, D_PAD] head outputs per stream are computed, normalised, stored and fed to the softmax
    with (C = 80, d = 8 < D_PAD = 16) half their columns padding and (C = 80 at 32 tokens, C = 160 at
    16) each row block held by 2 or 4 warps at once. One [BLOCK_P, S] output has no padding column,
    and at C = 160 / 320 (BLOCK_P 16 < S) the grid [1, num_warps]: every warp its own columns.
    The online softmax keeps per channel (M, L) as before and the whole [S, S] exp(K)^T V, whose
    diagonal d x d blocks are the two heads' accumulators (the off-diagonal ones, the heads' cross
    terms, are computed and dropped: a dot of [S, BLOCK_P] x [BLOCK_P, S] instead of two of D_PAD).
    That update sits under ``if N > 0`` (always true; N is a runtime argument, so the branch stays): a
    region of its own, so that Triton 3.6 does not count the [S, S] dot as chained to the pointwise
    ones (`warpsPerTileV2` looks for other dots in the same region) and hand them its own warp grid
    [num_warps, 1]; the sibling pointwise dots alone get [1, num_warps] where S > BLOCK_P. Read from the
    TTGIR (sm_90, bf16, the default tiles): without the branch C = 160's [16, 32] outputs were on [4, 1],
    all four warps on the same 16 rows; with it, [1, 4]."""
    co = tl.arange(0, S)
    pw_seg = pw + (SEG - 1) * S * S
    a = tl.load(bn_scale + SEG * S + co)[None, :]
    b = tl.load(bn_shift + SEG * S + co)[None, :]
    ch0 = SEG * S                                              # in q; k: + C, v: + 2C
    M = tl.full([S], float("-inf"), dtype=tl.float32)
    L = tl.zeros([S], dtype=tl.float32)
    A = tl.zeros([S, S], dtype=tl.float32)
    t = t0
    while t < t1:
        n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
        m2 = pmask[:, None] & (co < S)[None, :]
        dst = n[:, None] * CP + (ch0 + co)[None, :]
        zq, zk, zv = _dw_pw_pair(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, KS,
                                 C, S, CK, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, UNROLL_KX)
        hq = hardswish(zq * a + b)
        tl.store(q_b + dst, stored(hq, q_b, EMULATE_DOTS), mask=m2)
        hv = hardswish(zv * a + b)
        tl.store(v_b + dst, stored(hv, v_b, EMULATE_DOTS), mask=m2)
        if N > 0:   # always true: the K^T V dot in a region of its own (docstring)
            M, L, A = _online_softmax_kv(hardswish(zk * a + b), hv, pmask, M, L, A, DOT_PRECISION, EMULATE_DOTS)
        t += 1
    # partial row `row` holds the segment's 2 d channels (head e's channel i at e d + i): M and L in
    # channel order, and of A the diagonal blocks, A[e d + i, e d + k] at (channel e d + i, k)
    ch = row * S + co
    tl.store(part_m + ch, M)
    tl.store(part_l + ch, L)
    same_head = (co[:, None] // D) == (co[None, :] // D)
    tl.store(part_acc + ch[:, None] * D + (co % D)[None, :], A, mask=same_head)


@triton.jit
def _rows_walk(qkv_b, dst_b, dw, pw_seg, a, b, M, L, A, ch0, strip, ya, yb, N, H, W, stride_n,
               KS: tl.constexpr, C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, BLOCK_P: tl.constexpr,
               DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, KV: tl.constexpr):
    """Rows [ya, yb) of one strip (BLOCK_P columns from strip BLOCK_P) of segment channels ch0.. of one
    stream (KV false: q, stored to dst_b) or two (KV: k and v, v stored to dst_b, (k, v) folded into
    the online softmax (M, L, A)).

    The input rows max(0, ya - R) .. yb + R - 1 are read once each, in order: row i's KS column
    shifts (KS loads per stream, `_common.rows_input`) go into the KS output rows i - R .. i + R it reaches,
    held as KS rolling [BLOCK_P, S] fp32 accumulators; after row i, output row i - R is complete and,
    if in [ya, yb), takes the epilogue (pointwise dot, BatchNorm affine, hardswish, store, softmax).
    Rows past H are not read (the last R steps only complete and emit)."""
    R = KS // 2
    co = tl.arange(0, S)
    x = strip * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = x < W
    z = tl.zeros([BLOCK_P, S], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6 = z, z, z, z, z, z, z
    b0, b1, b2, b3, b4, b5, b6 = z, z, z, z, z, z, z
    src = qkv_b + ch0
    if KV:
        src = src + C                                          # k; v at + C from there
    i = tl.maximum(ya - R, 0)
    while i < yb + R:
        a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6 = rows_input(
            a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, i, H, src, x, co < S, co, dw + co, S, C, W,
            stride_n, KS, 1 + KV)
        o = i - R
        if o >= ya:
            n = o * W + x
            m2 = pmask[:, None] & (co < S)[None, :]
            dst = dst_b + n[:, None] * CP + (ch0 + co)[None, :]
            w = tl.load(pw_seg + co[None, :] * S + co[:, None])           # [S, S]: pw[o, c] at (c, o)
            # each dot in a region of its own (`if N > 0` / `if H > 0`, always true; two conditions, or
            # MLIR's canonicalizer merges the two ifs into one region): Triton 3.6 gives dots that share an
            # operand in one region the warp grid [num_warps, 1], which repeats a tile of fewer than
            # 16 num_warps rows in several warps (`_segment_pair`)
            za = z
            if N > 0:
                za = mm(a0, w, z, DOT_PRECISION, EMULATE_DOTS)
            if KV:
                zb = z
                if H > 0:
                    zb = mm(b0, w, z, DOT_PRECISION, EMULATE_DOTS)
                hv = hardswish(zb * a + b)
                tl.store(dst, stored(hv, dst_b, EMULATE_DOTS), mask=m2)
                if N > 0:   # always true: the K^T V dot in a region of its own (`_segment_pair`)
                    M, L, A = _online_softmax_kv(hardswish(za * a + b), hv, pmask, M, L, A,
                                                 DOT_PRECISION, EMULATE_DOTS)
            else:
                tl.store(dst, stored(hardswish(za * a + b), dst_b, EMULATE_DOTS), mask=m2)
        a0, a1, a2, a3, a4, a5, a6 = rows_shift(a0, a1, a2, a3, a4, a5, a6, KS)
        if KV:
            b0, b1, b2, b3, b4, b5, b6 = rows_shift(b0, b1, b2, b3, b4, b5, b6, KS)
        i += 1
    return M, L, A


@triton.jit
def _segment_rows(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw, pw, bn_scale, bn_shift,
                  row, t0, t1, N, H, W, stride_n, SEG: tl.constexpr, KS: tl.constexpr,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Segment SEG (1..3) of q, k, v by ROW WALKS (`GMAShape.AGG_ROWS`, where `config.pair_applies`):
    the program's tiles [t0, t1) are rows of BLOCK_P-column strips (`_tile` with ROWS), a run of rows
    down one strip or, where the run crosses into the next strip, one piece per strip. Per piece, two
    walks down the strip (`_rows_walk`): q alone, then k and v together (the softmax needs both at each
    token), the segment's two heads as one [BLOCK_P, S] tensor as in `_segment_pair` (same partials).

    Why: the tile-by-tile stencil (`depthwise_taps`) loads each input element KS x KS times, a tap at a
    time, its multiply-adds waiting on that tap's load (sm_90 SASS: ~55 instructions per tap for 12 FMA
    at C = 80, one tap's loads in flight per warp). Walking rows, each input row is loaded KS times
    (its column shifts), all KS loads of a row independent and issued together, and its KS x KS
    multiply-adds go into KS rolling accumulators: KS times fewer activation loads and address
    computations per multiply-add, the column masks row-invariant, the halo rows read once per piece
    instead of once per tile. What it costs: KS (q) or 2 KS (k, v) accumulator tiles alive, and a
    piece's R halo rows at each end (R / rows of the piece more loads; none past the image). Which
    bound (compiler figures, not a timing): the stencil becomes FMA-issue and L1-bound instead of
    latency-bound; whether that pays on a GPU is `benchmarks/tune.py`'s to say."""
    co = tl.arange(0, S)
    pw_seg = pw + (SEG - 1) * S * S
    a = tl.load(bn_scale + SEG * S + co)[None, :]
    b = tl.load(bn_shift + SEG * S + co)[None, :]
    ch0 = SEG * S
    M = tl.full([S], float("-inf"), dtype=tl.float32)
    L = tl.zeros([S], dtype=tl.float32)
    A = tl.zeros([S, S], dtype=tl.float32)
    t = t0
    while t < t1:
        strip, ya, yb = rows_piece(t, t1, H)
        _rows_walk(qkv_b, q_b, dw, pw_seg, a, b, M, L, A, ch0, strip, ya, yb, N, H, W, stride_n,
                   KS, C, S, CP, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, False)
        M, L, A = _rows_walk(qkv_b, v_b, dw, pw_seg, a, b, M, L, A, ch0, strip, ya, yb, N, H, W, stride_n,
                             KS, C, S, CP, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, True)
        t += yb - ya
    ch = row * S + co
    tl.store(part_m + ch, M)
    tl.store(part_l + ch, L)
    same_head = (co[:, None] // D) == (co[None, :] // D)
    tl.store(part_acc + ch[:, None] * D + (co % D)[None, :], A, mask=same_head)


@triton.jit
def _segment_conv(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw, pw, bn_scale, bn_shift,
                  row, t0, t1, N, H, W, SW, stride_n, SEG, KS,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                  CK: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, MERGE_QKV: tl.constexpr,
                  UNROLL_KX: tl.constexpr = False, PAIR: tl.constexpr = False):
    """Segment SEG (1..3) of q, k, v: `_segment_pair` with PAIR (`GMAShape.AGG_PAIR`), else
    `_segment_heads`."""
    if PAIR:
        _segment_pair(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw, pw, bn_scale, bn_shift,
                      row, t0, t1, N, H, W, SW, stride_n, SEG, KS, C, S, CP, D, CK, BLOCK_P,
                      DOT_PRECISION, EMULATE_DOTS, UNROLL_KX)
    else:
        _segment_heads(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw, pw, bn_scale, bn_shift,
                       row, t0, t1, N, H, W, SW, stride_n, SEG, KS, C, S, CP, D, CK, D_PAD, BLOCK_P,
                       DOT_PRECISION, EMULATE_DOTS, MERGE_QKV, UNROLL_KX)


@triton.jit
def _segment_heads(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw, pw, bn_scale, bn_shift,
                   row, t0, t1, N, H, W, SW, stride_n, SEG, KS,
                   C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                   CK: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, MERGE_QKV: tl.constexpr,
                   UNROLL_KX: tl.constexpr = False):
    """Segment SEG (1..3) of q, k, v: depthwise KSxKS -> pointwise -> BatchNorm affine -> hardswish.

    SEG and KS = 2 SEG + 1 are runtime values, one instance serving the three segments, or, with
    UNROLL_KX (`GMAShape.AGG_UNROLL`), constexprs: an instance per segment, each tap row unrolled
    (`_common.depthwise_taps`).
    MERGE_QKV (`config.GMAShape.AGG_MERGE`): q, k and v through one depthwise pass per chunk
    (`_dw_pw_qkv`: six head outputs alive at once), else one stream after the other (q stored,
    then v, then k into the softmax: two head outputs and one held pair alive), for the widths
    where the merged variant spills (`config.AGG_SEPARATE_STREAMS`)."""
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
        n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
        m2 = pmask[:, None] & kmask[None, :]
        dst0 = n[:, None] * CP + (ch0 + kk)[None, :]
        if MERGE_QKV:
            zq0, zq1, zk0, zk1, zv0, zv1 = _dw_pw_qkv(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, KS,
                                                      C, S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS,
                                                      UNROLL_KX)
            _store_heads(q_b + dst0, zq0, zq1, a0, b0, a1, b1, m2, D, EMULATE_DOTS)
            zv0, zv1 = _store_heads(v_b + dst0, zv0, zv1, a0, b0, a1, b1, m2, D, EMULATE_DOTS)
        else:
            zq0, zq1 = _dw_pw_heads(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n,
                                    KS, S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS,
                                    UNROLL_KX=UNROLL_KX)
            _store_heads(q_b + dst0, zq0, zq1, a0, b0, a1, b1, m2, D, EMULATE_DOTS)
            # V before K: one head pair of depthwise outputs alive at a time (register pressure)
            zv0, zv1 = _dw_pw_heads(qkv_b, 2 * C + ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n,
                                    KS, S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS,
                                    UNROLL_KX=UNROLL_KX)
            zv0, zv1 = _store_heads(v_b + dst0, zv0, zv1, a0, b0, a1, b1, m2, D, EMULATE_DOTS)
            zk0, zk1 = _dw_pw_heads(qkv_b, C + ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n,
                                    KS, S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS,
                                    UNROLL_KX=UNROLL_KX)
        M0, L0, A0 = _online_softmax_kv(hardswish(zk0 * a0 + b0), zv0, pmask, M0, L0, A0, DOT_PRECISION, EMULATE_DOTS)
        M1, L1, A1 = _online_softmax_kv(hardswish(zk1 * a1 + b1), zv1, pmask, M1, L1, A1, DOT_PRECISION, EMULATE_DOTS)
        t += 1
    _store_partial(M0, L0, A0, row, 0, part_m, part_l, part_acc, D, D_PAD)
    _store_partial(M1, L1, A1, row, 1, part_m, part_l, part_acc, D, D_PAD)


@triton.jit
def _local_mix(qkv_b, local_dw, local_pw, n, y, x, pmask, H, W, stride_n,
               C: tl.constexpr, S: tl.constexpr, CK: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
               DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
               w4_b=None, N=0, STORE: tl.constexpr = False, UNROLL_KX: tl.constexpr = False):
    """The local branch of one tile up to its LayerNorm: segment 4 of q, k, v -> DW3x3 -> (3s -> s)
    as [BLOCK_P, S_PAD] fp32 (padded channels 0). STORE (the backward's recompute, recompute.py):
    also store each depthwise chunk to the channel-first image w4_b (element (n, which s + c) at
    w4_b + (which s + c) N + n)."""
    co = tl.arange(0, S_PAD)                                   # output channel
    omask = co < S
    z = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
    for which in tl.static_range(3):                           # q, k, v: input channels which*s + c
        for c0 in range(0, S, CK):
            cs = c0 + tl.arange(0, CK)
            cmask = cs < S
            src = which * C + 4 * S + cs
            dwc = depthwise_tile(qkv_b, src, cmask, local_dw + which * S + cs, 3 * S,
                                 n, y, x, pmask, H, W, stride_n, 3, BLOCK_P, CK, UNROLL_KX)
            if STORE:
                tl.store(w4_b + (which * S + cs)[None, :] * N + n[:, None], stored(dwc, w4_b, EMULATE_DOTS),
                         mask=pmask[:, None] & cmask[None, :])
            # local_pw (s, 3s): element [out, which*s + in], loaded as [in, out]
            wT = tl.load(local_pw + co[None, :] * (3 * S) + which * S + cs[:, None],
                         mask=cmask[:, None] & omask[None, :], other=0.0)
            z = mm(dwc, wT, z, DOT_PRECISION, EMULATE_DOTS)
    return z


@triton.jit
def _layer_norm_rows(z, omask, ln_eps, S: tl.constexpr):
    """LayerNorm over the S valid channels of each row of z: (z - mean) (masked to 0 on padded
    channels) and 1 / std."""
    mean = tl.sum(z, axis=1) / S                               # padded channels are 0
    diff = tl.where(omask[None, :], z - mean[:, None], 0.0)
    return diff, tl.rsqrt(tl.sum(diff * diff, axis=1) / S + ln_eps)


@triton.jit
def _local_epilogue(z, lnw, lnb, omask, ln_eps, out, m2, S: tl.constexpr, EMULATE: tl.constexpr):
    """The local branch's tail on registers: z (the (3s -> s) output, fp32 [tokens, S_PAD]) -> LayerNorm over its S
    channels (lnw, lnb: [1, S_PAD]) -> hardswish -> stored at out (pointers into pre[:, C':C], masked by m2). Returns
    the LayerNorm's (z - mean, 1 / std) for `_store_local_norm`. `_local_branch` and the fused forward
    (`dense_z.gma_dense_aggregate_kernel`) end with it."""
    diff, rs = _layer_norm_rows(z, omask, ln_eps, S)
    yv = hardswish(diff * rs[:, None] * lnw + lnb)
    tl.store(out, stored(yv, out, EMULATE), mask=m2)
    return diff, rs


@triton.jit
def _store_local_norm(xh4_b, rstd4_b, diff, rs, co, n, pmask, omask, N, EMULATE: tl.constexpr):
    """What the local branch's backward reads of its LayerNorm: xh4 = the normalised values, channel-first
    (element (n, c) at xh4_b + c N + n, the stage dtype), and rstd4 = 1 / std per token (fp32)."""
    tl.store(xh4_b + co[None, :] * N + n[:, None], stored(diff * rs[:, None], xh4_b, EMULATE),
             mask=pmask[:, None] & omask[None, :])
    tl.store(rstd4_b + n, rs, mask=pmask)


@triton.jit
def _local_branch(qkv_b, pre_b, local_dw, local_pw, ln_weight, ln_bias, ln_eps, t0, t1, N, H, W, SW, stride_n,
                  C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, CK: tl.constexpr,
                  S_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                  UNROLL_KX: tl.constexpr = False, ROWS: tl.constexpr = False,
                  w4_b=None, xh4_b=None, rstd4_b=None, STORE: tl.constexpr = False,
                  zl_b=None, LOCAL_Z: tl.constexpr = False, KEEP_W4: tl.constexpr = True):
    """Segment 4 of q, k, v -> DW3x3 -> (3s -> s) -> LayerNorm -> hardswish -> pre[:, C':C] (ROWS: the
    tiles are rows of strips, `_tile`; the stencil tile by tile as otherwise). STORE (the training
    forward, with FROM_Z): also what the backward reads of the branch, the depthwise output w4
    (`_local_mix`'s STORE), xh4 and rstd4 (`_store_local_norm`), in `recompute.gma_recompute_local_kernel`'s
    layouts, so that the backward does not run the branch again (w4 not with KEEP_W4 false: a backward in the
    dense form, `aggregation_backward.BackwardTiles.DENSE`, reads none). LOCAL_Z (`GMAShape.local_from_z`: the
    split eval forward with ZDENSE, or the training forward after the dense statistics pass): the (3s -> s) output
    read from zl_b, which the dense pass wrote (channel c of token n at zl_b + c N + n, the stage dtype), instead of
    computed: the job is element-wise (with STORE it still stores xh4 and rstd4)."""
    co = tl.arange(0, S_PAD)                                   # output channel
    omask = co < S
    lnw = tl.load(ln_weight + co, mask=omask, other=0.0)[None, :]
    lnb = tl.load(ln_bias + co, mask=omask, other=0.0)[None, :]
    t = t0
    while t < t1:
        n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P, ROWS)
        if LOCAL_Z:
            z = tl.load(zl_b + co[None, :] * N + n[:, None], mask=pmask[:, None] & omask[None, :],
                        other=0.0).to(tl.float32)
        else:
            z = _local_mix(qkv_b, local_dw, local_pw, n, y, x, pmask, H, W, stride_n, C, S, CK, S_PAD, BLOCK_P,
                           DOT_PRECISION, EMULATE_DOTS, w4_b, N, STORE and KEEP_W4, UNROLL_KX)
        diff, rs = _local_epilogue(z, lnw, lnb, omask, ln_eps, pre_b + n[:, None] * C + (CP + co)[None, :],
                                   pmask[:, None] & omask[None, :], S, EMULATE_DOTS)
        if STORE:
            _store_local_norm(xh4_b, rstd4_b, diff, rs, co, n, pmask, omask, N, EMULATE_DOTS)
        t += 1


# Shape integers are not specialised (no tt.divisibility / ==1 constants): one compiled variant
# per (C, dtype, GPU) serves every image size and batch, the AOT resource tables cover what
# runs, and a new image size or batch never triggers a JIT recompile. (A job with one split,
# as job 0 at most batches, would otherwise compile a variant with that count constant, and
# N % 16 another.) The strides stay specialised: their divisibility aligns the vector loads of qkv. The
# planes' stream stride (FROM_Z) is not: Z's loads go along tokens, whose alignment N decides anyway.
@triton.jit(do_not_specialize=["N", "H", "W", "SW", "stride_z_stream", "stride_zl_b", "splits0", "splits1", "splits2",
                               "splits3", "splits4"])
def gma_aggregate_kernel(
    qkv, q, v, pre, part_m, part_l, part_acc, z, zl, w4, xh4, rstd4,
    bn_scale, bn_shift, dw3, dw5, dw7, pw, local_dw, local_pw, ln_weight, ln_bias,
    N, H, W, SW, stride_qkv_b, stride_qkv_n, stride_z_stream, stride_zl_b, splits0, splits1, splits2, splits3, splits4,
    ln_eps,
    C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr, CK: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, MERGE_QKV: tl.constexpr, UNROLL: tl.constexpr,
    PAIR: tl.constexpr = False, ROWS: tl.constexpr = False, FROM_Z: tl.constexpr = False,
    KEEP: tl.constexpr = False, PIPE: tl.constexpr = 0, LOCAL_Z: tl.constexpr = False, KEEP_W4: tl.constexpr = True,
):
    pid = tl.program_id(0)                                     # flat (job, split) of image b
    b = tl.program_id(1).to(tl.int64)
    if ROWS:   # tiles: rows of BLOCK_P-column strips (`_tile`)
        T = tl.cdiv(W, BLOCK_P) * H
    else:
        T = tl.cdiv(N, BLOCK_P)
    e1 = splits0                                               # job j owns programs [e_j, e_j+1)
    e2 = e1 + splits1
    e3 = e2 + splits2
    e4 = e3 + splits3                                          # = partial rows per image
    qkv_b = qkv + b * stride_qkv_b
    q_b = q + b * N * CP
    v_b = v + b * N * CP
    row = b * e4 + pid                                         # partial row (jobs 0-3) of S = 2 D floats
    if pid < e1:
        tps = tl.cdiv(T, splits0)
        t0 = pid * tps
        _segment0(qkv_b, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift, row, t0, tl.minimum(t0 + tps, T),
                  N, H, W, stride_qkv_n, C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, ROWS, PIPE)
    elif pid < e4:
        seg = 1 + (pid >= e2).to(tl.int32) + (pid >= e3).to(tl.int32)
        first = tl.where(seg == 1, e1, tl.where(seg == 2, e2, e3))
        tps = tl.cdiv(T, tl.where(seg == 1, splits1, tl.where(seg == 2, splits2, splits3)))
        t0 = (pid - first) * tps
        t1 = tl.minimum(t0 + tps, T)
        if FROM_Z:   # Z of the statistics pass (the training forward) or of the Z pass (SPLIT): no stencil (`_segment_z`)
            _segment_z(z + b * CP * N, stride_z_stream, q_b, v_b, part_m, part_l, part_acc, bn_scale, bn_shift,
                       row, t0, t1, N, seg, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, PIPE)
        elif ROWS:     # row walks (`_segment_rows`): an instance per window
            if pid < e2:
                _segment_rows(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw3, pw, bn_scale, bn_shift,
                              row, t0, t1, N, H, W, stride_qkv_n, 1, 3, C, S, CP, D, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
            elif pid < e3:
                _segment_rows(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw5, pw, bn_scale, bn_shift,
                              row, t0, t1, N, H, W, stride_qkv_n, 2, 5, C, S, CP, D, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
            else:
                _segment_rows(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw7, pw, bn_scale, bn_shift,
                              row, t0, t1, N, H, W, stride_qkv_n, 3, 7, C, S, CP, D, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
        elif UNROLL:   # an instance per window: KS (and SEG) constexpr, each tap row unrolled
            if pid < e2:
                _segment_conv(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw3, pw, bn_scale, bn_shift,
                              row, t0, t1, N, H, W, SW, stride_qkv_n, 1, 3,
                              C, S, CP, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, MERGE_QKV, True, PAIR)
            elif pid < e3:
                _segment_conv(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw5, pw, bn_scale, bn_shift,
                              row, t0, t1, N, H, W, SW, stride_qkv_n, 2, 5,
                              C, S, CP, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, MERGE_QKV, True, PAIR)
            else:
                _segment_conv(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw7, pw, bn_scale, bn_shift,
                              row, t0, t1, N, H, W, SW, stride_qkv_n, 3, 7,
                              C, S, CP, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, MERGE_QKV, True, PAIR)
        else:        # one instance for the three windows: KS runtime
            if pid < e2:
                dw = dw3
            elif pid < e3:
                dw = dw5
            else:
                dw = dw7
            _segment_conv(qkv_b, q_b, v_b, part_m, part_l, part_acc, dw, pw, bn_scale, bn_shift,
                          row, t0, t1, N, H, W, SW, stride_qkv_n, seg, 2 * seg + 1,
                          C, S, CP, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, MERGE_QKV, False, PAIR)
    else:
        tps = tl.cdiv(T, splits4)
        t0 = (pid - e4) * tps
        _local_branch(qkv_b, pre + b * N * C, local_dw, local_pw, ln_weight, ln_bias, ln_eps,
                      t0, tl.minimum(t0 + tps, T), N, H, W, SW, stride_qkv_n, C, S, CP, CK, S_PAD, BLOCK_P,
                      DOT_PRECISION, EMULATE_DOTS, UNROLL, ROWS, w4 + b * (3 * S * N), xh4 + b * (S * N), rstd4 + b * N,
                      KEEP, zl + b * stride_zl_b, LOCAL_Z, KEEP_W4)


def split_plan(N: int, B: int, block_p: int, target_programs: int, programs_per_image: int = 5):
    """(splits, tiles_per_split): split-N so that about `target_programs` programs
    (`programs_per_image` per image per split) exist, every split owning at least one tile.
    Uniform splits, for kernels whose programs per image cost the same: the backward's token
    reductions (8 heads; aggregation_backward.py, attention_backward.py). The forward
    aggregation's jobs differ in cost and use `job_plan`."""
    T = cdiv(N, block_p)
    want = max(1, min(T, cdiv(target_programs, programs_per_image * B)))
    tps = cdiv(T, want)
    return cdiv(T, tps), tps


#: Relative cost weights of the aggregation kernel's work, in units of one depthwise tap (one
#: channel of one token: an L1/L2 load and an FMA). Estimates from per-SM peak rates, not
#: measurements: a tap is bound by the load (L1 ~128 B/clock, i.e. ~32 fp32 lanes, against
#: 128 FMA/clock), so a tap ~ 1/32 clock; a TF32 tensor-core multiply-add ~ 1/512 clock
#: (A100: 156 TFLOP/s / 108 SMs / 1.41 GHz), i.e. 1/16 tap, three passes for 3xTF32; an FMA
#: dot (sm_70/75, "ieee") 1/128 clock, 1/4 tap; one element loaded, stored, exponentiated or
#: normalised in a tile ~ 1 tap (an LSU or SFU slot). Only ratios matter: they set how many
#: programs each job of the aggregation gets (`aggregate_job_costs`, `job_plan`).
TAP_COST = 1.0
ELEMENT_COST = 1.0
DOT_MAC_COST = {"tf32x3": 3 / 16, "tf32": 1 / 16, "ieee": 1 / 4}
#: a multiply-add whose operand is already in registers (the row walks' taps, `_segment_rows`): an FMA
#: slot, 1/128 clock against a tap's 1/32
FMA_COST = 1 / 4


def aggregate_job_costs(sh, prec: str) -> Tuple[float, ...]:
    """Estimated cost of one tile (AGG_BLOCK_P tokens) of each of the aggregation kernel's five
    jobs, in taps (`TAP_COST` and the weights above), as the kernel issues the work (padded
    widths: the masked lanes take their slots too). Per token, with Sc = ceil(s / CK) CK (the
    chunked channels), Dp = D_PAD, Sp = S_PAD:

    * job 0 (segment 0, element-wise): 12 Dp elements (q, k, v of two heads read, q and v
      stored, exp of k) + the two heads' exp(K)ᵀV dots, 2 Dp² multiply-adds;
    * job j = 1, 2, 3 ((2j+1)x(2j+1) depthwise): 3 Sc (2j+1)² taps (q, k, v) + the s x s
      pointwise as dots into two heads, 3 Sc 2 Dp multiply-adds, + 6 Dp elements + 2 Dp²;
    * job 4 (local branch): 3 Sc 9 taps + the 3s -> s dots, 3 Sc Sp, + 5 Sp elements
      (LayerNorm, hardswish, store); with ``sh.local_from_z`` (ZDENSE: its Z read from the Z pass) 6 Sp
      elements.

    With ``sh.AGG_FROM_Z`` (the training forward reading the statistics pass's Z, `_segment_z`) or
    ``sh.AGG_SPLIT`` (the split eval forward reading its Z pass's) jobs 1, 2, 3 cost what job 0 costs.

    With ``sh.AGG_ROWS`` (`_segment_rows`) a token of job j = 1, 2, 3 costs 3 s (2j+1) loads (each
    input row's column shifts) and 3 s (2j+1)² `FMA_COST` multiply-adds instead of its taps, and the
    pointwise one [s, s] dot per stream (no padding).

    The single place the aggregation's per-job costs are written: `job_plan` gives each job
    programs in proportion to them (`costs.py` reports them through `costs.aggregate_job_costs`)."""
    dot = DOT_MAC_COST[prec]
    sc = -(-sh.S // sh.CK) * sh.CK
    dp, sp = sh.D_PAD, sh.S_PAD
    kv = 2 * dp * dp * dot
    per_token = [12 * dp * ELEMENT_COST + kv]
    for ks in (3, 5, 7):
        if sh.AGG_FROM_Z or sh.AGG_SPLIT:
            per_token.append(per_token[0])
        elif sh.AGG_ROWS:
            s = sh.S
            per_token.append(3 * s * (ks * TAP_COST + ks * ks * FMA_COST) + 3 * s * s * dot + 3 * s * ELEMENT_COST
                             + s * s * dot)
        else:
            per_token.append(3 * sc * ks * ks * TAP_COST + 3 * sc * 2 * dp * dot + 6 * dp * ELEMENT_COST + kv)
    if sh.local_from_z:
        per_token.append(6 * sp * ELEMENT_COST)
    else:
        per_token.append(3 * sc * 9 * TAP_COST + 3 * sc * sp * dot + 5 * sp * ELEMENT_COST)
    return tuple(sh.AGG_BLOCK_P * c for c in per_token)


class JobPlan(NamedTuple):
    """The aggregation's programs per image: ``splits[j]`` runs of ``ceil(tiles / splits[j])``
    consecutive tiles for job j (0: segment 0, 1-3: the 3x3/5x5/7x7 segments, 4: local branch);
    every run non-empty."""
    tiles: int                      # T = ceil(N / BLOCK_P)
    splits: Tuple[int, ...]         # five split counts, each in [1, T]

    @property
    def tiles_per_split(self) -> Tuple[int, ...]:
        return tuple(-(-self.tiles // s) for s in self.splits)

    @property
    def programs(self) -> int:
        """Programs per image (the grid's first dimension)."""
        return sum(self.splits)

    @property
    def partial_rows(self) -> int:
        """Rows of softmax partials per image: one per split of segments 0..3."""
        return sum(self.splits[:4])

    @property
    def segment_splits(self) -> Tuple[int, ...]:
        """Splits of the four attention segments (heads 2j, 2j + 1): what the combine reads."""
        return self.splits[:4]

    def check(self) -> None:
        """Raise unless every split count is one that `job_plan` can produce: 1 <= s <= T with no
        empty run (s = ceil(T / ceil(T / s))); an empty run would store an all -inf maximum."""
        T = self.tiles
        if len(self.splits) != 5:
            raise ValueError(f"expected 5 split counts (one per job), got {self.splits}")
        for j, sp in enumerate(self.splits):
            if not (1 <= sp <= T) or -(-T // -(-T // sp)) != sp:
                raise ValueError(f"job {j}: {sp} splits of {T} tiles leave an empty run (or none)")


@functools.lru_cache(maxsize=4096)
def _balanced_splits(T: int, B: int, costs: Tuple[int, ...], target_programs: int) -> Tuple[int, ...]:
    """Split counts of jobs with integer `costs` per tile: the smallest work per program w (the
    critical path of one program) such that B x (programs per image) stays within
    `target_programs`, each job cut into runs of floor(w / cost) tiles (at least one).

    w is bounded below by one tile of the heaviest job (a tile is not split) and above by the
    mean job's whole image, T x mean(costs): with a large batch (few programs wanted per image)
    the heavy jobs still split into about cost / mean runs, so every program carries about the
    mean job's work and the tail is short. Programs per image only change at multiples of a
    job's cost, so the smallest feasible w is one of those (binary search over them)."""
    lo = max(costs)
    hi = max(lo, T * sum(costs) // len(costs))
    budget = max(len(costs), -(-target_programs // B))

    def splits_at(w):
        return tuple(-(-T // max(1, min(T, w // c))) for c in costs)

    cands = sorted({c * t for c in costs for t in range(1, T + 1) if lo <= c * t <= hi} | {lo, hi})
    i, j = 0, len(cands) - 1                  # programs(w) does not increase with w
    while i < j:
        mid = (i + j) // 2
        if sum(splits_at(cands[mid])) <= budget:
            j = mid
        else:
            i = mid + 1
    return splits_at(cands[i])


def job_plan(N: int, B: int, shape, precision: str, W: Optional[int] = None) -> JobPlan:
    """The aggregation's split plan for B images of N tokens (W columns: needed with
    ``shape.AGG_ROWS``, whose tiles are rows of strips, `config.GMAShape.num_tiles`) with the tiles of
    `shape` and dots of `precision`: programs of each job in proportion to its cost per tile
    (`aggregate_job_costs`, the one cost model), at most about ``shape.SPLIT_TARGET``
    programs in all where the tiles allow (`_balanced_splits`). N and B are taken as Python
    ints (under torch.compile with dynamic shapes this specialises on them: the plan, the grid
    and the partials' shape depend on them). Cached: it runs on every launch."""
    return _job_plan(int(N), int(B), shape, precision, int(W) if shape.AGG_ROWS and W is not None else None)


@functools.lru_cache(maxsize=1024)
def _job_plan(N: int, B: int, shape, precision: str, W: Optional[int] = None) -> JobPlan:
    T = shape.num_tiles(N, W)
    costs = tuple(max(1, round(16 * c)) for c in aggregate_job_costs(shape, precision))  # exact integers
    splits = _balanced_splits(T, B, costs, shape.SPLIT_TARGET)
    if shape.AGG_ROWS:
        splits = splits[:1] + tuple(_rows_splits(T, sp, 2 * j + 1) for j, sp in enumerate(splits[1:4], 1)) + splits[4:]
    return JobPlan(T, splits)


def _rows_splits(T: int, splits: int, ks: int) -> int:
    """A row-walk job's split count with runs of at least `ks` rows (all T where fewer): a walk re-reads
    the R = ks // 2 rows above and below its run, so a run of L rows loads ks (L + 2 R) input row
    shifts for its L output rows (per output row 19 at L = 7 for a 7x7 window, against 49 taps per
    output in the tile kernel; at L = 1, 49 as well). The cost model (`aggregate_job_costs`) has no
    per-run term, so without this a small batch, which wants many programs, would get one-row runs."""
    most = max(1, T // min(T, ks))
    sp = min(splits, most)
    return -(-T // -(-T // sp))


def aggregate_call(qkv, H, W, weights, ln_eps, shape, plan: JobPlan, q, v, pre, part_m, part_l, part_acc,
                   dots: DotVariant, z=None, local=None, zl=None):
    """(grid, args, kwargs) of one aggregation launch (what `launch_aggregate` passes to the kernel).

    qkv: (B, N, 3C) with unit channel stride; weights: `FoldedGMAWeights`; plan: the `JobPlan`
    (`job_plan`, or any checked split counts); q, v: (B, N, C') contiguous; pre: (B, N, C)
    contiguous; part_m, part_l: (B, R, s) and part_acc: (B, R, s, d) fp32 with R =
    plan.partial_rows (the packed partials, module docstring); dots: the dot variant
    (`_common.dot_variant`; with ``shape.AGG_DOTS16`` its 16-bit-operand form for 16-bit inputs,
    `config.operand_precision`); z: with ``shape.AGG_FROM_Z`` or ``shape.AGG_SPLIT`` (and only then) the
    planes Z of the statistics pass (or of the split forward's Z pass, `statistics.plan_z_pass`), as (3, B, C', N) with unit token stride and planes of N (the q, k, v streams of
    (3B', C', H, W), B' >= B: a batch chunk is a slice of the streams); local: with z, the buffers the
    local branch keeps for the backward, (w4 (B, 3s, H, W), xh4 (B, s, H, W)) in the stage dtype and rstd4
    (B, 1, H, W) fp32, contiguous (`recompute.plan_recompute_local`'s), with AGG_FROM_Z only; w4 None: not kept
    (KEEP_W4 false: for a backward in the dense form, which reads none); zl: with ``shape.local_from_z`` (and only
    then) the local branch's Z before its LayerNorm, (B, s, H, W) in the stage dtype with planes of H W tokens
    (channel stride H W, unit token stride; any image stride), as the dense pass wrote it: the split forward's Z
    pass (`dense_z.local_z_of` its buffer) or the training forward's dense statistics pass
    (`dense_z.plan_dense_statistics`). Also used, on meta tensors, to derive the
    AOT specialisations (`specializations.py`), so the two cannot drift apart.
    """
    B, N, _ = qkv.shape
    if (shape.AGG_FROM_Z or shape.AGG_SPLIT) != (z is not None) or shape.AGG_FROM_Z != (local is not None):
        raise ValueError("the planes Z go with AGG_FROM_Z (the training forward) or AGG_SPLIT (the split eval forward), "
                         "the local branch's buffers with AGG_FROM_Z, and only with them")
    if shape.local_from_z != (zl is not None):
        raise ValueError("the local branch's Z (zl) goes with GMAShape.local_from_z, and only with it")
    if zl is not None:
        s = shape.S
        if (tuple(zl.shape) != (B, s, H, W) or zl.stride(1) != N or zl.stride(3) != 1 or zl.stride(2) != W
                or zl.dtype != stage_dtype(qkv.dtype) or zl.device != qkv.device):
            raise ValueError(f"local branch's Z {tuple(zl.shape)} {zl.dtype} with strides {zl.stride()}: expected "
                             f"({B}, {s}, {H}, {W}) {stage_dtype(qkv.dtype)} planes of {N} tokens on {qkv.device}")
    plan.check()
    if plan.tiles != shape.num_tiles(N, W):
        raise ValueError(f"plan of {plan.tiles} tiles for {shape.num_tiles(N, W)} tiles of {shape.AGG_BLOCK_P} tokens")
    want = (B, plan.partial_rows, shape.S)
    if tuple(part_m.shape) != want or tuple(part_l.shape) != want or tuple(part_acc.shape) != want + (shape.D,):
        raise ValueError(f"partials {tuple(part_m.shape)}, {tuple(part_acc.shape)}: the plan needs {want}[, d]")
    if z is not None:
        if tuple(z.shape) != (3, B, shape.CP, N) or z.stride(3) != 1 or z.stride(2) != N or z.stride(1) != shape.CP * N:
            raise ValueError(f"planes {tuple(z.shape)} with strides {z.stride()}: expected (3, {B}, {shape.CP}, {N}) "
                             f"with planes of {N} tokens")
        if z.dtype != stage_dtype(qkv.dtype) or z.device != qkv.device:
            raise ValueError(f"planes {z.dtype} on {z.device} for a {qkv.dtype} layer on {qkv.device}")
        s = shape.S
        for t, ch, dt in zip(local or (), (3 * s, s, 1), (z.dtype, z.dtype, torch.float32)):
            if t is None and ch == 3 * s:
                continue
            if tuple(t.shape) != (B, ch, H, W) or not t.is_contiguous() or t.dtype != dt or t.device != qkv.device:
                raise ValueError(f"local branch buffer {tuple(t.shape)} {t.dtype}: expected a contiguous "
                                 f"({B}, {ch}, {H}, {W}) {dt} tensor on {qkv.device}")
    w = weights
    keep_w4 = local is None or local[0] is not None
    if local is not None:   # without w4, xh4 stands in for its pointer (never written)
        keep = (z, local[0] if keep_w4 else local[1], *local[1:])
    else:
        keep = (qkv,) * 4 if z is None else (z, qkv, qkv, qkv)
    zl_arg = (qkv, 0) if zl is None else (zl, zl.stride(0))   # (without it qkv stands in, never read)
    args = (qkv, q, v, pre, part_m, part_l, part_acc, keep[0], zl_arg[0], *keep[1:],
            w.bn_scale, w.bn_shift, w.dw3, w.dw5, w.dw7, w.pw, w.local_dw, w.local_pw, w.ln_weight, w.ln_bias,
            N, H, W, strip_width(W, shape.AGG_STRIP), qkv.stride(0), qkv.stride(1), 0 if z is None else z.stride(0),
            zl_arg[1], *plan.splits, ln_eps)
    kwargs = dict(C=shape.C, S=shape.S, CP=shape.CP, D=shape.D, S_PAD=shape.S_PAD, D_PAD=shape.D_PAD,
                  CK=shape.CK, BLOCK_P=shape.AGG_BLOCK_P,
                  DOT_PRECISION=operand_precision(dots.precision, dtype_name(qkv.dtype), shape.AGG_DOTS16),
                  EMULATE_DOTS=dots.emulate, MERGE_QKV=shape.AGG_MERGE, UNROLL=shape.AGG_UNROLL, PAIR=shape.AGG_PAIR,
                  ROWS=shape.AGG_ROWS, FROM_Z=shape.AGG_FROM_Z or shape.AGG_SPLIT,
                  # the interpreter cannot take tl.range's runtime bounds (1-element arrays): the plain loop there
                  PIPE=0 if interpreting() else shape.AGG_PIPE, num_warps=shape.AGG_WARPS)
    if shape.AGG_FROM_Z:   # the training forward keeps the local branch's w4, xh4, rstd4 (the split forward does not)
        kwargs["KEEP"] = True
        if not keep_w4:
            kwargs["KEEP_W4"] = False
    if shape.local_from_z:   # the dense pass computed the local branch's Z too
        kwargs["LOCAL_Z"] = True
    return (plan.programs, B), args, kwargs


def launch_aggregate(kernel, qkv, H, W, weights, ln_eps, shape, plan: JobPlan, q, v, pre, part_m, part_l,
                     part_acc, dots: Optional[DotVariant] = None):
    """Launch the aggregation kernel (``kernel``: the raw or the wrap_triton'ed kernel);
    arguments as `aggregate_call` (dots: by default the variant for qkv's dtype and device)."""
    grid, args, kwargs = aggregate_call(qkv, H, W, weights, ln_eps, shape, plan, q, v, pre, part_m,
                                        part_l, part_acc, dots or dot_variant(qkv))
    with device_guard(qkv):
        kernel[grid](*args, **kwargs)
