"""GroupMixFormer (docs/spec.md §2) with upstream's state_dict keys, on any input size."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backends import check_backend_name
from ..backends.torch_backend import linear, saved_conv_input
from ..folding import clear_weight_cache
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
        if keep > 0.0:  # p == 1: every sample dropped (zeros), not 0/0 (as timm's DropPath)
            mask.div_(keep)
        return x * mask

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
        # channels-last from the first convolution on (a copy of the 3-channel image): every
        # convolution after it keeps that layout, so the tokens of each stage,
        # image.flatten(2).transpose(1, 2), are contiguous (B, N, C) rows. In NCHW they are a
        # transposed view that every LayerNorm copies and every residual add keeps (upstream's
        # layout; measured: GroupMixFormer-T, batch 8, one CPU thread, ~12 % of the forward).
        x = x.contiguous(memory_format=torch.channels_last)
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
    """x + depthwise3x3(x) on the image view of the tokens.

    Computed as ONE depthwise convolution whose kernels have 1 added to their centre tap (the
    residual folded in: no separate pass over the tokens), unless a hook on `proj` or a
    subclass of it needs its own forward."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, size):
        B, N, C = x.shape
        img = saved_conv_input(x.transpose(1, 2).reshape(B, C, size[0], size[1]))  # channels-last view
        proj = self.proj
        if type(proj) is not nn.Conv2d or has_hooks(proj):
            return x + proj(img).flatten(2).transpose(1, 2)
        centre = torch.zeros_like(proj.weight)
        centre[:, :, 1, 1] = 1
        return proj._conv_forward(img, proj.weight + centre, proj.bias).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        fc1, fc2 = self.fc1, self.fc2
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or has_hooks(fc1) or has_hooks(fc2):
            return self.drop(fc2(self.drop(F.gelu(fc1(x)))))
        # fc1 and its GELU as one call, and fc2, through oneDNN in CPU float32 inference (`linear`)
        return self.drop(linear(self.drop(linear(x, fc1.weight, fc1.bias, gelu=True)), fc2.weight, fc2.bias))


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


class _RestoreBuffersOnRecompute:
    """Context of a checkpointed block's recomputation: its buffers (the aggregator's BatchNorm
    running statistics) are put back as they were after the forward, so that gradient
    checkpointing updates them once per step, as without it."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = None

    def __enter__(self):
        self.saved = [(b, b.detach().clone()) for b in self.module.buffers()]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)
        self.saved = None
        return False


class GMAStage(nn.Module):
    def __init__(self, blocks: List[GMABlock]):
        super().__init__()
        self.gma_stage = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x, size):
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for blk in self.gma_stage:
            if use_ckpt:
                x = checkpoint(blk, x, size, use_reentrant=False,
                               context_fn=lambda blk=blk: (contextlib.nullcontext(), _RestoreBuffersOnRecompute(blk)))
            else:
                x = blk(x, size)
        return x


def take_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """timm's index convention: None -> every stage, an int n -> the last n, a sequence ->
    those stages (negative from the end). Returns (the absolute indices, in the order given; their max)."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: the last-n count must be 1..{num_stages}")
        taken = list(range(num_stages - indices, num_stages))
    else:
        taken = []
        for i in indices:
            j = num_stages + i if i < 0 else i
            if not 0 <= j < num_stages:
                raise ValueError(f"feature index {i} out of range for {num_stages} stages "
                                 f"(0..{num_stages - 1}, or negative from the end)")
            taken.append(j)
        if not taken:
            raise ValueError("indices is empty: name at least one stage")
    return taken, max(taken)


_OUTPUT_FMTS = ("NCHW", "NHWC")


class GroupMixFormer(nn.Module):
    """GroupMixFormer backbone and classifier, in timm's model interface.

    * `forward(images)`: logits; with `return_interm_layers=True` (upstream's dense-prediction
      backbone, which has no norm4/head) the list of the four (B, C_i, H_i, W_i) maps.
    * `forward_features(x)`: the last stage's map (B, C_3, H/32, W/32), after norm4 (timm's convention for
      a final norm of the unpooled map; its test-time pooling builds on it);
      `forward_head(x, pre_logits=False)`: mean over H, W -> head.
      `forward(x) == forward_head(forward_features(x))`.
    * `forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)`
      and `prune_intermediate_layers` (timm's signatures; what `features_only=True` uses);
      `feature_info` lists the four stages (channels, reduction 4/8/16/32, module name).
    * `get_classifier`, `reset_classifier(num_classes, global_pool=None)`, `num_features`,
      `set_grad_checkpointing`, `no_weight_decay`, `group_matcher`.

    The state_dict keys are upstream's (docs/spec.md §2). `backend` selects the GMA backend
    of every block ("auto" by default). In eval mode the stem and patch-embedding BatchNorms
    are folded into their convolutions (`conv_bn.py`; `set_bn_folding(False)` turns that off).
    `torch.compile(model, fullgraph=True)` traces the whole model as one graph on every backend;
    `gmf_kernels.optimize_for_inference` is the recommended way to run it fast.
    """

    def __init__(self, embedding_dims: Sequence[int] = (80, 160, 320, 320),
                 serial_depths: Sequence[int] = (2, 4, 12, 4), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 num_heads: int = 8, qkv_bias: bool = True, num_classes: int = 1000,
                 drop_path_rate: float = 0.0, return_interm_layers: bool = False,
                 backend: Optional[str] = "auto", qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 in_chans: int = 3, global_pool: str = "avg"):
        super().__init__()
        if not (len(embedding_dims) == len(serial_depths) == len(mlp_ratios) == 4):
            raise ValueError("embedding_dims, serial_depths and mlp_ratios need 4 entries each (one per stage)")
        backend = check_backend_name(backend)
        self.embedding_dims = list(embedding_dims)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.return_interm_layers = return_interm_layers
        self.num_features = self.head_hidden_size = embedding_dims[3]
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
        #: one entry per stage, as timm's feature_info (the conv stem reduces by 4, stages 1-3 by 2 more each)
        self.feature_info = [dict(num_chs=embedding_dims[i], reduction=4 * 2 ** i,
                                  module=f"groupmixformer_backbone.{i}") for i in range(4)]
        self.global_pool = self._check_pool(global_pool, num_classes)
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

    @staticmethod
    def _check_pool(global_pool, num_classes):
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r}: GroupMixFormer pools by the mean ('avg'), "
                             f"or not at all ('', with num_classes=0: forward_head returns the normalised map)")
        if global_pool == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled features")
        return global_pool

    # ------------------------------------------------------------------ backends, BatchNorm folding
    def attention_modules(self):
        return [m for m in self.modules() if isinstance(m, GroupMixAttention)]

    def set_backend(self, backend: Optional[str]) -> "GroupMixFormer":
        """Select the GMA backend of every block."""
        for m in self.attention_modules():
            m.set_backend(backend)
        return self

    def train(self, mode: bool = True) -> "GroupMixFormer":
        # the BatchNorms folded into the stem and the patch embeddings, and the GMA layers' folding, are
        # rebuilt at the next eval call (writes through .data: folding.clear_weight_cache)
        clear_weight_cache(self)
        return super().train(mode)

    def set_bn_folding(self, enabled: bool = True) -> "GroupMixFormer":
        """Fold the eval-mode BatchNorms of the stem and patch embeddings into their convolutions
        (the default; `conv_bn.py`), or run convolution then BatchNorm as separate ops."""
        for m in self.modules():
            if isinstance(m, (ConvStem, PatchEmbed)):
                m.fold_bn = bool(enabled)
        return self

    # ------------------------------------------------------------------ timm's model interface
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names to exclude from weight decay beyond what optimizers exclude anyway.

        Empty: GroupMixFormer has no position embedding or token parameter (upstream's list
        names `cls_token1..4`, which do not exist); timm's `param_groups_weight_decay` already
        leaves out every 1-D parameter (norms, biases)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        """Parameter groups for layer-wise learning-rate decay (timm's convention)."""
        return dict(
            stem=r"^conv_stem|^patch_embed_layers\.0\.",
            blocks=[(r"^groupmixformer_backbone\.(\d+)", None), (r"^patch_embed_layers\.(\d+)", None)]
            if coarse else [(r"^groupmixformer_backbone\.(\d+)\.gma_stage\.(\d+)", None),
                            (r"^patch_embed_layers\.(\d+)", (0,)), (r"^norm4", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (training memory).
        The BatchNorm running statistics are updated once per step, as without it."""
        for stage in self.groupmixformer_backbone:
            stage.grad_checkpointing = bool(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return any(getattr(st, "grad_checkpointing", False) for st in self.groupmixformer_backbone)

    def _require_classifier(self, what: str):
        if self.return_interm_layers:
            raise RuntimeError(f"{what}: this model was built with return_interm_layers=True (upstream's "
                               f"dense-prediction backbone), which has no norm4/head; build it without to classify")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        self._require_classifier("get_classifier")
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for `num_classes` (0: none, forward gives pooled features); norm4 is kept.
        `global_pool`: None keeps the current pooling, 'avg' pools by the mean, '' not at all
        (only with num_classes=0)."""
        self._require_classifier("reset_classifier")
        pool = self.global_pool if global_pool is None else global_pool
        self.global_pool = self._check_pool(pool, num_classes)
        self.num_classes = num_classes
        if num_classes > 0:
            ref = next(self.norm4.parameters(), None)
            if ref is None:  # norm4 pruned: any parameter gives the model's device and dtype
                ref = next(self.parameters())
            head = nn.Linear(self.num_features, num_classes)
            self._init_weights(head)
            self.head = head.to(device=ref.device, dtype=ref.dtype)
        else:
            self.head = nn.Identity()

    def _stages(self):
        return list(zip(self.patch_embed_layers, self.groupmixformer_backbone))

    def _check_images(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an image tensor (B, C, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected images with {self.in_chans} channels (in_chans), got shape {tuple(x.shape)}"
                             + (" (channels last? the model takes (B, C, H, W); permute(0, 3, 1, 2))"
                                if x.shape[-1] == self.in_chans else ""))
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got dtype {x.dtype} (convert, e.g. x.float() / 255, "
                            f"and normalise as the model's pretrained_cfg says)")

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The maps of the stages in `indices` (timm's convention: None every stage, an int the
        last n, a sequence those stages). `norm=True` applies norm4 to the last stage's map
        (the only stage with a final norm); `stop_early` skips the stages after the last one
        taken; `output_fmt` 'NCHW' or 'NHWC'. Returns the list, or (last map, list) unless
        `intermediates_only`."""
        if output_fmt not in _OUTPUT_FMTS:
            raise ValueError(f"output_fmt={output_fmt!r}: choose one of {_OUTPUT_FMTS}")
        self._check_images(x)
        stages = self._stages()
        taken, max_index = take_indices(len(stages), indices)
        if stop_early:
            stages = stages[:max_index + 1]
        last = len(self.groupmixformer_backbone) - 1
        final_norm = getattr(self, "norm4", None) if norm else None
        B = x.shape[0]
        x = self.conv_stem(x)
        intermediates = []
        normed_last = None
        for i, (embed, stage) in enumerate(stages):
            tokens, (H, W) = embed(x)
            tokens = stage(tokens, (H, W))
            x = saved_conv_input(tokens.transpose(1, 2).reshape(B, tokens.shape[-1], H, W))
            if i in taken:
                y = x
                if final_norm is not None and i == last:   # norm4 once a call (training updates its statistics)
                    y = normed_last = final_norm(x)
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.groupmixformer_backbone) and getattr(self, "norm4", None) is not None:
            # timm: the final output is forward_features', after the model's final norm
            x = normed_last if normed_last is not None else self.norm4(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one in `indices` (and the head, and norm4 with
        `prune_norm`); returns the absolute indices (what timm's features_only calls)."""
        taken, max_index = take_indices(len(self.groupmixformer_backbone), indices)
        prune_end = max_index < len(self.groupmixformer_backbone) - 1
        self.patch_embed_layers = self.patch_embed_layers[:max_index + 1]
        self.groupmixformer_backbone = self.groupmixformer_backbone[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if not self.return_interm_layers:
            if prune_norm or prune_end:
                self.norm4 = nn.Identity()
            if prune_head or prune_end:
                self.num_classes = 0
                self.global_pool = ""
                self.head = nn.Identity()
        return taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, C_3, H_3, W_3), after norm4 (timm: the final norm of the unpooled map)."""
        return self.forward_intermediates(x, indices=1)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """mean over H, W -> head (pre_logits: without the head)."""
        self._require_classifier("forward_head")
        if x.dim() != 4:
            raise ValueError(f"forward_head takes the (B, C, H, W) map of forward_features, got shape "
                             f"{tuple(x.shape)}")
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        if self.return_interm_layers:  # upstream's dense-prediction backbone: the four maps
            return self.forward_intermediates(x, intermediates_only=True)
        return self.forward_head(self.forward_features(x))
