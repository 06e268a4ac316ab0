"""Global-memory hazards of the Triton kernels: races a GPU would have and the interpreter hides.

The parity tests run the kernels under Triton's interpreter, which runs one program at a time
to its end, every thread in lock step: a kernel whose programs read or write each other's
elements, or whose threads load what other threads of the CTA stored with no barrier between,
passes there and gives wrong, run-to-run different answers on a GPU; an unmasked access past a
tensor's end reads whatever lies there, where a GPU may fault. `triton_hazards.HazardCheck`
records every global load, store and atomic of every program and reports such accesses
(its docstring lists the kinds). Here:

* the check itself: a toy kernel per kind of hazard is reported, the clean variants are not;
* every kernel of the library, with the GPU tiles (not the interpreter's one large tile), in
  two decompositions: "wide", the launchers' own split targets (many programs per image, as at
  batch 1), and "deep", every split target set to 1 (each program walks many tiles, as at batch
  128, where partial sums stay in a program across tiles); eval, eval with gradients and
  training; the unfused B3 path of wide segments (forced at a small width); a grid wider than
  the aggregation's strip; each case must be free of findings;
* the union of the cases launches every `gma_*_kernel` defined in gmf_kernels/triton_kernels/
  (found by parsing the sources), so a new kernel is checked or this test fails;
* no kernel needs a CTA barrier: every case is also checked as if each kernel's barriers were
  taken away (`HazardCheck(without_barriers=...)`, which the toys show reports a missing one), and
  no kernel source calls `tl.debug_barrier()`. (Until 2026-12-05 `gma_b2_crpe_kernel` kept its
  weight-gradient partials in global memory across its tiles behind a barrier, and this test
  showed the check reporting that barrier taken away.)
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import triton
import triton.language as tl

from gmf_kernels.triton_kernels import _common
from helpers import defined_triton_kernels, gpu_tiles_under_interpreter, skip_unless_supported
from training_cases import make, run_mode
from triton_hazards import HazardCheck

if not _common.interpreting():
    pytest.skip("the hazard check runs the kernels under Triton's interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)


# ------------------------------------------------------------------ the check on toy kernels
@triton.jit
def _toy_kernel(x, y, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mirror = pid * BLOCK + (BLOCK - 1 - tl.arange(0, BLOCK))     # another thread's element
    v = tl.load(x + o)
    if MODE == 0:                                              # clean
        tl.store(y + o, v * 2)
    if MODE == 1:                                              # every program writes y[0:BLOCK]
        tl.store(y + tl.arange(0, BLOCK), v)
    if MODE == 2:                                              # reads the next program's output
        tl.store(y + o, v)
        tl.store(x + o, tl.load(y + (o + BLOCK) % (BLOCK * tl.num_programs(0))))
    if MODE == 3:                                              # own output, another thread, no barrier
        tl.store(y + o, v)
        tl.store(x + o, tl.load(y + mirror))
    if MODE == 4:                                              # the same with a barrier: clean
        tl.store(y + o, v)
        tl.debug_barrier()
        tl.store(x + o, tl.load(y + mirror))
    if MODE == 5:                                              # one store, two values per element
        tl.store(y + pid * BLOCK + tl.arange(0, BLOCK) // 2, v)
    if MODE == 6:                                              # atomics among programs: clean
        tl.atomic_add(y + tl.arange(0, BLOCK), v)
    if MODE == 7:                                              # atomics, then a plain read
        tl.atomic_add(y + tl.arange(0, BLOCK), v)
        tl.store(x + o, tl.load(y + tl.arange(0, BLOCK)))
    if MODE == 8:                                              # two stores, no barrier
        tl.store(y + o, v)
        tl.store(y + mirror, v + 1)
    if MODE == 9:                                              # the last program reads x[64]
        tl.store(y + o, tl.load(x + o + 1))


TOYS = {0: set(), 1: {"cross-program write/write"}, 2: {"cross-program read/write"},
        3: {"read after write, no barrier"}, 4: set(), 5: {"one store, two values"}, 6: set(),
        7: {"cross-program atomic/plain", "read after write, no barrier"}, 8: {"write after write, no barrier"},
        9: {"outside every tensor argument"}}


@pytest.mark.parametrize("mode", sorted(TOYS))
def test_check_reports_each_kind_of_hazard(mode):
    x = torch.randn(64)
    y = torch.zeros(64)
    with HazardCheck() as hc:
        _toy_kernel[(4,)](x, y, MODE=mode, BLOCK=16)
    assert hc.launches == [("_toy_kernel", (4, 1, 1))]
    assert {f.kind for f in hc.findings} == TOYS[mode], [str(f) for f in hc.findings]
    for f in hc.findings:
        assert f.kernel == "_toy_kernel", str(f)
        assert re.fullmatch(r"[xy]\[\d+\]" if mode != 9 else r"address 0x[0-9a-f]+ \(no tensor argument\)", f.where), str(f)
        if mode == 9:
            assert f.programs == ((3, 0, 0),) and f.count == 4


def test_check_restores_the_interpreter():
    from triton.runtime import interpreter as I
    before = (I.GridExecutor.__call__, I.interpreter_builder.create_masked_store)
    with HazardCheck():
        assert I.GridExecutor.__call__ is not before[0]
    assert (I.GridExecutor.__call__, I.interpreter_builder.create_masked_store) == before
    y = torch.zeros(64)
    _toy_kernel[(4,)](torch.ones(64), y, MODE=0, BLOCK=16)
    assert torch.equal(y, torch.full((64,), 2.0))


# ------------------------------------------------------------------ the library's kernels
def _gpu_tiles(monkeypatch, deep: bool, unfused_b3: bool):
    """The launchers plan the GPU tiles for CPU tensors; deep: every split target 1."""
    import gmf_kernels.triton_kernels.aggregation_backward as agb
    import gmf_kernels.triton_kernels.attention_backward as atb
    import gmf_kernels.triton_kernels.launcher as launcher
    import gmf_kernels.triton_kernels.recompute as recompute
    import gmf_kernels.triton_kernels.statistics as statistics
    gpu_tiles_under_interpreter(monkeypatch)
    if deep:
        for mod in (statistics, recompute, atb):
            monkeypatch.setattr(mod, "SPLIT_TARGET", 1)
        shape, tiles = launcher.default_shape, agb.gpu_backward_tiles
        monkeypatch.setattr(launcher, "default_shape",
                            lambda *a, **k: dataclasses.replace(shape(*a, **k), SPLIT_TARGET=1))
        monkeypatch.setattr(agb, "gpu_backward_tiles",
                            lambda *a, **k: dataclasses.replace(tiles(*a, **k), TARGET_PROGRAMS=1))
    if unfused_b3:
        monkeypatch.setattr(agb, "FUSED_B3_MAX_S_PAD", 0)


#: (id, C, (H, W), B, mode, dtype, deep, unfused B3). Small problems: the GPU tiles under the
#: interpreter cost about a second per program and launch.
CASES = [
    ("wide-train-fp32-C40-8x9-B1", 40, (8, 9), 1, "train", torch.float32, False, False),
    ("deep-train-bf16-C40-8x9-B1", 40, (8, 9), 1, "train", torch.bfloat16, True, False),
    ("deep-grad-fp16-C40-6x7-B1-unfusedB3", 40, (6, 7), 1, "grad", torch.float16, True, True),
    ("wide-eval-fp32-C60-5x37-B2", 60, (5, 37), 2, "eval", torch.float32, False, False),
]
_RESULTS = {}


def _run_case(case, monkeypatch):
    """The case's HazardCheck (run once per session; every kernel also checked as if without barriers)."""
    cid, C, (H, W), B, mode, dtype, deep, unfused = case
    skip_unless_supported("triton", dim=C, H=H, W=W, B=B, dtype=dtype, training=mode == "train",
                          needs_grad=mode != "eval")
    if cid not in _RESULTS:
        with monkeypatch.context() as mp:
            _gpu_tiles(mp, deep, unfused)
            w, x = make(C, H, W, B)
            with HazardCheck(without_barriers=tuple(defined_triton_kernels())) as hc:
                run_mode("triton", x, (H, W), w, dtype, mode)
        _RESULTS[cid] = hc
    return _RESULTS[cid]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_free_of_global_memory_hazards(case, monkeypatch):
    hc = _run_case(case, monkeypatch)
    assert hc.launches, "no Triton kernel ran"
    assert not hc.findings, "\n".join(map(str, hc.findings))


#: kernels that only a tuning candidate launches, each checked by a test of its own (which asserts its launch)
DEDICATED = {"gma_dense_z_kernel": "test_dense_z_pass_free_of_hazards",
             "gma_dense_aggregate_kernel": "test_fused_forward_free_of_hazards",
             "gma_dense_statistics_kernel": "test_dense_statistics_free_of_hazards",
             "gma_dense_dx_kernel": "test_dense_backward_free_of_hazards",
             "gma_dense_wgrad_kernel": "test_dense_backward_free_of_hazards",
             "gma_dense_local_dx_kernel": "test_dense_backward_free_of_hazards",
             "gma_dense_local_wgrad_kernel": "test_dense_backward_free_of_hazards"}


def test_cases_launch_every_kernel(monkeypatch):
    defined = defined_triton_kernels()
    assert len(defined) >= 14, sorted(defined)
    launched = set()
    for case in CASES:
        launched |= {name for name, _ in _run_case(case, monkeypatch).launches}
    assert all(callable(globals()[test]) for test in DEDICATED.values())
    assert defined - set(DEDICATED) <= launched, f"kernels no hazard case launches: {sorted(defined - launched)}"
    # the decompositions differ: "deep" runs programs over several tiles, "wide" over one
    grids = {c[0]: dict(_run_case(c, monkeypatch).launches) for c in CASES[:2]}
    wide, deep = grids[CASES[0][0]], grids[CASES[1][0]]
    assert wide["gma_b2_crpe_kernel"][0] > deep["gma_b2_crpe_kernel"][0] == 1


@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_no_kernel_needs_a_barrier(case, monkeypatch):
    """Checked as if every kernel's barriers were taken away, no case reports anything (no thread reads
    what another thread of its program stored), and no kernel source has a barrier to take away."""
    hc = _run_case(case, monkeypatch)
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))
    import pathlib
    import gmf_kernels.triton_kernels as tk
    with_barrier = [p.name for p in pathlib.Path(tk.__file__).parent.glob("*.py") if "tl.debug_barrier(" in p.read_text()]
    assert not with_barrier, with_barrier


def test_check_without_barriers_on_a_toy():
    with HazardCheck(without_barriers=("_toy_kernel",)) as hc:
        _toy_kernel[(4,)](torch.randn(64), torch.zeros(64), MODE=4, BLOCK=16)
    assert not hc.findings
    assert [f.kind for f in hc.findings_without_barriers] == ["read after write, no barrier"]


def test_statistics_row_walks_free_of_hazards(monkeypatch):
    """The statistics pass's row-walk candidate (ROWS, "triton.statistics"; no case above takes it: C = 40
    has no PAIR tiles), with the planes kept: 20 columns in strips of 16 and 4, the 5x5 segment in runs of 6
    rows that end inside a strip or cross from one strip into the next, programs walking several rows.
    Also checked as if without barriers."""
    import gmf_kernels.triton_kernels.statistics as st
    from helpers import random_folded_weights
    monkeypatch.setattr(st, "SPLIT_TARGET", 36)
    C, H, W = 80, 9, 20
    f = random_folded_weights(C, torch.float32)
    with HazardCheck(without_barriers=("gma_statistics_kernel",)) as hc:
        st.z_moments(torch.randn(1, H * W, 3 * C), H, W, f.dw3, f.dw5, f.dw7, f.pw, (16, 4, 16, 1), store=True)
    (name, grid), = hc.launches
    assert name == "gma_statistics_kernel" and grid[0] > 4, hc.launches
    assert not hc.findings, "\n".join(map(str, hc.findings))
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))


def test_dense_z_pass_free_of_hazards():
    """The split forward's dense Z pass (`dense_z`, the ZDENSE candidate; no case above takes it): its GPU tile,
    three programs an image (the last ragged), the three segments, the local branch and two images; segment 0's
    planes of k and v left unwritten, q's holding the local branch's Z. Also checked as if without barriers."""
    import gmf_kernels.triton_kernels.dense_z as dz
    from gmf_kernels.triton_kernels._common import dot_variant
    from helpers import random_folded_weights
    C, H, W, B = 80, 13, 23, 2
    f = random_folded_weights(C, torch.float32)
    qkv = torch.randn(B, H * W, 3 * C)
    z, (grid, args, kwargs) = dz.plan_dense_z_pass(qkv, H, W, f.dw3, f.dw5, f.dw7, f.pw, f.local_dw, f.local_pw,
                                                    dot_variant(qkv))
    z.fill_(float("nan"))
    with HazardCheck(without_barriers=("gma_dense_z_kernel",)) as hc:
        dz.gma_dense_z_kernel[grid](*args, **kwargs)
    assert hc.launches == [("gma_dense_z_kernel", (3, 4, B))], hc.launches
    assert not hc.findings, "\n".join(map(str, hc.findings))
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))
    planes = z.view(3, B, 4, C // 5, H * W)
    assert planes[1:, :, 0].isnan().all() and not planes[:, :, 1:].isnan().any()
    assert not planes[0, :, 0].isnan().any()


def test_fused_forward_free_of_hazards():
    """The fused forward (`dense_z.gma_dense_aggregate_kernel`, the FUSED candidate; no case above takes it): its GPU
    tile, several tiles an image (the last ragged), its eight programs a tile (six head programs, segment 0, the
    local branch) and two images, each writing its own channels of Q, V and pre and its own halves of partial rows;
    then the combine reading them. Also checked as if without barriers."""
    from gmf_kernels.triton_kernels import launcher as L
    from gmf_kernels.triton_kernels.config import gma_shape
    from helpers import random_folded_weights
    C, H, W, B = 80, 9, 20, 2
    f = random_folded_weights(C, torch.float32)
    qkv = torch.randn(B, H * W, 3 * C).to(torch.bfloat16)
    shape = gma_shape(C, split=True, zdense=1, fused=True)
    with HazardCheck(without_barriers=("gma_dense_aggregate_kernel", "gma_combine_kernel")) as hc:
        r = L.launch_pre_projection(qkv, H, W, f, 0.3, 1e-5, shape=shape)
    grids = dict(hc.launches)
    assert grids["gma_dense_aggregate_kernel"][1:] == (8, B) and grids["gma_dense_aggregate_kernel"][0] >= 2, grids
    assert not hc.findings, "\n".join(map(str, hc.findings))
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))
    assert not any(t.isnan().any() for t in r.values())


def test_attention_group_free_of_hazards():
    """The attention's GROUP candidate (a program per CRPE window's heads, grid (tiles, 3, B); no case above takes
    it): its GPU tile from the search space, two tiles an image (the last ragged) and two images, each program
    writing its group's channels of pre, in the eval forward and in the training forward (R kept). Also checked as
    if without barriers."""
    from gmf_kernels.triton_kernels import launcher as L, statistics
    from gmf_kernels.triton_kernels._common import dot_variant
    from helpers import random_folded_weights
    C, H, W, B = 80, 5, 11, 2
    f = random_folded_weights(C, torch.float32)
    qkv = torch.randn(B, H * W, 3 * C)
    dots = dot_variant(qkv)
    cand = next(c for c in L.attention_candidates(C, torch.float32, (9, 0)) if c.get("GROUP"))
    shape = L.shape_from_configs(C, dots, L.aggregate_default(C, torch.float32, (9, 0)), cand)
    z = statistics.statistics_planes(qkv, H, W, f)[3][0]
    for planes in (None, L.planes_view(z, B)):
        with HazardCheck(without_barriers=("gma_attention_kernel",)) as hc:
            r = L.launch_pre_projection(qkv, H, W, f, 0.3, 1e-5, shape=shape, planes=planes)
        grid = dict(hc.launches)["gma_attention_kernel"]
        assert grid == (-(-H * W // shape.ATTN_BLOCK_P), 3, B) and grid[0] >= 2, hc.launches
        assert not hc.findings, "\n".join(map(str, hc.findings))
        assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))
        assert not r["pre"].isnan().any() and (planes is None or not r["R"].isnan().any())


def test_dense_statistics_free_of_hazards():
    """The training statistics pass in the dense form (`dense_z.dense_z_moments`; a training forward whose backward
    runs B3's dense form): its GPU tile, several tiles an image (the last ragged), the four segments of three
    streams and two images, each program writing its own Z tiles and partial rows, and the local branch's programs
    their own tiles of its Z. Also checked as if without barriers."""
    import gmf_kernels.triton_kernels.dense_z as dz
    from gmf_kernels.triton_kernels._common import dot_variant
    from helpers import random_folded_weights
    C, H, W, B = 80, 13, 23, 2
    f = random_folded_weights(C, torch.float32)
    qkv = torch.randn(B, H * W, 3 * C).to(torch.bfloat16)
    part_mean, part_m2, plan, z, zl, (grid, args, kwargs) = dz.plan_dense_statistics(
        qkv, H, W, f.dw3, f.dw5, f.dw7, f.pw, dot_variant(qkv), None, f.local_dw, f.local_pw)
    for t in (part_mean, part_m2, z, zl):
        t.fill_(float("nan"))
    with HazardCheck(without_barriers=("gma_dense_statistics_kernel",)) as hc:
        dz.gma_dense_statistics_kernel[grid](*args, **kwargs)
    assert hc.launches == [("gma_dense_statistics_kernel", (3, 5, B))], hc.launches
    assert not hc.findings, "\n".join(map(str, hc.findings))
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))
    assert not (part_mean.isnan().any() or part_m2.isnan().any() or z.isnan().any() or zl.isnan().any())


def test_dense_backward_free_of_hazards():
    """B3's dense form (`BackwardTiles.DENSE`, a "triton.backward" candidate; no case above takes it): the input
    gradient (its GPU tile, ragged at the image's end) into the qkv gradient's segments 1-3, and the weight
    gradient over two splits of a GPU-sized tile (tiles crossing the image border), each program writing its own
    partials; then the local branch's (segment 4's input gradient, its weight gradients' partials). Also checked as
    if without barriers."""
    import gmf_kernels.triton_kernels.dense_z as dz
    from gmf_kernels.triton_kernels._common import dot_variant
    from helpers import random_folded_weights
    C, H, W, B = 40, 9, 13, 2
    s = C // 5
    f = random_folded_weights(C, torch.float32)
    qkv = torch.randn(B, H * W, 3 * C)
    dZ = torch.randn(B, H * W, 9 * s)
    d_qkv = torch.full_like(qkv, float("nan"))
    grid, args, kwargs = dz.plan_dense_dx(dZ, d_qkv, H, W, f.dw3, f.dw5, f.dw7, f.pw, dot_variant(qkv))
    buf, (grid_w, args_w, kwargs_w) = dz.plan_dense_wgrad(qkv, dZ, H, W, f.dw3, f.dw5, f.dw7, f.pw,
                                                          dot_variant(qkv), tiles=(64, 4))
    buf["part_gdw"].fill_(float("nan"))
    dZL = torch.randn(B, H * W, s)
    grid_l, args_l, kwargs_l = dz.plan_dense_local_dx(dZL, d_qkv, H, W, f.local_dw, f.local_pw, dot_variant(qkv))
    buf_l, (grid_lw, args_lw, kwargs_lw) = dz.plan_dense_local_wgrad(qkv, dZL, H, W, f.local_dw, f.local_pw,
                                                                     dot_variant(qkv), tiles=(64, 4))
    buf_l["part_gdw"].fill_(float("nan"))
    kernels = ("gma_dense_dx_kernel", "gma_dense_wgrad_kernel", "gma_dense_local_dx_kernel",
               "gma_dense_local_wgrad_kernel")
    with HazardCheck(without_barriers=kernels) as hc:
        dz.gma_dense_dx_kernel[grid](*args, **kwargs)
        dz.gma_dense_wgrad_kernel[grid_w](*args_w, **kwargs_w)
        dz.gma_dense_local_dx_kernel[grid_l](*args_l, **kwargs_l)
        dz.gma_dense_local_wgrad_kernel[grid_lw](*args_lw, **kwargs_lw)
    assert hc.launches == [("gma_dense_dx_kernel", (1, 3, B)), ("gma_dense_wgrad_kernel", grid_w + (1,)),
                           ("gma_dense_local_dx_kernel", (1, 3, B)),
                           ("gma_dense_local_wgrad_kernel", grid_lw + (1,))], hc.launches
    assert grid_w[1] >= 2 and grid_lw[1] >= 2, (grid_w, grid_lw)
    assert not buf_l["part_gdw"].isnan().any()
    assert not hc.findings, "\n".join(map(str, hc.findings))
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))
    planes = d_qkv.view(B, H * W, 3, 5, s)
    assert planes[..., 0, :].isnan().all() and not planes[..., 1:, :].isnan().any()
    for j, k in enumerate((3, 5, 7)):       # every tap row of each segment written, the rest of the 49 not
        assert not buf["part_gdw"][:, j, :k * k].isnan().any() and buf["part_gdw"][:, j, k * k:].isnan().all()


def test_depthwise_backward_row_walks_free_of_hazards():
    """The depthwise input gradient's row walk (DW_ROWS, the GPU default of "triton.backward"; the cases
    above run the interpreter's tile kernels), into the qkv gradient's places as B3 launches it: 20 columns
    in strips of 16 and 4, 9 rows, 3 images, runs of 7 rows that end inside a strip and cross strips and
    images, two channel blocks. Also checked as if without barriers."""
    import gmf_kernels.triton_kernels.aggregation_backward as agb
    I, c, H, W, k = 3, 12, 9, 20, 7
    tiles = agb.BackwardTiles(BLOCK_C=8, BLOCK_P=16, WARPS=4, PW_BLOCK_P=16, PW_WARPS=4, TARGET_PROGRAMS=20,
                              DW_ROWS=16)
    dy, u = torch.randn(I, c, H, W), torch.randn(I, c, H, W)
    d_qkv = torch.zeros(1, H * W, 15 * c)
    _, launches = agb.plan_dw_backward(dy, u, torch.randn(k, k, c), agb.qkv_layout(d_qkv, 2), tiles)
    launches = [ln for ln in launches if ln[0] is agb.gma_dw_backward_kernel]
    assert launches and launches[0][3]["ROWS"] and launches[0][1][0] > 2 * I
    with HazardCheck(without_barriers=("gma_dw_backward_kernel",)) as hc:
        agb._launch(launches, dy)
    assert [name for name, _ in hc.launches] == ["gma_dw_backward_kernel"]
    assert not hc.findings, "\n".join(map(str, hc.findings))
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))


def test_crpe_backward_row_walks_free_of_hazards():
    """The CRPE backward's row-walk candidate (ROWS, "triton.b2_crpe"; the cases above run the default tiles)
    with the BatchNorm backward fused in, as B2 launches it after the attention kernel: 20 columns in strips
    of 16 and 4, 9 rows, runs of 7 rows that end inside a strip and cross into the next. Also checked as if
    without barriers."""
    import gmf_kernels.triton_kernels.attention_backward as atb
    from helpers import random_folded_weights
    C, H, W, B = 40, 9, 20, 2
    cp, d, N = 4 * C // 5, C // 10, H * W
    assert atb.crpe_rows_plan(H, W, B, 16) == (3, 7)
    f = random_folded_weights(C, torch.float32)
    rc = {"Z": torch.randn(3 * B, cp, H, W), "V": torch.randn(B, cp, H, W), "KV": torch.randn(B, 8, d, d),
          "R": torch.randn(B, cp, H, W)}
    stats = (torch.randn(cp), torch.rand(cp) + 0.5)
    _, launches = atb.plan_b2(torch.randn(B, 8, d, N), torch.randn(B, 8, d, d), rc, f, d ** -0.5,
                              tiles=(None, (16, 4, 1)), bn=stats)
    crpe = [ln for ln in launches if ln[0] is atb.gma_b2_crpe_kernel]
    assert crpe and crpe[0][3]["ROWS"] and crpe[0][1][0] == 3
    with HazardCheck(without_barriers=("gma_b2_crpe_kernel",)) as hc:
        atb._run([ln for ln in launches if ln[0] in (atb.gma_b2_attention_kernel, atb.gma_b2_crpe_kernel)],
                 rc["Z"])
    assert [name for name, _ in hc.launches] == ["gma_b2_attention_kernel", "gma_b2_crpe_kernel"]
    assert not hc.findings, "\n".join(map(str, hc.findings))
    assert not hc.findings_without_barriers, "\n".join(map(str, hc.findings_without_barriers))
