"""Build the CUDA module `_gmf_cuda` from csrc/ with ninja + nvcc (no torch needed).

This file is imported by path from setup.py, so it uses the standard library only
(pybind11 is asked for its include directory; ninja and nvcc are run as programs).

* `build(out_dir=None, archs=None, verbose=False) -> path`: compiles into `out_dir`, or
  into a per-user cache `~/.cache/gmf_kernels/cuda/<build key>/` guarded by a file lock
  (`filelock` when importable, else `fcntl`); a cached build with the same key is reused.
* `build_ahead_of_time(out_dir) -> path`: what setup.py calls (`GMF_CUDA_ARCHS` honoured).
* `sources_hash()`: sha256 prefix of the csrc/ files; compiled into the module so a
  loader can tell a stale build from a fresh one.

Targets: `GMF_CUDA_ARCHS` (e.g. "80;90", "8.0 9.0", "sm_90a"), default "80;90": SASS for
each and PTX of the highest, so newer GPUs can JIT it. cudart is linked statically (nvcc's
default), so importing the module needs no driver. ptxas `-v` output of every kernel is
kept in `ptxas_resources.log` next to the module and parsed into `resources.json`
(registers, spills, stack, shared memory per kernel and architecture).
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
DEFAULT_ARCHS = "80;90"
BUILD_COMMAND = "python -m gmf_kernels.cuda build"
#: bump when the way the module is built changes (part of the build key)
BUILD_SCRIPT_VERSION = "1"
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


class BuildError(RuntimeError):
    """The CUDA module could not be built (missing tool, compiler error)."""


# ------------------------------------------------------------------ locations
def package_dir() -> Path:
    return Path(__file__).resolve().parent


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
def parse_archs(spec: Optional[str] = None) -> List[str]:
    """ "80;90" / "8.0 9.0" / "sm_80,sm_90a" -> ["80", "90"] (sorted, unique)."""
    if spec is None:
        spec = os.environ.get("GMF_CUDA_ARCHS") or DEFAULT_ARCHS
    out = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        t = tok.lower().replace("sm_", "").replace("compute_", "").replace("+ptx", "")
        if re.fullmatch(r"\d\.\d[af]?", t):
            t = t.replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", t):
            raise BuildError(f"bad CUDA architecture {tok!r} in {spec!r} (expected e.g. '80;90')")
        if int(re.match(r"\d+", t).group()) < 80:
            raise BuildError(f"architecture {tok!r}: the kernels need sm_80 or newer")
        if t not in out:
            out.append(t)
    if not out:
        raise BuildError(f"no CUDA architecture in {spec!r}")
    return sorted(out, key=lambda a: (int(re.match(r"\d+", a).group()), a))


def gencode_flags(archs: Sequence[str]) -> List[str]:
    flags = []
    for i, a in enumerate(archs):
        code = f"sm_{a}" if i < len(archs) - 1 else f"[sm_{a},compute_{a}]"
        flags += ["-gencode", f"arch=compute_{a},code={code}"]
    return flags


# ------------------------------------------------------------------ ptxas resources
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: Iterable[str]) -> Dict[str, str]:
    names = list(dict.fromkeys(names))
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
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


def _config(archs: Sequence[str]) -> dict:
    nvcc = find_nvcc()
    return {
        "nvcc": nvcc,
        "nvcc_version": nvcc_version(nvcc),
        "cxx": find_cxx(),
        "ninja": find_ninja(),
        "archs": list(archs),
        "nvcc_flags": NVCC_FLAGS + gencode_flags(archs),
        "cxx_flags": list(CXX_FLAGS),
        "python": sys.version.split()[0],
        "ext_suffix": ext_suffix(),
        "pybind11_include": pybind11_include(),
        "python_include": python_include(),
    }


def build_key(src_hash: str, cfg: dict) -> str:
    h = hashlib.sha256()
    for part in (src_hash, BUILD_SCRIPT_VERSION, cfg["nvcc_version"], " ".join(cfg["nvcc_flags"]),
                 " ".join(cfg["cxx_flags"]), os.path.basename(cfg["cxx"]), cfg["ext_suffix"]):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _write_build_info(path: Path, src_hash: str, key: str, cfg: dict) -> None:
    def lit(s: str) -> str:
        return json.dumps(s)  # a valid C string literal for ASCII text
    flags = " ".join(cfg["nvcc_flags"])
    text = (
        "// generated by gmf_kernels/cuda/build.py\n"
        '#include "gma_api.h"\n'
        "namespace gmf {\n"
        f"const char* build_sources_hash() {{ return {lit(src_hash)}; }}\n"
        f"const char* build_key() {{ return {lit(key)}; }}\n"
        f"const char* build_archs() {{ return {lit(';'.join(cfg['archs']))}; }}\n"
        f"const char* build_nvcc_version() {{ return {lit(cfg['nvcc_version'])}; }}\n"
        f"const char* build_flags() {{ return {lit(flags)}; }}\n"
        "}  // namespace gmf\n"
    )
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _write_ninja(build_dir: Path, csrc: Path, cfg: dict, target: Path) -> Path:
    q = lambda p: _ninja_escape(str(p))
    includes = [f"-I{csrc}"]
    host_includes = includes + [f"-I{cfg['pybind11_include']}", f"-I{cfg['python_include']}"]
    cu = [f for f in source_files(csrc) if f.suffix == ".cu"]
    cpp = [f for f in source_files(csrc) if f.suffix == ".cpp"]
    headers = [f for f in source_files(csrc) if f.suffix in (".cuh", ".h", ".hpp")]
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(cfg['nvcc'])}",
        f"cxx = {shlex.quote(cfg['cxx'])}",
        "nvcc_flags = " + " ".join(shlex.quote(f) for f in cfg["nvcc_flags"] + includes),
        "cxx_flags = " + " ".join(shlex.quote(f) for f in cfg["cxx_flags"] + host_includes),
        "",
        "rule nvcc",
        # ptxas -v goes to the per-object log; shown only when the compile fails
        "  command = $nvcc $nvcc_flags -c $in -o $out > $out.log 2>&1 || { cat $out.log; exit 1; }",
        "  description = NVCC $in",
        "rule cxx",
        "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "rule link",
        "  command = $nvcc -shared -cudart static $in -o $out",
        "  description = LINK $out",
        "",
    ]
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
             jobs: Optional[int]) -> Path:
    csrc = csrc_dir()
    build_dir = out_dir / ".build"
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    _write_build_info(build_dir / "build_info.cpp", src_hash, key, cfg)
    staged = build_dir / module_filename()
    ninja_file = _write_ninja(build_dir, csrc, cfg, staged)
    cmd = [cfg["ninja"], "-f", str(ninja_file)]
    if jobs:
        cmd += ["-j", str(jobs)]
    if verbose:
        cmd.append("-v")
    n_units = len([f for f in source_files(csrc) if f.suffix in (".cu", ".cpp")]) + 1
    _log(f"compiling {n_units} units for sm_{', sm_'.join(cfg['archs'])} with nvcc {cfg['nvcc_version']} "
         f"into {out_dir} (a few minutes on a small machine)", quiet)
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
        "module": final.name, "sources_hash": src_hash, "build_key": key, "archs": cfg["archs"],
        "nvcc": cfg["nvcc"], "nvcc_version": cfg["nvcc_version"], "nvcc_flags": cfg["nvcc_flags"],
        "cxx": cfg["cxx"], "python": cfg["python"], "ext_suffix": cfg["ext_suffix"],
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
          quiet: bool = False, jobs: Optional[int] = None, force: bool = False) -> str:
    """Compile the module; return the path of the built extension file.

    out_dir None: the per-user cache, keyed on sources + flags + Python + nvcc, reused
    when already built. archs: "80;90" style (default GMF_CUDA_ARCHS or 80;90).
    """
    csrc = csrc_dir()
    src_hash = sources_hash(csrc)
    if src_hash is None:
        raise BuildError(f"no CUDA sources found in {csrc} (set GMF_CSRC_DIR to the repository's csrc/)")
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
        return str(_compile(target_dir, cfg, src_hash, key, verbose, quiet, jobs))


def build_ahead_of_time(out_dir: os.PathLike) -> str:
    """setup.py entry point: build into out_dir (gmf_kernels/cuda/_prebuilt), archs from GMF_CUDA_ARCHS."""
    return build(out_dir=out_dir, archs=None, verbose=os.environ.get("GMF_VERBOSE", "0") == "1")


if __name__ == "__main__":  # python gmf_kernels/cuda/build.py [out_dir]
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
