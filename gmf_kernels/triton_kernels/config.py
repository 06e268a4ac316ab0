"""Static shape and tile sizes of one kernel specialisation (pure Python, no Triton).

Everything a kernel takes as ``tl.constexpr`` is derived here from the module width C,
so the launchers, the AOT compile script and the tests agree on the specialisations.

Tile choices (heuristic, not autotuned: this was written on a machine without a GPU;
``benchmarks/ops.py`` is where a GPU run would confirm or retune them):

* Widths are padded to powers of two and to >= 16, because every ``tl.dot`` dimension
  must be >= 16 on the GPU (d = 4 pads to 16, s = 72 to 128, ...).
* Token tiles are 1-D runs of BLOCK_P consecutive tokens (row-major), not 2-D pixel
  tiles: no padding waste on 7x7 / 14x14 / odd grids, and the stencil halo (up to 3
  rows above and below) is read through L1/L2, where neighbouring tiles share it.
* Aggregation: BLOCK_P * S_PAD <= 4096 fp32 per live [tokens, channels] tile, i.e.
  32 registers per thread per tile at 4 warps; the kernel keeps about three alive.
* Attention: [BLOCK_P, D_PAD] tiles, D_PAD <= 64, so BLOCK_P = 64 stays small.
"""
from __future__ import annotations

from dataclasses import dataclass

NUM_HEADS = 8
#: (first head, number of heads, window) of the three CRPE groups (GMA_SPEC §1 step 7)
CRPE_GROUPS = ((0, 2, 3), (2, 3, 5), (5, 3, 7))
#: widths of the released models (GMA_SPEC §2)
MODEL_WIDTHS = (40, 80, 160, 200, 240, 320, 360, 480)


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
    AGG_BLOCK_P: int  # tokens per aggregation tile (also the split-N granularity)
    ATTN_BLOCK_P: int  # tokens per attention-output tile
    NUM_WARPS: int = 4

    def num_tiles(self, N: int) -> int:
        return -(-N // self.AGG_BLOCK_P)


#: Tiles used under the Triton interpreter (CPU): its cost is per operation per program,
#: not per element, so fewer, larger tiles run much faster there. The GPU tiles above
#: are exercised on the CPU too by passing them explicitly (tests do).
INTERPRETER_BLOCK_P = 256


def gma_shape(C: int, agg_block_p: int = 0, attn_block_p: int = 0, interpreter: bool = False) -> GMAShape:
    """The specialisation for width C (tile sizes may be overridden, e.g. by tests)."""
    if interpreter:
        agg_block_p = agg_block_p or INTERPRETER_BLOCK_P
        attn_block_p = attn_block_p or INTERPRETER_BLOCK_P
    if C % 10 != 0 or C <= 0:
        raise ValueError(f"C={C}: the Triton kernels need C a positive multiple of 10")
    S = C // 5
    CP = 4 * S
    D = CP // NUM_HEADS
    S_PAD, D_PAD = dot_pad(S), dot_pad(D)
    agg = agg_block_p or max(16, min(64, 4096 // S_PAD))
    attn = attn_block_p or 64
    for name, v in (("agg_block_p", agg), ("attn_block_p", attn)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16")
    return GMAShape(C=C, S=S, CP=CP, D=D, S_PAD=S_PAD, D_PAD=D_PAD, AGG_BLOCK_P=agg, ATTN_BLOCK_P=attn)
