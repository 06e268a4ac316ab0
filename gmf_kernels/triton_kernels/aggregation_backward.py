"""Backward of the aggregation side (B3, the local branch): Triton kernels + launchers.

Kernels replacing the PyTorch stage functions of `backward.py` (tested against them in
tests/test_triton_aggregation_backward.py); the launchers at the end keep those functions'
signatures and returns, on the stage tensors (`config.stage_dtype`: fp32 for fp32 layers and
backward.py's PyTorch recompute, the layer's own fp16/bf16 otherwise, as eager AMP keeps its
activations; every kernel widens them to fp32 on load, computes and accumulates in fp32 and
rounds once on store; partial sums and weight gradients fp32): images channels-first, q, k, v
stacked as 3B images, Z / dP / G / dZ (3B, 4s, H, W), u_j / y_j (3B, s, H, W), the local
branch's (B, s|3s, H, W). Every launch goes through `_launch.wrap_triton` (torch's
``wrap_triton`` while a trace runs, else a direct launch) under the input's CUDA device, as
`launcher.launch_pre_projection` does.

Pixels are walked as ONE flat index g over the images x N = H W tokens (image g // N, token
g % N): tiles of BLOCK_P consecutive flat pixels cross image borders, so odd and tiny grids
(7x7, 5x7) waste no tile padding. Tiles are [channels, pixels], the pixel axis (contiguous
in memory) the fast one: coalesced loads (``g % N`` hides the contiguity from the compiler,
so the orientation has to say it). Grids are split over the flat tiles (`split_plan`): each
program walks ``tiles_per_split`` consecutive tiles and keeps its part of every reduction
(weight gradients) in registers; the few partials (SPLITS x weights) are
summed by one small torch reduction in the launcher (no atomics: deterministic).

G = dP * hardswish'(Z a + b) and its per-channel sums (`backward.b2_bn_sums`) come from the B2
kernels themselves (attention_backward.py, FUSE_BN): dP is never written.

* `gma_dz_kernel` (`b3_dz`): dZ = ka G + kz Z + k0 per channel (`dz_coefficients`: the
  batch-statistics terms, or ka = a), on a channel range.
* `gma_pw_backward_kernel` (`b3_pointwise_depthwise`, channel mix): per segment j = 1..3, per
  pixel tile, dy = pw_jᵀ dz (``tl.dot``, pw_j loaded once per program) into a scratch
  buffer in the stage dtype, and g_pw_j += dz yᵀ (``tl.dot`` over the tile's pixels, fp32 accumulator in
  registers). Its prologue can form dz from G and Z itself (`b3_fused`).
* `gma_dw_backward_kernel` and `gma_dw_wgrad_kernel` (`b3_pointwise_depthwise`, `local_backward`;
  generic: the backward of a depthwise "same" 3x3, 5x5 or 7x7 convolution, `plan_dw_backward`): du =
  correlation of dy with the flipped window (masked at the image border), and the weight
  gradient g_w[c, t] = sum_p dy[c, p] u[c, p + t - R] as per-program partials: a program per
  tap row keeps the row's KS products in KS [channels, pixels] accumulators across its tiles
  and sums the pixels once at the end. The CRPE's weight gradient (its 3x3/5x5/7x7 windows)
  launches the same kernel (`plan_dw_wgrad`, from `attention_backward.plan_b2`).
  Until 2026-12-05 one kernel did both, sharing each tap's shifted dy load, and summed every
  tap's products over the tile's pixels at every tile into a one-hot updated [channels,
  TAPS_PAD] tile: in sm_90 SASS (C = 320 fp16, Triton 3.6) each tap was ~340 instructions for
  8 elements per thread (masks, 64-bit addresses, the one-hot update) and three CTA barriers
  with shared-memory round trips (the cross-warp sum). Split: the input gradient's tap is ~95
  instructions with no barrier, the weight gradient's ~20 per element and tap (7x7; its tile
  index arithmetic is paid per tap row, not per tap), the barriers once per program. Compiler
  figures, not timings. On a GPU both walk rows by default since 2026-12-05 (DW_ROWS,
  `DW_ROWS_DEFAULT`; the tile kernels stay tuning candidates; `_dw_backward_rows`): the forward
  stencil of dy with the filter turned half a turn, each dy row read once per walk as its KS
  column shifts into KS rolling accumulators, 4.3-7.2 instructions per FFMA in its loop against
  the tap's 13.3 (sm_90, fp16).
* `gma_local_backward_kernel` (`local_backward`): hardswish and LayerNorm backward per pixel
  (over the s channels, recomputed by each program of a tile), then the 3s -> s pointwise's
  input gradient dw4 = local_pwᵀ dz4 and weight gradient (``tl.dot``), and the LayerNorm
  affine's gradients; the depthwise 3x3 over the 3s channels is `gma_dw_backward_kernel` and
  `gma_dw_wgrad_kernel`.

Why `b3_fused` forms dZ in the pointwise kernel's prologue (bytes per pixel, fp32 stage
tensors, s channels per segment; half of each for fp16/bf16 ones): separately, b3_dz reads G, Z and writes dZ over 4s channels (48 s B;
eval: no Z, 32 s B) and the pointwise kernel reads dZ of segments 1..3 (12 s B): 60 s B
(eval 44 s B). Fused, the pointwise kernel reads G and Z of segments 1..3 (24 s B; eval G
only, 12 s B) and the dz kernel writes segment 0's du (= its dZ) only (12 s B; eval 8 s B):
36 s B (eval 20 s B), and dZ of segments 1..3 never exists. The prologue is 2 FMAs per
element, nothing next to the s x s mixes. `b3_dz` and `b3_pointwise_depthwise` stay
available with backward.py's signatures (the unfused pair).

Where the depthwise inputs come from and the input gradients go: `gma_dw_wgrad_kernel` reads the
depthwise input u, `gma_dw_backward_kernel` stores its input gradient, and `gma_dz_kernel` stores
segment 0's du (= its dZ),
through a `Layout` (two-level image and channel strides): a fresh (I, NC, N) fp32 buffer or a
strided image batch (the stage functions' contract), or, in the Triton stage set
(`backward.Stages.into_d_qkv`, recompute.py's rc with rc["qkv"]), the elements' own places in
qkv and in the qkv gradient (B, N, 3C), in qkv's dtype (`qkv_layout`). Per token, in units of
s x 4 bytes: `backward.recompute`'s layout copies of u_1..3 and u4 (read 12 e / 4, write 12)
and their reads (12) become reads of qkv (12 e / 4); the assembly of d_qkv otherwise --
stack du_0..3 (read and write 12), cat with the local branch's (read and write 15 each), the
layout copy back to (B, N, 3C) (15 + 15) and the cast (15 read, 15 e / 4 written) -- about
100 units, becomes the stores into d_qkv, 15 e / 4 (the fp32 buffers' own writes, 15, not
made either).

Why dy goes through memory (scratch (3, 3B, s, N) in the stage dtype) between the two B3 kernels: du
needs dy on the stencil halo (up to 3 rows/cols around the tile), and a register tile
cannot be shifted; recomputing dy = pwᵀ dz per tap would cost KS² channel mixes (49 s²
MACs per pixel at 7x7 instead of s²). Writing and re-reading dy costs 2 e B per element of
segments 1..3 (e: the stage element size); the halo comes from L1/L2. Same for dw4 in the local branch.

Bounds aimed at, from byte and FLOP counts (not measured: no GPU here):

* `gma_dz_kernel`: 3e B per element (2e eval): HBM-bandwidth bound.
* `gma_pw_backward_kernel`: 4 s² FLOP per pixel and segment (dy and g_pw, tensor cores)
  against 12 s B (read dz, y; write dy; fused: 16 s B): s/3 FLOP/B, 21 at s = 64. With 3xTF32
  (fp32 layers) that is below an H100's ridge (~50 FLOP/B: a third of the TF32 peak over HBM
  bandwidth) and near an A100's (~26): memory bound, or nearly. fp16/bf16 layers take one TF32
  pass (`statistics.backward_dots`: the forward's dots), three times the ridge: memory bound,
  with fewer registers (ptxas, sm_90: at most 137 per thread against 255; C = 320: 126 against 198). `gma_local_backward_kernel`: 12 s² FLOP against
  (8 s + 1) 4 B per pixel: 0.37 s FLOP/B, alike.
* `gma_dw_backward_kernel`: 2 KS² FLOP per element against 8 B (read dy, write du; fp32):
  KS²/4 FLOP/B = 2, 6, 12 for 3x3, 5x5, 7x7, against an fp32 CUDA-core ridge of ~10 (A100) /
  ~20 (H100) FLOP/B: memory bound but at 7x7 on an A100. `gma_dw_wgrad_kernel`: the same
  FLOPs against 8 B compulsory (read dy, u), u re-read once per tap row from L2: KS x 8 B from
  L2, the kx shifts from L1; issue-bound in practice (a mask, a load, a conversion and a
  multiply-add per element and tap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..folding import FoldedGMAWeights
from . import _common  # _common.interpreting(): the stores' rounding (tests patch `interpreting` here for tiles)
from ._common import (DotVariant, dot_variant, hardswish_grad, interpreting, mm, rows_input, rows_piece,
                      rows_shift, stored)
from .aggregation import split_plan as aggregation_split_plan
from .config import cdiv, dot_pad, kernel_dot_precision, next_pow2
from .dense_z import (dense_dz_buffer, dense_local_dz_buffer, dense_local_weight_grads, dense_weight_grads,
                      gma_dense_dx_kernel, gma_dense_local_dx_kernel, gma_dense_local_wgrad_kernel,
                      gma_dense_wgrad_kernel, plan_dense_local_dx, plan_dense_local_wgrad,
                      plan_dense_dx, plan_dense_wgrad)
from . import tile_spaces
from .tile_spaces import register_tiles

Tensor = torch.Tensor


# ================================================================ kernels
@triton.jit
def _flat_pixels(t, M, N, BLOCK_P: tl.constexpr):
    """Flat pixels of tile t: image, token within the image, validity."""
    g = t * BLOCK_P + tl.arange(0, BLOCK_P)
    return g // N, g % N, g < M


@triton.jit
def _flat_tile(t, M, N, W, BLOCK_P: tl.constexpr):
    """`_flat_pixels` of tile t with each pixel's row and column: image, token, validity, y, x."""
    img, n, pm = _flat_pixels(t, M, N, BLOCK_P)
    return img, n, pm, n // W, n % W


@triton.jit
def _tile_range(split, tiles_per_split, M, BLOCK_P: tl.constexpr):
    """Tiles [t0, t1) of this split."""
    t0 = split * tiles_per_split
    return t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(M, BLOCK_P))


@triton.jit
def _grouped(i, group, s_group, s):
    """Offset of image or channel i in a `Layout`: (i // group) s_group + (i % group) s."""
    return (i // group) * s_group + (i % group) * s


@triton.jit
def _layout_offsets(img, n, c, img_group, s_img_group, s_img, ch_group, s_ch_group, s_ch, s_pix):
    """[channels, pixels] offsets of elements (image img, channel c, pixel n) in a `Layout` (a
    launcher's contiguous (I, NC, N) buffer, a strided image batch, or their places in qkv or in
    the qkv gradient)."""
    pix = _grouped(img, img_group, s_img_group, s_img) + n * s_pix
    return _grouped(c, ch_group, s_ch_group, s_ch)[:, None] + pix[None, :]


@triton.jit
def _image_piece(t, t1, H, W, BLOCK_P: tl.constexpr):
    """The piece of a depthwise-backward walk's run [t, t1) of row tiles that starts at tile t (tile t: image
    t // (ceil(W / BLOCK_P) H), then `_common.rows_piece` within the image): (image, strip, first row, end
    row); the next piece starts at tile t + end - first."""
    per_img = tl.cdiv(W, BLOCK_P) * H
    img = t // per_img
    r = t - img * per_img
    strip, ya, yb = rows_piece(r, r + (t1 - t), H)
    return img, strip, ya, yb


@triton.jit
def _dz_from_g(gv, zv, ka, kz, k0, BATCH_STATS: tl.constexpr):
    """dZ from G (`backward.b3_dz`) as a per-channel affine map of (G, Z) with the coefficients
    of `dz_coefficients`: ka G (running statistics) or ka G + kz Z + k0 (batch statistics)."""
    if BATCH_STATS:
        out = ka * gv + kz * zv + k0
    else:
        out = ka * gv
    return out


@triton.jit(do_not_specialize=["M", "N", "tiles_per_split", "c_lo", "img_group", "ch_group"])
def gma_dz_kernel(G, Z, dZ, coefs, M, N, tiles_per_split, c_lo,
              img_group, s_img_group, s_img, ch_group, s_ch_group, s_ch, s_pix,
              CP: tl.constexpr, NC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
              BATCH_STATS: tl.constexpr, EMULATE_STORES: tl.constexpr):
    """Grid (SPLITS, cdiv(NC, BLOCK_C)): dZ (3B, NC, N) = channels [c_lo, c_lo + NC) of
    `_dz_from_g`(G, Z), G and Z (3B, CP, N); coefs (3, CP) fp32: `dz_coefficients`. dZ is stored
    in the `Layout` (img_group .. s_pix), in dZ's element type (`stored`: rounded to nearest
    even, under the interpreter too: EMULATE_STORES)."""
    split = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    km = k < NC
    c = c_lo + k
    ka = tl.load(coefs + c, mask=km, other=0.0)[:, None]
    kz = tl.load(coefs + CP + c, mask=km, other=0.0)[:, None]
    k0 = tl.load(coefs + 2 * CP + c, mask=km, other=0.0)[:, None]
    t, t1 = _tile_range(split, tiles_per_split, M, BLOCK_P)
    while t < t1:
        img, n, pm = _flat_pixels(t, M, N, BLOCK_P)
        m2 = km[:, None] & pm[None, :]
        src = c[:, None] * N + (img * (CP * N) + n)[None, :]
        gv = tl.load(G + src, mask=m2, other=0.0).to(tl.float32)
        if BATCH_STATS:
            zv = tl.load(Z + src, mask=m2, other=0.0).to(tl.float32)
        else:
            zv = gv
        out = _dz_from_g(gv, zv, ka, kz, k0, BATCH_STATS)
        dst = _layout_offsets(img, n, k, img_group, s_img_group, s_img, ch_group, s_ch_group, s_ch, s_pix)
        tl.store(dZ + dst, stored(out, dZ, EMULATE_STORES), mask=m2)
        t += 1


@triton.jit(do_not_specialize=["M", "N", "tiles_per_split"])
def gma_pw_backward_kernel(G, Z, y1, y2, y3, pw, dy, part_gpw, coefs,
                       M, N, tiles_per_split, stride_yb, stride_yc, stride_yn,
                       S: tl.constexpr, CP: tl.constexpr, S_PAD: tl.constexpr, BLOCK_I: tl.constexpr,
                       BLOCK_P: tl.constexpr, DZ_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       EMULATE_DOTS: tl.constexpr):
    """Grid (3 S_PAD / BLOCK_I, SPLITS): program ((j - 1) S_PAD / BLOCK_I + ib, split) does
    segment j = 1..3, output channels i in block ib, of its split's tiles:

        dy[j-1] (3B, S, N)       <- pw_jᵀ dz      (dyᵀ[i, p] = sum_o pw_j[o, i] dzᵀ[o, p])
        part_gpw[split, j-1, :, i] <- sum_p dz[o, p] y_j[i, p]   ([S_PAD, BLOCK_I] of [S_PAD, S_PAD] fp32)

    The i blocks keep the two persistent register tiles (pw_j's rows [BLOCK_I, S_PAD] and the
    g_pw accumulator [S_PAD, BLOCK_I]) at 64 x 64 at most: at s = 96 (S_PAD = 128) whole
    128 x 128 tiles spilled kilobytes. Each i block re-reads the dz tile (S_PAD / BLOCK_I
    reads; one for s <= 64), the blocks of one split being neighbours in the grid so that
    the re-reads come from L2.

    dz = channels [j S, (j + 1) S) of G (3B, CP, N): DZ_MODE 0: G is dZ itself; 1: a G
    (running statistics); 2: the batch-statistics dZ from G and Z (`_dz_from_g`, coefs (3, CP)).
    y1..y3: y_j with common strides (image, channel, pixel). G, Z, y and dy in a stage dtype
    (widened on load, dy rounded on store as `stored` does)."""
    seg = tl.program_id(0) // (S_PAD // BLOCK_I)
    ci = (tl.program_id(0) % (S_PAD // BLOCK_I)) * BLOCK_I + tl.arange(0, BLOCK_I)   # i of this block
    cim = ci < S
    split = tl.program_id(1)
    if seg == 0:
        y = y1
    elif seg == 1:
        y = y2
    else:
        y = y3
    ch = tl.arange(0, S_PAD)
    cm = ch < S
    zc = (seg + 1) * S + ch                                  # dZ channel of segment j
    # pw_j[o, i] read transposed, [i, o]: loaded once per program
    pwT = tl.load(pw + seg * S * S + ch[None, :] * S + ci[:, None], mask=cim[:, None] & cm[None, :], other=0.0)
    if DZ_MODE != 0:
        ka = tl.load(coefs + zc, mask=cm, other=0.0)[:, None]
    if DZ_MODE == 2:
        kz = tl.load(coefs + CP + zc, mask=cm, other=0.0)[:, None]
        k0 = tl.load(coefs + 2 * CP + zc, mask=cm, other=0.0)[:, None]
    acc = tl.zeros([S_PAD, BLOCK_I], dtype=tl.float32)
    dy_seg = dy + seg * M * S
    t, t1 = _tile_range(split, tiles_per_split, M, BLOCK_P)
    while t < t1:
        img, n, pm = _flat_pixels(t, M, N, BLOCK_P)
        m2 = cm[:, None] & pm[None, :]
        src = zc[:, None] * N + (img * (CP * N) + n)[None, :]
        dzT = tl.load(G + src, mask=m2, other=0.0).to(tl.float32)                    # [o, p]
        if DZ_MODE == 2:
            dzT = _dz_from_g(dzT, tl.load(Z + src, mask=m2, other=0.0).to(tl.float32), ka, kz, k0, True)
        elif DZ_MODE == 1:
            dzT = _dz_from_g(dzT, dzT, ka, ka, ka, False)
        mi = cim[:, None] & pm[None, :]
        yT = tl.load(y + ci[:, None] * stride_yc + (img * stride_yb + n * stride_yn)[None, :], mask=mi,
                     other=0.0).to(tl.float32)                                       # [i, p]
        dyT = mm(pwT, dzT, tl.zeros([BLOCK_I, BLOCK_P], dtype=tl.float32), DOT_PRECISION, EMULATE_DOTS)
        tl.store(dy_seg + ci[:, None] * N + (img * (S * N) + n)[None, :], stored(dyT, dy_seg, EMULATE_DOTS), mask=mi)
        acc = mm(dzT, tl.trans(yT), acc, DOT_PRECISION, EMULATE_DOTS)                 # [o, i]
        t += 1
    dst = part_gpw + (split * 3 + seg) * S_PAD * S_PAD
    tl.store(dst + ch[:, None] * S_PAD + ci[None, :], acc)


@triton.jit
def _rows_run(split, tiles_per_split, M, N, H, W, BLOCK_P: tl.constexpr):
    """[t0, t1): program `split`'s run of the row tiles of the depthwise backward's walks (ROWS): I ceil(W /
    BLOCK_P) H of them, I = M / N images, `tiles_per_split` a run."""
    t0 = split * tiles_per_split
    return t0, tl.minimum(t0 + tiles_per_split, (M // N) * tl.cdiv(W, BLOCK_P) * H)


@triton.jit
def _dw_backward_walk(dy_img, w, du_img, chan, c, cm, strip, ya, yb, H, W, stride_dc, stride_dn, s_pix,
                      KS: tl.constexpr, NC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                      EMULATE_STORES: tl.constexpr):
    """Rows [ya, yb) of one BLOCK_P-column strip of image img of `gma_dw_backward_kernel`'s input gradient
    (channels c), by a ROW WALK (`_common.rows_input`, as the forward's `aggregation._rows_walk`): the
    input gradient is the forward stencil of dy with the filter turned half a turn, du[c, p] =
    sum_t w[c, KS^2 - 1 - t] dy[c, p + t - R] in the forward's tap order, so the walk reads the tap-major
    weights from the last tap back (tap stride -NC). Each dy row in reach is read once as its KS column
    shifts into KS rolling [BLOCK_P, BLOCK_C] accumulators; after input row i, output row i - R is
    complete and stored."""
    R = KS // 2
    x = strip * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = x < W
    zt = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6 = zt, zt, zt, zt, zt, zt, zt
    w_last = w + (KS * KS - 1) * NC + c                        # the half-turned filter's tap 0
    i = tl.maximum(ya - R, 0)
    while i < yb + R:
        a0, a1, a2, a3, a4, a5, a6, _b0, _b1, _b2, _b3, _b4, _b5, _b6 = rows_input(
            a0, a1, a2, a3, a4, a5, a6, zt, zt, zt, zt, zt, zt, zt, i, H, dy_img, x, cm, c * stride_dc, w_last,
            -NC, 0, W, stride_dn, KS, 1)
        o = i - R
        if o >= ya:
            dst = du_img + (o * W + x)[:, None] * s_pix + chan[None, :]
            tl.store(dst, stored(a0, du_img, EMULATE_STORES), mask=pmask[:, None] & cm[None, :])
        a0, a1, a2, a3, a4, a5, a6 = rows_shift(a0, a1, a2, a3, a4, a5, a6, KS)
        i += 1


@triton.jit
def _dw_backward_rows(dy, w, du, c, cm, t, t1, H, W, KS, stride_db, stride_dc, stride_dn,
                      img_group, s_img_group, s_img, ch_group, s_ch_group, s_ch, s_pix,
                      NC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, EMULATE_STORES: tl.constexpr):
    """`gma_dw_backward_kernel` with ROWS: the program's row tiles [t, t1) (tile t: image t // (strips H),
    then strip, then row, as the forward's `aggregation._tile` with ROWS within an image), one walk per
    piece of (image, strip) its run covers (`_dw_backward_walk`, an instance per window)."""
    # the output `Layout` as `_layout_offsets` reads it, split into the channels' offsets (once) and each
    # image's base (once per piece): its seven scalars live across the three walks spilled on sm_90
    chan = _grouped(c, ch_group, s_ch_group, s_ch)
    while t < t1:
        img, strip, ya, yb = _image_piece(t, t1, H, W, BLOCK_P)
        dy_img = dy + img.to(tl.int64) * stride_db
        du_img = du + _grouped(img, img_group, s_img_group, s_img).to(tl.int64)
        if KS == 3:
            _dw_backward_walk(dy_img, w, du_img, chan, c, cm, strip, ya, yb, H, W, stride_dc, stride_dn, s_pix,
                              3, NC, BLOCK_C, BLOCK_P, EMULATE_STORES)
        elif KS == 5:
            _dw_backward_walk(dy_img, w, du_img, chan, c, cm, strip, ya, yb, H, W, stride_dc, stride_dn, s_pix,
                              5, NC, BLOCK_C, BLOCK_P, EMULATE_STORES)
        else:
            _dw_backward_walk(dy_img, w, du_img, chan, c, cm, strip, ya, yb, H, W, stride_dc, stride_dn, s_pix,
                              7, NC, BLOCK_C, BLOCK_P, EMULATE_STORES)
        t += yb - ya


@triton.jit(do_not_specialize=["M", "N", "H", "W", "KS", "tiles_per_split", "img_group", "ch_group"])
def gma_dw_backward_kernel(dy, w, du, M, N, H, W, KS, tiles_per_split,
                           stride_db, stride_dc, stride_dn,
                           img_group, s_img_group, s_img, ch_group, s_ch_group, s_ch, s_pix,
                           NC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                           EMULATE_STORES: tl.constexpr, ROWS: tl.constexpr = False):
    """Input gradient of a depthwise KSxKS "same" convolution out = dwconv(u, w), w (KS, KS, NC)
    fp32 (tap-major, as the folded weights: `folding`): du[c, p] = sum_t w[c, t] dy[c, p - t + R]
    (zero outside the image). Its weight gradient is `gma_dw_wgrad_kernel`'s.

    Grid (SPLITS, cdiv(NC, BLOCK_C)). dy: gradient of the output, images with strides (image,
    channel, pixel), in a stage dtype (widened on load); du in the `Layout` (img_group .. s_pix: a
    contiguous (I, NC, N) buffer in dy's dtype, or the places of these channels in the qkv
    gradient, in its dtype, rounded as `stored` does: EMULATE_STORES under the interpreter). The
    taps are runtime loops (one instance serves every KS; see `depthwise_tile`); a tap is one
    weight load, one shifted dy load and one multiply-add per element, nothing reduced across
    threads. ROWS (the "triton.backward" family's DW_ROWS knob: the GPU default): the tiles are rows of
    BLOCK_P-column strips of each image (I ceil(W / BLOCK_P) H of them, `tiles_per_split` a run) walked
    down their strip (`_dw_backward_rows`): each dy element loaded KS times instead of KS x KS."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < NC
    R = KS // 2
    if ROWS:
        t0, t1 = _rows_run(split, tiles_per_split, M, N, H, W, BLOCK_P)
        _dw_backward_rows(dy, w, du, c, cm, t0, t1, H, W, KS, stride_db, stride_dc, stride_dn, img_group,
                          s_img_group, s_img, ch_group, s_ch_group, s_ch, s_pix, NC, BLOCK_C, BLOCK_P, EMULATE_STORES)
    else:
        t, t1 = _tile_range(split, tiles_per_split, M, BLOCK_P)
        while t < t1:
            img, n, pm, yy, xx = _flat_tile(t, M, N, W, BLOCK_P)
            m2 = cm[:, None] & pm[None, :]
            dy0 = dy + c[:, None] * stride_dc + (img * stride_db + n * stride_dn)[None, :]    # dy at p itself
            acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            ky = 0
            while ky < KS:
                sy = yy - (ky - R)                               # source row p_y - (ky - R)
                row_ok = pm & (sy >= 0) & (sy < H)
                kx = 0
                while kx < KS:
                    sx = xx - (kx - R)
                    ok = row_ok & (sx >= 0) & (sx < W)
                    dyv = tl.load(dy0 - ((ky - R) * W + (kx - R)) * stride_dn, mask=cm[:, None] & ok[None, :],
                                  other=0.0).to(tl.float32)
                    wv = tl.load(w + (ky * KS + kx) * NC + c, mask=cm, other=0.0)
                    acc += wv[:, None] * dyv
                    kx += 1
                ky += 1
            dst = _layout_offsets(img, n, c, img_group, s_img_group, s_img, ch_group, s_ch_group, s_ch, s_pix)
            tl.store(du + dst, stored(acc, du, EMULATE_STORES), mask=m2)
            t += 1


@triton.jit
def _wgrad_tap(acc, dyt, u_row, row_ok, xx, W, cm, s_pix, dx):
    """acc + dy * u shifted by dx columns (zero outside the image) over a [channels, pixels] tile."""
    ok = row_ok & (xx + dx >= 0) & (xx + dx < W)
    uv = tl.load(u_row + dx * s_pix, mask=cm[:, None] & ok[None, :], other=0.0).to(tl.float32)
    return acc + dyt * uv


@triton.jit
def _wgrad_taps(a0, a1, a2, a3, a4, a5, a6, dyt, u_row, row_ok, xx, W, cm, s_pix, KS: tl.constexpr):
    """Tap row ky's KS products of a tile into a0 .. a6 (`_wgrad_tap` at column shifts -R .. R; u_row: u's
    row ky - R above the tile's pixels)."""
    R: tl.constexpr = KS // 2
    a0 = _wgrad_tap(a0, dyt, u_row, row_ok, xx, W, cm, s_pix, 0 - R)
    a1 = _wgrad_tap(a1, dyt, u_row, row_ok, xx, W, cm, s_pix, 1 - R)
    a2 = _wgrad_tap(a2, dyt, u_row, row_ok, xx, W, cm, s_pix, 2 - R)
    if KS > 3:
        a3 = _wgrad_tap(a3, dyt, u_row, row_ok, xx, W, cm, s_pix, 3 - R)
        a4 = _wgrad_tap(a4, dyt, u_row, row_ok, xx, W, cm, s_pix, 4 - R)
    if KS > 5:
        a5 = _wgrad_tap(a5, dyt, u_row, row_ok, xx, W, cm, s_pix, 5 - R)
        a6 = _wgrad_tap(a6, dyt, u_row, row_ok, xx, W, cm, s_pix, 6 - R)
    return a0, a1, a2, a3, a4, a5, a6


@triton.jit
def _wgrad_rows(dy, u, c, cm, ky, t, t1, H, W, stride_db, stride_dc, stride_dn,
                u_img_group, u_s_img_group, u_s_img, u_ch_group, u_s_ch_group, u_s_ch, u_s_pix,
                a0, a1, a2, a3, a4, a5, a6, KS: tl.constexpr, BLOCK_P: tl.constexpr):
    """`gma_dw_wgrad_kernel` with ROWS: the program's row tiles [t, t1) (tile t: image t // (strips H), then
    strip, then row, as `_dw_backward_rows`), walked down their strip. Row o of dy meets row o + ky - R of u,
    so the walk runs over the rows where that row is inside the image and needs no row mask; the strip's
    columns and the KS column shifts' masks are the same on every row of a piece. Tap row ky's KS products
    go into a0 .. a6 ([channels, strip columns]), returned."""
    R: tl.constexpr = KS // 2
    chan_u = _grouped(c, u_ch_group, u_s_ch_group, u_s_ch)      # u's channels, once
    chan_dy = c * stride_dc
    while t < t1:
        img, strip, ya, yb = _image_piece(t, t1, H, W, BLOCK_P)
        x = strip * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = x < W
        m2 = cm[:, None] & pm[None, :]
        dy_img = dy + img.to(tl.int64) * stride_db + chan_dy[:, None]
        u_img = u + _grouped(img, u_img_group, u_s_img_group, u_s_img).to(tl.int64) + chan_u[:, None]
        o = tl.maximum(ya, R - ky)                       # u's row o + ky - R within [0, H)
        o1 = tl.minimum(yb, H + R - ky)
        while o < o1:
            dyt = tl.load(dy_img + ((o * W + x) * stride_dn)[None, :], mask=m2, other=0.0).to(tl.float32)
            u_row = u_img + (((o + ky - R) * W + x) * u_s_pix)[None, :]
            a0, a1, a2, a3, a4, a5, a6 = _wgrad_taps(a0, a1, a2, a3, a4, a5, a6, dyt, u_row, pm, x, W, cm, u_s_pix, KS)
            o += 1
        t += yb - ya
    return a0, a1, a2, a3, a4, a5, a6


@triton.jit(do_not_specialize=["M", "N", "H", "W", "tiles_per_split", "u_img_group", "u_ch_group"])
def gma_dw_wgrad_kernel(dy, u, part_gw, M, N, H, W, tiles_per_split,
                        stride_db, stride_dc, stride_dn,
                        u_img_group, u_s_img_group, u_s_img, u_ch_group, u_s_ch_group, u_s_ch, u_s_pix,
                        NC: tl.constexpr, KS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                        TAPS_PAD: tl.constexpr, ROWS: tl.constexpr = False):
    """Weight gradient of a depthwise KSxKS "same" convolution out = dwconv(u, w) (generic: segments
    1..3, the local branch's 3x3, the CRPE's windows), g_w[c, t] = sum_p dy[c, p] u[c, p + t - R],
    as per-program partials.

    Grid (SPLITS, cdiv(NC, BLOCK_C), KS): program (split, channel block, ky) walks its split's flat
    pixel tiles and keeps tap row ky's KS products dy * u(shifted) in KS [channels, pixels] fp32
    accumulators (KS a constexpr: 3, 5, 7; the kx taps unrolled), one multiply-add per element and
    tap; the pixels are summed once, after the last tile, into part_gw[split, c, ky KS + kx] (fp32
    (SPLITS, cdiv(NC, BLOCK_C) BLOCK_C, TAPS_PAD); taps >= KS^2 never written, channels >= NC zero).
    Until 2026-12-05 `gma_dw_backward_kernel` summed each tap's products over the tile's pixels at
    every tile (sm_90 SASS: three CTA barriers and a shared-memory round trip per tap and tile) and
    kept the sums in a one-hot updated [channels, TAPS_PAD] tile. dy: images with strides (image,
    channel, pixel), u: a `Layout` (u_img_group .. u_s_pix), both in a stage dtype (widened on load).
    Bytes: dy once and u once per tap row (KS times, the kx shifts from L1), so KS (dy, u) reads
    per element against KS^2 multiply-adds: L2-bandwidth bound at 7x7 at most. ROWS (with the "triton.backward"
    family's DW_ROWS, as the input gradient's walk: the GPU default): the tiles are rows of BLOCK_P-column
    strips of each image (I ceil(W / BLOCK_P) H of them, `tiles_per_split` a run), walked down their strip
    (`_wgrad_rows`): no per-tile pixel decode, row mask or layout arithmetic, only the loads, the shifts'
    column masks and the multiply-adds per row."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ky = tl.program_id(2)
    cm = c < NC
    R: tl.constexpr = KS // 2
    a0 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    a4 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    a5 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    a6 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    if ROWS:
        t0, t1 = _rows_run(split, tiles_per_split, M, N, H, W, BLOCK_P)
        a0, a1, a2, a3, a4, a5, a6 = _wgrad_rows(
            dy, u, c, cm, ky, t0, t1, H, W, stride_db, stride_dc, stride_dn, u_img_group, u_s_img_group, u_s_img,
            u_ch_group, u_s_ch_group, u_s_ch, u_s_pix, a0, a1, a2, a3, a4, a5, a6, KS, BLOCK_P)
    else:
        t, t1 = _tile_range(split, tiles_per_split, M, BLOCK_P)
        while t < t1:
            img, n, pm, yy, xx = _flat_tile(t, M, N, W, BLOCK_P)
            dyt = tl.load(dy + c[:, None] * stride_dc + (img * stride_db + n * stride_dn)[None, :],
                          mask=cm[:, None] & pm[None, :], other=0.0).to(tl.float32)
            sy = yy + (ky - R)                                   # u's row for tap row ky
            row_ok = pm & (sy >= 0) & (sy < H)
            u_row = u + _layout_offsets(img, n + (ky - R) * W, c, u_img_group, u_s_img_group, u_s_img, u_ch_group,
                                        u_s_ch_group, u_s_ch, u_s_pix)
            a0, a1, a2, a3, a4, a5, a6 = _wgrad_taps(a0, a1, a2, a3, a4, a5, a6, dyt, u_row, row_ok, xx, W, cm,
                                                     u_s_pix, KS)
            t += 1
    nc_pad = tl.num_programs(1) * BLOCK_C
    dst = part_gw + (split * nc_pad + c) * TAPS_PAD + ky * KS
    tl.store(dst, tl.sum(a0, axis=1))
    tl.store(dst + 1, tl.sum(a1, axis=1))
    tl.store(dst + 2, tl.sum(a2, axis=1))
    if KS > 3:
        tl.store(dst + 3, tl.sum(a3, axis=1))
        tl.store(dst + 4, tl.sum(a4, axis=1))
    if KS > 5:
        tl.store(dst + 5, tl.sum(a5, axis=1))
        tl.store(dst + 6, tl.sum(a6, axis=1))


@triton.jit(do_not_specialize=["M", "N", "tiles_per_split"])
def gma_local_backward_kernel(dL, xh, rstd, w4, local_pw, ln_weight, ln_bias, dw4, part_gpw, part_ln, dZL,
                          M, N, tiles_per_split, stride_lb, stride_lc, stride_ln,
                          S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, DZ_OUT: tl.constexpr = False):
    """The local branch down to its depthwise (`backward.local_backward`; the depthwise is
    `gma_dw_backward_kernel` and `gma_dw_wgrad_kernel`). Grid (3 S_PAD / BLOCK_I, SPLITS): program (which * S_PAD / BLOCK_I
    + ib, split), which = q, k, v part of the 3s pointwise inputs, ib a block of BLOCK_I of them:

        gL  = dL hardswish'(xh ln_weight + ln_bias)        xh: LayerNorm output before the affine
        dz4 = rstd (dxh - mean_c dxh - xh mean_c(dxh xh)),  dxh = gL ln_weight  (LayerNorm over s)
        dw4[which s + i]          <- sum_o local_pw[o, which s + i] dz4[o]   (tl.dot)
        part_gpw[split, o, which S_PAD + i] <- sum_p dz4[o, p] w4[which s + i, p]  (tl.dot)
        part_ln[split] <- sum_p gL xh, sum_p gL    (written by program 0 of the split)

    The LayerNorm backward is recomputed by the 3 S_PAD / BLOCK_I programs of a tile (s
    values per pixel, a few FLOP each) rather than stored. dL: (B, S, H, W) with strides
    (image, channel, pixel) (a view of grad_pre, fp32 or, in the Triton stage set, grad_pre's
    own fp16/bf16: `backward.Stages.grad_pre_as_is`; widened on load); xh (B, S, N), w4 and dw4
    (B, 3S, N) contiguous in a stage dtype (widened on load, dw4 rounded on store), rstd (B, N) fp32.

    DZ_OUT (B3's dense form, `BackwardTiles.DENSE`; grid (1, SPLITS)): dz4 itself is stored, into dZL (B, N, S)
    contiguous (`dense_z.dense_local_dz_buffer`, the stage dtype), with part_ln; no pointwise, w4, dw4 nor
    part_gpw (the dense kernels form the pointwise's and the depthwise's gradients from dZL and qkv)."""
    blocks: tl.constexpr = S_PAD // BLOCK_I
    which = tl.program_id(0) // blocks
    ci = (tl.program_id(0) % blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    cim = ci < S
    split = tl.program_id(1)
    co = tl.arange(0, S_PAD)
    om = co < S
    lnw = tl.load(ln_weight + co, mask=om, other=0.0)[:, None]
    lnb = tl.load(ln_bias + co, mask=om, other=0.0)[:, None]
    if not DZ_OUT:
        # local_pw[o, which s + i] read transposed, [i, o]: loaded once per program
        pwT = tl.load(local_pw + co[None, :] * (3 * S) + which * S + ci[:, None], mask=cim[:, None] & om[None, :],
                      other=0.0)
    acc = tl.zeros([S_PAD, BLOCK_I], dtype=tl.float32)
    acc_w = tl.zeros([S_PAD], dtype=tl.float32)      # reduced over each tile's pixels as it goes: two
    acc_b = tl.zeros([S_PAD], dtype=tl.float32)      # [S_PAD, BLOCK_P] accumulators spilled at S_PAD 128
    t, t1 = _tile_range(split, tiles_per_split, M, BLOCK_P)
    while t < t1:
        img, n, pm = _flat_pixels(t, M, N, BLOCK_P)
        m2 = om[:, None] & pm[None, :]
        dl = tl.load(dL + co[:, None] * stride_lc + (img * stride_lb + n * stride_ln)[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        xv = tl.load(xh + co[:, None] * N + (img * (S * N) + n)[None, :], mask=m2, other=0.0).to(tl.float32)
        r = tl.load(rstd + img * N + n, mask=pm, other=0.0)[None, :]
        gl = dl * hardswish_grad(xv * lnw + lnb)                      # 0 on padded channels / pixels
        if tl.program_id(0) == 0:                                  # the one program that stores them
            acc_w += tl.sum(gl * xv, axis=1)
            acc_b += tl.sum(gl, axis=1)
        dxh = gl * lnw
        mean1 = tl.sum(dxh, axis=0)[None, :] / S
        mean2 = tl.sum(dxh * xv, axis=0)[None, :] / S
        dz = tl.where(om[:, None], (dxh - mean1 - xv * mean2) * r, 0.0)   # [o, p]
        if DZ_OUT:
            dst = dZL + co[:, None] + ((img * N + n) * S)[None, :]
            tl.store(dst, stored(dz, dZL, EMULATE_DOTS), mask=m2)
        else:
            mi = cim[:, None] & pm[None, :]
            ch = which * S + ci
            wT = tl.load(w4 + ch[:, None] * N + (img * (3 * S * N) + n)[None, :], mask=mi,
                         other=0.0).to(tl.float32)                                                   # [i, p]
            dwT = mm(pwT, dz, tl.zeros([BLOCK_I, BLOCK_P], dtype=tl.float32), DOT_PRECISION, EMULATE_DOTS)
            tl.store(dw4 + ch[:, None] * N + (img * (3 * S * N) + n)[None, :], stored(dwT, dw4, EMULATE_DOTS),
                     mask=mi)
            acc = mm(dz, tl.trans(wT), acc, DOT_PRECISION, EMULATE_DOTS)                             # [o, i]
        t += 1
    if not DZ_OUT:
        tl.store(part_gpw + split * S_PAD * 3 * S_PAD + co[:, None] * (3 * S_PAD) + (which * S_PAD + ci)[None, :],
                 acc)
    if tl.program_id(0) == 0:
        tl.store(part_ln + split * 2 * S_PAD + co, acc_w)
        tl.store(part_ln + split * 2 * S_PAD + S_PAD + co, acc_b)


#: every kernel of this file (the ahead-of-time compile check resolves them by name)
KERNELS = (gma_dz_kernel, gma_pw_backward_kernel, gma_dw_backward_kernel, gma_dw_wgrad_kernel, gma_local_backward_kernel)


# ================================================================ launchers
#: one launch: (kernel, grid, positional args, keyword args incl. constexprs and num_warps)
Launch = Tuple[object, Tuple[int, ...], tuple, Dict[str, object]]


class Layout(NamedTuple):
    """Where element (image i, channel c, pixel n) of an (I, NC, N) image batch lies: base +
    (i // img_group) s_img_group + (i % img_group) s_img + (c // ch_group) s_ch_group + (c %
    ch_group) s_ch + n s_pix, in base's dtype. The kernels' inputs and outputs that live inside
    qkv or its gradient (`qkv_layout`): the depthwise backward reads its input u_j straight from
    qkv (no layout copy of it exists), and the input gradients are stored straight into d_qkv, in
    qkv's dtype, instead of a stack, a cat, a layout copy and a cast of the per-segment gradients
    (`backward.qkv_from_streams`). Also a plain strided or contiguous batch (`images_layout`)."""
    base: Tensor
    img_group: int
    s_img_group: int
    s_img: int
    ch_group: int
    s_ch_group: int
    s_ch: int
    s_pix: int

    @property
    def args(self) -> tuple:
        return tuple(self[1:])


def images_layout(t: Tensor) -> Layout:
    """The layout of an (I, NC, H, W) tensor whose H, W merge into one pixel axis (`_images`)."""
    t, sb, sc, sn = _images(t)
    return Layout(t, t.shape[0], 0, sb, t.shape[1], 0, sc, sn)


def qkv_layout(qkv: Tensor, segment: int) -> Layout:
    """The places in qkv (or its gradient) (B, N, 3C) of a segment's channels, any strides:
    segment 0..3 as the stage tensors hold them, (3B, s, N) with image which * B + b (which = q,
    k, v); segment 4 (the local branch) as (B, 3s, N) with channel which * s + c."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s = C // 5
    sb, sn, sc = qkv.stride()
    base = qkv[..., segment * s:]
    if segment < 4:
        return Layout(base, B, C * sc, sb, s, 0, sc, sn)
    return Layout(base, B, 0, sb, s, C * sc, sc, sn)


#: pixels per tile under the interpreter: a 7x7 stencil pass costs ~10 NumPy operations per
#: tap and tile whatever the tile's size, so few large tiles (14x14 at batch 1: two tiles,
#: two splits, so the partial sums are still exercised)
INTERPRETER_BLOCK_P = 512


@dataclass(frozen=True)
class BackwardTiles:
    """Tiles of the aggregation-backward kernels (heuristic, not tuned: no GPU here).

    BLOCK_C x BLOCK_P, WARPS: [channels, pixels] tiles of `gma_dz_kernel`,
    `gma_dw_backward_kernel` and, with a quarter of BLOCK_P on a GPU, `gma_dw_wgrad_kernel` (`plan_dw_wgrad`). PW_BLOCK_P, PW_WARPS: pixels per tile and warps of the two
    channel-mix kernels, whose output channels go in blocks of BLOCK_I = PW_TILE_ELEMS /
    S_PAD (at most S_PAD), so the two register tiles held for a program's life (the weight
    rows [BLOCK_I, S_PAD] and the weight-gradient accumulator [S_PAD, BLOCK_I]) stay at
    64 x 64. TARGET_PROGRAMS: programs per launch aimed at by the split (a few waves on
    100+ SMs).

    The GPU tiles, compiled with the runtime's specialisation for C = 320 (s = 64), 14x14,
    batch 128, fp32 (tests/test_triton_aggregation_backward.py, ptxas -v; registers sm_80 /
    sm_90, no spills): stencil [16, 128] at 8 warps 114-118 / 118-120 (4 warps: 219-230, a
    third of the occupancy; that was the input and the weight gradient in one kernel, until
    2026-12-05), dz 40 / 48, pointwise (16 pixels, 8 warps)
    216 / 166 from dZ and 254 / 198 from G and Z, local branch 255 / 212. 32-pixel tiles
    or 4 warps spilled the pointwise kernel on sm_80 (88 B to 1 KB). At s = 96 (S_PAD =
    128, C = 480) the pointwise kernel from dZ (BLOCK_I = 32) compiled at 253-255 registers
    without spills, from G and Z it spilled ~900 B on both; not checked by the test.

    DW_ROWS: 0, or the strip width in columns of the depthwise backward's row walks (ROWS): the input
    gradient's (`gma_dw_backward_kernel`, tiles [DW_ROWS pixels of one row, BLOCK_C channels]) and the weight
    gradient's (`gma_dw_wgrad_kernel`, tiles [BLOCK_C channels, DW_ROWS pixels of one row]), WARPS warps; one
    knob for both, so the family keeps its six candidates. The GPU default is `DW_ROWS_DEFAULT` (a field
    default of 0, the tile kernels: the interpreter's tiles and the tile-kernel candidates).

    DENSE: 1 runs segments 1-3 of B3 in the dense form (`b3_fused`, dense_z.py "The backward"): dZ of those
    segments written (`gma_dz_kernel`), then their input gradient as the dense convolution turned half a turn
    (`gma_dense_dx_kernel`) and both weight gradients from the per-tap products G_t = X_t^T dZ
    (`gma_dense_wgrad_kernel`), on tensor cores, in place of the pointwise kernel, dy and the two stencils of each
    segment; and the local branch's the same way (`local_backward`, `plan_dense_local_backward`: the LayerNorm's
    input gradient dZ_L stored by `gma_local_backward_kernel` with DZ_OUT, then `gma_dense_local_dx_kernel` and
    `gma_dense_local_wgrad_kernel` in place of its pointwise backward, dw4 and its two stencils); where the Triton
    stage set's recompute keeps qkv (rc["qkv"]) and `dense_b3_applies`. The training forward then keeps neither y
    nor the local branch's w4 (`tuned_dense_b3`), and its statistics pass runs in the dense form too
    (`dense_z.dense_z_moments`). A tuning candidate (`_search`), 0 by default."""
    BLOCK_C: int
    BLOCK_P: int
    WARPS: int
    PW_BLOCK_P: int
    PW_WARPS: int
    PW_TILE_ELEMS: int = 64 * 64
    TARGET_PROGRAMS: int = 1024
    DW_ROWS: int = 0
    DENSE: int = 0


#: Widest S_PAD whose B3 forms dZ in the pointwise kernel's prologue (DZ_MODE 1, 2: `b3_fused`).
#: At S_PAD 128 that prologue (G, Z and three coefficient columns of 128 channels beside the
#: tf32x3 dots' split operands) spilled 800-970 B on sm_80/90 whatever the channel block (ptxas,
#: C = 480); there `gma_dz_kernel` writes dZ (3B, C', H, W) once and the pointwise kernel
#: reads it (DZ_MODE 0: no spill): 2 e B per element of dZ more traffic, on the two narrowest grids.
FUSED_B3_MAX_S_PAD = 64


def dense_b3_applies(C: int, precision: str) -> bool:
    """Whether B3's dense form (`BackwardTiles.DENSE`) is a candidate for width C and the backward's dots
    (`statistics.backward_dots`): fp16 / bf16 layers on sm_80+ ("tf32", whose dense kernels take 16-bit operands)
    at S_PAD <= 64, where both kernels compile without spilling (AOT, Triton 3.6, batch 128, `config.DENSE_Z_TILES`
    / `DENSE_WGRAD_TILES`; figures in docs/performance.md). Not fp32 layers: the weight gradient's 3xTF32 dots
    spilled on sm_90 at every tile tried (12 B - 1 KB at C = 80, 160); not sm_70/75, whose FMA dots would run the
    dense form's 10-19x larger work on CUDA cores; not S_PAD 128."""
    return precision == "tf32" and dot_pad(C // 5) <= 64


def tuned_dense_b3(qkv: Tensor) -> bool:
    """Whether the backward of the layer whose input is qkv runs B3's dense form: the DENSE knob of its
    "triton.backward" tiles as `train_op.train_tiles` looks them up (`tile_spaces.tuned_tiles`: the tuning
    table's entry on a CUDA device; None, so not dense, under the interpreter and off CUDA, where the launchers
    use their own tiles). The training forward's statistics pass (`train_op.planes_fn_for`) then keeps no
    depthwise outputs y (and runs in the dense form, `dense_z.dense_z_moments`), and its aggregation no
    local-branch w4 (`train_op.TritonPreProjectionFunction`): the dense form reads neither. Nor does the recompute
    of eval mode with gradients (`recompute.recompute`): Z as that statistics pass makes it, no y, no w4. (Not by
    dropping y from `gma_recompute_z_kernel`: without it, it spilled 4 B on sm_80 at C = 80 bf16 / fp16, AOT,
    batch 128.)"""
    bw = tile_spaces.tuned_tiles(BACKWARD_FAMILY, qkv.shape[-1] // 3, qkv)
    return bool(bw is not None and tiles_of(bw).DENSE)


def fused_b3(S_PAD: int) -> bool:
    """Whether B3 runs fused at this padded segment width (`FUSED_B3_MAX_S_PAD`)."""
    return S_PAD <= FUSED_B3_MAX_S_PAD


def backward_tiles(S_PAD: int, M: int) -> BackwardTiles:
    """GPU tiles; under the interpreter (cost per operation, not per element) one large tile
    of up to INTERPRETER_BLOCK_P pixels and every channel in one block."""
    if interpreting():
        bp = min(INTERPRETER_BLOCK_P, max(16, next_pow2(M)))
        # PW_TILE_ELEMS: two output-channel blocks at s = 40, 64, so the tests run that path too
        return BackwardTiles(BLOCK_C=4 * S_PAD, BLOCK_P=bp, WARPS=4, PW_BLOCK_P=bp, PW_WARPS=4, PW_TILE_ELEMS=32 * 64)
    return gpu_backward_tiles(S_PAD)


#: The depthwise backward's default on a GPU since 2026-12-05: the row walks (DW_ROWS) down 16-column strips,
#: the input gradient's and the weight gradient's (`DW_ROWS_TILES`' first; the tile kernels are tuning
#: candidates now, `_search`). Not timed: chosen from the compiled code, where the walks issue a half to a
#: third of the tile kernels' instructions per multiply-add at an occupancy no lower than 3 CTAs of 8 warps
#: per SM (docs/performance.md, "The depthwise backward walks rows by default"). 16 columns rather than 32:
#: 14-column rows (C = 320, 14x14) fill 7/8 of a 16-column strip and 7/16 of a 32-column one.
DW_ROWS_DEFAULT = 16


def gpu_backward_tiles(S_PAD: int) -> BackwardTiles:
    """The GPU tiles (the default of the "triton.backward" tuning family)."""
    # 16-channel blocks of the pointwise / local kernels at S_PAD 128: the local kernel spilled 16 B
    # on sm_80 with 32 (C = 480); 2048 = 16 x 128 (sm_80/90, ptxas: 252-255 registers, no spill)
    return BackwardTiles(BLOCK_C=16, BLOCK_P=128, WARPS=8, PW_BLOCK_P=16, PW_WARPS=8,
                         PW_TILE_ELEMS=64 * 64 if S_PAD <= 64 else 16 * 128, DW_ROWS=DW_ROWS_DEFAULT)


def split_plan(M: int, block_p: int, other_programs: int, target_programs: int) -> Tuple[int, int]:
    """(splits, tiles_per_split): the cdiv(M, block_p) flat tiles cut into about
    target_programs / other_programs runs, every run non-empty (`aggregation.split_plan` over
    one "image" of M flat pixels)."""
    return aggregation_split_plan(M, 1, block_p, target_programs, other_programs)


def _images(t: Tensor) -> Tuple[Tensor, int, int, int]:
    """(t, stride image, stride channel, stride pixel) of an image batch (I, c, H, W) whose H, W
    merge into one pixel axis (copied to contiguous if they do not)."""
    if t.stride(2) != t.shape[3] * t.stride(3) and t.shape[2] > 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(3)


#: the stage tensors' dtypes (`config.stage_dtype`: fp32 layers' and fp16/bf16 layers' own)
STAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(t: Tensor, name: str) -> Tensor:
    if t.dtype not in STAGE_DTYPES:
        raise TypeError(f"{name}: the aggregation-backward kernels take fp32, fp16 or bf16 stage tensors, not {t.dtype}")
    if t.numel() >= 2 ** 31:
        raise ValueError(f"{name}: {t.numel()} elements: 32-bit offsets would overflow")
    return t.contiguous()


def dz_coefficients(bn_scale: Tensor, mean: Optional[Tensor], rstd: Optional[Tensor], sum_g: Tensor,
                    sum_gzh: Optional[Tensor], count) -> Tensor:
    """(3, 4s) fp32 [ka; kz; k0]: `backward.b3_dz` as dZ = ka G + kz Z + k0 per channel.

    With batch statistics dZ = a (G - sum(G)/M - (Z - mean) rstd sum(G Zhat)/M), so ka = a,
    kz = -a rstd sum(G Zhat)/M, k0 = a (mean rstd sum(G Zhat)/M - sum(G)/M), formed here in
    float64 from the fp32 sums (count: int or a scalar tensor); without, ka = a and kz = k0 = 0.
    Two per-channel vectors fewer in the pointwise kernel's prologue than the textbook form,
    which kept it under ptxas's register limit on sm_80 (the rounding is the same order: one
    fp32 product and sum per term)."""
    a = bn_scale.reshape(-1).double()
    if mean is None:
        zero = torch.zeros_like(a)
        return torch.stack([a, zero, zero]).float().contiguous()
    k = (sum_gzh.double() / count) * rstd.reshape(-1).double()
    return torch.stack([a, -a * k, a * (mean.reshape(-1).double() * k - sum_g.double() / count)]).float().contiguous()


def plan_dz(G: Tensor, Z: Tensor, coefs: Tensor, stats: bool, c_lo: int, nc: int, out: Optional[Layout] = None,
            tiles: Optional[BackwardTiles] = None) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """Buffer dZ (3B, nc, H, W) and the launch of `gma_dz_kernel` on channels [c_lo, c_lo + nc)
    (coefs: `dz_coefficients`; stats: batch statistics, Z read); out: store there instead (no
    buffer: buf["dZ"] is None)."""
    G, Z = _check(G, "G"), _check(Z, "Z")
    I, CP, H, W = G.shape
    N, M = H * W, I * H * W
    tiles = tiles or backward_tiles(dot_pad(CP // 4), M)
    block_c = min(tiles.BLOCK_C, next_pow2(nc))
    cblocks = cdiv(nc, block_c)
    splits, tps = split_plan(M, tiles.BLOCK_P, cblocks, tiles.TARGET_PROGRAMS)
    buf = {"dZ": None if out is not None else torch.empty(I, nc, H, W, dtype=G.dtype, device=G.device)}
    out = out or images_layout(buf["dZ"])
    args = (G, Z, out.base, coefs, M, N, tps, c_lo, *out.args)
    kw = dict(CP=CP, NC=nc, BLOCK_C=block_c, BLOCK_P=tiles.BLOCK_P, BATCH_STATS=stats, EMULATE_STORES=_common.interpreting(),
              num_warps=tiles.WARPS)
    return buf, [(gma_dz_kernel, (splits, cblocks), args, kw)]


def plan_pw_backward(dz_src: Tensor, Z: Tensor, y: List[Tensor], pw: Tensor, coefs: Tensor, mode: int,
                     dots: DotVariant, tiles: Optional[BackwardTiles] = None) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """Buffers (dy (3, 3B, s, H, W), part_gpw) and the launch of `gma_pw_backward_kernel`.
    dz_src: dZ (mode 0) or G (modes 1, 2: `gma_pw_backward_kernel`'s DZ_MODE; coefs:
    `dz_coefficients`, unread in mode 0)."""
    dz_src, Z = _check(dz_src, "dZ/G"), _check(Z, "Z")
    I, CP, H, W = dz_src.shape
    S = CP // 4
    S_PAD = dot_pad(S)
    N, M = H * W, I * H * W
    if any(t.dtype not in STAGE_DTYPES for t in y):
        raise TypeError("y: the aggregation-backward kernels take fp32, fp16 or bf16 stage tensors")
    ys = [_images(t) for t in y]
    if len({yy[1:] for yy in ys}) != 1:                      # the kernel takes one stride set for the three
        ys = [_images(t.contiguous()) for t in y]
    tiles = tiles or backward_tiles(S_PAD, M)
    block_i = min(S_PAD, tiles.PW_TILE_ELEMS // S_PAD)
    blocks = 3 * (S_PAD // block_i)
    splits, tps = split_plan(M, tiles.PW_BLOCK_P, blocks, tiles.TARGET_PROGRAMS)
    dev = dz_src.device
    buf = {"dy": torch.empty(3, I, S, H, W, dtype=dz_src.dtype, device=dev),
           "part_gpw": torch.empty(splits, 3, S_PAD, S_PAD, dtype=torch.float32, device=dev)}
    args = (dz_src, Z, ys[0][0], ys[1][0], ys[2][0], pw.contiguous(), buf["dy"], buf["part_gpw"], coefs,
            M, N, tps, *ys[0][1:])
    kw = dict(S=S, CP=CP, S_PAD=S_PAD, BLOCK_I=block_i, BLOCK_P=tiles.PW_BLOCK_P, DZ_MODE=mode,
              DOT_PRECISION=kernel_dot_precision("gma_pw_backward_kernel", dots.precision, S_PAD),
              EMULATE_DOTS=dots.emulate, num_warps=tiles.PW_WARPS)
    return buf, [(gma_pw_backward_kernel, (blocks, splits), args, kw)]


def plan_dw_backward(dy: Tensor, u, w: Tensor, out: Optional[Layout] = None, tiles: Optional[BackwardTiles] = None
                     ) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """Buffers (du (I, c, H, W), part_gw) and the two launches, `gma_dw_backward_kernel` (the input
    gradient) and `gma_dw_wgrad_kernel` (the weight gradient's partials), for the depthwise "same"
    convolution dwconv(u, w), w (k, k, c) tap-major, k in 3, 5, 7, given dy (I, c, H, W): generic (the
    CRPE's 3x3/5x5/7x7 depthwise backward uses `plan_dw_wgrad` as is). u: an fp32/fp16/bf16 (I, c, H, W)
    tensor or a `Layout` of the same batch (e.g. inside qkv, `qkv_layout`); out: store du there instead
    (buf["du"] is None)."""
    I, NC, H, W = dy.shape
    KS = w.shape[0]
    N, M = H * W, I * H * W
    dy_, sdb, sdc, sdn = _images(dy)
    if dy_.dtype not in STAGE_DTYPES:
        raise TypeError(f"dy: fp32, fp16 or bf16 expected, not {dy_.dtype}")
    if w.dtype != torch.float32:
        raise TypeError(f"w: fp32 expected, not {w.dtype}")
    tiles = tiles or backward_tiles(dot_pad(NC), M)
    block_c = min(tiles.BLOCK_C, next_pow2(NC))
    cblocks = cdiv(NC, block_c)
    if tiles.DW_ROWS:
        splits, tps = dw_rows_plan(I, H, W, KS, tiles.DW_ROWS, cblocks, tiles.TARGET_PROGRAMS)
    else:
        splits, tps = split_plan(M, tiles.BLOCK_P, cblocks, tiles.TARGET_PROGRAMS)
    bufw, lw = plan_dw_wgrad(dy, u, KS, tiles)
    buf = {"du": None if out is not None else torch.empty(I, NC, H, W, dtype=dy.dtype, device=dy.device),
           "part_gw": bufw["part_gw"]}
    out = out or images_layout(buf["du"])
    args = (dy_, w.contiguous(), out.base, M, N, H, W, KS, tps, sdb, sdc, sdn, *out.args)
    kw = dict(NC=NC, BLOCK_C=block_c, BLOCK_P=tiles.DW_ROWS or tiles.BLOCK_P, EMULATE_STORES=_common.interpreting(),
              num_warps=tiles.WARPS)
    if tiles.DW_ROWS:
        kw["ROWS"] = True
    return buf, [(gma_dw_backward_kernel, (splits, cblocks), args, kw)] + lw


def dw_rows_plan(I: int, H: int, W: int, KS: int, strip: int, other_programs: int, target_programs: int
                 ) -> Tuple[int, int]:
    """(splits, tiles_per_split) of `gma_dw_backward_kernel`'s row walks: its I ceil(W / strip) H row tiles
    cut as `split_plan` cuts flat tiles, each run at least KS rows (a walk reads R rows above and below its
    run again: `aggregation._rows_splits`' reason), every run non-empty."""
    T = I * cdiv(W, strip) * H
    _, tps = split_plan(T, 1, other_programs, target_programs)
    tps = min(T, max(tps, KS))
    return cdiv(T, tps), tps


def plan_dw_wgrad(dy: Tensor, u, KS: int, tiles: Optional[BackwardTiles] = None
                  ) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """Buffer part_gw (SPLITS, channels padded to the block, TAPS_PAD) fp32 and the launch of
    `gma_dw_wgrad_kernel`: the partials of g_w[c, ky, kx] = sum_p dy[c, p] u[c, p + (ky, kx) - R]
    (`taps_of` sums them), dy (I, c, H, W) any image strides, u the same batch as a tensor or a
    `Layout`, KS in 3, 5, 7. tiles: the stencils' [channels, pixels] tile (`backward_tiles`)."""
    I, NC, H, W = dy.shape
    N, M = H * W, I * H * W
    if KS not in (3, 5, 7):
        raise ValueError(f"window {KS}x{KS}: the weight-gradient kernel takes 3, 5 and 7")
    dy_, sdb, sdc, sdn = _images(dy)
    if not isinstance(u, Layout):
        if tuple(u.shape) != tuple(dy.shape) or u.dtype not in STAGE_DTYPES:
            raise TypeError(f"u: an fp32/fp16/bf16 tensor of dy's shape {tuple(dy.shape)} expected, not {u.dtype} "
                            f"{tuple(u.shape)}")
        u = images_layout(u)
    if dy_.dtype not in STAGE_DTYPES:
        raise TypeError(f"dy: fp32, fp16 or bf16 expected, not {dy_.dtype}")
    tiles = tiles or backward_tiles(dot_pad(NC), M)
    block_c = min(tiles.BLOCK_C, next_pow2(NC))
    cblocks = cdiv(NC, block_c)
    # on a GPU a quarter of the stencils' pixels: KS accumulators of [BLOCK_C, BLOCK_P] live across the tiles.
    # The 7x7 instance at 8 warps (ptxas, 2026-12-05): [16, 128] (8 elements a thread) 165-185 registers on
    # sm_90 (one CTA per SM); [16, 64] 72-80, but 16 B spilled on sm_70 (fp16, u read from qkv); [16, 32] at
    # most 64 on sm_70/75/80/90, no spill, the same instructions per element and tap on sm_90 (~36 at 3x3)
    block_p = tiles.BLOCK_P if interpreting() else max(16, tiles.BLOCK_P // 4)
    if tiles.DW_ROWS:        # row walks (ROWS) down DW_ROWS-column strips, as the input gradient's
        block_p = tiles.DW_ROWS
        splits, tps = split_plan(I * cdiv(W, block_p) * H, 1, cblocks * KS, tiles.TARGET_PROGRAMS)
    else:
        splits, tps = split_plan(M, block_p, cblocks * KS, tiles.TARGET_PROGRAMS)
    taps_pad = next_pow2(KS * KS)
    from .launcher import _alloc           # (the tests' NaN poisoning of the launchers' buffers)
    buf = {"part_gw": _alloc((splits, cblocks * block_c, taps_pad), torch.float32, dy.device)}
    args = (dy_, u.base, buf["part_gw"], M, N, H, W, tps, sdb, sdc, sdn, *u.args)
    kw = dict(NC=NC, KS=KS, BLOCK_C=block_c, BLOCK_P=block_p, TAPS_PAD=taps_pad, num_warps=tiles.WARPS)
    if tiles.DW_ROWS:
        kw["ROWS"] = True
    return buf, [(gma_dw_wgrad_kernel, (splits, cblocks, KS), args, kw)]


def taps_of(part_gw: Tensor, nc: int, k: int) -> Tensor:
    """The depthwise weight gradient (k, k, nc), tap-major as the folded weights, from the
    partials part_gw (SPLITS, channels, TAPS_PAD) of `gma_dw_wgrad_kernel`."""
    return part_gw[:, :nc, :k * k].sum(0).t().reshape(k, k, nc)


def depthwise_input(rc: Dict[str, Tensor], segment: int):
    """The forward input of a depthwise convolution the backward differentiates: segment 1..3's u_j
    or (4) the local branch's u4, read through `qkv_layout` from qkv itself when the recompute
    keeps it (rc["qkv"]: recompute.py's), else rc["u"][segment] / rc["u4"] (`backward.recompute`'s
    copies)."""
    if "qkv" in rc:
        return qkv_layout(rc["qkv"], segment)
    return rc["u4"] if segment == 4 else rc["u"][segment]


def _local_inputs(dL: Tensor, rc: Dict[str, Tensor]) -> Tuple[Tensor, Tuple[int, int, int], Tensor, Tensor]:
    """(dL's base, its (image, channel, pixel) strides, xh4, rstd4) for `gma_local_backward_kernel`, checked (both
    local backward plans)."""
    if dL.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dL: fp32, fp16 or bf16 expected (the incoming gradient's view), not {dL.dtype}")
    base, slb, slc, sln = _images(dL)
    return base, (slb, slc, sln), _check(rc["xh4"], "xh4"), _check(rc["rstd4"], "rstd4")


def plan_local_backward(dL: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, dots: DotVariant,
                        out: Optional[Layout] = None, tiles: Optional[BackwardTiles] = None
                        ) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """Buffers (dw4 (B, 3s, H, W), part_gpw, part_ln, then du4 and part_gw of the depthwise)
    and the three launches of the local branch: `gma_local_backward_kernel`, `gma_dw_backward_kernel`,
    `gma_dw_wgrad_kernel`."""
    B, S, H, W = dL.shape
    S_PAD = dot_pad(S)
    N, M = H * W, B * H * W
    dL_, dl_strides, xh, rstd = _local_inputs(dL, rc)
    if rc.get("w4") is None or rc["w4"].dim() != 4:
        raise RuntimeError("the local branch's backward: its depthwise output w4 is missing (the training forward kept "
                           "none, for a backward running B3's dense form, `BackwardTiles.DENSE`), but this backward's "
                           "tiles do not run it: the tuning table changed between the forward and the backward?")
    w4 = _check(rc["w4"], "w4")
    tiles = tiles or backward_tiles(S_PAD, M)
    block_i = min(S_PAD, tiles.PW_TILE_ELEMS // S_PAD)
    blocks = 3 * (S_PAD // block_i)
    splits, tps = split_plan(M, tiles.PW_BLOCK_P, blocks, tiles.TARGET_PROGRAMS)
    dev = dL.device
    buf = {"dw4": torch.empty(B, 3 * S, H, W, dtype=w4.dtype, device=dev),
           "part_gpw": torch.empty(splits, S_PAD, 3 * S_PAD, dtype=torch.float32, device=dev),
           "part_ln": torch.empty(splits, 2, S_PAD, dtype=torch.float32, device=dev)}
    args = (dL_, xh, rstd, w4, wts.local_pw.contiguous(), wts.ln_weight.contiguous(), wts.ln_bias.contiguous(),
            buf["dw4"], buf["part_gpw"], buf["part_ln"], buf["dw4"], M, N, tps, *dl_strides)   # dZL: unused
    kw = dict(S=S, S_PAD=S_PAD, BLOCK_I=block_i, BLOCK_P=tiles.PW_BLOCK_P,
              DOT_PRECISION=kernel_dot_precision("gma_local_backward_kernel", dots.precision, S_PAD),
              EMULATE_DOTS=dots.emulate, num_warps=tiles.PW_WARPS)
    bufd, ld = plan_dw_backward(buf["dw4"], depthwise_input(rc, 4), wts.local_dw, out, tiles)
    buf.update(bufd)
    return buf, [(gma_local_backward_kernel, (blocks, splits), args, kw)] + ld


def plan_dense_local_backward(dL: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, dots: DotVariant,
                              d_qkv: Tensor, tiles: Optional[BackwardTiles] = None
                              ) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """The local branch's backward in the dense form (`BackwardTiles.DENSE`; dense_z.py, "The local branch"):
    buffers (dZL, part_ln, and the dense weight gradient's part_gdw, part_gpw) and three launches:
    `gma_local_backward_kernel` with DZ_OUT (hardswish and LayerNorm backward, dZ_L stored), then
    `gma_dense_local_dx_kernel` (the input gradient into segment 4 of d_qkv) and `gma_dense_local_wgrad_kernel`
    (the depthwise and pointwise weight gradients from qkv's segment 4, rc["qkv"], and dZ_L). Reads neither w4 nor
    a depthwise output gradient."""
    B, S, H, W = dL.shape
    S_PAD = dot_pad(S)
    N, M = H * W, B * H * W
    dL_, dl_strides, xh, rstd = _local_inputs(dL, rc)
    tiles = tiles or backward_tiles(S_PAD, M)
    splits, tps = split_plan(M, tiles.PW_BLOCK_P, 1, tiles.TARGET_PROGRAMS)
    dev = dL.device
    buf = {"dZL": dense_local_dz_buffer(B, N, S, xh.dtype, dev),
           "part_ln": torch.empty(splits, 2, S_PAD, dtype=torch.float32, device=dev)}
    args = (dL_, xh, rstd, xh, wts.local_pw.contiguous(), wts.ln_weight.contiguous(), wts.ln_bias.contiguous(),
            buf["dZL"], buf["part_ln"], buf["part_ln"], buf["dZL"], M, N, tps, *dl_strides)  # w4, dw4, part_gpw: unused
    kw = dict(S=S, S_PAD=S_PAD, BLOCK_I=S_PAD, BLOCK_P=tiles.PW_BLOCK_P,
              DOT_PRECISION=kernel_dot_precision("gma_local_backward_kernel", dots.precision, S_PAD),
              EMULATE_DOTS=dots.emulate, DZ_OUT=True, num_warps=tiles.PW_WARPS)
    grid_x, args_x, kw_x = plan_dense_local_dx(buf["dZL"], d_qkv, H, W, wts.local_dw, wts.local_pw, dots)
    bufw, (grid_w, args_w, kw_w) = plan_dense_local_wgrad(rc["qkv"], buf["dZL"], H, W, wts.local_dw, wts.local_pw,
                                                          dots)
    buf.update(bufw)
    return buf, [(gma_local_backward_kernel, (1, splits), args, kw), (gma_dense_local_dx_kernel, grid_x, args_x, kw_x),
                 (gma_dense_local_wgrad_kernel, grid_w, args_w, kw_w)]


def plan_stages(dP: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, mean: Optional[Tensor],
                rstd: Optional[Tensor], dots: DotVariant, d_qkv: Optional[Tensor] = None,
                qkv: Optional[Tensor] = None, tiles: Optional[BackwardTiles] = None) -> List[Launch]:
    """Every launch of one backward call after B2 (dP: B2's G, `attention_backward.plan_b2`'s bn),
    fused and unfused B3 both, and the local branch (the
    launchers' own plans, nothing run): on meta tensors, what the ahead-of-time compile check
    specialises. d_qkv and qkv (B, N, 3C) given: also the stencils reading their input from qkv
    and storing the input gradient into d_qkv, and segment 0's dZ stored there (`qkv_layout`),
    as the Triton stage set runs them. tiles: every plan's (default `backward_tiles`')."""
    CP = dP.shape[1]
    stats = mean is not None
    coefs = dP.new_empty(3, CP, dtype=torch.float32)
    G = dP
    launches = plan_dz(G, rc["Z"], coefs, stats, 0, CP, tiles=tiles)[1]
    for mode in ((0, 2 if stats else 1) if fused_b3(dot_pad(CP // 4)) else (0,)):
        buf, lp = plan_pw_backward(G, rc["Z"], rc["y"], wts.pw, coefs, mode, dots, tiles)
        launches += lp
    dws = (wts.dw3, wts.dw5, wts.dw7)
    for j in (1, 2, 3):
        launches += plan_dw_backward(buf["dy"][j - 1], rc["u"][j], dws[j - 1], tiles=tiles)[1]
    B, s, H, W = rc["xh4"].shape
    grad_dtype = dP.dtype if qkv is None else qkv.dtype        # the Triton stage set: grad_pre as it comes
    dL = torch.empty(B, H * W, 5 * s, dtype=grad_dtype, device=dP.device)[..., 4 * s:].transpose(1, 2)
    launches += plan_local_backward(dL.reshape(B, s, H, W), rc, wts, dots, tiles=tiles)[1]    # dL: backward.py's view
    if d_qkv is not None:
        rq = dict(rc, qkv=qkv)
        launches += plan_dz(G, rc["Z"], coefs, stats, 0, s, qkv_layout(d_qkv, 0), tiles)[1]
        if tiles is not None and tiles.DENSE:
            dz, lz = _dense_dz(G, rc["Z"], coefs, stats, tiles)
            launches += lz + _dense_launches(dz, qkv, d_qkv, *G.shape[2:], wts, dots)[1]
        for j in (1, 2, 3):
            launches += plan_dw_backward(buf["dy"][j - 1], depthwise_input(rq, j), dws[j - 1], qkv_layout(d_qkv, j),
                                         tiles)[1]
        launches += plan_local_backward(dL.reshape(B, s, H, W), rq, wts, dots, qkv_layout(d_qkv, 4), tiles)[1]
        if tiles is not None and tiles.DENSE:
            launches += plan_dense_local_backward(dL.reshape(B, s, H, W), rq, wts, dots, d_qkv, tiles)[1]
    return launches


def _launch(launches: List[Launch], like: Tensor) -> None:
    from ._launch import device_guard, wrap_triton
    with device_guard(like):
        for kernel, grid, args, kwargs in launches:
            wrap_triton(kernel)[grid](*args, **kwargs)


def b3_dz(G: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, mean: Optional[Tensor], rstd: Optional[Tensor],
          sum_g: Tensor, sum_gzh: Optional[Tensor], count) -> Tensor:
    """`backward.b3_dz` on `gma_dz_kernel` (every channel)."""
    coefs = dz_coefficients(wts.bn_scale, mean, rstd, sum_g, sum_gzh, count)
    buf, launches = plan_dz(G, rc["Z"], coefs, mean is not None, 0, G.shape[1])
    _launch(launches, G)
    return buf["dZ"]


def _segments_backward(dz_src: Tensor, mode: int, coefs: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights,
                       d_qkv: Optional[Tensor] = None, dots: Optional[DotVariant] = None,
                       tiles: Optional[BackwardTiles] = None) -> Tuple[List[Optional[Tensor]], List[Tensor], Tensor]:
    """Segments 1..3: the pointwise kernel, then two stencil launches per segment (input and weight gradient); (du_1..3, g_dw, g_pw)
    (d_qkv given: du_j stored there, `qkv_layout`, and returned as None). dots: the pointwise
    kernel's (default dz_src's variant)."""
    s = dz_src.shape[1] // 4
    if len(rc["y"]) != 3:
        raise RuntimeError("B3: the depthwise outputs y are missing (the training forward kept Z alone, for a backward "
                           "running B3's dense form, `BackwardTiles.DENSE`), but this backward's tiles do not run it: "
                           "the tuning table changed between the forward and the backward?")
    bufp, lp = plan_pw_backward(dz_src, rc["Z"], rc["y"], wts.pw, coefs, mode, dots or dot_variant(dz_src), tiles)
    dws = (wts.dw3, wts.dw5, wts.dw7)
    plans = [plan_dw_backward(bufp["dy"][j - 1], depthwise_input(rc, j), dws[j - 1],
                              None if d_qkv is None else qkv_layout(d_qkv, j), tiles) for j in (1, 2, 3)]
    _launch(lp + [launch for _, ls in plans for launch in ls], dz_src)
    g_pw = bufp["part_gpw"].sum(0)[:, :s, :s]
    g_dw = [taps_of(b["part_gw"], s, 2 * j + 1) for j, (b, _) in zip((1, 2, 3), plans)]
    return [b["du"] for b, _ in plans], g_dw, g_pw


def b3_pointwise_depthwise(dZ: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, dots: Optional[DotVariant] = None
                           ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """`backward.b3_pointwise_depthwise` on `gma_pw_backward_kernel` + `gma_dw_backward_kernel`:
    ([du_0 .. du_3] (3B, s, H, W), [g_dw3, g_dw5, g_dw7], g_pw (3, s, s)); du_0 is dZ's view."""
    s = dZ.shape[1] // 4
    du, g_dw, g_pw = _segments_backward(dZ, 0, dZ, rc, wts, dots=dots)          # mode 0: coefs unread
    return [dZ[:, :s]] + du, g_dw, g_pw


def b3_fused(G: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, mean: Optional[Tensor], rstd: Optional[Tensor],
             sum_g: Tensor, sum_gzh: Optional[Tensor], count, d_qkv: Optional[Tensor] = None,
             dots: Optional[DotVariant] = None, tiles: Optional[BackwardTiles] = None
             ) -> Tuple[List[Optional[Tensor]], List[Tensor], Tensor]:
    """`b3_dz` followed by `b3_pointwise_depthwise` with dZ formed in the pointwise kernel's
    prologue (dZ of segments 1..3 never written; module docstring: the byte count); segment
    0's du (= its dZ) by `gma_dz_kernel`. Arguments as `b3_dz`, returns as `b3_pointwise_depthwise`;
    d_qkv (B, N, 3C) given: du_0..3 are stored straight into its segments 0..3 (`qkv_layout`, in
    its dtype) and returned as None. dots: the pointwise kernel's (default G's variant; the Triton
    stage set passes `statistics.backward_dots`); tiles: the plans' (default `backward_tiles`')."""
    s = G.shape[1] // 4
    stats = mean is not None
    coefs = dz_coefficients(wts.bn_scale, mean, rstd, sum_g, sum_gzh, count)
    buf0, l0 = plan_dz(G, rc["Z"], coefs, stats, 0, s, None if d_qkv is None else qkv_layout(d_qkv, 0), tiles)
    if tiles is not None and tiles.DENSE and "qkv" in rc:
        # dZ of segments 1..3 written once; the dense kernels read it (and qkv) in place of y and dy
        dz, lz = _dense_dz(G, rc["Z"], coefs, stats, tiles)
        out = d_qkv if d_qkv is not None else torch.zeros(rc["qkv"].shape, dtype=G.dtype, device=G.device)
        bufd, ld = _dense_launches(dz, rc["qkv"], out, *G.shape[2:], wts, dots or dot_variant(G))
        _launch(l0 + lz + ld, G)
        g_dw, g_pw = dense_weight_grads(bufd, s)
        if d_qkv is not None:
            return [None] * 4, g_dw, g_pw
        B, N, _ = out.shape
        H, W = G.shape[2:]
        du = out.view(B, H, W, 3, 5, s).permute(3, 0, 4, 5, 1, 2).reshape(3 * B, 5, s, H, W)
        return [buf0["dZ"]] + [du[:, j].contiguous() for j in (1, 2, 3)], g_dw, g_pw
    if fused_b3(dot_pad(s)):
        _launch(l0, G)
        du, g_dw, g_pw = _segments_backward(G, 2 if stats else 1, coefs, rc, wts, d_qkv, dots, tiles)
        return [buf0["dZ"]] + du, g_dw, g_pw
    # wide segments (`FUSED_B3_MAX_S_PAD`): dZ of every channel written once, the pointwise kernel reads it
    bufz, lz = plan_dz(G, rc["Z"], coefs, stats, 0, G.shape[1], tiles=tiles)
    _launch(lz if d_qkv is None else l0 + lz, G)
    du, g_dw, g_pw = _segments_backward(bufz["dZ"], 0, coefs, rc, wts, d_qkv, dots, tiles)
    return [None if d_qkv is not None else bufz["dZ"][:, :s]] + du, g_dw, g_pw


def _dense_dz(G: Tensor, Z: Tensor, coefs: Tensor, stats: bool, tiles: Optional[BackwardTiles]
              ) -> Tuple[Tensor, List[Launch]]:
    """dZ of segments 1-3 for B3's dense form: `dense_z.dense_dz_buffer` (B, N, 9s, qkv's layout, so that the dense
    kernels load it channels-contiguous as the forward loads qkv) and the `gma_dz_kernel` launch writing it through
    a `Layout` (image st B + b at b N 9s + st 3s, channel c at c, pixel n at n 9s)."""
    I, CP, H, W = G.shape
    B, s, N = I // 3, CP // 4, H * W
    dz = dense_dz_buffer(B, N, s, G.dtype, G.device)
    layout = Layout(dz, B, 3 * s, N * 9 * s, 3 * s, 0, 1, 9 * s)
    return dz, plan_dz(G, Z, coefs, stats, s, 3 * s, layout, tiles)[1]


def _dense_launches(dz: Tensor, qkv: Tensor, d_qkv: Tensor, H: int, W: int, wts: FoldedGMAWeights,
                    dots: DotVariant) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """B3's dense form for segments 1-3 (`BackwardTiles.DENSE`): dz (B, N, 9s) their dZ (`_dense_dz`); the input
    gradient into d_qkv (`gma_dense_dx_kernel`), the weight gradients' partials (`gma_dense_wgrad_kernel`, summed
    by `dense_z.dense_weight_grads`)."""
    grid, args, kw = plan_dense_dx(dz, d_qkv, H, W, wts.dw3, wts.dw5, wts.dw7, wts.pw, dots)
    buf, (grid_w, args_w, kw_w) = plan_dense_wgrad(qkv, dz, H, W, wts.dw3, wts.dw5, wts.dw7, wts.pw, dots)
    return buf, [(gma_dense_dx_kernel, grid, args, kw), (gma_dense_wgrad_kernel, grid_w, args_w, kw_w)]


def local_backward(dL: Tensor, rc: Dict[str, Tensor], wts: FoldedGMAWeights, d_qkv: Optional[Tensor] = None,
                   dots: Optional[DotVariant] = None, tiles: Optional[BackwardTiles] = None
                   ) -> Tuple[Optional[Tensor], ...]:
    """`backward.local_backward` on `gma_local_backward_kernel` + `gma_dw_backward_kernel` (3x3 over
    the 3s channels): (du4 (B, 3s, H, W), g_local_dw (3, 3, 3s), g_local_pw (s, 3s),
    g_ln_weight (s,), g_ln_bias (s,)); d_qkv (B, N, 3C) given: du4 is stored straight into its
    segment 4 (`qkv_layout`, in its dtype) and returned as None. dots: default dL's variant;
    tiles: `plan_local_backward`'s."""
    B, S, H, W = dL.shape
    S_PAD = dot_pad(S)
    if tiles is not None and tiles.DENSE and "qkv" in rc:
        out = d_qkv if d_qkv is not None else torch.zeros(rc["qkv"].shape, dtype=dL.dtype, device=dL.device)
        buf, launches = plan_dense_local_backward(dL, rc, wts, dots or dot_variant(dL), out, tiles)
        _launch(launches, dL)
        g_ldw, g_lpw = dense_local_weight_grads(buf, S)
        ln = buf["part_ln"].sum(0)
        du4 = None if d_qkv is not None else (
            out.view(B, H, W, 3, 5, S)[..., 4, :].permute(0, 3, 4, 1, 2).reshape(B, 3 * S, H, W).contiguous())
        return du4, g_ldw, g_lpw, ln[0, :S], ln[1, :S]
    buf, launches = plan_local_backward(dL, rc, wts, dots or dot_variant(dL),
                                        None if d_qkv is None else qkv_layout(d_qkv, 4), tiles)
    _launch(launches, dL)
    g_lpw = buf["part_gpw"].sum(0).view(S_PAD, 3, S_PAD)[:S, :, :S].reshape(S, 3 * S)
    ln = buf["part_ln"].sum(0)
    g_ldw = taps_of(buf["part_gw"], 3 * S, 3)
    return buf["du"], g_ldw, g_lpw, ln[0, :S], ln[1, :S]


BACKWARD_FAMILY = "triton.backward"
#: Further tiles the tuner tries (BLOCK_C, BLOCK_P, num_warps, PW_BLOCK_P, PW_WARPS, PW_TILE_ELEMS; DW_ROWS 0:
#: the depthwise tile kernels, the first of them at the default's other tiles, so that the tuner compares the
#: walks with the tile kernels alone): the stencils' [channels, pixels] tile and the channel-mix kernels'
#: pixels and channel block (benchmarks/tune.py --train refuses one that spills at the call's width). AOT
#: sweep of the candidates (2026-12-02, `specializations.candidate_specializations`: GroupMixFormer-S's real
#: calls at batch 128, fp32 and bf16, sm_90), the channel-mix kernels: 32-pixel tiles (PW_BLOCK_P 32, 8 warps,
#: 2048-element blocks) spilled 80 B at C = 320 and 12 B (local) at C = 80, so they are not listed; 4 warps at
#: 16 pixels none (254 registers); the others the default's (at most 210).
TILE_SEARCH = ((16, 128, 8, 16, 8, 64 * 64), (16, 64, 4, 16, 8, 64 * 64), (32, 64, 8, 16, 8, 64 * 64),
               (16, 128, 8, 16, 4, 32 * 64), (16, 256, 8, 16, 8, 64 * 64))
#: The depthwise backward's row walks (`gma_dw_backward_kernel` and `gma_dw_wgrad_kernel` with ROWS): strips
#: of DW_ROWS columns ([16 or 32 pixels of a row, 16 channels] at 8 warps), every other kernel of the family at
#: the default's tiles; the first is the default (`DW_ROWS_DEFAULT`). AOT compile (2026-12-05, Triton 3.6, ptxas;
#: GroupMixFormer-S's widths at batch 128, fp16 and fp32 layers, every launch of the kernel: B3's segments
#: into the qkv gradient and the local branch's, sm_80 and sm_90): no spill, 63-80 registers. sm_90 SASS,
#: fp16, the walk's loop per input row: 4.3-4.4 instructions per FFMA at 7x7, 4.9-5.2 at 5x5, 6.7-7.2 at 3x3,
#: where the tile kernel's tap takes 106 instructions for 8 FFMA (13.3). A first version spilled 12-72 B on
#: sm_90 at every tile: the seven `Layout` scalars were live across the three unrolled walks; the walk now
#: takes the image's base and the channels' offsets, computed once per piece and per program.
DW_ROWS_TILES = ((16, 128, 8, 16, 8, 64 * 64, 16), (16, 128, 8, 16, 8, 64 * 64, 32))


def tile_of(t: BackwardTiles) -> Tuple[int, ...]:
    """The "triton.backward" tile tuple of `BackwardTiles` t (the inverse of `tiles_of`; TARGET_PROGRAMS is not a
    knob)."""
    return (t.BLOCK_C, t.BLOCK_P, t.WARPS, t.PW_BLOCK_P, t.PW_WARPS, t.PW_TILE_ELEMS, t.DW_ROWS, t.DENSE)


def _gpu_tile(C: int, precision: str) -> Tuple[int, ...]:
    return tile_of(gpu_backward_tiles(dot_pad(C // 5)))


#: 64-pixel tiles of the channel-mix kernels (4 pixels a thread at S_PAD 16, against one: a fourth of the
#: CTA barriers per element; sm_90 SASS of the pointwise backward at C = 80 fp16 with 16-pixel tiles: 6
#: barriers per 16-pixel tile), where they compile without spilling (2026-12-05, ptxas, batch 128, sm_80 and
#: sm_90): S_PAD 16 (C = 80) at fp32 and fp16 (pointwise 106-181 registers, local 136-236), S_PAD 32 (C = 160)
#: at fp16 only (one-pass TF32 dots: 138-234; fp32's 3xTF32 spilled 84-104 B); sm_70/75's FMA dots not
#: tried. Not timed.
WIDE_PW_TILE = (16, 128, 8, 64, 8, 64 * 64)


def _search(C: int, precision: str) -> List[Tuple[int, ...]]:
    """`WIDE_PW_TILE` (with the default's walks) where it compiles without spilling, `DW_ROWS_TILES` (the first
    is the default, dropped as a duplicate by `register_tiles`), then TILE_SEARCH (the tile kernels), each with
    the channel-mix block of the default at S_PAD 128 (16 x 128) (the family keeps
    `tile_spaces.MAX_CANDIDATES`: the first ones)."""
    s_pad = dot_pad(C // 5)
    wide = s_pad > 64
    out = [_gpu_tile(C, precision)[:7] + (1,)] if dense_b3_applies(C, precision) else []    # B3's dense form
    if (s_pad <= 16 and precision in ("tf32", "tf32x3")) or (s_pad == 32 and precision == "tf32"):   # sm_80+
        out.append(WIDE_PW_TILE + (DW_ROWS_DEFAULT, 0))
    out += [(t[:5] + (min(t[5], 16 * 128),) + t[6:] if wide else t) + (0,) for t in DW_ROWS_TILES]
    out += [t[:5] + (min(t[5], 16 * 128), 0, 0) if wide else t + (0, 0) for t in TILE_SEARCH]
    return out


def tiles_of(tile: Tuple[int, ...]) -> BackwardTiles:
    """The `BackwardTiles` of a "triton.backward" tile tuple (DW_ROWS 0 where the tuple stops before it)."""
    return BackwardTiles(BLOCK_C=tile[0], BLOCK_P=tile[1], WARPS=tile[2], PW_BLOCK_P=tile[3], PW_WARPS=tile[4],
                         PW_TILE_ELEMS=tile[5], DW_ROWS=tile[6] if len(tile) > 6 else 0,
                         DENSE=tile[7] if len(tile) > 7 else 0)


register_tiles(BACKWARD_FAMILY, ("BLOCK_C", "BLOCK_P", "num_warps", "PW_BLOCK_P", "PW_WARPS", "PW_TILE_ELEMS",
                                 "DW_ROWS", "DENSE"),
               _gpu_tile, _search, [gma_dz_kernel, gma_pw_backward_kernel, gma_dw_backward_kernel, gma_dw_wgrad_kernel,
                                    gma_local_backward_kernel, gma_dense_dx_kernel, gma_dense_wgrad_kernel,
                                    gma_dense_local_dx_kernel, gma_dense_local_wgrad_kernel])
