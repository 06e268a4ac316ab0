"""`create_model`, `load_checkpoint` and `checkpoint_filter_fn`.

Checkpoints accepted (a file path or the object): upstream's `{"model": state_dict}`, an EMA
checkpoint (`{"model_ema": ...}` or timm's `{"state_dict_ema": ...}`; with `use_ema=True` the
EMA weights are taken when both are present), `{"state_dict": ...}`, or a bare state_dict;
keys prefixed by DistributedDataParallel (`module.`) or `torch.compile` (`_orig_mod.`) are
unprefixed; with `weights_only=False` (a trusted file) also a whole pickled model (`torch.save(model)`,
or under one of those keys). The model loaded into may itself be wrapped (`torch.compile`,
DistributedDataParallel, DataParallel): the weights go to the model inside.

Another number of input channels (`in_chans`): a checkpoint's first convolution
(`conv_stem.proj1.weight`, 3 input channels) is adapted to the model's, with a warning saying
so: summed over its channels for one channel; otherwise repeated over the channels and scaled
by 3 / in_chans (timm's convention for pretrained weights).

Fine-tuning with another number of classes: `load_checkpoint(model, ckpt, drop_classifier=True)`
loads everything but the checkpoint's `head` (the model keeps its new head);
`strict=False` does the same for a `head` whose shape differs, and reports it in
`missing_keys`. timm's `create_model(..., pretrained=True, num_classes=N)` drops the head
the same way (through `checkpoint_filter_fn` and timm's own classifier handling).
"""
from __future__ import annotations

import os
import pickle
import warnings
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from .configs import MODEL_CONFIGS, canonical_name
from .groupmixformer import GroupMixFormer
from .pretrained import PRETRAINED_CFGS, resolve_pretrained_file

#: the classifier: norm4 (BatchNorm2d over the last width) and head (Linear)
_CLASSIFIER_PREFIXES = ("norm4.", "head.")
_HEAD_PREFIX = "head."
#: wrappers whose state_dict prefixes every key
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EMA_KEYS = ("model_ema", "state_dict_ema")
#: the first convolution's weight (pretrained_cfg's first_conv): adapted to the model's in_chans
_FIRST_CONV = "conv_stem.proj1.weight"
_PLAIN_KEYS = ("model", "state_dict")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model built (`load_checkpoint`, strict): the message
    lists the missing, unexpected and mis-shaped keys and the likely cause (another model size, a head of
    another num_classes: `drop_classifier=True`)."""


class CheckpointFormatError(ValueError):
    """The file or object is not a checkpoint of this model (the message names the file)."""


def create_model(name: str, *, checkpoint=None, pretrained: bool = False, backend: Optional[str] = "auto",
                 strict: bool = True, drop_classifier: bool = False, use_ema: bool = False,
                 weights_only: bool = True, **overrides) -> GroupMixFormer:
    """Build `groupmixformer_m|t|s|b|l` (or upstream's miny/tiny/small/base/large).

    `overrides` replace config entries or constructor arguments (e.g. embedding_dims=,
    serial_depths=, num_classes=, drop_path_rate=, return_interm_layers=). With
    `checkpoint` (a path, `{"model": state_dict}` or a state_dict) the weights are loaded,
    strictly by default; `pretrained=True` without a checkpoint reads the released weights
    from $GMF_PRETRAINED_DIR or the cache folder (`models/pretrained.py`; a missing file
    raises an error saying where to download it). With a `num_classes` other than the
    checkpoint's, pass `drop_classifier=True` (fine-tuning: the new head stays as built);
    `use_ema` and `weights_only` as in `load_checkpoint`. An override that is neither a config
    entry nor a constructor argument raises TypeError naming it (and the closest valid name).
    The model is returned in eval mode when weights are loaded. `model.pretrained_cfg`
    holds the release's input size, normalisation, crop and licence.
    """
    key = canonical_name(name)
    cfg = dict(MODEL_CONFIGS[key])
    _check_overrides(overrides)
    cfg.update(overrides)
    model = GroupMixFormer(backend=backend, **cfg)
    model.pretrained_cfg = model.default_cfg = dict(PRETRAINED_CFGS[key])
    if checkpoint is None and pretrained:
        checkpoint = resolve_pretrained_file(key)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict, drop_classifier=drop_classifier, use_ema=use_ema,
                        weights_only=weights_only)
        model.eval()
    return model


def _check_overrides(overrides: Mapping[str, object]) -> None:
    """TypeError for an override GroupMixFormer does not take, naming the closest argument it does."""
    import difflib
    import inspect
    valid = [p for p in inspect.signature(GroupMixFormer.__init__).parameters if p not in ("self", "backend")]
    for k in overrides:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            raise TypeError(f"create_model: unknown override {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f"; the model takes {', '.join(valid)}")


def _describe(obj) -> str:
    return f"file {os.fspath(obj)!r}" if isinstance(obj, (str, os.PathLike)) else f"the {type(obj).__name__} given"


def _torch_load(path, weights_only: bool):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointFormatError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch.load raises many types on a file it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if weights_only and isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):
            raise CheckpointFormatError(
                f"checkpoint file {path!r} holds objects other than tensors and plain containers (e.g. a "
                f"training config), which torch.load(weights_only=True) refuses. If you trust the file, pass "
                f"weights_only=False; or save only its weights: torch.save({{'model': ckpt['model']}}, ...)."
                f"\n  torch: {first}") from e
        raise CheckpointFormatError(f"file {path!r} is not a PyTorch checkpoint (a torch.save file), or it is "
                                    f"truncated or corrupt: {type(e).__name__}: {first}") from e


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def extract_state_dict(obj, use_ema: bool = False, weights_only: bool = True) -> Dict[str, torch.Tensor]:
    """The state_dict inside `obj` (a file path or a checkpoint object; see the module docstring)."""
    what = _describe(obj)
    if isinstance(obj, (str, os.PathLike)):
        obj = _torch_load(obj, weights_only)
    if isinstance(obj, nn.Module):  # a whole pickled model (weights_only=False), or a model given
        obj = obj.state_dict()
    if obj is None or not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{what} is not a checkpoint: expected {{'model': state_dict}}, an EMA "
                                    f"checkpoint or a state_dict (a mapping of names to tensors), got "
                                    f"{type(obj).__name__}")
    order = (_EMA_KEYS + _PLAIN_KEYS) if use_ema else (_PLAIN_KEYS + _EMA_KEYS)
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):          # a pickled model under the key (weights_only=False)
            inner = inner.state_dict()
        if isinstance(inner, Mapping) and inner:
            if use_ema and key not in _EMA_KEYS:
                warnings.warn(f"use_ema=True, but {what} holds no EMA weights (no non-empty "
                              f"{' or '.join(map(repr, _EMA_KEYS))}): its plain weights ({key!r}) are loaded",
                              stacklevel=3)
            obj = inner
            break
    else:
        if use_ema:
            warnings.warn(f"use_ema=True, but {what} holds no EMA weights (no non-empty "
                          f"{' or '.join(map(repr, _EMA_KEYS))}): it is read as a plain state_dict", stacklevel=3)
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise CheckpointFormatError(f"{what} holds no tensors: no state_dict under 'model', 'model_ema', "
                                    f"'state_dict' or 'state_dict_ema', and its top-level keys are not weights "
                                    f"(keys: {keys})")
    if len(sd) != len(obj):
        others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointFormatError(f"{what}: not a state_dict: entries {others} are not tensors (a training "
                                    f"checkpoint? its weights are expected under 'model' or 'model_ema')")
    return _strip_prefixes(sd)


def checkpoint_filter_fn(state_dict, model: Optional[nn.Module] = None, use_ema: bool = False):
    """timm's `pretrained_filter_fn`: an upstream checkpoint (`{"model": ...}`, EMA, DDP-prefixed,
    or the bare state_dict timm already unwrapped) -> this model's state_dict. Keys are
    upstream's and stay unchanged; norm4/head are dropped for a model that has none
    (return_interm_layers=True). The classifier of another size is dropped by timm itself
    (`num_classes` differing from the pretrained config's)."""
    sd = extract_state_dict(state_dict, use_ema=use_ema)
    if model is not None and getattr(model, "return_interm_layers", False):
        sd = {k: v for k, v in sd.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    return sd


def _summarise(keys, limit=12):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "\n    " + "\n    ".join(keys[:limit]) + more


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping], strict: bool = True,
                    drop_classifier: bool = False, use_ema: bool = False, weights_only: bool = True):
    """Load a checkpoint (see the module docstring) into `model`; returns torch's load result
    (`missing_keys`, `unexpected_keys`).

    * strict (default): a missing or unexpected key, or any shape mismatch, raises
      CheckpointMismatchError naming the keys, with a hint; nothing is loaded then.
    * `drop_classifier=True`: the checkpoint's `head.*` is not loaded (fine-tuning to another
      number of classes: the model keeps its own head; norm4 is loaded).
    * `strict=False`: missing and unexpected keys are allowed, and a `head` whose shape
      differs is skipped (listed in missing_keys, with a warning); a shape mismatch anywhere
      else still raises (another configuration).
    * a classifier checkpoint into a `return_interm_layers=True` backbone drops norm4/head.
    * `use_ema`: take the EMA weights when the checkpoint holds both; `weights_only=False`
      for a trusted file that holds more than weights.
    """
    sd = extract_state_dict(path_or_state_dict, use_ema=use_ema, weights_only=weights_only)
    model = unwrap_model(model)
    own = model.state_dict()
    notes = []
    _adapt_first_conv(sd, own)
    if getattr(model, "return_interm_layers", False):
        dropped = [k for k in sd if k.startswith(_CLASSIFIER_PREFIXES) and k not in own]
        for k in dropped:
            del sd[k]
        if dropped:
            notes.append(f"dropped {len(dropped)} classifier keys (norm4/head): the model returns feature maps")
    if drop_classifier:
        for k in [k for k in sd if k.startswith(_HEAD_PREFIX)]:
            del sd[k]
    head_bad = [k for k in own if k.startswith(_HEAD_PREFIX) and k in sd and sd[k].shape != own[k].shape]
    body_bad = [k for k in own if not k.startswith(_HEAD_PREFIX) and k in sd and sd[k].shape != own[k].shape]
    if not strict and head_bad and not body_bad:
        warnings.warn(f"load_checkpoint(strict=False): the checkpoint's classifier "
                      f"{tuple(sd['head.weight'].shape) if 'head.weight' in sd else ''} does not fit the model's "
                      f"{tuple(own['head.weight'].shape) if 'head.weight' in own else ''}: head not loaded "
                      f"(pass drop_classifier=True to say so)", stacklevel=2)
        for k in head_bad:
            del sd[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape_bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    # the model's own head is kept on purpose with drop_classifier: not a missing key
    required = [k for k in missing if not (drop_classifier and k.startswith(_HEAD_PREFIX))]
    if shape_bad or (strict and (required or unexpected)):
        msg = ["checkpoint does not match the model:"]
        if shape_bad:
            msg.append(f"{len(shape_bad)} keys with other shapes:" + _summarise(
                f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in shape_bad))
        if required:
            msg.append(f"{len(required)} keys missing from the checkpoint:" + _summarise(required))
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys in the checkpoint:" + _summarise(unexpected))
        msg += _hints(model, sd, own, shape_bad, required, unexpected)
        raise CheckpointMismatchError("\n  ".join(msg + notes))
    # every key has been checked above; torch's strict mode would refuse the head kept on purpose
    return model.load_state_dict(sd, strict=strict and not (drop_classifier and missing))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's OptimizedModule and (Distributed)DataParallel wrappers: the one
    whose state_dict keys are the checkpoint's."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A convolution weight (out, c, kh, kw) trained on c input channels, for in_chans channels: summed
    over its channels for one, else its channels repeated to in_chans and scaled by c / in_chans (so that
    an input whose channels are alike gives about the same response)."""
    out, c = weight.shape[:2]
    if in_chans == c:
        return weight
    work = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    if in_chans == 1:
        adapted = work.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // c)
        adapted = work.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)
    return adapted.to(weight.dtype)


def _adapt_first_conv(sd: Dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """The checkpoint's first convolution adapted in place to the model's input channels where only those
    differ (`adapt_input_conv`), with a warning."""
    w, mine = sd.get(_FIRST_CONV), own.get(_FIRST_CONV)
    if w is None or mine is None or w.dim() != 4 or w.shape == mine.shape:
        return
    if w.shape[0] != mine.shape[0] or w.shape[2:] != mine.shape[2:]:
        return                                    # another width: reported as a mismatch
    c, n = w.shape[1], mine.shape[1]
    sd[_FIRST_CONV] = adapt_input_conv(w, n)
    how = "summed over its channels" if n == 1 else f"its channels repeated and scaled by {c}/{n}"
    warnings.warn(f"load_checkpoint: the checkpoint's first convolution ({_FIRST_CONV}) takes {c} input "
                  f"channels, the model {n} (in_chans): its weights are adapted ({how})", stacklevel=3)


def _hints(model, sd, own, shape_bad, missing, unexpected):
    hints = []
    body_bad = [k for k in shape_bad if not k.startswith(_HEAD_PREFIX)]
    if shape_bad and all(k.startswith(_HEAD_PREFIX) for k in shape_bad):
        n_ckpt = sd["head.weight"].shape[0] if "head.weight" in sd else "?"
        n_model = own["head.weight"].shape[0] if "head.weight" in own else "?"
        hints.append(f"hint: the checkpoint's classifier has {n_ckpt} classes, the model {n_model}: to fine-tune, "
                     f"pass drop_classifier=True (or strict=False) to keep the model's new head")
    elif body_bad:
        widths = sorted({tuple(sd[k].shape)[0] for k in body_bad if k.endswith("norm1.weight")})
        hints.append("hint: another model size: the widths differ (create the matching config, e.g. "
                     "create_model('groupmixformer_t') for a tiny checkpoint)" + (f"; checkpoint widths {widths}"
                                                                                   if widths else ""))
    if missing and all(k.startswith(_CLASSIFIER_PREFIXES) for k in missing):
        hints.append("hint: the checkpoint has no classifier (a dense-prediction backbone's): build the model "
                     "with return_interm_layers=True, or load with strict=False")
    elif any(k.startswith(_HEAD_PREFIX) for k in unexpected) and not isinstance(getattr(model, "head", None),
                                                                                 nn.Linear):
        hints.append("hint: the model has no classifier head (num_classes=0): pass drop_classifier=True")
    if unexpected and all(k.startswith("groupmixformer_backbone") for k in unexpected):
        hints.append("hint: more blocks in the checkpoint than in the model: check serial_depths")
    if missing and all(k.startswith("groupmixformer_backbone") for k in missing):
        hints.append("hint: fewer blocks in the checkpoint than in the model: check serial_depths")
    prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k and k.split(".", 1)[1] in own}
    for prefix in sorted(prefixes):
        found = sum(1 for k in unexpected if k.startswith(prefix) and k[len(prefix):] in own)
        if found >= max(1, len(missing) // 2):
            hints.append(f"hint: {found} of the model's keys are in the checkpoint under the prefix {prefix!r} (a "
                         f"detector's or segmenter's checkpoint): load {{k[len({prefix!r}):]: v for k, v in "
                         f"state_dict.items() if k.startswith({prefix!r})}}")
    return hints
