"""gmf_kernels: fused Triton and CUDA kernels for GroupMixFormer's Group-Mix Attention.

    import torch
    import gmf_kernels as gmf
    model = gmf.create_model("groupmixformer_s", checkpoint="groupmixformer_small.pth")
    gmf.convert(upstream_model)            # an upstream model: EfficientAtt -> GroupMixAttention
    gmf.available_backends()               # e.g. ['torch', 'reference'] on a CPU
    fast = gmf.optimize_for_inference(model, batch_size=8, device="cuda", dtype=torch.bfloat16)

Importing needs only torch: Triton and the CUDA module are loaded when first used. When timm
is installed, its registry gets the five models (`timm.create_model("groupmixformer_s")`) as
soon as timm is imported (`import gmf_kernels` does not import timm).
"""
from ._version import __version__
from .backends import BACKEND_NAMES, FallbackWarning, available_backends, get_backend, select_backend  # noqa: E402
from .convert import convert, is_upstream_attention  # noqa: E402
from .folding import clear_weight_cache  # noqa: E402
from .functional import group_mix_attention  # noqa: E402
from .inference import InferenceModel, inference_plan, optimize_for_inference  # noqa: E402
from .models import (MODEL_CONFIGS, PRETRAINED_CFGS, CheckpointFormatError, CheckpointMismatchError,  # noqa: E402
                     GroupMixFormer, PretrainedWeightsNotFound, checkpoint_filter_fn, create_model, load_checkpoint,
                     register_with_timm)
from .modules import GroupMixAttention  # noqa: E402
from .weights import GMAHyper, GMAWeights  # noqa: E402

__all__ = [
    "GroupMixAttention", "GroupMixFormer", "create_model", "load_checkpoint", "convert", "is_upstream_attention",
    "group_mix_attention", "clear_weight_cache", "available_backends", "get_backend", "select_backend", "BACKEND_NAMES", "FallbackWarning",
    "MODEL_CONFIGS", "GMAWeights", "GMAHyper", "CheckpointMismatchError", "__version__",
    "optimize_for_inference", "inference_plan", "InferenceModel",
    "CheckpointFormatError", "PretrainedWeightsNotFound", "checkpoint_filter_fn", "PRETRAINED_CFGS",
]

# timm entry points (groupmixformer_m|t|s|b|l): now if timm is imported, else when it is (never imports timm itself)
register_with_timm()
