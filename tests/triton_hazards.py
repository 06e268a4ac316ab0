"""Global-memory hazards of Triton kernels, found under Triton's CPU interpreter.

The interpreter runs a launch's programs one after another, each to its end, and every
thread of a program in lock step. So a kernel whose programs write an element another
program of the same launch reads or writes gives the same answer every time there, while a
GPU runs those programs at the same time, in any order, and answers differently from run to
run. Likewise inside one program: a GPU thread may store an element that another thread of
the same CTA then loads; without a barrier (`tl.debug_barrier()`) between them nothing
orders the two. The parity tests cannot see either kind.

`HazardCheck` records every global-memory access of every program while kernels run under
the interpreter (it wraps the interpreter's load, store, atomic and barrier operations and
its grid loop) and reports, per launch:

* ``cross-program write/write``: an element written (plain store) by two programs;
* ``cross-program read/write``: an element one program reads and another writes (plain);
* ``cross-program atomic/plain``: an element one program updates atomically and another
  reads or writes with plain operations (atomics among themselves are fine);
* ``read after write, no barrier``: a program loads an element it stored earlier with no
  `tl.debug_barrier()` in between (another thread of the CTA may hold the store);
* ``write after write, no barrier``: a program stores an element twice, from two store
  operations, with no barrier in between (two threads may race for the last word);
* ``one store, two values``: a single store operation writes different values to one element.
* ``outside every tensor argument``: an access (its mask on) to a byte no tensor argument of the
  launch spans (from its first element to its last): the interpreter reads or writes whatever
  lies there; a GPU faults or corrupts another buffer (compute-sanitizer's memcheck on a GPU).

Intra-program findings are conservative: the interpreter cannot tell which thread owns which
element, and a store and a load of the same layout are ordered on a GPU (same thread); no
kernel of the library relies on that, so the check does not either. Accesses are compared byte by byte (views of one buffer in different dtypes
overlap correctly). Block pointers and tensor descriptors are not modelled: a kernel that uses
them makes the check raise instead of passing silently.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

READ, WRITE, ATOMIC = 0, 1, 2


@dataclass
class Finding:
    kind: str
    kernel: str
    where: str               # the tensor argument and element offset of the first byte involved
    programs: Tuple          # the program(s) involved, as grid indices
    count: int               # bytes involved

    def __str__(self):
        shown = ", ".join(map(str, self.programs[:4])) + (f" and {len(self.programs) - 4} more" if len(self.programs) > 4 else "")
        return f"{self.kernel}: {self.kind}, first at {self.where} (programs {shown}; {self.count} bytes)"


@dataclass
class _Program:
    idx: Tuple[int, int, int]
    events: List[Tuple[int, int, int, np.ndarray]] = field(default_factory=list)   # (seq, kind, epoch, bytes)
    epoch: int = 0


def _bytes(ptrs: np.ndarray, mask: Optional[np.ndarray], esize: int) -> np.ndarray:
    a = np.asarray(ptrs).reshape(-1).astype(np.uint64)
    if mask is not None:
        a = a[np.broadcast_to(np.asarray(mask), np.asarray(ptrs).shape).reshape(-1)]
    if esize == 1:
        return a
    return (a[:, None] + np.arange(esize, dtype=np.uint64)[None, :]).reshape(-1)


def _esize(handle) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


class HazardCheck:
    """Context manager: run Triton kernels under the interpreter inside it; `findings` lists
    the hazards (`Finding`), `launches` the kernels seen (name, grid).
    without_barriers: names of kernels whose programs are also checked as if their
    `tl.debug_barrier()` calls were removed, in the same run; those findings go to
    `findings_without_barriers` (to show that a kernel's barrier is what keeps it clean)."""

    def __init__(self, without_barriers: Sequence[str] = ()):
        self.without_barriers = set(without_barriers)
        self.findings: List[Finding] = []
        self.findings_without_barriers: List[Finding] = []
        self.launches: List[Tuple[str, Tuple[int, ...]]] = []
        self._stack = contextlib.ExitStack()
        self._launch = None

    # ------------------------------------------------------------ patching the interpreter
    def __enter__(self):
        from triton.runtime import interpreter as I
        if not hasattr(I, "GridExecutor"):
            raise RuntimeError("this triton has no interpreter GridExecutor: the hazard check cannot run")
        b = I.interpreter_builder
        check = self

        def wrap(name, fn):
            self._stack.callback(setattr, b, name, getattr(b, name))
            setattr(b, name, fn)

        orig = {n: getattr(b, n) for n in ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                                            "create_atomic_cas", "create_barrier", "set_grid_idx")}

        def masked_load(ptrs, mask, *a, **k):
            check._access(READ, _bytes(ptrs.data, mask.data, _esize(ptrs)))
            return orig["create_masked_load"](ptrs, mask, *a, **k)

        def masked_store(ptrs, value, mask, *a, **k):
            check._store(ptrs, value, mask)
            return orig["create_masked_store"](ptrs, value, mask, *a, **k)

        def atomic_rmw(op, ptr, val, mask, *a, **k):
            check._access(ATOMIC, _bytes(ptr.data, mask.data, _esize(ptr)))
            return orig["create_atomic_rmw"](op, ptr, val, mask, *a, **k)

        def atomic_cas(ptr, cmp, val, *a, **k):
            check._access(ATOMIC, _bytes(ptr.data, None, _esize(ptr)))
            return orig["create_atomic_cas"](ptr, cmp, val, *a, **k)

        def barrier():
            L = check._launch
            if L is not None and L["program"] is not None:
                L["program"].epoch += 1
            return orig["create_barrier"]()

        def set_grid_idx(x, y, z):
            orig["set_grid_idx"](x, y, z)
            check._start_program((x, y, z))

        def unmodelled(name):
            def refuse(*a, **k):
                raise RuntimeError(f"HazardCheck does not model {name}: extend tests/triton_hazards.py")
            return refuse

        for name, fn in (("create_masked_load", masked_load), ("create_masked_store", masked_store),
                         ("create_atomic_rmw", atomic_rmw), ("create_atomic_cas", atomic_cas),
                         ("create_barrier", barrier), ("set_grid_idx", set_grid_idx)):
            wrap(name, fn)
        for name in ("create_tensor_pointer_load", "create_tensor_pointer_store", "create_descriptor_load",
                     "create_descriptor_store", "create_descriptor_gather", "create_descriptor_scatter"):
            if hasattr(b, name):
                wrap(name, unmodelled(name))

        call = I.GridExecutor.__call__

        def grid_call(executor, *args, **kwargs):
            check._begin_launch(executor, args, kwargs)
            try:
                return call(executor, *args, **kwargs)
            finally:
                check._end_launch()

        self._stack.callback(setattr, I.GridExecutor, "__call__", call)
        I.GridExecutor.__call__ = grid_call
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    # ------------------------------------------------------------ recording
    def _begin_launch(self, executor, args, kwargs):
        bound = dict(zip(inspect.getfullargspec(executor.fn).args, args), **kwargs)
        tensors = [(n, v) for n, v in bound.items() if isinstance(v, torch.Tensor)]
        # the bytes each tensor argument spans: [first element, last element + 1) of its view
        spans = sorted((t.data_ptr(), t.data_ptr() + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
                        * t.element_size()) for _, t in tensors if t.numel())
        self._launch = {"name": executor.fn.__name__, "program": None, "programs": [], "tensors": tensors, "seq": 0,
                        "lo": np.array([a for a, _ in spans], np.uint64), "hi": np.array([b for _, b in spans], np.uint64)}

    def _start_program(self, idx):
        L = self._launch
        if L is None:
            return
        if L["program"] is not None:
            self._finish_program(L["program"])
        L["program"] = _Program(idx)

    def _access(self, kind, by: np.ndarray):
        L = self._launch
        if L is None or L["program"] is None or by.size == 0:
            return
        p = L["program"]
        i = np.searchsorted(L["lo"], by, side="right").astype(np.int64) - 1
        outside = (i < 0) | (by >= L["hi"][np.maximum(i, 0)]) if L["lo"].size else np.ones(by.size, bool)
        if outside.any():
            self._report("outside every tensor argument", int(by[outside][0]), (p.idx,), int(outside.sum()))
        L["seq"] += 1
        p.events.append((L["seq"], kind, p.epoch, by))

    def _store(self, ptrs, value, mask):
        if self._launch is None or self._launch["program"] is None:
            return
        esize = _esize(ptrs)
        shape = np.asarray(ptrs.data).shape
        m = np.broadcast_to(np.asarray(mask.data), shape).reshape(-1)
        addr = np.asarray(ptrs.data).reshape(-1)[m]
        if addr.size > 1:   # one store, one element, two values?
            vals = np.broadcast_to(np.asarray(value.data), shape).reshape(-1)[m]
            bits = np.ascontiguousarray(vals).view(f"u{vals.dtype.itemsize}")
            order = np.argsort(addr, kind="stable")
            a, v = addr[order], bits[order]
            bad = (a[1:] == a[:-1]) & (v[1:] != v[:-1])
            if bad.any():
                self._report("one store, two values", int(a[1:][bad][0]), (self._launch["program"].idx,),
                             int(bad.sum()) * esize)
        self._access(WRITE, _bytes(ptrs.data, mask.data, esize))

    # ------------------------------------------------------------ checks
    def _finish_program(self, p: _Program):
        L = self._launch
        if p.events:
            seq = np.concatenate([np.full(e[3].size, e[0], np.int64) for e in p.events])
            kind = np.concatenate([np.full(e[3].size, e[1], np.int8) for e in p.events])
            epoch = np.concatenate([np.full(e[3].size, e[2], np.int64) for e in p.events])
            by = np.concatenate([e[3] for e in p.events])
            self._intra_program(p.idx, seq, kind, epoch, by)
            if L["name"] in self.without_barriers:
                self._intra_program(p.idx, seq, kind, np.zeros_like(epoch), by, mutant=True)
            flat = (p.idx, {k: np.unique(by[kind == k]) for k in (READ, WRITE, ATOMIC)})
        else:
            flat = (p.idx, {k: np.empty(0, np.uint64) for k in (READ, WRITE, ATOMIC)})
        L["programs"].append(flat)
        p.events.clear()

    def _intra_program(self, idx, seq, kind, epoch, by, mutant=False):
        """A read or a second store of an element the program stored earlier in the same
        barrier interval (epoch), in program order (seq)."""
        order = np.lexsort((seq, by, epoch))
        seq, kind, epoch, by = seq[order], kind[order], epoch[order], by[order]
        start = np.ones(by.size, bool)
        start[1:] = (by[1:] != by[:-1]) | (epoch[1:] != epoch[:-1])
        group = np.cumsum(start) - 1
        wseq = np.where(kind != READ, seq, np.iinfo(np.int64).max)
        first_w = np.minimum.reduceat(wseq, np.flatnonzero(start))[group]
        for what, hit in (("read after write, no barrier", (kind == READ) & (seq > first_w)),
                          ("write after write, no barrier", (kind == WRITE) & (seq > first_w))):
            if hit.any():
                self._report(what, int(by[hit][0]), (idx,), int(hit.sum()), mutant=mutant)

    def _end_launch(self):
        L = self._launch
        if L is None:
            return
        if L["program"] is not None:
            self._finish_program(L["program"])
        progs = L["programs"]
        grid = tuple(max(i[k] for i, _ in progs) + 1 for k in range(3)) if progs else ()
        self.launches.append((L["name"], grid))
        if len(progs) > 1:
            def pairs(kind):
                b = [d[kind] for _, d in progs]
                pid = np.concatenate([np.full(x.size, i, np.int64) for i, x in enumerate(b)])
                by = np.concatenate(b)
                o = np.argsort(by, kind="stable")
                return by[o], pid[o]
            wb, wp = pairs(WRITE)
            rb, rp = pairs(READ)
            ab, ap = pairs(ATOMIC)
            dup = np.flatnonzero(wb[1:] == wb[:-1])
            if dup.size:
                i = dup[0]
                self._report("cross-program write/write", int(wb[i]), (progs[wp[i]][0], progs[wp[i + 1]][0]), dup.size)
            for (sb, sp), (xb, xp), what in (((wb, wp), (rb, rp), "cross-program read/write"),
                                             ((wb, wp), (ab, ap), "cross-program atomic/plain"),
                                             ((ab, ap), (rb, rp), "cross-program atomic/plain")):
                if sb.size and xb.size:   # bytes of xb that sb holds for another program
                    j = np.clip(np.searchsorted(sb, xb), 0, sb.size - 1)
                    hit = (sb[j] == xb) & (sp[j] != xp)
                    if hit.any():
                        k = np.flatnonzero(hit)[0]
                        self._report(what, int(xb[k]), (progs[sp[j[k]]][0], progs[xp[k]][0]), int(hit.sum()))
        self._launch = None

    def _where(self, addr: int) -> str:
        for n, t in self._launch["tensors"]:
            base = t.data_ptr()
            if base <= addr < base + t.numel() * t.element_size():
                return f"{n}[{(addr - base) // t.element_size()}]"
        return f"address {addr:#x} (no tensor argument)"

    def _report(self, kind, addr, programs, count, mutant=False):
        """One finding per (launch, kind): the first place seen, every program involved, and
        the bytes summed."""
        seen = self._launch.setdefault("found", {})
        if (kind, mutant) in seen:
            f = seen[(kind, mutant)]
            f.programs = tuple(dict.fromkeys(f.programs + tuple(programs)))
            f.count += count
            return
        f = seen[(kind, mutant)] = Finding(kind, self._launch["name"], self._where(addr), tuple(programs), count)
        (self.findings_without_barriers if mutant else self.findings).append(f)
