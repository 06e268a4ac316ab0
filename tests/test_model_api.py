"""GroupMixFormer's timm-style interface and checkpoint loading, without timm.

forward_features / forward_head / forward_intermediates / prune_intermediate_layers,
feature_info, get_classifier / reset_classifier, set_grad_checkpointing, no_weight_decay,
checkpoint_filter_fn, load_checkpoint (fine-tuning to another number of classes, EMA and
DDP checkpoints, hints, files that are not checkpoints) and the pretrained-file lookup.
Tiny random models (one block per stage) on 64x64 inputs keep it fast; timm itself is
exercised in test_timm.py.
"""
import argparse
import copy
import os

import pytest
import torch

import gmf_kernels as gmf
from gmf_kernels.models import CheckpointFormatError, PretrainedWeightsNotFound, checkpoint_filter_fn
from gmf_kernels.models.pretrained import PRETRAINED_CFGS
from helpers import assert_max_rel_close as assert_rel
from helpers import randomize_bn_stats_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(embedding_dims=[40, 40, 80, 80], serial_depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2])
FP64_TOL = 1e-12
SIZE = (64, 64)


def tiny(seed=0, name="groupmixformer_m", **kw):
    torch.manual_seed(seed)
    cfg = dict(TINY, num_classes=10, backend="torch")
    cfg.update(kw)
    return randomize_bn_stats_(gmf.create_model(name, **cfg), seed)


def images(b=2, size=SIZE, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(b, 3, *size, dtype=dtype, generator=g)


# ------------------------------------------------------------------ forward_features / forward_head
def test_forward_features_is_last_map_and_head_composes():
    model = tiny(1).double().eval()
    x = images()
    with torch.no_grad():
        feat = model.forward_features(x)
        logits = model(x)
        pooled = model.forward_head(feat, pre_logits=True)
        maps = model.forward_intermediates(x, intermediates_only=True)
        final, _ = model.forward_intermediates(x)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
    assert feat.shape == (2, 80, 2, 2)  # 64 / 32
    # timm's convention: forward_features (and forward_intermediates' final output) end with the model's final
    # norm of the unpooled map (norm4, as swin's norm, efficientnet's bn2), so that tools built on forward_features
    # (timm's test-time pooling) see it
    assert_rel(feat, model.norm4(maps[-1]), FP64_TOL, "forward_features vs norm4(the last intermediate)")
    assert_rel(final, feat, FP64_TOL, "forward_intermediates' final output")
    assert_rel(normed[-1], feat, FP64_TOL, "the last intermediate with norm=True")
    assert_rel(model.forward_head(feat), logits, FP64_TOL, "forward_head(forward_features(x)) vs forward(x)")
    assert_rel(pooled, feat.mean(dim=(2, 3)), FP64_TOL, "pre_logits")
    assert_rel(model.head(pooled), logits, FP64_TOL, "head(pre_logits)")
    assert model.num_features == model.head_hidden_size == 80
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model.forward_head(pooled)


def test_dense_backbone_path_unchanged():
    """return_interm_layers=True: forward gives the four maps (upstream), no norm4/head, and
    the maps equal the classifier model's intermediates with the same weights."""
    full = tiny(2).double().eval()
    backbone = tiny(3, return_interm_layers=True).double().eval()
    gmf.load_checkpoint(backbone, full.state_dict())  # drops norm4/head
    x = images()
    with torch.no_grad():
        feats = backbone(x)
        exp = full.forward_intermediates(x, intermediates_only=True)
        last = backbone.forward_features(x)
    assert isinstance(feats, list) and len(feats) == 4
    for i, (f, e) in enumerate(zip(feats, exp)):
        assert_rel(f, e, FP64_TOL, f"map {i}")
    assert_rel(last, exp[-1], FP64_TOL, "backbone forward_features")
    for call in (backbone.get_classifier, lambda: backbone.reset_classifier(3),
                 lambda: backbone.forward_head(last)):
        with pytest.raises(RuntimeError, match="return_interm_layers"):
            call()


# ------------------------------------------------------------------ forward_intermediates, feature_info
@pytest.mark.parametrize("indices, expected", [(None, [0, 1, 2, 3]), (2, [2, 3]), ([0, 2], [0, 2]),
                                               ((-1,), [3]), ([1, -3], [1]), ([3, 0], [0, 3])],
                         ids=["all", "last2", "0,2", "-1", "dup", "unsorted"])
def test_forward_intermediates_indices(indices, expected):
    """timm's convention: maps in stage order, each stage once."""
    model = tiny(4).double().eval()
    x = images(seed=4)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        final, taken = model.forward_intermediates(x, indices=indices)
    assert len(taken) == len(expected)
    for t, i in zip(taken, expected):
        assert_rel(t, every[i], FP64_TOL, f"stage {i}")
    assert_rel(final, model.norm4(every[3]), FP64_TOL, "final map (after norm4, timm's convention)")


def test_forward_intermediates_norm_fmt_stop_early():
    model = tiny(5).double().eval()
    x = images(seed=5)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    assert_rel(normed[0], every[1], FP64_TOL, "norm=True leaves an inner stage alone")
    assert_rel(normed[1], model.norm4(every[3]), FP64_TOL, "norm=True: norm4 on the last stage")
    for a, b in zip(nhwc, every):
        assert_rel(a, b.permute(0, 2, 3, 1), FP64_TOL, "NHWC")
    ran = []
    hooks = [st.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, st in enumerate(model.groupmixformer_backbone)]
    with torch.no_grad():
        final, taken = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
    for h in hooks:
        h.remove()
    assert ran == [0, 1], f"stop_early ran stages {ran}"
    assert_rel(final, every[1], FP64_TOL, "stop_early final")
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="1..4"):
        model.forward_intermediates(x, indices=5)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("size", [(64, 64), (96, 64)], ids=["64x64", "96x64"])
def test_feature_info_matches_maps(size):
    model = tiny(6).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert len(model.feature_info) == 4
    for info, m in zip(model.feature_info, maps):
        assert m.shape[1] == info["num_chs"]
        assert m.shape[2:] == (size[0] // info["reduction"], size[1] // info["reduction"])
        assert model.get_submodule(info["module"]) is not None
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]


def test_prune_intermediate_layers():
    model = tiny(7).double().eval()
    pruned = copy.deepcopy(model)
    x = images(seed=7)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
    taken = pruned.prune_intermediate_layers([0, -3])
    assert taken == [0, 1]
    assert len(pruned.groupmixformer_backbone) == 2 and len(pruned.patch_embed_layers) == 2
    assert isinstance(pruned.head, torch.nn.Identity) and pruned.num_features == 40
    with torch.no_grad():
        got = pruned.forward_intermediates(x, indices=taken, intermediates_only=True)
    for i, g in zip(taken, got):
        assert_rel(g, every[i], FP64_TOL, f"pruned stage {i}")


# ------------------------------------------------------------------ classifier
def test_reset_classifier():
    model = tiny(8).double().eval()
    x = images(seed=8)
    assert model.get_classifier() is model.head
    with torch.no_grad():
        feat = model.forward_features(x)
        pooled = model.forward_head(feat, pre_logits=True)
    model.reset_classifier(5)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 5 and head.in_features == 80
    assert head.weight.dtype == torch.float64 and model.num_classes == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        assert_rel(model(x), head(pooled), FP64_TOL, "new head on the same pooled features")
    model.reset_classifier(0)
    with torch.no_grad():
        assert_rel(model(x), pooled, FP64_TOL, "num_classes=0: pooled features")
    model.reset_classifier(0, global_pool="")
    with torch.no_grad():
        assert_rel(model(x), feat, FP64_TOL, "global_pool='': the normalised map (forward_features)")
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(3, global_pool="")
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")
    model.reset_classifier(3, global_pool="avg")
    with torch.no_grad():
        assert model(x).shape == (2, 3)


def test_no_weight_decay_and_group_matcher():
    model = tiny(9)
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert isinstance(nwd, set) and nwd <= set(names), nwd - set(names)
    gm = model.group_matcher()
    import re
    stem = re.compile(gm["stem"])
    assert stem.match("conv_stem.proj1.weight") and stem.match("patch_embed_layers.0.norm.weight")
    assert not stem.match("groupmixformer_backbone.0.gma_stage.0.norm1.weight")


# ------------------------------------------------------------------ gradient checkpointing
def _train_step(model, x, lw):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * lw).sum().backward()
    return out.detach(), x.grad


def test_grad_checkpointing_same_results_and_recomputes():
    """Same output, input and parameter gradients and BatchNorm running statistics as without
    checkpointing (stochastic depth active: the RNG is replayed); each block runs twice."""
    base = tiny(10, drop_path_rate=0.3).double().train()
    ckpt = copy.deepcopy(base)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and not base.grad_checkpointing
    x = images(seed=10)
    lw = torch.randn(2, 10, dtype=torch.float64)
    calls = []
    for st in ckpt.groupmixformer_backbone:  # counted in forward itself: torch runs no hooks in the recompute
        for blk in st.gma_stage:
            blk.forward = lambda *a, _f=blk.forward: calls.append(1) or _f(*a)
    torch.manual_seed(123)
    out_a, gx_a = _train_step(base, x, lw)
    torch.manual_seed(123)
    out_b, gx_b = _train_step(ckpt, x, lw)
    assert len(calls) == 2 * 4, f"{len(calls)} block forwards: checkpointing did not recompute"
    assert_rel(out_b, out_a, FP64_TOL, "output")
    assert_rel(gx_b, gx_a, 1e-10, "input grad")
    ref = dict(base.named_parameters())
    for k, p in ckpt.named_parameters():
        assert_rel(p.grad, ref[k].grad, 1e-9, f"grad {k}")
    ref_buf = dict(base.named_buffers())
    for k, b in ckpt.named_buffers():
        if b.is_floating_point():
            assert_rel(b, ref_buf[k], FP64_TOL, k)
        else:
            assert torch.equal(b, ref_buf[k]), f"{k}: {b} vs {ref_buf[k]}"
    ckpt.set_grad_checkpointing(False)
    assert not ckpt.grad_checkpointing


# ------------------------------------------------------------------ checkpoint_filter_fn
def _wrap(sd, how):
    return {"model": lambda: {"model": sd}, "model_ema": lambda: {"model_ema": sd},
            "state_dict_ema": lambda: {"state_dict_ema": sd}, "bare": lambda: sd,
            "ddp": lambda: {"model": {"module." + k: v for k, v in sd.items()}},
            "ema_ddp": lambda: {"model_ema": {"module." + k: v for k, v in sd.items()}},
            "compiled": lambda: {"_orig_mod." + k: v for k, v in sd.items()}}[how]()


@pytest.mark.parametrize("how", ["model", "model_ema", "state_dict_ema", "bare", "ddp", "ema_ddp", "compiled"])
def test_checkpoint_filter_fn_containers(how):
    src = tiny(11)
    sd = src.state_dict()
    out = checkpoint_filter_fn(_wrap(sd, how), tiny(12))
    assert list(out) == list(sd), "upstream keys must come back unchanged"
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    backbone = tiny(12, return_interm_layers=True)
    out = checkpoint_filter_fn(_wrap(sd, how), backbone)
    assert set(out) == set(backbone.state_dict())


# ------------------------------------------------------------------ load_checkpoint
def _assert_loaded_except_head(model, sd, head_before):
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            assert torch.equal(v, head_before[k]), f"{k} was overwritten"
        else:
            assert torch.equal(v, sd[k]), f"{k} not loaded"


def test_fine_tune_checkpoint_of_other_num_classes():
    src = tiny(13, num_classes=7)
    sd = src.state_dict()
    model = tiny(14, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(gmf.CheckpointMismatchError) as info:
        gmf.load_checkpoint(model, {"model": sd})
    msg = str(info.value)
    assert "head.weight" in msg and "7 classes, the model 10" in msg and "drop_classifier=True" in msg
    assert "wrong config" not in msg and "another model size" not in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed load changed the model"
    result = gmf.load_checkpoint(model, {"model": sd}, drop_classifier=True)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    _assert_loaded_except_head(model, sd, before)
    model2 = tiny(14, num_classes=10)
    with pytest.warns(UserWarning, match="head not loaded"):
        result = gmf.load_checkpoint(model2, sd, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    _assert_loaded_except_head(model2, sd, before)
    # create_model passes drop_classifier through
    model3 = gmf.create_model("m", **TINY, num_classes=3, checkpoint={"model": sd}, drop_classifier=True)
    assert model3.head.out_features == 3 and torch.equal(model3.norm4.weight, sd["norm4.weight"])


def test_other_size_still_refused_with_strict_false():
    src = gmf.create_model("m", embedding_dims=[40, 40, 80, 160], serial_depths=[1, 1, 1, 1],
                           mlp_ratios=[2, 2, 2, 2], num_classes=10)
    model = tiny(15)
    with pytest.raises(gmf.CheckpointMismatchError, match="another model size") as info:
        gmf.load_checkpoint(model, src.state_dict(), strict=False)
    assert "drop_classifier" not in str(info.value).split("hint:")[-1]


def test_num_classes_zero_model_hint():
    sd = tiny(16).state_dict()
    model = tiny(17, num_classes=0)
    with pytest.raises(gmf.CheckpointMismatchError, match="drop_classifier=True"):
        gmf.load_checkpoint(model, sd)
    result = gmf.load_checkpoint(model, sd, drop_classifier=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_detector_checkpoint_prefix_hint():
    """A detector's checkpoint holds the backbone under 'backbone.' (mmdet, detectron2): the error names the
    prefix and how to strip it, and the stripped dict loads."""
    sd = {"backbone." + k: v for k, v in tiny(20).state_dict().items()}
    sd["neck.lateral.weight"] = torch.zeros(3)
    model = tiny(21, return_interm_layers=True)
    with pytest.raises(gmf.CheckpointMismatchError, match=r"under the prefix 'backbone\.'"):
        gmf.load_checkpoint(model, sd)
    result = gmf.load_checkpoint(model, {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    assert not result.missing_keys and not result.unexpected_keys


def test_ema_and_ddp_checkpoints():
    a, b = tiny(18).state_dict(), tiny(19).state_dict()
    model = tiny(20)
    gmf.load_checkpoint(model, {"model_ema": {"module." + k: v for k, v in b.items()}})
    assert all(torch.equal(model.state_dict()[k], b[k]) for k in b)
    both = {"model": a, "model_ema": b, "epoch": 300}
    gmf.load_checkpoint(model, both)
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a), "default: the 'model' weights"
    gmf.load_checkpoint(model, both, use_ema=True)
    assert all(torch.equal(model.state_dict()[k], b[k]) for k in b), "use_ema=True: the EMA weights"


def test_use_ema_without_ema_weights_warns():
    """use_ema=True on a checkpoint without EMA weights loads its plain weights, and says so."""
    a = tiny(23).state_dict()
    model = tiny(24)
    for ckpt in ({"model": a}, {"model": a, "model_ema": {}}, a):
        with pytest.warns(UserWarning, match="use_ema=True, but .* holds no EMA weights"):
            gmf.load_checkpoint(model, ckpt, use_ema=True)
        assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)


def test_create_model_takes_the_load_options_and_names_a_wrong_override(tmp_path):
    """create_model passes use_ema / weights_only to load_checkpoint (its error messages name them);
    an override the model does not take is a TypeError naming it and the closest valid one."""
    import argparse
    a, b = tiny(25).state_dict(), tiny(26).state_dict()
    path = tmp_path / "train.pth"
    torch.save({"model": a, "model_ema": b, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(gmf.CheckpointFormatError, match="weights_only=False"):
        gmf.create_model("m", **TINY, num_classes=10, checkpoint=path)
    model = gmf.create_model("m", **TINY, num_classes=10, checkpoint=path, weights_only=False, use_ema=True)
    assert all(torch.equal(model.state_dict()[k], b[k]) for k in b)
    with pytest.raises(TypeError, match="unknown override 'num_class' \\(did you mean 'num_classes'\\?\\)"):
        gmf.create_model("m", num_class=10)


def test_ema_checkpoint_file(tmp_path):
    sd = tiny(21).state_dict()
    path = tmp_path / "ema.pth"
    torch.save({"model_ema": sd}, path)
    model = tiny(22)
    result = gmf.load_checkpoint(model, path)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "tensor", "no_tensors", "directory"])
def test_not_a_checkpoint_file_is_named(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"model": tiny(23).state_dict()}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    else:
        path.mkdir()
    with pytest.raises(CheckpointFormatError) as info:
        gmf.load_checkpoint(tiny(24), path)
    assert str(path) in str(info.value)
    if kind == "no_tensors":
        assert "'epoch'" in str(info.value)


def test_missing_file_and_pickled_objects(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        gmf.load_checkpoint(tiny(25), missing)
    sd = tiny(26).state_dict()
    path = tmp_path / "train_ckpt.pth"
    torch.save({"model": sd, "config": argparse.Namespace(lr=0.1)}, path)  # an upstream training checkpoint has a config
    with pytest.raises(CheckpointFormatError, match="weights_only=False") as info:
        gmf.load_checkpoint(tiny(27), path)
    assert str(path) in str(info.value)
    model = tiny(27)
    gmf.load_checkpoint(model, path, weights_only=False)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


@pytest.mark.parametrize("how", ["model", "under_model", "compiled_under_model"])
def test_pickled_whole_model_loads_with_weights_only_false(tmp_path, how):
    """torch.save(model) and {"model": model} (a trusted file, weights_only=False) load the model's weights."""
    src = tiny(40)
    saved = {"model": src, "under_model": {"model": src, "epoch": 3},
             "compiled_under_model": {"model": torch.compile(src)}}[how]
    path = tmp_path / "whole.pth"
    torch.save(saved, path)
    model = tiny(41)
    gmf.load_checkpoint(model, path, weights_only=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


def test_load_into_a_wrapped_model():
    """A model wrapped by torch.compile or DataParallel takes the plain checkpoint (and the compiled model's
    own, _orig_mod.-prefixed, state_dict)."""
    sd = tiny(42).state_dict()
    for wrap in (torch.compile, torch.nn.DataParallel):
        inner = tiny(43)
        gmf.load_checkpoint(wrap(inner), {"model": sd})
        assert all(torch.equal(inner.state_dict()[k], v) for k, v in sd.items())
    inner = tiny(44)
    gmf.load_checkpoint(torch.compile(inner), torch.compile(tiny(42)).state_dict())
    assert all(torch.equal(inner.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("in_chans", [1, 2, 6, 7])
def test_checkpoint_into_other_in_chans_adapts_the_first_conv(in_chans):
    """A 3-channel checkpoint into an in_chans model: the first convolution adapted (summed for one channel;
    repeated and scaled by 3 / in_chans otherwise), with a warning; everything else loaded as is. With one channel
    or a multiple of 3, an input whose channels are all the same image gives the same stem output as the
    3-channel model on that image."""
    src = tiny(45).double()
    sd = src.state_dict()
    model = tiny(46, in_chans=in_chans).double()
    with pytest.warns(UserWarning, match=f"takes 3 input channels, the model {in_chans}"):
        gmf.load_checkpoint(model, {"model": sd})
    w, got = sd["conv_stem.proj1.weight"], model.state_dict()["conv_stem.proj1.weight"]
    assert got.shape == (w.shape[0], in_chans) + tuple(w.shape[2:])
    if in_chans == 1:
        assert_rel(got, w.sum(1, keepdim=True), FP64_TOL, "summed first conv")
    else:
        expect = w.repeat(1, 3, 1, 1)[:, :in_chans] * (3 / in_chans)
        assert_rel(got, expect, FP64_TOL, "repeated and scaled first conv")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items() if k != "conv_stem.proj1.weight")
    if in_chans % 3 and in_chans != 1:
        return
    gray = images(b=1, seed=3)[:, :1]
    with torch.no_grad():
        a = src.conv_stem.proj1(gray.expand(1, 3, *SIZE))
        b = model.conv_stem.proj1(gray.expand(1, in_chans, *SIZE))
    assert_rel(b, a, 1e-10, "stem on an image of identical channels")


@pytest.mark.parametrize("obj", [None, 3, [1, 2]], ids=["None", "int", "list"])
def test_not_a_checkpoint_object(obj):
    with pytest.raises(CheckpointFormatError, match="not a checkpoint"):
        gmf.load_checkpoint(tiny(28), obj)


# ------------------------------------------------------------------ pretrained configuration and file lookup
def test_pretrained_cfg():
    model = tiny(29)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 1000 and cfg["license"] == "mit"
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    assert isinstance(model.get_submodule(cfg["classifier"]), torch.nn.Linear)
    assert set(PRETRAINED_CFGS) == set(gmf.MODEL_CONFIGS)
    for name, c in PRETRAINED_CFGS.items():
        assert c["download_folder"].startswith("https://") and c["upstream_file_name"].endswith(".pth"), name


def test_pretrained_file_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GMF_PRETRAINED_DIR", raising=False)
    kw = dict(TINY, num_classes=10)
    with pytest.raises(PretrainedWeightsNotFound) as info:
        gmf.create_model("groupmixformer_m", pretrained=True, **kw)
    msg = str(info.value)
    assert "groupmixformer_miny.pth" in msg and PRETRAINED_CFGS["groupmixformer_m"]["download_folder"] in msg
    assert str(tmp_path / "cache" / "gmf_kernels" / "checkpoints" / "groupmixformer_miny.pth") in msg
    assert "GMF_PRETRAINED_DIR is not set" in msg
    sd = tiny(30).state_dict()
    env_dir = tmp_path / "weights"
    env_dir.mkdir()
    torch.save({"model": sd}, env_dir / "groupmixformer_miny.pth")
    monkeypatch.setenv("GMF_PRETRAINED_DIR", str(env_dir))
    model = gmf.create_model("groupmixformer_m", pretrained=True, **kw)
    assert not model.training and all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    # the cache folder, under our short name
    monkeypatch.setenv("GMF_PRETRAINED_DIR", str(tmp_path / "empty"))
    cache = tmp_path / "cache" / "gmf_kernels" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({"model": sd}, cache / "groupmixformer_m.pth")
    model = gmf.create_model("miny", pretrained=True, **kw)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


# ------------------------------------------------------------------ the guarded, deferred timm registration
def test_timm_registration_guard(monkeypatch):
    """An imported timm that our entry points cannot use (e.g. one without `timm.models`)
    gives a warning and the reason, never an import error of gmf_kernels; GMF_TIMM=0 skips it."""
    import sys
    import types

    import gmf_kernels.models as models
    monkeypatch.setattr(models, "TIMM_REGISTRATION_ERROR", models.TIMM_REGISTRATION_ERROR)
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    monkeypatch.setitem(sys.modules, "timm.models", None)  # `from timm.models import ...` raises ImportError
    monkeypatch.delitem(sys.modules, "gmf_kernels.models._timm", raising=False)
    monkeypatch.delattr(models, "_timm", raising=False)
    with pytest.warns(RuntimeWarning, match="could not be imported"):
        assert models.register_with_timm() is False
    assert models.TIMM_REGISTRATION_ERROR.startswith("timm is installed but could not be imported")
    monkeypatch.setenv("GMF_TIMM", "0")
    assert models.register_with_timm() is False and models.TIMM_REGISTRATION_ERROR == "GMF_TIMM=0"


FAKE_TIMM_MODELS = """
REGISTERED = []
def register_model(fn):
    REGISTERED.append(fn.__name__)
    return fn
def generate_default_cfgs(cfgs):
    return dict(cfgs)
def build_model_with_cfg(*a, **k):
    raise NotImplementedError
"""

DEFERRED = """
import sys
import gmf_kernels
from gmf_kernels import models
assert "timm" not in sys.modules, "import gmf_kernels imported timm"
assert models.TIMM_REGISTRATION_ERROR.startswith("pending"), models.TIMM_REGISTRATION_ERROR
{import_line}
import timm.models
assert sorted(timm.models.REGISTERED) == ["groupmixformer_b", "groupmixformer_l", "groupmixformer_m",
                                          "groupmixformer_s", "groupmixformer_t"], timm.models.REGISTERED
assert models.TIMM_REGISTRATION_ERROR is None
assert not any(type(f).__name__ == "_AfterTimmImport" for f in sys.meta_path)  # one-shot
print("ok")
"""


@pytest.mark.parametrize("import_line", ["import timm", "from timm.models import register_model"])
def test_timm_registration_deferred_until_timm_import(tmp_path, import_line):
    """`import gmf_kernels` must not import timm (seconds, with torchvision); the entry points
    register when the user imports timm, in whichever form. Run in a subprocess against a fake
    timm package on sys.path whose `register_model` records the names it is given."""
    import subprocess
    import sys
    (tmp_path / "timm" / "models").mkdir(parents=True)
    (tmp_path / "timm" / "__init__.py").write_text("")
    (tmp_path / "timm" / "models" / "__init__.py").write_text(FAKE_TIMM_MODELS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    env.pop("GMF_TIMM", None)
    r = subprocess.run([sys.executable, "-c", DEFERRED.format(import_line=import_line)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
