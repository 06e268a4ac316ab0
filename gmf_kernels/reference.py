"""The oracle: Group-Mix Attention as a plain, line-by-line rendering of docs/spec.md §1.

Kept simple on purpose: every step of the spec is one or two torch calls, in the
spec's order, with the spec's names. Everything else in the library is tested
against this function (run in float64) and against the golden vectors.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum
from .weights import CRPE_WINDOWS, GMAHyper, GMAWeights, NUM_SEGMENTS, per_bn

Tensor = torch.Tensor


def local_layer_norm(loc: Tensor, w: GMAWeights, hp: GMAHyper) -> Tensor:
    """The local branch's LayerNorm over its s channels. A 16-bit layer whose LayerNorm is kept in float32
    (outside autocast) is normalised in float32 and cast back, as the fused kernels do: F.layer_norm on CUDA
    takes no mixed dtypes (on CPU it computes in float32 inside)."""
    s = w.dim // NUM_SEGMENTS   # (not loc.shape: a traced size under torch.jit.trace / the legacy ONNX export)
    ln_w = w.local_ln_weight
    if ln_w is not None and ln_w.dtype != loc.dtype and not torch.is_autocast_enabled(loc.device.type):
        return F.layer_norm(loc.float(), (s,), ln_w, w.local_ln_bias, hp.ln_eps).to(loc.dtype)
    return F.layer_norm(loc, (s,), ln_w, w.local_ln_bias, hp.ln_eps)


def _batch_norm(x: Tensor, w: GMAWeights, i: int, hp: GMAHyper, training) -> Tensor:
    """nn.BatchNorm2d's forward for aggregator BatchNorm i (training: bool or one per BN),
    or SyncBatchNorm's when its statistics are shared with other processes."""
    training = per_bn(training, i)
    if training and per_bn(hp.bn_process_group, i) is not None:
        return _sync_batch_norm(x, w, i, hp)
    momentum = per_bn(hp.bn_momentum, i)
    nbt = w.bn_num_batches_tracked[i]
    if training and nbt is not None and w.bn_running_mean[i] is not None:
        nbt.add_(1)
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(nbt)
    return F.batch_norm(x, w.bn_running_mean[i], w.bn_running_var[i], w.bn_weight[i], w.bn_bias[i],
                        training, 0.0 if momentum is None else momentum, per_bn(hp.bn_eps, i))


def _sync_batch_norm(x: Tensor, w: GMAWeights, i: int, hp: GMAHyper) -> Tensor:
    """nn.SyncBatchNorm's training forward for aggregator BatchNorm i on this process's
    images x (3B, s, H, W): batch statistics over the images of every rank of the group."""
    group = per_bn(hp.bn_process_group, i)
    momentum = per_bn(hp.bn_momentum, i)
    running_mean, running_var, nbt = w.bn_running_mean[i], w.bn_running_var[i], w.bn_num_batches_tracked[i]
    if nbt is not None and running_mean is not None:
        nbt.add_(1)
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(nbt)
    s = x.shape[1]
    x64 = x.double()
    count = x64.new_tensor([x.numel() // s])                        # images x H x W here
    # sum, sum of squares, count: one all-reduce (its backward all-reduces the two gradient sums)
    stats = all_reduce_sum(torch.cat([x64.sum((0, 2, 3)), x64.square().sum((0, 2, 3)), count]), group)
    n = stats[-1].detach()                                          # over every rank
    mean = stats[:s] / n
    var = stats[s:2 * s] / n - mean.square()                        # biased, for normalising
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * n / (n - 1)).to(running_var.dtype), momentum)  # unbiased
    y = (x64 - mean[:, None, None]) * torch.rsqrt(var + per_bn(hp.bn_eps, i))[:, None, None]
    return (y * w.bn_weight[i].double()[:, None, None] + w.bn_bias[i].double()[:, None, None]).to(x.dtype)


def _depthwise(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    k = weight.shape[-1]
    return F.conv2d(x, weight, bias, padding=k // 2, groups=x.shape[1])


def reference_pre_projection(t: Tensor, size: Tuple[int, int], w: GMAWeights, hp: GMAHyper = GMAHyper(),
                             training=False) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Steps 2-9 of the spec before the output linear: qkv projection t (B, N, 3C) ->
    pre-projection tokens (B, N, C), and the intermediates {"proxies", "local"}."""
    B, N, _ = t.shape
    # widths from the weights, not from t's shape: constants when a tracer records t's sizes as values
    # (the legacy ONNX exporter with dynamic_axes needs the LayerNorm's normalized_shape constant)
    C = w.proj_weight.shape[-1]
    H, W = size
    h = hp.num_heads
    s = C // NUM_SEGMENTS
    cp = 4 * s
    d = cp // h

    # 2.-3. q, k, v as images stacked on the batch axis in the order q, k, v
    q, k, v = t.split(C, dim=-1)
    imgs = torch.cat([q, k, v], dim=0).transpose(1, 2).reshape(3 * B, C, H, W)
    seg = imgs.split(s, dim=1)
    y = [F.hardswish(_batch_norm(seg[0], w, 0, hp, training))]
    for j in (1, 2, 3):
        z = _depthwise(seg[j], w.dw_weight[j - 1])
        z = F.conv2d(z, w.pw_weight[j - 1])
        y.append(F.hardswish(_batch_norm(z, w, j, hp, training)))
    proxies = torch.cat(y, dim=1)                                  # (3B, C', H, W)

    # 4. local branch on segment 4 of q, k, v
    loc = torch.cat([seg[4][:B], seg[4][B:2 * B], seg[4][2 * B:]], dim=1)  # (B, 3s, H, W)
    loc = _depthwise(loc, w.local_dw_weight)
    loc = F.conv2d(loc, w.local_pw_weight)                          # (B, s, H, W)
    loc = loc.flatten(2).transpose(1, 2)                           # (B, N, s)
    loc = F.hardswish(local_layer_norm(loc, w, hp))

    # 5. heads: channel c -> head c // d, position c % d
    P = proxies.reshape(3, B, h, d, N).transpose(-1, -2)           # (3, B, h, N, d)
    Q, K, V = P[0], P[1], P[2]

    # 6. factorized attention
    Ks = K.softmax(dim=2)                                          # over the N tokens
    KV = Ks.transpose(-1, -2) @ V                                  # (B, h, d, d)
    E = Q @ KV                                                     # (B, h, N, d)

    # 7. convolutional relative position encoding
    v_img = V.transpose(-1, -2).reshape(B, cp, H, W)
    parts, start = [], 0
    for (k_size, n_heads), cw, cb in zip(CRPE_WINDOWS, w.crpe_weight, w.crpe_bias):
        width = n_heads * d
        parts.append(_depthwise(v_img[:, start:start + width], cw, cb))
        start += width
    conv_v = torch.cat(parts, dim=1).reshape(B, h, d, N).transpose(-1, -2)
    R = Q * conv_v

    # 8.-9. combine, back to tokens
    A = hp.scale * E + R
    A = A.transpose(1, 2).reshape(B, N, cp)
    return torch.cat([A, loc], dim=-1), {"proxies": P, "local": loc}


def reference_group_mix_attention(
    x: Tensor,
    size: Tuple[int, int],
    w: GMAWeights,
    hp: GMAHyper = GMAHyper(),
    training=False,
    return_intermediates: bool = False,
):
    """Group-Mix Attention forward. x: (B, N, C) tokens of an (H, W) grid, row-major.

    In training mode the aggregator BatchNorms use batch statistics over q, k and v
    together (3B images) and update their running statistics in place. `training` may
    be a 4-tuple (one mode per aggregator BatchNorm, e.g. some frozen). With
    `hp.bn_process_group` set, a training BatchNorm is upstream's SyncBatchNorm: its
    statistics are over the 3B images of every rank of that group (every rank must call).
    With return_intermediates, also returns {"proxies": (3,B,h,N,d), "local": (B,N,s),
    "pre_proj": (B,N,C)} as in the golden vectors.
    """
    # 1. qkv projection
    t = F.linear(x, w.qkv_weight, w.qkv_bias)                      # (B, N, 3C)
    pre_proj, extras = reference_pre_projection(t, size, w, hp, training)
    out = F.linear(pre_proj, w.proj_weight, w.proj_bias)
    if return_intermediates:
        return out, {**extras, "pre_proj": pre_proj}
    return out
