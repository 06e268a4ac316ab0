"""Deployment guards of the CUDA backend, on a CPU machine with everything mocked.

The CUDA backend must refuse, with a reason and before anything is launched, a GPU whose
compute capability the loaded module has no code for (SASS of the same major with a minor
<= the GPU's, or PTX of a capability <= the GPU's), and a driver of an older major CUDA
version than the toolkit the module was built with. Within one major version (CUDA's minor
version compatibility) the module's SASS runs on an older driver but its PTX cannot be
JIT-compiled, so only SASS counts. `auto` then falls back to the next backend; an explicit
`backend="cuda"` raises ValueError naming the problem. A module that does not report these
facts (built before `build_ptx_archs()`, `cuda_runtime_version()`, `cuda_driver_version()`
existed) is "unknown": the values come from its build.json / torch where possible, and
otherwise the backend refuses with a reason to rebuild — never a crash.

Mocked here: the compiled module (`gmf_kernels.cuda.launcher.load`), `torch.version.cuda`,
`torch.cuda.is_available`, `device_count` and `get_device_capability`.
"""
from __future__ import annotations

import pytest
import torch

from gmf_kernels.backends import DECLARED_ORDER, get_backend, select_backend
from gmf_kernels.backends import cuda_backend as cb
from gmf_kernels.backends.base import FallbackWarning, GMAProblem
from gmf_kernels.cuda import launcher as cl
from gmf_kernels.folding import WEIGHT_NAMES

DEFAULT_SASS = "75;80;86;89;90"
DEFAULT_PTX = "90"
MISSING = object()


class FakeModule:
    """Stands in for the compiled `_gmf_cuda` module: only what dispatch asks for."""

    def __init__(self, archs=DEFAULT_SASS, ptx=DEFAULT_PTX, runtime=13000, driver=13000, mode="cuda"):
        for name, value in (("build_archs", archs), ("build_ptx_archs", ptx), ("cuda_runtime_version", runtime),
                            ("cuda_driver_version", driver), ("build_mode", mode)):
            if value is not MISSING:
                setattr(self, name, (lambda v=value: v))

    def weight_names(self):
        return list(WEIGHT_NAMES)


@pytest.fixture
def gpu_machine(monkeypatch):
    """A pretend CUDA machine: returns install(module=..., caps=[(9, 0)]) to set the scene."""
    monkeypatch.setenv("GMF_AUTO_UNVERIFIED", "1")  # let `auto` consider the (unverified) cuda backend
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # no fallbacks from a real build.json or driver: only what each test installs
    monkeypatch.setattr(cb, "_build_metadata", lambda: None)
    monkeypatch.setattr(cb, "_torch_driver_version", lambda: None)

    def install(module=None, caps=((9, 0),)):
        mod = module if module is not None else FakeModule()
        monkeypatch.setattr(cl, "load", lambda: mod)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda i=None: tuple(caps[0 if i is None else int(getattr(i, "index", i) or 0)]))
        return mod

    return install


def cuda_problem(cap=(9, 0), index=0, **kw) -> GMAProblem:
    base = dict(B=2, H=7, W=9, dim=80, num_heads=8, dtype=torch.float16, device_type="cuda", training=False,
                needs_grad=False, device_index=index, device_capability=cap)
    base.update(kw)
    return GMAProblem(**base)


def expected_fallback(p: GMAProblem) -> str:
    """The first backend but cuda that accepts the problem, in `auto`'s declared order for its kind of call."""
    order = DECLARED_ORDER[bool(p.training or p.needs_grad)]
    return next(n for n in order if n != "cuda" and not get_backend(n).not_supported_reasons(p))


# ------------------------------------------------------------------ pure rules
@pytest.mark.parametrize("text, expected", [
    ("75;80;86;89;90", [(7, 5, ""), (8, 0, ""), (8, 6, ""), (8, 9, ""), (9, 0, "")]),
    ("sm_90a, compute_100f 120", [(9, 0, "a"), (10, 0, "f"), (12, 0, "")]),
    ("8.0 9.0 9.0", [(8, 0, ""), (9, 0, "")]),
    ("", []),
    ("junk;80", [(8, 0, "")]),
])
def test_parse_arch_list(text, expected):
    assert cb.parse_arch_list(text) == expected


SASS_CASES = [  # (arch, capability, runs)
    ((8, 0, ""), (8, 0), True), ((8, 0, ""), (8, 6), True), ((8, 0, ""), (8, 9), True),
    ((8, 6, ""), (8, 0), False), ((8, 0, ""), (9, 0), False), ((9, 0, ""), (8, 0), False),
    ((7, 5, ""), (7, 0), False), ((7, 5, ""), (7, 5), True),
    ((9, 0, "a"), (9, 0), True), ((9, 0, "a"), (9, 1), False),
    ((10, 0, "f"), (10, 3), True), ((10, 0, "f"), (12, 0), False),
]


@pytest.mark.parametrize("arch, cap, runs", SASS_CASES, ids=[f"{a}-on-{c}" for a, c, _ in SASS_CASES])
def test_sass_compatibility(arch, cap, runs):
    assert cb.sass_runs_on(arch, cap) is runs


PTX_CASES = [
    ((9, 0, ""), (9, 0), True), ((9, 0, ""), (10, 0), True), ((9, 0, ""), (12, 0), True),
    ((9, 0, ""), (8, 9), False), ((8, 0, ""), (8, 6), True), ((9, 0, "a"), (10, 0), False),
    ((10, 0, "f"), (10, 1), True), ((10, 0, "f"), (11, 0), False),
]


@pytest.mark.parametrize("arch, cap, runs", PTX_CASES, ids=[f"{a}-on-{c}" for a, c, _ in PTX_CASES])
def test_ptx_compatibility(arch, cap, runs):
    assert cb.ptx_runs_on(arch, cap) is runs


@pytest.mark.parametrize("cap, ok", [((7, 0), False), ((7, 2), False), ((7, 5), True), ((8, 0), True),
                                     ((8, 6), True), ((8, 7), True), ((8, 9), True), ((9, 0), True),
                                     ((10, 0), True), ((12, 0), True), ((6, 1), False)])
def test_default_targets(cap, ok):
    """The default build (SASS 75..90, PTX 90): everything from Turing on, newer GPUs through PTX."""
    reasons = cb.arch_reasons(cap, cb.parse_arch_list(DEFAULT_SASS), cb.parse_arch_list(DEFAULT_PTX))
    assert (not reasons) is ok, reasons
    if not ok:
        assert f"compute capability {cap[0]}.{cap[1]} (sm_{cap[0]}{cap[1]})" in reasons[0]
        assert f"GMF_CUDA_ARCHS={cap[0]}{cap[1]}" in reasons[0]
        assert "sm_75, sm_80, sm_86, sm_89, sm_90" in reasons[0] and "compute_90" in reasons[0]


def test_arch_reasons_without_ptx_and_unknowns():
    sass = cb.parse_arch_list("80;90")
    assert "embeds no PTX" in cb.arch_reasons((10, 0), sass, [])[0]
    assert "PTX is unknown" in cb.arch_reasons((10, 0), sass, None)[0]
    assert cb.arch_reasons((9, 0), sass, None) == []  # SASS matches: PTX does not matter
    assert "does not report the architectures" in cb.arch_reasons((9, 0), None, None)[0]
    assert "unknown" in cb.arch_reasons(None, sass, [])[0]


@pytest.mark.parametrize("runtime, driver, fragment", [
    (13000, 13000, None), (12080, 13000, None), (12080, 12080, None),
    (13000, 12080, "driver supports CUDA 12.8 but the CUDA module was built with CUDA 13.0"),
    (12080, 12020, None),  # minor version compatibility: same major (ptx_jit_reason covers the PTX)
    (13000, 12090, "driver supports CUDA 12.9 but the CUDA module was built with CUDA 13.0"),
    (12080, 11080, "a driver of an older major version cannot run it"),
    (13000, 0, "no NVIDIA driver"),
    (None, 13000, "does not report the CUDA runtime"),
    (13000, None, "does not report the driver's CUDA version"),
])
def test_driver_reasons(runtime, driver, fragment):
    reasons = cb.driver_reasons(runtime, driver)
    if fragment is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and fragment in reasons[0], reasons


@pytest.mark.parametrize("runtime, driver, blocked", [
    (12080, 12020, True), (13000, 13000, False), (12080, 13000, False), (12080, None, False), (12080, 0, False),
])
def test_ptx_jit_reason(runtime, driver, blocked):
    reason = cb.ptx_jit_reason(runtime, driver)
    assert (reason is not None) is blocked
    if blocked:
        assert "cannot JIT-compile" in reason and "12.2" in reason and "12.8" in reason


def test_arch_reasons_when_the_driver_cannot_jit_the_ptx():
    sass, ptx = cb.parse_arch_list(DEFAULT_SASS), cb.parse_arch_list(DEFAULT_PTX)
    jit = cb.ptx_jit_reason(12080, 12020)
    assert cb.arch_reasons((9, 0), sass, ptx, ptx_jit=jit) == []  # SASS runs under minor version compat
    assert cb.arch_reasons((12, 0), sass, ptx) == []  # a new driver JITs the PTX
    r = cb.arch_reasons((12, 0), sass, ptx, ptx_jit=jit)
    assert len(r) == 1 and "would suit it, but the driver (CUDA 12.2)" in r[0] and "update the driver" in r[0], r
    assert "GMF_CUDA_ARCHS=120" in r[0]


def test_cuda_version_str():
    assert [cb.cuda_version_str(v) for v in (13000, 12080, 12010, 11080, None)] == \
        ["13.0", "12.8", "12.1", "11.8", "unknown"]


# ------------------------------------------------------------------ dispatch with a mocked GPU + module
def test_supported_gpu_is_chosen(gpu_machine):
    """Positive control: a matching GPU and driver -> cuda runs, explicitly and under auto."""
    gpu_machine(FakeModule())
    p = cuda_problem((9, 0))
    assert get_backend("cuda").availability_reasons() == []
    assert get_backend("cuda").not_supported_reasons(p) == []
    assert select_backend(p, "cuda").name == "cuda"
    assert select_backend(p, None).name == "cuda"


@pytest.mark.parametrize("cap", [(7, 0), (6, 1)], ids=["sm70", "sm61"])
def test_unsupported_capability_falls_back_and_explicit_raises(gpu_machine, cap):
    gpu_machine(FakeModule(), caps=[cap])
    p = cuda_problem(cap)
    reasons = get_backend("cuda").not_supported_reasons(p)
    assert any(f"compute capability {cap[0]}.{cap[1]}" in r for r in reasons), reasons
    chosen = select_backend(p, None)  # auto: falls back, never crashes
    assert chosen.name != "cuda" and chosen.name == expected_fallback(p)
    with pytest.raises(ValueError, match=rf"(?s)backend 'cuda' cannot run.*compute capability {cap[0]}\.{cap[1]}"):
        select_backend(p, "cuda")


def test_newer_gpu_runs_through_ptx(gpu_machine):
    gpu_machine(FakeModule(), caps=[(12, 0)])
    assert select_backend(cuda_problem((12, 0)), "cuda").name == "cuda"
    gpu_machine(FakeModule(ptx=""), caps=[(12, 0)])  # no PTX embedded: refused
    with pytest.raises(ValueError, match="embeds no PTX"):
        select_backend(cuda_problem((12, 0)), "cuda")


def test_old_driver_falls_back_and_explicit_raises(gpu_machine):
    gpu_machine(FakeModule(runtime=13000, driver=12080))
    p = cuda_problem((9, 0))
    assert any("driver supports CUDA 12.8" in r for r in get_backend("cuda").availability_reasons())
    assert select_backend(p, None).name == expected_fallback(p)
    with pytest.raises(ValueError, match=r"driver supports CUDA 12\.8 but the CUDA module was built with CUDA 13\.0"):
        select_backend(p, "cuda")


def test_minor_version_compatibility(gpu_machine):
    """A 12.8 build on a 12.2 driver: the SASS runs (cuda is chosen); a GPU that only the PTX would
    serve is refused with the driver named, and `auto` falls back."""
    gpu_machine(FakeModule(runtime=12080, driver=12020), caps=[(9, 0)])
    assert get_backend("cuda").availability_reasons() == []
    assert select_backend(cuda_problem((9, 0)), "cuda").name == "cuda"
    gpu_machine(FakeModule(runtime=12080, driver=12020), caps=[(12, 0)])
    p = cuda_problem((12, 0))
    assert select_backend(p, None).name == expected_fallback(p)
    with pytest.raises(ValueError, match=r"(?s)compute capability 12\.0.*cannot JIT-compile"):
        select_backend(p, "cuda")


def test_no_driver(gpu_machine):
    gpu_machine(FakeModule(driver=0))
    with pytest.raises(ValueError, match="no NVIDIA driver"):
        select_backend(cuda_problem(), "cuda")


def test_emulation_only_build_is_refused(gpu_machine):
    gpu_machine(FakeModule(archs="", ptx="", runtime=0, mode="emulation"))
    p = cuda_problem((9, 0))
    assert any("emulation-only" in r for r in get_backend("cuda").availability_reasons())
    assert select_backend(p, None).name == expected_fallback(p)
    with pytest.raises(ValueError, match="emulation-only build"):
        select_backend(p, "cuda")


def test_per_device_capability(gpu_machine):
    """Two GPUs, one too old: the backend is available, but refuses inputs on the old one."""
    gpu_machine(FakeModule(), caps=[(7, 0), (9, 0)])
    assert get_backend("cuda").availability_reasons() == []
    assert select_backend(cuda_problem((9, 0), index=1), "cuda").name == "cuda"
    with pytest.raises(ValueError, match=r"compute capability 7\.0 \(sm_70\) of cuda:0"):
        select_backend(cuda_problem((7, 0), index=0), "cuda")


def test_no_visible_gpu_supported_is_an_availability_reason(gpu_machine):
    gpu_machine(FakeModule(), caps=[(7, 0), (6, 1)])
    reasons = get_backend("cuda").availability_reasons()
    assert len(reasons) == 1 and reasons[0].startswith("none of the 2 visible GPU(s)"), reasons
    assert "cuda:0" in reasons[0] and "cuda:1" in reasons[0]
    assert "cuda" not in gmf_available()


def gmf_available():
    from gmf_kernels import available_backends
    return available_backends()


def test_capability_read_from_device_when_problem_lacks_it(gpu_machine):
    gpu_machine(FakeModule(), caps=[(7, 0)])
    with pytest.raises(ValueError, match=r"compute capability 7\.0"):
        select_backend(cuda_problem(None), "cuda")


def test_guards_only_apply_on_cuda(gpu_machine):
    gpu_machine(FakeModule(driver=12080), caps=[(7, 0)])
    assert cb.BACKEND.deployment_reasons(cuda_problem((7, 0), device_type="cpu")) == []


# ------------------------------------------------------------------ modules that do not say
@pytest.mark.parametrize("missing", ["cuda_runtime_version", "cuda_driver_version"])
def test_module_without_version_functions_is_refused_not_crashed(gpu_machine, missing):
    gpu_machine(FakeModule(**{"runtime" if missing == "cuda_runtime_version" else "driver": MISSING}))
    p = cuda_problem((9, 0))
    assert select_backend(p, None).name == expected_fallback(p)
    with pytest.raises(ValueError, match="cannot check the driver against the toolkit.*rebuild"):
        select_backend(p, "cuda")


def test_module_without_ptx_function(gpu_machine):
    gpu_machine(FakeModule(ptx=MISSING), caps=[(9, 0)])
    assert select_backend(cuda_problem((9, 0)), "cuda").name == "cuda"  # SASS covers it
    gpu_machine(FakeModule(ptx=MISSING), caps=[(10, 0)])
    with pytest.raises(ValueError, match="embedded PTX is unknown"):
        select_backend(cuda_problem((10, 0)), "cuda")


def test_module_without_any_deployment_function(gpu_machine):
    gpu_machine(FakeModule(archs=MISSING, ptx=MISSING, runtime=MISSING, driver=MISSING, mode=MISSING))
    p = cuda_problem((9, 0))
    reasons = get_backend("cuda").not_supported_reasons(p)
    assert any("does not report the architectures" in r for r in reasons), reasons
    assert any("cannot check the driver" in r for r in reasons), reasons
    assert select_backend(p, None).name == expected_fallback(p)


def test_raising_accessors_are_unknown(gpu_machine):
    mod = FakeModule()

    def boom():
        raise RuntimeError("broken")

    mod.cuda_driver_version = boom
    mod.build_archs = boom
    gpu_machine(mod)
    with pytest.raises(ValueError, match="cannot check the driver"):
        select_backend(cuda_problem((9, 0)), "cuda")


def test_fallback_to_build_metadata_and_torch_driver(gpu_machine, monkeypatch):
    """An older module: targets and toolkit from build.json, the driver from torch."""
    gpu_machine(FakeModule(archs=MISSING, ptx=MISSING, runtime=MISSING, driver=MISSING))
    monkeypatch.setattr(cb, "_build_metadata", lambda: {"nvcc_version": "12.8.93", "archs": ["80", "90"]})
    monkeypatch.setattr(cb, "_torch_driver_version", lambda: 12080)
    info = cb.deployment_info(cl.load())
    assert (info.runtime, info.driver) == (12080, 12080)
    assert info.sass == [(8, 0, ""), (9, 0, "")] and info.ptx is None
    assert select_backend(cuda_problem((9, 0)), "cuda").name == "cuda"
    monkeypatch.setattr(cb, "_torch_driver_version", lambda: 11080)
    cb._INFO_CACHE.clear()
    with pytest.raises(ValueError, match=r"driver supports CUDA 11\.8"):
        select_backend(cuda_problem((9, 0)), "cuda")


def test_real_module_metadata_fallback_reads_loaded_build(monkeypatch, tmp_path):
    """_build_metadata reads build.json beside the module gmf_kernels.cuda loaded."""
    import json

    import gmf_kernels.cuda as gcuda
    (tmp_path / "build.json").write_text(json.dumps({"nvcc_version": "13.0.88", "archs": ["90"]}))
    monkeypatch.setattr(gcuda, "_loaded_path", str(tmp_path / "_gmf_cuda.so"))
    assert cb._build_metadata()["nvcc_version"] == "13.0.88"
    monkeypatch.setattr(gcuda, "_loaded_path", None)
    assert cb._build_metadata() is None


# ------------------------------------------------------------------ auto's fallback on a GPU says why
@pytest.fixture
def told(monkeypatch):
    """No fallback told yet in this test (`backends._FALLBACKS_TOLD`), and each fused backend's refusal mocked:
    returns set_reasons(cuda=[...], triton=[...]) ([] = it accepts)."""
    from gmf_kernels import backends
    monkeypatch.setattr(backends, "_FALLBACKS_TOLD", set())

    def set_reasons(**reasons):
        for name, r in reasons.items():
            monkeypatch.setattr(get_backend(name), "not_supported_reasons", lambda p, r=tuple(r): list(r))
    return set_reasons


def _fallback_warnings(call):
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        chosen = call()
    return chosen, [str(w.message) for w in seen if issubclass(w.category, FallbackWarning)]


def test_auto_fallback_on_a_gpu_says_why_once(told):
    """`auto` running a GPU layer on a non-fused backend warns (FallbackWarning) with each fused backend's
    reasons, once for the layers that share them; new reasons warn again."""
    told(cuda=["mocked: module not built"], triton=["mocked: sm_90 not yet verified"])
    chosen, said = _fallback_warnings(lambda: select_backend(cuda_problem(), None))
    assert chosen.name == "torch" and len(said) == 1, said
    assert "'torch' backend" in said[0] and "C=80" in said[0]
    assert "cuda: mocked: module not built" in said[0] and "triton: mocked: sm_90 not yet verified" in said[0]
    chosen, said = _fallback_warnings(lambda: select_backend(cuda_problem(dim=160), None))
    assert chosen.name == "torch" and said == []          # the same reasons: told already
    told(triton=["mocked: C=160 refused"])
    chosen, said = _fallback_warnings(lambda: select_backend(cuda_problem(dim=160), None))
    assert chosen.name == "torch" and len(said) == 1 and "mocked: C=160 refused" in said[0]


def test_no_fallback_warning_where_nothing_falls_back(told):
    """Silent: a fused backend chosen, an explicitly named backend, and a CPU problem (where the fused kernels
    are not meant to run)."""
    told(cuda=["mocked: module not built"], triton=[])
    assert _fallback_warnings(lambda: select_backend(cuda_problem(), None)) == (get_backend("triton"), [])
    told(triton=["mocked: refused"])
    assert _fallback_warnings(lambda: select_backend(cuda_problem(), "torch"))[1] == []
    cpu = cuda_problem(device_type="cpu", device_capability=None, device_index=None)
    chosen, said = _fallback_warnings(lambda: select_backend(cpu, None))
    assert chosen.name == "torch" and said == []
