"""Small @triton.jit helpers shared by the aggregation and attention kernels."""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def hardswish(x):
    """x * relu6(x + 3) / 6, in fp32."""
    return x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) * (1.0 / 6.0)


@triton.jit
def mm(a, b, acc, DOT_3XTF32: tl.constexpr):
    """acc + a @ b on fp32 operands with an fp32 accumulator, on tensor cores.

    DOT_3XTF32=1 (fp32 inputs): "tf32x3" (each operand split into two TF32 parts, three
    MMAs): about fp32 accuracy, so fp32 stays within 1e-5. Not "ieee": Triton lowers an
    fp32 "ieee" dot to FMAs holding whole operand rows per thread, which spilled
    hundreds of KB at s = 96.
    DOT_3XTF32=0 (fp16/bf16 inputs): plain TF32 (10 mantissa bits, as many as fp16 and
    more than bf16), so it adds no more error than the input dtype itself.
    Operands stay fp32 in both cases: the interpreter mis-handles bf16 dots, and the
    BatchNorm-folded weights stay unrounded. (The interpreter ignores the precision.)
    """
    if DOT_3XTF32:
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, acc, input_precision="tf32")
    return out


@triton.jit
def depthwise_tile(src, ch, cmask, w_rows, n, y, x, pmask, H, W, stride_n, KS,
                   BLOCK_P: tl.constexpr, CPAD: tl.constexpr):
    """Depthwise KSxKS "same" (zero-padded) stencil on a tile of tokens, fp32 result.

    src: token rows of one image (element (n, c) at src + n * stride_n + c);
    ch: [CPAD] channel offsets to read; cmask: [CPAD] valid channels;
    w_rows: [CPAD] pointers to each channel's KS*KS fp32 taps (row-major);
    n, y, x, pmask: [BLOCK_P] token index, its row/column, and validity;
    KS: window size, a runtime value (one instance serves the 3x3, 5x5 and 7x7 cases,
    which keeps code size and compile time down).
    Returns [BLOCK_P, CPAD]. The halo is read through the cache (no staging).

    The taps are runtime loops, one load in flight per iteration (the other warps hide
    the latency): unrolling the KS*KS taps let the compiler hoist dozens of
    [BLOCK_P, CPAD] 64-bit pointer tiles and loads, and spill. They are `while` loops
    because the Triton interpreter turns runtime scalars into 1-element arrays, which
    NumPy >= 2 refuses as a `range` bound; compiled, both are the same scf loop.
    """
    R = KS // 2
    acc = tl.zeros([BLOCK_P, CPAD], dtype=tl.float32)
    ptr0 = src + n[:, None] * stride_n + ch[None, :]           # tap (0, 0), per token
    cm = cmask[None, :]
    ky = 0
    while ky < KS:
        yy = y + (ky - R)
        row_ok = pmask & (yy >= 0) & (yy < H)
        row_ptr = ptr0 + ((ky - R) * W - R) * stride_n         # tap (ky, 0)
        kx = 0
        while kx < KS:
            xx = x + (kx - R)
            ok = row_ok & (xx >= 0) & (xx < W)
            v = tl.load(row_ptr + kx * stride_n, mask=ok[:, None] & cm, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + (ky * KS + kx), mask=cmask, other=0.0)
            acc += v * wv[None, :]
            kx += 1
        ky += 1
    return acc
