"""Build the CUDA module `_gmf_cuda` from csrc/ with ninja + nvcc (no torch needed).

This file is imported by path from setup.py, so it uses the standard library only
(pybind11 is asked for its include directory; ninja and nvcc are run as programs).

* `build(out_dir=None, archs=None, verbose=False) -> path`: compiles into `out_dir`, or
  into a per-user cache `~/.cache/gmf_kernels/cuda/<build key>/` guarded by a file lock
  (`filelock` when importable, else `fcntl`); a cached build with the same key is reused.
* `build(out_dir, emulation_only=True)`: the same module compiled by the host C++ compiler
  alone, without the GPU kernels (`pre_projection` raises; `emulate_pre_projection` runs
  the kernel bodies on the CPU, csrc/gma_emu.h). Needs the CUDA headers only (a toolkit, or
  the nvidia-cuda-runtime-cu12 wheel), no nvcc; builds in about a minute. `emu_skip_sync=
  "gma_aggregate.cuh:50"` compiles that one barrier out of the emulation (the barrier tests
  of tests/test_cuda_emulation.py); `build_dir` shares compiled objects between such builds.
* `build_ahead_of_time(out_dir) -> path`: what setup.py calls (`GMF_CUDA_ARCHS` honoured).
* `sources_hash()`: sha256 prefix of the csrc/ files; compiled into the module so a
  loader can tell a stale build from a fresh one.

Targets: `GMF_CUDA_ARCHS` (e.g. "75;80;86;89;90", "8.0 9.0", "sm_90a", or "native" for the
GPUs visible here), default "75;80;86;89;90": SASS for each and PTX of the highest (compute_90),
so newer GPUs (sm_100, sm_120) JIT it. sm_70 (V100) is accepted, but CUDA 13 no longer targets
it: build it with a CUDA 12.x toolkit (BuildError says so). Nothing in csrc/ needs more than
sm_70 (csrc/README.md). cudart is linked statically (nvcc's default), so importing the module
needs no driver; `cuda_runtime_version()` / `cuda_driver_version()` of the module say which
runtime it carries and which driver is installed. Kernels keep `-lineinfo` (sanitizer and
profiler reports name source lines). ptxas `-v` output of every kernel is kept in
`ptxas_resources.log` next to the module and parsed into `resources.json` (registers,
spills, stack, shared memory per kernel and architecture).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

MODULE_NAME = "_gmf_cuda"
DEFAULT_ARCHS = "75;80;86;89;90"
#: oldest architecture the sources support, and the newest toolkit major that still targets it
MIN_ARCH = 70
SM70_TOOLKIT = "CUDA 12.x toolkit (12.9 is the last release that targets sm_70/sm_72)"
BUILD_COMMAND = "python -m gmf_kernels.cuda build"
#: bump when the way the module is built changes (part of the build key)
BUILD_SCRIPT_VERSION = "2"
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".hpp")
METADATA_FILE = "build.json"
RESOURCES_JSON = "resources.json"
PTXAS_LOG = "ptxas_resources.log"

NVCC_FLAGS = [
    "-std=c++17", "-O3",
    "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
    "-Xptxas", "-v", "-lineinfo",
]
CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden"]
#: an emulation build under AddressSanitizer (`build(..., sanitize=True)`): every access of the
#: kernel bodies to a buffer is checked (global memory: the tensors' allocations; shared memory:
#: the emulated block's, csrc/gma_emu.cpp). Load it with the ASan runtime first (`asan_runtime`).
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
ASAN_LINK_FLAGS = ["-fsanitize=address"]
#: the one unit that reads the emulation's barrier switch GMF_EMU_SKIP_SYNC (csrc/gma_emu_skip.cpp)
EMU_SKIP_SOURCE = "gma_emu_skip.cpp"


class BuildError(RuntimeError):
    """The CUDA module could not be built (missing tool, compiler error)."""


# ------------------------------------------------------------------ locations
def package_dir() -> Path:
    return Path(__file__).resolve().parent


#: a barrier statement of the kernel bodies (what `emu_skip_sync` compiles out of the emulation)
_BARRIER = re.compile(r"\bex\.sync\(\s*\)\s*;")


def barrier_sites(csrc: Optional[Path] = None) -> List[str]:
    """Every barrier statement of the kernel bodies, by file name and line: ["gma_aggregate.cuh:44", ...]."""
    csrc = Path(csrc) if csrc is not None else csrc_dir()
    sites = []
    for f in sorted(csrc.glob("*.cuh")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if _BARRIER.search(line.split("//")[0]):
                sites.append(f"{f.name}:{i}")
    return sites


def csrc_dir() -> Path:
    """The kernel sources: GMF_CSRC_DIR, else <repository>/csrc next to the package (a source
    checkout or an editable install), else the copy a wheel ships in gmf_kernels/cuda/_csrc."""
    env = os.environ.get("GMF_CSRC_DIR")
    if env:
        return Path(env).resolve()
    repo = package_dir().parent.parent / "csrc"
    return repo if repo.is_dir() else package_dir() / "_csrc"


def prebuilt_dir() -> Path:
    return package_dir() / "_prebuilt"


def cache_root() -> Path:
    env = os.environ.get("GMF_CUDA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gmf_kernels" / "cuda"


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def module_filename() -> str:
    return MODULE_NAME + ext_suffix()


# ------------------------------------------------------------------ hashing
def source_files(csrc: Optional[Path] = None) -> List[Path]:
    csrc = Path(csrc) if csrc is not None else csrc_dir()
    if not csrc.is_dir():
        return []
    return sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def sources_hash(csrc: Optional[Path] = None) -> Optional[str]:
    """sha256 prefix over the csrc/ files (relative path + content); None without sources."""
    csrc = Path(csrc) if csrc is not None else csrc_dir()
    files = source_files(csrc)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(csrc).as_posix().encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:24]


# ------------------------------------------------------------------ tools
def find_nvcc() -> str:
    cands = []
    for var in ("CUDACXX",):
        if os.environ.get(var):
            cands.append(os.environ[var])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    w = shutil.which("nvcc")
    if w:
        cands.append(w)
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise BuildError("nvcc not found: install the CUDA toolkit, put nvcc on PATH or set CUDA_HOME")


def cuda_include_dir(nvcc: Optional[str] = None) -> str:
    """Directory with cuda_runtime.h / cuda_fp16.h for the host compiler: the toolkit's (next to
    nvcc), else the nvidia-cuda-runtime-cu12 wheel's."""
    cands = []
    if nvcc is None:
        try:
            nvcc = find_nvcc()
        except BuildError:
            nvcc = None
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        cands += [root / "include"] + sorted(root.glob("targets/*/include"))
        try:  # nvcc may be a wrapper script elsewhere: ask it where its headers are
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=120)
            for m in re.finditer(r'INCLUDES="?-I([^"\s]+)', out.stdout + out.stderr):
                cands.append(Path(m.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    try:
        import importlib.util
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
        if spec is not None and spec.submodule_search_locations:
            cands += [Path(p) / "include" for p in spec.submodule_search_locations]
    except (ImportError, ValueError):
        pass
    cands.append(Path("/usr/local/cuda/include"))
    for c in cands:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_runtime.h").is_file():
            return str(c)
    raise BuildError("CUDA headers (cuda_runtime.h, cuda_fp16.h) not found: install the CUDA toolkit, set "
                     "CUDA_HOME, or `pip install nvidia-cuda-runtime-cu12` (emulation-only builds)")


def find_ninja() -> str:
    w = shutil.which("ninja")
    if w:
        return w
    try:
        import ninja  # the pip package ships the binary
        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    raise BuildError("ninja not found: `pip install ninja`")


def find_cxx() -> str:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    raise BuildError("no C++ compiler found (set CXX)")


def pybind11_include() -> str:
    try:
        import pybind11
        return pybind11.get_include()
    except ImportError:
        pass
    try:
        out = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], capture_output=True,
                             text=True, check=True).stdout
        for tok in shlex.split(out):
            if tok.startswith("-I") and os.path.isfile(os.path.join(tok[2:], "pybind11", "pybind11.h")):
                return tok[2:]
    except (OSError, subprocess.CalledProcessError):
        pass
    raise BuildError("pybind11 not found: `pip install pybind11`")


def python_include() -> str:
    return sysconfig.get_paths()["include"]


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"could not run {nvcc} --version: {e}") from e
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


# ------------------------------------------------------------------ architectures
def _arch_num(a: str) -> int:
    return int(re.match(r"\d+", a).group())


def native_archs() -> List[str]:
    """Compute capabilities of the GPUs visible here ("90", ...): nvidia-smi, else the driver
    API (libcuda). BuildError when there is no GPU."""
    found: List[str] = []
    notes = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=60)
            for line in out.stdout.splitlines():
                m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
                if m:
                    found.append(m.group(1) + m.group(2))
            if not found:
                notes.append(f"nvidia-smi listed no GPU ({(out.stderr or out.stdout).strip()[:200]})")
        except (OSError, subprocess.SubprocessError) as e:
            notes.append(f"nvidia-smi failed: {e}")
    else:
        notes.append("nvidia-smi not found")
    if not found:
        try:
            import ctypes
            cu = ctypes.CDLL("libcuda.so.1")
            n = ctypes.c_int(0)
            if cu.cuInit(0) == 0 and cu.cuDeviceGetCount(ctypes.byref(n)) == 0:
                for i in range(n.value):
                    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
                    cu.cuDeviceGet(ctypes.byref(dev), i)
                    cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # COMPUTE_CAPABILITY_MAJOR
                    cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # COMPUTE_CAPABILITY_MINOR
                    found.append(f"{major.value}{minor.value}")
            else:
                notes.append("the CUDA driver reports no device")
        except OSError:
            notes.append("no CUDA driver (libcuda.so.1)")
    if not found:
        raise BuildError("GMF_CUDA_ARCHS=native: no CUDA GPU is visible here (" + "; ".join(notes) + "); "
                         f"name the architectures instead, e.g. GMF_CUDA_ARCHS=\"{DEFAULT_ARCHS}\"")
    return sorted(set(found), key=lambda a: (_arch_num(a), a))


def parse_archs(spec: Optional[str] = None) -> List[str]:
    """ "80;90" / "8.0 9.0" / "sm_80,sm_90a" -> ["80", "90"] (sorted, unique); "native" -> the
    visible GPUs' (native_archs). Architectures below sm_70 are refused."""
    if spec is None:
        spec = os.environ.get("GMF_CUDA_ARCHS") or DEFAULT_ARCHS
    out = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        if tok.lower() == "native":
            out += [a for a in native_archs() if a not in out]
            continue
        t = tok.lower().replace("sm_", "").replace("compute_", "").replace("+ptx", "")
        if re.fullmatch(r"\d+\.\d[af]?", t):
            t = t.replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", t):
            raise BuildError(f"bad CUDA architecture {tok!r} in {spec!r} (expected e.g. '{DEFAULT_ARCHS}' or 'native')")
        if _arch_num(t) < MIN_ARCH:
            raise BuildError(f"architecture {tok!r}: the kernels need sm_{MIN_ARCH} or newer")
        if t not in out:
            out.append(t)
    if not out:
        raise BuildError(f"no CUDA architecture in {spec!r}")
    return sorted(out, key=lambda a: (_arch_num(a), a))


def nvcc_gpu_codes(nvcc: str) -> Optional[List[str]]:
    """What `nvcc --list-gpu-code` lists (["sm_75", ...]), None when this nvcc cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    codes = re.findall(r"\bsm_\w+", out.stdout)
    return codes if out.returncode == 0 and codes else None


def check_toolkit_archs(archs: Sequence[str], nvcc_ver: str, gpu_codes: Optional[Sequence[str]]) -> None:
    """BuildError naming a toolkit that can build `archs` when this nvcc cannot."""
    try:
        major = int(nvcc_ver.split(".")[0])
    except ValueError:
        major = 0
    for a in archs:
        n = _arch_num(a)
        if major >= 13 and n < 75:
            raise BuildError(
                f"sm_{a}: nvcc {nvcc_ver} (CUDA {major}) cannot target it (CUDA 13 dropped sm_70/sm_72). "
                f"Build for sm_{a} with a {SM70_TOOLKIT}, e.g. CUDA_HOME=/usr/local/cuda-12.9 "
                f"GMF_CUDA_ARCHS=\"{a};{DEFAULT_ARCHS}\" {BUILD_COMMAND}; or leave sm_{a} out")
        if gpu_codes is not None and f"sm_{a}" not in gpu_codes and f"sm_{re.match(r'[0-9]+', a).group()}" \
                not in gpu_codes:
            raise BuildError(f"sm_{a}: nvcc {nvcc_ver} cannot target it (its --list-gpu-code: "
                             f"{' '.join(gpu_codes)}); use a CUDA toolkit that does, or leave sm_{a} out")


def gencode_flags(archs: Sequence[str]) -> List[str]:
    """SASS for every arch, and PTX of the highest (newer GPUs JIT-compile it)."""
    flags = []
    for i, a in enumerate(archs):
        code = f"sm_{a}" if i < len(archs) - 1 else f"[sm_{a},compute_{a}]"
        flags += ["-gencode", f"arch=compute_{a},code={code}"]
    return flags


def ptx_archs(archs: Sequence[str]) -> List[str]:
    return [archs[-1]] if archs else []


def cuda_version_int(nvcc_ver: str) -> int:
    """ "13.0.88" -> 13000, as cudaRuntimeGetVersion writes it (1000 * major + 10 * minor)."""
    m = re.match(r"(\d+)\.(\d+)", nvcc_ver)
    return 1000 * int(m.group(1)) + 10 * int(m.group(2)) if m else 0


# ------------------------------------------------------------------ ptxas resources
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: Iterable[str]) -> Dict[str, str]:
    names = list(dict.fromkeys(names))
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not any(n.startswith("_Z") for n in names):   # Triton's kernels carry plain C names
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        if len(out) == len(names):
            return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {n: n for n in names}


def parse_ptxas(text: str) -> List[dict]:
    """Per (kernel, arch): registers, spill stores/loads, stack frame, static shared memory."""
    entries: List[dict] = []
    cur = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                   "spill_loads": 0, "stack": 0, "static_smem": 0}
            entries.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            sm = _SMEM.search(m.group(2))
            cur["static_smem"] = int(sm.group(1)) if sm else 0
    names = demangle(e["mangled"] for e in entries)
    for e in entries:
        e["kernel"] = names.get(e["mangled"], e["mangled"])
    return entries


# ------------------------------------------------------------------ locking
@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = 3600.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import filelock
    except ImportError:
        filelock = None
    if filelock is not None:
        with filelock.FileLock(str(path), timeout=timeout):
            yield
        return
    import fcntl
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------ the build
def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _config(archs: Sequence[str], emulation_only: bool = False, emu_skip_sync: Optional[str] = None,
            sanitize: bool = False) -> dict:
    if emulation_only:
        nvcc = None
        try:
            nvcc = find_nvcc()
        except BuildError:
            pass
        cfg = {"mode": "emulation", "nvcc": None, "nvcc_version": "", "archs": [], "ptx_archs": [],
               "nvcc_flags": [], "cuda_include": cuda_include_dir(nvcc),
               "cxx_defines": ["-DGMF_EMULATION_ONLY"]}
    else:
        nvcc = find_nvcc()
        ver = nvcc_version(nvcc)
        check_toolkit_archs(archs, ver, nvcc_gpu_codes(nvcc))
        cfg = {"mode": "cuda", "nvcc": nvcc, "nvcc_version": ver, "archs": list(archs),
               "ptx_archs": ptx_archs(archs), "nvcc_flags": NVCC_FLAGS + gencode_flags(archs),
               "cuda_include": cuda_include_dir(nvcc), "cxx_defines": []}
    if emu_skip_sync is not None:
        if not re.fullmatch(r"[\w.\-]+:\d+", emu_skip_sync):
            raise BuildError(f"emu_skip_sync {emu_skip_sync!r}: expected 'file name:line', e.g. 'gma_aggregate.cuh:50'")
        sites = barrier_sites()
        if emu_skip_sync not in sites:    # a stale line number would compile nothing out: every check would pass
            raise BuildError(f"emu_skip_sync {emu_skip_sync!r}: no barrier statement (ex.sync();) at that line of "
                             f"csrc/; the barriers are at {', '.join(sites)}")
    cfg.update({
        "cxx": find_cxx(),
        "ninja": find_ninja(),
        "cxx_flags": list(CXX_FLAGS) + (ASAN_FLAGS if sanitize else []),
        "link_flags": ASAN_LINK_FLAGS if sanitize else [],
        "sanitize": "address" if sanitize else None,
        "emu_skip_sync": emu_skip_sync,
        "python": sys.version.split()[0],
        "ext_suffix": ext_suffix(),
        "pybind11_include": pybind11_include(),
        "python_include": python_include(),
    })
    return cfg


def build_key(src_hash: str, cfg: dict) -> str:
    h = hashlib.sha256()
    for part in (src_hash, BUILD_SCRIPT_VERSION, cfg["mode"], cfg["nvcc_version"], " ".join(cfg["nvcc_flags"]),
                 " ".join(cfg["cxx_flags"] + cfg["cxx_defines"]), cfg["emu_skip_sync"] or "",
                 os.path.basename(cfg["cxx"]), cfg["ext_suffix"]):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _write_build_info(path: Path, src_hash: str, key: str, cfg: dict) -> None:
    def lit(s: str) -> str:
        return json.dumps(s)  # a valid C string literal for ASCII text
    flags = " ".join(cfg["nvcc_flags"] if cfg["mode"] == "cuda" else cfg["cxx_flags"] + cfg["cxx_defines"])
    text = (
        "// generated by gmf_kernels/cuda/build.py\n"
        '#include "gma_api.h"\n'
        "namespace gmf {\n"
        f"const char* build_sources_hash() {{ return {lit(src_hash)}; }}\n"
        f"const char* build_key() {{ return {lit(key)}; }}\n"
        f"const char* build_archs() {{ return {lit(';'.join(cfg['archs']))}; }}\n"
        f"const char* build_ptx_archs() {{ return {lit(';'.join(cfg['ptx_archs']))}; }}\n"
        f"const char* build_mode() {{ return {lit(cfg['mode'])}; }}\n"
        f"const char* build_nvcc_version() {{ return {lit(cfg['nvcc_version'])}; }}\n"
        f"const char* build_flags() {{ return {lit(flags)}; }}\n"
        "}  // namespace gmf\n"
    )
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _write_ninja(build_dir: Path, csrc: Path, cfg: dict, target: Path) -> Path:
    q = lambda p: _ninja_escape(str(p))
    includes = [f"-I{csrc}"]
    host_includes = includes + [f"-I{cfg['cuda_include']}", f"-I{cfg['pybind11_include']}",
                                f"-I{cfg['python_include']}"]
    cu = [f for f in source_files(csrc) if f.suffix == ".cu"]
    cpp = [f for f in source_files(csrc) if f.suffix == ".cpp"]
    headers = [f for f in source_files(csrc) if f.suffix in (".cuh", ".h", ".hpp")]
    cxx_flags = cfg["cxx_flags"] + cfg["cxx_defines"] + host_includes
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {shlex.quote(cfg['cxx'])}",
        "cxx_flags = " + " ".join(shlex.quote(f) for f in cxx_flags),
        "",
        "rule cxx",
        "  command = $cxx $cxx_flags $extra -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
    ]
    if cfg["mode"] == "cuda":
        lines += [
            f"nvcc = {shlex.quote(cfg['nvcc'])}",
            "nvcc_flags = " + " ".join(shlex.quote(f) for f in cfg["nvcc_flags"] + includes),
            "rule nvcc",
            # ptxas -v goes to the per-object log; shown only when the compile fails
            "  command = $nvcc $nvcc_flags -c $in -o $out > $out.log 2>&1 || { cat $out.log; exit 1; }",
            "  description = NVCC $in",
            "rule link",
            "  command = $nvcc -shared -cudart static $in -o $out",
            "  description = LINK $out",
        ]
    else:
        cu = []  # the GPU kernels need nvcc; the emulation is in the .cpp files
        lines += [
            "rule link",
            f"  command = $cxx -shared {' '.join(cfg['link_flags'])} $in -o $out",
            "  description = LINK $out",
        ]
    lines.append("")
    objs = []
    hdr = " ".join(q(h) for h in headers)
    for f in cu:
        o = build_dir / "obj" / (f.stem + ".cu.o")
        objs.append(o)
        lines.append(f"build {q(o)}: nvcc {q(f)} | {hdr}")
    for f in cpp + [build_dir / "build_info.cpp"]:
        o = build_dir / "obj" / (f.stem + ".cpp.o")
        objs.append(o)
        lines.append(f"build {q(o)}: cxx {q(f)}")
        if f.name == EMU_SKIP_SOURCE and cfg["emu_skip_sync"]:
            define = f'-DGMF_EMU_SKIP_SYNC="{cfg["emu_skip_sync"]}"'
            lines.append("  extra = " + shlex.quote(define).replace("$", "$$"))
    lines.append(f"build {q(target)}: link " + " ".join(q(o) for o in objs))
    lines.append(f"default {q(target)}")
    path = build_dir / "build.ninja"
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"gmf_kernels.cuda: {msg}", file=sys.stderr, flush=True)


def _compile(out_dir: Path, cfg: dict, src_hash: str, key: str, verbose: bool, quiet: bool,
             jobs: Optional[int], build_dir: Optional[Path] = None) -> Path:
    csrc = csrc_dir()
    build_dir = Path(build_dir) if build_dir is not None else out_dir / ".build"
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    _write_build_info(build_dir / "build_info.cpp", src_hash, key, cfg)
    staged = build_dir / (key + "_" + module_filename())
    ninja_file = _write_ninja(build_dir, csrc, cfg, staged)
    cmd = [cfg["ninja"], "-f", str(ninja_file)]
    if jobs:
        cmd += ["-j", str(jobs)]
    if verbose:
        cmd.append("-v")
    if cfg["mode"] == "cuda":
        n_units = len([f for f in source_files(csrc) if f.suffix in (".cu", ".cpp")]) + 1
        _log(f"compiling {n_units} units for sm_{', sm_'.join(cfg['archs'])} (PTX compute_"
             f"{', compute_'.join(cfg['ptx_archs'])}) with nvcc {cfg['nvcc_version']} into {out_dir} "
             f"(several minutes on a small machine)", quiet)
    else:
        skip = (f", barrier {cfg['emu_skip_sync']} compiled out" if cfg["emu_skip_sync"] else "") + \
            (", AddressSanitizer" if cfg["sanitize"] else "")
        _log(f"compiling the CPU emulation (host compiler only{skip}) into {out_dir}", quiet)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(build_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    tail: List[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line)
        del tail[:-200]
        if not quiet and (verbose or line.startswith("[") or "error" in line.lower()):
            sys.stderr.write("  " + line)
            sys.stderr.flush()
    rc = proc.wait()
    if rc != 0:
        raise BuildError(f"ninja failed (exit {rc}) building the CUDA module in {build_dir}:\n" + "".join(tail))
    seconds = time.time() - t0

    resources: List[dict] = []
    if cfg["mode"] == "cuda":
        # resources: concatenate the per-object ptxas logs, parse them
        logs = sorted((build_dir / "obj").glob("*.cu.o.log"))
        text = "".join(f"==== {p.name[:-len('.log')]}\n" + p.read_text() for p in logs)
        (out_dir / PTXAS_LOG).write_text(text)
        resources = parse_ptxas(text)
        (out_dir / RESOURCES_JSON).write_text(json.dumps(resources, indent=1))

    final = out_dir / module_filename()
    tmp = out_dir / (module_filename() + ".tmp")
    shutil.copy2(staged, tmp)
    os.replace(tmp, final)  # atomic: a concurrent loader never sees half a module
    meta = {
        "module": final.name, "mode": cfg["mode"], "sources_hash": src_hash, "build_key": key,
        "archs": cfg["archs"], "ptx_archs": cfg["ptx_archs"],
        "cuda_runtime_version": cuda_version_int(cfg["nvcc_version"]) if cfg["mode"] == "cuda" else 0,
        "nvcc": cfg["nvcc"], "nvcc_version": cfg["nvcc_version"], "nvcc_flags": cfg["nvcc_flags"],
        "lineinfo": "-lineinfo" in cfg["nvcc_flags"],
        "cxx": cfg["cxx"], "cxx_flags": cfg["cxx_flags"] + cfg["cxx_defines"], "emu_skip_sync": cfg["emu_skip_sync"],
        "sanitize": cfg["sanitize"],
        "python": cfg["python"], "ext_suffix": cfg["ext_suffix"],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(seconds, 1),
        "csrc": str(csrc), "kernels": len(resources),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    _log(f"built {final} in {seconds:.0f} s", quiet)
    return final


def read_metadata(out_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(out_dir) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None


def build(out_dir: Optional[os.PathLike] = None, archs: Optional[str] = None, verbose: bool = False,
          quiet: bool = False, jobs: Optional[int] = None, force: bool = False, emulation_only: bool = False,
          emu_skip_sync: Optional[str] = None, build_dir: Optional[os.PathLike] = None, sanitize: bool = False) -> str:
    """Compile the module; return the path of the built extension file.

    out_dir None: the per-user cache, keyed on sources + flags + Python + nvcc, reused
    when already built. archs: "75;80;86;89;90" style or "native" (default GMF_CUDA_ARCHS,
    else DEFAULT_ARCHS). emulation_only: host compiler only, no GPU kernels (needs out_dir;
    archs ignored); emu_skip_sync "file:line" compiles that barrier out of the emulation;
    build_dir: where objects are compiled (default out_dir/.build), shared between builds
    that differ in emu_skip_sync only, so that just csrc/gma_emu_skip.cpp is recompiled;
    sanitize: the emulation under AddressSanitizer (`ASAN_FLAGS`; load it in a process started
    with `asan_runtime()` preloaded).
    """
    csrc = csrc_dir()
    src_hash = sources_hash(csrc)
    if src_hash is None:
        raise BuildError(f"no CUDA sources found in {csrc} (set GMF_CSRC_DIR to the repository's csrc/)")
    if emulation_only:
        if out_dir is None:
            raise BuildError("an emulation-only build needs an explicit out_dir (it never goes into the cache)")
        cfg = _config([], emulation_only=True, emu_skip_sync=emu_skip_sync, sanitize=sanitize)
    else:
        if emu_skip_sync is not None or sanitize:
            raise BuildError("emu_skip_sync and sanitize are for emulation-only builds")
        cfg = _config(parse_archs(archs))
    key = build_key(src_hash, cfg)
    if out_dir is None:
        target_dir = cache_root() / key
    else:
        target_dir = Path(out_dir).expanduser().resolve()
    target_dir.mkdir(parents=True, exist_ok=True)
    lock = target_dir.parent / (target_dir.name + ".lock")
    with _file_lock(lock):
        meta = read_metadata(target_dir)
        final = target_dir / module_filename()
        if (out_dir is None and not force and meta is not None and meta.get("build_key") == key
                and final.is_file()):
            _log(f"up to date: {final}", quiet)
            return str(final)
        return str(_compile(target_dir, cfg, src_hash, key, verbose, quiet, jobs,
                            Path(build_dir) if build_dir is not None else None))


def asan_runtime() -> str:
    """The path of the host compiler's AddressSanitizer runtime (libasan), for LD_PRELOAD: a
    sanitized module can only be loaded by a process that loaded the runtime first."""
    cxx = find_cxx()
    out = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not out or not os.path.isabs(out) or not os.path.exists(out):
        raise BuildError(f"{cxx} has no AddressSanitizer runtime (-print-file-name=libasan.so gave {out!r})")
    return os.path.realpath(out)


def build_ahead_of_time(out_dir: os.PathLike) -> str:
    """setup.py entry point: build into out_dir (gmf_kernels/cuda/_prebuilt), archs from GMF_CUDA_ARCHS."""
    # (the standard library only, not gmf_kernels._env: setup.py loads this file by path)
    verbose = os.environ.get("GMF_VERBOSE", "0").strip().lower() in ("1", "true", "on", "yes", "y")
    return build(out_dir=out_dir, archs=None, verbose=verbose)


if __name__ == "__main__":  # python gmf_kernels/cuda/build.py [out_dir]
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
