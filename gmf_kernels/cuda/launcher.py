"""Launcher of the CUDA pre-projection: workspace, stream, device guard, tuned tiles, call into the module.

    pre = launch_pre_projection(qkv, H, W, weights, scale, ln_eps)             # on the GPU
    pre = launch_pre_projection(..., emulate=True)                             # same kernel code on the CPU
    pre = launch_pre_projection(..., config={"tile_h": 7, "tile_w": 7, "tiles_per_cta": 8})  # one candidate

The compiled module (csrc/, `gmf_kernels.cuda.load()`) takes raw addresses, sizes, a dtype
code and the CUDA stream as integers (no torch headers), so the checks live in Python
(`gmf_kernels.op_args`) and in the module's host planner (csrc/gma_host.cpp), both before
any CUDA call.

Launch choices as data (`gmf_kernels.tuning`, family ``"cuda.tiles"``): the tile shape
(``tile_h`` x ``tile_w`` pixels) and ``tiles_per_cta`` (work units per persistent CTA) per
(GPU architecture, C, dtype), from the architecture's tuning table when it has an entry; the
default ``{"tile_h": 0, "tile_w": 0, "tiles_per_cta": 0}`` lets the module's planner choose
(the tile covering the grid with the least waste, ~1056 CTAs, shared memory fitted to the
device: `plan()` in csrc/gma_host.cpp). The device's per-block shared-memory limit is
passed to the planner, which stages the weights in shared memory when they fit and
otherwise reads them packed from the workspace.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import tuning
from ..folding import WEIGHT_NAMES
from ..op_args import check_pre_projection_args
from . import BUILD_COMMAND, load

Tensor = torch.Tensor

#: dtype codes of the compiled module (csrc/gma_layout.h DTypeCode)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: widest head the kernels take (csrc/gma_layout.h kMaxHeadDim): C <= 640
MAX_HEAD_DIM = 64
#: the tuning family of the CUDA tile kernels (gma_aggregate_kernel, gma_attention_kernel)
TILE_FAMILY = "cuda.tiles"
#: the planner's automatic choice (csrc/gma_host.cpp plan)
AUTO = {"tile_h": 0, "tile_w": 0, "tiles_per_cta": 0}
#: candidate tiles: 8x8 (56-pixel grids), 7x7 (7/14/28), 4x8 and 4x4 (small problems)
CANDIDATE_TILES = ((8, 8), (7, 7), (4, 8), (4, 4))
CANDIDATE_TILES_PER_CTA = (0, 8)
#: per-block shared-memory opt-in limits by compute capability (CUDA programming guide), for
#: torch builds whose device properties lack shared_memory_per_block_optin
SMEM_OPTIN = {(7, 0): 96 * 1024, (7, 2): 48 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024,
              (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
              (12, 0): 99 * 1024}


def tile_candidates(C: int, dtype, capability: Tuple[int, int]) -> List[Dict[str, int]]:
    """The ``cuda.tiles`` search space: the automatic plan and tiles x tiles-per-CTA (0 = the
    planner's count). Every candidate is a valid `config` of `launch_pre_projection` for any
    C and dtype (a tile whose weights do not fit the device's shared memory reads them packed)."""
    out = [dict(AUTO)]
    for th, tw in CANDIDATE_TILES:
        for tpc in CANDIDATE_TILES_PER_CTA:
            out.append({"tile_h": th, "tile_w": tw, "tiles_per_cta": tpc})
    return out


def tile_default(C: int, dtype, capability: Tuple[int, int]) -> Dict[str, int]:
    """Until a GPU has measured (benchmarks/tune.py): the planner's own choice."""
    return dict(AUTO)


SPACE = tuning.register_space(tuning.SearchSpace(TILE_FAMILY, tile_candidates, tile_default))


def module():
    """The compiled module, checked to take the folded weights in `folding.WEIGHT_NAMES` order."""
    mod = load()
    names = tuple(mod.weight_names())
    if names != WEIGHT_NAMES:  # pragma: no cover - guards a csrc/Python mismatch
        raise ImportError(f"CUDA module weight order {names} != {WEIGHT_NAMES}; rebuild with `{BUILD_COMMAND}`")
    return mod


def device_smem_limit(device: torch.device) -> int:
    """Bytes of dynamic shared memory one block of `device` may use (its opt-in maximum)."""
    props = torch.cuda.get_device_properties(device)
    v = getattr(props, "shared_memory_per_block_optin", None)
    if v:
        return int(v)
    cap = (int(props.major), int(props.minor))
    if cap in SMEM_OPTIN:
        return SMEM_OPTIN[cap]
    per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 0)
    return max(48 * 1024, per_sm - 1024) if per_sm else 48 * 1024


def _aligned(t: Tensor, align: int = 16) -> Tensor:
    t = t.contiguous()
    if t.data_ptr() % align != 0:
        t = t.clone()  # a fresh allocation is aligned
    return t


def _workspace(nbytes: int, device) -> Tensor:
    """nbytes of scratch, 256-byte aligned (the kernels' packed weights and WMMA operands)."""
    raw = torch.empty(nbytes + 256, dtype=torch.uint8, device=device)
    off = (-raw.data_ptr()) % 256
    return raw[off:off + nbytes]


def resolve_config(C: int, dtype, capability: Optional[Tuple[int, int]], tile: Tuple[int, int] = (0, 0),
                   tiles_per_cta: int = 0, config: Optional[dict] = None) -> Dict[str, int]:
    """The launch choice: `config` when given, else explicit `tile` / `tiles_per_cta`, else the
    tuning table's entry for (arch, C, dtype), else the planner's automatic choice."""
    if config is not None:
        unknown = set(config) - set(AUTO) - {"time_us"}
        if unknown:
            raise ValueError(f"unknown {TILE_FAMILY} config keys {sorted(unknown)}; expected {sorted(AUTO)}")
        return {k: int(config.get(k, 0)) for k in AUTO}
    if tuple(tile) != (0, 0) or tiles_per_cta:
        return {"tile_h": int(tile[0]), "tile_w": int(tile[1]), "tiles_per_cta": int(tiles_per_cta)}
    if capability is None:
        return dict(AUTO)
    chosen = tuning.choose(TILE_FAMILY, C, dtype, capability)
    return {k: int(chosen.get(k, 0)) for k in AUTO}


def launch_pre_projection(qkv: Tensor, H: int, W: int, weights: Sequence[Tensor], scale: float, ln_eps: float, *,
                          out: Optional[Tensor] = None, emulate: bool = False,
                          tile: Tuple[int, int] = (0, 0), tiles_per_cta: int = 0, config: Optional[dict] = None,
                          smem_limit: Optional[int] = None, seed: int = 0) -> Tensor:
    """pre (B, N, C) from qkv (B, N, 3C) and the folded weights (`folding.WEIGHT_NAMES` order).

    emulate=True runs the very same kernel code on the CPU (CPU tensors; slow): the way the
    device code is tested without a GPU (`seed` picks its scrambled thread orders). `out`
    (optional, contiguous) receives the result. Launch choices: `config` (a ``cuda.tiles``
    candidate, see `tile_candidates`), or `tile` = (tile_h, tile_w) and `tiles_per_cta`,
    else the tuned / automatic choice (`resolve_config`). `smem_limit`: bytes of shared memory
    per block to plan for (default: the device's opt-in maximum; emulated: sm_90's).
    """
    want = "cpu" if emulate else "cuda"
    if isinstance(qkv, Tensor) and qkv.device.type != want:
        raise TypeError(f"qkv is on {qkv.device}, expected a {want} tensor")
    B, N, C, folded = check_pre_projection_args(qkv, H, W, weights, scale, ln_eps)
    mod = module()
    qkv = _aligned(qkv)
    ws = [_aligned(t) for t in folded]
    if out is None:
        out = torch.empty((B, N, C), dtype=qkv.dtype, device=qkv.device)
    elif (out.shape != (B, N, C) or out.dtype != qkv.dtype or out.device != qkv.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {qkv.dtype} tensor of shape {(B, N, C)} on {qkv.device}")
    capability = None if emulate else tuple(torch.cuda.get_device_capability(qkv.device))
    cfg = resolve_config(C, qkv.dtype, capability, tile, tiles_per_cta, config)
    if smem_limit is None:
        smem_limit = 0 if emulate else device_smem_limit(qkv.device)
    th, tw, tpc = cfg["tile_h"], cfg["tile_w"], cfg["tiles_per_cta"]
    code = DTYPE_CODES[qkv.dtype]
    nbytes = mod.workspace_size(B, int(H), int(W), C, code, th, tw, tpc, int(smem_limit))
    workspace = _workspace(nbytes, qkv.device)
    ptrs = [t.data_ptr() for t in ws]
    if emulate:
        mod.emulate_pre_projection(qkv.data_ptr(), out.data_ptr(), workspace.data_ptr(), nbytes, ptrs,
                                   B, int(H), int(W), C, code, float(scale), float(ln_eps), th, tw, tpc,
                                   int(smem_limit), int(seed))
    else:
        with torch.cuda.device(qkv.device):
            stream = torch.cuda.current_stream(qkv.device).cuda_stream
            mod.pre_projection(qkv.data_ptr(), out.data_ptr(), workspace.data_ptr(), nbytes, ptrs,
                               B, int(H), int(W), C, code, float(scale), float(ln_eps), stream, th, tw, tpc,
                               int(smem_limit))
    return out
