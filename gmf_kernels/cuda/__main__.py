"""`python -m gmf_kernels.cuda build [--archs "75;80;86;89;90"|native] [--out DIR] [-v]`, `... info`,
`... nvrtc [--arch 70]`.

build: compiles csrc/ with nvcc + ninja (into the per-user cache, or --out DIR) and prints
the path of the module; the architectures default to GMF_CUDA_ARCHS, else 75;80;86;89;90
(SASS) + compute_90 (PTX); `native` = the GPUs visible here. --emulation-only builds the CPU
emulation alone with the host compiler (needs --out). info: where the module is loaded from,
its build, versions, and the per-kernel register / spill figures that ptxas reported.
nvrtc: compiles every kernel for one architecture with NVRTC + ptxas from the CUDA 12.9
wheels (how the sources are checked for sm_70, which CUDA 13 cannot target; DEVELOPERS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import build as _build


def _cmd_build(args) -> int:
    try:
        path = _build.build(out_dir=args.out, archs=args.archs, verbose=args.verbose, jobs=args.jobs,
                            force=args.force, emulation_only=args.emulation_only)
    except _build.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_info(args) -> int:
    from . import candidates, load, loaded_path
    print(f"sources (csrc)   {_build.csrc_dir()}  hash {_build.sources_hash()}")
    print(f"prebuilt dir     {_build.prebuilt_dir()}")
    print(f"cache dir        {_build.cache_root()}")
    for directory, meta in candidates():
        desc = "no build.json" if meta is None else (
            f"sources {meta.get('sources_hash')}, archs {';'.join(meta.get('archs', []))}, "
            f"nvcc {meta.get('nvcc_version')}, built {meta.get('built_at')}")
        print(f"  found {directory}: {desc}")
    try:
        mod = load()
    except ImportError as e:
        print(f"not loadable: {e}")
        return 1
    print(f"loaded           {loaded_path()}  (SASS {mod.build_archs()}, PTX {mod.build_ptx_archs()}, "
          f"sources {mod.sources_hash()})")
    print(f"CUDA             runtime {mod.cuda_runtime_version()} (built in), driver {mod.cuda_driver_version()} "
          f"(0 = none)")
    res = Path(loaded_path()).parent / _build.RESOURCES_JSON
    if res.is_file():
        rows = json.loads(res.read_text())
        regs = max((r["registers"] or 0) for r in rows) if rows else 0
        spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
        print(f"kernels          {len(rows)} (kernel x arch), max {regs} registers, {len(spills)} with spills")
        if args.verbose:
            for r in rows:
                print(f"  {r['arch']:6} {r['registers']:4} regs  spill {r['spill_stores']}/{r['spill_loads']}  "
                      f"{r['kernel']}")
    return 0


def _cmd_nvrtc(args) -> int:
    from . import nvrtc
    try:
        r = nvrtc.check_arch(args.arch)
    except (nvrtc.ToolsMissing, nvrtc.CompileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = r["resources"]
    spills = [x for x in rows if x["spill_stores"] or x["spill_loads"]]
    print(f"NVRTC {r['nvrtc_version']}: {len(r['kernels'])} kernels -> PTX compute_{args.arch} -> SASS sm_{args.arch} "
          f"in {r['seconds']} s; max {max(x['registers'] for x in rows)} registers, {len(spills)} with spills")
    if args.verbose:
        for x in rows:
            print(f"  {x['arch']:6} {x['registers']:4} regs  spill {x['spill_stores']}/{x['spill_loads']}  {x['kernel']}")
    return 1 if spills else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gmf_kernels.cuda", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the CUDA module")
    b.add_argument("--archs", default=None,
                   help=f'e.g. "80;90" or native (default: GMF_CUDA_ARCHS, else "{_build.DEFAULT_ARCHS}")')
    b.add_argument("--out", default=None, help="output directory (default: the per-user cache)")
    b.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (ninja -j)")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    b.add_argument("--emulation-only", action="store_true",
                   help="the CPU emulation alone, host compiler only (no GPU kernels; needs --out)")
    b.set_defaults(func=_cmd_build)
    i = sub.add_parser("info", help="where the module is, how it was built, its kernels' resources")
    i.add_argument("-v", "--verbose", action="store_true", help="list every kernel")
    i.set_defaults(func=_cmd_info)
    n = sub.add_parser("nvrtc", help="compile every kernel with NVRTC + ptxas from the CUDA 12.9 wheels")
    n.add_argument("--arch", default="70", help="architecture number (default 70)")
    n.add_argument("-v", "--verbose", action="store_true", help="list every kernel")
    n.set_defaults(func=_cmd_nvrtc)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
