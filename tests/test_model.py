"""GroupMixFormer: any input size, feature maps, backends on a whole model, stochastic depth.

Small configurations keep the CPU time down (the GMA itself is covered per width in
test_backends_parity.py; the upstream code's outputs for a tiny model, tiny_model.pt,
are tested in test_golden_model.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import gmf_kernels
from gmf_kernels.numerics import max_rel_error
from helpers import assert_max_rel_close as assert_rel

FP64_TOL = 1e-10
TINY = dict(embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1], mlp_ratios=[4, 4, 2, 2])






def randomize_bn_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(TINY, num_classes=10)
    cfg.update(kw)
    return randomize_bn_(gmf_kernels.GroupMixFormer(**cfg), seed)


def real_conv_sizes(H, W):
    """Grid of each stage, from running the stride-2/stride-1 3x3 convolutions on a probe."""
    probe = torch.zeros(1, 1, H, W)
    k = torch.zeros(1, 1, 3, 3)
    probe = F.conv2d(F.conv2d(probe, k, stride=2, padding=1), k, stride=2, padding=1)  # conv stem
    sizes = []
    for stride in (1, 2, 2, 2):
        probe = F.conv2d(probe, k, stride=stride, padding=1)
        sizes.append(tuple(probe.shape[-2:]))
    return sizes


# ------------------------------------------------------------------ any input size
SIZES = [(224, 224), (65, 97), (33, 33)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_feature_maps_any_input_size(size):
    H, W = size
    model = tiny_model(return_interm_layers=True).eval()
    assert not hasattr(model, "head")
    with torch.no_grad():
        feats = model(torch.randn(2, 3, H, W))
    assert isinstance(feats, (list, tuple)) and len(feats) == 4
    expected = real_conv_sizes(H, W)
    for i, f in enumerate(feats):
        assert f.shape == (2, TINY["embedding_dims"][i], *expected[i]), f"stage {i}: {tuple(f.shape)}"
        assert torch.isfinite(f).all()
    if size == (33, 33):  # upstream's H // 2 would give 4 at the last stages; the convolution gives 5, 3, 2
        assert expected[1:] == [(5, 5), (3, 3), (2, 2)]


@pytest.mark.parametrize("size", [(65, 97), (33, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_classifier_any_input_size(size):
    model = tiny_model().eval()
    with torch.no_grad():
        x = torch.randn(2, 3, *size)
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.shape == (2, 10)
    assert [f.shape[-2:] for f in feats] == [torch.Size(s) for s in real_conv_sizes(*size)]
    # the head is BatchNorm -> global mean -> Linear on the last map
    expected = model.head(model.norm4(feats[-1]).mean(dim=(2, 3)))
    torch.testing.assert_close(logits, expected)


def test_num_classes_zero_returns_pooled_features():
    model = tiny_model(num_classes=0).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        out = model(x)
        last = model.forward_features(x)[-1]
    assert out.shape == (2, 80)
    torch.testing.assert_close(out, model.norm4(last).mean(dim=(2, 3)))


def test_batch_elements_are_independent_in_eval():
    model = tiny_model().double().eval()
    x = torch.randn(3, 3, 33, 45, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    assert_rel(single, full[1:2], FP64_TOL, "batch element 1")


# ------------------------------------------------------------------ backends on a whole model
@pytest.mark.parametrize("size", [(33, 33), (40, 56)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_torch_vs_reference_eval(size):
    model = tiny_model(1, return_interm_layers=True).double().eval()
    ref = copy.deepcopy(model).set_backend("reference")
    model.set_backend("torch")
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got, exp = model(x), ref(x)
    for i, (g, e) in enumerate(zip(got, exp)):
        assert_rel(g, e, FP64_TOL, f"features[{i}]")


def test_torch_vs_reference_train():
    model = tiny_model(2, drop_path_rate=0.0).double().train()
    ref = copy.deepcopy(model).set_backend("reference")
    model.set_backend("torch")
    x = torch.randn(2, 3, 40, 56, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, exp = model(xa), ref(xb)
    assert_rel(out, exp, FP64_TOL, "train logits")
    lw = torch.randn_like(exp)
    (out * lw).sum().backward()
    (exp * lw).sum().backward()
    assert_rel(xa.grad, xb.grad, FP64_TOL, "input grad")
    ref_params = dict(ref.named_parameters())
    grad_scale = max(p.grad.abs().max().item() for p in ref_params.values())
    n = 0
    for k, p in model.named_parameters():
        assert p.grad is not None, k
        e = ref_params[k].grad
        if e.abs().max() <= 1e-12 * grad_scale:
            # structurally zero (a conv bias right before a train-mode BatchNorm): rounding noise only
            assert p.grad.abs().max() <= 1e-12 * grad_scale, k
        else:
            assert_rel(p.grad, e, FP64_TOL, f"grad {k}")
        n += 1
    assert n == len(ref_params)
    ref_buffers = dict(ref.named_buffers())
    for k, b in model.named_buffers():
        if b.is_floating_point():
            assert_rel(b, ref_buffers[k], FP64_TOL, k)
        else:
            assert torch.equal(b, ref_buffers[k]), k


# ------------------------------------------------------------------ stochastic depth
def test_stochastic_depth_rates():
    model = gmf_kernels.GroupMixFormer(**TINY, drop_path_rate=0.3)
    rates = [blk.drop_path.p for st in model.groupmixformer_backbone for blk in st.gma_stage]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 4), rtol=0, atol=1e-7)


def test_stochastic_depth_train_varies_eval_deterministic():
    model = tiny_model(3, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        outs = [model(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2]), \
        "train-mode outputs identical: stochastic depth inactive"
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)


def test_no_drop_path_train_is_deterministic():
    model = tiny_model(4, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# ------------------------------------------------------------------ backend selection, errors
def test_set_backend_changes_every_block():
    model = gmf_kernels.GroupMixFormer(embedding_dims=[40, 40, 80, 80], serial_depths=[2, 1, 3, 1],
                                       mlp_ratios=[4, 4, 2, 2])
    atts = model.attention_modules()
    assert len(atts) == 7
    assert all(a.backend == "auto" for a in atts)
    assert model.set_backend("reference") is model
    assert all(a.backend == "reference" for a in atts)
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("fast")
    built = gmf_kernels.create_model("m", serial_depths=[1, 1, 1, 1], backend="reference")
    assert all(a.backend == "reference" for a in built.attention_modules())


def test_set_backend_is_used(monkeypatch):
    calls = []
    rb = gmf_kernels.get_backend("reference")
    original = rb.forward
    monkeypatch.setattr(rb, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tiny_model().eval().set_backend("reference")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 4


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 3, 64, 64), (64,)], ids=["3d", "5d", "1d"])
def test_bad_input_rank(shape):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(*shape))


def test_bad_config_lengths():
    with pytest.raises(ValueError, match="4 entries"):
        gmf_kernels.GroupMixFormer(embedding_dims=[40, 80, 160], serial_depths=[1, 1, 1], mlp_ratios=[4, 4, 4])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_whole_model_under_autocast(backend):
    """Under autocast the tokens reaching attention are already bf16 while the parameters
    stay float32: that must run, and stay close to the float32 model."""
    torch.manual_seed(11)
    m = gmf_kernels.GroupMixFormer([40, 40, 80, 80], [1, 1, 1, 1], [2, 2, 2, 2], num_classes=10,
                                   backend=backend).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == torch.bfloat16
    assert max_rel_error(out, ref) < 0.1
