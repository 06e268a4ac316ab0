"""`python -m gmf_kernels.cuda build [--archs 80;90] [--out DIR] [-v]` and `... info`.

build: compiles csrc/ with nvcc + ninja (into the per-user cache, or --out DIR) and prints
the path of the module. info: where the module is loaded from, its build, and the
per-kernel register / spill figures that ptxas reported.
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
                            force=args.force)
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
    print(f"loaded           {loaded_path()}  (archs {mod.build_archs()}, sources {mod.sources_hash()})")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gmf_kernels.cuda", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the CUDA module")
    b.add_argument("--archs", default=None, help='e.g. "80;90" (default: GMF_CUDA_ARCHS or 80;90)')
    b.add_argument("--out", default=None, help="output directory (default: the per-user cache)")
    b.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (ninja -j)")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    b.set_defaults(func=_cmd_build)
    i = sub.add_parser("info", help="where the module is, how it was built, its kernels' resources")
    i.add_argument("-v", "--verbose", action="store_true", help="list every kernel")
    i.set_defaults(func=_cmd_info)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
