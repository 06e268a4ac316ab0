#!/usr/bin/env python
"""Roofline report of the fused GMA kernels: compulsory bytes, FLOPs, grids and lower-bound times.

    python benchmarks/roofline.py                                  # GroupMixFormer-S, B 128 and 1, 3 dtypes
    python benchmarks/roofline.py --json roofline.json --measured gpu_report/report.json
    python benchmarks/roofline.py --triton-resources aot.json --cuda-resources ~/.cache/.../resources.json

For each kernel (Triton and CUDA: gma_aggregate_kernel, gma_combine_kernel,
gma_attention_kernel; Triton also gma_z_pass, the split eval forward's first launch (the statistics
kernel storing Z only), where the tiles in effect pick the split; with --train also the training kernels of one training call, Triton's:
the statistics pass and the recompute (gma_statistics_kernel, gma_recompute_z_kernel,
gma_recompute_attention_kernel, gma_recompute_local_kernel), the attention backward (gma_b1_dkv_kernel, gma_b2_attention_kernel, gma_b2_crpe_kernel) and the
aggregation backward (gma_dz_kernel, gma_pw_backward_kernel,
gma_dw_backward_kernel, gma_dw_wgrad_kernel (with the CRPE weight gradient), gma_local_backward_kernel: each summed over its launches in the call),
on the stage tensors, dA, dL, qkv, d_qkv and the dots in the layer's dtype (`config.stage_dtype`); the
statistics pass with fp32's dots) x GroupMixFormer-S stage shape (C=80 56x56, 160 28x28, 320 14x14,
320 7x7) x batch x dtype: the work of one launch from the one cost model of each backend
(`gmf_kernels.triton_kernels.costs`, `gmf_kernels.cuda.costs`, derived from the launchers'
own plans, with the forward tiles a launch on sm_90 runs: the tuning table's when there is one,
`gmf_kernels.tuning`, else the defaults), the launch grid (for the Triton aggregation also its programs per image of each job:
segment 0 / 3x3 / 5x5 / 7x7 / local branch, balanced by cost: `aggregation.job_plan`), and the
lower-bound time on an H100 (SXM):

    t_mem  = bytes / 3.0 TB/s
    t_tc   = tc_flops / rate(tc_precision): 790 TFLOP/s for fp16/bf16 operands, 395 for TF32
             (one pass: Triton's fp16/bf16 variant), 395/3 for 3xTF32 (fp32 inputs, three passes)
    t_cuda = cuda_flops / 67 TFLOP/s (fp32 FMA)
    bound  = max(t_mem, t_tc, t_cuda)          (perfect overlap: a lower bound, not a prediction)

Registers, shared memory and resident CTAs per SM (sm_90) come from the compiled code where
given: Triton from the AOT compile results (``python -m gmf_kernels.triton_kernels.specializations
--json FILE``, passed with ``--triton-resources FILE``) or else the newest
``benchmarks/results/triton_resources_*.md``; CUDA from a build's ``resources.json``
(``--cuda-resources FILE``; dynamic shared memory from the module's plan). Missing: "n/a".
Waves = programs / (132 SMs x resident CTAs per SM); without occupancy, programs per SM.

``--measured FILE`` adds each kernel's measured median (rows of benchmarks/ops.py: op
z_pass / aggregate / combine / attention, impl cuda / triton, from ops.py's CSV, gpu_report's
report.json (``kernels.rows``), its kernel_rows.jsonl, or a JSON list of such rows) and the
fraction of the bound achieved (bound / measured; 1.0 = at the roofline).
Nothing here is a measurement unless it comes from ``--measured``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: H100 SXM figures the bounds use (dense, no sparsity)
PEAKS = {"hbm_Bps": 3.0e12, "tc_fp16_flops": 790e12, "tc_bf16_flops": 790e12, "tc_tf32_flops": 395e12,
         "fma_fp32_flops": 67e12}
SMS = 132
#: sm_90 per-SM limits: registers, shared memory (bytes), warps, CTAs; 1 KiB reserved per CTA
SM90 = {"regs": 65536, "smem": 233472, "warps": 64, "ctas": 32, "reserved_smem": 1024}
STAGE_GRIDS = (56, 28, 14, 7)
DTYPES = ("fp32", "fp16", "bf16")
KERNELS = ("gma_aggregate_kernel", "gma_combine_kernel", "gma_attention_kernel")
#: the split eval forward's Z pass (gmf_kernels.triton_kernels.costs.Z_PASS): a Triton row where the tiles
#: in effect pick the split (`GMAShape.AGG_SPLIT`), whose aggregation row then reads Z
Z_PASS = "gma_z_pass"
#: the training kernels with a cost model, per backend (the CUDA backend's backward is Triton's)
TRAIN_KERNELS = {"triton": ("gma_statistics_kernel", "gma_proxy_v_kernel", "gma_recompute_z_kernel",
                            "gma_recompute_attention_kernel",
                            "gma_recompute_local_kernel", "gma_b1_dkv_kernel", "gma_b2_attention_kernel", "gma_b2_crpe_kernel",
                            "gma_dz_kernel", "gma_pw_backward_kernel",
                            "gma_dw_backward_kernel", "gma_dw_wgrad_kernel", "gma_local_backward_kernel")}
BACKENDS = ("triton", "cuda")
CAPABILITY = (9, 0)


def tc_rate(precision: str, peaks: Dict[str, float] = PEAKS) -> Optional[float]:
    """FLOP/s of the tensor cores for the kernels' dot precision."""
    return {"bf16": peaks["tc_bf16_flops"], "fp16": peaks["tc_fp16_flops"], "tf32": peaks["tc_tf32_flops"],
            "tf32x3": peaks["tc_tf32_flops"] / 3}.get(precision)


def bound_times(c, peaks: Dict[str, float] = PEAKS) -> Dict[str, float]:
    """{t_mem, t_tc, t_cuda, bound} in microseconds, and "bound_by"."""
    t_mem = c.bytes / peaks["hbm_Bps"] * 1e6
    rate = tc_rate(c.tc_precision, peaks)
    t_tc = c.tc_flops / rate * 1e6 if (c.tc_flops and rate) else 0.0
    t_cuda = c.cuda_flops / peaks["fma_fp32_flops"] * 1e6
    parts = {"memory": t_mem, "tensor cores": t_tc, "CUDA cores": t_cuda}
    by = max(parts, key=parts.get)
    return {"t_mem_us": t_mem, "t_tc_us": t_tc, "t_cuda_us": t_cuda, "bound_us": parts[by], "bound_by": by}


def shapes(model: str = "groupmixformer_s") -> List[Tuple[int, int, int]]:
    """(C, H, W) of the model's four stages at 224x224."""
    from gmf_kernels.models.configs import MODEL_CONFIGS, canonical_name
    dims = MODEL_CONFIGS[canonical_name(model)]["embedding_dims"]
    return [(int(C), g, g) for C, g in zip(dims, STAGE_GRIDS)]


# ------------------------------------------------------------------ resources
def ctas_per_sm(registers: Optional[int], warps: Optional[int], shared: Optional[int],
                limits: Dict[str, int] = SM90) -> Optional[int]:
    """Resident CTAs per SM allowed by registers (256-register allocation per warp), shared memory
    (+1 KiB reserved per CTA), warps and the CTA limit; None if registers or warps are unknown."""
    if not registers or registers < 0 or not warps:
        return None
    per_warp = -(-registers * 32 // 256) * 256
    n = min(limits["regs"] // (per_warp * warps), limits["warps"] // warps, limits["ctas"])
    if shared is not None:
        n = min(n, limits["smem"] // (shared + limits["reserved_smem"]))
    return n


def _tile_key(kernel: str, cx: Dict[str, int]) -> Tuple:
    short = kernel.replace("gma_", "").replace("_kernel", "")
    if short == "aggregate":
        return (cx.get("BLOCK_P"), cx.get("CK"), cx.get("warps"))
    if short == "attention":
        return (cx.get("BLOCK_P"), cx.get("warps"))
    return (cx.get("warps"),)


def _parse_tiles(text: str) -> Dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"\b(BLOCK_P|CK|warps|S_PAD|D_PAD)=(\d+)", text)}


def load_triton_resources(path: str, arch: int = 90) -> Dict[Tuple, Dict]:
    """{(kernel short name, C, dtype, tile key): {registers, shared, warps, spills}} for sm_<arch>,
    from the specializations JSON (a list of compile results) or a triton_resources_*.md table."""
    out: Dict[Tuple, Dict] = {}
    if path.endswith(".json"):
        with open(path) as fh:
            data = json.load(fh)
        for r in data if isinstance(data, list) else data.get("results", []):
            if int(r.get("arch", 0)) != arch or "error" in r or r.get("registers", -1) < 0:
                continue
            cx = _parse_tiles(r.get("label", ""))
            cx["warps"] = int(r.get("num_warps", cx.get("warps", 4)))
            short = r.get("kernel") or r["function"].replace("gma_", "").replace("_kernel", "")
            dt = r.get("dtype", "-") if short != "combine" else "-"
            out[(short, int(r["C"]), dt, _tile_key(short, cx))] = {
                "registers": int(r["registers"]), "warps": cx["warps"],
                "shared": int(r.get("shared_dynamic", 0)) + int(r.get("cuobjdump_shared", 0)),
                "spills": int(r.get("spill_stores", 0)) + int(r.get("spill_loads", 0)), "source": path}
        return out
    header: Optional[List[str]] = None
    with open(path) as fh:
        for line in fh:
            if not line.startswith("|"):
                header = None if not line.strip() else header
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                continue
            if set("".join(cells)) <= set("-: "):
                continue
            row = dict(zip(header, cells))
            regs = row.get(f"sm_{arch} regs", "")
            if "kernel" not in row or not regs.isdigit():
                continue
            cx = _parse_tiles(row.get("tiles", ""))
            short = row["kernel"]
            shared = row.get(f"sm_{arch} shared", "")
            spill = re.findall(r"\d+", row.get(f"sm_{arch} spill st/ld", ""))
            out[(short, int(row["C"]), row.get("dtype", "-") if short != "combine" else "-", _tile_key(short, cx))] = {
                "registers": int(regs), "warps": cx.get("warps"), "shared": int(shared) if shared.isdigit() else None,
                "spills": sum(int(x) for x in spill), "source": path}
    return out


_CUDA_T = {"fp32": "float", "fp16": "__half", "bf16": "__nv_bfloat16"}


def load_cuda_resources(path: str, arch: int = 90) -> List[Dict]:
    """The ptxas entries (gmf_kernels.cuda.build.parse_ptxas) of sm_<arch> in a build's resources.json."""
    with open(path) as fh:
        data = json.load(fh)
    return [e for e in data if str(e.get("arch", "")).replace("sm_", "") == str(arch)]


def cuda_resource(entries: List[Dict], kernel: str, dtype: str, d: int) -> Optional[Dict]:
    """The entry of `kernel` for this dtype and head width d (template <T, D>): the build's
    specialisation D = d when it has one, else its generic instance D = 0 (what the launcher runs)."""
    found: Dict[int, Dict] = {}
    for e in entries:
        m = re.search(re.escape(kernel) + r"<([^>]*)>", e.get("kernel", ""))
        if not m:
            continue
        args = [a.strip() for a in m.group(1).split(",")]
        ints = [int(a) for a in args if re.fullmatch(r"-?\d+", a)]
        if kernel != "gma_combine_kernel" and _CUDA_T[dtype] not in args:
            continue
        found.setdefault(ints[-1] if ints else 0, e)
    # the head-width specialisation when the build has it, else the generic (D = 0) instance
    return found.get(d, found.get(0))


# ------------------------------------------------------------------ measured
def load_measured(path: str) -> Dict[Tuple, float]:
    """{(impl, kernel, C, H, W, B, dtype): median ms} from benchmarks/ops.py rows (CSV, JSON list,
    {"rows": [...]}, gpu_report's report.json with kernels.rows, or JSON lines)."""
    rows: List[Dict] = []
    if path.endswith(".csv"):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        with open(path) as fh:
            text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
        if isinstance(data, dict):
            data = data.get("kernels", {}).get("rows") if isinstance(data.get("kernels"), dict) else data.get("rows")
        rows = list(data or [])
    out: Dict[Tuple, float] = {}
    for r in rows:
        op = r.get("op")
        if op not in ("z_pass", "aggregate", "combine", "attention") or r.get("status", "ok") != "ok":
            continue
        med = r.get("median_ms")
        if med in (None, ""):
            continue
        kernel = Z_PASS if op == "z_pass" else f"gma_{op}_kernel"
        key = (r.get("impl"), kernel, int(r["C"]), int(r["H"]), int(r["W"]), int(r["B"]), r["dtype"])
        out[key] = float(med)
    return out


# ------------------------------------------------------------------ the report
def _torch_dtype(dtype: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def triton_shape(C: int, dtype: str):
    """The forward tiles a Triton launch on CAPABILITY runs: the tuning table's for (arch, C, dtype)
    when it has them (what the measured rows ran, `--measured`), else the defaults."""
    from gmf_kernels import tuning
    from gmf_kernels.triton_kernels import launcher as L
    from gmf_kernels.triton_kernels._common import DotVariant
    from gmf_kernels.triton_kernels.config import dot_precision
    agg = tuning.choose(L.AGG_FAMILY, C, _torch_dtype(dtype), CAPABILITY)
    attn = tuning.choose(L.ATTN_FAMILY, C, _torch_dtype(dtype), CAPABILITY)
    return L.shape_from_configs(C, DotVariant(dot_precision(dtype, CAPABILITY), False), agg, attn)


def _cost(backend: str, kernel: str, B: int, H: int, W: int, C: int, dtype: str):
    """The kernel's cost model with the tiles a launch on CAPABILITY uses (the tuning table's when it
    has them: the measured rows ran those)."""
    if backend == "triton":
        from gmf_kernels.triton_kernels.costs import KERNELS as FORWARD, cost
        name = kernel if kernel.startswith("gma_") else f"gma_{kernel}_kernel"
        return cost(kernel, B, H, W, C, dtype, CAPABILITY, shape=triton_shape(C, dtype) if name in FORWARD else None)
    from gmf_kernels import tuning
    from gmf_kernels.cuda import launcher as CL
    from gmf_kernels.cuda.costs import cost
    cfg = tuning.choose(CL.TILE_FAMILY, C, _torch_dtype(dtype), CAPABILITY)
    return cost(kernel, B, H, W, C, dtype, CAPABILITY, config=cfg if cfg != CL.AUTO else None)


def rows(model: str = "groupmixformer_s", batches: Sequence[int] = (128, 1), dtypes: Sequence[str] = DTYPES,
         backends: Sequence[str] = BACKENDS, triton_res: Optional[Dict] = None, cuda_res: Optional[List] = None,
         measured: Optional[Dict] = None, peaks: Dict[str, float] = PEAKS,
         shape_list: Optional[Sequence[Tuple[int, int, int]]] = None, train: bool = False) -> List[Dict]:
    out = []
    for backend in backends:
        split_kernels = (Z_PASS,) if backend == "triton" else ()
        for kernel in split_kernels + KERNELS + (TRAIN_KERNELS.get(backend, ()) if train else ()):
            for (C, H, W) in (shape_list or shapes(model)):
                for B in batches:
                    for dt in dtypes:
                        if kernel == Z_PASS and (not triton_shape(C, dt).AGG_SPLIT or triton_shape(C, dt).AGG_FUSED):
                            continue        # the aggregation computes Z in registers (the default, or FUSED)
                        c = _cost(backend, kernel, B, H, W, C, dt)
                        r = {"backend": backend, "kernel": kernel, "C": C, "H": H, "W": W, "B": B, "dtype": dt,
                             "bytes": c.bytes, "tc_flops": c.tc_flops, "tc_precision": c.tc_precision,
                             "tc_flops_padded": c.tc_flops_padded or None, "cuda_flops": c.cuda_flops,
                             "grid": list(c.grid) if c.grid else None, "programs": c.programs,
                             "block": c.block, "registers": None, "shared": c.shared, "ctas_per_sm": None,
                             "resources": None, "notes": c.detail.get("notes", ""),
                             # CUDA without the module's plan: the partials are not counted (a lower bound)
                             "lower_bound": backend == "cuda" and not c.detail.get("plan"),
                             # Triton aggregation: its cost-balanced plan (programs per image of each job)
                             "job_splits": ([c.detail[f"splits{j}"] for j in range(5)]
                                            if "splits0" in c.detail else None)}
                        warps = c.block // 32 if c.block else None
                        if backend == "triton" and triton_res and kernel in KERNELS:
                            sh = triton_shape(C, dt)
                            short = kernel.replace("gma_", "").replace("_kernel", "")
                            cx = {"BLOCK_P": sh.AGG_BLOCK_P if short == "aggregate" else sh.ATTN_BLOCK_P,
                                  "CK": sh.CK, "warps": warps}
                            res = triton_res.get((short, C, dt if short != "combine" else "-", _tile_key(short, cx)))
                            if res:
                                r.update(registers=res["registers"], shared=res["shared"], resources=res["source"])
                        elif backend == "cuda" and cuda_res is not None:
                            e = cuda_resource(cuda_res, kernel, dt, C // 10)
                            if e and e.get("registers") is not None:
                                dyn = c.shared if c.shared is not None else None
                                r.update(registers=int(e["registers"]),
                                         shared=(dyn + int(e.get("static_smem", 0))) if dyn is not None else None,
                                         resources="resources.json")
                        r["ctas_per_sm"] = ctas_per_sm(r["registers"], warps, r["shared"])
                        progs = r["programs"]
                        if progs and r["ctas_per_sm"]:
                            r["waves"] = progs / (SMS * r["ctas_per_sm"])
                        else:
                            r["waves"] = None
                        r["programs_per_sm"] = progs / SMS if progs else None
                        r.update(bound_times(c, peaks))
                        if measured is not None:
                            ms = measured.get((backend, kernel, C, H, W, B, dt))
                            r["measured_us"] = ms * 1e3 if ms is not None else None
                            r["fraction_of_bound"] = (r["bound_us"] / r["measured_us"]) if ms else None
                            r["achieved_GBps"] = (c.bytes / (ms * 1e-3) / 1e9) if ms else None
                        out.append(r)
    return out


def _fmt(v, spec="{:.1f}"):
    return "n/a" if v is None else spec.format(v)


def markdown(rs: List[Dict], measured: bool) -> str:
    cols = ["backend", "kernel", "C", "HxW", "B", "dtype", "MB", "TC GFLOP (prec)", "CUDA GFLOP", "launch",
            "programs", "regs", "smem B", "CTAs/SM", "waves", "t_mem us", "t_tc us", "t_cuda us", "bound us",
            "bound by"]
    if measured:
        cols += ["measured us", "fraction", "GB/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rs:
        grid = "x".join(str(g) for g in r["grid"]) if r["grid"] else "n/a"
        ge = ">=" if r.get("lower_bound") else ""
        if r.get("job_splits"):
            grid += " (" + "/".join(map(str, r["job_splits"])) + ")"
        cells = [r["backend"], r["kernel"].replace("gma_", "").replace("_kernel", ""), str(r["C"]),
                 f"{r['H']}x{r['W']}", str(r["B"]), r["dtype"], f"{ge}{r['bytes'] / 1e6:.2f}",
                 f"{r['tc_flops'] / 1e9:.3f} ({r['tc_precision']})", f"{r['cuda_flops'] / 1e9:.3f}", grid,
                 _fmt(r["programs"], "{}"), _fmt(r["registers"], "{}"), _fmt(r["shared"], "{}"),
                 _fmt(r["ctas_per_sm"], "{}"),
                 _fmt(r["waves"], "{:.2f}") if r["waves"] is not None else
                 (f"{r['programs_per_sm']:.2f}/SM" if r["programs_per_sm"] else "n/a"),
                 f"{ge}{r['t_mem_us']:.2f}", f"{r['t_tc_us']:.2f}", f"{ge}{r['t_cuda_us']:.2f}", f"{ge}{r['bound_us']:.2f}",
                 r["bound_by"]]
        if measured:
            cells += [_fmt(r.get("measured_us"), "{:.2f}"), _fmt(r.get("fraction_of_bound"), "{:.2f}"),
                      _fmt(r.get("achieved_GBps"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_triton_resources() -> Optional[str]:
    found = sorted(glob.glob(os.path.join(HERE, "results", "triton_resources_*.md")), key=os.path.getmtime)
    return found[-1] if found else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="groupmixformer_s")
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 1])
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--shape", nargs=3, type=int, action="append", metavar=("C", "H", "W"),
                    help="only this (C, H, W) (repeatable; default: the model's four stages)")
    ap.add_argument("--triton-resources", default=None,
                    help="specializations --json results, or a triton_resources_*.md (default: newest in results/)")
    ap.add_argument("--cuda-resources", default=None, help="a CUDA build's resources.json")
    ap.add_argument("--measured", default=None, help="benchmarks/ops.py rows (CSV / JSON / report.json)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--train", action="store_true",
                    help="also the training kernels with a cost model (Triton's attention backward)")
    a = ap.parse_args(argv)
    if any(b < 1 for b in a.batch):
        ap.error(f"--batch {' '.join(map(str, a.batch))}: every batch must be >= 1")
    for C, H, W in a.shape or []:
        if C <= 0 or C % 10 or H < 1 or W < 1:
            ap.error(f"--shape {C} {H} {W}: C a positive multiple of 10, H and W >= 1")

    tres_path = a.triton_resources or default_triton_resources()
    tres = load_triton_resources(tres_path) if tres_path else None
    cres = load_cuda_resources(a.cuda_resources) if a.cuda_resources else None
    meas = load_measured(a.measured) if a.measured else None
    rs = rows(a.model, a.batch, a.dtype, a.backends, tres, cres, meas,
              shape_list=[tuple(s) for s in a.shape] if a.shape else None, train=a.train)
    print(f"# Roofline: {a.model}, H100 bounds ({PEAKS['hbm_Bps'] / 1e12:.1f} TB/s, "
          f"{PEAKS['tc_bf16_flops'] / 1e12:.0f} TFLOP/s fp16/bf16 tensor cores, "
          f"{PEAKS['tc_tf32_flops'] / 1e12:.0f} TF32 (3xTF32: a third), "
          f"{PEAKS['fma_fp32_flops'] / 1e12:.0f} fp32 FMA), "
          f"{SMS} SMs")
    print(f"Triton resources: {tres_path or 'n/a'}; CUDA resources: {a.cuda_resources or 'n/a'}; "
          f"measured: {a.measured or 'none (bounds only: estimates, not measurements)'}")
    if a.train:
        print("Training kernels: registers n/a here (their ptxas figures per dot variant: "
              "benchmarks/results/triton_backward_resources_*.md)")
    notes = sorted({r["notes"] for r in rs if r["notes"]})
    for n in notes:
        print(f"Note: {n}")
    print()
    print(markdown(rs, meas is not None))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"peaks": PEAKS, "sms": SMS, "capability": list(CAPABILITY), "triton_resources": tres_path,
                       "cuda_resources": a.cuda_resources, "measured": a.measured, "rows": rs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
