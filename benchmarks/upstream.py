"""Upstream's own GroupMixFormer (a local clone of AILab-CVC/GroupMixFormer), for side-by-side timing.

    from benchmarks.upstream import load_upstream_model, upstream_with_weights
    model = load_upstream_model("/path/to/GroupMixFormer", "groupmixformer_t")        # random weights
    model = upstream_with_weights("/path/to/GroupMixFormer", "groupmixformer_t", ours.state_dict())

`benchmarks/throughput.py --upstream PATH` uses this to time upstream's file beside our
backends, with the same weights: upstream's state_dict keys are ours by design (docs/spec.md §2),
so our model's state_dict loads into upstream's strictly, and every row computes the same function.

Why load by path: the clone is the user's, not a package. `PATH/models/groupmixformer.py` is
executed as the module `gmf_upstream_groupmixformer` (importlib, once per file); the clone is
never put on `sys.path` (the file imports only third-party packages). Upstream's file imports
`ipdb` (never used): when ipdb is not installed a stub module stands in for the import only
(`UpstreamModule.notes` says so). Its other imports, `timm` and `einops`, are real
dependencies: when the file's own imports fail, `UpstreamError` names the module and the pip
command. Upstream's BatchNorms are `nn.SyncBatchNorm`: in one process without
`torch.distributed` initialised they run as plain BatchNorm (torch's fallback, no
synchronisation); `syncbn_note` checks that this holds for the benchmark's process.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Dict, List, Mapping, Optional

MODULE_NAME = "gmf_upstream_groupmixformer"
MODEL_FILE = Path("models") / "groupmixformer.py"
#: import name -> pip package, for the error message
PIP_NAMES = {"timm": "timm", "einops": "einops", "ipdb": "ipdb", "fvcore": "fvcore"}
#: our constructor arguments that upstream's GroupMixFormer takes under the same name
SHARED_ARGS = ("embedding_dims", "serial_depths", "mlp_ratios", "num_heads", "qkv_bias", "qk_scale",
               "drop_rate", "drop_path_rate", "num_classes", "return_interm_layers")

_LOADED: Dict[str, types.ModuleType] = {}


class UpstreamError(RuntimeError):
    """The clone cannot be used: the message says why and what to do."""


def model_file(path) -> Path:
    """PATH/models/groupmixformer.py, or UpstreamError naming what is missing."""
    root = Path(os.path.expanduser(os.fspath(path)))
    if not root.exists():
        raise UpstreamError(f"upstream clone {str(root)!r} does not exist (expected a clone of "
                            f"https://github.com/AILab-CVC/GroupMixFormer)")
    if not root.is_dir():
        raise UpstreamError(f"upstream clone {str(root)!r} is not a directory")
    f = root / MODEL_FILE
    if not f.is_file():
        raise UpstreamError(f"{str(root)!r} has no {MODEL_FILE} (is it a clone of AILab-CVC/GroupMixFormer? "
                            f"pass the clone's top folder)")
    return f.resolve()


def _ipdb_stub() -> Optional[types.ModuleType]:
    """A stand-in `ipdb` when it is not installed (upstream imports it and never calls it)."""
    if "ipdb" in sys.modules or importlib.util.find_spec("ipdb") is not None:
        return None
    stub = types.ModuleType("ipdb")
    stub.__doc__ = "gmf_kernels benchmarks: stub for upstream's unused `import ipdb`"

    def set_trace(*_a, **_k):
        raise RuntimeError("ipdb is a stub here (benchmarks/upstream.py): install ipdb to debug upstream's code")

    stub.set_trace = set_trace
    return stub


def load_module(path) -> types.ModuleType:
    """Execute upstream's models/groupmixformer.py (once per file) and return the module.

    `module.gmf_notes` lists what was done to make it importable (the ipdb stub)."""
    f = model_file(path)
    key = str(f)
    if key in _LOADED:
        return _LOADED[key]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, f)
    module = importlib.util.module_from_spec(spec)
    notes: List[str] = []
    stub = _ipdb_stub()
    if stub is not None:
        sys.modules["ipdb"] = stub
        notes.append("ipdb is not installed: a stub module stood in for upstream's unused `import ipdb`")
    previous = sys.modules.get(MODULE_NAME)  # another clone's, loaded before: restored on failure

    def unregister():
        if previous is None:
            sys.modules.pop(MODULE_NAME, None)
        else:
            sys.modules[MODULE_NAME] = previous

    sys.modules[MODULE_NAME] = module  # torch.jit / pickling look classes up by their module's name
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        unregister()
        top = (e.name or "").split(".")[0]
        pip = PIP_NAMES.get(top, top)
        raise UpstreamError(f"upstream's {f} imports {e.name!r}, which is not installed in this Python "
                            f"({sys.executable}): pip install {pip}" +
                            (" (timm imports torchvision: its version must match this torch's)" if top == "timm"
                             else "")) from e
    except Exception as e:
        unregister()
        raise UpstreamError(f"importing upstream's {f} failed: {type(e).__name__}: {e}") from e
    finally:
        if stub is not None and sys.modules.get("ipdb") is stub:
            del sys.modules["ipdb"]  # the module keeps its reference; nothing else sees the stub
    if not isinstance(getattr(module, "GroupMixFormer", None), type):
        unregister()
        raise UpstreamError(f"upstream's {f} defines no class GroupMixFormer")
    module.gmf_notes = notes
    _LOADED[key] = module
    return module


def upstream_config(model_name: str, **overrides) -> Dict:
    """Upstream's constructor arguments for one of our models: our config (gmf_kernels.models.
    configs) plus the defaults of our constructor for what the config leaves out (heads, qkv bias),
    then `overrides`."""
    from gmf_kernels.models import groupmixformer as ours
    from gmf_kernels.models.configs import MODEL_CONFIGS, canonical_name
    defaults = inspect.signature(ours.GroupMixFormer.__init__).parameters
    cfg = {k: defaults[k].default for k in SHARED_ARGS if k in defaults}
    cfg.update(MODEL_CONFIGS[canonical_name(model_name)])
    cfg.update(overrides)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    return cfg


def load_upstream_model(path, model_name: str, **overrides):
    """Upstream's GroupMixFormer built from its own file with our `model_name`'s configuration
    (random weights, upstream's initialisation). `overrides`: upstream constructor arguments."""
    module = load_module(path)
    cls = module.GroupMixFormer
    cfg = upstream_config(model_name, **overrides)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in cfg if k not in accepted]
        if unknown:
            raise UpstreamError(f"upstream's GroupMixFormer takes no argument(s) {unknown} (its arguments: "
                                f"{[k for k in accepted if k != 'self']})")
    model = cls(**cfg)
    model.gmf_notes = list(module.gmf_notes)
    return model


def _few(keys, n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def upstream_with_weights(path, model_name: str, state_dict: Mapping, **overrides):
    """Upstream's model with our model's weights: `state_dict` (ours, same keys by design) is
    loaded strictly; a mismatch raises UpstreamError listing a few keys of each kind."""
    model = load_upstream_model(path, model_name, **overrides)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"our {model_name} state_dict does not load into upstream's GroupMixFormer (strict):"]
        if missing:
            parts.append(f"{len(missing)} upstream key(s) not in ours: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} of our key(s) not in upstream's: {_few(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} key(s) with other shapes (ours vs upstream's): {_few(shapes)}")
        raise UpstreamError("\n  ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    return model


def syncbn_note(model) -> Optional[str]:
    """Upstream's nn.SyncBatchNorm layers: None when there are none; else a note that they run as
    BatchNorm here, or UpstreamError when this process is one of several (they would synchronise
    with the others, which the benchmark does not run)."""
    import torch
    n = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if not n:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise UpstreamError(f"upstream's {n} SyncBatchNorm layers would synchronise over the "
                            f"{dist.get_world_size()} processes of torch.distributed: run the benchmark in one process")
    return (f"{n} SyncBatchNorm layers run as BatchNorm (one process, torch.distributed not initialised: "
            f"torch's fallback to F.batch_norm)")


if __name__ == "__main__":   # a library: say so rather than exit silently
    print(__doc__)
    print("(a module, not a command: benchmarks/throughput.py --upstream PATH uses it)")
