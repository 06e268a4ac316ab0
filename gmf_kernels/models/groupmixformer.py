"""GroupMixFormer (docs/spec.md §2) with upstream's state_dict keys, on any input size."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import check_backend_name
from ..modules import GroupMixAttention, SeparableConv2d
from .conv_bn import can_fold, conv_bn, has_hooks


class DropPath(nn.Module):
    """Stochastic depth per sample; survivors scaled by 1/keep (as timm's DropPath)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"p={self.p:.3f}"


class ConvStem(nn.Module):
    """3 -> C0/2 -> C0, two stride-2 3x3 convolutions with BatchNorm and hardswish.

    In eval mode each BatchNorm is folded into the convolution before it (`conv_bn.py`):
    one convolution per step, same parameters and state_dict. `fold_bn = False` turns that off.
    """

    fold_bn = True

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1)
        self.norm1 = nn.BatchNorm2d(dim // 2)
        self.proj2 = nn.Conv2d(dim // 2, dim, 3, 2, 1)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        x = F.hardswish(conv_bn(x, self.proj1, self.norm1, self.fold_bn))
        return F.hardswish(conv_bn(x, self.proj2, self.norm2, self.fold_bn))


class PatchEmbed(nn.Module):
    """Separable 3x3 (stride 1 or 2) -> BatchNorm -> hardswish -> tokens and their grid.

    In eval mode the BatchNorm is folded into the pointwise convolution (`conv_bn.py`);
    `fold_bn = False` turns that off.
    """

    fold_bn = True

    def __init__(self, in_dim: int, dim: int, stride: int):
        super().__init__()
        self.proj = SeparableConv2d(in_dim, dim, 3, stride)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x) -> Tuple[torch.Tensor, Tuple[int, int]]:
        proj = self.proj
        if (self.fold_bn and type(proj) is SeparableConv2d and not has_hooks(proj)
                and can_fold(proj.pointwise_conv, self.norm)):
            x = conv_bn(proj.conv1(x), proj.pointwise_conv, self.norm)  # SeparableConv2d.forward, BN folded
        else:
            x = self.norm(proj(x))
        x = F.hardswish(x)
        H, W = x.shape[-2:]  # the convolution's real output size (upstream assumes H // 2)
        return x.flatten(2).transpose(1, 2), (H, W)


class ConvPosEnc(nn.Module):
    """x + depthwise3x3(x) on the image view of the tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, size):
        B, N, C = x.shape
        img = x.transpose(1, 2).reshape(B, C, size[0], size[1])
        return x + self.proj(img).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class GMABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_scale, drop: float,
                 drop_path: float, backend: str):
        super().__init__()
        self.cpe = ConvPosEnc(dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.att = GroupMixAttention(dim, num_heads, qkv_bias, qk_scale, proj_drop=drop, backend=backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, size):
        x = self.cpe(x, size)
        x = x + self.drop_path(self.att(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GMAStage(nn.Module):
    def __init__(self, blocks: List[GMABlock]):
        super().__init__()
        self.gma_stage = nn.ModuleList(blocks)

    def forward(self, x, size):
        for blk in self.gma_stage:
            x = blk(x, size)
        return x


class GroupMixFormer(nn.Module):
    """GroupMixFormer backbone and classifier.

    forward(images) returns logits, or the four (B, C_i, H_i, W_i) feature maps when
    return_interm_layers=True (then, as upstream, there is no norm4/head).
    `backend` selects the GMA backend of every block ("auto" by default). In eval mode the
    stem and patch-embedding BatchNorms are folded into their convolutions (`conv_bn.py`;
    `set_bn_folding(False)` turns that off). `torch.compile(model, fullgraph=True)` traces the
    whole model as one graph on every backend; `gmf_kernels.optimize_for_inference` is the
    recommended way to run it fast.
    """

    def __init__(self, embedding_dims: Sequence[int] = (80, 160, 320, 320),
                 serial_depths: Sequence[int] = (2, 4, 12, 4), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 num_heads: int = 8, qkv_bias: bool = True, num_classes: int = 1000,
                 drop_path_rate: float = 0.0, return_interm_layers: bool = False,
                 backend: Optional[str] = "auto", qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 in_chans: int = 3):
        super().__init__()
        if not (len(embedding_dims) == len(serial_depths) == len(mlp_ratios) == 4):
            raise ValueError("embedding_dims, serial_depths and mlp_ratios need 4 entries each (one per stage)")
        backend = check_backend_name(backend)
        self.embedding_dims = list(embedding_dims)
        self.num_classes = num_classes
        self.return_interm_layers = return_interm_layers
        self.conv_stem = ConvStem(in_chans, embedding_dims[0])
        self.patch_embed_layers = nn.ModuleList(
            PatchEmbed(embedding_dims[max(i - 1, 0)], embedding_dims[i], 1 if i == 0 else 2) for i in range(4))
        rates = torch.linspace(0, drop_path_rate, sum(serial_depths)).tolist()
        stages, k = [], 0
        for i in range(4):
            blocks = [GMABlock(embedding_dims[i], num_heads, mlp_ratios[i], qkv_bias, qk_scale, drop_rate,
                               rates[k + j], backend) for j in range(serial_depths[i])]
            k += serial_depths[i]
            stages.append(GMAStage(blocks))
        self.groupmixformer_backbone = nn.ModuleList(stages)
        if not return_interm_layers:
            self.norm4 = nn.BatchNorm2d(embedding_dims[3])
            self.head = nn.Linear(embedding_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def attention_modules(self):
        return [m for m in self.modules() if isinstance(m, GroupMixAttention)]

    def set_backend(self, backend: Optional[str]) -> "GroupMixFormer":
        """Select the GMA backend of every block."""
        for m in self.attention_modules():
            m.set_backend(backend)
        return self

    def set_bn_folding(self, enabled: bool = True) -> "GroupMixFormer":
        """Fold the eval-mode BatchNorms of the stem and patch embeddings into their convolutions
        (the default; `conv_bn.py`), or run convolution then BatchNorm as separate ops."""
        for m in self.modules():
            if isinstance(m, (ConvStem, PatchEmbed)):
                m.fold_bn = bool(enabled)
        return self

    def forward_features(self, x) -> List[torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        B = x.shape[0]
        x = self.conv_stem(x)
        feats = []
        for embed, stage in zip(self.patch_embed_layers, self.groupmixformer_backbone):
            tokens, (H, W) = embed(x)
            tokens = stage(tokens, (H, W))
            x = tokens.transpose(1, 2).reshape(B, tokens.shape[-1], H, W)
            feats.append(x)
        return feats

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm4(feat).mean(dim=(2, 3)))

    def forward(self, x):
        feats = self.forward_features(x)
        if self.return_interm_layers:
            return feats
        return self.forward_head(feats[-1])
