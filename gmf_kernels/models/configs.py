"""The five released GroupMixFormer configurations (docs/spec.md §2)."""
from __future__ import annotations

MODEL_CONFIGS = {
    "groupmixformer_m": dict(embedding_dims=[40, 80, 160, 160], serial_depths=[3, 3, 12, 4],
                             mlp_ratios=[4, 4, 4, 4], drop_path_rate=0.1),
    "groupmixformer_t": dict(embedding_dims=[80, 160, 200, 240], serial_depths=[4, 4, 12, 4],
                             mlp_ratios=[4, 4, 4, 4], drop_path_rate=0.1),
    "groupmixformer_s": dict(embedding_dims=[80, 160, 320, 320], serial_depths=[2, 4, 12, 4],
                             mlp_ratios=[4, 4, 4, 4], drop_path_rate=0.2),
    "groupmixformer_b": dict(embedding_dims=[200, 240, 320, 480], serial_depths=[8, 8, 12, 8],
                             mlp_ratios=[2, 2, 4, 4], drop_path_rate=0.5),
    "groupmixformer_l": dict(embedding_dims=[240, 320, 360, 480], serial_depths=[8, 10, 30, 10],
                             mlp_ratios=[4, 4, 2, 2], drop_path_rate=0.1),
}

#: every GMA width of the released models, ascending (40, 80, 160, 200, 240, 320, 360, 480)
MODEL_WIDTHS = tuple(sorted({c for cfg in MODEL_CONFIGS.values() for c in cfg["embedding_dims"]}))


def widths_by_model():
    """model name -> its four GMA widths."""
    return {name: tuple(cfg["embedding_dims"]) for name, cfg in MODEL_CONFIGS.items()}


#: Upstream's names and short forms.
ALIASES = {
    "groupmixformer_miny": "groupmixformer_m", "groupmixformer_tiny": "groupmixformer_t",
    "groupmixformer_small": "groupmixformer_s", "groupmixformer_base": "groupmixformer_b",
    "groupmixformer_large": "groupmixformer_l",
    "miny": "groupmixformer_m", "tiny": "groupmixformer_t", "small": "groupmixformer_s",
    "base": "groupmixformer_b", "large": "groupmixformer_l",
    "m": "groupmixformer_m", "t": "groupmixformer_t", "s": "groupmixformer_s", "b": "groupmixformer_b",
    "l": "groupmixformer_l",
}


def canonical_name(name: str) -> str:
    key = name.lower().strip()
    key = ALIASES.get(key, key)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)} "
                         f"(or upstream's miny/tiny/small/base/large)")
    return key
