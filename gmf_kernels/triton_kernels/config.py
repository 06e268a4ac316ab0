"""Static shape and tile sizes of one kernel specialisation (pure Python, no Triton).

Everything a kernel takes as ``tl.constexpr`` is derived here from the module width C,
so the launchers, the AOT compile script and the tests agree on the specialisations.

Tile choices (heuristic, not autotuned: this was written on a machine without a GPU;
``benchmarks/ops.py`` is where a GPU run would confirm or retune them; the register and
spill figures behind them, compiled with the runtime's specialisation for sm_70, sm_75,
sm_80 and sm_90, are in ``benchmarks/results/triton_resources_sm70_sm75_sm80_sm90.md``,
and tests/test_triton_compile.py fails on any spill):

* Widths are padded to powers of two and to >= 16, because every ``tl.dot`` dimension
  must be >= 16 on the GPU (d = 4 pads to 16, d = 36 to 64, ...).
* Token tiles are runs of BLOCK_P tokens consecutive in strip order (`strip_width`,
  `aggregation._tile`: vertical strips of about STRIP_TARGET = 16 columns, row-major inside a
  strip), not padded 2-D pixel tiles: no padding waste on 7x7 / 14x14 / odd grids, and the
  stencil halo (up to 3 rows above and below) is read through L1, where the next tiles of a
  program, one strip row further down, find most of it.
* Aggregation: the s input channels of a segment go through the depthwise stencil in
  chunks of CK and are accumulated into the two [BLOCK_P, D_PAD] head outputs by
  ``tl.dot``; a program walks its tiles with the softmax state of two heads in registers.
  ptxas allocates up to 255 registers for this kernel and spills easily, so the tiles
  are small and chosen per width and dot variant: ``AGG_TILES`` / ``AGG_TILES_BY_DOTS`` below.
* Attention: [BLOCK_P, D_PAD] tiles, BLOCK_P = 64 (32 for D_PAD = 64, where 64 spilled).
* Split-N: at most about SPLIT_TARGET = 1024 aggregation programs, shared among the five
  jobs in proportion to their cost per tile (`aggregation.job_plan`): at batch 1 the 7x7
  job one tile per program, the lighter jobs runs of about the same cost; at batch 128
  about 8 programs per image (the 7x7 job in 3), so the softmax partials stay a small
  fraction of the traffic.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

NUM_HEADS = 8

#: Input dtypes of the kernels, by the names used in tables and Triton signatures.
DTYPE_NAMES = ("fp32", "fp16", "bf16")

#: What every ``tl.dot`` of the kernels computes, per GPU architecture, as data: rows of
#: (minimum compute capability, {input dtype: Triton ``input_precision``}); a GPU uses the
#: first row it reaches. A dtype missing from its row is not supported there, and a GPU
#: below the last row is not supported at all (the backend's `not_supported_reasons` reads
#: this table; `_common.mm` says what each precision computes). The dot operands are fp32
#: in every variant of these rows; only the forward kernels' tuning candidates DOTS16
#: (`operand_precision`) issue bf16 / fp16 dots. What sm_70/sm_75 lack is
#: TF32 (Triton 3.6 lowers any fp32 dot to FMAs there, so those rows ask for "ieee"
#: explicitly and the AOT compile checks that variant) and bf16 arithmetic: Triton emulates
#: bf16 conversions there with integer code, which pushed the aggregation kernel into
#: register spills on sm_75 (C = 160, 240), so bf16 is refused below sm_80 (the torch
#: backend runs it; such GPUs have no fast bf16 anyway).
ARCH_DOTS: Tuple[Tuple[Tuple[int, int], Dict[str, str]], ...] = (
    ((8, 0), {"fp32": "tf32x3", "fp16": "tf32", "bf16": "tf32"}),  # Ampere and newer: TF32 tensor cores
    ((7, 0), {"fp32": "ieee", "fp16": "ieee"}),                    # Volta, Turing: fp32 FMA dots, no bf16
)

#: Dot variants Triton miscompiles, as data: (kernel name, precision asked for, S_PAD) -> the
#: precision that kernel runs instead. Measured on an NVIDIA H200 (sm_90, Triton 3.6.0,
#: benchmarks/results/gpu_report_h200_20261204/followup.md): the two channel-mix backward kernels
#: at S_PAD = 64 (C = 200, 240, 320) with 3xTF32 dots returned wrong weight gradients (pw_weight,
#: local_pw_weight off by O(1), every element, at every grid and tile tried), while the same
#: kernels with "ieee" or "tf32" dots, and at S_PAD = 32 and 128 with 3xTF32, were right. A
#: minimal kernel with their pattern (a [64, 64] x [64, 16] 3xTF32 dot into a store and a second
#: 3xTF32 dot of the same operand, transposed, into an accumulator) faults with an illegal address
#: at S_PAD = 64 only. Not seen on other architectures (sm_80 untested): the override holds on
#: every GPU that asks for 3xTF32, as the cost of a wrong gradient is not worth the FMA dots' time.
#: "ieee" (fp32 FMAs) is what sm_70/75 compile for these kernels at every width, spill-free.
#: `benchmarks/triton_tf32x3_repro.py` runs that minimal kernel: when a new Triton passes it on a GPU,
#: the entries can go (test_training_step_real_shapes at C = 320 fp32 then decides).
DOT_OVERRIDES: Dict[Tuple[str, str, int], str] = {
    ("gma_pw_backward_kernel", "tf32x3", 64): "ieee",
    ("gma_local_backward_kernel", "tf32x3", 64): "ieee",
}


#: The pattern behind DOT_OVERRIDES, as data: a value that two 3xTF32 dots of one kernel take in both operand
#: positions (one as its left operand, another as its right: both of the MMA's operand layouts of one tensor),
#: with one of these dimensions. Every kernel specialisation compiled ahead of time is scanned for it
#: (`specializations.tf32x3_dual_operands` on its TTIR, `known_miscompile`), and the AOT tests fail on a
#: specialisation that has it, so a kernel that takes up the pattern at S_PAD = 64 must be listed in
#: DOT_OVERRIDES first. The two kernels above have it at every S_PAD (their [S_PAD, BLOCK_P] tile: the
#: right operand of the pw^T dz dot and the left of the weight gradient's); the H200 found them wrong at 64
#: and right at 16, 32 and 128, as was the minimal kernel. No other kernel has it (2026-12-06: the 101
#: 3xTF32 specialisations the GPU report compiles for sm_90, DEVELOPERS.md).
TF32X3_DUAL_OPERAND_DIMS: Tuple[int, ...] = (64,)


def kernel_dot_precision(kernel: str, precision: str, s_pad: int) -> str:
    """The ``input_precision`` `kernel` runs at channel padding `s_pad` when `precision` is
    asked for: `precision` unless `DOT_OVERRIDES` names the triple."""
    return DOT_OVERRIDES.get((kernel, precision, s_pad), precision)


#: Architectures every kernel specialisation is compiled for ahead of time (CI, resource tables).
AOT_ARCHS = (70, 75, 80, 90)

#: The GPU assumed where the input's is not known: the Triton interpreter emulates its dot
#: rounding (see `_common.mm`), and tracing on CPU fake tensors plans its variant.
DEFAULT_CAPABILITY = (8, 0)


def arch_dots(capability: Tuple[int, int], table=None) -> Optional[Dict[str, str]]:
    """The row of `table` (default ARCH_DOTS) for a GPU of this (major, minor) capability;
    None below every row."""
    for min_cap, row in (ARCH_DOTS if table is None else table):
        if tuple(capability) >= min_cap:
            return row
    return None


#: The input dtypes whose dots DOTS16 runs with 16-bit operands of their own type (`operand_precision`)
NATIVE16 = ("bf16", "fp16")


def operand_precision(precision: str, dtype: str, native16: bool) -> str:
    """A kernel's DOT_PRECISION: `precision` (`dot_precision`), or with `native16` (the tuning knob
    DOTS16: `GMAShape.AGG_DOTS16` / `ATTN_DOTS16`) and fp16 / bf16 inputs on a GPU whose dots for them
    are one-pass TF32 (sm_80+), the input dtype's name: both operands rounded to that type (to
    nearest even) and multiplied on its tensor cores with fp32 accumulation (`_common.mm`), in place
    of fp32 operands rounded to TF32 in software. What it saves, read from the compiled code (Triton
    3.6, sm_90, bf16, the default tiles; compiler output, not a timing): the software
    ``cvt.rna.tf32.f32`` (a compare and a few integer instructions per operand element; one F2FP per
    two elements instead), half the MMA instructions (k = 16 against 8) and the shared-memory traffic
    of each operand's layout change in 16-bit elements. The aggregation's SASS: 3592 -> 3232 / 3264 ->
    2888 / 3432 -> 3064 instructions at C = 80 / 160 / 320 (-10 to -12 %; the per-tile epilogue of a
    convolved segment at C = 80: 1257 -> 1040), HMMA 40 -> 20 / 76 -> 38 / 80 -> 40, LDS 102 -> 76 at
    C = 160 and 201 -> 121 at C = 320, registers 155 -> 125 / 162 -> 153 / 162 -> 149. What it costs:
    the operands carry the input's 8 (bf16) / 11 (fp16) significant bits instead of TF32's 11 -- where
    the PyTorch reference at that dtype rounds the same intermediates (depthwise output, softmax
    probabilities, K^T V) to the same type. For fp16 both keep 11 significant bits of a normal value
    (they differ at ties, below 2^-14 where fp16 has fewer bits, and above 65504, where fp16 overflows).
    In a training step the forward runs what the tuning table chose, the backward's recompute one
    TF32 pass (`statistics.backward_dots`): a tuned DOTS16 forward then differs from the function the
    backward differentiates by that rounding of the input's own type."""
    if native16 and precision == "tf32" and dtype in NATIVE16:
        return dtype
    return precision


def pair_applies(C: int) -> bool:
    """Whether the aggregation's PAIR mode (`GMAShape.AGG_PAIR`, `aggregation._segment_pair`: a
    segment's two heads as one [BLOCK_P, s] tensor) exists at width C: s = C / 5 a power of two >= 16
    (C = 80, 160, 320 among the released widths), so that the tensor has no padding column."""
    s = C // 5
    return C % 5 == 0 and s >= 16 and s & (s - 1) == 0


def attn_group_tile_lanes(C: int) -> Tuple[int, int]:
    """(per head, per group): the channel lanes x CRPE taps the attention's stencil issues per token, a program per
    head (8 heads, D_PAD lanes each; 2 x 9 + 3 x 25 + 3 x 49 taps) against a program per CRPE window's heads
    (`GMAShape.ATTN_GROUP`: dot_pad(2 d) lanes x 9 taps, dot_pad(3 d) x (25 + 49))."""
    d = C // 10
    return dot_pad(d) * (2 * 9 + 3 * 25 + 3 * 49), dot_pad(2 * d) * 9 + dot_pad(3 * d) * (25 + 49)


#: the widest group (dot_pad(3 d)) the GROUP candidate takes: its [BLOCK_P, 3 d] tiles and the block-diagonal
#: [dot_pad(3 d)]^2 KV operand of Q KV compiled without a spill to 64 (C = 160, fp32, BLOCK_P 16: 162 / 167
#: registers on sm_90 / sm_80) and spilled at 128 (C = 320, fp32: 0.5-3 KB), AOT, Triton 3.6, 2026-12-07
ATTN_GROUP_MAX_PAD = 64


def attn_group_applies(C: int) -> bool:
    """Whether the attention's GROUP candidate (`GMAShape.ATTN_GROUP`) is tried at width C: where it issues fewer
    stencil lanes than a program per head (`attn_group_tile_lanes`: head widths d padded by more than the group's
    2 d and 3 d are, d = 4, 8, 20, 36 of the released widths: C = 40, 80, 200, 360) and its widest group stays
    within `ATTN_GROUP_MAX_PAD` (not C = 360): C = 40, 80 and 200. (At d = 16 or 32 a head fills its lanes, and a
    group of 3 d pads 48 to 64 or 96 to 128: more lanes, not fewer.)"""
    per_head, per_group = attn_group_tile_lanes(C)
    return per_group < per_head and dot_pad(3 * (C // 10)) <= ATTN_GROUP_MAX_PAD


def zdense_applies(C: int, dtype: str, precision: str) -> bool:
    """Whether the dense Z pass (`GMAShape.AGG_ZDENSE`, `dense_z.gma_dense_z_kernel`) is a tuning candidate for
    width C, input dtype name `dtype` and the GPU's dots for it (`dot_precision`): tensor-core dots (not the
    FMA dots of sm_70/75, which would run the 10-19x larger dense work on CUDA cores), at widths where it
    compiles without spilling (AOT, Triton 3.6, batch 128, its tiles `DENSE_Z_TILES`; compiler figures):
    S_PAD <= 32 at every dtype (sm_90: 83 / 85 registers bf16, 159 / 154 fp32, wgmma), S_PAD 64 with 16-bit
    operands only (bf16 (64, 8): 109 registers on sm_90, 221 on sm_80; 3xTF32 spilled 60 B - 16 KB there),
    not S_PAD 128 (16-bit operands spilled 208 B on sm_80). (Figures with the local branch's program,
    2026-12-07: docs/performance.md.)"""
    s_pad = dot_pad(C // 5)
    if precision == "ieee":
        return False
    return s_pad <= 32 or (s_pad == 64 and dtype in ("fp16", "bf16"))


def zdense_variants(C: int, dtype: str, precision: str) -> Tuple[int, ...]:
    """The values of the ZDENSE knob (`GMAShape.AGG_ZDENSE`) the "triton.aggregate" search space tries at width
    C: none where `zdense_applies` says no; else 1 (`DENSE_Z_TILES`), and for fp16 / bf16 also 2
    (`DENSE_Z_TILES_ALT`, the other side of the registers-against-instructions trade)."""
    if not zdense_applies(C, dtype, precision):
        return ()
    return (1, 2) if dtype in ("fp16", "bf16") and dot_pad(C // 5) in DENSE_Z_TILES_ALT else (1,)


def dot_precision(dtype: str, capability: Tuple[int, int]) -> str:
    """Triton ``input_precision`` of the kernels' dots for this input dtype name on this GPU."""
    row = arch_dots(capability)
    if row is None or dtype not in row:
        raise ValueError(f"the Triton kernels do not support {dtype} on compute capability "
                         f"{capability[0]}.{capability[1]} (config.ARCH_DOTS)")
    return row[dtype]


def dtype_name(dtype) -> str:
    """torch.float32 -> "fp32" (also fp16, bf16; other dtypes: their torch name)."""
    name = str(dtype).replace("torch.", "")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)


def torch_dtype(name: str):
    """"fp32" -> torch.float32 (also fp16, bf16): the inverse of `dtype_name`."""
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def stage_dtype(dtype):
    """The dtype of the Triton backward's stage tensors (Z, V, y, R, dR, dP, G, dZ, dy, w4, xh4,
    dw4: written by one kernel, read by the next) for a layer whose input qkv has this dtype:
    the input's own for fp16/bf16, as eager AMP keeps its activations (half the bytes of fp32:
    by the cost models of costs.py, the backward kernels of a bf16 layer at GroupMixFormer-S's
    first stage, batch 128, moved about 5.9 GB with fp32 stage tensors and 3.4 GB with bf16 ones;
    docs/architecture.md has the current figures), float32 for fp32 layers. Every kernel computes and accumulates in fp32 registers, widening on load and
    rounding once on store (`_common.stored`); the small tensors (softmax statistics, KV, dKV,
    rstd4, the per-program partial sums, the weight gradients) stay float32."""
    import torch
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def capability_of_arch(arch: int) -> Tuple[int, int]:
    """75 -> (7, 5)."""
    return (arch // 10, arch % 10)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints, for host code: Triton 3.6's ``triton.cdiv`` is a constexpr function,
    whose call from Python goes through its JIT wrapper (~5 us here; ~80 calls per layer and
    training step were in the launch plans)."""
    return -(-a // b)


def dot_pad(n: int) -> int:
    """Padded width of a dimension that takes part in a tl.dot."""
    return max(16, next_pow2(n))


#: Tile order of the stencil kernels (aggregation, statistics, recompute: `aggregation._tile`):
#: the image is walked in vertical strips of `strip_width(W)` columns, about STRIP_TARGET, so a
#: program's consecutive tiles go down its strip and the stencil halo they share stays in L1.
#: Estimate (no GPU measurement), per proxy stream and channel chunk, 7x7 stencil (R = 3), 16-token
#: tiles: walking whole rows of a 56-wide image, a tile reads 7 rows x 22 columns of lines and
#: the walk comes back to the same columns one row lower only 3.5 tiles (x every stream and
#: chunk) later, so about 7 lines per token come from L2; in 14-column strips each new row of 14
#: tokens needs one new row of 20 lines, about 1.4 per token, within a working set of 7 x 20
#: lines per stream and chunk (27 KB at C = 80 fp32). Images at most STRIP_TARGET wide keep one
#: strip (row-major: their 16-token tiles already span whole rows).
STRIP_TARGET = 16


#: The combine's loads per step (`attention.gma_combine_kernel`): STEP x ROWS x D_PAD partial elements, 32 a
#: thread at 4 warps, so a step's loads are all in flight at once without many registers.
COMBINE_STEP_ELEMENTS = 4096


def combine_tile(shape: "GMAShape") -> Tuple[int, int]:
    """(ROWS, STEP) of the combine: `GMAShape.COMBINE_ROWS` rows of a head per program (a power of two, at
    most D_PAD), and `GMAShape.COMBINE_STEP` splits a step, or as many as COMBINE_STEP_ELEMENTS allow (a
    power of two: D_PAD 16 -> 64, 32 -> 32, 64 -> 16). Functions of the width only, so one compiled variant
    serves every batch and image size."""
    rows = min(shape.COMBINE_ROWS, shape.D_PAD)
    step = shape.COMBINE_STEP or max(1, COMBINE_STEP_ELEMENTS // (rows * shape.D_PAD))
    for name, v in (("COMBINE_ROWS", rows), ("COMBINE_STEP", step)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    return rows, step


def combine_grid(shape: "GMAShape", B: int) -> Tuple[int, int]:
    """The combine's grid: (8 heads x ceil(d / ROWS) row blocks, B) (`combine_tile`)."""
    return NUM_HEADS * cdiv(shape.D, combine_tile(shape)[0]), B


@dataclass(frozen=True)
class GMAShape:
    C: int            # module width
    S: int            # segment width s = C / 5
    CP: int           # attention width C' = 4 s
    D: int            # head width d = C' / 8
    S_PAD: int
    D_PAD: int
    CK: int           # aggregation: input channels per depthwise chunk (a tl.dot K dim)
    AGG_BLOCK_P: int  # tokens per aggregation tile (also the split-N granularity)
    ATTN_BLOCK_P: int  # tokens per attention-output tile
    AGG_WARPS: int = 4
    ATTN_WARPS: int = 4
    COMBINE_WARPS: int = 4
    COMBINE_ROWS: int = 4     # combine: rows (K channels) of a head per program (`combine_tile`)
    COMBINE_STEP: int = 0     # combine: splits merged per step (0: `combine_tile` derives it from D_PAD)
    SPLIT_TARGET: int = 1024  # split-N: at most about this many aggregation programs (aggregation.job_plan)
    AGG_STRIP: int = STRIP_TARGET  # aggregation tiles in strips of about this many columns (`strip_width`; 0: row-major)
    AGG_MERGE: bool = True    # aggregation: q, k, v of a segment through one depthwise pass (AGG_SEPARATE_STREAMS)
    AGG_UNROLL: bool = False  # aggregation: an instance per window, each tap row unrolled (a tuning candidate)
    ATTN_UNROLL: bool = False  # attention: the same for the CRPE windows (a tuning candidate)
    AGG_DOTS16: bool = False   # aggregation: 16-bit dot operands for 16-bit inputs (`operand_precision`; a candidate)
    AGG_PAIR: bool = False     # aggregation: a segment's two heads as one tensor (`pair_applies`; a candidate)
    ATTN_DOTS16: bool = False  # attention: the same for its Q KV dot (a tuning candidate)
    AGG_ROWS: bool = False     # aggregation: segments 1-3 by row walks down strips (`aggregation._segment_rows`; a candidate)
    ATTN_ROWS: bool = False    # attention: the CRPE by row walks down strips (`attention._attention_rows`; a candidate)
    ATTN_GROUP: bool = False   # attention: a program per CRPE window's heads, not per head (`attention._attention_group`;
    #                            a candidate; not with ATTN_ROWS)
    AGG_FUSED: bool = False    # with AGG_SPLIT and AGG_ZDENSE: the dense Z pass and the aggregation as one kernel, Z kept
    #                            in registers (`dense_z.gma_dense_aggregate_kernel`; a candidate)
    AGG_FROM_Z: bool = False   # aggregation: segments 1-3 from the statistics pass's kept Z (the training forward; `from_planes`)
    AGG_SPLIT: bool = False    # eval forward: a Z pass (`statistics.plan_z_pass`), then the aggregation from Z (a candidate)
    AGG_PIPE: int = 0          # aggregation: stages of the element-wise jobs' tile loop (`tl.range(num_stages=...)`;
    #                            0: a plain loop, and always under the interpreter; a candidate)
    AGG_ZDENSE: int = 0        # with AGG_SPLIT: the Z pass as dense K x K convolutions on tensor cores
    #                            (`dense_z.gma_dense_z_kernel`; a candidate), 1 at `DENSE_Z_TILES`, 2 at `DENSE_Z_TILES_ALT`;
    #                            with AGG_FROM_Z (1): the statistics pass ran in the dense form and computed the
    #                            local branch's Z too (`dense_z.gma_dense_statistics_kernel`; `from_planes`' local_z)

    @property
    def local_from_z(self) -> bool:
        """Whether the aggregation's local branch reads its Z (before the LayerNorm) from a buffer instead of
        running its 3x3 stencil and 3s -> s mix: with ZDENSE, whose pass computed it (`dense_z._dense_local`):
        the split eval forward's Z pass (AGG_SPLIT) or the training forward's statistics pass (AGG_FROM_Z)."""
        return bool(self.AGG_ZDENSE and (self.AGG_SPLIT or self.AGG_FROM_Z))

    def num_tiles(self, N: int, W: Optional[int] = None) -> int:
        """The aggregation's tiles of an image of N tokens (W columns): ceil(N / AGG_BLOCK_P), or with
        AGG_ROWS one per row of each AGG_BLOCK_P-column strip, ceil(W / AGG_BLOCK_P) (N / W) (W needed)."""
        if self.AGG_ROWS:
            if not W or N % W:
                raise ValueError(f"AGG_ROWS tiles need the image width: N={N}, W={W}")
            return -(-W // self.AGG_BLOCK_P) * (N // W)
        return -(-N // self.AGG_BLOCK_P)


#: Where the training forward keeps the attention's row walks (`GMAShape.ATTN_ROWS`) and they store R too
#: (`attention._attention_rows` with STORE_R): the dot precisions and the widest D_PAD at which every such
#: launch compiled without a spill (AOT, 2026-12-05, Triton 3.6, batch 128, the walk's tiles (16, 2) and
#: (32, 4), sm_80 / sm_90: 16-bit layers (one-pass TF32 dots) at C = 40-320, 108-207 registers). Elsewhere
#: the walk with STORE_R spilled: D_PAD 64 (C = 360, 480) 84-248 B, fp32's 3xTF32 at C = 320 4 B, sm_75's
#: FMA dots 4-68 B. There the training forward runs the attention's tiles, as before.
ATTN_ROWS_KEEP_R_PRECISIONS: Tuple[str, ...] = ("tf32",)
ATTN_ROWS_KEEP_R_MAX_D_PAD = 32


@functools.lru_cache(maxsize=256)
def from_planes(shape: GMAShape, precision: str = "", local_z: bool = False) -> GMAShape:
    """The specialisation of a training forward that reads the Z planes its statistics pass kept
    (`GMAShape.AGG_FROM_Z`, `aggregation._segment_z`): `shape`'s tiles, with the knobs that only
    shape the stencils of segments 1-3 (PAIR, ROWS, MERGE) set to one value, as the kernel ignores them
    there (one compiled variant, not one per forward candidate); the local branch keeps its UNROLL and
    DOTS16. ROWS off: its tiles are rows of strips, the planes are read along whole rows. Both the
    attention's tiles and its row walks (`GMAShape.ATTN_ROWS`) keep R for the backward (STORE_R:
    `attention._attention_head`, `attention._attention_rows`, the walks since 2026-12-05); the walks stay
    only where they do so without spilling (`ATTN_ROWS_KEEP_R_PRECISIONS` for the call's dot `precision`,
    `ATTN_ROWS_KEEP_R_MAX_D_PAD`). local_z: the statistics pass ran in the dense form and computed the local
    branch's Z as well (`dense_z.dense_statistics_planes`), which the aggregation reads instead of running that
    stencil (`GMAShape.local_from_z`, AGG_ZDENSE 1). Cached (every training launch asks it; GMAShape is frozen)."""
    rows = shape.ATTN_ROWS and precision in ATTN_ROWS_KEEP_R_PRECISIONS and shape.D_PAD <= ATTN_ROWS_KEEP_R_MAX_D_PAD
    return replace(shape, AGG_FROM_Z=True, AGG_SPLIT=False, AGG_ZDENSE=int(local_z), AGG_FUSED=False, AGG_PAIR=False,
                   AGG_ROWS=False,
                   AGG_MERGE=True, ATTN_ROWS=rows)


#: Aggregation tiles per width: (BLOCK_P tokens per tile, num_warps, CK channels per chunk),
#: by default and per dot precision where that needs other tiles. Each entry is one that
#: compiled with zero register spills for the dtypes using that precision, on the
#: architectures using it, with the runtime's specialisation (ptxas -v through
#: benchmarks/triton_resources.py). The kernel keeps two heads' online-softmax state
#: ([D_PAD, D_PAD] fp32 each) in registers, so ptxas works near its 255-register limit and
#: small changes tip it into spills. Found that way: C=80 at (32, 4) spills on sm_90 (also at
#: (16, 4)), so 8 warps; C=160 at (32, 4) spills on sm_90, so 16 tokens; C=480 spills with
#: 3xTF32 (fp32) at 8 warps on sm_80 and at CK = 32 on sm_90, so (16, 4, 16), while with
#: one-pass TF32 (fp16, bf16) CK = 16 spills on sm_90, so (32, 8, 32); C=320 with one-pass
#: TF32 spills on sm_90 at (16, 4, 32) and (16, 8, 32), on sm_80 (bf16) at (16, 4, 16), so
#: (32, 8, 16), clean on both; C=240 with one-pass TF32 spilled 64-88 B on sm_80 at (16, 4, 32)
#: once the aggregation decoded its cost-balanced (job, split) plan (168 registers), and (32, 8, 32)
#: / (32, 8, 16) spill too, so (16, 4, 16) (154 registers sm_80, 128 sm_90); with FMA dots (sm_70/75)
#: Triton's FMA dot layout keeps whole operand rows per thread, so C = 360/480 need 8 warps
#: (4 warps spilled ~700 B), C = 160 a smaller chunk, and C = 40 8 warps (4 warps spilled 8 B on
#: sm_70 at 128 registers with the cost-balanced plan's decode; 8 warps: 100 registers). Since the
#: merged q/k/v pass (2026-12-02, `GMAShape.AGG_MERGE`): with one-pass TF32, C = 320 at (32, 8, 16)
#: spilled 156-228 B on sm_80/90, (16, 8, 16) takes 188 / 191 registers with one element per
#: thread, (16, 4, 32) 164 / 162 with four (8-byte bf16 loads, 12 warps per SM), so the default;
#: C = 200 at (16, 4, 32) spilled 32 B on sm_80, (16, 4, 16) takes 167 / 160.
#: Occupancy (2026-12-04, `benchmarks/results/triton_aggregate_tile_sweep_sm80_sm90.md`): every
#: (BLOCK_P 16/32/64, warps 4/8, CK 16/32) tile compiled for sm_80 and sm_90 at each released
#: width and dtype; where a spill-free tile keeps more warps resident per SM on both GPUs
#: (registers x warps per CTA against the 64K register file), it became the default. C = 80:
#: (32, 8, 16) took 167-219 registers x 8 warps, one CTA (8 warps) per SM; with one-pass TF32
#: (32, 4, 16) takes 155-168, three CTAs (12 warps, 96 tokens in flight against 32), with 3xTF32
#: (16, 4, 16) 168, three CTAs ((32, 4, 16) spilled 36 B on sm_90). C = 200 with 3xTF32:
#: (16, 4, 16) 218 / 168 registers (sm_80 / sm_90), two / three CTAs, against 252 / 246 and two.
#: A compiler figure, not a measurement: `benchmarks/tune.py` confirms or overrides it on a GPU.
AGG_TILES: Dict[int, Tuple[int, int, int]] = {
    40: (16, 4, 16), 80: (16, 4, 16), 160: (16, 4, 32), 200: (16, 4, 16), 240: (16, 4, 32),
    320: (16, 4, 32), 360: (16, 8, 32), 480: (16, 4, 16)}
AGG_TILES_BY_DOTS: Dict[str, Dict[int, Tuple[int, int, int]]] = {
    "tf32": {80: (32, 4, 16), 240: (16, 4, 16), 480: (32, 8, 32)},
    "ieee": {40: (16, 8, 16), 80: (32, 8, 16), 160: (32, 4, 16), 200: (16, 4, 32), 480: (16, 8, 32)},
}


def strip_width(W: int, target: Optional[int] = None) -> int:
    """Columns per strip for an image W tokens wide: W itself up to `target` columns, else the
    narrowest equal split of W into strips of at most `target` columns (the last strip takes the
    rest: 56 -> 14 x 4, 28 -> 14 x 2, 100 -> 15 x 6 + 10). target: default `STRIP_TARGET` (read at
    each launch: tests lower it to cut small images into strips); 0: one strip, row-major order
    (the aggregation's tuning space has both: `GMAShape.AGG_STRIP`)."""
    W = int(W)
    target = STRIP_TARGET if target is None else int(target)
    if target <= 0 or W <= target:
        return W
    strips = -(-W // target)
    return -(-W // strips)


#: Aggregation tiles of a width no released model has (not in the tables above), by its padded
#: segment width S_PAD: (BLOCK_P, num_warps, CK), and per dot precision where that needs others.
#: Until 2026-12-03 such a width took (16, 4, min(32, S_PAD)), which spilled on sm_90 at C = 30
#: and 50 (fp16/bf16, 24 B), 130 (fp32, 40 B), 250 (fp16/bf16, 4 B), 500 and 640 (fp32, ~400 B).
#: With these rows ptxas spilled nothing on sm_90 for C = 10, 30, 50, 70, 90, 130, 150, 170, 250,
#: 310, 330, 500, 640 (fp32, fp16, bf16), nor on sm_80 but at S_PAD 128 in fp32 (C = 330: 40 B,
#: 500: 8 B); with FMA dots (sm_70/75) S_PAD 16 and 32 compile clean, S_PAD 64 (fp32 on sm_75:
#: 44-68 B) and 128 (4-72 B) still spill (AOT compiles of the aggregation at a 13x17 grid, batch 8,
#: Triton 3.6; tests/test_triton_compile.py checks sm_90). A spill costs speed, not correctness.
AGG_FALLBACK_TILES: Dict[int, Tuple[int, int, int]] = {16: (32, 8, 16), 32: (16, 4, 16), 64: (16, 4, 16),
                                                       128: (16, 8, 16)}
AGG_FALLBACK_TILES_BY_DOTS: Dict[str, Dict[int, Tuple[int, int, int]]] = {"ieee": {16: (16, 8, 16)}}


def agg_tiles(C: int, dots: str) -> Tuple[int, int, int]:
    """The aggregation's (BLOCK_P, num_warps, CK) for width C with dots of this precision: the
    released widths' tables (`AGG_TILES_BY_DOTS`, `AGG_TILES`), else by the padded segment width
    (`AGG_FALLBACK_TILES_BY_DOTS`, `AGG_FALLBACK_TILES`)."""
    S_PAD = dot_pad(C // 5)
    return (AGG_TILES_BY_DOTS.get(dots, {}).get(C) or AGG_TILES.get(C)
            or AGG_FALLBACK_TILES_BY_DOTS.get(dots, {}).get(S_PAD) or AGG_FALLBACK_TILES[S_PAD])


#: Widths per dot precision whose aggregation runs q, k and v one after the other (`GMAShape.AGG_MERGE`
#: False) instead of through one depthwise pass: where the merged variant (six [BLOCK_P, D_PAD] head
#: outputs alive) spilled with every tile tried. C = 480 with 3xTF32 dots: (16, 4, 16) spilled 8 B on
#: sm_90, (16, 8, 16) 40 B and (32, 8, 16) 72 B on sm_80, (16, 4, 32), (32, 4, 16), (16, 16, 16)
#: hundreds of bytes (ptxas through the AOT compile, Triton 3.6, 2026-12-02).
AGG_SEPARATE_STREAMS: Dict[str, Tuple[int, ...]] = {"tf32x3": (480,)}

#: Tiles used under the Triton interpreter (CPU): its cost is per operation per program,
#: not per element, so fewer, larger tiles (and one channel chunk) run much faster there.
#: The GPU tiles are exercised on the CPU too by passing them explicitly (tests do).
INTERPRETER_BLOCK_P = 256

#: (BLOCK_P, num_warps) of the dense Z pass (`dense_z.gma_dense_z_kernel`, `GMAShape.AGG_ZDENSE`) by S_PAD: three
#: [BLOCK_P, S_PAD] fp32 accumulators (q, k, v) per program; 128 tokens where s is small, so that a tap's MMAs
#: share the W_t operand's layout change among more rows; 8 warps at S_PAD 64 (bf16, sm_90: 163 -> 100 registers
#: against 4 warps, sm_80 255 -> 237). Where it is a candidate: `zdense_applies`.
DENSE_Z_TILES: Dict[int, Tuple[int, int]] = {16: (128, 4), 32: (64, 4), 64: (64, 8), 128: (32, 4)}
#: ... and the other tile the search space tries for fp16 / bf16 (ZDENSE 2, `zdense_variants`). SASS of the tap loop
#: (Triton 3.6, batch 128, bf16; warp instructions per token over the 83 taps of the three segments, 3 streams;
#: compiler figures): S_PAD 16 (64, 4): 50 registers, 680 per token, against (128, 4)'s 80 and 456; S_PAD 32 (128, 4):
#: 152 registers (sm_80 168), 51 KB shared, 568 per token, against (64, 4)'s 80 and 923; S_PAD 64 (128, 8): 165
#: registers (sm_80 255), 107 KB, 1198 per token, against (64, 8)'s 100 and 1354 (sm_90 unless said). No spills.
DENSE_Z_TILES_ALT: Dict[int, Tuple[int, int]] = {16: (64, 4), 32: (128, 4), 64: (128, 8)}
#: (BLOCK_P, num_warps) of the dense backward's weight gradient (`dense_z.gma_dense_wgrad_kernel`, the training
#: backward with `BackwardTiles.DENSE`) by S_PAD: two [S_PAD, S_PAD] fp32 accumulators held (the tap's G_t and dPW)
#: and the transposed pointwise, a [BLOCK_P, S_PAD] tile of x and of dZ per stream and tile. Its input gradient runs
#: the forward's kernel turned half a turn at `DENSE_Z_TILES`.
DENSE_WGRAD_TILES: Dict[int, Tuple[int, int]] = {16: (32, 4), 32: (32, 4), 64: (64, 8)}
#: stages of its tap loop on a GPU (``tl.range(num_stages=...)``: a tap's loads issued while the previous tap's
#: MMAs run); the interpreter runs a plain loop
DENSE_Z_STAGES = 2


#: Attention tiles per padded head width D_PAD: (BLOCK_P tokens per tile, num_warps), by
#: default and per dot precision where that needs others (the FMA variant computes Q KV as
#: rank-1 updates, attention.py; at 64 tokens and D_PAD = 16 ptxas spilled 8 B on sm_70).
ATTN_TILES: Dict[int, Tuple[int, int]] = {16: (64, 4), 32: (64, 4), 64: (32, 4)}
ATTN_TILES_BY_DOTS: Dict[str, Dict[int, Tuple[int, int]]] = {"ieee": {16: (32, 4)}}

#: Backward tiles (attention_backward.py) per padded head width D_PAD: (tokens per tile,
#: num_warps) of B1 (dKV, [D_PAD, BLOCK] x [BLOCK, D_PAD] dots), B2 (dQ, dK, dV: three
#: [BLOCK, D_PAD] x [D_PAD, D_PAD] dots) and the CRPE backward (fused KS x KS tap loop). Each
#: compiled with zero spills for sm_80 and sm_90 (3xTF32 dots, every released width at its
#: 224x224 stage grid, batch 128; one-pass TF32 dots checked at C = 320; sm_70/75 not yet):
#: at D_PAD = 64, B1 (64, 4) spilled 728 B on sm_80, B2 (32, 4) ~100 B on both; the CRPE kernel
#: at (64, 4) and D_PAD = 32 spilled 332 B (sm_80) / 144 B (sm_90), (32, 2) too.
B1_TILES: Dict[int, Tuple[int, int]] = {16: (64, 4), 32: (64, 4), 64: (32, 4)}
#: B2 at D_PAD = 32 (C = 200, 240, 320) since B2 reads Z of q and k and forms Q, K on load
#: (2026-12-03; batch 128, every dtype, sm_70/75/80/90): (64, 4) spilled 28-148 B with FMA dots on
#: sm_70/75 and 64 B at C = 320 fp16/bf16 on sm_90, (32, 4) 32-104 B on sm_70/75, (64, 8) 4-12 B
#: at C = 320 fp32 on sm_80; (32, 8) none (at most 255 registers with 3xTF32 dots on sm_80, 175-192
#: otherwise).
B2_TILES: Dict[int, Tuple[int, int]] = {16: (64, 4), 32: (32, 8), 64: (32, 8)}
CRPE_BWD_TILES: Dict[int, Tuple[int, int]] = {16: (64, 4), 32: (32, 4), 64: (16, 4)}
#: The CRPE backward's tiles where they differ by GPU generation, keyed by the layer's dot
#: precision as its stand-in (the kernel itself has no dots: "ieee" is sm_70/75, "tf32" and
#: "tf32x3" sm_80+). With the BatchNorm backward fused in (2026-12-02) ptxas spilled 8-12 B at
#: D_PAD 16 with (64, 4) on sm_80 (C = 40, batch statistics; (32, 4) 8 B at C = 80, (32, 8)
#: 4-12 B); (64, 8) none at C = 40, 80, 160 on sm_80 and sm_90, but 32-48 B on sm_70/75, where
#: (64, 4) compiles clean.
CRPE_BWD_TILES_BY_DOTS: Dict[str, Dict[int, Tuple[int, int]]] = {"tf32": {16: (64, 8)}, "tf32x3": {16: (64, 8)}}


def crpe_bwd_tiles(precision: str) -> Dict[int, Tuple[int, int]]:
    """The CRPE backward's tiles by D_PAD for layers whose dots have this precision."""
    return {**CRPE_BWD_TILES, **CRPE_BWD_TILES_BY_DOTS.get(precision, {})}


#: Widest padded segment width s (S_PAD) whose layers run the Triton backward kernels, by the
#: backward's dot precision (`statistics.backward_dots`, the forward's: "tf32x3" for fp32 and
#: one-pass "tf32" for fp16/bf16 on sm_80+, FMA "ieee" on sm_70/75; `backward_kernels_take`).
#: Every backward and recompute kernel of every released width within it compiles without
#: spills (ptxas, at the launchers' specialisations of every real call:
#: benchmarks/results/triton_backward_resources_*.md, triton_statistics_resources_*.md).
#: S_PAD 128 (C = 360, 480: the last stages of GroupMixFormer-B/L) on sm_80/90 since 2026-12-02:
#: B3 unfused there (`aggregation_backward.FUSED_B3_MAX_S_PAD`; fused, the pointwise kernel spilled
#: ~900 B), the local backward's LayerNorm sums reduced per tile (two [S_PAD, BLOCK_P]
#: accumulators spilled 144-460 B) with 16-channel blocks, the recompute tiles of
#: `statistics.RECOMPUTE_TILE_WIDE` and `recompute.LOCAL_TILES[128]`. On sm_70/75 at S_PAD 128 the
#: FMA dots still spill (B2 at D_PAD 64 ~250 B, the pointwise ~220 B, the local ~400 B, the
#: attention recompute ~800 B): those layers take the PyTorch stages there.
BACKWARD_KERNELS_MAX_S_PAD: Dict[str, int] = {"tf32x3": 128, "tf32": 128, "ieee": 64}


def backward_kernels_take(s: int, precision: str) -> bool:
    """Whether a layer of segment width s runs the Triton backward kernels when the backward's
    dots have this precision (`BACKWARD_KERNELS_MAX_S_PAD`)."""
    return next_pow2(s) <= BACKWARD_KERNELS_MAX_S_PAD.get(precision, 0)


#: The most images one launch of the forward kernels takes: the batch is a grid dimension (y of
#: the aggregation's and the combine's grids, z of the attention's), which CUDA caps at 65535. A
#: larger eval batch runs in chunks of this many (`op.triton_pre_projection`: exact, the images of
#: an eval call being independent; every per-image offset is 64-bit there).
MAX_GRID_BATCH = 65535
#: The training kernels (the statistics pass, the recompute, the backward) put the 3B images of
#: q, k and v on a grid dimension (the statistics pass's y), and the aggregation backward walks
#: flat pixel indices over them with 32-bit offsets: they take B <= 65535 // 3 images and tensors
#: of fewer than 2^31 elements, the largest being qkv and its gradient (B N 3C elements; the stage
#: tensors Z, G (3B, 4C/5, N) hold 2.4 B N C). A larger training batch needs gradient accumulation
#: (batch statistics couple the images: no chunking), or the torch backend (no limit).
MAX_TRAIN_BATCH = MAX_GRID_BATCH // 3
MAX_TRAIN_ELEMENTS = 2 ** 31 - 1


def train_size_reasons(B: int, N: int, C: int) -> List[str]:
    """Why the training kernels cannot take a batch of B images of N tokens at width C
    (`MAX_TRAIN_BATCH`, `MAX_TRAIN_ELEMENTS`); [] when they can."""
    reasons = []
    if B > MAX_TRAIN_BATCH:
        reasons.append(f"batch B={B}: the training kernels take at most {MAX_TRAIN_BATCH} images per call (3B "
                       "images on one grid dimension of at most 65535)")
    if B * N * 3 * C > MAX_TRAIN_ELEMENTS:
        reasons.append(f"B={B}, N={N}, C={C}: qkv and its gradient hold B*N*3C = {B * N * 3 * C} elements, more "
                       f"than the training kernels' 32-bit offsets address ({MAX_TRAIN_ELEMENTS}); "
                       f"at most {MAX_TRAIN_ELEMENTS // (N * 3 * C)} images at this size")
    return reasons


def check_train_size(B: int, N: int, C: int) -> None:
    """ValueError with `train_size_reasons` when there are any: the run-time check of the training
    kernels' launchers (under torch.compile, dispatch decides without the sizes: functional.SIZE_FIELDS)."""
    reasons = train_size_reasons(B, N, C)
    if reasons:
        raise ValueError("the Triton training kernels cannot take this call: " + "; ".join(reasons)
                         + ". Split the batch (gradient accumulation) or use backend='torch'")


def gma_shape(C: int, agg_block_p: int = 0, attn_block_p: int = 0, interpreter: bool = False,
              ck: int = 0, split_target: int = 1024, agg_warps: int = 0, dots: str = "tf32x3",
              strip: Optional[int] = None, merge: Optional[bool] = None, unroll: bool = False,
              attn_unroll: bool = False, dots16: bool = False, attn_dots16: bool = False,
              pair: bool = False, rows: bool = False, attn_rows: bool = False, split: bool = False,
              pipe: int = 0, zdense: int = 0, attn_group: bool = False, fused: bool = False) -> GMAShape:
    """The specialisation for width C (tile sizes may be overridden, e.g. by tests).

    dots: the dots' precision ("tf32x3", "tf32", "ieee": `ARCH_DOTS`), which picks the
    tiles (`AGG_TILES_BY_DOTS` / `ATTN_TILES_BY_DOTS`, else `AGG_TILES` / `ATTN_TILES`).
    strip: the aggregation's strip target (`strip_width`; default `STRIP_TARGET`, 0 row-major).
    merge: the aggregation's q/k/v merge (default: merged unless `AGG_SEPARATE_STREAMS` lists C).
    unroll, attn_unroll: the aggregation's / the attention's unrolled tap rows (`GMAShape.AGG_UNROLL`,
    `GMAShape.ATTN_UNROLL`; default off).
    dots16, attn_dots16: 16-bit dot operands for 16-bit inputs in the aggregation / the attention
    (`operand_precision`, `GMAShape.AGG_DOTS16` / `ATTN_DOTS16`; default off).
    pair: the aggregation's two heads of a segment as one tensor (`GMAShape.AGG_PAIR`; default off;
    only where `pair_applies` and with the merged q/k/v pass).
    rows: the aggregation's segments 1-3 by row walks (`GMAShape.AGG_ROWS`; default off; only with pair).
    attn_rows: the attention's CRPE by row walks (`GMAShape.ATTN_ROWS`; default off).
    attn_group: the attention's programs per CRPE window's heads (`GMAShape.ATTN_GROUP`; default off; not with
    attn_rows).
    fused: the dense Z pass and the aggregation in one kernel (`GMAShape.AGG_FUSED`; needs split and zdense, whose
    tiles it takes).
    split: the eval forward split in a Z pass and the aggregation from Z (`GMAShape.AGG_SPLIT`; default off).
    pipe: the stages of the aggregation's element-wise tile loops (`GMAShape.AGG_PIPE`; default 0, a plain loop).
    zdense: the split forward's Z pass as dense convolutions on tensor cores (`GMAShape.AGG_ZDENSE`: 1 or 2, its
    tile table; needs split).
    The knobs that only shape the stencils of segments 1-3 (pair, rows, merge) are then set to one value, as
    `from_planes` sets them: the aggregation runs no such stencil (one compiled variant)."""
    if C % 10 != 0 or C <= 0:
        raise ValueError(f"C={C}: the Triton kernels need C a positive multiple of 10")
    S = C // 5
    CP = 4 * S
    D = CP // NUM_HEADS
    S_PAD, D_PAD = dot_pad(S), dot_pad(D)
    if interpreter:
        agg_block_p = agg_block_p or INTERPRETER_BLOCK_P
        attn_block_p = attn_block_p or INTERPRETER_BLOCK_P
        ck = ck or S_PAD
    tiles = agg_tiles(C, dots)
    agg = agg_block_p or tiles[0]
    agg_warps = agg_warps or tiles[1]
    ck = ck or tiles[2]
    attn_tiles = ATTN_TILES_BY_DOTS.get(dots, {}).get(D_PAD) or ATTN_TILES[D_PAD]
    attn = attn_block_p or attn_tiles[0]
    for name, v in (("agg_block_p", agg), ("attn_block_p", attn), ("ck", ck)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16")
    merged = (C not in AGG_SEPARATE_STREAMS.get(dots, ())) if merge is None else bool(merge)
    if pair and not (pair_applies(C) and merged):
        raise ValueError(f"pair=True needs s = C/5 a power of two >= 16 and the merged q/k/v pass (C={C}, "
                         f"merged={merged})")
    if rows and not pair:
        raise ValueError(f"rows=True walks a segment's two heads as one tensor: it needs pair=True (C={C})")
    if zdense not in (0, 1, 2, False, True):
        raise ValueError(f"zdense={zdense!r}: 0 (off), 1 (DENSE_Z_TILES) or 2 (DENSE_Z_TILES_ALT)")
    if zdense and not split:
        raise ValueError("zdense is a Z pass of the split forward: it needs split=True")
    if fused and not (split and zdense):
        raise ValueError("fused joins the dense Z pass to the aggregation: it needs split=True and zdense")
    if attn_group and attn_rows:
        raise ValueError("attn_group groups the attention's tile programs: the row walks (attn_rows) have none")
    if split:
        pair, rows, merged = False, False, True
    return GMAShape(C=C, S=S, CP=CP, D=D, S_PAD=S_PAD, D_PAD=D_PAD, CK=ck, AGG_BLOCK_P=agg,
                    ATTN_BLOCK_P=attn, AGG_WARPS=agg_warps, ATTN_WARPS=attn_tiles[1], SPLIT_TARGET=split_target,
                    AGG_STRIP=STRIP_TARGET if strip is None else int(strip),
                    AGG_MERGE=merged,
                    AGG_UNROLL=bool(unroll), ATTN_UNROLL=bool(attn_unroll), AGG_DOTS16=bool(dots16),
                    ATTN_DOTS16=bool(attn_dots16), AGG_PAIR=bool(pair), AGG_ROWS=bool(rows),
                    ATTN_ROWS=bool(attn_rows), AGG_SPLIT=bool(split), AGG_PIPE=int(pipe),
                    AGG_ZDENSE=int(zdense), ATTN_GROUP=bool(attn_group), AGG_FUSED=bool(fused))
