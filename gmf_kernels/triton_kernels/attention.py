"""Flash-style factorized attention: split-N combine, then the per-token output.

``gma_combine_kernel``, grid ``(8 x row blocks, B)`` (`config.combine_grid`): program (head, row block,
b) merges the partials of its head's rows (`config.combine_tile`) in segment j = head // 2
(``aggregation``: rows [e_j, e_j + splits[j]) of the packed layout,
e_j = splits[0] + ... + splits[j-1]; segments have their own split counts, passed as four
runtime integers) with the online-softmax recurrence along N, a step of STEP splits at a time:

    M' = max(M, max_t m_t);  L = L e^{M-M'} + sum_t l_t e^{m_t-M'};  ACC = ACC e^{M-M'} + sum_t acc_t e^{m_t-M'}

and writes ``KV = ACC / L`` = softmax_N(K)ᵀ V of that head, fp32, at kv[b, head*d + i, k].
The partials are small: s(d+2) floats per split of a segment, against N*3C activations per image.

``gma_attention_kernel``, grid ``(ceil(N / BLOCK_P), 8, B)``: program (t, head, b) computes,
for its tokens and head,

    A = scale * Q @ KV + Q * (CRPE(V) + bias)

with the head's CRPE window (3x3 for heads 0-1, 5x5 for heads 2-4, 7x7 for heads 5-7,
"same" zero padding), and stores A in x.dtype into channels [head*d, (head+1)*d) of the
pre-projection buffer. Q is read once, V through the stencil halo (cache), KV once. The window
is a runtime value (one instance for the three), or with UNROLL (`GMAShape.ATTN_UNROLL`, a
tuning candidate of "triton.attention") a constexpr per head group with each tap row unrolled,
as the aggregation's UNROLL. With ROWS (`GMAShape.ATTN_ROWS`, a candidate too) the grid is
``(strips x runs, 8, B)``: program t walks a run of rows of one BLOCK_P-column strip
(`attention_rows_plan`, `_attention_rows`). With GROUP (`GMAShape.ATTN_GROUP`, a candidate where
`config.attn_group_applies`: head widths d = 4, 8, 20, padded to 16, 16, 32 lanes) the grid is ``(ceil(N /
BLOCK_P), 3, B)``: program (t, g, b) computes CRPE window g's heads together (`_attention_group`), 2 d or 3 d
channels in one tile.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl

from ._common import DotVariant, crpe_group, depthwise_tile, dot_variant, mm, rows_input, rows_shift, stored
from ._launch import device_guard
from .config import cdiv, combine_grid, combine_tile, dot_pad, dtype_name, operand_precision

#: GROUP's programs per tile and image: the CRPE windows (heads 0-1 3x3, 2-4 5x5, 5-7 7x7)
ATTN_GROUPS = 3


# Shape integers not specialised: see the note above gma_aggregate_kernel (aggregation.py).
@triton.jit(do_not_specialize=["splits0", "splits1", "splits2", "splits3"])
def gma_combine_kernel(part_m, part_l, part_acc, kv, k_max, k_sum, splits0, splits1, splits2, splits3,
                       CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr,
                       STEP: tl.constexpr, STATS: tl.constexpr = False):
    """Program (head, row block, b) merges rows [r ROWS, (r + 1) ROWS) of one head's partials (a row: one
    channel i of K, with its M, L and ACC[i, :]; rows are independent), STEP splits per step.

    Bound aimed at: latency. It reads B R s (d + 2) x 4 bytes (a few hundred KB at batch 1, where the
    aggregation's splits are many: 196 per 7x7 segment at C = 80 56x56), so neither HBM bandwidth nor
    FLOPs bind; the time is the chain of dependent steps. Each step issues STEP x ROWS x D_PAD loads at
    once (`config.combine_tile`: ~4096 elements, 32 a thread at 4 warps), and the (8 x row blocks, B) grid
    spreads a head over several programs. (The first version walked the splits one at a time in 8 programs
    per image: the H200 measured it at 26 us at batch 1, C = 80 56x56, more than the aggregation's 24 us.)"""
    hr = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    RB: tl.constexpr = (D + ROWS - 1) // ROWS                 # row blocks per head
    head = hr // RB
    seg = head // 2
    i = (hr % RB) * ROWS + tl.arange(0, ROWS)                   # the head's rows this program merges
    k = tl.arange(0, D_PAD)
    imask = i < D
    kmask = k < D
    e1 = splits0
    e2 = e1 + splits1
    e3 = e2 + splits2
    rows = e3 + splits3                                          # partial rows per image
    first = tl.where(seg == 0, 0, tl.where(seg == 1, e1, tl.where(seg == 2, e2, e3)))
    count = tl.where(seg == 0, splits0, tl.where(seg == 1, splits1, tl.where(seg == 2, splits2, splits3)))
    M = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    L = tl.zeros([ROWS], dtype=tl.float32)
    ACC = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    ch = (b * rows + first) * (2 * D) + (head % 2) * D + i      # the rows' channels in the segment's first partial row
    tt = tl.arange(0, STEP)
    # A while loop rather than `for t in range(...)`: the Triton interpreter turns scalar
    # arguments into 1-element arrays, which NumPy >= 2.x refuses to use as a range bound.
    t = 0
    while t < count:
        tmask = (t + tt) < count
        off = ch[None, :] + (t + tt)[:, None] * (2 * D)          # [STEP, ROWS]
        m2 = tmask[:, None] & imask[None, :]
        m_t = tl.load(part_m + off, mask=m2, other=float("-inf"))
        l_t = tl.load(part_l + off, mask=m2, other=0.0)
        a_t = tl.load(part_acc + off[:, :, None] * D + k[None, None, :], mask=m2[:, :, None] & kmask[None, None, :],
                      other=0.0)
        M_new = tl.maximum(M, tl.max(m_t, axis=0))
        ref = tl.where(M_new == float("-inf"), 0.0, M_new)     # -inf only in rows past d (no partial)
        alpha = tl.exp(M - ref)                                 # 0 on the first step
        beta = tl.exp(m_t - ref[None, :])                       # 0 at the masked splits
        L = L * alpha + tl.sum(l_t * beta, axis=0)
        ACC = ACC * alpha[:, None] + tl.sum(a_t * beta[:, :, None], axis=0)
        M = M_new
        t += STEP
    L = tl.where(imask, L, 1.0)
    row = head * D + i                                          # channel of the head in kv
    tl.store(kv + (b * CP + row)[:, None] * D + k[None, :], ACC / L[:, None], mask=imask[:, None] & kmask[None, :])
    if STATS:   # the training forward keeps the softmax statistics for the backward (B2 reads them)
        tl.store(k_max + b * CP + row, M, mask=imask)
        tl.store(k_sum + b * CP + row, L, mask=imask)


@triton.jit
def _q_kv(qt, q_b, kv_b, n, pmask, head, CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
          BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, kvt=None):
    """Q KV of one head on a tile (qt: its [BLOCK_P, D_PAD] Q, fp32; kvt: the head's [D_PAD, D_PAD] KV if
    already loaded)."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    ch = head * D + kk
    e = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    if DOT_PRECISION == "ieee":
        # fp32 FMA (sm_70/75, no TF32): as rank-1 updates over k, Q's column k re-read (L1) and
        # KV's row k. A tl.dot here lowers to Triton's FMA dot layout, which shaped the whole
        # kernel's layouts and spilled 0.3-3 KB at D_PAD >= 32 on sm_70/75.
        k = 0
        while k < D:
            qcol = tl.load(q_b + n * CP + head * D + k, mask=pmask, other=0.0).to(tl.float32)
            kvrow = tl.load(kv_b + (head * D + k) * D + kk, mask=kmask, other=0.0)
            e += qcol[:, None] * kvrow[None, :]
            k += 1
    else:
        if kvt is None:
            kvt = tl.load(kv_b + ch[:, None] * D + kk[None, :], mask=kmask[:, None] & kmask[None, :], other=0.0)
        e = mm(qt, kvt, e, DOT_PRECISION, EMULATE_DOTS)
    return e


@triton.jit
def _attention_head(q_b, v_b, kv_b, pre_b, crpe_w, crpe_b, head, first, group_heads, scale,
                    n, y, x, pmask, H, W, KS,
                    C: tl.constexpr, CP: tl.constexpr, D: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                    UNROLL_KX: tl.constexpr = False, r_b=None, N=0, STORE_R: tl.constexpr = False):
    """One tile of one head: A = scale Q KV + Q (CRPE(V) + bias) into pre. STORE_R (the training forward,
    `config.from_planes`): also R = CRPE(V) + bias, channel-first (r_b + channel N + n, the stage dtype),
    which the backward reads (`recompute.gma_recompute_attention_kernel`'s R)."""
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    m2 = pmask[:, None] & kmask[None, :]
    ch = head * D + kk
    qt = tl.load(q_b + n[:, None] * CP + ch[None, :], mask=m2, other=0.0).to(tl.float32)
    if STORE_R and DOT_PRECISION != "ieee":
        # R first, then Q KV on the MMAs: the other order spilled 16 B at C = 80 fp16 on sm_80 (ptxas at 56
        # registers), while with the FMA dots of sm_70/75 (`_q_kv`'s loop) this order spilled 4 B at C = 200
        # fp16 (ptxas at 96): AOT compiles, Triton 3.6
        conv = depthwise_tile(v_b, ch, kmask, crpe_w + (head - first) * D + kk, group_heads * D, n, y, x, pmask,
                              H, W, CP, KS, BLOCK_P, D_PAD, UNROLL_KX)
        rv = conv + tl.load(crpe_b + ch, mask=kmask, other=0.0)[None, :]
        tl.store(r_b + ch[None, :] * N + n[:, None], stored(rv, r_b, EMULATE_DOTS), mask=m2)
        e = _q_kv(qt, q_b, kv_b, n, pmask, head, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
        out = scale * e + qt * rv
    else:         # the eval kernel's order (its registers as before R was kept); R, if kept, after Q KV
        e = _q_kv(qt, q_b, kv_b, n, pmask, head, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS)
        conv = depthwise_tile(v_b, ch, kmask, crpe_w + (head - first) * D + kk, group_heads * D, n, y, x, pmask,
                              H, W, CP, KS, BLOCK_P, D_PAD, UNROLL_KX)
        bias = tl.load(crpe_b + ch, mask=kmask, other=0.0)[None, :]
        out = scale * e + qt * (conv + bias)
        if STORE_R:
            tl.store(r_b + ch[None, :] * N + n[:, None], stored(conv + bias, r_b, EMULATE_DOTS), mask=m2)
    tl.store(pre_b + n[:, None] * C + ch[None, :], stored(out, pre_b, EMULATE_DOTS), mask=m2)


@triton.jit
def _attention_group(q_b, v_b, kv_b, pre_b, crpe_w, crpe_b, first, G: tl.constexpr, scale, n, y, x, pmask, H, W,
                     KS: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr,
                     BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                     UNROLL_KX: tl.constexpr = False, r_b=None, N=0, STORE_R: tl.constexpr = False):
    """GROUP (`GMAShape.ATTN_GROUP`): one tile of a CRPE window's G heads at once (heads first .. first + G - 1,
    channels [first d, (first + G) d), contiguous in q, v, pre and the group's weights), as `_attention_head`
    computes one: A = scale Q KV + Q (CRPE(V) + bias). Q KV of the G heads is one product with the heads' KV
    blocks on the diagonal of a [G_PAD, G_PAD] operand (zeros between the heads: the off-diagonal products are
    tensor-core work thrown away, G - 1 times the useful d x d per head), or on FMA dots (sm_70/75) the same
    rank-1 updates as `_q_kv`, each channel taking its own head's row. STORE_R: R as `_attention_head` keeps it.

    Bound aimed at: the per-head kernel is issue-bound (the H200: 7 % of its byte bound at C = 80), half its CRPE
    lanes masked at d = 8 (D_PAD 16). Here a tap's loads, multiply-adds, index math and weight load serve 2 or 3
    heads: 35 % fewer lanes x taps a token at C = 80 (`config.attn_group_tile_lanes`), toward the same byte bound
    (q and v read once, pre written once)."""
    kk = tl.arange(0, G_PAD)
    gmask = kk < G * D
    ch = first * D + kk
    m2 = pmask[:, None] & gmask[None, :]
    qt = tl.load(q_b + n[:, None] * CP + ch[None, :], mask=m2, other=0.0).to(tl.float32)
    conv = depthwise_tile(v_b, ch, gmask, crpe_w + kk, G * D, n, y, x, pmask, H, W, CP, KS, BLOCK_P, G_PAD,
                          UNROLL_KX)
    rv = conv + tl.load(crpe_b + ch, mask=gmask, other=0.0)[None, :]
    if STORE_R:
        tl.store(r_b + ch[None, :] * N + n[:, None], stored(rv, r_b, EMULATE_DOTS), mask=m2)
    head0 = first * D + (kk // D) * D                           # each channel's head's first channel
    e = tl.zeros([BLOCK_P, G_PAD], dtype=tl.float32)
    if DOT_PRECISION == "ieee":   # rank-1 updates over k (`_q_kv`), channel c taking Q[:, head(c) d + k]
        k = 0
        while k < D:
            qcol = tl.load(q_b + n[:, None] * CP + (head0 + k)[None, :], mask=m2, other=0.0).to(tl.float32)
            kvrow = tl.load(kv_b + (head0 + k) * D + kk % D, mask=gmask, other=0.0)
            e += qcol * kvrow[None, :]
            k += 1
    else:
        same = (kk[:, None] // D) == (kk[None, :] // D)          # block-diagonal: K channel r, V channel c
        kvt = tl.load(kv_b + ch[:, None] * D + (kk % D)[None, :], mask=gmask[:, None] & gmask[None, :] & same,
                      other=0.0)
        e = mm(qt, kvt, e, DOT_PRECISION, EMULATE_DOTS)
    out = scale * e + qt * rv
    tl.store(pre_b + n[:, None] * C + ch[None, :], stored(out, pre_b, EMULATE_DOTS), mask=m2)


@triton.jit
def _attention_rows(q_b, v_b, kv_b, pre_b, crpe_w, crpe_b, head, first, group_heads, scale, strip, ya, yb, H, W,
                    KS: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
                    r_b=None, STORE_R: tl.constexpr = False):
    """ROWS (`GMAShape.ATTN_ROWS`): rows [ya, yb) of one BLOCK_P-column strip of one head, walked down the
    strip as the aggregation's `_segment_rows`: each V row in reach read once (its KS column shifts,
    `_common.rows_input`) into KS rolling CRPE accumulators; after input row i, output row i - R is
    complete and takes Q KV (the head's KV loaded once per program, not per tile) and Q (CRPE + bias).
    Against the tile kernel's KS x KS tap loads per output, KS per input row plus the run's 2 R halo rows.
    Bound aimed at: HBM, reading q and v once (v's halo rows again per run, from L2) and writing the
    head's channels of pre once, with the stencil's L1 loads and FMAs no longer waited for tap by tap
    (compiler figures, docs/performance.md; not measured). STORE_R (the training forward): also R = CRPE(V) +
    bias of each completed row, channel-first (r_b + channel H W + n, the stage dtype), as `_attention_head`
    keeps it."""
    R = KS // 2
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    ch = head * D + kk
    x = strip * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = x < W
    m2 = pmask[:, None] & kmask[None, :]
    tap_stride = group_heads * D
    w0 = crpe_w + (head - first) * D + kk                      # each channel's tap (0, 0)
    kvt = tl.load(kv_b + ch[:, None] * D + kk[None, :], mask=kmask[:, None] & kmask[None, :], other=0.0)
    bias = tl.load(crpe_b + ch, mask=kmask, other=0.0)[None, :]
    z = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6 = z, z, z, z, z, z, z
    i = tl.maximum(ya - R, 0)
    while i < yb + R:
        a0, a1, a2, a3, a4, a5, a6, _, _, _, _, _, _, _ = rows_input(
            a0, a1, a2, a3, a4, a5, a6, z, z, z, z, z, z, z, i, H, v_b, x, kmask, ch, w0, tap_stride, 0, W, CP, KS, 1)
        o = i - R
        if o >= ya:
            n = o * W + x
            qt = tl.load(q_b + n[:, None] * CP + ch[None, :], mask=m2, other=0.0).to(tl.float32)
            if STORE_R:     # R stored before Q KV, as `_attention_head` orders it on the MMA dots
                rv = a0 + bias
                tl.store(r_b + ch[None, :] * (H * W) + n[:, None], stored(rv, r_b, EMULATE_DOTS), mask=m2)
                e = _q_kv(qt, q_b, kv_b, n, pmask, head, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, kvt)
                out = scale * e + qt * rv
            else:           # the eval kernel's code as before R was kept
                e = _q_kv(qt, q_b, kv_b, n, pmask, head, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, kvt)
                out = scale * e + qt * (a0 + bias)
            tl.store(pre_b + n[:, None] * C + ch[None, :], stored(out, pre_b, EMULATE_DOTS), mask=m2)
        a0, a1, a2, a3, a4, a5, a6 = rows_shift(a0, a1, a2, a3, a4, a5, a6, KS)
        i += 1


@triton.jit(do_not_specialize=["N", "H", "W", "run_rows"])
def gma_attention_kernel(
    q, v, kv, pre, r, crpe_w3, crpe_w5, crpe_w7, crpe_b,
    N, H, W, scale, run_rows,
    C: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, UNROLL: tl.constexpr,
    ROWS: tl.constexpr = False, STORE_R: tl.constexpr = False,
    GROUP: tl.constexpr = False, G2_PAD: tl.constexpr = 16, G3_PAD: tl.constexpr = 16,
):
    t = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_b = q + b * N * CP
    v_b = v + b * N * CP
    kv_b = kv + b * CP * D
    pre_b = pre + b * N * C
    r_b = r + b * CP * N                                       # STORE_R only (a placeholder otherwise)
    if ROWS:     # program t: run t % runs of strip t // runs, `run_rows` rows (`attention_call`)
        runs = tl.cdiv(H, run_rows)
        strip = t // runs
        ya = (t - strip * runs) * run_rows
        yb = tl.minimum(H, ya + run_rows)
        if head < 2:
            _attention_rows(q_b, v_b, kv_b, pre_b, crpe_w3, crpe_b, head, 0, 2, scale, strip, ya, yb, H, W, 3,
                            C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, r_b, STORE_R)
        elif head < 5:
            _attention_rows(q_b, v_b, kv_b, pre_b, crpe_w5, crpe_b, head, 2, 3, scale, strip, ya, yb, H, W, 5,
                            C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, r_b, STORE_R)
        else:
            _attention_rows(q_b, v_b, kv_b, pre_b, crpe_w7, crpe_b, head, 5, 3, scale, strip, ya, yb, H, W, 7,
                            C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, r_b, STORE_R)
    else:
        n = t * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = n < N
        y = n // W
        x = n % W
        if GROUP:    # program (t, g, b): CRPE window g's heads together (`_attention_group`; grid (tiles, 3, B))
            if head == 0:
                _attention_group(q_b, v_b, kv_b, pre_b, crpe_w3, crpe_b, 0, 2, scale, n, y, x, pmask, H, W, 3,
                                 C, CP, D, G2_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, UNROLL, r_b, N, STORE_R)
            elif head == 1:
                _attention_group(q_b, v_b, kv_b, pre_b, crpe_w5, crpe_b, 2, 3, scale, n, y, x, pmask, H, W, 5,
                                 C, CP, D, G3_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, UNROLL, r_b, N, STORE_R)
            else:
                _attention_group(q_b, v_b, kv_b, pre_b, crpe_w7, crpe_b, 5, 3, scale, n, y, x, pmask, H, W, 7,
                                 C, CP, D, G3_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, UNROLL, r_b, N, STORE_R)
        elif UNROLL:   # an instance per CRPE window (KS constexpr), each tap row unrolled (_common.depthwise_taps)
            if head < 2:
                _attention_head(q_b, v_b, kv_b, pre_b, crpe_w3, crpe_b, head, 0, 2, scale, n, y, x, pmask, H, W, 3,
                                C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, True, r_b, N, STORE_R)
            elif head < 5:
                _attention_head(q_b, v_b, kv_b, pre_b, crpe_w5, crpe_b, head, 2, 3, scale, n, y, x, pmask, H, W, 5,
                                C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, True, r_b, N, STORE_R)
            else:
                _attention_head(q_b, v_b, kv_b, pre_b, crpe_w7, crpe_b, head, 5, 3, scale, n, y, x, pmask, H, W, 7,
                                C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, True, r_b, N, STORE_R)
        else:        # one instance for the three windows: KS runtime
            ks, first, crpe_w, group_heads = crpe_group(head, crpe_w3, crpe_w5, crpe_w7)
            _attention_head(q_b, v_b, kv_b, pre_b, crpe_w, crpe_b, head, first, group_heads, scale, n, y, x, pmask, H,
                            W, ks, C, CP, D, D_PAD, BLOCK_P, DOT_PRECISION, EMULATE_DOTS, False, r_b, N, STORE_R)


def combine_call(part_m, part_l, part_acc, kv, shape, segment_splits, stats=None):
    """(grid, args, kwargs) of the combine launch: the packed partials part_m, part_l (B, R, s),
    part_acc (B, R, s, d) fp32 of `aggregation` with segment j's splits in rows
    [sum(segment_splits[:j]), sum(segment_splits[:j+1])) (R = sum(segment_splits); the
    aggregation's `JobPlan.segment_splits`) -> kv (B, C', d) fp32; stats: with ``shape.AGG_FROM_Z`` (the
    training forward, and only then), (k_max, k_sum) (B, C') fp32: the softmax's max and sum per channel,
    kept for the backward."""
    segment_splits = tuple(int(x) for x in segment_splits)
    B, R, _ = part_m.shape
    if len(segment_splits) != 4 or min(segment_splits) < 1 or sum(segment_splits) != R:
        raise ValueError(f"segment splits {segment_splits} for {R} partial rows")
    if shape.AGG_FROM_Z != (stats is not None):
        raise ValueError("the softmax statistics are kept with AGG_FROM_Z (the training forward), and only then")
    if stats is not None and any(tuple(t.shape) != (B, shape.CP) or t.dtype != kv.dtype or not t.is_contiguous()
                                 for t in stats):
        raise ValueError(f"k_max, k_sum: contiguous ({B}, {shape.CP}) {kv.dtype} tensors expected")
    k_max, k_sum = stats or (kv, kv)
    rows, step = combine_tile(shape)
    return combine_grid(shape, B), (part_m, part_l, part_acc, kv, k_max, k_sum, *segment_splits), dict(
        CP=shape.CP, D=shape.D, D_PAD=shape.D_PAD, ROWS=rows, STEP=step, STATS=stats is not None,
        num_warps=shape.COMBINE_WARPS)


def launch_combine(kernel, part_m, part_l, part_acc, kv, shape, segment_splits):
    grid, args, kwargs = combine_call(part_m, part_l, part_acc, kv, shape, segment_splits)
    with device_guard(kv):
        kernel[grid](*args, **kwargs)


def attention_call(q, v, kv, pre, weights, H, W, scale, shape, dots: DotVariant, r=None):
    """(grid, args, kwargs) of the attention launch. q, v: (B, N, C') contiguous; kv: (B, C', d)
    fp32; weights: `FoldedGMAWeights` (its crpe_* tensors); writes pre[..., :C'] of (B, N, C). dots: the
    dot variant (with ``shape.ATTN_DOTS16`` its 16-bit-operand form for 16-bit q, `config.operand_precision`).
    r: with ``shape.AGG_FROM_Z`` (the training forward, and only then; tiles or row walks), R = CRPE(V) +
    bias (B, C', H, W) contiguous in q's dtype, kept for the backward."""
    B, N, _ = q.shape
    w = weights
    if shape.AGG_FROM_Z != (r is not None):
        raise ValueError("R is kept with AGG_FROM_Z (the training forward), and only then")
    if r is not None and (tuple(r.shape) != (B, shape.CP, H, W) or r.dtype != q.dtype or not r.is_contiguous()):
        raise ValueError(f"R: a contiguous ({B}, {shape.CP}, {H}, {W}) {q.dtype} tensor expected, got "
                         f"{tuple(r.shape)} {r.dtype}")
    run_rows, programs = attention_rows_plan(H, W, B, shape) if shape.ATTN_ROWS else (0, cdiv(N, shape.ATTN_BLOCK_P))
    args = (q, v, kv, pre, pre if r is None else r, w.crpe_w3, w.crpe_w5, w.crpe_w7, w.crpe_b, N, H, W, scale,
            run_rows)
    kwargs = dict(C=shape.C, CP=shape.CP, D=shape.D, D_PAD=shape.D_PAD, BLOCK_P=shape.ATTN_BLOCK_P,
                  DOT_PRECISION=operand_precision(dots.precision, dtype_name(q.dtype), shape.ATTN_DOTS16),
                  EMULATE_DOTS=dots.emulate, UNROLL=shape.ATTN_UNROLL, ROWS=shape.ATTN_ROWS, STORE_R=r is not None,
                  num_warps=shape.ATTN_WARPS)
    if shape.ATTN_GROUP:   # a program per CRPE window's heads: (2 d and 3 d channels, padded)
        kwargs.update(GROUP=True, G2_PAD=dot_pad(2 * shape.D), G3_PAD=dot_pad(3 * shape.D))
    return (programs, ATTN_GROUPS if shape.ATTN_GROUP else 8, B), args, kwargs


#: ROWS: about this many programs (x 8 heads x B) at least, where the rows allow: rows per program are cut
#: down from whole strips until the grid has them (an estimate of a few waves of small programs on a
#: 100-150 SM GPU; each program's run re-reads 2 R halo rows, so longer runs read less)
ATTN_ROWS_TARGET = 2048
#: ... but runs of at least this many rows (or H): a run of L rows loads KS (L + 2 R) V row shifts for its
#: L output rows, per output row 17.5 at L = 4 for the 7x7 heads against 49 taps in the tile kernel
ATTN_ROWS_MIN_RUN = 4


def attention_rows_plan(H: int, W: int, B: int, shape):
    """(rows per program, programs per (head, image)) of the ROWS attention: strips of ATTN_BLOCK_P columns,
    each cut into runs of equal rows, as few runs as give about ATTN_ROWS_TARGET programs in all, each run
    at least ATTN_ROWS_MIN_RUN rows (or the whole strip)."""
    strips = cdiv(W, shape.ATTN_BLOCK_P)
    runs = max(1, min(H // min(H, ATTN_ROWS_MIN_RUN), cdiv(ATTN_ROWS_TARGET, strips * 8 * B)))
    run_rows = cdiv(H, runs)
    return run_rows, strips * cdiv(H, run_rows)


def launch_attention(kernel, q, v, kv, pre, weights, H, W, scale, shape, dots: Optional[DotVariant] = None):
    """Launch the attention kernel; arguments as `attention_call` (dots: by default q's variant)."""
    grid, args, kwargs = attention_call(q, v, kv, pre, weights, H, W, scale, shape, dots or dot_variant(q))
    with device_guard(q):
        kernel[grid](*args, **kwargs)
