"""Test configuration.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors: the
switch must be set before anything imports triton, so it is set here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

GOLDEN_DIR = os.environ.get(
    "GMF_GOLDEN_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "golden"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def golden_path(name: str) -> str:
    path = os.path.join(GOLDEN_DIR, name)
    if not os.path.exists(path):
        pytest.fail(f"golden file {path} not found (set GMF_GOLDEN_DIR to the shared/golden directory)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Many small convolutions and GEMMs: on a 2-core CI machine one intra-op thread is
    faster and far steadier than two fighting over busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
