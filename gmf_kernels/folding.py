"""Inference-time weights: BatchNorm folded into the aggregator, cached per layer.

`FoldedGMAWeights` is the contract between the modules and the fused kernels
(Triton, CUDA): everything the eval-mode computation qkv -> pre-projection needs,
in a compute dtype (float32, or float64 for float64 inputs), contiguous.

    seg 0:     y = hardswish(t * bn0_scale + bn0_shift)
    seg j=1-3: y = hardswish(pw[j-1] @ DW_j(t) + pw_bias[j-1])   (BN j folded into pw rows)
    local:     L = hardswish(LN(local_pw @ DW3(t_seg4 of q,k,v)))

Folding runs once per layer and is reused until a parameter or buffer changes
(keyed on each tensor's storage and version counter).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Tuple

import torch

from .weights import GMAHyper, GMAWeights

Tensor = torch.Tensor


class FoldedGMAWeights(NamedTuple):
    bn0_scale: Tensor            # (s)
    bn0_shift: Tensor            # (s)
    dw: Tuple[Tensor, ...]       # (s,3,3), (s,5,5), (s,7,7): depthwise of segments 1,2,3
    pw: Tensor                   # (3, s, s): [segment-1, out, in], BatchNorm scale folded in
    pw_bias: Tensor              # (3, s): BatchNorm shift
    local_dw: Tensor             # (3s, 3, 3): channels [q seg4 | k seg4 | v seg4]
    local_pw: Tensor             # (s, 3s)
    ln_weight: Tensor            # (s)
    ln_bias: Tensor              # (s)
    crpe_w: Tuple[Tensor, ...]   # (2d,3,3), (3d,5,5), (3d,7,7)
    crpe_b: Tensor               # (C') = cat of the three biases
    ln_eps: float


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels accumulate in float32; float64 inputs keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_affine(w: GMAWeights, i: int, hp: GMAHyper, dtype) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm i as y = x * a + b."""
    a = w.bn_weight[i].to(dtype) * torch.rsqrt(w.bn_running_var[i].to(dtype) + hp.bn_eps)
    b = w.bn_bias[i].to(dtype) - w.bn_running_mean[i].to(dtype) * a
    return a, b


def fold_eval(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype = torch.float32) -> FoldedGMAWeights:
    """Fold the eval-mode BatchNorms into the aggregator and flatten kernels (no caching)."""
    with torch.no_grad():
        c = lambda t: t.detach().to(dtype).contiguous()
        a0, b0 = bn_affine(w, 0, hp, dtype)
        pws, pbs = [], []
        for j in (1, 2, 3):
            a, b = bn_affine(w, j, hp, dtype)
            pws.append(a[:, None] * w.pw_weight[j - 1].to(dtype).flatten(1))
            pbs.append(b)
        return FoldedGMAWeights(
            bn0_scale=c(a0), bn0_shift=c(b0),
            dw=tuple(c(t[:, 0]) for t in w.dw_weight),
            pw=c(torch.stack(pws)), pw_bias=c(torch.stack(pbs)),
            local_dw=c(w.local_dw_weight[:, 0]), local_pw=c(w.local_pw_weight.flatten(1)),
            ln_weight=c(w.local_ln_weight), ln_bias=c(w.local_ln_bias),
            crpe_w=tuple(c(t[:, 0]) for t in w.crpe_weight),
            crpe_b=c(torch.cat(list(w.crpe_bias))),
            ln_eps=float(hp.ln_eps),
        )


# ---------------------------------------------------------------- caching
_CACHE_ATTR = "_gmf_derived_cache"  # lives on the layer's qkv weight: dies with the layer


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def cached_derived(w: GMAWeights, tag: object, build: Callable[[], object]):
    """Return build() for these weights, recomputed only when a tensor of w changes.

    The key is every tensor's storage pointer and version counter (in-place updates
    such as optimizer steps and load_state_dict bump the version). Under
    torch.compile nothing is cached: the compiled graph owns its constants.
    """
    if _is_compiling():
        return build()
    tensors = list(w.tensors())
    stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    per_layer = getattr(w.qkv_weight, _CACHE_ATTR, None)
    if per_layer is None:
        per_layer = {}
        setattr(w.qkv_weight, _CACHE_ATTR, per_layer)
    hit = per_layer.get(tag)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = build()
    per_layer[tag] = (stamp, value)
    return value


def folded_weights(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype) -> FoldedGMAWeights:
    """Cached `fold_eval` in the compute dtype for inputs of `dtype`."""
    cd = compute_dtype(dtype)
    return cached_derived(w, ("folded", cd, hp), lambda: fold_eval(w, hp, cd))
