"""Input checks shared by the modules and the functional API.

Every check raises ValueError (shape/value problems) or TypeError (dtype/device
problems) with a message that names the offending argument and what was expected.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .weights import NUM_HEADS, NUM_SEGMENTS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def traced_int(v):
    """v, or under torch.jit.trace (and the legacy ONNX exporter, which traces) the int a
    size read off a tensor becomes there: a 0-dim integer tensor."""
    if (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and not v.is_complex()
            and torch.jit.is_tracing()):
        return int(v)
    return v


def check_dim(dim: int, num_heads: int) -> None:
    """A GMA width must split into 5 segments and its 4 attention segments into heads."""
    dim, num_heads = traced_int(dim), traced_int(num_heads)
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if dim % NUM_SEGMENTS != 0:
        raise ValueError(
            f"dim={dim} is not a multiple of 5: Group-Mix Attention splits the channels "
            f"into 5 segments of dim/5 (released widths: 40, 80, 160, 200, 240, 320, 360, 480)")
    if num_heads != NUM_HEADS:
        raise ValueError(
            f"num_heads={num_heads}: the convolutional relative position encoding assigns "
            f"its 3x3/5x5/7x7 windows to 2+3+3 heads, so num_heads must be {NUM_HEADS}")
    if (4 * (dim // NUM_SEGMENTS)) % num_heads != 0:
        raise ValueError(
            f"dim={dim}: the 4*dim/5={4 * (dim // NUM_SEGMENTS)} attention channels do not "
            f"split into {num_heads} heads (dim must be a multiple of 10)")


def check_size(size: Sequence[int]) -> Tuple[int, int]:
    # int() takes what a shape gives (ints, SymInts under torch.compile, 0-d tensors under tracing) but
    # also truncates 3.5 and parses "35": refuse what is not an integer first
    try:
        if isinstance(size, (str, bytes)) or any(
                isinstance(v, (float, str, bytes, bool)) or (isinstance(v, torch.Tensor) and v.is_floating_point())
                for v in size):
            raise ValueError
        H, W = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be a pair (H, W) of ints, got {size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"size must be positive, got (H, W) = ({H}, {W})")
    return H, W


def check_tokens(x: torch.Tensor, size: Sequence[int], dim: int) -> Tuple[int, int, int, int]:
    """Validate tokens x (B, N, C) against the grid size and module width; return B, N, H, W."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, N, C) (3 dimensions), got {tuple(x.shape)}")
    H, W = check_size(size)
    B, N, C = x.shape
    if C != dim:
        raise ValueError(f"x has {C} channels but the module was built for dim={dim}")
    if N != H * W:
        raise ValueError(f"x has N={N} tokens but size=(H, W)=({H}, {W}) gives H*W={H * W}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    return B, N, H, W


def check_same_device_dtype(x: torch.Tensor, tensors, what: str = "the module's parameters",
                            check_dtype: bool = True) -> None:
    for t in tensors:
        if t.device != x.device:
            raise TypeError(f"x is on {x.device} but {what} are on {t.device}; move one of them")
        if check_dtype and t.is_floating_point() and t.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but {what} have dtype {t.dtype}; cast the module "
                f"(module.to({x.dtype})) or the input, or use torch.autocast")
