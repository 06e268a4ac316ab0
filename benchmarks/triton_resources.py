"""Compile every gmf Triton kernel specialisation that real calls make the JIT compile, for
sm_70, sm_75, sm_80 and sm_90 (no GPU needed), and write their register / spill /
shared-memory usage as a markdown table.

    python benchmarks/triton_resources.py [--jobs 2] [--out benchmarks/results/triton_resources_sm70_sm75_sm80_sm90.md]
    python benchmarks/triton_resources.py --backward   # the training backward kernels
    python benchmarks/triton_resources.py --statistics # the training statistics pass + the backward's recompute
    python benchmarks/triton_resources.py --aggregate-sweep  # the aggregation's default tiles, by occupancy (~14 min)

Specialisations (gmf_kernels/triton_kernels/specializations.py): the layer calls of the five
released models at 224x224 (stage widths at grids 56, 28, 14, 7), batch 128 and 1, fp32 /
fp16 / bf16, each planned by the launcher on meta tensors and specialised by Triton's own
JIT binder (integer divisibility, ==1 constants, pointer alignment, as at run time), then
deduplicated. Each is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`` in worker processes with TRITON_INTERPRET unset and an empty Triton cache (so
the compile times are real), with Triton's default line information. Registers and spill
bytes come from ``ptxas -lineinfo -v`` re-run on the generated PTX, local/stack bytes from
``cuobjdump --dump-resource-usage`` on the cubin, dynamic shared memory from Triton's kernel
metadata.

``--aggregate-sweep`` compiles every released width's aggregation (one per width, dtype and
arch; sm_80 and sm_90 by default) with each tile of SWEEP_TILES and writes
``results/triton_aggregate_tile_sweep_sm80_sm90.{md,json}``: per (width, dot precision) the
registers, spills and resident warps per SM of every tile, the default of `config.agg_tiles`,
and the tile the occupancy rule (`occupancy_choice`) picks. The defaults in `config.AGG_TILES`
/ `AGG_TILES_BY_DOTS` follow that rule (tests/test_aggregate_tiles.py checks them against the
committed JSON); a GPU's `benchmarks/tune.py` measures and overrides them.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

#: per-SM limits used for the occupancy estimate: (registers, shared bytes usable by CTAs, max warps)
SM_LIMITS = {70: (65536, 96 * 1024, 64), 75: (65536, 64 * 1024, 32), 80: (65536, 164 * 1024, 64),
             90: (65536, 228 * 1024, 64)}


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip() or "uncommitted"
        # the tables under benchmarks/results are this script's outputs, not what it compiles
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" with uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def _ptxas_version(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    except Exception as e:  # pragma: no cover - informational only
        return f"unknown ({e})"


def resident_ctas(arch: int, registers: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM allowed by registers, shared memory and the warp limit (an estimate)."""
    regs, smem, max_warps = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256          # allocation granularity: 256 per warp
    by_regs = regs // (per_warp * num_warps)
    reserved = 1024 if arch >= 80 else 0                 # sm_80+: 1 KB of shared memory reserved per CTA
    shared = shared + reserved
    by_smem = smem // shared if shared else max_warps    # no shared memory: not a limit
    return min(by_regs, by_smem, max_warps // num_warps)


def ctas_per_sm(r: dict) -> str:
    """Resident CTAs per SM allowed by registers and shared memory (an estimate)."""
    if "error" in r or r.get("registers", -1) < 0:
        return "-"
    warps = r["num_warps"]
    n = resident_ctas(r["arch"], r["registers"], warps, r.get("shared_dynamic", 0) + r.get("cuobjdump_shared", 0))
    return f"{n} ({n * warps} warps)"


#: the tiles column's mark of the one-pass TF32 variants (backward and recompute kernels of fp16/bf16 layers)
ONE_PASS_TF32 = "TF32 dots (fp16/bf16 layers)"


def _cell(r: dict, missing: str = "not supported") -> str:
    if r is None:   # the arch refuses this dtype, or uses the tiles of another row
        return f"{missing} | - | - | -"
    if "error" in r:
        return f"**FAILED**: {r['error'][:80]} | | |"
    spill = f"{r['spill_stores']}/{r['spill_loads']}"
    if r["spill_stores"] or r["spill_loads"]:
        spill = f"**{spill}**"
    shared = r.get("shared_dynamic", 0) + r.get("cuobjdump_shared", 0)
    return f"{r['registers']} | {spill} | {shared} | {ctas_per_sm(r)}"


def _used_by(r: dict) -> str:
    """Compact list of the calls using a specialisation: 'grid B=batches [models]' per grid."""
    grids = {}
    for u in r.get("used_by", []):
        call, models = u.split(" [")
        _, grid, batch, _ = call.split(" ")
        g = grids.setdefault(grid, [set(), set()])
        g[0].add(batch.replace("B=", ""))
        g[1].update(models.rstrip("]").split(","))
    return "; ".join(f"{grid} B={'/'.join(sorted(b, key=int, reverse=True))} [{','.join(sorted(m))}]"
                     for grid, (b, m) in sorted(grids.items(), key=lambda kv: -int(kv[0].split("x")[0])))


def markdown(results, wall_s: float, jobs: int, kind: str = "forward") -> str:
    import torch
    import triton
    def tiles_of(r):
        """The tiles of a row (the dots' precision follows from dtype and arch, but for the backward's and
        the recompute's one-pass TF32 variants of fp16/bf16 layers, on the same fp32 tensors: marked)."""
        label = r["label"]
        tiles = label[label.index("(") + 1:label.index(";")] if "(" in label else ""
        kept = [t for t in tiles.split(", ") if not t.startswith(("tf32", "ieee"))]
        if kind != "forward" and r.get("dot_precision") == "tf32":
            kept.append(ONE_PASS_TF32)
        return ", ".join(kept)

    by_key = {}
    for r in results:
        by_key.setdefault((r["kernel"], r["C"], r["dtype"], tiles_of(r), r["specialised"]), {})[r["arch"]] = r
    supported = {(r["arch"], r["dtype"]) for r in results}
    archs = sorted({r["arch"] for r in results})
    ok = [r for r in results if "error" not in r]
    spilled = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
    no_lines = [r for r in ok if not r.get("line_info")]
    from gmf_kernels.triton_kernels.specializations import KERNEL_ORDER
    order = {r["kernel"]: KERNEL_ORDER[r["function"]] for r in results}
    what = ("Specialisations: every one that the training backward of the released models' layers at 224x224 "
            "(stage grids 56, 28, 14, 7; batch 128 and 1) makes Triton's JIT compile, for the layers that run the "
            "backward kernels (`config.backward_kernels_take`: C <= 320 on sm_70/75, every width on sm_80+), on the "
            "stage tensors, "
            "the depthwise backward's reads of qkv and the stores into the qkv gradient "
            "in the input's dtype (fp32, fp16, bf16: `config.stage_dtype`), with and without batch statistics, fused B3 (S_PAD <= 64) and separate B3, derived from "
            "the launchers' own plans (`specializations.backward_specializations`) and Triton's own argument "
            "specialisation. Dots: the backward's (`statistics.backward_dots`, the forward's for the input dtype): "
            "fp32 FMA (`ieee`) on sm_70/75, 3xTF32 (fp32 inputs) / one-pass TF32 (fp16, bf16) on sm_80+."
            ) if kind == "backward" else (
        "Specialisations: every one that the training forward's statistics pass (all released widths; keeping Z "
        "and y for the backward, `store`, where the layer runs the backward kernels), the training forward's "
        "kernels reading that Z and keeping what the backward would recompute (`from Z`, `keep stats`, `keep R`: "
        "`config.from_planes`) and the backward's recompute "
        "kernels (V from the kept Z, proxy_v; Z, P, y, recompute_z, for eval with gradients; the softmax "
        "statistics, KV and the CRPE; the local "
        "branch: recompute.py; the layers that run the backward kernels: C <= 320 on sm_70/75, all on sm_80+) of "
        "the released models' "
        "layers at 224x224 (stage grids 56, 28, 14, 7; batch 128 and 1; fp32, fp16 and bf16 inputs) make "
        "Triton's JIT compile, derived from the launchers' own plans (`specializations.statistics_specializations`)"
        ". Dots: the statistics kernel's fp32 whatever the input dtype (FMA on sm_70/75, 3xTF32 on sm_80+); the "
        "recompute kernels' the backward's (`statistics.backward_dots`: 3xTF32 for fp32, one-pass TF32 for fp16/bf16 "
        "on sm_80+).") if kind == "statistics" else (
        "Specialisations: every one that the released models' layer calls at 224x224 (stage grids 56, 28, 14, "
        "7; batch 128 and 1; fp32, fp16, bf16) make Triton's JIT compile, derived from the launcher's own plan "
        "of each call and Triton's own argument specialisation (integer divisibility by 16, ==1 constants, "
        "16-byte pointer alignment). The kernels exempt their shape integers (N, H, W, the per-job split counts "
        "splits0..4 of the aggregation's cost-balanced plan) from specialisation, so one variant per (kernel, C, dtype, arch) serves every image size and batch; "
        "the strides stay specialised (`stride%16` below). Dots: fp32 FMA (`ieee`) on sm_70/75, 3xTF32 "
        "(fp32 inputs) / TF32 (fp16, bf16) on sm_80+ (`triton_kernels/config.py` ARCH_DOTS). Line "
        "information on (Triton's default: `.loc` in the PTX, `ptxas -lineinfo`).")
    lines = [
        "# Triton " + {"forward": "", "backward": "backward ", "statistics": "training statistics and recompute "}[kind]
        + "kernels: resources per specialisation ("
        + ", ".join(f"sm_{a}" for a in archs) + ")",
        "",
        f"Written by `benchmarks/triton_resources.py` on {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"git {_git_sha()}, triton {triton.__version__}, torch {torch.__version__}, "
        + ", ".join(f"ptxas(sm_{a}) {_ptxas_version(a)}" for a in archs) + ".",
        "Compiled ahead of time on a machine **without a GPU** (`triton.compile` + `GPUTarget`): these are "
        "compiler figures, not measurements of a run.",
        "",
        what,
        "",
        "## Summary",
        "",
        f"- {len(ok)}/{len(results)} compiles succeeded (every (kernel, width, dtype, arch) but the (arch, dtype) "
        f"pairs the backend refuses, bf16 below sm_80; a row per tile choice, so the FMA variant of sm_70/75 "
        f"has its own rows where its tiles differ), "
        + (f"wall time {wall_s:.0f} s with {jobs} worker processes, " if wall_s == wall_s else
           "rendered from an earlier run's JSON (its wall time not recorded), ") +
        f"sum of compile times {sum(r.get('compile_s', 0) for r in ok):.0f} s.",
    ]
    for k in sorted(order, key=order.get):
        for a in archs:
            rs = [r for r in ok if r["kernel"] == k and r["arch"] == a]
            if rs:
                mx = max(rs, key=lambda r: r["registers"])
                lines.append(f"- `{k}` sm_{a}: max {mx['registers']} registers/thread ({mx['label']}); "
                             f"max shared {max(r['shared_dynamic'] + r.get('cuobjdump_shared', 0) for r in rs)} B.")
    lines.append(f"- Spills: {'none' if not spilled else ', '.join(r['label'] + ' sm_' + str(r['arch']) for r in spilled)}.")
    lines.append(f"- Line information: {'in every kernel' if not no_lines else 'MISSING in ' + str(len(no_lines))}.")
    lines += [
        "",
        "Columns per arch: registers per thread (`ptxas -v`), spill stores/loads in bytes, shared memory per CTA "
        "in bytes (Triton's dynamic + static), and resident CTAs per SM allowed by registers and shared memory "
        "(an estimate; Triton sets no register cap, so ptxas may use up to 255 registers and trade occupancy for it).",
        "",
        "| kernel | C | dtype | tiles | specialised | used by (grid, batch, models) | " + " | ".join(
            f"sm_{a} regs | sm_{a} spill st/ld | sm_{a} shared | sm_{a} CTAs/SM" for a in archs) + " |",
        "|---|---:|---|---|---|---|" + "|".join("---:|---:|---:|---:" for _ in archs) + "|",
    ]
    for (k, C, dt, tiles, spec), per in sorted(by_key.items(), key=lambda kv: (
            order[kv[0][0]], kv[0][1] or 0, kv[0][2], kv[0][3], kv[0][4])):
        any_r = next(iter(per.values()))
        cells = [_cell(per.get(a), "no TF32" if ONE_PASS_TF32 in tiles and a < 80 else
                       "other tiles" if (a, dt) in supported else "not supported") for a in archs]
        lines.append(f"| {k} | {C} | {dt} | {tiles} | {spec} | {_used_by(any_r)} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- the aggregation's tiles by occupancy
#: the aggregation tiles --aggregate-sweep compiles: (BLOCK_P, num_warps, CK), CK at most the padded segment
SWEEP_TILES = tuple(itertools.product((16, 32, 64), (4, 8), (16, 32)))
#: the GPUs it compiles for by default: those of the one-pass TF32 and 3xTF32 dots (the ieee rows are older)
SWEEP_ARCHS = (80, 90)
SWEEP_NAME = "triton_aggregate_tile_sweep_" + "_".join(f"sm{a}" for a in SWEEP_ARCHS)


def aggregate_sweep_specs(archs=SWEEP_ARCHS):
    """Every real aggregation specialisation, one per (C, dtype, arch), recompiled with each tile of
    SWEEP_TILES (the tile's BLOCK_P and CK as constexprs, num_warps as the launch option)."""
    import dataclasses
    from gmf_kernels.triton_kernels.config import dot_pad
    from gmf_kernels.triton_kernels.specializations import _describe, all_specializations
    seen, out = set(), []
    for sp in all_specializations(archs=archs):
        d = _describe(sp)
        if sp.kernel != "gma_aggregate_kernel" or (d["C"], d["dtype"], sp.arch) in seen:
            continue
        seen.add((d["C"], d["dtype"], sp.arch))
        for bp, warps, ck in SWEEP_TILES:
            if ck > dot_pad(d["C"] // 5):
                continue
            cx = dict(sp.constexprs, BLOCK_P=bp, CK=ck)
            opts = dict(sp.options, num_warps=warps)
            out.append(dataclasses.replace(sp, constexprs=tuple(cx.items()), options=tuple(sorted(opts.items()))))
    return out


def sweep_rows(results):
    """The compact rows of a sweep's compile results: C, dtype, arch, dots, tile, registers, spill bytes
    (stores + loads), resident CTAs per SM (None where the compile failed)."""
    import re
    rows = []
    for r in results:
        label = r["label"]
        tile = [int(re.search(rf"{k}=(\d+)", label).group(1)) for k in ("BLOCK_P", "warps", "CK")]
        row = {"C": r["C"], "dtype": r["dtype"], "arch": r["arch"], "dots": r["dot_precision"], "tile": tile}
        if "error" in r or "registers" not in r:
            row.update(registers=None, spills=None, ctas=None, error=str(r.get("error", r.get("skipped")))[:200])
        else:
            row.update(registers=r["registers"], spills=r["spill_stores"] + r["spill_loads"],
                       ctas=resident_ctas(r["arch"], r["registers"], tile[1],
                                          r.get("shared_dynamic", 0) + r.get("cuobjdump_shared", 0)))
        rows.append(row)
    return rows


def occupancy_scores(rows, C: int, dots: str):
    """{tile: (min warps/SM, sum warps/SM, min tokens in flight per SM, -max registers)} over every
    (arch, dtype) compiled with these dots at width C, for the tiles that compiled everywhere without
    a spill (warps/SM: resident CTAs x num_warps; tokens in flight: resident CTAs x BLOCK_P)."""
    mine = [r for r in rows if r["C"] == C and r["dots"] == dots]
    cases = {(r["arch"], r["dtype"]) for r in mine}
    scores = {}
    for tile in {tuple(r["tile"]) for r in mine}:
        rs = [r for r in mine if tuple(r["tile"]) == tile]
        if len(rs) != len(cases) or any(r["spills"] is None or r["spills"] for r in rs):
            continue
        warps = [r["ctas"] * tile[1] for r in rs]
        scores[tile] = (min(warps), sum(warps), min(r["ctas"] * tile[0] for r in rs),
                        -max(r["registers"] for r in rs))
    return scores


def occupancy_choice(rows, C: int, dots: str, current):
    """The aggregation tile the occupancy rule picks at width C for these dots: the current default
    while no spill-free tile keeps more warps resident (by (min, sum) over the GPUs and dtypes: the
    taps are L1-bound and the kernel HBM-bound, latency hidden by resident warps), else the best by
    (min warps, sum warps, tokens in flight, fewer registers). None when no tile is spill-free."""
    scores = occupancy_scores(rows, C, dots)
    if not scores:
        return None
    best = max(scores, key=scores.get)
    current = tuple(current)
    if current in scores and scores[current][:2] == scores[best][:2]:
        return current
    return best


def sweep_markdown(rows, wall_s: float, jobs: int) -> str:
    import torch
    import triton
    from gmf_kernels.triton_kernels.config import agg_tiles
    archs = sorted({r["arch"] for r in rows})
    lines = [f"# Triton aggregation: tiles by occupancy ({', '.join(f'sm_{a}' for a in archs)})", "",
             f"Written by `benchmarks/triton_resources.py --aggregate-sweep` on "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}, git {_git_sha()}, triton {triton.__version__}, "
             f"torch {torch.__version__}; {len(rows)} compiles"
             + (f", wall time {wall_s:.0f} s with {jobs} worker processes" if wall_s == wall_s else "") + ".",
             "Compiled ahead of time on a machine **without a GPU**: compiler figures (registers, spills) and an "
             "occupancy estimate (`resident_ctas`), not measurements of a run.", "",
             "Every real aggregation specialisation (released widths, fp32/fp16/bf16) with each tile "
             "(BLOCK_P, num_warps, CK) of " + ", ".join(str(t) for t in SWEEP_TILES) + " (CK at most the padded "
             "segment). Per width and dot precision (3xTF32: fp32 layers; one-pass TF32: fp16 and bf16), over "
             "every GPU and dtype of that precision: min / sum of resident warps per SM, tokens in flight per SM "
             "(resident CTAs x BLOCK_P, the smallest), the most registers. The rule (`occupancy_choice`): "
             "keep the default unless a spill-free tile keeps more warps resident (min, then sum); then take the "
             "best by warps, tokens in flight, registers.", ""]
    summary = ["| C | dots | default (`config.agg_tiles`) | its score | rule's choice | its score | agrees |",
               "|---:|---|---|---|---|---|---|"]
    detail = []
    for C in sorted({r["C"] for r in rows}):
        for dots in sorted({r["dots"] for r in rows if r["C"] == C}):
            scores = occupancy_scores(rows, C, dots)
            cur = tuple(agg_tiles(C, dots))
            pick = occupancy_choice(rows, C, dots, cur)
            summary.append(f"| {C} | {dots} | {cur} | {scores.get(cur, 'spills or not compiled')} | {pick} | "
                           f"{scores.get(pick) if pick else '-'} | {'yes' if pick == cur else '**no**'} |")
            cases = sorted({(r["arch"], r["dtype"]) for r in rows if r["C"] == C and r["dots"] == dots})
            detail.append(f"### C = {C}, {dots}")
            detail.append("")
            detail.append("| tile | " + " | ".join(f"sm_{a} {dt}" for a, dt in cases) + " | score |")
            detail.append("|---|" + "---|" * len(cases) + "---|")
            for tile in sorted({tuple(r["tile"]) for r in rows if r["C"] == C and r["dots"] == dots}):
                cells = []
                for a, dt in cases:
                    r = next((r for r in rows if r["C"] == C and r["dots"] == dots and r["arch"] == a
                              and r["dtype"] == dt and tuple(r["tile"]) == tile), None)
                    cells.append("-" if r is None else "FAILED" if r["registers"] is None else
                                 f"{r['registers']} r, " + (f"**{r['spills']} B spilled**, " if r["spills"] else "")
                                 + f"{r['ctas']}x{tile[1]} warps")
                mark = " (default)" if tile == cur else ""
                mark += " (rule)" if tile == pick and pick != cur else ""
                detail.append(f"| {tile}{mark} | " + " | ".join(cells) + f" | {scores.get(tile, 'spills')} |")
            detail.append("")
    return "\n".join(lines + ["## Summary", ""] + summary + ["", "## Every tile", ""] + detail)


def run_aggregate_sweep(a, archs) -> int:
    from gmf_kernels.triton_kernels.specializations import compile_all
    base = os.path.join(HERE, "results", SWEEP_NAME if archs == SWEEP_ARCHS else
                        "triton_aggregate_tile_sweep_" + "_".join(f"sm{x}" for x in archs))
    out = a.out or base + ".md"
    t0 = time.time()
    if a.from_json:
        with open(a.from_json) as fh:
            data = json.load(fh)
        rows = data["rows"] if isinstance(data, dict) else sweep_rows(data)
        wall = float("nan")
    else:
        def progress(done, total):
            if done % 25 == 0 or done == total:
                print(f"[sweep] {done}/{total} compiled, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="gmf_triton_cache_") as tmp:
            rows = sweep_rows(compile_all(aggregate_sweep_specs(archs), a.jobs, tmp, progress=progress))
        wall = time.time() - t0
    with open(a.json or os.path.splitext(out)[0] + ".json", "w") as fh:
        json.dump({"archs": list(archs), "tiles": [list(t) for t in SWEEP_TILES], "git": _git_sha(), "rows": rows},
                  fh, indent=0)
    text = sweep_markdown(rows, wall, a.jobs)
    with open(out, "w") as fh:
        fh.write(text)
    print(text)
    return 1 if any(r["registers"] is None for r in rows) else 0



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))   # the first paragraph
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--arch", type=int, nargs="+", default=None, help="default: config.AOT_ARCHS (70 75 80 90)")
    ap.add_argument("--out", default=None,
                    help="default: benchmarks/results/triton_resources_sm<a>_..._sm<z>.md")
    ap.add_argument("--json", default="", help="also write the raw per-specialisation results here")
    ap.add_argument("--warm-cache", action="store_true", help="use Triton's normal cache instead of an empty one")
    ap.add_argument("--backward", action="store_true", help="the training backward kernels instead of the forward")
    ap.add_argument("--statistics", action="store_true",
                    help="the training statistics pass and the backward's recompute kernels (statistics.py, recompute.py)")
    ap.add_argument("--aggregate-sweep", action="store_true",
                    help="the aggregation compiled with every tile of SWEEP_TILES, and the occupancy rule's default "
                         "per width (default archs: 80 90; writes results/triton_aggregate_tile_sweep_*.md and .json)")
    ap.add_argument("--from-json", default="", help="render the table from a previous run's --json (compile nothing)")
    a = ap.parse_args(argv)
    from gmf_kernels.triton_kernels.config import AOT_ARCHS
    if a.aggregate_sweep:
        return run_aggregate_sweep(a, tuple(a.arch or SWEEP_ARCHS))
    from gmf_kernels.triton_kernels.specializations import (all_specializations, backward_specializations, compile_all,
                                                            statistics_specializations)
    archs = tuple(a.arch or AOT_ARCHS)
    kind = "statistics" if a.statistics else "backward" if a.backward else "forward"
    prefix = {"forward": "triton_resources_", "backward": "triton_backward_resources_",
              "statistics": "triton_statistics_resources_"}[kind]
    out = a.out or os.path.join(HERE, "results", prefix + "_".join(f"sm{x}" for x in archs) + ".md")
    t0 = time.time()
    if a.from_json:
        with open(a.from_json) as fh:
            results = json.load(fh)
        wall = float("nan")                       # not known: the compiles ran in the earlier run
    else:
        specs = {"forward": all_specializations, "backward": backward_specializations,
                 "statistics": statistics_specializations}[kind](archs=archs)
        with tempfile.TemporaryDirectory(prefix="gmf_triton_cache_") as tmp:
            results = compile_all(specs, a.jobs, "" if a.warm_cache else tmp)
        wall = time.time() - t0
    if a.json and not a.from_json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    text = markdown(results, wall, a.jobs, kind)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
    print(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    # before anything imports triton (the functions import it lazily); not at import time: a test
    # process importing this module keeps its interpreter
    os.environ.pop("TRITON_INTERPRET", None)
    raise SystemExit(main())
