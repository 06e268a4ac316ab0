"""B3 of the training backward in the dense form (`aggregation_backward.BackwardTiles.DENSE`, a "triton.backward"
tuning candidate; dense_z.py "The backward"): segments 1-3's input gradient as the dense convolution turned half a
turn (`gma_dense_dx_kernel`) and both weight gradients from the per-tap products G_t = X_t^T dZ
(`gma_dense_wgrad_kernel`).

* The two kernels against float64 autograd through torch's depthwise convolution then the pointwise (not the
  identity the kernels use): fp32 within 1e-5 (3xTF32 dots, emulated as the GPU rounds them); fp16 / bf16: the
  input gradient no worse than 2x the error of the same backward computed by torch in that dtype, the weight
  gradients (exact 16-bit products summed in fp32) within 1e-5 of float64 on the same inputs; segments 0 and 4 of
  the qkv gradient never written; odd widths (s = 6, 12: padded channels), grids smaller than the 7x7 window,
  ragged tiles, batch 1 and 3, several splits of the weight gradient.
* A training step through the module (bf16, batch statistics) with the candidate picked as a tuning table would
  pick it: the dense kernels replace the pointwise backward and the depthwise stencils of B3, the forward keeps
  no y, and every output, running statistic and gradient equals the default tiles' to rounding; the same for
  eval mode with gradients (fp32, the recompute's Z); a backward that is not dense refuses a forward that kept
  no y.
* Compiled ahead of time wherever it is a candidate (`dense_b3_applies`: fp16 / bf16 layers at S_PAD <= 64, i.e.
  GroupMixFormer-S's C = 80, 160 and 320; sm_80 and sm_90): no spill, the products on tensor cores.
"""
from __future__ import annotations

import dataclasses
import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gmf_kernels.triton_kernels import aggregation_backward as agb, config, dense_z  # noqa: E402
from gmf_kernels.triton_kernels._common import dot_variant  # noqa: E402
from helpers import random_dense_inputs, random_local_weights  # noqa: E402


def _backward(qkv, dz, H, W, dws, pw, dtype):
    """(d_qkv (B, N, 3C) with segments 1-3 filled, [g_dw3, g_dw5, g_dw7], g_pw) by autograd through torch's
    depthwise then pointwise of segments 1-3 of q, k and v, in `dtype`."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    x = qkv.to(dtype).view(B, H, W, 3, 5, s).permute(3, 0, 4, 5, 1, 2)[:, :, 1:4].clone().requires_grad_(True)
    dwv = [w.to(dtype).clone().requires_grad_(True) for w in dws]
    pwv = pw.to(dtype).clone().requires_grad_(True)
    z = []
    for j in range(3):
        u = x[:, :, j].reshape(3 * B, s, H, W)
        k = dwv[j].shape[0]
        y = F.conv2d(u, dwv[j].permute(2, 0, 1)[:, None], padding=k // 2, groups=s)
        z.append(torch.einsum("oi,bihw->bohw", pwv[j], y))
    (torch.cat(z, 1) * dz.to(dtype)).sum().backward()
    d_qkv = torch.zeros(3, B, 5, s, H, W, dtype=dtype)
    d_qkv[:, :, 1:4] = x.grad
    return d_qkv.permute(1, 4, 5, 0, 2, 3).reshape(B, N, C3), [w.grad for w in dwv], pwv.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


#: (C, H, W, B, dtype): s = 6 / 12 / 16 / 32 (padded to 16, 16, 16, 32), grids narrower than the 7x7 window, tiles
#: ragged at an image's end, at each dtype the kernels claim
CASES = [(30, 5, 4, 3, torch.float32), (80, 9, 11, 2, torch.float32), (60, 7, 9, 2, torch.bfloat16),
         (160, 6, 5, 2, torch.float16), (80, 3, 2, 1, torch.bfloat16)]


@pytest.mark.parametrize("C,H,W,B,dtype", CASES, ids=[f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}" for c, h, w, b, d in CASES])
def test_dense_backward_kernels_against_float64(C, H, W, B, dtype):
    g = torch.Generator().manual_seed(C * 31 + H * 7 + W + B)
    s = C // 5
    qkv, dws, pw = random_dense_inputs(C, H, W, B, dtype, g)
    dz = torch.randn(3 * B, 3 * s, H, W, generator=g).to(config.stage_dtype(dtype))     # dZ of segments 1-3
    # ... in the kernels' layout (B, N, 9s), here a view with a padded token stride (10 s)
    dz_cl = torch.full((B, H * W, 10 * s), float("nan"), dtype=dz.dtype)[..., :9 * s]
    dz_cl.copy_(dz.view(3, B, 3 * s, H * W).permute(1, 3, 0, 2).reshape(B, H * W, 9 * s))
    d_qkv = torch.full_like(qkv, float("nan"))
    grid, args, kwargs = dense_z.plan_dense_dx(dz_cl, d_qkv, H, W, *dws, pw, dot_variant(qkv))
    dense_z.gma_dense_dx_kernel[grid](*args, **kwargs)
    buf, (grid_w, args_w, kwargs_w) = dense_z.plan_dense_wgrad(qkv, dz_cl, H, W, *dws, pw, dot_variant(qkv))
    assert grid_w[0] == 3 and (grid_w[1] >= 2 or B * H * W <= 16), grid_w   # several splits where 2+ tiles
    dense_z.gma_dense_wgrad_kernel[grid_w](*args_w, **kwargs_w)
    g_dw, g_pw = dense_z.dense_weight_grads(buf, s)
    planes = d_qkv.view(B, H * W, 3, 5, s)
    assert planes[..., 0, :].isnan().all() and planes[..., 4, :].isnan().all(), "segments 0 and 4: not written"
    exact = _backward(qkv.double(), dz.double(), H, W, dws, pw, torch.float64)
    got_dx, exact_dx = planes[..., 1:4, :], exact[0].view(B, H * W, 3, 5, s)[..., 1:4, :]
    for k, (a, e) in enumerate(zip(g_dw + [g_pw], exact[1] + [exact[2]])):
        assert a.dtype == torch.float32 and a.shape == e.shape, (k, a.shape, e.shape)
        assert _rel(a, e) < 1e-5, (k, _rel(a, e))
    err = _rel(got_dx, exact_dx)
    if dtype == torch.float32:
        assert err < 1e-5, err
        return
    ref = _backward(qkv, dz, H, W, dws, pw, dtype)[0].view(B, H * W, 3, 5, s)[..., 1:4, :]
    ref_err = _rel(ref, exact_dx)
    print(f"{dtype}: input gradient {err:.2e} against torch's {ref_err:.2e} in that dtype")
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)


def _local_backward(qkv, dzl, H, W, local_dw, local_pw, dtype):
    """(d_qkv (B, N, 3C) with segment 4 filled, g_local_dw (3, 3, 3s), g_local_pw (s, 3s)) by autograd through
    torch's 3x3 depthwise over segment 4 of q, k, v stacked, then the 3s -> s pointwise, in `dtype`."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    x = qkv.to(dtype).view(B, H, W, 3, 5, s)[:, :, :, :, 4].clone().requires_grad_(True)    # (B, H, W, 3, s)
    dwv = local_dw.to(dtype).clone().requires_grad_(True)
    pwv = local_pw.to(dtype).clone().requires_grad_(True)
    u = x.reshape(B, H, W, 3 * s).permute(0, 3, 1, 2)
    y = F.conv2d(u, dwv.permute(2, 0, 1)[:, None], padding=1, groups=3 * s)
    (torch.einsum("oi,bihw->bohw", pwv, y) * dzl.to(dtype)).sum().backward()
    d_qkv = torch.zeros(B, H, W, 3, 5, s, dtype=dtype)
    d_qkv[:, :, :, :, 4] = x.grad
    return d_qkv.reshape(B, N, C3), dwv.grad, pwv.grad


@pytest.mark.parametrize("C,H,W,B,dtype", CASES, ids=[f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}" for c, h, w, b, d in CASES])
def test_dense_local_backward_kernels_against_float64(C, H, W, B, dtype):
    """The local branch's dense backward (`gma_dense_local_dx_kernel`, `gma_dense_local_wgrad_kernel`): from dZ_L
    (the LayerNorm's input gradient) and qkv's segment 4, the input gradient into segment 4 of d_qkv (segments
    0-3 not written) and both weight gradients, against float64 autograd; the same bars as the segments'."""
    g = torch.Generator().manual_seed(C * 37 + H * 5 + W + B)
    s = C // 5
    qkv, _, _ = random_dense_inputs(C, H, W, B, dtype, g)
    local_dw, local_pw = random_local_weights(C, g)
    dzl = torch.randn(B, s, H, W, generator=g).to(config.stage_dtype(dtype))
    dzl_cl = dzl.flatten(2).transpose(1, 2).contiguous()                                   # (B, N, s)
    d_qkv = torch.full_like(qkv, float("nan"))
    grid, args, kwargs = dense_z.plan_dense_local_dx(dzl_cl, d_qkv, H, W, local_dw, local_pw, dot_variant(qkv))
    assert grid == (-(-H * W // kwargs["BLOCK_P"]), 3, B)
    dense_z.gma_dense_local_dx_kernel[grid](*args, **kwargs)
    buf, (grid_w, args_w, kwargs_w) = dense_z.plan_dense_local_wgrad(qkv, dzl_cl, H, W, local_dw, local_pw,
                                                                     dot_variant(qkv))
    assert grid_w[0] == 3 and (grid_w[1] >= 2 or B * H * W <= 16), grid_w
    dense_z.gma_dense_local_wgrad_kernel[grid_w](*args_w, **kwargs_w)
    g_ldw, g_lpw = dense_z.dense_local_weight_grads(buf, s)
    planes = d_qkv.view(B, H * W, 3, 5, s)
    assert planes[..., :4, :].isnan().all(), "segments 0-3: not written"
    exact = _local_backward(qkv.double(), dzl.double(), H, W, local_dw, local_pw, torch.float64)
    for name, a, e in (("local_dw", g_ldw, exact[1]), ("local_pw", g_lpw, exact[2])):
        assert a.dtype == torch.float32 and a.shape == e.shape, (name, a.shape, e.shape)
        assert _rel(a, e) < 1e-5, (name, _rel(a, e))
    got_dx, exact_dx = planes[..., 4, :], exact[0].view(B, H * W, 3, 5, s)[..., 4, :]
    err = _rel(got_dx, exact_dx)
    if dtype == torch.float32:
        assert err < 1e-5, err
        return
    ref = _local_backward(qkv, dzl, H, W, local_dw, local_pw, dtype)[0].view(B, H * W, 3, 5, s)[..., 4, :]
    ref_err = _rel(ref, exact_dx)
    print(f"{dtype}: local input gradient {err:.2e} against torch's {ref_err:.2e} in that dtype")
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)


def test_dense_backward_refuses_bad_layouts():
    qkv = torch.randn(1, 12, 120)
    w = [torch.zeros(k, k, 8) for k in (3, 5, 7)] + [torch.zeros(3, 8, 8)]
    dz = torch.zeros(1, 12, 72)
    with pytest.raises(ValueError, match="d_qkv needs a unit channel stride"):
        dense_z.plan_dense_dx(dz, torch.zeros(1, 120, 12).transpose(1, 2), 3, 4, *w, dot_variant(qkv))
    with pytest.raises(ValueError, match=r"expected \(B, N, 9s\)"):
        dense_z.plan_dense_wgrad(qkv, dz[..., :64], 3, 4, *w, dot_variant(qkv))
    with pytest.raises(ValueError, match="dZ needs a unit channel stride"):
        dense_z.plan_dense_wgrad(qkv, torch.zeros(1, 72, 12).transpose(1, 2), 3, 4, *w, dot_variant(qkv))


_AOT_SCRIPT = r"""
import json
import torch
import triton
from gmf_kernels.folding import meta_weights
from gmf_kernels.triton_kernels import aggregation_backward as agb, config, dense_z as dz, launcher as L, \
    specializations as sp, statistics as st
from gmf_kernels.triton_kernels._common import DotVariant
DENSE = ("gma_dense_dx_kernel", "gma_dense_wgrad_kernel", "gma_dense_local_dx_kernel", "gma_dense_local_wgrad_kernel")
out, seen = [], set()
for arch in (80, 90):
    cap = config.capability_of_arch(arch)
    for C, g in ((80, 56), (160, 28), (320, 14)):
        for dt in ("bf16", "fp32"):
            prec = config.dot_precision(dt, cap)
            cands = [c for c in agb._search(C, prec) if len(c) > 7 and c[7]]
            assert bool(cands) == agb.dense_b3_applies(C, prec) == (dt == "bf16"), (C, dt, arch)
            for tile in cands:
                for spec in sp.backward_specializations_of_call(sp.Call(C, g, g, 128, dt), arch, True,
                                                                {agb.BACKWARD_FAMILY: tile}):
                    dz_out = spec.kernel == "gma_local_backward_kernel" and dict(spec.constexprs).get("DZ_OUT")
                    if (spec.kernel in DENSE or dz_out) and spec.key not in seen:
                        seen.add(spec.key)
                        rep = sp.compile_one(spec)
                        target, src, options = sp._source_and_options(spec)
                        ck = triton.compile(src, target=target, options=options.__dict__)   # a cache hit
                        rep.update(kernel=spec.kernel + (" DZ_OUT" if dz_out else ""), C=C, dt=dt,
                                   ptx_mma=ck.asm["ptx"].count("mma.sync"),
                                   ptx_wgmma=ck.asm["ptx"].count("wgmma.mma_async"))
                        out.append(rep)
            if cands:   # the training forward's statistics pass keeping Z without y (STORE_Z_MOMENTS)
                qkv = torch.empty(128, g * g, 3 * C, device="meta", dtype=config.torch_dtype(dt))
                w = meta_weights(C)
                sdots = DotVariant(config.dot_precision("fp32", cap), False)
                *_, (grid, args, kw) = st.plan_statistics(qkv, g, g, w.dw3, w.dw5, w.dw7, w.pw,
                                                          st.gpu_stats_tiles(C, sdots.precision), sdots,
                                                          st.STORE_Z_MOMENTS)
                rep = sp.compile_one(sp.specialize_launch(st.gma_statistics_kernel, arch, args, kw))
                rep.update(kernel="gma_statistics_kernel", C=C, dt=dt, ptx_mma=0, ptx_wgmma=0)
                out.append(rep)
                # ... which runs in the dense form where it applies (every width here), computing the local
                # branch's Z, and its aggregation reading it and keeping no w4 (LOCAL_Z, KEEP_W4 false)
                assert dz.dense_statistics_applies(C, dt, config.dot_precision(dt, cap))
                specs = sp.dense_training_specializations_of_call(sp.Call(C, g, g, 128, dt), arch)
                assert [x.kernel for x in specs] == ["gma_dense_statistics_kernel", "gma_aggregate_kernel",
                                                     "gma_combine_kernel", "gma_attention_kernel"], specs
                for spec in specs[:2]:
                    cx = dict(spec.constexprs)
                    if spec.kernel == "gma_aggregate_kernel":
                        assert cx["KEEP_W4"] is False and cx["LOCAL_Z"] is True and cx["KEEP"] is True, cx
                    rep = sp.compile_one(spec)
                    target, src, options = sp._source_and_options(spec)
                    ck = triton.compile(src, target=target, options=options.__dict__)   # a cache hit
                    rep.update(kernel=spec.kernel + (" LOCAL_Z" if spec.kernel == "gma_aggregate_kernel" else ""),
                               C=C, dt=dt, ptx_mma=ck.asm["ptx"].count("mma.sync"),
                               ptx_wgmma=ck.asm["ptx"].count("wgmma.mma_async"))
                    out.append(rep)
            else:
                assert sp.dense_training_specializations_of_call(sp.Call(C, g, g, 128, dt), arch) == []
print(json.dumps(out))
"""


def test_dense_backward_compiles_to_tensor_cores_without_spills(tmp_path):
    """The dense kernels (segments 1-3 and the local branch) at GroupMixFormer-S's widths where they are a candidate
    (`dense_b3_applies`: bf16 layers at C = 80, 160, 320; not fp32), batch 128, for sm_80 and sm_90: no spill, the
    products on tensor cores: mma.sync on sm_80; on sm_90 the input gradients' on wgmma, the weight gradients'
    [s, s] products on wgmma at s = 64 and on mma.sync below (s rows, under a warp group's 64). And what the
    candidate runs around them: the local branch's LayerNorm backward storing dZ_L (DZ_OUT), the training forward's
    statistics pass keeping Z without y (`statistics.STORE_Z_MOMENTS`, the fallback; and the dense one, with the local
    branch's Z) and its aggregation reading that and keeping no w4 (`dense_training_specializations_of_call`, as the
    GPU report's warm-up compiles them): no spill."""
    from helpers import aot_reports, assert_compiled_without_spills
    reps = aot_reports(_AOT_SCRIPT, tmp_path, timeout=1500)
    dense = ("gma_dense_dx_kernel", "gma_dense_wgrad_kernel", "gma_dense_local_dx_kernel", "gma_dense_local_wgrad_kernel",
             "gma_dense_statistics_kernel")
    assert {(r["arch"], r["C"], r["kernel"]) for r in reps} == {
        (a, C, k) for a in (80, 90) for C in (80, 160, 320)
        for k in dense + ("gma_local_backward_kernel DZ_OUT", "gma_statistics_kernel", "gma_aggregate_kernel LOCAL_Z")}
    for r in reps:
        print(f"sm_{r['arch']} C={r['C']} {r['kernel']}: {r['registers']} registers, {r['shared_dynamic']} B shared, "
              f"wgmma {r['ptx_wgmma']}, mma.sync {r['ptx_mma']}")
        assert_compiled_without_spills(r)
        if r["kernel"] not in dense:
            continue
        assert (r["ptx_mma"] > 0) if r["arch"] == 80 else (r["ptx_wgmma"] + r["ptx_mma"] > 0), r
        if r["arch"] == 90 and (r["kernel"].endswith(("dx_kernel", "statistics_kernel")) or r["C"] == 320):
            assert r["ptx_wgmma"] > 0, r


class _Launched(list):
    """Kernel names in launch order; ``kwargs`` the launches' keyword arguments and ``grids`` their grids, in the same
    order."""
    def __init__(self):
        super().__init__()
        self.kwargs = []
        self.grids = []

    def clear(self):
        super().clear()
        self.kwargs.clear()
        self.grids.clear()


def _record_launches(monkeypatch) -> _Launched:
    """The names of the kernels launched from now on (a spy in place of `_launch.wrap_triton`), in order."""
    from gmf_kernels.triton_kernels import _launch
    launched = _Launched()

    def spy(kernel):
        class Launch:
            def __getitem__(self, grid):
                def go(*a, **kw):
                    launched.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
                    launched.kwargs.append(kw)
                    launched.grids.append(tuple(grid))
                    return kernel[grid](*a, **kw)
                return go
        return Launch()
    monkeypatch.setattr(_launch, "wrap_triton", spy)
    return launched


def _pick_dense(monkeypatch, C: int, M: int) -> None:
    """"triton.backward" at the dense candidate from now on, where a tuning table's entry would put it
    (`tile_spaces.tuned_tiles`): the interpreter's tiles for width C and M pixels, DENSE 1."""
    from gmf_kernels.triton_kernels import tile_spaces
    dense = dataclasses.replace(agb.backward_tiles(config.dot_pad(C // 5), M), DENSE=1)
    tile = agb.tile_of(dense)
    assert dataclasses.replace(agb.tiles_of(tile), TARGET_PROGRAMS=dense.TARGET_PROGRAMS) == dense
    monkeypatch.setattr(tile_spaces, "tuned_tiles",
                        lambda family, C_, like: tile if family == agb.BACKWARD_FAMILY else None)


def test_training_step_with_the_dense_candidate(monkeypatch):
    """A training step of a bf16 `GroupMixAttention` (batch statistics) with "triton.backward" at the dense candidate
    (the interpreter's tiles, DENSE 1), as a tuning table would pick it: `gma_dense_dx_kernel` and
    `gma_dense_wgrad_kernel` run in place of the pointwise backward and B3's stencils, and the local branch's
    (`gma_dense_local_dx_kernel`, `gma_dense_local_wgrad_kernel` after `gma_local_backward_kernel` with DZ_OUT) in
    place of its pointwise and depthwise backward; the forward's statistics pass runs in the dense form too
    (`gma_dense_statistics_kernel`, keeping Z without the depthwise outputs y: the dense B3 reads none, and computing
    the local branch's Z, which the aggregation reads: LOCAL_Z) and its aggregation keeps no w4 (KEEP_W4 false); and
    the output, the running statistics and every gradient equal the
    default tiles' to bf16 rounding (the paths round different stage tensors to bf16, and the dense ones multiply
    bf16 operands where the stencil statistics pass runs fp32's dots)."""
    import copy

    import gmf_kernels
    from gmf_kernels.triton_kernels import statistics
    C, H, W, B = 40, 5, 6, 2
    torch.manual_seed(0)
    m = gmf_kernels.GroupMixAttention(C, 8, qkv_bias=True, backend="triton").train().to(torch.bfloat16)
    m_dense = copy.deepcopy(m)
    x = torch.randn(B, H * W, C).to(torch.bfloat16)
    stores = []
    z_moments = statistics.z_moments

    def spy_store(*a, **kw):
        stores.append(kw.get("store", False))
        return z_moments(*a, **kw)
    monkeypatch.setattr(statistics, "z_moments", spy_store)
    launched = _record_launches(monkeypatch)

    def step(mod):
        xx = x.clone().requires_grad_(True)
        out = mod(xx, (H, W))
        out.float().square().sum().backward()
        buffers = {n: b.clone() for n, b in mod.named_buffers()}
        return [out.detach(), xx.grad] + [p.grad for _, p in mod.named_parameters()] + list(buffers.values())
    ref = step(m)
    assert stores == [True] and "gma_pw_backward_kernel" in launched, (stores, sorted(set(launched)))
    _pick_dense(monkeypatch, C, 3 * B * H * W)
    stores.clear()
    launched.clear()
    got = step(m_dense)
    assert stores == [] and "gma_statistics_kernel" not in launched, stores     # the stencil pass did not run
    dense = ("gma_dense_statistics_kernel", "gma_dense_dx_kernel", "gma_dense_wgrad_kernel", "gma_dense_local_dx_kernel",
             "gma_dense_local_wgrad_kernel")
    assert all(launched.count(k) == 1 for k in dense), sorted(set(launched))
    assert "gma_pw_backward_kernel" not in launched and "gma_dw_backward_kernel" not in launched
    local = [kw for k, kw in zip(launched, launched.kwargs) if k == "gma_local_backward_kernel"]
    agg = [kw for k, kw in zip(launched, launched.kwargs) if k == "gma_aggregate_kernel"]
    assert [kw.get("DZ_OUT") for kw in local] == [True] and [kw.get("KEEP_W4") for kw in agg] == [False]
    # the statistics pass computed the local branch's Z too (grid (T, 5, B)), which the aggregation read (LOCAL_Z)
    assert [kw.get("LOCAL_Z") for kw in agg] == [True]
    assert launched.grids[launched.index("gma_dense_statistics_kernel")][1] == 5
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a is not None and a.shape == b.shape and a.dtype == b.dtype, k
        if a.is_floating_point():
            assert _rel(a, b) < 1e-2, (k, _rel(a, b))
        else:
            assert torch.equal(a, b), k


def test_eval_mode_gradients_with_the_dense_candidate(monkeypatch):
    """Eval mode with gradients (running statistics: the forward keeps no planes, the backward recomputes) with the
    dense candidate picked: the recompute makes Z as the dense backward's training statistics pass does (no y: not
    `gma_recompute_z_kernel`, V from Z by `gma_proxy_v_kernel`) and the local branch without w4; the input and
    weight gradients equal the default tiles' (fp32, to the dots' rounding)."""
    import copy

    import gmf_kernels
    from gmf_kernels.triton_kernels import recompute as rcp
    C, H, W, B = 40, 4, 5, 1
    torch.manual_seed(1)
    m = gmf_kernels.GroupMixAttention(C, 8, qkv_bias=True, backend="triton").eval()
    m_dense = copy.deepcopy(m)
    x = torch.randn(B, H * W, C)
    launched = _record_launches(monkeypatch)
    keep_w4, plan_local = [], rcp.plan_recompute_local

    def spy_local(*args, **kwargs):
        keep_w4.append(kwargs.get("keep_w4", True))
        return plan_local(*args, **kwargs)
    monkeypatch.setattr(rcp, "plan_recompute_local", spy_local)

    def grads(mod):
        xx = x.clone().requires_grad_(True)
        mod(xx, (H, W)).square().sum().backward()
        return [xx.grad] + [p.grad for _, p in mod.named_parameters()]
    ref = grads(m)
    assert "gma_recompute_z_kernel" in launched and keep_w4 == [True], sorted(set(launched))
    _pick_dense(monkeypatch, C, 3 * B * H * W)
    launched.clear()
    keep_w4.clear()
    got = grads(m_dense)
    assert "gma_dense_wgrad_kernel" in launched and "gma_pw_backward_kernel" not in launched, sorted(set(launched))
    assert "gma_recompute_z_kernel" not in launched and "gma_proxy_v_kernel" in launched, sorted(set(launched))
    assert keep_w4 == [False]
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a is not None and a.shape == b.shape, k
        assert _rel(a, b) < 1e-5 or (a - b).abs().max() < 1e-6, (k, _rel(a, b))


def test_b3_without_y_refuses_tiles_that_are_not_dense():
    """A forward that kept no y (a dense backward's) met by a backward whose tiles are not dense (the table changed
    in between): B3 says so instead of reading a missing plane."""
    from helpers import random_folded_weights
    C, H, W, B = 40, 3, 4, 1
    s = C // 5
    f = random_folded_weights(C, torch.float32)
    G = torch.zeros(3 * B, 4 * s, H, W)
    rc = {"Z": torch.zeros_like(G), "y": [], "qkv": torch.zeros(B, H * W, 3 * C)}
    with pytest.raises(RuntimeError, match="depthwise outputs y are missing"):
        agb.b3_fused(G, rc, f, None, None, torch.zeros(4 * s), None, 3 * B * H * W)


def test_local_backward_without_w4_refuses_tiles_that_are_not_dense():
    """A forward that kept no w4 (a dense backward's) met by a local-branch backward whose tiles are not dense: it
    says so instead of reading a missing plane; the dense form reads none."""
    from helpers import random_folded_weights
    C, H, W, B = 40, 3, 4, 1
    s = C // 5
    f = random_folded_weights(C, torch.float32)
    rc = {"w4": torch.empty(0), "xh4": torch.zeros(B, s, H, W), "rstd4": torch.ones(B, 1, H, W),
          "qkv": torch.zeros(B, H * W, 3 * C)}
    dL = torch.zeros(B, s, H, W)
    with pytest.raises(RuntimeError, match="depthwise output w4 is missing"):
        agb.local_backward(dL, rc, f)
    dense = dataclasses.replace(agb.backward_tiles(config.dot_pad(s), B * H * W), DENSE=1)
    du4, g_ldw, g_lpw, g_lnw, g_lnb = agb.local_backward(dL, rc, f, tiles=dense)
    assert du4.shape == (B, 3 * s, H, W) and not du4.any() and g_ldw.shape == (3, 3, 3 * s)
    assert g_lpw.shape == (s, 3 * s) and not g_lpw.any() and not g_lnw.any()
