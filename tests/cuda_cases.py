"""Shared by the CUDA test files (test_cuda_build.py, test_cuda_emulation.py): random GMA
problems with their float64 reference, one call of the CUDA launcher (on the GPU or in the
CPU emulation), and the accuracy check.

Oracle: float64 reference. fp32: max |diff| / max |expected| <= 1e-5, for the attention
channels and the local-branch channels separately (the kernels' channel mixes run as 3xTF32
on the tensor cores: ~3e-7 measured in the emulation; one TF32 pass would give ~3e-4).
fp16/bf16: error <= 2 x the reference's own error at that dtype + 1e-5 (flash-attention's
rule, helpers.assert_within_reference_error).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gmf_kernels.cuda import launcher as cl
from gmf_kernels.folding import fold_eval
from gmf_kernels.numerics import cast_weights, default_hyper, max_rel_error, random_gma_weights
from gmf_kernels.reference import reference_group_mix_attention
from helpers import assert_close_verbose, assert_within_reference_error

FP32_TOL = 1e-5


class Case:
    """Random weights and tokens with the float64 reference and its intermediates."""

    def __init__(self, C, H, W, B, seed=0):
        self.C, self.H, self.W, self.B = C, H, W, B
        self.w = random_gma_weights(C, seed=seed)
        self.hp = default_hyper(C)
        g = torch.Generator().manual_seed(seed + 1000)
        self.x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
        _, ext = reference_group_mix_attention(self.x, (H, W), self.w, self.hp, return_intermediates=True)
        self.pre = ext["pre_proj"]
        self._lowp = {}

    def qkv(self, dtype, device="cpu"):
        return F.linear(self.x, self.w.qkv_weight, self.w.qkv_bias).to(dtype=dtype, device=device)

    def weights(self, device="cpu"):
        f = fold_eval(self.w, self.hp, torch.float32)
        return [t.to(device) for t in f], self.hp.ln_eps

    def reference_lowp(self, dtype):
        if dtype not in self._lowp:
            _, ext = reference_group_mix_attention(self.x.to(dtype), (self.H, self.W), cast_weights(self.w, dtype),
                                                   self.hp, return_intermediates=True)
            self._lowp[dtype] = ext["pre_proj"]
        return self._lowp[dtype]


def run(case, dtype, device="cpu", tile=(0, 0), emulate=True, **launch):
    """pre (B, N, C) from the CUDA launcher, its output buffer poisoned with NaN first.
    `launch`: tiles_per_cta, config, smem_limit, seed (gmf_kernels.cuda.launcher)."""
    ws, eps = case.weights(device)
    out = torch.full((case.B, case.H * case.W, case.C), float("nan"), dtype=dtype, device=device)
    cl.launch_pre_projection(case.qkv(dtype, device), case.H, case.W, ws, case.hp.scale, eps, out=out,
                             emulate=emulate, tile=tile, **launch)
    return out


def check(out, case, dtype, what):
    """AssertionError unless `out` matches the float64 reference (see the module doc)."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (element not written, or poisoned read)"
    cp = 4 * (case.C // 5)
    if dtype == torch.float32:
        for sl, part in ((slice(0, cp), "attention"), (slice(cp, None), "local")):
            err = max_rel_error(out[..., sl], case.pre[..., sl])
            assert err <= FP32_TOL, f"{what} [{part}]: relative error {err:.2e} > {FP32_TOL}"
        scale = case.pre.abs().max().item()
        assert_close_verbose(out, case.pre, rtol=0.0, atol=FP32_TOL * scale, name=what)
    else:
        assert_within_reference_error(out, case.reference_lowp(dtype), case.pre, name=what)
