"""The whole model under torch.compile: one graph for every backend, and `optimize_for_inference`.

* One graph: ``torch.compile(model, fullgraph=True)`` of a tiny GroupMixFormer traces with
  no graph break for every registered backend and for "auto" (dispatch runs eagerly at
  trace time: `functional.dispatch`), in eval mode (with and without gradients) and in
  training mode. The fused backends' ops are one opaque node per block, traced through
  their fake implementations (Dynamo traces with fake tensors): the CUDA backend is widened
  to CPU tensors for this, so its dispatch path and fake are traced without a GPU; Triton
  runs under its interpreter on CPU, where its op is a custom_op. Graphs of the backends
  that run here natively (torch, reference, auto) are executed and compared with eager and
  with the model without BatchNorm folding; the stem and patch-embedding folds are in the graph.
* `optimize_for_inference` on CPU: one Inductor compile (freezing, no CUDA graphs) against
  eager; the mode table's choices without compiling; CUDA graphs on a GPU (skipped here).

Cost: each Dynamo trace takes ~3-15 s on 2 busy cores; the one Inductor compile of the tiny
model (cold cache, ~44 C++ kernels) takes most of this file's time.
"""
import copy

import pytest
import torch

import gmf_kernels as gmf
from gmf_kernels.backends import BACKEND_NAMES, get_backend
from gmf_kernels.inference import InferencePlan, inference_plan, load_mode_table
from helpers import assert_max_rel_close, cuda_backend_on_cpu, randomize_bn_stats_, skip_unless_supported

TINY = dict(embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], num_classes=10)
FUSED_OPS = {"cuda": "gmf.cuda_pre_projection", "triton": "gmf.triton_pre_projection"}


def tiny_model(backend="auto", seed=0, **kw):
    """A tiny model with non-trivial BatchNorm statistics (so that folding changes numbers)."""
    torch.manual_seed(seed)
    return randomize_bn_stats_(gmf.GroupMixFormer(**{**TINY, **kw}, backend=backend), seed)


class _Traced(Exception):
    pass


class Capture:
    """A torch.compile backend that keeps each graph Dynamo hands it, and runs it (`run=True`,
    what backend="eager" does) or stops right after tracing (for ops that cannot run here)."""

    def __init__(self, run: bool):
        self.run, self.graphs = run, []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if self.run:
            return gm.forward

        def stop(*args):
            raise _Traced()
        return stop

    def calls(self, name: str) -> int:
        return sum(1 for gm in self.graphs for n in gm.graph.nodes
                   if n.op == "call_function" and name in str(n.target))


@pytest.fixture
def cuda_on_cpu_tensors(monkeypatch):
    """The CUDA backend, told it can run CPU tensors: dispatch, BatchNorm folding and the op's
    fake then trace as on a GPU (its kernels are never called)."""
    return cuda_backend_on_cpu(monkeypatch.setattr)


def _trace(model, x, run, grad_mode="inference_mode"):
    torch._dynamo.reset()
    cap = Capture(run)
    compiled = torch.compile(model, backend=cap, fullgraph=True)  # any graph break raises
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[grad_mode]
    out = None
    with ctx():
        try:
            out = compiled(x)
        except _Traced:
            pass
    assert len(cap.graphs) == 1, f"{len(cap.graphs)} graphs"
    return cap, out


@pytest.mark.parametrize("backend", ["auto", *BACKEND_NAMES])
def test_whole_model_is_one_graph(backend, request):
    """fullgraph=True for every backend; fused ops one node per block; the graphs of the
    backends that run here natively executed and equal to eager. The stem and patch-embedding
    BatchNorms are folded inside the graph (eval): only the head's norm4 stays a batch_norm on
    the torch backend, and the result equals the unfolded model's."""
    if backend == "cuda":
        request.getfixturevalue("cuda_on_cpu_tensors")
    elif backend == "triton":
        skip_unless_supported("triton")
    model = tiny_model(backend).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = backend in FUSED_OPS
    cap, out = _trace(model, x, run=not fused)
    if fused:
        assert cap.calls(FUSED_OPS[backend]) == 4, "one fused op per block"
        return
    assert cap.calls("gmf.") == 0
    if backend in ("auto", "torch"):  # (the reference backend's aggregator uses batch_norm itself)
        assert cap.calls("batch_norm") == 1, "stem / patch-embedding BatchNorms not folded in the graph"
    unfolded = copy.deepcopy(model).set_bn_folding(False)
    with torch.inference_mode():
        assert_max_rel_close(out, model(x), 1e-6, f"{backend}: compiled graph vs eager")
        assert_max_rel_close(out, unfolded(x), 1e-5, f"{backend}: compiled (folded) vs unfolded eager")


def test_auto_one_graph_with_grad_enabled():
    """Eval mode called with gradients enabled (auto then picks a differentiable backend, and
    the BatchNorm folds are differentiable): still one graph."""
    model = tiny_model().eval()
    x = torch.randn(1, 3, 32, 32)
    _, out = _trace(model, x, run=True, grad_mode="grad")
    assert out.shape == (1, 10) and out.requires_grad


def test_train_mode_one_graph():
    """Training (BatchNorm batch statistics and running-stat updates, stochastic depth) traces
    as one graph too, on the torch backend."""
    model = tiny_model("torch", drop_path_rate=0.2).train()
    _trace(model, torch.randn(2, 3, 32, 32), run=False, grad_mode="grad")


def test_cuda_op_fake_on_meta_tensors(cuda_on_cpu_tensors):
    """The fused ops' fake implementations give the output's shape on meta tensors."""
    from gmf_kernels.folding import weight_shapes
    cuda_on_cpu_tensors.op()  # registers gmf::cuda_pre_projection
    C = 40
    ws = [torch.empty(s, device="meta") for s in weight_shapes(C).values()]
    out = torch.ops.gmf.cuda_pre_projection(torch.empty(2, 12, 3 * C, device="meta"), 3, 4, ws, 0.5, 1e-5)
    assert out.shape == (2, 12, C) and out.device.type == "meta"


# ------------------------------------------------------------------ optimize_for_inference
def test_optimize_for_inference_cpu_inductor():
    """The recommended path on CPU: eval, auto backend, Inductor with freezing, no CUDA graphs;
    the same numbers as eager (float32); a second call reuses the compiled code."""
    torch._dynamo.reset()
    model = tiny_model(seed=3).train()
    x = torch.randn(2, 3, 32, 32)
    fast = gmf.optimize_for_inference(model, batch_size=2)
    assert fast.model is model and not model.training
    assert all(a.backend == "auto" for a in model.attention_modules())
    assert fast.plan.cudagraphs is False and fast.plan.mode == "default"
    assert fast.plan.inductor_options.get("freezing") is True
    out = fast(x)
    with torch.inference_mode():
        expected = model(x)
    assert_max_rel_close(out, expected, 1e-5, "optimize_for_inference vs eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_max_rel_close(fast(x.double()), expected, 1e-5, "second call (input cast to float32)")
    assert "mode='default'" in repr(fast)


def test_optimize_for_inference_without_compile():
    model = tiny_model("reference")
    fast = gmf.optimize_for_inference(model, backend="torch", compile=False, dtype=torch.float64)
    assert all(a.backend == "torch" for a in model.attention_modules())
    assert next(model.parameters()).dtype == torch.float64
    x = torch.randn(1, 3, 32, 32)
    out = fast(x)
    assert out.dtype == torch.float64 and not out.requires_grad
    with torch.no_grad():
        assert torch.equal(out, model(x.double()))
    with pytest.raises(ValueError, match="unknown backend"):
        gmf.optimize_for_inference(model, backend="fast", compile=False)
    with pytest.raises(TypeError, match="nn.Module"):
        gmf.optimize_for_inference(lambda x: x)


def test_optimize_for_inference_refuses_before_touching_the_model():
    """A refused call (a backend that cannot run here, a dtype that is not one) leaves the model's dtype and mode
    as they were (they were changed first, then the backend refused)."""
    model = gmf.create_model("groupmixformer_m", serial_depths=[1, 1, 1, 1], num_classes=10).double().train()
    if not gmf.get_backend("cuda").availability_reasons():
        pytest.skip("the cuda backend can run here")
    with pytest.raises(ValueError, match="'cuda' cannot run on this machine"):
        gmf.optimize_for_inference(model, backend="cuda", dtype=torch.float32, compile=False)
    with pytest.raises(TypeError, match="torch.dtype"):
        gmf.optimize_for_inference(model, dtype="float32", compile=False)
    assert next(model.parameters()).dtype == torch.float64 and model.training


def test_optimize_for_inference_of_a_bare_layer_takes_its_size():
    """A bare GroupMixAttention (any module holding one) keeps its forward's other arguments: the size."""
    layer = gmf.GroupMixAttention(40, 8, qkv_bias=True, backend="reference").eval()
    fast = gmf.optimize_for_inference(layer, backend="torch", compile=False, dtype=torch.float64)
    x = torch.randn(2, 15, 40, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fast(x, (3, 5)), layer(x, (3, 5)))


TABLE = {"devices": {
    "cpu": {"inductor_options": {"freezing": True}},
    "cuda": {"cudagraphs_max_batch": {"float32": 4, "bfloat16": 16}, "inductor_options": {"freezing": True},
             "measured": False},
    "sm_90": {"cudagraphs_max_batch": {"bfloat16": 64}, "measured": True},
}}


@pytest.fixture
def no_arch_entry(monkeypatch):
    """The plan tests below read the generic "cuda" entry: a GPU with an sm_XY entry of TABLE
    (an H100 is sm_90) must not change them."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))


@pytest.mark.parametrize("batch, dtype, cudagraphs", [
    (1, torch.float32, True), (4, torch.float32, True), (5, torch.float32, False),
    (16, torch.bfloat16, True), (17, torch.bfloat16, False), (None, torch.bfloat16, False),
    (1, torch.float16, False),  # no threshold for this dtype: no CUDA graphs
])
def test_plan_threshold_from_table(batch, dtype, cudagraphs, no_arch_entry):
    plan = inference_plan("cuda", dtype, batch, table=TABLE)
    assert plan.cudagraphs is cudagraphs
    assert plan.mode == ("reduce-overhead" if cudagraphs else "default")
    assert plan.table_entry == "cuda" and plan.measured is False and plan.reason
    kw = plan.compile_kwargs()
    assert kw["fullgraph"] is True and kw["dynamic"] is False
    assert kw["options"].get("triton.cudagraphs", False) is cudagraphs
    assert kw["options"]["freezing"] is True


def test_plan_architecture_entry_wins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    plan = inference_plan("cuda", torch.bfloat16, 64, table=TABLE)
    assert plan.table_entry == "sm_90" and plan.cudagraphs and plan.measured
    assert not inference_plan("cuda", torch.bfloat16, 65, table=TABLE).cudagraphs
    # what the sm_90 entry does not set comes from the generic entry: fp32's threshold, freezing
    assert plan.inductor_options == {"freezing": True}
    fp32 = inference_plan("cuda", torch.float32, 4, table=TABLE)
    assert fp32.table_entry == "cuda" and fp32.cudagraphs and not fp32.measured
    assert fp32.inductor_options == {"freezing": True}
    assert inference_plan("cuda", torch.float16, 1, table=TABLE).table_entry == "sm_90"  # set by neither


def test_clone_outputs_copies_every_tensor():
    """CUDA graph outputs are copied out before the next replay overwrites them, in any container."""
    import collections

    from gmf_kernels.inference import _clone_outputs
    Pair = collections.namedtuple("Pair", "a b")
    t = torch.ones(2)
    out = _clone_outputs({"x": [t, (t, Pair(t, 3))], "n": None})
    flat = [out["x"][0], out["x"][1][0], out["x"][1][1].a]
    assert all(o is not t and torch.equal(o, t) for o in flat)
    assert isinstance(out["x"][1][1], Pair) and out["x"][1][1].b == 3 and out["n"] is None


def test_plan_forced_cudagraphs(no_arch_entry):
    """cudagraphs=True/False overrides the threshold (to measure both modes); not on a CPU."""
    on = inference_plan("cuda", torch.float32, 100, table=TABLE, cudagraphs=True)
    assert on.cudagraphs and on.mode == "reduce-overhead" and "as asked" in on.reason
    assert not inference_plan("cuda", torch.float32, 1, table=TABLE, cudagraphs=False).cudagraphs
    with pytest.raises(ValueError, match="CUDA device"):
        inference_plan("cpu", cudagraphs=True)


def test_plan_cpu_never_uses_cudagraphs():
    for b in (1, 8, None):
        plan = inference_plan("cpu", torch.float32, b)
        assert not plan.cudagraphs and plan.mode == "default"
        assert "triton.cudagraphs" not in plan.compile_kwargs()["options"]


def test_packaged_table():
    """Every entry has a CUDA-graph threshold per dtype (or none), options, and says whether it
    was measured; the estimates say so."""
    table = load_mode_table()
    assert {"cpu", "cuda"} <= set(table["devices"])
    for key, entry in table["devices"].items():
        assert isinstance(entry.get("measured"), bool), key
        assert entry.get("source"), key
        for dt, limit in entry.get("cudagraphs_max_batch", {}).items():
            assert dt in ("float32", "float16", "bfloat16") and isinstance(limit, int) and limit >= 0, key
        if not entry["measured"]:
            assert "estimate" in entry["source"] or key == "cpu", key
    assert table["devices"]["cpu"].get("cudagraphs_max_batch", {}) == {}


def test_plan_errors():
    with pytest.raises(ValueError, match="batch_size"):
        inference_plan("cpu", torch.float32, 0)
    with pytest.raises(ValueError, match="batch_size"):
        inference_plan("cpu", torch.float32, True)
    with pytest.raises(TypeError, match="torch.dtype"):
        inference_plan("cpu", "float32")
    with pytest.raises(ValueError, match="no entry"):
        inference_plan("cpu", torch.float32, 1, table={"devices": {"cuda": {}}})
    with pytest.raises(ValueError, match="devices"):
        inference_plan("cpu", table={"cpu": {}})
    with pytest.raises(FileNotFoundError):
        inference_plan("cpu", table="/nonexistent/table.json")
    assert isinstance(inference_plan("cpu"), InferencePlan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_optimize_for_inference_cuda_graphs():
    """Small batch on a GPU: CUDA graphs; outputs stay valid after the next call and match eager."""
    torch._dynamo.reset()
    model = tiny_model()
    fast = gmf.optimize_for_inference(model, batch_size=2, device="cuda",
                                      table={"devices": {"cuda": {"cudagraphs_max_batch": {"float32": 8},
                                                                  "inductor_options": {"freezing": True}}}})
    assert fast.plan.cudagraphs
    xs = [torch.randn(2, 3, 32, 32, device="cuda") for _ in range(4)]
    outs = [fast(x) for x in xs]
    with torch.inference_mode():
        for x, o in zip(xs, outs):
            assert_max_rel_close(o, model(x), 1e-3, "cudagraph output vs eager")  # TF32 may be on


def test_constant_under_compile_marks_as_torch_does():
    """_tracing.constant_under_compile must stay what torch.compiler.assume_constant_result does
    (it avoids importing torch._dynamo at `import gmf_kernels`)."""
    import subprocess
    import sys

    import torch._dynamo
    from gmf_kernels._tracing import constant_under_compile

    def f():
        return 0

    def g():
        return 0

    marked = torch._dynamo.assume_constant_result(f)
    ours = constant_under_compile(g)
    assert {k: v for k, v in vars(marked).items()} == {k: v for k, v in vars(ours).items()}
    code = "import sys, gmf_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert out.strip() == "False", "import gmf_kernels imports torch._dynamo"


def test_dynamic_shapes_one_graph_eval():
    """torch.compile(dynamic=True, fullgraph=True) of the layer: the backend is chosen without
    the (symbolic) batch and grid, so new sizes reuse the graph and match eager."""
    m = gmf.GroupMixAttention(40, backend="auto").eval()
    f = torch.compile(m, dynamic=True, fullgraph=True, backend="eager")
    for B, H, W in [(2, 7, 9), (3, 5, 6), (1, 8, 8)]:
        x = torch.randn(B, H * W, 40)
        with torch.no_grad():
            assert_max_rel_close(f(x, (H, W)), m(x, (H, W)), 1e-6, f"dynamic {B}x{H}x{W}")


def test_backend_choice_ignores_sizes():
    """dispatch gives the sizes as 1 while tracing (functional.SIZE_FIELDS): no backend may
    decide on them, or a compiled graph would run a backend chosen for other sizes -- in eval,
    with gradients and in training, for any size its kernels can address (the Triton training
    kernels' limits, config.MAX_TRAIN_BATCH, are far above these and checked again at run time)."""
    import dataclasses

    from gmf_kernels.backends import GMAProblem
    from gmf_kernels.functional import SIZE_FIELDS
    for training, needs_grad in ((False, False), (False, True), (True, True)):
        base = GMAProblem(B=2, H=7, W=9, dim=80, num_heads=8, dtype=torch.float32, device_type="cpu",
                          training=training, needs_grad=needs_grad)
        for name in BACKEND_NAMES:
            reasons = get_backend(name).not_supported_reasons(base)
            for sizes in ({"B": 1, "H": 1, "W": 1}, {"B": 4096, "H": 224, "W": 3}):
                assert set(sizes) == set(SIZE_FIELDS)
                assert get_backend(name).not_supported_reasons(dataclasses.replace(base, **sizes)) == reasons, name


def _torch_before(major: int, minor: int) -> bool:
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (major, minor)


@pytest.mark.slow  # Inductor compiles forward and backward: ~115 s cold on 2 busy cores, ~20 s warm cache
@pytest.mark.skipif(_torch_before(2, 13), reason="torch 2.11's Inductor bakes the first size's strides of the "
                    "stacked segments saved for backward into the dynamic graph (assert_size_stride fails at "
                    "the second size; no custom op involved); torch 2.13 (CI) compiles it right")
def test_dynamic_shapes_training_step_inductor():
    """torch.compile(dynamic=True, fullgraph=True) with Inductor of a training step (forward and
    backward, BatchNorm batch statistics) of the torch backend's layer, at two sizes: outputs,
    gradients and running statistics equal eager's. Inductor used to fail here with `cannot
    determine truth value of Relational: 120*s4 < 120` on the convolutions' inputs saved for
    backward (`torch_backend.saved_conv_input` says why); the eager backend never reaches it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = gmf.GroupMixAttention(40, backend="torch").train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    for B, H, W in [(2, 5, 6), (3, 4, 7)]:
        x = torch.randn(B, H * W, 40)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        g = torch.randn(B, H * W, 40)
        outs = [compiled(xs[0], (H, W)), eager(xs[1], (H, W))]
        for out in outs:
            out.backward(g)
        assert_max_rel_close(outs[0], outs[1], 1e-5, f"output {B}x{H}x{W}")
        assert_max_rel_close(xs[0].grad, xs[1].grad, 1e-4, f"input gradient {B}x{H}x{W}")
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert_max_rel_close(p.grad, q.grad, 1e-4, f"gradient of {name} {B}x{H}x{W}")
            p.grad = q.grad = None
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            assert_max_rel_close(b.double(), c.double(), 1e-5, f"{name} {B}x{H}x{W}")


@pytest.mark.slow  # Inductor compiles the stem and stage 0 twice (static, then dynamic sizes): ~20-40 s
def test_inference_inductor_at_a_new_image_size():
    """Compiled inference (default torch.compile, Inductor, no_grad) given a new image size (a detector's inputs):
    Dynamo recompiles with dynamic sizes, and Inductor failed lowering the convolution of the tokens' image view
    (ValueRangeError: Invalid ranges [0:-1]); `saved_conv_input` materialises it under compile in inference too.
    Each size equals eager (the torch backend, the CPU default)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gmf.GroupMixFormer(embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1], num_classes=10,
                               backend="torch").eval()
    stage0 = lambda x: model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)[0]
    compiled = torch.compile(stage0)
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (2, 3, 48, 40)]:
            x = torch.randn(*shape)
            assert_max_rel_close(compiled(x), stage0(x), 1e-5, f"stage 0 at {shape}")
