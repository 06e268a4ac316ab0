"""Dispatch (docs/architecture.md), input validation, the info/selfcheck entry points and check=True.

* `available_backends()`; unknown names; an explicit backend that refuses raises
  ValueError with its reasons; "auto" picks torch on a CPU; nothing fitting raises
  NotImplementedError listing every backend's reasons.
* Bad inputs raise ValueError (shapes/values) or TypeError (dtypes/devices) with a
  message naming the problem (gmf_kernels/_validation.py).
* `python -m gmf_kernels.info` and `python -m gmf_kernels.selfcheck` run.
* `GroupMixAttention(check=True)` / GMF_CHECK=1 catch a backend that is deliberately wrong.
"""
import os
import subprocess
import sys

import pytest
import torch

import gmf_kernels
from gmf_kernels.numerics import TOLERANCE, cast_weights, random_gma_weights
from gmf_kernels import selfcheck, verified
from gmf_kernels.backends import BACKEND_NAMES, GMAProblem, get_backend, select_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def problem(**kw):
    base = dict(B=2, H=7, W=9, dim=80, num_heads=8, dtype=torch.float32, device_type="cpu",
                training=False, needs_grad=False)
    base.update(kw)
    return GMAProblem(**base)


def module(dim=80, backend="auto", **kw):
    return gmf_kernels.GroupMixAttention(dim, 8, qkv_bias=True, backend=backend, **kw)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------ registry and dispatch
def test_available_backends():
    avail = gmf_kernels.available_backends()
    assert "torch" in avail and "reference" in avail
    assert set(avail) <= set(BACKEND_NAMES)
    assert list(BACKEND_NAMES) == ["cuda", "triton", "torch", "reference"]  # the registry (auto: DECLARED_ORDER)
    if not torch.cuda.is_available() and torch.version.cuda is None:
        assert "cuda" not in avail


def test_triton_unavailable_without_a_gpu_or_the_interpreter(monkeypatch):
    """On a machine without a CUDA device, Triton can run only through its interpreter: without
    TRITON_INTERPRET it is not available (available_backends, set_backend raising at once with the
    reason), with it, it is (named explicitly: `auto` never takes the interpreter)."""
    from gmf_kernels.backends import triton_backend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in gmf_kernels.available_backends()
    with pytest.raises(ValueError, match="no CUDA device available.*TRITON_INTERPRET"):
        module().set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not triton_backend._triton_import_error():
        assert "triton" in gmf_kernels.available_backends()
        module().set_backend("triton")


@pytest.mark.parametrize("name", ["nope", "Torch", "cpu", ""])
def test_unknown_backend_name(name):
    with pytest.raises(ValueError, match="unknown backend"):
        module(backend=name)
    with pytest.raises(ValueError, match="unknown backend"):
        gmf_kernels.get_backend(name)
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend(problem(), name)
    with pytest.raises(ValueError, match="unknown backend"):
        module().set_backend(name)
    w = random_gma_weights(80, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="unknown backend"):
        gmf_kernels.group_mix_attention(torch.randn(1, 63, 80), (7, 9), w, backend=name)


@pytest.mark.parametrize("auto", [None, "auto"], ids=["None", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["eval", "eval_grad", "train"])
def test_auto_picks_torch_on_cpu(auto, dtype, mode):
    p = problem(dtype=dtype, training=(mode == "train"), needs_grad=(mode != "eval"))
    assert select_backend(p, auto).name == "torch"


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    """Even with TRITON_INTERPRET=1 (set by conftest on CPU machines) "auto" stays on torch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(problem(), "auto").name == "torch"
    reasons = get_backend("triton").not_supported_reasons(problem())
    if not get_backend("triton").availability_reasons():
        assert any("interpreter" in r for r in reasons)


def test_module_auto_runs_torch(monkeypatch):
    calls = []
    torch_backend = get_backend("torch")
    original = torch_backend.forward
    monkeypatch.setattr(torch_backend, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    m = module().eval()
    with torch.no_grad():
        m(torch.randn(1, 63, 80), (7, 9))
    assert calls == [1]


def test_record_choices_in_eager_calls():
    """`backends.record_choices` lists each call's choice (C, dtype, training or gradients, backend), for
    "auto" and for a named backend, in every open block (nested ones too), and none after the block."""
    from gmf_kernels.backends import record_choices
    auto_m, named = module(80).eval(), module(40, backend="reference").train()
    with record_choices() as outer:
        with torch.no_grad():
            auto_m(torch.randn(1, 12, 80), (3, 4))
        with record_choices() as inner:
            named(torch.randn(2, 12, 40), (3, 4))
    assert outer == [(80, "float32", False, "torch"), (40, "float32", True, "reference")]
    assert inner == [(40, "float32", True, "reference")]
    with torch.no_grad():
        auto_m(torch.randn(1, 12, 80), (3, 4))
    assert len(outer) == 2


def test_record_choices_under_torch_compile():
    """Under torch.compile the choice is made at trace time (`functional.dispatch`): the first call of a
    compiled layer records it, a call that reuses the graph records nothing."""
    from gmf_kernels.backends import record_choices
    m = module(80).eval()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = torch.randn(1, 12, 80)
    with record_choices() as first, torch.no_grad():
        compiled(x, (3, 4))
    assert first == [(80, "float32", False, "torch")]
    with record_choices() as again, torch.no_grad():
        compiled(x, (3, 4))
    assert again == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_check_table_records_a_backend_that_raises_and_goes_on(monkeypatch):
    """A backend that accepts a problem and then raises is a FAIL row with the error; the table goes on."""
    def boom(x, size, w, hp, training):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(get_backend("torch"), "forward", boom)
    rows = selfcheck.check_table(["torch", "reference"], [torch.float32], [(5, 6)], batch=1, device="cpu")
    torch_rows = [r for r in rows if r[0] == "torch"]
    assert len(rows) == 2 * 8 and len(torch_rows) == 8
    assert all(r[-1].startswith("FAIL (raised RuntimeError: CUDA error: an illegal memory access") for r in torch_rows)
    assert all(r[-1] == "ok" for r in rows if r[0] == "reference")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_explicit_cuda_on_cpu_raises_with_reasons(mode):
    m = module(backend="cuda").train(mode == "train")
    with pytest.raises(ValueError) as info:
        m(torch.randn(1, 63, 80), (7, 9))
    msg = str(info.value)
    assert "'cuda'" in msg and "cannot run" in msg
    assert "device cpu not supported" in msg
    assert ("B=1, H=7, W=9, C=80, d=8, float32 on cpu, " + ("train" if mode == "train" else "eval")) in msg


def _triton_backend_module_exists():
    try:
        import gmf_kernels.backends.triton_backend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_backend_module_exists(), reason="no triton backend module")
def test_explicit_triton_declares_training_per_dtype(monkeypatch):
    """Training and gradients as data per dtype (`TRAINING_DTYPES`, `GRAD_DTYPES`: fp32, fp16 and
    bf16 both); an explicit choice outside the declared set raises with the reason (never a
    fallback), shown by declaring bf16 training out."""
    tb = get_backend("triton")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert not tb.not_supported_reasons(problem(dtype=dt, needs_grad=True, explicit=True)), dt
        assert not tb.not_supported_reasons(problem(dtype=dt, training=True, needs_grad=True, explicit=True)), dt
    monkeypatch.setattr(tb, "training_dtypes", frozenset({torch.float32, torch.float16}))
    m = module(backend="triton").to(torch.bfloat16).train()
    with pytest.raises(ValueError, match="training mode in bfloat16"):
        m(torch.randn(1, 63, 80, dtype=torch.bfloat16), (7, 9))


@pytest.mark.skipif(not _triton_backend_module_exists(), reason="no triton backend module")
def test_training_kernels_declare_their_size_limits(monkeypatch):
    """The training kernels' limits as data (`config.MAX_TRAIN_BATCH`: 3B images on a grid
    dimension; `config.MAX_TRAIN_ELEMENTS`: 32-bit offsets): past them the Triton backend refuses
    training and gradient calls with the reason (eval batches run in chunks instead, no reason),
    the CUDA backend's training path names it as its reason to take the PyTorch backward
    (`cuda.train_op._backward_reasons`), and the run-time checks of the statistics pass and the
    backward op (what stands when torch.compile dispatches without the sizes) raise it."""
    from gmf_kernels.cuda.train_op import _backward_reasons
    from gmf_kernels.folding import folded_weights
    from gmf_kernels.numerics import default_hyper
    from gmf_kernels.triton_kernels import config, statistics, train_op  # noqa: F401  (registers the ops)
    tb = get_backend("triton")
    big = config.MAX_TRAIN_BATCH + 1
    for kw in (dict(training=True, needs_grad=True), dict(needs_grad=True)):
        assert any("at most 21845 images" in r for r in tb.not_supported_reasons(problem(B=big, explicit=True, **kw)))
        assert not tb.not_supported_reasons(problem(B=big - 1, explicit=True, **kw))
    assert not tb.not_supported_reasons(problem(B=10 * big, explicit=True))       # eval: chunks
    # B N 3C = 2.26e9 elements at B = 1000 at 56x56, C = 240 (951 fit)
    r = tb.not_supported_reasons(problem(B=1000, H=56, W=56, dim=240, training=True, explicit=True))
    assert len(r) == 1 and "32-bit offsets" in r[0] and "at most 951 images" in r[0], r
    assert not tb.not_supported_reasons(problem(B=951, H=56, W=56, dim=240, training=True, explicit=True))
    assert "32-bit offsets" in _backward_reasons(1000, 56, 56, 240, 8, torch.float16, "cuda", None)

    monkeypatch.setattr(config, "MAX_TRAIN_BATCH", 1)
    m = module(dim=40, backend="triton").train()
    with pytest.raises(ValueError, match="at most 1 images per call"):
        m(torch.randn(2, 35, 40), (5, 7))
    qkv = torch.randn(2, 35, 120)
    w = random_gma_weights(40)
    with pytest.raises(ValueError, match="at most 1 images per call"):
        statistics.statistics(qkv, 5, 7, folded_weights(w, default_hyper(40), torch.float32))
    with pytest.raises(ValueError, match="at most 1 images per call"):
        torch.ops.gmf.triton_pre_projection_backward(torch.randn(2, 35, 40), qkv, 5, 7,
                                                     list(folded_weights(w, default_hyper(40), torch.float32)),
                                                     0.5, 1e-5, None, None)


@pytest.mark.parametrize("what", ["meta_device", "int_dtype"])
def test_nothing_fits_raises_not_implemented(what):
    p = problem(device_type="meta") if what == "meta_device" else problem(dtype=torch.int32)
    with pytest.raises(NotImplementedError) as info:
        select_backend(p, "auto")
    msg = str(info.value)
    assert "no backend can run this input" in msg
    for name in BACKEND_NAMES:
        assert f"\n  {name}: " in msg, f"reasons of {name} not listed:\n{msg}"
    assert ("device meta not supported" if what == "meta_device" else "dtype int32 not supported") in msg
    # each backend, named explicitly, refuses with ValueError instead
    for name in BACKEND_NAMES:
        with pytest.raises(ValueError, match=f"backend '{name}' cannot run"):
            select_backend(p, name)


def test_not_supported_reasons_is_data():
    tb = get_backend("torch")
    assert tb.not_supported_reasons(problem()) == []
    assert tb.not_supported_reasons(problem(dtype=torch.float64, training=True, needs_grad=True)) == []
    reasons = get_backend("reference").not_supported_reasons(problem(device_type="xla", dtype=torch.int8))
    assert len(reasons) == 2


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("dim, match", [(42, "not a multiple of 5"), (45, "multiple of 10"),
                                        (85, "multiple of 10"), (0, "positive"), (-40, "positive")],
                         ids=["42", "45", "85", "0", "-40"])
def test_bad_dim_at_construction(dim, match):
    with pytest.raises(ValueError, match=match) as info:
        gmf_kernels.GroupMixAttention(dim, 8)
    assert str(dim) in str(info.value)


@pytest.mark.parametrize("heads", [1, 4, 16])
def test_num_heads_must_be_8(heads):
    with pytest.raises(ValueError, match="num_heads") as info:
        gmf_kernels.GroupMixAttention(80, heads)
    assert "8" in str(info.value)


def test_non_integer_dim():
    with pytest.raises(ValueError, match="positive int"):
        gmf_kernels.GroupMixAttention(80.0, 8)


BAD_INPUTS = {
    # name: (x factory, size, exception, message fragment)
    "rank2": (lambda: torch.randn(63, 80), (7, 9), ValueError, "(B, N, C)"),
    "rank4": (lambda: torch.randn(1, 7, 9, 80), (7, 9), ValueError, "(B, N, C)"),
    "N_mismatch": (lambda: torch.randn(2, 64, 80), (7, 9), ValueError, "H*W=63"),
    "N_swapped_grid_ok": (lambda: torch.randn(2, 63, 80), (9, 7), None, None),
    "C_mismatch": (lambda: torch.randn(2, 63, 40), (7, 9), ValueError, "dim=80"),
    "int_dtype": (lambda: torch.randint(0, 5, (2, 63, 80)), (7, 9), TypeError, "dtype"),
    "float64_x_float32_module": (lambda: torch.randn(2, 63, 80, dtype=torch.float64), (7, 9), TypeError,
                                 "float64"),
    "float16_x_float32_module": (lambda: torch.randn(2, 63, 80, dtype=torch.float16), (7, 9), TypeError,
                                 "float16"),
    "size_zero": (lambda: torch.randn(2, 0, 80), (0, 9), ValueError, "positive"),
    "size_negative": (lambda: torch.randn(2, 63, 80), (-7, -9), ValueError, "positive"),
    "size_length_1": (lambda: torch.randn(2, 63, 80), (63,), ValueError, "pair"),
    "size_length_3": (lambda: torch.randn(2, 63, 80), (7, 9, 1), ValueError, "pair"),
    "size_float": (lambda: torch.randn(2, 63, 80), (7.5, 9), ValueError, "ints"),     # int() would truncate it
    "size_string": (lambda: torch.randn(2, 63, 80), "79", ValueError, "ints"),        # ... and parse it
    "size_bool": (lambda: torch.randn(2, 63, 80), (True, 63), ValueError, "ints"),
    "size_float_tensor": (lambda: torch.randn(2, 63, 80), (torch.tensor(7.0), 9), ValueError, "ints"),
    "size_int_tensors_ok": (lambda: torch.randn(2, 63, 80), (torch.tensor(7), torch.tensor(9)), None, None),
    "batch_zero": (lambda: torch.randn(0, 63, 80), (7, 9), None, None),
    "meta_device": (lambda: torch.randn(2, 63, 80, device="meta"), (7, 9), TypeError, "meta"),
    "not_a_tensor": (lambda: [[0.0] * 80] * 63, (7, 9), TypeError, "torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("entry", ["module", "functional"])
def test_bad_inputs(case, entry):
    make_x, size, exc, fragment = BAD_INPUTS[case]
    m = module().eval()
    x = make_x()
    if entry == "module":
        call = lambda: m(x, size)  # noqa: E731
    else:
        call = lambda: gmf_kernels.group_mix_attention(x, size, m.gma_weights())  # noqa: E731
    if exc is None:
        with torch.no_grad():
            assert call().shape == x.shape
        return
    with pytest.raises(exc) as info:
        with torch.no_grad():
            call()
    assert fragment in str(info.value), f"message does not mention {fragment!r}: {info.value}"


def test_error_is_raised_before_any_work(monkeypatch):
    """Validation happens before a backend runs (no partial BN update on bad input)."""
    m = module().train()
    monkeypatch.setattr(get_backend("torch"), "forward", lambda *a, **k: pytest.fail("backend ran"))
    with pytest.raises(ValueError):
        m(torch.randn(2, 64, 80), (7, 9))
    assert int(m.aggregator.norm0.num_batches_tracked) == 0


# ------------------------------------------------------------------ entry points
def test_info_cli():
    r = subprocess.run([sys.executable, "-m", "gmf_kernels.info"], capture_output=True, text=True, timeout=120,
                       env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in BACKEND_NAMES:
        assert any(line.strip().startswith(name + " ") for line in lines), f"{name} not listed:\n{r.stdout}"
    assert any(line.strip().startswith("torch ") and "available" in line and "unavailable" not in line
               for line in lines)
    assert torch.__version__ in r.stdout
    # each backend's declared support, as its fields say (no stale blanket statement)
    support = lines[next(i for i, line in enumerate(lines) if line.startswith("declared support")) + 1:]
    for name in BACKEND_NAMES:
        b = get_backend(name)
        row = next(line for line in support if line.strip().startswith(name + " "))
        assert ("training no" in row) == (not b.supports_training), row
        assert ("gradients no" in row) == (not b.supports_grad), row
        assert ("SyncBatchNorm yes" in row) == b.supports_sync_bn, row
        assert ("not yet verified on a GPU" in row) == (b.needs_gpu_verification and not verified.archs(name)), row


def test_selfcheck_cli():
    r = subprocess.run([sys.executable, "-m", "gmf_kernels.selfcheck", "--backends", "torch,reference",
                        "--batch", "1", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("torch ", "reference "))]
    assert len(rows) == 2 * 8 * 2  # 2 backends x 8 widths x 2 grids
    assert all(line.rstrip().endswith("ok") for line in rows), "\n".join(rows)
    assert "FAIL" not in r.stdout


@pytest.mark.parametrize("backends, env, expected", [
    ("cuda", "1", "cuda: not checked: every row skipped"),         # no CUDA device: every row a skip
    ("triton", "0", "triton: not checked: on a CPU it runs only through the Triton interpreter"),
    ("torch,triton", "0", "triton: not checked")])                  # one named backend not checked
def test_selfcheck_that_checked_nothing_is_not_a_pass(monkeypatch, capsys, backends, env, expected):
    """Exit 2, saying which backend was not checked and why, when a backend named with --backends was
    not checked at all (it exited 0 with "0 of 0 rows ok", or counted skips as ok)."""
    monkeypatch.setenv("TRITON_INTERPRET", env)
    monkeypatch.setattr(selfcheck, "_widths", lambda: [40])
    if "cuda" in backends and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the cuda rows would run")
    assert selfcheck.main(["--backends", backends, "--batch", "1", "--device", "cpu"]) == 2
    out = capsys.readouterr().out
    assert expected in out and "not a pass (exit 2)" in out, out


def test_selfcheck_summary_exit_status():
    row = lambda name, verdict: (name, 40, "7x9", "float32", None if verdict != "ok" else 1e-7, 1e-7, verdict)
    assert selfcheck.summary([row("torch", "ok")], ["torch"], {}, explicit=True)[1] == 0
    assert selfcheck.summary([row("torch", "ok"), row("cuda", "skip: no GPU")], ["torch", "cuda"], {},
                             explicit=False)[1] == 0           # every available backend: skips are fine
    assert selfcheck.summary([row("torch", "FAIL (> 2e-4)")], ["torch"], {}, explicit=False)[1] == 1
    assert selfcheck.summary([], [], {"triton": "interpreter"}, explicit=False)[1] == 2
    lines, code = selfcheck.summary([row("torch", "ok"), row("cuda", "skip: no GPU")], ["torch", "cuda"], {},
                                    explicit=True)
    assert code == 2 and "cuda: not checked: every row skipped (skip: no GPU)" in lines
    assert "1 of 2 rows ok, 1 skipped" in lines


def _noisy(monkeypatch, amount=1e-2):
    tb = get_backend("torch")
    original = tb.forward

    def noisy_forward(x, size, w, hp, training, linears=None):
        out = original(x, size, w, hp, training, linears)
        return out + amount * out.detach().abs().max() * torch.randn_like(out)
    monkeypatch.setattr(tb, "forward", noisy_forward)


def test_check_table_passes_and_flags_a_wrong_backend(monkeypatch):
    rows = selfcheck.check_table(["torch", "reference"], [torch.float32], [(5, 6)], batch=1, device="cpu")
    assert len(rows) == 2 * 8 and all(r[-1] == "ok" for r in rows), rows
    _noisy(monkeypatch)
    rows = selfcheck.check_table(["torch"], [torch.float32], [(5, 6)], batch=1, device="cpu")
    assert all(r[-1].startswith("FAIL") for r in rows), rows


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_check_true_passes_for_torch_backend(dtype, mode):
    m = module(backend="torch", check=True).to(dtype).train(mode == "train")
    m_plain = module(backend="reference").to(dtype).train(mode == "train")
    m_plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 63, 80, dtype=dtype, requires_grad=(mode == "train"))
    out = m(x, (7, 9))
    expected = m_plain(x.detach(), (7, 9))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if mode == "train":
        out.sum().backward()
        assert x.grad is not None
        # the check must not update the BatchNorm statistics a second time
        assert int(m.aggregator.norm1.num_batches_tracked) == 1
        torch.testing.assert_close(m.aggregator.norm2.running_var, m_plain.aggregator.norm2.running_var)


def test_check_true_under_autocast_compares_with_a_float32_reference(monkeypatch):
    """check=True under autocast: the reference it compares with runs in float32, outside the
    caller's autocast (inside it, the oracle shared the bfloat16 error it should judge)."""
    seen = []
    real = selfcheck.reference_group_mix_attention

    def spy(x, *a, **kw):
        out = real(x, *a, **kw)
        seen.append((x.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out
    monkeypatch.setattr(selfcheck, "reference_group_mix_attention", spy)
    m = module(backend="torch", check=True).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(2, 63, 80), (7, 9)).dtype == torch.bfloat16
    assert seen == [(torch.float32, torch.float32, False)], seen


@pytest.mark.parametrize("matmul, cudnn", [(False, False), (True, False), (False, True)])
def test_check_tolerance_widens_under_either_tf32_switch(matmul, cudnn):
    """check=True on CUDA: TF32 of matmuls or of cuDNN's convolutions (the latter on by default)
    puts ~1e-3 into the float32 reference itself, so either switch widens the tolerance."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # no monkeypatch: cuBLAS's
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn  # switch is a property
    try:
        base = TOLERANCE[torch.float32]
        assert selfcheck.check_tolerance(torch.float32, on_cuda=False) == base
        assert selfcheck.check_tolerance(torch.float32, on_cuda=True) == (5e-3 if matmul or cudnn else base)
        assert selfcheck.check_tolerance(torch.float16, on_cuda=True) >= TOLERANCE[torch.float16]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_check_true_catches_a_wrong_backend(monkeypatch, mode):
    _noisy(monkeypatch)
    m = module(backend="torch", check=True).train(mode == "train")
    with pytest.raises(selfcheck.SelfCheckError, match="'torch' disagrees with the reference"):
        m(torch.randn(2, 63, 80), (7, 9))


def test_gmf_check_env_triggers_the_check(monkeypatch):
    _noisy(monkeypatch)
    m = module(backend="torch").eval()
    x = torch.randn(2, 63, 80)
    monkeypatch.delenv("GMF_CHECK", raising=False)
    with torch.no_grad():
        m(x, (7, 9))  # unchecked: the noise goes unnoticed
    monkeypatch.setenv("GMF_CHECK", "1")
    with pytest.raises(selfcheck.SelfCheckError):
        with torch.no_grad():
            m(x, (7, 9))
    # the functional API honours it too
    with pytest.raises(selfcheck.SelfCheckError):
        gmf_kernels.group_mix_attention(x, (7, 9), cast_weights(m.gma_weights()), backend="torch")
    # and check=False passed explicitly to the functional API wins over the environment
    with torch.no_grad():
        gmf_kernels.group_mix_attention(x, (7, 9), m.gma_weights(), backend="torch", check=False)


def test_plain_eager_calls_skip_the_op_dispatch_and_traces_keep_it(monkeypatch):
    """A fused backend's eval call without gradients runs the op's Python body directly when the call is
    plain eager (`_tracing.plain_eager`: saves the custom-op dispatch's host time), and through the op
    whenever something must see the op: a dispatch mode (torch.compile's AOT pass, torch.export), a
    tensor subclass, torch.jit.trace, a functorch transform. Both give the same output."""
    from gmf_kernels import _tracing
    from gmf_kernels.backends.base import FusedBackend
    from torch.utils._python_dispatch import TorchDispatchMode
    x = torch.randn(2, 3)
    assert _tracing.plain_eager([x, torch.nn.Parameter(torch.randn(2))])

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Seen():
        assert not _tracing.plain_eager([x])
    assert not torch.func.vmap(lambda t: torch.tensor(float(_tracing.plain_eager([t]))))(x).any()
    traced = []
    torch.jit.trace(lambda t: (traced.append(_tracing.plain_eager([t])), t * 2)[1], (x,), check_trace=False)
    assert traced == [False]

    # the torch backend has no op; the CUDA backend's body runs its CPU emulation: the Triton backend's
    # under the interpreter shows both paths
    be = get_backend("triton")
    if be.not_supported_reasons(problem(dim=40, H=4, W=5, B=1, explicit=True)):
        pytest.skip("the Triton backend does not run here")
    C = 40
    w = cast_weights(random_gma_weights(C, seed=3), torch.float32)
    hp = gmf_kernels.numerics.default_hyper(C)
    qkv = torch.randn(1, 20, 3 * C)
    direct = []
    impl = be.op_impl()
    monkeypatch.setattr(type(be), "op_impl", lambda self: lambda *a: (direct.append(1), impl(*a))[1])
    out = FusedBackend.pre_projection(be, qkv, (4, 5), w, hp, False)
    assert direct == [1]
    with Seen() as seen:
        out_op = FusedBackend.pre_projection(be, qkv, (4, 5), w, hp, False)
    assert direct == [1] and "gmf.triton_pre_projection" in seen.ops
    torch.testing.assert_close(out, out_op, rtol=0, atol=0)


@pytest.mark.parametrize("argv, fragment", [
    (["--backends", "foo"], "unknown"), (["--device", "bogus"], "--device bogus"), (["--batch", "0"], "--batch 0"),
    (["--dtypes", "half"], "--dtypes half"), (["--device", "meta"], "--device meta")])
def test_selfcheck_bad_arguments_named(argv, fragment, capsys):
    """A bad argument is a usage error naming it (they were tracebacks)."""
    with pytest.raises(SystemExit) as info:
        selfcheck.main(argv)
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_selfcheck_takes_short_dtype_names(monkeypatch, capsys):
    monkeypatch.setattr(selfcheck, "_widths", lambda: [40])
    assert selfcheck.main(["--backends", "torch", "--dtypes", "fp32", "--batch", "1", "--device", "cpu"]) == 0
    assert "dtypes ['float32']" in capsys.readouterr().out
