"""GroupMixAttention's submodules as a user may change them.

The linears: qkv and proj as modules: where they are not plain nn.Linear layers (a LoRA adapter, as
peft puts in place of a linear, exposing its base layer's weight; a forward hook; a parametrised weight) the
layer calls them, as upstream's EfficientAtt does. Reading their weight instead dropped the adapter silently:
its parameters got no gradient and the output did not change.

The oracle: the float64 reference on the merged weights (base + B @ A), as a function of the adapter's A and B.

The aggregator's norms (never called: their weights go into the kernels): a frozen BatchNorm (detectron2's
conversion) taken as an eval-mode BatchNorm; a norm with its own forward refused by name; hooks said not to fire.
torch.func transforms: the torch backend runs under them, the fused ones refuse by reason."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gmf_kernels
from gmf_kernels.backends import BACKEND_NAMES, get_backend
from gmf_kernels.numerics import default_hyper
from gmf_kernels.reference import reference_group_mix_attention
from helpers import assert_max_rel_close, backend_dtype_params, emulated_here

C, HEADS, GRID = 40, 8, (5, 6)
#: float32 against the float64 oracle (a layer of float32 operations)
TOL = {torch.float32: 2e-4}


class LoRALinear(nn.Module):
    """An adapter as peft makes it: the base layer kept, its weight and bias exposed, a low-rank update added."""

    def __init__(self, base: nn.Linear, r: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = base
        like = dict(dtype=base.weight.dtype)
        self.A = nn.Parameter(torch.randn(r, base.in_features, generator=g, **like) * 0.2)
        self.B = nn.Parameter(torch.randn(base.out_features, r, generator=g, **like) * 0.2)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + (x @ self.A.t()) @ self.B.t()


def _layer(backend, dtype, training):
    torch.manual_seed(0)
    m = gmf_kernels.GroupMixAttention(C, HEADS, qkv_bias=True, backend=backend).to(dtype).train(training)
    for n in (m.aggregator.norm0, m.aggregator.norm1, m.aggregator.norm2, m.aggregator.norm3):
        n.running_mean.uniform_(-0.5, 0.5)
        n.running_var.uniform_(0.5, 2.0)
    return m


def _oracle(m, x, training):
    """Output and gradients (x, A and B of both adapters) of the float64 reference on the merged weights."""
    m64 = copy.deepcopy(m).double()
    w = m64.gma_weights()
    qa, pa = m64.qkv, m64.proj
    w = w._replace(qkv_weight=qa.weight + qa.B @ qa.A, proj_weight=pa.weight + pa.B @ pa.A)
    hp = default_hyper(C)._replace(scale=m.scale)
    x64 = x.detach().double().requires_grad_(True)
    out = reference_group_mix_attention(x64, GRID, w, hp, training)
    return out, x64, (qa.A, qa.B, pa.A, pa.B)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend, dtype", backend_dtype_params(BACKEND_NAMES, [torch.float32]))
def test_lora_adapters_on_qkv_and_proj_are_applied(backend, dtype, training):
    if training and emulated_here(backend) and backend == "cuda":
        pytest.skip("the cuda backend trains through PyTorch fallbacks on CPU: covered by its own tests")
    m = _layer(backend, dtype, training)
    m.qkv, m.proj = LoRALinear(m.qkv, seed=1), LoRALinear(m.proj, seed=2)
    x = torch.randn(2, GRID[0] * GRID[1], C, dtype=dtype, requires_grad=True)
    ref, x64, ref_params = _oracle(m, x, training)
    out = m(x, GRID)
    assert_max_rel_close(out, ref, TOL[dtype], f"{backend} output with LoRA adapters")
    g = torch.randn_like(ref)
    (out * g.to(dtype)).sum().backward()
    (ref * g).sum().backward()
    assert_max_rel_close(x.grad, x64.grad, TOL[dtype], "x grad")
    for name, p, q in zip(("qkv.A", "qkv.B", "proj.A", "proj.B"), (m.qkv.A, m.qkv.B, m.proj.A, m.proj.B),
                          ref_params):
        assert p.grad is not None, f"{name}: the adapter got no gradient"
        assert_max_rel_close(p.grad, q.grad, TOL[dtype], f"{name} grad")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_hooks_on_qkv_and_proj_fire_and_plain_layers_take_the_weights(backend, monkeypatch):
    """A forward hook on qkv / proj (an activation probe, FSDP's unsharding) fires as upstream's calls fire it and
    may change the output; plain layers are not called (their weights go to the backend)."""
    m = _layer(backend, torch.float32, False)
    x = torch.randn(1, GRID[0] * GRID[1], C)
    calls = []
    real = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, t: (calls.append(self), real(self, t))[1])
    before = m(x, GRID)
    assert calls == []
    seen = []
    h1 = m.qkv.register_forward_hook(lambda mod, args, out: seen.append(("qkv", tuple(out.shape))))
    h2 = m.proj.register_forward_hook(lambda mod, args, out: out * 2)
    after = m(x, GRID)
    assert seen == [("qkv", (1, GRID[0] * GRID[1], 3 * C))]
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-6)
    h1.remove(), h2.remove()
    calls.clear()
    torch.testing.assert_close(m(x, GRID), before, rtol=0, atol=0)
    assert calls == []


def test_parametrized_weight_is_used():
    """torch.nn.utils.parametrize on qkv.weight (a weight-norm-like reparametrisation) is what the layer applies."""
    from torch.nn.utils import parametrize

    m = _layer("torch", torch.float32, False)
    x = torch.randn(1, GRID[0] * GRID[1], C)
    before = m(x, GRID)

    class Half(nn.Module):
        def forward(self, w):
            return w * 0.5

    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.qkv.weight.mul_(0.5)
    parametrize.register_parametrization(m.qkv, "weight", Half())
    torch.testing.assert_close(m(x, GRID), ref(x, GRID), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m(x, GRID), before)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_check_mode_with_an_adapter(backend):
    """check=True compares the pre-projection from the adapter's qkv against the reference, and passes."""
    m = _layer(backend, torch.float32, False)
    m.check = True
    m.qkv = LoRALinear(m.qkv, seed=3)
    x = torch.randn(2, GRID[0] * GRID[1], C)
    ref, _, _ = _oracle(_with_plain_proj_adapter(m), x, False)
    assert_max_rel_close(m(x, GRID), ref, TOL[torch.float32], "checked output")


def _with_plain_proj_adapter(m):
    """A copy whose proj is an adapter with a zero update (so that `_oracle` merges it as the identity)."""
    c = copy.deepcopy(m)
    c.proj = LoRALinear(c.proj)
    with torch.no_grad():
        c.proj.B.zero_()
    return c


def test_vmap_over_the_default_cpu_backend_in_inference():
    """torch.func.vmap (model ensembling) over the torch backend in no_grad inference: its eager out= path has no
    batching rule, so a functorch transform takes the plain path (it raised 'Batching rule not implemented')."""
    m = _layer("torch", torch.float32, False)
    x = torch.randn(3, 1, GRID[0] * GRID[1], C)
    with torch.no_grad():
        got = torch.func.vmap(lambda t: m(t, GRID))(x)
        want = torch.stack([m(t, GRID) for t in x])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_vmap_over_stacked_weights_ensembles(grad):
    """PyTorch's ensembling recipe (stack_module_state + vmap(functional_call) over a meta copy), eval mode: under
    the transform the weights are functorch wrappers with no storage, so nothing is cached (the cache's stamp raised
    'Cannot access storage of BatchedTensorImpl'); each member's output is its own layer's."""
    ms = [_layer("torch", torch.float32, False) for _ in range(2)]
    with torch.no_grad():
        ms[1].qkv.weight.mul_(0.5)
    params, buffers = torch.func.stack_module_state(ms)
    base = copy.deepcopy(ms[0]).to("meta")
    x = torch.randn(2, GRID[0] * GRID[1], C)
    f = lambda p, b, t: torch.func.functional_call(base, (p, b), (t, GRID))
    with torch.set_grad_enabled(grad):
        got = torch.func.vmap(f, in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        for i, m in enumerate(ms):
            torch.testing.assert_close(got[i], m(x, GRID), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b not in ("torch", "reference")])
def test_fused_backends_refuse_torch_func_by_name(backend, transform):
    """Under torch.func the fused backends refuse with their reason (their custom ops have no batching rule and
    their autograd Functions no setup_context), where torch's own message named neither; `auto` takes the torch
    backend there."""
    from gmf_kernels.backends import get_backend
    from helpers import problem
    assert get_backend("torch").supports_functorch and get_backend("reference").supports_functorch
    assert any("torch.func" in r for r in get_backend(backend).not_supported_reasons(problem(functorch=True)))
    m = _layer(backend, torch.float32, False)
    x = torch.randn(2, 1, GRID[0] * GRID[1], C)
    params = dict(m.named_parameters())
    f = lambda p, t: torch.func.functional_call(m, p, (t, GRID)).sum()
    run = (lambda: torch.func.vmap(lambda t: f(params, t))(x)) if transform == "vmap" else \
        (lambda: torch.func.grad(f)(params, x[0]))
    if get_backend(backend).availability_reasons():
        pytest.skip(f"{backend} not available here")
    with pytest.raises(ValueError, match="torch.func transforms"):
        run()
    m.set_backend("auto")
    run()   # auto: the torch backend


# ---------------------------------------------------------------- the aggregator's norms
class FrozenBatchNorm2d(nn.Module):
    """A frozen BatchNorm as detectron2 / torchvision / timm define it (their class name; buffers only)."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]

    @classmethod
    def of(cls, bn: nn.BatchNorm2d):
        f = cls(bn.num_features, bn.eps).to(bn.running_mean.dtype)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(f, name).copy_(getattr(bn, name).detach())
        return f


def _freeze_norms(m):
    a = m.aggregator
    for i in range(4):
        setattr(a, f"norm{i}", FrozenBatchNorm2d.of(getattr(a, f"norm{i}")))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_frozen_batchnorms_act_as_eval_batchnorms(backend, train):
    """detectron2's FrozenBatchNorm2d.convert_frozen_batchnorm (or torchvision's / timm's class) in the aggregator:
    an eval-mode BatchNorm in every mode, its buffers never updated; it raised AttributeError
    ('no attribute track_running_stats'). The oracle: the same layer with eval-mode BatchNorm2d."""
    from gmf_kernels.backends import get_backend
    if get_backend(backend).availability_reasons():
        pytest.skip(f"{backend} not available here")
    m = _layer(backend, torch.float32, False)
    want_model = copy.deepcopy(m).double().eval().set_backend("reference")
    _freeze_norms(m)
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    m.train(train)
    for p in m.aggregator.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, GRID[0] * GRID[1], C)
    got = m(x, GRID)
    want = want_model(x.double(), GRID)
    assert_max_rel_close(got, want, TOL[torch.float32], f"{backend} with frozen BatchNorms ({'train' if train else 'eval'})")
    for k, v in m.named_buffers():
        assert torch.equal(v, buffers[k]), f"{k} changed"


class OwnSyncBatchNorm(nn.BatchNorm2d):
    """A BatchNorm with its own forward (detectron2's NaiveSyncBatchNorm does its own all-reduce)."""

    def forward(self, x):
        return torch.zeros_like(x)


def test_a_norm_with_its_own_forward_is_refused_by_name():
    """Its forward would be skipped (the kernels take the weights): refused, naming it, not run as plain BN."""
    m = _layer("torch", torch.float32, True)
    m.aggregator.norm2 = OwnSyncBatchNorm(C // 5)
    with pytest.raises(TypeError, match=r"aggregator.norm2 is a .*OwnSyncBatchNorm"):
        m(torch.randn(1, GRID[0] * GRID[1], C), GRID)


@pytest.mark.parametrize("where", ["aggregator.norm1", "aggregator.agg2.conv1", "crpe.conv_list.1"])
def test_hooks_on_inner_modules_are_said_not_to_fire(where):
    m = _layer("torch", torch.float32, False)
    m.get_submodule(where).register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=f"hooks on {where} .* do not fire"):
        m(torch.randn(1, GRID[0] * GRID[1], C), GRID)


def test_hooks_said_not_to_fire_under_compile_fullgraph(monkeypatch):
    """A hook on an inner module (a feature extractor or FLOP counter hooks every module) under
    torch.compile(fullgraph=True): the warning is said at trace time, not traced (Dynamo cannot trace
    warnings.warn: fullgraph failed)."""
    from gmf_kernels import modules
    monkeypatch.setattr(modules, "_HOOKS_SAID", set())
    m = _layer("torch", torch.float32, False)
    m.aggregator.norm1.register_forward_hook(lambda *a: None)
    x = torch.randn(1, GRID[0] * GRID[1], C)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match="hooks on aggregator.norm1 .* do not fire"):
        got = compiled(x, GRID)
    torch.testing.assert_close(got, m(x, GRID), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_pruning_and_weight_norm_hooks_run(backend):
    """torch.nn.utils.prune / weight_norm on the aggregator's convolutions recompute `.weight` in a forward
    pre-hook, which upstream's calls fire; the layer never calls those modules, so the weight stayed as at
    pruning time: a change of weight_orig was not seen (eval 5.4 off) and a second backward went through the
    first graph (an error). The layer now runs such hooks itself: two SGD steps in training mode match upstream's
    layer (its modules called) in every output, gradient and running statistic."""
    from torch.nn.utils import prune, weight_norm
    if backend == "triton" and get_backend("triton").availability_reasons():
        pytest.skip("triton not available here")
    up_mod = pytest.importorskip("test_convert")
    dtype = torch.float64 if backend != "triton" else torch.float32
    up = up_mod.EfficientAtt(C, HEADS, qkv_bias=True).to(dtype)
    m = _layer(backend, dtype, True)
    up.load_state_dict(m.state_dict())
    layers = (m, up)
    for mod in layers:
        prune.l1_unstructured(mod.aggregator.agg2.pointwise_conv, "weight", amount=0.4)
        weight_norm(mod.aggregator.agg0.conv.conv1)
    opts = [torch.optim.SGD(mod.parameters(), lr=0.2) for mod in layers]
    x = torch.randn(2, GRID[0] * GRID[1], C, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else TOL[torch.float32]
    for step in range(2):
        outs = []
        for mod, opt in zip(layers, opts):
            opt.zero_grad()
            out = mod(x, GRID)
            out.square().sum().backward()
            outs.append(out.detach())
            opt.step()
        assert_max_rel_close(outs[0], outs[1], tol, f"output at step {step}")
    up_params, up_buffers = dict(up.named_parameters()), dict(up.named_buffers())
    assert set(up_params) == {n for n, _ in m.named_parameters()}
    for n, p in m.named_parameters():
        assert_max_rel_close(p.grad, up_params[n].grad, 10 * tol, f"grad {n}")
    for n, b in m.named_buffers():
        if b.is_floating_point():
            assert_max_rel_close(b, up_buffers[n], tol, n)


def test_convert_keeps_frozen_batchnorms():
    """convert() of a layer whose aggregator norms were frozen detectron2-style shares them as modules."""
    m = _layer("reference", torch.float64, False)
    _freeze_norms(m)
    sys_path_upstream = pytest.importorskip("test_convert")   # its EfficientAtt rendering of upstream's layer
    up = sys_path_upstream.EfficientAtt(C, HEADS, qkv_bias=True).double().eval()
    up.load_state_dict({k: v for k, v in _layer("reference", torch.float64, False).state_dict().items()})
    _freeze_norms(up)
    x = torch.randn(1, GRID[0] * GRID[1], C, dtype=torch.float64)
    want = up(x, GRID)
    new = gmf_kernels.convert(up, backend="reference")
    assert isinstance(new.aggregator.norm0, FrozenBatchNorm2d) and new.aggregator.norm0 is up.aggregator.norm0
    torch.testing.assert_close(new(x, GRID), want, rtol=1e-12, atol=1e-12)
