"""The aggregation's default tiles (`config.agg_tiles`) follow the occupancy rule over the
committed tile sweep (`benchmarks/triton_resources.py --aggregate-sweep`,
benchmarks/results/triton_aggregate_tile_sweep_sm80_sm90.json: every released width's
aggregation compiled for sm_80 and sm_90 with each tile), and the rule itself behaves as its
docstring says. No compile here: the sweep takes ~14 minutes on two cores; the defaults'
own compiles (no spills) are tests/test_triton_compile.py's."""
import json
import os
import sys

import pytest

from gmf_kernels.triton_kernels.config import agg_tiles
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import triton_resources as tr  # noqa: E402

SWEEP_JSON = os.path.join(ROOT, "benchmarks", "results", tr.SWEEP_NAME + ".json")


def _row(C, dtype, arch, dots, tile, registers, spills=0):
    ctas = tr.resident_ctas(arch, registers, tile[1], 0)
    return {"C": C, "dtype": dtype, "arch": arch, "dots": dots, "tile": list(tile), "registers": registers,
            "spills": spills, "ctas": ctas}


def test_resident_ctas_counts_registers_by_warp_granules():
    # 167 registers round to 168 per thread, 5376 per warp: 4 warps 21504 -> 3 CTAs, 8 warps 43008 -> 1
    assert tr.resident_ctas(90, 167, 4, 0) == 3
    assert tr.resident_ctas(90, 167, 8, 0) == 1
    assert tr.resident_ctas(90, 128, 4, 0) == 4
    assert tr.resident_ctas(80, 64, 4, 0) == 8
    # shared memory limits too (sm_90: 228 KiB usable, 1 KiB reserved per CTA)
    assert tr.resident_ctas(90, 32, 4, 100 * 1024) == 2


def test_occupancy_rule_keeps_the_default_on_a_tie_and_moves_for_more_warps():
    C, dots = 80, "tf32"
    rows = [_row(C, dt, a, dots, t, regs) for dt in ("fp16", "bf16") for a in (80, 90)
            for t, regs in (((32, 8, 16), 167), ((16, 4, 16), 167), ((32, 4, 16), 160), ((64, 4, 16), 250))]
    scores = tr.occupancy_scores(rows, C, dots)
    assert scores[(32, 8, 16)][:2] == (8, 32)          # one CTA of 8 warps per SM, four cases
    assert scores[(16, 4, 16)][:2] == (12, 48)
    # more warps resident: move, and among the 12-warp tiles take the one with more tokens in flight
    assert tr.occupancy_choice(rows, C, dots, (32, 8, 16)) == (32, 4, 16)
    # a default already at the most warps stays, even where another tile has more tokens in flight
    assert tr.occupancy_choice(rows, C, dots, (16, 4, 16)) == (16, 4, 16)


def test_occupancy_rule_refuses_a_tile_that_spills_anywhere_or_is_missing():
    C, dots = 80, "tf32x3"
    rows = [_row(C, "fp32", a, dots, (16, 8, 16), 200) for a in (80, 90)]
    rows += [_row(C, "fp32", 80, dots, (16, 4, 16), 128), _row(C, "fp32", 90, dots, (16, 4, 16), 128, spills=36)]
    rows += [_row(C, "fp32", 80, dots, (32, 4, 16), 100)]             # not compiled for sm_90
    assert set(tr.occupancy_scores(rows, C, dots)) == {(16, 8, 16)}
    assert tr.occupancy_choice(rows, C, dots, (16, 4, 16)) == (16, 8, 16)
    assert tr.occupancy_choice([r for r in rows if r["tile"] != [16, 8, 16]], C, dots, (16, 4, 16)) is None


def test_failed_compiles_count_as_not_spill_free():
    C, dots = 80, "tf32x3"
    rows = [_row(C, "fp32", a, dots, (16, 4, 16), 128) for a in (80, 90)]
    rows.append(dict(_row(C, "fp32", 90, dots, (32, 4, 16), 1), registers=None, spills=None, ctas=None))
    rows.append(_row(C, "fp32", 80, dots, (32, 4, 16), 64))
    assert set(tr.occupancy_scores(rows, C, dots)) == {(16, 4, 16)}


@pytest.fixture(scope="module")
def sweep():
    if not os.path.exists(SWEEP_JSON):
        pytest.fail(f"{SWEEP_JSON} is missing: run `python benchmarks/triton_resources.py --aggregate-sweep`")
    with open(SWEEP_JSON) as fh:
        return json.load(fh)


def test_sweep_covers_every_released_width_dtype_and_tile(sweep):
    from gmf_kernels.triton_kernels.config import dot_pad
    from gmf_kernels.triton_kernels.specializations import real_calls
    rows = sweep["rows"]
    widths = {call.C for call in real_calls()}
    assert {r["C"] for r in rows} == widths
    for C in widths:
        tiles = {t for t in tr.SWEEP_TILES if t[2] <= dot_pad(C // 5)}
        for arch in sweep["archs"]:
            for dtype in ("fp32", "fp16", "bf16"):
                got = {tuple(r["tile"]) for r in rows if (r["C"], r["arch"], r["dtype"]) == (C, arch, dtype)}
                assert got == tiles, (C, arch, dtype)


def test_defaults_follow_the_occupancy_rule(sweep):
    """Every released width's default tile, per dot precision the sweep compiled, is the rule's
    choice: a tile change that lowers the resident warps (or spills on one of the GPUs) fails here."""
    rows = sweep["rows"]
    wrong = []
    for C, dots in sorted({(r["C"], r["dots"]) for r in rows}):
        current = tuple(agg_tiles(C, dots))
        pick = tr.occupancy_choice(rows, C, dots, current)
        if pick != current:
            scores = tr.occupancy_scores(rows, C, dots)
            wrong.append(f"C={C} {dots}: default {current} {scores.get(current, 'spills')}, "
                         f"rule {pick} {scores.get(pick)}")
    assert not wrong, "defaults off the occupancy rule (config.AGG_TILES / AGG_TILES_BY_DOTS):\n" + "\n".join(wrong)
