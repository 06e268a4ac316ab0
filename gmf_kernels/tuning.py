"""Tuning tables: launch choices and measured backend times as data, keyed by (GPU arch, C, dtype).

One JSON file per GPU architecture, ``gmf_kernels/data/tuning/<arch>.json`` (e.g. ``sm_90``),
written by ``benchmarks/tune.py`` on a lent GPU and read here::

    {
      "arch": "sm_90", "measured": true, "device": "NVIDIA H100 80GB HBM3", "date": "...",
      "git_sha": "...", "torch": "...", "triton": "...",
      "kernels": {                              # per kernel family: the chosen launch config
        "triton.aggregate": {"80": {"bfloat16": {"BLOCK_P": 64, "num_warps": 4, "time_us": 41.2}}},
        ...
      },
      "backends": {                             # per (C, dtype): measured pre-projection time per backend
        "80": {"bfloat16": {"cuda": 120.5, "triton": 98.1, "batch": 128}}
      }
    }

Nothing is measured until a GPU runs ``benchmarks/tune.py``: without a table (or an entry),
every kernel family uses its default (from the roofline reasoning in its launcher's docstring)
and ``auto`` uses the declared backend order. Kernel families register their search space
here (`register_space`) so that the tuner and the roofline report find every tunable kernel:
the forward's in the launchers ("triton.aggregate", "triton.attention", "cuda.tiles"), the
training kernels' through `triton_kernels/tile_spaces.py` ("triton.statistics", ...,
"triton.backward"; ``benchmarks/tune.py --train``), in the same file per architecture.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

TABLE_DIR = Path(__file__).resolve().parent / "data" / "tuning"

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def arch_key(capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """(9, 0) -> "sm_90"; None -> None."""
    if capability is None:
        return None
    return f"sm_{capability[0]}{capability[1]}"


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def table_path(arch: str) -> Path:
    return Path(os.environ.get("GMF_TUNING_DIR", TABLE_DIR)) / f"{arch}.json"


@lru_cache(maxsize=None)
def _load(path: str) -> Optional[dict]:
    """The table at `path`; None when there is none, or (with a warning, once) when it cannot be
    read or is not a JSON object: every launch then uses its default rather than failing."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with open(p) as fh:
            table = json.load(fh)
    except (OSError, ValueError) as e:
        warnings.warn(f"gmf_kernels: tuning table {p} cannot be read ({type(e).__name__}: {e}); the default "
                      f"launch configs are used. Rewrite it with benchmarks/tune.py or delete it.")
        return None
    if not isinstance(table, dict):
        warnings.warn(f"gmf_kernels: tuning table {p} is not a JSON object; the default launch configs are used")
        return None
    return table


def _lookup(table: Optional[dict], *keys: str) -> Optional[dict]:
    """table[k0][k1]...; None where a level is missing or not a JSON object (a malformed table)."""
    node = table
    for k in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(k)
    return node if isinstance(node, dict) else None


def load_table(arch: Optional[str]) -> Optional[dict]:
    """The tuning table of an architecture, or None when there is none."""
    if arch is None:
        return None
    return _load(str(table_path(arch)))


def clear_cache() -> None:
    _load.cache_clear()
    _choose.cache_clear()


def _width_key(C) -> str:
    """The table's key of width C ("320"); int() first: under torch.jit.trace a size is a traced tensor,
    whose str() ("tensor(320)") would miss every entry."""
    return str(int(C))


def kernel_config(family: str, arch: Optional[str], C: int, dtype) -> Optional[dict]:
    """The tuned launch config of a kernel family for (arch, C, dtype), or None (use the default)."""
    return _lookup(load_table(arch), "kernels", family, _width_key(C), dtype_name(dtype))


def backend_times(arch: Optional[str], C: int, dtype, training: bool = False) -> Dict[str, float]:
    """Measured time (any unit, same for all) per backend for (arch, C, dtype); {} if none: of the
    pre-projection without gradients ("backends"), or with `training` of one layer's training step
    ("backends_train": forward in train mode and backward, benchmarks/tune.py --train)."""
    entry = _lookup(load_table(arch), "backends_train" if training else "backends", _width_key(C),
                    dtype_name(dtype)) or {}
    return {k: float(v) for k, v in entry.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and k != "batch"}


# ---------------------------------------------------------------- search spaces
@dataclass(frozen=True)
class SearchSpace:
    """A tunable kernel family: its candidate configs and its default for (C, dtype, capability)."""

    family: str                                                   # e.g. "triton.aggregate"
    candidates: Callable[[int, torch.dtype, Tuple[int, int]], List[dict]]
    default: Callable[[int, torch.dtype, Tuple[int, int]], dict]


_SPACES: Dict[str, SearchSpace] = {}


def register_space(space: SearchSpace) -> SearchSpace:
    _SPACES[space.family] = space
    _choose.cache_clear()
    return space


def spaces() -> Dict[str, SearchSpace]:
    """Every registered search space (a family registers when its launcher module is imported)."""
    return dict(_SPACES)


def choose(family: str, C: int, dtype, capability: Optional[Tuple[int, int]]) -> dict:
    """The config a launcher uses: the tuned entry for this GPU when the table has one, else the
    family's default. A tuned entry must name one candidate exactly (the same knobs, the same
    values): the candidate itself is returned. A stale table (an entry that is no candidate any
    more, or lacks a knob added since) falls back to the default.

    Every launch asks (the forward's two families per call, the training kernels' per launch), so
    the answer is cached per (family, C, dtype, GPU, table path) -- the table itself is read once per
    path (`_load`); `clear_cache` and `register_space` drop it -- sparing each launch the candidates'
    construction (~25 us per call of the Triton forward with a table, on the development CPU)."""
    cap = tuple(capability) if capability is not None else None
    arch = arch_key(cap)
    return dict(_choose(family, int(C), dtype, cap, str(table_path(arch)) if arch else ""))


@lru_cache(maxsize=4096)
def _choose(family: str, C: int, dtype, capability: Optional[Tuple[int, int]], path: str) -> dict:
    """`choose` (path: where the table of the capability's architecture is looked up, a cache key only)."""
    space = _SPACES.get(family)
    tuned = kernel_config(family, arch_key(capability), C, dtype)
    if space is None:
        return dict(tuned or {})
    cap = capability or (8, 0)
    if tuned is not None:
        keys = {k: v for k, v in tuned.items() if k != "time_us"}
        for c in space.candidates(C, dtype, cap):
            if keys and keys == dict(c):
                return dict(c)
    return space.default(C, dtype, cap)
