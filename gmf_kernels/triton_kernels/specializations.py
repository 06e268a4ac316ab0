"""Kernel specialisations for ahead-of-time GPU compiles (no GPU needed).

`all_specializations(widths)` lists, per (kernel, width C, input dtype), the Triton
signature and constexprs that the launchers pass at run time (tiles from
`config.gma_shape(C)`, the GPU ones) for the widths it is given (the CLI's default: the
widths of the released models). Identical (kernel, signature, constexprs) sets are listed
once: the combine kernel, for example, does not depend on the input dtype.

`compile_one(spec, arch)` compiles one of them with
``triton.compile(triton.compiler.ASTSource(...), target=GPUTarget("cuda", arch, 32))``,
which needs no GPU and no driver, and returns its resource usage: registers and
spills from ``ptxas -v`` run again on the generated PTX (Triton discards its log) and read
by the one ptxas parser of the package (`gmf_kernels.cuda.build.parse_ptxas`),
local/stack/shared bytes from ``cuobjdump --dump-resource-usage`` on the cubin, and
Triton's dynamic shared memory from the kernel metadata.

Import with TRITON_INTERPRET unset (or 0): under the interpreter ``@triton.jit``
produces interpreter objects that cannot be compiled.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .config import gma_shape

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}

_AGG_PTRS_X = ("qkv", "q", "v", "pre")
_AGG_PTRS_F32 = ("part_m", "part_l", "part_acc", "bn_scale", "bn_shift", "dw3", "dw5", "dw7", "pw",
                 "local_dw", "local_pw", "ln_weight", "ln_bias")
_AGG_INTS = ("N", "H", "W", "stride_qkv_b", "stride_qkv_n", "tiles_per_split")


@dataclass(frozen=True)
class Spec:
    kernel: str                         # "aggregate", "combine", "attention"
    C: int
    dtype: str                          # input dtype name ("-" where it does not matter)
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    used_by: Tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self):
        return (self.kernel, self.signature, self.constexprs, self.num_warps)

    def label(self) -> str:
        cx = dict(self.constexprs)
        tile = cx.get("BLOCK_P", "-")
        return (f"{self.kernel} C={self.C} {self.dtype} (S_PAD={cx.get('S_PAD', '-')}, D_PAD={cx['D_PAD']}, "
                f"CK={cx.get('CK', '-')}, BLOCK_P={tile}, warps={self.num_warps})")


def _sig(pairs) -> Tuple[Tuple[str, str], ...]:
    return tuple(pairs)


def _aggregate_spec(C: int, dt: str) -> Spec:
    sh = gma_shape(C)
    sig = [(a, f"*{dt}") for a in _AGG_PTRS_X] + [(a, "*fp32") for a in _AGG_PTRS_F32]
    sig += [(a, "i32") for a in _AGG_INTS] + [("ln_eps", "fp32")]
    cx = dict(C=sh.C, S=sh.S, CP=sh.CP, D=sh.D, S_PAD=sh.S_PAD, D_PAD=sh.D_PAD, CK=sh.CK,
              BLOCK_P=sh.AGG_BLOCK_P, DOT_3XTF32=int(dt == "fp32"))
    sig += [(k, "constexpr") for k in cx]
    return Spec("aggregate", C, dt, _sig(sig), tuple(cx.items()), sh.AGG_WARPS)


def _combine_spec(C: int) -> Spec:
    sh = gma_shape(C)
    sig = [("part_m", "*fp32"), ("part_l", "*fp32"), ("part_acc", "*fp32"), ("kv", "*fp32"), ("T", "i32")]
    cx = dict(CP=sh.CP, D=sh.D, D_PAD=sh.D_PAD)
    sig += [(k, "constexpr") for k in cx]
    return Spec("combine", C, "-", _sig(sig), tuple(cx.items()), sh.COMBINE_WARPS)


def _attention_spec(C: int, dt: str) -> Spec:
    sh = gma_shape(C)
    sig = [("q", f"*{dt}"), ("v", f"*{dt}"), ("kv", "*fp32"), ("pre", f"*{dt}"),
           ("crpe_w3", "*fp32"), ("crpe_w5", "*fp32"), ("crpe_w7", "*fp32"), ("crpe_b", "*fp32"),
           ("N", "i32"), ("H", "i32"), ("W", "i32"), ("scale", "fp32")]
    cx = dict(C=sh.C, CP=sh.CP, D=sh.D, D_PAD=sh.D_PAD, BLOCK_P=sh.ATTN_BLOCK_P, DOT_3XTF32=int(dt == "fp32"))
    sig += [(k, "constexpr") for k in cx]
    return Spec("attention", C, dt, _sig(sig), tuple(cx.items()), sh.ATTN_WARPS)


def all_specializations(widths: Iterable[int], users: Optional[Dict[int, Sequence[str]]] = None) -> List[Spec]:
    """Deduplicated specialisations of the three kernels for these widths and every dtype.

    users: optional width -> names of the models using it (a label in the tables)."""
    users = users or {}
    specs: Dict[tuple, Spec] = {}
    for C in sorted(set(widths)):
        used = tuple(sorted(set(users.get(C, ()))))
        cands = [_combine_spec(C)] + [f(C, dt) for dt in DTYPES for f in (_aggregate_spec, _attention_spec)]
        for s in cands:
            if s.key not in specs:
                specs[s.key] = Spec(s.kernel, s.C, s.dtype, s.signature, s.constexprs, s.num_warps, used)
    return list(specs.values())


def released_model_widths() -> Tuple[Tuple[int, ...], Dict[int, List[str]]]:
    """(widths, width -> short model names) of the released models: the CLI's default input."""
    from ..models.configs import MODEL_WIDTHS, widths_by_model
    users: Dict[int, List[str]] = {}
    for name, dims in widths_by_model().items():
        for C in dims:
            users.setdefault(C, []).append(name.replace("groupmixformer_", ""))
    return MODEL_WIDTHS, users


# ---------------------------------------------------------------- compiling (needs triton, no GPU)
def _kernel_fn(name: str):
    if name == "aggregate":
        from .aggregation import gma_aggregate_kernel as k
    elif name == "combine":
        from .attention import gma_combine_kernel as k
    else:
        from .attention import gma_attention_kernel as k
    return k


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


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    """Registers, spill bytes and stack from `ptxas -v` on the kernel's PTX (one shared parser)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    from ..cuda.build import parse_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
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


def compile_one(spec: Spec, arch: int) -> Dict[str, object]:
    """Compile one specialisation for sm_<arch> and report its resources (no GPU needed)."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    fn = _kernel_fn(spec.kernel)
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("kernels were created under TRITON_INTERPRET=1; compile in a process without it")
    sig = dict(spec.signature)
    cx = dict(spec.constexprs)
    # torch allocations are 16-byte aligned: the JIT marks such pointers divisible by 16
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in spec.signature if t.startswith("*")}
    t0 = time.time()
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    secs = time.time() - t0
    rep = {"kernel": spec.kernel, "C": spec.C, "dtype": spec.dtype, "arch": arch, "label": spec.label(),
           "used_by": ",".join(spec.used_by), "num_warps": ck.metadata.num_warps,
           "shared_dynamic": ck.metadata.shared, "compile_s": round(secs, 2)}
    rep.update(_ptxas_report(ck.asm["ptx"], arch))
    rep.update(_cuobjdump_report(ck.asm["cubin"]))
    return rep


# ---------------------------------------------------------------- all of them, in parallel
def _worker(args):
    spec, arch = args
    try:
        return compile_one(spec, arch)
    except Exception as e:  # reported, not raised: one failure must not hide the others
        return {"kernel": spec.kernel, "C": spec.C, "dtype": spec.dtype, "arch": arch, "label": spec.label(),
                "used_by": ",".join(spec.used_by), "error": f"{type(e).__name__}: {e}"[:2000]}


def compile_all(specs: Sequence[Spec], archs=(80, 90), jobs: int = 2, cache_dir: str = "") -> List[Dict[str, object]]:
    """Compile every specialisation for every arch with a pool of `jobs` processes.

    Workers are spawned with TRITON_INTERPRET removed from their environment (so
    ``@triton.jit`` builds real kernels) and, if given, their own TRITON_CACHE_DIR (an
    empty one makes the compile times real, not cache hits).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        work = [(s, a) for a in archs for s in specs]
        # biggest first, so the pool does not end on one long compile
        work.sort(key=lambda w: {"aggregate": 0, "attention": 1, "combine": 2}[w[0].kernel])
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_worker, work))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    order = {"aggregate": 0, "attention": 1, "combine": 2}
    results.sort(key=lambda r: (order[r["kernel"]], r["C"], r["dtype"], r["arch"]))
    return results


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="AOT-compile every gmf Triton kernel specialisation (no GPU needed)")
    ap.add_argument("--json", required=True, help="write the per-specialisation results here")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--cache-dir", default="", help="TRITON_CACHE_DIR for the workers (default: Triton's)")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="module widths C to compile (default: every width of the released models)")
    a = ap.parse_args(argv)
    widths, users = released_model_widths()
    if a.widths:
        widths = tuple(a.widths)
    res = compile_all(all_specializations(widths, users), tuple(a.arch), a.jobs, a.cache_dir)
    with open(a.json, "w") as fh:
        json.dump(res, fh, indent=1)
    bad = [r for r in res if "error" in r]
    print(f"{len(res) - len(bad)}/{len(res)} specialisations compiled")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
