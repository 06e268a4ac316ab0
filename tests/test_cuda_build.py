"""CUDA backend: build, load, staleness, resources, argument checks, and the kernel code.

Runs on CPU-only CI machines that have nvcc:

* the module is compiled with nvcc for sm_80 and sm_90 into a temporary directory and
  imported (no driver needed: cudart is static);
* the sources-hash staleness check, the cache lookup and the ptxas resource figures;
* the host launchers' argument validation (it runs before any CUDA call);
* the kernel code itself, executed on the CPU: every kernel body is written against an
  execution policy (csrc/gma_device.cuh), and `emulate_pre_projection` runs exactly the
  device code block after block, with shared memory poisoned with NaN. This checks the
  indexing, tiling, split-N combine, CRPE, local branch and dtype handling against the
  float64 reference — not races, synchronisation or anything GPU-specific;
* the backend's unavailability reasons on a CPU machine.

Tests marked `needs_gpu` run the real kernels against the float64 reference at fp32 /
fp16 / bf16 and skip without a CUDA device.

Oracle: float64 reference. fp32: max |diff| / max |expected| <= 1e-5. fp16/bf16:
error <= 2 x the reference's own error at that dtype + 1e-5 (flash-attention's rule).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gmf_kernels.cuda as gcuda
from gmf_kernels.numerics import cast_weights, default_hyper, max_rel_error, random_gma_weights
from helpers import assert_close_verbose, assert_within_reference_error
from gmf_kernels.backends import get_backend, select_backend
from gmf_kernels.backends import cuda_backend as cb
from gmf_kernels.backends.base import GMAProblem
from gmf_kernels.cuda import build as cbuild
from gmf_kernels.cuda import launcher as cl
from gmf_kernels.cuda import op as cop  # noqa: F401  (registers gmf::cuda_pre_projection)
from gmf_kernels.folding import WEIGHT_NAMES, fold_eval
from gmf_kernels.reference import reference_group_mix_attention

FP32_TOL = 1e-5
ARCHS = "80;90"
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
    """Compile for sm_80 + sm_90 into a temporary directory: (module path, out dir, seconds)."""
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
    assert meta["archs"] == ["80", "90"]
    assert meta["sources_hash"] == cbuild.sources_hash()
    flags = " ".join(meta["nvcc_flags"])
    assert "arch=compute_80,code=sm_80" in flags
    assert "arch=compute_90,code=[sm_90,compute_90]" in flags  # SASS for both, PTX of the highest
    assert "-Xptxas -v" in flags
    print(f"build took {seconds:.0f} s")


@needs_nvcc
def test_module_metadata(mod):
    assert mod.sources_hash() == cbuild.sources_hash()
    assert mod.__sources_hash__ == mod.sources_hash()
    assert mod.build_archs() == "80;90"
    assert tuple(mod.weight_names()) == WEIGHT_NAMES
    assert list(mod.specialized_head_dims()) == [4, 8, 16, 20, 24, 32, 36, 48]
    assert dict(mod.DTYPE_CODES) == {str(k).replace("torch.", ""): v for k, v in cl.DTYPE_CODES.items()}


def test_parse_archs():
    assert cbuild.parse_archs("80;90") == ["80", "90"]
    assert cbuild.parse_archs("9.0 8.0") == ["80", "90"]
    assert cbuild.parse_archs("sm_90a,sm_80") == ["80", "90a"]
    for bad in ("70", "sm_xx", ""):
        with pytest.raises(cbuild.BuildError):
            cbuild.parse_archs(bad)
    g = cbuild.gencode_flags(["80", "90"])
    assert g == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]


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
    # aggregate + output for 3 dtypes x 9 head widths (8 specialised + generic), combine x 9; x 2 archs
    assert len(rows) == (2 * 3 * 9 + 9) * 2
    for arch in ("sm_80", "sm_90"):
        names = [r["kernel"] for r in rows if r["arch"] == arch]
        for k in ("gma_aggregate_kernel", "gma_attention_kernel", "gma_combine_kernel"):
            assert any(k in n for n in names), (arch, k)
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        if "gma_aggregate_kernel" in r["kernel"]:
            assert r["registers"] <= 128, r  # __launch_bounds__(256, 2)
        else:
            assert r["registers"] <= 64, r   # __launch_bounds__(256, 4)
    spilling = [f"{r['arch']} {r['kernel']}: {r['spill_stores']}/{r['spill_loads']} B"
                for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "kernels spill registers:\n" + "\n".join(spilling)


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
    ("misaligned pw", "pw_misaligned", "pw must be 16-byte aligned"),
    ("misaligned qkv", dict(qkv=FAKE + (1 << 30) + 1), "qkv is not aligned"),
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
    elif change == "pw_misaligned":
        a["weights"][5] += 4
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
    assert p["tile"] == (8, 8) and p["tiles"] == (7, 7) and p["aggregate"]["grid"] == 2 * 49
    assert p["combine"]["grid"] == 16 and p["specialized_d"] == 8
    assert p["attention"]["grid"] == 2 * 49
    assert p["workspace"]["bytes"] == mod.workspace_size(2, 56, 56, 80, 1)
    # workspace = 2 planes of Q/V (fp16) + fp32 partials + fp32 KV, each 256-byte aligned
    assert p["workspace"]["part_offset"] >= 2 * 2 * 3136 * 64 * 2
    assert mod.plan(1, 7, 7, 480, 0)["specialized_d"] == 48
    assert mod.plan(1, 7, 7, 60, 0)["specialized_d"] == 0  # generic code path
    assert mod.plan(1, 3, 2, 80, 0)["tile"] == (3, 2)       # tile clamped to the image
    for C in (40, 80, 160, 200, 240, 320, 360, 480, 640):
        q = mod.plan(4, 56, 56, C, 0)
        assert q["aggregate"]["smem"] <= 48 * 1024 and q["attention"]["smem"] <= 48 * 1024, (C, q)
    with pytest.raises(ValueError, match="multiple of 10"):
        mod.workspace_size(1, 7, 7, 85, 0)
    with pytest.raises(ValueError, match="dtype code"):
        mod.plan(1, 7, 7, 80, 3)


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
    assert not b.supports_training and not b.supports_grad
    base = dict(B=1, H=7, W=7, num_heads=8, device_type="cuda", training=False, needs_grad=False)
    p = GMAProblem(dim=80, dtype=torch.float64, **base)
    assert any("dtype float64" in r for r in b.not_supported_reasons(p))
    p = GMAProblem(dim=80, dtype=torch.float16, **{**base, "training": True})
    assert any("training" in r for r in b.not_supported_reasons(p))
    p = GMAProblem(dim=800, dtype=torch.float16, **base)
    assert any("d=80" in r for r in b.not_supported_reasons(p))


# ------------------------------------------------------------------ the kernel code, emulated on the CPU
class Case:
    """Random weights and tokens with the float64 reference and its intermediates."""

    def __init__(self, C, H, W, B, seed=0):
        self.C, self.H, self.W, self.B = C, H, W, B
        self.w = random_gma_weights(C, seed=seed)
        self.hp = default_hyper(C)
        g = torch.Generator().manual_seed(seed + 1000)
        self.x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
        _, ext = reference_group_mix_attention(self.x, (H, W), self.w, self.hp, return_intermediates=True)
        self.pre = ext["pre_proj"]

    def qkv(self, dtype, device="cpu"):
        return F.linear(self.x, self.w.qkv_weight, self.w.qkv_bias).to(dtype=dtype, device=device)

    def weights(self, device="cpu"):
        f = fold_eval(self.w, self.hp, torch.float32)
        return [t.to(device) for t in f], self.hp.ln_eps

    def reference_lowp(self, dtype):
        _, ext = reference_group_mix_attention(self.x.to(dtype), (self.H, self.W), cast_weights(self.w, dtype),
                                               self.hp, return_intermediates=True)
        return ext["pre_proj"]


def _run(case, dtype, device="cpu", tile=(0, 0), emulate=True):
    ws, eps = case.weights(device)
    out = torch.full((case.B, case.H * case.W, case.C), float("nan"), dtype=dtype, device=device)
    cl.launch_pre_projection(case.qkv(dtype, device), case.H, case.W, ws, case.hp.scale, eps, out=out, emulate=emulate,
                             tile=tile)
    return out


def _check(out, case, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (element not written, or poisoned read)"
    cp = 4 * (case.C // 5)
    if dtype == torch.float32:
        for sl, part in ((slice(0, cp), "attention"), (slice(cp, None), "local")):
            err = max_rel_error(out[..., sl], case.pre[..., sl])
            assert err <= FP32_TOL, f"{what} [{part}]: relative error {err:.2e} > {FP32_TOL}"
        scale = case.pre.abs().max().item()
        assert_close_verbose(out, case.pre, rtol=0.0, atol=FP32_TOL * scale, name=what)
    else:
        assert_within_reference_error(out, case.reference_lowp(dtype), case.pre, name=what)


EMU_SHAPES = [  # (C, H, W, B): every released width, odd grids, several tiles, 1x1
    (40, 7, 9, 2), (80, 13, 17, 2), (160, 14, 14, 1), (200, 5, 11, 2), (240, 9, 7, 1),
    (320, 7, 7, 2), (360, 6, 10, 1), (480, 7, 7, 1), (80, 1, 1, 3), (40, 17, 3, 1),
    (60, 7, 9, 2), (50, 5, 6, 1),  # generic (unspecialised) head widths d=6, d=5 (s % 4 != 0)
]


@needs_nvcc
@pytest.mark.parametrize("C,H,W,B", EMU_SHAPES, ids=[f"C{c}-{h}x{w}-B{b}" for c, h, w, b in EMU_SHAPES])
def test_emulated_kernels_fp32(use_module, C, H, W, B):
    case = Case(C, H, W, B)
    _check(_run(case, torch.float32), case, torch.float32, f"emulated fp32 C={C} {H}x{W}")


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("C,H,W,B", [(80, 9, 11, 2), (200, 7, 7, 1), (320, 14, 14, 1)],
                         ids=["C80-9x11", "C200-7x7", "C320-14x14"])
def test_emulated_kernels_low_precision(use_module, dtype, C, H, W, B):
    case = Case(C, H, W, B, seed=3)
    _check(_run(case, dtype), case, dtype, f"emulated {dtype} C={C}")


@needs_nvcc
@pytest.mark.parametrize("tile", [(1, 1), (3, 5), (8, 8), (2, 16)], ids=lambda t: f"tile{t[0]}x{t[1]}")
def test_emulated_kernels_any_tile(use_module, tile):
    """Many tiles per image: the split-N combine over tiles, halos across tile borders."""
    case = Case(80, 11, 13, 2, seed=5)
    _check(_run(case, torch.float32, tile=tile), case, torch.float32, f"tile {tile}")


@needs_nvcc
def test_emulated_kernels_deterministic(use_module):
    case = Case(160, 9, 9, 1, seed=7)
    a, b = _run(case, torch.float16), _run(case, torch.float16)
    assert torch.equal(a, b)


@needs_nvcc
def test_emulated_kernels_golden(use_module):
    """The upstream code's float64 vectors (odd, non-square grids)."""
    from conftest import golden_path
    from gmf_kernels.modules import GroupMixAttention
    for g in torch.load(golden_path("gma_module.pt")):
        m = GroupMixAttention(g["dim"], g["num_heads"], qkv_bias=g["qkv_bias"]).double().eval()
        m.load_state_dict(g["state_dict"])
        w, hp = m.gma_weights(), m.hyper()
        qkv = F.linear(g["x"], w.qkv_weight, w.qkv_bias).float()
        f = fold_eval(w, hp, torch.float32)
        out = torch.full_like(g["pre_proj"], float("nan"), dtype=torch.float32)
        cl.launch_pre_projection(qkv, g["H"], g["W"], list(f), hp.scale, hp.ln_eps, out=out, emulate=True)
        err = max_rel_error(out, g["pre_proj"])
        assert err <= FP32_TOL, f"golden C={g['dim']} {g['H']}x{g['W']}: {err:.2e}"


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
    case = _gpu_case(200, 9, 13, 2, seed=11)
    gpu = _run(case, torch.float32, device="cuda", emulate=False).cpu()
    emu = _run(case, torch.float32)
    assert_close_verbose(gpu, emu, rtol=1e-5, atol=1e-6, name="gpu vs emulation")


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
    the compiled graph then reaches the launcher, which refuses CPU tensors."""
    w = random_gma_weights(80, seed=0, dtype=torch.float32)
    hp = default_hyper(80)
    x = torch.randn(2, 63, 80)

    def fn(x):
        return cb.BACKEND.forward(x, (7, 9), w, hp, False)

    torch._dynamo.reset()
    with pytest.raises(TypeError, match="expected a cuda tensor"):
        torch.compile(fn, fullgraph=True, backend="eager")(x)
