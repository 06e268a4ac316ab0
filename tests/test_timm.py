"""timm integration: what a timm user does on day one.

`import gmf_kernels` registers groupmixformer_m|t|s|b|l with timm when timm is imported (before or after it).
These tests skip (with the reason) where timm cannot be imported, e.g. the main test venv,
whose CPU torch has no matching torchvision; CI runs them in a second venv with timm
(.venv-timm, see .ci/run), with GMF_REQUIRE_TIMM=1 turning the skip into a failure.
"""
import copy
import os

import pytest
import torch

try:
    import timm
    import timm.data
    import timm.optim
    TIMM_IMPORT_ERROR = None
except Exception as e:  # not installed, or its torchvision does not match this torch
    TIMM_IMPORT_ERROR = f"{type(e).__name__}: {e}"

if TIMM_IMPORT_ERROR is not None and os.environ.get("GMF_REQUIRE_TIMM") == "1":
    raise RuntimeError(f"GMF_REQUIRE_TIMM=1 but timm cannot be imported: {TIMM_IMPORT_ERROR}")

pytestmark = pytest.mark.skipif(TIMM_IMPORT_ERROR is not None,
                                reason=f"timm cannot be imported here ({TIMM_IMPORT_ERROR}); CI runs these "
                                       f"tests in .venv-timm")

import gmf_kernels as gmf  # noqa: E402
from gmf_kernels.models import PretrainedWeightsNotFound  # noqa: E402

NAMES = ["groupmixformer_m", "groupmixformer_t", "groupmixformer_s", "groupmixformer_b", "groupmixformer_l"]
#: published parameter counts (the golden state_dict manifest: upstream's models, 1000 classes)
PARAMS = {"groupmixformer_m": 5733120, "groupmixformer_t": 10949152, "groupmixformer_s": 22421320,
          "groupmixformer_b": 45827272, "groupmixformer_l": 71833648}
SHALLOW = dict(serial_depths=[1, 1, 1, 1])  # one block per stage: the same interface, less CPU


def seeded(model, seed):
    """Random weights and BatchNorm statistics, so that a wrong load cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
    return model


def save_upstream(model, path, key="model"):
    torch.save({key: model.state_dict()}, path)
    return path


def test_registered_after_import():
    assert gmf.models.TIMM_REGISTRATION_ERROR is None
    assert sorted(timm.list_models("groupmixformer*")) == sorted(NAMES)
    for name in NAMES:
        assert timm.is_model(name)
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
        assert cfg.first_conv == "conv_stem.proj1" and cfg.classifier == "head" and cfg.num_classes == 1000
        assert cfg.license == "mit"


def test_registered_when_timm_is_imported_after_gmf_kernels():
    """The other order: `import gmf_kernels` first (it does not import timm), then timm."""
    import subprocess
    import sys
    code = ("import sys, gmf_kernels; assert 'timm' not in sys.modules; import timm; "
            "m = timm.create_model('groupmixformer_m', num_classes=3); "
            "assert isinstance(m, gmf_kernels.GroupMixFormer) and m.num_classes == 3; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@pytest.mark.parametrize("name", NAMES)
def test_create_model_each_size(name):
    model = timm.create_model(name).eval()
    assert isinstance(model, gmf.GroupMixFormer)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.num_features == model.embedding_dims[-1] and model.num_classes == 1000
    assert model.pretrained_cfg["architecture"] == name
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875
    assert tuple(data["mean"]) == (0.485, 0.456, 0.406)
    with torch.no_grad():
        feat = model.forward_features(torch.randn(1, 3, 64, 64))
        out = model.forward_head(feat)
    assert feat.shape == (1, model.embedding_dims[-1], 2, 2) and out.shape == (1, 1000)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,), (0, 1)], ids=str)
@pytest.mark.parametrize("name", ["groupmixformer_m", "groupmixformer_t"])
def test_features_only_matches_feature_info(name, out_indices, tmp_path):
    full = seeded(timm.create_model(name, **SHALLOW), 1).eval()
    path = save_upstream(full, tmp_path / "ckpt.pth")
    feats = timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **SHALLOW).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        outs = feats(x)
        exp = full.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    channels, reductions = feats.feature_info.channels(), feats.feature_info.reduction()
    assert len(outs) == len(out_indices) == len(channels)
    for o, e, c, r in zip(outs, exp, channels, reductions):
        assert o.shape == (2, c, 96 // r, 64 // r)
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)
    # stages after the last one taken are pruned, like the head
    assert len(feats.model.groupmixformer_backbone) == max(out_indices) + 1


def test_pretrained_upstream_checkpoint_num_classes_10(tmp_path):
    """The day-one fine-tuning path: an upstream {"model": sd} file of the real -S, 1000
    classes, into num_classes=10 through timm's pretrained loading: the head is dropped
    and freshly initialised, everything else (norm4 included) loaded."""
    src = seeded(gmf.create_model("groupmixformer_s"), 2)
    path = save_upstream(src, tmp_path / "groupmixformer_small.pth")
    model = timm.create_model("groupmixformer_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=10)
    sd, own = src.state_dict(), model.state_dict()
    assert set(own) == set(sd)
    for k, v in own.items():
        if k.startswith("head."):
            assert v.shape[0] == 10
        else:
            assert torch.equal(v, sd[k]), k
    assert model.get_classifier().out_features == 10
    ref = copy.deepcopy(src).eval()
    ref.reset_classifier(10)
    ref.head.load_state_dict(model.head.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("key", ["model", "model_ema"])
def test_timm_and_gmf_create_model_agree(key, tmp_path):
    src = seeded(gmf.create_model("groupmixformer_t", **SHALLOW), 3)
    path = save_upstream(src, tmp_path / "t.pth", key)
    a = gmf.create_model("groupmixformer_t", checkpoint=path, **SHALLOW)
    b = timm.create_model("groupmixformer_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **SHALLOW).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        la, lb = a(x), b(x)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert la.shape == (2, 1000)
    # timm's own checkpoint_path= (timm.models.load_checkpoint) reads the upstream file too
    c = timm.create_model("groupmixformer_t", checkpoint_path=str(path), **SHALLOW).eval()
    with torch.no_grad():
        torch.testing.assert_close(c(x), la, rtol=0, atol=0)


def test_pretrained_from_env_dir_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("GMF_PRETRAINED_DIR", str(tmp_path / "weights"))
    with pytest.raises(PretrainedWeightsNotFound) as info:
        timm.create_model("groupmixformer_m", pretrained=True, **SHALLOW)
    msg = str(info.value)
    assert "groupmixformer_miny.pth" in msg and "sharepoint.com" in msg
    assert str(tmp_path / "weights" / "groupmixformer_miny.pth") in msg
    assert "pretrained_cfg_overlay=dict(file=PATH)" in msg
    with pytest.raises(PretrainedWeightsNotFound, match="nowhere.pth"):
        timm.create_model("groupmixformer_m", pretrained=True, pretrained_cfg_overlay=dict(file="nowhere.pth"))
    src = seeded(gmf.create_model("groupmixformer_m", **SHALLOW), 4)
    (tmp_path / "weights").mkdir()
    save_upstream(src, tmp_path / "weights" / "groupmixformer_miny.pth")
    model = timm.create_model("groupmixformer_m", pretrained=True, **SHALLOW)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_timm_training_helpers():
    model = timm.create_model("groupmixformer_m", **SHALLOW, num_classes=5)
    groups = timm.optim.param_groups_weight_decay(model, 0.05, model.no_weight_decay())
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    # layer-wise lr decay goes through group_matcher
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n
    assert len({g["lr_scale"] for g in opt.param_groups}) > 2
    model.set_grad_checkpointing(True)
    out = model.train()(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert model.head.weight.grad is not None


def test_test_time_pooling_sees_norm4():
    """timm's test-time pooling (validate.py --test-pool: TestTimePoolHead) runs forward_features, pools and applies
    the head as a 1x1 convolution; norm4 (a BatchNorm2d on the unpooled map) belongs to forward_features, else it
    was skipped (logits 0.89 off, silently). Pooled over the whole 2x2 map it is forward(x)."""
    from timm.layers import TestTimePoolHead
    model = seeded(timm.create_model("groupmixformer_m", num_classes=10, **SHALLOW), 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = TestTimePoolHead(model, original_pool=2).eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_off_unless_asked():
    """timm's models have no stochastic depth unless asked (train.py passes drop_path_rate=None without --drop-path,
    and timm drops None arguments): the timm entry points do not take upstream's training value (0.1-0.5);
    gmf.create_model keeps it."""
    def rates(m):
        return [b.drop_path.p for b in m.modules() if type(b).__name__ == "GMABlock"]
    assert max(rates(timm.create_model("groupmixformer_b", **SHALLOW))) == 0.0
    assert max(rates(timm.create_model("groupmixformer_b", drop_path_rate=None, **SHALLOW))) == 0.0
    assert max(rates(timm.create_model("groupmixformer_b", drop_path_rate=0.3, **SHALLOW))) == pytest.approx(0.3)
    assert max(rates(gmf.create_model("groupmixformer_b", **SHALLOW))) == pytest.approx(0.5)
