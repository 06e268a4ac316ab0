"""The split forward's Z pass on tensor cores: a segment's depthwise and pointwise as one dense convolution.

    z, (grid, args, kwargs) = plan_dense_z_pass(qkv, H, W, dw3, dw5, dw7, pw, dots, z=buffer)

A tuning candidate of the eval forward (`config.GMAShape.AGG_ZDENSE`, with `AGG_SPLIT`): the same Z as the
stencil Z pass (`statistics.plan_z_pass`), into the same (3B, 4s, H, W) buffer, which the aggregation then
reads (`aggregation._segment_z`).

**The identity.** Segment j = 1, 2, 3 computes Z_j = PW_j(DW_j(x_j)) with a K x K depthwise filter
(K = 2j + 1) and an s x s pointwise, neither with a bias and nothing between them (docs/spec.md: y_j =
hardswish(BN_j(PW_j(DW_j(seg_j))))). So

    Z_j[p, o] = sum_t sum_i x_j[p + shift_t, i] W_t[i, o],   W_t[i, o] = DW_j[t, i] PW_j[o, i]

over the K^2 taps t: a dense K x K convolution from s channels to s, i.e. K^2 products of a token tile
[BLOCK_P, s] (shifted by the tap) with an [s, s] matrix, summed: tensor-core work (`_common.mm`). A program
forms each W_t from the tap's filter row and the pointwise, both loaded as they are (fp32, the folded
weights' layout), and multiplies it into the tiles of q, k and v (the aggregator's weights are shared by
the three streams), one accumulator each.

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

**Grid** ``(ceil(N / BLOCK_P), 3, B)``: program (tile, j - 1, b) computes BLOCK_P tokens of image b,
segment j, for the three streams. On a GPU the tap loop is a ``tl.range`` of `config.DENSE_Z_STAGES` stages
over the K^2 taps, whose loads carry masks (no ``if``), so Triton overlaps a tap's loads (cp.async) with the
previous tap's MMAs; the interpreter runs it as a plain loop (PIPE 0). Tiles:
`config.DENSE_Z_TILES` (BLOCK_P, num_warps) by S_PAD, or `config.DENSE_Z_TILES_ALT` (`dense_z_tiles`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import DotVariant, interpreting, mm, stored
from .config import DENSE_Z_STAGES, DENSE_Z_TILES, DENSE_Z_TILES_ALT, dot_pad, dtype_name, operand_precision
from .statistics import z_pass_buffer

Tensor = torch.Tensor


@triton.jit
def _dense_tap(t, acc_q, acc_k, acc_v, src, w_taps, pw_t, y, x, pmask, ch, cmask, H, W, stride_n, KS, R,
               C: tl.constexpr, S: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """Tap t of the K x K window: W_t = DW[t] (rows) x PW^T, and the shifted q, k, v tiles times it."""
    ky = t // KS
    yy = y + ky - R
    xx = x + (t - ky * KS) - R
    ok = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    m = ok[:, None] & cmask[None, :]
    ptrs = src + ((yy * W + xx) * stride_n)[:, None]
    w_t = tl.load(w_taps + t * S + ch, mask=cmask, other=0.0)[:, None] * pw_t     # W_t[i, o]
    acc_q = mm(tl.load(ptrs, mask=m, other=0.0).to(tl.float32), w_t, acc_q, DOT_PRECISION, EMULATE_DOTS)
    acc_k = mm(tl.load(ptrs + C, mask=m, other=0.0).to(tl.float32), w_t, acc_k, DOT_PRECISION, EMULATE_DOTS)
    acc_v = mm(tl.load(ptrs + 2 * C, mask=m, other=0.0).to(tl.float32), w_t, acc_v, DOT_PRECISION, EMULATE_DOTS)
    return acc_q, acc_k, acc_v


# one variant per (C, dtype, GPU): N, H, W, B not specialised; stride_b (N 3C) is, a multiple of 16 wherever 3C is
# (without it the 16-bit tile loads lose their vector width and async copies: 49 scalar loads a tap on sm_90)
@triton.jit(do_not_specialize=["N", "H", "W", "B"])
def gma_dense_z_kernel(qkv, z, dw3, dw5, dw7, pw, N, H, W, B, stride_b, stride_n,
                       C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, PIPE: tl.constexpr):
    """Z of segments 1-3 (module docstring). qkv: (B, N, 3C), unit channel stride (strides stride_b,
    stride_n); z: (3B, 4s, H, W) contiguous, image ``stream * B + b``, channel ``j s + o`` (segment 0's
    channels not written); dw3 / dw5 / dw7: tap-major (K, K, s) fp32; pw: (3, s, s) fp32, [j - 1][out][in].
    PIPE: the tap loop's stages (``tl.range(num_stages=PIPE)``), 0 a plain loop (the interpreter's: it cannot
    range over a runtime bound)."""
    tile = tl.program_id(0)
    seg = tl.program_id(1)           # segment seg + 1: 3x3, 5x5, 7x7
    b = tl.program_id(2)
    if seg == 0:
        KS = 3
        w_taps = dw3
    elif seg == 1:
        KS = 5
        w_taps = dw5
    else:
        KS = 7
        w_taps = dw7
    R = KS // 2
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < N
    y = p // W
    x = p - y * W
    ch = tl.arange(0, S_PAD)
    cmask = ch < S
    # the pointwise transposed, [in, out]: pw_t[i, o] = PW[o, i]
    pw_t = tl.load(pw + seg * S * S + ch[None, :] * S + ch[:, None], mask=cmask[:, None] & cmask[None, :], other=0.0)
    src = qkv + b.to(tl.int64) * stride_b + (seg + 1) * S + ch[None, :]
    acc_q = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_P, S_PAD], dtype=tl.float32)
    if PIPE > 0:
        for t in tl.range(0, KS * KS, num_stages=PIPE):
            acc_q, acc_k, acc_v = _dense_tap(t, acc_q, acc_k, acc_v, src, w_taps, pw_t, y, x, pmask, ch, cmask, H, W,
                                             stride_n, KS, R, C, S, DOT_PRECISION, EMULATE_DOTS)
    else:
        t = 0
        while t < KS * KS:
            acc_q, acc_k, acc_v = _dense_tap(t, acc_q, acc_k, acc_v, src, w_taps, pw_t, y, x, pmask, ch, cmask, H, W,
                                             stride_n, KS, R, C, S, DOT_PRECISION, EMULATE_DOTS)
            t += 1
    plane = 4 * S * N                               # one image of Z
    out = z + (b * plane + ((seg + 1) * S + ch[None, :]) * N + p[:, None])
    zm = pmask[:, None] & cmask[None, :]
    tl.store(out, stored(acc_q, out, EMULATE_DOTS), mask=zm)
    out += B * plane
    tl.store(out, stored(acc_k, out, EMULATE_DOTS), mask=zm)
    out += B * plane
    tl.store(out, stored(acc_v, out, EMULATE_DOTS), mask=zm)


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


def plan_dense_z_pass(qkv: Tensor, H: int, W: int, dw3: Tensor, dw5: Tensor, dw7: Tensor, pw: Tensor,
                      dots: DotVariant, z: Optional[Tensor] = None, tiles: Optional[Tuple[int, int]] = None):
    """(z, (grid, args, kwargs)) of the launch, without launching (meta tensors work; the AOT specialisation
    runs it). qkv (B, N, 3C) with unit channel stride; weights: the folded filters (fp32, contiguous,
    tap-major: `folding.FoldedGMAWeights`); dots: the call's variant (`_common.dot_variant`), made this
    kernel's by `dense_z_dots`; z: the (3B, 4s, H, W) stage-dtype buffer to write (allocated if None);
    tiles: (BLOCK_P, num_warps), default `dense_z_tiles`."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s = C // 5
    if qkv.stride(2) != 1:
        raise ValueError("qkv needs a unit channel stride")
    z = z_pass_buffer(qkv, H, W, z)
    bp, warps = tiles or dense_z_tiles(C)
    dd = dense_z_dots(dots, qkv.dtype)
    args = (qkv, z, dw3, dw5, dw7, pw, N, H, W, B, qkv.stride(0), qkv.stride(1))
    kwargs = dict(C=C, S=s, S_PAD=dot_pad(s), BLOCK_P=bp, DOT_PRECISION=dd.precision, EMULATE_DOTS=dd.emulate,
                  PIPE=0 if interpreting() else DENSE_Z_STAGES, num_warps=warps)
    return z, ((triton.cdiv(N, bp), 3, B), args, kwargs)
