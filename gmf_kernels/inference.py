"""The recommended way to run a whole model fast: `optimize_for_inference`.

    model = gmf.create_model("groupmixformer_s", checkpoint="groupmixformer_small.pth")
    fast = gmf.optimize_for_inference(model, batch_size=8, device="cuda", dtype=torch.bfloat16)
    logits = fast(images)                 # compiles on the first call (per input shape)

What it does, in order:

1. the model in eval mode (its BatchNorms use running statistics: the stem and patch
   embedding BatchNorms fold into their convolutions, the aggregator ones into the GMA
   kernels' weights), moved to ``device`` / cast to ``dtype`` if given -- in place;
2. every `GroupMixAttention` on ``backend`` ("auto": per call, the tuning table's fastest
   backend that can run it, else the first in the declared order, `backends.DECLARED_ORDER`;
   `python -m gmf_kernels.info` says which can);
3. ``torch.compile(model, fullgraph=True, dynamic=False)`` with Inductor: one graph for the
   whole model (the fused GMA op is one node in it; LayerNorm + residual, GELU after fc1,
   CPE + residual and the folded BatchNorms are compiled around it), calls run under
   ``torch.inference_mode``;
4. the mode from the table ``gmf_kernels/data/inference_modes.json`` (data, not code): CUDA
   graphs (``reduce-overhead``) when ``batch_size`` is at most the table's threshold for the
   device and dtype -- small batches, where launching ~450 kernels per forward costs more host
   time than the GPU needs to run them -- else Inductor's default mode; plus the table's
   Inductor options (``freezing``: parameters become constants, so the BatchNorm folds and
   weight re-layouts are computed once at compile time, not every call).

The thresholds are estimates until a GPU measures them (``measured: false`` in the table;
`benchmarks/gpu_report.py` is to time the optimized model with and without CUDA graphs per
batch size and write the measured table). On a CPU there are no CUDA graphs.

Caveats: with ``freezing`` Inductor may fold weights into constants when it compiles, so
the compiled model is not promised to see later changes to them: call
`optimize_for_inference` again after changing them. (Measured on a CPU, torch 2.13: in-place
changes under ``torch.no_grad()`` to the head, a stem BatchNorm's running variance, a qkv
weight and an aggregator BatchNorm's running mean were all seen, without a recompile; not
checked on a GPU.) Each new input shape compiles (and,
with CUDA graphs, records) again: make one per batch size you serve. With CUDA graphs the
outputs are copied out of the graph's memory, so they stay valid after the next call.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .backends import check_backend_usable
from .modules import GroupMixAttention

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "inference_modes.json")


def load_mode_table(table: Union[None, str, os.PathLike, Mapping] = None) -> Dict[str, Any]:
    """The mode table: `table` itself (a mapping), read from a path, or the packaged one."""
    if isinstance(table, Mapping):
        data = dict(table)
    else:
        path = os.fspath(table) if table is not None else TABLE_PATH
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"inference mode table {path} not found"
                                    + (" (the package data is missing: reinstall gmf_kernels)"
                                       if table is None else "")) from None
    if not isinstance(data.get("devices"), Mapping):
        raise ValueError("inference mode table: expected a 'devices' mapping (see gmf_kernels/data/"
                         "inference_modes.json)")
    return data


def device_key(device: torch.device) -> tuple:
    """Table keys to try for a device, most specific first: ('sm_90', 'cuda') or ('cpu',)."""
    if device.type == "cuda":
        keys = []
        try:
            major, minor = torch.cuda.get_device_capability(device)
            keys.append(f"sm_{major}{minor}")
        except (RuntimeError, AssertionError):  # no driver: only the generic entry
            pass
        return tuple(keys) + ("cuda",)
    return (device.type,)


@dataclass(frozen=True)
class InferencePlan:
    """How `optimize_for_inference` compiles for one device, dtype and batch size, and why."""

    device: torch.device
    dtype: torch.dtype
    batch_size: Optional[int]
    cudagraphs: bool
    mode: str                      # "reduce-overhead" (CUDA graphs) or "default"
    inductor_options: Dict[str, Any] = field(default_factory=dict)
    table_entry: str = ""          # the table key used
    measured: bool = False         # the entry was measured (else an estimate)
    reason: str = ""

    def compile_kwargs(self) -> Dict[str, Any]:
        """Arguments of torch.compile for this plan (options carry the mode: freezing needs them)."""
        options = dict(torch._inductor.list_mode_options(self.mode, dynamic=False))
        options.update(self.inductor_options)
        return dict(backend="inductor", fullgraph=True, dynamic=False, options=options)


def inference_plan(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                   batch_size: Optional[int] = None, table=None, cudagraphs: Optional[bool] = None) -> InferencePlan:
    """The compile mode for a device, dtype and batch size, from the mode table (`cudagraphs`
    True/False overrides the table's threshold: what a measurement of both modes needs)."""
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    devices = load_mode_table(table)["devices"]
    keys = [k for k in device_key(device) if k in devices]  # most specific first
    if not keys:
        raise ValueError(f"the inference mode table has no entry for {device} (tried {list(device_key(device))}; "
                         f"it has {sorted(devices)})")
    dt = str(dtype).replace("torch.", "")
    # field by field, the most specific entry that sets it: an sm_XY entry measured for one dtype
    # keeps the generic entry's thresholds for the others and its Inductor options
    key = next((k for k in keys if dt in devices[k].get("cudagraphs_max_batch", {})), keys[0])
    entry = devices[key]
    limit = entry.get("cudagraphs_max_batch", {}).get(dt)
    measured = bool(entry.get("measured", False))
    inductor_options = {}
    for k in reversed(keys):
        inductor_options.update(devices[k].get("inductor_options", {}))
    how = "measured" if measured else "estimate"
    forced = cudagraphs
    if device.type != "cuda":
        cudagraphs, reason = False, f"no CUDA graphs on {device.type}"
    elif limit is None:
        cudagraphs, reason = False, f"table entry {key!r} sets no CUDA graph threshold for {dt}"
    elif batch_size is None:
        cudagraphs, reason = False, "batch size not given: CUDA graphs only for a known small batch"
    elif batch_size <= limit:
        cudagraphs, reason = True, f"batch {batch_size} <= {limit} ({key}, {dt}, {how}): launch-bound, CUDA graphs"
    else:
        cudagraphs, reason = False, f"batch {batch_size} > {limit} ({key}, {dt}, {how}): GPU-bound, no CUDA graphs"
    if forced is not None:
        if forced and device.type != "cuda":
            raise ValueError(f"cudagraphs=True needs a CUDA device, not {device}")
        reason = f"CUDA graphs {'on' if forced else 'off'} as asked (the table says: {reason})"
        cudagraphs = bool(forced)
    return InferencePlan(device=device, dtype=dtype, batch_size=batch_size, cudagraphs=cudagraphs,
                         mode="reduce-overhead" if cudagraphs else "default",
                         inductor_options=inductor_options, table_entry=key,
                         measured=measured, reason=reason)


def _clone_outputs(out):
    """Copies of the tensors in `out` (a tensor, or lists, tuples, namedtuples and mappings of them)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple: positional constructor
        return type(out)(*(_clone_outputs(o) for o in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_outputs(o) for o in out)
    if isinstance(out, Mapping):
        return {k: _clone_outputs(v) for k, v in out.items()}
    return out


class InferenceModel(nn.Module):
    """A model prepared by `optimize_for_inference`: calls run the compiled model under
    torch.inference_mode. `model` is the eager model (same parameters), `plan` the choice made.
    `compiler`: a torch.compile compiler backend (a callable) in place of inductor, compiled with the
    plan's other arguments (fullgraph, dynamic); it applies the plan's inductor options itself
    (`plan.compile_kwargs()["options"]`; benchmarks/throughput.py --compile-only)."""

    def __init__(self, model: nn.Module, plan: InferencePlan, compiled: bool = True,
                 compiler: Optional[Callable] = None):
        super().__init__()
        self.model = model
        self.plan = plan
        kwargs = plan.compile_kwargs()
        if compiler is not None:
            kwargs = {**{k: v for k, v in kwargs.items() if k != "options"}, "backend": compiler}
        # not a submodule: the compiled wrapper shares `model`'s parameters (one state_dict)
        object.__setattr__(self, "_run", torch.compile(model, **kwargs) if compiled else model)

    def extra_repr(self) -> str:
        p = self.plan
        opts = ", ".join(f"{k}={v}" for k, v in p.inductor_options.items())
        return (f"device={p.device}, dtype={str(p.dtype).replace('torch.', '')}, batch_size={p.batch_size}, "
                f"mode={p.mode!r}, options=({opts}), compiled={self._run is not self.model}: {p.reason}")

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """The compiled model on x (moved to the plan's device and dtype); further arguments are passed
        on as given (a bare GroupMixAttention's size (H, W))."""
        if x.device != self.plan.device and not (x.device.type == self.plan.device.type
                                                  and self.plan.device.index is None):
            x = x.to(self.plan.device)
        if x.is_floating_point() and x.dtype != self.plan.dtype:
            x = x.to(self.plan.dtype)
        with torch.inference_mode():
            if self.plan.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
                return _clone_outputs(self._run(x, *args, **kwargs))
            return self._run(x, *args, **kwargs)


def _model_device_dtype(model: nn.Module):
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


def optimize_for_inference(model: nn.Module, *, batch_size: Optional[int] = None,
                           device: Union[None, str, torch.device] = None, dtype: Optional[torch.dtype] = None,
                           backend: Optional[str] = "auto", compile: bool = True, table=None,
                           cudagraphs: Optional[bool] = None) -> InferenceModel:
    """Prepare `model` for fast inference and return it compiled (see the module docstring).

    Args:
        model: a GroupMixFormer, or any module holding GroupMixAttention layers. Changed in
            place: eval mode, `device`, `dtype`, `backend`.
        batch_size: the batch you will run; decides CUDA graphs (at most the table's threshold)
            or not. None: no CUDA graphs.
        device, dtype: move / cast the model (default: where and what it is). Floating inputs
            are cast to the model's dtype on the way in.
        backend: the GMA backend of every layer ("auto", "cuda", "triton", "torch", "reference").
        compile: False returns the prepared eager model in the same wrapper (for comparisons).
        table: another mode table (a mapping or a JSON path) instead of the packaged one.
        cudagraphs: True / False to force CUDA graphs on / off (None: the table decides); for
            measuring both modes (benchmarks/gpu_report.py).
    Returns:
        an `InferenceModel`; its `plan` says which mode was chosen and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # every argument checked before the model is touched: a refused call leaves it as it was
    backend = check_backend_usable(backend)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    if device is not None:
        torch.device(device)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    for m in model.modules():
        if isinstance(m, GroupMixAttention):
            m.set_backend(backend)
    dev, dt = _model_device_dtype(model)
    plan = inference_plan(dev, dt, batch_size, table, cudagraphs)
    return InferenceModel(model, plan, compiled=compile)
