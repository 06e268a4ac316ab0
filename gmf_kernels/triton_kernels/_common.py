"""Small @triton.jit helpers shared by the aggregation and attention kernels."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._env import triton_interpreting
from .config import DEFAULT_CAPABILITY, DTYPE_NAMES, dot_precision, dtype_name


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, or true / on / yes, as
    Triton reads it: `_env.triton_interpreting`)."""
    return triton_interpreting()


#: Test hook: the compute capability whose dot rounding the interpreter emulates
#: (`config.DEFAULT_CAPABILITY`; (7, 0) makes the interpreter compute the FMA variant).
EMULATED_CAPABILITY: Tuple[int, int] = DEFAULT_CAPABILITY


class DotVariant(NamedTuple):
    """How the kernels' dots run: the two ``tl.constexpr`` that `mm` takes."""
    precision: str   # DOT_PRECISION: Triton input_precision ("tf32x3", "tf32", "ieee")
    emulate: bool    # EMULATE_DOTS: interpreter only: round the operands as the GPU does


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def kernel_name(kernel) -> str:
    """The name of a @triton.jit kernel (a JIT or an interpreter object)."""
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def dot_variant(x: torch.Tensor) -> DotVariant:
    """The dot variant for an input like x: its dtype on its GPU's architecture (config.ARCH_DOTS),
    or, under the interpreter, the GPU rounding of EMULATED_CAPABILITY emulated. Off CUDA
    without the interpreter (torch.compile tracing on CPU fake tensors: nothing runs) the
    variant of config.DEFAULT_CAPABILITY."""
    cap = None
    if x.device.type == "cuda" and not interpreting():
        cap = _cuda_capability(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return dot_variant_of(x.dtype, cap)


def dot_variant_of(dtype: torch.dtype, capability: Optional[Tuple[int, int]]) -> DotVariant:
    """`dot_variant` by value: inputs of this dtype on a GPU of this capability (None: not on a
    CUDA device, or the interpreter, which emulates EMULATED_CAPABILITY)."""
    name = dtype_name(dtype)
    if name not in DTYPE_NAMES:
        raise TypeError(f"the Triton kernels take fp32, fp16 or bf16 inputs, not {dtype}")
    if interpreting():
        return DotVariant(dot_precision(name, EMULATED_CAPABILITY), True)
    return DotVariant(dot_precision(name, capability or DEFAULT_CAPABILITY), False)


@triton.jit
def hardswish(x):
    """x * relu6(x + 3) / 6, in fp32."""
    return x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) * (1.0 / 6.0)


@triton.jit
def hardswish_grad(x):
    """d hardswish / dx as `backward.hardswish_grad`: 0 below -3, x/3 + 1/2 on [-3, 3], 1 above."""
    return tl.where(x < -3.0, 0.0, tl.where(x <= 3.0, x / 3.0 + 0.5, 1.0))


@triton.jit
def tf32_truncate(x):
    """fp32 -> TF32 as the tensor cores read an fp32 register: the low 13 of the 23 mantissa
    bits are dropped (round toward zero). Returned as fp32 with those bits zero."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits & -8192).to(tl.float32, bitcast=True)                # -8192 = 0xFFFFE000


@triton.jit
def tf32_round(x):
    """fp32 -> TF32 as PTX ``cvt.rna.tf32.f32``: round to nearest, ties away from zero.

    Adding half a TF32 ulp (bit 12) to the sign-magnitude bits and truncating rounds the
    magnitude half-up, i.e. ties away from zero for either sign; a carry into the exponent
    is the correct next binade (and the largest finite values round to infinity). Inf and
    NaN (exponent all ones) pass through unchanged."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 4096) & -8192
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded, bits).to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits(x):
    """fp32 -> the bits (int32, in the low 16) of the nearest bfloat16, ties to even: the GPU's
    ``cvt.rn.bf16.f32``, what ``x.to(tl.bfloat16)`` compiles to.

    Adding 0x7FFF plus the kept bits' lowest bit to the sign-magnitude bits and truncating
    rounds the magnitude to nearest, ties to even; a carry into the exponent is the correct next
    binade (the largest finite values round to infinity). Inf and NaN keep their top 16 bits
    (a NaN whose payload sits in the low 16 bits only is quieted)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    finite = (bits & 0x7F800000) != 0x7F800000
    nan_low = ((bits & 0x7FFFFFFF) > 0x7F800000) & ((bits & 0x007F0000) == 0)
    top = tl.where(finite, rounded, bits) >> 16
    return tl.where(nan_low, top | 0x40, top)


@triton.jit
def bf16_round(x):
    """fp32 -> the nearest bfloat16 (ties to even), returned as fp32: `bf16_bits` back in the top half."""
    return (bf16_bits(x) << 16).to(tl.float32, bitcast=True)


@triton.jit
def stored(x, ptr, EMULATE: tl.constexpr):
    """x (fp32) converted to ptr's element type for ``tl.store``, rounded to nearest even as on
    the GPU. The Triton interpreter converts fp32 to bfloat16 by truncation whatever rounding is
    asked (2x the GPU's error, biased toward zero) and mangles subnormals; so when EMULATE is set
    (exactly when the interpreter runs: the kernels' EMULATE_DOTS, `dot_variant`, or
    EMULATE_STORES, `interpreting()`) the bfloat16 is built from its bits (`bf16_bits`;
    tests/test_triton_dot_emulation.py: bit-equal to torch's conversion). On the GPU this is
    ``x.to(...)`` alone."""
    if EMULATE:
        if ptr.dtype.element_ty == tl.bfloat16:
            return bf16_bits(x).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def cvt_rna_tf32(x):
    """fp32 -> TF32 on the GPU (sm_80+): PTX ``cvt.rna.tf32.f32`` (`tf32_round` emulates it)."""
    return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def mm(a, b, acc, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    """acc + a @ b on fp32 operands with an fp32 accumulator.

    DOT_PRECISION (chosen per GPU architecture and input dtype: `config.dot_precision`):

    * "tf32x3" (fp32 inputs, sm_80+): Triton's three-pass split (F32DotTC pass): each operand
      x becomes big = cvt.rna.tf32(x) and small = x - big (exact in fp32; the MMA truncates
      it to TF32 in turn), and the result is ``dot(a_big, b_big, where(isnan(d), 0, d)) + acc``
      with ``d = dot(a_big, b_small, dot(a_small, b_big, 0))``: three tf32 MMAs (a_small @
      b_small is dropped), the accumulator added last in fp32 (read from the TTGIR Triton 3.6
      emits). About fp32 accuracy, so fp32 stays within 1e-5. Not "ieee": Triton lowers an fp32 "ieee" dot
      to FMAs holding whole operand rows per thread, which spilled hundreds of KB at s = 96 -- except
      where `config.DOT_OVERRIDES` names a kernel and channel padding (the channel-mix backward
      kernels at S_PAD = 64, spill-free there: an H200 gave wrong weight gradients with 3xTF32).
    * "tf32" (fp16/bf16 inputs, sm_80+): one tf32 MMA on operands rounded to TF32 first
      (``cvt.rna.tf32.f32``, `cvt_rna_tf32`). Left alone, Triton passes the fp32 registers to
      ``mma.sync ... .tf32`` unconverted and the tensor cores read the top 10 mantissa bits:
      truncation, a bias toward zero (triton-lang/triton#4574). Emulated, that bias put bf16
      C=320 at 1.22e-2 against the float64 oracle where the bf16 reference has 5.7e-3
      (tests/test_backends_parity.py's 2x rule), fp16 errors about 2x those of exact dots;
      rounding costs one cvt per operand element. 10 bits are as many as fp16 has and more
      than bf16, so the rounded dots add about as much error as the input dtype itself.
    * "bf16" / "fp16" (the tuning knob DOTS16 of the forward kernels, fp16/bf16 inputs on sm_80+:
      `config.operand_precision`): both operands converted to the input's 16-bit type (``cvt.rn``,
      to nearest even: one F2FP per two elements) and one MMA of that type (k = 16) with fp32
      accumulation. The PyTorch reference at that dtype rounds the same intermediates to it.
    * "ieee" (sm_70 / sm_75, which have no TF32): fp32 FMAs. Triton 3.6 lowers every fp32 dot
      to FMAs there whatever precision is asked; the launchers ask for "ieee" explicitly so
      that the variant is the one the AOT compile checks. (The attention kernel's Q KV does
      not call `mm` there: rank-1 updates keep Triton's FMA dot layout out of that kernel.)

    Operands stay fp32 but for "bf16" / "fp16" (where they are converted right at the dot): the
    interpreter mis-handles bf16 dots, and the BatchNorm-folded weights stay unrounded.

    EMULATE_DOTS (set by the launchers under the Triton interpreter, `interpreting()`; always 0
    on the GPU, where this branch is not compiled): the interpreter multiplies in exact fp32
    and ignores the precision, so here the operands are rounded as the GPU rounds them
    (`tf32_round` / `tf32_truncate`; "tf32": both rounded; "tf32x3": the same three passes in
    the same order; "bf16" / "fp16": both rounded to the 16-bit type, `bf16_round` (the interpreter's
    own bfloat16 conversion truncates) or fp16's conversion, then an fp32 dot: a product of two
    16-bit values is exact in fp32).
    Accuracy of the emulation: the operands, and therefore every product (a product of two
    TF32 values is exact in fp32), are bit-exact to the GPU's; the sums are not: the
    interpreter adds the K products in fp32 in NumPy's order, the tensor cores in their own
    order and internal width, a difference of a few fp32 ulps of the accumulated magnitude,
    far below the TF32 rounding this models (2^-11 relative per operand). TF32 subnormal
    handling inside the MMA is not modelled (GMA's operands are far from 1e-38).
    """
    if EMULATE_DOTS:
        if DOT_PRECISION == "tf32x3":
            a_big = tf32_round(a)
            b_big = tf32_round(b)
            a_small = tf32_truncate(a - a_big)
            b_small = tf32_truncate(b - b_big)
            d = tl.dot(a_small, b_big, tl.zeros_like(acc))
            d = tl.dot(a_big, b_small, d)
            d = tl.where(d != d, 0.0, d)
            out = tl.dot(a_big, b_big, d) + acc
        elif DOT_PRECISION == "tf32":
            out = tl.dot(tf32_round(a), tf32_round(b), acc)      # the MMA's truncation: a no-op now
        elif DOT_PRECISION == "bf16":
            out = tl.dot(bf16_round(a), bf16_round(b), acc)
        elif DOT_PRECISION == "fp16":
            out = tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), acc)
        else:
            out = tl.dot(a, b, acc)
    elif DOT_PRECISION == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif DOT_PRECISION == "fp16":
        out = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif DOT_PRECISION == "tf32":
        out = tl.dot(cvt_rna_tf32(a), cvt_rna_tf32(b), acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def crpe_group(head, crpe_w3, crpe_w5, crpe_w7):
    """The CRPE group of a head: (window, first head of the group, its tap-major weights (KS, KS,
    GROUP_HEADS d), GROUP_HEADS): heads 0-1 use the 3x3 kernels, 2-4 the 5x5, 5-7 the 7x7
    (docs/spec.md). Channel i of head h is column (h - first) d + i of the group's weights."""
    if head < 2:
        ks = 3
        first = 0
        crpe_w = crpe_w3
        heads = 2
    elif head < 5:
        ks = 5
        first = 2
        crpe_w = crpe_w5
        heads = 3
    else:
        ks = 7
        first = 5
        crpe_w = crpe_w7
        heads = 3
    return ks, first, crpe_w, heads


@triton.jit
def depthwise_tile(src, ch, cmask, w_taps, tap_stride, n, y, x, pmask, H, W, stride_n, KS,
                   BLOCK_P: tl.constexpr, CPAD: tl.constexpr, UNROLL_KX: tl.constexpr = False):
    """Depthwise KSxKS "same" (zero-padded) stencil on a tile of tokens, fp32 result
    [BLOCK_P, CPAD]: `depthwise_taps` of one stream."""
    acc, _, _ = depthwise_taps(src, ch, cmask, w_taps, tap_stride, n, y, x, pmask, H, W, stride_n, KS, 0,
                               BLOCK_P, CPAD, 1, UNROLL_KX)
    return acc


@triton.jit
def _tap(acc0, acc1, acc2, row_ptr, row_ok, cm, cmask, w_taps, tap_stride, x, W, stride_n, stream_off, ky, kx,
         KS, STREAMS: tl.constexpr):
    """One tap (ky, kx) of `depthwise_taps`: its validity, one filter load, one activation load and
    the multiply-adds per stream (row_ptr, row_ok: the tap row's (ky, 0) pointers and validity)."""
    R = KS // 2
    xx = x + (kx - R)
    ok = row_ok & (xx >= 0) & (xx < W)
    m = ok[:, None] & cm
    wv = tl.load(w_taps + (ky * KS + kx) * tap_stride, mask=cmask, other=0.0)[None, :]
    p = row_ptr + kx * stride_n
    acc0 += tl.load(p, mask=m, other=0.0).to(tl.float32) * wv
    if STREAMS == 3:
        acc1 += tl.load(p + stream_off, mask=m, other=0.0).to(tl.float32) * wv
        acc2 += tl.load(p + 2 * stream_off, mask=m, other=0.0).to(tl.float32) * wv
    return acc0, acc1, acc2


@triton.jit
def depthwise_taps(src, ch, cmask, w_taps, tap_stride, n, y, x, pmask, H, W, stride_n, KS, stream_off,
                   BLOCK_P: tl.constexpr, CPAD: tl.constexpr, STREAMS: tl.constexpr,
                   UNROLL_KX: tl.constexpr = False):
    """Depthwise KSxKS "same" (zero-padded) stencil on a tile of tokens of STREAMS (1 or 3)
    streams that share the filter, fp32 results [BLOCK_P, CPAD] (three; the unused ones 0).

    src: token rows of one image (element (n, c) at src + n * stride_n + c); stream i reads
    channels ch + i * stream_off (q, k and v of the same segment: stream_off = C);
    ch: [CPAD] channel offsets to read; cmask: [CPAD] valid channels;
    w_taps: [CPAD] pointers to each channel's tap (0, 0) in a tap-major fp32 weight (KS, KS,
    channels), tap t = ky KS + kx at w_taps + t * tap_stride (`folding`: the channels of one tap
    are contiguous, so a warp's weight load of a tap is one 128-byte line, not one line per
    channel as with (channels, KS, KS));
    n, y, x, pmask: [BLOCK_P] token index, its row/column, and validity;
    KS: window size, a runtime value (one instance serves the 3x3, 5x5 and 7x7 cases,
    which keeps code size and compile time down).
    The halo is read through the cache (no staging).

    Per tap: the validity mask and the addresses once, one weight load, then one activation
    load and the multiply-adds per stream: with three streams the mask arithmetic and the
    weight load serve three times the multiply-adds. sm_90 SASS of the aggregation's tap loop
    (C = 320, 16 x 32 tiles, 4 warps, Triton 3.6; compiler figures, not timings): one stream,
    77 instructions per 4 taps for 16 FFMA (fp32; unrolled by ptxas), 98 per 4 taps for 16 FFMA
    (bf16: two conversion instructions per element); three streams, 51 per tap for 12 FFMA
    (fp32) and 57 (bf16): 1.13x / 1.29x fewer instructions per multiply-add, and per tap and
    warp 52 / 28 L1 sectors for the three streams instead of 60 / 36 (fp32 / bf16).

    By default the taps are runtime loops (KS a runtime value): one tap's loads in flight per
    iteration, the other warps hiding the latency. sm_90 SASS of the merged pass (C = 80 bf16,
    32-token tiles; Triton 3.6, compiler output, not a timing): the kx loop is not unrolled, one
    iteration is one 16-byte filter load, three 8-byte activation loads, 12 FFMA and ~40 other
    instructions, and its FFMA wait on that iteration's loads. Unrolling all KS*KS taps let the
    compiler hoist dozens of [BLOCK_P, CPAD] 64-bit pointer tiles and loads, and spill. They are
    `while` loops because the Triton interpreter turns runtime scalars into 1-element arrays,
    which NumPy >= 2 refuses as a `range` bound; compiled, both are the same scf loop.

    UNROLL_KX (KS then a constexpr: the aggregation's ``GMAShape.AGG_UNROLL``): the kx loop of
    each tap row unrolled (``tl.static_range``), so that a row's KS filter and 3 KS activation loads
    can all be in flight before its first multiply-add: up to KS times the loads in flight per warp
    for a kernel inferred latency-bound, at the price of the registers that hold them (the ky loop
    stays a loop). A tuning candidate: whether it pays is for a GPU to say (benchmarks/tune.py).
    """
    R = KS // 2
    acc0 = tl.zeros([BLOCK_P, CPAD], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P, CPAD], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, CPAD], dtype=tl.float32)
    ptr0 = src + n[:, None] * stride_n + ch[None, :]           # tap (0, 0), per token
    cm = cmask[None, :]
    ky = 0
    while ky < KS:
        yy = y + (ky - R)
        row_ok = pmask & (yy >= 0) & (yy < H)
        row_ptr = ptr0 + ((ky - R) * W - R) * stride_n         # tap (ky, 0)
        if UNROLL_KX:
            for kx in tl.static_range(KS):
                acc0, acc1, acc2 = _tap(acc0, acc1, acc2, row_ptr, row_ok, cm, cmask, w_taps, tap_stride, x, W,
                                        stride_n, stream_off, ky, kx, KS, STREAMS)
        else:
            kx = 0
            while kx < KS:
                acc0, acc1, acc2 = _tap(acc0, acc1, acc2, row_ptr, row_ok, cm, cmask, w_taps, tap_stride, x, W,
                                        stride_n, stream_off, ky, kx, KS, STREAMS)
                kx += 1
        ky += 1
    return acc0, acc1, acc2


@triton.jit
def _rows_fma(a, b, xa, xb, w, STREAMS: tl.constexpr):
    """a += xa w (and b += xb w for a second stream): one filter row's share of a row walk's input row."""
    a += xa * w
    if STREAMS == 2:
        b += xb * w
    return a, b


@triton.jit
def rows_tap(a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, row_ptr, x, cmask, ch, w_col, tap_stride,
             stream_off, W, stride_n, kx, KS: tl.constexpr, STREAMS: tl.constexpr):
    """Column shift kx of one input row of a ROW WALK (the aggregation's `_segment_rows`, the attention's
    CRPE with ROWS): the row's values at columns x + kx - R, channels ch (valid: cmask), one load per
    stream (the second at + stream_off), each multiplied into the KS output rows the input row reaches.
    Output row i - R + j (accumulator a_j; b_j for the second stream) takes input row i through filter
    row ky = 2 R - j, i.e. tap (2 R - j, kx) at w_col + ((2 R - j) KS) tap_stride (tap-major weights,
    `folding`; w_col: each channel's tap (0, kx)). row_ptr: the input row's element (x = 0, channel 0)."""
    R = KS // 2
    col = x + (kx - R)
    m = ((col >= 0) & (col < W))[:, None] & cmask[None, :]
    p = row_ptr + col[:, None] * stride_n + ch[None, :]
    xa = tl.load(p, mask=m, other=0.0).to(tl.float32)
    xb = xa
    if STREAMS == 2:
        xb = tl.load(p + stream_off, mask=m, other=0.0).to(tl.float32)
    w_row = w_col + (2 * R) * KS * tap_stride                  # filter row 2 R: output row i - R (a0)
    step = KS * tap_stride
    a0, b0 = _rows_fma(a0, b0, xa, xb, tl.load(w_row, mask=cmask, other=0.0)[None, :], STREAMS)
    a1, b1 = _rows_fma(a1, b1, xa, xb, tl.load(w_row - step, mask=cmask, other=0.0)[None, :], STREAMS)
    a2, b2 = _rows_fma(a2, b2, xa, xb, tl.load(w_row - 2 * step, mask=cmask, other=0.0)[None, :], STREAMS)
    if KS > 3:
        a3, b3 = _rows_fma(a3, b3, xa, xb, tl.load(w_row - 3 * step, mask=cmask, other=0.0)[None, :], STREAMS)
        a4, b4 = _rows_fma(a4, b4, xa, xb, tl.load(w_row - 4 * step, mask=cmask, other=0.0)[None, :], STREAMS)
    if KS > 5:
        a5, b5 = _rows_fma(a5, b5, xa, xb, tl.load(w_row - 5 * step, mask=cmask, other=0.0)[None, :], STREAMS)
        a6, b6 = _rows_fma(a6, b6, xa, xb, tl.load(w_row - 6 * step, mask=cmask, other=0.0)[None, :], STREAMS)
    return a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6


@triton.jit
def rows_input(a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, i, H, src, x, cmask, ch, w_taps, tap_stride,
               stream_off, W, stride_n, KS: tl.constexpr, STREAMS: tl.constexpr):
    """Input row i of a row walk into its KS rolling accumulators: its KS column shifts (`rows_tap`), all
    loads independent of the accumulators. Rows past the image (i >= H) are not read: the walk's last R
    steps only complete rows. src: the image's element (token 0, channel 0) of the walked channels;
    w_taps: each channel's tap (0, 0) of the tap-major filter (tap t at + t tap_stride)."""
    if i < H:
        row_ptr = src + (i * W).to(tl.int64) * stride_n
        for kx in tl.static_range(KS):
            a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6 = rows_tap(
                a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6, row_ptr, x, cmask, ch,
                w_taps + kx * tap_stride, tap_stride, stream_off, W, stride_n, kx, KS, STREAMS)
    return a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6


@triton.jit
def rows_piece(t, t1, H):
    """The piece of a row walk's run [t, t1) of row tiles that starts at tile t (tile t: row t % H of strip
    t // H): (strip, first row ya, end row yb), the run's rows in that strip; the next piece starts at
    tile t + yb - ya."""
    strip = t // H
    ya = t - strip * H
    return strip, ya, tl.minimum(H, ya + (t1 - t))


@triton.jit
def rows_shift(a0, a1, a2, a3, a4, a5, a6, KS: tl.constexpr):
    """A row walk's KS rolling accumulators one row on: a_j <- a_{j+1}, the last a zero tile (a new output
    row); those past KS stay as they are (unused)."""
    z = tl.zeros_like(a0)
    if KS == 3:
        return a1, a2, z, a3, a4, a5, a6
    elif KS == 5:
        return a1, a2, a3, a4, z, a5, a6
    else:
        return a1, a2, a3, a4, a5, a6, z
