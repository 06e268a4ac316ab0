"""What a backend is: a name, what it supports (as data), and its pre-projection.

Every backend computes the same layer in the same three steps, written once here
(`Backend.forward`)::

    qkv = project_qkv(x)                       the qkv linear (cuBLAS / oneDNN)
    pre = pre_projection(qkv, (H, W), ...)     the backend's own part: steps 2-9 of docs/spec.md §1
    out = project_out(pre)                     the output linear

A backend implements `pre_projection` (and may lay out `project_qkv`'s output its own
way, and run the two linears through another library, as the torch backend does). The
fused backends share `FusedBackend.pre_projection`: fold the BatchNorms into the kernels'
weights (`folding.py`), then call their `torch.library` op (`gmf::triton_pre_projection`,
`gmf::cuda_pre_projection`).

`not_supported_reasons(problem)` lists every reason a backend cannot run a problem; an
empty list means it can. The fields of `Backend` are the declared support, as data.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, FrozenSet, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .._env import env_flag
from .._tracing import plain_eager
from ..folding import folded_weights
from ..tuning import arch_key
from ..verified import archs as verified_archs, entry as verified_entry
from ..weights import GMAHyper, GMAWeights, per_bn

Tensor = torch.Tensor


@dataclass(frozen=True)
class GMAProblem:
    """Everything dispatch needs to know about one call, without the tensors."""

    B: int
    H: int
    W: int
    dim: int
    num_heads: int
    dtype: torch.dtype
    device_type: str
    training: bool
    needs_grad: bool
    explicit: bool = False  # the caller named this backend (vs. "auto")
    uniform_bn: bool = True  # the 4 aggregator BatchNorms share mode, eps and momentum
    device_index: Optional[int] = None  # CUDA device of the input
    #: (major, minor) compute capability of that CUDA device; None off CUDA or when unknown
    device_capability: Optional[Tuple[int, int]] = None
    #: training-mode BatchNorm statistics all-reduced across processes (SyncBatchNorm, or an
    #: explicit process group; only set when the group has more than one rank)
    sync_bn: bool = False
    #: a torch.func transform (vmap, grad, jacrev, ...) is active around the call
    functorch: bool = False

    @property
    def N(self) -> int:
        return self.H * self.W

    @property
    def head_dim(self) -> int:
        return 4 * (self.dim // 5) // self.num_heads

    def describe(self) -> str:
        mode = "train" if self.training else "eval"
        grad = ", grad" if self.needs_grad else ""
        return (f"B={self.B}, H={self.H}, W={self.W}, C={self.dim}, d={self.head_dim}, "
                f"{str(self.dtype).replace('torch.', '')} on {self.device_type}, {mode}{grad}")


class FallbackWarning(RuntimeWarning):
    """A fast path was not taken, and why: `backend="auto"` ran a GMA layer on a GPU with a non-fused backend
    (`backends.select_backend`), or a fused backend ran part of its work as PyTorch ops. Said once per process
    for each distinct reason; ``warnings.filterwarnings("ignore", category=gmf_kernels.FallbackWarning)``
    silences it."""


@dataclass
class Backend:
    """Base class: subclasses set the support fields and implement pre_projection()."""

    name: str = "base"
    dtypes: FrozenSet[torch.dtype] = frozenset()
    device_types: FrozenSet[str] = frozenset()
    supports_training: bool = False
    supports_grad: bool = False
    #: the input dtypes trained (batch statistics) / with gradients, when not every one of `dtypes`
    training_dtypes: Optional[FrozenSet[torch.dtype]] = None
    grad_dtypes: Optional[FrozenSet[torch.dtype]] = None
    #: gradients of gradients (torch.autograd.grad(create_graph=True), then a backward through them); a fused
    #: backend without it raises an error naming itself at that second backward (`training.first_order_only`)
    supports_double_backward: bool = False
    supports_mixed_bn: bool = False  # aggregator BatchNorms in different modes / eps / momentum
    #: batch statistics all-reduced across processes (upstream's SyncBatchNorm) in training mode
    supports_sync_bn: bool = False
    #: runs under torch.func transforms (vmap, grad, jacrev, functional_call inside them): PyTorch ops only
    #: (the fused backends' custom ops and autograd Functions have no batching rules)
    supports_functorch: bool = False
    #: an empty batch (B = 0) in training with synchronised statistics runs this backend's ops, which join the
    #: other ranks' all-reduces with a count of 0 (`forward`); else it is refused
    empty_batch_joins_sync: bool = False
    head_dims: Optional[FrozenSet[int]] = None  # None: any
    #: True for a backend that `auto` picks on a GPU only on the architectures a GPU report has
    #: verified it on (gmf_kernels/data/gpu_verified.json, `verified_on`); an explicit choice, or
    #: GMF_AUTO_UNVERIFIED=1, still runs it elsewhere.
    needs_gpu_verification: bool = False
    #: True when it runs on a CPU only through an interpreter or emulation (orders of magnitude
    #: slower than its GPU path): `auto` never picks it there, and test sweeps are thinned.
    emulated_on_cpu: bool = False

    def availability_reasons(self) -> List[str]:
        """Reasons this backend cannot run at all here (missing package, build, ...)."""
        return []

    def verified_on(self, capability: Optional[Tuple[int, int]]) -> bool:
        """Whether `auto` may pick this backend on a GPU of this compute capability: it needs no
        verification, or gmf_kernels/data/gpu_verified.json lists the architecture for it."""
        return not self.needs_gpu_verification or verified_entry(self.name, capability) is not None

    def not_supported_reasons(self, p: GMAProblem) -> List[str]:
        reasons = list(self.availability_reasons())
        if p.device_type not in self.device_types:
            reasons.append(f"device {p.device_type} not supported (supports {sorted(self.device_types)})")
        if p.dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(p.dtype).replace('torch.', '')} not supported (supports {names})")
        if p.training and not self.supports_training:
            reasons.append("training mode not supported (BatchNorm batch statistics): use eval() or the torch backend")
        if not p.uniform_bn and not self.supports_mixed_bn:
            reasons.append("the aggregator BatchNorms differ in mode, eps, momentum or cross-process "
                           "synchronisation (e.g. one frozen, or some SyncBatchNorm and some not): only the "
                           "reference backend runs that")
        if p.sync_bn and not self.supports_sync_bn:
            reasons.append("BatchNorm statistics synchronised across processes (SyncBatchNorm / process_group) "
                           "not supported: use the torch backend")
        if p.functorch and not self.supports_functorch:
            reasons.append("torch.func transforms (vmap, grad, jacrev, ...) not supported (its kernels' custom ops "
                           "have no batching rule): use the torch backend")
        if p.needs_grad and not self.supports_grad:
            reasons.append("gradients not supported (forward-only kernels): run under torch.no_grad() "
                           "or use the torch backend")
        dt = str(p.dtype).replace("torch.", "")
        if p.dtype in self.dtypes:
            for flag, allowed, what in ((p.training and self.supports_training, self.training_dtypes, "training mode"),
                                        (p.needs_grad and self.supports_grad, self.grad_dtypes, "gradients")):
                if flag and allowed is not None and p.dtype not in allowed:
                    names = sorted(str(d).replace("torch.", "") for d in allowed)
                    reasons.append(f"{what} in {dt} not supported by the {self.name} backend (backends/"
                                   f"{self.name}_backend.py says why; it takes {names}): use the torch backend")
        if (p.device_type == "cuda" and not p.explicit and not self.verified_on(p.device_capability)
                and not env_flag("GMF_AUTO_UNVERIFIED")):
            arch = arch_key(p.device_capability) or "this GPU's architecture (unknown)"
            done = verified_archs(self.name)
            reasons.append(f"not yet verified on {arch} GPU hardware (gmf_kernels/data/gpu_verified.json lists "
                           f"{', '.join(done) if done else 'no architecture'} for it), so 'auto' does not pick "
                           f"it: name it explicitly, or set GMF_AUTO_UNVERIFIED=1 (python -m gmf_kernels.selfcheck "
                           f"checks it)")
        if self.head_dims is not None and p.head_dim not in self.head_dims:
            reasons.append(f"head width d={p.head_dim} not supported (supports {sorted(self.head_dims)})")
        return reasons

    # ------------------------------------------------------------------ the computation
    def forward(self, x: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper, training,
                linears: Optional[Tuple[Callable, Callable]] = None) -> Tensor:
        """x (B, N, C) -> out (B, N, C): the qkv linear, this backend's pre-projection, the output linear.

        `linears`: (qkv, proj) callables that make the two linears instead of the weights in `w` (the
        module's own qkv and proj modules where they are not plain nn.Linear layers: an adapter such as
        LoRA, hooks, a quantised or sharded linear); qkv(x) gives upstream's channel order.

        An empty batch (B = 0) returns an empty (0, N, C) result at once, as torch's own layers
        do, on every backend (kernels are never launched on it): in training, a BatchNorm that
        tracks running statistics counts the batch (num_batches_tracked + 1, which weighs a later
        cumulative average, momentum=None) and keeps its running mean and variance, as
        nn.BatchNorm2d does. With synchronised statistics the other ranks wait for this one in their
        all-reduces: backends that `empty_batch_joins_sync` (torch, reference) run their ops on the
        empty batch and join with a count of 0, as torch.nn.SyncBatchNorm does; the others raise."""
        if x.shape[0] == 0 and not torch.jit.is_tracing():
            if not (hp.bn_process_group is not None and (any(training) if isinstance(training, tuple) else training)):
                count_empty_batch(w, training)
                return empty_batch_result(x, w)
            if not self.empty_batch_joins_sync:
                raise ValueError(
                    f"an empty batch (B = 0) on this rank in training with synchronised BatchNorm statistics "
                    f"(SyncBatchNorm / process_group): the {self.name} backend cannot take part in the other ranks' "
                    f"all-reduces with it (the torch and reference backends do, with a count of 0, as "
                    f"torch.nn.SyncBatchNorm does), and they will wait for this rank. Give every rank at least "
                    f"one image (e.g. DataLoader(drop_last=True)), or run the layers on backend='torch' "
                    f"on every rank")
            # the ops run on the empty batch: this rank joins the statistics' all-reduces (forward and backward)
            # with a count of 0 and takes the other ranks' statistics, as torch.nn.SyncBatchNorm does
        if linears is not None:
            pre = self.pre_projection(self.qkv_from_upstream_order(linears[0](x), w), size, w, hp, training)
            return linears[1](pre)
        qkv = self.project_qkv(x, w, hp, training)
        pre = self.pre_projection(qkv, size, w, hp, training)
        return self.project_out(pre, w)

    def qkv_from_upstream_order(self, qkv: Tensor, w: GMAWeights) -> Tensor:
        """qkv in upstream's channel order (nn.Linear's output) -> as `project_qkv` returns it."""
        return qkv

    def project_qkv(self, x: Tensor, w: GMAWeights, hp: GMAHyper, training) -> Tensor:
        """The qkv linear, (B, N, 3C) in upstream's channel order (q | k | v, segments 0..4 each)."""
        return F.linear(x, w.qkv_weight, w.qkv_bias)

    def project_out(self, pre: Tensor, w: GMAWeights) -> Tensor:
        """The output linear, pre-projection tokens (B, N, C) -> out (B, N, C)."""
        return F.linear(pre, w.proj_weight, w.proj_bias)

    def pre_projection(self, qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                       training) -> Tensor:  # pragma: no cover - interface
        """qkv (as project_qkv returns it) -> pre-projection tokens (B, N, C) = [A | L]."""
        raise NotImplementedError(f"backend {self.name!r} has no pre_projection")


def needs_grad(qkv: Tensor, w: GMAWeights) -> bool:
    """Whether autograd records this call (grad mode on and qkv or a weight requires grad).

    Never while torch.jit.trace records: the trace is an inference graph, and its check re-runs
    the call under no_grad, so a call that took the gradient path (the differentiable folding and
    the Function; the training kernels' size reasons, with arithmetic on traced sizes) recorded a
    different graph there (TracingCheckError, tests/test_export.py). Gradients through the traced
    graph still flow, through the eval op's registered autograd."""
    return (torch.is_grad_enabled() and not torch.jit.is_tracing()
            and (qkv.requires_grad or any(t.requires_grad for t in w.tensors())))


def count_empty_batch(w: GMAWeights, training) -> None:
    """nn.BatchNorm2d on an empty batch in training: num_batches_tracked + 1 (running statistics unchanged),
    for each aggregator BatchNorm in training mode (`training`: one flag, or one per BatchNorm) that has one."""
    counters = [c for i, c in enumerate(w.bn_num_batches_tracked) if per_bn(training, i) and c is not None]
    if counters:
        with torch.no_grad():
            torch._foreach_add_(counters, 1)


def empty_batch_result(x: Tensor, w: GMAWeights) -> Tensor:
    """The (0, N, C) result of an empty batch: the dtype the layer would return (the output
    linear's, so autocast's under autocast), connected to x and to every parameter so that a
    backward gives them zero gradients, as torch's own layers do for an empty batch."""
    out = F.linear(x, w.proj_weight, w.proj_bias)
    params = [t for t in w.tensors() if t.requires_grad]
    if params and torch.is_grad_enabled():
        out = out + (0 * sum(t.sum() for t in params)).to(out.dtype)
    return out


@dataclass
class FusedBackend(Backend):
    """A backend whose pre-projection is one torch.library op over the folded weights.

    Subclasses name their op (`op`, a callable taking qkv, H, W, the folded weights as a
    list in `folding.WEIGHT_NAMES` order, scale and ln_eps); this class folds the eval-mode
    BatchNorms (cached per layer) and calls it.
    """

    def op(self) -> Callable[..., Tensor]:  # pragma: no cover - interface
        raise NotImplementedError(f"backend {self.name!r} names no op")

    def op_impl(self) -> Optional[Callable[..., Tensor]]:
        """The Python function behind `op`, which `pre_projection` calls directly on a plain eager call
        that needs no gradient (`_tracing.plain_eager`); None: always the op. The op's dispatch (the
        custom_op / triton_op machinery) took ~0.12 ms of host time per call on the development CPU (a
        layer's eval call at C = 320 7x7 batch 1, launches stubbed, its linears included: 0.84-0.91 ->
        0.72-0.78 ms, 4 alternating runs, best of 5 each), time a GPU waits for once the
        kernels are short: at stage 3 the H200 measured 0.38 ms a call for 0.11 ms of kernels. Traces,
        dispatch modes, functorch transforms and tensor subclasses still go through the op."""
        return None

    def train_pre_projection(self, qkv: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                             training: bool) -> Tensor:  # pragma: no cover - interface
        """The pre-projection with autograd (training mode, or any call that needs gradients)."""
        raise ValueError(f"the {self.name} backend runs eval mode without gradients only; use the torch backend")

    def pre_projection(self, qkv, size, w, hp, training):
        """Eval without gradients: the op on the cached eval folding. Training, or any call
        that needs gradients: `train_pre_projection` (the backend's autograd Function over the
        same op: gmf_kernels/training.py; never while torch.jit.trace records, `needs_grad`)."""
        if training or needs_grad(qkv, w):
            if training and torch.jit.is_tracing():
                warn_traced_training(self.name)
            return self.train_pre_projection(qkv, size, w, hp, bool(training))
        H, W = size
        folded = list(folded_weights(w, hp, qkv.dtype))
        args = (qkv, int(H), int(W), folded, float(hp.scale), float(hp.ln_eps))
        impl = self.op_impl() if plain_eager((qkv, *folded)) else None
        return (impl or self.op())(*args)


def warn_traced_training(backend: str) -> None:
    """torch.jit.trace of a training-mode call on a fused backend: the trace keeps the ops inside
    the autograd Function, not the Function, and where the batch statistics come from a kernel
    (op ``gmf::triton_z_moments``, no autograd formula: the Triton backend, and the CUDA backend
    wherever Triton runs) a backward through the traced module fails there
    (tests/test_export.py). Its forward (output, running statistics) is right. Said as a
    TracerWarning, at trace time."""
    warnings.warn(
        f"torch.jit.trace of a training-mode GroupMixAttention on the {backend!r} backend records a "
        f"forward-only graph: a backward through the traced module fails where its BatchNorm batch "
        f"statistics come from a kernel (an op without an autograd formula). Trace in eval mode "
        f"(model.eval(); gradients through that graph work), or train the eager module or "
        f"torch.compile it.",
        torch.jit.TracerWarning, stacklevel=3)
