"""Training and gradients on the CUDA backend (issue 10, items 1, 3 and 5), through the CPU
emulation of its kernels.

The CUDA backend trains as the Triton backend does (gmf_kernels/training.py): a statistics pass
and the differentiable folding in PyTorch ops, its own eval kernels forward
(``gmf::cuda_pre_projection``), the shared PyTorch-ops backward. Without a GPU the op runs the
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
from training_cases import check_eval_with_gradients_float32, check_low_precision, check_train_float32


@pytest.fixture
def cuda_on_cpu(use_emu, monkeypatch):
    """The cuda backend, allowed on CPU tensors, with the emulation build loaded; after the test,
    asserts that the emulated kernels really ran (not some other path)."""
    import gmf_kernels.cuda.op as cuda_op
    backend = get_backend("cuda")
    monkeypatch.setattr(backend, "device_types", backend.device_types | {"cpu"})
    monkeypatch.setattr(backend, "availability_reasons", lambda: [])
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


@pytest.mark.parametrize("C, grid, B", [(40, (7, 9), 2), (80, (5, 6), 1)], ids=["C40-7x9-B2", "C80-5x6-B1"])
@pytest.mark.parametrize("dtype, training", [(torch.float16, True), (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=["float16-train", "bfloat16-train", "bfloat16-eval"])
def test_low_precision(cuda_on_cpu, dtype, training, C, grid, B):
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
