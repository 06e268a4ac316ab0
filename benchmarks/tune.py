#!/usr/bin/env python
"""Sweep every registered tuning search space on a lent GPU and write the table the library reads.

    python benchmarks/tune.py                        # on a GPU: ~8 minutes, writes gmf_kernels/data/tuning/<arch>.json
    python benchmarks/tune.py --budget 300 --dtype bf16 --models s
    python benchmarks/tune.py --train                # on a GPU: the training kernels' families instead (~8 minutes)
    python benchmarks/tune.py --dry-run              # any machine: the plan and a plumbing check, no timing

What it measures (`gmf_kernels.tuning`, the table format is in its docstring):

* ``kernels``: for every registered search space (``tuning.spaces()``: "triton.aggregate" and
  "triton.attention" from gmf_kernels/triton_kernels/launcher.py, "cuda.tiles" from
  gmf_kernels/cuda/launcher.py) and every (C, dtype) of the GroupMixFormer-S/B/L widths (each at
  its first stage grid at 224x224, batch --batch), the time of each candidate config; the
  fastest is the entry. Triton candidates are timed on their kernel alone (the other
  launches of the call use the defaults; an aggregation candidate that splits the forward,
  ``SPLIT``, on its Z pass and its aggregation together: `STAGE_KERNELS`), candidates whose
  compiled kernels spill registers are refused, and each candidate's ``pre`` is compared with the default config's (a tile
  must not change the result beyond rounding). CUDA candidates are timed on the whole
  pre-projection (the tile shapes both tile kernels) and compared the same way.
* ``--train``: the training kernels' families instead (`gmf_kernels.triton_kernels.tile_spaces`:
  the statistics pass, the recompute, B1, B2, the CRPE backward and the aggregation backward),
  each candidate written as the only entry of a temporary table so that the library's own
  lookup (`tile_spaces.tuned_tiles`) runs it, all other families at their defaults. Timed on
  the op the family runs in: the statistics pass as a training step with a backward runs it, keeping
  Z and y (``gmf::triton_z_moments_planes``), for "triton.statistics"; a whole training step of one layer's
  pre-projection (statistics pass, forward, backward: `GpuMeasure._layer_step`) for "triton.backward"
  (`STEP_FAMILY`), whose dense candidate changes the forward too; the whole backward of one layer
  (``gmf::triton_pre_projection_backward``, batch statistics, with those kept planes and what the forward keeps,
  as a training step passes them; without, for the recompute families, whose kernels only run then) for the
  others, so an entry's time is that op's, not one kernel's. A
  candidate is refused when a variant of the family's kernels first compiled for it spills (read
  from Triton's cache of compiled kernels), or when its results (the moments and planes; the qkv and every
  weight gradient) differ from the default config's beyond rounding.
* ``backends``: then, with the new kernel entries in effect, the pre-projection time (qkv ->
  pre, benchmarks/ops.py's StageInputs) of each backend (cuda, triton, torch) per (C, dtype),
  which ``auto`` reads (`tuning.backend_times`) for calls without gradients.
* ``backends_train`` (with --train, after the families): one layer's training step per backend, a
  `GroupMixAttention` in train mode (batch statistics) forward and backward, under autocast at
  fp16 / bf16 as AMP runs it (`GpuMeasure.backends_train`), which ``auto`` reads for training calls
  (train mode or gradients): the forward's times say nothing of a backward (the H200's report of
  2026-12-04 had the Triton pre-projection 1.5x the CUDA one's speed, and its training step 0.86x).

Time: --budget seconds in all (default 480, inside the 8 minutes of a lent GPU run). First, up
to WARM_SHARE of it, the Triton kernels the sweep will compile are compiled ahead in parallel
with their launchers (`warm_cache`; `--no-warm` skips it), so that the sweep times candidates
instead of compiling them one at a time; what is left is split between the families and the
backend timing (BUDGET_SHARES; time one part does not use carries over). Widths of GroupMixFormer-S come first, bf16 first; when a part's time runs
out the rest of it is recorded as not measured, never dropped silently (an item started in time
stops trying candidates once past the deadline: those are recorded as skipped, `GpuMeasure.late`). A run keeps, from a
measured table of the same architecture already at its path, the entries of the parts it does
not measure (`keep_other_parts`: a --train run keeps the forward's, and back) and, of the parts it
measures, those of the (C, dtype) it does not measure again (a --models s --dtype bf16 run keeps
the other widths' and dtypes' tiles). The table is
rewritten after every (C, dtype) so that a stopped run keeps what it measured, and copied to
$OUT (or --out) when set. Times are do_bench medians (CUDA events, L2 flushed), in us.

Nothing here runs without a CUDA GPU except --dry-run, which prints the plan (families,
candidates per (C, dtype), shapes, budgets) and checks the plumbing: every family's
candidates and default, the Triton tiles build valid specialisations, the CUDA candidates
pass the module's planner when the module loads, and a table written by this script's writer
is read back by `tuning.choose` / `tuning.backend_times` (in a temporary directory).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from gmf_kernels._env import triton_interpreting  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = ("groupmixformer_s", "groupmixformer_b", "groupmixformer_l")
STAGE_GRIDS = (56, 28, 14, 7)
#: share of the budget per part, in order (unused time carries over to the next part). "backends" is last, so
#: what it does not use is lost to the tile families: it times 3 backends per (C, dtype), ~50 ms of do_bench each
#: (10 ms warm-up + 40 ms), ~9 timings in the GPU report's speed part (~1-3 s of its ~34 s there)
BUDGET_SHARES = (("triton.aggregate", 0.35), ("triton.attention", 0.15), ("cuda.tiles", 0.25), ("backends", 0.12))
#: ... and of a --train run (the families of gmf_kernels/triton_kernels/tile_spaces.py)
#: (the recomputes last and small: a training step's backward reads the Z and y its statistics pass kept and
#: what its forward kept, so those families serve eval-mode calls with gradients only)
TRAIN_BUDGET_SHARES = (("triton.backward", 0.25), ("triton.statistics", 0.25),
                       ("triton.b2", 0.1), ("triton.b1", 0.1), ("triton.b2_crpe", 0.1),
                       ("triton.recompute_attention", 0.05), ("triton.recompute_z", 0.05),
                       ("triton.recompute_local", 0.05))
#: the training family timed on a whole training step of one layer (`GpuMeasure._layer_step`) instead of the backward
#: op: its candidates change the forward too (B3's dense form, `aggregation_backward.BackwardTiles.DENSE`: the
#: statistics pass in the dense form, no y nor w4 kept, the local branch's Z read by the forward's aggregation)
STEP_FAMILY = "triton.backward"
#: --train's last part, after the families: one layer's training step per backend (`GpuMeasure.backends_train`)
BACKENDS_TRAIN_SHARE = ("backends_train", 0.1)
BACKENDS = ("cuda", "triton", "torch")
#: the parts that time whole backends (tables "backends" / "backends_train"), not a kernel family's tiles
BACKEND_PARTS = ("backends", "backends_train")
#: share of --budget in which the Triton kernels of the sweep may be compiled ahead, in parallel (warm_cache)
WARM_SHARE = 0.25
#: max relative difference of a candidate's pre from the default config's (per dtype): rounding only
AGREE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
#: the kernels a forward family's candidate is timed on (`GpuMeasure.triton`), by name: the aggregation's, with the
#: Z pass of its SPLIT candidates (`config.GMAShape.AGG_SPLIT`; on tensor cores with ZDENSE), or the one kernel of its
#: FUSED ones (`dense_z.gma_dense_aggregate_kernel`), and the combine, whose work is the candidate's partial rows (a
#: row per segment and tile with FUSED, per split otherwise); the attention's
STAGE_KERNELS = {"triton.aggregate": ("gma_statistics_kernel", "gma_dense_z_kernel", "gma_aggregate_kernel",
                                      "gma_dense_aggregate_kernel", "gma_combine_kernel"),
                 "triton.attention": ("gma_attention_kernel",)}


# ------------------------------------------------------------------ plan
def shapes(models: Sequence[str] = MODELS) -> List[Tuple[int, int, int]]:
    """(C, H, W): each distinct width of the models, at the first (largest) stage grid it has,
    in the order met (the first model's widths first)."""
    from gmf_kernels.models.configs import MODEL_CONFIGS, canonical_name
    out: Dict[int, Tuple[int, int, int]] = {}
    for m in models:
        for C, g in zip(MODEL_CONFIGS[canonical_name(m)]["embedding_dims"], STAGE_GRIDS):
            out.setdefault(int(C), (int(C), g, g))
    return list(out.values())


def load_spaces(train: bool = False) -> Dict[str, object]:
    """Every registered search space of the forward (importing the launchers registers theirs),
    or with train=True those of the training kernels (`tile_spaces.families`)."""
    from gmf_kernels import tuning
    if train:
        from gmf_kernels.triton_kernels import train_op  # noqa: F401  (imports every module that registers a family)
        from gmf_kernels.triton_kernels.tile_spaces import families
        return {f: tuning.spaces()[f] for f in families()}
    import gmf_kernels.cuda.launcher  # noqa: F401  registers "cuda.tiles"
    import gmf_kernels.triton_kernels.launcher  # noqa: F401  registers "triton.aggregate", "triton.attention"
    return {f: sp for f, sp in tuning.spaces().items() if f in dict(BUDGET_SHARES)}


def part_budgets(total: float, parts: Sequence[str]) -> Dict[str, float]:
    shares = {k: v for k, v in BUDGET_SHARES + TRAIN_BUDGET_SHARES + (BACKENDS_TRAIN_SHARE,)}
    s = sum(shares.get(p, 0.1) for p in parts)
    return {p: total * shares.get(p, 0.1) / s for p in parts}


# ------------------------------------------------------------------ table
def new_table(arch: str, device: str, dry_run: bool = False) -> Dict:
    from importlib import metadata
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = "not installed"
    try:
        from ops import git_sha
        sha = git_sha()
    except Exception:  # informational only
        sha = "unknown"
    return {"arch": arch, "measured": not dry_run, "device": device,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_sha": sha,
            "torch": torch.__version__, "triton": triton_version, "kernels": {}, "backends": {},
            "backends_train": {}, "candidates": {}, "not_measured": []}


def keep_other_parts(table: Dict, path: str, parts: Sequence[str]) -> Dict:
    """`table` with what this run will not measure kept from the table at `path`: the entries of the
    parts it does not measure (a forward run keeps a --train run's families and the other way round),
    recorded under "kept" with that table's date and commit; and, of the parts it does measure, every
    (C, dtype) entry (each replaced when this run measures that item: a run of some widths or dtypes,
    or one cut by its budget, keeps the others' tuned tiles instead of dropping them to the defaults),
    listed under "kept" "entries"."""
    try:
        with open(path) as fh:
            prev = json.load(fh)
    except (OSError, ValueError):
        return table
    if prev.get("arch") != table["arch"] or not prev.get("measured"):
        return table
    kept = [f for f in prev.get("kernels", {}) if f not in parts]
    for f in kept:
        table["kernels"][f] = prev["kernels"][f]
        if f in prev.get("candidates", {}):
            table["candidates"][f] = prev["candidates"][f]
    for f in BACKEND_PARTS:
        if f not in parts and prev.get(f):
            table[f] = prev[f]
            kept.append(f)
    entries = []
    for f in parts:
        src = prev.get(f) if f in BACKEND_PARTS else (prev.get("kernels") or {}).get(f)
        dst = table.setdefault(f, {}) if f in BACKEND_PARTS else table["kernels"].setdefault(f, {})
        for C, by_dt in (src or {}).items():
            for dt, entry in (by_dt or {}).items() if isinstance(by_dt, dict) else ():
                dst.setdefault(C, {})[dt] = entry
                entries.append(f"{f} C={C} {dt}")
        if f not in BACKEND_PARTS and not dst:
            del table["kernels"][f]
    if kept or entries:
        table["kept"] = {"parts": kept, "date": prev.get("date"), "git_sha": prev.get("git_sha"),
                         "device": prev.get("device")}
        if entries:
            table["kept"]["entries"] = entries
    return table


def set_entry(table: Dict, family: str, C: int, dtype: torch.dtype, results: List[Dict]) -> Optional[Dict]:
    """Record every candidate's result and the fastest measured one as the family's entry."""
    from gmf_kernels.tuning import dtype_name
    dn = dtype_name(dtype)
    table["candidates"].setdefault(family, {}).setdefault(str(C), {})[dn] = results
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["time_us"])
    entry = {**best["config"], "time_us": round(best["time_us"], 3)}
    table["kernels"].setdefault(family, {}).setdefault(str(C), {})[dn] = entry
    return entry


def write_table(table: Dict, path: str, copy_dir: Optional[str] = None) -> None:
    """Write atomically (a stopped run leaves the previous complete file), copy to copy_dir."""
    from gmf_kernels import tuning
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(table, fh, indent=1, sort_keys=False)
    os.replace(tmp, path)
    if copy_dir:
        os.makedirs(copy_dir, exist_ok=True)
        shutil.copy(path, os.path.join(copy_dir, f"tuning_{os.path.basename(path)}"))
    tuning.clear_cache()


# ------------------------------------------------------------------ the sweep (budgeted)
def sweep(items: Iterable[Tuple], measure: Callable[..., List[Dict]], deadline: float,
          on_done: Callable[[Tuple, List[Dict]], None], clock: Callable[[], float] = time.monotonic,
          on_error: Optional[Callable[[Tuple, BaseException], bool]] = None) -> List[Tuple]:
    """measure(*item) for each item until `deadline` (clock()); on_done(item, results) after each.
    An item whose measure raises goes to on_error(item, exception), which returns whether the sweep
    can go on (False: the CUDA context is lost); without on_error the exception propagates.
    Returns the items not measured (time ran out, or the sweep could not go on)."""
    left = list(items)
    while left:
        if clock() >= deadline:
            return left
        item = left.pop(0)
        try:
            res = measure(*item)
        except Exception as e:
            if on_error is None:
                raise
            if not on_error(item, e):
                return left
            continue
        on_done(item, res)
    return []


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class GpuMeasure:
    """Timings on the current CUDA device (do_bench medians in us)."""

    #: the current part's deadline (time.monotonic()): an item started before it stops trying
    #: candidates past it (a candidate that compiles on one CPU takes seconds), `late`
    deadline: Optional[float] = None

    def __init__(self, batch: int, warmup_ms: float = 10, rep_ms: float = 40):
        self.batch, self.warmup, self.rep = batch, warmup_ms, rep_ms
        self.device = torch.device("cuda")
        self.cap = tuple(torch.cuda.get_device_capability())

    def late(self, i: int, rec: Dict) -> bool:
        """Past the part's deadline at candidate i (the first, the default every other is compared
        with, always runs): rec marked skipped, with why."""
        if i == 0 or self.deadline is None or time.monotonic() < self.deadline:
            return False
        rec.update(status="skipped", reason="time budget used up")
        return True

    def _bench(self, fn) -> float:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median")) * 1e3

    def _inputs(self, C, H, W, dtype):
        from gmf_kernels.folding import fold_eval
        from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights
        hp = default_hyper(C)
        w = cast_weights(random_gma_weights(C, seed=0), torch.float32, self.device)
        folded = fold_eval(w, hp)
        g = torch.Generator().manual_seed(1)
        qkv = torch.randn(self.batch, H * W, 3 * C, generator=g).to(self.device, dtype)
        return qkv, folded, hp

    def _judge(self, rec: Dict, diff: float, dtype: torch.dtype, spills: int, what: str, fn) -> None:
        """Refuse a candidate that spills or whose `what` differs from the first (default)
        config's beyond rounding (AGREE); else time fn."""
        rec["diff_vs_first"] = diff
        if spills:
            rec.update(status="refused", reason=f"{spills} bytes of register spills")
        elif not diff <= AGREE[_short(dtype)]:
            rec.update(status="refused", reason=f"{what} differs from the default config's by {diff:.2e}")
        else:
            rec.update(status="ok", time_us=self._bench(fn))

    def triton(self, family: str, C: int, H: int, W: int, dtype: torch.dtype, cands: List[Dict]) -> List[Dict]:
        from gmf_kernels.triton_kernels import launcher as L
        from gmf_kernels.triton_kernels._common import dot_variant, kernel_name
        qkv, folded, hp = self._inputs(C, H, W, dtype)
        dots = dot_variant(qkv)
        default_agg = L.aggregate_default(C, dtype, self.cap)
        default_attn = L.attention_default(C, dtype, self.cap)
        # the launches a candidate of the family changes, timed together: the aggregation, after its Z pass where
        # the candidate splits the forward (SPLIT: `statistics.plan_z_pass`); the attention
        stage = STAGE_KERNELS[family]
        ref = None
        out = []
        for i, cfg in enumerate(cands):
            agg, attn = (cfg, default_attn) if family == L.AGG_FAMILY else (default_agg, cfg)
            rec = {"config": dict(cfg)}
            if self.late(i, rec):
                out.append(rec)
                continue
            try:
                shape = L.shape_from_configs(C, dots, agg, attn)
                buf, launches = L.plan_pre_projection(qkv, H, W, folded, float(hp.scale), float(hp.ln_eps),
                                                      shape=shape, dots=dots)
                compiled, timed = [], []
                for k, g, a, kw in launches:
                    c = k[g](*a, **kw)
                    if kernel_name(k) in stage:
                        compiled.append(c)
                        timed.append((k, g, a, kw))
                torch.cuda.synchronize()
                spills = sum(int(getattr(c, "n_spills", 0) or 0) for c in compiled)
                # the family's kernel (after a Z pass; the combine, last, is not the family's)
                main = compiled[:-1] if family == L.AGG_FAMILY else compiled
                rec["registers"] = getattr(main[-1], "n_regs", None)
                if len(main) > 1:
                    rec["registers_before"] = [getattr(c, "n_regs", None) for c in main[:-1]]
                rec["spills"] = spills
                pre = buf["pre"].clone()
                if ref is None:
                    ref = pre

                def run(timed=timed):
                    for k, g, a, kw in timed:
                        k[g](*a, **kw)
                self._judge(rec, _rel_diff(pre, ref), dtype, spills, "pre", run)
            except Exception as ex:  # one failing candidate must not stop the sweep
                rec.update(status="error", reason=f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}")
            out.append(rec)
        return out

    def cuda(self, family: str, C: int, H: int, W: int, dtype: torch.dtype, cands: List[Dict]) -> List[Dict]:
        from gmf_kernels.cuda import launcher as CL
        qkv, folded, hp = self._inputs(C, H, W, dtype)
        ws = list(folded)
        ref = None
        out = []
        for i, cfg in enumerate(cands):
            rec = {"config": dict(cfg)}
            if self.late(i, rec):
                out.append(rec)
                continue
            try:
                fn = lambda: CL.launch_pre_projection(qkv, H, W, ws, float(hp.scale), float(hp.ln_eps), config=cfg)
                pre = fn()
                torch.cuda.synchronize()
                if ref is None:
                    ref = pre
                self._judge(rec, _rel_diff(pre, ref), dtype, 0, "pre", fn)
            except Exception as ex:
                rec.update(status="error", reason=f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}")
            out.append(rec)
        return out

    def train(self, family: str, C: int, H: int, W: int, dtype: torch.dtype, cands: List[Dict]) -> List[Dict]:
        """Each candidate of a training family as the only entry of a temporary tuning table
        (module docstring: --train), timed on the op it runs in."""
        from gmf_kernels import tuning
        from gmf_kernels.triton_kernels import tile_spaces
        from gmf_kernels.triton_kernels.train_op import triton_pre_projection_backward  # noqa: F401  (the op)
        qkv, folded, hp = self._inputs(C, H, W, dtype)
        B, N, s = qkv.shape[0], qkv.shape[1], C // 5
        ws = list(folded)
        dw = (folded.dw3, folded.dw5, folded.dw7, folded.pw)
        grad_pre = torch.randn(B, N, C, generator=torch.Generator().manual_seed(2)).to(self.device, dtype)
        arch = tuning.arch_key(self.cap)
        ref, out = None, []
        with tuning_dir() as tmp:
            if family == "triton.statistics":   # its candidates compile (and are spill-checked) below
                def fn():   # as a training step with a backward runs it: keeping Z and y (STORE)
                    return list(torch.ops.gmf.triton_z_moments_planes(qkv, H, W, *dw))
            elif family == STEP_FAMILY:
                fn = self._layer_step(qkv, C, H, W, hp, grad_pre)
            else:
                # batch statistics for the backward, with the default tiles (an empty table here: not
                # whatever table the machine has)
                # a training step's backward: with the Z and y its statistics pass kept and what its forward kept
                # (the local branch's buffers, R, KV, the softmax statistics), but for the recompute families'
                # own (eval with gradients), whose kernels run only without them
                moments, z, y_all = torch.ops.gmf.triton_z_moments_planes(qkv, H, W, *dw)
                _, *kept = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, H, W, ws, float(hp.scale),
                                                                           float(hp.ln_eps))
                if family == "triton.recompute_z":
                    z = y_all = None
                if family in ("triton.recompute_z", "triton.recompute_local", "triton.recompute_attention"):
                    kept = [None] * len(kept)
                mean = moments[0].float().view(4, s)
                rstd = torch.rsqrt(moments[1] / (3 * B * N) + float(hp.bn_eps)).float().view(4, s)

                def fn():
                    return torch.ops.gmf.triton_pre_projection_backward(grad_pre, qkv, H, W, ws, float(hp.scale),
                                                                        float(hp.ln_eps), mean, rstd, z, y_all,
                                                                        *kept)
            for i, cfg in enumerate(cands):
                rec = {"config": dict(cfg)}
                if self.late(i, rec):
                    out.append(rec)
                    continue
                try:
                    with open(os.path.join(tmp, f"{arch}.json"), "w") as fh:
                        json.dump({"arch": arch, "measured": False, "kernels": {
                            family: {str(C): {tuning.dtype_name(dtype): dict(cfg)}}}}, fh)
                    tuning.clear_cache()
                    before = {id(k) for k in _compiled(tile_spaces.KERNELS[family])}
                    res = fn()
                    torch.cuda.synchronize()
                    new = [k for k in _compiled(tile_spaces.KERNELS[family]) if id(k) not in before]
                    spills = sum(int(getattr(k, "n_spills", 0) or 0) for k in new)
                    rec["registers"] = max((getattr(k, "n_regs", 0) or 0 for k in new), default=None)
                    rec["spills"] = spills if new else "compiled before (not re-read)"
                    if ref is None:
                        ref = res
                    self._judge(rec, max(_rel_diff(a, b) for a, b in zip(res, ref)), dtype, spills, "the results", fn)
                except Exception as ex:  # one failing candidate must not stop the sweep
                    rec.update(status="error", reason=f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}")
                out.append(rec)
        return out

    def _layer_step(self, qkv: torch.Tensor, C: int, H: int, W: int, hp, grad_pre: torch.Tensor) -> Callable:
        """One training step of the Triton pre-projection (`train_op.triton_train_pre_projection`, batch statistics)
        as the tables in effect make it, forward and backward: [qkv's gradient, every pre-projection parameter's].
        For `STEP_FAMILY`, whose candidates shape the forward too (B3's dense form: its statistics pass, what the
        forward keeps, the local branch's Z; `aggregation_backward.tuned_dense_b3`)."""
        from gmf_kernels.numerics import cast_weights, random_gma_weights
        from gmf_kernels.triton_kernels.train_op import triton_train_pre_projection
        from gmf_kernels.weights import PARAM_FIELDS, named_fields
        w = cast_weights(random_gma_weights(C, seed=0), torch.float32, self.device)
        params = [t.requires_grad_(True) for _, t in named_fields(w, PARAM_FIELDS)]
        x = qkv.detach().requires_grad_(True)

        def fn():   # (qkv's and proj's weights take no part in the pre-projection: no gradient, left out)
            pre = triton_train_pre_projection(x, (H, W), w, hp, True)
            grads = torch.autograd.grad(pre, [x] + params, grad_pre, allow_unused=True)
            return [g for g in grads if g is not None]
        return fn

    def _per_backend(self, make_fn: Callable[[str], Callable[[], object]]) -> Dict[str, object]:
        """make_fn(impl)'s call timed for each of BACKENDS (after one untimed call); a backend that cannot
        run it is left out of the result (auto falls back) with why, under "_not_measured"."""
        res: Dict[str, object] = {}
        for impl in BACKENDS:
            try:
                fn = make_fn(impl)
                fn()
                torch.cuda.synchronize()
                res[impl] = round(self._bench(fn), 3)
            except Exception as ex:  # unsupported / not built: not in the table
                res.setdefault("_not_measured", {})[impl] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
        return res

    def backends(self, C: int, H: int, W: int, dtype: torch.dtype) -> Dict[str, object]:
        from ops import StageInputs
        inputs = StageInputs(dict(C=C, H=H, W=W, B=self.batch, dtype=_short(dtype)), self.device)
        with torch.inference_mode():
            return self._per_backend(lambda impl: inputs.pre_projection_fn(impl)[0])

    def backends_train(self, C: int, H: int, W: int, dtype: torch.dtype) -> Dict[str, object]:
        """One layer's training step per backend: a `GroupMixAttention` (upstream's constructor: 8 heads,
        qkv bias) in train mode, fp32 parameters, forward and backward of a fixed output gradient, under
        autocast at fp16 / bf16 (AMP's way; fp32 as is), at this run's batch. The BatchNorms take batch
        statistics and update their running ones at every call, as in training."""
        from gmf_kernels import GroupMixAttention
        B, N = self.batch, H * W
        g = torch.Generator().manual_seed(3)
        x = torch.randn(B, N, C, generator=g).to(self.device).requires_grad_(True)
        grad = torch.randn(B, N, C, generator=g).to(self.device, dtype)
        amp = dtype != torch.float32

        def step_of(impl):
            torch.manual_seed(0)
            m = GroupMixAttention(C, num_heads=8, qkv_bias=True, backend=impl).to(self.device).train()

            def fn():
                with torch.autocast("cuda", dtype=dtype, enabled=amp):
                    out = m(x, (H, W))
                out.backward(grad.to(out.dtype))
            return fn
        return self._per_backend(step_of)


@contextlib.contextmanager
def tuning_dir(path: Optional[str] = None):
    """GMF_TUNING_DIR set to `path` (default: a new temporary folder, removed afterwards) for the
    block and restored after it, the library's table cache cleared on both sides."""
    from gmf_kernels import tuning
    folder = path or tempfile.mkdtemp(prefix="gmf_tune_")
    old = os.environ.get("GMF_TUNING_DIR")
    os.environ["GMF_TUNING_DIR"] = folder
    tuning.clear_cache()
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("GMF_TUNING_DIR", None)
        else:
            os.environ["GMF_TUNING_DIR"] = old
        tuning.clear_cache()
        if path is None:
            shutil.rmtree(folder, ignore_errors=True)


def _short(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _compiled(kernels) -> List[object]:
    """Every compiled variant in Triton's cache of these @triton.jit kernels (all devices)."""
    out = []
    for k in kernels:
        for entry in getattr(k, "device_caches", {}).values():
            out += list(entry[0].values())
    return out


def warm_specs(parts: Sequence[str], shape_list, dtypes, batch: int, cap: Tuple[int, int]) -> List[object]:
    """What the sweep of `parts` will make the JIT compile, in the sweep's order
    (`specializations.tuning_specializations`; needs TRITON_INTERPRET unset)."""
    from gmf_kernels.triton_kernels import specializations as S
    calls = [S.Call(C, H, W, batch, _short(dt)) for dt in dtypes for (C, H, W) in shape_list]   # the items' order
    return S.tuning_specializations(calls, cap[0] * 10 + cap[1], [p for p in parts if p != "backends"])


def warm_cache(parts: Sequence[str], shape_list, dtypes, batch: int, cap: Tuple[int, int], seconds: float) -> float:
    """Compile ahead, in parallel (the CPUs but two) and with their launchers, the Triton kernels the
    sweep will compile (`warm_specs`), starting none after `seconds`: else the sweep compiles each
    candidate's kernels one at a time before timing it, on one CPU (forward candidates of
    GroupMixFormer-S/B/L: 561 specialisations on sm_90 as `--dry-run` counted them on 2026-12-07, the
    aggregation ones 1-4 s each on the development CPU). What is
    compiled here is a cache hit there (same key as the JIT's: tests/test_triton_compile.py); the
    spill check still reads each variant the sweep loads. Returns the seconds spent."""
    from gmf_kernels.triton_kernels import specializations as S
    t0 = time.monotonic()
    specs = warm_specs(parts, shape_list, dtypes, batch, cap)
    if not specs:
        return time.monotonic() - t0
    jobs = S.warm_jobs()
    print(f"[warm] compiling {len(specs)} Triton specialisations of the sweep ahead, {jobs} processes, "
          f"none started after {seconds:.0f} s", flush=True)
    res = S.compile_all(specs, jobs, resources=False, launcher=True, in_order=True, deadline_s=seconds)
    bad = [r for r in res if "error" in r]
    late = sum(1 for r in res if "skipped" in r)
    spent = time.monotonic() - t0
    print(f"[warm] {len(res) - len(bad) - late}/{len(res)} compiled in {spent:.0f} s"
          + (f", {late} not started (the sweep compiles them)" if late else "")
          + (f", {len(bad)} failed (the sweep reports them): {bad[0]['label']}: {bad[0]['error'][:200]}" if bad
             else ""), flush=True)
    return spent


# ------------------------------------------------------------------ dry run
def dry_run(spaces: Dict, shape_list, dtypes, budgets: Dict[str, float], table_dir: Optional[str],
            batch: int = 128) -> int:
    from gmf_kernels import tuning
    from gmf_kernels.triton_kernels import launcher as L
    from gmf_kernels.triton_kernels._common import DotVariant
    from gmf_kernels.triton_kernels.config import dot_precision
    from gmf_kernels.triton_kernels.tile_spaces import KEYS
    cap = (9, 0)
    failures: List[str] = []
    print("tune.py --dry-run: nothing is timed; the plan for an sm_90 GPU and a plumbing check.")
    print(f"shapes (C, H, W): {shape_list}; dtypes: {[_short(d) for d in dtypes]}")
    print("budget per part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in budgets.items()))
    n_runs = 0
    for fam in sorted(spaces):
        sp = spaces[fam]
        print(f"\n[{fam}] budget {budgets.get(fam, 0):.0f} s")
        for (C, H, W) in shape_list:
            for dt in dtypes:
                cands = sp.candidates(C, dt, cap)
                default = sp.default(C, dt, cap)
                n_runs += len(cands)
                print(f"  C={C} {H}x{W} {_short(dt)}: {len(cands)} candidates, default {default}; "
                      f"{[{k: v for k, v in c.items()} for c in cands]}")
                if not cands:
                    failures.append(f"{fam} C={C} {_short(dt)}: no candidate")
                elif default not in cands:
                    failures.append(f"{fam} C={C} {_short(dt)}: default {default} not a candidate")
                if fam in KEYS and any(tuple(c) != KEYS[fam] for c in cands):
                    failures.append(f"{fam} C={C} {_short(dt)}: a candidate without the knobs {KEYS[fam]}")
                if fam in (L.AGG_FAMILY, L.ATTN_FAMILY):
                    dots = DotVariant(dot_precision(_short(dt), cap), False)
                    for c in cands:
                        try:
                            agg = c if fam == L.AGG_FAMILY else L.aggregate_default(C, dt, cap)
                            attn = c if fam == L.ATTN_FAMILY else L.attention_default(C, dt, cap)
                            L.shape_from_configs(C, dots, agg, attn)
                        except Exception as ex:
                            failures.append(f"{fam} C={C} {_short(dt)} {c}: {ex}")
    for part in BACKEND_PARTS:
        if part in budgets:
            print(f"\n[{part}] budget {budgets[part]:.0f} s: {', '.join(BACKENDS)} per (C, dtype)")
    print(f"{n_runs} candidate measurements planned")
    if not triton_interpreting():
        try:
            n = len(warm_specs(list(budgets), shape_list, dtypes, batch, cap))
            print(f"warm-up: {n} Triton specialisations compiled ahead in parallel, within "
                  f"{WARM_SHARE:.0%} of the budget")
        except Exception as ex:
            failures.append(f"warm-up plan: {type(ex).__name__}: {ex}")
    else:
        print("warm-up plan: not listed (TRITON_INTERPRET is set: the launchers would plan interpreter tiles)")
    # the CUDA candidates against the module's planner (when a build loads here)
    try:
        from gmf_kernels.cuda import launcher as CL
        if CL.TILE_FAMILY not in spaces:
            raise LookupError("cuda.tiles not in this run")
        mod = CL.module()
        for (C, H, W) in shape_list:
            for dt in dtypes:
                for c in spaces[CL.TILE_FAMILY].candidates(C, dt, cap):
                    mod.plan(8, H, W, C, CL.DTYPE_CODES[dt], c["tile_h"], c["tile_w"], c["tiles_per_cta"], 0)
        print("cuda.tiles: every candidate accepted by the module's planner")
    except LookupError:
        pass
    except ImportError as ex:
        print(f"cuda.tiles: planner check skipped (module not loadable: {str(ex).splitlines()[0][:120]})")
    except Exception as ex:
        failures.append(f"cuda.tiles planner: {ex}")
    # the writer and the reader agree, in a new temporary directory whatever --table-dir says: a dry run's
    # made-up times must never replace a measured table (the library would read them)
    if table_dir:
        print(f"--table-dir {table_dir}: not written (a dry run writes its test table to a temporary folder)")
    with tuning_dir(None) as tmp:
        C, H, W = shape_list[0]
        dt = dtypes[0]
        table = new_table("sm_90", "dry run (nothing measured)", dry_run=True)
        spaces = {f: sp for f, sp in spaces.items() if sp.candidates(C, dt, cap)}
        for fam in sorted(spaces):
            cands = spaces[fam].candidates(C, dt, cap)
            pick = cands[-1]
            set_entry(table, fam, C, dt, [{"config": c, "status": "ok", "time_us": 2.0 if c is pick else 3.0}
                                          for c in cands])
        table["backends"].setdefault(str(C), {})[tuning.dtype_name(dt)] = {"triton": 2.0, "torch": 5.0, "batch": 8}
        table["backends_train"].setdefault(str(C), {})[tuning.dtype_name(dt)] = {"torch": 4.0, "cuda": 6.0, "batch": 8}
        path = str(tuning.table_path("sm_90"))
        write_table(table, path)
        for fam in sorted(spaces):
            want = spaces[fam].candidates(C, dt, cap)[-1]
            got = tuning.choose(fam, C, dt, cap)
            if got != want:
                failures.append(f"table round trip {fam}: choose -> {got}, expected {want}")
        if tuning.backend_times("sm_90", C, dt) != {"triton": 2.0, "torch": 5.0}:
            failures.append(f"table round trip backends: {tuning.backend_times('sm_90', C, dt)}")
        if tuning.backend_times("sm_90", C, dt, training=True) != {"torch": 4.0, "cuda": 6.0}:
            failures.append(f"table round trip backends_train: {tuning.backend_times('sm_90', C, dt, training=True)}")
        written = json.loads(open(path).read())
        print(f"table writer/reader round trip in {tmp} (kernels {sorted(written['kernels'])}, backends_train "
              f"{'yes' if written['backends_train'] else 'no'}): {'ok' if not failures else 'FAILED'}")
    for f in failures:
        print(f"FAILED: {f}")
    print("dry run: " + ("ok" if not failures else f"{len(failures)} failures"))
    return 0 if not failures else 1


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="models whose widths are tuned (s, b, l, ...)")
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    ap.add_argument("--families", nargs="+", default=None, help="only these parts (default: every space + backends)")
    ap.add_argument("--table-dir", default=None, help="write <arch>.json here (default: tuning.table_path)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also copy the table here (default: $OUT)")
    ap.add_argument("--train", action="store_true",
                    help="tune the training kernels' families (statistics, recompute, backward) instead")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the plumbing; time nothing")
    ap.add_argument("--no-warm", action="store_true",
                    help="do not compile the sweep's Triton kernels ahead in parallel (warm_cache)")
    a = ap.parse_args(argv)

    from gmf_kernels.models.configs import canonical_name
    models = [canonical_name(m if m.startswith("groupmixformer") else f"groupmixformer_{m}") for m in a.models]
    spaces = load_spaces(train=a.train)
    order = [k for k, _ in (TRAIN_BUDGET_SHARES if a.train else BUDGET_SHARES)]
    parts = sorted(spaces, key=lambda f: order.index(f) if f in order else 99) + (["backends_train"] if a.train
                                                                                     else ["backends"])
    if a.families:
        parts = [p for p in parts if p in a.families]
    budgets = part_budgets(a.budget, parts)
    shape_list = shapes(models)
    dtypes = [DTYPES[d] for d in a.dtype]
    if a.dry_run:
        return dry_run({k: v for k, v in spaces.items() if k in parts}, shape_list, dtypes, budgets, a.table_dir,
                       a.batch)
    if not torch.cuda.is_available():
        print("benchmarks/tune.py: no CUDA GPU available; nothing measured, no table written (--dry-run checks "
              "the plumbing on any machine).")
        return 0
    if triton_interpreting():
        print("benchmarks/tune.py: TRITON_INTERPRET is set; unset it to time the compiled kernels. Skipping.")
        return 0

    from gmf_kernels import tuning
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # as ops.py and gpu_report.py time the backends
    cap = tuple(torch.cuda.get_device_capability())
    arch = tuning.arch_key(cap)
    if a.table_dir:
        os.environ["GMF_TUNING_DIR"] = a.table_dir
    path = str(tuning.table_path(arch))
    table = keep_other_parts(new_table(arch, torch.cuda.get_device_name()), path, parts)
    table.update(batch=a.batch, budget_s=a.budget, shapes=[list(s) for s in shape_list])
    meas = GpuMeasure(a.batch)
    t_start = time.monotonic()
    if not a.no_warm:   # out of the budget: the parts share what it leaves
        spent = warm_cache(parts, shape_list, dtypes, a.batch, cap, a.budget * WARM_SHARE)
        budgets = part_budgets(max(0.0, a.budget - spent), parts)
    deadline = time.monotonic()
    print(f"tuning on {table['device']} ({arch}): parts {parts}, budget {a.budget:.0f} s, batch {a.batch}; "
          f"table {path}", flush=True)
    for part in parts:
        deadline += budgets[part]          # cumulative: time an earlier part did not use carries over
        meas.deadline = deadline
        items = [(C, H, W, dt) for dt in dtypes for (C, H, W) in shape_list]
        if part in BACKEND_PARTS:
            def measure(C, H, W, dt, part=part):
                return [getattr(meas, part)(C, H, W, dt)]

            def done(item, res, part=part):
                C, H, W, dt = item
                r = dict(res[0])
                r.pop("_not_measured", None)
                if r:
                    table.setdefault(part, {}).setdefault(str(C), {})[tuning.dtype_name(dt)] = {**r, "batch": a.batch}
                print(f"  {part} C={C} {H}x{W} {_short(dt)}: {res[0]}", flush=True)
                write_table(table, path, a.out)
        else:
            sp = spaces[part]
            fn = meas.train if a.train else meas.cuda if part.startswith("cuda.") else meas.triton

            def measure(C, H, W, dt, sp=sp, fn=fn, part=part):
                cands = sp.candidates(C, dt, cap)
                return fn(part, C, H, W, dt, cands) if cands else []

            def done(item, res, part=part):
                C, H, W, dt = item
                entry = set_entry(table, part, C, dt, res)
                print(f"  {part} C={C} {H}x{W} {_short(dt)}: {len(res)} candidates -> {entry}", flush=True)
                write_table(table, path, a.out)
        lost: List[str] = []

        def failed(item, e, part=part) -> bool:
            """An item that raised outside a candidate's own try (its inputs, the reference call): not
            measured, with why; the sweep goes on unless the CUDA context is lost."""
            C, H, W, dt = item
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            table["not_measured"].append({"part": part, "C": C, "dtype": _short(dt), "reason": why})
            write_table(table, path, a.out)
            print(f"  {part} C={C} {H}x{W} {_short(dt)}: failed ({why})", flush=True)
            from ops import cuda_alive
            if not cuda_alive():
                lost.append(why)
                return False
            return True
        left = sweep(items, measure, deadline, done, on_error=failed)
        why_left = f"the CUDA context was lost ({lost[0]})" if lost else "time budget used up"
        for (C, H, W, dt) in left:
            table["not_measured"].append({"part": part, "C": C, "dtype": _short(dt), "reason": why_left})
        write_table(table, path, a.out)
        if lost:
            print(f"[{part}] the CUDA context was lost: the table keeps what was measured; nothing more can run "
                  f"in this process", flush=True)
            return 3
        print(f"[{part}] done: {len(items) - len(left)}/{len(items)} (C, dtype) measured, "
              f"{time.monotonic() - t_start:.0f} s so far", flush=True)
    print(f"wrote {path}" + (f" (and a copy in {a.out})" if a.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
