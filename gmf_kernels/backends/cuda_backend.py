"""Backend "cuda": the hand-written CUDA kernels of csrc/ (eval mode, forward only).

    qkv = F.linear(x, W_qkv, b_qkv)                         cuBLAS
    pre = torch.ops.gmf.cuda_pre_projection(qkv, H, W, folded weights..., scale, ln_eps)
        1. gma_aggregate_kernel   one pass over qkv per pixel tile: Q/V proxies to a
                                  workspace, per-tile online-softmax partials of K, the
                                  local branch straight into pre[..., C':]
        2. gma_combine_kernel     split-N combine -> scale * softmax(K)^T V per head
        3. gma_output_kernel      scale*Q*KV + Q * CRPE(V) into pre[..., :C']
    out = F.linear(pre, W_proj, b_proj)                      cuBLAS

The compiled module takes raw device pointers, sizes and the CUDA stream as integers
(no torch headers), so this file owns every check: device, dtypes, shapes, contiguity.
The op is a `torch.library.custom_op` with a fake implementation, so
`torch.compile(fullgraph=True)` traces through it. Importing this file needs neither a
GPU nor the compiled module; `availability_reasons()` says what is missing.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import cuda as _cuda
from ..folding import FoldedGMAWeights, folded_weights
from ..weights import GMAHyper, GMAWeights
from .base import Backend

Tensor = torch.Tensor

#: dtype codes of the compiled module (csrc/gma_layout.h)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: widest head the kernels take (csrc/gma_layout.h kMaxHeadDim): C <= 640
MAX_HEAD_DIM = 64
#: order of the weight pointers (csrc/gma_host.cpp kWeightNames); checked against the module
WEIGHT_NAMES = ("bn0_scale", "bn0_shift", "dw3", "dw5", "dw7", "pw", "pw_bias", "local_dw",
                "local_pw", "ln_weight", "ln_bias", "crpe_w3", "crpe_w5", "crpe_w7", "crpe_b")


def flatten_folded(f: FoldedGMAWeights) -> List[Tensor]:
    """FoldedGMAWeights -> the 15 tensors in WEIGHT_NAMES order."""
    return [f.bn0_scale, f.bn0_shift, *f.dw, f.pw, f.pw_bias, f.local_dw, f.local_pw,
            f.ln_weight, f.ln_bias, *f.crpe_w, f.crpe_b]


def expected_weight_shapes(C: int) -> List[Tuple[int, ...]]:
    s = C // 5
    d = C // 10
    return [(s,), (s,), (s, 3, 3), (s, 5, 5), (s, 7, 7), (3, s, s), (3, s), (3 * s, 3, 3), (s, 3 * s),
            (s,), (s,), (2 * d, 3, 3), (3 * d, 5, 5), (3 * d, 7, 7), (8 * d,)]


def _module():
    mod = _cuda.load()
    names = tuple(mod.weight_names())
    if names != WEIGHT_NAMES:  # pragma: no cover - guards a csrc/Python mismatch
        raise ImportError(f"CUDA module weight order {names} != {WEIGHT_NAMES}; rebuild with "
                          f"`{_cuda.BUILD_COMMAND}`")
    return mod


def _aligned(t: Tensor, align: int = 16) -> Tensor:
    t = t.contiguous()
    if t.data_ptr() % align != 0:
        t = t.clone()  # a fresh allocation is aligned
    return t


def check_inputs(qkv: Tensor, H: int, W: int, weights: Sequence[Tensor], scale: float, ln_eps: float,
                 device_type: str) -> Tuple[int, int, int, List[Tensor]]:
    """Validate the op's arguments; return (B, C, dtype code, contiguous weights).

    Raises TypeError for a wrong type/dtype/device and ValueError for wrong shapes/values.
    """
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a Tensor, got {type(qkv).__name__}")
    if qkv.device.type != device_type:
        raise TypeError(f"qkv is on {qkv.device}, expected a {device_type} tensor")
    if qkv.dtype not in DTYPE_CODES:
        raise TypeError(f"qkv has dtype {qkv.dtype}; the CUDA kernels take float32, float16 or bfloat16")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, N, 3C), got shape {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    if int(H) < 1 or int(W) < 1 or N != int(H) * int(W):
        raise ValueError(f"qkv has N={N} tokens, but (H, W)=({H}, {W})")
    if B < 1:
        raise ValueError("qkv has an empty batch")
    if C3 % 3 != 0 or (C3 // 3) % 10 != 0:
        raise ValueError(f"qkv has {C3} channels: expected 3C with C a multiple of 10")
    C = C3 // 3
    if len(weights) != len(WEIGHT_NAMES):
        raise ValueError(f"expected {len(WEIGHT_NAMES)} folded weight tensors, got {len(weights)}")
    out_w = []
    for name, t, shape in zip(WEIGHT_NAMES, weights, expected_weight_shapes(C)):
        if not isinstance(t, Tensor):
            raise TypeError(f"weight {name} must be a Tensor")
        if t.dtype != torch.float32:
            raise TypeError(f"weight {name} has dtype {t.dtype}; folded weights must be float32 "
                            f"(gmf_kernels.folding.folded_weights)")
        if t.device != qkv.device:
            raise TypeError(f"weight {name} is on {t.device}, qkv on {qkv.device}")
        if tuple(t.shape) != shape:
            raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {shape} for C={C}")
        out_w.append(_aligned(t))
    if not (isinstance(scale, (int, float)) and float(scale) == float(scale) and abs(float(scale)) < float("inf")):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not (float(ln_eps) > 0 and float(ln_eps) < float("inf")):
        raise ValueError(f"ln_eps must be finite and > 0, got {ln_eps!r}")
    return B, C, DTYPE_CODES[qkv.dtype], out_w


def launch(qkv: Tensor, H: int, W: int, weights: Sequence[Tensor], scale: float, ln_eps: float, *,
           out: Optional[Tensor] = None, emulate: bool = False, tile: Tuple[int, int] = (0, 0)) -> Tensor:
    """Run the kernels: pre_proj (B, N, C) from qkv (B, N, 3C) and the 15 folded weights.

    emulate=True runs the very same kernel code on the CPU (CPU tensors; slow) — the way
    the device code is tested without a GPU. `out` (optional, contiguous) receives the
    result; `tile` = (tile_h, tile_w) overrides the automatic tile.
    """
    B, C, code, ws = check_inputs(qkv, H, W, weights, scale, ln_eps, "cpu" if emulate else "cuda")
    mod = _module()
    qkv = _aligned(qkv)
    N = int(H) * int(W)
    if out is None:
        out = torch.empty((B, N, C), dtype=qkv.dtype, device=qkv.device)
    elif (out.shape != (B, N, C) or out.dtype != qkv.dtype or out.device != qkv.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {qkv.dtype} tensor of shape {(B, N, C)} on {qkv.device}")
    th, tw = (int(v) for v in tile)
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


@torch.library.custom_op("gmf::cuda_pre_projection", mutates_args=())
def cuda_pre_projection(qkv: Tensor, H: int, W: int, bn0_scale: Tensor, bn0_shift: Tensor, dw3: Tensor,
                        dw5: Tensor, dw7: Tensor, pw: Tensor, pw_bias: Tensor, local_dw: Tensor,
                        local_pw: Tensor, ln_weight: Tensor, ln_bias: Tensor, crpe_w3: Tensor,
                        crpe_w5: Tensor, crpe_w7: Tensor, crpe_b: Tensor, scale: float,
                        ln_eps: float) -> Tensor:
    """qkv (B, N, 3C) -> pre-projection (B, N, C) with the CUDA kernels (eval, BN folded)."""
    weights = [bn0_scale, bn0_shift, dw3, dw5, dw7, pw, pw_bias, local_dw, local_pw, ln_weight, ln_bias,
               crpe_w3, crpe_w5, crpe_w7, crpe_b]
    return launch(qkv, H, W, weights, scale, ln_eps)


@cuda_pre_projection.register_fake
def _(qkv, H, W, bn0_scale, bn0_shift, dw3, dw5, dw7, pw, pw_bias, local_dw, local_pw, ln_weight, ln_bias,
      crpe_w3, crpe_w5, crpe_w7, crpe_b, scale, ln_eps):
    torch._check(qkv.dim() == 3, lambda: f"qkv must be (B, N, 3C), got {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    torch._check(C3 % 30 == 0, lambda: f"qkv has {C3} channels: expected 3C with C a multiple of 10")
    return qkv.new_empty((B, N, C3 // 3))


class CudaBackend(Backend):
    """Eval-mode, forward-only CUDA kernels (BatchNorm folded)."""

    def availability_reasons(self) -> List[str]:
        reasons = []
        if torch.version.cuda is None:
            reasons.append("torch is built without CUDA (torch.version.cuda is None)")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device available (torch.cuda.is_available() is False)")
        try:
            _module()
        except ImportError as e:
            reasons.append(f"CUDA extension not available: {e}")
        return reasons

    def not_supported_reasons(self, p) -> List[str]:
        reasons = super().not_supported_reasons(p)
        if p.head_dim > MAX_HEAD_DIM:
            reasons.append(f"head width d={p.head_dim} > {MAX_HEAD_DIM} (C > {10 * MAX_HEAD_DIM}) not supported")
        return reasons

    def forward(self, x: Tensor, size, w: GMAWeights, hp: GMAHyper, training: bool) -> Tensor:
        if training:
            raise ValueError("the cuda backend runs eval mode only (BatchNorm folded)")
        H, W = size
        qkv = F.linear(x, w.qkv_weight, w.qkv_bias)
        f = folded_weights(w, hp, x.dtype)
        pre = cuda_pre_projection(qkv, int(H), int(W), *flatten_folded(f), float(hp.scale), float(f.ln_eps))
        return F.linear(pre, w.proj_weight, w.proj_bias)


BACKEND = CudaBackend(
    name="cuda",
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    device_types=frozenset({"cuda"}),
    supports_training=False,
    supports_grad=False,
    head_dims=None,  # d = C/10 <= 64: 4..48 specialised at compile time, others by generic code
    verified_on_gpu=False,  # no GPU has run it yet: see README "Verification status"
)
