"""gmf_kernels: fused Triton and CUDA kernels for GroupMixFormer's Group-Mix Attention.

Install torch for your platform first, then `pip install -e .`.

When nvcc is found, the CUDA module in csrc/ is compiled ahead of time into
gmf_kernels/cuda/_prebuilt/ (it includes no torch headers, so one build serves every
torch version). GMF_SKIP_CUDA_BUILD=1 skips it; GMF_CUDA_ARCHS="80;90" picks targets.
Without a prebuilt module, `python -m gmf_kernels.cuda build` compiles it later.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


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
        if os.environ.get("GMF_SKIP_CUDA_BUILD", "0") == "1":
            print("gmf_kernels: GMF_SKIP_CUDA_BUILD=1, not building the CUDA module")
            return
        if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            print("gmf_kernels: nvcc not found, not building the CUDA module "
                  "(build later with `python -m gmf_kernels.cuda build`)")
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


setup(
    name="gmf_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for GroupMixFormer's Group-Mix Attention",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["gmf_kernels", "gmf_kernels.*"]),
    package_data={"gmf_kernels": ["cuda/_prebuilt/*.so", "cuda/_prebuilt/*.json", "cuda/_prebuilt/*.log"]},
    include_package_data=True,
    # torch is required but not pinned here: install the build for your platform first
    # (pip would otherwise pull the default CUDA wheel). See README.md.
    install_requires=["torch>=2.4", "filelock", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "cuda": ["pybind11>=2.10", "ninja"],
        "test": ["pytest>=7", "numpy", "triton==3.6.0", "pybind11>=2.10", "ninja"],
    },
    cmdclass={"build_py": BuildPyWithCuda},
)
