"""Training and gradients on the Triton backend (issue 10, items 1, 3 and 5; stage 1).

The training forward is a statistics pass (PyTorch ops) + the eval Triton kernels on weights
folded from the batch statistics; the backward is `triton_kernels/backward.py` (PyTorch ops,
stage by stage). Checked here, the kernels through the Triton interpreter on CPU, against the
float64 reference backend:

* the backward stages alone, float64 (no Triton): against autograd of the reference
  pre-projection at 1e-10, training (batch statistics) and eval (running statistics);
* float32 end to end: output, input gradient, every parameter gradient, running statistics and
  num_batches_tracked (momentum 0.1 and the cumulative average over two steps), odd grids,
  batch 1, within 1e-5 relative (max |a - e| / max |e|);
* eval mode with gradients (BatchNorm from running statistics; buffers untouched);
* float16 and bfloat16 (training; bfloat16 also eval with gradients): output and every gradient
  within 2x the reference's own error at that dtype (+ floor);
* the train-mode golden vectors of ../shared/golden/gma_module.pt (float32, 1e-5);
* SyncBatchNorm: two gloo processes against one process on the whole batch are checked for
  every fused backend in tests/test_syncbn.py (`test_fused_backends_two_processes_float32`);
* torch.utils.checkpoint and torch.compile(fullgraph=True) (aot_eager: AOTAutograd traces the
  autograd.Function; Inductor was checked by hand, it takes ~50 s on CPU).
"""
import copy

import pytest
import torch

import gmf_kernels
from conftest import golden_path
from gmf_kernels.backends import get_backend
from gmf_kernels.folding import compute_dtype, fold_batch_stats
from gmf_kernels.numerics import cast_weights, default_hyper
from gmf_kernels.reference import reference_pre_projection
from helpers import assert_max_rel_close as assert_rel
from helpers import PARAM_FIELDS, named_fields, problem, record_calls, skip_unless_supported
from training_cases import (FP32_TOL, check_compile_fullgraph, check_eval_with_gradients_float32, check_low_precision,
                            check_train_float32, make)

FP64_TOL = 1e-10


# ------------------------------------------------------------------ the stages alone (no Triton)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("C, grid, B", [(80, (7, 9), 2), (40, (5, 6), 1), (200, (4, 11), 2)],
                         ids=["C80-7x9-B2", "C40-5x6-B1", "C200-4x11-B2"])
def test_backward_stages_match_autograd_float64(C, grid, B, training):
    """`backward.pre_projection_backward` (float64) against autograd through the reference
    pre-projection: qkv gradient and the gradient of every parameter, reached through the
    (differentiable) folding exactly as the Triton path does."""
    from gmf_kernels.triton_kernels.backward import pre_projection_backward, statistics
    from gmf_kernels.training import fold_running_stats
    from gmf_kernels.folding import _build

    H, W = grid
    hp = default_hyper(C)
    w, _ = make(C, H, W, B)
    w = cast_weights(w)
    params = named_fields(w, PARAM_FIELDS[4:])  # the pre-projection's parameters
    for _, t in params:
        t.requires_grad_(True)
    t = torch.randn(B, H * W, 3 * C, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, H * W, C, dtype=torch.float64)
    ref, _ = reference_pre_projection(t, grid, w, hp, training)
    expected = torch.autograd.grad((ref * g).sum(), [t] + [p for _, p in params])

    cd = compute_dtype(t.dtype)
    if training:
        with torch.no_grad():
            z = torch.zeros(1, dtype=cd)
            mean, var, n = statistics(t, H, W, _build(w, z, z, cd))
            rstd = torch.rsqrt(var + hp.bn_eps)
        folded = fold_batch_stats(w, mean, var, hp, cd)
    else:
        mean = rstd = None
        folded = fold_running_stats(w, hp, cd)
    d_qkv, d_folded = pre_projection_backward(g, t.detach(), H, W, type(folded)(*[f.detach() for f in folded]),
                                              hp.scale, hp.ln_eps, mean, rstd)
    # the folded weights' gradients back to the parameters, through the folding
    got = torch.autograd.grad(list(folded), [p for _, p in params], list(d_folded))
    assert_rel(d_qkv, expected[0], FP64_TOL, "qkv grad")
    for (name, _), gg, ee in zip(params, got, expected[1:]):
        assert_rel(gg, ee, FP64_TOL, f"grad {name}")


# ------------------------------------------------------------------ end to end, Triton interpreter
@pytest.mark.parametrize("C, grid, B, momentum, steps", [(200, (3, 5), 2, 0.1, 1), (40, (5, 11), 1, None, 2)],
                         ids=["C200-3x5-B2", "C40-5x11-B1-cma-2steps"])
def test_train_float32(C, grid, B, momentum, steps):
    check_train_float32("triton", C, grid, B, momentum, steps)


def test_eval_with_gradients_float32():
    check_eval_with_gradients_float32("triton")


@pytest.mark.parametrize("dtype, training, C, grid, B", [(torch.float16, True, 40, (7, 9), 2),
                                                        (torch.bfloat16, True, 40, (7, 9), 2),
                                                        (torch.bfloat16, True, 80, (5, 6), 1),
                                                        (torch.float16, True, 80, (5, 6), 1),
                                                        (torch.bfloat16, False, 80, (5, 6), 1)],
                         ids=["float16-train-C40-7x9-B2", "bfloat16-train-C40-7x9-B2", "bfloat16-train-C80-5x6-B1",
                              "float16-train-C80-5x6-B1", "bfloat16-eval-C80-5x6-B1"])
def test_low_precision(dtype, training, C, grid, B):
    """`training_cases.check_low_precision`: training at both dtypes and both shapes (two batches, s = 8 and
    16), eval with gradients at one (~17 s a case under the interpreter: the suite's time)."""
    check_low_precision("triton", dtype, training, C, grid, B)


# ------------------------------------------------------------------ golden train-mode vectors
GOLDEN = torch.load(golden_path("gma_module.pt"), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("case", GOLDEN, ids=[f"C{c['dim']}-B{c['B']}-{c['H']}x{c['W']}" for c in GOLDEN])
def test_golden_train_float32(case):
    skip_unless_supported("triton", training=True, needs_grad=True, dtype=torch.float32)
    m = gmf_kernels.GroupMixAttention(case["dim"], 8, qkv_bias=True, backend="triton").double()
    m.load_state_dict(case["state_dict"], strict=True)
    m = m.float().train()
    x = case["x"].float().clone().requires_grad_(True)
    out = m(x, (case["H"], case["W"]))
    assert_rel(out, case["train_out"], FP32_TOL, "golden train out")
    (out * case["train_loss_weight"].float()).sum().backward()
    assert_rel(x.grad, case["train_x_grad"], FP32_TOL, "golden x grad")
    params = dict(m.named_parameters())
    assert set(case["train_param_grads"]) == set(params)
    for name, expected in case["train_param_grads"].items():
        assert params[name].grad is not None, f"no gradient for {name}"
        assert_rel(params[name].grad, expected, FP32_TOL, f"golden grad {name}")
    buffers = dict(m.named_buffers())
    for name, expected in case["train_buffers_after"].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers[name], expected), name
        else:
            assert_rel(buffers[name], expected, FP32_TOL, f"golden buffer {name}")


# ------------------------------------------------------------------ checkpoint and compile
def _module(C, seed=0):
    torch.manual_seed(seed)
    return gmf_kernels.GroupMixAttention(C, 8, qkv_bias=True, backend="triton").train()


def test_activation_checkpointing():
    skip_unless_supported("triton", training=True, needs_grad=True, dtype=torch.float32)
    from torch.utils.checkpoint import checkpoint
    C, grid = 40, (4, 5)
    m = _module(C)
    mr = copy.deepcopy(m).double().set_backend("reference")
    x = torch.randn(1, 20, C)
    outs = {}
    for name, mod, xx in (("ckpt", m, x.clone().requires_grad_(True)),
                          ("reference", mr, x.double().clone().requires_grad_(True))):
        if name == "ckpt":
            out = checkpoint(lambda t: mod(t, grid), xx, use_reentrant=False)
        else:
            out = mod(xx, grid)
        out.square().sum().backward()
        outs[name] = (out.detach(), xx.grad, {n: p.grad for n, p in mod.named_parameters()})
    assert_rel(outs["ckpt"][0], outs["reference"][0], FP32_TOL, "checkpoint out")
    assert_rel(outs["ckpt"][1], outs["reference"][1], FP32_TOL, "checkpoint x grad")
    for n, g in outs["reference"][2].items():
        assert outs["ckpt"][2][n] is not None, n
        assert_rel(outs["ckpt"][2][n], g, FP32_TOL, f"checkpoint grad {n}")


def test_compile_fullgraph():
    check_compile_fullgraph("triton")


def test_op_registered_autograd():
    """``gmf::triton_pre_projection`` called directly: its registered backward (the BatchNorms a
    fixed affine) gives the qkv gradient of the eval-mode reference, and weight gradients equal
    to the float64 stages'."""
    skip_unless_supported("triton", needs_grad=True, dtype=torch.float32)
    from gmf_kernels.folding import fold_eval
    from gmf_kernels.triton_kernels import op  # noqa: F401
    from gmf_kernels.triton_kernels.backward import pre_projection_backward
    C, grid, B = 40, (4, 5), 2
    hp = default_hyper(C)
    w, _ = make(C, *grid, B)
    t64 = torch.randn(B, 20, 3 * C, dtype=torch.float64)
    g64 = torch.randn(B, 20, C, dtype=torch.float64)
    qkv = t64.float().requires_grad_(True)
    weights = [f.requires_grad_(True) for f in fold_eval(w, hp, torch.float32)]
    pre = torch.ops.gmf.triton_pre_projection(qkv, *grid, weights, hp.scale, hp.ln_eps)
    grads = torch.autograd.grad((pre * g64.float()).sum(), [qkv] + weights)
    t_ref = t64.clone().requires_grad_(True)
    ref, _ = reference_pre_projection(t_ref, grid, cast_weights(w), hp, False)
    assert_rel(pre, ref, FP32_TOL, "op out")
    assert_rel(grads[0], torch.autograd.grad((ref * g64).sum(), t_ref)[0], FP32_TOL, "op qkv grad")
    _, exp = pre_projection_backward(g64, t64, *grid, fold_eval(w, hp, torch.float64), hp.scale, hp.ln_eps)
    for name, got, e in zip(exp._fields, grads[1:], exp):
        assert_rel(got, e, FP32_TOL, f"op grad {name}")
    # `loss.backward()` inside autocast: the registered backward keeps its own precision
    pre = torch.ops.gmf.triton_pre_projection(qkv, *grid, weights, hp.scale, hp.ln_eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = torch.autograd.grad((pre * g64.float()).sum(), [qkv] + weights)
    for name, got, e in zip(("qkv",) + exp._fields, again, grads):
        assert got.dtype == e.dtype, name
        assert_rel(got, e, FP32_TOL, f"op grad {name} with autocast on in the backward")


# ------------------------------------------------------------------ declared support
def test_declared_support():
    be = get_backend("triton")
    assert be.supports_training and be.supports_grad
    assert be.supports_sync_bn
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert not be.not_supported_reasons(problem(training=True, needs_grad=True, dtype=dt)), dt
        assert not be.not_supported_reasons(problem(needs_grad=True, dtype=dt)), dt
    assert any("training mode in float64" in r or "dtype float64" in r
               for r in be.not_supported_reasons(problem(training=True, dtype=torch.float64)))
    assert not be.not_supported_reasons(problem(training=True, needs_grad=True, sync_bn=True))


def _saved_bytes(module, B, H, W, C) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one training forward."""
    x = torch.randn(B, H * W, C, requires_grad=True)
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, (H, W))
    return sum(storages.values())


@pytest.mark.parametrize("C, grid", [(40, (5, 7)), (80, (4, 5))])
def test_activation_memory_per_image(C, grid):
    """Issue 10 item 2 (activation memory per image against eager's), measured with autograd's
    saved-tensor hooks, per image = (saved(B=2) - saved(B=1)): the Triton layer keeps x and
    qkv (for the linears and the recompute), the pre-projection tokens (for `proj`), the planes
    the statistics pass kept for the backward (Z, 12 s = 2.4 C, and the depthwise outputs y, 9 s =
    1.8 C, per token: statistics.py, "Planes kept for the backward") and what the forward's local branch
    kept (w4, 3 s = 0.6 C, xh4, s = 0.2 C, and rstd4, one fp32 value per token) and its attention's (R,
    4 s = 0.8 C per token, and per image kv, k_max, k_sum, C' (d + 2) fp32 values: `config.from_planes`):
    1 + 3 + 1 + 4.2 + 0.8 + 0.8 = 10.8 N*C values per image, + N + C' (d + 2); the reference backend
    (upstream's eager structure) keeps about 18-20 (measured 18.3 at C = 80, 160, 320; 19.9 at C = 40):
    1.7-1.8x more; the torch backend about 23.5."""
    H, W = grid
    per_image = {}
    for backend in ("reference", "triton"):
        skip_unless_supported(backend, B=1, H=H, W=W, dim=C, training=True, needs_grad=True)
        m = gmf_kernels.GroupMixAttention(C, num_heads=8, qkv_bias=True, backend=backend).train()
        per_image[backend] = (_saved_bytes(m, 2, H, W, C) - _saved_bytes(m, 1, H, W, C)) / (H * W * C * 4)
    cp, d = 4 * C // 5, C // 10
    assert per_image["triton"] <= 10.8 + 1 / C + cp * (d + 2) / (H * W * C) + 1e-9, per_image
    assert per_image["reference"] >= 1.65 * per_image["triton"], per_image


@pytest.mark.parametrize("C, grid, B, capability", [(80, (5, 6), 1, None), (400, (3, 4), 1, None),
                                                    (400, (3, 4), 1, (7, 5))],
                         ids=["C80-kernels", "C400-kernels-unfused-B3", "C400-sm75-pytorch-stages"])
def test_backward_runs_the_triton_kernels(C, grid, B, capability, monkeypatch):
    """The Function's backward runs the Triton backward kernels (attention_backward.py,
    aggregation_backward.py), each stage checked by counting the launcher calls, where
    `config.backward_kernels_take`: C=400 (s=80, S_PAD 128) with B3 unfused (dZ written, then the
    pointwise kernel) on the emulated sm_80; on an emulated sm_75 (FMA dots, where those kernels
    spill at S_PAD 128) the PyTorch stages. The result: float32 training parity."""
    from gmf_kernels.triton_kernels import aggregation_backward as agb
    from gmf_kernels.triton_kernels import attention_backward as ab
    from gmf_kernels.triton_kernels import backward as bw
    calls = []

    def counting(module, name):
        label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
        record_calls(monkeypatch, module, name, lambda *a, **k: label, calls)

    for module, names in ((ab, ("b1_dkv", "b2_proxy_grads")),
                          (agb, ("b3_fused", "b3_dz", "b3_pointwise_depthwise", "local_backward")),
                          (bw, ("b1_dkv", "b2_proxy_grads", "b2_bn_sums", "local_backward"))):
        for name in names:
            counting(module, name)
    monkeypatch.setattr(bw, "TORCH_STAGES", bw.Stages(
        b1_dkv=bw.TORCH_STAGES.b1_dkv, b2_proxy_grads=bw.b2_proxy_grads,
        b2_bn_sums=lambda dP, rc, mean, rstd, wts: bw.b2_bn_sums(dP, rc, mean, rstd),
        b3=bw.TORCH_STAGES.b3, local_backward=bw.local_backward))
    from gmf_kernels.triton_kernels import train_op
    monkeypatch.setattr(train_op, "TORCH_STAGES", bw.TORCH_STAGES)
    if capability is not None:
        from gmf_kernels.triton_kernels import _common
        monkeypatch.setattr(_common, "EMULATED_CAPABILITY", capability)
    fused = record_calls(monkeypatch, agb, "_segments_backward", lambda dz_src, mode, *a, **k: mode)
    check_train_float32("triton", C, grid, B, 0.1, 1)
    if capability is not None:
        expected = {"backward.b1_dkv", "backward.b2_proxy_grads", "backward.b2_bn_sums", "backward.local_backward"}
    else:
        expected = {"attention_backward.b1_dkv", "attention_backward.b2_proxy_grads",
                    "aggregation_backward.b3_fused",
                    "aggregation_backward.local_backward"}
        assert fused == ([2] if C <= 320 else [0]), fused   # dZ formed in the pointwise kernel, or read
    assert set(calls) == expected, calls


#: every kernel of a training step that runs dots (its launches carry DOT_PRECISION); none of the recompute
#: kernels (Z, the softmax statistics, KV and R, the local branch): a training step's backward reads the Z and
#: y the statistics pass kept and what the forward kept
KERNELS_WITH_DOTS = {"gma_statistics_kernel", "gma_aggregate_kernel", "gma_attention_kernel",
                     "gma_b1_dkv_kernel", "gma_b2_attention_kernel", "gma_pw_backward_kernel",
                     "gma_local_backward_kernel"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_backward_dots_follow_the_input_dtype(dtype, monkeypatch):
    """The backward differentiates what the forward computed with the forward's dots
    (`statistics.backward_dots`): in a training step every launch with dots -- the forward, the
    recompute and the backward kernels -- has the precision of the input dtype on the emulated
    GPU (sm_80: 3xTF32 for fp32, one TF32 pass for fp16/bf16), but the statistics pass, fp32
    statistics whatever the input (3xTF32). Launches recorded at the launchers' wrap_triton; every
    kernel with dots is seen. (The result's accuracy: `test_low_precision`.) On a GPU whose tuning
    table picks the forward's DOTS16 candidates the forward kernels may instead run the input's own
    16-bit dots (`config.operand_precision`; the backward's stay as they are)."""
    from gmf_kernels.triton_kernels import _common, _launch, launcher
    from gmf_kernels.triton_kernels import attention_backward as ab
    from gmf_kernels.triton_kernels.config import dot_precision, dtype_name, operand_precision
    from training_cases import run
    seen = []
    real = _launch.wrap_triton

    def recording(kernel):
        def at(grid):
            def launch(*args, **kwargs):
                if "DOT_PRECISION" in kwargs:
                    seen.append((kernel.__name__, kwargs["DOT_PRECISION"]))
                return real(kernel)[grid](*args, **kwargs)
            return launch
        return type("Recorded", (), {"__getitem__": lambda self, grid: at(grid)})()

    for module in (_launch, ab):
        monkeypatch.setattr(module, "wrap_triton", recording)
    skip_unless_supported("triton", training=True, needs_grad=True, dtype=dtype)
    w, x = make(40, 4, 5, 1)
    run("triton", x, (4, 5), w, dtype, True)
    want = dot_precision(dtype_name(dtype), _common.EMULATED_CAPABILITY)
    assert {k for k, _ in seen} == KERNELS_WITH_DOTS, sorted({k for k, _ in seen})
    # on a GPU the forward kernels run what the tuning table chose (DOTS16: the input's 16-bit dots);
    # under the interpreter there is no table
    forward = {"gma_aggregate_kernel": launcher.AGG_FAMILY, "gma_attention_kernel": launcher.ATTN_FAMILY}
    for kernel, precision in seen:
        expected = dot_precision("fp32", _common.EMULATED_CAPABILITY) if kernel == "gma_statistics_kernel" else want
        if kernel in forward and not _common.interpreting():
            from gmf_kernels import tuning
            cfg = tuning.choose(forward[kernel], 40, dtype, torch.cuda.get_device_capability())
            expected = operand_precision(expected, dtype_name(dtype), bool(cfg.get("DOTS16", 0)))
        assert precision == expected, (kernel, precision, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backward_reads_grad_pre_in_its_dtype(dtype, monkeypatch):
    """The Triton stage set takes the layer's output gradient as it comes (`Stages.grad_pre_as_is`):
    B1, B2 and the local branch get their views of it (dA, dL) in the input's dtype and widen the
    loads in registers, so no fp32 copy of it is made (that copy read 2 B and wrote 4 B per
    element, and the kernels then read 4 B instead of 2). The widening is exact: the accuracy is
    `test_low_precision`'s."""
    from gmf_kernels.triton_kernels import aggregation_backward as agb
    from gmf_kernels.triton_kernels import attention_backward as ab
    from training_cases import run
    skip_unless_supported("triton", training=True, needs_grad=True, dtype=dtype)
    seen = []
    record_calls(monkeypatch, ab, "b1_dkv", lambda Q, dA, *a, **k: ("b1", dA.dtype), seen)
    record_calls(monkeypatch, ab, "b2_proxy_grads", lambda dA, *a, **k: ("b2", dA.dtype), seen)
    record_calls(monkeypatch, agb, "local_backward", lambda dL, *a, **k: ("local", dL.dtype), seen)
    w, x = make(40, 4, 5, 1)
    run("triton", x, (4, 5), w, dtype, True)
    assert sorted(seen) == [("b1", dtype), ("b2", dtype), ("local", dtype)], seen


def test_a_padded_qkv_view_is_made_compact_for_the_training_kernels():
    """training.prepare hands the fused Functions a compact qkv when the caller's is a view into a
    wider buffer (its largest offset would pass the numel check_train_size bounds the kernels' 32-bit
    offsets by); a contiguous or merely permuted qkv is passed as it is."""
    from gmf_kernels import training
    from gmf_kernels.numerics import random_gma_weights
    C, H, W, B = 40, 3, 4, 2
    w = cast_weights(random_gma_weights(C, seed=1), torch.float32)
    hp = default_hyper(C)
    wide = torch.randn(B, H * W, 3 * C + 8)
    padded = wide[..., :3 * C]
    assert training.spans_beyond_numel(padded)
    out = training.prepare(padded, (H, W), w, hp, False)[0]
    assert out.is_contiguous() and torch.equal(out, padded)
    dense = torch.randn(B, H * W, 3 * C)
    assert training.prepare(dense, (H, W), w, hp, False)[0] is dense
    permuted = torch.randn(H * W, B, 3 * C).transpose(0, 1)
    assert not training.spans_beyond_numel(permuted) and training.prepare(permuted, (H, W), w, hp, False)[0] is permuted


def test_backward_op_outputs_are_distinct_and_copied_only_where_needed():
    """`train_op.distinct_outputs`, what the backward op returns: contiguous tensors sharing storage with
    no input and no other output. Fresh gradients pass as they are (no copy); views of one buffer of
    sums, a padded slice and an input returned as an output are copied."""
    from gmf_kernels.triton_kernels.train_op import distinct_outputs
    x = torch.randn(4, 6)
    sums = torch.randn(2, 5)
    padded = torch.randn(8, 8)
    fresh = torch.randn(3, 3)
    outs = [fresh, sums[0], sums[1], padded[:5, :5], x]
    got = distinct_outputs(outs, [x, None])
    assert got[0] is fresh and got[1] is outs[1]      # passed as they are: nothing before shares their storage
    storages = [t.untyped_storage().data_ptr() for t in got]
    assert len(set(storages)) == len(got) and x.untyped_storage().data_ptr() not in storages
    assert all(t.is_contiguous() for t in got)
    for a, b in zip(got, outs):
        assert torch.equal(a, b)
