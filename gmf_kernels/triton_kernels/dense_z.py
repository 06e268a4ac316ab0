"""The split forward's Z pass on tensor cores: a segment's depthwise and pointwise as one dense convolution.

    z, (grid, args, kwargs) = plan_dense_z_pass(qkv, H, W, dw3, dw5, dw7, pw, dots, z=buffer)

A tuning candidate of the eval forward (`config.GMAShape.AGG_ZDENSE`, with `AGG_SPLIT`): the same Z as the
stencil Z pass (`statistics.plan_z_pass`), into the same (3B, 4s, H, W) buffer, which the aggregation then
reads (`aggregation._segment_z`); and the local branch's Z before its LayerNorm (below), which the aggregation
reads too (`config.GMAShape.local_from_z`): with it the aggregation runs no stencil and no channel mix at all.

**The identity.** Segment j = 1, 2, 3 computes Z_j = PW_j(DW_j(x_j)) with a K x K depthwise filter
(K = 2j + 1) and an s x s pointwise, neither with a bias and nothing between them (docs/spec.md: y_j =
hardswish(BN_j(PW_j(DW_j(seg_j))))). So

    Z_j[p, o] = sum_t sum_i x_j[p + shift_t, i] W_t[i, o],   W_t[i, o] = DW_j[t, i] PW_j[o, i]

over the K^2 taps t: a dense K x K convolution from s channels to s, i.e. K^2 products of a token tile
[BLOCK_P, s] (shifted by the tap) with an [s, s] matrix, summed: tensor-core work (`_common.mm`). A program
forms each W_t from the tap's filter row and the pointwise, both loaded as they are (fp32, the folded
weights' layout), and multiplies it into the tiles of q, k and v (the aggregator's weights are shared by
the three streams), one accumulator each.

**The local branch** (segment 4 of q, k, v stacked: a 3x3 depthwise over 3s channels, then 3s -> s, nothing
between) is the same identity with the streams summed into one output: Z_L[p, o] = sum over the streams st and
the 9 taps t of sum_i x_st[p + shift_t, i] W_{st,t}[i, o], W_{st,t}[i, o] = LOCAL_DW[t, st s + i]
LOCAL_PW[o, st s + i]: 27 [BLOCK_P, s] x [s, s] products into one accumulator (`_dense_local`, programs
(tile, 3, b) of the grid), stored where segment 0 of stream q would lie (segment 0 has no Z; `local_z_of`).
Per token 27 s^2 multiply-adds on tensor cores against the stencil's 27 s (CUDA cores) and 3 s^2; bytes: the
three streams' segment 4 read here (3 s e) instead of in the aggregation, Z_L written and read back (s, the
stage dtype, each way).

**Which bound.** FLOPs per token and stream: s^2 K^2 multiply-adds for segment j, against s K^2 + s^2 for
the stencil then the pointwise: at s = 16 (C = 80) 256 x (9 + 25 + 49) = 21 248 against 16 x 83 + 3 x 256 =
2 096 over the three segments, 10x as many (15x at s = 32, 19x at s = 64), but on tensor cores (sm_90: ~790 TFLOP/s bf16 against ~67 TFLOP/s of fp32
FMA, ~12x), in k = 16 MMAs of 2048 multiply-adds per warp instruction against 32 per FFMA. The stencil
kernels are issue- and latency-bound (docs/performance.md: the H200's aggregate at 6-12 % of its byte
bound, ~1 050 warp instructions per token at C = 80); this kernel aims at the tensor cores' throughput.
GroupMixFormer-S at batch 128: 25.6 G multiply-adds per layer at each of C = 80 (56x56), 160 (28x28) and 320
(14x14), 74 us at the 689 TFLOP/s the H200 measured for a bf16 matrix product (a convolution of k = s
reaches less): against the H200's aggregate of 1 626 / 627 / 298 us, a win that shrinks with s, since the
dense work grows as s^2 where the stencil's grows as s. Bytes: the q, k, v channels of segments 1-3 read
(9 s e per token, the halo from L1/L2) and Z written (9 s e): a pass of its own, as the stencil Z pass.
fp32 inputs take 3xTF32 MMAs (about fp32's accuracy, 3x the MMA work); fp16 / bf16 inputs the
input type's own MMAs on operands rounded to it (`config.operand_precision`), as the reference at that
dtype rounds its intermediates (each W_t is rounded once; the products are exact and summed in fp32; Z is
rounded once to the stage dtype when stored).

**Grid** ``(ceil(N / BLOCK_P), 4, B)``: program (tile, j - 1, b) computes BLOCK_P tokens of image b,
segment j, for the three streams; program (tile, 3, b) the local branch's. On a GPU the tap loop is a ``tl.range``
of `config.DENSE_Z_STAGES` stages over the K^2 taps, whose loads carry masks (no ``if``), so Triton overlaps a tap's loads (cp.async) with the
previous tap's MMAs; the interpreter runs it as a plain loop (PIPE 0). Tiles:
`config.DENSE_Z_TILES` (BLOCK_P, num_warps) by S_PAD, or `config.DENSE_Z_TILES_ALT` (`dense_z_tiles`).

**The fused forward** (`GMAShape.AGG_FUSED`, a "triton.aggregate" candidate with SPLIT and ZDENSE, whose tiles it
takes: `fused_tile`): `gma_dense_aggregate_kernel` does the aggregation's work on the dense pass's registers, so Z is
never stored. Grid (T, 8, B): programs (tile, j, b), j < 6, compute head j % 2 of segment j // 2 + 1 for the three
streams (`_dense_head`: the K^2 products with the pointwise's rows of the head's d output channels, [s, d] operands),
then the BatchNorm affine, the hardswish, the Q and V proxies and the tile's exp(K - max)^T V
(`aggregation._online_softmax_kv`) into the head's half of partial row seg T + tile; program j = 6 is segment 0 (both
heads, `aggregation._segment0` on the one tile); j = 7 the local branch (`_dense_local_acc`, its LayerNorm and
hardswish into pre). The combine then merges T partial rows a segment. Bytes a token against the split forward with
ZDENSE: qkv read once (3 C e; the split reads 12 s e in the Z pass and 6 s e again in the aggregation), Q, V and
pre's s channels written, the partials (4 s (2 + d) x 4 per tile); no Z written (10 s) nor read (10 s). At C = 80
bf16, batch 128 (`costs._aggregate`): 316 MB against the two kernels' 566 MB. The tensor-core work is the Z pass's.
Bound aimed at: as the Z pass, the tensor cores' throughput, with the aggregation's bytes riding along; one launch
fewer.

**The backward** (training: B3 of segments 1-3 with `aggregation_backward.BackwardTiles.DENSE`, a "triton.backward"
tuning candidate where `aggregation_backward.dense_b3_applies`: fp16 / bf16 layers at S_PAD <= 64). The same
identity differentiated, from dZ_j (written once by `gma_dz_kernel`, in qkv's layout: `dense_dz_buffer`) and the
depthwise input x_j (read in place from qkv), never the depthwise output y_j nor its gradient dy_j:

    dx_j[p, i]  = sum_t sum_o dZ_j[p - shift_t, o] W_t[i, o]           (`gma_dense_dx_kernel`)
    G_t[i, o]   = sum_p x_j[p + shift_t, i] dZ_j[p, o]                  (`gma_dense_wgrad_kernel`)
    dDW_j[t, i] = sum_o PW_j[o, i] G_t[i, o],   dPW_j[o, i] = sum_t DW_j[t, i] G_t[i, o]

The input gradient is this module's forward kernel turned half a turn (`_dense_conv` with FLIP: tap t reads dZ
at p + shift_t with the weights of tap K^2 - 1 - t, W_t's transpose as the operand), stored into the qkv
gradient's segments 1-3. The weight gradient's program (segment, split) walks its run of flat tiles over the B N
pixels tap by tap, G_t in an [s, s] fp32 accumulator (an [s, BLOCK_P] x [BLOCK_P, s] product per tile and
stream, x loaded as [channels, pixels], the dot's A operand, as it lies), and folds each G_t into the two
gradients before the next tap (partials per program, summed by one torch reduction: no atomics). Work per token
and stream: s^2 K^2 multiply-adds each, twice the forward's dense work (at C = 80, batch 128, 56x56: 51 G
multiply-adds a layer against the stencil path's ~5 G on CUDA cores); bytes: dZ of segments 1-3 written once
and read by both kernels, x read once, the qkv gradient written once (9 s e per token each), against the
default B3's y and Z (or dZ) read, dy written and read twice and u read once. Aimed at the tensor cores'
throughput, like the forward. The weight gradient re-reads a tile's dZ and x once per tap, from L1 / L2 (a
program's run is a few hundred pixels). Its tiles: `config.DENSE_WGRAD_TILES`. Compiler figures and where it
spilled: `dense_b3_applies`. Not timed (no GPU in the session that wrote it).

**The statistics pass** of a training forward whose backward runs the dense form (it keeps no y:
`dense_statistics_planes`, where `dense_statistics_applies`): `gma_dense_statistics_kernel`, grid (T, 4,
B), the Z pass's segment programs (`_dense_conv`) plus one for segment 0 (Z = x, copied), and for a Triton
forward (grid (T, 5, B)) one for the local branch's Z (`_dense_local`, into a buffer zl of its own, which the
forward's aggregation reads instead of running that stencil: `config.from_planes` with local_z). Each segment
program stores Z and, per stream, its tile's (mean, M2) (`_tile_moments`, about the tile's own mean) as a partial
row of
`statistics.plan_statistics`' layout, so `statistics.merge_segments` merges them as the stencil pass's (a
`statistics.SegmentPlan` of one-tile runs). The same products as the Z pass, with the layer's 16-bit operands
where the stencil statistics pass multiplies in fp32 (3xTF32): Z and the moments carry the rounding the reference
at that dtype has (within the 2x rule, `tests/test_triton_dense_z.py`).

The local branch's backward the same way, from dZ_L (the LayerNorm's input gradient, (B, N, s):
`aggregation_backward.gma_local_backward_kernel` with DZ_OUT) and qkv's segment 4, never the depthwise output w4
nor its gradient: `gma_dense_local_dx_kernel` (grid (tiles, 3, B): stream st's dx_st[p, i] = sum_t sum_o
dZ_L[p + shift_t, o] W_{st,8-t}[i, o], one accumulator) and `gma_dense_local_wgrad_kernel` (grid (3, splits):
stream st's G_t = X_{st,t}^T dZ_L folded into dLOCAL_DW[t, st s + i] and dLOCAL_PW[o, st s + i]; `_wgrad_taps`, the
segments' loop with one stream). Per token and stream 9 s^2 multiply-adds each, against 9 s (CUDA cores) and
s^2 for the stencils and the pointwise backward they replace.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import DotVariant, dot_variant, interpreting, mm, stored
from .aggregation import _head_epilogue, _local_epilogue, _segment0, _store_partial, split_plan
from .config import (DENSE_WGRAD_TILES, DENSE_Z_STAGES, DENSE_Z_TILES, DENSE_Z_TILES_ALT, check_train_size, dot_pad,
                     dtype_name, operand_precision, stage_dtype, zdense_applies)
from .statistics import SegmentPlan, _op_exists, mean_var_count, merge_segments, statistics_planes, z_pass_buffer

Tensor = torch.Tensor


@triton.jit
def _token_tile(tile, N, W, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """Token tile `tile` of an image of N tokens, W columns: its tokens p, their validity, rows y and columns x;
    and the S_PAD channel lanes with their validity."""
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    y = p // W
    ch = tl.arange(0, S_PAD)
    return p, p < N, y, p - y * W, ch, ch < S


@triton.jit
def _tap_window(t, src, y, x, pmask, cmask, H, W, s_pix, KS, R):
    """Tap t of a K x K window over a token tile: the tile's pointers shifted by the tap (src + channel offsets,
    [1, S_PAD]) and its mask (zero padding outside the image, padded channels)."""
    ky = t // KS
    yy = y + ky - R
    xx = x + (t - ky * KS) - R
    ok = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    return src + ((yy * W + xx) * s_pix)[:, None], ok[:, None] & cmask[None, :]


@triton.jit
def _dense_tap(t, acc_q, acc_k, acc_v, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, s_pix, s_stream, KS, R,
               S: tl.constexpr, FLIP: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Tap t of the K x K window: the q, k, v tiles shifted by the tap times the tap's [s, s] operand. FLIP 0 (the
    forward, Z = sum_t X_t W_t): W_t[i, o] = DW[t, i] PW[o, i] (pw_op = PW^T). FLIP 1 (the input gradient, dX =
    sum_t dZ_t W'_t): the window turned half a turn, W'_t[o, i] = W_{K^2-1-t}[i, o] (pw_op = PW)."""
    ptrs, m = _tap_window(t, src, y, x, pmask, cmask, H, W, s_pix, KS, R)
    if FLIP:
        w_t = pw_op * tl.load(w_taps + (KS * KS - 1 - t) * S + ch, mask=cmask, other=0.0)[None, :]
    else:
        w_t = tl.load(w_taps + t * S + ch, mask=cmask, other=0.0)[:, None] * pw_op
    acc_q = mm(tl.load(ptrs, mask=m, other=0.0).to(tl.float32), w_t, acc_q, DOT_PRECISION, EMULATE_DOTS)
    acc_k = mm(tl.load(ptrs + s_stream, mask=m, other=0.0).to(tl.float32), w_t, acc_k, DOT_PRECISION, EMULATE_DOTS)
    acc_v = mm(tl.load(ptrs + 2 * s_stream, mask=m, other=0.0).to(tl.float32), w_t, acc_v, DOT_PRECISION,
               EMULATE_DOTS)
    return acc_q, acc_k, acc_v


@triton.jit
def _dense_taps(src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, s_pix, s_stream, KS, R, S: tl.constexpr,
                OUT_PAD: tl.constexpr, BLOCK_P: tl.constexpr, FLIP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """The K^2 taps of `_dense_tap` summed for the q, k, v tiles: three fp32 accumulators [BLOCK_P, OUT_PAD] (the
    operand pw_op's columns: a segment's s outputs, or a head's d). PIPE > 0: the tap loop a ``tl.range`` of PIPE
    stages, else a plain loop (the interpreter's)."""
    acc_q = tl.zeros([BLOCK_P, OUT_PAD], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_P, OUT_PAD], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_P, OUT_PAD], dtype=tl.float32)
    if PIPE > 0:
        for t in tl.range(0, KS * KS, num_stages=PIPE):
            acc_q, acc_k, acc_v = _dense_tap(t, acc_q, acc_k, acc_v, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W,
                                             s_pix, s_stream, KS, R, S, FLIP, DOT_PRECISION, EMULATE_DOTS)
    else:
        t = 0
        while t < KS * KS:
            acc_q, acc_k, acc_v = _dense_tap(t, acc_q, acc_k, acc_v, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W,
                                             s_pix, s_stream, KS, R, S, FLIP, DOT_PRECISION, EMULATE_DOTS)
            t += 1
    return acc_q, acc_k, acc_v


@triton.jit
def _local_tap(t, acc, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, s_pix,
               S: tl.constexpr, FLIP: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Tap t of the local branch's 3x3 window for one stream (w_taps: the stream's first channel of the tap-major
    (3, 3, 3s) filter). FLIP 0 (the forward): its segment-4 tile shifted by the tap times W_t[i, o] = LOCAL_DW[t, i]
    LOCAL_PW[o, i] (pw_op: the stream's [in, out] block of the pointwise). FLIP 1 (the input gradient): dZ_L's tile
    shifted by the tap times W_{8-t} transposed (pw_op: the block as it is, [out, in]), as `_dense_tap`."""
    ptrs, m = _tap_window(t, src, y, x, pmask, cmask, H, W, s_pix, 3, 1)
    if FLIP:
        w_t = pw_op * tl.load(w_taps + (8 - t) * (3 * S) + ch, mask=cmask, other=0.0)[None, :]
    else:
        w_t = tl.load(w_taps + t * (3 * S) + ch, mask=cmask, other=0.0)[:, None] * pw_op
    return mm(tl.load(ptrs, mask=m, other=0.0).to(tl.float32), w_t, acc, DOT_PRECISION, EMULATE_DOTS)


@triton.jit
def _segment_window(seg, dw3, dw5, dw7):
    """Segment seg + 1's window size and depthwise filter (tap-major (K, K, s))."""
    if seg == 0:
        KS = 3
        w_taps = dw3
    elif seg == 1:
        KS = 5
        w_taps = dw5
    else:
        KS = 7
        w_taps = dw7
    return KS, w_taps


@triton.jit
def _dense_conv(src, dst, dw3, dw5, dw7, pw, N, H, W,
                src_off, s_src_stream, s_src_b, s_src_ch, s_src_pix,
                dst_off, s_dst_stream, s_dst_b, s_dst_ch, s_dst_pix,
                S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr, FLIP: tl.constexpr,
                DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """Program (tile, seg, b) of a dense segment convolution (`gma_dense_z_kernel`, `gma_dense_dx_kernel`): BLOCK_P
    tokens of image b, segment seg + 1, the three streams. Element (stream, image b, channel c of segment seg + 1,
    token p) of src lies at src_off + stream s_src_stream + b s_src_b + (seg S + c) s_src_ch + p s_src_pix (dst
    alike): src_off / dst_off place segment 1's first channel. Returns the three fp32 tiles it stored."""
    tile = tl.program_id(0)
    seg = tl.program_id(1)           # segment seg + 1: 3x3, 5x5, 7x7
    b = tl.program_id(2)
    KS, w_taps = _segment_window(seg, dw3, dw5, dw7)
    R = KS // 2
    p, pmask, y, x, ch, cmask = _token_tile(tile, N, W, S, S_PAD, BLOCK_P)
    wm = cmask[:, None] & cmask[None, :]
    if FLIP:    # the pointwise as it is, [out, in]: the operand's rows are dZ's channels
        pw_op = tl.load(pw + seg * S * S + ch[:, None] * S + ch[None, :], mask=wm, other=0.0)
    else:       # the pointwise transposed, [in, out]: pw_op[i, o] = PW[o, i]
        pw_op = tl.load(pw + seg * S * S + ch[None, :] * S + ch[:, None], mask=wm, other=0.0)
    src_img = src + src_off + b.to(tl.int64) * s_src_b + ((seg * S + ch) * s_src_ch)[None, :]
    acc_q, acc_k, acc_v = _dense_taps(src_img, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, s_src_pix, s_src_stream,
                                      KS, R, S, S_PAD, BLOCK_P, FLIP, DOT_PRECISION, EMULATE_DOTS, PIPE)
    out = (dst + dst_off + b.to(tl.int64) * s_dst_b + ((seg * S + ch) * s_dst_ch)[None, :]
           + (p * s_dst_pix)[:, None])
    om = pmask[:, None] & cmask[None, :]
    tl.store(out, stored(acc_q, out, EMULATE_DOTS), mask=om)
    out += s_dst_stream
    tl.store(out, stored(acc_k, out, EMULATE_DOTS), mask=om)
    out += s_dst_stream
    tl.store(out, stored(acc_v, out, EMULATE_DOTS), mask=om)
    return acc_q, acc_k, acc_v


@triton.jit
def _dense_local_acc(qkv_b, local_dw, local_pw, N, H, W, stride_n,
                     C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """The local branch's Z before its LayerNorm on token tile program_id(0) of image qkv_b, Z_L = sum over the
    streams st and the 9 taps t of X_{st,t} W_{st,t}, W_{st,t}[i, o] = LOCAL_DW[t, st s + i] LOCAL_PW[o, st s + i]
    (the 3x3 depthwise over segment 4 of q, k, v stacked, then the 3s -> s pointwise), one fp32 accumulator
    [BLOCK_P, S_PAD], returned with the tile's tokens and channels (p, pmask, ch, cmask)."""
    tile = tl.program_id(0)
    p, pmask, y, x, ch, cmask = _token_tile(tile, N, W, S, S_PAD, BLOCK_P)
    wm = cmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
    for st in range(3):
        pw_op = tl.load(local_pw + ch[None, :] * (3 * S) + st * S + ch[:, None], mask=wm, other=0.0)   # [i, o]
        src = qkv_b + st * C + 4 * S + ch[None, :]
        w_taps = local_dw + st * S
        if PIPE > 0:
            for t in tl.range(0, 9, num_stages=PIPE):
                acc = _local_tap(t, acc, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, stride_n, S, False,
                                 DOT_PRECISION, EMULATE_DOTS)
        else:
            t = 0
            while t < 9:
                acc = _local_tap(t, acc, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, stride_n, S, False,
                                 DOT_PRECISION, EMULATE_DOTS)
                t += 1
    return acc, p, pmask, ch, cmask


@triton.jit
def _dense_local(qkv_b, z_b, local_dw, local_pw, N, H, W, stride_n,
                 C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """Program (tile, 3, b) of `gma_dense_z_kernel` (and (tile, 4, b) of the dense statistics pass): the local
    branch's Z (`_dense_local_acc`), stored channel-first at z_b (channel o of token p at z_b + o N + p). qkv_b:
    image b of qkv."""
    acc, p, pmask, ch, cmask = _dense_local_acc(qkv_b, local_dw, local_pw, N, H, W, stride_n, C, S, S_PAD, BLOCK_P,
                                                DOT_PRECISION, EMULATE_DOTS, PIPE)
    out = z_b + ch[None, :] * N + p[:, None]
    tl.store(out, stored(acc, out, EMULATE_DOTS), mask=pmask[:, None] & cmask[None, :])


# one variant per (C, dtype, GPU): N, H, W, B not specialised; stride_b (N 3C) is, a multiple of 16 wherever 3C is
# (without it the 16-bit tile loads lose their vector width and async copies: 49 scalar loads a tap on sm_90)
@triton.jit(do_not_specialize=["N", "H", "W", "B"])
def gma_dense_z_kernel(qkv, z, dw3, dw5, dw7, pw, local_dw, local_pw, N, H, W, B, stride_b, stride_n,
                       C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """Z of segments 1-3 and of the local branch (module docstring). Grid (tiles, 4, B): programs (., j - 1, b)
    segment j = 1, 2, 3, programs (., 3, b) the local branch (`_dense_local`). qkv: (B, N, 3C), unit channel stride
    (strides stride_b, stride_n); z: (3B, 4s, H, W) contiguous, image ``stream * B + b``, channel ``j s + o``;
    the local branch's Z (B, s, H, W) in the block segment 0 leaves free, stream q's channels [0, s) (those of
    streams k and v not written); dw3 / dw5 / dw7: tap-major (K, K, s) fp32; pw: (3, s, s) fp32, [j - 1][out][in];
    local_dw: tap-major (3, 3, 3s), local_pw: (s, 3s) fp32. PIPE: the tap loop's stages
    (``tl.range(num_stages=PIPE)``), 0 a plain loop (the interpreter's: it cannot range over a runtime bound)."""
    plane = 4 * S * N                               # one image of Z
    if tl.program_id(1) == 3:
        b = tl.program_id(2).to(tl.int64)
        _dense_local(qkv + b * stride_b, z + b * plane, local_dw, local_pw, N, H, W, stride_n, C, S, S_PAD, BLOCK_P,
                     DOT_PRECISION, EMULATE_DOTS, PIPE)
    else:
        _dense_conv(qkv, z, dw3, dw5, dw7, pw, N, H, W, S, C, stride_b, 1, stride_n, S * N, B * plane, plane, N, 1,
                    S, S_PAD, BLOCK_P, False, DOT_PRECISION, EMULATE_DOTS, PIPE)


# ---------------------------------------------------------------- the fused eval forward (`GMAShape.AGG_FUSED`)
#: programs per tile and image of `gma_dense_aggregate_kernel`: segments 1-3 x 2 heads, segment 0, the local branch
FUSED_PROGRAMS = 8


@triton.jit
def _dense_head(qkv, q, v, part_m, part_l, part_acc, bn_scale, bn_shift, dw3, dw5, dw7, pw, N, H, W, stride_b,
                stride_n, seg, E, tile, b, T,
                C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
                KV_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """Head E of segment seg (1..3) on one tile of image b, the three streams: Z = sum_t X_t W_t[:, E d: (E + 1) d]
    (the dense convolution of the Z pass, `_dense_tap`, only the head's d output channels: [s, d] operands), then in
    registers what the aggregation does with Z (`aggregation._elementwise_head`): BatchNorm affine, hardswish, the Q
    and V proxies stored, the tile's exp(K - max)^T V into the head's half of partial row seg T + tile."""
    KS, w_taps = _segment_window(seg - 1, dw3, dw5, dw7)
    R = KS // 2
    p, pmask, y, x, ch, cmask = _token_tile(tile, N, W, S, S_PAD, BLOCK_P)
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    # [i, k] = PW_seg[E d + k, i]: the pointwise's rows of the head's output channels, transposed
    pw_op = tl.load(pw + (seg - 1) * S * S + (E * D + kk)[None, :] * S + ch[:, None],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
    src = qkv + b.to(tl.int64) * stride_b + (seg * S + ch)[None, :]
    acc_q, acc_k, acc_v = _dense_taps(src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, stride_n, C, KS, R, S, D_PAD,
                                      BLOCK_P, False, DOT_PRECISION, EMULATE_DOTS, PIPE)
    c0 = (seg * 2 + E) * D + kk                                  # the head's channels of C'
    a = tl.load(bn_scale + c0, mask=kmask, other=0.0)[None, :]
    sh = tl.load(bn_shift + c0, mask=kmask, other=0.0)[None, :]
    dst = b.to(tl.int64) * N * CP + p[:, None] * CP + c0[None, :]
    M, L, A = _head_epilogue(acc_q, acc_k, acc_v, a, sh, q + dst, v + dst, pmask[:, None] & kmask[None, :], pmask,
                             tl.full([D_PAD], float("-inf"), dtype=tl.float32), tl.zeros([D_PAD], dtype=tl.float32),
                             tl.zeros([D_PAD, D_PAD], dtype=tl.float32), KV_PRECISION, EMULATE_DOTS)
    _store_partial(M, L, A, (b * 4 * T + seg * T + tile).to(tl.int64), E, part_m, part_l, part_acc, D, D_PAD)


# one variant per (C, dtype, GPU): N, H, W, B not specialised (as gma_dense_z_kernel)
@triton.jit(do_not_specialize=["N", "H", "W"])
def gma_dense_aggregate_kernel(qkv, q, v, pre, part_m, part_l, part_acc, bn_scale, bn_shift, dw3, dw5, dw7, pw,
                               local_dw, local_pw, ln_weight, ln_bias, N, H, W, stride_b, stride_n, ln_eps,
                               C: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                               S_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, KV_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                               PIPE: tl.constexpr):
    """The eval forward's aggregation fused with its dense Z pass (module docstring, "The fused forward"): grid
    (T, 8, B), T = ceil(N / BLOCK_P). Programs (tile, j, b): j < 6 head j % 2 of segment j // 2 + 1
    (`_dense_head`); j = 6 segment 0, both heads (`aggregation._segment0` on the one tile); j = 7 the local branch
    (`_dense_local_acc`, then its LayerNorm and hardswish into pre[..., C':C]). Q, V (B, N, C') and pre in the
    input dtype; the softmax partials one row per (segment, tile), row seg T + tile of image b (part_m, part_l
    (B, 4T, s), part_acc (B, 4T, s, d), fp32), which the combine merges (its segment splits (T, T, T, T)).
    DOT_PRECISION: the dense convolutions' (`dense_z_dots`); KV_PRECISION: exp(K)^T V's (the aggregation's)."""
    tile = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2)
    T = tl.num_programs(0)
    if j < 6:
        _dense_head(qkv, q, v, part_m, part_l, part_acc, bn_scale, bn_shift, dw3, dw5, dw7, pw, N, H, W, stride_b,
                    stride_n, j // 2 + 1, j % 2, tile, b, T, C, S, CP, D, S_PAD, D_PAD, BLOCK_P, DOT_PRECISION,
                    KV_PRECISION, EMULATE_DOTS, PIPE)
    elif j == 6:
        bl = b.to(tl.int64)
        _segment0(qkv + bl * stride_b, q + bl * N * CP, v + bl * N * CP, part_m, part_l, part_acc, bn_scale,
                  bn_shift, bl * 4 * T + tile, tile, tile + 1, N, H, W, stride_n, C, CP, D, D_PAD, BLOCK_P,
                  KV_PRECISION, EMULATE_DOTS)
    else:
        bl = b.to(tl.int64)
        acc, p, pmask, ch, cmask = _dense_local_acc(qkv + bl * stride_b, local_dw, local_pw, N, H, W, stride_n, C,
                                                    S, S_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, PIPE)
        _local_epilogue(acc, tl.load(ln_weight + ch, mask=cmask, other=0.0)[None, :],
                        tl.load(ln_bias + ch, mask=cmask, other=0.0)[None, :], cmask, ln_eps,
                        pre + bl * N * C + p[:, None] * C + (CP + ch)[None, :], pmask[:, None] & cmask[None, :], S,
                        EMULATE_DOTS)


@triton.jit
def _tile_moments(acc, pmask, cmask, ch, n_tile, row, part_mean, part_m2):
    """One tile's per-channel (mean, M2) of its n_tile valid rows, stored as a statistics-pass partial row (mean in
    float64, M2 in fp32: `statistics.merge_segments` merges the rows, Chan's formula between them). M2 is taken
    about the tile's own mean (two passes over registers), so no shift is needed."""
    mean = tl.sum(tl.where(pmask[:, None], acc, 0.0), axis=0) / n_tile
    d = tl.where(pmask[:, None], acc - mean[None, :], 0.0)
    tl.store(part_mean + row + ch, mean.to(tl.float64), mask=cmask)
    tl.store(part_m2 + row + ch, tl.sum(d * d, axis=0), mask=cmask)


# the statistics pass of a training forward whose backward runs B3's dense form (B, N, H, W not specialised)
@triton.jit(do_not_specialize=["N", "H", "W", "B"])
def gma_dense_statistics_kernel(qkv, z, zl, part_mean, part_m2, dw3, dw5, dw7, pw, local_dw, local_pw,
                                N, H, W, B, stride_b, stride_n,
                                C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                                DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """The training statistics pass in the dense form (module docstring, "The statistics pass"): grid (T, 4, B) or
    (T, 5, B), T = ceil(N / BLOCK_P). Programs (tile, j - 1, b), j = 1, 2, 3: segment j's Z of the three streams as
    the Z pass computes it (`_dense_conv`); programs (tile, 3, b): segment 0, whose Z is x itself (copied). Each
    stores its tiles' Z into z (3B, 4s, H, W) (all four segments, as the stencil statistics pass with
    `STORE_Z_MOMENTS`) and, per stream, the tile's (mean, M2) as partial row j T + tile of image ``stream B + b``
    (part_mean float64, part_m2 fp32, (3B 4T, s): `plan_dense_statistics`'s `statistics.SegmentPlan`, every run one
    tile). Programs (tile, 4, b), launched where the training forward reads it: the local branch's Z before its
    LayerNorm (`_dense_local`, as the Z pass's), into zl (B, s, H, W) contiguous, no moments (its LayerNorm's
    statistics are per token: the aggregation takes them)."""
    tile = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2)
    if j == 4:      # the local branch's Z
        bl = b.to(tl.int64)
        _dense_local(qkv + bl * stride_b, zl + bl * (S * N), local_dw, local_pw, N, H, W, stride_n, C, S, S_PAD,
                     BLOCK_P, DOT_PRECISION, EMULATE_DOTS, PIPE)
    else:
        _dense_statistics_segment(qkv, z, part_mean, part_m2, dw3, dw5, dw7, pw, tile, j, b, N, H, W, B, stride_b,
                                  stride_n, C, S, S_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, PIPE)


@triton.jit
def _dense_statistics_segment(qkv, z, part_mean, part_m2, dw3, dw5, dw7, pw, tile, j, b, N, H, W, B, stride_b,
                              stride_n, C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
                              BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                              PIPE: tl.constexpr):
    """Programs (tile, j, b), j < 4, of `gma_dense_statistics_kernel`: a segment's Z and its tile's moments."""
    T = tl.num_programs(0)
    plane = 4 * S * N
    p, pmask, y, x, ch, cmask = _token_tile(tile, N, W, S, S_PAD, BLOCK_P)
    if j == 3:      # segment 0: Z = x
        seg = 0
        src = qkv + b.to(tl.int64) * stride_b + ch[None, :] + (p * stride_n)[:, None]
        m = pmask[:, None] & cmask[None, :]
        acc_q = tl.load(src, mask=m, other=0.0).to(tl.float32)
        acc_k = tl.load(src + C, mask=m, other=0.0).to(tl.float32)
        acc_v = tl.load(src + 2 * C, mask=m, other=0.0).to(tl.float32)
        out = z + b.to(tl.int64) * plane + ch[None, :] * N + p[:, None]
        tl.store(out, stored(acc_q, out, EMULATE_DOTS), mask=m)
        tl.store(out + B * plane, stored(acc_k, out, EMULATE_DOTS), mask=m)
        tl.store(out + 2 * B * plane, stored(acc_v, out, EMULATE_DOTS), mask=m)
    else:
        seg = j + 1
        acc_q, acc_k, acc_v = _dense_conv(qkv, z, dw3, dw5, dw7, pw, N, H, W, S, C, stride_b, 1, stride_n, S * N,
                                          B * plane, plane, N, 1, S, S_PAD, BLOCK_P, False, DOT_PRECISION,
                                          EMULATE_DOTS, PIPE)
    n_tile = tl.minimum(BLOCK_P, N - tile * BLOCK_P).to(tl.float32)
    row = ((b * 4 * T + seg * T + tile) * S).to(tl.int64)          # image b (stream q), row seg T + tile
    step = (B * 4 * T * S).to(tl.int64)                             # one stream further: B images
    _tile_moments(acc_q, pmask, cmask, ch, n_tile, row, part_mean, part_m2)
    _tile_moments(acc_k, pmask, cmask, ch, n_tile, row + step, part_mean, part_m2)
    _tile_moments(acc_v, pmask, cmask, ch, n_tile, row + 2 * step, part_mean, part_m2)


@triton.jit(do_not_specialize=["N", "H", "W"])
def gma_dense_dx_kernel(dZ, d_qkv, dw3, dw5, dw7, pw, N, H, W, dz_stride_b, dz_stride_n, stride_b, stride_n,
                        C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """The input gradient of segments 1-3 (the training backward's B3 with `BackwardTiles.DENSE`): dX_j = the
    transposed dense convolution of dZ_j, into d_qkv. dZ: (B, N, 9s) with unit channel stride (strides dz_stride_b,
    dz_stride_n), token n of image b holding stream st's channel (j - 1) s + o at st 3s + (j - 1) s + o: qkv's
    layout, so that a tap's [BLOCK_P, s] tiles load as the forward's do (channels contiguous, vectorised);
    d_qkv: (B, N, 3C), unit channel stride (strides stride_b, stride_n), its segments 1-3 of q, k, v written (in
    its dtype), nothing else; weights as `gma_dense_z_kernel`'s."""
    _dense_conv(dZ, d_qkv, dw3, dw5, dw7, pw, N, H, W, 0, 3 * S, dz_stride_b, 1, dz_stride_n, S, C, stride_b, 1,
                stride_n, S, S_PAD, BLOCK_P, True, DOT_PRECISION, EMULATE_DOTS, PIPE)


@triton.jit(do_not_specialize=["N", "H", "W"])
def gma_dense_local_dx_kernel(dZL, d_qkv, local_dw, local_pw, N, H, W, stride_b, stride_n,
                              C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """The local branch's input gradient (B3's dense form, `BackwardTiles.DENSE`): grid (tiles, 3, B), program
    (tile, st, b) computes stream st's segment-4 gradient of BLOCK_P tokens of image b, the transposed dense 3x3
    convolution of dZ_L: dx_st[p, i] = sum_t sum_o dZ_L[p + shift_t, o] W_{st,8-t}[i, o] (module docstring, "The
    local branch"), into d_qkv (B, N, 3C; unit channel stride, strides stride_b, stride_n; in its dtype). dZL: the
    LayerNorm's input gradient, (B, N, s) contiguous (`gma_local_backward_kernel` with DZ_OUT); local_dw tap-major
    (3, 3, 3s), local_pw (s, 3s) fp32."""
    tile = tl.program_id(0)
    st = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p, pmask, y, x, ch, cmask = _token_tile(tile, N, W, S, S_PAD, BLOCK_P)
    # the pointwise block as it is, [o, i] = LOCAL_PW[o, st s + i]: the operand's rows are dZ_L's channels
    pw_op = tl.load(local_pw + ch[:, None] * (3 * S) + st * S + ch[None, :], mask=cmask[:, None] & cmask[None, :],
                    other=0.0)
    src = dZL + b * N * S + ch[None, :]
    w_taps = local_dw + st * S
    acc = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
    if PIPE > 0:
        for t in tl.range(0, 9, num_stages=PIPE):
            acc = _local_tap(t, acc, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, S, S, True, DOT_PRECISION,
                             EMULATE_DOTS)
    else:
        t = 0
        while t < 9:
            acc = _local_tap(t, acc, src, w_taps, pw_op, y, x, pmask, ch, cmask, H, W, S, S, True, DOT_PRECISION,
                             EMULATE_DOTS)
            t += 1
    out = d_qkv + b * stride_b + st * C + 4 * S + ch[None, :] + (p * stride_n)[:, None]
    tl.store(out, stored(acc, out, EMULATE_DOTS), mask=pmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["M", "N", "H", "W", "tiles_per_split"])
def gma_dense_wgrad_kernel(qkv, dZ, dw3, dw5, dw7, pw, part_gdw, part_gpw, M, N, H, W, tiles_per_split,
                           stride_b, stride_n, dz_stride_b, dz_stride_n,
                           C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """The weight gradients of segments 1-3 through the dense form (module docstring, "The backward"). Grid
    (3, SPLITS): program (seg, split) walks its run of flat tiles of the M = B N pixels, tap by tap: G_t[i, o] =
    sum over the run's pixels p and the three streams of x[p + shift_t, i] dZ[p, o] (an [s, BLOCK_P] x [BLOCK_P, s]
    product a tile and stream, fp32 accumulator), then folds it into the two gradients, dDW[t, i] = sum_o PW[o, i]
    G_t[i, o] (stored at part_gdw[split, seg, t, :]) and dPW[o, i] += DW[t, i] G_t[i, o] (held across the taps,
    stored at part_gpw[split, seg] as [o, i]). qkv (B, N, 3C) unit channel stride; dZ (B, N, 9s) as
    `gma_dense_dx_kernel`'s."""
    seg = tl.program_id(0)
    split = tl.program_id(1)
    KS, w_taps = _segment_window(seg, dw3, dw5, dw7)
    ch = tl.arange(0, S_PAD)
    cmask = ch < S
    pw_t = tl.load(pw + seg * S * S + ch[None, :] * S + ch[:, None], mask=cmask[:, None] & cmask[None, :],
                   other=0.0)                                                                # [i, o] = PW[o, i]
    _wgrad_taps(qkv + (seg + 1) * S + ch[:, None], dZ + (seg * S + ch)[None, :], w_taps, S, pw_t, KS,
                split, tiles_per_split, part_gdw + (split * 3 + seg) * 49 * S_PAD,
                part_gpw + (split * 3 + seg) * S_PAD * S_PAD, M, N, H, W, stride_b, stride_n, dz_stride_b,
                dz_stride_n, ch, cmask, S_PAD, BLOCK_P, 3, C, 3 * S, DOT_PRECISION, EMULATE_DOTS, PIPE)


@triton.jit(do_not_specialize=["M", "N", "H", "W", "tiles_per_split"])
def gma_dense_local_wgrad_kernel(qkv, dZL, local_dw, local_pw, part_gdw, part_gpw, M, N, H, W, tiles_per_split,
                                 stride_b, stride_n,
                                 C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """The local branch's weight gradients through the dense form: grid (3, SPLITS), program (st, split) for
    stream st's s input channels (the 3s -> s mix does not share weights between the streams): G_t[i, o] = sum
    over its run's pixels of x_st[p + shift_t, i] dZ_L[p, o], folded into dLOCAL_DW[t, st s + i] (stored at
    part_gdw[split, st, t, :]) and dLOCAL_PW[o, st s + i] (part_gpw[split, st] as [o, i]), as
    `gma_dense_wgrad_kernel` does. qkv (B, N, 3C) unit channel stride (segment 4 read); dZL (B, N, s)
    contiguous."""
    st = tl.program_id(0)
    split = tl.program_id(1)
    ch = tl.arange(0, S_PAD)
    cmask = ch < S
    pw_t = tl.load(local_pw + ch[None, :] * (3 * S) + st * S + ch[:, None], mask=cmask[:, None] & cmask[None, :],
                   other=0.0)                                                    # [i, o] = LOCAL_PW[o, st s + i]
    _wgrad_taps(qkv + st * C + 4 * S + ch[:, None], dZL + ch[None, :], local_dw + st * S, 3 * S, pw_t, 3,
                split, tiles_per_split, part_gdw + (split * 3 + st) * 9 * S_PAD,
                part_gpw + (split * 3 + st) * S_PAD * S_PAD, M, N, H, W, stride_b, stride_n, N * S, S,
                ch, cmask, S_PAD, BLOCK_P, 1, C, S, DOT_PRECISION, EMULATE_DOTS, PIPE)


@triton.jit
def _wgrad_taps(x_ch, dz_ch, w_taps, w_tap_stride, pw_t, KS, split, tiles_per_split, gdw_rows, gpw_out,
                M, N, H, W, stride_b, stride_n, dz_stride_b, dz_stride_n, ch, cmask,
                S_PAD: tl.constexpr, BLOCK_P: tl.constexpr, STREAMS: tl.constexpr, X_STREAM: tl.constexpr,
                DZ_STREAM: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                PIPE: tl.constexpr):
    """A weight-gradient program's tap loop (both dense weight-gradient kernels): over the taps of the K x K window,
    G_t from the program's run of flat tiles (`_wgrad_tile`), then dDW[t, :] = sum_o pw_t[:, o] G_t[:, o] stored at
    gdw_rows + t S_PAD, and dPW += DW[t, :] G_t, stored at gpw_out as [o, i] (the pointwise weight's own layout).
    x_ch: the first stream's depthwise input, + channel [:, None] (x loaded as [channels, pixels], the dot's A as
    it lies); dz_ch: dZ + channel [None, :]; w_taps: the filter's first channel, tap t at + t w_tap_stride;
    pw_t: [i, o]; STREAMS streams, X_STREAM / DZ_STREAM elements apart in x / dZ."""
    R = KS // 2
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(M, BLOCK_P))
    g_pw = tl.zeros([S_PAD, S_PAD], dtype=tl.float32)                                        # [i, o]
    t = 0
    while t < KS * KS:     # a while loop: the interpreter cannot range over KS (a tensor there)
        ky = t // KS
        dy = ky - R
        dx = t - ky * KS - R
        g_t = tl.zeros([S_PAD, S_PAD], dtype=tl.float32)
        if PIPE > 0:
            for tile in tl.range(t0, t1, num_stages=PIPE):
                g_t = _wgrad_tile(g_t, tile, x_ch, dz_ch, M, N, H, W, dy, dx, stride_b, stride_n, dz_stride_b,
                                  dz_stride_n, cmask, BLOCK_P, STREAMS, X_STREAM, DZ_STREAM, DOT_PRECISION,
                                  EMULATE_DOTS)
        else:
            tile = t0
            while tile < t1:
                g_t = _wgrad_tile(g_t, tile, x_ch, dz_ch, M, N, H, W, dy, dx, stride_b, stride_n, dz_stride_b,
                                  dz_stride_n, cmask, BLOCK_P, STREAMS, X_STREAM, DZ_STREAM, DOT_PRECISION,
                                  EMULATE_DOTS)
                tile += 1
        tl.store(gdw_rows + t * S_PAD + ch, tl.sum(g_t * pw_t, axis=1))
        g_pw += tl.load(w_taps + t * w_tap_stride + ch, mask=cmask, other=0.0)[:, None] * g_t
        t += 1
    tl.store(gpw_out + ch[None, :] * S_PAD + ch[:, None], g_pw)


@triton.jit
def _wgrad_tile(g_t, tile, x_ch, dz_ch, M, N, H, W, dy, dx, stride_b, stride_n, dz_stride_b, dz_stride_n, cmask,
                BLOCK_P: tl.constexpr, STREAMS: tl.constexpr, X_STREAM: tl.constexpr, DZ_STREAM: tl.constexpr,
                DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """One flat tile's products of one tap into G_t: x at the shifted pixels (zero outside the image) against dZ,
    summed over the STREAMS streams."""
    g = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = g < M
    b = g // N
    n = g - b * N
    yy = n // W + dy
    xx = n % W + dx
    ok = pm & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    xm = cmask[:, None] & ok[None, :]
    zm = pm[:, None] & cmask[None, :]
    xp = x_ch + (b.to(tl.int64) * stride_b + (yy * W + xx) * stride_n)[None, :]
    zp = dz_ch + (b.to(tl.int64) * dz_stride_b + n * dz_stride_n)[:, None]
    for st in tl.static_range(STREAMS):
        xt = tl.load(xp + st * X_STREAM, mask=xm, other=0.0).to(tl.float32)     # [S_PAD, BLOCK_P]
        zt = tl.load(zp + st * DZ_STREAM, mask=zm, other=0.0).to(tl.float32)   # [BLOCK_P, S_PAD]
        g_t = mm(xt, zt, g_t, DOT_PRECISION, EMULATE_DOTS)
    return g_t


def dense_z_dots(dots: DotVariant, dtype) -> DotVariant:
    """The dots of this kernel: the input dtype's own MMAs for fp16 / bf16 where the GPU's dots for them
    are one-pass TF32 (`config.operand_precision`), else the variant as it is (3xTF32 for fp32 on sm_80+,
    FMAs on sm_70/75)."""
    return dots._replace(precision=operand_precision(dots.precision, dtype_name(dtype), True))


def dense_z_tiles(C: int, variant: int = 1) -> Tuple[int, int]:
    """(BLOCK_P, num_warps) for width C: `config.DENSE_Z_TILES` by S_PAD (variant 1), `config.DENSE_Z_TILES_ALT`
    (variant 2; `GMAShape.AGG_ZDENSE`). The interpreter runs them too: a program is a few [BLOCK_P, S_PAD]
    products a tap there."""
    table = {1: DENSE_Z_TILES, 2: DENSE_Z_TILES_ALT}[variant]
    return table[dot_pad(C // 5)]


def _launch_kwargs(C: int, tiles: Tuple[int, int], dd: DotVariant) -> dict:
    """The constexprs and warps every kernel of this module takes: width C, (BLOCK_P, num_warps), its dots."""
    bp, warps = tiles
    return dict(C=C, S=C // 5, S_PAD=dot_pad(C // 5), BLOCK_P=bp, DOT_PRECISION=dd.precision, EMULATE_DOTS=dd.emulate,
                PIPE=0 if interpreting() else DENSE_Z_STAGES, num_warps=warps)


def plan_dense_z_pass(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
                      local_dw: Tensor, local_pw: Tensor, dots: DotVariant, z: Optional[Tensor] = None,
                      tiles: Optional[Tuple[int, int]] = None):
    """(z, (grid, args, kwargs)) of the launch, without launching (meta tensors work; the AOT specialisation
    runs it). qkv (B, N, 3C) with unit channel stride; weights: the folded filters (fp32, contiguous,
    tap-major: `folding.FoldedGMAWeights`); dots: the call's variant (`_common.dot_variant`), made this
    kernel's by `dense_z_dots`; z: the (3B, 4s, H, W) stage-dtype buffer to write (allocated if None);
    tiles: (BLOCK_P, num_warps), default `dense_z_tiles`."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    if qkv.stride(2) != 1:
        raise ValueError("qkv needs a unit channel stride")
    z = z_pass_buffer(qkv, H, W, z)
    bp, warps = tiles or dense_z_tiles(C)
    dd = dense_z_dots(dots, qkv.dtype)
    args = (qkv, z, dw3, dw5, dw7, pw, local_dw, local_pw, N, H, W, B, qkv.stride(0), qkv.stride(1))
    kwargs = _launch_kwargs(C, (bp, warps), dd)
    return z, ((triton.cdiv(N, bp), 4, B), args, kwargs)


def plan_dense_aggregate(qkv: Tensor, H: int, W: int, weights, ln_eps: float, q: Tensor, v: Tensor, pre: Tensor,
                         part_m: Tensor, part_l: Tensor, part_acc: Tensor, dots: DotVariant, kv_precision: str,
                         tiles: Optional[Tuple[int, int]] = None):
    """(grid, args, kwargs) of `gma_dense_aggregate_kernel` (the fused eval forward, `GMAShape.AGG_FUSED`), without
    launching. qkv (B, N, 3C) with unit channel stride; weights: `folding.FoldedGMAWeights`; q, v (B, N, C') and pre
    (B, N, C) contiguous in qkv's dtype; part_m, part_l (B, 4T, s) and part_acc (B, 4T, s, d) fp32 (T =
    `fused_tiles(N, tiles)`); dots: the call's variant, made the dense convolutions' by `dense_z_dots`;
    kv_precision: exp(K)^T V's (the aggregation's, `config.operand_precision`); tiles: (BLOCK_P, num_warps),
    default `dense_z_tiles`."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s, cp = C // 5, 4 * (C // 5)
    d = cp // 8
    if qkv.stride(2) != 1:
        raise ValueError("qkv needs a unit channel stride")
    tiles = tiles or dense_z_tiles(C)
    T = triton.cdiv(N, tiles[0])
    for name, t, want in (("q", q, (B, N, cp)), ("v", v, (B, N, cp)), ("pre", pre, (B, N, C)),
                          ("part_m", part_m, (B, 4 * T, s)), ("part_l", part_l, (B, 4 * T, s)),
                          ("part_acc", part_acc, (B, 4 * T, s, d))):
        if tuple(t.shape) != want or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {want} tensor, got {tuple(t.shape)}")
    w = weights
    args = (qkv, q, v, pre, part_m, part_l, part_acc, w.bn_scale, w.bn_shift, w.dw3, w.dw5, w.dw7, w.pw, w.local_dw,
            w.local_pw, w.ln_weight, w.ln_bias, N, H, W, qkv.stride(0), qkv.stride(1), ln_eps)
    kwargs = _launch_kwargs(C, tiles, dense_z_dots(dots, qkv.dtype))
    kwargs.update(CP=cp, D=d, D_PAD=dot_pad(d), KV_PRECISION=kv_precision)
    return (T, FUSED_PROGRAMS, B), args, kwargs


#: the fused forward's widest tile with 3xTF32 dots (fp32 layers): 128 tokens at S_PAD 16 (`DENSE_Z_TILES`) spilled
#: 48-64 B on sm_80 / sm_90 (255 registers, AOT, Triton 3.6, batch 128); 64 compiled without
FUSED_TF32X3_MAX_BLOCK_P = 64


def fused_tile(C: int, variant: int, precision: str) -> Tuple[int, int]:
    """(BLOCK_P, num_warps) of `gma_dense_aggregate_kernel` at width C, ZDENSE variant `variant` and the call's dot
    precision: the Z pass's (`dense_z_tiles`), at most `FUSED_TF32X3_MAX_BLOCK_P` tokens with 3xTF32 dots."""
    bp, warps = dense_z_tiles(C, variant)
    return (min(bp, FUSED_TF32X3_MAX_BLOCK_P) if precision == "tf32x3" else bp), warps


def fused_tiles(N: int, tiles: Tuple[int, int]) -> int:
    """Token tiles an image of N tokens takes in the fused forward at `tiles` (BLOCK_P, num_warps): T, so that its
    partials hold 4T rows an image (one per segment and tile)."""
    return triton.cdiv(N, tiles[0])


def local_z_of(z: Tensor, B: int) -> Tensor:
    """The local branch's Z (B, s, H, W) within the dense Z pass's (3B, 4s, H, W) buffer (a view)."""
    return z[:B, : z.shape[1] // 4]


# ---------------------------------------------------------------- the statistics pass (training: `BackwardTiles.DENSE`)
def dense_statistics_applies(C: int, dtype: str, precision: str) -> bool:
    """Whether the training statistics pass may run in the dense form (`dense_z_moments`): where the dense Z pass
    compiles without spilling with 16-bit operands (`config.zdense_applies` for fp16 / bf16: S_PAD <= 64, tensor-core
    dots). Its users (`dense_statistics_planes`, picked by `train_op.planes_fn_for`) are the layers whose backward
    runs B3's dense form (`aggregation_backward.dense_b3_applies`: the same widths and dtypes); elsewhere such a
    layer's statistics pass is the stencil one without y (`statistics.STORE_Z_MOMENTS`)."""
    return dtype in ("fp16", "bf16") and zdense_applies(C, dtype, precision)


def plan_dense_statistics(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
                          dots: DotVariant, tiles: Optional[Tuple[int, int]] = None,
                          local_dw: Optional[Tensor] = None, local_pw: Optional[Tensor] = None):
    """(part_mean, part_m2, plan, z, zl, (grid, args, kwargs)) of `gma_dense_statistics_kernel`, without launching:
    the partial moments ((3B 4T, s), float64 / fp32) in `statistics.plan_statistics`' layout with plan =
    SegmentPlan(T, (T, T, T, T)) (one tile a run), Z (3B, 4s, H, W) in the stage dtype, and with local_dw and
    local_pw (the training forward then reads it: `launcher.plan_pre_projection`'s zl) the local branch's Z before
    its LayerNorm, zl (B, s, H, W) in the stage dtype (grid (T, 5, B)), else zl None (grid (T, 4, B)). dots: the
    layer's (`_common.dot_variant`), made this kernel's by `dense_z_dots`; tiles: default `dense_z_tiles`."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s = C // 5
    if qkv.stride(2) != 1:
        raise ValueError("qkv needs a unit channel stride")
    bp, warps = tiles or dense_z_tiles(C)
    T = triton.cdiv(N, bp)
    plan = SegmentPlan(T, (T, T, T, T))
    part_mean = torch.empty(3 * B * plan.programs, s, dtype=torch.float64, device=qkv.device)
    part_m2 = torch.empty(3 * B * plan.programs, s, dtype=torch.float32, device=qkv.device)
    z = torch.empty(3 * B, 4 * s, H, W, dtype=stage_dtype(qkv.dtype), device=qkv.device)
    if (local_dw is None) != (local_pw is None):
        raise ValueError("the local branch's Z needs both local_dw and local_pw")
    zl = None if local_dw is None else torch.empty(B, s, H, W, dtype=z.dtype, device=qkv.device)
    # without the local branch its weights' and zl's pointers are z's and dw3's (the programs reading them not launched)
    local = (zl, local_dw, local_pw) if zl is not None else (z, dw3, pw)
    args = (qkv, z, local[0], part_mean, part_m2, dw3, dw5, dw7, pw, *local[1:], N, H, W, B, qkv.stride(0),
            qkv.stride(1))
    grid = (T, 4 if zl is None else 5, B)
    return part_mean, part_m2, plan, z, zl, (grid, args, _launch_kwargs(C, (bp, warps), dense_z_dots(dots, qkv.dtype)))


def dense_z_moments(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
                    local_dw: Optional[Tensor] = None, local_pw: Optional[Tensor] = None,
                    dots: Optional[DotVariant] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """`statistics.z_moments` with ``store=STORE_Z_MOMENTS`` in the dense form: (moments (2, 4s) float64 [mean,
    M2] of Z per channel over the 3B images, Z (3B, 4s, H, W) in the stage dtype, and with local_dw and local_pw
    the local branch's Z before its LayerNorm, zl (B, s, H, W) in the stage dtype, else an empty tensor)."""
    from ._launch import device_guard, wrap_triton
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    local = () if local_dw is None and local_pw is None else (local_dw.contiguous(), local_pw.contiguous())
    part_mean, part_m2, plan, z, zl, (grid, args, kwargs) = plan_dense_statistics(
        qkv, H, W, *(w.contiguous() for w in (dw3, dw5, dw7, pw)), dots or dot_variant(qkv), None, *local)
    with device_guard(qkv):
        wrap_triton(gma_dense_statistics_kernel)[grid](*args, **kwargs)
    moments = torch.stack(merge_segments(part_mean, part_m2, plan, kwargs["BLOCK_P"], qkv.shape[1]))
    return moments, z, z.new_empty(0) if zl is None else zl


#: the dense statistics pass as one opaque op (as ``gmf::triton_z_moments_planes`` is for the stencil pass)
DENSE_PLANES_OP_NAME = "gmf::triton_dense_z_moments_planes"


def _register_dense_planes():
    """``gmf::triton_dense_z_moments_planes``: `dense_z_moments` as a ``custom_op`` with a fake, so that
    torch.compile keeps it one opaque node, as the stencil statistics pass's op. Returns (moments (2, 4s) float64,
    Z (3B, 4s, H, W) in the stage dtype, zl: with local_dw and local_pw the local branch's Z (B, s, H, W) in the
    stage dtype, else empty)."""
    def impl(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
             local_dw: Optional[Tensor] = None, local_pw: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        return dense_z_moments(qkv, H, W, dw3, dw5, dw7, pw, local_dw, local_pw)

    op = torch.library.custom_op(DENSE_PLANES_OP_NAME, impl, mutates_args=())

    @op.register_fake
    def _(qkv, H, W, dw3, dw5, dw7, pw, local_dw=None, local_pw=None):
        B, s = qkv.shape[0], qkv.shape[-1] // 15
        st = stage_dtype(qkv.dtype)
        return (qkv.new_empty(2, 4 * s, dtype=torch.float64), qkv.new_empty(3 * B, 4 * s, H, W, dtype=st),
                qkv.new_empty((0,) if local_dw is None else (B, s, H, W), dtype=st))
    return op


# registered once per process (a re-import keeps the first)
dense_planes_op = None if _op_exists(DENSE_PLANES_OP_NAME.split("::")[1]) else _register_dense_planes()


def planes_without_y(qkv: Tensor, local: bool = True):
    """The statistics pass that keeps Z and no y, for the layer whose input is qkv when its backward runs B3's dense
    form (which reads no y): in the dense form itself where it applies (`dense_statistics_planes`, the convolutions
    on tensor cores; with `local` the local branch's Z too), else the stencil pass storing no y
    (`statistics.statistics_planes`). The training forward's (`train_op.planes_fn_for`) and the recompute of eval
    mode with gradients (`recompute.recompute`)."""
    if dense_statistics_applies(qkv.shape[-1] // 3, dtype_name(qkv.dtype), dot_variant(qkv).precision):
        return dense_statistics_planes if local else functools.partial(dense_statistics_planes, local=False)
    return functools.partial(statistics_planes, keep_y=False)


def dense_statistics_planes(qkv: Tensor, H: int, W: int, wts, group=None, local: bool = True):
    """`statistics.statistics_planes` without y, in the dense form (``gmf::triton_dense_z_moments_planes``): (mean,
    var, count, (Z, an empty y_all, zl)) for a training forward whose backward runs B3's dense form
    (`train_op.planes_fn_for`, where `dense_statistics_applies`); zl: with `local` (a Triton forward, which reads
    it: `launcher.plan_pre_projection`'s zl) the local branch's Z before its LayerNorm (B, s, H, W), else None
    (the CUDA forward runs its own). With a process group only the moments are all-reduced, as there."""
    B, N, C3 = qkv.shape
    check_train_size(B, N, C3 // 3)
    lw = (wts.local_dw, wts.local_pw) if local else ()
    moments, z, zl = torch.ops.gmf.triton_dense_z_moments_planes(qkv, H, W, wts.dw3, wts.dw5, wts.dw7, wts.pw, *lw)
    return (*mean_var_count(moments, qkv, wts, group), (z, z.new_empty(0), zl if local else None))


# ---------------------------------------------------------------- the backward (training: `BackwardTiles.DENSE`)
#: programs the weight gradient's split aims at (a few waves of 100+ SMs), and under the interpreter few, large
#: tiles (its cost is per operation) in at least two splits, so that the partial sums are exercised
DENSE_WGRAD_TARGET_PROGRAMS = 1024
INTERPRETER_WGRAD_BLOCK_P = 256


def dense_dz_buffer(B: int, N: int, s: int, dtype, device) -> Tensor:
    """The dense B3's dZ of segments 1-3: (B, N, 9s), token n of image b holding stream st's channel c of segments
    1-3 at st 3s + c (qkv's layout: the dense kernels load its tiles channels-contiguous); `gma_dz_kernel` writes it
    through `dense_dz_layout`."""
    return torch.empty(B, N, 9 * s, dtype=dtype, device=device)


def _check_dz(dZ: Tensor, B: int, N: int, s: int) -> None:
    if dZ.dim() != 3 or tuple(dZ.shape) != (B, N, 9 * s):
        raise ValueError(f"dZ: expected (B, N, 9s) = ({B}, {N}, {9 * s}), got {tuple(dZ.shape)}")
    if dZ.stride(2) != 1:
        raise ValueError("dZ needs a unit channel stride")


def plan_dense_dx(dZ: Tensor, d_qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor,
                  pw: Tensor, dots: DotVariant, tiles: Optional[Tuple[int, int]] = None):
    """(grid, args, kwargs) of `gma_dense_dx_kernel`: the input gradient of segments 1-3 from dZ (B, N, 9s,
    `dense_dz_buffer`'s layout, unit channel stride) into d_qkv (B, N, 3C) with unit channel stride. dots: the
    backward's (`statistics.backward_dots`), made this kernel's by `dense_z_dots` (16-bit operands for fp16 / bf16
    layers); tiles: (BLOCK_P, num_warps), default the forward's `dense_z_tiles`."""
    (B, N, s), grid, kwargs = _dx_plan(d_qkv, dZ, dots, tiles)
    _check_dz(dZ, B, N, s)
    args = (dZ, d_qkv, dw3, dw5, dw7, pw, N, H, W, dZ.stride(0), dZ.stride(1), d_qkv.stride(0), d_qkv.stride(1))
    return grid, args, kwargs


def _dx_plan(d_qkv: Tensor, dz: Tensor, dots: DotVariant, tiles: Optional[Tuple[int, int]]):
    """What both input-gradient plans share: ((B, N, s), grid (tiles, 3, B), kwargs), d_qkv's layout checked."""
    B, N, C3 = d_qkv.shape
    C = C3 // 3
    if d_qkv.stride(2) != 1:
        raise ValueError("d_qkv needs a unit channel stride")
    bp, warps = tiles or dense_z_tiles(C)
    return (B, N, C // 5), (triton.cdiv(N, bp), 3, B), _launch_kwargs(C, (bp, warps), dense_z_dots(dots, dz.dtype))


def dense_wgrad_tiles(C: int, M: int) -> Tuple[int, int]:
    """(BLOCK_P, num_warps) of `gma_dense_wgrad_kernel`: `config.DENSE_WGRAD_TILES` by S_PAD on a GPU; one large
    tile under the interpreter."""
    bp, warps = DENSE_WGRAD_TILES.get(dot_pad(C // 5), (32, 4))    # S_PAD 128: not a candidate (it spills)
    if interpreting():
        return min(INTERPRETER_WGRAD_BLOCK_P, max(16, triton.next_power_of_2(triton.cdiv(M, 2)))), warps
    return bp, warps


def _wgrad_plan(qkv: Tensor, dz: Tensor, taps: int, dots: DotVariant, tiles: Optional[Tuple[int, int]]):
    """What both weight-gradient plans share: (buffers {part_gdw (splits, 3, taps, S_PAD), part_gpw (splits, 3,
    S_PAD, S_PAD)}, grid (3, splits), the leading scalar arguments (M, N, tiles per split) and the kwargs)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s_pad = dot_pad(C // 5)
    if qkv.stride(2) != 1:
        raise ValueError("qkv needs a unit channel stride")
    M = B * N
    bp, warps = tiles or dense_wgrad_tiles(C, M)
    splits, tps = split_plan(M, 1, bp, 2 * 3 if interpreting() else DENSE_WGRAD_TARGET_PROGRAMS, 3)
    buf = {"part_gdw": torch.empty(splits, 3, taps, s_pad, dtype=torch.float32, device=qkv.device),
           "part_gpw": torch.empty(splits, 3, s_pad, s_pad, dtype=torch.float32, device=qkv.device)}
    return buf, (3, splits), (M, N), tps, _launch_kwargs(C, (bp, warps), dense_z_dots(dots, dz.dtype))


def plan_dense_wgrad(qkv: Tensor, dZ: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor,
                     pw: Tensor, dots: DotVariant, tiles: Optional[Tuple[int, int]] = None):
    """(buffers {part_gdw, part_gpw}, (grid, args, kwargs)) of `gma_dense_wgrad_kernel`: the weight gradients'
    per-program partials of segments 1-3 from the depthwise inputs (segments 1-3 of qkv (B, N, 3C), unit channel
    stride) and dZ (as `plan_dense_dx`); `dense_weight_grads` sums them."""
    B, N, C3 = qkv.shape
    _check_dz(dZ, B, N, C3 // 15)
    buf, grid, (M, N), tps, kwargs = _wgrad_plan(qkv, dZ, 49, dots, tiles)
    args = (qkv, dZ, dw3, dw5, dw7, pw, buf["part_gdw"], buf["part_gpw"], M, N, H, W, tps, qkv.stride(0),
            qkv.stride(1), dZ.stride(0), dZ.stride(1))
    return buf, (grid, args, kwargs)


def dense_weight_grads(buf, s: int) -> Tuple[List[Tensor], Tensor]:
    """([g_dw3 (3, 3, s), g_dw5, g_dw7] tap-major, g_pw (3, s, s) [j - 1][out][in]) from `plan_dense_wgrad`'s
    partials (one torch sum over the splits)."""
    gdw = buf["part_gdw"].sum(0)
    g_dw = [gdw[j, :k * k, :s].reshape(k, k, s) for j, k in enumerate((3, 5, 7))]
    return g_dw, buf["part_gpw"].sum(0)[:, :s, :s]


# ---------------------------------------------------------------- the local branch's backward (`BackwardTiles.DENSE`)
def dense_local_dz_buffer(B: int, N: int, s: int, dtype, device) -> Tensor:
    """The local branch's dZ_L (the LayerNorm's input gradient) for the dense kernels: (B, N, s) contiguous,
    channels innermost (its tiles load as qkv's do); `gma_local_backward_kernel` with DZ_OUT writes it."""
    return torch.empty(B, N, s, dtype=dtype, device=device)


def _check_dzl(dZL: Tensor, B: int, N: int, s: int) -> None:
    if tuple(dZL.shape) != (B, N, s) or not dZL.is_contiguous():
        raise ValueError(f"dZ_L: expected a contiguous (B, N, s) = ({B}, {N}, {s}) tensor, got {tuple(dZL.shape)} "
                         f"with strides {dZL.stride()}")


def plan_dense_local_dx(dZL: Tensor, d_qkv: Tensor, H: int, W: int, local_dw: Tensor, local_pw: Tensor,
                        dots: DotVariant, tiles: Optional[Tuple[int, int]] = None):
    """(grid, args, kwargs) of `gma_dense_local_dx_kernel`: the local branch's input gradient from dZ_L
    (`dense_local_dz_buffer`'s) into segment 4 of d_qkv (B, N, 3C, unit channel stride). dots and tiles as
    `plan_dense_dx`'s."""
    (B, N, s), grid, kwargs = _dx_plan(d_qkv, dZL, dots, tiles)
    _check_dzl(dZL, B, N, s)
    return grid, (dZL, d_qkv, local_dw, local_pw, N, H, W, d_qkv.stride(0), d_qkv.stride(1)), kwargs


def plan_dense_local_wgrad(qkv: Tensor, dZL: Tensor, H: int, W: int, local_dw: Tensor, local_pw: Tensor,
                           dots: DotVariant, tiles: Optional[Tuple[int, int]] = None):
    """(buffers {part_gdw (splits, 3, 9, S_PAD), part_gpw (splits, 3, S_PAD, S_PAD)}, (grid, args, kwargs)) of
    `gma_dense_local_wgrad_kernel`: the local branch's weight gradients' partials from qkv's segment 4 and dZ_L;
    `dense_local_weight_grads` sums them."""
    B, N, C3 = qkv.shape
    _check_dzl(dZL, B, N, C3 // 15)
    buf, grid, (M, N), tps, kwargs = _wgrad_plan(qkv, dZL, 9, dots, tiles)
    args = (qkv, dZL, local_dw, local_pw, buf["part_gdw"], buf["part_gpw"], M, N, H, W, tps, qkv.stride(0),
            qkv.stride(1))
    return buf, (grid, args, kwargs)


def dense_local_weight_grads(buf, s: int) -> Tuple[Tensor, Tensor]:
    """(g_local_dw tap-major (3, 3, 3s), g_local_pw (s, 3s)) from `plan_dense_local_wgrad`'s partials."""
    gdw = buf["part_gdw"].sum(0)[:, :, :s]                      # [st, t, i]
    gpw = buf["part_gpw"].sum(0)[:, :s, :s]                     # [st, o, i]
    return gdw.permute(1, 0, 2).reshape(3, 3, 3 * s), gpw.permute(1, 0, 2).reshape(s, 3 * s)
