"""`interpreter_speed` (installed by conftest.py for the whole run) changes how fast Triton's
interpreter runs, not what it computes: every kernel of the library, launched with and without
it, gives bit-identical outputs, gradients and running statistics."""
import pytest
import torch

import interpreter_speed
from gmf_kernels.triton_kernels import _common
from helpers import defined_triton_kernels, skip_unless_supported
from training_cases import make, run_mode

if not _common.interpreting():
    pytest.skip("concerns Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

#: (C, (H, W), B, mode, dtype, unfused B3, dense Z pass, dense B3): training with the unfused B3 path launches every
#: kernel but the recompute of Z (a training step's backward reads the Z the statistics pass kept),
#: which eval with gradients launches (with the default backward: with the dense one it makes Z as the dense
#: statistics pass); bf16 training with B3's dense form (the "triton.backward" candidate DENSE) its kernels and its
#: statistics pass in the dense form; eval in bfloat16 the forward kernels in another dtype, as the fused forward
#: (dense Z pass 2: the FUSED candidate, its one kernel); eval as the split forward with its Z pass on tensor cores
#: (the ZDENSE tuning candidate) the dense Z pass
CASES = [(40, (3, 4), 1, "train", torch.float32, True, False, False),
         (40, (3, 4), 1, "grad", torch.float32, False, False, False),
         (40, (3, 4), 1, "train", torch.bfloat16, False, False, True),
         (40, (3, 4), 1, "eval", torch.bfloat16, False, 2, False),
         (40, (5, 4), 1, "eval", torch.float32, False, 1, False)]


def _launch_all(monkeypatch):
    """Every case's results, and the names of the kernels launched."""
    from triton.runtime import interpreter as ti
    import dataclasses

    import gmf_kernels.triton_kernels.aggregation_backward as agb
    from gmf_kernels.triton_kernels import tile_spaces
    from gmf_kernels.triton_kernels.config import dot_pad
    launched, results = set(), []
    call, fused_b3_max = ti.GridExecutor.__call__, agb.FUSED_B3_MAX_S_PAD

    def record(self, *args, **kwargs):
        launched.add(self.fn.__name__)
        return call(self, *args, **kwargs)
    from gmf_kernels.triton_kernels import launcher
    from gmf_kernels.triton_kernels.config import gma_shape
    default_shape, tuned_tiles = launcher.default_shape, tile_spaces.tuned_tiles

    def dense_b3(C, M):
        tile = agb.tile_of(dataclasses.replace(agb.backward_tiles(dot_pad(C // 5), M), DENSE=1))
        return lambda family, C_, like: tile if family == agb.BACKWARD_FAMILY else tuned_tiles(family, C_, like)
    with monkeypatch.context() as mp:
        mp.setattr(ti.GridExecutor, "__call__", record)
        for C, (H, W), B, mode, dtype, unfused, dense, dense_backward in CASES:
            skip_unless_supported("triton", dim=C, dtype=dtype, training=mode == "train", needs_grad=mode != "eval")
            mp.setattr(agb, "FUSED_B3_MAX_S_PAD", 0 if unfused else fused_b3_max)
            mp.setattr(launcher, "default_shape", (lambda C, N, dots, fused=dense == 2: gma_shape(
                C, dots=dots.precision, interpreter=True, split=True, zdense=True, fused=fused))
                if dense else default_shape)
            mp.setattr(tile_spaces, "tuned_tiles", dense_b3(C, 3 * B * H * W) if dense_backward else tuned_tiles)
            w, x = make(C, H, W, B)
            results.append(run_mode("triton", x, (H, W), w, dtype, mode))
    return results, launched


def _flat(results):
    return [t for out, grads, bufs in results for t in [out, *grads.values(), *bufs.values()]]


def test_same_results_with_and_without(monkeypatch):
    if not interpreter_speed.installed():
        pytest.skip("interpreter_speed is not installed in this run (GMF_FULL_INTERPRETER=1, or another triton)")
    try:
        fast, launched = _launch_all(monkeypatch)
        interpreter_speed.uninstall()
        shipped, _ = _launch_all(monkeypatch)
    finally:
        interpreter_speed.install()
    assert defined_triton_kernels() <= launched, sorted(defined_triton_kernels() - launched)
    a, b = _flat(fast), _flat(shipped)
    assert len(a) == len(b) > 3 * len(CASES)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and torch.equal(x, y), i


def test_overflow_checks_are_dropped_only_without_debug():
    from triton.runtime import interpreter as ti
    if not interpreter_speed.installed():
        pytest.skip("interpreter_speed is not installed in this run")
    opts = ti.interpreter_builder.options
    assert not opts.debug and not opts.sanitize_overflow
    interpreter_speed.uninstall()
    try:
        assert ti.interpreter_builder.options.sanitize_overflow
    finally:
        interpreter_speed.install()
