"""Bad and edge inputs (issue 11, items 4 and 6): an empty batch, wrong `weights` / `convert`
arguments, a non-finite input under check=True, set_backend of a backend that cannot run
here, and the install / test-infrastructure decisions (setup.py's CUDA-build choice, the
golden-vector skip)."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

import conftest
import gmf_kernels as gmf
from gmf_kernels.backends import BACKEND_NAMES, get_backend
from gmf_kernels.numerics import random_gma_weights
from helpers import backend_dtype_params, backend_params, emulated_here

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = [(7, 9), (5, 4)]


def _layer(C=80, dtype=torch.float32, backend="auto", **kw):
    m = gmf.GroupMixAttention(C, qkv_bias=True, backend=backend, **kw).to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm buffers, so an update would show
        for i in range(4):
            n = getattr(m.aggregator, f"norm{i}")
            n.running_mean.normal_()
            n.running_var.uniform_(0.5, 2.0)
    return m


def _bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches_tracked" in k}


# ------------------------------------------------------------------ empty batch: the module
@pytest.mark.parametrize("size", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(BACKEND_NAMES, [torch.float32, torch.bfloat16]))
def test_empty_batch_eval(backend, dtype, size):
    C = 80
    m = _layer(C, dtype, backend).eval()
    x = torch.randn(0, size[0] * size[1], C, dtype=dtype)
    with torch.no_grad():
        y = m(x, size)
    assert y.shape == (0, size[0] * size[1], C) and y.dtype == dtype and y.device == x.device
    if emulated_here(backend):  # the Triton interpreter: a real batch costs seconds
        return
    # the same layer still runs a real batch (the empty one left nothing behind)
    with torch.no_grad():
        assert m(torch.randn(2, size[0] * size[1], C, dtype=dtype), size).shape == (2, size[0] * size[1], C)


@pytest.mark.parametrize("backend", backend_params(BACKEND_NAMES, dtype=torch.float64, training=True,
                                                   needs_grad=True))
def test_empty_batch_train_with_grad(backend):
    """Training mode with gradients: an empty, differentiable result; a backward gives x and
    every parameter a zero gradient, as torch's own layers do; running statistics unchanged, and each
    BatchNorm in training mode counts the batch (num_batches_tracked + 1) as nn.BatchNorm2d does (a
    frozen one, in eval mode, does not: per-BatchNorm modes run on the reference backend only)."""
    C, size = 40, (6, 5)
    m = _layer(C, torch.float64, backend).train()
    frozen = "norm2" if backend == "reference" else None
    if frozen:
        m.aggregator.norm2.eval()
    before = _bn_state(m)
    bn = torch.nn.BatchNorm2d(3).train()
    bn(torch.randn(0, 3, 4, 4))
    counted = int(bn.num_batches_tracked)                  # what torch's own layer does: 1
    x = torch.randn(0, 30, C, dtype=torch.float64, requires_grad=True)
    y = m(x, size)
    assert y.shape == (0, 30, C) and y.dtype == torch.float64 and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    for k, v in _bn_state(m).items():
        if k.endswith("num_batches_tracked") and not (frozen and frozen in k):
            assert int(v) == int(before[k]) + counted, k
        else:
            assert torch.equal(v, before[k]), f"{k} changed on an empty batch"


@pytest.mark.parametrize("backend", backend_params(BACKEND_NAMES, dtype=torch.float64, training=True))
def test_empty_batch_weighs_a_later_cumulative_average_as_nn_batchnorm(backend):
    """momentum=None (cumulative average) from num_batches_tracked = 0: after [empty batch, batch] the running
    mean is halfway between the old one and the batch's (the batch weighed 1/2, the empty one counted), as
    nn.BatchNorm2d's own sequence gives; after [batch] alone it is the batch's (weighed 1/1)."""
    C, size = 40, (6, 5)
    m = _layer(C, torch.float64, backend).train()
    for i in range(4):
        getattr(m.aggregator, f"norm{i}").momentum = None
    once = _layer(C, torch.float64, "reference").train()
    once.load_state_dict(m.state_dict())
    for i in range(4):
        getattr(once.aggregator, f"norm{i}").momentum = None
    old = _bn_state(m)
    x = torch.randn(2, 30, C, dtype=torch.float64)
    with torch.no_grad():
        m(x[:0], size)
        m(x, size)
        once(x, size)
    bn = torch.nn.BatchNorm2d(3, momentum=None).double().train()
    x_bn = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    bn(x_bn[:0])
    bn(x_bn)
    torch.testing.assert_close(bn.running_mean, x_bn.mean(dim=(0, 2, 3)) / 2)     # torch's own layer: halfway
    for i in range(4):
        ours, batch = getattr(m.aggregator, f"norm{i}"), getattr(once.aggregator, f"norm{i}")
        assert int(ours.num_batches_tracked) == 2 and int(batch.num_batches_tracked) == 1
        torch.testing.assert_close(ours.running_mean, (old[f"aggregator.norm{i}.running_mean"] + batch.running_mean) / 2)


@pytest.mark.parametrize("backend", backend_params(BACKEND_NAMES))
def test_empty_batch_functional_every_backend_passes_the_same_place(backend, monkeypatch):
    """The short-circuit is in Backend.forward, which every backend goes through: no
    backend's own pre-projection (kernel launch) sees an empty batch."""
    b = get_backend(backend)
    monkeypatch.setattr(b, "pre_projection", lambda *a, **k: pytest.fail("pre_projection ran on B=0"))
    w = random_gma_weights(80, dtype=torch.float32, seed=1)
    with torch.no_grad():
        y = gmf.group_mix_attention(torch.randn(0, 63, 80), (7, 9), w, backend=backend)
    assert y.shape == (0, 63, 80) and y.dtype == torch.float32


def test_empty_batch_keeps_the_other_checks():
    m = _layer(80).eval()
    with pytest.raises(ValueError, match="N=62 tokens"):
        m(torch.randn(0, 62, 80), (7, 9))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(0, 63, 40), (7, 9))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.zeros(0, 63, 80, dtype=torch.int64), (7, 9))


def test_empty_batch_check_mode_skips_the_comparison():
    m = _layer(80, check=True, backend="torch").eval()
    with torch.no_grad():
        assert m(torch.randn(0, 63, 80), (7, 9)).shape == (0, 63, 80)


# ------------------------------------------------------------------ empty batch: the model
@pytest.mark.parametrize("name,num_classes,mode", [("groupmixformer_t", 1000, "eval"),
                                                   ("groupmixformer_m", 10, "train")])
def test_empty_batch_model(name, num_classes, mode):
    model = gmf.create_model(name, num_classes=num_classes).train(mode == "train")
    x = torch.randn(0, 3, 224, 224, requires_grad=(mode == "train"))
    with torch.set_grad_enabled(mode == "train"):
        y = model(x)
    assert y.shape == (0, num_classes) and y.dtype == torch.float32
    if mode == "train":
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


# ------------------------------------------------------------------ functional: the weights argument
@pytest.mark.parametrize("bad,kind", [(None, "None"), ("state_dict", "state_dict"), ("module", "GroupMixAttention"),
                                      (3, "int"), ("list", "list")])
def test_functional_rejects_non_weights(bad, kind):
    m = _layer(80)
    bad = {"state_dict": m.state_dict(), "module": m, "list": list(m.gma_weights())}.get(bad, bad)
    with pytest.raises(TypeError) as info:
        gmf.group_mix_attention(torch.randn(1, 63, 80), (7, 9), bad)
    msg = str(info.value)
    assert kind in msg and "GMAWeights" in msg, msg
    assert "gma_weights()" in msg  # says what to pass


@pytest.mark.parametrize("field,mangle", [
    ("proj_weight", lambda t: t[:, :-10]),
    ("dw_weight", lambda ts: ts[:2]),
    ("crpe_bias", lambda ts: (ts[0], ts[1], ts[2][:-1])),
    ("local_pw_weight", lambda t: t.transpose(0, 1)),
    ("bn_running_var", lambda ts: ts[:3] + (ts[3][:-1],)),
])
def test_functional_rejects_misshapen_weights(field, mangle):
    w = random_gma_weights(80, dtype=torch.float32, seed=2)
    bad = w._replace(**{field: mangle(getattr(w, field))})
    with pytest.raises(ValueError, match=f"weights.{field}: expected shape"):
        gmf.group_mix_attention(torch.randn(1, 63, 80), (7, 9), bad)
    with torch.no_grad():  # the untouched weights run
        assert gmf.group_mix_attention(torch.randn(1, 63, 80), (7, 9), w).shape == (1, 63, 80)


def test_functional_rejects_missing_tuple():
    w = random_gma_weights(80, dtype=torch.float32, seed=3)
    with pytest.raises(TypeError, match="weights.crpe_weight must be a tuple of 3 tensors"):
        gmf.group_mix_attention(torch.randn(1, 63, 80), (7, 9), w._replace(crpe_weight=None))
    with pytest.raises(TypeError, match="qkv_weight must be a 2-D tensor"):
        gmf.group_mix_attention(torch.randn(1, 63, 80), (7, 9), w._replace(qkv_weight=None))


# ------------------------------------------------------------------ convert
@pytest.mark.parametrize("bad", [None, "model", 3, torch.zeros(2)], ids=["None", "str", "int", "tensor"])
def test_convert_rejects_non_modules(bad):
    with pytest.raises(TypeError, match=r"convert\(\) takes a torch.nn.Module.*got "
                       + {type(None): "None"}.get(type(bad), type(bad).__name__)):
        gmf.convert(bad)


# ------------------------------------------------------------------ check=True with non-finite input
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", backend_params(["cuda", "triton", "torch"]))
def test_check_blames_a_nonfinite_input(backend, value):
    from gmf_kernels.selfcheck import SelfCheckError
    m = _layer(80, backend=backend, check=True).eval()
    x = torch.randn(2, 63, 80)
    if not emulated_here(backend):  # (the Triton interpreter takes seconds per call)
        with torch.no_grad():
            assert m(x, (7, 9)).shape == x.shape  # finite: the check runs and passes
    x[1, 5, 7] = value
    with torch.no_grad(), pytest.raises(ValueError) as info:
        m(x, (7, 9))
    assert not isinstance(info.value, SelfCheckError)
    msg = str(info.value)
    assert "input x" in msg and "non-finite" in msg and "not the backend" in msg, msg


@pytest.mark.parametrize("backend", backend_params(["torch"]))
def test_check_blames_nonfinite_weights(backend):
    m = _layer(80, backend=backend, check=True).eval()
    with torch.no_grad():
        m.crpe.conv_list[1].weight[0, 0, 2, 2] = float("nan")
        with pytest.raises(ValueError, match=r"weights.crpe_weight\[1\] contain non-finite"):
            m(torch.randn(1, 63, 80), (7, 9))


# ------------------------------------------------------------------ set_backend validates when called
REASON = "triton is not installed; pip install triton"


@pytest.fixture
def triton_unavailable(monkeypatch):
    monkeypatch.setattr(get_backend("triton"), "availability_reasons", lambda: [REASON])


def test_set_backend_raises_when_the_backend_cannot_run(triton_unavailable):
    m = _layer(80)
    with pytest.raises(ValueError) as info:
        m.set_backend("triton")
    assert "'triton' cannot run on this machine" in str(info.value) and REASON in str(info.value)
    assert m.backend == "auto"  # unchanged
    model = gmf.create_model("groupmixformer_m")
    with pytest.raises(ValueError, match=REASON):
        model.set_backend("triton")
    with pytest.raises(ValueError, match=REASON):
        gmf.convert(model, backend="triton")
    # "auto" (and None) keep working, and run
    for auto in ("auto", None):
        assert m.set_backend(auto).backend == "auto"
    assert model.set_backend("auto") is model
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 63, 80), (7, 9)).shape == (1, 63, 80)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_set_backend_cuda_on_a_cpu_machine_raises_now():
    with pytest.raises(ValueError, match="'cuda' cannot run on this machine"):
        _layer(80).set_backend("cuda")


@pytest.mark.parametrize("name", [n for n in BACKEND_NAMES if not get_backend(n).availability_reasons()])
def test_set_backend_accepts_every_available_backend(name):
    assert _layer(80).set_backend(name).backend == name


# ------------------------------------------------------------------ setup.py: the CUDA-build decision
@pytest.fixture(scope="module")
def setup_py():
    """setup.py imported as a module (setup() runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("gmf_setup_under_test", os.path.join(REPO, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("env,nvcc,torch_found,torch_cuda,build,says", [
    ({}, True, True, None, False, "torch has no CUDA"),
    ({}, True, True, "12.8", True, "torch CUDA 12.8"),
    ({}, True, False, None, True, "torch not found"),
    ({}, False, True, "12.8", False, "nvcc not found"),
    ({"GMF_FORCE_CUDA_BUILD": "1"}, True, True, None, True, "GMF_FORCE_CUDA_BUILD=1"),
    ({"GMF_CUDA_ARCHS": "80;90"}, True, True, None, True, "GMF_CUDA_ARCHS=80;90"),
    ({"GMF_CUDA_ARCHS": " "}, True, True, None, False, "torch has no CUDA"),
    ({"GMF_SKIP_CUDA_BUILD": "1", "GMF_FORCE_CUDA_BUILD": "1"}, True, True, "12.8", False, "GMF_SKIP_CUDA_BUILD=1"),
    ({"GMF_FORCE_CUDA_BUILD": "1"}, False, True, None, False, "nvcc not found"),
])
def test_setup_cuda_build_decision(setup_py, env, nvcc, torch_found, torch_cuda, build, says):
    decided, line = setup_py.cuda_build_decision(env, nvcc, torch_found, torch_cuda)
    assert decided is build and says in line and "\n" not in line and line.startswith("gmf_kernels: ")


def test_setup_reads_torch_cuda_without_importing(setup_py, tmp_path):
    for text, expected in [("cuda: Optional[str] = None\n", None), ("cuda: Optional[str] = '12.8'\n", "12.8"),
                           ("debug = False\ncuda = \"13.0\"\nhip = None\n", "13.0")]:
        (tmp_path / "version.py").write_text("from typing import Optional\n__version__ = '2.13.0'\n" + text)
        assert setup_py._torch_version_file_cuda(str(tmp_path / "version.py")) == (True, expected)
    assert setup_py._torch_version_file_cuda(str(tmp_path / "absent.py")) == (False, None)
    # this environment's torch, as the build sees it
    assert setup_py.torch_cuda_version() == (True, torch.version.cuda)


def test_setup_loads_the_cuda_build_by_path(setup_py, monkeypatch, tmp_path):
    """setup.py loads gmf_kernels/cuda/build.py by path, outside the package (no relative imports there: one
    made every CUDA build at install time fail), and its entry point reads GMF_VERBOSE itself."""
    build = setup_py._load_cuda_build()
    seen = {}
    monkeypatch.setattr(build, "build", lambda **kw: seen.update(kw) or "built")
    monkeypatch.setenv("GMF_VERBOSE", "true")
    assert build.build_ahead_of_time(tmp_path) == "built" and seen["verbose"] is True
    monkeypatch.setenv("GMF_VERBOSE", "0")
    build.build_ahead_of_time(tmp_path)
    assert seen["verbose"] is False


# ------------------------------------------------------------------ golden vectors absent
def test_golden_absent_skips_outside_ci_and_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "GOLDEN_DIR", str(tmp_path))
    for var in ("CI", "GMF_REQUIRE_GOLDEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(pytest.skip.Exception, match="gma_module.pt not found: set GMF_GOLDEN_DIR"):
        conftest.golden_path("gma_module.pt")
    for var, value in (("CI", "true"), ("GMF_REQUIRE_GOLDEN", "1")):
        monkeypatch.setenv(var, value)
        with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as info:
            conftest.golden_path("gma_module.pt")
        assert info.type is pytest.fail.Exception, f"{var}={value}: skipped instead of failing"
        assert "gma_module.pt not found" in str(info.value)
        monkeypatch.delenv(var)
    (tmp_path / "gma_module.pt").write_bytes(b"")
    assert conftest.golden_path("gma_module.pt") == os.path.join(str(tmp_path), "gma_module.pt")


@pytest.mark.parametrize("training", [True, (False, True, False, False)], ids=["train", "one-bn-train"])
@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if not get_backend(b).empty_batch_joins_sync])
def test_empty_batch_with_synchronised_statistics_refuses(backend, training):
    """Training with a process group (resolved: more than one rank) and an empty batch, on a backend that cannot
    join the other ranks' all-reduces with it: a ValueError naming the cause and the way out, before any kernel,
    not a silent return that leaves the other ranks waiting; in eval (nothing to synchronise) the empty result as
    usual. (The backends that join: tests/test_syncbn.py's empty-rank case, two processes.)"""
    from gmf_kernels.numerics import default_hyper
    C = 40
    w = random_gma_weights(C, seed=0, dtype=torch.float32)
    hp = default_hyper(C)._replace(bn_process_group=object())   # stands in for a resolved group
    x = torch.randn(0, 30, C)
    with pytest.raises(ValueError, match=f"empty batch .* on this rank .* the {backend} backend cannot take part"):
        get_backend(backend).forward(x, (6, 5), w, hp, training)
    assert get_backend(backend).forward(x, (6, 5), w, hp, False).shape == (0, 30, C)


# ------------------------------------------------------------------ large activations in 16-bit training
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(BACKEND_NAMES, [torch.float16, torch.bfloat16],
                                                               training=True, B=2, H=3, W=5, dim=40))
def test_training_batch_statistics_of_large_activations(backend, dtype):
    """A layer in fp16 / bf16 training whose BatchNorm inputs have variances past fp16's range (the largest
    2e5: the input scaled to that): the batch statistics are taken in fp32 (as F.batch_norm does), so the output and the running
    variances (16-bit buffers, blended in fp32 and rounded once) keep the reference's accuracy at that dtype
    against the float64 oracle. (An fp16 variance overflowed: rsqrt(inf) = 0 gave every token beta, 0.38
    off, and inf running variances.)"""
    from helpers import assert_within_reference_error
    C, size = 40, (3, 5)
    torch.manual_seed(0)
    m = gmf.GroupMixAttention(C, qkv_bias=True, backend=backend).train()
    low = gmf.GroupMixAttention(C, qkv_bias=True, backend="reference").train()
    oracle = gmf.GroupMixAttention(C, qkv_bias=True, backend="reference").train()
    low.load_state_dict(m.state_dict())
    oracle.load_state_dict(m.state_dict())
    m, low, oracle = m.to(dtype), low.to(dtype), oracle.double()
    x = torch.randn(2, 15, C)
    probe = copy.deepcopy(oracle)                 # the batch variances at input scale 1 (momentum 1: the buffers)
    for i in range(4):
        getattr(probe.aggregator, f"norm{i}").momentum = 1.0
    with torch.no_grad():
        probe(x.double(), size)
    v1 = max(float(getattr(probe.aggregator, f"norm{i}").running_var.max()) for i in range(4))
    x = (x * (2e5 / v1) ** 0.5).to(dtype)         # largest variance 2e5: past fp16, its running blend (2e4) not
    with torch.no_grad():
        y, y_low, y64 = m(x, size), low(x, size), oracle(x.double(), size)
    assert_within_reference_error(y.double(), y_low.double(), y64, name=f"{backend} output")
    for i in range(4):
        rv = getattr(m.aggregator, f"norm{i}").running_var
        assert rv.dtype == dtype and bool(torch.isfinite(rv).all()), f"norm{i}.running_var"
        assert_within_reference_error(rv.double(), getattr(low.aggregator, f"norm{i}").running_var.double(),
                                      getattr(oracle.aggregator, f"norm{i}").running_var, name=f"norm{i}.running_var")
    # the case is the one asked for: a batch variance (running_var = 0.9 + 0.1 var) past fp16's largest value
    assert max(float(getattr(oracle.aggregator, f"norm{i}").running_var.max()) for i in range(4)) > 0.9 + 0.1 * 65504


def test_running_statistics_of_16_bit_buffers_blend_in_fp32():
    """`update_running_stats` with fp16 buffers and a batch variance above fp16's largest value: the blend
    0.9 old + 0.1 var is representable and stored (nn.BatchNorm2d's result), not inf."""
    from gmf_kernels.folding import update_running_stats
    from gmf_kernels.numerics import default_hyper
    w = random_gma_weights(40, dtype=torch.float16, seed=3)
    w = w._replace(bn_running_var=tuple(torch.ones(8, dtype=torch.float16) for _ in range(4)),
                   bn_running_mean=tuple(torch.zeros(8, dtype=torch.float16) for _ in range(4)),
                   bn_num_batches_tracked=tuple(torch.zeros((), dtype=torch.long) for _ in range(4)))
    hp = default_hyper(40)._replace(bn_momentum=0.1)
    var = torch.full((4, 8), 1e5)
    update_running_stats(w, hp, torch.zeros(4, 8), var, n=1000)
    expect = torch.tensor(0.9 + 0.1 * 1e5 * 1000 / 999).to(torch.float16)
    for rv in w.bn_running_var:
        assert rv.dtype == torch.float16 and torch.equal(rv, expect.expand(8)), rv


# ------------------------------------------------------------------ size argument, environment switches
@pytest.mark.parametrize("size", [16, None, torch.tensor(16), "44", (1.5, 2), (True, 2), (1, 2, 3)],
                         ids=["int", "None", "0-d tensor", "str", "float", "bool", "triple"])
def test_size_not_a_pair_is_named(size):
    m = _layer(40, backend="torch").eval()
    with pytest.raises(ValueError, match=r"size must be a pair \(H, W\)"):
        m(torch.randn(1, 16, 40), size)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("TRUE", True), ("on", True), ("yes", True),
                                            ("y", True), ("0", False), ("false", False), ("off", False), ("no", False),
                                            ("", False), ("2", None), ("maybe", None)])
def test_environment_switches(monkeypatch, value, expected):
    """The library's boolean switches read 1/true/on/yes and 0/false/off/no alike, and refuse anything else by
    name (GMF_CHECK=2 silently left the check off); TRITON_INTERPRET is read exactly as Triton reads it."""
    from gmf_kernels._env import env_flag, triton_interpreting
    monkeypatch.setenv("GMF_CHECK", value)
    if expected is None:
        with pytest.raises(ValueError, match="GMF_CHECK"):
            env_flag("GMF_CHECK")
        with pytest.raises(ValueError, match="GMF_CHECK"):
            _layer(40, backend="torch").eval()(torch.randn(1, 12, 40), (3, 4))
    else:
        assert env_flag("GMF_CHECK") is expected
    monkeypatch.delenv("GMF_CHECK")
    assert env_flag("GMF_CHECK") is False and env_flag("GMF_CHECK", True) is True
    import triton
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() is bool(triton.knobs.runtime.interpret), value


def test_gmf_check_true_runs_the_check(monkeypatch):
    """GMF_CHECK=true (not only "1") runs the comparison with the reference."""
    import gmf_kernels.selfcheck as sc
    calls = []
    real = sc.run_checked
    monkeypatch.setattr(sc, "run_checked", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("GMF_CHECK", "true")
    with torch.no_grad():
        _layer(40, backend="torch").eval()(torch.randn(1, 12, 40), (3, 4))
    assert calls == [1]


# ------------------------------------------------------------------ double backward
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", backend_params(BACKEND_NAMES, training=True, needs_grad=True, B=2, H=2, W=3,
                                                   dim=20))
def test_double_backward_right_or_refused(backend, mode):
    """A gradient of a gradient (create_graph=True): the backends that declare it (`supports_double_backward`)
    give the reference's, the others raise an error naming the backend at the second backward, towards the
    input and towards a parameter alike; never a gradient with terms missing. The first-order gradient with
    create_graph=True is the plain one."""
    C, size = 20, (2, 3)
    torch.manual_seed(0)
    m = gmf.GroupMixAttention(C, qkv_bias=True, backend=backend).train(mode == "train")
    ref = gmf.GroupMixAttention(C, qkv_bias=True, backend="reference").train(mode == "train")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 6, C)
    for target in ("x", "qkv.weight"):
        grads = []
        for layer in (m, ref):
            xx = x.clone().requires_grad_()
            g, = torch.autograd.grad((layer(xx, size) ** 2).sum(), xx, create_graph=True)
            wrt = xx if target == "x" else layer.qkv.weight
            if layer is m and not get_backend(backend).supports_double_backward:
                with pytest.raises(RuntimeError, match=f"double backward .* not supported by the {backend} backend"):
                    torch.autograd.grad((g ** 2).sum(), wrt)
                plain, = torch.autograd.grad((layer(xx, size) ** 2).sum(), xx)
                torch.testing.assert_close(g.detach(), plain, rtol=0, atol=0)
                break
            grads.append(torch.autograd.grad((g ** 2).sum(), wrt)[0])
        if len(grads) == 2:
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4 * float(grads[1].abs().max()))


@pytest.mark.parametrize("backend", backend_params(["reference", "torch"], training=True))
def test_functional_training_flag_as_int(backend):
    """training=1 (or a tuple of ints) is training=True on every backend (the reference's F.batch_norm took a
    bool only: a TypeError there, while torch and auto accepted it)."""
    x = torch.randn(2, 12, 40)
    outs = []
    for flag in (True, 1, (1, 1, 1, 1)):
        w = random_gma_weights(40, dtype=torch.float32, seed=1)
        outs.append(gmf.group_mix_attention(x, (3, 4), w, training=flag, backend=backend))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
