"""The tensors of one Group-Mix Attention layer, as plain data.

`GMAWeights` is what the functional API and every backend receive: the upstream
parameters and BatchNorm buffers, by role, with no nn.Module attached. The module
(`gmf_kernels.modules.GroupMixAttention`) builds one per forward from its
submodules, so the state_dict keys of docs/spec.md §1 stay the single source of
truth.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor

#: CRPE window sizes and how many heads use each (docs/spec.md §1, step 7), in head order.
CRPE_WINDOWS: Tuple[Tuple[int, int], ...] = ((3, 2), (5, 3), (7, 3))
#: Depthwise kernel size of aggregator segments 1, 2, 3.
SEGMENT_KERNELS: Tuple[int, int, int] = (3, 5, 7)
NUM_SEGMENTS = 5
NUM_HEADS = sum(n for _, n in CRPE_WINDOWS)  # 8: the only head count the CRPE split defines


class GMAWeights(NamedTuple):
    """Parameters and buffers of one GMA layer (upstream `EfficientAtt`)."""

    qkv_weight: Tensor                      # (3C, C)
    qkv_bias: Optional[Tensor]              # (3C) or None
    proj_weight: Tensor                     # (C, C)
    proj_bias: Optional[Tensor]             # (C)
    bn_weight: Tuple[Tensor, ...]           # 4 × (s): aggregator.norm{0..3}
    bn_bias: Tuple[Tensor, ...]
    bn_running_mean: Tuple[Tensor, ...]
    bn_running_var: Tuple[Tensor, ...]
    bn_num_batches_tracked: Tuple[Optional[Tensor], ...]
    dw_weight: Tuple[Tensor, ...]           # (s,1,3,3), (s,1,5,5), (s,1,7,7): agg{1,2,3}.conv1
    pw_weight: Tuple[Tensor, ...]           # 3 × (s,s,1,1): agg{1,2,3}.pointwise_conv
    local_dw_weight: Tensor                 # (3s,1,3,3): agg0.conv.conv1
    local_pw_weight: Tensor                 # (s,3s,1,1): agg0.conv.pointwise_conv
    local_ln_weight: Tensor                 # (s): agg0.norm
    local_ln_bias: Tensor
    crpe_weight: Tuple[Tensor, ...]         # (2d,1,3,3), (3d,1,5,5), (3d,1,7,7)
    crpe_bias: Tuple[Tensor, ...]           # (2d), (3d), (3d)

    @property
    def dim(self) -> int:
        return self.qkv_weight.shape[1]

    def tensors(self):
        """Every tensor held (None entries skipped), in field order."""
        for field in self:
            items = field if isinstance(field, tuple) else (field,)
            for t in items:
                if t is not None:
                    yield t


#: GMAWeights fields that are buffers (running statistics) / trainable parameters, in field order
BUFFER_FIELDS: Tuple[str, ...] = ("bn_running_mean", "bn_running_var", "bn_num_batches_tracked")
PARAM_FIELDS: Tuple[str, ...] = tuple(f for f in GMAWeights._fields if f not in BUFFER_FIELDS)


def named_fields(w: GMAWeights, fields) -> List[Tuple[str, Tensor]]:
    """[(name, tensor)] for the tensors of the given fields, tuple entries named ``field[i]`` (None
    entries skipped)."""
    out = []
    for f in fields:
        v = getattr(w, f)
        if isinstance(v, tuple):
            out += [(f"{f}[{i}]", t) for i, t in enumerate(v) if t is not None]
        elif v is not None:
            out.append((f, v))
    return out


class GMAHyper(NamedTuple):
    """Scalars of one GMA layer. Defaults are the released checkpoints'.

    bn_eps / bn_momentum may also be 4-tuples (one per aggregator BatchNorm) when the
    four differ; only the reference backend runs such layers.

    bn_process_group: the torch.distributed process group whose ranks share the aggregator
    BatchNorms' batch statistics (upstream's SyncBatchNorm), or None: statistics of this
    process only. The entry points set it (`gmf_kernels.distributed.resolve_group`) only
    when there is something to synchronise: training mode, an initialised group of more
    than one rank. It may be a 4-tuple too (reference backend only).
    """

    num_heads: int = 8
    scale: float = 1.0
    bn_eps: float = 1e-5
    bn_momentum: Optional[float] = 0.1
    ln_eps: float = 1e-5
    bn_process_group: Optional[object] = None


def per_bn(value, i: int):
    """Entry i of a per-BatchNorm setting given as a scalar or a 4-tuple."""
    return value[i] if isinstance(value, tuple) else value


def collapse4(values):
    """A scalar when the 4 per-BatchNorm entries agree, else the tuple."""
    values = tuple(values)
    return values[0] if all(v == values[0] for v in values) else values


def default_scale(dim: int, num_heads: int) -> float:
    """scale = (C // h) ** -0.5: from the module width, not the proxy head width d."""
    return (dim // num_heads) ** -0.5


def widths(dim: int, num_heads: int = 8) -> Tuple[int, int, int]:
    """(s, C', d) for a module width C: segment width, attention width, head width."""
    s = dim // NUM_SEGMENTS
    cp = 4 * s
    return s, cp, cp // num_heads
