"""`convert(model)`: swap upstream-style attention modules for `GroupMixAttention`, in place."""
from __future__ import annotations

from typing import Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .backends import check_backend_usable
from .modules import GroupMixAttention, is_frozen_norm

#: parameter/buffer names (relative to the attention module) that identify an upstream EfficientAtt.
_SIGNATURE = (
    "qkv.weight", "proj.weight", "proj.bias",
    "aggregator.norm0.weight", "aggregator.norm0.running_mean",
    "aggregator.agg1.conv1.weight", "aggregator.agg1.pointwise_conv.weight", "aggregator.norm1.weight",
    "aggregator.agg2.conv1.weight", "aggregator.agg3.conv1.weight",
    "aggregator.agg0.conv.conv1.weight", "aggregator.agg0.conv.pointwise_conv.weight", "aggregator.agg0.norm.weight",
    "crpe.conv_list.0.weight", "crpe.conv_list.1.weight", "crpe.conv_list.2.weight",
)


def is_upstream_attention(module: nn.Module) -> bool:
    """An upstream `EfficientAtt`, or any module with the same parameter structure."""
    if isinstance(module, GroupMixAttention):
        return False
    if type(module).__name__ == "EfficientAtt":
        return True
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return all(k in names for k in _SIGNATURE)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _from_upstream(old: nn.Module, backend: str) -> GroupMixAttention:
    hooked = [h for h in _HOOK_DICTS if getattr(old, h, None)]
    if hooked:
        import warnings
        warnings.warn(f"convert: the {type(old).__name__} module being replaced has hooks ({', '.join(hooked)}); "
                      f"they are not carried over to the GroupMixAttention that replaces it: register them on "
                      f"the converted module", stacklevel=4)
    dim = old.qkv.weight.shape[1]
    num_heads = int(getattr(old, "num_heads", 8))
    scale = getattr(old, "scale", None)
    proj_drop = getattr(getattr(old, "proj_drop", None), "p", 0.0)
    new = GroupMixAttention(dim, num_heads, qkv_bias=old.qkv.bias is not None, qk_scale=scale,
                            proj_drop=proj_drop, backend=backend).to(device=old.qkv.weight.device)
    # share (not copy) every parameter and buffer: the old module's Parameter and buffer objects are put in the
    # new module's slots themselves (load_state_dict(assign=True) would swap tensors instead of sharing the
    # Parameters under torch.__future__.set_swap_module_params_on_conversion(True)); their requires_grad
    # (frozen layers) goes with them
    norms = [getattr(old.aggregator, f"norm{i}") for i in range(4)]
    shared_norms = tuple(f"aggregator.norm{i}." for i, n in enumerate(norms) if _shared_whole(n))
    _share_state(old, new, skip=shared_norms)
    modes = [n.training for n in norms]  # a BatchNorm may be in another mode than its parent (frozen BN)
    for i, src in enumerate(norms):
        if _shared_whole(src):
            # the module itself is shared: a SyncBatchNorm stays one (its process group included),
            # and its mode, eps and momentum stay those of the model's own module
            setattr(new.aggregator, f"norm{i}", src)
        else:
            dst = getattr(new.aggregator, f"norm{i}")
            dst.eps, dst.momentum = src.eps, src.momentum
            dst.track_running_stats = src.track_running_stats
    new.aggregator.agg0.norm.eps = old.aggregator.agg0.norm.eps
    new.train(old.training)
    for i, mode in enumerate(modes):
        getattr(new.aggregator, f"norm{i}").train(mode)
    return new


def _shared_whole(norm: nn.Module) -> bool:
    """An aggregator norm the converted layer takes as it is (the module itself): a BatchNorm (SyncBatchNorm
    included), or a frozen BatchNorm (`modules.is_frozen_norm`, detectron2's conversion)."""
    return isinstance(norm, _BatchNorm) or is_frozen_norm(norm)


def _share_state(old: nn.Module, new: nn.Module, skip: tuple) -> None:
    """Put each of `old`'s parameters and persistent buffers into the slot of the same name in `new`
    (strict: same names, same shapes), but for the names under `skip` (modules shared whole)."""
    theirs = old.state_dict(keep_vars=True)
    ours = new.state_dict(keep_vars=True)
    missing = [k for k in ours if k not in theirs and not k.startswith(skip)]
    unexpected = [k for k in theirs if k not in ours and not k.startswith(skip)]
    if missing or unexpected:
        raise RuntimeError(f"convert: the upstream attention module's state does not match GroupMixAttention's: "
                           f"missing or unexpected {missing + unexpected}")
    shapes = [f"{k}: {tuple(theirs[k].shape)} for {tuple(ours[k].shape)}" for k in ours
              if k in theirs and not k.startswith(skip) and theirs[k].shape != ours[k].shape]
    if shapes:
        raise RuntimeError(f"convert: the upstream attention module's tensors have other shapes than "
                           f"GroupMixAttention's: {shapes}")
    for key, value in theirs.items():
        if key.startswith(skip):
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = new.get_submodule(owner_name) if owner_name else new
        slots = owner._parameters if leaf in owner._parameters else owner._buffers
        slots[leaf] = value


def convert(model: nn.Module, backend: Optional[str] = "auto") -> nn.Module:
    """Replace, in place, every upstream-style attention module in `model` by a
    `GroupMixAttention` that shares its parameters and buffers (so optimizers and
    checkpoints keep working), and set `backend` on every GroupMixAttention already
    there. The aggregator BatchNorm modules themselves are kept (shared): a model made
    with `torch.nn.SyncBatchNorm.convert_sync_batchnorm` keeps its SyncBatchNorms, whose
    batch statistics the GroupMixAttention then synchronises across processes. A bare
    attention module is converted and returned. Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes a torch.nn.Module (an upstream GroupMixFormer model, or any model "
                        f"holding EfficientAtt attention modules), got "
                        f"{'None' if model is None else type(model).__name__}")
    backend = check_backend_usable(backend)
    if is_upstream_attention(model):
        return _from_upstream(model, backend)
    if isinstance(model, GroupMixAttention):
        return model.set_backend(backend)
    return _convert_children(model, backend)


def _convert_children(model: nn.Module, backend: str) -> nn.Module:
    for name, child in list(model.named_children()):
        if is_upstream_attention(child):
            setattr(model, name, _from_upstream(child, backend))
        elif isinstance(child, GroupMixAttention):
            child.set_backend(backend)
        else:
            _convert_children(child, backend)
    return model
