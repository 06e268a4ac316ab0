import importlib.util
import os
import warnings

from .configs import ALIASES, MODEL_CONFIGS, canonical_name
from .factory import (CheckpointFormatError, CheckpointMismatchError, checkpoint_filter_fn, create_model,
                      extract_state_dict, load_checkpoint)
from .groupmixformer import GroupMixFormer
from .pretrained import PRETRAINED_CFGS, PretrainedWeightsNotFound, resolve_pretrained_file

__all__ = ["GroupMixFormer", "create_model", "load_checkpoint", "MODEL_CONFIGS", "ALIASES", "canonical_name",
           "CheckpointMismatchError", "CheckpointFormatError", "checkpoint_filter_fn", "extract_state_dict",
           "PRETRAINED_CFGS", "PretrainedWeightsNotFound", "resolve_pretrained_file", "register_with_timm"]

#: why the timm entry points are not registered (None when they are, or before the attempt)
TIMM_REGISTRATION_ERROR = None


def register_with_timm() -> bool:
    """Register `groupmixformer_m|t|s|b|l` with timm when timm is importable (`import gmf_kernels`
    calls this). Without timm this costs one `find_spec` and does nothing; `GMF_TIMM=0` turns it
    off. A timm that is installed but fails to import is reported with a warning, not raised."""
    global TIMM_REGISTRATION_ERROR
    if os.environ.get("GMF_TIMM", "1") == "0":
        TIMM_REGISTRATION_ERROR = "GMF_TIMM=0"
        return False
    if importlib.util.find_spec("timm") is None:
        TIMM_REGISTRATION_ERROR = "timm is not installed"
        return False
    try:
        from . import _timm  # noqa: F401  (registers on import)
    except Exception as e:  # e.g. a torchvision that does not match the installed torch
        TIMM_REGISTRATION_ERROR = f"timm is installed but could not be imported: {type(e).__name__}: {e}"
        warnings.warn(f"gmf_kernels: {TIMM_REGISTRATION_ERROR}; the groupmixformer_* timm models are not "
                      f"registered (set GMF_TIMM=0 to skip this)", RuntimeWarning, stacklevel=2)
        return False
    TIMM_REGISTRATION_ERROR = None
    return True
