"""benchmarks/tune.py and the Triton search spaces (CPU only: the plan, the budgeted sweep, the
table writer against tuning's reader, and the Triton launcher's use of the tuned tiles)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from gmf_kernels import tuning
from gmf_kernels.triton_kernels import launcher as L
from gmf_kernels.triton_kernels._common import DotVariant
from gmf_kernels.triton_kernels.config import dot_precision, gma_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import tune  # noqa: E402

WIDTHS = (40, 80, 160, 200, 240, 320, 360, 480)


@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_spaces_default_to_the_config_tiles(cap, dtype):
    """Without a table the launcher's tiles are exactly config.gma_shape's (the spill-free defaults)."""
    for fam in (L.AGG_FAMILY, L.ATTN_FAMILY):
        assert fam in tuning.spaces()
    for C in WIDTHS:
        agg = L.aggregate_candidates(C, dtype, cap)
        attn = L.attention_candidates(C, dtype, cap)
        if dtype == torch.bfloat16 and cap < (8, 0):
            assert agg == [] and attn == []          # refused there (config.ARCH_DOTS)
            continue
        prec = dot_precision({torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype], cap)
        assert 2 <= len(agg) <= L.MAX_CANDIDATES and 2 <= len(attn) <= L.MAX_CANDIDATES
        assert agg[0] == L.aggregate_default(C, dtype, cap) and attn[0] == L.attention_default(C, dtype, cap)
        assert len({tuple(sorted(c.items())) for c in agg}) == len(agg)
        shape = L.shape_from_configs(C, DotVariant(prec, False), agg[0], attn[0])
        assert shape == gma_shape(C, dots=prec)
        for c in agg:
            assert c["CK"] <= shape.S_PAD


def test_launcher_uses_the_tuned_tiles(table_dir, monkeypatch):
    fake = SimpleNamespace(device=SimpleNamespace(type="cuda", index=0), dtype=torch.bfloat16)
    dots = DotVariant("tf32", False)
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L, "_cuda_capability", lambda index: (9, 0))
    assert L.tuned_shape(80, 3136, dots, fake) == gma_shape(80, dots="tf32")          # no table: default
    agg = L.aggregate_candidates(80, torch.bfloat16, (9, 0))[1]
    attn = L.attention_candidates(80, torch.bfloat16, (9, 0))[1]
    (table_dir / "sm_90.json").write_text(json.dumps({"kernels": {
        L.AGG_FAMILY: {"80": {"bfloat16": {**agg, "time_us": 10.0}}},
        L.ATTN_FAMILY: {"80": {"bfloat16": {**attn, "time_us": 5.0}}}}}))
    tuning.clear_cache()
    shape = L.tuned_shape(80, 3136, dots, fake)
    assert (shape.AGG_BLOCK_P, shape.AGG_WARPS, shape.CK) == (agg["BLOCK_P"], agg["num_warps"], agg["CK"])
    assert agg["STRIP"] == 0 and shape.AGG_STRIP == 0          # the row-major variant of the default tile
    assert (shape.ATTN_BLOCK_P, shape.ATTN_WARPS) == (attn["BLOCK_P"], attn["num_warps"])
    # another dtype, width or GPU: defaults; the interpreter: its own tiles, table ignored
    assert L.tuned_shape(160, 784, dots, fake) == gma_shape(160, dots="tf32")
    monkeypatch.setattr(L, "_cuda_capability", lambda index: (8, 0))
    assert L.tuned_shape(80, 3136, dots, fake) == gma_shape(80, dots="tf32")
    monkeypatch.setattr(L, "interpreting", lambda: True)
    assert L.tuned_shape(80, 3136, dots, fake) == L.default_shape(80, 3136, dots)


@pytest.fixture
def test_space():
    yield tuning.register_space(tuning.SearchSpace(
        "test.tune", lambda C, dt, cap: [{"X": 1}, {"X": 2}, {"X": 3}], lambda C, dt, cap: {"X": 1}))
    tuning._SPACES.pop("test.tune", None)


def test_sweep_keeps_partial_results_within_the_budget(table_dir, test_space):
    space = test_space
    now = [0.0]
    items = [(C, C, C, torch.float16) for C in (10, 20, 30, 40, 50)]
    table = tune.new_table("sm_90", "fake", dry_run=True)
    path = str(tuning.table_path("sm_90"))
    seen = []

    def measure(C, H, W, dt):
        now[0] += 10.0                               # each item costs 10 s of the fake clock
        # X=2 fastest, X=3 refused (e.g. spills): never the entry even though "faster"
        return [{"config": c, "status": "refused" if c["X"] == 3 else "ok",
                 "time_us": {1: 5.0, 2: 4.0, 3: 1.0}[c["X"]]} for c in space.candidates(C, dt, (9, 0))]

    def done(item, res):
        tune.set_entry(table, space.family, item[0], item[3], res)
        tune.write_table(table, path)
        seen.append(json.loads(open(path).read())["kernels"][space.family].keys())   # written after each item

    left = tune.sweep(items, measure, deadline=25.0, on_done=done, clock=lambda: now[0])
    assert [i[0] for i in left] == [40, 50]                   # started at 0, 10, 20; stopped at 30 >= 25
    assert [len(k) for k in seen] == [1, 2, 3]
    assert tuning.choose(space.family, 20, torch.float16, (9, 0)) == {"X": 2}
    assert tuning.choose(space.family, 40, torch.float16, (9, 0)) == {"X": 1}      # not measured: default
    assert tuning.kernel_config(space.family, "sm_90", 20, torch.float16)["time_us"] == 4.0
    assert tune.part_budgets(480, ["triton.aggregate", "backends"]) == pytest.approx(
        {"triton.aggregate": 480 * 0.35 / 0.6, "backends": 480 * 0.25 / 0.6})


def test_dry_run_plan_and_plumbing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GMF_TUNING_DIR")}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tune.py"), "--dry-run",
                          "--table-dir", str(tmp_path), "--models", "s"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for fam in ("triton.aggregate", "triton.attention", "cuda.tiles", "backends"):
        assert f"[{fam}] budget" in out
    assert "C=80 56x56 bf16" in out and "C=320 14x14 fp32" in out
    assert "round trip" in out and out.rstrip().endswith("dry run: ok")
    table = json.loads((tmp_path / "sm_90.json").read_text())
    assert table["measured"] is False and set(table["kernels"]) == {"triton.aggregate", "triton.attention",
                                                                    "cuda.tiles"}


def test_plan_asks_for_the_tuned_shape(monkeypatch):
    """plan_pre_projection (what every launch runs) takes its tiles from tuned_shape."""
    from gmf_kernels.folding import FoldedGMAWeights, weight_shapes
    calls = []

    def spy(C, N, dots, qkv):
        calls.append((C, N))
        return gma_shape(C, agg_block_p=64, attn_block_p=32, ck=16, dots=dots.precision)

    monkeypatch.setattr(L, "tuned_shape", spy)
    w = FoldedGMAWeights(**{k: torch.empty(s, device="meta") for k, s in weight_shapes(80).items()})
    qkv = torch.empty(2, 49, 240, device="meta", dtype=torch.bfloat16)
    _, launches = L.plan_pre_projection(qkv, 7, 7, w, 0.3, 1e-5, dots=DotVariant("tf32", False))
    assert calls == [(80, 49)]
    assert launches[0][3]["BLOCK_P"] == 64 and launches[2][3]["BLOCK_P"] == 32
