"""The backward's recompute on the Triton stages, as kernels: kernels, launchers, then `recompute`.

    rc = recompute(qkv, H, W, wts, ln_eps)        # backward.recompute's contract, Triton stage set

`backward.recompute` (PyTorch ops) rebuilds what the forward kernels did not keep: Z, the
proxies P, the softmax over tokens of K and KV = Ks^T V, the CRPE R = conv(V) + bias, the
depthwise inputs u_j (layout copies of qkv) and outputs y_j, and the local branch's depthwise
input u4 / output w4, normalised values xh4 and 1/std rstd4. Here the same tensors (in the stage dtype,
`config.stage_dtype`: qkv's own for fp16/bf16 layers, fp32 for fp32 ones; computed in fp32
registers and rounded once on store; the small ones fp32; the same layouts) come from three launches, but for the depthwise inputs:
the Triton stages read those from qkv itself (rc["qkv"], `aggregation_backward.qkv_layout`), so
no copy of them is made:

1. ``statistics.gma_recompute_z_kernel`` (op ``gmf::triton_proxy_z``): Z, V = P of the v images
   (P = hardswish(Z a + b); q's and k's proxies are computed from Z by their readers) and the
   depthwise outputs y_1..3, reading qkv once (statistics.py). In a training step the statistics
   pass has kept Z and y (statistics.py, "Planes kept for the backward"; `recompute`'s planes): then
   ``gma_proxy_v_kernel`` instead, V from the kept Z alone.
2. ``gma_recompute_attention_kernel``, grid ``(SPLITS, 8, B)``: per head h, over its run of token
   tiles, the online softmax of K = hardswish(Z a + b) of the k images (FlashAttention's
   rescaling along N: `aggregation._online_softmax_kv`, the forward's own code) into a
   per-program partial (max M, sum L of
   exp(K - M), exp(K - M)^T V), and the head's CRPE stencil of V (`_common.depthwise_tile`, the
   window of the head's group: 3x3 heads 0-1, 5x5 heads 2-4, 7x7 heads 5-7) plus bias, stored
   as R. The launcher merges the SPLITS partials (a tiny reduction, in PyTorch: B SPLITS C'
   (d + 2) floats) into the statistics the B2 kernel takes, ``k_max`` (M) and ``k_sum`` (L)
   (B, 8, d), and KV = (merged exp(K - M)^T V) / L (B, 8, d, d). Ks (B, C', N) is never formed:
   the B2 kernel recomputes it from K and (M, L) (attention_backward.py).
3. ``gma_recompute_local_kernel``, grid ``(SPLITS, B)``: the local branch as the forward computes
   it (`aggregation._local_branch`: depthwise 3x3 of segment 4 of q, k, v, the 3s -> s pointwise
   as ``tl.dot``, LayerNorm statistics), storing w4 (the depthwise output), xh4 = (z4 - mean)
   rstd and rstd4, all channel-first.

In a training step whose forward read the kept Z (`config.from_planes`) that forward stored what 2 and
3 make (the aggregation's `_local_branch` with STORE; the attention kernel's R with STORE_R, the combine's
KV and its k_max, k_sum with STATS), and neither launch runs (`recompute`'s planes, `backward.KeptPlanes`):
the backward's one recompute launch is then V from Z.

Dots: the backward's (`statistics.backward_dots`: the forward's variant for qkv's dtype, so
3xTF32 for fp32 and one TF32 pass for fp16/bf16 on sm_80+, FMAs on sm_70/75), on the
stage tensors widened to fp32: the recompute rebuilds what the forward computed. Split-N
(`aggregation.split_plan`): about SPLIT_TARGET programs at any batch (at batch 1 the 8 heads of
an image would be 8 programs), deterministic (no atomics).

**Bytes per token** (C' = 4s, fp32 = 4 B, e = qkv's element size, the stage tensors' too; the
comparison with PyTorch below is at fp32, e = 4):

* attention kernel: reads Z of k and V (2 C' e), writes R (C' e); the halo comes from L1/L2.
  PyTorch's recompute of the same (fp32): softmax reads K and writes Ks (2 C'), the einsum reads
  Ks and V (2 C'), the CRPE's three depthwise convolutions read V and write their outputs, then
  a cat copies them (4 C'); and `attention_backward.plan_b2` read K twice more for (M, L)
  without a recompute kernel (2 C'): 10 C' x 4 against 3 C' x 4. FLOPs: the CRPE stencil, 2 x
  (2 x 9 + 3 x 25 + 3 x 49) d / (8 d) = 60 per channel and token, the softmax ~5, and 2 d on
  tensor cores for exp(K)^T V: ~65 / 12 B ~ 5 FLOP/B on CUDA cores, below the fp32 ridge
  (~20 FLOP/B on an H100): bound aimed at: HBM bandwidth.
* local kernel: reads segment 4 of q, k, v (3 s e; halo from L1/L2), writes w4 (3 s e), xh4
  (s e) and rstd4 (4): 7 s e + 4. PyTorch's: the layout copy of u4 (3 s e + 12 s), the
  depthwise (24 s), the pointwise (12 s + 4 s), var_mean, the normalisation (8 s ...): about 60 s
  + 3 s e. FLOPs: 54 per input channel on CUDA cores (the 3x3 stencil) and 6 s per input channel
  on tensor cores: HBM-bound as well.

Not measured (no GPU where this was written): the interpreter says nothing about speed.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..folding import FoldedGMAWeights
from ._common import DotVariant, crpe_group, depthwise_tile, hardswish, interpreting, stored
from .aggregation import (_layer_norm_rows, _local_mix, _online_softmax_kv, _store_local_norm, _store_partial, _tile,
                          split_plan)
from .aggregation_backward import tuned_dense_b3
from .config import INTERPRETER_BLOCK_P, NUM_HEADS, dot_pad, next_pow2, stage_dtype, strip_width
from .dense_z import planes_without_y
from .statistics import backward_dots, recompute_planes, statistics_dots
from . import tile_spaces
from .tile_spaces import register_tiles

Tensor = torch.Tensor
Launch = Tuple[object, tuple, tuple, dict]


# ---------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["N", "H", "W", "SW", "tiles_per_split"])
def gma_recompute_attention_kernel(
    z, pv, r, part_m, part_l, part_acc, crpe_w3, crpe_w5, crpe_w7, crpe_b, bn_scale, bn_shift,
    N, H, W, SW, tiles_per_split,
    CP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr,
):
    """Program (split, head, b): the softmax partial of K over its tiles and R of those tiles.

    z: Z (3B, C', N) channel-first (q images 0..B-1, then k, then v): K = hardswish(Z bn_scale +
    bn_shift) of the k images, computed on load; pv: P of the v images, V (B, C', N); r: R (B, C',
    N); the three in the stage dtype (`config.stage_dtype`: widened on load, rounded on store);
    part_m, part_l (B, SPLITS, C') and part_acc (B, SPLITS, C', d) fp32: row (b SPLITS + split)
    4 + head // 2 of `aggregation._store_partial`'s packed layout (two heads of d a row)."""
    split = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    B = tl.num_programs(2)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_P))
    k_img = z + (B + b) * (CP * N)
    v_img = pv + b * (CP * N)
    r_img = r + b * (CP * N)
    kk = tl.arange(0, D_PAD)
    kmask = kk < D
    ch = head * D + kk
    ks, first, crpe_w, group_heads = crpe_group(head, crpe_w3, crpe_w5, crpe_w7)
    w_taps = crpe_w + (head - first) * D + kk               # tap-major (ks, ks, group_heads D)
    bias = tl.load(crpe_b + ch, mask=kmask, other=0.0)[None, :]
    a = tl.load(bn_scale + ch, mask=kmask, other=0.0)[None, :]
    bb = tl.load(bn_shift + ch, mask=kmask, other=0.0)[None, :]
    M = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
    L = tl.zeros([D_PAD], dtype=tl.float32)
    ACC = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    t = t0
    while t < t1:
        n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
        m2 = pmask[:, None] & kmask[None, :]
        off = ch[None, :] * N + n[:, None]
        zk = hardswish(tl.load(k_img + off, mask=m2, other=0.0).to(tl.float32) * a + bb)
        zv = tl.load(v_img + off, mask=m2, other=0.0).to(tl.float32)
        M, L, ACC = _online_softmax_kv(zk, zv, pmask, M, L, ACC, DOT_PRECISION, EMULATE_DOTS)
        conv = depthwise_tile(v_img, ch * N, kmask, w_taps, group_heads * D, n, y, x, pmask, H, W, 1, ks, BLOCK_P,
                              D_PAD)
        tl.store(r_img + off, stored(conv + bias, r_img, EMULATE_DOTS), mask=m2)
        t += 1
    row = (b * tl.num_programs(0) + split) * 4 + head // 2     # 4 rows of two heads per (b, split)
    _store_partial(M, L, ACC, row, head % 2, part_m, part_l, part_acc, D, D_PAD)


@triton.jit(do_not_specialize=["N", "H", "W", "SW", "tiles_per_split"])
def gma_recompute_local_kernel(
    qkv, w4, xh4, rstd4, local_dw, local_pw,
    N, H, W, SW, stride_qkv_b, stride_qkv_n, tiles_per_split, ln_eps,
    C: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, CK: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr, KEEP_W4: tl.constexpr = True,
):
    """Program (split, b): the local branch of its tiles (the forward's `aggregation._local_mix` and
    `_layer_norm_rows`), storing w4 (B, 3s, N), xh4 (B, s, N) in the stage dtype and rstd4 (B, N)
    fp32, channel-first (channel which * s + c of w4: segment 4 of q, k, v). KEEP_W4 false (a backward in
    B3's dense form, which reads no w4): xh4 and rstd4 only."""
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_P))
    qkv_b = qkv + b * stride_qkv_b
    w4_b = w4 + b * (3 * S * N)
    xh4_b = xh4 + b * (S * N)
    rstd4_b = rstd4 + b * N
    co = tl.arange(0, S_PAD)
    omask = co < S
    t = t0
    while t < t1:
        n, pmask, y, x = _tile(t, N, H, W, SW, BLOCK_P)
        z = _local_mix(qkv_b, local_dw, local_pw, n, y, x, pmask, H, W, stride_qkv_n, C, S, CK, S_PAD, BLOCK_P,
                       DOT_PRECISION, EMULATE_DOTS, w4_b, N, KEEP_W4)
        diff, rs = _layer_norm_rows(z, omask, ln_eps, S)
        _store_local_norm(xh4_b, rstd4_b, diff, rs, co, n, pmask, omask, N, EMULATE_DOTS)
        t += 1


@triton.jit(do_not_specialize=["N"])
def gma_proxy_v_kernel(z, pv, bn_scale, bn_shift, N, CP: tl.constexpr, BLOCK: tl.constexpr,
                       EMULATE: tl.constexpr):
    """Program (block, channel c, image b): PV[b, c, n] = hardswish(Z[2B + b, c, n] bn_scale[c] +
    bn_shift[c]) for BLOCK tokens n, from the Z the statistics pass kept (`recompute` with planes); z
    (3B, CP, N) and pv (B, CP, N) in the stage dtype (widened on load, rounded once on store).

    Bound aimed at: HBM bandwidth, one read and one write per element (2 e bytes, ~8 FLOP: far below
    any ridge); every program a contiguous run of one channel plane."""
    blk = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    B = tl.num_programs(2)
    n = blk * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    a = tl.load(bn_scale + c)
    sh = tl.load(bn_shift + c)
    zv = tl.load(z + ((2 * B + b) * CP + c) * N + n, mask=mask, other=0.0).to(tl.float32)
    dst = pv + (b * CP + c) * N
    tl.store(dst + n, stored(hardswish(zv * a + sh), dst, EMULATE), mask=mask)


# ---------------------------------------------------------------- launchers
#: GPU tiles, from the AOT compile (ptxas -v of the launchers' specialisations at 14x14 B = 128, then
#: of every real call: benchmarks/results/triton_statistics_resources_*.md; registers per thread; no
#: GPU, nothing timed):
#: attention kernel (BLOCK_P, num_warps) by D_PAD. D_PAD = 32 (C = 200..320): (64, 4) spilled 512 B on
#: sm_80, (32, 4) took 249 / 246 registers on sm_80 / sm_90, (32, 8) 208 / 204 (one CTA of 8 warps
#: per SM), (16, 4) 168 / 159 (three CTAs, 12 warps). D_PAD = 16 (C = 40..160): (32, 8) spilled 12 B
#: at C = 40 / 80 on sm_80 (at 80 registers), (16, 4) 8 B at C = 40 on sm_80, (64, 4) 250-600 B on
#: sm_70; (32, 4) none (96-165 on sm_80 / sm_90, up to 255 on sm_70's FMA dots).
#: local kernel (BLOCK_P, num_warps, CK) by S_PAD: (64, 8, 16) 228 / 136 at S_PAD = 64 ((64, 4, 32)
#: spilled 204 B, (32, 8, 16) 16-36 B), 125 / 125 at 32 ((64, 4, 16) spilled 4 B on sm_80); at 16
#: (32, 8, 16) 128 / 108; at 128 (C = 360, 480, sm_80/90 only: config.BACKWARD_KERNELS_MAX_S_PAD)
#: (32, 8, 16) 160-178, where (16, 4, 16) spilled 8-12 B on sm_90 and (16, 8, 16) took 174-235.
#: The attention kernel at D_PAD = 64 (C = 360, 480) takes SMALLEST_TILE: no spill on sm_80/90.
#: One-pass TF32 ("tf32": the backward of fp16/bf16 layers, `statistics.backward_dots`; the fp16 and
#: bf16 real calls on sm_80 / sm_90, 2026-12-02): attention (32, 8) none at every width (at most
#: 196 / 191), where (16, 4) spilled 72 B at C = 240 on sm_90, (16, 8) 24 B at C = 320 on sm_80,
#: (32, 4) 136 B and (64, 4) up to 2.4 KB at C = 480; local: at S_PAD = 32 (C = 160) (64, 8, 16)
#: spilled 64 B and (32, 8, 16) 12 B on sm_80, (64, 4, 16) none (128 / 136); at S_PAD = 128
#: (32, 8, 16) 32 B at C = 480 on sm_80, (64, 8, 16) none (224 / 220); at 16 and 64 the tiles
#: above, none (at most 174).
ATTENTION_TILES = {16: (32, 4), 32: (16, 4)}
#: Since the stage tensors of fp16/bf16 layers are fp16/bf16 (`config.stage_dtype`, 2026-12-02), ptxas
#: spilled a few bytes at D_PAD = 16 with TF32 tiles, erratically, where it chose 48-72 registers.
#: Since the kernel reads Z of k and forms K on load (2026-12-03; C = 40, 80, 160, batch 128, fp16
#: and bf16): (32, 2) spilled 16 B at C = 160 on sm_90, (16, 4) 8-16 B at C = 40, 80 on sm_80,
#: (32, 4) none on sm_80 and sm_90 (126-128 registers), (32, 8) none (64-112): D_PAD = 16 takes
#: ATTENTION_TILES' (32, 4) with every dot precision.
ATTENTION_TILES_BY_DOTS = {"tf32": {32: (32, 8), 64: (32, 8)}}
LOCAL_TILES = {16: (32, 8, 16), 32: (64, 8, 16), 64: (64, 8, 16), 128: (32, 8, 16)}
LOCAL_TILES_BY_DOTS = {"tf32": {32: (64, 4, 16), 128: (64, 8, 16)}}
SMALLEST_TILE = (16, 4)
#: split-N: aim for about this many programs
SPLIT_TARGET = 1024


def attention_tiles(d: int, N: int, precision: str) -> Tuple[int, int]:
    """(BLOCK_P, num_warps) of the attention recompute with dots of this precision: one large tile
    under the interpreter, else `ATTENTION_TILES_BY_DOTS` / `ATTENTION_TILES` / `SMALLEST_TILE`."""
    if interpreting():
        return min(INTERPRETER_BLOCK_P, max(16, next_pow2(N))), 4
    return gpu_attention_tiles(d, precision)


def gpu_attention_tiles(d: int, precision: str) -> Tuple[int, int]:
    """The GPU tile of the attention recompute (the default of "triton.recompute_attention")."""
    d_pad = dot_pad(d)
    return ATTENTION_TILES_BY_DOTS.get(precision, {}).get(d_pad) or ATTENTION_TILES.get(d_pad, SMALLEST_TILE)


def local_tiles(s: int, N: int, precision: str) -> Tuple[int, int, int]:
    """(BLOCK_P, num_warps, CK) of the local-branch recompute with dots of this precision: one large
    tile and one channel chunk under the interpreter, else `LOCAL_TILES_BY_DOTS` / `LOCAL_TILES`."""
    if interpreting():
        return min(INTERPRETER_BLOCK_P, max(16, next_pow2(N))), 4, dot_pad(s)
    return gpu_local_tiles(s, precision)


def gpu_local_tiles(s: int, precision: str) -> Tuple[int, int, int]:
    """The GPU tile of the local-branch recompute (the default of "triton.recompute_local")."""
    s_pad = dot_pad(s)
    return LOCAL_TILES_BY_DOTS.get(precision, {}).get(s_pad) or LOCAL_TILES.get(s_pad, SMALLEST_TILE + (16,))


ATTENTION_FAMILY = "triton.recompute_attention"
LOCAL_FAMILY = "triton.recompute_local"
#: Further tiles the tuner tries (benchmarks/tune.py --train refuses one that spills at the call's
#: width). AOT sweep of the candidates (2026-12-02, `specializations.candidate_specializations`: GroupMixFormer-S's real calls at batch 128, fp32 and bf16, sm_90): attention (64, 4) spilled 124-200 B at C = 320, (16, 4) 24 B at C = 80; local
#: (64, 4, 16) 88 B at C = 320 fp32 (the one-pass TF32 default at S_PAD 32, kept there), (32, 4, 16)
#: 40 B at C = 160 bf16; the others none (at most 217 / 190 registers). So those are not listed.
ATTENTION_SEARCH = ((32, 4), (32, 8), (16, 8))
LOCAL_SEARCH = ((32, 8, 16), (64, 8, 16), (16, 4, 16))


def plan_recompute_attention(Z: Tensor, PV: Tensor, H: int, W: int, wts: FoldedGMAWeights,
                             tiles: Optional[Tuple[int, int]] = None, dots: Optional[DotVariant] = None
                             ) -> Tuple[Dict[str, Tensor], Launch]:
    """Buffers (R (B, C', H, W) in the stage dtype, part_m, part_l (B, SPLITS, C'), part_acc (B,
    SPLITS, C', d) fp32) and the launch of `gma_recompute_attention_kernel` over Z (3B, C', H, W)
    (K from its k images) and PV (B, C', H, W) (V, the v images' proxies), both contiguous in one
    stage dtype (fp32, fp16, bf16: `config.stage_dtype`), without launching (meta tensors work).
    dots: default the fp32 variant (`statistics_dots`); `recompute` passes the backward's."""
    I, cp, _, _ = Z.shape
    B, N, d = I // 3, H * W, cp // NUM_HEADS
    for name, t, rows in (("Z", Z, 3 * B), ("PV", PV, B)):
        if (t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not t.is_contiguous()
                or tuple(t.shape) != (rows, cp, H, W) or t.dtype != Z.dtype):
            raise TypeError(f"{name}: a contiguous fp32/fp16/bf16 ({rows}, {cp}, {H}, {W}) tensor in Z's dtype "
                            f"expected, got {t.dtype} {tuple(t.shape)}, strides {t.stride()}")
    dots = dots or statistics_dots(Z)
    bp, warps = tiles or attention_tiles(d, N, dots.precision)
    splits, tps = split_plan(N, B, bp, SPLIT_TARGET, NUM_HEADS)
    f32 = dict(dtype=torch.float32, device=Z.device)
    buf = {"R": torch.empty(B, cp, H, W, dtype=Z.dtype, device=Z.device), "part_m": torch.empty(B, splits, cp, **f32),
           "part_l": torch.empty(B, splits, cp, **f32), "part_acc": torch.empty(B, splits, cp, d, **f32)}
    crpe = [w.float().contiguous() for w in (wts.crpe_w3, wts.crpe_w5, wts.crpe_w7, wts.crpe_b)]
    bn = [w.reshape(-1).float().contiguous() for w in (wts.bn_scale, wts.bn_shift)]
    args = (Z, PV, buf["R"], buf["part_m"], buf["part_l"], buf["part_acc"], *crpe, *bn, N, H, W, strip_width(W), tps)
    kwargs = dict(CP=cp, D=d, D_PAD=dot_pad(d), BLOCK_P=bp, DOT_PRECISION=dots.precision,
                  EMULATE_DOTS=dots.emulate, num_warps=warps)
    return buf, (gma_recompute_attention_kernel, (splits, NUM_HEADS, B), args, kwargs)


def merge_softmax_partials(part_m: Tensor, part_l: Tensor, part_acc: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(k_max, k_sum, KV) from the per-split partials (B, SPLITS, C'[, d]): k_max = max over the
    splits, k_sum = sum e^(M_t - k_max) L_t, KV = sum e^(M_t - k_max) ACC_t / k_sum, shaped
    (B, 8, d), (B, 8, d), (B, 8, d, d) (every split holds tokens: its M is finite)."""
    B, _, cp = part_m.shape
    d = cp // NUM_HEADS
    k_max = part_m.amax(dim=1)
    wgt = torch.exp(part_m - k_max[:, None])
    k_sum = (wgt * part_l).sum(dim=1)
    kv = (wgt[..., None] * part_acc).sum(dim=1) / k_sum[..., None]
    return k_max.view(B, NUM_HEADS, d), k_sum.view(B, NUM_HEADS, d), kv.view(B, NUM_HEADS, d, d)


def plan_recompute_local(qkv: Tensor, H: int, W: int, wts: FoldedGMAWeights, ln_eps: float,
                         tiles: Optional[Tuple[int, int, int]] = None, dots: Optional[DotVariant] = None,
                         keep_w4: bool = True) -> Tuple[Dict[str, Tensor], Launch]:
    """Buffers (w4 (B, 3s, H, W), xh4 (B, s, H, W) in the stage dtype, rstd4 (B, 1, H, W) fp32) and the launch of
    `gma_recompute_local_kernel`, without launching (meta tensors work). qkv: (B, N, 3C).
    dots: default `statistics.backward_dots`. keep_w4 False (a backward in B3's dense form): w4 empty, (0,), and
    not stored (the kernel's KEEP_W4), as the training forward's (`launcher.plan_pre_projection`)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    s = C // 5
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    dots = dots or backward_dots(qkv)
    bp, warps, ck = tiles or local_tiles(s, N, dots.precision)
    splits, tps = split_plan(N, B, bp, SPLIT_TARGET, 1)
    f32 = dict(dtype=torch.float32, device=qkv.device)
    st = dict(dtype=stage_dtype(qkv.dtype), device=qkv.device)
    buf = {"w4": torch.empty(*((B, 3 * s, H, W) if keep_w4 else (0,)), **st),
           "xh4": torch.empty(B, s, H, W, **st), "rstd4": torch.empty(B, 1, H, W, **f32)}
    args = (qkv, buf["w4"], buf["xh4"], buf["rstd4"], wts.local_dw.float().contiguous(),
            wts.local_pw.float().contiguous(), N, H, W, strip_width(W), qkv.stride(0), qkv.stride(1), tps, float(ln_eps))
    kwargs = dict(C=C, S=s, S_PAD=dot_pad(s), CK=min(ck, dot_pad(s)), BLOCK_P=bp, DOT_PRECISION=dots.precision,
                  EMULATE_DOTS=dots.emulate, num_warps=warps)
    if not keep_w4:
        kwargs["KEEP_W4"] = False
    return buf, (gma_recompute_local_kernel, (splits, B), args, kwargs)


#: tokens per program of `gma_proxy_v_kernel` (4 warps: 8 elements a thread)
PROXY_V_BLOCK = 1024


def plan_proxy_v(Z: Tensor, wts: FoldedGMAWeights) -> Tuple[Tensor, Launch]:
    """PV (B, 4s, H, W) in Z's dtype and the `gma_proxy_v_kernel` launch that fills it from the v
    images of Z (3B, 4s, H, W) (the statistics pass's planes), without launching."""
    I, CP, H, W = Z.shape
    B, N = I // 3, H * W
    pv = torch.empty(B, CP, H, W, dtype=Z.dtype, device=Z.device)
    block = min(PROXY_V_BLOCK, max(16, next_pow2(N)))
    args = (Z, pv, wts.bn_scale.float().contiguous(), wts.bn_shift.float().contiguous(), N)
    kwargs = dict(CP=CP, BLOCK=block, EMULATE=interpreting(), num_warps=4)
    return pv, (gma_proxy_v_kernel, (-(-N // block), CP, B), args, kwargs)


def _launch(launches: List[Launch], like: Tensor) -> None:
    from ._launch import device_guard, wrap_triton
    with device_guard(like):
        for kernel, grid, args, kwargs in launches:
            wrap_triton(kernel)[grid](*args, **kwargs)


def recompute(qkv: Tensor, H: int, W: int, wts: FoldedGMAWeights, ln_eps: float,
              planes=None) -> Dict[str, Tensor]:
    """`backward.recompute` on kernels (`backward.Stages.recompute` of `train_op.triton_stages`):
    the keys the Triton stages read, Z, V (P of the v images: the stages take q's and k's
    proxies from Z), y, KV, k_max, k_sum, R, w4, xh4, rstd4, and qkv itself (the depthwise
    inputs, read in place: not P, u, u4, Ks, pre_act, streams, the PyTorch stages' own). Three launches (module docstring), with the backward's dots (`statistics.backward_dots`).
    planes: what the training forward kept (`backward.KeptPlanes`): Z and y of its statistics pass
    (`statistics.statistics_planes`): then the first launch is `gma_proxy_v_kernel` (V from Z) instead of
    the recompute of Z, V and y (statistics.py's module docstring, "Planes kept for the backward"); and
    what its Triton forward kept where it read them (`config.from_planes`): the local branch's w4, xh4,
    rstd4 and the attention's R, KV, k_max, k_sum: then neither `gma_recompute_local_kernel` nor
    `gma_recompute_attention_kernel` runs.
    Without planes (eval mode with gradients) where the backward runs B3's dense form (`aggregation_backward.
    tuned_dense_b3`), which reads neither y nor w4: Z as a training forward's statistics pass keeps it for that
    backward (`dense_z.planes_without_y`: on tensor cores where the dense form applies), V from it, and the local
    branch without w4.
    Compute dtypes other than float32 (float64 inputs) take the PyTorch `backward.recompute`."""
    if qkv.dtype == torch.float64 or wts.pw.dtype != torch.float32:
        from .backward import recompute as torch_recompute
        return torch_recompute(qkv, H, W, wts, ln_eps)
    dots = backward_dots(qkv)
    C = qkv.shape[-1] // 3
    dense = tuned_dense_b3(qkv)
    first: List[Launch] = []
    if planes is None and not dense:
        Z, V, y = recompute_planes(qkv, H, W, wts)          # the op takes backward_dots(qkv) itself
    else:
        # (eval mode with gradients and a dense backward: Z as that backward's statistics pass keeps it, no y)
        Z, y_all = ((planes.z, planes.y_all) if planes is not None
                    else planes_without_y(qkv, local=False)(qkv, H, W, wts)[3][:2])
        V, lv = plan_proxy_v(Z, wts)
        y = list(y_all.unbind(0))
        first.append(lv)
    launches = first
    if planes is not None and planes.R is not None:     # kept by the forward's attention and combine
        B, cp = Z.shape[0] // 3, Z.shape[1]
        heads = (B, NUM_HEADS, cp // NUM_HEADS)
        att = dict(R=planes.R, KV=planes.kv.view(*heads, -1), k_max=planes.k_max.view(heads),
                   k_sum=planes.k_sum.view(heads))
    else:
        att, la = plan_recompute_attention(Z, V, H, W, wts, tile_spaces.tuned_tiles(ATTENTION_FAMILY, C, qkv),
                                           dots=dots)
        launches = launches + [la]
    if planes is not None and planes.w4 is not None:     # kept by the forward's local branch
        loc = dict(w4=planes.w4, xh4=planes.xh4, rstd4=planes.rstd4)
    else:
        loc, ll = plan_recompute_local(qkv, H, W, wts, ln_eps, tile_spaces.tuned_tiles(LOCAL_FAMILY, C, qkv), dots=dots,
                                       keep_w4=not dense)
        launches = launches + [ll]
    _launch(launches, qkv)
    if "KV" not in att:
        att["k_max"], att["k_sum"], att["KV"] = merge_softmax_partials(att["part_m"], att["part_l"], att["part_acc"])
    return dict(Z=Z, V=V, y=y, KV=att["KV"], k_max=att["k_max"], k_sum=att["k_sum"], R=att["R"], w4=loc["w4"],
                xh4=loc["xh4"], rstd4=loc["rstd4"], qkv=qkv)


register_tiles(ATTENTION_FAMILY, ("BLOCK_P", "num_warps"), lambda C, p: gpu_attention_tiles(C // 10, p),
               lambda C, p: ATTENTION_SEARCH, [gma_recompute_attention_kernel])
register_tiles(LOCAL_FAMILY, ("BLOCK_P", "num_warps", "CK"), lambda C, p: gpu_local_tiles(C // 5, p),
               lambda C, p: LOCAL_SEARCH,
               [gma_recompute_local_kernel])
