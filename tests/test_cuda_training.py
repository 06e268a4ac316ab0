"""Training and gradients on the CUDA backend (issue 10, items 1, 3 and 5), through the CPU
emulation of its kernels.

The CUDA backend trains as the Triton backend does (gmf_kernels/training.py): a statistics pass,
the differentiable folding, its own eval kernels forward (``gmf::cuda_pre_projection``), and
the backward of `cuda/train_op.py`: the Triton statistics and backward kernels where Triton
runs (here: its interpreter, which conftest.py turns on), else the PyTorch stages with a
warning (`test_pytorch_stages_fallback`). Without a GPU the op runs the
very kernel code in the barrier-faithful CPU emulation (csrc/gma_emu.h, an emulation-only
build made once per session: conftest.py `emu_build`); the backend object is told, for these
tests only, that it may run on the CPU (`cuda_on_cpu`), so every call below goes through the
public `gmf_kernels.group_mix_attention` and the backend's own dispatch checks (training and
gradient dtypes included).

Checked against the float64 reference backend: float32 training (output, input gradient, every
parameter gradient, running statistics, momentum and cumulative average), eval with gradients
(buffers untouched), float16 / bfloat16 training and bfloat16 eval with gradients under the
low-precision rule (`training_cases.check_low_precision`).
"""
import pytest
import torch

from gmf_kernels.backends import get_backend
from helpers import cuda_backend_on_cpu, record_calls
from training_cases import check_compile_fullgraph, check_eval_with_gradients_float32, check_low_precision, check_train_float32


@pytest.fixture
def cuda_on_cpu(cuda_on_cpu_untraced, monkeypatch):
    """`cuda_on_cpu_untraced`, and after the test: every backward ran the Triton kernels
    (`kernel_backward`) unless the test turned them off (these records are Python side effects
    in the Function's backward: no torch.compile here)."""
    import gmf_kernels.triton_kernels.train_op as triton_train_op
    import gmf_kernels.training as training
    kernel_backwards = record_calls(monkeypatch, triton_train_op, "kernel_backward", lambda ctx, g: g.shape)
    torch_backwards = record_calls(monkeypatch, training, "backward", lambda ctx, g, *a: g.shape)
    backend = cuda_on_cpu_untraced
    monkeypatch.setattr(backend, "expect_kernel_backward", True, raising=False)   # a test may turn it off
    yield backend
    if backend.expect_kernel_backward:
        assert kernel_backwards and not torch_backwards, (kernel_backwards, torch_backwards)
    else:
        assert torch_backwards and not kernel_backwards, (kernel_backwards, torch_backwards)


@pytest.fixture
def cuda_on_cpu_untraced(use_emu, monkeypatch):
    """The cuda backend, allowed on CPU tensors, with the emulation build loaded; after the test,
    asserts that the emulated kernels really ran (not some other path)."""
    import gmf_kernels.cuda.op as cuda_op
    backend = cuda_backend_on_cpu(monkeypatch.setattr)
    launches = []
    launch = cuda_op.launch_pre_projection

    def counted(qkv, *args, **kwargs):
        launches.append(kwargs.get("emulate"))
        return launch(qkv, *args, **kwargs)

    monkeypatch.setattr(cuda_op, "launch_pre_projection", counted)
    yield backend
    assert launches and all(launches), f"the emulated CUDA kernels did not run: {launches}"


@pytest.mark.parametrize("C, grid, B, momentum, steps", [(200, (3, 5), 2, 0.1, 1), (40, (5, 11), 1, None, 2)],
                         ids=["C200-3x5-B2", "C40-5x11-B1-cma-2steps"])
def test_train_float32(cuda_on_cpu, C, grid, B, momentum, steps):
    check_train_float32("cuda", C, grid, B, momentum, steps)


def test_eval_with_gradients_float32(cuda_on_cpu):
    check_eval_with_gradients_float32("cuda")


def test_compile_fullgraph(cuda_on_cpu_untraced, monkeypatch):
    """A training step under torch.compile(fullgraph=True): the CUDA op forward, the Triton
    backward op (``gmf::triton_pre_projection_backward``, opaque: its body runs untraced) behind
    the autograd Function."""
    import gmf_kernels.triton_kernels.train_op as triton_train_op
    kernel_stages = record_calls(monkeypatch, triton_train_op, "pre_projection_backward")
    check_compile_fullgraph("cuda")
    assert kernel_stages


def test_pytorch_stages_fallback(cuda_on_cpu, monkeypatch):
    """Where the Triton kernels cannot run (`triton_backward_reasons` not empty), the statistics
    and the backward are PyTorch ops, with a RuntimeWarning naming the reason, and the result
    is as accurate (the fixture asserts that no Triton backward ran)."""
    import gmf_kernels.cuda.train_op as cuda_train_op
    import gmf_kernels.triton_kernels.statistics as triton_statistics
    monkeypatch.setattr(cuda_train_op, "triton_backward_reasons", lambda *a: ["triton is not installed (test)"])
    monkeypatch.setattr(cuda_train_op, "_WARNED", set())
    monkeypatch.setattr(cuda_on_cpu, "expect_kernel_backward", False, raising=False)
    kernel_statistics = record_calls(monkeypatch, triton_statistics, "statistics")
    with pytest.warns(RuntimeWarning, match=r"PyTorch ops, not kernels.*triton is not installed \(test\)"):
        check_train_float32("cuda", 40, (5, 11), 1, 0.1, 1)
    assert not kernel_statistics


def test_triton_backward_reasons(monkeypatch):
    """The reasons come from the Triton backend's support data (its training size limits
    included), plus the backward kernels' width."""
    from gmf_kernels.cuda.train_op import triton_backward_reasons
    from gmf_kernels.triton_kernels import config
    from gmf_kernels.triton_kernels.config import BACKWARD_KERNELS_MAX_S_PAD
    assert triton_backward_reasons(torch.zeros(1, 12, 3 * 320), 3, 4, 8) == []   # interpreter on (conftest)
    wide = 5 * 2 * BACKWARD_KERNELS_MAX_S_PAD["tf32x3"]     # the interpreter emulates an sm_80
    assert any("segment width" in r for r in triton_backward_reasons(torch.zeros(1, 12, 3 * wide), 3, 4, 8))
    assert any("float64" in r for r in triton_backward_reasons(torch.zeros(1, 12, 240, dtype=torch.float64), 3, 4, 8))
    monkeypatch.setattr(config, "MAX_TRAIN_BATCH", 1)
    assert any("at most 1 images" in r for r in triton_backward_reasons(torch.zeros(2, 12, 120), 3, 4, 8))
    assert triton_backward_reasons(torch.zeros(1, 12, 120), 3, 4, 8) == []


@pytest.mark.parametrize("dtype, training, C, grid, B", [(torch.float16, True, 40, (7, 9), 2),
                                                        (torch.bfloat16, True, 80, (5, 6), 1),
                                                        (torch.bfloat16, False, 40, (7, 9), 2)],
                         ids=["float16-train-C40-7x9-B2", "bfloat16-train-C80-5x6-B1", "bfloat16-eval-C40-7x9-B2"])
def test_low_precision(cuda_on_cpu, dtype, training, C, grid, B):
    """Each mode at one of test_triton_training.py's two shapes (which runs every mode at both): the
    backward is the same Triton kernels; this backend's own part is its forward kernels (the
    emulation) and its op's wiring, which neither shape nor mode changes (~15 s a case: the suite's
    time)."""
    check_low_precision("cuda", dtype, training, C, grid, B)


def test_declared_support():
    """Training and gradients declared per dtype, as data, and dispatch honours them."""
    from helpers import problem
    backend = get_backend("cuda")
    assert backend.supports_training and backend.supports_grad and backend.supports_sync_bn
    for dtype in backend.dtypes:
        p = problem(dtype=dtype, device_type="cuda", training=True, needs_grad=True)
        trains = [r for r in backend.not_supported_reasons(p) if "training mode in" in r or "gradients in" in r]
        assert bool(trains) == (dtype not in backend.training_dtypes), (dtype, trains)
