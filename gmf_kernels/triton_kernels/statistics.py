"""Z of the Triton training path as kernels: the forward's statistics pass (per-channel moments
of Z) and the backward's recompute of Z and the depthwise outputs y (end of this docstring).

    mean, var, count = statistics(qkv, H, W, wts, group)      # backward.statistics' contract
    Z, PV, y = recompute_planes(qkv, H, W, wts)               # the backward's recompute, first launch

Z is what the aggregator BatchNorms normalise: segments 0..3 of q, k and v (segment 0 itself,
segment j = 1..3 the s x s pointwise of the (2j+1)x(2j+1) depthwise), with per-channel batch
statistics over the 3B images x H x W. `backward.statistics` (PyTorch ops) materialises Z as a
(3B, 4s, H, W) tensor and reduces it; `gma_statistics_kernel` computes Z tile by tile in
registers (`aggregation._tile`, and `aggregation._dw_pw_seg` with a segment's two heads as one
[BLOCK_P, s] tile where `training_pair` allows, else `aggregation._dw_pw_heads`, the forward's
per-head code for Z) and writes only per-program partial moments.

**Grid** ``(R, 3B)``, cost-balanced as the forward aggregation's (`SegmentPlan`): the N tokens
of an image in T tiles of BLOCK_P, segment j's tiles in ``splits[j]`` contiguous runs, in
proportion to its cost per tile (`segment_costs`: segment 0 costs almost nothing, the 7x7
segment ~3x the 3x3 one; `aggregation._balanced_splits`, about SPLIT_TARGET programs in all
where the tiles allow, and with a large batch every program about the mean segment's work),
R = sum_j splits[j] programs per image; program pid decodes its segment from the running sums
of the four split counts (runtime ints, not specialised). (A uniform split, as before, gave
every segment the same runs, so a 7x7 program took ~3x a 3x3 one and the segment-0 programs
next to nothing.) Program (pid, img) walks its run of tiles of image ``img`` of Z's 3B (q
images 0..B-1, then k, then v: upstream's order) for its segment ``seg`` and keeps, per channel of that segment, fp32 (mean, M2 = sum of squared deviations) of the
values taken relative to a per-channel *shift* (the program's first tile's mean): each tile's
mean and M2 are taken around the tile's own mean (two passes over registers), then merged
into the running pair with Chan's formula

    n' = n + n_t;  delta = mean_t - mean;  mean += delta n_t / n';  M2 += M2_t + delta^2 n n_t / n'

(n, n_t: token counts, known from the tile index: every tile but an image's last is full).
Nothing like sum(z^2) - n mean^2 is ever formed, and thanks to the shift every sum is of
values of the spread's size, not of |mean|: |mean| >> std loses nothing. (A naive fp32 sum /
sum of squares over the 3B x N values of a channel -- 75 264 at C = 320 14x14 B = 128, 1.2e6
at 56x56 -- loses at least 2^-24 mean^2 / var of the variance to cancellation: 6e-2 at the
test's offset of 1000 standard deviations; without the shift the tile means' rounding, ~2^-24
|mean| each, put 1.6e-5 on that case's variance.) The program stores its mean as float64
(shift + mean, exact) and its M2 as fp32, at row ``img * R + pid`` of two (3B R, s) buffers
(a row holds its segment's s channels); `merge_segments` combines each segment's rows with
Chan's parallel formula in closed form, in float64 (a tiny torch reduction over 3B x R x s
values, the four segments at once):

    n = sum n_r;  mean = sum n_r mean_r / n;  M2 = sum M2_r + sum n_r (mean_r - mean)^2

(all terms non-negative: no cancellation in the merge either). Measured on the offset case
(tests/test_triton_statistics.py, segment 0's variance against the float64 oracle): 0.7-1.1e-7
with the float64 merge, 1.4-2.1e-6 with the same merge in fp32 (the fp32 rounding of each
program's mean, ~2^-24 |mean|, against between-program deviations of ~std / sqrt(n_r)).

**Dots**: the pointwise runs as ``tl.dot`` with the dot variant of *fp32* inputs on the GPU
(3xTF32 on sm_80+, FMAs on sm_70/75) whatever the input dtype (`statistics_dots`): the
statistics are fp32 statistics (`folding.compute_dtype`), as the PyTorch pass computes them;
one-pass TF32 (the forward's choice for fp16/bf16) would put ~5e-4 relative error on every Z
value. The recompute kernel (below) differs: it rebuilds the Z the forward normalised, with
the backward's dots (`backward_dots`: the forward's own variant for the input dtype).

**Work per token** (s = C/5 channels per segment, e bytes per qkv element):

* bytes: segments 0..3 of q, k, v read once, 12 s e = 2.4 C e (the local branch's 3s channels
  are not read; the stencil halo comes from L1/L2); the partials (12 B x s per program) and
  the folded weights (dw3/5/7, pw: (83 s + 3 s^2) x 4 B in all, per program from L2) are
  negligible.
  Z (12 s x 4 B per token in the PyTorch pass, written then read) never exists.
* CUDA-core FLOPs: the depthwise stencils 2 x 3 x (9 + 25 + 49) s = 498 s, and ~6 per Z value
  for the moments (72 s): ~570 s, i.e. ~11.9 FLOP/B for fp32 and ~23.8 FLOP/B for fp16/bf16.
* tensor-core FLOPs: the pointwise, 2 x 9 s^2 useful (x3 passes with 3xTF32).

Bound aimed at: HBM bandwidth, reading qkv once. On an H100/H200 (spec sheet: ~67 TFLOP/s fp32
FMA, 3.35/4.8 TB/s) the ridge is ~14-20 FLOP/B: fp32 sits below it (memory bound); fp16/bf16
(half the bytes, the same stencil FMAs) sits at or just above it, so there the depthwise FMAs,
not the bytes, may set the time. Not measured (no GPU in this session); the interpreter says
nothing about speed.

**Recompute for the backward** (`gma_recompute_z_kernel`; `recompute_z`, op
``gmf::triton_proxy_z``, `recompute_planes`: the first launch of recompute.py, the Triton stage
set's `backward.Stages.recompute`). The backward needs Z itself, not its moments, the proxies
P = hardswish(Z bn_scale + bn_shift) of the v images, PV (the CRPE stencils of the recompute
and of B2 read V with its halo: a transform per tap would cost more than its bytes; the readers
of q's and k's proxies, B1, B2 and the softmax recompute, take them from Z with the affine
and hardswish on load: they read Z of q and k anyway or read it instead), and the depthwise outputs y_j (the
pointwise backward's input; the depthwise backward reads its input u_j from qkv itself,
`aggregation_backward.qkv_layout`): the same grid ``(R, 3B)`` (its own costs:
`segment_costs` with the stores) and the
same per-tile Z (`_dw_pw_seg` / `_dw_pw_heads` with STORE_Y: a store of each depthwise chunk), stored
instead of reduced, in the stage dtype (`config.stage_dtype`: qkv's own for fp16/bf16, fp32 for
fp32; computed in fp32, rounded once on store), channel-first as
the stages read them: Z (3B, 4s, H, W), segment 0 of Z being qkv's segment 0, PV (B, 4s, H, W),
and y_all (3, 3B, s, H, W), y_all[j - 1] = y_j (one buffer: the pointwise-backward kernel takes
the three with one stride set). The stores go along the tile's token axis (consecutive tokens
of a channel are consecutive addresses). Per token, in units of s x 4 bytes per stream (q, k, v),
e = qkv's element size (the stage tensors' too):

* bytes: reads 4 e / 4 (qkv's segments 0..3, as the statistics pass); writes Z 4, P 4 / 3 (the
  v images), y 3 times e / 4: 12.3 e / 4 units (12.3 for fp32 inputs, 6.2 for fp16/bf16; 15 e / 4
  while P of q and k was written too, until 2026-12-02). PyTorch's same tensors and its u_j copies (`backward.recompute`,
  fp32): the layout copies of u_0..3 8, the depthwise 6, the pointwise 6, the cat 8, then
  pre_act = Z a + b and P = hardswish(pre_act) 16 (read Z, write pre_act, read it, write P): 44
  units; and the depthwise backward read the u_j copies (3) where it now reads qkv (3 e / 4).
* FLOPs: the statistics pass's stencils and pointwise without the moments (~500 s on CUDA
  cores) and the affine and hardswish (~5 per P value): ~2.3 FLOP/B for fp32.

Bound aimed at: HBM bandwidth (mostly the writes), far below any ridge. Not measured (no GPU).
It allocates Z, PV and y (8.3 s e B per token and stream), less than PyTorch's recompute (no u_j
copies, no pointwise outputs before a cat, no pre-activation).

**Planes kept for the backward** (STORE; `statistics_planes`, op ``gmf::triton_z_moments_planes``;
2026-12-05). The statistics pass and the recompute compute the same Z and y on the same grid, each
reading qkv and running the stencils and the pointwise: a training step ran them twice, and the
forward's eval kernels a third time. So when a backward follows (`training.prepare`: grad mode on and
qkv or a parameter needing a gradient) and runs the Triton stages, the statistics kernel also stores Z
and y as the recompute kernel would (same layouts, the stage dtype, `_dw_pw_seg` / `_dw_pw_heads` with
STORE_Y), the Function keeps them, and the backward's first launch is `recompute.gma_proxy_v_kernel`
(PV from the kept Z of the v images and the folded BatchNorm affine: 2 x 4s e per token, no qkv read,
no stencil) instead of `gma_recompute_z_kernel`. Per token and stream this moves the writes of Z and y
(7 s e) from the backward into the forward and removes the recompute's qkv read (4 s e) and all its
stencil and pointwise work (~500 s FLOPs, the part the H200 profile of the forward found
latency-bound); it adds PV's read of Z (4 s e / 3). Z now comes from the statistics pass's dots
(fp32's, 3xTF32 on sm_80+) for every layer dtype, where the recompute used the layer dtype's (one
TF32 pass for fp16/bf16): the backward differentiates at the normalised values the statistics were
taken from, rounded once to the stage dtype. Price: activation memory. Z (12 s) and y (9 s) per
token, 4.2 C values, live from the forward to the backward: a Triton layer keeps 9.2 N C values per
image instead of 5.0 (upstream's eager structure: 18.3; tests/test_triton_training.py). Where the
backward runs the PyTorch stages (S_PAD 128 with sm_70/75's FMA dots), under no_grad, in eval mode
with gradients, and for float64, nothing is kept and the recompute runs as before. Not timed (no GPU
in the session that wrote it). Where the backward runs B3's dense form (`aggregation_backward.BackwardTiles.DENSE`,
a tuning candidate since 2026-12-06), which reads no y, the pass keeps Z alone (`statistics_planes(keep_y=False)`,
`train_op.planes_fn_for`): 9 s e per token fewer written, and 1.8 C values per token fewer kept. Since 2026-12-07
it then runs in the dense form itself, on tensor cores (`dense_z.dense_statistics_planes`, where
`dense_z.dense_statistics_applies`: the same layers), and this kernel without y (`STORE_Z_MOMENTS`) elsewhere.

**The forward reads them too** (2026-12-05, later). The training forward's aggregation ran the stencils
and the pointwise of segments 1-3 once more, after this pass, only to normalise them with its moments.
Where the planes are kept it now reads Z instead (`config.from_planes`, the aggregation kernel's
FROM_Z: jobs 1-3 become element-wise like segment 0, `aggregation._segment_z`; op
``gmf::triton_pre_projection_from_planes``), so a training step runs those stencils once, here. Same
bytes (qkv's segments 1-3 read as Z instead), about a tenth of the CUDA-core FLOPs and a third of the
tensor-core ones of that kernel (`costs._aggregate`). Numerics: for fp16/bf16 layers the forward now
normalises Z rounded once to the stage dtype (as the reference's convolutions in that dtype, and
upstream under autocast, round it before their BatchNorm) instead of its own fp32 registers; fp32
layers keep fp32 Z. The same launches keep what the backward's recompute would make: the local
branch's w4, xh4, rstd4 and the attention's R = CRPE(V) + bias, KV and softmax statistics (1.6 C values
per token more), so neither `gma_recompute_local_kernel` nor `gma_recompute_attention_kernel` runs in a
training step's backward. Not timed either.

**Row walks** (ROWS, a tuning candidate of the "triton.statistics" family, `STATS_ROWS_TILES`; 2026-12-05,
later; `_statistics_rows`). Since the forward reads Z, this pass is the one place a training step runs the
3x3, 5x5 and 7x7 stencils, and it runs them tile by tile: per tap a load of the tile's shifted
activations, its address and mask arithmetic, then the tap's multiply-adds (`_common.depthwise_taps`). With
ROWS the tiles are rows of BLOCK_P-column strips (`aggregation._tile`; `SegmentPlan.row_w`, whose run
counts then come from the strips' widths), and segments 1-3 walk them down their strip as the aggregation's
row-walk candidate does (`aggregation._rows_walk`, here one stream, since a program is one image of q, k or
v): each input row read once per walk as its KS column shifts (independent loads), multiplied into KS
rolling [BLOCK_P, s] accumulators; a completed output row takes the tile's epilogue (y stored, the
pointwise dot, Z stored, the moments folded with a carried token count). The same y as the tile kernel
(its taps added in the same order) and Z to rounding (one dot over the s channels, where the tile kernel
adds CK-channel chunks; bit for bit where one chunk holds them, as under the interpreter). Where: PAIR's widths with
tensor-core dots (C = 80, 160, 320 on sm_80+, `rows_applies`); runs of at least KS rows
(`aggregation._rows_splits`). sm_90 SASS of the loop bodies (fp16 inputs, STORE, batch 128; warp
instructions per token over the four segments, without a run's R halo rows at each end; compiler figures,
not timings): C = 80 683 -> 402
((64, 8) tiles against (16, 4) rows), C = 160 1395 -> 448 ((32, 4) against (16, 4)), C = 320 2486 -> 1006
((64, 8) against (16, 8)); registers 79 / 128 / 200 -> 128 / 144 / 178, i.e. 24 / 16 / 8 warps per SM ->
16 / 12 / 8. Whether fewer instructions at lower occupancy pay is for `benchmarks/tune.py --train` to
measure: the tile kernel stays the default at C = 80 and 160. At C = 320 the walk is the GPU default since
2026-12-05 (`STATS_ROWS_DEFAULT`): the same occupancy, fewer registers on sm_90 and 2.5 times fewer
instructions per token; the tile kernel is a candidate there.

**The Z pass of the split forward** (STORE = `Z_ONLY`; `plan_z_pass`; 2026-12-06, a tuning candidate of
the eval forward, ``SPLIT`` in the "triton.aggregate" family: `config.GMAShape.AGG_SPLIT`). The eval
forward's aggregation kernel runs the stencils, the pointwise, the BatchNorm, the hardswish, the online
softmax and exp(K)^T V of a tile in one program; an H200 measured it at 6-12 % of its byte bound
(latency, not bytes: few warps resident, a long serial epilogue per tile). The split forward runs the
stencils and the pointwise here, on this kernel's grid (one stream a program, cost-balanced, the row walks
where the statistics family's tiles pick them), and stores Z of segments 1-3; the aggregation then reads Z
as the training forward does (`aggregation._segment_z`), element-wise. Segment 0 needs no pass (its Z is
qkv), and nothing else is stored: no moments, no y. Bytes per token and stream (s = C/5, e the stage
dtype's bytes): Z written 9 s e here and read 9 s e by the aggregation, against the fused forward that
never stores it: 36 s bytes more per token at fp16/bf16 (GroupMixFormer-S stage 0, batch 128: ~230 MB,
~80 us at 3 TB/s), in exchange for two simpler kernels. Whether it pays is a measurement
(`benchmarks/tune.py`); the dots are the statistics pass's (`statistics_dots`: fp32's, 3xTF32 on sm_80+; the
fused forward's one TF32 pass made ptxas spill at several widths), Z is rounded once to the stage dtype as in
the training forward.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (DotVariant, dot_variant, hardswish, interpreting, mm, rows_input, rows_piece, rows_shift,
                      stored)
from .aggregation import _balanced_splits, _dw_pw_heads, _dw_pw_seg, _rows_splits, _tile
from .config import (INTERPRETER_BLOCK_P, check_train_size, dot_pad, next_pow2, pair_applies, stage_dtype,
                     strip_width)
from . import tile_spaces
from .tile_spaces import register_tiles

Tensor = torch.Tensor

#: `gma_statistics_kernel`'s STORE modes beyond False (nothing stored): Z and the depthwise outputs y (the
#: training forward with a backward, "Planes kept for the backward"; the host passes True) ...
Z_AND_Y = tl.constexpr(1)
#: ... or Z of segments 1-3 alone, without the moments (the split eval forward's Z pass, `plan_z_pass`): the
#: host's `store` argument of `kernel_call` / `segment_costs`, and the kernel's constexpr
STORE_Z_ONLY = 2
Z_ONLY = tl.constexpr(STORE_Z_ONLY)
#: ... or the moments and Z without y (the training forward whose backward runs B3's dense form, which reads no y:
#: `aggregation_backward.BackwardTiles.DENSE`, `statistics_planes(keep_y=False)`, where the dense statistics pass,
#: `dense_z.dense_statistics_planes`, does not apply): the host's `store` value; the
#: kernel needs no branch of its own (y is stored where STORE == Z_AND_Y, Z where STORE, the moments where
#: STORE != Z_ONLY)
STORE_Z_MOMENTS = 3


@triton.jit
def _tile_counts(t, t0, N, BLOCK_P: tl.constexpr):
    """(values before tile t in this program's run from t0, values in tile t), as fp32."""
    return ((t - t0) * BLOCK_P).to(tl.float32), tl.minimum(N - t * BLOCK_P, BLOCK_P).to(tl.float32)


@triton.jit
def _fold_tile(z, pmask, first, n_prev, n_tile, shift, mean, m2):
    """Chan's merge of one tile's values z [BLOCK_P, D_PAD] (a head; [BLOCK_P, S] with PAIR) (n_tile valid rows, pmask) into the
    running per-channel (mean, m2) over n_prev earlier values. Values are taken relative to
    `shift` (per channel): on the program's `first` tile it becomes that tile's mean (rounded to
    fp32, any value near the mean does), and `mean` is the mean minus the shift, so every sum
    below is of values of the spread's size, not of |mean| (module docstring). Returns
    (shift, mean - shift, m2)."""
    if first:
        shift = tl.sum(tl.where(pmask[:, None], z, 0.0), axis=0) / n_tile
    d = z - shift[None, :]
    delta = tl.sum(tl.where(pmask[:, None], d, 0.0), axis=0) / n_tile - mean      # tile mean - running
    dev = tl.where(pmask[:, None], d - (mean + delta)[None, :], 0.0)
    m2_t = tl.sum(dev * dev, axis=0)
    n_new = n_prev + n_tile
    return shift, mean + delta * (n_tile / n_new), m2 + m2_t + delta * delta * (n_prev * n_tile / n_new)


@triton.jit
def _store_moments(shift, mean, m2, row, ch, kmask, part_mean, part_m2):
    """Store the program's mean = shift + (mean - shift) as float64 (the sum of two fp32 values:
    exact; rounded to fp32 it would cost the merge's between-program term its accuracy when
    |mean| >> std, module docstring) and its M2 as fp32."""
    tl.store(part_mean + row + ch, shift.to(tl.float64) + mean.to(tl.float64), mask=kmask)
    tl.store(part_m2 + row + ch, m2, mask=kmask)


@triton.jit
def _program(qkv, N, H, W, stride_qkv_b, splits0, splits1, splits2, splits3, C: tl.constexpr, S: tl.constexpr,
             BLOCK_P: tl.constexpr, ROWS: tl.constexpr = False):
    """Program (pid, img) of the ``(R, 3B)`` grid (both kernels; R = splits0 + .. + splits3, the
    cost-balanced plan, module docstring): (pid, seg, img), its run of tiles [t0, t1), its image's
    qkv rows (image img of Z's 3B: q images 0..B-1, then k, then v) and the qkv channel of
    segment seg of that q / k / v. Segment j owns programs [e_j, e_j+1) of an image
    (e_0 = 0, e_j+1 = e_j + splits_j), each a run of ceil(T / splits_j) tiles (T = ceil(N / BLOCK_P); with
    ROWS, tiles are rows of BLOCK_P-column strips, `aggregation._tile`: T = ceil(W / BLOCK_P) H)."""
    pid = tl.program_id(0)
    img = tl.program_id(1)
    B = tl.num_programs(1) // 3
    if ROWS:
        T = tl.cdiv(W, BLOCK_P) * H
    else:
        T = tl.cdiv(N, BLOCK_P)
    e1 = splits0
    e2 = e1 + splits1
    e3 = e2 + splits2
    seg = (pid >= e1).to(tl.int32) + (pid >= e2).to(tl.int32) + (pid >= e3).to(tl.int32)
    first = tl.where(seg == 0, 0, tl.where(seg == 1, e1, tl.where(seg == 2, e2, e3)))
    sp = tl.where(seg == 0, splits0, tl.where(seg == 1, splits1, tl.where(seg == 2, splits2, splits3)))
    tps = tl.cdiv(T, sp)
    t0 = (pid - first) * tps
    t1 = tl.minimum(t0 + tps, T)
    qkv_b = qkv + (img % B).to(tl.int64) * stride_qkv_b
    return pid, seg, img, t0, t1, qkv_b, (img // B) * C + seg * S


@triton.jit
def _segment0_heads(qkv_b, ch0, n, pmask, stride_n, D: tl.constexpr, D_PAD: tl.constexpr):
    """Z of segment 0 (qkv itself) for one tile: its two heads [BLOCK_P, D_PAD] in fp32 (0 where masked)."""
    kk = tl.arange(0, D_PAD)
    m2d = pmask[:, None] & (kk < D)[None, :]
    src = qkv_b + n[:, None] * stride_n + (ch0 + kk)[None, :]
    return tl.load(src, mask=m2d, other=0.0).to(tl.float32), tl.load(src + D, mask=m2d, other=0.0).to(tl.float32)


@triton.jit
def _segment_filters(seg, dw3, dw5, dw7, pw, S: tl.constexpr):
    """The depthwise taps (3x3 / 5x5 / 7x7) and the s x s pointwise of proxy segment seg (1..3)."""
    if seg == 1:
        dw = dw3
    elif seg == 2:
        dw = dw5
    else:
        dw = dw7
    return dw, pw + (seg - 1) * S * S


@triton.jit
def _store_channels(dst, ch, n, val, mask, N, EMULATE: tl.constexpr):
    """val [BLOCK_P, width] (fp32) into channel-first images in dst's dtype (the stage dtype,
    `config.stage_dtype`; rounded as `stored`): element (token n, channel ch) at dst + ch * N + n."""
    tl.store(dst + ch[None, :] * N + n[:, None], stored(val, dst, EMULATE), mask=mask)


@triton.jit
def _store_heads_z(z_seg, z0, z1, n, pmask, N, D: tl.constexpr, D_PAD: tl.constexpr, EMULATE: tl.constexpr):
    """A tile's two heads of Z [BLOCK_P, D_PAD] into the segment's channel-first image z_seg."""
    kk = tl.arange(0, D_PAD)
    m2d = pmask[:, None] & (kk < D)[None, :]
    _store_channels(z_seg, kk, n, z0, m2d, N, EMULATE)
    _store_channels(z_seg, D + kk, n, z1, m2d, N, EMULATE)


@triton.jit
def _store_pair_z(z_seg, z, n, pmask, N, S: tl.constexpr, EMULATE: tl.constexpr):
    """A segment's S channels of Z as one [BLOCK_P, S] tile (PAIR) into its channel-first image z_seg."""
    cc = tl.arange(0, S)
    _store_channels(z_seg, cc, n, z, pmask[:, None] & (cc < S)[None, :], N, EMULATE)


@triton.jit
def _statistics_pair(qkv_b, ch0, part_mean, part_m2, dw3, dw5, dw7, pw, seg, t0, t1, row, N, H, W, SW, stride_n,
                     z_seg, y_img, S: tl.constexpr, CK: tl.constexpr, BLOCK_P: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, STORE: tl.constexpr):
    """`gma_statistics_kernel`'s program with PAIR: Z of the segment's s channels as one [BLOCK_P, S]
    tile, folded into one running (shift, mean, M2) of S channels; STORE: Z also stored to z_seg and,
    seg >= 1, the depthwise output to y_img (channel-first)."""
    cc = tl.arange(0, S)
    shift = tl.zeros([S], dtype=tl.float32)
    mean = tl.zeros([S], dtype=tl.float32)
    m2 = tl.zeros([S], dtype=tl.float32)
    if seg == 0:
        if STORE != Z_ONLY:   # Z_ONLY: segment 0's Z is qkv itself, read by the aggregation
            t = t0
            while t < t1:
                n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
                z = tl.load(qkv_b + n[:, None] * stride_n + (ch0 + cc)[None, :], mask=pmask[:, None],
                            other=0.0).to(tl.float32)
                if STORE:
                    _store_pair_z(z_seg, z, n, pmask, N, S, EMULATE_DOTS)
                n_prev, n_tile = _tile_counts(t, t0, N, BLOCK_P)
                shift, mean, m2 = _fold_tile(z, pmask, t == t0, n_prev, n_tile, shift, mean, m2)
                t += 1
    else:
        dw, pw_seg = _segment_filters(seg, dw3, dw5, dw7, pw, S)
        t = t0
        while t < t1:
            n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
            z = _dw_pw_seg(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_n, 2 * seg + 1, S, CK, BLOCK_P,
                           DOT_PRECISION, EMULATE_DOTS, y_img, N, STORE == Z_AND_Y)
            if STORE:
                _store_pair_z(z_seg, z, n, pmask, N, S, EMULATE_DOTS)
            if STORE != Z_ONLY:
                n_prev, n_tile = _tile_counts(t, t0, N, BLOCK_P)
                shift, mean, m2 = _fold_tile(z, pmask, t == t0, n_prev, n_tile, shift, mean, m2)
            t += 1
    if STORE != Z_ONLY:
        _store_moments(shift, mean, m2, row, cc, cc < S, part_mean, part_m2)


@triton.jit
def _walk_statistics(src, dw, pw_seg, strip, ya, yb, N, H, W, stride_n, z_seg, y_img, shift, mean, m2, count,
                     KS: tl.constexpr, S: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     EMULATE_DOTS: tl.constexpr, STORE: tl.constexpr):
    """Rows [ya, yb) of one strip (BLOCK_P columns from strip BLOCK_P) of one segment of one image
    (src: its element (token 0, channel 0) of the segment's s channels), by a ROW WALK as
    `aggregation._rows_walk` (one stream): the input rows max(0, ya - R) .. yb + R - 1 read once each, in
    order, row i's KS column shifts (`_common.rows_input`) into the KS output rows it reaches, held as KS
    rolling [BLOCK_P, S] fp32 accumulators; after row i, output row i - R is complete and, if in [ya, yb),
    takes the tile's epilogue: STORE its depthwise output y, the pointwise dot, STORE Z, the moments
    (`_fold_tile`, `count` values folded so far). The taps reach each output element in the tile kernel's
    order (ky, then kx), so y is that of `_dw_pw_seg` (up to the FMA contraction), and Z too where its
    dot takes the s channels in one chunk."""
    R = KS // 2
    co = tl.arange(0, S)
    cmask = co < S
    x = strip * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = x < W
    n_tile = tl.minimum(W - strip * BLOCK_P, BLOCK_P).to(tl.float32)
    zt = tl.zeros([BLOCK_P, S], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6 = zt, zt, zt, zt, zt, zt, zt
    w = tl.load(pw_seg + co[None, :] * S + co[:, None])           # [S, S]: pw[o, c] at (c, o)
    i = tl.maximum(ya - R, 0)
    while i < yb + R:
        a0, a1, a2, a3, a4, a5, a6, _b0, _b1, _b2, _b3, _b4, _b5, _b6 = rows_input(
            a0, a1, a2, a3, a4, a5, a6, zt, zt, zt, zt, zt, zt, zt, i, H, src, x, cmask, co, dw + co, S, 0, W,
            stride_n, KS, 1)
        o = i - R
        if o >= ya:
            n = o * W + x
            m2d = pmask[:, None] & cmask[None, :]
            if STORE == Z_AND_Y:
                tl.store(y_img + co[None, :] * N + n[:, None], stored(a0, y_img, EMULATE_DOTS), mask=m2d)
            z = mm(a0, w, zt, DOT_PRECISION, EMULATE_DOTS)
            if STORE:
                _store_pair_z(z_seg, z, n, pmask, N, S, EMULATE_DOTS)
            if STORE != Z_ONLY:
                shift, mean, m2 = _fold_tile(z, pmask, count == 0, count, n_tile, shift, mean, m2)
                count += n_tile
        a0, a1, a2, a3, a4, a5, a6 = rows_shift(a0, a1, a2, a3, a4, a5, a6, KS)
        i += 1
    return shift, mean, m2, count


@triton.jit
def _segment_walks(src, dw, pw_seg, t0, t1, N, H, W, stride_n, z_seg, y_img, shift, mean, m2, count,
                   KS: tl.constexpr, S: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   EMULATE_DOTS: tl.constexpr, STORE: tl.constexpr):
    """The program's run of row tiles [t0, t1) of a KS x KS segment, one walk per piece of strip it
    covers (`_walk_statistics`; a run crossing into the next strip is two pieces)."""
    t = t0
    while t < t1:
        strip, ya, yb = rows_piece(t, t1, H)
        shift, mean, m2, count = _walk_statistics(src, dw, pw_seg, strip, ya, yb, N, H, W, stride_n, z_seg, y_img,
                                                  shift, mean, m2, count, KS, S, BLOCK_P, DOT_PRECISION,
                                                  EMULATE_DOTS, STORE)
        t += yb - ya
    return shift, mean, m2, count


@triton.jit
def _statistics_rows(qkv_b, ch0, part_mean, part_m2, dw3, dw5, dw7, pw, seg, t0, t1, row, N, H, W, stride_n,
                     z_seg, y_img, S: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     EMULATE_DOTS: tl.constexpr, STORE: tl.constexpr):
    """`gma_statistics_kernel`'s program with ROWS (and PAIR's [BLOCK_P, S] tiles): tiles are rows of
    BLOCK_P-column strips (`aggregation._tile` with ROWS); segment 0 reads them, segments 1-3 walk them
    (`_segment_walks`, an instance per window: the walk unrolls its KS column shifts). The moments fold
    per output row, a row holding min(BLOCK_P, W - strip BLOCK_P) tokens (the count is carried, not
    derived from the tile index as the flat tiles' is).

    Why (compiler figures of the aggregation's walk, docs/performance.md "Row walks", not a timing): the
    tile kernel's stencil loads each input element KS x KS times, a tap at a time, with its address and
    mask arithmetic per tap; a walk loads it KS times (its column shifts, independent loads issued
    together) into KS rolling accumulators. One stream here (a program is one image of q, k or v), so KS
    accumulator tiles, where the aggregation's k/v walk holds 2 KS."""
    cc = tl.arange(0, S)
    shift = tl.zeros([S], dtype=tl.float32)
    mean = tl.zeros([S], dtype=tl.float32)
    m2 = tl.zeros([S], dtype=tl.float32)
    count = (t0 * 0).to(tl.float32)
    src = qkv_b + ch0
    if seg == 0:
        if STORE != Z_ONLY:   # Z_ONLY: segment 0's Z is qkv itself, read by the aggregation
            t = t0
            while t < t1:
                n, pmask, y, x = _tile(t, N, H, W, W, BLOCK_P, True)
                z = tl.load(src + n[:, None] * stride_n + cc[None, :], mask=pmask[:, None],
                            other=0.0).to(tl.float32)
                if STORE:
                    _store_pair_z(z_seg, z, n, pmask, N, S, EMULATE_DOTS)
                n_tile = tl.minimum(W - (t // H) * BLOCK_P, BLOCK_P).to(tl.float32)
                shift, mean, m2 = _fold_tile(z, pmask, t == t0, count, n_tile, shift, mean, m2)
                count += n_tile
                t += 1
    elif seg == 1:
        shift, mean, m2, count = _segment_walks(src, dw3, pw, t0, t1, N, H, W, stride_n, z_seg, y_img, shift, mean,
                                                m2, count, 3, S, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, STORE)
    elif seg == 2:
        shift, mean, m2, count = _segment_walks(src, dw5, pw + S * S, t0, t1, N, H, W, stride_n, z_seg, y_img,
                                                shift, mean, m2, count, 5, S, BLOCK_P, DOT_PRECISION, EMULATE_DOTS,
                                                STORE)
    else:
        shift, mean, m2, count = _segment_walks(src, dw7, pw + 2 * S * S, t0, t1, N, H, W, stride_n, z_seg, y_img,
                                                shift, mean, m2, count, 7, S, BLOCK_P, DOT_PRECISION, EMULATE_DOTS,
                                                STORE)
    if STORE != Z_ONLY:
        _store_moments(shift, mean, m2, row, cc, cc < S, part_mean, part_m2)


@triton.jit(do_not_specialize=["N", "H", "W", "SW", "splits0", "splits1", "splits2", "splits3"])
def gma_statistics_kernel(
    qkv, part_mean, part_m2, z, y_all, dw3, dw5, dw7, pw,
    N, H, W, SW, stride_qkv_b, stride_qkv_n, splits0, splits1, splits2, splits3,
    C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CK: tl.constexpr,
    BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PAIR: tl.constexpr = False,
    STORE: tl.constexpr = False, ROWS: tl.constexpr = False,
):
    """Partial (mean, M2) of segment `seg` of image `img` (module docstring). A segment is two
    heads of D channels (the shapes `_dw_pw_heads` returns); segment 0 reads its two heads.
    PAIR (`training_pair`: S a power of two, tensor-core dots, not where it spilled): the two heads as one
    [BLOCK_P, S] tensor (`aggregation._dw_pw_seg`; one fold of S channels per tile instead of two of D_PAD).
    STORE ("Planes kept for the backward", module docstring): Z and the depthwise outputs also stored, as
    the recompute kernel stores them, into z (3B, 4s, H, W) and y_all (3, 3B, s, H, W) (the stage dtype);
    without STORE those two arguments are placeholders, never read or written. STORE = `Z_ONLY` (the eval
    forward's Z pass, "The Z pass of the split forward" in the module docstring): Z of segments 1-3 only,
    no moments, no y, no segment 0 (part_mean, part_m2 and y_all are then placeholders too). ROWS (with PAIR; the
    "triton.statistics" family's ROWS knob, `STATS_ROWS_TILES`): the program's tiles are rows of
    BLOCK_P-column strips and segments 1-3 walk them (`_statistics_rows`)."""
    pid, seg, img, t0, t1, qkv_b, ch0 = _program(qkv, N, H, W, stride_qkv_b, splits0, splits1, splits2, splits3,
                                                 C, S, BLOCK_P, ROWS)
    row = (img * tl.num_programs(0) + pid).to(tl.int64) * S    # row pid of image img, the segment's s channels
    z_seg = z + (img.to(tl.int64) * (4 * S * N) + seg * S * N)                          # channel seg * s of image img
    y_img = y_all + ((tl.maximum(seg - 1, 0) * tl.num_programs(1) + img).to(tl.int64) * (S * N))   # of y_seg
    if ROWS:
        _statistics_rows(qkv_b, ch0, part_mean, part_m2, dw3, dw5, dw7, pw, seg, t0, t1, row, N, H, W,
                         stride_qkv_n, z_seg, y_img, S, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, STORE)
    elif PAIR:
        _statistics_pair(qkv_b, ch0, part_mean, part_m2, dw3, dw5, dw7, pw, seg, t0, t1, row, N, H, W, SW,
                         stride_qkv_n, z_seg, y_img, S, CK, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, STORE)
    else:
        kk = tl.arange(0, D_PAD)
        kmask = kk < D
        shift0 = tl.zeros([D_PAD], dtype=tl.float32)
        mean0 = tl.zeros([D_PAD], dtype=tl.float32)
        m2_0 = tl.zeros([D_PAD], dtype=tl.float32)
        shift1 = tl.zeros([D_PAD], dtype=tl.float32)
        mean1 = tl.zeros([D_PAD], dtype=tl.float32)
        m2_1 = tl.zeros([D_PAD], dtype=tl.float32)
        if seg == 0:
            if STORE != Z_ONLY:   # Z_ONLY: segment 0's Z is qkv itself, read by the aggregation
                t = t0
                while t < t1:
                    n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
                    z0, z1 = _segment0_heads(qkv_b, ch0, n, pmask, stride_qkv_n, D, D_PAD)
                    if STORE:
                        _store_heads_z(z_seg, z0, z1, n, pmask, N, D, D_PAD, EMULATE_DOTS)
                    n_prev, n_tile = _tile_counts(t, t0, N, BLOCK_P)
                    shift0, mean0, m2_0 = _fold_tile(z0, pmask, t == t0, n_prev, n_tile, shift0, mean0, m2_0)
                    shift1, mean1, m2_1 = _fold_tile(z1, pmask, t == t0, n_prev, n_tile, shift1, mean1, m2_1)
                    t += 1
        else:
            dw, pw_seg = _segment_filters(seg, dw3, dw5, dw7, pw, S)
            t = t0
            while t < t1:
                n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
                z0, z1 = _dw_pw_heads(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_qkv_n, 2 * seg + 1,
                                      S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, y_img, N,
                                      STORE == Z_AND_Y)
                if STORE:
                    _store_heads_z(z_seg, z0, z1, n, pmask, N, D, D_PAD, EMULATE_DOTS)
                if STORE != Z_ONLY:
                    n_prev, n_tile = _tile_counts(t, t0, N, BLOCK_P)
                    shift0, mean0, m2_0 = _fold_tile(z0, pmask, t == t0, n_prev, n_tile, shift0, mean0, m2_0)
                    shift1, mean1, m2_1 = _fold_tile(z1, pmask, t == t0, n_prev, n_tile, shift1, mean1, m2_1)
                t += 1
        if STORE != Z_ONLY:
            _store_moments(shift0, mean0, m2_0, row, kk, kmask, part_mean, part_m2)
            _store_moments(shift1, mean1, m2_1, row, D + kk, kmask, part_mean, part_m2)


@triton.jit
def _store_z_p(z_seg, p_seg, z0, z1, a0, b0, a1, b1, n, pmask, N, with_p, D: tl.constexpr, D_PAD: tl.constexpr,
               EMULATE: tl.constexpr):
    """A tile's two heads of Z and, with_p (the v images), of P = hardswish(Z a + b) (both from
    the fp32 Z) into their channel-first images."""
    kk = tl.arange(0, D_PAD)
    m2d = pmask[:, None] & (kk < D)[None, :]
    _store_heads_z(z_seg, z0, z1, n, pmask, N, D, D_PAD, EMULATE)
    if with_p:
        _store_channels(p_seg, kk, n, hardswish(z0 * a0 + b0), m2d, N, EMULATE)
        _store_channels(p_seg, D + kk, n, hardswish(z1 * a1 + b1), m2d, N, EMULATE)


@triton.jit
def _store_z_p_pair(z_seg, p_seg, z, a, b, n, pmask, N, with_p, S: tl.constexpr, EMULATE: tl.constexpr):
    """`_store_z_p` of a segment's S channels as one [BLOCK_P, S] tile (PAIR)."""
    _store_pair_z(z_seg, z, n, pmask, N, S, EMULATE)
    if with_p:
        cc = tl.arange(0, S)
        _store_channels(p_seg, cc, n, hardswish(z * a + b), pmask[:, None] & (cc < S)[None, :], N, EMULATE)


@triton.jit(do_not_specialize=["N", "H", "W", "SW", "splits0", "splits1", "splits2", "splits3"])
def gma_recompute_z_kernel(
    qkv, z, pv, y_all, bn_scale, bn_shift, dw3, dw5, dw7, pw,
    N, H, W, SW, stride_qkv_b, stride_qkv_n, splits0, splits1, splits2, splits3,
    C: tl.constexpr, S: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CK: tl.constexpr,
    BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PAIR: tl.constexpr = False,
):
    """Segment `seg` of Z, of the v images' proxies P = hardswish(Z * bn_scale + bn_shift) and, seg >=
    1, of the depthwise output y_seg, for the tiles of program (split, seg, img):
    in the stage dtype (the buffers'), channel-first, z (3B, 4s, H, W), pv (B, 4s, H, W) (images
    2B.. of P: the readers of q's and k's proxies take them from Z), y_all (3, 3B, s, H, W) (module
    docstring, "Recompute"). Segment 0 is qkv's segment 0 (it is its own u_0). PAIR (`training_pair`):
    the segment's two heads as one [BLOCK_P, S] tile (`aggregation._dw_pw_seg`, `_store_z_p_pair`)."""
    _, seg, img, t0, t1, qkv_b, ch0 = _program(qkv, N, H, W, stride_qkv_b, splits0, splits1, splits2, splits3,
                                               C, S, BLOCK_P)
    plane = img.to(tl.int64) * (4 * S * N) + seg * S * N               # channel seg * s of image img
    z_seg = z + plane
    v0 = 2 * (tl.num_programs(1) // 3)                                 # the first v image
    with_p = img >= v0
    p_seg = pv + (tl.maximum(img - v0, 0).to(tl.int64) * (4 * S * N) + seg * S * N)
    if PAIR:        # the two heads as one [BLOCK_P, S] tile (`config.pair_applies`, `aggregation._dw_pw_seg`)
        cc = tl.arange(0, S)
        a = tl.load(bn_scale + seg * S + cc)[None, :]
        b = tl.load(bn_shift + seg * S + cc)[None, :]
        if seg == 0:
            t = t0
            while t < t1:
                n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
                zt = tl.load(qkv_b + n[:, None] * stride_qkv_n + (ch0 + cc)[None, :], mask=pmask[:, None],
                             other=0.0).to(tl.float32)
                _store_z_p_pair(z_seg, p_seg, zt, a, b, n, pmask, N, with_p, S, EMULATE_DOTS)
                t += 1
        else:
            dw, pw_seg = _segment_filters(seg, dw3, dw5, dw7, pw, S)
            y_img = y_all + ((seg - 1) * tl.num_programs(1) + img).to(tl.int64) * (S * N)   # image img of y_seg
            t = t0
            while t < t1:
                n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
                zt = _dw_pw_seg(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_qkv_n, 2 * seg + 1, S, CK,
                                BLOCK_P, DOT_PRECISION, EMULATE_DOTS, y_img, N, True)
                _store_z_p_pair(z_seg, p_seg, zt, a, b, n, pmask, N, with_p, S, EMULATE_DOTS)
                t += 1
    else:
        kk = tl.arange(0, D_PAD)
        kmask = kk < D
        a0 = tl.load(bn_scale + seg * S + kk, mask=kmask, other=0.0)[None, :]
        a1 = tl.load(bn_scale + seg * S + D + kk, mask=kmask, other=0.0)[None, :]
        b0 = tl.load(bn_shift + seg * S + kk, mask=kmask, other=0.0)[None, :]
        b1 = tl.load(bn_shift + seg * S + D + kk, mask=kmask, other=0.0)[None, :]
        if seg == 0:
            t = t0
            while t < t1:
                n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
                z0, z1 = _segment0_heads(qkv_b, ch0, n, pmask, stride_qkv_n, D, D_PAD)
                _store_z_p(z_seg, p_seg, z0, z1, a0, b0, a1, b1, n, pmask, N, with_p, D, D_PAD, EMULATE_DOTS)
                t += 1
        else:
            dw, pw_seg = _segment_filters(seg, dw3, dw5, dw7, pw, S)
            img_j = ((seg - 1) * tl.num_programs(1) + img).to(tl.int64) * (S * N)   # image img of y_seg
            y_img = y_all + img_j
            t = t0
            while t < t1:
                n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
                z0, z1 = _dw_pw_heads(qkv_b, ch0, dw, pw_seg, n, y, x, pmask, H, W, stride_qkv_n, 2 * seg + 1,
                                      S, D, CK, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, y_img, N, True)
                _store_z_p(z_seg, p_seg, z0, z1, a0, b0, a1, b1, n, pmask, N, with_p, D, D_PAD, EMULATE_DOTS)
                t += 1


# ---------------------------------------------------------------- launcher
#: GPU tiles per width C: (BLOCK_P tokens per tile, num_warps, CK channels per depthwise chunk),
#: by dot precision where needed, else DEFAULT_TILE. Chosen with the AOT compile (ptxas -v of the
#: launcher's specialisation; registers per thread; no GPU here, so nothing is timed). C = 320 at
#: 14x14 B = 128, fp32, sm_80 / sm_90: (64, 8, 16) 219-247 / 128, (32, 4, 16) 245 / 237, (64, 4, 16)
#: 243 / 152, (128, 8, 16) 247 / 195, (64, 8, 32) 255 / 199, (128, 16, 16) spills 544 B on sm_80
#: (CK = 32 keeps sm_80 at 255); (64, 8, 16) gives the most warps per SM. At D_PAD = 64 (C = 360,
#: 480) (64, 8, 16) spilled 584 / 384 B on sm_80, (32, 8, 16) takes ~100 registers on both. With
#: FMA dots ("ieee": sm_70/75) (64, 8, 16) spilled 4 B at C = 200 on sm_70, (32, 8, 16) takes 128.
#: With these tables all 64 specialisations of the released models' real calls (their stage
#: widths at the 224x224 stage grids, batch 128 and 1, fp32 and fp16) compile spill-free for
#: sm_70/75/80/90 (most registers: 253, C = 200 on sm_80). The register counts moved (219 <-> 247
#: at C = 320 on sm_80) while `aggregation._dw_pw_heads` was being reworked by other work:
#: tests/test_triton_statistics.py re-checks C = 320.
#: Since the kernel also stores Z and y in a training step with a backward (STORE, 2026-12-05; the
#: variant the GPU warm-up compiles and the tuner times), the same AOT sweep of STORE at every released
#: width, fp16 and fp32, batch 128 (sm_70/75/80/90): (64, 8, 16) spilled 80-84 B at C = 160 on sm_80
#: (ptxas stopping at 128 registers) and 92-104 B on sm_70/75, (32, 8, 16) 112 B at C = 360 fp32 on
#: sm_80, 16 B at C = 80 on sm_80 and 72-116 B at C = 200..320 on sm_70/75; (16, 4, 16) none anywhere
#: (64-168 registers). Elsewhere (64, 8, 16) takes 73-255 on sm_80/90 without a spill. At C = 160 with
#: PAIR (which the statistics kernel takes with STORE too; the recompute's PAIR_TRAINING_OFF entry is the
#: recompute's): (16, 4, 16) spilled 16-28 B on sm_80 (at 80 registers), (64, 8, 16) 88-104 B, (32, 8, 16)
#: and (32, 4, 16) none on sm_80/90 (127-168): (32, 4, 16). Without STORE (no_grad in training mode)
#: every tile here holds fewer registers.
STATS_TILES = {160: (32, 4, 16), 360: (16, 4, 16), 480: (16, 4, 16)}
#: ... and, per dot precision, the tile of every width (sm_70/75's FMA dots)
STATS_TILE_BY_DOTS = {"ieee": (16, 4, 16)}
DEFAULT_TILE = (64, 8, 16)
#: split-N: aim for about this many programs in all (`_grid_plan`)
SPLIT_TARGET = 1024


def stats_tiles(C: int, N: int, precision: str) -> Tuple[int, int, int, int]:
    """(BLOCK_P, num_warps, CK, ROWS) of a call with dots of this precision: one large tile and one
    channel chunk under the interpreter (its cost is per operation, not per element; ROWS 0), else
    `gpu_stats_tiles`."""
    if interpreting():
        return min(INTERPRETER_BLOCK_P, max(16, next_pow2(N))), 4, dot_pad(C // 5), 0
    return gpu_stats_tiles(C, precision)


def gpu_stats_tiles(C: int, precision: str) -> Tuple[int, int, int, int]:
    """The GPU tile of the statistics pass (the default of the "triton.statistics" tuning family,
    `tile_spaces`): the row walk of `STATS_ROWS_DEFAULT` where it applies (`rows_applies`), else the tile
    kernel's (`tile_kernel_stats_tiles`)."""
    walk = STATS_ROWS_DEFAULT.get(C // 5) if rows_applies(C, precision) else None
    if walk:
        return walk[0], walk[1], dot_pad(C // 5), 1
    return tile_kernel_stats_tiles(C, precision)


def tile_kernel_stats_tiles(C: int, precision: str) -> Tuple[int, int, int, int]:
    """The tile kernel's GPU tile: `STATS_TILE_BY_DOTS` / `STATS_TILES` / `DEFAULT_TILE`, ROWS 0."""
    bp, warps, ck = STATS_TILE_BY_DOTS.get(precision) or STATS_TILES.get(C, DEFAULT_TILE)
    return bp, warps, min(ck, dot_pad(C // 5)), 0


def stats_candidates(C: int, precision: str) -> List[Tuple[int, int, int, int]]:
    """The "triton.statistics" family's tiles beyond its default: the row walks first where they apply
    (`rows_applies`; `STATS_ROWS_TILES` of the segment width), the tile kernel's default tile, then its
    `STATS_SEARCH` (the default, where it recurs, is dropped by `register_tiles`)."""
    rows = [(bp, warps, dot_pad(C // 5), 1) for bp, warps in STATS_ROWS_TILES.get(C // 5, ())] \
        if rows_applies(C, precision) else []
    return rows + [tile_kernel_stats_tiles(C, precision)] + [t + (0,) for t in STATS_SEARCH]


def rows_applies(C: int, precision: str) -> bool:
    """Can the statistics pass walk rows (ROWS) at width C with dots of this precision? Where its tiles
    are PAIR's (`training_pair`: s a power of two, tensor-core dots): the walk's [BLOCK_P, s] tiles."""
    return training_pair(C, precision, False)


#: GPU tile of the recompute kernel: (32, 8, 16), and (16, 4, 16) with FMA dots ("ieee": sm_70/75).
#: AOT compile (ptxas -v) of every real call it serves (the released models' widths whose backward
#: runs the kernels, `config.backward_kernels_take`: C = 40..320 here, at their 224x224 stage
#: grids, batch 128 and 1, sm_70/75/80/90; benchmarks/results/triton_statistics_resources_*.md):
#: no spills. How they were found (while the kernel also stored copies of u_1..3, since dropped):
#: with those stores in a loop of their own after the Z / P stores, (32, 8, 16), (32, 4, 16) and
#: (16, 4, 16) spilled 8-40 B (e.g. C = 320 fp32 on sm_70 at 168 registers); stored in
#: `_dw_pw_heads`' chunk loop next to y_j, (16, 4, 16) still spilled 32 B on sm_90 (C = 200 fp16
#: 56x56, ptxas stopping at 96 registers), (32, 8, 16) none on sm_80/90 but 100-108 B on sm_70/75
#: (C = 200, 240, stopping at 128), where (16, 4, 16) took 80-168 and none. Before P and u:
#: (32, 4, 16) spilled 8-48 B at C = 240/320 on sm_70/75, (128, 8, 16) 12 B at C = 200 on sm_70;
#: the statistics tile (64, 8, 16) 104 B at C = 320 on sm_80.
#: One-pass TF32 ("tf32": fp16/bf16 layers, `backward_dots`; 2026-12-02, the fp16 and bf16 real
#: calls on sm_80/90, registers sm_80 / sm_90): (32, 8, 16) spilled 12-320 B at C = 80..480 (ptxas
#: stopping at 128), (16, 8, 16) 16-112 B, (32, 4, 16) 48 B at C = 200 on sm_90, (64, 4, 16) up to
#: 1.5 KB at S_PAD 128; (64, 8, 16) none at C <= 320 (at most 232 / 184), but 204-332 B at S_PAD
#: 128 on sm_80, where (16, 4, 16) takes 150-156 / 128 and none (so does (32, 4, 16): 230-238).
RECOMPUTE_TILE_BY_DOTS = {"ieee": (16, 4, 16), "tf32": (64, 8, 16)}
RECOMPUTE_TILE = (32, 8, 16)
#: ... and at S_PAD 128 (C = 360, 480; their backward kernels run on sm_80+ only,
#: `config.BACKWARD_KERNELS_MAX_S_PAD`): (16, 8, 16), 125-128 registers, no spill on sm_80/90;
#: (32, 8, 16) spilled 60-88 B on sm_90 (ptxas stopping at 128), (32, 4, 16) 52-60 B at C = 480,
#: (16, 4, 16) none at 157-198. One-pass TF32: above.
RECOMPUTE_TILE_WIDE = (16, 8, 16)
RECOMPUTE_TILE_WIDE_BY_DOTS = {"tf32": (16, 4, 16)}


def recompute_tiles(C: int, N: int, precision: str) -> Tuple[int, int, int]:
    """(BLOCK_P, num_warps, CK) of a recompute call: the interpreter's as `stats_tiles`, else
    `RECOMPUTE_TILE_BY_DOTS` / `RECOMPUTE_TILE` (S_PAD 128: `RECOMPUTE_TILE_WIDE_BY_DOTS` /
    `RECOMPUTE_TILE_WIDE`)."""
    if interpreting():
        return stats_tiles(C, N, precision)[:3]
    return gpu_recompute_tiles(C, precision)


def gpu_recompute_tiles(C: int, precision: str) -> Tuple[int, int, int]:
    """The GPU tile of the recompute kernel (the default of the "triton.recompute_z" tuning family)."""
    if dot_pad(C // 5) >= 128:
        bp, warps, ck = RECOMPUTE_TILE_WIDE_BY_DOTS.get(precision, RECOMPUTE_TILE_WIDE)
    else:
        bp, warps, ck = RECOMPUTE_TILE_BY_DOTS.get(precision, RECOMPUTE_TILE)
    return bp, warps, min(ck, dot_pad(C // 5))


#: Further tiles the tuner tries ("triton.statistics", "triton.recompute_z"; benchmarks/tune.py
#: --train refuses one that spills at the call's width). AOT sweep of the candidates (2026-12-02, `specializations.candidate_specializations`: GroupMixFormer-S's real calls at batch 128, fp32 and bf16, sm_90): the statistics kernel none spilled (at
#: most 222 registers); the recompute kernel spilled with (64, 4, 16) (192-256 B at C = 320),
#: (16, 8, 16) (32 B) and (32, 8, 16) (328 B, C = 320 bf16: the fp32 default, kept), so those two
#: are not in its list.
STATS_SEARCH = ((32, 8, 16), (64, 8, 16), (16, 4, 16), (32, 4, 16), (64, 4, 16), (16, 8, 16))
RECOMPUTE_SEARCH = ((32, 8, 16), (64, 8, 16), (16, 4, 16), (32, 4, 16))
#: Row-walk tiles of the statistics pass (ROWS, `_statistics_rows`; tuning candidates, and the default at
#: s = 64, `STATS_ROWS_DEFAULT`: no GPU has timed them), per segment width s: (BLOCK_P columns per strip,
#: num_warps). AOT compile with
#: STORE (GroupMixFormer-S's widths at batch 128, fp16 and fp32 inputs, sm_80 / sm_90; ptxas registers):
#: s = 16 (16, 4) 128 / 128, (16, 2) 168 / 142-143 with 8 B spilled on sm_80 at fp32 (the tuner refuses it
#: there); s = 32 (16, 4) 168-194 / 144-146, (32, 8) 254-255 / 255; s = 64 (16, 8) 255 / 178-184, none
#: spilling. Left out for spills: (32, 4) at s = 16 (8 B, sm_80 fp16) and s = 32 (40-144 B), (16, 4) at
#: s = 64 (24-148 B), (16, 2) at s = 32 (44-144 B), (32, 8) at s = 64 (16-88 B); (32, 8) at s = 16 takes 171-190
#: registers with 8 warps (one CTA per SM).
STATS_ROWS_TILES = {16: ((16, 4), (16, 2)), 32: ((16, 4), (32, 8)), 64: ((16, 8),)}
#: ... and the GPU default where it is a row walk, by s (2026-12-05, not timed): s = 64 (C = 320), where the
#: walk (16, 8) runs at the tile kernel's occupancy (one CTA of 8 warps per SM: 255 / 178-184 registers on
#: sm_80 / sm_90 against the tile kernel's (64, 8) 253-255 / 190-200, with STORE) and issues 1006 warp
#: instructions per token against 2486 (sm_90 SASS, fp16 inputs). At s = 16 and 32 the walk holds more
#: registers than the tile kernel (fewer warps per SM: 24 -> 16, 16 -> 12) and stays a candidate.
STATS_ROWS_DEFAULT = {64: (16, 8)}
STATS_FAMILY = "triton.statistics"
RECOMPUTE_Z_FAMILY = "triton.recompute_z"


def statistics_dots(qkv: Tensor) -> DotVariant:
    """The dot variant of fp32 inputs on qkv's device (module docstring: fp32 statistics)."""
    return dot_variant(qkv.new_empty(0, dtype=torch.float32))


def backward_dots(qkv: Tensor) -> DotVariant:
    """The dot variant of the backward, recompute and backward kernels alike, for a layer whose
    input is qkv: the forward's, i.e. that of qkv's own dtype on its device (`config.ARCH_DOTS`:
    3xTF32 for fp32 and one-pass TF32 for fp16/bf16 on sm_80+, fp32 FMAs on sm_70/75), although
    the stage tensors those kernels read are fp32. So an fp16/bf16 layer's backward differentiates
    the Z its forward computed (one TF32 pass) with one TF32 pass per product, not three: a third
    of the tensor-core instructions and no hi/lo operand splits (registers: the backward resource
    table). Its error, ~2^-11 relative per product, is below fp16's own rounding and an eighth of
    bf16's (tests/test_triton_training.py: within 2x an fp16/bf16 reference's error). (With a tuning
    table that picks the forward's DOTS16 candidates, `config.operand_precision`, the forward's dots
    take fp16/bf16 operands instead; the backward stays one TF32 pass, i.e. it differentiates the
    TF32 forward, which differs from the one run by the rounding of the input's own type.)"""
    return dot_variant(qkv)


class SegmentPlan(NamedTuple):
    """Programs per image of the two kernels: ``splits[j]`` runs of ``ceil(tiles / splits[j])``
    consecutive tiles for segment j (0..3), in proportion to its cost per tile (`segment_costs`).
    row_w: 0 for tiles of BLOCK_P consecutive tokens (every one full but an image's last), else the
    image's width W, the tiles being rows of BLOCK_P-column strips (the statistics pass's ROWS,
    `aggregation._tile`: tile t is row t % H of strip t // H, min(BLOCK_P, W - strip BLOCK_P) tokens)."""
    tiles: int                      # T = ceil(N / BLOCK_P), or ceil(W / BLOCK_P) H with row_w = W
    splits: Tuple[int, int, int, int]
    row_w: int = 0

    @property
    def programs(self) -> int:
        """Programs per image (the grid's first dimension; one partial row each)."""
        return sum(self.splits)

    def rows(self, seg: int) -> Tuple[int, int]:
        """The programs (partial rows) [first, last) of segment seg within an image."""
        e = sum(self.splits[:seg])
        return e, e + self.splits[seg]

    def counts(self, seg: int, block_p: int, N: int) -> List[int]:
        """Tokens of each run of segment seg (every run non-empty: `_balanced_splits`)."""
        if self.row_w:
            per_tile = self.tile_tokens(block_p, N)
            tps = -(-self.tiles // self.splits[seg])
            return [sum(per_tile[k * tps:(k + 1) * tps]) for k in range(self.splits[seg])]
        tps = -(-self.tiles // self.splits[seg]) * block_p
        return [min(tps, N - k * tps) for k in range(self.splits[seg])]

    def tile_tokens(self, block_p: int, N: int) -> List[int]:
        """Tokens of each tile of an image (row tiles: their strip's width)."""
        if self.row_w:
            H = N // self.row_w
            return [min(block_p, self.row_w - (t // H) * block_p) for t in range(self.tiles)]
        return [min(block_p, N - t * block_p) for t in range(self.tiles)]

    def row_weights(self, block_p: int, N: int, device, dtype=torch.float64) -> Tuple[Tensor, Tensor]:
        """What `merge_segments` weighs an image's R partial rows with: (counts, member), both (4, R) in
        `dtype` on `device`: counts[j, r] the tokens of program r's run if r is one of segment j's
        programs (`counts`), else 0; member[j, r] 1 there, else 0.

        Kept on the host (`_host_row_weights`: per (plan, tile, N), in pinned memory where CUDA is) and
        copied to the device each call, asynchronously (one copy: no wait for the GPU's queue, which a
        pageable copy would make). No device tensor is kept between calls: a kept one would be baked
        into a CUDA graph that captured a call and could be freed under it, or sit in a graph's private
        memory pool. While a CUDA graph is being captured they are made on the device by tensor ops
        instead (`_row_weights_on`: a copy from host memory would be replayed from memory that may
        change)."""
        device = torch.device(device)
        if device.type == "cuda":
            from ..folding import capturing
            if capturing():
                return self._row_weights_on(block_p, N, device, dtype)
        w = _host_row_weights(self, block_p, N).to(device, non_blocking=True).to(dtype)
        return w[0], w[1]

    def _row_weights_on(self, block_p: int, N: int, device, dtype) -> Tuple[Tensor, Tensor]:
        """`row_weights` made on `device` by tensor ops."""
        r = torch.arange(self.programs, device=device)
        counts, member = [], []
        if self.row_w:   # tokens before each tile boundary, from the strips' widths
            t = torch.arange(self.tiles, device=device)
            per_tile = (self.row_w - (t // (N // self.row_w)) * block_p).clamp(max=block_p)
            before = torch.cat([per_tile.new_zeros(1), per_tile.cumsum(0)])
        for j in range(4):
            first, last = self.rows(j)
            tps = -(-self.tiles // self.splits[j])
            inside = (r >= first) & (r < last)
            member.append(inside.to(dtype))
            if self.row_w:
                k = (r - first).clamp(0, self.splits[j] - 1)
                run = before[((k + 1) * tps).clamp(max=self.tiles)] - before[(k * tps).clamp(max=self.tiles)]
                counts.append(torch.where(inside, run, 0).to(dtype))
            else:
                tps *= block_p
                counts.append(torch.where(inside, (N - (r - first) * tps).clamp(max=tps), 0).to(dtype))
        return torch.stack(counts), torch.stack(member)


@functools.lru_cache(maxsize=None)
def _host_row_weights(plan: SegmentPlan, block_p: int, N: int) -> Tensor:
    """`SegmentPlan.row_weights` as one (2, 4, R) float64 host tensor [counts, member], pinned when CUDA
    is available; never changed once made (a few KB per layer shape and batch). Checks that every run
    holds tokens and that each segment's runs cover the N tokens of an image (`merge_segments` divides
    by I N)."""
    w = torch.zeros(2, 4, plan.programs, dtype=torch.float64)
    for j in range(4):
        first, last = plan.rows(j)
        counts = plan.counts(j, block_p, N)
        if min(counts) <= 0 or sum(counts) != N:
            raise ValueError(f"segment {j} of {plan}: runs of {counts} tokens for N = {N} (every run must hold "
                             "tokens and the runs cover N)")
        w[0, j, first:last] = torch.tensor(counts, dtype=torch.float64)
        w[1, j, first:last] = 1.0
    return w.pin_memory() if torch.cuda.is_available() else w


def segment_costs(C: int, tiles: Tuple[int, ...], precision: str, recompute: bool,
                  store=False) -> Tuple[float, ...]:
    """Estimated cost of one tile (BLOCK_P tokens of one of the 3B images) of each segment, in taps
    (`aggregation.TAP_COST` and the other weights of its one cost model), as the kernels issue
    the work (padded widths; Sc = ceil(s / CK) CK, Dp = D_PAD): segment 0 loads its two heads
    (2 Dp elements; with PAIR, `training_pair`, Dp = d: one s-wide tile), segment j = 1..3 runs Sc
    (2j+1)^2 taps and the s x s pointwise into two heads (Sc 2 Dp multiply-adds); then per head pair the statistics kernel folds the moments
    (~2 Dp elements), the recompute kernel stores Z and P (4 Dp; P of the v images only, counted for every image: one plan
    serves all) and, j >= 1, y_j (Sc stores). With ROWS (tiles[3]; tiles of BLOCK_P columns of one row)
    a token of segment j costs s (2j+1) loads (its input row's column shifts) and s (2j+1)^2
    multiply-adds at `aggregation.FMA_COST` instead of its taps (`aggregation_job_costs`' walk, one stream).
    store `STORE_Z_ONLY` (the split forward's Z pass, `plan_z_pass`): segment 0 costs nothing (its programs
    return at once), segments 1-3 store Z and nothing else."""
    from .aggregation import DOT_MAC_COST, ELEMENT_COST, FMA_COST, TAP_COST
    bp, _, ck = tiles[:3]
    rows = len(tiles) > 3 and bool(tiles[3])
    s = C // 5
    dp = s // 2 if training_pair(C, precision, recompute) else dot_pad(s // 2)     # PAIR: no padding column
    sc = -(-s // ck) * ck
    dot = DOT_MAC_COST[precision]
    z_only = store == STORE_Z_ONLY
    if z_only:    # the split forward's Z pass: Z of segments 1-3 stored, nothing of segment 0, no moments, no y
        tail, ys, per_token = 2 * dp, 0, [0.0]
    else:
        tail = 4 * dp if recompute or store else 2 * dp   # store: the moments and Z (the recompute: Z and P)
        ys = sc if recompute or store in (True, 1) else 0  # y, but where the forward keeps Z alone (STORE_Z_MOMENTS)
        per_token = [(2 * dp + tail) * ELEMENT_COST]
    for j in (1, 2, 3):
        ks = 2 * j + 1
        stencil = s * (ks * TAP_COST + ks * ks * FMA_COST) if rows else sc * ks * ks * TAP_COST
        per_token.append(stencil + sc * 2 * dp * dot + (tail + ys) * ELEMENT_COST)
    return tuple(bp * c for c in per_token)


#: Both kernels take a segment's two heads as one [BLOCK_P, s] tile where s is a power of two (C = 80, 160,
#: 320: `config.pair_applies`; the kernels' PAIR) and the dots are tensor-core ones (sm_80+): one pointwise
#: dot per depthwise chunk instead of two sibling dots, which Triton 3.6 puts on the same rows of several
#: warps (`aggregation._segment_pair`), no padding column (C = 80: d = 8 in 16-wide head tiles), one moment
#: fold per tile instead of two. sm_90 SASS (batch 128): the statistics kernel's instructions -7 % to -29 %
#: and its barriers halved, registers 57-128 (from 78-126); the recompute's barriers halved, its
#: instructions +0.5 % to -20 % (C = 320 fp32: 233 -> 110 registers). Off
#: (`PAIR_TRAINING_OFF`) where it spilled (ptxas, 2026-12-05) or is unsafe, and with sm_70/75's FMA dots (the
#: statistics kernel spilled 12-36 B at C = 160, the recompute
#: 20-32 B at C = 320 on sm_75). Correct against float64 under the interpreter (tests/test_triton_statistics.py,
#: test_triton_recompute.py); not timed. False: the per-head form everywhere (the tests compare the two).
PAIR_TRAINING = True
#: (recompute kernel?, dot precision, s) where PAIR stays off (`training_pair`): the recompute of fp32 layers
#: (3xTF32) at s = 32, where it spilled 80-84 B on sm_80 and sm_90. (3xTF32 at s = 64 -- the statistics pass of
#: every dtype at C = 320, whose dots are fp32's -- stays on: Triton 3.6's miscompile at that width on sm_90
#: (`config.DOT_OVERRIDES`, benchmarks/results/gpu_report_h200_20261204/followup.md) took two 3xTF32 dots
#: sharing an operand in one loop; a single accumulating dot per iteration, as PAIR's `_dw_pw_seg` issues,
#: measured right there, while the per-head form issues two dots sharing the depthwise tile. The next GPU
#: report's training tests at C = 320 fp32 check it.)
PAIR_TRAINING_OFF = frozenset({(True, "tf32x3", 32)})


def training_pair(C: int, precision: str, recompute: bool) -> bool:
    """Whether the statistics (recompute False) or the recompute kernel takes PAIR at width C with dots of
    this precision (`PAIR_TRAINING`)."""
    return (PAIR_TRAINING and pair_applies(C) and precision in ("tf32", "tf32x3")
            and (recompute, precision, C // 5) not in PAIR_TRAINING_OFF)


def kernel_call(qkv: Tensor, H: int, W: int, leading: Tuple[Tensor, ...], plan: SegmentPlan,
                tiles: Tuple[int, int, int], dots: DotVariant, recompute: bool = False, store=False):
    """(grid, args, kwargs) of a launch of either kernel (same grid; `leading`: the tensor
    arguments between qkv and N, i.e. (part_mean, part_m2, z, y_all, dw3, dw5, dw7, pw) of
    `gma_statistics_kernel`, (z, p, y_all, bn_scale, bn_shift, dw3, dw5, dw7, pw) of
    `gma_recompute_z_kernel`; recompute: which of the two; store: the statistics kernel's STORE; both
    for PAIR, `training_pair`); also used on meta tensors for the AOT specialisation
    (specializations.py), so launch and check cannot drift apart."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s = C // 5
    bp, warps, ck = tiles[:3]
    rows = len(tiles) > 3 and bool(tiles[3])
    if plan.tiles != _num_tiles(N, H, W, bp, rows) or bool(plan.row_w) != rows:
        raise ValueError(f"plan of {plan.tiles} tiles (rows of width {plan.row_w}) for {_num_tiles(N, H, W, bp, rows)} "
                         f"tiles of {bp} tokens{' (rows)' if rows else ''}")
    if rows and (recompute or not rows_applies(C, dots.precision)):
        raise ValueError(f"ROWS: the statistics pass walks rows only where its tiles are PAIR's (C = {C}, "
                         f"{dots.precision} dots: `rows_applies`)")
    args = (qkv, *leading, N, H, W, strip_width(W), qkv.stride(0), qkv.stride(1), *plan.splits)
    kwargs = dict(C=C, S=s, D=s // 2, D_PAD=dot_pad(s // 2), CK=ck, BLOCK_P=bp, DOT_PRECISION=dots.precision,
                  EMULATE_DOTS=dots.emulate, PAIR=training_pair(C, dots.precision, recompute), num_warps=warps)
    if store:
        kwargs["STORE"] = True if store is True else int(store)
    if rows:
        kwargs["ROWS"] = True
    return (plan.programs, 3 * B), args, kwargs


def _num_tiles(N: int, H: int, W: int, block_p: int, rows: bool) -> int:
    """Tiles of an image: ceil(N / BLOCK_P), or with ROWS one per row of each BLOCK_P-column strip."""
    return -(-W // block_p) * H if rows else -(-N // block_p)


def _grid_plan(qkv: Tensor, H: int, W: int, dots: Optional[DotVariant], tiles: Optional[Tuple[int, ...]], tiles_fn,
               recompute: bool, store=False):
    """(qkv with unit channel stride, dots, tiles (default: on a CUDA device the tuning table's,
    `tile_spaces.tuned_tiles`, else tiles_fn's), `SegmentPlan`) of a call:
    the grid both kernels share, programs per segment in proportion to its cost per tile
    (`segment_costs`, `aggregation._balanced_splits`: about SPLIT_TARGET programs in all where the
    tiles allow); with ROWS (tiles[3]) the tiles are rows of BLOCK_P-column strips and a walking segment's
    runs hold at least KS rows (`aggregation._rows_splits`)."""
    B, N, C3 = qkv.shape
    tiles = tiles or tile_spaces.tuned_tiles(RECOMPUTE_Z_FAMILY if recompute else STATS_FAMILY, C3 // 3, qkv)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    dots = dots or statistics_dots(qkv)
    tiles = tuple(tiles or tiles_fn(C3 // 3, N, dots.precision))
    return qkv, dots, tiles, _segment_plan(C3 // 3, N, H, W, 3 * B, tiles, dots.precision, recompute, store,
                                           SPLIT_TARGET)


@functools.lru_cache(maxsize=1024)
def _segment_plan(C: int, N: int, H: int, W: int, images: int, tiles: Tuple[int, ...], precision: str,
                  recompute: bool, store, split_target: int) -> SegmentPlan:
    """`_grid_plan`'s `SegmentPlan` (host arithmetic only, cached: every training call and every split eval
    forward asks it, ~50-100 us of Python per call on the development CPU without the cache)."""
    rows = len(tiles) > 3 and bool(tiles[3])
    T = _num_tiles(N, H, W, tiles[0], rows)
    costs = tuple(max(1, round(16 * c)) for c in segment_costs(C, tiles, precision, recompute, store))
    splits = _balanced_splits(T, images, costs, split_target)
    if rows:   # runs of at least KS rows: a walk re-reads R rows above and below its run
        splits = splits[:1] + tuple(_rows_splits(T, sp, 2 * j + 1) for j, sp in enumerate(splits[1:], 1))
    return SegmentPlan(T, splits, W if rows else 0)


def plan_statistics(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
                    tiles: Optional[Tuple[int, ...]] = None, dots: Optional[DotVariant] = None,
                    store: bool = False):
    """Allocate the partial buffers of one call and describe its launch, without launching:
    (part_mean, part_m2, plan, (grid, args, kwargs)); part_mean (float64) and part_m2 (fp32):
    (3B R, s), row img R + r the partial of program r of image img (R = plan.programs; programs
    plan.rows(j) of an image belong to segment j, `merge_segments`). store (STORE, "Planes kept for the
    backward"): also allocate Z (3B, 4s, H, W) and y_all (3, 3B, s, H, W) in the stage dtype, the
    kernel's arguments z and y_all (`planes_of` finds them in args), y_all an empty placeholder with
    `STORE_Z_MOMENTS`; else part_m2 holds their places."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    qkv, dots, tiles, plan = _grid_plan(qkv, H, W, dots, tiles, stats_tiles, False, store)
    part_mean = torch.empty(3 * B * plan.programs, s, dtype=torch.float64, device=qkv.device)
    part_m2 = torch.empty(3 * B * plan.programs, s, dtype=torch.float32, device=qkv.device)
    if store:
        st = dict(dtype=stage_dtype(qkv.dtype), device=qkv.device)
        y_shape = (0,) if store == STORE_Z_MOMENTS else (3, 3 * B, s, H, W)
        planes = (torch.empty(3 * B, 4 * s, H, W, **st), torch.empty(*y_shape, **st))
    else:
        planes = (part_m2, part_m2)
    call = kernel_call(qkv, H, W, (part_mean, part_m2, *planes, dw3, dw5, dw7, pw), plan, tiles, dots, store=store)
    return part_mean, part_m2, plan, call


def plan_z_pass(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
                tiles: Optional[Tuple[int, ...]] = None, z: Optional[Tensor] = None) -> Tuple[Tensor, tuple]:
    """The split eval forward's Z pass (module docstring, "The Z pass of the split forward";
    `config.GMAShape.AGG_SPLIT`): allocate Z (3B, 4s, H, W) in the stage dtype and describe the launch of
    `gma_statistics_kernel` with STORE = `Z_ONLY`, without launching: (z, (grid, args, kwargs)). Only
    segments 1-3 of Z are written (the aggregation reads segment 0 from qkv). The statistics pass's grid,
    tiles (the "triton.statistics" family's, `tile_spaces.tuned_tiles`) and dots (`statistics_dots`: fp32's,
    3xTF32 on sm_80+; one TF32 pass for fp16 / bf16, as the fused forward's pointwise, made ptxas spill 12-112 B
    at C = 160, 200, 320 (sm_80) and 480, where these compile without one). The moments' buffers and y_all are
    placeholders (qkv), never read or written. The weights: the folded filters (fp32, contiguous, tap-major:
    `folding.FoldedGMAWeights`). z: the buffer to write, if given (contiguous (3B, 4s, H, W), the stage
    dtype)."""
    qkv, dots, tiles, plan = _grid_plan(qkv, H, W, None, tiles, stats_tiles, False, STORE_Z_ONLY)
    z = z_pass_buffer(qkv, H, W, z)
    # placeholders: qkv, read-only (a traced launch, torch.compile's `wrap_triton`, then sees z as the one
    # tensor written, never aliased by another argument)
    return z, kernel_call(qkv, H, W, (qkv, qkv, z, qkv, dw3, dw5, dw7, pw), plan, tiles, dots, store=STORE_Z_ONLY)


def z_pass_buffer(qkv: Tensor, H: int, W: int, z: Optional[Tensor] = None) -> Tensor:
    """The split forward's Z buffer for qkv (B, N, 15s): `z` checked (contiguous (3B, 4s, H, W) in the stage
    dtype; ValueError otherwise), or a new one; both Z passes' (`plan_z_pass`, `dense_z.plan_dense_z_pass`)."""
    B, N, C3 = qkv.shape
    want = (3 * B, 4 * (C3 // 15), H, W)
    if z is None:
        return torch.empty(want, dtype=stage_dtype(qkv.dtype), device=qkv.device)
    if tuple(z.shape) != want or z.dtype != stage_dtype(qkv.dtype) or not z.is_contiguous():
        raise ValueError(f"Z buffer {tuple(z.shape)} {z.dtype}: expected a contiguous {want} "
                         f"{stage_dtype(qkv.dtype)} tensor")
    return z


def planes_of(args: tuple) -> Tuple[Tensor, Tensor]:
    """(z, y_all) among a statistics launch's arguments (`kernel_call`'s order)."""
    return args[3], args[4]


def merge_segments(part_mean: Tensor, part_m2: Tensor, plan: SegmentPlan, block_p: int, N: int,
                   dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    """Chan's merge (module docstring) of each segment's rows of `plan_statistics`' layout ->
    (mean, M2) (4s,), in `dtype` (float64: the launcher's choice; the test measures float32 too).
    The four segments at once, as products with `SegmentPlan.row_weights` (every segment's runs
    cover the N tokens of each of the I images, so n = I N): about a dozen tensor ops a layer,
    where a merge per segment took ~70 (each a kernel launch on a GPU, and host time)."""
    R = plan.programs
    I, s = part_mean.shape[0] // R, part_mean.shape[1]
    counts, member = plan.row_weights(block_p, N, part_mean.device, dtype)
    mean_r = part_mean.view(I, R, s).to(dtype)
    mean = (counts @ mean_r.sum(0)) / (I * N)                                    # (4, s)
    between = (mean_r - member.t() @ mean).square().sum(0)                       # (R, s); row r's segment mean
    m2 = member @ part_m2.view(I, R, s).to(dtype).sum(0) + counts @ between
    return mean.reshape(-1), m2.reshape(-1)


def z_moments(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
              tiles: Optional[Tuple[int, ...]] = None, dots: Optional[DotVariant] = None,
              store=False):
    """Launch the kernel and merge: (2, 4s) float64, [mean, M2] of Z per channel (channel j*s + c:
    segment j) over this process's 3B images x H x W; store (True or `STORE_Z_MOMENTS`): (that, Z, y_all),
    the planes the kernel stored (`plan_statistics`; y_all empty with `STORE_Z_MOMENTS`)."""
    from ._launch import device_guard, wrap_triton
    dw3, dw5, dw7, pw = (w.contiguous() for w in (dw3, dw5, dw7, pw))     # the kernel's weight layout
    part_mean, part_m2, plan, (grid, args, kwargs) = plan_statistics(qkv, H, W, dw3, dw5, dw7, pw, tiles, dots,
                                                                     store)
    with device_guard(qkv):
        wrap_triton(gma_statistics_kernel)[grid](*args, **kwargs)
    moments = torch.stack(merge_segments(part_mean, part_m2, plan, kwargs["BLOCK_P"], qkv.shape[1]))
    return (moments, *planes_of(args)) if store else moments


def plan_recompute(qkv: Tensor, H: int, W: int, bn_scale: Tensor, bn_shift: Tensor, dw3: Tensor, dw5: Tensor,
                   dw7: Tensor, pw: Tensor, tiles: Optional[Tuple[int, int, int]] = None,
                   dots: Optional[DotVariant] = None):
    """Allocate Z (3B, 4s, H, W), P of the v images PV (B, 4s, H, W) and y_all (3, 3B, s, H, W)
    (the stage dtype `config.stage_dtype`, contiguous) and describe the recompute launch (the
    statistics pass's grid), without launching: ((z, pv, y_all), (grid, args, kwargs)). dots:
    default `backward_dots`."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    qkv, dots, tiles, plan = _grid_plan(qkv, H, W, dots or backward_dots(qkv), tiles, recompute_tiles, True)
    st = dict(dtype=stage_dtype(qkv.dtype), device=qkv.device)
    out = (torch.empty(3 * B, 4 * s, H, W, **st), torch.empty(B, 4 * s, H, W, **st),
           torch.empty(3, 3 * B, s, H, W, **st))
    return out, kernel_call(qkv, H, W, out + (bn_scale, bn_shift, dw3, dw5, dw7, pw), plan, tiles, dots, True)


def recompute_z(qkv: Tensor, H: int, W: int, bn_scale: Tensor, bn_shift: Tensor, dw3: Tensor, dw5: Tensor,
                dw7: Tensor, pw: Tensor, tiles: Optional[Tuple[int, int, int]] = None,
                dots: Optional[DotVariant] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Launch `gma_recompute_z_kernel`: (Z, PV, y_all), PV the v images' P, y_all[j - 1] = y_j
    (module docstring)."""
    from ._launch import device_guard, wrap_triton
    weights = tuple(w.float().contiguous() for w in (bn_scale, bn_shift, dw3, dw5, dw7, pw))
    out, (grid, args, kwargs) = plan_recompute(qkv, H, W, *weights, tiles, dots)
    with device_guard(qkv):
        wrap_triton(gma_recompute_z_kernel)[grid](*args, **kwargs)
    return out


# ---------------------------------------------------------------- the op and the statistics pass
OP_NAME = "gmf::triton_z_moments"
RECOMPUTE_OP_NAME = "gmf::triton_proxy_z"
PLANES_OP_NAME = "gmf::triton_z_moments_planes"


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.gmf, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _register():
    """``gmf::triton_z_moments``: a ``custom_op`` with a fake, so ``torch.compile(fullgraph=True)``
    keeps the statistics pass as ONE opaque node running the kernel (under the interpreter a
    ``triton_op`` would trace to a graph without it, see op.py; on a GPU the node is one launch and
    a tiny merge, nothing Inductor would gain from seeing). No autograd: the statistics are taken
    under no_grad (their gradient terms are in the backward's B3)."""
    def impl(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor) -> Tensor:
        return z_moments(qkv, H, W, dw3, dw5, dw7, pw)

    op = torch.library.custom_op(OP_NAME, impl, mutates_args=())

    @op.register_fake
    def _(qkv, H, W, dw3, dw5, dw7, pw):
        return qkv.new_empty(2, 4 * (qkv.shape[-1] // 15), dtype=torch.float64)
    return op


def _register_planes():
    """``gmf::triton_z_moments_planes``: the statistics pass that also keeps Z and the depthwise outputs
    for the backward (STORE, "Planes kept for the backward"), one opaque node as ``gmf::triton_z_moments``.
    Returns (moments (2, 4s) float64, Z (3B, 4s, H, W), y_all (3, 3B, s, H, W)), the planes in the stage
    dtype; keep_y False (a backward running B3's dense form, which reads no y, where the dense statistics pass,
    `dense_z.dense_statistics_planes`, does not apply): y_all empty (`STORE_Z_MOMENTS`)."""
    def impl(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor,
             pw: Tensor, keep_y: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        return z_moments(qkv, H, W, dw3, dw5, dw7, pw, store=True if keep_y else STORE_Z_MOMENTS)

    op = torch.library.custom_op(PLANES_OP_NAME, impl, mutates_args=())

    @op.register_fake
    def _(qkv, H, W, dw3, dw5, dw7, pw, keep_y=True):
        B, s = qkv.shape[0], qkv.shape[-1] // 15
        st = stage_dtype(qkv.dtype)
        y_shape = (3, 3 * B, s, H, W) if keep_y else (0,)
        return (qkv.new_empty(2, 4 * s, dtype=torch.float64), qkv.new_empty(3 * B, 4 * s, H, W, dtype=st),
                qkv.new_empty(*y_shape, dtype=st))
    return op


def _register_recompute():
    """``gmf::triton_proxy_z``: the recompute kernel as a ``custom_op`` with a fake, for the same
    reason (one opaque node under torch.compile: the SyncBatchNorm backward calls the stages
    one by one, and any compiled caller sees one node). No autograd: the backward runs it."""
    def impl(qkv: Tensor, H: int, W: int, bn_scale: Tensor, bn_shift: Tensor, dw3: Tensor, dw5: Tensor,
             dw7: Tensor, pw: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return recompute_z(qkv, H, W, bn_scale, bn_shift, dw3, dw5, dw7, pw)

    op = torch.library.custom_op(RECOMPUTE_OP_NAME, impl, mutates_args=())

    @op.register_fake
    def _(qkv, H, W, bn_scale, bn_shift, dw3, dw5, dw7, pw):
        B, s = qkv.shape[0], qkv.shape[-1] // 15
        st = stage_dtype(qkv.dtype)
        return (qkv.new_empty(3 * B, 4 * s, H, W, dtype=st), qkv.new_empty(B, 4 * s, H, W, dtype=st),
                qkv.new_empty(3, 3 * B, s, H, W, dtype=st))
    return op


z_moments_op = None if _op_exists("triton_z_moments") else _register()
proxy_z_op = None if _op_exists("triton_proxy_z") else _register_recompute()
z_moments_planes_op = None if _op_exists("triton_z_moments_planes") else _register_planes()


def statistics(qkv: Tensor, H: int, W: int, wts, group=None):
    """`backward.statistics` through the kernel: (mean, biased variance) (4, s) in the weights'
    dtype and the count of values per channel (an int; with a process group a float64 scalar
    tensor over every rank). group (SyncBatchNorm): the local (count, mean, M2) become (sum, sum
    of squares, count) in float64 and go through the same ONE all-reduce as the PyTorch pass
    (`distributed.sync_batch_moments`). float64 inputs (not a Triton dtype) take the PyTorch pass."""
    if qkv.dtype == torch.float64:
        from .backward import statistics as torch_statistics
        return torch_statistics(qkv, H, W, wts, group)
    B, N, C3 = qkv.shape
    check_train_size(B, N, C3 // 3)
    moments = torch.ops.gmf.triton_z_moments(qkv, H, W, wts.dw3, wts.dw5, wts.dw7, wts.pw)
    return mean_var_count(moments, qkv, wts, group)


def statistics_planes(qkv: Tensor, H: int, W: int, wts, group=None, keep_y: bool = True):
    """`statistics` that also keeps the planes the backward would recompute (module docstring, "Planes
    kept for the backward"; op ``gmf::triton_z_moments_planes``): (mean, var, count, planes), planes =
    (Z (3B, 4s, H, W), y_all (3, 3B, s, H, W), None: no local branch's Z, `training.prepare`'s zl) in the stage
    dtype, this process's own images (with a
    process group too: only the moments are all-reduced). keep_y False: y_all empty (nothing stored: the
    backward runs B3's dense form, `train_op.planes_fn_for`). float64 inputs: `statistics` and planes None."""
    if qkv.dtype == torch.float64:
        return (*statistics(qkv, H, W, wts, group), None)
    B, N, C3 = qkv.shape
    check_train_size(B, N, C3 // 3)
    moments, z, y_all = torch.ops.gmf.triton_z_moments_planes(qkv, H, W, wts.dw3, wts.dw5, wts.dw7, wts.pw, keep_y)
    return (*mean_var_count(moments, qkv, wts, group), (z, y_all, None))


def mean_var_count(moments: Tensor, qkv: Tensor, wts, group):
    """`statistics`' results from the merged moments [mean, M2] (2, 4s) of this process's Z."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    mean, m2 = moments.unbind(0)
    count = 3 * B * N
    dt = wts.pw.dtype
    if group is not None:
        from ..distributed import sync_batch_moments
        mean, var, n = sync_batch_moments(mean * count, m2 + count * mean.square(), count, group)
        return mean.to(dt).view(4, s), var.to(dt).view(4, s), n
    return mean.to(dt).view(4, s), (m2 / count).to(dt).view(4, s), count


def recompute_planes(qkv: Tensor, H: int, W: int, wts) -> Tuple[Tensor, Tensor, list]:
    """The recompute kernel's results as the backward stages take them (op ``gmf::triton_proxy_z``,
    ONE launch): (Z, PV, y), Z (3B, 4s, H, W) and PV (B, 4s, H, W) (the v images' proxies P:
    the readers of q's and k's take them from Z) in the stage dtype, y = [y_1, y_2, y_3] (3B, s, H, W) views of
    one (3, 3B, s, H, W) buffer (so the pointwise-backward kernel takes the three with one stride
    set). The depthwise inputs u_j are not copied: the depthwise backward reads them from qkv
    (`aggregation_backward.qkv_layout`). wts: the folded weights (fp32; bn_scale / bn_shift (4, s),
    the BatchNorms as the forward folded them)."""
    s = qkv.shape[-1] // 15
    for name in ("bn_scale", "bn_shift"):
        if getattr(wts, name).numel() != 4 * s:
            raise ValueError(f"{name}: {tuple(getattr(wts, name).shape)}, expected (4, {s}) (folded BatchNorms)")
    z, pv, y_all = torch.ops.gmf.triton_proxy_z(qkv, H, W, wts.bn_scale, wts.bn_shift, wts.dw3, wts.dw5, wts.dw7,
                                               wts.pw)
    return z, pv, list(y_all.unbind(0))


register_tiles(STATS_FAMILY, ("BLOCK_P", "num_warps", "CK", "ROWS"), gpu_stats_tiles, stats_candidates,
               [gma_statistics_kernel], backward=False)
register_tiles(RECOMPUTE_Z_FAMILY, ("BLOCK_P", "num_warps", "CK"), gpu_recompute_tiles,
               lambda C, p: RECOMPUTE_SEARCH,
               [gma_recompute_z_kernel])
