"""Triton backend deployment guards, on a CPU with the GPU mocked.

* Architectures: the backend refuses what `ARCH_SUPPORT` (backends/triton_backend.py) does
  not list, from `GMAProblem.device_capability`, with a reason; the launchers pick, per GPU,
  the dot variant that the AOT compile test compiles for that architecture.
* Device guard: the three launches run under the input tensor's CUDA device, not the
  current one (Triton launches on the current device).
"""
import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from gmf_kernels.backends import triton_backend  # noqa: E402
from gmf_kernels.backends.base import GMAProblem  # noqa: E402
from gmf_kernels.backends.triton_backend import BACKEND, arch_reasons  # noqa: E402
from gmf_kernels.folding import FoldedGMAWeights, weight_shapes  # noqa: E402
from gmf_kernels.triton_kernels import _common, _launch, config, launcher  # noqa: E402
from gmf_kernels.triton_kernels._common import DotVariant  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _problem(capability, dtype=torch.float32, device_type="cuda"):
    return GMAProblem(B=2, H=14, W=14, dim=80, num_heads=8, dtype=dtype, device_type=device_type, training=False,
                      needs_grad=False, explicit=True, device_index=0 if device_type == "cuda" else None,
                      device_capability=capability)


# ---------------------------------------------------------------- refusal reasons (capability mocked)
@pytest.mark.parametrize("cap", [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)],
                         ids=lambda c: f"sm{c[0]}{c[1]}")
@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_architecture_reasons(cap, dt):
    """fp32 and fp16 run on sm_70 and newer; bf16 on sm_80 and newer (no bf16 arithmetic
    before, see config.ARCH_DOTS); anything else is refused with the dtype and the GPU named."""
    reasons = [r for r in BACKEND.not_supported_reasons(_problem(cap, DTYPES[dt])) if "compute capability" in r]
    assert reasons == arch_reasons(_problem(cap, DTYPES[dt]))
    if dt == "bf16" and cap < (8, 0):
        assert len(reasons) == 1 and "bf16" in reasons[0] and f"{cap[0]}.{cap[1]}" in reasons[0], reasons
    else:
        assert reasons == []


@pytest.mark.parametrize("cap", [(6, 1), (6, 0), (5, 2), (3, 7)], ids=lambda c: f"sm{c[0]}{c[1]}")
def test_old_architectures_are_refused(cap):
    reasons = BACKEND.not_supported_reasons(_problem(cap))
    hits = [r for r in reasons if "compute capability" in r]
    assert len(hits) == 1 and f"sm_{cap[0]}{cap[1]}" in hits[0] and "sm_70" in hits[0], reasons


def test_dtype_missing_from_an_arch_row_is_refused(monkeypatch):
    """The table is data: drop fp16 from the sm_70/75 row and fp16 is refused there."""
    table = ((config.ARCH_DOTS[0][0], dict(config.ARCH_DOTS[0][1])),
             ((7, 0), {k: v for k, v in config.ARCH_DOTS[1][1].items() if k != "fp16"}))
    monkeypatch.setattr(triton_backend, "ARCH_SUPPORT", table)
    r = arch_reasons(_problem((7, 5), torch.float16))
    assert len(r) == 1 and "fp16" in r[0] and "7.5" in r[0], r
    assert arch_reasons(_problem((7, 5), torch.float32)) == []
    assert arch_reasons(_problem((8, 0), torch.float16)) == []


def test_unknown_capability_or_cpu_is_not_an_arch_reason():
    assert arch_reasons(_problem(None)) == []
    assert arch_reasons(_problem((6, 1), device_type="cpu")) == []


def test_auto_falls_back_on_an_old_gpu(monkeypatch):
    """`auto` on an sm_61 passes over triton with the architecture as its reason (and an explicit
    triton choice raises it) instead of crashing in a launch; on an sm_80 nothing about the
    architecture stops it. The interpreter switch is mocked off, as on a GPU machine."""
    from gmf_kernels.backends import select_backend
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("GMF_AUTO_UNVERIFIED", "1")
    old = GMAProblem(**{**_problem((6, 1)).__dict__, "explicit": False})
    assert [r for r in BACKEND.not_supported_reasons(old) if "compute capability 6.1" in r]
    assert select_backend(old, None).name != "triton"
    with pytest.raises(ValueError, match="compute capability 6.1"):
        select_backend(old, "triton")
    new = GMAProblem(**{**_problem((8, 0)).__dict__, "explicit": False})
    assert BACKEND.not_supported_reasons(new) == []


def test_every_supported_arch_is_compiled_ahead_of_time():
    """Each ARCH_SUPPORT row is exercised by an AOT architecture, and the AOT list is the issue's."""
    assert set(config.AOT_ARCHS) == {70, 75, 80, 90}
    for min_cap, _ in triton_backend.ARCH_SUPPORT:
        assert any(config.capability_of_arch(a) >= min_cap and config.arch_dots(config.capability_of_arch(a))
                   is config.arch_dots(min_cap) for a in config.AOT_ARCHS), min_cap


# ---------------------------------------------------------------- the launchers' variant per GPU
def _meta_call(C=80, H=14, W=14, B=2, dtype=torch.float32):
    qkv = torch.empty(B, H * W, 3 * C, dtype=dtype, device="meta")
    shapes = weight_shapes(C)
    w = FoldedGMAWeights(*(torch.empty(shapes[n], device="meta") for n in FoldedGMAWeights._fields))
    return qkv, w


@pytest.mark.parametrize("arch", config.AOT_ARCHS)
@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_launcher_picks_the_aot_variant(monkeypatch, arch, dt):
    """On a (mocked) GPU of each AOT architecture, the launcher's own defaults (dot_variant of the
    input, default_shape) pass the kernels the DOT_PRECISION and tiles the AOT compile uses for
    that arch (specializations.specializations_of_call plans the call with the same launcher
    and config.dot_precision(dtype, arch)), never the interpreter's emulation; an unsupported
    (arch, dtype) raises instead of launching."""
    cap = config.capability_of_arch(arch)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(launcher, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_cuda_capability", lambda index: cap)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    qkv, w = _meta_call(dtype=DTYPES[dt])                  # shapes only (meta), planned as on cuda:0
    on_gpu = types.SimpleNamespace(dtype=DTYPES[dt], device=torch.device("cuda", 0))
    if dt not in config.arch_dots(cap):
        with pytest.raises(ValueError, match=f"do not support {dt} on compute capability"):
            _common.dot_variant(on_gpu)
        return
    dots = _common.dot_variant(on_gpu)
    _, launches = launcher.plan_pre_projection(qkv, 14, 14, w, 0.25, 1e-5, dots=dots)   # default tiles
    want = config.dot_precision(dt, cap)
    assert want == ("ieee" if arch < 80 else "tf32x3" if dt == "fp32" else "tf32")
    shape = config.gma_shape(80, dots=want)
    for fn, grid, args, kwargs in launches:
        if "DOT_PRECISION" in kwargs:
            assert kwargs["DOT_PRECISION"] == want and kwargs["EMULATE_DOTS"] is False, (fn, kwargs)
        if "CK" in kwargs:   # the GPU tiles of this variant, not the interpreter's
            assert (kwargs["BLOCK_P"], kwargs["CK"], kwargs["num_warps"]) == (shape.AGG_BLOCK_P, shape.CK,
                                                                             shape.AGG_WARPS), kwargs
    assert sum("DOT_PRECISION" in kw for *_, kw in launches) == 2


def test_interpreter_emulates_the_configured_gpu(monkeypatch):
    """Under the interpreter the variant is emulated, for the GPU named by the test hook."""
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    x = torch.empty(1)
    assert _common.dot_variant(x) == DotVariant("tf32x3", True)
    monkeypatch.setattr(_common, "EMULATED_CAPABILITY", (7, 5))
    assert _common.dot_variant(x) == DotVariant("ieee", True)
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        _common.dot_variant(torch.empty(1, dtype=torch.float64))


# ---------------------------------------------------------------- device guard
def test_launches_run_under_the_inputs_device(monkeypatch):
    """Every launch happens inside torch.cuda.device(<the input's device>), here cuda:1 while the
    current device is 0 (all mocked: no GPU is needed). A launcher that forgets the guard, or
    guards with the current device, launches with cuda:0 / no device and fails this test."""
    active = [torch.device("cuda", 0)]                     # the "current device" stack
    launched = []

    class FakeDevice:                                      # stands in for torch.cuda.device
        def __init__(self, device):
            self.device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, active[-1]))

    qkv = types.SimpleNamespace(device=torch.device("cuda", 1))
    fake_launches = [(FakeKernel(n), (1,), (), {}) for n in ("aggregate", "combine", "attention")]
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launcher, "plan_pre_projection", lambda *a, **k: ({"pre": None}, fake_launches))
    monkeypatch.setattr(_launch, "wrap_triton", lambda kernel: kernel)
    buf = launcher.launch_pre_projection(qkv, 7, 7, None, 1.0, 1e-5)
    assert buf == {"pre": None}
    assert launched == [("aggregate", torch.device("cuda", 1)), ("combine", torch.device("cuda", 1)),
                        ("attention", torch.device("cuda", 1))]
    assert active == [torch.device("cuda", 0)], "the guard must restore the current device"


def test_device_guard_leaves_cpu_tensors_alone(monkeypatch):
    """Off CUDA (the interpreter) the guard never touches torch.cuda."""
    def boom(*a, **k):
        raise AssertionError("torch.cuda.device called for a CPU tensor")
    monkeypatch.setattr(torch.cuda, "device", boom)
    with launcher.device_guard(torch.empty(1)):
        pass
