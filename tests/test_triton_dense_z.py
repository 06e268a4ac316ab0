"""The split forward's Z pass as dense convolutions on tensor cores (`triton_kernels/dense_z.py`, the
"triton.aggregate" candidate ZDENSE).

* Z of segments 1-3, q, k and v, and the local branch's Z before its LayerNorm (3s -> s), against a float64
  depthwise-then-pointwise computed with torch's own convolution (not the identity the kernel uses): fp32
  within 1e-5 (3xTF32 dots, emulated by the interpreter as the GPU rounds), fp16 / bf16 no worse than 2x the
  error of the same two steps computed by torch in that dtype; segment 0's planes of k and v never written (q's
  hold the local branch's Z); odd widths (s = 6, 12: padded channels), grids
  smaller than the 7x7 window, tiles ragged at the image's end, batch 1 and 3;
* compiled ahead of time where it is a candidate (`config.zdense_applies`, GroupMixFormer-S's widths, sm_80
  and sm_90): no spill, its dots on tensor cores (wgmma on sm_90, mma.sync on sm_80) and its tap loop
  software-pipelined (cp.async).
The whole split forward with it (every buffer, the 2x rule through the op): tests/test_triton_kernels.py
`test_split_forward` (its "-dense" cases) and `test_dense_z_pass_pipelined_tap_loop`; hazards:
tests/test_triton_hazards.py `test_dense_z_pass_free_of_hazards`; the tuner's timing: tests/test_tune.py.
"""
from __future__ import annotations

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gmf_kernels.triton_kernels import config, dense_z  # noqa: E402
from gmf_kernels.triton_kernels._common import dot_variant  # noqa: E402
from helpers import random_dense_inputs, random_local_weights  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _z_reference(qkv, H, W, dws, pw, local_dw, local_pw, dtype):
    """(Z (3, B, 3s, H, W) of segments 1-3, the local branch's Z (B, s, H, W) before its LayerNorm) by torch's
    depthwise convolution then the pointwise, in `dtype`."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    x = qkv.to(dtype).view(B, H, W, 3, 5, s)
    out = []
    for st in range(3):
        segs = []
        for j, w in enumerate(dws, start=1):
            img = x[:, :, :, st, j].permute(0, 3, 1, 2)
            k = w.shape[0]
            d = F.conv2d(img, w.to(dtype).permute(2, 0, 1)[:, None], padding=k // 2, groups=s)
            segs.append(torch.einsum("oi,bihw->bohw", pw[j - 1].to(dtype), d))
        out.append(torch.cat(segs, 1))
    img = x[:, :, :, :, 4].reshape(B, H, W, 3 * s).permute(0, 3, 1, 2)     # [q | k | v] segment 4
    d = F.conv2d(img, local_dw.to(dtype).permute(2, 0, 1)[:, None], padding=1, groups=3 * s)
    return torch.stack(out), torch.einsum("oi,bihw->bohw", local_pw.to(dtype), d)


def _rel(got, exact):
    got, exact = got.double(), exact.double()
    return ((got - exact).norm() / exact.norm()).item()


#: (C, H, W, B, dtype): s = 6 / 12 / 16 / 32 (padded to 16, 16, 16, 32), grids narrower than the 7x7 window,
#: tiles ragged at an image's end, at each dtype the kernel claims
CASES = [(30, 5, 4, 3, torch.float32), (60, 9, 13, 1, torch.float32), (80, 11, 12, 2, torch.float32),
         (60, 7, 9, 2, torch.bfloat16), (80, 12, 13, 1, torch.bfloat16), (160, 6, 5, 2, torch.float16),
         (80, 3, 2, 1, torch.float16)]


@pytest.mark.parametrize("C,H,W,B,dtype", CASES, ids=[f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}" for c, h, w, b, d in CASES])
def test_dense_z_against_float64(C, H, W, B, dtype):
    g = torch.Generator().manual_seed(C * 101 + H * 7 + W + B)
    s = C // 5
    qkv, dws, pw = random_dense_inputs(C, H, W, B, dtype, g)
    local_dw, local_pw = random_local_weights(C, g)
    z, (grid, args, kwargs) = dense_z.plan_dense_z_pass(qkv, H, W, *dws, pw, local_dw, local_pw, dot_variant(qkv))
    assert z.dtype == config.stage_dtype(dtype) and grid == (-(-H * W // kwargs["BLOCK_P"]), 4, B)
    z.fill_(float("nan"))
    dense_z.gma_dense_z_kernel[grid](*args, **kwargs)
    planes = z.view(3, B, 4, s, H, W)
    assert planes[1:, :, 0].isnan().all(), "segment 0's planes of k and v are not written"
    assert dense_z.local_z_of(z, B).data_ptr() == planes[0, :, 0].data_ptr()
    got = planes[:, :, 1:].reshape(3, B, 3 * s, H, W).double()
    got_local = dense_z.local_z_of(z, B).double()
    exact, exact_local = _z_reference(qkv.double(), H, W, dws, pw, local_dw, local_pw, torch.float64)
    err, err_local = _rel(got, exact), _rel(got_local, exact_local)
    if dtype == torch.float32:
        assert err < 1e-5 and err_local < 1e-5, (err, err_local)
        return
    ref, ref_local = _z_reference(qkv, H, W, dws, pw, local_dw, local_pw, dtype)     # torch's two steps in the dtype
    ref_err, ref_err_local = _rel(ref.double(), exact), _rel(ref_local.double(), exact_local)
    print(f"{dtype}: segments {err:.2e} against the reference's {ref_err:.2e}; "
          f"local {err_local:.2e} against {ref_err_local:.2e}")
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)
    assert err_local <= 2 * ref_err_local + 1e-6, (err_local, ref_err_local)


def _z_all(qkv, H, W, dws, pw, dtype):
    """Z (3B, 4s, H, W) of segments 0-3 (segment 0: x itself), as the statistics pass keeps it, in `dtype`."""
    B, N, C3 = qkv.shape
    s = C3 // 15
    z13 = _z_reference(qkv, H, W, dws, pw, torch.zeros(3, 3, 3 * s), torch.zeros(s, 3 * s), dtype)[0]
    x0 = qkv.to(dtype).view(B, H, W, 3, 5, s)[..., 0, :].permute(3, 0, 4, 1, 2)           # (3, B, s, H, W)
    return torch.cat([x0, z13], 2).reshape(3 * B, 4 * s, H, W)


def _moments(z):
    """[mean, M2] (2, 4s) per channel over images and pixels, in float64."""
    z = z.double()
    mean = z.mean((0, 2, 3))
    return torch.stack([mean, (z - mean[None, :, None, None]).square().sum((0, 2, 3))])


#: (C, H, W, B, dtype): tiles ragged at the image's end, batch 1 and 3, at the dtypes the dense statistics pass runs
STATS_CASES = [(80, 9, 11, 2, torch.bfloat16), (60, 7, 9, 1, torch.float16), (160, 5, 6, 3, torch.bfloat16),
               (40, 6, 5, 2, torch.float32)]


@pytest.mark.parametrize("C,H,W,B,dtype", STATS_CASES,
                         ids=[f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}" for c, h, w, b, d in STATS_CASES])
def test_dense_statistics_against_float64(C, H, W, B, dtype):
    """The training statistics pass in the dense form (`dense_z.dense_z_moments`, `gma_dense_statistics_kernel`:
    a training forward whose backward runs B3's dense form): Z of segments 0-3 of q, k, v, the merged [mean, M2]
    per channel and the local branch's Z before its LayerNorm (zl, which the Triton forward then reads) against
    float64 (torch's convolutions, not the identity); fp32 within 1e-5, fp16 / bf16 no worse than 2x torch's own
    two steps in that dtype (its Z, the moments of that Z, its local branch); no y kept. Without the local weights
    (the CUDA forward's statistics pass) no zl, and the same Z and moments."""
    g = torch.Generator().manual_seed(C * 13 + H + W * 3 + B)
    s = C // 5
    qkv, dws, pw = random_dense_inputs(C, H, W, B, dtype, g)
    local_dw, local_pw = random_local_weights(C, g)
    moments, z, zl = dense_z.dense_z_moments(qkv, H, W, *dws, pw, local_dw, local_pw)
    assert moments.dtype == torch.float64 and moments.shape == (2, 4 * s)
    assert z.dtype == zl.dtype == config.stage_dtype(dtype) and z.shape == (3 * B, 4 * s, H, W)
    assert zl.shape == (B, s, H, W) and zl.is_contiguous()
    no_local = dense_z.dense_z_moments(qkv, H, W, *dws, pw)
    assert no_local[2].numel() == 0 and torch.equal(no_local[0], moments) and torch.equal(no_local[1], z)
    exact = _z_all(qkv.double(), H, W, dws, pw, torch.float64)
    exact_m = _moments(exact)
    exact_local = _z_reference(qkv.double(), H, W, dws, pw, local_dw, local_pw, torch.float64)[1]
    errs = [_rel(z.double(), exact)] + [_rel(moments[k], exact_m[k]) for k in (0, 1)] + [_rel(zl.double(),
                                                                                               exact_local)]
    if dtype == torch.float32:
        assert max(errs) < 1e-5, errs
        return
    ref = _z_all(qkv, H, W, dws, pw, dtype)
    ref_m = _moments(ref)
    ref_local = _z_reference(qkv, H, W, dws, pw, local_dw, local_pw, dtype)[1]
    ref_errs = [_rel(ref.double(), exact)] + [_rel(ref_m[k], exact_m[k]) for k in (0, 1)] + [
        _rel(ref_local.double(), exact_local)]
    print(f"{dtype}: Z, mean, M2, Z_L {[f'{e:.2e}' for e in errs]} against torch's {[f'{e:.2e}' for e in ref_errs]}")
    for e, r in zip(errs, ref_errs):
        assert e <= 2 * r + 1e-6, (errs, ref_errs)


def test_statistics_without_y_picks_its_pass(monkeypatch):
    """A training forward whose backward runs B3's dense form (`train_op.planes_fn_for` with "triton.backward" at
    DENSE) keeps no y; its statistics pass is the dense one where `dense_z.dense_statistics_applies` (bf16 here:
    ``gmf::triton_dense_z_moments_planes``), else the stencil pass without y (`STORE_Z_MOMENTS`: fp32), whose
    moments and Z are then exactly those it keeps with y."""
    import dataclasses

    from gmf_kernels.triton_kernels import aggregation_backward as agb, statistics as st, tile_spaces, train_op
    from helpers import random_folded_weights
    C, H, W, B = 40, 5, 4, 2
    tile = agb.tile_of(dataclasses.replace(agb.backward_tiles(config.dot_pad(C // 5), 3 * B * H * W), DENSE=1))
    monkeypatch.setattr(tile_spaces, "tuned_tiles", lambda family, C_, like: tile if family == agb.BACKWARD_FAMILY
                        else None)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(B, H * W, 3 * C, generator=torch.Generator().manual_seed(5)).to(dtype)
        wts = random_folded_weights(C, torch.float32)
        fn = train_op.planes_fn_for(qkv)
        assert (fn is dense_z.dense_statistics_planes) == (dtype == torch.bfloat16), fn
        mean, var, count, (z, y_all, zl) = fn(qkv, H, W, wts)
        assert y_all.numel() == 0 and z.shape == (3 * B, 4 * C // 5, H, W) and count == 3 * B * H * W
        # the local branch's Z where the dense pass ran (for the Triton forward; not for the CUDA forward)
        assert (zl is not None) == (dtype == torch.bfloat16) and (zl is None or zl.shape == (B, C // 5, H, W))
        assert train_op.planes_fn_for(qkv, local=False)(qkv, H, W, wts)[3][2] is None
        with_y = st.statistics_planes(qkv, H, W, wts)
        if dtype == torch.float32:   # the same stencil kernel, with and without y
            assert torch.equal(mean, with_y[0]) and torch.equal(var, with_y[1]) and torch.equal(z, with_y[3][0])
        else:                        # the dense pass: bf16 operands against the stencil's fp32 dots
            assert _rel(mean, with_y[0]) < 2e-2 and _rel(var, with_y[1]) < 2e-2 and _rel(z, with_y[3][0]) < 2e-2


def test_dense_z_refuses_bad_buffers():
    qkv = torch.randn(1, 12, 120)
    w = [torch.zeros(k, k, 8) for k in (3, 5, 7)] + [torch.zeros(3, 8, 8), torch.zeros(3, 3, 24), torch.zeros(8, 24)]
    with pytest.raises(ValueError, match="expected a contiguous"):
        dense_z.plan_dense_z_pass(qkv, 3, 4, *w, dot_variant(qkv), z=torch.empty(3, 32, 3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="unit channel stride"):
        dense_z.plan_dense_z_pass(torch.randn(1, 120, 12).transpose(1, 2), 3, 4, *w, dot_variant(qkv))


_AOT_SCRIPT = r"""
import json
import triton
from gmf_kernels.triton_kernels import config, launcher as L, specializations as sp
out = []
for arch in (80, 90):
    cap = config.capability_of_arch(arch)
    for C, g in ((80, 56), (160, 28), (320, 14)):
        for dt in ("bf16", "fp32"):
            call = sp.Call(C, g, g, 128, dt)
            cands = [c for c in L.aggregate_candidates(C, call.torch_dtype(), cap) if c.get("ZDENSE")]
            applies = config.zdense_applies(C, dt, config.dot_precision(dt, cap))
            assert bool(cands) == applies, (C, dt, arch)
            for cand in cands:
                for spec in sp.specializations_of_call(call, arch, agg=cand):
                    if spec.kernel == "gma_dense_z_kernel":
                        rep = sp.compile_one(spec)
                        target, src, options = sp._source_and_options(spec)
                        ck = triton.compile(src, target=target, options=options.__dict__)   # a cache hit
                        rep.update(zdense=cand["ZDENSE"], ttgir_wgmma=ck.asm["ttgir"].count("warp_group_dot"),
                                   ptx_mma=ck.asm["ptx"].count("mma.sync"), ptx_wgmma=ck.asm["ptx"].count("wgmma.mma_async"),
                                   async_copies=ck.asm["ttgir"].count("async_copy_global_to_local"), C=C, dt=dt)
                        out.append(rep)
print(json.dumps(out))
"""


def test_dense_z_compiles_to_tensor_cores_without_spills(tmp_path):
    """Every dense Z pass the tuner may try on GroupMixFormer-S (bf16 at C = 80, 160, 320 at both tile tables; fp32 at
    C = 80, 160 at the first: `config.zdense_variants`), compiled for sm_80 and sm_90: no spill, no known miscompile, its products on tensor
    cores (sm_90: wgmma; sm_80: mma.sync) and its tap loop's loads asynchronous copies (pipelined)."""
    from helpers import aot_reports, assert_compiled_without_spills
    reps = aot_reports(_AOT_SCRIPT, tmp_path, timeout=1200)
    assert {(r["arch"], r["C"], r["dt"], r["zdense"]) for r in reps} == {
        (a, C, dt, z) for a in (80, 90) for C in (80, 160, 320) for dt in ("bf16", "fp32") for z in (1, 2)
        if (dt == "bf16" or (C < 320 and z == 1))}
    for r in reps:
        print(f"sm_{r['arch']} C={r['C']} {r['dt']} ZDENSE {r['zdense']}: {r['registers']} registers, "
              f"{r['shared_dynamic']} B shared, "
              f"wgmma {r['ptx_wgmma']}, mma.sync {r['ptx_mma']}, async copies {r['async_copies']}")
        assert_compiled_without_spills(r)
        assert (r["ptx_wgmma"] > 0) if r["arch"] == 90 else (r["ptx_mma"] > 0), r
        assert r["async_copies"] > 0, r
