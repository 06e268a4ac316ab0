"""Export paths a deployment uses: torch.jit.trace, the legacy (TorchScript) ONNX exporter,
torch.export, the dynamo ONNX exporter (run by onnxruntime), and torch.jit.script's refusal.

Each exported program is run and compared with the eager model (float32 on the CPU, fresh
random weights and inputs, 1e-5 relative). A tiny GroupMixFormer-M (all four stages) at 64x64
with one block per stage keeps it fast.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import gmf_kernels as gmf
from gmf_kernels.backends import BACKEND_NAMES, get_backend
from gmf_kernels.backends.base import FusedBackend
from helpers import assert_max_rel_close, cuda_backend_on_cpu, skip_unless_supported

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = gmf.create_model("groupmixformer_m", num_classes=10, serial_depths=[1, 1, 1, 1]).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def test_jit_trace(model):
    """The trace records the weight folding (no cached fold baked in as a constant), passes
    its own sanity check, and runs other batch sizes at the traced image size."""
    x = torch.randn(1, 3, 64, 64)
    _eager(model, x)  # fills the fold caches, which the trace must not bake in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)  # check_trace=True: two traces must agree
    for B in (1, 3):
        xb = torch.randn(B, 3, 64, 64)
        with torch.no_grad():
            assert_max_rel_close(traced(xb), _eager(model, xb), TOL, f"jit.trace B={B}")


class _OnGrid(torch.nn.Module):
    def __init__(self, layer, size):
        super().__init__()
        self.layer, self.size = layer, size

    def forward(self, x):
        return self.layer(x, self.size)


def test_jit_trace_layer():
    m = _OnGrid(gmf.GroupMixAttention(80).eval(), (7, 9))
    x = torch.randn(2, 63, 80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, x)
    with torch.no_grad():
        assert_max_rel_close(traced(x), m(x), TOL, "jit.trace layer")


#: the backends whose pre-projection is one op (eval) or an autograd Function over it (gradients)
FUSED = [n for n in BACKEND_NAMES if isinstance(get_backend(n), FusedBackend)]


@pytest.mark.parametrize("backend", FUSED)
def test_jit_trace_layer_fused(backend, request, monkeypatch):
    """A fused backend traced as a user traces a model, with gradients on (its parameters require
    grad): the trace records the eval op, whatever the grad mode, so that the trace's check
    (which re-runs under no_grad) sees the same graph -- with gradients the call went through the
    differentiable folding and the autograd Function, a different graph (TracingCheckError). The
    traced layer's output, and its input and parameter gradients through the op's registered
    autograd, equal the eager layer's. The Triton kernels run in the interpreter, CUDA's in the
    emulation build."""
    if backend == "cuda":
        request.getfixturevalue("use_emu")
        cuda_backend_on_cpu(monkeypatch.setattr)
    skip_unless_supported(backend, dim=40, H=5, W=3, B=1, needs_grad=True)
    torch.manual_seed(3)
    m = _OnGrid(gmf.GroupMixAttention(40, backend=backend).eval(), (5, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 15, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, x)   # check_trace=True
    grads = []
    for run in (m, traced):
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        g = torch.randn(1, 15, 40, generator=torch.Generator().manual_seed(5))
        y = run(xg)
        y.backward(g)
        grads.append([y.detach(), xg.grad] + [p.grad for p in m.parameters()])
    names = ["out", "x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, *grads):
        assert b is not None, f"jit.trace {backend}: no gradient for {name}"
        assert_max_rel_close(b, a, TOL, f"jit.trace {backend}: {name}")


@pytest.mark.parametrize("backend", FUSED)
def test_jit_trace_training_layer_fused(backend, request, monkeypatch):
    """A training-mode layer traced on a fused backend: the trace says (TracerWarning) that its
    graph is forward-only, and it is right as far as it goes -- the traced forward on a new batch
    gives the reference's output and running statistics -- while a backward through it fails (the
    batch statistics' op has no autograd formula) instead of returning some gradient."""
    if backend == "cuda":
        request.getfixturevalue("use_emu")
        cuda_backend_on_cpu(monkeypatch.setattr)
    skip_unless_supported(backend, dim=40, H=4, W=5, B=2, training=True, needs_grad=True)
    torch.manual_seed(4)
    layer = gmf.GroupMixAttention(40, backend=backend).train()
    m = _OnGrid(layer, (4, 5))
    x = torch.randn(2, 20, 40)
    with pytest.warns(torch.jit.TracerWarning, match="forward-only graph"):
        traced = torch.jit.trace(m, x)   # check_trace=True
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    x2 = torch.randn(2, 20, 40)
    with torch.no_grad():
        assert_max_rel_close(traced(x2), ref(x2, (4, 5)), TOL, f"traced training {backend}: out")
    for name, buf in layer.aggregator.named_buffers():
        expected = dict(ref.aggregator.named_buffers())[name]
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buf, expected), name
        else:
            assert_max_rel_close(buf, expected, TOL, f"traced training {backend}: {name}")
    with pytest.raises(RuntimeError, match="autograd"):
        traced(x2.clone().requires_grad_(True)).sum().backward()


def test_jit_script_says_what_to_use(model):
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):
        torch.jit.script(gmf.GroupMixAttention(40))


def _onnxruntime_run(path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_onnx_legacy_exporter(model, tmp_path, backend):
    """The TorchScript-based exporter (dynamo=False) traces upstream's computation (the
    reference backend: convolution weights of known shape) whatever backend the model names (an
    explicit "torch" failed: its convolution weights are built at run time), with a dynamic batch
    axis (the LayerNorm's width once came from a traced size: not a constant), and onnxruntime
    reproduces it at the exported batch and another."""
    pytest.importorskip("onnx")
    model = copy.deepcopy(model).set_backend(backend) if backend != "auto" else model
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
    assert_max_rel_close(_onnxruntime_run(path, x), _eager(model, x), TOL, "legacy ONNX")
    x3 = torch.randn(3, 3, 64, 64)
    assert_max_rel_close(_onnxruntime_run(path, x3), _eager(model, x3), TOL, "legacy ONNX, batch 3")


def test_torch_export(model):
    x = torch.randn(2, 3, 64, 64)
    ep = torch.export.export(model, (x,))
    assert_max_rel_close(ep.module()(x), _eager(model, x), TOL, "torch.export")


def test_onnx_dynamo_exporter(model, tmp_path):
    pytest.importorskip("onnxscript")
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    assert_max_rel_close(_onnxruntime_run(path, x), _eager(model, x), TOL, "dynamo ONNX")
