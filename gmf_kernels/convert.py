"""`convert(model)`: swap upstream-style attention modules for `GroupMixAttention`, in place."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .backends import check_backend_name
from .modules import GroupMixAttention

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


def _from_upstream(old: nn.Module, backend: str) -> GroupMixAttention:
    dim = old.qkv.weight.shape[1]
    num_heads = int(getattr(old, "num_heads", 8))
    scale = getattr(old, "scale", None)
    proj_drop = getattr(getattr(old, "proj_drop", None), "p", 0.0)
    new = GroupMixAttention(dim, num_heads, qkv_bias=old.qkv.bias is not None, qk_scale=scale,
                            proj_drop=proj_drop, backend=backend).to(device=old.qkv.weight.device)
    # share (not copy) every parameter and buffer
    new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    for i in range(4):
        src, dst = getattr(old.aggregator, f"norm{i}"), getattr(new.aggregator, f"norm{i}")
        dst.eps, dst.momentum = src.eps, src.momentum
        dst.track_running_stats = src.track_running_stats
    new.aggregator.agg0.norm.eps = old.aggregator.agg0.norm.eps
    new.train(old.training)
    for i in range(4):  # a BatchNorm may have been set to another mode than its parent (frozen BN)
        getattr(new.aggregator, f"norm{i}").train(getattr(old.aggregator, f"norm{i}").training)
    return new


def convert(model: nn.Module, backend: Optional[str] = "auto") -> nn.Module:
    """Replace, in place, every upstream-style attention module in `model` by a
    `GroupMixAttention` that shares its parameters and buffers (so optimizers and
    checkpoints keep working), and set `backend` on every GroupMixAttention already
    there. A bare attention module is converted and returned. Returns the model."""
    backend = check_backend_name(backend)
    if is_upstream_attention(model):
        return _from_upstream(model, backend)
    for name, child in list(model.named_children()):
        if is_upstream_attention(child):
            setattr(model, name, _from_upstream(child, backend))
        elif isinstance(child, GroupMixAttention):
            child.set_backend(backend)
        else:
            convert(child, backend)
    return model
