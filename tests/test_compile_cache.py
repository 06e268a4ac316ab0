"""benchmarks/throughput.py --compile-only: inductor's caches filled without running a model.

The GPU report compiles the judged run's torch.compile rows in the background
(`gpu_report.COMPILE_WARMS`) so that the timed run's compiled rows find them. What has to hold:
* the compiler backend lowers each graph with the object ``torch.compile(backend="inductor")`` builds
  (so the same cache keys) and runs none of it: every graph, also after a graph break, is stood in for
  by uninitialised tensors of its outputs' shapes (`compile_only_backend`);
* a later process with the same arguments and TORCHINDUCTOR_CACHE_DIR finds the graphs: its compiled
  row records an FX graph cache hit and no miss, and its output is still checked against reference
  (end to end, a tiny GroupMixFormer on this CPU, C++ inductor, its torch.compile and optimized rows; ~95 s on
  two idle cores): where GMF_COMPILE_CACHE_ALL_ROWS=1, i.e. CI's step on the GPU machines' versions (torch 2.11,
  .ci/run), the versions whose caches the report warms; the README's run skips it (the suite's time);
* the optimized row is lowered with its plan's inductor options, traced whole;
* the flag refuses what it cannot warm.
"""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "throughput.py"
bench = load_script(SCRIPT, "gmf_benchmark_throughput_cc")

_RAN = []


@torch.library.custom_op("gmftest::counted_double", mutates_args=())
def counted_double(x: torch.Tensor) -> torch.Tensor:
    """2x, counting its real calls (a traced call runs the fake, not this)."""
    _RAN.append(1)
    return x * 2


@counted_double.register_fake
def _(x):
    return torch.empty_like(x)


class _Broken(torch.nn.Module):
    """Two graphs: a custom op, a graph break, a transposed (non-contiguous) output in another dtype."""

    def forward(self, x):
        y = counted_double(x) + 1
        torch._dynamo.graph_break()
        return counted_double(y).to(torch.float64).t(), None


class _SpyInductor:
    """Stands in for torch._TorchCompileInductorWrapper: records how it was built and what it lowered."""
    built, lowered = [], []

    def __init__(self, mode, options, dynamic):
        self.built.append((mode, options, dynamic))

    def __call__(self, gm, example_inputs):
        self.lowered.append([n.op for n in gm.graph.nodes])
        return None


def test_compile_only_backend_stands_in_for_every_graph(monkeypatch):
    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", _SpyInductor)
    _SpyInductor.built.clear()
    _SpyInductor.lowered.clear()
    torch._dynamo.reset()
    graphs = []
    x = torch.randn(3, 5)
    _RAN.clear()
    expect, none = _Broken()(x)
    assert len(_RAN) == 2
    _RAN.clear()
    out, none2 = torch.compile(_Broken(), backend=bench.compile_only_backend(graphs))(x)
    torch._dynamo.reset()
    assert _RAN == [], "a graph ran"
    assert _SpyInductor.built == [(None, None, None)]   # torch.compile's own default: mode, options, dynamic
    assert len(graphs) == len(_SpyInductor.lowered) == 2
    assert all("call_function" in ops for ops in _SpyInductor.lowered)
    assert none2 is None and (out.shape, out.stride(), out.dtype) == (expect.shape, expect.stride(), expect.dtype)


def test_stand_in_output_refuses_what_it_cannot_make():
    g = torch.fx.Graph()
    node = g.placeholder("x")
    node.meta["example_value"] = 3
    with pytest.raises(bench.CompileOnly, match="int"):
        bench._stand_in_output(node)
    with pytest.raises(bench.CompileOnly):
        bench._stand_in_output(2.5)
    assert bench._stand_in_output(None) is None
    node.meta = {"val": torch.empty(2, 3, dtype=torch.float16)}
    t = bench._stand_in_output(node)
    assert t.shape == (2, 3) and t.dtype == torch.float16


@pytest.mark.parametrize("argv, error", [
    (["--bench", "train", "--torchcompile"], "inference"),
    (["--torchcompile", "eager"], "needs --torchcompile inductor"),
    ([], "needs --torchcompile inductor"),                    # CPU: torch.compile off by default
    (["--torchcompile", "--fp64-check", "--optimized", "--compare", "swin_tiny_patch4_window7_224"], None),
])
def test_compile_only_settings(argv, error):
    args = bench.build_parser().parse_args(["--device", "cpu", "--compile-only"] + argv)
    if error:
        with pytest.raises(SystemExit, match=error):
            bench.resolve_settings(args)
        return
    s = bench.resolve_settings(args)
    # nothing runs: no oracle, no timm row; the optimized row is compiled like the others
    assert s["compile_only"] and s["torchcompile"] == "inductor" and s["optimized"]
    assert not s["fp64_check"] and s["compare"] == []


TINY = dict(embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], num_classes=10)
DRIVER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{bench!r}]
    import gmf_kernels as gmf
    import throughput
    gmf.create_model = lambda name, backend="auto", **kw: gmf.GroupMixFormer(**{tiny!r}, backend=backend, **kw)
    sys.exit(throughput.main(sys.argv[1:]))
""")
#: the end-to-end run (`test_compile_only_fills_the_cache_a_later_run_finds`): CI's torch 2.11 step sets it
#: (.ci/run); every run checks the lowering arguments (`test_compile_only_optimized_row_lowers_with_its_plan`)
ALL_ROWS = os.environ.get("GMF_COMPILE_CACHE_ALL_ROWS") == "1"


def test_compile_only_optimized_row_lowers_with_its_plan(monkeypatch):
    """The optimized row under --compile-only: optimize_for_inference's model (BatchNorm folded, `auto`), traced
    whole (fullgraph, dynamic=False) and lowered with its plan's inductor options (freezing), nothing run."""
    import types

    import gmf_kernels as gmf
    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", _SpyInductor)
    _SpyInductor.built.clear()
    _SpyInductor.lowered.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gmf.GroupMixFormer(**TINY, backend="torch").eval()
    x = torch.randn(1, 3, 32, 32)
    ctx = types.SimpleNamespace(B=1, settings={"optimized_cudagraphs": "table", "compile_only": True}, x=x, ctx=None,
                                timer=types.SimpleNamespace(sync=lambda: None), autocast=contextlib.nullcontext)
    r = bench.optimized_runner(ctx, "m", model)
    plan = r.module.plan
    with torch.inference_mode():
        bench.compile_into_cache(ctx, r)
    torch._dynamo.reset()
    assert r.row["status"] == "compiled" and r.row["graphs"] == 1, r.row
    assert _SpyInductor.built == [(None, plan.compile_kwargs()["options"], False)]
    assert plan.compile_kwargs()["options"].get("freezing") and len(_SpyInductor.lowered) == 1


@pytest.mark.skipif(not ALL_ROWS, reason="end to end on the GPU machines' versions only: CI's torch 2.11 step "
                    "(GMF_COMPILE_CACHE_ALL_ROWS=1)")
def test_compile_only_fills_the_cache_a_later_run_finds(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(bench=str(REPO / "benchmarks"), tiny=TINY))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    argv = [sys.executable, str(driver), "--device", "cpu", "--model", "groupmixformer_s", "--img-size", "32", "-b",
            "1", "--torchcompile", "--compile-backends", "torch", "--optimized",
            "--no-timm", "--num-warm-iter", "0", "--num-bench-iter", "1", "--quiet"]

    def run(*extra, name):
        proc = subprocess.run(argv + list(extra) + ["--results-file", str(tmp_path / name)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout, {r["backend"]: r for r in json.loads((tmp_path / name).read_text())["rows"]}

    # the torch.compile row, and the optimized row: freezing, its plan's options
    compiled = ("torch+compile", "optimized")
    out, rows = run("--compile-only", name="warm.json")
    for b in compiled:
        warm = rows[b]
        assert warm["status"] == "compiled" and warm["graphs"] == 1 and warm["compile_s"] > 0, warm
        assert warm["inductor_cache"]["fxgraph_cache_miss"] >= 1 and warm["inductor_cache"]["fxgraph_cache_hit"] == 0
    assert not any("img_per_s" in r for r in rows.values())       # nothing timed
    assert {b for b, r in rows.items() if r["status"] not in ("unavailable", "skipped")} == set(compiled)
    assert "compiled into inductor's cache, not run" in out and "1 graph in" in out
    assert str(tmp_path / "inductor") in out

    out, rows = run(name="full.json")
    for b in compiled:
        row = rows[b]
        assert row["status"] == "ok" and row["check"].startswith("ok"), row
        assert row["inductor_cache"]["fxgraph_cache_hit"] >= 1 and row["inductor_cache"]["fxgraph_cache_miss"] == 0, row
    assert "inductor cache: FX graph 1 hit" in out
