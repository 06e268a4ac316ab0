"""Tiles of the training kernels as data (`gmf_kernels.tuning`): one search space per kernel
family, keyed like the forward's by (GPU architecture, C, dtype), and the lookup a launch makes.

Families, each registered by the module that launches its kernels, next to its tile table:

    family                       kernels                                   knobs
    triton.statistics            statistics pass (statistics.py)           BLOCK_P, num_warps, CK, ROWS
    triton.recompute_z           recompute of Z, V, y (statistics.py)      BLOCK_P, num_warps, CK
    triton.recompute_attention   softmax statistics, KV, CRPE (recompute)  BLOCK_P, num_warps
    triton.recompute_local       local branch (recompute.py)               BLOCK_P, num_warps, CK
    triton.b1                    dKV (attention_backward.py)               BLOCK_P, num_warps
    triton.b2                    dQ, dK, dV, G (attention_backward.py)     BLOCK_P, num_warps
    triton.b2_crpe               CRPE input and bias gradient              BLOCK_P, num_warps, ROWS
                                 (attention_backward.py; its weight gradient
                                 takes triton.backward's stencil tile)
    triton.backward              dZ, pointwise, depthwise (input, weight)  BLOCK_C, BLOCK_P, num_warps,
                                 and local-branch backward kernels         PW_BLOCK_P, PW_WARPS, PW_TILE_ELEMS,
                                 (aggregation_backward.py); B3's dense     DW_ROWS, DENSE
                                 form (dense_z.py)

A family's default is its module's tile table for the dots the call runs (the statistics pass:
fp32's, `statistics.statistics_dots`; every other family: the layer dtype's,
`statistics.backward_dots`), i.e. the spill-free tiles of the AOT sweeps each table's comment
records; its candidates are the default first, then the module's other tiles (its tables and a
few more, its ``*_SEARCH``), at most MAX_CANDIDATES. A family whose width runs the PyTorch
backward stages (`config.backward_kernels_take`) has no candidates (the statistics pass runs
at every width).

On a CUDA device a launch takes the tuning table's entry for its GPU, C and the layer's dtype
(`tuned_tiles`; written by ``benchmarks/tune.py --train``, which refuses candidates that spill
or change the result beyond rounding), else the default; under the interpreter and on meta or
CPU tensors (the AOT specialisations) the modules' own tiles, unchanged.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import tuning
from ._common import _cuda_capability, interpreting
from .config import backward_kernels_take, dot_pad, dot_precision, dtype_name

Tile = Tuple[int, ...]
MAX_CANDIDATES = 6
#: family -> its knobs, in the order of the tile tuples the launchers take
KEYS: Dict[str, Tuple[str, ...]] = {}
#: family -> the @triton.jit kernels it tiles (the tuner reads their compiled variants' spills)
KERNELS: Dict[str, Tuple[object, ...]] = {}


def precision_of(dtype, capability, backward: bool) -> Optional[str]:
    """The dots' precision of a family's kernels for a layer of this dtype on this GPU: fp32's
    for the statistics pass (backward False), the layer dtype's otherwise; None where the
    Triton kernels refuse the dtype (config.ARCH_DOTS)."""
    try:
        return dot_precision("fp32" if not backward else dtype_name(dtype), tuple(capability or (8, 0)))
    except ValueError:
        return None


def register_tiles(family: str, keys: Sequence[str], default: Callable[[int, str], Tile],
                   others: Callable[[int, str], Iterable[Tile]], kernels: Sequence[object],
                   backward: bool = True) -> tuning.SearchSpace:
    """Register a training kernel family's search space: default(C, precision) is the tile its
    module uses, others(C, precision) the further tiles worth a try (duplicates dropped; a "CK"
    channel chunk clipped to the padded segment width, as the launchers clip it)."""
    keys = tuple(keys)

    def default_cfg(C: int, dtype, capability) -> Dict[str, int]:
        return dict(zip(keys, default(C, precision_of(dtype, capability, backward) or "tf32x3")))

    def candidates(C: int, dtype, capability) -> List[Dict[str, int]]:
        precision = precision_of(dtype, capability, backward)
        if precision is None or (backward and not backward_kernels_take(C // 5, precision)):
            return []
        out = [default_cfg(C, dtype, capability)]
        for tile in others(C, precision):
            cfg = dict(zip(keys, tile))
            if "CK" in cfg:                     # a channel chunk never wider than the padded segment
                cfg["CK"] = min(cfg["CK"], dot_pad(C // 5))
            if cfg not in out and len(out) < MAX_CANDIDATES:
                out.append(cfg)
        return out

    KEYS[family] = keys
    KERNELS[family] = tuple(kernels)
    return tuning.register_space(tuning.SearchSpace(family, candidates, default_cfg))


def tuned_tiles(family: str, C: int, like: torch.Tensor) -> Optional[Tile]:
    """The tile of `family` for a call whose layer input is `like` (its dtype and CUDA device):
    the tuning table's entry for that GPU, C and dtype, else the family's default; None off CUDA
    and under the interpreter (the caller then uses its own tiles)."""
    if interpreting() or like.device.type != "cuda" or family not in KEYS:
        return None
    index = like.device.index if like.device.index is not None else torch.cuda.current_device()
    cfg = tuning.choose(family, C, like.dtype, _cuda_capability(index))
    return tuple(int(cfg[k]) for k in KEYS[family])


def families() -> List[str]:
    """Every registered training family (each registers when its module is imported; train_op
    imports them all)."""
    return sorted(KEYS)
