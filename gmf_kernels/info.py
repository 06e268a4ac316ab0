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
    info["capabilities"] = {n: capabilities(get_backend(n)) for n in BACKEND_NAMES}
    return info


def _dtypes(ds) -> str:
    order = ("float64", "float32", "float16", "bfloat16")
    names = [str(d).replace("torch.", "") for d in ds]
    return "/".join(sorted(names, key=lambda n: order.index(n) if n in order else 99)) or "none"


def capabilities(b) -> str:
    """A backend's declared support (its `backends.base.Backend` fields), in one line."""
    from .verified import archs as verified_archs

    def mode(flag, dts):
        return _dtypes(dts if dts is not None else b.dtypes) if flag else "no"
    parts = [f"devices {'/'.join(sorted(b.device_types))}", f"dtypes {_dtypes(b.dtypes)}",
             f"training {mode(b.supports_training, b.training_dtypes)}",
             f"gradients {mode(b.supports_grad, b.grad_dtypes)}",
             f"SyncBatchNorm {'yes' if b.supports_sync_bn else 'no'}",
             f"mixed BatchNorms {'yes' if b.supports_mixed_bn else 'no'}"]
    if b.needs_gpu_verification:
        done = verified_archs(b.name)
        parts.append(f"verified on {', '.join(done)} ('auto' skips it on other GPUs)" if done else
                     "not yet verified on a GPU ('auto' skips it on CUDA)")
    if b.emulated_on_cpu:
        parts.append("CPU: interpreter only")
    return ", ".join(parts)


def main(argv=None) -> int:
    import argparse
    argparse.ArgumentParser(prog="python -m gmf_kernels.info", description="Versions, devices and every backend's availability.").parse_args(argv)
    info = collect()
    from .backends import DECLARED_ORDER
    backends = info.pop("backends")
    caps = info.pop("capabilities")
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print("\nbackends:")
    for name, reasons in backends.items():
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        print(f"  {name:<10} {status}")
    print("backend='auto' takes the fastest the tuning table measured for the call, else the first that can run it"
          " in this order:")
    for training, order in DECLARED_ORDER.items():
        print(f"  {'training / gradients' if training else 'inference':<20} {', '.join(order)}")
    print("\ndeclared support (an available backend still refuses an input outside it, and says why):")
    for name, line in caps.items():
        print(f"  {name:<10} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
