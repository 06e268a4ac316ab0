"""The backward's recompute as Triton kernels (triton_kernels/recompute.py), through the Triton
interpreter on CPU.

Checked against `backward.recompute` (the PyTorch stage set's, the oracle) in float64, every
tensor the Triton stages read -- Z, V (the v images' proxies), y, KV, the softmax statistics k_max / k_sum (the
oracle's from its own K), R, w4, xh4, rstd4 -- under the low-precision rule: error <= 2 x the
error of the float32 PyTorch recompute on the same input at the kernels' dot precision + FLOOR
(1e-7, about fp32's unit roundoff: both sides measured at 1e-8 .. 4e-7 with fp32 dots). The
kernels take the backward's dots (`statistics.backward_dots`): for fp16/bf16 inputs one TF32
pass, so there the reference rounds its products' operands to TF32 (`helpers.tf32_products`);
and qkv itself handed on (the depthwise backward reads its inputs there,
tests/test_triton_aggregation_backward.py).

* widths 40, 80, 200 (d = 4, 8, 20: D_PAD 4, 8, 32, padded heads), odd grids (3x7, 5x6, 9x9),
  batch 1 and 2, fp32 / fp16 / bf16 inputs (the stage tensors in the stage dtype, `config.stage_dtype`:
  for fp16/bf16 the reference is the fp32 recompute rounded where the kernels round, `at_stage_precision`);
* small tiles with several tiles per program and several splits (the interpreter's default is
  one tile and one split per image), partial last tiles included: the softmax partials' merge
  and the CRPE / depthwise halos across tile boundaries;
* the Triton stage set takes these kernels exactly where its backward kernels run; a float32
  Triton training step (output, every gradient, running statistics against float64,
  tests/training_cases.py) runs the three launches once; breaking the partial merge fails;
* the AOT compile of the real shape C=320 14x14 B=128 for sm_80 and sm_90: no spills.
"""
import contextlib
import json
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from gmf_kernels.triton_kernels import backward as bw  # noqa: E402
from gmf_kernels.triton_kernels import recompute as rcp  # noqa: E402
from gmf_kernels.triton_kernels import config  # noqa: E402
from gmf_kernels.triton_kernels import train_op  # noqa: E402,F401  (registers the ops)
from helpers import ROOT, assert_compiled_without_spills, assert_within_reference_error  # noqa: E402
from helpers import have_triton_nvidia_backend  # noqa: E402
from helpers import random_folded_weights, record_calls, tf32_products, to_device, triton_compile_env  # noqa: E402
from helpers import triton_test_device  # noqa: E402

FLOOR = 1e-7
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
NUM_HEADS = 8

#: where the kernels run: CPU tensors through the interpreter, else the GPU (the oracles stay on the CPU)
DEVICE = triton_test_device()


def dev(x):
    return to_device(x, DEVICE)


def with_softmax_stats(rc, B):
    """The oracle's (k_max, k_sum): max over tokens of K and sum of exp(K - max), from its own P."""
    K = rc["P"][B:2 * B]
    Kh = K.reshape(B, NUM_HEADS, K.shape[1] // NUM_HEADS, -1)
    rc["k_max"] = Kh.amax(-1)
    rc["k_sum"] = torch.exp(Kh - rc["k_max"][..., None]).sum(-1)
    return rc


def check(qkv, H, W, C, seed=0):
    B = qkv.shape[0]
    w32, w64 = random_folded_weights(C, F32, seed), random_folded_weights(C, F64, seed)
    eps = 1e-5
    qkv_d = dev(qkv)
    got = rcp.recompute(qkv_d, H, W, dev(w32), eps)
    assert got.pop("qkv") is qkv_d
    got = {k: [t.cpu() for t in v] if isinstance(v, list) else v.cpu() for k, v in got.items()}
    from gmf_kernels.triton_kernels.statistics import backward_dots
    sd = config.stage_dtype(qkv.dtype)
    with tf32_products() if backward_dots(qkv_d).precision == "tf32" else contextlib.nullcontext():
        r32 = with_softmax_stats(bw.recompute(qkv, H, W, w32, eps), B)
        if sd != F32:
            r32 = at_stage_precision(r32, w32, B, sd)
    r64 = with_softmax_stats(bw.recompute(qkv.double(), H, W, w64, eps), B)
    assert set(got) == {"Z", "V", "y", "KV", "k_max", "k_sum", "R", "w4", "xh4", "rstd4"}
    for k, v in got.items():
        if isinstance(v, list):
            assert len(v) == len(r64[k])
            pairs = [(f"{k}[{i}]", a, b, c) for i, (a, b, c) in enumerate(zip(v, r32[k], r64[k]))]
        else:
            pairs = [(k, v, r32[k], r64[k])]
        for name, a, b, c in pairs:
            want = F32 if k in SMALL else sd
            assert a.dtype == want and a.shape == c.shape, (name, a.dtype, want, a.shape, c.shape)
            assert_within_reference_error(a, b, c, floor=FLOOR, name=name)
    return got


#: what the recompute keeps in fp32 whatever the stage dtype (`config.stage_dtype`)
SMALL = ("KV", "k_max", "k_sum", "rstd4")


def at_stage_precision(r32, w32, B, sd):
    """The float32 PyTorch recompute as the kernels round it: the stage tensors (Z, V, y, w4, xh4)
    rounded to sd once, and what the kernels compute from the rounded Z and V (K = hardswish of
    the rounded Z's BatchNorm affine in fp32, the softmax statistics, KV, and R, itself rounded)
    recomputed from them in fp32: the reference at that precision."""
    out = {k: ([t.to(sd) for t in v] if isinstance(v, list) else v.to(sd)) if k in ("Z", "V", "y", "w4", "xh4")
           else v for k, v in r32.items()}
    a, b = (t.reshape(-1)[:, None, None] for t in (w32.bn_scale, w32.bn_shift))
    K = torch.nn.functional.hardswish(out["Z"][B:2 * B].float() * a + b)
    V = out["V"].float()
    d = K.shape[1] // NUM_HEADS
    Kh, Vh = K.reshape(B, NUM_HEADS, d, -1), V.reshape(B, NUM_HEADS, d, -1)
    out["KV"] = bw.token_mix(torch.softmax(Kh, dim=-1), Vh)
    out["R"] = bw.crpe(V, w32, d).to(sd)
    out["k_max"] = Kh.amax(-1)
    out["k_sum"] = torch.exp(Kh - out["k_max"][..., None]).sum(-1)
    return out


CASES = [(40, (3, 7), 2, F32), (200, (5, 6), 1, BF16), (80, (9, 9), 2, F16)]


@pytest.mark.parametrize("C, grid, B, dtype", CASES, ids=[f"C{c}-{g[0]}x{g[1]}-B{b}-{str(d)[6:]}" for c, g, b, d in CASES])
def test_recompute_matches_float64(C, grid, B, dtype):
    H, W = grid
    qkv = torch.randn(B, H * W, 3 * C, generator=torch.Generator().manual_seed(C + H)).to(dtype)
    check(qkv, H, W, C)


def test_recompute_small_tiles_several_splits(monkeypatch):
    """16-token tiles (9x9 = 81 tokens: 6 tiles, the last of 1 token) and a split target of 24
    programs: the attention kernel's 8 heads get 3 splits of 2 tiles (the merge of 3 softmax
    partials per head), the local kernel 6 splits of 1 tile; the stencils' halos cross tile and
    split boundaries; the local branch in 16-channel chunks (s = 40: 16 + 16 + 8); the tiles in
    strips of 3 columns (`config.STRIP_TARGET` lowered to 4)."""
    monkeypatch.setattr(config, "STRIP_TARGET", 4)
    monkeypatch.setattr(rcp, "attention_tiles", lambda d, N, precision: (16, 4))
    monkeypatch.setattr(rcp, "local_tiles", lambda s, N, precision: (16, 4, 16))
    monkeypatch.setattr(rcp, "SPLIT_TARGET", 24)
    C, H, W, B = 200, 9, 9, 1
    qkv = torch.randn(B, H * W, 3 * C)
    w = random_folded_weights(C, F32)
    Z = torch.empty(3 * B, 4 * C // 5, H, W)
    _, (_, grid, _, kwargs) = rcp.plan_recompute_attention(Z, Z[2 * B:], H, W, w)
    _, (_, lgrid, largs, lkw) = rcp.plan_recompute_local(qkv, H, W, w, 1e-5)
    assert grid == (3, NUM_HEADS, B) and kwargs["BLOCK_P"] == 16
    assert lgrid == (6, B) and largs[12] == 1 and largs[9] == 3 and lkw["CK"] == 16
    check(qkv, H, W, C)


def test_broken_partial_merge_fails(monkeypatch):
    """The check can fail: a merge that ignores the partials' different maxima (sums them as if
    every split had the global max) is caught on a multi-split case."""
    def naive(part_m, part_l, part_acc):
        B, _, cp = part_m.shape
        d = cp // NUM_HEADS
        k_max = part_m.amax(1)
        k_sum = part_l.sum(1)
        return (k_max.view(B, NUM_HEADS, d), k_sum.view(B, NUM_HEADS, d),
                (part_acc.sum(1) / k_sum[..., None]).view(B, NUM_HEADS, d, d))
    monkeypatch.setattr(rcp, "attention_tiles", lambda d, N, precision: (16, 4))
    monkeypatch.setattr(rcp, "SPLIT_TARGET", 24)
    monkeypatch.setattr(rcp, "merge_softmax_partials", naive)
    with pytest.raises(AssertionError):
        check(torch.randn(1, 81, 120), 9, 9, 40)


def test_triton_stages_take_the_recompute_kernels():
    """`train_op.triton_stages` recomputes with the kernels exactly where it uses the Triton
    backward kernels (`config.backward_kernels_take`); the PyTorch stage set keeps the PyTorch
    recompute."""
    from gmf_kernels.triton_kernels._common import DotVariant
    from gmf_kernels.triton_kernels.train_op import triton_stages
    for s in (8, 64, 72, 96):
        for precision in ("tf32x3", "tf32"):
            assert triton_stages(s, DotVariant(precision, False)).recompute is rcp.recompute, (s, precision)
    assert triton_stages(64, DotVariant("ieee", False)).recompute is rcp.recompute
    assert triton_stages(72, DotVariant("ieee", False)).recompute is bw.recompute
    assert bw.TORCH_STAGES.recompute is bw.recompute
    assert triton_stages(160, DotVariant("tf32x3", False)).recompute is bw.recompute


def test_training_step_runs_the_recompute_kernels_once(monkeypatch):
    """A float32 Triton training step (tests/training_cases.py: output, every gradient, running
    statistics against the float64 reference) runs one recompute launch: V from the Z the statistics pass
    kept (not the recompute of Z, V and y); not the softmax statistics, KV and CRPE, nor the local branch,
    which the forward kept (`config.from_planes`)."""
    from gmf_kernels.triton_kernels import statistics as st
    from training_cases import check_train_float32
    z = record_calls(monkeypatch, st, "recompute_z")
    pv = record_calls(monkeypatch, rcp, "plan_proxy_v")
    att = record_calls(monkeypatch, rcp, "plan_recompute_attention")
    loc = record_calls(monkeypatch, rcp, "plan_recompute_local")
    C, grid, B = 40, (3, 5), 2
    check_train_float32("triton", C, grid, B, 0.1, 1, DEVICE)
    z_shape = (3 * B, 4 * C // 5, *grid)
    assert z == [] and pv == [z_shape] and att == [] and loc == [], (z, pv, att, loc)


# ------------------------------------------------------------------ ahead-of-time compile (no GPU)
_AOT_SCRIPT = r"""
import json, sys
import gmf_kernels.triton_kernels.specializations as sp
out = []
for arch in (80, 90):
    for spec in sp.statistics_specializations_of_call(sp.Call(320, 14, 14, 128, "fp32"), arch):
        if spec.kernel in ("gma_recompute_attention_kernel", "gma_recompute_local_kernel"):
            out.append(sp.compile_one(spec))
print(json.dumps(out))
"""


def test_aot_compile_real_shape_no_spills(tmp_path):
    """Both kernels as the launchers specialise them for C=320 14x14 B=128 fp32 (3xTF32 dots),
    compiled for sm_80 and sm_90 (specializations.compile_one: Triton's compile, ptxas -v):
    compile, zero spills, <= 255 registers."""
    if not have_triton_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    env = triton_compile_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")          # empty: really compiles
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"AOT compile failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    reps = json.loads(lines[-1])
    assert sorted((r["function"], r["arch"]) for r in reps) == [
        (k, a) for k in ("gma_recompute_attention_kernel", "gma_recompute_local_kernel") for a in (80, 90)]
    for r in reps:
        print(f"sm_{r['arch']} {r['label']}: {r['registers']} registers, spills {r['spill_stores']}/"
              f"{r['spill_loads']} B, stack {r['stack']} B")
        assert r["dot_precision"] == "tf32x3"
        assert_compiled_without_spills(r)
