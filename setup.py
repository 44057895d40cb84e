"""Build tokenreduce and its native op library (torch C++ extension `tokenreduce._C`).

The CPU kernels always build. The CUDA kernels (csrc/*/*.cu launchers + csrc/*/*_cuda.cpp
glue) are added when torch is a CUDA build and nvcc is found; otherwise the build is CPU
only, exactly as before (a CUDA machine can still run the CUDA ops through the NVRTC
fallback, tokenreduce/nvrtc, when CuPy is installed).

Knobs (build time only):
  TOKENREDUCE_NATIVE_ARCH=0  build without -march=native (for a portable binary).
  TOKENREDUCE_CUDA=0         never build the CUDA kernels (CPU-only extension).
  TOKENREDUCE_CUDA_ARCHS     space-separated SM list for nvcc (default "80 90").

The NVRTC device sources (csrc/common/cuda_common.cuh, csrc/*/*_kernels.cuh) are copied
into the package as tokenreduce/nvrtc/_src/ by build_py (wheels, regular installs); an
editable or in-place build reads them from csrc/ directly (tokenreduce/nvrtc finds both).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_sources():
    srcs = ["csrc/registration.cpp", "csrc/python_module.cpp"]
    srcs += sorted(glob.glob("csrc/*/*_cpu.cpp", root_dir=HERE))
    return srcs


def cuda_sources():
    srcs = sorted(glob.glob("csrc/*/*.cu", root_dir=HERE))
    srcs += sorted(glob.glob("csrc/*/*_cuda.cpp", root_dir=HERE))
    return srcs


def cxx_flags():
    flags = ["-O3", "-fopenmp", "-DAT_PARALLEL_OPENMP=1", "-Wno-unknown-pragmas"]
    if os.environ.get("TOKENREDUCE_NATIVE_ARCH", "1") != "0":
        flags.append("-march=native")
    return flags


def want_cuda() -> bool:
    if os.environ.get("TOKENREDUCE_CUDA", "1") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return bool(nvcc and os.path.exists(nvcc) and cuda_sources())


def nvcc_flags():
    archs = os.environ.get("TOKENREDUCE_CUDA_ARCHS", "80 90").split()
    flags = ["-O3", "-std=c++17", "-lineinfo", "-DTOKENREDUCE_WITH_CUDA"]
    for a in archs:  # no --use_fast_math: exact sqrt / division keep CPU parity
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def extension():
    if want_cuda():
        from torch.utils.cpp_extension import CUDAExtension

        return CUDAExtension(
            "tokenreduce._C",
            cpu_sources() + cuda_sources(),
            extra_compile_args={"cxx": cxx_flags() + ["-DTOKENREDUCE_WITH_CUDA"], "nvcc": nvcc_flags()},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "tokenreduce._C",
        cpu_sources(),
        extra_compile_args={"cxx": cxx_flags()},
        extra_link_args=["-fopenmp"],
    )


class BuildPyWithKernelSources(build_py):
    """Also ship the NVRTC device sources as tokenreduce/nvrtc/_src/<op>/<file>.cuh."""

    def run(self):
        super().run()
        if self.dry_run:
            return
        files = ["csrc/common/cuda_common.cuh"] + sorted(glob.glob("csrc/*/*_kernels.cuh", root_dir=HERE))
        for rel in files:
            dst = os.path.join(self.build_lib, "tokenreduce", "nvrtc", "_src", os.path.relpath(rel, "csrc"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(HERE, rel), dst)


setup(
    # name, version, dependencies (with their supported ranges) and the console script are
    # declared in pyproject.toml; this file adds what needs code: the extension and build_py.
    # tokenreduce.testing (test oracles, synthetic inputs) is for tests/ and bench/ only
    packages=find_packages(include=["tokenreduce", "tokenreduce.*"],
                           exclude=["tokenreduce.testing", "tokenreduce.testing.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithKernelSources},
)
