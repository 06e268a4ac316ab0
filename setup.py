"""gmf_kernels: fused Triton and CUDA kernels for GroupMixFormer's Group-Mix Attention.

Install torch for your platform first, then `pip install -e .`.

When nvcc is found, the CUDA module in csrc/ is compiled ahead of time into
gmf_kernels/cuda/_prebuilt/ (it includes no torch headers, so one build serves every
torch version), unless torch has no CUDA (torch.version.cuda is None: the CPU wheel), where
only GMF_FORCE_CUDA_BUILD=1 or an explicit GMF_CUDA_ARCHS builds it. GMF_SKIP_CUDA_BUILD=1
always skips it; GMF_CUDA_ARCHS picks targets (default
"75;80;86;89;90" + PTX compute_90; "native" = the GPUs visible here; sm_70 needs CUDA 12.x).
Without a prebuilt module, `python -m gmf_kernels.cuda build` compiles it later.
"""
import glob
import importlib.util
import os
import re
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


_TRUE = ("1", "true", "yes", "on")
_TORCH_CUDA_RE = re.compile(r"^cuda\s*(?::[^=]*)?=\s*(None|'[^']*'|\"[^\"]*\")\s*$", re.MULTILINE)


def _torch_version_file_cuda(path):
    """torch.version.cuda read from a torch/version.py without importing it: (True, value) or (False, None)."""
    try:
        with open(path) as f:
            m = _TORCH_CUDA_RE.search(f.read())
    except OSError:
        return False, None
    if m is None:
        return False, None
    value = m.group(1)
    return True, None if value == "None" else value[1:-1]


def _candidate_site_dirs():
    """Where the torch that gmf_kernels will run with may live. pip builds in an isolated
    environment, where `import torch` fails: look in the environment being installed into
    (the active virtual/conda environment, the interpreter that runs pip) as well."""
    dirs = list(sys.path)
    for prefix in (os.environ.get("VIRTUAL_ENV"), os.environ.get("CONDA_PREFIX"), _pip_prefix(), sys.prefix):
        if prefix:
            dirs += glob.glob(os.path.join(prefix, "lib", "python*", "site-packages"))
            dirs.append(os.path.join(prefix, "Lib", "site-packages"))
    return dirs


def _pip_prefix():
    """The environment of the process that runs this build (pip), from its command line (Linux)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            exe = f.read().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return None
    return os.path.dirname(os.path.dirname(exe)) if os.path.isabs(exe) else None


def torch_cuda_version():
    """(found, torch.version.cuda) of the torch gmf_kernels will run with; (False, None) if none is found."""
    try:
        import torch  # an installation without build isolation
        return True, torch.version.cuda
    except ImportError:
        pass
    for d in _candidate_site_dirs():
        found, cuda = _torch_version_file_cuda(os.path.join(d, "torch", "version.py"))
        if found:
            return True, cuda
    return False, None


def cuda_build_decision(env, nvcc_found, torch_found, torch_cuda):
    """Whether `pip install` builds the CUDA module, and the one line it prints: (build, line).

    GMF_SKIP_CUDA_BUILD=1 never builds; without nvcc (or CUDA_HOME) nothing can be built; a
    torch without CUDA (torch.version.cuda is None) could never load the module, so it is built
    only when asked for (GMF_FORCE_CUDA_BUILD=1, or GMF_CUDA_ARCHS set), e.g. to cross-compile."""
    if env.get("GMF_SKIP_CUDA_BUILD", "0").strip().lower() in _TRUE:
        return False, "gmf_kernels: GMF_SKIP_CUDA_BUILD=1, not building the CUDA module"
    if not nvcc_found:
        return False, ("gmf_kernels: nvcc not found, not building the CUDA module "
                       "(build later with `python -m gmf_kernels.cuda build`)")
    forced = env.get("GMF_FORCE_CUDA_BUILD", "0").strip().lower() in _TRUE
    archs = env.get("GMF_CUDA_ARCHS", "").strip()
    if forced or archs:
        why = "GMF_FORCE_CUDA_BUILD=1" if forced else f"GMF_CUDA_ARCHS={archs}"
        return True, f"gmf_kernels: building the CUDA module ({why})"
    if torch_found and torch_cuda is None:
        return False, ("gmf_kernels: torch has no CUDA (torch.version.cuda is None), not building the CUDA "
                       "module (GMF_FORCE_CUDA_BUILD=1 or GMF_CUDA_ARCHS=... builds it anyway)")
    if not torch_found:
        return True, "gmf_kernels: building the CUDA module (nvcc found; torch not found to ask whether it has CUDA)"
    return True, f"gmf_kernels: building the CUDA module (nvcc found, torch CUDA {torch_cuda})"


def _load_cuda_build():
    """Load gmf_kernels/cuda/build.py by path: it needs neither torch nor the package."""
    path = os.path.join(HERE, "gmf_kernels", "cuda", "build.py")
    spec = importlib.util.spec_from_file_location("_gmf_cuda_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithCuda(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # a wheel ships the sources for later builds
            shutil.copytree(os.path.join(HERE, "csrc"), os.path.join(self.build_lib, "gmf_kernels", "cuda", "_csrc"),
                            dirs_exist_ok=True)
        nvcc_found = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
        skip = os.environ.get("GMF_SKIP_CUDA_BUILD", "0").strip().lower() in _TRUE
        torch_found, torch_cuda = torch_cuda_version() if nvcc_found and not skip else (False, None)
        build_it, line = cuda_build_decision(os.environ, nvcc_found, torch_found, torch_cuda)
        print(line)
        if not build_it:
            return
        build = _load_cuda_build()
        out_dir = os.path.join(HERE, "gmf_kernels", "cuda", "_prebuilt")
        try:
            path = build.build_ahead_of_time(out_dir)
            print(f"gmf_kernels: built CUDA module {path}")
            if not getattr(self, "editable_mode", False):
                dst = os.path.join(self.build_lib, "gmf_kernels", "cuda", "_prebuilt")
                os.makedirs(dst, exist_ok=True)
                shutil.copy2(path, dst)
        except Exception as e:  # the pure-PyTorch and Triton paths work without it
            print(f"gmf_kernels: WARNING: CUDA module build failed ({e}); "
                  f"run `python -m gmf_kernels.cuda build` to see the full error", file=sys.stderr)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for the functions above
    setup(
        name="gmf_kernels",
        version="0.1.0",
        description="Fused Triton and CUDA kernels for GroupMixFormer's Group-Mix Attention",
        long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
        long_description_content_type="text/markdown",
        license="MIT",
        python_requires=">=3.10",
        packages=find_packages(include=["gmf_kernels", "gmf_kernels.*"]),
        package_data={"gmf_kernels": ["cuda/_prebuilt/*.so", "cuda/_prebuilt/*.json", "cuda/_prebuilt/*.log",
                                      "data/*.json", "data/tuning/*.json"]},
        include_package_data=True,
        # torch is required but not pinned here: install the build for your platform first
        # (pip would otherwise pull the default CUDA wheel). See README.md.
        install_requires=["torch>=2.4", "filelock", "numpy"],
        extras_require={
            "triton": ["triton>=3.0"],
            "cuda": ["pybind11>=2.10", "ninja"],
            "test": ["pytest>=7", "numpy", "triton==3.6.0", "pybind11>=2.10", "ninja", "onnx", "onnxruntime", "onnxscript", "matplotlib", "pytest-xdist"],
        },
        cmdclass={"build_py": BuildPyWithCuda},
    )
