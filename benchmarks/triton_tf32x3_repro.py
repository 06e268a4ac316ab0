#!/usr/bin/env python
"""The minimal kernel behind `config.DOT_OVERRIDES`: is Triton's 3xTF32 dot still wrong here?

    python benchmarks/triton_tf32x3_repro.py              # on a GPU: a line per (S, precision)
    python benchmarks/triton_tf32x3_repro.py --device cpu # the same logic under Triton's interpreter

The pattern of `gma_pw_backward_kernel`: in one loop over pixel tiles, a dot of a [BI, S] weight tile
with a [S, BP] activation tile (stored), then a second dot of the same activation tile, transposed, into
an accumulator. On an NVIDIA H200 (sm_90, Triton 3.6.0, 2026-12-04) it faulted with an illegal address
at S = 64 with input_precision="tf32x3", and was right at S = 32 and 128 and with "ieee"
(benchmarks/results/gpu_report_h200_20261204/followup.md). Each case runs in its own process (a fault
ends the process's CUDA context) and is reported as right, wrong or fault. When a new Triton prints
"right" for S = 64 tf32x3 on the GPUs the project supports, `config.DOT_OVERRIDES` can be emptied
(then test_training_step_real_shapes at C = 320 fp32 on a GPU decides).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [(s, p) for s in (32, 64, 128) for p in ("tf32x3", "ieee")]
#: relative error above which a dot counts as wrong (3xTF32 and FMA dots: ~1e-7 here)
TOLERANCE = 1e-5


def child(S: int, precision: str, device: str) -> None:
    """One case: prints a JSON line {S, precision, acc_err, dy_err} (max relative errors against float64)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def two_dots(PW, A, Bm, O, DY, S: tl.constexpr, BI: tl.constexpr, BP: tl.constexpr, T: tl.constexpr,
                 P: tl.constexpr):
        o = tl.arange(0, S)
        i = tl.arange(0, BI)
        p = tl.arange(0, BP)
        pwT = tl.load(PW + o[None, :] * BI + i[:, None])                          # [BI, S]
        acc = tl.zeros([S, BI], dtype=tl.float32)
        for t in range(T):
            a = tl.load(A + o[:, None] * (T * BP) + t * BP + p[None, :])          # [S, BP]
            b = tl.load(Bm + i[:, None] * (T * BP) + t * BP + p[None, :])         # [BI, BP]
            d = tl.dot(pwT, a, tl.zeros([BI, BP], dtype=tl.float32), input_precision=P)
            tl.store(DY + i[:, None] * (T * BP) + t * BP + p[None, :], d)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=P)
        tl.store(O + o[:, None] * BI + i[None, :], acc)

    BI, BP, T = min(S, 64), 16, 4
    g = torch.Generator().manual_seed(S)
    a, b, pw = (torch.randn(*shape, generator=g) for shape in ((S, T * BP), (BI, T * BP), (S, BI)))
    out, dy = torch.empty(S, BI), torch.empty(BI, T * BP)
    a, b, pw, out, dy = (x.to(device) for x in (a, b, pw, out, dy))
    two_dots[(1,)](pw, a, b, out, dy, S, BI, BP, T, precision, num_warps=8)
    if device == "cuda":
        torch.cuda.synchronize()
    ref_acc = a.double() @ b.double().t()
    ref_dy = pw.double().t() @ a.double()
    err = [float(((x.double() - r).abs().max() / r.abs().max()).cpu()) for x, r in ((out, ref_acc), (dy, ref_dy))]
    print(json.dumps({"S": S, "precision": precision, "acc_err": err[0], "dy_err": err[1]}), flush=True)


def run_case(S: int, precision: str, device: str, timeout: float = 300.0) -> dict:
    """The case in a child process -> {S, precision, verdict: right|wrong|fault, detail}."""
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, __file__, "--child", str(S), precision, "--device", device], env=env,
                          capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"S": S, "precision": precision, "verdict": "fault", "detail": tail[:300]}
    rec = json.loads(line)
    worst = max(rec["acc_err"], rec["dy_err"])
    return {"S": S, "precision": precision, "verdict": "right" if worst <= TOLERANCE else "wrong",
            "detail": f"max relative error {worst:.1e}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default) or cpu (Triton's interpreter: checks this script, not the compiler)")
    ap.add_argument("--child", nargs=2, metavar=("S", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(int(args.child[0]), args.child[1], args.device)
        return 0
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():   # every case would fail to start: not the compiler fault it looks for
            print("no CUDA device here (torch.cuda.is_available() is False): nothing to check; --device cpu runs "
                  "the cases through Triton's interpreter (a check of this script, not of the compiler)")
            return 2
    results = [run_case(S, p, args.device) for S, p in CASES]
    for r in results:
        print(f"S={r['S']:<4d} {r['precision']:7s} {r['verdict']:6s} {r['detail']}")
    print(json.dumps({"device": args.device, "results": results}))
    return 0 if all(r["verdict"] == "right" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
