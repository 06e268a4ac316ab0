"""Backend "reference": the oracle (gmf_kernels.reference), on any device and dtype."""
from __future__ import annotations

import torch

from ..reference import reference_group_mix_attention
from .base import Backend


class ReferenceBackend(Backend):
    def forward(self, x, size, w, hp, training):
        return reference_group_mix_attention(x, size, w, hp, training)


BACKEND = ReferenceBackend(
    name="reference",
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    device_types=frozenset({"cpu", "cuda"}),
    supports_training=True,
    supports_grad=True,
    supports_mixed_bn=True,
)
