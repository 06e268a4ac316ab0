"""Per-kernel GPU timing of the GMA pre-projection on GroupMixFormer stage shapes.

    python benchmarks/ops.py [--model groupmixformer_s] [--batch-size 128 1] [--dtype bf16 fp32]
                             [--impls cuda triton torch torch+compile reference]
                             [--results-file benchmarks/results/ops_benchmarks.csv]

Also the per-kernel part of the one-call GPU report (`benchmarks/gpu_report.py` imports
this module). On a machine without a CUDA GPU the CLI prints a skip message and exits 0
(`--smoke` times the CPU implementations on a tiny shape instead: a plumbing check).

For each stage shape (C, H x W at 224x224 input), batch and dtype, every implementation of
the step qkv -> pre-projection (docs/spec.md steps 2-9, between the two linears) is timed:

* ``cuda``, ``triton``: the fused backends (their ``gmf::*_pre_projection`` op through
  ``Backend.pre_projection``, BatchNorm folding cache included);
* ``torch``: the pure-PyTorch backend; ``torch+compile``: ``torch.compile`` of it
  (compile time reported apart, ``torch._dynamo.reset()`` before each shape);
* ``reference``: upstream's eager ops line by line (the reference backend).

Each row: median and 20th / 80th percentiles of the per-call time (``triton.testing.do_bench``
on a GPU: CUDA events, L2 flushed between calls; a host clock on CPU), the error of the
output against the ``reference`` output at the same dtype, and achieved GB/s and TFLOP/s
from the formulas below. The fused backends are also broken down per kernel
(``gma_aggregate_kernel``, ``gma_combine_kernel``, ``gma_attention_kernel``, and ``z_pass``:
``gma_statistics_kernel``, which an eval forward launches only as the split forward's Z pass,
when the tuning table picks it) with the PyTorch profiler (kernel durations on the GPU over `profile_calls` calls; median and
20/80 percentiles). A row ``linears`` times the two token-wise linears every backend shares
(x -> qkv, pre -> out): the layer time of an implementation is its pre-projection + linears.

Formulas (`work()`): e = bytes per element of the dtype, s = C/5, C' = 4s, d = C'/8,
N = H*W. FLOPs count 2 per multiply-add of the convolutions and matrix products only
(element-wise BatchNorm, hardswish, LayerNorm, softmax and the CRPE product are not counted).

    pre_projection  bytes = B*N*3C*e (qkv in) + B*N*C*e (pre out) + folded weights (fp32)
                    flops = 2*B*N*[3*(83*s + 3*s^2) + 27*s + 3*s^2 + 2*C'*d + 240*d]
                            (per q/k/v: depthwise 3x3+5x5+7x7 = 83 taps/ch, three s x s pointwise;
                             local: 3x3 depthwise on 3s ch, 3s -> s pointwise; K^T V and Q KV:
                             C'*d each; CRPE: d*(2*9 + 3*25 + 3*49) = 240*d)
    aggregate       bytes = B*N*3C*e + 2*B*N*C'*e (Q, V proxies) + B*N*s*e (local half of pre)
                    flops = 2*B*N*[3*(83*s + 3*s^2) + 27*s + 3*s^2 + C'*d]
    z_pass          (the split forward, `config.GMAShape.AGG_SPLIT`) bytes = B*N*9s*e (segments 1-3 of
                    q, k, v in) + B*N*9s*e (their Z out)      flops = 2*B*N*3*(83*s + 3*s^2)
    aggregate_from_z  (the split forward's aggregation, the row "aggregate" after a z_pass) bytes =
                    B*N*6s*e (segments 0 and 4 of q, k, v) + B*N*9s*e (Z) + 2*B*N*C'*e + B*N*s*e
                    flops = 2*B*N*[27*s + 3*s^2 + C'*d]
    combine         bytes = B*C'*d*4 (KV out; the split-N partials it reads are implementation-
                            specific and not counted: a lower bound)      flops = 0 (not counted)
    attention       bytes = 2*B*N*C'*e (Q, V) + B*C'*d*4 (KV) + B*N*C'*e (attention half of pre)
                    flops = 2*B*N*(C'*d + 240*d)
    linears         bytes = B*N*C*e (x) + 3*B*N*C*e (qkv) + B*N*C*e (pre) + B*N*C*e (out) + (4C^2+4C)*e
                    flops = 2*B*N*4*C^2

Bytes are compulsory traffic (each input read once, each output written once): GB/s is
bytes / median time, comparable with the measured device-to-device copy rate (`ceilings()`).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

#: token grids of the four stages at 224x224 input (docs/spec.md §2: stem /4 then /2 per stage)
STAGE_GRIDS = (56, 28, 14, 7)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("cuda", "triton", "torch", "torch+compile", "reference")
#: the fused backends' kernels broken down per launch (pack: the CUDA weight packing, launched only
#: when the planner could not stage the weights in shared memory)
KERNELS = ("pack", "z_pass", "aggregate", "combine", "attention")
FIELDS = ["date", "git_sha", "device", "torch", "triton", "cuda", "model", "stage", "op", "impl", "B", "H", "W",
          "C", "dtype", "status", "median_ms", "p20_ms", "p80_ms", "n", "bytes", "flops", "GBps", "TFLOPs",
          "err_vs_reference", "compile_s", "after_z_pass", "reason"]


# ------------------------------------------------------------------ work formulas
def work(C: int, H: int, W: int, B: int, elem_bytes: int) -> Dict[str, Dict[str, int]]:
    """{op: {"bytes": compulsory bytes, "flops": 2 x multiply-adds}} (formulas in the module docstring)."""
    from gmf_kernels.folding import weight_shapes
    s = C // 5
    cp = 4 * s
    d = cp // 8
    N = H * W
    e = elem_bytes
    folded = 4 * sum(int(torch.Size(sh).numel()) for sh in weight_shapes(C).values())
    z_macs = 3 * (83 * s + 3 * s * s)
    agg_macs = z_macs + 27 * s + 3 * s * s + cp * d
    attn_macs = cp * d + 240 * d
    return {
        "pre_projection": {"bytes": B * N * 3 * C * e + B * N * C * e + folded,
                           "flops": 2 * B * N * (agg_macs + attn_macs)},
        "aggregate": {"bytes": B * N * 3 * C * e + 2 * B * N * cp * e + B * N * s * e, "flops": 2 * B * N * agg_macs},
        "z_pass": {"bytes": 2 * B * N * 9 * s * e, "flops": 2 * B * N * z_macs},
        "aggregate_from_z": {"bytes": B * N * 15 * s * e + 2 * B * N * cp * e + B * N * s * e,
                             "flops": 2 * B * N * (agg_macs - z_macs)},
        "combine": {"bytes": B * cp * d * 4, "flops": 0},
        "attention": {"bytes": 2 * B * N * cp * e + B * cp * d * 4 + B * N * cp * e, "flops": 2 * B * N * attn_macs},
        "linears": {"bytes": 6 * B * N * C * e + (4 * C * C + 4 * C) * e, "flops": 2 * B * N * 4 * C * C},
    }


def work_key(row: Dict) -> Optional[str]:
    """The `work()` entry a row's GB/s and TFLOP/s come from: its op, except that an aggregation timed
    after a Z pass (``after_z_pass``: the split forward) is "aggregate_from_z"."""
    op = row.get("op")
    return "aggregate_from_z" if op == "aggregate" and row.get("after_z_pass") else op


# ------------------------------------------------------------------ cases
def stage_cases(model: str, batches: Iterable[int], dtypes: Iterable[str], stages=(0, 1, 2, 3)) -> List[Dict]:
    """[{model, stage, C, H, W, B, dtype}] in the order given (batch, then dtype, then stage)."""
    from gmf_kernels.models.configs import MODEL_CONFIGS, canonical_name
    name = canonical_name(model)
    dims = MODEL_CONFIGS[name]["embedding_dims"]
    out = []
    for B in batches:
        for dt in dtypes:
            for i in stages:
                out.append(dict(model=name, stage=i, C=dims[i], H=STAGE_GRIDS[i], W=STAGE_GRIDS[i], B=B, dtype=dt))
    return out


# ------------------------------------------------------------------ timing
def _quantile(xs: List[float], q: float) -> float:
    srt = sorted(xs)
    return srt[min(len(srt) - 1, max(0, int(round(q * (len(srt) - 1)))))]


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            min_reps: int = 3):
    """(median, p20, p80 ms per call, number of calls). GPU: triton.testing.do_bench; CPU: host clock."""
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80), None
    fn()  # warm-up
    times: List[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times)


_KERNEL_NAME = re.compile(r"gma_(pack|aggregate|combine|attention|statistics|dense_z|dense_aggregate)_kernel")
#: the profiler's kernel -> the row's name: an eval forward launches the statistics kernel only as the
#: split forward's Z pass, and the dense Z pass (`GMAShape.AGG_ZDENSE`) is that Z pass on tensor cores (its row's
#: work stays the compulsory one, the stencil form's: the dense form multiplies more); the fused forward's one
#: kernel (`GMAShape.AGG_FUSED`) is the aggregation, with its compulsory bytes (no Z pass before it)
_KERNEL_ROW = {"statistics": "z_pass", "dense_z": "z_pass", "dense_aggregate": "aggregate"}


def kernel_breakdown(fn: Callable[[], object], calls: int = 20) -> Dict[str, List[float]]:
    """{kernel: [ms per launch]} of the gma_*_kernel launches of `calls` calls, from the profiler
    (`KERNELS`' names: gma_statistics_kernel as "z_pass")."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: Dict[str, List[float]] = {}
    for ev in prof.events():
        if getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue
        m = _KERNEL_NAME.search(ev.name)
        if m:
            out.setdefault(_KERNEL_ROW.get(m.group(1), m.group(1)), []).append(ev.time_range.elapsed_us() / 1e3)
    return out


def _copy_ceiling(device: torch.device) -> Dict:
    n = (1 << 30) // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    med, p20, p80, _ = time_fn(lambda: b.copy_(a), device, 25, 200)
    return dict(op="copy_1GiB", impl="torch", median_ms=med, p20_ms=p20, p80_ms=p80, bytes=2 * n * 4,
                GBps=2 * n * 4 / (med * 1e-3) / 1e9)


def _matmul_ceiling(device: torch.device, m: int = 8192) -> Dict:
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    med, p20, p80, _ = time_fn(lambda: x @ y, device, 25, 200)
    return dict(op="matmul_bf16_8192", impl="torch", median_ms=med, p20_ms=p20, p80_ms=p80, flops=2 * m ** 3,
                TFLOPs=2 * m ** 3 / (med * 1e-3) / 1e12)


def ceilings(device: torch.device) -> List[Dict]:
    """Measured device ceilings: a 1 GiB device-to-device copy (GB/s, bytes read + written) and
    an 8192^3 bf16 matrix product (TFLOP/s), on random data."""
    rows = [_copy_ceiling(device), _matmul_ceiling(device)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _err(a: torch.Tensor, e: torch.Tensor) -> float:
    a64, e64 = a.detach().double(), e.detach().double()
    if not bool(torch.isfinite(a64).all()):
        return float("nan")
    return ((a64 - e64).abs().max() / e64.abs().max().clamp_min(1e-30)).item()


class CudaContextLost(RuntimeError):
    """A CUDA error that poisons the process's context (an illegal address, a launch failure...):
    every later CUDA call fails too, so the run must end, naming the implementation that faulted."""

    def __init__(self, impl: str, error: str):
        super().__init__(f"{impl}: {error}")
        self.impl, self.error = impl, error


#: printed (one line) by a run that lost its CUDA context: benchmarks/gpu_report.py reruns the rest
#: without that implementation
CONTEXT_LOST_MARKER = "GMF_CUDA_CONTEXT_LOST"


def cuda_alive() -> bool:
    """Does the CUDA context still work (after an exception: was it a sticky error)?"""
    try:
        torch.cuda.synchronize()
        torch.empty(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def context_lost_line(impl: str, error: str, **where) -> str:
    """The one-line marker of a lost context: 'GMF_CUDA_CONTEXT_LOST impl=cuda case=3 error=...'."""
    extra = "".join(f" {k}={v}" for k, v in where.items())
    return f"{CONTEXT_LOST_MARKER} impl={impl}{extra} error={' '.join(str(error).split())[:300]}"


def first_line(e: BaseException, limit: int = 300) -> str:
    text = " | ".join(ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ one case
class StageInputs:
    """Random layer and tokens of one case on `device`, and each backend's qkv layout."""

    def __init__(self, case: Dict, device: torch.device, seed: int = 0):
        from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights
        self.case = case
        self.device = device
        self.dtype = DTYPES[case["dtype"]]
        C, H, W, B = case["C"], case["H"], case["W"], case["B"]
        self.size = (H, W)
        self.hp = default_hyper(C)
        self.w = cast_weights(random_gma_weights(C, seed=seed), self.dtype, device)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(B, H * W, C, generator=g).to(device=device, dtype=self.dtype)

    def pre_projection_fn(self, impl: str):
        """(callable doing qkv -> pre for this impl, qkv it reads). Raises ValueError if unsupported."""
        from gmf_kernels.backends import get_backend
        from gmf_kernels.functional import make_problem
        base = "torch" if impl == "torch+compile" else impl
        b = get_backend(base)
        problem = make_problem(self.x, self.size, self.w, self.hp, False)
        from dataclasses import replace
        reasons = b.not_supported_reasons(replace(problem, explicit=True))
        if reasons:
            raise ValueError("; ".join(reasons))
        qkv = b.project_qkv(self.x, self.w, self.hp, False)
        w, hp, size = self.w, self.hp, self.size

        def run(q=qkv):
            return b.pre_projection(q, size, w, hp, False)

        if impl == "torch+compile":
            torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no stale graph
            compiled = torch.compile(lambda q: b.pre_projection(q, size, w, hp, False), dynamic=False)
            return (lambda q=qkv: compiled(q)), qkv
        return run, qkv

    def linears_fn(self):
        import torch.nn.functional as F
        w, x = self.w, self.x
        pre = torch.randn_like(x)
        return lambda: (F.linear(x, w.qkv_weight, w.qkv_bias), F.linear(pre, w.proj_weight, w.proj_bias))


def bench_case(case: Dict, impls: Iterable[str], device: torch.device, *, warmup_ms: float = 25,
               rep_ms: float = 100, profile_calls: int = 20, tags: Optional[Dict] = None,
               on_row: Optional[Callable[[Dict], None]] = None, deadline: Optional[float] = None,
               with_linears: bool = True) -> List[Dict]:
    """Rows for one case: pre_projection per impl, per-kernel rows of the fused impls, linears.

    deadline (time.monotonic()): implementations not started by then are recorded as skipped."""
    tags = dict(tags or {})
    dtype = DTYPES[case["dtype"]]
    e = torch.finfo(dtype).bits // 8
    wk = work(case["C"], case["H"], case["W"], case["B"], e)
    rows: List[Dict] = []

    def emit(row):
        full = {**tags, **case, **row}
        op = work_key(full)
        if full.get("status") == "ok" and op in wk and full.get("median_ms"):
            full["bytes"], full["flops"] = wk[op]["bytes"], wk[op]["flops"]
            full["GBps"] = full["bytes"] / (full["median_ms"] * 1e-3) / 1e9
            full["TFLOPs"] = full["flops"] / (full["median_ms"] * 1e-3) / 1e12 if full["flops"] else None
        rows.append(full)
        if on_row:
            on_row(full)

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def failed(impl, ex):
        """An error row; a sticky CUDA error ends the run (nothing after it can run in this process)."""
        emit(dict(op="pre_projection", impl=impl, status="error", reason=first_line(ex, 600)))
        if cuda and not cuda_alive():
            raise CudaContextLost(impl, first_line(ex, 600)) from ex
    inputs = StageInputs(case, device)
    ref_out = None
    with torch.inference_mode():
        for impl in sorted(impls, key=lambda n: n != "reference"):  # reference first: the others' check
            if deadline is not None and time.monotonic() > deadline:
                emit(dict(op="pre_projection", impl=impl, status="skipped", reason="time budget used up"))
                continue
            try:
                fn, _ = inputs.pre_projection_fn(impl)
            except ValueError as ex:
                emit(dict(op="pre_projection", impl=impl, status="unsupported", reason=first_line(ex, 600)))
                continue
            except Exception as ex:
                failed(impl, ex)
                continue
            try:
                sync()
                t0 = time.perf_counter()
                out = fn()
                sync()
                first_s = time.perf_counter() - t0
                err = 0.0 if impl == "reference" else (_err(out, ref_out) if ref_out is not None else None)
                if impl == "reference":
                    ref_out = out
                else:
                    del out
                med, p20, p80, n = time_fn(fn, device, warmup_ms, rep_ms)
                emit(dict(op="pre_projection", impl=impl, status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, n=n,
                          err_vs_reference=err, compile_s=first_s if impl == "torch+compile" else None,
                          first_call_s=first_s))
            except Exception as ex:  # e.g. out of memory for the reference at a large batch
                failed(impl, ex)
                continue
            if cuda and impl in ("cuda", "triton") and profile_calls:
                try:
                    per_kernel = kernel_breakdown(fn, profile_calls)
                    if not per_kernel:
                        emit(dict(op="kernels", impl=impl, status="error", reason="the profiler saw no gma_* kernel"))
                    split = "z_pass" in per_kernel   # the aggregation read Z: its compulsory bytes differ
                    for k in KERNELS:
                        ts = per_kernel.get(k)
                        if not ts:
                            continue
                        emit(dict(op=k, impl=impl, status="ok", median_ms=statistics.median(ts),
                                  p20_ms=_quantile(ts, 0.2), p80_ms=_quantile(ts, 0.8), n=len(ts),
                                  launches_per_call=len(ts) / profile_calls, timer="profiler",
                                  **({"after_z_pass": True} if split and k == "aggregate" else {})))
                except Exception as ex:
                    emit(dict(op="kernels", impl=impl, status="error", reason="profiler: " + first_line(ex)))
        try:
            if not with_linears:
                raise StopIteration
            med, p20, p80, n = time_fn(inputs.linears_fn(), device, warmup_ms, rep_ms)
            emit(dict(op="linears", impl="torch", status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, n=n))
        except StopIteration:
            pass
        except Exception as ex:
            emit(dict(op="linears", impl="torch", status="error", reason=first_line(ex)))
    del inputs, ref_out
    if cuda:
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ environment tags
def git_sha() -> str:
    """The checkout's commit; GMF_GIT_SHA where set (a copy of the tree without its .git, as a device machine
    receives: gpu_report.py --git-sha sets it for its steps), else "unknown" outside a git checkout."""
    if os.environ.get("GMF_GIT_SHA"):
        return os.environ["GMF_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_tags(device: torch.device) -> Dict:
    from importlib import metadata
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = "not installed"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_sha": git_sha(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def fmt_row(r: Dict) -> str:
    head = f"  {str(r.get('op', '-')):15s} {str(r.get('impl', '-')):14s}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('reason', '')}"
    extra = ""
    if r.get("GBps"):
        extra += f"  {r['GBps']:8.1f} GB/s"
    if r.get("TFLOPs"):
        extra += f"  {r['TFLOPs']:6.2f} TFLOP/s"
    if r.get("err_vs_reference") is not None:
        extra += f"  err {r['err_vs_reference']:.1e}"
    if r.get("compile_s") is not None:
        extra += f"  (compile {r['compile_s']:.1f} s)"
    if r.get("median_ms") is None:
        return f"{head} ok{extra}"
    return f"{head} median {r['median_ms']:9.4f} ms [p20 {r['p20_ms']:.4f}, p80 {r['p80_ms']:.4f}]{extra}"


# ------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="groupmixformer_s")
    ap.add_argument("--batch-size", type=int, nargs="+", default=None, help="(default: 128; --smoke: 1)")
    ap.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                    help="(default: bf16 fp32; --smoke: fp32)")
    ap.add_argument("--stages", nargs="+", type=int, default=None, choices=[0, 1, 2, 3],
                    help="(default: 0 1 2 3; --smoke: 0)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--warmup", type=float, default=25, help="do_bench warm-up (ms)")
    ap.add_argument("--rep", type=float, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--profile-calls", type=int, default=20, help="calls profiled for the per-kernel breakdown")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU needed: time torch/reference on CPU, the --model/--stages/--dtype/--batch-size cases "
                         "on a 7x7 grid")
    ap.add_argument("--results-file", default=os.path.join(HERE, "results", "ops_benchmarks.csv"))
    a = ap.parse_args(argv)

    try:
        from gmf_kernels.models.configs import canonical_name
        canonical_name(a.model)
    except (KeyError, ValueError) as e:
        ap.error(f"--model: {e}")
    if a.smoke:
        device = torch.device("cpu")
        cases = stage_cases(a.model, a.batch_size or [1], a.dtype or ["fp32"], a.stages or [0])
        for case in cases:   # a plumbing check: the stage's width on a tiny grid
            case["H"] = case["W"] = min(7, case["H"])
        impls = [i for i in a.impls if i in ("torch", "reference")]
    else:
        if not torch.cuda.is_available():
            print("benchmarks/ops.py: no CUDA GPU available, skipping (the kernels are timed on a GPU only; "
                  "on CPU they run through an interpreter/emulation, which is for testing, not timing; "
                  "--smoke checks the plumbing on CPU).")
            return 0
        from gmf_kernels._env import triton_interpreting
        if triton_interpreting():
            print("benchmarks/ops.py: TRITON_INTERPRET is set; unset it to time the compiled kernels. Skipping.")
            return 0
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        cases = stage_cases(a.model, a.batch_size or [128], a.dtype or ["bf16", "fp32"], a.stages or [0, 1, 2, 3])
        impls = a.impls
    tags = env_tags(device)
    rows: List[Dict] = []
    fh = wr = None
    if not a.smoke:   # each row appended as it is measured: a run stopped part-way keeps its rows
        os.makedirs(os.path.dirname(os.path.abspath(a.results_file)), exist_ok=True)
        new = not os.path.exists(a.results_file)
        fh = open(a.results_file, "a", newline="")
        wr = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            wr.writeheader()
            fh.flush()

    def on_row(r):
        print(fmt_row(r), flush=True)
        rows.append(r)
        if wr is not None:
            wr.writerow(r)
            fh.flush()

    rc = 0
    try:
        for case in cases:
            print(f"{case['model']} stage {case['stage']}: C={case['C']}, {case['H']}x{case['W']}, B={case['B']}, "
                  f"{case['dtype']} on {tags['device']}", flush=True)
            bench_case(case, impls, device, warmup_ms=a.warmup, rep_ms=a.rep, profile_calls=a.profile_calls,
                       tags=tags, on_row=on_row)
    except CudaContextLost as e:
        print(context_lost_line(e.impl, e.error), flush=True)
        print(f"benchmarks/ops.py: the CUDA context was lost in {e.impl} ({e.error}); the cases after it are not "
              f"timed: rerun without it (--impls)", flush=True)
        rc = 3
    finally:
        if fh is not None:
            fh.close()
    if a.smoke:
        return 0 if any(r.get("status") == "ok" for r in rows) else 1
    print(f"appended {len(rows)} rows to {a.results_file}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
