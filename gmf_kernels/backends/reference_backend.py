"""Backend "reference": the oracle (gmf_kernels.reference), on any device and dtype."""
from __future__ import annotations

import torch

from ..reference import reference_pre_projection
from .base import Backend


class ReferenceBackend(Backend):
    def pre_projection(self, qkv, size, w, hp, training):
        return reference_pre_projection(qkv, size, w, hp, training)[0]


BACKEND = ReferenceBackend(
    name="reference",
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    device_types=frozenset({"cpu", "cuda"}),
    supports_training=True,
    supports_grad=True,
    supports_double_backward=True,   # PyTorch ops throughout
    supports_sync_bn=True,
    empty_batch_joins_sync=True,   # its ops on B = 0 join the all-reduces with count 0
    supports_functorch=True,
    supports_mixed_bn=True,
)
