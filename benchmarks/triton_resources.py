"""Compile every gmf Triton kernel specialisation for sm_80 and sm_90 (no GPU needed) and
write their register / spill / shared-memory usage as a markdown table.

    python benchmarks/triton_resources.py [--jobs 2] [--out benchmarks/results/triton_resources_sm80_sm90.md]

Specialisations: the three kernels (aggregate, KV combine, attention) for every width the
five released models use (C = 40 ... 480) and every input dtype (fp32, fp16, bf16),
identical constexpr sets compiled once (see gmf_kernels/triton_kernels/specializations.py).
Each is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
in worker processes with TRITON_INTERPRET unset and an empty Triton cache (so the
compile times are real). Registers and spill bytes come from ``ptxas -v`` re-run on the
generated PTX, local/stack bytes from ``cuobjdump --dump-resource-usage`` on the cubin,
dynamic shared memory from Triton's kernel metadata.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.pop("TRITON_INTERPRET", None)  # before anything imports triton
sys.path.insert(0, ROOT)

#: per-SM limits used for the occupancy estimate: (registers, shared bytes usable by CTAs, max warps)
SM_LIMITS = {80: (65536, 164 * 1024, 64), 90: (65536, 228 * 1024, 64)}


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def _ptxas_version(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    except Exception as e:  # pragma: no cover - informational only
        return f"unknown ({e})"


def ctas_per_sm(r: dict) -> str:
    """Resident CTAs per SM allowed by registers and shared memory (an estimate)."""
    if "error" in r or r.get("registers", -1) < 0:
        return "-"
    regs, smem, max_warps = SM_LIMITS[r["arch"]]
    warps = r["num_warps"]
    per_warp = -(-r["registers"] * 32 // 256) * 256          # allocation granularity: 256 per warp
    by_regs = regs // (per_warp * warps)
    shared = r.get("shared_dynamic", 0) + r.get("cuobjdump_shared", 0) + 1024  # + 1 KB reserved per CTA
    by_smem = smem // shared
    n = min(by_regs, by_smem, max_warps // warps)
    return f"{n} ({n * warps} warps)"


def _cell(r: dict) -> str:
    if r is None:
        return "not compiled | | | |"
    if "error" in r:
        return f"**FAILED**: {r['error'][:80]} | | | |"
    spill = f"{r['spill_stores']}/{r['spill_loads']}"
    if r["spill_stores"] or r["spill_loads"]:
        spill = f"**{spill}**"
    shared = r.get("shared_dynamic", 0) + r.get("cuobjdump_shared", 0)
    return f"{r['registers']} | {spill} | {shared} | {ctas_per_sm(r)}"


def markdown(results, wall_s: float, jobs: int) -> str:
    import torch
    import triton
    by_key = {}
    for r in results:
        by_key.setdefault((r["kernel"], r["C"], r["dtype"]), {})[r["arch"]] = r
    archs = sorted({r["arch"] for r in results})
    ok = [r for r in results if "error" not in r]
    spilled = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
    lines = [
        "# Triton kernels: resources per specialisation (sm_80, sm_90)",
        "",
        f"Written by `benchmarks/triton_resources.py` on {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"git {_git_sha()}, triton {triton.__version__}, torch {torch.__version__}, "
        + ", ".join(f"ptxas(sm_{a}) {_ptxas_version(a)}" for a in archs) + ".",
        "Compiled ahead of time on a machine **without a GPU** (`triton.compile` + `GPUTarget`): these are "
        "compiler figures, not measurements of a run.",
        "",
        "## Summary",
        "",
        f"- {len(ok)}/{len(results)} compiles succeeded ({len(by_key)} specialisations x {len(archs)} archs), "
        f"wall time {wall_s:.0f} s with {jobs} worker processes, "
        f"sum of compile times {sum(r.get('compile_s', 0) for r in ok):.0f} s.",
    ]
    for k in ("aggregate", "attention", "combine"):
        rs = [r for r in ok if r["kernel"] == k]
        if rs:
            mx = max(rs, key=lambda r: r["registers"])
            lines.append(f"- `{k}`: max {mx['registers']} registers/thread ({mx['label']}, sm_{mx['arch']}); "
                         f"max shared {max(r['shared_dynamic'] + r.get('cuobjdump_shared', 0) for r in rs)} B.")
    lines.append(f"- Spills: {'none' if not spilled else ', '.join(r['label'] + ' sm_' + str(r['arch']) for r in spilled)}.")
    lines += [
        "",
        "Columns per arch: registers per thread (`ptxas -v`), spill stores/loads in bytes, shared memory per CTA "
        "in bytes (Triton's dynamic + static), and resident CTAs per SM allowed by registers and shared memory "
        "(an estimate; Triton sets no register cap, so ptxas may use up to 255 registers and trade occupancy for it).",
        "",
        "| kernel | C | dtype | used by | tiles | " + " | ".join(
            f"sm_{a} regs | sm_{a} spill st/ld | sm_{a} shared | sm_{a} CTAs/SM" for a in archs) + " |",
        "|---|---:|---|---|---|" + "|".join("---:|---:|---:|---:" for _ in archs) + "|",
    ]
    for (k, C, dt), per in by_key.items():
        any_r = next(iter(per.values()))
        label = any_r["label"]
        tiles = label[label.index("(") + 1:label.rindex(")")] if "(" in label else ""
        lines.append(f"| {k} | {C} | {dt} | {any_r.get('used_by', '')} | {tiles} | "
                     + " | ".join(_cell(per.get(a)) for a in archs) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "triton_resources_sm80_sm90.md"))
    ap.add_argument("--warm-cache", action="store_true", help="use Triton's normal cache instead of an empty one")
    a = ap.parse_args(argv)
    from gmf_kernels.triton_kernels.specializations import compile_all
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gmf_triton_cache_") as tmp:
        results = compile_all(tuple(a.arch), a.jobs, "" if a.warm_cache else tmp)
    wall = time.time() - t0
    text = markdown(results, wall, a.jobs)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        fh.write(text)
    print(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
