"""GPU compilation without a GPU: every Triton kernel specialisation that real calls of the
five released models make the JIT compile (their stage widths at the 224x224 stage grids,
batch 128 and 1, fp32 / fp16 / bf16 where the architecture supports it), for sm_70, sm_75,
sm_80 and sm_90, compiles with zero register spills and with line information.

Runs `python -m gmf_kernels.triton_kernels.specializations` in a subprocess: the test
process usually has TRITON_INTERPRET=1 set (CPU machines), under which ``@triton.jit``
builds interpreter objects that cannot be compiled. The subprocess derives each
specialisation from the launcher's own plan of the call and Triton's own JIT binder (so
integer divisibility, ==1 constants and pointer alignment are the runtime's), compiles it
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a pool of two
worker processes, into an empty Triton cache (so it really compiles), and reads registers /
spills with ``ptxas -lineinfo -v`` (and ``cuobjdump`` where present).
`benchmarks/triton_resources.py` writes the same figures as a table
(benchmarks/results/triton_resources_sm70_sm75_sm80_sm90.md); this test does not rewrite it.
"""
import json
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from gmf_kernels.triton_kernels.config import AOT_ARCHS, arch_dots, capability_of_arch, dot_precision  # noqa: E402
from gmf_kernels.triton_kernels.specializations import real_calls  # noqa: E402
from helpers import ROOT, have_triton_nvidia_backend as _have_nvidia_backend, known_miscompiles  # noqa: E402
from helpers import triton_compile_env as _env  # noqa: E402

KERNELS = ("aggregate", "attention", "combine")


def _compile(tmp, *args):
    """The specialisations CLI's results (compiled into an empty cache under tmp)."""
    if not _have_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    out = tmp / "resources.json"
    cmd = [sys.executable, "-m", "gmf_kernels.triton_kernels.specializations", "--json", str(out),
           "--jobs", "2", "--cache-dir", str(tmp / "cache"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    if not out.exists():
        pytest.fail(f"compile run produced no results (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _script_json(tmp, name: str, text: str, *args):
    """Run `text` as a script file (``@triton.jit`` needs its source in a file) in a process without
    the interpreter; its last JSON line."""
    script = tmp / f"{name}.py"
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("{", "["))]
    assert lines, f"{name} script failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("triton_aot"), "--arch", *map(str, AOT_ARCHS))


def test_every_real_call_is_covered(compiled):
    """Each real call has, on each arch, exactly one specialisation of each kernel; every
    (kernel, width, dtype, arch) of the released models is there."""
    from gmf_kernels.models.configs import MODEL_WIDTHS
    calls = real_calls()
    seen = {}
    for r in compiled:
        for u in r["used_by"]:
            seen.setdefault((r["kernel"], r["arch"], u.split(" [")[0]), []).append(r["label"])
    for call in calls:
        for arch in AOT_ARCHS:
            if call.dtype not in arch_dots(capability_of_arch(arch)):
                continue                      # refused on that arch (ARCH_SUPPORT): never compiled
            for k in KERNELS:
                assert len(seen.get((k, arch, call.label()), [])) == 1, (k, arch, call.label())
    have = {(r["kernel"], r["C"], r["dtype"], r["arch"]) for r in compiled}
    for arch in AOT_ARCHS:
        supported = arch_dots(capability_of_arch(arch))
        for C in MODEL_WIDTHS:
            assert ("combine", C, "-", arch) in have
            for k in ("aggregate", "attention"):
                for dt in ("fp32", "fp16", "bf16"):
                    assert ((k, C, dt, arch) in have) == (dt in supported), (k, C, dt, arch)


def test_every_specialisation_compiles(compiled):
    failed = [f"{r['label']} sm_{r['arch']}: {r['error']}" for r in compiled if "error" in r]
    assert not failed, "compile failures:\n" + "\n".join(failed)


def test_no_register_spills(compiled):
    ok = [r for r in compiled if "error" not in r]
    assert ok and all(r["registers"] > 0 for r in ok), "ptxas -v report not parsed"
    spills = _spills(ok)
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert all(r["registers"] <= 255 for r in ok)


def test_no_known_miscompile(compiled):
    """No forward specialisation of a real call has a dot pattern Triton is known to miscompile
    (`specializations.known_miscompile`: 3xTF32 dots taking one 64-wide value as both operands)."""
    bad = known_miscompiles(compiled)
    assert not bad, "\n".join(bad)


def _spills(rows):
    return [f"{r['label']} sm_{r['arch']}: {r['registers']} regs, spill stores {r['spill_stores']} B, "
            f"loads {r['spill_loads']} B, stack {r['stack']} B" for r in rows
            if r["spill_stores"] or r["spill_loads"] or r["stack"] or r.get("cuobjdump_local", 0)]


#: Widths no released model has, one per padded segment width S_PAD 16, 32, 64, 128.
OTHER_WIDTHS = (50, 130, 250, 500)


def test_other_widths_compile_without_spills_on_sm90(tmp_path):
    """A width no released model has takes the aggregation tiles of its padded segment width
    (`config.agg_tiles`, AGG_FALLBACK_TILES): on sm_90, at a 13x17 grid, every kernel compiles,
    without spills (with the previous fallback (16, 4, min(32, S_PAD)) the aggregation spilled
    24 B at C = 50 bf16, 40 B at 130 fp32, 4 B at 250 bf16 and ~430 B at 500 fp32)."""
    rows = _compile(tmp_path, "--arch", "90", "--dtype", "fp32", "bf16", "--batch", "8",
                    "--widths", *map(str, OTHER_WIDTHS))
    assert {(r["kernel"], r["C"]) for r in rows} >= {(k, C) for k in KERNELS for C in OTHER_WIDTHS}
    failed = [f"{r['label']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "compile failures:\n" + "\n".join(failed)
    spills = _spills(rows)
    assert not spills, "register spills:\n" + "\n".join(spills)
    bad = known_miscompiles(rows)
    assert not bad, "\n".join(bad)


def test_line_information_kept(compiled):
    """Triton's default (no TRITON_DISABLE_LINE_INFO): .loc directives in the PTX, -lineinfo to
    ptxas, so compute-sanitizer and ncu point at kernel source lines."""
    missing = [f"{r['label']} sm_{r['arch']}" for r in compiled if "error" not in r and not r["line_info"]]
    assert not missing, missing


def test_dot_variant_per_architecture(compiled):
    """The compiled dots are the ARCH_SUPPORT variant of each arch: FMA ("ieee") on sm_70/75,
    3xTF32 for fp32 and TF32 (operands rounded by cvt.rna) for fp16/bf16 on sm_80/90."""
    for r in compiled:
        if r["kernel"] == "combine":
            assert r["dot_precision"] == "-"
            continue
        want = dot_precision(r["dtype"], capability_of_arch(r["arch"]))
        assert r["dot_precision"] == want, r["label"]
        assert want == ("ieee" if r["arch"] < 80 else "tf32x3" if r["dtype"] == "fp32" else "tf32")
        # TF32 operands are rounded (cvt.rna: by mm for "tf32", by Triton's split for "tf32x3")
        assert (r["tf32_conversions"] > 0) == (want != "ieee"), r["label"]


def test_shape_integers_are_not_specialised(compiled):
    """The kernels ask the JIT not to specialise N, H, W and the per-job split counts
    (do_not_specialize): one variant per (kernel, C, dtype, arch) serves every image size and
    batch (job 0 has one split at most batches, the 7x7 job one only at batch 128 and above)."""
    keys = [(r["kernel"], r["C"], r["dtype"], r["arch"]) for r in compiled]
    assert len(keys) == len(set(keys))
    splits = tuple(f"splits{j}{x}" for j in range(5) for x in ("=1", "%16"))
    for r in compiled:
        assert not any(a in r["specialised"].split() for a in ("N%16", "H%16", "W%16", "N=1", "H=1", "W=1")
                       + splits), r["label"]


_SPECIALISE_SCRIPT = r"""
import json, triton, triton.language as tl
from gmf_kernels.triton_kernels.specializations import specialize_launch

@triton.jit
def k(x, n, m, one, f, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x + i, tl.load(x + i) * f + n + m + one)

class Ptr:  # a tensor-like argument at a given address
    def __init__(self, addr):
        import torch
        self.dtype, self.addr = torch.float32, addr
    def data_ptr(self):
        return self.addr

out = {}
for name, args in {"aligned": (Ptr(1024), 32, 17, 1, 2.0), "unaligned": (Ptr(1028), 48, 5, 1, 1.0)}.items():
    s = specialize_launch(k, 90, args, dict(BLOCK=16, num_warps=4))
    out[name] = {"signature": dict(s.signature), "constexprs": dict(s.constexprs), "attrs": dict(s.attrs),
                 "jit_constants": list(s.jit_constants), "options": dict(s.options)}
print(json.dumps(out))
"""


def test_specialisation_is_tritons_own(tmp_path):
    """`specialize_launch` goes through the installed Triton's JIT binder: ints divisible by 16
    get tt.divisibility, ints equal to 1 become constants, floats are not specialised, 16-byte
    aligned pointers get tt.divisibility (a Triton that changes these internals fails here)."""
    res = _script_json(tmp_path, "specialisation", _SPECIALISE_SCRIPT)
    a, u = res["aligned"], res["unaligned"]
    assert a["signature"] == {"x": "*fp32", "n": "i32", "m": "i32", "one": "constexpr", "f": "fp32",
                              "BLOCK": "constexpr"}, a
    assert a["constexprs"] == {"one": 1, "BLOCK": 16} and a["jit_constants"] == ["one"], a
    # the JIT's empty entries are kept (its cache key hashes them): m = 17 / 5 is not divisible by 16
    assert a["attrs"] == {"x": [["tt.divisibility", 16]], "n": [["tt.divisibility", 16]], "m": []}, a
    assert u["attrs"] == {"x": [], "n": [["tt.divisibility", 16]], "m": []}, u  # 1028 is not 16-byte aligned
    assert a["options"] == {"num_warps": 4}


_CACHE_KEY_SCRIPT = r"""
import hashlib, json, sys
sys.path.insert(0, "tests")
import triton.compiler.compiler as tc
import triton_stand_in as stand_in
from gmf_kernels.triton_kernels import specializations as S

ARCH = int(sys.argv[1])
stand_in.install(ARCH)
rows = []
original = S.specialize_launch


def checked(fn, arch, args, kwargs):
    spec = original(fn, arch, args, kwargs)
    fn.device_caches.clear()            # a fresh binder (create_binder), for this target
    n = len(stand_in.looked_up)
    fn.run(*args, grid=(1,), warmup=False, **kwargs)                                  # the JIT's real path
    assert len(stand_in.looked_up) == n + 1, "the launch did not look up the cache"
    target, src, options = S._source_and_options(spec)
    aot = stand_in.lookup_hash(lambda: tc.compile(src, target=target, options=options.__dict__))  # compile_one's
    rows.append({"kernel": spec.kernel, "jit": stand_in.looked_up[-1][1], "aot": aot,
                 "cache_key": hashlib.sha256(S.cache_key(spec).encode()).hexdigest(),
                 "empty_attrs": [a for a, v in spec.attrs if not v]})
    return spec


S.specialize_launch = checked
for call in (S.Call(160, 28, 28, 128, "bf16"), S.Call(320, 7, 7, 1, "fp32"), S.Call(80, 56, 56, 8, "fp16")):
    S.training_specializations_of_call(call, ARCH)
print(json.dumps(rows))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_ahead_of_time_cache_key_is_the_jits(tmp_path, arch):
    """A kernel compiled ahead of time (`specializations.compile_one`, the GPU report's `--warm`)
    lands under the cache key the JIT looks up for the real launch, so the launch is a cache hit:
    for every launch of three training calls (forward, statistics, recompute, backward), the hash
    `triton.compile` looks up from ``JITFunction.run`` (its own binder and options, an sm_<arch>
    target from a stand-in driver, stopped at the cache lookup) equals the one it looks up from
    `compile_one`'s source and options, and `specializations.cache_key`. Until 2026-12-03 the
    specialisations dropped the JIT's empty attribute entries (an int not divisible by 16), and
    every aggregation and attention kernel missed the cache."""
    if not _have_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend is not available")
    rows = _script_json(tmp_path, "cache_key", _CACHE_KEY_SCRIPT, arch)
    kernels = {r["kernel"] for r in rows}
    assert {"gma_aggregate_kernel", "gma_attention_kernel", "gma_combine_kernel", "gma_statistics_kernel",
            "gma_b1_dkv_kernel", "gma_dz_kernel"} <= kernels, kernels
    bad = [r for r in rows if not r["jit"] == r["aot"] == r["cache_key"]]
    assert not bad, f"{len(bad)}/{len(rows)} launches miss the cache: {bad[:3]}"
    assert any(r["empty_attrs"] for r in rows), "no launch with an empty attribute entry: the case is not covered"


_REAL_LAUNCH_SCRIPT = r"""
import hashlib, json, sys
sys.path.insert(0, "tests")
import torch
import triton_stand_in as stand_in

ARCH = 90
stand_in.install(ARCH)

from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights  # noqa: E402
from gmf_kernels.triton_kernels import specializations as S  # noqa: E402
from gmf_kernels.triton_kernels.train_op import triton_train_pre_projection  # noqa: E402

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
for C, G, B, dn, train in ((160, 28, 16, "bf16", True), (80, 56, 8, "fp16", True), (320, 7, 1, "fp32", True),
                           (320, 14, 2, "bf16", False)):
    hp = default_hyper(C)
    w = cast_weights(random_gma_weights(C, seed=0), torch.float32)
    for t in w.tensors():
        if t.is_floating_point():
            t.requires_grad_(train)
    x = torch.randn(B, G * G, 3 * C).to(DT[dn]).requires_grad_(train)
    with torch.set_grad_enabled(train):
        pre = triton_train_pre_projection(x, (G, G), w, hp, train)
        if train:   # the output gradient as the projection's backward makes it: contiguous (B, N, C)
            pre.backward(torch.randn_like(pre))
warm = {hashlib.sha256(S.cache_key(sp).encode()).hexdigest() for sp in S.report_specializations(ARCH)}
print(json.dumps({"launched": sorted({k for k, _ in stand_in.looked_up}),
                  "missing": sorted({k for k, h in stand_in.looked_up if h not in warm})}))
"""


def test_real_launches_find_the_warm_cache(tmp_path):
    """Every kernel the real code path launches -- `triton_train_pre_projection` forward and
    backward in training mode (batch statistics) and eval, on CPU tensors standing in for GPU
    ones, through Triton's own `JITFunction.run` for a stand-in sm_90 driver, stopped at the cache
    lookup of the real ``triton.compile`` -- is under a key of the GPU report's warm-up
    (`report_specializations`), for calls of the real-shape tests (bf16, fp16, fp32, batch 1):
    the launchers' real buffers (dtypes, strides, alignment) specialise as the meta-tensor
    plans do."""
    if not _have_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend is not available")
    r = _script_json(tmp_path, "real_launch", _REAL_LAUNCH_SCRIPT)
    assert {"gma_aggregate_kernel", "gma_attention_kernel", "gma_combine_kernel", "gma_statistics_kernel",
            "gma_proxy_v_kernel", "gma_b1_dkv_kernel", "gma_b2_attention_kernel",
            "gma_dz_kernel"} <= set(r["launched"]), r["launched"]
    assert not r["missing"], f"launched kernels the warm-up does not compile: {r['missing']}"


_WARM_SCRIPT = r"""
import json
from gmf_kernels.triton_kernels import specializations as S

ARCH = 90
warm = S.report_specializations(ARCH)
keys = [sp.key for sp in warm]
first = {}
for i, sp in enumerate(warm):
    first.setdefault(sp.used_by[0].split(":")[0], i)
need = set()
for C, g, B in S.GPU_TRAIN_SHAPES:
    for dt in ("fp32", "fp16", "bf16"):
        need |= {sp.key for sp in S.training_specializations_of_call(S.Call(C, g, g, B, dt), ARCH)}
s_train = {sp.key for C, g in ((80, 56), (160, 28), (320, 14), (320, 7))
           for sp in S.training_specializations_of_call(S.Call(C, g, g, 128, "fp16"), ARCH)}
forward = {sp.key for sp in S.all_specializations(S.real_calls(), (ARCH,))}
# nothing started after the deadline: every specialisation comes back as not started, none compiled
late = S.compile_all(warm[:5], jobs=1, deadline_s=0, in_order=True)
print(json.dumps({"n": len(keys), "unique": len(set(keys)), "groups": first,
                  "missing_train": len(need - set(keys)), "missing_s_train": len(s_train - set(keys)),
                  "missing_forward": len(forward - set(keys)),
                  "s_train_last": max(keys.index(k) for k in s_train),
                  "late": [sorted(r) for r in late], "late_skipped": [r.get("skipped") for r in late]}))
"""


def test_warm_set_covers_the_reports_runs(tmp_path):
    """`--warm`'s specialisations (`report_specializations`) hold, each once, every launch of the
    real-shape tests' training steps (`GPU_TRAIN_SHAPES`, every dtype) and of every released
    model's forward, GroupMixFormer-S's forward first and its fp16 batch-128 training (the judged
    training run) next, all of it before the tests' other shapes; with its deadline passed,
    `compile_all` starts nothing and lists every specialisation as not started."""
    r = _script_json(tmp_path, "warm", _WARM_SCRIPT)
    assert r["n"] == r["unique"] > 100
    assert r["missing_train"] == r["missing_s_train"] == r["missing_forward"] == 0, r
    g = r["groups"]
    assert g["GroupMixFormer-S forward"] == 0
    assert g["GroupMixFormer-S forward"] < g["GroupMixFormer-S training, fp16, batch 128"] \
        < g["the real-shape tests' training steps"], g
    assert r["s_train_last"] < g["the real-shape tests' training steps"], r
    assert r["late_skipped"] == ["deadline"] * 5 and not any("compile_s" in k for k in r["late"]), r


_TRACE_SCRIPT = r"""
import json, sys, torch
from torch._dynamo.backends.common import aot_autograd
from gmf_kernels.backends.triton_backend import BACKEND
from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights
from gmf_kernels.triton_kernels import op

C, H, W = 80, 7, 9
train = sys.argv[-1] == "train"
if sys.argv[-1] in ("split", "dense"):   # the "triton.aggregate" family's SPLIT candidate: the Z pass first
    from gmf_kernels.triton_kernels import launcher
    from gmf_kernels.triton_kernels.config import gma_shape
    dense = sys.argv[-1] == "dense"        # (with ZDENSE: on tensor cores, `dense_z`)
    launcher.default_shape = lambda C, N, dots: gma_shape(C, dots=dots.precision, split=True, zdense=dense)
w = cast_weights(random_gma_weights(C, seed=0), torch.float32)
for t in w.tensors():
    if train and t.is_floating_point():
        t.requires_grad_(True)
hp = default_hyper(C)
graphs = []

def fw(gm, example_inputs):
    graphs.append([(str(n.target), dict(n.kwargs)) for n in gm.graph.nodes if n.op == "call_function"])
    def run(*args):
        raise RuntimeError("traced only: no GPU to run on")
    return run

fn = torch.compile(lambda x: BACKEND.forward(x, (H, W), w, hp, train), backend=aot_autograd(fw_compiler=fw),
                   fullgraph=True)
err = ""
try:
    with torch.set_grad_enabled(train):
        fn(torch.randn(2, H * W, C, requires_grad=train))
except RuntimeError as e:
    err = str(e)
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
kernels = [kernel_side_table.get_kernel(kw["kernel_idx"]).fn.__name__
           for g in graphs for t, kw in g if "triton_kernel_wrapper" in t]
ops = sorted({t for g in graphs for t, kw in g if t.startswith("gmf.")})
print(json.dumps({"registration": op.REGISTRATION, "kernels": kernels, "ops": ops, "graphs": len(graphs),
                  "error": err}))
"""


@pytest.mark.parametrize("mode", ["eval", "train", "split", "dense"])
def test_triton_op_traces_into_kernels(mode):
    """torch.compile(fullgraph=True) of BACKEND.forward with the real (JIT) kernels: the
    gmf::triton_pre_projection triton_op decomposes into the three kernel launches that
    Inductor sees (traced on CPU fake tensors; nothing runs, there is no GPU here); in
    training (batch statistics, gradients) one forward graph holds the statistics op that keeps Z and y
    for the backward (gmf::triton_z_moments_planes, opaque) and the same three kernels inside the
    autograd Function; with the split forward (the SPLIT tuning candidate) the Z pass's launch comes first
    (stencils, or with ZDENSE the dense convolutions), traced like the others."""
    proc = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT, mode], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"trace script failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1])
    if res["registration"] != "triton_op":
        pytest.skip(f"torch {__import__('torch').__version__} has no torch.library.triton_op")
    assert res["graphs"] == 1, res
    z_pass = {"split": ["gma_statistics_kernel"], "dense": ["gma_dense_z_kernel"]}.get(mode, [])
    assert res["kernels"] == z_pass + ["gma_aggregate_kernel", "gma_combine_kernel", "gma_attention_kernel"], res
    assert res["ops"] == (["gmf.triton_z_moments_planes.default"] if mode == "train" else []), res
    assert "traced only" in res["error"], res


def test_wrap_triton_launches_directly_unless_tracing(monkeypatch):
    """_launch.wrap_triton: a direct ``kernel[grid](...)`` on real tensors and plain Parameters (torch's wrapper would
    file an Autotuner in a global side table per launch: a leak and ~0.1 ms of host time); torch's
    ``wrap_triton`` under Dynamo, a dispatch mode (fake / proxy / functional tensors) or a tensor
    subclass, where torch.compile must see the kernel. Mocked kernel and wrapper: no GPU here."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gmf_kernels.triton_kernels import _launch

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(("direct", grid))

    class TorchWrapper:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(("wrapped", grid))

    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "_torch_wrap_triton", TorchWrapper)
    launch = _launch.wrap_triton(Kernel())
    x = torch.zeros(4)
    launch[(2, 1)](x, 3, num_warps=4)
    assert calls == [("direct", (2, 1))]
    with FakeTensorMode() as mode:
        launch[(3,)](mode.from_tensor(x), num_warps=4)
    assert calls[-1] == ("wrapped", (3,))
    launch[(4,)](torch.nn.Parameter(x), num_warps=4)   # a plain Parameter (the folded weights pass some on)
    assert calls[-1] == ("direct", (4,))

    class Sub(torch.Tensor):
        pass
    launch[(6,)](x.as_subclass(Sub), num_warps=4)      # a subclass: the careful path
    assert calls[-1] == ("wrapped", (6,))
    launch[(7,)](torch.nn.Parameter(x.as_subclass(Sub)), num_warps=4)  # a Parameter of one: the subclass's type
    assert calls[-1] == ("wrapped", (7,))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    launch[(5,)](x)
    assert calls[-1] == ("wrapped", (5,))
    monkeypatch.setattr(_launch, "interpreting", lambda: True)
    k = Kernel()
    assert _launch.wrap_triton(k) is k   # the interpreter's kernels: never wrapped


_DIRECT_SCRIPT = r"""
import collections, json, sys, torch
from triton.runtime.jit import JITFunction
launched = collections.Counter()
def run(self, *args, grid, warmup, **kwargs):      # no GPU: count the launch, run nothing
    launched[self.fn.__name__] += 1
JITFunction.run = run
import torch._higher_order_ops.triton_kernel_wrap as tkw
from gmf_kernels.backends.triton_backend import BACKEND
from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights
from gmf_kernels.triton_kernels import _launch
C, H, W, B = 80, 7, 9, 2
w = cast_weights(random_gma_weights(C, seed=0), torch.float32)
params = []
for name, t in w._asdict().items():                 # the module's parameters are nn.Parameters
    if isinstance(t, torch.Tensor) and t.is_floating_point() and "running" not in name:
        params.append(name)
w = w._replace(**{n: torch.nn.Parameter(getattr(w, n)) for n in params})
w = w._replace(**{n: tuple(torch.nn.Parameter(t) if t is not None and t.is_floating_point() else t for t in v)
                  for n, v in w._asdict().items() if isinstance(v, tuple) and "running" not in n})
wrapped = []
real_wrap = _launch._torch_wrap_triton
_launch._torch_wrap_triton = lambda k: (wrapped.append(k.fn.__name__), real_wrap(k))[1]
side = lambda: (len(tkw.KernelSideTable.id_to_kernel), len(tkw.KernelSideTable.constant_args))
before = side()
x = torch.randn(B, H * W, C, requires_grad=True)
for _ in range(2):
    out = BACKEND.forward(x, (H, W), w, default_hyper(C), True)
    out.sum().backward()
print(json.dumps({"launched": dict(launched), "wrapped": wrapped, "side_before": before, "side_after": side(),
                  "n_params": sum(isinstance(t, torch.nn.Parameter) for t in w.tensors())}))
"""


def test_trace_running_sees_a_tensor_subclass_among_launch_arguments():
    """`_tracing.trace_running` (each Triton launch asks it): plain tensors, plain Parameters and scalars are
    plain; a tensor subclass anywhere among the values is a trace (torch's wrapper then launches)."""
    import torch

    from gmf_kernels._tracing import trace_running

    class Sub(torch.Tensor):
        pass

    plain = (torch.zeros(2), torch.nn.Parameter(torch.zeros(2)), 3, 1.5, True, None, "s",
             torch.zeros(1, dtype=torch.int64))
    assert not trace_running(plain)
    assert not trace_running(())
    sub = torch.zeros(2).as_subclass(Sub)
    assert trace_running(plain + (sub,)) and trace_running((sub,) + plain)


def test_training_launches_are_direct():
    """Two training steps of a layer whose weights are nn.Parameters (as a module's are), on the
    launch path a GPU takes (no interpreter; Triton's launch replaced by a counter: no GPU here):
    every kernel of the statistics pass, the forward, the recompute and the backward is launched
    directly. None goes through torch's ``wrap_triton``, whose launches each leave two entries in
    torch's global kernel side table (never freed) and cost ~0.5 ms of host time: until
    2026-12-05 the local-branch backward's did, once per layer and step, because the folded
    weights pass the LayerNorm's Parameters through."""
    proc = subprocess.run([sys.executable, "-c", _DIRECT_SCRIPT], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"script failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    r = json.loads(lines[-1])
    assert r["n_params"] > 10, r
    assert "gma_local_backward_kernel" in r["launched"] and "gma_statistics_kernel" in r["launched"], r
    assert r["launched"]["gma_aggregate_kernel"] == 2, r
    assert r["wrapped"] == [], r
    assert r["side_after"] == r["side_before"], r
