"""Launcher of the Triton pre-projection: buffers, split plan, grids, the launches (three, or four split).

    buffers = launch_pre_projection(qkv, H, W, weights, scale, ln_eps)   # dict; buffers["pre"] is the result

Launch sequence (no host synchronisation), under the input's CUDA device:
``gma_aggregate_kernel`` (PROGRAMS, B) -> ``gma_combine_kernel`` (8 x row blocks, B) ->
``gma_attention_kernel`` (ceil(N / ATTN_BLOCK_P), 8, B); with the ``SPLIT`` candidate
(`config.GMAShape.AGG_SPLIT`) first ``gma_statistics_kernel`` as the Z pass (`statistics.plan_z_pass`:
Z of segments 1-3 into a (3B, C', H, W) buffer; with ``ZDENSE``, `GMAShape.AGG_ZDENSE`, ``gma_dense_z_kernel``,
the same Z as dense convolutions on tensor cores, `dense_z.plan_dense_z_pass`, and the local branch's Z before its
LayerNorm too), and the aggregation reads Z instead of running those stencils (`aggregation._segment_z`, as the
training forward; with ZDENSE its local branch too, `GMAShape.local_from_z`). Launches go through
``torch.library.wrap_triton`` while a trace runs, so that ``torch.compile`` sees the kernels
inside the ``gmf::triton_pre_projection`` op (triton_kernels/op.py); otherwise they are
launched directly (`_launch.wrap_triton`).

Per call the launcher picks the kernels' variant: the dots' precision for the input dtype on
the input's GPU (`_common.dot_variant`, table `config.ARCH_DOTS`; emulated GPU rounding under
the interpreter) and the tiles for that precision (`default_shape`). `plan_pre_projection`
describes the launches without running them; `specializations.py` runs it on meta tensors to
compile, ahead of time, exactly what the JIT will compile (kernels keep Triton's default line
information, so compute-sanitizer and ncu reports point at source lines).

Tiles as data (`gmf_kernels.tuning`): two search spaces are registered here,
``"triton.aggregate"`` (BLOCK_P, num_warps, CK, the strip target STRIP, the q/k/v merge
MERGE, the unrolled tap rows UNROLL, the 16-bit dot operands DOTS16, the paired heads PAIR, the row
walks ROWS of the aggregation, SPLIT, the forward split in a Z pass and the aggregation, ZDENSE, that Z pass on
tensor cores, and PIPE, its element-wise tile loops software-pipelined) and
``"triton.attention"`` (BLOCK_P, num_warps, UNROLL and DOTS16 of the attention kernel). Their candidates for (C, dtype, GPU) are the
spill-free tiles of `config` (``AGG_TILES`` / ``AGG_TILES_BY_DOTS`` / ``ATTN_TILES`` /
``ATTN_TILES_BY_DOTS``; the tile `config.gma_shape` picks is the default and comes first).
A launch on a CUDA device asks `tuning.choose` and uses the tuning table's tile for its GPU
architecture, C and dtype when there is one (written by benchmarks/tune.py, which skips
candidates that spill), else the default; under the interpreter and on meta/CPU tensors
(AOT specialisation) the default tiles are used unchanged.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import tuning
from ..folding import FoldedGMAWeights
from . import _launch
from ._common import DotVariant, _cuda_capability, dot_variant, interpreting
from ._launch import device_guard
from .backward import KeptPlanes  # (imports no Triton)
from .aggregation import aggregate_call, gma_aggregate_kernel, job_plan
from .attention import attention_call, combine_call, gma_attention_kernel, gma_combine_kernel
from .statistics import gma_statistics_kernel, plan_z_pass
from .dense_z import (dense_z_tiles, fused_tile, fused_tiles, gma_dense_aggregate_kernel, gma_dense_z_kernel, local_z_of,
                      plan_dense_aggregate, plan_dense_z_pass)
from .config import (AGG_TILES, AGG_TILES_BY_DOTS, ATTN_TILES, ATTN_TILES_BY_DOTS, INTERPRETER_BLOCK_P, attn_group_applies,
                     MAX_GRID_BATCH, GMAShape,
                     dot_pad, dot_precision, dtype_name, from_planes, gma_shape, next_pow2, operand_precision,
                     pair_applies, stage_dtype, zdense_variants)

Tensor = torch.Tensor
#: one launch: (kernel, grid, positional args, keyword args incl. constexprs and num_warps)
Launch = Tuple[Any, Tuple[int, ...], tuple, Dict[str, Any]]

#: Test hook: when True every buffer is allocated filled with NaN (an element that a kernel
#: forgets to write, or reads before it is written, shows up as NaN in the result).
POISON_BUFFERS = False

def _alloc(shape, dtype, device):
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def default_shape(C: int, N: int, dots: DotVariant) -> GMAShape:
    """The specialisation a call uses: the GPU tiles for its dot variant, or one large tile
    under the interpreter."""
    if interpreting():  # one tile up to INTERPRETER_BLOCK_P tokens: no padding waste on tiny grids
        bp = min(INTERPRETER_BLOCK_P, max(16, next_pow2(N)))
        return gma_shape(C, agg_block_p=bp, attn_block_p=bp, interpreter=True)
    return gma_shape(C, dots=dots.precision)


# ---------------------------------------------------------------- tuning (search spaces as data)
AGG_FAMILY = "triton.aggregate"
ATTN_FAMILY = "triton.attention"
#: at most this many candidates per (family, C, dtype, GPU): of the attention's, the default's variants (UNROLL, DOTS16,
#: two ROWS tiles, two GROUP) first, then the table's other tiles
MAX_CANDIDATES = 9
#: ... and for the aggregation, whose search space also holds the wide tiles and the unrolled taps below: the
#: default's four variants, the table tiles and the wide tiles (at most AGG_MAX_WIDE) in AGG_BASE_CANDIDATES
#: slots, then the SPLIT / ROWS / DOTS16 / PAIR candidates on top (`aggregate_candidates`), at most
#: AGG_MAX_CANDIDATES in all (26: the whole list at C = 80 and 160 with fp16 / bf16 on sm_80+)
AGG_BASE_CANDIDATES = 12
AGG_MAX_WIDE = 6
AGG_MAX_CANDIDATES = 26
#: The split forward's candidate with its element-wise tile loops software-pipelined (`GMAShape.AGG_PIPE`): Triton
#: then issues the next tile's Z loads (cp.async into shared memory) while this tile's BatchNorm, hardswish, stores
#: and exp(K)^T V run, where the plain loop waits for each tile's loads in full. Why (the compiled code, not a
#: timing): the H200 measured the aggregation at 6-12 % of its byte bound, as a latency-bound kernel would; the
#: aggregation from Z is, but for its local branch, such loops (jobs 0-3), and Triton 3.6 pipelines them
#: (``ttg.async_copy_global_to_local`` in the TTGIR with num_stages 2, none without).
AGG_PIPE_STAGES = 2
#: Wide aggregation tiles, (BLOCK_P, num_warps, CK), tried on a GPU after the default's variants and the
#: tables' tiles. Why (inferred from compiler figures, not measured): at 16-token tiles the kernel
#: holds ~160-170 registers per thread for 16 tokens of 4 warps, 48 tokens in flight per SM (3 CTAs),
#: the four warps repeating the tile's small dots (an MMA of 16 rows cannot be split over 4 warps),
#: and an H200 ran the aggregation at 6-12 % of its byte bound (gpu_report_h200_20261204), as a
#: latency-bound kernel with few loads in flight would. A 64-token tile puts 128 tokens in flight at
#: 2 CTAs of 4 warps (sm_90 C = 80 one-pass TF32: 180 registers, spill-free;
#: benchmarks/results/triton_aggregate_tile_sweep_sm80_sm90.md), each warp its own 16 rows. Where
#: such a tile spills (C = 320 merged) the tuner refuses it; the separate-streams variant (MERGE 0,
#: two head outputs alive instead of six) is its chance there.
AGG_WIDE_TILES: Tuple[Tuple[int, int, int], ...] = ((64, 4, 16), (64, 8, 16), (32, 8, 16))

#: (BLOCK_P, num_warps) of the row-walk candidates (`GMAShape.AGG_ROWS`, `aggregation._segment_rows`; with
#: PAIR, where `config.pair_applies`) by the segment width s: a tile is one row of a BLOCK_P-column strip,
#: and the k/v walk holds 2 KS = 14 accumulator tiles [BLOCK_P, s] at 7x7. Registers on sm_90 (Triton
#: 3.6, ptxas; compiler figures, not timings; bf16 with DOTS16 / fp32): s = 16 (16, 2) 158 / 190,
#: (32, 4) 154 / 196 (12 warps per SM; (16, 4) took 128 registers and spilled 12 B, (64, 8) 176,
#: (32, 8) 179, one CTA); s = 32 (16, 4) 192 / 188, (16, 8) 128 with 4 B spilled / 184 ((16, 2)
#: spilled 112 B); s = 64 (16, 8) 210 / 255. (32, 4) and (32, 8) spilled at s = 32, and (16, 4) and
#: every 32-token tile at s = 64 (100 B - 5 KB). At 8 warps ptxas itself may hold a kernel to 128
#: registers and spill (s = 32 bf16: with ``.maxnreg 192`` the same code takes 192, no spill; Triton's
#: ``maxnreg`` is not a knob of these spaces yet); the tuner refuses a candidate that spills.
AGG_ROWS_TILES: Dict[int, Tuple[Tuple[int, int], ...]] = {16: ((16, 2), (32, 4)), 32: ((16, 4), (16, 8)), 64: ((16, 8),)}

#: (BLOCK_P, num_warps) of the attention's row-walk candidates (`GMAShape.ATTN_ROWS`,
#: `attention._attention_rows`): a tile is one row of a BLOCK_P-column strip of one head, KS [BLOCK_P, D_PAD]
#: accumulators alive. Registers (sm_90, Triton 3.6, ptxas; bf16 with DOTS16 / fp32; compiler figures, not
#: timings) against the default tile's: C = 80 90 / 142 (default 49 / 64), C = 160 121 / 145 (58 / 70),
#: C = 320 (16, 2) 168 / 255 with 8 B spilled in fp32 (refused there by the tuner), (32, 4) 162 / 255
#: (90 / 114); sm_80 alike.
ATTN_ROWS_TILES: Tuple[Tuple[int, int], ...] = ((16, 2), (32, 4))


def _precision(C: int, dtype, capability) -> Optional[str]:
    try:
        return dot_precision(dtype_name(dtype), tuple(capability or (8, 0)))
    except ValueError:   # a dtype this GPU's row refuses (bf16 below sm_80): nothing to tune
        return None


def _agg_cfg(shape: GMAShape) -> Dict[str, int]:
    return {"BLOCK_P": shape.AGG_BLOCK_P, "num_warps": shape.AGG_WARPS, "CK": shape.CK, "STRIP": shape.AGG_STRIP,
            "MERGE": int(shape.AGG_MERGE), "UNROLL": int(shape.AGG_UNROLL), "DOTS16": int(shape.AGG_DOTS16),
            "PAIR": int(shape.AGG_PAIR), "ROWS": int(shape.AGG_ROWS), "SPLIT": int(shape.AGG_SPLIT),
            "PIPE": shape.AGG_PIPE, "ZDENSE": int(shape.AGG_ZDENSE), "FUSED": int(shape.AGG_FUSED)}


def _attn_cfg(shape: GMAShape) -> Dict[str, int]:
    return {"BLOCK_P": shape.ATTN_BLOCK_P, "num_warps": shape.ATTN_WARPS, "UNROLL": int(shape.ATTN_UNROLL),
            "DOTS16": int(shape.ATTN_DOTS16), "ROWS": int(shape.ATTN_ROWS), "GROUP": int(shape.ATTN_GROUP)}


def _dots16_applies(C: int, dtype, capability) -> bool:
    """Whether the DOTS16 knob changes anything for this dtype on this GPU (`config.operand_precision`:
    fp16/bf16 inputs whose dots are one-pass TF32); elsewhere its candidates would duplicate others."""
    precision = _precision(C, dtype, capability)
    return precision is not None and operand_precision(precision, dtype_name(dtype), True) != precision


def aggregate_default(C: int, dtype, capability) -> Dict[str, int]:
    """The aggregation tile `config.gma_shape` picks for the dots of (dtype, GPU)."""
    return _agg_cfg(gma_shape(C, dots=_precision(C, dtype, capability) or "tf32x3"))


def aggregate_candidates(C: int, dtype, capability) -> List[Dict[str, int]]:
    """The default tile first, then the same tile in row-major order (``STRIP`` 0: whether the
    strip walk pays is for a GPU to say, `config.STRIP_TARGET`), with the other q/k/v mode
    (``MERGE``: `config.GMAShape.AGG_MERGE`; a spilling one is refused by the tuner) and with its tap
    rows unrolled (``UNROLL``: `config.GMAShape.AGG_UNROLL`); then the knobs' candidates: for fp16/bf16
    on sm_80+ the default and its unrolled form with 16-bit dot operands (``DOTS16``:
    `config.operand_precision`), and where `config.pair_applies` the default with a segment's two heads
    as one tensor (``PAIR``: `aggregation._segment_pair`), also with DOTS16 and unrolled where DOTS16
    applies (else unrolled alone), and, first of the knobs (timed before a tight deadline cuts the list),
    the split forward (``SPLIT``: `GMAShape.AGG_SPLIT`, the default tile's aggregation reading Z from a Z
    pass, `statistics.plan_z_pass`), the same with that Z pass as dense convolutions on tensor cores where
    `config.zdense_applies` (``ZDENSE``: `GMAShape.AGG_ZDENSE`, `dense_z`; 1 and 2, its two tiles, for fp16 / bf16:
    `config.zdense_variants`), the same with its element-wise tile
    loops pipelined (``PIPE``:
    `GMAShape.AGG_PIPE`, `AGG_PIPE_STAGES`) and the row walks (``ROWS``: `aggregation._segment_rows`, the tiles of
    `AGG_ROWS_TILES`, with DOTS16 where it applies); then the other tiles of AGG_TILES / AGG_TILES_BY_DOTS (each
    spill-free at the width it was chosen for) and the wide tiles (`AGG_WIDE_TILES` whose channel chunk
    fits this width, each with the default's q/k/v mode, the 64-token ones also stream after stream,
    the first also unrolled and, where PAIR applies and s < 64, with PAIR (and DOTS16 where it applies); at most
    AGG_MAX_WIDE, one more with PAIR). The table tiles and the wide ones share AGG_BASE_CANDIDATES
    slots with the default's four variants, so the knobs' candidates add to the list without taking a
    tile's place; at most AGG_MAX_CANDIDATES in all.

    Registers (ptxas, sm_90 bf16, batch 128; compiler figures, not timings), default -> DOTS16 ->
    PAIR -> PAIR + DOTS16 at C = 80 / 160 / 320: 155 -> 125 -> 126 -> 124 / 162 -> 153 -> 118 -> 96 /
    162 -> 149 -> 160 -> 147; unrolled with DOTS16 167 / 168 / 250, with PAIR and DOTS16 128 / 128 /
    252; the first wide tile with PAIR and DOTS16 178 / 214 at C = 80 / 160; no spills."""
    if _precision(C, dtype, capability) is None:
        return []
    default = aggregate_default(C, dtype, capability)
    out = [default, {**default, "STRIP": 0}, {**default, "MERGE": 1 - default["MERGE"]}, {**default, "UNROLL": 1}]
    dots16 = _dots16_applies(C, dtype, capability)
    pair = pair_applies(C) and bool(default["MERGE"])
    # first the split forward (a Z pass, then the aggregation from Z: `GMAShape.AGG_SPLIT`), the other structure,
    # then the same with its element-wise tile loops software-pipelined (`GMAShape.AGG_PIPE`: all its jobs but the
    # local branch are such loops)
    split = {**default, "SPLIT": 1, "PAIR": 0, "ROWS": 0, "MERGE": 1}
    knobs = [split]
    dense = zdense_variants(C, dtype_name(dtype), _precision(C, dtype, capability))
    knobs += [{**split, "ZDENSE": v} for v in dense]                   # its Z pass on tensor cores
    knobs += [{**split, "ZDENSE": v, "FUSED": 1} for v in dense]       # ... with the aggregation fused into it
    knobs.append({**split, "PIPE": AGG_PIPE_STAGES})
    if pair:   # then the row walks (`aggregation._segment_rows`): the structural change, timed before the deadline
        for bp, warps in AGG_ROWS_TILES.get(dot_pad(C // 5), ()):
            knobs.append({**default, "BLOCK_P": bp, "num_warps": warps, "PAIR": 1, "ROWS": 1, "DOTS16": int(dots16)})
    if dots16:
        knobs += [{**default, "DOTS16": 1}, {**default, "UNROLL": 1, "DOTS16": 1}]
    if pair:
        knobs.append({**default, "PAIR": 1})
        knobs += ([{**default, "PAIR": 1, "DOTS16": 1}, {**default, "UNROLL": 1, "PAIR": 1, "DOTS16": 1}] if dots16
                  else [{**default, "UNROLL": 1, "PAIR": 1}])
    s_pad = dot_pad(C // 5)

    def cfg_of(tile, merge, unroll=0):
        bp, warps, ck = tile
        return {"BLOCK_P": bp, "num_warps": warps, "CK": ck, "STRIP": default["STRIP"], "MERGE": merge,
                "UNROLL": unroll, "DOTS16": 0, "PAIR": 0, "ROWS": 0, "SPLIT": 0, "PIPE": 0, "ZDENSE": 0, "FUSED": 0}

    wide, wide_knobs = [], []
    for i, tile in enumerate(t for t in AGG_WIDE_TILES if t[2] <= s_pad):
        wide.append(cfg_of(tile, default["MERGE"]))
        if i == 0:
            wide.append(cfg_of(tile, default["MERGE"], 1))
            if pair and s_pad < 64:   # at s = 64 (C = 320) it spills (sm_90: 160 B bf16, 976 B fp32)
                wide_knobs.append({**cfg_of(tile, 1), "PAIR": 1, "DOTS16": int(dots16)})
        if tile[0] == 64:
            wide.append(cfg_of(tile, 0))
    seen = out + knobs
    wide = [c for i, c in enumerate(wide) if c not in wide[:i] and c not in seen][:AGG_MAX_WIDE]
    tiles = list(AGG_TILES.values()) + [t for row in AGG_TILES_BY_DOTS.values() for t in row.values()]
    for tile in tiles:
        cfg = cfg_of(tile, default["MERGE"])
        if tile[2] <= s_pad and cfg not in seen and cfg not in wide and len(out) + len(wide) < AGG_BASE_CANDIDATES:
            out.append(cfg)
            seen.append(cfg)
    return (out[:4] + knobs + out[4:] + wide + wide_knobs)[:AGG_MAX_CANDIDATES]


def attention_default(C: int, dtype, capability) -> Dict[str, int]:
    """The attention tile `config.gma_shape` picks for the dots of (dtype, GPU)."""
    return _attn_cfg(gma_shape(C, dots=_precision(C, dtype, capability) or "tf32x3"))


def attention_candidates(C: int, dtype, capability) -> List[Dict[str, int]]:
    """The default tile first, then the same with its CRPE tap rows unrolled (``UNROLL``:
    `config.GMAShape.ATTN_UNROLL`), for fp16/bf16 on sm_80+ the default with 16-bit Q KV operands
    (``DOTS16``: `config.operand_precision`), the CRPE's row walks (``ROWS``: `attention._attention_rows`,
    the tiles of `ATTN_ROWS_TILES`, with DOTS16 where it applies), a program per CRPE window's heads (``GROUP``:
    `attention._attention_group`, the default tile, with DOTS16 where it applies, and unrolled too), then the other
    tiles of ATTN_TILES / ATTN_TILES_BY_DOTS."""
    if _precision(C, dtype, capability) is None:
        return []
    default = attention_default(C, dtype, capability)
    out = [default, {**default, "UNROLL": 1}]
    dots16 = _dots16_applies(C, dtype, capability)
    if dots16:
        out.append({**default, "DOTS16": 1})
    for bp, warps in ATTN_ROWS_TILES:
        out.append({**default, "BLOCK_P": bp, "num_warps": warps, "DOTS16": int(dots16), "ROWS": 1})
    if attn_group_applies(C):   # the group's [BLOCK_P, 3 d] tiles about as many elements as the default's
        g = {**default, "BLOCK_P": max(16, default["BLOCK_P"] * dot_pad(C // 10) // dot_pad(3 * (C // 10))),
             "DOTS16": int(dots16), "GROUP": 1}
        out += [g, {**g, "UNROLL": 1}]
    tiles = list(ATTN_TILES.values()) + [t for row in ATTN_TILES_BY_DOTS.values() for t in row.values()]
    for bp, warps in tiles:
        cfg = {"BLOCK_P": bp, "num_warps": warps, "UNROLL": 0, "DOTS16": 0, "ROWS": 0, "GROUP": 0}
        if cfg not in out and len(out) < MAX_CANDIDATES:
            out.append(cfg)
    return out


AGG_SPACE = tuning.register_space(tuning.SearchSpace(AGG_FAMILY, aggregate_candidates, aggregate_default))
ATTN_SPACE = tuning.register_space(tuning.SearchSpace(ATTN_FAMILY, attention_candidates, attention_default))


def shape_from_configs(C: int, dots: DotVariant, agg: Dict[str, int], attn: Dict[str, int]) -> GMAShape:
    """The specialisation of the GPU tiles `agg` ("triton.aggregate") and `attn` ("triton.attention").
    Cached (a launch asks it every call; GMAShape is frozen)."""
    return _shape_from_configs(int(C), dots.precision, tuple(sorted(agg.items())), tuple(sorted(attn.items())))


@functools.lru_cache(maxsize=1024)
def _shape_from_configs(C: int, precision: str, agg_items: tuple, attn_items: tuple) -> GMAShape:
    agg, attn = dict(agg_items), dict(attn_items)
    shape = gma_shape(C, dots=precision, agg_block_p=int(agg["BLOCK_P"]), agg_warps=int(agg["num_warps"]),
                      ck=int(agg["CK"]), attn_block_p=int(attn["BLOCK_P"]),
                      strip=int(agg["STRIP"]) if "STRIP" in agg else None,
                      merge=bool(agg["MERGE"]) if "MERGE" in agg else None, unroll=bool(agg.get("UNROLL", 0)),
                      attn_unroll=bool(attn.get("UNROLL", 0)), dots16=bool(agg.get("DOTS16", 0)),
                      attn_dots16=bool(attn.get("DOTS16", 0)), pair=bool(agg.get("PAIR", 0)),
                      rows=bool(agg.get("ROWS", 0)), attn_rows=bool(attn.get("ROWS", 0)),
                      split=bool(agg.get("SPLIT", 0)), pipe=int(agg.get("PIPE", 0)),
                      zdense=int(agg.get("ZDENSE", 0)), attn_group=bool(attn.get("GROUP", 0)),
                      fused=bool(agg.get("FUSED", 0)))
    return replace(shape, ATTN_WARPS=int(attn["num_warps"]))


def tuned_shape(C: int, N: int, dots: DotVariant, qkv: Tensor) -> GMAShape:
    """The specialisation a call uses: on a CUDA device the tuning table's tiles for its GPU
    architecture, C and dtype (`tuning.choose`; the defaults without an entry), else (the
    interpreter, meta/CPU tensors) `default_shape`."""
    if interpreting() or qkv.device.type != "cuda":
        return default_shape(C, N, dots)
    index = qkv.device.index if qkv.device.index is not None else torch.cuda.current_device()
    cap = _cuda_capability(index)
    agg = tuning.choose(AGG_FAMILY, C, qkv.dtype, cap)
    attn = tuning.choose(ATTN_FAMILY, C, qkv.dtype, cap)
    return shape_from_configs(C, dots, agg, attn)


def plan_pre_projection(qkv: Tensor, H: int, W: int, weights: FoldedGMAWeights, scale: float, ln_eps: float,
                        shape: Optional[GMAShape] = None, dots: Optional[DotVariant] = None,
                        planes: Optional[Tensor] = None, keep_w4: bool = True, zl: Optional[Tensor] = None
                        ) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """Allocate the buffers of one call and describe its launches, without launching (three; four with
    the split forward, `GMAShape.AGG_SPLIT`).

    Returns (buffers, [(kernel, grid, args, kwargs), ...]) in launch order. `launch_pre_projection`
    runs exactly these; `specializations.py` calls this on meta tensors (nothing allocated)
    to derive, with Triton's own specialisation code, the variants the JIT will compile for
    real call shapes. dots: the dot variant (default: `dot_variant(qkv)`). planes: the training
    forward's Z kept by its statistics pass, as (3, B, C', N) (`planes_view`): the aggregation then
    reads segments 1-3 from it instead of running their stencils (`config.from_planes`), and the
    launches keep what the backward's recompute would make (`KEPT`): the local branch's w4, xh4, rstd4
    (`recompute.plan_recompute_local`'s), and R = CRPE(V) + bias, kv and the softmax's k_max, k_sum
    (`recompute.plan_recompute_attention`'s, merged). keep_w4 False (with planes: a backward in the dense form,
    `aggregation_backward.BackwardTiles.DENSE`, reads no w4): w4 is an empty (0,) tensor, nothing stored.
    zl (with planes, where the statistics pass ran in the dense form: `dense_z.dense_statistics_planes`): the local
    branch's Z before its LayerNorm, (B, s, H, W) in the stage dtype, which the aggregation reads instead of running
    the branch's stencil and mix (`config.from_planes` with local_z, `GMAShape.local_from_z`).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    dots = dots or dot_variant(qkv)
    shape = shape or tuned_shape(C, N, dots, qkv)
    if zl is not None and (planes is None or keep_w4):
        raise ValueError("the local branch's Z (zl) comes with the planes of the statistics pass that computed it, "
                         "for a backward in the dense form (keep_w4 False: with zl no w4 is computed to keep)")
    if planes is not None:
        shape = from_planes(shape, dots.precision, zl is not None)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    dev, dt = qkv.device, qkv.dtype
    if shape.AGG_SPLIT and not shape.AGG_FUSED and 3 * B > MAX_GRID_BATCH:   # the Z pass's grid holds the 3B
        shape = gma_shape(C, dots=dots.precision)                 # images: the default forward (no Z pass) instead
    if shape.AGG_FUSED:   # the dense Z pass and the aggregation as one kernel
        return _plan_fused(qkv, H, W, weights, scale, ln_eps, shape, dots)
    launches: List[Launch] = []
    z_pass = None
    if shape.AGG_SPLIT:   # the split forward: Z of segments 1-3 first (`statistics.plan_z_pass`)
        # segment 0 of the buffer: unwritten, but with ZDENSE stream q's, which holds the local branch's Z
        zbuf = _alloc((3 * B, 4 * shape.S, H, W), stage_dtype(dt), dev)
        if shape.AGG_ZDENSE:   # as dense convolutions on tensor cores (`dense_z`)
            z_pass, (grid, args, kwargs) = plan_dense_z_pass(qkv, H, W, weights.dw3, weights.dw5, weights.dw7,
                                                             weights.pw, weights.local_dw, weights.local_pw, dots,
                                                             z=zbuf, tiles=dense_z_tiles(C, shape.AGG_ZDENSE))
            launches.append((gma_dense_z_kernel, grid, args, kwargs))
        else:
            z_pass, (grid, args, kwargs) = plan_z_pass(qkv, H, W, weights.dw3, weights.dw5, weights.dw7, weights.pw,
                                                       z=zbuf)
            launches.append((gma_statistics_kernel, grid, args, kwargs))
    plan = job_plan(N, B, shape, dots.precision, W)    # per-job splits, balanced by cost
    rows = plan.partial_rows                         # packed partials: one row per split of segments 0..3
    f32 = torch.float32
    buf = {
        "q": _alloc((B, N, shape.CP), dt, dev),
        "v": _alloc((B, N, shape.CP), dt, dev),
        "pre": _alloc((B, N, C), dt, dev),
        "part_m": _alloc((B, rows, shape.S), f32, dev),
        "part_l": _alloc((B, rows, shape.S), f32, dev),
        "part_acc": _alloc((B, rows, shape.S, shape.D), f32, dev),
        "kv": _alloc((B, shape.CP, shape.D), f32, dev),
    }
    local = stats = None
    if planes is not None:    # what the backward's recompute would make, kept (`KEPT`)
        s, st = shape.S, stage_dtype(dt)
        buf.update(w4=_alloc((B, 3 * s, H, W) if keep_w4 else (0,), st, dev), xh4=_alloc((B, s, H, W), st, dev),
                   rstd4=_alloc((B, 1, H, W), f32, dev), R=_alloc((B, shape.CP, H, W), st, dev),
                   k_max=_alloc((B, shape.CP), f32, dev), k_sum=_alloc((B, shape.CP), f32, dev))
        local = (buf["w4"] if keep_w4 else None, buf["xh4"], buf["rstd4"])
        stats = (buf["k_max"], buf["k_sum"])
    if z_pass is not None:   # (not among the buffers: an intermediate whose segment 0 is never written)
        planes = planes_view(z_pass, B)
        if shape.local_from_z:   # the dense Z pass's local branch, where segment 0 of stream q would lie
            zl = local_z_of(z_pass, B)
    agg = aggregate_call(qkv, H, W, weights, ln_eps, shape, plan, buf["q"], buf["v"], buf["pre"],
                         buf["part_m"], buf["part_l"], buf["part_acc"], dots, planes, local, zl)
    comb = combine_call(buf["part_m"], buf["part_l"], buf["part_acc"], buf["kv"], shape, plan.segment_splits, stats)
    attn = attention_call(buf["q"], buf["v"], buf["kv"], buf["pre"], weights, H, W, scale, shape, dots, buf.get("R"))
    launches += [(gma_aggregate_kernel, *agg), (gma_combine_kernel, *comb), (gma_attention_kernel, *attn)]
    return buf, launches


def _plan_fused(qkv: Tensor, H: int, W: int, weights: FoldedGMAWeights, scale: float, ln_eps: float, shape: GMAShape,
                dots: DotVariant) -> Tuple[Dict[str, Tensor], List[Launch]]:
    """`plan_pre_projection` with ``shape.AGG_FUSED`` (eval): `dense_z.gma_dense_aggregate_kernel` at the ZDENSE
    variant's tiles (Z of segments 1-3 and of the local branch kept in registers, never stored), its partials one row
    per (segment, tile), then the combine (segment splits (T, T, T, T)) and the attention as always."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    dev, dt = qkv.device, qkv.dtype
    tiles = fused_tile(C, shape.AGG_ZDENSE, dots.precision)
    T = fused_tiles(N, tiles)
    f32 = torch.float32
    buf = {"q": _alloc((B, N, shape.CP), dt, dev), "v": _alloc((B, N, shape.CP), dt, dev),
           "pre": _alloc((B, N, C), dt, dev), "part_m": _alloc((B, 4 * T, shape.S), f32, dev),
           "part_l": _alloc((B, 4 * T, shape.S), f32, dev), "part_acc": _alloc((B, 4 * T, shape.S, shape.D), f32, dev),
           "kv": _alloc((B, shape.CP, shape.D), f32, dev)}
    agg = plan_dense_aggregate(qkv, H, W, weights, ln_eps, buf["q"], buf["v"], buf["pre"], buf["part_m"],
                               buf["part_l"], buf["part_acc"], dots,
                               operand_precision(dots.precision, dtype_name(dt), shape.AGG_DOTS16), tiles)
    comb = combine_call(buf["part_m"], buf["part_l"], buf["part_acc"], buf["kv"], shape, (T, T, T, T))
    attn = attention_call(buf["q"], buf["v"], buf["kv"], buf["pre"], weights, H, W, scale, shape, dots)
    return buf, [(gma_dense_aggregate_kernel, *agg), (gma_combine_kernel, *comb), (gma_attention_kernel, *attn)]


#: the buffers a training forward with planes keeps for its backward, in this order (`plan_pre_projection`): the
#: fields of `backward.KeptPlanes` after Z and y, its one list
KEPT = KeptPlanes._fields[2:]


def planes_view(z: Tensor, B: int) -> Tensor:
    """The statistics pass's Z (3B, C', H, W) as the aggregation reads it: (3, B, C', N), streams q, k, v."""
    return z.view(3, B, z.shape[1], z.shape[2] * z.shape[3])


def launch_pre_projection(qkv: Tensor, H: int, W: int, weights: FoldedGMAWeights, scale: float, ln_eps: float,
                          shape: Optional[GMAShape] = None, dots: Optional[DotVariant] = None,
                          planes: Optional[Tensor] = None, keep_w4: bool = True,
                          zl: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Run the kernels of `plan_pre_projection`; return every buffer (the op returns ``pre``; tests read all).

    qkv (B, N, 3C) in fp32/fp16/bf16 with unit channel stride; weights: `FoldedGMAWeights`
    (fp32, contiguous, on qkv's device; arguments checked by the op). Returns q, v (B, N, C')
    [qkv.dtype], part_m, part_l (B, R, s), part_acc (B, R, s, d) (the packed softmax partials,
    R = `aggregation.JobPlan.partial_rows`), kv (B, C', d) [fp32] and pre (B, N, C). Launched under qkv's CUDA device (`device_guard`).
    planes, keep_w4, zl: as `plan_pre_projection`'s.
    """
    buf, launches = plan_pre_projection(qkv, H, W, weights, scale, ln_eps, shape, dots, planes, keep_w4, zl)
    with device_guard(qkv):
        for kernel, grid, args, kwargs in launches:
            _launch.wrap_triton(kernel)[grid](*args, **kwargs)   # looked up per call (tests record launches there)
    return buf
