"""Triton kernels of the aggregation-side backward (triton_kernels/aggregation_backward.py; issue 10
item 2) against the PyTorch stage functions of triton_kernels/backward.py.

Per case (C, odd grid, batch, batch statistics or not): the stage inputs come from
`backward.recompute` on a random qkv with random folded weights (the training path's
folding, `fold_batch_stats` / `fold_running_stats`), all in float64; the float64 stage
function is the oracle, and each kernel, run on the fp32 copies of the same inputs, must be
within 2x the fp32 stage function's own error against that oracle (+ FLOOR), errors as
max |x - oracle| / max |oracle| per output (`helpers.assert_within_reference_error`). Under
the Triton interpreter (tests/conftest.py) the kernels' dots are rounded as the GPU rounds
them (`_common.mm`, EMULATE_DOTS; tests/test_triton_dot_emulation.py).

Stages: b3_dz, b3_pointwise_depthwise, b3_fused (b3_dz + b3_pointwise_depthwise with dZ formed
in the pointwise kernel) and local_backward (B2's BatchNorm backward, G and its sums, is fused
into the B2 kernels: tests/test_triton_attention_backward.py). The stage tensors of fp16/bf16
layers (`config.stage_dtype`) are checked too, per case: b3_fused and local_backward on stage
tensors in fp16 and bf16, against the fp32 stage functions on the same
rounded inputs with the kernels' dots and roundings (dy, dw4, the outputs), under the same rule.

The ahead-of-time check compiles every new kernel at the specialisation of a real call
(GroupMixFormer-S's C=320 at 14x14, batch 128, an fp16 layer, training) for sm_80 and sm_90 in a
subprocess without TRITON_INTERPRET (as tests/test_triton_compile.py does) and asserts zero
register spills (ptxas -v).

The depthwise input gradient's row walks (DW_ROWS, the GPU default of "triton.backward"): against the
float64 adjoint into a buffer and into the qkv gradient's places, with runs that end inside a strip and
cross strips and images; their launches compiled for sm_90 without a spill.
"""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from gmf_kernels.folding import _build, fold_batch_stats  # noqa: E402
from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights  # noqa: E402
from gmf_kernels.training import fold_running_stats  # noqa: E402
from gmf_kernels.triton_kernels import aggregation_backward as agb  # noqa: E402
from gmf_kernels.triton_kernels import backward as bw  # noqa: E402
from gmf_kernels.triton_kernels._common import dot_variant, interpreting  # noqa: E402
from helpers import assert_within_reference_error, tf32_round  # noqa: E402
from helpers import ROOT, have_triton_nvidia_backend, known_miscompiles, triton_compile_env  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)

#: absolute part of the rule, relative to max |oracle|, about twice the 3xTF32 dots' own error
#: (they drop the small x small product: 2^-22 relative per product, `_common.mm`): g_pw sums
#: dz y over pixels in such dots and lands at 2-3x torch's fp32 error (measured 6.4e-7 against
#: 2.2e-7 at C=80, 7x7, B=2), and where the fp32 stage function is exact (du_0 is dZ itself)
#: the kernels still round once
FLOOR = 5e-7

#: (C, (H, W), B, batch statistics, GPU tiles): every C, grid, batch and mode at least once
#: (few cases: the file's time budget). Under the interpreter the launchers use one large tile
#: (`aggregation_backward.backward_tiles`); 14x14 takes two there (two splits: the partial sums
#: are combined), B = 1 makes the u_j strided views of qkv (no copy), C = 200 (s = 40, padded
#: to 64) runs the pointwise kernels in two output-channel blocks. The last case runs the GPU
#: tiles under the interpreter: 16-channel blocks (the last one partly masked at s = 40), 16-
#: and 128-pixel tiles, many splits.
CASES = [(40, (5, 7), 1, True, False), (80, (7, 7), 2, False, False), (200, (14, 14), 1, True, False),
         (200, (5, 7), 1, True, True), (360, (5, 6), 1, True, False), (480, (3, 5), 1, False, True)]
IDS = [f"C{c}-{h}x{w}-B{b}-{'train' if t else 'eval'}{'-gpu_tiles' if gt else ''}" for c, (h, w), b, t, gt in CASES]


def _fp32(x):
    """fp32 copy on DEVICE of a tensor, a list of tensors, a dict of them, or folded weights."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: _fp32(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_fp32(t) for t in x]
    if isinstance(x, tuple):
        return type(x)(*[_fp32(t) for t in x])
    return x.to(device=DEVICE, dtype=torch.float32)


class Problem:
    """One case: float64 stage inputs and oracle outputs; `.f32` copies of the inputs."""

    def __init__(self, C, grid, B, training, gpu_tiles, seed):
        self.gpu_tiles = gpu_tiles
        H, W = grid
        hp = default_hyper(C)
        w = cast_weights(random_gma_weights(C, seed=seed))
        g = torch.Generator().manual_seed(seed + 1)
        qkv = torch.randn(B, H * W, 3 * C, dtype=torch.float64, generator=g)
        with torch.no_grad():
            if training:
                z = torch.zeros(1, dtype=torch.float64)
                self.mean, var, _ = bw.statistics(qkv, H, W, _build(w, z, z, torch.float64))
                self.rstd = torch.rsqrt(var + hp.bn_eps)
                folded = fold_batch_stats(w, self.mean, var, hp, torch.float64)
            else:
                self.mean = self.rstd = None
                folded = fold_running_stats(w, hp, torch.float64)
            self.wts = type(folded)(*[t.detach() for t in folded])
            self.rc = bw.recompute(qkv, H, W, self.wts, hp.ln_eps)
        self.qkv = qkv
        s = C // 5
        self.dP = torch.randn(3 * B, 4 * s, H, W, dtype=torch.float64, generator=g)
        self.count = 3 * B * H * W
        self.G, self.sum_g, self.sum_gz, self.sum_gzh = bw.b2_bn_sums(self.dP, self.rc, self.mean, self.rstd)
        self.dZ = bw.b3_dz(self.G, self.rc, self.wts, self.mean, self.rstd, self.sum_g, self.sum_gzh, self.count)
        # the local branch's gradient as pre_projection_backward slices it from grad_pre: a strided view
        grad_pre = torch.randn(B, H * W, C, dtype=torch.float64, generator=g)
        self.dL = grad_pre[..., 4 * s:].transpose(1, 2).reshape(B, s, H, W)

    def dz_args(self, convert):
        """(mean, rstd, sum_g, sum_gzh, count) of b3_dz / b3_fused, each through `convert`."""
        return (convert(self.mean), convert(self.rstd), convert(self.sum_g), convert(self.sum_gzh), self.count)


@pytest.fixture(scope="module", params=list(zip(CASES, range(len(CASES)))), ids=IDS)
def problem(request):
    return Problem(*request.param[0], seed=100 + request.param[1])


def with_dtypes(dtypes, names):
    """(problem, dtype) parameters of a dtype-parametrised test: every dtype on each case with the
    interpreter's tiles; one dtype on each GPU-tile case, taken in turn (the GPU tiles' many small
    programs cost the interpreter 10-30 s a call: every dtype still runs them once while there are
    as many GPU-tile cases as dtypes)."""
    out, k = [], 1   # from the second dtype: the pairing the interpreter runs fastest (C = 480 at the first)
    for i, case in enumerate(CASES):
        chosen = range(len(dtypes))
        if case[4]:
            chosen, k = [k % len(dtypes)], k + 1
        out += [pytest.param((case, i), dtypes[j], id=f"{IDS[i]}-{names[j]}") for j in chosen]
    return out


@pytest.fixture
def prob(problem, monkeypatch):
    """The case, with the launchers planning GPU tiles under the interpreter where it asks so."""
    if problem.gpu_tiles:
        monkeypatch.setattr(agb, "interpreting", lambda: False)
    return problem


def check(got, ref32, oracle, name):
    """Every output: the kernel within 2x the fp32 stage function's error (+ FLOOR)."""
    if isinstance(oracle, (list, tuple)):
        assert len(got) == len(oracle), name
        for k, (a, r, o) in enumerate(zip(got, ref32, oracle)):
            check(a, r, o, f"{name}[{k}]")
        return
    if oracle is None:
        assert got is None, f"{name}: expected None"
        return
    assert got.dtype == torch.float32 and got.shape == oracle.shape, (name, got.dtype, got.shape)
    assert_within_reference_error(got.cpu(), ref32.cpu(), oracle, factor=2.0, floor=FLOOR, name=name)


def test_b3_dz(prob):
    rc32, wts32 = _fp32(prob.rc), _fp32(prob.wts)
    ref32 = bw.b3_dz(_fp32(prob.G), rc32, wts32, *prob.dz_args(_fp32))
    got = agb.b3_dz(_fp32(prob.G), rc32, wts32, *prob.dz_args(_fp32))
    check(got, ref32, prob.dZ, "b3_dz")


def test_b3_pointwise_depthwise(prob):
    """Input gradients of segments 0..3 and the depthwise / pointwise weight gradients from dZ."""
    rc32, wts32 = _fp32(prob.rc), _fp32(prob.wts)
    oracle = bw.b3_pointwise_depthwise(prob.dZ, prob.rc, prob.wts)
    ref32 = bw.b3_pointwise_depthwise(_fp32(prob.dZ), rc32, wts32)
    got = agb.b3_pointwise_depthwise(_fp32(prob.dZ), rc32, wts32)
    check(got, ref32, oracle, "b3_pointwise_depthwise")


def test_b3_fused(prob):
    """B3 from G: dZ formed in the pointwise kernel's prologue (S_PAD <= 64), or written first (S_PAD
    128, `FUSED_B3_MAX_S_PAD`): the same outputs as b3_dz followed by
    b3_pointwise_depthwise (fp32 reference: those two stage functions in fp32)."""
    rc32, wts32 = _fp32(prob.rc), _fp32(prob.wts)
    oracle = bw.b3_pointwise_depthwise(prob.dZ, prob.rc, prob.wts)
    dz32 = bw.b3_dz(_fp32(prob.G), rc32, wts32, *prob.dz_args(_fp32))
    ref32 = bw.b3_pointwise_depthwise(dz32, rc32, wts32)
    got = agb.b3_fused(_fp32(prob.G), rc32, wts32, *prob.dz_args(_fp32))
    check(got, ref32, oracle, "b3_fused")


def test_local_backward(prob):
    """The local branch: hardswish, LayerNorm, 3s -> s pointwise, depthwise 3x3 (dL a strided view)."""
    rc32, wts32 = _fp32(prob.rc), _fp32(prob.wts)
    dL32 = _fp32(prob.dL)
    assert not dL32.is_contiguous()
    oracle = bw.local_backward(prob.dL, prob.rc, prob.wts)
    ref32 = bw.local_backward(dL32, rc32, wts32)
    got = agb.local_backward(dL32, rc32, wts32)
    check(got, ref32, oracle, "local_backward")


@pytest.mark.parametrize("problem, dtype", with_dtypes([torch.float32, torch.bfloat16], ["fp32", "bf16"]),
                         indirect=["problem"])
def test_input_gradients_into_d_qkv(prob, dtype):
    """The Triton stage set's way (recompute.py's rc, ``into_d_qkv``): b3_fused and local_backward
    reading the depthwise inputs from qkv itself (rc["qkv"], `qkv_layout`; qkv in `dtype`, no u_j
    copies) and storing their input gradients straight into the qkv gradient (B, N, 3C), in its
    dtype, equal to the same kernels' gradients from the copies rc["u"] / rc["u4"] (of the same
    values), assembled as `pre_projection_backward` does without d_qkv (`backward.qkv_from_streams`,
    then the cast: the same fp32 values, the platform's rounding); every element written (the
    buffer starts as NaN); the weight gradients equal."""
    qkv = prob.qkv.to(device=DEVICE, dtype=dtype)
    rc = dict(prob.rc)
    rc["u"] = [None] + [t.to(dtype).double() for t in rc["u"][1:]]          # the copies, of qkv's values
    rc["u4"] = rc["u4"].to(dtype).double()
    rc32, wts32 = _fp32(rc), _fp32(prob.wts)
    G32, dL32 = _fp32(prob.G), _fp32(prob.dL)
    B, s, H, W = dL32.shape
    du, g_dw, g_pw = agb.b3_fused(G32, rc32, wts32, *prob.dz_args(_fp32))
    du4, *g_local = agb.local_backward(dL32, rc32, wts32)
    seg = torch.stack(du, dim=1).view(3, B, 4, s, H, W)
    loc = du4.view(B, 3, s, H, W).transpose(0, 1)[:, :, None]
    expect = bw.qkv_from_streams(torch.cat([seg, loc], dim=2))
    expect = expect.to(dtype)   # round to nearest even: the GPU's, and `_common.stored`'s under the interpreter
    d_qkv = torch.full((B, H * W, 15 * s), float("nan"), dtype=dtype, device=DEVICE)
    rq = {k: v for k, v in rc32.items() if k not in ("u", "u4")}
    rq["qkv"] = qkv
    none, g_dw2, g_pw2 = agb.b3_fused(G32, rq, wts32, *prob.dz_args(_fp32), d_qkv=d_qkv)
    none4, *g_local2 = agb.local_backward(dL32, rq, wts32, d_qkv=d_qkv)
    assert none == [None] * 4 and none4 is None
    torch.testing.assert_close(d_qkv, expect, rtol=0, atol=0)
    for a, b in zip(g_dw2 + [g_pw2] + g_local2, g_dw + [g_pw] + g_local):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ ahead-of-time compile, real shape
_AOT_SCRIPT = r"""
import json, sys, torch
from gmf_kernels.folding import FoldedGMAWeights, weight_shapes
from gmf_kernels.triton_kernels import aggregation_backward as agb, backward as bw, specializations as sp
from gmf_kernels.triton_kernels._common import DotVariant
from gmf_kernels.triton_kernels.config import DOT_OVERRIDES, capability_of_arch, dot_precision, stage_dtype

C, H, W, B = 320, 14, 14, 128                    # GroupMixFormer-S, stage 3, batch 128, fp16, training
meta = dict(device="meta")
shapes = weight_shapes(C)
wts = FoldedGMAWeights(*(torch.empty(shapes[n], **meta) for n in FoldedGMAWeights._fields))
rc = bw.recompute(torch.empty(B, H * W, 3 * C, **meta), H, W, wts, 1e-5)   # the real layouts of Z, u, y
DT = getattr(torch, sys.argv[1].split(":")[0])   # float16; float32 for the dot overrides' check
if sys.argv[1].endswith(":no-overrides"):        # float32 without them: the miscompile check's control
    DOT_OVERRIDES.clear()
ONLY_DOTS = DT == torch.float32                  # then only the kernels with dots (config.DOT_OVERRIDES)
sd = stage_dtype(DT)                             # ... and the stage tensors' dtype of the layer
rc = {k: [t.to(sd) for t in v] if isinstance(v, list) else v.to(sd) if k in ("Z", "w4", "xh4") else v
      for k, v in rc.items()}
stats = torch.empty(4, C // 5, **meta)
out, seen = [], set()
for arch in map(int, sys.argv[2:]):
    dots = DotVariant(dot_precision("fp16" if DT == torch.float16 else "fp32", capability_of_arch(arch)), False)
    d_qkv = torch.empty(B, H * W, 3 * C, dtype=DT, **meta)   # the input gradient of the inputs
    qkv = torch.empty(B, H * W, 3 * C, dtype=DT, **meta)     # and the inputs, read in place
    for fn, grid, args, kwargs in agb.plan_stages(torch.empty_like(rc["Z"]), rc, wts, stats, stats, dots, d_qkv, qkv):
        if ONLY_DOTS and "DOT_PRECISION" not in kwargs:
            continue
        spec = sp.specialize_launch(fn, arch, args, kwargs)
        if spec.key not in seen:
            seen.add(spec.key)
            out.append(sp.compile_one(spec))
print(json.dumps(out))
"""


def _aot_compile(dtype, archs, env):
    """`_AOT_SCRIPT`'s records for a layer of this dtype, one process per architecture, side by side (two cores)."""
    procs = [subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT, dtype, str(arch)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for arch in archs]
    res = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        lines = [ln for ln in out.splitlines() if ln.startswith("[")]
        assert lines, f"compile script failed (rc={proc.returncode}):\n{err[-3000:]}"
        res += json.loads(lines[-1])
    return res


def _no_spills(res):
    for r in res:
        print(f"{r['label']} sm_{r['arch']}: {r['registers']} registers, spill stores {r['spill_stores']} B, "
              f"loads {r['spill_loads']} B, stack {r['stack']} B")
    bad = [r["label"] + f" sm_{r['arch']}" for r in res
           if r["registers"] <= 0 or r["registers"] > 255 or r["spill_stores"] or r["spill_loads"] or r["stack"]
           or r.get("cuobjdump_local", 0)]
    assert not bad, f"register spills or unparsed ptxas report: {bad}"
    miscompiled = known_miscompiles(res)
    assert not miscompiled, "\n".join(miscompiled)
    assert all(r["line_info"] for r in res)


def test_aot_compile_real_shape_no_spills(tmp_path):
    """Each new kernel, at the specialisation the launchers make for C=320, 14x14, batch 128,
    an fp16 layer with batch statistics (fp16 stage tensors, `config.stage_dtype`, and fp16's dots;
    fused and unfused B3: pointwise DZ_MODE 0 and 2; the stencil at 3x3, 5x5, 7x7 over s channels
    and 3x3 over the local branch's 3s; the local branch; the input-gradient stores into the fp16
    qkv gradient), compiles for sm_80 and sm_90 with no register spills (-s prints the figures).
    fp32 layers' kernels are the same code on fp32 pointers (every real call of every dtype:
    `benchmarks/triton_resources.py --backward`, results/triton_backward_resources_*.md)."""
    if not have_triton_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    env = triton_compile_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")           # really compile
    # one process per architecture, side by side (two cores)
    res = _aot_compile("float16", (80, 90), env)
    assert sorted({(r["function"], r["arch"]) for r in res}) == sorted((f.__name__, a) for f in agb.KERNELS
                                                                      for a in (80, 90))
    # per arch: dz, pw x 2 modes, local; the input-gradient stencil over s and 3s channels (the local
    # branch's); into the fp16 d_qkv: dz, the stencil x 2; the weight-gradient kernel at 3x3, 5x5, 7x7 over s
    # channels and 3x3 over 3s, its u from a stage buffer and from qkv (x 8)
    assert len(res) == 2 * 17
    _no_spills(res)


def test_aot_compile_dot_overrides_no_spills(tmp_path):
    """The kernels `config.DOT_OVERRIDES` moves to fp32 FMA dots (the channel-mix backward kernels
    of an fp32 layer at S_PAD = 64: C = 320 here) compile for sm_80 and sm_90 with that variant
    and no register spills."""
    if not have_triton_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    env = triton_compile_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = _aot_compile("float32", (80, 90), env)
    names = {r["function"] for r in res}
    assert {"gma_pw_backward_kernel", "gma_local_backward_kernel"} <= names, names
    _no_spills(res)


def test_aot_check_flags_the_dots_dot_overrides_moves(tmp_path):
    """The AOT compiles' miscompile check (`specializations.known_miscompile`, which every AOT test applies)
    sees the pattern `config.DOT_OVERRIDES` exists for: with the overrides taken away, the channel-mix
    backward kernels of an fp32 layer at C = 320 (S_PAD = 64) compile with 3xTF32 dots that take their
    [64, BLOCK_P] tile as both operands, and each is flagged on sm_90; with the overrides (the test above)
    none is."""
    if not have_triton_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    env = triton_compile_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = _aot_compile("float32:no-overrides", (90,), env)
    assert {r["dot_precision"] for r in res} == {"tf32x3"}
    flagged = {r["function"] for r in res if r["known_miscompile"]}
    assert flagged == {"gma_pw_backward_kernel", "gma_local_backward_kernel"}, [
        (r["label"], r["tf32x3_dual_operands"]) for r in res]
    assert all(r["tf32x3_dual_operands"] == ["tensor<64x16xf32>"] for r in res if r["known_miscompile"])


def _cast(x, dtype):
    """`_fp32` to another dtype (the stage tensors of an fp16/bf16 layer, `config.stage_dtype`)."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    if isinstance(x, list):
        return [_cast(t, dtype) for t in x]
    return x.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("problem, dtype", with_dtypes([torch.float16, torch.bfloat16], ["fp16", "bf16"]),
                         indirect=["problem"])
def test_stage_tensors_in_low_precision(prob, dtype):
    """The kernels on the stage tensors of an fp16/bf16 layer (`config.stage_dtype`: dP, Z, y, u,
    w4, xh4 and dL in `dtype`; rstd4 and the folded weights fp32): b3_fused (from G in `dtype`) and
    local_backward, their stage-tensor outputs (du) in `dtype`, the sums and weight gradients
    fp32, each within 2x the error of the reference at that precision (the fp32 stage functions
    on the same rounded inputs, their stage-tensor outputs rounded to `dtype` as the kernels
    store them) against the float64 oracle on the unrounded inputs (+ FLOOR)."""
    rc = {k: v for k, v in prob.rc.items() if k != "pre_act"}
    rc_lp = _cast(rc, dtype)
    rc_lp["rstd4"] = _fp32(prob.rc["rstd4"])
    rc_r = _fp32(rc_lp)                                      # the same rounded values, fp32
    wts32, stats = _fp32(prob.wts), (_fp32(prob.mean), _fp32(prob.rstd))
    rc_r["pre_act"] = rc_r["Z"] * wts32.bn_scale.reshape(-1)[:, None, None] + wts32.bn_shift.reshape(-1)[:, None, None]
    dP_lp, dL_lp = _cast(prob.dP, dtype), _cast(prob.dL, dtype)

    def compare(got, ref, oracle, name):
        if isinstance(oracle, (list, tuple)):
            for k, (a, r, o) in enumerate(zip(got, ref, oracle)):
                if o is not None:
                    compare(a, r, o, f"{name}[{k}]")
            return
        activation = oracle.dim() == 4
        assert got.dtype == (dtype if activation else torch.float32), (name, got.dtype)
        ref = ref.to(dtype) if activation else ref
        assert_within_reference_error(got.cpu().float(), ref.cpu().float(), oracle, floor=FLOOR, name=name)

    G_lp = bw.b2_bn_sums(_fp32(dP_lp), rc_r, *stats)[0].to(dtype)      # B2's G as it stores it
    sums = prob.dz_args(_fp32)
    got = agb.b3_fused(G_lp, rc_lp, wts32, *sums)
    compare(got, b3_rounded(_fp32(G_lp), rc_r, wts32, sums, dtype), bw.b3_pointwise_depthwise(prob.dZ, prob.rc, prob.wts),
            "b3_fused")
    got = agb.local_backward(dL_lp, rc_lp, wts32)
    ref = local_rounded(_fp32(dL_lp), rc_r, wts32, dtype)
    compare(got, ref, bw.local_backward(prob.dL, prob.rc, prob.wts), "local_backward")


def _mix(eq, a, b, dtype):
    """einsum of the kernels' channel mixes, with their dots' operand rounding for layers of dtype
    (`_common.dot_variant`: one TF32 pass for fp16/bf16 on sm_80+, emulated by the interpreter)."""
    if dot_variant(torch.empty(0, dtype=dtype)).precision == "tf32":
        a, b = tf32_round(a.contiguous()), tf32_round(b.contiguous())
    return torch.einsum(eq, a, b)


def b3_rounded(G, rc, wts, sums, dtype):
    """`backward.b3_dz` + `backward.b3_pointwise_depthwise` in fp32 with the kernels' dots (`_mix`)
    and dy rounded to dtype, where the pointwise kernel stores it for the depthwise kernel (the
    other stage tensors are rounded by the caller)."""
    dZ = bw.b3_dz(G, rc, wts, *sums)
    s = dZ.shape[1] // 4
    du, g_dw, g_pw = [dZ[:, :s]], [], []
    for j, w in zip((1, 2, 3), (wts.dw3, wts.dw5, wts.dw7)):
        dzj = dZ[:, j * s:(j + 1) * s]
        g_pw.append(_mix("bohw,bihw->oi", dzj, rc["y"][j - 1], dtype))
        dy = _mix("oi,bohw->bihw", wts.pw[j - 1], dzj, dtype).to(dtype).float()
        du.append(bw.dwconv_input_grad(dy, w))
        g_dw.append(bw.dwconv_weight_grad(dy, rc["u"][j], 2 * j + 1))
    return du, g_dw, torch.stack(g_pw)


def local_rounded(dL, rc, wts, dtype):
    """`backward.local_backward` in fp32 with the kernels' dots (`_mix`) and dw4 rounded to dtype,
    where the local kernel stores it for the depthwise kernel."""
    xh, rstd4 = rc["xh4"], rc["rstd4"]
    lnw = wts.ln_weight[:, None, None]
    gL = dL * bw.hardswish_grad(xh * lnw + wts.ln_bias[:, None, None])
    dxh = gL * lnw
    dz4 = (dxh - dxh.mean(1, keepdim=True) - xh * (dxh * xh).mean(1, keepdim=True)) * rstd4
    dw4 = _mix("oi,bohw->bihw", wts.local_pw, dz4, dtype).to(dtype).float()
    return (bw.dwconv_input_grad(dw4, wts.local_dw), bw.dwconv_weight_grad(dw4, rc["u4"], 3),
            _mix("bohw,bihw->oi", dz4, rc["w4"], dtype), (gL * xh).sum(dim=(0, 2, 3)), gL.sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("C", [160, 200, 240, 320, 480])
@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "ieee"])
@pytest.mark.parametrize("emulate", [False, True], ids=["gpu", "interpreter"])
def test_channel_mix_backward_dot_overrides(C, precision, emulate):
    """The two channel-mix backward kernels run the precision `config.DOT_OVERRIDES` names where
    Triton 3.6 miscompiles the one asked for: 3xTF32 at S_PAD = 64 (C = 200, 240, 320) became
    fp32 FMA dots ("ieee"); every other (precision, S_PAD) runs as asked, the interpreter's
    emulation the same as the GPU. Read from the launchers' own plans on meta tensors."""
    from gmf_kernels.folding import meta_weights
    from gmf_kernels.triton_kernels._common import DotVariant
    from gmf_kernels.triton_kernels.config import dot_pad
    B, H, W = 2, 7, 7
    s = C // 5
    s_pad, cp = dot_pad(s), 4 * s
    md = dict(device="meta", dtype=torch.float32)
    dots = DotVariant(precision, emulate)
    wts = meta_weights(C)
    G, Z = torch.empty(3 * B, cp, H, W, **md), torch.empty(3 * B, cp, H, W, **md)
    y = list(torch.empty(3, 3 * B, s, H, W, **md).unbind(0))
    coefs = torch.empty(3, cp, **md)
    tiles = agb.gpu_backward_tiles(s_pad)
    _, lp = agb.plan_pw_backward(G, Z, y, wts.pw, coefs, 0, dots, tiles)
    rc = {"Z": Z, "y": y, "xh4": torch.empty(B, s, H, W, **md), "rstd4": torch.empty(B, 1, H, W, **md),
          "w4": torch.empty(B, 3 * s, H, W, **md), "u4": torch.empty(B, 3 * s, H, W, **md)}
    _, ll = agb.plan_local_backward(torch.empty(B, s, H, W, **md), rc, wts, dots, tiles=tiles)
    want = "ieee" if (precision, s_pad) == ("tf32x3", 64) else precision
    for fn, _grid, _args, kw in (lp[0], ll[0]):
        assert kw["DOT_PRECISION"] == want, (fn, C, precision, kw["DOT_PRECISION"], want)
        assert kw["EMULATE_DOTS"] == emulate


#: tiles whose programs each walk several pixel tiles (one split) across image borders, with a partly
#: masked last channel block: what a GPU launch does at batch 128, at a size the interpreter runs quickly
MULTI_TILE = agb.BackwardTiles(BLOCK_C=8, BLOCK_P=16, WARPS=4, PW_BLOCK_P=16, PW_WARPS=4, TARGET_PROGRAMS=1)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_depthwise_backward_programs_over_many_tiles(k):
    """`plan_dw_backward` (the input gradient, `gma_dw_backward_kernel`, and the weight gradient,
    `gma_dw_wgrad_kernel`) with programs that each walk 7 pixel tiles of 3 images (the tiles cross
    the images' borders) and a partly masked channel block, against the float64 PyTorch adjoints."""
    I, c, H, W = 3, 12, 5, 7
    g = torch.Generator().manual_seed(k)
    dy, u = (torch.randn(I, c, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(k, k, c, generator=g, dtype=torch.float64)
    buf, launches = agb.plan_dw_backward(dy.float(), u.float(), w.float(), tiles=MULTI_TILE)
    grids = {kern.__name__: grid for kern, grid, _, _ in launches}
    tps = {kern.__name__: args[8 if kern is agb.gma_dw_backward_kernel else 7] for kern, _, args, _ in launches}
    assert grids == {"gma_dw_backward_kernel": (1, 2), "gma_dw_wgrad_kernel": (1, 2, k)}, grids
    assert tps == {"gma_dw_backward_kernel": 7, "gma_dw_wgrad_kernel": 7}, tps         # 105 pixels / 16
    agb._launch(launches, dy)
    for name, got, exp in (("du", buf["du"], bw.dwconv_input_grad(dy, w)),
                           ("g_w", agb.taps_of(buf["part_gw"], c, k), bw.dwconv_weight_grad(dy, u, k))):
        err = float((got.double() - exp).abs().max() / exp.abs().max())
        assert err < 1e-6, f"{name} {k}x{k}: {err:.2e}"


#: the row walks of the input gradient (DW_ROWS, the GPU default of "triton.backward"): 16-column strips (the
#: smallest a GPU's tiles take) of a 20-wide grid (16 + 4: a ragged strip), 9 rows, 3 images: 54 row tiles
#: cut into runs of 5-7 rows (runs end inside a strip and cross strips and images), a partly masked channel
#: block
ROWS_TILE = agb.BackwardTiles(BLOCK_C=8, BLOCK_P=16, WARPS=4, PW_BLOCK_P=16, PW_WARPS=4, TARGET_PROGRAMS=20,
                              DW_ROWS=16)


@pytest.mark.parametrize("k", [7])
def test_depthwise_backward_row_walks(k):
    """`gma_dw_backward_kernel` with ROWS (`_dw_backward_rows`: the half-turned filter walked down rows of
    strips): the input gradient against the float64 PyTorch adjoint, into a contiguous buffer and into the
    qkv gradient's places (`qkv_layout`, the B3 launch's), and the launch's plan (row tiles, runs of at
    least k rows). The weight gradient's walk too (`gma_dw_wgrad_kernel` with ROWS, `_wgrad_rows`: runs that
    cross strips and images), u read from a buffer and from its places in qkv. The widest window here; the
    3x3 and 5x5 walks run in `test_b3_and_local_backward_with_row_walks` (B3's three segments, the local
    branch's 3x3)."""
    I, c, H, W = 3, 12, 9, 20
    g = torch.Generator().manual_seed(10 + k)
    dy, u = (torch.randn(I, c, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(k, k, c, generator=g, dtype=torch.float64)
    buf, launches = agb.plan_dw_backward(dy.float(), u.float(), w.float(), tiles=ROWS_TILE)
    (kern, grid, args, kw), = [ln for ln in launches if ln[0] is agb.gma_dw_backward_kernel]
    T = I * 2 * H                                             # row tiles: 2 strips of each image's 9 rows
    assert kw["ROWS"] and kw["BLOCK_P"] == 16 and args[8] >= k and grid == (-(-T // args[8]), 2), (grid, args[8])
    assert grid[0] > I * 2                                     # runs shorter than a strip: pieces inside strips
    (_, wgrid, wargs, wkw), = [ln for ln in launches if ln[0] is agb.gma_dw_wgrad_kernel]
    assert wkw["ROWS"] and wkw["BLOCK_P"] == 16 and wgrid[2] == k and wgrid[0] > 1, (wgrid, wargs[7])
    agb._launch([ln for ln in launches if ln[0] is agb.gma_dw_backward_kernel], dy)   # the wgrad: below
    exp = bw.dwconv_input_grad(dy, w)
    err = float((buf["du"].double() - exp).abs().max() / exp.abs().max())
    assert err < 1e-6, f"du {k}x{k}: {err:.2e}"
    # into the qkv gradient's places of segment j's channels, as B3 launches it (3B images = q, k, v of B),
    # u read from its places in qkv; more programs for the weight gradient: runs of 8 rows, pieces that start
    # and end inside strips
    C = 5 * c
    d_qkv = torch.full((1, H * W, 3 * C), float("nan"))
    qkv = torch.full((1, H * W, 3 * C), float("nan"))
    qkv.view(H, W, 3, 5, c)[:, :, :, 1] = u.float().permute(2, 3, 0, 1)
    buf, launches = agb.plan_dw_backward(dy.float(), agb.qkv_layout(qkv, 1), w.float(), agb.qkv_layout(d_qkv, 1),
                                         dataclasses.replace(ROWS_TILE, TARGET_PROGRAMS=100))
    (_, _, wargs, wkw), = [ln for ln in launches if ln[0] is agb.gma_dw_wgrad_kernel]
    assert wkw["ROWS"] and wargs[7] % H, wargs[7]
    agb._launch(launches, dy)
    got = d_qkv.view(H, W, 3, 5, c)[:, :, :, 1].permute(2, 3, 0, 1).double()          # (stream, c, H, W)
    err = float((got - exp).abs().max() / exp.abs().max())
    assert err < 1e-6, f"du into qkv's gradient {k}x{k}: {err:.2e}"
    exp_w = bw.dwconv_weight_grad(dy, u, k)
    err = float((agb.taps_of(buf["part_gw"], c, k).double() - exp_w).abs().max() / exp_w.abs().max())
    assert err < 1e-6, f"weight gradient {k}x{k}, u read from qkv, short runs: {err:.2e}"


def test_b3_and_local_backward_with_row_walks():
    """The two stages that launch the depthwise input gradient (B3's segments 1-3 into the qkv gradient,
    the local branch's 3x3 over its 3s channels) with a DW_ROWS tile: within the rule against the float64
    stage functions, as with the default tiles (C = 80, a 7x9 grid: strips of 16 columns hold 9, batch 2
    with batch statistics)."""
    prob = Problem(80, (7, 9), 2, True, False, seed=321)
    tiles = agb.BackwardTiles(BLOCK_C=16, BLOCK_P=64, WARPS=4, PW_BLOCK_P=64, PW_WARPS=4, DW_ROWS=16)
    rc32, wts32 = _fp32(prob.rc), _fp32(prob.wts)
    oracle = bw.b3_pointwise_depthwise(prob.dZ, prob.rc, prob.wts)
    ref32 = bw.b3_pointwise_depthwise(bw.b3_dz(_fp32(prob.G), rc32, wts32, *prob.dz_args(_fp32)), rc32, wts32)
    got = agb.b3_fused(_fp32(prob.G), rc32, wts32, *prob.dz_args(_fp32), tiles=tiles)
    check(got, ref32, oracle, "b3_fused (DW_ROWS)")
    dL32 = _fp32(prob.dL)
    check(agb.local_backward(dL32, rc32, wts32, tiles=tiles), bw.local_backward(dL32, rc32, wts32),
          bw.local_backward(prob.dL, prob.rc, prob.wts), "local_backward (DW_ROWS)")


_DW_ROWS_AOT_SCRIPT = r"""
import json
import gmf_kernels.triton_kernels.specializations as sp
from gmf_kernels.triton_kernels import aggregation_backward as agb
from gmf_kernels.triton_kernels.specializations import Call
out, seen = [], set()
for tile in agb.DW_ROWS_TILES:
    for spec in sp.backward_specializations_of_call(Call(160, 28, 28, 128, "fp16"), 90, True, {agb.BACKWARD_FAMILY: tile}):
        # the weight gradient: one of each window (its registers vary little: 32-80 over every width, dtype and GPU)
        key = (tile, dict(spec.constexprs)["KS"]) if spec.kernel == "gma_dw_wgrad_kernel" else spec.key
        if spec.kernel in ("gma_dw_backward_kernel", "gma_dw_wgrad_kernel") and key not in seen:
            seen.add(key)
            rep = sp.compile_one(spec)
            rep["rows"], rep["tile"], rep["kernel"] = dict(spec.constexprs).get("ROWS"), list(tile), spec.kernel
            out.append(rep)
print(json.dumps(out))
"""


def test_dw_rows_candidates_compile_without_spills_on_sm90(tmp_path):
    """Every launch of `gma_dw_backward_kernel` and `gma_dw_wgrad_kernel` that a `DW_ROWS_TILES` tile (the
    first is the GPU default) makes in a training step's backward (C = 160 28x28 B = 128 fp16: B3's segments
    into the qkv gradient, the local branch's, the CRPE's weight gradients), compiled for sm_90: ROWS in the
    specialisation, no spill (a first version of the walk spilled on sm_90 at every tile; the tuner would
    refuse such a candidate on the GPU)."""
    from helpers import aot_reports, assert_compiled_without_spills
    reps = aot_reports(_DW_ROWS_AOT_SCRIPT, tmp_path)
    assert len([r for r in reps if r["kernel"] == "gma_dw_backward_kernel"]) >= 2 * len(agb.DW_ROWS_TILES), reps
    assert len([r for r in reps if r["kernel"] == "gma_dw_wgrad_kernel"]) == 3 * len(agb.DW_ROWS_TILES), reps
    for r in reps:
        print(f"{r['kernel']} {r['tile']}: {r['registers']} registers, spills {r['spill_stores']} B")
        assert r["rows"] is True, r
        assert_compiled_without_spills(r)
