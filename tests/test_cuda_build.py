"""CUDA backend: build, load, staleness, resources, argument checks, versions.

Runs on CPU-only CI machines that have nvcc:

* the module is compiled with nvcc for the default architectures (SASS sm_75, sm_80, sm_86,
  sm_89, sm_90 and PTX compute_90) into a temporary directory and imported (no driver
  needed: cudart is static); `GMF_CUDA_ARCHS` and `native` handling;
* the sources-hash staleness check, the cache lookup and the ptxas resource figures (no
  kernel may spill on any default architecture; sm_70 is tests/test_cuda_sm70.py);
* the host launchers' argument validation (it runs before any CUDA call);
* the module's own CPU emulation entry point through the Python launcher (the kernel code
  is tested in depth, barriers included, by tests/test_cuda_emulation.py on an
  emulation-only build);
* the backend's unavailability reasons on a CPU machine.

Tests marked `needs_gpu` run the real kernels against the float64 reference at fp32 /
fp16 / bf16 and skip without a CUDA device (tests/cuda_cases.py has the oracle).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import gmf_kernels.cuda as gcuda
from cuda_cases import FP32_TOL, Case
from cuda_cases import check as _check
from cuda_cases import run as _run
from gmf_kernels.numerics import cast_weights, default_hyper, max_rel_error, random_gma_weights
from helpers import assert_close_verbose, assert_max_rel_close, assert_within_reference_error
from gmf_kernels.backends import get_backend, select_backend
from gmf_kernels.backends import cuda_backend as cb
from gmf_kernels.backends.base import GMAProblem
from gmf_kernels.cuda import build as cbuild
from gmf_kernels.cuda import launcher as cl
from gmf_kernels.cuda import op as cop  # noqa: F401  (registers gmf::cuda_pre_projection)
from gmf_kernels.folding import WEIGHT_NAMES, fold_eval
from gmf_kernels.reference import reference_group_mix_attention

ARCHS = cbuild.DEFAULT_ARCHS  # "75;80;86;89;90": the resource checks cover every default target
ARCH_LIST = ARCHS.split(";")
BUILD_CMD = "python -m gmf_kernels.cuda build"


def _have_nvcc() -> bool:
    try:
        cbuild.find_nvcc()
        return True
    except cbuild.BuildError:
        return False


needs_nvcc = pytest.mark.skipif(not _have_nvcc(), reason="nvcc not found (CUDA toolkit not installed)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without a GPU")


# ------------------------------------------------------------------ the build (once per module)
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Compile for the default architectures into a temporary directory: (module path, out dir, seconds)."""
    if not _have_nvcc():
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("gmf_cuda_build")
    t0 = time.time()
    path = cbuild.build(out_dir=out, archs=ARCHS, quiet=True)
    return Path(path), out, time.time() - t0


@pytest.fixture(scope="module")
def mod(built):
    return gcuda.load_from(built[0])


@pytest.fixture
def use_module(mod, monkeypatch):
    """Make gmf_kernels.cuda.load() return the freshly built module."""
    monkeypatch.setattr(gcuda, "_loaded", mod)
    return mod


# ------------------------------------------------------------------ build products
@needs_nvcc
def test_build_products(built):
    path, out, seconds = built
    assert path.is_file() and path.name == cbuild.module_filename()
    meta = json.loads((out / cbuild.METADATA_FILE).read_text())
    assert meta["mode"] == "cuda"
    assert meta["archs"] == ARCH_LIST == ["75", "80", "86", "89", "90"]
    assert meta["ptx_archs"] == ["90"]
    assert meta["cuda_runtime_version"] == cbuild.cuda_version_int(meta["nvcc_version"])
    assert meta["sources_hash"] == cbuild.sources_hash()
    assert meta["lineinfo"] is True
    flags = " ".join(meta["nvcc_flags"])
    for a in ARCH_LIST[:-1]:
        assert f"arch=compute_{a},code=sm_{a} " in flags + " "
    assert "arch=compute_90,code=[sm_90,compute_90]" in flags  # SASS for each, PTX of the highest
    assert "-Xptxas -v" in flags and "-lineinfo" in flags
    print(f"build took {seconds:.0f} s")


@needs_nvcc
def test_module_metadata(mod, built):
    meta = json.loads((built[1] / cbuild.METADATA_FILE).read_text())
    assert mod.sources_hash() == cbuild.sources_hash()
    assert mod.__sources_hash__ == mod.sources_hash()
    assert mod.build_mode() == "cuda"
    assert mod.build_archs() == "75;80;86;89;90"
    assert mod.build_ptx_archs() == "90"
    assert mod.cuda_runtime_version() == meta["cuda_runtime_version"] > 0  # e.g. 13000 for nvcc 13.0
    drv = mod.cuda_driver_version()  # never raises; 0 without a driver
    assert isinstance(drv, int) and drv >= 0
    if not torch.cuda.is_available():
        assert drv == 0 or torch.version.cuda is not None
    assert tuple(mod.weight_names()) == WEIGHT_NAMES
    assert list(mod.specialized_head_dims()) == [4, 8, 16, 20, 24, 32, 36, 48]
    assert dict(mod.DTYPE_CODES) == {str(k).replace("torch.", ""): v for k, v in cl.DTYPE_CODES.items()}


def test_parse_archs(monkeypatch):
    monkeypatch.delenv("GMF_CUDA_ARCHS", raising=False)
    assert cbuild.parse_archs(None) == ["75", "80", "86", "89", "90"]  # the default
    assert cbuild.parse_archs("80;90") == ["80", "90"]
    assert cbuild.parse_archs("9.0 8.0") == ["80", "90"]
    assert cbuild.parse_archs("sm_90a,sm_80") == ["80", "90a"]
    assert cbuild.parse_archs("70;120") == ["70", "120"]
    for bad in ("60", "sm_xx", ""):
        with pytest.raises(cbuild.BuildError):
            cbuild.parse_archs(bad)
    monkeypatch.setenv("GMF_CUDA_ARCHS", "75")
    assert cbuild.parse_archs(None) == ["75"]
    g = cbuild.gencode_flags(["80", "90"])
    assert g == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
    assert cbuild.ptx_archs(["75", "90"]) == ["90"]
    assert cbuild.cuda_version_int("13.0.88") == 13000 and cbuild.cuda_version_int("12.9.86") == 12090


def test_native_archs(monkeypatch):
    """native: the visible GPUs' compute capability, or a clear error without one."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert f"{major}{minor}" in cbuild.parse_archs("native")
    else:
        with pytest.raises(cbuild.BuildError, match="native: no CUDA GPU is visible"):
            cbuild.parse_archs("native")
    # nvidia-smi's answer is parsed (mocked: "8.6" and "9.0")
    import subprocess
    monkeypatch.setattr(cbuild.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.setattr(cbuild.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "8.6\n9.0\n", ""))
    assert cbuild.parse_archs("native") == ["86", "90"]
    assert cbuild.parse_archs("native;75") == ["75", "86", "90"]


@needs_nvcc
def test_build_cli_honours_gmf_cuda_archs(monkeypatch, tmp_path, capsys):
    """`GMF_CUDA_ARCHS=75 python -m gmf_kernels.cuda build` targets sm_75 (+ its PTX); the
    compile itself is stubbed (the `built` fixture compiles for real)."""
    from gmf_kernels.cuda import __main__ as cli
    seen = {}

    def fake_compile(out_dir, cfg, *args, **kw):
        seen.update(cfg)
        return out_dir / cbuild.module_filename()

    monkeypatch.setattr(cbuild, "_compile", fake_compile)
    monkeypatch.setenv("GMF_CUDA_ARCHS", "75")
    assert cli.main(["build", "--out", str(tmp_path)]) == 0
    assert seen["archs"] == ["75"] and seen["ptx_archs"] == ["75"]
    assert "arch=compute_75,code=[sm_75,compute_75]" in " ".join(seen["nvcc_flags"])
    assert "-lineinfo" in seen["nvcc_flags"]
    monkeypatch.setenv("GMF_CUDA_ARCHS", "sm_61")
    assert cli.main(["build", "--out", str(tmp_path)]) == 1
    assert "sm_70 or newer" in capsys.readouterr().err


def test_sources_hash_tracks_content(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(cbuild.csrc_dir(), src)
    h0 = cbuild.sources_hash(src)
    assert h0 == cbuild.sources_hash()
    (src / "gma_layout.h").write_text((src / "gma_layout.h").read_text() + "\n// changed\n")
    assert cbuild.sources_hash(src) != h0
    assert cbuild.sources_hash(tmp_path / "nothing") is None


# ------------------------------------------------------------------ staleness and lookup
@needs_nvcc
def test_stale_module_raises_with_build_command(built, tmp_path):
    path, _, _ = built
    src = tmp_path / "csrc"
    shutil.copytree(cbuild.csrc_dir(), src)
    gcuda.load_from(path, sources_dir=src)  # same sources: fresh
    (src / "gma_attention.cuh").write_text((src / "gma_attention.cuh").read_text() + "\n// edit\n")
    with pytest.raises(ImportError, match="stale") as e:
        gcuda.load_from(path, sources_dir=src)
    assert BUILD_CMD in str(e.value)


@needs_nvcc
def test_load_searches_prebuilt_and_cache(built, tmp_path, monkeypatch):
    path, out, _ = built
    empty = tmp_path / "prebuilt"
    empty.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setattr(cbuild, "prebuilt_dir", lambda: empty)
    monkeypatch.setenv("GMF_CUDA_CACHE", str(cache))
    monkeypatch.setattr(gcuda, "_loaded", None)
    monkeypatch.setattr(gcuda, "_loaded_path", None)

    with pytest.raises(ImportError, match="not built") as e:  # nothing anywhere
        gcuda.load()
    assert BUILD_CMD in str(e.value)

    meta = json.loads((out / cbuild.METADATA_FILE).read_text())
    entry = cache / meta["build_key"]
    entry.mkdir(parents=True)
    shutil.copy2(path, entry / path.name)
    stale = dict(meta, sources_hash="0" * 24)
    (entry / cbuild.METADATA_FILE).write_text(json.dumps(stale))
    with pytest.raises(ImportError, match="stale") as e:  # a build of other sources
        gcuda.load()
    assert BUILD_CMD in str(e.value)

    (entry / cbuild.METADATA_FILE).write_text(json.dumps(meta))
    m = gcuda.load()
    assert m.sources_hash() == cbuild.sources_hash()
    assert gcuda.loaded_path() == str(entry / path.name)

    # build() into the cache finds this entry (same key) and does not recompile
    t0 = time.time()
    again = cbuild.build(archs=ARCHS, quiet=True)
    assert again == str(entry / path.name)
    assert time.time() - t0 < 30


def test_file_lock_is_exclusive(tmp_path):
    lock = tmp_path / "x.lock"
    with cbuild._file_lock(lock):
        assert lock.exists()
    with cbuild._file_lock(lock):  # re-acquirable after release
        pass


# ------------------------------------------------------------------ resources
PTXAS_SAMPLE = """\
ptxas info    : Compiling entry function '_ZN3gmf20gma_attention_kernelIfLi8EEEvNS_9GmaParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN3gmf20gma_attention_kernelIfLi8EEEvNS_9GmaParamsE
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 584 bytes cmem[0]
"""


def test_parse_ptxas_sample():
    (e,) = cbuild.parse_ptxas(PTXAS_SAMPLE)
    assert (e["arch"], e["registers"], e["stack"], e["spill_stores"], e["spill_loads"], e["static_smem"]) == \
        ("sm_90", 40, 16, 8, 12, 1024)
    assert "gma_attention_kernel" in e["kernel"]


@needs_nvcc
def test_ptxas_resources_parsed(built):
    _, out, _ = built
    assert "Used" in (out / cbuild.PTXAS_LOG).read_text()
    rows = json.loads((out / cbuild.RESOURCES_JSON).read_text())
    # per arch: aggregate, attention, pack for 3 dtypes (any head width), combine x 9 head widths
    assert len(rows) == (3 * 3 + 9) * len(ARCH_LIST)
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCH_LIST}
    for arch in (f"sm_{a}" for a in ARCH_LIST):
        names = [r["kernel"] for r in rows if r["arch"] == arch]
        for k in ("gma_aggregate_kernel", "gma_attention_kernel", "gma_combine_kernel", "gma_pack_kernel"):
            assert any(k in n for n in names), (arch, k)
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        if "gma_aggregate_kernel" in r["kernel"] or "gma_attention_kernel" in r["kernel"]:
            assert r["registers"] <= 128, r  # __launch_bounds__(256, 2)
        else:
            assert r["registers"] <= 64, r   # __launch_bounds__(256, 4)
        assert r["stack"] == 0, r  # no local memory at all (spills or run-time-indexed arrays)
    spilling = [f"{r['arch']} {r['kernel']}: {r['spill_stores']}/{r['spill_loads']} B"
                for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "kernels spill registers:\n" + "\n".join(spilling)


def _cuobjdump():
    """cuobjdump: the toolkit's, else the copy the triton wheel ships."""
    cands = [shutil.which("cuobjdump"), str(Path(cbuild.find_nvcc()).parent / "cuobjdump") if _have_nvcc() else None]
    try:
        import triton
        cands.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and Path(c).is_file():
            return c
    return None


def sass_by_kernel(module_path, arch):
    """{demangled kernel name: its SASS text} for one architecture of the built module."""
    import subprocess
    tool = _cuobjdump()
    if tool is None:
        pytest.fail("cuobjdump not found (CUDA toolkit or the triton wheel)")
    out = subprocess.run([tool, "-sass", "-arch", arch, str(module_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    parts = re.split(r"\n\s*Function : (\S+)\n", out.stdout)
    code = dict(zip(parts[1::2], parts[2::2]))
    names = cbuild.demangle(code)
    return {names[k]: v for k, v in code.items()}


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float", "__half", "__nv_bfloat16"])
def test_sm90_sass_uses_tensor_cores(built, dtype):
    """The sm_90 machine code of the aggregation and attention kernels multiplies on the tensor
    cores (HMMA: fp16, bf16, TF32 for fp32 I/O) and uses no local memory (no spill, no stack)."""
    sass = sass_by_kernel(built[0], "sm_90")
    kind = {"float": ".TF32", "__half": "", "__nv_bfloat16": ".BF16"}[dtype]
    for kernel in ("gma_aggregate_kernel", "gma_attention_kernel"):
        (name,) = [n for n in sass if f"{kernel}<{dtype}, 0>" in n]
        hmma = re.findall(r"\bHMMA\.\w+\.F32(\.\w+)?", sass[name])
        assert hmma, f"{name}: no tensor-core instruction in its sm_90 SASS"
        assert all(h == kind for h in hmma), (name, set(hmma))
        assert not re.search(r"\b(STL|LDL)\b", sass[name]), f"{name} uses local memory"
    print(f"{dtype}: " + ", ".join(f"{n.split('(')[0]}: {len(re.findall('HMMA', s))} HMMA"
                                   for n, s in sass.items() if dtype in n))


@needs_nvcc
def test_sm80_sass_uses_tensor_cores_and_sm75_falls_back(built):
    """sm_80 has TF32 and bf16 tensor cores too; sm_75 (T4) only fp16 ones: there bf16 and fp32
    products run as FMA (compile-time choice, csrc/gma_mma.cuh)."""
    s80 = sass_by_kernel(built[0], "sm_80")
    s75 = sass_by_kernel(built[0], "sm_75")
    for dtype in ("float", "__half", "__nv_bfloat16"):
        (name,) = [n for n in s80 if f"gma_aggregate_kernel<{dtype}, 0>" in n]
        assert "HMMA" in s80[name], name
        (name,) = [n for n in s75 if f"gma_aggregate_kernel<{dtype}, 0>" in n]
        assert ("HMMA" in s75[name]) == (dtype == "__half"), name


# ------------------------------------------------------------------ argument validation
FAKE = 1 << 32  # plausible, never dereferenced: validation fails before any CUDA call


def _fake_args(C=80, B=2, H=7, W=9, dtype=0):
    """Arguments that pass validation, with fake, disjoint, aligned addresses."""
    weights = [FAKE + (1 << 24) * (i + 1) for i in range(len(WEIGHT_NAMES))]
    return dict(qkv=FAKE + (1 << 30), pre=FAKE + (2 << 30), workspace=FAKE + (3 << 30),
                workspace_bytes=1 << 28, weights=weights, B=B, H=H, W=W, C=C, dtype=dtype,
                scale=0.3, ln_eps=1e-5)


BAD_ARGS = [
    ("qkv null", dict(qkv=0), "qkv is a null pointer"),
    ("pre null", dict(pre=0), "pre is a null pointer"),
    ("workspace null", dict(workspace=0), "workspace is a null pointer"),
    ("weight null", "weight_null", "weight dw5 is a null pointer"),
    ("13 weights", "weights_short", "expected 14 weight pointers"),
    ("C not x10", dict(C=45), "multiple of 10"),
    ("C zero", dict(C=0), "multiple of 10"),
    ("C too wide", dict(C=1000), "too wide"),
    ("B zero", dict(B=0), "B must be >= 1"),
    ("H zero", dict(H=0), "grid size"),
    ("W negative", dict(W=-3), "grid size"),
    ("dtype", dict(dtype=7), "dtype code 7"),
    ("small workspace", dict(workspace_bytes=100), "workspace has 100 bytes"),
    ("scale nan", dict(scale=float("nan")), "scale must be finite"),
    ("ln_eps zero", dict(ln_eps=0.0), "ln_eps"),
    ("pre overlaps qkv", "pre_on_qkv", "pre overlaps input qkv"),
    ("workspace overlaps weight", "ws_on_weight", "workspace overlaps input pw"),
    ("misaligned qkv", dict(qkv=FAKE + (1 << 30) + 1), "qkv is not aligned"),
    ("qkv not 16-byte aligned", dict(qkv=FAKE + (1 << 30) + 4), "qkv must be 16-byte aligned"),
    ("misaligned workspace", dict(workspace=FAKE + (3 << 30) + 16), "workspace must be 128-byte aligned"),
    ("tile too large", dict(tile_h=9, tile_w=8), "too large"),
    ("one tile size", dict(tile_h=4), "tile_h and tile_w"),
]


def _apply(args, change):
    a = dict(args, weights=list(args["weights"]))
    if change == "weight_null":
        a["weights"][3] = 0
    elif change == "weights_short":
        a["weights"] = a["weights"][:13]
    elif change == "pre_on_qkv":
        a["pre"] = a["qkv"] + 64
    elif change == "ws_on_weight":
        a["workspace"] = a["weights"][5] - 256
    else:
        a.update(change)
    return a


@needs_nvcc
@pytest.mark.parametrize("name,change,message", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
@pytest.mark.parametrize("entry", ["pre_projection", "emulate_pre_projection"])
def test_launcher_rejects_bad_arguments(mod, entry, name, change, message):
    a = _apply(_fake_args(), change)
    fn = getattr(mod, entry)
    if entry == "pre_projection":
        a["stream"] = 0
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fn(**a)


@needs_nvcc
def test_plan_and_workspace_validation(mod):
    p = mod.plan(2, 56, 56, 80, 1)
    assert p["tile"] == (8, 8) and p["tiles"] == (7, 7) and p["ntiles"] == 49
    assert p["aggregate"]["units"] == 2 * 49 * 5 and p["attention"]["units"] == 2 * 49 * 4
    assert p["aggregate"]["grid"] == 2 * 49 * 5 and p["tiles_per_cta"] == 1  # small: one unit per CTA
    assert p["combine"]["grid"] == 16 and p["specialized_d"] == 8
    assert p["aggregate"]["staged"] and p["attention"]["staged"] and p["pack"]["grid"] == 0 and p["vec"]
    assert p["workspace"]["bytes"] == mod.workspace_size(2, 56, 56, 80, 1)
    # workspace = 2 planes of Q/V (fp16) + fp32 partials + fp32 KV, each 256-byte aligned
    assert p["workspace"]["part_offset"] >= 2 * 2 * 3136 * 64 * 2
    q = mod.plan(2, 56, 56, 80, 1, 8, 8, 7)
    assert q["aggregate"]["grid"] == -(-490 // 7) and q["attention"]["grid"] == -(-392 // 7)
    assert mod.plan(1, 7, 7, 480, 0)["specialized_d"] == 48
    assert mod.plan(1, 7, 7, 60, 0)["specialized_d"] == 0   # generic combine
    assert not mod.plan(1, 7, 7, 60, 1)["vec"]             # s * 2 bytes = 24: scalar loads
    assert mod.plan(1, 3, 2, 80, 0)["tile"] == (3, 2)       # tile clamped to the image
    for C in (40, 80, 160, 200, 240, 320, 360, 480, 640):
        q = mod.plan(4, 56, 56, C, 0)
        assert max(q["aggregate"]["smem"], q["attention"]["smem"]) <= 227 * 1024, (C, q)
    with pytest.raises(ValueError, match="multiple of 10"):
        mod.workspace_size(1, 7, 7, 85, 0)
    with pytest.raises(ValueError, match="dtype code"):
        mod.plan(1, 7, 7, 80, 3)


@needs_nvcc
@pytest.mark.parametrize("B, G, C, dtype", [(4, 56, 200, 0), (2, 28, 160, 0), (8, 14, 320, 1)])
def test_two_blocks_per_sm_leave_the_reserved_kib(mod, B, G, C, dtype):
    """The planner's two-blocks-per-SM pass counts the 1 KiB the hardware reserves per block: with a
    limit of exactly twice a tile's shared memory, that tile does not fit two blocks (2 x (S + 1 KiB)
    > 2 S + 1 KiB, the SM's shared memory), so a smaller tile is taken, one that really fits two."""
    S = max(mod.plan(B, G, G, C, dtype)["aggregate"]["smem"], mod.plan(B, G, G, C, dtype)["attention"]["smem"])
    limit = 2 * S
    p = mod.plan(B, G, G, C, dtype, 0, 0, 0, limit)
    used = max(p["aggregate"]["smem"], p["attention"]["smem"])
    assert p["aggregate"]["staged"] and p["attention"]["staged"], p
    assert 2 * (used + 1024) <= limit + 1024, (S, p["tile"], used)


@needs_nvcc
@no_gpu
def test_valid_arguments_without_gpu_raise_runtime_error(mod):
    """Validation passes; the first CUDA call then fails cleanly (no device/driver)."""
    with pytest.raises(RuntimeError, match="gmf_kernels.cuda"):
        mod.pre_projection(**_fake_args(), stream=0)


# ------------------------------------------------------------------ backend on CPU
@no_gpu
def test_backend_unavailable_reasons_on_cpu():
    reasons = get_backend("cuda").availability_reasons()
    assert any("CUDA" in r for r in reasons), reasons
    p = GMAProblem(B=1, H=7, W=7, dim=80, num_heads=8, dtype=torch.float32, device_type="cpu",
                   training=False, needs_grad=False)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        select_backend(p, "cuda")
    assert select_backend(p, None).name != "cuda"


def test_backend_reports_missing_extension(monkeypatch):
    def missing():
        raise ImportError(f"gmf_kernels CUDA module is not built. Build it with `{BUILD_CMD}`")
    monkeypatch.setattr(cl, "load", missing)
    reasons = cb.BACKEND.availability_reasons()
    assert any(BUILD_CMD in r for r in reasons), reasons


def test_backend_declares_support():
    b = cb.BACKEND
    assert b.name == "cuda" and b.device_types == {"cuda"}
    assert b.dtypes == {torch.float32, torch.float16, torch.bfloat16}
    assert b.supports_training and b.supports_grad and b.supports_sync_bn  # tests/test_cuda_training.py
    base = dict(B=1, H=7, W=7, num_heads=8, device_type="cuda", training=False, needs_grad=False)
    p = GMAProblem(dim=80, dtype=torch.float64, **base)
    assert any("dtype float64" in r for r in b.not_supported_reasons(p))
    p = GMAProblem(dim=80, dtype=torch.float16, **{**base, "training": True, "needs_grad": True})
    assert not any("training" in r or "gradients" in r for r in b.not_supported_reasons(p))
    p = GMAProblem(dim=800, dtype=torch.float16, **base)
    assert any("d=80" in r for r in b.not_supported_reasons(p))


# ------------------------------------------------------------------ the module's emulation entry point
# (the kernels themselves, emulated with every barrier checked: tests/test_cuda_emulation.py)
@needs_nvcc
def test_python_launcher_checks(use_module):
    case = Case(80, 7, 9, 1)
    ws, eps = case.weights()
    qkv = case.qkv(torch.float32)
    with pytest.raises(TypeError, match="float32"):
        cl.launch_pre_projection(qkv, 7, 9, [ws[0].double()] + ws[1:], 0.3, eps, emulate=True)
    with pytest.raises(ValueError, match="shape"):
        cl.launch_pre_projection(qkv, 7, 9, ws[:2] + [ws[2][:-1]] + ws[3:], 0.3, eps, emulate=True)
    with pytest.raises(ValueError, match="N=63"):
        cl.launch_pre_projection(qkv, 9, 9, ws, 0.3, eps, emulate=True)
    with pytest.raises(TypeError, match="dtype"):
        cl.launch_pre_projection(qkv.double(), 7, 9, ws, 0.3, eps, emulate=True)
    with pytest.raises(TypeError, match="expected a cuda tensor"):
        cl.launch_pre_projection(qkv, 7, 9, ws, 0.3, eps)  # the GPU path refuses CPU tensors
    # non-contiguous qkv is copied, not misread
    wide = torch.cat([qkv, qkv], dim=-1)[..., :240]
    assert not wide.is_contiguous()
    out = cl.launch_pre_projection(wide, 7, 9, ws, case.hp.scale, eps, emulate=True)
    assert max_rel_error(out, case.pre) <= FP32_TOL


@needs_nvcc
@pytest.mark.parametrize("C,H,W,B", [(80, 13, 17, 2), (200, 5, 11, 1)], ids=["C80-13x17", "C200-5x11"])
def test_module_emulation_matches_reference(use_module, C, H, W, B):
    """The nvcc-built module's emulate_pre_projection (the same emulation engine and kernel
    bodies as the emulation-only build of tests/test_cuda_emulation.py) against float64."""
    case = Case(C, H, W, B, seed=2)
    _check(_run(case, torch.float32), case, torch.float32, f"module emulation C={C}")


# ------------------------------------------------------------------ on a GPU (skipped without one)
GPU_SHAPES = [(80, 56, 56, 2), (160, 28, 28, 2), (320, 14, 14, 3), (480, 7, 7, 4), (200, 7, 9, 1),
              (240, 5, 11, 1), (360, 1, 1, 2), (40, 14, 14, 1)]


def _gpu_case(C, H, W, B, seed=0):
    if not gcuda.is_available():
        pytest.skip(f"CUDA module not built ({BUILD_CMD})")
    return Case(C, H, W, B, seed)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("C,H,W,B", GPU_SHAPES, ids=[f"C{c}-{h}x{w}-B{b}" for c, h, w, b in GPU_SHAPES])
def test_gpu_pre_projection(dtype, C, H, W, B):
    case = _gpu_case(C, H, W, B)
    out = _run(case, dtype, device="cuda", emulate=False)  # poisoned with NaN
    torch.cuda.synchronize()
    _check(out.cpu(), case, dtype, f"gpu {dtype} C={C} {H}x{W}")
    again = _run(case, dtype, device="cuda", emulate=False)
    assert torch.equal(out, again), "two runs differ"


@needs_gpu
def test_gpu_matches_emulation():
    """The GPU runs the kernel bodies the emulation runs, but not bit for bit (nvcc contracts
    multiply-adds into FMAs, the device's expf is not the host's; an element-wise 1e-5 / 1e-6
    bound was tighter than the emulation's own distance from float64 on small elements): per
    part (attention, local) they agree within twice the emulation's own error against the
    float64 oracle, floor 1e-6. (Other tiles move the emulation by 0.21 / 0.26 of its own error
    here, measured in the emulation.)"""
    case = _gpu_case(200, 9, 13, 2, seed=11)
    gpu = _run(case, torch.float32, device="cuda", emulate=False).cpu()
    emu = _run(case, torch.float32)
    cp = 4 * (case.C // 5)
    for sl, part in ((slice(0, cp), "attention"), (slice(cp, None), "local")):
        own = max_rel_error(emu[..., sl], case.pre[..., sl])
        assert_max_rel_close(gpu[..., sl], emu[..., sl], max(2 * own, 1e-6), f"gpu vs emulation [{part}]")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_backend_forward(dtype):
    from gmf_kernels import group_mix_attention
    case = _gpu_case(160, 14, 14, 2, seed=2)
    w = cast_weights(case.w, dtype=dtype, device="cuda")
    x = case.x.to(device="cuda", dtype=dtype)
    with torch.no_grad():
        out = group_mix_attention(x, (14, 14), w, backend="cuda")
        oracle = reference_group_mix_attention(case.x, (14, 14), case.w, case.hp)
    if dtype == torch.float32:
        assert max_rel_error(out, oracle) <= FP32_TOL
    else:
        lowp = reference_group_mix_attention(case.x.to(dtype), (14, 14), cast_weights(case.w, dtype), case.hp)
        assert_within_reference_error(out, lowp, oracle, name=f"backend {dtype}")


@needs_gpu
def test_gpu_torch_compile_fullgraph():
    case = _gpu_case(80, 14, 14, 2)
    w = cast_weights(case.w, dtype=torch.float32, device="cuda")
    x = case.x.float().cuda()

    def f(x):
        return cb.BACKEND.forward(x, (14, 14), w, case.hp, False)

    with torch.no_grad():
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True)(x)
    assert_close_verbose(compiled, eager, rtol=1e-5, atol=1e-5, name="compiled vs eager")


@needs_gpu
def test_gpu_op_rejects_bad_inputs():
    case = _gpu_case(80, 7, 9, 1)
    ws, eps = case.weights("cuda")
    qkv = case.qkv(torch.float32, "cuda")
    with pytest.raises(TypeError, match="is on"):
        torch.ops.gmf.cuda_pre_projection(qkv, 7, 9, [ws[0].cpu()] + ws[1:], 0.3, eps)
    with pytest.raises(ValueError, match="N=63"):
        torch.ops.gmf.cuda_pre_projection(qkv, 8, 9, ws, 0.3, eps)


# ------------------------------------------------------------------ torch.library op (CPU-traceable)
def test_op_fake_implementation_on_meta_tensors():
    case_w = random_gma_weights(80, seed=0, dtype=torch.float32)
    f = fold_eval(case_w, default_hyper(80), torch.float32)
    qkv = torch.empty(2, 63, 240, device="meta", dtype=torch.bfloat16)
    out = torch.ops.gmf.cuda_pre_projection(qkv, 7, 9, [t.to("meta") for t in f], 0.3, 1e-5)
    assert out.shape == (2, 63, 80) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@needs_nvcc
def test_backend_forward_traces_with_fullgraph(use_module):
    """torch.compile(fullgraph=True) traces BACKEND.forward through the custom op; on a CPU
    the compiled graph then reaches the op, which runs the kernels' CPU emulation on CPU
    tensors: the same result as the reference backend."""
    w = random_gma_weights(80, seed=0, dtype=torch.float32)
    hp = default_hyper(80)
    x = torch.randn(2, 63, 80)

    def fn(x):
        return cb.BACKEND.forward(x, (7, 9), w, hp, False)

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fn, fullgraph=True, backend="eager")(x)
        expected = get_backend("reference").forward(x.double(), (7, 9), cast_weights(w, torch.float64), hp, False)
    assert max_rel_error(got, expected) < FP32_TOL