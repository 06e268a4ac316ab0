"""The CUDA kernels emulated on the CPU, faithful to the block barriers and to the warp-level
tensor-core products (csrc/gma_emu.h).

The emulation runs the very kernel bodies of csrc/ (templates of an execution policy) with
every thread of a block as its own execution context: a thread runs from one barrier (or
warp op) to the next without interruption, the threads of a block in a scrambled order that
changes at every barrier, shared memory and workspace start as NaN, and a barrier reached by
only some threads is an error. A tensor-core product is warp-collective: it runs when the 32
lanes of its warp have reached it, reads its operands as shared memory was at the last
barrier, rounds them as the tensor cores do (fp16/bf16 as stored; fp32 as 3xTF32 with
cvt.rna.tf32.f32 conversions) and accumulates in fp32. A missing or misplaced barrier
therefore reads NaN or stale data, and the emulated kernels' parity tests below fail. This
file proves it: for every barrier statement of the kernels (found by parsing csrc/), a build
with that one barrier compiled out of the emulation (GMF_EMU_SKIP_SYNC) fails the parity
check, while the unmutated build passes. It also checks the emulated product itself against
a numpy model of the tensor cores' arithmetic, bit for bit.

The module under test is an emulation-only build (host C++ compiler, no nvcc needed, about
a minute on 2 cores) of the current csrc/ sources; the barrier builds recompile one small
file each (csrc/gma_emu_skip.cpp) and relink. In CI (environment variable CI set) a missing
toolchain (C++ compiler, pybind11, CUDA headers) fails these tests instead of skipping them.

Out-of-bounds accesses: the same bodies under AddressSanitizer, tests/test_cuda_emulation_asan.py.
What the emulation cannot show: races between blocks through global memory that the
kernels do not have, the tensor cores' internal summation order (the emulation sums in k
order), timing, and anything GPU-specific — those need the GPU tests
(tests/test_cuda_build.py, benchmarks/gpu_report.py).
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gmf_kernels.cuda as gcuda
from cuda_cases import FP32_TOL, Case, check, run
from gmf_kernels.cuda import build as cbuild
from gmf_kernels.cuda import launcher as cl
from gmf_kernels import tuning
from gmf_kernels.folding import fold_eval
from gmf_kernels.numerics import max_rel_error
from gmf_kernels.reference import reference_group_mix_attention

# the emulation build: fixtures emu_build, emu, use_emu in conftest.py (shared with test_cuda_training.py)


def test_emulation_build_is_host_only(emu, emu_build):
    path, _, seconds = emu_build
    assert emu.build_mode() == "emulation"
    assert emu.build_archs() == "" and emu.build_ptx_archs() == ""
    assert emu.sources_hash() == cbuild.sources_hash()
    assert emu.cuda_runtime_version() == 0 and emu.cuda_driver_version() == 0
    meta = cbuild.read_metadata(path.parent)
    assert meta["mode"] == "emulation" and meta["emu_skip_sync"] is None
    info = emu.emulation_info()
    assert info["skip_sync"] == "" and info["engine"].endswith("fibers")
    with pytest.raises(RuntimeError, match="emulation-only build"):  # validation passes, then no GPU code
        ws = [(1 << 32) + (1 << 24) * (i + 1) for i in range(14)]
        emu.pre_projection((1 << 32) + (1 << 30), (1 << 32) + (2 << 30), (1 << 32) + (3 << 30), 1 << 28, ws,
                           2, 7, 9, 80, 0, 0.3, 1e-5, 0)
    print(f"emulation build: {seconds:.0f} s")


# ------------------------------------------------------------------ the engine itself
def test_emulation_engine_strides_items_like_the_gpu(emu):
    """for_each(n): item i runs on thread i % blockDim (as DeviceExec)."""
    owner = emu.emulation_selftest("stride")
    assert owner == [float(i % 256) for i in range(600)]


def test_emulation_engine_scrambles_threads_per_barrier(emu):
    """Between barriers the threads run one after another in an order that changes at every
    barrier and with the seed."""
    for seed in (0, 1):
        order = emu.emulation_selftest("order", seed)
        epochs = [order[k * 64:(k + 1) * 64] for k in range(3)]
        for e in epochs:
            assert sorted(e) == [float(t) for t in range(64)], "each thread runs once per barrier interval"
            assert e != sorted(e), "threads run in launch order: not scrambled"
        assert epochs[0] != epochs[1] != epochs[2]
    assert emu.emulation_selftest("order", 0) == emu.emulation_selftest("order", 0)  # deterministic
    assert emu.emulation_selftest("order", 0) != emu.emulation_selftest("order", 1)


def test_emulation_engine_hands_over_at_barriers_only(emu):
    """Thread t writes shared[t], then reads shared[t+1]: right with the barrier, wrong
    (NaN-poisoned or stale) for many threads without it."""
    assert emu.emulation_selftest("handover") == [0.0]
    (wrong,) = emu.emulation_selftest("no_barrier")
    assert wrong > 100, f"only {wrong:.0f} of 1024 reads went wrong without the barrier"


def test_emulation_engine_reports_divergent_barriers(emu):
    with pytest.raises(RuntimeError, match=r"reached by 100 of 256 threads; the other 156 returned"):
        emu.emulation_selftest("divergent")
    with pytest.raises(RuntimeError, match="threads wait at different barriers"):
        emu.emulation_selftest("mismatch")


def test_emulation_engine_warp_ops_read_the_last_barrier(emu):
    """A warp-collective product (8 warps, fp16 ones: C = 16) reads its operands as shared
    memory was at the block's last barrier, and writes C when its warp's 32 lanes have all
    reached it: with both barriers every value is right; without the barrier before, every
    product sees the NaN-poisoned operands; without the one after, readers in other warps run
    before the product (scrambled order) and read stale C."""
    before = emu.emulation_info()["warp_ops"]
    assert emu.emulation_selftest("mma_handover") == [0.0]
    assert emu.emulation_info()["warp_ops"] - before == 8
    for seed in (0, 1):
        assert emu.emulation_selftest("mma_no_barrier_before", seed) == [2048.0]
        (wrong,) = emu.emulation_selftest("mma_no_barrier_after", seed)
        assert wrong > 200, f"only {wrong:.0f} of 2048 early reads went wrong"


def test_emulation_engine_reports_divergent_warp_ops(emu):
    with pytest.raises(RuntimeError, match=r"warp-collective op at \S+ is reached by 16 of 32 lanes of warp 0"):
        emu.emulation_selftest("mma_divergent")
    with pytest.raises(RuntimeError, match="call different warp-collective ops"):
        emu.emulation_selftest("mma_mismatch")


def test_emulation_engine_reports_what_a_gpu_faults_on(emu):
    """What a CPU would not notice and a GPU faults on or computes garbage from is an error in
    the emulation: a 16-byte vector access (copy16) 8 bytes off alignment, and a warp product
    whose A is 16 bytes past a 32-byte boundary or whose lda is 40 bytes (WMMA's rules: 32-byte
    aligned pointers, leading dimensions in whole 16 bytes). The aligned copy runs."""
    assert emu.emulation_selftest("vector_aligned") == []
    with pytest.raises(RuntimeError, match=r"misaligned 16-byte vector access in copy16 \(dst % 16 = 0, src % 16 = 8\)"):
        emu.emulation_selftest("vector_misaligned")
    with pytest.raises(RuntimeError, match=r"breaks WMMA's operand rules: A at 16 bytes past a 32-byte boundary"):
        emu.emulation_selftest("mma_misaligned")
    with pytest.raises(RuntimeError, match=r"breaks WMMA's operand rules: lda = 40 bytes \(not a multiple of 16\)"):
        emu.emulation_selftest("mma_bad_ld")


# ------------------------------------------------------------------ the tensor-core arithmetic
def tf32_rna(x):
    """cvt.rna.tf32.f32 (PTX ISA: .rna = round to nearest, ties away from zero) on float32
    bits: keep 10 mantissa bits. Finite values: add half an ulp (bit 12) to the magnitude bits
    and truncate; inf and NaN pass through with the low bits cleared (as the GPU's SASS does)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    finite = (u & 0x7F800000) != 0x7F800000
    u = np.where(finite, u + 0x1000, u) & 0xFFFFE000
    return u.astype(np.uint32).view(np.float32)


def test_emulated_tf32_conversion_rounds_to_nearest_ties_away(emu):
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -10)  # a TF32 ulp at 1
    cases = np.array([1.0, 1.0 + 2.0 ** -11, -(1.0 + 2.0 ** -11), 1.0 + 2.0 ** -11 - 2.0 ** -23,
                      1.0 + 3 * 2.0 ** -11, 3.0e38, -0.0, 1e-40, np.inf], dtype=np.float32)
    got = np.array(emu.emulation_tf32(cases.astype(np.float64).tolist()), dtype=np.float32)
    want = np.array([1.0, one + ulp, -(one + ulp), 1.0, 1.0 + 2 * ulp, tf32_rna(np.float32(3.0e38)), -0.0,
                     tf32_rna(np.float32(1e-40)), np.inf], dtype=np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (got, want)  # ties go away from zero
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * np.float32(7.3)
    got = np.array(emu.emulation_tf32(x.astype(np.float64).tolist()), dtype=np.float32)
    assert np.array_equal(got.view(np.uint32), tf32_rna(x).view(np.uint32))
    assert np.all(got.view(np.uint32) & 0x1FFF == 0)
    assert np.max(np.abs(got - x) / np.abs(x)) <= 2.0 ** -11 * (1 + 1e-6)


def mma_model(dtype, a, b, c, accumulate):
    """The tensor cores' product as csrc/gma_mma.cuh states it, in float32 numpy: operands
    rounded to the dtype (fp16/bf16 round to nearest even) and multiplied exactly; fp32 as
    3xTF32 per k-step of 8 (A_small B_big, A_big B_small, A_big B_big); fp32 accumulation in
    k order. Products of the rounded operands are exact in float32, so float32 numpy
    arithmetic reproduces every rounding."""
    a = torch.tensor(a, dtype=torch.float32).to(dtype).float().numpy()
    b = torch.tensor(b, dtype=torch.float32).to(dtype).float().numpy()
    acc = np.array(c, dtype=np.float32).reshape(16, 16) if accumulate else np.zeros((16, 16), np.float32)
    k = a.shape[1]
    if dtype != torch.float32:
        for kk in range(k):
            acc = acc + np.outer(a[:, kk], b[kk, :]).astype(np.float32)
        return acc
    ab, bb = tf32_rna(a), tf32_rna(b)
    asm, bsm = tf32_rna(a - ab), tf32_rna(b - bb)
    for k0 in range(0, k, 8):
        for x, y in ((asm, bb), (ab, bsm), (ab, bb)):
            for kk in range(k0, k0 + 8):
                acc = acc + np.outer(x[:, kk], y[kk, :]).astype(np.float32)
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["tf32x3", "fp16", "bf16"])
def test_emulated_tensor_core_product_matches_its_model(emu, dtype):
    """emulation_warp_mma (the engine's product, in every operand layout the kernels use) is
    bit-identical to the model of the tensor cores' arithmetic, and within its stated accuracy
    of the float64 product: 3xTF32 ~2^-21 of the operands' scale (one TF32 pass: ~2^-11)."""
    rng = np.random.default_rng(1)
    code = cl.DTYPE_CODES[dtype]
    for k, a_col, b_row, accumulate in ((16, False, False, False), (48, True, True, True), (32, False, True, True),
                                        (64, True, False, False)):
        a = rng.standard_normal((16, k)).astype(np.float32)
        b = rng.standard_normal((k, 16)).astype(np.float32)
        c = rng.standard_normal(256).astype(np.float32)
        got = np.array(emu.emulation_warp_mma(code, a_col, b_row, a.ravel().tolist(), b.ravel().tolist(),
                                              c.tolist(), k, accumulate), dtype=np.float32).reshape(16, 16)
        want = mma_model(dtype, a, b, c, accumulate)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
            f"k={k} a_col={a_col} b_row={b_row}: max diff {np.max(np.abs(got - want))}"
        if dtype == torch.float32:
            exact = a.astype(np.float64) @ b.astype(np.float64) + (c.reshape(16, 16) if accumulate else 0)
            scale = np.abs(a).max() * np.abs(b).max() * k
            assert np.max(np.abs(got - exact)) <= 2.0 ** -20 * scale
            one_pass = tf32_rna(a).astype(np.float64) @ tf32_rna(b).astype(np.float64)
            assert np.max(np.abs(one_pass - a.astype(np.float64) @ b.astype(np.float64))) > 2.0 ** -20 * scale


_DRIVER = r"""
#include "gma_emu.cpp"
#include <cstdio>
namespace gmf { extern const char* const kEmuSkipSync = ""; }
int main() {
  std::printf("%s\n", gmf::emu_stats().engine);
  for (const char* n : {"stride", "handover", "no_barrier", "order"}) {
    for (double x : gmf::emu_selftest(n, 0)) std::printf("%g ", x);
    std::printf("\n");
  }
  for (const char* n : {"divergent", "mismatch"}) {
    try { gmf::emu_selftest(n, 0); std::printf("no error\n"); }
    catch (const std::exception& e) { std::printf("%s\n", e.what()); }
  }
}
"""


def test_emulation_engine_portable_fallback(emu, tmp_path):
    """The swapcontext engine (used off x86-64) behaves exactly as the x86-64 fibers:
    the engine's self-tests compiled with GMF_EMU_FORCE_UCONTEXT into a small program."""
    import subprocess
    drv = tmp_path / "driver.cpp"
    drv.write_text(_DRIVER)
    exe = tmp_path / "driver"
    cmd = [cbuild.find_cxx(), "-std=c++17", "-O1", "-DGMF_EMU_FORCE_UCONTEXT", f"-I{cbuild.csrc_dir()}",
           f"-I{cbuild.cuda_include_dir()}", str(drv), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines[0] == "ucontext fibers"
    for name, line in zip(("stride", "handover", "no_barrier", "order"), lines[1:5]):
        assert [float(v) for v in line.split()] == emu.emulation_selftest(name, 0), name
    assert "reached by 100 of 256 threads" in lines[5]
    assert "threads wait at different barriers" in lines[6]


# ------------------------------------------------------------------ the kernels, emulated
EMU_SHAPES = [  # (C, H, W, B): every released width, odd grids, several tiles, 1x1
    (40, 7, 9, 2), (80, 13, 17, 2), (160, 14, 14, 1), (200, 5, 11, 2), (240, 9, 7, 1),
    (320, 7, 7, 2), (360, 6, 10, 1), (480, 7, 7, 1), (80, 1, 1, 3), (40, 17, 3, 1),
    (60, 7, 9, 2), (50, 5, 6, 1),  # generic head widths d=6, d=5 (scalar loads: s*2 bytes % 16 != 0)
]


@pytest.mark.parametrize("C,H,W,B", EMU_SHAPES, ids=[f"C{c}-{h}x{w}-B{b}" for c, h, w, b in EMU_SHAPES])
def test_emulated_kernels_fp32(use_emu, C, H, W, B):
    case = Case(C, H, W, B)
    check(run(case, torch.float32), case, torch.float32, f"emulated fp32 C={C} {H}x{W}")


LOWP_SHAPES = [(80, 9, 11, 2), (200, 7, 7, 1), (320, 14, 14, 1), (480, 7, 7, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("C,H,W,B", LOWP_SHAPES, ids=[f"C{c}-{h}x{w}" for c, h, w, b in LOWP_SHAPES])
def test_emulated_kernels_low_precision(use_emu, dtype, C, H, W, B):
    case = Case(C, H, W, B, seed=3)
    check(run(case, dtype), case, dtype, f"emulated {dtype} C={C}")


TILINGS = [  # (tile, tiles_per_cta): tiles of every stencil-run width (4, 7, 8, 2x8), 1x1, odd;
    ((1, 1), 0), ((3, 5), 0), ((8, 8), 0), ((2, 16), 0), ((7, 7), 0), ((4, 4), 0),
    ((4, 8), 3), ((7, 7), 5), ((3, 5), 1000),  # persistent CTAs: runs of several tiles and jobs
]


@pytest.mark.parametrize("tile,tpc", TILINGS, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else f"tpc{v}")
def test_emulated_kernels_any_tile(use_emu, tile, tpc):
    """Many tiles per image: the split-N combine over runs, halos across tile borders, CTAs
    walking several tiles and jobs (their partials merged, their weights staged once per job)."""
    case = Case(80, 11, 13, 2, seed=5)
    check(run(case, torch.float32, tile=tile, tiles_per_cta=tpc), case, torch.float32, f"tile {tile} x{tpc}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_kernels_weights_read_packed(use_emu, dtype):
    """When a job's weights do not fit the device's shared memory, the planner reads them from
    the workspace, packed by gma_pack_kernel, instead of staging them: the same results."""
    case = Case(200, 7, 9, 2, seed=6)
    code = cl.DTYPE_CODES[dtype]
    staged = use_emu.plan(2, 7, 9, 200, code, 4, 4, 3, 0)
    assert staged["aggregate"]["staged"] and staged["attention"]["staged"] and staged["pack"]["grid"] == 0
    limit = staged["aggregate"]["smem"] - 1024  # too small for the staged aggregation block
    packed = use_emu.plan(2, 7, 9, 200, code, 4, 4, 3, limit)
    assert not packed["aggregate"]["staged"] and packed["pack"]["grid"] == 9
    assert packed["aggregate"]["smem"] <= limit < staged["aggregate"]["smem"]
    before = use_emu.emulation_info()["launches"]
    check(run(case, dtype, tile=(4, 4), tiles_per_cta=3, smem_limit=limit), case, dtype, "packed weights")
    assert use_emu.emulation_info()["launches"] - before == 4  # pack, aggregate, combine, attention
    tiny = use_emu.plan(2, 7, 9, 200, code, 0, 0, 0, 40 * 1024)
    assert not tiny["aggregate"]["staged"]
    assert max(tiny["aggregate"]["smem"], tiny["attention"]["smem"]) <= 40 * 1024
    check(run(case, dtype, smem_limit=40 * 1024), case, dtype, "40 KiB of shared memory")


def _emulate(mod, case, dtype, seed=0, tile=(0, 0), tiles_per_cta=0, smem_limit=0):
    ws, eps = case.weights()
    qkv = case.qkv(dtype).contiguous()
    out = torch.full((case.B, case.H * case.W, case.C), float("nan"), dtype=dtype)
    code = cl.DTYPE_CODES[dtype]
    nbytes = mod.workspace_size(case.B, case.H, case.W, case.C, code, *tile, tiles_per_cta, smem_limit)
    workspace = cl._workspace(nbytes, "cpu")
    mod.emulate_pre_projection(qkv.data_ptr(), out.data_ptr(), workspace.data_ptr(), nbytes,
                               [t.data_ptr() for t in ws], case.B, case.H, case.W, case.C, code,
                               case.hp.scale, eps, *tile, tiles_per_cta, smem_limit, seed=seed)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_emulated_kernels_independent_of_thread_order(emu, dtype):
    """No item's result depends on the order of the threads (no races): three seeds (three
    different thread, warp-release and block orders) give bit-identical outputs, and one seed
    twice too."""
    case = Case(160, 9, 9, 2, seed=7)
    before = emu.emulation_info()
    outs = [_emulate(emu, case, dtype, seed=s, tiles_per_cta=4) for s in (0, 1, 2, 0)]
    for s, o in zip((1, 2, 0), outs[1:]):
        assert torch.equal(outs[0], o), f"seed {s} gives another result than seed 0"
    check(outs[0], case, dtype, "seeded emulation")
    after = emu.emulation_info()
    assert after["launches"] - before["launches"] == 4 * 3  # aggregate, combine, attention
    assert after["barriers"] > before["barriers"]
    assert after["warp_ops"] > before["warp_ops"]


def test_emulated_kernels_golden(use_emu):
    """The upstream code's float64 vectors (odd, non-square grids)."""
    from conftest import golden_path
    from gmf_kernels.modules import GroupMixAttention
    for g in torch.load(golden_path("gma_module.pt")):
        m = GroupMixAttention(g["dim"], g["num_heads"], qkv_bias=g["qkv_bias"]).double().eval()
        m.load_state_dict(g["state_dict"])
        w, hp = m.gma_weights(), m.hyper()
        qkv = F.linear(g["x"], w.qkv_weight, w.qkv_bias).float()
        f = fold_eval(w, hp, torch.float32)
        out = torch.full_like(g["pre_proj"], float("nan"), dtype=torch.float32)
        cl.launch_pre_projection(qkv, g["H"], g["W"], list(f), hp.scale, hp.ln_eps, out=out, emulate=True)
        err = max_rel_error(out, g["pre_proj"])
        assert err <= FP32_TOL, f"golden C={g['dim']} {g['H']}x{g['W']}: {err:.2e}"


# ------------------------------------------------------------------ plans and the tuning space
def test_plan_tiles_and_work_balance(emu):
    """Tiles that waste little on GroupMixFormer's grids, a grid that fills a 132-SM GPU at
    batch 1 where the problem allows, CTAs of balanced cost, shared memory within the limit."""
    assert emu.plan(128, 56, 56, 80, 2)["tile"] == (8, 8)
    for hw in (28, 14, 7):
        assert emu.plan(128, hw, hw, 320, 2)["tile"] == (7, 7)  # no padded pixel
    small = emu.plan(1, 56, 56, 80, 2)
    assert small["aggregate"]["units"] >= 2 * 132 and small["aggregate"]["grid"] == small["aggregate"]["units"]
    tiny = emu.plan(1, 7, 7, 320, 2)
    assert tiny["tile"][0] * tiny["tile"][1] < 49 and tiny["aggregate"]["grid"] >= 5 * 4
    big = emu.plan(256, 56, 56, 80, 2)
    assert 1000 <= big["aggregate"]["grid"] <= 1056 and big["tiles_per_cta"] > 1
    # per-tile costs: the 7x7 segment costs more than the 3x3 one, which costs more than segment 0
    cost = big["aggregate"]["cost"]
    assert cost[3] > cost[2] > cost[1] > cost[0] and len(big["attention"]["cost"]) == 4
    for dtype in (0, 1, 2):
        for C in (40, 80, 160, 200, 240, 320, 360, 480):
            for limit in (64 * 1024, 99 * 1024, 163 * 1024, 227 * 1024):  # sm_75, sm_86/89, sm_80, sm_90
                p = emu.plan(128, 14, 14, C, dtype, 0, 0, 0, limit)
                assert max(p["aggregate"]["smem"], p["attention"]["smem"]) <= limit, (C, dtype, limit, p)
                if C <= 320 and limit >= 99 * 1024:  # GroupMixFormer-S on A100 / H100-class GPUs: staged
                    assert p["aggregate"]["staged"] and p["attention"]["staged"], (C, dtype, limit)
    # C=640 (d=64, no released model) in fp32 does not fit a T4's 64 KiB: a clear error
    with pytest.raises(ValueError, match=r"C=640 \(float32\) needs at least \d+ bytes of shared memory"):
        emu.plan(1, 7, 7, 640, 0, 0, 0, 0, 64 * 1024)
    assert emu.plan(1, 7, 7, 640, 0, 0, 0, 0, 99 * 1024)["aggregate"]["smem"] <= 99 * 1024
    # a requested tile is kept when it fits, else halved until it does
    assert emu.plan(2, 14, 14, 480, 0, 8, 8, 0, 227 * 1024)["tile"] == (8, 8)
    assert emu.plan(2, 14, 14, 480, 0, 8, 8, 0, 64 * 1024)["tile"] in ((4, 8), (4, 4), (2, 4))
    with pytest.raises(ValueError, match="too large"):
        emu.plan(1, 56, 56, 80, 0, 16, 8)


def test_tile_search_space_is_registered_and_launchable(emu, use_emu, tmp_path, monkeypatch):
    """The "cuda.tiles" space (gmf_kernels.cuda.launcher): every candidate is a plan the module
    accepts for every width and dtype, and one candidate runs; the launcher takes the tuned
    entry of the architecture's table, or the planner's own choice without one."""
    space = tuning.spaces()[cl.TILE_FAMILY]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for C in (40, 80, 160, 200, 240, 320, 360, 480):
            cands = space.candidates(C, dtype, (9, 0))
            assert cl.AUTO in cands and len(cands) >= 8
            assert space.default(C, dtype, (9, 0)) in cands
            for cfg in cands:
                for limit in (64 * 1024, 227 * 1024):
                    emu.plan(2, 14, 14, C, cl.DTYPE_CODES[dtype], cfg["tile_h"], cfg["tile_w"],
                             cfg["tiles_per_cta"], limit)
    case = Case(80, 9, 10, 1, seed=8)
    cfg = space.candidates(80, torch.float16, (9, 0))[3]
    check(run(case, torch.float16, config=cfg), case, torch.float16, f"config {cfg}")
    with pytest.raises(ValueError, match="unknown cuda.tiles config keys"):
        run(case, torch.float16, config={"BLOCK": 4})
    # the table's entry for this GPU, validated against the candidates
    monkeypatch.setenv("GMF_TUNING_DIR", str(tmp_path))
    tuning.clear_cache()
    (tmp_path / "sm_90.json").write_text('{"kernels": {"cuda.tiles": {"80": {"float16": '
                                         '{"tile_h": 7, "tile_w": 7, "tiles_per_cta": 8, "time_us": 12.5}}}}}')
    try:
        assert cl.resolve_config(80, torch.float16, (9, 0)) == {"tile_h": 7, "tile_w": 7, "tiles_per_cta": 8}
        assert cl.resolve_config(80, torch.float16, (8, 0)) == cl.AUTO          # no sm_80 table
        assert cl.resolve_config(160, torch.float16, (9, 0)) == cl.AUTO         # no entry
        assert cl.resolve_config(80, torch.float16, (9, 0), tile=(4, 4)) == {"tile_h": 4, "tile_w": 4,
                                                                             "tiles_per_cta": 0}
    finally:
        tuning.clear_cache()


# ------------------------------------------------------------------ every barrier is needed
KERNEL_FILES = {"gma_aggregate.cuh": "gma_aggregate_kernel",
                "gma_attention.cuh": "gma_combine_kernel / gma_attention_kernel"}
def _function_of(site: str) -> str:
    """The kernel body (template function) the barrier site lies in."""
    name, line = site.split(":")
    lines = (cbuild.csrc_dir() / name).read_text().splitlines()[:int(line)]
    for text in reversed(lines):
        m = re.match(r"GMF_HD void (\w+)\(", text)
        if m:
            return m.group(1)
    return "?"


def test_barrier_sites_cover_every_kernel():
    sites = cbuild.barrier_sites()
    funcs = {_function_of(s) for s in sites}
    assert {"produce_proxy", "proxy_tile", "local_tile", "aggregate_block", "combine_block",
            "attention_block"} <= funcs, (funcs, sites)
    assert len(sites) >= 12
    # only the kernel files hold barriers (the helpers in gma_device.cuh / gma_mma.cuh have none)
    assert {s.split(":")[0] for s in sites} <= set(KERNEL_FILES), sites


@pytest.mark.parametrize("site", ["gma_attention.cuh:83", "gma_aggregate.cuh:1", "gma_nope.cuh:44", "gma_aggregate"])
def test_skip_sync_must_name_a_barrier(site, tmp_path):
    """emu_skip_sync naming a line that is not a barrier statement (a stale example once named one) is refused
    before any build: it would compile nothing out, and every parity check would pass."""
    with pytest.raises(cbuild.BuildError, match="emu_skip_sync"):
        cbuild.build(out_dir=tmp_path, emulation_only=True, emu_skip_sync=site)
    assert not any(tmp_path.iterdir())


#: small fp32 problems (C, H, W, B, tile, tiles_per_cta): one channel chunk per segment (C=80)
#: and two (C=200, s=40 > 32), which some barriers need to show (the halo of the next chunk);
#: CTAs that walk several tiles and jobs (the barriers between runs and between tiles).
#: Every barrier of the kernels fails at least one of them when removed.
BARRIER_CASES = [(80, 13, 17, 2, (4, 8), 7), (200, 5, 11, 1, (0, 0), 3)]


def _failures(mod, cases):
    """The parity failures of `mod` on `cases` (empty: all pass)."""
    failed = []
    for case, tile, tpc in cases:
        try:
            check(_emulate(mod, case, torch.float32, tile=tile, tiles_per_cta=tpc), case, torch.float32,
                  f"C={case.C} {case.H}x{case.W}")
        except (AssertionError, RuntimeError) as e:
            failed.append(str(e).splitlines()[0][:160])
    return failed


def test_each_barrier_is_needed(emu, emu_build, tmp_path):
    """For every barrier statement of the kernels: the emulation built with that one barrier
    compiled out (GMF_EMU_SKIP_SYNC, never on a GPU) fails the parity check, while the
    unmutated build passes it. A barrier that no check needs is either redundant (remove it
    from the kernel) or a sign of a missing test case."""
    cases = [(Case(C, H, W, B), tile, tpc) for C, H, W, B, tile, tpc in BARRIER_CASES]
    assert not _failures(emu, cases), "the unmutated emulation must pass"
    _, build_dir, _ = emu_build
    sites = cbuild.barrier_sites()
    uncaught, report = [], []
    t0 = time.time()
    for site in sites:
        path = cbuild.build(out_dir=tmp_path / site.replace(":", "_"), emulation_only=True, emu_skip_sync=site,
                            build_dir=build_dir, quiet=True)
        mod = gcuda.load_from(path)
        assert mod.emulation_info()["skip_sync"] == site
        failed = _failures(mod, cases)
        skipped = mod.emulation_info()["skipped"]
        assert skipped > 0, f"{site}: the compiled-out barrier was never reached"
        report.append(f"{site:24} ({_function_of(site)}): skipped {skipped}x -> "
                      + (failed[0] if failed else "ALL PASS"))
        if not failed:
            uncaught.append(site)
    print(f"{len(sites)} barriers, {len(sites) - len(uncaught)} caught, {time.time() - t0:.0f} s\n"
          + "\n".join(report))
    assert not uncaught, ("with these barriers compiled out the emulated kernels still pass: "
                          + ", ".join(uncaught) + "\n" + "\n".join(report))


@pytest.mark.parametrize("tile", [(3, 5), (0, 0)], ids=["3x5", "planned"])
def test_emulated_kernels_propagate_a_nan_token(use_emu, tile):
    """A NaN in one token (an overflow upstream of the layer) makes the softmax over tokens NaN for every token of
    that image, as in the reference: the tile holding it has a NaN softmax sum, which the combine took for an
    empty slot (`l > 0` is false for NaN) and left out, so 96 of 196 tokens of a 14x14 image came out finite and
    wrong. The other image of the batch stays as without the NaN."""
    case = Case(80, 11, 13, 2, seed=7)
    clean = run(case, torch.float32, tile=tile)
    case.x[0, 4 * case.W + 6, :] = float("nan")
    want = reference_group_mix_attention(case.x, (case.H, case.W), case.w, case.hp, return_intermediates=True)[1]
    got = run(case, torch.float32, tile=tile)
    nan_want, nan_got = torch.isnan(want["pre_proj"][0]), torch.isnan(got[0])
    assert nan_want.any(-1).all(), "the oracle: every token of the image NaN"
    assert torch.equal(nan_got, nan_want), (f"{int((nan_want & ~nan_got).any(-1).sum())} tokens finite where the "
                                            f"reference is NaN")
    assert torch.equal(got[1], clean[1])
