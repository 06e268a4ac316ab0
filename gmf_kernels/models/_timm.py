"""timm entry points: `groupmixformer_m|t|s|b|l`, registered with timm's model registry.

Imported by `gmf_kernels/__init__.py` only when timm is importable (`register_with_timm`);
after `import gmf_kernels`:

    timm.create_model("groupmixformer_s", pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(file="groupmixformer_small.pth"))
    timm.create_model("groupmixformer_t", features_only=True, out_indices=(1, 2, 3))

`pretrained=True` reads a local file (upstream publishes folder links, no direct URL): the
overlay's `file`, else $GMF_PRETRAINED_DIR or the cache folder (`models/pretrained.py`);
none found raises `PretrainedWeightsNotFound` saying where to download it and where it
looked. timm loads it through `checkpoint_filter_fn` (upstream's `{"model": ...}`, EMA, DDP)
and drops the head when `num_classes` differs from 1000, as for its own models.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .configs import MODEL_CONFIGS
from .factory import checkpoint_filter_fn
from .groupmixformer import GroupMixFormer
from .pretrained import PRETRAINED_CFGS, resolve_pretrained_file

#: our entries that timm's PretrainedCfg has no field for
_OURS_ONLY = ("upstream_file_name", "download_folder")

default_cfgs = generate_default_cfgs({
    name: {k: v for k, v in cfg.items() if k not in _OURS_ONLY and v is not None}
    for name, cfg in PRETRAINED_CFGS.items()
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> GroupMixFormer:
    if pretrained:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        cfg = kwargs.get("pretrained_cfg")
        given = overlay.get("file") or (cfg.get("file") if isinstance(cfg, dict) else getattr(cfg, "file", None))
        has_other_source = any(overlay.get(k) for k in ("url", "hf_hub_id", "state_dict"))
        if not has_other_source:
            overlay["file"] = str(resolve_pretrained_file(variant, given))
        kwargs["pretrained_cfg_overlay"] = overlay
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    model_args = dict(MODEL_CONFIGS[variant])
    model_args["drop_path_rate"] = 0.0  # timm: stochastic depth only when asked (train.py --drop-path)
    model_args.update(kwargs)
    return build_model_with_cfg(
        GroupMixFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **model_args,
    )


@register_model
def groupmixformer_m(pretrained: bool = False, **kwargs) -> GroupMixFormer:
    """GroupMixFormer-M (upstream `miny`): 5.7M parameters, 79.6 % top-1 (published)."""
    return _create("groupmixformer_m", pretrained, **kwargs)


@register_model
def groupmixformer_t(pretrained: bool = False, **kwargs) -> GroupMixFormer:
    """GroupMixFormer-T (upstream `tiny`): 11.0M parameters, 82.6 % top-1 (published)."""
    return _create("groupmixformer_t", pretrained, **kwargs)


@register_model
def groupmixformer_s(pretrained: bool = False, **kwargs) -> GroupMixFormer:
    """GroupMixFormer-S (upstream `small`): 22.4M parameters, 83.4 % top-1 (published)."""
    return _create("groupmixformer_s", pretrained, **kwargs)


@register_model
def groupmixformer_b(pretrained: bool = False, **kwargs) -> GroupMixFormer:
    """GroupMixFormer-B (upstream `base`): 45.8M parameters, 84.7 % top-1 (published)."""
    return _create("groupmixformer_b", pretrained, **kwargs)


@register_model
def groupmixformer_l(pretrained: bool = False, **kwargs) -> GroupMixFormer:
    """GroupMixFormer-L (upstream `large`): 71.8M parameters, 85.0 % top-1 (published)."""
    return _create("groupmixformer_l", pretrained, **kwargs)
