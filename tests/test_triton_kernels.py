"""Triton backend: every kernel alone, the fused op and BACKEND.forward against the oracle.

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set
below before Triton is imported) on CPU tensors; with CUDA they run on the GPU.

Oracle: the reference in float64 (and the golden vectors of the upstream code).
fp32: max |diff| / max |expected| <= 1e-5. fp16/bf16: error <= 2 x the reference's own
error at that dtype + 1e-5 (flash-attention's rule, `assert_within_reference_error`).
Every buffer the kernels use is allocated filled with NaN (launcher.POISON_BUFFERS), so an
element a kernel forgets to write, or reads before it is written, fails the test.
"""
import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from gmf_kernels.backends.base import GMAProblem  # noqa: E402
from gmf_kernels.backends.triton_backend import BACKEND  # noqa: E402
from gmf_kernels.folding import folded_weights, meta_weights  # noqa: E402
from gmf_kernels.models.configs import MODEL_CONFIGS, MODEL_WIDTHS  # noqa: E402
from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights  # noqa: E402
from gmf_kernels.reference import reference_group_mix_attention  # noqa: E402
from gmf_kernels.triton_kernels import aggregation, attention, dense_z, launcher, op  # noqa: E402
from gmf_kernels.triton_kernels import config  # noqa: E402
from gmf_kernels.triton_kernels.config import gma_shape  # noqa: E402
from gmf_kernels.weights import GMAHyper  # noqa: E402
from helpers import assert_within_reference_error, weights_from_state_dict  # noqa: E402
from helpers import assert_max_rel_close as _assert_rel  # noqa: E402
from conftest import golden_path  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)

FP32_TOL = 1e-5


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launcher, "POISON_BUFFERS", True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False




class Case:
    """Random weights, input and the float64 reference with its intermediates."""

    def __init__(self, C, H, W, B, seed=0):
        self.C, self.H, self.W, self.B = C, H, W, B
        self.s = C // 5
        self.cp = 4 * self.s
        self.d = self.cp // 8
        self.w64 = random_gma_weights(C, seed=seed)
        self.hp = default_hyper(C)
        g = torch.Generator().manual_seed(seed + 1000)
        self.x64 = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
        self.out, ex = reference_group_mix_attention(self.x64, (H, W), self.w64, self.hp,
                                                     return_intermediates=True)
        P = ex["proxies"]                                          # (3, B, h, N, d)
        tok = lambda t: t.transpose(1, 2).reshape(B, H * W, self.cp)  # channel head*d + i
        self.Q, self.K, self.V = tok(P[0]), tok(P[1]), tok(P[2])
        self.local, self.pre = ex["local"], ex["pre_proj"]
        Ks = P[1].softmax(dim=2)
        self.KV = (Ks.transpose(-1, -2) @ P[2]).reshape(B, self.cp, self.d)

    def weights(self, dtype):
        return cast_weights(self.w64, dtype, DEVICE)

    def folded(self, dtype):
        return folded_weights(self.weights(dtype), self.hp, dtype)

    def qkv(self, dtype):
        w = self.weights(dtype)
        return F.linear(self.x64.to(DEVICE, dtype), w.qkv_weight, w.qkv_bias)

    def partials(self, block_p, segment_splits):
        """The packed softmax-over-tokens partials (aggregation.py): segment j (heads 2j, 2j+1,
        s = 2d channels a row) cut into segment_splits[j] runs of ceil(T / splits) tiles of
        block_p tokens; per run the max of K, sum of exp(K - max), exp(K - max)ᵀ V, from the oracle."""
        B, N, d, s = self.B, self.H * self.W, self.d, self.s
        T = -(-N // block_p)
        ms, ls, accs = [], [], []
        for j, splits in enumerate(segment_splits):
            step = block_p * -(-T // splits)
            assert -(-N // step) == splits, "a split count with an empty run"
            for t0 in range(0, N, step):
                k = self.K[:, t0:t0 + step, j * s:(j + 1) * s]
                v = self.V[:, t0:t0 + step, j * s:(j + 1) * s]
                m = k.amax(dim=1)
                p = torch.exp(k - m[:, None])
                ms.append(m)
                ls.append(p.sum(dim=1))
                acc = torch.einsum("bnhi,bnhk->bhik", p.view(B, -1, 2, d), v.reshape(B, -1, 2, d))
                accs.append(acc.reshape(B, s, d))
        return torch.stack(ms, 1), torch.stack(ls, 1), torch.stack(accs, 1)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- each kernel alone
#: per-job split counts of 4 tiles (each a count `job_plan` can produce: 1, 2 or 4), rotated over the
#: widths so that every job runs with 1, 2 and 4 splits and the jobs' counts differ within a launch
JOB_SPLITS = [(4, 1, 2, 4, 2), (1, 4, 4, 2, 1), (2, 2, 1, 1, 4)]


class _Recorded:
    """kernel[grid](*args, **kwargs) that also keeps the launch's kwargs."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("C,pair", [(C, False) for C in MODEL_WIDTHS] + [(C, True) for C in (80, 160, 320)],
                         ids=lambda v: ("pair" if v else "heads") if isinstance(v, bool) else f"C{v}")
def test_aggregation_kernel(C, pair):
    """Q, V proxies, the local branch and the packed split-N softmax partials of K; nothing else
    of pre is touched. 7x9 = 63 tokens in tiles of 16 -> 4 tiles (the last one ragged), each
    job with its own number of splits (JOB_SPLITS): the flat program index decoded into (job,
    split), the in-register online rescaling across tiles and the per-split partials of
    segments with different split counts are exercised. `pair`: the segments' two heads as one
    tensor (`GMAShape.AGG_PAIR`, passed to the kernel as PAIR), whose partials (the diagonal blocks
    of one [s, s] accumulator) must land where the per-head kernel puts them."""
    case = Case(C, 7, 9, 1, seed=C + pair)
    shape = gma_shape(C, agg_block_p=16, interpreter=INTERPRET, pair=pair)
    f = case.folded(torch.float32)
    qkv = case.qkv(torch.float32)
    B, N = case.B, case.H * case.W
    plan = aggregation.JobPlan(shape.num_tiles(N), JOB_SPLITS[MODEL_WIDTHS.index(C) % len(JOB_SPLITS)])
    rows = plan.partial_rows
    q, v, pre = _nan((B, N, case.cp), torch.float32), _nan((B, N, case.cp), torch.float32), _nan((B, N, C), torch.float32)
    pm, pl = _nan((B, rows, case.s), torch.float32), _nan((B, rows, case.s), torch.float32)
    pacc = _nan((B, rows, case.s, case.d), torch.float32)
    kernel = _Recorded(aggregation.gma_aggregate_kernel)
    aggregation.launch_aggregate(kernel, qkv, case.H, case.W, f, case.hp.ln_eps, shape, plan, q, v, pre, pm, pl, pacc)
    assert [kw["PAIR"] for kw in kernel.kwargs] == [pair]
    _assert_rel(q, case.Q, FP32_TOL, "Q proxies")
    _assert_rel(v, case.V, FP32_TOL, "V proxies")
    _assert_rel(pre[..., case.cp:], case.local, FP32_TOL, "local branch")
    assert torch.isnan(pre[..., :case.cp]).all(), "aggregation wrote into the attention channels"
    m, l, acc = case.partials(shape.AGG_BLOCK_P, plan.segment_splits)
    _assert_rel(pm, m, FP32_TOL, "split max of K")
    _assert_rel(pl, l, FP32_TOL, "split sum of exp(K - m)")
    _assert_rel(pacc, acc, FP32_TOL, "split exp(K - m)^T V")


def test_aggregation_plan_is_checked():
    """Split counts that would leave a run empty (6 splits of 10 tiles: runs of 2 -> the sixth
    empty), or a job without programs, are refused before launching."""
    with pytest.raises(ValueError, match="empty run"):
        aggregation.JobPlan(10, (1, 6, 1, 1, 1)).check()
    with pytest.raises(ValueError, match="empty run"):
        aggregation.JobPlan(10, (1, 1, 1, 0, 1)).check()
    aggregation.JobPlan(10, (1, 5, 4, 10, 2)).check()


@pytest.mark.parametrize("C", MODEL_WIDTHS, ids=lambda c: f"C{c}")
def test_combine_and_attention_kernels(C):
    """Combine (segments with 4, 1, 2, 4 splits of the packed partials) and the output kernel,
    fed with the oracle's proxies."""
    case = Case(C, 7, 9, 2 if C <= 80 else 1, seed=C + 1)
    shape = gma_shape(C, agg_block_p=16, interpreter=INTERPRET)
    B, N = case.B, case.H * case.W
    segment_splits = (4, 1, 2, 4)
    m, l, acc = (t.to(DEVICE, torch.float32).contiguous() for t in case.partials(shape.AGG_BLOCK_P, segment_splits))
    kv = _nan((B, case.cp, case.d), torch.float32)
    attention.launch_combine(attention.gma_combine_kernel, m, l, acc, kv, shape, segment_splits)
    _assert_rel(kv, case.KV, FP32_TOL, "KV = softmax_N(K)^T V")

    f = case.folded(torch.float32)
    pre = _nan((B, N, C), torch.float32)
    q = case.Q.to(DEVICE, torch.float32).contiguous()
    v = case.V.to(DEVICE, torch.float32).contiguous()
    attention.launch_attention(attention.gma_attention_kernel, q, v, case.KV.to(DEVICE, torch.float32).contiguous(),
                               pre, f, case.H, case.W, case.hp.scale, shape)
    _assert_rel(pre[..., :case.cp], case.pre[..., :case.cp], FP32_TOL, "scale*Q KV + Q*CRPE(V)")
    assert torch.isnan(pre[..., case.cp:]).all(), "attention kernel wrote into the local-branch channels"


#: combine steps: one split a step, a ragged step (3 of 4 splits in the last), the default (`config.combine_tile`:
#: all of a segment's splits in one step here)
COMBINE_STEPS = [1, 4, 0]


@pytest.mark.parametrize("step", COMBINE_STEPS, ids=lambda t: f"step{t or 'default'}")
@pytest.mark.parametrize("C", [60, 80, 320], ids=lambda c: f"C{c}")
def test_combine_steps_and_row_blocks(C, step):
    """The combine over many splits (63, 5, 21, 9: one-token runs of a 7x9 image, as batch 1 gives the 7x7
    segment 196 splits at 56x56) in steps of several splits (the last ragged) and programs of a few rows of a
    head (C = 60: d = 6, the second row block's last two rows past d), with the training forward's softmax
    statistics (k_max, k_sum: the max over tokens of K and the sum of exp(K - max)): KV, k_max and k_sum
    against the oracle, every element written."""
    case = Case(C, 7, 9, 2 if C <= 80 else 1, seed=C + 7)
    shape = replace(gma_shape(C, agg_block_p=16, interpreter=INTERPRET), COMBINE_STEP=step)
    rows, steps = config.combine_tile(shape)
    assert rows == 4 and steps == (step or config.COMBINE_STEP_ELEMENTS // (4 * shape.D_PAD))
    B, N = case.B, case.H * case.W
    segment_splits = (63, 5, 21, 9)
    m, l, acc = (t.to(DEVICE, torch.float32).contiguous() for t in case.partials(1, segment_splits))
    kv = _nan((B, case.cp, case.d), torch.float32)
    k_max, k_sum = _nan((B, case.cp), torch.float32), _nan((B, case.cp), torch.float32)
    grid, args, kwargs = attention.combine_call(m, l, acc, kv, replace(shape, AGG_FROM_Z=True), segment_splits,
                                                (k_max, k_sum))
    assert grid == (8 * -(-case.d // 4), B)
    attention.gma_combine_kernel[grid](*args, **kwargs)
    _assert_rel(kv, case.KV, FP32_TOL, "KV = softmax_N(K)^T V")
    K_max = case.K.amax(dim=1)
    _assert_rel(k_max, K_max, FP32_TOL, "k_max")
    _assert_rel(k_sum, torch.exp(case.K - K_max[:, None]).sum(dim=1), FP32_TOL, "k_sum")


# ---------------------------------------------------------------- the fused op / backend
def _forward(case, dtype):
    with torch.no_grad():
        return BACKEND.forward(case.x64.to(DEVICE, dtype), (case.H, case.W), case.weights(dtype), case.hp, False)


GRIDS = [(1, 1), (7, 9), (5, 11), (14, 14), (28, 28)]


# 28x28 runs once (B=1) to keep the interpreter suite fast
GRID_CASES = [(H, W, B) for (H, W) in GRIDS for B in (1, 2) if not ((H, W) == (28, 28) and B == 2)]


def _check_shape_at(monkeypatch, case, shape, dtype, name):
    """The specialisation `shape` on `case` at dtype: fp32 by `_check_launch` (every buffer against float64);
    fp16 / bf16 through the backend with `shape` as the launcher's default, the layer's output within 2x the
    PyTorch reference's own error at that dtype (against float64), nothing left unwritten."""
    if dtype == torch.float32:
        _check_launch(case, shape)
        return
    monkeypatch.setattr(launcher, "default_shape", lambda *a: shape)
    out = _forward(case, dtype)
    with torch.no_grad():
        ref_lp = reference_group_mix_attention(case.x64.to(DEVICE, dtype), (case.H, case.W), case.weights(dtype),
                                               case.hp)
    assert not torch.isnan(out).any()
    assert_within_reference_error(out, ref_lp, case.out, name=name)


@pytest.mark.parametrize("H,W,B", GRID_CASES, ids=lambda v: str(v))
def test_forward_fp32_grids(H, W, B):
    case = Case(80, H, W, B, seed=H * 100 + W)
    out = _forward(case, torch.float32)
    assert out.dtype == torch.float32 and out.shape == case.out.shape
    _assert_rel(out, case.out, FP32_TOL, f"out {H}x{W} B={B}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("C", MODEL_WIDTHS, ids=lambda c: f"C{c}")
def test_forward_every_width(C, dtype):
    """BACKEND.forward (linears + the fused op) on every released width."""
    case = Case(C, 5, 11, 1, seed=C + 7)
    out = _forward(case, dtype)
    assert out.dtype == dtype and out.shape == case.out.shape
    if dtype == torch.float32:
        _assert_rel(out, case.out, FP32_TOL, f"fp32 out C={C}")
        return
    with torch.no_grad():
        ref_lp = reference_group_mix_attention(case.x64.to(DEVICE, dtype), (case.H, case.W),
                                               case.weights(dtype), case.hp)
    assert_within_reference_error(out, ref_lp, case.out, name=f"{dtype} out C={C}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("C,H,W,B", [(80, 14, 14, 2), (200, 7, 9, 1), (480, 1, 1, 2), (40, 28, 28, 1)],
                         ids=lambda v: str(v))
def test_forward_low_precision_grids(dtype, C, H, W, B):
    case = Case(C, H, W, B, seed=C + H)
    out = _forward(case, dtype)
    with torch.no_grad():
        ref_lp = reference_group_mix_attention(case.x64.to(DEVICE, dtype), (case.H, case.W),
                                               case.weights(dtype), case.hp)
    assert out.dtype == dtype
    assert_within_reference_error(out, ref_lp, case.out, name=f"{dtype} out")


def _check_launch(case, shape, planes=None):
    """Launch the three kernels on `case` (fp32) with the specialisation `shape` (and the kept `planes`,
    `launcher.plan_pre_projection`'s): every buffer written (no NaN poison left), Q, V, KV and the
    pre-projection within FP32_TOL of float64. Returns the buffers."""
    r = launcher.launch_pre_projection(case.qkv(torch.float32), case.H, case.W, case.folded(torch.float32),
                                       case.hp.scale, case.hp.ln_eps, shape=shape, planes=planes)
    for name, t in r.items():
        assert not torch.isnan(t).any(), f"{name}: unwritten (NaN-poisoned) elements"
    _assert_rel(r["q"], case.Q, FP32_TOL, "Q")
    _assert_rel(r["v"], case.V, FP32_TOL, "V")
    _assert_rel(r["kv"], case.KV, FP32_TOL, "KV")
    _assert_rel(r["pre"], case.pre, FP32_TOL, "pre_proj")
    return r


@pytest.mark.parametrize("C", [80, 480], ids=lambda c: f"C{c}")
def test_gpu_tile_sizes(C):
    """The GPU tiles (64 / 32 tokens, channel chunks of 32) on the interpreter too: many
    tiles, ragged last one, one split per tile (batch 1)."""
    H = 14 if C == 80 else 7                 # the interpreter's cost grows with tiles x chunks
    case = Case(C, H, H, 1, seed=C + 11)
    shape = gma_shape(C)  # the GPU specialisation
    assert shape.num_tiles(H * H) >= 4 and (C < 480 or shape.CK < shape.S_PAD)
    plan = aggregation.job_plan(H * H, 1, shape, "tf32x3")
    # the balanced plan: jobs with different split counts and runs of several tiles (each tile
    # of each job covered once, or the NaN poison / the partials' sums show it)
    assert len(set(plan.splits)) >= 3 and max(plan.tiles_per_split) > 1, plan
    _check_launch(case, shape)


@triton.jit
def _tile_probe(out, N, H, W, SW, BLOCK_P: tl.constexpr):
    """Tile t's lanes (n, valid, y, x) of `aggregation._tile` into out[t BLOCK_P + lane, :]."""
    t = tl.program_id(0)
    n, pmask, y, x = aggregation._tile(t, N, H, W, SW, BLOCK_P)
    i = t * BLOCK_P + tl.arange(0, BLOCK_P)
    tl.store(out + i * 4 + 0, n)
    tl.store(out + i * 4 + 1, pmask.to(tl.int32))
    tl.store(out + i * 4 + 2, y)
    tl.store(out + i * 4 + 3, x)


@pytest.mark.parametrize("H,W,target", [(5, 11, 4), (9, 56, 16), (7, 7, 16), (3, 100, 16), (4, 17, 16), (1, 1, 16)],
                         ids=lambda v: str(v))
def test_tile_strip_order(monkeypatch, H, W, target):
    """`_tile` numbers the tokens strip by strip (strips of `config.strip_width(W)` columns, the
    last one narrower), row by row within a strip: every token once, in exactly the order of
    that enumeration, positions past N invalid."""
    monkeypatch.setattr(config, "STRIP_TARGET", target)
    SW = config.strip_width(W)
    strips = -(-W // SW)
    assert SW <= target or SW == W
    assert (strips - 1) * SW < W <= strips * SW and (W <= target) == (strips == 1)
    expected = [(y, x) for k in range(strips) for y in range(H) for x in range(k * SW, min(W, (k + 1) * SW))]
    N, bp = H * W, 16
    T = -(-N // bp)
    out = torch.full((T * bp, 4), -1, dtype=torch.int32, device=DEVICE)
    _tile_probe[(T,)](out, N, H, W, SW, BLOCK_P=bp)
    out = out.cpu()
    valid = out[:, 1].bool()
    assert valid[:N].all() and not valid[N:].any()
    got = [(int(y), int(x)) for y, x in out[:N, 2:].tolist()]
    assert got == expected
    assert torch.equal(out[:N, 0], out[:N, 2] * W + out[:N, 3])


def test_forward_in_strips(monkeypatch):
    """The aggregation's stencil jobs walking narrow strips (STRIP_TARGET lowered to 4: an
    11-wide image in strips of 4, 4, 3 columns, tiles spanning strips) with runs of several
    tiles per program, and the GPU's 16-token tiles: the same result, every element written."""
    monkeypatch.setattr(config, "STRIP_TARGET", 4)
    case = Case(80, 9, 11, 2, seed=57)
    shape = gma_shape(80, agg_block_p=16, interpreter=INTERPRET, split_target=24)
    plan = aggregation.job_plan(case.H * case.W, case.B, shape, "tf32x3")
    assert config.strip_width(case.W) == 4 and max(plan.tiles_per_split) > 1, plan
    _check_launch(case, shape)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "separate"])
def test_qkv_modes(merge):
    """The aggregation's two ways through q, k and v (`GMAShape.AGG_MERGE`: one depthwise pass of
    the three streams per channel chunk, six head outputs; or stream after stream), with 16-token
    tiles and 16-channel chunks (s = 40: 16 + 16 + 8): the same result, every element written."""
    case = Case(200, 6, 7, 1, seed=91 + merge)
    shape = gma_shape(200, agg_block_p=16, ck=16, interpreter=INTERPRET, split_target=40, merge=merge)
    assert shape.AGG_MERGE is merge and shape.CK < shape.S
    _check_launch(case, shape)


@pytest.mark.parametrize("split_target", [1, 10**6], ids=["one-split", "split-per-tile"])
def test_split_plans(split_target):
    """The fewest programs the plan makes (light jobs: all tiles of an image in one program,
    online rescaling only) or as many as the tiles allow (combine of one-tile splits): same
    result. 11x11 tokens in tiles of 32 -> 4 tiles, the last ragged."""
    case = Case(80, 11, 11, 2, seed=31)
    shape = gma_shape(80, agg_block_p=32, interpreter=INTERPRET, split_target=split_target)
    r = launcher.launch_pre_projection(case.qkv(torch.float32), case.H, case.W, case.folded(torch.float32),
                                       case.hp.scale, case.hp.ln_eps, shape=shape)
    plan = aggregation.job_plan(case.H * case.W, case.B, shape, "tf32x3")
    # fewest programs: the light jobs in one program, the 7x7 job still cut to about the mean
    # job's work; or as many as wanted: the 5x5 and 7x7 jobs one tile per split
    assert plan.splits == ((1, 1, 2, 4, 1) if split_target == 1 else (1, 2, 4, 4, 1)), plan
    assert r["part_m"].shape[1] == plan.partial_rows
    _assert_rel(r["kv"], case.KV, FP32_TOL, "KV")
    _assert_rel(r["pre"], case.pre, FP32_TOL, "pre_proj")


@pytest.mark.parametrize("split_target", [1, 10**6], ids=["one-split", "split-per-tile"])
def test_a_nan_token_makes_its_image_nan_as_the_reference(split_target):
    """A NaN in one token: the softmax over tokens makes every token of that image NaN in the reference; the
    split partials and their combine must carry it (the CUDA combine left a NaN partial out as an empty slot),
    and the other image stays as without it."""
    case = Case(80, 11, 11, 2, seed=37)
    shape = gma_shape(80, agg_block_p=32, interpreter=INTERPRET, split_target=split_target)
    launch = lambda: launcher.launch_pre_projection(case.qkv(torch.float32), case.H, case.W,
                                                    case.folded(torch.float32), case.hp.scale, case.hp.ln_eps,
                                                    shape=shape)["pre"]
    clean = launch()
    case.x64[0, 5 * case.W + 4] = float("nan")
    want = reference_group_mix_attention(case.x64, (case.H, case.W), case.w64, case.hp,
                                         return_intermediates=True)[1]["pre_proj"]
    got = launch()
    assert torch.isnan(want[0]).any(-1).all()
    assert torch.equal(torch.isnan(got[0]).cpu(), torch.isnan(want[0]))
    assert torch.equal(got[1], clean[1])


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only: emulates another GPU architecture")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("C", [200, 360], ids=lambda c: f"C{c}")
def test_forward_sm70_variant(monkeypatch, C, dtype):
    """The sm_70 / sm_75 variant (fp32 FMA dots: "ieee"; the attention's Q KV as rank-1 updates
    over d, d < D_PAD here) against the oracle, with the interpreter emulating an sm_70."""
    from gmf_kernels.triton_kernels import _common
    monkeypatch.setattr(_common, "EMULATED_CAPABILITY", (7, 0))
    assert _common.dot_variant(torch.empty(1, dtype=dtype)).precision == "ieee"
    case = Case(C, 5, 11, 1, seed=C + 3)
    out = _forward(case, dtype)
    if dtype == torch.float32:
        _assert_rel(out, case.out, FP32_TOL, f"fp32 out C={C} (sm_70 variant)")
        return
    with torch.no_grad():
        ref_lp = reference_group_mix_attention(case.x64.to(DEVICE, dtype), (case.H, case.W),
                                               case.weights(dtype), case.hp)
    assert_within_reference_error(out, ref_lp, case.out, name=f"{dtype} out C={C} (sm_70 variant)")


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only: the dot emulation does not exist on the GPU")
def test_fp32_parity_is_held_with_gpu_dot_rounding():
    """Under the interpreter the fp32 tests hold the GPU's 3xTF32 dots (the launchers' default,
    emulated) to 1e-5, and that tolerance notices the dots' rounding: the same call with the
    dots computed exactly gives different bits, and with one-pass TF32 (what fp32 would get
    without the three passes) it fails 1e-5."""
    from gmf_kernels.numerics import max_rel_error
    from gmf_kernels.triton_kernels._common import DotVariant, dot_variant
    case = Case(160, 7, 9, 1, seed=41)
    qkv, f = case.qkv(torch.float32), case.folded(torch.float32)
    assert dot_variant(qkv) == DotVariant("tf32x3", True)
    run = lambda dots: launcher.launch_pre_projection(qkv, case.H, case.W, f, case.hp.scale, case.hp.ln_eps,
                                                      dots=dots)["pre"]
    gpu, exact, tf32 = run(None), run(DotVariant("tf32x3", False)), run(DotVariant("tf32", True))
    _assert_rel(gpu, case.pre, FP32_TOL, "pre, 3xTF32 emulated")
    _assert_rel(exact, case.pre, FP32_TOL, "pre, exact fp32 dots")
    assert not torch.equal(gpu, exact)
    assert max_rel_error(tf32, case.pre) > FP32_TOL


def test_two_runs_bit_identical():
    case = Case(160, 7, 9, 2, seed=5)
    a = _forward(case, torch.float32)
    b = _forward(case, torch.float32)
    assert torch.equal(a, b)


def test_poison_does_not_change_result(monkeypatch):
    """Same bits with NaN-filled and with uninitialised buffers: nothing reads unwritten memory."""
    case = Case(40, 5, 11, 1, seed=9)
    a = _forward(case, torch.float32)
    monkeypatch.setattr(launcher, "POISON_BUFFERS", False)
    b = _forward(case, torch.float32)
    assert not torch.isnan(a).any()
    assert torch.equal(a, b)


def test_batch_beyond_the_grid_limit_runs_in_chunks(monkeypatch):
    """An eval batch of more than `config.MAX_GRID_BATCH` images (the batch is a grid dimension,
    65535 at most on CUDA) runs in chunks of that many: shown with the limit set to 2 and B = 5,
    chunks (2, 2, 1), the result within the fp32 tolerance of the float64 oracle and equal to
    the unchunked call's to the plans' rounding."""
    case = Case(40, 5, 7, 5, seed=21)
    whole = _forward(case, torch.float32)
    seen = []
    launch = op.launch_pre_projection

    def recording(qkv, *args, **kwargs):
        seen.append(qkv.shape[0])
        return launch(qkv, *args, **kwargs)

    monkeypatch.setattr(op, "launch_pre_projection", recording)
    monkeypatch.setattr(config, "MAX_GRID_BATCH", 2)
    out = _forward(case, torch.float32)
    assert seen == [2, 2, 1]
    _assert_rel(out, case.out, FP32_TOL, "chunked batch")
    _assert_rel(out, whole, FP32_TOL, "chunked against whole")


def test_noncontiguous_input():
    case = Case(80, 7, 9, 2, seed=12)
    x = case.x64.to(DEVICE, torch.float32).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    with torch.no_grad():
        out = BACKEND.forward(x, (case.H, case.W), case.weights(torch.float32), case.hp, False)
    _assert_rel(out, case.out, FP32_TOL, "non-contiguous x")


# ---------------------------------------------------------------- golden vectors (upstream code)


def _golden_cases():
    return torch.load(golden_path("gma_module.pt"), weights_only=False)


@pytest.mark.parametrize("idx", range(4))
def test_golden_fp32(idx):
    cases = _golden_cases()
    if idx >= len(cases):
        pytest.skip(f"golden file has {len(cases)} cases")
    c = cases[idx]
    w = cast_weights(weights_from_state_dict(c["state_dict"]), torch.float32, DEVICE)
    hp = GMAHyper(num_heads=c["num_heads"], scale=(c["dim"] // c["num_heads"]) ** -0.5)
    x = c["x"].to(DEVICE, torch.float32)
    with torch.no_grad():
        out = BACKEND.forward(x, (c["H"], c["W"]), w, hp, False)
    _assert_rel(out, c["out"], FP32_TOL, f"golden C={c['dim']} {c['H']}x{c['W']} B={c['B']}")


# ---------------------------------------------------------------- dispatch, op, compile
def _problem(**kw):
    base = dict(B=1, H=7, W=7, dim=80, num_heads=8, dtype=torch.float32, device_type=DEVICE,
                training=False, needs_grad=False, explicit=True)
    base.update(kw)
    return GMAProblem(**base)


def test_backend_declares_support():
    assert BACKEND.name == "triton"
    assert BACKEND.availability_reasons() == []
    assert BACKEND.not_supported_reasons(_problem()) == []
    assert BACKEND.not_supported_reasons(_problem(training=True, needs_grad=True)) == []
    assert BACKEND.not_supported_reasons(_problem(needs_grad=True, dtype=torch.bfloat16)) == []
    assert BACKEND.not_supported_reasons(_problem(training=True, needs_grad=True, dtype=torch.bfloat16)) == []
    assert any("float64" in r for r in BACKEND.not_supported_reasons(_problem(dtype=torch.float64)))
    cpu_auto = BACKEND.not_supported_reasons(_problem(device_type="cpu", explicit=False))
    assert cpu_auto, "auto must never pick the CPU interpreter"


def test_auto_dispatch_never_picks_interpreter():
    from gmf_kernels.backends import select_backend
    chosen = select_backend(_problem(device_type="cpu", explicit=False), None)
    assert chosen.name != "triton"


def test_op_rejects_bad_inputs():
    case = Case(40, 3, 3, 1)
    f = case.folded(torch.float32)
    qkv = case.qkv(torch.float32)
    with pytest.raises(ValueError):
        torch.ops.gmf.triton_pre_projection(qkv, 3, 4, list(f), 1.0, 1e-5)
    with pytest.raises(TypeError):
        torch.ops.gmf.triton_pre_projection(qkv.double(), 3, 3, list(f), 1.0, 1e-5)
    with pytest.raises(ValueError, match="expected 14 folded weight tensors"):
        torch.ops.gmf.triton_pre_projection(qkv, 3, 3, list(f)[:-1], 1.0, 1e-5)
    with pytest.raises(ValueError, match="weight pw has shape"):
        torch.ops.gmf.triton_pre_projection(qkv, 3, 3, [t[..., :-1] if n == "pw" else t
                                                        for n, t in zip(f._fields, f)], 1.0, 1e-5)


def test_opcheck():
    """Schema, fake (meta) implementation and dispatch of gmf::triton_pre_projection."""
    case = Case(40, 3, 4, 1)
    f = case.folded(torch.float32)
    args = (case.qkv(torch.float32), 3, 4, list(f), case.hp.scale, 1e-5)
    torch.library.opcheck(torch.ops.gmf.triton_pre_projection.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_fullgraph():
    if INTERPRET:
        # Under the interpreter the op is a custom_op (opaque node; see op.py): Inductor
        # compiles the linears around it, the kernels still run through the interpreter.
        assert op.REGISTRATION == "custom_op"
    case = Case(80, 7, 9, 1, seed=21)
    w = case.weights(torch.float32)

    def fn(x):
        return BACKEND.forward(x, (case.H, case.W), w, case.hp, False)

    compiled = torch.compile(fn, fullgraph=True)
    x = case.x64.to(DEVICE, torch.float32)
    with torch.no_grad():
        out = compiled(x)
    _assert_rel(out, case.out, FP32_TOL, "torch.compile(fullgraph=True)")


def _interpreted(cfg):
    """A tile config as the interpreter runs it: without num_warps (one thread runs a program there) and without
    PIPE (the launcher asks the interpreter for the plain tile loop, `aggregation.aggregate_call`; the pipelined
    loops: `test_pipelined_tile_loops`, with the interpreter's tl.range shim)."""
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "PIPE")}


def _untabled_candidates():
    """(C, aggregation config, attention config) of the tuning candidates beyond the tile tables --
    the aggregation's wide tiles (`launcher.AGG_WIDE_TILES`), unrolled tap rows (UNROLL) and a segment's
    two heads as one tensor (PAIR), the attention's unrolled CRPE tap rows (UNROLL), each with the other
    family's default -- at
    GroupMixFormer-S's widths and at C = 200 (s = 40: channel chunks of 16 + 16 + 8), as the tuner would
    try them for bf16 on an sm_90: from the search spaces themselves, not a list of our own. Run in fp32,
    where their DOTS16 changes nothing (cleared here; the 16-bit dots: `test_dots16_candidates`).
    Candidates that differ only in num_warps run once: the interpreter runs a program as one thread
    whatever its warps, so they compute the same thing there (their compiled forms, registers and spills
    are the AOT tests')."""
    out = []
    bf16, cap = torch.bfloat16, (9, 0)
    for C in sorted(set(MODEL_CONFIGS["groupmixformer_s"]["embedding_dims"]) | {200}):
        agg0, attn0 = launcher.aggregate_default(C, bf16, cap), launcher.attention_default(C, bf16, cap)
        aggs = [{**cfg, "DOTS16": 0} for cfg in launcher.aggregate_candidates(C, bf16, cap)   # fp32 runs: DOTS16 moot
                if (cfg["UNROLL"] or cfg["PAIR"] or cfg["SPLIT"]
                    or (cfg["BLOCK_P"], cfg["num_warps"], cfg["CK"]) in launcher.AGG_WIDE_TILES)
                and not cfg.get("FUSED")]   # (FUSED: `test_fused_forward`, at its tiles and every dtype)
        seen, cases = [], []
        for cfg in aggs:
            if _interpreted(cfg) not in seen:
                seen.append(_interpreted(cfg))
                cases.append((cfg, attn0))
        seen = []
        for cfg in launcher.attention_candidates(C, bf16, cap):
            if cfg["UNROLL"] and _interpreted(cfg) not in seen:
                seen.append(_interpreted(cfg))
                cases.append((agg0, cfg))
        for agg, attn in cases:
            tag = "-".join(f"{k}={v}" for k, v in agg.items()) + "-attn-" + "-".join(f"{k}={v}" for k, v in attn.items())
            out.append(pytest.param(C, agg, attn, id=f"C{C}-{tag}"))
    return out


@pytest.mark.parametrize("C,agg,attn", _untabled_candidates())
def test_untabled_tuning_candidates(C, agg, attn):
    """Every candidate the tuner may pick beyond the tile tables (the aggregation at 64 tokens a
    tile, merged or stream after stream, or with its tap rows unrolled, an instance per window, or split
    in a Z pass (stencils, or dense convolutions on tensor cores) and the aggregation from Z; the attention with its
    CRPE tap rows unrolled) computes the same pre-projection (fp32, against
    float64) and writes every element, on a grid of several tiles (the last ragged) with runs of
    several tiles per program."""
    H, W = {80: (11, 13), 160: (9, 10)}.get(C, (9, 9))
    case = Case(C, H, W, 1, seed=C + agg["BLOCK_P"] + agg["MERGE"] + 2 * agg["UNROLL"] + 4 * attn["UNROLL"]
                + 8 * agg["PAIR"] + 16 * agg["ROWS"] + 32 * agg["SPLIT"] + 64 * agg.get("ZDENSE", 0))
    shape = launcher.shape_from_configs(C, launcher.dot_variant(case.qkv(torch.float32)), agg, attn)
    assert (shape.AGG_BLOCK_P, shape.CK, shape.AGG_MERGE, shape.AGG_UNROLL, shape.ATTN_UNROLL, shape.AGG_PAIR,
            shape.AGG_ROWS) == (agg["BLOCK_P"], agg["CK"], bool(agg["MERGE"]), bool(agg["UNROLL"]), bool(attn["UNROLL"]),
                                bool(agg["PAIR"]), bool(agg["ROWS"]))
    assert shape.num_tiles(H * W, W) >= 2
    _, launches = launcher.plan_pre_projection(case.qkv(torch.float32), H, W, case.folded(torch.float32),
                                               case.hp.scale, case.hp.ln_eps, shape=shape)
    z_pass = "gma_dense_z_kernel" if agg.get("ZDENSE") else "gma_statistics_kernel"
    assert [k.__name__ for k, *_ in launches][:1 + agg["SPLIT"]] == ([z_pass] if agg["SPLIT"] else []) + [
        "gma_aggregate_kernel"]
    kw = launches[agg["SPLIT"]][3]     # the aggregation's (the split forward's Z pass comes first)
    assert (kw["PAIR"], kw["UNROLL"], kw["MERGE_QKV"], kw["BLOCK_P"], kw["ROWS"], kw["FROM_Z"]) == (
        bool(agg["PAIR"]), bool(agg["UNROLL"]), bool(agg["MERGE"]), agg["BLOCK_P"], bool(agg["ROWS"]), bool(agg["SPLIT"]))
    _check_launch(case, shape)


def test_untabled_candidates_present():
    """The search spaces do offer the candidates `test_untabled_tuning_candidates` checks (so that it
    cannot pass by checking nothing): per GroupMixFormer-S width, the aggregation's unrolled taps,
    its 64-token tiles merged and stream after stream, its PAIR mode, the attention's unrolled CRPE taps."""
    cases = {}
    for p in _untabled_candidates():
        C, agg, attn = p.values
        cases.setdefault(C, []).append((agg, attn))
    for C in set(MODEL_CONFIGS["groupmixformer_s"]["embedding_dims"]):
        got = cases[C]
        assert any(a["UNROLL"] for a, _ in got) and any(t["UNROLL"] for _, t in got), C
        assert {a["MERGE"] for a, _ in got if a["BLOCK_P"] == 64} == {0, 1}, C
        assert any(a["PAIR"] for a, _ in got), C              # s = 16, 32, 64: the heads as one tensor
        assert any(a["ROWS"] for a, _ in got), C              # and its row walks
        assert any(a["SPLIT"] for a, _ in got), C             # the split forward
        assert any(a.get("ZDENSE") for a, _ in got), C        # its Z pass on tensor cores


def _dots16_candidates():
    """(dtype, C, aggregation config, attention config, compare) of the tuning candidates with 16-bit dot
    operands (DOTS16), as the tuner would try them on an sm_90, from the search spaces themselves: the
    aggregation's DOTS16 candidates at the default tile, per-head and paired (their unrolled and wide
    forms differ from these in structure only, which `test_untabled_tuning_candidates` checks in fp32),
    beside the attention's DOTS16 candidates (both kernels' 16-bit dots in one run), bf16 at
    GroupMixFormer-S's widths and C = 200, fp16 at C = 80. Each aggregation candidate and each attention
    candidate runs at least once, paired in turn (the two kernels share only their buffers, which no tile
    choice changes: the product of the two lists, 42 cases, tested nothing more). `compare` (the first,
    bf16 C = 80): also run the default (TF32 dots), which must give another result."""
    out = []
    cap = (9, 0)
    for dtype, widths in ((torch.bfloat16, sorted(set(MODEL_CONFIGS["groupmixformer_s"]["embedding_dims"]) | {200})),
                          (torch.float16, (80,))):
        for C in widths:
            attn = [cfg for cfg in launcher.attention_candidates(C, dtype, cap) if cfg["DOTS16"]]
            default = launcher.aggregate_default(C, dtype, cap)
            aggs = []
            for cfg in launcher.aggregate_candidates(C, dtype, cap):   # num_warps aside (the interpreter's)
                if (cfg["DOTS16"] and not cfg["UNROLL"] and cfg["BLOCK_P"] == default["BLOCK_P"]
                        and _interpreted(cfg) not in map(_interpreted, aggs)):
                    aggs.append(cfg)
            for j in range(max(len(aggs), len(attn))):
                agg, a = aggs[j % len(aggs)], attn[j % len(attn)]
                tag = f"{agg['BLOCK_P']}-unroll{agg['UNROLL']}-pair{agg['PAIR']}-rows{agg['ROWS']}-attn{j % len(attn)}"
                out.append(pytest.param(dtype, C, agg, a, not out, id=f"{str(dtype)[6:]}-C{C}-{j}-{tag}"))
    return out


@pytest.mark.parametrize("dtype,C,agg,attn,compare", _dots16_candidates())
def test_dots16_candidates(monkeypatch, dtype, C, agg, attn, compare):
    """The candidates with 16-bit dot operands (`config.operand_precision`) launch their dots at the
    input's type and hold the low-precision rule (the layer's output within 2x the PyTorch
    reference's own error at that dtype, against float64) on a grid of several ragged tiles with runs
    of several tiles per program, writing every element. With `compare` (bf16) the output is not the
    default's (TF32 operands) bit for bit; fp16 and TF32 both keep 11 significant bits, so there the two
    may agree."""
    H, W = {80: (11, 13), 160: (9, 10)}.get(C, (9, 9))
    case = Case(C, H, W, 1, seed=C + agg["UNROLL"] + 3 * agg["PAIR"] + agg["BLOCK_P"] + 7 * (dtype == torch.float16)
                + 5 * agg["ROWS"])
    dots = launcher.dot_variant(case.qkv(dtype))
    shape = launcher.shape_from_configs(C, dots, agg, attn)
    assert (shape.AGG_DOTS16, shape.ATTN_DOTS16, shape.AGG_UNROLL, shape.AGG_PAIR, shape.AGG_ROWS) == (
        True, True, bool(agg["UNROLL"]), bool(agg["PAIR"]), bool(agg["ROWS"]))
    assert shape.num_tiles(H * W, W) >= 2
    _, launches = launcher.plan_pre_projection(case.qkv(dtype), H, W, case.folded(dtype), case.hp.scale,
                                               case.hp.ln_eps, shape=shape)
    want = config.dtype_name(dtype)
    assert [kw.get("DOT_PRECISION") for _, _, _, kw in launches] == [want, None, want]
    assert launches[0][3]["PAIR"] is bool(agg["PAIR"]) and launches[0][3]["UNROLL"] is bool(agg["UNROLL"])
    shapes = [shape]
    if compare:
        shapes.append(launcher.shape_from_configs(C, dots, launcher.aggregate_default(C, dtype, (9, 0)),
                                                  launcher.attention_default(C, dtype, (9, 0))))
    outs = []
    for sh in shapes:
        monkeypatch.setattr(launcher, "default_shape", lambda *a, sh=sh: sh)
        outs.append(_forward(case, dtype))
    with torch.no_grad():
        ref_lp = reference_group_mix_attention(case.x64.to(DEVICE, dtype), (case.H, case.W), case.weights(dtype),
                                               case.hp)
    assert not torch.isnan(outs[0]).any()
    assert_within_reference_error(outs[0], ref_lp, case.out, name=f"{dtype} DOTS16 C={C}")
    if len(outs) > 1:
        assert not torch.equal(outs[0], outs[1]), "DOTS16 ran the default's dots"


#: (C, H, W, B, dtype, GPU capability the candidate is drawn for): d = 8 (C = 80), 4 (C = 40) and 20 (C = 200), the
#: widths `config.attn_group_applies` takes; fp32 (3xTF32 dots), the 16-bit dots of fp16 / bf16 on sm_80+ (DOTS16),
#: and an sm_75's FMA dots (rank-1 updates; fp16 and fp32); grids of several ragged tiles, batch 1 and 2
GROUP_CASES = [(80, 11, 13, 2, torch.float32, (9, 0)), (40, 9, 11, 1, torch.bfloat16, (9, 0)),
               (200, 6, 7, 1, torch.float16, (8, 0)), (80, 9, 7, 1, torch.float16, (7, 5)),
               (40, 5, 11, 2, torch.float32, (7, 5))]


@pytest.mark.parametrize("C,H,W,B,dtype,cap", GROUP_CASES,
                         ids=[f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}-sm{a}{m}" for c, h, w, b, d, (a, m) in GROUP_CASES])
def test_attention_group_candidate(monkeypatch, C, H, W, B, dtype, cap):
    """The attention's GROUP candidate (`GMAShape.ATTN_GROUP`: a program per CRPE window's heads, grid (tiles, 3, B);
    Q KV as one product with the heads' KV blocks on its diagonal, or rank-1 updates on FMA dots), as the search
    space offers it for (C, dtype, GPU) with its tile: the layer's output against float64, fp32 within FP32_TOL and
    fp16 / bf16 within 2x the PyTorch reference's own error at that dtype; every element written (NaN poison). The
    GPU's dot variant is emulated where it is not the interpreter's (sm_75: "ieee")."""
    from gmf_kernels.triton_kernels import _common
    if cap < (8, 0):
        monkeypatch.setattr(_common, "EMULATED_CAPABILITY", cap)
    cands = [c for c in launcher.attention_candidates(C, dtype, cap) if c.get("GROUP")]
    assert len(cands) == 2 and config.attn_group_applies(C), cands
    case = Case(C, H, W, B, seed=C + H + 3 * B + (dtype == torch.float16))
    dots = launcher.dot_variant(case.qkv(dtype))
    assert (dots.precision == "ieee") == (cap < (8, 0))
    shape = launcher.shape_from_configs(C, dots, launcher.aggregate_default(C, dtype, cap), cands[0])
    assert shape.ATTN_GROUP and -(-H * W // shape.ATTN_BLOCK_P) >= 2
    _, launches = launcher.plan_pre_projection(case.qkv(dtype), H, W, case.folded(dtype), case.hp.scale,
                                               case.hp.ln_eps, shape=shape)
    grid, kw = launches[-1][1], launches[-1][3]
    assert grid[1:] == (3, B) and kw["GROUP"] is True
    assert (kw["G2_PAD"], kw["G3_PAD"]) == (config.dot_pad(C // 5), config.dot_pad(3 * (C // 10)))
    _check_shape_at(monkeypatch, case, shape, dtype, f"{dtype} GROUP C={C}")


def test_attention_group_keeps_r_in_training():
    """The training forward (planes kept: `config.from_planes`, STORE_R) with the GROUP candidate: the
    pre-projection and what it keeps for the backward (R = CRPE(V) + bias, KV and the softmax statistics) equal
    the per-head kernel's (fp32, to FP32_TOL), against float64 for pre."""
    case = Case(80, 9, 11, 1, seed=91)
    qkv, f, z = _kept_planes(case, torch.float32)
    dots = launcher.dot_variant(qkv)
    agg = launcher.aggregate_default(80, torch.float32, (9, 0))
    attn = launcher.attention_default(80, torch.float32, (9, 0))
    runs = []
    for group in (0, 1):
        shape = launcher.shape_from_configs(80, dots, agg, {**attn, "GROUP": group})
        assert config.from_planes(shape, dots.precision).ATTN_GROUP is bool(group)
        runs.append(launcher.launch_pre_projection(qkv, 9, 11, f, case.hp.scale, case.hp.ln_eps, shape=shape,
                                                   planes=launcher.planes_view(z, 1)))
    _assert_rel(runs[1]["pre"], case.pre, FP32_TOL, "pre, GROUP, training forward")
    for name in ("R", "kv", "k_max", "k_sum"):
        assert not torch.isnan(runs[1][name]).any(), name
        _assert_rel(runs[1][name], runs[0][name], FP32_TOL, f"{name}: GROUP against per head")


def test_attention_group_only_where_lanes_drop():
    """GROUP is a candidate where a program per window's heads issues fewer stencil lanes than one per head and its
    widest group stays within `config.ATTN_GROUP_MAX_PAD`: of the released widths C = 40, 80, 200 (d = 4, 8, 20,
    padded by more than the group's 2 d and 3 d), not 160, 240, 320, 480 (a head fills its lanes) nor 360 (a group
    of 108 channels). With the row walks it is refused."""
    take = {C for C in MODEL_WIDTHS if config.attn_group_applies(C)}
    assert take == {40, 80, 200}, take
    for C in MODEL_WIDTHS:
        per_head, per_group = config.attn_group_tile_lanes(C)
        has = any(c.get("GROUP") for c in launcher.attention_candidates(C, torch.bfloat16, (9, 0)))
        assert has == (C in take) and (per_group < per_head) == (C in (40, 80, 200, 360)), C
    with pytest.raises(ValueError, match="attn_rows"):
        gma_shape(80, attn_rows=True, attn_group=True)


def test_dots16_only_where_it_changes_something():
    """DOTS16 candidates exist for fp16 / bf16 on sm_80+ (one-pass TF32 dots there) and nowhere else
    (fp32: 3xTF32; sm_75: FMA dots), and `operand_precision` keeps every other precision as it is."""
    for dtype, cap, want in ((torch.bfloat16, (9, 0), True), (torch.float16, (8, 0), True),
                             (torch.float32, (9, 0), False), (torch.float16, (7, 5), False)):
        for cands in (launcher.aggregate_candidates(80, dtype, cap), launcher.attention_candidates(80, dtype, cap)):
            assert any(c["DOTS16"] for c in cands) == want, (dtype, cap)
    assert config.operand_precision("tf32x3", "fp32", True) == "tf32x3"
    assert config.operand_precision("ieee", "fp16", True) == "ieee"
    assert config.operand_precision("tf32", "bf16", False) == "tf32"
    assert config.operand_precision("tf32", "bf16", True) == "bf16"


def test_pair_mode_only_where_it_fits():
    """PAIR (`config.pair_applies`: s a power of two >= 16, the merged q/k/v pass) is refused elsewhere,
    and offered as a candidate exactly at those widths."""
    assert [C for C in MODEL_WIDTHS if config.pair_applies(C)] == [80, 160, 320]
    for C in (40, 200, 240, 360, 480):
        with pytest.raises(ValueError, match="pair"):
            gma_shape(C, pair=True)
        assert not any(c["PAIR"] for c in launcher.aggregate_candidates(C, torch.bfloat16, (9, 0)))
    with pytest.raises(ValueError, match="merged"):
        gma_shape(80, pair=True, merge=False)
    assert gma_shape(160, pair=True).AGG_PAIR
    for C in (80, 160, 320):
        assert any(c["PAIR"] for c in launcher.aggregate_candidates(C, torch.float32, (9, 0)))


#: (C, H, W, B, split_target): grids narrower and wider than a 16-column strip (W = 5, 9, 21, 35: the
#: last strip ragged), fewer rows than the 7x7 window's reach (H = 2, 3), runs of rows that cross from
#: one strip into the next (few programs) and the shortest runs (many programs wanted: KS rows)
ROWS_CASES = [(80, 9, 21, 2, 24), (80, 3, 35, 1, 10**6), (160, 7, 9, 2, 1), (320, 2, 5, 1, 40), (320, 6, 18, 1, 7)]


@pytest.mark.parametrize("C,H,W,B,split_target", ROWS_CASES, ids=lambda v: str(v))
def test_rows_walk(C, H, W, B, split_target):
    """The row walks of segments 1-3 (`GMAShape.AGG_ROWS`, `aggregation._segment_rows`): tiles are rows of
    16-column strips, each input row read once per walk into KS rolling accumulators; the same Q, V, KV
    and pre-projection as the oracle, every element written (NaN poison), whatever the runs of rows the
    plan gives (`job_plan` with W), with a tile count that differs from the token-order tiles'."""
    case = Case(C, H, W, B, seed=C + H + W)
    shape = gma_shape(C, agg_block_p=16, interpreter=INTERPRET, split_target=split_target, pair=True, rows=True)
    N = H * W
    plan = aggregation.job_plan(N, B, shape, "tf32x3", W)
    assert plan.tiles == -(-W // 16) * H
    # runs of at least KS rows in the walking jobs (`_rows_splits`), as the tiles allow
    assert all(tps >= min(plan.tiles, 2 * j + 1) for j, tps in enumerate(plan.tiles_per_split[1:4], 1)), plan
    with pytest.raises(ValueError, match="image width"):
        shape.num_tiles(N)
    _check_launch(case, shape)


#: (C, H, W, B, programs target): d = 8, 16, 32 (C = 80 pads d = 8 to 16 channels); strips ragged (W = 5,
#: 21, 35), H below the 7x7 window's reach (2, 3); runs of 1 row (target high), of several rows, whole strips
ATTN_ROWS_CASES = [(80, 9, 21, 2, 64), (80, 3, 35, 1, 10**6), (160, 7, 9, 2, 1), (320, 2, 5, 1, 40), (240, 6, 18, 1, 40)]


@pytest.mark.parametrize("C,H,W,B,target", ATTN_ROWS_CASES, ids=lambda v: str(v))
def test_attention_rows_walk(monkeypatch, C, H, W, B, target):
    """The attention's CRPE by row walks (`GMAShape.ATTN_ROWS`, `attention._attention_rows`): programs are
    runs of rows of 16-column strips (`attention_rows_plan`: as few runs as give the target's programs),
    each V row read once per walk into KS rolling accumulators; the same pre-projection as the oracle
    and every element written, with the aggregation's tile kernel and with its row walks where PAIR exists."""
    from gmf_kernels.triton_kernels import attention as A
    monkeypatch.setattr(A, "ATTN_ROWS_TARGET", target)
    case = Case(C, H, W, B, seed=C + 2 * H + W)
    pair = config.pair_applies(C)
    shape = gma_shape(C, agg_block_p=16, attn_block_p=16, interpreter=INTERPRET, attn_rows=True, pair=pair, rows=pair)
    run_rows, programs = A.attention_rows_plan(H, W, B, shape)
    assert programs == -(-W // 16) * -(-H // run_rows) and 1 <= run_rows <= H
    if target == 1:
        assert run_rows == H                    # whole strips
    if target == 10**6:
        assert run_rows == min(H, A.ATTN_ROWS_MIN_RUN)   # the shortest runs: every walk has its 2 R halo rows
    if target == 64:
        assert A.ATTN_ROWS_MIN_RUN <= run_rows < H       # runs of several rows, not the whole strip
    _check_launch(case, shape)


# ---------------------------------------------------------------- the training forward from the kept planes
def _kept_planes(case, dtype):
    """qkv at dtype and the Z planes its statistics pass keeps (`statistics.statistics_planes`: the
    pass a training step runs before its forward), with the folded weights."""
    from gmf_kernels.triton_kernels import statistics
    qkv, f = case.qkv(dtype), case.folded(dtype)
    _, _, _, (z, _, _) = statistics.statistics_planes(qkv, case.H, case.W, f)
    return qkv, f, z


#: (C, H, W, B): a PAIR width at a ragged grid, s = 8 (C = 40), s = 40 (C = 200, d = 16), batch 1 and 2
PLANES_CASES = [(80, 7, 9, 2), (40, 5, 11, 1), (200, 3, 7, 2)]


@pytest.mark.parametrize("C,H,W,B", PLANES_CASES, ids=lambda v: str(v))
def test_forward_from_planes_float32(C, H, W, B):
    """The aggregation with AGG_FROM_Z (`config.from_planes`): segments 1-3 read from the Z the statistics
    pass kept instead of their stencils. Every buffer written (NaN poison), Q, V, KV and the pre-projection
    within FP32_TOL of float64, with the eval-mode folded weights (any affine: the op takes the folded
    BatchNorms as they are); what the launches keep for the backward as its recompute kernels make it: the
    local branch's w4, xh4, rstd4 (`recompute.plan_recompute_local`, whose stores they share, so against
    float64 too: the depthwise output, the LayerNorm input normalised, its 1 / std), and R, kv, k_max, k_sum (`recompute.plan_recompute_attention`
    on V from the same Z, its partials merged)."""
    from gmf_kernels.triton_kernels import recompute
    case = Case(C, H, W, B, seed=C + 3 * H)
    qkv, f, z = _kept_planes(case, torch.float32)
    r = _check_launch(case, None, planes=launcher.planes_view(z, B))
    loc, (kernel, grid, args, kwargs) = recompute.plan_recompute_local(qkv, H, W, f, case.hp.ln_eps)
    kernel[grid](*args, **kwargs)
    for name in ("w4", "xh4", "rstd4"):
        assert r[name].shape == loc[name].shape and r[name].dtype == loc[name].dtype, name
        _assert_rel(r[name], loc[name], FP32_TOL, name)
    pv, (kernel, grid, args, kwargs) = recompute.plan_proxy_v(z, f)
    kernel[grid](*args, **kwargs)
    att, (kernel, grid, args, kwargs) = recompute.plan_recompute_attention(z, pv, H, W, f)
    kernel[grid](*args, **kwargs)
    k_max, k_sum, kv = recompute.merge_softmax_partials(att["part_m"], att["part_l"], att["part_acc"])
    assert r["R"].shape == att["R"].shape and r["R"].dtype == att["R"].dtype
    _assert_rel(r["R"], att["R"], FP32_TOL, "R")
    for name, want in (("kv", kv), ("k_max", k_max), ("k_sum", k_sum)):
        _assert_rel(r[name].reshape(want.shape), want, FP32_TOL, name)
    w = case.w64
    u4 = torch.cat([case.x64 @ w.qkv_weight[i * C:(i + 1) * C].T + w.qkv_bias[i * C:(i + 1) * C]
                    for i in range(3)], -1)
    s = C // 5
    u4 = torch.cat([u4[..., i * C + 4 * s:(i + 1) * C] for i in range(3)], -1).transpose(1, 2).reshape(B, 3 * s, H, W)
    w4 = F.conv2d(u4, w.local_dw_weight, padding=1, groups=3 * s)
    z4 = F.conv2d(w4, w.local_pw_weight)
    rstd4 = (z4.var(1, unbiased=False, keepdim=True) + case.hp.ln_eps).rsqrt()
    _assert_rel(r["w4"], w4, FP32_TOL, "w4 against float64")
    _assert_rel(r["xh4"], (z4 - z4.mean(1, keepdim=True)) * rstd4, FP32_TOL, "xh4 against float64")
    _assert_rel(r["rstd4"], rstd4, FP32_TOL, "rstd4 against float64")


@pytest.mark.parametrize("C,H,W,B", [(80, 9, 21, 2), (320, 3, 5, 1)], ids=lambda v: str(v))
def test_forward_from_planes_with_attention_row_walks(monkeypatch, C, H, W, B):
    """The training forward with the attention's row walks (`GMAShape.ATTN_ROWS`, kept by `config.from_planes`
    where they compile without spilling: one-pass TF32 dots, D_PAD <= 32; here, at fp32, allowed for 3xTF32 too):
    the walk keeps R = CRPE(V) + bias too (STORE_R); R against the attention recompute kernel's (on V from the
    same Z), the pre-projection against float64, every buffer written. 16-column strips of a 21-column grid in
    runs of several rows, and a grid shorter than the 7x7 reach."""
    from gmf_kernels.triton_kernels import attention as A
    from gmf_kernels.triton_kernels import recompute
    monkeypatch.setattr(A, "ATTN_ROWS_TARGET", 64)
    case = Case(C, H, W, B, seed=C + 7 * H)
    qkv, f, z = _kept_planes(case, torch.float32)
    shape = gma_shape(C, attn_block_p=16, interpreter=INTERPRET, attn_rows=True)
    assert config.from_planes(shape, "tf32").ATTN_ROWS and not config.from_planes(shape, "tf32x3").ATTN_ROWS
    assert not config.from_planes(shape, "ieee").ATTN_ROWS
    assert not config.from_planes(gma_shape(480, attn_block_p=16, attn_rows=True), "tf32").ATTN_ROWS   # D_PAD 64
    monkeypatch.setattr(config, "ATTN_ROWS_KEEP_R_PRECISIONS", ("tf32", "tf32x3"))
    config.from_planes.cache_clear()
    monkeypatch.setattr(launcher, "from_planes", lambda s, p, lz=False: config.from_planes.__wrapped__(s, p, lz))
    r = _check_launch(case, shape, planes=launcher.planes_view(z, B))
    pv, (kernel, grid, args, kwargs) = recompute.plan_proxy_v(z, f)
    kernel[grid](*args, **kwargs)
    att, (kernel, grid, args, kwargs) = recompute.plan_recompute_attention(z, pv, H, W, f)
    kernel[grid](*args, **kwargs)
    assert r["R"].shape == att["R"].shape and r["R"].dtype == att["R"].dtype
    _assert_rel(r["R"], att["R"], FP32_TOL, "R (row walks)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("C,H,W,B", PLANES_CASES[:2], ids=lambda v: str(v))
def test_forward_from_planes_low_precision(dtype, C, H, W, B):
    """The same through the op (``gmf::triton_pre_projection_from_planes``) at fp16 / bf16: Z kept in the
    stage dtype (one rounding before its BatchNorm, as the reference's own convolutions in that dtype
    round it), the result no worse than 2x the reference's error at that dtype."""
    case = Case(C, H, W, B, seed=C + 5 * H)
    qkv, f, z = _kept_planes(case, dtype)
    assert z.dtype == dtype
    out = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, H, W, list(f), case.hp.scale, case.hp.ln_eps)[0]
    with torch.no_grad():
        _, ex = reference_group_mix_attention(case.x64.to(DEVICE, dtype), (H, W), case.weights(dtype), case.hp,
                                              return_intermediates=True)
    assert out.dtype == dtype
    assert_within_reference_error(out, ex["pre_proj"], case.pre, name=f"{dtype} pre_proj from planes")


#: (C, H, W, B, dtype, GPU tiles?) of the split forward (`GMAShape.AGG_SPLIT`): PAIR's Z pass (C = 80, 320) and the
#: per-head one (C = 40: s = 8), the interpreter's one tile and the GPU tiles (several a program, ragged last), odd grids
#: (fp32 at GPU tiles and GroupMixFormer-S's widths: `test_untabled_tuning_candidates`)
SPLIT_CASES = [(40, 5, 7, 2, torch.float32, False), (80, 7, 9, 1, torch.bfloat16, True),
               (320, 3, 5, 2, torch.float16, False)]
#: ... and with its Z pass as dense convolutions on tensor cores (`GMAShape.AGG_ZDENSE`, `dense_z`): s = 8 and 12
#: padded to 16 channels, the GPU tiles (128 tokens: several programs an image at 13x11, the last ragged), odd grids
#: smaller than the 7x7 window, batch 1 and 3
#: (the last field: the ZDENSE variant, its tile table: `config.DENSE_Z_TILES`, `config.DENSE_Z_TILES_ALT`)
ZDENSE_CASES = [(40, 5, 7, 2, torch.float32, False, 1), (60, 13, 11, 1, torch.float32, True, 1),
                (80, 7, 9, 3, torch.bfloat16, True, 1), (160, 4, 6, 1, torch.float16, False, 1),
                (320, 3, 5, 2, torch.bfloat16, True, 1), (160, 12, 13, 1, torch.bfloat16, True, 2)]


@pytest.mark.parametrize("C,H,W,B,dtype,gpu_tiles,zdense",
                         [c + (0,) for c in SPLIT_CASES] + ZDENSE_CASES,
                         ids=[f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}-{'gpu' if g else 'interp'}" for c, h, w, b, d, g in
                              SPLIT_CASES] + [f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}-{'gpu' if g else 'interp'}-dense{z}"
                                              for c, h, w, b, d, g, z in ZDENSE_CASES])
def test_split_forward(monkeypatch, C, H, W, B, dtype, gpu_tiles, zdense):
    """The split forward (the "triton.aggregate" candidate SPLIT): the Z pass (`statistics.plan_z_pass`, or with
    ZDENSE `dense_z.plan_dense_z_pass`) first, then the aggregation reading Z without keeping anything for a
    backward (no KEEP, no R, no softmax statistics), then combine and attention. fp32: Q, V, KV and the
    pre-projection within FP32_TOL of float64, every buffer written; fp16 / bf16: the layer through the op within
    2x the reference's own error (Z rounded once to the stage dtype before its BatchNorm, as the reference's
    convolutions in that dtype round it; the dense pass's W_t rounded once to the input type)."""
    case = Case(C, H, W, B, seed=C + 11 * H + B)
    shape = (gma_shape(C, split=True, zdense=zdense) if gpu_tiles else
             gma_shape(C, interpreter=INTERPRET, split=True, zdense=zdense))
    assert shape.AGG_SPLIT and not (shape.AGG_PAIR or shape.AGG_ROWS or shape.AGG_FROM_Z)
    _, launches = launcher.plan_pre_projection(case.qkv(dtype), H, W, case.folded(dtype), case.hp.scale,
                                               case.hp.ln_eps, shape=shape)
    assert [k.__name__ for k, *_ in launches] == ["gma_dense_z_kernel" if zdense else "gma_statistics_kernel",
                                                  "gma_aggregate_kernel", "gma_combine_kernel", "gma_attention_kernel"]
    kw = [k[3] for k in launches]
    tiles = {1: config.DENSE_Z_TILES, 2: config.DENSE_Z_TILES_ALT}.get(zdense)
    assert (kw[0]["BLOCK_P"], kw[0]["num_warps"]) == tiles[config.dot_pad(C // 5)] if zdense else kw[0]["STORE"] == 2
    assert kw[1]["FROM_Z"] and "KEEP" not in kw[1]
    assert kw[1].get("LOCAL_Z", False) == bool(zdense) == shape.local_from_z   # ZDENSE: the local branch's Z too
    assert not kw[2].get("STATS") and not kw[3].get("STORE_R")
    _check_shape_at(monkeypatch, case, shape, dtype, f"{dtype} split forward C={C}")


@pytest.fixture
def interpreter_range_bounds(monkeypatch):
    """Lets the interpreter run `tl.range` over runtime bounds, the pipelined tile loops (`GMAShape.AGG_PIPE`; the
    interpreter ignores num_stages): its scalars are 1-element arrays, which NumPy 2 does not convert to the Python
    int `range` needs (so the library keeps the plain loops there, `aggregation.aggregate_call`). Test-only: the
    interpreter's tensor `__index__` takes the one element, and the aggregation passes PIPE on."""
    import numpy as np
    from triton.runtime import interpreter
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
    monkeypatch.setattr(aggregation, "interpreting", lambda: False)


#: (C, H, W, split): the split forward (jobs 0-3 element-wise loops; C = 480: D_PAD 64, a walk per head) and the
#: fused one (job 0's loop), a program walking several tiles, the last ragged
PIPE_CASES = [(80, 9, 11, True), (480, 5, 7, True), (160, 9, 11, False)]


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's tl.range shim")
@pytest.mark.parametrize("C,H,W,split", PIPE_CASES, ids=[f"C{c}-{h}x{w}-{'split' if s else 'fused'}"
                                                         for c, h, w, s in PIPE_CASES])
def test_pipelined_tile_loops(interpreter_range_bounds, C, H, W, split):
    """The element-wise jobs' tile loops as `tl.range` loops (PIPE = AGG_PIPE_STAGES, the tuning candidate) give the
    plain loops' result: Q, V, KV and the pre-projection within FP32_TOL of float64, every buffer written."""
    case = Case(C, H, W, 1, seed=C + H + 5)
    shape = gma_shape(C, agg_block_p=16, split_target=1, split=split, pipe=launcher.AGG_PIPE_STAGES)
    plan = aggregation.job_plan(H * W, 1, shape, "tf32x3")
    assert plan.tiles_per_split[0] >= 3 and (not split or max(plan.tiles_per_split[1:4]) >= 2), plan
    _, launches = launcher.plan_pre_projection(case.qkv(torch.float32), H, W, case.folded(torch.float32),
                                               case.hp.scale, case.hp.ln_eps, shape=shape)
    assert [kw.get("PIPE") for k, _, _, kw in launches if k.__name__ == "gma_aggregate_kernel"] == [shape.AGG_PIPE]
    _check_launch(case, shape)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's tl.range shim")
def test_dense_z_pass_pipelined_tap_loop(interpreter_range_bounds, monkeypatch):
    """The dense Z pass's tap loop as the GPU runs it, a `tl.range` (PIPE = DENSE_Z_STAGES): Q, V, KV and the
    pre-projection within FP32_TOL of float64, every buffer written (s = 12 padded to 16, two programs an image,
    the second ragged); under the interpreter without the shim the launch asks for the plain loop."""
    case = Case(60, 13, 17, 2, seed=41)
    shape = gma_shape(60, split=True, zdense=True)
    qkv = case.qkv(torch.float32)
    plain = launcher.plan_pre_projection(qkv, 13, 17, case.folded(torch.float32), case.hp.scale, case.hp.ln_eps,
                                         shape=shape)[1][0]
    assert plain[0] is dense_z.gma_dense_z_kernel and plain[3]["PIPE"] == 0 and plain[1][0] == 2
    monkeypatch.setattr(dense_z, "interpreting", lambda: False)
    piped = launcher.plan_pre_projection(qkv, 13, 17, case.folded(torch.float32), case.hp.scale, case.hp.ln_eps,
                                         shape=shape)[1][0]
    assert piped[3]["PIPE"] == config.DENSE_Z_STAGES > 0
    _check_launch(case, shape)


def test_interpreter_runs_the_plain_tile_loops():
    """Under the interpreter (no shim) the aggregation gets PIPE 0 whatever the tiles say: tl.range's runtime bounds
    fail there."""
    case = Case(80, 4, 5, 1, seed=3)
    shape = gma_shape(80, split=True, pipe=2)
    _, launches = launcher.plan_pre_projection(case.qkv(torch.float32), 4, 5, case.folded(torch.float32),
                                               case.hp.scale, case.hp.ln_eps, shape=shape)
    agg = [kw for k, _, _, kw in launches if k.__name__ == "gma_aggregate_kernel"]
    assert agg and agg[0]["PIPE"] == (0 if INTERPRET else 2)


#: (C, H, W, B, dtype, GPU tiles?, ZDENSE variant) of the fused forward (`GMAShape.AGG_FUSED`): s = 8, 16, 32, 64 (d =
#: 4 .. 32), the interpreter's one tile and the GPU tiles (several programs an image, the last ragged), grids smaller
#: than the 7x7 window, batch 1 to 3, fp32 and the 16-bit dots of fp16 / bf16
FUSED_CASES = [(40, 5, 7, 2, torch.float32, False, 1), (80, 13, 11, 1, torch.bfloat16, True, 1),
               (160, 12, 13, 1, torch.float16, True, 2), (320, 3, 5, 3, torch.bfloat16, False, 1),
               (80, 9, 8, 2, torch.float32, True, 2)]


@pytest.mark.parametrize("C,H,W,B,dtype,gpu_tiles,zdense", FUSED_CASES,
                         ids=[f"C{c}-{h}x{w}-B{b}-{str(d)[6:]}-{'gpu' if g else 'interp'}-dense{z}"
                              for c, h, w, b, d, g, z in FUSED_CASES])
def test_fused_forward(monkeypatch, C, H, W, B, dtype, gpu_tiles, zdense):
    """The fused forward (the "triton.aggregate" candidate FUSED, `dense_z.gma_dense_aggregate_kernel`): the dense Z
    pass with the aggregation's work done on its registers (BatchNorm, hardswish, the proxies, the softmax partials
    one row per segment and tile; the local branch's LayerNorm), then combine and attention: three launches, no Z
    buffer. fp32: Q, V, KV and the pre-projection within FP32_TOL of float64, every buffer written; fp16 / bf16: the
    layer within 2x the reference's own error."""
    case = Case(C, H, W, B, seed=C + 13 * H + B)
    shape = (gma_shape(C, split=True, zdense=zdense, fused=True) if gpu_tiles else
             gma_shape(C, interpreter=INTERPRET, split=True, zdense=zdense, fused=True))
    _, launches = launcher.plan_pre_projection(case.qkv(dtype), H, W, case.folded(dtype), case.hp.scale,
                                               case.hp.ln_eps, shape=shape)
    assert [k.__name__ for k, *_ in launches] == ["gma_dense_aggregate_kernel", "gma_combine_kernel",
                                                  "gma_attention_kernel"]
    tile = dense_z.fused_tile(C, zdense, launcher.dot_variant(case.qkv(dtype)).precision)
    (grid, kw), T = launches[0][1:4:2], -(-H * W // tile[0])
    assert grid == (T, dense_z.FUSED_PROGRAMS, B) and (kw["BLOCK_P"], kw["num_warps"]) == tile
    assert launches[1][2][-4:] == (T, T, T, T)      # the combine: a partial row per segment and tile
    if gpu_tiles:
        assert T >= 2, "several tiles an image"
    _check_shape_at(monkeypatch, case, shape, dtype, f"{dtype} fused forward C={C}")


def test_fused_forward_refuses_without_its_dense_pass():
    with pytest.raises(ValueError, match="needs split=True and zdense"):
        gma_shape(80, split=True, fused=True)


def test_split_forward_is_a_candidate_and_not_the_training_forward():
    """SPLIT is the first knob of every width's "triton.aggregate" search space (timed before a deadline cuts the
    list), with the stencil knobs it makes moot set to one value, then its Z pass on tensor cores where that
    applies (`config.zdense_applies`: not on sm_75's FMA dots, not fp32 at s = 64), then pipelined; the training
    forward (`config.from_planes`) drops both, and a batch whose 3B images pass the grid's limit runs the default
    forward (no Z pass) instead."""
    for C in MODEL_WIDTHS:
        for dtype, cap in ((torch.float32, (9, 0)), (torch.bfloat16, (9, 0)), (torch.float16, (7, 5))):
            cands = launcher.aggregate_candidates(C, dtype, cap)
            split = [c for c in cands if c["SPLIT"]]
            dense = config.zdense_applies(C, config.dtype_name(dtype), config.dot_precision(config.dtype_name(dtype),
                                                                                            cap))
            assert dense == (cap >= (8, 0) and (C // 5 <= 32 or (C // 5 <= 64 and dtype != torch.float32)))
            variants = (1, 2) if dense and dtype != torch.float32 else (1,) if dense else ()
            assert len(split) == 2 + 2 * len(variants) and cands.index(split[0]) == 4, (C, dtype)
            for i, v in enumerate(variants, start=1):   # its two tile tables for 16-bit operands, then fused
                assert split[i] == {**split[0], "ZDENSE": v} and split[0]["ZDENSE"] == 0
                assert split[i + len(variants)] == {**split[i], "FUSED": 1} and not split[i]["FUSED"]
                for cfg in (split[i], split[i + len(variants)]):
                    sh = launcher.shape_from_configs(C, launcher.DotVariant("tf32", False), cfg,
                                                     launcher.attention_default(C, dtype, cap))
                    assert sh.AGG_ZDENSE == v and sh.AGG_SPLIT and sh.AGG_FUSED == bool(cfg["FUSED"])
                    assert not (config.from_planes(sh, "tf32").AGG_ZDENSE or config.from_planes(sh, "tf32").AGG_FUSED)
            assert split[-1] == {**split[0], "PIPE": launcher.AGG_PIPE_STAGES} and split[0]["PIPE"] == 0   # pipelined
            assert (split[0]["PAIR"], split[0]["ROWS"], split[0]["MERGE"]) == (0, 0, 1)
            sh = launcher.shape_from_configs(C, launcher.DotVariant("tf32", False), split[0],
                                             launcher.attention_default(C, dtype, (9, 0)))
            assert sh.AGG_SPLIT and not config.from_planes(sh, "tf32").AGG_SPLIT
    sh = gma_shape(80, split=True)
    qkv = torch.empty(config.MAX_GRID_BATCH // 3 + 1, 16, 240, device="meta")
    weights = meta_weights(80)
    _, launches = launcher.plan_pre_projection(qkv, 4, 4, weights, 0.25, 1e-5, shape=sh,
                                               dots=launcher.DotVariant("tf32", False))
    assert [k.__name__ for k, *_ in launches][0] == "gma_aggregate_kernel"


def test_forward_from_planes_gpu_tiles_and_chunks(monkeypatch):
    """The GPU tiles (several tiles a program, splits balanced as from-planes jobs cost: `aggregate_job_costs`)
    and a batch beyond the grid limit (chunks of the planes' streams: limit 2, B = 5)."""
    case = Case(80, 9, 9, 5, seed=77)
    qkv, f, z = _kept_planes(case, torch.float32)
    shape = config.from_planes(gma_shape(80))
    plan = aggregation.job_plan(81, 5, shape, "tf32x3")
    assert shape.AGG_FROM_Z and plan.tiles >= 2 and len(set(plan.splits[:4])) == 1   # jobs 0-3 cost the same
    r = launcher.launch_pre_projection(qkv, 9, 9, f, case.hp.scale, case.hp.ln_eps, shape=gma_shape(80),
                                       planes=launcher.planes_view(z, 5))
    _assert_rel(r["pre"], case.pre, FP32_TOL, "pre_proj, GPU tiles")
    whole = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, 9, 9, list(f), case.hp.scale, case.hp.ln_eps)
    seen = []
    launch = op.launch_pre_projection

    def recording(qkv, *args, **kwargs):
        seen.append((qkv.shape[0], tuple(kwargs["planes"].shape)))
        return launch(qkv, *args, **kwargs)

    monkeypatch.setattr(op, "launch_pre_projection", recording)
    monkeypatch.setattr(config, "MAX_GRID_BATCH", 2)
    out, w4, xh4, rstd4, *kept = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, 9, 9, list(f), case.hp.scale,
                                                                                  case.hp.ln_eps)
    assert w4.shape == (5, 48, 9, 9) and xh4.shape == (5, 16, 9, 9) and rstd4.shape == (5, 1, 9, 9)
    assert [t.shape for t in kept] == [(5, 64, 9, 9), (5, 64, 8), (5, 64), (5, 64)]
    for name, a, b in zip(op.KEPT_OUTPUTS, (out, w4, xh4, rstd4, *kept), whole):     # chunks as the whole batch
        _assert_rel(a, b, FP32_TOL, f"{name}, chunked against whole")
    assert seen == [(2, (3, 2, 64, 81)), (2, (3, 2, 64, 81)), (1, (3, 1, 64, 81))]
    _assert_rel(out, case.pre, FP32_TOL, "pre_proj, chunked batch")


def test_forward_from_planes_reads_the_local_branchs_z(monkeypatch):
    """The training forward after the dense statistics pass (`dense_z.dense_statistics_planes`): the aggregation
    reads the local branch's Z that pass computed (zl; `GMAShape.local_from_z`, LOCAL_Z) instead of running its
    stencil and mix, keeping no w4 (the dense backward reads none). Its outputs and what it keeps (xh4, rstd4 and the
    attention's) equal those of the same forward running the branch itself, at the GPU tiles, over a batch in
    chunks beyond the grid limit (limit 2, B = 3: zl chunked with the planes); a zl scaled by 2 changes the output
    (the kernel reads it); and zl is refused with w4 kept, at the wrong shape, or with a shape that does not read it."""
    case = Case(80, 9, 9, 3, seed=78)
    qkv, f, z = _kept_planes(case, torch.float32)
    zl = dense_z.dense_z_moments(qkv, 9, 9, f.dw3, f.dw5, f.dw7, f.pw, f.local_dw, f.local_pw)[2]
    args = (9, 9, list(f), case.hp.scale, case.hp.ln_eps)
    ref = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, *args, False)
    agg = []
    launch = launcher._launch.wrap_triton

    def spy(kernel):
        if (getattr(kernel, "__name__", None) or kernel.fn.__name__) == "gma_aggregate_kernel":
            class Recorded:
                def __getitem__(self, grid):
                    def go(*a, **kw):
                        agg.append(kw)
                        return kernel[grid](*a, **kw)
                    return go
            return Recorded()
        return launch(kernel)
    monkeypatch.setattr(launcher._launch, "wrap_triton", spy)
    monkeypatch.setattr(config, "MAX_GRID_BATCH", 2)
    got = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, *args, False, zl)
    assert [kw.get("LOCAL_Z") for kw in agg] == [True] * 2 and all(kw["KEEP_W4"] is False for kw in agg)   # 2 chunks
    assert got[1].numel() == 0 and ref[1].numel() == 0          # no w4 either way
    for name, a, b in zip(op.KEPT_OUTPUTS, got, ref):
        if name != "w4":
            _assert_rel(a, b, FP32_TOL, f"{name}: local branch's Z read against computed")
    _assert_rel(got[0], case.pre, FP32_TOL, "pre_proj with the local branch's Z read")
    scaled = torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, *args, False, 2 * zl)
    s = 80 // 5
    assert not torch.allclose(scaled[0][..., 4 * s:], got[0][..., 4 * s:])
    with pytest.raises(ValueError, match="keep_w4 False"):
        torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, *args, True, zl)
    with pytest.raises(ValueError, match="local branch's Z"):
        torch.ops.gmf.triton_pre_projection_from_planes(qkv, z, *args, False, zl[:, :8])
    with pytest.raises(ValueError, match="local_from_z"):
        sh = gma_shape(80, interpreter=True)
        aggregation.aggregate_call(qkv, 9, 9, f, 1e-5, sh, aggregation.job_plan(81, 5, sh, "tf32x3"),
                                   *([None] * 6), None, zl=zl)


def test_forward_from_planes_refuses_bad_planes():
    case = Case(40, 3, 5, 2, seed=5)
    qkv, f, z = _kept_planes(case, torch.float32)
    args = (3, 5, list(f), case.hp.scale, case.hp.ln_eps)
    for bad in (z[:3], z.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, :5].contiguous()[:, :16],
                z.transpose(0, 1).contiguous().transpose(0, 1)):
        with pytest.raises(ValueError, match="planes"):
            torch.ops.gmf.triton_pre_projection_from_planes(qkv, bad, *args)
    with pytest.raises(TypeError, match="planes"):
        torch.ops.gmf.triton_pre_projection_from_planes(qkv, z.half(), *args)
    with pytest.raises(ValueError, match="AGG_FROM_Z"):       # planes with a shape that does not read them
        aggregation.aggregate_call(qkv, 3, 5, f, 1e-5, gma_shape(40, interpreter=True),
                                   aggregation.job_plan(15, 2, gma_shape(40, interpreter=True), "tf32x3"),
                                   *([None] * 6), None, z=launcher.planes_view(z, 2))
