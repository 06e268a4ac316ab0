"""Test helpers shared by the test suite, the self-check and the benchmarks.

* `random_gma_weights(dim)`: a GMAWeights with realistic random values (BN statistics
  away from the trivial 0/1, so folding is exercised).
* `assert_close_verbose`: allclose that reports the worst element, its index and the
  share of elements failing.
* `low_precision_tolerance`: flash-attention's rule: the error of a kernel at a low
  precision must stay within 2x the reference's own error at that precision + a floor.
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
    """max |a - e| / max |e| (in float64)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_close_verbose(actual: Tensor, expected: Tensor, *, rtol: float, atol: float = 0.0,
                         name: str = "tensor") -> None:
    """allclose with a report: worst element, its index, and the share failing."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        idx = torch.nonzero(torch.isnan(a))[0].tolist()
        raise AssertionError(f"{name}: {int(torch.isnan(a).sum())} NaN elements (first at {idx})")
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = diff > bound
    if bad.any():
        worst = int(torch.argmax(diff - bound))
        idx = list(torch.unravel_index(torch.tensor(worst), a.shape))
        idx = [int(i) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements ({100.0 * bad.float().mean():.3f}%) "
            f"outside atol={atol:g} + rtol={rtol:g}*|expected|; worst at {idx}: "
            f"got {a.flatten()[worst]:.8g}, expected {e.flatten()[worst]:.8g} "
            f"(|diff| {diff.flatten()[worst]:.3g}); max |diff| overall {diff.max():.3g}")


def assert_max_rel_close(actual: Tensor, expected: Tensor, tol: float, name: str = "tensor") -> None:
    """max |actual - expected| <= tol * max |expected| (shape and finiteness checked first),
    reported element-wise by `assert_close_verbose` on failure."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{name}: non-finite values")
    scale = expected.detach().abs().max().item()
    assert_close_verbose(actual, expected, rtol=0.0, atol=tol * max(scale, 1e-300), name=name)


def weights_from_state_dict(sd) -> GMAWeights:
    """Detached GMAWeights from an upstream `EfficientAtt` state_dict, through the module
    (`GroupMixAttention.gma_weights`, the one place that maps keys to roles)."""
    from .modules import GroupMixAttention
    w = sd["qkv.weight"]
    m = GroupMixAttention(w.shape[1], qkv_bias="qkv.bias" in sd).to(dtype=w.dtype, device=w.device)
    m.load_state_dict(sd, strict=True)
    return cast_weights(m.gma_weights())


def assert_within_reference_error(actual: Tensor, reference_lowp: Tensor, oracle: Tensor, *,
                                  factor: float = 2.0, floor: float = 1e-5, name: str = "tensor") -> None:
    """Low precision rule: err(actual) <= factor * err(reference at that precision) + floor,
    errors measured as max |x - oracle| / max |oracle| against a float64 oracle."""
    err = max_rel_error(actual, oracle)
    ref_err = max_rel_error(reference_lowp, oracle)
    if not err <= factor * ref_err + floor:
        raise AssertionError(f"{name}: relative error {err:.3e} > {factor} x reference error "
                             f"{ref_err:.3e} + {floor:g}")
