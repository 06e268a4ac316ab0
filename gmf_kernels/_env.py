"""Boolean environment variables, read one way everywhere.

`env_flag` reads the library's own switches (GMF_CHECK, GMF_TIMM, GMF_AUTO_UNVERIFIED, ...):
1 / true / on / yes / y, or 0 / false / off / no / n / empty, any case; any other value is an error
naming the variable (a typo must not silently leave a check off). `triton_interpreting` reads
TRITON_INTERPRET exactly as Triton does (``triton.knobs``: 1 / true / on / yes / y, any case, turn the
interpreter on; anything else leaves it off), so that the library never disagrees with Triton about
whether kernels run compiled or interpreted. Standard library only: importable without triton.
"""
from __future__ import annotations

import os

TRUE_VALUES = ("1", "true", "on", "yes", "y")
FALSE_VALUES = ("0", "false", "off", "no", "n", "")


def env_flag(name: str, default: bool = False) -> bool:
    """The boolean environment variable `name` (unset: `default`); ValueError for a value that is neither."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected 1 / true / on / yes or 0 / false / off / no")


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter: TRITON_INTERPRET read as triton.knobs reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in TRUE_VALUES
