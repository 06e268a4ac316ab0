"""Static shape and tile sizes of one kernel specialisation (pure Python, no Triton).

Everything a kernel takes as ``tl.constexpr`` is derived here from the module width C,
so the launchers, the AOT compile script and the tests agree on the specialisations.

Tile choices (heuristic, not autotuned: this was written on a machine without a GPU;
``benchmarks/ops.py`` is where a GPU run would confirm or retune them; the register and
spill figures behind them are in ``benchmarks/results/triton_resources_sm80_sm90.md``):

* Widths are padded to powers of two and to >= 16, because every ``tl.dot`` dimension
  must be >= 16 on the GPU (d = 4 pads to 16, d = 36 to 64, ...).
* Token tiles are 1-D runs of BLOCK_P consecutive tokens (row-major), not 2-D pixel
  tiles: no padding waste on 7x7 / 14x14 / odd grids, and the stencil halo (up to 3
  rows above and below) is read through L1/L2, where neighbouring tiles share it.
* Aggregation: the s input channels of a segment go through the depthwise stencil in
  chunks of CK = 32 and are accumulated into the two [BLOCK_P, D_PAD] head outputs by
  ``tl.dot``; a program walks its tiles with the softmax state of two heads in registers.
  ptxas allocates up to 255 registers for this kernel and spilled at 64-token (and for
  most widths 32-token) tiles, so the token tile is small: ``AGG_BLOCK_P`` below, 16 or
  32 tokens, chosen for zero spills on both archs and all three dtypes.
* Attention: [BLOCK_P, D_PAD] tiles, BLOCK_P = 64 (32 for D_PAD = 64, where 64 spilled).
* Split-N: about SPLIT_TARGET = 1024 aggregation programs (5 per image and split): a
  few waves on a 108-132 SM GPU even at batch 1; at batch 128 one or two splits, so the
  softmax partials stay a small fraction of the traffic.
"""
from __future__ import annotations

from dataclasses import dataclass

NUM_HEADS = 8


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_pad(n: int) -> int:
    """Padded width of a dimension that takes part in a tl.dot."""
    return max(16, next_pow2(n))


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
    SPLIT_TARGET: int = 1024  # split-N: aim for about this many aggregation programs

    def num_tiles(self, N: int) -> int:
        return -(-N // self.AGG_BLOCK_P)


#: Aggregation tokens per tile, per width: the largest of 64 / 32 / 16 that compiles with
#: zero register spills on sm_80 and sm_90 for fp32, fp16 and bf16 at 4 warps (ptxas -v,
#: swept with benchmarks/triton_resources.py's machinery). Other widths: 16.
AGG_BLOCK_P = {40: 16, 80: 32, 160: 32, 200: 16, 240: 16, 320: 16, 360: 16, 480: 16}

#: Tiles used under the Triton interpreter (CPU): its cost is per operation per program,
#: not per element, so fewer, larger tiles (and one channel chunk) run much faster there.
#: The GPU tiles are exercised on the CPU too by passing them explicitly (tests do).
INTERPRETER_BLOCK_P = 256


def gma_shape(C: int, agg_block_p: int = 0, attn_block_p: int = 0, interpreter: bool = False,
              ck: int = 0, split_target: int = 1024) -> GMAShape:
    """The specialisation for width C (tile sizes may be overridden, e.g. by tests)."""
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
    agg = agg_block_p or AGG_BLOCK_P.get(C, 16)
    attn = attn_block_p or (32 if D_PAD >= 64 else 64)
    ck = ck or min(32, S_PAD)
    agg_warps = 4
    for name, v in (("agg_block_p", agg), ("attn_block_p", attn), ("ck", ck)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16")
    return GMAShape(C=C, S=S, CP=CP, D=D, S_PAD=S_PAD, D_PAD=D_PAD, CK=ck, AGG_BLOCK_P=agg,
                    ATTN_BLOCK_P=attn, AGG_WARPS=agg_warps, SPLIT_TARGET=split_target)
