"""The one-call GPU report (benchmarks/gpu_report.py) and the no-silent-skip rule, without a GPU.

* `--dry-run` end to end (what CI can check of a report that needs a GPU): the plan, the
  plumbing probes, the results folder written from a fake run of the GPU steps, its schema
  and the device machine's limits on files; with `--upstream` (a stand-in clone), the upstream
  rows in the planned throughput.py command lines;
* where the upstream clone comes from, whether its rows run (timm / einops, einops installed from
  .upstream/wheels/) and the summary saying why not;
* the parsers the report reads its subprocesses with (pytest -v, compute-sanitizer,
  throughput.py --help), fed real-format samples, including runs stopped half-way;
* the summary renders any partial report; the folder validator catches broken folders;
* the FLOP formulas of benchmarks/ops.py against torch's own FLOP counter;
* tests/conftest.py: a GPU test that skips because the CUDA module is missing fails on a
  GPU machine, and GMF_REQUIRE_GPU=1 turns "needs a GPU" skips (those of
  tests/test_cuda_build.py included) into failures.
"""
from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from helpers import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_report.py"


gr = load_script(SCRIPT, "gmf_gpu_report")


def _env(**kw):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("GMF_REQUIRE_GPU", None)
    env.pop("GMF_UPSTREAM", None)
    env.update(kw)
    return env


def _stand_in_clone(root: Path) -> Path:
    """What the report looks for in an upstream clone: models/groupmixformer.py (never imported here)."""
    (root / "models").mkdir(parents=True)
    (root / "models" / "groupmixformer.py").write_text("class GroupMixFormer:\n    pass\n")
    return root


# ------------------------------------------------------------------ the dry run, end to end
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report_dry")
    clone = _stand_in_clone(tmp_path_factory.mktemp("upstream") / "GroupMixFormer")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--upstream", str(clone)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    return proc, out, clone


def test_dry_run_passes_and_prints_the_plan(dry_run):
    proc, out, clone = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout
    assert "DRY RUN" in text and "plan:" in text
    for phase in gr.PHASE_NAMES:
        assert f"  {phase} " in text, phase
    # the exact GPU commands it would run
    assert "gmf_kernels.cuda build" in text and "--archs" in text
    assert "gmf_kernels.triton_kernels.specializations --warm --arch" in text   # before the Triton tests
    assert "GMF_REQUIRE_GPU=1" in text and "tests/test_gpu_real_shapes.py" in text
    for tool in gr.SANITIZER_TOOLS:
        assert f"--tool {tool}" in text, tool
    assert "throughput.py --model groupmixformer_s --precision bf16 --batch-size 256" in text
    assert "--protocol paper" in text
    # --upstream: upstream's model eager and compiled in the bf16 b256 run, eager in the train run, not elsewhere
    plan = [ln for ln in text.splitlines() if ln.startswith("      $ ") and "throughput.py" in ln]
    assert len(plan) == 3, plan
    bf16, train, paper = plan  # the paper's protocol last: it judges nothing
    assert bf16.split("throughput.py ")[1].startswith("--model groupmixformer_s --precision bf16 --batch-size 256")
    assert (f"--compile-backends torch,triton,cuda,upstream --profile-steps 1 --optimized-auto-unverified "
            f"--upstream-precision amp --upstream {clone} --results-file") in bf16
    assert "--upstream" not in paper and "upstream" not in paper and "--no-torchcompile" in paper
    assert "--bench train" in train and f"--profile-steps 1 --no-timm --upstream {clone} --results-file" in train
    assert "plumbing checks passed; folder valid" in text


def test_dry_run_folder_schema(dry_run):
    proc, out, clone = dry_run
    assert gr.validate_folder(out) == []
    # the profiled throughput rows reach summary.md (the dry run's fake rows carry a `profile`)
    assert "## Where the GPU time goes" in (out / "summary.md").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert {"report.json", "summary.md", "report.log"} <= set(files)
    assert len(files) <= gr.MAX_FILES and all(p.stat().st_size <= gr.MAX_FILE_BYTES for p in out.iterdir())
    rep = json.loads((out / "report.json").read_text())
    assert rep["dry_run"] is True and rep["schema_version"] == gr.SCHEMA_VERSION
    assert set(rep["files"]) == set(files)
    meta = rep["meta"]
    for k in ("date", "git_sha", "torch", "triton", "device_name", "driver_version", "torch_cuda"):
        assert k in meta, k
    assert meta["torch"] == torch.__version__
    assert [p for p in gr.PHASE_NAMES if not rep["phases"][p]["status"].startswith("dry-run")] == []
    checks = rep["dry_run_checks"]
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    # every test selection was really collected, and its (fake) outcomes parsed
    runs = {r["name"]: r for r in rep["tests"]["runs"]}
    assert set(runs) == {"triton_real_shapes", "triton_kernels", "cuda_real_shapes", "cuda_build_gpu"}
    assert all(r["fake"] and r["counts"]["passed"] > 0 for r in runs.values()), runs
    assert runs["cuda_build_gpu"]["counts"]["passed"] >= 5  # test_cuda_build.py's needs_gpu tests, marked gpu
    assert set(rep["sanitizer"]["tools"]) == set(gr.SANITIZER_TOOLS)
    # the kernel worker really ran (on CPU): measured rows with the formulas' bytes and FLOPs
    pre = {r["impl"]: r for r in rep["kernels"]["rows"] if r.get("op") == "pre_projection"}
    assert {"torch", "reference"} <= set(pre)
    for r in pre.values():
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["bytes"] > 0 and r["flops"] > 0
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert pre["torch"]["err_vs_reference"] < 1e-4
    assert [r["name"] for r in rep["models"]["runs"]] == ["bf16_b256", "fp32_b128_paper"]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "## Phases" in summary and "git" in summary and meta["git_sha"] in summary
    up = rep["upstream"]
    assert up["path"] == str(clone) and up["source"] == "--upstream" and up["checked"] and up["use"]
    assert set(gr.UPSTREAM_DEPS) <= set(up["deps"]) and set(meta["upstream_deps"]) == set(gr.UPSTREAM_DEPS)
    bf16 = next(r for r in rep["models"]["runs"] if r["name"] == "bf16_b256")
    assert {r["backend"] for r in bf16["rows"] if r["kind"] == "upstream"} == {"upstream", "upstream+compile"}
    assert f"- clone: {clone} (from --upstream)" in summary and "## Upstream side by side" in summary
    for base in ("`upstream (amp)`", "`upstream+compile (amp)`"):  # issue 9's ratios: stated, not measured
        assert f"  - vs {base}: not measured (dry run)" in summary, base


# ------------------------------------------------------------------ parsers
PYTEST_PLAIN = """\
tests/test_gpu_real_shapes.py::test_groupmixformer_s_stages[cuda-fp32-C80-56x56-B128] PASSED             [  1%]
tests/test_gpu_real_shapes.py::test_groupmixformer_s_stages[cuda-fp16-C80-56x56-B128] FAILED             [  2%]
tests/test_gpu_real_shapes.py::test_groupmixformer_s_stages[cuda-bf16-C80-56x56-B128] SKIPPED (needs...) [  3%]
tests/test_cuda_build.py::test_gpu_matches_emulation ERROR                                              [  4%]
=========================== short test summary info ============================
SKIPPED [1] tests/test_gpu_real_shapes.py:120: needs a CUDA GPU
FAILED tests/test_gpu_real_shapes.py::test_groupmixformer_s_stages[cuda-fp16-C80-56x56-B128] - AssertionError: cuda fp16 C=80 56x56 B=128: relative error 3.1e-02 > bound 1.2e-03
ERROR tests/test_cuda_build.py::test_gpu_matches_emulation - GMF_REQUIRE_GPU=1: a GPU test may not skip
============= 1 failed, 1 passed, 1 skipped, 1 error in 12.34s ==============
"""

PYTEST_XDIST_CUT = """\
[gw0] [  1%] PASSED tests/test_gpu_real_shapes.py::test_every_width[triton-fp32-C40-56x56-B32]
[gw1] [  2%] PASSED tests/test_gpu_real_shapes.py::test_every_width[triton-fp16-C40-56x56-B32]
[gw1] [  3%] FAILED tests/test_gpu_real_shapes.py::test_every_width[triton-bf16-C40-56x56-B32]
"""


def test_parse_pytest_verbose_and_summary():
    p = gr.parse_pytest(PYTEST_PLAIN)
    assert p["counts"]["passed"] == 1 and p["counts"]["failed"] == 1 and p["counts"]["error"] == 1
    assert p["counts"]["skipped"] == 1
    msgs = {f["id"].split("::")[1]: f["message"] for f in p["failures"]}
    assert "relative error 3.1e-02" in msgs["test_groupmixformer_s_stages[cuda-fp16-C80-56x56-B128]"]
    assert "GMF_REQUIRE_GPU=1" in msgs["test_gpu_matches_emulation"]
    assert p["final_line"].startswith("1 failed, 1 passed")
    assert p["skips"] == ["tests/test_gpu_real_shapes.py: needs a CUDA GPU"]


def test_parse_pytest_xdist_run_stopped_half_way():
    p = gr.parse_pytest(PYTEST_XDIST_CUT)  # no summary: killed by the phase's timeout
    assert p["counts"]["passed"] == 2 and p["counts"]["failed"] == 1 and p["final_line"] is None
    assert p["failures"][0]["id"].endswith("[triton-bf16-C40-56x56-B32]")


SANITIZER_MEMCHECK = """\
========= COMPUTE-SANITIZER
SANITIZE_CASE {"backend": "cuda", "dtype": "fp32", "C": 80, "H": 7, "W": 9, "B": 2, "tile": null, "status": "ok", "max_rel_err": 1e-07}
========= Invalid __global__ read of size 4 bytes
=========     at void gmf::gma_attention_kernel<float, 8>(gmf::GmaParams)+0x1c30 in gma_attention.cuh:212
=========     by thread (37,0,0) in block (3,0,0)
=========     Address 0x7f0000001004 is out of bounds
=========     and is 4 bytes after the nearest allocation at 0x7f0000000000 of size 4,096 bytes
=========
========= Invalid __global__ write of size 2 bytes
=========     at gma_aggregate_kernel+0x990 in aggregation.py:301
=========     by thread (0,0,0) in block (1,4,0)
=========
SANITIZE_CASE {"backend": "triton", "dtype": "bf16", "C": 200, "H": 20, "W": 13, "B": 1, "tile": null, "status": "error", "reason": "RuntimeError: CUDA error"}
SANITIZE_DONE cases=2 bad=1
========= ERROR SUMMARY: 2 errors
"""

SANITIZER_RACECHECK = """\
========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at void gmf::gma_aggregate_kernel<__half, 16>(gmf::GmaParams)+0x880 in gma_aggregate.cuh:140
=========     and Read access at void gmf::gma_aggregate_kernel<__half, 16>(gmf::GmaParams)+0x9a0 in gma_aggregate.cuh:151 [1024 hazards]
=========
SANITIZE_DONE cases=7 bad=0
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""


def test_parse_sanitizer_findings_kernels_and_sources():
    p = gr.parse_sanitizer(SANITIZER_MEMCHECK)
    assert p["errors"] == 2 and p["driver_completed"]
    assert [f["message"] for f in p["findings"]] == ["Invalid __global__ read of size 4 bytes",
                                                     "Invalid __global__ write of size 2 bytes"]
    assert p["findings"][0]["kernel"] == "gma_attention_kernel"
    assert p["findings"][0]["source"] == "gma_attention.cuh:212"
    assert p["findings"][1]["kernel"] == "gma_aggregate_kernel"
    assert p["findings"][1]["source"] == "aggregation.py:301"
    assert p["per_kernel"] == {"gma_attention_kernel": 1, "gma_aggregate_kernel": 1}
    assert (p["cases_ok"], p["cases_failed"]) == (1, 1)


def test_parse_sanitizer_racecheck_and_clean():
    p = gr.parse_sanitizer(SANITIZER_RACECHECK)
    assert p["hazards"] == {"displayed": 1, "errors": 1, "warnings": 0}
    assert p["findings"][0]["message"].startswith("Error: Race reported") and p["errors"] is None
    f0 = p["findings"][0]
    assert f0["kernel"] == "gma_aggregate_kernel" and f0["source"] == "gma_aggregate.cuh:140"
    clean = gr.parse_sanitizer("========= COMPUTE-SANITIZER\nSANITIZE_DONE cases=7 bad=0\n"
                               "========= ERROR SUMMARY: 0 errors\n")
    assert clean["errors"] == 0 and clean["findings"] == [] and clean["driver_completed"]
    crashed = gr.parse_sanitizer("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n")
    assert crashed["errors"] is None and not crashed["driver_completed"] and crashed["findings"]


class _SlowBuild:
    """Stands in for the background build's Proc: still compiling when the build phase ends."""

    def __init__(self, cmd, env, tee, prefix, **kw):
        self.cmd, self.waited = cmd, []
        self.p = types.SimpleNamespace(poll=lambda: None, wait=self._p_wait)

    def _p_wait(self, timeout):
        raise subprocess.TimeoutExpired(self.cmd, timeout)

    def wait(self, timeout):
        self.waited.append(timeout)
        return gr.RunResult(self.cmd, 0, "compiling...\n/m/_gmf_cuda.cpython-312-x86_64-linux-gnu.so", 150.0)


def test_a_build_outliving_its_phase_is_waited_for_not_killed(tmp_path, monkeypatch):
    """The CUDA build runs beside the Triton tests; when it is still compiling at the build phase's end
    it keeps running (nothing else would build the module every later CUDA step needs), and the next
    phase waits for it first, keeping BUILD_WAIT_RESERVE_S of its time for itself."""
    monkeypatch.setattr(gr, "Proc", _SlowBuild)
    monkeypatch.setattr(gr, "warm_triton_cache", lambda ctx, allow: None)
    monkeypatch.setattr(gr, "_run_pytest_specs", lambda ctx, specs, t_end, ph: None)
    monkeypatch.setattr(gr, "run", lambda ctx, cmd, timeout, prefix, **kw: gr.RunResult(
        cmd, 0, gr.JSON_TAG + json.dumps({"cuda_module": "loaded"}), 1.0))
    ctx = gr.Ctx(types.SimpleNamespace(), tmp_path, lambda *a, **k: None, False,
                 {"meta": {"capability": [9, 0]}, "build": {}}, {}, 0.0, time.monotonic() + 500)
    ph = {"notes": []}
    gr.phase_build(ctx, ph, 0.5)
    build = ctx.pending_build
    assert isinstance(build, _SlowBuild) and build.waited == [] and "next phase waits" in ph["notes"][0]
    assert "status" not in ctx.report["build"]
    gr.settle_build(ctx, {"notes": []}, 70.0 - gr.BUILD_WAIT_RESERVE_S, "tests")
    assert ctx.pending_build is None and build.waited == [70.0 - gr.BUILD_WAIT_RESERVE_S]
    b = ctx.report["build"]
    assert b["status"] == "ok" and b["finished_in_phase"] == "tests" and b["module_after_build"] == "loaded"
    assert b["module_path"].endswith(".so")
    gr.settle_build(ctx, {"notes": []}, 1.0, "end")  # nothing left to wait for
    assert build.waited == [50.0]


REFUSED_OUTPUT = ("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n" + "".join(
    'SANITIZE_CASE {"backend": "%s", "status": "error", "error": "RuntimeError: CUDA error: unknown error"}\n' % b
    for b in ("cuda", "triton")) + "SANITIZE_DONE cases=2 bad=2\n========= ERROR SUMMARY: 1 error\n")


def test_sanitizer_refused_by_the_device(tmp_path, monkeypatch):
    """A machine whose GPU runtime refuses compute-sanitizer (gVisor: "Device not supported"; the driver
    then reports each case in error): every tool is recorded as "unsupported" with that line, not as
    errors of the kernels, and the verdict names the refusal -- the backends do not qualify on such a
    report (no sanitizer evidence). The four tools run at once, each with the rest of the phase."""
    calls = []

    def fake_run(ctx, cmd, timeout, prefix, **kw):  # the plain driver run, without the sanitizer
        calls.append(cmd)
        return gr.RunResult(cmd, 0, 'SANITIZE_CASE {"backend": "triton", "status": "ok"}\nSANITIZE_DONE cases=1 '
                                    'bad=0\n', 1.0)

    def fake_together(ctx, cmds, timeout, env, fake=None):
        calls.append(sorted(cmds))
        assert timeout > 90 and env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
        return {k: gr.RunResult(c, 1, REFUSED_OUTPUT, 2.0) for k, c in cmds.items()}
    real = gr._sanitizer_cmd(None, "compute-sanitizer", "memcheck")  # framework probes' API errors are no findings
    assert real[real.index("--report-api-errors") + 1] == "no" and "kns=gma_" in real
    monkeypatch.setattr(gr, "run", fake_run)
    monkeypatch.setattr(gr, "run_together", fake_together)
    ctx = types.SimpleNamespace(out=tmp_path, dry=False, tee=lambda *a, **k: None, env={},
                                report={"meta": {"compute_sanitizer": "/x/compute-sanitizer"}, "sanitizer": {"tools": {}}})
    ph = {"notes": []}
    gr.phase_sanitizer(ctx, ph, 100.0)
    tools = ctx.report["sanitizer"]["tools"]
    # the plain run, the tools at once, then (the phase's time left) the Triton 3xTF32 check
    assert len(calls) == 3 and calls[1] == sorted(gr.SANITIZER_TOOLS) and "triton_tf32x3_repro" in str(calls[2])
    assert set(tools) == set(gr.SANITIZER_TOOLS) and all(t["status"] == "unsupported" for t in tools.values()), tools
    for tool, t in tools.items():
        assert t["reason"].startswith(f"compute-sanitizer {tool} on this machine: Error: Device not supported")
        assert "not a finding" in t["reason"]
    v = gr.verification_verdicts(_report(sanitizer={"tools": tools}))
    assert not v["triton"]["qualifies"]
    assert any("racecheck: unsupported (compute-sanitizer racecheck on this machine: Error: Device not supported"
               in w for w in v["triton"]["reasons"]), v["triton"]["reasons"]
    # a finding or a crash with cases checked is not a refusal
    assert gr.sanitizer_refusal(REFUSED_OUTPUT, gr.parse_sanitizer(REFUSED_OUTPUT)) is not None
    assert gr.sanitizer_refusal(REFUSED_OUTPUT, {"cases": [{"status": "ok"}], "cases_ok": 1}) is None
    assert gr.sanitizer_refusal("========= Invalid __global__ read of size 4\n", {"cases": []}) is None


def test_throughput_help_flags():
    h = "usage: throughput.py [-h] [--bench {inference,train}] [--results-file RESULTS_FILE] [--no-timm]"
    f = gr.throughput_help_flags(h)
    assert f["bench"] == ["inference", "train"] and "--results-file" in f["flags"] and "--no-timm" in f["flags"]
    assert gr.throughput_help_flags("usage: throughput.py [--model MODEL]")["bench"] == []


def test_select_ids():
    ids = ["tests/a.py::t[cuda-x]", "tests/a.py::t[triton-x]", "tests/b.py::u"]
    assert gr._select_ids(ids, ["tests/a.py", "-k", "triton"]) == ["tests/a.py::t[triton-x]"]
    assert gr._select_ids(ids, ["tests/a.py", "-k", "not triton"]) == ["tests/a.py::t[cuda-x]"]
    assert gr._select_ids(ids, ["tests/b.py"]) == ["tests/b.py::u"]


# ------------------------------------------------------------------ upstream side by side
@pytest.mark.parametrize("upstream", [None, "/clones/GroupMixFormer"])
def test_planned_runs_with_and_without_upstream(upstream):
    """Only the bf16 b256 run compiles upstream, at --upstream-precision amp and in place of
    'reference+compile' (the phase's time); the train run times it eager; nothing else changes."""
    runs = {name: args for name, _, args, _ in gr.model_runs(upstream)}
    _, _, train = gr.train_run(upstream)
    assert list(runs) == [gr.UPSTREAM_RUN] and gr.PAPER_RUN[0] == "fp32_b128_paper"
    bf16 = runs[gr.UPSTREAM_RUN]
    compiled = bf16[bf16.index("--compile-backends") + 1].split(",")
    assert compiled == (["torch", "triton", "cuda", "upstream"] if upstream else ["reference", "torch", "triton", "cuda"])
    assert (bf16[bf16.index("--upstream-precision") + 1] == "amp") if upstream else "--upstream-precision" not in bf16
    assert "--upstream-precision" not in train and bf16[bf16.index("--precision") + 1] == "bf16"
    for args in (bf16, train):
        assert (args[args.index("--upstream") + 1] == upstream) if upstream else "--upstream" not in args
    assert train[:len(gr.TRAIN_RUN[2])] == gr.TRAIN_RUN[2]


@pytest.mark.parametrize("given, env, default, expected_source, usable", [
    ("clone", "elsewhere", True, "--upstream", True),  # the flag wins
    (None, "clone", True, "$GMF_UPSTREAM", True),
    (None, None, True, "default", True),
    (None, None, False, None, False),
    ("", None, True, "--upstream", False),  # '' switches it off
    (None, "", True, "$GMF_UPSTREAM", False),
    ("no_model_file", None, False, "--upstream", False),
])
def test_resolve_upstream(tmp_path, monkeypatch, given, env, default, expected_source, usable):
    clone = _stand_in_clone(tmp_path / "clone")
    (tmp_path / "no_model_file").mkdir()
    monkeypatch.setattr(gr, "UPSTREAM_DEFAULT", clone if default else tmp_path / "absent")
    monkeypatch.setattr(gr, "ROOT", tmp_path)
    if env is None:
        monkeypatch.delenv("GMF_UPSTREAM", raising=False)
    else:
        monkeypatch.setenv("GMF_UPSTREAM", str(tmp_path / env) if env else "")
    entry = gr.resolve_upstream(str(tmp_path / given) if given else given)
    assert (entry["source"] or "").startswith(expected_source or "") and bool(entry["source"]) == bool(expected_source)
    assert (entry["reason"] is None) == usable and entry["use"] is False  # deps not asked yet
    if usable:
        assert entry["path"] == str(clone)
    elif given == "no_model_file":
        assert "has no models/groupmixformer.py" in entry["reason"]
    else:
        assert entry["path"] is None and entry["reason"].startswith("no upstream clone")


def _upstream_ctx(tmp_path, entry):
    args = gr.build_parser().parse_args([])
    report = {"meta": {}, "upstream": entry, "models": {"runs": []}, "train": {"runs": []}}
    return gr.Ctx(args, tmp_path, gr.Tee(None, quiet=True), False, report, {}, 0.0, 1e12)


@pytest.mark.parametrize("missing, wheel, install_rc, usable, clone", [
    ([], False, None, True, True),
    (["einops"], True, 0, True, True),  # installed from the wheel, then imports
    (["einops"], True, 1, False, True),  # the install failed
    (["einops"], False, None, False, True),
    (["timm"], True, None, False, True),  # timm is never installed by the report
    (["einops"], True, None, False, False),  # no clone: nothing installed for it
])
def test_check_upstream_deps_and_einops_wheel(tmp_path, monkeypatch, missing, wheel, install_rc, usable, clone):
    """Upstream's rows run only when timm and einops import; a missing einops is pip-installed from
    .upstream/wheels/ with --no-index (the device machine reaches no index) when a clone needs it;
    the summary then says whether the upstream rows ran, and why not."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if wheel:
        (wheels / "einops-0.8.2-py3-none-any.whl").write_bytes(b"stand-in")
    monkeypatch.setattr(gr, "UPSTREAM_WHEELS", wheels)
    state = {"missing": list(missing)}
    commands = []

    def deps(ctx):
        return {"python": "/py", **{n: ({"ok": False, "error": f"ModuleNotFoundError: No module named '{n}'"}
                                        if n in state["missing"] else {"ok": True, "version": "1"})
                                    for n in gr.UPSTREAM_DEPS}}

    def fake_run(ctx, cmd, timeout, prefix, **kw):
        cmd = [str(c) for c in cmd]
        commands.append(cmd)
        if install_rc == 0:
            state["missing"].remove("einops")
        return gr.RunResult(cmd, install_rc, "pip output", 1.0)

    monkeypatch.setattr(gr, "_deps", deps)
    monkeypatch.setattr(gr, "run", fake_run)
    path = str(_stand_in_clone(tmp_path / "clone")) if clone else ""
    ctx = _upstream_ctx(tmp_path, gr.resolve_upstream(path))
    assert gr.upstream_path(ctx) == (path if usable else None)
    assert gr.upstream_path(ctx) == gr.upstream_path(ctx) and len(commands) <= 1  # decided once
    up = ctx.report["upstream"]
    if "einops" in missing and wheel and clone:
        assert commands and commands[0][1:] == ["-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                                               "einops"]
        assert up["einops_install"]["status"] == ("installed" if install_rc == 0 else "failed")
    else:
        assert commands == []
    md = gr.render_summary(_report(upstream=up))
    if usable:
        assert up["reason"] is None and "NOT run" not in md
    elif not clone:
        assert up["reason"] == "no upstream clone: --upstream is empty" and "einops_install" not in up
        assert f"**upstream rows NOT run**: {up['reason']}" in md
    else:
        still = [n for n in gr.UPSTREAM_DEPS if n in state["missing"]]
        assert up["deps_missing"] == still and f"{', '.join(still)} does not import in /py" in up["reason"]
        assert f"**upstream rows NOT run**: {', '.join(still)} does not import" in md
        assert ("pip download einops" in up["reason"]) == ("einops" in still and not wheel)


def test_summary_upstream_ratios_and_failed_rows():
    """With upstream's rows in the runs: each of our rows' ratios to upstream eager and compiled, and an
    upstream row that did not run is named with its reason; a run that lost its upstream rows is too."""
    up = {"path": "/c", "source": "--upstream", "checked": True, "use": True, "reason": None,
          "deps": {"timm": {"ok": True, "version": "1.0.31"}, "einops": {"ok": True, "version": "0.8.2"}}}
    rows = [dict(backend="cuda", label="cuda", kind="gmf", status="ok", img_per_s=3000.0, ratio_vs_upstream=3.5,
                 ratio_vs_upstream_compile=1.75, check="ok"),
            dict(backend="upstream", label="upstream (/c)", kind="upstream", status="ok", img_per_s=857.1,
                 ratio_vs_upstream=1.0, ratio_vs_upstream_compile=0.5, check="ok"),
            dict(backend="upstream+compile", label="upstream+compile", kind="upstream", status="error",
                 reason="during timing: RuntimeError: out of memory")]
    md = gr.render_summary(_report(upstream=up, models={"runs": [{"name": "bf16_b256", "status": "ok", "rows": rows}]},
                                   train={"runs": [{"name": "train_amp_b128", "status": "timeout", "rows": [],
                                                    "reason": "stopped after 30 s"}]}))
    assert "timm ok 1.0.31, einops ok 0.8.2" in md
    assert "| bf16_b256 | cuda | 3000.0 | 3.50x | 1.75x | ok |" in md
    assert "- bf16_b256 upstream+compile: **not run**: error: during timing: RuntimeError: out of memory" in md
    assert "- train_amp_b128: **no upstream row** (timeout: stopped after 30 s)" in md


@pytest.mark.parametrize("drop, run_status", [
    ((), "ok"),
    (("upstream+compile",), "ok"),  # its ratio is not measured, the other one is
    (("cuda", "triton", "cuda+compile", "triton+compile"), "timeout"),
    (None, None),  # the bf16 run did not run at all
])
def test_summary_judged_ratios(drop, run_status):
    """summary.md states issue 9's two ratios from the bf16 b256 run: the best of our cuda/triton
    rows (eager or compiled; which one, by img/s) over `upstream (amp)` and over `upstream+compile
    (amp)`, each with its goal (3x, 1.5x), or "not measured" and why; never from another run."""
    rate = (torch.rand(7) * 3000 + 100).tolist()
    names = ["cuda", "triton", "cuda+compile", "triton+compile", "torch+compile", "upstream", "upstream+compile"]
    rows = [dict(backend=b, label=b, kind="upstream" if b.startswith("upstream") else "gmf", status="ok",
                 img_per_s=v, check="ok (vs fp64)" if b.startswith("upstream") else "ok",
                 precision="amp" if b.startswith("upstream") else "bf16") for b, v in zip(names, rate)]
    paper = {"name": "fp32_b128_paper", "status": "ok", "rows": [dict(r, img_per_s=1e6) for r in rows]}
    runs = [paper] if drop is None else [
        paper, {"name": gr.UPSTREAM_RUN, "status": run_status, "rows": [r for r in rows if r["backend"] not in drop]}]
    up = {"path": "/c", "source": "--upstream", "checked": True, "use": True, "reason": None}
    md = gr.render_summary(_report(upstream=up, models={"runs": runs}))
    best = max(rows[:4], key=lambda r: r["img_per_s"])  # torch+compile is not among the judged rows
    for r, goal in ((rows[5], 3.0), (rows[6], 1.5)):
        line = next(ln for ln in md.splitlines() if ln.startswith(f"  - vs `{r['backend']}"))
        if drop is None:
            assert line.endswith(f": not measured ({gr.UPSTREAM_RUN} did not run)"), line
        elif r["backend"] in drop or best["backend"] in drop:
            assert f"not measured ({gr.UPSTREAM_RUN} {run_status}; missing: " in line, line
        else:
            ratio = best["img_per_s"] / r["img_per_s"]
            assert line.startswith(f"  - vs `{r['backend']} (amp)`: **{ratio:.2f}x** measured ({best['backend']} "
                                   f"(bf16) {best['img_per_s']:.1f} img/s / {r['img_per_s']:.1f} img/s): goal >= "
                                   f"{goal:g}x {'reached' if ratio >= goal else 'NOT reached'}"), line


@pytest.mark.parametrize("took, judged", [({"80": "triton", "320": "cuda"}, True), ({"80": "triton"}, True),
                                          ({"80": "torch", "160": "triton"}, False), ({"80": "triton+torch"}, False),
                                          ({}, False)])
def test_optimized_row_judged_where_its_layers_ran_fused(took, judged):
    """The optimized row (optimize_for_inference with `auto`) counts among issue 9's judged rows only where every
    GMA layer of its first call took a fused backend (`gma_backends`: on an architecture gpu_verified.json does
    not list, auto takes the torch backend unless the run says --optimized-auto-unverified); summary.md says what
    it took and whether it was judged."""
    rows = [dict(backend="triton", label="triton", kind="gmf", status="ok", img_per_s=100.0, check="ok",
                 precision="bf16"),
            dict(backend="optimized", label="optimized (default)", kind="gmf", status="ok", img_per_s=500.0,
                 check="ok", precision="bf16", gma_backends=took, auto_unverified=True),
            dict(backend="upstream", label="upstream", kind="upstream", status="ok", img_per_s=50.0,
                 check="ok (vs fp64)", precision="amp")]
    ok = {r["backend"]: r for r in rows}
    assert (ok["optimized"] in gr.judged_rows(ok)) == judged
    up = {"path": "/c", "source": "--upstream", "checked": True, "use": True, "reason": None}
    md = gr.render_summary(_report(upstream=up, models={"runs": [{"name": gr.UPSTREAM_RUN, "status": "ok",
                                                                  "rows": rows}]}))
    line = next(ln for ln in md.splitlines() if ln.startswith("  - vs `upstream (amp)`"))
    assert (f"**{(500.0 if judged else 100.0) / 50.0:.2f}x** measured ({'optimized' if judged else 'triton'} "
            in line), line
    said = next(ln for ln in md.splitlines() if ln.startswith("  - the optimized row's GMA layers took"))
    assert said.endswith(": not a judged row") != judged, said
    for C, b in took.items():
        assert f"C={C} {b}" in said
    assert "GMF_AUTO_UNVERIFIED=1" in said


def test_summary_judged_train_ratio():
    """summary.md states issue 10's ratio from the training run only: the best of our cuda/triton training
    rows over `upstream (amp)`'s step, with its goal (2x); the inference runs do not stand in for it."""
    rate = (torch.rand(4) * 1000 + 50).tolist()
    names = ["triton", "cuda+compile", "torch", "upstream"]
    rows = [dict(backend=b, label=b, kind="upstream" if b == "upstream" else "gmf", status="ok", img_per_s=v,
                 check="ok", precision="amp") for b, v in zip(names, rate)]
    infer = {"name": gr.UPSTREAM_RUN, "status": "ok", "rows": [dict(r, img_per_s=1e6) for r in rows]}
    up = {"path": "/c", "source": "--upstream", "checked": True, "use": True, "reason": None}
    for train_runs in ([{"name": gr.TRAIN_RUN[0], "status": "ok", "rows": rows}], []):
        md = gr.render_summary(_report(upstream=up, models={"runs": [infer]}, train={"runs": train_runs}))
        lines = md.splitlines()
        i = next(i for i, ln in enumerate(lines) if ln.startswith("- issue 10's judged ratio ("))
        line = lines[i + 1]
        if not train_runs:
            assert line == f"  - vs `upstream`: not measured ({gr.TRAIN_RUN[0]} did not run)", line
            continue
        best = max(rows[:2], key=lambda r: r["img_per_s"])  # torch is not among the judged rows
        ratio = best["img_per_s"] / rows[3]["img_per_s"]
        assert line.startswith(f"  - vs `upstream (amp)`: **{ratio:.2f}x** measured ({best['backend']} (amp) "
                               f"{best['img_per_s']:.1f} img/s / {rows[3]['img_per_s']:.1f} img/s): goal >= 2x "
                               f"{'reached' if ratio >= 2 else 'NOT reached'}"), line


def test_summary_judged_bandwidth():
    """The kernels section states issue 9's bandwidth goal per fused backend and dtype: each stage's
    pre-projection GB/s (compulsory bytes) over the measured copy ceiling at batch 128, and whether the
    worst stage reaches 60%; a stage not measured, or no copy ceiling, says so."""
    gbps = (torch.rand(4) * 2000 + 2000).tolist()
    rows = [dict(op="pre_projection", impl="cuda", status="ok", stage=i, C=C, H=g, W=g, B=128, dtype="bf16",
                 median_ms=1.0, GBps=v) for i, (C, g, v) in enumerate(zip((80, 160, 320, 320), (56, 28, 14, 7), gbps))]
    rows += [dict(r, impl="triton", GBps=r["GBps"] * 0.5) for r in rows[:3]]
    rows.append(dict(rows[3], impl="triton", status="error", reason="boom", GBps=None))
    rows.append(dict(rows[0], B=1, GBps=1.0))  # batch 1 is not judged
    ceil = [{"op": "copy_1GiB", "status": "ok", "GBps": 4000.0}]
    md = gr.render_summary(_report(kernels={"ceilings": ceil, "rows": rows}))
    lines = {ln.split(":")[0].strip(): ln for ln in md.splitlines() if ln.startswith("  - cuda bf16")
             or ln.startswith("  - triton bf16")}
    worst = min(gbps) / 4000
    cuda = lines["- cuda bf16"]
    assert cuda.startswith(f"  - cuda bf16: stage 0 (C=80) {gbps[0] / 4000:.0%}, stage 1 (C=160) {gbps[1] / 4000:.0%}")
    assert cuda.endswith(f"; worst {worst:.0%}: goal {'reached' if worst >= 0.6 else 'NOT reached'}"), cuda
    assert lines["- triton bf16"].endswith("stage 3 (C=320) error; not measured at every stage")
    assert "issue 9's bandwidth goal (the fused pre-projection at >= 60% of the measured copy" in md
    md = gr.render_summary(_report(kernels={"ceilings": [], "rows": rows}))
    assert "compulsory bytes, batch 128, every stage): not measured (no copy ceiling measured)" in md


def test_timed_out_throughput_run_keeps_its_rows(tmp_path, monkeypatch):
    """A throughput run gets --deadline (its time less the margin); when its time runs out anyway, the
    rows its results file holds (rewritten after every row) are kept, said so, and judged."""
    seen = {}
    rows = [dict(backend="reference", label="reference", kind="gmf", status="ok", img_per_s=500.0, check="is reference"),
            dict(backend="upstream", label="upstream (amp)", kind="upstream", status="ok", img_per_s=400.0,
                 check="ok (vs fp64)", precision="amp"),
            dict(backend="cuda", label="cuda", kind="gmf", status="ok", img_per_s=1300.0, check="ok", precision="bf16",
                 deadline_note="cut by --deadline: 1 warm-up + 7 timed calls (of 5 + 30)"),
            dict(backend="upstream+compile", label="upstream+compile", kind="upstream", precision="amp",
                 check="ok (vs fp64)", compile_s=80.0)]  # checked, killed while timed

    def fake_run(ctx, cmd, timeout, prefix, **kw):
        seen["cmd"], seen["timeout"] = cmd, timeout
        path = Path(cmd[cmd.index("--results-file") + 1])
        path.write_text(json.dumps({"meta": {"complete": False}, "rows": rows}))
        return gr.RunResult(cmd, -15, "killed", timeout, timed_out=True)
    monkeypatch.setattr(gr, "run", fake_run)
    ctx = types.SimpleNamespace(out=tmp_path, dry=False, tee=lambda *a, **k: None, quarantined={},
                                report={"throughput_help": {"flags": ["--deadline", "--results-file"]}})
    section, ph = {"runs": []}, {"notes": []}
    gr._run_throughput(ctx, gr.UPSTREAM_RUN, "t.json", ["--model", "groupmixformer_s"], 100.0, section, ph)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--deadline") + 1] == f"{100 - gr.DEADLINE_MARGIN_S:.0f}" and seen["timeout"] == pytest.approx(100.0, abs=0.5)
    entry = section["runs"][0]
    assert entry["status"] == "timeout" and entry["complete"] is False and len(entry["rows"]) == 4
    assert "its results file kept 4 rows, 3 timed" in entry["reason"] and "kept 4 rows, 3 timed" in ph["notes"][0]
    assert gr.deadline_args(100.0, ["--results-file"]) == []  # an older throughput.py: no flag
    assert gr.deadline_args(20.0, ["--deadline"]) == ["--deadline", "12"]  # never below 0.6 of the time
    md = gr.render_summary(_report(upstream={"path": "/c", "source": "--upstream", "checked": True, "use": True,
                                             "reason": None}, models={"runs": [entry]}))
    assert ("  - vs `upstream (amp)`: **3.25x** measured (cuda (bf16) 1300.0 img/s / 400.0 img/s): goal >= 3x "
            "reached; iterations cut by --deadline for cuda") in md
    assert (f"  - vs `upstream+compile (amp)`: not measured ({gr.UPSTREAM_RUN} timeout; missing: the "
            f"upstream+compile row)") in md


# ------------------------------------------------------------------ summary and folder validation
def _report(**kw):
    rep = {"schema_version": gr.SCHEMA_VERSION, "kind": "gmf_kernels gpu report", "dry_run": False,
           "meta": {"date": "2026-01-01T00:00:00+00:00", "device_name": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
                    "sm_count": 132, "memory_gib": 79.2, "driver_version": "580.1", "driver_cuda_version": 13000,
                    "torch": "2.11.0", "triton": "3.6.0", "torch_cuda": "13.0", "git_sha": "abc123"},
           "phases": {p: {"status": "ok", "seconds": 1.0, "allowance_s": 2.0, "notes": []} for p in gr.PHASE_NAMES},
           "build": {}, "tests": {"runs": []}, "sanitizer": {"tools": {}}, "kernels": {}, "models": {"runs": []},
           "train": {"runs": []}, "files": ["report.json", "summary.md"]}
    rep.update(kw)
    return rep


def test_render_summary_of_a_partial_report():
    """Timeouts, errors and missing fields render; failures and findings are listed."""
    rep = _report(
        tests={"runs": [{"name": "cuda_real_shapes", "status": "timeout", "seconds": 70,
                         **gr.parse_pytest(PYTEST_PLAIN)},
                        {"name": "cuda_build_gpu", "status": "skipped", "reason": "time budget used up"}]},
        sanitizer={"tools": {"memcheck": {"status": "errors", "seconds": 20, **gr.parse_sanitizer(SANITIZER_MEMCHECK)},
                             "racecheck": {"status": "timeout"}}},
        kernels={"ceilings": [{"op": "copy_1GiB", "status": "ok", "GBps": 3000.0}],
                 "rows": [{"op": "pre_projection", "impl": "cuda", "status": "ok", "stage": 0, "C": 80, "H": 56,
                           "W": 56, "B": 128, "dtype": "bf16", "median_ms": 0.5, "p20_ms": 0.49, "p80_ms": 0.52,
                           "GBps": 1500.0, "TFLOPs": 3.1, "err_vs_reference": 1e-3},
                          {"op": "pre_projection", "impl": "reference", "status": "ok", "stage": 0, "C": 80, "H": 56,
                           "W": 56, "B": 128, "dtype": "bf16", "median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.1},
                          {"op": "pre_projection", "impl": "triton", "status": "error", "stage": 0, "C": 80, "H": 56,
                           "W": 56, "B": 128, "dtype": "bf16", "reason": "RuntimeError: boom"},
                          {"op": "aggregate", "impl": "cuda", "status": "ok", "stage": 0, "C": 80, "B": 128,
                           "dtype": "bf16", "median_ms": 0.3, "p20_ms": 0.29, "p80_ms": 0.31, "GBps": 2000.0}]},
        models={"runs": [{"name": "bf16_b256", "status": "timeout", "rows": [], "reason": "stopped"}]})
    md = gr.render_summary(rep)
    assert "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs" in md and "580.1 (CUDA 13.0" in md and "abc123" in md
    assert "relative error 3.1e-02" in md and "GMF_REQUIRE_GPU=1" in md
    assert "Invalid __global__ read of size 4 bytes [gma_attention_kernel gma_attention.cuh:212]" in md
    assert "| 0 | 80 | 56x56 | 128 | bf16 | cuda | 0.5000 | 0.4900-0.5200 | 1500 | 50% | 3.10 | 4.00x |" in md
    assert "RuntimeError: boom" in md and "| bf16_b256 | - | timeout |" in md
    assert "| cuda | aggregate | 0.3000 |" in md


def test_summary_triton_warm_up_and_compiles_per_phase():
    """summary.md states what the warm-up compiled and how many kernels each phase added to the
    Triton cache (random figures)."""
    import random
    rng = random.Random()
    n = rng.randint(200, 600)
    done, skipped = rng.randint(10, n - 2), 2
    jit = {p: rng.randint(0, 400) for p in gr.PHASE_NAMES}
    phases = {p: {"status": "ok", "seconds": 1.0, "allowance_s": 2.0, "notes": [], "triton_kernels_compiled": jit[p]}
              for p in gr.PHASE_NAMES}
    wm = {"status": "ok", "jobs": 14, "deadline_s": 52, "specializations": n, "compiled": done, "skipped": skipped,
          "seconds": 37.4, "compile_s_sum": 231.0, "launcher_s_sum": 88.0, "launchers": True,
          "failed": ["aggregate C=80 bf16: RuntimeError: x"]}
    md = gr.render_summary(_report(phases=phases, build={"triton_warm": wm}))
    assert (f"Triton cache warmed before the tests (ok): {done} of {n} specialisations compiled in 37 s by 14 "
            f"processes (compile 231 s of CPU, launchers 88 s); 2 not started (past its 52 s); 1 failed: "
            f"aggregate C=80 bf16: RuntimeError: x") in md
    md = gr.render_summary(_report(phases=phases, build={"triton_warm": dict(wm, launchers=False, skipped=0)}))
    assert "(compile 231 s of CPU, launchers not built); 1 failed" in md
    assert ("Triton kernels compiled per phase (new .cubin files in the cache; build includes the warm-up): "
            + ", ".join(f"{p} {jit[p]}" for p in gr.PHASE_NAMES)) in md
    assert "Triton cache warmed" not in gr.render_summary(_report())


def test_cached_kernels_and_worker_counts(tmp_path, monkeypatch):
    """The per-phase count reads the cache the runs use (TRITON_CACHE_DIR, else ~/.triton/cache):
    one .cubin per compiled kernel; xdist and warm-up processes follow the CPUs."""
    import random
    k = random.randint(1, 9)
    for i in range(k):
        d = tmp_path / f"h{i}"
        d.mkdir()
        (d / "gma_x.cubin").write_bytes(b"x")
        (d / "gma_x.json").write_text("{}")
    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "__triton_launcher.so").write_bytes(b"x")
    assert gr.cached_kernels({"TRITON_CACHE_DIR": str(tmp_path)}) == k
    assert gr.cached_kernels({"TRITON_CACHE_DIR": str(tmp_path / "absent")}) == 0
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gr.triton_cache_dir({}) == tmp_path / ".triton" / "cache"
    for cpus, workers, jobs in ((2, 2, 2), (16, 8, 14), (64, 8, 62), (None, 2, 2)):
        monkeypatch.setattr(gr.os, "cpu_count", lambda: cpus)
        ctx = types.SimpleNamespace(args=types.SimpleNamespace(xdist_workers=0))
        assert gr.xdist_workers(ctx) == workers and gr.warm_jobs() == jobs
        ctx.args.xdist_workers = 3
        assert gr.xdist_workers(ctx) == 3


def test_validate_folder_catches_problems(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(_report()))
    (tmp_path / "summary.md").write_text("x")
    assert gr.validate_folder(tmp_path) == []
    for i in range(gr.MAX_FILES - 1):
        (tmp_path / f"extra{i}.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    bad = _report()
    del bad["meta"]["git_sha"]
    del bad["phases"]["sanitizer"]
    (tmp_path / "report.json").write_text(json.dumps(bad))
    problems = " | ".join(gr.validate_folder(tmp_path))
    for fragment in ("files >", "not flat", "bad name.txt", "meta lacks 'git_sha'", "phase 'sanitizer' not recorded"):
        assert fragment in problems, (fragment, problems)


def test_cap_file_keeps_head_and_tail(tmp_path):
    p = tmp_path / "log.txt"
    p.write_text("HEAD\n" + "x" * 100_000 + "\nTAIL\n")
    gr.cap_file(p, limit=10_000)
    text = p.read_text()
    assert p.stat().st_size <= 10_300 and text.startswith("HEAD") and text.rstrip().endswith("TAIL")
    assert "bytes cut" in text


# ------------------------------------------------------------------ ops.py formulas vs torch's FLOP counter
@pytest.mark.parametrize("C, H, W, B", [(80, 7, 9, 2), (200, 5, 11, 1), (480, 7, 7, 3)])
def test_ops_flop_formulas_match_torch_flop_counter(C, H, W, B):
    """ops.work()'s FLOPs = torch's count of the reference's convolutions and matrix products."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from gmf_kernels.numerics import default_hyper, random_gma_weights
    from gmf_kernels.reference import reference_pre_projection
    ops = load_script(REPO / "benchmarks" / "ops.py", "gmf_benchmark_ops")
    w = random_gma_weights(C, seed=0, dtype=torch.float32)
    hp = default_hyper(C)
    x = torch.randn(B, H * W, C)
    t = F.linear(x, w.qkv_weight, w.qkv_bias)
    with FlopCounterMode(display=False) as fc:
        reference_pre_projection(t, (H, W), w, hp)
    wk = ops.work(C, H, W, B, 4)
    assert wk["pre_projection"]["flops"] == fc.get_total_flops()
    assert wk["aggregate"]["flops"] + wk["attention"]["flops"] == fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        F.linear(F.linear(x, w.qkv_weight, w.qkv_bias)[..., :C], w.proj_weight, w.proj_bias)
    assert wk["linears"]["flops"] == fc.get_total_flops()


@pytest.mark.parametrize("C, H, W, B, dtype", [(80, 56, 56, 128, "bf16"), (320, 7, 7, 1, "fp32")])
def test_ops_split_forward_rows(C, H, W, B, dtype):
    """The split forward's two launches as ops.py names them: the profiler's gma_statistics_kernel is the
    row z_pass, and an aggregation that ran after it is counted with the bytes of the aggregation from Z:
    the Z pass's FLOPs plus the aggregation's are the fused aggregation's, its compulsory bytes are the
    Triton cost model's (less the filters), and summary.md says which aggregation a row timed."""
    from gmf_kernels.triton_kernels import costs
    ops = load_script(REPO / "benchmarks" / "ops.py", "gmf_benchmark_ops")
    m = ops._KERNEL_NAME.search("void gma_statistics_kernel<...>")
    assert ops._KERNEL_ROW.get(m.group(1), m.group(1)) == "z_pass" and "z_pass" in ops.KERNELS
    for name, row in (("gma_dense_z_kernel", "z_pass"), ("gma_dense_aggregate_kernel", "aggregate"),
                      ("gma_aggregate_kernel", "aggregate")):   # the fused forward's one kernel: the aggregation
        m = ops._KERNEL_NAME.search(name)
        assert m and ops._KERNEL_ROW.get(m.group(1), m.group(1)) == row, name
    e = 4 if dtype == "fp32" else 2
    wk = ops.work(C, H, W, B, e)
    assert wk["z_pass"]["flops"] + wk["aggregate_from_z"]["flops"] == wk["aggregate"]["flops"]
    z = costs.cost("z_pass", B, H, W, C, dtype)
    assert wk["z_pass"]["bytes"] == z.bytes - z.detail["weights"]
    split = costs.cost("aggregate", B, H, W, C, dtype, shape=costs.shape_for(C, dtype, (9, 0), {"SPLIT": 1}))
    d = split.detail
    assert wk["aggregate_from_z"]["bytes"] == d["qkv_read"] + d["z_read"] + d["qv_write"] + d["pre_write"]
    assert ops.work_key({"op": "aggregate", "after_z_pass": True}) == "aggregate_from_z"
    assert ops.work_key({"op": "aggregate"}) == "aggregate" and ops.work_key({"op": "z_pass"}) == "z_pass"
    row = dict(stage=0, C=C, H=H, W=W, B=B, dtype=dtype, impl="triton", status="ok", median_ms=1.0)
    rep = _report(kernels={"rows": [dict(row, op="z_pass"), dict(row, op="aggregate", after_z_pass=True),
                                    dict(row, op="attention")]})
    md = gr.render_summary(rep)
    assert "| triton | z_pass | 1.0000 |" in md and "| triton | aggregate (from Z) | 1.0000 |" in md


# ------------------------------------------------------------------ tests/conftest.py: no silent GPU skip
def test_skip_verdict_rules():
    from conftest import BUILD_COMMAND, skip_verdict
    missing = "CUDA module not built (python -m gmf_kernels.cuda build)"
    # a GPU machine: a GPU test may not skip for want of the module, GMF_REQUIRE_GPU or not
    msg = skip_verdict(missing, gpu_test=True, require=False, cuda_available=True)
    assert msg and BUILD_COMMAND in msg
    assert skip_verdict("cuda: CUDA extension not available: not built", True, False, True)
    # a CPU machine: GPU tests skip ... unless GMF_REQUIRE_GPU=1
    assert skip_verdict(missing, True, False, False) is None
    assert skip_verdict("needs a CUDA GPU", True, False, False) is None
    assert "GMF_REQUIRE_GPU=1" in skip_verdict("needs a CUDA GPU", True, True, False)
    assert skip_verdict("cuda: no CUDA device available (torch.cuda.is_available() is False)", False, True, False)
    assert skip_verdict("anything at all", True, True, True)  # a GPU test never skips under the flag
    # skips that are not about a GPU stand, with or without the flag
    for reason in ("checks behaviour without a GPU", "needs a machine without CUDA", "nvcc not found",
                   "cuda: device cpu not supported (supports ['cuda'])"):
        assert skip_verdict(reason, False, True, True) is None, reason
        assert skip_verdict(reason, False, False, True) is None, reason


GPU_TESTS = ["tests/test_cuda_build.py::test_gpu_matches_emulation",
             "tests/test_gpu_real_shapes.py::test_public_path_batch128"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-machine behaviour of GPU tests")
def test_gpu_tests_fail_under_require_gpu_on_cpu():
    """GMF_REQUIRE_GPU=1 on a CPU machine: the GPU tests (test_cuda_build.py's `needs_gpu` ones, auto-
    marked `gpu`, and test_gpu_real_shapes.py's) fail instead of skipping. (Without the flag they
    skip: the rest of the CPU suite runs them that way.)"""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"] + GPU_TESTS
    req = subprocess.run(cmd, cwd=REPO, env=_env(GMF_REQUIRE_GPU="1"), capture_output=True, text=True, timeout=600)
    out = req.stdout
    assert req.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "GMF_REQUIRE_GPU=1" in out and "skipped" not in last and "passed" not in last, out[-3000:]
    for test in GPU_TESTS:
        assert test in out, (test, out[-3000:])


def test_sanitize_driver_checks_results_on_cpu():
    """The compute-sanitizer driver's own logic (inputs, folding, the op or the training step, the float64
    checks), run on the CPU through the Triton interpreter: the first case of each mode, which must come out
    "ok" -- the forward pre-projection against float64, and a training step's output, input gradient, every
    parameter gradient and running statistic (38 tensors at these widths) norm-wise against float64."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", "sanitize", "--cpu", "--backends", "triton",
                           "--max-cases", "1"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p = gr.parse_sanitizer(proc.stdout)
    assert p["driver_completed"] and p["cases_ok"] == 2 and p["cases_failed"] == 0, p["cases"]
    ev, tr = p["cases"]
    assert ev["mode"] == "eval" and ev["max_rel_err"] < 1e-5
    assert tr["mode"] == "train" and tr["tensors"] == 38 and tr["norm_rel_err"] <= tr["bound"] < 0.1, tr
    assert [gr.sanitize_case(c)["mode"] for c in gr.SANITIZE_CASES].index("train") > max(
        i for i, c in enumerate(gr.SANITIZE_CASES) if gr.sanitize_case(c)["mode"] == "eval"), \
        "the training cases come after the forward's (a tool out of time has the forward's first)"
    assert {gr.sanitize_case(c)["backend"] for c in gr.SANITIZE_CASES if gr.sanitize_case(c)["mode"] == "train"} \
        == {"triton", "cuda"}


@pytest.mark.parametrize("tile,z_pass", [("split", "gma_statistics_kernel"), ("dense", "gma_dense_z_kernel")])
def test_sanitize_driver_split_case_runs_the_z_pass(monkeypatch, tile, z_pass):
    """The driver's Triton "split" / "dense" cases run the forward as the tune phase's SPLIT candidate / its ZDENSE
    form does: the Z pass (`gma_statistics_kernel` / `gma_dense_z_kernel`), then the aggregation from Z, combine
    and attention, and give the pre-projection within fp32's tolerance of float64 (the interpreter, in this
    process); any other Triton tile is refused."""
    import torch.nn.functional as F
    from gmf_kernels.folding import fold_eval
    from gmf_kernels.numerics import default_hyper, max_rel_error, random_gma_weights
    from gmf_kernels.reference import reference_group_mix_attention
    from gmf_kernels.triton_kernels import _launch
    launched = []
    real = _launch.wrap_triton
    monkeypatch.setattr(_launch, "wrap_triton",
                        lambda k: (launched.append(getattr(k, "__name__", None) or k.fn.__name__), real(k))[1])
    C, H, W, B = 80, 5, 7, 2
    w, hp = random_gma_weights(C, seed=1), default_hyper(C)
    x = torch.randn(B, H * W, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, ex = reference_group_mix_attention(x, (H, W), w, hp, return_intermediates=True)
    qkv = F.linear(x, w.qkv_weight, w.qkv_bias).float()
    ws = [t.contiguous() for t in fold_eval(w, hp, torch.float32)]
    shape = gr.triton_split_shape(qkv, H, W, dense=tile == "dense")
    assert shape.AGG_SPLIT and shape.AGG_ZDENSE == (tile == "dense")
    out = gr.pre_projection_call("triton", qkv, H, W, ws, hp, tile)()
    assert launched == [z_pass, "gma_aggregate_kernel", "gma_combine_kernel", "gma_attention_kernel"]
    assert max_rel_error(out, ex["pre_proj"]) < 1e-5
    with pytest.raises(ValueError, match="tile"):
        gr.pre_projection_call("triton", qkv, H, W, ws, hp, (4, 4))
    assert any(gr.sanitize_case(c)["tile"] == tile for c in gr.SANITIZE_CASES)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_stopped_step_takes_its_whole_process_group_down(tmp_path):
    """A step that runs out of time: SIGTERM to its process group, then SIGKILL to what is left of it
    even when the leader went at SIGTERM (a child that ignores SIGTERM, as a worker may, must not keep
    the CPU and the output pipe for the rest of the report)."""
    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child up', flush=True); "
             "time.sleep(120)")
    leader = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print('pid', c.pid, flush=True); time.sleep(120)")
    lines = []
    proc = gr.Proc([sys.executable, "-c", leader], dict(os.environ), lambda line, **k: lines.append(line), "")
    deadline = time.monotonic() + 60
    while "child up" not in lines and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(next(ln for ln in lines if ln.startswith("pid ")).split()[1])
    t0 = time.monotonic()
    res = proc.wait(0.5)
    assert res.timed_out and time.monotonic() - t0 < 20
    time.sleep(0.5)
    assert not _alive(pid), "the child that ignored SIGTERM outlived the stop"


def test_run_together_runs_its_steps_at_once(tmp_path):
    """run_together: the steps side by side (four 2 s sleeps end well before the 8 s of one after the
    other), each result by name, one past the shared deadline stopped."""
    ctx = types.SimpleNamespace(dry=False, tee=lambda *a, **k: None)
    sleep = [sys.executable, "-c", "import time; time.sleep(2); print('done')"]
    t0 = time.monotonic()
    res = gr.run_together(ctx, {f"s{i}": sleep for i in range(4)}, 30.0, dict(os.environ))
    assert time.monotonic() - t0 < 6 and all(r.rc == 0 and r.output == "done" for r in res.values()), res
    slow = gr.run_together(ctx, {"fast": sleep, "slow": [sys.executable, "-c", "import time; time.sleep(60)"]}, 3.0,
                           dict(os.environ))
    assert slow["fast"].rc == 0 and slow["slow"].timed_out


# ------------------------------------------------------------------ a lost CUDA context: quarantine and rerun
def _ctx(tmp_path, **kw):
    return types.SimpleNamespace(out=tmp_path, dry=False, tee=lambda *a, **k: None, quarantined={},
                                 report={"throughput_help": {"flags": ["--deadline", "--results-file"]}},
                                 tmp=tmp_path, args=types.SimpleNamespace(model="groupmixformer_s"), **kw)


def test_context_lost_marker_round_trip():
    ops = load_script(REPO / "benchmarks" / "ops.py", "gmf_benchmark_ops")
    assert gr.CONTEXT_LOST_MARKER == ops.CONTEXT_LOST_MARKER
    line = ops.context_lost_line("cuda", "CUDA error: an illegal memory access\nwas encountered", case=3)
    assert "\n" not in line
    got = gr.parse_context_lost("noise\n  " + line + "\nmore")
    assert got == {"impl": "cuda", "case": "3", "error": "CUDA error: an illegal memory access was encountered"}
    assert gr.parse_context_lost("nothing here") is None
    assert gr.sticky_cuda_error("E  RuntimeError: CUDA error: an illegal memory access was encountered\n") == \
        "E RuntimeError: CUDA error: an illegal memory access was encountered"
    assert gr.sticky_cuda_error("gmf_kernels.cuda: launching x failed: cudaErrorLaunchFailure (unspecified launch "
                                "failure)")
    assert gr.sticky_cuda_error("AssertionError: max rel error 3e-2 > 1e-3\nCUDA out of memory") is None


def test_without_backends():
    args = ["--model", "groupmixformer_s", "--compile-backends", "reference,torch,triton,cuda"]
    out = gr.without_backends(args, {"cuda"})
    assert out[out.index("--compile-backends") + 1] == "reference,torch,triton"
    assert out[out.index("--backends") + 1].split(",") == [b for b in gr_backend_names() if b != "cuda"]
    assert gr.without_backends(args, set()) == args
    out = gr.without_backends(["--backends", "cuda,triton,torch", "--compile-backends", "cuda"], {"cuda"})
    assert out == ["--backends", "triton,torch", "--no-torchcompile"]


def gr_backend_names():
    from gmf_kernels.backends import BACKEND_NAMES
    assert tuple(BACKEND_NAMES) == gr.GMA_BACKENDS   # the report's copy of the registry's names
    return list(BACKEND_NAMES)


def test_throughput_run_goes_on_without_the_backend_that_lost_the_context(tmp_path, monkeypatch):
    """A run that loses the CUDA context in a cuda+compile row is run again without cuda (its earlier
    attempt kept); cuda is then left out of every later run, which says so."""
    cmds = []
    rows = [dict(backend="reference", label="reference", status="ok", img_per_s=500.0)]

    def fake_run(ctx, cmd, timeout, prefix, **kw):
        cmds.append(cmd)
        Path(cmd[cmd.index("--results-file") + 1]).write_text(json.dumps({"meta": {}, "rows": rows}))
        out = "GMF_CUDA_CONTEXT_LOST impl=cuda+compile error=CUDA error: an illegal memory access" \
            if len(cmds) == 1 else "done"
        return gr.RunResult(cmd, 3 if len(cmds) == 1 else 0, out, 1.0)
    monkeypatch.setattr(gr, "run", fake_run)
    ctx = _ctx(tmp_path)
    section, ph = {"runs": []}, {"notes": []}
    args = ["--model", "groupmixformer_s", "--compile-backends", "reference,torch,triton,cuda"]
    gr._run_throughput(ctx, "bf16_b256", "t.json", args, 200.0, section, ph)
    assert len(cmds) == 2 and "--backends" not in cmds[0]
    assert "cuda" not in cmds[1][cmds[1].index("--backends") + 1].split(",")
    assert cmds[1][cmds[1].index("--compile-backends") + 1] == "reference,torch,triton"
    entry = section["runs"][0]
    assert entry["status"] == "ok" and len(entry["earlier_attempts"]) == 1 and "cuda" in entry["left_out"]
    assert "illegal memory access" in ctx.report["quarantined"]["cuda"]
    gr._run_throughput(ctx, "train", "u.json", ["--bench", "train"], 200.0, section, ph)   # a later run
    assert len(cmds) == 3 and "cuda" not in cmds[2][cmds[2].index("--backends") + 1].split(",")
    md = gr.render_summary(_report(quarantined=ctx.report["quarantined"]))
    assert "## Left out after a lost CUDA context" in md and "**cuda** was left out" in md


def test_no_rerun_without_time_or_for_a_yardstick(tmp_path, monkeypatch):
    cmds = []

    def fake_run(ctx, cmd, timeout, prefix, **kw):
        cmds.append(cmd)
        impl = "reference" if "ref" in str(cmd) else "triton"
        return gr.RunResult(cmd, 3, f"GMF_CUDA_CONTEXT_LOST impl={impl} error=misaligned address", 1.0)
    monkeypatch.setattr(gr, "run", fake_run)
    ctx, section, ph = _ctx(tmp_path), {"runs": []}, {"notes": []}
    gr._run_throughput(ctx, "a", "a.json", [], gr.RERUN_MIN_S - 5, section, ph)   # triton: no time to rerun
    assert len(cmds) == 1 and "triton" in ctx.quarantined and any("no time left" in n for n in ph["notes"])
    gr._run_throughput(ctx, "ref", "b.json", [], 300.0, section, ph)   # the reference cannot be left out
    assert len(cmds) == 2 and set(ctx.quarantined) == {"triton"}


def _is_triton(cmd) -> bool:
    text = " ".join(map(str, cmd))
    return "triton" in text and "not triton" not in text


def test_sticky_error_in_the_gpu_tests_quarantines_their_backend(tmp_path, monkeypatch):
    def fake_run(ctx, cmd, timeout, prefix, **kw):
        out = ("tests/test_gpu_real_shapes.py::test_a[triton] FAILED\nE   RuntimeError: Triton Error [CUDA]: an "
               "illegal memory access was encountered\n") if _is_triton(cmd) else "1 passed"
        return gr.RunResult(cmd, 1 if "illegal" in out else 0, out, 1.0)
    monkeypatch.setattr(gr, "run", fake_run)
    monkeypatch.setattr(gr, "_record_pytest", lambda ctx, name, res: {"status": "ok" if res.rc == 0 else "failed"})
    monkeypatch.setattr(gr, "_tests_env", lambda ctx: {})
    ctx, ph = _ctx(tmp_path), {"notes": []}
    ctx.report["meta"] = {}
    gr._run_pytest_specs(ctx, gr.pytest_runs("build", True) + gr.pytest_runs("tests", True),
                         time.monotonic() + 100, ph)
    assert set(ctx.quarantined) == {"triton"} and "illegal memory access" in ctx.quarantined["triton"]


def test_kernel_timing_goes_on_without_the_implementation_that_lost_the_context(tmp_path, monkeypatch):
    cmds = []

    def fake_run(ctx, cmd, timeout, prefix, **kw):
        cmds.append([str(c) for c in cmd])
        rows = tmp_path / "kernel_rows.jsonl"
        with open(rows, "a") as fh:
            fh.write(json.dumps(dict(kind="op", model="m", stage=0, B=1, dtype="bf16", op="pre_projection",
                                     impl="torch", status="ok", median_ms=float(len(cmds)))) + "\n")
        out = "GMF_CUDA_CONTEXT_LOST impl=cuda case=2 error=unspecified launch failure" if len(cmds) == 1 else ""
        return gr.RunResult(cmd, 3 if out else 0, out, 1.0)
    monkeypatch.setattr(gr, "run", fake_run)
    monkeypatch.setattr(gr, "_roofline", lambda ctx, rows_file, ph: None)
    ctx, ph = _ctx(tmp_path), {"notes": []}
    ctx.report["kernels"] = {}
    gr.phase_kernels(ctx, ph, 200.0)
    assert len(cmds) == 2
    second = cmds[1]
    assert second[second.index("--from-case") + 1] == "2" and second[second.index("--skip-impls") + 1] == "cuda"
    rows = ctx.report["kernels"]["rows"]
    assert len(rows) == 1 and rows[0]["median_ms"] == 2.0   # the case timed again: its last rows count
    assert "cuda" in ctx.quarantined


# ------------------------------------------------------------------ the report in two parts
def _args(*argv):
    return gr.resolve_args(gr.build_parser().parse_args(list(argv)))


def test_default_budget_splits_as_before():
    """Every phase at the default budget: each phase's share is PHASES' own seconds (the one-call report)."""
    args = _args()
    assert args.phases == gr.PHASE_NAMES and args.budget == gr.DEFAULT_BUDGET_S
    for p in gr.PHASES:
        assert gr.phase_budget(args, p) == pytest.approx(p.budget_s)


@pytest.mark.parametrize("part", sorted(gr.PARTS))
@pytest.mark.parametrize("budget", [None, 300.0])
def test_parts_split_their_whole_budget(part, budget):
    """--part record / speed: its phases only, and their shares add up to the part's whole budget
    (its default, or --budget): a part is not scaled as a slice of the 530 s one-call plan."""
    args = _args("--part", part, *(["--budget", str(budget)] if budget else []))
    want = budget or gr.PARTS[part]["budget"]
    assert args.phases == [p.name for p in gr.PHASES if p.name in gr.PARTS[part]["weights"]]
    assert args.budget == want
    chosen = [p for p in gr.PHASES if p.name in args.phases]
    assert sum(gr.phase_budget(args, p) for p in chosen) == pytest.approx(want)
    for p in chosen:
        assert gr.phase_budget(args, p) == pytest.approx(gr.PARTS[part]["weights"][p.name] * want
                                                         / sum(gr.PARTS[part]["weights"].values()))


@pytest.mark.parametrize("part", sorted(gr.PARTS))
def test_part_weights_are_seconds_at_the_default_budget(part):
    """Each part's weights add up to its default budget: the docs quote them as seconds."""
    assert sum(gr.PARTS[part]["weights"].values()) == gr.PARTS[part]["budget"]


def test_speed_part_times_the_judged_runs_before_kernel_timing():
    """At the budget a 15-minute lease leaves after the record call (~290 s), the judged runs (models, train)
    get their time and the kernel timing runs only on what env and tune leave (its own share timed no case)."""
    args = _args("--part", "speed", "--budget", "290")
    ph = {p.name: p for p in gr.PHASES}
    assert gr.phase_budget(args, ph["kernels"]) == 0
    assert gr.phase_budget(args, ph["train"]) >= ph["train"].min_s
    assert gr.phase_budget(args, ph["models"]) >= 120


def test_kernel_timing_too_short_to_time_a_case_is_skipped_with_its_reason(tmp_path):
    """Under KERNELS_MIN_S no worker starts (it would time nothing): the section says why, the phase is skipped."""
    args = _args("--part", "speed", "--budget", "290")
    ctx = gr.Ctx(args=args, out=tmp_path, tee=gr.Tee(None, quiet=True), dry=False, report={"kernels": {}}, env={},
                 t_start=0.0, deadline=1e12, tmp=tmp_path)
    ph = {"notes": [], "status": "ok"}
    gr.phase_kernels(ctx, ph, gr.KERNELS_MIN_S - 1)
    assert ctx.report["kernels"]["status"] == "skipped" and "time budget used up" in ctx.report["kernels"]["reason"]
    assert ph["status"] == "skipped" and ph["notes"]


def test_parts_cover_every_phase_once_but_env():
    """record + speed run every phase of the one-call report; only env (versions, the GPU) runs in both."""
    rec, spd = (set(gr.PARTS[k]["weights"]) for k in ("record", "speed"))
    assert rec | spd == set(gr.PHASE_NAMES) and rec & spd == {"env"}


def test_zero_weight_phases_picked_by_hand_get_time():
    """A phase of weight 0 in the one-call plan (ncu) named alone in --phases gets the budget, beside others
    EXPLICIT_ZERO_WEIGHT; within --part it runs on the others' leftovers, unless it is all that is selected."""
    ph = {p.name: p for p in gr.PHASES}
    assert gr.phase_budget(_args("--phases", "ncu", "--budget", "120"), ph["ncu"]) == pytest.approx(120)
    a = _args("--phases", "kernels,ncu", "--budget", "150")
    assert gr.phase_budget(a, ph["ncu"]) == pytest.approx(150 * 30 / 75)
    assert gr.phase_budget(_args("--part", "speed"), ph["paper"]) == 0
    assert gr.phase_budget(_args("--part", "speed", "--phases", "paper", "--budget", "60"), ph["paper"]) == 60


def test_condensed_rows_keep_their_profile():
    """report.json's throughput rows keep throughput.py's `profile` (summary.md's "Where the GPU time goes")."""
    prof = {"device": "cuda", "calls": 1, "total_ms": 1.0, "kinds": {"ours": 1.0}, "top": []}
    rows = gr.condense_throughput({"rows": [{"backend": "triton", "status": "ok", "profile": prof, "extra": 1}]})
    assert rows == [{"backend": "triton", "status": "ok", "profile": prof}]


def test_phases_subset_scales_to_the_budget():
    """An explicit --phases list gets the whole --budget in PHASES' proportions; an unknown phase is refused."""
    args = _args("--phases", "kernels,models", "--budget", "370")
    assert gr.phase_budget(args, gr.PHASES[gr.PHASE_NAMES.index("models")]) == pytest.approx(370 * 140 / 185)
    with pytest.raises(SystemExit):
        _args("--phases", "kernels,bogus")


def test_profile_summary_from_the_rows_profiles():
    """summary.md's "Where the GPU time goes": a row per profiled throughput row (device ms per call and
    the shares by kind of kernel), and the top kernels of the fused backends' and upstream's rows only."""
    prof = lambda kinds, top: {"device": "cuda", "calls": 2, "total_ms": 40.0, "kinds": kinds,  # noqa: E731
                               "top": [{"name": n, "kind": k, "ms": ms, "per_call": 1, "share": sh}
                                       for n, k, ms, sh in top]}
    rep = {"models": {"runs": [{"name": "bf16_b256", "rows": [
        {"backend": "triton", "label": "triton", "kind": "gmf", "median_ms": 50.0,
         "profile": prof({"ours": 0.6, "gemm": 0.4}, [("gma_aggregate_kernel", "ours", 20.0, 0.5)])},
        {"backend": "torch", "label": "torch", "kind": "gmf",
         "profile": prof({"gemm": 0.7, "elementwise / reduction / copy": 0.3}, [("sm90_xmma_gemm", "gemm", 28.0, 0.7)])},
        {"backend": "upstream", "label": "upstream (amp)", "kind": "upstream",
         "profile": prof({"gemm": 1.0}, [("nvjet_gemm", "gemm", 40.0, 1.0)])},
        {"backend": "cuda", "label": "cuda", "kind": "gmf", "profile": {"error": "boom"}},
        {"backend": "reference", "label": "reference", "kind": "gmf"}]}]},
        "train": {"runs": []}}
    L = "\n".join(gr._profile_summary(rep))
    assert "## Where the GPU time goes" in L
    assert "| bf16_b256 | triton | 40.00 | 50.00 | 80% | - | 40% | 60% |" in L
    assert "| bf16_b256 | torch | 40.00 | - | - | 30% | 70% | - |" in L
    assert "Top kernels, bf16_b256 triton" in L and "`gma_aggregate_kernel`" in L
    assert "Top kernels, bf16_b256 upstream (amp)" in L and "Top kernels, bf16_b256 torch" not in L
    assert "| bf16_b256 | cuda |" not in L and "| bf16_b256 | reference |" not in L
    assert gr._profile_summary({"models": {"runs": []}}) == []


def test_parse_ncu_raw_csv():
    """ncu --csv --page raw: a header of metric names, a row of units, a row per kernel -> the figures the
    summary shows (the duration in us whatever unit ncu chose) and the stall reasons, largest first;
    program output and ==PROF== lines around it are ignored; a missing metric is simply absent."""
    cols = ["ID", "Kernel Name", "Grid Size", "Block Size", "gpu__time_duration.sum",
            "sm__throughput.avg.pct_of_peak_sustained_elapsed", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
            "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
            "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
            "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
            "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio"]
    units = ["", "", "", "", "msecond", "%", "%", "%", "register/thread", "ratio", "ratio", "ratio"]
    rows = [["0", "gma_aggregate_kernel", "(8, 128, 1)", "(128, 1, 1)", "1.62", "12.5", "4.4", "18.2", "155",
             "9.5", "0.3", "1.1"],
            ["1", "gma_attention_kernel", "(8, 128, 1)", "(128, 1, 1)", "0.70", "20", "6", "30", "96", "2", "4", "1,000"]]
    q = lambda r: ",".join(f'"{c}"' for c in r)  # noqa: E731
    text = "\n".join(["==PROF== Connected to process 1", q(cols), q(units)] + [q(r) for r in rows]
                     + ["NCU_CALL {}", "==PROF== Disconnected"])
    ks = gr.parse_ncu_csv(text)
    assert [k["kernel"] for k in ks] == ["gma_aggregate_kernel", "gma_attention_kernel"]
    a = ks[0]
    assert a["duration_us"] == pytest.approx(1620.0) and a["sm_pct"] == 12.5 and a["dram_pct"] == 4.4
    assert a["achieved_occupancy_pct"] == 18.2 and a["registers"] == 155 and "memory_pct" not in a
    assert list(a["stalls"]) == ["long_scoreboard", "math_pipe_throttle", "barrier"]
    assert ks[1]["stalls"]["math_pipe_throttle"] == 1000.0 and list(ks[1]["stalls"])[0] == "math_pipe_throttle"
    assert gr.parse_ncu_csv("==PROF== nothing profiled") == []
    rep = {"ncu": {"status": "ok", "kernels": ks, "calls": [{"backend": "triton", "C": 80}]}}
    L = "\n".join(gr._ncu_summary(rep))
    assert "| `gma_aggregate_kernel` | (8, 128, 1) | (128, 1, 1) | 1620.0 | 12 | - | 4 | 18 / - | 155 |" in L
    assert "long_scoreboard 9.5, math_pipe_throttle 1.1, barrier 0.3" in L
    assert gr._ncu_summary({"ncu": {}}) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a GPU test that fails: on a GPU machine it passes")
def test_failures_are_printed_the_moment_they_happen():
    """Under GMF_REQUIRE_GPU=1 tests/conftest.py prints a failing test's id and its `E` lines at once
    (GMF_TEST_FAILURE): a run stopped by its time (xdist prints tracebacks only at the end) still names
    why each test failed, and `parse_pytest` takes the message from that line. End to end: a GPU test run
    on this CPU machine under GMF_REQUIRE_GPU=1 fails (a GPU test may not skip), its line printed."""
    from conftest import FAILURE_TAG, failure_line
    assert FAILURE_TAG == gr.FAILURE_TAG
    line = failure_line("tests/t.py::test_x[a]", "def f():\n>   assert 1 == 2\nE   assert 1 == 2\nE    +  where x\n")
    assert line == "GMF_TEST_FAILURE tests/t.py::test_x[a]\tassert 1 == 2 | + where x"
    spaced = failure_line("tests/t.py::test_y[qkv null]", "E   ValueError: bad")   # ids may hold spaces
    assert gr.parse_pytest(spaced)["failures"] == [{"id": "tests/t.py::test_y[qkv null]", "outcome": "failed",
                                                    "message": "ValueError: bad"}]
    cut = PYTEST_XDIST_CUT + "\n" + line + "\n"
    p = gr.parse_pytest(cut)
    f = {x["id"]: x for x in p["failures"]}
    assert f["tests/t.py::test_x[a]"]["message"] == "assert 1 == 2 | + where x"
    env = _env(GMF_REQUIRE_GPU="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/test_gpu_real_shapes.py", "-k", "deployment_guards and triton"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    parsed = gr.parse_pytest(proc.stdout)
    tagged = [x for x in parsed["failures"] if x["id"].endswith("deployment_guards[triton]")]
    assert tagged and "a GPU test may not skip" in tagged[0]["message"], proc.stdout[-2000:]


_STOP_HARNESS = """
import json, signal, sys, time, types
sys.path.insert(0, {bench!r})
import gpu_report as gr
out = {out!r}
ctx = types.SimpleNamespace(report={{"phases": {{"sanitizer": {{"status": "running", "notes": []}}}}}},
                            tee=lambda *a, **k: None)
gr.write_outputs = lambda c: open(out, "w").write(json.dumps(c.report))
step = gr.Proc(["sleep", "120"], None, ctx.tee, "[x] ", echo=False)
for sig in (signal.SIGTERM,):
    signal.signal(sig, gr.on_stop_signal(ctx))
print(step.p.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_stopped_report_takes_its_steps_with_it(tmp_path, how):
    """Each step runs in a session of its own, which a device machine's clean-up after a call passes over: when
    the report is stopped at the call's limit its steps must not run on into the next call. SIGTERM: the
    handler kills their process groups and writes what was measured (the running phase marked killed);
    SIGKILL: the steps get the parent-death signal (setpriv), where the machine has setpriv."""
    if how == "sigkill" and gr.SETPRIV is None:
        pytest.skip("no setpriv on this machine: the parent-death signal is not set")
    out = tmp_path / "report.json"
    harness = subprocess.Popen([sys.executable, "-c", _STOP_HARNESS.format(bench=str(REPO / "benchmarks"),
                                                                           out=str(out))],
                               stdout=subprocess.PIPE, text=True)
    step_pid = int(harness.stdout.readline())
    assert _alive(step_pid)
    harness.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    rc = harness.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(step_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(step_pid), "the step outlived the report"
    if how == "sigterm":
        assert rc == 128 + signal.SIGTERM
        ph = json.loads(out.read_text())["phases"]["sanitizer"]
        assert ph["status"] == "killed" and "1 step(s) killed" in ph["notes"][0]


def test_golden_vectors_carried_in_dot_upstream_are_found(tmp_path, monkeypatch):
    """DEVELOPERS.md carries the golden vectors to the device in .upstream/golden: the report finds them there
    (it ran the golden tests deselected, without a word, when GMF_GOLDEN_DIR was not set)."""
    root = tmp_path / "work" / "repo"
    (root / ".upstream" / "golden").mkdir(parents=True)
    monkeypatch.setattr(gr, "ROOT", root)
    monkeypatch.delenv("GMF_GOLDEN_DIR", raising=False)
    assert gr.golden_dir() == root / ".upstream" / "golden"
    monkeypatch.setenv("GMF_GOLDEN_DIR", "rel/golden")
    assert gr.golden_dir().is_absolute()


def test_git_sha_reaches_the_steps_records(monkeypatch):
    """A device machine gets the tree without .git: --git-sha reaches the steps as GMF_GIT_SHA, which tune.py's
    table (ops.git_sha) and throughput.py's results record (they said "unknown")."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ops
    monkeypatch.setenv("GMF_GIT_SHA", "0123abc")
    assert ops.git_sha() == "0123abc"
    assert 'env["GMF_GIT_SHA"] = sha' in inspect.getsource(gr)


def test_tf32x3_check_after_the_sanitizer(tmp_path):
    """The sanitizer phase ends with benchmarks/triton_tf32x3_repro.py when time is left (not the tests phase:
    there it took the slack the sanitizer would have had), after the sanitizer: its verdicts go to
    report.json's tests.tf32x3_repro and a line of summary.md (information only, no verdict depends on it);
    with too little time it is recorded as skipped. The script's output is parsed as the script prints it."""
    import types
    ctx = types.SimpleNamespace(dry=False, report={"tests": {}}, tee=lambda *a, **k: None)
    gr.tf32x3_check(ctx, time.monotonic() + 5)
    assert ctx.report["tests"]["tf32x3_repro"]["status"] == "skipped"
    out = json.dumps({"device": "cuda", "results": [{"S": 64, "precision": "tf32x3", "verdict": "fault",
                                                      "detail": "illegal address"}]})
    real_run = gr.run
    try:
        gr.run = lambda ctx, cmd, timeout, prefix, **k: gr.RunResult(cmd, 1, "S=64 ...\n" + out, 3.0)
        ctx = types.SimpleNamespace(dry=False, report={"tests": {}}, tee=lambda *a, **k: None)
        gr.tf32x3_check(ctx, time.monotonic() + 100)
    finally:
        gr.run = real_run
    rec = ctx.report["tests"]["tf32x3_repro"]
    assert rec["status"] == "ok" and rec["results"][0]["verdict"] == "fault"
    L = gr.render_summary(dict(ctx.report, tests=dict(ctx.report["tests"], runs=[{"name": "x", "status": "ok"}])))
    assert "Triton 3xTF32 check" in L and "S=64 tf32x3 fault" in L
    src = inspect.getsource(gr.phase_sanitizer)
    assert src.index("_sanitize(ctx") < src.index("tf32x3_check(ctx") and "tf32x3" not in inspect.getsource(
        gr.phase_tests)


def _tune_table(arch="sm_90"):
    """A table as benchmarks/tune.py writes it (its own set_entry): the aggregation at C=80 with the default
    tile, a faster one and a refused one; the attention at C=160 with its default refused."""
    tune = load_script(REPO / "benchmarks" / "tune.py", "gmf_benchmark_tune")
    table = {"arch": arch, "measured": True, "date": "2026-12-04T00:00:00", "kernels": {}, "backends": {},
             "candidates": {}, "not_measured": [{"part": "triton.aggregate", "C": 320, "dtype": "bf16",
                                                 "reason": "time budget used up"}]}
    agg = [{"config": {"BLOCK_P": 32, "num_warps": 4}, "status": "ok", "time_us": 900.0},
           {"config": {"BLOCK_P": 64, "num_warps": 4}, "status": "ok", "time_us": 600.0},
           {"config": {"BLOCK_P": 64, "num_warps": 8}, "status": "refused", "reason": "148 bytes of register spills"}]
    attn = [{"config": {"BLOCK_P": 64, "num_warps": 4}, "status": "error", "reason": "RuntimeError: x"},
            {"config": {"BLOCK_P": 32, "num_warps": 4}, "status": "ok", "time_us": 50.0}]
    tune.set_entry(table, "triton.aggregate", 80, torch.bfloat16, agg)
    tune.set_entry(table, "triton.attention", 160, torch.bfloat16, attn)
    return table


def test_tune_rows_default_against_fastest():
    rows = {(r["family"], r["C"]): r for r in gr.tune_rows(_tune_table())}
    a = rows[("triton.aggregate", 80)]
    assert a["dtype"] == "bfloat16" and a["candidates"] == 3 and a["refused"] == 1 and a["errors"] == 0
    assert a["default_us"] == 900.0 and a["best"] == {"BLOCK_P": 64, "num_warps": 4} and a["best_us"] == 600.0
    assert a["speedup"] == pytest.approx(1.5)
    t = rows[("triton.attention", 160)]
    assert t["default_us"] is None and t["speedup"] is None and t["best_us"] == 50.0 and t["errors"] == 1
    assert gr.tune_rows(None) == [] and gr.tune_rows({"candidates": {}}) == []


@pytest.mark.parametrize("outcome", ["table", "nothing"])
def test_tune_phase_puts_its_table_in_effect(tmp_path, monkeypatch, outcome):
    """The speed part's tune phase runs tune.py (the judged run's widths and dtype) into a directory seeded
    with the committed tables; when tune.py measured something every later step reads that directory
    (ctx.env GMF_TUNING_DIR) and summary.md lists default against fastest, for the tuned families only;
    when it did not, a seeded committed table is not taken for its result, the later steps keep the
    default tiles and the phase says so. The one-call plan gives it no share: skipped, with why."""
    committed = tmp_path / "committed"
    committed.mkdir()
    old = _tune_table()      # a committed table: it has candidates, but is not this run's result
    old["candidates"]["triton.aggregate"]["80"]["bfloat16"][0]["time_us"] = 950.0    # an older measurement
    old["candidates"]["triton.b1"] = {"80": {"bfloat16": [{"config": {"BLOCK_P": 8}, "status": "ok",
                                                          "time_us": 1.0}]}}
    (committed / "sm_90.json").write_text(json.dumps(old))
    monkeypatch.setattr(gr, "ROOT", tmp_path / "root")
    (tmp_path / "root" / "gmf_kernels" / "data").mkdir(parents=True)
    os.symlink(committed, tmp_path / "root" / "gmf_kernels" / "data" / "tuning")
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    warms = []   # the inductor cache warm-ups the phase starts: (name, GMF_TUNING_DIR of their env)
    monkeypatch.setattr(gr, "start_compile_warm", lambda ctx, name, env=None: warms.append(
        (name, (env or {}).get("GMF_TUNING_DIR"), len(seen))))

    def fake_run(ctx, cmd, timeout, prefix, **k):
        seen.append(cmd)
        table_dir = Path(cmd[cmd.index("--table-dir") + 1])
        assert (table_dir / "sm_90.json").is_file()           # seeded before tune.py runs
        if outcome == "table":
            time.sleep(0.01)
            if "--train" in cmd:   # the training tiles: b2 measured, b1 kept by tune.py from the seed
                new = json.loads((table_dir / "sm_90.json").read_text())
                new["candidates"]["triton.b2"] = {"160": {"float16": [
                    {"config": {"BLOCK_P": 64, "num_warps": 4}, "status": "ok", "time_us": 80.0},
                    {"config": {"BLOCK_P": 32, "num_warps": 4}, "status": "ok", "time_us": 40.0}]}}
                new["backends_train"] = {"80": {"float16": {"cuda": 900.0, "torch": 700.0, "batch": 128}}}
            else:
                new = _tune_table()
                new["candidates"]["triton.b1"] = old["candidates"]["triton.b1"]   # kept by tune.py from the seed
            (table_dir / "sm_90.json").write_text(json.dumps(new))
            (out / "tuning_sm_90.json").write_text(json.dumps(new))
            return gr.RunResult(cmd, 0, "wrote it", 30.0)
        return gr.RunResult(cmd, 1, "Traceback: boom", 3.0)
    monkeypatch.setattr(gr, "run", fake_run)
    ctx = _ctx(tmp_path, env={})
    ctx.out, ctx.args = out, _args("--part", "speed")
    ctx.report["tune"] = {}
    ph = {"notes": [], "status": "running"}
    gr.phase_tune(ctx, ph, 70.0)
    cmd = " ".join(map(str, seen[0]))
    assert ("tune.py --models s --dtype bf16 --families triton.aggregate triton.attention cuda.tiles backends "
            "--budget 25") in cmd and f"--out {out}" in cmd
    left = 70.0 - (30.0 if outcome == "table" else 3.0)     # the training tiles get what the forward's left
    cmd = " ".join(map(str, seen[1]))
    assert f"tune.py --train --models s --dtype fp16 --budget {left - 15:.0f}" in cmd and f"--out {out}" in cmd
    sec = ctx.report["tune"]
    assert sec["seeded"] == ["sm_90.json"]
    text = "\n".join(gr._tune_summary(ctx.report))
    assert "triton.b1" not in text
    assert {r["family"] for r in sec["rows"]} <= set(gr.TUNE_FAMILIES + gr.TUNE_TRAIN_FAMILIES)
    # the untuned rows' warm-up before tune.py, the Triton row's once the forward tiles are in the table
    # (with the directory the later phases read), before the training tiles
    assert warms == [("untuned", None, 0), ("tuned", str(tmp_path / "tuning") if outcome == "table" else None, 1)]
    if outcome == "table":
        assert sec["status"] == "ok" and sec["applied"] and sec["file"] == "tuning_sm_90.json"
        assert sec["train"]["status"] == "ok" and sec["train"]["seconds"] == 30.0
        assert ctx.env["GMF_TUNING_DIR"] == str(tmp_path / "tuning") and not ph["notes"]
        assert "| triton.aggregate | 80 | bfloat16 | BLOCK_P 32, num_warps 4 | 900.0 | BLOCK_P 64, num_warps 4 | " \
               "600.0 | 1.50x | 3 (1, 0) |" in text
        assert "| triton.b2 | 160 | float16 | BLOCK_P 64, num_warps 4 | 80.0 | BLOCK_P 32, num_warps 4 | " \
               "40.0 | 2.00x | 2 (0, 0) |" in text
        assert "the later phases ran with this table" in text and "not measured: triton.aggregate C=320" in text
        assert "then --train --models s --dtype fp16" in text and "training tiles" in text
        assert ("auto's ranking by one layer's training step (`backends_train`), C=80 float16, batch 128: "
                "torch 700.0 us, cuda 900.0 us") in text
    else:
        assert sec["status"] == "failed" and not sec["applied"] and "GMF_TUNING_DIR" not in ctx.env
        assert sec["rows"] == [] and sec["file"] is None and sec["train"]["status"] == "failed"
        assert "the later phases use the default tiles" in ph["notes"][0] and "boom" in sec["output_tail"]
        assert "the later phases ran with the default tiles" in text and "tune --train: failed" in ph["notes"][-1]
    # the forward's tiles took what was left: the training tiles skipped, with why
    n = len(seen)
    monkeypatch.setattr(gr, "run", lambda ctx, cmd, *a, **k: (seen.append(cmd), gr.RunResult(cmd, 0, "", 55.0))[1])
    ctx = _ctx(tmp_path, env={})
    ctx.out, ctx.args = out, _args("--part", "speed")
    ph = {"notes": [], "status": "running"}
    gr.phase_tune(ctx, ph, 70.0)
    assert len(seen) == n + 1 and ctx.report["tune"]["train"]["status"] == "skipped"
    assert "time budget" in ctx.report["tune"]["train"]["reason"]
    # too little time: skipped, with why
    ctx = _ctx(tmp_path, env={})
    ctx.args = _args("--part", "speed")
    ph = {"notes": [], "status": "running"}
    warms.clear()
    gr.phase_tune(ctx, ph, gr.TUNE_MIN_S - 1)
    assert ph["status"] == "skipped" and "time budget" in ctx.report["tune"]["reason"] and len(seen) == n + 1
    assert [w[:2] for w in warms] == [("untuned", None), ("tuned", None)]   # the committed tiles
    # the one-call plan: no share, not run however much time is left over
    ctx = _ctx(tmp_path, env={})
    ctx.args = _args()
    ph = {"notes": [], "status": "running"}
    gr.phase_tune(ctx, ph, 300.0)
    assert ph["status"] == "skipped" and "no share" in ctx.report["tune"]["reason"] and len(seen) == n + 1


def test_tune_train_families_are_the_training_kernels():
    """The families the tune phase reports for its training run are those tune.py --train sweeps."""
    from gmf_kernels.triton_kernels import tile_spaces, train_op  # noqa: F401  (every family registered)
    assert set(gr.TUNE_TRAIN_FAMILIES) == set(tile_spaces.families())
    assert "--train" in gr.TUNE_TRAIN_ARGS and not set(gr.TUNE_FAMILIES) & set(gr.TUNE_TRAIN_FAMILIES)


def test_record_part_warms_what_the_tune_phase_compiles():
    """The speed part's tune phase runs on the machine the record part warmed: every Triton variant its
    sweep loads (tune.py `warm_specs` of TUNE_ARGS' models, dtypes and Triton families, on an sm_90) is in
    the record part's warm-up (`specializations.report_specializations`), so none is compiled on one CPU
    inside the tune phase, nor any training candidate its ``tune.py --train`` run loads (fp16); nor any
    kernel of the sanitizer driver's training steps (SANITIZE_CASES' "train" cases: else their ~45 compiles
    each would fall in the driver's plain run), nor of its split-forward cases (tile "split" or "dense"). (In a subprocess: the specialisations are derived with
    TRITON_INTERPRET unset, as on a GPU.)"""
    from gmf_kernels.triton_kernels import specializations as S
    from helpers import triton_compile_env
    args = dict(zip(gr.TUNE_ARGS[0::2], gr.TUNE_ARGS[1::2]))
    assert args["--models"] == "s" and args["--dtype"] == "bf16"
    train_args = dict(zip(gr.TUNE_TRAIN_ARGS[1::2], gr.TUNE_TRAIN_ARGS[2::2]))
    assert gr.TUNE_TRAIN_ARGS[0] == "--train" and train_args == {"--models": "s", "--dtype": "fp16"}
    triton_families = [f for f in gr.TUNE_FAMILIES if f.startswith("triton.")]
    assert tuple(triton_families) == S.REPORT_TUNE_FAMILIES
    train_cases = [(c["C"], c["H"], c["W"], c["B"], c["dtype"]) for c in map(gr.sanitize_case, gr.SANITIZE_CASES)
                   if c["mode"] == "train"]
    split_cases = [(c["C"], c["H"], c["W"], c["B"], c["dtype"], c["tile"] == "dense")
                   for c in map(gr.sanitize_case, gr.SANITIZE_CASES) if c["tile"] in ("split", "dense")]
    assert split_cases and any(c[-1] for c in split_cases)
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO / "benchmarks")!r})
import tune
from gmf_kernels.triton_kernels import specializations as S
shapes = tune.shapes(["groupmixformer_s"])
swept = tune.warm_specs({triton_families!r}, shapes, [torch.bfloat16], 128, (9, 0))
swept_train = tune.warm_specs({list(gr.TUNE_TRAIN_FAMILIES)!r}, shapes, [torch.float16], 128, (9, 0))
warmed = {{sp.key for sp in S.report_specializations(90)}}
sanitized = [sp for c in {train_cases!r} for sp in S.training_specializations_of_call(S.Call(*c), 90)]
from gmf_kernels.triton_kernels import launcher as L
for *c, dense in {split_cases!r}:
    call = S.Call(*c)
    cand = next(x for x in L.aggregate_candidates(call.C, call.torch_dtype(), (9, 0))
                if x.get("SPLIT") and bool(x.get("ZDENSE")) == dense)
    sanitized += S._candidate_specs("triton.aggregate", call, 90, cand)
print(json.dumps({{"swept": len(swept), "unrolled": sum("unrolled" in sp.label() for sp in swept),
                  "swept_train": len(swept_train), "sanitized": len(sanitized),
                  "missing": [sp.label() for sp in swept + swept_train + sanitized if sp.key not in warmed]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=triton_compile_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["swept"] > 20 and got["unrolled"] > 0 and got["swept_train"] > 50 and got["missing"] == [], got
    assert got["sanitized"] >= 60 * len(train_cases) > 0, got


def test_summary_lists_the_rows_warnings():
    """A row whose first call warned (throughput.py `record_warnings`: e.g. a fused backend training on
    PyTorch ops) is listed under its section's table with its warnings; rows without none."""
    fallback = "FallbackWarning: gmf_kernels cuda backend: training statistics and backward run as PyTorch ops"
    rows = [dict(backend="cuda", label="cuda", kind="gmf", status="ok", img_per_s=1.0, check="ok",
                 warnings=[fallback]),
            dict(backend="triton", label="triton", kind="gmf", status="ok", img_per_s=2.0, check="ok")]
    md = gr.render_summary(_report(train={"runs": [{"name": gr.TRAIN_RUN[0], "status": "ok", "rows": rows}]}))
    lines = md.splitlines()
    i = lines.index("Warnings raised by a row's first call (each reason once per process: its first row):")
    assert lines[i + 2] == f"- {gr.TRAIN_RUN[0]} cuda: {fallback}"
    assert not any(ln.startswith(f"- {gr.TRAIN_RUN[0]} triton:") for ln in lines)
    assert "Warnings raised" not in gr.render_summary(_report(train={"runs": [
        {"name": gr.TRAIN_RUN[0], "status": "ok", "rows": rows[1:]}]}))


# ------------------------------------------------------------------ the inductor cache warm-up
def _warm_ctx(tmp_path, upstream):
    ctx = _upstream_ctx(tmp_path, {"checked": True, "use": bool(upstream), "path": upstream})
    ctx.tmp, ctx.t_start, ctx.deadline = tmp_path, time.monotonic(), time.monotonic() + 1000.0
    return ctx


@pytest.mark.parametrize("upstream", [None, "/clones/GroupMixFormer"])
def test_compile_warm_commands_are_the_judged_runs(tmp_path, upstream):
    """Each warm-up is throughput.py with the judged run's own arguments (the same graphs, so the same cache
    keys), --compile-backends cut to its rows, and --compile-only; a quarantined backend is left out; every
    compiled row of the judged run is in exactly one warm-up."""
    ctx = _warm_ctx(tmp_path, upstream)
    judged = next(a for n, _, a, _ in gr.model_runs(upstream) if n == gr.UPSTREAM_RUN)
    i = judged.index("--compile-backends")
    compiled = judged[i + 1].split(",")
    assert "--no-optimized" not in judged     # the judged run has the optimized row (on by default on a GPU)
    got = {}
    for name in gr.COMPILE_WARMS:
        cmd = gr.compile_warm_cmd(ctx, name, 200.4)
        assert cmd[:2] == [sys.executable, str(gr.THROUGHPUT)]
        args = cmd[2:]
        got[name] = args[i + 1].split(",")
        assert args[:i] + args[i + 2:len(judged)] == judged[:i] + judged[i + 2:]
        optimized = [] if "optimized" in gr.COMPILE_WARMS[name] else ["--no-optimized"]
        assert args[len(judged):] == optimized + ["--compile-only", "--deadline", "200", "--results-file",
                                                  str(tmp_path / f"compile_warm_{name}.json")]
    # the Triton and the optimized rows (auto's choice) once tuned; every compiled row in exactly one
    assert got["tuned"] == ["triton"] and "optimized" in gr.COMPILE_WARMS["tuned"]
    assert sorted(got["untuned"] + got["tuned"]) == sorted(compiled)
    ctx.quarantined["cuda"] = "lost its context"
    cmd = gr.compile_warm_cmd(ctx, "untuned", 100)
    assert "cuda" not in cmd[cmd.index("--compile-backends") + 1].split(",")
    ctx.quarantined["triton"] = "lost its context"
    assert gr.compile_warm_cmd(ctx, "tuned", 100) is None


WARM_ROWS = [{"backend": "torch+compile", "status": "compiled", "compile_s": 41.5, "graphs": 1,
              "inductor_cache": {"fxgraph_cache_miss": 1, "fxgraph_cache_hit": 0}, "img_per_s": None},
             {"backend": "cuda", "status": "unavailable", "reason": "no module"},
             {"backend": "optimized", "status": "deadline", "reason": "not run: --deadline 9 s reached"}]


def test_compile_warms_run_once_in_the_background_and_are_recorded(tmp_path, monkeypatch):
    """A warm-up starts once per report, in the background, with inductor's compile processes capped; the
    Triton row's with the tune table's directory; the models phase records where they stand; at the end
    one that finished is read back (its compiled rows), one still running is stopped and says so."""
    started = []

    def background(ctx, cmd, env, prefix):
        started.append((cmd, env))
        results = cmd[cmd.index("--results-file") + 1]
        body = (f"import json; json.dump({{'rows': {WARM_ROWS!r}}}, open({str(results)!r}, 'w'))"
                if "triton" not in cmd else "import time; time.sleep(120)")
        return gr.Proc([sys.executable, "-c", body], dict(os.environ), ctx.tee, prefix, echo=False)
    monkeypatch.setattr(gr, "_background", background)
    ctx = _warm_ctx(tmp_path, "/clones/GroupMixFormer")
    gr.start_compile_warm(ctx, "untuned")
    gr.start_compile_warm(ctx, "untuned")
    gr.start_compile_warm(ctx, "tuned", env={"GMF_TUNING_DIR": "/t"})
    assert len(started) == 2
    (cmd, env), (cmd_t, env_t) = started
    assert "--compile-only" in cmd and env["TORCHINDUCTOR_COMPILE_THREADS"] == str(gr.compile_warm_threads())
    assert "GMF_TUNING_DIR" not in env and env_t["GMF_TUNING_DIR"] == "/t"
    ctx.compile_warms["untuned"].p.wait(60)
    assert gr.compile_warm_states(ctx) == {"untuned": "done", "tuned": "running"}
    gr.finish_compile_warms(ctx)
    w = ctx.report["compile_warm"]
    assert w["untuned"]["status"] == "ok" and w["untuned"]["tuning_dir"] is None
    assert w["untuned"]["rows"] == [{k: v for k, v in WARM_ROWS[0].items() if k != "img_per_s"}, WARM_ROWS[2]]
    assert w["tuned"]["status"] == "stopped (the part ended)" and w["tuned"]["rows"] == []
    assert w["tuned"]["tuning_dir"] == "/t"
    assert all(p is None for p in ctx.compile_warms.values())
    gr.start_compile_warm(ctx, "tuned")   # once per report, also after it ended
    assert len(started) == 2
    # too little of the part left: not started, with why
    ctx2 = _warm_ctx(tmp_path, None)
    ctx2.deadline = time.monotonic() + 20
    gr.start_compile_warm(ctx2, "untuned")
    assert ctx2.report["compile_warm"]["untuned"]["status"] == "not run" and len(started) == 2
    assert "time budget" in ctx2.report["compile_warm"]["untuned"]["reason"]
    # summary.md: what each compiled, and the compile column says which timed row found its graph
    rep = _report(compile_warm=w, models={"compile_warm_at_start": {"untuned": "done", "tuned": "running"}, "runs": [
        {"name": "bf16_b256", "status": "ok", "rows": [
            {"backend": "torch+compile", "label": "torch+compile (inductor)", "status": "ok", "compile_s": 9.6,
             "inductor_cache": {"fxgraph_cache_hit": 1, "fxgraph_cache_miss": 0}},
            {"backend": "triton+compile", "label": "triton+compile (inductor)", "status": "ok", "compile_s": 70.2,
             "inductor_cache": {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 1}}]}]})
    md = gr.render_summary(rep)
    assert "| 10 (cache hit) |" in md and "| 70 (cold) |" in md
    assert "- untuned (upstream, reference, cuda, torch): ok after" in md
    assert "torch+compile compiled in 42 s (cold); optimized deadline" in md
    assert "- tuned (triton, optimized): stopped (the part ended)" in md
    assert "- when the models phase started: untuned done, tuned running" in md
    # the record part (no models phase): what its warm-up compiled is still listed
    md = gr.render_summary(_report(compile_warm={"untuned": w["untuned"]}))
    assert "- untuned (upstream, reference, cuda, torch): ok after" in md and "Inductor cache warm-up" in md


def test_a_real_run_without_a_gpu_is_refused(monkeypatch, tmp_path):
    """Without --dry-run on a machine with no GPU (no CUDA device, no nvidia-smi) the report stops at once,
    pointing at --dry-run, instead of starting a CUDA build and GPU test runs into a results folder."""
    monkeypatch.setattr(gr, "_any_gpu", lambda: False)
    monkeypatch.setattr(gr, "run_report", lambda args: pytest.fail("started a report without a GPU"))
    with pytest.raises(SystemExit, match="no GPU here.*--dry-run"):
        gr.main(["--out", str(tmp_path / "r")])
