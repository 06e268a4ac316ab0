"""benchmarks/triton_tf32x3_repro.py (the minimal kernel behind `config.DOT_OVERRIDES`) under Triton's
interpreter: the script's own logic -- every case right, a case whose child process fails reported as a
fault. What it says of the GPU compiler needs a GPU (`--device cuda`)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "triton_tf32x3_repro.py"


def _load():
    spec = importlib.util.spec_from_file_location("gmf_tf32x3_repro", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_case_right_under_the_interpreter():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    mod = _load()
    assert [(r["S"], r["precision"]) for r in res] == mod.CASES
    assert {r["verdict"] for r in res} == {"right"}
    # the overridden kernels' S_PAD is among the cases
    from gmf_kernels.triton_kernels.config import DOT_OVERRIDES
    assert {(p, s) for (_k, p, s) in DOT_OVERRIDES} <= {(p, s) for s, p in mod.CASES}


def test_a_failing_case_is_a_fault():
    r = _load().run_case(64, "no-such-precision", "cpu")
    assert r["verdict"] == "fault" and r["detail"]
