"""Pretrained configurations of the five released models, and where their weights are found.

Plain data, no timm needed: `models/_timm.py` hands these to timm (`generate_default_cfgs`)
when timm is installed, and `GroupMixFormer.pretrained_cfg` carries the entry of the model
`create_model` built.

Upstream (AILab-CVC/GroupMixFormer, MIT) publishes each checkpoint as a OneDrive *folder*
link in its README's Model Zoo (no direct file URL), so nothing is downloaded here:
`pretrained=True` reads a local file, found in this order:

1. the file given explicitly: timm's `pretrained_cfg_overlay=dict(file=PATH)`
   (or `gmf_kernels.create_model(..., checkpoint=PATH)`);
2. `$GMF_PRETRAINED_DIR/<file name>` (the environment variable);
3. the cache folder `$XDG_CACHE_HOME/gmf_kernels/checkpoints/<file name>`
   (`~/.cache/gmf_kernels/checkpoints/` by default; `default_cache_dir()`).

`<file name>` is upstream's (`groupmixformer_tiny.pth`, as upstream's extract_clean_ckpt.py
writes it; ours and upstream's short names are both accepted). A missing file raises
`PretrainedWeightsNotFound`, which says where to download it and every path looked at.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from .configs import canonical_name

#: timm's IMAGENET_DEFAULT_MEAN / _STD (upstream's data/build.py normalises with them)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

UPSTREAM_REPO = "https://github.com/AILab-CVC/GroupMixFormer"
UPSTREAM_MODEL_ZOO = UPSTREAM_REPO + "#%EF%B8%8F-model-zoo"
ENV_DIR = "GMF_PRETRAINED_DIR"

# upstream README, "Model Zoo": one OneDrive folder per model. (Upstream's README links the
# -M and -L rows to the same folder; both are given as published.)
_ONEDRIVE = "https://connecthkuhk-my.sharepoint.com/:f:/g/personal/rhettgee_connect_hku_hk/"
_UPSTREAM = {
    "groupmixformer_m": ("groupmixformer_miny.pth", 79.6,
                         _ONEDRIVE + "EuH7I7RGUSVHhD46RTECpesBqJVyACRzmBDwBXYWRxcDtg?e=Qvexbk"),
    "groupmixformer_t": ("groupmixformer_tiny.pth", 82.6,
                         _ONEDRIVE + "EnRAzY3LalhGmqx91sEIqrUBLoa5ISS9kOw1ujNcOWSrzA?e=vkCUTZ"),
    "groupmixformer_s": ("groupmixformer_small.pth", 83.4,
                         _ONEDRIVE + "Em7lUESSPaFPowQotlsUi1sBjA9uVldOUi2mbqdF40Uktw?e=ExCTeU"),
    "groupmixformer_b": ("groupmixformer_base.pth", 84.7,
                         _ONEDRIVE + "Env1DBxPFZpMifAaVhHpKYgB3O4urE34o4b9_g4Jr-JfQQ?e=C6ed1c"),
    "groupmixformer_l": ("groupmixformer_large.pth", 85.0,
                         _ONEDRIVE + "EuH7I7RGUSVHhD46RTECpesBqJVyACRzmBDwBXYWRxcDtg?e=Qvexbk"),
}


def _cfg(name: str) -> Dict:
    file_name, top1, folder = _UPSTREAM[name]
    return dict(
        url="",  # no direct download (a folder link): pretrained=True reads a local file
        file=None,
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
        crop_pct=0.875,  # upstream test transform: Resize(int(256 / 224 * 224)) then CenterCrop(224)
        crop_mode="center", interpolation="bicubic", fixed_input_size=False,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="conv_stem.proj1", classifier="head",
        license="mit", paper_name="Advancing Vision Transformers with Group-Mix Attention",
        origin_url=UPSTREAM_REPO, notes=(f"ImageNet-1k top-1 {top1} (published)",
                                         f"download {file_name} from {folder}"),
        # ours, not timm's:
        upstream_file_name=file_name, download_folder=folder,
    )


#: model name -> its pretrained configuration (timm's pretrained_cfg fields, plus
#: `upstream_file_name` and `download_folder`)
PRETRAINED_CFGS: Dict[str, Dict] = {name: _cfg(name) for name in _UPSTREAM}


class PretrainedWeightsNotFound(FileNotFoundError):
    """`pretrained=True` without a local checkpoint file; the message says where to get one."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gmf_kernels" / "checkpoints"


def candidate_paths(name: str) -> List[Path]:
    """Every path `pretrained=True` looks at for model `name`, in order (explicit file aside)."""
    name = canonical_name(name)
    file_names = [_UPSTREAM[name][0], name + ".pth"]
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]).expanduser())
    dirs.append(default_cache_dir())
    return [d / f for d in dirs for f in file_names]


def resolve_pretrained_file(name: str, file: Optional[os.PathLike] = None) -> Path:
    """The local checkpoint file of model `name` (see the module docstring for the order)."""
    name = canonical_name(name)
    if file:
        path = Path(file).expanduser()
        if path.is_file():
            return path
        raise PretrainedWeightsNotFound(_not_found_message(name, [path], explicit=True))
    tried = candidate_paths(name)
    for path in tried:
        if path.is_file():
            return path
    raise PretrainedWeightsNotFound(_not_found_message(name, tried, explicit=False))


def _not_found_message(name: str, tried: List[Path], explicit: bool) -> str:
    file_name, _, folder = _UPSTREAM[name]
    looked = "\n    ".join(str(p) for p in tried)
    where = "the file given does not exist" if explicit else "no local checkpoint file was found"
    env = "" if os.environ.get(ENV_DIR) else f" ({ENV_DIR} is not set)"
    return (f"pretrained weights of {name}: {where}. Looked at:\n    {looked}\n"
            f"  Upstream publishes them as a folder link (no direct download): get {file_name} from\n"
            f"    {folder}\n"
            f"  (upstream's Model Zoo: {UPSTREAM_MODEL_ZOO}), then either pass the file, e.g.\n"
            f"    timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))\n"
            f"    gmf_kernels.create_model({name!r}, checkpoint=PATH)\n"
            f"  or put it in ${ENV_DIR}{env} or in {default_cache_dir()}.")
