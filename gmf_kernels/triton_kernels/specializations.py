"""The kernel specialisations that real calls make the Triton JIT compile, compiled ahead of
time (no GPU needed).

**Which specialisations.** `real_calls()` lists the layer calls of the released models at
224x224 (each model's four stage widths at their stage grids 56, 28, 14, 7; GroupMixFormer-S:
C=80 at 56x56, C=160 at 28x28, C=320 at 14x14 and 7x7), at batch 128 and batch 1, in fp32,
fp16 and bf16. For each call and GPU architecture, `specializations_of_call` runs the
launcher's own planning code (`launcher.plan_pre_projection`) on *meta* tensors (shapes,
strides and dtypes, nothing allocated), which yields the exact arguments of the three
launches, and hands them to Triton's own JIT binder (``triton.runtime.jit``:
``create_function_from_signature`` with ``native_specialize_impl``, then
``JITFunction._pack_args``), i.e. the code that specialises a real launch:

* integer arguments divisible by 16 get ``tt.divisibility = 16``; integers equal to 1
  become compile-time constants; except the shape integers the kernels exempt with
  ``do_not_specialize`` (N, H, W, the aggregation's per-job split counts splits0..4 and the
  combine's splits0..3: otherwise a job with one split, and N % 16, would each compile other
  variants), so one variant per
  (kernel, C, dtype, arch) serves every image size and batch, and the strides, whose
  divisibility aligns the vector loads, stay specialised;
* pointer arguments get ``tt.divisibility = 16`` when their address is 16-byte aligned; a
  meta tensor's address is 0, so every buffer counts as aligned, as fresh torch
  allocations are (a weight that is a misaligned view would make the JIT compile one more,
  unaligned, variant that is not listed here);
* floats and bools are not specialised; the launch options (num_warps, ...) are parsed by
  the target's backend as at run time.

Identical (kernel, arch, signature, constants, attributes, options) are compiled once and
list every call that uses them. An (arch, dtype) that `config.ARCH_DOTS` refuses (bf16 below
sm_80) is never launched there, so it is not listed. Depends on these Triton 3.6 internals (checked by
tests/test_triton_compile.py): a Triton that renames them fails loudly here.

**Compiling.** `compile_one(spec)` compiles one with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=...)``, which
needs no GPU and no driver, keeping Triton's default line information (``.loc`` in the
PTX, ``ptxas -lineinfo``; unless TRITON_DISABLE_LINE_INFO=1, which `compile_one` refuses,
so sanitizer and ncu reports point at kernel source lines). Resource usage: registers and
spills from ``ptxas -lineinfo -v`` (Triton's own ptxas flags) re-run on the generated PTX
and read by the package's one ptxas parser (`gmf_kernels.cuda.build.parse_ptxas`),
local/stack/shared bytes from ``cuobjdump --dump-resource-usage`` on the cubin, Triton's
dynamic shared memory from the kernel metadata. Known miscompiles: the TTIR is scanned for the 3xTF32
dot pattern behind `config.DOT_OVERRIDES` (`tf32x3_dual_operands`, `known_miscompile`); the AOT tests
fail on a specialisation that has it.

**Cache key.** A specialisation keeps every attribute entry the JIT makes, the empty ones too
(an int not divisible by 16), and `compile_one` builds the source and options as
``JITFunction.run`` does: the kernel lands in the Triton cache under the key the JIT looks up
for the real launch (`cache_key`; tests/test_triton_compile.py compares it with the JIT's own on
a stand-in sm_80/sm_90 driver). So ``--warm`` (the GPU report's first step on a GPU machine:
`report_specializations`, compiled in parallel with their launchers) turns the runs' first
calls into cache hits. The key also names the Triton build (Python's included) and the target:
warm the cache on the machine that runs, or compile for it with ``--triton-key`` (the key of that
machine's build of this Triton release: `check_foreign_triton_key`, `use_triton_key`;
benchmarks/seed_caches.py compiles a GPU machine's cache on the development machine so).

Enumerating and compiling need the real JIT kernels: run with TRITON_INTERPRET unset (or 0),
e.g. ``python -m gmf_kernels.triton_kernels.specializations --json out.json``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .config import (AOT_ARCHS, DTYPE_NAMES, TF32X3_DUAL_OPERAND_DIMS, arch_dots, capability_of_arch, dot_precision,
                     stage_dtype, torch_dtype)

#: image side and batches of the real calls
IMAGE = 224
BATCHES = (128, 1)
KERNEL_ORDER = {name: i for i, name in enumerate((
    "gma_aggregate_kernel", "gma_attention_kernel", "gma_combine_kernel", "gma_b1_dkv_kernel", "gma_b2_attention_kernel",
    "gma_b2_crpe_kernel", "gma_dz_kernel", "gma_pw_backward_kernel", "gma_dw_backward_kernel", "gma_dw_wgrad_kernel",
    "gma_local_backward_kernel", "gma_statistics_kernel", "gma_proxy_v_kernel", "gma_recompute_z_kernel",
    "gma_recompute_attention_kernel", "gma_recompute_local_kernel", "gma_dense_z_kernel", "gma_dense_dx_kernel",
    "gma_dense_wgrad_kernel", "gma_dense_local_dx_kernel", "gma_dense_local_wgrad_kernel",
    "gma_dense_statistics_kernel", "gma_dense_aggregate_kernel"))}
#: the argument whose element type names a specialisation's dtype
DTYPE_ARGS = ("qkv", "q", "v", "dZ", "dZL", "du", "dy")


@dataclass(frozen=True)
class Call:
    """One real layer call: width, grid, batch, input dtype."""
    C: int
    H: int
    W: int
    B: int
    dtype: str

    def label(self) -> str:
        return f"C={self.C} {self.H}x{self.W} B={self.B} {self.dtype}"

    def torch_dtype(self):
        """The input dtype as a torch dtype ("bf16" -> torch.bfloat16)."""
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class Spec:
    """One specialisation, as Triton's JIT derives it from a real launch (all fields by name)."""
    kernel: str                                   # the @triton.jit function's name
    arch: int                                     # 80 = sm_80
    signature: Tuple[Tuple[str, str], ...]        # (arg, Triton type | "constexpr")
    constexprs: Tuple[Tuple[str, object], ...]    # declared constexprs + ints the JIT made constant
    attrs: Tuple[Tuple[str, tuple], ...]          # (arg, (("tt.divisibility", 16),)) where specialised, (arg, ())
    #                                               where the JIT looked and found nothing (kept: its cache key has them)
    options: Tuple[Tuple[str, object], ...]       # the launch's options (num_warps, ...)
    jit_constants: Tuple[str, ...] = ()           # runtime ints the JIT made constants (== 1)
    used_by: Tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self):
        return (self.kernel, self.arch, self.signature, self.constexprs, self.attrs, self.options,
                self.jit_constants)

    @property
    def num_warps(self) -> int:
        return int(dict(self.options).get("num_warps", 4))

    def specialised_ints(self) -> str:
        """The integer arguments the JIT specialised: ``N%16`` (divisible), ``T=1`` (constant)."""
        cx = dict(self.constexprs)
        out = []
        for a, t in self.signature:
            if a in self.jit_constants:
                out.append(f"{a}={cx[a]}")
            elif t.startswith("i") and dict(self.attrs).get(a):
                out.append(f"{a}%16")
        return " ".join(out) or "-"

    def label(self) -> str:
        cx = dict(self.constexprs)
        short = self.kernel.replace("gma_", "").replace("_kernel", "")
        dt = next((t[1:] for a, t in self.signature if a in DTYPE_ARGS), "-")
        tiles = ", ".join(f"{k}={cx[k]}" for k in ("S_PAD", "D_PAD", "CK", "BLOCK_P", "BLOCK_N") if k in cx)
        dots = f", {cx['DOT_PRECISION']}" if "DOT_PRECISION" in cx else ""
        dots += ", unrolled" if cx.get("UNROLL") else ""          # the aggregation's tuning candidates
        dots += ", pair" if cx.get("PAIR") else ""
        dots += ", rows" if cx.get("ROWS") else ""
        dots += (", Z only" if cx.get("STORE") == 2             # the split forward's Z pass
                 else ", store" if cx.get("STORE") else "")      # the statistics pass keeping Z and y
        dots += ", from Z" if cx.get("FROM_Z") else ""          # the training forward reading them ...
        dots += ", keep R" if cx.get("STORE_R") else ""         # ... and keeping what the backward reads
        dots += ", keep stats" if cx.get("STATS") else ""
        dots += ", keep local" if cx.get("KEEP") else ""
        dots += ", no w4" if cx.get("KEEP_W4") is False else ""    # ... but w4, for a dense backward
        dots += ", local from Z" if cx.get("LOCAL_Z") else ""   # the split forward's dense Z pass computed it
        dots += ", dZ out" if cx.get("DZ_OUT") else ""          # the local backward of the dense form
        dots += ", grouped" if cx.get("GROUP") else ""          # the attention a program per CRPE window's heads
        return (f"{short} C={_width(cx)} {dt} ({tiles}, warps={self.num_warps}{dots}; "
                f"{self.specialised_ints()})")


def _width(cx: Dict[str, object]):
    """The module width C of a kernel's constexprs (C, or C' = CP = 4C/5, or s = S = C/5, or
    d = D = C/10; None for the generic depthwise-backward stencil, which knows only its channel count)."""
    if "C" in cx:
        return int(cx["C"])
    for name, factor in (("CP", 5 / 4), ("S", 5), ("D", 10)):
        if name in cx:
            return int(int(cx[name]) * factor)
    return None


def real_calls(batches: Sequence[int] = BATCHES, dtypes: Sequence[str] = DTYPE_NAMES,
               models: Optional[Iterable[str]] = None) -> Dict[Call, Tuple[str, ...]]:
    """Real calls -> the models (short names) that make them: every released model's stage
    widths at their 224x224 stage grids (56, 28, 14, 7), at the given batches and dtypes."""
    from ..models.configs import widths_by_model
    users: Dict[Call, set] = {}
    for name, dims in widths_by_model().items():
        short = name.replace("groupmixformer_", "")
        if models is not None and name not in models and short not in models:
            continue
        for stage, C in enumerate(dims):
            side = IMAGE // (4 * 2 ** stage)
            for B in batches:
                for dt in dtypes:
                    users.setdefault(Call(C, side, side, B, dt), set()).add(short)
    return {c: tuple(sorted(u)) for c, u in sorted(users.items(), key=lambda kv: (kv[0].C, -kv[0].H, -kv[0].B,
                                                                                     kv[0].dtype))}


#: The grid of `other_calls`: odd, so no tile divides it.
OTHER_GRID = (13, 17)


def other_calls(widths: Sequence[int], batches: Sequence[int] = (8,),
                dtypes: Sequence[str] = DTYPE_NAMES) -> Dict[Call, Tuple[str, ...]]:
    """Calls at widths no released model has (multiples of 10: `config.agg_tiles` gives them the
    tiles of their padded segment width), at `OTHER_GRID`; their users are named "other"."""
    return {Call(int(C), *OTHER_GRID, B, dt): ("other",) for C in widths for B in batches for dt in dtypes}


# ---------------------------------------------------------------- specialising (Triton's own code)
def _require_jit(fn):
    if type(fn).__name__ == "InterpretedFunction" or not hasattr(fn, "params"):
        raise RuntimeError("the kernels were created under TRITON_INTERPRET=1; specialise and compile them in "
                           "a process without it")


_BINDERS: Dict[tuple, object] = {}


def _binder(fn, arch: int):
    """Triton's argument binder of fn for a CUDA target (what JITFunction.run calls)."""
    key = (fn.__name__, arch)
    if key not in _BINDERS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    return _BINDERS[key]


def specialize_launch(fn, arch: int, args: tuple, kwargs: dict) -> Spec:
    """The specialisation Triton's JIT makes of ``fn[grid](*args, **kwargs)`` on sm_<arch>."""
    from triton import knobs
    _require_jit(fn)
    backend, binder = _binder(fn, arch)
    kw = dict(kwargs)
    # JITFunction.run adds these two before binding
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*args, **kw)
    _, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
    names = fn.arg_names
    sig = tuple(signature.items())
    cx = tuple((names[p[0]], v) for p, v in sorted(constexprs.items()))
    # every entry, the empty ones too (an unaligned pointer, an int not divisible by 16): the JIT's
    # cache key hashes str(attrs), so dropping them would compile the same code under another key
    at = tuple((names[p[0]], tuple(tuple(x) for x in v)) for p, v in sorted(attrs.items()))
    opts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    declared = {p.name for p in fn.params if p.is_constexpr}
    jit_constants = tuple(a for a, _ in cx if a not in declared)
    return Spec(fn.__name__, arch, sig, cx, at, opts, jit_constants)


def specializations_of_call(call: Call, arch: int, agg: Optional[Dict[str, int]] = None,
                            attn: Optional[Dict[str, int]] = None, from_planes: bool = False) -> List[Spec]:
    """The three kernels' specialisations for one real call on sm_<arch> (launcher's plan on meta
    tensors); with `agg` / `attn`, a tuning candidate of that forward family in place of its default;
    with `from_planes`, the training forward that reads the statistics pass's Z (`config.from_planes`)."""
    import torch

    from ..folding import meta_weights
    from ._common import DotVariant, interpreting
    from . import launcher as L
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the launcher would plan interpreter tiles")
    dt = call.torch_dtype()
    cap = capability_of_arch(arch)
    meta = dict(device="meta")
    qkv = torch.empty(call.B, call.H * call.W, 3 * call.C, dtype=dt, **meta)
    weights = meta_weights(call.C)
    dots = DotVariant(dot_precision(call.dtype, cap), False)
    head_dim = 4 * (call.C // 5) // 8
    # the launcher's own default tiles for this dot variant (default_shape), as at run time, unless a candidate
    shape = None if agg is None and attn is None else L.shape_from_configs(
        call.C, dots, agg or L.aggregate_default(call.C, dt, cap), attn or L.attention_default(call.C, dt, cap))
    planes = None
    if from_planes:
        z = torch.empty(3 * call.B, 4 * (call.C // 5), call.H, call.W, dtype=stage_dtype(dt), **meta)
        planes = L.planes_view(z, call.B)
    _, launches = L.plan_pre_projection(qkv, call.H, call.W, weights, head_dim ** -0.5, 1e-5, shape=shape, dots=dots,
                                        planes=planes)
    return [specialize_launch(fn, arch, args, kwargs) for fn, _grid, args, kwargs in launches]


def backward_specializations_of_call(call: Call, arch: int, aggregation: bool = False,
                                     tiles: Optional[Dict[str, Tuple[int, ...]]] = None) -> List[Spec]:
    """The backward kernels' specialisations for one real training call on sm_<arch>, on the
    stage tensors in their dtype (`config.stage_dtype`: the input's for fp16/bf16) with the backward's dots (`statistics.backward_dots`:
    the input dtype's variant, one TF32 pass for fp16/bf16 on sm_80+): the attention
    backward (attention_backward.py: B1, B2, CRPE; `plan_b1` / `plan_b2` on meta tensors in the
    layouts `backward.pre_projection_backward` passes: dA a view of grad_pre, Zq/Zk slices of Z)
    and, with `aggregation`, the aggregation backward (aggregation_backward.py `plan_stages`:
    batch statistics and running statistics, fused and separate B3, the local branch). tiles:
    {tuning family: tile} in place of the launchers' defaults (`tile_spaces`; the tuner's
    candidates, `candidate_specializations`)."""
    import torch

    from ..folding import meta_weights
    from . import backward as bw
    from ._common import DotVariant, interpreting
    from .aggregation_backward import BACKWARD_FAMILY, plan_stages, tiles_of
    from .attention_backward import B1_FAMILY, B2_FAMILY, CRPE_FAMILY, plan_b1, plan_b2
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the launchers would plan interpreter tiles")
    t = tiles or {}
    C, H, W, B = call.C, call.H, call.W, call.B
    s, N = C // 5, H * W
    cp, d = 4 * s, s // 2
    meta = dict(device="meta", dtype=torch.float32)
    dt = call.torch_dtype()
    st = dict(device="meta", dtype=stage_dtype(dt))     # the stage tensors' dtype (`config.stage_dtype`)
    Z = torch.empty(3 * B, cp, H, W, **st)
    # dA: the view of grad_pre (the layer's output gradient, in the input's dtype: Stages.grad_pre_as_is)
    dA = torch.empty(B, N, C, device="meta", dtype=dt)[..., :cp].transpose(1, 2).reshape(B, 8, d, N)
    rc = {"Z": Z, "V": torch.empty(B, cp, H, W, **st), "KV": torch.empty(B, 8, d, d, **meta),
          "R": torch.empty(B, cp, H, W, **st)}
    weights = meta_weights(C)
    dots = DotVariant(dot_precision(call.dtype, capability_of_arch(arch)), False)
    _, launches = plan_b1(Z[:B].reshape(B, 8, d, N), dA, d ** -0.5, weights.bn_scale, weights.bn_shift, dots=dots,
                          tile=t.get(B1_FAMILY))
    stats4 = torch.empty(4, s, **meta)
    # B2 with the BatchNorm backward fused in (batch statistics, and running statistics), as
    # `train_op.triton_stages` runs it
    wgrad_tiles = tiles_of(t[BACKWARD_FAMILY]) if BACKWARD_FAMILY in t else None
    for bn in ((stats4, stats4), (None, None)):
        launches += plan_b2(dA, torch.empty(B, 8, d, d, **meta), rc, weights, d ** -0.5, dots=dots,
                            tiles=(t.get(B2_FAMILY), t.get(CRPE_FAMILY)), bn=bn, wgrad_tiles=wgrad_tiles)[1]
    if aggregation:
        rc = bw.recompute(torch.empty(B, N, 3 * C, **meta), H, W, weights, 1e-5)   # the real layouts of Z, u, y
        rc = {k: [t.to(st["dtype"]) for t in v] if isinstance(v, list) else
              v.to(st["dtype"]) if k in ("Z", "w4", "xh4") else v for k, v in rc.items()}   # ... and dtypes
        stats = torch.empty(4, s, **meta)
        d_qkv = torch.empty(B, N, 3 * C, device="meta", dtype=dt)      # the input gradient, in the input's dtype
        qkv = torch.empty(B, N, 3 * C, device="meta", dtype=dt)        # the stencils' inputs, read in place
        for mean in (stats, None):
            launches += plan_stages(torch.empty_like(rc["Z"]), rc, weights, mean, mean, dots, d_qkv, qkv,
                                    wgrad_tiles)
    return [specialize_launch(fn, arch, args, kwargs) for fn, _grid, args, kwargs in launches]


def backward_specializations(calls: Optional[Dict[Call, Tuple[str, ...]]] = None,
                             archs: Sequence[int] = AOT_ARCHS) -> List[Spec]:
    """Deduplicated backward specialisations (attention and aggregation) of the real calls
    whose layers run the backward kernels on that architecture (`config.backward_kernels_take`),
    fp32 compute; every input dtype, for the stage tensors and the input gradient in the input's
    dtype (fp16/bf16) and the dots' precision."""
    calls = real_calls() if calls is None else calls
    return _collect(calls, archs, lambda call, arch: (backward_specializations_of_call(call, arch, True)
                                                      if _backward_kernels_run(call, arch) else []))


def _backward_kernels_run(call: Call, arch: int) -> bool:
    """Whether this call's backward runs the Triton kernels on sm_<arch> (`train_op.triton_stages`)."""
    from .config import backward_kernels_take
    return backward_kernels_take(call.C // 5, dot_precision(call.dtype, capability_of_arch(arch)))


def statistics_specializations_of_call(call: Call, arch: int,
                                       tiles: Optional[Dict[str, Tuple[int, ...]]] = None) -> List[Spec]:
    """The training statistics kernel's specialisation for one real call on sm_<arch>, and, where the
    Triton backward stages take the planes it keeps, the training forward's three kernels that read them
    and keep what the backward would recompute (`config.from_planes`) and the backward's recompute kernels
    (`config.backward_kernels_take` for that architecture: train_op.triton_stages) (statistics.plan_statistics
    / plan_recompute, recompute.plan_recompute_attention / plan_recompute_local on meta tensors;
    the statistics kernel's dots are the fp32 variant whatever the input dtype, the recompute
    kernels' the backward's, `statistics.backward_dots`: see statistics.py). tiles: as
    `backward_specializations_of_call`'s."""
    import torch

    from ..folding import meta_weights
    from ._common import DotVariant, interpreting
    from .recompute import ATTENTION_FAMILY, LOCAL_FAMILY, plan_proxy_v, plan_recompute_attention, plan_recompute_local
    from .statistics import (RECOMPUTE_Z_FAMILY, STATS_FAMILY, gma_recompute_z_kernel, gma_statistics_kernel,
                             plan_recompute, plan_statistics)
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the launcher would plan interpreter tiles")
    t = tiles or {}
    qkv = torch.empty(call.B, call.H * call.W, 3 * call.C, dtype=call.torch_dtype(), device="meta")
    wts = meta_weights(call.C)
    w = (wts.dw3, wts.dw5, wts.dw7, wts.pw)
    dots = DotVariant(dot_precision("fp32", capability_of_arch(arch)), False)
    _, _, _, (_grid, args, kwargs) = plan_statistics(qkv, call.H, call.W, *w, t.get(STATS_FAMILY), dots=dots,
                                                     store=_backward_kernels_run(call, arch))
    specs = [specialize_launch(gma_statistics_kernel, arch, args, kwargs)]
    dots = DotVariant(dot_precision(call.dtype, capability_of_arch(arch)), False)   # the backward's
    if _backward_kernels_run(call, arch):
        specs += specializations_of_call(call, arch, from_planes=True)   # the training forward, from Z
        (Z, PV, _y), (_grid, args, kwargs) = plan_recompute(qkv, call.H, call.W, wts.bn_scale, wts.bn_shift,
                                                                *w, t.get(RECOMPUTE_Z_FAMILY), dots=dots)
        specs.append(specialize_launch(gma_recompute_z_kernel, arch, args, kwargs))
        fn, _grid, args, kwargs = plan_proxy_v(Z, wts)[1]
        specs.append(specialize_launch(fn, arch, args, kwargs))
        for fn, _grid, args, kwargs in (plan_recompute_attention(Z, PV, call.H, call.W, wts,
                                                                 t.get(ATTENTION_FAMILY), dots=dots)[1],
                                        plan_recompute_local(qkv, call.H, call.W, wts, 1e-5, t.get(LOCAL_FAMILY),
                                                             dots=dots)[1]):
            specs.append(specialize_launch(fn, arch, args, kwargs))
    return specs


def statistics_specializations(calls: Optional[Dict[Call, Tuple[str, ...]]] = None,
                               archs: Sequence[int] = AOT_ARCHS) -> List[Spec]:
    """Deduplicated statistics-kernel specialisations of the real training calls (every training
    dtype: fp32, fp16, bf16)."""
    calls = real_calls() if calls is None else calls
    return _collect(calls, archs, statistics_specializations_of_call)


def _candidate_specs(fam: str, call: Call, arch: int, cand: Dict[str, int]) -> List[Spec]:
    """The specialisations one candidate of a tuning family makes the JIT compile at one call, as
    ``benchmarks/tune.py`` runs it: a forward family's candidate in the pre-projection's three
    launches (the other forward family at its default), a training family's candidate in that
    family's kernels (`tile_spaces.KERNELS`; the rest of the training step at its defaults), and for
    "triton.backward"'s dense candidate the training forward it makes (`dense_training_specializations_of_call`:
    the tuner times that family on a layer's whole step)."""
    from . import tile_spaces, train_op  # noqa: F401  (every family registered)
    from ._common import kernel_name
    from .recompute import ATTENTION_FAMILY, LOCAL_FAMILY
    from .statistics import RECOMPUTE_Z_FAMILY, STATS_FAMILY
    from . import launcher as L
    if fam == L.AGG_FAMILY:
        return specializations_of_call(call, arch, agg=cand)
    if fam == L.ATTN_FAMILY:
        return specializations_of_call(call, arch, attn=cand)
    names = {kernel_name(k) for k in tile_spaces.KERNELS[fam]}
    tile = {fam: tuple(int(v) for v in cand.values())}
    if fam in (STATS_FAMILY, RECOMPUTE_Z_FAMILY, ATTENTION_FAMILY, LOCAL_FAMILY):
        specs = statistics_specializations_of_call(call, arch, tile)
    else:
        specs = backward_specializations_of_call(call, arch, fam == "triton.backward", tile)
    out = [sp for sp in specs if sp.kernel in names]
    if fam == "triton.backward" and cand.get("DENSE"):   # timed on a layer's training step (benchmarks/tune.py
        out += dense_training_specializations_of_call(call, arch)   # STEP_FAMILY): the forward it makes too
    return out


def candidate_specializations(calls: Optional[Dict[Call, Tuple[str, ...]]] = None,
                              archs: Sequence[int] = (80, 90)) -> List[Tuple[str, Dict[str, int], Spec]]:
    """(family, candidate, Spec) for every candidate but the default of the training kernels'
    tuning families (`tile_spaces`) at each real call that runs them: the variants
    ``benchmarks/tune.py --train`` makes the JIT compile, so that they can be compiled ahead of
    time (the defaults are `statistics_specializations` / `backward_specializations`'). Deduplicated."""
    from .. import tuning
    from . import tile_spaces, train_op  # noqa: F401  (every training family registered)
    calls = real_calls() if calls is None else calls
    out: Dict[tuple, Tuple[str, Dict[str, int], Spec]] = {}
    for arch in archs:
        supported = arch_dots(capability_of_arch(arch)) or {}
        for call in calls:
            if call.dtype not in supported:
                continue
            for fam in tile_spaces.families():
                for cand in tuning.spaces()[fam].candidates(call.C, call.torch_dtype(), capability_of_arch(arch))[1:]:
                    for sp in _candidate_specs(fam, call, arch, cand):
                        out.setdefault((fam, tuple(cand.items()), sp.key), (fam, dict(cand), sp))
    return list(out.values())


def tuning_specializations(calls: Sequence[Call], arch: int, families: Sequence[str]) -> List[Spec]:
    """What ``benchmarks/tune.py``'s sweep of the Triton `families` over `calls` makes the JIT compile
    on sm_<arch>, each once, in the sweep's order (family by family, call by call, candidate by
    candidate; a training family's call first with the defaults of the whole training step), so
    that the tuner can compile it ahead, in parallel (`compile_all`, its ``warm_cache``). Families
    without Triton kernels (``cuda.*``) are skipped."""
    from .. import tuning
    from . import tile_spaces, train_op  # noqa: F401  (every family registered)
    cap = capability_of_arch(arch)
    supported = arch_dots(cap) or {}
    training_families = set(tile_spaces.families())

    def swept(fam, call):
        specs = training_specializations_of_call(call, arch) if fam in training_families else []
        for cand in tuning.spaces()[fam].candidates(call.C, call.torch_dtype(), cap):
            specs += _candidate_specs(fam, call, arch, cand)
        return specs

    return _first_seen((f"{fam}: {call.label()}", swept(fam, call)) for fam in families
                       if fam.startswith("triton.") and fam in tuning.spaces()
                       for call in calls if call.dtype in supported)


def _collect(calls: Dict[Call, Tuple[str, ...]], archs: Sequence[int], of_call) -> List[Spec]:
    """Deduplicated `of_call(call, arch)` over the calls and archs, each Spec listing its calls in used_by."""
    specs: Dict[tuple, Spec] = {}
    users: Dict[tuple, List[str]] = {}
    for arch in archs:
        supported = arch_dots(capability_of_arch(arch)) or {}
        for call, models in calls.items():
            if call.dtype not in supported:     # refused there (ARCH_DOTS): never launched, never compiled
                continue
            for s in of_call(call, arch):
                specs.setdefault(s.key, s)
                users.setdefault(s.key, []).append(f"{call.label()} [{','.join(models)}]")
    out = [Spec(*k, used_by=tuple(users[k])) for k in specs]
    out.sort(key=lambda s: (KERNEL_ORDER[s.kernel], s.arch, _describe(s)["C"] or 0, s.label()))
    return out


def all_specializations(calls: Optional[Dict[Call, Tuple[str, ...]]] = None,
                        archs: Sequence[int] = AOT_ARCHS) -> List[Spec]:
    """Deduplicated specialisations of the given real calls (default: `real_calls()`) on these archs;
    each lists the calls (and models) that make it in ``used_by``."""
    return _collect(real_calls() if calls is None else calls, archs, specializations_of_call)


#: The training steps tests/test_gpu_real_shapes.py runs on a GPU, (C, grid side, batch), every
#: dtype: the GroupMixFormer-S stages and two widths with S_PAD 128 (unfused B3, the wide recompute tiles).
GPU_TRAIN_SHAPES = ((80, 56, 8), (160, 28, 16), (320, 14, 32), (320, 7, 1), (360, 14, 8), (480, 7, 16))


def training_specializations_of_call(call: Call, arch: int) -> List[Spec]:
    """Everything one training step of a layer makes the JIT compile on sm_<arch>: the forward
    kernels (the training forward launches the eval kernels on the folded batch statistics; where the
    backward runs the Triton stages, its aggregation reads the statistics pass's kept Z:
    `config.from_planes`), the statistics pass and recompute, and the backward stages."""
    backward = _backward_kernels_run(call, arch)
    specs = specializations_of_call(call, arch, from_planes=backward) + statistics_specializations_of_call(call, arch)
    if backward:
        specs += backward_specializations_of_call(call, arch, True)
    return specs


def dense_training_specializations_of_call(call: Call, arch: int) -> List[Spec]:
    """The forward kernels of one training step on sm_<arch> whose backward runs B3's dense form (a "triton.backward"
    candidate, `aggregation_backward.BackwardTiles.DENSE`, which the tune table may pick), where the statistics pass
    then runs in the dense form too (`dense_z.dense_statistics_applies`): that pass with the local branch's Z
    (`dense_z.plan_dense_statistics`) and the training forward that reads Z and it, keeping no w4
    (`launcher.plan_pre_projection` with zl). [] where the dense form does not apply. (The backward's own
    kernels: the candidate's, `tuning_specializations` of the training families.)"""
    import torch

    from ..folding import meta_weights
    from ._common import DotVariant, interpreting
    from . import dense_z, launcher as L
    from .aggregation_backward import dense_b3_applies
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the launchers would plan interpreter tiles")
    prec = dot_precision(call.dtype, capability_of_arch(arch))
    if not (_backward_kernels_run(call, arch) and dense_b3_applies(call.C, prec)
            and dense_z.dense_statistics_applies(call.C, call.dtype, prec)):
        return []
    qkv = torch.empty(call.B, call.H * call.W, 3 * call.C, dtype=call.torch_dtype(), device="meta")
    w = meta_weights(call.C)
    dots = DotVariant(prec, False)
    *_, z, zl, (_grid, args, kwargs) = dense_z.plan_dense_statistics(qkv, call.H, call.W, w.dw3, w.dw5, w.dw7, w.pw,
                                                                    dots, None, w.local_dw, w.local_pw)
    specs = [specialize_launch(dense_z.gma_dense_statistics_kernel, arch, args, kwargs)]
    head_dim = 4 * (call.C // 5) // 8
    _, launches = L.plan_pre_projection(qkv, call.H, call.W, w, head_dim ** -0.5, 1e-5, dots=dots,
                                        planes=L.planes_view(z, call.B), keep_w4=False, zl=zl)
    return specs + [specialize_launch(fn, arch, args, kwargs) for fn, _grid, args, kwargs in launches]


def report_specializations(arch: int) -> List[Spec]:
    """The specialisations the GPU report's runs (benchmarks/gpu_report.py) make the JIT compile on
    sm_<arch>, each once, in the order the report needs them most:

    1. GroupMixFormer-S's forward, bf16 then fp16 and fp32 (the judged bf16 model run, ops.py's
       kernel rows, the paper's fp32 run; the real-shape tests of the S stages);
    2. GroupMixFormer-S training at batch 128, fp16 (the judged training run: amp is fp16 autocast
       on CUDA), and its forward in the dense form (`dense_training_specializations_of_call`: what runs where
       the tune picks B3's dense form; the real-shape tests' dense training step, fp16, too);
    3. the training steps of the real-shape tests (`GPU_TRAIN_SHAPES`, fp32 / fp16 / bf16);
    4. the forward of every other released width at its grids (the real-shape tests);
    5. the forward candidates the speed part's tune phase tries (`REPORT_TUNE_FAMILIES` on
       GroupMixFormer-S's widths at bf16, each at its first stage grid, as benchmarks/tune.py runs
       them: `tuning_specializations`): compiled by the record part's warm-up beside the CUDA
       build, so that the speed part, on the same machine, finds them in the cache instead of
       compiling each on one CPU inside its short tune phase;
    6. the training kernels' candidates the same phase tries next (``tune.py --train`` on
       GroupMixFormer-S's widths at fp16, the judged training run's dtype: every training family).

    The forward is one variant per (kernel, C, dtype) whatever the batch and grid (the
    module docstring), so batch 128 stands for every batch. Tuned tiles are not applied (but in
    5): the launchers' defaults, as in the rest of this module."""
    from ..models.configs import MODEL_CONFIGS
    s_dims = MODEL_CONFIGS["groupmixformer_s"]["embedding_dims"]
    sides = [IMAGE // (4 * 2 ** i) for i in range(len(s_dims))]
    groups: List[Tuple[str, List[Tuple[Call, object]]]] = [
        ("GroupMixFormer-S forward", [(Call(C, g, g, 128, dt), specializations_of_call)
                                      for dt in ("bf16", "fp16", "fp32") for C, g in zip(s_dims, sides)]),
        ("GroupMixFormer-S training, fp16, batch 128", [(Call(C, g, g, 128, "fp16"), training_specializations_of_call)
                                                        for C, g in zip(s_dims, sides)]),
        ("GroupMixFormer-S training in the dense form, fp16, batch 128",
         [(Call(C, g, g, 128, "fp16"), dense_training_specializations_of_call) for C, g in zip(s_dims, sides)]),
        ("the real-shape tests' training steps", [(Call(C, g, g, B, dt), training_specializations_of_call)
                                                  for dt in DTYPE_NAMES for C, g, B in GPU_TRAIN_SHAPES]),
        ("every released width's forward", [(c, specializations_of_call) for c in real_calls((128,))]),
    ]
    first_grid = {}
    for C, g in zip(s_dims, sides):
        first_grid.setdefault(C, g)
    tune_calls = [Call(C, g, g, 128, "bf16") for C, g in first_grid.items()]
    supported = arch_dots(capability_of_arch(arch)) or {}
    tuned = [(f"the tune phase's candidates: {call.label()}",
              tuning_specializations([call], arch, REPORT_TUNE_FAMILIES)) for call in tune_calls]
    if "fp16" in supported:
        from . import tile_spaces, train_op  # noqa: F401  (every training family registered)
        tuned += [(f"the tune phase's training candidates: {call.label()}",
                   tuning_specializations([call], arch, tile_spaces.families()))
                  for call in (Call(C, g, g, 128, "fp16") for C, g in first_grid.items())]
    return _first_seen([(f"{what}: {call.label()}", of_call(call, arch)) for what, calls in groups
                        for call, of_call in calls if call.dtype in supported] + tuned)


#: The forward families the GPU report's speed part tunes (benchmarks/gpu_report.py TUNE_FAMILIES; the
#: CUDA tiles need no Triton compile)
REPORT_TUNE_FAMILIES = ("triton.aggregate", "triton.attention")


def _first_seen(labelled) -> List[Spec]:
    """Each specialisation once, in the order first met, its ``used_by`` the label it was first
    met under: `labelled` yields (label, specs)."""
    seen: Dict[tuple, Spec] = {}
    for label, specs in labelled:
        for sp in specs:
            if sp.key not in seen:
                seen[sp.key] = Spec(*sp.key, used_by=(label,))
    return list(seen.values())


# ---------------------------------------------------------------- compiling (needs triton, no GPU)
def _kernel_fn(name: str):
    from . import aggregation, aggregation_backward, attention, attention_backward, dense_z, recompute, statistics
    fn = {"gma_aggregate_kernel": aggregation.gma_aggregate_kernel,
          "gma_dense_z_kernel": dense_z.gma_dense_z_kernel,
          "gma_dense_dx_kernel": dense_z.gma_dense_dx_kernel,
          "gma_dense_wgrad_kernel": dense_z.gma_dense_wgrad_kernel,
          "gma_dense_local_dx_kernel": dense_z.gma_dense_local_dx_kernel,
          "gma_dense_local_wgrad_kernel": dense_z.gma_dense_local_wgrad_kernel,
          "gma_dense_statistics_kernel": dense_z.gma_dense_statistics_kernel,
          "gma_dense_aggregate_kernel": dense_z.gma_dense_aggregate_kernel,
          "gma_recompute_attention_kernel": recompute.gma_recompute_attention_kernel,
          "gma_recompute_local_kernel": recompute.gma_recompute_local_kernel,
          "gma_proxy_v_kernel": recompute.gma_proxy_v_kernel,
          "gma_statistics_kernel": statistics.gma_statistics_kernel,
          "gma_recompute_z_kernel": statistics.gma_recompute_z_kernel,
          "gma_combine_kernel": attention.gma_combine_kernel,
          "gma_attention_kernel": attention.gma_attention_kernel,
          "gma_b1_dkv_kernel": attention_backward.gma_b1_dkv_kernel,
          "gma_b2_attention_kernel": attention_backward.gma_b2_attention_kernel,
          "gma_b2_crpe_kernel": attention_backward.gma_b2_crpe_kernel,
          **{f.__name__: f for f in aggregation_backward.KERNELS}}[name]
    _require_jit(fn)
    return fn


def _tool(name: str) -> str:
    import triton
    cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(cand):
        return cand
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/cuda/bin"]:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    return ""


def _ptxas_report(ptx: str, arch: int, log: str = "") -> Dict[str, int]:
    """Registers, spill bytes and stack from ``ptxas -lineinfo -v`` (the flags Triton compiles with): from `log`,
    the verbose output of Triton's own ptxas run of this PTX (`compile_one`), else from running ptxas again."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    from ..cuda.build import parse_ptxas
    entries = parse_ptxas(log) if log else []
    if not entries:
        ptxas = get_ptxas(arch).path
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as fh:
                fh.write(ptx)
            res = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                                  "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
        entries = parse_ptxas(res.stderr + res.stdout)
    if not entries:
        return {"registers": -1, "spill_stores": -1, "spill_loads": -1, "stack": -1}
    e = entries[0]
    return {"registers": e["registers"] if e["registers"] is not None else -1, "spill_stores": e["spill_stores"],
            "spill_loads": e["spill_loads"], "stack": e["stack"]}


def _cuobjdump_report(cubin: bytes) -> Dict[str, int]:
    tool = _tool("cuobjdump")
    if not tool:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", res.stdout)
        if m:
            out[f"cuobjdump_{key.lower()}"] = int(m.group(1))
    return out


#: a ``tt.dot`` of the TTIR: its two operands, its attributes, their types
_TT_DOT = re.compile(r"^\s*%\S+ = tt\.dot (%[^\s,]+), (%[^\s,]+), %[^\s,]+(.*?) : (tensor<[^>]*>) \* (tensor<[^>]*>)",
                     re.M)
_TT_TRANS = re.compile(r"^\s*(%\S+) = tt\.trans (%[^\s,{]+)", re.M)


def tf32x3_dual_operands(ttir: str) -> List[str]:
    """The values that the 3xTF32 dots of a kernel take in both operand positions: one dot's left operand
    (A) and another's right (B), a transposed use (``tt.trans``) counting as the other position. Each
    needs both of the MMA's operand layouts: the pattern Triton 3.6 miscompiled on sm_90 at 64
    (`config.DOT_OVERRIDES`). From the kernel's TTIR (``CompiledKernel.asm["ttir"]``, one function,
    names unique in it); each value as its type as written at its use, e.g. ``tensor<64x16xf32>``, sorted."""
    trans = dict(_TT_TRANS.findall(ttir))
    positions: Dict[str, set] = {}
    types: Dict[str, str] = {}
    for a, b, attrs, ta, tb in _TT_DOT.findall(ttir):
        if "tf32x3" not in attrs:
            continue
        for value, position, ty in ((a, 0, ta), (b, 1, tb)):
            flips = 0
            while value in trans and flips < 8:            # through transposes to the value itself
                value, flips = trans[value], flips + 1
            positions.setdefault(value, set()).add(position ^ (flips & 1))
            types.setdefault(value, ty)
    return sorted(types[v] for v, pos in positions.items() if len(pos) == 2)


def known_miscompile(dual_operands: Iterable[str]) -> str:
    """Why a specialisation with these `tf32x3_dual_operands` has a pattern Triton is known to miscompile
    (one of `config.TF32X3_DUAL_OPERAND_DIMS` among a value's dimensions), or ""."""
    bad = [t for t in dual_operands
           if set(TF32X3_DUAL_OPERAND_DIMS) & {int(d) for d in re.findall(r"(\d+)x", t)}]
    if not bad:
        return ""
    return (f"3xTF32 dots take {', '.join(bad)} as both operands, the pattern Triton 3.6 miscompiled on sm_90 "
            f"(config.TF32X3_DUAL_OPERAND_DIMS): list the kernel in config.DOT_OVERRIDES")


def _describe(spec: Spec) -> Dict[str, object]:
    cx = dict(spec.constexprs)
    dt = next((t[1:] for a, t in spec.signature if a in DTYPE_ARGS), "-")
    return {"kernel": spec.kernel.replace("gma_", "").replace("_kernel", ""), "function": spec.kernel,
            "C": _width(cx), "dtype": dt, "arch": spec.arch, "label": spec.label(),
            "dot_precision": cx.get("DOT_PRECISION", "-"), "specialised": spec.specialised_ints(),
            "used_by": list(spec.used_by)}


def _source_and_options(spec: Spec):
    """(target, ASTSource, parsed options) of a specialisation, built as ``JITFunction.run`` builds
    them for that launch (`_pack_args`, then ``compile(src, target=target, options=options.__dict__)``)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    fn = _kernel_fn(spec.kernel)
    target = GPUTarget("cuda", spec.arch, 32)
    names = fn.arg_names
    attrs = {(names.index(a),): [list(x) for x in v] for a, v in spec.attrs}
    kw = dict(spec.options)
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    options = make_backend(target).parse_options(kw)
    src = triton.compiler.ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs),
                                    attrs=attrs)
    return target, src, options


def cache_key(spec: Spec) -> str:
    """The key under which ``triton.compile`` caches this specialisation (TRITON_CACHE_DIR/<hash of
    it>/): the same as the JIT's for the real launch, so a kernel compiled here is a cache hit there
    (tests/test_triton_compile.py derives the JIT's key through ``JITFunction.run`` and compares)."""
    from triton.compiler import make_backend
    from triton.compiler.compiler import get_cache_invalidating_env_vars, get_cache_key
    target, src, options = _source_and_options(spec)
    backend = make_backend(target)
    # triton.compile parses the options once more, with the source's own
    options = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    return get_cache_key(src, backend, options, get_cache_invalidating_env_vars())


def compile_one(spec: Spec, resources: bool = True, launcher: bool = False) -> Dict[str, object]:
    """Compile one specialisation for sm_<arch> exactly as the JIT would (same cache key: a later
    launch of it is a cache hit) and, with `resources`, report its resources. With `launcher`
    (a machine with a CUDA driver) also build the C launcher the JIT builds at the first launch
    (``driver.active.launcher_cls``, cached by Triton too)."""
    import time

    import triton
    from triton import knobs
    if knobs.compilation.disable_line_info:
        raise RuntimeError("TRITON_DISABLE_LINE_INFO is set: the kernels are meant to carry line information")
    target, src, options = _source_and_options(spec)
    t0 = time.time()
    # Triton runs ptxas with -v; with dump_ptxas_log it prints that log (not a cache-key setting), which the
    # resource figures then read instead of running ptxas a second time (~15 % of a compile)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):    # (scope: the knob and its variable restored)
        knobs.nvidia.dump_ptxas_log = resources
        ck = triton.compile(src, target=target, options=options.__dict__)
    secs = time.time() - t0
    rep = _describe(spec)
    rep.update({"num_warps": ck.metadata.num_warps, "shared_dynamic": ck.metadata.shared,
                "compile_s": round(secs, 2)})
    if launcher:
        from triton.runtime import driver
        t0 = time.time()
        driver.active.launcher_cls(ck.src, ck.metadata)
        rep["launcher_s"] = round(time.time() - t0, 2)
    if resources:
        ptx = ck.asm["ptx"]
        dual = tf32x3_dual_operands(ck.asm["ttir"])
        rep.update({"line_info": bool(re.search(r"^\s*\.loc\s", ptx, re.M)),
                    "tf32_conversions": ptx.count("cvt.rna.tf32.f32"),
                    "tf32x3_dual_operands": dual, "known_miscompile": known_miscompile(dual)})
        rep.update(_ptxas_report(ptx, spec.arch, log.getvalue()))
        rep.update(_cuobjdump_report(ck.asm["cubin"]))
    return rep


# ---------------------------------------------------------------- all of them, in parallel
#: environment variable holding another Python's Triton key (`triton.runtime.cache.triton_key()` there): the
#: compile workers then file their kernels under the cache key that Triton computes there (`use_triton_key`)
TRITON_KEY_ENV = "GMF_TRITON_KEY"


def _libtriton_sha256() -> str:
    """sha256 of this Triton's compiled library, the one part of `triton_key()` that differs between
    builds of one Triton release for different Pythons (cp311, cp312)."""
    import hashlib
    import sysconfig

    import triton
    ext = (sysconfig.get_config_var("EXT_SUFFIX") or ".so").split(".")[-1]
    h = hashlib.sha256()
    with open(os.path.join(os.path.dirname(triton.__file__), "_C", f"libtriton.{ext}"), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_foreign_triton_key(key: str) -> str:
    """`key` if it is the Triton key of this Triton release built for another Python, else ValueError.

    `triton_key()` is the release's version followed by the hashes of its Python sources and of its
    compiled library (`libtriton`). Kernels compiled here under another build's key are that build's
    cache entries only if the two builds compile alike: the same release and the same Python sources,
    so the key may differ from this one in the library's hash alone. (Checked on Triton 3.6.0, cp311
    against cp312: the same TTIR, TTGIR, LLVM IR, PTX and cubin, and the same cache directory, for a
    kernel compiled natively under cp312 and here under cp312's key.)"""
    from triton.runtime.cache import triton_key
    local = triton_key()
    if key == local:
        return key
    ours, theirs = local.split("-"), key.strip().split("-")
    lib = _libtriton_sha256()
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if len(ours) != len(theirs) or len(differ) != 1 or ours[differ[0]] != lib:
        raise ValueError(
            "the given Triton key is not this Triton release's for another Python: "
            + (f"{len(theirs)} parts against {len(ours)}" if len(ours) != len(theirs) else
               f"{len(differ)} parts differ (allowed: the compiled library's hash alone)"
               if len(differ) != 1 or ours[differ[0]] != lib else ""))
    return key.strip()


def use_triton_key(key: str) -> None:
    """File this process's compiles under `key` (`check_foreign_triton_key`), as if compiled by that
    Triton: `triton.compile` computes its cache key from `triton.runtime.cache.triton_key()`."""
    from triton.runtime import cache
    key = check_foreign_triton_key(key)
    cache.triton_key = lambda: key


def _worker(spec: Spec, resources: bool = True, launcher: bool = False):
    if os.environ.get(TRITON_KEY_ENV):
        use_triton_key(os.environ[TRITON_KEY_ENV])
    try:
        return compile_one(spec, resources, launcher)
    except Exception as e:  # reported, not raised: one failure must not hide the others
        rep = _describe(spec)
        rep["error"] = f"{type(e).__name__}: {e}"[:2000]
        return rep


def compile_all(specs: Sequence[Spec], jobs: int = 2, cache_dir: str = "", *, resources: bool = True,
                launcher: bool = False, in_order: bool = False, deadline_s: Optional[float] = None,
                progress=None) -> List[Dict[str, object]]:
    """Compile every specialisation with a pool of `jobs` processes.

    Workers are spawned with TRITON_INTERPRET removed from their environment (so
    ``@triton.jit`` builds real kernels) and, if given, their own TRITON_CACHE_DIR (an
    empty one makes the compile times real, not cache hits). Started biggest kernel first (so the
    pool does not end on one long compile), or in the given order with `in_order`. With
    `deadline_s`, nothing is started after that many seconds: the specialisations not started
    come back with ``"skipped": "deadline"``. `progress(done, total)` is called as they finish.
    """
    import multiprocessing as mp
    import time
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    t_end = None if deadline_s is None else time.monotonic() + deadline_s
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    work = list(specs) if in_order else sorted(specs, key=lambda s: KERNEL_ORDER[s.kernel])
    results: List[Dict[str, object]] = []
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            running: Dict[object, Spec] = {}
            queue = list(reversed(work))
            while queue or running:
                late = t_end is not None and time.monotonic() >= t_end
                while queue and len(running) < 2 * jobs and not late:
                    sp = queue.pop()
                    running[ex.submit(_worker, sp, resources, launcher)] = sp
                if late:                                    # queued in the pool but not started: not started
                    for f in [f for f in running if f.cancel()]:
                        queue.append(running.pop(f))
                if not running:
                    break
                done, _ = wait(list(running), timeout=None if t_end is None or late else
                               max(0.1, t_end - time.monotonic()), return_when=FIRST_COMPLETED)
                for f in done:
                    running.pop(f)
                    results.append(f.result())
                if progress and done:
                    progress(len(results), len(work))
            results += [dict(_describe(sp), skipped="deadline") for sp in reversed(queue)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not in_order:
        results.sort(key=lambda r: (KERNEL_ORDER[r["function"]], r["C"] or 0, r["dtype"], r["arch"], r["label"]))
    return results


def warm_jobs() -> int:
    """Compile processes of a warm-up on the machine that runs (the GPU report's, tune.py's): the
    CPUs but two (a CUDA build or the timing process runs beside it), at least two."""
    return max(2, (os.cpu_count() or 4) - 2)


def _have_cuda_driver() -> bool:
    try:
        from triton.runtime import driver
        return bool(driver.active.is_active())
    except Exception:
        return False


def main(argv=None) -> int:
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description="AOT-compile the gmf Triton kernel specialisations of real calls "
                                             "(no GPU needed)")
    ap.add_argument("--json", required=True, help="write the per-specialisation results here")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--arch", type=int, nargs="+", default=list(AOT_ARCHS))
    ap.add_argument("--cache-dir", default="", help="TRITON_CACHE_DIR for the workers (default: Triton's)")
    ap.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPE_NAMES), choices=DTYPE_NAMES)
    ap.add_argument("--models", nargs="+", default=None, help="only these models' calls (default: all five)")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="instead of the released models' calls: these widths (multiples of 10) at a 13x17 grid")
    ap.add_argument("--warm", action="store_true",
                    help="fill the Triton cache for the GPU report (benchmarks/gpu_report.py): the specialisations "
                         "its runs make the JIT compile (report_specializations), most needed first, no resource "
                         "figures, and the launchers too where a CUDA driver is present; --batch/--dtype/--models/"
                         "--widths do not apply")
    ap.add_argument("--deadline", type=float, default=None,
                    help="start no compile after this many seconds (the rest is listed as skipped)")
    ap.add_argument("--list", action="store_true", help="list the specialisations, compile nothing")
    ap.add_argument("--triton-key", default=None, metavar="FILE",
                    help="compile for another Python's build of this Triton release: FILE holds its "
                         "triton.runtime.cache.triton_key(), under which the kernels are cached (a cache "
                         "for another machine: benchmarks/seed_caches.py); no launchers")
    a = ap.parse_args(argv)
    if a.triton_key:
        with open(a.triton_key) as fh:
            os.environ[TRITON_KEY_ENV] = check_foreign_triton_key(fh.read())
    t0 = time.monotonic()
    if a.warm:
        specs = [sp for arch in a.arch for sp in report_specializations(arch)]
    else:
        calls = other_calls(a.widths, a.batch, a.dtype) if a.widths else real_calls(a.batch, a.dtype, a.models)
        specs = all_specializations(calls, a.arch)
    if a.list:
        res = [_describe(s) for s in specs]
    else:
        launcher = a.warm and _have_cuda_driver() and not a.triton_key
        step = max(1, len(specs) // 10)

        def progress(done, total):
            if done % step == 0 or done == total:
                print(f"compiled {done}/{total} ({time.monotonic() - t0:.0f} s)", flush=True)

        if a.warm:
            print(f"{len(specs)} specialisations for sm_{'/'.join(map(str, a.arch))}, {a.jobs} jobs, "
                  f"launchers {'too' if launcher else 'not (no CUDA driver)'}", flush=True)
        res = compile_all(specs, a.jobs, a.cache_dir, resources=not a.warm, launcher=launcher, in_order=a.warm,
                          deadline_s=a.deadline, progress=progress if a.warm else None)
    with open(a.json, "w") as fh:
        json.dump(res, fh, indent=1)
    bad = [r for r in res if "error" in r]
    skipped = [r for r in res if "skipped" in r]
    for r in bad[:5]:
        print(f"error: {r['label']}: {r['error'][:500]}")
    print(f"{len(res) - len(bad) - len(skipped)}/{len(res)} specialisations " + ("listed" if a.list else "compiled")
          + (f", {len(skipped)} not started (deadline)" if skipped else "")
          + (f", {len(bad)} failed" if bad else "") + f" in {time.monotonic() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
