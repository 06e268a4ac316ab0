"""`gmf_kernels.convert`: upstream-style attention modules -> GroupMixAttention, in place.

`EfficientAtt` below has upstream's structure and parameter names (docs/spec.md §1) and
its own forward, written here from the spec with nn.Modules (BatchNorm2d modules update
their own running statistics) and independent of gmf_kernels.reference: a second oracle,
itself checked against the golden vectors of the upstream code.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gmf_kernels
from helpers import assert_max_rel_close as assert_rel
from conftest import golden_path

FP64_TOL = 1e-10






# ------------------------------------------------------------------ upstream-style modules
class SeparableConv2d(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, k, 1, k // 2, groups=cin, bias=False)
        self.pointwise_conv = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)

    def forward(self, x):
        return self.pointwise_conv(self.conv1(x))


class Agg_0(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.conv = SeparableConv2d(3 * s, s, 3)
        self.norm = nn.LayerNorm(s)


class Aggregator(nn.Module):
    def __init__(self, dim):
        super().__init__()
        s = dim // 5
        self.agg1 = SeparableConv2d(s, s, 3)
        self.norm1 = nn.BatchNorm2d(s)
        self.agg2 = SeparableConv2d(s, s, 5)
        self.norm2 = nn.BatchNorm2d(s)
        self.agg3 = SeparableConv2d(s, s, 7)
        self.norm3 = nn.BatchNorm2d(s)
        self.agg0 = Agg_0(s)
        self.norm0 = nn.BatchNorm2d(s)


class ConvRelPosEnc(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.conv_list = nn.ModuleList([nn.Conv2d(n * d, n * d, k, 1, k // 2, groups=n * d)
                                        for k, n in ((3, 2), (5, 3), (7, 3))])


def _build_attention(self, dim, num_heads=8, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
    self.num_heads = num_heads
    self.scale = qk_scale or (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.attn_drop = nn.Dropout(attn_drop)
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(proj_drop)
    self.aggregator = Aggregator(dim)
    self.crpe = ConvRelPosEnc(4 * (dim // 5) // num_heads)


def spec_forward(self, x, size):
    """docs/spec.md §1, step by step, with the modules' own layers."""
    B, N, C = x.shape
    H, W = size
    s, h = C // 5, self.num_heads
    cp = 4 * s
    d = cp // h
    a = self.aggregator
    t = self.qkv(x)                                                   # 1.
    imgs = t.reshape(B, H, W, 3, C).permute(3, 0, 4, 1, 2).reshape(3 * B, C, H, W)  # 2. q, k, v stacked
    y0 = F.hardswish(a.norm0(imgs[:, 0:s]))                           # 3.
    y1 = F.hardswish(a.norm1(a.agg1(imgs[:, s:2 * s])))
    y2 = F.hardswish(a.norm2(a.agg2(imgs[:, 2 * s:3 * s])))
    y3 = F.hardswish(a.norm3(a.agg3(imgs[:, 3 * s:4 * s])))
    proxies = torch.cat([y0, y1, y2, y3], dim=1).reshape(3, B, cp, H, W)
    seg4 = imgs[:, 4 * s:].reshape(3, B, s, H, W)                     # 4. local branch
    loc = a.agg0.conv(torch.cat([seg4[0], seg4[1], seg4[2]], dim=1))
    loc = F.hardswish(a.agg0.norm(loc.reshape(B, s, N).transpose(1, 2)))   # (B, N, s)
    heads = []
    for head in range(h):                                             # 5.-8. one head at a time
        ch = slice(head * d, (head + 1) * d)
        q = proxies[0, :, ch].reshape(B, d, N)
        k = proxies[1, :, ch].reshape(B, d, N)
        v = proxies[2, :, ch].reshape(B, d, N)
        k_soft = torch.exp(k - k.amax(dim=2, keepdim=True))
        k_soft = k_soft / k_soft.sum(dim=2, keepdim=True)              # softmax over tokens
        kv = torch.einsum("bin,bjn->bij", k_soft, v)                   # (B, d, d)
        e = torch.einsum("bin,bij->bjn", q, kv)                        # (B, d, N)
        conv_idx, first = (0, 0) if head < 2 else ((1, 2) if head < 5 else (2, 5))
        conv = self.crpe.conv_list[conv_idx]
        lo = (head - first) * d
        v_img = proxies[2, :, ch]                                      # (B, d, H, W)
        r = F.conv2d(v_img, conv.weight[lo:lo + d], conv.bias[lo:lo + d], padding=conv.padding, groups=d)
        heads.append(self.scale * e + q * r.reshape(B, d, N))
    A = torch.cat(heads, dim=1).transpose(1, 2)                        # (B, N, C')
    out = self.proj(torch.cat([A, loc], dim=-1))                       # 9.
    return self.proj_drop(out)


class EfficientAtt(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        _build_attention(self, dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)

    forward = spec_forward


class SomeOtherAttention(nn.Module):
    """Same parameter structure, another class name."""

    def __init__(self, dim, **kw):
        super().__init__()
        _build_attention(self, dim, **kw)

    forward = spec_forward


class UpstreamBlock(nn.Module):
    def __init__(self, dim, att_cls=EfficientAtt):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.att = att_cls(dim, num_heads=8, qkv_bias=True)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x, size):
        x = x + self.att(self.norm1(x), size)
        return x + self.mlp(x)


class UpstreamNet(nn.Module):
    """Attention modules nested in ModuleList / ModuleDict / plain attributes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 40)
        self.stages = nn.ModuleList([
            nn.ModuleDict({"blocks": nn.ModuleList([UpstreamBlock(40), UpstreamBlock(40)])}),
            nn.ModuleDict({"blocks": nn.ModuleList([UpstreamBlock(80, SomeOtherAttention)])}),
        ])
        self.down = nn.Linear(40, 80)
        self.head_att = EfficientAtt(80)

    def forward(self, x, size):
        x = self.embed(x)
        for blk in self.stages[0]["blocks"]:
            x = blk(x, size)
        x = self.down(x)
        for blk in self.stages[1]["blocks"]:
            x = blk(x, size)
        return x + self.head_att(x, size)


ATT_PATHS = ["stages.0.blocks.0.att", "stages.0.blocks.1.att", "stages.1.blocks.0.att", "head_att"]


def randomize_(model, seed=0):
    """Non-trivial values everywhere, BatchNorm statistics included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("norm0.weight", "norm1.weight", "norm2.weight", "norm3.weight",
                                         "norm.weight")) else 0.0
            fan = p[0].numel() if p.dim() > 1 else 1
            p.copy_(base + torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.2 if p.dim() == 1 else fan ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype) * 1.5)
    return model


def make_net(seed=0):
    torch.manual_seed(seed)
    return randomize_(UpstreamNet(), seed).double()


# ------------------------------------------------------------------ the second oracle
@pytest.fixture(scope="module")
def golden():
    return torch.load(golden_path("gma_module.pt"), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("i", range(4))
def test_test_oracle_matches_golden(golden, i):
    if i >= len(golden):
        pytest.skip(f"the golden file has {len(golden)} cases")
    c = golden[i]
    m = EfficientAtt(c["dim"]).double()
    m.load_state_dict(c["state_dict"], strict=True)
    with torch.no_grad():
        assert_rel(m.eval()(c["x"], (c["H"], c["W"])), c["out"], FP64_TOL, "EfficientAtt eval")
    x = c["x"].clone().requires_grad_(True)
    out = m.train()(x, (c["H"], c["W"]))
    assert_rel(out, c["train_out"], FP64_TOL, "EfficientAtt train")
    (out * c["train_loss_weight"]).sum().backward()
    assert_rel(x.grad, c["train_x_grad"], FP64_TOL, "EfficientAtt x grad")
    sd = m.state_dict()
    for k, v in c["train_buffers_after"].items():
        if v.is_floating_point():
            assert_rel(sd[k], v, FP64_TOL, k)
        else:
            assert torch.equal(sd[k], v), k


# ------------------------------------------------------------------ convert
def test_is_upstream_attention():
    assert gmf_kernels.is_upstream_attention(EfficientAtt(40))
    assert gmf_kernels.is_upstream_attention(SomeOtherAttention(40))
    assert not gmf_kernels.is_upstream_attention(UpstreamBlock(40))
    assert not gmf_kernels.is_upstream_attention(gmf_kernels.GroupMixAttention(40))
    assert not gmf_kernels.is_upstream_attention(nn.Linear(4, 4))


def test_convert_replaces_every_attention_in_place():
    net = make_net()
    before_modules = dict(net.named_modules())
    assert sum(gmf_kernels.is_upstream_attention(m) for m in net.modules()) == 4
    out = gmf_kernels.convert(net)
    assert out is net
    mods = dict(net.named_modules())
    for path in ATT_PATHS:
        assert isinstance(mods[path], gmf_kernels.GroupMixAttention), path
        assert mods[path].backend == "auto"
    assert not any(isinstance(m, (EfficientAtt, SomeOtherAttention)) for m in net.modules())
    # the containers themselves are untouched
    for path in ["stages.0.blocks.0", "stages.1.blocks", "embed", "down"]:
        assert mods[path] is before_modules[path]


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap_module_params_on_conversion"])
def test_parameters_and_buffers_are_shared(swap):
    """The same Parameter and buffer objects, also under torch.__future__'s swap-on-conversion switch (there,
    load_state_dict(assign=True) swapped tensors into new Parameters: an optimizer made before convert missed
    20 of 32 parameters)."""
    net = make_net()
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        gmf_kernels.convert(net)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    new_params = dict(net.named_parameters())
    new_buffers = dict(net.named_buffers())
    assert set(new_params) == set(params) and set(new_buffers) == set(buffers)
    for k, p in new_params.items():
        assert p is params[k], f"parameter {k} is a new object"
    for k, b in new_buffers.items():
        assert b is buffers[k], f"buffer {k} is a new object"


def _assert_same_step(new, expected_model, x, size, what):
    """new and expected_model give the same output, x gradient, parameter gradients and buffers (float64)."""
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, exp = new(xa, size), expected_model(xb, size)
    assert_rel(out, exp, FP64_TOL, what)
    lw = torch.randn_like(exp)
    (out * lw).sum().backward()
    (exp * lw).sum().backward()
    assert_rel(xa.grad, xb.grad, FP64_TOL, "x grad")
    ref_params = dict(expected_model.named_parameters())
    for k, p in new.named_parameters():
        assert p.grad is not None, k
        assert_rel(p.grad, ref_params[k].grad, FP64_TOL, f"grad {k}")
    ref_buffers = dict(expected_model.named_buffers())
    for k, b in new.named_buffers():
        if b.is_floating_point():
            assert_rel(b, ref_buffers[k], FP64_TOL, k)
        else:
            assert torch.equal(b, ref_buffers[k]), k


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mode", ["eval", "train", "train_frozen_bn"])
def test_outputs_unchanged(mode, backend):
    net = make_net(1)
    original = copy.deepcopy(net)
    gmf_kernels.convert(net, backend=backend)
    for model in (net, original):
        model.train(mode != "eval")
        if mode == "train_frozen_bn":  # fine-tuning with frozen BatchNorm statistics
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
    _assert_same_step(net, original, torch.randn(2, 35, 6, dtype=torch.float64), (5, 7), f"converted ({mode}, {backend})")


def test_optimizer_step_changes_original_params():
    net = make_net(2)
    atts_before = [dict(net.named_modules())[p] for p in ATT_PATHS]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # built before the conversion
    snapshot = {id(p): p.detach().clone() for p in net.parameters()}
    gmf_kernels.convert(net, backend="torch")
    net.train()
    net(torch.randn(2, 35, 6, dtype=torch.float64), (5, 7)).square().sum().backward()
    opt.step()
    for att in atts_before:  # the original modules see the update
        for name, p in att.named_parameters():
            assert p.grad is not None, name
            assert not torch.equal(p, snapshot[id(p)]), f"{name} did not change"
            expected = snapshot[id(p)] - 0.1 * p.grad
            assert torch.allclose(p, expected, rtol=0, atol=1e-12), name
    converted = [dict(net.named_modules())[p] for p in ATT_PATHS]
    for old, new in zip(atts_before, converted):
        assert isinstance(new, gmf_kernels.GroupMixAttention)
        assert new.qkv.weight is old.qkv.weight and new.crpe.conv_list[2].bias is old.crpe.conv_list[2].bias


def test_frozen_parameters_stay_frozen():
    """A parameter frozen before the conversion (requires_grad False) stays frozen (a shared load by
    load_state_dict(assign=True) gave it the new module's flag, so a fine-tuning run's frozen layers
    trained)."""
    net = make_net(3)
    for path in ATT_PATHS:
        att = dict(net.named_modules())[path]
        att.qkv.requires_grad_(False)
        att.aggregator.norm0.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    assert not all(flags.values()) and any(flags.values())
    gmf_kernels.convert(net, backend="torch")
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    net.train()
    net(torch.randn(2, 35, 6, dtype=torch.float64), (5, 7)).square().sum().backward()
    assert all((p.grad is None) == (not flags[n]) for n, p in net.named_parameters())


def test_other_shapes_are_refused_by_name():
    """A module with the upstream structure but a tensor of another shape is refused, naming the tensor."""
    net = make_net()
    att = dict(net.named_modules())[ATT_PATHS[0]]
    att.crpe.conv_list[0].weight = nn.Parameter(torch.zeros(3, 1, 3, 3, dtype=att.qkv.weight.dtype))
    with pytest.raises(RuntimeError, match="crpe.conv_list.0.weight"):
        gmf_kernels.convert(net, backend="torch")


def test_other_class_name_same_structure_is_converted():
    net = make_net(3)
    gmf_kernels.convert(net)
    assert isinstance(net.stages[1]["blocks"][0].att, gmf_kernels.GroupMixAttention)


@pytest.mark.parametrize("cls", [EfficientAtt, SomeOtherAttention])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bare_attention_returns_group_mix_attention(cls, mode):
    torch.manual_seed(4)
    old = randomize_(cls(80, qk_scale=0.125), 4).double().train(mode == "train")
    reference_copy = copy.deepcopy(old)
    new = gmf_kernels.convert(old, backend="reference")
    assert isinstance(new, gmf_kernels.GroupMixAttention)
    assert new.backend == "reference" and new.training == (mode == "train")
    assert new.scale == 0.125
    assert new.qkv.weight is old.qkv.weight and new.aggregator.norm2.running_var is old.aggregator.norm2.running_var
    x = torch.randn(2, 20, 80, dtype=torch.float64)
    assert_rel(new(x, (4, 5)), reference_copy(x, (4, 5)), FP64_TOL, "bare convert")


def test_convert_keeps_norm_hyperparameters():
    """BatchNorm momentum/eps and LayerNorm eps of the upstream module are honoured."""
    torch.manual_seed(5)
    old = randomize_(EfficientAtt(40), 5).double().train()
    for i in range(4):
        bn = getattr(old.aggregator, f"norm{i}")
        bn.momentum, bn.eps = 0.3, 1e-3
    old.aggregator.agg0.norm.eps = 1e-2
    expected_model = copy.deepcopy(old)
    new = gmf_kernels.convert(old, backend="torch")
    x = torch.randn(2, 30, 40, dtype=torch.float64)
    assert_rel(new(x, (5, 6)), expected_model(x, (5, 6)), FP64_TOL, "train out")
    assert_rel(new.aggregator.norm1.running_mean, expected_model.aggregator.norm1.running_mean, FP64_TOL, "mean")
    new.eval()
    expected_model.eval()
    with torch.no_grad():
        assert_rel(new(x, (5, 6)), expected_model(x, (5, 6)), FP64_TOL, "eval out")


@pytest.mark.parametrize("frozen", ["norm2_frozen", "only_norm0_train"])
def test_mixed_batchnorm_modes(frozen):
    torch.manual_seed(9)
    old = randomize_(EfficientAtt(40), 9).double()
    if frozen == "norm2_frozen":
        old.train()
        old.aggregator.norm2.eval()
    else:
        old.eval()
        old.aggregator.norm0.train()
    expected_model = copy.deepcopy(old)
    new = gmf_kernels.convert(old, backend="auto")
    x = torch.randn(2, 30, 40, dtype=torch.float64)
    assert_rel(new(x, (5, 6)), expected_model(x, (5, 6)), FP64_TOL, f"out ({frozen})")
    # only the reference runs mixed BatchNorm modes: an explicit torch backend refuses, loudly
    with pytest.raises(ValueError, match="BatchNorms differ"):
        copy.deepcopy(new).set_backend("torch")(x, (5, 6))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("norms", ["untracked", "affine_false", "affine_false_eval"])
def test_batchnorms_untracked_or_without_affine(norms, backend):
    """As nn.BatchNorm2d: in training, a BatchNorm with track_running_stats=False but its buffers kept uses
    the batch statistics and leaves the buffers alone (they were updated); one with affine=False runs
    (the torch backend crashed on its missing weight) in training and eval. Output, every gradient and
    every buffer against the unconverted module."""
    torch.manual_seed(6)
    old = randomize_(EfficientAtt(40), 6).double()
    for i in range(4):
        bn = getattr(old.aggregator, f"norm{i}")
        if norms == "untracked":
            bn.track_running_stats = False
        else:
            plain = nn.BatchNorm2d(bn.num_features, affine=False).double()
            plain.load_state_dict({k: v for k, v in bn.state_dict().items() if k not in ("weight", "bias")})
            setattr(old.aggregator, f"norm{i}", plain)
    old.train(norms != "affine_false_eval")
    expected_model = copy.deepcopy(old)
    new = gmf_kernels.convert(old, backend=backend)
    _assert_same_step(new, expected_model, torch.randn(2, 30, 40, dtype=torch.float64), (5, 6), f"out ({norms})")


@pytest.mark.parametrize("backend", [
    "torch",
    "reference",
])
def test_batchnorm_momentum_none(backend):
    torch.manual_seed(6)
    old = randomize_(EfficientAtt(40), 6).double().train()
    for i in range(4):
        getattr(old.aggregator, f"norm{i}").momentum = None
    expected_model = copy.deepcopy(old)
    new = gmf_kernels.convert(old, backend=backend)
    x = torch.randn(2, 30, 40, dtype=torch.float64)
    for _ in range(2):
        new(x, (5, 6))
        expected_model(x, (5, 6))
    for i in range(4):
        n, e = getattr(new.aggregator, f"norm{i}"), getattr(expected_model.aggregator, f"norm{i}")
        assert int(n.num_batches_tracked) == int(e.num_batches_tracked) == 2
        assert_rel(n.running_mean, e.running_mean, FP64_TOL, f"norm{i}.running_mean")
        assert_rel(n.running_var, e.running_var, FP64_TOL, f"norm{i}.running_var")


def test_convert_sets_backend_everywhere():
    net = make_net(7)
    gmf_kernels.convert(net, backend="reference")
    assert [dict(net.named_modules())[p].backend for p in ATT_PATHS] == ["reference"] * 4
    gmf_kernels.convert(net, backend="torch")  # already converted: only the backend changes
    assert [dict(net.named_modules())[p].backend for p in ATT_PATHS] == ["torch"] * 4
    with pytest.raises(ValueError, match="unknown backend"):
        gmf_kernels.convert(net, backend="nope")


def test_convert_of_a_bare_group_mix_attention_sets_its_backend():
    """convert(GroupMixAttention) sets the backend on the layer itself (it was left as it was)."""
    att = gmf_kernels.GroupMixAttention(40, backend="auto")
    assert gmf_kernels.convert(att, backend="reference") is att and att.backend == "reference"


def test_convert_says_hooks_are_not_carried_over():
    """Hooks on a replaced attention module do not follow it to the GroupMixAttention: a warning says so
    (monitoring or feature-extraction hooks stopped firing, silently)."""
    net = make_net(9)
    att = dict(net.named_modules())[ATT_PATHS[0]]
    att.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match="hooks .*_forward_hooks.* not carried over"):
        gmf_kernels.convert(net, backend="reference")
    assert isinstance(dict(net.named_modules())[ATT_PATHS[0]], gmf_kernels.GroupMixAttention)


def test_convert_groupmixformer_is_noop_except_backend():
    torch.manual_seed(8)
    model = gmf_kernels.create_model("m", embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1],
                                     num_classes=10).double().eval()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    out = gmf_kernels.convert(model, backend="reference")
    assert out is model
    after_modules = dict(model.named_modules())
    assert set(after_modules) == set(modules)
    assert all(after_modules[k] is m for k, m in modules.items())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    atts = model.attention_modules()
    assert len(atts) == 4 and all(a.backend == "reference" for a in atts)
    with torch.no_grad():
        assert_rel(model(x), before, FP64_TOL, "GroupMixFormer after convert")
