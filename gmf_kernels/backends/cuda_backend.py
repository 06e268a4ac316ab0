"""Backend "cuda": support as data, and its pre-projection = the ``gmf::cuda_pre_projection`` op.

    qkv = F.linear(x, W_qkv, b_qkv)                                  Backend.forward (base.py)
    pre = torch.ops.gmf.cuda_pre_projection(qkv, H, W, folded, scale, ln_eps)
              op + autograd:  gmf_kernels/cuda/op.py
              launcher:       gmf_kernels/cuda/launcher.py (checks: gmf_kernels/op_args.py)
              kernels:        csrc/ (gma_aggregate_kernel, gma_combine_kernel, gma_attention_kernel)
    out = F.linear(pre, W_proj, b_proj)

Importing this file needs neither a GPU nor the compiled module; `availability_reasons()`
says what is missing.

Deployment guards (checked before anything is launched, so that ``backend="auto"`` falls
back with the reason instead of crashing, and an explicit ``backend="cuda"`` raises
ValueError naming the problem):

* **architecture**: the GPU's compute capability (``GMAProblem.device_capability``)
  against the targets the loaded module was built for (``build_archs()``: SASS,
  ``build_ptx_archs()``: embedded PTX). SASS for sm_XY runs on capability X.y with
  y >= Y (same major); arch-specific SASS (sm_90a) only on exactly 9.0; family SASS
  (sm_100f) on the same major with y >= Y. PTX for compute_XY is JIT-compiled by the
  driver for any capability >= X.Y (compute_90a PTX: only 9.0).
* **build mode**: a module built for the CPU emulation only (``build_mode() == "emulation"``)
  has no GPU kernels.
* **driver**: the driver's CUDA version (``cuda_driver_version()``, 0 without a driver)
  against the CUDA runtime the module was built with (``cuda_runtime_version()``). A
  driver of an older *major* version cannot run the module (cudaErrorInsufficientDriver at
  the first call). Within one major version, CUDA's minor version compatibility (CUDA 11
  and later: a 12.8 build runs on a 12.2 driver) runs the module's SASS, but that driver
  cannot JIT-compile the module's newer PTX (cudaErrorUnsupportedPtxVersion), so the
  architecture check then counts SASS only (``arch_reasons(..., ptx_jit=False)``).

A module that lacks one of these functions (built before they existed) is "unknown": the
values are taken from the build metadata (`build.json`, written next to the module) and
torch where possible, and otherwise the backend refuses with a reason to rebuild.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .base import FusedBackend, GMAProblem

#: widest head the kernels take (csrc/gma_layout.h kMaxHeadDim): C <= 640
MAX_HEAD_DIM = 64
#: Input dtypes trained here (BatchNorm batch statistics) and with gradients, as data: measured
#: through the CPU emulation of the kernels (tests/test_cuda_training.py) against the float64
#: reference under the low-precision rule (2x the reference's own error at that dtype).
TRAINING_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
GRAD_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})

REBUILD = "python -m gmf_kernels.cuda build"

Arch = Tuple[int, int, str]  # (major, minor, suffix "" | "a" | "f")


# ------------------------------------------------------------------ architectures
def parse_arch_list(text: Optional[str]) -> Optional[List[Arch]]:
    """ "75;80;86;89;90" / "sm_90a, compute_100f" / "9.0" -> [(7, 5, ""), ..]; None for None.

    Unparseable entries are skipped (the caller reports an empty list as unknown)."""
    if text is None:
        return None
    out: List[Arch] = []
    for tok in re.split(r"[;,\s]+", str(text).strip()):
        t = tok.lower().replace("sm_", "").replace("compute_", "")
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)", t) or re.fullmatch(r"(\d+)(\d)([af]?)", t)
        if not m:
            continue
        arch = (int(m.group(1)), int(m.group(2)), m.group(3))
        if arch not in out:
            out.append(arch)
    return out


def arch_name(a: Arch, prefix: str = "sm_") -> str:
    return f"{prefix}{a[0]}{a[1]}{a[2]}"


def sass_runs_on(a: Arch, cap: Tuple[int, int]) -> bool:
    """Can SASS built for arch `a` run on a GPU of compute capability `cap`?"""
    major, minor, suffix = a
    if suffix == "a":  # arch-specific features: that exact GPU only
        return (cap[0], cap[1]) == (major, minor)
    return cap[0] == major and cap[1] >= minor  # binary compatibility within a major version


def ptx_runs_on(a: Arch, cap: Tuple[int, int]) -> bool:
    """Can PTX for compute_`a` be JIT-compiled by the driver for a GPU of capability `cap`?"""
    major, minor, suffix = a
    if suffix == "a":
        return (cap[0], cap[1]) == (major, minor)
    if suffix == "f":
        return cap[0] == major and cap[1] >= minor
    return (cap[0], cap[1]) >= (major, minor)


def arch_reasons(cap: Optional[Tuple[int, int]], sass: Optional[Sequence[Arch]],
                 ptx: Optional[Sequence[Arch]], where: str = "this GPU",
                 ptx_jit: Optional[str] = None) -> List[str]:
    """Why a module with these targets cannot run on capability `cap` ([] if it can).

    sass/ptx None: the module did not say (unknown). ptx_jit: None when the driver can
    JIT-compile the module's PTX, else why not (`ptx_jit_reason`): then only SASS counts."""
    if cap is None:
        return [f"the compute capability of {where} is unknown, so the CUDA module's targets cannot be "
                f"checked against it"]
    cap = (int(cap[0]), int(cap[1]))
    if sass and any(sass_runs_on(a, cap) for a in sass):
        return []
    if ptx and ptx_jit is None and any(ptx_runs_on(a, cap) for a in ptx):
        return []  # the driver JIT-compiles the embedded PTX at the first launch
    cc = f"{cap[0]}.{cap[1]} (sm_{cap[0]}{cap[1]})"
    rebuild = f"rebuild for it: `GMF_CUDA_ARCHS={cap[0]}{cap[1]} {REBUILD}`"
    if not sass:
        return [f"the CUDA module does not report the architectures it was built for (no build_archs()), so it "
                f"cannot be checked against compute capability {cc} of {where}: {rebuild}"]
    built = ", ".join(arch_name(a) for a in sass)
    if ptx is None:
        ptx_txt = "its embedded PTX is unknown (no build_ptx_archs())"
    elif not ptx:
        ptx_txt = "it embeds no PTX"
    else:
        names = ", ".join(arch_name(a, "compute_") for a in ptx)
        if ptx_jit is not None and any(ptx_runs_on(a, cap) for a in ptx):
            ptx_txt = f"its PTX ({names}) would suit it, but {ptx_jit}"
            rebuild = "update the driver, or " + rebuild
        else:
            ptx_txt = f"its PTX ({names}) needs a capability >= " + \
                min((f"{a[0]}.{a[1]}" for a in ptx), key=lambda s: tuple(map(int, s.split("."))))
    return [f"compute capability {cc} of {where} is not supported by the CUDA module: it has machine code "
            f"(SASS) for {built} (each runs on the same major version with an equal or higher minor) and "
            f"{ptx_txt}; {rebuild}"]


# ------------------------------------------------------------------ driver vs toolkit
def cuda_version_str(v: Optional[int]) -> str:
    """13000 -> "13.0", 12080 -> "12.8" (CUDA's 1000 * major + 10 * minor encoding)."""
    if v is None:
        return "unknown"
    return f"{v // 1000}.{(v % 1000) // 10}"


def driver_reasons(runtime: Optional[int], driver: Optional[int]) -> List[str]:
    """Why the driver cannot run a module built with CUDA runtime `runtime` ([] if it can)."""
    if driver is not None and driver <= 0:
        return ["no NVIDIA driver found (the CUDA module reports driver version 0): the CUDA backend needs one"]
    if runtime is None or driver is None:
        what = " and ".join(n for n, v in (("the CUDA runtime it was built with", runtime),
                                           ("the driver's CUDA version", driver)) if v is None)
        return [f"cannot check the driver against the toolkit: the CUDA module does not report {what} "
                f"(built before cuda_runtime_version()/cuda_driver_version() existed); rebuild it: `{REBUILD}`"]
    if driver // 1000 < runtime // 1000:
        return [f"the NVIDIA driver supports CUDA {cuda_version_str(driver)} but the CUDA module was built with "
                f"CUDA {cuda_version_str(runtime)}: a driver of an older major version cannot run it (CUDA's "
                f"minor version compatibility holds within one major version only). Update the driver (to one "
                f"for CUDA >= {runtime // 1000}.0) or rebuild with an older toolkit (`{REBUILD}` with nvcc "
                f"{driver // 1000}.x first on PATH)"]
    return []  # same major: minor version compatibility runs the SASS (ptx_jit_reason: not newer PTX)


def ptx_jit_reason(runtime: Optional[int], driver: Optional[int]) -> Optional[str]:
    """Why the driver cannot JIT-compile PTX made by CUDA `runtime` (None if it can or unknown).

    Minor version compatibility does not extend to PTX: a 12.2 driver rejects PTX from 12.8
    (cudaErrorUnsupportedPtxVersion), so only the module's SASS can run."""
    if runtime is None or driver is None or driver <= 0 or driver >= runtime:
        return None
    return (f"the driver (CUDA {cuda_version_str(driver)}) is older than the toolkit that made the PTX "
            f"(CUDA {cuda_version_str(runtime)}) and cannot JIT-compile it (minor version compatibility covers "
            f"SASS only)")


# ------------------------------------------------------------------ what the module says about itself
@dataclass
class DeploymentInfo:
    """Targets and versions of a loaded module (None: unknown)."""

    sass: Optional[List[Arch]] = None
    ptx: Optional[List[Arch]] = None
    runtime: Optional[int] = None
    driver: Optional[int] = None
    mode: Optional[str] = None  # build_mode(): "cuda" (GPU kernels) or "emulation" (CPU emulation only)
    notes: List[str] = field(default_factory=list)  # where a value came from when not the module
    #: memo of the checks (the GPUs, driver and module do not change within a process)
    machine_reasons: Optional[List[str]] = None
    arch_memo: dict = field(default_factory=dict)


def _call(mod, name: str):
    fn = getattr(mod, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # a broken accessor is "unknown", never a crash
        return None


def _nvcc_to_runtime(version: Optional[str]) -> Optional[int]:
    m = re.match(r"(\d+)\.(\d+)", str(version or ""))
    return 1000 * int(m.group(1)) + 10 * int(m.group(2)) if m else None


def _build_metadata() -> Optional[dict]:
    """build.json of the module gmf_kernels.cuda loaded (None if unknown)."""
    try:
        from pathlib import Path

        from ..cuda import build as cbuild
        from ..cuda import loaded_path
        path = loaded_path()
        return cbuild.read_metadata(Path(path).parent) if path else None
    except Exception:
        return None


def _torch_driver_version() -> Optional[int]:
    fn = getattr(torch._C, "_cuda_getDriverVersion", None)
    if fn is None:
        return None
    try:
        v = int(fn())
    except Exception:
        return None
    return v if v > 0 else None  # torch reports 0 when it cannot tell: unknown, not "no driver"


def deployment_info(mod) -> DeploymentInfo:
    """What `mod` says about its targets and CUDA versions, with fallbacks for older builds."""
    info = DeploymentInfo()
    mode = _call(mod, "build_mode")
    info.mode = str(mode) if mode is not None else None
    archs = _call(mod, "build_archs")
    info.sass = parse_arch_list(archs) or None
    ptx = _call(mod, "build_ptx_archs")
    info.ptx = parse_arch_list(ptx) if ptx is not None else None
    rt = _call(mod, "cuda_runtime_version")
    info.runtime = int(rt) if isinstance(rt, int) and rt > 0 else None
    drv = _call(mod, "cuda_driver_version")
    info.driver = int(drv) if isinstance(drv, int) else None
    if info.runtime is None or info.sass is None:
        meta = _build_metadata()
        if meta:
            if info.runtime is None and _nvcc_to_runtime(meta.get("nvcc_version")):
                info.runtime = _nvcc_to_runtime(meta.get("nvcc_version"))
                info.notes.append(f"runtime version from build.json (nvcc {meta.get('nvcc_version')})")
            if info.sass is None and meta.get("archs"):
                info.sass = parse_arch_list(";".join(meta["archs"])) or None
                info.notes.append("architectures from build.json")
    if info.driver is None:
        info.driver = _torch_driver_version()
        if info.driver is not None:
            info.notes.append("driver version from torch")
    return info


_INFO_CACHE: list = []  # [(module, DeploymentInfo)]: the values are fixed for a process


def _cached_info(mod) -> DeploymentInfo:
    for m, info in _INFO_CACHE:
        if m is mod:
            return info
    info = deployment_info(mod)
    _INFO_CACHE[:] = [(mod, info)]
    return info


def _device_capability(index: Optional[int]) -> Optional[Tuple[int, int]]:
    try:
        cap = torch.cuda.get_device_capability(index)
        return int(cap[0]), int(cap[1])
    except Exception:
        return None


def _machine_reasons(info: DeploymentInfo) -> List[str]:
    """Why the module cannot run on this machine at all: emulation-only build, driver, no usable GPU."""
    if info.mode == "emulation":
        return [f"the CUDA module is a CPU-emulation-only build (build_mode() == 'emulation', no GPU "
                f"kernels): rebuild it with nvcc: `{REBUILD}`"]
    reasons = driver_reasons(info.runtime, info.driver)
    try:
        n = torch.cuda.device_count()
    except Exception:
        n = 0
    jit = ptx_jit_reason(info.runtime, info.driver)
    per_device = [arch_reasons(_device_capability(i), info.sass, info.ptx, f"cuda:{i}", jit) for i in range(n)]
    if n and all(per_device):
        reasons.append(f"none of the {n} visible GPU(s) can run the CUDA module: "
                       + " | ".join(r[0] for r in per_device))
    return reasons


# ------------------------------------------------------------------ the backend
class CudaBackend(FusedBackend):
    """The CUDA kernels: eval mode on folded BatchNorms; training and gradients through
    `cuda/train_op.py` (the same kernels forward; Triton's statistics and backward kernels where
    Triton runs, else PyTorch ops with a warning)."""

    def _module(self):
        """(module or None, reasons)."""
        try:
            from ..cuda.launcher import module
            return module(), []
        except ImportError as e:
            return None, [f"CUDA extension not available: {e}"]

    def availability_reasons(self) -> List[str]:
        reasons = []
        if torch.version.cuda is None:
            reasons.append("torch is built without CUDA (torch.version.cuda is None)")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device available (torch.cuda.is_available() is False)")
        mod, why = self._module()
        reasons += why
        if mod is not None and not reasons:  # a GPU and a module: can they work together?
            info = _cached_info(mod)
            if info.machine_reasons is None:
                info.machine_reasons = _machine_reasons(info)
            reasons += info.machine_reasons
        return reasons

    def deployment_reasons(self, p: GMAProblem) -> List[str]:
        """The architecture check for the problem's own device ([] off CUDA or without a module)."""
        if p.device_type != "cuda":
            return []
        mod, _ = self._module()
        if mod is None:
            return []
        info = _cached_info(mod)
        cap = p.device_capability
        if cap is None:
            cap = _device_capability(p.device_index)
        where = f"cuda:{p.device_index}" if p.device_index is not None else "this GPU"
        key = (tuple(cap) if cap is not None else None, where)
        if key not in info.arch_memo:
            info.arch_memo[key] = arch_reasons(cap, info.sass, info.ptx, where,
                                               ptx_jit_reason(info.runtime, info.driver))
        return list(info.arch_memo[key])

    def not_supported_reasons(self, p) -> List[str]:
        reasons = super().not_supported_reasons(p)
        if p.head_dim > MAX_HEAD_DIM:
            reasons.append(f"head width d={p.head_dim} > {MAX_HEAD_DIM} (C > {10 * MAX_HEAD_DIM}) not supported")
        if not any(r.startswith("none of the") for r in reasons):
            reasons += self.deployment_reasons(p)
        return reasons

    def op(self):
        from ..cuda import op  # noqa: F401  (registers the op)
        return torch.ops.gmf.cuda_pre_projection

    def op_impl(self):
        from ..cuda.op import cuda_pre_projection_impl   # the op's body
        return cuda_pre_projection_impl

    def train_pre_projection(self, qkv, size, w, hp, training):
        """Training, or any call that needs gradients: `cuda.train_op` (statistics pass,
        differentiable folding, the same kernels, the Triton backward kernels or the PyTorch
        stages: gmf_kernels/training.py)."""
        from ..cuda.train_op import cuda_train_pre_projection
        return cuda_train_pre_projection(qkv, size, w, hp, training)


BACKEND = CudaBackend(
    name="cuda",
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    device_types=frozenset({"cuda"}),
    supports_training=True,   # statistics pass (Triton's kernel, or PyTorch ops), then the kernels (cuda/train_op.py)
    supports_grad=True,       # backward: Triton's kernels where Triton runs, else PyTorch ops (cuda/train_op.py)
    supports_sync_bn=True,    # SyncBatchNorm: one all-reduce in the statistics pass, one in the backward
    training_dtypes=TRAINING_DTYPES,
    grad_dtypes=GRAD_DTYPES,
    head_dims=None,  # d = C/10 <= 64: 4..48 specialised at compile time, others by generic code
    needs_gpu_verification=True,  # `auto` on a GPU: only where a GPU report verified it (gmf_kernels/verified.py)
)
