"""`GroupMixAttention`: drop-in for upstream `EfficientAtt`, same arguments and state_dict keys.

The submodules hold the parameters under upstream's names (docs/spec.md §1); the
computation is `gmf_kernels.functional.run_attention`, on the backend chosen by
dispatch. The aggregator's and CRPE's modules are never called (their weights go to the
kernels); `qkv` and `proj` are called as modules, as upstream calls them, where they are
not plain `nn.Linear` layers or carry hooks (`_called_linears`): a LoRA adapter, a
quantised or sharded linear, a forward hook then act as they would upstream.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ._tracing import constant_under_compile
from ._validation import check_dim
from .backends import check_backend_name, check_backend_usable
from .distributed import layer_group
from .folding import clear_weight_cache
from .functional import run_attention
from .weights import CRPE_WINDOWS, GMAHyper, GMAWeights, NUM_SEGMENTS, collapse4, default_scale, widths


class SeparableConv2d(nn.Module):
    """Depthwise k x k (`conv1`, no bias) then 1x1 (`pointwise_conv`, no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, kernel_size // 2,
                               groups=in_channels, bias=False)
        self.pointwise_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        return self.pointwise_conv(self.conv1(x))


class LocalBranch(nn.Module):
    """Parameters of the non-attention branch (upstream `Agg_0`): 3s -> s."""

    def __init__(self, seg_dim: int):
        super().__init__()
        self.conv = SeparableConv2d(3 * seg_dim, seg_dim, 3)
        self.norm = nn.LayerNorm(seg_dim)


class Aggregator(nn.Module):
    """Parameters of the group-proxy aggregator: norm0..3, agg1..3 (3/5/7), agg0 (local)."""

    def __init__(self, dim: int):
        super().__init__()
        s = dim // NUM_SEGMENTS
        self.norm0 = nn.BatchNorm2d(s)
        self.agg1, self.norm1 = SeparableConv2d(s, s, 3), nn.BatchNorm2d(s)
        self.agg2, self.norm2 = SeparableConv2d(s, s, 5), nn.BatchNorm2d(s)
        self.agg3, self.norm3 = SeparableConv2d(s, s, 7), nn.BatchNorm2d(s)
        self.agg0 = LocalBranch(s)


class ConvRelPosEnc(nn.Module):
    """Parameters of the CRPE: depthwise 3x3 / 5x5 / 7x7 with bias on 2 / 3 / 3 heads."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.conv_list = nn.ModuleList(
            nn.Conv2d(n * head_dim, n * head_dim, k, padding=k // 2, groups=n * head_dim)
            for k, n in CRPE_WINDOWS)


class _Shared:
    """A reference that copy.deepcopy shares instead of copying (a ProcessGroup cannot be
    copied, and a copy of the layer, e.g. an EMA model, synchronises over the same group)."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class GroupMixAttention(nn.Module):
    """Group-Mix Attention; `forward(x, size)` with x (B, N, C) and size = (H, W).

    Args mirror upstream `EfficientAtt`; `attn_drop` is accepted and, as upstream, unused
    (the factorized attention forms no attention matrix). `backend` is "auto" or one of
    `gmf_kernels.BACKEND_NAMES`; `check=True` runs the reference beside the chosen backend
    and raises when they disagree beyond the dtype's tolerance.

    Several processes (upstream trains with SyncBatchNorm in the aggregator): when the
    aggregator BatchNorms are `torch.nn.SyncBatchNorm` (what
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)` makes of them; same state_dict
    keys) or `process_group` is given (then for plain BatchNorm2d too, overriding a
    SyncBatchNorm's own group), their training-mode batch statistics are all-reduced over
    the group's ranks, as SyncBatchNorm does. Without an initialised process group, or with
    one rank, such a layer behaves exactly like BatchNorm (as torch's SyncBatchNorm does).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: Optional[str] = "auto",
                 check: bool = False, process_group=None):
        super().__init__()
        check_dim(dim, num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or default_scale(dim, num_heads)
        self.backend = check_backend_name(backend)
        self.check = check
        self.process_group = process_group
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)  # unused, as upstream
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.aggregator = Aggregator(dim)
        self.crpe = ConvRelPosEnc(widths(dim, num_heads)[2])

    @property
    def process_group(self):
        """The torch.distributed process group the aggregator BatchNorms synchronise over in
        training mode (for plain BatchNorm2d too, overriding a SyncBatchNorm's own), or None."""
        return self._process_group.value

    @process_group.setter
    def process_group(self, group):
        self._process_group = _Shared(group)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, scale={self.scale:.4g}, backend={self.backend!r}"

    def train(self, mode: bool = True) -> "GroupMixAttention":
        # the eval folding is rebuilt at the next eval call: a write through .data since the last one (an
        # EMA update, say), which the cache's version counters do not see, is then taken (folding.clear_weight_cache)
        clear_weight_cache(self)
        return super().train(mode)

    def set_backend(self, backend: Optional[str]) -> "GroupMixAttention":
        """Select this layer's backend: "auto", or a name that must be able to run on this
        machine (ValueError with the reasons otherwise, e.g. Triton not installed)."""
        self.backend = check_backend_usable(backend)
        return self

    def gma_weights(self, norms=None) -> GMAWeights:
        """The layer's tensors. A BatchNorm without affine parameters (affine=False) enters with a weight of
        ones and a bias of zeros (its identity affine); one in training mode that does not track running
        statistics (track_running_stats=False) without them, as nn.BatchNorm2d then neither reads nor
        updates its buffers. `norms`: the layer's `_norms()`, where the caller has them already."""
        a = self.aggregator
        norms = norms or self._norms()
        agg0, crpe = a.agg0, self.crpe
        local, ln, crpe_convs = agg0.conv, agg0.norm, tuple(crpe.conv_list)
        local_dw, local_pw = local.conv1, local.pointwise_conv
        aggs = (a.agg1, a.agg2, a.agg3)
        dws = (aggs[0].conv1, aggs[1].conv1, aggs[2].conv1)
        pws = (aggs[0].pointwise_conv, aggs[1].pointwise_conv, aggs[2].pointwise_conv)
        for m in (*dws, *pws, local_dw, local_pw, ln, *crpe_convs, *aggs, a, agg0, local, crpe,
                  a.norm0, a.norm1, a.norm2, a.norm3):
            if m._forward_pre_hooks or m._forward_hooks:   # rare: the hot path only looks
                self._fire_weight_hooks()
                break
        affine = [self._affine(n) for n in norms]
        untracked = [n.training and not n.track_running_stats for n in norms]   # buffers neither read nor updated
        return GMAWeights(
            qkv_weight=self.qkv.weight, qkv_bias=self.qkv.bias,
            proj_weight=self.proj.weight, proj_bias=self.proj.bias,
            bn_weight=tuple(w for w, _ in affine), bn_bias=tuple(b for _, b in affine),
            bn_running_mean=tuple(None if skip else n.running_mean for n, skip in zip(norms, untracked)),
            bn_running_var=tuple(None if skip else n.running_var for n, skip in zip(norms, untracked)),
            bn_num_batches_tracked=tuple(None if skip else n.num_batches_tracked for n, skip in zip(norms, untracked)),
            dw_weight=(dws[0].weight, dws[1].weight, dws[2].weight),
            pw_weight=(pws[0].weight, pws[1].weight, pws[2].weight),
            local_dw_weight=local_dw.weight, local_pw_weight=local_pw.weight,
            local_ln_weight=ln.weight, local_ln_bias=ln.bias,
            crpe_weight=tuple(c.weight for c in crpe_convs), crpe_bias=tuple(c.bias for c in crpe_convs),
        )

    def _fire_weight_hooks(self) -> None:
        """The aggregator's and the position encoding's modules are never called (their weights go into the
        kernels), so their hooks cannot fire as upstream's calls fire them. Those that only recompute the
        module's weight from its own parameters (`WEIGHT_HOOKS`: pruning's mask, weight_norm, spectral_norm) are
        run here, once a call, before the weights are read (else the weight stayed as at pruning time: a later
        change of weight_orig was not seen, and a second backward went through the first graph); any other hook
        is said once, by name, not to fire."""
        for prefix, top in (("aggregator", self.aggregator), ("crpe", self.crpe)):
            for where, m in top.named_modules(prefix=prefix):
                if not (m._forward_pre_hooks or m._forward_hooks):
                    continue
                other = bool(m._forward_hooks)
                for hook in list(m._forward_pre_hooks.values()):
                    if isinstance(hook, WEIGHT_HOOKS):
                        hook(m, ())
                    else:
                        other = True
                if other:
                    _say_hooks_do_not_fire(type(m).__name__, where)

    def _affine(self, n: nn.Module):
        """(weight, bias) of aggregator BatchNorm n: ones and zeros, in its buffers' (or the layer's) dtype and
        device, for one without them (affine=False)."""
        if n.weight is not None:
            return n.weight, n.bias
        like = n.running_mean if n.running_mean is not None else self.qkv.weight
        return (torch.ones(n.num_features, dtype=like.dtype, device=like.device),
                torch.zeros(n.num_features, dtype=like.dtype, device=like.device))

    def _norms(self):
        """The aggregator's four norms as the kernels take them (`_norm_as_taken`)."""
        a = self.aggregator
        return (_norm_as_taken(a.norm0, "aggregator.norm0"), _norm_as_taken(a.norm1, "aggregator.norm1"),
                _norm_as_taken(a.norm2, "aggregator.norm2"), _norm_as_taken(a.norm3, "aggregator.norm3"))

    def hyper(self, norms=None) -> GMAHyper:
        """The layer's scalars for this call; `bn_process_group` is the group each aggregator
        BatchNorm would synchronise over (SyncBatchNorm in training mode, or `process_group`),
        resolved by `run_attention` (None where nothing is to be synchronised)."""
        norms = norms or self._norms()
        return GMAHyper(num_heads=self.num_heads, scale=self.scale, bn_eps=collapse4(n.eps for n in norms),
                        bn_momentum=collapse4(n.momentum for n in norms), ln_eps=self.aggregator.agg0.norm.eps,
                        bn_process_group=collapse4(layer_group(n, self.process_group) for n in norms))

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: say what works instead
        raise RuntimeError(
            "GroupMixAttention cannot be compiled by torch.jit.script: it chooses a backend (custom "
            "ops, Triton, CUDA) in Python at run time. Use torch.jit.trace(model, example_input) "
            "(TorchScript, also what the legacy ONNX exporter uses), torch.export.export, or "
            "torch.compile instead.")

    def _called_linears(self):
        """(qkv, proj) modules to call, or None where both are plain nn.Linear layers without hooks (their
        weights then go to the backend, which may fold or fuse them). A module of another class (LoRA's
        wrapper, which exposes its base layer's weight; a quantised or parametrised linear) or one with
        hooks is called as upstream calls it: reading its weight would silently drop the adapter, skip the
        hooks (FSDP's unsharding among them)."""
        mods = (self.qkv, self.proj)
        if all(_plain_linear(m) for m in mods) and not (_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]):
            return None
        return mods

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        # as upstream, each BatchNorm's own mode decides (batch statistics in training, or
        # always when it keeps no running statistics)
        norms = self._norms()
        bn_batch_stats = collapse4(n.training or n.running_mean is None for n in norms)
        out = run_attention(x, size, self.gma_weights(norms), self.hyper(norms), bn_batch_stats, self.backend,
                            self.check or None, linears=self._called_linears())
        return self.proj_drop(out)


class _FrozenNorm(NamedTuple):
    """A frozen BatchNorm as the kernels take it: an eval-mode BatchNorm (running statistics always, never
    updated, never synchronised), with BatchNorm2d's attribute names."""
    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    num_features: int
    training: bool = False
    track_running_stats: bool = True
    num_batches_tracked: Optional[torch.Tensor] = None
    momentum: float = 0.0


#: the frozen BatchNorms taken as eval-mode BatchNorms (detectron2's, torchvision's, timm's: weight, bias,
#: running_mean and running_var buffers and eps; y = (x - mean) / sqrt(var + eps) * weight + bias)
FROZEN_NORM_NAMES = ("FrozenBatchNorm2d",)
_PLAIN_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def is_frozen_norm(n: nn.Module) -> bool:
    """A frozen BatchNorm (`FROZEN_NORM_NAMES`, with its buffers and eps), taken as an eval-mode BatchNorm."""
    return type(n).__name__ in FROZEN_NORM_NAMES and all(
        hasattr(n, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))


#: forward pre-hooks that only recompute a module's weight from its own parameters, their inputs ignored (torch's
#: pruning, weight_norm, spectral_norm): `GroupMixAttention._fire_weight_hooks` runs them
WEIGHT_HOOKS = (BasePruningMethod, WeightNorm, SpectralNorm)
_HOOKS_SAID: set = set()


@constant_under_compile   # run eagerly at trace time: Dynamo cannot trace warnings.warn (fullgraph=True failed)
def _say_hooks_do_not_fire(kind: str, where: str) -> None:
    key = (kind, where)
    if key not in _HOOKS_SAID:
        _HOOKS_SAID.add(key)
        import warnings
        warnings.warn(f"GroupMixAttention: the hooks on {where} ({kind}) do not fire: the aggregator's and "
                      f"the position encoding's modules are never called (their weights go into the kernels); "
                      f"pruning, weight_norm and spectral_norm hooks are run", stacklevel=4)


def _norm_as_taken(n: nn.Module, where: str):
    """`n` as the kernels take it: a BatchNorm itself, or a frozen BatchNorm as `_FrozenNorm`. Their weights go
    into the kernels and the module is never called, so a norm whose forward is not BatchNorm's (a subclass with
    its own, e.g. another cross-process scheme; anything else) is refused by name, not silently run as plain
    BatchNorm (its hooks: `GroupMixAttention._fire_weight_hooks`). (The common case first: a hot path, ~22 layers a
    forward.)"""
    if type(n) in _PLAIN_NORMS:
        return n
    if isinstance(n, _BatchNorm) and type(n).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return n
    if is_frozen_norm(n):
        return _FrozenNorm(n, n.weight, n.bias, n.running_mean, n.running_var, float(n.eps), n.running_mean.numel())
    raise TypeError(f"GroupMixAttention: {where} is a {type(n).__module__}.{type(n).__name__}; the aggregator's norms "
                    f"must be torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm (cross-process statistics: "
                    f"convert_sync_batchnorm, or process_group=) or a FrozenBatchNorm2d: their weights go into the "
                    f"kernels and the module itself is never called, so another forward would be skipped. To freeze "
                    f"them, requires_grad_(False) and eval() on the BatchNorm2d work too")


#: torch's global forward hooks and pre-hooks (`register_module_forward_hook`): upstream's qkv and proj calls
#: fire them
_GLOBAL_HOOKS = (torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks)


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear itself (not a subclass) without hooks of its own."""
    return (type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and not m._backward_hooks and not m._backward_pre_hooks)
