"""The compiled CUDA module (`_gmf_cuda`, built from csrc/): finding and loading it.

    from gmf_kernels import cuda
    mod = cuda.load()          # ImportError naming `python -m gmf_kernels.cuda build` if absent/stale

Search order: the prebuilt module of the package (`gmf_kernels/cuda/_prebuilt/`, written
by `pip install` when nvcc is found), then the per-user cache (`~/.cache/gmf_kernels/cuda/`,
written by `python -m gmf_kernels.cuda build`), newest first. A build is *stale* when the
sources hash compiled into it differs from the hash of the csrc/ files present now (when
the sources are not installed, e.g. from a wheel, the module is taken as is).

The module includes no torch headers: it takes raw addresses, sizes, a dtype code and
the CUDA stream as integers, so one build serves every torch version. Loading it needs
no GPU and no driver (cudart is linked statically); launching does.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

from . import build as _build

BUILD_COMMAND = _build.BUILD_COMMAND

_lock = threading.Lock()
_loaded: Optional[ModuleType] = None
_loaded_path: Optional[str] = None


def _import_name(path: str) -> str:
    """An import name of its own for the extension file at `path` (this file, this content):
    pybind11 (3.x) keeps one module per import name, so two builds loaded in one process (a
    test's build beside the cached one, the emulation builds of tests/test_cuda_emulation.py)
    need two names. The last component stays `_gmf_cuda` (the init symbol PyInit__gmf_cuda)."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return f"gmf_kernels.cuda._build_{hashlib.sha1(ident.encode()).hexdigest()[:16]}.{_build.MODULE_NAME}"


def _import_extension(path: str) -> ModuleType:
    """Import the extension file at `path` (its init symbol is PyInit__gmf_cuda)."""
    name = _import_name(path)
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def check_fresh(module: ModuleType, path: str, sources_dir: Optional[os.PathLike] = None) -> None:
    """Raise ImportError if `module` was built from other sources than those in sources_dir."""
    current = _build.sources_hash(Path(sources_dir) if sources_dir is not None else None)
    built = module.sources_hash()
    if current is not None and built != current:
        raise ImportError(
            f"the CUDA module {path} is stale: built from sources {built}, but csrc/ is now {current}; "
            f"rebuild it with `{BUILD_COMMAND}`")


def load_from(path: os.PathLike, sources_dir: Optional[os.PathLike] = None, check: bool = True) -> ModuleType:
    """Load a specific build (e.g. a test's temporary one) and check that it is not stale."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImportError(f"no CUDA module at {path}; build it with `{BUILD_COMMAND}`")
    mod = _import_extension(path)
    if check:
        check_fresh(mod, path, sources_dir)
    return mod


def candidates() -> List[Tuple[Path, Optional[dict]]]:
    """(directory, build.json metadata) of every build that could be loaded, in search order."""
    out: List[Tuple[Path, Optional[dict]]] = []
    fname = _build.module_filename()
    pre = _build.prebuilt_dir()
    if (pre / fname).is_file():
        out.append((pre, _build.read_metadata(pre)))
    root = _build.cache_root()
    if root.is_dir():
        cached = [p for p in root.iterdir() if p.is_dir() and (p / fname).is_file()]
        cached.sort(key=lambda p: (p / fname).stat().st_mtime, reverse=True)
        out += [(p, _build.read_metadata(p)) for p in cached]
    return out


def load() -> ModuleType:
    """The compiled module; ImportError (with the build command) when missing or stale."""
    global _loaded, _loaded_path
    with _lock:
        if _loaded is not None:
            return _loaded
        current = _build.sources_hash()
        fname = _build.module_filename()
        notes = []
        for directory, meta in candidates():
            path = directory / fname
            if meta is not None and current is not None and meta.get("sources_hash") != current:
                notes.append(f"{path}: stale (built from sources {meta.get('sources_hash')}, csrc/ is {current})")
                continue
            try:
                mod = _import_extension(str(path))
                check_fresh(mod, str(path))
            except ImportError as e:
                notes.append(f"{path}: {e}")
                continue
            _loaded, _loaded_path = mod, str(path)
            return mod
        where = "; ".join(notes) if notes else (
            f"no build in {_build.prebuilt_dir()} or {_build.cache_root()}")
        raise ImportError(f"gmf_kernels CUDA module is not built or is stale ({where}). "
                          f"Build it with `{BUILD_COMMAND}` (needs nvcc, ninja and pybind11).")


def loaded_path() -> Optional[str]:
    return _loaded_path


def is_available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


# `gmf_kernels.cuda.build` is the build module: build.build(out_dir=None, archs=None, verbose=False)
__all__ = ["load", "load_from", "check_fresh", "candidates", "is_available", "loaded_path", "BUILD_COMMAND"]
