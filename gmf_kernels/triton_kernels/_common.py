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
def mm(a, b, DOT_IEEE: tl.constexpr):
    """a @ b on fp32 operands with an fp32 accumulator.

    DOT_IEEE=1 (fp32 inputs): exact fp32 products (no TF32), so fp32 stays within 1e-5.
    DOT_IEEE=0 (fp16/bf16 inputs): TF32 tensor cores; TF32 keeps 10 mantissa bits, as
    many as fp16 and more than bf16, so it adds no more error than the input dtype.
    Operands are always fp32: the interpreter mis-handles bf16 dots, and the BatchNorm-
    folded weights stay unrounded.
    """
    if DOT_IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision="tf32")
    return out


@triton.jit
def depthwise_tile(src, ch, cmask, w_rows, n, y, x, pmask, H, W, stride_n,
                   KS: tl.constexpr, BLOCK_P: tl.constexpr, CPAD: tl.constexpr):
    """Depthwise KSxKS "same" (zero-padded) stencil on a tile of tokens, fp32 result.

    src: token rows of one image (element (n, c) at src + n * stride_n + c);
    ch: [CPAD] channel offsets to read; cmask: [CPAD] valid channels;
    w_rows: [CPAD] pointers to each channel's KS*KS fp32 taps (row-major);
    n, y, x, pmask: [BLOCK_P] token index, its row/column, and validity.
    Returns [BLOCK_P, CPAD]. The halo is read through the cache (no staging).
    """
    R: tl.constexpr = KS // 2
    acc = tl.zeros([BLOCK_P, CPAD], dtype=tl.float32)
    ptr0 = src + n[:, None] * stride_n + ch[None, :]           # tap (0, 0) offset, per token
    cm = cmask[None, :]
    for ky in tl.static_range(KS):
        yy = y + (ky - R)
        row_ok = pmask & (yy >= 0) & (yy < H)
        row_ptr = ptr0 + ((ky - R) * W - R) * stride_n         # tap (ky, 0)
        for kx in tl.static_range(KS):
            xx = x + (kx - R)
            ok = row_ok & (xx >= 0) & (xx < W)
            v = tl.load(row_ptr + kx * stride_n, mask=ok[:, None] & cm, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + (ky * KS + kx), mask=cmask, other=0.0)
            acc += v * wv[None, :]
    return acc
