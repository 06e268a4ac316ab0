"""sm70: the device code compiles for Volta (compute_70 PTX, sm_70 SASS) with CUDA 12.9.

CUDA 13's nvcc no longer targets sm_70, so `GMF_CUDA_ARCHS=70` needs a CUDA 12.x toolkit;
CI proves the sources are ready for one with the CUDA 12.9 compilers from PyPI
(gmf_kernels/cuda/nvrtc.py, DEVELOPERS.md): NVRTC compiles every kernel instantiation the
module launches (aggregation, attention and weight packing for float32/float16/bfloat16;
the combine for every specialised head width and the generic one) to PTX for compute_70,
ptxas assembles it for sm_70 (where fp16 products use the tensor cores and bf16 / fp32 ones
fall back to FMA: csrc/gma_mma.cuh), and the ptxas figures must respect the kernels' launch
bounds without spilling or using local memory.

In CI (environment variable CI set) missing wheels fail the test; elsewhere it skips with
the pip command.
"""
from __future__ import annotations


import pytest

from gmf_kernels.cuda import build as cbuild
from gmf_kernels.cuda import nvrtc
from conftest import skip_or_fail_in_ci

def _require_tools():
    """NVRTC + ptxas 12.9 present, else skip (fail in CI: the sm70 check must run there)."""
    try:
        nvrtc.find_tools()
    except nvrtc.ToolsMissing as e:
        skip_or_fail_in_ci(f"the sm70 check: {e}")


@pytest.fixture(scope="module")
def sm70():
    _require_tools()
    return nvrtc.check_arch("70")


def test_sm70_every_kernel_compiles_with_nvrtc_and_ptxas(sm70):
    dims = nvrtc.head_dims()
    assert 0 in dims and len(dims) == 9  # the combine's 8 specialised head widths + generic
    n = 3 * len(nvrtc.DTYPES) + len(dims)  # aggregate, attention, pack per dtype; combine per width
    assert len(sm70["kernels"]) == n and len(sm70["entries"]) == n
    assert sm70["nvrtc_version"].startswith("12.")
    rows = sm70["resources"]
    assert len(rows) == n and {r["arch"] for r in rows} == {"sm_70"}
    assert {r["mangled"] for r in rows} == set(sm70["entries"].values())
    for r in rows:
        tile = "gma_aggregate_kernel" in r["kernel"] or "gma_attention_kernel" in r["kernel"]
        assert 0 < r["registers"] <= (128 if tile else 64), r  # launch bounds
        assert r["stack"] == 0, r
    spilling = [f"{r['kernel']}: {r['spill_stores']}/{r['spill_loads']} B" for r in rows
                if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "kernels spill registers on sm_70:\n" + "\n".join(spilling)
    print(f"sm_70: {n} kernels in {sm70['seconds']} s, max {max(r['registers'] for r in rows)} registers, no spills")


def test_sm70_nvrtc_rejects_broken_device_code(tmp_path):
    """The check can fail: a device-code error in csrc/ is reported, not swallowed."""
    _require_tools()
    import shutil
    src = tmp_path / "csrc"
    shutil.copytree(cbuild.csrc_dir(), src)
    # an sm_80-only intrinsic in the device code must not pass for compute_70
    dev = src / "gma_device.cuh"
    text = dev.read_text()
    anchor = "GMF_HD float hardswish(float x) {"
    assert anchor in text
    dev.write_text(text.replace(anchor, anchor + "\n#if defined(__CUDA_ARCH__)\n"
                                "  (void)__reduce_add_sync(0xffffffffu, 1u);\n#endif\n"))
    with pytest.raises(nvrtc.CompileError, match="__reduce_add_sync"):
        nvrtc.check_arch("70", csrc=src)


def test_sm70_parse_archs_accepts_70_and_nvcc13_says_which_toolkit():
    assert cbuild.parse_archs("70") == ["70"]
    assert cbuild.parse_archs("7.0;75") == ["70", "75"]
    with pytest.raises(cbuild.BuildError, match="sm_70 or newer"):
        cbuild.parse_archs("61")
    with pytest.raises(cbuild.BuildError, match=r"CUDA 12\.x"):
        cbuild.check_toolkit_archs(["70", "75"], "13.0.88", None)
    cbuild.check_toolkit_archs(["70", "75"], "12.9.86", None)  # CUDA 12 can
    with pytest.raises(cbuild.BuildError, match="sm_120.*--list-gpu-code"):
        cbuild.check_toolkit_archs(["90", "120"], "12.4.1", ["sm_70", "sm_75", "sm_80", "sm_90"])


def test_sm70_build_with_nvcc13_fails_before_compiling(tmp_path):
    try:
        nvcc = cbuild.find_nvcc()
    except cbuild.BuildError:
        pytest.skip("nvcc not found")
    ver = cbuild.nvcc_version(nvcc)
    if int(ver.split(".")[0]) < 13:
        pytest.skip(f"nvcc {ver} can target sm_70")
    with pytest.raises(cbuild.BuildError, match=r"sm_70: nvcc 13.*CUDA 12\.x"):
        cbuild.build(out_dir=tmp_path, archs="70;75", quiet=True)
    assert not (tmp_path / cbuild.module_filename()).exists()
