"""Backend "torch": the fast pure-PyTorch formulation (CPU default, torch.compile's input).

Same function as the reference, in fewer and larger calls and without split/cat copies:

* `project_qkv`: the rows of the qkv weight are permuted (once, cached) so that the projection comes
  out **segment-major**: channels [seg0 q,k,v | seg1 q,k,v | ... | seg4 q,k,v]. Read as a
  channels-last image (a free view of the (B, N, 15s) tokens), every segment is then a
  contiguous channel range and no split/cat/permute is ever materialised.
* Segment 0 (identity, then its BatchNorm) is one elementwise op; segments 1-3 and the local
  branch each take ONE depthwise call over their 3s channels (q, k, v together) with their own
  kernel size (3x3, 5x5, 7x7, 3x3) on a channel slice of that image -- not one 7x7 call over
  all 15s channels, which spent 2.7x the multiply-adds on zero taps and on segment 0's identity.
* Each depthwise output is channels-last, so its (token, q/k/v) rows form a contiguous
  (B*N*3, s) matrix: the pointwise of segments 1-3 (BatchNorm folded, eval) is ONE addmm each
  with a (s, s) weight shared by q, k, v, and the local branch's 3s -> s ONE mm (measured on one
  CPU thread: ~3x faster than one batched matmul of 15 (s, s) blocks on strided rows).
* Factorized attention as two einsums on strided views; CRPE as ONE depthwise 7x7 call.
* Eager CPU inference (`_fast_inference`) takes `_inference_pre_projection`: the same steps
  written into one q|k|v buffer and the result with out= (no stack, permute or concat copies),
  the attention as per-image bmm over the heads (GroupMixFormer-T, batch 8, one thread:
  attention layers 1.2-1.8x upstream's).
* `linear`: the qkv and output linears (and, in the model, the MLP with its GELU fused)
  through oneDNN in CPU float32 inference.

In training mode the BatchNorms use batch statistics over q, k, v (3B images) from a
single var_mean over a view, and update the running statistics like nn.BatchNorm2d. With a
process group (upstream's SyncBatchNorm, `GMAHyper.bn_process_group`) the statistics of the
four BatchNorms come from ONE all-reduce of (sum, sum of squares, count) over the ranks, and
the backward all-reduces the two gradient sums once (`gmf_kernels/distributed.py`).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from ..distributed import sync_batch_stats
from ..folding import bn_affine, cached_derived, update_running_stats
from ..reference import local_layer_norm
from ..weights import GMAHyper, GMAWeights
from .base import Backend

Tensor = torch.Tensor


def _pad_to7(k: Tensor) -> Tensor:
    """(c, 1, k, k) -> (c, 1, 7, 7), zero-padded around the centre."""
    p = (7 - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p))


class _Packed(NamedTuple):
    seg0_scale: Tensor      # (s) segment 0's BatchNorm as an affine (eval), or None (training: no fold)
    seg0_shift: Tensor      # (s) or None
    dw: Tuple[Tensor, ...]  # 4 x (3s, 1, k, k): segments 1-3 (k = 3, 5, 7; shared by q, k, v) and the local 3x3
    pw_t: Tuple[Tensor, ...]  # 3 x (s, s): pointwise of segments 1-3, transposed (BatchNorm folded in eval)
    pw_bias: Tuple[Tensor, ...]  # 3 x (s), or None (training: no fold)
    local_pw_t: Tensor      # (3s, s): the local branch's pointwise 3s -> s, transposed
    crpe_w: Tensor          # (C', 1, 7, 7)
    crpe_b: Tensor          # (C')


def _segment_major(C: int, s: int, device) -> Tensor:
    """Row permutation taking upstream order (q|k|v, each seg0..4) to segment-major order."""
    return torch.arange(3 * C, device=device).view(3, 5, s).transpose(0, 1).reshape(-1)


def _segment_major_qkv(w: GMAWeights, dtype: torch.dtype):
    """The qkv weight and bias with their rows in segment-major order, in `dtype`."""
    perm = _segment_major(w.dim, w.dim // 5, w.qkv_weight.device)
    bias = None if w.qkv_bias is None else w.qkv_bias[perm].to(dtype)
    return w.qkv_weight[perm].to(dtype).contiguous(), bias


def _fast_inference(x: Tensor, w: GMAWeights, training: bool) -> bool:
    """Whether the pre-projection takes the eager inference path (`_inference_pre_projection`):
    eval mode, no autograd, no graph capture, a CPU tensor in float32 or float64 and no autocast
    (out= writes into views: the ops must keep the input's dtype)."""
    return (not training and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and not _needs_grad(x, w) and not _capturing())


def _pack(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype, fold_bn: bool) -> _Packed:
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(dtype).contiguous()
    pw = [p.to(cd).flatten(1) for p in w.pw_weight]                                  # 3 x (s, s) [out][in]
    if fold_bn:
        affine = [bn_affine(w, i, hp, cd) for i in range(4)]
        seg0_scale, seg0_shift = affine[0]
        pw = [affine[j + 1][0][:, None] * p for j, p in enumerate(pw)]
        pw_bias = tuple(cast(affine[j][1]) for j in (1, 2, 3))
    else:
        seg0_scale = seg0_shift = pw_bias = None
    return _Packed(cast(seg0_scale), cast(seg0_shift),
                   tuple(cast(k.repeat(3, 1, 1, 1)) for k in w.dw_weight) + (cast(w.local_dw_weight),),
                   tuple(cast(p.t()) for p in pw), pw_bias,
                   cast(w.local_pw_weight.to(cd).flatten(1).t()),
                   cast(torch.cat([_pad_to7(k.to(cd)) for k in w.crpe_weight])),
                   cast(torch.cat(list(w.crpe_bias)).to(cd)))


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_LINEAR = _onednn_linear_available()


def use_onednn_linear(x: Tensor, weight: Tensor, bias) -> bool:
    """oneDNN's linear for plain eager float32 inference on a CPU: no autograd (the op has no
    derivative), no graph capture (torch.compile, export and tracing record F.linear, which
    Inductor fuses itself), no autocast (F.linear then runs in its lower precision; the op
    would not), no other dtype or device."""
    if not _ONEDNN_LINEAR or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not _capturing()


def _capturing() -> bool:
    """Whether a graph is being captured (torch.compile, export, tracing, scripting, ONNX) or a functorch
    transform (vmap, grad, ...) runs: the eager paths' out= writes and oneDNN's op have no batching rule."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch._C._are_functorch_transforms_active())


def linear(x: Tensor, weight: Tensor, bias=None, gelu: bool = False) -> Tensor:
    """F.linear(x, weight, bias), then exact (erf) GELU when `gelu`.

    On a CPU in float32 inference this is ONE oneDNN call with the GELU fused into it
    (`torch.ops.mkldnn._linear_pointwise`, what Inductor itself calls on CPU): measured at
    batch 8 on one thread 10-35% faster than MKL's addmm for GroupMixFormer's shapes, and
    half the time of linear + GELU for the first stage's MLP (no second pass over the
    hidden activations). Same numbers up to float32 rounding."""
    if use_onednn_linear(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def saved_conv_input(img: Tensor) -> Tensor:
    """`img`, materialised when torch.compile traces it (else `img` itself).

    A convolution saves its input for backward. When that input is a view (e.g. the
    channels-last image view of tokens) and the sizes are symbolic (``dynamic=True``),
    Inductor sorts the strides of the saved view without its shape environment and fails
    with ``cannot determine truth value of Relational: 120*s4 < 120`` (pytorch#185510: the
    view is an output of the forward graph, and plain sympy cannot order ``W*C`` and ``C``).
    A real elementwise op (``* 1``, exact) makes the saved tensor a buffer, whose strides
    Inductor takes as they are; a ``clone`` would be removed as a no-op first. Without gradients the
    view's symbolic strides fail too (``ValueRangeError: Invalid ranges [0:-1]`` lowering the convolution,
    once a new image size makes Dynamo recompile with dynamic sizes: a detector's inputs), so inference
    materialises it as well: under Dynamo a size cannot be told symbolic (isinstance(d, torch.SymInt) is
    False there). The cost, estimated (not measured): one more write of the tokens per call site, fused into
    the op that makes them, under 1 % of GroupMixFormer-S's compiled forward at batch 256."""
    if torch.compiler.is_compiling():
        return img * 1
    return img


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _needs_grad(t: Tensor, w: GMAWeights) -> bool:
    return torch.is_grad_enabled() and (t.requires_grad or any(p.requires_grad for p in w.tensors()))


def _batch_norm_train(z: Tensor, w: GMAWeights, hp: GMAHyper) -> Tensor:
    """Training BatchNorm of segments 0-3 on z (B, N, 4, 3, s): statistics over B, N and q/k/v,
    and over every rank of hp.bn_process_group when one is set (SyncBatchNorm semantics).
    Computed in fp32 for fp16/bf16 z, as F.batch_norm does: an fp16 variance overflows above 65504
    (rsqrt(inf) = 0 would then give every token beta, and inf running variances)."""
    dtype = z.dtype
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    z = z.to(cd)
    if hp.bn_process_group is None:
        var, mean = torch.var_mean(z, dim=(0, 1, 3), unbiased=False)              # (4, s)
        stat_mean, stat_var, n = mean, var, z.numel() // mean.numel()             # n >= 3 (3B images)
    else:
        # ONE all-reduce of (sum, sum of squares, count) in forward and, through autograd,
        # ONE of the two gradient sums in backward: SyncBatchNorm's collectives, for all 4 BNs
        stat_mean, stat_var, n = sync_batch_stats(z, (0, 1, 3), hp.bn_process_group)  # float64; n global
        mean, var = stat_mean.to(cd), stat_var.to(cd)
    gamma = torch.stack(list(w.bn_weight)).to(cd)
    beta = torch.stack(list(w.bn_bias)).to(cd)
    y = ((z - mean[:, None]) * (torch.rsqrt(var + hp.bn_eps) * gamma)[:, None] + beta[:, None]).to(dtype)
    update_running_stats(w, hp, stat_mean, stat_var, n)
    return y


def _cached_pack(w: GMAWeights, hp: GMAHyper, dtype: torch.dtype) -> _Packed:
    """The eval packing (BatchNorms folded), cached per layer."""
    return cached_derived(w, ("torch-packed", dtype, hp), lambda: _no_grad(_pack, w, hp, dtype, True))


def _depthwise_rows(img: Tensor, pk: _Packed, s: int):
    """The depthwise convolutions of segments 1-3 and the local branch on their 3s channels
    of the channels-last image `img` (each its own kernel size, not one 7x7 over all 15s),
    each as (B*N, 3s) rows: the output is channels-last, so every token is a row."""
    B, _, H, W = img.shape
    return [F.conv2d(saved_conv_input(img[:, 3 * s * (j + 1):3 * s * (j + 2)]), k, None,
                     padding=k.shape[-1] // 2, groups=3 * s).permute(0, 2, 3, 1).reshape(B * H * W, 3 * s)
            for j, k in enumerate(pk.dw)]


def _local_branch(rows: Tensor, pk: _Packed, w: GMAWeights, hp: GMAHyper) -> Tensor:
    """The local branch after its depthwise: 3s -> s pointwise (ONE mm), LayerNorm, hardswish."""
    return F.hardswish(local_layer_norm(torch.mm(rows, pk.local_pw_t), w, hp))


def torch_pre_projection(t: Tensor, size, w: GMAWeights, hp: GMAHyper, training: bool) -> Tensor:
    """Segment-major qkv t (B, N, 15s) -> pre-projection tokens (B, N, C)."""
    if _fast_inference(t, w, training):
        return _inference_pre_projection(t, size, w, hp)
    B, N, C3 = t.shape
    H, W = size
    s = C3 // 15
    cp = 4 * s
    d = cp // hp.num_heads
    if training or _needs_grad(t, w):
        pk = _pack(w, hp, t.dtype, fold_bn=not training)  # differentiable: rebuilt every call
    else:
        pk = _cached_pack(w, hp, t.dtype)

    img = t.view(B, H, W, 15 * s).permute(0, 3, 1, 2)                              # channels-last view
    # the pointwise of segments 1-3 as ONE matmul each of (B*N*3, s) rows (token, q/k/v)
    dws = _depthwise_rows(img, pk, s)
    segs = [t[..., :3 * s].unflatten(-1, (3, s))]                                  # segment 0: identity
    if pk.seg0_scale is not None:
        segs[0] = torch.addcmul(pk.seg0_shift, segs[0], pk.seg0_scale)             # its BatchNorm (eval)
    for j in range(3):
        rows = dws[j].view(B * N * 3, s)
        mixed = torch.mm(rows, pk.pw_t[j]) if pk.pw_bias is None else torch.addmm(pk.pw_bias[j], rows, pk.pw_t[j])
        segs.append(mixed.view(B, N, 3, s))
    seg = torch.stack(segs, dim=2)                                                 # (B, N, 4, 3, s)
    if training:
        seg = _batch_norm_train(seg, w, hp)
    P = F.hardswish(seg)                                                           # (B, N, 4, 3, s)
    loc = _local_branch(dws[3], pk, w, hp).view(B, N, s)

    # heads: segment j holds heads 2j, 2j+1 -> view (B, N, 4, 2, d)
    Q = P[:, :, :, 0].unflatten(-1, (2, d))
    K = P[:, :, :, 1].unflatten(-1, (2, d))
    V = P[:, :, :, 2].unflatten(-1, (2, d))
    Ks = K.softmax(dim=1)
    KV = torch.einsum("bnjti,bnjtk->bjtik", Ks, V)
    E = torch.einsum("bnjti,bjtik->bnjtk", Q, KV)
    v_img = P[:, :, :, 2].reshape(B, H, W, cp).permute(0, 3, 1, 2)
    conv_v = F.conv2d(saved_conv_input(v_img), pk.crpe_w, pk.crpe_b, padding=3, groups=cp)
    conv_v = conv_v.permute(0, 2, 3, 1).reshape(B, N, 4, 2, d)
    A = (hp.scale * E + Q * conv_v).reshape(B, N, cp)
    return torch.cat([A, loc], dim=-1)


def _inference_pre_projection(t: Tensor, size, w: GMAWeights, hp: GMAHyper) -> Tensor:
    """`torch_pre_projection` in eager inference (`_fast_inference`), without its copies: the
    results are written where the next step reads them (out=), not stacked, permuted or
    concatenated.

    Layout: ONE buffer z (3, B, N, 4, s) = q | k | v, each a contiguous (B, N, C') tensor whose
    channels are head-major (segment j holds heads 2j, 2j+1, as A's channels are), so

    * each pointwise writes its (B*N, s) rows straight into its segment's slice (leading
      dimension 4s), hardswish runs once in place over all of z;
    * V is a channels-last image for the CRPE conv as it is;
    * per image, K^T V and Q (K^T V) are batched over the heads on strided views (one bmm each
      per image, no copy), the scale applied to the (d, d) products;
    * A = Q * CRPE(V) + Q (scale K^T V) is written into the first C' channels of the result and
      the local branch into the last s, so the output projection reads one (B, N, C) tensor.
    """
    B, N, C3 = t.shape
    H, W = size
    s = C3 // 15
    cp = 4 * s
    nh = hp.num_heads
    d = cp // nh
    pk = _cached_pack(w, hp, t.dtype)

    dws = _depthwise_rows(t.view(B, H, W, 15 * s).permute(0, 3, 1, 2), pk, s)
    z = t.new_empty(3, B, N, 4, s)
    seg0 = t[..., :3 * s].view(B, N, 3, s).permute(2, 0, 1, 3)                       # segment 0: identity,
    torch.addcmul(pk.seg0_shift, seg0, pk.seg0_scale, out=z[:, :, :, 0])            # then its BatchNorm
    for j in range(3):
        rows = dws[j].view(B * N, 3, s)
        for c in range(3):                                                          # q, k, v
            torch.addmm(pk.pw_bias[j], rows[:, c], pk.pw_t[j], out=z[c, :, :, j + 1].view(B * N, s))
    F.hardswish(z, inplace=True)
    Q, K, V = (z[c].view(B, N, cp) for c in range(3))

    Ks = K.softmax(dim=1)
    KV = t.new_empty(B, nh, d, d)
    for b in range(B):
        torch.bmm(Ks[b].view(N, nh, d).permute(1, 2, 0), V[b].view(N, nh, d).transpose(0, 1), out=KV[b])
    KV.mul_(hp.scale)
    conv_v = F.conv2d(V.view(B, H, W, cp).permute(0, 3, 1, 2), pk.crpe_w, pk.crpe_b, padding=3, groups=cp)
    pre = t.new_empty(B, N, cp + s)
    A = pre[..., :cp]
    torch.mul(Q, conv_v.permute(0, 2, 3, 1).reshape(B, N, cp), out=A)
    for b in range(B):
        A[b].view(N, nh, d).transpose(0, 1).baddbmm_(Q[b].view(N, nh, d).transpose(0, 1), KV[b])
    pre[..., cp:] = _local_branch(dws[3], pk, w, hp).view(B, N, s)
    return pre


class TorchBackend(Backend):
    def project_qkv(self, x, w, hp, training):
        """The qkv linear with its rows permuted to segment-major order (see the module docstring)."""
        if _needs_grad(x, w):
            weight, bias = _segment_major_qkv(w, x.dtype)  # differentiable gather
        else:
            weight, bias = cached_derived(w, ("torch-qkv", x.dtype), lambda: _no_grad(_segment_major_qkv, w, x.dtype))
        return linear(x, weight, bias)

    def qkv_from_upstream_order(self, qkv, w):
        """Upstream's channel order (q | k | v, segments 0..4 each) -> segment-major (`_segment_major`)."""
        s = w.dim // 5
        return qkv.unflatten(-1, (3, 5, s)).transpose(-3, -2).flatten(-3)

    def pre_projection(self, qkv, size, w, hp, training):
        return torch_pre_projection(qkv, size, w, hp, training)

    def project_out(self, pre, w):
        """The output linear through `linear` (oneDNN in CPU float32 inference: measured on one
        thread at batch 8, 7-25% faster than F.linear for the first two stages' shapes)."""
        return linear(pre, w.proj_weight, w.proj_bias)


BACKEND = TorchBackend(
    name="torch",
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    device_types=frozenset({"cpu", "cuda"}),
    supports_training=True,
    supports_grad=True,
    supports_double_backward=True,   # PyTorch ops throughout
    supports_sync_bn=True,
    empty_batch_joins_sync=True,   # its ops on B = 0 join the all-reduces with count 0
    supports_functorch=True,
)
