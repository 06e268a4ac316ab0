"""Where `auto` picks the fused backends on a GPU: gmf_kernels/data/gpu_verified.json (gmf_kernels/verified.py).

* every entry of the packaged table has its evidence committed: the GPU report folder it names, whose
  report.json, re-judged by benchmarks/gpu_report.py's `verification_verdicts`, qualifies that backend on
  that architecture (same device and git sha); the check itself is shown to refuse missing or failing
  evidence;
* dispatch reads the table per architecture: listed -> `auto` may pick the backend there; another
  architecture, or an unknown one -> refused with the reason naming both; an explicit choice or
  GMF_AUTO_UNVERIFIED=1 runs it anyway; `python -m gmf_kernels.info` says where it is verified;
* the report's verdict: a complete, clean report qualifies both fused backends; each kind of missing or
  failing evidence is named; summary.md prints the entry to add, or why not.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from gmf_kernels import verified
from gmf_kernels.backends import BACKEND_NAMES, GMAProblem, get_backend
from helpers import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_report.py"


gr = load_script(SCRIPT, "gmf_gpu_report")  # the module tests/test_gpu_report.py loads
FUSED = [n for n in BACKEND_NAMES if get_backend(n).needs_gpu_verification]


def evidence_problems(table: Dict, root: Path) -> List[str]:
    """What is wrong with a verification table's evidence: each entry's report folder (relative to
    `root`) must hold a report.json of the same device and git sha that qualifies the backend there."""
    problems = []
    for backend, archs in verified.check_table(table).items():
        if backend not in FUSED:
            problems.append(f"{backend}: not a backend that needs GPU verification ({FUSED})")
            continue
        for arch, entry in archs.items():
            where = f"{backend} {arch}"
            path = root / entry["report"] / "report.json"
            if not path.is_file():
                problems.append(f"{where}: no {path.relative_to(root)}")
                continue
            rep = json.loads(path.read_text())
            v = gr.verification_verdicts(rep)[backend]
            meta = rep.get("meta", {})
            if v["arch"] != arch:
                problems.append(f"{where}: the report ran on {v['arch']}")
            if not v["qualifies"]:
                problems.append(f"{where}: the report does not qualify it: {v['reasons']}")
            for k in ("device_name", "git_sha"):
                if entry[k] != meta.get(k):
                    problems.append(f"{where}: {k} {entry[k]!r} is not the report's {meta.get(k)!r}")
    return problems


# ------------------------------------------------------------------ a complete, clean report (synthetic)
def good_report(capability=(9, 0)) -> Dict:
    meta = {"device_name": "NVIDIA H200", "capability": list(capability), "git_sha": "abc1234",
            "date": "2026-12-10T10:00:00+00:00"}
    runs = [{"name": n, "status": "ok", "counts": {"passed": 40, "failed": 0, "error": 0, "skipped": 0}}
            for names in gr.VERIFY_TESTS.values() for n in names]
    cases = [{"backend": b, "dtype": "bf16", "status": "ok"} for b in FUSED for _ in range(3)]
    tools = {t: {"status": "clean", "errors": 0, "driver_completed": True, "cases": copy.deepcopy(cases)}
             for t in gr.SANITIZER_TOOLS}
    rows = [{"backend": b, "status": "ok", "check": "ok"} for b in FUSED + [f"{b}+compile" for b in FUSED]]
    return {"schema_version": gr.SCHEMA_VERSION, "dry_run": False, "meta": meta, "tests": {"runs": runs},
            "sanitizer": {"tools": tools}, "models": {"runs": [{"name": gr.UPSTREAM_RUN, "rows": rows}]},
            "train": {"runs": [{"name": gr.TRAIN_RUN[0], "rows": copy.deepcopy(rows)}]}}


def _table(entries: Dict) -> Dict:
    return {"schema_version": verified.SCHEMA_VERSION, "about": "test", "verified": entries}


def _entry(report: str, rep: Dict) -> Dict:
    return {"report": report, "device_name": rep["meta"]["device_name"], "git_sha": rep["meta"]["git_sha"],
            "date": "2026-12-10"}


# ------------------------------------------------------------------ the packaged table and its evidence
def test_packaged_table_has_its_evidence():
    table = json.loads(verified.TABLE_PATH.read_text())
    assert evidence_problems(table, REPO) == []
    assert set(verified.table()) <= set(FUSED)
    assert {"cuda", "triton"} <= set(FUSED) and "torch" not in FUSED and "reference" not in FUSED


def test_evidence_check_refuses_missing_or_failing_reports(tmp_path):
    rep = good_report()
    folder = tmp_path / "benchmarks" / "results" / "gpu_report_h200"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(rep))
    rel = str(folder.relative_to(tmp_path))
    ok = _table({b: {"sm_90": _entry(rel, rep)} for b in FUSED})
    assert evidence_problems(ok, tmp_path) == []
    # another architecture than the report's, another sha, a folder that is not there, a backend that needs none
    bad = _table({"triton": {"sm_80": _entry(rel, rep)},
                  "cuda": {"sm_90": dict(_entry(rel, rep), git_sha="fff0000")},
                  "torch": {"sm_90": _entry(rel, rep)}})
    problems = evidence_problems(bad, tmp_path)
    assert any(p.startswith("triton sm_80: the report ran on sm_90") for p in problems), problems
    assert any(p.startswith("cuda sm_90: git_sha 'fff0000'") for p in problems), problems
    assert any(p.startswith("torch: not a backend") for p in problems), problems
    missing = _table({"triton": {"sm_90": _entry(gr.REPORT_PLACEHOLDER, rep)}})
    assert evidence_problems(missing, tmp_path)[0].startswith("triton sm_90: no ")
    # the report itself fails: a test failed
    rep["tests"]["runs"][0]["counts"]["failed"] = 1
    (folder / "report.json").write_text(json.dumps(rep))
    failing = [b for b in FUSED if gr.VERIFY_TESTS[b][0] == rep["tests"]["runs"][0]["name"]]
    assert [p.split(":")[0] for p in evidence_problems(ok, tmp_path)] == [f"{b} sm_90" for b in failing]


@pytest.mark.parametrize("bad, match", [
    ({"schema_version": 2, "verified": {}}, "schema_version 1"),
    ({"schema_version": 1}, "'verified' mapping"),
    ({"schema_version": 1, "verified": {"triton": {"90": {}}}}, "not an architecture"),
    ({"schema_version": 1, "verified": {"triton": {"sm_90": {"report": "x"}}}}, "lacks"),
])
def test_malformed_tables_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        verified.check_table(bad)


# ------------------------------------------------------------------ dispatch per architecture
@pytest.fixture
def table_with_triton_on_sm90(tmp_path, monkeypatch):
    path = tmp_path / "gpu_verified.json"
    path.write_text(json.dumps(_table({"triton": {"sm_90": _entry("benchmarks/results/x", good_report())}})))
    monkeypatch.setenv("GMF_GPU_VERIFIED", str(path))
    monkeypatch.delenv("GMF_AUTO_UNVERIFIED", raising=False)
    verified.clear_cache()
    yield path
    verified.clear_cache()


def _problem(capability, explicit=False):
    return GMAProblem(B=2, H=7, W=7, dim=80, num_heads=8, dtype=torch.bfloat16, device_type="cuda", training=False,
                      needs_grad=False, explicit=explicit, device_capability=capability)


def _unverified(backend, capability, explicit=False):
    return [r for r in get_backend(backend).not_supported_reasons(_problem(capability, explicit))
            if "not yet verified" in r]


def test_auto_follows_the_table_per_architecture(table_with_triton_on_sm90, monkeypatch):
    assert verified.archs("triton") == ["sm_90"] and verified.archs("cuda") == []
    assert _unverified("triton", (9, 0)) == []
    assert get_backend("triton").verified_on((9, 0)) and not get_backend("triton").verified_on((8, 0))
    for cap, arch in (((8, 0), "sm_80"), (None, "unknown")):
        (why,) = _unverified("triton", cap)
        assert arch in why and "lists sm_90 for it" in why, why
    (why,) = _unverified("cuda", (9, 0))
    assert "sm_90" in why and "lists no architecture" in why, why
    for name in ("torch", "reference"):  # nothing to verify
        assert get_backend(name).verified_on((8, 0)) and _unverified(name, (8, 0)) == []
    assert _unverified("triton", (8, 0), explicit=True) == []  # named: always runs
    monkeypatch.setenv("GMF_AUTO_UNVERIFIED", "1")
    assert _unverified("cuda", (8, 0)) == []


def test_info_says_where_each_backend_is_verified(table_with_triton_on_sm90):
    env = dict(__import__("os").environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "gmf_kernels.info"], capture_output=True, text=True, timeout=120,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    assert "verified on sm_90 ('auto' skips it on other GPUs)" in rows["triton"], rows["triton"]
    assert "not yet verified on a GPU" in rows["cuda"], rows["cuda"]


# ------------------------------------------------------------------ the report's verdict
def _break(rep: Dict, how: str) -> str:
    """Spoil one piece of a good report's evidence; -> the text the verdict's reason must hold."""
    if how == "dry_run":
        rep["dry_run"] = True
        return "a dry run"
    if how == "no_capability":
        rep["meta"].pop("capability")
        return "no GPU architecture"
    if how == "test_timeout":
        rep["tests"]["runs"][0]["status"] = "timeout"
        return f"GPU tests {rep['tests']['runs'][0]['name']}: timeout"
    if how == "test_failed":
        rep["tests"]["runs"][0].update(status="failed", counts={"passed": 3, "failed": 2, "error": 0})
        return "2 failed, 0 errors"
    if how == "test_missing":
        name = rep["tests"]["runs"].pop(0)["name"]
        return f"GPU tests {name}: not run"
    if how == "sanitizer_errors":
        rep["sanitizer"]["tools"]["racecheck"]["status"] = "errors"
        return "compute-sanitizer racecheck: errors"
    if how == "sanitizer_skipped":
        rep["sanitizer"]["tools"]["initcheck"] = {"status": "skipped", "reason": "time budget used up"}
        return "compute-sanitizer initcheck: skipped"
    if how == "sanitizer_case_wrong":
        for c in rep["sanitizer"]["tools"]["memcheck"]["cases"]:
            c["status"] = "wrong"
        return "compute-sanitizer memcheck: 3 of 3"
    if how == "model_check_failed":
        rep["train"]["runs"][0]["rows"][-1]["check"] = "FAIL (> 5e-02)"
        return "check FAIL (> 5e-02)"
    raise AssertionError(how)


HOW = ["dry_run", "no_capability", "test_timeout", "test_failed", "test_missing", "sanitizer_errors",
       "sanitizer_skipped", "sanitizer_case_wrong", "model_check_failed"]


def test_a_clean_report_qualifies_every_fused_backend():
    rep = good_report()
    verdicts = gr.verification_verdicts(rep)
    assert sorted(verdicts) == sorted(FUSED) == sorted(gr.VERIFY_TESTS)
    for b, v in verdicts.items():
        assert v["qualifies"] and v["reasons"] == [] and v["arch"] == "sm_90", (b, v)
        assert v["entry"] == {"report": gr.REPORT_PLACEHOLDER, "device_name": "NVIDIA H200", "git_sha": "abc1234",
                              "date": "2026-12-10"}
    md = "\n".join(gr._verification_summary(rep))
    for b in FUSED:
        assert f"**{b} qualifies on sm_90**" in md and f"`verified.{b}.sm_90`" in md
        assert json.dumps(verdicts[b]["entry"]) in md


@pytest.mark.parametrize("how", HOW)
def test_each_missing_or_failing_evidence_is_named(how):
    rep = good_report()
    text = _break(rep, how)
    verdicts = gr.verification_verdicts(rep)
    hit = [b for b, v in verdicts.items() if any(text in w for w in v["reasons"])]
    assert hit, (how, verdicts)
    for b, v in verdicts.items():
        assert v["qualifies"] == (b not in hit), (how, b, v)
    md = gr.render_summary({**rep, "phases": {}, "files": []})
    for b in hit:
        assert f"- {b} on " in md and "does not qualify" in md and text in md, md[-3000:]
