"""The weights of the fused kernels, defined once: names, order, shapes, dtype, building.

`FoldedGMAWeights` is the contract between Python and the fused kernels (Triton and
CUDA): every tensor the stage ``qkv -> pre-projection`` needs, float32 (float64 for
float64 inputs), contiguous, in this order. The torch.library ops take them as one
``Tensor[] weights`` argument in field order, the launchers unpack them by name, and the
CUDA module receives their addresses in the same order (``csrc/gma_api.h``
``kWeightNames``; the loader checks the two lists agree). The same names are used in
Python, in the Triton kernels' arguments and in ``csrc/`` (``GmaParams``).

The depthwise filters (dw3/5/7, local_dw, crpe_w3/5/7) are stored **tap-major**, (k, k, c):
the c channels of one tap are contiguous, so a kernel reading one tap for a block of channels
reads one run of bytes (a warp's 32 channels: one 128-byte line), where the (c, k, k) layout of
the parameters spreads them over up to 32 lines (stride k² floats). `taps_first` /
`channels_first` convert.

Each aggregator BatchNorm j (segment j = 0..3) enters as a per-channel affine
``z * bn_scale[j] + bn_shift[j]``:

* eval: from the running statistics (`fold_eval`);
* training: from the batch statistics over q, k and v together (the training path
  computes them and calls `fold_batch_stats`), so the kernels are the same in both modes.

Computation of one token (docs/spec.md §1, s = C/5, d = C/10)::

    segment 0:    y = hardswish(t * bn_scale[0] + bn_shift[0])
    segment j>0:  y = hardswish((pw[j-1] @ DW_{2j+1}(t)) * bn_scale[j] + bn_shift[j])
    local:        L = hardswish(LN(local_pw @ DW3(t_seg4 of q, k, v)) * ln_weight + ln_bias)
    CRPE:         conv(V) with crpe_w3 (heads 0-1), crpe_w5 (heads 2-4), crpe_w7 (heads 5-7), + crpe_b

Derived weights are cached per layer and rebuilt only when a parameter or buffer changes
(keyed on each tensor's storage and version counter; forgotten after a torch.optim step of a tensor
they come from, since fused optimizers bypass the counters; `clear_weight_cache` for other writes
that bypass them, such as ``p.data.mul_(...)``).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from .weights import GMAHyper, GMAWeights, widths

Tensor = torch.Tensor


class FoldedGMAWeights(NamedTuple):
    """The fused kernels' weights, in the order the ops and the CUDA module take them."""

    bn_scale: Tensor    # (4, s)      BatchNorm j of segment j as an affine: scale
    bn_shift: Tensor    # (4, s)                                             and shift
    dw3: Tensor         # (3, 3, s)   depthwise of segment 1, tap-major: [ky][kx][channel]
    dw5: Tensor         # (5, 5, s)   depthwise of segment 2, tap-major
    dw7: Tensor         # (7, 7, s)   depthwise of segment 3, tap-major
    pw: Tensor          # (3, s, s)   pointwise of segments 1..3: [j-1][out][in]
    local_dw: Tensor    # (3, 3, 3s)  local branch depthwise, tap-major: channels [q seg4 | k seg4 | v seg4]
    local_pw: Tensor    # (s, 3s)     local branch pointwise 3s -> s
    ln_weight: Tensor   # (s)         local branch LayerNorm
    ln_bias: Tensor     # (s)
    crpe_w3: Tensor     # (3, 3, 2d)  CRPE of heads 0-1, tap-major
    crpe_w5: Tensor     # (5, 5, 3d)  CRPE of heads 2-4, tap-major
    crpe_w7: Tensor     # (7, 7, 3d)  CRPE of heads 5-7, tap-major
    crpe_b: Tensor      # (C')        CRPE biases, channel head*d + i


#: the names, in order (what the ops' ``weights`` list holds, and csrc's kWeightNames)
WEIGHT_NAMES: Tuple[str, ...] = FoldedGMAWeights._fields


def weight_shapes(C: int) -> Dict[str, Tuple[int, ...]]:
    """name -> shape of every folded weight for a module width C."""
    s, cp, d = widths(C)
    return {
        "bn_scale": (4, s), "bn_shift": (4, s),
        "dw3": (3, 3, s), "dw5": (5, 5, s), "dw7": (7, 7, s), "pw": (3, s, s),
        "local_dw": (3, 3, 3 * s), "local_pw": (s, 3 * s), "ln_weight": (s,), "ln_bias": (s,),
        "crpe_w3": (3, 3, 2 * d), "crpe_w5": (5, 5, 3 * d), "crpe_w7": (7, 7, 3 * d), "crpe_b": (cp,),
    }


def meta_weights(C: int) -> "FoldedGMAWeights":
    """Folded weights of width C as fp32 meta tensors (shapes only, nothing allocated): what the
    launchers' plans take when they are run to specialise or to count, not to launch."""
    shapes = weight_shapes(C)
    return FoldedGMAWeights(*(torch.empty(shapes[n], device="meta", dtype=torch.float32)
                              for n in FoldedGMAWeights._fields))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels accumulate in float32; float64 inputs keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_affine(w: GMAWeights, i: int, hp: GMAHyper, dtype) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm i as y = x * a + b (from its running statistics)."""
    a = w.bn_weight[i].to(dtype) * torch.rsqrt(w.bn_running_var[i].to(dtype) + hp.bn_eps)
    b = w.bn_bias[i].to(dtype) - w.bn_running_mean[i].to(dtype) * a
    return a, b


def taps_first(w: Tensor) -> Tensor:
    """A depthwise weight (c, k, k) -> its tap-major layout (k, k, c) (the folded weights')."""
    return w.permute(1, 2, 0)


def channels_first(w: Tensor) -> Tensor:
    """A tap-major depthwise weight (k, k, c) -> (c, k, k) (conv2d's layout, a view)."""
    return w.permute(2, 0, 1)


def fold_filters(w: GMAWeights, dtype) -> Dict[str, Tensor]:
    """The folded weights but the BatchNorm affine (every field of `FoldedGMAWeights` after bn_scale
    and bn_shift), in the kernels' layouts and `dtype`: what does not depend on the batch
    statistics. Differentiable. A training step builds them once (`training.prepare`): the
    statistics pass reads the depthwise and pointwise of them, the folded weights are them plus
    the BatchNorms."""
    c = lambda t: t.to(dtype).contiguous()
    # (c, 1, k, k) parameter -> tap-major (k, k, c); squeeze, not t[:, 0]: a select's backward
    # allocates a zero tensor and copies into it (2 kernels per weight and step), a squeeze's is a view
    dw = lambda t: c(taps_first(t.squeeze(1)))
    return dict(
        dw3=dw(w.dw_weight[0]), dw5=dw(w.dw_weight[1]), dw7=dw(w.dw_weight[2]),
        pw=c(torch.stack([p.flatten(1) for p in w.pw_weight])),
        local_dw=dw(w.local_dw_weight), local_pw=c(w.local_pw_weight.flatten(1)),
        ln_weight=c(w.local_ln_weight), ln_bias=c(w.local_ln_bias),
        crpe_w3=dw(w.crpe_weight[0]), crpe_w5=dw(w.crpe_weight[1]), crpe_w7=dw(w.crpe_weight[2]),
        crpe_b=c(torch.cat(list(w.crpe_bias))),
    )


def _build(w: GMAWeights, bn_scale: Tensor, bn_shift: Tensor, dtype,
           filters: Optional[Dict[str, Tensor]] = None) -> FoldedGMAWeights:
    """The folded weights: BatchNorm affine (bn_scale, bn_shift) and `fold_filters` (given, or built)."""
    c = lambda t: t.to(dtype).contiguous()
    return FoldedGMAWeights(bn_scale=c(bn_scale), bn_shift=c(bn_shift),
                            **(fold_filters(w, dtype) if filters is None else filters))


def fold_eval(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype = torch.float32) -> FoldedGMAWeights:
    """Eval mode: BatchNorms from their running statistics (no caching, no autograd)."""
    with torch.no_grad():
        aff = [bn_affine(w, i, hp, dtype) for i in range(4)]
        return _build(w, torch.stack([a for a, _ in aff]), torch.stack([b for _, b in aff]), dtype)


def fold_batch_stats(w: GMAWeights, mean: Tensor, var: Tensor, hp: GMAHyper,
                     dtype: torch.dtype = torch.float32,
                     filters: Optional[Dict[str, Tensor]] = None) -> FoldedGMAWeights:
    """Training mode: BatchNorms from batch statistics mean, var (4, s) (biased variance);
    filters: `fold_filters(w, dtype)` when already built."""
    gamma = torch.stack(list(w.bn_weight)).to(dtype)
    beta = torch.stack(list(w.bn_bias)).to(dtype)
    scale = gamma * torch.rsqrt(var.to(dtype) + hp.bn_eps)
    return _build(w, scale, beta - mean.to(dtype) * scale, dtype, filters)


# ---------------------------------------------------------------- caching
#: owner -> {tag: (stamp, value)}: the derived weights of each owner (a GMA layer's qkv weight, a
#: BatchNorm folded into its convolution), held by the owner's identity and weakly: an entry dies with
#: its owner, and nothing is stored on the owner itself (a model pickles and deep-copies as without it)
_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def capturing() -> bool:
    """Is the current CUDA stream being captured into a CUDA graph? Nothing is cached then: a
    cache hit would bake the cached tensor's address into the graph (replays would miss later
    weight updates, and read freed memory once the entry is rebuilt), and a miss would cache a
    tensor whose kernels were only recorded, not run."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def cache_stamp(tensors) -> tuple:
    """What a cached value derived from `tensors` is valid for: each tensor's storage (by
    identity, through a weak reference: the CUDA caching allocator hands a freed storage's
    address to the next tensor, so a pointer can match a different tensor), offset, version
    counter (in-place updates bump it), dtype and device."""
    return tuple((weakref.ref(t.untyped_storage()), t.storage_offset(), t._version, t.dtype, t.device)
                 for t in tensors)


def stamp_matches(stamp: tuple, tensors) -> bool:
    """Do `tensors` still match `cache_stamp`'s record of them?"""
    if len(stamp) != len(tensors):
        return False
    for (ref, offset, version, dtype, device), t in zip(stamp, tensors):
        if (version != t._version or offset != t.storage_offset() or dtype != t.dtype or device != t.device
                or ref() is not t.untyped_storage()):
            return False
    return True


def cached_for(owner: object, tag: object, tensors, build: Callable[[], object]):
    """build(), kept under (owner, tag) while `tensors` match the stamp it was built from. A miss
    drops the owner's entries made from other tensors (before a .to(), a dtype change or an update):
    they can never hit again, and would hold memory (on the old device) until their tag is rebuilt."""
    entries = _DERIVED.get(owner)
    if entries is None:
        entries = _DERIVED.setdefault(owner, {})
    hit = entries.get(tag)
    if hit is not None and stamp_matches(hit[0], tensors):
        return hit[1]
    # the stamp is taken before build(): a write that lands while build() reads the tensors (another thread's
    # load_state_dict or EMA update) leaves a stamp that no longer matches, so the next call rebuilds instead
    # of hitting a value made from the old weights under the new versions
    stamp = cache_stamp(tensors)
    for k, (old, _) in list(entries.items()):   # a snapshot: another thread may insert or sweep meanwhile
        if not stamp_matches(old, tensors):
            entries.pop(k, None)
    value = build()
    entries[tag] = (stamp, value)
    return value


def _clear_after_optimizer_step(optimizer, args, kwargs) -> None:
    """torch.optim's fused optimizers (fused=True: Adam, AdamW, SGD) update the parameters without bumping
    their version counters (measured on CPU, torch 2.13), as may an optimizer writing through kernels of its
    own: after any optimizer's step, the cached folds made from a tensor it steps are forgotten (a model
    trained in eval mode, a linear probe or frozen-BatchNorm fine-tuning, evaluated between steps); the others
    stay (a distillation teacher, a served model beside the trained one). Nothing is cached while training in
    training mode, so this costs nothing there."""
    if not _DERIVED:
        return
    stepped = {id(p.untyped_storage()) for group in optimizer.param_groups for p in group["params"]}
    for _, entries in list(_DERIVED.items()):
        for tag, (stamp, _) in list(entries.items()):
            if any(id(ref()) in stepped for ref, *_ in stamp):   # (a dead storage's ref() is None: not stepped)
                entries.pop(tag, None)


register_optimizer_step_post_hook(_clear_after_optimizer_step)


def clear_weight_cache(module: Optional[torch.nn.Module] = None) -> None:
    """Forget the cached derived weights (the folded GMA weights, the BatchNorms folded into the
    stem and patch-embedding convolutions), of every module, or of `module` and its submodules;
    they are rebuilt at the next eval-mode call. Needed only after a write the version counters do
    not see: through ``.data`` (``p.data.mul_(...)``), NumPy, DLPack or a kernel of one's own.
    ``GroupMixAttention.train()`` / ``.eval()`` (so ``model.train()`` / ``model.eval()``) call it."""
    if module is None or not _DERIVED:   # (nothing cached: training, or no eval call yet)
        _DERIVED.clear()
        return
    for m in module.modules():
        _DERIVED.pop(m, None)
        for p in m.parameters(recurse=False):
            _DERIVED.pop(p, None)


def cached_derived(w: GMAWeights, tag: object, build: Callable[[], object]):
    """Return build() for these weights, recomputed only when a tensor of w changes.

    The key is every tensor's storage (identity), version counter, dtype and device
    (`cache_stamp`: in-place updates such as optimizer steps and load_state_dict bump the
    version; writes through ``.data`` do not, see `clear_weight_cache`), held per layer (its qkv
    weight, `cached_for`). Under torch.compile nothing is cached: the compiled graph owns its
    constants; nor under torch.jit.trace (the trace must record the folding, and its sanity check
    compares two traces); nor during a CUDA graph capture (`capturing`: the graph records the
    folding and reads the parameters in place). Nor for inference tensors (a model built under
    torch.inference_mode): they keep no version counter.
    """
    if _is_compiling() or torch.jit.is_tracing() or capturing() or torch._C._are_functorch_transforms_active():
        return build()   # (under vmap / grad the tensors may be functorch wrappers: no storage, no version)
    tensors = list(w.tensors())
    if any(t.is_inference() for t in tensors):
        return build()
    return cached_for(w.qkv_weight, tag, tensors, build)


def folded_weights(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype) -> FoldedGMAWeights:
    """Cached `fold_eval` in the compute dtype for inputs of `dtype`."""
    cd = compute_dtype(dtype)
    return cached_derived(w, ("folded", cd, hp), lambda: fold_eval(w, hp, cd))


def update_running_stats(w: GMAWeights, hp: GMAHyper, mean: Tensor, var: Tensor, n) -> None:
    """nn.BatchNorm2d's running-statistics update of the 4 aggregator BatchNorms from the batch
    mean and biased variance (4, s) over n values per channel: num_batches_tracked += 1, then
    momentum (or 1 / num_batches_tracked when momentum is None) towards the mean and the
    unbiased variance; BatchNorms without running statistics are skipped. Every backend
    that trains calls this one function. With a momentum the buffers move by multi-tensor
    (``_foreach``) ops: on a GPU 2 kernels a layer where one per buffer and counter were 12."""
    with torch.no_grad():
        unbiased = var * (n / (n - 1))  # n >= 3 (3B images)
        tracked = [i for i in range(4) if w.bn_running_mean[i] is not None]  # else track_running_stats=False
        counters = [w.bn_num_batches_tracked[i] for i in tracked if w.bn_num_batches_tracked[i] is not None]
        if counters:
            torch._foreach_add_(counters, 1)
        running = [w.bn_running_mean[i] for i in tracked] + [w.bn_running_var[i] for i in tracked]
        batch = [mean[i] for i in tracked] + [unbiased[i] for i in tracked]
        if hp.bn_momentum is not None:
            weights = [hp.bn_momentum] * len(running)
        else:   # cumulative average: each BatchNorm its own 1 / num_batches_tracked
            weights = [1.0 / float(w.bn_num_batches_tracked[i].item()) for i in tracked] * 2
        if any(r.dtype in (torch.float16, torch.bfloat16) for r in running):
            # 16-bit buffers (a model.half() in training): blended in fp32 and rounded once, as
            # nn.BatchNorm2d does; an fp16 batch variance over 65504 must not become inf first
            for r, b, m in zip(running, batch, weights):
                r.copy_(r.float().lerp_(b.float(), m))
            return
        batch = [b.to(r.dtype) for r, b in zip(running, batch)]
        if hp.bn_momentum is not None:
            if running:
                torch._foreach_lerp_(running, batch, hp.bn_momentum)
            return
        for r, b, m in zip(running, batch, weights):
            r.lerp_(b, m)
