"""Functional API: `group_mix_attention(x, size, weights, ..., backend=None)`.

Validates the inputs, describes the call as a `GMAProblem`, lets dispatch pick (or
check) a backend, runs it, and optionally checks the result against the reference.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ._env import env_flag
from ._tracing import constant_under_compile, cuda_capability
from ._validation import check_dim, check_same_device_dtype, check_tokens
from .backends import Backend, GMAProblem, get_backend, select_backend
from .backends.base import needs_grad
from .distributed import resolve_group
from .weights import (CRPE_WINDOWS, NUM_HEADS, SEGMENT_KERNELS, GMAHyper, GMAWeights, collapse4, default_scale,
                      per_bn, widths)

Tensor = torch.Tensor


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """autocast's dtype when autocast is on for x's device, else None."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError):  # older torch, or a device type autocast does not know
        pass
    return None


def _capability(x: Tensor):
    """(major, minor) of x's CUDA device, None elsewhere (cached by torch)."""
    if not x.is_cuda:
        return None
    return cuda_capability(x.device.index if x.device.index is not None else torch.cuda.current_device())


def check_weights(weights, num_heads: int = NUM_HEADS) -> GMAWeights:
    """The functional API's `weights` argument: a `GMAWeights` whose tensors have the shapes
    of one layer of width C = weights.dim (TypeError / ValueError saying what to pass)."""
    how = ("pass a gmf_kernels.GMAWeights: `GroupMixAttention(dim, ...).gma_weights()` of a module "
           "(load a state_dict into the module first: module.load_state_dict(sd))")
    if weights is None:
        raise TypeError(f"weights is None: {how}")
    if not isinstance(weights, GMAWeights):
        kind = "a state_dict (a Mapping)" if isinstance(weights, Mapping) else type(weights).__name__
        if isinstance(weights, nn.Module):
            kind, how = type(weights).__name__, "pass module.gma_weights(), or call the module itself"
        raise TypeError(f"weights must be a GMAWeights, got {kind}: {how}")
    if not isinstance(weights.qkv_weight, Tensor) or weights.qkv_weight.dim() != 2:
        raise TypeError(f"weights.qkv_weight must be a 2-D tensor (3C, C), got "
                        f"{_describe(weights.qkv_weight)}: {how}")
    C = weights.dim
    check_dim(C, num_heads)
    for field, expected in weight_shapes(C, num_heads, weights.qkv_bias is not None,
                                         weights.proj_bias is not None).items():
        value = getattr(weights, field)
        if isinstance(expected, list) and not isinstance(value, (tuple, list)):
            raise TypeError(f"weights.{field} must be a tuple of {len(expected)} tensors {expected}, "
                            f"got {_describe(value)}")
        values = value if isinstance(expected, list) else [value]
        shapes = expected if isinstance(expected, list) else [expected]
        if len(values) != len(shapes) or any(not isinstance(t, Tensor) or tuple(t.shape) != s
                                             for t, s in zip(values, shapes) if s is not None):
            got = [_describe(t) for t in values] if isinstance(expected, list) else _describe(value)
            raise ValueError(f"weights.{field}: expected shape {expected} for a layer of width C={C} "
                             f"(from qkv_weight {tuple(weights.qkv_weight.shape)}), got {got}")
    return weights


def _describe(t) -> str:
    return f"tensor {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def weight_shapes(C: int, num_heads: int, qkv_bias: bool, proj_bias: bool = True) -> dict:
    """field of GMAWeights -> shape (a list of shapes for the per-branch tuples; None: any or absent)."""
    s, _, d = widths(C, num_heads)
    return {
        "qkv_weight": (3 * C, C), "qkv_bias": (3 * C,) if qkv_bias else None,
        "proj_weight": (C, C), "proj_bias": (C,) if proj_bias else None,
        "bn_weight": [(s,)] * 4, "bn_bias": [(s,)] * 4, "bn_running_mean": [(s,)] * 4,
        "bn_running_var": [(s,)] * 4, "bn_num_batches_tracked": [None] * 4,
        "dw_weight": [(s, 1, k, k) for k in SEGMENT_KERNELS], "pw_weight": [(s, s, 1, 1)] * 3,
        "local_dw_weight": (3 * s, 1, 3, 3), "local_pw_weight": (s, 3 * s, 1, 1),
        "local_ln_weight": (s,), "local_ln_bias": (s,),
        "crpe_weight": [(n * d, 1, k, k) for k, n in CRPE_WINDOWS],
        "crpe_bias": [(n * d,) for _, n in CRPE_WINDOWS],
    }


def check_finite_inputs(x: Tensor, w: GMAWeights) -> None:
    """check=True: a non-finite input is the input's fault, not the backend's; say so before
    comparing (the reference propagates NaN/Inf too, so no comparison could judge the backend)."""
    bad = (~torch.isfinite(x.detach())).sum().item()
    if bad:
        raise ValueError(f"check=True: the input x contains {bad} non-finite value(s) (NaN/Inf) of {x.numel()}; "
                         f"the output cannot be checked against the reference. The input is at fault, not the "
                         f"backend: find where the NaN/Inf comes from (e.g. torch.autograd.detect_anomaly, "
                         f"or the previous layer)")
    for name, value in w._asdict().items():
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                where = f"{name}[{i}]" if isinstance(value, tuple) else name
                raise ValueError(f"check=True: the layer's weights.{where} contain non-finite values (NaN/Inf); "
                                 f"the output cannot be checked against the reference. The weights are at "
                                 f"fault, not the backend")


def make_problem(x: Tensor, size: Sequence[int], w: GMAWeights, hp: GMAHyper, training) -> GMAProblem:
    """Validate and describe one call (`training`: a bool, or one per aggregator BatchNorm)."""
    check_dim(w.dim, hp.num_heads)
    B, N, H, W = check_tokens(x, size, w.dim)
    autocast = _autocast_dtype(x)
    tensors = list(w.tensors())
    check_same_device_dtype(x, tensors, check_dtype=False)
    # under autocast the parameters keep their own dtype and the ops cast
    odd = [t for t in tensors if t.is_floating_point() and t.dtype != x.dtype] if autocast is None else None
    if odd:
        # torch's norms take fp16 / bf16 inputs with fp32 parameters and buffers, as upstream's
        # nn.BatchNorm2d / nn.LayerNorm do (model.half() then the norms .float(): apex O2's keep_batchnorm_fp32)
        norms = set(map(id, (*w.bn_weight, *w.bn_bias, *w.bn_running_mean, *w.bn_running_var,
                             w.local_ln_weight, w.local_ln_bias)))
        fp32_norms_ok = x.dtype in (torch.float16, torch.bfloat16)
        check_same_device_dtype(x, [t for t in odd if not (
            fp32_norms_ok and id(t) in norms and t.dtype == torch.float32)])
    # autocast computes every floating input but float64 in its dtype
    dtype = autocast if autocast is not None and x.dtype != torch.float64 else x.dtype
    uniform = not any(isinstance(v, tuple) for v in (training, hp.bn_eps, hp.bn_momentum, hp.bn_process_group))
    groups = hp.bn_process_group if isinstance(hp.bn_process_group, tuple) else (hp.bn_process_group,)
    return GMAProblem(B=B, H=H, W=W, dim=w.dim, num_heads=hp.num_heads, dtype=dtype,
                      device_type=x.device.type, device_index=x.device.index if x.is_cuda else None,
                      device_capability=_capability(x), training=bool(any(training) if isinstance(training, tuple) else training),
                      needs_grad=needs_grad(x, w), uniform_bn=uniform, sync_bn=any(g is not None for g in groups),
                      functorch=not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active())


def group_mix_attention(
    x: Tensor,
    size: Sequence[int],
    weights: GMAWeights,
    *,
    num_heads: int = 8,
    scale: Optional[float] = None,
    training: bool = False,
    bn_eps: float = 1e-5,
    bn_momentum: Optional[float] = 0.1,
    ln_eps: float = 1e-5,
    backend: Optional[str] = None,
    check: Optional[bool] = None,
    process_group=None,
) -> Tensor:
    """Group-Mix Attention (docs/spec.md §1) on tokens x (B, N, C) of an (H, W) grid.

    Args:
        x: (B, N, C) tokens, N = H*W, row-major; C a multiple of 10.
        size: (H, W).
        weights: the layer's tensors (`GMAWeights`; `GroupMixAttention.gma_weights()`).
        scale: multiplier of the factorized attention; default (C // num_heads) ** -0.5.
        training: BatchNorm batch statistics over q, k, v together (updates running stats);
            a 4-tuple gives each aggregator BatchNorm its own mode (reference backend only),
            as may bn_eps and bn_momentum.
        backend: "auto"/None (the fastest that can run this input), or one of
            "cuda", "triton", "torch", "reference". An explicit backend that cannot run
            the input raises ValueError with its reasons; none fitting raises
            NotImplementedError listing every backend's reasons.
        check: also run the reference and raise if the results disagree beyond the
            dtype's tolerance (default: environment variable GMF_CHECK=1).
        process_group: a torch.distributed process group (e.g. torch.distributed.group.WORLD):
            in training mode the BatchNorm batch statistics are then taken over the images of
            every rank in it, as upstream's SyncBatchNorm does (forward all-reduces sum, sum
            of squares and count; backward the two gradient sums). Every rank must call.
            Ignored (plain BatchNorm) in eval mode, without an initialised process group, or
            for a group of one rank. Every backend that trains (the fused ones all-reduce in
            their statistics pass and backward).
    Returns:
        (B, N, C), the dtype of x (or autocast's).
    """
    check_weights(weights, num_heads)
    hp = GMAHyper(num_heads=num_heads, scale=default_scale(weights.dim, num_heads) if scale is None else scale,
                  bn_eps=bn_eps, bn_momentum=bn_momentum, ln_eps=ln_eps, bn_process_group=process_group)
    return run_attention(x, size, weights, hp, training, backend, check)


def sync_groups(groups, training):
    """The process group each aggregator BatchNorm all-reduces its batch statistics over
    (collapsed to one value when the four agree): only BatchNorms in training mode, and None
    where there is nothing to synchronise (no group, torch.distributed not initialised, or
    one rank), so that such a layer runs exactly as plain BatchNorm."""
    groups = tuple(groups) if isinstance(groups, list) else groups
    if groups is None or (isinstance(groups, tuple) and all(g is None for g in groups)):
        return None
    return collapse4(resolve_group(per_bn(groups, i)) if per_bn(training, i) else None for i in range(4))


_PROBLEM_FIELDS = tuple(f.name for f in dataclasses.fields(GMAProblem))


@constant_under_compile
def _backend_name_for(values: tuple, backend: Optional[str]) -> str:
    """`select_backend` on a problem given as its field values, run eagerly at trace time."""
    return select_backend(GMAProblem(**dict(zip(_PROBLEM_FIELDS, values))), backend).name


#: Fields a backend's choice may not depend on: under torch.compile(dynamic=True) they are
#: symbolic, and the choice must neither specialise the graph on them nor pass them out of it.
#: While tracing they are given as 1 (the ops check the real sizes at run time, so a size a
#: backend cannot take still raises; tests/test_whole_model_compile.py checks that no backend
#: decides on them below the Triton training kernels' limits, triton_kernels/config.MAX_TRAIN_BATCH
#: and MAX_TRAIN_ELEMENTS, which their launchers also check at run time).
SIZE_FIELDS = ("B", "H", "W")


def dispatch(problem: GMAProblem, backend: Optional[str]) -> Backend:
    """`select_backend(problem, backend)`. While torch.compile traces, the choice is made once,
    eagerly, outside the graph: backends probe files, load modules under locks and read the
    environment to say whether they can run, which Dynamo cannot trace (each was a graph
    break per layer). The graph keeps the choice; Dynamo's guards on the inputs' shapes,
    dtypes, devices and grad mode re-trace, and so choose again, when those change."""
    if torch.compiler.is_compiling():
        values = tuple(1 if f in SIZE_FIELDS else getattr(problem, f) for f in _PROBLEM_FIELDS)
        return get_backend(_backend_name_for(values, backend))
    if torch.onnx.is_in_onnx_export():
        # the legacy (TorchScript) ONNX exporter needs convolution weights of known shape, which
        # the torch backend builds at run time, and an ONNX graph holds standard operators only
        # (no fused kernel): whatever backend is named, export upstream's computation
        return get_backend("reference")
    return select_backend(problem, backend)


def run_attention(x: Tensor, size: Sequence[int], w: GMAWeights, hp: GMAHyper, training,
                  backend: Optional[str], check: Optional[bool] = None, linears=None) -> Tensor:
    """The layer's computation on the dispatched backend; `linears`: (qkv, proj) callables in place of the
    weights' linears (`Backend.forward`)."""
    if isinstance(training, (tuple, list)):
        training = collapse4([bool(t) for t in training])
    else:
        training = bool(training)      # 1 / numpy bools alike on every backend (F.batch_norm takes a bool only)
    hp = hp._replace(bn_eps=collapse4(hp.bn_eps) if isinstance(hp.bn_eps, (tuple, list)) else hp.bn_eps,
                     bn_momentum=(collapse4(hp.bn_momentum) if isinstance(hp.bn_momentum, (tuple, list))
                                  else hp.bn_momentum),
                     bn_process_group=sync_groups(hp.bn_process_group, training))
    problem = make_problem(x, size, w, hp, training)
    chosen = dispatch(problem, backend)
    if check is None:
        check = env_flag("GMF_CHECK")
    # (an empty batch is not checked, unless its statistics are synchronised: the check's reference joins the
    # all-reduces too, so every rank must run it)
    if check and chosen.name != "reference" and (problem.B > 0 or problem.sync_bn):
        check_finite_inputs(x, w)
        from .selfcheck import run_checked
        return run_checked(chosen, x, (problem.H, problem.W), w, hp, training, linears)
    return chosen.forward(x, (problem.H, problem.W), w, hp, training, linears)
