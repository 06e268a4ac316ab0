"""benchmarks/roofline.py and the kernels' cost models (triton_kernels/costs.py, cuda/costs.py):
hand-computed byte and FLOP counts, the bound arithmetic, resources and --measured (CPU only)."""
import csv
import json
import os
import sys

import pytest

from gmf_kernels.cuda import costs as cuda_costs
from gmf_kernels.triton_kernels import aggregation
from gmf_kernels.triton_kernels import costs as triton_costs
from gmf_kernels.triton_kernels.config import gma_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import roofline  # noqa: E402


def weights_floats(C):
    s, d = C // 5, C // 10
    agg = 4 * s * 2 + (9 + 25 + 49) * s + 3 * s * s + 27 * s + 3 * s * s + 2 * s
    attn = (2 * 9 + 3 * 25 + 3 * 49) * d + 8 * d
    return agg, attn


@pytest.mark.parametrize("dtype,e", [("fp32", 4), ("bf16", 2)])
def test_triton_costs_by_hand(dtype, e):
    # C = 80 (s = 16, C' = 64, d = 8) on 56x56, batch 2, BLOCK_P = 32 -> 98 tiles per image;
    # per-job split-N (aggregation.job_plan): the 5x5 and 7x7 jobs one tile per program (about
    # 1024 programs wanted, more than the tiles give), the others runs of about one 7x7 tile's
    # cost; the combine reads one packed row (s = 2d channels) per split of segments 0..3, in programs of
    # 4 rows of a head (8 heads x 2 row blocks per image)
    B, H, W, C = 2, 56, 56, 80
    N, s, cp, d = H * W, 16, 64, 8
    shape = gma_shape(C, agg_block_p=32, attn_block_p=64, ck=16, dots="tf32")
    agg_w, attn_w = weights_floats(C)
    prec = "tf32x3" if dtype == "fp32" else "tf32"
    plan = aggregation.job_plan(N, B, shape, prec)
    assert plan.splits[2:4] == (98, 98) and plan.splits[0] < plan.splits[1] < 98
    rows = sum(plan.splits[:4])

    comb = triton_costs.cost("combine", B, H, W, C, dtype, shape=shape)
    assert comb.grid == (8 * 2, B)
    assert comb.bytes == B * rows * s * (2 + d) * 4 + B * cp * d * 4

    agg = triton_costs.cost("gma_aggregate_kernel", B, H, W, C, dtype, shape=shape)
    assert agg.grid == (sum(plan.splits), B)
    assert agg.bytes == (B * N * 3 * C * e + 2 * B * N * cp * e + B * N * s * e + B * rows * s * (2 + d) * 4
                         + 4 * agg_w)
    # 3 streams x 3 segments of s x s, local 3s -> s, K^T V of 8 heads (d x d); stencils 3 x 83 s + 27 s
    assert agg.tc_flops == 2 * B * N * (9 * 256 + 3 * 256 + 64 * 8)
    assert agg.cuda_flops == 2 * B * N * (3 * 83 * 16 + 27 * 16)
    assert agg.tc_precision == ("tf32x3" if dtype == "fp32" else "tf32")

    attn = triton_costs.cost("attention", B, H, W, C, dtype, shape=shape)
    assert attn.grid == (49, 8, B)
    assert attn.bytes == 3 * B * N * cp * e + B * cp * d * 4 + 4 * attn_w
    assert attn.tc_flops == 2 * B * N * cp * d and attn.cuda_flops == 2 * B * N * 240 * d
    # sm_75: no TF32, the dots are FMAs and count as CUDA-core work
    attn75 = triton_costs.cost("attention", B, H, W, C, "fp32", capability=(7, 5), shape=shape)
    assert attn75.tc_flops == 0 and attn75.cuda_flops > attn.cuda_flops


def _uniform_plan(N, B, sh):
    """The plan before per-job splits: every job the same split count (`aggregation.split_plan`)."""
    splits, _ = aggregation.split_plan(N, B, sh.AGG_BLOCK_P, sh.SPLIT_TARGET)
    return aggregation.JobPlan(sh.num_tiles(N), (splits,) * 5)


@pytest.mark.parametrize("B", [1, 128])
def test_aggregation_plan_is_balanced(B):
    """GroupMixFormer-S stage shapes x dtype x GPU generation (the tiles of each dot variant):
    by the one cost model (`costs.aggregate_job_costs`), the costliest program of the per-job
    plan is at most 1.4x the mean program where an image has >= 16 tiles and at most 1.65x on
    fewer (down to 2 tiles at C=320 7x7: one 7x7 tile is then a third of the image's work; at
    C=320 14x14 in 16-token tiles, 13 tiles, batch 128 leaves about 8 programs per image and the
    7x7 job's 3 runs of 5 tiles are 1.43x the mean: 4 runs would need a ninth program), its
    costliest program never costlier than the uniform plan's, and the uniform plan (every job
    the same splits) fails the bound (>= 1.9x: its 7x7 programs carry ~2x the mean)."""
    for C, H, _ in roofline.shapes("groupmixformer_s"):
        for dt in ("fp32", "fp16", "bf16"):
            for cap in ((9, 0), (8, 0), (7, 5)):
                if dt == "bf16" and cap < (8, 0):
                    continue
                prec = triton_costs.dot_precision(dt, cap)
                sh = triton_costs.shape_for(C, dt, cap)
                costs = triton_costs.aggregate_job_costs(sh, prec)
                plan = aggregation.job_plan(H * H, B, sh, prec)
                plan.check()
                uniform = _uniform_plan(H * H, B, sh)
                worst = lambda p: max(c * t for c, t in zip(costs, p.tiles_per_split))
                bound = 1.4 if plan.tiles >= 16 else 1.65
                where = f"C={C} {H}x{H} B={B} {dt} sm_{cap[0]}{cap[1]}: {plan}"
                assert triton_costs.plan_balance(plan, costs) <= bound, where
                assert worst(plan) <= worst(uniform), where
                assert triton_costs.plan_balance(uniform, costs) >= 1.9, where
                # the programs wanted: at batch 1 the 7x7 job one tile per program; at batch 128
                # about SPLIT_TARGET / B per image (at least 5, one per job)
                if B == 1:
                    assert plan.splits[3] == plan.tiles, where
                else:
                    assert 5 <= plan.programs <= max(5, -(-sh.SPLIT_TARGET // B)) + 1, where


def test_aggregation_plan_properties():
    """Over a grid of (width, tokens, batch): no run of any job is empty, a costlier job never
    gets fewer programs, at batch 1 the costliest job runs one tile per program, and a huge
    batch (5 programs per image wanted) still cuts the 7x7 job to about the mean job's work."""
    for C in (40, 160, 480):
        sh = gma_shape(C)
        costs = triton_costs.aggregate_job_costs(sh, "tf32")
        order = sorted(range(5), key=lambda j: costs[j])
        for N in (1, 7, 49, 196, 3136):
            for B in (1, 3, 64, 4096):
                plan = aggregation.job_plan(N, B, sh, "tf32")
                plan.check()
                assert all(plan.splits[a] <= plan.splits[b] for a, b in zip(order, order[1:])), plan
                if B == 1:
                    assert plan.splits[3] == plan.tiles, plan
                if B == 4096 and plan.tiles >= 8:
                    assert plan.splits[3] >= 2 and triton_costs.plan_balance(plan, costs) < 1.5, plan


def test_cuda_costs_from_a_plan():
    B, H, W, C = 3, 14, 14, 320
    d, cp, N = 32, 256, 196
    plan = {"ntiles": 4, "tile": (7, 7), "tiles_per_cta": 1,
            "aggregate": {"grid": 60, "block": 256, "smem": 40000},
            "combine": {"grid": 24, "block": 256, "smem": 256},
            "attention": {"grid": 48, "block": 256, "smem": 30000}}
    comb = cuda_costs.cost("combine", B, H, W, C, "fp16", plan=plan)
    assert comb.bytes == B * 4 * 8 * (2 * d + d * d) * 4 + B * 8 * d * d * 4
    assert comb.grid == (24,) and comb.block == 256
    attn = cuda_costs.cost("attention", B, H, W, C, "bf16", plan=plan)
    assert attn.tc_precision == "bf16" and attn.tc_flops == 2 * B * N * cp * d and attn.shared == 30000
    agg = cuda_costs.cost("aggregate", B, H, W, C, "fp32", plan=plan)
    assert agg.tc_precision == "tf32x3" and agg.grid == (60,)
    # before sm_80 bf16 products run as FMAs: no tensor-core work
    assert cuda_costs.cost("aggregate", B, H, W, C, "bf16", capability=(7, 5), plan=plan).tc_flops == 0


def test_bounds_and_occupancy_arithmetic():
    c = triton_costs.Cost(bytes=3_000_000, tc_flops=790_000_000, cuda_flops=67_000_000, grid=(10,),
                          tc_precision="bf16")
    t = roofline.bound_times(c)
    assert t["t_mem_us"] == pytest.approx(1.0) and t["t_tc_us"] == pytest.approx(1.0)
    assert t["t_cuda_us"] == pytest.approx(1.0)
    c3 = triton_costs.Cost(bytes=0, tc_flops=395_000_000, cuda_flops=0, grid=None, tc_precision="tf32x3")
    t3 = roofline.bound_times(c3)
    assert t3["bound_us"] == pytest.approx(3.0) and t3["bound_by"] == "tensor cores"
    # 128 regs x 4 warps: 16384 registers per CTA -> 4 per SM; 200 regs x 8 warps: 1 per SM
    assert roofline.ctas_per_sm(128, 4, 3072) == 4
    assert roofline.ctas_per_sm(200, 8, 0) == 1
    assert roofline.ctas_per_sm(32, 4, 100_000) == 2            # shared-memory bound (228 KiB per SM)
    assert roofline.ctas_per_sm(None, 4, 0) is None


def test_roofline_cuda_rows_without_the_module_are_lower_bounds(capsys, monkeypatch):
    """Without the CUDA module's plan the split-N partials are not counted: the cuda rows say ">=" (they
    printed 0.00 MB for the combine, as if measured), the note says why in full; bad --batch / --shape
    are refused."""
    from gmf_kernels.cuda import costs as cuda_costs
    monkeypatch.setattr(cuda_costs, "module_plan", lambda *a, **k: (None, "CUDA module not loadable (x): ..."))
    assert roofline.main(["--shape", "40", "7", "7", "--batch", "1", "--dtype", "bf16", "--backends", "cuda"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| cuda |")]
    assert rows and all(" | >=" in line for line in rows), rows
    for argv in (["--batch", "0"], ["--batch", "-1"], ["--shape", "40", "0", "7"], ["--shape", "45", "7", "7"]):
        with pytest.raises(SystemExit):
            roofline.main(argv)


def test_roofline_main_resources_and_measured(tmp_path, capsys):
    C, H, W, B = 80, 56, 56, 1
    sh = triton_costs.shape_for(C, "bf16")
    # a compile result of the specialisations script (its JSON format) for the aggregation tile in use
    res = [{"kernel": "aggregate", "function": "gma_aggregate_kernel", "C": C, "dtype": "bf16", "arch": 90,
            "label": f"aggregate C=80 bf16 (S_PAD=16, D_PAD=16, CK={sh.CK}, BLOCK_P={sh.AGG_BLOCK_P}, "
                     f"warps={sh.AGG_WARPS}, tf32; -)", "num_warps": sh.AGG_WARPS, "registers": 128,
            "spill_stores": 0, "spill_loads": 0, "shared_dynamic": 2048, "cuobjdump_shared": 0}]
    (tmp_path / "aot.json").write_text(json.dumps(res))
    # benchmarks/ops.py rows (its CSV columns): the aggregation measured at 4x its memory bound
    agg = triton_costs.cost("aggregate", B, H, W, C, "bf16")
    bound_us = agg.bytes / 3e12 * 1e6
    with open(tmp_path / "ops.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["op", "impl", "B", "H", "W", "C", "dtype", "status", "median_ms"])
        wr.writeheader()
        wr.writerow(dict(op="aggregate", impl="triton", B=B, H=H, W=W, C=C, dtype="bf16", status="ok",
                         median_ms=4 * bound_us / 1e3))
        wr.writerow(dict(op="pre_projection", impl="triton", B=B, H=H, W=W, C=C, dtype="bf16", status="ok",
                         median_ms=1.0))
    out = tmp_path / "roof.json"
    rc = roofline.main(["--shape", str(C), str(H), str(W), "--batch", str(B), "--dtype", "bf16",
                        "--backends", "triton", "--triton-resources", str(tmp_path / "aot.json"),
                        "--measured", str(tmp_path / "ops.csv"), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| triton | aggregate | 80 | 56x56 | 1 | bf16 |" in text
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(roofline.KERNELS)
    r = rows["gma_aggregate_kernel"]
    assert r["bytes"] == agg.bytes and r["bound_by"] == "memory"
    assert r["bound_us"] == pytest.approx(bound_us)
    assert r["fraction_of_bound"] == pytest.approx(0.25)
    assert r["registers"] == 128 and r["shared"] == 2048
    per_warp = -(-128 * 32 // 256) * 256
    assert r["ctas_per_sm"] == min(65536 // (per_warp * sh.AGG_WARPS), 64 // sh.AGG_WARPS)
    assert r["waves"] == pytest.approx(r["programs"] / (132 * r["ctas_per_sm"]))
    assert rows["gma_combine_kernel"]["measured_us"] is None and rows["gma_combine_kernel"]["registers"] is None
    # gpu_report's report.json (kernels.rows) gives the same
    (tmp_path / "report.json").write_text(json.dumps({"kernels": {"rows": [
        dict(op="aggregate", impl="triton", B=B, H=H, W=W, C=C, dtype="bf16", status="ok",
             median_ms=2 * bound_us / 1e3)]}}))
    meas = roofline.load_measured(str(tmp_path / "report.json"))
    assert meas[("triton", "gma_aggregate_kernel", C, H, W, B, "bf16")] == pytest.approx(2 * bound_us / 1e3)


@pytest.mark.parametrize("dtype,e,prec", [("fp32", 4, "tf32x3"), ("bf16", 2, "tf32")])
def test_attention_backward_costs_by_hand(dtype, e, prec):
    """The training kernels' cost models as the Triton stage set runs them: Z, V, R and the
    gradients stage tensors in the layer's dtype (`config.stage_dtype`), dA too, the dots the
    layer dtype's."""
    from gmf_kernels.triton_kernels.attention_backward import _split_plan, crpe_gpu_tile, crpe_rows_plan
    from gmf_kernels.triton_kernels.config import B1_TILES, B2_TILES
    B, H, W, C = 2, 56, 56, 80
    N, cp, d = H * W, 64, 8
    splits_b1 = _split_plan(N, B, B1_TILES[16][0])[0]
    b1 = triton_costs.cost("b1_dkv", B, H, W, C, dtype)
    assert b1.bytes == B * N * cp * 2 * e + 2 * cp * 4 + B * 8 * splits_b1 * d * d * 4      # Zq, dA, BatchNorm affine
    assert (b1.tc_flops, b1.tc_precision, b1.grid) == (2 * B * N * cp * d, prec, (splits_b1, 8, B))
    b2 = triton_costs.cost("b2_attention", B, H, W, C, dtype)
    tiles = -(-N // B2_TILES[16][0])
    assert b2.bytes == (B * N * cp * 3 * e + B * cp * (2 * d + 2) * 4 + 4 * B * N * cp * e     # dA, V, R; Q, K from Z
                        + 2 * B * N * cp * e + B * tiles * 2 * 3 * cp * 4 + 4 * cp * 4)    # + the fused BatchNorm
    assert b2.tc_flops == 3 * 2 * B * N * cp * d and b2.tc_precision == prec
    crpe = triton_costs.cost("b2_crpe", B, H, W, C, dtype)
    bc, _, walk = crpe_gpu_tile(d, prec)             # the GPU default at D_PAD 16: a row walk
    assert walk
    splits_c = crpe_rows_plan(H, W, B, bc)[0]
    _, attn_w = weights_floats(C)
    # dR read, dV read and written, Z of v read, the BatchNorm sums' and the bias gradient's partials, the
    # BatchNorm vectors, the CRPE weights; the weight gradient is gma_dw_wgrad_kernel's
    assert crpe.bytes == B * N * cp * e + 2 * B * N * cp * e + B * N * cp * e + B * splits_c * 3 * cp * 4 + 4 * cp * 4 + B * splits_c * cp * 4 + 4 * (attn_w - 8 * d)
    assert (crpe.tc_flops, crpe.cuda_flops) == (0, 2 * B * N * (2 * 9 + 3 * 25 + 3 * 49) * d)
    rows = roofline.rows(batches=(1,), dtypes=(dtype,), shape_list=[(C, H, W)], train=True)
    kernels = {(r["backend"], r["kernel"]) for r in rows}
    assert kernels == ({(b, k) for b in roofline.BACKENDS for k in roofline.KERNELS}
                       | {("triton", k) for k in roofline.TRAIN_KERNELS["triton"]})


@pytest.mark.parametrize("C,H,dtype,e", [(80, 14, "bf16", 2), (480, 7, "fp32", 4)])
def test_aggregation_backward_costs_by_hand(C, H, dtype, e):
    """One training call's aggregation backward (batch statistics; B3 fused at S_PAD <= 64, so
    at s = 16, not at s = 96): bytes and FLOPs by hand, each kernel summed over its launches."""
    B, W = 2, H
    s, N = C // 5, H * H
    cp, M3, M1 = 4 * s, 3 * B * N, B * N
    prec = "tf32" if dtype == "bf16" else "tf32x3"
    r = triton_costs.aggregation_backward_costs(B, H, W, C, dtype, prec)
    fused = s <= 64
    parts = lambda name: r[name].bytes                                          # noqa: E731
    dz = 3 * e * M3 * s + 3 * cp * 4 + (0 if fused else 3 * e * M3 * cp + 3 * cp * 4)
    assert parts("gma_dz_kernel") == dz and r["gma_dz_kernel"].detail["launches"] == (1 if fused else 2)
    pw = r["gma_pw_backward_kernel"]
    s_pad = 16 if s <= 16 else 128
    splits = pw.grid[1]
    assert pw.bytes == 3 * M3 * s * ((2 if fused else 1) + 2) * e + 3 * s * s * 4 + splits * 3 * s_pad * s_pad * 4
    assert (pw.tc_flops, pw.tc_precision) == (12 * M3 * s * s, prec)
    dw = r["gma_dw_backward_kernel"]
    assert dw.detail["launches"] == 4
    assert dw.cuda_flops == 2 * M3 * s * (9 + 25 + 49) + 2 * 9 * M1 * 3 * s
    assert dw.bytes == 2 * e * M3 * s * 3 + (9 + 25 + 49) * s * 4 + 2 * e * M1 * 3 * s + 9 * 3 * s * 4
    wg = r["gma_dw_wgrad_kernel"]                # segments 1..3, the local branch, the CRPE's three windows
    d = s // 2
    assert wg.detail["launches"] == 7
    assert wg.cuda_flops == dw.cuda_flops + 2 * M1 * d * (2 * 9 + 3 * 25 + 3 * 49)
    assert wg.bytes > 2 * e * (3 * M3 * s + M1 * 3 * s + M1 * 8 * d)             # + the partials
    loc = r["gma_local_backward_kernel"]
    assert loc.tc_flops == 12 * M1 * s * s and loc.block is not None
    assert loc.bytes > M1 * (8 * s * e + 4)                        # + the partials and the weights
    for name in triton_costs.AGG_BACKWARD_KERNELS:             # cost() dispatches to the same figures
        assert triton_costs.cost(name, B, H, W, C, dtype) == r[name]


@pytest.mark.parametrize("dtype,e", [("fp32", 4), ("bf16", 2)])
def test_statistics_and_recompute_costs_by_hand(dtype, e):
    """The statistics pass (fp32's dots whatever the layer dtype; keeping Z and y for the backward, as a
    training step with a backward runs it), the backward's V from the kept Z, and the recompute
    (the layer dtype's dots; eval with gradients) of one training call, by hand; grids from the
    launchers' plans."""
    B, H, W, C = 2, 14, 14, 160
    s, N, cp, d = 32, 196, 128, 16
    T = B * N
    r = triton_costs.recompute_costs(B, H, W, C, dtype, (9, 0))
    proxy_w = ((9 + 25 + 49) * s + 3 * s * s) * 4
    st = r["gma_statistics_kernel"]
    R = st.grid[0]
    assert st.grid == (R, 3 * B) and st.tc_precision == "tf32x3"
    assert st.bytes == 12 * T * s * e + 3 * B * R * s * (8 + 4) + 3 * T * (4 * s * e + 3 * s * e) + proxy_w  # Z, y
    assert (st.tc_flops, st.cuda_flops) == (18 * T * s * s, 2 * 3 * T * 83 * s)
    pv = r["gma_proxy_v_kernel"]
    assert pv.bytes == 2 * T * 4 * s * e + 2 * 4 * s * 4 and pv.tc_flops == pv.cuda_flops == 0
    rz = r["gma_recompute_z_kernel"]
    assert rz.tc_precision == ("tf32x3" if dtype == "fp32" else "tf32")
    assert rz.bytes == 12 * T * s * e + 3 * T * (4 * s * e + 3 * s * e) + T * 4 * s * e + proxy_w + 2 * 4 * s * 4  # Z, y; P of v
    ra = r["gma_recompute_attention_kernel"]
    splits = ra.grid[0]
    assert ra.grid == (splits, 8, B)
    assert ra.bytes == 3 * T * cp * e + B * splits * cp * (d + 2) * 4 + (240 * d + cp + 2 * cp) * 4
    assert (ra.tc_flops, ra.cuda_flops) == (2 * T * cp * d, 2 * T * 240 * d)
    rl = r["gma_recompute_local_kernel"]
    assert rl.bytes == T * (7 * s * e + 4) + (27 * s + 3 * s * s) * 4
    assert (rl.tc_flops, rl.cuda_flops) == (6 * T * s * s, 54 * T * s)
    for name in triton_costs.RECOMPUTE_KERNELS:             # cost() dispatches to the same figures
        assert triton_costs.cost(name, B, H, W, C, dtype) == r[name]


@pytest.mark.parametrize("dtype,e", [("fp32", 4), ("bf16", 2)])
def test_z_pass_cost_by_hand(dtype, e):
    """The split eval forward's Z pass (the statistics kernel storing Z only): segments 1-3 of q, k, v read,
    their Z written in the stage dtype (the layer's: e), the filters once; fp32's dots; the statistics
    pass's grid. With the split's aggregation it moves more bytes than the fused aggregation."""
    B, H, W, C = 2, 14, 14, 160
    s, T = 32, 2 * 196
    z = triton_costs.cost("z_pass", B, H, W, C, dtype)
    assert z == triton_costs.cost(triton_costs.Z_PASS, B, H, W, C, dtype) and roofline.Z_PASS == triton_costs.Z_PASS
    proxy_w = ((9 + 25 + 49) * s + 3 * s * s) * 4
    assert z.bytes == 9 * T * s * e + 9 * T * s * e + proxy_w
    assert (z.tc_flops, z.cuda_flops, z.tc_precision) == (18 * T * s * s, 2 * 3 * T * 83 * s, "tf32x3")
    st = triton_costs.recompute_costs(B, H, W, C, dtype, (9, 0))["gma_statistics_kernel"]
    assert z.grid == st.grid
    fused = triton_costs.cost("aggregate", B, H, W, C, dtype)
    split = triton_costs.cost("aggregate", B, H, W, C, dtype,
                              shape=triton_costs.shape_for(C, dtype, (9, 0), {"SPLIT": 1}))
    assert split.detail["z_read"] == 9 * T * s * e and split.detail["qkv_read"] == 6 * T * s * e
    assert fused.bytes < z.bytes + split.bytes
    assert split.cuda_flops + z.cuda_flops == fused.cuda_flops     # the stencils moved to the Z pass


@pytest.mark.parametrize("dtype,e", [("fp32", 4), ("bf16", 2)])
def test_dense_z_pass_cost_by_hand(dtype, e):
    """The ZDENSE Z pass: segments 1-4 of q, k, v read, Z of segments 1-3 and the local branch's written (stage
    dtype: e), every product on tensor cores at its dots (3xTF32 for fp32, the input's own for bf16), nothing on
    CUDA cores; its aggregation reads the local branch's Z instead of qkv's segment 4 and runs no stencil."""
    B, H, W, C = 2, 14, 14, 160
    s, T = 32, 2 * 196
    dense = triton_costs.shape_for(C, dtype, (9, 0), {"SPLIT": 1, "ZDENSE": 1})
    assert dense.local_from_z
    z = triton_costs.cost("z_pass", B, H, W, C, dtype, shape=dense)
    w = ((9 + 25 + 49) * s + 3 * s * s + 27 * s + 3 * s * s) * 4
    assert z.bytes == 12 * T * s * e + 10 * T * s * e + w
    assert (z.tc_flops, z.cuda_flops) == (2 * T * s * s * (3 * 83 + 27), 0)
    assert z.tc_precision == ("tf32x3" if dtype == "fp32" else "bf16")
    from gmf_kernels.triton_kernels.dense_z import dense_z_tiles
    assert z.grid == (-(-196 // dense_z_tiles(C, 1)[0]), 4, B)
    agg = triton_costs.cost("aggregate", B, H, W, C, dtype, shape=dense)
    assert agg.detail["z_read"] == 10 * T * s * e and agg.detail["qkv_read"] == 3 * T * s * e
    assert agg.cuda_flops == 0 and agg.tc_flops == 2 * T * 4 * s * (4 * s // 8)     # exp(K)^T V only


@pytest.mark.parametrize("dtype,e", [("fp32", 4), ("bf16", 2)])
def test_fused_forward_cost_by_hand(dtype, e):
    """The FUSED aggregation (`dense_z.gma_dense_aggregate_kernel`): qkv read once, Q and V and the local branch's
    part of pre written, one partial row per segment and tile, no Z; the dense pass's tensor-core work plus exp(K)^T
    V, nothing on CUDA cores; fewer bytes than the ZDENSE Z pass and its aggregation together."""
    from gmf_kernels.triton_kernels import dense_z
    B, H, W, C = 2, 14, 14, 160
    s, N = 32, 196
    d = 4 * s // 8
    fused = triton_costs.shape_for(C, dtype, (9, 0), {"SPLIT": 1, "ZDENSE": 1, "FUSED": 1})
    assert fused.AGG_FUSED and fused.local_from_z
    c = triton_costs.cost("aggregate", B, H, W, C, dtype, shape=fused)
    T = -(-N // dense_z.fused_tile(C, 1, c.tc_precision if dtype == "fp32" else "tf32")[0])
    assert c.grid == (T, 8, B)
    assert c.detail["qkv_read"] == B * N * 3 * C * e and c.detail["qv_write"] == 2 * B * N * 4 * s * e
    assert c.detail["pre_write"] == B * N * s * e and c.detail["partials_write"] == B * 4 * T * s * (2 + d) * 4
    assert "z_read" not in c.detail and c.cuda_flops == 0
    assert c.tc_flops == 2 * B * N * s * s * (3 * 83 + 27) + 2 * B * N * 4 * s * d
    split = triton_costs.shape_for(C, dtype, (9, 0), {"SPLIT": 1, "ZDENSE": 1})
    two = (triton_costs.cost("z_pass", B, H, W, C, dtype, shape=split).bytes
           + triton_costs.cost("aggregate", B, H, W, C, dtype, shape=split).bytes)
    assert c.bytes < two


def test_rows_describe_the_tuned_tiles(table_dir):
    """With a tuning table for the report's architecture, the rows model the tiles a launch runs
    (the table's: what `--measured` timings ran), not the defaults."""
    import torch

    from gmf_kernels import tuning
    from gmf_kernels.cuda import launcher as CL
    from gmf_kernels.triton_kernels import launcher as L
    C, dt, tdt, cap = 80, "bf16", torch.bfloat16, roofline.CAPABILITY
    agg_default = L.aggregate_default(C, tdt, cap)
    agg = next(c for c in tuning.spaces()[L.AGG_FAMILY].candidates(C, tdt, cap)
               if c["num_warps"] != agg_default["num_warps"])
    tile = next(c for c in tuning.spaces()[CL.TILE_FAMILY].candidates(C, tdt, cap) if c != CL.AUTO)

    def row(backend):
        return next(r for r in roofline.rows(batches=[128], dtypes=[dt], backends=[backend],
                                             shape_list=[(C, 56, 56)]) if r["kernel"] == "gma_aggregate_kernel")
    before = {b: row(b) for b in ("triton", "cuda")}
    (table_dir / f"{tuning.arch_key(cap)}.json").write_text(json.dumps({"arch": tuning.arch_key(cap), "kernels": {
        L.AGG_FAMILY: {str(C): {"bfloat16": agg}}, CL.TILE_FAMILY: {str(C): {"bfloat16": tile}}}}))
    tuning.clear_cache()
    after = {b: row(b) for b in ("triton", "cuda")}
    want = triton_costs.cost("aggregate", 128, 56, 56, C, dt, cap,
                             shape=triton_costs.shape_for(C, dt, cap, {**agg, "ATTN_BLOCK_P": 0}))
    assert after["triton"]["block"] == want.block != before["triton"]["block"]
    assert after["triton"]["programs"] == want.programs
    want = cuda_costs.cost("aggregate", 128, 56, 56, C, dt, cap, config=tile)
    assert after["cuda"]["programs"] == want.programs
    assert after["cuda"]["grid"] == (list(want.grid) if want.grid else None)


def test_rows_add_the_z_pass_where_the_split_is_tuned(table_dir):
    """Where the tuning table picks the split forward (SPLIT) for a width and dtype, the Triton rows have a
    gma_z_pass row before the aggregation, whose row then models the aggregation from Z; elsewhere no
    such row. ops.py's z_pass rows are its measured times."""
    import torch

    from gmf_kernels import tuning
    from gmf_kernels.triton_kernels import launcher as L
    C, dt, cap = 80, "bf16", roofline.CAPABILITY
    split = next(c for c in tuning.spaces()[L.AGG_FAMILY].candidates(C, torch.bfloat16, cap) if c.get("SPLIT"))
    (table_dir / f"{tuning.arch_key(cap)}.json").write_text(json.dumps({"arch": tuning.arch_key(cap), "kernels": {
        L.AGG_FAMILY: {str(C): {"bfloat16": split}}}}))
    tuning.clear_cache()
    shapes = [(C, 56, 56), (160, 28, 28)]
    rs = roofline.rows(batches=[128], dtypes=[dt, "fp32"], backends=["triton"], shape_list=shapes)
    z = [r for r in rs if r["kernel"] == roofline.Z_PASS]
    assert [(r["C"], r["dtype"]) for r in z] == [(C, dt)]
    assert rs.index(z[0]) < next(i for i, r in enumerate(rs) if r["kernel"] == "gma_aggregate_kernel")
    want = triton_costs.cost("z_pass", 128, 56, 56, C, dt, cap)
    assert z[0]["bytes"] == want.bytes and z[0]["programs"] == want.programs
    agg = next(r for r in rs if r["kernel"] == "gma_aggregate_kernel" and r["C"] == C and r["dtype"] == dt)
    sh = triton_costs.shape_for(C, dt, cap, {**split, "ATTN_BLOCK_P": 0})
    assert sh.AGG_SPLIT and agg["bytes"] == triton_costs.cost("aggregate", 128, 56, 56, C, dt, cap, shape=sh).bytes
    tmp = table_dir / "ops.json"
    tmp.write_text(json.dumps([dict(op="z_pass", impl="triton", B=128, H=56, W=56, C=C, dtype=dt, status="ok",
                                    median_ms=0.5)]))
    meas = roofline.load_measured(str(tmp))
    assert meas == {("triton", roofline.Z_PASS, C, 56, 56, 128, dt): 0.5}
    r = next(r for r in roofline.rows(batches=[128], dtypes=[dt], backends=["triton"], shape_list=shapes[:1],
                                      measured=meas) if r["kernel"] == roofline.Z_PASS)
    assert r["measured_us"] == 500.0
