"""Cost model of the three CUDA kernels (csrc/), from the module's launch plan (one place for the formulas).

    from gmf_kernels.cuda.costs import cost
    c = cost("gma_aggregate_kernel", B=128, H=56, W=56, C=80, dtype="bf16")   # -> Cost
    c = cost(..., plan=mod.plan(B, H, W, C, code, th, tw, tpc, smem_limit))    # an explicit plan

The launch plan is the compiled module's own planner (``plan()`` in csrc/gma_host.cpp, bound
as ``_gmf_cuda.plan``): tile, CTAs, threads and shared memory of each launch. When no plan is
given the module is loaded and asked (``config``: a "cuda.tiles" candidate, default the
planner's automatic choice; ``smem_limit``: bytes per block, default sm_90's opt-in). Without
a loadable module (not built, or stale) the cost has no grid and no split-N partial traffic
(``Cost.detail["plan"] == 0`` and ``notes`` says so): everything else does not depend on the plan.

Counting (as `gmf_kernels.triton_kernels.costs`, whose `Cost` this returns):

* bytes: compulsory: qkv read once, Q/V planes written once by the aggregation and read once
  by the attention (I/O dtype), pre written once, the per-tile split-N partials
  (B x tiles x 8 heads x (2d + d^2) fp32, csrc/gma_layout.h partial_stride) written and read
  once, kv (B x 8 x d x d fp32) written and read once, the folded fp32 weights once. Halos
  come from L1/L2 and are not counted.
* tc_flops: 2 x useful multiply-adds of the products the kernels run with ``mma`` (gma_mma.cuh):
  the s x s pointwise of segments 1-3 of q, k, v, the 3s -> s local pointwise, exp(K)^T V,
  Q KV. On sm_80+: fp16 / bf16 operands as stored ("fp16"/"bf16" tensor cores), fp32 as
  3xTF32 ("tf32x3"). Below sm_80 only fp16 keeps WMMA; bf16 and fp32 products run as fp32
  FMAs and count as cuda_flops.
* cuda_flops: 2 x the depthwise stencil multiply-adds (proxies, local branch, CRPE) and the
  combine's rescaling (2 per partial accumulator element). Element-wise work not counted.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..triton_kernels.costs import CRPE_TAPS_PER_D, ELEM_BYTES, PROXY_TAPS, Cost, _norm_dtype, _weights_bytes

KERNELS = ("gma_aggregate_kernel", "gma_combine_kernel", "gma_attention_kernel")
#: csrc/gma_layout.h DTypeCode
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
HEADS = 8


def partial_stride(d: int) -> int:
    """fp32 values of one head's split-N partial: m, l (d each) and the d x d sum (gma_layout.h)."""
    return 2 * d + d * d


def module_plan(B: int, H: int, W: int, C: int, dtype, config: Optional[dict] = None, smem_limit: int = 0):
    """The module's plan dict for this call, or (None, reason) when the module cannot be loaded.
    Returns (plan, "")."""
    try:
        from . import load
        mod = load()
    except Exception as ex:  # ImportError when not built / stale; anything else reported the same way
        first = str(ex).splitlines()[0] if str(ex).strip() else ""
        first = first if len(first) <= 160 else first[:157] + "..."
        return None, (f"CUDA module not loadable ({type(ex).__name__}: {first}): without its launch plan the "
                      f"split-N partials are not counted (bytes and bounds are lower bounds: '>=')")
    cfg = dict(config or {})
    p = mod.plan(B, H, W, C, DTYPE_CODES[_norm_dtype(dtype)], int(cfg.get("tile_h", 0)), int(cfg.get("tile_w", 0)),
                 int(cfg.get("tiles_per_cta", 0)), int(smem_limit))
    return p, ""


def tc_precision(dtype: str, capability: Tuple[int, int]) -> str:
    """How the kernels' mma run for this I/O dtype on this GPU ("-": on CUDA cores)."""
    if tuple(capability) >= (8, 0):
        return {"fp32": "tf32x3", "fp16": "fp16", "bf16": "bf16"}[dtype]
    return "fp16" if dtype == "fp16" else "-"


def cost(kernel: str, B: int, H: int, W: int, C: int, dtype, capability: Tuple[int, int] = (9, 0),
         plan: Optional[dict] = None, config: Optional[dict] = None, smem_limit: int = 0) -> Cost:
    """Cost of one launch of `kernel` (KERNELS; "gma_"/"_kernel" optional) for qkv (B, H*W, 3C) in
    `dtype` on a GPU of `capability`, with `plan` (the module's plan dict) or the module's plan
    for `config` / `smem_limit` (module docstring)."""
    name = kernel if kernel.startswith("gma_") else f"gma_{kernel}_kernel"
    if name not in KERNELS:
        raise ValueError(f"unknown CUDA kernel {kernel!r}; expected one of {KERNELS}")
    dt = _norm_dtype(dtype)
    if C % 10 or C <= 0:
        raise ValueError(f"C={C} must be a positive multiple of 10")
    notes = ""
    if plan is None:
        plan, notes = module_plan(B, H, W, C, dt, config, smem_limit)
    N = H * W
    e = ELEM_BYTES[dt]
    s, d = C // 5, C // 10
    cp = 4 * s
    prec = tc_precision(dt, capability)
    ntiles = int(plan["ntiles"]) if plan else None
    partials = B * ntiles * HEADS * partial_stride(d) * 4 if plan else 0
    wb = _weights_bytes(C)
    if name == "gma_aggregate_kernel":
        weights = sum(wb[k] for k in ("bn_scale", "bn_shift", "dw3", "dw5", "dw7", "pw", "local_dw", "local_pw",
                                      "ln_weight", "ln_bias"))
        detail = {"qkv_read": B * N * 3 * C * e, "qv_write": 2 * B * N * cp * e, "pre_write": B * N * s * e,
                  "partials_write": partials, "weights": weights}
        mma = 2 * B * N * (9 * s * s + 3 * s * s + cp * d)
        stencil = 2 * B * N * (3 * PROXY_TAPS * s + 27 * s)
        launch = plan["aggregate"] if plan else None
    elif name == "gma_combine_kernel":
        detail = {"partials_read": partials, "kv_write": B * HEADS * d * d * 4}
        mma, stencil = 0, (2 * 2 * B * ntiles * HEADS * d * d if plan else 0)
        launch = plan["combine"] if plan else None
    else:
        weights = sum(wb[k] for k in ("crpe_w3", "crpe_w5", "crpe_w7", "crpe_b"))
        detail = {"qv_read": 2 * B * N * cp * e, "kv_read": B * HEADS * d * d * 4, "pre_write": B * N * cp * e,
                  "weights": weights}
        mma = 2 * B * N * cp * d
        stencil = 2 * B * N * CRPE_TAPS_PER_D * d
        launch = plan["attention"] if plan else None
    nbytes = sum(detail.values())
    detail["plan"] = 1 if plan else 0
    if plan:
        detail["tile_h"], detail["tile_w"] = (int(x) for x in plan["tile"])
        detail["ntiles"] = ntiles
        detail["tiles_per_cta"] = int(plan["tiles_per_cta"])
    tc, cuda = (mma, stencil) if prec != "-" else (0, stencil + mma)
    c = Cost(bytes=nbytes, tc_flops=tc, cuda_flops=cuda,
             grid=(int(launch["grid"]),) if launch else None, tc_precision=prec if tc else "-",
             block=int(launch["block"]) if launch else None, shared=int(launch["smem"]) if launch else None,
             detail=detail)
    if notes:
        object.__setattr__(c, "detail", {**c.detail, "notes": notes})
    return c
