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


def test_no_gpu_is_not_a_fault(monkeypatch, capsys):
    """--device cuda without a CUDA device says so and exits 2, instead of a "fault" per case (the
    verdict for the compiler bug it looks for)."""
    import torch
    mod = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mod, "run_case", lambda *a: pytest.fail("ran a case without a GPU"))
    assert mod.main(["--device", "cuda"]) == 2
    assert "no CUDA device here" in capsys.readouterr().out


# ---------------------------------------------------------------- the AOT compiles' check for the pattern
#: TTIR as Triton 3.6 prints gma_pw_backward_kernel's two dots (sm_90, fp32): dz^T is the right operand of the
#: first and the left of the second; `S` is its padded channel count
_PW_BACKWARD_TTIR = """
%out = tt.dot %pwT_22, %dzT_44, %cst_2, inputPrecision = {p} : tensor<16x{S}xf32> * tensor<{S}x16xf32> -> tensor<16x16xf32> loc(#loc168)
%acc_56 = tt.trans %yT_55 {{order = array<i32: 1, 0>}} : tensor<16x16xf32> -> tensor<16x16xf32> loc(#loc151)
%out_57 = tt.dot %dzT_44, %acc_56, %acc, inputPrecision = {p} : tensor<{S}x16xf32> * tensor<16x16xf32> -> tensor<{S}x16xf32> loc(#loc169)
"""


@pytest.mark.parametrize("S, precision, dual, flagged", [(64, "tf32x3", True, True), (32, "tf32x3", True, False),
                                                          (128, "tf32x3", True, False), (64, "tf32", False, False)])
def test_dual_operand_scan_of_the_pw_backward_pattern(S, precision, dual, flagged):
    """`specializations.tf32x3_dual_operands` finds a value two 3xTF32 dots take as left and right operand;
    `known_miscompile` flags it at a dimension of `config.TF32X3_DUAL_OPERAND_DIMS` (64) only."""
    from gmf_kernels.triton_kernels.specializations import known_miscompile, tf32x3_dual_operands
    found = tf32x3_dual_operands(_PW_BACKWARD_TTIR.format(S=S, p=precision))
    assert found == ([f"tensor<{S}x16xf32>"] if dual else [])
    assert bool(known_miscompile(found)) == flagged
    if flagged:
        assert "DOT_OVERRIDES" in known_miscompile(found)


def test_dual_operand_scan_positions():
    """Same-position sharing (the forward's sibling dots: one weight tile the right operand of several dots)
    is not the pattern; a transposed use counts as the other position; non-3xTF32 dots are not scanned."""
    from gmf_kernels.triton_kernels.specializations import tf32x3_dual_operands
    dot = "%{o} = tt.dot %{a}, %{b}, %c, inputPrecision = {p} : tensor<64x64xf32> * tensor<64x64xf32> -> tensor<64x64xf32>"
    trans = "%{o} = tt.trans %{a} {{order = array<i32: 1, 0>}} : tensor<64x64xf32> -> tensor<64x64xf32>"
    siblings = "\n".join(dot.format(o=f"y{i}", a=f"x{i}", b="w", p="tf32x3") for i in range(3))
    assert tf32x3_dual_operands(siblings) == []
    left_and_transposed_left = "\n".join([dot.format(o="y0", a="x", b="w", p="tf32x3"), trans.format(o="xt", a="x"),
                                          dot.format(o="y1", a="xt", b="v", p="tf32x3")])
    assert tf32x3_dual_operands(left_and_transposed_left) == ["tensor<64x64xf32>"]
    twice_transposed = "\n".join([dot.format(o="y0", a="x", b="w", p="tf32x3"), trans.format(o="xt", a="x"),
                                   trans.format(o="xtt", a="xt"), dot.format(o="y1", a="xtt", b="v", p="tf32x3")])
    assert tf32x3_dual_operands(twice_transposed) == []
    mixed = "\n".join([dot.format(o="y0", a="x", b="w", p="tf32x3"), dot.format(o="y1", a="v", b="x", p="ieee")])
    assert tf32x3_dual_operands(mixed) == []
