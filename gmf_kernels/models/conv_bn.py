"""Eval-mode BatchNorm folded into the convolution before it (stem and patch embeddings).

A convolution followed by a BatchNorm that uses its running statistics is one convolution::

    a       = gamma / sqrt(running_var + eps)               (1 where the BatchNorm has no affine)
    weight' = weight * a[:, None, None, None]
    bias'   = (bias - running_mean) * a + beta              (bias = 0 for a convolution without one)

`conv_bn(x, conv, norm)` runs that one convolution when the fold is exact and nothing is
lost by skipping the two modules' own forwards (`fold_reasons` says why not otherwise), and
`norm(conv(x))` else: in training mode, for a BatchNorm without running statistics, for
modules other than plain `nn.Conv2d` / `nn.BatchNorm2d` / `nn.SyncBatchNorm`, or when a
hook is registered on either module (it would not fire). The parameters and buffers stay
where they are: the state_dict, checkpoints and training are unchanged.

The folded weight and bias are computed in float32 (float64 for float64 weights) and cast
to the convolution's dtype. They are cached per BatchNorm module and rebuilt when a tensor
they come from changes: the key is each tensor's storage (by identity), version counter, dtype
and device (in-place updates -- optimizer steps, ``load_state_dict``, ``copy_`` under
``no_grad`` -- bump the version; ``.to()`` / ``.half()`` / a new Parameter change the
storage), the same rule and the same cache as `gmf_kernels.folding.cached_derived` (`folding.cached_for`),
and forgotten after a torch.optim step of a tensor they come from (fused optimizers bump no version
counter). The BatchNorm's ``num_batches_tracked`` is in the key: its training-mode forward updates the running statistics inside
the batch_norm kernel without bumping their counters (test-time BatchNorm adaptation). Writes through
``.data`` bypass version counters (as they bypass autograd) and are not seen until
`folding.clear_weight_cache` (``gmf.clear_weight_cache``), which ``model.train()`` / ``model.eval()`` call.

Not cached: when gradients are needed (eval mode with trainable parameters, e.g. frozen
BatchNorm fine-tuning: the fold is then differentiable and rebuilt every call), for
inference tensors (no version counter), under ``torch.compile``, where the fold is part of
the graph (constant-folded with Inductor's ``freezing``), during a CUDA graph capture, and under
``torch.func`` transforms (their wrapped tensors have no storage).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..backends.torch_backend import linear, use_onednn_linear
from ..folding import cached_for, capturing

Tensor = torch.Tensor

#: BatchNorm module types whose eval-mode forward is the affine above
FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def has_hooks(m: nn.Module) -> bool:
    """Any forward or backward hook on this module itself."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def fold_reasons(conv: nn.Module, norm: nn.Module) -> List[str]:
    """Why `norm(conv(x))` cannot run as one folded convolution now (empty: it can)."""
    reasons = []
    if type(conv) is not nn.Conv2d:
        reasons.append(f"the convolution is a {type(conv).__name__}, not an nn.Conv2d")
    if type(norm) not in FOLDABLE_NORMS:
        reasons.append(f"the normalisation is a {type(norm).__name__}, not a BatchNorm2d / SyncBatchNorm")
        return reasons
    if norm.training:
        reasons.append("the BatchNorm is in training mode (batch statistics)")
    if norm.running_mean is None or norm.running_var is None:
        reasons.append("the BatchNorm keeps no running statistics (track_running_stats=False)")
    if has_hooks(conv) or has_hooks(norm):
        reasons.append("a hook is registered on the convolution or the BatchNorm (it would not fire)")
    return reasons


def can_fold(conv: nn.Module, norm: nn.Module) -> bool:
    return not fold_reasons(conv, norm)


def fold_conv_bn(conv: nn.Conv2d, norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """(weight', bias') of the one convolution equal to `norm(conv(x))` in eval mode."""
    w = conv.weight
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    a = torch.rsqrt(norm.running_var.to(cd) + norm.eps)
    if norm.weight is not None:
        a = a * norm.weight.to(cd)
    shift = -norm.running_mean.to(cd)
    if conv.bias is not None:
        shift = shift + conv.bias.to(cd)
    bias = shift * a
    if norm.bias is not None:
        bias = bias + norm.bias.to(cd)
    weight = w.to(cd) * a.view(-1, *([1] * (w.dim() - 1)))
    return weight.to(w.dtype), bias.to(w.dtype)


def _sources(conv: nn.Conv2d, norm: nn.Module):
    # num_batches_tracked: nn.BatchNorm2d's training forward updates running_mean / running_var inside the
    # batch_norm kernel without bumping their version counters; its `num_batches_tracked.add_(1)` does bump
    return [t for t in (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                        getattr(norm, "num_batches_tracked", None))
            if t is not None]


def _needs_grad(x: Tensor, tensors) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))


def folded_conv_bn(x: Tensor, conv: nn.Conv2d, norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """`fold_conv_bn`, cached per BatchNorm where it may be (see the module docstring)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or capturing()   # a trace records the fold
            or torch._C._are_functorch_transforms_active()):                      # (functorch wrappers: no storage)
        return fold_conv_bn(conv, norm)  # in the graph: the compiled code owns its constants
    sources = _sources(conv, norm)
    if _needs_grad(x, sources):
        return fold_conv_bn(conv, norm)  # differentiable, rebuilt every call
    if any(t.is_inference() for t in sources):
        with torch.no_grad():  # inference tensors keep no version counter: nothing to key a cache on
            return fold_conv_bn(conv, norm)

    def build():
        # outside inference mode, so that the cached tensors serve later calls in any mode
        with torch.inference_mode(False), torch.no_grad():
            return fold_conv_bn(conv, norm)
    return cached_for(norm, ("conv_bn", float(norm.eps)), sources, build)


def conv_bn(x: Tensor, conv: nn.Conv2d, norm: nn.Module, fold: bool = True) -> Tensor:
    """`norm(conv(x))`, as one convolution with the BatchNorm folded in where `can_fold` (and `fold`)."""
    if not (fold and can_fold(conv, norm)) or torch.onnx.is_in_onnx_export():
        return norm(conv(x))  # (the legacy ONNX exporter needs convolution weights of known shape)
    weight, bias = folded_conv_bn(x, conv, norm)
    if _pointwise_as_linear(x, conv, weight, bias):
        # a 1x1 convolution of a channels-last image is a linear over its pixels' rows: oneDNN's
        # linear instead of the slow direct convolution PyTorch takes for it on a CPU (measured
        # on one thread, GroupMixFormer-T's patch embeddings at batch 8: 12.8 -> 8.3 ms a forward)
        rows = x.permute(0, 2, 3, 1)
        return linear(rows, weight.flatten(1), bias).permute(0, 3, 1, 2)
    return conv._conv_forward(x, weight, bias)


def _pointwise_as_linear(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether `conv` (weights `weight`, `bias`) is a plain 1x1 convolution of the channels-last
    image x that `linear` runs through oneDNN (CPU float32 inference)."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and use_onednn_linear(x, weight, bias))
