"""Which fused backends a GPU has verified, per CUDA architecture: data, not code.

`backend="auto"` picks a fused backend (`cuda`, `triton`: `Backend.needs_gpu_verification`) on a
GPU only when ``gmf_kernels/data/gpu_verified.json`` lists the GPU's architecture for it (or
``GMF_AUTO_UNVERIFIED=1``); naming the backend explicitly always runs it. An entry is the
evidence of one committed GPU report (``benchmarks/gpu_report.py``): every GPU test of the
backend passed on that architecture, compute-sanitizer found nothing, and its whole-model
checks held. The report's summary.md says, per fused backend, whether it qualifies and prints
the entry to add; ``tests/test_gpu_verified.py`` re-derives that verdict from the committed
report for every entry, so an entry without its evidence fails CI.

Verification is per architecture: a kernel verified on sm_90 runs other tiles, other dot
precisions (TF32 / FMA) and another compiler target on sm_80 or sm_75, so `auto` keeps to the
architectures a report has covered.

Table format (``schema_version`` 1)::

    {"schema_version": 1, "about": "...",
     "verified": {"<backend>": {"sm_90": {"report": "benchmarks/results/<folder>",
                                           "device_name": "NVIDIA H200", "git_sha": "...",
                                           "date": "YYYY-MM-DD"}}}}
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .tuning import arch_key

TABLE_PATH = Path(__file__).resolve().parent / "data" / "gpu_verified.json"
SCHEMA_VERSION = 1
#: what an entry must say
ENTRY_KEYS = ("report", "device_name", "git_sha", "date")


def _path() -> Path:
    return Path(os.environ.get("GMF_GPU_VERIFIED", TABLE_PATH))


@lru_cache(maxsize=4)
def _load(path: str) -> Dict[str, Dict[str, dict]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"GPU verification table {path} not found (the package data is missing: "
                                f"reinstall gmf_kernels)") from None
    return check_table(data, path)


def check_table(data, where: str = "the GPU verification table") -> Dict[str, Dict[str, dict]]:
    """The table's "verified" mapping, after checking its format (ValueError says what is wrong)."""
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{where}: expected a JSON object with schema_version {SCHEMA_VERSION}")
    verified = data.get("verified")
    if not isinstance(verified, dict):
        raise ValueError(f"{where}: expected a 'verified' mapping of backend -> architecture -> entry")
    for backend, archs in verified.items():
        if not isinstance(archs, dict):
            raise ValueError(f"{where}: verified[{backend!r}] must map architectures (sm_XY) to entries")
        for arch, entry in archs.items():
            if not (isinstance(arch, str) and arch.startswith("sm_") and arch[3:].isdigit()):
                raise ValueError(f"{where}: verified[{backend!r}] has {arch!r}, not an architecture like 'sm_90'")
            missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or not entry.get(k)]
            if missing:
                raise ValueError(f"{where}: verified[{backend!r}][{arch!r}] lacks {missing}")
    return verified


def table() -> Dict[str, Dict[str, dict]]:
    """backend -> architecture -> entry, from gmf_kernels/data/gpu_verified.json ($GMF_GPU_VERIFIED: another)."""
    return _load(str(_path()))


def clear_cache() -> None:
    _load.cache_clear()


def entry(backend: str, capability: Optional[Tuple[int, int]]) -> Optional[dict]:
    """The table's entry for a backend on a GPU of this compute capability; None: not verified there
    (or the capability is unknown)."""
    arch = arch_key(capability)
    return None if arch is None else table().get(backend, {}).get(arch)


def archs(backend: str) -> List[str]:
    """The architectures a backend is verified on, sorted."""
    return sorted(table().get(backend, {}), key=lambda a: int(a[3:]))
