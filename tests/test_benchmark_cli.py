"""Smoke test of benchmarks/throughput.py: one tiny run end to end, and the settings logic."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert meta["bench"] == "inference" and all(r["bench"] == "inference" for r in rows.values())


def _cannot_train_backends():
    """Available backends that declare they cannot train (their rows must say so under 'not run')."""
    from gmf_kernels.backends import BACKEND_NAMES, get_backend
    return [n for n in BACKEND_NAMES
            if not get_backend(n).availability_reasons() and not get_backend(n).supports_training]


def test_cli_train_smoke(tmp_path):
    """--bench train: one training step per row end to end (SGD), first-step check against reference."""
    out = tmp_path / "train.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    refusing = _cannot_train_backends()
    cmd = [sys.executable, str(SCRIPT), "--bench", "train", "--model", "groupmixformer_m", "--batch-size", "2",
           "--img-size", "64", "--num-warm-iter", "0", "--num-bench-iter", "1",
           "--backends", ",".join(["torch", "reference"] + refusing), "--device", "cpu", "--no-timm",
           "--results-file", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train: forward + backward + SGD" in proc.stdout and "summary" in proc.stdout
    assert "peak memory is not measured on CPU" in proc.stdout

    data = json.loads(out.read_text())
    assert data["meta"]["bench"] == "train" and data["meta"]["settings"]["opt"] == "sgd"
    assert "train_step_definition" in data["meta"]
    rows = {r["backend"]: r for r in data["rows"] if r["kind"] == "gmf"}
    for name in ("torch", "reference"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["bench"] == "train" and r["opt"] == "sgd" and r["n_timed"] == 1 and r["img_per_s"] > 0
        assert math.isfinite(r["first_step_loss"])
        errs = r["first_step_err_vs_reference"]
        assert "loss" in errs and sum(k.startswith("grad:") for k in errs) >= 5 and any(
            k.startswith("buffer:") for k in errs)
        assert r["peak_mem_mib"] is None and "not measured" in r["peak_mem_note"]
    assert rows["reference"]["max_rel_err_vs_reference"] == 0.0 and rows["reference"]["check"] == "is reference"
    assert rows["torch"]["check"] == "ok", rows["torch"]
    assert rows["torch"]["max_rel_err_vs_reference"] < 1e-3
    assert abs(rows["torch"]["first_step_loss"] - rows["reference"]["first_step_loss"]) < 1e-4
    assert rows["torch"]["ratio_vs_reference"] > 0
    for name in refusing:  # listed under "not run", with the backend's own reasons
        assert rows[name]["status"] == "unsupported" and "cannot train" in rows[name]["reason"], rows[name]
        assert "training mode not supported" in rows[name]["reason"]
    if refusing:
        assert "not run:" in proc.stdout and "cannot train" in proc.stdout


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
    assert s["bench"] == "inference" and "opt" not in s
    # --bench train: optimizer and its default learning rate; the paper protocol is inference only
    s = bench.resolve_settings(parser.parse_args(["--device", "cpu", "--bench", "train", "--opt", "adamw"]))
    assert s["bench"] == "train" and s["opt"] == "adamw" and s["lr"] == bench.DEFAULT_LR["adamw"]
    assert s["drop_path_rate"] == 0.0
    with pytest.raises(SystemExit):
        bench.resolve_settings(parser.parse_args(["--device", "cpu", "--bench", "train", "--protocol", "paper"]))
    assert bench.worst([0.1, float("nan"), 0.2]) != bench.worst([0.1, float("nan"), 0.2])  # NaN wins
    assert bench.parse_models("t,tiny,groupmixformer_small") == ["groupmixformer_t", "groupmixformer_s"]
    assert bench.parse_backends("torch, reference") == ["torch", "reference"]
    assert bench.parse_backends(None) is None
    backends, skipped = bench.select_backends(["torch"], "cpu")
    assert backends == ["torch", "reference"]  # reference always runs
    stats = bench.stats([3.0, 1.0, 2.0], batch=4, total_s=0.006)
    assert stats["median_ms"] == 2.0 and stats["min_ms"] == 1.0 and stats["img_per_s"] == 2000.0
    assert abs(stats["img_per_s_total"] - 2000.0) < 1e-9
