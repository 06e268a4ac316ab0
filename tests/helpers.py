"""Test-only helpers: verbose assertions, the low-precision rule, golden-state loading,
and backend lists built from the registry (each backend's declared support).

Runtime numerics (max_rel_error, cast_weights, random weights, the tolerance table) are
in gmf_kernels/numerics.py; nothing in the package imports this file.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable, List

import pytest
import torch

from gmf_kernels.backends import BACKEND_NAMES, GMAProblem, get_backend
from gmf_kernels.numerics import cast_weights, max_rel_error
from gmf_kernels.weights import BUFFER_FIELDS, PARAM_FIELDS, GMAWeights, named_fields  # noqa: F401  (the tests' names)

Tensor = torch.Tensor


def assert_close_verbose(actual: Tensor, expected: Tensor, *, rtol: float, atol: float = 0.0,
                         name: str = "tensor") -> None:
    """allclose with a report: worst element, its index, and the share failing."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        idx = torch.nonzero(torch.isnan(a))[0].tolist()
        raise AssertionError(f"{name}: {int(torch.isnan(a).sum())} NaN elements (first at {idx})")
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = diff > bound
    if bad.any():
        worst = int(torch.argmax(diff - bound))
        idx = list(torch.unravel_index(torch.tensor(worst), a.shape))
        idx = [int(i) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements ({100.0 * bad.float().mean():.3f}%) "
            f"outside atol={atol:g} + rtol={rtol:g}*|expected|; worst at {idx}: "
            f"got {a.flatten()[worst]:.8g}, expected {e.flatten()[worst]:.8g} "
            f"(|diff| {diff.flatten()[worst]:.3g}); max |diff| overall {diff.max():.3g}")


def assert_max_rel_close(actual: Tensor, expected: Tensor, tol: float, name: str = "tensor") -> None:
    """max |actual - expected| <= tol * max |expected| (shape and finiteness checked first),
    reported element-wise by `assert_close_verbose` on failure."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{name}: non-finite values")
    scale = expected.detach().abs().max().item()
    assert_close_verbose(actual, expected, rtol=0.0, atol=tol * max(scale, 1e-300), name=name)


def assert_within_reference_error(actual: Tensor, reference_lowp: Tensor, oracle: Tensor, *,
                                  factor: float = 2.0, floor: float = 1e-5, name: str = "tensor") -> None:
    """Low precision rule: err(actual) <= factor * err(reference at that precision) + floor,
    errors measured as max |x - oracle| / max |oracle| against a float64 oracle."""
    err = max_rel_error(actual, oracle)
    ref_err = max_rel_error(reference_lowp, oracle)
    if not err <= factor * ref_err + floor:
        raise AssertionError(f"{name}: relative error {err:.3e} > {factor} x reference error "
                             f"{ref_err:.3e} + {floor:g}")


def tf32_round(t: Tensor) -> Tensor:
    """A float32 tensor rounded as PTX ``cvt.rna.tf32.f32`` rounds it (10 mantissa bits, to
    nearest, ties away from zero; inf and NaN unchanged): one TF32 tensor-core pass's operands."""
    bits = t.contiguous().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, (bits + 0x1000) & -8192, bits).view(torch.float32)


@contextlib.contextmanager
def tf32_products():
    """Inside: the products of `triton_kernels.backward` (`pointwise`, the channel mixes; `token_mix`,
    the products over tokens) on operands rounded to TF32, fp32 accumulation: the PyTorch stages
    at the precision of one TF32 pass (the reference of kernels whose dots take one pass)."""
    from gmf_kernels.triton_kernels import backward as bw
    saved = bw.pointwise, bw.token_mix
    bw.pointwise = lambda x, w: saved[0](tf32_round(x), tf32_round(w))
    bw.token_mix = lambda a, b: saved[1](tf32_round(a), tf32_round(b))
    try:
        yield
    finally:
        bw.pointwise, bw.token_mix = saved


def weights_from_state_dict(sd) -> GMAWeights:
    """Detached GMAWeights from an upstream `EfficientAtt` state_dict, through the module
    (`GroupMixAttention.gma_weights`, the one place that maps keys to roles)."""
    from gmf_kernels.modules import GroupMixAttention
    w = sd["qkv.weight"]
    m = GroupMixAttention(w.shape[1], qkv_bias="qkv.bias" in sd).to(dtype=w.dtype, device=w.device)
    m.load_state_dict(sd, strict=True)
    return cast_weights(m.gma_weights())


# ------------------------------------------------------------------ backends from the registry
def problem(**kw) -> GMAProblem:
    """A GMAProblem with defaults (B=2, 7x9, C=80, float32, cpu, eval, explicit)."""
    base = dict(B=2, H=7, W=9, dim=80, num_heads=8, dtype=torch.float32, device_type="cpu",
                training=False, needs_grad=False, explicit=True)
    base.update(kw)
    return GMAProblem(**base)


def backend_params(names: Iterable[str] = BACKEND_NAMES, **problem_kw) -> List:
    """pytest params, one per registered backend: those whose `not_supported_reasons` for the
    described problem are non-empty are marked skip with the reasons. A new backend is tested
    by registering it."""
    out = []
    for name in names:
        reasons = get_backend(name).not_supported_reasons(problem(**problem_kw))
        marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(reasons))] if reasons else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def skip_unless_supported(name: str, **problem_kw) -> None:
    """Skip the running test, with the backend's reasons, when it cannot run this problem."""
    reasons = get_backend(name).not_supported_reasons(problem(**problem_kw))
    if reasons:
        pytest.skip(f"{name}: " + "; ".join(reasons))


def backend_dtype_params(names: Iterable[str], dtypes: Iterable[torch.dtype], **problem_kw) -> List:
    """pytest params (backend, dtype) over both lists, each skipped with the backend's reasons
    where its declared support excludes that dtype (and the rest of the described problem)."""
    out = []
    for name in names:
        for dt in dtypes:
            reasons = get_backend(name).not_supported_reasons(problem(dtype=dt, **problem_kw))
            marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(reasons))] if reasons else []
            out.append(pytest.param(name, dt, marks=marks, id=f"{name}-{str(dt).replace('torch.', '')}"))
    return out


def emulated_here(name: str, device_type: str = "cpu") -> bool:
    """True when this backend would run through an interpreter/emulation on this device."""
    return device_type == "cpu" and get_backend(name).emulated_on_cpu


def backend_cases(names: Iterable[str], cases: Iterable, light_cases: Iterable, **problem_kw) -> List:
    """pytest params (backend, *case): every case for backends that run natively, the `light_cases`
    subset for backends emulated on this machine (the Triton interpreter is ~1000x slower), each
    skipped with the backend's reasons where its declared support excludes the problem."""
    cases, light = list(cases), list(light_cases)
    out = []
    for name in names:
        reasons = get_backend(name).not_supported_reasons(problem(**problem_kw))
        marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(reasons))] if reasons else []
        chosen = light if emulated_here(name, problem_kw.get("device_type", "cpu")) else cases
        for c in chosen:
            c = c if isinstance(c, tuple) else (c,)
            cid = "-".join(f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v) for v in c)
            out.append(pytest.param(name, *c, marks=marks, id=f"{name}-{cid}"))
    return out


def randomize_bn_stats_(model, seed=0):
    """Non-trivial BatchNorm running statistics (mean ~ 0.2 N(0, 1), var in [0.5, 1.5)), so that
    folding them changes numbers. In place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
    return model


# ------------------------------------------------------------------ ahead-of-time Triton compiles (subprocesses)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def have_triton_nvidia_backend() -> bool:
    """Triton's NVIDIA backend and its ptxas are installed (no GPU needed to compile)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(80).path)
    except Exception:
        return False


def aot_reports(script: str, tmp_path, timeout: int = 900) -> list:
    """Run `script` (Python that prints one JSON list of `specializations.compile_one` reports) in a
    subprocess without the interpreter (`triton_compile_env`) and an empty Triton cache under tmp_path, and
    return that list (skips the test where Triton's NVIDIA backend or ptxas is missing)."""
    import json
    import subprocess
    if not have_triton_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    env = triton_compile_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"AOT compile failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def assert_compiled_without_spills(rep: dict) -> None:
    """A `compile_one` report: registers within 1..255, no spill, no stack, no local memory, and none of the
    dot patterns Triton is known to miscompile (`specializations.known_miscompile`)."""
    assert 0 < rep["registers"] <= 255, rep
    assert rep["spill_stores"] == rep["spill_loads"] == rep["stack"] == 0 and not rep.get("cuobjdump_local"), rep
    assert not known_miscompiles([rep]), known_miscompiles([rep])


def known_miscompiles(reports) -> list:
    """'<label> sm_<arch>: why' for each `compile_one` report with a pattern Triton is known to miscompile
    (`specializations.known_miscompile`); reports of failed compiles are left out."""
    return [f"{r['label']} sm_{r['arch']}: {r['known_miscompile']}" for r in reports
            if "error" not in r and r["known_miscompile"]]


def triton_compile_env() -> dict:
    """The environment of a subprocess that compiles real Triton kernels: without
    TRITON_INTERPRET (under which @triton.jit builds interpreter objects) and with line info."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DISABLE_LINE_INFO")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def record_calls(monkeypatch, module, name: str, record=lambda *args, **kwargs: args[0].shape, calls=None) -> list:
    """Replace module.name by a wrapper that appends record(*args, **kwargs) to `calls` (a new
    list by default; returned) and then calls the original: which launcher ran, and how often."""
    calls = [] if calls is None else calls
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return calls


def random_dense_inputs(C: int, H: int, W: int, B: int, dtype: torch.dtype, g: torch.Generator):
    """(qkv (B, H W, 3C) in dtype, [dw3, dw5, dw7] tap-major (K, K, s), pw (3, s, s)) drawn from g, in that order:
    the inputs of the dense segment convolutions (triton_kernels/dense_z.py), weights fp32 at unit-ish scale."""
    s = C // 5
    qkv = torch.randn(B, H * W, 3 * C, generator=g).to(dtype)
    dws = [torch.randn(k, k, s, generator=g) / k for k in (3, 5, 7)]
    pw = torch.randn(3, s, s, generator=g) / s ** 0.5
    return qkv, dws, pw


def random_local_weights(C: int, g: torch.Generator):
    """(local_dw tap-major (3, 3, 3s), local_pw (s, 3s)) drawn from g: the local branch's filters as the dense Z
    pass reads them (triton_kernels/dense_z.py), fp32 at unit-ish scale."""
    s = C // 5
    return torch.randn(3, 3, 3 * s, generator=g) / 3, torch.randn(s, 3 * s, generator=g) / (3 * s) ** 0.5


def random_folded_weights(C: int, dtype: torch.dtype, seed: int = 0):
    """Folded weights (`folding.FoldedGMAWeights`, BatchNorms from random running statistics) of a
    random layer of width C, in `dtype`: the same values for every dtype of one seed."""
    from gmf_kernels.folding import fold_eval
    from gmf_kernels.numerics import default_hyper, random_gma_weights
    return fold_eval(cast_weights(random_gma_weights(C, seed=seed), dtype), default_hyper(C), dtype)


def defined_triton_kernels() -> set:
    """The names of every `gma_*_kernel` function decorated with `triton.jit` (with or without
    arguments, on any number of lines) in gmf_kernels/triton_kernels/, parsed from the sources."""
    import ast
    from pathlib import Path
    import gmf_kernels

    def is_jit(d):
        d = d.func if isinstance(d, ast.Call) else d
        return isinstance(d, ast.Attribute) and d.attr == "jit" and getattr(d.value, "id", None) == "triton"
    names = set()
    for path in (Path(gmf_kernels.__file__).parent / "triton_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("gma_") and node.name.endswith("_kernel") \
                    and any(is_jit(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def gpu_tiles_under_interpreter(monkeypatch) -> None:
    """The Triton launchers plan the GPU tiles (many programs, split reductions) for CPU tensors,
    which then run them under the interpreter: each planning module's `interpreting` says False."""
    import gmf_kernels.triton_kernels.aggregation_backward as agb
    import gmf_kernels.triton_kernels.attention_backward as atb
    import gmf_kernels.triton_kernels.launcher as launcher
    import gmf_kernels.triton_kernels.recompute as recompute
    import gmf_kernels.triton_kernels.statistics as statistics
    for mod in (launcher, statistics, recompute, atb, agb):
        monkeypatch.setattr(mod, "interpreting", lambda: False)


def triton_test_device() -> str:
    """Where a Triton kernel test runs its kernels: "cpu" under the interpreter, else "cuda" (the
    calling module is skipped, with the reason, when neither is possible). Call at import time."""
    from gmf_kernels.triton_kernels._common import interpreting
    if interpreting():
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)
    return "cuda"


def to_device(x, device):
    """x (a tensor, or a NamedTuple of tensors such as folded weights) on `device`."""
    if isinstance(x, tuple):
        return type(x)(*[to_device(t, device) for t in x])
    return x.to(device)


def cuda_backend_on_cpu(set_attr=setattr):
    """The cuda backend, told that it may run CPU tensors (tests only: its kernels then run in
    the emulation build, or only their fakes are traced): "cpu" added to its device types, no
    availability reasons. set_attr: ``monkeypatch.setattr`` in a test, plain setattr in a
    spawned worker process."""
    backend = get_backend("cuda")
    set_attr(backend, "device_types", backend.device_types | {"cpu"})
    set_attr(backend, "availability_reasons", lambda: [])
    return backend


def load_script(path: Path, name: str):
    """A script that is not a package module (benchmarks/*.py), loaded by path once per process under
    `name` (registered in sys.modules: dataclasses look their module up there; a second test file asking
    for the same name gets the same module instead of executing the script again)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
