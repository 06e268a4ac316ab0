"""Training cases shared by the fused backends' training tests (test_triton_training.py,
test_cuda_training.py): a layer with non-trivial running statistics, one run of it through
`gmf_kernels.group_mix_attention` (forward steps, then one backward), and the comparison."""
import copy

import torch

import gmf_kernels
from gmf_kernels.folding import fold_batch_stats
from gmf_kernels.numerics import cast_weights, default_hyper, random_gma_weights
from helpers import assert_max_rel_close as assert_rel
from helpers import BUFFER_FIELDS, PARAM_FIELDS, max_rel_error, named_fields, skip_unless_supported


def make(C, H, W, B, seed=0, device="cpu"):
    """float64 weights with non-trivial running statistics and an input x (B, H*W, C), on `device`."""
    w = random_gma_weights(C, seed=1000 * C + 10 * H + W + seed)
    with torch.no_grad():  # non-trivial running statistics (eval mode folds them)
        g = torch.Generator().manual_seed(seed + 5)
        for i in range(4):
            w.bn_running_mean[i].copy_(0.3 * torch.randn(w.bn_running_mean[i].shape, generator=g, dtype=torch.float64))
            w.bn_running_var[i].copy_(0.5 + 1.5 * torch.rand(w.bn_running_var[i].shape, generator=g, dtype=torch.float64))
    x = torch.randn(B, H * W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 11))
    return cast_weights(w, device=device), x.to(device)


def run(backend, x0, size, w, dtype, training, momentum=0.1, steps=1, device=None):
    """`steps` forwards (the running statistics compound), then one backward of the last output
    on a private copy of w on `device` (default: x0's device); returns out, {name: grad},
    {buffer name: tensor}, on the CPU."""
    device = x0.device if device is None else torch.device(device)
    wc = cast_weights(w, dtype, device=device)
    for _, t in named_fields(wc, PARAM_FIELDS):
        t.requires_grad_(True)
    x = x0.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    for _ in range(steps):
        out = gmf_kernels.group_mix_attention(x, size, wc, training=training, bn_momentum=momentum, backend=backend)
    assert out.device.type == device.type, f"{backend}: output on {out.device}, the call was on {device}"
    params = named_fields(wc, PARAM_FIELDS)
    lw = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * lw.to(dtype=dtype, device=out.device)).sum(), [x] + [t for _, t in params])
    named = {"x": grads[0].cpu(), **{n: g.cpu() for (n, _), g in zip(params, grads[1:])}}
    return out.detach().cpu(), named, {n: t.clone().cpu() for n, t in named_fields(wc, BUFFER_FIELDS)}


def run_mode(backend, x0, size, w, dtype, mode, momentum=0.1, device=None):
    """`run` for mode "grad" (eval with gradients) or "train"; for "eval", one forward under
    no_grad on `device` (default: x0's device): (out, {}, {}) on the CPU."""
    device = x0.device if device is None else torch.device(device)
    if mode == "eval":
        with torch.no_grad():
            out = gmf_kernels.group_mix_attention(x0.to(device, dtype), size, cast_weights(w, dtype, device=device),
                                                  backend=backend)
        return out.cpu(), {}, {}
    return run(backend, x0, size, w, dtype, training=mode == "train", momentum=momentum, device=device)


def compare(got, exp, tol, who):
    assert_rel(got[0], exp[0], tol, f"{who} out")
    assert set(got[1]) == set(exp[1])
    for n in exp[1]:
        assert got[1][n] is not None, f"{who}: no gradient for {n}"
        assert_rel(got[1][n], exp[1][n], tol, f"{who} grad {n}")
    for n in exp[2]:
        if n.startswith("bn_num_batches_tracked"):
            assert torch.equal(got[2][n], exp[2][n]), f"{who} {n}: {got[2][n]} != {exp[2][n]}"
        else:
            assert_rel(got[2][n], exp[2][n], tol, f"{who} buffer {n}")


def _recompute64(w, x, grid, training):
    """The float64 weights and the backward's recompute of the layer on x (BatchNorm from the batch
    statistics in training, else from the running ones): (w64, {pre_act, xh4, rstd4, ...})."""
    from gmf_kernels.folding import _build
    from gmf_kernels.triton_kernels.backward import recompute, statistics
    from gmf_kernels.training import fold_running_stats
    hp = default_hyper(w.dim)
    w64 = cast_weights(w, torch.float64)
    qkv = torch.nn.functional.linear(x.to(torch.float64), w64.qkv_weight, w64.qkv_bias)
    if training:
        z = torch.zeros(1, dtype=torch.float64)
        mean, var, _ = statistics(qkv, *grid, _build(w64, z, z, torch.float64))
        folded = fold_batch_stats(w64, mean, var, hp, torch.float64)
    else:
        folded = fold_running_stats(w64, hp, torch.float64)
    return w64, recompute(qkv, *grid, folded, hp.ln_eps)


def kink_distance(w, x, grid, training):
    """min distance of every float64 pre-activation (the aggregator's BatchNorm output, the
    local branch's LayerNorm output) to +-3, where hardswish's derivative jumps (1.5 -> 1 at 3,
    0 -> -0.5 at -3)."""
    w64, rc = _recompute64(w, x, grid, training)
    local = rc["xh4"] * w64.local_ln_weight[:, None, None] + w64.local_ln_bias[:, None, None]
    return min(((t.abs() - 3).abs().min().item()) for t in (rc["pre_act"], local))


def local_norm_condition(w, x, grid):
    """How much more the local branch's LayerNorm amplifies rounding at its worst token than at its median
    one, in float64: max over tokens of 1/sqrt(var + eps) over its median (rstd4 of the backward's recompute).
    The LayerNorm runs over s = C/5 channels: at s = 2 (C = 10) two nearly equal channels make a token's
    gradient up to 1/sqrt(eps) ~ 316 times as sensitive; over random draws the median of this ratio is ~23 at
    C = 10 and at most ~7 at C = 20-40 (2026-12-06). The LayerNorm is per token: the BatchNorm mode does
    not change it."""
    rstd = _recompute64(w, x, grid, False)[1]["rstd4"].flatten()
    return (rstd.max() / rstd.median()).item()


FP32_TOL = 1e-5


def check_train_float32(backend, C, grid, B, momentum, steps, device="cpu"):
    """float32 training against the float64 reference: output, every gradient, running statistics
    (the backend runs on `device`, the float64 reference on the CPU)."""
    skip_unless_supported(backend, training=True, needs_grad=True, dtype=torch.float32, device_type=device)
    w, x = make(C, *grid, B)
    exp = run("reference", x, grid, w, torch.float64, True, momentum, steps)
    got = run(backend, x, grid, w, torch.float32, True, momentum, steps, device)
    compare(got, exp, FP32_TOL, f"{backend} train C{C}")
    assert int(got[2]["bn_num_batches_tracked[0]"]) == steps
    assert not torch.equal(got[2]["bn_running_mean[2]"], w.bn_running_mean[2].float())


def check_eval_with_gradients_float32(backend):
    """Eval mode with gradients (BatchNorm from running statistics; buffers untouched)."""
    skip_unless_supported(backend, needs_grad=True, dtype=torch.float32)
    C, grid, B = 80, (5, 6), 1
    w, x = make(C, *grid, B)
    exp = run("reference", x, grid, w, torch.float64, False)
    got = run(backend, x, grid, w, torch.float32, False)
    compare(got, exp, FP32_TOL, f"{backend} eval+grad")
    for n, t in named_fields(w, BUFFER_FIELDS):
        assert torch.equal(got[2][n], t.to(got[2][n].dtype)), f"eval changed {n}"


#: fresh draws (layer and input) the low-precision rule averages its errors over
LOW_PRECISION_DRAWS = 3


def check_low_precision(backend, dtype, training, C, grid, B):
    """Output, every gradient and (training) the running statistics within 2x the reference's own
    error at that dtype (+ floor), each error (max |x - oracle| / max |oracle|) averaged over
    LOW_PRECISION_DRAWS fresh draws of the layer and the input.

    Why an average: at these sizes (90 values per BatchNorm channel at C = 80, 5x6, batch 1) a
    parameter gradient is a sum with cancellation, returned in the layer's dtype, so one draw's
    error is a matter of one or two ulps of one element, on both sides: measured (bfloat16
    training, 2026-12-02, 8 draws each) the worst ratio over a layer's tensors of (error - floor)
    to the reference's error was 0.86-2.73 with float32 stage tensors (2.73 at draw 1,
    local_ln_weight) and 1.13-2.63 with bfloat16 ones (2.63 at draw 0, bn_weight[3]): a single
    draw decided the check by luck, whichever the implementation.

    The gradient is discontinuous where a pre-activation crosses +-3 (hardswish's derivative
    jumps there): a pre-activation within a rounding error of +-3 takes either side, in any
    implementation (measured: rounding only the BatchNorm weights of a random layer to bfloat16
    moves the exact float64 qkv gradient by 6e-2 relative). So the layer here has its
    BatchNorm and LayerNorm weights halved, which keeps most pre-activations away from +-3, and
    a draw with one within 0.05 of it is skipped for the next (the rule then holds for every
    gradient)."""
    skip_unless_supported(backend, training=training, needs_grad=True, dtype=dtype)
    errors = {}                       # name -> [our errors], [the reference's errors]
    draws, seed = 0, -1
    while draws < LOW_PRECISION_DRAWS:
        seed += 1
        assert seed < 3 * LOW_PRECISION_DRAWS, "too few draws away from the kinks"
        w, x = make(C, *grid, B, seed=seed)
        with torch.no_grad():
            for t in w.bn_weight:
                t.mul_(0.5)
            w.local_ln_weight.mul_(0.5)
        if kink_distance(w, x, grid, training) <= 0.05:
            continue                  # a pre-activation near +-3: the next draw
        draws += 1
        oracle = run("reference", x, grid, w, torch.float64, training)
        ref_lp = run("reference", x, grid, w, dtype, training)
        got = run(backend, x, grid, w, dtype, training)
        assert got[0].dtype == dtype
        pairs = [(f"out {dtype}", got[0], ref_lp[0], oracle[0])]
        pairs += [(f"grad {n} {dtype}", got[1][n], ref_lp[1][n], oracle[1][n]) for n in oracle[1]]
        pairs += [(f"{n} {dtype}", got[2][n], ref_lp[2][n], oracle[2][n]) for n in oracle[2]
                  if not n.startswith("bn_num_batches_tracked")]
        for name, a, r, o in pairs:
            assert a.shape == o.shape and bool(torch.isfinite(a).all()), name
            e = errors.setdefault(name, ([], []))
            e[0].append(max_rel_error(a, o))
            e[1].append(max_rel_error(r, o))
    for name, (ours, ref) in errors.items():
        err, ref_err = sum(ours) / len(ours), sum(ref) / len(ref)
        floor = 1e-5 if name.startswith("out ") else 1e-3
        assert err <= 2.0 * ref_err + floor, (f"{name}: mean relative error over {len(ours)} draws {err:.3e} > "
                                              f"2 x the reference's {ref_err:.3e} + {floor:g} (per draw: "
                                              f"{[f'{v:.2e}' for v in ours]} against {[f'{v:.2e}' for v in ref]})")


def check_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) of a training step (aot_eager: AOTAutograd traces the
    backend's autograd.Function and ops) against the float64 reference module."""
    skip_unless_supported(backend, training=True, needs_grad=True, dtype=torch.float32)
    C, grid = 40, (4, 5)
    torch.manual_seed(1)
    m = gmf_kernels.GroupMixAttention(C, 8, qkv_bias=True, backend=backend).train()
    mr = copy.deepcopy(m).double().set_backend("reference")
    x = torch.randn(1, 20, C)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: m(t, grid), fullgraph=True, backend="aot_eager")
    xx, xr = x.clone().requires_grad_(True), x.double().clone().requires_grad_(True)
    out, ref = fn(xx), mr(xr, grid)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_rel(out, ref, FP32_TOL, f"{backend} compiled out")
    assert_rel(xx.grad, xr.grad, FP32_TOL, f"{backend} compiled x grad")
    for (n, p), (_, pr) in zip(m.named_parameters(), mr.named_parameters()):
        assert p.grad is not None, n
        assert_rel(p.grad, pr.grad, FP32_TOL, f"{backend} compiled grad {n}")
    for (n, b), (_, br) in zip(m.named_buffers(), mr.named_buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, br), n
        else:
            assert_rel(b, br, FP32_TOL, f"{backend} compiled buffer {n}")
