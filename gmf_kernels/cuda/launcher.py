"""Launcher of the CUDA pre-projection: workspace, stream, device guard, call into the module.

    pre = launch_pre_projection(qkv, H, W, weights, scale, ln_eps)             # on the GPU
    pre = launch_pre_projection(..., emulate=True)                             # same kernel code on the CPU

The compiled module (csrc/, `gmf_kernels.cuda.load()`) takes raw addresses, sizes, a dtype
code and the CUDA stream as integers (no torch headers), so the checks live in Python
(`gmf_kernels.op_args`) and in the module's host planner (csrc/gma_host.cpp), both before
any CUDA call.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..folding import WEIGHT_NAMES
from ..op_args import check_pre_projection_args
from . import BUILD_COMMAND, load

Tensor = torch.Tensor

#: dtype codes of the compiled module (csrc/gma_layout.h DTypeCode)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: widest head the kernels take (csrc/gma_layout.h kMaxHeadDim): C <= 640
MAX_HEAD_DIM = 64


def module():
    """The compiled module, checked to take the folded weights in `folding.WEIGHT_NAMES` order."""
    mod = load()
    names = tuple(mod.weight_names())
    if names != WEIGHT_NAMES:  # pragma: no cover - guards a csrc/Python mismatch
        raise ImportError(f"CUDA module weight order {names} != {WEIGHT_NAMES}; rebuild with `{BUILD_COMMAND}`")
    return mod


def _aligned(t: Tensor, align: int = 16) -> Tensor:
    t = t.contiguous()
    if t.data_ptr() % align != 0:
        t = t.clone()  # a fresh allocation is aligned
    return t


def launch_pre_projection(qkv: Tensor, H: int, W: int, weights: Sequence[Tensor], scale: float, ln_eps: float, *,
                          out: Optional[Tensor] = None, emulate: bool = False,
                          tile: Tuple[int, int] = (0, 0)) -> Tensor:
    """pre (B, N, C) from qkv (B, N, 3C) and the folded weights (`folding.WEIGHT_NAMES` order).

    emulate=True runs the very same kernel code on the CPU (CPU tensors; slow): the way the
    device code is tested without a GPU. `out` (optional, contiguous) receives the result;
    `tile` = (tile_h, tile_w) overrides the automatic tile.
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
    th, tw = (int(v) for v in tile)
    code = DTYPE_CODES[qkv.dtype]
    nbytes = mod.workspace_size(B, int(H), int(W), C, code, th, tw)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=qkv.device)
    ptrs = [t.data_ptr() for t in ws]
    if emulate:
        mod.emulate_pre_projection(qkv.data_ptr(), out.data_ptr(), workspace.data_ptr(), nbytes, ptrs,
                                   B, int(H), int(W), C, code, float(scale), float(ln_eps), th, tw)
    else:
        with torch.cuda.device(qkv.device):
            stream = torch.cuda.current_stream(qkv.device).cuda_stream
            mod.pre_projection(qkv.data_ptr(), out.data_ptr(), workspace.data_ptr(), nbytes, ptrs,
                               B, int(H), int(W), C, code, float(scale), float(ln_eps), stream, th, tw)
    return out
