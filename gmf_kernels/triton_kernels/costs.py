"""Cost model of the three Triton kernels, from the launcher's own plan (one place for the formulas).

    from gmf_kernels.triton_kernels.costs import cost
    c = cost("gma_aggregate_kernel", B=128, H=56, W=56, C=80, dtype="bf16")   # -> Cost
    c.bytes, c.tc_flops, c.cuda_flops, c.grid

Used by ``benchmarks/roofline.py`` (lower-bound times), and meant for ``benchmarks/ops.py``
(GB/s, TFLOP/s) and ``benchmarks/tune.py``. Pure Python: nothing is launched or compiled.

What is counted (assumptions, also in each function's docstring):

* **bytes** = compulsory traffic of the kernel as designed: every element it must read
  read once, every element it writes written once, the folded fp32 weights it reads once
  (in practice they are re-read per program from L2; halos of the stencils come from
  L1/L2 and are not counted). Activations in the I/O dtype (``e`` bytes), the split-N
  partials and ``kv`` in fp32. So ``bytes / time`` is comparable with HBM bandwidth.
* **tc_flops** = 2 x the useful multiply-adds of the channel mixes that the kernel issues as
  ``tl.dot`` (the s x s pointwise, the 3s -> s local pointwise, exp(K)^T V, Q KV). On sm_80+
  they run on tensor cores: ``tc_precision`` says how ("tf32x3": three TF32 passes on fp32
  operands for fp32 inputs; "tf32": one TF32 pass for fp16/bf16 inputs; "bf16" / "fp16": the
  DOTS16 tuning candidates' 16-bit operands, `config.operand_precision`, `_common.mm`). With ``"ieee"`` dots (sm_70/75) Triton lowers them to
  FMAs, so they count as ``cuda_flops`` and ``tc_flops`` is 0. ``tc_flops_padded`` is what the
  MMAs execute with the tile padding (D_PAD, S_PAD, CK chunks, BLOCK_P over N).
* **cuda_flops** = 2 x the multiply-adds of the depthwise stencils (3x3/5x5/7x7, the local
  3x3, CRPE) and of the combine's rescaling (2 multiply-adds per partial element), plus the
  FMA dots of the "ieee" variant. Element-wise work (BatchNorm affine, hardswish, exp,
  LayerNorm) is not counted, as in benchmarks/ops.py.
* **grid** = the launch grid of `launcher.plan_pre_projection` for this call (per-job split-N
  plan of `aggregation.job_plan`, balanced by `aggregate_job_costs`, tiles of `config.gma_shape` for the dot variant of the dtype on
  the given GPU, or the tuned/explicit `shape`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .config import (GMAShape, combine_grid, dot_pad, dot_precision, dtype_name, gma_shape, operand_precision,
                     stage_dtype, torch_dtype)

KERNELS = ("gma_aggregate_kernel", "gma_combine_kernel", "gma_attention_kernel")
#: the attention backward (attention_backward.py) as the Triton stage set runs it: Q, K, V (slices
#: of the recompute's P), R and every gradient it writes are fp32 stage tensors, dA is the view of
#: the layer's output gradient in the layer's dtype (`backward.Stages.grad_pre_as_is`), and the dots
#: are the layer dtype's (`statistics.backward_dots`); `dtype` is the layer's
BACKWARD_KERNELS = ("gma_b1_dkv_kernel", "gma_b2_attention_kernel", "gma_b2_crpe_kernel")
#: the aggregation backward (aggregation_backward.py) of one training call as the Triton stage set
#: runs it (batch statistics; B3 fused at S_PAD <= 64; input gradients stored into d_qkv in the
#: layer's dtype, depthwise inputs read from qkv): each kernel's cost is the sum over its launches
#: in that call (dz: 1 or 2, dw_backward: 4 = segments 1..3 and the local branch's 3x3, dw_wgrad: 7 = those
#: four and the CRPE's three windows), its grid the first launch's (detail: "launches", "programs_all")
#: the training statistics pass (statistics.py, fp32's dots) and the backward's recompute (statistics.py,
#: recompute.py; the layer dtype's dots) of one training call
RECOMPUTE_KERNELS = ("gma_statistics_kernel", "gma_proxy_v_kernel", "gma_recompute_z_kernel",
                     "gma_recompute_attention_kernel", "gma_recompute_local_kernel")
AGG_BACKWARD_KERNELS = ("gma_dz_kernel", "gma_pw_backward_kernel", "gma_dw_backward_kernel",
                        "gma_dw_wgrad_kernel", "gma_local_backward_kernel")
#: the split eval forward's first launch (`config.GMAShape.AGG_SPLIT`): gma_statistics_kernel with STORE =
#: Z_ONLY (`statistics.plan_z_pass`), named apart from the training statistics pass it shares a kernel with
Z_PASS = "gma_z_pass"
ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
#: multiply-adds per channel of one token of the CRPE stencils, per head width d:
#: heads 0-1 3x3, heads 2-4 5x5, heads 5-7 7x7 -> d * (2*9 + 3*25 + 3*49) = 240 d
CRPE_TAPS_PER_D = 2 * 9 + 3 * 25 + 3 * 49
#: taps of the three proxy stencils of segments 1..3: 9 + 25 + 49
PROXY_TAPS = 9 + 25 + 49


@dataclass(frozen=True)
class Cost:
    """Work of one launch. bytes: compulsory; flops: 2 per multiply-add (module docstring)."""
    bytes: int
    tc_flops: int
    cuda_flops: int
    grid: Optional[Tuple[int, ...]]
    tc_precision: str = "-"          # "tf32x3", "tf32", "bf16", "fp16", "-" (no tensor-core work)
    tc_flops_padded: int = 0
    block: Optional[int] = None      # threads per program / CTA
    shared: Optional[int] = None     # bytes of shared memory per CTA known from the plan (CUDA)
    detail: Dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def programs(self) -> Optional[int]:
        if self.grid is None:
            return None
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


def _weights_bytes(C: int) -> Dict[str, int]:
    """fp32 bytes of each folded weight (`folding.weight_shapes`)."""
    from ..folding import weight_shapes
    out = {}
    for name, shp in weight_shapes(C).items():
        n = 1
        for x in shp:
            n *= int(x)
        out[name] = 4 * n
    return out


def _job_plan(N: int, B: int, sh: GMAShape, prec: str, W: int):
    from .aggregation import job_plan  # the launcher's own plan
    return job_plan(N, B, sh, prec, W)


def aggregate_job_costs(sh: GMAShape, prec: str) -> Tuple[float, ...]:
    """`aggregation.aggregate_job_costs` (the per-job cost model lives beside the plan it
    balances, `aggregation.job_plan`; this module only imports from aggregation, never the reverse)."""
    from .aggregation import aggregate_job_costs as job_costs
    return job_costs(sh, prec)


def _norm_dtype(dtype) -> str:
    name = dtype_name(dtype) if not isinstance(dtype, str) else dtype
    name = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)
    if name not in ELEM_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected fp32, fp16 or bf16")
    return name


def shape_for(C: int, dtype, capability: Tuple[int, int] = (9, 0), config: Optional[dict] = None) -> GMAShape:
    """The specialisation a GPU launch of (C, dtype) uses on `capability`: the default tiles of
    `config.gma_shape` for the dot variant, or a tuning config (keys of the "triton.aggregate" /
    "triton.attention" spaces: BLOCK_P, num_warps, CK, STRIP, MERGE, UNROLL, DOTS16, PAIR / ATTN_BLOCK_P,
    ATTN_WARPS, ATTN_UNROLL, ATTN_DOTS16). (The cost models below count the per-head kernel's padded
    work; PAIR's -- no padding column, one [s, s] K^T V -- is not modelled apart.)"""
    dt = _norm_dtype(dtype)
    prec = dot_precision(dt, capability)
    if not config:
        return gma_shape(C, dots=prec)
    # the launcher's own mapping of the two spaces' knobs onto a specialisation (one place), each
    # family's missing knobs (and a 0 ATTN_*) taken from its default
    from . import launcher as L
    from ._common import DotVariant
    tdt = torch_dtype(dt)
    agg = {**L.aggregate_default(C, tdt, capability), **{k: v for k, v in config.items() if not k.startswith("ATTN_")}}
    attn = {**L.attention_default(C, tdt, capability),
            **{{"ATTN_BLOCK_P": "BLOCK_P", "ATTN_WARPS": "num_warps"}.get(k, k[5:]): v
               for k, v in config.items() if k.startswith("ATTN_") and v}}
    return L.shape_from_configs(C, DotVariant(prec, False), agg, attn)


def cost(kernel: str, B: int, H: int, W: int, C: int, dtype, capability: Tuple[int, int] = (9, 0),
         shape: Optional[GMAShape] = None) -> Cost:
    """Cost of one launch of `kernel` (a name in KERNELS, "gma_" and "_kernel" optional) for
    qkv (B, H*W, 3C) in `dtype` ("fp32"/"fp16"/"bf16" or a torch dtype) on a GPU of
    `capability` (default H100, (9, 0)), with the launcher's default tiles or `shape`."""
    name = kernel if kernel.startswith("gma_") else f"gma_{kernel}_kernel"
    dt = _norm_dtype(dtype)
    prec = dot_precision(dt, capability)
    shape = shape or shape_for(C, dt, capability)
    model = {"gma_aggregate_kernel": _aggregate, "gma_combine_kernel": _combine, "gma_attention_kernel": _attention,
             "gma_b1_dkv_kernel": _b1_dkv, "gma_b2_attention_kernel": _b2_attention,
             "gma_b2_crpe_kernel": _b2_crpe}.get(name)
    if name in AGG_BACKWARD_KERNELS:
        return aggregation_backward_costs(B, H, W, shape.C, dt, prec)[name]
    if name in RECOMPUTE_KERNELS:
        return recompute_costs(B, H, W, shape.C, dt, tuple(capability))[name]
    if kernel in (Z_PASS, "z_pass"):
        return z_pass_cost(B, H, W, shape.C, dt, tuple(capability), shape.AGG_ZDENSE)
    if model is None:
        raise ValueError(f"unknown Triton kernel {kernel!r}; expected one of "
                         f"{KERNELS + (Z_PASS,) + BACKWARD_KERNELS + RECOMPUTE_KERNELS + AGG_BACKWARD_KERNELS}")
    return model(B, H, W, dt, prec, shape)


def _tc(prec: str, useful: int, padded: int) -> Tuple[int, int, int, str]:
    """(tc_flops, tc_flops_padded, cuda_flops_from_dots, tc_precision) of a dot workload."""
    if prec == "ieee":                   # FMA dots on sm_70/75: CUDA-core work (as issued, padded)
        return 0, 0, padded, "-"
    return useful, padded, 0, prec


def _aggregate(B: int, H: int, W: int, dt: str, prec: str, sh: GMAShape) -> Cost:
    """gma_aggregate_kernel, grid (PROGRAMS, B): PROGRAMS = sum of the five jobs' splits
    (`aggregation.job_plan`, balanced by `aggregate_job_costs`).

    bytes: qkv read once (B N 3C e), Q and V proxies written (2 B N C' e), the local branch's
    half of pre written (B N s e), the packed split-N partials written (B R s (2 + d) x 4, R =
    the splits of segments 0..3: m, l, and the d x d accumulator per head, two heads a row),
    the folded weights it reads once (bn_scale, bn_shift, dw3, dw5, dw7, pw, local_dw,
    local_pw, ln_weight, ln_bias).
    tc: per token, segments 1-3 x (q, k, v) an s x s pointwise (3 x 3 x s^2 MACs), the local
    3s -> s pointwise (3 s^2), exp(K)^T V for 8 heads (C' d). Padded as the kernel issues
    them: pointwise [BLOCK_P, ceil(s/CK) CK] x [CK, D_PAD] per head, local [.., CK] x [CK, S_PAD]
    per chunk, KV [D_PAD, BLOCK_P] x [BLOCK_P, D_PAD] per head and tile.
    cuda: the depthwise stencils, 3 x (9 + 25 + 49) s + 27 s MACs per token.
    With ``sh.AGG_FROM_Z`` (the training forward, `config.from_planes`) segments 1-3 come from the
    statistics pass's Z: qkv's segments 0 and 4 read (B N 6 s e), Z's segments 1-3 read (B N 9 s, stage
    dtype: e), no pointwise and no 3x3/5x5/7x7 stencil (the local branch's stay); and the local branch
    keeps what its backward reads, w4 and xh4 (B N 4 s, stage dtype) and rstd4 (B N x 4 B). With
    ``sh.AGG_SPLIT`` (the split eval forward, after its Z pass) the same reads, nothing kept; with ZDENSE too
    (``sh.local_from_z``) the local branch's Z read from the Z pass (B N s, stage dtype) instead of qkv's
    segment 4 (B N 3 s e), no 3s -> s pointwise and no 3x3 stencil; the same in the training forward after the
    dense statistics pass (AGG_FROM_Z with ZDENSE), which keeps no w4 (its backward is the dense form).
    detail: also the plan (splits per job, tiles per split) and `balance`, the estimated
    critical path of the plan: the costliest program (`aggregate_job_costs`) over the mean
    program, x1000 (1000 = every program equal)."""
    if sh.AGG_FUSED:
        return _fused_aggregate(B, H, W, dt, prec, sh)
    N = H * W
    e = ELEM_BYTES[dt]
    s, cp, d = sh.S, sh.CP, sh.D
    plan = _job_plan(N, B, sh, prec, W)
    wb = _weights_bytes(sh.C)
    weights = sum(wb[k] for k in ("bn_scale", "bn_shift", "dw3", "dw5", "dw7", "pw", "local_dw", "local_pw",
                                  "ln_weight", "ln_bias"))
    fz = sh.AGG_FROM_Z or sh.AGG_SPLIT
    lz = sh.local_from_z
    detail = {"qkv_read": B * N * ((3 if lz else 6) * s if fz else 3 * sh.C) * e, "qv_write": 2 * B * N * cp * e,
              "pre_write": B * N * s * e, "partials_write": B * plan.partial_rows * s * (2 + d) * 4, "weights": weights}
    if fz:
        se = ELEM_BYTES[dtype_name(stage_dtype(torch_dtype(dt)))]
        detail["z_read"] = B * N * (10 if lz else 9) * s * se
    if sh.AGG_FROM_Z:   # w4 (3s) and xh4 (s), rstd4; with lz (the dense statistics pass: a dense backward) no w4
        detail["local_write"] = B * N * ((1 if lz else 4) * s * se + 4)
    nbytes = sum(detail.values())
    detail.update({f"splits{j}": x for j, x in enumerate(plan.splits)})
    detail.update({f"tiles_per_split{j}": x for j, x in enumerate(plan.tiles_per_split)})
    detail["balance"] = round(1000 * plan_balance(plan, aggregate_job_costs(sh, prec)))
    pw = 0 if fz else 1                                    # the segments' pointwise and stencils run here
    loc = 0 if lz else 1                                   # the local branch's
    useful = 2 * B * N * (pw * 9 * s * s + loc * 3 * s * s + cp * d)
    tokens_pad = B * sh.num_tiles(N, W) * sh.AGG_BLOCK_P
    s_chunks = -(-s // sh.CK) * sh.CK
    padded = 2 * tokens_pad * (pw * 9 * s_chunks * 2 * sh.D_PAD + loc * 3 * s_chunks * sh.S_PAD
                               + 8 * sh.D_PAD * sh.D_PAD)
    tc, tcp, dot_fma, tp = _tc(operand_precision(prec, dt, sh.AGG_DOTS16), useful, padded)
    stencil = 2 * B * N * (pw * 3 * PROXY_TAPS * s + loc * 27 * s)
    return Cost(bytes=nbytes, tc_flops=tc, cuda_flops=stencil + dot_fma, grid=(plan.programs, B), tc_precision=tp,
                tc_flops_padded=tcp, block=32 * sh.AGG_WARPS, detail=detail)


def _fused_aggregate(B: int, H: int, W: int, dt: str, prec: str, sh: GMAShape) -> Cost:
    """gma_dense_aggregate_kernel (``sh.AGG_FUSED``: the dense Z pass with the aggregation done on its registers),
    grid (T, 8, B) at `dense_z.fused_tile`'s tokens: qkv read once (3 C e a token; halos from cache), the Q and V
    proxies (2 C' e) and the local branch's part of pre (s e) written, the partials one row per segment and tile
    (B 4T s (2 + d) x 4), the folded weights once; no Z written or read. tc: a head program's K^2 [s, d] products per
    stream (2 x 3 x 83 s^2 a token over the six), the local branch's 27 s^2, exp(K)^T V (C' d); with its dots
    (`dense_z.dense_z_dots`; the KV product's: the aggregation's). No CUDA-core stencil."""
    from . import dense_z as dz
    from ._common import DotVariant
    N = H * W
    e = ELEM_BYTES[dt]
    s, cp, d = sh.S, sh.CP, sh.D
    bp, warps = dz.fused_tile(sh.C, sh.AGG_ZDENSE, prec)
    T = -(-N // bp)
    wb = _weights_bytes(sh.C)
    detail = {"qkv_read": B * N * 3 * sh.C * e, "qv_write": 2 * B * N * cp * e, "pre_write": B * N * s * e,
              "partials_write": B * 4 * T * s * (2 + d) * 4,
              "weights": sum(wb[k] for k in ("bn_scale", "bn_shift", "dw3", "dw5", "dw7", "pw", "local_dw", "local_pw",
                                             "ln_weight", "ln_bias"))}
    dd = dz.dense_z_dots(DotVariant(prec, False), torch_dtype(dt))
    mix = 2 * B * N * s * s * (3 * PROXY_TAPS + 27)
    tc, tcp, fma, tp = _tc(dd.precision, mix, mix)
    kv = 2 * B * N * cp * d
    ktc, ktcp, kfma, _ = _tc(operand_precision(prec, dt, sh.AGG_DOTS16), kv, kv)
    return Cost(bytes=sum(detail.values()), tc_flops=tc + ktc, cuda_flops=fma + kfma, grid=(T, dz.FUSED_PROGRAMS, B),
                tc_precision=tp, tc_flops_padded=tcp + ktcp, block=32 * warps, detail=detail)


def plan_balance(plan, job_costs) -> float:
    """Costliest program of an aggregation plan over its mean program (1.0 = perfectly even),
    by the cost model: job j's programs cost job_costs[j] x its tiles per split (the last run
    may be shorter; counted as the others), the mean is the whole image's work over its programs."""
    worst = max(c * t for c, t in zip(job_costs, plan.tiles_per_split))
    mean = plan.tiles * sum(job_costs) / plan.programs
    return worst / mean


def _combine(B: int, H: int, W: int, dt: str, prec: str, sh: GMAShape) -> Cost:
    """gma_combine_kernel, grid `config.combine_grid` (8 x row blocks, B): reads the packed partials (B R s (2 + d) x 4 bytes, R the
    splits of segments 0..3 in `aggregation.job_plan`), writes kv (B C' d x 4). cuda: 2
    multiply-adds per partial accumulator element (ACC alpha + acc_t beta), 2 B R s d MACs; no
    tensor-core work. With ``sh.AGG_FROM_Z`` (the training forward) also the softmax's k_max and k_sum
    written (2 B C' x 4)."""
    N = H * W
    plan = _job_plan(N, B, sh, prec, W)
    s, cp, d = sh.S, sh.CP, sh.D
    rows = plan.partial_rows
    detail = {"partials_read": B * rows * s * (2 + d) * 4, "kv_write": B * cp * d * 4, "partial_rows": rows}
    if sh.AGG_FROM_Z:
        detail["stats_write"] = 2 * B * cp * 4
    nbytes = detail["partials_read"] + detail["kv_write"] + detail.get("stats_write", 0)
    return Cost(bytes=nbytes, tc_flops=0, cuda_flops=2 * 2 * B * rows * s * d,
                grid=combine_grid(sh, B), block=32 * sh.COMBINE_WARPS, detail=detail)


def _attention(B: int, H: int, W: int, dt: str, prec: str, sh: GMAShape) -> Cost:
    """gma_attention_kernel, grid (ceil(N / ATTN_BLOCK_P), 8, B).

    bytes: Q and V read once (2 B N C' e; V's CRPE halo from cache), kv read once (B C' d x 4;
    in practice once per program, from L2), the attention half of pre written (B N C' e), the
    CRPE weights (crpe_w3/5/7, crpe_b) once.
    tc: Q KV, C' d MACs per token (padded: [BLOCK_P, D_PAD] x [D_PAD, D_PAD] per program);
    with "ieee" dots the kernel does rank-1 FMA updates over k < d instead (cuda, BLOCK_P D D_PAD
    MACs per program).
    cuda: CRPE stencils, 240 d MACs per token.
    With ``sh.AGG_FROM_Z`` (the training forward) also R = CRPE(V) + bias written (B N C' e, the stage
    dtype), kept for the backward. With ``sh.ATTN_GROUP`` (a program per CRPE window's heads: grid
    (tiles, 3, B)) Q KV is one [BLOCK_P, G] x [G, G] product per group with the heads' KV blocks on its diagonal
    (G = dot_pad(2 d), dot_pad(3 d) twice: padded tensor-core work G^2 per token and group), or rank-1 updates
    over k < d on "ieee" (BLOCK_P d G MACs per program)."""
    N = H * W
    e = ELEM_BYTES[dt]
    cp, d = sh.CP, sh.D
    wb = _weights_bytes(sh.C)
    weights = sum(wb[k] for k in ("crpe_w3", "crpe_w5", "crpe_w7", "crpe_b"))
    detail = {"qv_read": 2 * B * N * cp * e, "kv_read": B * cp * d * 4, "pre_write": B * N * cp * e,
              "weights": weights}
    if sh.AGG_FROM_Z:
        detail["r_write"] = B * N * cp * ELEM_BYTES[dtype_name(stage_dtype(torch_dtype(dt)))]
    tiles = -(-N // sh.ATTN_BLOCK_P)
    # the padded lanes of each program kind, and how many of each per tile and image
    lanes = ((dot_pad(2 * d), 1), (dot_pad(3 * d), 2)) if sh.ATTN_GROUP else ((sh.D_PAD, 8),)
    per_tile = tiles * B * sh.ATTN_BLOCK_P
    useful = 2 * B * N * cp * d
    if prec == "ieee":
        tc, tcp, dot_fma, tp = 0, 0, 2 * per_tile * d * sum(g * k for g, k in lanes), "-"
    else:
        tc, tcp, dot_fma, tp = (useful, 2 * per_tile * sum(g * g * k for g, k in lanes), 0,
                                operand_precision(prec, dt, sh.ATTN_DOTS16))
    crpe = 2 * B * N * CRPE_TAPS_PER_D * d
    return Cost(bytes=sum(detail.values()), tc_flops=tc, cuda_flops=crpe + dot_fma,
                grid=(tiles, 3 if sh.ATTN_GROUP else 8, B),
                tc_precision=tp, tc_flops_padded=tcp, block=32 * sh.ATTN_WARPS, detail=detail)


def _backward_plan(N: int, B: int, table, sh: GMAShape, split: bool) -> Tuple[int, int, int, int]:
    """(tokens per tile, num_warps, splits, tiles per split) of a backward launch (its launcher's plan)."""
    from .aggregation import split_plan
    from .attention_backward import SPLIT_TARGET
    bp, warps = table[sh.D_PAD]
    splits, tps = split_plan(N, B, bp, SPLIT_TARGET, 8) if split else (1, -(-N // bp))
    return bp, warps, splits, tps


def _b1_dkv(B: int, H: int, W: int, dt: str, prec: str, sh: GMAShape) -> Cost:
    """gma_b1_dkv_kernel, grid (SPLITS, 8, B): Z of q (a stage tensor; Q computed from it with the
    BatchNorm affine, 2 C' x 4) and dA read once (B N C' 2e), the fp32 partials written (B 8
    SPLITS d^2 x 4; summed by the launcher when SPLITS > 1, not counted).
    tc: Q dA^T, C' d MACs per token (padded: [D_PAD, BLOCK_N] x [BLOCK_N, D_PAD] per tile)."""
    from .config import B1_TILES
    N = H * W
    e = ELEM_BYTES[dt]
    cp, d = sh.CP, sh.D
    bn, warps, splits, _ = _backward_plan(N, B, B1_TILES, sh, True)
    detail = {"z_da_read": B * N * cp * 2 * e, "bn_read": 2 * cp * 4, "partials_write": B * 8 * splits * d * d * 4,
              "splits": splits}
    tokens_pad = B * -(-N // bn) * bn
    tc, tcp, fma, tp = _tc(prec, 2 * B * N * cp * d, 2 * tokens_pad * 8 * sh.D_PAD * sh.D_PAD)
    return Cost(bytes=sum(v for k, v in detail.items() if k != "splits"), tc_flops=tc, cuda_flops=fma,
                grid=(splits, 8, B), tc_precision=tp, tc_flops_padded=tcp, block=32 * warps, detail=detail)


def _b2_attention(B: int, H: int, W: int, dt: str, prec: str, sh: GMAShape) -> Cost:
    """gma_b2_attention_kernel, grid (ceil(N / BLOCK_P), 8, B): dA and V, R (stage tensors) read
    once (B N C' 3e), KV, dKV and the softmax statistics (M, L) read (B C' (2 d + 2) x 4), Z of q
    and k read once (Q and K computed from it; reread for the fused BatchNorm backward from the
    cache, 2 B N C' e), G of q and k, dV and dR written (4 B N C' e), the BatchNorm sums' partials (B T 2 x 3 C' x 4; BatchNorm affine and
    statistics 4 C' x 4) tc: dA KV^T, Ks dKV, V dKV^T: 3 C' d MACs per token (padded:
    three [BLOCK_P, D_PAD] x [D_PAD, D_PAD] per program). Element-wise work not counted."""
    from .config import B2_TILES
    N = H * W
    e = ELEM_BYTES[dt]
    cp, d = sh.CP, sh.D
    bp, warps, _, _ = _backward_plan(N, B, B2_TILES, sh, False)
    tiles = -(-N // bp)
    detail = {"act_read": B * N * cp * 3 * e, "kv_dkv_stats_read": B * cp * (2 * d + 2) * 4,
              "z_read": 2 * B * N * cp * e, "grads_write": 4 * B * N * cp * e,
              "bn_partials_write": B * tiles * 2 * 3 * cp * 4, "bn_read": 4 * cp * 4}
    tc, tcp, fma, tp = _tc(prec, 3 * 2 * B * N * cp * d, 3 * 2 * B * 8 * tiles * bp * sh.D_PAD * sh.D_PAD)
    return Cost(bytes=sum(detail.values()), tc_flops=tc, cuda_flops=fma, grid=(tiles, 8, B), tc_precision=tp,
                tc_flops_padded=tcp, block=32 * warps, detail=detail)


def _b2_crpe(B: int, H: int, W: int, dt: str, prec: str, sh: GMAShape) -> Cost:
    """gma_b2_crpe_kernel, grid (SPLITS, 8, B): dR (a stage tensor, e) read once (halos from
    cache), dV read and G of v written in its place (e; the BatchNorm backward fused in: Z of v
    read, e, and the sums' partials B SPLITS 3 C' x 4 written), the bias gradient's partials written
    (B SPLITS C' x 4), the CRPE weights read. cuda: a multiply-add per tap for the input gradient,
    240 d MACs per token (`CRPE_TAPS_PER_D`); no tensor-core work. The weight gradient is
    `gma_dw_wgrad_kernel`'s (`aggregation_backward_costs`)."""
    from .attention_backward import crpe_gpu_tile, crpe_rows_plan
    N = H * W
    e = ELEM_BYTES[dt]
    cp, d = sh.CP, sh.D
    bp, warps, rows = crpe_gpu_tile(d, prec)      # the GPU default: a row walk at D_PAD 16, else the tile kernel
    splits = crpe_rows_plan(H, W, B, bp)[0] if rows else _backward_plan(N, B, {sh.D_PAD: (bp, warps)}, sh, True)[2]
    wb = _weights_bytes(sh.C)
    detail = {"dr_read": B * N * cp * e, "dv_read_write": 2 * B * N * cp * e,
              "partials_write": B * splits * cp * 4, "z_read": B * N * cp * e,
              "bn_partials_write": B * splits * 3 * cp * 4, "bn_read": 4 * cp * 4,
              "weights": sum(wb[k] for k in ("crpe_w3", "crpe_w5", "crpe_w7")), "splits": splits}
    nbytes = sum(v for k, v in detail.items() if k != "splits")
    return Cost(bytes=nbytes, tc_flops=0, cuda_flops=2 * B * N * CRPE_TAPS_PER_D * d, grid=(splits, 8, B),
                block=32 * warps, detail=detail)


@functools.lru_cache(maxsize=256)
def aggregation_backward_costs(B: int, H: int, W: int, C: int, dt: str, prec: str) -> Dict[str, Cost]:
    """Cost of each aggregation-backward kernel in one training call (`AGG_BACKWARD_KERNELS`),
    grids from the launchers' own plans on meta tensors (what `b3_fused` and
    `local_backward` plan) with the GPU tiles (`aggregation_backward.gpu_backward_tiles`).

    bytes (compulsory, per launch, summed): the stage tensors, qkv and d_qkv elements e B each (the
    stage tensors are in the layer's dtype, `config.stage_dtype`); the per-program partials (weight
    gradients, BatchNorm sums, fp32) written once; the weights read once.
      dz           G, Z read, dZ written (segment 0: into d_qkv; unfused B3: all 4s)
      pw_backward  per pixel of 3B images and segment 1..3: G and Z (fused; 2e) or dZ (e), y (e)
                   read, dy (e) written
      dw_backward  dy read, du (into d_qkv) written: 2e per element
      dw_wgrad     dy and u (from qkv; the CRPE's: dR and V) read: 2e per element, and its partials
      local        dL (s e), xh (s e), rstd (4 B), w4 (3 s e) read, dw4 (3 s e) written per pixel
    tc: pw_backward 2 x 2 s^2 MACs per pixel and segment (dy = pw^T dz, g_pw += dz y^T); local
    2 x 3 s^2 (dw4 and g_local_pw); padded as issued (BLOCK_I x S_PAD x PW_BLOCK_P per tile and
    output-channel block). cuda: dw_backward and dw_wgrad each KS^2 MACs per element (du; the weight
    gradient), the CRPE's 240 d per token of its input gradient in `_b2_crpe`."""
    import torch

    from . import aggregation_backward as agb
    from ._common import DotVariant, kernel_name
    from ..folding import meta_weights
    e = ELEM_BYTES[dt]
    s, N = C // 5, H * W
    cp, s_pad = 4 * s, dot_pad(s)
    M3, M1 = 3 * B * N, B * N
    f32 = dict(device="meta", dtype=torch.float32)
    tdt = torch_dtype(dt)
    wts = meta_weights(C)
    sd = dict(device="meta", dtype=stage_dtype(tdt))       # the stage tensors
    Z, G = torch.empty(3 * B, cp, H, W, **sd), torch.empty(3 * B, cp, H, W, **sd)     # G: from B2
    qkv, d_qkv = torch.empty(B, N, 3 * C, device="meta", dtype=tdt), torch.empty(B, N, 3 * C, device="meta", dtype=tdt)
    y = list(torch.empty(3, 3 * B, s, H, W, **sd).unbind(0))
    rc = {"Z": Z, "y": y, "qkv": qkv, "xh4": torch.empty(B, s, H, W, **sd), "rstd4": torch.empty(B, 1, H, W, **f32),
          "w4": torch.empty(B, 3 * s, H, W, **sd)}
    dots = DotVariant(prec, False)
    coefs = torch.empty(3, cp, **f32)
    launches: List[Tuple[str, object, Dict[str, int]]] = []     # (kernel, grid, bytes / flops of the launch)

    def add(plan, **work):
        buf, ls = plan
        for fn, grid, _args, kw in ls[:1]:
            launches.append((kernel_name(fn), grid, dict(work, kw=kw)))
        return buf, ls

    t = agb.gpu_backward_tiles(s_pad)                            # the GPU's, under the interpreter too
    fused = agb.fused_b3(s_pad)
    add(agb.plan_dz(G, Z, coefs, True, 0, s, agb.qkv_layout(d_qkv, 0), t), bytes=3 * e * M3 * s + 3 * cp * 4)
    if fused:
        src, mode, src_bytes = G, 2, 2 * e
    else:
        bz, _ = add(agb.plan_dz(G, Z, coefs, True, 0, cp, tiles=t), bytes=3 * e * M3 * cp + 3 * cp * 4)
        src, mode, src_bytes = bz["dZ"], 0, e
    bufp, lp = add(agb.plan_pw_backward(src, Z, y, wts.pw, coefs, mode, dots, t),
                   bytes=3 * M3 * s * (src_bytes + 2 * e) + 3 * s * s * 4, tc=2 * 2 * 3 * M3 * s * s)
    kw = lp[0][3]
    launches[-1][2]["bytes"] += bufp["part_gpw"].numel() * 4
    tiles_pw = -(-M3 // kw["BLOCK_P"]) * lp[0][1][0]
    launches[-1][2]["tc_padded"] = 2 * 2 * kw["BLOCK_I"] * s_pad * kw["BLOCK_P"] * tiles_pw
    def add_wgrad(ls, buf, elements, k):
        (fw, gw, _, kw_w), = ls
        launches.append((kernel_name(fw), gw, {"bytes": 2 * e * elements + buf["part_gw"].numel() * 4,
                                              "cuda": 2 * k * k * elements, "kw": kw_w}))

    for j, w in zip((1, 2, 3), (wts.dw3, wts.dw5, wts.dw7)):
        k = 2 * j + 1
        bd, ld = add(agb.plan_dw_backward(bufp["dy"][j - 1], agb.qkv_layout(qkv, j), w, agb.qkv_layout(d_qkv, j), t),
                     bytes=2 * e * M3 * s + k * k * s * 4, cuda=2 * k * k * M3 * s)
        add_wgrad(ld[1:], bd, M3 * s, k)
    dL = torch.empty(B, N, C, device="meta", dtype=tdt)[..., cp:].transpose(1, 2).reshape(B, s, H, W)
    bl, ll = agb.plan_local_backward(dL, rc, wts, dots, agb.qkv_layout(d_qkv, 4), t)
    (fl, gl, _, kl), (fd, gd, _, _), lw = ll
    tiles_l = -(-M1 // kl["BLOCK_P"]) * gl[0]
    launches.append((kernel_name(fl), gl, {
        "bytes": M1 * (8 * s * e + 4) + (bl["part_gpw"].numel() + bl["part_ln"].numel()) * 4
        + (3 * s * s + 2 * s) * 4, "tc": 2 * 2 * 3 * M1 * s * s,
        "tc_padded": 2 * 2 * kl["BLOCK_I"] * 3 * s_pad * kl["BLOCK_P"] * tiles_l // 3, "kw": kl}))
    launches.append((kernel_name(fd), gd, {"bytes": 2 * e * M1 * 3 * s + 9 * 3 * s * 4, "cuda": 2 * 9 * M1 * 3 * s}))
    add_wgrad([lw], bl, M1 * 3 * s, 3)
    # the CRPE's weight gradient (attention_backward.plan_b2): the same kernel over dR and V, per window
    d = s // 2
    dr_img, v_img = torch.empty(B, cp, H, W, **sd), torch.empty(B, cp, H, W, **sd)
    for (a, b), k in zip(((0, 2 * d), (2 * d, 5 * d), (5 * d, 8 * d)), (3, 5, 7)):
        bw, lw = agb.plan_dw_wgrad(dr_img[:, a:b], v_img[:, a:b], k, t)
        add_wgrad(lw, bw, M1 * (b - a), k)
    out: Dict[str, Cost] = {}
    for name in AGG_BACKWARD_KERNELS:
        mine = [(g, w) for n, g, w in launches if n == name]
        total = {k: sum(w.get(k, 0) for _, w in mine) for k in ("bytes", "tc", "tc_padded", "cuda")}
        progs = [int(functools.reduce(lambda a, b: a * b, g, 1)) for g, _ in mine]
        kw = mine[0][1].get("kw") or {}
        kprec = kw.get("DOT_PRECISION", prec)                # the kernel's own (config.DOT_OVERRIDES)
        tc, tcp, fma, tp = _tc(kprec, total["tc"], total["tc_padded"]) if total["tc"] else (0, 0, 0, "-")
        warps = kw.get("num_warps")
        out[name] = Cost(bytes=total["bytes"], tc_flops=tc, cuda_flops=total["cuda"] + fma, grid=tuple(mine[0][0]),
                         tc_precision=tp, tc_flops_padded=tcp, block=32 * warps if warps else None,
                         detail={"launches": len(mine), "programs_all": sum(progs)})
    return out


@functools.lru_cache(maxsize=256)
def z_pass_cost(B: int, H: int, W: int, C: int, dt: str, capability: Tuple[int, int], zdense: int = 0) -> Cost:
    """The split eval forward's Z pass (`Z_PASS`: gma_statistics_kernel, STORE = Z_ONLY), grid from the
    launcher's own plan on meta tensors (`statistics.plan_z_pass` with the statistics pass's default GPU tile,
    `statistics.gpu_stats_tiles`, as `recompute_costs`): per token, segments
    1-3 of q, k and v read (9 s e), their Z written (9 s, the stage dtype: e for fp16 / bf16 layers,
    `config.stage_dtype`), the folded filters read once; cuda 2 x 3 x 83 s (the stencils), tc 2 x 9 s^2 with
    fp32's dots (3xTF32 on sm_80+, `statistics.statistics_dots`). The split's aggregation then reads that Z
    (`_aggregate` with ``AGG_SPLIT``): the two together move more bytes than the fused aggregation, which
    computes Z in registers.

    zdense (`GMAShape.AGG_ZDENSE`, its tiles 1 or 2): the dense pass instead (`dense_z.gma_dense_z_kernel`, grid
    from `dense_z.plan_dense_z_pass`): segments 1-4 of q, k, v read (12 s e), Z of segments 1-3 and of the
    local branch written (10 s, the stage dtype); tc 2 (3 x 83 + 27) s^2 (each segment's K^2 [s, s] products per
    stream, the local branch's 9 per stream into one accumulator) with its dots (`dense_z.dense_z_dots`); no
    CUDA-core work."""
    import torch

    from . import statistics as st
    from ..folding import meta_weights
    e = ELEM_BYTES[dt]
    se = ELEM_BYTES[dtype_name(stage_dtype(torch_dtype(dt)))]
    s, T = C // 5, B * H * W
    wts = meta_weights(C)
    wb = _weights_bytes(C)
    qkv = torch.empty(B, H * W, 3 * C, device="meta", dtype=torch_dtype(dt))
    if zdense:
        from . import dense_z as dz
        from ._common import DotVariant
        dd = dz.dense_z_dots(DotVariant(dot_precision(dt, capability), False), torch_dtype(dt))
        _z, (grid, _a, kw) = dz.plan_dense_z_pass(qkv, H, W, wts.dw3, wts.dw5, wts.dw7, wts.pw, wts.local_dw,
                                                  wts.local_pw, dd, tiles=dz.dense_z_tiles(C, zdense))
        mix = 2 * T * s * s * (3 * PROXY_TAPS + 27)
        tc, tcp, fma, tp = _tc(dd.precision, mix, mix)
        detail = {"qkv_read": 12 * T * s * e, "z_write": 10 * T * s * se,
                  "weights": sum(wb[k] for k in ("dw3", "dw5", "dw7", "pw", "local_dw", "local_pw"))}
        return Cost(bytes=sum(detail.values()), tc_flops=tc, cuda_flops=fma, grid=tuple(grid), tc_precision=tp,
                    block=32 * kw["num_warps"], detail=detail)
    sprec = dot_precision("fp32", capability)
    _z, (grid, _a, kw) = st.plan_z_pass(qkv, H, W, wts.dw3, wts.dw5, wts.dw7, wts.pw, st.gpu_stats_tiles(C, sprec))
    mix = 2 * 9 * T * s * s
    tc, tcp, fma, tp = _tc(sprec, mix, mix)
    detail = {"qkv_read": 9 * T * s * e, "z_write": 9 * T * s * se,
              "weights": sum(wb[k] for k in ("dw3", "dw5", "dw7", "pw"))}
    return Cost(bytes=sum(detail.values()), tc_flops=tc, cuda_flops=2 * 3 * T * PROXY_TAPS * s + fma,
                grid=tuple(grid), tc_precision=tp, block=32 * kw["num_warps"], detail=detail)


def recompute_costs(B: int, H: int, W: int, C: int, dt: str, capability: Tuple[int, int]) -> Dict[str, Cost]:
    """Cost of the statistics pass and of the backward's three recompute launches of one training
    call (`RECOMPUTE_KERNELS`), grids from the launchers' own plans on meta tensors with the GPU
    tiles (`statistics.gpu_stats_tiles` / `gpu_recompute_tiles`, `recompute.gpu_attention_tiles` /
    `gpu_local_tiles`); per token (s = C/5, C' = 4s, e bytes per qkv element; the module
    docstrings of statistics.py and recompute.py derive them):

      statistics          reads q, k, v's segments 0..3 (12 s e); writes per-program moments
                          (3B R s x 12 B) and, as a training step with a backward runs it (STORE), the
                          planes Z (3 x 4s x e) and y (3 x 3s x e); cuda 2 x 3 x 83 s (the stencils), tc
                          2 x 9 s^2 with fp32's dots (3xTF32 on sm_80+); the moments' element-wise work not counted
      proxy_v             with those planes, the backward's first launch instead of recompute_z: reads Z
                          of the v images, writes PV (2 x 4s x e)
      recompute_z         (eval with gradients: no statistics pass) the same reads and FLOPs with the layer
                          dtype's dots; writes Z (3 x 4s x e), P of the v images (4s x e) and y (3 x 3s x e)
      recompute_attention (eval with gradients: a training step's forward keeps R, KV and the softmax statistics)
                          reads Z of k (and the BatchNorm affine) and V (2 C' e), writes R (C' e) and the softmax
                          partials (B SPLITS C' (d + 2) x 4 B); cuda the CRPE 2 x 240 d, tc 2 C' d
      recompute_local     (eval with gradients: a training step's forward keeps these, `config.from_planes`)
                          reads segment 4 of q, k, v (3 s e), writes w4 (3s e), xh4 (s e) and
                          rstd4 (4 B); cuda 2 x 9 x 3s, tc 2 x 3 s^2
    (the stage tensors Z, PV, y, R, w4, xh4 in the layer's dtype, `config.stage_dtype`: e bytes)
    plus the folded weights each reads, once."""
    import torch

    from . import recompute as rcp
    from . import statistics as st
    from ._common import DotVariant, kernel_name
    from ..folding import meta_weights
    e = ELEM_BYTES[dt]
    s, N = C // 5, H * W
    cp, d = 4 * s, s // 2
    T = B * N                                    # tokens of each of q, k, v
    tdt = torch_dtype(dt)
    wts = meta_weights(C)
    wb = _weights_bytes(C)
    qkv = torch.empty(B, N, 3 * C, device="meta", dtype=tdt)
    sprec, prec = dot_precision("fp32", capability), dot_precision(dt, capability)
    w = (wts.dw3, wts.dw5, wts.dw7, wts.pw)
    proxy_w = sum(wb[k] for k in ("dw3", "dw5", "dw7", "pw"))
    stencils, mix = 2 * 3 * T * PROXY_TAPS * s, 2 * 9 * T * s * s
    out: Dict[str, Cost] = {}
    pm, pm2, plan, (grid, _a, kw) = st.plan_statistics(qkv, H, W, *w, st.gpu_stats_tiles(C, sprec),
                                                       DotVariant(sprec, False), store=True)
    kept = sum(t.numel() for t in st.planes_of(_a)) * e
    tc, tcp, fma, tp = _tc(sprec, mix, mix)
    out["gma_statistics_kernel"] = Cost(
        bytes=12 * T * s * e + (pm.numel() * 8 + pm2.numel() * 4) + kept + proxy_w, tc_flops=tc,
        cuda_flops=stencils + fma, grid=tuple(grid), tc_precision=tp, block=32 * kw["num_warps"],
        detail={"programs_per_image": plan.programs})
    (z, pv, y), (grid, _a, kw) = st.plan_recompute(qkv, H, W, wts.bn_scale, wts.bn_shift, *w,
                                                  st.gpu_recompute_tiles(C, prec), DotVariant(prec, False))
    pv_v, (fn, grid, _a, kw) = rcp.plan_proxy_v(z, wts)
    out[kernel_name(fn)] = Cost(bytes=2 * pv_v.numel() * e + wb["bn_scale"] + wb["bn_shift"], tc_flops=0,
                                cuda_flops=0, grid=tuple(grid), tc_precision=None, block=32 * kw["num_warps"])
    tc, tcp, fma, tp = _tc(prec, mix, mix)
    out["gma_recompute_z_kernel"] = Cost(
        bytes=12 * T * s * e + (z.numel() + pv.numel() + y.numel()) * e + proxy_w + wb["bn_scale"] + wb["bn_shift"],
        tc_flops=tc, cuda_flops=stencils + fma, grid=tuple(grid), tc_precision=tp, block=32 * kw["num_warps"])
    buf, (fn, grid, _a, kw) = rcp.plan_recompute_attention(z, pv, H, W, wts, rcp.gpu_attention_tiles(d, prec),
                                                           DotVariant(prec, False))
    tc, tcp, fma, tp = _tc(prec, 2 * T * cp * d, 2 * T * cp * d)
    partials = sum(buf[k].numel() for k in ("part_m", "part_l", "part_acc")) * 4
    out[kernel_name(fn)] = Cost(
        bytes=3 * T * cp * e + partials + sum(wb[k] for k in ("crpe_w3", "crpe_w5", "crpe_w7", "crpe_b", "bn_scale",
                                                              "bn_shift")),
        tc_flops=tc, cuda_flops=2 * T * CRPE_TAPS_PER_D * d + fma, grid=tuple(grid), tc_precision=tp,
        block=32 * kw["num_warps"])
    buf, (fn, grid, _a, kw) = rcp.plan_recompute_local(qkv, H, W, wts, 1e-5, rcp.gpu_local_tiles(s, prec),
                                                       DotVariant(prec, False))
    tc, tcp, fma, tp = _tc(prec, 2 * 3 * T * s * s, 2 * 3 * T * s * s)
    out[kernel_name(fn)] = Cost(
        bytes=T * (7 * s * e + 4) + wb["local_dw"] + wb["local_pw"], tc_flops=tc,
        cuda_flops=2 * 9 * 3 * T * s + fma, grid=tuple(grid), tc_precision=tp, block=32 * kw["num_warps"])
    return out
