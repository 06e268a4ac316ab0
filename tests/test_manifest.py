"""The five released configurations: state_dict keys/shapes, parameter counts, checkpoints.

../shared/golden/state_dict_manifest.json lists, for m/t/s/b/l, the config, the
parameter count and every state_dict key with its shape. Each model is built once
(module-scoped, parametrised fixture) because the large ones cost seconds on a CPU.
"""
import json

import pytest
import torch

import gmf_kernels
from conftest import golden_path
from gmf_kernels.models import ALIASES, MODEL_CONFIGS, canonical_name



with open(golden_path("state_dict_manifest.json")) as f:
    MANIFEST = json.load(f)
SIZES = ["m", "t", "s", "b", "l"]
CLASSIFIER_PREFIXES = ("norm4.", "head.")


def zeros_state_dict(entry, fill=0.0):
    sd = {}
    for k, shape in entry["state_dict"].items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros(shape, dtype=torch.long)
        else:
            sd[k] = torch.full(shape, fill, dtype=torch.float32)
    return sd


@pytest.fixture(scope="module", params=SIZES, ids=[f"groupmixformer_{x}" for x in SIZES])
def built(request):
    x = request.param
    torch.manual_seed(0)
    model = gmf_kernels.create_model(f"groupmixformer_{x}")
    yield x, model
    del model


def test_manifest_covers_the_five_models():
    assert sorted(MANIFEST) == sorted(SIZES)
    for x in SIZES:
        for k in ("embedding_dims", "serial_depths", "mlp_ratios"):
            assert list(MODEL_CONFIGS[f"groupmixformer_{x}"][k]) == list(MANIFEST[x]["config"][k]), (x, k)


def test_keys_and_shapes(built):
    x, model = built
    expected = MANIFEST[x]["state_dict"]
    sd = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    bad = [(k, list(sd[k].shape), s) for k, s in expected.items() if list(sd[k].shape) != list(s)]
    assert not bad, f"shape mismatches: {bad[:5]}"


def test_parameter_count(built):
    """The manifest's `params` counts parameters (not BatchNorm buffers)."""
    x, model = built
    n_params = sum(p.numel() for p in model.parameters())
    n_state = sum(t.numel() for t in model.state_dict().values())
    assert n_params == MANIFEST[x]["params"]
    assert n_state > n_params  # buffers are not part of the published count
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_params


def test_load_zero_checkpoint(built):
    x, model = built
    result = gmf_kernels.load_checkpoint(model, {"model": zeros_state_dict(MANIFEST[x])})
    assert not result.missing_keys and not result.unexpected_keys
    assert all(bool((p == 0).all()) for p in model.parameters()), "parameters were not loaded"


def test_load_checkpoint_file(tmp_path):
    """A checkpoint file path (groupmixformer_m: the path logic does not depend on the size)."""
    model = gmf_kernels.create_model("groupmixformer_m")
    path = tmp_path / "groupmixformer_m.pth"
    torch.save({"model": zeros_state_dict(MANIFEST["m"], fill=0.5)}, path)
    result = gmf_kernels.load_checkpoint(model, str(path))
    assert not result.missing_keys and not result.unexpected_keys
    sd = model.state_dict()
    assert all(bool((sd[k] == 0.5).all()) for k in sd if not k.endswith("num_batches_tracked"))
    gmf_kernels.load_checkpoint(model, path)  # os.PathLike too


def _one_att_key(entry):
    return next(k for k in entry["state_dict"] if k.endswith(".att.qkv.weight"))


@pytest.mark.parametrize("kind", ["missing", "unexpected", "wrong_shape"])
def test_mismatched_checkpoint_raises_naming_the_key(built, kind):
    x, model = built
    sd = dict(model.state_dict())  # references, no copies
    probe_key = "groupmixformer_backbone.0.gma_stage.0.att.proj.weight"
    before = model.state_dict()[probe_key].clone()
    key = _one_att_key(MANIFEST[x])
    if kind == "missing":
        del sd[key]
    elif kind == "unexpected":
        key = "groupmixformer_backbone.0.gma_stage.0.att.not_a_weight"
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(sd[key].shape[0] + 5, sd[key].shape[1])
    sd[probe_key] = torch.zeros_like(before)  # would change the model if anything were loaded
    with pytest.raises(gmf_kernels.CheckpointMismatchError) as info:
        gmf_kernels.load_checkpoint(model, {"model": sd})
    assert key in str(info.value)
    assert torch.equal(model.state_dict()[probe_key], before), "a failed load modified the model"


@pytest.mark.parametrize("alias, canonical", sorted(ALIASES.items()), ids=sorted(ALIASES))
def test_upstream_aliases_resolve(alias, canonical):
    assert canonical_name(alias) == canonical
    assert canonical_name(alias.upper()) == canonical
    model = gmf_kernels.create_model(alias, serial_depths=[1, 1, 1, 1])  # depth 1: cheap
    assert model.embedding_dims == list(MODEL_CONFIGS[canonical]["embedding_dims"])


@pytest.mark.parametrize("name", ["groupmixformer_xl", "resnet50", ""])
def test_unknown_model_name(name):
    with pytest.raises(ValueError, match="unknown model"):
        gmf_kernels.create_model(name)


def test_overrides_take_effect():
    model = gmf_kernels.create_model("groupmixformer_t", embedding_dims=[40, 40, 80, 80],
                                     serial_depths=[1, 2, 1, 3], num_classes=7)
    assert [len(st.gma_stage) for st in model.groupmixformer_backbone] == [1, 2, 1, 3]
    assert [st.gma_stage[0].att.dim for st in model.groupmixformer_backbone] == [40, 40, 80, 80]
    assert model.head.out_features == 7 and model.head.in_features == 80
    # mlp_ratios are kept from the t config (4)
    assert model.groupmixformer_backbone[3].gma_stage[0].mlp.fc1.out_features == 320
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)


@pytest.fixture(scope="module")
def backbone_m():
    return gmf_kernels.create_model("groupmixformer_m", return_interm_layers=True)


def test_return_interm_layers_has_no_classifier(backbone_m):
    sd = backbone_m.state_dict()
    assert not any(k.startswith(CLASSIFIER_PREFIXES) for k in sd)
    assert not hasattr(backbone_m, "norm4") and not hasattr(backbone_m, "head")
    expected = {k for k in MANIFEST["m"]["state_dict"] if not k.startswith(CLASSIFIER_PREFIXES)}
    assert set(sd) == expected


def test_classifier_checkpoint_into_backbone(backbone_m):
    entry = MANIFEST["m"]
    sd = zeros_state_dict(entry, fill=0.25)
    assert any(k.startswith(CLASSIFIER_PREFIXES) for k in sd)
    gmf_kernels.load_checkpoint(backbone_m, {"model": sd})
    assert all(bool((p == 0.25).all()) for p in backbone_m.parameters())


def test_backbone_checkpoint_into_classifier_raises():
    full = gmf_kernels.create_model("groupmixformer_m", serial_depths=[1, 1, 1, 1])
    backbone = gmf_kernels.create_model("groupmixformer_m", serial_depths=[1, 1, 1, 1], return_interm_layers=True)
    with pytest.raises(gmf_kernels.CheckpointMismatchError) as info:
        gmf_kernels.load_checkpoint(full, {"model": backbone.state_dict()})
    assert "head.weight" in str(info.value) and "norm4" in str(info.value)
    # non-strict loading of the same checkpoint is allowed
    result = gmf_kernels.load_checkpoint(full, backbone.state_dict(), strict=False)
    assert "head.weight" in result.missing_keys


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "ddp_prefix"])
def test_checkpoint_containers(wrap):
    src = gmf_kernels.create_model("m", serial_depths=[1, 1, 1, 1], num_classes=5)
    dst = gmf_kernels.create_model("m", serial_depths=[1, 1, 1, 1], num_classes=5)
    sd = src.state_dict()
    ckpt = {"bare": sd, "model": {"model": sd}, "state_dict": {"state_dict": sd},
            "ddp_prefix": {"model": {"module." + k: v for k, v in sd.items()}}}[wrap]
    gmf_kernels.load_checkpoint(dst, ckpt)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_create_model_with_checkpoint_is_eval(tmp_path):
    src = gmf_kernels.create_model("m", serial_depths=[1, 1, 1, 1])
    path = tmp_path / "m.pth"
    torch.save({"model": src.state_dict()}, path)
    model = gmf_kernels.create_model("groupmixformer_miny", serial_depths=[1, 1, 1, 1], checkpoint=str(path))
    assert not model.training
    assert torch.equal(model.head.weight, src.head.weight)
