"""Compile the kernels' device code with NVRTC and ptxas from PyPI wheels (no CUDA toolkit).

    python -m gmf_kernels.cuda nvrtc --arch 70      # every kernel -> PTX compute_70 -> SASS sm_70

What it proves: the sources in csrc/ (the kernel templates, every I/O dtype and head width)
compile for an architecture the local nvcc may not target. CUDA 13's nvcc dropped sm_70
(V100), so the sm70 check (tests/test_cuda_sm70.py, DEVELOPERS.md) uses the CUDA 12.9
compilers that NVIDIA publishes on PyPI:

* ``nvidia-cuda-nvrtc-cu12==12.9.86``   libnvrtc: C++ -> PTX, called here through ctypes;
* ``nvidia-cuda-nvcc-cu12==12.9.86``    ptxas: PTX -> SASS, with ``-v`` (registers, spills);
* ``nvidia-cuda-runtime-cu12==12.9.79`` the headers NVRTC needs (cuda_fp16.h, cuda_bf16.h,
  mma.h; the last includes crt/mma.h, which ships in the nvcc wheel's include directory).

Standard library only. The program is ``#include "gma_kernels.cuh"`` (device code only) and
each kernel instantiation is asked for by name (nvrtcAddNameExpression), so exactly the
kernels the module launches are compiled; every one must then appear as a PTX entry and be
assembled by ptxas. The module launches, per I/O dtype, ``gma_aggregate_kernel<T, 0>``,
``gma_attention_kernel<T, 0>`` and ``gma_pack_kernel<T>`` (any head width), and
``gma_combine_kernel<D>`` for every specialised head width and the generic one.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import build as _build

#: the wheels (and versions) this check is written and tested against
WHEELS = {
    "nvidia-cuda-nvrtc-cu12": "12.9.86",
    "nvidia-cuda-nvcc-cu12": "12.9.86",
    "nvidia-cuda-runtime-cu12": "12.9.79",
}
PIP_INSTALL = "pip install " + " ".join(f"{k}=={v}" for k, v in WHEELS.items())

#: I/O dtypes of the kernels: C++ type -> the module's name
DTYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}
NVRTC_FLAGS = ["-std=c++17", "-lineinfo"]


class ToolsMissing(RuntimeError):
    """The NVRTC / ptxas / header wheels are not installed."""


class CompileError(RuntimeError):
    """NVRTC or ptxas rejected the device code."""


def _package_dir(name: str) -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tools() -> Dict[str, str]:
    """{"nvrtc": libnvrtc path, "ptxas": ptxas path, "include": CUDA 12 header dir,
    "nvcc_include": the nvcc wheel's header dir (crt/)}, or ToolsMissing naming the pip command."""
    found: Dict[str, str] = {}
    missing = []
    d = _package_dir("nvidia.cuda_nvrtc")
    libs = sorted((d / "lib").glob("libnvrtc.so*")) if d else []
    libs = [p for p in libs if "builtins" not in p.name and ".alt." not in p.name]
    if libs:
        found["nvrtc"] = str(libs[0])
    else:
        missing.append("nvidia-cuda-nvrtc-cu12 (libnvrtc)")
    d = _package_dir("nvidia.cuda_nvcc")
    if d and (d / "bin" / "ptxas").is_file() and (d / "include" / "crt" / "mma.h").is_file():
        found["ptxas"] = str(d / "bin" / "ptxas")
        found["nvcc_include"] = str(d / "include")
    else:
        missing.append("nvidia-cuda-nvcc-cu12 (ptxas, crt/mma.h)")
    d = _package_dir("nvidia.cuda_runtime")
    if d and (d / "include" / "cuda_fp16.h").is_file():
        found["include"] = str(d / "include")
    else:
        missing.append("nvidia-cuda-runtime-cu12 (cuda_fp16.h)")
    if missing:
        raise ToolsMissing("CUDA 12.9 compiler wheels not installed: " + ", ".join(missing)
                           + f". Install them with `{PIP_INSTALL}` (DEVELOPERS.md)")
    if not os.access(found["ptxas"], os.X_OK):  # a wheel unpacked without the executable bit
        os.chmod(found["ptxas"], 0o755)
    return found


def head_dims(csrc: Optional[Path] = None) -> List[int]:
    """The combine kernel's compile-time head widths (GMF_FOR_EACH_HEAD_DIM in csrc/gma_layout.h)
    and 0 (generic)."""
    csrc = Path(csrc) if csrc is not None else _build.csrc_dir()
    text = (csrc / "gma_layout.h").read_text()
    m = re.search(r"#define GMF_FOR_EACH_HEAD_DIM\(X\)(.*)", text)
    if not m:
        raise CompileError("GMF_FOR_EACH_HEAD_DIM not found in gma_layout.h")
    return [int(v) for v in re.findall(r"X\((\d+)\)", m.group(1))] + [0]


def kernel_names(dtype: str, dims: Sequence[int], with_combine: bool) -> List[str]:
    """Name expressions of the kernel instantiations the module launches for one C++ dtype:
    the tile kernels and the packing kernel once (any head width), and with_combine the combine
    kernel for every head width in `dims` (the specialised ones and 0, generic)."""
    names = [f"gmf::gma_aggregate_kernel<{dtype}, 0>", f"gmf::gma_attention_kernel<{dtype}, 0>",
             f"gmf::gma_pack_kernel<{dtype}>"]
    if with_combine:
        names += [f"gmf::gma_combine_kernel<{D}>" for D in dims]
    return names


class _Nvrtc:
    def __init__(self, lib: str):
        self.lib = ctypes.CDLL(lib)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise CompileError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return f"{major.value}.{minor.value}"

    def compile(self, source: str, name: str, options: Sequence[str], exprs: Sequence[str]):
        """(ptx, {expression: lowered name}, log)"""
        L = self.lib
        prog = ctypes.c_void_p()
        self.check(L.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                   "nvrtcCreateProgram")
        try:
            for e in exprs:
                self.check(L.nvrtcAddNameExpression(prog, e.encode()), f"nvrtcAddNameExpression({e})")
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = L.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            L.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            L.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            if rc != 0:
                raise CompileError(f"NVRTC could not compile {name} ({' '.join(options)}):\n{log}")
            lowered = {}
            for e in exprs:
                p = ctypes.c_char_p()
                self.check(L.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(p)), f"nvrtcGetLoweredName({e})")
                lowered[e] = p.value.decode()
            L.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.check(L.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
            return buf.value.decode(), lowered, log
        finally:
            L.nvrtcDestroyProgram(ctypes.byref(prog))


def ptxas(tool: str, ptx: str, arch: str, workdir: Path, name: str) -> str:
    """Assemble PTX for sm_<arch> with `ptxas -v`; its output (the resource lines)."""
    src = workdir / f"{name}.ptx"
    src.write_text(ptx)
    out = subprocess.run([tool, f"-arch=sm_{arch}", "-v", "-lineinfo", str(src), "-o", str(workdir / f"{name}.cubin")],
                         capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise CompileError(f"ptxas -arch=sm_{arch} failed on {name}:\n{log[-4000:]}")
    return log


def check_arch(arch: str = "70", csrc: Optional[Path] = None, jobs: int = 2) -> dict:
    """Compile every kernel instantiation for compute_<arch> (NVRTC) and sm_<arch> (ptxas).

    Returns {"arch", "nvrtc_version", "kernels": [expressions], "entries": {expression: lowered},
    "resources": parse_ptxas rows, "nvrtc_log": warnings, "seconds"}; raises ToolsMissing or
    CompileError.
    """
    tools = find_tools()
    csrc = Path(csrc) if csrc is not None else _build.csrc_dir()
    nv = _Nvrtc(tools["nvrtc"])
    dims = head_dims(csrc)
    options = [f"--gpu-architecture=compute_{arch}", f"-I{csrc}", f"-I{tools['include']}",
               f"-I{tools['nvcc_include']}"] + NVRTC_FLAGS
    source = '#include "gma_kernels.cuh"\n'
    units = [(DTYPES[t], kernel_names(t, dims, with_combine=(i == 0))) for i, t in enumerate(DTYPES)]
    results: Dict[str, Tuple[str, Dict[str, str], str]] = {}
    errors: List[BaseException] = []
    t0 = time.time()

    def work(unit):
        name, exprs = unit
        try:
            results[name] = nv.compile(source, f"gmf_{name}.cu", options, exprs)
        except BaseException as e:  # reported below
            errors.append(e)

    pending = list(units)
    while pending:  # NVRTC releases the GIL inside ctypes calls: programs compile in parallel
        batch, pending = pending[:max(1, jobs)], pending[max(1, jobs):]
        threads = [threading.Thread(target=work, args=(u,)) for u in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    entries: Dict[str, str] = {}
    logs = []
    resources: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="gmf_nvrtc_") as tmp:
        procs = []
        for name, (ptx, lowered, log) in results.items():
            for expr, low in lowered.items():
                if not re.search(rf"\.entry\s+{re.escape(low)}\s*\(", ptx):
                    raise CompileError(f"{expr} ({low}) is not an entry of the PTX for compute_{arch}")
            entries.update(lowered)
            if log.strip():
                logs.append(f"{name}: {log.strip()}")
            procs.append((name, ptx))
        texts: Dict[str, str] = {}
        errs: List[BaseException] = []

        def asm(item):
            try:
                texts[item[0]] = ptxas(tools["ptxas"], item[1], arch, Path(tmp), item[0])
            except BaseException as e:
                errs.append(e)

        pending = list(procs)
        while pending:
            batch, pending = pending[:max(1, jobs)], pending[max(1, jobs):]
            threads = [threading.Thread(target=asm, args=(u,)) for u in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errs:
            raise errs[0]
        for name in sorted(texts):
            resources += _build.parse_ptxas(texts[name])
    return {"arch": arch, "nvrtc_version": nv.version(), "kernels": [e for _, ex in units for e in ex],
            "entries": entries, "resources": resources, "nvrtc_log": "\n".join(logs),
            "seconds": round(time.time() - t0, 1)}
