"""Numerics used at run time: the self-check, the benchmarks and the tests all use them.

* `TOLERANCE`: the allowed max relative error of a backend against the reference, per dtype
  (`GroupMixAttention(check=True)`, `python -m gmf_kernels.selfcheck`).
* `max_rel_error(a, e)`: max |a - e| / max |e| in float64 (the error measure everywhere).
* `cast_weights(w, dtype, device)`: an independent copy of a layer's tensors.
* `random_gma_weights(dim)`, `default_hyper(dim)`: a layer with realistic random values
  (BatchNorm statistics away from the trivial 0/1, so folding is exercised).

Test-only assertions live in tests/helpers.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .weights import GMAHyper, GMAWeights, default_scale, widths

Tensor = torch.Tensor


def random_gma_weights(dim: int, *, dtype=torch.float64, device="cpu", seed: Optional[int] = None,
                       qkv_bias: bool = True, requires_grad: bool = False) -> GMAWeights:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    s, cp, d = widths(dim)

    def r(*shape, scale=1.0, offset=0.0, positive=False):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
        if positive:
            t = t.abs() + 0.5
        t = t.to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    def buf(*shape, positive=False, scale=0.3):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        if positive:
            t = t.abs() + 0.5
        return t.to(dtype=dtype, device=device)

    fan = lambda n: n ** -0.5
    return GMAWeights(
        qkv_weight=r(3 * dim, dim, scale=fan(dim)),
        qkv_bias=r(3 * dim, scale=0.1) if qkv_bias else None,
        proj_weight=r(dim, dim, scale=fan(dim)),
        proj_bias=r(dim, scale=0.1),
        bn_weight=tuple(r(s, scale=0.2, offset=1.0) for _ in range(4)),
        bn_bias=tuple(r(s, scale=0.2) for _ in range(4)),
        bn_running_mean=tuple(buf(s) for _ in range(4)),
        bn_running_var=tuple(buf(s, positive=True) for _ in range(4)),
        bn_num_batches_tracked=tuple(torch.zeros((), dtype=torch.long, device=device) for _ in range(4)),
        dw_weight=tuple(r(s, 1, k, k, scale=1.0 / k) for k in (3, 5, 7)),
        pw_weight=tuple(r(s, s, 1, 1, scale=fan(s)) for _ in range(3)),
        local_dw_weight=r(3 * s, 1, 3, 3, scale=1.0 / 3),
        local_pw_weight=r(s, 3 * s, 1, 1, scale=fan(3 * s)),
        local_ln_weight=r(s, scale=0.2, offset=1.0),
        local_ln_bias=r(s, scale=0.2),
        crpe_weight=tuple(r(n * d, 1, k, k, scale=1.0 / k) for k, n in ((3, 2), (5, 3), (7, 3))),
        crpe_bias=tuple(r(n * d, scale=0.1) for n in (2, 3, 3)),
    )


def cast_weights(w: GMAWeights, dtype=None, device=None) -> GMAWeights:
    """A copy of w with floating tensors cast (buffers copied, so in-place updates stay local)."""
    def cv(t):
        if t is None:
            return None
        if t.is_floating_point():
            return t.detach().to(dtype=dtype or t.dtype, device=device or t.device).clone()
        return t.detach().to(device=device or t.device).clone()
    return GMAWeights(*[tuple(cv(t) for t in f) if isinstance(f, tuple) else cv(f) for f in w])


def default_hyper(dim: int) -> GMAHyper:
    return GMAHyper(num_heads=8, scale=default_scale(dim, 8))


def max_rel_error(actual: Tensor, expected: Tensor) -> float:
    """max |a - e| / max |e| in float64; NaN when either holds a NaN or an infinity."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all())):
        return float("nan")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def norm_rel_error(actual: Tensor, expected: Tensor) -> float:
    """||a - e||_2 / ||e||_2 in float64, on expected's device; NaN when actual holds a NaN or an infinity."""
    a = actual.detach().to(dtype=torch.float64, device=expected.device)
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return ((a - expected).norm() / expected.norm().clamp_min(1e-300)).item()


#: max |out - ref| / max |ref| a backend may show against the reference run at float32
#: (float64 for float64 inputs): `GroupMixAttention(check=True)` and the self-check.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
