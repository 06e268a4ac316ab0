"""Triton kernels of the attention backward (triton_kernels/attention_backward.py: B1 dKV, B2 dQ /
dK / dV with the CRPE input, weight and bias gradients) against the PyTorch stage functions
`backward.b1_dkv` / `backward.b2_proxy_grads` they replace, and compiled for sm_80 / sm_90.

Numerics (Triton interpreter on CPU, the GPU's dot rounding emulated: `_common.mm`; compiled
on a GPU): each stage alone, on fp32 inputs from the fp32 recompute of a random layer, the
layouts `pre_projection_backward` passes (dA a token-major view of grad_pre, Z/V/R
channels-first slices; the kernels compute Q and K from Z). The oracle is the float64 stage
function on those same fp32 values (Q and K = float64 hardswish of the fp32 Z's BatchNorm
affine, Ks = their float64 softmax), so an error is the stage's own arithmetic, not its
inputs' rounding. Rule: error <= 2 x the error of the fp32 PyTorch stage function (measured
here) + ROUNDING_FLOOR. The floor is needed: both errors are a few fp32 ulps (1e-7 .. 6e-7 of
max |x| measured), and their ratio between two correct summation orders ranged 0.3 .. 4.0
over seeds (the 3xTF32 dots drop the small x small term, 2^-22 relative; the interpreter's
token sums are sequential where torch's are pairwise); a wrong tap, head, stride or a
one-pass-TF32 dot is 1e-4 or worse.
"""
import json
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from gmf_kernels.folding import fold_eval  # noqa: E402
from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights  # noqa: E402
from gmf_kernels.triton_kernels import aggregation_backward as agb  # noqa: E402
from gmf_kernels.triton_kernels import attention_backward as ab  # noqa: E402
from gmf_kernels.triton_kernels import backward as bw  # noqa: E402
from gmf_kernels.triton_kernels._common import interpreting  # noqa: E402
from helpers import assert_within_reference_error  # noqa: E402
from helpers import ROOT, assert_compiled_without_spills, have_triton_nvidia_backend, triton_compile_env  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)

#: 16 fp32 unit roundoffs (2^-24) of max |x|: below it two correct summation orders disagree by chance
ROUNDING_FLOOR = 16 * 2.0 ** -24
#: (C, (H, W), B): d = C / 10 = 4, 8, 20 (padded to 16, 16, 32), odd grids
CASES = [(40, (5, 7), 2), (80, (7, 7), 1), (200, (14, 14), 1)]
B2_OUTPUTS = ("dQ", "dK", "dV", "crpe_w3", "crpe_w5", "crpe_w7", "crpe_b")


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel leaves unwritten
    (or reads before writing) reaches the results."""
    from gmf_kernels.triton_kernels import launcher
    monkeypatch.setattr(launcher, "POISON_BUFFERS", True)


def stage_inputs(C, H, W, B, seed=0):
    """The stage functions' inputs at fp32 (fp32 recompute of a random layer) and the same
    values in float64 (Ks recomputed in float64) for the oracle."""
    hp = default_hyper(C)
    gen = torch.Generator().manual_seed(seed)
    w32 = fold_eval(cast_weights(random_gma_weights(C, seed=seed)), hp)
    w32 = type(w32)(*[t.to(DEVICE) for t in w32])
    N, d = H * W, C // 10
    qkv = torch.randn(B, N, 3 * C, generator=gen).to(DEVICE)
    grad_pre = torch.randn(B, N, C, generator=gen).to(DEVICE)
    rc32 = bw.recompute(qkv, H, W, w32, hp.ln_eps)
    w64 = type(w32)(*[t.double() for t in w32])
    rc64 = exact_inputs(rc32, w64, B)

    def views(g, P):   # as pre_projection_backward takes them
        return g[..., :8 * d].transpose(1, 2).reshape(B, 8, d, N), P[:B].reshape(B, 8, d, N)

    dA32, Q32 = views(grad_pre, rc32["P"])
    dA64, Q64 = views(grad_pre.double(), rc64["P"])
    return dict(scale=hp.scale, w32=w32, w64=w64, rc32=rc32, rc64=rc64, dA32=dA32, Q32=Q32, Zq32=views(grad_pre, rc32["Z"])[1],
                dA64=dA64, Q64=Q64)


def proxies(Z, V, w, B):
    """P (3B, C', H, W) as the kernels take it, in Z's dtype: q's and k's proxies hardswish(Z a + b)
    of Z's first 2B images (computed in that dtype), then V itself."""
    a, b = (t.reshape(-1)[:, None, None].to(Z.dtype) for t in (w.bn_scale, w.bn_shift))
    return torch.cat([torch.nn.functional.hardswish(Z[:2 * B] * a + b), V.to(Z.dtype)])


def exact_inputs(rc, w64, B):
    """rc's Z, V, KV, R (any dtype) in float64, with the proxies P and Ks the stages read computed
    from them in float64 (w64: the weights in float64)."""
    out = {k: rc[k].double() for k in ("Z", "V", "KV", "R")}
    out["P"] = proxies(out["Z"], out["V"], w64, B)
    N = out["Z"].shape[-1] * out["Z"].shape[-2]
    out["Ks"] = torch.softmax(out["P"][B:2 * B].reshape(B, 8, -1, N), dim=-1)
    return out


def b2_outputs(res, B):
    """(dQ, dK, dV, crpe_w3, crpe_w5, crpe_w7, crpe_b) of a b2_proxy_grads result."""
    dP, g_w, g_b = res
    return [dP[j * B:(j + 1) * B] for j in range(3)] + list(g_w) + [g_b]


#: the CRPE weight gradient's tile with a block (`test_split_runs_of_tiles`): every program walks all the
#: pixel tiles (one split), 8-channel blocks (the 12-channel windows' last one partly masked)
MULTI_TILE = agb.BackwardTiles(BLOCK_C=8, BLOCK_P=16, WARPS=4, PW_BLOCK_P=16, PW_WARPS=4, TARGET_PROGRAMS=1)


def check_stages(x, B, block=0, crpe_tile=None):
    """B1, then B2 fed the oracle's dKV rounded to fp32 (each stage checked alone); with a block, the
    CRPE weight gradient's programs over several tiles too (`MULTI_TILE`); crpe_tile: the CRPE kernel's
    ("triton.b2_crpe" tile, e.g. a row walk's)."""
    s = x["scale"]
    oracle = bw.b1_dkv(x["Q64"], x["dA64"], s)
    got = ab.b1_dkv(x["Zq32"], x["dA32"], s, x["w32"].bn_scale, x["w32"].bn_shift, block=block)
    assert got.dtype == torch.float32
    assert_within_reference_error(got, bw.b1_dkv(x["Q32"], x["dA32"], s), oracle, floor=ROUNDING_FLOOR,
                                  name="B1 dKV")
    dKV = oracle.float()
    exp = b2_outputs(bw.b2_proxy_grads(x["dA64"], oracle, x["rc64"], x["w64"], s), B)
    ref = b2_outputs(bw.b2_proxy_grads(x["dA32"], dKV, x["rc32"], x["w32"], s), B)
    got = b2_outputs(ab.b2_proxy_grads(x["dA32"], dKV, x["rc32"], x["w32"], s, block=block,
                                       wgrad_tiles=MULTI_TILE if block else None, tiles=(None, crpe_tile)), B)
    for name, g, r, e in zip(B2_OUTPUTS, got, ref, exp):
        assert g.dtype == torch.float32, name
        assert_within_reference_error(g, r, e, floor=ROUNDING_FLOOR, name=f"B2 {name}")


@pytest.mark.parametrize("C, grid, B", CASES, ids=[f"C{c}-{h}x{w}-B{b}" for c, (h, w), b in CASES])
def test_stages_match_pytorch(C, grid, B):
    check_stages(stage_inputs(C, *grid, B, seed=C), B)


def test_split_runs_of_tiles(monkeypatch):
    """GPU-sized 16-token tiles, 3 tiles, split-N into 2 runs of up to 2 tiles: the partial sums
    of B1 and of the CRPE kernel's bias gradient, a ragged last tile; the CRPE weight gradient's
    programs walk the 3 tiles (`MULTI_TILE`)."""
    monkeypatch.setattr(ab, "SPLIT_TARGET", 16)
    assert ab._split_plan(33, 1, 16) == (2, 2)
    check_stages(stage_inputs(40, 3, 11, 1, seed=3), 1, block=16)


def check_fused_batchnorm(x, B, training, block=0, crpe_tile=None):
    """B2 with the BatchNorm/hardswish backward fused in (`b2_proxy_grads(bn=...)`, as the Triton
    stage set runs it): G = dP hardswish'(Z a + b), the CRPE gradients and the BatchNorm sums
    sum G, sum G Z, sum G Zhat (training: batch statistics; eval: None) against
    `backward.b2_proxy_grads` + `backward.b2_bn_sums` in float64, under the same rule."""
    s = x["scale"]
    dKV64 = bw.b1_dkv(x["Q64"], x["dA64"], s)
    dKV = dKV64.float()
    Z32 = x["rc32"]["Z"]
    if training:
        var, mean = torch.var_mean(Z32, dim=(0, 2, 3), unbiased=False)
        stats32 = (mean, torch.rsqrt(var + 1e-5))
    else:
        stats32 = (None, None)
    stats64 = tuple(None if t is None else t.double() for t in stats32)
    rc64 = dict(x["rc64"], Z=Z32.double(), pre_act=x["rc32"]["pre_act"].double())

    def reference(dA, dkv, rc, w, stats):
        dP, g_w, g_b = bw.b2_proxy_grads(dA, dkv, rc, w, s)
        G, *sums = bw.b2_bn_sums(dP, rc, *stats)
        return [G[j * B:(j + 1) * B] for j in range(3)] + list(g_w) + [g_b] + sums

    exp = reference(x["dA64"], dKV64, rc64, x["w64"], stats64)
    ref = reference(x["dA32"], dKV, x["rc32"], x["w32"], stats32)
    G, g_w, g_b, sums = ab.b2_proxy_grads(x["dA32"], dKV, x["rc32"], x["w32"], s, block=block, bn=stats32,
                                          tiles=(None, crpe_tile))
    got = [G[j * B:(j + 1) * B] for j in range(3)] + list(g_w) + [g_b] + list(sums)
    names = ("Gq", "Gk", "Gv", "crpe_w3", "crpe_w5", "crpe_w7", "crpe_b", "sum_g", "sum_gz", "sum_gzh")
    for name, g, r, e in zip(names, got, ref, exp):
        if e is None:
            assert g is None, name
            continue
        assert g.dtype == torch.float32, name
        assert_within_reference_error(g, r, e, floor=ROUNDING_FLOOR, name=f"B2+BatchNorm {name}")


@pytest.mark.parametrize("training", [True, False], ids=["batch-stats", "running-stats"])
def test_b2_fused_batchnorm(training):
    check_fused_batchnorm(stage_inputs(80, 7, 7, 1, seed=5), 1, training)


def test_b2_fused_batchnorm_split_runs(monkeypatch):
    """As `test_split_runs_of_tiles`: 16-token tiles, the sums' partials of several programs."""
    monkeypatch.setattr(ab, "SPLIT_TARGET", 16)
    check_fused_batchnorm(stage_inputs(40, 3, 11, 2, seed=3), 2, True, block=16)


#: (C, (H, W), B, CRPE row-walk tile, BatchNorm fused: None, "batch" or "running"): 16-column strips of a
#: 21-column grid (a ragged strip, runs of 7 rows that end inside a strip and cross into the next), a grid
#: shorter than the 7x7 reach (5 rows, one run), D_PAD 32 at 32-column strips
CRPE_ROWS_CASES = [(40, (9, 21), 2, (16, 4, 1), "batch"), (80, (5, 7), 1, (16, 4, 1), "running"),
                   (200, (14, 14), 1, (32, 4, 1), None)]


@pytest.mark.parametrize("C, grid, B, tile, bn", CRPE_ROWS_CASES,
                         ids=[f"C{c}-{h}x{w}-B{b}-{t[0]}-{bn}" for c, (h, w), b, t, bn in CRPE_ROWS_CASES])
def test_crpe_row_walks(C, grid, B, tile, bn):
    """The CRPE backward's row walks (`gma_b2_crpe_kernel` with ROWS: the GPU default at D_PAD 16, elsewhere
    "triton.b2_crpe" candidates):
    dV (or G), the bias gradient and the fused BatchNorm's sums against float64 under the rule, and the
    runs as planned (`crpe_rows_plan`: at least 7 rows, crossing strips)."""
    H, W = grid
    splits, tps = ab.crpe_rows_plan(H, W, B, tile[0])
    assert tps >= min(7, H * -(-W // tile[0])) and splits * tps >= H * -(-W // tile[0]) > (splits - 1) * tps
    x = stage_inputs(C, H, W, B, seed=C + 7)
    if bn is None:
        check_stages(x, B, crpe_tile=tile)
    else:
        check_fused_batchnorm(x, B, bn == "batch", crpe_tile=tile)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_b1_low_precision_inputs(dtype):
    """fp16 / bf16 Zq, dA (the kernels load fp32, fp16 or bf16 and accumulate in fp32; Q =
    hardswish(Zq a + b) in fp32, then the dtype's dots: one TF32 pass): dKV within 2x the error
    of the PyTorch stage at that dtype (Q computed in it, then an fp32 product) + the floor;
    oracle: the same Zq, dA in float64."""
    x = stage_inputs(40, 5, 7, 1, seed=1)
    s, w32, w64 = x["scale"], x["w32"], x["w64"]
    Zq, dA = x["Zq32"].to(dtype), x["dA32"].to(dtype)

    def q_of(zq, w):     # Q (B, 8, d, N) computed in zq's dtype
        a, b = (t.reshape(1, 8, -1, 1).to(zq.dtype) for t in (w.bn_scale, w.bn_shift))
        return torch.nn.functional.hardswish(zq * a + b)
    oracle = bw.b1_dkv(q_of(Zq.double(), w64), dA.double(), s)
    got = ab.b1_dkv(Zq, dA, s, w32.bn_scale, w32.bn_shift)
    assert got.dtype == torch.float32
    assert_within_reference_error(got, bw.b1_dkv(q_of(Zq, w32).float(), dA.float(), s), oracle, floor=ROUNDING_FLOOR,
                                  name=f"B1 dKV from {dtype}")


def test_b2_float16_inputs():
    """fp16 dA, Z, V, KV, R (bf16 loads take the same `.to(tl.float32)` path): dP = [dQ; dK; dV] in
    the stage dtype (Z's), the CRPE weight gradients fp32, every output within 2x the error of the PyTorch stage function at float16 (its dots' fp32 operands KV, dKV,
    Ks go through one TF32 pass for these inputs, `config.ARCH_DOTS`). Measured over 5 seeds: dK and
    dV 0.25-1.2x the reference's error (TF32 operands, 2^-11, about fp16's rounding), the rest 1000x below."""
    B, dtype = 1, torch.float16
    x = stage_inputs(40, 5, 7, B, seed=1)
    s = x["scale"]
    dA = x["dA32"].to(dtype)
    dKV = bw.b1_dkv(x["Q64"], x["dA64"], s)
    rc = {k: x["rc32"][k].to(dtype) for k in ("Z", "V", "KV", "R")}
    rc64 = exact_inputs(rc, x["w64"], B)
    w16 = type(x["w64"])(*[w.to(dtype) for w in x["w64"]])
    rc["P"] = proxies(rc["Z"], rc["V"], w16, B)                    # the fp16 reference's own proxies and Ks
    rc["Ks"] = torch.softmax(rc["P"][B:2 * B].float().reshape(dKV.shape[:3] + (-1,)), dim=-1).to(dtype)
    exp = b2_outputs(bw.b2_proxy_grads(dA.double(), dKV, rc64, x["w64"], s), B)
    ref = b2_outputs(bw.b2_proxy_grads(dA, dKV.to(dtype), rc, w16, s), B)
    got = b2_outputs(ab.b2_proxy_grads(dA, dKV.float(), rc, x["w32"], s), B)
    for name, g, r, e in zip(B2_OUTPUTS, got, ref, exp):
        # dP in P's dtype (the stage dtype, `config.stage_dtype`), the CRPE weight gradients fp32
        assert g.dtype == (dtype if name in ("dQ", "dK", "dV") else torch.float32), name
        assert_within_reference_error(g, r, e, floor=ROUNDING_FLOOR, name=f"B2 {name} from {dtype}")


_AOT_SCRIPT = r"""
import json
from gmf_kernels.triton_kernels import specializations as sp

call = sp.Call(C=320, H=14, W=14, B=128, dtype="fp32")      # GroupMixFormer-S, stage 3
out = []
for arch in (80, 90):
    for spec in sp.backward_specializations_of_call(call, arch):   # the JIT's own specialisation
        rep = sp.compile_one(spec)
        rep["kernel"] = spec.kernel
        out.append(rep)
print(json.dumps(out))
"""


def test_compiles_without_spills(tmp_path):
    """Each kernel at the specialisation a real call makes (GroupMixFormer-S C=320 at 14x14,
    batch 128, fp32: plan_b1 / plan_b2 (the BatchNorm backward fused in: batch and running
    statistics; the CRPE weight gradient's launches of the depthwise weight-gradient kernel) on meta tensors in pre_projection_backward's layouts, then
    Triton's JIT binder), compiled for sm_80 and sm_90 into an empty cache: zero spills (ptxas -v)."""
    if not have_triton_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    env = triton_compile_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"compile script failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1])
    # B2's two kernels and the CRPE weight gradient's three windows (the depthwise weight-gradient kernel)
    # twice: the BatchNorm backward fused in with batch and with running statistics
    kernels = ("gma_b1_dkv_kernel",) + ("gma_b2_attention_kernel", "gma_b2_crpe_kernel") * 2 \
        + ("gma_dw_wgrad_kernel",) * 6
    assert sorted((r["kernel"], r["arch"]) for r in res) == sorted((k, a) for k in kernels for a in (80, 90))
    for r in res:
        assert_compiled_without_spills(r)
        assert (r["tf32_conversions"] > 0) == (r["kernel"] == "gma_b1_dkv_kernel" or r["kernel"] == "gma_b2_attention_kernel"), r   # 3xTF32 dots
        assert "N%16" not in r["specialised"].split(), r


_CRPE_ROWS_AOT_SCRIPT = r"""
import json
import gmf_kernels.triton_kernels.specializations as sp
from gmf_kernels.triton_kernels import attention_backward as ab
from gmf_kernels.triton_kernels.config import dot_pad
from gmf_kernels.triton_kernels.specializations import Call
out, seen = [], set()
for C, H in ((160, 28), (320, 14)):
    for tile in ab.CRPE_ROWS_TILES[dot_pad(C // 10)]:
        for spec in sp.backward_specializations_of_call(Call(C, H, H, 128, "fp16"), 90, False, {ab.CRPE_FAMILY: tile}):
            if spec.kernel == "gma_b2_crpe_kernel" and spec.key not in seen:
                seen.add(spec.key)
                rep = sp.compile_one(spec)
                rep["rows"], rep["tile"] = dict(spec.constexprs).get("ROWS"), [C] + list(tile)
                out.append(rep)
print(json.dumps(out))
"""


def test_crpe_rows_candidates_compile_without_spills_on_sm90(tmp_path):
    """Every launch of `gma_b2_crpe_kernel` that a `CRPE_ROWS_TILES` candidate makes in a training step's
    backward of GroupMixFormer-S's C = 160 and 320 layers (fp16, batch 128: batch and running statistics),
    compiled for sm_90: ROWS in the specialisation, no spill ((32, 4) at D_PAD 32 reached 255 registers and
    spilled on sm_80; the tuner would refuse such a candidate on the GPU)."""
    from helpers import aot_reports, assert_compiled_without_spills
    reps = aot_reports(_CRPE_ROWS_AOT_SCRIPT, tmp_path)
    assert len(reps) == 8, reps
    for r in reps:
        print(f"{r['tile']}: {r['registers']} registers, spills {r['spill_stores']} B")
        assert r["rows"] is True, r
        assert_compiled_without_spills(r)
