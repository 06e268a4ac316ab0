"""Per-op GPU benchmark of the Triton GMA kernels on GroupMixFormer stage shapes.

    python benchmarks/ops.py [--model groupmixformer_s] [--batch-size 128] [--dtype fp32 bf16]
                             [--results-file benchmarks/results/ops_benchmarks.csv]

Rows (per stage shape and dtype), each timed with ``triton.testing.do_bench`` (median and
20th / 80th percentiles of the per-call time, in ms):

* ``aggregate``      Triton aggregation kernel alone (qkv -> Q, V proxies, local branch,
                     softmax partials).
* ``combine``        Triton split-N combine kernel alone.
* ``attention``      Triton output kernel alone (scale Q KV + Q CRPE(V)).
* ``pre_projection`` the fused stage qkv -> pre-projection: the three kernels through the
                     ``gmf::triton_pre_projection`` op.
* ``gma_forward``    the whole layer x -> out (both linears included) for the backends
                     ``triton``, ``torch`` (the fast pure-PyTorch formulation) and
                     ``reference``, and ``linears`` (the two F.linear alone), so that the
                     part between the linears can be compared across implementations.

Achieved bandwidth is reported against an explicit *compulsory* byte count (each input
read once, each output written once; e = bytes per element of the input dtype, fp32
partials/KV 4 bytes; SPLITS from the launcher's split plan):

    aggregate      B*N*3C*e (qkv) + 2*B*N*C'*e (Q, V) + B*N*s*e (local) + B*SPLITS*C'*(d+2)*4
    combine        B*SPLITS*C'*(d+2)*4 + B*C'*d*4
    attention      2*B*N*C'*e (Q, V) + B*C'*d*4 (KV) + B*N*C'*e (A)
    pre_projection B*N*3C*e + B*N*C*e           (qkv in, pre-projection out: the stage's
                                                  own minimum; Q, V, partials are not compulsory)
    gma_forward    B*N*C*e (x) + B*N*C*e (out) + weights   (the layer's minimum)
    linears        3*B*N*C*e + B*N*3C*e + weights    (x in, qkv out; pre in, out out)

Results are appended as rows to a CSV in benchmarks/results/, tagged with device name,
torch / triton / CUDA versions, git sha and date. Without a CUDA GPU the script prints a
skip message and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

#: stage grids at 224x224 input (GMA_SPEC §2: stem /4 then /2 per stage)
STAGE_GRIDS = (56, 28, 14, 7)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIELDS = ["date", "git_sha", "device", "torch", "triton", "cuda", "model", "stage", "op", "impl", "B", "H", "W",
          "C", "dtype", "median_ms", "p20_ms", "p80_ms", "bytes", "GBps"]


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _embedding_dims(model: str):
    from gmf_kernels.models.configs import MODEL_CONFIGS, canonical_name
    return MODEL_CONFIGS[canonical_name(model)]["embedding_dims"]


def bench_stage(model, stage, C, G, B, dtype_name, tags, warmup, rep):
    import torch.nn.functional as F
    from triton.testing import do_bench

    from gmf_kernels.backends import get_backend
    from gmf_kernels.folding import folded_weights
    from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights
    from gmf_kernels.triton_kernels import aggregation, attention, op  # noqa: F401  (op: registers the op)
    from gmf_kernels.triton_kernels.config import gma_shape

    dt = DTYPES[dtype_name]
    e = torch.finfo(dt).bits // 8
    dev = "cuda"
    H = W = G
    N = H * W
    sh = gma_shape(C)
    s, cp, d = sh.S, sh.CP, sh.D
    w = cast_weights(random_gma_weights(C, seed=0), dt, dev)
    hp = default_hyper(C)
    x = torch.randn(B, N, C, device=dev, dtype=dt)
    f = folded_weights(w, hp, dt)
    qkv = F.linear(x, w.qkv_weight, w.qkv_bias)
    splits, tps = aggregation.split_plan(N, B, sh.AGG_BLOCK_P, sh.SPLIT_TARGET)
    f32 = torch.float32
    q = torch.empty(B, N, cp, device=dev, dtype=dt)
    v = torch.empty_like(q)
    pre = torch.empty(B, N, C, device=dev, dtype=dt)
    pm = torch.empty(B, splits, cp, device=dev, dtype=f32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B, splits, cp, d, device=dev, dtype=f32)
    kv = torch.empty(B, cp, d, device=dev, dtype=f32)
    wbytes = sum(t.numel() * t.element_size() for t in w.tensors())
    part_bytes = B * splits * cp * (d + 2) * 4

    def agg():
        aggregation.launch_aggregate(aggregation.gma_aggregate_kernel, qkv, H, W, f, hp.ln_eps, sh, tps,
                                     q, v, pre, pm, pl, pacc)

    def comb():
        attention.launch_combine(attention.gma_combine_kernel, pm, pl, pacc, kv, sh)

    def attn():
        attention.launch_attention(attention.gma_attention_kernel, q, v, kv, pre, f, H, W, hp.scale, sh)

    def stage_op():
        torch.ops.gmf.triton_pre_projection(qkv, H, W, list(f), hp.scale, hp.ln_eps)

    def fwd(name):
        b = get_backend(name)
        return lambda: b.forward(x, (H, W), w, hp, False)

    def linears():
        F.linear(x, w.qkv_weight, w.qkv_bias)
        F.linear(pre, w.proj_weight, w.proj_bias)

    cases = [
        ("aggregate", "triton", agg, B * N * 3 * C * e + 2 * B * N * cp * e + B * N * s * e + part_bytes),
        ("combine", "triton", comb, part_bytes + B * cp * d * 4),
        ("attention", "triton", attn, 3 * B * N * cp * e + B * cp * d * 4),
        ("pre_projection", "triton", stage_op, B * N * 3 * C * e + B * N * C * e),
        ("gma_forward", "triton", fwd("triton"), 2 * B * N * C * e + wbytes),
        ("gma_forward", "torch", fwd("torch"), 2 * B * N * C * e + wbytes),
        ("gma_forward", "reference", fwd("reference"), 2 * B * N * C * e + wbytes),
        ("linears", "torch", linears, 3 * B * N * C * e + B * N * 3 * C * e + wbytes),
    ]
    rows = []
    with torch.no_grad():
        for op, impl, fn, nbytes in cases:
            try:
                med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            except Exception as ex:  # e.g. out of memory for the reference at batch 128
                print(f"  {op:15s} {impl:9s} failed: {type(ex).__name__}: {ex}")
                continue
            gbps = nbytes / (med * 1e-3) / 1e9
            rows.append({**tags, "model": model, "stage": stage, "op": op, "impl": impl, "B": B, "H": H, "W": W,
                         "C": C, "dtype": dtype_name, "median_ms": f"{med:.4f}", "p20_ms": f"{p20:.4f}",
                         "p80_ms": f"{p80:.4f}", "bytes": nbytes, "GBps": f"{gbps:.1f}"})
            print(f"  {op:15s} {impl:9s} median {med:8.3f} ms  [p20 {p20:.3f}, p80 {p80:.3f}]  {gbps:8.1f} GB/s")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="groupmixformer_s")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--results-file", default=os.path.join(HERE, "results", "ops_benchmarks.csv"))
    a = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/ops.py: no CUDA GPU available, skipping (the Triton kernels are benchmarked on a GPU only; "
              "on CPU they run through the Triton interpreter, which is for testing, not timing).")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("benchmarks/ops.py: TRITON_INTERPRET is set; unset it to benchmark the compiled kernels. Skipping.")
        return 0
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tags = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_sha": _git_sha(),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda}
    dims = _embedding_dims(a.model)
    rows = []
    for dt in a.dtype:
        for i in a.stages:
            C, G = dims[i], STAGE_GRIDS[i]
            print(f"{a.model} stage {i}: C={C}, {G}x{G}, B={a.batch_size}, {dt} on {tags['device']}")
            rows += bench_stage(a.model, i, C, G, a.batch_size, dt, tags, a.warmup, a.rep)
    os.makedirs(os.path.dirname(os.path.abspath(a.results_file)), exist_ok=True)
    new = not os.path.exists(a.results_file)
    with open(a.results_file, "a", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            wr.writeheader()
        wr.writerows(rows)
    print(f"appended {len(rows)} rows to {a.results_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
