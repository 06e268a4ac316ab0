"""Every registered backend against the oracle (`reference` in float64) on random inputs.

Backends are taken from the registry (`BACKEND_NAMES`) and skipped, with their reasons, where
their declared support (`not_supported_reasons`) excludes the problem: a new backend is tested
by registering it. On a CPU machine the fused backends run through the Triton interpreter
(triton, named explicitly) or skip (cuda: no GPU).

Error measure: max |a - e| / max |e|. float64 within 1e-10, float32 within 1e-5 (the
float64 reference as oracle), float16/bfloat16 with flash-attention's rule
err(backend) <= 2 * err(reference at that dtype) + floor (`assert_within_reference_error`).

Every released width C, odd and real stage grids, batch 1 and 3, eval and train
(outputs, input gradient, every parameter gradient, BatchNorm running statistics and
num_batches_tracked), CPU autocast, non-contiguous inputs, determinism and the
invalidation of the folded-weight cache.
"""
import copy

import pytest
import torch

import gmf_kernels
from gmf_kernels.backends import BACKEND_NAMES
from gmf_kernels.models.configs import MODEL_WIDTHS
from gmf_kernels.numerics import cast_weights, default_hyper, max_rel_error, random_gma_weights
from gmf_kernels.reference import reference_group_mix_attention
from gmf_kernels.weights import GMAWeights
from helpers import assert_max_rel_close as assert_rel
from helpers import (BUFFER_FIELDS, PARAM_FIELDS, assert_within_reference_error, backend_cases, backend_dtype_params,
                     backend_params, emulated_here, named_fields)

WIDTHS = list(MODEL_WIDTHS)
GRIDS = [(1, 1), (7, 9), (5, 11), (14, 14)]
FP64_TOL = 1e-10
FP32_TOL = 1e-5
ORACLE = "reference"
#: backends compared with the oracle at its own precision (the oracle itself would be a no-op check)
CANDIDATES = [n for n in BACKEND_NAMES if n != ORACLE]



def gid(g):
    return f"{g[0]}x{g[1]}"


def eval_backends(dtype, names=BACKEND_NAMES):
    return backend_params(names, dtype=dtype)


def train_backends(dtype, names=CANDIDATES):
    return backend_params(names, dtype=dtype, training=True, needs_grad=True)




def leaf_weights(w: GMAWeights, dtype=None) -> GMAWeights:
    """An independent copy (buffers included) whose parameters require grad."""
    c = cast_weights(w, dtype)
    for _, t in named_fields(c, PARAM_FIELDS):
        t.requires_grad_(True)
    return c


def run_train(backend, x0, size, w, dtype=torch.float64, loss_weight=None):
    """One train-mode forward + backward on a private copy of w; returns out, grads, buffers."""
    wc = leaf_weights(w, dtype)
    x = x0.detach().to(dtype).clone().requires_grad_(True)
    out = gmf_kernels.group_mix_attention(x, size, wc, training=True, backend=backend)
    params = named_fields(wc, PARAM_FIELDS)
    lw = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) \
        if loss_weight is None else loss_weight
    grads = torch.autograd.grad((out * lw.to(dtype)).sum(), [x] + [t for _, t in params])
    named_grads = {"x": grads[0], **{n: g for (n, _), g in zip(params, grads[1:])}}
    buffers = {n: t.clone() for n, t in named_fields(wc, BUFFER_FIELDS)}
    return out.detach(), named_grads, buffers


def compare_train(got, exp, tol, who):
    out_g, grads_g, buf_g = got
    out_e, grads_e, buf_e = exp
    assert_rel(out_g, out_e, tol, f"{who} train out")
    assert set(grads_g) == set(grads_e)
    for n in grads_e:
        assert_rel(grads_g[n], grads_e[n], tol, f"{who} grad {n}")
    assert set(buf_g) == set(buf_e)
    for n in buf_e:
        if n.startswith("bn_num_batches_tracked"):
            assert torch.equal(buf_g[n], buf_e[n]), f"{who} {n}: {buf_g[n]} != {buf_e[n]}"
        else:
            assert_rel(buf_g[n], buf_e[n], tol, f"{who} buffer {n}")


def make(C, H, W, B, seed=0, qkv_bias=True):
    w = random_gma_weights(C, seed=1000 * C + 10 * H + W + seed, qkv_bias=qkv_bias)
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    return w, x


def run_eval(backend, x, grid, w):
    with torch.no_grad():
        return gmf_kernels.group_mix_attention(x, grid, w, backend=backend)


# ------------------------------------------------------------------ eval, float64 / float32
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("grid", GRIDS, ids=gid)
@pytest.mark.parametrize("C", WIDTHS, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backend", eval_backends(torch.float64, CANDIDATES))
def test_eval_float64(backend, C, grid, B):
    w, x = make(C, *grid, B)
    with torch.no_grad():
        ref = reference_group_mix_attention(x, grid, w, default_hyper(C))
    out = run_eval(backend, x, grid, w)
    assert out.dtype == torch.float64
    assert_rel(out, ref, FP64_TOL, f"{backend} eval float64")


@pytest.mark.parametrize("C, grid", [(40, (56, 56)), (200, (56, 56)), (80, (28, 28)), (320, (28, 28)),
                                     (480, (7, 7))], ids=lambda v: f"C{v}" if isinstance(v, int) else gid(v))
@pytest.mark.parametrize("backend", eval_backends(torch.float64, CANDIDATES))
def test_eval_float64_stage_grids(backend, C, grid):
    """The real stage grids of a 224x224 input (56, 28, 7; 14 is in test_eval_float64)."""
    w, x = make(C, *grid, 1)
    with torch.no_grad():
        ref = reference_group_mix_attention(x, grid, w, default_hyper(C))
    assert_rel(run_eval(backend, x, grid, w), ref, FP64_TOL, f"{backend} eval float64 {gid(grid)}")


@pytest.mark.parametrize("backend, C", backend_cases(BACKEND_NAMES, WIDTHS, [80], dtype=torch.float32))
def test_eval_float32_56x56(backend, C):
    w, x = make(C, 56, 56, 1)
    with torch.no_grad():
        oracle = reference_group_mix_attention(x, (56, 56), w, default_hyper(C))
    out = run_eval(backend, x.float(), (56, 56), cast_weights(w, torch.float32))
    assert_rel(out, oracle, FP32_TOL, f"{backend} eval float32 56x56")


@pytest.mark.parametrize("C", [40, 160], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backend", eval_backends(torch.float32))
def test_eval_without_qkv_bias(backend, C):
    w, x = make(C, 5, 11, 2, qkv_bias=False)
    assert w.qkv_bias is None
    with torch.no_grad():
        ref = reference_group_mix_attention(x, (5, 11), w, default_hyper(C))
    out = run_eval(backend, x.float(), (5, 11), cast_weights(w, torch.float32))
    assert_rel(out, ref, FP32_TOL, f"{backend} eval, no qkv bias")


EVAL32_CASES = [(C, g) for C in WIDTHS for g in [(1, 1), (7, 9), (14, 14)]]
#: emulated backends: every width on small grids, 14x14 on two widths
EVAL32_LIGHT = [(C, g) for C in WIDTHS for g in [(1, 1), (7, 9)]] + [(80, (14, 14)), (320, (14, 14))]


@pytest.mark.parametrize("backend, C, grid", backend_cases(BACKEND_NAMES, EVAL32_CASES, EVAL32_LIGHT,
                                                           dtype=torch.float32))
def test_eval_float32(backend, C, grid):
    w, x = make(C, *grid, 3)
    with torch.no_grad():
        oracle = reference_group_mix_attention(x, grid, w, default_hyper(C))
    out = run_eval(backend, x.float(), grid, cast_weights(w, torch.float32))
    assert out.dtype == torch.float32
    assert_rel(out, oracle, FP32_TOL, f"{backend} eval float32")


LOWP_CASES = [(dt, C, g) for dt in (torch.float16, torch.bfloat16) for C in WIDTHS for g in [(7, 9), (14, 14)]]
LOWP_LIGHT = [(dt, C, (7, 9)) for dt in (torch.float16, torch.bfloat16) for C in WIDTHS]


@pytest.mark.parametrize("backend, dtype, C, grid", backend_cases(CANDIDATES, LOWP_CASES, LOWP_LIGHT,
                                                                  dtype=torch.float16))
def test_eval_low_precision(backend, dtype, C, grid):
    w, x = make(C, *grid, 1)
    wl, xl = cast_weights(w, dtype), x.to(dtype)
    with torch.no_grad():
        oracle = reference_group_mix_attention(x, grid, w, default_hyper(C))
        ref_lp = reference_group_mix_attention(xl, grid, wl, default_hyper(C))
    out = run_eval(backend, xl, grid, wl)
    assert out.dtype == dtype
    assert_within_reference_error(out, ref_lp, oracle, name=f"{backend} eval {dtype}")


# ------------------------------------------------------------------ train
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("grid", [(1, 1), (7, 9), (5, 11), (14, 14)], ids=gid)
@pytest.mark.parametrize("C", WIDTHS, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backend", train_backends(torch.float64))
def test_train_float64(backend, C, grid, B):
    w, x = make(C, *grid, B)
    exp = run_train(ORACLE, x, grid, w)
    got = run_train(backend, x, grid, w)
    compare_train(got, exp, FP64_TOL, backend)
    # the running statistics really moved, and w itself was left alone (private copies)
    assert not torch.equal(exp[2]["bn_running_mean[1]"], w.bn_running_mean[1])
    assert int(w.bn_num_batches_tracked[0]) == 0


@pytest.mark.parametrize("backend", train_backends(torch.float64))
def test_train_float64_56x56(backend):
    w, x = make(80, 56, 56, 1)
    compare_train(run_train(backend, x, (56, 56), w), run_train(ORACLE, x, (56, 56), w), FP64_TOL, backend)


@pytest.mark.parametrize("C", [40, 240], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backend", train_backends(torch.float64))
def test_train_without_qkv_bias(backend, C):
    w, x = make(C, 7, 9, 2, qkv_bias=False)
    compare_train(run_train(backend, x, (7, 9), w), run_train(ORACLE, x, (7, 9), w), FP64_TOL, backend)


@pytest.mark.parametrize("backend, C", backend_cases(BACKEND_NAMES, [40, 200, 480], [40], dtype=torch.float32,
                                                   training=True, needs_grad=True))
def test_train_float32(backend, C):
    w, x = make(C, 7, 9, 2)
    exp = run_train(ORACLE, x, (7, 9), w)  # float64 oracle
    got = run_train(backend, x, (7, 9), w, dtype=torch.float32)
    compare_train(got, exp, FP32_TOL, f"{backend} float32")


def _train_low_precision_cases():
    """(backend, dtype, C): every width for native backends, C=40 for emulated ones (the Triton
    interpreter; tests/test_triton_training.py checks it further)."""
    out = []
    for p in backend_dtype_params(CANDIDATES, [torch.float16, torch.bfloat16], training=True, needs_grad=True):
        backend, dtype = p.values
        for q in backend_cases([backend], [40, 200, 480], [40], dtype=dtype, training=True, needs_grad=True):
            out.append(pytest.param(backend, dtype, q.values[1], marks=p.marks, id=f"{p.id}-C{q.values[1]}"))
    return out


@pytest.mark.parametrize("backend, dtype, C", _train_low_precision_cases())
def test_train_low_precision(backend, dtype, C):
    """Output and input gradient in train mode within 2x the reference's own error at that dtype."""
    w, x = make(C, 7, 9, 2)
    oracle = run_train(ORACLE, x, (7, 9), w)
    ref_lp = run_train(ORACLE, x, (7, 9), w, dtype=dtype)
    got = run_train(backend, x, (7, 9), w, dtype=dtype)
    assert got[0].dtype == dtype
    assert_within_reference_error(got[0], ref_lp[0], oracle[0], name=f"train out {dtype}")
    for n in ("x", "qkv_weight", "proj_weight", "pw_weight[2]", "crpe_weight[1]"):
        assert_within_reference_error(got[1][n], ref_lp[1][n], oracle[1][n], floor=1e-3, name=f"grad {n} {dtype}")


@pytest.mark.parametrize("C", [80, 320], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backend", train_backends(torch.float64))
def test_train_two_steps_update_running_stats_twice(backend, C):
    """num_batches_tracked counts calls and the running statistics compound over calls."""
    w, x = make(C, 5, 11, 2)
    states = {}
    for name in (ORACLE, backend):
        wc = cast_weights(w)
        for _ in range(2):
            gmf_kernels.group_mix_attention(x, (5, 11), wc, training=True, backend=name)
        states[name] = wc
    for i in range(4):
        assert int(states[backend].bn_num_batches_tracked[i]) == 2
        assert int(states[ORACLE].bn_num_batches_tracked[i]) == 2
        assert_rel(states[backend].bn_running_var[i], states[ORACLE].bn_running_var[i], FP64_TOL, "var")
        assert_rel(states[backend].bn_running_mean[i], states[ORACLE].bn_running_mean[i], FP64_TOL, "mean")


@pytest.mark.parametrize("C", [40, 160], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backend", backend_params(CANDIDATES, dtype=torch.float64, needs_grad=True))
def test_eval_gradients_single_call(backend, C):
    """Eval mode (running statistics) with gradients of the input and every parameter."""
    w, x = make(C, 7, 9, 2)
    res = {}
    for name in (ORACLE, backend):
        wc = leaf_weights(w)
        xx = x.clone().requires_grad_(True)
        out = gmf_kernels.group_mix_attention(xx, (7, 9), wc, training=False, backend=name)
        params = named_fields(wc, PARAM_FIELDS)
        grads = torch.autograd.grad(out.square().sum(), [xx] + [t for _, t in params])
        res[name] = (out.detach(), dict(zip(["x"] + [n for n, _ in params], grads)))
    assert_rel(res[backend][0], res[ORACLE][0], FP64_TOL, "eval out")
    for n, g in res[ORACLE][1].items():
        assert_rel(res[backend][1][n], g, FP64_TOL, f"eval grad {n}")


@pytest.mark.parametrize("first", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", backend_params(CANDIDATES, dtype=torch.float64, needs_grad=True))
def test_eval_gradients_repeated_module(backend, first):
    torch.manual_seed(3)
    m = gmf_kernels.GroupMixAttention(80, 8, qkv_bias=True, backend=backend).double().eval()
    mr = copy.deepcopy(m).set_backend(ORACLE)
    x = torch.randn(2, 63, 80, dtype=torch.float64)
    if first == "no_grad":
        with torch.no_grad():
            m(x, (7, 9))
    elif first == "inference_mode":
        with torch.inference_mode():
            m(x, (7, 9))
    else:
        m(x, (7, 9)).sum().backward()
        m.zero_grad()
    m(x, (7, 9)).square().sum().backward()
    mr(x, (7, 9)).square().sum().backward()
    for (n, p), (_, pr) in zip(m.named_parameters(), mr.named_parameters()):
        assert p.grad is not None, f"no gradient for {n}"
        assert_rel(p.grad, pr.grad, FP64_TOL, f"grad {n}")


# ------------------------------------------------------------------ autocast
def _autocast_cases():
    """(backend, C, mode), each backend skipped with its reasons for that mode (a backend may give
    bfloat16 gradients in eval mode and refuse bfloat16 training). "infer": eval under
    inference_mode (the torch backend's eager inference path and oneDNN linears must step aside;
    C=80 only, and not for backends emulated here). Backends emulated here run each mode at one width."""
    out = []
    for mode in ("eval", "train", "infer"):
        for p in backend_params(CANDIDATES, dtype=torch.bfloat16, training=mode == "train", needs_grad=mode != "infer"):
            if mode == "infer" and emulated_here(p.values[0]):
                continue
            widths = (80,) if mode == "infer" else (80, 240)
            if emulated_here(p.values[0]):   # ~12 s a case there: one width per mode (s = 48 padded in eval)
                widths = {"eval": (240,), "train": (80,)}[mode]
            for C in widths:
                out.append(pytest.param(p.values[0], C, mode, marks=p.marks, id=f"{p.id}-C{C}-{mode}"))
    return out


@pytest.mark.parametrize("backend, C, mode", _autocast_cases())
def test_autocast_cpu_bfloat16(backend, C, mode):
    torch.manual_seed(C)
    base = gmf_kernels.GroupMixAttention(C, 8, qkv_bias=True)
    with torch.no_grad():  # realistic BatchNorm statistics
        for i in range(4):
            getattr(base.aggregator, f"norm{i}").running_var.uniform_(0.5, 2.0)
            getattr(base.aggregator, f"norm{i}").running_mean.normal_(0, 0.3)
    x = torch.randn(2, 7 * 9, C)
    oracle_m = copy.deepcopy(base).double().set_backend(ORACLE).train(mode == "train")
    oracle = oracle_m(x.double(), (7, 9)).detach()
    outs = {}
    for name in (backend, ORACLE):
        m = copy.deepcopy(base).set_backend(name).train(mode == "train")
        xx = x.clone().requires_grad_(mode != "infer")
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode(mode == "infer"):
            out = m(xx, (7, 9))
        assert out.dtype == torch.bfloat16, f"{name}: autocast output dtype {out.dtype}"
        if mode != "infer":
            out.float().sum().backward()
            assert torch.isfinite(xx.grad).all() and xx.grad.abs().max() > 0
        outs[name] = out.detach()
    assert_within_reference_error(outs[backend], outs[ORACLE], oracle, floor=1e-3, name=f"{backend} autocast")
    assert max_rel_error(outs[backend], outs[ORACLE]) < 3e-2


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend, dtype", backend_dtype_params(CANDIDATES, [torch.float16, torch.bfloat16],
                                                                 training=True, needs_grad=True))
def test_low_precision_layer_with_float32_norms(backend, dtype, mode):
    """model.half() then the BatchNorms .float() (apex O2's keep_batchnorm_fp32) and the local
    LayerNorm too: torch's norms take a 16-bit input with float32 parameters and buffers, so
    upstream runs it; every backend must too (it was refused as a dtype mismatch). Output and
    input gradient within the rule against the float64 oracle, next to the reference backend in
    the same configuration; the norms' gradients and running statistics stay float32."""
    torch.manual_seed(7)
    base = gmf_kernels.GroupMixAttention(40, 8, qkv_bias=True)
    with torch.no_grad():
        for i in range(4):
            getattr(base.aggregator, f"norm{i}").running_var.uniform_(0.5, 2.0)
            getattr(base.aggregator, f"norm{i}").running_mean.normal_(0, 0.3)
    x, size = torch.randn(2, 30, 40), (5, 6)
    runs = {}
    for name, dt in ((ORACLE, torch.float64), (ORACLE, dtype), (backend, dtype)):
        m = copy.deepcopy(base).to(dt).set_backend(name).train(mode == "train")
        if dt != torch.float64:   # the norms back in float32, their values as in base
            for (_, mod), (_, mod0) in zip(m.named_modules(), base.named_modules()):
                if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                    mod.float().load_state_dict(mod0.state_dict())
        xx = x.to(dt).requires_grad_()
        out = m(xx, size)
        out.float().square().sum().backward()
        assert out.dtype == dt
        runs[name if dt != torch.float64 else "oracle"] = (out.detach(), xx.grad, m)
    (o64, g64, m64), (oref, gref, mref), (out, grad, m) = runs["oracle"], runs[ORACLE], runs[backend]
    assert_within_reference_error(out, oref, o64, floor=1e-3, name=f"{backend} output")
    assert_within_reference_error(grad, gref, g64, floor=1e-3, name=f"{backend} input gradient")
    for name in ("running_var", "running_mean", "weight"):
        got, ref, exact = (getattr(mm.aggregator.norm1, name) for mm in (m, mref, m64))
        if name == "weight":
            got, ref, exact = got.grad, ref.grad, exact.grad
        assert got.dtype == torch.float32, f"norm1.{name}: {got.dtype}"
        assert_within_reference_error(got, ref, exact, floor=1e-3 if name == "weight" else 1e-4,
                                      name=f"{backend} norm1.{name}")


def test_autocast_dispatch_dtype_is_the_computed_one():
    """Under autocast every floating input but float64 is computed in autocast's dtype (an fp16
    input under bf16 autocast too): the problem the backends are chosen and tuned for says so."""
    from gmf_kernels.functional import make_problem
    w, hp = random_gma_weights(40), default_hyper(40)
    for x_dtype, expected in ((torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16),
                              (torch.float64, torch.float64)):
        x = torch.randn(1, 30, 40, dtype=x_dtype)
        ww = w if x_dtype == torch.float64 else cast_weights(w, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert make_problem(x, (5, 6), ww, hp, False).dtype == expected, x_dtype


# ------------------------------------------------------------------ robustness
def _views(x):
    B, N, C = x.shape
    t = x.transpose(1, 2).contiguous().transpose(1, 2)              # (B, N, C) with strides (NC, 1, N)
    wide = torch.zeros(B, N, 2 * C, dtype=x.dtype)
    wide[:, :, 1::2] = x
    strided = wide[:, :, 1::2]                                     # channel stride 2
    return {"transposed": t, "channel_strided": strided}


def _non_contiguous(view, C, grid):
    w, x = make(C, *grid, 3)
    if view == "batch_expanded":
        xv = x[:1].expand(3, -1, -1)
        x = xv.contiguous()
    else:
        xv = _views(x)[view]
    assert not xv.is_contiguous() and torch.equal(xv, x)
    return w, x, xv


VIEWS = ["transposed", "channel_strided", "batch_expanded"]


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("backend", eval_backends(torch.float32, CANDIDATES))
def test_non_contiguous_input_eval(backend, view):
    C, grid = 80, (5, 11)
    w, x, xv = _non_contiguous(view, C, grid)
    with torch.no_grad():
        ref = reference_group_mix_attention(x, grid, w, default_hyper(C))
    out = run_eval(backend, xv.float(), grid, cast_weights(w, torch.float32))
    assert_rel(out, ref, FP32_TOL, f"{backend} eval {view}")


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("backend", train_backends(torch.float64))
def test_non_contiguous_input_train(backend, view):
    C, grid = 80, (5, 11)
    w, x, xv = _non_contiguous(view, C, grid)
    compare_train(run_train(backend, xv, grid, w), run_train(ORACLE, x, grid, w), FP64_TOL, f"{backend} {view}")


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(BACKEND_NAMES, [torch.float32, torch.float64]))
def test_two_runs_bit_identical_eval(backend, dtype):
    C, grid = 200, (7, 9)
    w, x = make(C, *grid, 2)
    wd, xd = cast_weights(w, dtype), x.to(dtype)
    assert torch.equal(run_eval(backend, xd, grid, wd), run_eval(backend, xd, grid, wd))


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(BACKEND_NAMES, [torch.float32, torch.float64],
                                                                training=True, needs_grad=True))
def test_two_runs_bit_identical_train(backend, dtype):
    C, grid = 200, (7, 9)
    w, x = make(C, *grid, 2)
    r1 = run_train(backend, x, grid, w, dtype)
    r2 = run_train(backend, x, grid, w, dtype)
    assert torch.equal(r1[0], r2[0])
    for n in r1[1]:
        assert torch.equal(r1[1][n], r2[1][n]), n
    for n in r1[2]:
        assert torch.equal(r1[2][n], r2[2][n]), n


# ------------------------------------------------------------------ folded-weight cache
def _randomize_bn(m):
    with torch.no_grad():
        for i in range(4):
            n = getattr(m.aggregator, f"norm{i}")
            n.running_mean.normal_(0, 0.3)
            n.running_var.uniform_(0.5, 2.0)
            n.weight.normal_(1, 0.2)
            n.bias.normal_(0, 0.2)


CHANGES = {
    "qkv.weight": lambda m: m.qkv.weight.mul_(1.5),
    "qkv.bias": lambda m: m.qkv.bias.add_(0.3),
    "norm0.running_mean": lambda m: m.aggregator.norm0.running_mean.add_(0.5),
    "norm2.running_var": lambda m: m.aggregator.norm2.running_var.mul_(3.0),
    "norm3.weight": lambda m: m.aggregator.norm3.weight.mul_(-1.0),
    "norm1.bias": lambda m: m.aggregator.norm1.bias.add_(1.0),
    "agg3.conv1": lambda m: m.aggregator.agg3.conv1.weight.mul_(2.0),
    "agg1.pointwise": lambda m: m.aggregator.agg1.pointwise_conv.weight.add_(0.1),
    "agg0.conv1": lambda m: m.aggregator.agg0.conv.conv1.weight.mul_(-1.0),
    # (not a rescaling: the LayerNorm after it would undo that)
    "agg0.pointwise": lambda m: m.aggregator.agg0.conv.pointwise_conv.weight.add_(
        0.2 * torch.randn_like(m.aggregator.agg0.conv.pointwise_conv.weight)),
    "agg0.norm.weight": lambda m: m.aggregator.agg0.norm.weight.mul_(2.0),
    "crpe.1.bias": lambda m: m.crpe.conv_list[1].bias.add_(0.5),
    "crpe.2.weight": lambda m: m.crpe.conv_list[2].weight.mul_(3.0),
    "proj.weight": lambda m: m.proj.weight.mul_(0.5),
    "data_assign": lambda m: setattr(m.aggregator.agg2.conv1.weight, "data",
                                     m.aggregator.agg2.conv1.weight.data * 2.0),
    "copy_": lambda m: m.crpe.conv_list[0].weight.copy_(torch.randn_like(m.crpe.conv_list[0].weight)),
}


CACHE_CASES = backend_dtype_params(CANDIDATES, [torch.float64, torch.float32])
#: emulated backends: one change per kind of tensor (BN buffer, pointwise, CRPE, .data assignment)
CHANGES_LIGHT = ["agg1.pointwise", "data_assign"]  # (the cache is FusedBackend's, shared: two suffice)


def _change_cases():
    out = []
    for p in CACHE_CASES:
        backend, dtype = p.values
        light = backend_cases([backend], list(CHANGES), CHANGES_LIGHT, dtype=dtype)
        out += [pytest.param(backend, dtype, q.values[1], marks=p.marks + q.marks,
                             id=f"{p.id}-{q.values[1]}") for q in light]
    return out


@pytest.mark.parametrize("backend, dtype, change", _change_cases())
def test_folded_cache_invalidated_by_in_place_change(backend, dtype, change):
    torch.manual_seed(11)
    m = gmf_kernels.GroupMixAttention(80, 8, qkv_bias=True, backend=backend).to(dtype).eval()
    _randomize_bn(m)
    x = torch.randn(2, 7 * 9, 80, dtype=dtype)
    with torch.no_grad():
        before = m(x, (7, 9))
        assert torch.equal(before, m(x, (7, 9)))  # the cached path is stable
        CHANGES[change](m)
        after = m(x, (7, 9))
        ref = reference_group_mix_attention(x.double(), (7, 9), cast_weights(m.gma_weights(), torch.float64),
                                            m.hyper())
    assert max_rel_error(after, before) > 1e-3, f"output did not change after modifying {change}"
    assert_rel(after, ref, FP64_TOL if dtype == torch.float64 else FP32_TOL, f"after {change}")


@pytest.mark.parametrize("backend, dtype", CACHE_CASES)
def test_folded_cache_invalidated_by_load_state_dict(backend, dtype):
    torch.manual_seed(12)
    m = gmf_kernels.GroupMixAttention(160, 8, qkv_bias=True, backend=backend).to(dtype).eval()
    other = gmf_kernels.GroupMixAttention(160, 8, qkv_bias=True).to(dtype).eval()
    _randomize_bn(m)
    _randomize_bn(other)
    x = torch.randn(1, 5 * 11, 160, dtype=dtype)
    with torch.no_grad():
        before = m(x, (5, 11))
        m.load_state_dict(other.state_dict())
        after = m(x, (5, 11))
        expected = other.set_backend(ORACLE)(x, (5, 11))
    assert max_rel_error(after, before) > 1e-3
    assert_rel(after, expected, FP64_TOL if dtype == torch.float64 else FP32_TOL, "after load_state_dict")


@pytest.mark.parametrize("backend, dtype", CACHE_CASES)
def test_folded_cache_dropped_after_a_fused_optimizer_step(backend, dtype):
    """A layer trained in eval mode (a linear probe, frozen-BatchNorm fine-tuning) by a fused optimizer and
    evaluated between steps: torch.optim's fused steps bump no version counter, so the cache would keep the old
    fold (the output 0.4-6.9 off); every fold is dropped after any optimizer step."""
    torch.manual_seed(14)
    m = gmf_kernels.GroupMixAttention(80, 8, qkv_bias=True, backend=backend).to(dtype).eval()
    _randomize_bn(m)
    x = torch.randn(2, 63, 80, dtype=dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, fused=True)
    teacher = gmf_kernels.GroupMixAttention(80, 8, qkv_bias=True, backend=backend).to(dtype).eval()
    with torch.no_grad():
        before = m(x, (7, 9))
        teacher(x, (7, 9))
    from gmf_kernels import folding
    teacher_fold = dict(folding._DERIVED[teacher.qkv.weight])
    v = m.aggregator.agg1.pointwise_conv.weight._version
    m(x, (7, 9)).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = m(x, (7, 9))
        ref = reference_group_mix_attention(x.double(), (7, 9), cast_weights(m.gma_weights(), torch.float64),
                                            m.hyper())
    assert max_rel_error(after, before) > 1e-3
    assert_rel(after, ref, FP64_TOL if dtype == torch.float64 else FP32_TOL, "eval after a fused SGD step")
    # a model the optimizer does not step keeps its folds (a distillation teacher beside the trained model)
    assert all(folding._DERIVED[teacher.qkv.weight][k][1] is v[1] for k, v in teacher_fold.items())
    if m.aggregator.agg1.pointwise_conv.weight._version != v:   # what the test is for: a step the counters miss
        pytest.fail("torch's fused SGD step now bumps the version counter: the test no longer covers the hook alone")


def test_cache_stamp_taken_before_the_build():
    """A write landing while build() reads the tensors (another thread's load_state_dict) must leave the entry
    stale, not stamped with the new versions over a value of the old weights (a thread race did, for good)."""
    from gmf_kernels import folding
    owner, t = torch.zeros(1), torch.zeros(3)

    def build_during_a_write():
        value = t.clone()
        t.add_(1.0)            # the concurrent write, after build() has read the old values
        return value
    assert torch.equal(folding.cached_for(owner, "tag", [t], build_during_a_write), torch.zeros(3))
    assert torch.equal(folding.cached_for(owner, "tag", [t], lambda: t.clone()), torch.ones(3)), "stale hit"


def test_cache_sweep_survives_a_concurrent_insert(monkeypatch):
    """The miss path's sweep of stale entries iterates a snapshot: another thread inserting meanwhile raised
    'dictionary changed size during iteration' in a serving thread."""
    from gmf_kernels import folding
    owner, t = torch.zeros(1), torch.zeros(3)
    folding.cached_for(owner, "a", [t], lambda: 1)
    entries = folding._DERIVED[owner]
    real = folding.stamp_matches

    def insert_meanwhile(stamp, tensors):
        entries.setdefault("inserted by another thread", (stamp, 0))
        return real(stamp, tensors)
    monkeypatch.setattr(folding, "stamp_matches", insert_meanwhile)
    with torch.no_grad():
        t.add_(1.0)
    assert folding.cached_for(owner, "b", [t], lambda: 2) == 2


@pytest.mark.parametrize("backend, dtype", CACHE_CASES)
def test_folded_cache_follows_train_mode_updates(backend, dtype):
    """A train step (oracle) updates the BN running statistics; the next eval call must use them."""
    torch.manual_seed(13)
    m = gmf_kernels.GroupMixAttention(80, 8, qkv_bias=True, backend=backend).to(dtype).eval()
    x = torch.randn(2, 63, 80, dtype=dtype)
    with torch.no_grad():
        before = m(x, (7, 9))
        m.set_backend(ORACLE).train()
        m(x * 3 + 1, (7, 9))
        m.set_backend(backend).eval()
        after = m(x, (7, 9))
        ref = reference_group_mix_attention(x.double(), (7, 9), cast_weights(m.gma_weights(), torch.float64),
                                            m.hyper())
    assert max_rel_error(after, before) > 1e-3
    assert_rel(after, ref, FP64_TOL if dtype == torch.float64 else FP32_TOL, "eval after train step")


def test_folded_cache_dtype_switch():
    """The same module converted float64 -> float32 -> float64 uses weights of the current values."""
    torch.manual_seed(14)
    m = gmf_kernels.GroupMixAttention(40, 8, qkv_bias=True, backend="torch").double().eval()
    _randomize_bn(m)
    x = torch.randn(1, 30, 40, dtype=torch.float64)
    with torch.no_grad():
        ref = reference_group_mix_attention(x, (5, 6), m.gma_weights(), m.hyper())
        assert_rel(m(x, (5, 6)), ref, FP64_TOL, "fp64")
        m.float()
        assert_rel(m(x.float(), (5, 6)), ref, FP32_TOL, "fp32")
        m.qkv.weight.mul_(2.0)
        m.double()
        ref2 = reference_group_mix_attention(x, (5, 6), m.gma_weights(), m.hyper())
        assert_rel(m(x, (5, 6)), ref2, FP64_TOL, "fp64 after change")


def test_cache_stamp_is_the_storage_not_its_address():
    """A cache key matches the same storage only: another storage at the same address (what the CUDA
    caching allocator hands out after a free; an alias of the memory here) does not, nor an in-place
    change, a new dtype or a different view offset."""
    from gmf_kernels.folding import cache_stamp, stamp_matches
    a = torch.randn(6)
    stamp = cache_stamp([a])
    assert stamp_matches(stamp, [a])
    alias = torch.from_dlpack(a)          # the same memory, another storage object
    assert alias.data_ptr() == a.data_ptr() and not stamp_matches(stamp, [alias])
    assert not stamp_matches(stamp, [a[1:]]) and not stamp_matches(stamp, [a.double()])
    a.add_(1)
    assert not stamp_matches(stamp, [a])


def test_nothing_is_cached_during_a_cuda_graph_capture(monkeypatch):
    """While a CUDA graph is captured the folds are built every call (recorded into the graph),
    never taken from or put in the cache."""
    from gmf_kernels import folding
    m = gmf_kernels.GroupMixAttention(40, 8, qkv_bias=True, backend="torch").eval()
    w = m.gma_weights()
    calls = []

    def build():
        calls.append(1)
        return len(calls)
    assert folding.cached_derived(w, "t", build) == 1 and folding.cached_derived(w, "t", build) == 1
    monkeypatch.setattr(folding, "capturing", lambda: True)
    assert folding.cached_derived(w, "t", build) == 2 and folding.cached_derived(w, "t", build) == 3
    monkeypatch.setattr(folding, "capturing", lambda: False)
    assert folding.cached_derived(w, "t", build) == 1   # the entry from before the capture, untouched


def test_stale_cache_entries_are_dropped():
    """After the weights change (here a dtype round trip: new storages), the next miss drops every
    entry made from the old weights, not only the one it rebuilds; entries of the current weights
    (another tag) stay."""
    from gmf_kernels import folding
    m = gmf_kernels.GroupMixAttention(40, 8, qkv_bias=True, backend="torch").eval()
    folding.cached_derived(m.gma_weights(), "a", lambda: "a0")
    folding.cached_derived(m.gma_weights(), "b", lambda: "b0")
    m.double()
    w = m.gma_weights()
    assert folding.cached_derived(w, "a", lambda: "a1") == "a1"
    cache = folding._DERIVED[w.qkv_weight]
    assert set(cache) == {"a"}                      # "b" (old weights) dropped
    assert folding.cached_derived(w, "b", lambda: "b1") == "b1"
    assert folding.cached_derived(w, "a", lambda: "a2") == "a1" and set(cache) == {"a", "b"}


@pytest.mark.parametrize("backend, dtype", CACHE_CASES)
def test_writes_through_data_taken_after_clear_weight_cache_or_eval(backend, dtype):
    """A write through ``.data`` does not bump the version counter the cache is keyed on (an EMA
    update written ``p.data.mul_(d).add_(q.data, alpha=1 - d)``, say): `gmf_kernels.clear_weight_cache`
    of the layer, or its ``.eval()`` / ``.train()``, makes the next eval call use the new values."""
    torch.manual_seed(15)
    m = gmf_kernels.GroupMixAttention(80, 8, qkv_bias=True, backend=backend).to(dtype).eval()
    _randomize_bn(m)
    x = torch.randn(2, 7 * 9, 80, dtype=dtype)
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL

    def reference():
        return reference_group_mix_attention(x.double(), (7, 9), cast_weights(m.gma_weights(), torch.float64),
                                             m.hyper())
    with torch.no_grad():
        before = m(x, (7, 9))                                        # fills the cache
        m.aggregator.agg2.pointwise_conv.weight.data.mul_(-1.5)      # not seen by the version counters
        m.aggregator.norm3.running_var.data.mul_(3.0)
        gmf_kernels.clear_weight_cache(m)
        after = m(x, (7, 9))
        assert max_rel_error(after, before) > 1e-3
        assert_rel(after, reference(), tol, "after clear_weight_cache")
        m.crpe.conv_list[2].weight.data.mul_(2.0)
        m.eval()
        assert_rel(m(x, (7, 9)), reference(), tol, "after .eval()")


def test_layer_pickles_and_copies_without_its_cache():
    """The cache is held beside the layer, not on it: torch.save of a layer that has run an eval call
    works (it failed on the cache's weak references), the loaded layer computes the same, and a deep
    copy starts without cache entries."""
    import io

    from gmf_kernels import folding
    torch.manual_seed(16)
    m = gmf_kernels.GroupMixAttention(40, 8, qkv_bias=True, backend="torch").eval()
    x = torch.randn(1, 15, 40)
    with torch.no_grad():
        out = m(x, (3, 5))
    assert m.qkv.weight in folding._DERIVED
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(m)
    assert loaded.qkv.weight not in folding._DERIVED and copied.qkv.weight not in folding._DERIVED
    with torch.no_grad():
        assert torch.equal(loaded(x, (3, 5)), out) and torch.equal(copied(x, (3, 5)), out)
