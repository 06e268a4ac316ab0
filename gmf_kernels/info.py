"""`python -m gmf_kernels.info`: versions, devices and every backend's availability."""
from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from ._version import __version__
    from .backends import BACKEND_NAMES, get_backend
    info = {
        "gmf_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch.version.cuda": torch.version.cuda,
        "cuda available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    from importlib import metadata
    try:  # read the version without importing triton: its import fixes TRITON_INTERPRET for good
        info["triton"] = metadata.version("triton")
    except metadata.PackageNotFoundError:
        info["triton"] = "not installed"
    import os
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "unset")
    info["backends"] = {n: get_backend(n).availability_reasons() for n in BACKEND_NAMES}
    return info


def main() -> int:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print("\nbackends (priority order for backend='auto'):")
    for name, reasons in backends.items():
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        print(f"  {name:<10} {status}")
    print("\n(an available backend may still refuse an input: e.g. fused kernels are eval/no-grad only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
