"""Functional API: `group_mix_attention(x, size, weights, ..., backend=None)`.

Validates the inputs, describes the call as a `GMAProblem`, lets dispatch pick (or
check) a backend, runs it, and optionally checks the result against the reference.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ._validation import check_dim, check_same_device_dtype, check_tokens
from .backends import GMAProblem, select_backend
from .weights import GMAHyper, GMAWeights, collapse4, default_scale

Tensor = torch.Tensor


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """autocast's dtype when autocast is on for x's device, else None."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError):  # older torch, or a device type autocast does not know
        pass
    return None


def _capability(x: Tensor):
    """(major, minor) of x's CUDA device, None elsewhere (cached by torch)."""
    if not x.is_cuda:
        return None
    try:
        return tuple(torch.cuda.get_device_capability(x.device))
    except (RuntimeError, AssertionError):  # pragma: no cover - no driver
        return None


def make_problem(x: Tensor, size: Sequence[int], w: GMAWeights, hp: GMAHyper, training) -> GMAProblem:
    """Validate and describe one call (`training`: a bool, or one per aggregator BatchNorm)."""
    check_dim(w.dim, hp.num_heads)
    B, N, H, W = check_tokens(x, size, w.dim)
    autocast = _autocast_dtype(x)
    params = list(w.tensors())
    # under autocast the parameters keep their own dtype and the ops cast
    check_same_device_dtype(x, params, check_dtype=autocast is None)
    dtype = autocast if autocast is not None and x.dtype in (torch.float32, autocast) else x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
    uniform = not any(isinstance(v, tuple) for v in (training, hp.bn_eps, hp.bn_momentum))
    return GMAProblem(B=B, H=H, W=W, dim=w.dim, num_heads=hp.num_heads, dtype=dtype,
                      device_type=x.device.type, device_index=x.device.index if x.is_cuda else None,
                      device_capability=_capability(x), training=bool(any(training) if isinstance(training, tuple) else training),
                      needs_grad=needs_grad, uniform_bn=uniform)


def group_mix_attention(
    x: Tensor,
    size: Sequence[int],
    weights: GMAWeights,
    *,
    num_heads: int = 8,
    scale: Optional[float] = None,
    training: bool = False,
    bn_eps: float = 1e-5,
    bn_momentum: Optional[float] = 0.1,
    ln_eps: float = 1e-5,
    backend: Optional[str] = None,
    check: Optional[bool] = None,
) -> Tensor:
    """Group-Mix Attention (GMA_SPEC.md §1) on tokens x (B, N, C) of an (H, W) grid.

    Args:
        x: (B, N, C) tokens, N = H*W, row-major; C a multiple of 10.
        size: (H, W).
        weights: the layer's tensors (`GMAWeights`; `GroupMixAttention.gma_weights()`).
        scale: multiplier of the factorized attention; default (C // num_heads) ** -0.5.
        training: BatchNorm batch statistics over q, k, v together (updates running stats);
            a 4-tuple gives each aggregator BatchNorm its own mode (reference backend only),
            as may bn_eps and bn_momentum.
        backend: "auto"/None (the fastest that can run this input), or one of
            "cuda", "triton", "torch", "reference". An explicit backend that cannot run
            the input raises ValueError with its reasons; none fitting raises
            NotImplementedError listing every backend's reasons.
        check: also run the reference and raise if the results disagree beyond the
            dtype's tolerance (default: environment variable GMF_CHECK=1).
    Returns:
        (B, N, C), the dtype of x (or autocast's).
    """
    hp = GMAHyper(num_heads=num_heads, scale=default_scale(weights.dim, num_heads) if scale is None else scale,
                  bn_eps=bn_eps, bn_momentum=bn_momentum, ln_eps=ln_eps)
    return run_attention(x, size, weights, hp, training, backend, check)


def run_attention(x: Tensor, size: Sequence[int], w: GMAWeights, hp: GMAHyper, training,
                  backend: Optional[str], check: Optional[bool] = None) -> Tensor:
    if isinstance(training, (tuple, list)):
        training = collapse4(training)
    hp = hp._replace(bn_eps=collapse4(hp.bn_eps) if isinstance(hp.bn_eps, (tuple, list)) else hp.bn_eps,
                     bn_momentum=(collapse4(hp.bn_momentum) if isinstance(hp.bn_momentum, (tuple, list))
                                  else hp.bn_momentum))
    problem = make_problem(x, size, w, hp, training)
    chosen = select_backend(problem, backend)
    if check is None:
        check = os.environ.get("GMF_CHECK", "0") == "1"
    if check and chosen.name != "reference":
        from .selfcheck import run_checked
        return run_checked(chosen, x, (problem.H, problem.W), w, hp, training)
    return chosen.forward(x, (problem.H, problem.W), w, hp, training)
