#!/usr/bin/env python
"""Compile here what a lent GPU machine would compile first, and carry it there.

A lease's device time is short (15 minutes, the machine's start included), and the GPU report's
record part (benchmarks/gpu_report.py) began on the H200 (2026-12-04) by compiling: 428 Triton
specialisations in 41 s of its 16 CPUs, while the CUDA module built beside them for 122 s. Both
compile without a GPU. This script compiles them on the development machine, for the GPU
machine's Python (3.12 there; any build of the same Triton release):

    python3.12 -m venv /tmp/py312 && /tmp/py312/bin/pip install triton==3.6.0 pybind11 ninja
    python benchmarks/seed_caches.py --python /tmp/py312/bin/python          # -> .upstream/seed/

and the report installs the result into the caches its runs use before its first phase
(`install`, called by gpu_report.py when `--seed` names a folder; default .upstream/seed, which
the device call carries with the upstream clone: `carry=[".upstream"]`). What a cache entry
holds is then what the GPU machine would have compiled, not an approximation of it:

- **Triton**: the record part's warm-up list (`specializations.report_specializations`, the same
  list the report's `--warm` compiles), compiled by `specializations --warm --triton-key`: under
  the cache key that the target Python's Triton computes. That key is the release's version, the
  hashes of its Python sources and the hash of its compiled library, which is the one part that
  differs between builds for two Pythons; `specializations.check_foreign_triton_key` refuses any
  other difference. (Checked on Triton 3.6.0, cp311 against cp312: one kernel compiled natively
  under cp312 and here under cp312's key gave the same cache directory and the same TTIR, TTGIR,
  LLVM IR, PTX and cubin.) The archive keeps each entry's cubin, metadata, PTX, TTIR and TTGIR
  (`KEPT_SUFFIXES`): a launch reads the first two, `specializations.compile_one` the next three.
  Its `.source` and `.llir` are left out (37 % of the compressed size; nothing reads them
  after the compile).
- **CUDA**: `gmf_kernels/cuda/build.py` run by the target Python (its extension suffix) for the
  target architecture, into a cache folder named by the build key (sources, nvcc version, flags,
  compiler, suffix: `build.build_key`). On the GPU machine the report's `python -m
  gmf_kernels.cuda build --archs <arch>` then finds it up to date when its key is the same (same
  nvcc release; `install` records whether it is), and builds as before when it is not.

A seed is only ever a cache: an entry the GPU machine would key differently is not found there,
and the report compiles as it did without one. report.json `build.seed` and summary.md say what
was installed and, through the warm-up's figures and the per-phase count of new cubins, how much
the runs still compiled.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SEED_DIR = ROOT / ".upstream" / "seed"
MANIFEST = "seed.json"
#: the files of a Triton cache entry the archive keeps (with the entry's group file, `GROUP_PREFIX`)
KEPT_SUFFIXES = (".json", ".cubin", ".ptx", ".ttir", ".ttgir")
GROUP_PREFIX = "__grp__"
#: written into the Triton cache once a seed archive is installed there (name + the archive's sha256)
INSTALLED_MARKER = ".gmf_seed_"
#: the prefix of --install's JSON line (gpu_report.py's JSON_TAG: its `extract_json` reads it)
JSON_TAG = "GMF_JSON "

_FACTS = r"""
import json, sys, sysconfig
out = {"python": sys.version.split()[0], "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX")}
try:
    import triton
    from triton.runtime.cache import triton_key
    out.update(triton=triton.__version__, triton_key=triton_key())
except Exception as e:
    out["triton_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def python_facts(python: str) -> Dict[str, str]:
    """Python version, extension suffix, Triton release and Triton key of an interpreter."""
    try:
        r = subprocess.run([python, "-c", _FACTS], capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise SystemExit(f"error: --python {python}: {e.strerror or e} (DEVELOPERS.md: a Python 3.12 venv with "
                         f"triton==3.6.0, pybind11 and ninja)")
    if r.returncode != 0:
        raise SystemExit(f"error: {python} could not report its Python and Triton: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def triton_key_sha(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


# ------------------------------------------------------------------ Triton: pack and install
def pack_triton_cache(cache_dir: Path, archive: Path) -> Dict[str, int]:
    """Write the entries of a Triton cache folder into an .tar.xz: per entry its `KEPT_SUFFIXES`
    files and its group file, whose child paths become bare file names (`install_triton_cache`
    makes them absolute again where it unpacks). Entries without a group file (a compile cut off)
    are left out."""
    entries = files = 0
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for entry in sorted(p for p in Path(cache_dir).iterdir() if p.is_dir()):
            groups = sorted(entry.glob(GROUP_PREFIX + "*.json"))
            if not groups:
                continue
            for grp in groups:
                children = json.loads(grp.read_text()).get("child_paths") or {}
                kept = {name: name for name in children if name.endswith(KEPT_SUFFIXES)
                        and (entry / name).is_file()}
                if not any(n.endswith(".cubin") for n in kept) or not any(n.endswith(".json") for n in kept):
                    continue
                for name in sorted(kept):
                    tar.add(entry / name, arcname=f"{entry.name}/{name}")
                    files += 1
                data = json.dumps({"child_paths": kept}).encode()
                info = tarfile.TarInfo(f"{entry.name}/{grp.name}")
                info.size = len(data)
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
                files += 1
            entries += 1
    return {"entries": entries, "files": files}


def install_triton_cache(archive: Path, cache_dir: Path) -> Dict[str, int]:
    """Unpack a `pack_triton_cache` archive into `cache_dir`: each entry the cache does not hold yet,
    its group file's child paths made absolute there (Triton looks a group's files up by those paths,
    and drops the ones that do not exist). Entries already there are kept as they are."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    added, kept = set(), set()
    with tarfile.open(archive, "r:xz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if len(parts) != 2 or not m.isfile() or parts[0] in ("", ".", "..") or parts[1] in ("", ".", ".."):
                raise ValueError(f"{archive}: unexpected member {m.name!r}")
            entry = cache_dir / parts[0]
            if parts[0] in kept or (parts[0] not in added and entry.exists()):
                kept.add(parts[0])
                continue
            added.add(parts[0])
            entry.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(m).read()
            if parts[1].startswith(GROUP_PREFIX):
                children = json.loads(data).get("child_paths") or {}
                data = json.dumps({"child_paths": {n: str(entry / n) for n in children}}).encode()
            tmp = entry / (parts[1] + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, entry / parts[1])
    return {"added": len(added), "already_there": len(kept)}


# ------------------------------------------------------------------ the whole seed: install
def install(seed_dir: Path, triton_cache: Path, cuda_cache: Path, *, triton_key: Optional[str] = None,
            cuda_key: Optional[str] = None) -> Dict[str, object]:
    """Install a seed folder (this script's output) into the caches of the machine that runs: the
    Triton archive (once per archive: `INSTALLED_MARKER`) when its Triton key is this machine's
    (`triton_key`, default this process's Triton), the CUDA build folders into `cuda_cache`.
    Returns what it did, for the report; never raises for a seed that does not fit (it says so)."""
    t0 = time.monotonic()
    seed_dir = Path(seed_dir)
    out: Dict[str, object] = {"dir": str(seed_dir)}
    try:
        manifest = json.loads((seed_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        out["status"] = f"no seed: {type(e).__name__}: {e}"
        return out
    out["manifest"] = {k: manifest.get(k) for k in ("created", "host", "git_sha", "arch", "python", "triton",
                                                      "triton_entries", "cuda_key", "cuda_nvcc", "sources_hash")}
    tri = manifest.get("triton_archive")
    if tri:
        if triton_key is None:
            from triton.runtime.cache import triton_key as _tk
            triton_key = _tk()
        archive = seed_dir / tri
        if manifest.get("triton_key_sha256") != triton_key_sha(triton_key):
            out["triton"] = "not installed: built for another Triton build (its key differs from this machine's)"
            # kept in the report, so that the next seed can be compiled under it (--triton-key-file)
            out["machine_triton_key"] = triton_key
        elif not archive.is_file():
            out["triton"] = f"not installed: {archive} missing"
        else:
            marker = Path(triton_cache) / (INSTALLED_MARKER + sha256_file(archive)[:16])
            if marker.exists():
                out["triton"] = "installed before (same archive)"
            else:
                out["triton"] = install_triton_cache(archive, Path(triton_cache))
                marker.write_text(json.dumps(out["manifest"]))
    for folder in manifest.get("cuda_builds") or []:
        src = seed_dir / "cuda" / folder
        dst = Path(cuda_cache) / folder
        if not src.is_dir():
            out.setdefault("cuda", []).append(f"{folder}: missing in the seed")
        elif dst.exists():
            out.setdefault("cuda", []).append(f"{folder}: already in {cuda_cache}")
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst)
            out.setdefault("cuda", []).append(f"{folder}: installed")
    if cuda_key is not None:
        out["cuda_key_matches"] = cuda_key in (manifest.get("cuda_builds") or [])
        out["machine_cuda_key"] = cuda_key
    out["status"] = "ok"
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _cuda_build_module():
    """gmf_kernels/cuda/build.py loaded by path (standard library only: no torch import)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gmf_cuda_build", ROOT / "gmf_kernels" / "cuda" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def install_here(seed_dir: Path, arch: str) -> Dict[str, object]:
    """`install` into this machine's caches, with the key this machine's CUDA build for sm_<arch>
    would have (None where it cannot tell: no nvcc, ninja or pybind11)."""
    from triton import knobs
    cb = _cuda_build_module()
    try:
        cuda_key = cb.build_key(cb.sources_hash(), cb._config(cb.parse_archs(arch)))
    except Exception:
        cuda_key = None
    return install(seed_dir, Path(knobs.cache.dir), cb.cache_root(), cuda_key=cuda_key)


# ------------------------------------------------------------------ building a seed (development machine)
def build_cuda(python: str, arch: str, cuda_root: Path) -> str:
    """The CUDA module built by `python` for sm_<arch> into cuda_root/<build key>/ (objects removed);
    returns the key."""
    env = dict(os.environ, GMF_CUDA_ARCHS=arch, GMF_CUDA_CACHE=str(cuda_root))
    r = subprocess.run([python, str(ROOT / "gmf_kernels" / "cuda" / "build.py")], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: the CUDA build failed:\n{(r.stdout + r.stderr)[-3000:]}")
    module = Path(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(module.parent / ".build", ignore_errors=True)
    return module.parent.name


def compile_triton(arch: str, key_file: Path, cache_dir: Path, jobs: int, json_out: Path) -> List[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "gmf_kernels.triton_kernels.specializations", "--warm", "--arch", arch,
           "--jobs", str(jobs), "--triton-key", str(key_file), "--cache-dir", str(cache_dir), "--json", str(json_out)]
    r = subprocess.run(cmd, env=env)
    rows = json.loads(json_out.read_text()) if json_out.is_file() else []
    if r.returncode != 0 or not rows:
        raise SystemExit(f"error: the Triton compiles failed (rc {r.returncode}); see {json_out}")
    return rows


def _git_sha() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--python", default=None,
                    help="the interpreter of the GPU machine's Python version (3.12), with this Triton release, "
                         "pybind11 and ninja installed (building a seed)")
    ap.add_argument("--arch", default="90", help="the GPU's architecture (default 90: H100, H200)")
    ap.add_argument("--out", default=str(DEFAULT_SEED_DIR), help="the seed folder (default .upstream/seed)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-cuda", action="store_true", help="the Triton cache only")
    ap.add_argument("--triton-key-file", default=None, metavar="FILE",
                    help="compile under this Triton key (a file holding it) in place of --python's: the GPU "
                         "machine's own, from a report whose seed did not fit (report.json: "
                         "build.seed.machine_triton_key); it may differ from --python's in the compiled "
                         "library's hash alone")
    ap.add_argument("--install", default=None, metavar="SEED_DIR",
                    help="on the machine that runs (gpu_report.py does this): install SEED_DIR into this "
                         "machine's Triton cache (TRITON_CACHE_DIR or Triton's default) and CUDA module cache "
                         "(GMF_CUDA_CACHE or ~/.cache/gmf_kernels/cuda); prints what it did as one JSON line, "
                         "after 'GMF_JSON '")
    a = ap.parse_args(argv)
    if a.install:   # one line, tagged as the report's workers tag theirs (gpu_report.extract_json)
        print(JSON_TAG + json.dumps(install_here(Path(a.install), a.arch)))
        return 0
    if not a.python:
        ap.error("--python is needed to build a seed")
    import triton

    from gmf_kernels.triton_kernels import specializations as S
    cuda_build = _cuda_build_module()
    t0 = time.monotonic()
    facts = python_facts(a.python)
    if "triton_key" not in facts:
        raise SystemExit(f"error: {a.python} has no Triton ({facts.get('triton_error')}): pip install "
                         f"triton=={triton.__version__} there")
    if facts["triton"] != triton.__version__:
        raise SystemExit(f"error: {a.python} has Triton {facts['triton']}, this Python {triton.__version__}: "
                         "the same release is needed")
    if a.triton_key_file:
        facts["triton_key"] = Path(a.triton_key_file).read_text().strip()
    try:
        S.check_foreign_triton_key(facts["triton_key"])
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    out = Path(a.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest: Dict[str, object] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
        "git_sha": _git_sha(), "arch": a.arch, "python": facts["python"], "ext_suffix": facts["ext_suffix"],
        "triton": facts["triton"], "triton_key_sha256": triton_key_sha(facts["triton_key"]),
        "sources_hash": cuda_build.sources_hash()}
    if not a.no_cuda:
        key = build_cuda(a.python, a.arch, out / "cuda")
        meta = cuda_build.read_metadata(out / "cuda" / key) or {}
        manifest.update(cuda_builds=[key], cuda_key=key, cuda_nvcc=meta.get("nvcc_version"))
        print(f"CUDA module for sm_{a.arch}, {facts['ext_suffix']}: {out / 'cuda' / key}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gmf_seed_") as tmp:
        key_file = Path(tmp) / "triton_key"
        key_file.write_text(facts["triton_key"])
        rows = compile_triton(a.arch, key_file, Path(tmp) / "cache", a.jobs, out / "triton_compiles.json")
        bad = [r for r in rows if "error" in r or "skipped" in r]
        if bad:
            raise SystemExit(f"error: {len(bad)} of {len(rows)} specialisations did not compile; see "
                             f"{out / 'triton_compiles.json'}")
        name = f"triton_cache_sm{a.arch}.tar.xz"
        packed = pack_triton_cache(Path(tmp) / "cache", out / name)
    manifest.update(triton_archive=name, triton_entries=packed["entries"], triton_specializations=len(rows),
                    seconds=round(time.monotonic() - t0))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"seed: {packed['entries']} Triton entries ({len(rows)} specialisations), "
          f"{len(manifest.get('cuda_builds') or [])} CUDA build(s), {size / 2**20:.1f} MiB in {out} "
          f"({manifest['seconds']} s)")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
