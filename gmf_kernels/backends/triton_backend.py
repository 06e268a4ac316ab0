"""Backend "triton": support as data, and its pre-projection = the ``gmf::triton_pre_projection`` op.

    qkv = F.linear(x, Wqkv, bqkv)                                   Backend.forward (base.py)
    pre = torch.ops.gmf.triton_pre_projection(qkv, H, W, folded, scale, ln_eps)
              op + autograd:  gmf_kernels/triton_kernels/op.py
              launcher:       gmf_kernels/triton_kernels/launcher.py
              kernels:        gmf_kernels/triton_kernels/aggregation.py, attention.py
    out = F.linear(pre, Wproj, bproj)

Training and gradients (`TritonBackend.pre_projection` sends every call that trains or needs
gradients to ``triton_kernels/train_op.py``; eval without gradients takes the op above):

    training: statistics pass (Z of segments 0..3 and its mean / variance over the 3B images)
              -> running statistics updated as nn.BatchNorm2d -> BatchNorms folded from the batch
              statistics (differentiable) -> the eval kernels, which, when a backward follows, read
              the kept Z and keep what the backward would recompute
              (``gmf::triton_pre_projection_from_planes``)
    backward: ``TritonPreProjectionFunction`` (a torch.autograd.Function): stages B1, B2, B3 and
              the local branch (``triton_kernels/backward.py``'s decomposition) as Triton kernels
              (``attention_backward.py``, ``aggregation_backward.py``; `train_op.triton_stages`)

The statistics pass is a kernel (``triton_kernels/statistics.py``, op ``gmf::triton_z_moments``;
``gmf::triton_z_moments_planes`` when a backward follows, keeping Z and the depthwise outputs for
it), and so is the backward's recompute where the Triton backward stages run (``triton_kernels/
recompute.py``: the proxies V from the kept Z, the rest kept by the forward; or, in eval mode with
gradients, Z, V and the depthwise outputs by statistics.py's kernel, op ``gmf::triton_proxy_z``, the
softmax statistics, KV and the CRPE, and the local branch). The forward
of both modes and every backward stage run Triton kernels (the merges of per-program partials,
tiny reductions, and the layout of the qkv gradient are PyTorch ops). Training and gradients in
float32, float16 and bfloat16 (`TRAINING_DTYPES`, `GRAD_DTYPES`); SyncBatchNorm
(``GMAProblem.sync_bn``): (sum, sum of squares, count) all-reduced once between the statistics
pass and the kernels, the two gradient sums once in the backward (`distributed.py`).

Triton is imported only when this backend first runs: importing this module never
fails without Triton; `availability_reasons()` says why instead.

Devices: "cuda"; "cpu" only through the Triton interpreter (TRITON_INTERPRET=1) and
only when the caller names this backend explicitly: "auto" must never pick the
interpreter, which is orders of magnitude slower than the torch backend.

GPU architectures: `ARCH_SUPPORT` (below; the table is `triton_kernels/config.py`'s
``ARCH_DOTS``, which the launchers and the AOT compiles read too): per minimum compute
capability, the input dtypes the kernels run and the precision of their dots. sm_80 and
newer: fp32 (3xTF32 dots), fp16 and bf16 (TF32 dots); sm_70 / sm_75 (no TF32, no bf16
arithmetic): fp32 and fp16 with fp32 FMA dots, bf16 refused; below sm_70: refused. Every kernel is compiled ahead of time
for sm_70, sm_75, sm_80 and sm_90 in CI (tests/test_triton_compile.py).
"""
from __future__ import annotations

from functools import lru_cache
from typing import List

import torch

from .._env import triton_interpreting
from ..triton_kernels.config import ARCH_DOTS, arch_dots, dtype_name, train_size_reasons
from .base import FusedBackend, GMAProblem

#: What the Triton kernels support per GPU architecture, as data: rows of (minimum compute
#: capability, {input dtype: tl.dot input_precision}); a GPU takes the first row it reaches,
#: a dtype missing from that row is refused, a GPU below every row is refused.
ARCH_SUPPORT = ARCH_DOTS


def _interpreting() -> bool:
    return triton_interpreting()


@lru_cache(maxsize=None)
def _triton_import_error() -> str:
    # find_spec, not import: importing triton fixes TRITON_INTERPRET for the whole process,
    # and a mere availability query (info, available_backends) must not do that
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; pip install triton"
    return ""


def arch_reasons(p: GMAProblem) -> List[str]:
    """Why the problem's GPU architecture cannot run it (`ARCH_SUPPORT`); [] when it can or is unknown."""
    if p.device_type != "cuda" or p.device_capability is None:
        return []
    major, minor = p.device_capability
    row = arch_dots((major, minor), ARCH_SUPPORT)
    oldest = ARCH_SUPPORT[-1][0]
    if row is None:
        return [f"compute capability {major}.{minor} (sm_{major}{minor}): the Triton kernels support sm_"
                f"{oldest[0]}{oldest[1]} and newer (backends/triton_backend.py ARCH_SUPPORT)"]
    dt = dtype_name(p.dtype)
    if dt not in row:
        return [f"dtype {dt} is not supported on compute capability {major}.{minor} (sm_{major}{minor}); "
                f"there: {sorted(row)} (backends/triton_backend.py ARCH_SUPPORT)"]
    return []


#: Input dtypes trained here (BatchNorm batch statistics), as data: each within the low-precision
#: rule (2x the reference's own error at that dtype) in tests/test_backends_parity.py and
#: tests/test_triton_training.py. (bfloat16 was refused until 2026-12-02: under the interpreter
#: its outputs missed the rule, 1.48e-2 against 2 x 7.1e-3, because the interpreter converts fp32
#: to bfloat16 by truncation; the kernels now round every bfloat16 store to nearest even there as
#: the GPU does, `_common.stored`, and the same case measures 5.8e-3.)
TRAINING_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
#: Input dtypes with gradients (eval mode with running statistics, and training where TRAINING_DTYPES allows).
GRAD_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


class TritonBackend(FusedBackend):
    def availability_reasons(self) -> List[str]:
        err = _triton_import_error()
        if err:
            return [err]
        if not _interpreting() and not torch.cuda.is_available():
            # nothing to run on: set_backend("triton") must say so now, not at the first forward
            return ["no CUDA device available (torch.cuda.is_available() is False), and TRITON_INTERPRET is "
                    "not set (the Triton interpreter runs the kernels on CPU tensors, slowly: set "
                    "TRITON_INTERPRET=1 before importing triton)"]
        return []

    def not_supported_reasons(self, p: GMAProblem) -> List[str]:
        reasons = super().not_supported_reasons(p)
        if p.device_type == "cpu":
            if not _interpreting():
                reasons.append("device cpu needs the Triton interpreter (set TRITON_INTERPRET=1 "
                               "before importing triton); use the torch backend on CPU")
            elif not p.explicit:
                reasons.append("device cpu runs only through the (slow) Triton interpreter: "
                               "never chosen automatically, name backend='triton' to use it")
        elif p.device_type == "cuda" and _interpreting():
            reasons.append("TRITON_INTERPRET=1 is set: Triton kernels run in the CPU interpreter, "
                           "not on the GPU")
        reasons += arch_reasons(p)
        if p.dim % 10 != 0:
            reasons.append(f"C={p.dim}: the kernels need C a multiple of 10 (heads of d = C'/8)")
        if p.training or p.needs_grad:   # the training kernels' limits (config.MAX_TRAIN_BATCH, ..._ELEMENTS)
            reasons += train_size_reasons(p.B, p.N, p.dim)
        return reasons

    def op(self):
        from ..triton_kernels import op  # noqa: F401  (lazy: Triton loads on first use; registers the op)
        return torch.ops.gmf.triton_pre_projection

    def op_impl(self):
        from ..triton_kernels.op import triton_pre_projection   # the op's body (lazy, as `op`)
        return triton_pre_projection

    def train_pre_projection(self, qkv, size, w, hp, training):
        """Training, or any call that needs gradients: `triton_kernels.train_op` (statistics pass,
        differentiable folding, the same kernels, the PyTorch-ops backward: gmf_kernels/training.py)."""
        from ..triton_kernels.train_op import triton_train_pre_projection  # lazy: imports Triton
        return triton_train_pre_projection(qkv, size, w, hp, training)


BACKEND = TritonBackend(
    name="triton",
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    device_types=frozenset({"cuda", "cpu"}),
    supports_training=True,   # statistics-pass kernel, then the kernels (triton_kernels/train_op.py)
    supports_grad=True,       # backward kernels stage by stage (train_op.triton_stages); recompute kernels
    training_dtypes=TRAINING_DTYPES,
    grad_dtypes=GRAD_DTYPES,
    supports_sync_bn=True,    # SyncBatchNorm: one all-reduce in the statistics pass, one in the backward
    needs_gpu_verification=True,  # `auto` on a GPU: only where a GPU report verified it (gmf_kernels/verified.py)
    emulated_on_cpu=True,   # the Triton interpreter
)
