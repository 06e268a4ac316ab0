"""The GPU-only test file's own logic, run on the CPU (GMF_GPU_TESTS_ON_CPU=1).

tests/test_gpu_real_shapes.py runs only on a GPU, and no GPU runs CI: a mistake in it (a tensor
left on the wrong device, a helper whose signature changed) would first show on a lent GPU, as
failures that cost the GPU report its verdict. With GMF_GPU_TESTS_ON_CPU=1 the same tests run on
tiny shapes on the CPU, Triton through its interpreter (its docstring); here every Triton test of
it must pass and every `cuda` one skip for want of a GPU. This says nothing of the GPU itself.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FILE = "tests/test_gpu_real_shapes.py"
OUTCOME = re.compile(r"^(tests/test_gpu_real_shapes\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)
CPU_SKIPS = ("GMF_GPU_TESTS_ON_CPU=1", "cuda: ")  # the only reasons a test may skip here
#: the file's tests that need a GPU by what they test (its capability, streams, graphs, threads
#: racing on a device): they skip here with a GMF_GPU_TESTS_ON_CPU=1 reason, Triton's too
GPU_ONLY = ("deployment_guards", "side_stream_and_cuda_graph", "threads_with_different_batches")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the file runs for real")
def test_gpu_real_shapes_logic_on_cpu():
    env = dict(os.environ, GMF_GPU_TESTS_ON_CPU="1", OMP_NUM_THREADS="1")
    env.pop("GMF_REQUIRE_GPU", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", FILE, "-v", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    outcomes = dict(OUTCOME.findall(out))
    assert proc.returncode == 0 and outcomes, out[-4000:]
    triton = {t: o for t, o in outcomes.items() if "triton" in t and not any(g in t for g in GPU_ONLY)}
    others = {t: o for t, o in outcomes.items() if t not in triton}
    assert triton and all(o == "PASSED" for o in triton.values()), triton
    assert all(o == "SKIPPED" for o in others.values()), others
    reasons = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", out, re.M)
    assert reasons and all(r.startswith(CPU_SKIPS) for r in reasons), reasons
