import importlib.abc
import importlib.util
import sys
import warnings

from .._env import env_flag
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


def _register_now() -> bool:
    """Import `_timm` (its `@register_model` entries register on import); a timm that fails to
    import (e.g. a torchvision built for another torch) gives a warning, never an error."""
    global TIMM_REGISTRATION_ERROR
    try:
        from . import _timm  # noqa: F401  (registers on import)
    except Exception as e:
        TIMM_REGISTRATION_ERROR = f"timm is installed but could not be imported: {type(e).__name__}: {e}"
        warnings.warn(f"gmf_kernels: {TIMM_REGISTRATION_ERROR}; the groupmixformer_* timm models are not "
                      f"registered (set GMF_TIMM=0 to skip this)", RuntimeWarning, stacklevel=3)
        return False
    TIMM_REGISTRATION_ERROR = None
    return True


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Registers the models right after `import timm` runs, so that `import gmf_kernels` does
    not pay for importing timm and torchvision (seconds) when timm is not used. One-shot: it
    removes itself from sys.meta_path at timm's import, finds timm's real spec without itself,
    and wraps that spec's `exec_module` to register once timm's package has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        _remove_timm_hook()
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            _register_now()

        spec.loader.exec_module = exec_module
        return spec


def _remove_timm_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterTimmImport)]


def register_with_timm() -> bool:
    """Register `groupmixformer_m|t|s|b|l` with timm (`import gmf_kernels` calls this).

    timm already imported: registered now. timm installed but not imported: registered when
    it is (`import timm` anywhere later; returns False and TIMM_REGISTRATION_ERROR says it is
    pending) — `import gmf_kernels` itself never imports timm. Without timm this costs one
    `find_spec` and does nothing; `GMF_TIMM=0` turns it off. Returns whether the models are
    registered now."""
    global TIMM_REGISTRATION_ERROR
    _remove_timm_hook()
    if not env_flag("GMF_TIMM", True):
        TIMM_REGISTRATION_ERROR = "GMF_TIMM=0"
        return False
    if sys.modules.get("timm") is not None:
        return _register_now()
    if importlib.util.find_spec("timm") is None:
        TIMM_REGISTRATION_ERROR = "timm is not installed"
        return False
    TIMM_REGISTRATION_ERROR = "pending: registered when timm is imported"
    sys.meta_path.insert(0, _AfterTimmImport())
    return False
