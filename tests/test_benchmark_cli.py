"""Smoke test of benchmarks/throughput.py: one tiny run end to end, and the settings logic."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "throughput.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gmf_benchmark_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # one thread: on a shared, oversubscribed CPU, OpenMP threads can make tiny ops 10x slower
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(SCRIPT), "--model", "groupmixformer_m", "--batch-size", "1", "--img-size", "64",
           "--num-warm-iter", "1", "--num-bench-iter", "1", "--backends", "torch,reference",
           "--device", "cpu", "--results-file", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference" in proc.stdout and "summary" in proc.stdout

    data = json.loads(out.read_text())
    assert set(data) == {"meta", "rows"}
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "gmf_kernels", "git_sha", "date", "settings"):
        assert key in meta, key
    rows = {r["backend"]: r for r in data["rows"] if r["kind"] == "gmf" and r.get("status") == "ok"}
    assert set(rows) == {"torch", "reference"}, data["rows"]
    for name, r in rows.items():
        assert r["model"] == "groupmixformer_m"
        assert r["img_per_s"] > 0 and r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert r["n_timed"] == 1
        err = r["max_rel_err_vs_reference"]
        assert err is not None and math.isfinite(err)
        assert r["ratio_vs_reference"] > 0
    assert rows["reference"]["max_rel_err_vs_reference"] == 0.0
    assert rows["reference"]["ratio_vs_reference"] == 1.0
    assert rows["torch"]["check"] == "ok", rows["torch"]
    assert rows["torch"]["max_rel_err_vs_reference"] < 1e-3


def test_settings_and_parsing():
    bench = _load_script()
    parser = bench.build_parser()
    # the paper protocol, and an explicit flag that overrides it (recorded)
    s = bench.resolve_settings(parser.parse_args(["--protocol", "paper", "--device", "cpu"]))
    assert (s["batch_size"], s["img_size"], s["num_warm_iter"], s["num_bench_iter"], s["precision"]) == \
        (128, 224, 50, 30, "fp32")
    assert s["protocol"] == "paper"
    s = bench.resolve_settings(parser.parse_args(["--protocol", "paper", "--device", "cpu", "-b", "16"]))
    assert s["batch_size"] == 16 and "modified" in s["protocol"]
    # CPU defaults: small, no torch.compile, no fp64 oracle for fp32
    s = bench.resolve_settings(parser.parse_args(["--device", "cpu"]))
    assert s["batch_size"] == 8 and s["img_size"] == 224 and s["torchcompile"] is None
    assert s["fp64_check"] is False and s["schedule"] == "interleave"
    assert bench.resolve_settings(parser.parse_args(["--device", "cpu", "--precision", "bf16"]))["fp64_check"]
    assert bench.parse_models("t,tiny,groupmixformer_small") == ["groupmixformer_t", "groupmixformer_s"]
    assert bench.parse_backends("torch, reference") == ["torch", "reference"]
    assert bench.parse_backends(None) is None
    backends, skipped = bench.select_backends(["torch"], "cpu")
    assert backends == ["torch", "reference"]  # reference always runs
    stats = bench.stats([3.0, 1.0, 2.0], batch=4, total_s=0.006)
    assert stats["median_ms"] == 2.0 and stats["min_ms"] == 1.0 and stats["img_per_s"] == 2000.0
    assert abs(stats["img_per_s_total"] - 2000.0) < 1e-9
