"""benchmarks/roofline.py and the kernels' cost models (triton_kernels/costs.py, cuda/costs.py):
hand-computed byte and FLOP counts, the bound arithmetic, resources and --measured (CPU only)."""
import csv
import json
import os
import sys

import pytest

from gmf_kernels.cuda import costs as cuda_costs
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
    # split-N: want min(98, ceil(1024 / 10)) = 98 splits of one tile each
    B, H, W, C = 2, 56, 56, 80
    N, s, cp, d = H * W, 16, 64, 8
    shape = gma_shape(C, agg_block_p=32, attn_block_p=64, ck=16, dots="tf32")
    agg_w, attn_w = weights_floats(C)

    comb = triton_costs.cost("combine", B, H, W, C, dtype, shape=shape)
    assert comb.grid == (8, B)
    assert comb.bytes == B * 98 * cp * (2 + d) * 4 + B * cp * d * 4 == 501760 + 4096

    agg = triton_costs.cost("gma_aggregate_kernel", B, H, W, C, dtype, shape=shape)
    assert agg.grid == (98, 5, B)
    assert agg.bytes == (B * N * 3 * C * e + 2 * B * N * cp * e + B * N * s * e + B * 98 * cp * (2 + d) * 4
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
