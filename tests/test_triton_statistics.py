"""The training forward's statistics pass and the backward's recompute of Z as Triton kernels
(triton_kernels/statistics.py).

Checked, the kernel through the Triton interpreter on CPU, against `backward.statistics` in
float64 (the oracle), per segment, mean and biased variance, under the low-precision rule:
error <= 2 x the error of the float32 PyTorch pass (`backward.statistics` on the same input,
float32 compute) + FLOOR = 3e-6. Why a floor: PyTorch's CPU reduction is off by about its
final fp32 rounding alone (measured 3-6e-8), while the kernel accumulates in fp32. Its variance
is within 2.1e-7 of the rule without floor (worst of CASES over 3 seeds); its mean within 1.1e-6:
under the interpreter `tl.sum` over a tile's tokens is NumPy's row-by-row fp32 sum (error
~2^-24 std per tile mean, independent of the tile length; GPU reductions are trees), and on
zero-mean data |mean| ~ std / sqrt(3B N), so relative to max |mean| that is ~2^-24 sqrt(tile
tokens / 2) ~ 1.4e-6 at the interpreter's 256-token tile. The naive fp32 sum / sum of
squares misses the large-offset case's variance by > 100x the allowance (checked there, so
the rule can fail).

* widths 40, 80, 200; grids 5x7, 7x7, 14x14; batch 1 and 2; fp32, fp16, bf16 inputs
  (statistics in fp32: `folding.compute_dtype`), each value of each axis covered;
* the GPU tiles and small tiles with several tiles per program and several splits (the
  interpreter's default is one tile per image), partial last tiles included;
* a common offset 1000 (mean >> std);
* the float32 merge against the launcher's float64 merge (the figure the module docstring
  quotes);
* SyncBatchNorm wiring (`distributed.sync_batch_moments`) in a one-rank gloo group, and
  torch.compile(fullgraph=True): the statistics pass is one ``gmf::triton_z_moments`` node;
* the Triton backend's training call runs the kernel (running statistics as the torch backend's);
* the recompute kernel (`statistics.recompute_planes`): Z per segment, PV (P of the v images) and
  y_1..3 against float64 `backward.proxy_z` (P: hardswish of its BatchNorm affine) under the same rule with
  floor 1e-7 (both sides measured at 1-3e-7), the reference at the kernel's dot precision (the
  backward's, `statistics.backward_dots`: for fp16/bf16 inputs one TF32 pass, so the float32
  PyTorch pass with TF32-rounded operands, `helpers.tf32_products`), Z's segment 0 exact; widths 40, 200, odd
  grids, batch 1 and 2, fp32/fp16/bf16, the GPU tile (partial depthwise chunk, two tiles per
  program) and 16-token tiles cut by cost; torch.compile keeps it one ``gmf::triton_proxy_z``
  node (the rest of the recompute, and a training step running all three launches once:
  tests/test_triton_recompute.py);
* the AOT compile of the real shape C=320 14x14 B=128 fp32 for sm_80 and sm_90, both kernels:
  no spills;
* the row-walk candidate (ROWS, `statistics._statistics_rows`): its plans (row tiles of ragged strips,
  runs ending inside a strip or crossing into the next), moments against float64, Z and y against the
  tile kernel's; the candidates' order and the launches it refuses; each candidate compiled for sm_90
  without a spill.
"""
import contextlib
import json
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from gmf_kernels.folding import _build  # noqa: E402
from gmf_kernels.numerics import cast_weights, max_rel_error, random_gma_weights  # noqa: E402
from gmf_kernels.triton_kernels import statistics as st  # noqa: E402
from gmf_kernels.triton_kernels import config  # noqa: E402
from gmf_kernels.triton_kernels.backward import proxy_z, segment_streams  # noqa: E402

from gmf_kernels.triton_kernels.backward import statistics as torch_statistics  # noqa: E402
from helpers import ROOT, assert_compiled_without_spills, assert_max_rel_close  # noqa: E402
from helpers import assert_within_reference_error  # noqa: E402
from helpers import have_triton_nvidia_backend, random_folded_weights, record_calls, triton_compile_env  # noqa: E402
from helpers import tf32_products, to_device, triton_test_device  # noqa: E402

FLOOR = 3e-6
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

#: where the kernels run: CPU tensors through the interpreter, else the GPU (the oracles stay on the CPU)
DEVICE = triton_test_device()


def dev(x):
    return to_device(x, DEVICE)


def pre_bn_weights(C, dtype, seed=0):
    """The weights the statistics pass takes (training.prepare's `pre_bn`: BatchNorms not folded)."""
    w = cast_weights(random_gma_weights(C, seed=seed), dtype)
    z = torch.zeros(1, dtype=dtype)
    return _build(w, z, z, dtype)


def check(qkv, H, W, C):
    """The kernel's (mean, var, count) against the float64 oracle, per segment, under the rule."""
    mean, var, n = st.statistics(dev(qkv), H, W, dev(pre_bn_weights(C, F32)))
    mean, var = mean.cpu(), var.cpu()
    m32, v32, n32 = torch_statistics(qkv, H, W, pre_bn_weights(C, F32))
    m64, v64, _ = torch_statistics(qkv.double(), H, W, pre_bn_weights(C, torch.float64))
    assert n == n32 == 3 * qkv.shape[0] * H * W
    assert mean.dtype == var.dtype == F32 and mean.shape == var.shape == (4, C // 5)
    for j in range(4):
        assert_within_reference_error(mean[j], m32[j], m64[j], floor=FLOOR, name=f"mean segment {j}")
        assert_within_reference_error(var[j], v32[j], v64[j], floor=FLOOR, name=f"var segment {j}")
    return mean, var


CASES = [  # (C, grid, B, dtype): every width, grid, batch and dtype, each at least twice
    (40, (5, 7), 1, F32), (40, (14, 14), 2, F16), (80, (7, 7), 2, BF16),
    (80, (14, 14), 1, F32), (200, (7, 7), 1, F16), (200, (5, 7), 1, BF16),
]


@pytest.mark.parametrize("C, grid, B, dtype", CASES,
                         ids=[f"C{c}-{g[0]}x{g[1]}-B{b}-{str(d)[6:]}" for c, g, b, d in CASES])
def test_matches_float64(C, grid, B, dtype):
    H, W = grid
    check(torch.randn(B, H * W, 3 * C).to(dtype), H, W, C)


# (C, grid, tiles, split target, per-segment splits expected): the GPU tile at C = 200 (s = 40 in 3
# depthwise chunks of CK = 16, the last one 8 channels; the interpreter's own tile takes s in one
# chunk), one 64-token tile holding 7x7's 49 tokens; 16-token tiles on 5x7 (3 tiles, the last 3
# tokens) cut by cost: segments 0 and 1 one run of 3 tiles, the 5x5 and 7x7 three runs of 1
TILINGS = [(200, (7, 7), st.DEFAULT_TILE, st.SPLIT_TARGET, (1, 1, 1, 1)), (80, (5, 7), (16, 4, 16), 24, (1, 1, 3, 3))]


@pytest.mark.parametrize("C, grid, tiles, target, splits", TILINGS, ids=["gpu-tile-C200", "16-tokens-by-cost"])
def test_tiles_and_splits(C, grid, tiles, target, splits, monkeypatch):
    """The tiling and the plan the launcher makes, and the moments they give, with the stencil
    tiles walking strips (`config.STRIP_TARGET` lowered to 4: 7 columns -> 4 + 3, 5 -> 3 + 2)."""
    monkeypatch.setattr(config, "STRIP_TARGET", 4)
    monkeypatch.setattr(st, "stats_tiles", lambda C, N, precision: tiles)
    monkeypatch.setattr(st, "SPLIT_TARGET", target)
    H, W = grid
    qkv = torch.randn(1, H * W, 3 * C)
    w = pre_bn_weights(C, F32)
    _, _, plan, (launch_grid, args, kwargs) = st.plan_statistics(qkv, H, W, w.dw3, w.dw5, w.dw7, w.pw)
    assert (plan.splits, launch_grid, tuple(args[-4:]), kwargs["CK"]) == (splits, (sum(splits), 3), splits, tiles[2])
    assert all(sum(plan.counts(j, tiles[0], H * W)) == H * W for j in range(4))
    counts, member = plan.row_weights(tiles[0], H * W, qkv.device)   # what the merge weighs rows with
    assert counts.dtype == member.dtype == torch.float64 and counts.shape == member.shape == (4, plan.programs)
    for j in range(4):
        first, last = plan.rows(j)
        assert counts[j, first:last].tolist() == plan.counts(j, tiles[0], H * W)
        assert member[j, first:last].eq(1).all()
    assert counts.sum(0).gt(0).all() and member.sum(0).eq(1).all()    # each row in exactly one segment
    # made on the device by tensor ops (while a CUDA graph is captured): the same weights
    on = plan._row_weights_on(tiles[0], H * W, qkv.device, torch.float64)
    assert torch.equal(on[0], counts) and torch.equal(on[1], member)
    check(qkv, H, W, C)


def test_large_offset_where_naive_sums_fail(monkeypatch):
    """All channels 1000 + N(0, 1): segment 0's mean is ~1000 std. Several tiles per program
    (16-token tiles, one split, the last tile 3 tokens). The naive fp32 sum / sum of squares misses the variance by far
    more than the rule allows (checked, so the rule can tell)."""
    monkeypatch.setattr(st, "stats_tiles", lambda C, N, precision: (16, 4, 16))
    monkeypatch.setattr(st, "SPLIT_TARGET", 1)
    C, H, W, B = 40, 5, 7, 1
    qkv = 1000.0 + torch.randn(B, H * W, 3 * C)
    check(qkv, H, W, C)
    z0 = proxy_z(segment_streams(qkv, H, W, F32), pre_bn_weights(C, F32))[0][:, :C // 5]
    n = z0.numel() // z0.shape[1]
    naive = z0.square().sum((0, 2, 3)) / n - (z0.sum((0, 2, 3)) / n).square()
    _, v64, _ = torch_statistics(qkv.double(), H, W, pre_bn_weights(C, torch.float64))
    _, v32, _ = torch_statistics(qkv, H, W, pre_bn_weights(C, F32))
    assert max_rel_error(naive, v64[0]) > 100 * (2 * max_rel_error(v32[0], v64[0]) + FLOOR)


def test_merge_float32_against_float64(monkeypatch):
    """The launcher merges the partials in float64; in float32 the merge alone adds error on a
    large offset (the figure in the module docstring). Both against the float64 oracle. 3B = 3
    images x 1 or 2 runs per segment (7x7's 49 tokens in two 32-token tiles): 3 or 6 partial rows
    per channel."""
    monkeypatch.setattr(st, "SPLIT_TARGET", 24)
    C, H, W, B = 40, 7, 7, 1
    qkv = 1000.0 + torch.randn(B, H * W, 3 * C)
    w = pre_bn_weights(C, F32)
    dw = dev(w)
    part_mean, part_m2, plan, (grid, args, kwargs) = st.plan_statistics(dev(qkv), H, W, dw.dw3, dw.dw5, dw.dw7,
                                                                       dw.pw, tiles=(32, 4, 16))
    assert plan.splits == (1, 1, 2, 2) and part_mean.shape == (3 * 6, C // 5)
    st.gma_statistics_kernel[grid](*args, **kwargs)
    _, v64, n = torch_statistics(qkv.double(), H, W, pre_bn_weights(C, torch.float64))
    err = {}
    for dt in (torch.float64, F32):
        _, m2 = st.merge_segments(part_mean, part_m2, plan, 32, H * W, dt)
        m2 = m2.cpu()
        err[dt] = max_rel_error((m2.double() / n).view(4, -1)[0], v64[0])
    print(f"segment 0 variance error: float64 merge {err[torch.float64]:.2e}, float32 merge {err[F32]:.2e}")
    assert err[torch.float64] < FLOOR
    assert err[torch.float64] < err[F32]


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen operators called (views included): on a GPU each non-view one is a kernel launch."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("splits", [(1, 1, 2, 2), (1, 2, 4, 4)])   # valid plans of 4 tiles (runs non-empty)
def test_merge_is_a_few_ops_for_all_segments(splits):
    """`merge_segments` merges the four segments at once, in a number of tensor ops that does not grow
    with the segments or their programs (a per-segment merge took ~70 per layer, each a kernel launch
    on a GPU); the second call reuses the plan's row weights (`SegmentPlan.row_weights`). Its moments
    are Chan's formula per segment, computed here row by row in float64 (`merge_reference`)."""
    I, s, N, bp = 6, 8, 49, 16
    plan = st.SegmentPlan(-(-N // bp), splits)
    g = torch.Generator().manual_seed(sum(splits))
    part_mean = (100.0 + torch.randn(I * plan.programs, s, generator=g, dtype=torch.float64))
    part_m2 = torch.rand(I * plan.programs, s, generator=g)
    st.merge_segments(part_mean, part_m2, plan, bp, N)          # makes the row weights
    with _CountOps() as mode:
        mean, m2 = st.merge_segments(part_mean, part_m2, plan, bp, N)
    assert len(mode.ops) <= 20, mode.ops
    ref_mean, ref_m2 = merge_reference(part_mean, part_m2, plan, bp, N)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(m2, ref_m2, rtol=1e-12, atol=0)


def test_row_weights_refuse_a_plan_with_an_empty_run():
    """A plan whose runs do not cover the image's tokens with non-empty runs (`_balanced_splits` never
    makes one) is refused, not merged with negative counts: the merge divides by I N."""
    with pytest.raises(ValueError, match="every run must hold tokens"):
        st.SegmentPlan(4, (1, 1, 3, 1)).row_weights(16, 49, "cpu")


def merge_reference(part_mean, part_m2, plan, bp, N):
    """Chan's merge, segment by segment and row by row, in float64 Python."""
    R = plan.programs
    I = part_mean.shape[0] // R
    means, m2s = [], []
    for j in range(4):
        first, last = plan.rows(j)
        rows = [(img * R + r, plan.counts(j, bp, N)[r - first]) for img in range(I) for r in range(first, last)]
        n = sum(c for _, c in rows)
        mean = sum(c * part_mean[k].double() for k, c in rows) / n
        m2 = sum(part_m2[k].double() + c * (part_mean[k].double() - mean) ** 2 for k, c in rows)
        means.append(mean)
        m2s.append(m2)
    return torch.cat(means), torch.cat(m2s)


def test_sync_batch_moments_one_rank():
    """With a (one-rank, gloo) process group the kernel's (count, mean, M2) go through
    `distributed.sync_batch_moments`: the same statistics as the PyTorch pass through
    `sync_batch_stats`; the count is a float64 tensor."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    C, H, W, B = 40, 5, 7, 1
    qkv = 3.0 + torch.randn(B, H * W, 3 * C)
    w = pre_bn_weights(C, F32)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mean, var, n = st.statistics(dev(qkv), H, W, dev(w), dist.group.WORLD)
        mean, var, n = mean.cpu(), var.cpu(), n.cpu()
        tm, tv, tn = torch_statistics(qkv, H, W, w, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    assert n.dtype == torch.float64 and int(n) == int(tn) == 3 * B * H * W
    torch.testing.assert_close(var, tv, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, tm, rtol=0, atol=1e-6 * float(tm.abs().max()))


def recording_backend():
    """A torch.compile backend that runs the graph as traced and records its call targets."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    return targets, backend


def test_compile_keeps_one_op_node():
    """torch.compile(fullgraph=True): the statistics pass traces to ONE gmf::triton_z_moments
    node (custom_op + fake), which runs the kernel (the compiled result is the float32 PyTorch
    pass's within 1e-5)."""
    C, H, W = 40, 5, 7
    w = pre_bn_weights(C, F32)
    qkv = torch.randn(1, H * W, 3 * C)
    targets, backend = recording_backend()
    wd = dev(w)
    fn = torch.compile(lambda t: st.statistics(t, H, W, wd)[:2], backend=backend, fullgraph=True)
    mean, var = (t.cpu() for t in fn(dev(qkv)))
    m0, v0, _ = torch_statistics(qkv, H, W, w)
    assert sum("triton_z_moments" in t for t in targets) == 1, targets
    assert_max_rel_close(mean, m0, 1e-5, "compiled mean")
    assert_max_rel_close(var, v0, 1e-5, "compiled var")


def test_triton_training_runs_the_kernel(monkeypatch):
    """A training-mode call of the Triton backend takes its batch statistics from the kernel (one
    launch through the op) and updates the running statistics as the torch backend does."""
    import gmf_kernels
    calls = record_calls(monkeypatch, st, "z_moments")
    C, H, W = 40, 3, 4
    x = dev(0.5 + torch.randn(1, H * W, C))
    w64 = random_gma_weights(C, seed=3)
    buffers = {}
    for backend in ("triton", "torch"):
        w = cast_weights(w64, F32, device=DEVICE)
        with torch.no_grad():
            gmf_kernels.group_mix_attention(x, (H, W), w, training=True, backend=backend)
        buffers[backend] = (torch.stack(w.bn_running_mean).cpu(), torch.stack(w.bn_running_var).cpu())
    assert calls == [(1, H * W, 3 * C)]
    for got, want, name in zip(buffers["triton"], buffers["torch"], ("running_mean", "running_var")):
        assert_max_rel_close(got, want, 1e-5, name)


# ------------------------------------------------------------------ the backward's recompute of Z and y
RECOMPUTE_FLOOR = 1e-7   # ~ the fp32 unit roundoff: both sides' errors are 1-3e-7 (measured)


def check_recompute(qkv, H, W, C):
    """`statistics.recompute_planes` (Z, PV, y from the kernel) against `backward.proxy_z` in
    float64 (PV: hardswish of the v images' Z's BatchNorm affine), Z per segment, PV and each y_j under the
    low-precision rule (2 x the error of the float32 PyTorch pass at the kernel's dot precision,
    `statistics.backward_dots`, rounded to the stage dtype, + RECOMPUTE_FLOOR); Z's segment 0 is
    the input itself, exactly; contiguous, in the stage dtype (`config.stage_dtype`: fp32 for fp32
    inputs, the input's own for fp16/bf16)."""
    s = C // 5
    sd = config.stage_dtype(qkv.dtype)
    w32, w64 = random_folded_weights(C, F32), random_folded_weights(C, torch.float64)
    Z, PV, y = st.recompute_planes(dev(qkv), H, W, dev(w32))
    Z, PV, y = Z.cpu(), PV.cpu(), [t.cpu() for t in y]
    B = qkv.shape[0]
    with tf32_products() if st.backward_dots(dev(qkv)).precision == "tf32" else contextlib.nullcontext():
        Z32, _, y32 = proxy_z(segment_streams(qkv, H, W, F32), w32)
    Z64, _, y64 = proxy_z(segment_streams(qkv.double(), H, W, torch.float64), w64)
    P32, P64 = ((z * w.bn_scale.reshape(-1)[:, None, None] + w.bn_shift.reshape(-1)[:, None, None])
                for z, w in ((Z32, w32), (Z64, w64)))
    P32, P64 = torch.nn.functional.hardswish(P32[2 * B:]), torch.nn.functional.hardswish(P64[2 * B:])
    assert Z.dtype == PV.dtype == sd and Z.shape == Z32.shape and PV.shape == P32.shape
    assert Z.is_contiguous() and PV.is_contiguous()
    assert len(y) == 3 and all(t.dtype == sd and t.shape == y32[0].shape and t.is_contiguous() for t in y)
    Z32, P32, y32 = Z32.to(sd), P32.to(sd), [t.to(sd) for t in y32]      # the reference at the stage precision
    torch.testing.assert_close(Z[:, :s], Z32[:, :s], rtol=0, atol=0)
    assert_within_reference_error(PV, P32, P64, floor=RECOMPUTE_FLOOR, name="PV")
    for j in (1, 2, 3):
        seg = slice(j * s, (j + 1) * s)
        assert_within_reference_error(Z[:, seg], Z32[:, seg], Z64[:, seg], floor=RECOMPUTE_FLOOR, name=f"Z segment {j}")
        assert_within_reference_error(y[j - 1], y32[j - 1], y64[j - 1], floor=RECOMPUTE_FLOOR, name=f"y_{j}")


# with RECOMPUTE_TILINGS (fp32, batch 1, C = 200 and 40 on 5x7): every width, dtype and batch
RECOMPUTE_CASES = [(40, (3, 7), 2, BF16), (200, (3, 11), 2, F16)]


@pytest.mark.parametrize("C, grid, B, dtype", RECOMPUTE_CASES,
                         ids=[f"C{c}-{g[0]}x{g[1]}-B{b}-{str(d)[6:]}" for c, g, b, d in RECOMPUTE_CASES])
def test_recompute_matches_float64(C, grid, B, dtype):
    H, W = grid
    check_recompute(torch.randn(B, H * W, 3 * C).to(dtype), H, W, C)


# (C, grid, tiles, split target, per-segment splits): the GPU tile at C = 200 (s = 40 in 16 + 16 + 8
# depthwise channels; 5x7's 35 tokens in 2 tiles, the last of 3 tokens; segments 0 and 1 one program
# per image walking both, the 5x5 and 7x7 one per tile), and 16-token tiles (3) cut by cost
RECOMPUTE_TILINGS = [(200, (5, 7), st.RECOMPUTE_TILE, 1, (1, 1, 2, 2)), (40, (5, 7), (16, 4, 16), 24, (1, 1, 3, 3))]


@pytest.mark.parametrize("C, grid, tiles, target, splits", RECOMPUTE_TILINGS, ids=["gpu-tile-C200", "16-tokens-by-cost"])
def test_recompute_tiles_and_splits(C, grid, tiles, target, splits, monkeypatch):
    """As `test_tiles_and_splits`, for the recompute kernel (strips: `STRIP_TARGET` lowered to 4)."""
    monkeypatch.setattr(config, "STRIP_TARGET", 4)
    monkeypatch.setattr(st, "recompute_tiles", lambda C, N, precision: tiles)
    monkeypatch.setattr(st, "SPLIT_TARGET", target)
    H, W = grid
    qkv = torch.randn(1, H * W, 3 * C)
    w = random_folded_weights(C, F32)
    _, (launch_grid, args, kwargs) = st.plan_recompute(qkv, H, W, w.bn_scale, w.bn_shift, w.dw3, w.dw5, w.dw7, w.pw)
    assert (launch_grid, tuple(args[-4:]), kwargs["CK"]) == ((sum(splits), 3), splits, tiles[2])
    check_recompute(qkv, H, W, C)


def test_recompute_compile_keeps_one_op_node():
    """torch.compile(fullgraph=True) of `statistics.recompute_planes`: ONE gmf::triton_proxy_z node
    (its fake gives the shapes), the same Z, PV and y as eager."""
    C, H, W = 40, 3, 5
    w = dev(random_folded_weights(C, F32))
    qkv = dev(torch.randn(1, H * W, 3 * C))
    targets, backend = recording_backend()

    def fn(t):
        Z, PV, y = st.recompute_planes(t, H, W, w)
        return Z, PV, y[2]

    got = torch.compile(fn, backend=backend, fullgraph=True)(qkv)
    assert sum("triton_proxy_z" in t for t in targets) == 1, targets
    for a, b in zip(got, fn(qkv)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recompute_refuses_unfolded_batchnorms():
    """bn_scale / bn_shift must be the folded (4, s) affine: the kernel would read past a shorter one."""
    with pytest.raises(ValueError, match="bn_scale"):
        st.recompute_planes(torch.randn(1, 15, 120), 3, 5, pre_bn_weights(40, F32))


# ------------------------------------------------------------------ planes kept by the statistics pass
def check_kept_planes(qkv, H, W, C):
    """`statistics.statistics_planes` (the statistics pass with STORE): the same moments as the plain pass
    (bit for bit: the stores change no arithmetic), and Z and y as the recompute kernel's check takes
    them, against float64 under the low-precision rule at the statistics pass's own dots (fp32's,
    `statistics_dots`); then V from the kept Z (`recompute.plan_proxy_v`, the backward's first launch with
    planes) against float64."""
    from gmf_kernels.triton_kernels import recompute as rcp
    s, B = C // 5, qkv.shape[0]
    sd = config.stage_dtype(qkv.dtype)
    w32, w64 = pre_bn_weights(C, F32), pre_bn_weights(C, torch.float64)
    mean, var, n, (Z, y_all, zl) = st.statistics_planes(dev(qkv), H, W, dev(w32))
    assert zl is None
    m0, v0, n0 = st.statistics(dev(qkv), H, W, dev(w32))
    assert n == n0
    torch.testing.assert_close(mean, m0, rtol=0, atol=0)
    torch.testing.assert_close(var, v0, rtol=0, atol=0)
    Z, y = Z.cpu(), [t.cpu() for t in y_all.unbind(0)]
    with tf32_products() if st.statistics_dots(dev(qkv)).precision == "tf32" else contextlib.nullcontext():
        Z32, _, y32 = proxy_z(segment_streams(qkv, H, W, F32), w32)
    Z64, _, y64 = proxy_z(segment_streams(qkv.double(), H, W, torch.float64), w64)
    assert Z.dtype == sd and Z.shape == Z32.shape and Z.is_contiguous()
    assert y_all.shape == (3, 3 * B, s, H, W) and y_all.dtype == sd and y_all.is_contiguous()
    Z32, y32 = Z32.to(sd), [t.to(sd) for t in y32]
    torch.testing.assert_close(Z[:, :s], Z32[:, :s], rtol=0, atol=0)
    for j in (1, 2, 3):
        seg = slice(j * s, (j + 1) * s)
        assert_within_reference_error(Z[:, seg], Z32[:, seg], Z64[:, seg], floor=RECOMPUTE_FLOOR, name=f"Z segment {j}")
        assert_within_reference_error(y[j - 1], y32[j - 1], y64[j - 1], floor=RECOMPUTE_FLOOR, name=f"y_{j}")
    # V from the kept Z: hardswish of the v images' BatchNorm affine, one rounding to the stage dtype
    f32, f64 = random_folded_weights(C, F32), random_folded_weights(C, torch.float64)
    PV, (kernel, grid, args, kwargs) = rcp.plan_proxy_v(dev(Z), dev(f32))
    kernel[grid](*args, **kwargs)
    aff = lambda z, w: torch.nn.functional.hardswish(z[2 * B:] * w.bn_scale.reshape(-1)[:, None, None]
                                                     + w.bn_shift.reshape(-1)[:, None, None])
    P32, P64 = aff(Z.float(), f32).to(sd), aff(Z.double(), f64)
    assert PV.dtype == sd and PV.shape == (B, 4 * s, H, W)
    assert_within_reference_error(PV.cpu(), P32, P64, floor=RECOMPUTE_FLOOR, name="PV")


# every width class (s = 8: C = 40; a PAIR width, C = 80; s = 40: C = 200), fp32 / fp16 / bf16, batch 1 and 2
KEPT_CASES = [(40, (3, 7), 2, F32), (80, (5, 6), 1, BF16), (200, (3, 11), 2, F16)]


@pytest.mark.parametrize("C, grid, B, dtype", KEPT_CASES,
                         ids=[f"C{c}-{g[0]}x{g[1]}-B{b}-{str(d)[6:]}" for c, g, b, d in KEPT_CASES])
def test_kept_planes_match_float64(C, grid, B, dtype):
    H, W = grid
    check_kept_planes(torch.randn(B, H * W, 3 * C).to(dtype), H, W, C)


def test_training_step_keeps_planes_only_when_a_backward_follows(monkeypatch):
    """`training.prepare` runs the planes pass when autograd records the call (the forward then reads the
    kept Z instead of running the stencils of segments 1-3 again and keeps what the backward's recompute
    would make, and the backward reads both instead of running the recompute kernels of Z, of the local
    branch and of the attention), the plain pass under no_grad (nothing kept, the forward's own stencils)."""
    import gmf_kernels
    from gmf_kernels.triton_kernels import launcher
    from gmf_kernels.triton_kernels import recompute as rcp
    C, H, W = 40, 3, 5
    m = gmf_kernels.GroupMixAttention(C, num_heads=8, qkv_bias=True, backend="triton").train()
    x = dev(torch.randn(2, H * W, C, requires_grad=True))
    m = m.to(x.device)
    store = record_calls(monkeypatch, st, "z_moments", record=lambda *a, **k: k.get("store", False))
    recomputed = record_calls(monkeypatch, rcp, "recompute_planes")
    from_z = record_calls(monkeypatch, launcher, "plan_pre_projection",
                          record=lambda *a, **k: (a[8] if len(a) > 8 else k.get("planes")) is not None)
    local = record_calls(monkeypatch, rcp, "plan_recompute_local")
    record_calls(monkeypatch, rcp, "plan_recompute_attention", calls=local)
    with torch.no_grad():
        m(x, (H, W))
    assert store == [False] and not recomputed and from_z == [False]
    m(x, (H, W)).sum().backward()           # the local branch and the attention kept by the forward too
    assert store == [False, True] and not recomputed and from_z == [False, True] and not local, \
        (store, recomputed, from_z, local)
    m.eval()
    m(x, (H, W)).sum().backward()          # eval with gradients: no statistics pass, Z recomputed
    assert store == [False, True] and len(recomputed) == 1 and from_z == [False, True, False] and len(local) == 2


# ------------------------------------------------------------------ ahead-of-time compile (no GPU)
_AOT_SCRIPT = r"""
import json, sys, torch
import gmf_kernels.triton_kernels.specializations as sp
from gmf_kernels.triton_kernels import statistics as st
from gmf_kernels.triton_kernels._common import DotVariant
from gmf_kernels.triton_kernels.config import capability_of_arch, dot_precision
kernel, plan = getattr(st, sys.argv[1]), getattr(st, sys.argv[2])
C, H, W, B = 320, 14, 14, 128
s = C // 5
qkv = torch.empty(B, H * W, 3 * C, dtype=torch.float32, device="meta")
w = [torch.empty(shp, dtype=torch.float32, device="meta") for shp in ((3, 3, s), (5, 5, s), (7, 7, s), (3, s, s))]
if sys.argv[2] == "plan_recompute":    # bn_scale, bn_shift first
    w = [torch.empty(4, s, dtype=torch.float32, device="meta") for _ in range(2)] + w
out = []
for arch in (80, 90):
    dots = DotVariant(dot_precision("fp32", capability_of_arch(arch)), False)
    grid, args, kwargs = plan(qkv, H, W, *w, dots=dots)[-1]                 # the launcher's own plan
    rep = sp.compile_one(sp.specialize_launch(kernel, arch, args, kwargs))
    rep["grid"] = list(grid)
    out.append(rep)
print(json.dumps(out))
"""


@pytest.mark.parametrize("kernel, plan", [("gma_statistics_kernel", "plan_statistics"),
                                          ("gma_recompute_z_kernel", "plan_recompute")],
                         ids=["statistics", "recompute"])
def test_aot_compile_real_shape_no_spills(kernel, plan, tmp_path):
    """The kernel as the launcher specialises it for C=320 14x14 B=128 fp32 (3xTF32 dots),
    compiled for sm_80 and sm_90 (specializations.compile_one: Triton's compile, ptxas -v):
    compiles, zero spills, <= 255 registers."""
    if not have_triton_nvidia_backend():
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    env = triton_compile_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")          # empty: really compiles
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, kernel, plan], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"AOT compile failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    reps = json.loads(lines[-1])
    assert [r["arch"] for r in reps] == [80, 90]
    for r in reps:
        print(f"sm_{r['arch']} {r['label']}: {r['registers']} registers, spills {r['spill_stores']}/"
              f"{r['spill_loads']} B, stack {r['stack']} B, grid {r['grid']}")
        assert r["dot_precision"] == "tf32x3" and r["grid"][1] == 3 * 128 and r["grid"][0] >= 4
        assert_compiled_without_spills(r)


# ------------------------------------------------------------------ PAIR: a segment's two heads as one tile
#: (C, grid, B, dtype, GPU tiles): PAIR's widths (s = 16, 32, 64). The GPU-tile cases take the GPU tiles
#: (64 / 32 tokens, CK = 16 < s: several depthwise chunks) and one program per segment (SPLIT_TARGET 1), so
#: programs walk both 64-token tiles of 9x9 (the recompute's 32-token tiles: 3); the others the
#: interpreter's one tile. C = 160 fp32 is where the recompute keeps the per-head form
#: (`statistics.PAIR_TRAINING_OFF`)
PAIR_CASES = [(80, (5, 9), 2, BF16, False), (160, (9, 9), 1, F32, True), (320, (9, 9), 1, BF16, True),
              (160, (5, 9), 1, BF16, False)]


@pytest.mark.parametrize("C, grid, B, dtype, gpu_tiles", PAIR_CASES,
                         ids=[f"C{c}-{g[0]}x{g[1]}-B{b}-{str(d)[6:]}" + ("-gpu_tiles" if t else "")
                              for c, g, b, d, t in PAIR_CASES])
def test_pair_and_heads_match_float64(C, grid, B, dtype, gpu_tiles, monkeypatch):
    """Both kernels with `PAIR_TRAINING` on (the default) and off, on the same input: each form within
    the rule against float64 (moments; Z, P, y), and the launches' PAIR as `training_pair` says."""
    H, W = grid
    qkv = torch.randn(B, H * W, 3 * C).to(dtype)
    if gpu_tiles:
        monkeypatch.setattr(st, "stats_tiles", lambda C, N, precision: st.DEFAULT_TILE)
        monkeypatch.setattr(st, "recompute_tiles", lambda C, N, precision: st.RECOMPUTE_TILE)
        monkeypatch.setattr(st, "SPLIT_TARGET", 1)
    real = st.kernel_call
    for pair in (True, False):
        kinds = []

        def spy(*a, **k):
            out = real(*a, **k)
            kinds.append((a[7] if len(a) > 7 else k.get("recompute", False), out[2]["PAIR"]))
            if gpu_tiles:   # several chunks, and fewer programs than (segment, tile) pairs: some walk several
                (grid_, args, kw) = out
                assert kw["CK"] == 16 < kw["S"] and grid_[0] < 4 * -(-H * W // kw["BLOCK_P"]), (grid_, kw)
            return out
        with monkeypatch.context() as mp:
            mp.setattr(st, "PAIR_TRAINING", pair)
            mp.setattr(st, "kernel_call", spy)
            check(qkv, H, W, C)
            check_recompute(qkv, H, W, C)
            prec = st.statistics_dots(dev(qkv)).precision, st.backward_dots(dev(qkv)).precision
            want = [(False, st.training_pair(C, prec[0], False)), (True, st.training_pair(C, prec[1], True))]
        assert kinds == want and (pair or not any(k for _, k in kinds)), (pair, kinds)
    assert st.training_pair(C, "tf32", False) and not st.training_pair(C, "ieee", False)
    assert st.training_pair(160, "tf32x3", True) is False and st.training_pair(160, "tf32x3", False)


# ------------------------------------------------------------------ ROWS: the statistics pass walking rows
#: (C, grid, B, dtype, tiles (BLOCK_P columns, warps, CK, ROWS), split target): the row-walk candidate of
#: "triton.statistics" (`statistics.STATS_ROWS_TILES`) with 16-column strips (the smallest a GPU's dot
#: takes), on grids whose strips are ragged (20 = 16 + 4, 23 = 16 + 7, 19 = 16 + 3), where runs end inside a
#: strip and cross from one strip into the next (C = 80: 18 row tiles, the 5x5 segment in runs of 6: strip
#: 0's rows 0-5, its rows 6-8 and strip 1's rows 0-2, strip 1's rows 3-8; C = 320: the 3x3 one in runs of
#: 3), the 5x5 / 7x7 windows reach past grids of 2-3 rows, and programs walk several rows (split target 1:
#: few runs per segment)
ROWS_CASES = [(80, (9, 20), 1, F32, (16, 4, 16, 1), 36), (160, (9, 23), 1, BF16, (16, 4, 32, 1), 1),
              (320, (3, 20), 1, F16, (16, 8, 64, 1), 24), (80, (2, 19), 2, F16, (16, 2, 16, 1), 1)]


@pytest.mark.parametrize("C, grid, B, dtype, tiles, target", ROWS_CASES,
                         ids=[f"C{c}-{g[0]}x{g[1]}-B{b}-{str(d)[6:]}-rows{t[0]}" for c, g, b, d, t, _ in ROWS_CASES])
def test_rows_walk_matches_float64_and_the_tile_kernel(C, grid, B, dtype, tiles, target, monkeypatch):
    """`gma_statistics_kernel` with ROWS (`_statistics_rows`): the launch walks rows (its plan's tiles are
    rows of strips, `SegmentPlan.row_w`, whose per-run token counts cover each image and match the
    device-side row weights), its moments are within the rule against float64 (as `check`), and the planes it
    keeps (Z, y) are those of the tile kernel on the same input: the walk adds each output element's taps
    in the tile kernel's order (ky, then kx), and its pointwise dot takes the s channels at once, as the
    tile kernel does with the interpreter's one channel chunk: bit for bit there; on a GPU (CK = 16
    chunks, FMA contraction) to about the stage dtype's rounding."""
    H, W = grid
    qkv = torch.randn(B, H * W, 3 * C).to(dtype)
    w = pre_bn_weights(C, F32)
    filters = [dev(t) for t in (w.dw3, w.dw5, w.dw7, w.pw)]
    _, z_flat, y_flat = st.z_moments(dev(qkv), H, W, *filters, store=True)      # the default tile kernel
    monkeypatch.setattr(st, "SPLIT_TARGET", target)
    _, _, plan, (launch_grid, args, kwargs) = st.plan_statistics(dev(qkv), H, W, *filters, tiles, store=True)
    assert kwargs["ROWS"] and kwargs["PAIR"] and plan.row_w == W and plan.tiles == -(-W // tiles[0]) * H
    assert launch_grid == (plan.programs, 3 * B)
    for j in range(4):
        assert sum(plan.counts(j, tiles[0], H * W)) == H * W and min(plan.counts(j, tiles[0], H * W)) > 0
    counts, member = plan.row_weights(tiles[0], H * W, "cpu")
    on = plan._row_weights_on(tiles[0], H * W, "cpu", torch.float64)
    assert torch.equal(on[0], counts) and torch.equal(on[1], member)
    # the tiles passed explicitly: on a GPU the launcher would otherwise take the tuning table's or the default
    moments, z, y = st.z_moments(dev(qkv), H, W, *filters, tiles, store=True)
    n = 3 * B * H * W
    mean, var = moments[0].float().view(4, -1).cpu(), (moments[1] / n).float().view(4, -1).cpu()
    m32, v32, _ = torch_statistics(qkv, H, W, w)
    m64, v64, _ = torch_statistics(qkv.double(), H, W, pre_bn_weights(C, torch.float64))
    for j in range(4):
        assert_within_reference_error(mean[j], m32[j], m64[j], floor=FLOOR, name=f"mean segment {j}")
        assert_within_reference_error(var[j], v32[j], v64[j], floor=FLOOR, name=f"var segment {j}")
    if DEVICE == "cpu":
        assert torch.equal(z, z_flat) and torch.equal(y, y_flat)
    else:
        ulp = 2 * torch.finfo(z.dtype).eps
        assert_max_rel_close(z.float(), z_flat.float(), ulp, name="Z (rows) against Z (tiles)")
        assert_max_rel_close(y.float(), y_flat.float(), ulp, name="y (rows) against y (tiles)")


def test_rows_candidates_and_refusals():
    """The row walks are "triton.statistics" candidates right after the default where the statistics
    pass's tiles are PAIR's (C = 80, 160, 320 with tensor-core dots), none elsewhere, and the GPU default at
    C = 320 (`STATS_ROWS_DEFAULT`), where the tile kernel's default tile follows them among the candidates;
    a ROWS launch is refused where it does not apply (no PAIR, the recompute kernel) and for a plan of the
    other tiling."""
    for C in (80, 160, 320):
        cands = st.stats_candidates(C, "tf32x3")
        n_rows = len(st.STATS_ROWS_TILES[C // 5])
        assert all(t[3] == 1 and t[2] == C // 5 for t in cands[:n_rows]) and not any(t[3] for t in cands[n_rows:])
        assert cands[n_rows] == st.tile_kernel_stats_tiles(C, "tf32x3")
        assert not any(t[3] for t in st.stats_candidates(C, "ieee"))
        assert st.gpu_stats_tiles(C, "tf32x3")[3] == (C == 320) and st.gpu_stats_tiles(C, "ieee")[3] == 0
    assert st.gpu_stats_tiles(320, "tf32x3") == st.STATS_ROWS_DEFAULT[64] + (64, 1)
    assert not any(t[3] for t in st.stats_candidates(40, "tf32x3")) and not st.rows_applies(200, "tf32x3")
    w = pre_bn_weights(40, F32)
    with pytest.raises(ValueError, match="walks rows only where"):
        st.plan_statistics(torch.randn(1, 35, 120), 5, 7, w.dw3, w.dw5, w.dw7, w.pw, (4, 4, 8, 1))
    w = pre_bn_weights(80, F32)
    f = random_folded_weights(80, F32)
    with pytest.raises(ValueError, match="walks rows only where"):
        st.plan_recompute(torch.randn(1, 35, 240), 5, 7, f.bn_scale, f.bn_shift, w.dw3, w.dw5, w.dw7, w.pw,
                          (4, 4, 16, 1))
    qkv = torch.randn(1, 35, 240)
    _, _, plan, _ = st.plan_statistics(qkv, 5, 7, w.dw3, w.dw5, w.dw7, w.pw, (4, 4, 16, 1))
    with pytest.raises(ValueError, match="plan of"):
        st.kernel_call(qkv, 5, 7, (qkv,) * 8, plan, (4, 4, 16, 0), st.statistics_dots(qkv))


_ROWS_AOT_SCRIPT = r"""
import json
import gmf_kernels.triton_kernels.specializations as sp
from gmf_kernels.triton_kernels import statistics as st
from gmf_kernels.triton_kernels.specializations import Call
out = []
for C, g in ((80, 56), (160, 28), (320, 14)):
    for tiles in st.stats_candidates(C, "tf32x3"):
        if tiles[3]:
            spec = next(x for x in sp.statistics_specializations_of_call(Call(C, g, g, 128, "fp16"), 90,
                                                                         {st.STATS_FAMILY: tiles})
                        if x.kernel == "gma_statistics_kernel")
            rep = sp.compile_one(spec)
            rep["C"], rep["tiles"], rep["rows"] = C, list(tiles), dict(spec.constexprs).get("ROWS")
            out.append(rep)
print(json.dumps(out))
"""


def test_rows_candidates_compile_without_spills_on_sm90(tmp_path):
    """Every row-walk candidate of "triton.statistics" (`STATS_ROWS_TILES`), as a training step with a
    backward launches it (STORE; GroupMixFormer-S's widths at batch 128, fp16 inputs, the statistics'
    3xTF32 dots) compiled for sm_90: ROWS in the specialisation, no spill, <= 255 registers (the figures
    `STATS_ROWS_TILES`' comment records; the tuner would refuse a spilling candidate on the GPU)."""
    from helpers import aot_reports
    reps = aot_reports(_ROWS_AOT_SCRIPT, tmp_path)
    assert sorted({r["C"] for r in reps}) == [80, 160, 320]
    assert len(reps) == sum(len(st.STATS_ROWS_TILES[C // 5]) for C in (80, 160, 320))
    for r in reps:
        print(f"C={r['C']} {r['tiles']}: {r['registers']} registers, spills {r['spill_stores']} B")
        assert r["rows"] is True, r
        assert_compiled_without_spills(r)


# ------------------------------------------------------------------ the split forward's Z pass (STORE = Z_ONLY)
#: (C, grid, B, dtype, tiles): the per-head tile kernel (C = 40: s = 8, no PAIR), PAIR's tile kernel and its row
#: walk (C = 80), at the interpreter's one tile and at GPU tiles (several tiles a program, ragged strips)
Z_PASS_CASES = [(40, (5, 7), 2, F32, None), (80, (9, 20), 1, BF16, None), (80, (9, 20), 1, F32, (16, 4, 16, 1)),
                (160, (6, 9), 1, F16, (32, 4, 16, 0))]


@pytest.mark.parametrize("C, grid, B, dtype, tiles", Z_PASS_CASES,
                         ids=[f"C{c}-{g[0]}x{g[1]}-B{b}-{str(d)[6:]}-{t}" for c, g, b, d, t in Z_PASS_CASES])
def test_z_pass_writes_the_statistics_pass_z(C, grid, B, dtype, tiles):
    """`plan_z_pass` (the split eval forward's Z pass, STORE = `Z_ONLY`): Z of segments 1-3 exactly as the
    statistics pass with STORE stores it (the same code, the moments and y left out: bit for bit under the
    interpreter, to the stage dtype's rounding on a GPU), segment 0 never written (NaN poison left: the
    aggregation reads qkv there), and a plan whose segment 0 has the fewest programs (it costs nothing)."""
    H, W = grid
    qkv = dev(torch.randn(B, H * W, 3 * C).to(dtype))
    w = pre_bn_weights(C, F32)
    filters = [dev(t).contiguous() for t in (w.dw3, w.dw5, w.dw7, w.pw)]
    _, z_store, _ = st.z_moments(qkv, H, W, *filters, tiles, store=True)
    s = C // 5
    z = torch.full((3 * B, 4 * s, H, W), float("nan"), dtype=config.stage_dtype(dtype), device=qkv.device)
    z_out, (launch_grid, args, kwargs) = st.plan_z_pass(qkv, H, W, *filters, tiles, z=z)
    assert z_out is z and kwargs["STORE"] == st.STORE_Z_ONLY and launch_grid[1] == 3 * B
    splits = args[-4:]
    assert splits[0] == min(splits), splits
    st.gma_statistics_kernel[launch_grid](*args, **kwargs)
    assert torch.isnan(z[:, :s]).all(), "segment 0 of Z written"
    if DEVICE == "cpu":
        assert torch.equal(z[:, s:], z_store[:, s:])
    else:
        assert_max_rel_close(z[:, s:].float(), z_store[:, s:].float(), 2 * torch.finfo(z.dtype).eps,
                             name="Z (Z pass) against Z (statistics pass)")
    with pytest.raises(ValueError, match="Z buffer"):
        st.plan_z_pass(qkv, H, W, *filters, tiles, z=z[:, :, :, :-1])
