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
from helpers import randomize_bn_stats_

FP64_TOL = 1e-10
TINY = dict(embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1], mlp_ratios=[4, 4, 2, 2])






def randomize_bn_(model, seed=0):
    """Non-trivial BatchNorm statistics and biases."""
    g = torch.Generator().manual_seed(seed)
    randomize_bn_stats_(model, seed)
    with torch.no_grad():
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
        feats = model.forward_intermediates(x, intermediates_only=True)
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
        last = model.forward_features(x)  # the last map
    assert out.shape == (2, 80)
    torch.testing.assert_close(out, last.mean(dim=(2, 3)))   # forward_features ends with norm4


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


@pytest.mark.parametrize("make_x, exc, fragment", [
    (lambda: torch.randn(1, 4, 32, 32), ValueError, "3 channels"),
    (lambda: torch.randn(1, 32, 32, 3), ValueError, "channels last?"),
    (lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point images"),
    (lambda: [[0.0]], TypeError, "image tensor")], ids=["channels", "nhwc", "uint8", "list"])
def test_bad_images_named(make_x, exc, fragment):
    """The model names what is wrong with its input (it raised torch's convolution error)."""
    model = tiny_model().eval()
    with pytest.raises(exc, match=fragment):
        model(make_x())


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


# ------------------------------------------------------------------ eval-mode BatchNorm folded into the convolutions
from gmf_kernels import folding  # noqa: E402
from gmf_kernels.models import conv_bn as conv_bn_mod  # noqa: E402
from helpers import assert_within_reference_error  # noqa: E402


def _cached_fold_weight(norm):
    """The folded convolution weight cached for this BatchNorm (`conv_bn.folded_conv_bn`)."""
    return folding._DERIVED[norm][("conv_bn", float(norm.eps))][1][0]

N_STEM_EMBED_BN = 2 + 4  # conv_stem.norm1, norm2 and patch_embed_layers.{0..3}.norm


def count_batch_norm_calls(monkeypatch):
    calls = []
    original = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("size", [(33, 45), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("interm", [False, True], ids=["logits", "features"])
def test_bn_fold_eval_equals_unfolded_float64(size, interm, monkeypatch):
    model = tiny_model(5, return_interm_layers=interm).double().eval()
    unfolded = copy.deepcopy(model).set_bn_folding(False)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    calls = count_batch_norm_calls(monkeypatch)
    with torch.no_grad():
        got = model(x)
        n_folded = len(calls)
        exp = unfolded(x)
    head_bn = 0 if interm else 1  # norm4
    assert n_folded == head_bn, "stem / patch-embedding BatchNorms still run in eval mode"
    assert len(calls) - n_folded == head_bn + N_STEM_EMBED_BN
    for i, (g, e) in enumerate(zip(got if interm else [got], exp if interm else [exp])):
        assert_rel(g, e, 1e-12, f"output {i}")


def test_bn_fold_single_layers_float64():
    """conv_bn(x, conv, bn) against bn(conv(x)) for the stem and a patch embedding's pointwise
    convolution, BatchNorm with and without affine, conv with and without bias."""
    torch.manual_seed(1)
    for conv, bn in [(torch.nn.Conv2d(3, 20, 3, 2, 1), torch.nn.BatchNorm2d(20)),
                     (torch.nn.Conv2d(40, 80, 1, bias=False), torch.nn.BatchNorm2d(80)),
                     (torch.nn.Conv2d(8, 6, 3, 1, 1), torch.nn.BatchNorm2d(6, affine=False))]:
        conv, bn = conv.double(), bn.double()
        randomize_bn_(torch.nn.Sequential(conv, bn), 3)
        with torch.no_grad():
            if bn.weight is not None:
                bn.weight.copy_(0.5 + torch.rand_like(bn.weight))
        bn.eval()
        x = torch.randn(2, conv.in_channels, 9, 11, dtype=torch.float64)
        with torch.no_grad():
            assert conv_bn_mod.can_fold(conv, bn)
            assert_rel(conv_bn_mod.conv_bn(x, conv, bn), bn(conv(x)), 1e-12, f"{conv}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_pointwise_conv_bn_as_linear_float32(bias):
    """A folded 1x1 convolution of a channels-last float32 image runs as oneDNN's linear over the
    pixels (`conv_bn._pointwise_as_linear`): against float64 bn(conv(x)) within 2x the error of
    float32 F.conv2d, the result channels-last; an NCHW input keeps the convolution."""
    torch.manual_seed(2)
    conv, bn = torch.nn.Conv2d(24, 40, 1, bias=bias), torch.nn.BatchNorm2d(40)
    randomize_bn_(torch.nn.Sequential(conv, bn), 4)
    bn.eval()
    x = torch.randn(3, 24, 9, 13).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        oracle = bn.double()(conv.double()(x.double()))
        conv, bn = conv.float(), bn.float()
        lowp = bn(conv(x))
        w, b = conv_bn_mod.folded_conv_bn(x, conv, bn)
        assert conv_bn_mod._pointwise_as_linear(x, conv, w, b) == conv_bn_mod.use_onednn_linear(x, w, b)
        assert not conv_bn_mod._pointwise_as_linear(x.contiguous(), conv, w, b)
        got = conv_bn_mod.conv_bn(x, conv, bn)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_within_reference_error(got, lowp, oracle, name="1x1 conv_bn")


def test_model_tokens_are_contiguous_rows():
    """The stem runs channels-last, so every block's tokens are contiguous (B, N, C) rows (not a
    transposed NCHW view, which each LayerNorm would copy)."""
    model = tiny_model(3).eval()
    layouts = []
    for m in model.modules():
        if type(m).__name__ == "GMABlock":
            m.register_forward_pre_hook(lambda mod, args: layouts.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 80))
    assert layouts and all(layouts), layouts


def test_bn_fold_cache_hit_and_invalidation():
    """The fold is cached (same tensors on the next call) and rebuilt after an in-place change
    of any parameter or buffer it comes from, after load_state_dict and after a dtype change."""
    model = tiny_model(6).double().eval()
    reference = copy.deepcopy(model).set_bn_folding(False)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    norm1 = model.conv_stem.norm1

    def check(what):
        with torch.no_grad():
            assert_rel(model(x), reference(x), 1e-12, what)

    check("first call")
    cached = _cached_fold_weight(norm1)
    check("second call")
    assert _cached_fold_weight(norm1) is cached, "cache not hit"
    edits = [("conv_stem.norm1.running_var", lambda t: t.mul_(1.7)),
             ("conv_stem.norm2.running_mean", lambda t: t.add_(0.3)),
             ("conv_stem.proj1.weight", lambda t: t.mul_(-0.5)),
             ("conv_stem.proj2.bias", lambda t: t.add_(0.2)),
             ("patch_embed_layers.2.norm.weight", lambda t: t.mul_(2.0)),
             ("patch_embed_layers.3.norm.bias", lambda t: t.sub_(0.4)),
             ("patch_embed_layers.1.proj.pointwise_conv.weight", lambda t: t.mul_(1.3))]
    for name, edit in edits:
        with torch.no_grad():
            edit(model.get_parameter(name) if "running" not in name else model.get_buffer(name))
            edit(reference.get_parameter(name) if "running" not in name else reference.get_buffer(name))
        check(f"after an in-place change of {name}")
    assert _cached_fold_weight(norm1) is not cached
    other = tiny_model(7).double()
    model.load_state_dict(other.state_dict())
    reference.load_state_dict(other.state_dict())
    check("after load_state_dict")
    model.float(), reference.float()
    with torch.no_grad():
        assert_rel(model(x.float()), reference(x.float()), 1e-5, "after .float()")
    assert _cached_fold_weight(norm1).dtype == torch.float32


def test_bn_fold_follows_batch_norm_adaptation():
    """Test-time BatchNorm adaptation: the model in eval, only its BatchNorms set to train for a few no_grad
    forwards on new data, then back to eval. nn.BatchNorm2d's training forward updates the running statistics
    inside its kernel without bumping their version counters (only num_batches_tracked's), so the stem's cached
    fold kept the old statistics (1.2 off); the fold's stamp now includes num_batches_tracked."""
    model = tiny_model(8).double().eval()
    reference = copy.deepcopy(model).set_bn_folding(False)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        model(x), reference(x)   # the folds cached
        for m in (model, reference):
            for bn in m.modules():
                if isinstance(bn, torch.nn.BatchNorm2d):
                    bn.train()
            m(3 * x + 1)
            for bn in m.modules():
                if isinstance(bn, torch.nn.BatchNorm2d):
                    bn.eval()
        assert_rel(model(x), reference(x), 1e-12, "after BatchNorm adaptation")


def test_bn_fold_and_gma_folding_see_data_writes_after_eval_or_clear():
    """Writes through ``.data`` (not seen by the version counters) reach the folded stem and patch
    embeddings and the GMA layers' folding at the next eval call after ``model.eval()`` or
    `gmf_kernels.clear_weight_cache(model)`; a model that has run an eval call pickles (torch.save)."""
    import io
    model = tiny_model(8).double().eval()
    reference = copy.deepcopy(model).set_bn_folding(False).set_backend("reference")
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)

    def check(what):
        with torch.no_grad():
            assert_rel(model(x), reference(x), 1e-12, what)

    check("first call")
    for how in ("eval", "clear"):
        for name in ("conv_stem.norm1.running_var", "patch_embed_layers.2.norm.weight",
                     "groupmixformer_backbone.1.gma_stage.0.att.qkv.weight"):
            t = model.get_parameter(name) if "running" not in name else model.get_buffer(name)
            r = reference.get_parameter(name) if "running" not in name else reference.get_buffer(name)
            t.data.mul_(1.5)
            r.data.mul_(1.5)
        if how == "eval":
            model.eval()
        else:
            gmf_kernels.clear_weight_cache(model)
        check(f"after .data writes and {how}")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(x), model(x))


def test_bn_fold_state_dict_and_train_mode_unchanged(monkeypatch):
    """Folding adds nothing to the state_dict; training mode runs every BatchNorm (batch
    statistics, running-stat updates) exactly as without folding."""
    model = tiny_model(8).double()
    keys = list(model.state_dict())
    unfolded = copy.deepcopy(model).set_bn_folding(False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        model.eval()(x)
    assert list(model.state_dict()) == keys
    model.train(), unfolded.train()
    calls = count_batch_norm_calls(monkeypatch)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, exp = model(xa), unfolded(xb)
    assert len(calls) == 2 * (N_STEM_EMBED_BN + 1)
    assert_rel(out, exp, 1e-12, "train logits")
    (out.sum()).backward()
    (exp.sum()).backward()
    assert_rel(xa.grad, xb.grad, 1e-12, "train input grad")
    ref_buffers = dict(unfolded.named_buffers())
    for k, b in model.named_buffers():
        if b.is_floating_point():
            assert_rel(b, ref_buffers[k], 1e-12, k)
        else:
            assert torch.equal(b, ref_buffers[k]), k


def test_bn_fold_eval_gradients():
    """Eval mode with gradients (frozen-BatchNorm fine-tuning): the fold is differentiable and
    the gradients of every parameter equal the unfolded model's."""
    model = tiny_model(9, drop_path_rate=0.0).double().eval()
    unfolded = copy.deepcopy(model).set_bn_folding(False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lw = torch.randn(2, 10, dtype=torch.float64)
    (model(x) * lw).sum().backward()
    (unfolded(x) * lw).sum().backward()
    ref = dict(unfolded.named_parameters())
    for k, p in model.named_parameters():
        assert_rel(p.grad, ref[k].grad, 1e-10, f"grad {k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bn_fold_low_precision(dtype):
    """In bf16/fp16 the folded stem, patch embedding and model are no worse than 2x the unfolded
    model's own error against the float64 oracle (the unfolded model in float64, from the same
    rounded weights and input)."""
    if dtype == torch.float16:
        try:
            F.conv2d(torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 3, 3, dtype=dtype))
        except RuntimeError:
            pytest.skip("float16 convolution not implemented on this CPU build")
    low = tiny_model(10, return_interm_layers=True).eval().set_backend("torch").to(dtype)
    low_unfolded = copy.deepcopy(low).set_bn_folding(False)
    oracle = copy.deepcopy(low_unfolded).double()
    x = torch.randn(2, 3, 32, 32).to(dtype)
    with torch.no_grad():
        stem = (low.conv_stem(x), low_unfolded.conv_stem(x), oracle.conv_stem(x.double()))
        assert_within_reference_error(*stem, name="conv_stem")
        embed = [m.patch_embed_layers[0](t)[0] for m, t in zip((low, low_unfolded, oracle), stem)]
        assert_within_reference_error(*embed, name="patch_embed_layers.0")
        feats = low(x), low_unfolded(x), oracle(x.double())
    for i in range(4):
        assert_within_reference_error(feats[0][i], feats[1][i], feats[2][i], name=f"features[{i}]")


def test_bn_fold_skipped_where_inexact_or_hooked():
    """No fold (and the module's own forward runs) in training mode, without running statistics,
    or with a hook on the convolution or the BatchNorm; set_bn_folding(False) turns it off."""
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
    assert conv_bn_mod.can_fold(conv, bn)
    assert any("training" in r for r in conv_bn_mod.fold_reasons(conv, torch.nn.BatchNorm2d(4)))
    assert any("running statistics" in r
               for r in conv_bn_mod.fold_reasons(conv, torch.nn.BatchNorm2d(4, track_running_stats=False).eval()))
    assert conv_bn_mod.fold_reasons(conv, torch.nn.GroupNorm(2, 4))
    assert conv_bn_mod.fold_reasons(torch.nn.Conv1d(3, 4, 3), bn)
    model = tiny_model(11).eval()
    seen = []
    handle = model.conv_stem.norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert len(seen) == 1, "forward hook on a BatchNorm did not fire"
    handle.remove()
    handle = model.patch_embed_layers[1].proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(x)
    assert len(seen) == 2, "forward hook on a patch embedding's SeparableConv2d did not fire"
    handle.remove()
    # a BatchNorm without running statistics normalises with the batch's even in eval mode
    m2 = tiny_model(12).eval()
    m2.conv_stem.norm2 = torch.nn.BatchNorm2d(m2.conv_stem.norm2.num_features, track_running_stats=False).eval()
    assert not conv_bn_mod.can_fold(m2.conv_stem.proj2, m2.conv_stem.norm2)
    ref = copy.deepcopy(m2).set_bn_folding(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_rel(m2(x), ref(x), 1e-6, "BatchNorm without running statistics")


def test_model_built_under_inference_mode():
    """Parameters that are inference tensors keep no version counter: the caches (BatchNorm
    folds, the torch backend's packed weights) are skipped, the model still runs."""
    torch.manual_seed(13)
    with torch.inference_mode():
        model = tiny_model(13).eval().set_backend("torch")
        x = torch.randn(1, 3, 32, 32)
        out = model(x)
        assert next(model.parameters()).is_inference()
    ref = tiny_model(13).eval().set_backend("reference")
    with torch.no_grad():
        assert_rel(out, ref(x.clone()), 1e-5, "model built under inference_mode")


@pytest.mark.parametrize("C", [40, 120, 360])
def test_folded_depthwise_weights_are_tap_major(C):
    """The fused kernels' depthwise filters (`folding.FoldedGMAWeights`) are tap-major, (k, k,
    channels): element [ky, kx, c] is the parameter's [c, 0, ky, kx], contiguous, for each of the
    seven; `weight_shapes` says the same, and `channels_first` inverts `taps_first`."""
    from gmf_kernels.folding import channels_first, fold_eval, taps_first, weight_shapes
    from gmf_kernels.numerics import default_hyper, random_gma_weights
    w = random_gma_weights(C, seed=C, dtype=torch.float64)
    f = fold_eval(w, default_hyper(C), torch.float64)
    params = {"dw3": w.dw_weight[0], "dw5": w.dw_weight[1], "dw7": w.dw_weight[2], "local_dw": w.local_dw_weight,
              "crpe_w3": w.crpe_weight[0], "crpe_w5": w.crpe_weight[1], "crpe_w7": w.crpe_weight[2]}
    shapes = weight_shapes(C)
    for name, p in params.items():
        t = getattr(f, name)
        c, _, k, _ = p.shape
        assert tuple(t.shape) == shapes[name] == (k, k, c) and t.is_contiguous(), name
        ky, kx, ch = torch.randint(k, ()), torch.randint(k, ()), torch.randint(c, ())
        assert t[ky, kx, ch] == p[ch, 0, ky, kx], name
        assert torch.equal(channels_first(t), p[:, 0]) and torch.equal(taps_first(p[:, 0]), t), name


def test_drop_path_one_drops_every_sample():
    """DropPath(p=1) in training: every sample's branch dropped (zeros, as timm's DropPath), not 0/0 (NaN)."""
    from gmf_kernels.models.groupmixformer import DropPath
    out = DropPath(1.0).train()(torch.randn(3, 5, 8))
    assert torch.equal(out, torch.zeros(3, 5, 8))


def test_forward_intermediates_norm_true_applies_norm4_once():
    """forward_intermediates(norm=True) in training: norm4 (a BatchNorm) runs once a call, its output both the last
    intermediate and the final output (it ran twice: two running-statistics updates a step)."""
    model = tiny_model(9).train()
    before = int(model.norm4.num_batches_tracked)
    final, maps = model.forward_intermediates(torch.randn(2, 3, 32, 32), norm=True)
    assert int(model.norm4.num_batches_tracked) == before + 1
    assert final is maps[-1]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_float32_layer_norm_of_a_16_bit_layer_takes_one_dtype(backend, monkeypatch):
    """A fp16 layer with its LayerNorm kept in fp32: F.layer_norm gets one dtype (CUDA's has no mixed-dtype
    kernel, 'expected scalar type Half but found Float'); normalised in fp32 as the fused kernels do."""
    seen = []
    real = F.layer_norm

    def spy(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, None if weight is None else weight.dtype))
        return real(x, shape, weight, bias, eps)
    monkeypatch.setattr(F, "layer_norm", spy)
    m = gmf_kernels.GroupMixAttention(40, 8, qkv_bias=True, backend=backend).half()
    m.aggregator.agg0.norm.float()
    out = m(torch.randn(2, 30, 40).half(), (5, 6))
    assert out.dtype == torch.float16 and seen and all(a == b for a, b in seen), seen
