"""GPU compilation without a GPU: every Triton kernel specialisation the five released
models use (widths 40 ... 480, fp32 / fp16 / bf16) compiles for sm_80 and sm_90 with
zero register spills.

Runs `python -m gmf_kernels.triton_kernels.specializations` in a subprocess: the test
process usually has TRITON_INTERPRET=1 set (CPU machines), under which ``@triton.jit``
builds interpreter objects that cannot be compiled. The subprocess compiles with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a pool of two
worker processes, into an empty Triton cache (so it really compiles), and reads
registers / spills with ``ptxas -v`` (and ``cuobjdump`` where present).
`benchmarks/triton_resources.py` writes the same figures as a table
(benchmarks/results/triton_resources_sm80_sm90.md); this test does not rewrite it.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)


def _have_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(80).path)
    except Exception:
        return False


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not _have_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    tmp = tmp_path_factory.mktemp("triton_aot")
    out = tmp / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "gmf_kernels.triton_kernels.specializations", "--json", str(out),
           "--jobs", "2", "--cache-dir", str(tmp / "cache"), "--arch", *map(str, ARCHS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"compile run produced no results (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_every_specialisation_listed(compiled):
    from gmf_kernels.models.configs import MODEL_WIDTHS
    from gmf_kernels.triton_kernels.specializations import all_specializations
    specs = all_specializations(MODEL_WIDTHS)
    assert len(compiled) == len(specs) * len(ARCHS)
    for kernel in ("aggregate", "attention"):
        for dt in ("fp32", "fp16", "bf16"):
            assert {s.C for s in specs if s.kernel == kernel and s.dtype == dt} >= set(MODEL_WIDTHS)
    assert {s.C for s in specs if s.kernel == "combine"} >= set(MODEL_WIDTHS)


def test_every_specialisation_compiles(compiled):
    failed = [f"{r['label']} sm_{r['arch']}: {r['error']}" for r in compiled if "error" in r]
    assert not failed, "compile failures:\n" + "\n".join(failed)


def test_no_register_spills(compiled):
    ok = [r for r in compiled if "error" not in r]
    assert ok and all(r["registers"] > 0 for r in ok), "ptxas -v report not parsed"
    spills = [f"{r['label']} sm_{r['arch']}: {r['registers']} regs, spill stores {r['spill_stores']} B, "
              f"loads {r['spill_loads']} B" for r in ok if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert all(r["registers"] <= 255 for r in ok)


_TRACE_SCRIPT = r"""
import json, sys, torch
from torch._dynamo.backends.common import aot_autograd
from gmf_kernels.backends.triton_backend import BACKEND
from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights
from gmf_kernels.triton_kernels import op

C, H, W = 80, 7, 9
w = cast_weights(random_gma_weights(C, seed=0), torch.float32)
hp = default_hyper(C)
graphs = []

def fw(gm, example_inputs):
    graphs.append([(str(n.target), dict(n.kwargs)) for n in gm.graph.nodes if n.op == "call_function"])
    def run(*args):
        raise RuntimeError("traced only: no GPU to run on")
    return run

fn = torch.compile(lambda x: BACKEND.forward(x, (H, W), w, hp, False), backend=aot_autograd(fw_compiler=fw),
                   fullgraph=True)
err = ""
try:
    with torch.no_grad():
        fn(torch.randn(2, H * W, C))
except RuntimeError as e:
    err = str(e)
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
kernels = [kernel_side_table.get_kernel(kw["kernel_idx"]).fn.__name__
           for g in graphs for t, kw in g if "triton_kernel_wrapper" in t]
print(json.dumps({"registration": op.REGISTRATION, "kernels": kernels, "graphs": len(graphs), "error": err}))
"""


def test_triton_op_traces_into_kernels():
    """torch.compile(fullgraph=True) of BACKEND.forward with the real (JIT) kernels: the
    gmf::triton_pre_projection triton_op decomposes into the three kernel launches that
    Inductor sees (traced on CPU fake tensors; nothing runs, there is no GPU here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"trace script failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1])
    if res["registration"] != "triton_op":
        pytest.skip(f"torch {__import__('torch').__version__} has no torch.library.triton_op")
    assert res["graphs"] == 1, res
    assert res["kernels"] == ["gma_aggregate_kernel", "gma_combine_kernel", "gma_attention_kernel"], res
    assert "traced only" in res["error"], res
