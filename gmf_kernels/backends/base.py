"""What a backend is: a name, what it supports (as data), and a forward.

A backend receives validated tokens and the layer's weights and returns the
attention output. `not_supported_reasons(problem)` lists every reason it cannot
run a given problem; an empty list means it can.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

import torch

from ..weights import GMAHyper, GMAWeights


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


@dataclass
class Backend:
    """Base class: subclasses set the support fields and implement forward()."""

    name: str = "base"
    dtypes: FrozenSet[torch.dtype] = frozenset()
    device_types: FrozenSet[str] = frozenset()
    supports_training: bool = False
    supports_grad: bool = False
    supports_mixed_bn: bool = False  # aggregator BatchNorms in different modes / eps / momentum
    head_dims: Optional[FrozenSet[int]] = None  # None: any
    #: False until the backend's parity has been measured on real GPU hardware. `auto` then
    #: skips it on CUDA (an explicit choice, or GMF_AUTO_UNVERIFIED=1, still runs it).
    verified_on_gpu: bool = True

    def availability_reasons(self) -> List[str]:
        """Reasons this backend cannot run at all here (missing package, build, ...)."""
        return []

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
            reasons.append("the aggregator BatchNorms differ in mode, eps or momentum (e.g. one frozen): "
                           "only the reference backend runs that")
        if p.needs_grad and not self.supports_grad:
            reasons.append("gradients not supported (forward-only kernels): run under torch.no_grad() "
                           "or use the torch backend")
        if (not self.verified_on_gpu and p.device_type == "cuda" and not p.explicit
                and os.environ.get("GMF_AUTO_UNVERIFIED", "0") != "1"):
            reasons.append("not yet verified on GPU hardware, so 'auto' does not pick it: name it "
                           "explicitly, or set GMF_AUTO_UNVERIFIED=1 (python -m gmf_kernels.selfcheck checks it)")
        if self.head_dims is not None and p.head_dim not in self.head_dims:
            reasons.append(f"head width d={p.head_dim} not supported (supports {sorted(self.head_dims)})")
        return reasons

    def forward(self, x: torch.Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper,
                training: bool) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"backend {self.name!r} has no forward")
