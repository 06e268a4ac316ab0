"""`create_model` and `load_checkpoint`."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .configs import MODEL_CONFIGS, canonical_name
from .groupmixformer import GroupMixFormer

_CLASSIFIER_PREFIXES = ("norm4.", "head.")


class CheckpointMismatchError(RuntimeError):
    pass


def create_model(name: str, *, checkpoint=None, backend: Optional[str] = "auto", strict: bool = True,
                 **overrides) -> GroupMixFormer:
    """Build `groupmixformer_m|t|s|b|l` (or upstream's miny/tiny/small/base/large).

    `overrides` replace config entries or constructor arguments (e.g. embedding_dims=,
    serial_depths=, num_classes=, drop_path_rate=, return_interm_layers=). With
    `checkpoint` (a path, `{"model": state_dict}` or a state_dict) the weights are loaded
    strictly. The model is returned in eval mode when a checkpoint is loaded.
    """
    cfg = dict(MODEL_CONFIGS[canonical_name(name)])
    cfg.update(overrides)
    model = GroupMixFormer(backend=backend, **cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict)
        model.eval()
    return model


def _extract_state_dict(obj) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, (str, os.PathLike)):
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a checkpoint path, {{'model': state_dict}} or a state_dict, got {type(obj).__name__}")
    # DistributedDataParallel checkpoints
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _summarise(keys, limit=12):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "\n    " + "\n    ".join(keys[:limit]) + more


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping], strict: bool = True):
    """Load `{"model": sd}`, a bare state_dict or a file of either into model.

    Strict by default: a missing or unexpected key raises CheckpointMismatchError naming
    them, with hints (a classifier checkpoint into a return_interm_layers backbone drops
    norm4/head with a note, as that backbone has none). Returns torch's load result.
    """
    sd = dict(_extract_state_dict(path_or_state_dict))
    own = model.state_dict()
    notes = []
    if getattr(model, "return_interm_layers", False):
        dropped = [k for k in sd if k.startswith(_CLASSIFIER_PREFIXES) and k not in own]
        for k in dropped:
            del sd[k]
        if dropped:
            notes.append(f"dropped {len(dropped)} classifier keys (norm4/head): the model returns feature maps")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape_bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if shape_bad or (strict and (missing or unexpected)):
        msg = ["checkpoint does not match the model:"]
        if shape_bad:
            msg.append(f"{len(shape_bad)} keys with other shapes (wrong config? e.g. create_model('groupmixformer_t') "
                       f"for a tiny checkpoint):" + _summarise(shape_bad))
        if missing:
            msg.append(f"{len(missing)} keys missing from the checkpoint:" + _summarise(missing))
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys in the checkpoint:" + _summarise(unexpected))
        if any(k.startswith(_CLASSIFIER_PREFIXES) for k in missing):
            msg.append("hint: a backbone checkpoint has no norm4/head; pass return_interm_layers=True "
                       "or strict=False")
        if unexpected and all(k.startswith("groupmixformer_backbone") for k in unexpected):
            msg.append("hint: more blocks in the checkpoint than in the model: check serial_depths")
        raise CheckpointMismatchError("\n  ".join(msg + notes))
    result = model.load_state_dict(sd, strict=strict)
    return result
