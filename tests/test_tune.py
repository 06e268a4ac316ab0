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
        assert 2 <= len(agg) <= L.AGG_MAX_CANDIDATES and 2 <= len(attn) <= L.MAX_CANDIDATES
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
    assert attn["UNROLL"] == 1 and shape.ATTN_UNROLL and not shape.AGG_UNROLL   # the unrolled CRPE taps
    # another dtype, width or GPU: defaults; the interpreter: its own tiles, table ignored
    assert L.tuned_shape(160, 784, dots, fake) == gma_shape(160, dots="tf32")
    monkeypatch.setattr(L, "_cuda_capability", lambda index: (8, 0))
    assert L.tuned_shape(80, 3136, dots, fake) == gma_shape(80, dots="tf32")
    monkeypatch.setattr(L, "interpreting", lambda: True)
    assert L.tuned_shape(80, 3136, dots, fake) == L.default_shape(80, 3136, dots)


def test_table_found_for_a_traced_width(table_dir):
    """Under torch.jit.trace a width is a traced tensor: the table is still found by its value (str() gave
    'tensor(80)', a key of no entry, so a traced model could take another backend than eager)."""
    (table_dir / "sm_90.json").write_text(json.dumps({"backends": {"80": {"bfloat16": {"triton": 2.0, "cuda": 3.0}}}}))
    tuning.clear_cache()
    want = {"triton": 2.0, "cuda": 3.0}
    assert tuning.backend_times("sm_90", 80, torch.bfloat16) == want
    assert tuning.backend_times("sm_90", torch.tensor(80), torch.bfloat16) == want


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
        {"triton.aggregate": 480 * 0.35 / 0.47, "backends": 480 * 0.12 / 0.47})


def test_dry_run_plan_and_plumbing(tmp_path):
    """The plan and the table round trip; a measured table in --table-dir stays as it was (the dry run
    replaced it with its made-up times, which the library then read)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GMF_TUNING_DIR")}
    measured = tune.new_table("sm_90", "NVIDIA H100")
    tune.set_entry(measured, "triton.aggregate", 80, torch.bfloat16,
                   [{"config": {"BLOCK_P": 64}, "status": "ok", "time_us": 7.0}])
    tune.write_table(measured, str(tmp_path / "sm_90.json"))
    before = (tmp_path / "sm_90.json").read_text()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tune.py"), "--dry-run",
                          "--table-dir", str(tmp_path), "--models", "s"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for fam in ("triton.aggregate", "triton.attention", "cuda.tiles", "backends"):
        assert f"[{fam}] budget" in out
    assert "C=80 56x56 bf16" in out and "C=320 14x14 fp32" in out
    assert "round trip" in out and out.rstrip().endswith("dry run: ok")
    assert f"--table-dir {tmp_path}: not written" in out
    assert "(kernels ['cuda.tiles', 'triton.aggregate', 'triton.attention'], backends_train yes): ok" in out
    assert (tmp_path / "sm_90.json").read_text() == before


def test_dry_run_train_plan(tmp_path):
    """--train: the training kernels' families instead of the forward's and the backends."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GMF_TUNING_DIR")}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tune.py"), "--dry-run", "--train",
                          "--table-dir", str(tmp_path), "--models", "s"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    families = {f for f, _ in tune.TRAIN_BUDGET_SHARES}
    for fam in families:
        assert f"[{fam}] budget" in res.stdout
    assert "[backends]" not in res.stdout and "[triton.aggregate]" not in res.stdout
    assert "[backends_train] budget" in res.stdout      # then one layer's training step per backend
    assert res.stdout.rstrip().endswith("dry run: ok")
    assert f"(kernels {sorted(families)}, backends_train yes): ok" in res.stdout    # the round trip's table
    assert not (tmp_path / "sm_90.json").exists()                                     # and none in --table-dir


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


# ------------------------------------------------------------------ the training kernels' families
def _train_modules():
    from gmf_kernels.triton_kernels import aggregation_backward as agb
    from gmf_kernels.triton_kernels import attention_backward as ab
    from gmf_kernels.triton_kernels import recompute as rcp
    from gmf_kernels.triton_kernels import statistics as st
    from gmf_kernels.triton_kernels import tile_spaces, train_op  # noqa: F401  (every family registered)
    return st, rcp, ab, agb, tile_spaces


def _module_tile(family: str, C: int, N: int, precision: str, monkeypatch):
    """The GPU tile the family's module picks without a table (its interpreter branch off)."""
    st, rcp, ab, agb, _ = _train_modules()
    from gmf_kernels.triton_kernels.config import B1_TILES, B2_TILES, dot_pad
    for mod in (st, rcp, ab, agb):
        monkeypatch.setattr(mod, "interpreting", lambda: False)
    t = agb.backward_tiles(dot_pad(C // 5), 3 * N)
    return {"triton.statistics": lambda: st.stats_tiles(C, N, precision),
            "triton.recompute_z": lambda: st.recompute_tiles(C, N, precision),
            "triton.recompute_attention": lambda: rcp.attention_tiles(C // 10, N, precision),
            "triton.recompute_local": lambda: rcp.local_tiles(C // 5, N, precision),
            "triton.b1": lambda: ab._tile(B1_TILES, C // 10, N),
            "triton.b2": lambda: ab._tile(B2_TILES, C // 10, N),
            "triton.b2_crpe": lambda: ab._crpe_tile(None, C // 10, N, 0, precision),
            "triton.backward": lambda: agb.tile_of(t),
            }[family]()


@pytest.mark.parametrize("cap", [(9, 0), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_families_default_to_the_module_tiles(cap, dtype, monkeypatch):
    """Each training family's default is the tile its module launches without a table (so an
    entry equal to the default changes nothing), first among its candidates; the statistics
    pass with fp32's dots, the others with the layer dtype's; no candidates where the width
    runs the PyTorch backward stages or the dtype is refused."""
    from gmf_kernels.triton_kernels.config import backward_kernels_take
    *_, tile_spaces = _train_modules()
    assert set(tile_spaces.families()) == {f for f, _ in tune.TRAIN_BUDGET_SHARES}
    for fam in tile_spaces.families():
        space = tuning.spaces()[fam]
        backward = fam != "triton.statistics"
        for C in WIDTHS:
            cands = space.candidates(C, dtype, cap)
            prec = tile_spaces.precision_of(dtype, cap, backward)
            if prec is None or (backward and not backward_kernels_take(C // 5, prec)):
                assert cands == [], (fam, C)
                continue
            assert cands and cands[0] == space.default(C, dtype, cap), (fam, C)
            assert len({tuple(c.items()) for c in cands}) == len(cands) <= tile_spaces.MAX_CANDIDATES
            assert tuple(cands[0].values()) == tuple(_module_tile(fam, C, 3136, prec, monkeypatch)), (fam, C)


@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (7, 5)])
def test_backward_walk_defaults_keep_the_tile_kernels_as_candidates(cap):
    """The stencil backward's row walks as defaults (2026-12-05): the depthwise input and weight gradients'
    (`DW_ROWS_DEFAULT`) at every width the backward kernels take, the CRPE input gradient's at D_PAD 16 on
    sm_80+ but C = 40 (`CRPE_ROWS_DEFAULT`, `CRPE_ROWS_DEFAULT_MIN_D`, `CRPE_ROWS_DEFAULT_PRECISIONS`: the walk
    spilled 4 B at C = 40 on sm_80 and 12 B at C = 80 on sm_70), where the tile kernel stays the default; and
    wherever a walk is the default, the tile kernel is among the candidates (`DW_ROWS` 0, `ROWS` 0), so that a
    lent GPU's tune can still prefer it."""
    st, rcp, ab, agb, _ = _train_modules()
    from gmf_kernels.triton_kernels.config import dot_pad
    for C in WIDTHS:
        for dtype in (torch.float32, torch.float16):
            bw = tuning.spaces()[agb.BACKWARD_FAMILY].candidates(C, dtype, cap)
            crpe = tuning.spaces()[ab.CRPE_FAMILY].candidates(C, dtype, cap)
            if not bw:                                  # the PyTorch backward stages at this width and GPU
                continue
            assert bw[0]["DW_ROWS"] == agb.DW_ROWS_DEFAULT == 16, (C, bw[0])
            assert any(c["DW_ROWS"] == 0 for c in bw[1:]), (C, bw)
            walk = dot_pad(C // 10) == 16 and C // 10 >= 8 and cap >= (8, 0)
            assert crpe[0]["ROWS"] == int(walk), (C, crpe[0])
            assert any(c["ROWS"] == 1 - int(walk) for c in crpe[1:]), (C, crpe)
            if walk:
                assert tuple(crpe[0].values()) == ab.CRPE_ROWS_DEFAULT[16], (C, crpe[0])


@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (7, 5)])
def test_backward_dense_candidate_where_it_applies(cap):
    """B3's dense form (`BackwardTiles.DENSE`) is the second "triton.backward" candidate (so that the family's
    MAX_CANDIDATES never drops it) exactly where `dense_b3_applies` (fp16 / bf16 layers on sm_80+ at S_PAD <= 64),
    the default's other tiles; never the default."""
    *_, agb, _ = _train_modules()
    from gmf_kernels.triton_kernels.config import dot_pad
    from gmf_kernels.triton_kernels.tile_spaces import precision_of
    for C in WIDTHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            bw = tuning.spaces()[agb.BACKWARD_FAMILY].candidates(C, dtype, cap)
            if not bw:
                continue
            applies = agb.dense_b3_applies(C, precision_of(dtype, cap, True))
            assert applies == (dtype != torch.float32 and cap >= (8, 0) and dot_pad(C // 5) <= 64), (C, dtype, cap)
            assert bw[0]["DENSE"] == 0 and [c["DENSE"] for c in bw[1:]].count(1) == int(applies), (C, dtype, bw)
            if applies:
                assert bw[1] == dict(bw[0], DENSE=1), (C, dtype, bw[:2])


def test_train_tiles_come_from_the_table(table_dir, monkeypatch):
    """`tile_spaces.tuned_tiles`: the table's entry for (GPU, C, dtype), else the default; None on
    the CPU and under the interpreter (the modules' own tiles)."""
    *_, tile_spaces = _train_modules()
    from gmf_kernels.triton_kernels import train_op
    fake = SimpleNamespace(device=SimpleNamespace(type="cuda", index=0), dtype=torch.bfloat16, shape=(2, 49, 240))
    monkeypatch.setattr(tile_spaces, "interpreting", lambda: False)
    monkeypatch.setattr(tile_spaces, "_cuda_capability", lambda index: (9, 0))
    picks = {f: tuning.spaces()[f].candidates(80, torch.bfloat16, (9, 0))[-1] for f in tile_spaces.families()}
    for f in picks:
        assert tile_spaces.tuned_tiles(f, 80, fake) == tuple(tuning.spaces()[f].default(80, torch.bfloat16, (9, 0))
                                                           .values())
    (table_dir / "sm_90.json").write_text(json.dumps({"kernels": {
        f: {"80": {"bfloat16": {**c, "time_us": 1.0}}} for f, c in picks.items()}}))
    tuning.clear_cache()
    for f, c in picks.items():
        assert tile_spaces.tuned_tiles(f, 80, fake) == tuple(c.values()), f
        assert tile_spaces.tuned_tiles(f, 160, fake) == tuple(tuning.spaces()[f].default(160, torch.bfloat16,
                                                                                          (9, 0)).values())
    tt = train_op.train_tiles(fake)
    assert tt.b1 == tuple(picks["triton.b1"].values()) and tt.b2_crpe == tuple(picks["triton.b2_crpe"].values())
    assert tt.backward.PW_TILE_ELEMS == picks["triton.backward"]["PW_TILE_ELEMS"]
    assert tile_spaces.tuned_tiles("triton.b1", 80, torch.empty(2, 49, 240)) is None          # CPU tensor
    monkeypatch.setattr(tile_spaces, "interpreting", lambda: True)
    assert tile_spaces.tuned_tiles("triton.b1", 80, fake) is None


def test_backward_runs_the_tuned_tiles(monkeypatch):
    """End to end under the interpreter: with every training family's tile forced to its last
    candidate (where `tuned_tiles` would put a table's entry), the statistics op and the
    backward op launch every kernel with those tiles, and give the default tiles' results to
    rounding."""
    from gmf_kernels.folding import fold_eval
    from gmf_kernels.numerics import default_hyper, random_gma_weights
    from gmf_kernels.triton_kernels import _launch
    st, rcp, ab, agb, tile_spaces = _train_modules()
    C, B, H, W = 40, 2, 5, 6
    hp = default_hyper(C)
    folded = fold_eval(random_gma_weights(C, seed=3), hp)
    ws = list(folded)
    qkv = torch.randn(B, H * W, 3 * C)
    grad_pre = torch.randn(B, H * W, C)
    cap = (8, 0)

    def run():
        mom = torch.ops.gmf.triton_z_moments(qkv, H, W, folded.dw3, folded.dw5, folded.dw7, folded.pw)
        mean = mom[0].float().view(4, C // 5)
        rstd = torch.rsqrt(mom[1] / (3 * B * H * W) + 1e-5).float().view(4, C // 5)
        return [mom] + torch.ops.gmf.triton_pre_projection_backward(grad_pre, qkv, H, W, ws, float(hp.scale),
                                                                    float(hp.ln_eps), mean, rstd)
    ref = run()
    picks = {f: tuple(tuning.spaces()[f].candidates(C, torch.float32, cap)[-1].values())
             for f in tile_spaces.families()}
    assert all(p != tuple(tuning.spaces()[f].default(C, torch.float32, cap).values()) for f, p in picks.items())
    monkeypatch.setattr(tile_spaces, "tuned_tiles", lambda family, C_, like: picks[family])
    launched = []

    def spy(kernel):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        class Launch:
            def __getitem__(self, grid):
                def go(*a, **kw):
                    launched.append((name, kw))
                    return kernel[grid](*a, **kw)
                return go
        return Launch()
    monkeypatch.setattr(_launch, "wrap_triton", spy)
    monkeypatch.setattr(ab, "wrap_triton", spy)
    got = run()
    for a, b in zip(got, ref):
        assert float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)) < 1e-5
    bw = agb.tiles_of(picks["triton.backward"])
    want = {"gma_statistics_kernel": picks["triton.statistics"][:2],
            "gma_recompute_z_kernel": picks["triton.recompute_z"][:2],
            "gma_recompute_attention_kernel": picks["triton.recompute_attention"],
            "gma_recompute_local_kernel": picks["triton.recompute_local"][:2],
            "gma_b1_dkv_kernel": picks["triton.b1"], "gma_b2_attention_kernel": picks["triton.b2"],
            "gma_b2_crpe_kernel": picks["triton.b2_crpe"][:2],
            "gma_dz_kernel": (bw.BLOCK_P, bw.WARPS),
            "gma_dw_backward_kernel": (bw.BLOCK_P, bw.WARPS),
            "gma_dw_wgrad_kernel": (bw.BLOCK_P, bw.WARPS),   # the stencils' tile (the interpreter's: not halved)
            "gma_pw_backward_kernel": (bw.PW_BLOCK_P, bw.PW_WARPS),
            "gma_local_backward_kernel": (bw.PW_BLOCK_P, bw.PW_WARPS)}
    assert {n for n, _ in launched} == set(want), sorted({n for n, _ in launched})
    for name, kw in launched:
        assert (kw.get("BLOCK_P", kw.get("BLOCK_N")), kw["num_warps"]) == tuple(want[name]), (name, kw)
    rows = {"gma_statistics_kernel": picks["triton.statistics"][3], "gma_b2_crpe_kernel": picks["triton.b2_crpe"][2],
            "gma_dw_backward_kernel": bw.DW_ROWS, "gma_dw_wgrad_kernel": bw.DW_ROWS}
    for name, kw in launched:      # the row-walk knobs reach their kernels (off in the last candidates)
        if name in rows:
            assert bool(kw.get("ROWS", False)) == bool(rows[name]), (name, kw)


def test_a_run_keeps_the_parts_it_does_not_measure(tmp_path):
    """A --train run keeps the forward families and the backends' times of the table already
    there (and a forward run the training families), for the same GPU architecture only; of the
    parts it measures, the (C, dtype) entries already there stay until it measures them again (a
    run of GroupMixFormer-S's bf16 widths keeps the other widths' and dtypes' tiles)."""
    path = str(tmp_path / "sm_90.json")
    prev = tune.new_table("sm_90", "H100")
    prev["kernels"] = {"triton.aggregate": {"80": {"bfloat16": {"BLOCK_P": 32, "time_us": 1.0}}},
                       "triton.b1": {"80": {"bfloat16": {"BLOCK_P": 16, "num_warps": 4, "time_us": 2.0}}}}
    prev["backends"] = {"80": {"bfloat16": {"triton": 3.0, "batch": 8}}}
    prev["backends_train"] = {"80": {"float16": {"cuda": 9.0, "batch": 8}}}
    tune.write_table(prev, path)
    train = tune.keep_other_parts(tune.new_table("sm_90", "H100"), path, ["triton.b1", "triton.b2", "backends_train"])
    assert train["kernels"] == prev["kernels"] and train["backends"] == prev["backends"]
    assert train["backends_train"] == prev["backends_train"]
    assert train["kept"]["parts"] == ["triton.aggregate", "backends"]
    assert train["kept"]["entries"] == ["triton.b1 C=80 bfloat16", "backends_train C=80 float16"]
    assert "triton.b2" not in train["kernels"]
    fwd = tune.keep_other_parts(tune.new_table("sm_90", "H100"), path, ["triton.aggregate", "backends"])
    assert fwd["kernels"] == prev["kernels"] and fwd["backends"] == prev["backends"]
    assert fwd["backends_train"] == prev["backends_train"]
    assert fwd["kept"]["parts"] == ["triton.b1", "backends_train"]
    assert fwd["kept"]["entries"] == ["triton.aggregate C=80 bfloat16", "backends C=80 bfloat16"]
    # measured again: replaced; another width measured: added beside the kept one
    ok = [{"config": {"BLOCK_P": 64}, "status": "ok", "time_us": 0.5}]
    tune.set_entry(fwd, "triton.aggregate", 80, torch.bfloat16, ok)
    tune.set_entry(fwd, "triton.aggregate", 160, torch.bfloat16, ok)
    assert fwd["kernels"]["triton.aggregate"] == {"80": {"bfloat16": {"BLOCK_P": 64, "time_us": 0.5}},
                                                  "160": {"bfloat16": {"BLOCK_P": 64, "time_us": 0.5}}}
    assert "kept" not in tune.keep_other_parts(tune.new_table("sm_80", "A100"), path, ["triton.b1"])
    dry = tune.new_table("sm_90", "dry run", dry_run=True)          # a dry run's table is never kept
    tune.write_table(dry, path)
    assert "kept" not in tune.keep_other_parts(tune.new_table("sm_90", "H100"), path, ["triton.b1"])


_CANDIDATES_SCRIPT = r"""
import json
from gmf_kernels.triton_kernels.specializations import Call, candidate_specializations
from gmf_kernels.triton_kernels.tile_spaces import families
out = []
for fam, cand, sp in candidate_specializations({Call(80, 56, 56, 1, "fp32"): ("s",)}, archs=(90,)):
    cx = dict(sp.constexprs)
    out.append([fam, cand, sp.kernel, cx.get("BLOCK_P", cx.get("BLOCK_N")), sp.num_warps])
print(json.dumps({"families": families(), "rows": out}))
"""


def test_tuning_candidates_reach_the_aot_plans():
    """`specializations.candidate_specializations`: every training family's candidates become
    the specialisations of its own kernels with the candidate's tile (what tune.py --train
    makes the JIT compile, and what an ahead-of-time check of the candidates compiles)."""
    from helpers import triton_compile_env
    proc = subprocess.run([sys.executable, "-c", _CANDIDATES_SCRIPT], cwd=ROOT, env=triton_compile_env(),
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stderr[-3000:]
    res = json.loads(lines[-1])
    *_, tile_spaces = _train_modules()
    rows = res["rows"]
    assert len(res["families"]) == 8 and {r[0] for r in rows} == set(res["families"]), res["families"]
    pw_kernels = ("gma_pw_backward_kernel", "gma_local_backward_kernel")
    for fam, cand, kernel, block, warps in rows:
        names = {getattr(k, "__name__", None) or k.fn.__name__ for k in tile_spaces.KERNELS[fam]}
        assert kernel in names, (fam, kernel)
        if fam == "triton.backward" and kernel in pw_kernels:
            assert (block, warps) == (cand["PW_BLOCK_P"], cand["PW_WARPS"]), (fam, cand, kernel)
        elif kernel == "gma_dw_wgrad_kernel":      # a quarter of the stencils' pixels on a GPU (`plan_dw_wgrad`)
            # or the row walks' strips (DW_ROWS)
            assert (block, warps) == (cand["DW_ROWS"] or max(16, cand["BLOCK_P"] // 4), cand["num_warps"]), \
                (fam, cand, kernel)
        elif kernel == "gma_dw_backward_kernel":   # its row walks' strips (DW_ROWS) where the candidate has them
            assert (block, warps) == (cand["DW_ROWS"] or cand["BLOCK_P"], cand["num_warps"]), (fam, cand, kernel)
        else:
            assert (block, warps) == (cand["BLOCK_P"], cand["num_warps"]), (fam, cand, kernel)
    n = {f: len({json.dumps(r[1]) for r in rows if r[0] == f}) for f in res["families"]}
    assert all(n[f] == len(tuning.spaces()[f].candidates(80, torch.float32, (9, 0))) - 1 for f in n), n


def _spy_launches(monkeypatch, record) -> None:
    """Every Triton launch from now on calls record(kernel name, its keyword arguments), then launches (a spy in
    place of `_launch.wrap_triton`, where the launchers and the training modules look it up)."""
    from gmf_kernels.triton_kernels import _launch
    real = _launch.wrap_triton

    def spy(kernel):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        wrapped = real(kernel)

        class Launch:
            def __getitem__(self, grid):
                def go(*a, **kw):
                    record(name, kw)
                    return wrapped[grid](*a, **kw)
                return go
        return Launch()
    monkeypatch.setattr(_launch, "wrap_triton", spy)
    monkeypatch.setattr(_train_modules()[2], "wrap_triton", spy)


def test_train_measurement_runs_each_candidate_through_the_table(monkeypatch):
    """`tune.GpuMeasure.train` (what --train runs on a GPU) on the CPU under the interpreter:
    each candidate goes through a temporary table and the library's lookup (here
    `tuning.choose` for any device, as `tile_spaces.tuned_tiles` does on a GPU), the op runs,
    results are compared with the first (default) candidate's and timed (a stub timer); a
    candidate the lookup does not reach would not change the launches, which are recorded. The other
    families' lookups return nothing, as under the interpreter, so their kernels take the interpreter's
    one large tile (the GPU defaults, row walks of 16-column strips since 2026-12-05, cost the interpreter
    far more per pixel)."""
    *_, tile_spaces = _train_modules()
    meas = object.__new__(tune.GpuMeasure)
    meas.batch, meas.device, meas.cap = 2, torch.device("cpu"), (8, 0)
    monkeypatch.setattr(tune.GpuMeasure, "_bench", lambda self, fn: 1.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    seen = []
    timed = ("triton.statistics", "triton.b1")
    monkeypatch.setattr(tile_spaces, "tuned_tiles", lambda fam, C, like: seen.append(fam) or (tuple(
        tuning.choose(fam, C, like.dtype, (8, 0)).values()) if fam in timed else None))
    launched = []
    _spy_launches(monkeypatch, lambda name, kw: launched.append((name, kw.get("BLOCK_P", kw.get("BLOCK_N")),
                                                                 kw["num_warps"])))
    for fam, kernel in zip(timed, ("gma_statistics_kernel", "gma_b1_dkv_kernel")):
        cands = tuning.spaces()[fam].candidates(40, torch.float32, (8, 0))[:3]
        launched.clear()
        res = meas.train(fam, 40, 5, 6, torch.float32, cands)
        assert [r["status"] for r in res] == ["ok"] * 3, res
        assert all(r["time_us"] == 1.0 and r["diff_vs_first"] < 1e-5 for r in res), res
        used = [(b, w) for n, b, w in launched if n == kernel]
        for c in cands:                        # each candidate's tile launched (first run and timing aside)
            assert (c["BLOCK_P"], c["num_warps"]) in used, (fam, c, used)
    assert "triton.b1" in seen and "triton.statistics" in seen


_WARM_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, "benchmarks")
import tune
from gmf_kernels.triton_kernels import specializations as S

cap, arch = (9, 0), 90
shapes = [(80, 56, 56), (320, 7, 7)]
dtypes = [torch.bfloat16, torch.float32]
parts = ["triton.aggregate", "triton.attention", "cuda.tiles", "backends"]
specs = tune.warm_specs(parts, shapes, dtypes, 128, cap)
keys = [sp.key for sp in specs]
missing, distinct = [], {}
for fam in ("triton.aggregate", "triton.attention"):
    space = tune.load_spaces()[fam]
    for dt in dtypes:
        for C, H, W in shapes:
            call = S.Call(C, H, W, 128, tune._short(dt))
            for cand in space.candidates(C, dt, cap):
                got = S._candidate_specs(fam, call, arch, cand)
                missing += [f"{fam} {call.label()} {cand}" for sp in got if sp.key not in keys]
                kernel = "gma_aggregate_kernel" if fam == "triton.aggregate" else "gma_attention_kernel"
                distinct.setdefault((fam, C, str(dt)), set()).update(sp.key for sp in got if sp.kernel == kernel)
fams = [sp.used_by[0].split(":")[0] for sp in specs]
n_cands = {f"{fam} {C} {dt}": len({(c["BLOCK_P"], c["num_warps"], c["CK"])   # the tiles: constexprs / num_warps
                                    for c in tune.load_spaces()[fam].candidates(C, dt, cap)})
           for fam in ("triton.aggregate",) for dt in dtypes for C, H, W in shapes}
train = tune.warm_specs(["triton.b1"], shapes[:1], dtypes[:1], 128, cap)
b1 = [sp for sp in train if sp.kernel == "gma_b1_dkv_kernel"]
print(json.dumps({"n": len(keys), "unique": len(set(keys)), "missing": missing[:5],
                  "distinct": {f"{k[0]} {k[1]} {k[2]}": len(v) for k, v in distinct.items()}, "n_cands": n_cands,
                  "last_aggregate": max(i for i, f in enumerate(fams) if f == "triton.aggregate"),
                  "first_attention": min(i for i, f in enumerate(fams) if f == "triton.attention"),
                  "train_kernels": sorted({sp.kernel for sp in train}), "b1_variants": len(b1),
                  "b1_candidates": len(tune.load_spaces(train=True)["triton.b1"].candidates(80, torch.bfloat16, cap))}))
"""


def test_sweep_records_an_item_that_raises_and_stops_when_told():
    """An item whose measure raises goes to on_error: the sweep goes on when it says so (the context
    works) and stops, returning the rest, when it does not (a lost CUDA context); without on_error the
    exception propagates."""
    def measure(C, H, W, dt):
        if C == 20:
            raise RuntimeError("boom")
        return [C]
    done, errors = [], []
    items = [(C, 1, 1, torch.float16) for C in (10, 20, 30, 40)]
    assert tune.sweep(items, measure, 1e9, lambda i, r: done.append(i[0]),
                      on_error=lambda i, e: errors.append((i[0], str(e))) or True) == []
    assert done == [10, 30, 40] and errors == [(20, "boom")]
    done.clear()
    left = tune.sweep(items, measure, 1e9, lambda i, r: done.append(i[0]), on_error=lambda i, e: False)
    assert done == [10] and [i[0] for i in left] == [30, 40]
    with pytest.raises(RuntimeError, match="boom"):
        tune.sweep(items, measure, 1e9, lambda i, r: None)


def test_gpu_timings_are_medians(monkeypatch):
    """do_bench returns the mean unless asked: the tuner asks for the median (one outlier must not
    pick the config), as ops.py times."""
    import triton.testing
    seen = {}

    def fake_do_bench(fn, warmup=25, rep=100, return_mode="mean", **kw):
        seen["mode"] = return_mode
        return 1.0
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    meas = tune.GpuMeasure.__new__(tune.GpuMeasure)
    meas.warmup, meas.rep = 1, 1
    assert meas._bench(lambda: None) == 1e3 and seen["mode"] == "median"


def test_warm_up_compiles_what_the_sweep_will():
    """`tune.warm_specs` (`specializations.tuning_specializations`): every candidate of the forward
    families at every swept (C, dtype) has its launches' specialisations in the warm-up, each once,
    each aggregation tile its own aggregation kernel, in the sweep's order (the aggregation
    family's before the attention family's); a training family's sweep warms the whole training
    step's defaults and one B1 variant per candidate; cuda.* and backends add nothing."""
    from helpers import triton_compile_env
    proc = subprocess.run([sys.executable, "-c", _WARM_SCRIPT], cwd=ROOT, env=triton_compile_env(),
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stderr[-3000:]
    r = json.loads(lines[-1])
    assert r["n"] == r["unique"] > 0 and not r["missing"], r
    for key, n in r["n_cands"].items():   # each tile its own aggregation kernel (STRIP is a runtime int)
        assert r["distinct"][key] >= n > 1, (key, r["distinct"][key], n)
    assert r["last_aggregate"] < r["first_attention"], r
    assert {"gma_statistics_kernel", "gma_recompute_z_kernel", "gma_b1_dkv_kernel", "gma_b2_attention_kernel",
            "gma_dz_kernel", "gma_aggregate_kernel"} <= set(r["train_kernels"]), r["train_kernels"]
    assert r["b1_variants"] == r["b1_candidates"] > 1, r


def test_candidates_past_the_deadline_are_skipped(monkeypatch):
    """An item started before its part's deadline stops trying candidates once past it (each may compile
    for seconds on one CPU): the default, which the others are compared with, still runs; the rest
    are recorded as skipped, with why, and the entry is the fastest of those measured. (The Triton
    interpreter stands in for the GPU here.)"""
    import time
    meas = object.__new__(tune.GpuMeasure)
    meas.batch, meas.warmup, meas.rep, meas.device, meas.cap = 1, 1, 1, torch.device("cpu"), (9, 0)
    meas._bench = lambda fn: 7.0
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    cands = L.aggregate_candidates(80, torch.float32, (9, 0))[:3]
    meas.deadline = None
    assert not meas.late(2, {})
    meas.deadline = time.monotonic() - 1
    res = meas.triton(L.AGG_FAMILY, 80, 5, 6, torch.float32, cands)
    assert [r["status"] for r in res] == ["ok", "skipped", "skipped"], res
    assert res[1]["reason"] == "time budget used up" and res[0]["time_us"] == 7.0
    table = tune.new_table("sm_90", "test")
    assert tune.set_entry(table, L.AGG_FAMILY, 80, torch.float32, res) == {**cands[0], "time_us": 7.0}


def test_split_candidate_is_timed_on_its_z_pass_and_aggregation(monkeypatch):
    """A "triton.aggregate" candidate that splits the forward (SPLIT) is timed on the launches it changes, the
    Z pass (stencils, or with ZDENSE dense convolutions) and the aggregation (`tune.STAGE_KERNELS`), a FUSED one on
    its one kernel, a per-tile candidate on the aggregation alone, each with the combine; an attention
    candidate on the attention; each is checked against the default's result first. (The Triton interpreter stands
    in for the GPU; `_bench` records which kernels the timed function launches.)"""
    from gmf_kernels.triton_kernels._common import kernel_name
    meas = object.__new__(tune.GpuMeasure)
    meas.batch, meas.warmup, meas.rep, meas.device, meas.cap = 1, 1, 1, torch.device("cpu"), (9, 0)
    meas.deadline = None
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ran, timed = [], []

    class Spy:
        def __init__(self, kernel):
            self.kernel, self.__name__ = kernel, kernel_name(kernel)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                ran.append(self.__name__)
                return self.kernel[grid](*args, **kwargs)
            return launch

    real = L.plan_pre_projection

    def spied(*args, **kwargs):
        buf, launches = real(*args, **kwargs)
        return buf, [(Spy(k), g, a, kw) for k, g, a, kw in launches]

    def bench(fn):
        ran.clear()
        fn()
        timed.append(list(ran))
        return 1.0

    monkeypatch.setattr(L, "plan_pre_projection", spied)
    meas._bench = bench
    cands = L.aggregate_candidates(80, torch.float32, (9, 0))
    split = next(c for c in cands if c["SPLIT"])
    dense = next(c for c in cands if c["ZDENSE"])     # the same with its Z pass on tensor cores (`dense_z`)
    fused = next(c for c in cands if c["FUSED"])      # ... and the aggregation fused into it
    res = meas.triton(L.AGG_FAMILY, 80, 5, 6, torch.float32, [cands[0], split, dense, fused])
    assert [r["status"] for r in res] == ["ok"] * 4, res
    comb = "gma_combine_kernel"                       # with each: its partial rows are the candidate's
    assert timed == [["gma_aggregate_kernel", comb], ["gma_statistics_kernel", "gma_aggregate_kernel", comb],
                     ["gma_dense_z_kernel", "gma_aggregate_kernel", comb], ["gma_dense_aggregate_kernel", comb]]
    assert "registers_before" in res[1] and "registers_before" in res[2] and "registers_before" not in res[0]
    assert "registers_before" not in res[3] and res[3]["diff_vs_first"] < 1e-5
    timed.clear()
    res = meas.triton(L.ATTN_FAMILY, 80, 5, 6, torch.float32, L.attention_candidates(80, torch.float32, (9, 0))[:1])
    assert res[0]["status"] == "ok" and timed == [["gma_attention_kernel"]]


def test_backward_family_timed_on_a_layer_step(monkeypatch):
    """"triton.backward" (`tune.STEP_FAMILY`) is timed on one layer's whole training step (`GpuMeasure._layer_step`),
    not the backward op alone: its dense candidate (`BackwardTiles.DENSE`) changes the forward too, and the step run
    for it launches that forward (the dense statistics pass with the local branch's Z, the aggregation reading it
    and keeping no w4) where the default's launches the stencil statistics pass. bf16 on an sm_80 table (the CPU
    under the interpreter, a stub timer); both candidates' gradients agree within the tuner's bf16 rule."""
    *_, tile_spaces = _train_modules()
    meas = object.__new__(tune.GpuMeasure)
    meas.batch, meas.device, meas.cap = 1, torch.device("cpu"), (8, 0)
    monkeypatch.setattr(tune.GpuMeasure, "_bench", lambda self, fn: 1.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    fam = tune.STEP_FAMILY
    monkeypatch.setattr(tile_spaces, "tuned_tiles", lambda f, C, like: (
        tuple(tuning.choose(f, C, like.dtype, (8, 0)).values()) if f == fam else None))
    launched = []
    _spy_launches(monkeypatch, lambda name, kw: launched.append((name, kw)))
    cands = tuning.spaces()[fam].candidates(40, torch.bfloat16, (8, 0))
    cands = [cands[0], next(c for c in cands if c.get("DENSE"))]
    assert not cands[0].get("DENSE")
    runs = []
    real_train = tune.GpuMeasure._layer_step

    def layer_step(self, *a):
        fn = real_train(self, *a)

        def counted():
            launched.clear()
            out = fn()
            runs.append([n for n, _ in launched] + [("LOCAL_Z" if kw.get("LOCAL_Z") else "")
                                                    for n, kw in launched if n == "gma_aggregate_kernel"])
            return out
        return counted
    monkeypatch.setattr(tune.GpuMeasure, "_layer_step", layer_step)
    res = meas.train(fam, 40, 4, 4, torch.bfloat16, cands)
    assert [r["status"] for r in res] == ["ok"] * 2, res
    assert res[1]["diff_vs_first"] <= tune.AGREE["bf16"], res
    default, dense = runs
    assert "gma_statistics_kernel" in default and "gma_dense_statistics_kernel" not in default, default
    assert "gma_pw_backward_kernel" in default and "LOCAL_Z" not in default
    assert "gma_dense_statistics_kernel" in dense and "gma_statistics_kernel" not in dense, dense
    assert "gma_dense_wgrad_kernel" in dense and "LOCAL_Z" in dense
