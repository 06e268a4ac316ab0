"""Self-check: run a backend beside the reference and compare.

* `run_checked(...)`: used by `GroupMixAttention(check=True)` / `GMF_CHECK=1`; raises
  `SelfCheckError` with the measured error when the chosen backend and the reference
  disagree beyond the dtype's tolerance.
* `python -m gmf_kernels.selfcheck`: every available backend against the float64
  reference on random inputs, for every width of the five configs; prints a table and
  exits 1 on any failure, 2 when it checked nothing (or nothing of a backend named with
  ``--backends``: every row skipped, or Triton on a CPU without its interpreter).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Tuple

import torch

from ._env import triton_interpreting
from .numerics import TOLERANCE, cast_weights, default_hyper, max_rel_error, random_gma_weights
from .reference import reference_group_mix_attention


class SelfCheckError(AssertionError):
    pass


def tf32_allowed() -> bool:
    """Whether PyTorch may run float32 matmuls (`torch.backends.cuda.matmul.allow_tf32`) or
    convolutions (`torch.backends.cudnn.allow_tf32`, on by default) on CUDA in TF32 (~1e-3
    relative): the reference's own 1x1 and depthwise convolutions then carry that error."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def check_tolerance(dtype: torch.dtype, on_cuda: bool) -> float:
    """The tolerance of `run_checked`: the dtype's (`numerics.TOLERANCE`), at least 5e-3 on CUDA
    while TF32 is allowed (`tf32_allowed`)."""
    tol = TOLERANCE[dtype]
    return max(tol, 5e-3) if on_cuda and tf32_allowed() else tol


def run_checked(backend, x, size, w, hp, training, linears=None):
    """`backend`'s forward, checked against the reference (float32, or float64 for float64 inputs). With
    `linears` (the module's own qkv and proj modules: `Backend.forward`) the pre-projection is what is
    compared, from the same qkv."""
    ref_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w_ref = cast_weights(w, ref_dtype)  # copies taken before the backend updates BN buffers
    if linears is not None:
        from .backends import get_backend
        qkv = linears[0](x)
        got = backend.pre_projection(backend.qkv_from_upstream_order(qkv, w), size, w, hp, training)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            ref = get_backend("reference").pre_projection(qkv.detach().to(ref_dtype), size, w_ref, hp, training)
        _compare(backend, got, ref, x, size)
        return linears[1](got)
    out = backend.forward(x, size, w, hp, training)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):   # the float32 oracle, not autocast's
        ref = reference_group_mix_attention(x.detach().to(ref_dtype), size, w_ref, hp, training)
    return _compare(backend, out, ref, x, size)


def _compare(backend, out, ref, x, size):
    if out.numel() == 0:   # an empty batch (run for the all-reduces it joins): nothing to compare
        if out.shape != ref.shape:
            raise SelfCheckError(f"backend {backend.name!r}: output shape {tuple(out.shape)} != the reference's "
                                 f"{tuple(ref.shape)}")
        return out
    err = max_rel_error(out, ref)
    tol = check_tolerance(out.dtype, x.is_cuda)
    if not err <= tol:
        raise SelfCheckError(f"backend {backend.name!r} disagrees with the reference: max relative error "
                             f"{err:.3e} > tolerance {tol:.1e} for {out.dtype} (x {tuple(x.shape)}, size {size})")
    return out


# ------------------------------------------------------------------ CLI
def _widths() -> List[int]:
    from .models.configs import MODEL_WIDTHS
    return list(MODEL_WIDTHS)


def check_table(backends, dtypes, grids, batch: int, device: str, seed: int = 0) -> List[Tuple]:
    """Rows (backend, C, grid, dtype, error, reference's own error, verdict). A backend that raises
    on a problem it accepted is a FAIL row with the error; the table goes on."""
    from .backends import get_backend
    from .backends.base import GMAProblem
    rows = []
    for C in _widths():
        for (H, W) in grids:
            w64 = random_gma_weights(C, seed=seed + C, device=device)
            hp = default_hyper(C)
            x64 = torch.randn(batch, H * W, C, dtype=torch.float64, device=device)
            ref = reference_group_mix_attention(x64, (H, W), w64, hp, False)
            for dtype in dtypes:
                x, w = x64.to(dtype), cast_weights(w64, dtype)
                with torch.no_grad():
                    ref_lp_err = max_rel_error(reference_group_mix_attention(x, (H, W), w, hp, False), ref)
                # the problem as a call describes it: on a GPU its index and capability (the arch checks)
                cuda = x.device.type == "cuda"
                prob = GMAProblem(B=batch, H=H, W=W, dim=C, num_heads=8, dtype=dtype, device_type=x.device.type,
                                  device_index=x.device.index if cuda else None,
                                  device_capability=tuple(torch.cuda.get_device_capability(x.device)) if cuda else None,
                                  training=False, needs_grad=False, explicit=True)
                for name in backends:
                    b = get_backend(name)
                    reasons = b.not_supported_reasons(prob)
                    if reasons:
                        rows.append((name, C, f"{H}x{W}", str(dtype)[6:], None, ref_lp_err, "skip: " + reasons[0]))
                        continue
                    try:
                        with torch.no_grad():
                            err = max_rel_error(b.forward(x, (H, W), w, hp, False), ref)
                    except Exception as e:  # accepted, then failed: a FAIL row, and the rest of the table
                        msg = " ".join(str(e).split())[:200]
                        rows.append((name, C, f"{H}x{W}", str(dtype)[6:], None, ref_lp_err,
                                     f"FAIL (raised {type(e).__name__}: {msg})"))
                        continue
                    limit = TOLERANCE[dtype] if dtype in (torch.float64, torch.float32) else 2 * ref_lp_err + 1e-3
                    rows.append((name, C, f"{H}x{W}", str(dtype)[6:], err, ref_lp_err,
                                 "ok" if err <= limit else f"FAIL (> {limit:.1e})"))
    return rows


def main(argv=None) -> int:
    from .backends import available_backends
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None, help="comma list (default: every available backend)")
    ap.add_argument("--dtypes", default=None, help="comma list of float32,float16,bfloat16,float64")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from .backends import BACKEND_NAMES
    names = args.backends.split(",") if args.backends else [n for n in available_backends()]
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown:
        ap.error(f"--backends {args.backends}: unknown {unknown}; choose from {list(BACKEND_NAMES)}")
    try:
        kind = torch.device(args.device).type   # "cuda:1" is a CUDA device too
    except RuntimeError as e:
        ap.error(f"--device {args.device}: {e}")
    if kind not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: the check runs on cpu or cuda devices")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False)")
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: must be >= 1")
    short = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
    known = ("float32", "float16", "bfloat16", "float64")
    if args.dtypes and [d for d in args.dtypes.split(",") if short.get(d, d) not in known]:
        ap.error(f"--dtypes {args.dtypes}: choose from {', '.join(known)} (or fp32, fp16, bf16, fp64)")
    dropped = {}
    if kind == "cpu" and not triton_interpreting() and "triton" in names:
        # the interpreter only when asked for
        dropped["triton"] = "on a CPU it runs only through the Triton interpreter (set TRITON_INTERPRET=1)"
        names = [n for n in names if n != "triton"]
    dtypes = ([getattr(torch, short.get(d, d)) for d in args.dtypes.split(",")] if args.dtypes else
              ([torch.float32, torch.float16, torch.bfloat16] if kind == "cuda" else [torch.float32]))
    grids = [(7, 9), (14, 14)] if kind == "cpu" else [(7, 9), (14, 14), (56, 56)]
    # float32 rows are held to 2e-4: PyTorch's TF32 (cuDNN's on by default) would fail the
    # reference's and the torch backend's own convolutions, whatever the kernels do
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"gmf_kernels self-check on {args.device}: backends {names}, dtypes {[str(d)[6:] for d in dtypes]}, "
          f"grids {grids}, batch {args.batch}, TF32 off; error = max|out-ref64|/max|ref64|")
    rows = check_table(names, dtypes, grids, args.batch, args.device)
    print(f"{'backend':<10} {'C':>4} {'grid':>6} {'dtype':<9} {'error':>10} {'ref err':>10}  verdict")
    for name, C, grid, dt, err, ref_err, verdict in rows:
        e = "-" if err is None else f"{err:.2e}"
        print(f"{name:<10} {C:>4} {grid:>6} {dt:<9} {e:>10} {ref_err:>10.2e}  {verdict}")
    lines, code = summary(rows, names, dropped, explicit=bool(args.backends))
    print("\n".join(lines))
    return code


def summary(rows, names, dropped, explicit: bool) -> Tuple[List[str], int]:
    """The table's last lines and the exit status: 1 when a row failed; 2 when nothing was checked,
    or a backend asked for by name (`explicit`) was not (every row of it skipped, or left out:
    `dropped`, name -> why); else 0. A run that checked nothing is not a pass."""
    failed = [r for r in rows if r[-1].startswith("FAIL")]
    skipped = [r for r in rows if r[-1].startswith("skip")]
    checked = {r[0] for r in rows if not r[-1].startswith("skip")}
    lines = [f"{n}: not checked: {why}" for n, why in dropped.items()]
    lines += [f"{n}: not checked: every row skipped ({next(r[-1] for r in skipped if r[0] == n)})"
              for n in names if n not in checked and any(r[0] == n for r in skipped)]
    ok = len(rows) - len(failed) - len(skipped)
    lines.append(f"{ok} of {len(rows)} rows ok" + (f", {len(skipped)} skipped" if skipped else "")
                 + (f", {len(failed)} FAILED" if failed else ""))
    if failed:
        return lines, 1
    unchecked = [n for n in list(names) + list(dropped) if n not in checked]
    if not checked or (explicit and unchecked):
        lines.append(f"nothing checked for {', '.join(unchecked) or 'any backend'}: not a pass (exit 2)")
        return lines, 2
    return lines, 0


if __name__ == "__main__":
    sys.exit(main())
