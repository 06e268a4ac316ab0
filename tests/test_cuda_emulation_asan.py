"""The CUDA kernel bodies under AddressSanitizer: out-of-bounds accesses a GPU faults on.

The emulation (csrc/gma_emu.h, tests/test_cuda_emulation.py) runs the kernels' own code on the
CPU, reading and writing the tensors' real allocations. A kernel that reads past a buffer (a
halo row outside the image, a vector load past the last channel, a shared-memory index past the
block's size) gets whatever lies there on the CPU and, when the value is unused or masked
later, still passes every parity test, while a GPU stops with "illegal address" or corrupts
another buffer (compute-sanitizer's memcheck, run by benchmarks/gpu_report.py, sees it only
where a GPU is lent). Here the emulation is built with AddressSanitizer
(`build(..., emulation_only=True, sanitize=True)`: every load and store of the kernel bodies is
checked; the engine tells ASan of every fiber switch and poisons the slack past each block's
shared memory), and a Python process with the ASan runtime preloaded runs:

* the engine's own proof: a read one float past a heap buffer and one past the block's shared
  memory are each reported (`emulation_selftest("global_past_end" / "shared_past_end")`);
* the fused kernels through the `cuda` backend on shapes that take each path: 16-byte vector
  loads (s a multiple of 4 in fp32, of 8 in fp16/bf16) and scalar ones, grids of one pixel,
  one row, one column and odd sizes, batch 1 and 3, the widest released width; each against the
  float64 reference, and ASan must stay silent.

By hand (2026-12-03): with load_halo's row bound widened by one (csrc/gma_device.cuh, the
16-byte path), this run stops at C = 80, fp32, with a heap-buffer-overflow in load_halo, naming
the line (the plain emulation's parity fails there too, on the values read: the mutation shows
that ASan sees into the kernel bodies, not a case that only ASan catches).

A missing toolchain or ASan runtime skips, and fails in CI (environment variable CI set).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import _emulation_toolchain_missing, skip_or_fail_in_ci
from gmf_kernels.cuda import build as cbuild

TESTS = Path(__file__).resolve().parent

#: (C, H, W, B, dtype), eval: s = C / 5; the 16-byte path needs s % 4 == 0 (fp32), % 8 (fp16/bf16).
#: (The cuda backend's gradients and training run these same forward kernels; its statistics and
#: backward are Triton's, whose bounds tests/test_triton_hazards.py checks.)
CASES = [
    (80, 7, 9, 2, "float32"),      # s = 16: vectors
    (160, 5, 6, 3, "bfloat16"),    # s = 32: vectors
    (120, 1, 13, 1, "float16"),    # s = 24: vectors, one row
    (50, 9, 1, 2, "float32"),      # s = 10: scalar, one column
    (30, 1, 1, 1, "float16"),      # s = 6: scalar, one pixel
    (480, 4, 5, 1, "float32"),     # the widest released layer
    (200, 11, 13, 3, "float16"),   # s = 40: vectors, odd grid, batch 3
]

WORKER = textwrap.dedent("""
    import sys
    import torch
    import gmf_kernels
    import gmf_kernels.cuda as gcuda
    from helpers import cuda_backend_on_cpu
    from gmf_kernels.numerics import cast_weights, max_rel_error, random_gma_weights
    mod = gcuda.load_from(sys.argv[1])
    if sys.argv[2] == "selftest":
        print("value", mod.emulation_selftest(sys.argv[3]), flush=True)
        sys.exit(0)
    gcuda._loaded = mod
    cuda_backend_on_cpu()
    for case in sys.argv[3:]:
        C, H, W, B, dt = case.split(",")
        C, H, W, B, dt = int(C), int(H), int(W), int(B), getattr(torch, dt)
        w = random_gma_weights(C, seed=C + H)
        x = torch.randn(B, H * W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(W))
        with torch.no_grad():
            ref = gmf_kernels.group_mix_attention(x, (H, W), w, backend="reference")
            out = gmf_kernels.group_mix_attention(x.to(dt), (H, W), cast_weights(w, dt), backend="cuda")
        print(f"case {case} out {max_rel_error(out.double(), ref):.2e}", flush=True)
""")


@pytest.fixture(scope="module")
def asan_module(tmp_path_factory):
    why = _emulation_toolchain_missing()
    if not why:
        try:
            runtime = cbuild.asan_runtime()
        except cbuild.BuildError as e:
            why = str(e)
    if why:
        skip_or_fail_in_ci(f"cannot build the emulation under AddressSanitizer: {why}")
    out = tmp_path_factory.mktemp("gmf_emulation_asan")
    path = cbuild.build(out_dir=out, emulation_only=True, sanitize=True, quiet=True)
    assert cbuild.read_metadata(out)["sanitize"] == "address"
    return path, runtime


def _run(asan_module, *args, timeout=900):
    path, runtime = asan_module
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=23",
               PYTHONPATH=os.pathsep.join([str(TESTS)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-c", WORKER, str(path), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("where", ["global", "shared"])
def test_asan_build_reports_a_read_past_a_buffer(asan_module, where):
    r = _run(asan_module, "selftest", f"{where}_past_end")
    assert r.returncode == 23, f"rc {r.returncode}, ASan reported nothing:\n{r.stdout}\n{r.stderr[-3000:]}"
    kind = "heap-buffer-overflow" if where == "global" else "use-after-poison"
    assert f"AddressSanitizer: {kind}" in r.stderr and "gma_emu.cpp" in r.stderr, r.stderr[-3000:]


def test_shared_past_end_is_silent_without_asan(emu):
    """The plain build reads the slack (NaN): what the parity tests alone would never notice."""
    (value,) = emu.emulation_selftest("shared_past_end")
    assert value != value


def test_kernels_stay_in_bounds_under_asan(asan_module):
    r = _run(asan_module, "cases", *[",".join(map(str, c)) for c in CASES])
    assert "AddressSanitizer" not in r.stderr, r.stderr[-6000:]
    assert r.returncode == 0, f"rc {r.returncode}:\n{r.stdout}\n{r.stderr[-4000:]}"
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("case ")]
    assert len(lines) == len(CASES), r.stdout
    for (_, case, _, err), (C, H, W, B, dt) in zip(lines, CASES):
        # parity here is a sanity bound (the tolerance rule is tests/test_cuda_emulation.py's):
        # the point is that ASan stayed silent on a run that computed the right thing
        assert float(err) <= (1e-5 if dt == "float32" else 3e-2), f"{case}: {err}"
