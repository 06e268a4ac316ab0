"""GPU tests on real shapes: the fused backends (cuda, triton) at the sizes a model runs.

The other GPU tests use batch <= 4, so the launch variants used at batch 128 (one split,
many tiles per program) never ran. Here, on a CUDA GPU:

* GroupMixFormer-S stage grids (C=80 56x56, 160 28x28, 320 14x14, 320 7x7) at batch 128
  and at batch 1 (many splits per image);
* every released width at every grid a released model uses it at (batch 32);
* fp32 / fp16 / bf16, both fused backends: output buffers poisoned with NaN (an element a
  kernel forgets to write fails), two runs bit-identical, against the float64 oracle;
* the public path (dispatch, BatchNorm folding, both linears) at batch 128;
* the whole GroupMixFormer-S model (random weights, randomised norms) against the reference;
* launches on a side stream and inside a CUDA graph capture, and from two host threads at once;
* a training step (batch statistics, forward + backward: Triton's backward kernels, which the
  CUDA backend trains with too) at GroupMixFormer-S stage shapes and at C = 360 / 480 (S_PAD
  128: unfused B3, the wide recompute tiles): output, input and every parameter gradient,
  running statistics against the float64 reference (fp32, fp16, bf16);
* every Triton forward tuning candidate the speed part's tune tries (GroupMixFormer-S's widths, batch 128, bf16),
  against the float64 oracle, last in the file.

Oracle: the reference in float64, computed on the GPU. fp32 (TF32 off, tests/conftest.py):
max |diff| / max |oracle| <= max(1e-5, 2 x the fp32 reference's own error + 1e-6).
fp16 / bf16: no worse than 2 x the reference's own error at that dtype + 1e-5 (the rule of
tests/helpers.py `assert_within_reference_error`, evaluated on the GPU: the tensors here
are too large to copy to the CPU for every check).

Every test here is marked `gpu` and skips without a CUDA GPU; under GMF_REQUIRE_GPU=1 (the
GPU report, benchmarks/gpu_report.py) a skip is a failure, and on a GPU machine a missing
CUDA module fails with the build command (tests/conftest.py). Test ids name the backend
first, so `-k triton` / `-k "not triton"` split the file by backend.

GMF_GPU_TESTS_ON_CPU=1 runs this file's own logic on the CPU instead: the same tests on tiny
shapes (`ON_CPU`), Triton through its interpreter (the `cuda` ones skip: no GPU). No GPU runs
CI, so without it a mistake here (a tensor left on the wrong device, a helper's changed
signature) would first show on a lent GPU, as failures that cost its report the verdict;
tests/test_gpu_tests_on_cpu.py runs it in CI. It proves nothing about the GPU itself.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from gmf_kernels.folding import compute_dtype, fold_eval
from gmf_kernels.models.configs import MODEL_CONFIGS
from gmf_kernels.numerics import cast_weights, default_hyper, norm_rel_error, random_gma_weights
from gmf_kernels.reference import reference_group_mix_attention
from gmf_kernels.triton_kernels.specializations import GPU_TRAIN_SHAPES

#: the file's logic on the CPU at tiny shapes (module docstring); never on a machine with a GPU
ON_CPU = os.environ.get("GMF_GPU_TESTS_ON_CPU", "0") not in ("", "0") and not torch.cuda.is_available()
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = [] if ON_CPU else [pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BUILD_CMD = "python -m gmf_kernels.cuda build"
STAGE_GRIDS = (56, 28, 14, 7)  # token grids of the four stages at 224x224
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("cuda", "triton")
FP32_TOL = 1e-5

S_STAGES = list(zip(MODEL_CONFIGS["groupmixformer_s"]["embedding_dims"], STAGE_GRIDS))
S_CASES = [(C, G, B) for B in (128, 1) for C, G in S_STAGES]
#: every (width, grid) a released model uses that the S stages do not already cover
WIDTH_CASES = sorted({(C, G) for cfg in MODEL_CONFIGS.values() for C, G in zip(cfg["embedding_dims"], STAGE_GRIDS)}
                     - set(S_STAGES))
WIDTH_BATCH = 32
PUBLIC_CASE = (160, 28, 128)  # (C, grid side, batch) of test_public_path_batch128
if ON_CPU:  # one case of each kind, one dtype per branch of the checks (fp32; fp16 and bf16 share one)
    S_CASES, WIDTH_CASES, WIDTH_BATCH, PUBLIC_CASE = [(40, 5, 2)], [(80, 4)], 2, (40, 6, 2)
    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync():
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_cached():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ errors, computed on the GPU
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| in float64 (NaN when a holds NaN/inf): numerics.max_rel_error, on the device."""
    a = actual.detach().to(dtype=torch.float64, device=expected.device)
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return ((a - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close_to_oracle(out, oracle, ref_lowp, dtype, what):
    """fp32: <= max(1e-5, 2 x err(fp32 reference) + 1e-6); fp16/bf16: <= 2 x err(reference at dtype) + 1e-5."""
    nan = int(torch.isnan(out).sum())
    assert nan == 0, f"{what}: {nan} NaN elements in the output (an element not written, or a poisoned read)"
    err, ref_err = rel_err(out, oracle), rel_err(ref_lowp, oracle)
    bound = max(FP32_TOL, 2 * ref_err + 1e-6) if dtype == torch.float32 else 2 * ref_err + 1e-5
    assert err <= bound, (f"{what}: relative error {err:.3e} > bound {bound:.3e} (reference's own error at this "
                          f"dtype {ref_err:.3e})")


# ------------------------------------------------------------------ cases (inputs + oracle), cached
class Case:
    """Random layer and tokens on the GPU, the float64 oracle and the reference at each dtype."""

    def __init__(self, C: int, H: int, W: int, B: int, seed: int = 0):
        self.C, self.H, self.W, self.B = C, H, W, B
        self.hp = default_hyper(C)
        self.w = cast_weights(random_gma_weights(C, seed=seed), torch.float64, DEVICE)
        g = torch.Generator(device=DEVICE).manual_seed(seed + 1000)
        self.x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64, device=DEVICE)
        with torch.inference_mode():
            self.out64, ext = reference_group_mix_attention(self.x, (H, W), self.w, self.hp,
                                                            return_intermediates=True)
        self.pre64 = ext["pre_proj"]
        self._lowp = {}

    def qkv(self, dtype):
        with torch.inference_mode():
            return F.linear(self.x, self.w.qkv_weight, self.w.qkv_bias).to(dtype)

    def reference(self, dtype):
        """(pre-projection, layer output) of the reference run in `dtype` from x in `dtype`."""
        if dtype not in self._lowp:
            with torch.inference_mode():
                out, ext = reference_group_mix_attention(self.x.to(dtype), (self.H, self.W),
                                                         cast_weights(self.w, dtype), self.hp,
                                                         return_intermediates=True)
            self._lowp[dtype] = (ext["pre_proj"], out)
        return self._lowp[dtype]

    def folded(self, dtype):
        return [t.contiguous() for t in fold_eval(self.w, self.hp, compute_dtype(dtype))]


_CASES: "OrderedDict[tuple, Case]" = OrderedDict()


def get_case(C, G, B, seed=0) -> Case:
    """LRU of two cases: tests are ordered shape by shape (the shape is the outermost parameter)."""
    key = (C, G, B, seed)
    if key in _CASES:
        _CASES.move_to_end(key)
        return _CASES[key]
    while len(_CASES) >= 2:
        _CASES.popitem(last=False)
    free_cached()
    _CASES[key] = Case(C, G, G, B, seed)
    return _CASES[key]


@pytest.fixture(scope="module", autouse=True)
def _free_cases():
    yield
    _CASES.clear()
    free_cached()


# ------------------------------------------------------------------ the two fused backends
def require_backend(name: str):
    """Skip (a failure on a GPU machine / under GMF_REQUIRE_GPU=1) when the backend cannot run."""
    from gmf_kernels.backends import get_backend
    reasons = get_backend(name).availability_reasons()
    if reasons:
        pytest.skip(f"{name}: " + "; ".join(reasons))


def run_pre_projection(name: str, case: Case, dtype, monkeypatch) -> torch.Tensor:
    """qkv -> pre through the backend's launcher, every output/intermediate buffer NaN-poisoned."""
    require_backend(name)
    qkv = case.qkv(dtype)
    ws = case.folded(dtype)
    with torch.inference_mode():
        if name == "cuda":
            from gmf_kernels.cuda import launcher as cl
            out = torch.full((case.B, case.H * case.W, case.C), float("nan"), dtype=dtype, device=DEVICE)
            cl.launch_pre_projection(qkv, case.H, case.W, ws, case.hp.scale, case.hp.ln_eps, out=out)
        else:
            from gmf_kernels.triton_kernels import launcher as tl_launcher
            from gmf_kernels.triton_kernels import op  # noqa: F401  (registers gmf::triton_pre_projection)
            monkeypatch.setattr(tl_launcher, "POISON_BUFFERS", True)
            out = torch.ops.gmf.triton_pre_projection(qkv, case.H, case.W, ws, case.hp.scale, case.hp.ln_eps)
    sync()
    assert out.device.type == DEVICE, f"{name}: output on {out.device}"
    return out


def _shape_params(cases, batch=None):
    out = []
    for case in cases:
        C, G, B = case if batch is None else (*case, batch)
        for name in BACKENDS:
            for dn in DTYPES:
                out.append(pytest.param(name, dn, C, G, B, id=f"{name}-{dn}-C{C}-{G}x{G}-B{B}",
                                        marks=pytest.mark.xdist_group(f"C{C}-{G}-B{B}")))
    return out


def _check_stage(name, dn, C, G, B, monkeypatch):
    dtype = DTYPES[dn]
    case = get_case(C, G, B)
    out = run_pre_projection(name, case, dtype, monkeypatch)
    what = f"{name} {dn} C={C} {G}x{G} B={B}"
    assert_close_to_oracle(out, case.pre64, case.reference(dtype)[0], dtype, what)
    again = run_pre_projection(name, case, dtype, monkeypatch)
    assert torch.equal(out, again), f"{what}: two runs on the same input differ (a race?)"


@pytest.mark.parametrize("name, dn, C, G, B", _shape_params(S_CASES))
def test_groupmixformer_s_stages(name, dn, C, G, B, monkeypatch):
    """GroupMixFormer-S stage shapes at batch 128 and 1."""
    _check_stage(name, dn, C, G, B, monkeypatch)


@pytest.mark.parametrize("name, dn, C, G, B", _shape_params(WIDTH_CASES, WIDTH_BATCH))
def test_every_width(name, dn, C, G, B, monkeypatch):
    """Every released width at every grid a released model uses it at."""
    _check_stage(name, dn, C, G, B, monkeypatch)


# ------------------------------------------------------------------ the public path
@pytest.mark.xdist_group("public-path")
@pytest.mark.parametrize("dn", list(DTYPES))
@pytest.mark.parametrize("name", BACKENDS)
def test_public_path_batch128(name, dn):
    """group_mix_attention(x, ..., backend=name): dispatch, folding, both linears, at batch 128."""
    from gmf_kernels import group_mix_attention
    require_backend(name)
    dtype = DTYPES[dn]
    C, G, B = PUBLIC_CASE
    case = get_case(C, G, B, seed=3)
    w = cast_weights(case.w, dtype)
    with torch.inference_mode():
        out = group_mix_attention(case.x.to(dtype), (case.H, case.W), w, backend=name)
    sync()
    assert out.dtype == dtype and out.shape == case.out64.shape and out.device.type == DEVICE
    assert_close_to_oracle(out, case.out64, case.reference(dtype)[1], dtype, f"{name} {dn} layer")


def assert_same_call(out, expected, what):
    """Two calls of one backend on one input: equal up to the cuBLAS linears' freedom (each stream,
    thread or capture may get its own cuBLAS handle and algorithm); a launch on the wrong stream or
    left out of a graph gives stale or unrelated values, far beyond 1e-2."""
    err = rel_err(out, expected.double())
    assert err <= 1e-2, f"{what}: relative difference {err:.3e}"


@pytest.mark.skipif(ON_CPU, reason="GMF_GPU_TESTS_ON_CPU=1: streams and CUDA graphs need a GPU")
@pytest.mark.xdist_group("streams")
@pytest.mark.parametrize("name", BACKENDS)
def test_side_stream_and_cuda_graph(name):
    """On a side stream the backend's launches follow that stream (the result equals the default
    stream's, bit for bit); captured in a CUDA graph (what optimize_for_inference's small-batch mode
    does), a replay on new input equals an eager call on it."""
    from gmf_kernels import group_mix_attention
    require_backend(name)
    dtype = torch.float16
    case = get_case(160, 14, 8, seed=7)
    w = cast_weights(case.w, dtype)
    x = case.x.to(dtype)
    size = (case.H, case.W)
    with torch.inference_mode():
        base = group_mix_attention(x, size, w, backend=name)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):   # warm-up on the side stream, as graph capture wants
                on_side = group_mix_attention(x, size, w, backend=name)
        torch.cuda.current_stream().wait_stream(side)
        sync()
        assert_same_call(on_side, base, f"{name}: a side stream's result vs the default stream's")
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = group_mix_attention(static_x, size, w, backend=name)
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        graph.replay()
        sync()
        eager = group_mix_attention(x2, size, w, backend=name)
        sync()
        assert_same_call(static_out, eager, f"{name}: a CUDA graph replay vs an eager call on its input")


@pytest.mark.skipif(ON_CPU, reason="GMF_GPU_TESTS_ON_CPU=1: the threads' launches race on a GPU only")
@pytest.mark.xdist_group("threads")
@pytest.mark.parametrize("name", BACKENDS)
def test_threads_with_different_batches(name):
    """Two host threads calling the backend at once with different batches (different tiles and
    shared-memory sizes: the CUDA kernels' shared-memory opt-in is per kernel, shared by the
    threads) get the results of calls made one at a time."""
    import threading

    from gmf_kernels import group_mix_attention
    require_backend(name)
    dtype = torch.float32
    cases = [get_case(200, 28, 1, seed=8), get_case(200, 28, 32, seed=9)]
    w = [cast_weights(c.w, dtype) for c in cases]
    with torch.inference_mode():
        alone = [group_mix_attention(c.x.to(dtype), (c.H, c.W), wi, backend=name) for c, wi in zip(cases, w)]
    sync()
    errors, outs = [], [[], []]

    def work(i):
        try:
            with torch.inference_mode():
                for _ in range(6):
                    outs[i].append(group_mix_attention(cases[i].x.to(dtype), (cases[i].H, cases[i].W), w[i],
                                                       backend=name))
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (reported below, with the thread)
            errors.append(f"thread {i}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        for o in outs[i]:
            assert_same_call(o, alone[i], f"{name}: thread {i}'s result vs a lone call")


@pytest.mark.skipif(ON_CPU, reason="GMF_GPU_TESTS_ON_CPU=1: a GPU's capability and index, nothing to smoke on a CPU")
@pytest.mark.parametrize("name", BACKENDS)
def test_problem_on_this_gpu_passes_deployment_guards(name):
    """The problem dispatch builds for a CUDA tensor carries this GPU's capability, and the
    backend (built for this GPU by the README's install or the report) accepts it."""
    from gmf_kernels.backends import get_backend
    from gmf_kernels.functional import make_problem
    require_backend(name)
    case = get_case(80, 7, 1, seed=5)
    with torch.inference_mode():
        p = make_problem(case.x.float(), (7, 7), cast_weights(case.w, torch.float32), case.hp, False)
    assert p.device_capability == tuple(torch.cuda.get_device_capability(case.x.device))
    assert p.device_index == case.x.device.index
    reasons = get_backend(name).not_supported_reasons(replace(p, explicit=True))
    assert reasons == [], reasons


# ------------------------------------------------------------------ the whole model
MODEL_BATCH = 8
MODEL_NAME, MODEL_OVERRIDES, MODEL_SIZE = "groupmixformer_s", {}, 224
if ON_CPU:  # a small model and image: one layer per stage, grids 8, 4, 2, 1
    MODEL_BATCH, MODEL_SIZE = 2, 32
    MODEL_OVERRIDES = dict(embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1], mlp_ratios=[4, 4, 2, 2])


def _randomise_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


@pytest.fixture(scope="module")
def model_case():
    """GroupMixFormer-S (random weights, randomised norms), an input, the float64 oracle logits."""
    import gmf_kernels as gmf
    torch.manual_seed(0)
    master = gmf.create_model(MODEL_NAME, backend="reference", **MODEL_OVERRIDES).eval()
    _randomise_norms(master)
    x = torch.randn(MODEL_BATCH, 3, MODEL_SIZE, MODEL_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        m64 = copy.deepcopy(master).to(device=DEVICE, dtype=torch.float64)
        oracle = m64(x.to(device=DEVICE, dtype=torch.float64))
    del m64
    free_cached()
    return master, x, oracle, {}


def _model_logits(master, x, dtype, backend):
    m = copy.deepcopy(master).to(device=DEVICE, dtype=dtype).eval().set_backend(backend)
    with torch.inference_mode():
        out = m(x.to(device=DEVICE, dtype=dtype))
    sync()
    assert out.device.type == DEVICE, f"{backend}: logits on {out.device}"
    return out


@pytest.mark.xdist_group("whole-model")
@pytest.mark.parametrize("dn", list(DTYPES))
@pytest.mark.parametrize("name", BACKENDS)
def test_whole_model_groupmixformer_s(name, dn, model_case):
    """Every GMA layer of the model on the fused backend (named explicitly: it cannot fall back)."""
    require_backend(name)
    master, x, oracle, refs = model_case
    dtype = DTYPES[dn]
    if dtype not in refs:
        refs[dtype] = _model_logits(master, x, dtype, "reference")
    out = _model_logits(master, x, dtype, name)
    assert_close_to_oracle(out, oracle, refs[dtype], dtype, f"GroupMixFormer-S {name} {dn} logits")


# ------------------------------------------------------------------ training at real shapes
#: (C, grid side, batch): the S stages and C = 360 / 480; the GPU report warms the Triton cache with
#: these (specializations.report_specializations), so they are defined there
TRAIN_CASES = list(GPU_TRAIN_SHAPES) if not ON_CPU else [(40, 5, 2)]


@pytest.mark.parametrize("dn", list(DTYPES))
@pytest.mark.parametrize("C, G, B", TRAIN_CASES, ids=[f"C{C}-{G}x{G}-B{B}" for C, G, B in TRAIN_CASES])
@pytest.mark.parametrize("name", BACKENDS)
def test_training_step_real_shapes(name, C, G, B, dn):
    """One training forward + backward on the GPU against the float64 reference (also on the
    GPU). fp32: output, input and every parameter gradient, running statistics within 2x the fp32
    reference's own error + 1e-4 relative, element-wise (3xTF32 dots; TF32 off for the
    reference, tests/conftest.py). fp16 / bf16: output and running
    statistics within 2x the reference's own error at that dtype; their gradients are not held
    to the element-wise rule at these sizes: among millions of pre-activations some lie within a
    rounding error of hardswish's kinks at +-3, where any low-precision computation may take
    either side (tests/training_cases.py `check_low_precision` holds them on layers kept off the
    kinks). Here they are held norm-wise (finite, <= 2x the reference's own norm-wise error +
    1e-2), which a few flipped elements barely move. The cuda backend must train with the Triton
    kernels: a fallback to PyTorch ops (its RuntimeWarning) fails the test."""
    _check_training_step(name, C, G, B, dn)


def _check_training_step(name, C, G, B, dn, what_extra=""):
    """`test_training_step_real_shapes`' checks of one case (its docstring)."""
    from gmf_kernels.backends import get_backend
    from helpers import assert_within_reference_error, problem
    from training_cases import make, run
    require_backend(name)
    dtype = DTYPES[dn]
    p = problem(B=B, H=G, W=G, dim=C, dtype=dtype, device_type=DEVICE, training=True, needs_grad=True,
                device_capability=torch.cuda.get_device_capability() if DEVICE == "cuda" else None)
    reasons = get_backend(name).not_supported_reasons(p)
    if reasons:
        pytest.skip(f"{name} {dn}: " + "; ".join(reasons))
    import warnings
    w, x = make(C, G, G, B, device=DEVICE)
    oracle = run("reference", x, (G, G), w, torch.float64, True)
    with warnings.catch_warnings():
        # the cuda backend trains with Triton's kernels: a fallback to PyTorch ops (a RuntimeWarning)
        # would pass every check below without testing them
        warnings.simplefilter("error", RuntimeWarning)
        got = run(name, x, (G, G), w, dtype, True)
    what = f"{name} train {dn} C{C} {G}x{G} B{B}{what_extra}"
    ref_lp = run("reference", x, (G, G), w, dtype, True)
    if dtype == torch.float32:
        # 2x the fp32 reference's own error + 1e-4, element-wise: that error is ~1e-6 on most cases
        # but not all (on an H200, C=320 14x14 B32's input gradient: 1.4e-3 for the reference and
        # the torch backend alike, TF32 off: benchmarks/results/gpu_report_h200_20261204/followup.md)
        assert_within_reference_error(got[0], ref_lp[0], oracle[0], floor=1e-4, name=f"{what} out")
        for n, o in oracle[1].items():
            assert got[1][n] is not None, f"{what}: no gradient for {n}"
            assert_within_reference_error(got[1][n], ref_lp[1][n], o, floor=1e-4, name=f"{what} grad {n}")
        for n, o in oracle[2].items():
            if n.startswith("bn_num_batches_tracked"):
                assert torch.equal(got[2][n], o), f"{what} {n}: {got[2][n]} != {o}"
            else:
                assert_within_reference_error(got[2][n], ref_lp[2][n], o, floor=1e-4, name=f"{what} {n}")
        return
    assert_within_reference_error(got[0], ref_lp[0], oracle[0], name=f"{what} out")
    for n in oracle[2]:
        if not n.startswith("bn_num_batches_tracked"):
            assert_within_reference_error(got[2][n], ref_lp[2][n], oracle[2][n], floor=1e-3, name=f"{what} {n}")
    # the gradients, norm-wise (a few elements flipping at hardswish's kinks move a norm little):
    # finite, and within 2x the reference's own norm-wise error at this dtype + 1e-2 (a wrong
    # kernel's gradient is off by O(1), a wrong scale by >= 1e-1)
    for n, o in oracle[1].items():
        g = got[1][n]
        assert g.shape == o.shape and bool(torch.isfinite(g).all()), f"{what} grad {n}: shape or non-finite values"
        err, ref_err = norm_rel_error(g, o), norm_rel_error(ref_lp[1][n], o)
        assert err <= 2 * ref_err + 1e-2, (f"{what} grad {n}: norm-wise relative error {err:.3e} > 2 x the "
                                           f"reference's {ref_err:.3e} + 1e-2")


#: the training cases where B3's dense form is a tuning candidate (`aggregation_backward.dense_b3_applies`: fp16 /
#: bf16 at S_PAD <= 64, GroupMixFormer-S's widths)
DENSE_TRAIN_CASES = [c for c in TRAIN_CASES if c[0] in (40, 80, 160, 320)][:3]


@pytest.mark.parametrize("C, G, B", DENSE_TRAIN_CASES, ids=[f"C{C}-{G}x{G}-B{B}" for C, G, B in DENSE_TRAIN_CASES])
def test_triton_training_step_dense_form(C, G, B, monkeypatch):
    """The training step of `test_training_step_real_shapes` (triton, fp16: the judged training run's dtype; bf16
    where the file's dtypes leave fp16 out) with
    "triton.backward" at its dense candidate (DENSE 1), as a tuning table that picked it would run it: the dense
    statistics pass, the forward keeping neither y nor w4, B3's and the local branch's dense backward; the same
    checks against the float64 reference. The tune's own check of the candidate compares its backward with the
    default tiles' only; this one covers the forward side too."""
    from gmf_kernels.triton_kernels import aggregation_backward as agb, config, tile_spaces
    require_backend("triton")
    cap = torch.cuda.get_device_capability() if DEVICE == "cuda" else (9, 0)
    prec = config.dot_precision("fp16" if "fp16" in DTYPES else "bf16", cap)
    tiles = [t for t in agb._search(C, prec) if len(t) > 7 and t[7]]
    if not tiles:
        pytest.skip(f"B3's dense form is not a candidate at C={C} with {prec} dots")
    if ON_CPU:    # the interpreter's tiles, DENSE 1
        tiles = [agb.tile_of(replace(agb.backward_tiles(config.dot_pad(C // 5), 3 * B * G * G), DENSE=1))]
    monkeypatch.setattr(tile_spaces, "tuned_tiles",
                        lambda family, C_, like: tiles[0] if family == agb.BACKWARD_FAMILY else None)
    _check_training_step("triton", C, G, B, "fp16" if "fp16" in DTYPES else "bf16", " (dense form)")


# ------------------------------------------------------------------ the forward's tuning candidates
#: (C, grid side, batch) where the speed part's tune tries the Triton forward candidates (GroupMixFormer-S's widths at
#: their first stage grid, batch 128: benchmarks/gpu_report.py's tune phase, `specializations.REPORT_TUNE_FAMILIES`)
CAND_CASES = [(C, G, 128) for C, G in dict(reversed(S_STAGES)).items()][::-1]
if ON_CPU:
    CAND_CASES = [(40, 5, 2)]


# last in the file (collected, hence started, last: a phase cut short by its deadline loses these first; their
# candidates compile here unless the report's warm-up or seed compiled them), on one worker
@pytest.mark.xdist_group("forward-candidates")
@pytest.mark.parametrize("C, G, B", CAND_CASES, ids=[f"triton-C{C}-{G}x{G}-B{B}" for C, G, B in CAND_CASES])
def test_triton_forward_candidates(C, G, B, monkeypatch):
    """Every candidate of "triton.aggregate" and "triton.attention" the tune would try here for the judged run's
    dtype (bf16; fp16 on a GPU without bf16), the other family at its default: the pre-projection against the
    float64 oracle (the file's rule), every buffer NaN-poisoned. The tune itself only compares a candidate with the
    default's output; this records, before it runs, which candidates are right on this GPU (the split forward and
    its dense Z pass, the row walks, PAIR, the attention's GROUP, ...). All candidates run; the failures are
    listed together. On the CPU (its logic only): the first dense Z pass and the first GROUP candidate."""
    from gmf_kernels.folding import FoldedGMAWeights
    from gmf_kernels.triton_kernels import launcher as L
    require_backend("triton")
    cap = torch.cuda.get_device_capability() if DEVICE == "cuda" else (9, 0)
    dtype = torch.bfloat16 if cap >= (8, 0) else torch.float16
    case = get_case(C, G, B)
    qkv, ws = case.qkv(dtype), FoldedGMAWeights(*case.folded(dtype))
    dots = L.dot_variant(qkv)
    agg0, attn0 = L.aggregate_default(C, dtype, cap), L.attention_default(C, dtype, cap)
    pairs = ([(a, attn0) for a in L.aggregate_candidates(C, dtype, cap) if a != agg0]
             + [(agg0, t) for t in L.attention_candidates(C, dtype, cap) if t != attn0])
    if ON_CPU:
        pairs = [next(p for p in pairs if p[0].get("ZDENSE")), next(p for p in pairs if p[1].get("GROUP"))]
    assert pairs
    monkeypatch.setattr(L, "POISON_BUFFERS", True)
    failures = []
    for agg, attn in pairs:
        what = f"triton {dtype} C={C} {G}x{G} B={B} aggregate {agg} attention {attn}"
        with torch.inference_mode():
            out = L.launch_pre_projection(qkv, G, G, ws, case.hp.scale, case.hp.ln_eps,
                                          shape=L.shape_from_configs(C, dots, agg, attn))["pre"]
        sync()
        try:
            assert_close_to_oracle(out, case.pre64, case.reference(dtype)[0], dtype, what)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, f"{len(failures)} of {len(pairs)} candidates wrong:\n" + "\n".join(failures)
